"""ε of a recorded mechanism under four accountants: two that train (Opacus) and two independent ones.

The audit re-derives every ledger's ε from what the ledger says ran (σ, q, steps per release)
with Google's `dp-accounting` — a separate implementation of RDP and of privacy-loss
distributions (PLD, near-exact for the Poisson-subsampled Gaussian) — beside Opacus' RDP and PRV,
which the clients use. All four take the add/remove-one-user neighbouring relation. Plain floats
in and out, no tensors.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import dp_accounting
from dp_accounting import pld, rdp
from fedrec.common.privacy import MechanismStep, epsilon

OPACUS_RDP, OPACUS_PRV = "opacus-rdp", "opacus-prv"
DPACC_RDP, DPACC_PLD = "dp-accounting-rdp", "dp-accounting-pld"
ALL = (OPACUS_RDP, OPACUS_PRV, DPACC_RDP, DPACC_PLD)
INDEPENDENT = (DPACC_RDP, DPACC_PLD)
# the independent accountant of the same family as the one a client trained with
SAME_FAMILY = {"rdp": DPACC_RDP, "prv": DPACC_PLD}


def _event(step: MechanismStep) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(step.noise_multiplier)
    inner = gaussian if step.sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(
        step.sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(inner, step.steps) if step.steps > 1 else inner


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs (via absl) every fractional RDP order it skips; that is not news."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _running(make: Callable[[], dp_accounting.PrivacyAccountant], history: Sequence[MechanismStep],
             delta: float) -> list[float]:
    """ε after each block of `history`, composing incrementally in one dp-accounting accountant."""
    accountant = make()
    out: list[float] = []
    with _quiet_absl():
        for step in history:
            if step.noise_multiplier == 0:
                out.extend([math.inf] * (len(history) - len(out)))
                break
            accountant.compose(_event(step))
            out.append(float(accountant.get_epsilon(delta)))
    return out


def running_epsilons(history: Sequence[MechanismStep], delta: float) -> dict[str, list[float]]:
    """Accountant name -> ε after each block of `history` (cumulative), at `delta`."""
    prefixes = [history[: i + 1] for i in range(len(history))]
    return {
        OPACUS_RDP: [epsilon(p, delta=delta, accountant="rdp") for p in prefixes],
        OPACUS_PRV: [epsilon(p, delta=delta, accountant="prv") for p in prefixes],
        DPACC_RDP: _running(rdp.RdpAccountant, history, delta),
        DPACC_PLD: _running(pld.PLDAccountant, history, delta),
    }


def epsilons(history: Sequence[MechanismStep], delta: float) -> dict[str, float]:
    """Accountant name -> ε of the whole composed `history` at `delta` (0 when empty)."""
    if not history:
        return dict.fromkeys(ALL, 0.0)
    return {name: values[-1] for name, values in running_epsilons(history, delta).items()}
