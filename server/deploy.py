"""`fedrec deploy init`: certificates, SuperNode keys, commands and READMEs for a real federation.

One coordinator runs Flower's SuperLink (and submits the run with `flwr run`); each partner
institution runs one SuperNode on its own machine, next to its own data. What is generated:

    DIR/deployment.json              what was generated (no secrets)
    DIR/ca/ca.key                    the CA's private key: signs the SuperLink certificate; keep offline
    DIR/coordinator/                 ca.pem, superlink.pem/.key, supernodes/<name>.pub,
                                     ledger-keys/<name>.pub, superlink.sh, register-supernodes.sh,
                                     run.sh, flwr-home/, README.md
    DIR/institutions/<name>/         ca.pem, supernode.pub, settings.toml, supernode.sh, README.md

Keys: every institution makes its own keys first, on its own machine (`fedrec deploy keygen
STATE_DIR --name NAME`: the SuperNode key and the ledger-signing key), and sends only the `.pub`
files; `deploy init --institution-keys DIR` reads DIR/<name>/supernode.pub and ledger.pub. No
institution's private key is ever written on the coordinator's disk. (`--insecure`, development on
one machine, needs no keys.)

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
import math
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedrec.common import chain
from fedrec.common.errors import ConfigError
from fedrec.common.rundir import package_versions

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
        _write_private(root / "ca" / "ca.key", _key_pem(ca_key))
        cert_key, cert = make_server_cert(ca_key, ca_cert, host)
        _write(coord / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(coord / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write_private(coord / "superlink.key", _key_pem(cert_key))
    for i, name in enumerate(institutions):
        site = root / "institutions" / name
        site.mkdir(parents=True)
        if name in keys and keys[name][0]:
            _write(site / "supernode.pub", keys[name][0])
            _write(coord / "supernodes" / f"{name}.pub", keys[name][0])
        if name in keys and keys[name][1]:
            _write(coord / "ledger-keys" / f"{name}.pub", keys[name][1])  # fedrec audit --trust
        if not insecure:
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


def read_institution_keys(
    keys_dir: Path | None, institutions: tuple[str, ...], insecure: bool,
) -> dict[str, tuple[bytes, bytes]]:
    """name -> (supernode.pub, ledger.pub) as each institution sent them, validated."""
    if keys_dir is None:
        if insecure:
            return {}
        raise ConfigError("--institution-keys DIR is required: each institution runs `fedrec deploy keygen "
                          "STATE_DIR --name NAME` and sends its supernode.pub and ledger.pub (put them in "
                          "DIR/NAME/); the coordinator never makes or holds an institution's private key")
    out: dict[str, tuple[bytes, bytes]] = {}
    for name in institutions:
        folder = Path(keys_dir) / name
        if (folder / "supernode.key").exists() or (folder / "ledger.key").exists():
            raise ConfigError(f"{folder} holds a private key; an institution sends only its .pub files — "
                              "delete the private key from this machine and ask for new keys")
        node = folder / "supernode.pub"
        if not node.is_file() and not insecure:
            raise ConfigError(f"{node} is missing: {name} sends it after `fedrec deploy keygen`")
        node_pub = node.read_bytes() if node.is_file() else b""
        if node_pub:
            try:
                key = serialization.load_ssh_public_key(node_pub)
            except ValueError:
                raise ConfigError(f"{node} is not an OpenSSH public key (fedrec deploy keygen writes one)") \
                    from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ConfigError(f"{node} is not an EC public key, which flower-supernode needs")
        ledger = folder / chain.PUB_FILE
        ledger_pub = b""
        if ledger.is_file():
            chain.load_public(ledger)  # validates
            ledger_pub = ledger.read_bytes()
        elif not insecure:
            raise ConfigError(f"{ledger} is missing: {name} sends it after `fedrec deploy keygen`")
        out[name] = (node_pub, ledger_pub)
    return out


def institution_keygen(out_dir: Path, *, name: str | None = None, supernode: bool = True) -> list[Path]:
    """An institution's own keys, made on its own machine: the ledger-signing key (ledger.key/.pub,
    Ed25519) and, with `supernode`, the SuperNode key (supernode.key/.pub, EC P-384, OpenSSH).
    Run it with the state directory as `out_dir` so the client signs with this very key."""
    if name is not None and not NAME.match(name):
        raise ConfigError(f"--name {name!r} is not a valid name; use letters, digits, '-' and '_'")
    out_dir = Path(out_dir)
    node_key = out_dir / "supernode.key"
    if supernode and node_key.exists():
        raise ConfigError(f"{node_key} already exists; the SuperLink has its public half registered — "
                          "keep it, or move it away deliberately")
    written = list(chain.generate_key(out_dir))
    if supernode:
        private, public = make_node_keys(name or "institution")
        _write_private(node_key, private)
        _write(out_dir / "supernode.pub", public)
        written += [node_key, out_dir / "supernode.pub"]
    return written


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
# The only fedrec version this SuperNode runs: the ClientApp refuses a run whose code reports
# another version (a SuperNode runs whatever code the coordinator submits; see README.md).
fedrec-version = "{dep.fedrec_version}"
"""


