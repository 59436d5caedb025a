"""Typed errors of the daemon's Xen layer (docs/design.md §2).

* :class:`XenError` is an :class:`OSError` carrying the failed operation and the errno that the
  kernel driver or Xen answered (the message comes from :func:`os.strerror`, as in pyroute2's
  ``NetlinkError``). Callers branch on ``.errno`` (``ENOTTY``/``EOPNOTSUPP`` mean "feature absent").
* :class:`GuestFault` is raised when the guest hands the daemon an address outside its RAM; it must
  never crash the daemon: log it and set the device's ``NEEDS_RESET``.
* :class:`ConfigError` is bad configuration from the operator.

:class:`ExitCode` is here, not with the supervisor, so that the commands that do not serve (``status``,
a configuration error) can exit with one without importing the supervisor.
"""

from __future__ import annotations

import enum
import errno as _errno
import os

__all__ = ["ConfigError", "DaemonError", "ExitCode", "GuestFault", "XenError"]


class ExitCode(enum.IntEnum):
    """Exit codes systemd can act on (sysexits.h)."""

    OK = 0
    FAILURE = 1
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the domain does not exist
    ALREADY_SERVED = 73  # another instance serves this guest (its lock is held): do not restart
    TEMPFAIL = 75  # EX_TEMPFAIL: try again later (Restart=on-failure)
    CONFIG = 78  # EX_CONFIG: fix the configuration; restarting will not help


class DaemonError(Exception):
    """Base of the daemon's own errors."""


class XenError(OSError, DaemonError):
    """An ioctl on /dev/xen/* or a Xen operation failed with ``errno``."""

    def __init__(self, op: str, errno: int) -> None:
        super().__init__(errno, f"{op}: {os.strerror(errno)}")
        self.op = op

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.op, self.errno))

    @property
    def not_supported(self) -> bool:
        """True when the error means "this kernel/hypervisor lacks the feature"."""
        return self.errno in (_errno.ENOTTY, _errno.EOPNOTSUPP, _errno.ENOSYS)


class GuestFault(DaemonError):
    """The guest used a guest-physical address that is not backed by its RAM (or not mappable)."""

    def __init__(self, gpa: int, reason: str) -> None:
        super().__init__(f"guest fault at gpa {gpa:#x}: {reason}")
        self.gpa = gpa
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.gpa, self.reason))


class ConfigError(DaemonError):
    """Invalid configuration (command line, config file, xenstore keys)."""
