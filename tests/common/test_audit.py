"""Ledger checks: a true ledger passes; under-reported ε, over-budget rounds, large δ, missing
rounds, tampering, forged signatures, stripped chains, moved budgets and diverging copies each
fail the audit with a message naming them."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedrec.client.audit.checks import FAIL, INFO, PASS, WARN, RunContext, Trust, audit_ledger
from fedrec.common import chain
from fedrec.common.privacy.analysis import MechanismStep, epsilon

SIGNER = chain.Signer(Ed25519PrivateKey.generate())  # the institution's own ledger key
TRUST = Trust(keys={"c": SIGNER.public_hex})


def make_ledger(rounds: int = 3, *, sigma: float = 1.0, q: float = 0.25, steps: int = 4, users: int = 32,
                budget: float = 8.0, delta: float = 1e-5, chained: bool = True,
                signer: chain.Signer | None = SIGNER) -> list[dict[str, Any]]:
    """A true ledger: a prior release (q = 1) and `rounds` DP-SGD rounds, ε from Opacus RDP."""
    history = [MechanismStep(noise_multiplier=2.0, sample_rate=1.0, steps=1)]
    blocks = [("prior-counts", 0, history[0])]
    for r in range(1, rounds + 1):
        block = MechanismStep(noise_multiplier=sigma, sample_rate=q, steps=steps)
        history.append(block)
        blocks.append(("dp-sgd", r, block))
    ledger: list[dict[str, Any]] = []
    for i, (mechanism, rnd, block) in enumerate(blocks):
        entry = {"round": rnd, "mechanism": mechanism, "noise_multiplier": block.noise_multiplier,
                 "sample_rate": block.sample_rate, "steps": block.steps, "clip_norm": 1.0, "delta": delta,
                 "epsilon": epsilon(history[: i + 1], delta=delta), "accountant": "rdp", "users": users,
                 "budget": budget, "rng": "os-entropy"}
        ledger.append(chain.link(entry, ledger, signer=signer) if chained else entry)
    return ledger


def statuses(audit) -> dict[str, str]:
    return {c.name: c.status for c in audit.checks}


def context(ledger, **kw) -> RunContext:
    args = {"trained_rounds": tuple(e["round"] for e in ledger if e["mechanism"] == "dp-sgd"),
            "round_epsilon": {e["round"]: e["epsilon"] for e in ledger if e["mechanism"] == "dp-sgd"},
            "prior_released": True, "dp": True, "own_copy": [dict(e) for e in ledger], "batch_size": 8}
    return RunContext(**{**args, **kw})


def test_true_ledger_passes_every_check() -> None:
    ledger = make_ledger()

    audit = audit_ledger("c", ledger, source="mem", context=context(ledger), trust=TRUST)

    assert audit.passed, audit.checks
    assert statuses(audit).pop("randomness") == INFO  # a stated fact: which RNG the ledger records
    assert set(statuses(audit).values()) - {INFO} == {PASS}
    assert {k for k, v in statuses(audit).items() if v == INFO} == {"randomness"}
    assert audit.budget == 8.0 and audit.users == 32 and audit.spent == ledger[-1]["epsilon"]
    assert audit.remaining == pytest.approx(8.0 - ledger[-1]["epsilon"])
    assert len(audit.rederived["dp-accounting-pld"]) == 4
    assert audit.agreement() < 0.01


def test_under_reported_epsilon_fails() -> None:
    ledger = make_ledger()
    ledger[2]["epsilon"] *= 0.8  # claims less than the mechanism spent
    ledger = relink(ledger)  # even with a consistent chain

    audit = audit_ledger("c", ledger, source="mem")

    assert statuses(audit)["ε re-derived"] == FAIL
    assert not audit.passed
    assert "round 2" in next(c.detail for c in audit.checks if c.name == "ε re-derived")


def test_over_budget_round_is_flagged() -> None:
    ledger = make_ledger(rounds=6, sigma=0.7, budget=4.0)

    audit = audit_ledger("c", ledger, source="mem")

    detail = next(c.detail for c in audit.checks if c.name == "within budget")
    assert statuses(audit)["within budget"] == FAIL and "budget 4" in detail
    first_over = next(e["round"] for e in ledger if e["epsilon"] > 4.0)
    assert f"round {first_over} " in detail


def test_budget_from_the_run_config_when_the_ledger_has_none() -> None:
    ledger = [{k: v for k, v in e.items() if k != "budget"} for e in make_ledger(rounds=6, sigma=0.7)]

    assert statuses(audit_ledger("c", ledger, source="mem"))["within budget"] == WARN
    audit = audit_ledger("c", ledger, source="mem", context=context(ledger, budget=2.0, own_copy=None))
    assert statuses(audit)["within budget"] == FAIL


def test_delta_not_below_one_over_users_fails() -> None:
    ledger = make_ledger(users=32, delta=0.05)

    audit = audit_ledger("c", ledger, source="mem")

    assert statuses(audit)["δ < 1/users"] == FAIL


def test_missing_round_fails() -> None:
    ledger = make_ledger(rounds=3)
    ctx = context(ledger)
    del ledger[2]  # round 2's entry
    ledger = relink(ledger)  # a chain rebuilt to hide it: the run record still shows the round

    audit = audit_ledger("c", ledger, source="mem", context=ctx)

    assert statuses(audit)["rounds complete"] == FAIL
    assert "[2]" in next(c.detail for c in audit.checks if c.name == "rounds complete")
    assert statuses(audit)["server copy = client's own ledger"] == FAIL


def test_each_tamper_case_fails_the_chain_check() -> None:
    edited = make_ledger()
    edited[1]["epsilon"] += 1.0
    deleted = make_ledger()
    del deleted[1]
    reordered = make_ledger()
    reordered[1], reordered[2] = reordered[2], reordered[1]
    late = make_ledger(rounds=2)
    late.append(chain.link({**make_ledger(rounds=3)[3]}, late[:2]))  # appended after a stale head

    for name, ledger in {"edited": edited, "deleted": deleted, "reordered": reordered, "late": late}.items():
        audit = audit_ledger("c", ledger, source="mem")
        assert statuses(audit)["hash chain"] == FAIL, name
        assert not audit.passed, name


def test_unchained_ledger_fails_unless_legacy_is_allowed() -> None:
    ledger = make_ledger(chained=False)

    strict = audit_ledger("c", ledger, source="mem")
    legacy = audit_ledger("c", ledger, source="mem", trust=Trust(allow_legacy=True))

    assert statuses(strict)["hash chain"] == FAIL and not strict.passed
    assert statuses(strict)["ε re-derived"] == PASS  # every other check still runs
    assert statuses(legacy)["hash chain"] == WARN
    assert legacy.passed  # --allow-legacy: readable, reported unchained


def test_wrong_sampling_rate_fails() -> None:
    ledger = make_ledger(q=0.5, users=32)

    audit = audit_ledger("c", ledger, source="mem", context=context(ledger, batch_size=8))

    assert statuses(audit)["Poisson sampling rate"] == FAIL


def test_unreadable_entry_fails_without_crashing() -> None:
    ledger = make_ledger()
    del ledger[1]["noise_multiplier"]

    audit = audit_ledger("c", ledger, source="mem")

    assert statuses(audit)["ledger readable"] == FAIL and not audit.rederived


def relink(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger re-chained and re-signed by its own key (what the institution itself could do)."""
    out: list[dict[str, Any]] = []
    for e in ledger:
        out.append(chain.link(e, out, signer=SIGNER))
    return out


