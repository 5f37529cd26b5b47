"""`jaxq report`: runs read from ppl_table rows and checkpoint records, the table, the Pareto
front, the plots, and the records `jaxq quantize` / `jaxq eval` write beside a checkpoint."""

import json
import sys

import numpy as np
import pytest

import jaxq
import models
from jaxq import checkpoint, cli, run_report, tree
from jaxq.run_report import Run

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(variant, ppl, quantized_bytes, bf16_bytes=16_000, **extra):
    return {"variant": variant, "data": "wikitext2", "ppl": ppl, "quantize_seconds": 12.4, "ctx": 512,
            "windows": 64, "quantized_bytes": quantized_bytes, "quantized_bf16_bytes": bf16_bytes, **extra}


def measured(name, bits, ppl):
    return Run(name=name, source="test", method=None, bits_per_weight=bits, ppl=ppl, data="wikitext2", ctx=512,
               windows=64, quantize_seconds=None)


def png(path):
    """(width, height), pixel variance of a PNG file."""
    with PIL.open(path) as image:
        return image.size, float(np.asarray(image.convert("L"), dtype=np.float64).var())


def test_table_rows_from_ppl_table_lines(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text(json.dumps(row("fp", 29.8075, 0, 0)) + "\n\n" +
                    json.dumps(row("gptq w4 g128", 36.5312, 4_250)) + "\n" +
                    json.dumps(row("w3 g128", 143.59, 3_250)) + "\n" +
                    json.dumps({"variant": "w16a4kv16", "data": "wikitext2", "ppl": None,
                                "error": "perplexity is inf | overflow", "quantize_seconds": 9.0}) + "\n")
    runs = run_report.load_runs([path])
    assert [r.name for r in runs] == ["fp", "gptq w4 g128", "w3 g128", "w16a4kv16"]
    assert [r.bits_per_weight for r in runs] == [16.0, pytest.approx(4.25), pytest.approx(3.25), None]
    assert runs[3].ppl is None and runs[3].error == "perplexity is inf | overflow"
    lines = run_report.markdown_table(runs).splitlines()
    assert lines[0] == "| run | bits/weight | perplexity | evaluated on | quantize time |"  # no method recorded
    assert lines[2:] == [
        "| fp | 16.00 | **29.81** | wikitext2, ctx 512 x 64 | 12 s |",
        "| gptq w4 g128 | 4.25 | **36.53** | wikitext2, ctx 512 x 64 | 12 s |",
        "| w3 g128 | 3.25 | **143.59** | wikitext2, ctx 512 x 64 | 12 s |",
        "| w16a4kv16 |  | failed: perplexity is inf \\| overflow |  | 9 s |",
    ]


def test_pareto_front_on_a_hand_checked_set():
    runs = [measured("a", 2.0, 100.0), measured("b", 2.5, 120.0), measured("c", 3.0, 50.0), measured("d", 3.0, 60.0),
            measured("e", 4.0, 50.0), measured("f", 4.25, 36.0), measured("g", 5.0, 40.0), measured("h", 16.0, 30.0),
            measured("i", 4.25, 36.0), dataclass_replace(measured("j", 1.0, 1.0), ppl=None)]
    # by hand: b is beaten by a, d by c, e by c (same ppl, fewer bits), g by f; f and i tie; j has no perplexity
    assert [r.name for r in run_report.pareto_front(runs)] == ["a", "c", "f", "i", "h"]
    # independently: sweep by bits, keep a run whose ppl is below every run with fewer bits and lowest at its size
    rated = [r for r in runs if r.ppl is not None]
    sweep = [r for r in sorted(rated, key=lambda r: (r.bits_per_weight, r.ppl))
             if all(o.ppl > r.ppl for o in rated if o.bits_per_weight < r.bits_per_weight)
             and r.ppl == min(o.ppl for o in rated if o.bits_per_weight == r.bits_per_weight)]
    assert run_report.pareto_front(runs) == sweep


def dataclass_replace(r, **changes):
    import dataclasses

    return dataclasses.replace(r, **changes)


def test_runs_of_different_protocols_are_not_compared():
    runs = [measured("a", 4.0, 40.0), dataclass_replace(measured("b", 3.0, 80.0), ctx=2048, windows=140)]
    protocols = r"different protocols \(wikitext2, ctx 2048 x 140; wikitext2, ctx 512 x 64\)"
    with pytest.raises(run_report.ReportError, match=protocols):
        run_report.markdown_table(runs)


def test_ppl_plot_is_a_png_of_the_stated_size(tmp_path):
    runs = [measured("a", 2.0, 3855.5), measured("b", 3.25, 79.84), measured("c", 4.25, 36.53),
            measured("fp", 16.0, 29.81)]
    run_report.plot_ppl_vs_bits(runs, tmp_path / "p.png")
    size, variance = png(tmp_path / "p.png")
    assert size == (1000, 550) == tuple(round(s * run_report.FIGURE_DPI) for s in run_report.FIGURE_SIZE)
    assert variance > 0


def test_layer_plot_is_a_png_of_the_stated_size(tmp_path):
    layers = tuple(run_report.LayerError(f"layers/{b}/{kind}/kernel", "uniform w4 g16", 5.0, 0.01 * (b + 1))
                   for b in range(3) for kind in ("self_attn/q_proj", "mlp/down_proj"))
    r = dataclass_replace(measured("w4", 5.0, None), layers=layers)
    run_report.plot_layer_errors(r, tmp_path / "l.png")
    size, variance = png(tmp_path / "l.png")
    assert size == (1000, 450) and variance > 0
    with pytest.raises(run_report.ReportError, match="no per-layer errors"):
        run_report.plot_layer_errors(measured("x", 4.0, 40.0), tmp_path / "x.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    with pytest.raises(run_report.ReportError, match=r"pip install 'jaxq\[plots\]'"):
        run_report.plot_ppl_vs_bits([measured("a", 4.0, 40.0)], tmp_path / "p.png")


def test_report_from_lines_writes_table_and_plot(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [row("gptq w4", 36.53, 4_250), row("rtn w3", 143.59, 3_250)])
    code, out, err = run(capsys, "report", path, "--out", tmp_path / "report")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "report" / "ppl_vs_bits.png"), str(tmp_path / "report" / "report.md")]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| gptq w4 | 4.25 | **36.53** |" in text and "![perplexity vs bits per weight](ppl_vs_bits.png)" in text
    assert png(tmp_path / "report" / "ppl_vs_bits.png")[0] == (1000, 550)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no run at {d}/missing: not a checkpoint directory"),
    (lambda d: (d / "plain").mkdir() or d / "plain", "{d}/plain has no quantize.json"),
    (lambda d: (d / "bad.jsonl").write_text('{"variant": "a"\n') and d / "bad.jsonl",
     "{d}/bad.jsonl, line 1 is not JSON"),
    (lambda d: (d / "rows.jsonl").write_text('{"ppl": 3.0}\n') and d / "rows.jsonl",
     "{d}/rows.jsonl, line 1 is not a run record (KeyError: 'variant')"),
    (lambda d: (d / "empty.jsonl").write_text("\n") and d / "empty.jsonl", "no runs found in {d}/empty.jsonl"),
])
def test_bad_runs_are_one_line_errors(tmp_path, capsys, make, message):
    code, out, err = run(capsys, "report", make(tmp_path), "--out", tmp_path / "r")
    assert code == 2 and out == ""
    assert err.startswith("jaxq report: error: " + message.format(d=tmp_path)) and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_relative_errors_match_numpy(rng):
    params = {"layers": {0: {"mlp": {"down_proj": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)}},
                             "input_layernorm": {"scale": np.ones(64, np.float32)}}}}
    w = params["layers"][0]["mlp"]["down_proj"]["kernel"]
    errors = {}
    for bits in (3, 8):
        quantized = jaxq.quantize(params, jaxq.UniformConfig(bits=bits, group_size=16))
        errors[bits] = run_report.relative_errors(params, quantized)
        q = quantized["layers"][0]["mlp"]["down_proj"]["kernel"]
        expected = np.linalg.norm(np.asarray(q.dequantize(np.float32)) - w) / np.linalg.norm(w)
        assert errors[bits] == {"layers/0/mlp/down_proj/kernel": pytest.approx(expected, rel=1e-5)}
    assert 0 < errors[8]["layers/0/mlp/down_proj/kernel"] < errors[3]["layers/0/mlp/down_proj/kernel"] / 10 < 0.1


