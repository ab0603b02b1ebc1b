"""The private collaborative signal: popularity and item–item co-occurrence releases, and the CF score.

Two Gaussian releases, both at the user level (the privacy unit) and both charged to the party's
accountant and ledger as one-step, q = 1 mechanisms:

1. **popularity**: each user's distinct items as a 0/1 vector scaled to L2 norm ≤ `clip`; the sum
   over users gets N(0, (σ_pop·clip)²) per item. Sensitivity: one user moves it by ≤ clip.
2. **co-occurrence** over a head set H of items chosen from the *noisy* popularity (so choosing H
   is post-processing and costs nothing): each user's head-item 0/1 vector x is scaled to
   ‖x‖ ≤ √clip, so the user's outer product x xᵀ has Frobenius norm ≤ clip; the upper triangle
   (diagonal included) of the sum gets N(0, (σ_co·clip)²) per entry and is mirrored. Any H the
   coordinator picks keeps that bound, so H needs no trust.

Scoring (joint DP: a user's own history is used only for that user's ranking, at ranking time):
cosine similarity of the noisy co-occurrence with shrinkage, summed over the user's head history
items and divided by √(history length), plus β·log(1 + noisy popularity). The shrinkage grows with
the release's noise: max(shrink, NOISE_SHRINK·s), s the per-entry noise std of the (summed)
release, which is public (σ·clip of each party, in the ledgers), so it is post-processing. Measured
on MovieLens-100K validation users (3 noise draws each at ε = 8, 4, 1 and 3 parties at ε = 8),
a fixed shrink of 5 was right only at ε = 8; 8·s was within noise of the best fixed value at
every level (benchmarks/README.md).

Memory and bytes: popularity is one float32 per item (4 B·I); co-occurrence is M(M+1)/2 float32
for a head of M items (M = 300: 180 kB on the wire; 1,000: 2 MB). The head caps the cost
independently of the catalogue: at 10k or 100k items the release stays M², and only the head is
modelled collaboratively; the long tail is ranked by popularity and the LLM (which sees item
text, not counts). Per-user signal falls as 1/M with the unit-norm scaling, so M is kept to
what the population supports (~300 for 10³ users).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedrec.common.errors import ConfigError, DataError, PrivacyError
from fedrec.common.privacy.analysis import MechanismStep, calibrate_noise
from fedrec.common.privacy.mechanisms import MechanismRandom
from fedrec.common.rundir import ArtifactDir, atomic_write_bytes

# β values tried for the popularity term and weights tried for the blend, on validation users
PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
NOISE_SHRINK = 8.0  # cosine shrinkage per unit of the release's per-entry noise std (see the top)


# --- contributions ---------------------------------------------------------------------------


def user_items(histories: Sequence[Sequence[int]] | Sequence[np.ndarray], *,
               num_items: int) -> list[np.ndarray]:
    """Each user's distinct item indices (sorted int64), validated against the catalogue size."""
    out = []
    for u, items in enumerate(histories):
        raw = np.asarray(items)
        if raw.size and raw.dtype.kind not in "iu":
            raise DataError(f"contribution of user #{u} must hold integer item indices in [0, {num_items})")
        unique = np.unique(raw.astype(np.int64)) if raw.size else np.empty(0, np.int64)
        if unique.size and (unique[0] < 0 or unique[-1] >= num_items):
            raise DataError(f"contribution of user #{u} must hold integer item indices in [0, {num_items})")
        out.append(unique)
    return out


def popularity_sum(contributions: Sequence[np.ndarray], *, num_items: int, clip: float) -> np.ndarray:
    """Σ_u of each user's 0/1 item vector scaled to L2 norm ≤ clip -> (num_items,) float64."""
    total = np.zeros(num_items, dtype=np.float64)
    for items in contributions:
        if items.size:
            total[items] += min(1.0, clip / math.sqrt(items.size))
    return total


def cooccurrence_sum(contributions: Sequence[np.ndarray], *, head: np.ndarray, clip: float) -> np.ndarray:
    """Σ_u x_u x_uᵀ over the head items, ‖x_u‖² ≤ clip (so ‖x_u x_uᵀ‖_F ≤ clip) -> (M, M) float64."""
    position = {int(item): i for i, item in enumerate(head)}
    total = np.zeros((len(head), len(head)), dtype=np.float64)
    for items in contributions:
        rows = np.array([position[int(i)] for i in items if int(i) in position], dtype=np.int64)
        if rows.size == 0:
            continue
        scale = min(1.0, clip / rows.size)  # x = √scale·1 on rows: ‖x‖² = scale·|rows| ≤ clip
        total[np.ix_(rows, rows)] += scale
    return total


