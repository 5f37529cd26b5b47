import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxq
import models
from jaxq import checkpoint, cli
from jaxq.checkpoint import CheckpointError
from jaxq.config import QuantConfig, UniformConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16)
QCFG = QuantConfig.for_method(UniformConfig(bits=3, group_size=32, zero_point="float"))


@pytest.fixture
def quantized():
    return jaxq.quantize(models.init_params(CONFIG, seed=0), QCFG)


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb)))


def only_step(directory: Path) -> Path:
    (step,) = [p for p in directory.iterdir() if p.name.isdigit()]
    return step


def metadata_file(directory: Path) -> Path:
    return only_step(directory) / "metadata" / "metadata"


def edit_metadata(directory: Path, edit) -> None:
    path = metadata_file(directory)
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def rewrite_array(step: Path, path: str, edit) -> None:
    """Rewrite one stored array of a step directory (params path, e.g. 'lm_head/kernel') through
    Orbax's own API, leaving the jaxq metadata record as it was saved."""
    item = step / "params"
    arrays = ocp.StandardCheckpointer().restore(item)
    node = arrays
    *parents, name = path.split("/")
    for key in parents:
        node = node[key]
    node[name] = edit(np.array(node[name]))
    rewritten = step.parent / f"{step.name}.rewritten"
    with ocp.StandardCheckpointer() as writer:
        writer.save(rewritten, arrays)
    shutil.rmtree(item)
    shutil.move(rewritten, item)


def flip_one_bit(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1).view(np.uint8)
    flat[flat.size // 2] ^= 0x04
    return array


def test_round_trip_identical_bits_and_logits(quantized, tmp_path, rng):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG, quant_config=QCFG)
    restored = checkpoint.load(tmp_path / "ck", expect=CONFIG)
    assert leaves_equal(quantized, restored.params)
    assert restored.quant_config == QCFG and restored.model_config == CONFIG
    tokens = rng.integers(0, 97, size=(2, 12))
    lm = models.LanguageModel(CONFIG, quantized)
    np.testing.assert_array_equal(np.asarray(lm.apply(quantized, tokens)), np.asarray(lm.apply(restored.params, tokens)))


def test_a_tree_without_a_model_config_round_trips(tmp_path, capsys, rng):
    """Any tree of arrays and formats, e.g. one quantized weight of a model jaxq has no class for."""
    w = rng.normal(size=(96, 40)).astype(np.float32)
    tree = {"encoder": {"dense": {"kernel": jaxq.methods.rtn.quantize_weight(w, UniformConfig(bits=4, group_size=32)),
                                  "bias": np.zeros(40, np.float32)}}, "step": np.int32(7)}
    checkpoint.save(tmp_path / "ck", tree, quant_config=QCFG)
    restored = checkpoint.load(tmp_path / "ck")
    assert restored.model_config is None and restored.quant_config == QCFG and leaves_equal(tree, restored.params)
    with pytest.raises(CheckpointError, match="saved without a model config"):
        restored.language_model()
    with pytest.raises(CheckpointError, match="saved without a model config"):
        checkpoint.load(tmp_path / "ck", expect=CONFIG)
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0
    assert "model: none recorded" in capsys.readouterr().out


def test_async_save_then_overwrite_keeps_one_step(quantized, tmp_path):
    pending = checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG, asynchronous=True)
    pending.wait()
    float_params = models.init_params(CONFIG, seed=1)
    checkpoint.save(tmp_path / "ck", float_params, model_config=CONFIG)
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()] == ["1"]
    assert leaves_equal(checkpoint.load(tmp_path / "ck").params, float_params)


