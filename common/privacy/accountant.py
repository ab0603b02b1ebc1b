"""The stateful accountant: one party's composed history, persisted and restored with validation.

Like Opacus' accountants it only records (σ, q, steps); ε is computed on demand from the history
(common/privacy/analysis.py), never by the optimizer — a DP-SGD step reports itself through the
hook `make_step_hook` attaches to Opacus' `DPOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from fedrec.common.errors import PrivacyError
from fedrec.common.privacy import accountants
from fedrec.common.privacy.analysis import MechanismStep, check_entry, check_sample_rate, epsilon

STATE_VERSION = 1


class PrivacyAccountant:
    """Holds the composed history of one party; ε is computed on demand, never by the optimizer."""

    def __init__(self, *, accountant: str = "rdp") -> None:
        accountants.training_name(accountant)  # a known name, or ConfigError
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
        block = MechanismStep(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
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
        block = MechanismStep(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return epsilon([*self._history, block], delta=delta, accountant=self._accountant) > budget

    def make_step_hook(self, sample_rate: float) -> Callable[[Any], None]:
        """A hook for Opacus `DPOptimizer.attach_step_hook`: records (σ that ran, q) per noised step.

        Opacus calls it once per real optimizer step, not for steps skipped while accumulating.
        Like Opacus' own accountant hook, k micro-batches accumulated into one step count as
        sample rate k·q.
        """
        check_sample_rate(sample_rate, "make_step_hook")

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
    check_entry(sigma, q, steps, where=where)
    return MechanismStep(noise_multiplier=sigma, sample_rate=q, steps=steps)
