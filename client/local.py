"""One client's side of federated training, free of Flower: data, budget, DP rounds, evaluation.

The client decides its own privacy: its ε budget and δ come from `LocalSettings` (its node
config or local files), never from the server. Every release — the noisy popularity counts and
each round's adapter update — is checked against that budget first, refused if it would exceed
it, and recorded durably (client/state.py) before the reply leaves.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.client.state import ClientState
from fedrec.client.train import DPSettings, LocalTrainer, steps_for_epochs
from fedrec.common.assets import resolve_dataset
from fedrec.common.config import Config
from fedrec.common.data import (
    Dataset,
    Split,
    client_datasets,
    leave_one_out,
    load_dataset,
    partition_users,
    sample_users,
)
from fedrec.common.errors import ConfigError, PrivacyError
from fedrec.common.evaluation import EvalUsers, eval_users, evaluate, llm_scores, prior_scores
from fedrec.common.lora import adapter_spec, adapter_state, load_adapter, tensors_digest
from fedrec.common.model import Loaded, build_recommender, item_vectors_cached
from fedrec.common.privacy import (
    MechanismStep,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
    prior_noise,
    private_counts,
)

log = logging.getLogger(__name__)

STATUS_OK, STATUS_OVER_BUDGET, STATUS_NO_DATA = "ok", "over-budget", "no-data"


@dataclass(frozen=True)
class LocalSettings:
    """What only the client decides: who it is, where its state lives, how much ε it may spend."""

    name: str
    state_dir: Path
    epsilon_budget: float
    delta: float | None = None  # None: min(1e-5, 1/(10·users at this client))
    cache_dir: Path = Path(".")
    offline: bool = False


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks for in one round (plan parameters only, never a budget)."""

    run_id: str
    round: int
    num_rounds: int
    local_epochs: float
    lr: float
    proximal_mu: float = 0.0


@dataclass
class Outcome:
    status: str
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    reason: str = ""
    ledger: dict[str, Any] | None = None  # the chained ledger line of this release, if it spent ε


# --- data ------------------------------------------------------------------------------------


def load_split(cfg: Config, *, cache_dir: Path, offline: bool) -> tuple[Dataset, Split]:
    """The data set and its leave-one-out split at the configured (reduced) scale."""
    path = resolve_dataset(cfg.data.dataset, cache_dir=cache_dir, offline=offline)
    dataset = load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)
    split = sample_users(leave_one_out(dataset), cfg.data.max_users, cfg.train.seed)
    return dataset, split


def simulated_clients(cfg: Config, dataset: Dataset, split: Split) -> dict[str, Split]:
    """Client name -> its users' split, as configured in [fed] (deterministic by train.seed)."""
    f = cfg.fed
    assignment = partition_users(
        dataset, scheme=f.partition, num_clients=f.clients, seed=cfg.train.seed, alpha=f.alpha,
        attribute=f.attribute, mapping_file=Path(f.mapping_file) if f.mapping_file else None,
    )
    return client_datasets(split, assignment)


# --- the client ------------------------------------------------------------------------------