def superlink_script(dep: Deployment) -> str:
    tls = ("--insecure" if dep.insecure else
           '--ssl-ca-certfile "$HERE/ca.pem" --ssl-certfile "$HERE/superlink.pem" '
           '--ssl-keyfile "$HERE/superlink.key" --enable-supernode-auth')
    bind = "127.0.0.1" if dep.insecure else dep.control_host
    return f"""#!/usr/bin/env bash
# The coordinator's SuperLink: one HTTPS port ({dep.port}) for the SuperNodes (Fleet API, /v1/fleet/),
# the flwr CLI (Control API, /v1/control/: submits runs, registers keys, no account authentication
# in Flower 1.42) and the ServerApp. It binds {bind} by default so the Control API is not exposed:
# publish only /v1/fleet/ through a TLS reverse proxy (README.md), or set SUPERLINK_BIND
# deliberately. Registered SuperNode keys and runs persist in state/superlink.db.{_banner(dep)}
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
mkdir -p "$HERE/state"
exec flower-superlink {tls} \\
    --host "${{SUPERLINK_BIND:-{bind}}}" --port {dep.port} \\
    --database "$HERE/state/superlink.db" --disable-runtime-dependency-installation "$@"
"""


def supernode_script(dep: Deployment, index: int) -> str:
    name = dep.institutions[index]
    key = f"{site_paths(dep, name)['state-dir']}/supernode.key"
    auth = ("--insecure" if dep.insecure else
            '--root-certificates "$HERE/ca.pem" --auth-supernode-private-key "$SUPERNODE_KEY"')
    return f"""#!/usr/bin/env bash
# This institution's SuperNode: connects out to the SuperLink at {dep.address}; runs the fedrec
# ClientApp next to the data named in settings.toml. SUPERNODE_PORT: its local Runtime API port
# (only 127.0.0.1; change it when several SuperNodes share one machine). SUPERNODE_KEY: the
# private key `fedrec deploy keygen` made here (default: in the state directory).{_banner(dep)}
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
SUPERNODE_KEY="${{SUPERNODE_KEY:-{key}}}"
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
    state = paths["state-dir"]
    keys = ("" if dep.insecure else
            f"- `{state}/supernode.key`, `{state}/ledger.key` — the private keys you made with "
            f"`fedrec deploy keygen {state} --name {name}` (never leave this machine; mode 0600). The "
            "coordinator never had them.\n"
            "- `supernode.pub` — your SuperNode's public key, as you sent it; the coordinator registers it.\n"
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
reported as `over-budget`. Each update is clipped and noised here before it leaves, by the fedrec
code this SuperNode runs.

**A SuperNode runs the code it is sent.** `flwr run` ships the coordinator's app (Python code)
to every SuperNode, which executes it here with access to your data and state directory. The
privacy guarantee therefore holds only for code you trust. `settings.toml` pins
`fedrec-version = "{dep.fedrec_version}"`: the ClientApp refuses to run when the code it was sent
reports another version, so an honest coordinator cannot silently ship an upgrade you did not
agree to. The pin does not protect against a coordinator that ships modified code claiming the
same version — only reviewing and installing the code yourself does (run the SuperNode from a
fedrec you installed, with `--isolation process` and no runtime dependency installation).

**Ledger signatures.** Every release's ledger line is signed with `{state}/ledger.key`. Give
`ledger.pub` to your privacy officer directly (not through the coordinator): `fedrec audit
--trust {name}=ledger.pub` then detects a ledger rewritten by anyone without your key.

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
certificate and private key), `supernodes/*.pub` (the institutions' SuperNode public keys, as they
sent them: no institution's private key is on this machine), `ledger-keys/*.pub` (their
ledger-signing public keys, for `fedrec audit --trust`), `flwr-home/config.toml`
(the `flwr` CLI's connection `{CONNECTION}`). The CA's private key is in `../ca/ca.key`: it is
needed only to issue a new SuperLink certificate — keep it offline.

**Ports and firewall.** In Flower 1.42 one port ({dep.port}) serves the Fleet API (SuperNodes,
`/v1/fleet/`), the Control API (`flwr run`, `flwr supernode register`, `/v1/control/`) and the
Runtime API (ServerApp). Flower's open-source SuperLink has no account authentication on the
Control API: whoever reaches it can submit runs — code every SuperNode executes — and register
SuperNode keys. `superlink.sh` therefore binds `{dep.control_host}` by default. Publish only the
Fleet API: a TLS reverse proxy on the public interface (using `superlink.pem`/`superlink.key`)
that forwards `/v1/fleet/` to 127.0.0.1:{dep.port} and refuses every other path, reachable from
the institutions' addresses only; keep `flwr` commands on this host. `SUPERLINK_BIND=0.0.0.0`
(or `deploy init --control-host`) exposes everything and is your decision to make.

**What the coordinator sees.** Each institution's adapter update after its local DP noise (with
`fed.secagg = true`: only their weighted sum), the noisy item counts, and scalar metrics including
each institution's ε, σ, user count and evaluation metrics. Never raw data.
"""
