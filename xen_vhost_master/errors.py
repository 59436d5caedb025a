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

__all__ = ["PERMANENT_EXIT_CODES", "ConfigError", "DaemonError", "ExitCode", "GuestFault", "HostError",
           "XenError", "host_error"]


class ExitCode(enum.IntEnum):
    """Exit codes systemd can act on (sysexits.h where one fits; 2 is argparse's, 3 LSB's "not
    running" for ``status``). Every permanent one is in :data:`PERMANENT_EXIT_CODES`, the units'
    ``RestartPreventExitStatus=``; only 1 and 75 are worth a restart."""

    OK = 0
    FAILURE = 1  # an unexpected error (a bug: its traceback is logged)
    USAGE = 2  # a bad command line (argparse), e.g. --domain 0
    NOT_RUNNING = 3  # `status`: no daemon serves the domain (LSB init-script status "not running")
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the domain does not exist
    NOT_DOM0 = 72  # EX_OSFILE: no /dev/xen/privcmd, or /proc/xen/capabilities lacks control_d
    ALREADY_SERVED = 73  # another instance serves this guest (its lock is held): do not restart
    RUNTIME_DIR = 74  # EX_IOERR: the runtime directory cannot be created or locked, or is not trusted
    TEMPFAIL = 75  # EX_TEMPFAIL: try again later (Restart=on-failure)
    NO_IOREQ_SERVER = 76  # EX_PROTOCOL: Xen refuses the IOREQ server dm_ops (no CONFIG_IOREQ_SERVER)
    NOPERM = 77  # EX_NOPERM: permission denied on /dev/xen/* or by Xen
    CONFIG = 78  # EX_CONFIG: fix the configuration; restarting will not help


# What restarting does not cure: the units' RestartPreventExitStatus= (systemd/*.service) and the
# statuses the dispatcher does not start an instance again after.
PERMANENT_EXIT_CODES = frozenset({
    ExitCode.USAGE, ExitCode.UNAVAILABLE, ExitCode.NOT_DOM0, ExitCode.ALREADY_SERVED, ExitCode.RUNTIME_DIR,
    ExitCode.NO_IOREQ_SERVER, ExitCode.NOPERM, ExitCode.CONFIG,
})


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


class HostError(DaemonError):
    """A permanent problem of the host, not of the guest or its configuration: the process exits
    with ``code`` and says ``str(self)``, one line naming what is missing and how to fix it."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, str(self)))


# errnos of open(2) on a device node that is not there: no node, no driver behind it.
_NO_DEVICE = (_errno.ENOENT, _errno.ENODEV, _errno.ENXIO)
_DENIED = (_errno.EACCES, _errno.EPERM)


def host_error(error: XenError) -> HostError | None:
    """The permanent host problem a Xen failure means, or None when it may be transient or is the
    guest's. ``open /dev/xen/…`` missing: not a dom0; denied: no permission; a dm_op Xen does not
    implement (ENOSYS: Xen built without CONFIG_IOREQ_SERVER has no dm_op hypercall on Arm,
    xen/arch/arm/Makefile; EOPNOTSUPP: the op itself): no IOREQ server."""
    name = _errno.errorcode.get(error.errno or 0, str(error.errno))
    if error.op.startswith("open "):
        path = error.op.removeprefix("open ")
        if error.errno in _NO_DEVICE:
            return HostError(ExitCode.NOT_DOM0, f"not a Xen dom0: {path} is missing ({name}): run in dom0 with "
                                                "the xen-privcmd, xen-evtchn, xen-gntdev modules loaded "
                                                "(see README Requirements)")
        if error.errno in _DENIED:
            return HostError(ExitCode.NOPERM, f"permission denied opening {path} ({name}): run as root, "
                                              "as the unit does")
        return None
    if error.op.startswith("dm_op") and error.errno in (_errno.ENOSYS, _errno.EOPNOTSUPP):
        return HostError(ExitCode.NO_IOREQ_SERVER, f"Xen has no IOREQ server ({error.op}: {name}): rebuild Xen "
                                                   "with CONFIG_IOREQ_SERVER=y (see README Requirements)")
    if error.op.startswith("dm_op") and error.errno in _DENIED:
        return HostError(ExitCode.NOPERM, f"Xen denied {error.op} ({name}): run the daemon in dom0, or in a "
                                          "domain the XSM policy lets be the guest's device model")
    return None
