"""Cold-start benchmark on MovieLens-100K: ranking the held-out "new arrivals" -> results/cold.json.

    python benchmarks/cold.py [--methods random content ...] [--seeds 0 1 2] [--fraction 0.1]

Protocol (common/cold.py): per-user chronological leave-one-out; a seeded 10 % of the catalogue is
held out of every training input; the users whose test item is held out rank the held-out items
only (the shelf), from their visible history (training items + valid item, held-out ones removed);
held-out items they consumed earlier are excluded from their ranking; ties pessimistic. Every
method runs on 3 cold splits (seeds 0, 1, 2): a row is the mean over splits and `*_sd` the sample
standard deviation across them; a method with noise (random) averages `repeats` noise seeds
within each split first; `chance_level` is the exact expectation of a random ranking.
`cold_user_rows` repeat the shelf with each history cut to its last 2 items (a simulated new
user). Rows of methods not run this time are kept, so the LLM rows can be added by a later run
with `--methods zero-shot ...`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fedrec.common.assets import default_cache_dir, resolve_dataset
from fedrec.common.cold import (
    ColdSplit,
    Scorer,
    chance_metrics,
    cold_item_split,
    cold_users,
    content_scores,
    random_scores,
    shelf_metrics,
)
from fedrec.common.data import Dataset, leave_one_out, load_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "cold.json"
DATASET = "ml-100k"
KS = (10,)
METRICS = ("hr@10", "ndcg@10", "mrr@10")
COLD_USER_HISTORY = 2


@dataclass(frozen=True)
class Method:
    """A named way to build a shelf scorer from one cold split, and what its row reports."""

    name: str
    # (dataset, cold split, noise seed) -> scorer. Anything trained must read cold.as_split() only.
    make_scorer: Callable[[Dataset, ColdSplit, int], Scorer]
    repeats: int = 1  # noise seeds averaged within each cold split
    epsilon: float | None = None
    delta: float | None = None
    model: str | None = None
    device: str = "cpu"


# --- baselines -----------------------------------------------------------------------------


def _random(dataset: Dataset, cold: ColdSplit, seed: int) -> Scorer:
    return partial(random_scores, seed=seed)


def _content(dataset: Dataset, cold: ColdSplit, seed: int) -> Scorer:
    return partial(content_scores, dataset)


BASELINES = (Method("random", _random, repeats=3), Method("content", _content))


# === EXTENSION POINT: LLM scorers =========================================================
# Add a Method per LLM row ("zero-shot", "central-lora", "central-dp-lora") to LLM_METHODS.
# Its make_scorer(dataset, cold, seed) trains on cold.as_split() (never on dataset.histories: they
# hold the held-out items; cold.hide(dataset) where code reads them) with the training softmax /
# negatives over cold.known_items only (a new arrival did not exist at training time), encodes
# the public item text of the whole catalogue (a new arrival has text, not interactions), returns
#     scorer(histories: list[tuple[int, ...]], shelf: np.ndarray) -> np.ndarray (U, len(shelf))
# scoring each user from that history alone. Its time is the row's train_seconds; seed is the noise
# seed (repeats > 1 averages several); set epsilon / delta / model / device on the Method.
EPSILON = 8.0
_LOADED: dict[str, Any] = {}


def _encoder_and_catalogue(dataset: Dataset) -> tuple[Any, Any, Any]:
    """The default model's item encoder (reset to its initial adapter) and the cached catalogue."""
    from fedrec.common.catalogue import catalogue_cached
    from fedrec.common.config import Config
    from fedrec.common.lora import load_adapter
    from fedrec.common.recommender import build_recommender

    if "loaded" not in _LOADED:
        cfg = Config()
        loaded = build_recommender(cfg, cache_dir=default_cache_dir())
        _LOADED["loaded"], _LOADED["cfg"] = loaded, cfg
        _LOADED["catalogue"] = catalogue_cached(loaded.encoder, dataset.item_texts,
                                                cache_dir=default_cache_dir(),
                                                model_fingerprint=loaded.base.fingerprint)
    loaded = _LOADED["loaded"]
    load_adapter(loaded.model, loaded.initial_adapter, source="initial adapter")
    return loaded, _LOADED["catalogue"], _LOADED["cfg"]


def _shelf_scorer(loaded: Any, catalogue: Any, window: int) -> Scorer:
    """Cosine of the pooled history with each shelf item's (text-only) vector."""
    from fedrec.common.evaluation import catalogue_vectors, llm_scores

    vectors = catalogue_vectors(loaded.encoder, catalogue)
    return lambda histories, shelf: llm_scores(vectors, histories, window=window)[:, shelf]


def _zero_shot(dataset: Dataset, cold: ColdSplit, seed: int) -> Scorer:
    loaded, catalogue, cfg = _encoder_and_catalogue(dataset)
    return _shelf_scorer(loaded, catalogue, cfg.data.max_history)


