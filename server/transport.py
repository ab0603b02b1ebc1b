"""How the round loop reaches the clients: a request as plain values, the replies that come back
as wire records, and the `Transport` protocol that carries one to the other (server/app.py over
Flower's Grid; tests/server/test_rounds.py in memory). No Flower here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from fedrec.common.wire import Reply

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Request:
    """One request as plain values, sent alike to every node: its kind (a wire message type), its
    config (RoundRequest / EvalRequest `to_config()`) and the tensors it carries."""

    kind: str
    config: dict[str, Any]
    adapter: Mapping[str, torch.Tensor] | None = None  # the global adapter (train, evaluate)
    prior: Mapping[str, np.ndarray] | None = None  # the global prior (CollaborativePrior.tensors())
    head: np.ndarray | None = None  # the items a co-occurrence release is asked over


@dataclass
class Batch:
    """What came back: each answering node's reply (its `client` the name it gave, unchecked), and
    one line per node that failed (an error, a timeout, a reply that does not parse)."""

    replies: list[tuple[int, Reply]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class SecureBatch(Batch):
    """A SecAgg+ round: the replies carry status and scalars only; the tensors arrive as their
    weighted mean (None when nothing could be unmasked)."""

    mean: Tensors | None = None
    bytes_down: int = 0  # all payload bytes sent to the clients in the round's four stages


class Transport(Protocol):
    """How the round loop reaches the clients."""

    def nodes(self) -> list[int]:
        """The ids of the nodes connected now."""
        ...

    def send(self, request: Request, nodes: Sequence[int]) -> Batch:
        """`request` to each of `nodes`; their replies parsed, failures named."""
        ...

    def secure_train(self, request: Request, nodes: Sequence[int], weight_key: str) -> SecureBatch:
        """A training round under SecAgg+, each client weighted by its `weight_key` metric."""
        ...