def per_user_norms(contributions: Sequence[np.ndarray], *, num_items: int, head: np.ndarray,
                   clip: float) -> tuple[np.ndarray, np.ndarray]:
    """(popularity L2 norm, co-occurrence Frobenius norm) of each user's contribution (for tests)."""
    pop = np.array([np.linalg.norm(popularity_sum([c], num_items=num_items,
                                                  clip=clip)) for c in contributions])
    co = np.array([np.linalg.norm(cooccurrence_sum([c], head=head, clip=clip)) for c in contributions])
    return pop, co


# --- noise -----------------------------------------------------------------------------------


def gaussian_noise(shape: tuple[int, ...], *, std: float,
                   rng: np.random.Generator | MechanismRandom) -> np.ndarray:
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape)


def noisy_popularity(
    contributions: Sequence[np.ndarray], *, num_items: int, clip: float, noise_multiplier: float,
    rng: np.random.Generator | MechanismRandom,
) -> np.ndarray:
    """The popularity release: clipped per-user sum + N(0, (σ·clip)²) per item -> (I,) float64."""
    _check_release(clip=clip, noise_multiplier=noise_multiplier)
    total = popularity_sum(contributions, num_items=num_items, clip=clip)
    return total + gaussian_noise(total.shape, std=noise_multiplier * clip, rng=rng)


def noisy_cooccurrence(
    contributions: Sequence[np.ndarray], *, head: np.ndarray, clip: float, noise_multiplier: float,
    rng: np.random.Generator | MechanismRandom,
) -> np.ndarray:
    """The co-occurrence release over `head`: symmetric (M, M) float64, noise on the upper triangle."""
    _check_release(clip=clip, noise_multiplier=noise_multiplier)
    total = cooccurrence_sum(contributions, head=head, clip=clip)
    m = len(head)
    upper = np.triu_indices(m)
    noise = np.zeros((m, m))
    noise[upper] = gaussian_noise((len(upper[0]),), std=noise_multiplier * clip, rng=rng)
    noise = noise + np.triu(noise, 1).T
    return total + noise


def private_counts(
    contributions: Sequence[Sequence[int]] | Sequence[np.ndarray], *, num_items: int, clip_norm: float,
    noise_multiplier: float, rng: np.random.Generator | MechanismRandom,
) -> np.ndarray:
    """Per-item user counts under the Gaussian mechanism (one step, q = 1) -> (num_items,) float64.

    Each user's distinct items form a 0/1 vector scaled by min(1, clip_norm/√k) so its L2 norm is
    ≤ clip_norm: adding or removing one user moves the sum by at most clip_norm (the sensitivity),
    and the sum gets N(0, (σ·clip_norm)²) per item. The caller records MechanismStep(σ, 1.0, 1).
    """
    _check_release(clip=clip_norm, noise_multiplier=noise_multiplier)
    return noisy_popularity(user_items(contributions, num_items=num_items), num_items=num_items,
                            clip=clip_norm, noise_multiplier=noise_multiplier, rng=rng)


def prior_noise(*, target_epsilon: float, delta: float, share: float, fixed: float | None = None,
                accountant: str = "rdp") -> float:
    """σ of a popularity release alone (q = 1): `fixed`, or the σ whose release costs share·ε."""
    return plan_releases(epsilon=target_epsilon, delta=delta, share=share, popularity_share=0.5,
                         cooccurrence=False, accountant=accountant, fixed_sigma=fixed).popularity_sigma


def _check_release(*, clip: float, noise_multiplier: float) -> None:
    if not _real(clip) or not 0 < clip < math.inf:
        raise PrivacyError(f"prior.clip_norm={clip!r} must be a finite number > 0")
    if not _real(noise_multiplier) or not 0 <= noise_multiplier < math.inf:
        raise PrivacyError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")


def _real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def head_items(popularity: np.ndarray, size: int) -> np.ndarray:
    """The `size` items with the largest (noisy) counts, sorted by index; ties by lower index."""
    size = min(int(size), len(popularity))
    if size <= 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((np.arange(len(popularity)), -np.asarray(popularity)))
    return np.sort(order[:size]).astype(np.int64)


@dataclass(frozen=True)
class ReleasePlan:
    """σ of the two releases; `steps` is what goes into the accountant and the ledger."""

    popularity_sigma: float
    cooccurrence_sigma: float | None  # None: no co-occurrence release

    @property
    def steps(self) -> list[MechanismStep]:
        out = [MechanismStep(noise_multiplier=self.popularity_sigma, sample_rate=1.0, steps=1)]
        if self.cooccurrence_sigma is not None:
            out.append(MechanismStep(noise_multiplier=self.cooccurrence_sigma, sample_rate=1.0, steps=1))
        return out