def test_failed_save_leaves_the_previous_checkpoint(quantized, tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    monkeypatch.setattr(checkpoint, "_tokenizer_record", lambda tok: {"not json": {1, 2}})
    with pytest.raises(TypeError, match="not JSON serializable"):  # the save dies midway
        checkpoint.save(tmp_path / "ck", models.init_params(CONFIG, seed=7), model_config=CONFIG, tokenizer=object())
    assert leaves_equal(checkpoint.load(tmp_path / "ck").params, quantized)


def test_leftover_temporary_directory_is_ignored(quantized, tmp_path):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    junk = tmp_path / "ck" / "1.orbax-checkpoint-tmp-1234567"
    junk.mkdir()
    (junk / "garbage").write_text("half-written")
    assert leaves_equal(checkpoint.load(tmp_path / "ck").params, quantized)


def test_truncated_array_data_is_reported(quantized, tmp_path):
    """Every array data file cut in half (OCDBT keeps per-process and merged copies)."""
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    data = [p for p in (tmp_path / "ck").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        checkpoint.load(tmp_path / "ck")


def test_corrupted_metadata_is_reported(quantized, tmp_path):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    metadata_file(tmp_path / "ck").write_text('{"jaxq_checkpoint_version": 1, "lea')
    with pytest.raises(CheckpointError, match="metadata is unreadable"):
        checkpoint.load(tmp_path / "ck")


def test_metadata_that_disagrees_with_the_arrays(quantized, tmp_path):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)

    def shrink_scale(record):
        record["leaves"]["layers/0/mlp/up_proj/kernel"]["arrays"]["scale"]["shape"] = [96, 1]
    edit_metadata(tmp_path / "ck", shrink_scale)
    with pytest.raises(CheckpointError, match="stored arrays differ from its metadata"):
        checkpoint.load(tmp_path / "ck")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(jaxq_checkpoint_version=99, jaxq_version="9.0"), "written by jaxq 9.0 with checkpoint format 99"),
    (lambda r: r["leaves"]["layers/1/self_attn/q_proj/kernel"].update(version=7), "format 'uniform' version 7"),
    (lambda r: r["leaves"]["layers/1/self_attn/q_proj/kernel"].update(format="vq"), "format 'vq', unknown"),
    (lambda r: r.pop("jaxq_checkpoint_version"), "not a jaxq checkpoint"),
])
def test_incompatible_versions_are_refused(quantized, tmp_path, edit, message):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    edit_metadata(tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(tmp_path / "ck")


def test_restoring_into_a_different_model_is_refused(quantized, tmp_path):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    other = CONFIG.replace(num_layers=3, intermediate_size=128)
    with pytest.raises(CheckpointError, match="different model: intermediate_size=96 .expected 128., num_layers=2"):
        checkpoint.load(tmp_path / "ck", expect=other)
    assert checkpoint.load(tmp_path / "ck", expect=CONFIG.replace(dtype="bfloat16")).params is not None


def test_params_that_do_not_fit_their_config_are_refused(quantized, tmp_path):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG.replace(num_layers=3))
    with pytest.raises(CheckpointError, match=r"does not match its model config: missing \['layers/2/"):
        checkpoint.load(tmp_path / "ck")


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        checkpoint.load(tmp_path / "nothing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.load(tmp_path / "empty")


@pytest.mark.parametrize("path", ["lm_head/kernel", "layers/0/mlp/up_proj/kernel/scale",
                                  "layers/1/self_attn/k_proj/kernel/codes_0"])
def test_one_flipped_bit_is_caught_by_the_digest(quantized, tmp_path, path):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG, quant_config=QCFG)
    rewrite_array(only_step(tmp_path / "ck"), path, flip_one_bit)
    with pytest.raises(CheckpointError, match=f"is corrupt: array {path} differs from the digest") as caught:
        checkpoint.load(tmp_path / "ck")
    assert isinstance(caught.value, checkpoint.CorruptCheckpointError)


def test_flipped_bits_in_data_files_never_load_silently(quantized, tmp_path):
    """A bit flipped at several places of each array data file (OCDBT stores them compressed):
    either the load fails with a CheckpointError or it returns exactly the saved arrays (the
    flip hit bytes the load does not read); a changed value is caught by its digest."""
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    data = sorted(p for p in (tmp_path / "ck").rglob("*") if p.is_file() and p.parent.name == "d")
    caught = []
    for path in data:
        saved = path.read_bytes()
        for fraction in (0.25, 0.5, 0.75):
            flipped = bytearray(saved)
            flipped[int(len(saved) * fraction)] ^= 0x10
            path.write_bytes(bytes(flipped))
            try:
                assert leaves_equal(checkpoint.load(tmp_path / "ck").params, quantized), (path, fraction)
            except CheckpointError as err:
                caught.append(str(err))
            path.write_bytes(saved)
    assert any("differs from the digest recorded" in message for message in caught), caught


def test_a_version_1_checkpoint_is_refused(quantized, tmp_path):
    """Version 1 recorded no digests; readers accept their own version only."""
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)

    def as_version_1(record):
        record["jaxq_checkpoint_version"] = 1
        for leaf in record["leaves"].values():
            for spec in leaf["arrays"].values():
                spec.pop("digest", None)
    edit_metadata(tmp_path / "ck", as_version_1)
    with pytest.raises(CheckpointError, match=f"written by jaxq {jaxq.__version__} with checkpoint format 1; "
                                              f"this jaxq {jaxq.__version__} reads format 2"):
        checkpoint.load(tmp_path / "ck")


