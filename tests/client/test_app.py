"""The ClientApp called in-process with real Flower messages: what leaves a client, and when it refuses.

Messages are built as the SuperNode delivers them, with Flower's public `Metadata` and
`make_message`: no Flower runtime, nothing of Flower's patched."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch
from fedrec.client import app as client_app
from fedrec.client.local import LocalSettings
from fedrec.common import chain
from fedrec.common.config import Config, load_config
from fedrec.common.lora import tensors_digest
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.recommender import build_recommender
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.app.message import Message, make_message
from flwr.app.metadata import Metadata


def tiny_config(data: Path, *extra: str) -> Config:
    return load_config(None, [
        f'data.dataset="{data}"', "data.max_users=0", 'model.name="tiny-random"', "lora.rank=2",
        "lora.last_layers=1", "train.batch_size=8", "fed.clients=2",
        "model.max_item_tokens=40", *extra,
    ])


@pytest.fixture(autouse=True)
def fresh_process_cache():
    client_app._JOBS.clear()
    client_app._SHARED.clear()
    yield
    client_app._JOBS.clear()
    client_app._SHARED.clear()


def make_app(cfg: Config, tmp_path: Path, budget: float):
    local = LocalSettings("client-0", tmp_path / "state", budget, None, tmp_path / "cache", True)
    return client_app.make_client_app(lambda ctx: (cfg, local))


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def instruction(content: RecordDict, message_type: str, node: int = 7) -> Message:
    """A message from the server (node 0) as node `node` receives it."""
    meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return make_message(meta, content)


def train_message(tensors: dict[str, torch.Tensor], rnd: int, **config) -> Message:
    cfg = ConfigRecord({"run-id": "r1", "server-round": rnd, "num-rounds": 2, "local-epochs": 0.5,
                        "lr": 0.01, **config})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=tensors), "config": cfg})
    return instruction(content, "train")


def global_adapter(cfg: Config, tmp_path: Path, variant: str = "lora") -> dict[str, torch.Tensor]:
    initial = build_recommender(cfg, cache_dir=tmp_path / "cache", offline=True).initial_adapter
    return {k: v for k, v in initial.items() if variant != "ffa" or "lora_B" in k}


def test_reply_carries_only_lora_tensors_and_scalars(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)
    sent = global_adapter(cfg, tmp_path)
    reply = make_app(cfg, tmp_path, 8.0)(train_message(sent, 1), context())

    content = reply.content
    assert set(content.array_records) == {"arrays"}
    tensors = content["arrays"].to_torch_state_dict()
    assert set(tensors) == set(sent) and all("lora_" in k for k in tensors)
    assert any(not torch.equal(tensors[k], sent[k]) for k in sent)  # it trained
    metrics = dict(content["metrics"])
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert set(content.config_records) == {"status", "ledger"}
    status = dict(content["status"])
    assert status["status"] == "ok" and set(status) == {"status", "reason", "client"}
    ledger = dict(content["ledger"])  # the chained ledger line: numbers, names and hashes
    assert ledger["adapter_sha256"] == tensors_digest(tensors) and ledger["mechanism"] == "dp-sgd"
    text = json.dumps([status, ledger])  # no user or item ids in any string that leaves
    assert not any(f'"u{i}"' in text or f'"i{i}"' in text for i in range(30))
    assert 0 < metrics["epsilon"] <= 8.0


def test_ffa_client_sends_only_b(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, 'lora.variant="ffa"')
    sent = global_adapter(cfg, tmp_path, "ffa")
    reply = make_app(cfg, tmp_path, 8.0)(train_message(sent, 1), context())
    keys = set(reply.content["arrays"].to_torch_state_dict())
    assert keys == set(sent) and keys and all("lora_B" in k for k in keys)


def test_over_budget_round_is_refused_and_spends_nothing(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=0.6")
    sent = global_adapter(cfg, tmp_path)
    # the server cannot raise the budget: an epsilon in its message is ignored
    reply = make_app(cfg, tmp_path, 0.5)(train_message(sent, 1, **{"epsilon-budget": 1000.0}), context())

    status = dict(reply.content["status"])
    assert status["status"] == "over-budget"
    assert "budget 0.5" in status["reason"]
    assert "arrays" not in reply.content.array_records
    assert dict(reply.content["metrics"])["epsilon"] == 0.0
    assert not (tmp_path / "state" / "ledger.jsonl").exists()


def test_rounds_compose_across_restarts_and_replays_cost_nothing(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=1.0", "prior.enabled=false")
    sent = global_adapter(cfg, tmp_path)
    first = make_app(cfg, tmp_path, 8.0)(train_message(sent, 1), context())
    again = make_app(cfg, tmp_path, 8.0)(train_message(sent, 1), context())  # the server resumed
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    assert dict(again.content["ledger"]) == dict(first.content["ledger"])  # the same line, not a new one
    a, b = (m.content["arrays"].to_torch_state_dict() for m in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dict(first.content["ledger"])["adapter_sha256"] == tensors_digest(a)

    client_app._JOBS.clear()  # a new process: everything it knows comes from the state directory
    client_app._SHARED.clear()
    second = make_app(cfg, tmp_path, 8.0)(train_message(sent, 2), context())
    ledger = [json.loads(x) for x in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert [e["round"] for e in ledger] == [1, 2]
    history = [MechanismStep(noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"], steps=e["steps"]) for e in ledger]
    assert ledger[-1]["epsilon"] == pytest.approx(epsilon(history, delta=ledger[-1]["delta"]), rel=1e-9)
    assert dict(second.content["metrics"])["epsilon"] == pytest.approx(ledger[-1]["epsilon"])
    assert ledger[1]["epsilon"] > ledger[0]["epsilon"]
    assert chain.verify(ledger).status == "intact" and ledger[1]["prev_sha256"] == ledger[0]["entry_sha256"]
    assert dict(second.content["ledger"]) == ledger[1] and ledger[1]["budget"] == 8.0


def test_unreadable_state_stops_the_client(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text("{not json")
    from fedrec.common.errors import PrivacyError

    with pytest.raises(PrivacyError, match="record of spent budget"):
        make_app(cfg, tmp_path, 8.0)(train_message(global_adapter(cfg, tmp_path), 1), context())


def test_a_deployed_client_takes_its_budget_from_its_own_node_config(tmp_path: Path) -> None:
    from fedrec.common.errors import ConfigError

    run_config = {"fed.rounds": 4, "privacy.target_epsilon": 100.0, "output": str(tmp_path / "server")}
    node = {"client-name": "hospital-a", "epsilon-budget": 2.5, "state-dir": str(tmp_path / "a")}
    cfg, local = client_app.settings_from_context(
        Context(run_id=1, node_id=3, node_config=node, state=RecordDict(), run_config=run_config))
    assert cfg.fed.rounds == 4
    assert (local.name, local.epsilon_budget, local.state_dir) == ("hospital-a", 2.5, tmp_path / "a")

    with pytest.raises(ConfigError, match="epsilon-budget"):  # never the server's privacy.target_epsilon
        client_app.settings_from_context(
            Context(run_id=1, node_id=3, node_config={"client-name": "b"}, state=RecordDict(),
                    run_config=run_config))
    _, simulated = client_app.settings_from_context(
        Context(run_id=1, node_id=3, node_config={"partition-id": 1}, state=RecordDict(), run_config=run_config))
    assert simulated.name == "client-1" and simulated.state_dir == tmp_path / "server" / "clients" / "client-1"


def test_a_malformed_request_is_answered_bad_request_and_spends_nothing(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)
    app = make_app(cfg, tmp_path, 8.0)
    sent = global_adapter(cfg, tmp_path)
    no_round = RecordDict({"arrays": ArrayRecord(torch_state_dict=sent),
                           "config": ConfigRecord({"run-id": "r1", "num-rounds": 2, "local-epochs": 0.5, "lr": 0.01})})
    no_head = RecordDict({"config": ConfigRecord({"run-id": "r1", "server-round": 0, "num-rounds": 2,
                                                  "local-epochs": 0.5, "lr": 0.01})})
    bad_prior = train_message(sent, 1)
    bad_prior.content["prior"] = ArrayRecord(torch_state_dict={"popularity": torch.ones(3, 3)})

    replies = [app(instruction(no_round, "train"), context()), app(instruction(no_head, "query.cooccurrence"), context()),
               app(bad_prior, context())]

    for reply in replies:
        status = dict(reply.content["status"])
        assert status["status"] == "bad-request" and status["client"] == "client-0"
        assert "arrays" not in reply.content.array_records and "ledger" not in reply.content.config_records
    assert "missing key 'server-round'" in dict(replies[0].content["status"])["reason"]
    assert not (tmp_path / "state" / "ledger.jsonl").exists()
