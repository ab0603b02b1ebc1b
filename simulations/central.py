"""Centralized reference runs (no Flower): the yardstick that federated runs are compared with.

Each private method is one party (common/privacy/party.py) over all users: its δ, its budget
(privacy.target_epsilon), its plan and its ledger, `ledgers/<method>.jsonl`, whose lines are
chained and signed like a federated client's with the method's own key beside it
(`ledgers/<method>.key`, made on first use), so `fedrec audit <run>/ledgers/<method>.jsonl`
verifies it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
from fedrec.common.config import Config, to_dict
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
from fedrec.common.ledger import MECHANISM_DP_SGD, PRIOR_MECHANISMS, Ledger, key_signer
from fedrec.common.lora import adapter_state, load_adapter, save_adapter
from fedrec.common.prior import CollaborativePrior, exact_prior, private_prior, save_prior
from fedrec.common.privacy.analysis import MechanismStep
from fedrec.common.privacy.mechanisms import MechanismRandom, mechanism_random
from fedrec.common.privacy.party import Party
from fedrec.common.recommender import Loaded, build_recommender
from fedrec.common.rundir import AdapterRecord, RunDir, append_jsonl, atomic_write_json, atomic_write_text

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

    @property
    def num_items(self) -> int:
        return len(self.dataset.item_ids)

    @property
    def histories(self) -> list[tuple[int, ...]]:
        return [tuple(self.split.train[u]) for u in self.users]

    @property
    def cf(self) -> CFSettings:
        return CFSettings(beta=self.cfg.prior.beta, shrink=self.cfg.prior.shrink)

    def party(self, method: str) -> Party:
        """The privacy unit of one private method: every user, the whole budget, its own ledger."""
        return _party(self.cfg, len(self.users), method, self.run)


def _party(cfg: Config, users: int, method: str, run: RunDir | None = None) -> Party:
    """A central party; with `run`, its ledger is appended to ledgers/<method>.jsonl as it grows."""
    ledger = None
    if run is not None:
        ledger = Ledger(path=run.ledger(method), signer=partial(key_signer, run.ledger_key(method)))
    return Party(name=method, users=users, budget=cfg.privacy.target_epsilon, delta=cfg.privacy.delta,
                 accountant=cfg.privacy.accountant, ledger=ledger)


# --- data ----------------------------------------------------------------------------------


def prepare(cfg: Config, sources: Sources, run: RunDir) -> Context:
    """Load and split the data set (optionally sample users), fix δ."""
    path = resolve_dataset(cfg.data.dataset, cache_dir=sources.cache_dir, offline=sources.offline)
    dataset = load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)
    split = sample_users(leave_one_out(dataset), cfg.data.max_users, cfg.train.seed)
    users = sorted(split.train)
    delta = _party(cfg, len(users), "central").delta  # every method's: checked < 1/users here
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
    party = ctx.party("dp-popularity")
    prior = release_prior(ctx, party, share=1.0, cooccurrence=False)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    return [_row(ctx, "dp-popularity", metrics, epsilon=party.spent, seconds=0.0)]


def run_itemknn(ctx: Context) -> list[dict[str, Any]]:
    """Non-private item-kNN: exact co-occurrence over the whole catalogue, the same scorer."""
    prior = exact_prior(ctx.histories, num_items=ctx.num_items, head_size=ctx.num_items,
                        clip=ctx.cfg.prior.clip_norm)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    return [_row(ctx, "itemknn", metrics, epsilon=None, seconds=0.0)]


def run_dp_cooccurrence(ctx: Context) -> list[dict[str, Any]]:
    """CF only: popularity and co-occurrence released with the whole ε."""
    party = ctx.party("dp-cooccurrence")
    t0 = time.perf_counter()
    prior = release_prior(ctx, party, share=1.0, cooccurrence=True)
    metrics = evaluate(cf_scores(prior, ctx.test.histories, ctx.num_items, ctx.cf), ctx.test,
                       ks=ctx.cfg.eval.ks)
    save_prior(ctx.run.final("dp-cooccurrence").root, prior)
    return [_row(ctx, "dp-cooccurrence", metrics, epsilon=party.spent, seconds=time.perf_counter() - t0)]


def release_prior(ctx: Context, party: Party, *, share: float, cooccurrence: bool) -> CollaborativePrior:
    """The private releases, spent by `party` and recorded in its ledger (noise from OS entropy)."""
    p = ctx.cfg.prior
    plan = party.prior_plan(share=share, popularity_share=p.popularity_share, cooccurrence=cooccurrence,
                            fixed_sigma=p.noise_multiplier)
    rng = _random(ctx, "prior")
    prior = private_prior(ctx.histories, num_items=ctx.num_items, plan=plan, head_size=p.head_size,
                          clip=p.clip_norm, rng=rng)
    for step, mechanism in zip(plan.steps, PRIOR_MECHANISMS, strict=False):
        _record(ctx, party, mechanism, step, clip=p.clip_norm)
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
    trainer = _trainer(ctx, loaded, prior, dp=None, party=None)
    seconds = _train(ctx, trainer, "central-lora", party=None,
                     steps=steps_for_epochs(ctx.cfg.train.epochs, trainer.sample_rate))
    return _fused_rows(ctx, "central-lora", prior, epsilon=None, seconds=seconds)


def run_central_dp_lora(ctx: Context) -> list[dict[str, Any]]:
    cfg = ctx.cfg
    party = ctx.party("central-dp-lora")
    prior = None
    if cfg.prior.enabled:
        prior = release_prior(ctx, party, share=cfg.prior.budget_share, cooccurrence=cfg.prior.cooccurrence)
    q = cfg.train.sample_rate
    steps = steps_for_epochs(cfg.train.dp_epochs, q)
    sigma = party.sgd_sigma(sample_rate=q, steps=steps)  # what the prior left spends the rest
    log.info("DP-SGD: q=%.4f steps=%d σ=%.3f (ε target %.2f, δ=%.2e)", q, steps, sigma,
             cfg.privacy.target_epsilon, ctx.delta)
    loaded = _recommender(ctx)
    dp = DPSettings(sigma, cfg.privacy.clip_norm, q, normaliser=cfg.train.batch_size,
                    secure_rng=cfg.privacy.secure_rng)
    trainer = _trainer(ctx, loaded, prior, dp=dp, party=party)
    seconds = _train(ctx, trainer, "central-dp-lora", party=party, steps=steps)
    return _fused_rows(ctx, "central-dp-lora", prior, epsilon=party.spent, seconds=seconds)


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
    if RunDir(out, create=False).results.exists() or RunDir(out, create=False).ledgers_dir.exists():
        raise ConfigError(f"{out} already holds a run; choose another --output or remove it")
    run = RunDir(out)
    ctx = prepare(cfg, sources, run)
    rows: list[dict[str, Any]] = []
    for method in cfg.train.methods:
        log.info("method %s", method)
        rows.extend(METHODS[method](ctx))
        atomic_write_json(run.results, {"rows": rows})
    provenance = {"dataset": ctx.dataset.name, "users": len(ctx.users), "delta": ctx.delta}
    if ctx.loaded is not None:
        provenance |= {"model_source": ctx.loaded.base.source, "model_sha256": ctx.loaded.base.fingerprint}
    run.write_config(cfg, provenance)
    atomic_write_text(run.report_md, results_table(rows))
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
             party: Party | None) -> LocalTrainer:
    cfg = ctx.cfg
    return LocalTrainer(
        loaded.encoder, _catalogue(ctx), {u: ctx.split.train[u] for u in ctx.users},
        lr=cfg.train.dp_lr if dp else cfg.train.lr, batch_size=cfg.train.batch_size, objective=objective(cfg),
        residual=residual_cf(prior, cfg), dp=dp, accountant=party.accountant if party is not None else None,
        seed=cfg.train.seed, rng=_random(ctx, "train") if dp else None,
        popularity=prior.popularity if prior is not None else None,
    )


def _train(ctx: Context, trainer: LocalTrainer, method: str, *, party: Party | None, steps: int) -> float:
    """Train in rounds of one expected pass, one rounds.jsonl line (and ledger line) each; seconds."""
    per_round = steps_for_epochs(1.0, trainer.sample_rate)
    start, done, rnd = time.perf_counter(), 0, 0
    while done < steps:
        n = min(per_round, steps - done)
        t0 = time.perf_counter()
        result = trainer.run(n, desc=f"{method} round {rnd + 1}")
        done, rnd = done + n, rnd + 1
        record: dict[str, Any] = {"round": rnd, "steps": n, "seconds": round(time.perf_counter() - t0, 3)}
        if party is None:  # a non-private run may report its loss; a private one does not
            record |= {"loss": result.mean_loss, "users": result.users_seen}
        if party is not None and trainer.dp is not None:
            record["epsilon"] = party.accountant.epsilon(ctx.delta)
            dp = trainer.dp  # the step hook composed the steps that ran; the line records them
            block = MechanismStep(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate, steps=n)
            _record(ctx, party, MECHANISM_DP_SGD, block, clip=dp.clip_norm, accounted=True)
        append_jsonl(ctx.run.method_rounds(method), record)
    seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.0f s", method, steps, seconds)
    assert ctx.loaded is not None
    trained = AdapterRecord(config=to_dict(ctx.cfg), model_fingerprint=ctx.loaded.base.fingerprint,
                            dataset_fingerprint=ctx.dataset.fingerprint, run=method,
                            variant=ctx.cfg.lora.variant)
    save_adapter(ctx.run.final(method).adapter, adapter_state(ctx.loaded.model),
                 {"method": method, "base_model": ctx.loaded.base.fingerprint} | trained.to_metadata())
    return seconds


def _random(ctx: Context, purpose: str) -> MechanismRandom:
    """Masks and noise from OS entropy; seeded only with train.deterministic (tests, benchmarks)."""
    return mechanism_random(deterministic=ctx.cfg.train.deterministic, seed=ctx.cfg.train.seed,
                            purpose=("central", purpose))


def _record(ctx: Context, party: Party, mechanism: str, step: MechanismStep, *, clip: float,
            accounted: bool = False) -> None:
    """One ledger line per release, numbered from 1 in its party's ledger; ε the party's after it.
    A central party has no private user count: it records its users (the audit checks δ < 1/users)."""
    party.record(mechanism, step, rnd=len(party.ledger.lines) + 1, clip_norm=clip,
                 rng=_random(ctx, "label").label, accounted=accounted, users=len(ctx.users))


def _fused_rows(ctx: Context, method: str, prior: CollaborativePrior | None, *, epsilon: float | None,
                seconds: float) -> list[dict[str, Any]]:
    """Rows for the blend (the shipped design) and the LLM alone; CF alone kept in the row."""
    assert ctx.loaded is not None
    cfg, window = ctx.cfg, ctx.cfg.data.max_history
    vectors = catalogue_vectors(ctx.loaded.encoder, _catalogue(ctx))
    llm_test = llm_scores(vectors, ctx.test.histories, window=window)
    alone = evaluate(llm_test, ctx.test, ks=cfg.eval.ks)
    if prior is None:
        atomic_write_json(ctx.run.final(method).metrics, {"test": alone})
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
    atomic_write_json(ctx.run.final(method).metrics, {
        "test": fused, "test_llm_only": alone, "test_cf_only": cf_only, "blend_weight": weight,
        "validation": {"weights": list(weights), "metrics": list(choice.metrics), "leads": list(choice.leads),
                       "standard_errors": list(choice.standard_errors)},
        "cf": {"beta": cfg.prior.beta, "shrink": cfg.prior.shrink},
    })
    save_prior(ctx.run.final(method).root, prior)  # what `fedrec serve` ranks with
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
