"""Centralized reference runs (no Flower): the yardstick that federated runs are compared with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.client.train import DPSettings, LocalTrainer, steps_for_epochs
from fedrec.common.assets import resolve_dataset
from fedrec.common.config import Config
from fedrec.common.data import Dataset, Split, leave_one_out, load_dataset, sample_users
from fedrec.common.errors import ConfigError
from fedrec.common.evaluation import (
    PRIOR_WEIGHTS,
    EvalUsers,
    eval_users,
    evaluate,
    llm_scores,
    popularity_counts,
    prior_scores,
)
from fedrec.common.lora import (
    adapter_state,
    attach_lora,
    frozen_layer_count,
    load_adapter,
    save_adapter,
    tensors_digest,
)
from fedrec.common.model import BaseModel, Recommender, item_vectors_cached, load_base_model, pick_device
from fedrec.common.privacy import (
    PrivacyAccountant,
    calibrate_noise,
    check_delta,
    default_delta,
    prior_noise,
    private_counts,
)
from fedrec.common.randomness import MechanismRandom, mechanism_random
from fedrec.common.rundir import RunDir, save_prior_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """Where assets come from; resolved at the CLI boundary."""

    cache_dir: Path
    offline: bool = False


@dataclass
class Context:
    cfg: Config
    sources: Sources
    run: RunDir
    dataset: Dataset
    split: Split
    users: list[str]  # users whose data trains (the privacy units)
    valid: EvalUsers
    test: EvalUsers
    delta: float
    base: BaseModel | None = None
    rec: Recommender | None = None
    init_adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    ledger_rounds: dict[str, int] = field(default_factory=dict)


# --- data ----------------------------------------------------------------------------------


def prepare(cfg: Config, sources: Sources, run: RunDir) -> Context:
    """Load and split the data set, sample users for a reduced scale, fix δ."""
    path = resolve_dataset(cfg.data.dataset, cache_dir=sources.cache_dir, offline=sources.offline)
    dataset = load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)
    split = leave_one_out(dataset)
    split = sample_users(split, cfg.data.max_users, cfg.train.seed)
    users = sorted(split.train)
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(len(users))
    check_delta(delta, len(users))
    log.info("data: %s, %d users, %d items", dataset.name, len(users), len(dataset.item_ids))
    return Context(
        cfg, sources, run, dataset, split, users,
        valid=eval_users(split, which="valid"), test=eval_users(split, which="test"), delta=delta,
    )


# --- methods -------------------------------------------------------------------------------


def run_popularity(ctx: Context) -> list[dict[str, Any]]:
    counts = popularity_counts(ctx.dataset, ctx.split)
    metrics = evaluate(None, ctx.test, prior=prior_scores(counts, 1.0), ks=ctx.cfg.eval.ks)
    return [_row(ctx, "popularity", metrics, epsilon=None, seconds=0.0)]


def dp_counts(ctx: Context, accountant: PrivacyAccountant, ledger: str) -> np.ndarray:
    """Popularity released under the Gaussian mechanism, recorded in `accountant` and the ledger."""
    p = ctx.cfg.prior
    sigma = prior_noise(target_epsilon=ctx.cfg.privacy.target_epsilon, delta=ctx.delta, share=p.budget_share,
                        fixed=p.noise_multiplier, accountant=ctx.cfg.privacy.accountant)
    rng = _random(ctx, "prior")
    contributions = [np.unique(np.asarray(ctx.split.train[u], dtype=np.int64)) for u in ctx.users]
    counts = private_counts(
        contributions, num_items=len(ctx.dataset.item_ids), clip_norm=p.clip_norm,
        noise_multiplier=sigma, rng=rng,
    )
    accountant.step(noise_multiplier=sigma, sample_rate=1.0, steps=1)
    _ledger(ctx, ledger, accountant, "prior-counts", sigma, 1.0, 1, p.clip_norm)
    return counts


def run_dp_popularity(ctx: Context) -> list[dict[str, Any]]:
    accountant = PrivacyAccountant(accountant=ctx.cfg.privacy.accountant)
    counts = dp_counts(ctx, accountant, "dp-popularity")
    metrics = evaluate(None, ctx.test, prior=prior_scores(counts, 1.0), ks=ctx.cfg.eval.ks)
    return [_row(ctx, "dp-popularity", metrics, epsilon=accountant.epsilon(ctx.delta), seconds=0.0)]


def run_zero_shot(ctx: Context) -> list[dict[str, Any]]:
    rec = _recommender(ctx)
    metrics = _llm_eval(ctx, rec, ctx.test, prior=None)
    return [_row(ctx, "zero-shot", metrics, epsilon=None, seconds=0.0)]


def run_central_lora(ctx: Context) -> list[dict[str, Any]]:
    rec = _recommender(ctx)
    trainer = _trainer(ctx, rec, dp=None, accountant=None)
    seconds = _train(ctx, trainer, "central-lora", accountant=None)
    counts = popularity_counts(ctx.dataset, ctx.split)
    return _fused_rows(ctx, rec, "central-lora", counts, epsilon=None, seconds=seconds)


def run_central_dp_lora(ctx: Context) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    accountant = PrivacyAccountant(accountant=cfg.privacy.accountant)
    counts = dp_counts(ctx, accountant, "central-dp-lora") if cfg.prior.enabled else None
    q = min(1.0, cfg.train.batch_size / len(ctx.users))
    steps = steps_for_epochs(cfg.train.epochs, q)
    sigma = calibrate_noise(
        target_epsilon=cfg.privacy.target_epsilon, delta=ctx.delta, sample_rate=q, steps=steps,
        prior=accountant.history, accountant=cfg.privacy.accountant,
    )
    log.info("DP-SGD: q=%.4f steps=%d σ=%.3f (ε target %.2f, δ=%.2e)", q, steps, sigma,
             cfg.privacy.target_epsilon, ctx.delta)
    rec = _recommender(ctx)
    dp = DPSettings(sigma, cfg.privacy.clip_norm, q, cfg.privacy.secure_rng)
    trainer = _trainer(ctx, rec, dp=dp, accountant=accountant)
    seconds = _train(ctx, trainer, "central-dp-lora", accountant=accountant, steps=steps)
    eps = accountant.epsilon(ctx.delta)
    return _fused_rows(ctx, rec, "central-dp-lora", counts, epsilon=eps, seconds=seconds)


METHODS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "popularity": run_popularity,
    "dp-popularity": run_dp_popularity,
    "zero-shot": run_zero_shot,
    "central-lora": run_central_lora,
    "central-dp-lora": run_central_dp_lora,
}


def run_central(cfg: Config, out: Path, sources: Sources) -> list[dict[str, Any]]:
    """Run every method in cfg.train.methods on one split; write the run directory; return rows."""
    if (out / "results.json").exists() or (out / "ledgers").exists():
        raise ConfigError(f"{out} already holds a run; choose another --output or remove it")
    run = RunDir(out)
    ctx = prepare(cfg, sources, run)
    rows: list[dict[str, Any]] = []
    for method in cfg.train.methods:
        log.info("method %s", method)
        rows.extend(METHODS[method](ctx))
        run.write_json("results.json", {"rows": rows})
    provenance = {"dataset": ctx.dataset.name, "users": len(ctx.users), "delta": ctx.delta}
    if ctx.base is not None:
        provenance |= {"model_source": ctx.base.source, "model_sha256": ctx.base.fingerprint}
    run.write_config(cfg, provenance)
    run.write_text("report.md", results_table(rows))
    return rows


# --- helpers -------------------------------------------------------------------------------


def _recommender(ctx: Context) -> Recommender:
    """The LoRA-adapted model, reset to its initial (zero-effect) adapter for each method."""
    if ctx.rec is None:
        cfg = ctx.cfg
        base = load_base_model(cfg.model, cache_dir=ctx.sources.cache_dir, offline=ctx.sources.offline)
        model = attach_lora(base.model, cfg.lora, seed=cfg.train.seed).to(pick_device(cfg.model.device))
        ctx.base = base
        ctx.rec = Recommender(
            model, base.tokenizer, max_item_tokens=cfg.model.max_item_tokens,
            max_history_tokens=cfg.model.max_history_tokens, temperature=cfg.train.temperature,
            frozen_layers=frozen_layer_count(base.model, cfg.lora),
        )
        ctx.init_adapter = adapter_state(model)
    load_adapter(ctx.rec.model, ctx.init_adapter, source="initial adapter")  # type: ignore[arg-type]
    return ctx.rec


def _trainer(
    ctx: Context, rec: Recommender, *, dp: DPSettings | None, accountant: PrivacyAccountant | None
) -> LocalTrainer:
    cfg = ctx.cfg
    return LocalTrainer(
        rec, item_titles=ctx.dataset.item_titles, item_texts=ctx.dataset.item_texts,
        sequences={u: ctx.split.train[u] for u in ctx.users}, lr=cfg.train.lr,
        batch_size=cfg.train.batch_size, max_history=cfg.data.max_history,
        negatives=cfg.train.negatives, seed=cfg.train.seed, dp=dp, accountant=accountant,
        rng=_random(ctx, "train"),
    )


def _train(
    ctx: Context, trainer: LocalTrainer, method: str, *, accountant: PrivacyAccountant | None,
    steps: int | None = None,
) -> float:
    """Train in one-epoch rounds, one rounds.jsonl line (and ledger line) each; returns seconds."""
    total = steps if steps is not None else steps_for_epochs(ctx.cfg.train.epochs, trainer.sample_rate)
    per_round = steps_for_epochs(1.0, trainer.sample_rate)
    start, done, rnd = time.perf_counter(), 0, 0
    while done < total:
        n = min(per_round, total - done)
        t0 = time.perf_counter()
        result = trainer.run(n, desc=f"{method} round {rnd + 1}")
        done, rnd = done + n, rnd + 1
        record: dict[str, Any] = {
            "round": rnd, "steps": n, "loss": result.mean_loss, "users": result.users_seen,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if accountant is not None and trainer.dp is not None:
            record["epsilon"] = accountant.epsilon(ctx.delta)
            _ledger(ctx, method, accountant, "dp-sgd", trainer.dp.noise_multiplier,
                    trainer.dp.sample_rate, n, trainer.dp.clip_norm)
        ctx.run.append_jsonl(f"{method}/rounds.jsonl", record)
        log.info("%s round %d: loss %.4f", method, rnd, result.mean_loss)
    seconds = time.perf_counter() - start
    tensors = adapter_state(trainer.rec.model)  # type: ignore[arg-type]
    save_adapter(ctx.run.root / method / "final" / "adapter.safetensors", tensors,
                 {"method": method, "base_model": ctx.base.fingerprint if ctx.base else ""})
    return seconds


def _random(ctx: Context, purpose: str) -> MechanismRandom:
    """Masks and noise from OS entropy; seeded only with train.deterministic (tests, benchmarks)."""
    return mechanism_random(deterministic=ctx.cfg.train.deterministic, seed=ctx.cfg.train.seed,
                            purpose=("central", purpose))


def _ledger(
    ctx: Context, name: str, accountant: PrivacyAccountant, mechanism: str, sigma: float,
    q: float, steps: int, clip: float,
) -> None:
    """One ledger line per mechanism release; ε is the accountant's after this release."""
    ctx.ledger_rounds[name] = ctx.ledger_rounds.get(name, 0) + 1
    record = {
        "round": ctx.ledger_rounds[name], "mechanism": mechanism, "noise_multiplier": sigma,
        "sample_rate": q, "steps": steps, "clip_norm": clip, "delta": ctx.delta,
        "epsilon": accountant.epsilon(ctx.delta), "accountant": ctx.cfg.privacy.accountant,
        "users": len(ctx.users), "rng": _random(ctx, "label").label,
    }
    ctx.run.append_jsonl(f"ledgers/{name}.jsonl", record)


