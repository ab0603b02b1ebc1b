"""The HTTP service (FastAPI on uvicorn): recommendations, item search, model card, a small web page.

The model runs in one dedicated thread. With micro-batching on, concurrent requests wait in an
asyncio queue for a few milliseconds and go through the user tower in one batch; off, each
request is scored alone (the benchmark's baseline).

Edges: nothing CPU-bound runs on the event loop (requests are resolved on a small thread pool,
scored on the model thread); at most `max_queue` requests wait (503 beyond, with Retry-After);
each API key (or client address, without a key) gets a token bucket of `rate` requests per
second (429 beyond); a non-loopback bind needs an API key unless `--insecure-no-auth` says
otherwise, loudly; the key reaches `--workers` processes as a 0600 file, never an environment
variable; error bodies never echo a value JSON cannot encode (NaN, Infinity).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fedrec.common.errors import ConfigError, RequestError
from fedrec.server.serving.service import Query as ServiceQuery
from fedrec.server.serving.service import RecommenderService, Scored, ServeSettings, load_service
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
SPEC_ENV = "FEDREC_SERVE_SPEC"  # how `--workers N` hands the settings (never the key) to each worker
PAGE = Path(__file__).parent / "static" / "index.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP side: authentication, CORS, micro-batching, request size."""

    api_key: str | None = None  # None: no authentication (local use)
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers at all
    batching: bool = True
    max_batch: int = 32  # requests per pass through the user tower
    batch_wait_ms: float = 5.0  # how long a batch waits for company once the model is free
    max_body_bytes: int = 64 * 1024
    max_queue: int = 256  # requests waiting to be scored; more are answered 503
    rate: float = 20.0  # requests per second per API key (or client address); 0: no limit
    burst: int = 40  # the token bucket's size: a client may send this many at once
    resolve_threads: int = 4  # threads that resolve requests (titles, caps) off the event loop

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; put a non-empty key in the key file or $FEDREC_API_KEY")
        if self.max_batch < 1 or self.batch_wait_ms < 0 or self.max_body_bytes < 1:
            raise ConfigError("max_batch must be >= 1, batch_wait_ms >= 0, max_body_bytes >= 1")
        if self.max_queue < 1 or not math.isfinite(self.rate) or self.rate < 0 or self.burst < 1 \
                or self.resolve_threads < 1:
            raise ConfigError("max_queue, burst and resolve_threads must be >= 1 and rate a finite "
                              "number >= 0")


# --- request and response bodies -------------------------------------------------------------


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[str | int] = Field(default_factory=list, description="item ids or titles, oldest first",
                                     examples=[["Star Wars (1977)", "50"]])
    text: str | None = Field(None, description="the user's own words about their taste (cold start)",
                             examples=["I love 90s sci-fi and dark comedies"])
    k: int = Field(10, description="how many items to return")
    exclude_seen: bool = Field(True, description="leave the history's items out of the ranking")


class ItemOut(BaseModel):
    item_id: str
    title: str


class ReasonOut(ItemOut):
    weight: float = Field(description="this history item's share of the recommended item's score")


class ScoredOut(ItemOut):
    score: float
    because: list[ReasonOut] = Field(
        default_factory=list,
        description="the history items that contributed most (\"because you liked ...\")")


class RecommendResponse(BaseModel):
    items: list[ScoredOut]
    history: list[ItemOut] = Field(description="the history as resolved to catalogue items")


class ItemsResponse(BaseModel):
    items: list[ItemOut]


# --- micro-batching --------------------------------------------------------------------------


class Batcher:
    """Scores queries on the model thread, gathering concurrent ones into one batch when enabled."""

    def __init__(self, service: RecommenderService, settings: HttpSettings) -> None:
        self.service = service
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrec-model")
        self.queue: asyncio.Queue[tuple[ServiceQuery, asyncio.Future[list[Scored]]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.pending = 0  # requests submitted and not answered yet (queued or being scored)

    async def start(self) -> None:
        if self.settings.batching:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, query: ServiceQuery) -> list[Scored]:
        """Score one query; 503 when `max_queue` requests are already waiting."""
        if self.pending >= self.settings.max_queue:
            raise HTTPException(503, f"busy: {self.pending} requests are waiting; retry shortly",
                                headers={"Retry-After": "1"})
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            if not self.settings.batching:
                return (await loop.run_in_executor(self.executor, self.service.recommend, [query]))[0]
            future: asyncio.Future[list[Scored]] = loop.create_future()
            self.queue.put_nowait((query, future))
            return await future
        finally:
            self.pending -= 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.batch_wait_ms / 1000
            while len(batch) < self.settings.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except TimeoutError:
                    break
            live = [(q, f) for q, f in batch if not f.done()]  # a client that left needs no answer
            if not live:
                continue
            try:
                queries = [q for q, _ in live]
                results = await loop.run_in_executor(self.executor, self.service.recommend, queries)
            except Exception as exc:  # noqa: BLE001 - the waiting requests get the error, the loop lives on
                log.exception("scoring a batch of %d failed", len(live))
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), result in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(result)


