"""The recommendation service without HTTP: a run directory loaded once; requests resolved, scored, ranked.

Ranking is the evaluation's (common/evaluation.py): score = CF + w·LLM, CF from the run's private
prior (co-occurrence of the user's history items with every head item, plus β·log popularity),
LLM the cosine of the pooled vectors of the user's `data.max_history` most recent items (and of
the user's own words, encoded with the item prompt) with every item vector, w chosen on
validation; items of the history excluded. Item vectors are computed once at start-up, so a warm
user costs one matrix–vector product; only a text query runs the LM (one short prompt).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.common.assets import resolve_dataset, sha256_file
from fedrec.common.catalogue import catalogue_cached
from fedrec.common.config import Config, from_dict
from fedrec.common.data import Dataset, load_dataset
from fedrec.common.errors import ConfigError, DataError, RequestError
from fedrec.common.ledger import read_ledger
from fedrec.common.lora import load_adapter, read_adapter, read_adapter_metadata, read_adapter_record
from fedrec.common.prior import CollaborativePrior, history_matrix, load_prior
from fedrec.common.recommender import ItemEncoder, Loaded, build_recommender, item_vectors
from fedrec.common.rundir import PRIOR, RECORD_KEY, AdapterRecord, RunDir, read_json

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
    # Kept for the command line: item vectors are computed once with the adapter applied, so
    # folding LoRA into the weights changes nothing at request time.
    merge: bool = False
    # Text queries per forward pass of the LM (warm users need none). None: 8 on CPU, 32 on a GPU.
    encode_batch: int | None = None
    reasons: int = 3  # history items named per recommended item ("because you liked ...")
    max_history: int = 200  # history entries accepted per request (the model reads the most recent)
    max_k: int = 100
    max_text_chars: int = 2000
    # An id or title is short; resolving one costs a scan of the titles, so a request's entries
    # are capped before any is resolved (a 64 KB entry is answered 422 at once).
    max_entry_chars: int = 300
    max_history_chars: int = 20_000  # all entries of one request together

    def __post_init__(self) -> None:
        for key in ("max_history", "max_k", "max_text_chars", "encode_batch", "max_entry_chars",
                    "max_history_chars"):
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
    prior: Path | None
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
class Reason:
    item_id: str
    title: str
    weight: float  # this history item's share of the recommended item's score


@dataclass(frozen=True)
class Scored:
    item_id: str
    title: str
    score: float
    because: tuple[Reason, ...] = ()


# --- the run directory -----------------------------------------------------------------------


def locate_run(root: Path, method: str | None = None) -> RunArtifacts:
    """Find the adapter, prior counts, metrics and ledgers of a federated or central run."""
    run = RunDir(root, create=False)
    if not run.config.is_file():
        raise ConfigError(f"{root} is not a run directory (no {run.config.name}); pass the --output of "
                          "`fedrec simulate` or `fedrec train-central`")
    config, provenance = _read_config(run.config)
    final = run.final(method)
    if method is None and not final.adapter.is_file():
        central = run.finals()
        if not central:
            raise ConfigError(f"{root} holds no final adapter ({final.adapter.relative_to(root)}); "
                              "has its training finished?")
        raise ConfigError(f"{root} is a central run with several adapters; pass --method, one of: "
                          f"{', '.join(central)}")
    if not final.adapter.is_file():
        raise ConfigError(f"--method {method}: {final.adapter} does not exist")
    metrics = read_json(final.metrics) if final.metrics.is_file() else {}
    ledgers = list(run.ledgers().values()) if method is None \
        else [p for p in [run.ledger(method)] if p.is_file()]
    return RunArtifacts(root, config, provenance, method, final.adapter,
                        final.prior if final.prior.is_file() else None, metrics, tuple(ledgers))


def _read_config(path: Path) -> tuple[Config, dict[str, Any]]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    provenance = raw.pop("provenance", {})
    return from_dict(Config, raw), provenance


def epsilon_summary(ledgers: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Per party (client or central method): ε spent so far (the last ledger line), δ, releases;
    a party whose ledger has a line that is not whole gets no ε, and the problem instead."""
    out: dict[str, dict[str, Any]] = {}
    for path in ledgers:
        try:
            lines = read_ledger(path)
        except DataError as exc:  # no ε is claimed from a ledger that cannot be read whole
            out[path.stem] = {"epsilon": None, "problem": str(exc)}
            continue
        if not lines:
            continue
        last = lines[-1]
        out[path.stem] = {
            "epsilon": last.epsilon, "delta": last.delta, "releases": len(lines),
            "mechanisms": sorted({x.mechanism for x in lines}), "accountant": last.accountant,
        }
    return out


