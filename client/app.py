"""The Flower ClientApp: translates messages to and from client/local.py, nothing more.

Replies carry only LoRA tensors (or the noisy item counts of the prior release), scalar metrics
(ε, the public plan, DP-noised evaluation sums; no loss, no user count), a status and the
release's ledger line (mechanism, ε, budget, RNG, policy digest, hashes); no user ids, no item
ids, no base-model tensors.

Where a client's settings and policy come from (its own, never the server's message):
- `fedrec simulate` passes each simulated institution's settings to `make_client_app`;
- a deployed SuperNode sets them in its node config, e.g. `flower-supernode --node-config
  "client-name='hospital-a' epsilon-budget=8.0 state-dir='/var/lib/fedrec' data='/data/a'"`,
  policy keys as in client/policy.py `NODE_KEYS`;
- `flwr run .` on the local simulation federation (no node config beyond partition-id): the
  node config's policy keys over the built-in default policy (ε = 8), never the run config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from fedrec.client.local import (
    ClientJob,
    LocalSettings,
    load_split,
    simulated_clients,
)
from fedrec.client.policy import policy_from_settings
from fedrec.client.secagg import secagg_mod
from fedrec.common import wire
from fedrec.common.assets import default_cache_dir, default_offline
from fedrec.common.config import Config, from_run_config, to_dict
from fedrec.common.data import Dataset, Split, leave_one_out, load_dataset
from fedrec.common.errors import ConfigError, DataError
from fedrec.common.prior import CollaborativePrior
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import package_versions
from fedrec.common.wire import EvalRequest, Reply, RoundRequest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)

SettingsFn = Callable[[Context], tuple[Config, LocalSettings]]
DEFAULT_SIMULATED_BUDGET = 8.0  # `flwr run .` simulated nodes without an epsilon-budget of their own
# What a request that does not parse raises: a missing record or key, a value of the wrong type,
# a WireError (common/wire.py), a prior that does not validate.
MALFORMED = (KeyError, TypeError, ValueError, DataError)

# Per process: the current client's job, and the model and data set every simulated client in
# this process shares (each request loads the global adapter first, so nothing leaks between
# clients). Memory stays flat however many clients one worker serves.
_JOBS: dict[tuple[Any, ...], ClientJob] = {}
_SHARED: dict[tuple[Any, ...], Any] = {}


def make_client_app(settings: SettingsFn | None = None) -> ClientApp:
    """A ClientApp whose clients get their config and local settings from `settings(context)`.

    Each handler parses the request (a malformed one is answered with status bad-request), calls
    the client's job (client/local.py) and wraps its `wire.Reply` in the reply Message."""
    settings = settings or settings_from_context
    app = ClientApp(mods=[secagg_mod])  # SecAgg+ train messages (fed.secagg) pass through it

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        job = _job(*settings(context), context)
        try:
            req, tensors, prior = _round_request(msg), _tensors(msg), _prior(msg, job)
        except MALFORMED as exc:
            return _bad_request(msg, job, exc)
        return _reply(msg, job.train(tensors, req, prior=prior), job.local.name)

    @app.query(wire.action(wire.QUERY_PRIOR))
    def prior(msg: Message, context: Context) -> Message:
        job = _job(*settings(context), context)
        try:
            req = _round_request(msg)
        except MALFORMED as exc:
            return _bad_request(msg, job, exc)
        return _reply(msg, job.prior_counts(req), job.local.name)

    @app.query(wire.action(wire.QUERY_COOCCURRENCE))
    def cooccurrence(msg: Message, context: Context) -> Message:
        job = _job(*settings(context), context)
        try:
            req, head = _round_request(msg), _head(msg)
        except MALFORMED as exc:
            return _bad_request(msg, job, exc)
        return _reply(msg, job.cooccurrence(req, head), job.local.name)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        job = _job(*settings(context), context)
        try:
            req, tensors, prior = _eval_request(msg), _tensors(msg), _prior(msg, job)
        except MALFORMED as exc:
            return _bad_request(msg, job, exc)
        outcome = job.evaluate(tensors, which=req.split, prior=prior, weights=list(req.weights),
                               ks=None if req.ks is None else list(req.ks), run_id=req.run_id, rnd=req.round)
        return _reply(msg, outcome, job.local.name)

    return app


def settings_from_context(context: Context) -> tuple[Config, LocalSettings]:
    """Config from the app's run_config; the client's own settings and policy from its node config."""
    require_pinned_version(context.node_config)
    cfg = from_run_config(context.run_config)
    node = context.node_config
    if "data" not in node and "num-partitions" in node:  # a simulated node of Flower's federation:
        # the data set is split into as many institutions as the federation has SuperNodes
        cfg = replace(cfg, fed=replace(cfg.fed, clients=int(str(node["num-partitions"]))))
    cache_dir = Path(str(node.get("cache-dir", ""))) if node.get("cache-dir") else default_cache_dir()
    if "epsilon-budget" not in node and "partition-id" not in node:
        raise ConfigError("this SuperNode has no epsilon-budget in its node config; a client sets "
                          "its own budget, e.g. --node-config \"epsilon-budget=8.0\"")
    # a simulated node without local settings gets the built-in default policy, not the run's
    defaults = {} if "epsilon-budget" in node else {"epsilon_budget": DEFAULT_SIMULATED_BUDGET}
    policy = policy_from_settings(node, where="node config", defaults=defaults)
    name = str(node.get("client-name", f"client-{node.get('partition-id', 0)}"))
    if "state-dir" in node:
        state_dir = Path(str(node["state-dir"]))
    elif "partition-id" in node:  # a simulated node keeps its state beside the run, as `fedrec simulate`
        state_dir = Path(str(context.run_config.get("output", "runs/flwr"))) / "clients" / name
    else:  # a deployed node without a state-dir: under its working directory, never the server's
        state_dir = Path("fedrec-client-state") / name
    return cfg, LocalSettings.of(name, state_dir, policy, cache_dir, bool(default_offline()))


