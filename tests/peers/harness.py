"""Start, watch and always stop the real vhost-user peers the tests run against.

The command lines are the ones of docs/peers.md:

* qemu-storage-daemon (vhost-user-blk export of a raw file or a null-co device; it listens),
* dpdk-testpmd with net_vhost (``client=0``: it listens; ``client=1``: it connects to us),
* linux.uml, whose virtio_uml driver is a real Linux vhost-user front-end (it connects).

Rules this module enforces:

* every process runs in its own session, so its whole process group can be signalled; stopping
  is SIGTERM to the group, a bounded wait, then SIGKILL, always followed by reaping the leader;
* readiness is observed, never assumed: a listening AF_UNIX socket shows up in /proc/net/unix
  (checked without connecting, which would use up a one-connection peer), or a line appears in
  the peer's log; every wait has a deadline and fails early, with the log tail, if the peer dies;
* the leader is only reaped by :meth:`PeerProcess.stop`, so its pid — the group id — cannot be
  reused while we may still signal the group;
* a peer gets PR_SET_PDEATHSIG=SIGKILL, so even a killed test process leaves none behind
  (start peers from the thread that runs the test, as fixtures and tests do).

Output of each peer goes to ``<name>.log`` in the test's directory (no pipes to drain).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import itertools
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.peers import programs

__all__ = [
    "PeerDied",
    "PeerProcess",
    "Peers",
    "QsdPeer",
    "UmlRun",
    "build_c",
    "require_binary",
    "uml_modules_dir",
    "socket_listening",
    "uml_preload",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "UML_TIMEOUT",
    "TESTPMD_FORWARDING_LOG",
]

log = logging.getLogger(__name__)

#: Peer start-up until its socket listens (qsd ~50 ms, testpmd ~1 s; generous for a loaded 2-CPU box).
READY_TIMEOUT: Final = 15.0
#: SIGTERM → exit, before SIGKILL.
STOP_TIMEOUT: Final = 5.0
#: UML boot (≈1.6 s) + the init script's work + poweroff.
UML_TIMEOUT: Final = 25.0
POLL_INTERVAL: Final = 0.02
#: sun_path is 108 bytes including the NUL; stay clear of it.
MAX_SOCK_PATH: Final = 100
#: /proc/net/unix "Flags" bit __SO_ACCEPTCON: the socket is listening.
_SO_ACCEPTCON: Final = 0x10000

QSD: Final = "qemu-storage-daemon"
TESTPMD: Final = "dpdk-testpmd"
#: Wait for this testpmd line before sending a frame. testpmd 22.11's start_packet_forwarding()
#: prints its forwarding config ("io packet forwarding - ports=..."), then drains every RX queue
#: (flush_fwd_rx_queues: two passes 10 ms apart, the frames are freed, never forwarded), then
#: prints "io packet forwarding packets/burst=..." (rxtx_config_display) and launches the
#: forwarding lcore. A frame sent after the first line can be eaten by the drain (seen under CPU
#: load: port RX 1, forwarded 0); one sent after this line waits in the ring for the lcore.
TESTPMD_FORWARDING_LOG: Final = r"packet forwarding(?: with retry)? packets/burst="
UML: Final = "linux.uml"
UML_MODULES_ROOT: Final = Path("/usr/lib/uml/modules")
UML_INIT: Final = Path(__file__).with_name("uml_init.sh")
#: Preloaded into every linux.uml on x86-64: its FPU state buffer fits no AVX-512 or AMX host (the file says why).
UML_XSTATE: Final = Path(__file__).with_name("uml_xstate.c")

_counter = itertools.count()


_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL us if the test process dies without cleaning up
    (e.g. pytest itself killed), so no peer outlives its test run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


_built: dict[Path, Path] = {}


def build_c(source: Path, *, shared: bool = False) -> Path:
    """``source`` (a C file of tests/peers) compiled once per process with the system's gcc: a
    program, or with ``shared`` a library to preload; the build directory is removed at exit."""
    out = _built.get(source)
    if out is not None and out.exists():
        return out
    cc = require_binary("gcc")
    build = Path(tempfile.mkdtemp(prefix="xvm-peers-cc-"))
    atexit.register(shutil.rmtree, build, True)
    out = build / (source.stem + (".so" if shared else ""))
    flags = ["-shared", "-fPIC"] if shared else []
    done = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-pthread", *flags, "-o", str(out), str(source), "-ldl"],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cc} {source.name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    _built[source] = out
    return out


def uml_preload() -> dict[str, str]:
    """The environment linux.uml runs with: tests/peers/uml_xstate.c preloaded on x86-64 (UML
    runs there only), before whatever LD_PRELOAD the tests run with."""
    if platform.machine() != "x86_64":
        return {}
    return {"LD_PRELOAD": " ".join(filter(None, (str(build_c(UML_XSTATE, shared=True)), os.environ.get("LD_PRELOAD"))))}


class PeerDied(RuntimeError):
    """A peer exited (or never became ready) while a test was waiting for it."""


def require_binary(name: str) -> str:
    """Path of ``name`` (a need of tests/tools/debian-packages.tsv), or stop the test with the
    package that brings it on this Debian release (a failure under `make test`: programs.py)."""
    return programs.require(name)


def uml_modules_dir() -> Path:
    """/usr/lib/uml/modules/<version of linux.uml>, or stop the test (programs.missing)."""
    uml = require_binary(UML)
    out = subprocess.run([uml, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    version = out.strip().splitlines()[-1].strip() if out.strip() else ""
    cand = UML_MODULES_ROOT / version
    if not (cand / "kernel/drivers/block/virtio_blk.ko").exists():
        found = sorted(UML_MODULES_ROOT.glob("*/kernel/drivers/block/virtio_blk.ko"))
        if not found:
            programs.missing(f"no UML virtio_blk.ko under {UML_MODULES_ROOT} (linux.uml says {version!r}): "
                             f"{programs.hint(UML)}")
        cand = found[-1].parents[3]
    return cand


def socket_listening(path: Path | str) -> bool:
    """Is some process listening on the AF_UNIX socket ``path``? (read from /proc/net/unix)"""
    target = str(path)
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f, None)
        for line in f:
            parts = line.split(None, 7)
            if len(parts) == 8 and parts[7].rstrip("\n") == target and int(parts[3], 16) & _SO_ACCEPTCON:
                return True
    return False


class PeerProcess:
    """One started peer: a process group with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=cwd, preexec_fn=_die_with_parent,
            )
        self.pid = self.proc.pid
        self._exit_status: int | None = None
        self.cleanups: list[Callable[[], None]] = []
        log.info("started %s pid %d: %s", name, self.pid, " ".join(self.argv))

    # --- observation ---------------------------------------------------------------------------
    def exit_status(self) -> int | None:
        """The exit status if the leader has exited (without reaping it), else None."""
        if self._exit_status is not None:
            return self._exit_status
        if self.proc.returncode is not None:
            return self.proc.returncode
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return None
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        self._exit_status = code
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _died(self, waiting_for: str) -> PeerDied:
        return PeerDied(f"{self.name} (pid {self.pid}) exited with {self.exit_status()} while waiting for "
                        f"{waiting_for}; log tail:\n{self.log_tail()}")

    def _check(self, cond: Callable[[], object], what: str, allow_exit: bool) -> object:
        got = cond()
        if got:
            return got
        if not allow_exit and self.exit_status() is not None:
            got = cond()  # it may have logged the line and exited in between
            if got:
                return got
            raise self._died(what)
        return None

    def wait_for(self, cond: Callable[[], object], what: str, timeout: float, allow_exit: bool = False) -> object:
        """Poll ``cond`` until truthy (returned), the peer dies (PeerDied) or ``timeout`` (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._check(cond, what, allow_exit)
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} within {timeout} s; log tail:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)

    async def wait_for_async(self, cond: Callable[[], object], what: str, timeout: float,
                             allow_exit: bool = False) -> object:
        """:meth:`wait_for` without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._check(cond, what, allow_exit)
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} within {timeout} s; log tail:\n{self.log_tail()}")
            await asyncio.sleep(POLL_INTERVAL)

    def wait_listening(self, path: Path, timeout: float = READY_TIMEOUT) -> None:
        self.wait_for(lambda: socket_listening(path), f"listening socket {path}", timeout)

    def log_search(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.log_text(), re.MULTILINE)

    def wait_log(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        m = self.wait_for(lambda: self.log_search(pattern), f"log line /{pattern}/", timeout)
        assert isinstance(m, re.Match)
        return m

    async def wait_log_async(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        m = await self.wait_for_async(lambda: self.log_search(pattern), f"log line /{pattern}/", timeout)
        assert isinstance(m, re.Match)
        return m

    async def wait_exit_async(self, timeout: float) -> int:
        status = await self.wait_for_async(
            lambda: self.exit_status() is not None, "exit", timeout, allow_exit=True
        )
        assert status
        code = self.exit_status()
        assert code is not None
        return code

    # --- teardown ------------------------------------------------------------------------------
    def _signal_group(self, sig: signal.Signals) -> None:
        # Safe while the leader is unreaped: its pid (= the group id) cannot be reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the group, wait, SIGKILL, reap. Idempotent; returns the leader's exit status."""
        if self.proc.returncode is None:
            if self.exit_status() is None:
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while self.exit_status() is None and time.monotonic() < deadline:
                    time.sleep(POLL_INTERVAL)
                if self.exit_status() is None:
                    log.warning("%s pid %d ignored SIGTERM for %.1f s: SIGKILL", self.name, self.pid, timeout)
            # Whatever is left of the group (helpers, stragglers) goes too.
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=timeout)
            log.info("stopped %s pid %d: status %s", self.name, self.pid, self.proc.returncode)
        while self.cleanups:
            self.cleanups.pop()()
        return self.proc.returncode


@dataclass
class QsdPeer:
    """A running qemu-storage-daemon vhost-user-blk export."""

    process: PeerProcess
    sock: Path
    image: Path | None  # None for null-co
    size: int
    num_queues: int


@dataclass
class UmlRun:
    """A UML boot driven by tests/peers/uml_init.sh; its verdict lines start with 'UMLT: '."""

    process: PeerProcess

    def verdicts(self) -> list[str]:
        return [ln.split("UMLT: ", 1)[1].strip() for ln in self.process.log_text().splitlines() if "UMLT: " in ln]

    def value(self, key: str) -> str | None:
        for v in self.verdicts():
            if v.startswith(key + " "):
                return v[len(key) + 1 :]
        return None

    async def finish(self, timeout: float = UML_TIMEOUT) -> list[str]:
        """Wait for the init script's DONE line and UML's exit; returns the verdict lines."""
        await self.process.wait_log_async(r"^UMLT: DONE", timeout)
        await self.process.wait_exit_async(timeout)
        return self.verdicts()


class Peers:
    """Starts peers for one test and stops them all, in reverse order, at :meth:`stop_all`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[PeerProcess] = []
        self._short: Path | None = None

    @property
    def sock_dir(self) -> Path:
        """A directory for sockets whose paths fit sun_path (tmp_path itself when it is short)."""
        if len(str(self.base)) + 24 < MAX_SOCK_PATH:
            return self.base
        if self._short is None:
            self._short = Path(tempfile.mkdtemp(prefix="vhp-", dir="/tmp"))
        return self._short

    def sock_path(self, name: str) -> Path:
        path = self.sock_dir / name
        if len(str(path)) >= MAX_SOCK_PATH:
            raise ValueError(f"socket path too long for sun_path: {path}")
        return path

    def start(self, name: str, argv: Sequence[str], **kw: object) -> PeerProcess:
        log_path = self.base / f"{name}-{next(_counter)}.log"
        p = PeerProcess(name, argv, log_path, **kw)  # type: ignore[arg-type]
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for p in reversed(self.started):
            try:
                p.stop()
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(exc)
        self.started.clear()
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)
            self._short = None
        if errors:
            raise errors[0]

    # --- qemu-storage-daemon -------------------------------------------------------------------
    def qsd_raw(self, size: int = 64 << 20, num_queues: int = 1, image: Path | None = None) -> QsdPeer:
        """vhost-user-blk export of a sparse raw file (docs/peers.md §1a), listening; waits until ready."""
        qsd = require_binary(QSD)
        n = next(_counter)
        if image is None:
            image = self.base / f"disk{n}.raw"
            with open(image, "wb") as f:
                f.truncate(size)
        size = image.stat().st_size
        sock = self.sock_path(f"qsd{n}.sock")
        argv = [
            qsd,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", f"type=vhost-user-blk,id=exp1,node-name=disk0,addr.type=unix,addr.path={sock},"
                        f"num-queues={num_queues},writable=on,logical-block-size=512",
        ]
        p = self.start("qsd", argv)
        p.wait_listening(sock)
        return QsdPeer(p, sock, image, size, num_queues)

    def qsd_null(self, size: int = 64 << 20, num_queues: int = 2) -> QsdPeer:
        """vhost-user-blk export of a null-co device (reads zeroes, discards writes)."""
        qsd = require_binary(QSD)
        sock = self.sock_path(f"qsdnull{next(_counter)}.sock")
        argv = [
            qsd,
            "--blockdev", f"driver=null-co,node-name=null0,size={size}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={sock},"
                        f"num-queues={num_queues},writable=on",
        ]
        p = self.start("qsd-null", argv)
        p.wait_listening(sock)
        return QsdPeer(p, sock, None, size, num_queues)

    # --- dpdk-testpmd --------------------------------------------------------------------------
    def testpmd(self, sock: Path | None = None, client: bool = False, queues: int = 1) -> tuple[PeerProcess, Path]:
        """dpdk-testpmd with a net_vhost port (docs/peers.md §1b), both lcores pinned on CPU 0.

        ``client=False``: testpmd listens on ``sock`` (waited for). ``client=True``: testpmd connects
        to ``sock`` (our listener) and retries about once a second; not waited for.
        """
        testpmd = require_binary(TESTPMD)
        n = next(_counter)
        if sock is None:
            sock = self.sock_path(f"testpmd{n}.sock")
        prefix = f"vhp-{os.getpid()}-{n}"
        argv = [
            testpmd, "--no-huge", "-m", "256", "--lcores=0@0,1@0", "--no-pci", f"--file-prefix={prefix}",
            "--vdev", f"net_vhost0,iface={sock},client={int(client)},queues={queues}",
            "--", "--total-num-mbufs=16384", "--port-topology=loop", "--forward-mode=io",
            "--stats-period=30", "--nb-cores=1",
        ]
        p = self.start("testpmd", argv)
        runtime = Path("/var/run/dpdk") / prefix  # DPDK's per-prefix runtime dir (root)
        p.cleanups.append(lambda: shutil.rmtree(runtime, ignore_errors=True))
        if not client:
            p.wait_listening(sock)
        return p, sock

    # --- User-Mode Linux -----------------------------------------------------------------------
    def uml(self, sock: Path, *, mode: str, env: dict[str, str] | None = None, device_id: int = 2,
            mem: str = "128M") -> UmlRun:
        """Boot linux.uml (hostfs root, tests/peers/uml_init.sh as init) with a virtio_uml device
        on ``sock`` (docs/peers.md §4). Does not wait: UML connects to a listening back-end; use
        :meth:`UmlRun.finish`."""
        uml = require_binary(UML)
        modules = uml_modules_dir()
        # uml_init.sh runs the host's own programs (hostfs root)
        require_binary("insmod")
        if mode in ("net", "fio"):
            require_binary({"net": "ip", "fio": "fio"}[mode])
        n = next(_counter)
        uml_dir = self.base / f"uml{n}"
        uml_dir.mkdir()
        if ":" in str(sock) or " " in str(sock):
            raise ValueError(f"virtio_uml.device cannot carry ':' or ' ' in the path: {sock}")
        params = {"UMLT_MODULES": str(modules), "UMLT_MODE": mode, **(env or {})}
        for k, v in params.items():
            if not v or " " in v:
                raise ValueError(f"UML init parameter {k}={v!r} must be non-empty without spaces")
        argv = [
            # loglevel=4: only kernel errors reach the console, so no late printk (e.g. "random: crng
            # init done") can split a verdict line of the init script.
            uml, f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro", "loglevel=4",
            f"init={UML_INIT}", "con=null", "con0=null,fd:1", f"uml_dir={uml_dir}",
            f"virtio_uml.device={sock}:{device_id}",
            *(f"{k}={v}" for k, v in params.items()),
        ]
        # UML keeps its "physical memory" in a file under TMPDIR: keep it in the test directory.
        env_os = {**os.environ, "TMPDIR": str(uml_dir), **uml_preload()}
        return UmlRun(self.start("uml", argv, env=env_os))


@contextlib.contextmanager
def peers_in(base: Path) -> Iterator[Peers]:
    """Context-manager form of the ``peers`` fixture (for scripts)."""
    peers = Peers(base)
    try:
        yield peers
    finally:
        peers.stop_all()
