"""One instance per guest, keyed by the guest's *name*: ``--domain NAME|ID`` resolved to the
guest's current domain id, the instance's runtime directory, and the lock that keeps a second
instance for the same guest out.

A guest's domain id changes whenever it is re-created (``xl reboot``, ``on_reboot="restart"``);
its name does not. The name is what systemd's instance (``xen-vhost-master@<name>``), the runtime
directory, the default back-end socket directory and the per-guest configuration file are keyed on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import instance_name
from .errors import ConfigError, DaemonError
from .names import path_name
from .xen.xenstore_wire import XenstoreNotFound

if TYPE_CHECKING:
    from .xen.xenstore import XenstoreClient  # asyncio: only the commands that talk to xenstore load it

__all__ = [
    "ENV_LOCK_FD",
    "RUNTIME_ROOT",
    "AlreadyServed",
    "DomainNotFound",
    "GuestDomain",
    "InstanceLock",
    "find_runtime_by_domid",
    "resolve_domain",
    "runtime_dir",
]

# systemd's RuntimeDirectory=xen-vhost-master/%I: one directory per instance (= the guest's name).
RUNTIME_ROOT = "/run/xen-vhost-master"
# The lock file's descriptor, kept open across a handover's exec (the new image holds the lock
# without a moment in which a second instance could take it).
ENV_LOCK_FD = "XEN_VHOST_MASTER_LOCK_FD"
NAME_MAX = 255  # one path component (Linux NAME_MAX); systemd's unit names are shorter still
DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h: ids from here on are not domains
_LOCK_ATTEMPTS = 3  # the holder may unlink the lock file as it exits: open and lock again


class DomainNotFound(DaemonError):
    """No live domain answers to ``--domain`` (exit 69)."""


class AlreadyServed(DaemonError):
    """Another instance holds the guest's lock (exit 73)."""

    def __init__(self, guest: GuestDomain, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process (its pid is not written yet)"
        super().__init__(f"domain {guest.name} (id {guest.domid}) is already served by {who}")
        self.pid = pid


@dataclass(frozen=True)
class GuestDomain:
    domid: int
    name: str


def runtime_dir(name: str, root: str | None = None) -> str:
    """``/run/xen-vhost-master/<name>``: what RuntimeDirectory=xen-vhost-master/%I creates for the
    instance ``xen-vhost-master@<escaped name>`` (``%I`` is the name itself). A name that is not one
    plain path component (``/`` in it, a leading ``.``: :func:`path_name`) gets its escaped form,
    never a path outside the root; and the escaped directory of an instance started by a unit
    that still said ``%i`` (before an upgrade's restart) is used while it is there."""
    component = path_name(name)
    if not component:
        raise ConfigError("the guest's name is empty: give --runtime-dir")
    if len(component.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise ConfigError(f"the guest's name is {len(component.encode('utf-8', 'surrogateescape'))} bytes as a "
                          f"directory name, more than a directory name may have ({NAME_MAX}): give --runtime-dir")
    base = root or RUNTIME_ROOT
    plain, escaped = os.path.join(base, component), os.path.join(base, instance_name(name))
    if escaped != plain and os.path.isdir(escaped) and not os.path.isdir(plain):
        return escaped
    return plain


def _domid_argument(text: str) -> int | None:
    """``text`` as a domain id if it is one written in ASCII digits (``xl``'s rule), else None."""
    if not text.isascii() or not text.isdigit():
        return None
    domid = int(text)
    if not 0 < domid < DOMID_FIRST_RESERVED:
        raise ConfigError(f"--domain {text}: a guest's domain id is between 1 and {DOMID_FIRST_RESERVED - 1}")
    return domid


async def _name_of(xs: XenstoreClient, domid: int) -> str | None:
    """The name libxl wrote for ``domid`` (its id when it has none), None if no such domain."""
    try:
        raw = await xs.read(f"/local/domain/{domid}/name")
    except XenstoreNotFound:
        return str(domid) if await xs.exists(f"/local/domain/{domid}") else None
    return raw.decode("utf-8", "surrogateescape") or str(domid)


async def resolve_domain(xs: XenstoreClient | None, text: str, *, backend_domid: int = 0) -> GuestDomain:
    """``--domain NAME|ID`` → the live domain: a number that is a live domain's id is that domain
    (its name read from ``/local/domain/<id>/name``); anything else is looked up by name among
    ``/local/domain/*/name``. Without xenstore (``xs`` None, ``--no-xenstore``) only an id is
    understood, and it is its own name."""
    if not text:
        raise ConfigError("--domain: empty; give the guest's name or domain id")
    domid = _domid_argument(text)
    if xs is None:
        if domid is None:
            raise ConfigError(f"--domain {text}: with --no-xenstore give the domain id (a name needs xenstore)")
        return _guest(GuestDomain(domid, text), backend_domid)
    if domid is not None:
        name = await _name_of(xs, domid)
        if name is not None:
            return _guest(GuestDomain(domid, name), backend_domid)
    matches = await _by_name(xs, text)
    if len(matches) > 1:
        raise DomainNotFound(f"{len(matches)} domains are named {text!r} (ids {', '.join(map(str, matches))}): "
                             "give the domain id")
    if not matches:
        hint = ""
        if "/" in text and await _by_name(xs, text.replace("/", "-")):
            # systemd turns '-' of an instance name into '/' in %I
            escaped = instance_name(text.replace("/", "-"))
            hint = (f" (a domain is named {text.replace('/', '-')!r}: its unit is "
                    f"xen-vhost-master@{escaped}.service, see systemd-escape(1))")
        what = "no domain with id or name" if domid is not None else "no domain named"
        raise DomainNotFound(f"{what} {text!r}{hint}")
    return _guest(GuestDomain(matches[0], text), backend_domid)


async def _by_name(xs: XenstoreClient, name: str) -> list[int]:
    want = name.encode("utf-8", "surrogateescape")
    found = []
    try:
        entries = await xs.directory("/local/domain")
    except XenstoreNotFound:
        return []
    for entry in entries:
        if not entry.isascii() or not entry.isdigit():
            continue
        try:
            if await xs.read(f"/local/domain/{entry}/name") == want:
                found.append(int(entry))
        except XenstoreNotFound:
            continue  # gone while we looked, or nameless
    return sorted(found)


def _guest(guest: GuestDomain, backend_domid: int) -> GuestDomain:
    if guest.domid == backend_domid:
        raise ConfigError(f"domain {guest.name} (id {guest.domid}) is the domain this daemon runs in "
                          "(--backend-domid), not a guest")
    return guest


def find_runtime_by_domid(domid: int, root: str | None = None) -> str | None:
    """The runtime directory whose ``state.json`` names domain ``domid`` (for ``status --domain
    ID`` when xenstore cannot say the name); the most recently written one if several do."""
    root = root or RUNTIME_ROOT
    best: tuple[float, str] | None = None
    try:
        entries = os.listdir(root)
    except OSError:
        return None
    for entry in entries:
        path = os.path.join(root, entry, "state.json")
        try:
            with open(path) as f:
                state = json.load(f)
            mtime = os.stat(path).st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("domid") == domid and (best is None or mtime > best[0]):
            best = (mtime, os.path.join(root, entry))
    return best[1] if best else None


class InstanceLock:
    """``<runtime>/lock``: an exclusive flock(2) held for the instance's life, with the holder's
    pid in the file. Taken before anything else touches the runtime directory."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, path: str, guest: GuestDomain) -> InstanceLock:
        """The lock, or :class:`AlreadyServed`. A lock handed over by the previous image of this
        process (``$XEN_VHOST_MASTER_LOCK_FD``) is taken as it is."""
        inherited = cls._inherited(path)
        if inherited is not None:
            return inherited
        for _ in range(_LOCK_ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AlreadyServed(guest, pid) from None
            except OSError:  # flock's other errors (ENOLCK, EINTR): no lock, no fd left open
                os.close(fd)
                raise
            if _same_file(fd, path):  # not unlinked by an exiting holder between open and flock
                lock = cls(fd, path)
                lock._write_pid()
                return lock
            os.close(fd)
        raise DaemonError(f"{path}: the lock file keeps being replaced")

    @classmethod
    def _inherited(cls, path: str) -> InstanceLock | None:
        text = os.environ.pop(ENV_LOCK_FD, None)
        if text is None or not text.isdigit():
            return None
        fd = int(text)
        if not _same_file(fd, path):
            with contextlib.suppress(OSError):
                os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: the same open file
        except OSError:
            os.close(fd)
            return None
        os.set_inheritable(fd, False)
        lock = cls(fd, path)
        lock._write_pid()
        return lock

    def _write_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def keep_for_exec(self) -> None:
        """Hand the lock to the image this process is about to exec."""
        os.set_inheritable(self.fd, True)
        os.environ[ENV_LOCK_FD] = str(self.fd)

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and unlock. Idempotent."""
        if self.fd < 0:
            return
        if _same_file(self.fd, self.path):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EBADF):
            return False
        raise
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
