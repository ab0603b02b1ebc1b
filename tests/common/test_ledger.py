"""The one ledger-line type: exact round trips (the hash chain is over the written object), typed
parsing that names the source and the field, and a ledger that chains, signs and appends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedrec.common import chain
from fedrec.common.errors import DataError
from fedrec.common.ledger import (
    MECHANISM_DP_SGD,
    MECHANISM_EVAL,
    Ledger,
    LedgerLine,
    key_signer,
    line_from_metrics,
    read_ledger,
)
from fedrec.common.privacy.analysis import MechanismStep

SIGNER = chain.Signer(Ed25519PrivateKey.generate())

CLIENT_LINE = {  # what client/local.py writes for a DP-SGD round, before it is chained
    "round": 2, "mechanism": "dp-sgd", "noise_multiplier": 1.46484375, "sample_rate": 0.25, "steps": 4,
    "clip_norm": 1.0, "delta": 1e-05, "epsilon": 7.382082085895355, "accountant": "rdp", "budget": 8.0,
    "dp": True, "rng": "os-entropy", "policy_sha256": "ab" * 32, "run_id": "run-1", "adapter_sha256": "cd" * 32,
}
EVAL_LINE = {**CLIENT_LINE, "mechanism": "dp-eval", "noise_multiplier": 11.125, "sample_rate": 1.0, "steps": 1,
             "split": "valid", "prior_sha256": "ef" * 32}
CENTRAL_LINE = {  # simulations/central.py before chains: a line number, the users, no dp flag
    "round": 1, "mechanism": "prior-counts", "noise_multiplier": 2, "sample_rate": 1, "steps": 1, "clip_norm": 1,
    "delta": 1e-05, "epsilon": 3.5, "accountant": "rdp", "users": 943, "budget": 8, "rng": "os-entropy"}
INFINITE = {**CLIENT_LINE, "mechanism": "non-private", "noise_multiplier": 0.0, "epsilon": float("inf"), "dp": False}


@pytest.mark.parametrize("written", [
    CLIENT_LINE, EVAL_LINE, CENTRAL_LINE, INFINITE,
    chain.link(CLIENT_LINE, [], signer=SIGNER),  # chained and signed, as a client commits it
    chain.link(EVAL_LINE, [chain.link(CLIENT_LINE, [])]),  # chained, unsigned
    {**CENTRAL_LINE, "note": {"written by": "a later version"}, "shards": [1, 2]},  # fields unknown here
])
def test_every_written_line_round_trips_exactly(written: dict[str, Any]) -> None:
    line = LedgerLine.from_dict(written, source="x")

    assert line.to_dict() == written
    text = json.dumps(line.to_dict(), sort_keys=True)
    assert text == json.dumps(written, sort_keys=True)  # the bytes the hash chain is over
    assert chain.entry_hash(line.to_dict()) == chain.entry_hash(written)


def test_unknown_fields_are_kept_and_typed_fields_read() -> None:
    line = LedgerLine.from_dict({**CENTRAL_LINE, "note": "x"}, source="x")

    assert line.extra == {"note": "x"} and line.users == 943 and line.dp is None and line.split is None
    assert line.step == MechanismStep(noise_multiplier=2.0, sample_rate=1.0, steps=1)
    assert line.is_popularity and not line.is_dp_sgd and not line.without_dp


@pytest.mark.parametrize(("change", "field"), [
    ({"noise_multiplier": "1.0"}, "noise_multiplier"),
    ({"steps": 4.0}, "steps"),
    ({"round": True}, "round"),
    ({"dp": "yes"}, "dp"),
    ({"rng": 7}, "rng"),
    ({"budget": None}, "budget"),
])
def test_a_bad_field_is_rejected_naming_the_source_and_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(DataError, match=rf"ledgers/c\.jsonl entry 3: {field}="):
        LedgerLine.from_dict({**CLIENT_LINE, **change}, source="ledgers/c.jsonl entry 3")


def test_a_missing_field_and_a_non_object_are_rejected() -> None:
    without = {k: v for k, v in CLIENT_LINE.items() if k not in ("epsilon", "delta")}

    with pytest.raises(DataError, match="entry 0 lacks delta, epsilon"):
        LedgerLine.from_dict(without, source="entry 0")
    with pytest.raises(DataError, match="must be a JSON object"):
        LedgerLine.from_dict([1, 2], source="entry 0")
    with pytest.raises(DataError, match="epsilon is given twice"):
        LedgerLine(round=1, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5,
                   epsilon=1.0, extra={"epsilon": 2.0})


def test_what_a_line_says() -> None:
    evaluation = LedgerLine.from_dict(EVAL_LINE, source="x")
    sgd = LedgerLine.from_dict(CLIENT_LINE, source="x")

    assert evaluation.is_validation(2) and not evaluation.is_validation(1) and not sgd.is_validation(2)
    assert LedgerLine.from_dict({**CLIENT_LINE, "clip_norm": 2.5}, source="x").noise_std == 1.46484375 * 2.5
    assert LedgerLine.from_dict({k: v for k, v in CLIENT_LINE.items() if k != "clip_norm"},
                                source="x").noise_std == 0.0  # not said: only the scorer's shrinkage reads it
    assert LedgerLine.from_dict(INFINITE, source="x").without_dp
    assert sgd.where() == "round 2 (dp-sgd)"
    assert sgd.metrics() == {"ledger.noise_multiplier": 1.46484375, "ledger.sample_rate": 0.25, "ledger.steps": 4.0,
                             "ledger.clip_norm": 1.0, "ledger.delta": 1e-05, "ledger.epsilon": 7.382082085895355}


def test_the_line_a_server_keeps_for_a_client_without_chains() -> None:
    metrics = {"epsilon": 7.3, **LedgerLine.from_dict(CLIENT_LINE, source="x").metrics()}

    kept = line_from_metrics(metrics, rnd=2, mechanism=MECHANISM_DP_SGD, accountant="rdp")

    assert kept == {"round": 2, "mechanism": "dp-sgd", "accountant": "rdp", "noise_multiplier": 1.46484375,
                    "sample_rate": 0.25, "steps": 4, "clip_norm": 1.0, "delta": 1e-05, "epsilon": 7.382082085895355}
    assert LedgerLine.from_dict(kept, source="server copy").to_dict() == kept


def test_a_ledger_chains_signs_and_appends_its_lines(tmp_path: Path) -> None:
    path, key = tmp_path / "ledgers" / "m.jsonl", tmp_path / "ledgers" / "m.key"
    ledger = Ledger(path=path, signer=lambda: key_signer(key))
    first = LedgerLine.from_dict(CENTRAL_LINE, source="x")

    ledger.append(first)
    ledger.append(LedgerLine.from_dict({**CENTRAL_LINE, "round": 2, "mechanism": MECHANISM_EVAL}, source="x"))

    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert written == ledger.state_dict() and [x.to_dict() for x in read_ledger(path)] == written
    assert chain.verify(written).status == "intact"
    report = chain.verify_signatures(written, trusted=chain.load_public(key.with_suffix(".pub")))
    assert report.status == "verified"
    assert {k: v for k, v in written[0].items() if k not in chain.CHAIN_FIELDS + chain.SIGNATURE_FIELDS} == CENTRAL_LINE
    assert ledger.mechanisms() == {"prior-counts", "dp-eval"}


def test_a_ledger_loads_only_whole_lines() -> None:
    ledger = Ledger()
    ledger.load_state_dict([CLIENT_LINE])

    with pytest.raises(DataError, match="state entry 1 lacks steps"):
        ledger.load_state_dict([CLIENT_LINE, {k: v for k, v in CLIENT_LINE.items() if k != "steps"}],
                               source="state")
    with pytest.raises(DataError, match="a list of ledger lines"):
        ledger.load_state_dict("not a list")

    assert [x.to_dict() for x in ledger.lines] == [CLIENT_LINE]  # unchanged by the failed loads
