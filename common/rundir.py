"""The run directory: resolved config, per-round metrics, ledgers, checkpoints, final adapter."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from fedrec.common.config import Config, to_dict
from safetensors.numpy import load_file, save_file

PRIOR_COUNTS = "prior_counts.safetensors"  # the noisy item counts of the prior release, float32
PACKAGES = ("fedrec", "torch", "transformers", "peft", "opacus", "flwr", "numpy", "safetensors")


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """The Python version and the installed version of each package in `names`."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_prior_counts(directory: Path, counts: np.ndarray) -> None:
    """Write the prior's noisy item counts as `directory/prior_counts.safetensors`."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"counts": np.ascontiguousarray(counts, dtype=np.float32)}, str(directory / PRIOR_COUNTS))


def load_prior_counts(path: Path) -> np.ndarray:
    """The counts written by `save_prior_counts` (a file path), as float64."""
    return load_file(str(path))["counts"].astype(np.float64)


class RunDir:
    """Writes the files of one run; every write is atomic or an append of one whole line."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: Config, provenance: Mapping[str, Any]) -> None:
        doc = to_dict(config)
        doc["provenance"] = {**provenance, "versions": package_versions()}
        self.write_text("config.toml", tomli_w.dumps(_toml_safe(doc)))

    def append_jsonl(self, relative: str, record: Mapping[str, Any]) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_text(relative, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_text(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (empty list when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _toml_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _toml_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_toml_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