# --- the service -----------------------------------------------------------------------------


class RecommenderService:
    """A loaded recommender over a catalogue: resolves requests and returns the top K."""

    def __init__(
        self, *, encoder: ItemEncoder, dataset: Dataset, vectors: torch.Tensor, text_center: torch.Tensor,
        prior: CollaborativePrior | None, weight: float, cf: tuple[float, float], max_history: int,
        settings: ServeSettings, info: dict[str, Any],
    ) -> None:
        self.encoder = encoder
        self.dataset = dataset
        self.vectors = vectors.double()  # (I, H) centred, normalised item vectors
        self.text_center = text_center  # (H,) the catalogue mean the item vectors were centred by
        self.prior = prior
        self.weight = weight  # w in CF + w·LLM; 1.0 (LLM alone) without a prior
        beta, shrink = cf
        self.similarity = torch.from_numpy(prior.similarity(shrink=shrink)) if prior is not None else None
        self.popularity: torch.Tensor | None = None  # (I,) the popularity part of CF, as cf_scores
        if prior is not None:
            scale = beta if prior.cooccurrence is not None else 1.0
            self.popularity = torch.from_numpy(scale * prior.popularity_scores())
        self.max_history = max_history  # history items pooled into the user vector, as in evaluation
        self.settings = settings
        self.info = info
        self._ids = {item_id: row for row, item_id in enumerate(dataset.item_ids)}
        self._titles = _title_index(dataset.item_titles, strip_year=False)
        self._short_titles = _title_index(dataset.item_titles, strip_year=True)
        self.encode_batch = settings.encode_batch or (8 if encoder.device.type == "cpu" else 32)

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
        _check_entries(history, max_entry=s.max_entry_chars, max_total=s.max_history_chars)
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
        """The top K of each query with its reasons; text queries share one pass of the LM."""
        texts = self._texts([q.text for q in queries])
        out = []
        for q, text in zip(queries, texts, strict=True):
            llm, recent, norm = self._llm(q.history, text)
            cf, cf_parts = self._cf(q.history)
            scores = cf + self.weight * llm if self.prior is not None else llm
            if q.exclude_seen and q.history:
                scores[list(q.history)] = -torch.inf
            available = self.num_items - (len(set(q.history)) if q.exclude_seen else 0)
            top = torch.topk(scores, k=min(q.k, available))
            rows = top.indices.tolist()
            because = self._reasons(rows, recent, norm, cf_parts)
            out.append([Scored(self.dataset.item_ids[i], self.dataset.item_titles[i], float(v), b)
                        for v, i, b in zip(top.values.tolist(), rows, because, strict=True)])
        return out

    def _texts(self, texts: Sequence[str | None]) -> list[torch.Tensor | None]:
        """(H,) vector of each text (None where there is none), in the items' centred space."""
        todo = [n for n, t in enumerate(texts) if t]
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(todo), self.encode_batch):
            rows = todo[start : start + self.encode_batch]
            states = self.encoder.encode_text([str(texts[r]) for r in rows]).cpu().double()
            for r, v in zip(rows, torch.nn.functional.normalize(states - self.text_center, dim=-1),
                            strict=True):
                out[r] = v
        return out

    def _llm(self, history: Sequence[int], text: torch.Tensor | None) -> tuple[torch.Tensor, list[int],
                                                                               float]:
        """(I,) cosine of the pooled recent history (+ the text) with every item; the rows pooled
        and the norm of their pooled vector."""
        recent = list(dict.fromkeys(history[-self.max_history :]))
        pooled = self.vectors[recent].mean(dim=0) if recent else torch.zeros(self.vectors.shape[1],
                                                                             dtype=torch.double)
        if text is not None:
            pooled = pooled + text
        norm = float(pooled.norm())
        if norm == 0:
            return torch.zeros(self.num_items, dtype=torch.double), recent, 1.0
        return self.vectors @ (pooled / norm), recent, norm

    def _cf(self, history: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(I,) CF score and (n_head_history, M) the per-history-item parts (for reasons)."""
        if self.prior is None:
            return torch.zeros(self.num_items, dtype=torch.double), None
        scores = self.popularity.clone() if self.popularity is not None else torch.zeros(self.num_items)
        if self.similarity is None or not len(self.prior.head) or not history:
            return scores.double(), None
        weights = torch.from_numpy(history_matrix([history], self.prior.head)[0])  # (M,)
        parts = weights[:, None] * self.similarity  # (M, M): history item j's share of head item i
        scores[torch.from_numpy(self.prior.head)] += parts.sum(dim=0)
        return scores.double(), parts

    def _reasons(self, rows: Sequence[int], recent: Sequence[int], norm: float,
                 cf_parts: torch.Tensor | None) -> list[tuple[Reason, ...]]:
        """For each recommended row: the history items that contributed most to its score."""
        if not self.settings.reasons or not recent:
            return [() for _ in rows]
        hist = list(recent)
        share = self.vectors[hist] @ self.vectors[list(rows)].T / (len(hist) * norm)  # (n, K) LLM shares
        if self.prior is not None:
            share = share * self.weight
        if cf_parts is not None and self.prior is not None:
            position = {int(h): i for i, h in enumerate(self.prior.head)}
            for c, row in enumerate(rows):
                if row in position:
                    for n, j in enumerate(hist):
                        if j in position:
                            share[n, c] += cf_parts[position[j], position[row]]
        out = []
        for c in range(len(rows)):
            best = torch.argsort(share[:, c], descending=True)[: self.settings.reasons].tolist()
            out.append(tuple(Reason(self.dataset.item_ids[hist[n]], self.dataset.item_titles[hist[n]],
                                    round(float(share[n, c]), 4)) for n in best if share[n, c] > 0))
        return out


def _check_entries(history: Sequence[str | int], *, max_entry: int, max_total: int) -> None:
    """Per-entry and per-request caps on the history's text, checked before anything is resolved."""
    total = 0
    for n, ref in enumerate(history):
        if isinstance(ref, float) or not isinstance(ref, str | int):  # NaN, Infinity, objects
            raise RequestError(f"history[{n}]", "an item id or title (a string or an integer) is expected")
        # an integer id's digits, counted without printing a huge integer
        size = len(ref) if isinstance(ref, str) else \
            (len(str(ref)) if ref.bit_length() <= 4 * max_entry else max_entry + 1)
        if size > max_entry:
            raise RequestError(f"history[{n}]", f"{size} characters, at most {max_entry} per entry "
                               "(an item id or title)")
        total += size
        if total > max_total:
            raise RequestError("history",
                               f"over {max_total} characters in all; send fewer or shorter entries")


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
    """Load a run directory once: base model + final adapter, item vectors, the private prior."""
    run = locate_run(root, settings.method)
    cfg = run.config
    if settings.device is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=settings.device))
    dataset = _catalogue(settings.data or cfg.data.dataset, cfg, cache_dir=cache_dir, offline=offline)
    loaded = build_recommender(cfg, cache_dir=cache_dir, offline=offline)
    _check_base(run, loaded)
    load_adapter(loaded.model, read_adapter(run.adapter), source=str(run.adapter))
    loaded.model.eval()
    # The frozen part is shared with evaluation's cache; items added to the catalogue since
    # training are encoded here from their text, once.
    catalogue = catalogue_cached(loaded.encoder, dataset.item_texts, cache_dir=cache_dir,
                                 model_fingerprint=loaded.base.fingerprint, batch_size=cfg.eval.batch_size)
    with torch.no_grad():
        states = loaded.encoder.states(catalogue).cpu()
    prior, weight = _prior(run, len(dataset.item_ids))
    vectors = item_vectors(states)
    if not torch.isfinite(vectors).all():
        raise DataError(f"{run.adapter} gives non-finite item vectors (NaN or infinite weights); it "
                        "cannot be served — check the run (fedrec audit) and serve a good checkpoint")
    cf = run.metrics.get("cf") or {}
    cf_settings = (float(cf.get("beta", cfg.prior.beta)), float(cf.get("shrink", cfg.prior.shrink)))
    info = _model_info(run, cfg, loaded, dataset, weight, merged=settings.merge)
    log.info("serving %s: %s on %s, %d items, blend weight w=%s", root, cfg.model.name, loaded.encoder.device,
             len(dataset.item_ids), weight)
    return RecommenderService(encoder=loaded.encoder, dataset=dataset, vectors=vectors,
                              text_center=states.mean(dim=0).double(), prior=prior,
                              weight=weight if weight is not None else 1.0, cf=cf_settings,
                              max_history=cfg.data.max_history, settings=settings, info=info)


