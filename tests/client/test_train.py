"""Local training: LoRA really changes under Opacus, DP(σ=0, C=∞) equals plain, clipping, accounting."""

import numpy as np
import pytest
import torch
from fedrec.client.train import (
    DPSettings,
    Example,
    LocalTrainer,
    example_losses,
    per_user_gradients,
    poisson_sample,
    sample_example,
)
from fedrec.common.config import LoraConfig
from fedrec.common.lora import adapter_state, attach_lora
from fedrec.common.model import Recommender
from fedrec.common.privacy import MechanismStep, PrivacyAccountant, epsilon

TITLES = [f"Movie {i} ({1990 + i})" for i in range(12)]
TEXTS = [f"{t} | Genre {i % 3}" for i, t in enumerate(TITLES)]
SEQS = {"u1": [0, 1, 2, 3], "u2": [4, 5, 6], "u3": [7, 8, 9, 10, 11]}


def _trainer(model, tok, *, dp: DPSettings | None, accountant=None, batch_size: int = 3, lr=0.05):
    rec = Recommender(attach_lora(model, LoraConfig(rank=4, last_layers=None)), tok,
                      max_item_tokens=48, max_history_tokens=128, temperature=0.1)
    return LocalTrainer(rec, item_titles=TITLES, item_texts=TEXTS, sequences=SEQS, lr=lr,
                        batch_size=batch_size, max_history=3, negatives=3, seed=0, dp=dp,
                        accountant=accountant)


def _examples() -> list[Example]:
    return [Example((0, 1), 2, (5, 7, 9)), Example((4,), 5, (0, 1, 2)), Example((7, 8), 9, (3, 4, 11))]


def test_sample_example_never_uses_target_as_negative() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        ex = sample_example([3, 4, 5, 6], num_items=7, max_history=2, negatives=5, rng=rng)
        assert ex is not None and ex.target not in ex.negatives
        assert len(ex.history) <= 2 and all(0 <= n < 7 for n in ex.negatives)
    assert sample_example([3], num_items=7, max_history=2, negatives=5, rng=rng) is None


def test_lora_weights_change_after_an_opacus_step(tiny_model, tiny_tokenizer) -> None:
    accountant = PrivacyAccountant()
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=accountant,
                       dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5))
    before = adapter_state(trainer.rec.model)

    trainer.step(_examples())

    after = adapter_state(trainer.rec.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every A and B moved
    assert accountant.history == (MechanismStep(1.0, 0.5, 1),)


def test_dp_without_noise_and_clipping_equals_plain_training(make_model, tiny_tokenizer) -> None:
    plain = _trainer(make_model(), tiny_tokenizer, dp=None)
    dp = _trainer(make_model(), tiny_tokenizer, accountant=PrivacyAccountant(),
                  dp=DPSettings(noise_multiplier=0.0, clip_norm=1e9, sample_rate=1.0))
    plain_init = adapter_state(plain.rec.model)

    for _ in range(2):
        plain.step(_examples())
        dp.step(_examples())

    a, b = adapter_state(plain.rec.model), adapter_state(dp.rec.model)
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)  # float32 summation order
    assert any(not torch.allclose(a[k], plain_init[k]) for k in a)  # and training did move them


def test_per_user_gradients_are_the_users_own(tiny_model, tiny_tokenizer) -> None:
    trainer = _trainer(tiny_model, tiny_tokenizer, dp=None)
    torch.manual_seed(1)  # independent of which tests ran before
    with torch.no_grad():
        for n, p in trainer.rec.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    examples = _examples()

    grads, _ = per_user_gradients(trainer.rec, trainer.params, examples, TITLES, TEXTS)
    loss = example_losses(trainer.rec, examples, TITLES, TEXTS).sum()
    total = torch.autograd.grad(loss, trainer.params)

    assert all(g.shape[0] == len(examples) for g in grads)
    assert all(torch.allclose(g.sum(0), t, rtol=1e-4, atol=1e-5) for g, t in zip(grads, total))


def test_opacus_clips_each_user_to_the_bound(tiny_model, tiny_tokenizer) -> None:
    clip = 1e-3
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=PrivacyAccountant(),
                       dp=DPSettings(noise_multiplier=0.0, clip_norm=clip, sample_rate=1.0),
                       batch_size=1, lr=1.0)
    grads, _ = per_user_gradients(trainer.rec, trainer.params, _examples()[:1], TITLES, TEXTS)
    raw = torch.sqrt(sum((g**2).sum() for g in grads))
    for p, g in zip(trainer.params, grads):
        p.grad_sample = g

    trainer.optimizer.pre_step()  # clip, (zero) noise, scale: p.grad is the clipped mean

    clipped = torch.sqrt(sum((p.grad**2).sum() for p in trainer.params))
    assert raw > clip
    assert clipped <= clip * (1 + 1e-4)


def test_empty_poisson_batch_still_spends_and_noises(tiny_model, tiny_tokenizer) -> None:
    accountant = PrivacyAccountant()
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=accountant,
                       dp=DPSettings(noise_multiplier=2.0, clip_norm=1.0, sample_rate=0.1))
    before = adapter_state(trainer.rec.model)

    trainer.step([])

    after = adapter_state(trainer.rec.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert accountant.history == (MechanismStep(2.0, 0.1, 1),)


def test_run_records_every_step_and_epsilon_matches_accountant(tiny_model, tiny_tokenizer) -> None:
    accountant = PrivacyAccountant()
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=accountant,
                       dp=DPSettings(noise_multiplier=1.5, clip_norm=1.0, sample_rate=0.5))

    result = trainer.run(4, progress=False)

    assert result.steps == 4
    assert accountant.history == (MechanismStep(1.5, 0.5, 4),)
    expected = epsilon([MechanismStep(1.5, 0.5, 4)], delta=1e-3)
    assert accountant.epsilon(1e-3) == pytest.approx(expected)


def test_poisson_sampling_rate() -> None:
    rng = np.random.default_rng(1)
    users = [str(i) for i in range(1000)]
    sizes = [len(poisson_sample(users, 0.05, rng)) for _ in range(200)]
    assert 45 < np.mean(sizes) < 55
    assert np.std(sizes) > 2  # the batch size varies, as Poisson sampling requires
