import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxq
import models
from jaxq import checkpoint
from jaxq.checkpoint import CheckpointError
from jaxq.config import QuantConfig, UniformConfig

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


def metadata_file(directory: Path) -> Path:
    (step,) = [p for p in directory.iterdir() if p.name.isdigit()]
    return step / "metadata" / "metadata"


def edit_metadata(directory: Path, edit) -> None:
    path = metadata_file(directory)
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def test_round_trip_identical_bits_and_logits(quantized, tmp_path, rng):
    checkpoint.save(tmp_path / "ck", quantized, model_config=CONFIG, quant_config=QCFG)
    restored = checkpoint.load(tmp_path / "ck", expect=CONFIG)
    assert leaves_equal(quantized, restored.params)
    assert restored.quant_config == QCFG and restored.model_config == CONFIG
    tokens = rng.integers(0, 97, size=(2, 12))
    lm = models.LanguageModel(CONFIG, quantized)
    np.testing.assert_array_equal(np.asarray(lm.apply(quantized, tokens)), np.asarray(lm.apply(restored.params, tokens)))


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
