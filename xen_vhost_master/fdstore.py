"""Back-end connections that outlive the daemon's process: sd_notify(3)'s file descriptor store.

A guest whose virtio-fs is mounted keeps its FUSE session inside the one vhost-user connection the
back-end serves; a restarted daemon must go on with that connection, not open a new one. So each
device's connection is kept outside the process (``sd_pid_notify_with_fds(3)``: ``FDSTORE=1``,
``FDNAME=``, the fds as SCM_RIGHTS) by a holder, and handed back to the next process as systemd
hands stored fds back (``sd_listen_fds(3)``: fds from 3 on, ``LISTEN_FDS``, ``LISTEN_FDNAMES``,
``LISTEN_PID``). Two holders, one protocol: systemd (``FileDescriptorStoreMax=`` in the unit) and
the dispatcher (``watch --spawn``, dispatcher.py). A SIGHUP handover re-executes the same process
and passes the same fds the same way.

Per device (``dev<devid>.<what>``):

* ``conn``: the vhost-user socket; ``chan``: our end of the back-end channel (SET_BACKEND_REQ_FD);
* ``meta``: a memfd holding :class:`SessionMeta` (what was negotiated, which rings run) and the
  device's driver-visible state (``virtio_mmio.snapshot``), each rewritten in place whenever it
  changes: current whenever the process dies, unlike ``state.json``, written a moment later;
* ``shadow``: the shadow data path's memfd (the back-end keeps mapping it; DPDK keeps its old
  mapping of a region whose geometry did not change, so the same file must be handed again);
* ``inflight``: the area of inflight I/O tracking (vhost-user.rst "Inflight I/O tracking",
  GET_INFLIGHT_FD), its shape in the record: a back-end that restarts, before or after the
  daemon, gets it back (SET_INFLIGHT_FD) and submits again what its predecessor left in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import NoReturn, Protocol

from .log import say

__all__ = [
    "ENV_PASS_FDS",
    "FD_KINDS",
    "Kept",
    "Keeper",
    "SessionMeta",
    "exec_with_fds",
    "group_by_device",
    "kept_name",
    "take_listen_fds",
]

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3)
MAX_LISTEN_FDS = 256  # more than any guest's devices need; beyond it the variables are refused
META_SIZE = 4096  # one page: rewritten with one pwrite(2)
SNAPSHOT_SIZE = 3 * 4096  # the device's snapshot, after the record
META_VERSION = 1
FD_KINDS = ("conn", "chan", "meta", "shadow", "inflight")
# The dispatcher's trampoline (``python -m xen_vhost_master.fdstore``): "name=fd:name=fd" of the
# fds it was given (pass_fds), placed at 3.. with LISTEN_* before the instance's image runs.
ENV_PASS_FDS = "XEN_VHOST_MASTER_PASS_FDS"

log = logging.getLogger("xen_vhost_master.fdstore")


class Keeper(Protocol):
    """Where a device's connection is kept (:class:`~xen_vhost_master.sd_notify.Notifier`)."""

    def store_fds(self, name: str, fds: Sequence[int]) -> bool: ...

    def remove_fds(self, name: str) -> None: ...


def kept_name(devid: int, what: str) -> str:
    return f"dev{devid}.{what}"


