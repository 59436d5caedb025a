"""``xen-vhost-master watch``: start one instance per guest that has virtio devices.

Runs in the back-end domain (``--backend-domid``, default 0), holds no guest memory and no IOREQ
server. It watches libxl's back-end directories ``/local/domain/<backend>/backend/virtio`` and
``.../backend/virtio_disk`` (children ``<domid>/<devid>``), ``@introduceDomain`` and
``@releaseDomain``, and scans them once at start, so a dispatcher restarted while guests run finds
them again. A guest with at least one device gets one instance, keyed by its NAME
(``/local/domain/<domid>/name``):

* **systemd** (default when /run/systemd/system exists): ``systemctl start
  xen-vhost-master@<escaped name>.service``. The unit is Type=notify, so ``systemctl start``
  returns once the instance sent READY=1 (or failed).
* **spawn** (``--spawn``; no systemd, the real-Xen lab, tests): the dispatcher runs
  ``python -m xen_vhost_master`` itself with a NOTIFY_SOCKET of its own per child (an abstract
  datagram socket; only datagrams whose SCM_CREDENTIALS name the child's pid count), relays the
  child's output (prefixed with the guest's name) or sends it to ``--log-dir``, reaps it, restarts
  it (bounded) if it dies with an error, and on SIGTERM stops every child (SIGTERM, then SIGKILL
  after a bounded wait) and exits 0. It is the instances' file descriptor store, as systemd is
  with ``FileDescriptorStoreMax=`` (fdstore.py): fds a child sends with ``FDSTORE=1`` and
  ``FDNAME=`` are kept per guest (``FDSTOREREMOVE=1`` drops them, at most MAX_STORED_FDS) and
  handed to the guest's next instance after a crash as ``LISTEN_FDS``/``LISTEN_FDNAMES``; they
  are closed once the guest's instance ends cleanly or for good.

**Never missing the guest's first access.** The instance claims a device's window with its IOREQ
server before it says READY. Xen 4.17 libxl (``disk=[...specification=virtio]``) waits up to 10 s
for the back-end's InitWait before it unpauses a new guest; Xen >= 4.18 libxl (``virtio=[...]``,
``skip_attach``) does not wait. So the dispatcher takes a *pause reference* on a domain
(XEN_DOMCTL_pausedomain, ``xen/domctl.py``) as soon as it sees its devices and drops it once the
instance is READY, has failed, or after ``--pause-timeout`` (120 s) at the latest (logged: a guest
is never left paused for good), and when the dispatcher stops. Xen counts pause references, so
libxl's own reference and ours add up: the guest runs only when both are gone. libxl writes the
devices while its own reference still holds the new domain and drops it only after the remaining
creation steps; the dispatcher reacts to the xenstore watch within milliseconds. On Xen >= 4.18
that is a race the dispatcher wins in practice, not by construction: if libxl unpauses first, the
guest runs for that moment, long before a kernel reaches its virtio probe. A domain that is already
served (an instance answers for it) is not paused. If Xen refuses every known domctl interface
version, the dispatcher says so once per domain and serves the guest anyway.

**Reboots.** ``xl reboot`` and ``on_reboot = "restart"`` destroy the domain and create a new one
with the same name and a NEW domid. The old instance exits 0 by itself once its domain is gone.
The new domid is served even if the old instance has not exited yet when the new domain appears:

* spawn: the dispatcher waits for the old child's exit (an event: its ``wait()``), bounded by
  ``--reboot-grace`` (30 s); past it, a child whose domain no longer exists is stopped.
* systemd: the unit is asked which domain it serves (``state.json`` in its runtime directory,
  written by the instance as soon as it has attached). If the unit is active for another domid,
  the dispatcher waits for it to become inactive, re-checking ``systemctl is-active`` at each
  ``@releaseDomain`` and on a bounded backoff (0.25 s doubling to 2 s), for ``--reboot-grace`` at
  most; then, if the domid it serves no longer exists, ``systemctl stop`` ends it. Only then
  ``systemctl start`` (a unit still active would make it a no-op). A unit serving another LIVE
  domain of that name (``on_reboot = "rename-restart"`` keeps the old one) is left alone and
  logged: one name, one instance.

Either way the new domain's pause reference is held meanwhile, so the guest waits for its device
model instead of probing nothing.

**Bad input.** A device directory whose name is not a number, a domain without a name, a name
systemd cannot use as an instance name: logged once each, that guest (or device) skipped; the
instance itself skips bad devices. A domain that dies while its instance starts: its pause
reference is dropped (ESRCH is fine) and it is forgotten. An instance that fails before READY:
logged with its exit status, pause dropped, and tried again only when that guest's set of devices
in xenstore changes, MAX_ATTEMPTS times per domain at most. One that exits 75 (EX_TEMPFAIL: e.g.
xenstored or a hypercall failing on a loaded dom0) is started again after TEMPFAIL_RETRY seconds,
doubling, within the same MAX_ATTEMPTS, the domain still held paused: the guest does not boot
without the devices its instance was about to serve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import errno
import fcntl
import itertools
import logging
import os
import shlex
import signal
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from .errors import PERMANENT_EXIT_CODES, ConfigError, HostError, XenError
from .eventloop import run
from .fdstore import ENV_PASS_FDS
from .instance import RUNTIME_ROOT, read_state_file, runtime_dir, untrusted
from .names import instance_unit, path_name
from .platform import Platform, announce, platform_from_env
from .log import setup_logging
from .sd_notify import Notifier
from .xen.dom0 import check_dom0
from .xen.domctl import Domctl, DomctlInterfaceUnknown
from .xen.privcmd import PrivCmd
from .xen.xenstore import XenbusState, XenstoreClient, XenstoreError, XenstoreNotFound, XsTransaction, XsWatch

__all__ = ["Dispatcher", "WatchOptions", "instance_argv", "main", "parse_args"]

log = logging.getLogger("xen_vhost_master.dispatcher")


def _signalled_after_end(sig: int) -> None:
    log.info("%s after the end: already stopped", signal.Signals(sig).name)

KINDS = ("virtio", "virtio_disk")
PAUSE_TIMEOUT = 120.0  # never hold a guest longer than this waiting for its instance
OLD_INSTANCE_GRACE = 30.0  # how long a rebooted guest's old instance may take to exit by itself
STOP_TIMEOUT = 20.0  # SIGTERM → SIGKILL for a spawned instance (the unit's TimeoutStopSec)
MAX_ATTEMPTS = 3  # instance starts per domain
TEMPFAIL_RETRY = 1.0  # s before the next start of an instance that exited 75 before READY (doubling)
MAX_STORED_FDS = 64  # fds kept per guest (systemd's FileDescriptorStoreMax= of the unit is 64 too)
MAX_FDS_PER_MESSAGE = 16
# Exit statuses of an instance (errors.ExitCode, sysexits.h); with errors.PERMANENT_EXIT_CODES,
# not restarted by us either.
EXIT_OK, EXIT_ALREADY_SERVED, EXIT_TEMPFAIL, EXIT_CONFIG = 0, 73, 75, 78

_notify_names = itertools.count(1)


class Outcome(enum.Enum):
    READY = "ready"  # the instance for this domid is READY
    SERVED = "served"  # it already was, or another process serves the guest (holds its lock)
    FAILED = "failed"  # the instance ended, or the start failed, before READY
    TEMPFAIL = "failed, exit 75"  # it exited 75 (EX_TEMPFAIL) before READY: worth another start
    BLOCKED = "blocked"  # the name's instance serves another domain that is still alive


@dataclass(frozen=True)
class WatchOptions:
    backend_domid: int = 0
    spawn: bool = False
    instance_args: tuple[str, ...] = ()
    log_dir: str | None = None
    runtime_root: str = RUNTIME_ROOT
    pause_timeout: float = PAUSE_TIMEOUT
    stop_timeout: float = STOP_TIMEOUT
    reboot_grace: float = OLD_INSTANCE_GRACE
    systemctl: str = "systemctl"


def instance_argv(opt: WatchOptions, name: str, domid: int) -> list[str]:
    """The command line of a spawned instance for guest ``name``, now domain ``domid``.

    The instance is told the domain by its id (``--domain=ID``, the instance's own "ID" form):
    it takes the name from xenstore and keys everything on it (runtime directory, lock, back-end
    sockets, per-guest configuration) as it would for ``--domain=NAME``, but it cannot end up
    serving another domain of that name (a reboot between this spawn and its start): it finds
    ``domid`` gone and exits 69. A runtime root other than the default is passed as the
    instance's ``--runtime-dir`` (its back-end sockets then default to that directory too)."""
    argv = [sys.executable, "-m", "xen_vhost_master", f"--domain={domid}"]
    if opt.runtime_root != RUNTIME_ROOT:
        argv.append(f"--runtime-dir={runtime_dir(name, opt.runtime_root)}")
    if opt.backend_domid:
        argv.append(f"--backend-domid={opt.backend_domid}")
    return argv + list(opt.instance_args)


class Host(Protocol):
    """What a launcher asks of the dispatcher."""

    async def domain_exists(self, domid: int) -> bool: ...

    async def wait_release(self, timeout: float) -> None: ...

    def instance_exited(self, name: str, domid: int, pid: int, status: int, was_ready: bool) -> None: ...


class Launcher(Protocol):
    async def is_served(self, name: str, domid: int) -> bool: ...

    async def serve(self, name: str, domid: int) -> tuple[Outcome, str]: ...

    async def stop_all(self) -> None: ...


def _served_domid(opt: WatchOptions, name: str) -> int | None:
    """The domid an instance says it serves (``state.json`` in its runtime directory), if any."""
    found = read_state_file(os.path.join(runtime_dir(name, opt.runtime_root), "state.json"))
    state = found[0] if found is not None else None
    domid = state.get("domid") if isinstance(state, dict) else None
    return domid if isinstance(domid, int) else None


def _lock_holder(opt: WatchOptions, name: str) -> str | None:
    """Who holds the guest's instance lock (``<runtime>/lock``, an exclusive flock with the
    holder's pid in it), or None if nobody does."""
    try:
        fd = os.open(os.path.join(runtime_dir(name, opt.runtime_root), "lock"),
                     os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "another process"
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the shared lock if we got it
    return None


# --- spawn mode ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Child:
    name: str
    domid: int
    proc: asyncio.subprocess.Process
    notify: socket.socket
    ready: asyncio.Future[None]
    exited: asyncio.Future[int]
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class SpawnLauncher:
    """Runs the instances as children of the dispatcher."""

    def __init__(self, opt: WatchOptions, host: Host) -> None:
        self.opt = opt
        self.host = host
        self.children: dict[str, _Child] = {}  # by guest name
        self.stored: dict[str, dict[str, int]] = {}  # guest name → FDNAME → fd (the file descriptor store)
        self._stopping = False

    def _drop_store(self, name: str) -> None:
        for fd in self.stored.pop(name, {}).values():
            os.close(fd)

    async def is_served(self, name: str, domid: int) -> bool:
        child = self.children.get(name)
        if child is not None and not child.exited.done():
            return child.domid == domid  # the guest's lock is our child's
        return _lock_holder(self.opt, name) is not None

    async def serve(self, name: str, domid: int) -> tuple[Outcome, str]:
        old = self.children.get(name)
        if old is not None and old.domid == domid and not old.exited.done():
            return Outcome.SERVED, f"pid {old.proc.pid} serves it"
        if old is not None and not old.exited.done():
            blocked = await self._retire(old, domid)
            if blocked:
                return Outcome.BLOCKED, blocked
        holder = _lock_holder(self.opt, name)
        if holder is not None:
            return Outcome.SERVED, f"{holder} holds its instance lock"
        child = await self._spawn(name, domid)
        waiters: set[asyncio.Future[Any]] = {child.ready, child.exited}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if child.ready in done:
            return Outcome.READY, f"pid {child.proc.pid}"
        status = child.exited.result()
        if status == EXIT_ALREADY_SERVED:
            return Outcome.SERVED, "the instance found it already served"
        if status == EXIT_TEMPFAIL:
            return Outcome.TEMPFAIL, f"exited with status {status} (a temporary failure) before READY"
        return Outcome.FAILED, f"exited with status {status} before READY"

    async def _retire(self, old: _Child, domid: int) -> str | None:
        """Wait for the instance of the guest's previous domain to exit; None once it has."""
        log.info("%s: domain %d appeared while pid %d still serves domain %d: waiting for it to exit",
                 old.name, domid, old.proc.pid, old.domid)
        try:
            await asyncio.wait_for(asyncio.shield(old.exited), self.opt.reboot_grace)
            return None
        except TimeoutError:
            pass
        if await self.host.domain_exists(old.domid):
            return f"pid {old.proc.pid} still serves domain {old.domid}, which is alive"
        log.warning("%s: pid %d still serves domain %d, gone for %.0f s: stopping it",
                    old.name, old.proc.pid, old.domid, self.opt.reboot_grace)
        await self._stop([old])
        return None

    async def _spawn(self, name: str, domid: int) -> _Child:
        loop = asyncio.get_running_loop()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        out: int | IO[bytes] | None = None
        spawned = False
        try:
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            address = f"\0xen-vhost-master-watch/{os.getpid()}/{next(_notify_names)}"
            notify.bind(address)
            env = dict(os.environ, NOTIFY_SOCKET="@" + address[1:])
            if self.opt.log_dir:
                out = self._log_file(name)
            argv = instance_argv(self.opt, name, domid)
            stored = self.stored.get(name, {})
            if stored:
                # handed back as systemd does (LISTEN_FDS from fd 3 on, LISTEN_PID the child's):
                # placed by the trampoline once the child's pid is its own
                argv[1:3] = ["-m", "xen_vhost_master.fdstore"]
                env[ENV_PASS_FDS] = ":".join(f"{fdname}={fd}" for fdname, fd in stored.items())
                log.info("%s: handing %d stored fd(s) to its next instance: %s", name, len(stored),
                         " ".join(sorted(stored)))
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, pass_fds=tuple(stored.values()),
                stdout=out if out is not None else asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            spawned = True
        finally:
            if not spawned:  # the exec failed or was cancelled: the child's socket goes too
                notify.close()
            if out is not None and not isinstance(out, int):
                out.close()
        child = _Child(name, domid, proc, notify, loop.create_future(), loop.create_future())
        self.children[name] = child
        loop.add_reader(notify.fileno(), self._notified, child)
        if proc.stdout is not None:
            child.tasks.append(asyncio.ensure_future(self._relay(child, proc.stdout)))
        child.tasks.append(asyncio.ensure_future(self._reap(child)))
        log.info("%s: started instance for domain %d: pid %d", name, domid, proc.pid)
        return child

    def _log_file(self, name: str) -> IO[bytes]:
        """``<log-dir>/<name>.log``, appended to: opened relative to the directory, never through
        a symbolic link, and only if it is a regular file."""
        assert self.opt.log_dir
        where = os.open(self.opt.log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(f"{path_name(name)}.log",
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o640,
                         dir_fd=where)
        finally:
            os.close(where)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{self.opt.log_dir}/{path_name(name)}.log is not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "ab")
        except BaseException:  # fstat/fdopen's OSError, or a cancellation: the fd is not handed out
            os.close(fd)
            raise

    def _notified(self, child: _Child) -> None:
        """sd_notify datagrams of ``child`` (sd_notify(3)); others on the socket are ignored."""
        while True:
            try:
                data, anc, flags, _addr = child.notify.recvmsg(
                    4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * MAX_FDS_PER_MESSAGE), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fds: list[int] = []
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4])
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(cdata) >= 12:
                    pid = struct.unpack("iII", cdata[:12])[0]
            if pid != child.proc.pid:
                log.debug("%s: ignoring a notification from pid %s", child.name, pid)
                self._close(fds)
                continue
            fields = dict(line.partition("=")[::2] for line in data.decode(errors="replace").splitlines())
            if fields.get("READY") == "1" and not child.ready.done():
                child.ready.set_result(None)
            if "STATUS" in fields:
                log.debug("%s: %s", child.name, fields["STATUS"])
            if fields.get("FDSTOREREMOVE") == "1":
                self._unstore(child.name, fields.get("FDNAME", ""))
            if fields.get("FDSTORE") == "1" or fds:
                self._store(child.name, fields, fds, truncated=bool(flags & socket.MSG_CTRUNC))

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    def _store(self, name: str, fields: dict[str, str], fds: list[int], *, truncated: bool) -> None:
        """``FDSTORE=1``: keep ``fds`` under ``FDNAME`` (one fd a name: a name stored again is
        replaced); anything else that came with fds is refused, the fds closed."""
        fdname = fields.get("FDNAME", "stored")
        store = self.stored.setdefault(name, {})
        problem = ""
        if fields.get("FDSTORE") != "1":
            problem = "fds sent without FDSTORE=1"
        elif truncated:
            problem = f"more than {MAX_FDS_PER_MESSAGE} fds in one message"
        elif len(fds) != 1:
            problem = f"{len(fds)} fds under one name (this store keeps one a name)"
        elif not fdname.isascii() or not fdname.isprintable() or ":" in fdname or len(fdname) > 255:
            problem = f"FDNAME {fdname!r} is not a valid name"
        elif fdname not in store and len(store) >= MAX_STORED_FDS:
            problem = f"the store holds {MAX_STORED_FDS} fds already"
        if problem:
            log.warning("%s: fd store: %s: refused", name, problem)
            self._close(fds)
            return
        old = store.get(fdname)
        store[fdname] = fds[0]
        if old is not None:
            os.close(old)
        log.debug("%s: fd store: %s kept", name, fdname)

    def _unstore(self, name: str, fdname: str) -> None:
        fd = self.stored.get(name, {}).pop(fdname, None)
        if fd is not None:
            os.close(fd)

    async def _relay(self, child: _Child, stream: asyncio.StreamReader) -> None:
        """The child's output, line by line, prefixed with its guest's name. Read to the end even
        if our stderr fails, so that the child never blocks on a full pipe."""
        prefix = f"[{child.name}] ".encode(errors="replace")
        out: IO[bytes] | None = sys.stderr.buffer
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream's limit: take what is there
                line = await stream.read(65536)
            if not line:
                return
            if out is not None:
                try:
                    out.write(prefix + line)
                    out.flush()
                except OSError:
                    out = None

    async def _reap(self, child: _Child) -> None:
        status = await child.proc.wait()
        others = [t for t in child.tasks if t is not asyncio.current_task()]
        if others:
            _, late = await asyncio.wait(others, timeout=5.0)  # the relay reaches the pipe's end
            for task in late:
                task.cancel()
        asyncio.get_running_loop().remove_reader(child.notify.fileno())
        child.notify.close()
        if self.children.get(child.name) is child:
            del self.children[child.name]
        was_ready = child.ready.done()
        if status == EXIT_OK or status in PERMANENT_EXIT_CODES or self._stopping:
            self._drop_store(child.name)  # nothing of its to resume (EXIT_ALREADY_SERVED: never its to keep)
        level = logging.INFO if status in (EXIT_OK, EXIT_ALREADY_SERVED) else logging.WARNING
        log.log(level, "%s: instance for domain %d (pid %d) exited with status %d", child.name, child.domid,
                child.proc.pid, status)
        child.exited.set_result(status)
        if not self._stopping:
            self.host.instance_exited(child.name, child.domid, child.proc.pid, status, was_ready)

    async def _stop(self, children: list[_Child]) -> None:
        """SIGTERM, up to ``--stop-timeout`` s for them to exit, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [c for c in children if not c.exited.done()]
            if not alive:
                return
            for c in alive:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)
            _, pending = await asyncio.wait([c.exited for c in alive],
                                            timeout=self.opt.stop_timeout if sig == signal.SIGTERM else 5.0)
            if pending and sig == signal.SIGTERM:
                log.warning("%d instance(s) still running %.0f s after SIGTERM: killing them", len(pending),
                            self.opt.stop_timeout)

    async def stop_all(self) -> None:
        self._stopping = True
        children = list(self.children.values())
        if children:
            log.info("stopping %d instance(s)", len(children))
        await self._stop(children)
        for name in list(self.stored):
            self._drop_store(name)


# --- systemd mode ----------------------------------------------------------------------------------


class SystemdLauncher:
    """``systemctl start xen-vhost-master@<name>.service``; systemd owns the instances."""

    def __init__(self, opt: WatchOptions, host: Host) -> None:
        self.opt = opt
        self.host = host
        self._procs: set[asyncio.subprocess.Process] = set()

    async def _systemctl(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            self.opt.systemctl, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        self._procs.add(proc)
        try:
            out, err = await proc.communicate()
        finally:
            self._procs.discard(proc)
        assert proc.returncode is not None
        return proc.returncode, (out + err).decode(errors="replace").strip()

    async def _active_state(self, unit: str) -> str:
        _rc, text = await self._systemctl("is-active", unit)
        return text.splitlines()[0] if text else "unknown"

    async def is_served(self, name: str, domid: int) -> bool:
        state = await self._active_state(instance_unit(name))
        return state in ("active", "reloading") and _served_domid(self.opt, name) == domid

    async def serve(self, name: str, domid: int) -> tuple[Outcome, str]:
        unit = instance_unit(name)
        state = await self._active_state(unit)
        if state in ("active", "reloading", "activating", "deactivating") and _served_domid(self.opt, name) != domid:
            outcome = await self._retire(unit, name, domid)
            if outcome is not None:
                return outcome
        rc, text = await self._systemctl("start", unit)
        if rc == 0:
            return Outcome.READY, unit
        _rc, show = await self._systemctl("show", "-p", "Result", "-p", "ExecMainStatus", unit)
        facts = dict(line.partition("=")[::2] for line in show.splitlines())
        failed = Outcome.TEMPFAIL if facts.get("ExecMainStatus") == str(EXIT_TEMPFAIL) else Outcome.FAILED
        return failed, (f"systemctl start {unit} failed (status {rc}: {text or '-'}; result "
                        f"{facts.get('Result', '?')}, exit status {facts.get('ExecMainStatus', '?')})")

    async def _retire(self, unit: str, name: str, domid: int) -> tuple[Outcome, str] | None:
        """Wait until ``unit`` no longer serves a previous domain of ``name``; None: go and start it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opt.reboot_grace
        backoff = 0.25
        served = _served_domid(self.opt, name)
        log.info("%s: domain %d appeared while %s is still %s for %s: waiting for it to end", name, domid, unit,
                 await self._active_state(unit), "an earlier domain" if served is None else f"domain {served}")
        while loop.time() < deadline:
            await self.host.wait_release(min(backoff, max(deadline - loop.time(), 0.0)))
            backoff = min(backoff * 2, 2.0)
            if await self._active_state(unit) in ("inactive", "failed", "unknown"):
                return None
            if _served_domid(self.opt, name) == domid:
                return None
        served = _served_domid(self.opt, name)
        if served is None:
            log.warning("%s: %s is still active and does not say which domain it serves: leaving it", name, unit)
            return Outcome.SERVED, f"{unit} is active"
        if await self.host.domain_exists(served):
            return Outcome.BLOCKED, f"{unit} serves domain {served}, which is alive"
        log.warning("%s: %s still serves domain %d, gone for %.0f s: stopping it", name, unit, served,
                    self.opt.reboot_grace)
        rc, text = await self._systemctl("stop", unit)
        if rc != 0:
            return Outcome.FAILED, f"systemctl stop {unit} failed: {text}"
        return None

    async def stop_all(self) -> None:
        """The instances are units of their own and stay; only our systemctl clients end (their
        jobs go on in systemd)."""
        for proc in list(self._procs):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in list(self._procs):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)


