"""The files each party runs or reads: settings.toml, superlink.sh, supernode.sh, run.sh, READMEs."""

from __future__ import annotations

import shlex
from pathlib import Path

from fedrec.server.deployment.plan import CONNECTION, INSECURE_BANNER, SUPERNODE_RUNTIME_PORT, Deployment


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
