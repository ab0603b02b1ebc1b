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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fedrec.common.assets import ModelFiles, resolve_model
from fedrec.common.config import Config, ModelConfig
from fedrec.common.errors import AssetError, ConfigError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

ITEM_PROMPT = "Item: {text}\nIn one word, this item is:"
USER_PROMPT = "A user recently liked: {history}\nIn one word, the next item they will like is:"
MIN_VARIABLE_TOKENS = 8  # room that must remain for the item text or the history
COLD_START_PROMPT = "A user describes their taste: {text}\nIn one word, the next item they will like is:"


@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: object
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


def _save_converted(model: PreTrainedModel, tokenizer: object, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    # The GGUF weights are already de-quantised to `dtype`; drop the quantizer so they can be
    # written as plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
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
        frozen_layers: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
        self.max_item_tokens = max_item_tokens
        self.max_history_tokens = max_history_tokens
        self.temperature = temperature
        for key, budget, template in (
            ("model.max_item_tokens", max_item_tokens, ITEM_PROMPT),
            ("model.max_history_tokens", max_history_tokens, USER_PROMPT),
        ):
            fixed = len(self._ids(template.split("{")[0] + template.split("}")[1]))
            if budget < fixed + MIN_VARIABLE_TOKENS:
                raise ConfigError(
                    f"{key}={budget} leaves no room for the text: the instruction alone takes "
                    f"{fixed} tokens with this tokenizer; use at least {fixed + MIN_VARIABLE_TOKENS}"
                )
        # Blocks below the first adapted one never change: their output for a catalogue item is
        # computed once and reused, and only the adapted blocks run per step (see _split).
        self.frozen_layers = frozen_layers
        self._item_trunk: dict[tuple[int, ...], torch.Tensor] = {}
        if frozen_layers and not self._split_is_exact():
            log.warning("this model does not support running its top blocks alone; "
                        "falling back to full forward passes (slower, same results)")
            self.frozen_layers = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- prompts -------------------------------------------------------------------------
    # Prompts are assembled from token ids so that truncation only ever shortens the variable
    # part (item text, the oldest titles of a history), never the fixed instruction whose last
    # token is pooled.
    @staticmethod
    def item_prompt(text: str) -> str:
        return ITEM_PROMPT.format(text=text)

    @staticmethod
    def user_prompt(titles: Sequence[str], text: str | None = None) -> str:
        if not titles:
            return COLD_START_PROMPT.format(text=text or "")
        prompt = USER_PROMPT.format(history="; ".join(titles))
        return prompt if not text else f"The user says: {text}\n{prompt}"

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    def _fit(self, template: str, body: str, budget: int, *, keep_end: bool) -> list[int]:
        """Token ids of `template` with `body` cut (at its start or end) to fit `budget` tokens."""
        pre, suf = (self._ids(part) for part in template.split("{}"))
        room = max(1, budget - len(pre) - len(suf))
        ids = self._ids(body)
        ids = ids[-room:] if keep_end else ids[:room]
        return pre + ids + suf

    def item_ids(self, text: str) -> list[int]:
        return self._fit(ITEM_PROMPT.replace("{text}", "{}"), text, self.max_item_tokens, keep_end=False)

    def user_ids(self, titles: Sequence[str], text: str | None = None) -> list[int]:
        if not titles:
            template = COLD_START_PROMPT.replace("{text}", "{}")
            return self._fit(template, text or "", self.max_history_tokens, keep_end=False)
        template = USER_PROMPT.replace("{history}", "{}")
        if text:  # the user's own words first, at most half of the budget
            said = self._fit("The user says: {}\n", text, self.max_history_tokens // 2, keep_end=False)
            template = self.tokenizer.decode(said) + template  # type: ignore[attr-defined]
        return self._fit(template, "; ".join(titles), self.max_history_tokens, keep_end=True)

    # --- encoding ------------------------------------------------------------------------
    def encode_ids(self, sequences: Sequence[Sequence[int]], *, cache: bool = False) -> torch.Tensor:
        """(N, H) L2-normalised last-token states; differentiable when grad is enabled.

        With `frozen_layers`, the frozen blocks run without gradient (their states for `cache`d
        sequences are kept) and only the adapted blocks run here; the result is the same.
        """
        if self.frozen_layers:
            return self._head(self._trunk(sequences, cache=cache))
        return self._full(sequences)

    def _full(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        longest = max(len(s) for s in sequences)
        pad = int(self.tokenizer.pad_token_id)  # type: ignore[attr-defined]
        ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):  # right padding: position of real tokens unchanged
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                         use_cache=False, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (N, T, H)
        last = mask.sum(dim=1) - 1  # (N,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
        return F.normalize(pooled.float(), dim=-1)

    def encode_items(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_ids([self.item_ids(t) for t in texts], cache=True)

    def encode_users(
        self, histories: Sequence[Sequence[str]], texts: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        texts = texts if texts is not None else [None] * len(histories)
        return self.encode_ids([self.user_ids(h, t) for h, t in zip(histories, texts, strict=True)])

    # --- running the frozen trunk and the adapted head separately ------------------------
    def _decoder(self) -> torch.nn.Module:
        model: Any = self.model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return inner.get_decoder()  # type: ignore[no-any-return]

    @torch.no_grad()
    def _trunk(self, sequences: Sequence[Sequence[int]], *, cache: bool) -> list[torch.Tensor]:
        """Input states of the first adapted block, (T_i, H) per sequence."""
        keys = [tuple(s) for s in sequences]
        todo = sorted({k for k in keys if not (cache and k in self._item_trunk)})
        computed: dict[tuple[int, ...], torch.Tensor] = {}
        if todo:
            captured: list[torch.Tensor] = []

            def grab(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                captured.append(args[0] if args else kwargs["hidden_states"])
                raise _StopForward

            layers: Any = self._decoder().layers
            first_adapted: torch.nn.Module = layers[self.frozen_layers]
            handle = first_adapted.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                self._full(todo)
            except _StopForward:
                pass
            finally:
                handle.remove()
            for row, key in enumerate(todo):
                computed[key] = captured[0][row, : len(key)].detach()
            if cache:
                self._item_trunk.update(computed)
        source = self._item_trunk if cache else computed
        return [source[k] for k in keys]

    def _head(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run only the adapted blocks on trunk states; (N, H) pooled and normalised."""
        longest = max(s.shape[0] for s in states)
        hidden = torch.zeros((len(states), longest, states[0].shape[-1]), dtype=states[0].dtype,
                             device=self.device)
        mask = torch.zeros((len(states), longest), dtype=torch.long, device=self.device)
        for row, s in enumerate(states):
            hidden[row, : s.shape[0]] = s
            mask[row, : s.shape[0]] = 1
        decoder = self._decoder()
        layers = decoder.layers
        decoder.layers = torch.nn.ModuleList(list(layers)[self.frozen_layers :])  # type: ignore[arg-type]
        try:
            out = self.model(inputs_embeds=hidden, attention_mask=mask, output_hidden_states=True,
                             use_cache=False, logits_to_keep=1)
        finally:
            decoder.layers = layers
        final = out.hidden_states[-1]  # (N, T, H)
        last = mask.sum(dim=1) - 1
        pooled = final[torch.arange(final.shape[0], device=final.device), last]
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def _split_is_exact(self) -> bool:
        was_training = self.model.training
        self.model.eval()
        try:
            ids = [self.item_ids("Split check: Toy Story (1995) | Animation"), self.item_ids("Heat")]
            full = self._full(ids)
            split = self._head(self._trunk(ids, cache=False))
            return bool(torch.allclose(full, split, atol=1e-4))
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use the split
            log.debug("split check failed: %s", exc)
            return False
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def encode_all(self, inputs: Sequence, *, users: bool, batch_size: int) -> torch.Tensor:
        """Encode many users (title lists) or items (texts) without gradients; (N, H) on CPU."""
        was_training = self.model.training
        self.model.eval()
        chunks = []
        starts = range(0, len(inputs), batch_size)
        desc = "encode users" if users else "encode items"
        for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 4):
            part = inputs[start : start + batch_size]
            vecs = self.encode_users(part) if users else self.encode_items(part)
            chunks.append(vecs.cpu())
        self.model.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0)

    def logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(U, H) x (I, H) -> (U, I) scores = cosine / τ."""
        return users @ items.T / self.temperature


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the trunk's output is captured."""


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
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent simulated clients
        save_file({"vectors": vectors.contiguous()}, str(tmp))
        tmp.replace(path)
    return vectors


# --- the whole recommender from settings ----------------------------------------------------


@dataclass
class Loaded:
    """A base model with its LoRA attached, the recommender over it, and the initial adapter."""

    base: BaseModel
    rec: Recommender
    initial_adapter: dict[str, torch.Tensor]


def build_recommender(cfg: Config, *, cache_dir: Path, offline: bool = False) -> Loaded:
    """Load the base LM, attach LoRA (seeded by train.seed, so every party starts identical)."""
    from fedrec.common.lora import adapter_state, attach_lora, frozen_layer_count

    base = load_base_model(cfg.model, cache_dir=cache_dir, offline=offline)
    model = attach_lora(base.model, cfg.lora, seed=cfg.train.seed).to(pick_device(cfg.model.device))
    rec = Recommender(
        model, base.tokenizer, max_item_tokens=cfg.model.max_item_tokens,
        max_history_tokens=cfg.model.max_history_tokens, temperature=cfg.train.temperature,
        frozen_layers=frozen_layer_count(base.model, cfg.lora),
    )
    return Loaded(base, rec, adapter_state(model))