def _llm_eval(
    ctx: Context, rec: Recommender, who: EvalUsers, *, prior: np.ndarray | None
) -> dict[str, float]:
    scores = _scores(ctx, rec, who)
    return evaluate(scores, who, prior=prior, ks=ctx.cfg.eval.ks)


def _scores(ctx: Context, rec: Recommender, who: EvalUsers) -> np.ndarray:
    assert ctx.base is not None
    digest = tensors_digest(adapter_state(rec.model))  # type: ignore[arg-type]
    items = item_vectors_cached(
        rec, ctx.dataset.item_texts, cache_dir=ctx.sources.cache_dir,
        model_fingerprint=ctx.base.fingerprint, adapter_digest=digest,
        batch_size=ctx.cfg.eval.batch_size,
    )
    return llm_scores(rec, items, who.histories, ctx.dataset.item_titles,
                      max_history=ctx.cfg.data.max_history, batch_size=ctx.cfg.eval.batch_size)


def _fused_rows(
    ctx: Context, rec: Recommender, method: str, counts: np.ndarray | None, *,
    epsilon: float | None, seconds: float,
) -> list[dict[str, Any]]:
    """Rows for the LLM alone and, when the prior is on, the fused score (the shipped design)."""
    scores = _scores(ctx, rec, ctx.test)
    alone = evaluate(scores, ctx.test, ks=ctx.cfg.eval.ks)
    ctx.run.write_json(f"{method}/final/metrics.json", {"test": alone})
    if counts is None or not ctx.cfg.prior.enabled:
        return [_row(ctx, method, alone, epsilon=epsilon, seconds=seconds)]
    beta = _prior_weight(ctx, rec, counts)
    fused = evaluate(scores, ctx.test, prior=prior_scores(counts, beta), ks=ctx.cfg.eval.ks)
    ctx.run.write_json(f"{method}/final/metrics.json",
                       {"test": fused, "test_llm_only": alone, "prior_weight": beta})
    # the counts the fused score used, so that `fedrec serve` ranks as this evaluation did
    save_prior_counts(ctx.run.root / method / "final", counts)
    return [
        _row(ctx, method, fused, epsilon=epsilon, seconds=seconds) | {"prior_weight": beta},
        _row(ctx, f"{method}-llm-only", alone, epsilon=epsilon, seconds=seconds),
    ]


