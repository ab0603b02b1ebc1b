"""`fedrec deploy init`: certificates, SuperNode keys, commands and READMEs for a real federation.

One coordinator runs Flower's SuperLink (and submits the run with `flwr run`); each partner
institution runs one SuperNode on its own machine, next to its own data. What is generated:

    DIR/deployment.json              what was generated (no secrets)
    DIR/ca/ca.key                    the CA's private key: signs the SuperLink certificate; keep offline
    DIR/coordinator/                 ca.pem, superlink.pem/.key, supernodes/<name>.pub,
                                     superlink.sh, register-supernodes.sh, run.sh, flwr-home/, README.md
    DIR/institutions/<name>/         ca.pem, supernode.key/.pub, settings.toml, supernode.sh, README.md

TLS: the SuperLink presents a certificate signed by the CA, valid for HOST and for
127.0.0.1/localhost (the ServerApp process and the SuperExec reach it locally). Each SuperNode
checks it against ca.pem. Node authentication: each SuperNode signs its requests with its own EC
P-384 key (OpenSSH format, as `flower-supernode --auth-supernode-private-key` reads it); the
SuperLink (`--enable-supernode-auth`) accepts only keys registered with `flwr supernode register`.
The insecure mode (no TLS, no node authentication) exists for development on one machine only.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedrec.common.errors import ConfigError

log = logging.getLogger(__name__)

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


def init_deployment(
    root: Path, *, institutions: tuple[str, ...], superlink: str, insecure: bool = False,
    app_dir: Path | None = None, site_root: str = "/var/lib/fedrec", epsilon_budget: float = 8.0,
) -> Deployment:
    """Generate everything each party needs under `root` (which must not exist or be empty)."""
    host, port = parse_superlink(superlink)
    institutions = check_institutions(institutions)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; deploy init never overwrites keys — choose a new "
                          "directory")
    if epsilon_budget <= 0:
        raise ConfigError(f"--epsilon-budget={epsilon_budget} must be > 0")
    app = (app_dir or default_app_dir()).resolve()
    dep = Deployment(str(root.resolve()), host, port, institutions, insecure, str(app), site_root,
                     epsilon_budget)
    coord = root / "coordinator"
    (coord / "supernodes").mkdir(parents=True)
    if not insecure:
        ca_key, ca_cert = make_ca()
        _write_private(root / "ca" / "ca.key", _key_pem(ca_key))
        cert_key, cert = make_server_cert(ca_key, ca_cert, host)
        _write(coord / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(coord / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write_private(coord / "superlink.key", _key_pem(cert_key))
    for i, name in enumerate(institutions):
        site = root / "institutions" / name
        site.mkdir(parents=True)
        if not insecure:
            private, public = make_node_keys(name)
            _write_private(site / "supernode.key", private)
            _write(site / "supernode.pub", public)
            _write(coord / "supernodes" / f"{name}.pub", public)
            _write(site / "ca.pem", (coord / "ca.pem").read_bytes())
        _write(site / "settings.toml", settings_toml(dep, name).encode())
        _script(site / "supernode.sh", supernode_script(dep, i))
        _write(site / "README.md", institution_readme(dep, name).encode())
    _script(coord / "superlink.sh", superlink_script(dep))
    _script(coord / "register-supernodes.sh", register_script(dep))
    _script(coord / "run.sh", run_script(dep))
    _write(coord / "flwr-home" / "config.toml", flwr_config(dep).encode())
    _write(coord / "README.md", coordinator_readme(dep).encode())
    _write(root / "deployment.json", (json.dumps(asdict(dep), indent=1) + "\n").encode())
    if insecure:
        log.warning(INSECURE_BANNER)
    return dep


def default_app_dir() -> Path:
    """The fedrec source tree (its pyproject.toml is the Flower app `flwr run` packages)."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


# --- keys and certificates -------------------------------------------------------------------


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's certificate: SAN for `host` and for local access (127.0.0.1, ::1, localhost)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(san_entries(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def san_entries(host: str) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        ip = x509.IPAddress(ipaddress.ip_address(host))
        if ip not in entries:
            entries.append(ip)
    except ValueError:
        if host != "localhost":
            entries.append(x509.DNSName(host))
    return entries


def make_node_keys(name: str) -> tuple[bytes, bytes]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (private, public with a comment)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" fedrec-{name}\n".encode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # private keys: readable by their owner only
    path.write_bytes(data)


def _script(path: Path, text: str) -> None:
    _write(path, text.encode())
    path.chmod(0o755)


# --- settings and commands -------------------------------------------------------------------


