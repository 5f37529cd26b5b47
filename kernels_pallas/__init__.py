"""Pallas kernels for packed low-bit matmuls (TPU: Mosaic; GPU: Triton) and their dispatch.

    y = kernels_pallas.matmul(x, w)   # w a jaxq format; what jaxq.ops.qdot calls

The kernel runs on TPU/GPU for every shape its tiling covers (every linear of the supported
models) up to KERNEL_MAX_ROWS activation rows; above that (prefill, evaluation), on CPU, and
for a shape no tiling serves, the format's own XLA path does. The mode is read when a function is
traced: `JAXQ_KERNELS=xla` (or `use_kernels("xla")`) forces the XLA path; "interpret-tpu" /
"interpret-gpu" run that backend's kernel in Pallas interpret mode on any machine (tests).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import jax

from jaxq.formats.codebook import CodebookQ
from jaxq.formats.rotated import Rotated
from jaxq.formats.sparse import DenseSparse
from jaxq.formats.uniform import UniformQ
from kernels_pallas import lut_matmul as lut_matmul_module
from kernels_pallas import uniform_matmul as uniform_matmul_module

uniform_matmul = uniform_matmul_module.uniform_matmul
lut_matmul = lut_matmul_module.lut_matmul

MODE_ENV = "JAXQ_KERNELS"
MODES = ("auto", "xla", "interpret-tpu", "interpret-gpu")
KERNELS = {UniformQ: uniform_matmul, CodebookQ: lut_matmul}
# Above this many rows a kernel family yields to the XLA path (dequantize once + a bf16 dot): the
# kernel dequantizes each weight once per M tile. Estimates (results/kernel_notes.md, "M
# crossover"), not measured: GPU, per weight the kernel spends ~4.5 ALU ops per 128-row M tile
# beside its MMA at an assumed ~40-60% of the bf16 peak, XLA a one-time 4.5 B of traffic and a
# dot at ~70% of peak: crossover ~400-800 rows. TPU: VPU work overlaps the MXU in the same
# bundles, so the kernel stays ahead far longer; 2048 bounds the re-dequantization at 8 M tiles.
KERNEL_MAX_ROWS = {"gpu": 512, "tpu": 2048}
_override: str | None = None


def kernel_mode() -> str:
    mode = _override or os.environ.get(MODE_ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}; expected one of {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Temporarily set the mode. The mode is read while tracing and jit shares traces between
    wrappers of one function, so JAX's caches are cleared on entry and exit: everything traced
    inside the block uses `mode`, everything after it the previous mode."""
    global _override
    previous, _override = _override, mode
    try:
        kernel_mode()
        jax.clear_caches()
        yield
    finally:
        _override = previous
        jax.clear_caches()


def backend_kernel(platform: str) -> str | None:
    """Which kernel family serves a JAX platform: 'tpu', 'gpu' or None."""
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform)


def matmul(x: jax.Array, w, *, backend: str | None = None) -> jax.Array:
    """x [..., in] @ w for a jaxq format -> [..., out] in x.dtype. A Rotated weight's transforms run
    around its inner format's matmul, which takes the kernel where one serves it."""
    if isinstance(w, Rotated):
        return w.rotate_output(matmul(w.rotate_input(x), w.inner, backend=backend))
    if isinstance(w, DenseSparse):  # the dense part likewise, the sparse product by XLA
        return w.add_sparse(x, matmul(x, w.dense, backend=backend))
    mode = kernel_mode()
    kernel = KERNELS.get(type(w))
    if mode == "xla" or kernel is None:
        return w.matmul(x)
    interpret = mode.startswith("interpret-")
    family = mode.split("-", 1)[1] if interpret else backend_kernel(backend or jax.default_backend())
    if family is None or math.prod(x.shape[:-1]) > KERNEL_MAX_ROWS[family]:
        return w.matmul(x)
    y = kernel(x, w, backend=family, interpret=interpret)
    return w.matmul(x) if y is None else y


__all__ = ["KERNELS", "KERNEL_MAX_ROWS", "MODES", "MODE_ENV", "kernel_mode", "lut_matmul", "matmul", "uniform_matmul",
           "use_kernels"]
