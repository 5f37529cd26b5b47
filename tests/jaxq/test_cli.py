import io
import json
import logging

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


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "x", "--data", "/nonexistent/texts.txt", "--ctx", "4"], None),
    (["eval", "--model", "/nonexistent/model", "--ctx", "0"], "ctx=0: a window needs at least 2 tokens"),
    (["eval", "--model", "/nonexistent/model", "--windows", "0"], "windows=0"),
    (["eval", "--model", "/nonexistent/model", "--batch-size", "0"], "batch_size=0"),
    (["quantize", "--model", "m", "--method", "rtn", "--act-order", "--resume", "D", "--devices", "64",
      "--out", "o"], "--act-order, --devices, --resume do not apply to --method rtn"),
    (["quantize", "--model", "m", "--method", "awq", "--damp", "0.1", "--out", "o"], "--damp does not apply"),
    (["quantize", "--model", "m", "--percentile", "99", "--out", "o"], "--percentile does not apply"),
    (["quantize", "--model", "m", "--granularity", "channel", "--group-size", "64", "--out", "o"],
     "--group-size does not apply"),
])
def test_bad_options_are_refused_before_work(tiny_llama_with_tokenizer, argv, message, capsys):
    directory, _ = tiny_llama_with_tokenizer
    argv = [directory if a in ("x", "m") else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert (message or "no such file") in err and "Traceback" not in err


def test_eval_dtype_is_checked(tiny_llama_with_tokenizer, capsys):
    directory, text = tiny_llama_with_tokenizer
    code, _, err = run(capsys, "eval", "--model", directory, "--data", str(text), "--dtype", "float8")
    assert code == 2 and "dtype='float8' is not supported" in err


def test_out_is_checked_before_quantizing(tiny_llama_with_tokenizer, tmp_path, capsys, monkeypatch):
    directory, _ = tiny_llama_with_tokenizer
    import models as models_module

    monkeypatch.setattr(models_module, "load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    for out, message in [(a_file, "is an existing file, not a checkpoint directory"), (a_file / "sub", "cannot write to"),
                         (user_dir, "non-empty directory that is not a jaxq checkpoint")]:
        code, _, err = run(capsys, "quantize", "--model", directory, "--out", str(out))
        assert code == 2 and message in err, err
    assert a_file.read_text() == "mine" and sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"]


def test_out_refuses_a_checkpoint_of_another_model(tiny_llama_with_tokenizer, tmp_path, capsys):
    import shutil

    directory, _ = tiny_llama_with_tokenizer
    other = tmp_path / "other-model"
    shutil.copytree(directory, other)
    out = tmp_path / "ck"
    assert run(capsys, "quantize", "--model", directory, "--group-size", "32", "--out", str(out), "--quiet")[0] == 0
    before = checkpoint.read_metadata(out)
    code, _, err = run(capsys, "quantize", "--model", str(other), "--group-size", "32", "--out", str(out))
    assert code == 2 and "holds a checkpoint of another model" in err and "--overwrite" in err and str(other) in err
    assert checkpoint.read_metadata(out) == before
    assert run(capsys, "quantize", "--model", directory, "--group-size", "32", "--out", str(out), "--quiet")[0] == 0
    assert run(capsys, "quantize", "--model", str(other), "--group-size", "32", "--out", str(out), "--quiet",
               "--overwrite")[0] == 0
    assert checkpoint.read_metadata(out)["source"] == str(other)


def test_unexpected_errors_are_internal_errors_with_a_debug_traceback(tiny_llama_with_tokenizer, capsys,
                                                                     monkeypatch):
    directory, text = tiny_llama_with_tokenizer
    from jaxq import evaluate as evaluate_module

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(evaluate_module, "perplexity_report", broken)
    argv = ["eval", "--model", directory, "--data", str(text), "--ctx", "8"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and "internal error: ValueError: an internal bug" in err and "--debug" in err
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(argv + ["--debug"])


@pytest.mark.parametrize("argv, message", [
    (["--full", "--ctx", "128"], "--ctx does not apply with --full"),
    (["--data", "FILE", "--data-dir", "/tmp"], "--data-dir does not apply with --data"),
    (["--data-parallel", "0"], "must be at least 1"),
    (["--data", "FILE", "--windows", "100000", "--ctx", "32"], "100000 windows of 32 tokens requested"),
])
def test_eval_options_that_cannot_apply(tiny_llama_with_tokenizer, argv, message, capsys):
    directory, text = tiny_llama_with_tokenizer
    argv = [str(text) if a == "FILE" else a for a in argv]
    code, _, err = run(capsys, "eval", "--model", directory, *argv)
    assert code == 2 and message in err, err


def test_short_calibration_text_is_a_message(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, _ = tiny_llama_with_tokenizer
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 4)
    code, _, err = run(capsys, "quantize", "--model", directory, "--method", "gptq", "--group-size", "32",
                       "--calib-data", str(short), "--calib-samples", "16", "--calib-len", "32", "--out",
                       str(tmp_path / "o"))
    assert code == 2 and "at most 8 distinct windows of 32, 16 requested" in err, err


def test_resume_progress_and_foreign_orbax_steps_are_never_overwritten(tmp_path, capsys):
    progress = tmp_path / "progress"
    (progress / "blocks" / "0").mkdir(parents=True)
    (progress / "run.json").write_text("{}")
    for out in (progress, progress / "blocks"):
        code, _, err = run(capsys, "quantize", "--model", "/nonexistent", "--out", str(out), "--overwrite")
        assert code == 2 and "resume progress" in err, err
    foreign = tmp_path / "foreign"
    (foreign / "3").mkdir(parents=True)
    code, _, err = run(capsys, "quantize", "--model", "/nonexistent", "--out", str(foreign), "--overwrite")
    assert code == 2 and "Orbax steps that are not a jaxq checkpoint" in err, err
    assert (foreign / "3").is_dir()


def test_w4a4kv4_rotated_quantize_inspect_eval(tiny_llama_with_tokenizer, tmp_path, capsys):
    """--rotate / --a-bits / --kv-bits are recorded in the checkpoint and `jaxq eval` runs them."""
    directory, text = tiny_llama_with_tokenizer
    out_dir = tmp_path / "w4a4kv4"
    code, out, err = run(capsys, "quantize", "--model", directory, "--bits", "4", "--granularity", "channel", "--sym",
                         "--rotate", "hadamard", "--a-bits", "4", "--kv-bits", "4", "--out", str(out_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["quant_config"]["activations"] == {"bits": 4, "clip_ratio": 0.9, "calibration": "dynamic",
                                                              "percentile": 99.99}
    code, out, _ = run(capsys, "inspect", str(out_dir))
    assert "runs: hadamard-rotated" in out and "4-bit activations" in out and "4-bit KV cache" in out
    lm = checkpoint.load(out_dir).language_model()
    assert lm.config.rotation == "hadamard" and lm.config.kv_cache.bits == 4 and lm.config.activations.bits == 4
    code, out, _ = run(capsys, "eval", "--checkpoint", str(out_dir), "--data", str(text), "--ctx", "32",
                       "--windows", "3", "--json")
    assert code == 0
    expected = evaluate.perplexity(lm, lm.params, str(text), ctx=32, windows=3, progress=False)
    without = lm.replace(config=lm.config.replace(activations=None, kv_cache=None))
    assert json.loads(out)["ppl"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(evaluate.perplexity(without, lm.params, str(text), ctx=32, windows=3,
                                                         progress=False), rel=1e-4)
    # re-quantizing into the same directory is the same model, not "another model"
    code, _, err = run(capsys, "quantize", "--model", directory, "--bits", "4", "--group-size", "16",
                       "--out", str(out_dir), "--json")
    assert code == 0, err


def test_deployment_options_that_cannot_apply(tiny_llama_with_tokenizer, capsys):
    directory, _ = tiny_llama_with_tokenizer
    code, _, err = run(capsys, "quantize", "--model", directory, "--kv-clip-ratio", "0.8", "--rotate-seed", "3",
                       "--out", "o")
    assert code == 2
    assert "--kv-clip-ratio does not apply without --kv-bits" in err
    assert "--rotate-seed does not apply without --rotate" in err
    code, _, err = run(capsys, "quantize", "--model", directory, "--a-bits", "5", "--out", "o")
    assert code == 2 and "activation bits=5 is not supported" in err


def test_obr_2_4_on_a_rotated_w4a4kv4_model(tiny_llama_with_tokenizer, tmp_path, capsys):
    """The pruning methods compose with the rotation and the runtime quantizers on the command line."""
    directory, text = tiny_llama_with_tokenizer
    out_dir = tmp_path / "obr"
    code, out, err = run(capsys, "quantize", "--model", directory, "--method", "obr", "--sparsity", "2:4",
                         "--rotate", "hadamard", "--a-bits", "4", "--kv-bits", "4", "--calib-data", str(text),
                         "--calib-samples", "4", "--calib-len", "32", "--calib-step", "4", "--out", str(out_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["quant_config"]["rules"][-1]["settings"]["prune"] == [2, 4]
    code, out, _ = run(capsys, "inspect", str(out_dir))
    assert code == 0 and "pruned" in out and "2:4" in out
    lm = checkpoint.load(out_dir).language_model()
    kernel = lm.params["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert kernel.pattern == "2:4" and kernel.sparsity == 0.5


def test_method_reports_print_once_even_under_a_root_handler(capsys):
    """A library that installed a root StreamHandler (one of jaxq's imports does) must not print
    every report a second time beside tqdm's."""
    root = logging.getLogger()
    extra = logging.StreamHandler(io.StringIO())
    root.addHandler(extra)
    try:
        with cli._reports_above_progress_bars(logging.getLogger("jaxq")):
            logging.getLogger("jaxq.methods").info("layers/0: reconstruction loss 1 at init, 0.5 after 4 steps")
    finally:
        root.removeHandler(extra)
    assert capsys.readouterr().err.count("reconstruction loss") == 1
    assert extra.stream.getvalue() == ""
    assert logging.getLogger("jaxq").propagate  # restored for whoever logs after the command
