"""`fedrec audit`: load run directories or ledger files, run every check, assemble the report.

Inputs are read-only: a run directory (its config, rounds, ledgers and simulated clients' state
directories), a client's state directory (its ledger and stored replies) or a bare ledger file;
their layout is common/rundir.py's, their lines common/ledger.py's. The checks live in
client/audit/checks.py; the report is written by client/audit/render.py.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.client.audit import checks as audit
from fedrec.client.audit.checks import (
    FAIL,
    INFO,
    PASS,
    WARN,
    Check,
    ClientAudit,
    RunContext,
    Tolerance,
    Trust,
)
from fedrec.common import ledger as ledgers
from fedrec.common.assets import sha256_file
from fedrec.common.errors import DataError
from fedrec.common.rundir import (
    CONFIG,
    LEDGER,
    LEDGERS,
    RunDir,
    StateDir,
    package_versions,
    read_json,
    read_jsonl,
    safe_name,
)

VERSIONED = ("fedrec", "opacus", "dp-accounting", "numpy", "scipy", "torch", "flwr", "safetensors")


@dataclass(frozen=True)
class RunRecord:
    """What the audit needs from a run's config.toml (read raw: it may come from another version)."""

    name: str
    target_epsilon: float | None
    client_budgets: Mapping[str, float]
    accountant: str
    secure_rng: bool
    dp: bool
    prior: bool
    weighting: str
    batch_size: int | None
    engine: str = ""  # provenance.engine: who ran the clients

    @property
    def budgets_from_config(self) -> bool:
        """`fedrec simulate` gives each simulated client its budget from this config; deployed
        institutions set their own (settings.toml), so config.toml says nothing about theirs."""
        return self.engine.startswith("flwr simulation")
    sample_rate: float | None = None  # train.sample_rate: the public q every DP-SGD line must carry

    def budget(self, client: str) -> float | None:
        return float(self.client_budgets.get(client, self.target_epsilon)) \
            if self.target_epsilon is not None else None


@dataclass
class Target:
    """One audited input: its client audits and run-level checks."""

    path: Path
    kind: str  # "run" | "client-state" | "ledger"
    record: RunRecord | None = None
    clients: list[ClientAudit] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    assumptions: list[Check] = field(default_factory=list)


@dataclass
class AuditReport:
    created: str
    targets: list[Target]
    tolerance: Tolerance
    versions: dict[str, str]
    checksums: dict[str, str]
    empirical: list[Any] = field(default_factory=list)  # client/audit/canaries.py results
    empirical_checks: list[Check] = field(default_factory=list)

    def failures(self) -> list[str]:
        out = []
        for t in self.targets:
            out += [f"{t.path}: {c.name}: {c.detail}" for c in t.checks if c.status == FAIL]
            for ca in t.clients:
                out += [f"{t.path} [{ca.client}]: {c.name}: {c.detail}"
                        for c in ca.checks if c.status == FAIL]
        out += [f"empirical: {c.name}: {c.detail}" for c in self.empirical_checks if c.status == FAIL]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()


def run_audit(paths: Sequence[Path], *, tol: Tolerance | None = None,
              trust: Trust | None = None) -> AuditReport:
    """Audit every path (run dir, client state dir or ledger file) against `trust` (the keys and
    heads the auditor was given; see client/audit/checks.py)."""
    if not paths:
        raise DataError("fedrec audit: name at least one run directory or ledger file (or use --empirical)")
    tol, trust = tol or Tolerance(), trust or Trust()
    targets = [_audit_path(Path(p), tol, trust) for p in paths]
    audited = {ca.client for t in targets for ca in t.clients}
    for flag, names in (("--trust", trust.keys), ("--expect-head", trust.heads)):
        for client in sorted(set(names) - audited):
            held = ", ".join(sorted(audited))
            targets[0].checks.append(Check(f"{flag} {client}", FAIL, f"{flag} names {client}, but no "
                                           f"input holds a ledger of {client} (audited: {held})"))
    checksums: dict[str, str] = {}
    for t in targets:
        checksums |= _checksums(t)
    return AuditReport(_now(), targets, tol, package_versions(VERSIONED), checksums)


