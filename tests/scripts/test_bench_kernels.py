"""The kernel benchmark harness runs end to end (on CPU: XLA paths only) and records what the
issue asks for; speed itself is measured on accelerators, not asserted in tests."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_path_and_row(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--quick", "--calls", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"] and record["jax"] and record["statistic"] == "median" and record["repeats"] >= 5
    rows = record["results"]
    paths = {r["path"] for r in rows}
    assert {"bf16 dot", "xla int4 per-channel", "jaxq w4 g128", "jaxq w2 g64", "jaxq w3 g128 lut"} <= paths
    assert {r["M"] for r in rows} == {1, 16}
    assert all(r["us_per_call"] > 0 and r["ran"] in ("kernel", "xla") for r in rows)
    assert all(abs(r["speedup_vs_bf16"] - 1) < 1e-9 for r in rows if r["path"] == "bf16 dot")
