"""`fedrec audit --empirical`: the one-run canary audit of a client's DP-SGD mechanism.

Following Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run"):
m canary users are each added to one client's users with probability ½; that client trains with
the mechanism the config specifies — client/train.py's `LocalTrainer`: per-user Poisson sampling,
Opacus clipping and noise, σ calibrated for the client's ε over the rounds × local epochs it would
run — then every canary gets a membership score, the k₊ best are guessed "in" and the k₋ worst
"out", and client/audit/onerun.py turns the number of correct guesses into an ε lower bound at 95 %
confidence. The same audit with the noise switched off (σ = 0, ε = ∞) shows the attack has power.
What is audited is the per-client DP-SGD mechanism, not the federated exchange around it
(aggregation only post-processes what a client releases).

Two kinds of canary (`kind`):
- "gradient" (default; the paper's white-box gradient canaries): a canary user's per-user gradient
  is a Dirac vector on one LoRA coordinate of its own (random sign), clipped and noised with
  everyone else's; the score is how far the trained adapter moved along it. This audits the
  mechanism with the most power per canary and needs no model able to memorise anything.
- "input" (black-box): a canary user has a random history and a random target item; the score is
  the trained model's log-probability of the target over the whole catalogue. This is the attack
  a real adversary with the released adapter could run; it needs a model that memorises (the real
  LM on a GPU) — the tiny test model learns too little for it to have power.
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
from fedrec.client.audit.checks import FAIL, PASS, WARN, Check
from fedrec.client.audit.onerun import GuessResult, audit_scores
from fedrec.client.audit.sources import AuditReport
from fedrec.client.local import load_split, simulated_clients
from fedrec.client.train import DPSettings, LocalTrainer, StepItems, objective, steps_for_epochs
from fedrec.common.assets import Sources
from fedrec.common.catalogue import Catalogue, catalogue_cached
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError
from fedrec.common.evaluation import catalogue_vectors
from fedrec.common.privacy.party import Party
from fedrec.common.recommender import ItemEncoder, build_recommender, user_vectors

log = logging.getLogger(__name__)

DEFAULT_CANARIES = 200
CANARY_HISTORY = 3  # random items shown as an input canary's history
GRADIENT_SCALE = 10.0  # a gradient canary's norm before clipping, in units of the clip norm
CONFIDENCE = 0.95
KINDS = ("gradient", "input")
NOTE = ("Each canary user joins one client's users with probability ½; the client trains with its "
        "DP-SGD mechanism (client/train.py: the same per-user Poisson sampling, clipping to C and noise as "
        "in federated rounds; one client, not the federated exchange, which only post-processes it). "
        "Gradient canaries contribute a Dirac gradient on a LoRA coordinate of their own and are scored by "
        "how far the adapter moved along it (white-box); input canaries have a random "
        "history and target item and are scored by the model's log-probability of the target (black-box). "
        "The optimizer is plain SGD (post-processing of the noisy sums, like Adam in training). "
        "The auditor guesses 'in' for the k₊ highest scores and 'out' for the k₋ lowest (k₊ = k₋ = m/10, "
        "fixed in advance). A lower bound above the claimed ε would prove the claim false; one well below "
        "it is expected (few canaries, one run). The run without noise shows the audit's power.")


@dataclass(frozen=True)
class CanaryPlan:
    """The canaries of one audit and which of them were included (drawn from one seed)."""

    examples: tuple[tuple[int, ...], ...]  # "input" canaries: a sequence, history then target
    included: tuple[bool, ...]
    signs: tuple[float, ...]  # "gradient" canaries: the direction of each Dirac gradient


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
    kind: str
    guesses: GuessResult
    seconds: float
    scores: list[float]
    included: list[bool]
    note: str = NOTE

    @property
    def consistent(self) -> bool:
        return self.guesses.epsilon_lower_bound <= self.claimed_epsilon

    def row(self) -> list[str]:
        claimed = "∞ (no noise)" if math.isinf(self.claimed_epsilon) else f"{self.claimed_epsilon:.3f}"
        verdict = "PASS" if self.consistent else "FAIL"
        g = self.guesses
        return [self.label, claimed, f"{g.epsilon_lower_bound:.3f}", str(g.canaries),
                f"{g.guesses} (k₊={g.k_plus}, k₋={g.k_minus})", str(g.correct), f"{self.seconds:.1f}",
                verdict]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        d["consistent"] = self.consistent
        return d

    def plot(self) -> str:
        from fedrec.client.audit.render import score_plot

        return score_plot(self)


def empirical_audit(report: AuditReport, cfg: Config, sources: Sources, *, canaries: int | None = None,
                    kind: str = "gradient", seed: int | None = None) -> list[EmpiricalResult]:
    """Audit cfg's DP-SGD mechanism and the same run without noise; add both to `report`."""
    m = DEFAULT_CANARIES if canaries is None else canaries
    if m < 10:
        raise ConfigError(f"--canaries={m}: the audit needs at least 10 canaries (a few hundred is typical)")
    if kind not in KINDS:
        raise ConfigError(f"canary kind {kind!r} is not known; choose one of: {', '.join(KINDS)}")
    private = audit_run(cfg, sources, canaries=m, private=True, kind=kind, seed=seed)
    contrast = audit_run(cfg, sources, canaries=m, private=False, kind=kind, seed=seed)
    report.empirical += [private, contrast]
    report.empirical_checks.append(Check(
        "empirical ε lower bound ≤ claimed ε", PASS if private.consistent else FAIL,
        f"lower bound {private.guesses.epsilon_lower_bound:.3f} at {CONFIDENCE:.0%} confidence vs claimed "
        f"ε = {private.claimed_epsilon:.3f} (σ = {private.noise_multiplier:.3f}, "
        f"q = {private.sample_rate:.3g}, "
        f"{private.steps} steps, {kind} canaries)"))
    power = contrast.guesses.epsilon_lower_bound
    report.empirical_checks.append(Check(
        "the audit has power (run without noise)", PASS if power > 0 else WARN,
        f"the same attack on the run without noise gives ε ≥ {power:.3f}"
        + ("" if power > 0 else ": no signal, so the private run's bound says little; "
           "train longer, use more canaries or gradient canaries")))
    return [private, contrast]


