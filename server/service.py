"""The recommendation service without HTTP: a run directory loaded once; requests resolved, scored, ranked.

Ranking is the evaluation's (common/evaluation.py): the user tower encodes the titles of the
most recent `data.max_history` items (and the user's own words, if given), score = cosine / τ
+ β·log(1 + noisy count) with the β chosen on validation, items of the history excluded.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.common.assets import resolve_dataset, sha256_file
from fedrec.common.config import Config, from_dict
from fedrec.common.data import Dataset, load_dataset
from fedrec.common.errors import ConfigError, DataError, RequestError
from fedrec.common.evaluation import prior_scores
from fedrec.common.lora import adapter_state, load_adapter, read_adapter, tensors_digest
from fedrec.common.model import Loaded, Recommender, build_recommender, item_vectors_cached
from fedrec.common.rundir import PRIOR_COUNTS, load_prior_counts, read_jsonl
from safetensors import safe_open

log = logging.getLogger(__name__)

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")  # "Star Wars (1977)" is also found as "Star Wars"
# MovieLens writes "Godfather, The (1972)"; it is also found as "The Godfather (1972)"
_ARTICLE = re.compile(
    r"^(?P<rest>.+), (?P<article>The|A|An|La|Le|Les|Il|Das|Der|Die|El)(?P<year>\s*\(\d{4}\))?$", re.IGNORECASE
)


@dataclass(frozen=True)
class ServeSettings:
    """What to serve and the limits on a request; parsed once at the CLI boundary."""

    method: str | None = None  # central runs: the method whose adapter is served
    data: str | None = None  # catalogue to rank (a data set directory); None: the run's data set
    device: str | None = None  # None: the run's model.device
    # Fold LoRA into the base weights for inference. Off by default: on the 2-core CPU it was not
    # faster (benchmarks/README.md), and unmerged the user tower is evaluation's very computation.
    merge: bool = False
    # Prompts per forward pass; a micro-batch is sorted by length and cut into passes of this
    # size. None: 8 on CPU (1.39x the requests/s of one prompt per pass at 32 clients in the
    # committed benchmark run, though slower when the CPU was oversubscribed; benchmarks/README.md)
    # and 32 on a GPU (not measured: no GPU was available).
    encode_batch: int | None = None
    max_history: int = 200  # history entries accepted per request (the model reads the most recent)
    max_k: int = 100
    max_text_chars: int = 2000

    def __post_init__(self) -> None:
        for key in ("max_history", "max_k", "max_text_chars", "encode_batch"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"serve {key}={getattr(self, key)} must be > 0")
        if self.device not in (None, "auto", "cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r} is not allowed; choose auto, cpu or cuda")


@dataclass(frozen=True)
class RunArtifacts:
    """The files of a run directory that serving reads."""

    root: Path
    config: Config
    provenance: dict[str, Any]
    method: str | None  # None: a federated run
    adapter: Path
    counts: Path | None
    metrics: dict[str, Any]
    ledgers: tuple[Path, ...]


@dataclass(frozen=True)
class Query:
    """A validated request: catalogue rows of the history (chronological), optional text."""

    history: tuple[int, ...]
    text: str | None
    k: int
    exclude_seen: bool = True


@dataclass(frozen=True)
class Scored:
    item_id: str
    title: str
    score: float


# --- the run directory -----------------------------------------------------------------------


def locate_run(root: Path, method: str | None = None) -> RunArtifacts:
    """Find the adapter, prior counts, metrics and ledgers of a federated or central run."""
    if not (root / "config.toml").is_file():
        raise ConfigError(f"{root} is not a run directory (no config.toml); pass the --output of "
                          "`fedrec simulate` or `fedrec train-central`")
    config, provenance = _read_config(root / "config.toml")
    if method is None and not (root / "final" / "adapter.safetensors").is_file():
        central = sorted(p.parent.parent.name for p in root.glob("*/final/adapter.safetensors"))
        if not central:
            raise ConfigError(f"{root} holds no final adapter (final/adapter.safetensors); "
                              "has its training finished?")
        raise ConfigError(f"{root} is a central run with several adapters; pass --method, one of: "
                          f"{', '.join(central)}")
    final = root / "final" if method is None else root / method / "final"
    if not (final / "adapter.safetensors").is_file():
        raise ConfigError(f"--method {method}: {final / 'adapter.safetensors'} does not exist")
    metrics_path = final / "metrics.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    counts = final / PRIOR_COUNTS
    ledgers = sorted((root / "ledgers").glob("*.jsonl")) if method is None \
        else [p for p in [root / "ledgers" / f"{method}.jsonl"] if p.is_file()]
    return RunArtifacts(root, config, provenance, method, final / "adapter.safetensors",
                        counts if counts.is_file() else None, metrics, tuple(ledgers))


def _read_config(path: Path) -> tuple[Config, dict[str, Any]]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    provenance = raw.pop("provenance", {})
    return from_dict(Config, raw), provenance


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def epsilon_summary(ledgers: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Per party (client or central method): ε spent so far (the last ledger line), δ, releases."""
    out: dict[str, dict[str, Any]] = {}
    for path in ledgers:
        lines = read_jsonl(path)
        if not lines:
            continue
        last = lines[-1]
        out[path.stem] = {
            "epsilon": last.get("epsilon"), "delta": last.get("delta"), "releases": len(lines),
            "mechanisms": sorted({str(x.get("mechanism")) for x in lines}),
            "accountant": last.get("accountant"),
        }
    return out


