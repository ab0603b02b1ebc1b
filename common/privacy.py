"""User-level differential privacy: ε maths, noise calibration, the accountant, private counts.

The privacy unit is the user. A mechanism is a history of homogeneous blocks (σ, q, steps):
σ is the noise multiplier (noise std / L2 sensitivity of one user's whole contribution), q the
probability that a user takes part in a step (Poisson sampling; 1.0 for a full release such as
the popularity counts), steps how many times the block was composed. ε is computed by Opacus'
accountant analysis (RDP by default, PRV on request); the functions here take and return plain
Python floats and numpy arrays, never tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fedrec.common.errors import ConfigError, DataError, PrivacyError
from fedrec.common.randomness import MechanismRandom
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
STATE_VERSION = 1
# Calibration gives up beyond this σ: no useful model trains under that much noise.
_MAX_NOISE_MULTIPLIER = 1e5


@dataclass(frozen=True)
class MechanismStep:
    """One homogeneous block of a composed mechanism; validated and normalised on creation."""

    noise_multiplier: float  # σ: noise std / L2 sensitivity
    sample_rate: float  # q in (0, 1]: probability that a user is in a step's batch
    steps: int  # compositions of this block

    def __post_init__(self) -> None:
        _check_entry(self.noise_multiplier, self.sample_rate, self.steps)
        # normalise numpy scalars etc. so that equality and JSON output are plain Python
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))


def _check_entry(sigma: Any, q: Any, steps: Any, where: str = "MechanismStep") -> None:
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise PrivacyError(f"{where}: noise_multiplier={sigma!r} must be a finite number >= 0")
    _check_sample_rate(q, where)
    _check_steps(steps, where)


def _check_sample_rate(q: Any, where: str) -> None:
    if not _is_real(q) or not 0 < q <= 1:
        raise PrivacyError(f"{where}: sample_rate={q!r} must be a number in (0, 1]")


def _check_steps(steps: Any, where: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise PrivacyError(f"{where}: steps={steps!r} must be an integer >= 1")


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# --- ε of a composed history -----------------------------------------------------------------


def epsilon(history: Sequence[MechanismStep], *, delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of the composition of `history` (0 when empty, inf if any block has σ = 0).

    "rdp": Opacus' RDP analysis over its default orders; "prv": Opacus' PRV accountant (an upper
    bound within its default eps_error of 0.01, usually tighter than RDP).
    """
    _check_accountant(accountant)
    _check_delta_range(delta)
    if not history:
        return 0.0
    if any(h.noise_multiplier == 0 for h in history):
        return math.inf
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
        with np.errstate(divide="ignore"):  # Opacus takes log(1 - q), harmlessly -inf at q = 1
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


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant {name!r} is not known; choose one of: {', '.join(ACCOUNTANTS)}")


def _check_delta_range(delta: float) -> None:
    if not _is_real(delta) or not 0 < delta < 1:
        raise PrivacyError(f"delta={delta!r} must be a number in (0, 1); see check_delta for the bound")


# --- noise calibration -----------------------------------------------------------------------


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
    """Smallest σ (to within `tol` in ε) such that ε(prior + (σ, q, steps)) <= target_epsilon.

    The returned σ always satisfies the target; its ε lies in [target - tol, target] unless the
    bisection has converged in σ first. Raises PrivacyError when the prior alone spends the target.
    """
    _check_calibration_args(target_epsilon=target_epsilon, delta=delta, tol=tol)
    _check_sample_rate(sample_rate, "calibrate_noise")
    _check_steps(steps, "calibrate_noise")
    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the earlier releases already spend ε={spent:.3f} of target_epsilon={target_epsilon} "
            f"at δ={delta:g}; give them more noise (larger noise_multiplier) or raise the target"
        )

    def eps_of(sigma: float) -> float:
        block = MechanismStep(sigma, sample_rate, steps)
        return epsilon([*prior, block], delta=delta, accountant=accountant)

    return _bisect_sigma(eps_of, target=target_epsilon, tol=tol)


