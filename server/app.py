"""The Flower ServerApp: Flower's Grid and Messages translated to and from the round loop's wire
records (server/rounds.py runs the federation; this module only translates).

`FlowerTransport` builds one Message per node from a `rounds.Request` (its config, the adapter,
the prior, the head items, each in the record common/wire.py names), sends them through the
Grid, and parses every reply into a `wire.Reply`: status record, scalars, tensors and the chained
ledger line; an error the SuperLink wrote on a node's behalf becomes a failure naming that node.
A SecAgg+ round goes through server/secagg.py. What the replies mean, and whether they are
accepted, is the round loop's business.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from fedrec.common import wire
from fedrec.common.assets import default_cache_dir, default_offline
from fedrec.common.config import Config, from_run_config
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import FAILED, RunDir, append_jsonl
from fedrec.common.wire import Reply, WireError
from fedrec.server import secagg
from fedrec.server.rounds import run_server, settled_node_count
from fedrec.server.transport import Batch, Request, SecureBatch
from fedrec.server.validation import check_client_name
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

__all__ = ["FAILED", "FlowerTransport", "app", "make_server_app"]  # FAILED: simulations/federated.py

log = logging.getLogger(__name__)


class FlowerTransport:
    """The round loop's transport over Flower's Grid (server/rounds.py `Transport`)."""

    def __init__(self, grid: Grid, cfg: Config, *, transcript: Path | None = None) -> None:
        self.grid, self.cfg, self.transcript = grid, cfg, transcript

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def send(self, request: Request, nodes: Sequence[int]) -> Batch:
        content = to_content(request)
        messages = [Message(content, dst_node_id=n, message_type=request.kind) for n in nodes]
        raw = list(self.grid.send_and_receive(messages, timeout=self.cfg.fed.timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set by the push
        rnd = int(request.config.get(wire.ROUND, -1))
        if self.transcript is not None:
            for msg in raw:
                append_jsonl(self.transcript, transcript_line(msg, rnd, request.kind))
        return _parse(raw, sent, rnd)

    def secure_train(self, request: Request, nodes: Sequence[int], weight_key: str) -> SecureBatch:
        rnd = int(request.config[wire.ROUND])
        result = secagg.secagg_round(self.grid, self.cfg, rnd, request.adapter or {}, request.config, nodes,
                                     weight_key)
        up = result.bytes_up // max(1, len(result.replies))
        batch = SecureBatch(failures=list(result.failures), mean=result.mean, bytes_down=result.bytes_down)
        for node, metrics in result.replies:
            try:
                reply, client = secagg.reply(metrics, bytes_up=up)
                batch.replies.append((node, _named(reply, client, node)))
            except WireError as exc:
                batch.failures.append(f"node {node}: {exc}")
        return batch


def to_content(request: Request) -> RecordDict:
    """A request's records: its config, and the adapter, prior and head items it carries."""
    content = RecordDict({wire.CONFIG: ConfigRecord(request.config)})
    if request.adapter is not None:
        content[wire.ARRAYS] = _array_record(request.adapter)
    if request.prior is not None:  # the clients' rankings blend in this prior's CF score
        content[wire.PRIOR] = _array_record({k: torch.from_numpy(v) for k, v in request.prior.items()})
    if request.head is not None:
        content[wire.HEAD] = _array_record({wire.HEAD: torch.from_numpy(request.head)})
    return content


def _array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in tensors.items()})


def transcript_line(msg: Message, rnd: int, kind: str) -> dict[str, Any]:
    """What one reply carried, as the server's transcript (run dir received.jsonl) keeps it: the
    names of its records, the name and shape of each tensor (not its values), its metrics and
    configs; or the error the SuperLink reported."""
    line: dict[str, Any] = {"round": rnd, "message_type": kind, "node": msg.metadata.src_node_id}
    if msg.has_error():
        return line | {"error": msg.error.reason}
    content = msg.content
    return line | {
        "arrays": {name: {k: list(a.shape) for k, a in record.items()}
                   for name, record in content.array_records.items()},
        "metrics": {name: dict(record) for name, record in content.metric_records.items()},
        "configs": {name: {k: _plain(v) for k, v in record.items()}
                    for name, record in content.config_records.items()},
    }


def _plain(value: Any) -> Any:
    """A config value as JSON holds it: bytes by their length (a config record may carry bytes)."""
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _parse(raw: Sequence[Message], sent: Mapping[str, int], rnd: int) -> Batch:
    """Every reply parsed into a wire record, by the node it came from; errors as failures.

    `sent` (message id -> destination node) names the node of an error the SuperLink wrote on
    its behalf (e.g. "Node Unavailable"), whose source is the SuperLink itself."""
    batch = Batch()
    for msg in raw:
        node = msg.metadata.src_node_id
        if msg.has_error():
            node = sent.get(msg.metadata.reply_to_message_id, node)
            batch.failures.append(f"node {node}: {msg.error.reason}")
            log.warning("round %d: node %d failed: %s", rnd, node, msg.error.reason)
            continue
        try:
            batch.replies.append((node, from_content(msg.content, node)))
        except WireError as exc:
            batch.failures.append(f"node {node}: {exc}")
            log.warning("round %d: node %d: %s", rnd, node, exc)
    return batch


def from_content(content: RecordDict, node: int) -> Reply:
    """A reply's records as a wire reply; bytes_up is the size of the tensors it carries."""
    status, reason, client = Reply.parse_status(content.config_records.get(wire.STATUS))
    arrays = content.array_records.get(wire.ARRAYS)
    ledger = content.config_records.get(wire.LEDGER)
    reply = Reply(status, dict(content.metric_records.get(wire.METRICS, {})),
                  arrays.to_torch_state_dict() if arrays is not None else {}, reason,
                  dict(ledger) if ledger is not None else None,
                  bytes_up=arrays.count_bytes() if arrays is not None else 0)
    return _named(reply, client, node)


def _named(reply: Reply, client: Any, node: int) -> Reply:
    """`reply` with the client name it gave (a node that gives none is "node-<id>")."""
    name = f"node-{node}" if client is None else client
    if not isinstance(name, str):  # whether a string names a client is the round loop's check
        raise WireError(str(check_client_name(name)))
    reply.client = name
    return reply


# --- Flower entry point ----------------------------------------------------------------------


def make_server_app(
    cfg: Config | None = None, *, out: Path | None = None, num_clients: int | None = None,
    resume: bool = False, cache_dir: Path | None = None, offline: bool = False,
) -> ServerApp:
    """A ServerApp bound to these settings, or (all None) reading them from the run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg or from_run_config(context.run_config)
        rc = context.run_config
        o = out or Path(str(rc.get("output", f"runs/{c.name}")))
        n = num_clients or int(str(rc.get("num-clients", c.fed.clients)))
        if n == 0:  # `flwr run .`: the institutions are the federation's SuperNodes (num-supernodes)
            n = settled_node_count(FlowerTransport(grid, c), c.fed.join_wait)
            c = replace(c, fed=replace(c.fed, clients=n))
        r = resume or bool(rc.get("resume", False))
        loaded = build_recommender(c, cache_dir=cache_dir or default_cache_dir(),
                                   offline=offline or default_offline())
        run = RunDir(o)
        if cfg is None and not run.config.exists():  # `flwr run .`: the run's record
            run.write_config(c, {"engine": "flwr run", "clients": n, "model_sha256": loaded.base.fingerprint})
        transport = FlowerTransport(grid, c, transcript=run.received)
        run_server(transport, c, o, num_clients=n, resume=r, loaded=loaded)

    return app


app = make_server_app()  # `flwr run .` (pyproject [tool.flwr.app.components])
