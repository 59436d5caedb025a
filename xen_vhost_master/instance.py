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
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import instance_name
from .errors import ConfigError, DaemonError, ExitCode, HostError
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
    "RuntimeDir",
    "find_runtime_by_domid",
    "read_state_file",
    "resolve_domain",
    "runtime_dir",
    "untrusted",
]

# systemd's RuntimeDirectory=xen-vhost-master/%I: one directory per instance (= the guest's name).
RUNTIME_ROOT = "/run/xen-vhost-master"
# The lock file's descriptor, kept open across a handover's exec (the new image holds the lock
# without a moment in which a second instance could take it).
ENV_LOCK_FD = "XEN_VHOST_MASTER_LOCK_FD"
NAME_MAX = 255  # one path component (Linux NAME_MAX); systemd's unit names are shorter still
DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h: ids from here on are not domains
_LOCK_ATTEMPTS = 3  # the holder may unlink the lock file as it exits: open and lock again
# Every file of the runtime directory is opened relative to its fd, never through a symbolic link
# (open(2) O_NOFOLLOW), and without blocking on a FIFO planted there (O_NONBLOCK).
_FILE_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
STATE_MAX = 1 << 20  # bytes of a state file read back: a few hundred per device


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


class RuntimeDir:
    """The instance's runtime directory, held open (``fd``) and trusted: owned by the daemon's
    user and writable by nobody else (:meth:`open` refuses any other, exit 74). Every file in it
    (lock, state, in-flight records) is created and opened relative to ``fd`` without following
    a symbolic link, and temporary files are created exclusively: what another user may have
    placed on the path cannot redirect a write or feed a read."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str, *, create: bool = True) -> RuntimeDir:
        """``path`` (created 0700 if ``create`` and missing, its parents 0755), opened and checked;
        :class:`~.errors.HostError` (RUNTIME_DIR) if it is not to be trusted, OSError if it cannot
        be created or opened."""
        if create:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.lexists(parent):
                os.makedirs(parent, mode=0o755, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            problem = untrusted(os.fstat(fd), os.geteuid())
            if problem is None:
                # its parent must not let another user swap the directory for one of their own
                parent_problem = untrusted(os.stat(os.path.dirname(os.path.abspath(path))), os.geteuid(), parent=True)
                problem = f"its parent directory {parent_problem}" if parent_problem else None
        except BaseException:  # fstat/stat's OSError, or a cancellation: the fd is not handed out
            os.close(fd)
            raise
        if problem is not None:
            os.close(fd)
            raise HostError(ExitCode.RUNTIME_DIR, f"runtime directory {path} {problem}: refusing to keep state "
                                                  f"there (give --runtime-dir a directory only uid {os.geteuid()} "
                                                  "can write, e.g. the unit's RuntimeDirectory=)")
        return cls(fd, path)

    def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
        """``os.open(name, flags)`` in the directory: never through a symbolic link."""
        return os.open(name, flags | _FILE_FLAGS, mode, dir_fd=self.fd)

    def stat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def read(self, name: str, limit: int = STATE_MAX) -> bytes | None:
        """The content of the regular file ``name`` (None if there is none); OSError if it is not
        a regular file or longer than ``limit`` bytes."""
        try:
            fd = self.open_file(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{os.path.join(self.path, name)} is not a regular file")
            if st.st_size > limit:
                raise OSError(errno.EFBIG, f"{os.path.join(self.path, name)} holds {st.st_size} bytes, more than "
                                           f"{limit}")
            return os.pread(fd, limit + 1, 0)[:limit]
        finally:
            os.close(fd)

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` at once: written to ``name.tmp``, created exclusively
        (O_EXCL: a file or link left there is removed, never written through), then renamed."""
        tmp = f"{name}.tmp"
        for _ in range(2):
            try:
                fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                self.unlink(tmp)  # a crash's leftover, or something planted: unlink(2) does not follow links
        else:
            raise OSError(errno.EEXIST, f"{os.path.join(self.path, tmp)} keeps being re-created")
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:  # a write's or rename's OSError (ENOSPC...): no temp file stays behind
            self.unlink(tmp)
            raise

    def unlink(self, name: str) -> bool:
        """Remove ``name`` (a link itself, not what it points to); False if it was not there."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        """Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def untrusted(st: os.stat_result, uid: int, *, parent: bool = False) -> str | None:
    """Why a directory of status ``st`` is not to be trusted by a daemon running as ``uid`` (None
    if it is): not a directory, owned by another user (a parent may be root's), or writable by
    group or others (a parent may be, with the sticky bit: others cannot rename what is ours)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid and not (parent and st.st_uid == 0):
        return f"is owned by uid {st.st_uid}, not {uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (parent and st.st_mode & stat.S_ISVTX):
        return f"is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


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
        found = read_state_file(path)
        if found is None:
            continue
        state, mtime = found
        if isinstance(state, dict) and state.get("domid") == domid and (best is None or mtime > best[0]):
            best = (mtime, os.path.join(root, entry))
    return best[1] if best else None


def read_state_file(path: str) -> tuple[object, float] | None:
    """The JSON document in ``path`` and its mtime, for a look from outside the instance
    (``status``, the dispatcher): None unless it is a regular file (not reached through a
    symbolic link) of at most :data:`STATE_MAX` bytes holding JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | _FILE_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > STATE_MAX:
            return None
        return json.loads(os.pread(fd, STATE_MAX, 0)), st.st_mtime
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class InstanceLock:
    """``<runtime>/lock``: an exclusive flock(2) held for the instance's life, with the holder's
    pid in the file. Taken before anything else touches the runtime directory; with ``runtime``,
    the file is opened relative to that directory's fd (:class:`RuntimeDir`)."""

    def __init__(self, fd: int, path: str, runtime: RuntimeDir | None = None) -> None:
        self.fd = fd
        self.path = path
        self._runtime = runtime
        self._name = os.path.basename(path) if runtime is not None else path

    @classmethod
    def acquire(cls, path: str, guest: GuestDomain, *, runtime: RuntimeDir | None = None) -> InstanceLock:
        """The lock, or :class:`AlreadyServed`. A lock handed over by the previous image of this
        process (``$XEN_VHOST_MASTER_LOCK_FD``) is taken as it is."""
        where = cls(-1, path, runtime)
        inherited = where._inherited()
        if inherited is not None:
            return inherited
        for _ in range(_LOCK_ATTEMPTS):
            fd = where._open(os.O_RDWR | os.O_CREAT)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise DaemonError(f"{path}: not a regular file")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AlreadyServed(guest, pid) from None
            except BaseException:  # flock's other errors (ENOLCK, EINTR): no lock, no fd left open
                os.close(fd)
                raise
            if where._same_file(fd):  # not unlinked by an exiting holder between open and flock
                lock = cls(fd, path, runtime)
                lock._write_pid()
                return lock
            os.close(fd)
        raise DaemonError(f"{path}: the lock file keeps being replaced")

    def _open(self, flags: int) -> int:
        if self._runtime is not None:
            return self._runtime.open_file(self._name, flags, 0o644)
        return os.open(self._name, flags | _FILE_FLAGS, 0o644)

    def _inherited(self) -> InstanceLock | None:
        text = os.environ.pop(ENV_LOCK_FD, None)
        if text is None or not text.isdigit():
            return None
        fd = int(text)
        if not self._same_file(fd):
            with contextlib.suppress(OSError):
                os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: the same open file
        except OSError:
            os.close(fd)
            return None
        os.set_inheritable(fd, False)
        lock = type(self)(fd, self.path, self._runtime)
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
        if self._same_file(self.fd):
            with contextlib.suppress(OSError):
                os.unlink(self._name, dir_fd=self._runtime.fd if self._runtime is not None else None)
        os.close(self.fd)
        self.fd = -1

    def _same_file(self, fd: int) -> bool:
        try:
            a = os.fstat(fd)
            b = os.stat(self._name, dir_fd=self._runtime.fd if self._runtime is not None else None,
                        follow_symlinks=False)
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
