"""DP-SGD vs plain training throughput (users/s, same batch, same machine) and peak memory.

Three modes on the default model's item encoder over the real MovieLens catalogue (cached):
`plain` (one backward of the batch's mean loss), `dp` (per-user gradients in one vectorised pass,
Opacus clipping and noise: what fedrec runs) and `dp-loop` (one backward per user, the way before).
Each mode runs in its own subprocess so that its peak memory is its own. Writes
benchmarks/results/dp_throughput.json.

    python benchmarks/dp_throughput.py [--batch 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "dp_throughput.json"
MODES = ("plain", "dp", "dp-loop")


def measure(mode: str, batch: int, steps: int) -> dict:
    import torch
    from fedrec.client.train import DPSettings, LocalTrainer, objective, per_user_gradients, user_losses
    from fedrec.common.assets import default_cache_dir, resolve_dataset
    from fedrec.common.catalogue import catalogue_cached
    from fedrec.common.config import Config
    from fedrec.common.data import leave_one_out, load_dataset
    from fedrec.common.privacy.accountant import PrivacyAccountant
    from fedrec.common.recommender import build_recommender

    cfg = Config()
    cache = default_cache_dir()
    dataset = load_dataset(resolve_dataset(cfg.data.dataset, cache_dir=cache))
    split = leave_one_out(dataset)
    loaded = build_recommender(cfg, cache_dir=cache)
    catalogue = catalogue_cached(loaded.encoder, dataset.item_texts, cache_dir=cache,
                                 model_fingerprint=loaded.base.fingerprint)
    users = sorted(split.train)[:batch]
    dp = DPSettings(1.0, cfg.privacy.clip_norm, 1.0, normaliser=batch) if mode != "plain" else None
    trainer = LocalTrainer(loaded.encoder, catalogue, {u: split.train[u] for u in users}, lr=1e-3,
                           batch_size=batch, objective=objective(cfg), dp=dp,
                           accountant=PrivacyAccountant() if dp else None, seed=0)
    if mode == "dp-loop":  # the per-user loop, for the ratio: same clipping and noise after it
        def loop(rows, items):  # type: ignore[no-untyped-def]
            grads = {k: [] for k in trainer.params}
            for r in rows.tolist():
                loss = user_losses(trainer.encoder, trainer.params, trainer.seqs[r : r + 1], None, items,
                                   objective=trainer.objective)[0]
                for k, g in zip(trainer.params, torch.autograd.grad(loss, list(trainer.params.values())),
                                strict=True):
                    grads[k].append(g)
            return {k: torch.stack(v) for k, v in grads.items()}, 0.0
        trainer._dp_grads = loop  # type: ignore[method-assign]
    assert per_user_gradients is not None
    rows = torch.arange(len(trainer.users))
    trainer.step(rows)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(rows)
    seconds = time.perf_counter() - start
    return {
        "mode": mode, "users_per_second": len(rows) * steps / seconds, "seconds_per_step": seconds / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.steps)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--steps",
               str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain, dp, loop = rows
    result = {
        "model": "smollm2-135m-instruct", "objective": "all-position, full softmax over 1682 items",
        "batch_users": args.batch, "steps": args.steps, "rows": rows,
        "dp_over_plain_throughput": dp["users_per_second"] / plain["users_per_second"],
        "vectorised_over_loop_throughput": dp["users_per_second"] / loop["users_per_second"],
        "dp_over_plain_peak_rss": dp["peak_rss_mib"] / plain["peak_rss_mib"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
