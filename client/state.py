"""A client's durable privacy state: its party's spending, the replies it released, its pinned policy.

Everything lives in the client's own state directory (common/rundir.py `StateDir`) and is
committed with the one durable write (`rundir.atomic_write_*`: temporary file, fsync, rename,
fsync of the directory) *before* a reply leaves the client, so a crash at any point either loses
an unreleased computation (no privacy spent) or keeps the whole record. state.json is the commit
point: it holds the whole ledger, and ledger.jsonl is rewritten from it (and repaired from it on
start, if a crash fell between the two writes). An exclusive lock (`state_lock`, flock on the
state directory's lock file) spans check → train → commit, so two messages for one round cannot
both release:

    state.json          the party's spending (common/privacy/party.py: accountant history,
                        ledger, the σ's kept), the rounds already answered, the policy pinned at
                        the first release (and its sha256)
    ledger.jsonl        the same ledger, one line per release, for people and audits (a hash
                        chain, common/chain.py; each line also carries the sha256 of the tensors
                        it released, and is signed with the state directory's ledger key, made on
                        first use or by `fedrec deploy keygen <state_dir>`)
    replies/<run>-<kind>-<round>.safetensors   the tensors released in that round

A request for a round the client already answered (the server crashed and resumed) is answered
with the stored reply: re-sending a released output costs no privacy, and the ledger counts the
release once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from fedrec.common import chain
from fedrec.common.errors import DataError, PrivacyError
from fedrec.common.ledger import Ledger, LedgerLine
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.party import Party
from fedrec.common.rundir import StateDir, atomic_write_bytes, atomic_write_json, read_json
from safetensors.torch import load_file, save

log = logging.getLogger(__name__)

STATE_VERSION = 1


@contextlib.contextmanager
def state_lock(root: Path) -> Iterator[None]:
    """Hold the state directory's exclusive lock (blocking) for the duration of the block.

    flock(2) locks an open file description, so two threads of one process, or two processes,
    exclude each other; the kernel releases it if the holder dies."""
    lock = StateDir(Path(root)).lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def state_ledger(root: Path) -> Ledger:
    """An empty ledger that signs with the state directory's own key (made at its first line)."""
    return Ledger(signer=lambda: chain.state_signer(Path(root)))


class ClientState:
    """One client's party and replies, persisted in `root` across rounds and restarts.

    `party` is the one the client's policy defines (its ledger from `state_ledger(root)`); its
    spending — accountant, ledger, the σ's kept — is loaded from state.json and committed back."""

    def __init__(self, root: Path, *, party: Party) -> None:
        self.dir = StateDir(Path(root))
        self.root = self.dir.root
        self.party = party
        self.answered: dict[str, dict[str, Any]] = {}  # "<run>/<kind>/<round>" -> reply record
        self.policy: dict[str, Any] | None = None  # the policy pinned at the first release
        self.policy_sha256: str | None = None
        if self.dir.state.exists():
            self._load(self.dir.state)
            self._repair_ledger_file()

    @property
    def accountant(self) -> PrivacyAccountant:
        return self.party.accountant

    @property
    def ledger(self) -> tuple[LedgerLine, ...]:
        return self.party.ledger.lines

    def pin_policy(self, policy: Mapping[str, Any], digest: str) -> None:
        """Pin the policy at the first release; the caller refuses releases under another one."""
        if self.policy_sha256 is None:
            self.policy, self.policy_sha256 = dict(policy), digest
        elif self.policy_sha256 != digest:
            raise PrivacyError(f"{self.root}: the pinned policy {self.policy_sha256[:12]}… differs from "
                               f"{digest[:12]}…; refusing to release under another policy")

    def _ledger_text(self) -> bytes:
        return "".join(json.dumps(x.to_dict(), sort_keys=True) + "\n" for x in self.ledger).encode()

    def _repair_ledger_file(self) -> None:
        """ledger.jsonl is derived from state.json (the commit point): a crash between the two
        writes leaves it one line short, which is repaired here. A ledger.jsonl that holds lines
        state.json does not is a different record and stops the client."""
        path = self.dir.ledger
        expected = self._ledger_text()
        current = path.read_bytes() if path.exists() else b""
        if current == expected:
            return
        if not expected.startswith(current):
            raise PrivacyError(
                f"{path} is not a prefix of the ledger in {self.dir.state}: one of them was "
                "edited; restore both from a backup before this client releases anything")
        log.warning("%s was %d line(s) short of %s (a crash between the two writes); repaired",
                    path, expected.count(b"\n") - current.count(b"\n"), self.dir.state.name)
        atomic_write_bytes(path, expected)

    def _load(self, path: Path) -> None:
        try:
            state = read_json(path)
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            used, asked = state["accountant"]["accountant"], self.party.accountant.accountant
            if used != asked:
                raise ValueError(f"accountant {used!r} was used, this run asks for {asked!r}")
            self.party.load_state_dict(state)
            self.answered = dict(state["answered"])
            self.policy = state.get("policy")
            self.policy_sha256 = state.get("policy_sha256")
        except (ValueError, KeyError, TypeError, DataError, PrivacyError) as exc:
            raise PrivacyError(
                f"client privacy state {path} is unreadable ({exc}); it is the record of spent "
                "budget, so the client will not train until it is restored from a backup"
            ) from None

    def key(self, run_id: str, kind: str, rnd: int) -> str:
        return f"{run_id}/{kind}/{rnd}"

    def answered_reply(
        self, run_id: str, kind: str, rnd: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The stored record (file, metrics, chained ledger line or None) and tensors of a release
        this client already made, if any."""
        record = self.answered.get(self.key(run_id, kind, rnd))
        if record is None:
            return None
        tensors = load_file(str(self.dir.replies / record["file"])) if record["file"] else {}
        return record, tensors

    def commit(self, *, run_id: str, kind: str, rnd: int, line: LedgerLine | None,
               metrics: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Record one release durably, before it is sent: its tensors, then state.json (the
        party's spending, `line` already in its ledger, and this reply), then ledger.jsonl.

        The chained line is stored with the reply, so a replay re-sends the very same line."""
        name = ""
        if tensors:
            path = self.dir.reply(run_id, kind, rnd)
            atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
            name = path.name
        entry = line.to_dict() if line is not None else None
        self.answered[self.key(run_id, kind, rnd)] = {"file": name, "metrics": dict(metrics), "ledger": entry}
        state = {"version": STATE_VERSION, **self.party.state_dict(), "answered": self.answered,
                 "policy": self.policy, "policy_sha256": self.policy_sha256}
        atomic_write_json(self.dir.state, state, indent=1)  # the commit point
        atomic_write_bytes(self.dir.ledger, self._ledger_text())
