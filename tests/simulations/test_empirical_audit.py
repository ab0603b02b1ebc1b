"""The one-run canary audit (Steinke, Nasr & Jagielski 2023) on the tiny model: it has power
without noise, and at ε = 1 its lower bound stays at or below 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fedrec.cli import main
from fedrec.client.audit.canaries import CanaryTrainer, draw_canaries
from fedrec.client.train import DPSettings, Objective
from fedrec.common.config import load_config
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.recommender import build_recommender

REPO = Path(__file__).resolve().parents[2]
# one client of a few real users, 200 gradient canaries, 6 local epochs: ~20 s on 2 busy cores
AUDIT = ["data.max_users=8", "train.batch_size=16", "fed.rounds=1", "fed.local_epochs=6", "train.lr=0.003"]


def test_canary_audit_has_power_and_does_not_refute_epsilon_one(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "canaries.json"
    args = ["audit", "--empirical", "--config", str(REPO / "simulations" / "configs" / "smoke.toml"),
            "--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--offline",
            "--canaries", "200", "--output", str(out), "--set", "privacy.target_epsilon=1.0"]
    for item in AUDIT:
        args += ["--set", item]

    assert main(args) == 0

    report = json.loads(out.read_text())
    private, contrast = report["empirical"]
    assert private["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert private["noise_multiplier"] > 1 and contrast["noise_multiplier"] == 0.0
    assert private["guesses"]["epsilon_lower_bound"] <= 1.0  # the claim survives the audit
    assert contrast["guesses"]["epsilon_lower_bound"] > 1.0  # without noise the same attack sees members
    assert contrast["guesses"]["correct"] >= 36 and contrast["guesses"]["guesses"] == 40
    assert [c["status"] for c in report["empirical_checks"]] == ["pass", "pass"]


def test_gradient_canaries_go_through_opacus_clipping(tiny_data: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ['model.name="tiny-random"', "lora.rank=2"])
    encoder = build_recommender(cfg, cache_dir=tmp_path / "cache", offline=True).encoder
    plan = draw_canaries(30, 20, seed=0)
    accountant = PrivacyAccountant()
    trainer = CanaryTrainer(encoder, encoder.trunk([f"x{i}" for i in range(30)]), plan=plan, kind="gradient",
                            clip_norm=1.0, seed=0, sequences={}, lr=0.1, batch_size=4,
                            objective=Objective(window=4, max_len=4, negatives=3),
                            dp=DPSettings(0.0, 1.0, 1.0), accountant=accountant)
    members = torch.arange(len(trainer.users))  # only canaries: every included one is a user

    grads, _ = trainer._dp_grads(members, trainer._items())

    assert len(trainer.users) == sum(plan.included)
    assert all(g.shape[0] == len(members) for g in grads.values())  # one per-user row per canary
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    assert torch.allclose(norms, torch.full_like(norms, 10.0))  # Dirac of 10·C before Opacus clips it
    trainer.run(3, progress=False)
    scores = trainer.gradient_scores()
    included = np.array(plan.included)
    assert scores[included].min() > 0 and np.abs(scores[~included]).max() == 0  # only members moved


def test_input_canaries_run_through_the_recommender(tiny_data: Path, tmp_path: Path) -> None:
    """Black-box canaries: real examples through the model, scored by log p(target) (no power
    claim on the tiny model, which cannot memorise them)."""
    from fedrec.client.audit.canaries import audit_run
    from fedrec.common.assets import Sources

    cfg = load_config(REPO / "simulations" / "configs" / "smoke.toml",
                      [f'data.dataset="{tiny_data}"', "data.max_users=8", "train.batch_size=8", "fed.rounds=1",
                       "fed.local_epochs=0.5", "privacy.target_epsilon=1.0"])

    result = audit_run(cfg, Sources(cache_dir=tmp_path / "cache", offline=True), canaries=20, private=True,
                       kind="input")

    assert result.kind == "input" and len(result.scores) == 20
    assert all(s < 0 for s in result.scores)  # log-probabilities over the catalogue
    assert 0 < result.claimed_epsilon <= 1.0 + 1e-9
    assert result.guesses.guesses == 4
