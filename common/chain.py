"""Tamper evidence for privacy ledgers: each entry carries the sha256 of the entry before it.

An entry's hash is the sha256 of its canonical JSON (sorted keys, no spaces) without the
`entry_sha256` field itself; `prev_sha256` is the previous entry's `entry_sha256` (64 zeros for
the first) and `seq` its position. Editing an entry changes its hash; deleting, reordering or
inserting one breaks a link or a position. Whoever can rewrite *every* later entry can forge a
consistent chain, so an audit also compares the chain's head across the copies that exist (the
client's own ledger, the server's copy) and the adapter digests against the stored replies.

Signatures: each institution holds an Ed25519 key it generated itself (`fedrec deploy keygen`;
a simulated client makes one in its state directory on first use). A signed entry carries
`signer` (the hex of the raw 32-byte public key, inside the hashed body) and `signature` (the hex
Ed25519 signature over the ASCII bytes of `entry_sha256`). Since `entry_sha256` covers every
other field, `prev_sha256` included, one signature commits to the entry and to the whole chain
before it. Only the holder of the private key can produce it; a signature checks against the
`signer` key in the entry itself unless the auditor was given the institution's public key
(`fedrec audit --trust`): without one, whoever can write the ledger can also re-sign it with a
key of their own, so a self-asserted key proves integrity since signing, not authorship.
Pure functions over JSON-like dicts: no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fedrec.common.errors import ConfigError
from fedrec.common.rundir import atomic_write_bytes

GENESIS = "0" * 64
SEQ, PREV, ENTRY = CHAIN_FIELDS = ("seq", "prev_sha256", "entry_sha256")  # a line's place in its chain
SIGNER, SIGNATURE = SIGNATURE_FIELDS = ("signer", "signature")
KEY_FILE, PUB_FILE = "ledger.key", "ledger.pub"


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `entry` without its own `entry_sha256` and `signature`."""
    body = {k: v for k, v in entry.items() if k not in (ENTRY, SIGNATURE)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def link(entry: Mapping[str, Any], previous: Sequence[Mapping[str, Any]], *,
         signer: Signer | None = None) -> dict[str, Any]:
    """`entry` chained after the ledger `previous` (itself chained): seq, prev_sha256, entry_sha256,
    and, with `signer`, signed by it (`signer`, `signature`)."""
    head = str(previous[-1].get(ENTRY, GENESIS)) if previous else GENESIS
    out = {k: v for k, v in entry.items() if k not in CHAIN_FIELDS + SIGNATURE_FIELDS}
    out[SEQ] = len(previous)
    out[PREV] = head
    if signer is not None:
        out[SIGNER] = signer.public_hex
    out[ENTRY] = entry_hash(out)
    if signer is not None:
        out[SIGNATURE] = signer.sign(out[ENTRY])
    return out


def head(ledger: Sequence[Mapping[str, Any]]) -> str:
    """The hash a ledger ends on (GENESIS when empty): one string that pins the whole history."""
    return str(ledger[-1].get(ENTRY, GENESIS)) if ledger else GENESIS


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
    if mid_chain and legacy == 0 and ledger and ledger[0][SEQ] != 0:
        prev, offset = str(ledger[0][PREV]), int(ledger[0][SEQ])
        notes.append(f"the chain starts at seq {offset}: earlier entries are not in this copy, so "
                     "its first link is taken on trust (compare with the client's own ledger)")
    for i in range(legacy, len(ledger)):
        entry = ledger[i]
        where = f"entry {i} (round {entry.get('round', '?')}, {entry.get('mechanism', '?')})"
        if not chained[i]:
            problems.append(f"{where} has no chain fields (inserted, or its hashes stripped)")
            continue
        if entry[ENTRY] != entry_hash(entry):
            problems.append(f"{where} was edited: its content does not match its entry_sha256")
        if entry[PREV] != prev:
            problems.append(f"{where} does not follow the entry before it (an entry was deleted, "
                            "reordered or appended out of order)")
        if entry[SEQ] != i + offset:
            problems.append(f"{where} carries seq {entry[SEQ]!r} at position {i + offset}")
        prev = str(entry[ENTRY])
    if problems:
        return ChainReport("broken", tuple(problems), tuple(notes))
    if legacy:
        notes.append(f"the first {legacy} entries predate ledger chains and cannot be verified")
        return ChainReport("partly-unchained", (), tuple(notes))
    return ChainReport("intact", (), tuple(notes))


# --- signatures ------------------------------------------------------------------------------


class Signer:
    """An institution's Ed25519 ledger key: signs entry hashes; never leaves its state directory."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_hex = public_hex(key.public_key())

    def sign(self, entry_sha256: str) -> str:
        return self._key.sign(entry_sha256.encode("ascii")).hex()


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def generate_key(out_dir: Path, *, name: str | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: `<name>.key` (PEM, mode 0600) and `<name>.pub` (PEM).

    Refuses to overwrite an existing private key: the old key signed the ledger so far.
    """
    stem = name or KEY_FILE.removesuffix(".key")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    if key_path.exists():
        raise ConfigError(f"{key_path} already exists; it signed this ledger so far — keep it, or "
                          "move it away deliberately before making a new one")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(key_path, pem, mode=0o600)
    atomic_write_bytes(pub_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_signer(path: Path) -> Signer:
    """The private key at `path` (PEM, Ed25519)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"ledger key {path} cannot be read ({exc}); restore it from the "
                          "institution's backup") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"ledger key {path} is not an Ed25519 key (make one with `fedrec deploy keygen`)")
    return Signer(key)


def state_signer(state_dir: Path) -> Signer:
    """The ledger key of a client state directory (`<state_dir>/ledger.key`), made on first use."""
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        generate_key(Path(state_dir))
    return load_signer(path)


def load_public(path: Path) -> str:
    """The hex of the raw Ed25519 public key in a PEM `.pub` file (or a file holding that hex)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"public key {path} cannot be read ({exc.strerror})") from None
    text = data.decode("ascii", errors="replace").strip()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
        return text.lower()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM public key (the ledger.pub `fedrec deploy keygen` "
                          "writes)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return public_hex(key)


def signature_ok(entry: Mapping[str, Any], public: str) -> bool:
    """Whether `entry[SIGNATURE]` is `public`'s Ed25519 signature over its `entry_sha256`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        key.verify(bytes.fromhex(str(entry[SIGNATURE])), str(entry[ENTRY]).encode("ascii"))
    except (InvalidSignature, ValueError, KeyError, TypeError, UnicodeEncodeError):
        return False
    return True


@dataclass(frozen=True)
class SignatureReport:
    """The verdict on one ledger's signatures.

    status: "verified" (every entry signed by the trusted key); "self-asserted" (every entry signed
    by one key, the one named in the entries: no trusted key to compare with); "unsigned" (no
    entry carries a signature); "bad" (problems name the entries).
    """

    status: str
    problems: tuple[str, ...] = ()
    signer: str = ""


def verify_signatures(ledger: Sequence[Mapping[str, Any]], *, trusted: str | None = None,
                      allow_unsigned_prefix: bool = False) -> SignatureReport:
    """Check every entry's signature, against `trusted` (hex public key) when given.

    Every entry must be signed by one and the same key; with `allow_unsigned_prefix`, entries
    before the first signed one (a ledger begun before signatures) are let through.
    """
    signed = [bool(e.get(SIGNATURE)) for e in ledger]
    if not any(signed):
        return SignatureReport("unsigned")
    first = signed.index(True)
    start = first if allow_unsigned_prefix else 0
    key = trusted or str(ledger[first].get(SIGNER, ""))
    problems = []
    for i in range(start, len(ledger)):
        e = ledger[i]
        where = f"entry {i} (round {e.get('round', '?')}, {e.get('mechanism', '?')})"
        if not signed[i]:
            problems.append(f"{where} is not signed")
        elif str(e.get(SIGNER, "")) != key:
            problems.append(f"{where} names signer {str(e.get('signer', ''))[:16]}…, not "
                            + ("the trusted key" if trusted else "the ledger's key") + f" {key[:16]}…")
        elif not signature_ok(e, key):
            problems.append(f"{where}: the signature does not verify (edited after signing, or forged)")
    if problems:
        return SignatureReport("bad", tuple(problems), key)
    return SignatureReport("verified" if trusted else "self-asserted", (), key)
