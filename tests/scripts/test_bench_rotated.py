"""The rotated-matmul benchmark runs end to end (CPU: XLA paths); speed is measured, not asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_times_quips_stored_format_between_both_rotations(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_rotated.py"), "--quick", "--calls", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["statistic"] == "median" and record["repeats"] >= 5
    assert record["inner_format"] == "uniform w2 per-tensor float-offset"  # what quip.quantize_weight stores
    rows = record["results"]
    assert sorted((r["rotation"], r["M"]) for r in rows) == [("hadamard", 1), ("hadamard", 4), ("kronecker", 1),
                                                             ("kronecker", 4)]
    assert all(r["plain_us"] > 0 and r["rotated_us"] > 0 for r in rows)
    # the timed weight is the rotated one, rotations on both sides and the rescale, and it computes x @ W
    # (bfloat16 activations and outputs)
    for r in rows:
        kind = r["rotation"]
        assert r["encoding"].startswith(f"{record['inner_format']} | input {kind} ") and r["encoding"].endswith(
            "rescaled") and f"output {kind} " in r["encoding"], r["encoding"]
        assert 0 <= r["max_rel_error"] < 2e-2, r