def audit_run(cfg: Config, sources: Sources, *, canaries: int, private: bool, kind: str = "gradient",
              seed: int | None = None) -> EmpiricalResult:
    """Train one client with DP-SGD (or the same without noise), canaries included at random; score them."""
    t0 = time.perf_counter()
    seed = cfg.train.seed if seed is None else seed
    dataset, split = load_split(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    clients = simulated_clients(cfg, dataset, split)
    client = sorted(clients)[0]
    sequences = {u: s for u, s in clients[client].train.items() if len(s) >= 1}
    plan = draw_canaries(len(dataset.item_ids), canaries, seed=seed)
    users = len(sequences) + sum(plan.included)
    p = cfg.privacy
    audited = Party(name=f"{client} with canaries", users=users, budget=p.target_epsilon,
                    delta=p.delta, accountant=p.accountant)
    delta = audited.delta
    q = cfg.train.sample_rate  # public, as at a federated client
    steps = steps_for_epochs(cfg.fed.local_epochs, q) * cfg.fed.rounds
    sigma = audited.sgd_sigma(sample_rate=q, steps=steps) if private else 0.0  # its whole budget
    loaded = build_recommender(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    catalogue = catalogue_cached(loaded.encoder, dataset.item_texts, cache_dir=sources.cache_dir,
                                 model_fingerprint=loaded.base.fingerprint, batch_size=cfg.eval.batch_size)
    trainer = CanaryTrainer(
        loaded.encoder, catalogue, plan=plan, kind=kind, clip_norm=cfg.privacy.clip_norm, seed=seed,
        sequences=sequences, lr=cfg.train.dp_lr, batch_size=cfg.train.batch_size, objective=objective(cfg),
        dp=DPSettings(sigma, cfg.privacy.clip_norm, q, normaliser=cfg.train.batch_size,
                      secure_rng=cfg.privacy.secure_rng),
        accountant=audited.accountant,
    )
    trainer.run(steps, desc=f"canary audit ({'DP' if private else 'no noise'})", progress=False)
    if kind == "gradient":
        scores = trainer.gradient_scores()
    else:
        scores = canary_scores(loaded.encoder, catalogue, plan.examples, window=cfg.data.max_history,
                               temperature=cfg.train.temperature)
    k = max(1, canaries // 10)
    guesses = audit_scores(scores, plan.included, k_plus=k, k_minus=k, delta=delta, confidence=CONFIDENCE)
    claimed = audited.accountant.epsilon(delta) if private else math.inf
    log.info("canary audit %s: %d of %d guesses right, ε ≥ %.3f (claimed %s)",
             "DP" if private else "no noise",
             guesses.correct, guesses.guesses, guesses.epsilon_lower_bound, claimed)
    label = f"{cfg.name}: DP-SGD, ε = {cfg.privacy.target_epsilon:g}" if private else f"{cfg.name}: no noise"
    return EmpiricalResult(label, claimed, delta, sigma, q, steps, users, kind, guesses,
                           time.perf_counter() - t0, [float(x) for x in scores], list(plan.included))


def draw_canaries(num_items: int, m: int, *, seed: int) -> CanaryPlan:
    """m canaries, each included with probability ½: for "input" canaries CANARY_HISTORY distinct random
    items and a different random target, for "gradient" canaries a random sign."""
    if num_items < CANARY_HISTORY + 1:
        raise ConfigError(f"the catalogue has {num_items} items; canaries need at least {CANARY_HISTORY + 1}")
    rng = np.random.default_rng([seed, 0xCA7A])
    examples = []
    for _ in range(m):
        picks = rng.choice(num_items, size=CANARY_HISTORY + 1, replace=False)
        examples.append(tuple(int(i) for i in picks))
    included = tuple(bool(b) for b in rng.random(m) < 0.5)
    signs = tuple(float(x) for x in rng.choice([-1.0, 1.0], size=m))
    return CanaryPlan(tuple(examples), included, signs)


class CanaryTrainer(LocalTrainer):
    """LocalTrainer (same Poisson sampling, clipping, noise, optimizer) whose users include the
    plan's included canaries. An "input" canary is a user whose sequence is its random history and
    target; a sampled "gradient" canary contributes a Dirac per-user gradient of norm
    GRADIENT_SCALE·C on its own LoRA coordinate, which Opacus clips to C like any user's."""

    def __init__(self, encoder: ItemEncoder, catalogue: Catalogue, *, plan: CanaryPlan, kind: str,
                 clip_norm: float, seed: int, sequences: Mapping[str, Any], **kwargs: Any) -> None:
        names = [f"~canary-{i:05d}" for i in range(len(plan.included))]  # sort after every real user
        members = {n: i for i, n in enumerate(names) if plan.included[i]}
        canaries = {n: plan.examples[i] if kind == "input" else (0, 0) for n, i in members.items()}
        # SGD: the adapter's move along a canary's coordinate is then proportional to the noisy sum
        # there (Adam would move every coordinate by about lr and hide the canaries' size)
        super().__init__(encoder, catalogue, {**sequences, **canaries}, seed=seed, optimizer="sgd", **kwargs)
        self.plan, self.kind = plan, kind
        self.canary_rows = {self.users.index(n): i for n, i in members.items()}
        self.dirac_size = GRADIENT_SCALE * clip_norm
        sizes = {k: p.numel() for k, p in self.params.items()}
        if kind == "gradient" and len(names) > sum(sizes.values()):
            raise ConfigError(f"{len(names)} gradient canaries need as many LoRA coordinates; the adapter "
                              f"has {sum(sizes.values())}")
        keys = list(sizes)
        flat = np.random.default_rng([seed, 0xD1AC]).choice(sum(sizes.values()), size=len(names),
                                                            replace=False)
        offsets = np.cumsum([0, *sizes.values()])
        where = np.searchsorted(offsets, flat, side="right") - 1
        self.coords = [(keys[int(j)], int(f - offsets[j])) for f, j in zip(flat, where, strict=True)]
        self.initial = {k: p.detach().clone() for k, p in self.params.items()}

    def _dp_grads(self, rows: torch.Tensor, items: StepItems) -> tuple[dict[str, torch.Tensor], float]:
        if self.kind != "gradient":
            return super()._dp_grads(rows, items)
        picked = rows.tolist()
        real = torch.as_tensor([r for r in picked if r not in self.canary_rows], dtype=torch.long)
        sampled = [self.canary_rows[r] for r in picked if r in self.canary_rows]
        grads, loss = super()._dp_grads(real, items)
        if not sampled:
            return grads, loss
        dirac = {k: torch.zeros((len(sampled), *p.shape)) for k, p in self.params.items()}
        for n, i in enumerate(sampled):
            key, f = self.coords[i]
            dirac[key][n].view(-1)[f] = self.plan.signs[i] * self.dirac_size
        kept = {k: g if real.numel() else g[:0] for k, g in grads.items()}  # drop the placeholder row
        return {k: torch.cat([kept[k], dirac[k]]) for k in grads}, loss

    def gradient_scores(self) -> np.ndarray:
        """(m,) how far the adapter moved against each canary's gradient (descent: -sign·Δw)."""
        out = np.empty(len(self.coords))
        for i, (key, f) in enumerate(self.coords):
            moved = float(self.params[key].detach().view(-1)[f] - self.initial[key].view(-1)[f])
            out[i] = -self.plan.signs[i] * moved
        return out


@torch.no_grad()
def canary_scores(encoder: ItemEncoder, catalogue: Catalogue, canaries: Sequence[tuple[int, ...]], *,
                  window: int, temperature: float) -> np.ndarray:
    """(m,) log-probability of each canary's target over the whole catalogue (higher: "in")."""
    vectors = catalogue_vectors(encoder, catalogue)  # (I, H)
    users = user_vectors(vectors, [c[:-1] for c in canaries], history=window)  # (m, H)
    logp = torch.log_softmax(users @ vectors.T / temperature, dim=1)  # (m, I)
    targets = torch.tensor([c[-1] for c in canaries])
    return logp[torch.arange(len(canaries)), targets].numpy().astype(np.float64)
