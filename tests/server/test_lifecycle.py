"""The lifecycle as a user's process sees it: `tlserve serve` in a subprocess, signals in every state,
SIGTERM under load, a taken port; and the state machine's table itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from serving_helpers import MODEL, Callers, LiveServer, copy_version, photo_bytes, server_settings

from tlserve.client import wait_ready
from tlserve.server.app import create_server
from tlserve.server.lifecycle import Action, IllegalTransition, Lifecycle, State, action_for, forced_exit_status
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.ports import PortInUse

LOAD_LINE = "starting: loading the model repository"
SERVING_LINE = "serving gRPC on"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`tlserve serve` on a free port, its output in a file."""

    def __init__(self, repository: Path, log_path: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")
        command = [sys.executable, "-m", "tlserve", "serve", "--repository", str(repository), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--metrics-port", "0", "--device", "cpu", "--drain-seconds", "5"]
        self.process = subprocess.Popen(
            [*command, *extra], stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.address = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 120) -> None:
        give_up = time.monotonic() + timeout
        while text not in self.log():
            assert self.process.poll() is None, f"exited {self.process.returncode} before {text!r}:\n{self.log()}"
            assert time.monotonic() < give_up, f"no {text!r} after {timeout}s:\n{self.log()}"
            time.sleep(0.01)

    def wait_ready(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            wait_ready(channel, 120)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(repository: Path, *extra: str, port: int | None = None) -> Served:
        served = Served(repository, tmp_path / f"serve-{len(started)}.log", *extra, port=port)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


@pytest.fixture
def repo(exported_version, tmp_path) -> Path:
    root = tmp_path / "models"
    (root / MODEL).mkdir(parents=True)
    copy_version(exported_version, root / MODEL / "1")
    return root


@pytest.fixture
def slow_repo(exported_version, tmp_path) -> Path:
    """Four versions served together (--version-policy all): a first load long enough to signal into."""
    root = tmp_path / "four"
    (root / MODEL).mkdir(parents=True)
    for version in range(1, 5):
        copy_version(exported_version, root / MODEL / str(version))
    return root


async def build(settings):
    return create_server(settings, CollectorRegistry())


def photo() -> list[pb.Image]:
    return [pb.Image(encoded=photo_bytes("coffee.png"))]


# --- the table ----------------------------------------------------------------------------------
def test_each_signal_has_one_meaning_in_each_state():
    hup, term, intr = signal.SIGHUP, signal.SIGTERM, signal.SIGINT
    table = {state: tuple(action_for(state, s) for s in (hup, term, intr)) for state in State}
    assert table == {
        State.STARTING: (Action.IGNORE, Action.DRAIN, Action.DRAIN),
        State.SERVING: (Action.RELOAD, Action.DRAIN, Action.DRAIN),
        State.DRAINING: (Action.IGNORE, Action.FORCE_EXIT, Action.FORCE_EXIT),
        State.STOPPED: (Action.IGNORE, Action.FORCE_EXIT, Action.FORCE_EXIT),
    }
    assert (forced_exit_status(term), forced_exit_status(intr)) == (143, 130)


def test_only_the_drawn_transitions_exist():
    lifecycle = Lifecycle()
    assert lifecycle.accepting
    with pytest.raises(IllegalTransition):
        lifecycle.to(State.STOPPED)
    assert lifecycle.on_signal(signal.SIGTERM) is Action.DRAIN  # straight from STARTING
    assert lifecycle.state is State.DRAINING and not lifecycle.accepting
    with pytest.raises(IllegalTransition):
        lifecycle.to(State.SERVING)
    assert lifecycle.on_signal(signal.SIGHUP) is Action.IGNORE
    lifecycle.to(State.STOPPED)
    assert lifecycle.on_signal(signal.SIGINT) is Action.FORCE_EXIT


# --- signals to a real process -----------------------------------------------------------------
@pytest.mark.parametrize("run", range(3))
def test_sigterm_under_load_answers_or_refuses_every_call(repo, serve, run):
    served = serve(repo)
    served.wait_ready()
    with Callers(served.address, photo(), workers=6) as callers:
        callers.wait_for(30)
        served.signal(signal.SIGTERM)
        assert served.wait() == 0
        callers.wait_for(6)  # each caller sees the port closed
    assert callers.codes["OK"] >= 30
    assert set(callers.codes) <= {"OK", "UNAVAILABLE"}, callers.details  # never CANCELLED or lost
    assert "lifecycle: serving -> draining" in served.log() and "lifecycle: draining -> stopped" in served.log()


def test_a_sighup_storm_under_load_fails_nothing(repo, serve):
    served = serve(repo)
    served.wait_ready()
    with Callers(served.address, photo(), workers=4) as callers:
        callers.wait_for(10)
        for _ in range(50):
            served.signal(signal.SIGHUP)
            time.sleep(0.02)
        callers.wait_for(10)
        assert served.process.poll() is None
    assert set(callers.codes) == {"OK"}, callers.details
    assert served.log().count("SIGHUP: rescanning the repository") > 0  # signals close together may merge
    served.signal(signal.SIGTERM)
    assert served.wait() == 0


def test_sighup_during_the_first_load_is_ignored(slow_repo, serve):
    served = serve(slow_repo, "--version-policy", "all")
    served.wait_log(LOAD_LINE)
    while SERVING_LINE not in served.log() and served.process.poll() is None:
        served.signal(signal.SIGHUP)
        time.sleep(0.02)
    served.wait_ready()
    assert "SIGHUP ignored while starting" in served.log()
    served.signal(signal.SIGTERM)
    assert served.wait() == 0


def test_sigterm_during_the_first_load_exits_cleanly_without_serving(slow_repo, serve):
    served = serve(slow_repo, "--version-policy", "all")
    served.wait_log(LOAD_LINE)
    served.signal(signal.SIGTERM)
    assert served.wait() == 0
    text = served.log()
    assert "SIGTERM while starting: draining" in text and SERVING_LINE not in text


def test_sighup_during_the_drain_is_ignored(repo, serve):
    served = serve(repo)
    served.wait_ready()
    with Callers(served.address, photo(), workers=4) as callers:
        callers.wait_for(10)
        served.signal(signal.SIGTERM)
        served.wait_log("lifecycle: serving -> draining")
        served.signal(signal.SIGHUP)
        assert served.wait() == 0
    assert "SIGHUP ignored while draining" in served.log()  # the drain's last step alone lasts > 0.25 s
    assert set(callers.codes) <= {"OK", "UNAVAILABLE"}, callers.details


@pytest.mark.parametrize("second,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_sigterm_forces_exit(repo, serve, second, status):
    served = serve(repo)
    served.wait_ready()
    with Callers(served.address, photo(), workers=4) as callers:
        callers.wait_for(10)
        served.signal(signal.SIGTERM)
        served.wait_log("lifecycle: serving -> draining")
        served.signal(second)
        assert served.wait() == status
    assert "forcing exit now" in served.log()


def test_a_taken_grpc_port_exits_2_with_the_reason(repo, serve):
    first = LiveServer(server_settings(repo)).start()
    try:
        second = serve(repo, port=first.handle.port)
        assert second.wait() == 2
        assert f"refusing to start: port {first.handle.port} is already in use" in second.log()
        with pytest.raises(PortInUse, match="already in use"):  # in-process too: SO_REUSEPORT is off
            first.call(build(server_settings(repo, port=first.handle.port)))
        assert first.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == MODEL
    finally:
        first.close()
