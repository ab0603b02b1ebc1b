"""Centralized reference table on MovieLens-100K with the default model -> results/central.json.

    python benchmarks/central_bench.py [--methods M ...] [--seeds 3] [--epsilon 8] [--set key=value ...]

Runs `fedrec train-central` once per seed (train.seed = 0, 1, ...; the private releases draw
fresh OS entropy every run, so the seeds are independent noise draws) on the same split and
merges the rows into benchmarks/results/central.json: per method the mean over seeds of every
metric, `ndcg@10_sd` (sample sd over seeds), `seeds`, and `per_seed` (the NDCG@10 of each run,
and for a fused method the LLM's contribution: fused minus CF alone). With `--epsilon E` other
than 8 the rows are named `<method>-eps<E>`. Rows of other methods already in the file are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedrec.cli import main as fedrec_main

RESULTS = Path(__file__).resolve().parent / "results" / "central.json"
METRICS = ("hr@10", "ndcg@10", "mrr@10")


def run_once(methods: list[str], seed: int, epsilon: float, overrides: list[str]) -> tuple[list[dict], str]:
    out = Path(tempfile.mkdtemp(prefix="fedrec-central-")) / "run"
    argv = ["train-central", "--output", str(out), "--set", f"train.seed={seed}",
            "--set", f"privacy.target_epsilon={epsilon}",
            "--set", "train.methods=[" + ", ".join(f'"{m}"' for m in methods) + "]"]
    for item in overrides:
        argv += ["--set", item]
    if fedrec_main(argv) != 0:
        raise SystemExit("train-central failed")
    return json.loads((out / "results.json").read_text())["rows"], (out / "config.toml").read_text()


def summarise(runs: list[list[dict]], suffix: str) -> list[dict[str, Any]]:
    """One row per method: the first run's fields, metrics averaged over the runs."""
    by_method: dict[str, list[dict]] = {}
    for rows in runs:
        for r in rows:
            by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rows in by_method.items():
        row = dict(rows[0])
        row["method"] = method if not suffix else _suffixed(method, suffix)
        for key in [k for k in rows[0] if k.startswith(METRICS) or k.startswith(("llm_contribution_",
                                                                                 "cf_only_"))]:
            row[key] = round(statistics.fmean(r[key] for r in rows), 5)
        ndcg = [r["ndcg@10"] for r in rows]
        row["ndcg@10_sd"] = round(statistics.stdev(ndcg), 5) if len(ndcg) > 1 else 0.0
        row["seeds"] = len(rows)
        row["per_seed"] = [{"ndcg@10": r["ndcg@10"], **({"llm_contribution": r["llm_contribution_ndcg@10"]}
                            if "llm_contribution_ndcg@10" in r else {}),
                            "train_seconds": r["train_seconds"]} for r in rows]
        row["train_seconds"] = round(statistics.fmean(r["train_seconds"] for r in rows), 1)
        out.append(row)
    return out


def _suffixed(method: str, suffix: str) -> str:
    if method.endswith("-llm-only"):
        return f"{method.removesuffix('-llm-only')}-{suffix}-llm-only"
    return f"{method}-{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of train-central")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--append", action="store_true", help="add these seeds to the stored runs")
    args = parser.parse_args()
    from fedrec.common.config import CENTRAL_METHODS

    methods = args.methods or list(CENTRAL_METHODS)
    runs, config = [], ""
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rows, config = run_once(methods, seed, args.epsilon, args.overrides)
        runs.append(rows)
    suffix = "" if args.epsilon == 8.0 else f"eps{args.epsilon:g}"
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if doc.get("design") != "item-encoder":  # the file of the previous design: start afresh
        doc = {"design": "item-encoder"}
    # every run's rows are kept under "runs" (by suffix); --append adds seeds to what is there
    stored = doc.setdefault("runs", {}).setdefault(suffix or "eps8", [])
    names = {r["method"] for rows in runs for r in rows}
    if args.append:
        runs = [[r for r in rows if r["method"] in names] for rows in stored] + runs
    stored[:] = runs if args.append else \
        [[r for r in rows if r["method"] not in names] for rows in stored] + runs
    rows = summarise([[r for r in rows if r["method"] in names] for rows in runs], suffix)
    kept = [r for r in doc.get("rows", []) if r["method"] not in {x["method"] for x in rows}]
    doc.update({
        "protocol": "MovieLens-100K, all users, chronological leave-one-out, full-catalogue ranking, "
                    "seen items excluded; mean over seeds (private releases: fresh noise per run)",
        "machine": f"{platform.machine()} {platform.processor()} ({_cores()} cores)".strip(),
        "run_dir_config": config, "rows": kept + rows,
    })
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
