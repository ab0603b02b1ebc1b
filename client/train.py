"""Local training of the item encoder's LoRA, plain or under user-level DP-SGD (no Flower here).

Objective (all positions, one user = one term): for each position t of a user's recent training
sequence, the user vector is the normalised mean of the item vectors of the `window` items
before t, and the model should rank item t first among the whole catalogue (full softmax over
cosine / τ). With a collaborative prior the logits are the fixed CF scores plus the LLM's, so
the LLM learns what CF misses (the residual). A user's loss uses only that user's sequence; the
item vectors are computed from public text and the parameters, so the gradient of one user's
loss — item side included — is that user's whole contribution.

Under DP, per-user gradients are computed in one vectorised pass (torch.func.vmap over users of
torch.func.grad), clipped and noised by Opacus' DPOptimizer, whose step hook records (σ, q) in
the accountant. Sampling is Poisson with a public rate q (1.0 by default: few, full-batch steps).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fedrec.common.config import Config
from fedrec.common.prior import CollaborativePrior
from fedrec.common.privacy import PrivacyAccountant
from fedrec.common.recommender import Catalogue, ItemEncoder, item_vectors
from opacus.optimizers import DPOptimizer
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    # Public normaliser of the noisy sum (Opacus' expected_batch_size). It never comes from the
    # private user count; with Adam the update's scale hardly depends on it.
    normaliser: int = 64
    secure_rng: bool = False


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    users_seen: int


@dataclass(frozen=True)
class Objective:
    """Settings of the all-position next-item loss."""

    window: int = 20  # history items pooled into the user vector
    max_len: int = 100  # most recent training items of a user that enter the loss
    temperature: float = 0.07


# --- the collaborative residual ---------------------------------------------------------------


@dataclass(frozen=True)
class ResidualCF:
    """Fixed CF logits the LLM adds to: scale·(Σ_{j<t} sim(j, ·)/√t + β·log(1 + popularity))."""

    head: torch.Tensor  # (M,) item indices
    similarity: torch.Tensor  # (M, M)
    popularity: torch.Tensor  # (I,) log(1 + noisy count)
    beta: float
    scale: float

    def logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, T) padded sequences (-1 = padding) -> (B, T-1, I) CF logits for predicting t = 1..T-1."""
        b, t = seqs.shape
        num_items = self.popularity.shape[0]
        position = torch.full((num_items,), -1, dtype=torch.long)
        position[self.head] = torch.arange(len(self.head))
        pos = torch.where(seqs >= 0, position[seqs.clamp(min=0)], torch.full_like(seqs, -1))  # (B, T)
        onehot = F.one_hot(pos.clamp(min=0), len(self.head)).float() * (pos >= 0).unsqueeze(-1)  # (B, T, M)
        seen = torch.cumsum((seqs >= 0).float(), dim=1)[:, :-1].clamp(min=1)  # items before t
        prefix = torch.cumsum(onehot, dim=1)[:, :-1] / seen.sqrt().unsqueeze(-1)  # (B, T-1, M)
        out = torch.zeros((b, t - 1, num_items))
        out[:, :, self.head] = prefix @ self.similarity
        return self.scale * (out + self.beta * self.popularity)


def residual_cf(prior: CollaborativePrior | None, cfg: Config) -> ResidualCF | None:
    """The fixed CF logits the LLM trains on top of (None without a co-occurrence release)."""
    if prior is None or prior.cooccurrence is None or cfg.prior.residual_scale == 0:
        return None
    p = cfg.prior
    return ResidualCF(
        head=torch.as_tensor(prior.head), popularity=torch.as_tensor(prior.popularity_scores(), dtype=torch.float32),
        similarity=torch.as_tensor(prior.similarity(shrink=p.shrink), dtype=torch.float32),
        beta=p.beta, scale=p.residual_scale,
    )


def objective(cfg: Config) -> Objective:
    return Objective(window=cfg.data.max_history, max_len=cfg.train.max_sequence,
                     temperature=cfg.train.temperature)


# --- the per-user loss --------------------------------------------------------------------------


