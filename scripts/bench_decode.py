"""End-to-end decode speed: a LLaMA-7B-shaped model (random weights: speed does not depend on
values) generating tokens with a KV cache, bf16 against 4-bit g128 through the kernels.

    python scripts/bench_decode.py [--out results/bench_decode.json]      # both variants
    python scripts/bench_decode.py --tiny --steps 8                        # CPU smoke test

Each (variant, batch) runs in its own process, so peak device memory is that variant's alone.
Decode time excludes the prefill: the prompt fills the cache once, then `--steps` greedy steps
run inside one jit (`lax.scan`); tokens/s = batch * steps / median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4,
            head_dim=64, max_position_embeddings=512)
VARIANTS = ("bf16", "w4g128")


def measure(variant: str, batch: int, steps: int, prompt: int, repeats: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxq
    import models
    from models.language_model import forward

    config = models.LlamaConfig(**(TINY if tiny else LLAMA_7B), dtype="bfloat16", param_dtype="bfloat16")
    params = models.init_params(config, seed=0)
    if variant == "w4g128":
        params = jax.block_until_ready(jaxq.quantize(params, jaxq.UniformConfig(bits=4, group_size=128)))
    tokens = jax.random.randint(jax.random.key(0), (batch, prompt), 0, config.vocab_size, jnp.int32)
    cache = models.KVCache.empty(config, batch, prompt + steps)
    _, cache = forward(config, params, tokens, None, cache)  # prefill, not timed

    @jax.jit
    def decode(params, token, cache):
        def step(carry, _):
            token, cache = carry
            logits, cache = forward(config, params, token, None, cache)
            return (jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), cache), None
        return jax.lax.scan(step, (token, cache), None, length=steps)[0][0]

    first = tokens[:, -1:]
    jax.block_until_ready(decode(params, first, cache))  # compile and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(decode(params, first, cache))
        samples.append(time.perf_counter() - start)
    seconds = statistics.median(samples)
    stats = jax.devices()[0].memory_stats() or {}
    return {"variant": variant, "batch": batch, "steps": steps, "prompt": prompt, "seconds": seconds,
            "tokens_per_second": batch * steps / seconds, "peak_bytes": stats.get("peak_bytes_in_use"),
            "weight_bytes": jaxq.size_report(params).total_bytes, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_decode.json")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU smoke test of the script)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps, args.prompt, args.repeats, args.tiny)))
        return
    results = []
    for batch in args.batches:
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--one", variant, str(batch), "--steps", str(args.steps),
                       "--prompt", str(args.prompt), "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{variant} batch {batch} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"batch {batch:3d} {variant:7s} {r['tokens_per_second']:10.1f} tokens/s  "
                  f"peak {(r['peak_bytes'] or 0) / 2 ** 30:6.2f} GiB", flush=True)
        bf16, w4 = results[-2:]
        print(f"batch {batch:3d} speed-up w4g128 / bf16: {w4['tokens_per_second'] / bf16['tokens_per_second']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "tiny" if args.tiny else "llama-7b-shaped", "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
