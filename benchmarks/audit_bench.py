"""Run time of `fedrec audit`: the ledger audit of a smoke run, and the empirical canary audit.

Audits an existing run directory (make one with `fedrec simulate --config
simulations/configs/smoke.toml --output runs/smoke`) and runs the one-run canary audit of the
smoke preset at ε = 1 and at its default ε, with and without noise, 200 gradient canaries. Writes
benchmarks/results/audit.json (seconds, bounds, the machine and its load when measured).

    python benchmarks/audit_bench.py RUN_DIR [--canaries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "audit.json"
SMOKE = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "smoke.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--canaries", type=int, default=200)
    args = parser.parse_args()
    from fedrec.client.audit.canaries import empirical_audit
    from fedrec.client.audit.sources import empty_report, run_audit
    from fedrec.common.assets import Sources, default_cache_dir
    from fedrec.common.config import load_config

    t0 = time.perf_counter()
    report = run_audit([args.run_dir])
    ledger = {"seconds": time.perf_counter() - t0, "passed": report.passed,
              "clients": sum(len(t.clients) for t in report.targets)}
    sources = Sources(cache_dir=default_cache_dir(), offline=True)
    empirical = []
    for eps in (1.0, 8.0):
        cfg = load_config(SMOKE, [f"privacy.target_epsilon={eps}"])
        for r in empirical_audit(empty_report(), cfg, sources, canaries=args.canaries):
            empirical.append({"label": r.label, "claimed_epsilon": None if r.claimed_epsilon == float("inf")
                              else r.claimed_epsilon, "lower_bound": r.guesses.epsilon_lower_bound,
                              "correct": r.guesses.correct, "guesses": r.guesses.guesses,
                              "steps": r.steps, "users": r.users, "seconds": r.seconds})
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
           "ledger_audit": ledger, "canaries": args.canaries, "empirical": empirical}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
