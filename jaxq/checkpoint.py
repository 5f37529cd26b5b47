"""Orbax checkpoints of float or quantized params, with a versioned metadata record.

A checkpoint directory is an orbax CheckpointManager root. Each save writes a new step into a
temporary directory that orbax renames into place only when complete, then drops the older
step: a crash mid-save leaves the previous checkpoint intact and loadable. Each step holds
    params    the arrays (a format becomes a dict of its arrays: codes_0, scale, zero, ...)
    metadata  JSON: checkpoint and jaxq versions, model config, QuantConfig, tokenizer, and a
              record per leaf (format name and version, static fields, array shapes/dtypes
              and a digest of its bytes)
`load` rebuilds the exact formats from the record and checks every array against it (shape,
dtype, digest: Orbax/OCDBT keeps no checksums of its own) and the model config's shapes, so a
truncated, bit-flipped, edited or foreign checkpoint fails with a clear error, as do NaN or Inf
in any float array.

Over several processes (`jaxq.distributed`) every process calls `save` with the same params:
they are checked to be the same on every process (their digests), gathered to host memory, and
process 0 writes them while the others take part in Orbax's barriers; every process can load
the result, and so can a single process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

import jaxq
from jaxq import distributed, tree
from jaxq.config import QuantConfig
from jaxq.formats.base import FORMATS
from jaxq.methods.registry import quant_config_from_dict
from models.config import LlamaConfig
from models.language_model import LanguageModel, abstract_params as model_abstract_params

# Version 2 adds a digest per array. A reader accepts its own version only (`_check_versions`):
# there is no reader of older versions to fall back on, and reading a version-1 checkpoint would
# mean loading arrays nothing can verify, the very gap version 2 closes. Re-quantizing rewrites it.
CHECKPOINT_VERSION = 2
FLOAT = "float"
RUNTIME_FIELDS = ("dtype", "param_dtype")  # dtype policy is chosen at load time, not stored
# how a quantized model runs (`jaxq.quantize_model`): the same model, deployed differently
DEPLOYMENT_FIELDS = ("rotation", "activations", "kv_cache")
RESUME_MARKER = "run.json"  # at the root of a `jaxq.calibrate.resume` progress directory


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) loaded, with the reason."""


class NoCheckpointError(CheckpointError):
    """No directory, or no complete step in it (nothing saved yet, or an interrupted first save)."""


class CorruptCheckpointError(CheckpointError):
    """Array data that cannot be read back, or differs from what was saved."""


class ModelDirectoryError(CheckpointError):
    """A Hugging Face or GGUF model directory given where a jaxq checkpoint is expected."""


class VersionMismatchError(CheckpointError):
    """A jaxq checkpoint written in another checkpoint format version."""


class ResumeProgressDirectoryError(CheckpointError):
    """Calibration resume progress (`jaxq quantize --resume`) given where a checkpoint is expected."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    params: Any
    model_config: LlamaConfig | None  # None: a tree saved without a model
    quant_config: QuantConfig | None
    tokenizer: Any
    metadata: dict[str, Any]

    def language_model(self) -> LanguageModel:
        """A `models.LanguageModel` ready for `apply` / `jaxq.evaluate`."""
        if self.model_config is None:
            raise CheckpointError("this checkpoint was saved without a model config (model_config=None), so it "
                                  "holds params but no model to run them with")
        return LanguageModel(self.model_config, self.params, self.tokenizer, self.metadata.get("source", ""))


@dataclasses.dataclass
class PendingSave:
    """An asynchronous save in flight; `wait()` blocks until it is committed."""

    manager: ocp.CheckpointManager
    directory: Path

    def wait(self) -> Path:
        self.manager.wait_until_finished()
        self.manager.close()
        return self.directory


def _records(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nested dict of arrays with string keys, {path: record})."""
    arrays: dict[str, Any] = {}
    records = {}
    for path, leaf in tree.flatten(params)[0]:
        if tree.is_format(leaf):
            arrays[path] = leaf.arrays()
            records[path] = {"format": leaf.format_name, "version": leaf.format_version,
                             "static": leaf.static_fields(),
                             "arrays": {k: _spec(v) for k, v in arrays[path].items()}}
        else:
            arrays[path] = leaf
            records[path] = {"format": FLOAT, "arrays": {"": _spec(leaf)}}
    return traverse_util.unflatten_dict(arrays, sep="/"), records


