"""`fedrec simulate`: N simulated institutions on one machine, on Flower's simulation runtime.

The ServerApp and ClientApp are the same ones a deployment runs (server/app.py, client/app.py),
started by Flower 1.42's supported path: `flwr run` against a SuperLink of our own with the
simulation runtime (simulations/superlink.py), which loads them from simulations/flower_app.py.
Each simulated client gets its local settings — name, state directory, privacy policy
(client/policy.py: ε budget from `fed.client_budgets`, the rest from `[privacy]` and
`fed.client_policy`) — from <run>/simulation.json, which this process writes before the run
starts and whose path only the SuperLink's environment carries: the simulated institutions' own
configuration, never the run config or the server's messages. Every policy, and δ < 1/users at
every client, is checked here, before Flower starts: a bad value is one line and exit 2, not a
failed client per round. Client state lives in <run>/clients/<name>/ and survives restarts like
a real client's.

What a person sees: one line per round (read from rounds.jsonl as the ServerApp writes it), then
the report; Flower's own log goes to <run>/flower.log and its end is shown only if the run fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from fedrec import __version__
from fedrec.client.local import LocalSettings, load_split, simulated_clients
from fedrec.client.policy import Policy, simulated_policy
from fedrec.common.assets import Sources
from fedrec.common.config import Config, from_dict, to_dict
from fedrec.common.errors import ConfigError, DataError, FedrecError
from fedrec.common.privacy.analysis import check_delta, default_delta
from fedrec.common.rundir import (
    FlowerDir,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
)
from fedrec.simulations.superlink import LocalSuperLink

log = logging.getLogger(__name__)

SIMULATION_ENV = "FEDREC_SIMULATION"  # the spec's path, set on the SuperLink `fedrec simulate` starts
COMPONENTS = "fedrec.simulations.flower_app"  # module of the ServerApp (`server`) and ClientApp (`client`)
ENGINE = "flwr simulation runtime (SuperLink, Ray)"  # provenance; the audit reads "flwr simulation…"
POLL = 0.5  # seconds between looks at rounds.jsonl
STATUS_EVERY = 2.0  # seconds between `flwr list` calls once Flower's log stream has ended
LOG_TAIL = 40  # lines of Flower's log shown when a run fails


def client_names(cfg: Config, sources: Sources) -> list[str]:
    return sorted(client_users(cfg, sources))


def client_users(cfg: Config, sources: Sources) -> dict[str, int]:
    """Simulated client name -> its number of users (with at least one training item)."""
    dataset, split = load_split(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    clients = simulated_clients(cfg, dataset, split)
    return {name: sum(1 for seq in s.train.values() if len(seq) >= 1) for name, s in clients.items()}


def client_policies(cfg: Config, users: dict[str, int]) -> dict[str, Policy]:
    """Each simulated institution's policy, validated, with δ < 1/users checked at each client."""
    names = sorted(users)
    for setting, table in (("fed.client_budgets", cfg.fed.client_budgets), ("fed.client_policy",
                                                                             cfg.fed.client_policy)):
        unknown = sorted(set(table) - set(names) - ({"*"} if setting == "fed.client_policy" else set()))
        if unknown:
            raise ConfigError(f"{setting} names unknown client {unknown[0]!r}; the clients are "
                              f"{', '.join(names)}")
    policies = {name: simulated_policy(cfg, name) for name in names}
    for name, policy in policies.items():
        n = max(1, users[name])
        delta = policy.delta if policy.delta is not None else default_delta(n)
        try:
            check_delta(delta, n)
        except FedrecError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return policies


@dataclass(frozen=True)
class SimulationSpec:
    """What the simulated institutions and the ServerApp are started with, fixed by `fedrec
    simulate` before Flower starts (<run>/simulation.json; simulations/flower_app.py reads it)."""

    config: Config
    clients: tuple[str, ...]  # partition i of the data set is clients[i]
    output: Path  # the run directory (absolute)
    cache_dir: Path
    offline: bool
    resume: bool

    def to_json(self) -> dict[str, Any]:
        return {"config": to_dict(self.config), "clients": list(self.clients), "output": str(self.output),
                "cache_dir": str(self.cache_dir), "offline": self.offline, "resume": self.resume}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, source: str) -> SimulationSpec:
        try:
            clients = tuple(str(c) for c in doc["clients"])
            spec = cls(from_dict(Config, doc["config"]), clients, Path(doc["output"]),
                       Path(doc["cache_dir"]), bool(doc["offline"]), bool(doc["resume"]))
        except (KeyError, TypeError) as exc:
            raise DataError(f"{source}: not a simulation spec ({exc!r} missing or malformed)") from None
        if not clients:
            raise DataError(f"{source}: the simulation spec names no clients")
        return spec

    @classmethod
    def load(cls, path: Path) -> SimulationSpec:
        return cls.from_json(read_json(path), source=str(path))

    def client_settings(self, node_config: Mapping[str, Any]) -> tuple[Config, LocalSettings]:
        """The settings of the simulated institution on the node with this node config."""
        pid = node_config.get("partition-id")
        if not isinstance(pid, int) or not 0 <= pid < len(self.clients):
            raise ConfigError(f"node config partition-id={pid!r}: this simulation has {len(self.clients)} "
                              "clients (num-supernodes must equal them)")
        name = self.clients[pid]
        state = RunDir(self.output, create=False).client_state(name)
        policy = simulated_policy(self.config, name)
        return self.config, LocalSettings.of(name, state.root, policy, self.cache_dir, self.offline)


