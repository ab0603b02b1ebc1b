"""One client's side of federated training, free of Flower: data, policy, budget, DP releases.

The client decides its own privacy: its policy (client/policy.py) — ε budget, δ, clip norms,
accountant, what it allows — comes from `LocalSettings` (its node config or the simulated
institution's settings), never from the server. Every release — the noisy popularity counts,
each round's adapter update, each evaluation's noisy metrics — is checked against that policy
and budget first, refused (with a status the coordinator sees) if it would break either, and
recorded durably (client/state.py), under the state directory's lock, before the reply leaves.
The prior is two releases: noisy popularity, then noisy co-occurrence over the head the server
picked from the summed noisy popularity (any head keeps the per-user bound).

What is public and what is not: the Poisson rate q (`train.sample_rate`), the steps per round
(⌈local epochs / q⌉) and the normalising batch size (`train.batch_size`) are public settings
bounded by the policy; none depends on the client's private user count N, which never leaves:
replies carry `num-examples` = 1 (uniform FedAvg weighting), no loss and no batch totals, and
evaluation metrics leave only as noisy sums charged to the budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.client.policy import (
    POLICY_CONFLICT,
    Policy,
    check_evaluation,
    check_prior,
    check_request,
)
from fedrec.client.state import ClientState, state_ledger, state_lock
from fedrec.client.train import DPSettings, LocalTrainer, objective, residual_cf, steps_for_epochs
from fedrec.common import wire
from fedrec.common.assets import resolve_dataset
from fedrec.common.catalogue import Catalogue, catalogue_cached
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
from fedrec.common.ledger import (
    MECHANISM_COOCCURRENCE,
    MECHANISM_DP_SGD,
    MECHANISM_EVAL,
    MECHANISM_NON_PRIVATE,
    MECHANISM_POPULARITY,
    PRIOR_MECHANISMS,
    LedgerLine,
)
from fedrec.common.lora import adapter_spec, adapter_state, load_adapter, tensors_digest
from fedrec.common.prior import (
    CollaborativePrior,
    ReleasePlan,
    noisy_cooccurrence,
    noisy_popularity,
    user_items,
)
from fedrec.common.privacy.analysis import MechanismStep
from fedrec.common.privacy.mechanisms import MechanismRandom, mechanism_random
from fedrec.common.privacy.party import Party
from fedrec.common.recommender import Loaded, build_recommender
from fedrec.common.wire import Reply, RoundRequest

log = logging.getLogger(__name__)

# A received prior count beyond this is not a sum of clipped, noised user counts of any real
# catalogue; the client refuses to rank with it.
MAX_PRIOR_COUNT = 1e9
# test evaluations at the end of a run: the blend (and CF alone) in one, the LLM alone in another
TEST_EVALUATIONS = 2


@dataclass(frozen=True)
class LocalSettings:
    """What only the client decides: who it is, where its state lives, its privacy policy.

    `policy` None: the default policy with this budget and δ (tests, old callers)."""

    name: str
    state_dir: Path
    epsilon_budget: float
    delta: float | None = None  # None: min(1e-5, 1/(10·users at this client))
    cache_dir: Path = Path(".")
    offline: bool = False
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if self.policy is None:
            object.__setattr__(self, "policy", Policy(epsilon_budget=self.epsilon_budget, delta=self.delta))
        elif (self.policy.epsilon_budget, self.policy.delta) != (self.epsilon_budget, self.delta):
            raise ConfigError(f"{self.name}: epsilon_budget/delta differ from its policy's")

    @classmethod
    def of(cls, name: str, state_dir: Path, policy: Policy, cache_dir: Path = Path("."),
           offline: bool = False) -> LocalSettings:
        return cls(name, state_dir, policy.epsilon_budget, policy.delta, cache_dir, offline, policy)

    @property
    def the_policy(self) -> Policy:
        assert self.policy is not None  # set in __post_init__
        return self.policy


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
    clients = client_datasets(split, assignment)
    if f.partition in ("iid", "dirichlet") and len(clients) < f.clients:
        raise ConfigError(
            f"fed.clients={f.clients} but only {len(clients)} clients get any of the {len(split.train)} "
            f"users (data.max_users={cfg.data.max_users}); lower fed.clients or raise data.max_users")
    return clients


# --- the client ------------------------------------------------------------------------------


class ClientJob:
    """The model, data and durable privacy state of one client; one instance per process.

    Its privacy is a `Party` (common/privacy/party.py) that its policy defines and its state
    directory persists (client/state.py); this class adds the data, the model, the policy's checks
    and the federated plan: which releases a run may still ask for."""

    def __init__(self, cfg: Config, local: LocalSettings, dataset: Dataset, split: Split,
                 loaded: Loaded | None = None) -> None:
        self.cfg, self.local, self.dataset, self.split = cfg, local, dataset, split
        self.policy = local.the_policy
        self.users = sorted(u for u, seq in split.train.items() if len(seq) >= 1)
        self.delta = self.party().delta  # δ < 1/users is checked here, before any request
        self.sample_rate = cfg.train.sample_rate  # public: never batch_size / N
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

    def party(self) -> Party:
        """This client's privacy unit as its policy defines it, with nothing spent yet."""
        p = self.policy
        return Party(name=self.local.name, users=max(1, len(self.users)), budget=p.epsilon_budget,
                     delta=p.delta, accountant=p.accountant, min_noise_multiplier=p.min_noise_multiplier,
                     policy_sha256=p.digest(), ledger=state_ledger(self.local.state_dir))

    def state(self) -> ClientState:
        """Re-read from disk on every request: the file, not memory, is the record."""
        return ClientState(self.local.state_dir, party=self.party())

    def _load_global(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Validate and load the received adapter: all LoRA tensors, or only B under FFA-LoRA."""
        model = self.loaded.model
        variant = self.cfg.lora.variant
        if variant == "ffa":  # A is frozen at its seeded init and never travels
            load_adapter(model, self.loaded.initial_adapter, source="initial adapter")
        load_adapter(model, tensors, variant=variant, source="server")

    def _random(self, rnd: int, purpose: str) -> MechanismRandom:
        """Fresh OS entropy, unless this client's own policy says deterministic (tests only)."""
        return mechanism_random(deterministic=self.policy.deterministic, seed=self.cfg.train.seed,
                                purpose=(self.local.name, rnd, purpose))

    # -- plan --

    def steps_per_round(self, local_epochs: float) -> int:
        return steps_for_epochs(local_epochs, self.sample_rate)

    def prior_plan(self) -> ReleasePlan:
        """σ of the popularity and co-occurrence releases: their policy share of this client's budget."""
        p = self.cfg.prior
        return self.party().prior_plan(share=self.policy.prior_budget_share,
                                       popularity_share=p.popularity_share, cooccurrence=p.cooccurrence,
                                       fixed_sigma=p.noise_multiplier)

    def _planned(self, state: ClientState, req: RoundRequest) -> list[MechanismStep]:
        """The releases still to come besides DP-SGD: the prior (if not yet made) and one
        evaluation per remaining round plus the test (the most the server may ask for)."""
        out = []
        if self.cfg.prior.enabled and self.policy.allow_prior:
            done = state.party.ledger.mechanisms()
            out += [s for s, m in zip(self.prior_plan().steps, PRIOR_MECHANISMS, strict=False)
                    if m not in done]
        if self.policy.evaluation == "dp":
            remaining = max(1, req.num_rounds - req.round + 1) + TEST_EVALUATIONS
            out.append(MechanismStep(noise_multiplier=self.eval_sigma(state, req.num_rounds), sample_rate=1.0,
                                     steps=remaining))
        return out

    def eval_sigma(self, state: ClientState, num_rounds: int) -> float:
        """σ of an evaluation release: the policy's, or the one kept since the first release, or
        calibrated so that num_rounds validations and the test cost eval_budget_share · ε."""
        return state.party.eval_sigma(share=self.policy.eval_budget_share,
                                      releases=max(1, num_rounds) + TEST_EVALUATIONS,
                                      fixed=self.policy.eval_noise_multiplier)

    def _pin_eval_sigma(self, state: ClientState, req: RoundRequest) -> None:
        if self.policy.evaluation == "dp" and state.party.eval_noise_multiplier is None:
            state.party.eval_noise_multiplier = self.eval_sigma(state, req.num_rounds)

    def noise_multiplier(self, state: ClientState, req: RoundRequest) -> float:
        """σ of DP-SGD: fixed in the config, or calibrated once so the announced plan (prior,
        evaluations, num_rounds rounds) spends exactly this client's budget; then kept. Never
        below the policy's floor."""
        steps = self.steps_per_round(req.local_epochs) * max(1, req.num_rounds - req.round + 1)
        return state.party.sgd_sigma(sample_rate=self.sample_rate, steps=steps,
                                     planned=lambda: self._planned(state, req),
                                     fixed=self.cfg.privacy.noise_multiplier)

    def _refusal(self, state: ClientState, planned: list[MechanismStep], what: str) -> Reply | None:
        refusal = state.party.refusal(planned, what)
        if refusal is None:
            return None
        log.warning(refusal.reason)
        return Reply(wire.OVER_BUDGET, self._base_metrics(state) | {wire.EPSILON_REFUSED: refusal.epsilon},
                     reason=refusal.reason)

    def _refuse(self, state: ClientState, status: str, reason: str) -> Reply:
        log.warning("%s", reason)
        return Reply(status, self._base_metrics(state), reason=reason)

    def _pinned_conflict(self, state: ClientState) -> str | None:
        """A state directory answers under the one policy it was first released under."""
        pinned = state.policy_sha256
        if pinned is None or pinned == self.policy.digest():
            return None
        return (f"{POLICY_CONFLICT}: the policy of {self.local.name} changed since its first release "
                f"(pinned {pinned[:12]}…, now {self.policy.digest()[:12]}…; e.g. a changed budget, δ or "
                "clip norm); a new policy needs a new state directory")

    def _base_metrics(self, state: ClientState) -> dict[str, float]:
        party = state.party
        return {wire.EPSILON: party.spent, wire.DELTA: party.delta, wire.BUDGET: party.budget}

    def _record(self, state: ClientState, req: RoundRequest, mechanism: str, step: MechanismStep, *,
                clip: float, rng: MechanismRandom, tensors: Mapping[str, torch.Tensor],
                accounted: bool = False, split: str | None = None,
                prior_sha256: str | None = None) -> LedgerLine:
        """One release's line, chained to the ledger. No user count: q and steps are public (see
        the module docstring); the run and the digest of the tensors sent name the reply (an
        evaluation's line adds its split and the digest of the prior it ranked with)."""
        return state.party.record(mechanism, step, rnd=req.round, clip_norm=clip, rng=rng.label,
                                  accounted=accounted, run_id=req.run_id,
                                  adapter_sha256=tensors_digest(tensors), split=split,
                                  prior_sha256=prior_sha256)

    def _commit(self, state: ClientState, req: RoundRequest, kind: str, line: LedgerLine,
                metrics: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Reply:
        """Store the release durably (client/state.py), then reply with it and its chained line."""
        state.pin_policy(self.policy.to_dict(), self.policy.digest())
        if req.num_rounds > 0:  # a prior or training request announces the plan
            self._pin_eval_sigma(state, req)
        state.commit(run_id=req.run_id, kind=kind, rnd=req.round, line=line, metrics=metrics, tensors=tensors)
        return Reply(wire.OK, metrics, tensors, ledger=line.to_dict())

    def _replay(self, state: ClientState, req: RoundRequest, kind: str) -> Reply | None:
        stored = state.answered_reply(req.run_id, kind, req.round)
        if stored is None:
            return None
        record, tensors = stored
        log.info("%s: round %d %s already released; re-sending it (no new spend)",
                 self.local.name, req.round, kind)
        return Reply(wire.OK, dict(record["metrics"]), tensors, ledger=record.get("ledger"))

    # -- releases --

    def prior_counts(self, req: RoundRequest) -> Reply:
        """This client's item counts, per-user clipped, under the Gaussian mechanism."""
        with state_lock(self.local.state_dir):
            return self._prior_counts(req)

    def _prior_counts(self, req: RoundRequest) -> Reply:
        state = self.state()
        if (answered := self._prior_answered(state, req, "prior")) is not None:
            return answered
        clip = self.policy.prior_clip_norm
        try:
            sigma = self.prior_plan().popularity_sigma
        except PrivacyError as exc:
            return self._refuse(state, wire.OVER_BUDGET, f"{self.local.name}: {exc}")
        step = MechanismStep(noise_multiplier=sigma, sample_rate=1.0, steps=1)
        if (refused := self._refusal(state, [step], "the popularity release")) is not None:
            return refused
        rng = self._random(req.round, "prior")
        counts = noisy_popularity(self._contributions(), num_items=len(self.dataset.item_ids), clip=clip,
                                  noise_multiplier=sigma, rng=rng)
        tensors = {wire.COUNTS: torch.from_numpy(counts.astype(np.float32))}
        return self._release(state, req, "prior", MECHANISM_POPULARITY, step, clip, rng, tensors)

    def cooccurrence(self, req: RoundRequest, head: np.ndarray) -> Reply:
        """This client's co-occurrence over the server's head items, per-user bounded, noised.

        Any head keeps the bound (each user's outer product has Frobenius norm ≤ clip), so the
        server's choice needs no trust; it is only checked to be valid item indices."""
        with state_lock(self.local.state_dir):
            return self._cooccurrence(req, head)

    def _cooccurrence(self, req: RoundRequest, head: np.ndarray) -> Reply:
        state = self.state()
        if (answered := self._prior_answered(state, req, "cooccurrence")) is not None:
            return answered
        num_items, limit = len(self.dataset.item_ids), 4 * self.cfg.prior.head_size
        head = np.asarray(head, dtype=np.int64)
        if head.ndim != 1 or not 0 < head.size <= min(num_items, limit) or head.min() < 0 \
                or head.max() >= num_items or np.any(np.diff(head) <= 0):
            return self._refuse(state, wire.BAD_REQUEST,
                                f"{self.local.name}: the head must be 1..{limit} sorted item indices")
        clip = self.policy.prior_clip_norm
        try:
            sigma = self.prior_plan().cooccurrence_sigma
        except PrivacyError as exc:
            return self._refuse(state, wire.OVER_BUDGET, f"{self.local.name}: {exc}")
        if sigma is None:
            return self._refuse(state, wire.BAD_REQUEST,
                                f"{self.local.name}: co-occurrence releases are off (prior.cooccurrence)")
        step = MechanismStep(noise_multiplier=sigma, sample_rate=1.0, steps=1)
        if (refused := self._refusal(state, [step], "the co-occurrence release")) is not None:
            return refused
        rng = self._random(req.round, "cooccurrence")
        matrix = noisy_cooccurrence(self._contributions(), head=head, clip=clip, noise_multiplier=sigma,
                                    rng=rng)
        tensors = {wire.COOCCURRENCE: torch.from_numpy(matrix.astype(np.float32))}
        return self._release(state, req, "cooccurrence", MECHANISM_COOCCURRENCE, step, clip, rng, tensors)

    def _prior_answered(self, state: ClientState, req: RoundRequest, kind: str) -> Reply | None:
        """A prior release already made (re-sent) or one the policy refuses; None: go ahead."""
        if (replayed := self._replay(state, req, kind)) is not None:
            return replayed
        conflict = self._pinned_conflict(state) or check_prior(self.policy, self.cfg, client=self.local.name)
        return self._refuse(state, wire.POLICY_CONFLICT, conflict) if conflict else None

    def _contributions(self) -> list[np.ndarray]:
        return user_items([self.split.train[u] for u in self.users], num_items=len(self.dataset.item_ids))

    def _release(self, state: ClientState, req: RoundRequest, kind: str, mechanism: str, step: MechanismStep,
                 clip: float, rng: MechanismRandom, tensors: dict[str, torch.Tensor]) -> Reply:
        line = self._record(state, req, mechanism, step, clip=clip, rng=rng, tensors=tensors)
        return self._commit(state, req, kind, line, self._base_metrics(state) | line.metrics(), tensors)

    def train(self, global_tensors: Mapping[str, torch.Tensor], req: RoundRequest,
              prior: CollaborativePrior | None = None) -> Reply:
        """One round of local (DP-)training from the global adapter; replies with only LoRA tensors.

        Check → train → commit run under the state directory's exclusive lock: a second message
        for the same round waits, then re-sends the stored reply."""
        with state_lock(self.local.state_dir):
            return self._train(global_tensors, req, prior)

    def _train(self, global_tensors: Mapping[str, torch.Tensor], req: RoundRequest,
               prior: CollaborativePrior | None) -> Reply:
        state = self.state()
        if (replayed := self._replay(state, req, "train")) is not None:
            return replayed
        if not self.users:
            return Reply(wire.NO_DATA, self._base_metrics(state), reason=f"{self.local.name}: no users")
        steps = self.steps_per_round(req.local_epochs)
        conflict = self._pinned_conflict(state) or check_request(
            self.policy, self.cfg, client=self.local.name, local_epochs=req.local_epochs, steps=steps,
            sample_rate=self.sample_rate)
        if conflict:
            return self._refuse(state, wire.POLICY_CONFLICT, conflict)
        dp: DPSettings | None = None
        if self.cfg.fed.dp:
            try:
                sigma = self.noise_multiplier(state, req)
            except PrivacyError as exc:  # the earlier and planned releases leave nothing for DP-SGD
                return self._refuse(state, wire.OVER_BUDGET, f"{self.local.name}: {exc}")
            step = MechanismStep(noise_multiplier=sigma, sample_rate=self.sample_rate, steps=steps)
            if (refused := self._refusal(state, [step], f"round {req.round}")) is not None:
                return refused
            state.party.noise_multiplier = sigma
            dp = DPSettings(sigma, self.policy.clip_norm, self.sample_rate,
                            normaliser=self.cfg.train.batch_size,
                            secure_rng=self.cfg.privacy.secure_rng)
        self._load_global(global_tensors)
        rng = self._random(req.round, "train")
        trainer = LocalTrainer(
            self.loaded.encoder, self.catalogue, {u: self.split.train[u] for u in self.users},
            lr=self.cfg.train.dp_lr if dp else req.lr, batch_size=self.cfg.train.batch_size,
            objective=objective(self.cfg), residual=residual_cf(prior, self.cfg), dp=dp,
            accountant=state.accountant if dp else None, proximal_mu=req.proximal_mu,
            seed=self.cfg.train.seed,
            rng=rng, popularity=prior.popularity if prior is not None else None,
        )
        trainer.run(steps, desc=f"{self.local.name} round {req.round}", progress=False)  # loss stays here
        tensors = adapter_state(self.loaded.model, variant=self.cfg.lora.variant)
        line = self._train_line(state, req, dp, steps, rng, tensors)
        metrics = self._base_metrics(state) | train_scalars(steps) | line.metrics()
        return self._commit(state, req, "train", line, metrics, tensors)

    def _train_line(self, state: ClientState, req: RoundRequest, dp: DPSettings | None, steps: int,
                    rng: MechanismRandom, tensors: dict[str, torch.Tensor]) -> LedgerLine:
        """The DP-SGD line (the step hook already recorded it in the accountant), or, where the
        policy allows non-private training, a line that says so: σ = 0, ε = ∞ from then on."""
        if dp is not None:
            released = MechanismStep(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                                     steps=steps)
            return self._record(state, req, MECHANISM_DP_SGD, released, clip=dp.clip_norm, rng=rng,
                                tensors=tensors, accounted=True)
        log.warning("%s: round %d trained WITHOUT differential privacy (allow-non-private = true)",
                    self.local.name, req.round)
        none = MechanismStep(noise_multiplier=0.0, sample_rate=1.0, steps=steps)
        return self._record(state, req, MECHANISM_NON_PRIVATE, none, clip=0.0, rng=rng, tensors=tensors)

    def evaluate(
        self, global_tensors: Mapping[str, torch.Tensor], *, which: str,
        prior: CollaborativePrior | None, weights: Sequence[float], ks: Sequence[int] | None = None,
        run_id: str | None = None, rnd: int = -1,
    ) -> Reply:
        """HR/NDCG/MRR of this client's valid or test users, one value per blend weight w, released
        only as noisy sums charged to the budget (or refused where the policy says evaluation off).

        Only the policy's cut-offs and β grid are evaluated; `ks` and `betas` in the request that
        ask for anything else are refused. A request with a run id and round is answered once and
        re-sent from the stored reply."""
        with state_lock(self.local.state_dir):
            return self._evaluate(global_tensors, which=which, prior=prior, betas=tuple(weights),
                                  ks=None if ks is None else tuple(ks), run_id=run_id, rnd=rnd)

    def _evaluate(
        self, global_tensors: Mapping[str, torch.Tensor], *, which: str, prior: CollaborativePrior | None,
        betas: tuple[float, ...], ks: tuple[int, ...] | None, run_id: str | None, rnd: int,
    ) -> Reply:
        state = self.state()
        req = RoundRequest(run_id or "-", rnd, 0, 0.0, 0.0)
        kind = f"eval-{which}" if prior is not None else f"eval-{which}-llm"
        if run_id is not None and (replayed := self._replay(state, req, kind)) is not None:
            return replayed
        weights = betas if prior is not None and betas else (0.0,)
        conflict = self._pinned_conflict(state) or check_evaluation(
            self.policy, client=self.local.name, ks=ks, betas=weights)
        if conflict:
            return self._refuse(state, wire.POLICY_CONFLICT, conflict)
        if which not in ("valid", "test"):
            return self._refuse(state, wire.BAD_REQUEST, f"{self.local.name}: split {which!r} is not "
                                "valid or test")
        if prior is not None and (bad := self._bad_prior(state, prior, run_id)) is not None:
            return self._refuse(state, wire.BAD_REQUEST, bad)
        who = eval_users(self.split, which=which, users=self.users)
        if not who.user_ids:
            return Reply(wire.NO_DATA, self._base_metrics(state), reason="no evaluation users")
        sigma = self.policy.eval_noise_multiplier or state.party.eval_noise_multiplier
        if sigma is None:  # σ follows the announced plan: an evaluation before any release has none
            return self._refuse(state, wire.POLICY_CONFLICT, f"{POLICY_CONFLICT}: an evaluation before any "
                                f"prior or training release (no plan to size its noise) not allowed at "
                                f"{self.local.name}")
        step = MechanismStep(noise_multiplier=sigma, sample_rate=1.0, steps=1)
        if (refused := self._refusal(state, [step], f"the {which} evaluation")) is not None:
            return refused
        self._load_global(global_tensors)
        vectors = catalogue_vectors(self.loaded.encoder, self.catalogue)
        llm = llm_scores(vectors, who.histories, window=self.cfg.data.max_history)
        if prior is None:  # the LLM alone (one value, listed under w = 0)
            per_beta = evaluate_blends(np.zeros_like(llm), llm, who, weights=[1.0], ks=self.policy.eval_ks)
        else:
            cf = cf_scores(prior, who.histories, len(self.dataset.item_ids),
                           CFSettings(beta=self.cfg.prior.beta, shrink=self.cfg.prior.shrink))
            per_beta = evaluate_blends(cf, llm, who, weights=weights, ks=self.policy.eval_ks)
        rng = self._random(rnd, kind)
        metrics = noisy_metrics(per_beta, users=len(who.user_ids), sigma=step.noise_multiplier, rng=rng)
        line = self._record(state, req, MECHANISM_EVAL, step, clip=1.0, rng=rng, tensors={}, split=which,
                            prior_sha256=_prior_digest(prior))
        metrics |= self._base_metrics(state)
        return self._commit(state, req, kind, line, metrics, {})

    def _bad_prior(self, state: ClientState, prior: CollaborativePrior, run_id: str | None) -> str | None:
        """A received prior (already shape- and finiteness-checked): the catalogue's size, bounded,
        and within one run the same every time (its digest is in the first evaluation's line)."""
        name, n = self.local.name, len(self.dataset.item_ids)
        if prior.num_items != n:
            return f"{name}: a prior over {prior.num_items} items, the catalogue has {n}"
        co = prior.cooccurrence if prior.cooccurrence is not None else np.zeros(0)
        if max(np.abs(prior.popularity).max(initial=0.0), np.abs(co).max(initial=0.0)) > MAX_PRIOR_COUNT:
            return f"{name}: prior statistics beyond ±{MAX_PRIOR_COUNT:g}; refused"
        digest = _prior_digest(prior)
        used = {line.prior_sha256 for line in state.ledger
                if line.is_evaluation and line.run_id == run_id and run_id}
        used.discard(_prior_digest(None))
        if used and digest not in used:
            return f"{name}: the prior differs from the one its earlier evaluations of this run used"
        return None

    def expected_keys(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return adapter_spec(self.loaded.model, variant=self.cfg.lora.variant)


def train_scalars(steps: int) -> dict[str, float]:
    """What a training reply says besides ε: uniform weight 1 (not the private user count), the
    public number of steps; no loss, no batch totals."""
    return {wire.NUM_EXAMPLES: 1.0, wire.UNIFORM: 1.0, wire.STEPS: float(steps)}


def noisy_metrics(per_beta: Sequence[Mapping[str, float]], *, users: int, sigma: float,
                  rng: MechanismRandom) -> dict[str, Any]:
    """The Gaussian mechanism over the vector [users, Σ metric over users for every (β, metric)].

    Each user adds 1 to the count and a value in [0, 1] to every sum, so adding or removing one
    user moves the vector by at most √d in L2 (d its length); the noise is N(0, (σ√d)²) per entry.
    Released: the noisy count (≥ 1, post-processing) as `num-examples` and each metric as noisy
    sum / noisy count, clipped to [0, 1] — the server's user-weighted mean then recovers the sum
    of noisy sums over the sum of noisy counts."""
    keys = sorted(per_beta[0])
    sums = np.array([[m[k] * users for k in keys] for m in per_beta], dtype=np.float64)  # (B, K)
    d = 1 + sums.size
    scale = sigma * math.sqrt(d)
    count = max(1.0, users + float(rng.normal(0.0, scale, 1)[0]))
    noisy = sums + rng.normal(0.0, scale, sums.shape)
    means = np.clip(noisy / count, 0.0, 1.0)
    out: dict[str, Any] = {wire.NUM_EXAMPLES: count}
    for j, key in enumerate(keys):
        out[key] = [float(v) for v in means[:, j]]
    return out


def _prior_digest(prior: CollaborativePrior | None) -> str:
    if prior is None:
        return tensors_digest({})
    return tensors_digest({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in prior.tensors().items()})

