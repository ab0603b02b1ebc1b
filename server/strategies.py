"""Aggregation of the clients' adapters: FedAvg, FedProx and FedAdam as small Flower-free classes.

Each strategy does two things: it may add to the request every client gets (`configure_train`:
FedProx adds its proximal term), and it turns the replies that trained into the next global
adapter (`aggregate_train`: the weighted mean, then the server's `update`, which FedAdam makes an
Adam step). The update rules and defaults are those of Flower 1.42's `flwr.serverapp.strategy`
classes; tests/server/test_strategy.py checks FedAdam against Flower's own on the same inputs.

Weighting. `fed.weighting = "users"` weights each client's adapter by its `num-examples` metric —
the classic FedAvg weighting, which would tell the server every client's user count each round
(a client's size can itself be sensitive, e.g. a small clinic), so fedrec's clients send 1.
`"uniform"` gives every client the same weight and the count is not used.

FFA-LoRA (`lora.variant = "ffa"`): A stays at its seeded initialisation on every party, so only
the B matrices travel and are averaged; averaging B alone is exact for the product B·A, unlike
averaging A and B separately in plain LoRA, whose mean of products differs from the product of
means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from fedrec.common import wire
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError, DataError
from fedrec.common.wire import Reply, RoundRequest

Tensors = dict[str, torch.Tensor]
MOMENTS = ("m_t", "v_t")  # FedAdam's state: "m_t/<tensor name>", "v_t/<tensor name>"


def weight_key(cfg: Config) -> str:
    """The reply metric each client's adapter is weighted by (`fed.weighting`)."""
    return wire.NUM_EXAMPLES if cfg.fed.weighting == "users" else wire.UNIFORM


def make_strategy(cfg: Config) -> FedAvg:
    """The strategy `fed.strategy` names, weighting replies by `fed.weighting`."""
    key = weight_key(cfg)
    if cfg.fed.strategy == "fedavg":
        return FedAvg(weight_key=key)
    if cfg.fed.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.fed.proximal_mu, weight_key=key)
    if cfg.fed.strategy == "fedadam":
        return FedAdam(eta=cfg.fed.server_lr, weight_key=key)
    raise ConfigError(f"fed.strategy={cfg.fed.strategy!r} is not known; use fedavg, fedprox or fedadam")