def _catalogue(spec: str, cfg: Config, *, cache_dir: Path, offline: bool) -> Dataset:
    path = resolve_dataset(spec, cache_dir=cache_dir, offline=offline)
    return load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)


def _check_base(run: RunArtifacts, loaded: Loaded) -> None:
    """An adapter must be served on the base model it was trained on: the fingerprint in its record
    (every adapter written since records exist), else the run's provenance (older runs)."""
    record = read_adapter_record(run.adapter)
    recorded = record.model_fingerprint if record is not None else run.provenance.get("model_sha256")
    if recorded and recorded != loaded.base.fingerprint:
        raise ConfigError(f"{run.adapter} was trained on base model {recorded[:12]}…, but "
                          f"{run.config.model.name!r} now loads as {loaded.base.fingerprint[:12]}…; "
                          "serve it with the model it was trained on")
    if record is None and not recorded:
        log.warning("%s records no base-model fingerprint (written before adapter records); serving it on "
                    "%s without that check", run.adapter, run.config.model.name)


def _prior(run: RunArtifacts, num_items: int) -> tuple[CollaborativePrior | None, float | None]:
    """The run's private prior (extended with zeros for items appended since) and its blend weight."""
    weight = run.metrics.get("blend_weight")
    if weight is None:
        return None, None
    if run.prior is None:
        log.warning("%s chose blend weight w=%s but holds no %s; serving the LLM score alone",
                    run.root, weight, run.prior.name if run.prior else PRIOR)
        return None, None
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise DataError(f"{run.root}/final/metrics.json: blend_weight {weight!r} is not a finite number; "
                        "the run's record is damaged and cannot be served")
    prior = load_prior(run.prior)  # validated there: shapes, finite values
    if prior.num_items > num_items:
        raise DataError(f"{run.prior} has statistics for {prior.num_items} items but the catalogue has "
                        f"{num_items}; items may be added at the end of the item file, not removed")
    if prior.num_items < num_items:  # new items, appended to the item file: no collaborative data yet
        log.info("%d catalogue items are newer than the run: no collaborative prior for them",
                 num_items - prior.num_items)
        prior = CollaborativePrior(np.concatenate([prior.popularity, np.zeros(num_items - prior.num_items)]),
                                   prior.head, prior.cooccurrence, prior.noise_std)
    return prior, float(weight)


