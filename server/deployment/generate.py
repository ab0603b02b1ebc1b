"""`fedrec deploy init`: write everything each party needs under a new directory."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from fedrec.common.errors import ConfigError
from fedrec.common.rundir import FLOWER_CONFIG, atomic_write_bytes, atomic_write_text, package_versions
from fedrec.server.deployment import scripts
from fedrec.server.deployment.keys import (
    key_pem,
    make_ca,
    make_server_cert,
    read_institution_keys,
)
from fedrec.server.deployment.plan import INSECURE_BANNER, Deployment, check_institutions, parse_superlink

log = logging.getLogger(__name__)


def init_deployment(
    root: Path, *, institutions: tuple[str, ...], superlink: str, insecure: bool = False,
    app_dir: Path | None = None, site_root: str = "/var/lib/fedrec", epsilon_budget: float = 8.0,
    institution_keys: Path | None = None, control_host: str = "127.0.0.1",
) -> Deployment:
    """Generate everything each party needs under `root` (which must not exist or be empty).

    `institution_keys`: DIR/<name>/supernode.pub and ledger.pub of each institution (required
    unless `insecure`); only public keys are read, copied and registered.
    """
    host, port = parse_superlink(superlink)
    institutions = check_institutions(institutions)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; deploy init never overwrites keys — choose a new "
                          "directory")
    if not math.isfinite(epsilon_budget) or epsilon_budget <= 0:
        raise ConfigError(f"--epsilon-budget={epsilon_budget} must be a finite number > 0")
    keys = read_institution_keys(institution_keys, institutions, insecure)
    app = (app_dir or default_app_dir()).resolve()
    dep = Deployment(str(root.resolve()), host, port, institutions, insecure, str(app), site_root,
                     epsilon_budget, control_host, package_versions(("fedrec",))["fedrec"])
    coord = root / "coordinator"
    (coord / "supernodes").mkdir(parents=True)
    if not insecure:
        ca_key, ca_cert = make_ca()
        atomic_write_bytes(root / "ca" / "ca.key", key_pem(ca_key), mode=0o600)
        cert_key, cert = make_server_cert(ca_key, ca_cert, host)
        atomic_write_bytes(coord / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(coord / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(coord / "superlink.key", key_pem(cert_key), mode=0o600)
    for i, name in enumerate(institutions):
        site = root / "institutions" / name
        site.mkdir(parents=True)
        if name in keys and keys[name][0]:
            atomic_write_bytes(site / "supernode.pub", keys[name][0])
            atomic_write_bytes(coord / "supernodes" / f"{name}.pub", keys[name][0])
        if name in keys and keys[name][1]:
            atomic_write_bytes(coord / "ledger-keys" / f"{name}.pub", keys[name][1])  # fedrec audit --trust
        if not insecure:
            atomic_write_bytes(site / "ca.pem", (coord / "ca.pem").read_bytes())
        atomic_write_text(site / "settings.toml", scripts.settings_toml(dep, name))
        atomic_write_text(site / "supernode.sh", scripts.supernode_script(dep, i), mode=0o755)
        atomic_write_text(site / "README.md", scripts.institution_readme(dep, name))
    atomic_write_text(coord / "superlink.sh", scripts.superlink_script(dep), mode=0o755)
    atomic_write_text(coord / "register-supernodes.sh", scripts.register_script(dep), mode=0o755)
    atomic_write_text(coord / "run.sh", scripts.run_script(dep), mode=0o755)
    atomic_write_text(coord / "flwr-home" / FLOWER_CONFIG, scripts.flwr_config(dep))
    atomic_write_text(coord / "README.md", scripts.coordinator_readme(dep))
    atomic_write_text(root / "deployment.json", (json.dumps(asdict(dep), indent=1) + "\n"))
    if insecure:
        log.warning(INSECURE_BANNER)
    return dep


def default_app_dir() -> Path:
    """The fedrec source tree (its pyproject.toml is the Flower app `flwr run` packages)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()
