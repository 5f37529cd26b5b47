"""The cost of QuIP's online transforms: the Rotated matmul against the plain one of its inner
format, on smollm2-135m's linear shapes; prints a table and writes JSON.

    python scripts/bench_rotated.py [--out results/bench_rotated.json] [--quick]

Per (K, N), rows M and rotation kind: one random 2-bit UniformQ in the layout `jaxq.methods.quip`
stores (one scale and one float offset per matrix; speed does not depend on values) timed as
`kernels_pallas.matmul(x, inner)` ("plain") and as `kernels_pallas.matmul(x, Rotated(inner, U_in,
U_out, 1/d))`, the path a quantized model's linears take: the inner matmul runs the Pallas kernel
where one serves the shape (GPU/TPU), else the XLA path (CPU). Reported: time per call of both,
their ratio, the transforms' overhead per activation row (token), and the timed Rotated matmul's
largest error against x @ its dense weight (relative to max |x @ W|: what was timed computes the
right thing).
Protocol: bench_kernels' (`time_per_call`: `--calls` dependent calls in one jit, the median of
`--repeats` >= 5 measurements), activations in bfloat16.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

import kernels_pallas
from jaxq.formats import Rotated, UniformQ, rotation

from bench_kernels import time_per_call, write_record  # a sibling script (scripts/ is on sys.path)

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # q/o, k/v, gate/up, down
ROWS = (1, 16, 512)  # decode, a small batch, a prefill window
KINDS = ("hadamard", "kronecker")
QUICK_SHAPES, QUICK_ROWS = ((64, 48),), (1, 4)


BITS = 2


def quip_inner(key: jax.Array, k: int, n: int) -> UniformQ:
    """Random codes on one per-matrix grid with a float offset, as QuIP stores (float16 scale and
    offset, bfloat16 weight), built on the device."""
    codes = jax.random.randint(key, (k, n), 0, 2 ** BITS, dtype=jnp.int32).astype(jnp.uint8)
    s = 0.05
    scale = jnp.full((1, 1), 2 * s / (2 ** BITS - 1), jnp.float16)
    offset = jnp.full((1, 1), -s, jnp.float16)
    return UniformQ.from_codes(codes, scale, offset, bits=BITS, group_size=k, dtype="bfloat16", zero_point="float")


def relative_error(w: Rotated, x: jax.Array) -> float:
    """max |matmul(x, w) - x @ W| / max |x @ W|, W its dense weight, in float32."""
    y = jax.jit(kernels_pallas.matmul)(x, w).astype(jnp.float32)
    expected = x.astype(jnp.float32) @ jax.jit(lambda w: w.dequantize(jnp.float32))(w)
    return float(jnp.abs(y - expected).max() / jnp.abs(expected).max())


def rotated(inner, kind: str, key: jax.Array) -> Rotated:
    """inner between two `kind` rotations, with a diagonal input scale (QuIP's rescale)."""
    k, n = inner.shape
    input_scale = jax.random.uniform(key, (k,), jnp.float32, 0.5, 2.0)
    return Rotated(inner=inner, input_rotation=rotation.generate(kind, k, 1),
                   output_rotation=rotation.generate(kind, n, 2), input_scale=input_scale, shape=(k, n),
                   dtype=inner.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_rotated.json")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one tiny shape, few rows (a smoke test of the harness)")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (median of >= 5 measurements)")
    rows, shapes = (QUICK_ROWS, QUICK_SHAPES) if args.quick else (ROWS, SHAPES)
    matmul = lambda x, w: kernels_pallas.matmul(x, w)
    device = jax.devices()[0]
    results = []
    for k, n in shapes:
        key = jax.random.key(k * 31 + n)
        inner = quip_inner(key, k, n)
        for m in rows:
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            plain = time_per_call(matmul, x, (inner,), args.calls, args.repeats)
            for kind in KINDS:
                w = rotated(inner, kind, key)
                seconds = time_per_call(matmul, x, (w,), args.calls, args.repeats)
                row = {"M": m, "K": k, "N": n, "rotation": kind, "encoding": w.describe(), "plain_us": plain * 1e6,
                       "rotated_us": seconds * 1e6, "ratio": seconds / plain,
                       "overhead_us_per_row": (seconds - plain) * 1e6 / m, "max_rel_error": relative_error(w, x)}
                results.append(row)
                print(f"M={m:<4} K={k:<5} N={n:<5} {kind:<9} plain {row['plain_us']:9.1f} us  rotated "
                      f"{row['rotated_us']:9.1f} us  {row['ratio']:5.2f}x  (+{row['overhead_us_per_row']:.2f} us/row)",
                      flush=True)
    record = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "python": platform.python_version(), "calls_per_measurement": args.calls, "repeats": args.repeats,
              "statistic": "median", "inner_format": f"{inner.format_name} {inner.describe()}", "activations": "bfloat16",
              "results": results}
    write_record(args.out, record)


if __name__ == "__main__":
    main()
