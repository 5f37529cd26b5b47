"""Per-block progress of a calibration run, so an interrupted run continues where it stopped.

resume_dir/
  run.json       fingerprint of the run (tokens, model config, methods, propagation, step size)
  blocks/        one checkpoint step per finished block: its quantized params
  activations/   the inputs of the next block (only the newest is kept)
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

from jaxq import checkpoint
from jaxq.config import QuantConfig, Rule


class ResumeMismatchError(ValueError):
    """The resume directory belongs to a different calibration run."""


def fingerprint(cal: Any, assignments: dict[str, Any]) -> str:
    methods = QuantConfig(rules=tuple(Rule(f"^{path}$", m) for path, m in sorted(assignments.items()))).to_dict()
    record = {"tokens": hashlib.sha256(np.ascontiguousarray(cal.tokens, np.int32).tobytes()).hexdigest(),
              "tokens_shape": list(np.shape(cal.tokens)), "model_config": cal.config.to_dict(),
              "methods": methods, "propagate": cal.propagate, "step_samples": cal.step_samples}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Progress:
    directory: Path

    @classmethod
    def open(cls, cal: Any, assignments: dict[str, Any]) -> Progress:
        directory = Path(cal.resume_dir).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / "run.json"
        expected = fingerprint(cal, assignments)
        if marker.is_file():
            found = json.loads(marker.read_text()).get("fingerprint")
            if found != expected:
                raise ResumeMismatchError(
                    f"{directory} holds progress of a different calibration run (other tokens, model, "
                    "methods or step size); use an empty directory or the original settings")
        else:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": expected}))
            os.replace(tmp, marker)
        return cls(directory)

    def restore(self, mesh: Mesh) -> tuple[int, jax.Array | None, dict[int, Any]]:
        """(first block still to do, its input activations or None, {block: quantized params})."""
        try:
            metadata = checkpoint.read_metadata(self.directory / "activations")
        except checkpoint.CheckpointError:
            return 0, None, {}
        last = metadata["block"]
        h = checkpoint.read_tree(self.directory / "activations", metadata)["h"]
        blocks = {}
        for i in range(last + 1):
            step_metadata = checkpoint.read_metadata(self.directory / "blocks", step=i)
            blocks[i] = checkpoint.read_tree(self.directory / "blocks", step_metadata, step=i)["block"]
        return last + 1, jax.device_put(h, NamedSharding(mesh, P(mesh.axis_names[0]))), blocks

    def save(self, block_index: int, block: Any, h: jax.Array) -> None:
        info = {"block": block_index}
        checkpoint.write_tree(self.directory / "blocks", {"block": block}, info, step=block_index, max_to_keep=None)
        checkpoint.write_tree(self.directory / "activations", {"h": h}, info, step=block_index, max_to_keep=1)
