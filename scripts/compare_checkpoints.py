"""Are two jaxq checkpoints bit-identical? Compares every leaf's record (format, static fields,
and the shape, dtype and blake2b digest of each of its arrays) and the QuantConfig; prints one
JSON line and exits 1 if anything differs.

    python scripts/compare_checkpoints.py runs/before runs/after
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxq import checkpoint


def differences(a: dict, b: dict) -> list[str]:
    """Leaf paths (or 'quant_config') whose records differ between two metadata records."""
    out = [p for p in sorted(set(a["leaves"]) | set(b["leaves"])) if a["leaves"].get(p) != b["leaves"].get(p)]
    return out + (["quant_config"] if a["quant_config"] != b["quant_config"] else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    checkpoint.quiet_orbax_logs()
    a, b = (checkpoint.read_model_metadata(d) for d in (args.first, args.second))
    differ = differences(a, b)
    arrays = sum(len(r["arrays"]) for r in a["leaves"].values())
    print(json.dumps({"leaves": len(a["leaves"]), "arrays": arrays, "identical": not differ, "differ": differ[:20]}))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
