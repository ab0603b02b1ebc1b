"""The CF scorer's shrinkage against the release's noise, on validation users -> results/cf_shrink.json.

    python benchmarks/cf_shrink.py [--draws 3]

For each privacy level (central ε = 8, 4, 1; 3 parties each at ε = 8, their releases summed) and
each noise draw, the popularity and co-occurrence releases are made as `fedrec train-central`'s
`dp-cooccurrence` makes them (the whole ε, numpy's generator seeded per draw: a measurement, not a
release), and the validation NDCG@10 of the CF score is taken for fixed shrinkages and for the
shipped rule max(5, NOISE_SHRINK·s). Only validation users: the rule was chosen here, and the test
numbers are in central.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np
from fedrec.common.assets import default_cache_dir, resolve_dataset
from fedrec.common.config import Config
from fedrec.common.data import leave_one_out, load_dataset
from fedrec.common.evaluation import eval_users, evaluate
from fedrec.common.prior import (
    NOISE_SHRINK,
    CollaborativePrior,
    head_items,
    noisy_cooccurrence,
    noisy_popularity,
    user_items,
)
from fedrec.common.privacy.party import Party

RESULTS = Path(__file__).resolve().parent / "results" / "cf_shrink.json"
FIXED = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
LEVELS = ((8.0, 1), (4.0, 1), (1.0, 1), (8.0, 3))  # (ε of each party, parties)


def release(contributions: list[np.ndarray], *, num_items: int, party: Party, parties: int, head_size: int,
            rng: np.random.Generator) -> CollaborativePrior:
    """`parties` parties, each with `party`'s plan (its ε, and δ for all users), release and sum."""
    plan = party.prior_plan(share=1.0, popularity_share=0.3, cooccurrence=True)
    assert plan.cooccurrence_sigma is not None
    groups = np.array_split(np.arange(len(contributions)), parties)
    pop = sum(noisy_popularity([contributions[i] for i in g], num_items=num_items, clip=1.0,
                               noise_multiplier=plan.popularity_sigma, rng=rng) for g in groups)
    head = head_items(np.asarray(pop), head_size)
    co = sum(noisy_cooccurrence([contributions[i] for i in g], head=head, clip=1.0,
                                noise_multiplier=plan.cooccurrence_sigma, rng=rng) for g in groups)
    noise_std = plan.cooccurrence_sigma * math.sqrt(parties)  # independent Gaussians: variances add
    return CollaborativePrior(np.asarray(pop), head, np.asarray(co), noise_std)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    cfg = Config()
    path = resolve_dataset(cfg.data.dataset, cache_dir=default_cache_dir(), offline=False)
    dataset = load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)
    split = leave_one_out(dataset)
    users = sorted(split.train)
    num_items = len(dataset.item_ids)
    contributions = user_items([tuple(split.train[u]) for u in users], num_items=num_items)
    valid = eval_users(split, which="valid")
    rows = []
    for epsilon, parties in LEVELS:
        party = Party(name=f"ε={epsilon:g}", users=len(users), budget=epsilon)  # δ = default_delta(users)
        scores: dict[str, list[float]] = {}
        noise = 0.0
        for draw in range(args.draws):
            prior = release(contributions, num_items=num_items, party=party, parties=parties,
                            head_size=cfg.prior.head_size, rng=np.random.default_rng(draw))
            noise = prior.noise_std
            flat = CollaborativePrior(prior.popularity, prior.head, prior.cooccurrence)  # fixed shrink only
            for shrink in FIXED:
                s = flat.scores(valid.histories, beta=cfg.prior.beta, shrink=shrink)
                scores.setdefault(f"{shrink:g}", []).append(evaluate(s, valid)["ndcg@10"])
            s = prior.scores(valid.histories, beta=cfg.prior.beta, shrink=cfg.prior.shrink)
            scores.setdefault("rule", []).append(evaluate(s, valid)["ndcg@10"])
        row = {"epsilon": epsilon, "parties": parties, "noise_std": round(noise, 4),
               "rule_shrink": round(max(cfg.prior.shrink, NOISE_SHRINK * noise), 2),
               "valid_ndcg@10": {k: round(float(np.mean(v)), 5) for k, v in scores.items()},
               "valid_ndcg@10_sd": {k: round(float(np.std(v, ddof=1)), 5) if len(v) > 1 else 0.0
                                    for k, v in scores.items()}}
        rows.append(row)
        print(json.dumps(row))
    RESULTS.write_text(json.dumps({"protocol": "MovieLens-100K, all 943 users, validation (second-to-last "
                                   "item), full-catalogue ranking", "draws": args.draws,
                                   "machine": f"{platform.machine()} {platform.processor()}".strip(),
                                   "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