def test_quantize_and_eval_record_runs_beside_the_checkpoint(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    out_dir = tmp_path / "w4"
    quantize = ["quantize", "--model", directory, "--bits", "4", "--group-size", "16", "--keep-float", "layers/0/",
                "--out", out_dir, "--quiet", "--json"]
    code, out, err = run(capsys, *quantize)
    assert code == 0, err
    summary = json.loads(out)
    record = json.loads((out_dir / "quantize.json").read_text())
    assert {k: v for k, v in record.items() if k not in ("layers", "weights_digest")} == summary  # stdout unchanged
    assert "layers" not in summary

    saved = checkpoint.load(out_dir)  # the extra files leave the checkpoint loadable
    float_params = dict(tree.flatten(models.load(directory).params)[0])
    quantized = dict(tree.flatten(saved.params)[0])
    assert [e["path"] for e in record["layers"]] == [p for p, leaf in quantized.items() if tree.is_format(leaf)]
    assert len(record["layers"]) == summary["quantized_weights"] == 7  # block 0 kept float
    for entry in record["layers"]:
        w, q = np.asarray(float_params[entry["path"]]), quantized[entry["path"]]
        assert entry["encoding"] == f"uniform {q.describe()}"
        assert entry["bits_per_weight"] == pytest.approx(8 * q.nbytes / w.size)
        assert entry["relative_error"] == pytest.approx(
            np.linalg.norm(np.asarray(q.dequantize(np.float32)) - w) / np.linalg.norm(w), rel=1e-5)

    code, out, err = run(capsys, "eval", "--checkpoint", out_dir, "--data", text, "--ctx", "32", "--windows", "3",
                         "--quiet", "--json")
    assert code == 0, err
    result = json.loads(out)
    recorded = json.loads((out_dir / "eval-text.txt-ctx32-w3.json").read_text())
    assert recorded == {**result, "weights_digest": record["weights_digest"]}
    checkpoint.load(out_dir)

    [r] = run_report.load_runs([out_dir])
    assert (r.name, r.method, r.ppl, r.data, r.ctx, r.windows) == ("w4", "rtn", result["ppl"], str(text), 32, 3)
    assert r.bits_per_weight == pytest.approx(16 * summary["quantized_bytes"] / summary["quantized_bf16_bytes"])
    code, out, err = run(capsys, "report", out_dir, "--out", tmp_path / "report")
    assert code == 0, err
    written = ("ppl_vs_bits.png", "layers-w4.png", "report.md")
    assert out.split() == [str(tmp_path / "report" / name) for name in written]
    assert png(tmp_path / "report" / "layers-w4.png")[0] == (1000, 450)
    assert "![w4: per-weight relative error](layers-w4.png)" in (tmp_path / "report" / "report.md").read_text()

    # quantizing again into the directory works beside the records (here rotated, with --overwrite: the
    # errors are against the rotated float weights; against the unrotated ones they would be ~1.4), and the
    # evaluation of the replaced weights is refused rather than paired with the new ones
    code, _, err = run(capsys, *quantize[:4], "8", "--granularity", "channel", "--sym", "--rotate", "hadamard",
                       *quantize[7:], "--overwrite")
    assert code == 0, err
    record = json.loads((out_dir / "quantize.json").read_text())
    assert record["quant_config"]["rotate"] == "hadamard" and len(record["layers"]) == 7
    assert max(e["relative_error"] for e in record["layers"]) < 0.02
    assert checkpoint.load(out_dir).params["layers"][1]["mlp"]["up_proj"]["kernel"].bits == 8
    code, _, err = run(capsys, "report", out_dir, "--out", tmp_path / "report2")
    assert code == 2 and "eval-text.txt-ctx32-w3.json evaluated other weights than the checkpoint now in" in err
