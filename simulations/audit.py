"""`fedrec audit`: load run directories or ledger files, run every check, assemble the report.

Inputs are read-only: a run directory (config.toml, rounds.jsonl, ledgers/, clients/), a
client's state directory (ledger.jsonl, replies/) or a bare ledger file (.jsonl). The checks
live in common/audit.py; the report is written by simulations/audit_report.py.
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common import audit
from fedrec.common.assets import sha256_file
from fedrec.common.audit import FAIL, INFO, PASS, WARN, Check, ClientAudit, RunContext, Tolerance
from fedrec.common.errors import DataError
from fedrec.common.rundir import package_versions

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
    sample_rate: float | None = None  # fed.sample_rate: the public q every DP-SGD line must carry

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
    empirical: list[Any] = field(default_factory=list)  # simulations/empirical_audit.py results
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


def run_audit(paths: Sequence[Path], *, tol: Tolerance | None = None) -> AuditReport:
    """Audit every path (run dir, client state dir or ledger file)."""
    if not paths:
        raise DataError("fedrec audit: name at least one run directory or ledger file (or use --empirical)")
    tol = tol or Tolerance()
    targets = [_audit_path(Path(p), tol) for p in paths]
    checksums: dict[str, str] = {}
    for t in targets:
        checksums |= _checksums(t)
    return AuditReport(_now(), targets, tol, package_versions(VERSIONED), checksums)


def empty_report(tol: Tolerance | None = None) -> AuditReport:
    return AuditReport(_now(), [], tol or Tolerance(), package_versions(VERSIONED), {})


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _audit_path(path: Path, tol: Tolerance) -> Target:
    if path.is_dir() and (path / "ledgers").is_dir():
        return _audit_run(path, tol)
    if path.is_dir() and (path / "ledger.jsonl").is_file():
        return _audit_client_state(path, tol)
    if path.is_file():
        target = Target(path, "ledger")
        entries = read_ledger(path)
        ca = audit.audit_ledger(_client_name(path), entries, source=str(path), tol=tol, mid_chain=True)
        ca.checks += [check_dp(entries), check_rng(entries)]
        target.clients.append(ca)
        return target
    raise DataError(f"{path} is neither a run directory (with ledgers/), a client state directory (with "
                    "ledger.jsonl) nor a ledger file; pass one of those")


def _client_name(path: Path) -> str:
    return path.parent.name if path.name == "ledger.jsonl" else path.stem


def _audit_client_state(path: Path, tol: Tolerance) -> Target:
    target = Target(path, "client-state")
    ledger = read_ledger(path / "ledger.jsonl")
    ca = audit.audit_ledger(path.name, ledger, source=str(path / "ledger.jsonl"), tol=tol)
    ca.checks += [check_replies(path, ledger), check_dp(ledger), check_rng(ledger)]
    target.clients.append(ca)
    return target


def _audit_run(root: Path, tol: Tolerance) -> Target:
    record = read_run_record(root)
    rounds = read_jsonl_checked(root / "rounds.jsonl")
    target = Target(root, "run", record)
    ledgers = {p.stem: p for p in sorted((root / "ledgers").glob("*.jsonl"))}
    own = {p.parent.name: p for p in sorted((root / "clients").glob("*/ledger.jsonl"))}
    # a client that refused everything (ε = 0 in every round) released nothing and needs no ledger
    reported = sorted({c for r in rounds for c, e in r.get("epsilon", {}).items() if float(e) > 0})
    for client in sorted(set(ledgers) | set(own) | set(reported)):
        if client not in ledgers:
            target.checks.append(Check(f"ledger of {client}", FAIL,
                                       f"{client} released (rounds.jsonl or its own state) but "
                                       f"ledgers/{client}.jsonl is missing"))
            continue
        ctx = _context(client, rounds, record, own.get(client))
        # the server's copy holds this run only: a client that took part in earlier runs starts mid-chain
        entries = read_ledger(ledgers[client])
        ca = audit.audit_ledger(client, entries, source=str(ledgers[client]),
                                context=ctx, tol=tol, mid_chain=True)
        ca.checks += [check_dp(entries, run_dp=record.dp), check_rng(entries),
                      check_public_rate(entries, record.sample_rate)]
        if client in own and ctx.own_copy is not None:
            ca.checks.append(check_replies(own[client].parent, ctx.own_copy))
        target.clients.append(ca)
    target.checks.append(Check("run record", PASS if rounds else WARN,
                               f"{len(rounds)} rounds in rounds.jsonl, {len(ledgers)} client ledgers"))
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
    )


# --- files -----------------------------------------------------------------------------------


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """A ledger file's entries; a line that is not a JSON object stops with its line number."""
    return read_jsonl_checked(path)


def read_jsonl_checked(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not a JSON line ({exc.msg}); the file is damaged — restore it "
                            "from the client's own copy or a backup") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line")
        out.append(obj)
    return out


def read_run_record(root: Path) -> RunRecord:
    path = root / "config.toml"
    if not path.is_file():
        raise DataError(f"{root} has ledgers/ but no config.toml; audit its ledger files one by one instead")
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
        sample_rate=fed.get("sample_rate"),
    )


