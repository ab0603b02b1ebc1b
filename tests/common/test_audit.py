"""Ledger checks: a true ledger passes; under-reported ε, over-budget rounds, large δ, missing
rounds, tampering and diverging copies each fail the audit with a message naming them."""

from __future__ import annotations

from typing import Any

import pytest
from fedrec.common import chain
from fedrec.common.audit import FAIL, PASS, WARN, RunContext, audit_ledger
from fedrec.common.privacy import MechanismStep, epsilon


def make_ledger(rounds: int = 3, *, sigma: float = 1.0, q: float = 0.25, steps: int = 4, users: int = 32,
                budget: float = 8.0, delta: float = 1e-5, chained: bool = True) -> list[dict[str, Any]]:
    """A true ledger: a prior release (q = 1) and `rounds` DP-SGD rounds, ε from Opacus RDP."""
    history = [MechanismStep(2.0, 1.0, 1)]
    blocks = [("prior-counts", 0, history[0])]
    for r in range(1, rounds + 1):
        block = MechanismStep(sigma, q, steps)
        history.append(block)
        blocks.append(("dp-sgd", r, block))
    ledger: list[dict[str, Any]] = []
    for i, (mechanism, rnd, block) in enumerate(blocks):
        entry = {"round": rnd, "mechanism": mechanism, "noise_multiplier": block.noise_multiplier,
                 "sample_rate": block.sample_rate, "steps": block.steps, "clip_norm": 1.0, "delta": delta,
                 "epsilon": epsilon(history[: i + 1], delta=delta), "accountant": "rdp", "users": users,
                 "budget": budget}
        ledger.append(chain.link(entry, ledger) if chained else entry)
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

    audit = audit_ledger("c", ledger, source="mem", context=context(ledger))

    assert audit.passed, audit.checks
    assert set(statuses(audit).values()) == {PASS}
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


def test_unchained_ledger_is_a_warning_not_a_pass() -> None:
    ledger = make_ledger(chained=False)

    audit = audit_ledger("c", ledger, source="mem")

    assert statuses(audit)["hash chain"] == WARN
    assert audit.passed  # readable, and every other check still runs
    assert statuses(audit)["ε re-derived"] == PASS


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
    out: list[dict[str, Any]] = []
    for e in ledger:
        out.append(chain.link(e, out))
    return out