def empty_report(tol: Tolerance | None = None) -> AuditReport:
    return AuditReport(_now(), [], tol or Tolerance(), package_versions(VERSIONED), {})


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _audit_path(path: Path, tol: Tolerance, trust: Trust) -> Target:
    if path.is_dir() and RunDir(path, create=False).ledgers_dir.is_dir():
        return _audit_run(path, tol, trust)
    if path.is_dir() and StateDir(path).ledger.is_file():
        return _audit_client_state(path, tol, trust)
    if path.is_file():
        target = Target(path, "ledger")
        # a bare file must hold the whole chain: a copy starting mid-chain (a truncated head) is
        # taken on trust only with --allow-legacy
        entries = read_ledger(path)
        ca = audit.audit_ledger(_client_name(path), entries, source=str(path), tol=tol,
                                mid_chain=trust.allow_legacy, trust=trust)
        ca.checks.append(check_dp(entries))
        target.clients.append(ca)
        target.assumptions = rng_assumptions(None, target.clients)
        return target
    raise DataError(f"{path} is neither a run directory (with {LEDGERS}/), a client state directory (with "
                    f"{LEDGER}) nor a ledger file; pass one of those")


def _client_name(path: Path) -> str:
    return path.parent.name if path.name == LEDGER else path.stem


def _audit_client_state(path: Path, tol: Tolerance, trust: Trust) -> Target:
    target = Target(path, "client-state")
    own = StateDir(path).ledger
    ledger = read_ledger(own)
    ca = audit.audit_ledger(path.name, ledger, source=str(own), tol=tol, trust=trust)
    ca.checks += [check_replies(path, ledger), check_state(path, ledger), check_dp(ledger)]
    target.clients.append(ca)
    target.assumptions = rng_assumptions(None, target.clients)
    return target


def _audit_run(root: Path, tol: Tolerance, trust: Trust) -> Target:
    run = RunDir(root, create=False)
    record = read_run_record(root)
    rounds = read_jsonl(run.rounds)
    target = Target(root, "run", record)
    copies, own = run.ledgers(), run.client_states()
    # a client that refused everything (ε = 0 in every round) released nothing and needs no ledger
    reported = sorted({c for r in rounds for c, e in r.get("epsilon", {}).items() if float(e) > 0})
    for client in sorted(set(copies) | set(own) | set(reported)):
        if client not in copies:
            target.checks.append(Check(f"ledger of {client}", FAIL,
                                       f"{client} released ({run.rounds.name} or its own state) but "
                                       f"{run.ledger(client).relative_to(root)} is missing"))
            continue
        ctx = _context(client, rounds, record, own[client].ledger if client in own else None)
        # the server's copy holds this run only: a client that took part in earlier runs starts mid-chain
        entries = read_ledger(copies[client])
        ca = audit.audit_ledger(client, entries, source=str(copies[client]),
                                context=ctx, tol=tol, mid_chain=True, trust=trust)
        ca.checks += [check_dp(entries, run_dp=record.dp), check_public_rate(entries, record.sample_rate)]
        if client in own and ctx.own_copy is not None:
            ca.checks += [check_replies(own[client].root, ctx.own_copy),
                          check_state(own[client].root, ctx.own_copy)]
        target.clients.append(ca)
    target.checks.append(Check("run record", PASS if rounds else WARN,
                               f"{len(rounds)} rounds in {run.rounds.name}, {len(copies)} client ledgers"))
    target.assumptions = assumptions(record, target.clients)
    return target


def _context(client: str, rounds: Sequence[Mapping[str, Any]], record: RunRecord,
             own_path: Path | None) -> RunContext:
    eps = {int(r["round"]): float(r["epsilon"][client]) for r in rounds
           if client in r.get("epsilon", {}) and client not in r.get("clients_refused", [])}
    trained = tuple(eps)
    # every round a client trained needs its DP-SGD line, whatever fed.dp says (check_dp FAILs
    # a run configured without DP on its own)
    return RunContext(
        trained_rounds=trained, round_epsilon=eps,
        prior_released=record.prior, dp=True,
        own_copy=read_ledger(own_path) if own_path else None,
        budget=record.budget(client), batch_size=record.batch_size,
        budget_binding=record.budgets_from_config,
    )


# --- files -----------------------------------------------------------------------------------


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """A ledger file's entries as written (the checks judge each); a line that is not a JSON object
    stops with its line number."""
    return ledgers.read_entries(path)


def read_run_record(root: Path) -> RunRecord:
    path = RunDir(root, create=False).config
    if not path.is_file():
        raise DataError(f"{root} has {LEDGERS}/ but no {CONFIG}; audit its ledger files one by one instead")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc})") from None
    privacy, fed, train = doc.get("privacy", {}), doc.get("fed", {}), doc.get("train", {})
    return RunRecord(
        name=str(doc.get("name", root.name)),
        target_epsilon=privacy.get("target_epsilon"), client_budgets=fed.get("client_budgets", {}),
        accountant=str(privacy.get("accountant", "rdp")), secure_rng=bool(privacy.get("secure_rng", False)),
        dp=bool(fed.get("dp", True)), prior=bool(doc.get("prior", {}).get("enabled", False)),
        weighting=str(fed.get("weighting", "users")), batch_size=train.get("batch_size"),
        engine=str(doc.get("provenance", {}).get("engine", "")),
        sample_rate=train.get("sample_rate"),
    )


