"""Runs of `jaxq quantize` / `jaxq eval` (and `scripts/ppl_table.py` rows) as a markdown table and PNG plots.

    runs = load_runs(["runs/w4", "runs/w3", "table.jsonl"])
    print(markdown_table(runs))                      # bold perplexities: the Pareto front
    plot_ppl_vs_bits(runs, "ppl_vs_bits.png")        # needs matplotlib: pip install 'jaxq[plots]'
    plot_layer_errors(runs[0], "layers-w4.png")

A checkpoint directory describes its run: `jaxq quantize` writes QUANTIZE_RECORD beside the
Orbax steps (its `--json` summary, a digest of the weights and, per quantized weight, its
encoding, bits per weight and relative error ||W^ - W||_F / ||W||_F against the float weight it
replaced), and `jaxq eval --checkpoint` one `eval-<data>-ctx<ctx>-w<windows>.json` per protocol
(its `--json` result and the same digest, so an evaluation of weights since replaced is refused
rather than paired with the new ones). Bits per weight are those of the quantized weights, scales
and zeros included: 16 * bytes / bf16 bytes; a run with nothing quantized counts as bf16 (16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from jaxq import tree
from jaxq.report import SizeReport

QUANTIZE_RECORD = "quantize.json"
EVAL_RECORD_GLOB = "eval-*.json"
REPORT_FILE = "report.md"
PPL_PLOT = "ppl_vs_bits.png"
FIGURE_SIZE, FIGURE_DPI = (10.0, 5.5), 100         # ppl_vs_bits.png: 1000 x 550 pixels
MARKERS = "osD^vP*X"                               # with the 10 colours: 80 distinct runs
LAYER_FIGURE_SIZE = (10.0, 4.5)                    # layers-<run>.png: 1000 x 450 pixels
PLOTS_EXTRA = "pip install 'jaxq[plots]'"


class ReportError(ValueError):
    """Runs that cannot be read or reported, with the reason."""


@dataclasses.dataclass(frozen=True)
class LayerError:
    path: str
    encoding: str
    bits_per_weight: float
    relative_error: float | None   # ||W^ - W||_F / ||W||_F; None where undefined (an all-zero weight)


@dataclasses.dataclass(frozen=True)
class Run:
    name: str                      # checkpoint directory name, or ppl_table's variant
    source: str                    # the directory or file it was read from
    method: str | None             # the checkpoint's method(s), '+'-joined; None for a ppl_table row
    bits_per_weight: float | None  # None: the row failed before its size was measured
    ppl: float | None              # None: not evaluated, or failed
    data: str | None
    ctx: int | None
    windows: int | None
    quantize_seconds: float | None
    error: str | None = None       # why a ppl_table row has no perplexity
    layers: tuple[LayerError, ...] = ()

    @property
    def protocol(self) -> str | None:
        """'wikitext2, ctx 512 x 64': what makes two perplexities comparable."""
        return None if self.ppl is None else f"{self.data}, ctx {self.ctx} x {self.windows}"


# ------------------------------------------------------------------ writing the records

def relative_errors(reference: Any, quantized: Any) -> dict[str, float | None]:
    """{path: ||W^ - W||_F / ||W||_F} for every quantized weight of `quantized`, W^ its
    `dequantize()` and W the float leaf at the same path of `reference`; one weight at a time."""
    float_leaves = dict(tree.flatten(reference)[0])
    errors = {}
    for path, leaf in tree.flatten(quantized)[0]:
        if tree.is_format(leaf):
            value = float(_relative_error(float_leaves[path], leaf))
            errors[path] = value if math.isfinite(value) else None
    return errors


@jax.jit
def _relative_error(w: jax.Array, q: Any) -> jax.Array:
    w = w.astype(jnp.float32)
    return jnp.linalg.norm(q.dequantize(jnp.float32) - w) / jnp.linalg.norm(w)


def weights_digest(leaves: dict[str, Any]) -> str:
    """A digest of a checkpoint's per-leaf records (formats, static fields, array digests):
    equal exactly when two records describe the same weights."""
    return hashlib.blake2b(json.dumps(leaves, sort_keys=True).encode(), digest_size=16).hexdigest()


def quantize_record(summary: dict[str, Any], sizes: SizeReport, errors: dict[str, float | None],
                    leaves: dict[str, Any]) -> dict[str, Any]:
    """What `jaxq quantize` writes as QUANTIZE_RECORD: its summary, the weights' digest and a
    `layers` entry per quantized weight."""
    layers = [{"path": w.path, "encoding": w.encoding, "bits_per_weight": w.bits_per_weight,
               "relative_error": errors[w.path]} for w in sizes.quantized]
    return {**summary, "weights_digest": weights_digest(leaves), "layers": layers}


def eval_record_name(data: str, ctx: int, windows: int) -> str:
    """'eval-wikitext2-ctx512-w64.json'; a text file's name stands for its path."""
    return f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(data).name)}-ctx{ctx}-w{windows}.json"


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` atomically: a temporary file beside it, then `os.replace`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ reading runs

def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """The runs at `paths`, in order: a checkpoint directory (one run per eval record in it, or one
    without a perplexity), one eval record of a checkpoint directory, or a JSON-lines file of
    `scripts/ppl_table.py` rows (one run per line; rows with "ppl": null are kept as failed)."""
    paths, runs = list(paths), []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            runs += _checkpoint_runs(path, sorted(path.glob(EVAL_RECORD_GLOB)))
        elif path.is_file() and path.match(EVAL_RECORD_GLOB) and (path.parent / QUANTIZE_RECORD).is_file():
            runs += _checkpoint_runs(path.parent, [path])
        elif path.is_file():
            runs += _jsonl_runs(path)
        else:
            raise ReportError(f"no run at {path}: not a checkpoint directory, an eval record or a JSON-lines file")
    if not runs:
        raise ReportError(f"no runs found in {', '.join(map(str, paths))}")
    return runs


def _checkpoint_runs(directory: Path, evals: list[Path]) -> list[Run]:
    """A run per eval record of the checkpoint in `directory` (one without a perplexity if none)."""
    record_path = directory / QUANTIZE_RECORD
    if not record_path.is_file():
        raise ReportError(f"{directory} has no {QUANTIZE_RECORD}: it is not a checkpoint directory written by "
                          f"`jaxq quantize` (or was written before runs were recorded: quantize it again)")
    record = _read_json(record_path)
    with _malformed(record_path):
        base = Run(name=directory.resolve().name, source=str(directory), method=_methods(record["quant_config"]),
                   bits_per_weight=_bits_per_weight(record), ppl=None, data=None, ctx=None, windows=None,
                   quantize_seconds=float(record["quantize_seconds"]),
                   layers=tuple(LayerError(e["path"], e["encoding"], float(e["bits_per_weight"]),
                                           None if e["relative_error"] is None else float(e["relative_error"]))
                                for e in record["layers"]))
        digest = record["weights_digest"]
    runs = []
    for path in evals:
        result = _read_json(path)
        if result.get("weights_digest") != digest:
            raise ReportError(f"{path} evaluated other weights than the checkpoint now in {directory} (quantized "
                              f"again since): delete it, or evaluate again with `jaxq eval --checkpoint {directory}`")
        with _malformed(path):
            runs.append(dataclasses.replace(base, source=str(path), ppl=float(result["ppl"]), data=result["data"],
                                            ctx=int(result["ctx"]), windows=int(result["windows"])))
    return runs or [base]


def _jsonl_runs(path: Path) -> list[Run]:
    """One run per non-blank line of a `scripts/ppl_table.py` output file."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {path} ({err})") from None
    runs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{where} is not JSON ({err})") from None
        with _malformed(where):
            failed = row["ppl"] is None
            runs.append(Run(name=row["variant"], source=where, method=None,
                            bits_per_weight=None if "quantized_bytes" not in row else _bits_per_weight(row),
                            ppl=None if failed else float(row["ppl"]), data=row.get("data"),
                            ctx=row.get("ctx"), windows=row.get("windows"),
                            quantize_seconds=row.get("quantize_seconds"),
                            error=row.get("error", "failed") if failed else None))
    return runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read {path} as JSON ({err})") from None
    if not isinstance(record, dict):
        raise ReportError(f"{path} holds a JSON {type(record).__name__}, not a run record (an object)")
    return record


@contextlib.contextmanager
def _malformed(where: Any) -> Iterator[None]:
    """A missing or mistyped field of a record read in this block becomes a ReportError naming `where`."""
    try:
        yield
    except ReportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ReportError(f"{where} is not a run record ({type(err).__name__}: {err})") from None


def _bits_per_weight(record: dict[str, Any]) -> float:
    """16 * quantized bytes / their bf16 bytes; 16 (bf16) when nothing is quantized."""
    bf16 = int(record["quantized_bf16_bytes"])
    return 16.0 if bf16 == 0 else 16.0 * int(record["quantized_bytes"]) / bf16


def _methods(quant_config: dict[str, Any]) -> str:
    """The methods of a QuantConfig record's rules, '+'-joined ('float' when none quantizes)."""
    names = dict.fromkeys(rule["method"] for rule in quant_config["rules"] if rule["method"] is not None)
    return "+".join(names) or "float"


# ------------------------------------------------------------------ the table and the front

def pareto_front(runs: Iterable[Run]) -> list[Run]:
    """The runs with a perplexity that no other run dominates (as few or fewer bits per weight and
    as low or lower perplexity, one of them strictly), by increasing bits per weight. All of them
    must share one evaluation protocol."""
    measured = _comparable(runs)
    front = [r for r in measured if not any(
        o.bits_per_weight <= r.bits_per_weight and o.ppl <= r.ppl and
        (o.bits_per_weight < r.bits_per_weight or o.ppl < r.ppl) for o in measured)]
    return sorted(front, key=lambda r: (r.bits_per_weight, r.ppl))


def _comparable(runs: Iterable[Run]) -> list[Run]:
    """The runs with a perplexity and a size, refused when measured under different protocols."""
    measured = [r for r in runs if r.ppl is not None and r.bits_per_weight is not None]
    protocols = sorted({r.protocol for r in measured})
    if len(protocols) > 1:
        raise ReportError(f"perplexities measured under different protocols ({'; '.join(protocols)}) are not "
                          "comparable: report each protocol's runs separately (a checkpoint's eval-*.json can "
                          "be given alone)")
    return measured


def markdown_table(runs: Iterable[Run]) -> str:
    """One row per run, in order: name, method (where any run records one), bits per weight,
    perplexity (bold on the Pareto front; 'not evaluated' or 'failed: why'), evaluation protocol
    and quantization time."""
    runs = list(runs)
    front = {id(r) for r in pareto_front(runs)}
    methods = any(r.method is not None for r in runs)
    header = ["run"] + ["method"] * methods + ["bits/weight", "perplexity", "evaluated on", "quantize time"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        ppl = ("not evaluated" if r.error is None else f"failed: {r.error}") if r.ppl is None else _format_ppl(r.ppl)
        cells = [r.name] + [r.method or ""] * methods + [
            "" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}", f"**{ppl}**" if id(r) in front else ppl,
            r.protocol or "", "" if r.quantize_seconds is None else f"{r.quantize_seconds:.0f} s"]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _format_ppl(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.0f}"


# ------------------------------------------------------------------ plots

def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(f"plots need matplotlib, which is not installed: {PLOTS_EXTRA}") from None
    figure = Figure(figsize=size, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_ppl_vs_bits(runs: Iterable[Run], path: str | os.PathLike) -> None:
    """PNG (FIGURE_SIZE at FIGURE_DPI): perplexity (log scale) against bits per weight, a marker
    per run with a perplexity (its own colour and shape, named in the legend: runs at the same
    size would hide each other's text labels), and the Pareto front as a step line."""
    runs = list(runs)
    measured, front = _comparable(runs), pareto_front(runs)
    if not measured:
        raise ReportError("no run has a perplexity to plot: evaluate the checkpoints first "
                          "(`jaxq eval --checkpoint DIR`)")
    figure = _figure(FIGURE_SIZE)
    ax = figure.add_subplot()
    ax.set_yscale("log")
    ax.step([r.bits_per_weight for r in front], [r.ppl for r in front], where="post", color="0.4", linewidth=1,
            label="Pareto front")
    for i, r in enumerate(measured):
        ax.plot([r.bits_per_weight], [r.ppl], linestyle="none", marker=MARKERS[i // 10 % len(MARKERS)],
                color=f"C{i % 10}", label=f"{r.name} ({_format_ppl(r.ppl)})")
    ax.set_xlabel("bits per weight (quantized linears, scales and zeros included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"perplexity vs bits per weight ({measured[0].protocol})")
    ax.grid(True, which="both", alpha=0.3)
    figure.legend(loc="outside right upper", fontsize=7, ncols=math.ceil((len(measured) + 1) / 30))
    figure.savefig(path)


def plot_layer_errors(run: Run, path: str | os.PathLike) -> None:
    """PNG (LAYER_FIGURE_SIZE at FIGURE_DPI): a bar per quantized weight of `run`, in order, its
    relative error ||W^ - W||_F / ||W||_F, coloured by the linear it is (q_proj, ...)."""
    if not run.layers:
        raise ReportError(f"run {run.name} has no per-layer errors (only checkpoints written by `jaxq quantize` do)")
    kinds = [_linear_kind(layer.path) for layer in run.layers]
    colours = {kind: f"C{i % 10}" for i, kind in enumerate(dict.fromkeys(kinds))}
    figure = _figure(LAYER_FIGURE_SIZE)
    from matplotlib.patches import Patch

    ax = figure.add_subplot()
    errors = [math.nan if layer.relative_error is None else layer.relative_error for layer in run.layers]
    ax.bar(range(len(errors)), errors, width=0.85, color=[colours[k] for k in kinds])
    starts = _block_starts([layer.path for layer in run.layers])
    every = max(1, math.ceil(len(starts) / 16))
    ax.set_xticks([i for i, _ in starts[::every]], [block for _, block in starts[::every]])
    ax.set_xlabel("quantized weight, in order (ticks: the block number at its first weight)")
    ax.set_ylabel("relative error ||W^ - W|| / ||W||")
    ax.set_title(f"{run.name}: per-weight relative error")
    figure.legend(handles=[Patch(color=colour, label=kind) for kind, colour in colours.items()],
                  loc="outside right upper", fontsize=7)
    figure.savefig(path)


def plot_loss_curve(losses: Sequence[float], path: str | os.PathLike, *, initial: float | None = None,
                    title: str = "QAT distillation loss") -> None:
    """PNG (LAYER_FIGURE_SIZE at FIGURE_DPI): the loss of every training step (`jaxq qat`), and
    the loss before training as a dashed line."""
    if not losses:
        raise ReportError("no training steps to plot")
    figure = _figure(LAYER_FIGURE_SIZE)
    ax = figure.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, color="C0", linewidth=1.2, label="loss of the step's batch")
    if initial is not None:
        ax.axhline(initial, color="0.4", linestyle="--", linewidth=1, label=f"before training ({initial:.4f})")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(float || quantized) per token")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path)


def _linear_kind(path: str) -> str:
    """'layers/3/self_attn/q_proj/kernel' -> 'q_proj'."""
    parts = path.split("/")
    return parts[-2] if parts[-1] == "kernel" and len(parts) > 1 else parts[-1]


def _block_starts(paths: list[str]) -> list[tuple[int, str]]:
    """(index, block number) of the first path of each 'layers/<n>/' block."""
    starts, previous = [], None
    for i, path in enumerate(paths):
        match = re.match(r"layers/(\d+)/", path)
        block = match.group(1) if match else None
        if block is not None and block != previous:
            starts.append((i, block))
        previous = block
    return starts


# ------------------------------------------------------------------ the report

def layer_plot_name(run: Run) -> str:
    """'layers-<run name>.png', the name made safe for a file."""
    return f"layers-{re.sub(r'[^A-Za-z0-9._-]+', '_', run.name)}.png"


def write_report(runs: list[Run], out: str | os.PathLike) -> list[Path]:
    """Write into `out`: PPL_PLOT (when a run has a perplexity), `layers-<run>.png` for each run
    with per-layer errors, and REPORT_FILE (the table and image links, last). The paths written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} is an existing file, not a directory for the report")
    with_layers = {}
    for run in runs:
        if run.layers:
            other = with_layers.setdefault(layer_plot_name(run), run)
            if other.layers != run.layers:
                raise ReportError(f"two runs would write {layer_plot_name(run)} ({other.source}, {run.source}): "
                                  "give checkpoint directories of different names")
    table = markdown_table(runs)  # refuses runs of different protocols before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create {out} ({err.strerror or err})") from None
    images = []
    if any(r.ppl is not None for r in runs):
        plot_ppl_vs_bits(runs, out / PPL_PLOT)
        images.append(("perplexity vs bits per weight", PPL_PLOT))
    for name, run in with_layers.items():
        plot_layer_errors(run, out / name)
        images.append((f"{run.name}: per-weight relative error", name))
    document = ("Perplexities in bold are on the Pareto front: no other run has both fewer bits per weight "
                "and a lower perplexity.\n\n" + table + "".join(f"\n![{title}]({name})\n" for title, name in images))
    (out / REPORT_FILE).write_text(document)
    return [out / name for _, name in images] + [out / REPORT_FILE]
