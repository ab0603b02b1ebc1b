"""The institution's policy holds whatever the coordinator asks: refusals, pinning, secret randomness,
no free evaluation oracle, durable state (issue 13)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fedrec.client import app as client_app
from fedrec.client.audit import checks as audit
from fedrec.client.local import ClientJob, LocalSettings
from fedrec.client.policy import Policy, policy_from_settings
from fedrec.client.state import ClientState, state_ledger
from fedrec.common.config import Config, to_run_config
from fedrec.common.data import leave_one_out, load_dataset
from fedrec.common.errors import ConfigError, PrivacyError
from fedrec.common.evaluation import BLEND_WEIGHTS
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.privacy.mechanisms import OS_ENTROPY, SEEDED
from fedrec.common.privacy.party import Party
from fedrec.common.wire import RoundRequest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from tests.client.test_app import (
    context,
    fresh_process_cache,
    global_adapter,
    instruction,
    tiny_config,
    train_message,
)

__all__ = ["fresh_process_cache"]  # the autouse fixture, imported so that it applies here too


def app_with(cfg: Config, state: Path, cache: Path, policy: Policy, name: str = "client-0"):
    local = LocalSettings.of(name, state, policy, cache, True)
    return client_app.make_client_app(lambda ctx: (cfg, local))


def status(reply: Message) -> dict:
    return dict(reply.content["status"])


def ledger(state: Path) -> list[dict]:
    path = state / "ledger.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def prior_message(rnd: int = 0, run: str = "r1") -> Message:
    cfg = ConfigRecord({"run-id": run, "server-round": rnd, "num-rounds": 2, "local-epochs": 0.5, "lr": 0.01})
    return instruction(RecordDict({"config": cfg}), "query.prior")


def eval_message(tensors, *, counts=None, betas=None, ks=None, rnd: int = 1, run: str = "r1") -> Message:
    config: dict = {"split": "valid", "run-id": run, "server-round": rnd}
    if betas is not None:
        config["weights"] = [float(b) for b in betas]
    if ks is not None:
        config["ks"] = list(ks)
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=tensors), "config": ConfigRecord(config)})
    if counts is not None:
        content["prior"] = ArrayRecord(torch_state_dict={  # a popularity-only prior
            "popularity": torch.as_tensor(counts, dtype=torch.float32), "head": torch.zeros(0, dtype=torch.long)})
    return instruction(content, "evaluate")


# --- the coordinator cannot weaken the guarantee -------------------------------------------------


@pytest.mark.parametrize(("extra", "policy_kw", "expected"), [
    (("fed.dp=false",), {}, "fed.dp=false not allowed at client-0"),
    (("privacy.noise_multiplier=0.3",), {"min_noise_multiplier": 1.0}, "privacy.noise_multiplier=0.3"),
    (("train.sample_rate=1.0",), {"max_sample_rate": 0.5}, "train.sample_rate=1"),  # a larger batch
    (("train.deterministic=true",), {}, "train.deterministic=true"),
])
def test_simulated_client_refuses_what_its_policy_does_not_allow(tiny_data: Path, tmp_path: Path, extra,
                                                                  policy_kw, expected) -> None:
    cfg = tiny_config(tiny_data, *extra)
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=8.0, **policy_kw))

    reply = app(train_message(global_adapter(cfg, tmp_path), 1), context())

    assert status(reply)["status"] == "policy-conflict"
    assert expected in status(reply)["reason"] and status(reply)["reason"].startswith("policy-conflict: ")
    assert "arrays" not in reply.content.array_records and "ledger" not in reply.content.config_records
    assert ledger(tmp_path / "state") == []


def deployed_context(tmp_path: Path, data: Path, run_config: dict, **node) -> Context:
    node_config = {"client-name": "hospital-a", "epsilon-budget": 8.0, "state-dir": str(tmp_path / "a"),
                   "data": str(data), "cache-dir": str(tmp_path / "cache"), **node}
    return Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_deployed_client_refuses_dp_off_and_a_lower_sigma_from_the_run_config(tiny_data: Path,
                                                                               tmp_path: Path) -> None:
    app = client_app.make_client_app()  # settings from the node config, as a SuperNode
    base = tiny_config(tiny_data)
    sent = global_adapter(base, tmp_path)

    off = to_run_config(tiny_config(tiny_data, "fed.dp=false"))
    reply = app(train_message(sent, 1), deployed_context(tmp_path, tiny_data, off))
    assert status(reply) == {"status": "policy-conflict", "client": "hospital-a",
                             "reason": "policy-conflict: fed.dp=false not allowed at hospital-a"}

    low = to_run_config(tiny_config(tiny_data, "privacy.noise_multiplier=0.2"))
    reply = app(train_message(sent, 1),
                deployed_context(tmp_path, tiny_data, low, **{"min-noise-multiplier": 0.8}))
    assert status(reply)["status"] == "policy-conflict" and "below the floor 0.8" in status(reply)["reason"]
    assert ledger(tmp_path / "a") == []


def test_a_raised_budget_or_clip_in_the_run_config_changes_nothing(tiny_data: Path, tmp_path: Path) -> None:
    app = client_app.make_client_app()
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=0.6", "privacy.target_epsilon=1000",
                      "privacy.clip_norm=50.0", "prior.enabled=false")
    ctx = deployed_context(tmp_path, tiny_data, to_run_config(cfg), **{"epsilon-budget": 0.5})

    reply = app(train_message(global_adapter(cfg, tmp_path), 1), ctx)

    assert status(reply)["status"] == "over-budget" and "budget 0.5" in status(reply)["reason"]
    ok = app(train_message(global_adapter(cfg, tmp_path), 1),
             deployed_context(tmp_path / "b", tiny_data, to_run_config(cfg), **{"epsilon-budget": 100.0}))
    assert status(ok)["status"] == "ok"
    assert dict(ok.content["ledger"])["clip_norm"] == 1.0 and dict(ok.content["ledger"])["budget"] == 100.0


def test_policy_settings_are_validated_one_line_each() -> None:
    for bad in ({"epsilon-budget": math.inf}, {"epsilon-budget": "nan"}, {"epsilon-budget": 8, "delta": 0.0},
                {"epsilon-budget": 8, "evaluation": "exact"}, {"epsilon-budget": 8, "eval-ks": "ten"},
                {"epsilon-budget": 8, "alow-non-private": True}, {}):
        with pytest.raises(ConfigError):
            policy_from_settings(bad, where="node config")
    p = policy_from_settings({"epsilon-budget": 4, "eval-ks": "5,10", "allow-non-private": "true",
                              "client-name": "a"}, where="node config")
    assert p.eval_ks == (5, 10) and p.allow_non_private and p.epsilon_budget == 4.0


def test_non_private_training_only_where_allowed_and_the_audit_fails_it(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "fed.dp=false")
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=8.0, allow_non_private=True))

    reply = app(train_message(global_adapter(cfg, tmp_path), 1), context())

    assert status(reply)["status"] == "ok"
    [line] = ledger(tmp_path / "state")
    assert line["mechanism"] == "non-private" and line["dp"] is False and line["noise_multiplier"] == 0.0
    assert math.isinf(line["epsilon"])
    verdict = audit.audit_ledger("client-0", [line], source="x")
    assert not verdict.passed


def test_the_policy_is_pinned_at_the_first_release(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=1.0")
    state = tmp_path / "state"
    first = app_with(cfg, state, tmp_path / "cache", Policy(epsilon_budget=8.0))(prior_message(), context())
    assert status(first)["status"] == "ok"
    pinned = json.loads((state / "state.json").read_text())
    assert pinned["policy"]["epsilon_budget"] == 8.0 and ledger(state)[0]["policy_sha256"] == pinned["policy_sha256"]

    client_app._JOBS.clear()  # the institution (or whoever writes its settings) raises the budget to 50
    raised = app_with(cfg, state, tmp_path / "cache", Policy(epsilon_budget=50.0))
    reply = raised(train_message(global_adapter(cfg, tmp_path), 1), context())
    assert status(reply)["status"] == "policy-conflict" and "changed since its first release" in status(reply)["reason"]
    assert len(ledger(state)) == 1


# --- secret randomness ---------------------------------------------------------------------------


def test_two_identical_runs_release_different_noise_and_the_ledger_names_the_rng(tiny_data: Path,
                                                                                 tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=1.0")
    sent = global_adapter(cfg, tmp_path)
    released = []
    for run in ("a", "b"):
        client_app._JOBS.clear()
        app = app_with(cfg, tmp_path / run, tmp_path / "cache", Policy(epsilon_budget=8.0))
        counts = app(prior_message(), context()).content["arrays"].to_torch_state_dict()["counts"]
        adapter = app(train_message(sent, 1), context()).content["arrays"].to_torch_state_dict()
        released.append((counts, adapter))
        assert {e["rng"] for e in ledger(tmp_path / run)} == {OS_ENTROPY}
    (c1, a1), (c2, a2) = released
    assert not torch.equal(c1, c2)  # same config, same train.seed, same name and round
    assert any(not torch.equal(a1[k], a2[k]) for k in a1)


def test_deterministic_only_through_the_institutions_own_setting(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=1.0", "train.deterministic=true")
    outs = []
    for run in ("a", "b"):
        client_app._JOBS.clear()
        app = app_with(cfg, tmp_path / run, tmp_path / "cache", Policy(epsilon_budget=8.0, deterministic=True))
        outs.append(app(prior_message(), context()).content["arrays"].to_torch_state_dict()["counts"])
        assert ledger(tmp_path / run)[0]["rng"] == SEEDED
    assert torch.equal(outs[0], outs[1])


# --- no free oracles -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"betas": [0.0, 1.0] * 20}, "prior weights"),
    ({"betas": [1e6]}, "outside the grid"),
    ({"ks": [1]}, "cut-offs [1]"),
])
def test_crafted_evaluate_messages_are_refused(tiny_data: Path, tmp_path: Path, kwargs, expected) -> None:
    cfg = tiny_config(tiny_data)
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=8.0))
    counts = np.zeros(30)
    reply = app(eval_message(global_adapter(cfg, tmp_path), counts=counts, **kwargs), context())
    assert status(reply)["status"] == "policy-conflict" and expected in status(reply)["reason"]
    assert ledger(tmp_path / "state") == []


@pytest.mark.parametrize("counts", [np.r_[1e30, np.zeros(29)], np.r_[np.nan, np.zeros(29)], np.zeros(31)])
def test_bad_prior_counts_are_refused(tiny_data: Path, tmp_path: Path, counts) -> None:
    cfg = tiny_config(tiny_data)
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=8.0))
    reply = app(eval_message(global_adapter(cfg, tmp_path), counts=counts, betas=[1.0]), context())
    assert status(reply)["status"] == "bad-request"
    assert ledger(tmp_path / "state") == []


def test_evaluation_is_a_dp_release_charged_once_or_off(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)
    sent = global_adapter(cfg, tmp_path)
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache",
                   Policy(epsilon_budget=8.0, eval_noise_multiplier=5.0))
    msg = eval_message(sent, counts=np.arange(30.0), betas=BLEND_WEIGHTS)

    first = app(msg, context())
    again = app(eval_message(sent, counts=np.arange(30.0), betas=BLEND_WEIGHTS), context())  # a replay

    assert status(first)["status"] == "ok"
    metrics = dict(first.content["metrics"])
    assert len(metrics["ndcg@10"]) == len(BLEND_WEIGHTS) and metrics["num-examples"] != 12.0  # noised
    [line] = ledger(tmp_path / "state")
    assert line["mechanism"] == "dp-eval" and line["noise_multiplier"] == 5.0 and line["epsilon"] > 0
    assert metrics["epsilon"] == line["epsilon"] and dict(again.content["metrics"]) == metrics

    client_app._JOBS.clear()
    off = app_with(cfg, tmp_path / "off", tmp_path / "cache", Policy(epsilon_budget=8.0, evaluation="off"))
    reply = off(eval_message(sent), context())
    assert status(reply)["status"] == "policy-conflict" and "hr@10" not in dict(reply.content["metrics"])


def test_evaluation_noise_follows_the_announced_plan(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)
    sent = global_adapter(cfg, tmp_path)
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=2.0))

    early = app(eval_message(sent), context())  # no prior or training release yet: no plan
    assert status(early)["status"] == "policy-conflict" and "before any" in status(early)["reason"]

    app(prior_message(), context())  # num-rounds = 2: two validations and two test evaluations
    reply = app(eval_message(sent, rnd=1), context())

    assert status(reply)["status"] == "ok"
    sigma = ledger(tmp_path / "state")[-1]["noise_multiplier"]
    delta = ledger(tmp_path / "state")[-1]["delta"]
    assert epsilon([MechanismStep(noise_multiplier=sigma, sample_rate=1.0, steps=4)], delta=delta) == pytest.approx(0.1 * 2.0, abs=0.011)


def test_a_small_budget_still_releases_and_sizes_its_evaluations(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)  # 0.1 of ε = 1 is below what RDP can certify at δ = 1e-5
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=1.0))

    assert status(app(prior_message(), context()))["status"] == "ok"

    sigma = json.loads((tmp_path / "state" / "state.json").read_text())["eval_noise_multiplier"]
    assert 0 < sigma < 1e5


def test_training_replies_carry_no_loss_and_no_user_count(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data)
    app = app_with(cfg, tmp_path / "state", tmp_path / "cache", Policy(epsilon_budget=8.0))
    reply = app(train_message(global_adapter(cfg, tmp_path), 1), context())
    metrics, line = dict(reply.content["metrics"]), dict(reply.content["ledger"])
    assert "loss" not in metrics and "users_seen" not in metrics and metrics["num-examples"] == 1.0
    assert "users" not in line
    assert line["sample_rate"] == cfg.train.sample_rate  # public, not batch_size / 12 users


# --- durable state -------------------------------------------------------------------------------


def reopen(state: Path) -> ClientState:
    """The state directory read back as a restarted client reads it (its party's spending loaded)."""
    return ClientState(state, party=Party(name="client-0", users=12, budget=8.0, ledger=state_ledger(state)))


def make_job(cfg: Config, data: Path, state: Path, cache: Path) -> ClientJob:
    dataset = load_dataset(data)
    return ClientJob(cfg, LocalSettings("client-0", state, 8.0, None, cache, True), dataset,
                     leave_one_out(dataset))


def test_concurrent_messages_for_one_round_release_once(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=1.0")
    sent = global_adapter(cfg, tmp_path)
    jobs = [make_job(cfg, tiny_data, tmp_path / "state", tmp_path / "cache") for _ in range(2)]
    req = RoundRequest("r1", 1, 2, 0.5, 0.01)
    outcomes: list = [None, None]
    barrier = threading.Barrier(2)

    def go(i: int) -> None:
        barrier.wait()
        outcomes[i] = jobs[i].train(sent, req)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert len(ledger(tmp_path / "state")) == 1
    assert outcomes[0].ledger == outcomes[1].ledger
    assert all(torch.equal(outcomes[0].tensors[k], outcomes[1].tensors[k]) for k in outcomes[0].tensors)
    history = reopen(tmp_path / "state").accountant.history
    assert len(history) == 1 and history[0].steps == outcomes[0].ledger["steps"]  # spent once


def test_a_crash_between_state_and_ledger_is_repaired(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, "privacy.noise_multiplier=1.0")
    state = tmp_path / "state"
    app = app_with(cfg, state, tmp_path / "cache", Policy(epsilon_budget=8.0))
    app(prior_message(), context())
    app(train_message(global_adapter(cfg, tmp_path), 1), context())
    full = (state / "ledger.jsonl").read_text()
    (state / "ledger.jsonl").write_text(full.splitlines(keepends=True)[0])  # state.json written, then crash

    reopen(state)

    assert (state / "ledger.jsonl").read_text() == full
    (state / "ledger.jsonl").write_text(full + full.splitlines(keepends=True)[0])  # a line state.json lacks
    with pytest.raises(PrivacyError, match="not a prefix"):
        reopen(state)