@dataclass
class SessionMeta:
    """What a new process needs to take a device's back-end connection over, besides its fds."""

    socket: str  # the back-end socket path the connection was made to
    features: int  # GET_FEATURES
    protocol_features: int  # in force
    backend_protocol_features: int  # GET_PROTOCOL_FEATURES
    queue_num: int | None
    max_mem_slots: int | None
    channel: bool  # SET_BACKEND_REQ_FD was sent
    num_queues: int  # as the device uses them
    running: list[int] = field(default_factory=list)  # rings started on the connection (not stopped since)
    sizes: list[int] = field(default_factory=list)  # their sizes (QueueNum), in the same order
    # the kept inflight area's GET_INFLIGHT_FD answer: mmap_size, mmap_offset, num_queues, queue_size
    inflight: list[int] | None = None
    # [queue, GET_VRING_BASE's answer] of each ring a handover stopped (none once rings run again)
    stopped: list[list[int]] = field(default_factory=list)
    version: int = META_VERSION

    def encode(self) -> bytes:
        data = json.dumps(asdict(self), separators=(",", ":")).encode()
        if len(data) > META_SIZE:
            raise ValueError(f"session record of {len(data)} bytes exceeds {META_SIZE}")
        return data.ljust(META_SIZE, b" ")

    @classmethod
    def decode(cls, data: bytes) -> SessionMeta:
        """ValueError naming what is wrong for anything but a record :meth:`encode` wrote."""
        try:
            raw = json.loads(data.rstrip(b" \0") or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a session record ({e})") from None
        if not isinstance(raw, dict) or raw.get("version") != META_VERSION:
            raise ValueError("not a session record of this version")
        ints = ("features", "protocol_features", "backend_protocol_features", "num_queues")
        optional = ("queue_num", "max_mem_slots")
        if not isinstance(raw.get("socket"), str) or not isinstance(raw.get("channel"), bool) \
                or any(isinstance(raw.get(k), bool) or not isinstance(raw.get(k), int) for k in ints) \
                or any(raw.get(k) is not None and not isinstance(raw.get(k), int) for k in optional) \
                or not isinstance(raw.get("running"), list) \
                or not all(isinstance(i, int) and 0 <= i < raw["num_queues"] for i in raw["running"]) \
                or not isinstance(raw.get("sizes", []), list) \
                or not all(isinstance(n, int) and 0 < n <= 0x8000 for n in raw.get("sizes", [])) \
                or not _inflight_shape(raw.get("inflight")) \
                or not _stopped_rings(raw.get("stopped", []), raw["num_queues"]):
            raise ValueError("session record malformed")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ValueError(f"session record malformed ({e})") from None

    def write(self, fd: int) -> None:
        os.pwrite(fd, self.encode(), 0)

    @classmethod
    def read(cls, fd: int) -> SessionMeta:
        return cls.decode(os.pread(fd, META_SIZE, 0))


def _stopped_rings(value: object, num_queues: int) -> bool:
    """A list of [queue, ring index] pairs, each queue once, within ``num_queues``."""
    if not isinstance(value, list):
        return False
    queues = set()
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or any(isinstance(n, bool) or not isinstance(n, int) for n in pair) \
                or not 0 <= pair[0] < num_queues or not 0 <= pair[1] <= 0xFFFF or pair[0] in queues:
            return False
        queues.add(pair[0])
    return True


def _inflight_shape(value: object) -> bool:
    """None, or four non-negative integers (an inflight area's mmap_size, mmap_offset,
    num_queues, queue_size)."""
    return value is None or isinstance(value, list) and len(value) == 4 and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 63 for n in value)


def new_meta_fd() -> int:
    fd = os.memfd_create("xen-vhost-session", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, META_SIZE + SNAPSHOT_SIZE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_snapshot(fd: int, state: Mapping[str, object] | None) -> None:
    """The device's driver-visible state next to the session record (None: none to resume)."""
    data = json.dumps(state, separators=(",", ":")).encode() if state is not None else b""
    if len(data) > SNAPSHOT_SIZE:
        data = b""  # (a device this large resumes from state.json)
    os.pwrite(fd, data.ljust(SNAPSHOT_SIZE, b" "), META_SIZE)


def read_snapshot(fd: int) -> dict[str, object] | None:
    """What :func:`write_snapshot` left (None if nothing, or not an object)."""
    try:
        data = os.pread(fd, SNAPSHOT_SIZE, META_SIZE).rstrip(b" \0")
        state = json.loads(data) if data else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


@dataclass
class Kept:
    """One device's connection as handed back: its fds (this object's until taken or closed)."""

    devid: int
    conn: int
    meta: int
    chan: int | None = None
    shadow: int | None = None
    inflight: int | None = None

    def close(self) -> None:
        for fd in (self.conn, self.meta, self.chan, self.shadow, self.inflight):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.conn = self.meta = -1
        self.chan = self.shadow = self.inflight = None

    def check(self) -> SessionMeta:
        """The session record, once the fds are of the right kinds (ValueError saying which is not)."""
        if not stat.S_ISSOCK(os.fstat(self.conn).st_mode):
            raise ValueError("the stored connection is not a socket")
        sock = socket.socket(fileno=os.dup(self.conn))
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError("the stored connection is not an AF_UNIX stream socket")
        finally:
            sock.close()
        if self.chan is not None and not stat.S_ISSOCK(os.fstat(self.chan).st_mode):
            raise ValueError("the stored back-end channel is not a socket")
        for what, fd in (("session record", self.meta), ("shadow memory", self.shadow),
                         ("inflight area", self.inflight)):
            if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"the stored {what} is not a memory file")
        return SessionMeta.read(self.meta)


