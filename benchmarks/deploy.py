"""Deployment cost: simulation vs real SuperLink/SuperNodes vs SuperNodes + SecAgg+ -> results/deploy.json.

    python benchmarks/deploy.py [--rounds 4] [--modes simulation,deployment,secagg]

The same tiny configuration everywhere (the `tiny-random` model built in code; three clients of 8
users each, 6 interactions per user): `fedrec simulate` on Flower's Simulation Engine, then a
real federation on loopback (tests/harness/loopback.py: SuperLink and three SuperNodes as processes, TLS
and node authentication on), then the same with `fed.secagg = true`. Per mode: the steady round
time (rounds after the first, which pays start-up, and before the last, which evaluates), every
round's time, the payload bytes each client
sends and receives per round (tensors; under SecAgg+ also the masked vectors, public keys and
encrypted key shares; HTTP/TLS/protobuf framing not counted), and the whole run's wall time.
Ratios are against the simulation row of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# tests/harness: the loopback federation
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fedrec.common.assets import Sources  # noqa: E402
from fedrec.common.config import load_config  # noqa: E402
from fedrec.common.rundir import read_jsonl  # noqa: E402
from fedrec.simulations.federated import simulate  # noqa: E402
from harness.loopback import TINY_RUN, Federation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "deploy.json"
log = logging.getLogger("bench")
USERS = 8  # per client, in every mode


def write_dataset(root: Path, users: int, items: int = 30) -> Path:
    """The tests' tiny generic-CSV data set (tests/conftest.py write_tiny_dataset)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["item_id,title,genres"] + [f"i{j},Movie {j} ({1980 + j}),Genre {j % 4}" for j in range(items)]
    (root / "items.csv").write_text("\n".join(lines) + "\n")
    inter = ["user_id,item_id,timestamp,rating"]
    inter += [f"u{u},i{(u * 3 + t * 5) % items},{1000 + t},{1 + (u + t) % 5}"
              for u in range(users) for t in range(6)]
    (root / "interactions.csv").write_text("\n".join(inter) + "\n")
    return root


def common(rounds: int) -> str:
    return f"{TINY_RUN} fed.rounds={rounds} fed.eval_every={rounds} prior.enabled=false"


def summarise(mode: str, run: Path, wall: float, rounds: int) -> dict[str, Any]:
    """Steady round time: rounds after the first (start-up) and before the last (evaluation)."""
    records = read_jsonl(run / "rounds.jsonl")
    steady = [r for r in records if 1 < r["round"] < rounds] or records
    return {
        "mode": mode, "rounds": len(records), "clients": 3,
        "round_seconds": round(statistics.mean(r["seconds"] for r in steady), 3),
        "round_seconds_each": [r["seconds"] for r in records],
        "bytes_up_per_client_round": round(statistics.mean(r["bytes_up_per_client"] for r in records)),
        "bytes_down_per_client_round": round(statistics.mean(r["bytes_down_per_client"] for r in records)),
        "clients_ok": [r["clients_ok"] for r in records], "wall_seconds": round(wall, 1),
    }


def run_simulation(tmp: Path, rounds: int) -> dict[str, Any]:
    data = write_dataset(tmp / "sim-data", users=3 * USERS)
    overrides = [x.replace("'", '"') for x in common(rounds).split()]
    # the simulated clients' budget is privacy.target_epsilon; the SuperNodes' is their settings (50)
    overrides += ["fed.clients=3", f'data.dataset="{data}"', "privacy.target_epsilon=50.0"]
    cfg = load_config(None, overrides)
    out = tmp / "sim-run"
    t0 = time.perf_counter()
    simulate(cfg, out, Sources(cache_dir=tmp / "cache", offline=True))
    return summarise("simulation", out, time.perf_counter() - t0, rounds)


def run_deployment(tmp: Path, rounds: int, secagg: bool) -> dict[str, Any]:
    mode = "deployment+secagg" if secagg else "deployment"
    fed = Federation(tmp / mode, ("a", "b", "c"), lambda p, n: write_dataset(p, n), users=[USERS] * 3)
    try:
        fed.start_superlink()
        fed.register()
        for name in ("a", "b", "c"):
            fed.start_supernode(name)
        run = tmp / f"{mode}-run"
        extra = f"fed.secagg=true fed.secagg_max_weight={float(USERS)}" if secagg else "fed.secagg=false"
        t0 = time.perf_counter()
        fed.submit(run, extra, base=common(rounds))
        fed.wait_for(run / "final" / "metrics.json", timeout=1800)
        return summarise(mode, run, time.perf_counter() - t0, rounds)
    finally:
        fed.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default="simulation,deployment,secagg")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["FEDREC_OFFLINE"] = "1"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedrec-deploy-bench-") as tmp:
        for mode in args.modes.split(","):
            log.info("mode %s", mode)
            if mode == "simulation":
                rows.append(run_simulation(Path(tmp), args.rounds))
            else:
                rows.append(run_deployment(Path(tmp), args.rounds, secagg=mode == "secagg"))
            log.info("%s", rows[-1])
    base = next((r for r in rows if r["mode"] == "simulation"), rows[0])
    for r in rows:
        r["round_time_vs_simulation"] = round(r["round_seconds"] / base["round_seconds"], 2)
        up = r["bytes_up_per_client_round"] / base["bytes_up_per_client_round"]
        r["bytes_up_vs_simulation"] = round(up, 2)
    load = os.getloadavg()
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
            "load_average_at_end": [round(x, 2) for x in load], "python": sys.version.split()[0],
            "note": "2 shared CPU cores (other engineers' jobs ran at the same time); tiny-random model, "
                    "3 clients x 8 users; loopback, TLS + node auth in both deployment rows",
            "rounds": args.rounds, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
