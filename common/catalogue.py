"""The catalogue's frozen computation: what the base model computes for every item's public text,
once, cached on disk by model, prompt, adapted module and texts (common/recommender.py runs it)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from fedrec.common.rundir import atomic_write_bytes
from safetensors.torch import load_file, save

if TYPE_CHECKING:
    from fedrec.common.recommender import ItemEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Catalogue:
    """The frozen computation for every catalogue item at its prompt's last token."""

    inputs: torch.Tensor  # (I, D_in) input of the adapted module
    residual: torch.Tensor  # (I, H) what the adapted module's output is added to

    def __len__(self) -> int:
        return self.inputs.shape[0]


def catalogue_cached(encoder: ItemEncoder, texts: Sequence[str], *, cache_dir: Path | None,
                     model_fingerprint: str, batch_size: int = 32) -> Catalogue:
    """The frozen computation of a catalogue, cached on disk by model, prompt, target and texts."""
    key_src = "\n".join([model_fingerprint, *encoder.frozen_signature(), *texts])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = cache_dir / "catalogue" / f"{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            t = load_file(str(path))
            if t["inputs"].shape[0] == len(texts):  # copies: the file may change under a mapping
                return Catalogue(t["inputs"].clone(), t["residual"].clone())
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed
            log.warning("catalogue cache %s unreadable (%s); recomputing", path, exc)
    catalogue = encoder.trunk(list(texts), batch_size=batch_size, progress=len(texts) > 256)
    if path is not None:  # simulated clients may write it at once: each rename is whole
        atomic_write_bytes(path, save({"inputs": catalogue.inputs.contiguous(),
                                       "residual": catalogue.residual.contiguous()}))
    return catalogue