@dataclass(frozen=True)
class ServerOutcome:
    """How the ServerApp's main ended (simulations/flower_app.py writes it as it returns or raises),
    so that the driver knows at once, without waiting for Flower to tear Ray down."""

    ok: bool
    error: str = ""  # str(exception)
    project_error: bool = False  # a FedrecError: its message is the one line a user reads
    traceback: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "project_error": self.project_error,
                "traceback": self.traceback}

    @classmethod
    def load(cls, path: Path) -> ServerOutcome:
        doc = read_json(path)
        return cls(bool(doc.get("ok")), str(doc.get("error", "")), bool(doc.get("project_error")),
                   str(doc.get("traceback", "")))


def simulate(cfg: Config, out: Path, sources: Sources, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a federated simulation into run directory `out`; return final metrics."""
    run = RunDir(out, create=False)
    if run.run_record.exists() and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it "
                          "or choose another --output")
    if resume and not run.run_record.exists():
        raise ConfigError(f"--resume: {out} holds no run to resume")
    names = sorted(client_policies(cfg, client_users(cfg, sources)))
    log.info("simulating %d clients: %s", len(names), ", ".join(names))

    # --- the run directory: settings, the institutions' spec, the app Flower loads ---
    run = RunDir(out)
    run.write_config(cfg, {"clients": names, "engine": ENGINE})
    spec = SimulationSpec(cfg, tuple(names), run.root.absolute(), sources.cache_dir.absolute(),
                          sources.offline, resume)
    atomic_write_json(run.simulation, spec.to_json())
    write_app(run.flower)
    run.flower.serverapp_outcome.unlink(missing_ok=True)  # a previous run's

    # --- Flower: a SuperLink of our own, the run, one line per round ---
    backend = _backend(cfg)
    env = simulation_env(backend, run.simulation.absolute())
    done_rounds = len(read_jsonl(run.rounds))
    with LocalSuperLink(run.flower, env, verbose=log.isEnabledFor(logging.DEBUG)) as link:
        run_id = link.submit(run.flower.app, federation_config=federation_config(backend, len(names)))
        log.info("Flower run %d started on a local SuperLink (Flower's log: %s)", run_id, run.flower_log)
        outcome, status = _follow(link, run_id, run, cfg, done_rounds)
    return _result(run, outcome, status)


def write_app(flower: FlowerDir) -> None:
    """The Flower app `flwr run` submits: a pyproject.toml naming the components, nothing else
    (fedrec and its dependencies are this environment's; Flower installs nothing)."""
    app = {
        "project": {"name": "fedrec-simulation", "version": __version__, "dependencies": [],
                    "description": "fedrec simulate: the simulated institutions of one run directory",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {"publisher": "fedrec",
                                  "components": {"serverapp": f"{COMPONENTS}:server",
                                                 "clientapp": f"{COMPONENTS}:client"}}}},
    }
    atomic_write_text(flower.app_pyproject, tomli_w.dumps(app))


def _follow(link: LocalSuperLink, run_id: int, run: RunDir, cfg: Config,
            seen: int) -> tuple[ServerOutcome | None, str]:
    """Log one line per new round of rounds.jsonl until the ServerApp has ended (its outcome) or
    Flower's run has finished without one (Flower's status: the components never ran)."""
    streamer = link.stream_log(run_id, run.flower_log)  # ends when the run does
    next_status = 0.0
    try:
        while True:
            seen = _log_rounds(run, cfg, seen)
            if run.flower.serverapp_outcome.exists():
                _log_rounds(run, cfg, seen)
                return ServerOutcome.load(run.flower.serverapp_outcome), "the ServerApp ended"
            if streamer.poll() is not None and time.monotonic() >= next_status:
                status = link.status(run_id)
                if status.startswith("finished"):
                    return None, status
                next_status = time.monotonic() + STATUS_EVERY
            link.check_alive()
            time.sleep(POLL)
    finally:
        if streamer.poll() is None:
            streamer.kill()
            streamer.wait()


def _log_rounds(run: RunDir, cfg: Config, seen: int) -> int:
    records = read_jsonl(run.rounds)  # rewritten whole (atomically) after every round
    for record in records[seen:]:
        log.info("%s", progress_line(record, cfg))
    return max(seen, len(records))


def progress_line(record: Mapping[str, Any], cfg: Config) -> str:
    """One round of rounds.jsonl for a person: who trained, the released validation metric, ε, time."""
    key = f"ndcg@{cfg.eval.ks[0]}"
    values = record["valid"]["metrics"].get(key) or []
    # clients release their validation metrics under their own policy (DP-noised by default):
    # the best blend weight's value as released, not a loss the clients never send
    valid = f"valid {key} as released {max(values):.4f}" if values else "no validation this round"
    eps = record["epsilon"]
    return (f"round {record['round']}/{cfg.fed.rounds}: {record['clients_ok']} clients trained, "
            f"{len(record['clients_refused'])} refused, {len(record['clients_failed'])} failed; {valid}; "
            f"ε max {max(eps.values()) if eps else 0.0:.3f}; {record['seconds']:.1f} s")


def _result(run: RunDir, outcome: ServerOutcome | None, status: str) -> dict[str, Any]:
    """The final metrics, or the one-line reason the run stopped (after Flower's log if it crashed)."""
    if outcome is not None and outcome.project_error:  # e.g. resumed with other settings
        raise FedrecError(outcome.error)
    if outcome is not None and outcome.ok and run.failed.exists():  # no client trained in a round
        raise FedrecError(str(read_json(run.failed)["reason"]))
    final = run.final().metrics
    if outcome is not None and outcome.ok and final.exists():
        return read_json(final)
    if outcome is None:
        reason, shown = f"Flower's run ended ({status}) before the ServerApp did", _tail(run.flower_log)
    else:
        first = outcome.error.strip().splitlines()[0][:300] if outcome.error.strip() else "no message"
        reason, shown = f"the ServerApp failed ({first})", outcome.traceback or _tail(run.flower_log)
    log.error("the simulation failed:\n%s", shown)
    raise FedrecError(f"{reason}; the log above and {run.flower_log} say more (resume the run with "
                      "--resume once fixed)")


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[-lines:])  # no colour codes


