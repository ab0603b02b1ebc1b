"""Local training of the LoRA recommender, plain or under user-level DP-SGD (no Flower here).

Privacy unit = user. Each step Poisson-samples users with probability q; a sampled user
contributes the gradient of one loss term built only from that user's data (a next-item target
from their history, scored against negatives drawn uniformly from the public catalogue), so the
per-user gradient — item-side encodings included — is clipped as one unit by Opacus'
DPOptimizer, which also adds the noise; the step hook records (σ, q) in the accountant.

Randomness: the Poisson masks and the noise come from a `MechanismRandom` (common/randomness.py),
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
from fedrec.common.model import Recommender
from fedrec.common.privacy import PrivacyAccountant
from fedrec.common.randomness import MechanismRandom
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One user's training term: the prompt shows `history`, the model should rank `target` first."""

    history: tuple[int, ...]
    target: int
    negatives: tuple[int, ...]


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    secure_rng: bool = False


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    users_seen: int


def sample_example(
    sequence: Sequence[int], *, num_items: int, max_history: int, negatives: int, rng: np.random.Generator
) -> Example | None:
    """A random next-item example from one user's chronological training sequence."""
    if len(sequence) < 2:
        return None
    t = int(rng.integers(1, len(sequence)))
    history = tuple(sequence[max(0, t - max_history) : t])
    target = int(sequence[t])
    negs = rng.integers(0, num_items - 1, size=negatives)
    negs = np.where(negs >= target, negs + 1, negs)  # uniform over the catalogue minus the target
    return Example(history, target, tuple(int(n) for n in negs))


def example_losses(
    rec: Recommender, examples: Sequence[Example], item_titles: Sequence[str], item_texts: Sequence[str]
) -> torch.Tensor:
    """(B,) sampled-softmax losses; example b depends only on example b's user."""
    users = rec.encode_users([[item_titles[i] for i in ex.history] for ex in examples])  # (B, H)
    candidates = [[ex.target, *ex.negatives] for ex in examples]
    flat = [item_texts[i] for row in candidates for i in row]
    items = rec.encode_items(flat).view(len(examples), len(candidates[0]), -1)  # (B, 1+K, H)
    logits = torch.einsum("bh,bkh->bk", users, items) / rec.temperature  # (B, 1+K)
    labels = torch.zeros(len(examples), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels, reduction="none")


