"""Checks over one client's privacy ledger: ε re-derived independently, budget, δ, chain, rounds.

Every check yields a `Check` with status PASS, FAIL or WARN (and INFO for stated facts). A ledger
passes when no check FAILs; a WARN is shown to the reader but does not fail the audit. A ledger
that is not chained or not signed FAILs unless the auditor accepts legacy ledgers
(`Trust.allow_legacy`); signatures that verify only against the key the ledger names itself are a
WARN (whoever can write the ledger could have re-signed it), against a key the auditor was given
(`Trust.keys`) a PASS. Pure functions over JSON-like dicts: no torch, no files. The chain is
checked over the lines as written; everything else reads them as `LedgerLine`s (common/ledger.py),
and a line that is not one FAILs "ledger readable" and is left out of the other checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrec.common import chain
from fedrec.common import ledger as ledgers
from fedrec.common.errors import DataError, PrivacyError
from fedrec.common.ledger import MECHANISM_POPULARITY, LedgerLine
from fedrec.common.privacy import accountants
from fedrec.common.rundir import CONFIG, ROUNDS

PASS, FAIL, WARN, INFO = "pass", "fail", "warn", "info"


@dataclass(frozen=True)
class Tolerance:
    """How far a reported ε may sit below the independent re-derivation before it is flagged.

    A reported ε is flagged when it is below ref·(1 - rel) - abs, ref being the smallest ε of the
    independent accountants (dp-accounting RDP and PLD). PLD is near-exact for this mechanism and
    pessimistic by its discretisation (1e-4 in the privacy loss), so no valid accounting of the
    recorded mechanism can claim noticeably less; 1 % + 0.01 absorbs numerical differences.
    """

    rel: float = 0.01
    abs: float = 0.01

    def below(self, reported: float, reference: float) -> bool:
        return reported < reference * (1 - self.rel) - self.abs

    def above(self, value: float, budget: float) -> bool:
        return value > budget * (1 + self.rel) + self.abs


@dataclass(frozen=True)
class Trust:
    """What the auditor brings from outside the audited files: institutions' public ledger keys
    (client -> hex, from `fedrec deploy keygen`'s ledger.pub), chain heads an institution reported
    (client -> entry_sha256), and whether ledgers written before chains/signatures are accepted."""

    keys: Mapping[str, str] = field(default_factory=dict)
    heads: Mapping[str, str] = field(default_factory=dict)
    allow_legacy: bool = False


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class RunContext:
    """What a run directory adds to a bare ledger file."""

    trained_rounds: tuple[int, ...]  # rounds in which rounds.jsonl says this client trained
    round_epsilon: Mapping[int, float]  # round -> ε this client reported in rounds.jsonl
    prior_released: bool  # the server's prior release took this client's counts
    dp: bool  # fed.dp: DP-SGD rounds must appear in the ledger
    own_copy: Sequence[Mapping[str, Any]] | None  # the client's own ledger, where the run holds it
    budget: float | None = None  # the configured budget (when the ledger does not record one)
    batch_size: int | None = None  # train.batch_size: q must be batch_size / users (Poisson)
    budget_binding: bool = False  # the run's config set this client's budget: the ledger must agree


@dataclass
class ClientAudit:
    """One client's ledger and the verdict on it."""

    client: str
    source: str
    entries: list[dict[str, Any]]  # as written: what the chain is over
    lines: list[LedgerLine] = field(default_factory=list)  # the entries that are whole lines
    budget: float | None = None
    users: int | None = None
    delta: float | None = None
    rederived: dict[str, list[float]] = field(default_factory=dict)  # accountant -> ε per entry
    checks: list[Check] = field(default_factory=list)
    chain_head: str = chain.GENESIS

    @property
    def spent(self) -> float:
        return float(self.lines[-1].epsilon) if self.lines else 0.0

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.spent

    @property
    def passed(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def final(self) -> dict[str, float]:
        """Accountant -> ε after the last entry."""
        return {k: v[-1] for k, v in self.rederived.items() if v}

    def agreement(self) -> float:
        """Largest relative gap between the training accountant's family and its independent twin."""
        finals = self.final()
        gaps = [abs(finals[a] - finals[b]) / max(finals[b], 1e-12)
                for a, b in ((accountants.OPACUS_RDP, accountants.DPACC_RDP),
                             (accountants.OPACUS_PRV, accountants.DPACC_PLD))
                if a in finals and b in finals and math.isfinite(finals[a])]
        return max(gaps, default=0.0)


def audit_ledger(
    client: str, entries: Sequence[Mapping[str, Any]], *, source: str, context: RunContext | None = None,
    tol: Tolerance = Tolerance(), mid_chain: bool = False, trust: Trust = Trust(),
) -> ClientAudit:
    """Run every check on one client's ledger (and, with `context`, against its run)."""
    written = [dict(e) for e in entries]
    audit = ClientAudit(client, source, written, ledgers.readable_lines(written),
                        chain_head=chain.head(entries))
    fields = _check_fields(audit.entries)
    audit.checks.append(fields)
    audit.checks.append(_check_chain(audit.entries, mid_chain=mid_chain, allow_legacy=trust.allow_legacy))
    if audit.entries:
        audit.checks.append(_check_signatures(audit.entries, trust.keys.get(client), trust.allow_legacy))
        audit.checks.append(_check_rng(audit.lines))
    if context is not None:
        audit.checks += [_check_rounds(audit.lines, context), _check_copy(audit.entries, context)]
    if client in trust.heads:
        audit.checks.append(check_head(context.own_copy if context and context.own_copy is not None
                                       else audit.entries, trust.heads[client]))
    if fields.status == FAIL or not audit.entries:
        return audit
    audit.budget = _recorded([x.budget for x in audit.lines], context.budget if context else None)
    audit.users = _recorded([x.users for x in audit.lines], None)
    audit.delta = float(audit.lines[-1].delta)
    audit.rederived = accountants.running_epsilons([x.step for x in audit.lines], audit.delta)
    audit.checks += [
        _check_epsilon(audit, tol), _check_budget(audit, tol), _check_budget_fixed(audit.lines, context),
        _check_delta(audit), _check_sampling(audit, context.batch_size if context else None),
    ]
    return audit


# --- individual checks -----------------------------------------------------------------------


def _check_fields(entries: Sequence[Mapping[str, Any]]) -> Check:
    name = "ledger readable"
    if not entries:
        return Check(name, WARN, "the ledger is empty: this client released nothing")
    lines = []
    for i, e in enumerate(entries):
        try:
            lines.append(LedgerLine.from_dict(e, source=f"entry {i}"))
        except DataError as exc:
            return Check(name, FAIL, str(exc))
        try:
            lines[-1].step  # noqa: B018 (σ, q and steps must be a mechanism the accountants compose)
        except PrivacyError as exc:
            return Check(name, FAIL, f"entry {i}: {exc}")
    deltas = {float(x.delta) for x in lines}
    if len(deltas) > 1:
        return Check(name, FAIL, f"δ changes between releases ({sorted(deltas)}); ε composes at one δ")
    return Check(name, PASS, f"{len(entries)} releases, each with σ, q, steps, δ and ε")


def _check_chain(entries: Sequence[Mapping[str, Any]], *, mid_chain: bool,
                 allow_legacy: bool = False) -> Check:
    name = "hash chain"
    report = chain.verify(entries, mid_chain=mid_chain)
    legacy = WARN if allow_legacy else FAIL
    if report.status == "broken":
        first = ledgers.claimed_seq(entries[0]) if entries else None
        truncated = ([f"the ledger starts at seq {first}, not 0: its first {first} entries are missing "
                      "(a truncated head); audit the client's whole ledger, or pass --allow-legacy to "
                      "take its first link on trust"]
                     if not mid_chain and isinstance(first, int) and first > 0 else [])
        return Check(name, FAIL, "; ".join(truncated + list(report.problems)))
    if report.status == "unchained":
        return Check(name, legacy, "unchained: no entry carries chain fields (written before hash chains, "
                     "or its chain stripped); edits, deletions and reordering cannot be detected"
                     + ("" if allow_legacy else " — accepted only with --allow-legacy"))
    notes = "; ".join(report.notes)
    if report.status == "partly-unchained":
        return Check(name, legacy, notes + ("" if allow_legacy else " — accepted only with --allow-legacy"))
    if notes:
        return Check(name, WARN, notes)
    return Check(name, PASS, f"{len(entries)} entries linked, head {chain.head(entries)[:16]}…")


def _check_signatures(entries: Sequence[Mapping[str, Any]], trusted: str | None, allow_legacy: bool) -> Check:
    name = "ledger signatures"
    report = chain.verify_signatures(entries, trusted=trusted, allow_unsigned_prefix=allow_legacy)
    if report.status == "unsigned":
        return Check(name, WARN if allow_legacy else FAIL,
                     "unsigned: no entry carries a signature (written before signed ledgers, or its "
                     "signatures stripped); anyone who can write the file could have written it"
                     + ("" if allow_legacy else " — accepted only with --allow-legacy"))
    if report.status == "bad":
        return Check(name, FAIL, "; ".join(report.problems))
    if report.status == "self-asserted":
        return Check(name, WARN, f"every entry verifies against key {report.signer[:16]}…, but that key is "
                     "self-asserted (named in the ledger itself, no --trust key for this client): whoever "
                     "can write this ledger could have re-signed it with a key of their own. Get the "
                     f"institution's {chain.PUB_FILE} and pass --trust CLIENT={chain.PUB_FILE}")
    return Check(name, PASS, f"every entry signed by the trusted key {report.signer[:16]}…")


def check_head(entries: Sequence[Mapping[str, Any]], expected: str) -> Check:
    """The head an institution reported must be the hash of an entry of this ledger (its last, or
    an earlier one when the ledger has grown since): a truncated or rewritten ledger fails."""
    name = "chain head = expected"
    hashes = [ledgers.entry_sha256(e) or "" for e in entries]
    expected = expected.strip().lower()
    if expected not in hashes:
        return Check(name, FAIL, f"expected head {expected[:16]}… is not in this ledger (head "
                     f"{chain.head(entries)[:16]}…): it was truncated or rewritten")
    later = len(hashes) - 1 - hashes.index(expected)
    return Check(name, PASS, f"the ledger reaches the expected head {expected[:16]}…"
                 + (f" and continues {later} entries past it" if later else ""))


def _check_rng(lines: Sequence[LedgerLine]) -> Check:
    """Which randomness ran, as the ledger records it; never asserted beyond what is recorded."""
    name = "randomness"
    values = sorted({str(x.rng) for x in lines if x.rng is not None})
    unrecorded = sum(x.rng is None for x in lines)
    if not values:
        return Check(name, WARN, "not recorded in the ledger (written before RNG recording): sampling and "
                     "noise came from seeded generators (torch, numpy) whose seed the run config "
                     "determines; treat the noise as predictable by whoever knows that config")
    problems = [f"{unrecorded} entries do not record their RNG"] if unrecorded else []
    if any("deterministic" in v for v in values):  # the noise is predictable: no guarantee holds
        return Check(name, FAIL, "; ".join(problems + [
            f"rng = {', '.join(values)}: a deterministic (seeded) run for tests or benchmarks; anyone who "
            "knows the seed can regenerate the noise, so these releases are not private"]))
    known = {"os-entropy": "fresh OS entropy per release (cryptographically secure)"}
    detail = "; ".join(f"rng = {v!r}" + (f": {known[v]}" if v in known else "") for v in values)
    return Check(name, WARN if problems else INFO,
                 "; ".join(problems + [f"recorded in the ledger: {detail}"]))


def _check_epsilon(audit: ClientAudit, tol: Tolerance) -> Check:
    name = "ε re-derived"
    independent = [audit.rederived[a] for a in accountants.INDEPENDENT]
    bad = []
    for i, x in enumerate(audit.lines):
        reported = float(x.epsilon)
        reference = min(values[i] for values in independent)
        if tol.below(reported, reference):
            bad.append(f"{x.where()}: reported ε={reported:.4f} < re-derived {reference:.4f}")
        if i and reported < float(audit.lines[i - 1].epsilon):
            bad.append(f"round {x.round}: ε went down from {audit.lines[i - 1].epsilon:.4f}")
    if bad:
        return Check(name, FAIL, "; ".join(bad))
    finals = audit.final()
    return Check(name, PASS, "every reported ε ≥ the independent re-derivation (tolerance "
                 f"{tol.rel:.0%} + {tol.abs}); final: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in finals.items()))


def _check_budget(audit: ClientAudit, tol: Tolerance) -> Check:
    name = "within budget"
    if audit.budget is None:
        return Check(name, WARN, "no budget recorded in the ledger (or the run's config): spend cannot be "
                     "checked against it")
    same = audit.rederived[accountants.SAME_FAMILY.get(str(audit.lines[-1].accountant),
                                                       accountants.DPACC_RDP)]
    over = []
    for i, x in enumerate(audit.lines):
        reported = float(x.epsilon)
        if reported > audit.budget * (1 + 1e-9) or tol.above(same[i], audit.budget):
            over.append(f"{x.where()} took ε to {max(reported, same[i]):.4f} > budget {audit.budget:g}")
    if over:
        return Check(name, FAIL, "; ".join(over))
    return Check(name, PASS, f"ε {audit.spent:.3f} of {audit.budget:g} spent, never over")


def _check_budget_fixed(lines: Sequence[LedgerLine], ctx: RunContext | None) -> Check:
    """One budget for a client's whole history, and (where the run's config set it) that one."""
    name = "budget fixed"
    recorded = [(x.round, float(x.budget)) for x in lines if x.budget is not None]
    values = sorted({b for _, b in recorded})
    if not recorded:
        return Check(name, INFO, "the ledger records no budget")
    if len(values) > 1:
        changes = [f"round {r}: {b:g}" for (r, b), (_, prev) in zip(recorded[1:], recorded, strict=False)
                   if b != prev]
        return Check(name, FAIL, "the budget changes within this client's history (first "
                     f"{recorded[0][1]:g}; " + ", ".join(changes)
                     + "): a budget is fixed once, so ε was measured against a moved goalpost")
    if ctx is not None and ctx.budget_binding and ctx.budget is not None \
            and not math.isclose(values[0], float(ctx.budget), rel_tol=1e-9):
        return Check(name, FAIL, f"every entry records budget {values[0]:g}, but the run's {CONFIG} gives "
                     f"this client {float(ctx.budget):g}: the ledger or the config was rewritten")
    return Check(name, PASS, f"budget {values[0]:g} in every entry"
                 + (" = the run's config" if ctx is not None and ctx.budget_binding else ""))


def _check_delta(audit: ClientAudit) -> Check:
    name = "δ < 1/users"
    assert audit.delta is not None
    if audit.users is None:
        return Check(name, WARN, f"δ={audit.delta:.2e}; the ledger does not record the number of users")
    if audit.users < 1 or audit.delta >= 1.0 / audit.users:
        return Check(name, FAIL, f"δ={audit.delta:.2e} ≥ 1/{audit.users} users: a mechanism that publishes "
                     "one user's data outright could meet it")
    return Check(name, PASS, f"δ={audit.delta:.2e} < 1/{audit.users} = {1 / audit.users:.2e}")


def _check_sampling(audit: ClientAudit, batch_size: int | None) -> Check:
    """q of every DP-SGD block must be the Poisson rate batch_size/users (what was accounted)."""
    name = "Poisson sampling rate"
    sgd = [x for x in audit.lines if x.is_dp_sgd]
    if not sgd:
        return Check(name, INFO, "no DP-SGD release (only full releases, q = 1)")
    if batch_size is None or audit.users is None:
        return Check(name, INFO, "q recorded per release; batch size or users unknown, rate not re-checked")
    expected = min(1.0, batch_size / audit.users)
    wrong = [x for x in sgd if not math.isclose(float(x.sample_rate), expected, rel_tol=1e-9)]
    if wrong:
        return Check(name, FAIL, f"q={wrong[0].sample_rate} in round {wrong[0].round}, but Poisson "
                     f"sampling at batch size {batch_size} of {audit.users} users gives q={expected:.6g}")
    return Check(name, PASS, f"q = {batch_size}/{audit.users} = {expected:.4g} in every DP-SGD release")


def _check_rounds(lines: Sequence[LedgerLine], ctx: RunContext) -> Check:
    name = "rounds complete"
    rounds = [x.round for x in lines if x.is_dp_sgd]
    problems = []
    if not ctx.dp:
        problems.append("the run was configured with fed.dp = false: its rounds trained without DP-SGD and "
                        "released adapters that carry no privacy guarantee")
    off = sorted({x.round for x in lines if x.dp is False})
    if off:
        problems.append(f"rounds {off} record dp = false: trained without DP")
    missing = sorted(set(ctx.trained_rounds) - set(rounds))
    if missing:
        problems.append(f"rounds {missing} were trained ({ROUNDS}) but have no ledger entry")
    extra = sorted(set(rounds) - set(ctx.trained_rounds))
    if extra:
        problems.append(f"rounds {extra} are in the ledger but the run records no training in them")
    if rounds != sorted(set(rounds)):
        problems.append(f"rounds out of order or repeated: {rounds}")
    if ctx.prior_released and not any(x.is_popularity for x in lines):
        problems.append("the prior release took this client's counts but the ledger has no "
                        f"{MECHANISM_POPULARITY} entry")
    for x in lines:
        told = ctx.round_epsilon.get(x.round)
        if x.is_dp_sgd and told is not None and not math.isclose(told, float(x.epsilon), rel_tol=1e-9):
            problems.append(f"round {x.round}: ledger ε={x.epsilon:.4f} but the client reported "
                            f"{told:.4f} in {ROUNDS}")
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    return Check(name, PASS, f"one entry for each of the {len(ctx.trained_rounds)} rounds trained"
                 + (" and for the prior release" if ctx.prior_released else ""))


def _check_copy(entries: Sequence[Mapping[str, Any]], ctx: RunContext) -> Check:
    name = "server copy = client's own ledger"
    if ctx.own_copy is None:
        return Check(name, WARN, "the client's own ledger is not in this run directory (a deployed client "
                     "keeps it): ask the client for its chain head to compare")
    own = [dict(e) for e in ctx.own_copy]
    if own == [dict(e) for e in entries]:
        return Check(name, PASS, f"identical, chain head {chain.head(own)[:16]}…")
    first = next((i for i, (a, b) in enumerate(zip(own, entries, strict=False)) if a != dict(b)),
                 min(len(own), len(entries)))
    return Check(name, FAIL, f"the copies differ from entry {first} on ({len(entries)} entries here, "
                 f"{len(own)} in the client's own ledger)")


def _recorded(values: Sequence[Any], default: Any) -> Any:
    """The last value a ledger records (None: a line without it), else `default`."""
    recorded = [v for v in values if v is not None]
    return recorded[-1] if recorded else default