# --- rate limit ------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per caller (API key, or client address without one): `rate` tokens a
    second up to `burst`; a request takes one or is answered 429. Thread-safe; at most
    `max_callers` buckets are kept (the longest idle is dropped first)."""

    def __init__(self, rate: float, burst: int, *, max_callers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_callers, self.clock = rate, float(burst), max_callers, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last time)
        self._lock = threading.Lock()

    def wait_time(self, caller: str) -> float:
        """0 if `caller` may go now (a token is taken), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.pop(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[caller] = (tokens - 1 if wait == 0 else tokens, now)  # most recent last
            while len(self._buckets) > self.max_callers:
                del self._buckets[next(iter(self._buckets))]
            return wait


# --- the request size limit ------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """Rejects request bodies over `max_bytes` with 413 before the app reads them (ASGI middleware)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # no length announced (chunked): read up to the limit, then replay what was read
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {"detail": f"body: request body over {self.max_bytes} bytes", "field": "body"}
        await JSONResponse(body, status_code=413)(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------


def create_app(service: RecommenderService, settings: HttpSettings) -> FastAPI:
    """The FastAPI app over a loaded service; OpenAPI docs at /docs."""
    batcher = Batcher(service, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="fedrec", summary="Recommendations from a federated, DP-trained LoRA recommender",
                  version="0.1.0", lifespan=lifespan)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=[API_KEY_HEADER, "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _error_handlers(app)
    if settings.api_key is None:
        log.warning("API key authentication is off (local use); set $FEDREC_API_KEY or --api-key-file "
                    "before exposing this server")
    resolver = ThreadPoolExecutor(max_workers=settings.resolve_threads, thread_name_prefix="fedrec-resolve")
    auth = [Depends(_auth(settings.api_key)), Depends(_limit(RateLimiter(settings.rate, settings.burst)))]
    _routes(app, service, batcher, settings, auth, resolver)
    return app


def _routes(
    app: FastAPI, service: RecommenderService, batcher: Batcher, settings: HttpSettings, auth: list[Any],
    resolver: ThreadPoolExecutor,
) -> None:
    async def off_loop(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(resolver, lambda: fn(**kwargs))

    @app.post("/recommend", response_model=RecommendResponse, dependencies=auth)
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        """Top K over the whole catalogue for a history (ids or titles), a text, or both."""
        query = await off_loop(service.query, history=body.history, text=body.text, k=body.k,
                               exclude_seen=body.exclude_seen)
        items = await batcher.submit(query)
        return RecommendResponse(items=[ScoredOut(**asdict(s)) for s in items],
                                 history=[_item(service, row) for row in query.history])

    @app.get("/items", response_model=ItemsResponse, dependencies=auth)
    async def items(query: str = Query("", max_length=200, description="words of the title"),
                    limit: int = Query(20, ge=1, le=200)) -> ItemsResponse:
        """Catalogue items whose title contains every word of `query`."""
        rows = await off_loop(service.search, query=query, limit=limit)
        return ItemsResponse(items=[_item(service, row) for row in rows])

    @app.get("/model", dependencies=auth)
    async def model() -> dict[str, Any]:
        """The served model: base model, adapter checksum, rounds, data set, ε per party (no local
        paths, no test metrics: those were computed without DP on the institutions' test users)."""
        limits = {k: v for k, v in asdict(service.settings).items() if k.startswith("max_")}
        return {**public_info(service.info), "limits": limits,
                "batching": {"enabled": settings.batching, "max_batch": settings.max_batch,
                             "wait_ms": settings.batch_wait_ms, "encode_batch": service.encode_batch},
                "rate_limit": {"per_second": settings.rate, "burst": settings.burst}}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "items": service.num_items}

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """The model card without what it must not publish: local paths (run directory, model and
    data set locations) and metrics measured on users' data without DP (test metrics)."""
    out = {k: v for k, v in info.items() if k not in ("run_dir", "test_metrics")}
    out["run"] = Path(str(info.get("run_dir", ""))).name
    if "base_source" in out:
        out["base_source"] = _no_path(out["base_source"])
    if isinstance(out.get("dataset"), dict):
        out["dataset"] = {**out["dataset"], "source": _no_path(out["dataset"].get("source"))}
    return out


def _no_path(value: Any) -> Any:
    text = str(value)
    return Path(text).name if isinstance(value, str) and ("/" in text or "\\" in text) else value


def _item(service: RecommenderService, row: int) -> ItemOut:
    return ItemOut(item_id=service.dataset.item_ids[row], title=service.dataset.item_titles[row])


def _auth(key: str | None) -> Callable[..., Awaitable[None]]:
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's API key")

    async def check(given: str | None = Security(header)) -> None:
        if key is None:
            return
        if not given:
            raise HTTPException(401, f"missing API key: send it in the {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": "ApiKey"})
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, f"wrong API key in the {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": "ApiKey"})

    return check


