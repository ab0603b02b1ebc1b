"""The item encoder: the adapted module run alone equals the full model, vectors, caches, text queries."""

from pathlib import Path

import pytest
import torch
from fedrec.common.catalogue import catalogue_cached
from fedrec.common.config import LoraConfig
from fedrec.common.errors import ConfigError
from fedrec.common.lora import attach_lora
from fedrec.common.recommender import ItemEncoder, center_like, item_vectors, user_vectors

TEXTS = ["Toy Story (1995) | Animation", "Heat (1995) | Action, Crime, Thriller", "GoldenEye (1995)"]


def _encoder(model, tok, *, seed: int = 1) -> ItemEncoder:
    adapted = attach_lora(model, LoraConfig(rank=4), seed=seed)
    torch.manual_seed(2)  # a non-zero B: the adapter really changes the output
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return ItemEncoder(adapted, tok, target="down_proj", max_tokens=40)


def _full_states(enc: ItemEncoder, texts: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding involved
            ids = torch.tensor([enc.prompt_ids(t)])
            hidden = enc.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            out.append(hidden[0, -1])
    return torch.stack(out)


def test_the_adapted_module_alone_equals_the_full_adapted_model(tiny_model, tiny_tokenizer) -> None:
    enc = _encoder(tiny_model, tiny_tokenizer)
    catalogue = enc.trunk(TEXTS, batch_size=2)  # batched and right-padded

    with torch.no_grad():
        split = enc.states(catalogue)

    assert catalogue.inputs.shape == (3, 64) and catalogue.residual.shape == (3, 32)
    assert torch.allclose(split, _full_states(enc, TEXTS), atol=1e-5)


def test_the_cached_catalogue_does_not_depend_on_the_adapter(make_model, tiny_tokenizer) -> None:
    a = _encoder(make_model(), tiny_tokenizer, seed=1)
    b = ItemEncoder(attach_lora(make_model(), LoraConfig(rank=4), seed=1), tiny_tokenizer, target="down_proj",
                    max_tokens=40)  # B = 0: no adapter effect

    ca, cb = a.trunk(TEXTS), b.trunk(TEXTS)

    assert torch.allclose(ca.inputs, cb.inputs, atol=1e-6) and torch.allclose(ca.residual, cb.residual, atol=1e-6)


def test_gradients_reach_lora_through_the_cached_path(tiny_model, tiny_tokenizer) -> None:
    enc = _encoder(tiny_model, tiny_tokenizer)
    catalogue = enc.trunk(TEXTS)
    params = enc.trainable()

    grads = torch.autograd.grad(item_vectors(enc.states(catalogue, params)).pow(3).sum(), list(params.values()))

    assert set(params) == {"lora_A.default.weight", "lora_B.default.weight"}
    assert all(g.abs().sum() > 0 for g in grads)


def test_item_vectors_are_centred_unit_vectors_and_text_shares_their_space(tiny_model, tiny_tokenizer) -> None:
    enc = _encoder(tiny_model, tiny_tokenizer)
    with torch.no_grad():
        states = enc.states(enc.trunk(TEXTS))
        vectors = item_vectors(states)
        text = center_like(enc.encode_text([TEXTS[1]]), states)

    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text[0], vectors[1], atol=1e-5)  # a text equal to an item's is that item


def test_user_vector_is_the_normalised_mean_of_the_recent_items() -> None:
    vectors = torch.nn.functional.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)

    users = user_vectors(vectors, [[0, 1, 2], [], [4]], history=2)

    assert torch.allclose(users[0], torch.nn.functional.normalize(vectors[1] + vectors[2], dim=0))
    assert torch.equal(users[1], torch.zeros(4))  # no history: no direction
    assert torch.allclose(users[2], vectors[4])


def test_catalogue_cache_hits_and_keys_on_texts(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    enc = _encoder(tiny_model, tiny_tokenizer)

    first = catalogue_cached(enc, TEXTS, cache_dir=tmp_path, model_fingerprint="m")
    again = catalogue_cached(enc, TEXTS, cache_dir=tmp_path, model_fingerprint="m")
    other = catalogue_cached(enc, TEXTS[:2], cache_dir=tmp_path, model_fingerprint="m")
    files = sorted((tmp_path / "catalogue").iterdir())
    for f in files:
        f.write_bytes(b"damaged")  # a damaged cache file is recomputed, not served
    repaired = catalogue_cached(enc, TEXTS, cache_dir=tmp_path, model_fingerprint="m")

    assert len(files) == 2 and len(other) == 2
    assert torch.equal(first.inputs, again.inputs)
    assert torch.allclose(first.residual, repaired.residual)


def test_a_target_the_last_block_does_not_have_is_a_config_error(tiny_model, tiny_tokenizer) -> None:
    adapted = attach_lora(tiny_model, LoraConfig(rank=4, target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="down_proj"):
        ItemEncoder(adapted, tiny_tokenizer, target="down_proj", max_tokens=40)


def test_a_module_whose_output_is_not_added_to_the_residual_is_refused(tiny_model, tiny_tokenizer) -> None:
    adapted = attach_lora(tiny_model, LoraConfig(rank=4, target_modules=("up_proj",)))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    with pytest.raises(ConfigError, match="residual"):
        ItemEncoder(adapted, tiny_tokenizer, target="up_proj", max_tokens=40)
