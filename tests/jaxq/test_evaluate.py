import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxq import data, evaluate
from scripts.compare_transformers import transformers_model, transformers_perplexity


class CharTokenizer:
    """Byte-level stand-in for a tokenizer (tiny models have no vocabulary files)."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture
def byte_lm():
    config = models.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=8)
    return models.LanguageModel(config, models.init_params(config, seed=0), CharTokenizer())


def test_perplexity_is_exp_mean_nll_of_predicted_positions(byte_lm):
    text = "the quick brown fox jumps over the lazy dog " * 20
    ctx, windows = 64, 5
    report = evaluate.perplexity_report(byte_lm, byte_lm.params, data.Text(text), ctx=ctx, windows=windows,
                                        batch_size=2, progress=False)  # 5 = 2 + 2 + 1 (padded)
    tokens = data.eval_windows(byte_lm.encode(text), ctx, windows)
    logits = np.asarray(byte_lm.apply(byte_lm.params, tokens), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()
    assert report.predicted_tokens == windows * (ctx - 1)
    assert report.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_text_file_and_named_source(byte_lm, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 40)
    from_file = evaluate.perplexity(byte_lm, byte_lm.params, str(path), ctx=32, windows=4, progress=False)
    from_text = evaluate.perplexity(byte_lm, byte_lm.params, data.Text("abcdefgh" * 40), ctx=32, windows=4,
                                    progress=False)
    assert from_file == from_text
    with pytest.raises(data.DataNotFoundError, match="no such file"):  # never evaluated as the text itself
        evaluate.perplexity(byte_lm, byte_lm.params, str(tmp_path / "missing.txt"), ctx=4, progress=False)


@pytest.mark.parametrize("options, message", [
    (dict(ctx=0), "ctx=0: a window needs at least 2 tokens"),
    (dict(windows=0), "windows=0: evaluate at least one window"),
    (dict(batch_size=0), "batch_size=0: must be at least 1"),
])
def test_impossible_window_settings_are_errors(byte_lm, options, message):
    with pytest.raises(evaluate.EvaluationError, match=message):
        evaluate.perplexity(byte_lm, byte_lm.params, data.Text("x" * 100), **{"ctx": 8, **options}, progress=False)


def test_non_finite_loss_names_the_broken_weight(byte_lm):
    params = jax.tree_util.tree_map(lambda x: x, byte_lm.params)
    params["norm"]["scale"] = params["norm"]["scale"].at[3].set(jnp.nan)  # a weight no method touches
    with pytest.raises(evaluate.EvaluationError, match="window 0 is not finite: the weights hold NaN/Inf at norm/scale"):
        evaluate.perplexity(byte_lm, params, data.Text("abcdefgh" * 8), ctx=16, windows=2, progress=False)


def test_greedy_generation_follows_the_argmax(byte_lm):
    prompt = "hello"
    out = np.asarray(evaluate.greedy_tokens(byte_lm.config, byte_lm.params,
                                            np.asarray([byte_lm.encode(prompt)], np.int32), 6))[0]
    seq = byte_lm.encode(prompt)
    for _ in range(6):  # the slow way: full forward each step
        seq.append(int(np.argmax(np.asarray(byte_lm.apply(byte_lm.params, np.asarray([seq])))[0, -1])))
    assert out.tolist() == seq[-6:]


@pytest.mark.slow
def test_smollm_perplexity_matches_transformers(smollm):
    """Issue 2: within 0.5% of transformers on the same GGUF (4 quick-protocol windows here;
    scripts/compare_transformers.py runs all 64)."""
    windows = 4
    ours = evaluate.perplexity(smollm, smollm.params, ctx=512, windows=windows, progress=False)
    tokens = data.eval_windows(smollm.encode(data.load_text("wikitext2")), 512, windows)
    reference = transformers_perplexity(transformers_model("smollm2-135m"), tokens)
    assert abs(ours / reference - 1) < 0.005, (ours, reference)