def _prior_weight(ctx: Context, rec: Recommender, counts: np.ndarray) -> float:
    """β from the config, or the grid value with the best validation NDCG (first K).

    Choosing β on validation users is a data-dependent choice outside the ε guarantee, like
    any hyperparameter search; set prior.tune_weight = false to fix β in advance.
    """
    if not ctx.cfg.prior.tune_weight:
        return ctx.cfg.prior.weight
    scores = _scores(ctx, rec, ctx.valid)
    key = f"ndcg@{ctx.cfg.eval.ks[0]}"
    results = {b: evaluate(scores, ctx.valid, prior=prior_scores(counts, b), ks=ctx.cfg.eval.ks)[key]
               for b in PRIOR_WEIGHTS}
    best = max(PRIOR_WEIGHTS, key=lambda b: (results[b], -b))
    log.info("prior weight β=%s (validation %s by β: %s)", best, key,
             {b: round(v, 4) for b, v in results.items()})
    return best


def _row(
    ctx: Context, method: str, metrics: dict[str, float], *, epsilon: float | None, seconds: float
) -> dict[str, Any]:
    device = "cpu" if ctx.rec is None else str(ctx.rec.device)
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    return {
        "method": method, **{k: round(v, 5) for k, v in metrics.items()},
        "epsilon": None if epsilon is None else round(epsilon, 4),
        "delta": ctx.delta if epsilon is not None else None,
        "model": ctx.cfg.model.name if method not in ("popularity", "dp-popularity") else None,
        "dataset": ctx.dataset.name, "users": len(ctx.users), "device": device,
        "train_seconds": round(seconds, 1),
    }


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of result rows (what `fedrec train-central` prints)."""
    keys = [k for k in rows[0] if k.startswith(("hr@", "ndcg@", "mrr@"))] if rows else []
    lines = ["| method | " + " | ".join(keys) + " | ε | train s |",
             "|---" * (len(keys) + 3) + "|"]
    for r in rows:
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        vals = " | ".join(f"{r[k]:.4f}" for k in keys)
        lines.append(f"| {r['method']} | {vals} | {eps} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