def _limit(limiter: RateLimiter) -> Callable[..., Awaitable[None]]:
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    async def check(request: Request, given: str | None = Security(header)) -> None:
        # keyed by the API key when one is sent (after _auth checked it), else by address
        caller = f"key:{given}" if given else f"addr:{request.client.host if request.client else '?'}"
        wait = limiter.wait_time(caller)
        if wait > 0:
            raise HTTPException(429, f"rate limit: at most {limiter.rate:g} requests per second; retry in "
                                f"{wait:.2f} s", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    return check


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        field = _field(errors[0].get("loc", ())) if errors else "body"
        message = errors[0].get("msg", "invalid request") if errors else "invalid request"
        # never echo the input: it may be NaN or Infinity (which JSON cannot carry) or 60 KB long
        shown = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors[:10]]
        return JSONResponse({"detail": f"{field}: {message}", "field": field,
                             "errors": _finite(jsonable_encoder(shown, custom_encoder={Exception: str}))},
                            status_code=422)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by its name, so that JSON can carry it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _field(loc: Any) -> str:
    """("body", "history", 2, "str") -> "history[2]"; ("query", "limit") -> "limit"; ("body", 9) -> "body"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query") and len(parts) > 1:
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):  # what follows names a type of the union, not a field
            return f"{out}[{part}]" if out else "body"  # a bare int: a position in malformed JSON
        out = f"{out}.{part}" if out else str(part)
    return out or "body"


# --- running it ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSpec:
    """Everything a worker process needs to build the app. `--workers N` sends it through
    $FEDREC_SERVE_SPEC without the key: `api_key_file` names a 0600 file that holds it."""

    run_dir: str
    cache_dir: str
    offline: bool
    serve: dict[str, Any]
    http: dict[str, Any]
    api_key_file: str | None = None

    def build(self) -> FastAPI:
        http = {**self.http, "cors_origins": tuple(self.http["cors_origins"])}
        if self.api_key_file is not None:
            http["api_key"] = Path(self.api_key_file).read_text(encoding="utf-8").strip()
        service = load_service(Path(self.run_dir), ServeSettings(**self.serve),
                               cache_dir=Path(self.cache_dir), offline=self.offline)
        return create_app(service, HttpSettings(**http))


def app_from_env() -> FastAPI:
    """uvicorn's factory for `--workers N`: each worker loads the run itself."""
    return ServeSpec(**json.loads(os.environ[SPEC_ENV])).build()


def check_bind(host: str, *, has_key: bool, insecure_no_auth: bool) -> None:
    """A non-loopback interface needs an API key, unless the operator overrides it knowingly."""
    if has_key or host in LOOPBACK:
        return
    if not insecure_no_auth:
        raise ConfigError(f"--host {host} is not loopback and no API key is set: anyone who reaches the "
                          "port could query the model. Give --api-key-file (or $FEDREC_API_KEY), or pass "
                          "--insecure-no-auth to serve without authentication")
    log.warning("!!! --insecure-no-auth: listening on %s WITHOUT authentication; anyone who can reach "
                "this port can query the model !!!", host)


def run(spec: ServeSpec, *, host: str, port: int, workers: int = 1, insecure_no_auth: bool = False) -> None:
    """Serve until interrupted (one process, or `workers` processes that each load the model)."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"--workers {workers} must be >= 1")
    check_bind(host, has_key=spec.http.get("api_key") is not None, insecure_no_auth=insecure_no_auth)
    if workers == 1:
        uvicorn.run(spec.build(), host=host, port=port, log_level="info")
        return
    key = spec.http.get("api_key")
    with tempfile.TemporaryDirectory(prefix="fedrec-serve-") as private:  # mode 0700
        key_file = None
        if key is not None:
            key_file = Path(private) / "api-key"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(key)
        shared = ServeSpec(spec.run_dir, spec.cache_dir, spec.offline, spec.serve,
                           {**spec.http, "api_key": None}, str(key_file) if key_file else None)
        os.environ[SPEC_ENV] = json.dumps(asdict(shared))
        uvicorn.run("fedrec.server.serving.http:app_from_env", factory=True, host=host, port=port,
                    workers=workers, log_level="info")