def plan_releases(
    *, epsilon: float, delta: float, share: float, popularity_share: float, cooccurrence: bool,
    accountant: str = "rdp", fixed_sigma: float | None = None,
) -> ReleasePlan:
    """σ of the releases whose composition alone costs `share`·ε.

    Two Gaussian releases at q = 1 compose (in RDP, exactly) like one Gaussian of σ_eff with
    σ_eff⁻² = σ_pop⁻² + σ_co⁻²; σ_eff is calibrated for share·ε and then split so that popularity
    takes `popularity_share` of the privacy loss: σ_pop = σ_eff/√share_pop, σ_co = σ_eff/√(1 − share_pop).
    """
    if fixed_sigma is not None:
        sigma = fixed_sigma
    else:
        sigma = calibrate_noise(target_epsilon=share * epsilon, delta=delta, sample_rate=1.0, steps=1,
                                accountant=accountant)
    if not cooccurrence:
        return ReleasePlan(sigma, None)
    if not 0 < popularity_share < 1:
        raise ConfigError(f"prior.popularity_share={popularity_share} must be between 0 and 1 (exclusive)")
    return ReleasePlan(sigma / math.sqrt(popularity_share), sigma / math.sqrt(1 - popularity_share))


# --- the released prior and its score -------------------------------------------------------


@dataclass(frozen=True)
class CollaborativePrior:
    """What the releases publish (summed over parties): noisy popularity, the head, co-occurrence."""

    popularity: np.ndarray  # (I,) noisy counts
    head: np.ndarray  # (M,) item indices, sorted
    cooccurrence: np.ndarray | None  # (M, M) symmetric noisy co-occurrence, None: popularity only
    noise_std: float = 0.0  # per-entry std of the co-occurrence noise (√Σ (σ·clip)² over parties)

    def __post_init__(self) -> None:
        validate_prior(self.popularity, self.head, self.cooccurrence)
        if not _real(self.noise_std) or not 0 <= self.noise_std < math.inf:
            raise DataError(f"noise_std={self.noise_std!r} must be a finite number >= 0")

    def shrinkage(self, shrink: float) -> float:
        """The cosine shrinkage used: `shrink`, raised to NOISE_SHRINK·noise_std for noisy releases."""
        return max(shrink, NOISE_SHRINK * self.noise_std)

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    def similarity(self, *, shrink: float) -> np.ndarray:
        """(M, M) cosine of the noisy co-occurrence with shrinkage (`shrinkage`); the diagonal set to 0."""
        if self.cooccurrence is None:
            return np.zeros((0, 0))
        c = self.cooccurrence
        diag = np.clip(np.diag(c), 1e-9, None)
        sim = c / (np.sqrt(np.outer(diag, diag)) + self.shrinkage(shrink))
        np.fill_diagonal(sim, 0.0)
        return sim

    def popularity_scores(self) -> np.ndarray:
        """(I,) log(1 + max(noisy count, 0))."""
        return np.log1p(np.clip(self.popularity, 0.0, None))

    def cf_scores(self, histories: Sequence[Sequence[int]], *, shrink: float) -> np.ndarray:
        """(U, I) item–item scores: Σ_{j ∈ history ∩ head} sim(j, ·) / √|history|; 0 off the head."""
        out = np.zeros((len(histories), self.num_items))
        if self.cooccurrence is None or not len(self.head):
            return out
        sim = self.similarity(shrink=shrink)
        out[:, self.head] = history_matrix(histories, self.head) @ sim
        return out

    def scores(self, histories: Sequence[Sequence[int]], *, beta: float, shrink: float) -> np.ndarray:
        """(U, I) the CF score: item–item part + β·log(1 + noisy popularity)."""
        return self.cf_scores(histories, shrink=shrink) + beta * self.popularity_scores()[None, :]

    def reasons(self, history: Sequence[int], item: int, *, shrink: float, top: int = 3) -> list[int]:
        """The history items whose similarity contributed most to `item`'s score (largest first)."""
        if self.cooccurrence is None:
            return []
        where = np.searchsorted(self.head, item)
        if where >= len(self.head) or self.head[where] != item:
            return []
        sim = self.similarity(shrink=shrink)[:, where]
        pos = {int(h): i for i, h in enumerate(self.head)}
        scored = [(float(sim[pos[j]]), j) for j in dict.fromkeys(int(j) for j in history) if j in pos]
        return [j for s, j in sorted(scored, reverse=True)[:top] if s > 0]

    # -- files --

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"popularity": self.popularity.astype(np.float32),
                                      "head": self.head.astype(np.int64)}
        if self.cooccurrence is not None:
            out["cooccurrence"] = self.cooccurrence.astype(np.float32)
            out["noise_std"] = np.array([self.noise_std], dtype=np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], *, source: str) -> CollaborativePrior:
        if "popularity" not in tensors:
            raise DataError(f"{source}: no 'popularity' tensor")
        pop = np.asarray(tensors["popularity"], dtype=np.float64)
        head = np.asarray(tensors.get("head", np.empty(0, np.int64)), dtype=np.int64)
        co = tensors.get("cooccurrence")
        noise = np.asarray(tensors.get("noise_std", np.zeros(1)), dtype=np.float64)  # absent: older runs
        if noise.shape != (1,):
            raise DataError(f"{source}: noise_std has shape {noise.shape}, expected (1,)")
        try:
            return cls(pop, head, None if co is None else np.asarray(co, dtype=np.float64), float(noise[0]))
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None


