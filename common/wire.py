"""The wire protocol between the ServerApp and the ClientApp: message types, the names of records
and keys, and the request and reply records each side builds and parses (this module is the only
place they are spelled).

Flower-free: the apps (server/app.py, client/app.py) wrap these plain mappings in Flower's
ConfigRecord / MetricRecord / ArrayRecord and nothing else. Everything received is parsed here
before it is used; a malformed request or reply raises `WireError`, which each side turns into a
`bad-request` status or a failure it names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrec.common.errors import DataError

# --- message types ----------------------------------------------------------------------------------

TRAIN, EVALUATE = "train", "evaluate"  # Flower's own categories (flwr.app.MessageType)
QUERY_PRIOR = "query.prior"  # round 0: release noisy popularity
QUERY_COOCCURRENCE = "query.cooccurrence"  # round 0: release noisy co-occurrence over a head

# --- records of a message's content ----------------------------------------------------------------

ARRAYS = "arrays"  # the adapter tensors (down: global; up: the client's)
CONFIG = "config"  # the request (RoundRequest, EvalRequest)
METRICS = "metrics"  # the reply's scalars
STATUS = "status"  # the reply's status, reason and client name
LEDGER = "ledger"  # the reply's chained ledger line (common/ledger.py)
PRIOR = "prior"  # the global collaborative prior (common/prior.py tensors)
HEAD = "head"  # the head items the co-occurrence release is asked over (record and tensor name)

# tensors of the prior releases
COUNTS = "counts"
COOCCURRENCE = "cooccurrence"

# --- request keys ----------------------------------------------------------------------------------

RUN_ID, ROUND, NUM_ROUNDS = "run-id", "server-round", "num-rounds"
LOCAL_EPOCHS, LR, PROXIMAL_MU = "local-epochs", "lr", "proximal-mu"
SPLIT, WEIGHTS, KS = "split", "weights", "ks"

# --- reply keys ------------------------------------------------------------------------------------

STATUS_KEY, REASON, CLIENT = "status", "reason", "client"
NUM_EXAMPLES = "num-examples"  # a training reply's weight (always 1: the user count is private);
# an evaluation's noisy user count
UNIFORM = "uniform"  # the weight of `fed.weighting = "uniform"`
STEPS = "steps"
EPSILON, DELTA, BUDGET = "epsilon", "delta", "budget"
EPSILON_REFUSED = "epsilon_refused"  # the ε a refused release would have reached
LOSS = "loss"  # a training loss (fedrec's clients send none: it is not a release)
LEDGER_PREFIX = "ledger."  # "ledger.<field>" metrics: the line of a client without ledger chains
HR, NDCG, MRR = "hr@", "ndcg@", "mrr@"  # evaluation metrics, one per cut-off K: "ndcg@10"
METRIC_PREFIXES = (HR, NDCG, MRR)

# statuses
OK, OVER_BUDGET, NO_DATA = "ok", "over-budget", "no-data"
POLICY_CONFLICT, BAD_REQUEST = "policy-conflict", "bad-request"

# SecAgg+ (legacy FitIns/FitRes records: no nested records, so these travel in the config/metrics)
SECAGG_LEDGER = "fedrec-ledger"  # FitRes metrics: the chained ledger line, as JSON
SECAGG_KEYS = "fedrec-keys"  # FitIns config: the adapter's tensor names, "\n"-joined, in order
SECAGG_WEIGHT = "fedrec-weight-key"  # FitIns config: the metric that is the client's weight

VALID, TEST = "valid", "test"  # the evaluation splits
SPLITS = (VALID, TEST)


class WireError(DataError):
    """A message that does not parse: a missing or malformed key."""


def action(message_type: str) -> str:
    """The action of a "<category>.<action>" message type (the name a ClientApp handler registers)."""
    return message_type.partition(".")[2]


def metric_key(prefix: str, k: int) -> str:
    """The name of one evaluation metric at cut-off `k`, e.g. metric_key(NDCG, 10) == "ndcg@10"."""
    return f"{prefix}{k}"


# --- requests ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks for in one round or release (plan parameters only, never a budget)."""

    run_id: str
    round: int
    num_rounds: int
    local_epochs: float
    lr: float
    proximal_mu: float = 0.0

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {RUN_ID: self.run_id, ROUND: self.round, NUM_ROUNDS: self.num_rounds,
                               LOCAL_EPOCHS: self.local_epochs, LR: self.lr}
        if self.proximal_mu:
            out[PROXIMAL_MU] = self.proximal_mu
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundRequest:
        try:
            return cls(run_id=str(config[RUN_ID]), round=_int(config[ROUND]),
                       num_rounds=_int(config[NUM_ROUNDS]), local_epochs=_finite(config[LOCAL_EPOCHS]),
                       lr=_finite(config[LR]), proximal_mu=_finite(config.get(PROXIMAL_MU, 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed round request ({_why(exc)})") from None


@dataclass(frozen=True)
class EvalRequest:
    """An evaluation: the split, the blend weights to score (empty: the LLM alone), cut-offs."""

    split: str
    round: int = -1
    run_id: str | None = None
    weights: tuple[float, ...] = ()
    ks: tuple[int, ...] | None = None  # None: the client's own cut-offs

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {SPLIT: self.split, ROUND: self.round}
        if self.run_id is not None:
            out[RUN_ID] = self.run_id
        if self.weights:
            out[WEIGHTS] = [float(w) for w in self.weights]
        if self.ks is not None:
            out[KS] = [int(k) for k in self.ks]
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvalRequest:
        try:
            ks = config.get(KS)
            return cls(
                split=str(config[SPLIT]), round=_int(config.get(ROUND, -1)),
                run_id=str(config[RUN_ID]) if RUN_ID in config else None,
                weights=tuple(_finite(w) for w in _list(config.get(WEIGHTS, []))),
                ks=None if ks is None else tuple(_int(k) for k in _list(ks)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed evaluate request ({_why(exc)})") from None


# --- replies -------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One client's answer to one request: a status, scalars, tensors (LoRA or released
    statistics), the chained ledger line of the release it made (None if it spent nothing)."""

    status: str
    metrics: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    ledger: dict[str, Any] | None = None
    client: str = ""  # set by the server from the status record
    bytes_up: int = 0  # set by the server: the size of the tensors received

    @property
    def ok(self) -> bool:
        return self.status == OK

    def status_record(self, client: str) -> dict[str, str]:
        return {STATUS_KEY: self.status, REASON: self.reason, CLIENT: client}

    @staticmethod
    def parse_status(record: Mapping[str, Any] | None) -> tuple[str, str, Any]:
        """(status, reason, client name as sent) of a reply's status record; absent means ok."""
        record = record or {}
        return str(record.get(STATUS_KEY, OK)), str(record.get(REASON, "")), record.get(CLIENT)


def metric_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The evaluation metrics (hr@K, ndcg@K, mrr@K) among a reply's scalars."""
    return [k for k in metrics if k.startswith(METRIC_PREFIXES)]


# --- parsing helpers -------------------------------------------------------------------------------------


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str) or int(value) != float(value):
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _finite(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not finite")
    return number


def _list(value: Any) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{value!r} is not a list")
    return value


def _why(exc: BaseException) -> str:
    return f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
