"""GPTQ wall time: one 4096x4096 layer with H given, and a whole model's calibrated run.

    python scripts/bench_gptq.py [--layer-runs 5] [--model smollm2-135m --model-runs 1]

Layer: median of --layer-runs timed runs after one warm-up (compilation excluded). Model: the
whole `jaxq.quantize` with quick calibration (32 x 512 tokens), compilation included, as a
user experiences it; median of --model-runs (each takes minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxq
import models
from jaxq import calibrate
from jaxq.config import GPTQConfig, UniformConfig
from jaxq.methods import gptq


def layer_seconds(size: int, runs: int, cfg: GPTQConfig) -> list[float]:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(size, 64))
    hessian = jnp.asarray(u @ u.T + np.diag(rng.uniform(0.1, 3, size)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
    jax.block_until_ready(gptq.quantize_weight(w, hessian, cfg).codes)  # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(gptq.quantize_weight(w, hessian, cfg).codes)
        times.append(time.perf_counter() - start)
    return times


def model_seconds(name: str, runs: int, cfg: GPTQConfig) -> list[float]:
    lm = models.load(name)
    calib = calibrate.from_text(lm, samples=32, length=512, progress=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(jaxq.quantize(lm.params, cfg, calib))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--layer-runs", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-runs", type=int, default=1, help="0 skips the whole-model run")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    cfg = GPTQConfig(uniform=UniformConfig(bits=args.bits, group_size=128))
    layer = layer_seconds(args.size, args.layer_runs, cfg)
    record = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": cfg.describe(),
              "layer": {"shape": [args.size, args.size], "runs": layer, "median_seconds": statistics.median(layer)}}
    print(f"GPTQ {args.size}x{args.size} layer: median {statistics.median(layer):.2f}s over {len(layer)} runs", flush=True)
    if args.model_runs:
        whole = model_seconds(args.model, args.model_runs, cfg)
        record["model"] = {"name": args.model, "calibration": "32 x 512 tokens", "runs": whole,
                           "median_seconds": statistics.median(whole)}
        print(f"GPTQ {args.model} (quick calibration): median {statistics.median(whole):.1f}s over {len(whole)} runs")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
