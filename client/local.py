"""One client's side of federated training, free of Flower: data, budget, DP rounds, evaluation.

The client decides its own privacy: its ε budget and δ come from `LocalSettings` (its node
config or local files), never from the server. Every release — the noisy popularity counts, the
noisy co-occurrence over the head items, and each round's adapter update — is checked against
that budget first, refused if it would exceed it, and recorded durably (client/state.py) before
the reply leaves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.client.state import ClientState
from fedrec.client.train import (
    DPSettings,
    LocalTrainer,
    entropy_seed,
    objective,
    residual_cf,
    steps_for_epochs,
)
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
from fedrec.common.evaluation import (
    CFSettings,
    catalogue_vectors,
    cf_scores,
    eval_users,
    evaluate_blends,
    llm_scores,
)
from fedrec.common.lora import adapter_spec, adapter_state, load_adapter
from fedrec.common.prior import (
    MECHANISM_COOCCURRENCE,
    MECHANISM_POPULARITY,
    CollaborativePrior,
    ReleasePlan,
    noisy_cooccurrence,
    noisy_popularity,
    plan_releases,
    user_items,
)
from fedrec.common.privacy import (
    MechanismStep,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
)
from fedrec.common.recommender import Catalogue, Loaded, build_recommender, catalogue_cached

log = logging.getLogger(__name__)

STATUS_OK, STATUS_OVER_BUDGET, STATUS_NO_DATA = "ok", "over-budget", "no-data"
STATUS_BAD_REQUEST = "bad-request"


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
        # q is public (the run's setting), never derived from the private number of users
        self.sample_rate = cfg.train.sample_rate
        self._loaded = loaded  # may be shared by the simulated clients of one process
        self._catalogue: Catalogue | None = None

    # -- model --

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            self._loaded = build_recommender(self.cfg, cache_dir=self.local.cache_dir,
                                             offline=self.local.offline)
        return self._loaded

    @property
    def catalogue(self) -> Catalogue:
        """The frozen computation of the public catalogue (cached on disk, shared by clients)."""
        if self._catalogue is None:
            self._catalogue = catalogue_cached(
                self.loaded.encoder, self.dataset.item_texts, cache_dir=self.local.cache_dir,
                model_fingerprint=self.loaded.base.fingerprint, batch_size=self.cfg.eval.batch_size,
            )
        return self._catalogue

    def state(self) -> ClientState:
        """Re-read from disk on every request: the file, not memory, is the record."""
        return ClientState(self.local.state_dir, accountant=self.cfg.privacy.accountant)

    def _load_global(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Validate and load the received adapter: all LoRA tensors, or only B under FFA-LoRA."""
        model = self.loaded.model
        variant = self.cfg.lora.variant
        if variant == "ffa":  # A is frozen at its seeded init and never travels
            load_adapter(model, self.loaded.initial_adapter, source="initial adapter")
        load_adapter(model, tensors, variant=variant, source="server")

    # -- plan --

    def steps_per_round(self, local_epochs: float) -> int:
        return steps_for_epochs(local_epochs, self.sample_rate)

    def prior_plan(self) -> ReleasePlan:
        """σ of this client's popularity and co-occurrence releases: their share of its own budget."""
        p = self.cfg.prior
        return plan_releases(epsilon=self.local.epsilon_budget, delta=self.delta, share=p.budget_share,
                             popularity_share=p.popularity_share, cooccurrence=p.cooccurrence,
                             accountant=self.cfg.privacy.accountant, fixed_sigma=p.noise_multiplier)

    def _planned_prior(self, state: ClientState) -> list[MechanismStep]:
        """The prior releases this client has not made yet."""
        if not self.cfg.prior.enabled:
            return []
        done = {e["mechanism"] for e in state.ledger}
        names = (MECHANISM_POPULARITY, MECHANISM_COOCCURRENCE)
        return [s for s, m in zip(self.prior_plan().steps, names, strict=False) if m not in done]

    def noise_multiplier(self, state: ClientState, req: RoundRequest) -> float:
        """σ of DP-SGD: fixed in the config, or calibrated once so the announced plan (prior
        release + num_rounds rounds) spends exactly this client's budget; then kept."""
        if state.noise_multiplier is not None:
            return state.noise_multiplier
        if self.cfg.privacy.noise_multiplier is not None:
            return self.cfg.privacy.noise_multiplier
        prior = list(state.accountant.history) + self._planned_prior(state)
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
        sigma = self.prior_plan().popularity_sigma
        step = MechanismStep(sigma, 1.0, 1)
        if (refused := self._refusal(state, [step], "the popularity release")) is not None:
            return refused
        counts = noisy_popularity(self._contributions(), num_items=len(self.dataset.item_ids),
                                  clip=p.clip_norm, noise_multiplier=sigma,
                                  rng=np.random.default_rng(entropy_seed()))
        tensors = {"counts": torch.from_numpy(counts.astype(np.float32))}
        return self._release(state, req, "prior", MECHANISM_POPULARITY, step, p.clip_norm, tensors)

    def cooccurrence(self, req: RoundRequest, head: np.ndarray) -> Outcome:
        """This client's co-occurrence over the server's head items, per-user bounded, noised.

        Any head keeps the bound (each user's outer product has Frobenius norm ≤ clip), so the
        server's choice needs no trust; it is only checked to be valid item indices."""
        state = self.state()
        if (replayed := self._replay(state, req, "cooccurrence")) is not None:
            return replayed
        p = self.cfg.prior
        num_items = len(self.dataset.item_ids)
        head = np.asarray(head, dtype=np.int64)
        if head.ndim != 1 or not 0 < head.size <= min(num_items, 4 * p.head_size) or head.min() < 0 \
                or head.max() >= num_items or np.any(np.diff(head) <= 0):
            return Outcome(STATUS_BAD_REQUEST, self._base_metrics(state),
                           reason=f"{self.local.name}: the head must be 1..{4 * p.head_size} sorted "
                                  "item indices")
        sigma = self.prior_plan().cooccurrence_sigma
        if sigma is None:
            return Outcome(STATUS_BAD_REQUEST, self._base_metrics(state),
                           reason=f"{self.local.name}: co-occurrence releases are off here "
                                  "(prior.cooccurrence)")
        step = MechanismStep(sigma, 1.0, 1)
        if (refused := self._refusal(state, [step], "the co-occurrence release")) is not None:
            return refused
        matrix = noisy_cooccurrence(self._contributions(), head=head, clip=p.clip_norm,
                                    noise_multiplier=sigma,
                                    rng=np.random.default_rng(entropy_seed()))
        tensors = {"cooccurrence": torch.from_numpy(matrix.astype(np.float32))}
        return self._release(state, req, "cooccurrence", MECHANISM_COOCCURRENCE, step, p.clip_norm, tensors)

    def _contributions(self) -> list[np.ndarray]:
        return user_items([self.split.train[u] for u in self.users], num_items=len(self.dataset.item_ids))

    def _release(self, state: ClientState, req: RoundRequest, kind: str, mechanism: str, step: MechanismStep,
                 clip: float, tensors: dict[str, torch.Tensor]) -> Outcome:
        state.accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=1.0, steps=1)
        entry = self._ledger_entry(state, req.round, mechanism, step, clip)
        metrics = self._base_metrics(state) | _ledger_metrics(entry)
        chained = state.commit(run_id=req.run_id, kind=kind, rnd=req.round, ledger_entry=entry,
                               metrics=metrics, tensors=tensors)
        return Outcome(STATUS_OK, metrics, tensors, ledger=chained)

    def train(self, global_tensors: Mapping[str, torch.Tensor], req: RoundRequest,
              prior: CollaborativePrior | None = None) -> Outcome:
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
            dp = DPSettings(sigma, self.cfg.privacy.clip_norm, self.sample_rate,
                            normaliser=self.cfg.train.batch_size, secure_rng=self.cfg.privacy.secure_rng)
        self._load_global(global_tensors)
        trainer = LocalTrainer(
            self.loaded.encoder, self.catalogue, {u: self.split.train[u] for u in self.users},
            lr=self.cfg.train.dp_lr if dp else req.lr, batch_size=self.cfg.train.batch_size,
            objective=objective(self.cfg), residual=residual_cf(prior, self.cfg), dp=dp,
            accountant=state.accountant if dp else None, proximal_mu=req.proximal_mu,
            popularity=prior.popularity if prior is not None else None,
        )
        result = trainer.run(steps, desc=f"{self.local.name} round {req.round}", progress=False)
        tensors = adapter_state(self.loaded.model, variant=self.cfg.lora.variant)
        metrics = self._base_metrics(state) | {
            "num-examples": float(len(self.users)), "uniform": 1.0, "steps": float(steps),
            # the training loss is a function of private data: only non-private runs report it
            "loss": result.mean_loss if dp is None and math.isfinite(result.mean_loss) else 0.0,
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
        prior: CollaborativePrior | None, weights: Sequence[float],
    ) -> Outcome:
        """HR/NDCG/MRR of this client's valid or test users, one value per blend weight w."""
        state = self.state()
        who = eval_users(self.split, which=which, users=self.users)
        metrics: dict[str, Any] = {"num-examples": float(len(who.user_ids))}
        if not who.user_ids:
            return Outcome(STATUS_NO_DATA, metrics | self._base_metrics(state), reason="no evaluation users")
        self._load_global(global_tensors)
        vectors = catalogue_vectors(self.loaded.encoder, self.catalogue)
        llm = llm_scores(vectors, who.histories, window=self.cfg.data.max_history)
        cf = cf_scores(prior, who.histories, len(self.dataset.item_ids),
                       CFSettings(beta=self.cfg.prior.beta, shrink=self.cfg.prior.shrink))
        grid = list(weights) if prior is not None and weights else [1.0]
        per_weight = evaluate_blends(cf, llm, who, weights=grid, ks=self.cfg.eval.ks)
        for key in per_weight[0]:
            metrics[key] = [m[key] for m in per_weight]
        return Outcome(STATUS_OK, metrics)

    def expected_keys(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return adapter_spec(self.loaded.model, variant=self.cfg.lora.variant)


def _ledger_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    keys = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "epsilon")
    return {f"ledger.{k}": float(entry[k]) for k in keys}


def require_budget(value: Any, where: str) -> float:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: epsilon budget {value!r} is not a number") from None
    if not eps > 0:
        raise PrivacyError(f"{where}: epsilon budget must be > 0, got {eps}")
    return eps
