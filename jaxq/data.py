"""Evaluation and calibration text, and the token windows cut from it (PROTOCOL.md).

Named sources resolve to local files under the data directory (default `../shared/data` beside
the checkout; `$JAXQ_DATA_DIR` or an explicit argument override it) and fall back to Hugging
Face `datasets` when that package and a network are there.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "JAXQ_DATA_DIR"
CALIBRATION_DRAWS = 128  # PROTOCOL.md: 128 offsets are drawn; the quick protocol uses the first 32


class DataNotFoundError(FileNotFoundError):
    """Text that is neither on disk nor reachable, with what to do about it."""


class DataError(ValueError):
    """Text that cannot give the windows asked for (too short, unreadable, bad counts)."""


@dataclasses.dataclass(frozen=True)
class TextSource:
    file: str                       # path under the data directory
    hf_dataset: tuple[str, str, str] | None  # (path, config, split) for `datasets.load_dataset`
    description: str


SOURCES: dict[str, TextSource] = {
    "wikitext2": TextSource("wikitext2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test"),
                            "WikiText-2 raw, test split (evaluation text)"),
    "wikitext2-valid": TextSource("wikitext2/wiki.valid.tokens", ("wikitext", "wikitext-2-v1", "validation"),
                                  "WikiText-2, validation split (calibration text)"),
}
EVAL_SOURCE = "wikitext2"
CALIBRATION_SOURCE = "wikitext2-valid"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: argument, else $JAXQ_DATA_DIR, else ../shared/data beside the checkout."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    return checkout.parent / "shared" / "data"


def join_lines(raw: str) -> str:
    """PROTOCOL.md text: the non-empty lines joined with blank lines."""
    return "\n\n".join(line for line in raw.splitlines() if line.strip())


@dataclasses.dataclass(frozen=True)
class Text:
    """Text given as itself: `evaluate.perplexity(lm, params, data.Text("..."))`.

    A plain string is always a source name or a path, so a mistyped path is an error, never
    evaluated as if it were the text.
    """

    content: str


Source = str | os.PathLike | Text  # a named source, a path to a text file, or Text


def load_text(source: Source, data_dir_override: str | os.PathLike | None = None) -> str:
    """Text of a named source (`wikitext2`, `wikitext2-valid`), of a local text file, or `Text`."""
    if isinstance(source, Text):
        return source.content
    if isinstance(source, str) and source in SOURCES:
        spec = SOURCES[source]
        path = data_dir(data_dir_override) / spec.file
        if path.is_file():
            return join_lines(path.read_text(encoding="utf-8"))
        return _from_hub(source, spec, path)
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
        what = "a directory, not a text file" if path.is_dir() else "no such file"
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:  # unreadable, or a string too long to be a path (raw text passed as one)
        what = err.strerror or type(err).__name__
    raise DataNotFoundError(
        f"no text {str(source)[:200]!r}: {what}, and not a named source ({', '.join(SOURCES)}); "
        "to pass text itself from Python, use jaxq.data.Text(...)")


def _from_hub(name: str, spec: TextSource, missing: Path) -> str:
    hint = (f"{name} ({spec.description}) is not at {missing}. Put the file there, point "
            f"${DATA_DIR_ENV} or --data-dir at a directory holding {spec.file}, or pass a text file")
    try:
        import datasets
    except ImportError:
        raise DataNotFoundError(hint + "; or, with a network, `pip install 'jaxq[hub]'` (HF `datasets`) "
                                "and it is fetched from the Hugging Face Hub.") from None
    try:
        rows = datasets.load_dataset(*spec.hf_dataset[:2], split=spec.hf_dataset[2])
    except Exception as err:  # offline, hub down, dataset moved: all the same to the user
        raise DataNotFoundError(hint + f" (downloading with `datasets` failed: {type(err).__name__}).") from None
    return join_lines("\n".join(rows["text"]))


def eval_windows(ids: np.ndarray, ctx: int, windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `ctx` tokens from the start: int32 [windows, ctx].

    windows=None takes every full window (the full protocol).
    """
    ids = np.asarray(ids, np.int32)
    available = len(ids) // ctx
    if available == 0:
        raise DataError(f"the text has {len(ids)} tokens, shorter than one window of {ctx}")
    if windows is None:
        windows = available
    if windows > available:
        raise DataError(f"{windows} windows of {ctx} tokens requested but the text has only "
                         f"{len(ids)} tokens ({available} windows)")
    return ids[: windows * ctx].reshape(windows, ctx)


def calibration_windows(ids: np.ndarray, samples: int, length: int, seed: int = 0) -> np.ndarray:
    """Random windows of `length` tokens: int32 [samples, length].

    Offsets come from numpy.random.default_rng(seed); 128 are drawn and the first `samples`
    distinct ones used, so the quick protocol's 32 windows are a prefix of the full protocol's
    128. Should the draws repeat an offset (a short text), the rest is drawn without replacement;
    a text with fewer than `samples` possible offsets is an error.
    """
    ids = np.asarray(ids, np.int32)
    if samples < 1:
        raise DataError(f"calibration needs at least one sample, got {samples}")
    if length < 2:
        raise DataError(f"calibration windows need at least 2 tokens, got length {length}")
    positions = len(ids) - length  # offsets drawn: 0 .. positions - 1 (the protocol's draw never takes the last)
    if positions < samples:
        raise DataError(
            f"calibration text has {len(ids)} tokens: at most {max(positions, 0)} distinct windows of "
            f"{length}, {samples} requested; use a longer text, fewer samples or shorter windows")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, positions, size=max(samples, CALIBRATION_DRAWS))
    offsets = list(dict.fromkeys(drawn.tolist()))[:samples]  # distinct, in the order drawn
    if len(offsets) < samples:  # repeats among the draws: top up without replacement
        unused = np.setdiff1d(np.arange(positions), offsets)
        offsets += rng.choice(unused, samples - len(offsets), replace=False).tolist()
    return np.stack([ids[o: o + length] for o in offsets])
