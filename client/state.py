"""A client's durable privacy state: accountant, ledger and the replies it already released.

Everything lives in the client's own state directory and is committed atomically (write a
temporary file, fsync, rename) *before* a reply leaves the client, so a crash at any point
either loses an unreleased computation (no privacy spent) or keeps the whole record:

    <state_dir>/state.json          accountant history, ledger, σ, the rounds already answered
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

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fedrec.common import chain
from fedrec.common.errors import PrivacyError
from fedrec.common.lora import tensors_digest
from fedrec.common.privacy import PrivacyAccountant
from safetensors.torch import load_file, save_file

STATE_VERSION = 1


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
        path = self.root / "state.json"
        if path.exists():
            self._load(path, accountant)

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
            os.replace(tmp, self.root / "replies" / name)
        entry = None
        if ledger_entry is not None:
            entry = chain.link({**ledger_entry, "run_id": run_id, "adapter_sha256": tensors_digest(tensors)},
                               self.ledger, signer=chain.state_signer(self.root))  # <root>/ledger.key
            self.ledger.append(entry)
        self.answered[key] = {"file": name, "metrics": dict(metrics), "ledger": entry}
        state = {
            "version": STATE_VERSION, "accountant": self.accountant.state_dict(),
            "ledger": self.ledger, "answered": self.answered, "noise_multiplier": self.noise_multiplier,
        }
        atomic_write_json(self.root / "state.json", state)
        lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.ledger)
        atomic_write_bytes(self.root / "ledger.jsonl", lines.encode())
        return entry