def pack(sequences: Sequence[Sequence[int]], *, max_len: int) -> torch.Tensor:
    """(U, T) the last `max_len` items of each sequence, left-padded with -1."""
    t = max(2, min(max_len, max((len(s) for s in sequences), default=2)))
    out = torch.full((len(sequences), t), -1, dtype=torch.long)
    for u, s in enumerate(sequences):
        recent = list(s)[-t:]
        if recent:
            out[u, t - len(recent):] = torch.as_tensor(recent, dtype=torch.long)
    return out


def sequence_loss(vectors: torch.Tensor, seq: torch.Tensor, cf: torch.Tensor | None, *,
                  objective: Objective) -> torch.Tensor:
    """One user's mean next-item cross-entropy over positions 1..T-1. vectors (I, H), seq (T,)."""
    valid = seq >= 0  # (T,)
    x = vectors[seq.clamp(min=0)] * valid.unsqueeze(-1)  # (T, H)
    csum = torch.cat([torch.zeros_like(x[:1]), torch.cumsum(x, dim=0)])  # (T+1, H)
    t = torch.arange(1, seq.shape[0])
    lo = (t - objective.window).clamp(min=0)
    users = F.normalize(csum[t] - csum[lo], dim=-1)  # (T-1, H) mean of the window, normalised
    logits = users @ vectors.T / objective.temperature  # (T-1, I)
    if cf is not None:
        logits = logits + cf
    ce = F.cross_entropy(logits, seq[1:].clamp(min=0), reduction="none")
    has_history = (torch.cumsum(valid.float(), dim=0)[:-1] > 0).float()
    weight = valid[1:].float() * has_history
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def batch_losses(encoder: ItemEncoder, catalogue: Catalogue, params: Mapping[str, torch.Tensor],
                 seqs: torch.Tensor, cf: torch.Tensor | None, *, objective: Objective) -> torch.Tensor:
    """(B,) per-user losses (differentiable in params)."""
    vectors = item_vectors(encoder.states(catalogue, params))

    def one(seq: torch.Tensor, cf_u: torch.Tensor | None) -> torch.Tensor:
        return sequence_loss(vectors, seq, cf_u, objective=objective)

    return torch.func.vmap(one, in_dims=(0, 0 if cf is not None else None))(seqs, cf)


