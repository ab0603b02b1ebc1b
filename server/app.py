"""The Flower ServerApp: rounds of DP training at the clients, aggregation, evaluation, checkpoints.

The round loop is ours (Flower's `Strategy.start` cannot resume); configuration and aggregation
are Flower's strategies (server/strategy.py). Every round ends with a checkpoint that holds
everything needed to resume: the global adapter, the strategy's state, the prior counts, and
the run's history (rounds and the ledger lines the clients reported). A resumed run keeps the
same run id, so a client asked again for a round it already answered re-sends its stored reply
instead of spending budget twice (client/state.py).

Faults: a round waits for every client, or for `fed.min_clients` of them after `fed.join_wait`
seconds, and aggregates only if at least that quorum answered. With `fed.secagg` the round runs
under SecAgg+ (server/secagg.py) and the server sees only the weighted mean of the adapters.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedrec.client.secagg import LEDGER
from fedrec.common.config import Config, from_run_config, to_dict
from fedrec.common.errors import AdapterError, ConfigError, DataError
from fedrec.common.evaluation import BLEND_WEIGHTS, lead_z
from fedrec.common.lora import save_adapter, tensors_digest, validate_adapter
from fedrec.common.prior import (
    MECHANISM_COOCCURRENCE,
    MECHANISM_POPULARITY,
    PRIOR_FILE,
    CollaborativePrior,
    head_items,
    load_prior,
    save_prior,
)
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import RunDir
from fedrec.server.secagg import secagg_round
from fedrec.server.strategy import (
    aggregate,
    load_strategy_state,
    make_strategy,
    strategy_state,
    to_record,
    weight_key,
)
from fedrec.server.validation import Identities, check_client_name, check_eval_metrics, check_release
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
FAILED = "failed.json"  # written when the run stops because no client trained in a round


@dataclass
class ServerState:
    """What a checkpoint holds besides tensors."""

    run_id: str
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per round
    ledgers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # client -> lines
    prior: CollaborativePrior | None = None  # the clients' summed prior releases
    identities: Identities = field(default_factory=Identities)  # name <-> node id (not checkpointed)


@dataclass(frozen=True)
class Reply:
    client: str
    status: str
    reason: str
    metrics: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    bytes_up: int
    ledger: dict[str, Any] | None = None  # the client's chained ledger line for this release


def run_server(
    grid: Grid, cfg: Config, out: Path, *, num_clients: int, resume: bool, cache_dir: Path,
    offline: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the federated rounds; write the run directory; return final metrics."""
    run = RunDir(out)
    state = _start_or_resume(run, cfg, resume)
    (run.root / FAILED).unlink(missing_ok=True)
    loaded = build_recommender(cfg, cache_dir=cache_dir, offline=offline)
    initial = loaded.initial_adapter
    trainable_keys = sorted(k for k in initial if cfg.lora.variant != "ffa" or "lora_B" in k)
    spec = {k: (tuple(initial[k].shape), initial[k].dtype) for k in trainable_keys}
    strategy = make_strategy(cfg, num_clients=quorum(cfg, num_clients))
    current = {k: initial[k] for k in trainable_keys}
    if state.round > 0:
        current, strategy_tensors = _load_checkpoint_tensors(run.root, state.round)
        load_strategy_state(strategy, strategy_tensors)
        log.info("resuming run %s after round %d", state.run_id, state.round)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.base.model.parameters())
    adapter_bytes = sum(t.numel() * t.element_size() for t in current.values())

    if cfg.prior.enabled and state.prior is None:
        state.prior = _prior_release(grid, cfg, state, num_clients)
        _write_records(run, state)

    for rnd in range(state.round + 1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        config = ConfigRecord({
            "run-id": state.run_id, "num-rounds": cfg.fed.rounds, "local-epochs": cfg.fed.local_epochs,
            "lr": cfg.train.lr,
        })
        nodes = _nodes(grid, cfg, num_clients)  # all clients, or the quorum after fed.join_wait
        if cfg.fed.secagg:
            replies, failures, merged, bytes_down = _secure_round(grid, cfg, strategy, rnd, current,
                                                                  config, nodes, spec, num_clients,
                                                                  identities=state.identities)
        else:
            replies, failures, merged = _plain_round(grid, cfg, strategy, rnd, current, config, spec,
                                                     num_clients, state.prior, identities=state.identities)
            bytes_down = adapter_bytes
        trained = [r for r in replies if r.status == "ok"]
        if not trained:
            return _no_client_trained(run, rnd, replies, failures)
        if merged is not None:
            current = {k: merged[k].to(initial[k].dtype) for k in trainable_keys}
        for r in trained:
            if r.ledger is not None or "ledger.epsilon" in r.metrics:
                state.ledgers.setdefault(r.client, []).append(
                    _ledger_line(rnd, "dp-sgd", r, cfg.privacy.accountant))
        if rnd % cfg.fed.eval_every == 0 or rnd == cfg.fed.rounds:
            evaluation = _evaluate(grid, cfg, current, state, which="valid", num_clients=num_clients, rnd=rnd)
        else:
            evaluation = {"users": 0.0, "betas": [], "metrics": {}, "skipped": True}
        record = {
            "round": rnd, "clients_ok": len(trained),
            "clients_refused": sorted(r.client for r in replies if r.status != "ok"),  # any refusal
            "clients_failed": failures, "aggregated": merged is not None,
            "loss": _mean([r.metrics["loss"] for r in trained if "loss" in r.metrics]),  # clients send none
            "valid": evaluation, "epsilon": {r.client: r.metrics.get("epsilon", 0.0) for r in replies},
            "bytes_up_per_client": _mean([r.bytes_up for r in trained]),
            "bytes_down_per_client": bytes_down, "model_bytes": model_bytes, "secagg": cfg.fed.secagg,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        for r in replies:
            if r.status != "ok":
                log.warning("round %d: %s %s: %s", rnd, r.client, r.status, r.reason)
        state.history.append(record)
        state.round = rnd
        _checkpoint(run.root, state, current, strategy_state(strategy))
        _write_records(run, state)
        _progress(record, cfg)

    final = _finish(run, grid, cfg, state, current, initial, num_clients)
    from fedrec.server.report import write_reports

    write_reports(run.root, cfg)
    return final


# --- rounds ----------------------------------------------------------------------------------


Merged = dict[str, torch.Tensor] | None


def _plain_round(
    grid: Grid, cfg: Config, strategy: Strategy, rnd: int, current: Mapping[str, torch.Tensor],
    config: ConfigRecord, spec: Mapping[str, Any], num_clients: int, prior: CollaborativePrior | None,
    *, identities: Identities,
) -> tuple[list[Reply], list[str], Merged]:
    """Every client's adapter reaches the server; the strategy aggregates those that trained."""
    messages = list(strategy.configure_train(rnd, to_record(current), config, grid))
    if prior is not None:  # the clients train the LLM on the residual of this prior's CF score
        for m in messages:
            m.content["prior"] = prior_record(prior)
    raw = list(grid.send_and_receive(messages, timeout=cfg.fed.timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set by the push
    pairs, failures = _parse(raw, spec, rnd, sent=sent, identities=identities)
    replies = [r for _, r in pairs]
    ok_messages = [m for m, r in pairs if r.status == "ok"]
    if not _enough(cfg, rnd, len(replies), num_clients) or not ok_messages:
        return replies, failures, None
    return replies, failures, aggregate(strategy, rnd, ok_messages)


def _secure_round(
    grid: Grid, cfg: Config, strategy: Strategy, rnd: int, current: Mapping[str, torch.Tensor],
    config: ConfigRecord, nodes: Sequence[int], spec: Mapping[str, Any], num_clients: int,
    *, identities: Identities,
) -> tuple[list[Reply], list[str], Merged, int]:
    """SecAgg+: the server unmasks only the weighted mean, then applies the strategy's update to it."""
    if cfg.fed.strategy == "fedprox":  # what FedProx.configure_train would have added
        config = ConfigRecord({**dict(config), "proximal-mu": cfg.fed.proximal_mu})
    result = secagg_round(grid, cfg, rnd, current, config, nodes, weight_key(cfg))
    up = result.bytes_up // max(1, len(result.replies))
    failures = list(result.failures)
    named = [(nid, m) for nid, m in result.replies
             if not _refused_identity(identities, m.get("client", f"node-{nid}"), nid, failures, rnd)]
    replies = [Reply(str(m.get("client", f"node-{nid}")), str(m.get("status", "ok")),
                     str(m.get("reason", "")), {k: v for k, v in m.items() if isinstance(v, int | float)},
                     {}, up, json.loads(str(m[LEDGER])) if LEDGER in m else None)
               for nid, m in named]
    if result.mean is None or not _enough(cfg, rnd, len(replies), num_clients):
        return replies, failures, None, result.bytes_down // max(1, len(nodes))
    try:
        validate_adapter(result.mean, spec, source="the secure aggregate")
    except AdapterError as exc:
        failures.append(str(exc))
        return replies, failures, None, result.bytes_down // max(1, len(nodes))
    weight = MetricRecord({"num-examples": 1.0, "uniform": 1.0})  # one "reply": the mean itself
    mean = Message(RecordDict({"arrays": to_record(result.mean), "metrics": weight}),
                   dst_node_id=0, message_type=MessageType.TRAIN)
    return replies, failures, aggregate(strategy, rnd, [mean]), result.bytes_down // max(1, len(nodes))


def _no_client_trained(run: RunDir, rnd: int, replies: Sequence[Reply], failures: Sequence[str]
                       ) -> dict[str, Any]:
    """Stop the run with one line saying why: nothing was trained, so there is nothing to serve."""
    why = [f"{r.client}: {r.status} ({r.reason})" for r in replies] + list(failures)
    reason = (f"round {rnd}: no client trained ({len(replies)} refused, {len(failures)} failed): "
              + ("; ".join(why)[:600] or "no replies"))
    log.error("%s", reason)
    run.write_json(FAILED, {"round": rnd, "reason": reason})
    return {"failed": reason}


def _enough(cfg: Config, rnd: int, answered: int, num_clients: int) -> bool:
    """A round aggregates only if at least the quorum of clients answered (trained or refused)."""
    need = quorum(cfg, num_clients)
    if answered < need:
        log.warning("round %d: %d of the %d clients needed answered; the global adapter is unchanged",
                    rnd, answered, need)
    return answered >= need


def _prior_release(grid: Grid, cfg: Config, state: ServerState,
                   num_clients: int) -> CollaborativePrior | None:
    """Round 0, once: every client releases noisy popularity; the server sums it, picks the head
    (the most popular items by noisy count: post-processing), and every client releases its noisy
    co-occurrence over that head; the sums are the global prior."""
    config = ConfigRecord({"run-id": state.run_id, "server-round": 0, "num-rounds": cfg.fed.rounds,
                           "local-epochs": cfg.fed.local_epochs, "lr": cfg.train.lr})
    replies = _query(grid, cfg, num_clients, "query.prior", RecordDict({"config": config}), state.identities)
    popularity, _ = _sum_releases(replies, "counts", MECHANISM_POPULARITY, state, cfg)
    if popularity is None:
        return None
    head = head_items(popularity, cfg.prior.head_size)
    if not cfg.prior.cooccurrence:
        return CollaborativePrior(popularity, np.empty(0, np.int64), None)
    content = RecordDict({"config": config,
                          "head": ArrayRecord(torch_state_dict={"head": torch.from_numpy(head)})})
    replies = _query(grid, cfg, num_clients, "query.cooccurrence", content, state.identities)
    matrix, noise_std = _sum_releases(replies, "cooccurrence", MECHANISM_COOCCURRENCE, state, cfg,
                                      shape=(len(head),) * 2)
    return CollaborativePrior(popularity, head, matrix, noise_std) if matrix is not None else \
        CollaborativePrior(popularity, np.empty(0, np.int64), None)


def _query(grid: Grid, cfg: Config, num_clients: int, message_type: str, content: RecordDict,
           identities: Identities) -> list[Reply]:
    messages = [Message(content, dst_node_id=n, message_type=message_type) for n in _nodes(grid, cfg,
                                                                                           num_clients)]
    pairs, _ = _parse(list(grid.send_and_receive(messages, timeout=cfg.fed.timeout)), None, 0,
                      identities=identities)
    return [r for _, r in pairs]


def _sum_releases(replies: Sequence[Reply], key: str, mechanism: str, state: ServerState, cfg: Config,
                  shape: tuple[int, ...] | None = None) -> tuple[np.ndarray | None, float]:
    """Σ over clients of one released statistic, and the per-entry std of its noise (√Σ (σ·clip)²,
    from the ledger lines); a reply of the wrong shape or non-finite is dropped."""
    total: np.ndarray | None = None
    variance = 0.0
    for r in replies:
        if r.status != "ok":
            log.warning("%s release: %s %s: %s", mechanism, r.client, r.status, r.reason)
            continue
        value = r.tensors.get(key)
        array = value.numpy().astype(np.float64) if value is not None else None
        expected = shape if shape is not None else (total.shape if total is not None else None)
        line = _ledger_line(0, mechanism, r, cfg.privacy.accountant)
        problem = check_release(array, key=key, shape=expected, line=line, ndim=len(shape) if shape else 1)
        if problem is not None or array is None:  # server/validation.py: shape, finite, bounded
            log.warning("%s release: %s failed: %s; left out of the sum", mechanism, r.client, problem)
            continue
        total = array if total is None else total + array
        variance += _noise_std(line) ** 2
        state.ledgers.setdefault(r.client, []).append(line)
    return total, math.sqrt(variance)


def _noise_std(line: Mapping[str, Any]) -> float:
    """σ·clip of a release from its ledger line (0 when the line does not say: only the scorer's
    shrinkage depends on it, not any privacy claim)."""
    try:
        std = float(line["noise_multiplier"]) * float(line["clip_norm"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return std if math.isfinite(std) and std >= 0 else 0.0


def prior_record(prior: CollaborativePrior) -> ArrayRecord:
    """The prior as a message record (popularity, head, co-occurrence tensors)."""
    return ArrayRecord(torch_state_dict={k: torch.from_numpy(v) for k, v in prior.tensors().items()})


def _evaluate(
    grid: Grid, cfg: Config, current: Mapping[str, torch.Tensor], state: ServerState, *, which: str,
    num_clients: int, betas: Sequence[float] | None = None, rnd: int | None = None,
) -> dict[str, Any]:
    """Federated evaluation: each client scores its own users; means weighted by user count."""
    if betas is None:
        tuned = BLEND_WEIGHTS if cfg.prior.tune_weight else (cfg.prior.weight,)
        betas = tuned if state.prior is not None else ()
    config = ConfigRecord({"split": which, "run-id": state.run_id,
                           "server-round": state.round if rnd is None else rnd})
    if betas:
        config["weights"] = [float(b) for b in betas]
    content = RecordDict({"arrays": to_record(current), "config": config})
    if state.prior is not None:
        content["prior"] = prior_record(state.prior)
    messages = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in _nodes(grid, cfg, num_clients)]
    pairs, _ = _parse(list(grid.send_and_receive(messages, timeout=cfg.fed.timeout)), None, -1,
                      identities=state.identities)
    replies = [r for _, r in pairs]
    for r in replies:  # an evaluation a client answers is a DP release: its ledger line is kept
        if r.status == "ok" and r.ledger is not None:
            _keep_ledger_line(state, r.client, r.ledger)
    sums: dict[str, np.ndarray] = {}
    users = 0.0
    for r in replies:
        if r.status == "ok" and (problem := check_eval_metrics(r.metrics, expected_len=len(betas) or 1)):
            log.warning("%s evaluation: %s failed: %s; left out of the mean", which, r.client, problem)
            continue
        n = float(r.metrics.get("num-examples", 0.0))
        if r.status != "ok" or n == 0:
            continue
        users += n
        for key, value in r.metrics.items():
            if key.startswith(("hr@", "ndcg@", "mrr@")):
                sums[key] = sums.get(key, 0.0) + n * np.asarray(value, dtype=np.float64)
    metrics = {k: (v / users).tolist() for k, v in sums.items()} if users else {}
    return {"users": users, "betas": list(betas) or [0.0], "metrics": metrics}


def _keep_ledger_line(state: ServerState, client: str, line: Mapping[str, Any]) -> None:
    """Append a client's ledger line to the server's copy once (a replayed reply re-sends it)."""
    lines = state.ledgers.setdefault(client, [])
    if not any(x.get("entry_sha256") == line.get("entry_sha256") for x in lines if "entry_sha256" in line):
        lines.append(dict(line))


def _best(evaluation: Mapping[str, Any], key: str) -> tuple[int, float]:
    values = evaluation["metrics"].get(key)
    if not values:
        return 0, 0.0
    i = int(np.argmax(values))
    return i, float(values[i])


def validation_noise(ledgers: Mapping[str, Sequence[Mapping[str, Any]]], rnd: int,
                     evaluation: Mapping[str, Any]) -> float:
    """Std of the noise on one pooled validation metric of round `rnd`: each client released its
    metric sums with N(0, (σ√d)²) per entry (client/local.py noisy_metrics; d = 1 + the number of
    values), so the user-weighted mean carries √Σ(σ_c√d)² / users. 0 when nothing says so."""
    values = sum(len(v) for v in evaluation.get("metrics", {}).values())
    variance = 0.0
    for lines in ledgers.values():
        for line in lines:
            if (line.get("mechanism"), line.get("split"), line.get("round")) == ("dp-eval", "valid", rnd):
                try:
                    variance += float(line["noise_multiplier"]) ** 2 * (1 + values)
                except (KeyError, TypeError, ValueError):
                    continue
    users = float(evaluation.get("users", 0.0))
    return math.sqrt(variance) / users if users > 0 and math.isfinite(variance) else 0.0


def choose_released_weight(evaluation: Mapping[str, Any], key: str, noise: float) -> float:
    """The blend weight with the best released (noisy) validation `key`, unless its lead over CF
    alone (w = 0) is within the noise (`lead_z` std of a difference of two noisy means; the
    central runs' `common.evaluation.choose_weight` applies the same z to the sampling noise)."""
    values, betas = evaluation["metrics"].get(key), list(evaluation.get("betas", []))
    if not values or not betas:
        return 0.0
    i, best = _best(evaluation, key)
    base = values[betas.index(0.0)] if 0.0 in betas else None
    if base is not None and best - base <= lead_z(betas) * math.sqrt(2.0) * noise:
        return 0.0
    return float(betas[i])


def test_weights(weight: float) -> list[float]:
    """The blend weights of the test evaluation: the chosen w, then CF alone (w = 0); w = 0 is
    asked once (a client refuses a repeated weight, which left the test metrics empty)."""
    return [weight, 0.0] if weight != 0.0 else [0.0]


def _finish(
    run: RunDir, grid: Grid, cfg: Config, state: ServerState, current: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor], num_clients: int,
) -> dict[str, Any]:
    """Test metrics at the blend weight chosen on the last validation, the full adapter, the report."""
    key = f"ndcg@{cfg.eval.ks[0]}"
    evaluated = [r for r in state.history if r["valid"]["metrics"]]
    last_valid: dict[str, Any] = evaluated[-1]["valid"] if evaluated else {"metrics": {}, "betas": []}
    noise = validation_noise(state.ledgers, evaluated[-1]["round"], last_valid) if evaluated else 0.0
    weight = choose_released_weight(last_valid, key, noise)
    if state.prior is not None:  # the blend and CF alone (w = 0) in one pass, then the LLM alone
        test = _evaluate(grid, cfg, current, state, which="test", num_clients=num_clients,
                         betas=test_weights(weight))
        alone = _evaluate(grid, cfg, current, replace(state, prior=None), which="test",
                          num_clients=num_clients)
        final: dict[str, Any] = {
            "test": {k: v[0] for k, v in test["metrics"].items()},
            "test_cf_only": {k: v[-1] for k, v in test["metrics"].items()},
            "test_llm_only": {k: v[0] for k, v in alone["metrics"].items()},
            "blend_weight": weight, "cf": {"beta": cfg.prior.beta, "shrink": cfg.prior.shrink},
        }
    else:
        test = _evaluate(grid, cfg, current, state, which="test", num_clients=num_clients)
        final = {"test": {k: v[0] for k, v in test["metrics"].items()}, "blend_weight": None}
    final |= {"test_users": test["users"], "rounds": state.round}
    full = {**initial, **current}
    save_adapter(run.root / "final" / "adapter.safetensors", full,
                 {"run_id": state.run_id, "rounds": str(state.round), "variant": cfg.lora.variant})
    if state.prior is not None:
        save_prior(run.root / "final", state.prior)
    run.write_json("final/metrics.json", final)
    _write_records(run, state)  # the test evaluation's ledger lines
    return final


# --- replies ---------------------------------------------------------------------------------


def _parse(
    raw: Sequence[Message], spec: Mapping[str, Any] | None, rnd: int, *,
    sent: Mapping[str, int] | None = None, identities: Identities | None = None,
) -> tuple[list[tuple[Message, Reply]], list[str]]:
    """Replies that carry content, their names and tensors validated; failures (errors, bad
    names, impersonation, bad tensors) named.

    `sent` (message id -> destination node) names the node of an error the SuperLink wrote on
    its behalf (e.g. "Node Unavailable"), whose source is the SuperLink itself. `identities` binds
    each client name to the node that first used it (server/validation.py).
    """
    replies: list[tuple[Message, Reply]] = []
    failures: list[str] = []
    for msg in raw:
        if msg.has_error():
            node = (sent or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            failures.append(f"node {node}: {msg.error.reason}")
            log.warning("round %d: node %d failed: %s", rnd, node, msg.error.reason)
            continue
        c = msg.content
        status = c.config_records.get("status", ConfigRecord({"status": "ok"}))
        client = status.get("client", f"node-{msg.metadata.src_node_id}")
        if _refused_identity(identities or Identities(), client, msg.metadata.src_node_id, failures, rnd):
            continue
        assert isinstance(client, str)
        metrics = dict(c.metric_records.get("metrics", {}))
        tensors: dict[str, torch.Tensor] = {}
        size = 0
        if "arrays" in c.array_records:
            record = c.array_records["arrays"]
            size = record.count_bytes()
            tensors = record.to_torch_state_dict()
            if spec is not None:
                try:
                    validate_adapter(tensors, spec, source=client)
                except AdapterError as exc:
                    failures.append(f"{client}: {exc}")
                    log.warning("round %d: rejected the adapter of %s: %s", rnd, client, exc)
                    continue
        ledger = dict(c.config_records["ledger"]) if "ledger" in c.config_records else None
        if ledger is not None and ledger.get("adapter_sha256") != tensors_digest(tensors):
            failures.append(f"{client}: the released tensors do not match the digest in its ledger line")
            log.warning("round %d: %s sent tensors that do not match its ledger line", rnd, client)
            continue
        replies.append((msg, Reply(client, str(status.get("status", "ok")), str(status.get("reason", "")),
                                   metrics, tensors, size, ledger)))
    return replies, failures


def _refused_identity(identities: Identities, client: Any, node: int, failures: list[str], rnd: int) -> bool:
    """Whether `client` (as node `node` names itself) is refused; the reason joins `failures`."""
    problem = identities.claim(client, node)
    if problem is not None:
        failures.append(problem)
        log.warning("round %d: %s", rnd, problem)
    return problem is not None


def _ledger_line(rnd: int, mechanism: str, reply: Reply, accountant: str) -> dict[str, Any]:
    """The server's copy of a client's ledger line: the chained line the client sent, verbatim,
    or (a client without ledger chains) what it reported in its "ledger.*" metrics."""
    if reply.ledger is not None:
        return dict(reply.ledger)
    line = {k.removeprefix("ledger."): v for k, v in reply.metrics.items() if k.startswith("ledger.")}
    line["steps"] = int(line.get("steps", 0))
    return {"round": rnd, "mechanism": mechanism, "accountant": accountant, **line}


def quorum(cfg: Config, num_clients: int) -> int:
    """How many clients a round needs: fed.min_clients (capped at num_clients), else all."""
    return min(cfg.fed.min_clients or num_clients, num_clients)


def _nodes(grid: Grid, cfg: Config, num_clients: int) -> list[int]:
    """The connected nodes: all num_clients, or at least the quorum once fed.join_wait has passed."""
    need, start = quorum(cfg, num_clients), time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        waited = time.monotonic() - start
        if len(nodes) >= num_clients or (len(nodes) >= need and waited >= cfg.fed.join_wait):
            if len(nodes) < num_clients:
                log.warning("going ahead with %d of %d clients (fed.min_clients=%d) after %.0f s",
                            len(nodes), num_clients, need, waited)
            return nodes
        log.info("waiting for clients: %d of %d connected", len(nodes), num_clients)
        time.sleep(1)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _progress(record: Mapping[str, Any], cfg: Config) -> None:
    key = f"ndcg@{cfg.eval.ks[0]}"
    _, best = _best(record["valid"], key)
    eps = record["epsilon"]
    # clients report no training loss (not a release), and they release their validation metrics
    # under their own policy (DP-noised by default): the line says so rather than print a loss of 0
    log.info("round %d/%d: %d clients trained, %d refused, %d failed; valid %s as released %.4f; "
             "ε max %.3f; %.1f s", record["round"], cfg.fed.rounds, record["clients_ok"],
             len(record["clients_refused"]), len(record["clients_failed"]), key, best,
             max(eps.values()) if eps else 0.0, record["seconds"])


# --- checkpoints -----------------------------------------------------------------------------


def _start_or_resume(run: RunDir, cfg: Config, resume: bool) -> ServerState:
    ckpt = run.root / "checkpoints"
    settings = to_dict(cfg)
    started = (run.root / "run.json").exists()
    if started and not resume:
        raise ConfigError(f"{run.root} already holds a run; pass --resume to continue it or choose "
                          "another --output")
    if not started:
        state = ServerState(run_id=uuid.uuid4().hex[:12])
        run.write_json("run.json", {"run_id": state.run_id, "settings": settings})
        return state
    recorded = json.loads((run.root / "run.json").read_text())
    if recorded["settings"] != settings:
        diff = _first_difference(recorded["settings"], settings)
        raise ConfigError(f"{run.root} was started with different settings ({diff}); resume it with "
                          "the same config")
    for rnd in _checkpoint_rounds(ckpt):  # newest first; a torn one falls back to the one before
        try:
            state = _read_state(ckpt / f"round-{rnd}", recorded["run_id"])
            if rnd > 0:
                _load_checkpoint_tensors(run.root, rnd)
            return state
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("checkpoint round-%d is damaged (%s); falling back to the one before", rnd, exc)
    return ServerState(run_id=recorded["run_id"])


def _checkpoint_rounds(ckpt: Path) -> list[int]:
    rounds = [int(p.name.split("-")[1]) for p in ckpt.glob("round-*")
              if p.name.split("-")[1].isdigit() and (p / "server.json").is_file()]
    return sorted(rounds, reverse=True)


def _read_state(path: Path, run_id: str) -> ServerState:
    doc = json.loads((path / "server.json").read_text())
    if not isinstance(doc, dict) or doc.get("run_id", run_id) != run_id or doc["round"] != int(
            path.name.split("-")[1]):
        raise ValueError(f"{path / 'server.json'} is not this run's checkpoint of its round")
    prior = load_prior(path / PRIOR_FILE) if (path / PRIOR_FILE).is_file() else None
    return ServerState(run_id=run_id, round=doc["round"], history=doc["history"], ledgers=doc["ledgers"],
                       prior=prior)


def _checkpoint(root: Path, state: ServerState, current: Mapping[str, torch.Tensor],
                strategy_tensors: Mapping[str, torch.Tensor]) -> None:
    """checkpoints/round-<n>/ written to a temporary folder, then renamed (atomic)."""
    final = root / "checkpoints" / f"round-{state.round}"
    tmp = root / "checkpoints" / f".round-{state.round}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in current.items()}, str(tmp / "adapter.safetensors"))
    save_file({k: v.contiguous() for k, v in strategy_tensors.items()} or {"none": torch.zeros(1)},
              str(tmp / "strategy.safetensors"))
    if state.prior is not None:
        save_prior(tmp, state.prior)
    doc = {"round": state.round, "run_id": state.run_id, "history": state.history, "ledgers": state.ledgers}
    (tmp / "server.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _load_checkpoint_tensors(root: Path, rnd: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    path = root / "checkpoints" / f"round-{rnd}"
    strategy = {k: v for k, v in load_file(str(path / "strategy.safetensors")).items() if k != "none"}
    return load_file(str(path / "adapter.safetensors")), strategy


def _write_records(run: RunDir, state: ServerState) -> None:
    """rounds.jsonl and ledgers/<client>.jsonl, rewritten from the checkpointed history."""
    run.write_text("rounds.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in state.history))
    for client, lines in state.ledgers.items():
        if (problem := check_client_name(client)) is not None:  # e.g. a hand-edited checkpoint
            raise DataError(f"{run.root}: the run's ledgers name a bad client: {problem}")
        text = "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines)
        run.write_text(f"ledgers/{client}.jsonl", text)
    if state.round == 0 and state.prior is not None:  # the prior release survives a crash in round 1
        ckpt = run.root / "checkpoints" / "round-0"
        save_prior(ckpt, state.prior)
        doc = {"round": 0, "run_id": state.run_id, "history": [], "ledgers": state.ledgers}
        (ckpt / "server.json").write_text(json.dumps(doc, indent=1, sort_keys=True))


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"


# --- Flower entry point ----------------------------------------------------------------------


def make_server_app(
    cfg: Config | None = None, *, out: Path | None = None, num_clients: int | None = None,
    resume: bool = False, cache_dir: Path | None = None, offline: bool = False,
) -> ServerApp:
    """A ServerApp bound to these settings, or (all None) reading them from the run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedrec.common.assets import default_cache_dir, default_offline

        c = cfg or from_run_config(context.run_config)
        rc = context.run_config
        o = out or Path(str(rc.get("output", f"runs/{c.name}")))
        n = num_clients or int(rc.get("num-clients") or c.fed.clients)  # type: ignore[call-overload]
        r = resume or bool(rc.get("resume", False))
        if cfg is None and not (o / "config.toml").exists():  # `flwr run .`: the run's record
            RunDir(o).write_config(c, {"engine": "flwr run", "clients": n})
        run_server(grid, c, o, num_clients=n, resume=r, cache_dir=cache_dir or default_cache_dir(),
                   offline=offline or default_offline())

    return app


app = make_server_app()  # `flwr run .` (pyproject [tool.flwr.app.components])
