"""Flower's simulation runtime as processes fedrec owns: a private SuperLink on loopback, the `flwr`
CLI against it, and a guard that stops every process of a run however the run ends.

Flower 1.42 runs a simulation through `flwr run` against a SuperLink started with `--simulation`.
That SuperLink starts a SuperExec in a session of its own, the SuperExec starts `flwr-simulation`,
and `flwr-simulation` starts Ray; Flower has no command that stops them all (`flwr stop` leaves
Ray's agents behind) and a driver killed with SIGKILL runs no cleanup. So every process started
here carries a marker in its environment, which Flower and Ray pass down to every process they
start, and a small guard process in a session of its own kills every marked process once its pipe
from the driver closes: the driver closes it when the run ends (completed, failed or Ctrl-C), the
kernel when the driver dies. The guard holds the run's lock until that is done, so a resumed run
never overlaps the processes of the one before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import tomli_w
from fedrec.common.errors import ConfigError, FedrecError
from fedrec.common.rundir import FlowerDir, atomic_write_text

MARK = "FEDREC_SUPERLINK_RUN"  # environment variable: the run's token, in every process of the run
CONNECTION = "fedrec"  # the SuperLink connection's name in the private FLWR_HOME
START_TIMEOUT = 60.0  # seconds for the SuperLink to answer /health
LOCK_WAIT = 60.0  # seconds to wait for the processes of a previous (killed) run to be stopped
FLWR_TIMEOUT = 120.0  # seconds for one `flwr` command (submit, status)

# What every process of the run is started with: no telemetry or update check (offline machines),
# no per-run dependency installation, and none of the warnings a user can do nothing about
# (transformers' and Ray's FutureWarnings; Flower's INFO lines unless asked for). Ray's own
# RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO is left alone: setting it to 0 would let a client with
# fed.num_gpus = 0 see every GPU; its FutureWarning is silenced with the others.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "TOKENIZERS_PARALLELISM": "false",
}


def flower_executable(name: str) -> str:
    """Flower's command `name` beside the running interpreter (a virtualenv not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"Flower's `{name}` command is neither beside {sys.executable} nor on PATH; "
                          "install fedrec with its dependencies (flwr[simulation]) in this environment")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_tree(pid: int) -> None:
    """Kill `pid` and all its descendants, collected first (so orphans are not missed)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL) if p.pid == pid else p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs(procs, timeout=10)


def marked_processes(token: str) -> list[psutil.Process]:
    """Every live process (but this one) whose environment carries MARK=token."""
    return processes_with(MARK, token)


def processes_with(variable: str, value: str) -> list[psutil.Process]:
    """Every live process (but this one) started with `variable`=`value` in its environment."""
    needle = f"\0{variable}={value}\0".encode()
    found = []
    for pid in psutil.pids():
        if pid != os.getpid() and needle in b"\0" + _environ_bytes(pid) + b"\0":
            with contextlib.suppress(psutil.NoSuchProcess):
                found.append(psutil.Process(pid))
    return found


def _environ_bytes(pid: int) -> bytes:
    """A process's initial environment, raw. Not psutil's environ(): Ray's processes overwrite
    the start of that memory with their title (setproctitle), and psutil then parses nothing."""
    proc = Path("/proc") / str(pid) / "environ"
    try:
        if proc.parent.parent.is_dir():
            return proc.read_bytes()
        env = psutil.Process(pid).environ()  # no /proc (macOS): the best there is
        return b"\0".join(f"{k}={v}".encode() for k, v in env.items())
    except (OSError, psutil.Error):
        return b""  # gone, not ours, or a zombie (nothing runs)


def stop_marked(token: str) -> list[str]:
    """SIGKILL every process of the run, repeated until none is left (Ray may start a worker while
    others are killed). Nothing is lost: the run's state is in the run directory, written
    atomically, and Flower's state is in memory; graceful shutdowns took seconds for nothing."""
    stopped: list[str] = []
    for _ in range(5):
        victims = _with_descendants(marked_processes(token))
        if not victims:
            break
        stopped += [f"{p.pid}:{_name(p)}" for p in victims]
        _signal(victims, signal.SIGKILL)
        _wait_gone(victims, timeout=10.0)
    return stopped


