"""The privacy ledger: one line per release a party made, the names of its mechanisms, its files.

A line says what one release spent: its mechanism, σ, q and steps (the block the accountant
composed), the clip norm, δ, ε after it, the budget, which randomness ran and, where the party
has one, the digest of the policy it ran under; a client's line also names its run and the
sha256 of the tensors it released (or, for an evaluation, of the prior it ranked with). The
last five fields chain the line to the ones before it and sign it (common/chain.py).

This module is the only place a ledger field is spelled: every other module reads a line
through `LedgerLine`'s attributes and the helpers below. `to_dict` is the JSON object written,
and `LedgerLine.from_dict(d).to_dict() == d` for every line fedrec ever wrote — fields it does
not know included — because the hash chain is over that object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common import chain, wire
from fedrec.common.errors import DataError
from fedrec.common.privacy.analysis import MechanismStep
from fedrec.common.rundir import append_jsonl, read_jsonl

# --- mechanisms --------------------------------------------------------------------------------

MECHANISM_POPULARITY = "prior-counts"  # the popularity release (its name kept for old ledgers)
MECHANISM_COOCCURRENCE = "prior-cooccurrence"
MECHANISM_DP_SGD = "dp-sgd"
MECHANISM_EVAL = "dp-eval"  # an evaluation's noisy metric sums
MECHANISM_NON_PRIVATE = "non-private"  # training without DP, where a policy allows it (σ = 0)
PRIOR_MECHANISMS = (MECHANISM_POPULARITY, MECHANISM_COOCCURRENCE)  # in the order they are released
VALIDATION = wire.VALID  # the split of the evaluations that choose the blend weight

# A reply's copy of its line's numbers ("ledger.<field>" metrics): what servers read from clients
# that predate chained lines.
METRIC_PREFIX = wire.LEDGER_PREFIX


# --- the line -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LedgerLine:
    """One release of one party; None: a field the line does not carry (older writers)."""

    round: int  # the federated round (0: the prior releases), or a central party's line number
    mechanism: str
    noise_multiplier: float  # σ
    sample_rate: float  # q
    steps: int
    delta: float
    epsilon: float  # the party's ε after this release, at `delta`
    clip_norm: float | None = None
    accountant: str | None = None  # the training accountant (rdp | prv)
    budget: float | None = None
    users: int | None = None  # central and older client lines only: a client's user count is private
    dp: bool | None = None
    rng: str | None = None  # which randomness ran (common/privacy/mechanisms.py labels)
    policy_sha256: str | None = None
    split: str | None = None  # an evaluation's split
    prior_sha256: str | None = None  # an evaluation: the digest of the prior it ranked with
    run_id: str | None = None
    adapter_sha256: str | None = None  # the digest of the tensors the release sent
    # the hash chain and the signature (common/chain.py)
    seq: int | None = None
    prev_sha256: str | None = None
    entry_sha256: str | None = None
    signer: str | None = None
    signature: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields this version does not know, kept

    def __post_init__(self) -> None:
        problem = _problem({f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None})
        if problem is None and (clash := sorted(set(self.extra) & set(_FIELDS))):
            problem = f"{clash[0]} is given twice"
        if problem is not None:
            raise DataError(f"a ledger line: {problem}")

    # -- the JSON object ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written (the hash chain's input): fields the line does not carry are absent."""
        out = {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}
        return out | dict(self.extra)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], *, source: str) -> LedgerLine:
        """The line in `obj`, every field type-checked; a DataError names `source` and the field."""
        if not isinstance(obj, Mapping):
            raise DataError(f"{source}: a ledger line must be a JSON object, not {type(obj).__name__}")
        missing = [f for f in _REQUIRED if f not in obj]
        if missing:
            raise DataError(f"{source} lacks {', '.join(missing)}: its ε cannot be re-derived")
        known = {k: v for k, v in obj.items() if k in _FIELDS}
        problem = _problem(known)
        if problem is not None:
            raise DataError(f"{source}: {problem}")
        return cls(**known, extra={k: v for k, v in obj.items() if k not in _FIELDS})

    # -- what a line says ---------------------------------------------------------------------------

    @property
    def step(self) -> MechanismStep:
        """The block the accountant composed for this release (PrivacyError if it is not one)."""
        return MechanismStep(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                             steps=self.steps)

    @property
    def noise_std(self) -> float:
        """σ·clip, the per-entry noise std of a release (0 when the line does not say: only the
        CF scorer's shrinkage reads it, never a privacy claim)."""
        std = self.noise_multiplier * (self.clip_norm if self.clip_norm is not None else 0.0)
        return std if math.isfinite(std) and std >= 0 else 0.0

    @property
    def is_dp_sgd(self) -> bool:
        return self.mechanism == MECHANISM_DP_SGD

    @property
    def is_popularity(self) -> bool:
        return self.mechanism == MECHANISM_POPULARITY

    @property
    def is_evaluation(self) -> bool:
        return self.mechanism == MECHANISM_EVAL

    @property
    def without_dp(self) -> bool:
        """Trained without DP: a non-private line, or one that records dp = false."""
        return self.mechanism == MECHANISM_NON_PRIVATE or self.dp is False

    def is_validation(self, rnd: int) -> bool:
        """The validation evaluation of round `rnd` (its noise sets the blend weight's margin)."""
        return self.is_evaluation and self.split == VALIDATION and self.round == rnd

    def where(self) -> str:
        """How a message names this line: its round and mechanism."""
        return f"round {self.round} ({self.mechanism})"

    def metrics(self) -> dict[str, float]:
        """The line's numbers as a reply's "ledger.<field>" metrics."""
        return {METRIC_PREFIX + f: float(getattr(self, f)) for f in _METRIC_FIELDS
                if getattr(self, f) is not None}


