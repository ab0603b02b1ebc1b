"""The LLM recommender: a LoRA-adapted LM as item encoder over public text, users as pooled item vectors.

An item's vector is the LM's last-token state of its prompt (`Item: <title> (<year>) | <genres>`)
after the final norm, minus the catalogue mean (public), L2-normalised. LoRA sits only on one
module of the last block (by default `down_proj`, a per-token map whose output is added to the
residual stream), so everything below it is frozen and computed once per catalogue: the
module's input `a` and the residual `r` it is added to, at the prompt's last token. An item
vector then costs one call of the adapted module: final_norm(r + adapted(a)).

A user is the normalised mean of the vectors of their last `history` items (a warm user is
scored with one matrix–vector product); a sentence about one's taste is encoded with the same
item prompt, so text queries live in the same space. score = cosine / τ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fedrec.common.catalogue import Catalogue
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError
from fedrec.common.model import BaseModel, load_base_model, pick_device
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

ITEM_PROMPT = "Item: {text}"
_A, _B = "lora_A.default.weight", "lora_B.default.weight"  # the adapted module's LoRA parameters
_NORM_NAMES = ("norm", "ln_f", "final_layernorm")
_LAYER_NAMES = ("layers", "h", "blocks")


class ItemEncoder:
    """Runs the frozen trunk once per catalogue and the adapted module per step."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, target: str, max_tokens: int) -> None:
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        decoder = _inner(model).get_decoder()
        self.block = _last_block(decoder)
        self.norm = _final_norm(decoder)
        self.adapted = _find(self.block, target)
        dropouts: Any = getattr(self.adapted, "lora_dropout", {})
        if "default" in dropouts and not isinstance(dropouts["default"], nn.Identity):
            raise ConfigError("lora.dropout must be 0 for the item encoder (its per-user gradients use "
                              "the adapter as plain tensors)")
        self._check_exact()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def frozen_signature(self) -> tuple[str, ...]:
        """What, besides the base weights and the texts, decides the frozen computation (cache key)."""
        return ITEM_PROMPT, str(self.max_tokens), type(self.adapted).__name__

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(ITEM_PROMPT.format(text=text), add_special_tokens=False)["input_ids"]
        return list(ids[: self.max_tokens])

    # -- the frozen part: run once per catalogue --

    @torch.no_grad()
    def trunk(self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> Catalogue:
        """Inputs and residuals of the adapted module at each prompt's last token, no adapter effect."""
        chunks_a, chunks_r = [], []
        was_training = self.model.training
        self.model.eval()
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode catalogue", leave=False, disable=not progress):
            with _adapter_off(self.model):
                a, r = self._capture([self.prompt_ids(t) for t in texts[start : start + batch_size]])
            chunks_a.append(a.cpu())
            chunks_r.append(r.cpu())
        self.model.train(was_training)
        return Catalogue(torch.cat(chunks_a), torch.cat(chunks_r))

    def _capture(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def grab_target(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen["a"], seen["o"] = args[0], out

        def grab_block(_m: nn.Module, _args: tuple, out: Any) -> None:
            seen["h"] = out[0] if isinstance(out, tuple) else out

        hooks = [self.adapted.register_forward_hook(grab_target),
                 self.block.register_forward_hook(grab_block)]
        try:
            ids, mask = _pad(sequences, int(self.tokenizer.pad_token_id), self.device)
            self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        rows = torch.arange(len(sequences), device=ids.device)
        last = mask.sum(dim=1) - 1
        a = seen["a"][rows, last]
        residual = seen["h"][rows, last] - seen["o"][rows, last]  # the block adds o to this
        return a.float(), residual.float()

    # -- the adapted part --

    def states(self, catalogue: Catalogue, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(I, H) final hidden states: final_norm(residual + adapted(inputs)), differentiable in params."""
        a = catalogue.inputs.to(self.device)
        if params is None:
            out = self.adapted(a)
        else:
            out = torch.func.functional_call(self.adapted, dict(params), (a,))
        return self.norm(catalogue.residual.to(self.device) + out).float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, H) final states of free texts through the whole adapted model (text queries)."""
        a, r = self._capture([self.prompt_ids(t) for t in texts])
        return self.norm(r + self.adapted(a)).float()

    # -- the adapted part as plain tensors (per-user copies of the parameters in DP training) --

    @torch.no_grad()
    def frozen_states(self, catalogue: Catalogue) -> torch.Tensor:
        """(I, H) residual + the base module's output: each item's state with no adapter effect."""
        base = getattr(self.adapted, "base_layer", self.adapted)
        return catalogue.residual.to(self.device) + base(catalogue.inputs.to(self.device)).float()

    def lora_weights(self, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): from `params` where given (per-user copies: a leading batch dim), else the module's."""
        module: Any = self.adapted
        a = params.get(_A, module.lora_A["default"].weight)
        b = params.get(_B, module.lora_B["default"].weight)
        return a, b

    def adapted_states(self, frozen: torch.Tensor, inputs: torch.Tensor,
                       params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """final_norm(frozen + s·B·A·inputs); frozen (..., n, H), inputs (..., n, D_in), A and B
        shared (2-D) or one copy per leading index (3-D). Equal to `states` (tested)."""
        a, b = self.lora_weights(params)
        scale = float(self.adapted.scaling["default"])  # type: ignore[index]
        delta = (inputs @ a.transpose(-1, -2)) @ b.transpose(-1, -2)
        return self.norm(frozen + scale * delta).float()

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapted module's trainable LoRA parameters, by their name inside that module."""
        return {n: p for n, p in self.adapted.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def _check_exact(self) -> None:
        """With a random adapter, the frozen part (captured with the adapter off) plus the adapted
        module must reproduce the full adapted model's last hidden state, or we refuse the model."""
        ids = [self.prompt_ids("Split check: Toy Story (1995) | Animation"), self.prompt_ids("Heat")]
        was_training = self.model.training
        self.model.eval()
        saved = {n: p.detach().clone() for n, p in self.adapted.named_parameters() if "lora_B" in n}
        try:
            generator = torch.Generator().manual_seed(0)
            for n, p in self.adapted.named_parameters():
                if n in saved:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            pad_ids, mask = _pad(ids, int(self.tokenizer.pad_token_id), self.device)
            full = self.model(input_ids=pad_ids, attention_mask=mask, output_hidden_states=True,
                              use_cache=False, logits_to_keep=1).hidden_states[-1]
            full = full[torch.arange(len(ids)), mask.sum(dim=1) - 1].float()
            with _adapter_off(self.model):
                a, r = self._capture(ids)
            split = self.norm(r + self.adapted(a)).float()
        except RuntimeError:  # e.g. the module's output is not of the residual stream's width
            split = None
        finally:
            for n, p in self.adapted.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
            self.model.train(was_training)
        if split is None or not torch.allclose(full, split, atol=1e-3, rtol=1e-3):
            raise ConfigError("this model's last block does not add the adapted module's output to the "
                              "residual stream before the final norm; choose lora.target_modules = "
                              "['down_proj'] (Llama/Qwen/Mistral) or ['c_proj'] (GPT-2)")


def _adapter_off(model: Any) -> Any:
    """PEFT's context that runs the base model alone (a no-op context for a plain model)."""
    import contextlib

    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _inner(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _last_block(decoder: nn.Module) -> nn.Module:
    for name in _LAYER_NAMES:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers[-1]
    raise ConfigError(f"cannot find the transformer blocks of {type(decoder).__name__}")


def _final_norm(decoder: nn.Module) -> nn.Module:
    for name in _NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ConfigError(f"cannot find the final norm of {type(decoder).__name__}")


def _find(block: nn.Module, target: str) -> nn.Module:
    matches = [m for n, m in block.named_modules() if n.split(".")[-1] == target and hasattr(m, "lora_A")]
    if len(matches) != 1:
        raise ConfigError(f"lora.target_modules: the last block has {len(matches)} adapted modules named "
                          f"{target!r}; the item encoder needs exactly one")
    return matches[0]


def _pad(sequences: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor,
                                                                                      torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):  # right padding: positions of real tokens unchanged
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


# --- vectors and scores ---------------------------------------------------------------------


def item_vectors(states: torch.Tensor) -> torch.Tensor:
    """(I, H) centred by the catalogue mean (public), L2-normalised."""
    return F.normalize(states - states.mean(dim=0, keepdim=True), dim=-1)


def center_like(states: torch.Tensor, catalogue_states: torch.Tensor) -> torch.Tensor:
    """Text-query states centred by the catalogue's mean, so they share the items' space."""
    return F.normalize(states - catalogue_states.mean(dim=0, keepdim=True), dim=-1)


def user_vectors(vectors: torch.Tensor, histories: Sequence[Sequence[int]], *, history: int) -> torch.Tensor:
    """(U, H) normalised mean of each user's last `history` item vectors (zeros for an empty one)."""
    out = torch.zeros((len(histories), vectors.shape[1]), dtype=vectors.dtype)
    for u, h in enumerate(histories):
        recent = list(h)[-history:]
        if recent:
            out[u] = vectors[torch.as_tensor(recent)].mean(dim=0)
    return F.normalize(out, dim=-1)


# --- the whole recommender from settings ----------------------------------------------------


@dataclass
class Loaded:
    """A base model with its LoRA attached, the encoder over it, and the initial adapter."""

    base: BaseModel
    encoder: ItemEncoder
    initial_adapter: dict[str, torch.Tensor]

    @property
    def model(self) -> Any:  # the PEFT model (typed loosely: PEFT's own annotations are partial)
        return self.encoder.model


def build_recommender(cfg: Config, *, cache_dir: Path, offline: bool = False) -> Loaded:
    """Load the base LM, attach LoRA (seeded by train.seed, so every party starts identical)."""
    from fedrec.common.lora import adapter_state, attach_lora

    if len(cfg.lora.target_modules) != 1 or cfg.lora.last_layers != 1:
        raise ConfigError("the item encoder adapts one module of the last block: set "
                          "lora.target_modules = ['down_proj'] (one name) and lora.last_layers = 1")
    base = load_base_model(cfg.model, cache_dir=cache_dir, offline=offline)
    model = attach_lora(base.model, cfg.lora, seed=cfg.train.seed).to(pick_device(cfg.model.device))
    encoder = ItemEncoder(model, base.tokenizer, target=cfg.lora.target_modules[0],
                          max_tokens=cfg.model.max_item_tokens)
    return Loaded(base, encoder, adapter_state(model))
