"""LoRA: only adapter tensors train, FFA-LoRA trains B only, adapters round-trip and are validated."""

from pathlib import Path

import pytest
import torch
from fedrec.common.config import LoraConfig
from fedrec.common.errors import AdapterError
from fedrec.common.lora import (
    adapter_state,
    attach_lora,
    load_adapter,
    read_adapter,
    save_adapter,
    tensors_digest,
)


def test_only_lora_parameters_require_grad(tiny_model) -> None:
    model = attach_lora(tiny_model, LoraConfig(rank=4, last_layers=1))

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(".layers.1." in n for n in trainable)  # last_layers=1 of 2


def test_ffa_trains_and_sends_only_b(tiny_model) -> None:
    model = attach_lora(tiny_model, LoraConfig(rank=4, variant="ffa", last_layers=None))

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    sent = adapter_state(model, variant="ffa")

    assert trainable and all("lora_B" in n for n in trainable)
    assert sent and all("lora_B" in k for k in sent)


def test_same_seed_same_a(make_model) -> None:
    a = adapter_state(attach_lora(make_model(), LoraConfig(), seed=3))
    b = adapter_state(attach_lora(make_model(), LoraConfig(), seed=3))

    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_round_trip_allclose_no_base_keys(tiny_model, tmp_path: Path) -> None:
    model = attach_lora(tiny_model, LoraConfig(rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p))
    state = adapter_state(model)

    save_adapter(tmp_path / "a.safetensors", state, {"round": "1"})
    back = read_adapter(tmp_path / "a.safetensors")

    assert set(back) == set(state)
    assert all(torch.allclose(back[k], state[k]) for k in state)
    assert all("lora_" in k for k in back)
    assert tensors_digest(back) == tensors_digest(state)


def test_load_adapter_changes_model_output(tiny_model, tiny_tokenizer) -> None:
    model = attach_lora(tiny_model, LoraConfig(rank=4))
    ids = tiny_tokenizer("Toy Story (1995)", return_tensors="pt").input_ids
    before = model(ids).logits
    new = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}

    load_adapter(model, new, source="test")

    assert not torch.allclose(model(ids).logits, before)
    assert all(torch.equal(adapter_state(model)[k], new[k]) for k in new)


@pytest.mark.parametrize("defect", ["missing", "extra", "shape", "dtype", "nan"])
def test_received_adapter_is_validated(tiny_model, defect: str) -> None:
    model = attach_lora(tiny_model, LoraConfig(rank=4))
    state = adapter_state(model)
    key = next(iter(state))
    if defect == "missing":
        state.pop(key)
    elif defect == "extra":
        state["model.embed_tokens.weight"] = torch.zeros(3)
    elif defect == "shape":
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    elif defect == "dtype":
        state[key] = state[key].double()
    else:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    before = adapter_state(model)

    with pytest.raises(AdapterError, match="client-7"):
        load_adapter(model, state, source="client-7")

    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded


def test_corrupt_adapter_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot be read"):
        read_adapter(path)
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "none.safetensors")
