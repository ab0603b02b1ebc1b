"""The HTTP service: a real uvicorn server on a free loopback port, real HTTP requests, a run dir on disk."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fedrec.cli import main
from fedrec.common.catalogue import catalogue_cached
from fedrec.common.config import load_config
from fedrec.common.errors import DataError, RequestError
from fedrec.common.evaluation import CFSettings, blend, catalogue_vectors, cf_scores, llm_scores
from fedrec.common.lora import load_adapter, save_adapter
from fedrec.common.prior import CollaborativePrior, save_prior
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import RunDir, append_jsonl, atomic_write_json
from fedrec.server.serving.http import HttpSettings, RateLimiter, ServeSpec, check_bind, create_app
from fedrec.server.serving.http import run as serve_run
from fedrec.server.serving.service import RecommenderService, ServeSettings, load_service, locate_run
from harness.loopback import free_port

TRAINED_ITEMS = 30  # items of the catalogue when the run trained
NEW_ITEMS = 3  # added to the item file afterwards
KEY = "test-key-0123456789"


def write_catalogue(root: Path) -> Path:
    """A CSV data set of 30 items ("Movie j (1980+j)", id ij), then two items added after training."""
    root.mkdir(parents=True)
    items = ["item_id,title,genres", *(f"i{j},Movie {j} ({1980 + j}),Genre {j % 4}" for j in range(TRAINED_ITEMS))]
    items += ["x1,Twin Peaks (1990),Drama", "x2,Twin Peaks (1990),Mystery",  # one title, two items
              "x3,\"Game, The (1997)\",Thriller"]  # the catalogue's way of writing "The Game"
    (root / "items.csv").write_text("\n".join(items) + "\n")
    inter = ["user_id,item_id,timestamp", *(f"u{u},i{(u * 3 + t * 5) % TRAINED_ITEMS},{t}"
                                             for u in range(12) for t in range(5))]
    (root / "interactions.csv").write_text("\n".join(inter) + "\n")
    return root


def trained_prior() -> CollaborativePrior:
    """Noisy statistics as a run releases them (counts may be negative), head = items 0..9."""
    counts = (np.arange(TRAINED_ITEMS) % 7).astype(np.float64) * 3 - 2
    rng = np.random.default_rng(0)
    cooc = rng.normal(0, 1, (10, 10)) + np.eye(10) * 5
    return CollaborativePrior(counts, np.arange(10), (cooc + cooc.T) / 2)


def make_run(root: Path, cache: Path) -> Path:
    """A federated run directory as `fedrec simulate` leaves it, with a non-trivial adapter."""
    data = write_catalogue(root / "data")
    cfg = load_config(None, [f'data.dataset="{data}"', 'model.name="tiny-random"', "lora.rank=2",
                             "lora.last_layers=1", "model.max_item_tokens=40",
                             "data.max_history=4", 'name="serve-test"'])
    loaded = build_recommender(cfg, cache_dir=cache)
    gen = torch.Generator().manual_seed(1)
    adapter = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in loaded.initial_adapter.items()}
    run = root / "run"
    RunDir(run).write_config(cfg, {"clients": ["client-0", "client-1"], "engine": "test"})
    save_adapter(run / "final" / "adapter.safetensors", adapter, {"run_id": "t", "rounds": "2", "variant": "lora"})
    save_prior(run / "final", trained_prior())
    atomic_write_json(RunDir(run).final().metrics, {"blend_weight": 2.0, "rounds": 2, "test": {"ndcg@10": 0.1},
                                                    "cf": {"beta": 0.5, "shrink": 1.0}})
    for client, eps in (("client-0", [0.5, 1.5]), ("client-1", [0.7, 2.5])):
        for rnd, e in enumerate(eps):
            append_jsonl(RunDir(run).ledger(client), {
                "round": rnd, "mechanism": "prior-counts" if rnd == 0 else "dp-sgd", "epsilon": e,
                "delta": 1e-3, "accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1})
    return run


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` on uvicorn in a thread, on a socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    return make_run(root, root / "cache")


@pytest.fixture(scope="module")
def service(run_dir: Path) -> RecommenderService:
    return load_service(run_dir, ServeSettings(), cache_dir=run_dir.parent / "cache", offline=True)


@pytest.fixture(scope="module")
def url(service: RecommenderService) -> Iterator[str]:
    with serving(create_app(service, HttpSettings())) as base:
        yield base


def post(url: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/recommend", json=body, timeout=30, **kw)


def reference_top(run_dir: Path, history: list[int], k: int) -> tuple[list[int], list[float]]:
    """Top K as evaluation scores it: cf_scores + 2·llm_scores, history excluded."""
    from fedrec.common.data import load_dataset
    from fedrec.common.lora import read_adapter

    cfg = locate_run(run_dir).config
    dataset = load_dataset(Path(cfg.data.dataset))
    loaded = build_recommender(cfg, cache_dir=run_dir.parent / "cache")
    load_adapter(loaded.model, read_adapter(run_dir / "final" / "adapter.safetensors"), source="test")
    catalogue = catalogue_cached(loaded.encoder, dataset.item_texts, cache_dir=None, model_fingerprint="")
    vectors = catalogue_vectors(loaded.encoder, catalogue)
    llm = llm_scores(vectors, [history], window=cfg.data.max_history)
    prior = trained_prior()
    prior = CollaborativePrior(np.concatenate([prior.popularity, [0.0] * NEW_ITEMS]), prior.head, prior.cooccurrence)
    scores = blend(cf_scores(prior, [history], len(dataset.item_ids), CFSettings(beta=0.5, shrink=1.0)), llm,
                   2.0)[0]
    scores[history] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    return [dataset.item_ids[i] for i in top], scores[top].tolist()


# --- recommendations -------------------------------------------------------------------------


def test_known_history_returns_k_distinct_unseen_items_ranked_as_evaluation(url: str, run_dir: Path) -> None:
    history = ["i1", "i5", "i9", "i14", "i20"]

    response = post(url, {"history": history, "k": 7})

    assert response.status_code == 200
    items = response.json()["items"]
    ids = [i["item_id"] for i in items]
    assert len(ids) == 7 and len(set(ids)) == 7 and not set(ids) & set(history)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    ref_ids, ref_scores = reference_top(run_dir, [1, 5, 9, 14, 20], 7)
    assert ids == ref_ids
    assert scores == pytest.approx(ref_scores, rel=1e-4, abs=1e-4)


def test_every_item_names_the_history_items_it_comes_from(url: str, service: RecommenderService) -> None:
    history = ["i1", "i5", "i9"]

    items = post(url, {"history": history, "k": 5}).json()["items"]
    text_only = post(url, {"text": "sci-fi", "k": 3}).json()["items"]

    assert all(item["because"] for item in items)
    for item in items:
        assert {b["item_id"] for b in item["because"]} <= set(history)
        weights = [b["weight"] for b in item["because"]]
        assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
    assert all(item["because"] == [] for item in text_only)  # no history: nothing to point at
    # for a head item, the history item with the largest share is the one CF and the LLM rank first
    query = service.query(history=history, k=5)
    top = service.recommend([query])[0][0]
    row = service.resolve(top.item_id)
    shares = []
    for j in query.history:
        cf = service.similarity[j, row] / np.sqrt(3) if row < 10 and j < 10 else 0.0
        llm = float(service.vectors[j] @ service.vectors[row]) / (3 * float(service.vectors[list(query.history)].mean(0).norm()))
        shares.append(float(cf) + 2.0 * llm)
    assert top.because[0].item_id == service.dataset.item_ids[query.history[int(np.argmax(shares))]]


def test_merged_lora_ranks_as_unmerged(run_dir: Path, service: RecommenderService) -> None:
    merged = load_service(run_dir, ServeSettings(merge=True), cache_dir=run_dir.parent / "cache", offline=True)
    queries = [service.query(history=["i2", "i8", "i11"], k=6), service.query(text="sci-fi", k=6)]

    got, ref = merged.recommend(queries), service.recommend(queries)

    assert merged.info["lora_merged"] and not service.info["lora_merged"]
    for a, b in zip(got, ref):
        assert [x.item_id for x in a] == [x.item_id for x in b]
        assert [x.score for x in a] == pytest.approx([x.score for x in b], rel=1e-4, abs=1e-4)


def test_titles_resolve_to_the_same_items_as_ids(url: str) -> None:
    by_id = post(url, {"history": ["i1", "i5"], "k": 5}).json()

    by_title = post(url, {"history": ["Movie 1 (1981)", "movie 5"], "k": 5}).json()
    article = [post(url, {"history": [t]}).json()["history"][0]["item_id"]
               for t in ("Game, The (1997)", "The Game (1997)", "the game")]

    assert [h["item_id"] for h in by_title["history"]] == ["i1", "i5"]
    assert by_title["items"] == by_id["items"]
    assert article == ["x3", "x3", "x3"]


def test_cold_start_text_and_text_with_history(url: str) -> None:
    cold = post(url, {"text": "I love 90s sci-fi and dark comedies", "k": 5})
    other = post(url, {"text": "documentaries about cooking", "k": 5})
    history_only = post(url, {"history": ["i3"], "k": 5}).json()["items"]
    both = post(url, {"history": ["i3"], "text": "I love 90s sci-fi", "k": 5}).json()["items"]

    assert cold.status_code == 200 and len({i["item_id"] for i in cold.json()["items"]}) == 5
    assert [i["score"] for i in cold.json()["items"]] != [i["score"] for i in other.json()["items"]]
    assert [i["score"] for i in both] != [i["score"] for i in history_only]
    assert "i3" not in {i["item_id"] for i in both}


def test_new_catalogue_items_are_scored_without_retraining(url: str, service: RecommenderService) -> None:
    everything = post(url, {"history": ["i0"], "k": TRAINED_ITEMS + NEW_ITEMS - 1}).json()["items"]

    assert service.num_items == TRAINED_ITEMS + NEW_ITEMS
    assert {"x1", "x2", "x3"} <= {i["item_id"] for i in everything}
    assert all(np.isfinite(i["score"]) for i in everything)


def test_exclude_seen_false_may_return_history_items(url: str) -> None:
    items = post(url, {"history": ["i0"], "k": TRAINED_ITEMS + NEW_ITEMS, "exclude_seen": False}).json()["items"]

    assert "i0" in {i["item_id"] for i in items}


def test_items_search_model_card_health_and_page(url: str, run_dir: Path) -> None:
    found = httpx.get(f"{url}/items", params={"query": "movie 2"}).json()["items"]
    card = httpx.get(f"{url}/model").json()
    health = httpx.get(f"{url}/health").json()
    page = httpx.get(f"{url}/")
    docs = httpx.get(f"{url}/openapi.json").json()

    assert {"Movie 2 (1982)", "Movie 20 (2000)"} <= {i["title"] for i in found}
    assert all("movie" in i["title"].lower() and "2" in i["title"] for i in found)
    assert card["base_model"] == "tiny-random" and card["rounds"] == 2 and card["kind"] == "federated"
    assert card["adapter_sha256"] == hashlib.sha256((run_dir / "final" / "adapter.safetensors").read_bytes()).hexdigest()
    assert card["dataset"]["items"] == TRAINED_ITEMS + NEW_ITEMS and card["blend_weight"] == 2.0
    assert card["epsilon"]["per_party"]["client-1"]["epsilon"] == 2.5 and card["epsilon"]["max"] == 2.5
    assert health == {"status": "ok", "items": TRAINED_ITEMS + NEW_ITEMS}
    assert page.status_code == 200 and "/recommend" in page.text
    assert {"/recommend", "/items", "/model", "/health"} <= set(docs["paths"])
    assert "access-control-allow-origin" not in httpx.get(f"{url}/health", headers={"Origin": "http://x"}).headers


# --- bad input -------------------------------------------------------------------------------

BAD = [
    ({"history": ["no-such-item"]}, 422, "history[0]"),
    ({"history": ["i1", 12345]}, 422, "history[1]"),
    ({"history": ["Twin Peaks (1990)"]}, 422, "history[0]"),  # ambiguous
    ({"history": [{"id": 1}]}, 422, "history[0]"),
    ({"history": ["i1"], "k": 0}, 422, "k"),
    ({"history": ["i1"], "k": 101}, 422, "k"),
    ({"history": ["i1"], "k": "ten"}, 422, "k"),
    ({}, 422, "history"),
    ({"history": [], "text": "   "}, 422, "history"),
    ({"history": ["i1"] * 201}, 422, "history"),
    ({"history": ["i1"], "text": "x" * 2001}, 422, "text"),
    ({"histroy": ["i1"]}, 422, "histroy"),
    ([1, 2], 422, "body"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD)
def test_bad_input_gets_a_4xx_naming_the_field(url: str, body: Any, status: int, field: str) -> None:
    response = post(url, body)

    assert response.status_code == status
    assert response.json()["field"] == field and field in response.json()["detail"]


def test_ambiguous_title_lists_the_candidates(url: str) -> None:
    detail = post(url, {"history": ["Twin Peaks (1990)"]}).json()["detail"]

    assert "ambiguous" in detail and "x1" in detail and "x2" in detail


def test_malformed_json_and_bad_query_parameters(url: str) -> None:
    broken = httpx.post(f"{url}/recommend", content=b'{"history": [', headers={"Content-Type": "application/json"})
    limit = httpx.get(f"{url}/items", params={"limit": 0})

    assert broken.status_code == 422 and broken.json()["field"] == "body"
    assert limit.status_code == 422 and limit.json()["field"] == "limit"


def test_body_too_large_is_413_with_or_without_content_length(url: str) -> None:
    big = json.dumps({"history": ["i1"], "text": "x" * 70_000}).encode()

    declared = httpx.post(f"{url}/recommend", content=big, headers={"Content-Type": "application/json"})
    chunked = httpx.post(f"{url}/recommend", content=iter([big[:40_000], big[40_000:]]),
                         headers={"Content-Type": "application/json"})
    small_chunked = httpx.post(f"{url}/recommend", content=iter([b'{"history": ', b'["i1"], "k": 3}']),
                               headers={"Content-Type": "application/json"})

    assert declared.status_code == 413 and declared.json()["field"] == "body"
    assert chunked.status_code == 413
    assert small_chunked.status_code == 200 and len(small_chunked.json()["items"]) == 3


# --- authentication and batching -------------------------------------------------------------


def test_api_key_required_when_configured(service: RecommenderService) -> None:
    with serving(create_app(service, HttpSettings(api_key=KEY))) as base:
        missing = post(base, {"history": ["i1"]})
        wrong = post(base, {"history": ["i1"]}, headers={"X-API-Key": "nope"})
        right = post(base, {"history": ["i1"]}, headers={"X-API-Key": KEY})
        items = httpx.get(f"{base}/items", params={"query": "movie"})
        health = httpx.get(f"{base}/health")

    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert items.status_code == 401
    assert health.status_code == 200


def test_cors_only_when_configured(service: RecommenderService) -> None:
    with serving(create_app(service, HttpSettings(cors_origins=("http://example.org",)))) as base:
        allowed = httpx.get(f"{base}/health", headers={"Origin": "http://example.org"})

    assert allowed.headers["access-control-allow-origin"] == "http://example.org"


def test_concurrent_requests_are_batched_and_answered_as_alone(service: RecommenderService, monkeypatch) -> None:
    sizes: list[int] = []
    recommend = service.recommend

    def spy(queries):  # records how many queries each pass through the model held
        sizes.append(len(queries))
        return recommend(queries)

    monkeypatch.setattr(service, "recommend", spy)
    monkeypatch.setattr(service, "encode_batch", 4)  # padded passes, prompts reordered by length
    bodies = [{"history": [f"i{j}", f"i{(j * 7) % 30}"], "k": 4} for j in range(12)]
    with serving(create_app(service, HttpSettings(batch_wait_ms=200))) as base:
        alone = [post(base, b).json()["items"] for b in bodies]
        sizes.clear()
        results: list[Any] = [None] * len(bodies)

        def fire(n: int) -> None:
            results[n] = post(base, bodies[n]).json()["items"]

        threads = [threading.Thread(target=fire, args=(n,)) for n in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert max(sizes) > 1 and sum(sizes) == len(bodies)
    for got, ref in zip(results, alone):
        assert [i["item_id"] for i in got] == [i["item_id"] for i in ref]
        assert [i["score"] for i in got] == pytest.approx([i["score"] for i in ref], rel=1e-4, abs=1e-4)


# --- the command line ------------------------------------------------------------------------


def test_recommend_command(run_dir: Path, capsys) -> None:
    base = ["recommend", str(run_dir), "--cache-dir", str(run_dir.parent / "cache"), "--offline"]

    code = main([*base, "--history", "Movie 1 (1981)", "--history", "i5", "--k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    bad = main([*base, "--history", "no-such-item"])
    err = capsys.readouterr().err.strip().splitlines()

    assert code == 0 and len(out["items"]) == 3 and not {"i1", "i5"} & {i["item_id"] for i in out["items"]}
    assert bad == 2 and len(err) == 1 and "history[0]" in err[0]


def test_not_a_run_directory_is_one_clean_line(tmp_path: Path, capsys) -> None:
    code = main(["recommend", str(tmp_path), "--history", "i1", "--offline"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "config.toml" in err[0]


def test_serve_command_with_workers_and_key_file(run_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "fedrec.cli", "serve", str(run_dir), "--port", str(port), "--workers", "2",
           "--api-key-file", str(key_file), "--cache-dir", str(run_dir.parent / "cache"), "--offline"]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "fedrec serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        answers = [post(url, {"history": ["i2", "i4"], "k": 3}, headers={"X-API-Key": KEY}) for _ in range(4)]
        refused = post(url, {"history": ["i2"]})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # uvicorn's supervisor and its two workers
        proc.wait(timeout=30)

    assert {r.status_code for r in answers} == {200}
    assert len({json.dumps(r.json()) for r in answers}) == 1  # every worker serves the same model
    assert refused.status_code == 401


@pytest.mark.slow
def test_serves_a_real_federated_simulation(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    settings = ['model.name="tiny-random"', "data.max_users=0", "lora.rank=2", "lora.last_layers=1",
                "train.batch_size=8",
                "model.max_item_tokens=40", "fed.clients=2", "fed.rounds=1", "fed.local_epochs=0.5"]
    args = ["simulate", "--data", str(tiny_data), "--output", str(out), "--cache-dir", str(cache), "--offline"]
    assert main([*args, *(x for s in settings for x in ("--set", s))]) == 0
    capsys.readouterr()

    service = load_service(out, ServeSettings(), cache_dir=cache, offline=True)
    with serving(create_app(service, HttpSettings())) as base:
        items = post(base, {"history": ["i1", "i7"], "k": 5}).json()["items"]
        card = httpx.get(f"{base}/model").json()

    final = json.loads((out / "final" / "metrics.json").read_text())
    assert len(items) == 5 and not {"i1", "i7"} & {i["item_id"] for i in items}
    assert card["kind"] == "federated" and card["rounds"] == 1
    assert card["blend_weight"] == final["blend_weight"]
    for client, summary in card["epsilon"]["per_party"].items():
        lines = [json.loads(x) for x in (out / "ledgers" / f"{client}.jsonl").read_text().splitlines()]
        assert summary["epsilon"] == lines[-1]["epsilon"] and summary["releases"] == len(lines)
    assert set(card["epsilon"]["per_party"]) == {"client-0", "client-1"}


# --- hardening (issue 13) --------------------------------------------------------------------


def test_a_64kb_history_entry_is_refused_before_resolution_while_others_flow(service: RecommenderService) -> None:
    huge = "x " * (32 * 1024)  # 64 KB of words: a title search over it would scan every title per word
    start = time.perf_counter()
    with pytest.raises(RequestError, match="at most 300 per entry"):
        service.query(history=["i1", huge])
    assert time.perf_counter() - start < 0.1  # refused on its length, before any title search

    with serving(create_app(service, HttpSettings(max_body_bytes=256 * 1024))) as base:
        results: dict[str, httpx.Response] = {}
        threads = [threading.Thread(target=lambda: results.__setitem__("huge", post(base, {"history": [huge]}))),
                   threading.Thread(target=lambda: results.__setitem__("ok", post(base, {"history": ["i2"], "k": 3})))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        too_many = post(base, {"history": ["y" * 300] * 100})  # each entry allowed, the request not

    assert results["huge"].status_code == 422 and results["huge"].json()["field"] == "history[0]"
    assert "at most 300 per entry" in results["huge"].json()["detail"]
    assert len(results["huge"].content) < 2000  # the entry is not echoed back
    assert results["ok"].status_code == 200 and len(results["ok"].json()["items"]) == 3
    assert too_many.status_code == 422 and too_many.json()["field"] == "history"


@pytest.mark.parametrize("raw", ['{"history": ["i1"], "k": NaN}', '{"history": [NaN]}', '{"history": [Infinity]}',
                                 '{"history": ["i1"], "k": -Infinity}'])
def test_nan_and_infinity_in_a_body_are_422_not_500(url: str, raw: str) -> None:
    answer = httpx.post(f"{url}/recommend", content=raw, headers={"Content-Type": "application/json"}, timeout=30)

    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] in ("k", "history[0]")


def test_model_card_has_no_local_paths_and_no_test_metrics(url: str, run_dir: Path) -> None:
    text = httpx.get(f"{url}/model").text

    assert str(run_dir.parent) not in text and "test_metrics" not in text and "ndcg" not in text
    assert json.loads(text)["run"] == run_dir.name


def test_rate_limit_per_key_answers_429(service: RecommenderService) -> None:
    with serving(create_app(service, HttpSettings(rate=0.01, burst=2))) as base:
        first = [post(base, {"history": ["i1"], "k": 2}).status_code for _ in range(3)]
        other_key = post(base, {"history": ["i1"], "k": 2}, headers={"X-API-Key": "another"})  # no key configured

    assert first[:2] == [200, 200] and first[2] == 429
    assert other_key.status_code == 200  # its own bucket


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 2, clock=lambda: now[0])

    assert [limiter.wait_time("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    now[0] = 0.5
    assert limiter.wait_time("a") == 0.0 and limiter.wait_time("b") == 0.0


def test_a_full_queue_answers_503(service: RecommenderService, monkeypatch) -> None:
    release, entered = threading.Event(), threading.Event()
    recommend = service.recommend

    def blocked(queries):  # the model is busy until the test lets it go
        entered.set()
        release.wait(30)
        return recommend(queries)

    monkeypatch.setattr(service, "recommend", blocked)
    with serving(create_app(service, HttpSettings(batching=False, max_queue=1))) as base:
        first: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: first.append(post(base, {"history": ["i1"], "k": 2})))
        waiting.start()
        assert entered.wait(30)
        busy = post(base, {"history": ["i2"], "k": 2})
        release.set()
        waiting.join()

    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert first[0].status_code == 200


def test_a_public_bind_without_a_key_is_refused(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FEDREC_API_KEY", raising=False)

    assert main(["serve", str(run_dir), "--host", "0.0.0.0", "--cache-dir", str(run_dir.parent / "cache"),
                 "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--insecure-no-auth" in err
    check_bind("0.0.0.0", has_key=False, insecure_no_auth=True)  # the override, logged loudly
    check_bind("127.0.0.1", has_key=False, insecure_no_auth=False)


def test_workers_get_the_key_from_a_private_file_not_the_environment(monkeypatch, tmp_path: Path) -> None:
    import uvicorn as uv

    seen: dict[str, Any] = {}

    def fake_run(*args: Any, **kwargs: Any) -> None:  # what each worker process would be given
        spec = json.loads(os.environ["FEDREC_SERVE_SPEC"])
        seen["spec"], seen["key"] = spec, Path(spec["api_key_file"]).read_text()
        seen["mode"] = Path(spec["api_key_file"]).stat().st_mode & 0o777

    monkeypatch.setattr(uv, "run", fake_run)
    monkeypatch.delenv("FEDREC_SERVE_SPEC", raising=False)
    spec = ServeSpec(str(tmp_path), str(tmp_path), True, {}, {**dataclasses.asdict(HttpSettings(api_key=KEY)),
                                                               "cors_origins": []})

    serve_run(spec, host="127.0.0.1", port=1, workers=2)

    assert KEY not in json.dumps(seen["spec"]) and seen["spec"]["http"]["api_key"] is None
    assert seen["key"] == KEY and seen["mode"] == 0o600
    assert not Path(seen["spec"]["api_key_file"]).exists()  # removed when serving ends


def test_non_finite_blend_weight_is_refused_at_load(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    metrics = json.loads((bad / "final" / "metrics.json").read_text())
    (bad / "final" / "metrics.json").write_text(json.dumps({**metrics, "blend_weight": float("nan")}))

    with pytest.raises(DataError, match="blend_weight"):
        load_service(bad, ServeSettings(), cache_dir=run_dir.parent / "cache", offline=True)
