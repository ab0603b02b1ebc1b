"""Local training: LoRA really changes under Opacus, DP(σ=0, C=∞) equals plain, clipping, accounting,
vectorised per-user gradients equal the per-user loop, and the residual CF logits."""

import math

import numpy as np
import pytest
import torch
from fedrec.client.train import (
    DPSettings,
    LocalTrainer,
    Objective,
    ResidualCF,
    full_softmax_logits,
    pack,
    per_user_gradients,
    step_items,
    user_losses,
)
from fedrec.common.config import LoraConfig
from fedrec.common.lora import adapter_state, attach_lora
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.recommender import ItemEncoder

TEXTS = [f"Movie {i} ({1990 + i}) | Genre {i % 3}" for i in range(12)]
SEQS = {"u1": [0, 1, 2, 3], "u2": [4, 5, 6], "u3": [7, 8, 9, 10, 11]}
OBJ = Objective(window=2, max_len=5, temperature=0.1, negatives=6)


def _encoder(model, tok) -> ItemEncoder:
    adapted = attach_lora(model, LoraConfig(rank=4))
    return ItemEncoder(adapted, tok, target="down_proj", max_tokens=40)


def _trainer(model, tok, *, dp: DPSettings | None, accountant=None, batch_size: int = 3, lr=0.05,
             residual: ResidualCF | None = None, objective: Objective = OBJ) -> LocalTrainer:
    enc = _encoder(model, tok)
    return LocalTrainer(enc, enc.trunk(TEXTS), SEQS, lr=lr, batch_size=batch_size, objective=objective,
                        residual=residual, dp=dp, accountant=accountant, seed=0)


def _randomise_b(trainer: LocalTrainer) -> None:
    torch.manual_seed(1)  # independent of which tests ran before
    with torch.no_grad():
        for name, p in trainer.params.items():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def test_pack_keeps_the_most_recent_items_left_padded() -> None:
    seqs = pack([[1, 2, 3, 4, 5, 6], [7]], max_len=4)
    assert seqs.tolist() == [[3, 4, 5, 6], [-1, -1, -1, 7]]


def test_user_loss_is_the_hand_computed_all_position_sampled_softmax(tiny_model, tiny_tokenizer) -> None:
    trainer = _trainer(tiny_model, tiny_tokenizer, dp=None)
    _randomise_b(trainer)
    negatives = torch.tensor([0, 2, 5, 6, 9, 11])
    items = step_items(trainer.encoder, trainer.catalogue, trainer.frozen, trainer.params, negatives)
    assert torch.allclose(items.log_kq, torch.full((6,), math.log(6 / 12)))
    seq = torch.tensor([[-1, 4, 5, 6]])  # u2: predict 5 from [4], 6 from [4, 5] (window 2)

    loss = user_losses(trainer.encoder, trainer.params, seq, None, items, objective=OBJ)

    with torch.no_grad():
        states = trainer.encoder.states(trainer.catalogue)
        vectors = torch.nn.functional.normalize(states - states.mean(dim=0), dim=-1)
    expected = []
    for history, target in (([4], 5), ([4, 5], 6)):
        user = torch.nn.functional.normalize(vectors[history].sum(dim=0), dim=0)
        candidates = [target, *(n for n in negatives.tolist() if n not in (4, 5, 6))]  # never the user's own
        logits = user @ vectors[candidates].T / OBJ.temperature
        logits[1:] -= math.log(6 / 12)  # logQ: 6 uniform draws from 12 items, each stands for 2
        expected.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([0])))
    assert loss.item() == pytest.approx(float(sum(expected) / 2), rel=1e-4)


def test_lora_weights_change_after_an_opacus_step(tiny_model, tiny_tokenizer) -> None:
    accountant = PrivacyAccountant()
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=accountant,
                       dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5))
    before = adapter_state(trainer.encoder.model)

    trainer.step(torch.arange(3))

    after = adapter_state(trainer.encoder.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before) == 2  # A and B of the one adapted module moved
    assert accountant.history == (MechanismStep(noise_multiplier=1.0, sample_rate=0.5, steps=1),)


