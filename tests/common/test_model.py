"""The recommender's encoders: pooling, truncation, scoring and the on-disk item-vector cache."""

from pathlib import Path

import torch
from fedrec.common.config import LoraConfig
from fedrec.common.lora import attach_lora
from fedrec.common.model import Recommender, item_vectors_cached


def _rec(model, tok, max_history_tokens: int = 128) -> Recommender:
    return Recommender(attach_lora(model, LoraConfig(rank=4)), tok, max_item_tokens=48,
                       max_history_tokens=max_history_tokens, temperature=0.1)


def test_vectors_are_unit_norm_and_padding_invariant(tiny_model, tiny_tokenizer) -> None:
    rec = _rec(tiny_model, tiny_tokenizer)
    short, long = "Heat (1995)", "Star Wars (1977) | Action, Adventure, Romance, Sci-Fi, War"

    alone = rec.encode_items([short])
    batched = rec.encode_items([short, long])

    assert batched.shape == (2, 32)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)  # right padding does not leak


def test_truncation_cuts_the_variable_part_never_the_instruction(tiny_model, tiny_tokenizer) -> None:
    rec = _rec(tiny_model, tiny_tokenizer, max_history_tokens=80)
    history = ["Toy Story (1995)"] * 20 + ["Heat (1995)"]

    user = tiny_tokenizer.decode(rec.user_ids(history))
    item = tiny_tokenizer.decode(rec.item_ids("Star Wars " * 50))

    assert len(rec.user_ids(history)) <= 80 and len(rec.item_ids("Star Wars " * 50)) <= 48
    assert user.startswith("A user recently liked:") and user.endswith("the next item they will like is:")
    assert "Heat (1995)" in user  # the most recent title survives
    assert item.startswith("Item: Star Wars") and item.endswith("this item is:")
    assert rec.encode_users([history]).shape == (1, 32)


def test_cold_start_and_combined_prompts() -> None:
    assert "describes their taste: 90s sci-fi" in Recommender.user_prompt([], "90s sci-fi")
    combined = Recommender.user_prompt(["Heat (1995)"], "dark comedies")
    assert "dark comedies" in combined and "Heat (1995)" in combined


def test_logits_are_scaled_cosine(tiny_model, tiny_tokenizer) -> None:
    rec = _rec(tiny_model, tiny_tokenizer)
    users = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)

    assert torch.allclose(rec.logits(users, items), users @ items.T / 0.1)


def test_item_vector_cache_hits_and_keys_on_adapter(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    rec = _rec(tiny_model, tiny_tokenizer)
    texts = ["Toy Story (1995)", "Heat (1995)", "GoldenEye (1995)"]

    first = item_vectors_cached(rec, texts, cache_dir=tmp_path, model_fingerprint="m", adapter_digest="a")
    files = list((tmp_path / "item-vectors").iterdir())
    with torch.no_grad():  # a different adapter must not be served the old vectors
        for n, p in rec.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    cached = item_vectors_cached(rec, texts, cache_dir=tmp_path, model_fingerprint="m", adapter_digest="a")
    fresh = item_vectors_cached(rec, texts, cache_dir=tmp_path, model_fingerprint="m", adapter_digest="b")

    assert len(files) == 1 and first.shape == (3, 32)
    assert torch.equal(first, cached)
    assert not torch.allclose(first, fresh)
    assert len(list((tmp_path / "item-vectors").iterdir())) == 2


def test_token_budget_too_small_is_a_config_error(tiny_model, tiny_tokenizer) -> None:
    import pytest
    from fedrec.common.errors import ConfigError

    with pytest.raises(ConfigError, match="model.max_item_tokens=10"):
        Recommender(tiny_model, tiny_tokenizer, max_item_tokens=10, max_history_tokens=200, temperature=0.1)


def test_running_only_the_adapted_blocks_gives_the_same_vectors(make_model, tiny_tokenizer) -> None:
    def rec(frozen: int) -> Recommender:
        model = attach_lora(make_model(), LoraConfig(rank=4, last_layers=1), seed=1)
        torch.manual_seed(2)  # the same random B for both
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        return Recommender(model, tiny_tokenizer, max_item_tokens=48, max_history_tokens=128,
                           temperature=0.1, frozen_layers=frozen)

    full, split = rec(0), rec(1)
    texts = ["Toy Story (1995)", "Heat (1995) | Action, Crime, Thriller"]

    assert split.frozen_layers == 1  # the exactness check passed
    assert torch.allclose(full.encode_items(texts), split.encode_items(texts), atol=1e-5)
    assert torch.allclose(split.encode_items(texts), split.encode_items(texts))  # served from cache
    assert len(split._item_trunk) == 2
    users = [["Toy Story (1995)", "Heat (1995)"]]
    assert torch.allclose(full.encode_users(users), split.encode_users(users), atol=1e-5)
    loss = split.encode_items(texts).sum() + split.encode_users(users).sum()
    loss.backward()  # gradients reach the adapted block through the split path
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in split.model.named_parameters() if "lora_" in n)
