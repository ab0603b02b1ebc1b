"""The round loop with an in-memory transport (plain tensors and wire records, no Flower): what it
asks, what it accepts of the replies (the client's chained ledger line verbatim, tensors that
match its digest, valid names, no impersonation, bounded releases, valid metrics), what it writes,
how it resumes and how it stops."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from fedrec.common import chain, wire
from fedrec.common.config import Config, load_config
from fedrec.common.errors import ConfigError
from fedrec.common.lora import tensors_digest
from fedrec.common.recommender import Loaded, build_recommender
from fedrec.common.rundir import AdapterRecord, RunDir, read_json, read_jsonl
from fedrec.common.wire import Reply
from fedrec.server import evaluation, ledgers, rounds
from fedrec.server.rounds import accept, run_server, sum_releases
from fedrec.server.transport import Batch, Request, SecureBatch, Transport
from fedrec.server.validation import Identities, check_eval_metrics, check_release
from safetensors import safe_open
from safetensors.torch import load_file

# --- replies: what the loop accepts --------------------------------------------------------------


def line(tensors: dict[str, torch.Tensor]) -> dict:
    entry = {"round": 1, "mechanism": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4,
             "clip_norm": 1.0, "delta": 1e-5, "epsilon": 1.5, "accountant": "rdp", "users": 32,
             "budget": 8.0, "run_id": "abc", "adapter_sha256": tensors_digest(tensors)}
    return chain.link(entry, [])


def named_reply(client: str, *, tensors: dict[str, torch.Tensor] | None = None, ledger: dict | None = None
                ) -> Reply:
    return Reply(wire.OK, {"epsilon": 1.5}, tensors or {}, ledger=ledger, client=client)


def test_chained_ledger_line_is_kept_verbatim() -> None:
    tensors = {"lora_B": torch.ones(2, 2)}
    sent = line(tensors)

    replies, failures = accept(Batch([(7, named_reply("client-0", tensors=tensors, ledger=sent))]),
                               Identities(), 1)

    assert failures == [] and len(replies) == 1
    kept = ledgers.ledger_line(1, "dp-sgd", replies[0], "rdp")
    assert kept == sent and chain.verify([kept]).status == "intact"


def test_tensors_that_do_not_match_the_ledger_digest_are_rejected() -> None:
    tensors = {"lora_B": torch.ones(2, 2)}
    sent = line(tensors)
    swapped = {"lora_B": torch.full((2, 2), 2.0)}  # not what the client recorded releasing

    replies, failures = accept(Batch([(7, named_reply("client-0", tensors=swapped, ledger=sent))]),
                               Identities(), 1)

    assert replies == [] and len(failures) == 1 and "digest" in failures[0]


def test_an_adapter_not_of_the_global_spec_and_a_reply_without_a_weight_are_rejected() -> None:
    spec = {"lora_B": ((2, 2), torch.float32)}
    wrong = named_reply("a", tensors={"lora_B": torch.ones(3, 2)})
    unweighted = named_reply("b", tensors={"lora_B": torch.ones(2, 2)})  # no num-examples metric
    good = Reply(wire.OK, {"num-examples": 1.0}, {"lora_B": torch.ones(2, 2)}, client="c")

    replies, failures = accept(Batch([(1, wrong), (2, unweighted), (3, good)]), Identities(), 1, spec=spec,
                               weight_key=wire.NUM_EXAMPLES)

    assert replies == [good] and len(failures) == 2
    assert failures[0].startswith("a: ") and "weight num-examples=None" in failures[1]


# --- a malicious institution (issue 13): names, impersonation, poisoned releases, metrics ----


@pytest.mark.parametrize("name", ["../../etc/x", "a/b", ".hidden", "", "x" * 65, "a b", "c\\d"])
def test_a_bad_client_name_is_rejected_before_any_path_is_built(name: str) -> None:
    replies, failures = accept(Batch([(3, named_reply(name))]), Identities(), 1)

    assert replies == [] and len(failures) == 1 and "not allowed" in failures[0]


def test_two_nodes_claiming_one_name_are_refused_and_a_node_cannot_change_its_name() -> None:
    ids = Identities()
    first, _ = accept(Batch([(3, named_reply("hospital-a"))]), ids, 1)

    impostor, failures = accept(Batch([(4, named_reply("hospital-a"))]), ids, 1)
    renamed, failures2 = accept(Batch([(3, named_reply("clinic-b"))]), ids, 2)

    assert len(first) == 1
    assert impostor == [] and "impersonation" in failures[0]
    assert renamed == [] and "now claims" in failures2[0]


def prior_reply(client: str, counts: torch.Tensor, users: int = 10) -> Reply:
    tensors = {"counts": counts}
    entry = {"round": 0, "mechanism": "prior-counts", "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1,
             "clip_norm": 1.0, "delta": 1e-5, "epsilon": 0.5, "accountant": "rdp", "users": users,
             "run_id": "abc", "adapter_sha256": tensors_digest(tensors)}
    return Reply(wire.OK, {"epsilon": 0.5}, tensors, ledger=chain.link(entry, []), client=client)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_nan_infinite_or_huge_counts_are_left_out_of_the_sum(poison: float) -> None:
    kept: dict[str, list[dict]] = {}
    honest = torch.tensor([3.0, 1.0, 0.5])
    bad = torch.tensor([poison, 0.0, 0.0])

    total, noise_std = sum_releases([prior_reply("a", honest), prior_reply("b", bad)], "counts",
                                    "prior-counts", kept, accountant="rdp")

    assert total is not None and np.allclose(total, honest.numpy())
    assert set(kept) == {"a"}  # the rejected release is not summed nor recorded as used
    assert noise_std == pytest.approx(2.0)  # σ·clip of the one release summed, not of the rejected


def test_the_sum_carries_the_noise_std_of_the_releases_in_it() -> None:
    _, noise_std = sum_releases([prior_reply(c, torch.ones(3)) for c in "abc"], "counts", "prior-counts", {},
                                accountant="rdp")

    assert noise_std == pytest.approx(2.0 * math.sqrt(3))  # independent Gaussians: variances add


def test_counts_of_the_wrong_shape_are_left_out() -> None:
    kept: dict[str, list[dict]] = {}
    total, _ = sum_releases([prior_reply("a", torch.ones(3)), prior_reply("b", torch.ones(4)),
                             prior_reply("c", torch.ones(3, 1))], "counts", "prior-counts", kept, accountant="rdp")

    assert total is not None and total.shape == (3,) and set(kept) == {"a"}


def test_evaluation_metrics_are_validated() -> None:
    assert check_eval_metrics({"num-examples": 5.0, "hr@10": [0.2, 0.3]}, expected_len=2) is None
    assert "values" in check_eval_metrics({"num-examples": 5.0, "hr@10": [0.2] * 9}, expected_len=2)
    assert "[0, 1]" in check_eval_metrics({"num-examples": 5.0, "hr@10": [float("nan"), 0.1]}, expected_len=2)
    assert "[0, 1]" in check_eval_metrics({"num-examples": 5.0, "ndcg@10": [3.0]}, expected_len=1)
    assert "user count" in check_eval_metrics({"num-examples": float("inf")}, expected_len=1)
    assert "user count" in check_eval_metrics({"num-examples": -1.0}, expected_len=1)


def test_the_release_bound_follows_the_clients_ledger_line() -> None:
    line = {"clip_norm": 0.5, "noise_multiplier": 2.0, "users": 100}

    assert check_release(np.full(3, 49.0), key="counts", shape=(3,), line=line) is None
    assert "|value|" in check_release(np.full(3, 61.0), key="counts", shape=(3,), line=line)  # > 0.5·(100+20)
    assert "ledger line" in check_release(np.ones(3), key="counts", shape=(3,), line=None)


@pytest.mark.parametrize("weight", [0.0, 0.5, 16.0])
def test_the_test_evaluation_asks_weights_every_client_policy_accepts(weight: float) -> None:
    from fedrec.client.policy import Policy, check_evaluation

    weights = evaluation.test_weights(weight)

    assert weights[0] == weight and weights[-1] == 0.0  # the blend first, CF alone last
    assert check_evaluation(Policy(epsilon_budget=8.0), client="a", ks=None, betas=tuple(weights)) is None


def test_a_blend_weight_whose_lead_is_inside_the_evaluation_noise_is_not_taken() -> None:
    result = {"betas": [0.0, 0.5, 1.0], "users": 900.0,
              "metrics": {"ndcg@10": [0.05, 0.08, 0.06], "hr@10": [0.1, 0.1, 0.1], "mrr@10": [0.0, 0.0, 0.0]}}
    lines = [{"mechanism": "dp-eval", "split": "valid", "round": 3, "noise_multiplier": 11.0}] * 3
    noise = ledgers.validation_noise({"a": lines[:1], "b": lines[1:2], "c": lines[2:]}, 3, result)

    assert noise == pytest.approx(math.sqrt(3 * 11.0 ** 2 * 10) / 900.0)  # d = 1 + 9 values
    assert evaluation.choose_released_weight(result, "ndcg@10", noise) == 0.0  # +0.03 is inside ±0.1
    assert evaluation.choose_released_weight(result, "ndcg@10", 0.0) == 0.5  # exact metrics: the best
    assert ledgers.validation_noise({"a": lines}, 2, result) == 0.0  # another round's lines


def test_pooled_metrics_are_means_weighted_by_the_released_user_counts() -> None:
    a = Reply(wire.OK, {"num-examples": 10.0, "ndcg@10": [0.2, 0.4]}, client="a")
    b = Reply(wire.OK, {"num-examples": 30.0, "ndcg@10": [0.6, 0.0]}, client="b")
    refused = Reply(wire.OVER_BUDGET, {"num-examples": 99.0, "ndcg@10": [1.0, 1.0]}, client="c")
    bad = Reply(wire.OK, {"num-examples": 5.0, "ndcg@10": [0.5]}, client="d")  # one value, two asked

    pooled = evaluation.pool([a, b, refused, bad], [0.0, 1.0], "valid")

    assert pooled["users"] == 40.0 and pooled["betas"] == [0.0, 1.0]
    assert pooled["metrics"]["ndcg@10"] == pytest.approx([(10 * 0.2 + 30 * 0.6) / 40, (10 * 0.4) / 40])


# --- the whole loop, in memory -------------------------------------------------------------------


class FakeClient:
    """A client that answers every request the way client/local.py does, minus the learning: its
    update is the global adapter plus `step`; its releases carry chained ledger lines."""

    def __init__(self, name: str, *, step: float = 1.0, refuse_training: bool = False, items: int = 6) -> None:
        self.name, self.step, self.refuse_training, self.items = name, step, refuse_training, items
        self.lines: list[dict[str, Any]] = []

    def answer(self, request: Request) -> Reply:
        cfg = request.config
        if request.kind == wire.QUERY_PRIOR:
            return self._release(int(cfg[wire.ROUND]), "prior-counts", {"counts": torch.arange(self.items) + 1.0})
        if request.kind == wire.QUERY_COOCCURRENCE:
            m = len(request.head)
            return self._release(0, "prior-cooccurrence", {"cooccurrence": torch.ones(m, m)})
        if request.kind == wire.TRAIN:
            if self.refuse_training:
                return Reply(wire.OVER_BUDGET, {"epsilon": 0.9}, reason=f"{self.name}: budget 1.0", client=self.name)
            tensors = {k: v + self.step for k, v in request.adapter.items()}
            reply = self._release(int(cfg[wire.ROUND]), "dp-sgd", tensors)
            reply.metrics |= {"num-examples": 1.0, "uniform": 1.0}
            return reply
        weights = cfg.get(wire.WEIGHTS, [0.0])
        reply = self._release(int(cfg[wire.ROUND]), "dp-eval", {}, split=cfg[wire.SPLIT])
        reply.metrics |= {"num-examples": 10.0, "ndcg@10": [0.1 * (1 + i) for i in range(len(weights))],
                          "hr@10": [0.5] * len(weights)}
        return reply

    def _release(self, rnd: int, mechanism: str, tensors: dict[str, torch.Tensor], **extra: Any) -> Reply:
        entry = {"round": rnd, "mechanism": mechanism, "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1,
                 "clip_norm": 1.0, "delta": 1e-5, "users": 10, "epsilon": 0.1 * (len(self.lines) + 1),
                 "adapter_sha256": tensors_digest(tensors), **extra}
        self.lines.append(chain.link(entry, self.lines))
        return Reply(wire.OK, {"epsilon": self.lines[-1]["epsilon"]}, tensors, ledger=self.lines[-1],
                     client=self.name)


class InMemory:
    """rounds.Transport over FakeClients (node id -> client); it records every request it carries."""

    def __init__(self, clients: Sequence[FakeClient], *, crash_at_train: int | None = None) -> None:
        self.clients = dict(enumerate(clients, start=1))
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.crash_at_train = crash_at_train

    def nodes(self) -> list[int]:
        return sorted(self.clients)

    def send(self, request: Request, nodes: Sequence[int]) -> Batch:
        self.sent.append((request.kind, dict(request.config)))
        if request.kind == wire.TRAIN and request.config[wire.ROUND] == self.crash_at_train:
            raise KeyboardInterrupt("the server process is killed")
        return Batch([(n, self.clients[n].answer(request)) for n in nodes])

    def secure_train(self, request: Request, nodes: Sequence[int], weight_key: str) -> SecureBatch:
        self.sent.append(("secure-train", dict(request.config)))
        replies = [(n, self.clients[n].answer(request)) for n in nodes]
        trained = [r for _, r in replies if r.ok]
        mean = {k: sum(r.tensors[k] for r in trained) / len(trained) for k in trained[0].tensors}
        for _, r in replies:
            r.tensors = {}  # the server never sees them
        return SecureBatch(replies, mean=mean, bytes_down=123 * len(nodes))


TINY = ['model.name="tiny-random"', "lora.rank=2", "lora.last_layers=1", "model.max_item_tokens=40",
        "fed.clients=3", "fed.rounds=2", "prior.head_size=4"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return build_recommender(load_config(None, TINY), cache_dir=tmp_path_factory.mktemp("cache"), offline=True)


def config(*extra: str) -> Config:
    return load_config(None, [*TINY, *extra])


def test_a_run_releases_the_prior_trains_evaluates_and_leaves_a_complete_record(tmp_path: Path, loaded) -> None:
    cfg = config()
    clients = [FakeClient("a", step=1.0), FakeClient("b", step=3.0), FakeClient("c", refuse_training=True)]
    transport = InMemory(clients)

    final = run_server(transport, cfg, tmp_path / "run", num_clients=3, resume=False, loaded=loaded)

    kinds = [k for k, _ in transport.sent]
    assert kinds == ["query.prior", "query.cooccurrence", "train", "evaluate", "train", "evaluate",
                     "evaluate", "evaluate"]  # round 0; 2 rounds with validation; test blend + LLM alone
    run_ids = {c[wire.RUN_ID] for _, c in transport.sent}
    assert len(run_ids) == 1 and [c[wire.ROUND] for k, c in transport.sent if k == "train"] == [1, 2]
    run = RunDir(tmp_path / "run")
    records = read_jsonl(run.rounds)
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["clients_ok"] == 2 and r["clients_refused"] == ["c"] and r["aggregated"] for r in records)
    for client in clients:  # the server's copy of each ledger is the client's own lines, in order
        assert read_jsonl(run.ledger(client.name)) == client.lines
    # FedAvg of a (+1) and b (+3), twice: the global B moved by 2 per round
    adapter = load_file(str(run.final().adapter))
    b_keys = [k for k in loaded.initial_adapter if "lora_B" in k]
    assert all(torch.allclose(adapter[k], loaded.initial_adapter[k] + 4.0) for k in b_keys)
    with safe_open(str(run.final().adapter), "pt") as f:
        record = AdapterRecord.from_metadata(f.metadata(), source="final")
    assert record is not None and record.model_fingerprint == loaded.base.fingerprint
    assert (record.run, record.rounds, record.dataset_fingerprint) == (next(iter(run_ids)), 2, "")
    assert read_json(run.final().metrics) == final and final["rounds"] == 2 and "blend_weight" in final
    assert run.final().prior.is_file() and run.checkpoint(2).adapter.is_file() and run.report_md.is_file()
    assert not run.failed.exists()


def test_a_killed_run_resumes_after_its_last_checkpoint_with_the_same_run_id(tmp_path: Path, loaded) -> None:
    cfg = config("fed.rounds=3")
    clients = [FakeClient("a"), FakeClient("b")]
    with pytest.raises(KeyboardInterrupt):
        run_server(InMemory(clients, crash_at_train=2), cfg, tmp_path / "run", num_clients=2, resume=False,
                   loaded=loaded)
    first_id = read_json(RunDir(tmp_path / "run").run_record)["run_id"]

    again = InMemory(clients)
    run_server(again, cfg, tmp_path / "run", num_clients=2, resume=True, loaded=loaded)

    assert [k for k, _ in again.sent][:2] == ["train", "evaluate"]  # the prior is not released twice
    assert [c[wire.ROUND] for k, c in again.sent if k == "train"] == [2, 3]
    assert {c[wire.RUN_ID] for _, c in again.sent} == {first_id}
    assert [r["round"] for r in read_jsonl(RunDir(tmp_path / "run").rounds)] == [1, 2, 3]


def test_a_round_no_client_trained_stops_the_run_with_failed_json(tmp_path: Path, loaded) -> None:
    cfg = config("prior.enabled=false")
    clients = [FakeClient("a", refuse_training=True), FakeClient("b", refuse_training=True)]

    out = run_server(InMemory(clients), cfg, tmp_path / "run", num_clients=2, resume=False, loaded=loaded)

    run = RunDir(tmp_path / "run")
    assert out["failed"].startswith("round 1: no client trained (2 refused, 0 failed)")
    assert json.loads(run.failed.read_text())["reason"] == out["failed"]
    assert not run.final().adapter.exists()


def test_an_impostor_is_a_failure_of_the_round_not_a_client(tmp_path: Path, loaded) -> None:
    cfg = config("prior.enabled=false", "fed.rounds=1")
    clients = [FakeClient("a"), FakeClient("b"), FakeClient("a")]  # node 3 claims node 1's name

    run_server(InMemory(clients), cfg, tmp_path / "run", num_clients=3, resume=False, loaded=loaded)

    [record] = read_jsonl(RunDir(tmp_path / "run").rounds)
    assert record["clients_ok"] == 2 and len(record["clients_failed"]) == 1
    assert "impersonation" in record["clients_failed"][0]


def test_secagg_rounds_apply_the_strategy_to_the_mean_and_fedprox_asks_its_term(tmp_path: Path,
                                                                               loaded) -> None:
    cfg = config("prior.enabled=false", "fed.rounds=1", "fed.secagg=true", 'fed.strategy="fedprox"',
                 "fed.proximal_mu=0.25")
    transport = InMemory([FakeClient("a", step=1.0), FakeClient("b", step=2.0)])

    run_server(transport, cfg, tmp_path / "run", num_clients=2, resume=False, loaded=loaded)

    [(kind, sent)] = [(k, c) for k, c in transport.sent if k == "secure-train"]
    assert sent[wire.PROXIMAL_MU] == 0.25
    [record] = read_jsonl(RunDir(tmp_path / "run").rounds)
    assert record["secagg"] and record["aggregated"] and record["bytes_down_per_client"] == 123
    adapter = load_file(str(RunDir(tmp_path / "run").final().adapter))
    assert all(torch.allclose(adapter[k], loaded.initial_adapter[k] + 1.5) for k in adapter if "lora_B" in k)


def test_the_server_says_what_it_waits_for(caplog) -> None:
    class Joining:
        def __init__(self) -> None:
            self.seen = [[1], [1, 2], [1, 2, 3]]

        def nodes(self) -> list[int]:
            return self.seen.pop(0) if len(self.seen) > 1 else self.seen[0]

    cfg = load_config(None, ["fed.clients=3"])
    caplog.set_level("INFO")

    nodes = rounds.wait_for_nodes(cast(Transport, Joining()), cfg, 3, poll=0.01)  # only nodes() is asked

    assert nodes == [1, 2, 3]
    assert "waiting for SuperNodes: 1 of 3 connected; the run needs fed.clients=3 (or num-clients in the " \
           "run config)" in caplog.text


def test_without_num_clients_the_run_takes_the_nodes_once_they_settle() -> None:
    class Joining:  # `flwr run .` with num-clients = 0: Flower's simulation registers its nodes at once
        def __init__(self) -> None:
            self.seen: list[list[int]] = [[], [], [1], [1, 2]]

        def nodes(self) -> list[int]:
            return self.seen.pop(0) if len(self.seen) > 1 else self.seen[0]

    assert rounds.settled_node_count(cast(Transport, Joining()), 5.0, settle=0.05, poll=0.01) == 2


def test_without_num_clients_and_no_node_the_run_stops_with_one_line() -> None:
    class Empty:
        def nodes(self) -> list[int]:
            return []

    with pytest.raises(ConfigError, match="no SuperNode connected in 0.05 s"):
        rounds.settled_node_count(cast(Transport, Empty()), 0.05, poll=0.01)