def _bisect_sigma(eps_of: Callable[[float], float], *, target: float, tol: float) -> float:
    """σ with target - tol <= eps_of(σ) <= target, eps_of decreasing; each σ evaluated once."""
    low, high = 0.0, 1.0
    eps_high = eps_of(high)
    while eps_high > target:  # bracket: double until the target is met
        low, high = high, 2 * high
        if high > _MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"no noise multiplier up to {_MAX_NOISE_MULTIPLIER:g} reaches target_epsilon={target}; "
                "raise the target or train for fewer steps"
            )
        eps_high = eps_of(high)
    while eps_high < target - tol and high - low > 1e-6 * high:
        mid = (low + high) / 2
        eps_mid = eps_of(mid)
        if eps_mid > target:
            low = mid
        else:
            high, eps_high = mid, eps_mid
    return high


def _check_calibration_args(*, target_epsilon: float, delta: float, tol: float) -> None:
    if not _is_real(target_epsilon) or not 0 < target_epsilon < math.inf:
        raise PrivacyError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    _check_delta_range(delta)
    if not _is_real(tol) or not 0 < tol < target_epsilon:
        raise ConfigError(f"tol={tol!r} must be > 0 and smaller than target_epsilon={target_epsilon}")


# --- δ ---------------------------------------------------------------------------------------


def prior_noise(
    *, target_epsilon: float, delta: float, share: float, fixed: float | None = None, accountant: str = "rdp"
) -> float:
    """σ of the one-shot counts release (q = 1): `fixed`, or the σ whose release alone costs
    share · target_epsilon."""
    if fixed is not None:
        return fixed
    return calibrate_noise(target_epsilon=share * target_epsilon, delta=delta, sample_rate=1.0, steps=1,
                           accountant=accountant)


def default_delta(num_users: int) -> float:
    """δ = min(1e-5, 1/(10·users)): a conventional choice strictly below 1/users."""
    if num_users < 1:
        raise PrivacyError(f"cannot choose δ for {num_users} users; the party needs at least one user")
    return min(1e-5, 1.0 / (10 * num_users))


def check_delta(delta: float, num_users: int) -> None:
    """δ must be < 1/users, or a mechanism that publishes one whole user could still satisfy it."""
    if num_users < 1:
        raise PrivacyError(f"cannot check δ for {num_users} users; the party needs at least one user")
    bound = 1.0 / num_users
    if not _is_real(delta) or not 0 < delta < bound:
        raise PrivacyError(
            f"privacy.delta={delta!r} must be > 0 and < 1/users = {bound:.3g} for {num_users} users "
            f"at this client; use e.g. {default_delta(num_users):.1g}"
        )


# --- the accountant --------------------------------------------------------------------------


