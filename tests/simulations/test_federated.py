"""End to end through Flower's Simulation Engine (Ray): `fedrec simulate` on a tiny model and data set."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from fedrec.cli import main
from fedrec.common import chain
from fedrec.common.config import load_config
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import RunDir, read_jsonl
from fedrec.simulations.federated import SIMULATION_ENV
from fedrec.simulations.superlink import processes_with
from safetensors.torch import load_file

TINY = [
    'model.name="tiny-random"', "data.max_users=0", "lora.rank=2", "lora.last_layers=1",
    "train.batch_size=8", "model.max_item_tokens=40",
    "fed.clients=3", "fed.local_epochs=0.5", "eval.batch_size=256",
]

LEDGER_KEYS = {
    "round", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "epsilon",
    "accountant", "budget", "run_id", "adapter_sha256", "seq", "prev_sha256", "entry_sha256",
    "dp", "rng", "policy_sha256",  # no "users": a client's user count is not released (issue 13)
    "signature", "signer",  # every line is signed with the institution's own key
}
EVAL_KEYS = LEDGER_KEYS | {"split", "prior_sha256"}  # a DP evaluation release's line
RELEASES = ("prior-counts", "prior-cooccurrence", "dp-sgd")  # the releases that are not evaluations


def simulate_args(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    args = ["simulate", "--data", str(data), "--output", str(out), "--cache-dir", str(cache), "--offline"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def check_ledger(lines: list[dict[str, Any]]) -> None:
    """ε never decreases and is what the accountant gives for the recorded mechanism."""
    history = []
    for entry in lines:
        for key in ("round", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "clip_norm"):
            assert key in entry
        history.append(MechanismStep(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], steps=entry["steps"]))
        assert entry["epsilon"] == pytest.approx(epsilon(history, delta=entry["delta"]), rel=1e-9)
    eps = [e["epsilon"] for e in lines]
    assert eps == sorted(eps)


def own_ledger(run: Path, client: str) -> list[dict[str, Any]]:
    """The ledger in the client's own state directory (hash-chained)."""
    lines = read_jsonl(run / "clients" / client / "ledger.jsonl")
    assert chain.verify(lines).status == "intact"
    return lines


def still_running(out: Path) -> list[str]:
    """Processes of the run in `out` (SuperLink, SuperExec, flwr-simulation, Ray's) still alive."""
    spec = str(RunDir(out, create=False).simulation.absolute())
    running = []
    for p in processes_with(SIMULATION_ENV, spec):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(f"{p.pid}:{p.name()}")
    return running


