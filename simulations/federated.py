"""`fedrec simulate`: N virtual clients on one machine with Flower's Simulation Engine.

The ServerApp and ClientApp are the same ones a deployment runs (server/app.py, client/app.py);
here each simulated client gets its local settings — name, state directory, privacy policy
(client/policy.py: ε budget from `fed.client_budgets`, the rest from `[privacy]` and
`fed.client_policy`) — from this process (the simulated institutions' own configuration, fixed
before the run starts), never from the server's messages. Every policy, and δ < 1/users at every
client, is checked here, before Flower starts: a bad value is one line and exit 2, not a failed
client per round. Client state lives in <run>/clients/<name>/ and survives restarts like a real
client's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedrec.client.app import make_client_app
from fedrec.client.local import LocalSettings, load_split, simulated_clients
from fedrec.client.policy import Policy, simulated_policy
from fedrec.common.assets import Sources
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError, FedrecError
from fedrec.common.privacy.analysis import check_delta, default_delta
from fedrec.common.rundir import RunDir
from fedrec.server.app import FAILED, make_server_app
from flwr.app import Context

log = logging.getLogger(__name__)


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


def simulate(cfg: Config, out: Path, sources: Sources, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a federated simulation into run directory `out`; return final metrics."""
    from flwr.simulation import run_simulation

    if (out / "run.json").exists() and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it "
                          "or choose another --output")
    if resume and not (out / "run.json").exists():
        raise ConfigError(f"--resume: {out} holds no run to resume")
    policies = client_policies(cfg, client_users(cfg, sources))
    names = sorted(policies)
    log.info("simulating %d clients: %s", len(names), ", ".join(names))
    run = RunDir(out)
    run.write_config(cfg, {"clients": names, "engine": "flwr simulation (ray)"})

    def settings(context: Context) -> tuple[Config, LocalSettings]:
        name = names[int(context.node_config["partition-id"])]  # type: ignore[call-overload]
        return cfg, LocalSettings.of(name, out / "clients" / name, policies[name], sources.cache_dir,
                                     sources.offline)

    backend = _backend(cfg)
    run_simulation(
        server_app=make_server_app(cfg, out=out, num_clients=len(names), resume=resume,
                                   cache_dir=sources.cache_dir, offline=sources.offline),
        client_app=make_client_app(settings),
        num_supernodes=len(names),
        backend_config=backend,  # type: ignore[arg-type]
    )
    failed = out / FAILED
    if failed.exists():
        raise FedrecError(json.loads(failed.read_text())["reason"])
    final_path = out / "final" / "metrics.json"
    if not final_path.exists():
        raise FedrecError(f"the simulation ended without final results in {out}; the log above says why "
                          "(resume it with --resume)")
    return json.loads(final_path.read_text())


def _backend(cfg: Config) -> dict[str, Any]:
    """Ray settings: a local Ray sized to this machine, or an existing cluster (fed.ray_address)."""
    resources = {"num_cpus": cfg.fed.num_cpus, "num_gpus": cfg.fed.num_gpus}
    init: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if cfg.fed.ray_address:  # the cluster's resources; every node sees the run dir at the same path
        init["address"] = cfg.fed.ray_address
    else:
        cpus = os.cpu_count() or 1
        resources["num_cpus"] = min(cfg.fed.num_cpus, cpus)
        init["num_cpus"] = cpus
    return {"client_resources": resources, "init_args": init}
