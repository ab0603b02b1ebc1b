"""Serving latency and throughput of `fedrec serve` (default model, loopback HTTP) -> results/serve.json.

Modes, each a separate `fedrec serve` process on the same machine, in the same run:
- `warm` (the shipped design, default flags): warm users ranked from the precomputed item vectors
  plus the private prior, micro-batching on;
- `warm_unbatched`: the same with `--no-batching`;
- `baseline_prompt_tower` (the design before: commit bdd362f, a 30-layer prompt per request with
  batching on, its default): run from a checkout of that commit (`--baseline-src`, made with
  `git worktree add DIR bdd362f`; the folder must be named `fedrec`).

The run directories are built here with untrained adapters and exact popularity / co-occurrence:
serving cost does not depend on what the adapter learned. This process only sends requests: a
bounded number per concurrency level (max(20, 3·c) per repetition), random histories of 3-10
items, the modes interleaved.

    python benchmarks/serve_bench.py [--baseline-src /tmp/basecode/fedrec] [--reps 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fedrec.common.assets import default_cache_dir, resolve_dataset
from fedrec.common.config import load_config
from fedrec.common.data import leave_one_out, load_dataset
from fedrec.common.lora import save_adapter
from fedrec.common.prior import exact_prior, save_prior
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import RunDir, atomic_write_json

CONCURRENCY = (1, 8, 32)


def make_run_dir(out: Path, cache: Path, device: str) -> tuple[Path, list[str]]:
    """A run directory with the default model's initial adapter; returns it and the item ids."""
    cfg = load_config(None, [f'model.device="{device}"', 'name="serve-bench"'])
    dataset = load_dataset(resolve_dataset(cfg.data.dataset, cache_dir=cache, offline=True))
    loaded = build_recommender(cfg, cache_dir=cache, offline=True)
    run = RunDir(out)
    run.write_config(cfg, {"engine": "serve benchmark: initial (untrained) adapter",
                           "model_sha256": loaded.base.fingerprint})
    save_adapter(out / "final" / "adapter.safetensors", loaded.initial_adapter,
                 {"run_id": "serve-bench", "rounds": "0", "variant": cfg.lora.variant})
    split = leave_one_out(dataset)
    save_prior(out / "final", exact_prior(list(split.train.values()), num_items=len(dataset.item_ids),
                                          head_size=cfg.prior.head_size))
    atomic_write_json(run.final().metrics, {"blend_weight": 1.0, "rounds": 0})
    return out, list(dataset.item_ids)


BASELINE_RUN = """
import sys, importlib.util
spec = importlib.util.spec_from_file_location("old_bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
from pathlib import Path
bench.make_run_dir(Path(sys.argv[2]), Path(sys.argv[3]), "cpu")
"""


def baseline_env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src.parent)}


def make_baseline_run(src: Path, out: Path, cache: Path) -> Path:
    """The old design's run directory, made by the old code itself."""
    subprocess.run([sys.executable, "-c", BASELINE_RUN, str(src / "benchmarks" / "serve_bench.py"), str(out),
                    str(cache)], env=baseline_env(src), check=True, stdout=subprocess.DEVNULL)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, cache: Path, *flags: str, env: dict[str, str] | None = None,
                 ) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "fedrec.cli", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--cache-dir", str(cache), "--offline", *flags]
    log = (run.parent / f"server-{port}.log").open("wb")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1200  # the first start encodes the catalogue (then cached)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(run.parent / f'server-{port}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[float], float]:
    """Send `bodies` with `concurrency` clients in flight; per-request seconds and the wall time."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            response = await http.post(f"{url}/recommend", json=body)
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1),
            "requests_per_s": round(len(latencies) / seconds, 2), "seconds": round(seconds, 2)}


def requests_for(item_ids: list[str], n: int, rng: random.Random) -> list[dict[str, Any]]:
    return [{"history": rng.sample(item_ids, rng.randint(3, 10)), "k": 10} for _ in range(n)]


# the load generator is one loopback address: the per-caller rate limit (20/s by default) is lifted
UNLIMITED = ["--rate", "1000000", "--burst", "1000000", "--max-queue", "4096"]
MODES = {  # name -> `fedrec serve` flags, concurrency levels, baseline code?
    "warm": (UNLIMITED, CONCURRENCY, False),
    "warm_unbatched": (["--no-batching", *UNLIMITED], CONCURRENCY, False),
    "baseline_prompt_tower": ([], CONCURRENCY, True),
}
DEFAULT_MODE, BASELINE_MODE = "warm", "baseline_prompt_tower"


def run_all(runs: dict[bool, Path], cache: Path, item_ids: list[str], per_client: int, reps: int,
            baseline_src: Path) -> dict[str, Any]:
    """All servers up at once; every (concurrency, repetition) runs each mode back to back, in
    alternating order, so that load from elsewhere on the machine hits the modes alike."""
    servers = {name: start_server(runs[old], cache, *flags, env=baseline_env(baseline_src) if old else None)
               for name, (flags, _, old) in MODES.items()}
    try:
        rng = random.Random(0)
        for _, url in servers.values():
            asyncio.run(load(url, requests_for(item_ids, 4, rng), 1))  # warm-up
        raw: dict[str, dict[int, tuple[list[float], float]]] = {name: {} for name in MODES}
        for rep in range(reps):
            for c in CONCURRENCY:
                bodies = requests_for(item_ids, max(20, per_client * c), rng)
                names = [n for n in MODES if c in MODES[n][1]]
                for name in names if rep % 2 == 0 else names[::-1]:
                    lat, wall = asyncio.run(load(servers[name][1], bodies, c))
                    seen, total = raw[name].get(c, ([], 0.0))
                    raw[name][c] = (seen + lat, total + wall)
                    print(f"rep {rep} {name} c={c}: {summary(lat, wall)}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return {name: {str(c): summary(*v) for c, v in per_c.items()} for name, per_c in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--baseline-src", type=Path, default=Path("/tmp/basecode/fedrec"))
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = parser.parse_args()
    cache = default_cache_dir()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run, item_ids = make_run_dir(Path(tmp) / "run", cache, args.device)
        old = make_baseline_run(args.baseline_src, Path(tmp) / "baseline" / "run", cache)
        modes = run_all({False: run, True: old}, cache, item_ids, args.requests_per_client, args.reps,
                        args.baseline_src)
    ratio = {c: round(modes[DEFAULT_MODE][c]["requests_per_s"] / modes[BASELINE_MODE][c]["requests_per_s"], 2)
             for c in map(str, CONCURRENCY)}
    batching = {c: round(modes["warm"][c]["requests_per_s"] / modes["warm_unbatched"][c]["requests_per_s"], 2)
                for c in map(str, CONCURRENCY)}
    result = {
        "benchmark": "serve", "model": "smollm2-135m-instruct (float32)", "adapter": "initial, untrained",
        "dataset": "ml-100k (1682 items)",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "history_items": "3-10 random", "k": 10, "repetitions": args.reps,
        "default_mode": DEFAULT_MODE, "baseline_mode": BASELINE_MODE,
        "baseline": "commit bdd362f: user tower = the LM over the history as a text prompt, per request",
        "modes": modes, "default_over_baseline_requests_per_s": ratio,
        "batched_over_unbatched_requests_per_s": batching,
        "targets": {"p99_ms_c1_at_most_50": modes[DEFAULT_MODE]["1"]["p99_ms"] <= 50,
                    "5x_baseline_requests_per_s_at_c32": ratio["32"] >= 5.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratio": ratio, "targets": result["targets"]}, indent=2))


if __name__ == "__main__":
    main()
