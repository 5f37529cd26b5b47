"""Perplexity of a model in jaxq and in transformers' PyTorch implementation, same windows.

    python scripts/compare_transformers.py [--model smollm2-135m] [--ctx 512 --windows 64]

The transformers side loads the GGUF with transformers' own loader (needs torch + accelerate),
so dequantization, q/k un-permutation and the model code are all checked independently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def transformers_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    from models import zoo

    if name in zoo.ZOO or name.endswith(".gguf"):
        path = zoo.resolve(name) if name in zoo.ZOO else Path(name)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def transformers_perplexity(model, tokens: np.ndarray) -> float:
    """exp(mean NLL) of int [windows, ctx] under a transformers causal LM, NLL in float64."""
    import torch

    total = 0.0
    with torch.no_grad():
        for window in tokens:
            ids = torch.tensor(window[None], dtype=torch.long)
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            total += -logp.gather(-1, ids[0, 1:, None]).sum().item()
    return math.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1)))


def main() -> None:
    import models
    from jaxq import data, evaluate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args()

    lm = models.load(args.model)
    start = time.perf_counter()
    ours = evaluate.perplexity(lm, lm.params, ctx=args.ctx, windows=args.windows)
    ours_s = time.perf_counter() - start
    tokens = data.eval_windows(lm.encode(data.load_text(data.EVAL_SOURCE)), args.ctx, args.windows)
    start = time.perf_counter()
    theirs = transformers_perplexity(transformers_model(args.model), tokens)
    theirs_s = time.perf_counter() - start
    print(json.dumps({"model": args.model, "ctx": args.ctx, "windows": args.windows,
                      "jaxq_ppl": ours, "transformers_ppl": theirs,
                      "relative_difference": ours / theirs - 1,
                      "jaxq_seconds": ours_s, "transformers_seconds": theirs_s}))


if __name__ == "__main__":
    main()