def per_user_gradients(encoder: ItemEncoder, catalogue: Catalogue, params: Mapping[str, torch.Tensor],
                       seqs: torch.Tensor, cf: torch.Tensor | None, *, objective: Objective,
                       chunk: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-user gradients {name: (B, *shape)} and losses (B,), vectorised with torch.func."""
    detached = {k: v.detach() for k, v in params.items()}

    def loss(p: dict[str, torch.Tensor], seq: torch.Tensor, cf_u: torch.Tensor | None) -> torch.Tensor:
        vectors = item_vectors(encoder.states(catalogue, p))
        return sequence_loss(vectors, seq, cf_u, objective=objective)

    grad_fn = torch.func.vmap(torch.func.grad_and_value(loss), in_dims=(None, 0, 0 if cf is not None else None))
    grads: dict[str, list[torch.Tensor]] = {k: [] for k in detached}
    losses = []
    for start in range(0, seqs.shape[0], chunk):
        part_cf = cf[start : start + chunk] if cf is not None else None
        g, value = grad_fn(detached, seqs[start : start + chunk], part_cf)
        for k in grads:
            grads[k].append(g[k])
        losses.append(value)
    return {k: torch.cat(v) for k, v in grads.items()}, torch.cat(losses)


# --- the trainer ------------------------------------------------------------------------------


def entropy_seed() -> int:
    """A seed from the OS's entropy source (what every private run uses)."""
    return secrets.randbits(63)


class LocalTrainer:
    """Runs plain or DP steps over one party's users; the optimizer is its only state."""

    def __init__(
        self,
        encoder: ItemEncoder,
        catalogue: Catalogue,
        sequences: Mapping[str, Sequence[int]],
        *,
        lr: float,
        batch_size: int,
        objective: Objective,
        residual: ResidualCF | None = None,
        dp: DPSettings | None = None,
        accountant: PrivacyAccountant | None = None,
        proximal_mu: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.encoder, self.catalogue, self.objective, self.residual = encoder, catalogue, objective, residual
        self.users = sorted(u for u, s in sequences.items() if len(s) >= 2)
        self.seqs = pack([sequences[u] for u in self.users], max_len=objective.max_len)
        self.batch_size = batch_size
        # seed None (every private run): sampling and noise from OS entropy, unpredictable to anyone
        self.rng = np.random.default_rng(seed if seed is not None else entropy_seed())
        self.params = encoder.trainable()
        if not self.params:
            raise ValueError("the model has no trainable (LoRA) parameters")
        self.dp = dp
        # FedProx: after each step pull the weights towards the round's starting point,
        # w <- w - lr·mu·(w - w0). It depends on no data, so under DP it is post-processing.
        self.lr, self.proximal_mu = lr, proximal_mu
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()} if proximal_mu > 0 else None
        base = torch.optim.Adam(list(self.params.values()), lr=lr)
        self.optimizer: torch.optim.Optimizer = base
        if dp is not None:
            if accountant is None:
                raise ValueError("DP training needs an accountant to record what it spends")
            noise = torch.Generator().manual_seed(seed if seed is not None else entropy_seed())
            dp_optimizer = DPOptimizer(
                base, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                expected_batch_size=dp.normaliser, secure_mode=dp.secure_rng,
                generator=None if dp.secure_rng else noise,
            )
            dp_optimizer.attach_step_hook(accountant.make_step_hook(dp.sample_rate))
            self.optimizer = dp_optimizer

    @property
    def sample_rate(self) -> float:
        if self.dp is not None:
            return self.dp.sample_rate
        return min(1.0, self.batch_size / max(1, len(self.users)))

    def _cf(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self.residual.logits(self.seqs[rows]) if self.residual is not None else None

    def step(self, rows: torch.Tensor) -> float:
        """One optimizer step on these users (row indices); returns their mean loss."""
        self.encoder.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp is None:
            if rows.numel() == 0:
                return float("nan")
            losses = batch_losses(self.encoder, self.catalogue, self.params, self.seqs[rows], self._cf(rows),
                                  objective=self.objective)
            loss = losses.mean()
            loss.backward()
            self.optimizer.step()
            self._proximal()
            return loss.item()
        grads, mean_loss = self._dp_grads(rows)
        for k, p in self.params.items():
            p.grad_sample = grads[k]  # type: ignore[attr-defined]
        self.optimizer.step()  # Opacus: clip each user, sum, add N(0, σ²C²), divide by the normaliser
        self._proximal()
        return mean_loss

    def _dp_grads(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """Per-user gradients {name: (B, *shape)} of these users, and their mean loss."""
        if rows.numel():
            grads, losses = per_user_gradients(self.encoder, self.catalogue, self.params, self.seqs[rows],
                                               self._cf(rows), objective=self.objective)
            return grads, float(losses.mean())
        # an empty Poisson batch is still a step of the mechanism: pure noise, one zero row
        return {k: torch.zeros((1, *p.shape)) for k, p in self.params.items()}, float("nan")

    @torch.no_grad()
    def _proximal(self) -> None:
        if self.anchor is None:
            return
        for k, p in self.params.items():
            p.sub_(self.lr * self.proximal_mu * (p - self.anchor[k]))

    def run(self, steps: int, *, progress: bool = True, desc: str = "train") -> TrainResult:
        """`steps` Poisson-sampled steps over this party's users."""
        losses, seen = [], 0
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            mask = self.rng.random(len(self.users)) < self.sample_rate
            rows = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)
            loss = self.step(rows)
            seen += int(rows.numel())
            if not math.isnan(loss):
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}", users=int(rows.numel()))
        mean = float(np.mean(losses)) if losses else float("nan")
        return TrainResult(steps=steps, mean_loss=mean, users_seen=seen)


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Steps whose expected number of user visits equals `epochs` passes."""
    return max(1, math.ceil(epochs / sample_rate))
