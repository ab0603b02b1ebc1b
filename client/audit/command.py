"""`fedrec audit`: the privacy officer's command. Imports no torch (only --empirical trains).

Reads run directories, client state directories or ledger files, checks every release
(client/audit/checks.py, sources.py), writes the report (render.py) and exits 0 only when
every check passes (1: failing checks, listed one per line; 2: bad input, one line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedrec.client.audit.checks import Trust
from fedrec.client.audit.render import render
from fedrec.client.audit.sources import empty_report, run_audit
from fedrec.common.chain import load_public
from fedrec.common.errors import ConfigError


def add_arguments(audit: argparse.ArgumentParser) -> None:
    audit.add_argument("paths", nargs="*", type=Path, metavar="RUN_DIR_OR_LEDGER",
                       help="run directories, client state directories or ledger .jsonl files")
    audit.add_argument("--format", choices=("md", "html", "json"), default=None,
                       help="report format (default: from --output's suffix, else md)")
    audit.add_argument("--output", type=Path, help="write the report here (default: standard output)")
    audit.add_argument("--empirical", action="store_true",
                       help="also run the one-run canary audit on the simulation config (--config)")
    audit.add_argument("--config", type=Path, help="simulation config for --empirical")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting of --config (repeatable)")
    audit.add_argument("--canaries", type=int, default=None,
                       help="--empirical: number of canary users (default 200)")
    audit.add_argument("--canary-kind", choices=("gradient", "input"), default="gradient",
                       help="--empirical: white-box gradient canaries (default) or black-box input canaries")
    audit.add_argument("--data", help="--empirical: local data set directory")
    audit.add_argument("--model", help="--empirical: local model directory, .gguf file or hub id")
    audit.add_argument("--cache-dir", type=Path)
    audit.add_argument("--offline", action="store_true")
    audit.add_argument("--trust", action="append", default=[], metavar="CLIENT=KEY.pub",
                       help="the institution's ledger public key (from `fedrec deploy keygen`), obtained "
                            "from it directly; its ledger's signatures must verify against it (repeatable)")
    audit.add_argument("--expect-head", action="append", default=[], metavar="CLIENT=HEX",
                       help="a chain head (entry_sha256) the institution reported; its ledger must reach "
                            "it (repeatable)")
    audit.add_argument("--allow-legacy", action="store_true",
                       help="accept unchained or unsigned ledgers and truncated heads as warnings "
                            "(ledgers written by older versions); otherwise they fail")


def run(args: argparse.Namespace) -> int:
    if not args.paths and not args.empirical:
        raise ConfigError("fedrec audit: name a run directory or ledger file, "
                          "or pass --empirical --config FILE")
    fmt = args.format or _format_of(args.output)
    trust = Trust(keys={c: load_public(Path(v)) for c, v in _pairs(args.trust, "--trust")},
                  heads={c: _hex64(h) for c, h in _pairs(args.expect_head, "--expect-head")},
                  allow_legacy=args.allow_legacy)
    report = run_audit(args.paths, trust=trust) if args.paths else empty_report()
    if args.empirical:  # trains (torch): imported only when asked for
        from fedrec.cli import config_from_args, sources_from_args
        from fedrec.client.audit.canaries import empirical_audit

        empirical_audit(report, config_from_args(args), sources_from_args(args), canaries=args.canaries,
                        kind=args.canary_kind)
    text = render(report, fmt)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        sys.stdout.write(f"report: {args.output}\n")
    else:
        sys.stdout.write(text)
    failures = report.failures()
    if failures:
        sys.stderr.write(f"fedrec: audit FAILED ({len(failures)} failing checks):\n")
        sys.stderr.write("".join(f"  - {f}\n" for f in failures))
        return 1
    sys.stderr.write("fedrec: audit passed\n")
    return 0


def _pairs(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for text in values:
        client, sep, value = text.partition("=")
        if not sep or not client.strip() or not value.strip():
            raise ConfigError(f"{flag} {text!r}: expected CLIENT=VALUE, e.g. {flag} hospital-a=...")
        out.append((client.strip(), value.strip()))
    return out


def _hex64(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise ConfigError(f"--expect-head {text!r}: expected a chain head, 64 hex digits (an entry_sha256)")
    return text.lower()


def _format_of(output: Path | None) -> str:
    suffix = output.suffix.lower().lstrip(".") if output else ""
    return {"htm": "html", "html": "html", "json": "json"}.get(suffix, "md")
