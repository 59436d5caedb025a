"""sd_notify against a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import socket

import pytest

from xen_vhost_master.sd_notify import Notifier


@pytest.fixture
def manager(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_ready_status_stopping_reach_the_manager(manager):
    sock, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"}
    n = Notifier(env)
    assert "NOTIFY_SOCKET" not in env and n.enabled
    assert n.watchdog_interval == 2.0
    n.ready("serving 2 devices")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 devices"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    n.close()


def test_abstract_namespace_address():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"xvm-test-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
        n.close()
    finally:
        sock.close()


def test_silent_outside_systemd_and_when_manager_vanished(tmp_path):
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")  # nothing to send to; must not raise
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    gone.ready("x")  # the manager's socket vanished: not our crash
    gone.close()


def test_watchdog_for_another_pid_is_ignored():
    n = Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None


def test_reloading_and_the_environment_handed_to_the_next_image(manager):
    """A handover: RELOADING=1 with MONOTONIC_USEC (systemd 253's Type=notify-reload wants it),
    and the variables popped at construction put back for the process's next image."""
    import os

    sock, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    n = Notifier(env)
    assert env == {"OTHER": "x"}
    n.reloading()
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0 and fields["STATUS"]
    n.keep_for_exec()
    assert env == {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    n.close()
