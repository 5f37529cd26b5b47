"""Several processes joined by jax.distributed on localhost (2 x 2 fake CPU devices, gloo
collectives) give what one process with 4 devices gives; a lost process ends the others."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxq import checkpoint, distributed
from tests.conftest import save_letter_tokenizer, save_tiny, tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = ["--bits", "3", "--group-size", "32", "--calib-samples", "16", "--calib-len", "32",
               "--calib-step", "8"]
PEER_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict:
    """A CPU-only environment with `devices` fake devices, compiled as the single-host
    comparisons are (scripts/calibrate_multidevice.py: classic CPU emitters)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                                              "--xla_cpu_use_fusion_emitters=false")
    return env


def processes(command: list[str], count: int, devices: int) -> list[subprocess.Popen]:
    """`count` copies of `command` joined on a free localhost port (nothing added for 1)."""
    port = free_port()
    joined = lambda i: ["--coordinator", f"localhost:{port}", "--num-processes", str(count), "--process-id", str(i),
                        "--peer-timeout", str(PEER_TIMEOUT_S)] if count > 1 else []
    return [subprocess.Popen(command + joined(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=environment(devices), cwd=ROOT) for i in range(count)]


def results(out: str) -> list[dict]:
    """The JSON lines of a process's stdout (gloo prints its connections there too)."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def finished(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Each process's stdout, once all exited 0."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outs]


@pytest.mark.parametrize("method", [["--method", "gptq", "--act-order"], ["--method", "awq"]],
                         ids=["gptq-act-order", "awq"])
def test_two_processes_give_one_process_codes(method, tiny_llama_with_tokenizer, tmp_path):
    directory, text = tiny_llama_with_tokenizer
    script = [sys.executable, str(ROOT / "scripts" / "calibrate_multidevice.py"), "--model", directory, *method,
              *CALIBRATION, "--calib-data", str(text), "--eval-data", str(text), "--eval-ctx", "32",
              "--eval-windows", "8", "--eval-batch", "8"]
    pod = processes(script + ["--out", str(tmp_path / "pod")], count=2, devices=2)
    one = processes(script + ["--out", str(tmp_path / "one")], count=1, devices=4)  # beside the pod: 2 cores
    (pod_out, other_out), (one_out,) = finished(pod), finished(one)
    assert results(other_out) == []  # process 1 prints nothing: process 0 reports
    (pod_result,), (one_result,) = results(pod_out), results(one_out)
    assert (pod_result["processes"], pod_result["devices"], one_result["processes"]) == (2, 4, 1)
    # the pod's checkpoint, loaded by this single process: the same arrays bit for bit
    a, b = checkpoint.load(tmp_path / "pod").params, checkpoint.load(tmp_path / "one").params
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # windows over the same 4 devices, each process feeding its own 2: the same sums, the same bits
    assert pod_result["ppl"] == one_result["ppl"]


def test_pod_eval_of_a_checkpoint_prints_once(tiny_llama_with_tokenizer, tmp_path):
    """`jaxq quantize` and `jaxq eval` take the distributed flags: 2 processes write one
    checkpoint and evaluate it on a (data, model) mesh over both; the perplexity equals one
    process's on the same mesh shape."""
    directory, text = tiny_llama_with_tokenizer
    cli = [sys.executable, "-m", "jaxq.cli"]
    finished(processes(cli + ["quantize", "--model", directory, "--method", "gptq", *CALIBRATION, "--calib-data",
                              str(text), "--out", str(tmp_path / "q"), "--quiet"], count=2, devices=2))
    evaluation = cli + ["eval", "--checkpoint", str(tmp_path / "q"), "--data", str(text), "--ctx", "32",
                        "--windows", "8", "--json", "--quiet", "--model-parallel", "2"]
    pod_out, other_out = finished(processes(evaluation, count=2, devices=2))  # a 2 x 2 (data, model) mesh
    (one_out,) = finished(processes(evaluation + ["--data-parallel", "2"], count=1, devices=4))
    assert results(other_out) == []
    (pod_result,), (one_result,) = results(pod_out), results(one_out)
    assert pod_result["ppl"] == one_result["ppl"]


def test_a_killed_process_ends_the_other_and_leaves_progress_loadable(tmp_path):
    import transformers

    directory = save_tiny(transformers.LlamaForCausalLM(tiny_llama_config(num_hidden_layers=8)).eval(),
                          tmp_path / "model")
    save_letter_tokenizer(directory)
    text = tmp_path / "text.txt"
    text.write_text("thequickbrownfoxjumpsoverthelazydog" * 10)
    resume = tmp_path / "resume"
    quantize = [sys.executable, "-m", "jaxq.cli", "quantize", "--model", directory, "--method", "gptq", *CALIBRATION,
                "--calib-data", str(text), "--resume", str(resume), "--out", str(tmp_path / "q"), "--quiet"]
    survivor, victim = processes(quantize, count=2, devices=2)
    deadline = time.monotonic() + 300
    while not (resume / "blocks" / "1").is_dir():  # two blocks committed: mid-calibration
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1][-3000:]
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = survivor.communicate(timeout=PEER_TIMEOUT_S + 60)
    waited = time.monotonic() - killed
    print(f"the survivor ended {waited:.1f} s after its peer was killed (peer timeout {PEER_TIMEOUT_S} s)")
    victim.communicate()
    assert survivor.returncode != 0
    assert re.search(r"stopped sending heartbeats\):\s*1\b", err), err[-3000:]  # names process 1
    assert waited < PEER_TIMEOUT_S + 30, waited
    assert not list((tmp_path / "q").glob("[0-9]*"))  # no checkpoint step was started
    # every committed step of the progress is whole, and one process resumes from it
    for step in sorted(int(p.name) for p in (resume / "blocks").iterdir() if p.name.isdigit()):
        checkpoint.read_tree(resume / "blocks", checkpoint.read_metadata(resume / "blocks", step), step)
    finished(processes(quantize, count=1, devices=4))
    assert len(checkpoint.load(tmp_path / "q").params["layers"]) == 8


def test_process_group_options_are_checked():
    with pytest.raises(distributed.DistributedError, match="all of --coordinator"):
        distributed.ProcessGroup(coordinator="localhost:1234")
    with pytest.raises(distributed.DistributedError, match="not in"):
        distributed.ProcessGroup("localhost:1234", 2, 2)
    with pytest.raises(distributed.DistributedError, match="no coordinator"):
        distributed.ProcessGroup("localhost:1234", 2, 0, auto=True)
    assert not distributed.ProcessGroup().wanted
