"""`fedrec simulate` under the institutions' policies: bad privacy settings are one line before Flower
starts, and a run in which no client trains exits non-zero saying why (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedrec.cli import main
from fedrec.common.rundir import read_jsonl

from tests.simulations.test_federated import simulate_args


@pytest.mark.parametrize(("setting", "needle"), [
    ("privacy.target_epsilon=inf", "privacy.target_epsilon=inf must be a finite number"),
    ("privacy.target_epsilon=nan", "privacy.target_epsilon=nan must be a finite number"),
    ("fed.client_budgets={client-0=inf}", "fed.client_budgets.client-0=inf"),
    ("privacy.delta=0.5", "client-0: privacy.delta=0.5 must be > 0 and < 1/users"),
    ("fed.client_policy={client-9={allow-non-private=true}}", "fed.client_policy names unknown client"),
    ("fed.client_policy={client-0={min-noise-multiplier=inf}}", "min-noise-multiplier=inf"),
    ("fed.clients=40", "fed.clients: num_clients=40 must be between 1 and the 24 users"),
    ("data.max_users=2", "fed.clients=3 but only"),  # 3 clients, but only 2 users sampled
])
def test_bad_privacy_settings_are_one_line_and_exit_2(tiny_data: Path, tmp_path: Path, capsys,
                                                      setting: str, needle: str) -> None:
    code = main(simulate_args(tiny_data, tmp_path / "run", tmp_path / "cache", setting))

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedrec: error:") and err.count("\n") == 1, err
    assert needle in err
    assert not (tmp_path / "run" / "rounds.jsonl").exists()


def test_a_run_the_policies_refuse_exits_2_with_the_reason(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"

    code = main(simulate_args(tiny_data, out, tmp_path / "cache", "fed.rounds=2", "fed.dp=false"))

    last = capsys.readouterr().err.strip().splitlines()[-1]  # the library warnings before it are not ours
    assert code == 2 and last.startswith("fedrec: error: round 1: no client trained (3 refused, 0 failed)")
    assert "policy-conflict: fed.dp=false not allowed at client-0" in last
    assert json.loads((out / "failed.json").read_text())["round"] == 1
    assert not (out / "final" / "adapter.safetensors").exists()  # nothing trained: nothing to serve
    for name in ("client-0", "client-1", "client-2"):  # the prior releases happened; no round did
        assert [e["mechanism"] for e in read_jsonl(out / "ledgers" / f"{name}.jsonl")] == \
            ["prior-counts", "prior-cooccurrence"]


def test_non_private_only_where_the_simulated_policy_allows_it(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = simulate_args(tiny_data, out, tmp_path / "cache", "fed.rounds=1", "fed.dp=false", "prior.enabled=false",
                         'fed.client_policy={"*"={allow-non-private=true}}')

    assert main(args) == 0
    assert main(["audit", str(out)]) == 1

    err = capsys.readouterr().err
    assert "every release under DP" in err and "within budget" in err
    line = [e for e in read_jsonl(out / "ledgers" / "client-0.jsonl") if e["mechanism"] != "dp-eval"]
    assert [e["mechanism"] for e in line] == ["non-private"]


def test_a_client_refusing_by_policy_is_refused_not_missing(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = simulate_args(tiny_data, out, tmp_path / "cache", "fed.rounds=1", "prior.enabled=false",
                         "fed.client_policy={client-0={max-local-epochs=0.1}}")  # the run asks for 0.5

    assert main(args) == 0

    [record] = read_jsonl(out / "rounds.jsonl")
    assert record["clients_refused"] == ["client-0"] and record["clients_ok"] == 2
    assert main(["audit", str(out)]) == 0  # no round is expected in client-0's ledger