def _spec(array: Any) -> dict[str, Any]:
    """Shape, dtype and digest (`array_digest`) of one stored array."""
    return {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name, "digest": array_digest(array)}


def array_digest(array: Any) -> str:
    """Hex blake2b-128 of an array's dtype, shape and C-order bytes (numpy or jax, any dtype)."""
    host = np.ascontiguousarray(_to_host(array))
    digest = hashlib.blake2b(f"{host.dtype.name}{host.shape}".encode(), digest_size=16)
    digest.update(host.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _to_host(array: Any) -> np.ndarray:
    """`array` as numpy. An accelerator array is duplicated on its device first: np.asarray of
    the array itself would keep the host copy cached on it for as long as the array lives."""
    if isinstance(array, jax.Array) and array.is_fully_addressable and any(d.platform != "cpu" for d in array.devices()):
        array = jax.device_put(array, may_alias=False)
    return distributed.host_array(array)  # shards held by other processes gathered


def _tokenizer_record(tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    return {"json": tokenizer.backend_tokenizer.to_str(), "special_tokens": tokenizer.special_tokens_map}


def write_tree(directory: str | os.PathLike, tree: Any, metadata: dict[str, Any], *, step: int | None = None,
               max_to_keep: int | None = 1, asynchronous: bool = False) -> Path | PendingSave:
    """Write a tree of arrays and formats as a new step (default: latest + 1) of `directory`,
    with `metadata` plus the versions and per-leaf records `read_tree` validates against."""
    directory = Path(directory).absolute()
    if jax.process_count() > 1:  # one copy, in host memory, the same on every process: process 0 writes it
        tree = jax.tree_util.tree_map(_to_host, tree)  # before the digests, so each array crosses once
    arrays, records = _records(tree)
    if jax.process_count() > 1:
        distributed.check_same_everywhere(json.dumps(records, sort_keys=True), f"the checkpoint for {directory}")
    metadata = {"jaxq_checkpoint_version": CHECKPOINT_VERSION, "jaxq_version": jaxq.__version__,
                **metadata, "leaves": records}
    manager = _manager(directory, max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous)
    if step is None:
        step = 0 if manager.latest_step() is None else manager.latest_step() + 1
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(arrays),
                                               metadata=ocp.args.JsonSave(metadata)))
    pending = PendingSave(manager, directory)
    return pending if asynchronous else pending.wait()


def save(directory: str | os.PathLike, params: Any, *, model_config: LlamaConfig | None = None,
         quant_config: QuantConfig | None = None, tokenizer: Any = None, source: str = "",
         asynchronous: bool = False) -> Path | PendingSave:
    """Write params (+ metadata) as a new step of `directory`; returns the directory, or a
    `PendingSave` whose `wait()` commits it when `asynchronous`. Without `model_config` any
    tree of arrays and formats is saved (and loaded back as nested dicts, unchecked against a
    model)."""
    metadata = {
        "model_config": None if model_config is None else model_config.to_dict(),
        "quant_config": None if quant_config is None else quant_config.to_dict(),
        "tokenizer": _tokenizer_record(tokenizer),
        "source": source,
    }
    return write_tree(directory, params, metadata, asynchronous=asynchronous)


