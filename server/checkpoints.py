"""The server's state between rounds, its checkpoints and the records rewritten from it.

A checkpoint (checkpoints/round-<n>/) holds everything a resumed run needs: the global adapter,
the strategy's state, the summed prior and server.json (run id, round, the history of round
records, the ledger lines the clients reported). It is assembled in a temporary directory and
renamed in one step, so a crash leaves the previous one whole; one that does not load and
validate is skipped for the one before it. A resumed run keeps the same run id, so a client asked
again for a round it already answered re-sends its stored reply instead of spending budget twice.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import numpy as np
import torch
from fedrec.common.config import Config, to_dict
from fedrec.common.errors import AdapterError, ConfigError, DataError
from fedrec.common.lora import validate_adapter
from fedrec.common.prior import CollaborativePrior, load_prior
from fedrec.common.rundir import (
    ArtifactDir,
    RunDir,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    write_jsonl,
)
from fedrec.server.validation import check_client_name
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
NO_STATE = "none"  # the placeholder tensor of an empty strategy.safetensors (safetensors needs one)


@dataclass
class ServerState:
    """What a checkpoint holds besides tensors."""

    run_id: str
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per round
    ledgers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # client -> lines
    prior: CollaborativePrior | None = None  # the clients' summed prior releases (its own file)

    def state_dict(self) -> dict[str, Any]:
        """server.json."""
        return {"round": self.round, "run_id": self.run_id, "history": self.history, "ledgers": self.ledgers}

    def load_state_dict(self, doc: Mapping[str, Any], *, source: str = "server state") -> None:
        """Take round, history and ledgers from `doc` after checking them: this run's id (a
        document without one predates run ids), a round ≥ 0, a list of records, ledgers that map
        valid client names to lists of lines."""
        if doc.get("run_id", self.run_id) != self.run_id:
            raise DataError(f"{source} belongs to run {doc.get('run_id')!r}, not {self.run_id!r}")
        rnd, history, ledgers = doc.get("round"), doc.get("history"), doc.get("ledgers")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise DataError(f"{source}: round {rnd!r} is not a round number")
        if not _list_of_dicts(history):
            raise DataError(f"{source}: history is not a list of round records")
        if not isinstance(ledgers, dict):
            raise DataError(f"{source}: ledgers is not a map of client names to ledger lines")
        for client, lines in ledgers.items():
            problem = check_client_name(client) or (None if _list_of_dicts(lines) else "not a list of lines")
            if problem is not None:
                raise DataError(f"{source}: ledgers[{str(client)[:80]!r}]: {problem}")
        self.round, self.history, self.ledgers = rnd, list(history), {k: list(v) for k, v in ledgers.items()}


class Stateful(Protocol):
    """A strategy's side of a checkpoint (server/strategies.py)."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint; `adapter` and `strategy` are empty before the first round."""

    state: ServerState
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    strategy: dict[str, torch.Tensor] = field(default_factory=dict)


# --- writing -------------------------------------------------------------------------------------


def write_checkpoint(run: RunDir, state: ServerState, adapter: Mapping[str, torch.Tensor] | None = None,
                     strategy: Mapping[str, torch.Tensor] | None = None) -> None:
    """checkpoints/round-<state.round>/, replaced in one step. Round 0 (the prior release) holds
    no adapter: `adapter` None."""
    with atomic_directory(run.checkpoint(state.round).root) as tmp:
        art = ArtifactDir(tmp)
        if adapter is not None:
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(art.adapter))
            tensors = {k: v.contiguous() for k, v in (strategy or {}).items()} or {NO_STATE: torch.zeros(1)}
            save_file(tensors, str(art.strategy))
        if state.prior is not None:
            write_prior(art.prior, state.prior)
        atomic_write_json(art.server_state, state.state_dict(), indent=1)


def write_prior(path: Path, prior: CollaborativePrior) -> None:
    """The prior's tensors (popularity, head, co-occurrence) as one safetensors file, atomically."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in prior.tensors().items()}))


def write_records(run: RunDir, state: ServerState) -> None:
    """rounds.jsonl and ledgers/<client>.jsonl, rewritten from the checkpointed history."""
    write_jsonl(run.rounds, state.history)
    for client, lines in state.ledgers.items():
        if (problem := check_client_name(client)) is not None:  # names become file names
            raise DataError(f"{run.root}: the run's ledgers name a bad client: {problem}")
        write_jsonl(run.ledger(client), lines)


def write_failed(run: RunDir, rnd: int, reason: str) -> None:
    atomic_write_json(run.failed, {"round": rnd, "reason": reason})


# --- reading -------------------------------------------------------------------------------------


def read_checkpoint(run: RunDir, rnd: int, run_id: str) -> Checkpoint:
    """Checkpoint `rnd` of run `run_id`, validated; a DataError says what is damaged."""
    art = run.checkpoint(rnd)
    state = ServerState(run_id=run_id)
    state.load_state_dict(read_json(art.server_state), source=str(art.server_state))
    if state.round != rnd:
        raise DataError(f"{art.server_state} holds round {state.round}, not the round of its folder")
    state.prior = load_prior(art.prior) if art.prior.is_file() else None
    if rnd == 0:  # the prior release only
        return Checkpoint(state)
    strategy = {k: v for k, v in _tensors(art.strategy).items() if k != NO_STATE}
    return Checkpoint(state, _tensors(art.adapter), strategy)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None


def start_or_resume(run: RunDir, cfg: Config, resume: bool, *, spec: Mapping[str, Any] | None = None,
                    strategy: Stateful | None = None) -> Checkpoint:
    """A new run (its run.json written), or the newest checkpoint of this one that loads: its
    adapter valid for `spec` and its state accepted by `strategy`, when given. A damaged one falls
    back to the one before; none at all starts the rounds again under the same run id."""
    settings = to_dict(cfg)
    if run.run_record.exists() and not resume:
        raise ConfigError(f"{run.root} already holds a run; pass --resume to continue it or choose "
                          "another --output")
    if not run.run_record.exists():
        state = ServerState(run_id=uuid.uuid4().hex[:12])
        atomic_write_json(run.run_record, {"run_id": state.run_id, "settings": settings})
        return Checkpoint(state)
    recorded = read_json(run.run_record)
    if not isinstance(recorded.get("run_id"), str) or "settings" not in recorded:
        raise DataError(f"{run.run_record} is not a run record (run_id, settings); restore it or start anew")
    if recorded["settings"] != settings:
        diff = _first_difference(recorded["settings"], settings)
        raise ConfigError(f"{run.root} was started with different settings ({diff}); resume it with "
                          "the same config")
    for rnd in run.checkpoint_rounds():  # newest first
        try:
            checkpoint = read_checkpoint(run, rnd, recorded["run_id"])
            if spec is not None and checkpoint.adapter:
                validate_adapter(checkpoint.adapter, spec, source=str(run.checkpoint(rnd).adapter))
            if strategy is not None:
                strategy.load_state_dict(checkpoint.strategy)
            return checkpoint
        except (DataError, AdapterError) as exc:
            log.warning("checkpoint round-%d is damaged (%s); falling back to the one before", rnd, exc)
    return Checkpoint(ServerState(run_id=recorded["run_id"]))


def _list_of_dicts(value: Any) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(value, list) and all(isinstance(x, dict) for x in value)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"