def require_pinned_version(node: Mapping[str, Any]) -> None:
    """Refuse to run when the institution pinned `fedrec-version` in its settings and the code it
    was sent reports another (server/deployment/scripts.py writes the pin). A guard against an unagreed
    upgrade, not against code that lies about its version (README "Deployment")."""
    pinned = node.get("fedrec-version")
    if not pinned:
        return
    running = package_versions(("fedrec",))["fedrec"]
    if str(pinned) != running:
        raise ConfigError(f"version-conflict: this institution pinned fedrec {pinned} (settings.toml "
                          f"fedrec-version) but the submitted app is fedrec {running}; refused")


def _job(cfg: Config, local: LocalSettings, context: Context) -> ClientJob:
    key = (to_key(cfg), local, context.node_config.get("partition-id"), context.node_config.get("data"))
    job = _JOBS.get(key)
    if job is None:
        model_key = ("model", to_key(cfg.model), to_key(cfg.lora), cfg.train.seed)
        loaded = _shared(model_key, lambda: build_recommender(cfg, cache_dir=local.cache_dir,
                                                              offline=local.offline))
        dataset, split = _client_data(cfg, local, context)
        job = ClientJob(cfg, local, dataset, split, loaded=loaded)
        _JOBS.clear()
        _JOBS[key] = job
    return job


def to_key(section: Any) -> str:
    return repr(sorted(to_dict(section).items()))


def _shared(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """One instance per key and process; a new key replaces the old one of its kind."""
    if key not in _SHARED:
        for old in [k for k in _SHARED if k[0] == key[0]]:
            del _SHARED[old]
        _SHARED[key] = build()
    return _SHARED[key]


def _client_data(cfg: Config, local: LocalSettings, context: Context) -> tuple[Dataset, Split]:
    """A deployed client reads its own files; a simulated one takes its partition of the data set."""
    node = context.node_config
    if "data" in node:
        path = Path(str(node["data"]))
        dataset = load_dataset(path, fmt=cfg.data.format, rating_threshold=cfg.data.rating_threshold)
        return dataset, leave_one_out(dataset)

    def build() -> tuple[Dataset, dict[str, Split]]:
        dataset, split = load_split(cfg, cache_dir=local.cache_dir, offline=local.offline)
        return dataset, simulated_clients(cfg, dataset, split)

    dataset, clients = _shared(("data", to_key(cfg.data), to_key(cfg.fed), cfg.train.seed), build)
    if local.name not in clients:
        names = sorted(clients)
        pid = int(str(node.get("partition-id", -1)))
        if not 0 <= pid < len(names):
            raise ConfigError(f"client {local.name!r} is not one of the {len(names)} partitions")
        return dataset, clients[names[pid]]
    return dataset, clients[local.name]


# --- Message <-> wire records ------------------------------------------------------------------


def _round_request(msg: Message) -> RoundRequest:
    return RoundRequest.from_config(dict(msg.content.config_records[wire.CONFIG]))


def _eval_request(msg: Message) -> EvalRequest:
    return EvalRequest.from_config(dict(msg.content.config_records[wire.CONFIG]))


def _tensors(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content.array_records[wire.ARRAYS].to_torch_state_dict()


def _head(msg: Message) -> np.ndarray:
    return msg.content.array_records[wire.HEAD].to_torch_state_dict()[wire.HEAD].numpy()


def _prior(msg: Message, job: ClientJob) -> CollaborativePrior | None:
    """The global prior a message carries, validated (shape, finite, item indices), or None."""
    record = msg.content.array_records.get(wire.PRIOR)
    if record is None:
        return None
    tensors = {k: v.numpy() for k, v in record.to_torch_state_dict().items()}
    prior = CollaborativePrior.from_tensors(tensors, source="the server's prior")
    if prior.num_items != len(job.dataset.item_ids):
        raise DataError(f"the server's prior has {prior.num_items} items, "
                        f"this catalogue {len(job.dataset.item_ids)}")
    return prior


def _bad_request(msg: Message, job: ClientJob, exc: Exception) -> Message:
    """A request that does not parse is refused with a status, never a crash of the client."""
    reason = f"{job.local.name}: bad {msg.metadata.message_type} message ({exc})"
    return _reply(msg, Reply(wire.BAD_REQUEST, {}, reason=reason), job.local.name)


def _reply(msg: Message, outcome: Reply, name: str) -> Message:
    """The reply Message: the job's wire reply in the records common/wire.py names."""
    content = RecordDict({
        wire.METRICS: MetricRecord(cast(dict[str, MetricRecordValues], outcome.metrics)),
        wire.STATUS: ConfigRecord(cast(dict[str, ConfigRecordValues], outcome.status_record(name))),
    })
    if outcome.tensors:
        content[wire.ARRAYS] = ArrayRecord(torch_state_dict=outcome.tensors)
    if outcome.ledger is not None:  # the whole chained line: hashes are strings, metrics only numbers
        content[wire.LEDGER] = ConfigRecord(outcome.ledger)
    return Message(content=content, reply_to=msg)


app = make_client_app()  # `flwr run .` (pyproject [tool.flwr.app.components])
