"""The ledger hash chain detects edited, deleted, reordered and out-of-order entries; Ed25519
signatures detect a chain rebuilt without the institution's key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedrec.common import chain
from fedrec.common.errors import ConfigError


def chained(n: int) -> list[dict[str, Any]]:
    ledger: list[dict[str, Any]] = []
    for r in range(n):
        ledger.append(chain.link({"round": r, "mechanism": "dp-sgd", "epsilon": 1.0 + r}, ledger))
    return ledger


def test_intact_chain_links_every_entry() -> None:
    ledger = chained(4)

    report = chain.verify(ledger)

    assert report.status == "intact" and not report.problems
    assert ledger[0]["prev_sha256"] == chain.GENESIS
    assert all(b["prev_sha256"] == a["entry_sha256"] for a, b in zip(ledger, ledger[1:]))
    assert chain.head(ledger) == ledger[-1]["entry_sha256"]


def test_edited_entry_is_detected() -> None:
    ledger = chained(4)
    ledger[2]["epsilon"] = 0.5

    report = chain.verify(ledger)

    assert report.status == "broken"
    assert any("entry 2" in p and "edited" in p for p in report.problems)


def test_deleted_entry_is_detected() -> None:
    ledger = chained(4)
    del ledger[1]

    report = chain.verify(ledger)

    assert report.status == "broken"
    assert any("entry 1" in p and "does not follow" in p for p in report.problems)


def test_reordered_entries_are_detected() -> None:
    ledger = chained(4)
    ledger[1], ledger[2] = ledger[2], ledger[1]

    assert chain.verify(ledger).status == "broken"


def test_entry_appended_out_of_order_is_detected() -> None:
    ledger = chained(3)
    stale = chain.link({"round": 9, "mechanism": "dp-sgd", "epsilon": 9.0}, ledger[:1])  # linked to entry 0
    ledger.append(stale)

    report = chain.verify(ledger)

    assert report.status == "broken"
    assert any("entry 3" in p for p in report.problems)


def test_rehashed_edit_still_breaks_the_next_link() -> None:
    ledger = chained(3)
    ledger[1]["epsilon"] = 0.1
    ledger[1]["entry_sha256"] = chain.entry_hash(ledger[1])  # a forger fixes the entry's own hash

    report = chain.verify(ledger)

    assert report.status == "broken" and any("entry 2" in p for p in report.problems)


def test_old_ledgers_are_readable_and_reported_unchained() -> None:
    old = [{"round": 0, "epsilon": 1.0}, {"round": 1, "epsilon": 2.0}]

    assert chain.verify(old).status == "unchained"
    continued = old + [chain.link({"round": 2, "epsilon": 3.0}, old)]
    report = chain.verify(continued)
    assert report.status == "partly-unchained" and report.notes


def test_a_copy_may_start_mid_chain_only_when_allowed() -> None:
    ledger = chained(4)

    assert chain.verify(ledger[2:], mid_chain=True).status == "intact"
    assert chain.verify(ledger[2:], mid_chain=True).notes
    assert chain.verify(ledger[2:]).status == "broken"  # a client's whole ledger starts at seq 0


# --- signatures ------------------------------------------------------------------------------


def signed(n: int, signer: chain.Signer) -> list[dict[str, Any]]:
    ledger: list[dict[str, Any]] = []
    for r in range(n):
        ledger.append(chain.link({"round": r, "mechanism": "dp-sgd", "epsilon": 1.0 + r}, ledger, signer=signer))
    return ledger


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    key, pub = chain.generate_key(tmp_path / "state")

    assert (key.name, pub.name) == ("ledger.key", "ledger.pub")
    assert key.stat().st_mode & 0o077 == 0
    signer = chain.load_signer(key)
    assert chain.load_public(pub) == signer.public_hex
    with pytest.raises(ConfigError, match="already exists"):
        chain.generate_key(tmp_path / "state")
    assert chain.state_signer(tmp_path / "state").public_hex == signer.public_hex  # reused, not replaced
    assert chain.state_signer(tmp_path / "fresh").public_hex != signer.public_hex  # made on first use


def test_signed_chain_verifies_against_its_key_and_no_other() -> None:
    mine, other = chain.Signer(Ed25519PrivateKey.generate()), chain.Signer(Ed25519PrivateKey.generate())
    ledger = signed(3, mine)

    assert chain.verify(ledger).status == "intact"  # the signature is outside the hashed body
    assert chain.verify_signatures(ledger).status == "self-asserted"
    assert chain.verify_signatures(ledger, trusted=mine.public_hex).status == "verified"
    assert chain.verify_signatures(ledger, trusted=other.public_hex).status == "bad"


def test_an_edit_rehashed_without_the_key_breaks_its_signature() -> None:
    mine = chain.Signer(Ed25519PrivateKey.generate())
    ledger = signed(3, mine)
    ledger[1]["epsilon"] = 0.1
    ledger[1]["entry_sha256"] = chain.entry_hash(ledger[1])

    report = chain.verify_signatures(ledger)

    assert report.status == "bad" and any("entry 1" in p and "does not verify" in p for p in report.problems)


def test_an_unsigned_entry_in_a_signed_ledger_is_named() -> None:
    mine = chain.Signer(Ed25519PrivateKey.generate())
    ledger = signed(2, mine)
    ledger.append(chain.link({"round": 2, "mechanism": "dp-sgd", "epsilon": 3.0}, ledger))

    report = chain.verify_signatures(ledger)

    assert report.status == "bad" and "entry 2" in report.problems[0] and "not signed" in report.problems[0]