# --- the service -----------------------------------------------------------------------------


class RecommenderService:
    """A loaded recommender over a catalogue: resolves requests and returns the top K."""

    def __init__(
        self, *, rec: Recommender, dataset: Dataset, item_vectors: torch.Tensor, prior: np.ndarray | None,
        max_history: int, settings: ServeSettings, info: dict[str, Any],
    ) -> None:
        self.rec = rec
        self.dataset = dataset
        self.items = item_vectors.to(rec.device)  # (I, H)
        self.prior = None if prior is None else torch.from_numpy(prior).to(rec.device)  # (I,) float64
        self.max_history = max_history  # what the user tower reads, as in evaluation
        self.settings = settings
        self.info = info
        self._ids = {item_id: row for row, item_id in enumerate(dataset.item_ids)}
        self._titles = _title_index(dataset.item_titles, strip_year=False)
        self._short_titles = _title_index(dataset.item_titles, strip_year=True)
        self.encode_batch = settings.encode_batch or (8 if rec.device.type == "cpu" else 32)

    @property
    def num_items(self) -> int:
        return len(self.dataset.item_ids)

    # --- requests ----------------------------------------------------------------------------
    def query(
        self, *, history: Sequence[str | int] = (), text: str | None = None, k: int = 10,
        exclude_seen: bool = True,
    ) -> Query:
        """Validate a request; RequestError names the field (history[i], text, k) and the fix."""
        s = self.settings
        if len(history) > s.max_history:
            raise RequestError("history", f"{len(history)} items, at most {s.max_history} are accepted; "
                               "send the most recent ones")
        text = text.strip() if text else None
        if text and len(text) > s.max_text_chars:
            raise RequestError("text", f"{len(text)} characters, at most {s.max_text_chars}")
        if not history and not text:
            raise RequestError("history", "empty request: give a history (item ids or titles), "
                               "a text describing the user's taste, or both")
        if isinstance(k, bool) or not 1 <= k <= s.max_k:
            raise RequestError("k", f"k={k} is out of range; use 1 to {s.max_k}")
        rows = tuple(self.resolve(ref, field=f"history[{n}]") for n, ref in enumerate(history))
        return Query(rows, text, k, exclude_seen)

    def resolve(self, ref: str | int, *, field: str = "item") -> int:
        """Catalogue row of an item id, an exact title, or a title without its year."""
        key = str(ref).strip()
        if key in self._ids:
            return self._ids[key]
        if isinstance(ref, int) and not isinstance(ref, bool):
            raise RequestError(field, f"unknown item id {ref}; find ids with GET /items?query=...")
        for index in (self._titles, self._short_titles):
            rows = index.get(key.casefold(), [])
            if len(rows) == 1:
                return rows[0]
            if len(rows) > 1:
                options = "; ".join(f"{self.dataset.item_ids[r]} = {self.dataset.item_titles[r]!r}"
                                    for r in rows[:5])
                raise RequestError(field, f"title {key!r} is ambiguous: {len(rows)} items match "
                                   f"({options}); give the item id or the full title")
        hint = "; ".join(repr(self.dataset.item_titles[r]) for r in self.search(key, limit=3))
        raise RequestError(field, f"{key!r} is neither an item id nor a title in the catalogue"
                           + (f"; did you mean {hint}?" if hint else "; search with GET /items?query=..."))

    def search(self, query: str, *, limit: int = 20) -> list[int]:
        """Rows whose title contains every word of `query` (case-insensitive), catalogue order."""
        words = query.casefold().split()
        out = []
        for row, title in enumerate(self.dataset.item_titles):
            folded = title.casefold()
            if all(w in folded for w in words) or query.strip() == self.dataset.item_ids[row]:
                out.append(row)
                if len(out) >= limit:
                    break
        return out

    # --- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def recommend(self, queries: Sequence[Query]) -> list[list[Scored]]:
        """The top K of each query, scored in one batch through the user tower."""
        titles = [[self.dataset.item_titles[i] for i in q.history[-self.max_history :]] for q in queries]
        users = self._encode([self.rec.user_ids(t, q.text) for t, q in zip(titles, queries, strict=True)])
        scores = self.rec.logits(users, self.items).double()  # (B, I), as evaluation adds in float64
        if self.prior is not None:
            scores = scores + self.prior[None, :]
        out = []
        for row, q in enumerate(queries):
            if q.exclude_seen and q.history:
                scores[row, list(q.history)] = -torch.inf
            available = self.num_items - (len(set(q.history)) if q.exclude_seen else 0)
            top = torch.topk(scores[row], k=min(q.k, available))
            out.append([Scored(self.dataset.item_ids[i], self.dataset.item_titles[i], float(v))
                        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
        return out

    def _encode(self, sequences: list[list[int]]) -> torch.Tensor:
        """(B, H) user vectors; passes of similar-length prompts, results in request order."""
        order = sorted(range(len(sequences)), key=lambda n: len(sequences[n]))
        step = self.encode_batch
        parts = [(rows, self.rec.encode_ids([sequences[r] for r in rows]))
                 for rows in (order[i : i + step] for i in range(0, len(order), step))]
        out = torch.empty((len(sequences), parts[0][1].shape[1]), device=parts[0][1].device)
        for rows, vectors in parts:
            out[rows] = vectors
        return out


def _title_index(titles: Sequence[str], *, strip_year: bool) -> dict[str, list[int]]:
    """Casefolded title (or title without its year) -> rows; "X, The" also as "The X"."""
    index: dict[str, list[int]] = {}
    for row, title in enumerate(titles):
        variants = {title.strip()}
        if (m := _ARTICLE.match(title.strip())) is not None:
            variants.add(f"{m['article']} {m['rest']}{m['year'] or ''}")
        for variant in variants:
            key = _YEAR.sub("", variant) if strip_year else variant
            rows = index.setdefault(key.strip().casefold(), [])
            if row not in rows:
                rows.append(row)
    return index


# --- loading ---------------------------------------------------------------------------------


def load_service(
    root: Path, settings: ServeSettings, *, cache_dir: Path, offline: bool
) -> RecommenderService:
    """Load a run directory once: base model + final adapter, catalogue vectors, prior."""
    run = locate_run(root, settings.method)
    cfg = run.config
    if settings.device is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=settings.device))
    dataset = _catalogue(settings.data or cfg.data.dataset, cfg, cache_dir=cache_dir, offline=offline)
    loaded = build_recommender(cfg, cache_dir=cache_dir, offline=offline)
    _check_base(run, loaded)
    load_adapter(loaded.rec.model, read_adapter(run.adapter), source=str(run.adapter))  # type: ignore[arg-type]
    digest = tensors_digest(adapter_state(loaded.rec.model))  # type: ignore[arg-type]
    # Vectors come from the adapted model unmerged, like evaluation's (and share its cache);
    # items added to the catalogue since training are encoded here from their text.
    vectors = item_vectors_cached(loaded.rec, dataset.item_texts, cache_dir=cache_dir,
                                  model_fingerprint=loaded.base.fingerprint, adapter_digest=digest,
                                  batch_size=cfg.eval.batch_size)
    rec = _merged(loaded, cfg) if settings.merge else loaded.rec
    rec.model.eval()
    prior, beta = _prior(run, len(dataset.item_ids))
    info = _model_info(run, cfg, loaded, dataset, beta, merged=settings.merge)
    log.info("serving %s: %s on %s, %d items, prior β=%s", root, cfg.model.name, rec.device,
             len(dataset.item_ids), beta)
    return RecommenderService(rec=rec, dataset=dataset, item_vectors=vectors, prior=prior,
                              max_history=cfg.data.max_history, settings=settings, info=info)


