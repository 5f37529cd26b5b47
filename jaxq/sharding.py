"""Lay params out over a device mesh: weights split along their output axis (formats too)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxq import distributed, tree

DATA_AXIS, MODEL_AXIS = "data", "model"


class MeshError(ValueError):
    """A device mesh that this machine cannot give."""


def make_mesh(data: int = 1, model: int = 1) -> Mesh:
    """A (data, model) mesh over the first data*model devices (of every process, in process order)."""
    devices = jax.devices()
    if data < 1 or model < 1 or data * model > len(devices):
        raise MeshError(f"a {data}x{model} mesh needs {data * model} devices, {len(devices)} available")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), (DATA_AXIS, MODEL_AXIS))


def _spec(path: str, leaf: Any, axis: str, size: int) -> Any:
    if tree.is_format(leaf):
        return leaf.partition_specs(axis) if leaf.shape[1] % size == 0 else jax.tree_util.tree_map(lambda _: P(), leaf)
    if not hasattr(leaf, "ndim"):
        return P()
    if leaf.ndim == 2 and path.endswith("embedding"):
        return P(axis, None) if leaf.shape[0] % size == 0 else P()  # vocab rows: the tied head's outputs
    if leaf.ndim == 2:
        return P(None, axis) if leaf.shape[1] % size == 0 else P()   # (in, out) kernels
    return P()


def shard_params(params: Any, mesh: Mesh, axis: str = MODEL_AXIS) -> Any:
    """Every leaf laid out with its NamedSharding (replicated where the axis does not divide), on a
    mesh of this process's devices or of several processes' (`distributed.put`)."""
    leaves, treedef = tree.flatten(params)
    size = mesh.shape[axis]
    out = []
    for path, leaf in leaves:
        structure = jax.tree_util.tree_structure(leaf)
        specs = structure.flatten_up_to(_spec(path, leaf, axis, size))  # PartitionSpecs are tuples: stop at leaf's arrays
        arrays = [distributed.put(a, NamedSharding(mesh, s)) for a, s in zip(structure.flatten_up_to(leaf), specs)]
        out.append(structure.unflatten(arrays))
    return tree.unflatten(treedef, out)


def replicate(params: Any, mesh: Mesh) -> Any:
    """Every array of `params` (formats' arrays too) replicated over `mesh`: left as it is where it
    already is, else placed (`distributed.put`: over several processes each supplies its own
    copy, where letting jit move an uncommitted array would first compare it across processes)."""
    target = NamedSharding(mesh, P())

    def place(array):
        if isinstance(array, jax.Array) and array.sharding.is_equivalent_to(target, array.ndim):
            return array
        return distributed.put(array, target)
    return jax.tree_util.tree_map(place, params)