def take_listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, int]:
    """The fds handed to this process (``sd_listen_fds_with_names(3)``), by name; the variables
    are removed from the environment (children must not take them), every fd gets FD_CLOEXEC. A
    malformed hand-back is logged in one line and its fds are closed: the daemon then connects
    afresh."""
    env = os.environ if environ is None else environ
    pid, count, names = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None), env.pop("LISTEN_FDNAMES", None)
    if count is None:
        return {}
    if pid != str(os.getpid()):
        log.warning("LISTEN_FDS=%s is for pid %s, not this process (%d): ignored", count, pid, os.getpid())
        return {}
    if not count.isascii() or not count.isdigit() or not 0 < int(count) <= MAX_LISTEN_FDS:
        log.error("stored fds refused: LISTEN_FDS=%r is not a count of 1..%d", count, MAX_LISTEN_FDS)
        return {}
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    labels = names.split(":") if names is not None else []
    if len(labels) != len(fds):
        log.error("stored fds refused: LISTEN_FDNAMES names %d fd(s), LISTEN_FDS says %d: closing them",
                  len(labels), len(fds))
        _close_open(fds)
        return {}
    taken: dict[str, int] = {}
    for name, fd in zip(labels, fds, strict=True):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as e:
            log.error("stored fd %d (%s) unusable: %s", fd, name, e.strerror or e)
            continue
        if name in taken:
            log.error("stored fd %d: name %r handed back twice: closing the second", fd, name)
            os.close(fd)
            continue
        taken[name] = fd
    return taken


def _close_open(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def group_by_device(named: Mapping[str, int]) -> tuple[dict[int, Kept], list[str]]:
    """Stored fds grouped per device (``dev<devid>.<kind>``); what cannot be used is closed and
    named in the second list (one reason each) for the caller to log."""
    parts: dict[int, dict[str, int]] = {}
    problems: list[str] = []
    for name, fd in named.items():
        dev, _, kind = name.partition(".")
        devid = dev[3:]
        if not dev.startswith("dev") or not devid.isascii() or not devid.isdigit() or kind not in FD_KINDS:
            problems.append(f"stored fd {name!r}: not a name this daemon stores: closed")
            os.close(fd)
            continue
        parts.setdefault(int(devid), {})[kind] = fd
    kept: dict[int, Kept] = {}
    for number, got in parts.items():
        if "conn" not in got or "meta" not in got:
            problems.append(f"device {number}: stored fds {sorted(got)} lack the connection or its record: closed")
            _close_open(list(got.values()))
            continue
        kept[number] = Kept(number, got["conn"], got["meta"], got.get("chan"), got.get("shadow"), got.get("inflight"))
    return kept, problems


def exec_with_fds(argv: Sequence[str], named: Sequence[tuple[str, int]], *, keep_env: Sequence[str] = ()) -> NoReturn:
    """Replace this process's image with ``argv``, handing it ``named`` fds as systemd does
    (from fd 3 on, ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``). ``keep_env``: variables
    naming another fd the new image inherits (e.g. the instance lock's), moved out of the way and
    updated. Raises OSError if the exec fails."""
    n = len(named)
    base = SD_LISTEN_FDS_START + n + 16
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for _, fd in named]
    for var in keep_env:
        text = os.environ.get(var, "")
        if text.isdigit():
            moved = fcntl.fcntl(int(text), fcntl.F_DUPFD_CLOEXEC, base)
            os.set_inheritable(int(text), False)
            os.set_inheritable(moved, True)
            os.environ[var] = str(moved)
    for i, fd in enumerate(high):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    if n:
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(n),
                          LISTEN_FDNAMES=":".join(name for name, _ in named))
    os.execv(argv[0], list(argv))


def trampoline() -> NoReturn:
    """``python -m xen_vhost_master.fdstore ARGS``: the dispatcher's way to hand stored fds to a
    restarted instance, whose pid it cannot know before the fork: place them (``$ENV_PASS_FDS``)
    and execute ``python -m xen_vhost_master ARGS``."""
    named: list[tuple[str, int]] = []
    for item in filter(None, os.environ.pop(ENV_PASS_FDS, "").split(":")):
        name, _, fd = item.rpartition("=")
        if name and fd.isdigit():
            named.append((name, int(fd)))
    try:
        exec_with_fds([sys.executable, "-m", "xen_vhost_master", *sys.argv[1:]], named)
    except OSError as e:
        say(f"cannot execute {sys.executable}: {e}")
        raise SystemExit(75) from None


if __name__ == "__main__":
    trampoline()