@pytest.mark.parametrize("leaf, array, value", [("lm_head/kernel", None, np.nan), ("norm/scale", None, np.inf),
                                                ("layers/0/mlp/up_proj/kernel", "scale", -np.inf)])
def test_non_finite_values_are_refused_naming_the_array(quantized, tmp_path, leaf, array, value):
    """NaN or Inf in any float array, a float leaf or one inside a format, as it was saved."""
    def poison(x):
        x = np.array(x)
        x.reshape(-1)[3] = value
        return x

    node = quantized
    *parents, name = leaf.split("/")
    for key in parents:
        node = node[int(key) if key.isdigit() else key]
    if array is None:
        node[name] = poison(node[name])
    else:
        fmt = node[name]
        node[name] = type(fmt).from_arrays({**fmt.arrays(), array: poison(fmt.arrays()[array])}, fmt.static_fields())
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    where = leaf if array is None else f"{leaf}/{array}"
    with pytest.raises(CheckpointError, match=f"{where} holds NaN or Inf \\(1 of [0-9]+ values\\)"):
        checkpoint.load(tmp_path / "ck")


@pytest.mark.parametrize("files, kind", [(("config.json", "model.safetensors"), "a Hugging Face model directory"),
                                         (("model-Q4_0.gguf",), "a GGUF model directory")])
def test_a_model_directory_is_not_a_checkpoint(tmp_path, capsys, files, kind):
    model = tmp_path / "model"
    model.mkdir()
    for name in files:
        (model / name).write_text("{}")
    message = f"{model} is {kind}, not a jaxq checkpoint: pass it as `--model {model}`"
    with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
        checkpoint.load(model)
    assert isinstance(caught.value, checkpoint.ModelDirectoryError)
    for command in (["inspect", str(model)], ["eval", "--checkpoint", str(model)]):
        assert cli.main(command) == 2
        assert message in capsys.readouterr().err


KILLED_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
import jaxq, models
from tests.jaxq.test_checkpoint import CONFIG

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def die(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

async def die_before_the_step_rename(self):
    if self.get().name.split(".")[0].isdigit():  # the step, not one of its items
        os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)

if sys.argv[2] == "writing":
    ocp.JsonCheckpointHandler.async_save = die
else:
    atomicity.AtomicRenameTemporaryPath.finalize = die_before_the_step_rename
jaxq.save(sys.argv[1], models.init_params(CONFIG, seed=7), model_config=CONFIG)
"""


@pytest.mark.parametrize("moment", ["writing", "committing"])
def test_kill_9_during_save_keeps_the_previous_checkpoint(quantized, tmp_path, moment):
    """A process killed (SIGKILL) while writing a new step, or once it is written but not yet
    renamed into place: the previous step still loads, and the next save succeeds."""
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG)
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ck"), moment], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p for p in (tmp_path / "ck").iterdir() if "tmp" in p.name], "the save was not interrupted"
    assert leaves_equal(checkpoint.load(tmp_path / "ck").params, quantized)
    float_params = models.init_params(CONFIG, seed=7)
    checkpoint.save(tmp_path / "ck", float_params, model_config=CONFIG)
    assert leaves_equal(checkpoint.load(tmp_path / "ck").params, float_params)


def test_a_rotated_checkpoint_does_not_load_as_the_unrotated_model(tmp_path):
    """expect= is the config the caller runs the params with: a rotation (online transforms,
    untied head) must match, while re-quantizing into the directory treats it as the same model."""
    config = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8)
    lm = jaxq.quantize_model(models.LanguageModel(config, models.init_params(config, seed=0)),
                             jaxq.QuantConfig.for_method(jaxq.UniformConfig(bits=4, group_size=16), rotate="hadamard"))
    jaxq.save(tmp_path / "c", lm.params, model_config=lm.config)
    with pytest.raises(checkpoint.CheckpointError, match="rotation='hadamard'"):
        jaxq.load(tmp_path / "c", expect=config)
    assert jaxq.load(tmp_path / "c", expect=lm.config).model_config == lm.config
    checkpoint.check_replaceable(tmp_path / "c", config, "")
