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

Randomness: the Poisson masks and the noise come from a `MechanismRandom` (common/privacy/mechanisms.py),
the OS CSPRNG unless the caller passes a seeded one (tests, benchmarks); Opacus' own noise path
would use torch's Mersenne Twister, so `SecretNoiseDPOptimizer` replaces only its `add_noise`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fedrec.common.catalogue import Catalogue
from fedrec.common.config import Config
from fedrec.common.prior import CollaborativePrior
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.mechanisms import MechanismRandom
from fedrec.common.recommender import ItemEncoder
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
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
    # Negatives per step: drawn uniformly from the public catalogue, shared by every user of the
    # step (they depend on no one's data); a user's own items are never their negatives.
    negatives: int = 0


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
        head=torch.as_tensor(prior.head), popularity=torch.as_tensor(prior.popularity_scores(),
                                                                     dtype=torch.float32),
        similarity=torch.as_tensor(prior.similarity(shrink=p.shrink), dtype=torch.float32),
        beta=p.beta, scale=p.residual_scale,
    )


def objective(cfg: Config) -> Objective:
    return Objective(window=cfg.data.max_history, max_len=cfg.train.max_sequence,
                     temperature=cfg.train.temperature, negatives=cfg.train.negatives)


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


@dataclass(frozen=True)
class StepItems:
    """What every user's loss in one step shares: the frozen catalogue, its centre, the negatives."""

    frozen: torch.Tensor  # (I, H) item states without the adapter effect
    inputs: torch.Tensor  # (I, D_in) the adapted module's inputs
    center: torch.Tensor  # (H,) sampled softmax: the catalogue mean of the current states (no gradient)
    negatives: torch.Tensor | None  # (K,) item indices; None: the whole catalogue (full softmax)
    log_kq: torch.Tensor  # (K,) log(K·Q_i) of each negative, Q the sampling distribution
    blocked: torch.Tensor | None = None  # (I,) bool: items outside training (cold-start protocol)


def step_items(encoder: ItemEncoder, catalogue: Catalogue, frozen: torch.Tensor,
               params: Mapping[str, torch.Tensor], negatives: torch.Tensor | None,
               proposal: torch.Tensor | None = None, blocked: torch.Tensor | None = None) -> StepItems:
    """`proposal` (I,): the distribution the negatives were drawn from (None: uniform)."""
    inputs = catalogue.inputs.to(encoder.device)
    if negatives is None:  # full softmax: the centre is taken inside the graph (_full_softmax_losses)
        return StepItems(frozen, inputs, torch.zeros(frozen.shape[1]), None, torch.zeros(0), blocked)
    with torch.no_grad():
        center = encoder.adapted_states(frozen, inputs, params).mean(dim=0)
    k = negatives.numel()
    q = proposal[negatives] if proposal is not None else torch.full((k,), 1.0 / frozen.shape[0])
    return StepItems(frozen, inputs, center, negatives, torch.log(k * q.double()).float(), blocked)