class PrivacyAccountant:
    """Holds the composed history of one party; ε is computed on demand, never by the optimizer."""

    def __init__(self, *, accountant: str = "rdp") -> None:
        _check_accountant(accountant)
        self._accountant = accountant
        self._history: list[MechanismStep] = []

    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def history(self) -> tuple[MechanismStep, ...]:
        return tuple(self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` compositions of (σ, q); merges with an identical last block."""
        block = MechanismStep(noise_multiplier, sample_rate, steps)
        last = self._history[-1] if self._history else None
        if last is not None and (last.noise_multiplier, last.sample_rate) == (
            block.noise_multiplier, block.sample_rate
        ):
            self._history[-1] = replace(last, steps=last.steps + block.steps)
        else:
            self._history.append(block)

    def epsilon(self, delta: float) -> float:
        return epsilon(self._history, delta=delta, accountant=self._accountant)

    def would_exceed(
        self, *, budget: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> bool:
        """Whether adding the block (σ, q, steps) would take ε above `budget`."""
        block = MechanismStep(noise_multiplier, sample_rate, steps)
        return epsilon([*self._history, block], delta=delta, accountant=self._accountant) > budget

    def make_step_hook(self, sample_rate: float) -> Callable[[Any], None]:
        """A hook for Opacus `DPOptimizer.attach_step_hook`: records (σ that ran, q) per noised step.

        Opacus calls it once per real optimizer step, not for steps skipped while accumulating.
        Like Opacus' own accountant hook, k micro-batches accumulated into one step count as
        sample rate k·q.
        """
        _check_sample_rate(sample_rate, "make_step_hook")

        def hook(optimizer: Any) -> None:
            accumulated = int(optimizer.accumulated_iterations)
            q = sample_rate * accumulated
            if q > 1:
                raise PrivacyError(
                    f"{accumulated} accumulated batches at sample_rate={sample_rate} make an "
                    f"effective sample rate {q:g} > 1; step the optimizer after fewer batches"
                )
            self.step(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=q)

        return hook

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: {"version": 1, "accountant": name, "history": [[σ, q, steps], ...]}."""
        history = [[h.noise_multiplier, h.sample_rate, h.steps] for h in self._history]
        return {"version": STATE_VERSION, "accountant": self._accountant, "history": history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history; validates everything first and changes nothing on error."""
        if not isinstance(state, Mapping):
            raise PrivacyError(f"accountant state must be a mapping, got {type(state).__name__}")
        version = state.get("version")
        if isinstance(version, bool) or version != STATE_VERSION:
            raise PrivacyError(f"accountant state has version {version!r}, expected {STATE_VERSION}")
        if state.get("accountant") != self._accountant:
            raise PrivacyError(
                f"accountant state is for {state.get('accountant')!r}, this one is {self._accountant!r}; "
                "resume with the accountant the state was written by"
            )
        entries = state.get("history")
        if not isinstance(entries, list | tuple):
            raise PrivacyError("accountant state has no history list")
        self._history = [_parse_entry(i, entry) for i, entry in enumerate(entries)]


def _parse_entry(i: int, entry: object) -> MechanismStep:
    where = f"accountant history entry {i}"
    if not isinstance(entry, list | tuple) or len(entry) != 3:
        raise PrivacyError(f"{where} must be [σ, q, steps], got {entry!r}")
    sigma, q, steps = entry
    _check_entry(sigma, q, steps, where=where)
    return MechanismStep(sigma, q, steps)


# --- private statistics ----------------------------------------------------------------------


def private_counts(
    contributions: Sequence[np.ndarray],
    *,
    num_items: int,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | MechanismRandom,
) -> np.ndarray:
    """Per-item user counts under the Gaussian mechanism (one step, q = 1) -> (num_items,) float64.

    Each user's distinct items form a 0/1 vector scaled by min(1, clip_norm/sqrt(k)) so its L2
    norm is <= clip_norm: adding or removing one user moves the sum by at most clip_norm (the
    sensitivity), and the sum gets N(0, (σ·clip_norm)²) per item. The caller records
    MechanismStep(σ, 1.0, 1) for it.
    """
    _check_counts_args(num_items=num_items, clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    total = np.zeros(num_items, dtype=np.float64)
    for u, items in enumerate(contributions):
        unique = np.unique(np.asarray(items))
        if unique.size == 0:
            continue
        if unique.dtype.kind not in "iu" or unique[0] < 0 or unique[-1] >= num_items:
            raise DataError(f"contribution of user #{u} must hold integer item indices in [0, {num_items})")
        total[unique] += min(1.0, clip_norm / math.sqrt(unique.size))
    return total + rng.normal(0.0, noise_multiplier * clip_norm, size=num_items)


def _check_counts_args(*, num_items: int, clip_norm: float, noise_multiplier: float) -> None:
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral) or num_items < 1:
        raise ConfigError(f"num_items={num_items!r} must be an integer >= 1")
    if not _is_real(clip_norm) or not 0 < clip_norm < math.inf:
        raise PrivacyError(f"clip_norm={clip_norm!r} must be a finite number > 0")
    if not _is_real(noise_multiplier) or not 0 <= noise_multiplier < math.inf:
        raise PrivacyError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