def _manager(directory: Path, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(**options),
        item_handlers={"params": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()})


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata record of the newest (or a given) complete step in `directory`, version-checked."""
    manager, step = _open(directory, step)
    try:
        metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    except Exception as err:
        raise CheckpointError(f"checkpoint {directory}: metadata is unreadable ({type(err).__name__}: {err})") from None
    finally:
        manager.close()
    _check_versions(directory, metadata)
    return metadata


def _open(directory: str | os.PathLike, step: int | None = None) -> tuple[ocp.CheckpointManager, int]:
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise NoCheckpointError(f"no checkpoint at {directory}: directory not found")
    manager = _manager(directory, create=False)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        manager.close()
        raise _no_step_error(directory)
    return manager, step


def _no_step_error(directory: Path) -> CheckpointError:
    """Why `directory` has no complete step: it is another kind of directory, or no save finished."""
    if (directory / "config.json").is_file() or any(directory.glob("*.gguf")):
        kind = "a Hugging Face model directory" if (directory / "config.json").is_file() else "a GGUF model directory"
        return ModelDirectoryError(
            f"{directory} is {kind}, not a jaxq checkpoint: pass it as `--model {directory}` (to `jaxq eval` "
            "or `jaxq quantize`), or load it with `models.load`")
    if (directory / RESUME_MARKER).is_file():
        return _resume_progress_error(directory, directory)
    return NoCheckpointError(f"no complete checkpoint in {directory} (an interrupted save leaves only "
                             "a temporary directory behind)")


def _resume_progress_error(directory: Path, root: Path) -> ResumeProgressDirectoryError:
    """`directory` is `root`, the progress directory of a resumable calibration run, or inside it."""
    what = "calibration resume progress" if directory == root else f"part of the calibration resume progress in {root}"
    return ResumeProgressDirectoryError(
        f"{directory} is {what} (written by `jaxq quantize --resume`), not a checkpoint: pass `--resume {root}` "
        "to `jaxq quantize` to finish that run (its checkpoint is written to --out)")


def _check_versions(directory: Any, metadata: dict[str, Any]) -> None:
    version = metadata.get("jaxq_checkpoint_version")
    if version is None:
        raise CheckpointError(f"{directory} is not a jaxq checkpoint (no jaxq_checkpoint_version)")
    if version != CHECKPOINT_VERSION:
        raise VersionMismatchError(
            f"{directory} was written by jaxq {metadata.get('jaxq_version')} with checkpoint format "
            f"{version}; this jaxq {jaxq.__version__} reads format {CHECKPOINT_VERSION}. Use a matching "
            "jaxq version, or re-quantize the model (writing to the same directory replaces it)")
    for path, record in metadata["leaves"].items():
        if record["format"] != FLOAT:
            _check_format_record(directory, path, record)


def _check_format_record(directory: Any, path: str, record: dict[str, Any]) -> None:
    """The format of a leaf record, and of any format record nested in its static fields (the
    inner format of a `Rotated`), is known in the version stored."""
    name = record["format"]
    if name not in FORMATS:
        raise CheckpointError(f"{directory}: {path} uses format {name!r}, unknown to jaxq {jaxq.__version__}")
    if record["version"] != FORMATS[name].format_version:
        raise CheckpointError(
            f"{directory}: {path} is format {name!r} version {record['version']}; this jaxq reads "
            f"version {FORMATS[name].format_version}")
    for value in record["static"].values():
        if isinstance(value, dict) and {"format", "version", "static"} <= value.keys():
            _check_format_record(directory, f"{path} ({name}'s inner format)", value)


def read_model_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the newest checkpoint `save` wrote in `directory` (version-checked, with a
    model record), or an error saying what the directory is instead."""
    metadata = read_metadata(directory)
    if "model_config" not in metadata:
        directory = Path(directory).absolute()
        if (directory.parent / RESUME_MARKER).is_file():
            raise _resume_progress_error(directory, directory.parent)
        raise CheckpointError(f"{directory} holds no model (it is not a `jaxq quantize` checkpoint)")
    return metadata


def read_tree(directory: str | os.PathLike, metadata: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    """Restore the arrays `metadata` (from `read_metadata`) describes, verify them against its
    digests and for finite floats on the host, and rebuild the formats on the first local device."""
    records = metadata["leaves"]
    targets = jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), _abstract_arrays(records))
    manager, step = _open(directory, step)
    try:
        _check_stored_arrays(directory, manager.item_metadata(step)["params"], targets)
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(targets)))["params"]
    except CheckpointError:
        raise
    except Exception as err:
        raise CorruptCheckpointError(f"checkpoint {directory} is corrupted or truncated: could not read its "
                                     f"arrays ({type(err).__name__}: {str(err)[:300]})") from None
    finally:
        manager.close()
    _verify_arrays(directory, restored, records)
    return _rebuild(jax.device_put(restored, jax.local_devices()[0]), records)


def _verify_arrays(directory: Any, restored: dict[str, Any], records: dict[str, Any]) -> None:
    """Each restored host array has the digest its record holds and, if float, no NaN or Inf."""
    stored = traverse_util.flatten_dict(restored, sep="/", is_leaf=lambda path, node: "/".join(path) in records)
    for path, record in records.items():
        arrays = {"": stored[path]} if record["format"] == FLOAT else stored[path]
        for name, spec in record["arrays"].items():
            where = f"{path}/{name}" if name else path
            if array_digest(arrays[name]) != spec.get("digest"):
                raise CorruptCheckpointError(
                    f"checkpoint {directory} is corrupt: array {where} differs from the digest recorded when it "
                    "was saved (its data changed on disk); write the checkpoint again (`jaxq quantize`, `jaxq.save`)")
            bad = _count_non_finite(arrays[name])
            if bad:
                raise CheckpointError(
                    f"checkpoint {directory}: {where} holds NaN or Inf ({bad} of {arrays[name].size} values), as it "
                    "was saved; save it again from finite params")


