"""Quantize a model in several ways and measure perplexity (quick protocol by default); one
JSON line per variant with the quantization wall time.

    python scripts/ppl_table.py [--model smollm2-135m] [--only "gptq w3 g128" ...] > table.jsonl

Data-aware variants calibrate on the quick protocol's 32 windows of 512 tokens (--calib-samples).
AWQ runs llm-awq's recipe (module-output scale search on every calibration window, float
propagation); the `fast` variants are the former linear-output search on 4096 tokens.
`--data wikitext2-valid` evaluates on held-out validation text instead of the test text, for
choosing settings (e.g. the L_p norm of MSE range search, default L_4: the `mse` variants)
without looking at the test set.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax

import jaxq
import models
from jaxq import calibrate, evaluate, mixed_precision

U = jaxq.UniformConfig
G = jaxq.config.GPTQConfig
A = jaxq.config.AWQConfig
W4, W3 = U(bits=4, group_size=128), U(bits=3, group_size=128)
QUAROT_W4 = U(bits=4, granularity="channel", symmetric=True, calibration="mse", mse_norm=2.4)
PRUNE_TARGETS = (("50%", 0.5), ("2:4", (2, 4)))


def mixed_at_uniform_bytes(method: Any, sensitivity: str = "fisher"
                           ) -> Callable[[models.LanguageModel, calibrate.Calibration], jaxq.QuantConfig]:
    """A variant built from the model: `method`'s layers at bits from {2, 3, 4, 8} allocated by
    `sensitivity` (`jaxq.mixed_precision`: Fisher or measured KL) within the bytes of `method` itself (its
    uniform bits everywhere, as `size_report` counts them; GPTQ act-order's permutation, the same
    4 bytes per input row either way, comes on top of both)."""
    def build(lm, calib):
        uniform = jaxq.size_report(jaxq.quantize(lm.params, mixed_precision.proxy_method(method)))
        budget = 8 * uniform.quantized_bytes / sum(math.prod(w.shape) for w in uniform.quantized)
        return mixed_precision.mixed_precision_config(lm, method, calib, budget, sensitivity=sensitivity)[0]
    return build
PRUNING = {  # method name -> (grid, pruning target) -> config
    "magnitude": lambda u, prune: jaxq.MagnitudeConfig(uniform=u, prune=prune),
    "wanda": lambda u, prune: jaxq.WandaConfig(uniform=u, prune=prune),
    "sparsegpt": lambda u, prune: jaxq.SparseGPTConfig(gptq=G(uniform=u), prune=prune),
    "obr-rtn": lambda u, prune: jaxq.OBRConfig(gptq=G(uniform=u), prune=prune, rounding="rtn"),
    "obr-gptq": lambda u, prune: jaxq.OBRConfig(gptq=G(uniform=u), prune=prune),
}
VARIANTS = {
    "fp": None,
    "w4 g32 float-offset minmax": U(bits=4, group_size=32, zero_point="float"),
    "w4 g32 int-zero minmax": U(bits=4, group_size=32),
    "w4 g128 int-zero minmax": U(bits=4, group_size=128),
    "w4 g128 float-offset minmax": U(bits=4, group_size=128, zero_point="float"),
    "w4 g128 sym minmax": U(bits=4, group_size=128, symmetric=True),
    "w4 g128 int-zero mse": U(bits=4, group_size=128, calibration="mse"),
    "w4 per-channel int-zero minmax": U(bits=4, granularity="channel"),
    "w3 g128 int-zero minmax": U(bits=3, group_size=128),
    "w3 g128 int-zero mse": U(bits=3, group_size=128, calibration="mse"),
    **{f"w{b} g128 int-zero mse L{p}": U(bits=b, group_size=128, calibration="mse", mse_norm=p)
       for b in (3, 4) for p in (2.0, 2.4, 3.0, 6.0, 8.0)},
    "w2 g64 int-zero mse L2.4": U(bits=2, group_size=64, calibration="mse", mse_norm=2.4),
    "w3 g128 int-zero percentile99.9": U(bits=3, group_size=128, calibration="percentile"),
    "w2 g64 int-zero minmax": U(bits=2, group_size=64),
    "w2 g64 int-zero mse": U(bits=2, group_size=64, calibration="mse"),
    "gptq w4 g128": G(uniform=W4),
    "gptq w4 g128 act-order": G(uniform=W4, act_order=True),
    "awq w4 g128": A(uniform=W4),
    "gptq w3 g128": G(uniform=W3),
    "gptq w3 g128 act-order": G(uniform=W3, act_order=True),
    "awq w3 g128": A(uniform=W3),
    **{f"awq w{b} g128 fast": A(uniform=u, search_scope="linear", search_positions=128, propagate="quantized")
       for b, u in ((4, W4), (3, W3))},
    **{f"bcq w{b} {grain} {algorithm}": jaxq.BCQConfig(bits=b, algorithm=algorithm, **settings)
       for b in (4, 3, 2)
       for grain, settings in (("per-channel", {}), ("g64", dict(granularity="group", group_size=64)))
       for algorithm in ("greedy", "alternating")},
    **{f"rtn w{b} {grain} float-offset minmax": U(bits=b, zero_point="float", **settings)
       for b in (4, 3, 2) for grain, settings in (("per-channel", dict(granularity="channel")), ("g64", dict(group_size=64)))},
    **{f"gptq w{b} {grain} act-order": G(uniform=U(bits=b, **settings), act_order=True)
       for b in (4, 3, 2) for grain, settings in (("per-channel", dict(granularity="channel")), ("g64", dict(group_size=64)))},
    **{f"awq w{b} {grain}": A(uniform=U(bits=b, **settings))
       for b in (4, 3, 2) for grain, settings in (("per-channel", dict(granularity="channel")), ("g64", dict(group_size=64)))},
    **{f"flexround w{b} {grain}": jaxq.FlexRoundConfig(uniform=U(bits=b, zero_point="float", **settings))
       for b in (4, 3, 2) for grain, settings in (("per-channel", dict(granularity="channel")), ("g64", dict(group_size=64)))},
    **{f"uniquanf w{b} {grain}": jaxq.UniQuanFConfig(bits=b, **settings)
       for b in (4, 3, 2) for grain, settings in (("per-channel", {}), ("g64", dict(granularity="group", group_size=64)))},
    # QuIP's table (issue 16): RTN and GPTQ on one per-channel grid; LDLQ (= GPTQ) on QuIP's 2.4 RMS
    # per-matrix grid without incoherence processing; QuIP with either rotation (+ per-channel grid)
    **{f"rtn w{b} per-channel int-zero minmax": U(bits=b, granularity="channel") for b in (3, 2)},
    **{f"gptq w{b} per-channel": G(uniform=U(bits=b, granularity="channel")) for b in (3, 2)},
    **{f"ldlq w{b} no-incoherence": jaxq.QuIPConfig(bits=b, transform="none", rescale=False) for b in (3, 2)},
    **{f"quip w{b} {transform}": jaxq.QuIPConfig(bits=b, transform=transform)
       for b in (3, 2) for transform in ("hadamard", "kronecker")},
    **{f"quip w{b} hadamard channel-grid": jaxq.QuIPConfig(bits=b, grid="channel") for b in (3, 2)},
    **{f"squeezellm w{b} {variant}": jaxq.SqueezeLLMConfig(bits=b, **settings)
       for b in (3, 4) for variant, settings in (("unweighted", dict(weighted=False)), ("weighted", {}),
                                                 ("weighted sparse0.45", dict(sparsity=0.0045)))},
    # 3.24 bits per weight on smollm2-135m: fewer than GPTQ act-order g128's 3.25 (0.45% sparse costs 3.36)
    "squeezellm w3 weighted sparse0.1": jaxq.SqueezeLLMConfig(bits=3, sparsity=0.001),
    # QuaRot's table (issue 17): 16-bit weights (every block linear kept float), or QuaRot's per-channel
    # symmetric weights with the L_2.4 clip search, RTN or GPTQ; 4-bit activations (clip 0.9) and KV
    # cache (clip 0.95); each unrotated and with the random Hadamard rotation
    **{f"w{w}a{a}kv{k}{' ' + name if name else ''}{' rotated' if rotate != 'none' else ''}": jaxq.QuantConfig(
        rules=(jaxq.Rule(jaxq.config.DEFAULT_PATTERN, method),), rotate=rotate,
        activations=jaxq.ActivationConfig(bits=a) if a < 16 else None,
        kv_cache=jaxq.KVCacheConfig(bits=k) if k < 16 else None)
       for w, a, k, name, method in ((16, 16, 16, "", None), (16, 16, 4, "", None), (16, 4, 16, "", None),
                                     (4, 4, 4, "rtn", QUAROT_W4), (4, 4, 4, "gptq", G(uniform=QUAROT_W4)))
       for rotate in ("none", "hadamard") if (w, a, k, rotate) != (16, 16, 16, "none")},
    # OBR's tables (issue 18), 50% unstructured or 2:4: weight-only W4 g128, and rotated W4A4KV4 on QuaRot's grid
    **{f"w4 g128 {target} {method}": make(W4, prune) for target, prune in PRUNE_TARGETS
       for method, make in PRUNING.items()},
    **{f"w4a4kv4 {target} {method} rotated": jaxq.QuantConfig(
        rules=(jaxq.Rule(jaxq.config.DEFAULT_PATTERN, PRUNING[method](QUAROT_W4, prune)),), rotate="hadamard",
        activations=jaxq.ActivationConfig(bits=4), kv_cache=jaxq.KVCacheConfig(bits=4))
       for target, prune in PRUNE_TARGETS for method in ("wanda", "sparsegpt", "obr-gptq")},
    # the survey's mixed precision (issue 19): bits per layer at the bytes of the uniform 3-bit g128 rows
    "rtn w3 g128 mixed": mixed_at_uniform_bytes(W3),
    "gptq w3 g128 act-order mixed": mixed_at_uniform_bytes(G(uniform=W3, act_order=True)),
    "rtn w3 g128 mixed kl": mixed_at_uniform_bytes(W3, "kl"),
    "gptq w3 g128 act-order mixed kl": mixed_at_uniform_bytes(G(uniform=W3, act_order=True), "kl"),
    # the survey's static activation ranges against dynamic per-token ones, 8-bit inputs of the rotated model
    **{f"w16a8kv16 {calibration} rotated": jaxq.QuantConfig(
        rules=(jaxq.Rule(jaxq.config.DEFAULT_PATTERN, None),), rotate="hadamard",
        activations=jaxq.ActivationConfig(bits=8, calibration=calibration))
       for calibration in ("dynamic", "minmax", "percentile", "kl")},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--data", default="wikitext2", help="wikitext2 (test), wikitext2-valid or a text file")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)  # absl has a root handler: replace it
    lm = models.load(args.model)
    calib = calibrate.from_text(lm, samples=args.calib_samples, length=args.calib_len, progress=False)
    for name, cfg in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        built = callable(cfg)
        cfg = cfg(lm, calib) if built else cfg
        cfg = None if cfg is None else jaxq.quantization.as_quant_config(cfg)
        data_aware = cfg is not None and (built or jaxq.quantization.needs_calibration(cfg))
        quantized = lm if cfg is None else jaxq.quantize_model(lm, cfg, calib if data_aware else None)
        params = jax.block_until_ready(quantized.params)
        quantize_s = time.perf_counter() - start
        try:
            report = evaluate.perplexity_report(quantized, params, args.data, ctx=args.ctx, windows=args.windows,
                                                progress=False)
        except evaluate.EvaluationError as err:  # e.g. an unrotated W4A4 model overflowing: a row all the same
            print(json.dumps({"variant": name, "data": args.data, "ppl": None, "error": str(err),
                              "quantize_seconds": quantize_s}), flush=True)
            continue
        sizes = jaxq.size_report(params)
        print(json.dumps({"variant": name, "data": args.data, "ppl": report.ppl, "quantize_seconds": quantize_s,
                          "calibration_samples": args.calib_samples if data_aware else 0,
                          "eval_seconds": report.seconds, "windows": report.windows, "ctx": report.ctx,
                          "quantized_bytes": sizes.quantized_bytes,
                          "quantized_bf16_bytes": sizes.quantized_bf16_bytes}), flush=True)


if __name__ == "__main__":
    main()