def _trained(dataset: Dataset, cold: ColdSplit, seed: int, *, private: bool) -> Scorer:
    """The item encoder trained on the cold split's training sequences only, the held-out items
    never in a softmax; under DP at ε = EPSILON with the shipped plan (q = 1, dp_epochs steps)."""
    from fedrec.client.train import DPSettings, LocalTrainer, objective, steps_for_epochs
    from fedrec.common.privacy.party import Party

    loaded, catalogue, cfg = _encoder_and_catalogue(dataset)
    train = cold.as_split().train
    sequences = {u: s for u, s in train.items() if len(s) >= 2}
    dp, accountant = None, None
    if private:  # one central party over the training users, its whole budget on DP-SGD
        party = Party(name="central-dp-lora", users=len(train), budget=EPSILON)
        steps = steps_for_epochs(cfg.train.dp_epochs, cfg.train.sample_rate)
        sigma = party.sgd_sigma(sample_rate=cfg.train.sample_rate, steps=steps)
        dp = DPSettings(sigma, cfg.privacy.clip_norm, cfg.train.sample_rate, normaliser=cfg.train.batch_size)
        accountant = party.accountant
    trainer = LocalTrainer(loaded.encoder, catalogue, sequences,
                           lr=cfg.train.dp_lr if private else cfg.train.lr,
                           batch_size=cfg.train.batch_size, objective=objective(cfg), dp=dp,
                           accountant=accountant,
                           seed=None if private else seed, blocked_items=cold.held_out.tolist())
    steps = steps_for_epochs(cfg.train.dp_epochs, cfg.train.sample_rate) if private else \
        steps_for_epochs(cfg.train.epochs, trainer.sample_rate)
    trainer.run(steps, progress=False)
    return _shelf_scorer(loaded, catalogue, cfg.data.max_history)


LLM_METHODS: tuple[Method, ...] = (
    Method("zero-shot", _zero_shot, model="smollm2-135m-instruct"),
    Method("central-lora", partial(_trained, private=False), model="smollm2-135m-instruct"),
    Method("central-dp-lora", partial(_trained, private=True), epsilon=EPSILON,
           model="smollm2-135m-instruct"),
)
# ==========================================================================================


def evaluate_scorer(scorer: Scorer, cold: ColdSplit) -> dict[str, float]:
    """Shelf metrics of `scorer` for `cold`'s evaluation users."""
    scores = scorer(list(cold.evaluation.histories), cold.held_out)  # (U, S)
    return shelf_metrics(scores, cold, ks=KS)


def run_method(method: Method, dataset: Dataset, colds: Sequence[ColdSplit]) -> tuple[dict, dict]:
    """The method's shelf row and cold-user row over the cold splits."""
    main: list[dict[str, float]] = []
    short: list[dict[str, float]] = []
    seconds: list[float] = []
    for cold in colds:
        reps, reps_short = [], []
        for r in range(method.repeats):
            start = time.perf_counter()
            scorer = method.make_scorer(dataset, cold, 1000 * cold.seed + r)
            seconds.append(time.perf_counter() - start)
            reps.append(evaluate_scorer(scorer, cold))
            reps_short.append(evaluate_scorer(scorer, cold_users(cold, max_history=COLD_USER_HISTORY)))
        main.append(_mean(reps))
        short.append(_mean(reps_short))
    return _row(method, main, colds, seconds), _row(method, short, colds, seconds)


def _mean(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in runs])) for k in METRICS}


def _row(method: Method, per_split: Sequence[dict[str, float]], colds: Sequence[ColdSplit],
         seconds: Sequence[float]) -> dict[str, Any]:
    users = [len(c.evaluation.user_ids) for c in colds]
    row: dict[str, Any] = {"method": method.name}
    for k in METRICS:
        values = [m[k] for m in per_split]
        row[k] = round(float(np.mean(values)), 5)
        row[f"{k}_sd"] = round(float(np.std(values, ddof=1)), 5) if len(values) > 1 else None
    row.update({
        "ndcg@10_per_split": [round(m["ndcg@10"], 5) for m in per_split],
        "users": round(float(np.mean(users))), "users_per_split": users, "seeds": [c.seed for c in colds],
        "repeats": method.repeats, "shelf_items": int(colds[0].held_out.size), "dataset": DATASET,
        "device": method.device, "epsilon": method.epsilon, "delta": method.delta, "model": method.model,
        "train_seconds": round(float(np.mean(seconds)), 2),
    })
    return row


# --- main ----------------------------------------------------------------------------------


def save(rows: list[dict], user_rows: list[dict], meta: dict[str, Any]) -> None:
    """Write rows into results/cold.json, keeping those of methods not run this time."""
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc.update(meta)
    for key, new in (("rows", rows), ("cold_user_rows", user_rows)):
        names = {r["method"] for r in new}
        doc[key] = [r for r in doc.get(key, []) if r["method"] not in names] + new
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    methods = {m.name: m for m in (*BASELINES, *LLM_METHODS)}
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", choices=sorted(methods), default=list(methods))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.1)
    args = parser.parse_args()
    dataset = load_dataset(resolve_dataset(DATASET, cache_dir=default_cache_dir()))
    split = leave_one_out(dataset)
    colds = [cold_item_split(dataset, split, fraction=args.fraction, seed=s) for s in args.seeds]
    rows, user_rows = map(list, zip(*(run_method(methods[n], dataset, colds) for n in args.methods),
                                    strict=True))
    chance = _mean([chance_metrics(c, ks=KS) for c in colds])
    meta = {
        "protocol": __doc__.split("\n\n")[2].replace("\n", " ") if __doc__ else "",
        "fraction": args.fraction, "cold_user_history": COLD_USER_HISTORY,
        "chance_level": {k: round(v, 5) for k, v in chance.items()},  # exact expected random metrics
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }
    if RESULTS.exists() and args.seeds != [0, 1, 2]:  # keep the chance level of the full run of splits
        meta.pop("chance_level")
    save(rows, user_rows, meta)
    print(json.dumps({"rows": rows, "cold_user_rows": user_rows}, indent=2))


if __name__ == "__main__":
    main()
