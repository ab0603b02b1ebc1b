"""Loading the frozen base LM: known names, hub ids, local directories, GGUF files, the tiny test model."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from fedrec.common.assets import ModelFiles, resolve_model
from fedrec.common.config import ModelConfig
from fedrec.common.errors import AssetError
from fedrec.common.rundir import atomic_directory
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str  # identifies the base weights in cache keys and run records
    source: str


TINY_MODEL = "tiny-random"  # a 2-block random Llama built in code: smoke runs and CI, no download


def load_base_model(cfg: ModelConfig, *, cache_dir: Path, offline: bool = False) -> BaseModel:
    """Load the frozen base LM and tokenizer from a known name, hub id, local dir or .gguf."""
    if cfg.name == TINY_MODEL:
        tiny_tok = tiny_tokenizer()
        tiny = tiny_llama(len(tiny_tok))
        return BaseModel(tiny, tiny_tok, fingerprint=model_fingerprint(tiny), source=TINY_MODEL)
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


_TINY_CORPUS = [
    "Item: Toy Story (1995) | Animation, Children's, Comedy",
    "A user recently liked: GoldenEye (1995); Star Wars (1977); Heat (1995)",
    "In one word, the next item they will like is:",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ()|;:,.'-",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (300 tokens) trained in code on a fixed corpus: deterministic."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A frozen 2-block Llama (hidden 32) with seeded random weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg)
    torch.random.set_rng_state(generator_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return model


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


def _save_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    # The GGUF weights are already de-quantised to `dtype`; drop the quantizer so they can be
    # written as plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "complete").write_text("converted from GGUF\n")
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