# --- signatures, anchors, budgets, randomness (issue 13) --------------------------------------


def forge(ledger: list[dict[str, Any]], *, signer: chain.Signer | None = None, **changes: Any) -> list[dict[str, Any]]:
    """Every entry changed and the whole chain recomputed; signatures kept (or re-signed by `signer`)."""
    out: list[dict[str, Any]] = []
    for e in ledger:
        body = {**e, **changes}
        linked = chain.link(body, out, signer=signer)
        if signer is None and "signature" in e:  # the forger cannot sign: keeps the old fields
            linked = {**linked, "signer": e["signer"], "signature": e["signature"]}
            linked["entry_sha256"] = chain.entry_hash(linked)
        out.append(linked)
    return out


def test_forged_chain_with_recomputed_hashes_fails_on_its_signatures() -> None:
    ledger = make_ledger()
    forged = forge(ledger, noise_multiplier=5.0)  # σ raised: ε looks smaller; every hash consistent

    audit = audit_ledger("c", forged, source="mem")

    assert statuses(audit)["hash chain"] == PASS  # the unkeyed chain verifies...
    assert statuses(audit)["ledger signatures"] == FAIL  # ...its signatures do not
    assert not audit.passed


def test_resigned_forgery_fails_against_the_trusted_key_and_warns_without_one() -> None:
    other = chain.Signer(Ed25519PrivateKey.generate())  # the run directory's owner's own key
    forged = forge(make_ledger(), signer=other, noise_multiplier=5.0)

    trusted = audit_ledger("c", forged, source="mem", trust=TRUST)
    untrusted = audit_ledger("c", forged, source="mem")

    assert statuses(trusted)["ledger signatures"] == FAIL and not trusted.passed
    assert "trusted key" in next(c.detail for c in trusted.checks if c.name == "ledger signatures")
    assert statuses(untrusted)["ledger signatures"] == WARN  # self-asserted: said so, not a pass
    assert "self-asserted" in next(c.detail for c in untrusted.checks if c.name == "ledger signatures")


