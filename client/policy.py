"""An institution's privacy policy: what decides its guarantee, read from its own settings only.

The coordinator chooses the run config and the messages; the institution chooses this. Values
that *are* the guarantee — ε budget, δ, clip norms, accountant, the evaluation mechanism — are
taken from the policy and never from the coordinator's Config. Values the coordinator plans with
— DP on or off, a fixed σ, the sample rate q, local epochs and steps, the prior release,
evaluation cut-offs and β grid — are checked against the policy's bounds, and a request outside
them is refused with a `policy-conflict` reason the coordinator sees (`check_request`).

Where the policy comes from:
- a deployed SuperNode: its node config (settings.toml), keys as in `NODE_KEYS`;
- `fedrec simulate`: each simulated institution's settings, built from the simulation's config
  file by `simulated_policy` (`fed.client_budgets`, and `fed.client_policy`, a table of node-config
  keys per client name or "*" for all).

The client pins the policy's digest in its state at its first release and refuses to release
under a different one (client/local.py): a budget, δ or clip norm cannot drift within one
client's history; a new policy needs a new state directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedrec.common.errors import ConfigError
from fedrec.common.evaluation import BLEND_WEIGHTS
from fedrec.common.privacy import accountants
from fedrec.common.wire import POLICY_CONFLICT

if TYPE_CHECKING:
    from fedrec.common.config import Config



@dataclass(frozen=True)
class Policy:
    """One institution's privacy policy (all values validated; frozen)."""

    epsilon_budget: float
    delta: float | None = None  # None: min(1e-5, 1/(10·users at this client))
    clip_norm: float = 1.0  # per-user L2 bound of a DP-SGD gradient
    accountant: str = "rdp"  # rdp | prv
    allow_non_private: bool = False  # train without DP when the run asks for fed.dp = false
    min_noise_multiplier: float = 0.0  # floor on DP-SGD's σ (a calibrated σ is raised to it)
    max_sample_rate: float = 1.0  # bound on the public Poisson rate q the run asks for
    max_local_epochs: float = 10.0
    max_steps_per_round: int = 1000
    allow_prior: bool = True  # release the private item counts (round 0)
    prior_clip_norm: float = 1.0
    prior_budget_share: float = 0.85  # the prior releases alone cost this share of ε
    evaluation: str = "dp"  # dp: metrics under the Gaussian mechanism, charged | off: none leave
    eval_ks: tuple[int, ...] = (10,)  # the only cut-offs this client evaluates
    eval_betas: tuple[float, ...] = BLEND_WEIGHTS  # the only blend weights it evaluates
    # σ of an evaluation release (sensitivity: client/local.py noisy_metrics); None: calibrated at
    # the first release so that one evaluation per round plus the test cost eval_budget_share · ε
    eval_noise_multiplier: float | None = None
    eval_budget_share: float = 0.1
    deterministic: bool = False  # seeded randomness: tests and benchmarks only, NOT private

    def __post_init__(self) -> None:
        _finite_positive("epsilon-budget", self.epsilon_budget)
        if self.delta is not None and not (_real(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"policy delta={self.delta!r} must be a number in (0, 1)")
        _finite_positive("clip-norm", self.clip_norm)
        if self.accountant not in accountants.TRAINING:
            raise ConfigError(f"policy accountant={self.accountant!r}: choose one of "
                              f"{', '.join(accountants.TRAINING)}")
        if not (_real(self.min_noise_multiplier) and 0 <= self.min_noise_multiplier < math.inf):
            raise ConfigError(f"policy min-noise-multiplier={self.min_noise_multiplier!r} must be a "
                              "finite number >= 0")
        if not (_real(self.max_sample_rate) and 0 < self.max_sample_rate <= 1):
            raise ConfigError(f"policy max-sample-rate={self.max_sample_rate!r} must be in (0, 1]")
        _finite_positive("max-local-epochs", self.max_local_epochs)
        if isinstance(self.max_steps_per_round, bool) or not isinstance(self.max_steps_per_round, int) \
                or self.max_steps_per_round < 1:
            raise ConfigError(f"policy max-steps-per-round={self.max_steps_per_round!r} must be an "
                              "integer >= 1")
        _finite_positive("prior-clip-norm", self.prior_clip_norm)
        if not (_real(self.prior_budget_share) and 0 < self.prior_budget_share < 1):
            raise ConfigError(f"policy prior-budget-share={self.prior_budget_share!r} must be in (0, 1)")
        if self.evaluation not in ("dp", "off"):
            raise ConfigError(f"policy evaluation={self.evaluation!r}: choose \"dp\" or \"off\"")
        if not self.eval_ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                   for k in self.eval_ks):
            raise ConfigError(f"policy eval-ks={list(self.eval_ks)} must be positive integers")
        if not self.eval_betas or any(not (_real(b) and 0 <= b < math.inf) for b in self.eval_betas):
            raise ConfigError(f"policy eval-betas={list(self.eval_betas)} must be finite numbers >= 0")
        if self.eval_noise_multiplier is not None:
            _finite_positive("eval-noise-multiplier", self.eval_noise_multiplier)
        if not (_real(self.eval_budget_share) and 0 < self.eval_budget_share < 1
                and self.prior_budget_share + self.eval_budget_share < 1):
            raise ConfigError(f"policy eval-budget-share={self.eval_budget_share!r} must be in (0, 1) and, "
                              f"with prior-budget-share={self.prior_budget_share}, leave some ε for DP-SGD")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def digest(self) -> str:
        """sha256 of the canonical JSON of every field: what the client pins and the ledger names."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# node-config key -> Policy field
NODE_KEYS = {
    "epsilon-budget": "epsilon_budget", "delta": "delta", "clip-norm": "clip_norm",
    "accountant": "accountant", "allow-non-private": "allow_non_private",
    "min-noise-multiplier": "min_noise_multiplier", "max-sample-rate": "max_sample_rate",
    "max-local-epochs": "max_local_epochs", "max-steps-per-round": "max_steps_per_round",
    "allow-prior": "allow_prior", "prior-clip-norm": "prior_clip_norm",
    "prior-budget-share": "prior_budget_share", "evaluation": "evaluation", "eval-ks": "eval_ks",
    "eval-betas": "eval_betas", "eval-noise-multiplier": "eval_noise_multiplier",
    "eval-budget-share": "eval_budget_share",
    "deterministic": "deterministic",
}
# node-config keys that are the client's other settings, not its policy
OTHER_NODE_KEYS = ("client-name", "state-dir", "data", "cache-dir", "partition-id", "num-partitions",
                   "fedrec-version")  # the version pin: checked by client/app.py


def policy_from_settings(settings: Mapping[str, Any], *, where: str,
                         defaults: Mapping[str, Any] | None = None) -> Policy:
    """A Policy from node-config style keys (`epsilon-budget = 8.0`, ...) over `defaults`
    (Policy field -> value); unknown policy-like keys are errors, so a typo cannot weaken it."""
    values: dict[str, Any] = dict(defaults or {})
    for key, raw in settings.items():
        if key in OTHER_NODE_KEYS:
            continue
        if key not in NODE_KEYS:
            raise ConfigError(f"{where}: unknown setting {key!r}; policy settings are "
                              f"{', '.join(NODE_KEYS)}")
        values[NODE_KEYS[key]] = _parse(NODE_KEYS[key], raw, f"{where} {key}")
    if "epsilon_budget" not in values:
        raise ConfigError(f"{where} has no epsilon-budget; a client sets its own budget, "
                          "e.g. --node-config \"epsilon-budget=8.0\"")
    return Policy(**values)


def simulated_policy(cfg: Config, name: str) -> Policy:
    """The policy of simulated institution `name`: the simulation config's privacy settings as the
    institutions' own (they are fixed before the run starts), then fed.client_policy overrides."""
    defaults: dict[str, Any] = {
        "epsilon_budget": cfg.fed.client_budgets.get(name, cfg.privacy.target_epsilon),
        "delta": cfg.privacy.delta, "clip_norm": cfg.privacy.clip_norm,
        "accountant": cfg.privacy.accountant, "prior_clip_norm": cfg.prior.clip_norm,
        "prior_budget_share": cfg.prior.budget_share, "eval_ks": tuple(cfg.eval.ks),
        "deterministic": cfg.train.deterministic,
    }
    table = cfg.fed.client_policy
    settings = {**dict(table.get("*", {})), **dict(table.get(name, {}))}
    return policy_from_settings(settings, where=f"fed.client_policy for {name}", defaults=defaults)


