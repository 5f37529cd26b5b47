"""Per-block progress of a calibration run, so an interrupted run continues where it stopped.

resume_dir/
  run.json       fingerprint of the run: a digest of each thing its results depend on (tokens,
                 float weights, model config, methods, propagation, step size, checkpoint format)
  blocks/        one checkpoint step per finished block: its quantized params
  activations/   the inputs of the next block, along the calibration path and (for trained
                 methods) the float path (only the newest is kept)
Blocks are written before the activations that follow them, and each write is atomic, so the
newest activations step always has all its blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxq import checkpoint, distributed, tree
from jaxq.config import QuantConfig, Rule


class ResumeMismatchError(ValueError):
    """The resume directory belongs to a different calibration run."""


def weights_digest(params: Any) -> str:
    """Hex blake2b-128 over every leaf of `params` in path order: its path and the
    `checkpoint.array_digest` of its array (of each array of a quantized format)."""
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in sorted(tree.flatten(params)[0], key=lambda item: item[0]):
        arrays = leaf.arrays() if tree.is_format(leaf) else {"": leaf}
        for name in sorted(arrays):
            digest.update(f"{path}/{name}={checkpoint.array_digest(arrays[name])};".encode())
    return digest.hexdigest()


def fingerprint(cal: Any, assignments: dict[str, Any], params: Any) -> dict[str, str]:
    """{what: sha256 hex} of everything a run's results depend on, `params` being its float weights."""
    methods = QuantConfig(rules=tuple(Rule(f"^{path}$", m) for path, m in sorted(assignments.items()))).to_dict()
    tokens = np.ascontiguousarray(cal.tokens, np.int32)
    parts = {"tokens": [list(tokens.shape), hashlib.sha256(tokens.tobytes()).hexdigest()],
             "model weights": weights_digest(params), "model config": cal.config.to_dict(), "methods": methods,
             "propagation": cal.propagate, "step size": cal.step_samples,
             "checkpoint format": checkpoint.CHECKPOINT_VERSION}
    return {what: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
            for what, value in parts.items()}


def _differences(found: Any, expected: dict[str, str]) -> list[str]:
    """What differs between a stored fingerprint and this run's (one written by an older jaxq
    is a single hash, not a dict)."""
    if not isinstance(found, dict):
        return ["jaxq version"]
    return [what for what in expected if found.get(what) != expected[what]]


@dataclasses.dataclass(frozen=True)
class Progress:
    directory: Path

    @classmethod
    def open(cls, cal: Any, assignments: dict[str, Any], params: Any) -> Progress:
        """The progress in `cal.resume_dir`, refused unless it is of this very run (`params`:
        the float weights being calibrated); a new directory gets this run's fingerprint."""
        directory = Path(cal.resume_dir).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / checkpoint.RESUME_MARKER
        expected = fingerprint(cal, assignments, params)
        if marker.is_file():
            try:
                recorded = json.loads(marker.read_text()).get("fingerprint")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise ResumeMismatchError(f"{marker} is damaged (not the JSON record jaxq writes); delete "
                                          f"{directory} to start this run over") from None
            differ = _differences(recorded, expected)
            if differ:
                raise ResumeMismatchError(
                    f"{directory} holds progress of a different calibration run (different {', '.join(differ)}): "
                    "resuming would put that run's blocks into this one. Use another resume directory, or delete "
                    f"{directory} to start this run over")
        elif distributed.is_primary():  # one writer over several processes; the others wait for it below
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": expected}))
            os.replace(tmp, marker)
        distributed.barrier(f"jaxq resume marker {directory}")
        return cls(directory)

    def restore(self, mesh: Mesh) -> tuple[int, dict[str, jax.Array] | None, dict[int, Any]]:
        """(first block still to do, its input activations by stream name or None, {block:
        quantized params})."""
        try:
            start, streams, blocks = _read(self.directory)
        except checkpoint.CheckpointError as err:
            raise type(err)(f"{err}. This is calibration resume progress: delete {self.directory} to "
                            "start the run over") from None
        if streams is not None:
            sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
            streams = {name: distributed.put(h, sharding) for name, h in streams.items()}
        return start, streams, blocks

    def save(self, block_index: int, block: Any, streams: dict[str, jax.Array]) -> None:
        """Block `block_index` done: its quantized params and the next block's inputs by stream."""
        info = {"block": block_index}
        checkpoint.write_tree(self.directory / "blocks", {"block": block}, info, step=block_index, max_to_keep=None)
        checkpoint.write_tree(self.directory / "activations", streams, info, step=block_index, max_to_keep=1)


def _read(directory: Path) -> tuple[int, dict[str, jax.Array] | None, dict[int, Any]]:
    """The saved progress: (blocks done, activations after the last {stream: [samples, T, D]} or
    None, {block: quantized params}); nothing saved yet is (0, None, {})."""
    try:
        metadata = checkpoint.read_metadata(directory / "activations")
    except checkpoint.NoCheckpointError:
        return 0, None, {}
    last = metadata["block"]
    streams = checkpoint.read_tree(directory / "activations", metadata)
    blocks = {}
    for i in range(last + 1):
        step_metadata = checkpoint.read_metadata(directory / "blocks", step=i)
        blocks[i] = checkpoint.read_tree(directory / "blocks", step_metadata, step=i)["block"]
    return last + 1, streams, blocks
