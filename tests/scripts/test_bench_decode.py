"""The decode benchmark runs end to end on a tiny model (speed is measured on a GPU, not here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_reports_both_variants(tmp_path):
    out = tmp_path / "decode.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_decode.py"), "--tiny", "--steps", "4",
                           "--batches", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["batch"]) for r in results] == [("bf16", 2), ("w4g128", 2)]
    assert all(r["tokens_per_second"] > 0 and r["steps"] == 4 for r in results)
    assert results[1]["weight_bytes"] < 0.5 * results[0]["weight_bytes"]  # the 4-bit model really is smaller
