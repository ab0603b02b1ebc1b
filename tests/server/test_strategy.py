"""Aggregation with Flower's strategies equals hand-computed results; FedAdam state survives a restart."""

from __future__ import annotations

import pytest
import torch
from fedrec.common.config import load_config
from fedrec.server.strategy import aggregate, load_strategy_state, make_strategy, strategy_state
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def reply(node: int, tensors: dict[str, torch.Tensor], users: int) -> Message:
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord(torch_state_dict=tensors),
        "metrics": MetricRecord({"num-examples": float(users), "uniform": 1.0, "loss": 0.5}),
    })
    return Message(content, reply_to=ask)


A = "model.layers.1.self_attn.q_proj.lora_A.weight"
B = "model.layers.1.self_attn.q_proj.lora_B.weight"


def test_fedavg_weights_by_users() -> None:
    cfg = load_config(None, ['fed.strategy="fedavg"', 'fed.weighting="users"'])
    x1 = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[0.0], [4.0]])}
    x2 = {A: torch.tensor([[3.0, -2.0]]), B: torch.tensor([[8.0], [0.0]])}
    merged = aggregate(make_strategy(cfg, num_clients=2), 1, [reply(1, x1, 10), reply(2, x2, 30)])
    # by hand: (10·x1 + 30·x2) / 40
    assert torch.allclose(merged[A], torch.tensor([[2.5, -1.0]]))
    assert torch.allclose(merged[B], torch.tensor([[6.0], [1.0]]))


def test_uniform_weighting_ignores_user_counts() -> None:
    cfg = load_config(None, ['fed.weighting="uniform"'])
    x1 = {A: torch.tensor([[1.0, 2.0]])}
    x2 = {A: torch.tensor([[3.0, -2.0]])}
    merged = aggregate(make_strategy(cfg, num_clients=2), 1, [reply(1, x1, 10), reply(2, x2, 30)])
    assert torch.allclose(merged[A], torch.tensor([[2.0, 0.0]]))


def test_ffa_aggregates_b_exactly_while_lora_averages_factors() -> None:
    """FFA-LoRA: A is shared and fixed, so mean(B)·A is exactly the mean of the clients' B·A;
    averaging A and B separately (plain LoRA) is not the mean of the products."""
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b1, b2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    cfg = load_config(None, ['lora.variant="ffa"', 'fed.weighting="uniform"'])
    merged = aggregate(make_strategy(cfg, num_clients=2), 1, [reply(1, {B: b1}, 5), reply(2, {B: b2}, 5)])
    assert set(merged) == {B}
    assert torch.allclose(merged[B] @ a, (b1 @ a + b2 @ a) / 2)

    a1, a2 = a, torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    plain = aggregate(make_strategy(load_config(None, ['fed.weighting="uniform"']), num_clients=2), 1,
                      [reply(1, {A: a1, B: b1}, 5), reply(2, {A: a2, B: b2}, 5)])
    assert not torch.allclose(plain[B] @ plain[A], (b1 @ a1 + b2 @ a2) / 2)


def test_fedadam_resumed_from_saved_moments_continues_exactly() -> None:
    cfg = load_config(None, ['fed.strategy="fedadam"', "fed.server_lr=0.1"])
    updates = [torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 2.0]])]

    def round_(strategy, rnd: int, current: torch.Tensor) -> torch.Tensor:
        strategy.current_arrays = {A: current.numpy()}  # what configure_train sets each round
        return aggregate(strategy, rnd, [reply(1, {A: updates[rnd - 1]}, 3)])[A]

    straight = make_strategy(cfg, num_clients=1)
    x1 = round_(straight, 1, torch.zeros(1, 2))
    x2 = round_(straight, 2, x1)

    saved = strategy_state(make_and_run := make_strategy(cfg, num_clients=1)) or None
    assert saved is None  # nothing before the first round
    round_(make_and_run, 1, torch.zeros(1, 2))
    state = strategy_state(make_and_run)
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t"}
    restarted = make_strategy(cfg, num_clients=1)  # a new server process
    load_strategy_state(restarted, state)
    assert torch.allclose(round_(restarted, 2, x1), x2)
    without = make_strategy(cfg, num_clients=1)  # forgetting the moments gives another model
    assert not torch.allclose(round_(without, 2, x1), x2)
