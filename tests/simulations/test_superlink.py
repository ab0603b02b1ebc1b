"""The processes `fedrec simulate` starts: a real SuperLink on loopback, and the guard that stops
every process of a run when the driver ends or dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from fedrec.common.errors import ConfigError
from fedrec.common.rundir import FlowerDir
from fedrec.simulations import superlink
from fedrec.simulations.superlink import (
    MARK,
    LocalSuperLink,
    flower_executable,
    marked_processes,
    stop_marked,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# a parent that starts a child in a session of its own and exits: the child is orphaned
ORPHANING = [sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(120)'], start_new_session=True)"]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_stop_marked_kills_the_runs_processes_orphans_included_and_no_other() -> None:
    ours = subprocess.Popen(SLEEPER, env={**os.environ, MARK: "run-a"})
    subprocess.run(ORPHANING, env={**os.environ, MARK: "run-a"}, check=True)
    other = subprocess.Popen(SLEEPER, env={**os.environ, MARK: "run-b"})
    try:
        wait_until(lambda: len(marked_processes("run-a")) == 2)

        stopped = stop_marked("run-a")

        assert len(stopped) == 2 and ours.wait(timeout=10) == -9
        assert marked_processes("run-a") == []
        assert alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_stop_marked_kills_children_whose_environment_lost_the_marker() -> None:
    # like Ray's agents, whose process title can overwrite the environment they started with
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                               "[sys.executable, '-c', 'import time; time.sleep(120)'], env={}); "
                               "time.sleep(120)"], env={**os.environ, MARK: "run-d"})
    wait_until(lambda: len(psutil.Process(parent.pid).children()) == 1)
    child = psutil.Process(parent.pid).children()[0]

    stopped = stop_marked("run-d")

    assert len(stopped) == 2 and parent.wait(timeout=10) == -9
    wait_until(lambda: not alive(child.pid))


def test_guard_stops_the_run_when_its_pipe_closes() -> None:
    marked = subprocess.Popen(SLEEPER, env={**os.environ, MARK: "run-c"})
    guard = subprocess.Popen([sys.executable, "-m", superlink.__name__, "run-c"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)

    out, _ = guard.communicate(timeout=60)  # closing stdin: what the kernel does when the driver dies

    assert guard.returncode == 0 and b"stopped 1 processes" in out
    assert marked.wait(timeout=10) == -9


def test_a_second_driver_waits_for_the_lock_then_says_who_holds_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(superlink, "LOCK_WAIT", 0.3)
    path = tmp_path / "flower" / ".lock"
    path.parent.mkdir()
    held = superlink._take_lock(path)
    try:
        with pytest.raises(ConfigError, match="in use by another `fedrec simulate`"):
            superlink._take_lock(path)
    finally:
        os.close(held)
    os.close(superlink._take_lock(path))  # free again


def test_flower_commands_come_from_beside_this_interpreter_first() -> None:
    assert flower_executable("flwr") == str(Path(sys.executable).parent / "flwr")
    with pytest.raises(ConfigError, match="no-such-flower-command"):
        flower_executable("no-such-flower-command")


def test_local_superlink_starts_answers_and_leaves_nothing_running(tmp_path: Path) -> None:
    flower = FlowerDir(tmp_path / "flower")

    with LocalSuperLink(flower, {}) as link:
        with urllib.request.urlopen(f"http://127.0.0.1:{link.port}/health", timeout=5) as reply:
            assert reply.status == 200
        running = marked_processes(link.token)
        assert any("flower-superlink" in " ".join(p.cmdline()) for p in running)
        assert link.env["FLWR_HOME"] == str(flower.home) and flower.flower_config.is_file()

    assert marked_processes(link.token) == []
    assert not any(alive(p.pid) for p in running)
    os.close(superlink._take_lock(flower.lock))  # released
