"""Resuming from checkpoints: a torn or missing server.json falls back to the checkpoint before it;
a round that no client trained stops the run with one line (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedrec.common.config import load_config, to_dict
from fedrec.common.errors import DataError
from fedrec.common.rundir import FAILED, RunDir, atomic_write_json
from fedrec.common.wire import Reply
from fedrec.server.checkpoints import ServerState, start_or_resume, write_checkpoint
from fedrec.server.rounds import no_client_trained
from fedrec.server.strategies import FedAdam


def started_run(tmp_path: Path, rounds: int):  # type: ignore[no-untyped-def]
    cfg = load_config(None, [])
    run = RunDir(tmp_path / "run")
    atomic_write_json(run.run_record, {"run_id": "abc", "settings": to_dict(cfg)})
    for rnd in range(1, rounds + 1):
        state = ServerState(run_id="abc", round=rnd, history=[{"round": r} for r in range(1, rnd + 1)])
        write_checkpoint(run, state, {"w": torch.full((2,), float(rnd))}, {})
    return cfg, run


def test_a_torn_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    cfg, run = started_run(tmp_path, 3)
    (run.root / "checkpoints" / "round-3" / "server.json").write_text('{"round": 3, "hist')  # torn write

    resumed = start_or_resume(run, cfg, resume=True)

    state = resumed.state
    assert state.round == 2 and state.run_id == "abc" and len(state.history) == 2
    assert "round-3 is damaged" in caplog.text
    assert torch.equal(resumed.adapter["w"], torch.full((2,), 2.0))


def test_a_torn_adapter_or_a_foreign_server_json_falls_back_too(tmp_path: Path) -> None:
    cfg, run = started_run(tmp_path, 3)
    (run.root / "checkpoints" / "round-3" / "adapter.safetensors").write_bytes(b"\x00" * 7)
    doc = json.loads((run.root / "checkpoints" / "round-2" / "server.json").read_text())
    (run.root / "checkpoints" / "round-2" / "server.json").write_text(json.dumps({**doc, "round": 5}))

    assert start_or_resume(run, cfg, resume=True).state.round == 1


def test_every_checkpoint_damaged_starts_from_the_beginning(tmp_path: Path) -> None:
    cfg, run = started_run(tmp_path, 1)
    (run.root / "checkpoints" / "round-1" / "server.json").write_text("")

    state = start_or_resume(run, cfg, resume=True).state

    assert (state.round, state.run_id, state.history) == (0, "abc", [])


def test_a_round_no_client_trained_is_recorded_with_its_reason(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    replies = [Reply("policy-conflict", {}, reason="policy-conflict: fed.dp=false not allowed at client-0",
                     client="client-0")]

    out = no_client_trained(run, 2, replies, ["node 9: Node Unavailable"])

    reason = json.loads((run.root / FAILED).read_text())["reason"]
    assert out == {"failed": reason}
    assert reason.startswith("round 2: no client trained (1 refused, 1 failed)")
    assert "fed.dp=false not allowed at client-0" in reason and "Node Unavailable" in reason


@pytest.mark.parametrize(("doc", "needle"), [
    ({"round": 2, "run_id": "xyz", "history": [], "ledgers": {}}, "belongs to run 'xyz'"),
    ({"round": -1, "history": [], "ledgers": {}}, "not a round number"),
    ({"round": 2, "history": {"round": 1}, "ledgers": {}}, "history"),
    ({"round": 2, "history": [], "ledgers": {"../etc": []}}, "not allowed"),
    ({"round": 2, "history": [], "ledgers": {"a": "line"}}, "not a list of lines"),
])
def test_the_server_state_refuses_what_is_not_this_runs(doc: dict, needle: str) -> None:
    state = ServerState(run_id="abc")

    with pytest.raises(DataError, match=needle.replace(".", r"\.")):
        state.load_state_dict(doc)
    assert (state.round, state.history, state.ledgers) == (0, [], {})  # nothing half-loaded


def test_the_state_round_trips_and_a_strategy_that_refuses_its_state_falls_back(tmp_path: Path) -> None:
    cfg, run = started_run(tmp_path, 2)
    state = ServerState(run_id="abc", round=3, history=[{"round": r} for r in (1, 2, 3)],
                        ledgers={"client-0": [{"round": 1, "epsilon": 0.5}]})
    write_checkpoint(run, state, {"w": torch.zeros(2)}, {"m_t/w": torch.zeros(2)})  # v_t missing

    copy = ServerState(run_id="abc")
    copy.load_state_dict(state.state_dict())
    resumed = start_or_resume(run, cfg, resume=True, strategy=FedAdam())

    assert copy == state
    assert resumed.state.round == 2  # round 3's strategy state does not load: the one before
