"""Several processes (hosts) as one JAX program: joining them, and moving arrays between a
process's memory and arrays that span every process's devices.

Every process runs the same jaxq command; `jax.distributed` joins them (a coordinator address,
or the platform's own detection on Cloud TPU pods and SLURM). From then on `jax.devices()` is
every process's devices, a mesh over them is global, and an array on it holds only this
process's shards: it is built from host data with `global_array` (each process supplies the
shards its own devices hold, nothing crosses hosts) and read back with `host_array`.

A peer that dies or stops answering makes the coordination service end every other process
within the group's `peer_timeout_s` (default `HEARTBEAT_TIMEOUT_S`; XLA aborts it with "The following tasks are unhealthy (stopped
sending heartbeats): I", naming the lost process), so a pod run never hangs on a lost host; one
that never joins makes `initialize` fail after `JOIN_TIMEOUT_S`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

HEARTBEAT_TIMEOUT_S = 30   # default: a peer silent this long ends the run (jax's own default: 100)
JOIN_TIMEOUT_S = 120       # every process must have joined within this


class DistributedError(RuntimeError):
    """Processes that cannot be joined, or that disagree on what they computed."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """How this process joins the others: a coordinator address ("HOST:PORT", served by process
    0), the number of processes and this one's index; or `auto` for the platform's detection
    (`jax.distributed.initialize()` without arguments: Cloud TPU pods, SLURM, ...).
    peer_timeout_s: a process that has not been heard from for this long ends every other one."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    peer_timeout_s: int = HEARTBEAT_TIMEOUT_S

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if self.auto and any(v is not None for v in explicit):
            raise DistributedError("automatic detection takes no coordinator, process count or process id")
        if not self.auto and any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise DistributedError("several processes need all of --coordinator HOST:PORT, --num-processes N and "
                                   "--process-id I (the same coordinator and N on every process)")
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise DistributedError(f"process id {self.process_id} is not in [0, {self.num_processes})")
        if self.peer_timeout_s < 1:
            raise DistributedError(f"peer timeout {self.peer_timeout_s} s: must be at least 1 s")

    @property
    def wanted(self) -> bool:
        return self.auto or self.coordinator is not None


def initialize(group: ProcessGroup) -> None:
    """Join the processes of `group` (nothing to do for a single process). Must run before
    anything touches a JAX device."""
    if not group.wanted:
        return
    options = dict(initialization_timeout=JOIN_TIMEOUT_S, heartbeat_timeout_seconds=group.peer_timeout_s)
    try:
        if group.auto:
            jax.distributed.initialize(**options)
        else:
            jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id, **options)
    except Exception as err:  # jax raises RuntimeError/ValueError/XlaRuntimeError depending on the stage
        raise DistributedError(f"could not join the processes (coordinator {group.coordinator or 'auto-detected'}, "
                               f"{group.num_processes or '?'} processes, within {JOIN_TIMEOUT_S} s): "
                               f"{type(err).__name__}: {str(err)[:400]}") from None
    print(f"jaxq: process {jax.process_index()} of {jax.process_count()} joined, {jax.local_device_count()} local "
          f"of {jax.device_count()} devices; a peer silent for {group.peer_timeout_s} s ends the run", file=sys.stderr)


def is_primary() -> bool:
    """The process that prints results and writes files outside checkpoints (process 0)."""
    return jax.process_index() == 0


def global_array(shape: tuple[int, ...], sharding: Sharding, data: np.ndarray | Callable) -> jax.Array:
    """An array of `shape` laid out by `sharding` (over any process's devices), each process
    supplying only the shards of its own devices: from the host array `data` (the whole array,
    the same on every process), or `data(index)` -> the shard at that tuple of slices."""
    source = data if callable(data) else (lambda index: data[index])
    return jax.make_array_from_callback(tuple(shape), sharding, lambda index: np.asarray(source(index)))


def put(array: jax.Array | np.ndarray, sharding: Sharding) -> jax.Array:
    """`array` (whole, the same on every process) laid out by `sharding`: `jax.device_put` when
    this process holds every device of it, else through the host (`global_array`)."""
    if sharding.is_fully_addressable:
        return jax.device_put(array, sharding)
    return global_array(array.shape, sharding, host_array(array))


def host_array(array: jax.Array | np.ndarray) -> np.ndarray:
    """The whole of `array` in this process's memory, gathered from the other processes when
    some of its shards live only there."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable and not array.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def local_copy(tree: Any) -> Any:
    """`tree` with every array that spans several processes (replicated: each holds all of it)
    replaced by this process's own uncommitted copy, so what runs on it afterwards needs no other
    process (a computation on a multi-process array waits for every process to run it too)."""
    def local(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise DistributedError(f"a {leaf.shape} array sharded over several processes has no local copy")
            return jnp.asarray(np.asarray(leaf))
        return leaf
    return jax.tree_util.tree_map(local, tree)


def check_same_everywhere(text: str, what: str) -> None:
    """Refuse to go on unless every process holds the same `text` (a digest of what it computed)."""
    if jax.process_count() == 1:
        return
    mine = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(f"{what} differs between process 0 and process(es) {differ}: the processes did not "
                               "compute the same result (different jaxq versions or inputs on some host?)")


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (nothing for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
