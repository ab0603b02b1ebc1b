"""The LLM recommender: base LM loading, one LoRA-adapted model encoding both users and items.

Design (chosen by measurement, see docs/DESIGN-NOTES in README): the same adapted model encodes
the public item text and the user's recent history as text; a vector is the final hidden state
of the prompt's last token, L2-normalised; score = cosine / τ. Training pushes each user's next
item above that user's own sampled negatives, so every gradient — item side included — belongs
to exactly one user (what user-level DP-SGD needs).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedrec.common.assets import ModelFiles, resolve_model
from fedrec.common.config import ModelConfig
from fedrec.common.errors import AssetError

log = logging.getLogger(__name__)

ITEM_PROMPT = "Item: {text}\nIn one word, this item is:"
USER_PROMPT = "A user recently liked: {history}\nIn one word, the next item they will like is:"
COLD_START_PROMPT = "A user describes their taste: {text}\nIn one word, the next item they will like is:"


@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: object
    fingerprint: str  # identifies the base weights in cache keys and run records
    source: str


def load_base_model(cfg: ModelConfig, *, cache_dir: Path, offline: bool = False) -> BaseModel:
    """Load the frozen base LM and tokenizer from a known name, hub id, local dir or .gguf."""
    files = resolve_model(cfg.name, cache_dir=cache_dir, offline=offline)
    directory, gguf = _converted(files, cache_dir)
    dtype = getattr(torch, cfg.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise AssetError(f"model {cfg.name!r} at {directory} cannot be loaded: {exc}") from None
    if gguf is not None:  # de-quantising GGUF is slow; keep a converted copy next to it
        _save_converted(model, tokenizer, _converted_path(files, cache_dir))
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return BaseModel(model, tokenizer, fingerprint=model_fingerprint(model), source=files.source)


def _converted_path(files: ModelFiles, cache_dir: Path) -> Path:
    assert files.gguf_file is not None
    key = hashlib.sha256(f"{files.path.resolve()}/{files.gguf_file}".encode()).hexdigest()[:16]
    return cache_dir / "converted" / key


def _converted(files: ModelFiles, cache_dir: Path) -> tuple[Path, str | None]:
    if files.gguf_file is None:
        return files.path, None
    converted = _converted_path(files, cache_dir)
    if (converted / "complete").is_file():
        return converted, None
    return files.path, files.gguf_file


def _save_converted(model: PreTrainedModel, tokenizer: object, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    # The GGUF weights are already de-quantised to `dtype`; drop the quantizer so they can be
    # written as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        (tmp / "complete").write_text("converted from GGUF\n")
        tmp.replace(target)
    except OSError as exc:  # a cache we cannot write only costs time
        log.warning("could not cache the converted model at %s: %s", target, exc)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the base model's config and parameter bytes (LoRA tensors excluded)."""
    h = hashlib.sha256(str(getattr(model, "config", "")).encode())
    for name, p in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Recommender:
    """Encodes users and items with one (LoRA-adapted) LM and scores them by scaled cosine."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        max_item_tokens: int,
        max_history_tokens: int,
        temperature: float,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
        self.max_item_tokens = max_item_tokens
        self.max_history_tokens = max_history_tokens
        self.temperature = temperature

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- prompts -------------------------------------------------------------------------
    @staticmethod
    def item_prompt(text: str) -> str:
        return ITEM_PROMPT.format(text=text)

    @staticmethod
    def user_prompt(titles: Sequence[str], text: str | None = None) -> str:
        if not titles:
            return COLD_START_PROMPT.format(text=text or "")
        prompt = USER_PROMPT.format(history="; ".join(titles))
        return prompt if not text else f"The user says: {text}\n{prompt}"

    # --- encoding ------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], *, max_tokens: int, left_truncate: bool) -> torch.Tensor:
        """(N, H) L2-normalised last-token states; differentiable when grad is enabled."""
        tok = self.tokenizer
        tok.truncation_side = "left" if left_truncate else "right"  # type: ignore[attr-defined]
        tok.padding_side = "right"  # type: ignore[attr-defined]
        batch = tok(  # type: ignore[operator]
            list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
        ).to(self.device)
        out = self.model(**batch, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (N, T, H)
        last = batch["attention_mask"].sum(dim=1) - 1  # (N,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
        return F.normalize(pooled.float(), dim=-1)

    def encode_items(self, texts: Sequence[str]) -> torch.Tensor:
        prompts = [self.item_prompt(t) for t in texts]
        return self.encode(prompts, max_tokens=self.max_item_tokens, left_truncate=False)

    def encode_users(self, histories: Sequence[Sequence[str]], texts: Sequence[str | None] | None = None) -> torch.Tensor:
        texts = texts if texts is not None else [None] * len(histories)
        prompts = [self.user_prompt(h, t) for h, t in zip(histories, texts, strict=True)]
        return self.encode(prompts, max_tokens=self.max_history_tokens, left_truncate=True)

    @torch.no_grad()
    def encode_all(self, fn_inputs: Sequence, *, users: bool, batch_size: int) -> torch.Tensor:
        """Encode many users or items in batches without gradients; (N, H) on CPU."""
        was_training = self.model.training
        self.model.eval()
        chunks = []
        for start in range(0, len(fn_inputs), batch_size):
            part = fn_inputs[start : start + batch_size]
            vecs = self.encode_users(part) if users else self.encode_items(part)
            chunks.append(vecs.cpu())
        self.model.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0)

    def logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(U, H) x (I, H) -> (U, I) scores = cosine / τ."""
        return users @ items.T / self.temperature


# --- on-disk cache of catalogue vectors ------------------------------------------------------


def item_vectors_cached(
    recommender: Recommender,
    texts: Sequence[str],
    *,
    cache_dir: Path | None,
    model_fingerprint: str,
    adapter_digest: str,
    batch_size: int = 64,
) -> torch.Tensor:
    """Catalogue vectors, cached on disk keyed by model, adapter, catalogue and prompt."""
    key_src = "\n".join(
        [model_fingerprint, adapter_digest, ITEM_PROMPT, str(recommender.max_item_tokens), *texts]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = cache_dir / "item-vectors" / f"{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        return load_file(str(path))["vectors"]
    vectors = recommender.encode_all(list(texts), users=False, batch_size=batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"vectors": vectors.contiguous()}, str(tmp))
        tmp.replace(path)
    return vectors
