"""``xen-vhost-sim`` in its own process, for the tests that need the simulated host outside pytest's
process (sim/xen_vhost_sim/cli.py: ``--ready-fd N`` writes ``ready\\n`` once its socket listens)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Sequence

TIMEOUT = 10.0


def sim_command() -> list[str]:
    """The ``xen-vhost-sim`` entry point next to this interpreter, or its module when not installed."""
    exe = shutil.which("xen-vhost-sim", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "xen_vhost_sim.cli"]


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = TIMEOUT) -> None:
    """SIGTERM, a bounded wait, then SIGKILL: the process is reaped however it ends."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_sim_process(argv: Sequence[str], timeout: float = TIMEOUT) -> subprocess.Popen[bytes]:
    """Run ``argv`` (a ``xen-vhost-sim`` command line) with ``--ready-fd`` and return once it wrote
    ``ready``: its socket listens. AssertionError, with the process stopped, if it does not within
    ``timeout`` seconds."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([*argv, "--ready-fd", str(w)], pass_fds=(w,))
    finally:
        os.close(w)
    try:
        said = os.read(r, 16) if select.select([r], [], [], timeout)[0] else b""
    finally:
        os.close(r)
    if said != b"ready\n":
        stop_process(proc)
        raise AssertionError("xen-vhost-sim did not start")
    return proc
