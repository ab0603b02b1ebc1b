"""Shared fixtures: a tiny Llama built from a config and a byte-level BPE tokenizer (no downloads)."""

from __future__ import annotations

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