def check_dp(ledger: Sequence[Mapping[str, Any]], *, run_dp: bool = True) -> Check:
    """FAIL when any round trained without DP (a non-private line, or a run with fed.dp = false)."""
    name = "every release under DP"
    bad = [x.round for x in ledgers.readable_lines(ledger) if x.without_dp]
    if bad or not run_dp:
        why = f"rounds {bad} trained without DP (mechanism non-private, σ = 0)" if bad else \
            "the run was configured with fed.dp = false"
        return Check(name, FAIL, f"{why}: no privacy guarantee holds for this client's users")
    return Check(name, PASS, "every release is a DP mechanism (σ > 0)")


def check_public_rate(ledger: Sequence[Mapping[str, Any]], sample_rate: float | None) -> Check:
    """q of every DP-SGD line is the run's public train.sample_rate: fixed before training, independent
    of the client's private user count (so the add/remove-one-user analysis applies as recorded)."""
    name = "q is the public sample rate"
    sgd = [x for x in ledgers.readable_lines(ledger) if x.is_dp_sgd]
    if sample_rate is None or not sgd:
        return Check(name, INFO,
                     "no train.sample_rate in the run's config, or no DP-SGD release: not checked")
    wrong = [x for x in sgd if float(x.sample_rate) != float(sample_rate)]
    if wrong:
        return Check(name, FAIL, f"round {wrong[0].round}: q={wrong[0].sample_rate} but the run's "
                     f"public train.sample_rate is {sample_rate}")
    return Check(name, PASS, f"q = train.sample_rate = {sample_rate} in every DP-SGD release")


def check_replies(state_dir: Path, ledger: Sequence[Mapping[str, Any]]) -> Check:
    """Each stored reply (the state directory's replies) hashes to the digest of a ledger line of
    its run and round, and each ledger line's reply is there: a release without a ledger line
    (dropped from the ledger, or never accounted) fails, whatever its mechanism."""
    from fedrec.common.lora import tensors_digest
    from safetensors.torch import load_file

    name = "released tensors match the ledger"
    files = StateDir(state_dir).reply_files()
    digest_of = {p: tensors_digest(load_file(str(p))) for p in files}
    digests = {d: p for p, d in digest_of.items()}
    empty = tensors_digest({})
    checked, matched, problems = 0, set(), []
    for x in ledgers.readable_lines(ledger):
        if x.adapter_sha256 is None or x.run_id is None or x.adapter_sha256 == empty or x.is_evaluation:
            continue  # an evaluation releases noisy scalars, no tensors
        path = digests.get(x.adapter_sha256)
        if path is None:
            problems.append(f"{x.where()}: no stored reply hashes to the digest of the tensors it "
                            "released (missing or altered)")
            continue
        if not (path.name.startswith(f"{safe_name(x.run_id)}-") and path.stem.endswith(f"-{x.round}")):
            problems.append(f"round {x.round}: its digest matches {path.name}, a reply of another run "
                            "or round")
        checked += 1
        matched.add(path)
    for path in files:
        if path not in matched and digest_of[path] != empty:  # an evaluation's reply holds no tensors
            problems.append(f"stored reply {path.name} has no ledger line: a release that was never "
                            "accounted, or whose ledger line was removed")
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    if not checked:
        return Check(name, WARN, "no ledger line carries an adapter digest (written before chains)")
    return Check(name, PASS, f"{checked} stored replies hash to the digests in the ledger, none without one")


