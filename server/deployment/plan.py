"""What a deployment is: the coordinator's address, the institutions, the mode; parsed and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedrec.common.errors import ConfigError

DEFAULT_PORT = 9092  # the SuperLink's one HTTPS port (Fleet, Control and Runtime APIs in Flower 1.42)
SUPERNODE_RUNTIME_PORT = 9094  # each SuperNode's local Runtime API (127.0.0.1 only)
CONNECTION = "fedrec"  # the SuperLink connection name in the coordinator's Flower config
CA_DAYS, CERT_DAYS = 5 * 365, 2 * 365
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
INSECURE_BANNER = (
    "INSECURE DEVELOPMENT MODE: no TLS and no SuperNode authentication. Every byte (adapters, "
    "metrics) travels in clear text and any process that reaches the port can join. Use it on "
    "one machine only, never across institutions."
)


@dataclass(frozen=True)
class Deployment:
    """What `deploy init` generated (written to DIR/deployment.json)."""

    root: str
    superlink_host: str
    port: int
    institutions: tuple[str, ...]
    insecure: bool
    app_dir: str
    site_root: str
    epsilon_budget: float
    control_host: str = "127.0.0.1"  # the interface superlink.sh binds (Fleet + Control API share it)
    fedrec_version: str = ""  # pinned in each institution's settings.toml (client/app.py refuses others)

    @property
    def address(self) -> str:
        host = f"[{self.superlink_host}]" if ":" in self.superlink_host else self.superlink_host
        return f"{host}:{self.port}"


def parse_superlink(text: str) -> tuple[str, int]:
    """HOST or HOST:PORT (IPv6 in brackets) -> (host, port)."""
    text = text.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if not text or match is None:
        raise ConfigError(f"--superlink {text!r} must be HOST or HOST:PORT, e.g. fl.example.org:9092")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(f"--superlink {text!r}: port {port} is not in 1..65535")
    return host, port


def parse_institutions(text: str) -> tuple[str, ...]:
    return check_institutions(tuple(n.strip() for n in text.split(",") if n.strip()))


def check_institutions(names: tuple[str, ...]) -> tuple[str, ...]:
    if not names:
        raise ConfigError("--institutions needs at least one name, e.g. --institutions hospital-a,clinic-b")
    for name in names:
        if not NAME.match(name):
            raise ConfigError(f"--institutions: {name!r} is not a valid name; use letters, digits, '-' "
                              "and '_' (at most 63), starting with a letter or digit")
    if len(set(names)) != len(names):
        raise ConfigError(f"--institutions {','.join(names)!r} names an institution twice")
    return names