def user_losses(encoder: ItemEncoder, params: Mapping[str, torch.Tensor], seqs: torch.Tensor,
                cf: torch.Tensor | None, items: StepItems, *, objective: Objective) -> torch.Tensor:
    """(B,) each user's mean next-item cross-entropy over positions 1..T-1 of their sequence.

    seqs (B, T) left-padded with -1; cf (B, T-1, I) fixed CF logits or None; `params` shared or
    with a leading dimension B (one copy per user, for per-user gradients). Candidates of user b:
    their own T items (only the target's column is live at each position) and the K negatives.
    """
    if items.negatives is None:
        return _full_softmax_losses(encoder, params, seqs, cf, items, objective=objective)
    b, t = seqs.shape
    idx = torch.cat([seqs.clamp(min=0), items.negatives.expand(b, -1)], dim=1)  # (B, n)
    n = idx.shape[1]
    states = encoder.adapted_states(items.frozen[idx], items.inputs[idx], params)  # (B, n, H)
    vectors = F.normalize(states - items.center, dim=-1)
    valid = seqs >= 0  # (B, T)
    x = vectors[:, :t] * valid.unsqueeze(-1)
    csum = torch.cat([torch.zeros_like(x[:, :1]), torch.cumsum(x, dim=1)], dim=1)  # (B, T+1, H)
    pos = torch.arange(1, t)
    lo = (pos - objective.window).clamp(min=0)
    users = F.normalize(csum[:, pos] - csum[:, lo], dim=-1)  # (B, T-1, H) mean of the window
    logits = users @ vectors.transpose(1, 2) / objective.temperature  # (B, T-1, n)
    if cf is not None:
        logits = logits + cf.gather(2, idx.unsqueeze(1).expand(b, t - 1, n))
    column = torch.arange(n)
    # sampled softmax: a negative drawn with probability Q_i (K draws) is corrected by -log(K·Q_i)
    correction = torch.cat([torch.zeros(t), items.log_kq.to(logits.dtype)])  # (n,)
    logits = logits - correction
    live = (column[None, :] >= t) | (column[None, :] == pos[:, None])  # (T-1, n): target or negative
    mine = (idx[:, t:, None] == seqs[:, None, :]).any(dim=-1)  # (B, K) a negative that is the user's
    live = live[None] & ~torch.cat([torch.zeros((b, t), dtype=torch.bool), mine], dim=1)[:, None, :]
    logits = logits.masked_fill(~live, float("-inf"))
    ce = F.cross_entropy(logits.reshape(-1, n), pos.repeat(b), reduction="none").view(b, t - 1)
    weight = (valid[:, 1:] & (torch.cumsum(valid, dim=1)[:, :-1] > 0)).float()
    return (ce * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


def _full_softmax_losses(encoder: ItemEncoder, params: Mapping[str, torch.Tensor], seqs: torch.Tensor,
                         cf: torch.Tensor | None, items: StepItems, *, objective: Objective) -> torch.Tensor:
    """user_losses with the whole catalogue as candidates (held-out items excepted)."""
    b, t = seqs.shape
    logits, valid = full_softmax_logits(encoder, params, seqs, cf, items, objective=objective)
    targets = seqs[:, 1:].clamp(min=0)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none").view(b, t - 1)
    weight = (valid[:, 1:] & (torch.cumsum(valid, dim=1)[:, :-1] > 0)).float()
    return (ce * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


def full_softmax_logits(encoder: ItemEncoder, params: Mapping[str, torch.Tensor], seqs: torch.Tensor,
                        cf: torch.Tensor | None, items: StepItems, *,
                        objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1, I) logits of positions 1..T-1 over the catalogue (-inf for held-out items), and
    the (B, T) mask of real (unpadded) positions."""
    b, t = seqs.shape
    states = encoder.adapted_states(items.frozen, items.inputs, params)  # (I, H) or (B, I, H)
    # centred by the catalogue mean of these very states, inside the graph: measured, a constant
    # centre lets training drift all items together and the encoder stops improving
    vectors = F.normalize(states - states.mean(dim=-2, keepdim=True), dim=-1)
    if vectors.dim() == 2:
        vectors = vectors.expand(b, -1, -1)
    valid = seqs >= 0
    x = torch.gather(vectors, 1, seqs.clamp(min=0).unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))
    x = x * valid.unsqueeze(-1)  # (B, T, H)
    csum = torch.cat([torch.zeros_like(x[:, :1]), torch.cumsum(x, dim=1)], dim=1)
    pos = torch.arange(1, t)
    lo = (pos - objective.window).clamp(min=0)
    users = F.normalize(csum[:, pos] - csum[:, lo], dim=-1)  # (B, T-1, H)
    logits = users @ vectors.transpose(1, 2) / objective.temperature  # (B, T-1, I)
    if cf is not None:
        logits = logits + cf
    # The user's earlier items stay in the softmax (as negatives): measured, leaving them out
    # (as evaluation leaves the history out of the ranking) stopped the encoder from learning.
    if items.blocked is not None:
        logits = logits.masked_fill(items.blocked[None, None, :], float("-inf"))
    return logits, valid


def per_user_gradients(encoder: ItemEncoder, params: Mapping[str, torch.Tensor], seqs: torch.Tensor,
                       cf: torch.Tensor | None, items: StepItems, *, objective: Objective,
                       chunk: int = 32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-user gradients {name: (B, *shape)} and losses (B,) in one vectorised pass per chunk:
    every user gets a copy of the parameters, so one backward of Σ_u loss_u gives each copy the
    gradient of its own user's loss."""
    grads: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    losses = []
    for start in range(0, seqs.shape[0], chunk):
        part = seqs[start : start + chunk]
        copies = {k: v.detach().unsqueeze(0).repeat(part.shape[0], *([1] * v.dim())).requires_grad_(True)
                  for k, v in params.items()}
        part_cf = cf[start : start + chunk] if cf is not None else None
        loss = user_losses(encoder, copies, part, part_cf, items, objective=objective)
        for k, g in zip(copies, torch.autograd.grad(loss.sum(), list(copies.values())), strict=True):
            grads[k].append(g)
        losses.append(loss.detach())
    return {k: torch.cat(v) for k, v in grads.items()}, torch.cat(losses)


# --- the trainer ------------------------------------------------------------------------------


def proposal(popularity: np.ndarray | None, num_items: int, *, floor: float = 0.1) -> torch.Tensor | None:
    """(I,) negative-sampling distribution ∝ max(noisy count, 0) + floor·mean (None: uniform)."""
    if popularity is None:
        return None
    if len(popularity) != num_items:
        raise ValueError(f"popularity has {len(popularity)} items, the catalogue {num_items}")
    counts = torch.as_tensor(np.clip(popularity, 0.0, None), dtype=torch.double)
    weights = counts + floor * counts.mean().clamp(min=1e-9)
    return (weights / weights.sum()).double()


class SecretNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (clip, sum, scale, step hooks) with the noise drawn from a MechanismRandom.

    With `secure_mode` the draw is Opacus' secure construction (four Gaussians summed, halved),
    from this source instead of torch's generator.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: MechanismRandom, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[arg-type]
        self.noise_source = noise

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            draw = self.noise_source.normal(0.0, std, tuple(ref.shape), secure=self.secure_mode) \
                if std > 0 else np.zeros(tuple(ref.shape))
            noise = torch.from_numpy(np.asarray(draw)).to(device=ref.device, dtype=ref.dtype)
            p.grad = (ref + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


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
        seed: int = 0,
        rng: MechanismRandom | None = None,
        optimizer: str = "adam",
        popularity: np.ndarray | None = None,
        blocked_items: Sequence[int] = (),
    ) -> None:
        self.encoder, self.catalogue, self.objective, self.residual = encoder, catalogue, objective, residual
        self.users = sorted(u for u, s in sequences.items() if len(s) >= 2)
        self.seqs = pack([sequences[u] for u in self.users], max_len=objective.max_len)
        self.batch_size = batch_size
        # masks and noise: `rng` (a client passes MechanismRandom.secret(), the OS CSPRNG); None:
        # seeded by `seed`, deterministic and NOT private (tests, benchmarks)
        self.random = rng if rng is not None else MechanismRandom.seeded(seed, "trainer")
        self.rng = self.random.generator()  # negatives
        self.params = encoder.trainable()
        if not self.params:
            raise ValueError("the model has no trainable (LoRA) parameters")
        self.frozen = encoder.frozen_states(catalogue)  # (I, H), computed once
        # Negatives follow the (public, noisy) popularity where a prior was released: popular items
        # are the hard negatives, and the sampled softmax is corrected by log(K·Q)
        self.proposal = proposal(popularity, len(catalogue))
        # items that did not exist at training time (the cold-start protocol): never in a softmax
        self.blocked: torch.Tensor | None = None
        if len(blocked_items):
            self.blocked = torch.zeros(len(catalogue), dtype=torch.bool)
            self.blocked[torch.as_tensor(list(blocked_items), dtype=torch.long)] = True
        self.dp = dp
        # FedProx: after each step pull the weights towards the round's starting point,
        # w <- w - lr·mu·(w - w0). It depends on no data, so under DP it is post-processing.
        self.lr, self.proximal_mu = lr, proximal_mu
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()} if proximal_mu > 0 else None
        # The optimizer only post-processes the noisy sum; Adam by default, SGD where the update's
        # size must stay proportional to the gradient (the canary audit scores that size).
        params = list(self.params.values())
        base = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
        self.optimizer: torch.optim.Optimizer = base
        if dp is not None:
            if accountant is None:
                raise ValueError("DP training needs an accountant to record what it spends")
            dp_optimizer = SecretNoiseDPOptimizer(
                base, noise=self.random, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                expected_batch_size=dp.normaliser,  # a public constant: never the private user count
                secure_mode=dp.secure_rng,
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

    def _items(self) -> StepItems:
        """This step's shared items: fresh negatives (from the trainer's RNG), the centre."""
        num_items = len(self.catalogue)
        if self.objective.negatives == 0:  # full softmax
            return step_items(self.encoder, self.catalogue, self.frozen, self.params, None,
                              blocked=self.blocked)
        p = self.proposal.numpy() if self.proposal is not None else None
        if self.blocked is not None:
            p = p if p is not None else np.full(num_items, 1.0 / num_items)
            p = np.where(self.blocked.numpy(), 0.0, p)
            p = p / p.sum()
        negatives = torch.as_tensor(np.sort(self.rng.choice(num_items, size=self.objective.negatives, p=p)),
                                    dtype=torch.long)
        return step_items(self.encoder, self.catalogue, self.frozen, self.params, negatives, self.proposal,
                          self.blocked)

    def step(self, rows: torch.Tensor) -> float:
        """One optimizer step on these users (row indices); returns their mean loss."""
        self.encoder.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        items = self._items()
        if self.dp is None:
            if rows.numel() == 0:
                return float("nan")
            loss = user_losses(self.encoder, self.params, self.seqs[rows], self._cf(rows), items,
                               objective=self.objective).mean()
            loss.backward()
            self.optimizer.step()
            self._proximal()
            return loss.item()
        grads, mean_loss = self._dp_grads(rows, items)
        for k, p in self.params.items():
            p.grad_sample = grads[k]  # type: ignore[attr-defined]
        self.optimizer.step()  # Opacus: clip each user, sum, add N(0, σ²C²), divide by the normaliser
        self._proximal()
        return mean_loss

    def _dp_grads(self, rows: torch.Tensor, items: StepItems) -> tuple[dict[str, torch.Tensor], float]:
        """Per-user gradients {name: (B, *shape)} of these users, and their mean loss."""
        if rows.numel():
            grads, losses = per_user_gradients(self.encoder, self.params, self.seqs[rows], self._cf(rows),
                                               items,
                                               objective=self.objective)
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
            mask = self.random.random(len(self.users)) < self.sample_rate
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