def _with_descendants(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """`procs` and every process below them, collected before anything is killed (an orphan
    leaves the tree). The marker alone can miss one: a title set with setproctitle may overwrite
    the whole environment a process started with (seen with Ray's agents)."""
    found = {p.pid: p for p in procs}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            found |= {c.pid: c for c in p.children(recursive=True)}
    found.pop(os.getpid(), None)
    return [p for p in found.values() if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> None:
    """Wait until each process has exited; a zombie counts as gone (its parent, maybe the driver,
    reaps it later)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while _running(p) and time.monotonic() < deadline:
            time.sleep(0.05)


def _signal(procs: Sequence[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.send_signal(sig)


def _name(p: psutil.Process) -> str:
    try:
        return str(p.name())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"


class LocalSuperLink:
    """A SuperLink with Flower's simulation runtime, private to one run directory.

    Free loopback port, in-memory state, no per-run dependency installation (the installed fedrec
    and torch are used), its own FLWR_HOME; every process it leads to is stopped by `close()` or,
    should this process die first, by the guard. `env` is added to the environment of all of them.
    """

    def __init__(self, flower: FlowerDir, env: Mapping[str, str], *, verbose: bool = False) -> None:
        self.flower = flower
        self.token = uuid.uuid4().hex
        self.port = free_port()
        # the SuperExec finds `flwr-simulation` on PATH: the one beside this interpreter first
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **QUIET_ENV, "FLWR_LOG_LEVEL": "INFO" if verbose else "WARNING", **env,
                    "FLWR_HOME": str(flower.home), MARK: self.token, "PATH": path}
        self._lock: int | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._superlink: subprocess.Popen[bytes] | None = None

    # -- start and stop --

    def __enter__(self) -> LocalSuperLink:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def start(self) -> None:
        """Take the run's lock, start the guard, then the SuperLink; return once it answers."""
        self.flower.root.mkdir(parents=True, exist_ok=True)
        self._lock = _take_lock(self.flower.lock)
        with self.flower.superlink_log.open("ab") as log:
            # first the guard, in a session of its own (a kill of this process group spares it),
            # holding the lock; then the SuperLink, also in its own session: a Ctrl-C reaches
            # only this process, which stops the run
            self._guard = subprocess.Popen(
                [sys.executable, "-m", __name__, self.token], stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT, pass_fds=(self._lock,), start_new_session=True)
            self.flower.home.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.flower.flower_config, tomli_w.dumps({"superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True}}}))
            args = [flower_executable("flower-superlink"), "--insecure", "--simulation", "--isolation",
                    "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
                    "--disable-runtime-dependency-installation"]
            self._superlink = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_alive()
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise FedrecError(f"Flower's SuperLink did not start in {START_TIMEOUT:.0f} s; "
                                  f"its log: {self.flower.superlink_log}")
            time.sleep(0.2)

    def check_alive(self) -> None:
        """Raise if the SuperLink has exited (it never does on its own while a run goes on)."""
        if self._superlink is not None and self._superlink.poll() is not None:
            raise FedrecError(f"Flower's SuperLink exited ({self._superlink.returncode}); "
                              f"its log: {self.flower.superlink_log}")

    def close(self) -> None:
        """Stop every process of the run (the guard does it), then release the lock."""
        if self._guard is not None:
            try:
                self._guard.communicate(timeout=30)  # closes its stdin: the guard's signal
            except (subprocess.TimeoutExpired, OSError):  # the guard is stuck: do it here
                kill_tree(self._guard.pid)
                self._guard.wait()
                stop_marked(self.token)
            self._guard = None
        if self._superlink is not None:
            kill_tree(self._superlink.pid)  # nothing to do: the guard has killed it
            self._superlink.wait()  # reaped by its parent, this process
            self._superlink = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- the flwr CLI --

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One `flwr` command against this SuperLink; a failure names it with Flower's message."""
        try:
            done = subprocess.run([flower_executable("flwr"), *args], env=self.env, capture_output=True,
                                  text=True, timeout=FLWR_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FedrecError(f"`flwr {args[0]}` did not answer in {FLWR_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            message = (done.stdout + done.stderr).strip()[-2000:]
            raise FedrecError(f"`flwr {args[0]}` failed ({done.returncode}): {message}")
        return done

    def submit(self, app: Path, *, federation_config: str) -> int:
        """Start the app in `app` on this SuperLink's simulation runtime; return Flower's run id."""
        done = self.flwr("run", str(app), "--federation-config", federation_config, "--format", "json")
        reply = _json(done.stdout, "flwr run")
        if not reply.get("success") or "run-id" not in reply:
            raise FedrecError(f"`flwr run` refused the run: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def stream_log(self, run_id: int, path: Path) -> subprocess.Popen[bytes]:
        """`flwr log --stream` into `path` (appended); the process ends when the run does."""
        with path.open("ab") as out:
            return subprocess.Popen([flower_executable("flwr"), "log", str(run_id), "--stream"],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. "running" or "finished:completed"."""
        reply = _json(self.flwr("list", "--run-id", str(run_id), "--format", "json").stdout, "flwr list")
        runs = reply.get("runs") or [{}]
        return str(runs[0].get("status", "unknown"))


def _json(text: str, command: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise FedrecError(f"`{command}` printed no JSON: {text.strip()[-500:]}") from None
    return doc if isinstance(doc, dict) else {}


def _take_lock(path: Path) -> int:
    """An exclusive lock on `path`, waiting up to LOCK_WAIT s for a previous run's guard to finish."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise ConfigError(f"{path.parent.parent} is in use by another `fedrec simulate` (it "
                                  f"holds {path}); wait for it to end or stop it first") from None
            time.sleep(0.2)


def _guard(token: str) -> int:
    """The guard: wait until the driver closes its pipe (done, or dead), then stop the run."""
    sys.stdin.buffer.read()
    stopped = stop_marked(token)
    if stopped:
        sys.stdout.write(f"fedrec: stopped {len(stopped)} processes of the run: {' '.join(stopped)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_guard(sys.argv[1]))