# --- the dispatcher --------------------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    SERVED = "served"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(eq=False)
class _Guest:
    domid: int
    name: str | None = None
    state: _State = _State.NEW
    attempts: int = 0
    failed_devices: frozenset[tuple[str, str]] | None = None
    task: asyncio.Task[None] | None = None
    dirty: bool = False


class _PauseRefs:
    """Our pause references on guests, each bounded by a timer."""

    def __init__(self, domctl: Domctl | None, bound: float) -> None:
        self.domctl = domctl
        self.bound = bound
        self.unknown = False  # every domctl interface version was refused
        self.held: dict[int, asyncio.TimerHandle] = {}
        # called with (domid, False) once a reference is dropped: the dispatcher keeps a record of
        # those it holds in xenstore (written as it takes one), so that its successor drops what a
        # killed dispatcher left
        self.record: Callable[[int, bool], object] = lambda domid, held: None

    def adopt(self, domid: int, name: str) -> None:
        """A reference a previous dispatcher took and did not drop (it was killed): ours now,
        dropped like one we took (READY, failure, the bound)."""
        if domid not in self.held:
            self.held[domid] = asyncio.get_running_loop().call_later(self.bound, self._expired, domid, name)
            log.warning("%s: domain %d: taking over the pause reference a previous dispatcher left", name, domid)

    def take(self, domid: int, name: str) -> bool:
        if domid in self.held:
            return True
        if self.domctl is None or self.unknown:
            if self.unknown:
                log.error("cannot pause domain %d (domctl interface not known): the guest may probe before "
                          "its windows are claimed", domid)
            return False
        try:
            self.domctl.pause(domid)
        except DomctlInterfaceUnknown:
            self.unknown = True
            log.error("cannot pause domain %d (domctl interface not known): the guest may probe before its "
                      "windows are claimed", domid)
            return False
        except XenError as e:
            if e.errno == errno.ESRCH:
                log.info("%s: domain %d is already gone", name, domid)
            else:
                log.warning("%s: cannot pause domain %d: %s", name, domid, e)
            return False
        self.held[domid] = asyncio.get_running_loop().call_later(self.bound, self._expired, domid, name)
        return True

    def _expired(self, domid: int, name: str) -> None:
        log.warning("%s: no READY from the instance of domain %d within %.0f s: dropping the pause "
                    "reference (the guest runs; accesses to unclaimed windows find no device)", name, domid, self.bound)
        self.drop(domid, "timed out")

    def drop(self, domid: int, why: str) -> None:
        timer = self.held.pop(domid, None)
        if timer is None:
            return
        timer.cancel()
        assert self.domctl is not None
        try:
            self.domctl.unpause(domid)
        except XenError as e:
            if e.errno == errno.ESRCH:
                log.info("domain %d is gone: no pause reference to drop", domid)
                self.record(domid, False)
            else:
                log.warning("cannot unpause domain %d: %s", domid, e)
            return
        self.record(domid, False)
        log.info("domain %d: pause reference dropped (%s)", domid, why)

    def drop_all(self, why: str) -> None:
        for domid in list(self.held):
            self.drop(domid, why)