def _count_non_finite(array: np.ndarray) -> int:
    """NaN and Inf values in a host array (0 for integer arrays)."""
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def load(directory: str | os.PathLike, *, expect: LlamaConfig | None = None,
         dtype: str | None = None) -> Checkpoint:
    """Restore the newest checkpoint in `directory`.

    expect: the model config the caller will run the params with; a checkpoint of a different
      model is refused. dtype: compute dtype of the returned model config (default: as saved).
    """
    metadata = read_model_metadata(directory)
    model_config = None
    if metadata["model_config"] is not None:
        model_config = LlamaConfig.from_dict(metadata["model_config"])
        if dtype is not None:
            model_config = model_config.replace(dtype=dtype)
        _check_against_model(directory, model_config, metadata["leaves"])
    if expect is not None:
        if model_config is None:
            raise CheckpointError(f"checkpoint {directory} was saved without a model config; it cannot be "
                                  f"checked against the expected model")
        _check_same_model(directory, model_config, expect)
    quant = metadata.get("quant_config")
    return Checkpoint(params=read_tree(directory, metadata), model_config=model_config,
                      quant_config=None if quant is None else quant_config_from_dict(quant),
                      tokenizer=_rebuild_tokenizer(metadata.get("tokenizer")), metadata=metadata)


