"""User-level differential privacy: ε maths, noise calibration, the accountant, private counts.

The privacy unit is the user. A mechanism is a history of homogeneous blocks (σ, q, steps):
σ is the noise multiplier (noise std / L2 sensitivity of one user's contribution), q the
probability that a user takes part in a step (Poisson sampling; 1.0 for a full release such as
the popularity counts), steps how many times the block was composed. ε is computed by Opacus'
accountant analysis (RDP by default, PRV on request) — pure numpy maths, no tensors here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedrec.common.errors import ConfigError, PrivacyError
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
STATE_VERSION = 1


@dataclass(frozen=True)
class MechanismStep:
    """One homogeneous block of a composed mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon(history: Sequence[MechanismStep], *, delta: float, accountant: str = "rdp") -> float:
    """ε of the composition of `history` at `delta` (0 for an empty history)."""
    _check_accountant(accountant)
    if not history:
        return 0.0
    if any(h.noise_multiplier <= 0 for h in history):
        return math.inf
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
        return float(prv.get_epsilon(delta=delta))
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        rdp_analysis.compute_rdp(
            q=h.sample_rate, noise_multiplier=h.noise_multiplier, steps=h.steps, orders=orders
        )
        for h in history
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[MechanismStep] = (),
    accountant: str = "rdp",
    tol: float = 0.01,
) -> float:
    """Smallest σ (within `tol` in ε) such that ε(prior + (σ, q, steps)) <= target_epsilon."""
    _validate(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the earlier releases already spend ε={spent:.3f} of the target ε={target_epsilon}; "
            "lower their cost (e.g. a larger prior.noise_multiplier) or raise the target"
        )

    def eps(sigma: float) -> float:
        block = MechanismStep(sigma, sample_rate, steps)
        return epsilon([*prior, block], delta=delta, accountant=accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e5:
            raise PrivacyError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta}")
    while eps(high) < target_epsilon - tol and high - low > 1e-4:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def default_delta(num_users: int) -> float:
    """δ = min(1e-5, 1/(10·users)): strictly below 1/users, the usual requirement."""
    if num_users <= 0:
        raise PrivacyError("cannot choose δ for a party with no users")
    return min(1e-5, 1.0 / (10 * num_users))


def check_delta(delta: float, num_users: int) -> None:
    """δ must be < 1/users, or a mechanism that leaks one whole user could still satisfy it."""
    if not 0 < delta < 1.0 / max(1, num_users):
        raise PrivacyError(
            f"privacy.delta={delta:g} must be < 1/users = {1.0 / max(1, num_users):.3g} for "
            f"{num_users} users; use e.g. {default_delta(max(1, num_users)):.1g}"
        )


def _validate(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> None:
    if not target_epsilon > 0:
        raise PrivacyError(f"target ε={target_epsilon} must be > 0")
    if not 0 < delta < 1:
        raise PrivacyError(f"δ={delta} must be in (0, 1)")
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate q={sample_rate} must be in (0, 1]")
    if steps < 1:
        raise PrivacyError(f"steps={steps} must be >= 1")


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant {name!r} is not known; choose one of: {', '.join(ACCOUNTANTS)}")


class PrivacyAccountant:
    """Holds the composed history of one party; ε is computed on demand, never by the optimizer."""

    def __init__(self, *, accountant: str = "rdp") -> None:
        _check_accountant(accountant)
        self.accountant = accountant
        self._history: list[MechanismStep] = []

    @property
    def history(self) -> tuple[MechanismStep, ...]:
        return tuple(self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` compositions of (σ, q); merges with an identical last block."""
        _check_entry(noise_multiplier, sample_rate, steps)
        last = self._history[-1] if self._history else None
        if last and (last.noise_multiplier, last.sample_rate) == (noise_multiplier, sample_rate):
            self._history[-1] = MechanismStep(noise_multiplier, sample_rate, last.steps + steps)
        else:
            self._history.append(MechanismStep(float(noise_multiplier), float(sample_rate), steps))

    def epsilon(self, delta: float) -> float:
        return epsilon(self._history, delta=delta, accountant=self.accountant)

    def would_exceed(
        self, *, budget: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> bool:
        """Whether adding this block would take ε above `budget`."""
        block = MechanismStep(noise_multiplier, sample_rate, steps)
        return epsilon([*self._history, block], delta=delta, accountant=self.accountant) > budget

    def make_step_hook(self, sample_rate: float) -> Callable[[Any], None]:
        """A hook for Opacus `DPOptimizer.attach_step_hook`: records the σ that really ran."""

        def hook(optimizer: Any) -> None:
            self.step(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=sample_rate)

        return hook

    def state_dict(self) -> dict[str, Any]:
        history = [[h.noise_multiplier, h.sample_rate, h.steps] for h in self._history]
        return {"version": STATE_VERSION, "accountant": self.accountant, "history": history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history; validates everything first and changes nothing on error."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise PrivacyError(f"accountant state has version {_get(state, 'version')!r}, expected 1")
        if state.get("accountant") != self.accountant:
            raise PrivacyError(
                f"accountant state is for {state.get('accountant')!r}, this one is {self.accountant!r}"
            )
        entries = state.get("history")
        if not isinstance(entries, list):
            raise PrivacyError("accountant state has no history list")
        parsed = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise PrivacyError(f"accountant history entry {i} must be [σ, q, steps], got {entry!r}")
            sigma, q, steps = entry
            _check_entry(sigma, q, steps, where=f"accountant history entry {i}")
            parsed.append(MechanismStep(float(sigma), float(q), int(steps)))
        self._history = parsed


def _get(state: object, key: str) -> object:
    return state.get(key) if isinstance(state, Mapping) else None


def _check_entry(sigma: object, q: object, steps: object, where: str = "mechanism step") -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma < 0:
        raise PrivacyError(f"{where}: noise multiplier {sigma!r} must be a finite number >= 0")
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
        raise PrivacyError(f"{where}: sample rate {q!r} must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"{where}: steps {steps!r} must be an integer >= 1")


def private_counts(
    contributions: Sequence[np.ndarray],
    *,
    num_items: int,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Per-item user counts under the Gaussian mechanism (one step, q = 1).

    Each user's distinct items form a 0/1 vector scaled to L2 norm <= clip_norm, so adding or
    removing one user moves the sum by at most clip_norm (the sensitivity); the sum gets
    N(0, (σ·clip_norm)²) per item. Record MechanismStep(σ, 1.0, 1) for it.
    """
    total = np.zeros(num_items, dtype=np.float64)
    for items in contributions:
        unique = np.unique(np.asarray(items, dtype=np.int64))
        if unique.size:
            total[unique] += min(1.0, clip_norm / math.sqrt(unique.size))
    return total + rng.normal(0.0, noise_multiplier * clip_norm, size=num_items)
