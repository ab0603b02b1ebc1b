"""The audit report a privacy officer reads and signs: JSON, Markdown, and HTML with inline SVG plots."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from fedrec.client.audit.checks import Check, ClientAudit
from fedrec.client.audit.sources import AuditReport, Target
from fedrec.common.privacy import accountants

FORMATS = ("md", "html", "json")
SERIES_COLORS = {accountants.OPACUS_RDP: "#1f77b4", accountants.OPACUS_PRV: "#2ca02c",
                 accountants.DPACC_RDP: "#ff7f0e", accountants.DPACC_PLD: "#9467bd"}
MARK = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "info": "info"}


def render(report: AuditReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(to_json(report), indent=2, sort_keys=True, default=_json_default) + "\n"
    if fmt == "md":
        return to_markdown(report)
    return to_html(report)


def _json_default(obj: Any) -> Any:
    return str(obj)


# --- JSON ------------------------------------------------------------------------------------


def to_json(report: AuditReport) -> dict[str, Any]:
    return {
        "passed": report.passed, "failures": report.failures(), "created": report.created,
        "tolerance": asdict(report.tolerance), "versions": report.versions, "checksums": report.checksums,
        "targets": [_target_json(t) for t in report.targets],
        "empirical": [r.to_json() for r in report.empirical],
        "empirical_checks": [asdict(c) for c in report.empirical_checks],
    }


def _target_json(t: Target) -> dict[str, Any]:
    return {"path": str(t.path), "kind": t.kind, "checks": [asdict(c) for c in t.checks],
            "assumptions": [asdict(c) for c in t.assumptions],
            "clients": [_client_json(c) for c in t.clients]}


def _client_json(ca: ClientAudit) -> dict[str, Any]:
    return {
        "client": ca.client, "source": ca.source, "passed": ca.passed, "budget": ca.budget,
        "spent": ca.spent, "remaining": ca.remaining, "users": ca.users, "delta": ca.delta,
        "chain_head": ca.chain_head, "final_epsilon": ca.final(), "agreement": ca.agreement(),
        "rounds": [x.round for x in ca.lines], "running_epsilon": ca.rederived,
        "reported_epsilon": [x.epsilon for x in ca.lines],
        "checks": [asdict(c) for c in ca.checks],
    }


# --- Markdown --------------------------------------------------------------------------------


def to_markdown(report: AuditReport) -> str:
    out = [f"# Privacy audit: {'PASSED' if report.passed else 'FAILED'}", "",
           f"Created {report.created}. Tolerance: a reported ε is flagged when below the independent "
           f"re-derivation by more than {report.tolerance.rel:.0%} + {report.tolerance.abs}.", ""]
    failures = report.failures()
    if failures:
        out += ["## Failing checks", ""] + [f"- {f}" for f in failures] + [""]
    if report.targets:
        out += ["## Clients", "", _md_table(SUMMARY_HEADER, summary_rows(report)), ""]
    for t in report.targets:
        out += [f"## {t.kind}: `{t.path}`", ""]
        rows = [["(run)", c.name, MARK[c.status], c.detail] for c in t.checks]
        rows += [[ca.client, c.name, MARK[c.status], c.detail] for ca in t.clients for c in ca.checks]
        out += [_md_table(["client", "check", "status", "detail"], rows), ""]
        if t.assumptions:
            out += ["### Assumptions and what the guarantee does not cover", "",
                    _md_table(["assumption", "status", "detail"],
                              [[c.name, MARK[c.status], c.detail] for c in t.assumptions]), ""]
    if report.empirical:
        out += ["## Empirical audit (one-run canaries, Steinke, Nasr & Jagielski 2023)", "",
                _md_table(EMPIRICAL_HEADER, [r.row() for r in report.empirical]), ""]
        out += [r.note for r in report.empirical[:1]] + [""]
        out += [f"- {MARK[c.status]} {c.name}: {c.detail}" for c in report.empirical_checks] + [""]
    versions = _md_table(["package", "version"], sorted(report.versions.items()))
    out += ["## Versions and checksums", "", versions,
            "", _md_table(["file", "sha256"], [[f"`{k}`", f"`{v}`"] for k, v in report.checksums.items()]),
            "", SIGN_OFF]
    return "\n".join(out) + "\n"


SUMMARY_HEADER = ["client", "budget ε", "spent ε (reported)", "remaining", "dp-acc RDP", "dp-acc PLD",
                  "Opacus RDP", "Opacus PRV", "agreement", "δ", "users", "verdict"]
EMPIRICAL_HEADER = ["run", "claimed ε", "ε lower bound (95 %)", "canaries", "guesses", "correct",
                    "seconds", "verdict"]
SIGN_OFF = ("## Sign-off\n\nI have reviewed the checks, assumptions and results above.\n\n"
            "Name: ______________________  Role: ______________________\n\n"
            "Date: ______________________  Signature: _________________\n")


def summary_rows(report: AuditReport) -> list[list[str]]:
    rows = []
    for t in report.targets:
        for ca in t.clients:
            f = ca.final()
            rows.append([
                ca.client, _num(ca.budget), f"{ca.spent:.3f}", _num(ca.remaining),
                *(_num(f.get(a)) for a in (accountants.DPACC_RDP, accountants.DPACC_PLD,
                                            accountants.OPACUS_RDP, accountants.OPACUS_PRV)),
                f"{ca.agreement():.2%}", "—" if ca.delta is None else f"{ca.delta:.1e}",
                "—" if ca.users is None else str(ca.users), "PASS" if ca.passed else "FAIL",
            ])
    return rows


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return "∞" if math.isinf(x) else f"{x:.3f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


# --- HTML ------------------------------------------------------------------------------------


CSS = ("body{font-family:sans-serif;max-width:72em;margin:1em auto;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 6px;"
       "font-size:13px;vertical-align:top}td:first-child{white-space:nowrap}th{background:#eee}.pass{color:#060;font-weight:bold}"
       ".fail{color:#b00;font-weight:bold}.warn{color:#a60;font-weight:bold}.info{color:#555}"
       ".plots{display:flex;flex-wrap:wrap;gap:12px}h1.pass{color:#060}h1.fail{color:#b00}")


def to_html(report: AuditReport) -> str:
    verdict = "pass" if report.passed else "fail"
    parts = [f"<!doctype html><meta charset='utf-8'><title>fedrec privacy audit</title><style>{CSS}</style>",
             f"<h1 class='{verdict}'>Privacy audit: {'PASSED' if report.passed else 'FAILED'}</h1>",
             f"<p>Created {_e(report.created)}. A reported ε is flagged when it is below the independent "
             f"re-derivation (dp-accounting RDP/PLD) by more than {report.tolerance.rel:.0%} + "
             f"{report.tolerance.abs}.</p>"]
    failures = report.failures()
    if failures:
        items = "".join(f"<li class='fail'>{_e(f)}</li>" for f in failures)
        parts.append("<h2>Failing checks</h2><ul>" + items
                     + "</ul>")
    if report.targets:
        parts += ["<h2>Clients</h2>", _html_table(SUMMARY_HEADER, summary_rows(report)),
                  "<h2>ε after each release, per accountant, with the budget</h2><div class='plots'>"]
        parts += [epsilon_plot(ca) for t in report.targets for ca in t.clients if ca.rederived]
        parts.append("</div>")
    for t in report.targets:
        parts.append(f"<h2>{_e(t.kind)}: <code>{_e(str(t.path))}</code></h2>")
        rows = [["(run)", c.name, c, c.detail] for c in t.checks]
        rows += [[ca.client, c.name, c, c.detail] for ca in t.clients for c in ca.checks]
        parts.append(_html_table(["client", "check", "status", "detail"], rows))
        if t.assumptions:
            parts.append("<h3>Assumptions and what the guarantee does not cover</h3>")
            parts.append(_html_table(["assumption", "status", "detail"],
                                     [[c.name, c, c.detail] for c in t.assumptions]))
    if report.empirical:
        parts += ["<h2>Empirical audit (one-run canaries, Steinke, Nasr &amp; Jagielski 2023)</h2>",
                  _html_table(EMPIRICAL_HEADER, [r.row() for r in report.empirical]),
                  f"<p>{_e(report.empirical[0].note)}</p>", "<div class='plots'>"]
        parts += [r.plot() for r in report.empirical] + ["</div>"]
        parts.append(_html_table(["check", "status", "detail"],
                                 [[c.name, c, c.detail] for c in report.empirical_checks]))
    sums = [[k, f"<code>{v}</code>"] for k, v in report.checksums.items()]
    parts += ["<h2>Versions and checksums</h2>",
              _html_table(["package", "version"], sorted(report.versions.items())),
              _html_table(["file", "sha256"], sums),
              "<h2>Sign-off</h2><p>I have reviewed the checks, assumptions and results above.</p>"
              "<p>Name: ____________________ Role: ____________________</p>"
              "<p>Date: ____________________ Signature: ____________________</p>"]
    return "\n".join(parts) + "\n"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, Check):
        return f"<td class='{value.status}'>{MARK[value.status]}</td>"
    text = str(value)
    if text.startswith("<code>"):
        return f"<td>{text}</td>"
    cls = {"PASS": "pass", "FAIL": "fail"}.get(text, "")
    return f"<td class='{cls}'>{_e(text)}</td>" if cls else f"<td>{_e(text)}</td>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# --- plots -----------------------------------------------------------------------------------


def epsilon_plot(ca: ClientAudit) -> str:
    """ε after each release under each accountant (and as reported), with the budget line."""
    labels = ["prior" if x.is_popularity else f"r{x.round}" for x in ca.lines]
    series = {name: list(values) for name, values in ca.rederived.items()}
    series["reported"] = [float(x.epsilon) for x in ca.lines]
    colors = {**SERIES_COLORS, "reported": "#000000"}
    return line_plot(series, labels, colors=colors, hline=ca.budget, hline_label="budget",
                     title=f"{ca.client}: ε per release (δ={ca.delta:.1e})" if ca.delta else ca.client)


def line_plot(series: Mapping[str, Sequence[float]], labels: Sequence[str], *, colors: Mapping[str, str],
              title: str, hline: float | None = None, hline_label: str = "", ylabel: str = "ε") -> str:
    """A line plot as inline SVG with axes, ticks, legend and an optional dashed horizontal line."""
    w, h, left, right, top, bottom = 440, 280, 50, 130, 30, 35
    finite = [v for s in series.values() for v in s if math.isfinite(v)]
    ymax = max([*finite, hline or 0.0, 1e-9]) * 1.08
    n = max(len(labels), 1)
    sx = lambda i: left + (i / max(n - 1, 1)) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (min(y, ymax) / ymax) * (h - top - bottom)  # noqa: E731
    p = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' style='border:1px solid #ccc;"
         f"background:#fff'><text x='{left}' y='18' font-size='13' font-weight='bold'>{_e(title)}</text>",
         f"<line x1='{left}' y1='{h - bottom}' x2='{w - right}' y2='{h - bottom}' stroke='#444'/>",
         f"<line x1='{left}' y1='{top}' x2='{left}' y2='{h - bottom}' stroke='#444'/>",
         f"<text x='8' y='{top + 4}' font-size='11'>{_e(ylabel)}</text>"]
    for k in range(5):
        y = ymax * k / 4
        p.append(f"<line x1='{left - 4}' y1='{sy(y):.1f}' x2='{w - right}' y2='{sy(y):.1f}' stroke='#eee'/>"
                 f"<text x='{left - 6}' y='{sy(y) + 4:.1f}' font-size='10' text-anchor='end'>{y:.2g}</text>")
    for i, lab in enumerate(labels):
        p.append(f"<text x='{sx(i):.1f}' y='{h - bottom + 14}' font-size='10' text-anchor='middle'>"
                 f"{_e(lab)}</text>")
    if hline is not None:
        p.append(f"<line x1='{left}' y1='{sy(hline):.1f}' x2='{w - right}' y2='{sy(hline):.1f}' "
                 "stroke='#d62728' "
                 f"stroke-dasharray='6,4' stroke-width='1.5'/>")
    legend = [(hline_label or "limit", "#d62728", True)] if hline is not None else []
    for name, values in series.items():
        color = colors.get(name, "#7f7f7f")
        pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(values) if math.isfinite(v))
        dash = " stroke-dasharray='2,3'" if name == "reported" else ""
        p.append(f"<polyline fill='none' stroke='{color}' stroke-width='2'{dash} points='{pts}'/>")
        p += [f"<circle cx='{sx(i):.1f}' cy='{sy(v):.1f}' r='2.5' fill='{color}'/>"
              for i, v in enumerate(values) if math.isfinite(v)]
        legend.append((name, color, False))
    for j, (name, color, dashed) in enumerate(legend):
        y = top + 14 * j
        style = " stroke-dasharray='6,4'" if dashed else ""
        p.append(f"<line x1='{w - right + 8}' y1='{y}' x2='{w - right + 24}' y2='{y}' stroke='{color}' "
                 f"stroke-width='2'{style}/>"
                 f"<text x='{w - right + 28}' y='{y + 4}' font-size='10'>{_e(name)}</text>")
    return "".join(p) + "</svg>"


def score_plot(result: Any) -> str:
    """Membership scores of the canaries, included (top row) and left out (bottom row): a strip plot
    in which the audit's power shows as the included ones sitting further right."""
    w, h, left, right = 440, 165, 70, 20
    scores = np.asarray(result.scores, dtype=np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    span = (hi - lo) or 1.0
    sx = lambda s: left + (s - lo) / span * (w - left - right)  # noqa: E731
    rng = np.random.default_rng(0)  # jitter only, for legibility
    p = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' style='border:1px solid #ccc;"
         f"background:#fff'><text x='8' y='16' font-size='13' font-weight='bold'>{_e(result.label)}: "
         f"canary scores</text>",
         "<text x='8' y='55' font-size='11'>included</text>"
         "<text x='8' y='100' font-size='11'>left out</text>",
         f"<line x1='{left}' y1='{h - 40}' x2='{w - right}' y2='{h - 40}' stroke='#444'/>",
         f"<text x='{left}' y='{h - 27}' font-size='10'>{lo:.2g}</text>",
         f"<text x='{w - right}' y='{h - 27}' font-size='10' text-anchor='end'>{hi:.2g}</text>",
         f"<text x='{w / 2}' y='{h - 8}' font-size='10' text-anchor='middle'>membership score "
         f"({'movement along the canary gradient' if result.kind == 'gradient' else 'log p(target)'})</text>"]
    for s, inc in zip(scores, result.included, strict=True):
        y = (50 if inc else 95) + rng.uniform(-8, 8)
        color = "#d62728" if inc else "#1f77b4"
        p.append(f"<circle cx='{sx(s):.1f}' cy='{y:.1f}' r='2.2' fill='{color}' fill-opacity='0.6'/>")
    return "".join(p) + "</svg>"