@pytest.mark.parametrize("negatives", [6, 0], ids=["sampled", "full-softmax"])
def test_dp_without_noise_and_clipping_equals_plain_training(make_model, tiny_tokenizer, negatives) -> None:
    obj = Objective(window=2, max_len=5, temperature=0.1, negatives=negatives)
    plain = _trainer(make_model(), tiny_tokenizer, dp=None, objective=obj)
    dp = _trainer(make_model(), tiny_tokenizer, accountant=PrivacyAccountant(), objective=obj,
                  dp=DPSettings(noise_multiplier=0.0, clip_norm=1e9, sample_rate=1.0, normaliser=3))
    plain_init = adapter_state(plain.encoder.model)

    for _ in range(2):
        plain.step(torch.arange(3))
        dp.step(torch.arange(3))

    a, b = adapter_state(plain.encoder.model), adapter_state(dp.encoder.model)
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)  # float32 summation order
    assert any(not torch.allclose(a[k], plain_init[k]) for k in a)  # and training did move them


@pytest.mark.parametrize("negatives", [6, 0], ids=["sampled", "full-softmax"])
def test_vectorised_per_user_gradients_equal_the_per_user_loop(tiny_model, tiny_tokenizer, negatives) -> None:
    obj = Objective(window=2, max_len=5, temperature=0.1, negatives=negatives)
    trainer = _trainer(tiny_model, tiny_tokenizer, dp=None, objective=obj)
    _randomise_b(trainer)
    seqs = trainer.seqs
    items = trainer._items()

    grads, losses = per_user_gradients(trainer.encoder, trainer.params, seqs, None, items, objective=obj, chunk=2)

    for u in range(seqs.shape[0]):
        loss = user_losses(trainer.encoder, trainer.params, seqs[u : u + 1], None, items, objective=obj)[0]
        loop = torch.autograd.grad(loss, list(trainer.params.values()))
        assert losses[u].item() == pytest.approx(loss.item(), rel=1e-5)
        for g, name in zip(loop, trainer.params, strict=True):
            assert torch.allclose(grads[name][u], g, rtol=1e-4, atol=1e-6)
            assert g.abs().sum() > 0


def test_opacus_clips_each_user_to_the_bound(tiny_model, tiny_tokenizer) -> None:
    clip = 1e-3
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=PrivacyAccountant(),
                       dp=DPSettings(noise_multiplier=0.0, clip_norm=clip, sample_rate=1.0, normaliser=1),
                       lr=1.0)
    _randomise_b(trainer)
    grads, _ = trainer._dp_grads(torch.arange(1), trainer._items())
    raw = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    for name, p in trainer.params.items():
        p.grad_sample = grads[name]

    trainer.optimizer.pre_step()  # clip, (zero) noise, scale: p.grad is the clipped sum / 1

    clipped = torch.sqrt(sum((p.grad**2).sum() for p in trainer.params.values()))
    assert raw > clip
    assert clipped <= clip * (1 + 1e-4)


