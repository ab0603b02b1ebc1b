"""Randomness of the DP mechanisms: the OS's CSPRNG, or a seeded stream for tests and benchmarks only.

Every Poisson mask and every noise draw of a release must be unpredictable to whoever sees the
release: if the coordinator could regenerate the noise (from `train.seed`, a client's name and
the round, as fedrec once did), it could subtract it. `MechanismRandom.secret()` reads every
uniform draw from `os.urandom` (the kernel's CSPRNG: getrandom(2) on Linux), so no setting, seed
or earlier output determines it; nothing needs to be reproducible, because a release is stored
and re-sent, never recomputed (client/state.py). `MechanismRandom.seeded(...)` is the
`--deterministic` switch: reproducible, and labelled "NOT private" wherever it is recorded.

Gaussians are drawn by Box–Muller from 53-bit uniforms. Against floating-point attacks on the
Gaussian sampler (Mironov 2012; arXiv 2107.10138) `normal(..., secure=True)` uses the same
construction as Opacus' `secure_mode`: the sum of four draws of std σ, halved.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

OS_ENTROPY = "os-entropy"
SEEDED = "seeded (deterministic, NOT private)"
_UNIT = 2.0 ** -53


class MechanismRandom:
    """A source of uniforms and Gaussians for DP mechanisms; numpy-Generator-like `random`/`normal`."""

    def __init__(self, generator: np.random.Generator | None) -> None:
        self._gen = generator  # None: the OS CSPRNG

    @classmethod
    def secret(cls) -> MechanismRandom:
        """Fresh OS entropy for every draw (the default everywhere)."""
        return cls(None)

    @classmethod
    def seeded(cls, seed: int, *purpose: str | int) -> MechanismRandom:
        """Deterministic from (seed, purpose...): for tests and benchmarks only, never private."""
        words = [int(seed) & 0xFFFFFFFF] + [
            zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF for p in purpose]
        return cls(np.random.default_rng(np.random.SeedSequence(words)))

    @property
    def deterministic(self) -> bool:
        return self._gen is not None

    @property
    def label(self) -> str:
        """What ran, as the ledger records it."""
        return SEEDED if self.deterministic else OS_ENTROPY

    def random(self, size: int | Sequence[int]) -> np.ndarray:
        """Uniforms in [0, 1), float64, of shape `size`."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        if self._gen is not None:
            return self._gen.random(shape)
        n = int(np.prod(shape, dtype=np.int64))
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return ((bits >> np.uint64(11)).astype(np.float64) * _UNIT).reshape(shape)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | Sequence[int] = 1, *,
               secure: bool = False) -> np.ndarray:
        """N(loc, scale²) draws of shape `size` (the signature of numpy's Generator.normal)."""
        if secure:  # Opacus' secure_mode construction: (z1 + z2 + z3 + z4)/2 has std `scale`
            total = sum(self.normal(0.0, scale, size) for _ in range(4))
            return loc + np.asarray(total) / 2
        shape = (size,) if isinstance(size, int) else tuple(size)
        if self._gen is not None:
            return self._gen.normal(loc, scale, shape)
        n = int(np.prod(shape, dtype=np.int64))
        u = self.random(2 * n)
        radius = np.sqrt(-2.0 * np.log1p(-u[:n]))  # 1 - u in (0, 1]: log is finite
        z = radius * np.cos(2.0 * np.pi * u[n:])
        return (loc + scale * z).reshape(shape)

    def generator(self) -> np.random.Generator:
        """A numpy Generator for the auxiliary draws of a release (training examples, negatives),
        seeded from this source: 256 secret bits, or the next seed of the deterministic stream."""
        if self._gen is not None:
            return np.random.default_rng(self._gen.integers(0, 2**63, size=4))
        return np.random.default_rng(np.frombuffer(os.urandom(32), dtype=np.uint64))


def mechanism_random(*, deterministic: bool, seed: int, purpose: Sequence[str | int]) -> MechanismRandom:
    """The source a release uses: secret, unless the caller's own settings ask for determinism."""
    return MechanismRandom.seeded(seed, *purpose) if deterministic else MechanismRandom.secret()
