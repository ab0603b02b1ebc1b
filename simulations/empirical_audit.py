"""`fedrec audit --empirical`: the one-run canary audit of a client's DP-SGD mechanism.

Following Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run"):
m canary users — synthetic histories of random catalogue items with a random target item — are
each added to one client's users with probability ½; that client trains with the mechanism the
config specifies (client/train.py `LocalTrainer`: per-user Poisson sampling, Opacus clipping and
noise, σ calibrated for the client's ε over the rounds × local epochs it would run); then every
canary is scored by the trained model (log-probability of its target over the whole catalogue),
the k₊ best are guessed "in" and the k₋ worst "out", and common/onerun.py turns the number of
correct guesses into an ε lower bound at 95 % confidence. The same audit on a non-private run
(no clipping, no noise) shows the attack has power. What is audited is the per-client DP-SGD
mechanism, not the federated exchange around it (aggregation only post-processes it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedrec.client.local import load_split, simulated_clients
from fedrec.client.train import DPSettings, Example, LocalTrainer, steps_for_epochs
from fedrec.common.audit import FAIL, PASS, WARN, Check
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError
from fedrec.common.model import Recommender, build_recommender
from fedrec.common.onerun import GuessResult, audit_scores
from fedrec.common.privacy import PrivacyAccountant, calibrate_noise, check_delta, default_delta
from fedrec.simulations.audit import AuditReport
from fedrec.simulations.central import Sources

log = logging.getLogger(__name__)

DEFAULT_CANARIES = 200
CANARY_HISTORY = 3  # random items shown as a canary's history
CONFIDENCE = 0.95
NOTE = ("Each canary user (a random history with a random target item) joins one client's users "
        "with probability ½; the client trains with its DP-SGD mechanism (client/train.py, the same "
        "per-user Poisson sampling, clipping and noise as in federated rounds; one client, not the "
        "federated exchange). The auditor guesses 'in' for the canaries whose target the trained model "
        "ranks highest and 'out' for the lowest (k₊ = k₋ = m/10, fixed in advance). A lower bound above "
        "the claimed ε would prove the claim false; one far below it is expected (the bound is loose "
        "for a few hundred canaries and a realistic attack). The non-private run shows the audit's power.")


@dataclass(frozen=True)
class CanaryPlan:
    """The canaries of one audit and which of them were included (drawn from one seed)."""

    examples: tuple[Example, ...]
    included: tuple[bool, ...]


@dataclass
class EmpiricalResult:
    """One audited training run: the mechanism, the guesses and the bound."""

    label: str
    claimed_epsilon: float  # math.inf for the non-private run
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    users: int
    guesses: GuessResult
    seconds: float
    scores: list[float]
    included: list[bool]
    note: str = NOTE

    @property
    def consistent(self) -> bool:
        return self.guesses.epsilon_lower_bound <= self.claimed_epsilon

    def row(self) -> list[str]:
        claimed = "∞ (no DP)" if math.isinf(self.claimed_epsilon) else f"{self.claimed_epsilon:g}"
        verdict = "PASS" if self.consistent else "FAIL"
        g = self.guesses
        return [self.label, claimed, f"{g.epsilon_lower_bound:.3f}", str(g.canaries),
                f"{g.guesses} (k₊={g.k_plus}, k₋={g.k_minus})", str(g.correct), f"{self.seconds:.1f}", verdict]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        d["consistent"] = self.consistent
        return d

    def plot(self) -> str:
        from fedrec.simulations.audit_report import score_plot

        return score_plot(self)


def empirical_audit(report: AuditReport, cfg: Config, sources: Sources, *, canaries: int | None = None,
                    seed: int | None = None) -> list[EmpiricalResult]:
    """Audit cfg's DP-SGD mechanism and a non-private contrast run; add both to `report`."""
    m = DEFAULT_CANARIES if canaries is None else canaries
    if m < 10:
        raise ConfigError(f"--canaries={m}: the audit needs at least 10 canaries (a few hundred is typical)")
    private = audit_run(cfg, sources, canaries=m, private=True, seed=seed)
    contrast = audit_run(cfg, sources, canaries=m, private=False, seed=seed)
    report.empirical += [private, contrast]
    report.empirical_checks.append(Check(
        "empirical ε lower bound ≤ claimed ε", PASS if private.consistent else FAIL,
        f"lower bound {private.guesses.epsilon_lower_bound:.3f} at {CONFIDENCE:.0%} confidence vs claimed "
        f"ε = {private.claimed_epsilon:g} (σ = {private.noise_multiplier:.3f}, q = {private.sample_rate:.3g}, "
        f"{private.steps} steps)"))
    power = contrast.guesses.epsilon_lower_bound
    report.empirical_checks.append(Check(
        "the audit has power (non-private run)", PASS if power > 0 else WARN,
        f"the same attack on the non-private run gives ε ≥ {power:.3f}"
        + ("" if power > 0 else ": no signal, so the private run's bound says little; "
           "train longer or use more canaries")))
    return [private, contrast]


