"""A whole federation on one machine's loopback, as separate processes: for tests and benchmarks.

Everything is started from the scripts `fedrec deploy init` generates (what a coordinator and an
institution run), TLS and node authentication on, each process in its own session; `close()`
kills every process tree it started (SuperExec, ServerApp and ClientApp processes included).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedrec.server.deployment.generate import init_deployment
from fedrec.server.deployment.keys import institution_keygen
from fedrec.server.deployment.plan import Deployment
from fedrec.simulations.superlink import free_port, kill_tree  # the one copy of the process helpers

# The tiny model and data of the other end-to-end tests, as `flwr run --run-config` overrides.
TINY_RUN = (
    "model.name='tiny-random' data.max_users=0 lora.rank=2 train.batch_size=8 "
    "model.max_item_tokens=40 fed.local_epochs=0.5 prior.head_size=20 "
    "eval.batch_size=256 privacy.noise_multiplier=1.0"
)


class Federation:
    """One coordinator and its institutions, all on 127.0.0.1, with TLS and node authentication."""

    def __init__(self, root: Path, names: Sequence[str], write_data: Callable[[Path, int], Any],
                 *, epsilon_budget: float = 50.0, users: Sequence[int] | None = None) -> None:
        self.root = root
        self.port = free_port()
        for name in names:  # each institution makes its own keys in its state dir, sends the .pub files
            institution_keygen(self.site(name) / "state", name=name)
            for pub in ("supernode.pub", "ledger.pub"):
                (root / "keys" / name).mkdir(parents=True, exist_ok=True)
                (root / "keys" / name / pub).write_bytes((self.site(name) / "state" / pub).read_bytes())
        self.dep: Deployment = init_deployment(
            root / "deploy", institutions=tuple(names), superlink=f"127.0.0.1:{self.port}",
            site_root=str(root / "sites" / "{name}"), epsilon_budget=epsilon_budget,
            institution_keys=root / "keys")
        for i, name in enumerate(names):  # by default institutions of different sizes
            write_data(self.site(name) / "data", users[i] if users else 8 + 2 * i)
        # flower-superlink, flower-supernode and flwr beside this interpreter (a venv not on PATH)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "FEDREC_OFFLINE": "1", "FEDREC_CACHE": str(root / "cache"),
                    "FLWR_HOME": str(root / "flwr-home"), "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ports = {name: free_port() for name in names}

    # -- paths --

    @property
    def coordinator(self) -> Path:
        return self.root / "deploy" / "coordinator"

    def institution(self, name: str) -> Path:
        return self.root / "deploy" / "institutions" / name

    def site(self, name: str) -> Path:
        return self.root / "sites" / name

    # -- processes --

    def _start(self, key: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        log = (self.root / f"{key}.log").open("ab")
        self.procs[key] = subprocess.Popen(list(args), env={**self.env, **(env or {})}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def start_superlink(self) -> None:
        self._start("superlink", ["bash", str(self.coordinator / "superlink.sh")],
                    {"SUPERLINK_BIND": "127.0.0.1"})
        deadline = time.monotonic() + 60
        while not self.tls_handshake(self.coordinator / "ca.pem"):
            assert self.procs["superlink"].poll() is None, self.log("superlink")
            assert time.monotonic() < deadline, "the SuperLink did not come up in 60 s"
            time.sleep(0.3)

    def register(self) -> None:
        subprocess.run(["bash", str(self.coordinator / "register-supernodes.sh")], env=self.env,
                       check=True, capture_output=True, timeout=120)

    def start_supernode(self, name: str, *extra: str, key: str | None = None) -> subprocess.Popen[bytes]:
        """Start `name`'s supernode.sh (extra flags appended); `key` names the process (default: name)."""
        key = key or name
        port = self.node_ports.setdefault(key, free_port())
        self._start(key, ["bash", str(self.institution(name) / "supernode.sh"), *extra],
                    {"SUPERNODE_PORT": str(port)})
        return self.procs[key]

    def submit(self, run_dir: Path, *run_config: str, base: str = TINY_RUN) -> None:
        """`run.sh` with `base` and then `run_config` ("k=v k=v", later wins) as ONE --run-config:
        Flower 1.42 merges repeated --run-config strings shallowly (a second "fed.x=..." drops
        every fed.* key of the first)."""
        merged: dict[str, str] = {}
        for item in (base, *run_config):
            for pair in item.split():
                key, _, value = pair.partition("=")
                merged[key] = value
        config = " ".join(f"{k}={v}" for k, v in merged.items())
        args = ["bash", str(self.coordinator / "run.sh"), "--run-config", config]
        done = subprocess.run(args, env={**self.env, "RUN_DIR": str(run_dir)}, capture_output=True,
                              timeout=180)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()

    def kill(self, key: str) -> None:
        """SIGKILL a process and every descendant (SuperExec, ServerApp/ClientApp processes)."""
        proc = self.procs.pop(key, None)
        if proc is None:
            return
        kill_tree(proc.pid)
        proc.wait(timeout=30)

    def close(self) -> None:
        for key in list(self.procs):
            self.kill(key)

    # -- observation --

    def wait_for(self, path: Path, timeout: float, alive: Sequence[str] = ("superlink",)) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            for key in alive:
                assert self.procs[key].poll() is None, f"{key} exited:\n{self.log(key)}"
            assert time.monotonic() < deadline, f"{path} did not appear in {timeout:.0f} s\n" \
                + self.log("superlink")
            time.sleep(0.5)

    def tls_handshake(self, cafile: Path | None) -> bool:
        """True if a TLS handshake with the SuperLink verifies against `cafile` (None: system CAs)."""
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock, \
                    context.wrap_socket(sock, server_hostname="127.0.0.1"):
                return True
        except ssl.SSLCertVerificationError:
            raise
        except OSError:
            return False

    def log(self, key: str) -> str:
        path = self.root / f"{key}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def own_ledger(self, name: str) -> list[dict[str, Any]]:
        path = self.site(name) / "state" / "ledger.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return lines  # the coordinator keeps each chained line verbatim (client/state.py)
