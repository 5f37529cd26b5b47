import json

import pytest

import models
from jaxq import cli, evaluate


def test_eval_json_matches_the_python_api(tiny_llama, tmp_path, capsys):
    """A tiny HF model has no tokenizer files, so give it a text it can read: a GGUF-free check
    of the CLI plumbing uses the model through an HF directory plus a tokenizer saved beside it."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    _, directory = tiny_llama
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    text = tmp_path / "text.txt"
    text.write_text("thequickbrownfoxjumpsoverthelazydog" * 10)

    assert cli.main(["eval", "--model", directory, "--data", str(text), "--ctx", "32",
                     "--windows", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lm = models.load(directory)
    expected = evaluate.perplexity(lm, lm.params, str(text), ctx=32, windows=3, progress=False)
    assert result["windows"] == 3 and result["ctx"] == 32
    assert result["ppl"] == pytest.approx(expected, rel=1e-6)


def test_eval_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "jaxq eval: error:" in err and "not a zoo name" in err