def test_stripped_chain_and_signatures_fail() -> None:
    stripped = [{k: v for k, v in e.items() if k not in chain.CHAIN_FIELDS + chain.SIGNATURE_FIELDS}
                for e in make_ledger()]

    audit = audit_ledger("c", stripped, source="mem")

    assert statuses(audit)["hash chain"] == FAIL and statuses(audit)["ledger signatures"] == FAIL
    assert not audit.passed


def test_unsigned_chain_fails_unless_legacy() -> None:
    ledger = make_ledger(signer=None)

    assert statuses(audit_ledger("c", ledger, source="mem"))["ledger signatures"] == FAIL
    assert statuses(audit_ledger("c", ledger, source="mem", trust=Trust(allow_legacy=True)))[
        "ledger signatures"] == WARN


def test_truncated_head_of_a_whole_ledger_fails() -> None:
    ledger = make_ledger()[2:]  # the first two releases cut off, the rest intact and signed

    audit = audit_ledger("c", ledger, source="mem", trust=TRUST)

    detail = next(c.detail for c in audit.checks if c.name == "hash chain")
    assert statuses(audit)["hash chain"] == FAIL and "truncated head" in detail


def test_expected_head_anchors_the_ledger() -> None:
    ledger = make_ledger()
    head = chain.head(ledger)

    ok = audit_ledger("c", ledger, source="mem", trust=Trust(heads={"c": head}))
    grown = audit_ledger("c", ledger, source="mem", trust=Trust(heads={"c": ledger[2]["entry_sha256"]}))
    cut = audit_ledger("c", ledger[:-1], source="mem", trust=Trust(heads={"c": head}))

    assert statuses(ok)["chain head = expected"] == PASS
    assert statuses(grown)["chain head = expected"] == PASS  # released more since the officer looked
    assert statuses(cut)["chain head = expected"] == FAIL and not cut.passed


def test_budget_that_changes_within_one_history_fails() -> None:
    ledger = make_ledger(rounds=3)
    for e in ledger[2:]:
        e["budget"] = 50.0  # state wiped and the client restarted with a larger budget
    ledger = relink(ledger)

    audit = audit_ledger("c", ledger, source="mem")

    assert statuses(audit)["budget fixed"] == FAIL
    assert statuses(audit)["within budget"] == PASS  # 50 is never exceeded: only this check sees it


def test_budget_rewritten_against_the_runs_config_fails() -> None:
    ledger = relink([{**e, "budget": 100.0} for e in make_ledger()])

    bound = audit_ledger("c", ledger, source="mem", context=context(ledger, budget=8.0, budget_binding=True))
    deployed = audit_ledger("c", ledger, source="mem", context=context(ledger, budget=8.0))

    assert statuses(bound)["budget fixed"] == FAIL and "config.toml" in \
        next(c.detail for c in bound.checks if c.name == "budget fixed")
    assert statuses(deployed)["budget fixed"] == PASS  # an institution's own settings.toml set it


def test_randomness_is_stated_from_the_ledger_only() -> None:
    secure = audit_ledger("c", make_ledger(), source="mem")
    seeded = audit_ledger("c", relink([{**e, "rng": "deterministic(seed=0)"} for e in make_ledger()]),
                          source="mem")
    old = audit_ledger("c", relink([{k: v for k, v in e.items() if k != "rng"} for e in make_ledger()]),
                       source="mem")

    secure_c, seeded_c, old_c = (next(c for c in a.checks if c.name == "randomness") for a in (secure, seeded, old))
    assert secure_c.status == INFO and "os-entropy" in secure_c.detail
    assert seeded_c.status == FAIL and "deterministic" in seeded_c.detail  # predictable noise: no guarantee
    assert old_c.status == WARN and "not recorded" in old_c.detail
    assert "cryptographic" not in old_c.detail and "cryptographic" not in seeded_c.detail


def test_a_run_or_a_round_without_dp_fails() -> None:
    ledger = make_ledger()
    off = relink([*ledger[:3], {**ledger[3], "dp": False}])

    assert statuses(audit_ledger("c", ledger, source="mem", context=context(ledger, dp=False)))[
        "rounds complete"] == FAIL
    assert statuses(audit_ledger("c", off, source="mem", context=context(off)))["rounds complete"] == FAIL