def site_paths(dep: Deployment, name: str) -> dict[str, str]:
    root = dep.site_root.replace("{name}", name).rstrip("/")
    return {"data": f"{root}/data", "state-dir": f"{root}/state", "cache-dir": f"{root}/cache"}


def settings_toml(dep: Deployment, name: str) -> str:
    """The institution's node config: read by its SuperNode only, never sent to the coordinator."""
    paths = site_paths(dep, name)
    return f"""# {name}: this SuperNode's own settings (flower-supernode --node-config settings.toml).
# They stay on this machine; the coordinator's run config cannot override any of them.
client-name = "{name}"
# Your users' total privacy budget (user-level ε across every round and restart). The client
# refuses any round that would exceed it; only you can change it, here.
epsilon-budget = {dep.epsilon_budget}
# Durable accountant, ledger and released replies (back it up; losing it loses the record of spent ε).
state-dir = "{paths['state-dir']}"
# Your data set: a directory in one of fedrec's formats (README "Data formats").
data = "{paths['data']}"
# Asset cache (the base model); fill it once with `fedrec fetch` or FEDREC_CACHE.
cache-dir = "{paths['cache-dir']}"
# delta = 1e-6   # optional; default min(1e-5, 1/(10·users))
"""


def superlink_script(dep: Deployment) -> str:
    tls = ("--insecure" if dep.insecure else
           '--ssl-ca-certfile "$HERE/ca.pem" --ssl-certfile "$HERE/superlink.pem" '
           '--ssl-keyfile "$HERE/superlink.key" --enable-supernode-auth')
    bind = "127.0.0.1" if dep.insecure else "0.0.0.0"
    return f"""#!/usr/bin/env bash
# The coordinator's SuperLink: one HTTPS port ({dep.port}) for the SuperNodes (Fleet API), the
# flwr CLI (Control API) and the ServerApp (Runtime API). Registered SuperNode keys and runs
# persist in state/superlink.db across restarts.{_banner(dep)}
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
mkdir -p "$HERE/state"
exec flower-superlink {tls} \\
    --host "${{SUPERLINK_BIND:-{bind}}}" --port {dep.port} \\
    --database "$HERE/state/superlink.db" --disable-runtime-dependency-installation "$@"
"""


def supernode_script(dep: Deployment, index: int) -> str:
    auth = ("--insecure" if dep.insecure else
            '--root-certificates "$HERE/ca.pem" --auth-supernode-private-key "$HERE/supernode.key"')
    return f"""#!/usr/bin/env bash
# This institution's SuperNode: connects out to the SuperLink at {dep.address}; runs the fedrec
# ClientApp next to the data named in settings.toml. SUPERNODE_PORT: its local Runtime API port
# (only 127.0.0.1; change it when several SuperNodes share one machine).{_banner(dep)}
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec flower-supernode {auth} \\
    --superlink "${{SUPERLINK_ADDRESS:-{dep.address}}}" \\
    --node-config "$HERE/settings.toml" \\
    --host 127.0.0.1 --port "${{SUPERNODE_PORT:-{SUPERNODE_RUNTIME_PORT}}}" "$@"
"""


def register_script(dep: Deployment) -> str:
    if dep.insecure:
        body = 'echo "insecure mode: SuperNodes are not authenticated; nothing to register" >&2\n'
    else:
        body = "".join(
            f'flwr supernode register "$HERE/supernodes/{n}.pub" {CONNECTION} --name {shlex.quote(n)}\n'
            for n in dep.institutions)
    return f"""#!/usr/bin/env bash
# Registers every institution's SuperNode public key with the running SuperLink (once; the
# SuperLink keeps them in state/superlink.db). A SuperNode whose key is not registered is refused.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export FLWR_HOME="$HERE/flwr-home"
{body}"""


def run_script(dep: Deployment) -> str:
    n = len(dep.institutions)
    return f"""#!/usr/bin/env bash
# Submits the fedrec run to the SuperLink. RUN_DIR: the coordinator's run directory (absolute).
# More settings: ONE more --run-config "fed.rounds=5 fed.secagg=true ..." (Flower 1.42 merges
# repeated --run-config strings shallowly: a second "fed.x=..." string drops the first's fed.* keys).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export FLWR_HOME="$HERE/flwr-home"
RUN_DIR="${{RUN_DIR:-$HERE/runs/federated}}"
exec flwr run "${{FEDREC_APP_DIR:-{dep.app_dir}}}" {CONNECTION} \\
    --run-config "output='$RUN_DIR' num-clients={n}" "$@"
"""