def per_user_gradients(
    rec: Recommender,
    params: Sequence[torch.nn.Parameter],
    examples: Sequence[Example],
    item_titles: Sequence[str],
    item_texts: Sequence[str],
) -> tuple[list[torch.Tensor], float]:
    """Per-user gradients stacked per parameter, (B, *p.shape) each, and the mean loss."""
    per_param: list[list[torch.Tensor]] = [[] for _ in params]
    total = 0.0
    for ex in examples:
        loss = example_losses(rec, [ex], item_titles, item_texts)[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for slot, g, p in zip(per_param, grads, params, strict=True):
            slot.append(torch.zeros_like(p) if g is None else g.detach())
        total += float(loss.detach())
    stacked = [torch.stack(slot) for slot in per_param]
    return stacked, total / max(1, len(examples))


def poisson_sample(users: Sequence[str], sample_rate: float,
                   rng: np.random.Generator | MechanismRandom) -> list[str]:
    """Each user independently with probability q (the sampling the accountant assumes)."""
    mask = rng.random(len(users)) < sample_rate
    return [u for u, keep in zip(users, mask, strict=True) if keep]


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
    """Runs plain or DP training steps over one party's users; stateless apart from the optimizer."""

    def __init__(
        self,
        rec: Recommender,
        *,
        item_titles: Sequence[str],
        item_texts: Sequence[str],
        sequences: Mapping[str, Sequence[int]],
        lr: float,
        batch_size: int,
        max_history: int,
        negatives: int,
        seed: int,
        dp: DPSettings | None = None,
        accountant: PrivacyAccountant | None = None,
        proximal_mu: float = 0.0,
        rng: MechanismRandom | None = None,
    ) -> None:
        """`rng`: where masks, noise and examples come from; None: seeded by `seed` (deterministic,
        NOT private: tests and benchmarks); a client passes MechanismRandom.secret()."""
        self.rec = rec
        self.item_titles, self.item_texts = item_titles, item_texts
        self.sequences = sequences
        self.users = sorted(sequences)
        self.batch_size, self.max_history, self.negatives = batch_size, max_history, negatives
        self.random = rng if rng is not None else MechanismRandom.seeded(seed, "trainer")
        self.rng = self.random.generator()  # examples and negatives
        self.params = [p for p in rec.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable (LoRA) parameters")
        self.dp = dp
        # FedProx: after each step pull the weights towards the round's starting point,
        # w <- w - lr·mu·(w - w0). It depends on no data, so under DP it is post-processing.
        self.lr, self.proximal_mu = lr, proximal_mu
        self.anchor = [p.detach().clone() for p in self.params] if proximal_mu > 0 else None
        base = torch.optim.Adam(self.params, lr=lr)
        self.optimizer: torch.optim.Optimizer = base
        if dp is not None:
            if accountant is None:
                raise ValueError("DP training needs an accountant to record what it spends")
            dp_optimizer = SecretNoiseDPOptimizer(
                base,
                noise=self.random,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.clip_norm,
                expected_batch_size=batch_size,  # a public constant: never the private user count
                secure_mode=dp.secure_rng,
            )
            dp_optimizer.attach_step_hook(accountant.make_step_hook(dp.sample_rate))
            self.optimizer = dp_optimizer

    @property
    def sample_rate(self) -> float:
        if self.dp is not None:
            return self.dp.sample_rate
        return min(1.0, self.batch_size / max(1, len(self.users)))

    def examples_for(self, users: Sequence[str]) -> list[Example]:
        num_items = len(self.item_texts)
        out = []
        for u in users:
            ex = sample_example(
                self.sequences[u], num_items=num_items, max_history=self.max_history,
                negatives=self.negatives, rng=self.rng,
            )
            if ex is not None:
                out.append(ex)
        return out

    def step(self, examples: Sequence[Example]) -> float:
        """One optimizer step on these users' examples; returns their mean loss."""
        self.rec.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp is None:
            if not examples:
                return float("nan")
            loss = example_losses(self.rec, examples, self.item_titles, self.item_texts).mean()
            loss.backward()
            self.optimizer.step()
            self._proximal()
            return loss.item()
        grads, mean_loss = self._dp_grads(examples)
        for p, g in zip(self.params, grads, strict=True):
            p.grad_sample = g  # type: ignore[attr-defined]
        self.optimizer.step()  # Opacus: clip each user, sum, add N(0, σ²C²), divide by E[B]
        self._proximal()
        return mean_loss if examples else float("nan")

    @torch.no_grad()
    def _proximal(self) -> None:
        if self.anchor is None:
            return
        for p, w0 in zip(self.params, self.anchor, strict=True):
            p.sub_(self.lr * self.proximal_mu * (p - w0))

    def _dp_grads(self, examples: Sequence[Example]) -> tuple[list[torch.Tensor], float]:
        if examples:
            return per_user_gradients(self.rec, self.params, examples, self.item_titles, self.item_texts)
        # an empty Poisson batch is still a step of the mechanism: pure noise, one zero row
        return [torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device) for p in self.params], 0.0

    def run(self, steps: int, *, progress: bool = True, desc: str = "train") -> TrainResult:
        """`steps` Poisson-sampled steps over this party's users."""
        losses, seen = [], 0
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            users = poisson_sample(self.users, self.sample_rate, self.random)
            examples = self.examples_for(users)
            loss = self.step(examples)
            seen += len(examples)
            if not math.isnan(loss):
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}", users=len(examples))
        mean = float(np.mean(losses)) if losses else float("nan")
        return TrainResult(steps=steps, mean_loss=mean, users_seen=seen)


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Steps whose expected number of user visits equals `epochs` passes."""
    return max(1, math.ceil(epochs / sample_rate))