def history_matrix(histories: Sequence[Sequence[int]], head: np.ndarray) -> np.ndarray:
    """(U, M) 1/√|history| on each user's head items (distinct), 0 elsewhere."""
    pos = {int(h): i for i, h in enumerate(head)}
    out = np.zeros((len(histories), len(head)))
    for u, hist in enumerate(histories):
        cols = sorted({pos[int(j)] for j in hist if int(j) in pos})
        if cols:
            out[u, cols] = 1.0 / math.sqrt(max(1, len(set(hist))))
    return out


def validate_prior(popularity: np.ndarray, head: np.ndarray, cooccurrence: np.ndarray | None,
                   *, num_items: int | None = None) -> None:
    """Shapes, finiteness and index ranges of a prior (received or loaded); raises DataError."""
    if popularity.ndim != 1 or (num_items is not None and len(popularity) != num_items):
        raise DataError(f"popularity has shape {popularity.shape}, expected ({num_items or 'I'},)")
    if not np.isfinite(popularity).all():
        raise DataError("popularity holds NaN or infinite values")
    if head.ndim != 1 or (head.size and (head.min() < 0 or head.max() >= len(popularity))):
        raise DataError(f"head must be item indices in [0, {len(popularity)})")
    if head.size and np.any(np.diff(head) <= 0):
        raise DataError("head must be sorted and hold each item once")
    if cooccurrence is None:
        return
    m = len(head)
    if cooccurrence.shape != (m, m):
        raise DataError(f"co-occurrence has shape {cooccurrence.shape}, expected ({m}, {m})")
    if not np.isfinite(cooccurrence).all():
        raise DataError("co-occurrence holds NaN or infinite values")


def save_prior(directory: Path, prior: CollaborativePrior) -> None:
    """Write `directory/prior.safetensors` atomically (common/rundir.py)."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in prior.tensors().items()})
    atomic_write_bytes(ArtifactDir(directory).prior, data)


def load_prior(path: Path) -> CollaborativePrior:
    """The prior written by `save_prior` (a file path), validated."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as a prior: {exc}") from None
    return CollaborativePrior.from_tensors(dict(tensors), source=str(path))


def exact_prior(histories: Sequence[Sequence[int]], *, num_items: int, head_size: int,
                clip: float = 1.0) -> CollaborativePrior:
    """The same statistics without noise (the non-private baselines: popularity, item-kNN)."""
    contributions = user_items(histories, num_items=num_items)
    counts = np.zeros(num_items)
    for items in contributions:
        counts[items] += 1.0
    head = head_items(counts, head_size)
    return CollaborativePrior(counts, head, cooccurrence_sum(contributions, head=head, clip=clip))


def private_prior(
    histories: Sequence[Sequence[int]], *, num_items: int, plan: ReleasePlan, head_size: int,
    clip: float, rng: np.random.Generator | MechanismRandom,
) -> CollaborativePrior:
    """One party's two releases (the head chosen from its own noisy popularity)."""
    contributions = user_items(histories, num_items=num_items)
    pop = noisy_popularity(contributions, num_items=num_items, clip=clip,
                           noise_multiplier=plan.popularity_sigma, rng=rng)
    if plan.cooccurrence_sigma is None:
        return CollaborativePrior(pop, np.empty(0, np.int64), None)
    head = head_items(pop, head_size)
    co = noisy_cooccurrence(contributions, head=head, clip=clip, noise_multiplier=plan.cooccurrence_sigma,
                            rng=rng)
    return CollaborativePrior(pop, head, co, plan.cooccurrence_sigma * clip)
