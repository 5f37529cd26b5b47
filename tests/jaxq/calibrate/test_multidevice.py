"""8 CPU devices (faked with XLA_FLAGS, hence subprocesses) give 1 device's codes and perplexity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxq import checkpoint

ROOT = Path(__file__).resolve().parents[3]


def run_script(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "calibrate_multidevice.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", [["--method", "gptq", "--act-order"], ["--method", "awq"]],
                         ids=["gptq-act-order", "awq"])
def test_eight_devices_match_one(method, tiny_llama_with_tokenizer, tmp_path):
    directory, text = tiny_llama_with_tokenizer
    common = ["--model", directory, *method, "--bits", "3", "--group-size", "32", "--calib-data", str(text),
              "--calib-samples", "16", "--calib-len", "32", "--calib-step", "8", "--eval-data", str(text),
              "--eval-ctx", "32", "--eval-windows", "8", "--eval-batch", "8"]
    one = run_script(*common, "--fake-cpu-devices", "1", "--out", str(tmp_path / "one"))
    eight = run_script(*common, "--fake-cpu-devices", "8", "--devices", "8", "--model-parallel", "2",
                       "--out", str(tmp_path / "eight"))
    assert one["devices"] == 1 and eight["devices"] == 8 and eight["mesh"] == {"data": 4, "model": 2}
    a, b = checkpoint.load(tmp_path / "one").params, checkpoint.load(tmp_path / "eight").params
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise: codes, scales, norms
    # sharded evaluation reduces in another order: equal to float32 rounding
    assert eight["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