def flwr_config(dep: Deployment) -> str:
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{dep.address}"']
    if dep.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(dep.root) / "coordinator" / "ca.pem"}"')
    return "\n".join(lines) + "\n"


def _banner(dep: Deployment) -> str:
    return f"\n# !!! {INSECURE_BANNER}" if dep.insecure else ""


# --- READMEs ---------------------------------------------------------------------------------


def institution_readme(dep: Deployment, name: str) -> str:
    paths = site_paths(dep, name)
    warn = f"\n> **{INSECURE_BANNER}**\n" if dep.insecure else ""
    keys = ("" if dep.insecure else
            "- `supernode.key` — this SuperNode's private key (never leaves this machine; `chmod 600`).\n"
            "- `supernode.pub` — its public key; the coordinator has registered a copy.\n"
            "- `ca.pem` — the federation's CA certificate; the SuperLink's certificate must chain to it.\n")
    return f"""# {name}: fedrec SuperNode
{warn}
**What runs here.** One process, `./supernode.sh` (Flower's `flower-supernode`), which connects
*out* to the coordinator's SuperLink at `{dep.address}` and, for each message, starts the fedrec
ClientApp locally. The ClientApp reads your data from `{paths['data']}`, trains only the LoRA
adapter under user-level DP-SGD, and keeps its privacy accountant and ledger in
`{paths['state-dir']}`.

**Files.**
- `settings.toml` — your node config: name, **ε budget**, state directory, data path. Only you set these.
{keys}
**Ports.** Outbound only: TCP {dep.port} to `{dep.superlink_host}`
({'plain HTTP' if dep.insecure else 'HTTPS'}).
No inbound port is needed; the SuperNode's Runtime API listens on 127.0.0.1:{SUPERNODE_RUNTIME_PORT}
(this machine only; `SUPERNODE_PORT=...` changes it).

**What leaves this site.** Per round: the LoRA adapter tensors after DP training (or, with
`fed.secagg = true`, only masked vectors that the coordinator can sum but not read one by one),
once the DP-noised item counts of the popularity prior, and scalar metrics (loss, ε spent, σ, q,
steps, δ, user count, evaluation hit rates). Never raw interactions, user ids or item ids.

**Privacy.** Your ε budget is enforced here: a round that would exceed it is refused and
reported as `over-budget`. Your guarantee is the local one: each update is clipped and noised
here before it leaves, whatever the coordinator does.

**Start / stop / restart.** `./supernode.sh` (Ctrl-C stops it). After a crash, start it again:
it rejoins the running federation with the same key, and the ledger in the state directory
guarantees no ε is counted twice or forgotten.
"""


def coordinator_readme(dep: Deployment) -> str:
    warn = f"\n> **{INSECURE_BANNER}**\n" if dep.insecure else ""
    names = ", ".join(dep.institutions)
    return f"""# fedrec coordinator (SuperLink)
{warn}
**What runs here.** `./superlink.sh` (Flower's `flower-superlink`) on `{dep.address}`; the
fedrec ServerApp runs as its subprocess when a run is submitted. Institutions: {names}.

**Steps.**
1. `./superlink.sh` — start the SuperLink (keeps registrations and runs in `state/superlink.db`).
2. `./register-supernodes.sh` — register each institution's SuperNode public key (once).
3. Each institution starts its `supernode.sh`.
4. `RUN_DIR=/abs/path ./run.sh [--run-config "fed.rounds=5 fed.min_clients=2 fed.secagg=true"]`
   — submit the run; the run directory is written here, on the coordinator.

**Files.** `ca.pem` (CA certificate, public), `superlink.pem`/`superlink.key` (the SuperLink's
certificate and private key), `supernodes/*.pub` (registered keys), `flwr-home/config.toml`
(the `flwr` CLI's connection `{CONNECTION}`). The CA's private key is in `../ca/ca.key`: it is
needed only to issue a new SuperLink certificate — keep it offline.

**Ports and firewall.** Inbound TCP {dep.port} from the institutions' addresses only. In Flower
1.42 this one port serves the Fleet API (SuperNodes), the Control API (`flwr run`,
`flwr supernode register`) and the Runtime API (ServerApp). Flower's open-source SuperLink has no
account authentication on the Control API: whoever reaches the port can submit runs and register
SuperNode keys. Restrict the port by source address to the partners, or put a reverse proxy in
front that forwards only `/v1/fleet/` from outside and keep `flwr` commands on this host.

**What the coordinator sees.** Each institution's adapter update after its local DP noise (with
`fed.secagg = true`: only their weighted sum), the noisy item counts, and scalar metrics including
each institution's ε, σ, user count and evaluation metrics. Never raw data.
"""