def test_empty_poisson_batch_still_spends_and_noises(tiny_model, tiny_tokenizer) -> None:
    accountant = PrivacyAccountant()
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=accountant,
                       dp=DPSettings(noise_multiplier=2.0, clip_norm=1.0, sample_rate=0.1))
    before = adapter_state(trainer.encoder.model)

    trainer.step(torch.arange(0))

    after = adapter_state(trainer.encoder.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert accountant.history == (MechanismStep(noise_multiplier=2.0, sample_rate=0.1, steps=1),)


def test_run_records_every_step_and_epsilon_matches_accountant(tiny_model, tiny_tokenizer) -> None:
    accountant = PrivacyAccountant()
    trainer = _trainer(tiny_model, tiny_tokenizer, accountant=accountant,
                       dp=DPSettings(noise_multiplier=1.5, clip_norm=1.0, sample_rate=0.5))

    result = trainer.run(4, progress=False)

    assert result.steps == 4
    assert accountant.history == (MechanismStep(noise_multiplier=1.5, sample_rate=0.5, steps=4),)
    expected = epsilon([MechanismStep(noise_multiplier=1.5, sample_rate=0.5, steps=4)], delta=1e-3)
    assert accountant.epsilon(1e-3) == pytest.approx(expected)


def test_sampling_is_poisson_with_the_public_rate(tiny_model, tiny_tokenizer) -> None:
    trainer = _trainer(tiny_model, tiny_tokenizer, dp=None, batch_size=1)
    trainer.users = [str(i) for i in range(1000)]  # the sampler only needs the count
    trainer.step = lambda rows: float(rows.numel())  # type: ignore[method-assign]
    sizes = [trainer.step(torch.as_tensor(np.flatnonzero(trainer.rng.random(1000) < 0.05)))
             for _ in range(200)]
    assert 45 < np.mean(sizes) < 55
    assert np.std(sizes) > 2  # the batch size varies, as Poisson sampling requires


def test_residual_cf_logits_are_the_prefix_scores() -> None:
    head = torch.tensor([1, 3])
    sim = torch.tensor([[0.0, 0.5], [0.5, 0.0]])
    popularity = torch.log1p(torch.tensor([0.0, 4.0, 0.0, 1.0]))
    cf = ResidualCF(head=head, similarity=sim, popularity=popularity, beta=0.1, scale=2.0)

    logits = cf.logits(torch.tensor([[-1, 1, 2, 3]]))  # (1, 3, 4): predict positions 1..3

    # position 1 (from nothing: padding): only popularity; position 2 (from [1]): sim row of 1
    assert torch.allclose(logits[0, 0], 2.0 * 0.1 * popularity)
    expected = 2.0 * (0.1 * popularity + torch.tensor([0.0, 0.0, 0.0, 0.5]))
    assert torch.allclose(logits[0, 1], expected)
    # position 3 (from [1, 2]): 2 is not in the head, the sum is divided by √2
    expected = 2.0 * (0.1 * popularity + torch.tensor([0.0, 0.0, 0.0, 0.5 / 2**0.5]))
    assert torch.allclose(logits[0, 2], expected)


def test_held_out_items_never_enter_a_softmax(tiny_model, tiny_tokenizer) -> None:
    full = Objective(window=2, max_len=5, temperature=0.1, negatives=0)
    enc = _encoder(tiny_model, tiny_tokenizer)
    trainer = LocalTrainer(enc, enc.trunk(TEXTS), {"a": [0, 1, 2]}, lr=0.05, batch_size=1, objective=full,
                           seed=0, blocked_items=[7, 8])
    sampled = LocalTrainer(enc, enc.trunk(TEXTS), {"a": [0, 1, 2]}, lr=0.05, batch_size=1, seed=0,
                           objective=Objective(window=2, max_len=5, temperature=0.1, negatives=50),
                           blocked_items=[7, 8])

    items = trainer._items()
    drawn = torch.cat([sampled._items().negatives for _ in range(20)])

    assert items.blocked is not None and items.blocked.nonzero().flatten().tolist() == [7, 8]
    assert not set(drawn.tolist()) & {7, 8}
    logits, _ = full_softmax_logits(enc, trainer.params, trainer.seqs, None, items, objective=full)
    probs = torch.softmax(logits, dim=-1)

    assert torch.isinf(logits[..., [7, 8]]).all() and torch.isfinite(logits[..., :7]).all()
    assert probs[..., [7, 8]].sum() == 0  # no probability, so no gradient, for a new arrival


def test_training_on_the_residual_uses_the_cf_logits(make_model, tiny_tokenizer) -> None:
    cf = ResidualCF(head=torch.arange(12), similarity=torch.eye(12).roll(1, 0) * 5.0,
                    popularity=torch.zeros(12), beta=0.0, scale=3.0)
    with_cf = _trainer(make_model(), tiny_tokenizer, dp=None, residual=cf)
    without = _trainer(make_model(), tiny_tokenizer, dp=None)

    a, b = with_cf.step(torch.arange(3)), without.step(torch.arange(3))

    assert a != pytest.approx(b)  # the loss sees the CF logits
    with torch.no_grad():
        adapted = with_cf.encoder.adapted_states(with_cf.frozen, with_cf.catalogue.inputs, with_cf.params)
    assert torch.allclose(adapted, with_cf.encoder.states(with_cf.catalogue), atol=1e-5)  # the two paths agree
