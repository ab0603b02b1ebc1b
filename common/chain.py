"""Tamper evidence for privacy ledgers: each entry carries the sha256 of the entry before it.

An entry's hash is the sha256 of its canonical JSON (sorted keys, no spaces) without the
`entry_sha256` field itself; `prev_sha256` is the previous entry's `entry_sha256` (64 zeros for
the first) and `seq` its position. Editing an entry changes its hash; deleting, reordering or
inserting one breaks a link or a position. Whoever can rewrite *every* later entry can forge a
consistent chain, so an audit also compares the chain's head across the copies that exist (the
client's own ledger, the server's copy) and the adapter digests against the stored replies.
Pure functions over JSON-like dicts: no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "prev_sha256", "entry_sha256")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `entry` without its own `entry_sha256`."""
    body = {k: v for k, v in entry.items() if k != "entry_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def link(entry: Mapping[str, Any], previous: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`entry` chained after the ledger `previous` (itself chained): seq, prev_sha256, entry_sha256."""
    head = str(previous[-1].get("entry_sha256", GENESIS)) if previous else GENESIS
    out = {k: v for k, v in entry.items() if k not in CHAIN_FIELDS}
    out["seq"] = len(previous)
    out["prev_sha256"] = head
    out["entry_sha256"] = entry_hash(out)
    return out


def head(ledger: Sequence[Mapping[str, Any]]) -> str:
    """The hash a ledger ends on (GENESIS when empty): one string that pins the whole history."""
    return str(ledger[-1].get("entry_sha256", GENESIS)) if ledger else GENESIS


@dataclass(frozen=True)
class ChainReport:
    """The verdict on one ledger's chain.

    status: "intact"; "broken" (problems name the entries); "unchained" (a ledger written before
    chains existed: nothing to verify); "partly-unchained" (such a prefix, then an intact chain).
    notes: remarks that are not failures, e.g. a copy that starts mid-chain.
    """

    status: str
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def verify(ledger: Sequence[Mapping[str, Any]], *, mid_chain: bool = False) -> ChainReport:
    """Check every entry's own hash, its link to the entry before it and its position.

    A ledger may start with unchained (pre-chain) entries; after the first chained entry every
    entry must be chained. With `mid_chain`, a copy that starts mid-chain (seq > 0: the server's
    copy of one run of a client that took part in earlier runs) is anchored at its first entry,
    and the report says so; without it (a client's whole ledger) the chain must start at seq 0.
    """
    chained = [all(f in e for f in CHAIN_FIELDS) for e in ledger]
    legacy = next((i for i, c in enumerate(chained) if c), len(ledger))
    if ledger and legacy == len(ledger):
        return ChainReport("unchained")
    problems: list[str] = []
    notes: list[str] = []
    prev, offset = GENESIS, 0  # offset: seq of position 0 (non-zero only for a mid-chain copy)
    if mid_chain and legacy == 0 and ledger and ledger[0]["seq"] != 0:
        prev, offset = str(ledger[0]["prev_sha256"]), int(ledger[0]["seq"])
        notes.append(f"the chain starts at seq {offset}: earlier entries are not in this copy, so "
                     "its first link is taken on trust (compare with the client's own ledger)")
    for i in range(legacy, len(ledger)):
        entry = ledger[i]
        where = f"entry {i} (round {entry.get('round', '?')}, {entry.get('mechanism', '?')})"
        if not chained[i]:
            problems.append(f"{where} has no chain fields (inserted, or its hashes stripped)")
            continue
        if entry["entry_sha256"] != entry_hash(entry):
            problems.append(f"{where} was edited: its content does not match its entry_sha256")
        if entry["prev_sha256"] != prev:
            problems.append(f"{where} does not follow the entry before it (an entry was deleted, "
                            "reordered or appended out of order)")
        if entry["seq"] != i + offset:
            problems.append(f"{where} carries seq {entry['seq']!r} at position {i + offset}")
        prev = str(entry["entry_sha256"])
    if problems:
        return ChainReport("broken", tuple(problems), tuple(notes))
    if legacy:
        notes.append(f"the first {legacy} entries predate ledger chains and cannot be verified")
        return ChainReport("partly-unchained", (), tuple(notes))
    return ChainReport("intact", (), tuple(notes))