def _model_info(
    run: RunArtifacts, cfg: Config, loaded: Loaded, dataset: Dataset, weight: float | None, *, merged: bool,
) -> dict[str, Any]:
    metadata = read_adapter_metadata(run.adapter)
    record = AdapterRecord.from_metadata(metadata, source=str(run.adapter))
    metadata.pop(RECORD_KEY, None)  # its config may name local paths; the fingerprints are below
    ledgers = epsilon_summary(run.ledgers)
    epsilons = [v["epsilon"] for v in ledgers.values() if isinstance(v.get("epsilon"), int | float)]
    return {
        "run_dir": str(run.root), "kind": "federated" if run.method is None else "central",
        "method": run.method, "base_model": cfg.model.name, "base_source": loaded.base.source,
        "base_sha256": loaded.base.fingerprint,
        "adapter_sha256": sha256_file(run.adapter),
        "adapter_metadata": metadata, "lora_merged": merged,
        "adapter_record": None if record is None else {
            "model_fingerprint": record.model_fingerprint, "dataset_fingerprint": record.dataset_fingerprint,
            "run": record.run, "rounds": record.rounds, "variant": record.variant},
        "rounds": run.metrics.get("rounds", _int_or_none(metadata.get("rounds"))),
        "dataset": {"name": dataset.name, "source": cfg.data.dataset, "items": len(dataset.item_ids)},
        "blend_weight": weight, "test_metrics": run.metrics.get("test"),
        "epsilon": {"per_party": ledgers, "max": max(epsilons) if epsilons else None},
    }


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None