def test_simulation_end_to_end(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    # σ fixed so that client-0, with a budget of 1, can afford the prior release but no round
    args = simulate_args(tiny_data, out, cache, "fed.rounds=2", "privacy.noise_multiplier=2.0",
                         "fed.client_budgets={client-0=1.0}")

    assert main(args) == 0

    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["rounds"] == 2 and 0 <= final["test"]["ndcg@10"] <= 1
    # the global adapter changed (B starts at zero)
    cfg = load_config(None, TINY)
    initial = build_recommender(cfg, cache_dir=cache, offline=True).initial_adapter
    adapter = load_file(str(out / "final" / "adapter.safetensors"))
    assert set(adapter) == set(initial)
    assert any(not torch.equal(adapter[k], initial[k]) for k in initial if "lora_B" in k)

    # every message a client sent, as the ServerApp (another process) recorded it in received.jsonl:
    # LoRA tensors (or the noisy counts), scalar metrics, a status
    seen = [{"round": m["round"], "arrays": {k: list(r) for k, r in m["arrays"].items()},
             "metrics": m["metrics"], "configs": m["configs"]}
            for m in read_jsonl(RunDir(out, create=False).received) if "error" not in m]
    lora_keys = set(initial)
    assert seen
    for m in seen:
        assert set(m["arrays"]) <= {"arrays"}
        for keys in m["arrays"].values():
            assert set(keys) <= lora_keys or set(keys) in ({"counts"}, {"cooccurrence"})
        for metrics in m["metrics"].values():
            for value in metrics.values():
                values = value if isinstance(value, list) else [value]
                assert all(isinstance(v, int | float) for v in values)
        assert set(m["configs"]) <= {"status", "ledger"}
        assert set(m["configs"]["status"]) == {"status", "reason", "client"}
        if "ledger" in m["configs"]:  # the release's chained ledger line: numbers and hashes only
            line = m["configs"]["ledger"]
            assert set(line) == (EVAL_KEYS if line["mechanism"] == "dp-eval" else LEDGER_KEYS)
            assert line["rng"] == "os-entropy" and line["dp"] is True
    trained = [m for m in seen if m["round"] >= 1 and m["arrays"]]
    assert len(trained) == 4 and all(set(m["arrays"]["arrays"]) == lora_keys for m in trained)
    assert all("ledger" in m["configs"] for m in trained)  # every release carries its ledger line

    # the client over budget refused both rounds; the others trained; the run completed
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_refused"] == ["client-0"] and r["clients_ok"] == 2 for r in rounds)
    for name in ("client-0", "client-1", "client-2"):
        lines = read_jsonl(out / "ledgers" / f"{name}.jsonl")
        check_ledger(lines)
        assert lines == own_ledger(out, name)  # the server's copy is the client's own record
        assert lines[-1]["epsilon"] <= (1.0 if name == "client-0" else cfg.privacy.target_epsilon)
    # round 0: the popularity and the co-occurrence release; then one DP-SGD line per trained round
    releases = {name: [(e["round"], e["mechanism"]) for e in read_jsonl(out / "ledgers" / f"{name}.jsonl")
                       if e["mechanism"] in RELEASES] for name in ("client-0", "client-1")}
    prior = [(0, "prior-counts"), (0, "prior-cooccurrence")]
    assert releases == {"client-0": prior, "client-1": [*prior, (1, "dp-sgd"), (2, "dp-sgd")]}
    evaluations = [e for e in read_jsonl(out / "ledgers" / "client-1.jsonl") if e["mechanism"] == "dp-eval"]
    assert [(e["round"], e["split"]) for e in evaluations] == [(1, "valid"), (2, "valid"), (2, "test"), (2, "test")]

    assert "<svg" in (out / "report.html").read_text()
    assert "client-0" in (out / "report.md").read_text()
    assert (out / "checkpoints" / "round-2" / "adapter.safetensors").is_file()
    assert "fedrec simulation" in capsys.readouterr().out


def test_killed_run_resumes_with_identical_ledgers(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = simulate_args(tiny_data, out, tmp_path / "cache", "fed.rounds=3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedrec.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "round-1" / "server.json").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver mid-run; its guard stops Flower and Ray
        proc.wait()
    deadline = time.monotonic() + 30
    while still_running(out):  # nothing goes on with the run once its driver is gone
        assert time.monotonic() < deadline, f"still running 30 s after the kill: {still_running(out)}"
        time.sleep(0.2)
    killed_rounds = len(read_jsonl(out / "rounds.jsonl"))
    assert killed_rounds < 3
    at_kill = {p.stem: read_jsonl(p) for p in (out / "ledgers").glob("*.jsonl")}

    assert main(args) == 2  # the run directory is taken: no silent overwrite
    assert main([*args, "--resume"]) == 0

    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for name, before in at_kill.items():
        after = read_jsonl(out / "ledgers" / f"{name}.jsonl")
        assert after[: len(before)] == before  # nothing lost or rewritten
        assert [e["round"] for e in after if e["mechanism"] in RELEASES] == [0, 0, 1, 2, 3]  # each once
        evaluations = [(e["round"], e["split"]) for e in after if e["mechanism"] == "dp-eval"]
        assert evaluations[:3] == [(1, "valid"), (2, "valid"), (3, "valid")]  # each once
        assert evaluations[3:] in ([(3, "test")] * 2, [(3, "test")])  # the blend; the LLM alone if granted
        check_ledger(after)
        assert after == own_ledger(out, name)
        assert after[-1]["epsilon"] <= 8.0 + 1e-9
    assert still_running(out) == []


def test_simulate_prints_a_line_per_round_and_no_flower_noise(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = simulate_args(tiny_data, out, tmp_path / "cache", "fed.rounds=2")

    done = subprocess.run([sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True,
                          timeout=600)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "DEPRECATED" not in output  # run_simulation's warning: the supported path is used
    for noise in ("FutureWarning", "ClientAppActor", "configure_train", "Since flwr", "insecure"):
        assert noise not in output, noise
    progress = [line for line in done.stderr.splitlines() if "round " in line and "/2: " in line]
    assert len(progress) == 2 and all("clients trained" in line and "ε max" in line for line in progress)
    assert "fedrec simulation" in done.stdout  # the report's tables
    assert "Since flwr" in (out / "flower.log").read_text()  # Flower's own lines went to its log
    assert still_running(out) == []


def test_federation_config_carries_the_backend() -> None:
    from fedrec.simulations.federated import _backend, federation_config

    local = federation_config(_backend(load_config(None, ["fed.num_cpus=1.0", "fed.num_gpus=0.5"])), 3)
    cluster = federation_config(_backend(load_config(None, ['fed.ray_address="auto"', "fed.num_cpus=0.4"])), 2)

    assert local == (f"num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.5 "
                     f'init-args-logging-level="ERROR" init-args-log-to-driver=false '
                     f"init-args-num-cpus={os.cpu_count() or 1}")
    assert "init-args-num-cpus" not in cluster  # the cluster's own (Ray refuses both)
    assert "client-resources-num-cpus=1 " in cluster  # Flower takes whole CPUs, at least 1


def test_the_spec_path_reaches_a_ray_clusters_workers_too(tmp_path: Path) -> None:
    from fedrec.simulations.federated import _backend, simulation_env

    spec = tmp_path / "run" / "simulation.json"
    local = simulation_env(_backend(load_config(None, [])), spec)
    cluster = simulation_env(_backend(load_config(None, ['fed.ray_address="10.0.0.1:6379"'])), spec)

    assert local == {SIMULATION_ENV: str(spec)}
    assert cluster[SIMULATION_ENV] == str(spec) and cluster["RAY_ADDRESS"] == "10.0.0.1:6379"
    # a cluster's workers have the cluster's environment: the path travels in the job's runtime env
    job = json.loads(cluster["RAY_JOB_CONFIG_JSON_ENV_VAR"])
    assert job == {"runtime_env": {"env_vars": {SIMULATION_ENV: str(spec)}}}


def test_simulation_spec_round_trip_and_each_node_its_institution(tmp_path: Path) -> None:
    from fedrec.client.policy import simulated_policy
    from fedrec.common.errors import ConfigError
    from fedrec.simulations.federated import SimulationSpec

    cfg = load_config(None, [*TINY, "fed.client_budgets={client-1=2.0}", 'fed.client_policy={"*"={max-local-epochs=3.0}}'])
    spec = SimulationSpec(cfg, ("client-0", "client-1", "client-2"), tmp_path / "run", tmp_path / "cache",
                          True, False)

    again = SimulationSpec.from_json(json.loads(json.dumps(spec.to_json())), source="test")
    config, local = again.client_settings({"partition-id": 1, "num-partitions": 3})

    assert again == spec and config == cfg
    assert local.name == "client-1" and local.state_dir == tmp_path / "run" / "clients" / "client-1"
    assert local.the_policy == simulated_policy(cfg, "client-1") and local.epsilon_budget == 2.0
    assert local.offline and local.cache_dir == tmp_path / "cache"
    with pytest.raises(ConfigError, match="partition-id=3"):
        again.client_settings({"partition-id": 3, "num-partitions": 4})


def test_ray_cluster_backend_uses_the_cluster_resources() -> None:
    from fedrec.simulations.federated import _backend

    local = _backend(load_config(None, ["fed.num_cpus=64"]))
    assert local["init_args"]["num_cpus"] == (os.cpu_count() or 1)
    assert local["client_resources"]["num_cpus"] <= local["init_args"]["num_cpus"]
    cluster = _backend(load_config(None, ['fed.ray_address="auto"', "fed.num_cpus=4", "fed.num_gpus=0.25"]))
    assert cluster["init_args"]["address"] == "auto" and "num_cpus" not in cluster["init_args"]
    assert cluster["client_resources"] == {"num_cpus": 4.0, "num_gpus": 0.25}