_FIELDS = tuple(f.name for f in dataclasses.fields(LedgerLine) if f.name != "extra")
_REQUIRED = tuple(f.name for f in dataclasses.fields(LedgerLine) if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING)
_METRIC_FIELDS = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "epsilon")
_INTS = ("round", "steps", "users", chain.SEQ)
_REALS = ("noise_multiplier", "sample_rate", "delta", "epsilon", "clip_norm", "budget")
_BOOLS = ("dp",)


def _problem(values: Mapping[str, Any]) -> str | None:
    """What is wrong with the types of a line's known fields (None: nothing)."""
    for name, value in values.items():
        if name in _INTS:
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind = "a whole number"
        elif name in _REALS:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            kind = "a number"
        elif name in _BOOLS:
            ok, kind = isinstance(value, bool), "true or false"
        else:
            ok, kind = isinstance(value, str), "a string"
        if not ok:
            return f"{name}={value!r} must be {kind}"
    return None


# --- reading lines --------------------------------------------------------------------------------


def parse_lines(entries: Iterable[Mapping[str, Any]], *, source: str) -> list[LedgerLine]:
    """Every entry as a line; the first one that is not stops with `source` and its position."""
    return [LedgerLine.from_dict(e, source=f"{source} entry {i}") for i, e in enumerate(entries)]


def readable_lines(entries: Iterable[Mapping[str, Any]]) -> list[LedgerLine]:
    """The entries that are whole lines, the others left out (an audit reports those itself)."""
    out = []
    for e in entries:
        try:
            out.append(LedgerLine.from_dict(e, source="entry"))
        except DataError:
            continue
    return out


def read_entries(path: Path) -> list[dict[str, Any]]:
    """A ledger file's JSON objects, as written (empty when it does not exist); a line that is not
    JSON stops with the file and line number."""
    return read_jsonl(path)


def read_ledger(path: Path) -> list[LedgerLine]:
    """A ledger file's lines, each checked (a DataError names the file and the entry)."""
    return parse_lines(read_entries(path), source=str(path))


def line_from_metrics(metrics: Mapping[str, Any], *, rnd: int, mechanism: str,
                      accountant: str) -> dict[str, Any]:
    """The line of a client that reports its release only as "ledger.<field>" metrics (one that
    predates chained lines), as the server keeps it."""
    line = {k.removeprefix(METRIC_PREFIX): v for k, v in metrics.items() if k.startswith(METRIC_PREFIX)}
    line["steps"] = int(line.get("steps", 0))
    return {"round": rnd, "mechanism": mechanism, "accountant": accountant, **line}


