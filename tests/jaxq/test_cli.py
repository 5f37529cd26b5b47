import json

import pytest

import models
from jaxq import checkpoint, cli, evaluate


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_json_matches_the_python_api(tiny_llama_with_tokenizer, capsys):
    directory, text = tiny_llama_with_tokenizer
    code, out, _ = run(capsys, "eval", "--model", directory, "--data", str(text), "--ctx", "32",
                       "--windows", "3", "--json")
    assert code == 0
    result = json.loads(out)
    lm = models.load(directory)
    expected = evaluate.perplexity(lm, lm.params, str(text), ctx=32, windows=3, progress=False)
    assert result["windows"] == 3 and result["ctx"] == 32
    assert result["ppl"] == pytest.approx(expected, rel=1e-6)


def test_quantize_inspect_eval(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    out_dir = tmp_path / "w3"
    code, out, _ = run(capsys, "quantize", "--model", directory, "--bits", "3", "--group-size", "32",
                       "--zero-point", "float", "--calibration", "mse", "--mse-norm", "3", "--keep-float", "layers/0/",
                       "--out", str(out_dir), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["quantized_weights"] == 7  # block 0 kept float
    assert summary["quant_config"]["rules"][-1]["settings"]["mse_norm"] == 3.0

    code, out, _ = run(capsys, "inspect", str(out_dir))
    assert code == 0 and "uniform w3 g32 float-offset" in out and "quantized: 7 weights" in out

    code, out, _ = run(capsys, "eval", "--checkpoint", str(out_dir), "--data", str(text), "--ctx", "32",
                       "--windows", "3", "--json")
    assert code == 0
    ck = checkpoint.load(out_dir)
    lm = ck.language_model()
    assert json.loads(out)["ppl"] == pytest.approx(
        evaluate.perplexity(lm, lm.params, str(text), ctx=32, windows=3, progress=False), rel=1e-6)
    assert lm.tokenizer is not None and lm.encode("abc") == [0, 1, 2]  # tokenizer travelled along


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/nonexistent/model"], "not a zoo name"),
    (["quantize", "--model", "/nonexistent/model", "--bits", "5", "--out", "/tmp/x"], "bits=5 is not supported"),
    (["quantize", "--model", "/nonexistent/model", "--group-size", "0", "--out", "/tmp/x"], "group_size must be"),
    (["inspect", "/nonexistent/checkpoint"], "no checkpoint at"),
])
def test_errors_are_messages_not_tracebacks(argv, message, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert f"jaxq {argv[0]}: error:" in err and message in err
