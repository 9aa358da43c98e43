"""Run the benchmark again inside a private network namespace it creates and deletes, so that a peer
which binds 0.0.0.0 (KServe) listens on the namespace's own loopback only. Every path of the sitting
(raw ORT, tlserve, the peer) then runs in that one namespace, on the same loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ENV = "TLSERVE_BENCH_NETNS"  # set in the re-run: the name of the namespace it runs in


def inside() -> bool:
    """Whether this process is the re-run inside the namespace."""
    return bool(os.environ.get(ENV))


def require_ip() -> str:
    """The `ip` binary, or a clear exit when the namespace cannot be made here."""
    if os.geteuid() != 0:
        raise SystemExit("--peer runs the sitting in a private network namespace (`ip netns add`): run it as root")
    ip = shutil.which("ip")
    if ip is None:
        raise SystemExit("--peer needs `ip` (iproute2) to make a private network namespace: apt-get install iproute2")
    return ip


def run_inside(argv: list[str]) -> int:
    """``python argv`` in a fresh namespace with its loopback up; the namespace is deleted afterwards,
    whatever happens. Returns the re-run's exit status; a signal here stops the re-run first (SIGTERM,
    so its own `finally` stops its servers)."""
    ip = require_ip()
    name = f"tlserve-bench-{os.getpid()}"
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        subprocess.run([ip, "netns", "exec", name, ip, "link", "set", "lo", "up"], check=True)
        child = subprocess.Popen([ip, "netns", "exec", name, sys.executable, *argv], env={**os.environ, ENV: name})
        try:
            return child.wait()
        except BaseException:
            child.terminate()
            child.wait(120)
            raise
    finally:
        subprocess.run([ip, "netns", "delete", name], check=False)