def weighted_mean(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Σ wᵢ·xᵢ / Σ wᵢ per tensor name, accumulated as Flower's `aggregate_arrayrecords` does."""
    total = float(sum(weights))
    if not tensors or not total > 0:
        raise DataError(f"no weighted mean of {len(tensors)} adapters with total weight {total}")
    mean: Tensors = {}
    for x, w in zip(tensors, weights, strict=True):
        for key, value in x.items():
            term = value * (w / total)
            mean[key] = term if key not in mean else mean[key] + term
    return mean


class FedAvg:
    """The weighted mean of the adapters that trained (McMahan et al., 2017)."""

    def __init__(self, *, weight_key: str = wire.NUM_EXAMPLES) -> None:
        self.weight_key = weight_key

    def configure_train(self, request: RoundRequest) -> RoundRequest:
        """The request every client gets in a training round (FedAvg adds nothing)."""
        return request

    def weight(self, reply: Reply) -> float:
        return float(reply.metrics[self.weight_key])

    def aggregate_train(self, rnd: int, current: Mapping[str, torch.Tensor],
                        replies: Sequence[Reply]) -> Tensors | None:
        """The next global adapter from the replies that trained (None when there are none)."""
        if not replies:
            return None
        mean = weighted_mean([r.tensors for r in replies], [self.weight(r) for r in replies])
        return self.update(rnd, current, mean)

    def update(self, rnd: int, current: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
               ) -> Tensors:
        """The server's step from the current adapter given the clients' mean: FedAvg takes the mean
        (also the entry point of a SecAgg+ round, where the server sees the mean only)."""
        return dict(mean)

    def state_dict(self) -> Tensors:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise DataError(f"{type(self).__name__} keeps no state, but the checkpoint holds "
                            f"{sorted(state)[:3]}; was it written by another fed.strategy?")


class FedProx(FedAvg):
    """FedAvg whose clients add (μ/2)·‖w − w_global‖² to their loss (Li et al., 2020)."""

    def __init__(self, *, proximal_mu: float, weight_key: str = wire.NUM_EXAMPLES) -> None:
        super().__init__(weight_key=weight_key)
        self.proximal_mu = proximal_mu

    def configure_train(self, request: RoundRequest) -> RoundRequest:
        return replace(super().configure_train(request), proximal_mu=self.proximal_mu)


class FedAdam(FedAvg):
    """Adam on the server, the clients' mean minus the current adapter as its pseudo-gradient
    (Reddi et al., 2020), exactly as Flower 1.42's `FedAdam.aggregate_train`."""

    def __init__(self, *, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 weight_key: str = wire.NUM_EXAMPLES) -> None:
        super().__init__(weight_key=weight_key)
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.m_t: Tensors = {}
        self.v_t: Tensors = {}

    def update(self, rnd: int, current: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
               ) -> Tensors:
        _check_same_tensors(mean, current, what="the clients' mean")
        delta = {k: x - current[k] for k, x in mean.items()}
        m_t = self.m_t or {k: torch.zeros_like(x) for k, x in mean.items()}
        v_t = self.v_t or {k: torch.zeros_like(x) for k, x in mean.items()}
        _check_same_tensors(m_t, current, what="the server optimizer's moments")
        self.m_t = {k: self.beta_1 * m + (1 - self.beta_1) * delta[k] for k, m in m_t.items()}
        self.v_t = {k: self.beta_2 * v + (1 - self.beta_2) * delta[k] ** 2 for k, v in v_t.items()}
        # Adam's bias-corrected step size (Kingma & Ba, 2014), Flower's `eta_norm`
        eta_norm = self.eta * math.sqrt(1 - self.beta_2 ** (rnd + 1.0)) / (1 - self.beta_1 ** (rnd + 1.0))
        return {k: self._step(x, eta_norm, self.m_t[k], self.v_t[k]) for k, x in current.items()}

    def _step(self, x: torch.Tensor, eta_norm: float, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x + η·m / (√v + τ) with numpy's arithmetic, so that it equals Flower's to the last bit:
        the step in float64 (numpy promotes the float64 η there), √v correctly rounded in v's dtype
        (torch's float32 sqrt is not, on every CPU: it is taken in float64 and rounded back)."""
        root = v.double().sqrt().to(v.dtype)
        return (x.double() + eta_norm * m.double() / (root + self.tau).double()).to(x.dtype)

    def state_dict(self) -> Tensors:
        """The moments m_t, v_t (empty before the first round), so a resumed run continues exactly."""
        return {f"{name}/{k}": v.clone() for name in MOMENTS for k, v in getattr(self, name).items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        moments: dict[str, Tensors] = {name: {} for name in MOMENTS}
        for key, value in state.items():
            name, _, tensor = key.partition("/")
            if name not in moments or not tensor:
                raise DataError(f"FedAdam state: unexpected entry {key!r} (expected m_t/<name>, v_t/<name>)")
            moments[name][tensor] = value
        m_t, v_t = moments["m_t"], moments["v_t"]
        _check_same_tensors(v_t, m_t, what="FedAdam state v_t")
        for key in m_t:
            finite = torch.isfinite(m_t[key]).all() and torch.isfinite(v_t[key]).all()
            if not (finite and (v_t[key] >= 0).all()):
                raise DataError(f"FedAdam state of {key!r}: non-finite moments or a negative v_t")
        self.m_t = {k: v.clone() for k, v in m_t.items()}
        self.v_t = {k: v.clone() for k, v in v_t.items()}


def _check_same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, what: str) -> None:
    """`a` has the tensor names and shapes of `b` (no broadcasting), else a DataError naming `what`."""
    if set(a) != set(b):
        raise DataError(f"{what} holds tensors {sorted(set(a) ^ set(b))[:3]} that the adapter does not "
                        "(or lacks them)")
    for key, x in a.items():
        if x.shape != b[key].shape:
            raise DataError(f"{what}: {key!r} has shape {tuple(x.shape)}, expected {tuple(b[key].shape)}")
