"""Typed, frozen settings for every part of fedrec; parsed once from TOML and `--set` overrides."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common.errors import ConfigError
from fedrec.common.privacy import accountants

CENTRAL_METHODS = (
    "popularity", "dp-popularity", "itemknn", "dp-cooccurrence", "zero-shot", "central-lora",
    "central-dp-lora",
)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "ml-100k"  # a known asset name or a local directory
    format: str = "auto"  # auto | ml-100k | recbole | csv
    rating_threshold: float | None = None  # None: every interaction is a positive
    max_history: int = 20  # most recent history items pooled into the user vector
    max_users: int = 0  # 0: all users (a smaller number samples users, for quick experiments)

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("auto", "ml-100k", "recbole", "csv"))
        _positive("data.max_history", self.max_history)
        if self.max_users < 0:
            raise ConfigError(f"data.max_users={self.max_users} must be >= 0 (0: all users)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # known name, hub id, local dir or .gguf file
    dtype: str = "float32"
    max_item_tokens: int = 32  # tokens of an item's prompt (and of a text query)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.device", self.device, ("auto", "cpu", "cuda"))
        _positive("model.max_item_tokens", self.max_item_tokens)


@dataclass(frozen=True)
class LoraConfig:
    # The item encoder adapts one per-token module of the last block (everything below it is
    # cached once per catalogue): `down_proj` for Llama-family models, `c_proj` for GPT-2.
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("down_proj",)
    last_layers: int | None = 1  # LoRA on the last N transformer blocks only (None: all)
    variant: str = "lora"  # lora | ffa (A frozen at its random init, only B trained and sent)

    def __post_init__(self) -> None:
        _positive("lora.rank", self.rank)
        _choice("lora.variant", self.variant, ("lora", "ffa"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module, e.g. ['q_proj']")
        if self.last_layers is not None:
            _positive("lora.last_layers", self.last_layers)


@dataclass(frozen=True)
class TrainConfig:
    methods: tuple[str, ...] = CENTRAL_METHODS  # what `fedrec train-central` runs, in order
    epochs: float = 10.0  # non-private training: passes over the users
    batch_size: int = 64  # non-private: users per step; DP: the public normaliser of the noisy sum
    lr: float = 3e-3  # non-private Adam learning rate
    dp_lr: float = 2e-3  # Adam learning rate under DP
    # DP: users are Poisson-sampled with this public rate (1.0: every user in every step, few
    # large steps); steps = dp_epochs / sample_rate, none of it derived from the private user count
    sample_rate: float = 1.0
    dp_epochs: float = 5.0  # central DP training: expected passes (= steps at sample_rate 1)
    max_sequence: int = 100  # most recent training items of a user in the all-position loss
    # 0: full softmax over the catalogue (what learns; measured); K > 0: K negatives per step drawn
    # from the noisy popularity and shared by the step's users (sampled softmax, logQ-corrected)
    negatives: int = 0
    temperature: float = 0.07  # softmax temperature over cosine similarities
    seed: int = 0  # data split, partitions, LoRA init; never the DP noise or sampling masks
    # Seeded (reproducible) noise and sampling masks: tests and benchmarks only, NOT private;
    # recorded in every ledger line; a client whose own policy does not allow it refuses.
    deterministic: bool = False

    def __post_init__(self) -> None:
        for method in self.methods:
            _choice("train.methods", method, CENTRAL_METHODS)
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        _positive("train.dp_lr", self.dp_lr)
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"train.sample_rate={self.sample_rate} must be in (0, 1]")
        _positive("train.dp_epochs", self.dp_epochs)
        _positive("train.max_sequence", self.max_sequence)
        if self.negatives < 0:
            raise ConfigError(f"train.negatives={self.negatives} must be >= 0 (0: full softmax)")
        _positive("train.temperature", self.temperature)


@dataclass(frozen=True)
class PrivacyConfig:
    target_epsilon: float = 8.0  # total user-level budget: DP-SGD and the prior release together
    delta: float | None = None  # None: min(1e-5, 1/(10·users))
    clip_norm: float = 0.5  # per-user L2 bound on the LoRA gradient (near the median per-user norm)
    accountant: str = "rdp"  # rdp | prv
    secure_rng: bool = False
    # None: calibrate σ so the whole plan (prior release + every round) spends target_epsilon;
    # a number: use this σ as is (each client still refuses rounds beyond its own budget)
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        _positive("privacy.target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None and not 0 <= self.noise_multiplier < math.inf:
            raise ConfigError(f"privacy.noise_multiplier={self.noise_multiplier} must be a finite "
                              "number >= 0")
        _positive("privacy.clip_norm", self.clip_norm)
        _choice("privacy.accountant", self.accountant, tuple(accountants.TRAINING))
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta={self.delta} must be in (0, 1)")


@dataclass(frozen=True)
class PriorConfig:
    enabled: bool = True  # release private popularity (and co-occurrence) and blend it in
    cooccurrence: bool = True  # also release item–item co-occurrence over the head items
    head_size: int = 300  # items modelled collaboratively: the most popular by noisy count
    # The releases are charged to the same user-level budget. Their σ is calibrated so that they
    # alone cost budget_share · ε (popularity_share of it for popularity, the rest co-occurrence);
    # DP-SGD's σ is then calibrated for the whole ε (RDP composition is sublinear). A fixed
    # noise_multiplier (σ of the two releases combined) overrides the share.
    budget_share: float = 0.85
    popularity_share: float = 0.3
    clip_norm: float = 1.0  # per-user bound: popularity L2 norm, co-occurrence Frobenius norm
    noise_multiplier: float | None = None
    beta: float = 0.05  # CF score: weight of log(1 + noisy popularity)
    shrink: float = 5.0  # CF score: shrinkage of the co-occurrence cosine
    residual_scale: float = 10.0  # training: the LLM's logits are added to scale·CF (learns the residual)
    weight: float = 1.0  # w in score = CF + w·LLM cosine, unless tuned
    tune_weight: bool = True  # choose w on the validation users from BLEND_WEIGHTS (common/evaluation.py)

    def __post_init__(self) -> None:
        _positive("prior.clip_norm", self.clip_norm)
        _positive("prior.head_size", self.head_size)
        if not 0 < self.popularity_share < 1:
            raise ConfigError(f"prior.popularity_share={self.popularity_share} must be between 0 and 1 "
                              "(exclusive)")
        for key in ("weight", "beta", "shrink", "residual_scale"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ConfigError(f"prior.{key}={getattr(self, key)} must be a finite number >= 0")
        if not 0 < self.budget_share < 1:
            raise ConfigError(f"prior.budget_share={self.budget_share} must be between 0 and 1 (exclusive)")
        if self.noise_multiplier is not None:
            _positive("prior.noise_multiplier", self.noise_multiplier)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10,)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"eval.ks={list(self.ks)} must be a non-empty list of positive ints")
        _positive("eval.batch_size", self.batch_size)


FED_STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass(frozen=True)
class FederatedConfig:
    clients: int = 3  # simulated clients (iid/dirichlet); attribute/mapping schemes define their own
    partition: str = "iid"  # iid | dirichlet | attribute | mapping
    alpha: float = 0.5  # dirichlet concentration
    attribute: str | None = None  # user attribute for dirichlet/attribute (None: dominant genre)
    mapping_file: str | None = None  # user_id,client CSV for partition = "mapping"
    rounds: int = 3
    local_epochs: float = 2.0  # expected passes over the client's users per round (steps at q = 1)
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam (Flower's strategies)
    # users | uniform. Clients send weight 1 (their user count is private), so both are uniform.
    weighting: str = "users"
    proximal_mu: float = 0.01  # fedprox only
    server_lr: float = 0.1  # fedadam only (eta)
    dp: bool = True  # user-level DP-SGD at every client (false: plain local training)
    # Budgets of the simulated clients: their own local setting, never sent by the server.
    # client name -> ε; clients not named get privacy.target_epsilon.
    client_budgets: dict[str, float] = field(default_factory=dict)
    # The simulated institutions' policies (client/policy.py): client name (or "*" for every
    # client) -> node-config keys, e.g. {"*" = {allow-non-private = true}}; not read by deployed
    # clients, whose policy is their own node config.
    client_policy: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_cpus: float = 2.0  # CPU cores per simulated client (2 on a 2-core machine: one at a time)
    num_gpus: float = 0.0  # GPU share per simulated client
    timeout: float = 3600.0  # seconds the server waits for replies in one round
    eval_every: int = 1  # federated validation every N rounds (the last round always)
    # Faults: a round goes ahead once every client is connected, or after `join_wait` seconds
    # with at least `min_clients` connected; a round whose trained replies number fewer than
    # `min_clients` leaves the global adapter unchanged. None: every client, every round.
    min_clients: int | None = None
    join_wait: float = 60.0
    # Secure aggregation (Flower's SecAgg+): the server learns only the weighted sum of the
    # adapters. Shares/threshold: a fraction of the round's clients (<= 1) or a count (> 1).
    secagg: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    secagg_clip: float = 8.0  # every adapter value is clipped to [-clip, clip] before quantisation
    secagg_max_weight: float = 1000.0  # bound on a client's weight (its user count; 1 if uniform)
    # An existing Ray cluster for `fedrec simulate` ("auto" or "HOST:6379"); None: a local Ray.
    ray_address: str | None = None

    def __post_init__(self) -> None:
        _positive("fed.clients", self.clients)
        _choice("fed.partition", self.partition, ("iid", "dirichlet", "attribute", "mapping"))
        _positive("fed.alpha", self.alpha)
        _positive("fed.rounds", self.rounds)
        _positive("fed.local_epochs", self.local_epochs)
        _choice("fed.strategy", self.strategy, FED_STRATEGIES)
        _choice("fed.weighting", self.weighting, ("users", "uniform"))
        if self.proximal_mu < 0:
            raise ConfigError(f"fed.proximal_mu={self.proximal_mu} must be >= 0")
        _positive("fed.server_lr", self.server_lr)
        for name, eps in self.client_budgets.items():
            _positive(f"fed.client_budgets.{name}", eps)
        for name, table in self.client_policy.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"fed.client_policy.{name} must be a table of policy settings")
        _positive("fed.num_cpus", self.num_cpus)
        _positive("fed.timeout", self.timeout)
        _positive("fed.eval_every", self.eval_every)
        if self.min_clients is not None and not 1 <= self.min_clients:
            raise ConfigError(f"fed.min_clients={self.min_clients} must be >= 1 (or empty: all clients)")
        if self.join_wait < 0:
            raise ConfigError(f"fed.join_wait={self.join_wait} must be >= 0 seconds")
        _positive("fed.secagg_shares", self.secagg_shares)
        if not 0 < self.secagg_threshold <= 1 and self.secagg_threshold != int(self.secagg_threshold):
            raise ConfigError(f"fed.secagg_threshold={self.secagg_threshold} must be a fraction in "
                              "(0, 1] or a whole number of shares")
        _positive("fed.secagg_clip", self.secagg_clip)
        _positive("fed.secagg_max_weight", self.secagg_max_weight)


@dataclass(frozen=True)
class Config:
    name: str = "central"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fed: FederatedConfig = field(default_factory=FederatedConfig)


# --- parsing -------------------------------------------------------------------------------


def load_config(path: Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (optional), apply `key=value` overrides, validate, return a Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(Config, raw)


def from_dict(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown setting {prefix}{unknown[0]}; allowed here: {allowed}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A TOML-serialisable dict of a (nested) config dataclass; None values are dropped."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, dict):
            if value:
                out[f.name] = dict(value)
        elif value is not None:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table of name = value, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. train.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as a path or a method name
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[leaf] = value


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    """> 0 and finite: inf and nan are config errors, not budgets or rates."""
    if not 0 < value < math.inf:
        raise ConfigError(f"{key}={value} must be a finite number > 0")


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """A Config from Flower's flat run_config ({"fed.rounds": 3, ...}); keys outside it are ignored.

    Flower flattens `[tool.flwr.app.config]` tables into dotted keys; "name" and the sections of
    Config are read, other keys (e.g. "output") belong to the app and are left to it.
    """
    sections = {f.name for f in dataclasses.fields(Config)}
    raw: dict[str, Any] = {}
    for key, value in run_config.items():
        head, _, rest = key.partition(".")
        if head not in sections:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value if not isinstance(value, str) or value != "" else None
    return from_dict(Config, raw)


def to_run_config(config: Config) -> dict[str, Any]:
    """The flat, dotted form of `config` (the inverse of from_run_config)."""

    def flat(prefix: str, node: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, Mapping):
                out |= flat(f"{prefix}{key}.", value)
            else:
                out[prefix + key] = value
        return out

    return flat("", to_dict(config))