class Dispatcher:
    def __init__(self, opt: WatchOptions, platform: Platform, *, notifier: Notifier | None = None) -> None:
        self.opt = opt
        self.notifier = notifier or Notifier()
        self.platform = platform
        self.kernel = platform.kernel
        self.launcher: Launcher = SpawnLauncher(opt, self) if opt.spawn else SystemdLauncher(opt, self)
        self.xs: XenstoreClient | None = None
        self.privcmd: PrivCmd | None = None
        self.pauses = _PauseRefs(None, opt.pause_timeout)
        self.guests: dict[int, _Guest] = {}
        self._said: set[str] = set()  # problems already logged
        self._unnamed: set[int] = set()  # domains with devices but no name yet
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._released = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._release_task: asyncio.Task[None] | None = None
        self._release_again = False

    # --- life ------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        status = 0
        pumps: list[asyncio.Task[None]] = []
        try:
            self._open_domctl()
            self.xs = await self.platform.open_xenstore()
            await self._recover_pauses()
            self.pauses.record = lambda domid, held: self._spawn(self._record_pause(domid, held))
            root = f"/local/domain/{self.opt.backend_domid}/backend"
            watches = [(await self.xs.watch(f"{root}/{kind}", token=f"backend-{kind}"), kind) for kind in KINDS]
            watches += [(await self.xs.watch(w, token=w), w) for w in ("@introduceDomain", "@releaseDomain")]
            pumps = [asyncio.ensure_future(self._pump(w, what)) for w, what in watches]
            for kind in KINDS:
                self._spawn(self._rescan(kind))
            mode = "spawn" if self.opt.spawn else "systemd"
            self.notifier.ready(f"watching {root}/{{{','.join(KINDS)}}} ({mode} mode)")
            log.info("watching %s/{%s} for guests with virtio devices (%s mode)", root, ",".join(KINDS), mode)
            stop = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait([*pumps, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for task in done:
                if task is not stop:
                    task.result()
        except XenstoreError as e:
            log.error("xenstore: %s", e)
            status = 75  # EX_TEMPFAIL: systemd restarts us
        except OSError as e:
            log.error("%s", e)
            status = 75
        finally:
            self.notifier.stopping()
            await self._teardown(pumps)
            for sig in (signal.SIGTERM, signal.SIGINT):  # a stop asked for now finds nothing left to stop
                loop.add_signal_handler(sig, _signalled_after_end, sig)
            self.notifier.close()
        return status

    def _signalled(self, sig: int) -> None:
        log.info("%s: stopping", signal.Signals(sig).name)
        self._stop.set()

    @property
    def _pause_record(self) -> str:
        """Where the pause references we hold are recorded (``<dir>/<domid>``): xenstore lives as
        long as the host does, whatever happens to this process."""
        return f"/local/domain/{self.opt.backend_domid}/xen-vhost-master-watch/paused"

    async def _record_pause(self, domid: int, held: bool) -> None:
        assert self.xs is not None
        path = f"{self._pause_record}/{domid}"
        try:
            if held:
                await self.xs.write(path, "")
            else:
                with contextlib.suppress(XenstoreNotFound):
                    await self.xs.rm(path)
        except XenstoreError as e:
            log.warning("xenstore %s: %s", path, e)

    async def _recover_pauses(self) -> None:
        """Pause references a killed dispatcher left: adopted for domains that still exist (their
        guest is evaluated as usual and the reference dropped once it is served), forgotten for
        the others."""
        assert self.xs is not None
        for entry in await self._directory(self._pause_record):
            if entry.isdigit() and await self.domain_exists(int(entry)):
                name = await self._read(f"/local/domain/{entry}/name") or "?"
                self.pauses.adopt(int(entry), name)
            else:
                with contextlib.suppress(XenstoreError):
                    await self.xs.rm(f"{self._pause_record}/{entry}")

    def _open_domctl(self) -> None:
        try:
            self.privcmd = PrivCmd(self.kernel)
        except XenError as e:
            log.error("cannot open privcmd (%s): guests will not be paused until their instance is READY", e)
            return
        self.pauses.domctl = Domctl(self.privcmd)

    async def _teardown(self, pumps: list[asyncio.Task[None]]) -> None:
        self._stopping = True
        tasks = [*pumps, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        await self.launcher.stop_all()
        self.pauses.drop_all("dispatcher stopping")
        if self._tasks:  # the records of those drops
            await asyncio.wait(list(self._tasks), timeout=STOP_TIMEOUT)
        if self.xs is not None:
            await self.xs.close()
        if self.pauses.domctl is not None:
            self.pauses.domctl.close()
        if self.privcmd is not None:
            self.privcmd.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error: %r", task.exception(), exc_info=task.exception())

    def _say_once(self, level: int, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.log(level, "%s", message)

    # --- Host (for the launchers) ----------------------------------------------------------------

    async def domain_exists(self, domid: int) -> bool:
        assert self.xs is not None
        return await self.xs.exists(f"/local/domain/{domid}")

    async def wait_release(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout)

    def instance_exited(self, name: str, domid: int, pid: int, status: int, was_ready: bool) -> None:
        guest = self.guests.get(domid)
        if not was_ready or self._stopping or guest is None or guest.state is not _State.SERVED:
            return  # an exit before READY is the start's outcome; see _evaluate
        if status == EXIT_OK or status in PERMANENT_EXIT_CODES:
            guest.state = _State.STOPPED
            return
        if guest.attempts >= MAX_ATTEMPTS:
            guest.state = _State.FAILED
            log.error("%s: instance of domain %d failed %d times: not starting it again", name, domid, guest.attempts)
            return
        guest.state = _State.NEW
        self._consider(domid)

    # --- xenstore events -------------------------------------------------------------------------

    async def _pump(self, watch: XsWatch, what: str) -> None:
        async for ev in watch:
            if watch.overflowed:
                watch.overflowed = False
                log.warning("xenstore watch %s overflowed: rescanning", watch.path)
                for kind in KINDS:
                    self._spawn(self._rescan(kind))
                self._on_release()
                continue
            if what == "@releaseDomain":
                self._on_release()
            elif what == "@introduceDomain":
                for domid in list(self._unnamed):
                    self._consider(domid)
            else:
                self._on_backend_event(what, ev.path)

    def _on_backend_event(self, kind: str, path: str) -> None:
        root = f"/local/domain/{self.opt.backend_domid}/backend/{kind}"
        if not path.startswith(root + "/"):
            self._spawn(self._rescan(kind))
            return
        self._consider_dir(kind, path[len(root) + 1:].split("/", 1)[0])

    def _consider_dir(self, kind: str, entry: str) -> None:
        if not entry.isdigit() or int(entry) >= 0x7FF0:
            self._say_once(logging.ERROR, f"xenstore backend/{kind}/{entry}: not a domain id: ignored")
            return
        self._consider(int(entry))

    async def _rescan(self, kind: str) -> None:
        for entry in await self._directory(f"/local/domain/{self.opt.backend_domid}/backend/{kind}"):
            self._consider_dir(kind, entry)

    def _on_release(self) -> None:
        self._released.set()
        self._released = asyncio.Event()
        if self._release_task is not None and not self._release_task.done():
            self._release_again = True
            return
        self._release_task = self._spawn(self._forget_gone())

    async def _forget_gone(self) -> None:
        while True:
            self._release_again = False
            for domid in list(self.guests):
                if await self.domain_exists(domid):
                    continue
                guest = self.guests.pop(domid)
                self._unnamed.discard(domid)
                log.info("%s: domain %d is gone", guest.name or "?", domid)
                self.pauses.drop(domid, "domain gone")
            if not self._release_again:
                return

    # --- one guest -------------------------------------------------------------------------------

    def _consider(self, domid: int) -> None:
        if self._stopping:
            return
        guest = self.guests.setdefault(domid, _Guest(domid))
        if guest.task is not None and not guest.task.done():
            guest.dirty = True
            return
        guest.task = self._spawn(self._evaluate_loop(guest))

    async def _evaluate_loop(self, guest: _Guest) -> None:
        while True:
            guest.dirty = False
            try:
                await self._evaluate(guest)
            except XenstoreError as e:
                log.warning("domain %d: xenstore: %s", guest.domid, e)
            if not guest.dirty or self.guests.get(guest.domid) is not guest:
                return

    async def _devices(self, domid: int) -> frozenset[tuple[str, str]]:
        """The guest's live virtio devices: (kind, devid), malformed and closing ones left out."""
        found = set()
        for kind in KINDS:
            base = f"/local/domain/{self.opt.backend_domid}/backend/{kind}/{domid}"
            for devid in await self._directory(base):
                if not devid.isdigit():
                    self._say_once(logging.ERROR, f"domain {domid}: xenstore {base}/{devid}: device id is not a "
                                                  "number: ignored")
                    continue
                state = await self._read(f"{base}/{devid}/state")
                online = await self._read(f"{base}/{devid}/online")
                if state is None or state in (str(int(XenbusState.CLOSING)), str(int(XenbusState.CLOSED))) or online == "0":
                    continue  # being removed, or not a complete libxl device
                found.add((kind, devid))
        return frozenset(found)

    async def _answer_initwait(self, name: str, domid: int, devices: frozenset[tuple[str, str]]) -> None:
        """While our pause reference holds the guest, say InitWait for each device still
        Initialising, on its instance's behalf. Xen 4.17 libxl gives a ``virtio_disk`` back-end
        10 s to reach InitWait and fails ``xl create`` otherwise; an instance starting on a loaded
        dom0 (a Python start-up under TCG: several seconds) may need longer. No guest access can
        reach the window before the instance claims it: the guest does not run until the instance
        is READY (its windows claimed), when the pause reference is dropped. The instance writes
        InitWait again itself when it claims the window."""
        assert self.xs is not None
        answered = []
        for kind, devid in sorted(devices):
            path = f"/local/domain/{self.opt.backend_domid}/backend/{kind}/{domid}/{devid}"

            async def body(tx: XsTransaction, path: str = path) -> bool:
                try:
                    state = await tx.read(f"{path}/state")
                except XenstoreNotFound:
                    return False  # removed meanwhile: nothing to answer for
                if state.strip(b"\0") != str(int(XenbusState.INITIALISING)).encode():
                    return False
                await tx.write(f"{path}/state", str(int(XenbusState.INIT_WAIT)))
                return True

            try:
                if await self.xs.transaction(body):
                    answered.append(f"{kind}/{devid}")
            except XenstoreError as e:
                log.warning("%s: domain %d: cannot write %s/state: %s", name, domid, path, e)
        if answered:
            log.info("%s: domain %d is held paused: InitWait written for %s on its instance's behalf",
                     name, domid, ", ".join(answered))

    async def _evaluate(self, guest: _Guest) -> None:
        domid = guest.domid
        devices = await self._devices(domid)
        if not devices or guest.state in (_State.STARTING, _State.SERVED, _State.STOPPED):
            return
        if domid == self.opt.backend_domid:
            self._say_once(logging.ERROR, f"domain {domid} is this back-end domain: its own devices are not served")
            return
        name = await self._read(f"/local/domain/{domid}/name")
        if not name:
            self._unnamed.add(domid)
            self._say_once(logging.WARNING, f"domain {domid} has virtio devices but no name in xenstore: "
                                            "not served until it has one")
            return
        self._unnamed.discard(domid)
        try:
            instance_unit(name)
        except ValueError as e:
            self._say_once(logging.ERROR, f"domain {domid}: {e}: not served")
            return
        guest.name = name
        if guest.state is _State.FAILED:
            if devices == guest.failed_devices:
                log.debug("%s: domain %d: devices unchanged since its instance failed: not starting it", name, domid)
                return
            if guest.attempts >= MAX_ATTEMPTS:
                self._say_once(logging.ERROR, f"{name}: domain {domid}: instance failed {guest.attempts} times: "
                                              "not starting it again")
                return
        guest.state = _State.STARTING
        guest.attempts += 1
        held = False
        outcome, detail = Outcome.FAILED, "start interrupted"
        try:
            if not await self.launcher.is_served(name, domid):
                held = self.pauses.take(domid, name)
                if held:
                    # recorded before anything else: a dispatcher killed from now on leaves the
                    # reference to its successor
                    await self._record_pause(domid, True)
                    log.info("%s: holding a pause reference on domain %d until its instance is READY", name, domid)
                    await self._answer_initwait(name, domid, devices)
            async with self._name_locks.setdefault(name, asyncio.Lock()):
                log.info("%s: domain %d has %d virtio device(s): starting its instance", name, domid, len(devices))
                outcome, detail = await self.launcher.serve(name, domid)
                while outcome is Outcome.TEMPFAIL and guest.attempts < MAX_ATTEMPTS and not self._stopping:
                    # (xenstored or a hypercall busy on a loaded dom0): started again shortly, the
                    # guest still held paused, rather than left to run without its devices
                    delay = TEMPFAIL_RETRY * 2 ** (guest.attempts - 1)
                    log.warning("%s: instance for domain %d: %s; trying again in %g s%s (%d attempt(s) left)",
                                name, domid, detail, delay, ", the domain held paused" if held else "",
                                MAX_ATTEMPTS - guest.attempts)
                    await asyncio.sleep(delay)
                    if not await self.domain_exists(domid):
                        break
                    guest.attempts += 1
                    outcome, detail = await self.launcher.serve(name, domid)
            if outcome in (Outcome.READY, Outcome.SERVED):
                guest.state = _State.SERVED
                log.info("%s: domain %d is served (%s)", name, domid, "READY" if outcome is Outcome.READY else detail)
        except OSError as e:
            outcome, detail = Outcome.FAILED, f"cannot start it: {e}"
        finally:
            if guest.state is _State.STARTING:
                guest.state, guest.failed_devices = _State.FAILED, devices
            # When the dispatcher stops, pauses are dropped after the instances are stopped.
            if (held or domid in self.pauses.held) and not self._stopping:
                self.pauses.drop(domid, "instance READY" if outcome is Outcome.READY else outcome.value)
        if guest.state is _State.SERVED:
            return
        if not await self.domain_exists(domid):
            guest.state = _State.STOPPED
            log.info("%s: domain %d went away while its instance started (%s)", name, domid, detail)
            return
        left = MAX_ATTEMPTS - guest.attempts
        log.error("%s: instance for domain %d: %s; %s", name, domid, detail,
                  f"tried again when its devices in xenstore change ({left} attempt(s) left)" if left else "giving up")

    # --- xenstore helpers ------------------------------------------------------------------------

    async def _directory(self, path: str) -> list[str]:
        assert self.xs is not None
        try:
            return await self.xs.directory(path)
        except XenstoreNotFound:
            return []

    async def _read(self, path: str) -> str | None:
        assert self.xs is not None
        try:
            return await self.xs.read_str(path)
        except XenstoreNotFound:
            return None


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="xen-vhost-master watch",
        description="Start one xen-vhost-master instance per guest with virtio devices (a dispatcher).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--spawn", action="store_true",
                      help="run the instances as children (the default when /run/systemd/system is absent)")
    mode.add_argument("--systemd", action="store_true",
                      help="'systemctl start xen-vhost-master@<name>.service' (the default under systemd)")
    p.add_argument("--backend-domid", type=int, default=0, help="the domain this runs in (default 0)")
    p.add_argument("--instance-args", default="", metavar="ARGS",
                   help="spawn mode: extra arguments for every instance (one string, shell-style quoting)")
    p.add_argument("--log-dir", metavar="DIR", help="spawn mode: each instance's output to DIR/<name>.log "
                                                     "(default: this process's stderr, prefixed with [name])")
    p.add_argument("--runtime-root", default=RUNTIME_ROOT, metavar="DIR",
                   help=f"where instances keep their runtime directories (default {RUNTIME_ROOT})")
    p.add_argument("--pause-timeout", type=float, default=PAUSE_TIMEOUT, metavar="SECONDS",
                   help=f"longest a new guest is held paused waiting for its instance (default {PAUSE_TIMEOUT:.0f})")
    p.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT, metavar="SECONDS",
                   help=f"spawn mode: how long a stopped instance may take before SIGKILL (default {STOP_TIMEOUT:.0f})")
    p.add_argument("--reboot-grace", type=float, default=OLD_INSTANCE_GRACE, metavar="SECONDS",
                   help="how long a rebooted guest's old instance may take to exit by itself before it is "
                        f"stopped (default {OLD_INSTANCE_GRACE:.0f})")
    p.add_argument("--systemctl", default="systemctl", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> WatchOptions:
    if not 0 <= args.backend_domid < 0x7FF0:
        raise ValueError(f"--backend-domid {args.backend_domid}: not a domain id")
    if not 0 < args.pause_timeout <= 3600:
        raise ValueError(f"--pause-timeout {args.pause_timeout}: between 0 and 3600 seconds")
    for flag, value in (("--stop-timeout", args.stop_timeout), ("--reboot-grace", args.reboot_grace)):
        if not 0 < value <= 3600:
            raise ValueError(f"{flag} {value}: between 0 and 3600 seconds")
    if args.log_dir:
        try:
            st = os.stat(args.log_dir, follow_symlinks=False)
        except OSError as e:
            raise ValueError(f"--log-dir {args.log_dir}: {e.strerror or e}") from None
        # the instances' logs are created there: a directory another user may write is refused
        problem = untrusted(st, os.geteuid(), parent=True)
        if problem is not None:
            raise ValueError(f"--log-dir {args.log_dir}: {problem}")
    spawn = args.spawn or (not args.systemd and not os.path.isdir("/run/systemd/system"))
    return WatchOptions(
        backend_domid=args.backend_domid, spawn=spawn, instance_args=tuple(shlex.split(args.instance_args)),
        log_dir=args.log_dir, runtime_root=args.runtime_root, pause_timeout=args.pause_timeout,
        stop_timeout=args.stop_timeout, reboot_grace=args.reboot_grace, systemctl=args.systemctl,
    )


def main(argv: list[str] | None = None, platform: Platform | None = None) -> int:
    """``platform``: what to run on; None = the one the environment asks for, looked up once. The
    instances it spawns inherit the environment, and with it the same request."""
    args = parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        opt = options(args)
        platform = platform if platform is not None else platform_from_env()
    except (ValueError, ConfigError) as e:
        log.error("configuration error: %s", e)
        return EXIT_CONFIG
    announce(platform, log)
    try:
        check_dom0(platform.kernel)
    except HostError as e:
        log.error("%s", e)
        return int(e.code)
    except XenError as e:
        log.error("%s", e)
        return 75
    notifier = Notifier()  # takes NOTIFY_SOCKET out of the environment the instances inherit

    async def go() -> int:
        return await Dispatcher(opt, platform, notifier=notifier).run()

    return run(go())
