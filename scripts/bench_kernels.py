"""Packed low-bit matmuls against the bf16 dot and XLA's own int4 path; prints a table and
writes JSON (device, versions, every measurement).

    python scripts/bench_kernels.py [--out results/bench_kernels.json] [--quick]

Protocol (PROTOCOL.md, MET: device code): weights are jit arguments (never constants XLA could
fold), each measurement runs `--calls` calls inside one jit (`lax.fori_loop`, every call fed
by the previous result so XLA can neither hoist nor overlap them) after a warm-up, and the
reported time per call is the median of `--repeats` (>= 5) measurements. Default shapes are
larger than an H100's L2 (50 MB), plus smollm2's gate/up shape. Each row says which path ran:
the Pallas kernel, or the format's XLA path (always on CPU; above KERNEL_MAX_ROWS; where no
tiling serves the shape). "(kernel, any M)" rows run the kernel past KERNEL_MAX_ROWS and
"(xla path)" rows the XLA form XLA_MATMUL_FORMS picks: together they place the M crossover
and check the fallback table's estimates (results/kernel_notes.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

import kernels_pallas
from jaxq.formats import CodebookQ, UniformQ

ROWS = (1, 16, 64, 256, 512, 1024, 2048)  # up to the prefill sizes that place KERNEL_MAX_ROWS
SHAPES = ((576, 1536), (4096, 11008), (11008, 4096), (16384, 16384))
QUICK_ROWS, QUICK_SHAPES = (1, 16), ((512, 1024),)
FORMATS = {  # name -> (bits, group size (None: per-channel), lookup table?)
    "w4 g128": (4, 128, False),
    "w4 per-channel": (4, None, False),
    "w2 g64": (2, 64, False),
    "w3 g128 lut": (3, 128, True),
}


def random_format(key: jax.Array, k: int, n: int, bits: int, group: int, lut: bool):
    """Random codes and scales (speed does not depend on values), built on the device."""
    k1, k2, k3 = jax.random.split(key, 3)
    group = group or k
    groups = -(-k // group)
    codes = jax.random.randint(k1, (k, n), 0, 2 ** bits, dtype=jnp.int32).astype(jnp.uint8)
    scale = jax.random.uniform(k2, (groups, n), jnp.float32, 1e-3, 1e-2).astype(jnp.float16)
    zero = jax.random.randint(k3, (groups, n), 0, 2 ** bits, dtype=jnp.int32).astype(jnp.uint8)
    w = UniformQ.from_codes(codes, scale, zero, bits=bits, group_size=group, dtype="bfloat16", zero_point="int")
    return CodebookQ.from_uniform(w) if lut else w


def chained(matmul: Callable, calls: int) -> Callable:
    """jit(x, *weights) running `calls` dependent matmuls; returns a scalar to block on."""
    def run(x, *weights):
        def body(_, carry):
            x, acc = carry
            y = matmul(x, *weights)
            acc = acc + y[0, 0].astype(jnp.float32)
            return x + (acc * 1e-30).astype(x.dtype), acc  # a real dependency, numerically nothing
        return jax.lax.fori_loop(0, calls, body, (x, jnp.zeros((), jnp.float32)))[1]
    return jax.jit(run)


def time_per_call(matmul: Callable, x: jax.Array, weights: tuple, calls: int, repeats: int) -> float:
    fn = chained(matmul, calls)
    jax.block_until_ready(fn(x, *weights))  # compile and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x, *weights))
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def kernel_family() -> str | None:
    return kernels_pallas.backend_kernel(jax.default_backend())


def kernel_serves(w, x: jax.Array) -> bool:
    """Whether this machine has a kernel that tiles w for x's rows."""
    family = kernel_family()
    return family is not None and kernels_pallas.KERNELS[type(w)](x, w, backend=family) is not None


def kernel_ran(w, x: jax.Array) -> bool:
    """Whether kernels_pallas.matmul runs the kernel for x (not the XLA path)."""
    family = kernel_family()
    return kernel_serves(w, x) and x.shape[0] <= kernels_pallas.KERNEL_MAX_ROWS[family]


def kernel_at_any_rows(x: jax.Array, w) -> jax.Array:
    """The format's kernel regardless of KERNEL_MAX_ROWS (to place the M crossover); on a
    machine without a kernel family, the XLA path."""
    family = kernel_family()
    y = None if family is None else kernels_pallas.KERNELS[type(w)](x, w, backend=family)
    return w.matmul(x) if y is None else y


def paths(k: int, n: int, key: jax.Array) -> dict[str, tuple[Callable, tuple, Callable[[jax.Array], str]]]:
    """name -> (matmul(x, *weights), weights, which-path label)."""
    w_bf16 = jax.random.normal(key, (k, n), jnp.bfloat16)
    w_int4 = jax.random.randint(key, (k, n), -8, 8, dtype=jnp.int32).astype(jnp.int4)
    scale = jax.random.uniform(key, (n,), jnp.float32, 1e-3, 1e-2).astype(jnp.bfloat16)
    out = {
        "bf16 dot": (lambda x, w: x @ w, (w_bf16,), lambda x: "xla"),
        "xla int4 per-channel": (lambda x, w, s: (x @ w.astype(x.dtype)) * s, (w_int4, scale), lambda x: "xla"),
    }
    for name, (bits, group, lut) in FORMATS.items():
        w = random_format(key, k, n, bits, group, lut)
        out[f"jaxq {name}"] = (lambda x, w: kernels_pallas.matmul(x, w), (w,),
                               lambda x, w=w: "kernel" if kernel_ran(w, x) else "xla")
        out[f"jaxq {name} (xla path)"] = (lambda x, w: w.matmul(x), (w,), lambda x: "xla")
        out[f"jaxq {name} (kernel, any M)"] = (kernel_at_any_rows, (w,),
                                              lambda x, w=w: "kernel" if kernel_serves(w, x) else "xla")
    return out


def write_record(path: str, record: dict) -> None:
    """Write a benchmark's JSON record (creating its directory) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_kernels.json")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few calls (a smoke test of the harness)")
    args = parser.parse_args()
    if args.repeats < 5 and not args.quick:
        parser.error("--repeats must be at least 5 (median of >= 5 measurements)")
    rows, shapes = (QUICK_ROWS, QUICK_SHAPES) if args.quick else (ROWS, SHAPES)
    device = jax.devices()[0]
    results = []
    for k, n in shapes:
        key = jax.random.key(k * 31 + n)
        candidates = paths(k, n, key)
        for m in rows:
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            base = None
            for name, (matmul, weights, which) in candidates.items():
                seconds = time_per_call(matmul, x, weights, args.calls, args.repeats)
                base = seconds if name == "bf16 dot" else base
                row = {"M": m, "K": k, "N": n, "path": name, "ran": which(x), "us_per_call": seconds * 1e6,
                       "speedup_vs_bf16": base / seconds}
                results.append(row)
                print(f"M={m:<4} K={k:<6} N={n:<6} {name:<30} {row['ran']:<7} {row['us_per_call']:10.1f} us "
                      f"{row['speedup_vs_bf16']:6.2f}x", flush=True)
    record = {"device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
              "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
              "python": platform.python_version(), "calls_per_measurement": args.calls, "repeats": args.repeats,
              "statistic": "median", "results": results}
    write_record(args.out, record)


if __name__ == "__main__":
    main()