def audit_run(cfg: Config, sources: Sources, *, canaries: int, private: bool, seed: int | None = None,
              ) -> EmpiricalResult:
    """Train one client with (private) or without DP-SGD, canaries included at random; score them."""
    t0 = time.perf_counter()
    seed = cfg.train.seed if seed is None else seed
    dataset, split = load_split(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    clients = simulated_clients(cfg, dataset, split)
    party = clients[sorted(clients)[0]]
    sequences = {u: s for u, s in party.train.items() if len(s) >= 1}
    plan = draw_canaries(len(dataset.item_ids), canaries, seed=seed)
    users = len(sequences) + sum(plan.included)
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(users)
    check_delta(delta, users)
    q = min(1.0, cfg.train.batch_size / users)
    steps = steps_for_epochs(cfg.fed.local_epochs, q) * cfg.fed.rounds
    sigma = calibrate_noise(target_epsilon=cfg.privacy.target_epsilon, delta=delta, sample_rate=q,
                            steps=steps) if private else 0.0
    loaded = build_recommender(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    accountant = PrivacyAccountant()
    trainer = CanaryTrainer(
        loaded.rec, canaries={f"canary-{i}": ex for i, ex in enumerate(plan.examples) if plan.included[i]},
        item_titles=dataset.item_titles, item_texts=dataset.item_texts, sequences=sequences,
        lr=cfg.train.lr, batch_size=cfg.train.batch_size, max_history=cfg.data.max_history,
        negatives=cfg.train.negatives, seed=seed,
        dp=DPSettings(sigma, cfg.privacy.clip_norm, q, cfg.privacy.secure_rng) if private else None,
        accountant=accountant if private else None,
    )
    trainer.run(steps, desc="canary audit " + ("(DP)" if private else "(no DP)"))
    scores = canary_scores(loaded.rec, plan.examples, dataset.item_titles, dataset.item_texts,
                           batch_size=cfg.eval.batch_size)
    k = max(1, canaries // 10)
    guesses = audit_scores(scores, plan.included, k_plus=k, k_minus=k, delta=delta, confidence=CONFIDENCE)
    claimed = accountant.epsilon(delta) if private else math.inf
    log.info("canary audit %s: %d of %d guesses right, ε ≥ %.3f (claimed %s)", "DP" if private else "no DP",
             guesses.correct, guesses.guesses, guesses.epsilon_lower_bound, claimed)
    return EmpiricalResult(
        f"{cfg.name}: DP-SGD" if private else f"{cfg.name}: no DP (contrast)", claimed, delta, sigma, q, steps,
        users, guesses, time.perf_counter() - t0, [float(s) for s in scores], list(plan.included))


def draw_canaries(num_items: int, m: int, *, seed: int) -> CanaryPlan:
    """m canaries: CANARY_HISTORY distinct random items and a different random target each; each
    included with probability ½ (independently, from a seed of its own)."""
    if num_items < CANARY_HISTORY + 1:
        raise ConfigError(f"the catalogue has {num_items} items; canaries need at least {CANARY_HISTORY + 1}")
    rng = np.random.default_rng([seed, 0xCA7A])
    examples = []
    for _ in range(m):
        picks = rng.choice(num_items, size=CANARY_HISTORY + 1, replace=False)
        examples.append(Example(tuple(int(i) for i in picks[:-1]), int(picks[-1]), ()))
    included = tuple(bool(b) for b in rng.random(m) < 0.5)
    return CanaryPlan(tuple(examples), included)


class CanaryTrainer(LocalTrainer):
    """LocalTrainer whose users include canaries; a sampled canary always contributes its own
    example (history -> target, fresh negatives), a real user a random one of theirs."""

    def __init__(self, rec: Recommender, *, canaries: Mapping[str, Example], sequences: Mapping[str, Any],
                 **kwargs: Any) -> None:
        placeholder = {name: (0,) for name in canaries}  # sampled like any user; never read
        super().__init__(rec, sequences={**sequences, **placeholder}, **kwargs)
        self.canaries = dict(canaries)

    def examples_for(self, users: Sequence[str]) -> list[Example]:
        real = super().examples_for([u for u in users if u not in self.canaries])
        num_items = len(self.item_texts)
        out = list(real)
        for u in users:
            if u in self.canaries:
                ex = self.canaries[u]
                negs = self.rng.integers(0, num_items - 1, size=self.negatives)
                negs = np.where(negs >= ex.target, negs + 1, negs)
                out.append(Example(ex.history, ex.target, tuple(int(n) for n in negs)))
        return out


@torch.no_grad()
def canary_scores(rec: Recommender, canaries: Sequence[Example], item_titles: Sequence[str],
                  item_texts: Sequence[str], *, batch_size: int) -> np.ndarray:
    """(m,) log-probability of each canary's target over the whole catalogue (higher: "in")."""
    items = rec.encode_all(list(item_texts), users=False, batch_size=batch_size)  # (I, H)
    users = rec.encode_all([[item_titles[i] for i in ex.history] for ex in canaries], users=True,
                           batch_size=batch_size)  # (m, H)
    logp = torch.log_softmax(rec.logits(users, items), dim=1)  # (m, I)
    targets = torch.tensor([ex.target for ex in canaries])
    return logp[torch.arange(len(canaries)), targets].numpy().astype(np.float64)
