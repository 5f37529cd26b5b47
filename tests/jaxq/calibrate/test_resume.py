"""Calibration progress on disk (`resume_dir`): a run killed (SIGKILL) at any moment resumes to
the same bits; progress of another run, or damaged progress, is refused with what to do."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate, checkpoint, cli
from jaxq.calibrate import resume, sequential
from jaxq.config import GPTQConfig, UniformConfig
from tests.jaxq.test_checkpoint import flip_one_bit, rewrite_array

ROOT = Path(__file__).resolve().parents[3]
CONFIG = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16)
GPTQ3 = GPTQConfig(uniform=UniformConfig(bits=3, group_size=32))


def float_params(seed: int = 0):
    return models.init_params(CONFIG, seed=seed)


def calibration(resume_dir=None) -> calibrate.Calibration:
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(8, 32)).astype(np.int32)
    return calibrate.Calibration(config=CONFIG, tokens=tokens, step_samples=4, progress=False,
                                 resume_dir=None if resume_dir is None else str(resume_dir))


def assert_same_bits(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted():
    return jaxq.quantize(float_params(), GPTQ3, calibration())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The progress directory of a completed run (tests that damage it work on a copy)."""
    directory = tmp_path_factory.mktemp("progress") / "run"
    jaxq.quantize(float_params(), GPTQ3, calibration(directory))
    return directory


KILLED_RUN = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
import jaxq
from tests.jaxq.calibrate.test_resume import GPTQ3, calibration, float_params

steps = []
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def counted(self):
    if self.get().name.split(".")[0].isdigit():  # a step about to be renamed into place (not one of its items)
        steps.append(self.get())
        if len(steps) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = counted
jaxq.quantize(float_params(), GPTQ3, calibration(sys.argv[1]))
"""


@pytest.mark.parametrize("commit, redone", [
    (2, ["layers/0", "layers/1"]),  # block 0 saved, the activations after it written but not renamed into place
    (3, ["layers/1"]),  # block 0 and its activations saved, block 1 written but not renamed into place
])
def test_killed_calibration_resumes_to_the_same_bits(uninterrupted, tmp_path, monkeypatch, commit, redone):
    """SIGKILL just before the n-th progress step (blocks/0, activations/0, blocks/1, ...) is renamed
    into place; the rerun redoes only the blocks whose activations were not saved."""
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "run"), str(commit)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    real, calls = sequential.calibrate_block, []

    def recorded(cal, mesh, block, h, methods, name, *float_path):
        calls.append(name)
        return real(cal, mesh, block, h, methods, name, *float_path)

    monkeypatch.setattr(sequential, "calibrate_block", recorded)
    assert_same_bits(jaxq.quantize(float_params(), GPTQ3, calibration(tmp_path / "run")), uninterrupted)
    assert calls == redone


def test_progress_of_another_model_is_refused(finished):
    """Same architecture, other weights: its blocks must not end up in this model."""
    message = (f"{finished} holds progress of a different calibration run (different model weights): resuming "
               f"would put that run's blocks into this one. Use another resume directory, or delete {finished} "
               "to start this run over")
    with pytest.raises(resume.ResumeMismatchError, match=re.escape(message)):
        jaxq.quantize(float_params(seed=1), GPTQ3, calibration(finished))


def test_progress_fingerprinted_by_an_older_jaxq_is_refused(tmp_path):
    (tmp_path / checkpoint.RESUME_MARKER).write_text(json.dumps({"fingerprint": "0" * 64}))
    with pytest.raises(resume.ResumeMismatchError, match=r"\(different jaxq version\)"):
        resume.Progress.open(calibration(tmp_path), {"layers/0/mlp/up_proj/kernel": GPTQ3}, float_params())


def test_damaged_progress_is_reported_not_used(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    rewrite_array(copy / "blocks" / "0", "block/mlp/up_proj/kernel/scale", flip_one_bit)
    with pytest.raises(checkpoint.CheckpointError,
                       match=re.escape("is corrupt: array block/mlp/up_proj/kernel/scale differs from the digest")
                       + ".*" + re.escape(f"delete {copy} to start the run over")):
        jaxq.quantize(float_params(), GPTQ3, calibration(copy))


@pytest.mark.parametrize("part", ["", "blocks", "activations"])
def test_progress_is_not_a_checkpoint(finished, capsys, part):
    """`jaxq inspect` / `jaxq eval --checkpoint` on progress say to pass it to --resume instead."""
    target = finished / part if part else finished
    what = "calibration resume progress" if not part else f"part of the calibration resume progress in {finished}"
    message = (f"{target} is {what} (written by `jaxq quantize --resume`), not a checkpoint: pass "
               f"`--resume {finished}` to `jaxq quantize` to finish that run")
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)) as caught:
        checkpoint.load(target)
    assert isinstance(caught.value, checkpoint.ResumeProgressDirectoryError)
    assert cli.main(["inspect", str(target)]) == 2
    assert message in capsys.readouterr().err
