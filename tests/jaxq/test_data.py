import numpy as np
import pytest

from jaxq import data


def test_eval_windows_are_the_leading_non_overlapping_chunks():
    ids = np.arange(1000)
    w = data.eval_windows(ids, ctx=128, windows=3)
    assert w.shape == (3, 128) and w.dtype == np.int32
    np.testing.assert_array_equal(w.ravel(), np.arange(384))
    assert data.eval_windows(ids, ctx=128).shape == (7, 128)  # all full windows


def test_text_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(ValueError, match="shorter than one window of 512"):
        data.eval_windows(np.arange(100), ctx=512)
    with pytest.raises(ValueError, match="only 1000 tokens"):
        data.eval_windows(np.arange(1000), ctx=100, windows=11)


def test_quick_calibration_windows_are_a_prefix_of_the_full_draw():
    ids = np.arange(10_000)
    full = data.calibration_windows(ids, samples=128, length=64)
    quick = data.calibration_windows(ids, samples=32, length=64)
    np.testing.assert_array_equal(quick, full[:32])
    starts = full[:, 0]
    np.testing.assert_array_equal(full, starts[:, None] + np.arange(64))  # contiguous windows
    assert len(set(starts.tolist())) > 100  # genuinely random offsets


def test_calibration_offsets_are_the_protocol_draw():
    ids = np.arange(300_000)  # no repeats among the draws: exactly PROTOCOL.md's offsets
    expected = np.random.default_rng(0).integers(0, len(ids) - 512, size=128)[:32]
    np.testing.assert_array_equal(data.calibration_windows(ids, samples=32, length=512)[:, 0], expected)


def test_calibration_errors():
    with pytest.raises(ValueError, match="calibration text has 10 tokens: at most 0 distinct windows of 64"):
        data.calibration_windows(np.arange(10), samples=4, length=64)
    with pytest.raises(ValueError, match="at least one sample"):
        data.calibration_windows(np.arange(1000), samples=0, length=64)


def test_short_calibration_text_gives_distinct_windows():
    ids = np.arange(40)  # 8 possible offsets for windows of 32: 32 draws from 8 would repeat
    windows = data.calibration_windows(ids, samples=8, length=32)
    assert sorted(windows[:, 0].tolist()) == list(range(8))
    with pytest.raises(ValueError, match="at most 8 distinct windows of 32, 9 requested"):
        data.calibration_windows(ids, samples=9, length=32)


def test_a_missing_path_is_an_error_not_the_text_itself(tmp_path):
    with pytest.raises(data.DataNotFoundError, match=r"no such file.*jaxq.data.Text"):
        data.load_text(str(tmp_path / "texts.txt"))
    with pytest.raises(data.DataNotFoundError, match="a directory, not a text file"):
        data.load_text(tmp_path)
    assert data.load_text(data.Text("/not/a/path")) == "/not/a/path"


def test_named_sources_follow_the_protocol_layout(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = A = \n\n line one \n \n line two \n")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.load_text("wikitext2") == " = A = \n\n line one \n\n line two "
    other = tmp_path / "other"
    (other / "wikitext2").mkdir(parents=True)
    (other / "wikitext2" / "wiki.test.raw").write_text("x\ny\n")
    assert data.load_text("wikitext2", other) == "x\n\ny"  # explicit directory beats the env var


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(data.DataNotFoundError, match=rf"{tmp_path}.*JAXQ_DATA_DIR.*jaxq\[hub\]"):
        data.load_text("wikitext2-valid")
    with pytest.raises(data.DataNotFoundError, match="not a named source"):
        data.load_text(str(tmp_path / "nope.txt"))


def test_default_data_dir_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert (data.data_dir() / "wikitext2" / "wiki.test.raw").is_file()
