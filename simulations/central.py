"""Centralized reference runs (no Flower): the yardstick that federated runs are compared with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fedrec.client.train import (
    DPSettings,
    LocalTrainer,
    objective,
    residual_cf,
    steps_for_epochs,
)
from fedrec.common.assets import Sources, resolve_dataset
from fedrec.common.catalogue import Catalogue, catalogue_cached
from fedrec.common.config import Config
from fedrec.common.data import Dataset, Split, leave_one_out, load_dataset, sample_users
from fedrec.common.errors import ConfigError
from fedrec.common.evaluation import (
    BLEND_WEIGHTS,
    CFSettings,
    EvalUsers,
    blend,
    catalogue_vectors,
    cf_scores,
    choose_weight,
    eval_users,
    evaluate,
    llm_scores,
)
from fedrec.common.lora import adapter_state, load_adapter, save_adapter
from fedrec.common.prior import (
    MECHANISM_COOCCURRENCE,
    MECHANISM_POPULARITY,
    CollaborativePrior,
    exact_prior,
    plan_releases,
    private_prior,
    save_prior,
)
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.analysis import calibrate_noise, check_delta, default_delta
from fedrec.common.privacy.mechanisms import MechanismRandom, mechanism_random
from fedrec.common.recommender import Loaded, build_recommender
from fedrec.common.rundir import RunDir

log = logging.getLogger(__name__)


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
    loaded: Loaded | None = None
    catalogue: Catalogue | None = None
    ledger_rounds: dict[str, int] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.dataset.item_ids)

    @property
    def histories(self) -> list[tuple[int, ...]]:
        return [tuple(self.split.train[u]) for u in self.users]

    @property
    def cf(self) -> CFSettings:
        return CFSettings(beta=self.cfg.prior.beta, shrink=self.cfg.prior.shrink)


# --- data ----------------------------------------------------------------------------------


def prepare(cfg: Config, sources: Sources, run: RunDir) -> Context:
    """Load and split the data set (optionally sample users), fix δ."""
    path = resolve_dataset(cfg.data.dataset, cache_dir=sources.cache_dir, offline=sources.offline)
    dataset = load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)
    split = sample_users(leave_one_out(dataset), cfg.data.max_users, cfg.train.seed)
    users = sorted(split.train)
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(len(users))
    check_delta(delta, len(users))
    log.info("data: %s, %d users, %d items", dataset.name, len(users), len(dataset.item_ids))
    return Context(
        cfg, sources, run, dataset, split, users,
        valid=eval_users(split, which="valid"), test=eval_users(split, which="test"), delta=delta,
    )


# --- the collaborative methods -------------------------------------------------------------


def run_popularity(ctx: Context) -> list[dict[str, Any]]:
    prior = exact_prior(ctx.histories, num_items=ctx.num_items, head_size=0)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    return [_row(ctx, "popularity", metrics, epsilon=None, seconds=0.0)]


def run_dp_popularity(ctx: Context) -> list[dict[str, Any]]:
    accountant = PrivacyAccountant(accountant=ctx.cfg.privacy.accountant)
    prior = release_prior(ctx, accountant, "dp-popularity", share=1.0, cooccurrence=False)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    return [_row(ctx, "dp-popularity", metrics, epsilon=accountant.epsilon(ctx.delta), seconds=0.0)]


def run_itemknn(ctx: Context) -> list[dict[str, Any]]:
    """Non-private item-kNN: exact co-occurrence over the whole catalogue, the same scorer."""
    prior = exact_prior(ctx.histories, num_items=ctx.num_items, head_size=ctx.num_items,
                        clip=ctx.cfg.prior.clip_norm)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    return [_row(ctx, "itemknn", metrics, epsilon=None, seconds=0.0)]


def run_dp_cooccurrence(ctx: Context) -> list[dict[str, Any]]:
    """CF only: popularity and co-occurrence released with the whole ε."""
    accountant = PrivacyAccountant(accountant=ctx.cfg.privacy.accountant)
    t0 = time.perf_counter()
    prior = release_prior(ctx, accountant, "dp-cooccurrence", share=1.0, cooccurrence=True)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    save_prior(ctx.run.root / "dp-cooccurrence" / "final", prior)
    return [_row(ctx, "dp-cooccurrence", metrics, epsilon=accountant.epsilon(ctx.delta),
                 seconds=time.perf_counter() - t0)]


def release_prior(ctx: Context, accountant: PrivacyAccountant, ledger: str, *, share: float,
                  cooccurrence: bool) -> CollaborativePrior:
    """The private releases, recorded in `accountant` and the ledger (noise from OS entropy)."""
    p = ctx.cfg.prior
    plan = plan_releases(epsilon=ctx.cfg.privacy.target_epsilon, delta=ctx.delta, share=share,
                         popularity_share=p.popularity_share, cooccurrence=cooccurrence,
                         accountant=ctx.cfg.privacy.accountant, fixed_sigma=p.noise_multiplier)
    rng = _random(ctx, "prior")
    prior = private_prior(ctx.histories, num_items=ctx.num_items, plan=plan, head_size=p.head_size,
                          clip=p.clip_norm, rng=rng)
    for step, mechanism in zip(plan.steps, (MECHANISM_POPULARITY, MECHANISM_COOCCURRENCE), strict=False):
        accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=1.0, steps=1)
        _ledger(ctx, ledger, accountant, mechanism, step.noise_multiplier, 1.0, 1, p.clip_norm)
    return prior


# --- the LLM methods -----------------------------------------------------------------------


def run_zero_shot(ctx: Context) -> list[dict[str, Any]]:
    loaded = _recommender(ctx)
    vectors = catalogue_vectors(loaded.encoder, _catalogue(ctx))
    metrics = evaluate(llm_scores(vectors, ctx.test.histories, window=ctx.cfg.data.max_history), ctx.test,
                       ks=ctx.cfg.eval.ks)
    return [_row(ctx, "zero-shot", metrics, epsilon=None, seconds=0.0)]


def run_central_lora(ctx: Context) -> list[dict[str, Any]]:
    loaded = _recommender(ctx)
    prior = exact_prior(ctx.histories, num_items=ctx.num_items, head_size=ctx.cfg.prior.head_size,
                        clip=ctx.cfg.prior.clip_norm) if ctx.cfg.prior.enabled else None
    trainer = _trainer(ctx, loaded, prior, dp=None, accountant=None)
    seconds = _train(ctx, trainer, "central-lora", accountant=None,
                     steps=steps_for_epochs(ctx.cfg.train.epochs, trainer.sample_rate))
    return _fused_rows(ctx, "central-lora", prior, epsilon=None, seconds=seconds)


def run_central_dp_lora(ctx: Context) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    accountant = PrivacyAccountant(accountant=cfg.privacy.accountant)
    prior = None
    if cfg.prior.enabled:
        prior = release_prior(ctx, accountant, "central-dp-lora", share=cfg.prior.budget_share,
                              cooccurrence=cfg.prior.cooccurrence)
    q = cfg.train.sample_rate
    steps = steps_for_epochs(cfg.train.dp_epochs, q)
    sigma = calibrate_noise(
        target_epsilon=cfg.privacy.target_epsilon, delta=ctx.delta, sample_rate=q, steps=steps,
        prior=accountant.history, accountant=cfg.privacy.accountant,
    )
    log.info("DP-SGD: q=%.4f steps=%d σ=%.3f (ε target %.2f, δ=%.2e)", q, steps, sigma,
             cfg.privacy.target_epsilon, ctx.delta)
    loaded = _recommender(ctx)
    dp = DPSettings(sigma, cfg.privacy.clip_norm, q, normaliser=cfg.train.batch_size,
                    secure_rng=cfg.privacy.secure_rng)
    trainer = _trainer(ctx, loaded, prior, dp=dp, accountant=accountant)
    seconds = _train(ctx, trainer, "central-dp-lora", accountant=accountant, steps=steps)
    return _fused_rows(ctx, "central-dp-lora", prior, epsilon=accountant.epsilon(ctx.delta), seconds=seconds)


METHODS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "popularity": run_popularity,
    "dp-popularity": run_dp_popularity,
    "itemknn": run_itemknn,
    "dp-cooccurrence": run_dp_cooccurrence,
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
    if ctx.loaded is not None:
        provenance |= {"model_source": ctx.loaded.base.source, "model_sha256": ctx.loaded.base.fingerprint}
    run.write_config(cfg, provenance)
    run.write_text("report.md", results_table(rows))
    return rows


# --- helpers -------------------------------------------------------------------------------


def _recommender(ctx: Context) -> Loaded:
    """The LoRA-adapted encoder, reset to its initial (zero-effect) adapter for each method."""
    if ctx.loaded is None:
        ctx.loaded = build_recommender(ctx.cfg, cache_dir=ctx.sources.cache_dir, offline=ctx.sources.offline)
    load_adapter(ctx.loaded.model, ctx.loaded.initial_adapter, source="initial adapter")
    return ctx.loaded


def _catalogue(ctx: Context) -> Catalogue:
    if ctx.catalogue is None:
        loaded = _recommender(ctx)
        ctx.catalogue = catalogue_cached(loaded.encoder, ctx.dataset.item_texts,
                                         cache_dir=ctx.sources.cache_dir,
                                         model_fingerprint=loaded.base.fingerprint,
                                         batch_size=ctx.cfg.eval.batch_size)
    return ctx.catalogue


def _trainer(ctx: Context, loaded: Loaded, prior: CollaborativePrior | None, *, dp: DPSettings | None,
             accountant: PrivacyAccountant | None) -> LocalTrainer:
    cfg = ctx.cfg
    return LocalTrainer(
        loaded.encoder, _catalogue(ctx), {u: ctx.split.train[u] for u in ctx.users},
        lr=cfg.train.dp_lr if dp else cfg.train.lr, batch_size=cfg.train.batch_size, objective=objective(cfg),
        residual=residual_cf(prior, cfg), dp=dp, accountant=accountant,
        seed=cfg.train.seed, rng=_random(ctx, "train") if dp else None,
        popularity=prior.popularity if prior is not None else None,
    )


def _train(ctx: Context, trainer: LocalTrainer, method: str, *, accountant: PrivacyAccountant | None,
           steps: int) -> float:
    """Train in rounds of one expected pass, one rounds.jsonl line (and ledger line) each; seconds."""
    per_round = steps_for_epochs(1.0, trainer.sample_rate)
    start, done, rnd = time.perf_counter(), 0, 0
    while done < steps:
        n = min(per_round, steps - done)
        t0 = time.perf_counter()
        result = trainer.run(n, desc=f"{method} round {rnd + 1}")
        done, rnd = done + n, rnd + 1
        record: dict[str, Any] = {"round": rnd, "steps": n, "seconds": round(time.perf_counter() - t0, 3)}
        if accountant is None:  # a non-private run may report its loss; a private one does not
            record |= {"loss": result.mean_loss, "users": result.users_seen}
        if accountant is not None and trainer.dp is not None:
            record["epsilon"] = accountant.epsilon(ctx.delta)
            _ledger(ctx, method, accountant, "dp-sgd", trainer.dp.noise_multiplier,
                    trainer.dp.sample_rate, n, trainer.dp.clip_norm)
        ctx.run.append_jsonl(f"{method}/rounds.jsonl", record)
    seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.0f s", method, steps, seconds)
    assert ctx.loaded is not None
    save_adapter(ctx.run.root / method / "final" / "adapter.safetensors", adapter_state(ctx.loaded.model),
                 {"method": method, "base_model": ctx.loaded.base.fingerprint})
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
        "users": len(ctx.users), "budget": ctx.cfg.privacy.target_epsilon,
        "rng": _random(ctx, "label").label,
    }
    ctx.run.append_jsonl(f"ledgers/{name}.jsonl", record)


def _fused_rows(ctx: Context, method: str, prior: CollaborativePrior | None, *, epsilon: float | None,
                seconds: float) -> list[dict[str, Any]]:
    """Rows for the blend (the shipped design) and the LLM alone; CF alone kept in the row."""
    assert ctx.loaded is not None
    cfg, window = ctx.cfg, ctx.cfg.data.max_history
    vectors = catalogue_vectors(ctx.loaded.encoder, _catalogue(ctx))
    llm_test = llm_scores(vectors, ctx.test.histories, window=window)
    alone = evaluate(llm_test, ctx.test, ks=cfg.eval.ks)
    if prior is None:
        ctx.run.write_json(f"{method}/final/metrics.json", {"test": alone})
        return [_row(ctx, method, alone, epsilon=epsilon, seconds=seconds)]
    key = f"ndcg@{cfg.eval.ks[0]}"
    weights = BLEND_WEIGHTS if cfg.prior.tune_weight else (cfg.prior.weight,)
    cf_valid = cf_scores(prior, ctx.valid.histories, ctx.num_items, ctx.cf)
    choice = choose_weight(cf_valid, llm_scores(vectors, ctx.valid.histories, window=window), ctx.valid,
                           weights=weights, key=key, ks=cfg.eval.ks)
    weight = choice.weight if cfg.prior.tune_weight else cfg.prior.weight  # a fixed weight is taken as set
    log.info("blend weight w=%s (validation %s lead over CF alone ± standard error, by w: %s)", weight, key,
             {w: f"{lead:+.4f}±{se:.4f}" for w, lead, se in zip(weights, choice.leads, choice.standard_errors,
                                                                 strict=True)})
    cf_test = cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf)
    fused = evaluate(blend(cf_test, llm_test, weight), ctx.test, ks=cfg.eval.ks)
    cf_only = evaluate(cf_test, ctx.test, ks=cfg.eval.ks)
    ctx.run.write_json(f"{method}/final/metrics.json", {
        "test": fused, "test_llm_only": alone, "test_cf_only": cf_only, "blend_weight": weight,
        "validation": {"weights": list(weights), "metrics": list(choice.metrics), "leads": list(choice.leads),
                       "standard_errors": list(choice.standard_errors)},
        "cf": {"beta": cfg.prior.beta, "shrink": cfg.prior.shrink},
    })
    save_prior(ctx.run.root / method / "final", prior)  # what `fedrec serve` ranks with
    contribution = {f"llm_contribution_{k}": round(fused[k] - cf_only[k], 5) for k in fused}
    return [
        _row(ctx, method, fused, epsilon=epsilon, seconds=seconds) | {"blend_weight": weight} | contribution
        | {f"cf_only_{k}": round(v, 5) for k, v in cf_only.items()},
        _row(ctx, f"{method}-llm-only", alone, epsilon=epsilon, seconds=seconds),
    ]


def _row(
    ctx: Context, method: str, metrics: dict[str, float], *, epsilon: float | None, seconds: float
) -> dict[str, Any]:
    device = "cpu" if ctx.loaded is None else str(ctx.loaded.encoder.device)
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    llm = method not in ("popularity", "dp-popularity", "itemknn", "dp-cooccurrence")
    return {
        "method": method, **{k: round(v, 5) for k, v in metrics.items()},
        "epsilon": None if epsilon is None else round(epsilon, 4),
        "delta": ctx.delta if epsilon is not None else None,
        "model": ctx.cfg.model.name if llm else None,
        "dataset": ctx.dataset.name, "users": len(ctx.test.user_ids), "device": device,
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
