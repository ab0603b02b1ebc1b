"""Aggregation of client adapters with Flower's strategies (FedAvg, FedProx, FedAdam).

Weighting. `fed.weighting = "users"` weights each client's adapter by its number of users — the
classic FedAvg weighting — which tells the server every client's user count each round (a
client's size can itself be sensitive, e.g. a small clinic). `"uniform"` gives every client the
same weight and the count is not used.

FFA-LoRA (`lora.variant = "ffa"`): A stays at its seeded initialisation on every party, so only
the B matrices travel and are averaged; averaging B alone is exact for the product B·A, unlike
averaging A and B separately in plain LoRA, whose mean of products differs from the product of
means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy


def weight_key(cfg: Config) -> str:
    return "num-examples" if cfg.fed.weighting == "users" else "uniform"


def make_strategy(cfg: Config, *, num_clients: int) -> Strategy:
    """The Flower strategy for cfg.fed.strategy, sampling every available client each round."""
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_clients,
        min_evaluate_nodes=num_clients, min_available_nodes=num_clients, weighted_by_key=weight_key(cfg),
    )
    if cfg.fed.strategy == "fedavg":
        return FedAvg(**common)  # type: ignore[arg-type]
    if cfg.fed.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.fed.proximal_mu, **common)  # type: ignore[arg-type]
    if cfg.fed.strategy == "fedadam":
        return FedAdam(eta=cfg.fed.server_lr, **common)  # type: ignore[arg-type]
    raise ConfigError(f"fed.strategy={cfg.fed.strategy!r} is not known")


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def aggregate(strategy: Strategy, rnd: int, replies: Iterable[Message]) -> dict[str, torch.Tensor] | None:
    """The strategy's aggregate of the replies' adapter tensors (None if there were none)."""
    arrays, _ = strategy.aggregate_train(rnd, list(replies))
    return None if arrays is None else from_record(arrays)


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """Server-optimizer moments (FedAdam m_t, v_t) so a resumed run continues exactly."""
    out: dict[str, torch.Tensor] = {}
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            out[f"{name}/{key}"] = torch.from_numpy(np.array(value))
    return out


def load_strategy_state(strategy: Strategy, state: Mapping[str, torch.Tensor]) -> None:
    for name in ("m_t", "v_t"):
        values = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(name + "/")}
        if values:
            setattr(strategy, name, values)