NON_PRIVATE, EVALUATION = "non-private", "dp-eval"


def check_dp(ledger: Sequence[Mapping[str, Any]], *, run_dp: bool = True) -> Check:
    """FAIL when any round trained without DP (a non-private line, or a run with fed.dp = false)."""
    name = "every release under DP"
    bad = [int(e.get("round", -1)) for e in ledger
           if e.get("mechanism") == NON_PRIVATE or e.get("dp") is False]
    if bad or not run_dp:
        why = f"rounds {bad} trained without DP (mechanism non-private, σ = 0)" if bad else \
            "the run was configured with fed.dp = false"
        return Check(name, FAIL, f"{why}: no privacy guarantee holds for this client's users")
    return Check(name, PASS, "every release is a DP mechanism (σ > 0)")


def check_public_rate(ledger: Sequence[Mapping[str, Any]], sample_rate: float | None) -> Check:
    """q of every DP-SGD line is the run's public fed.sample_rate: fixed before training, independent
    of the client's private user count (so the add/remove-one-user analysis applies as recorded)."""
    name = "q is the public sample rate"
    sgd = [e for e in ledger if e.get("mechanism") == "dp-sgd"]
    if sample_rate is None or not sgd:
        return Check(name, INFO, "no fed.sample_rate in the run's config, or no DP-SGD release: not checked")
    wrong = [e for e in sgd if float(e["sample_rate"]) != float(sample_rate)]
    if wrong:
        return Check(name, FAIL, f"round {wrong[0].get('round')}: q={wrong[0]['sample_rate']} but the run's "
                     f"public fed.sample_rate is {sample_rate}")
    return Check(name, PASS, f"q = fed.sample_rate = {sample_rate} in every DP-SGD release")


def check_rng(ledger: Sequence[Mapping[str, Any]]) -> Check:
    """Which randomness the masks and noise came from, as each ledger line records it."""
    name = "secret randomness"
    labels = {str(e["rng"]) for e in ledger if "rng" in e}
    seeded = [int(e.get("round", -1)) for e in ledger if e.get("rng") not in (None, "os-entropy")]
    if seeded:
        return Check(name, FAIL, f"rounds {seeded} used seeded randomness ({', '.join(sorted(labels))}): "
                     "whoever knows the seed can regenerate and subtract the noise")
    if len(labels) < 1 or any("rng" not in e for e in ledger):
        return Check(name, WARN, "some lines do not record their randomness (written before fedrec "
                     "recorded it): seeded from train.seed, the client name and the round")
    return Check(name, PASS, "every release drew its sampling masks and noise from fresh OS entropy "
                 "(os.urandom, the kernel's CSPRNG)")


def check_replies(state_dir: Path, ledger: Sequence[Mapping[str, Any]]) -> Check:
    """The adapter (or counts) digest in each ledger line matches the reply the client stored."""
    from fedrec.common.lora import tensors_digest
    from safetensors.torch import load_file

    name = "released tensors match the ledger"
    checked, problems = 0, []
    for e in ledger:
        if "adapter_sha256" not in e or "run_id" not in e or e.get("mechanism") == EVALUATION:
            continue  # an evaluation releases noisy scalars, no tensors
        kind = "prior" if e.get("mechanism") == "prior-counts" else "train"
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(e["run_id"]))
        path = state_dir / "replies" / f"{safe}-{kind}-{e['round']}.safetensors"
        if not path.is_file():
            problems.append(f"round {e['round']}: stored reply {path.name} is missing")
            continue
        checked += 1
        if tensors_digest(load_file(str(path))) != e["adapter_sha256"]:
            problems.append(f"round {e['round']}: {path.name} does not match its adapter_sha256")
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    if not checked:
        return Check(name, WARN, "no ledger line carries an adapter digest (written before chains)")
    return Check(name, PASS, f"{checked} stored replies hash to the digests in the ledger")


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
    if record is not None:
        out += [
            Check("randomness", INFO,
                  "which source drew each release's masks and noise is checked per client from its "
                  "ledger ('secret randomness'); privacy.secure_rng = "
                  + ("true: DP-SGD noise uses Opacus' secure_mode construction (four Gaussians summed) "
                     "against floating-point attacks" if record.secure_rng else
                     "false: single Box-Muller Gaussians, not hardened against floating-point attacks")),
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
              "under the Gaussian mechanism ('dp-eval' lines, in ε above), or none (evaluation = off)"),
        Check("hyperparameters", WARN,
              "not covered: settings and the prior weight β chosen on validation users"),
    ]
    return out


# --- provenance ------------------------------------------------------------------------------


def _checksums(target: Target) -> dict[str, str]:
    root = target.path
    if target.kind == "ledger":
        return {str(root): sha256_file(root)}
    names = ["config.toml", "rounds.jsonl", "final/adapter.safetensors", "ledger.jsonl"]
    files = [root / n for n in names] + sorted((root / "ledgers").glob("*.jsonl")) \
        + sorted((root / "clients").glob("*/ledger.jsonl"))
    return {str(p): sha256_file(p) for p in files if p.is_file()}
