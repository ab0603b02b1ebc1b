"""Resuming from checkpoints: a torn or missing server.json falls back to the checkpoint before it;
a round that no client trained stops the run with one line (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fedrec.common.config import load_config, to_dict
from fedrec.common.rundir import RunDir
from fedrec.server import app as server_app
from fedrec.server.app import FAILED, Reply, ServerState, _checkpoint, _no_client_trained, _start_or_resume


def started_run(tmp_path: Path, rounds: int):  # type: ignore[no-untyped-def]
    cfg = load_config(None, [])
    run = RunDir(tmp_path / "run")
    run.write_json("run.json", {"run_id": "abc", "settings": to_dict(cfg)})
    for rnd in range(1, rounds + 1):
        state = ServerState(run_id="abc", round=rnd, history=[{"round": r} for r in range(1, rnd + 1)])
        _checkpoint(run.root, state, {"w": torch.full((2,), float(rnd))}, {})
    return cfg, run


def test_a_torn_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    cfg, run = started_run(tmp_path, 3)
    (run.root / "checkpoints" / "round-3" / "server.json").write_text('{"round": 3, "hist')  # torn write

    state = _start_or_resume(run, cfg, resume=True)

    assert state.round == 2 and state.run_id == "abc" and len(state.history) == 2
    assert "round-3 is damaged" in caplog.text
    current, _ = server_app._load_checkpoint_tensors(run.root, state.round)
    assert torch.equal(current["w"], torch.full((2,), 2.0))


def test_a_torn_adapter_or_a_foreign_server_json_falls_back_too(tmp_path: Path) -> None:
    cfg, run = started_run(tmp_path, 3)
    (run.root / "checkpoints" / "round-3" / "adapter.safetensors").write_bytes(b"\x00" * 7)
    doc = json.loads((run.root / "checkpoints" / "round-2" / "server.json").read_text())
    (run.root / "checkpoints" / "round-2" / "server.json").write_text(json.dumps({**doc, "round": 5}))

    assert _start_or_resume(run, cfg, resume=True).round == 1


def test_every_checkpoint_damaged_starts_from_the_beginning(tmp_path: Path) -> None:
    cfg, run = started_run(tmp_path, 1)
    (run.root / "checkpoints" / "round-1" / "server.json").write_text("")

    state = _start_or_resume(run, cfg, resume=True)

    assert (state.round, state.run_id, state.history) == (0, "abc", [])


def test_a_round_no_client_trained_is_recorded_with_its_reason(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    replies = [Reply("client-0", "policy-conflict", "policy-conflict: fed.dp=false not allowed at client-0",
                     {}, {}, 0)]

    out = _no_client_trained(run, 2, replies, ["node 9: Node Unavailable"])

    reason = json.loads((run.root / FAILED).read_text())["reason"]
    assert out == {"failed": reason}
    assert reason.startswith("round 2: no client trained (1 refused, 1 failed)")
    assert "fed.dp=false not allowed at client-0" in reason and "Node Unavailable" in reason
