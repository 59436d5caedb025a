"""sd_notify(3) without a dependency: READY, STATUS, STOPPING and the watchdog.

Silent outside systemd: with no NOTIFY_SOCKET in the environment every call does nothing.
The variable is popped at construction so that child processes (back-ends we might spawn) do not
inherit it and confuse systemd.
"""

from __future__ import annotations

import array
import asyncio
import os
import select
import socket
import time
from collections.abc import Sequence

__all__ = ["Notifier"]

#: Datagrams kept while the manager's socket is full (sent in order once it takes them again);
#: beyond this the oldest status-only ones are dropped, then the oldest of any kind.
MAX_PENDING = 16
CLOSE_WAIT = 1.0  # seconds close() waits for room for what is still pending


class Notifier:
    """A connection to the service manager's notification socket (or to nothing)."""

    def __init__(self, environ: dict[str, str] | os._Environ[str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._env = env
        address = env.pop("NOTIFY_SOCKET", None)
        usec = env.pop("WATCHDOG_USEC", None)
        pid = env.pop("WATCHDOG_PID", None)
        # What to put back for a new image of this process (same pid: the same service to systemd).
        self._inherited = {k: v for k, v in (("NOTIFY_SOCKET", address), ("WATCHDOG_USEC", usec),
                                              ("WATCHDOG_PID", pid)) if v is not None}
        self._sock: socket.socket | None = None
        self._address = ""
        if address:
            # An address starting with '@' is in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            # Non-blocking: a datagram socket whose receiver does not read (its queue holds
            # net.unix.max_dgram_qlen datagrams, 10 by default) would block sendto(2), and with it
            # the event loop serving the guest. What the socket refuses waits in ``_pending``;
            # connected, the socket polls writable once the receiver's queue has room (unix(7)).
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._connected = False
        self._pending: list[bytes] = []
        self._waiting: asyncio.AbstractEventLoop | None = None  # the loop watching for room
        self.watchdog_interval: float | None = None
        if usec and usec.isdigit() and int(usec) > 0 and (pid is None or pid == str(os.getpid())):
            # systemd's advice: ping at half the timeout.
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="serving")``."""
        if self._sock is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        if self._pending and message.startswith(b"STATUS=") and self._pending[-1].startswith(b"STATUS="):
            self._pending[-1] = message  # a newer status replaces one not sent yet
        else:
            self._pending.append(message)
        if len(self._pending) > MAX_PENDING:
            drop = next((i for i, m in enumerate(self._pending) if m.startswith(b"STATUS=")), 0)
            del self._pending[drop]
        if self._waiting is None:  # (else it goes, in order, once the socket has room)
            self._flush()

    def _flush(self) -> bool:
        """Send what is pending, in order, until the socket refuses; then the running event loop
        (if any, else the next notification) sends the rest once there is room. True when
        nothing is left. A vanished manager's socket must not take the daemon down: what was
        pending is dropped; systemd would notice a missing READY/WATCHDOG itself."""
        sock = self._sock
        while self._pending and sock is not None:
            try:
                if not self._connected:
                    sock.connect(self._address)
                    self._connected = True
                sock.send(self._pending[0])
            except BlockingIOError:
                self._wait_for_room()
                return False
            except OSError:  # (ENOENT, ECONNREFUSED: no manager any more)
                self._connected = False
                self._pending.clear()
                break
            del self._pending[0]
        return True

    def _wait_for_room(self) -> None:
        if self._waiting is not None or self._sock is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.add_writer(self._sock.fileno(), self._room)
        self._waiting = loop

    def _room(self) -> None:
        self._stop_waiting()
        self._flush()

    def _stop_waiting(self) -> None:
        loop, self._waiting = self._waiting, None
        if loop is not None and not loop.is_closed() and self._sock is not None:
            loop.remove_writer(self._sock.fileno())

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        """``FDSTORE=1`` with ``FDNAME=name`` and ``fds`` (sd_pid_notify_with_fds(3)): the service
        manager keeps them and hands them back to the next process of this service (systemd:
        with ``FileDescriptorStoreMax=`` in the unit). False if there is no manager or it did
        not take the datagram (nor one sent before: the order of FDSTORE and FDSTOREREMOVE matters)."""
        if self._sock is None or not fds:
            return False
        if self._pending and (self._waiting is not None or not self._flush()):
            return False
        message = f"FDSTORE=1\nFDNAME={name}".encode()
        try:
            if not self._connected:
                self._sock.connect(self._address)
                self._connected = True
            self._sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError:
            return False
        return True

    def remove_fds(self, name: str) -> None:
        """``FDSTOREREMOVE=1``: the fds stored as ``name`` are of no use any more."""
        self.notify(FDSTOREREMOVE=1, FDNAME=name)

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def stopping(self, status: str = "stopping") -> None:
        self.notify(STOPPING=1, STATUS=status)

    def reloading(self, status: str = "handing over to a new image") -> None:
        """sd_notify(3) RELOADING=1; MONOTONIC_USEC is what Type=notify-reload (systemd 253)
        requires with it, and is ignored by older managers. READY=1 ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def keep_for_exec(self) -> None:
        """Put the variables popped at construction back, for the image this process execs."""
        self._env.update(self._inherited)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket, once what is pending went (waited for up to CLOSE_WAIT s: the
        manager is slow, not gone) or could not."""
        self._stop_waiting()
        if self._sock is not None:
            deadline = time.monotonic() + CLOSE_WAIT
            room = select.poll()
            room.register(self._sock, select.POLLOUT)
            while not self._flush() and (left := deadline - time.monotonic()) > 0:
                room.poll(left * 1000)
            self._stop_waiting()
            self._sock.close()
            self._sock = None
