"""Secure aggregation (Flower's SecAgg+) inside fedrec's own round loop: the server sees only a sum.

Flower 1.42 ships SecAgg+ only as `flwr.server.workflow.SecAggPlusWorkflow` (server) and
`flwr.client.mod.secaggplus_mod` (client), both built on the legacy FitIns/FitRes records and a
`LegacyContext`; the Message-API strategies have no SecAgg+. This module drives the workflow's four
stages (setup, share keys, collect masked vectors, unmask) itself, one round at a time, so that
fedrec keeps its own round loop, checkpoints and resume. What the server learns per round:

- the weighted sum Σ wᵢ·adapterᵢ and Σ wᵢ (dequantised, then divided: the weighted mean);
- each client's reply status and scalar metrics (ε, σ, q, steps; no user count, no loss), which travel
  in clear as before — SecAgg+ hides the tensors, not the metadata.

Precision: each value is clipped to ±fed.secagg_clip and quantised to 2²² levels after being
multiplied by wᵢ/max_weight, so one client's resolution is 2·clip/2²² · max_weight/wᵢ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from fedrec.common import wire
from fedrec.common.config import Config
from fedrec.common.wire import Reply, WireError
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


@dataclass
class SecAggResult:
    """One secure round: the weighted mean (None if nothing to unmask) and each client's reply."""

    mean: dict[str, torch.Tensor] | None
    replies: list[tuple[int, dict[str, Any]]]  # (node id, status + metrics of the FitRes): see `reply`
    failures: list[str]
    bytes_up: int  # all payload bytes the clients sent in the four stages
    bytes_down: int


@dataclass
class _OneRound:
    """The two calls the SecAgg+ workflow makes on a legacy strategy, for one prepared round."""

    fitins: FitIns
    aggregated: Parameters | None = None
    results: list[tuple[ClientProxy, FitRes]] = field(default_factory=list)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, self.fitins) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: Sequence[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        # the workflow has put the unmasked weighted mean into every result
        self.results = results
        self.aggregated = results[0][1].parameters if results else None
        return self.aggregated, {}


class _CountingGrid:
    """The grid, counting the payload bytes that go out and come back (for rounds.jsonl)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.up, self.down = grid, 0, 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        self.down += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(payload_bytes(m.content) for m in replies if not m.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def payload_bytes(content: RecordDict) -> int:
    """Tensor bytes plus the bytes values (masked vectors, key shares) of the config records."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


def workflow(cfg: Config) -> SecAggPlusWorkflow:
    f = cfg.fed
    return SecAggPlusWorkflow(
        num_shares=_count(f.secagg_shares), reconstruction_threshold=_count(f.secagg_threshold),
        max_weight=1.0,  # clients send weight 1: their user count is private (client/local.py)
        clipping_range=f.secagg_clip, timeout=f.timeout,
    )


def _count(x: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction of the round's clients."""
    return int(x) if x > 1 else float(x)


def secagg_round(
    grid: Grid, cfg: Config, rnd: int, current: Mapping[str, torch.Tensor], config: Mapping[str, Any],
    node_ids: Sequence[int], weight_key: str,
) -> SecAggResult:
    """Run one training round under SecAgg+ on `node_ids` with the request `config` (a wire
    RoundRequest's); return the unmasked weighted mean."""
    keys = sorted(current)
    params = ndarrays_to_parameters([current[k].detach().cpu().numpy() for k in keys])
    fit_config = {**config, wire.ROUND: rnd, wire.SECAGG_KEYS: "\n".join(keys),
                  wire.SECAGG_WEIGHT: weight_key}
    plan = _OneRound(FitIns(params, cast(dict[str, Any], fit_config)))
    counting = _CountingGrid(grid)
    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(nid, cast(Grid, counting), run_id=0))
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, config=ServerConfig(num_rounds=cfg.fed.rounds),
                        strategy=cast(Any, plan), client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)

    flow, state = workflow(cfg), WorkflowState()
    g = cast(Grid, counting)
    ok = flow.setup_stage(g, ctx, state) and flow.share_keys_stage(g, ctx, state) \
        and flow.collect_masked_vectors_stage(g, ctx, state)
    replies = [(cast(GridClientProxy, p).node_id, dict(res.metrics)) for p, res in state.legacy_results]
    failures = [f"secagg: {e}" for e in state.failures]
    mean = None
    trained = [m for _, m in replies if m.get(wire.STATUS_KEY) == wire.OK]
    if ok and trained and flow.unmask_stage(g, ctx, state) and plan.aggregated is not None:
        arrays = parameters_to_ndarrays(plan.aggregated)
        mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float32))
                for k, a in zip(keys, arrays, strict=True)}
    elif not ok:
        failures.append(f"secagg: round {rnd} halted (fewer clients than the reconstruction threshold)")
    return SecAggResult(mean, replies, failures, counting.up, counting.down)


def reply(metrics: Mapping[str, Any], *, bytes_up: int) -> tuple[Reply, Any]:
    """A SecAgg+ FitRes's metrics as a wire reply (no tensors: the server sees only their mean),
    and the client name as sent; the chained ledger line travels as JSON (FitRes has no records)."""
    status, reason, client = Reply.parse_status(metrics)
    try:
        ledger = json.loads(str(metrics[wire.SECAGG_LEDGER])) if wire.SECAGG_LEDGER in metrics else None
    except json.JSONDecodeError as exc:
        raise WireError(f"its ledger line is not JSON ({exc.msg})") from None
    if ledger is not None and not isinstance(ledger, dict):
        raise WireError("its ledger line is not a JSON object")
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return Reply(status, numbers, {}, reason, ledger, bytes_up=bytes_up), client
