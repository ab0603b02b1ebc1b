"""Centralized reference table on MovieLens-100K with the default model -> results/central.json.

    python benchmarks/central_bench.py [--config FILE] [--set key=value ...] [--label TEXT]

Runs `fedrec train-central` (all methods on one split) into a fresh run directory and writes its
rows, with the scale and the machine, to benchmarks/results/central.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from fedrec.cli import main as fedrec_main

RESULTS = Path(__file__).resolve().parent / "results" / "central.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--label", default="reduced CPU scale (defaults)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedrec-central-")) / "run"
    argv = ["train-central", "--output", str(out)]
    if args.config:
        argv += ["--config", args.config]
    for item in args.overrides:
        argv += ["--set", item]
    if fedrec_main(argv) != 0:
        raise SystemExit("train-central failed")
    rows = json.loads((out / "results.json").read_text())["rows"]
    result = {
        "scale": args.label, "overrides": args.overrides, "config": args.config,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "run_dir_config": (out / "config.toml").read_text(), "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
