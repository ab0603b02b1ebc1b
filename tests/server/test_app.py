"""The ServerApp's reply parsing: the client's chained ledger line is kept verbatim, and tensors
that do not match the digest in it are rejected."""

from __future__ import annotations

import pytest
import torch
from fedrec.common import chain
from fedrec.common.lora import tensors_digest
from fedrec.server import app as server_app
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as the server side
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def reply(tensors: dict[str, torch.Tensor], ledger: dict) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                   message_type="train")
    return Message(RecordDict({
        "arrays": ArrayRecord(torch_state_dict=tensors), "metrics": MetricRecord({"epsilon": 1.5}),
        "status": ConfigRecord({"status": "ok", "reason": "", "client": "client-0"}),
        "ledger": ConfigRecord(ledger),
    }), reply_to=sent)


def line(tensors: dict[str, torch.Tensor]) -> dict:
    entry = {"round": 1, "mechanism": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4,
             "clip_norm": 1.0, "delta": 1e-5, "epsilon": 1.5, "accountant": "rdp", "users": 32,
             "budget": 8.0, "run_id": "abc", "adapter_sha256": tensors_digest(tensors)}
    return chain.link(entry, [])


def test_chained_ledger_line_is_kept_verbatim() -> None:
    tensors = {"lora_B": torch.ones(2, 2)}
    sent = line(tensors)

    pairs, failures = server_app._parse([reply(tensors, sent)], None, 1)

    assert failures == [] and len(pairs) == 1
    kept = server_app._ledger_line(1, "dp-sgd", pairs[0][1], "rdp")
    assert kept == sent and chain.verify([kept]).status == "intact"


def test_tensors_that_do_not_match_the_ledger_digest_are_rejected() -> None:
    tensors = {"lora_B": torch.ones(2, 2)}
    sent = line(tensors)
    swapped = {"lora_B": torch.full((2, 2), 2.0)}  # not what the client recorded releasing

    pairs, failures = server_app._parse([reply(swapped, sent)], None, 1)

    assert pairs == [] and len(failures) == 1 and "digest" in failures[0]
