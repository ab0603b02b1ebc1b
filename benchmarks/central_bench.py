"""Centralized reference table on MovieLens-100K with the default model -> results/central.json.

    python benchmarks/central_bench.py [--config FILE] [--set key=value ...] [--label TEXT]
                                       [--ablation NAME [--from-run DIR]]

Runs `fedrec train-central` (all methods on one split) into a fresh run directory and writes its
rows, with the scale and the machine, to benchmarks/results/central.json.

With `--ablation NAME` the rows are a variant, not the reference table: they go to
`ablation_rows` as `<method>-<NAME>`, each with its overrides, replacing rows of the same name and
leaving the reference rows alone. `--from-run DIR` takes the rows of a finished
`fedrec train-central` run directory instead of running one (its config.toml is kept with them).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from fedrec.cli import main as fedrec_main

RESULTS = Path(__file__).resolve().parent / "results" / "central.json"


def save_ablation(rows: list[dict], name: str, label: str, overrides: list[str], config: str) -> None:
    doc = json.loads(RESULTS.read_text())
    named = [{**r, "method": f"{r['method']}-{name}", "scale": label, "overrides": overrides,
              "run_dir_config": config} for r in rows]
    kept = [r for r in doc.get("ablation_rows", []) if r["method"] not in {x["method"] for x in named}]
    doc["ablation_rows"] = kept + named
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--label", default="reduced CPU scale (defaults)")
    parser.add_argument("--ablation", help="store the rows as variant NAME in ablation_rows")
    parser.add_argument("--from-run", type=Path, help="rows of this finished run directory (with --ablation)")
    args = parser.parse_args()
    if args.from_run and not args.ablation:
        parser.error("--from-run needs --ablation")
    out = args.from_run or Path(tempfile.mkdtemp(prefix="fedrec-central-")) / "run"
    if not args.from_run:
        argv = ["train-central", "--output", str(out)]
        if args.config:
            argv += ["--config", args.config]
        for item in args.overrides:
            argv += ["--set", item]
        if fedrec_main(argv) != 0:
            raise SystemExit("train-central failed")
    rows = json.loads((out / "results.json").read_text())["rows"]
    if args.ablation:
        save_ablation(rows, args.ablation, args.label, args.overrides, (out / "config.toml").read_text())
        print(json.dumps(rows, indent=2))
        return
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
