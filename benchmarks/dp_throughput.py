"""DP-SGD vs plain training throughput (users/s, same batch, same machine) and peak memory.

Each mode runs in its own subprocess so that peak memory (max RSS, and CUDA peak when on GPU)
belongs to that mode alone. Writes benchmarks/results/dp_throughput.json.

    python benchmarks/dp_throughput.py [--batch 8] [--steps 3] [--model smollm2-135m-instruct]
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


def measure(mode: str, model_name: str, batch: int, steps: int) -> dict:
    import numpy as np
    import torch
    from fedrec.client.train import DPSettings, LocalTrainer
    from fedrec.common.assets import default_cache_dir
    from fedrec.common.config import LoraConfig, ModelConfig
    from fedrec.common.lora import attach_lora, frozen_layer_count
    from fedrec.common.model import Recommender, load_base_model, pick_device
    from fedrec.common.privacy import PrivacyAccountant

    base = load_base_model(ModelConfig(name=model_name), cache_dir=default_cache_dir())
    device = pick_device("auto")
    lora = LoraConfig()
    model = attach_lora(base.model, lora).to(device)
    rec = Recommender(model, base.tokenizer, max_item_tokens=32, max_history_tokens=256, temperature=0.05,
                      frozen_layers=frozen_layer_count(base.model, lora))
    titles = [f"Movie number {i} ({1950 + i % 50})" for i in range(500)]
    texts = [f"{t} | Drama, Comedy" for t in titles]
    rng = np.random.default_rng(0)
    seqs = {f"u{i}": rng.choice(500, size=12, replace=False).tolist() for i in range(batch)}
    dp = DPSettings(1.0, 1.0, 1.0) if mode == "dp" else None
    trainer = LocalTrainer(rec, item_titles=titles, item_texts=texts, sequences=seqs, lr=1e-3,
                           batch_size=batch, max_history=10, negatives=15, seed=0, dp=dp,
                           accountant=PrivacyAccountant() if dp else None)
    examples = trainer.examples_for(sorted(seqs))
    trainer.step(examples)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(trainer.examples_for(sorted(seqs)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    out = {
        "mode": mode, "users_per_second": batch * steps / seconds, "seconds_per_step": seconds / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu,
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--child", choices=["plain", "dp"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.steps)))
        return
    rows = []
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch),
               "--steps", str(args.steps), "--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain, dp = rows
    result = {
        "model": args.model, "batch_users": args.batch, "steps": args.steps, "rows": rows,
        "dp_over_plain_throughput": dp["users_per_second"] / plain["users_per_second"],
        "dp_over_plain_peak_rss": dp["peak_rss_mib"] / plain["peak_rss_mib"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
