"""LoRA adapters: attach (plain or FFA-LoRA), extract, validate and load the tensors that travel."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from fedrec.common.config import LoraConfig
from fedrec.common.errors import AdapterError
from fedrec.common.rundir import AdapterRecord, atomic_write_bytes
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save
from transformers import PreTrainedModel

TensorSpec = tuple[tuple[int, ...], torch.dtype]


def attach_lora(model: PreTrainedModel, cfg: LoraConfig, *, seed: int = 0) -> PeftModel:
    """Wrap `model` with LoRA; only LoRA tensors require grad (only B under FFA-LoRA).

    A is initialised from `seed`, so every party that attaches with the same seed holds the
    same A; FFA-LoRA relies on that, since A is never trained or sent.
    """
    num_layers = int(model.config.num_hidden_layers)
    layers = None
    if cfg.last_layers is not None:
        layers = list(range(max(0, num_layers - cfg.last_layers), num_layers))
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # PEFT annotates int, scales by any number
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    for name, param in peft_model.named_parameters():
        param.requires_grad = _is_trainable(name, cfg.variant)
    return peft_model


def _is_trainable(name: str, variant: str) -> bool:
    if variant == "ffa":
        return "lora_B" in name
    return "lora_A" in name or "lora_B" in name


def adapter_state(model: PeftModel, *, variant: str = "lora") -> dict[str, torch.Tensor]:
    """The adapter tensors (detached CPU copies); under FFA-LoRA only the B matrices."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    keys = [k for k in state if variant != "ffa" or "lora_B" in k]
    return {k: state[k].detach().to("cpu").clone().contiguous() for k in sorted(keys)}


def adapter_spec(model: PeftModel, *, variant: str = "lora") -> dict[str, TensorSpec]:
    """Expected key -> (shape, dtype) of what `adapter_state` returns for this model."""
    return {k: (tuple(v.shape), v.dtype) for k, v in adapter_state(model, variant=variant).items()}


def validate_adapter(
    tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec], *, source: str
) -> None:
    """Raise AdapterError unless `tensors` has exactly the expected keys, shapes, dtypes, finite values."""
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing or extra:
        raise AdapterError(
            f"adapter from {source}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(extra)} unexpected keys {extra[:3]}"
        )
    for key, (shape, dtype) in spec.items():
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"adapter from {source}: {key} is not a tensor")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise AdapterError(
                f"adapter from {source}: {key} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {shape} {dtype}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter from {source}: {key} has non-finite values")


def load_adapter(
    model: PeftModel, tensors: Mapping[str, torch.Tensor], *, variant: str = "lora", source: str
) -> None:
    """Validate `tensors` against the model's own adapter and load them in place."""
    validate_adapter(tensors, adapter_spec(model, variant=variant), source=source)
    result = set_peft_model_state_dict(model, dict(tensors))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterError(f"adapter from {source}: keys not in the model {unexpected[:3]}")


def save_adapter(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write tensors to a safetensors file atomically (common/rundir.py); returns its sha256.

    `metadata` holds the adapter's record (`AdapterRecord.to_metadata()`: the settings and the
    base model's and data set's fingerprints) beside any plain strings, in the same file."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in metadata.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """Read adapter tensors from a safetensors file (validation happens in `load_adapter`)."""
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise AdapterError(f"adapter file {path} cannot be read: {exc}") from None


def read_adapter_metadata(path: Path) -> dict[str, str]:
    """The metadata strings of an adapter file (its AdapterRecord among them, if it has one)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise AdapterError(f"adapter file {path} cannot be read: {exc}") from None


def read_adapter_record(path: Path) -> AdapterRecord | None:
    """The record saved beside the weights (None: a file written before records existed)."""
    return AdapterRecord.from_metadata(read_adapter_metadata(path), source=str(path))


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of adapter tensors, independent of file layout (keys in sorted order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(json.dumps([key, list(t.shape), str(t.dtype)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
