"""A client's durable privacy state: accountant, ledger and the replies it already released.

Everything lives in the client's own state directory and is committed atomically (write a
temporary file, fsync it, rename, fsync the directory) *before* a reply leaves the client, so a
crash at any point either loses an unreleased computation (no privacy spent) or keeps the whole
record. state.json is the commit point: it holds the whole ledger, and ledger.jsonl is rewritten
from it (and repaired from it on start, if a crash fell between the two writes). An exclusive
lock (`state_lock`, flock on <state_dir>/.lock) spans check → train → commit, so two messages for
one round cannot both release:

    <state_dir>/state.json          accountant history, ledger, σ, the rounds already answered,
                                    the policy pinned at the first release (and its sha256)
    <state_dir>/ledger.jsonl        the same ledger, one line per release, for people and audits
                                    (a hash chain: common/chain.py; each line also carries the
                                    sha256 of the tensors it released, and is signed with
                                    <state_dir>/ledger.key, made on first use or by
                                    `fedrec deploy keygen <state_dir>`)
    <state_dir>/replies/<run>-<round>.safetensors   the adapter tensors released in that round

A request for a round the client already answered (the server crashed and resumed) is answered
with the stored reply: re-sending a released output costs no privacy, and the ledger counts the
release once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from fedrec.common import chain
from fedrec.common.errors import PrivacyError
from fedrec.common.lora import tensors_digest
from fedrec.common.privacy.accountant import PrivacyAccountant
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_VERSION = 1
LOCK_FILE = ".lock"


@contextlib.contextmanager
def state_lock(root: Path) -> Iterator[None]:
    """Hold the state directory's exclusive lock (blocking) for the duration of the block.

    flock(2) locks an open file description, so two threads of one process, or two processes,
    exclude each other; the kernel releases it if the holder dies."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class ClientState:
    """The accountant and ledger of one client, persisted in `root` across rounds and restarts."""

    def __init__(self, root: Path, *, accountant: str = "rdp") -> None:
        self.root = Path(root)
        self.accountant = PrivacyAccountant(accountant=accountant)
        self.ledger: list[dict[str, Any]] = []
        self.answered: dict[str, dict[str, Any]] = {}  # "<run>/<kind>/<round>" -> reply record
        self.noise_multiplier: float | None = None  # σ fixed at the first round, then kept
        self.eval_noise_multiplier: float | None = None  # σ of evaluations, fixed at the first release
        self.policy: dict[str, Any] | None = None  # the policy pinned at the first release
        self.policy_sha256: str | None = None
        path = self.root / "state.json"
        if path.exists():
            self._load(path, accountant)
            self._repair_ledger_file()

    def pin_policy(self, policy: Mapping[str, Any], digest: str) -> None:
        """Pin the policy at the first release; the caller refuses releases under another one."""
        if self.policy_sha256 is None:
            self.policy, self.policy_sha256 = dict(policy), digest
        elif self.policy_sha256 != digest:
            raise PrivacyError(f"{self.root}: the pinned policy {self.policy_sha256[:12]}… differs from "
                               f"{digest[:12]}…; refusing to release under another policy")

    def _ledger_text(self) -> bytes:
        return "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.ledger).encode()

    def _repair_ledger_file(self) -> None:
        """ledger.jsonl is derived from state.json (the commit point): a crash between the two
        writes leaves it one line short, which is repaired here. A ledger.jsonl that holds lines
        state.json does not is a different record and stops the client."""
        path = self.root / "ledger.jsonl"
        expected = self._ledger_text()
        current = path.read_bytes() if path.exists() else b""
        if current == expected:
            return
        if not expected.startswith(current):
            raise PrivacyError(
                f"{path} is not a prefix of the ledger in {self.root / 'state.json'}: one of them was "
                "edited; restore both from a backup before this client releases anything")
        log.warning("%s was %d line(s) short of state.json (a crash between the two writes); repaired",
                    path, expected.count(b"\n") - current.count(b"\n"))
        atomic_write_bytes(path, expected)

    def _load(self, path: Path, accountant: str) -> None:
        try:
            state = json.loads(path.read_text())
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            if state["accountant"]["accountant"] != accountant:
                raise ValueError(f"accountant {state['accountant']['accountant']!r} was used, "
                                 f"this run asks for {accountant!r}")
            self.accountant.load_state_dict(state["accountant"])
            self.ledger = list(state["ledger"])
            self.answered = dict(state["answered"])
            self.noise_multiplier = state.get("noise_multiplier")
            self.eval_noise_multiplier = state.get("eval_noise_multiplier")
            self.policy = state.get("policy")
            self.policy_sha256 = state.get("policy_sha256")
        except (ValueError, KeyError, TypeError) as exc:
            raise PrivacyError(
                f"client privacy state {path} is unreadable ({exc}); it is the record of spent "
                "budget, so the client will not train until it is restored from a backup"
            ) from None

    def key(self, run_id: str, kind: str, rnd: int) -> str:
        return f"{run_id}/{kind}/{rnd}"

    def answered_reply(
        self, run_id: str, kind: str, rnd: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The stored record (file, metrics, chained ledger entry or None) and tensors of a release
        this client already made, if any."""
        record = self.answered.get(self.key(run_id, kind, rnd))
        if record is None:
            return None
        path = self.root / "replies" / record["file"]
        tensors = load_file(str(path)) if record["file"] else {}
        return record, tensors

    def commit(
        self,
        *,
        run_id: str,
        kind: str,
        rnd: int,
        ledger_entry: Mapping[str, Any] | None,
        metrics: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
    ) -> dict[str, Any] | None:
        """Record one release (its ledger line and its reply) durably, before it is sent.

        The ledger line is chained to the ledger (common/chain.py) with the sha256 of the tensors
        it releases; the chained line is returned (None without a ledger line) and stored with the
        reply, so a replay re-sends the very same line.
        """
        key = self.key(run_id, kind, rnd)
        name = ""
        if tensors:
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)
            name = f"{safe}-{kind}-{rnd}.safetensors"
            (self.root / "replies").mkdir(parents=True, exist_ok=True)
            tmp = self.root / "replies" / f".{name}.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            fsync_file(tmp)
            os.replace(tmp, self.root / "replies" / name)
            fsync_dir(self.root / "replies")
        entry = None
        if ledger_entry is not None:
            entry = chain.link({**ledger_entry, "run_id": run_id, "adapter_sha256": tensors_digest(tensors)},
                               self.ledger, signer=chain.state_signer(self.root))  # <root>/ledger.key
            self.ledger.append(entry)
        self.answered[key] = {"file": name, "metrics": dict(metrics), "ledger": entry}
        state = {
            "version": STATE_VERSION, "accountant": self.accountant.state_dict(),
            "ledger": self.ledger, "answered": self.answered, "noise_multiplier": self.noise_multiplier,
            "policy": self.policy, "policy_sha256": self.policy_sha256,
            "eval_noise_multiplier": self.eval_noise_multiplier,
        }
        atomic_write_json(self.root / "state.json", state)  # the commit point
        atomic_write_bytes(self.root / "ledger.jsonl", self._ledger_text())
        return entry
