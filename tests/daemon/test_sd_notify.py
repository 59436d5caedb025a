"""sd_notify against a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import asyncio
import socket
import threading

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


def fill_queue(path: str) -> list[socket.socket]:
    """Fill the receive queue of the datagram socket at ``path`` (net.unix.max_dgram_qlen
    datagrams): senders send without blocking until a fresh one is refused at its first datagram
    (a sender's own buffer also refuses, after some hundred: then the next sender goes on)."""
    senders: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        senders.append(s)
        sent = 0
        try:
            while True:
                s.sendto(b"STATUS=filler", path)
                sent += 1
        except BlockingIOError:
            if sent == 0:
                return senders


def drain_queue(sock: socket.socket) -> list[bytes]:
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        return got


def test_a_manager_that_does_not_read_never_blocks_the_daemon(manager):
    """systemd reads its notification socket at once; a manager that stops reading (a test's
    socket after READY=1, a busy PID 1) lets its queue fill (net.unix.max_dgram_qlen datagrams,
    10 by default). A notification then neither blocks (the daemon's event loop would stop
    serving the guest) nor is lost when it matters: statuses are coalesced, READY/STOPPING
    kept in order and sent once the queue has room."""
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    senders = fill_queue(path)
    try:
        done = threading.Event()

        def notify() -> None:
            n.status("step 1")
            n.ready("serving")
            n.status("step 2")
            n.status("step 3")
            done.set()

        t = threading.Thread(target=notify, daemon=True)
        t.start()
        blocked = not done.wait(5.0)
        received = drain_queue(sock)  # (lets a blocked sendto go on)
        t.join(5.0)
        assert not blocked, "sendto blocked on the manager's full queue"
        assert all(m == b"STATUS=filler" for m in received)  # nothing got through meanwhile
        n.stopping()  # the queue has room again: what was pending goes first, in order
        assert drain_queue(sock) == [b"STATUS=step 1", b"READY=1\nSTATUS=serving", b"STATUS=step 3",
                                b"STOPPING=1\nSTATUS=stopping"]
    finally:
        for s in senders:
            s.close()
        n.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_pending_notifications_are_retried_from_the_event_loop(manager):
    """READY=1 refused by a full queue reaches the manager once it reads again, without another
    notification to carry it."""
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    senders = fill_queue(path)
    rescued = threading.Event()

    def rescue() -> None:  # a blocked sendto would hold this test's event loop: let it go on
        rescued.set()
        drain_queue(sock)

    timer = threading.Timer(5.0, rescue)
    try:
        timer.start()
        n.ready("serving")
        timer.cancel()
        assert not rescued.is_set(), "sendto blocked on the manager's full queue"
        assert n.store_fds("dev0", [sock.fileno()]) is False  # (not ahead of READY=1)
        while drain_queue(sock):  # the fillers' datagrams
            pass
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 5.0) == b"READY=1\nSTATUS=serving"
    finally:
        for s in senders:
            s.close()
        n.close()
