"""Aggregation equals hand-computed results and Flower's own FedAdam; the state survives a restart."""

from __future__ import annotations

import time

import pytest
import torch
from fedrec.common import wire
from fedrec.common.config import load_config
from fedrec.common.errors import DataError
from fedrec.common.wire import Reply, RoundRequest
from fedrec.server.strategies import FedAdam, FedAvg, FedProx, make_strategy
from flwr.app import DEFAULT_TTL, ArrayRecord, MetricRecord, RecordDict
from flwr.app.message import Message, make_message
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam


def reply(tensors: dict[str, torch.Tensor], users: int) -> Reply:
    return Reply(wire.OK, {"num-examples": float(users), "uniform": 1.0, "loss": 0.5}, tensors)


A = "model.layers.1.self_attn.q_proj.lora_A.weight"
B = "model.layers.1.self_attn.q_proj.lora_B.weight"


def test_fedavg_weights_by_users() -> None:
    cfg = load_config(None, ['fed.strategy="fedavg"', 'fed.weighting="users"'])
    x1 = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[0.0], [4.0]])}
    x2 = {A: torch.tensor([[3.0, -2.0]]), B: torch.tensor([[8.0], [0.0]])}
    merged = make_strategy(cfg).aggregate_train(1, x1, [reply(x1, 10), reply(x2, 30)])
    # by hand: (10·x1 + 30·x2) / 40
    assert torch.allclose(merged[A], torch.tensor([[2.5, -1.0]]))
    assert torch.allclose(merged[B], torch.tensor([[6.0], [1.0]]))


def test_uniform_weighting_ignores_user_counts() -> None:
    cfg = load_config(None, ['fed.weighting="uniform"'])
    x1 = {A: torch.tensor([[1.0, 2.0]])}
    x2 = {A: torch.tensor([[3.0, -2.0]])}
    merged = make_strategy(cfg).aggregate_train(1, x1, [reply(x1, 10), reply(x2, 30)])
    assert torch.allclose(merged[A], torch.tensor([[2.0, 0.0]]))


def test_no_reply_leaves_nothing_to_aggregate() -> None:
    assert FedAvg().aggregate_train(1, {A: torch.zeros(1, 2)}, []) is None


def test_ffa_aggregates_b_exactly_while_lora_averages_factors() -> None:
    """FFA-LoRA: A is shared and fixed, so mean(B)·A is exactly the mean of the clients' B·A;
    averaging A and B separately (plain LoRA) is not the mean of the products."""
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b1, b2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    cfg = load_config(None, ['lora.variant="ffa"', 'fed.weighting="uniform"'])
    merged = make_strategy(cfg).aggregate_train(1, {B: b1}, [reply({B: b1}, 5), reply({B: b2}, 5)])
    assert set(merged) == {B}
    assert torch.allclose(merged[B] @ a, (b1 @ a + b2 @ a) / 2)

    a1, a2 = a, torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    plain = make_strategy(load_config(None, ['fed.weighting="uniform"'])).aggregate_train(
        1, {A: a1, B: b1}, [reply({A: a1, B: b1}, 5), reply({A: a2, B: b2}, 5)])
    assert not torch.allclose(plain[B] @ plain[A], (b1 @ a1 + b2 @ a2) / 2)


def test_fedprox_adds_its_proximal_term_to_the_request_and_fedavg_does_not() -> None:
    request = RoundRequest(run_id="r", round=1, num_rounds=2, local_epochs=0.5, lr=0.01)
    prox = make_strategy(load_config(None, ['fed.strategy="fedprox"', "fed.proximal_mu=0.3"]))

    assert isinstance(prox, FedProx)
    assert prox.configure_train(request).to_config()[wire.PROXIMAL_MU] == 0.3
    assert wire.PROXIMAL_MU not in make_strategy(load_config(None, [])).configure_train(request).to_config()
    assert RoundRequest.from_config(prox.configure_train(request).to_config()).proximal_mu == 0.3


# --- FedAdam: Flower's update rule, and its moments across a restart ---------------------------


def flower_reply(node: int, tensors: dict[str, torch.Tensor], users: int) -> Message:
    """A reply as Flower's Grid hands it to a strategy; its metadata made with Flower's public
    `Metadata` and `make_message` (no Flower runtime, no task identity in this process)."""
    meta = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"ask-{node}", group_id="", created_at=time.time(), ttl=DEFAULT_TTL,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=tensors),
                          "metrics": MetricRecord({"num-examples": float(users)})})
    return make_message(meta, content)


def test_fedadam_equals_flowers_fedadam_over_three_rounds() -> None:
    ours, theirs = FedAdam(eta=0.1), FlowerFedAdam(eta=0.1)
    g = torch.Generator().manual_seed(0)
    current = {A: torch.randn(2, 3, generator=g), B: torch.zeros(3, 2)}

    for rnd in (1, 2, 3):
        updates = [({k: v + torch.randn(v.shape, generator=g) for k, v in current.items()}, users)
                   for users in (3, 5)]
        theirs.current_arrays = {k: v.numpy() for k, v in current.items()}  # what configure_train keeps
        arrays, _ = theirs.aggregate_train(rnd, [flower_reply(n, x, u) for n, (x, u) in enumerate(updates, 1)])
        expected = {k: v.to(torch.float32) for k, v in arrays.to_torch_state_dict().items()}
        got = ours.aggregate_train(rnd, current, [reply(x, u) for x, u in updates])
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in got), rnd
        current = got


def test_fedadam_resumed_from_saved_moments_continues_exactly() -> None:
    cfg = load_config(None, ['fed.strategy="fedadam"', "fed.server_lr=0.1"])
    updates = [torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 2.0]])]

    def round_(strategy, rnd: int, current: torch.Tensor) -> torch.Tensor:
        return strategy.aggregate_train(rnd, {A: current}, [reply({A: updates[rnd - 1]}, 3)])[A]

    straight = make_strategy(cfg)
    x1 = round_(straight, 1, torch.zeros(1, 2))
    x2 = round_(straight, 2, x1)

    saved = (make_and_run := make_strategy(cfg)).state_dict() or None
    assert saved is None  # nothing before the first round
    round_(make_and_run, 1, torch.zeros(1, 2))
    state = make_and_run.state_dict()
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t"}
    restarted = make_strategy(cfg)  # a new server process
    restarted.load_state_dict(state)
    assert torch.allclose(round_(restarted, 2, x1), x2)
    without = make_strategy(cfg)  # forgetting the moments gives another model
    assert not torch.allclose(round_(without, 2, x1), x2)


@pytest.mark.parametrize("state", [
    {"m_t/w": torch.zeros(2)},  # no v_t for w
    {"m_t/w": torch.zeros(2), "v_t/w": torch.zeros(3)},  # shapes differ
    {"m_t/w": torch.zeros(2), "v_t/w": torch.tensor([1.0, float("nan")])},
    {"m_t/w": torch.zeros(2), "v_t/w": torch.tensor([1.0, -1.0])},  # a second moment below 0
    {"momentum/w": torch.zeros(2)},
])
def test_fedadam_refuses_a_damaged_state(state: dict[str, torch.Tensor]) -> None:
    strategy = FedAdam()

    with pytest.raises(DataError):
        strategy.load_state_dict(state)
    assert strategy.state_dict() == {}  # nothing half-loaded


def test_fedavg_refuses_state_written_by_another_strategy() -> None:
    with pytest.raises(DataError, match="another fed.strategy"):
        FedAvg().load_state_dict({"m_t/w": torch.zeros(2)})
