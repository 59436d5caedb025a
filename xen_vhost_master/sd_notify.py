"""sd_notify(3) without a dependency: READY, STATUS, STOPPING and the watchdog.

Silent outside systemd: with no NOTIFY_SOCKET in the environment every call does nothing.
The variable is popped at construction so that child processes (back-ends we might spawn) do not
inherit it and confuse systemd.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence

__all__ = ["Notifier"]


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
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
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
        # A full or vanished socket must not take the daemon down; systemd would notice the
        # missing READY/WATCHDOG itself.
        try:
            self._sock.sendto(message, self._address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            pass

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        """``FDSTORE=1`` with ``FDNAME=name`` and ``fds`` (sd_pid_notify_with_fds(3)): the service
        manager keeps them and hands them back to the next process of this service (systemd:
        with ``FileDescriptorStoreMax=`` in the unit). False if there is no manager or it did
        not take the datagram."""
        if self._sock is None or not fds:
            return False
        message = f"FDSTORE=1\nFDNAME={name}".encode()
        try:
            self._sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                               0, self._address)
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
        if self._sock is not None:
            self._sock.close()
            self._sock = None
