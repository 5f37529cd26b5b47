"""Parameter paths: one string per leaf, the same for pure dicts, Linen params and NNX State."""

from __future__ import annotations

from typing import Any

import jax

from jaxq.formats.base import QuantizedArray


def is_format(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def path_str(keypath: tuple) -> str:
    """Keys joined with '/', without a leading Linen 'params' collection or NNX's '.value'."""
    parts = jax.tree_util.keystr(keypath, simple=True, separator="/").split("/") if keypath else []
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    if parts and parts[0] == "params":
        parts.pop(0)
    return "/".join(parts)


def flatten(params: Any) -> tuple[list[tuple[str, Any]], Any]:
    """([(path, leaf)], treedef); quantized formats count as leaves."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_format)
    return [(path_str(kp), leaf) for kp, leaf in leaves], treedef


def unflatten(treedef: Any, leaves: list[Any]) -> Any:
    return jax.tree_util.tree_unflatten(treedef, leaves)