def check_request(policy: Policy, cfg: Config, *, client: str, local_epochs: float, steps: int,
                  sample_rate: float) -> str | None:
    """Why this client refuses to train as `cfg` and the round's plan ask, or None if it may."""
    asks: list[tuple[bool, str]] = [
        (not cfg.fed.dp and not policy.allow_non_private, "fed.dp=false"),
        (cfg.train.deterministic and not policy.deterministic, "train.deterministic=true"),
        (cfg.fed.dp and cfg.privacy.noise_multiplier is not None
         and cfg.privacy.noise_multiplier < policy.min_noise_multiplier,
         f"privacy.noise_multiplier={cfg.privacy.noise_multiplier} (below the floor "
         f"{policy.min_noise_multiplier:g})"),
        (sample_rate > policy.max_sample_rate,
         f"train.sample_rate={sample_rate:g} (above {policy.max_sample_rate:g})"),
        (local_epochs > policy.max_local_epochs,
         f"local-epochs={local_epochs:g} (above {policy.max_local_epochs:g})"),
        (steps > policy.max_steps_per_round,
         f"{steps} steps per round (above {policy.max_steps_per_round})"),
    ]
    return _conflict(asks, client)


def check_prior(policy: Policy, cfg: Config, *, client: str) -> str | None:
    return _conflict([(not policy.allow_prior, "the prior counts release (prior.enabled)"),
                      (cfg.train.deterministic and not policy.deterministic, "train.deterministic=true")],
                     client)


