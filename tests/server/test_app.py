"""The ServerApp's reply parsing: the client's chained ledger line is kept verbatim, tensors that do
not match the digest in it are rejected, and so are bad client names, impersonation, non-finite,
misshapen or unbounded releases and invalid evaluation metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedrec.common import chain
from fedrec.common.lora import tensors_digest
from fedrec.server import app as server_app
from fedrec.server.validation import Identities, check_eval_metrics, check_release
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


# --- a malicious institution (issue 13): names, impersonation, poisoned releases, metrics ----


def named_reply(client: str, node: int, *, tensors: dict[str, torch.Tensor] | None = None,
                metrics: dict | None = None, ledger: dict | None = None) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type="train")
    content = RecordDict({"metrics": MetricRecord(metrics or {"epsilon": 1.5}),
                          "status": ConfigRecord({"status": "ok", "reason": "", "client": client})})
    if tensors is not None:
        content["arrays"] = ArrayRecord(torch_state_dict=tensors)
    if ledger is not None:
        content["ledger"] = ConfigRecord(ledger)
    return Message(content, reply_to=sent)


@pytest.mark.parametrize("name", ["../../etc/x", "a/b", ".hidden", "", "x" * 65, "a b", "c\\d"])
def test_a_bad_client_name_is_rejected_before_any_path_is_built(name: str) -> None:
    pairs, failures = server_app._parse([named_reply(name, 3)], None, 1, identities=Identities())

    assert pairs == [] and len(failures) == 1 and "not allowed" in failures[0]


def test_two_nodes_claiming_one_name_are_refused_and_a_node_cannot_change_its_name() -> None:
    ids = Identities()
    first, _ = server_app._parse([named_reply("hospital-a", 3)], None, 1, identities=ids)

    impostor, failures = server_app._parse([named_reply("hospital-a", 4)], None, 1, identities=ids)
    renamed, failures2 = server_app._parse([named_reply("clinic-b", 3)], None, 2, identities=ids)

    assert len(first) == 1
    assert impostor == [] and "impersonation" in failures[0]
    assert renamed == [] and "now claims" in failures2[0]


def prior_reply(client: str, node: int, counts: torch.Tensor, users: int = 10) -> server_app.Reply:
    tensors = {"counts": counts}
    entry = {"round": 0, "mechanism": "prior-counts", "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1,
             "clip_norm": 1.0, "delta": 1e-5, "epsilon": 0.5, "accountant": "rdp", "users": users,
             "run_id": "abc", "adapter_sha256": tensors_digest(tensors)}
    return server_app.Reply(client, "ok", "", {"epsilon": 0.5}, tensors, 0, chain.link(entry, []))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_nan_infinite_or_huge_counts_are_left_out_of_the_sum(poison: float) -> None:
    from fedrec.common.config import load_config

    state = server_app.ServerState(run_id="abc")
    honest = torch.tensor([3.0, 1.0, 0.5])
    bad = torch.tensor([poison, 0.0, 0.0])

    total, noise_std = server_app._sum_releases([prior_reply("a", 1, honest), prior_reply("b", 2, bad)],
                                                "counts", "prior-counts", state, load_config(None, []))

    assert total is not None and np.allclose(total, honest.numpy())
    assert set(state.ledgers) == {"a"}  # the rejected release is not summed nor recorded as used
    assert noise_std == pytest.approx(2.0)  # σ·clip of the one release summed, not of the rejected


def test_the_sum_carries_the_noise_std_of_the_releases_in_it() -> None:
    from fedrec.common.config import load_config

    state = server_app.ServerState(run_id="abc")
    _, noise_std = server_app._sum_releases([prior_reply(c, n, torch.ones(3)) for n, c in enumerate("abc", 1)],
                                            "counts", "prior-counts", state, load_config(None, []))

    assert noise_std == pytest.approx(2.0 * math.sqrt(3))  # independent Gaussians: variances add


def test_counts_of_the_wrong_shape_are_left_out() -> None:
    from fedrec.common.config import load_config

    state = server_app.ServerState(run_id="abc")
    total, _ = server_app._sum_releases([prior_reply("a", 1, torch.ones(3)), prior_reply("b", 2, torch.ones(4)),
                                         prior_reply("c", 3, torch.ones(3, 1))], "counts", "prior-counts", state,
                                        load_config(None, []))

    assert total is not None and total.shape == (3,) and set(state.ledgers) == {"a"}


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

    weights = server_app.test_weights(weight)

    assert weights[0] == weight and weights[-1] == 0.0  # the blend first, CF alone last
    assert check_evaluation(Policy(epsilon_budget=8.0), client="a", ks=None, betas=tuple(weights)) is None


def test_a_blend_weight_whose_lead_is_inside_the_evaluation_noise_is_not_taken() -> None:
    evaluation = {"betas": [0.0, 0.5, 1.0], "users": 900.0,
                  "metrics": {"ndcg@10": [0.05, 0.08, 0.06], "hr@10": [0.1, 0.1, 0.1], "mrr@10": [0.0, 0.0, 0.0]}}
    lines = [{"mechanism": "dp-eval", "split": "valid", "round": 3, "noise_multiplier": 11.0}] * 3
    noise = server_app.validation_noise({"a": lines[:1], "b": lines[1:2], "c": lines[2:]}, 3, evaluation)

    assert noise == pytest.approx(math.sqrt(3 * 11.0 ** 2 * 10) / 900.0)  # d = 1 + 9 values
    assert server_app.choose_released_weight(evaluation, "ndcg@10", noise) == 0.0  # +0.03 is inside ±0.1
    assert server_app.choose_released_weight(evaluation, "ndcg@10", 0.0) == 0.5  # exact metrics: the best
    assert server_app.validation_noise({"a": lines}, 2, evaluation) == 0.0  # another round's lines
