"""Shared fixtures: a tiny Llama built from a config and a byte-level BPE tokenizer (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedrec.common import model as fedrec_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def make_tokenizer() -> PreTrainedTokenizerFast:
    return fedrec_model.tiny_tokenizer()


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    return fedrec_model.tiny_llama(vocab_size, seed)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture()
def make_model(tiny_tokenizer: PreTrainedTokenizerFast):
    """A factory of identical tiny models (same seed), for equivalence tests."""
    return lambda seed=0: make_tiny_llama(len(tiny_tokenizer), seed)


def write_tiny_dataset(root: Path, users: int = 24, items: int = 30) -> Path:
    """A generic-CSV data set: `users` users with 6 interactions each over `items` items."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["item_id,title,genres"]
    lines += [f"i{j},Movie {j} ({1980 + j}),Genre {j % 4}" for j in range(items)]
    (root / "items.csv").write_text("\n".join(lines) + "\n")
    inter = ["user_id,item_id,timestamp,rating"]
    for u in range(users):
        for t in range(6):
            inter.append(f"u{u},i{(u * 3 + t * 5) % items},{1000 + t},{1 + (u + t) % 5}")
    (root / "interactions.csv").write_text("\n".join(inter) + "\n")
    return root


@pytest.fixture(scope="session")
def dataset_writer():  # type: ignore[no-untyped-def]
    """write_tiny_dataset, for fixtures in other conftest files."""
    return write_tiny_dataset


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "data")


@pytest.fixture()
def tiny_model_dir(tmp_path: Path, tiny_model, tiny_tokenizer) -> Path:
    path = tmp_path / "tiny-model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