def _catalogue(spec: str, cfg: Config, *, cache_dir: Path, offline: bool) -> Dataset:
    path = resolve_dataset(spec, cache_dir=cache_dir, offline=offline)
    return load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)


def _check_base(run: RunArtifacts, loaded: Loaded) -> None:
    """A run that recorded its base model's checksum must be served on that same model."""
    recorded = run.provenance.get("model_sha256")
    if recorded and recorded != loaded.base.fingerprint:
        raise ConfigError(f"{run.root} was trained on base model {recorded[:12]}…, but "
                          f"{run.config.model.name!r} now loads as {loaded.base.fingerprint[:12]}…; "
                          "serve it with the model it was trained on")


def _merged(loaded: Loaded, cfg: Config) -> Recommender:
    """The recommender over base weights with LoRA folded in (W + BA·α/r): no adapter matmuls."""
    model = loaded.rec.model.merge_and_unload()  # type: ignore[operator]
    return Recommender(model, loaded.base.tokenizer, max_item_tokens=cfg.model.max_item_tokens,
                       max_history_tokens=cfg.model.max_history_tokens, temperature=cfg.train.temperature)


def _prior(run: RunArtifacts, num_items: int) -> tuple[np.ndarray | None, float | None]:
    """β·log(1 + count) per catalogue row, with the β of the run's final metrics."""
    beta = run.metrics.get("prior_weight")
    if beta is None:
        return None, None
    if run.counts is None:
        log.warning("%s chose prior weight β=%s but holds no prior_counts.safetensors; serving the "
                    "LLM score alone", run.root, beta)
        return None, None
    counts = load_prior_counts(run.counts)
    if len(counts) > num_items:
        raise DataError(f"{run.counts} has counts for {len(counts)} items but the catalogue has "
                        f"{num_items}; items may be added at the end of the item file, not removed")
    if len(counts) < num_items:  # new items, appended to the item file: no popularity yet
        log.info("%d catalogue items are newer than the run: no popularity prior for them",
                 num_items - len(counts))
        counts = np.concatenate([counts, np.zeros(num_items - len(counts))])
    return prior_scores(counts, float(beta)), float(beta)


def _model_info(
    run: RunArtifacts, cfg: Config, loaded: Loaded, dataset: Dataset, beta: float | None, *, merged: bool,
) -> dict[str, Any]:
    with safe_open(str(run.adapter), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    ledgers = epsilon_summary(run.ledgers)
    epsilons = [v["epsilon"] for v in ledgers.values() if isinstance(v.get("epsilon"), int | float)]
    return {
        "run_dir": str(run.root), "kind": "federated" if run.method is None else "central",
        "method": run.method, "base_model": cfg.model.name, "base_source": loaded.base.source,
        "base_sha256": loaded.base.fingerprint,
        "adapter_sha256": sha256_file(run.adapter),
        "adapter_metadata": metadata, "lora_merged": merged,
        "rounds": run.metrics.get("rounds", _int_or_none(metadata.get("rounds"))),
        "dataset": {"name": dataset.name, "source": cfg.data.dataset, "items": len(dataset.item_ids)},
        "prior_weight": beta, "test_metrics": run.metrics.get("test"),
        "epsilon": {"per_party": ledgers, "max": max(epsilons) if epsilons else None},
    }


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None
