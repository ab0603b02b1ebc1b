"""The ε maths of user-level DP: a mechanism's history, its ε, noise calibration, δ. No torch.

The privacy unit is the user. A mechanism is a history of homogeneous blocks (σ, q, steps):
σ is the noise multiplier (noise std / L2 sensitivity of one user's whole contribution), q the
probability that a user takes part in a step (Poisson sampling; 1.0 for a full release such as
the prior releases), steps how many times the block was composed. ε is computed by Opacus'
accountants (RDP by default, PRV on request; common/privacy/accountants.py); the functions here
take and return plain Python floats, never tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedrec.common.errors import ConfigError, PrivacyError
from fedrec.common.privacy import accountants

# Calibration gives up beyond this σ: no useful model trains under that much noise.
_MAX_NOISE_MULTIPLIER = 1e5


@dataclass(frozen=True, kw_only=True)
class MechanismStep:
    """One homogeneous block of a composed mechanism; validated and normalised on creation."""

    noise_multiplier: float  # σ: noise std / L2 sensitivity
    sample_rate: float  # q in (0, 1]: probability that a user is in a step's batch
    steps: int  # compositions of this block

    def __post_init__(self) -> None:
        check_entry(self.noise_multiplier, self.sample_rate, self.steps)
        # normalise numpy scalars etc. so that equality and JSON output are plain Python
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))


def check_entry(sigma: Any, q: Any, steps: Any, where: str = "MechanismStep") -> None:
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise PrivacyError(f"{where}: noise_multiplier={sigma!r} must be a finite number >= 0")
    check_sample_rate(q, where)
    _check_steps(steps, where)


def check_sample_rate(q: Any, where: str) -> None:
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
    name = accountants.training_name(accountant)
    _check_delta_range(delta)
    return accountants.epsilon(name, history, delta)


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
    check_sample_rate(sample_rate, "calibrate_noise")
    _check_steps(steps, "calibrate_noise")
    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the earlier releases already spend ε={spent:.3f} of target_epsilon={target_epsilon} "
            f"at δ={delta:g}; give them more noise (larger noise_multiplier) or raise the target"
        )

    def eps_of(sigma: float) -> float:
        block = MechanismStep(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
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
