"""The ServerApp's translation between Flower Messages and the round loop's wire records: requests
become records by wire's names, replies become `wire.Reply` (status, scalars, tensors, the
chained ledger line kept verbatim), errors become failures naming the node. Reply Messages are
built with Flower's public `Metadata` and `make_message`: no Flower runtime, nothing patched."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from fedrec.common import chain, wire
from fedrec.common.lora import tensors_digest
from fedrec.server import app as server_app
from fedrec.server.rounds import accept
from fedrec.server.transport import Request
from fedrec.server.validation import Identities
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from flwr.app.message import Message, make_message
from flwr.app.metadata import Metadata


def from_node(node: int, *, content: RecordDict | None = None, error: Error | None = None,
              reply_to: str = "") -> Message:
    """A reply as the Grid returns it: sent by `node` to the server (node 0)."""
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=reply_to,
                    group_id="", created_at=time.time(), ttl=DEFAULT_TTL, message_type="train")
    return make_message(meta, content=content, error=error)


def line(tensors: dict[str, torch.Tensor]) -> dict:
    entry = {"round": 1, "mechanism": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4,
             "clip_norm": 1.0, "delta": 1e-5, "epsilon": 1.5, "accountant": "rdp", "users": 32,
             "budget": 8.0, "run_id": "abc", "adapter_sha256": tensors_digest(tensors)}
    return chain.link(entry, [])


def reply_content(client: object, tensors: dict[str, torch.Tensor] | None = None, ledger: dict | None = None,
                  status: str = "ok") -> RecordDict:
    content = RecordDict({"metrics": MetricRecord({"epsilon": 1.5, "num-examples": 1.0}),
                          "status": ConfigRecord({"status": status, "reason": "", "client": client})})
    if tensors is not None:
        content["arrays"] = ArrayRecord(torch_state_dict=tensors)
    if ledger is not None:
        content["ledger"] = ConfigRecord(ledger)
    return content


def test_a_reply_becomes_a_wire_reply_with_its_ledger_line_verbatim() -> None:
    tensors = {"lora_B": torch.ones(2, 2)}
    sent = line(tensors)

    batch = server_app._parse([from_node(7, content=reply_content("client-0", tensors, sent))], {}, 1)

    [(node, reply)] = batch.replies
    assert node == 7 and batch.failures == []
    assert (reply.status, reply.client, reply.metrics["epsilon"]) == ("ok", "client-0", 1.5)
    assert torch.equal(reply.tensors["lora_B"], tensors["lora_B"])
    assert reply.bytes_up == ArrayRecord(torch_state_dict=tensors).count_bytes() >= 16  # what travelled
    assert reply.ledger == sent and chain.verify([reply.ledger]).status == "intact"
    kept, failures = accept(batch, Identities(), 1)  # and the round loop accepts it: the digest matches
    assert kept == [reply] and failures == []


def test_an_error_the_superlink_wrote_names_the_node_it_was_sent_to() -> None:
    error = from_node(0, error=Error(code=0, reason="Node Unavailable"), reply_to="ask-9")

    batch = server_app._parse([error], {"ask-9": 9}, 2)

    assert batch.replies == [] and batch.failures == ["node 9: Node Unavailable"]


def test_a_reply_without_a_status_is_ok_and_named_by_its_node_and_a_non_string_name_fails() -> None:
    bare = from_node(4, content=RecordDict({"metrics": MetricRecord({"epsilon": 0.0})}))
    numbered = from_node(5, content=reply_content(5))

    batch = server_app._parse([bare, numbered], {}, 1)

    [(node, reply)] = batch.replies
    assert (node, reply.status, reply.client, reply.tensors, reply.ledger) == (4, "ok", "node-4", {}, None)
    assert len(batch.failures) == 1 and batch.failures[0].startswith("node 5: ") and "not allowed" in batch.failures[0]


def test_a_request_travels_in_the_records_wire_names() -> None:
    adapter = {"lora_B": torch.ones(2, 2)}
    prior = {"popularity": np.arange(3, dtype=np.float32), "head": np.array([0, 2])}
    request = Request(wire.EVALUATE, {"split": "valid", "server-round": 1, "weights": [0.0, 1.0]},
                      adapter=adapter, prior=prior, head=np.array([1, 2]))

    content = server_app.to_content(request)

    assert set(content.array_records) == {"arrays", "prior", "head"} and set(content.config_records) == {"config"}
    assert dict(content["config"]) == request.config
    assert torch.equal(content.array_records["arrays"].to_torch_state_dict()["lora_B"], adapter["lora_B"])
    assert content.array_records["prior"].to_torch_state_dict()["head"].tolist() == [0, 2]
    assert content.array_records["head"].to_torch_state_dict()["head"].tolist() == [1, 2]
    assert set(server_app.to_content(Request(wire.QUERY_PRIOR, {"server-round": 0})).array_records) == set()


def test_a_secagg_reply_keeps_status_scalars_and_its_ledger_line() -> None:
    from fedrec.server.secagg import reply

    sent = line({})
    metrics = {"status": "ok", "reason": "", "client": "a", "epsilon": 1.5, "num-examples": 1.0,
               "fedrec-ledger": json.dumps(sent)}

    got, client = reply(metrics, bytes_up=40)

    assert client == "a" and got.status == "ok" and got.ledger == sent and got.tensors == {}
    assert got.metrics == {"epsilon": 1.5, "num-examples": 1.0} and got.bytes_up == 40
