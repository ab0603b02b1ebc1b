"""The Flower components `fedrec simulate` runs: server/app.py's ServerApp and client/app.py's
ClientApp, bound to the simulation spec whose path the SuperLink's environment carries.

Flower loads this module by name (the generated app's pyproject.toml) in `flwr-simulation` (the
ServerApp) and in each Ray actor (the ClientApps); each process reads the spec once, so every
simulated client in a process shares one Config (client/app.py caches its jobs per Config). The
spec is the simulated institutions' own configuration: the run config plays no part in it.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from fedrec.client.app import make_client_app
from fedrec.client.local import LocalSettings
from fedrec.common.config import Config
from fedrec.common.errors import ConfigError, FedrecError
from fedrec.common.rundir import RunDir, atomic_write_json
from fedrec.server.app import make_server_app
from fedrec.simulations.federated import SIMULATION_ENV, ServerOutcome, SimulationSpec
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


def _spec() -> SimulationSpec:
    path = os.environ.get(SIMULATION_ENV)
    if not path:
        raise ConfigError(f"{__name__} is started by `fedrec simulate` ({SIMULATION_ENV} is not set); "
                          "for `flwr run .` the components are fedrec.server.app:app and "
                          "fedrec.client.app:app")
    return SimulationSpec.load(Path(path))


def _quiet_logging() -> None:
    """Flower's records once (opacus' logging.basicConfig would print each again through the root
    logger), and fedrec's own lines, INFO and up, in Flower's log of the run."""
    logging.getLogger("flwr").propagate = False
    fedrec = logging.getLogger("fedrec")
    if not fedrec.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fedrec.addHandler(handler)
        fedrec.setLevel(logging.INFO)
        fedrec.propagate = False


def _settings(context: Context) -> tuple[Config, LocalSettings]:
    return SPEC.client_settings(context.node_config)


_quiet_logging()
SPEC = _spec()
FEDREC_SERVER = make_server_app(SPEC.config, out=SPEC.output, num_clients=len(SPEC.clients),
                                resume=SPEC.resume, cache_dir=SPEC.cache_dir, offline=SPEC.offline)

# plain assignments: Flower looks for `server` and `client` in this file's syntax tree
server = ServerApp()
client = make_client_app(_settings)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """fedrec's ServerApp, then how it ended, for the driver (which then stops the run at once)."""
    outcome_path = RunDir(SPEC.output, create=False).flower.serverapp_outcome
    try:
        FEDREC_SERVER(grid, context)
    except BaseException as exc:
        atomic_write_json(outcome_path, ServerOutcome(
            ok=False, error=str(exc), project_error=isinstance(exc, FedrecError),
            traceback=traceback.format_exc()).to_json())
        raise
    atomic_write_json(outcome_path, ServerOutcome(ok=True).to_json())