def _backend(cfg: Config) -> dict[str, Any]:
    """Ray settings: a local Ray sized to this machine, or an existing cluster (fed.ray_address)."""
    resources = {"num_cpus": cfg.fed.num_cpus, "num_gpus": cfg.fed.num_gpus}
    init: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if cfg.fed.ray_address:  # the cluster's resources; every node sees the run dir at the same path
        init["address"] = cfg.fed.ray_address
    else:
        cpus = os.cpu_count() or 1
        resources["num_cpus"] = min(cfg.fed.num_cpus, cpus)
        init["num_cpus"] = cpus
    return {"client_resources": resources, "init_args": init}


def simulation_env(backend: Mapping[str, Any], spec: Path) -> dict[str, str]:
    """The environment the SuperLink passes to Flower's processes and Ray's: the spec's path, and
    for a Ray cluster (fed.ray_address) its address, which ray.init() joins. A cluster's workers
    have the cluster's environment, not ours: there the path joins the job's runtime env through
    RAY_JOB_CONFIG_JSON_ENV_VAR (what `ray job submit` sets; Ray merges it with Flower's own)."""
    env = {SIMULATION_ENV: str(spec)}
    if "address" in backend["init_args"]:
        env["RAY_ADDRESS"] = str(backend["init_args"]["address"])
        job = {"runtime_env": {"env_vars": {SIMULATION_ENV: str(spec)}}}
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(job)
    return env


def federation_config(backend: Mapping[str, Any], clients: int) -> str:
    """`_backend` as `flwr run --federation-config` (Ray's address travels as RAY_ADDRESS instead).

    Flower takes whole CPUs per client: a fractional fed.num_cpus is rounded, to at least 1."""
    resources, init = backend["client_resources"], backend["init_args"]
    items: dict[str, Any] = {
        "num-supernodes": clients,
        "client-resources-num-cpus": max(1, round(resources["num_cpus"])),
        "client-resources-num-gpus": float(resources["num_gpus"]),
        "init-args-logging-level": init["logging_level"],
        "init-args-log-to-driver": init["log_to_driver"],
    }
    if "num_cpus" in init:
        items["init-args-num-cpus"] = int(init["num_cpus"])
    return " ".join(f"{key}={_toml_value(value)}" for key, value in items.items())


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()
