"""The client's half of SecAgg+: fedrec's train messages in and out of Flower's `secaggplus_mod`.

`secaggplus_mod` (Flower 1.42, legacy FitIns/FitRes records) runs the key agreement, secret
sharing and masking; at its "collect masked vectors" stage it calls the ClientApp's train
handler, which this module feeds with fedrec's own records and whose reply it turns back into a
FitRes. The client's DP training, budget check and ledger commit happen exactly as without SecAgg.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from fedrec.common import wire
from fedrec.common.wire import Reply
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: SecAgg+ train messages go through Flower's secaggplus_mod, others pass."""
    if msg.metadata.message_type != wire.TRAIN or not is_secagg(msg):
        return call_next(msg, ctxt)

    def train(inner: Message, c: Context) -> Message:
        content, keys, weight_key = to_train_content(inner.content)
        like = content.array_records[wire.ARRAYS].to_torch_state_dict()
        inner.content = content
        reply = call_next(inner, c)
        reply.content = to_fitres_content(reply.content, keys, weight_key, like)
        return reply

    return secaggplus_mod(msg, ctxt, train)


def is_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def to_train_content(content: RecordDict) -> tuple[RecordDict, list[str], str]:
    """The legacy FitIns records of a SecAgg+ message -> fedrec's train content (adapter, config)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    keys = str(fitins.config[wire.SECAGG_KEYS]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    tensors = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
    config = ConfigRecord({k: v for k, v in fitins.config.items()
                           if k not in (wire.SECAGG_KEYS, wire.SECAGG_WEIGHT)})
    train = RecordDict({wire.ARRAYS: ArrayRecord(torch_state_dict=tensors), wire.CONFIG: config})
    return train, keys, str(fitins.config[wire.SECAGG_WEIGHT])


def to_fitres_content(reply: RecordDict, keys: list[str], weight_key: str,
                      like: Mapping[str, torch.Tensor]) -> RecordDict:
    """fedrec's train reply -> FitRes records for secaggplus_mod; a refusal weighs 0 (zeros sent)."""
    status = dict(reply.config_records.get(wire.STATUS, {wire.STATUS_KEY: wire.OK}))
    metrics = {k: v for k, v in reply.metric_records.get(wire.METRICS, {}).items()
               if isinstance(v, int | float)}
    ok = Reply.parse_status(status)[0] == wire.OK and wire.ARRAYS in reply.array_records
    tensors = reply.array_records[wire.ARRAYS].to_torch_state_dict() if ok else {}
    arrays = [(tensors[k] if ok else torch.zeros_like(like[k])).numpy() for k in keys]
    weight = int(round(float(metrics.get(weight_key, 0.0)))) if ok else 0
    extra = {k: str(v) for k, v in status.items()}
    if wire.LEDGER in reply.config_records:  # the coordinator keeps the same chained line as without SecAgg+
        extra[wire.SECAGG_LEDGER] = json.dumps(dict(reply.config_records[wire.LEDGER]), sort_keys=True)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {**metrics, **extra})
    return compat.fitres_to_recorddict(fitres, keep_input=True)