class ClientJob:
    """The model, data and durable privacy state of one client; one instance per process."""

    def __init__(self, cfg: Config, local: LocalSettings, dataset: Dataset, split: Split,
                 loaded: Loaded | None = None) -> None:
        self.cfg, self.local, self.dataset, self.split = cfg, local, dataset, split
        self.users = sorted(u for u, seq in split.train.items() if len(seq) >= 1)
        n = max(1, len(self.users))
        self.delta = local.delta if local.delta is not None else default_delta(n)
        check_delta(self.delta, n)
        self.sample_rate = min(1.0, cfg.train.batch_size / n)
        self._loaded = loaded  # may be shared by the simulated clients of one process

    # -- model --

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            self._loaded = build_recommender(self.cfg, cache_dir=self.local.cache_dir,
                                             offline=self.local.offline)
        return self._loaded

    def state(self) -> ClientState:
        """Re-read from disk on every request: the file, not memory, is the record."""
        return ClientState(self.local.state_dir, accountant=self.cfg.privacy.accountant)

    def _load_global(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Validate and load the received adapter: all LoRA tensors, or only B under FFA-LoRA."""
        model = self.loaded.rec.model
        variant = self.cfg.lora.variant
        if variant == "ffa":  # A is frozen at its seeded init and never travels
            load_adapter(model, self.loaded.initial_adapter, source="initial adapter")  # type: ignore[arg-type]
        load_adapter(model, tensors, variant=variant, source="server")  # type: ignore[arg-type]

    # -- plan --

    def steps_per_round(self, local_epochs: float) -> int:
        return steps_for_epochs(local_epochs, self.sample_rate)

    def prior_sigma(self) -> float:
        """σ of this client's counts release: its share of this client's own budget."""
        p = self.cfg.prior
        return prior_noise(target_epsilon=self.local.epsilon_budget, delta=self.delta, share=p.budget_share,
                           fixed=p.noise_multiplier, accountant=self.cfg.privacy.accountant)

    def _planned_prior(self) -> list[MechanismStep]:
        return [MechanismStep(self.prior_sigma(), 1.0, 1)] if self.cfg.prior.enabled else []

    def noise_multiplier(self, state: ClientState, req: RoundRequest) -> float:
        """σ of DP-SGD: fixed in the config, or calibrated once so the announced plan (prior
        release + num_rounds rounds) spends exactly this client's budget; then kept."""
        if state.noise_multiplier is not None:
            return state.noise_multiplier
        if self.cfg.privacy.noise_multiplier is not None:
            return self.cfg.privacy.noise_multiplier
        released_prior = any(e["mechanism"] == "prior-counts" for e in state.ledger)
        prior = list(state.accountant.history) + ([] if released_prior else self._planned_prior())
        remaining_rounds = req.num_rounds - req.round + 1
        return calibrate_noise(
            target_epsilon=self.local.epsilon_budget, delta=self.delta, sample_rate=self.sample_rate,
            steps=self.steps_per_round(req.local_epochs) * max(1, remaining_rounds), prior=prior,
            accountant=self.cfg.privacy.accountant,
        )

    def _refusal(self, state: ClientState, planned: list[MechanismStep], what: str) -> Outcome | None:
        after = epsilon([*state.accountant.history, *planned], delta=self.delta,
                        accountant=self.cfg.privacy.accountant)
        if after <= self.local.epsilon_budget * (1 + 1e-9):
            return None
        spent = state.accountant.epsilon(self.delta) if state.accountant.history else 0.0
        reason = (f"{self.local.name}: {what} would raise ε from {spent:.3f} to {after:.3f}, over this "
                  f"client's budget {self.local.epsilon_budget:g} (δ={self.delta:.1e}); refused")
        log.warning(reason)
        return Outcome(STATUS_OVER_BUDGET, self._base_metrics(state) | {"epsilon_refused": after},
                       reason=reason)

    def _base_metrics(self, state: ClientState) -> dict[str, float]:
        eps = state.accountant.epsilon(self.delta) if state.accountant.history else 0.0
        return {"epsilon": eps, "delta": self.delta, "budget": self.local.epsilon_budget}

    def _ledger_entry(self, state: ClientState, rnd: int, mechanism: str, step: MechanismStep,
                      clip: float) -> dict[str, Any]:
        return {
            "round": rnd, "mechanism": mechanism, "noise_multiplier": step.noise_multiplier,
            "sample_rate": step.sample_rate, "steps": step.steps, "clip_norm": clip,
            "delta": self.delta, "epsilon": state.accountant.epsilon(self.delta),
            "accountant": self.cfg.privacy.accountant, "users": len(self.users),
            "budget": self.local.epsilon_budget,
        }

    def _replay(self, state: ClientState, req: RoundRequest, kind: str) -> Outcome | None:
        stored = state.answered_reply(req.run_id, kind, req.round)
        if stored is None:
            return None
        record, tensors = stored
        log.info("%s: round %d %s already released; re-sending it (no new spend)",
                 self.local.name, req.round, kind)
        return Outcome(STATUS_OK, dict(record["metrics"]), tensors, ledger=record.get("ledger"))

    # -- releases --

    def prior_counts(self, req: RoundRequest) -> Outcome:
        """This client's item counts, per-user clipped, under the Gaussian mechanism."""
        state = self.state()
        if (replayed := self._replay(state, req, "prior")) is not None:
            return replayed
        p = self.cfg.prior
        sigma = self.prior_sigma()
        step = MechanismStep(sigma, 1.0, 1)
        if (refused := self._refusal(state, [step], "the popularity release")) is not None:
            return refused
        contributions = [np.unique(np.asarray(self.split.train[u], dtype=np.int64)) for u in self.users]
        rng = np.random.default_rng(_seed(self.cfg.train.seed, self.local.name, req.round, "prior"))
        counts = private_counts(contributions, num_items=len(self.dataset.item_ids), clip_norm=p.clip_norm,
                                noise_multiplier=sigma, rng=rng)
        state.accountant.step(noise_multiplier=sigma, sample_rate=1.0, steps=1)
        entry = self._ledger_entry(state, req.round, "prior-counts", step, p.clip_norm)
        metrics = self._base_metrics(state) | _ledger_metrics(entry)
        tensors = {"counts": torch.from_numpy(counts.astype(np.float32))}
        chained = state.commit(run_id=req.run_id, kind="prior", rnd=req.round, ledger_entry=entry,
                               metrics=metrics, tensors=tensors)
        return Outcome(STATUS_OK, metrics, tensors, ledger=chained)

    def train(self, global_tensors: Mapping[str, torch.Tensor], req: RoundRequest) -> Outcome:
        """One round of local (DP-)training from the global adapter; replies with only LoRA tensors."""
        state = self.state()
        if (replayed := self._replay(state, req, "train")) is not None:
            return replayed
        if not self.users:
            return Outcome(STATUS_NO_DATA, self._base_metrics(state), reason=f"{self.local.name}: no users")
        steps = self.steps_per_round(req.local_epochs)
        dp: DPSettings | None = None
        if self.cfg.fed.dp:
            sigma = self.noise_multiplier(state, req)
            step = MechanismStep(sigma, self.sample_rate, steps)
            if (refused := self._refusal(state, [step], f"round {req.round}")) is not None:
                return refused
            state.noise_multiplier = sigma
            dp = DPSettings(sigma, self.cfg.privacy.clip_norm, self.sample_rate, self.cfg.privacy.secure_rng)
        self._load_global(global_tensors)
        seed = _seed(self.cfg.train.seed, self.local.name, req.round, "train")
        trainer = LocalTrainer(
            self.loaded.rec, item_titles=self.dataset.item_titles, item_texts=self.dataset.item_texts,
            sequences={u: self.split.train[u] for u in self.users}, lr=req.lr,
            batch_size=self.cfg.train.batch_size, max_history=self.cfg.data.max_history,
            negatives=self.cfg.train.negatives, seed=seed, dp=dp,
            accountant=state.accountant if dp else None, proximal_mu=req.proximal_mu,
        )
        result = trainer.run(steps, desc=f"{self.local.name} round {req.round}")
        tensors = adapter_state(self.loaded.rec.model, variant=self.cfg.lora.variant)  # type: ignore[arg-type]
        metrics = self._base_metrics(state) | {
            "num-examples": float(len(self.users)), "uniform": 1.0, "steps": float(steps),
            "loss": result.mean_loss if math.isfinite(result.mean_loss) else 0.0,
            "users_seen": float(result.users_seen),
        }
        entry = None
        if dp is not None:
            released = MechanismStep(dp.noise_multiplier, dp.sample_rate, steps)
            entry = self._ledger_entry(state, req.round, "dp-sgd", released, dp.clip_norm)
            metrics |= _ledger_metrics(entry)
        chained = state.commit(run_id=req.run_id, kind="train", rnd=req.round, ledger_entry=entry,
                               metrics=metrics, tensors=tensors)
        return Outcome(STATUS_OK, metrics, tensors, ledger=chained)

    def evaluate(
        self, global_tensors: Mapping[str, torch.Tensor], *, which: str,
        counts: np.ndarray | None, betas: Sequence[float],
    ) -> Outcome:
        """HR/NDCG/MRR of this client's valid or test users, one value per prior weight β."""
        state = self.state()
        who = eval_users(self.split, which=which, users=self.users)
        metrics: dict[str, Any] = {"num-examples": float(len(who.user_ids))}
        if not who.user_ids:
            return Outcome(STATUS_NO_DATA, metrics | self._base_metrics(state), reason="no evaluation users")
        self._load_global(global_tensors)
        scores = self._scores(who)
        weights = list(betas) if counts is not None and betas else [0.0]
        per_beta = [evaluate(scores, who, prior=prior_scores(counts, b), ks=self.cfg.eval.ks)
                    for b in weights]
        for key in per_beta[0]:
            metrics[key] = [m[key] for m in per_beta]
        return Outcome(STATUS_OK, metrics)

    def _scores(self, who: EvalUsers) -> np.ndarray:
        rec, cfg = self.loaded.rec, self.cfg
        digest = tensors_digest(adapter_state(rec.model))  # type: ignore[arg-type]
        items = item_vectors_cached(
            rec, self.dataset.item_texts, cache_dir=self.local.cache_dir,
            model_fingerprint=self.loaded.base.fingerprint, adapter_digest=digest,
            batch_size=cfg.eval.batch_size,
        )
        return llm_scores(rec, items, who.histories, self.dataset.item_titles,
                          max_history=cfg.data.max_history, batch_size=cfg.eval.batch_size)

    def expected_keys(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return adapter_spec(self.loaded.rec.model, variant=self.cfg.lora.variant)  # type: ignore[arg-type]


def _ledger_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    keys = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "epsilon")
    return {f"ledger.{k}": float(entry[k]) for k in keys}


def _seed(base: int, name: str, rnd: int, what: str) -> int:
    """A per-client, per-round, per-purpose seed (sampling and noise differ across clients)."""
    return int(np.random.SeedSequence([base, zlib.crc32(name.encode()), rnd, zlib.crc32(what.encode())])
               .generate_state(1)[0])


def require_budget(value: Any, where: str) -> float:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: epsilon budget {value!r} is not a number") from None
    if not eps > 0:
        raise PrivacyError(f"{where}: epsilon budget must be > 0, got {eps}")
    return eps