def release_scale(entry: Mapping[str, Any] | None, *,
                  users_if_absent: float) -> tuple[float, float, float] | None:
    """(clip norm, σ, users) of a sum release's line as received, read from those fields alone (an
    older client's line may carry no more); None when it does not say them as numbers."""
    if entry is None:
        return None
    try:
        return (float(entry["clip_norm"]), float(entry["noise_multiplier"]),
                float(entry.get("users", users_if_absent)))
    except (KeyError, TypeError, ValueError):
        return None


def entry_noise_std(entry: Mapping[str, Any]) -> float:
    """σ·clip of a release's line as received (0 when it does not say: only the CF scorer's
    shrinkage reads it, never a privacy claim)."""
    scale = release_scale(entry, users_if_absent=0.0)
    std = scale[0] * scale[1] if scale is not None else 0.0
    return std if math.isfinite(std) and std >= 0 else 0.0


def validation_sigma(entry: Mapping[str, Any], rnd: int) -> float | None:
    """σ of a line as received if it is round `rnd`'s validation evaluation (read from those fields
    alone), else None."""
    if (entry.get("mechanism"), entry.get("split"), entry.get("round")) != (MECHANISM_EVAL, VALIDATION, rnd):
        return None
    try:
        return float(entry["noise_multiplier"])
    except (KeyError, TypeError, ValueError):
        return None


def reports_release(metrics: Mapping[str, Any]) -> bool:
    """Whether a reply's metrics carry a line's numbers (a client that predates chained lines)."""
    return METRIC_PREFIX + "epsilon" in metrics


def entry_sha256(entry: Mapping[str, Any]) -> str | None:
    """The chain hash of a line as received (None when it carries none)."""
    value = entry.get(chain.ENTRY)
    return None if value is None else str(value)


def claimed_seq(entry: Mapping[str, Any]) -> Any:
    """The chain position a line as written claims (None when it claims none), unchecked."""
    return entry.get(chain.SEQ)


def adapter_sha256(entry: Mapping[str, Any]) -> str | None:
    """The digest of the tensors a line as received says it released (None when it does not say)."""
    value = entry.get("adapter_sha256")
    return None if value is None else str(value)


# --- a party's ledger -----------------------------------------------------------------------------


class Ledger:
    """A party's ledger: its lines so far; each new line is chained to them and signed
    (common/chain.py) and, with `path`, appended to that file before it is returned.

    `signer` is called at the first append (a key made on first use: a party that never releases
    leaves no key behind)."""

    def __init__(self, lines: Sequence[LedgerLine] = (), *, signer: Callable[[], chain.Signer] | None = None,
                 path: Path | None = None) -> None:
        self._lines = list(lines)
        self._signer_of = signer
        self._signer: chain.Signer | None = None
        self.path = path

    @property
    def lines(self) -> tuple[LedgerLine, ...]:
        return tuple(self._lines)

    def append(self, line: LedgerLine) -> LedgerLine:
        """`line` chained after the ledger and signed; kept, and written where the ledger has a file."""
        if self._signer is None and self._signer_of is not None:
            self._signer = self._signer_of()
        linked = chain.link(line.to_dict(), [x.to_dict() for x in self._lines], signer=self._signer)
        chained = LedgerLine.from_dict(linked, source="a chained ledger line")
        if self.path is not None:
            append_jsonl(self.path, chained.to_dict())
        self._lines.append(chained)
        return chained

    def mechanisms(self) -> set[str]:
        """The mechanisms released so far."""
        return {x.mechanism for x in self._lines}

    def state_dict(self) -> list[dict[str, Any]]:
        return [x.to_dict() for x in self._lines]

    def load_state_dict(self, state: Sequence[Mapping[str, Any]], *, source: str = "ledger state") -> None:
        """Replace the lines; every one is checked first, and nothing changes on error."""
        if isinstance(state, str | bytes) or not isinstance(state, Sequence):
            raise DataError(f"{source}: expected a list of ledger lines")
        self._lines = parse_lines(state, source=source)


def key_signer(path: Path) -> chain.Signer:
    """The Ed25519 ledger key at `path` (`<name>.key`, its public half `<name>.pub` beside it),
    made on first use, as a simulated client's state directory makes its own."""
    if not path.exists():
        chain.generate_key(path.parent, name=path.stem)
    return chain.load_signer(path)