def check_state(state_dir: Path, ledger: Sequence[Mapping[str, Any]]) -> Check:
    """The client's accountant state (state.json) agrees with its ledger: the same lines, and the
    accountant composed exactly the (σ, q, steps) the ledger lists."""
    name = "accountant state = ledger"
    path = StateDir(state_dir).state
    if not path.is_file():
        return Check(name, WARN, f"{path} is missing: the accountant's state cannot be compared")
    try:  # state.json as client/state.py commits it: the party's accountant state and ledger
        state = read_json(path)
        history = [tuple(float(x) for x in h) for h in state["accountant"]["history"]]
        lines = list(state["ledger"])
    except (ValueError, KeyError, TypeError, DataError) as exc:
        return Check(name, FAIL, f"{path} is unreadable ({exc})")
    recorded = _merged([(float(x.noise_multiplier), float(x.sample_rate), float(x.steps))
                        for x in ledgers.readable_lines(ledger)])
    history = _merged(history)
    problems = []
    if [dict(x) for x in lines] != [dict(e) for e in ledger]:
        first = next((i for i, (a, b) in enumerate(zip(lines, ledger, strict=False)) if a != dict(b)),
                     min(len(lines), len(ledger)))
        problems.append(f"{path.name}'s ledger ({len(lines)} lines) and {StateDir(state_dir).ledger.name} "
                        f"({len(ledger)}) differ from entry {first} on")
    if history != recorded:
        problems.append(f"the accountant composed {len(history)} mechanisms, the ledger lists {len(recorded)}"
                        + ("" if len(history) != len(recorded) else " with different (σ, q, steps)"))
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    return Check(name, PASS, f"{path.name} holds the same {len(ledger)} lines and accountant history")


def _merged(blocks: Sequence[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """Consecutive blocks of one (σ, q) as one, as the accountant stores them (common/privacy/analysis.py)."""
    out: list[tuple[float, ...]] = []
    for sigma, q, steps in blocks:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


# --- assumptions -----------------------------------------------------------------------------


def assumptions(record: RunRecord | None, clients: Sequence[ClientAudit]) -> list[Check]:
    """The premises the ε figures rest on, each stated and, where the record allows, checked."""
    poisson = [c for ca in clients for c in ca.checks if c.name == "Poisson sampling rate"]
    poisson_ok = poisson and all(c.status in (PASS, INFO) for c in poisson)
    out = [
        Check("privacy unit: the user", INFO,
              "ε bounds what anyone learns about one user (all of that user's interactions), not one "
              "interaction; each DP-SGD step clips one gradient per user (client/train.py)"),
        Check("neighbouring relation: add or remove one user", INFO,
              "all four accountants take the add/remove-one-user relation (Poisson-subsampled Gaussian)"),
        Check("Poisson sampling", PASS if poisson_ok else WARN,
              "every DP-SGD release records its Poisson rate q (a public setting; older ledgers: "
              "batch_size/users)" if poisson_ok else "could not confirm q for every release"),
    ]
    out += rng_assumptions(record, clients)
    if record is not None:
        out += [
            Check("accountant that trained", INFO, f"Opacus {record.accountant.upper()}; re-derived above "
                  "with dp-accounting RDP and PLD"),
            Check("users per client", INFO,
                  "not released by clients that record their randomness: q and steps are public "
                  "settings, replies carry weight 1 and noisy evaluation counts; older ledgers carry "
                  "'users' and their replies the exact count"),
        ]
    out += [
        Check("item catalogue text", INFO, "not covered, and needs no cover: public item titles and genres"),
        Check("evaluation metrics", INFO, "covered: clients release HR/NDCG/MRR sums of their own users "
              f"under the Gaussian mechanism ('{ledgers.MECHANISM_EVAL}' lines, in ε above), or none "
              "(evaluation = off)"),
        Check("hyperparameters", WARN,
              "not covered: settings and the prior weight β chosen on validation users"),
    ]
    return out


def rng_assumptions(record: RunRecord | None, clients: Sequence[ClientAudit]) -> list[Check]:
    """Which randomness ran, from the ledgers' `rng` fields; the config's `secure_rng` is only the
    request, so it never makes the report say "cryptographic"."""
    values = sorted({str(x.rng) for ca in clients for x in ca.lines if x.rng is not None})
    unrecorded = sum(x.rng is None for ca in clients for x in ca.lines)
    asked = "" if record is None else f" (the config asked for privacy.secure_rng = {record.secure_rng})"
    if not values:
        return [Check("randomness", WARN, "the ledgers do not record which RNG ran" + asked + "; ledgers "
                      "of this version drew sampling and noise from seeded generators (torch, numpy), "
                      "not a cryptographic source")]
    status = WARN if unrecorded or any("deterministic" in v for v in values) else INFO
    return [Check("randomness", status, f"recorded in the ledgers: rng = {', '.join(values)}" + asked
                  + (f"; {unrecorded} entries record none" if unrecorded else ""))]


# --- provenance ------------------------------------------------------------------------------


def _checksums(target: Target) -> dict[str, str]:
    root = target.path
    if target.kind == "ledger":
        return {str(root): sha256_file(root)}
    run = RunDir(root, create=False)
    files = [run.config, run.rounds, run.final().adapter, StateDir(root).ledger, *run.ledgers().values(),
             *(s.ledger for s in run.client_states().values())]
    return {str(p): sha256_file(p) for p in files if p.is_file()}
