"""A party: one privacy unit's plan and spending — δ, budget, accountant, the σ of every release,
refusals, and the ledger its releases are recorded in.

A party is whoever holds users' data and answers for their guarantee: a federated client (an
institution), each central reference method (simulations/central.py), the client the canary audit
trains. Its δ is its policy's, or min(1e-5, 1/(10·users)), and always < 1/users. Its plan sizes
the noise of its releases from its one ε budget: the prior releases take their share
(common/prior.py `plan_releases`), evaluations theirs, and DP-SGD's σ is calibrated so that
everything planned spends exactly the budget, never below the policy's floor. A release that would
take ε past the budget is refused with a reason; one that is made is composed in the accountant
and recorded as a `LedgerLine` (ε after it, the randomness that ran, the policy digest), chained
and signed by its `Ledger`.

No torch; the numbers are exactly those of the functions in common/privacy/analysis.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedrec.common.errors import DataError, PrivacyError
from fedrec.common.ledger import MECHANISM_NON_PRIVATE, Ledger, LedgerLine
from fedrec.common.prior import ReleasePlan, plan_releases
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.analysis import (
    MechanismStep,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
)

MAX_EVAL_SIGMA = 1e5  # an evaluation σ no budget can certify a smaller one for
_SLACK = 1e-9  # relative: a release that reaches the budget exactly is within it


@dataclass(frozen=True)
class Refusal:
    """A release the budget does not allow: why (for the reply), and the ε it would have reached."""

    reason: str
    epsilon: float


class Party:
    """The plan and spending of one privacy unit (see the module docstring).

    `users` only fixes δ (when the policy gives none) and checks it; it is never recorded for a
    federated client, whose user count is private."""

    def __init__(self, *, name: str, users: int, budget: float, delta: float | None = None,
                 accountant: str = "rdp", min_noise_multiplier: float = 0.0,
                 policy_sha256: str | None = None, ledger: Ledger | None = None) -> None:
        self.name, self.budget = name, budget
        self.delta = delta if delta is not None else default_delta(users)
        check_delta(self.delta, users)
        self.accountant = PrivacyAccountant(accountant=accountant)
        self.min_noise_multiplier = min_noise_multiplier
        self.policy_sha256 = policy_sha256
        self.ledger = ledger if ledger is not None else Ledger()
        self.noise_multiplier: float | None = None  # DP-SGD's σ, kept from its first round on
        self.eval_noise_multiplier: float | None = None  # evaluations' σ, kept from the first release

    # -- spending ----------------------------------------------------------------------------

    @property
    def spent(self) -> float:
        """ε so far (0 before any release)."""
        return self.accountant.epsilon(self.delta) if self.accountant.history else 0.0

    def epsilon_after(self, planned: Sequence[MechanismStep]) -> float:
        """ε once the releases `planned` are made too."""
        return epsilon([*self.accountant.history, *planned], delta=self.delta,
                       accountant=self.accountant.accountant)

    def refusal(self, planned: Sequence[MechanismStep], what: str) -> Refusal | None:
        """Why `what` (the releases `planned`) is refused, or None when the budget allows it."""
        after = self.epsilon_after(planned)
        if after <= self.budget * (1 + _SLACK):
            return None
        return Refusal(f"{self.name}: {what} would raise ε from {self.spent:.3f} to {after:.3f}, over "
                       f"this client's budget {self.budget:g} (δ={self.delta:.1e}); refused", after)

    def record(self, mechanism: str, step: MechanismStep, *, rnd: int, clip_norm: float, rng: str,
               accounted: bool = False, users: int | None = None, split: str | None = None,
               prior_sha256: str | None = None, run_id: str | None = None,
               adapter_sha256: str | None = None) -> LedgerLine:
        """Spend `step` (`accounted`: DP-SGD's step hook already composed it) and append its line,
        ε after it, to the ledger; returns the chained line."""
        if not accounted:
            self.accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate,
                                 steps=step.steps)
        line = LedgerLine(
            round=rnd, mechanism=mechanism, noise_multiplier=step.noise_multiplier,
            sample_rate=step.sample_rate, steps=step.steps, clip_norm=clip_norm, delta=self.delta,
            epsilon=self.accountant.epsilon(self.delta), accountant=self.accountant.accountant,
            budget=self.budget, users=users, dp=mechanism != MECHANISM_NON_PRIVATE, rng=rng,
            policy_sha256=self.policy_sha256, split=split, prior_sha256=prior_sha256, run_id=run_id,
            adapter_sha256=adapter_sha256,
        )
        return self.ledger.append(line)

    # -- the plan ----------------------------------------------------------------------------

    def prior_plan(self, *, share: float, popularity_share: float, cooccurrence: bool,
                   fixed_sigma: float | None = None) -> ReleasePlan:
        """σ of the popularity and co-occurrence releases: together `share` of the budget."""
        return plan_releases(epsilon=self.budget, delta=self.delta, share=share,
                             popularity_share=popularity_share, cooccurrence=cooccurrence,
                             accountant=self.accountant.accountant, fixed_sigma=fixed_sigma)

    def eval_sigma(self, *, share: float, releases: int, fixed: float | None = None) -> float:
        """σ of an evaluation release: `fixed` (the policy's), or the one kept since the first
        release, or calibrated so that `releases` of them (q = 1) cost `share` of the budget.

        Below ε ≈ 0.2 at δ = 1e-5 the RDP conversion cannot certify any σ, so the target doubles
        until one is found (at most the whole budget); past that, MAX_EVAL_SIGMA (the metrics are
        then noise, and cost next to nothing in the composition)."""
        kept = fixed or self.eval_noise_multiplier
        if kept is not None:
            return kept
        target = share * self.budget
        while True:
            try:
                return calibrate_noise(target_epsilon=target, delta=self.delta, sample_rate=1.0,
                                       steps=releases, accountant=self.accountant.accountant)
            except PrivacyError:
                if target >= self.budget:
                    return MAX_EVAL_SIGMA
                target = min(self.budget, 2 * target)

    def sgd_sigma(self, *, sample_rate: float, steps: int,
                  planned: Callable[[], Sequence[MechanismStep]] | None = None,
                  fixed: float | None = None) -> float:
        """σ of DP-SGD: the one kept since its first round; else `fixed` (the run's setting); else
        calibrated so that what was spent, the releases `planned()` (asked only here: planning them
        may itself fail) and `steps` steps at q spend exactly the budget. Never below the policy's
        floor. PrivacyError: nothing is left for DP-SGD."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if fixed is not None:
            return max(fixed, self.min_noise_multiplier)
        later = planned() if planned is not None else ()
        sigma = calibrate_noise(target_epsilon=self.budget, delta=self.delta, sample_rate=sample_rate,
                                steps=steps, prior=[*self.accountant.history, *later],
                                accountant=self.accountant.accountant)
        return max(sigma, self.min_noise_multiplier)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The spending: accountant history, ledger lines, the σ's kept (JSON-serialisable)."""
        return {"accountant": self.accountant.state_dict(), "ledger": self.ledger.state_dict(),
                "noise_multiplier": self.noise_multiplier,
                "eval_noise_multiplier": self.eval_noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the spending; validates everything first and changes nothing on error."""
        if not isinstance(state, Mapping) or "accountant" not in state or "ledger" not in state:
            raise DataError(f"{self.name}: a party's state needs its accountant and its ledger")
        sigmas = [state.get("noise_multiplier"), state.get("eval_noise_multiplier")]
        for sigma in sigmas:
            if sigma is not None and not _sigma(sigma):
                raise DataError(f"{self.name}: a kept noise multiplier {sigma!r} is not a finite number >= 0")
        accountant = PrivacyAccountant(accountant=self.accountant.accountant)
        accountant.load_state_dict(state["accountant"])
        self.ledger.load_state_dict(state["ledger"], source=f"{self.name}'s ledger")  # last to raise
        self.accountant = accountant
        self.noise_multiplier, self.eval_noise_multiplier = sigmas


def _sigma(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