def check_evaluation(policy: Policy, *, client: str, ks: tuple[int, ...] | None,
                     betas: tuple[float, ...]) -> str | None:
    """An evaluation uses only the policy's cut-offs and β grid; anything else is refused."""
    extra = [b for b in betas if not any(math.isclose(b, g, rel_tol=0, abs_tol=1e-12)
                                         for g in policy.eval_betas)]
    return _conflict([
        (policy.evaluation == "off", "an evaluation (evaluation = \"off\")"),
        (len(betas) > len(policy.eval_betas) or len(set(betas)) != len(betas),
         f"{len(betas)} prior weights (the grid has {len(policy.eval_betas)})"),
        (bool(extra), f"prior weight(s) {extra[:3]} outside the grid {list(policy.eval_betas)}"),
        (ks is not None and tuple(ks) != policy.eval_ks, f"cut-offs {list(ks or ())} "
         f"(this client evaluates {list(policy.eval_ks)})"),
    ], client)


def _conflict(asks: list[tuple[bool, str]], client: str) -> str | None:
    bad = [what for refused, what in asks if refused]
    if not bad:
        return None
    return f"{POLICY_CONFLICT}: {'; '.join(bad)} not allowed at {client}"


# --- parsing ---------------------------------------------------------------------------------


def _parse(name: str, raw: Any, where: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Policy)}[name]
    if name in ("eval_ks", "eval_betas"):
        items = raw if isinstance(raw, list | tuple) else str(raw).replace(";", ",").split(",")
        cast = int if name == "eval_ks" else float
        try:
            return tuple(cast(str(x).strip()) if isinstance(x, str) else cast(x) for x in items)
        except ValueError:
            raise ConfigError(f"{where}={raw!r} must be a list of numbers, e.g. \"10,20\"") from None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        raise ConfigError(f"{where}={raw!r} must be true or false")
    if kind == "str":
        return str(raw)
    if name == "max_steps_per_round":
        if isinstance(raw, bool) or not isinstance(raw, int | str) or not str(raw).strip().isdigit():
            raise ConfigError(f"{where}={raw!r} must be a whole number")
        return int(raw)
    if isinstance(raw, bool):
        raise ConfigError(f"{where}={raw!r} must be a number")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={raw!r} is not a number") from None


def _real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def _finite_positive(key: str, value: Any) -> None:
    if not (_real(value) and 0 < value < math.inf):
        raise ConfigError(f"policy {key}={value!r} must be a finite number > 0")
