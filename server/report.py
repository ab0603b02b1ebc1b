"""report.md and report.html of a federated run: validation NDCG per round, ε per client per round."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedrec.common import wire
from fedrec.common.config import Config
from fedrec.common.ledger import LedgerLine, read_entries, readable_lines
from fedrec.common.rundir import RunDir, atomic_write_text, read_json, read_jsonl

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def write_reports(root: Path, cfg: Config) -> None:
    run = RunDir(root, create=False)
    rounds = read_jsonl(run.rounds)
    ledgers = {name: readable_lines(read_entries(path)) for name, path in run.ledgers().items()}
    final = read_json(run.final().metrics)
    key = wire.metric_key(wire.NDCG, cfg.eval.ks[0])
    ndcg = [(r["round"], max(r["valid"]["metrics"][key])) for r in rounds if r["valid"]["metrics"].get(key)]
    eps = {c: [(x.round, x.epsilon) for x in lines] for c, lines in ledgers.items()}
    md = _markdown(cfg, rounds, ledgers, final, key)
    atomic_write_text(run.report_md, md)
    plots = (line_plot({"global model": ndcg}, f"validation {key} (best blend weight)", "round")
             + line_plot(eps, "ε spent per client (user-level, δ in the ledgers)", "round"))
    body = "<pre>" + html.escape(md) + "</pre>"
    atomic_write_text(run.report_html,
        f"<!doctype html><meta charset='utf-8'><title>fedrec {html.escape(cfg.name)}</title>"
        f"<body style='font-family:sans-serif;max-width:60em'>{plots}{body}</body>\n")


def _markdown(cfg: Config, rounds: Sequence[Mapping], ledgers: Mapping[str, Sequence[LedgerLine]],
              final: Mapping, key: str) -> str:
    lines = [f"# fedrec simulation: {cfg.name}", "",
             f"{len(ledgers) or '?'} clients, {cfg.fed.rounds} rounds, strategy {cfg.fed.strategy}, "
             f"LoRA variant {cfg.lora.variant}, DP {'on' if cfg.fed.dp else 'off'} (user-level).", "",
             "## Test (final adapter)", ""]
    test = final.get("test", {})
    lines.append(f"| metric | blend: CF + {final.get('blend_weight')}·LLM | CF alone | LLM alone |")
    lines.append("|---|---|---|---|")
    for k, v in test.items():
        cf, alone = (final.get(part, {}).get(k) for part in ("test_cf_only", "test_llm_only"))
        lines.append(f"| {k} | {v:.4f} | {'—' if cf is None else f'{cf:.4f}'} | "
                     f"{'—' if alone is None else f'{alone:.4f}'} |")
    lines += ["", "The blend is what `fedrec serve` ranks with; CF alone is the private collaborative "
              "prior (popularity + co-occurrence); the LLM alone is the adapted item encoder."]
    lines += ["", "## Rounds", "",
              f"| round | clients ok | refused | failed | loss | valid {key} | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in rounds:
        values = r["valid"]["metrics"].get(key)
        best = f"{max(values):.4f}" if values else "—"
        lines.append(f"| {r['round']} | {r['clients_ok']} | {', '.join(r['clients_refused']) or '—'} | "
                     f"{len(r['clients_failed'])} | {r['loss']:.4f} | {best} | {r['seconds']:.1f} |")
    lines += ["", "## Privacy ledgers (ε after each release)", "",
              "| client | round | mechanism | σ | q | steps | δ | ε |", "|---|---|---|---|---|---|---|---|"]
    for client, entries in ledgers.items():
        for e in entries:
            lines.append(f"| {client} | {e.round} | {e.mechanism} | {e.noise_multiplier:.3f} | "
                         f"{e.sample_rate:.4f} | {e.steps} | {e.delta:.1e} | {e.epsilon:.3f} |")
    return "\n".join(lines) + "\n"


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str) -> str:
    """A small line plot as inline SVG (no plotting dependency)."""
    w, h, pad = 560, 260, 45
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = 0.0, max(p[1] for p in points) or 1.0
    sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)  # noqa: E731
    parts = [f"<h3>{html.escape(title)}</h3><svg width='{w}' height='{h}' style='border:1px solid #ccc'>",
             f"<text x='{w / 2}' y='{h - 8}' font-size='12'>{xlabel}</text>",
             f"<text x='5' y='{pad - 10}' font-size='11'>{y1:.3g}</text>",
             f"<text x='5' y='{h - pad}' font-size='11'>0</text>"]
    parts += [f"<text x='{sx(x) - 4:.1f}' y='{h - pad + 14}' font-size='10'>{x:g}</text>"
              for x in sorted({p[0] for p in points})]
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{path}'/>")
        parts += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{color}'/>" for x, y in pts]
        parts.append(f"<text x='{w - pad - 120}' y='{20 + 14 * i}' font-size='11' fill='{color}'>"
                     f"{html.escape(name)}</text>")
    return "".join(parts) + "</svg>"