def _abstract_arrays(records: dict[str, Any]) -> dict[str, Any]:
    """Nested dict of ShapeDtypeStruct, the tree `save` wrote, placed on the first local device
    whatever mesh it was saved from (re-shard with `jaxq.sharding.shard_params`)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out: dict[str, Any] = {}
    for path, record in records.items():
        specs = {k: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]), sharding=device)
                 for k, v in record["arrays"].items()}
        out[path] = specs[""] if record["format"] == FLOAT else specs
    return traverse_util.unflatten_dict(out, sep="/")


def _check_stored_arrays(directory: Any, stored: Any, expected: Any) -> None:
    """Orbax's own record of what was written must agree with the jaxq metadata."""
    got = {tree.path_str(kp): (tuple(v.shape), np.dtype(v.dtype).name)
           for kp, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {tree.path_str(kp): (tuple(v.shape), np.dtype(v.dtype).name)
            for kp, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise CheckpointError(f"checkpoint {directory} is inconsistent: stored arrays differ from its "
                              f"metadata record, e.g. {diff}")


def model_differences(saved: LlamaConfig, expected: LlamaConfig, deployment: bool = True) -> list[str]:
    """Fields in which two configs differ, never the dtype policy; with deployment=False not how
    the model is deployed either (rotation, which unties the head, activations, KV cache): the
    same model, quantized differently."""
    a, b = saved.to_dict(), expected.to_dict()
    same = RUNTIME_FIELDS
    if not deployment:
        same += DEPLOYMENT_FIELDS + (("tie_word_embeddings",) if saved.rotation or expected.rotation else ())
    return [f"{k}={a[k]!r} (expected {b[k]!r})" for k in a if k not in same and a[k] != b[k]]


def _check_same_model(directory: Any, saved: LlamaConfig, expected: LlamaConfig) -> None:
    diff = model_differences(saved, expected)  # the caller runs the params with `expected`: all of it counts
    if diff:
        raise CheckpointError(f"checkpoint {directory} holds a different model: {', '.join(diff[:6])}")


def _check_against_model(directory: Any, config: LlamaConfig, records: dict[str, Any]) -> None:
    """Every leaf the model needs is there with the model's logical shape."""
    expected = {p: tuple(leaf.shape) for p, leaf in tree.flatten(model_abstract_params(config))[0]}
    stored = {}
    for path, record in records.items():
        stored[path] = (tuple(record["static"]["shape"]) if record["format"] != FLOAT
                        else tuple(record["arrays"][""]["shape"]))
    if stored != expected:
        missing = sorted(set(expected) - set(stored))[:3]
        extra = sorted(set(stored) - set(expected))[:3]
        shapes = [f"{p} {stored[p]} vs {expected[p]}" for p in sorted(set(stored) & set(expected))
                  if stored[p] != expected[p]][:3]
        raise CheckpointError(f"checkpoint {directory} does not match its model config: missing {missing}, "
                              f"unexpected {extra}, shape mismatches {shapes}")


def _rebuild(restored: dict[str, Any], records: dict[str, Any]) -> dict[str, Any]:
    """Restored nested arrays -> params tree with formats and integer layer keys."""
    stored = traverse_util.flatten_dict(restored, sep="/", is_leaf=lambda path, node: "/".join(path) in records)
    params = {}
    for path, record in records.items():
        value = stored[path]
        if record["format"] != FLOAT:
            value = FORMATS[record["format"]].from_arrays(value, record["static"])
        params[tuple(int(k) if k.isdigit() else k for k in path.split("/"))] = value
    return traverse_util.unflatten_dict(params)


def abstract_params(metadata: dict[str, Any]) -> dict[str, Any]:
    """The params tree a checkpoint holds, formats included, with ShapeDtypeStruct arrays."""
    return _rebuild(_abstract_arrays(metadata["leaves"]), metadata["leaves"])


def _rebuild_tokenizer(record: dict[str, Any] | None):
    if record is None:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(record["json"]),
                                   **record["special_tokens"])


def quiet_orbax_logs() -> None:
    """Orbax logs every step at INFO through absl; keep command-line output readable."""
    logging.getLogger("absl").setLevel(logging.WARNING)


# ------------------------------------------------------------------ destinations

class DestinationError(CheckpointError):
    """A checkpoint destination that cannot or must not be written."""


def check_destination(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Where `save` may write a checkpoint, checked before any work: the (created) directory,
    proven writable. Refused: a file; resume progress or Orbax steps that are not a jaxq
    checkpoint (saving would delete those steps), even with `overwrite`; without it, a
    non-empty directory of other files. See `check_replaceable` for the model it holds."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{path} is an existing file, not a checkpoint directory; choose another path")
    if (path / RESUME_MARKER).is_file() or (path.parent / RESUME_MARKER).is_file():
        raise DestinationError(f"{path} holds calibration resume progress (`--resume`), which a checkpoint "
                               "written there would delete; choose another directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise DestinationError(f"cannot write to {path} ({err.strerror or err}); choose a writable directory") from None
    if _has_steps(path):
        _existing_checkpoint(path)  # refuses foreign Orbax steps
    elif any(path.iterdir()) and not overwrite:
        raise DestinationError(
            f"{path} is a non-empty directory that is not a jaxq checkpoint; choose an empty or new "
            "directory, or pass --overwrite (overwrite=True) to write the checkpoint beside its files")
    return path


def check_replaceable(directory: Path, config: LlamaConfig, source: str, *, overwrite: bool = False) -> None:
    """Without `overwrite`, refuse to replace a checkpoint of another model than `config` loaded
    from `source` (a jaxq checkpoint of an older format is replaced: re-quantizing rewrites it)."""
    metadata = _existing_checkpoint(directory)
    if overwrite or metadata is None:
        return
    saved = None if metadata["model_config"] is None else LlamaConfig.from_dict(metadata["model_config"])
    if saved is None or not _same_source(metadata.get("source", ""), source) or \
            model_differences(saved, config, deployment=False):
        raise DestinationError(
            f"{directory} holds a checkpoint of another model ({metadata.get('source') or 'unknown source'}, not "
            f"{source}); choose another directory, or pass --overwrite (overwrite=True) to replace it")


def _existing_checkpoint(path: Path) -> dict[str, Any] | None:
    """The metadata of the current-format jaxq checkpoint in `path`; None when there is none or
    it is of an older format; an error when `path` holds Orbax steps of something else."""
    if not _has_steps(path):
        return None
    try:
        return read_model_metadata(path)
    except VersionMismatchError:
        return None
    except CheckpointError as err:
        raise DestinationError(f"{path} holds Orbax steps that are not a jaxq checkpoint ({err}); a checkpoint "
                               "written there would delete them: choose another directory") from None


def _has_steps(path: Path) -> bool:
    """`path` holds numbered step directories (Orbax's layout)."""
    return any(child.name.isdigit() and child.is_dir() for child in path.iterdir())


def _same_source(a: str, b: str) -> bool:
    """Two model sources name the same thing: equal strings, or paths to the same file/directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
