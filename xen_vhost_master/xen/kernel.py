"""The one narrow object through which all /dev/xen/* access goes.

The adapters (privcmd, evtchn, gntdev, dm_op, ioreq) take a :class:`Kernel` and never know which
implementation they have:

* :class:`RealKernel` uses os / ``fcntl.ioctl`` (libc's for a bare address) / libc ``mmap`` on a real dom0;
* a simulated host's kernel plays the Linux drivers' part: it receives the same ioctl numbers and
  the same payload bytes (ctypes structs whose user pointers it dereferences with
  copy_from_user/copy_to_user semantics).

Which one a daemon gets is its entry point's choice (``xen_vhost_master/platform.py``), not this
module's.

Errors are :class:`OSError` with the errno the driver answered, exactly as ``fcntl.ioctl`` raises;
the adapters turn them into :class:`~xen_vhost_master.errors.XenError` with the operation's name.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import mmap as _mmap
import os
import threading
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "IoctlArg",
    "Kernel",
    "Mapping",
    "RealKernel",
    "address_of",
    "copy_from_user",
    "copy_to_user",
    "libc_mmap",
    "libc_munmap",
    "PROT_READ",
    "PROT_WRITE",
    "PROT_NONE",
    "MAP_SHARED",
    "MAP_FIXED",
]

PROT_NONE = _mmap.PROT_NONE if hasattr(_mmap, "PROT_NONE") else 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10  # asm-generic/mman-common.h
MAP_NORESERVE = 0x4000  # asm-generic/mman-common.h (x86_64, arm64)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_MAP_FAILED = ctypes.c_void_p(-1).value


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


IoctlArg = ctypes.Structure | ctypes.Array | bytearray | int | None  # type: ignore[type-arg]


def address_of(arg: IoctlArg) -> int:
    """The user virtual address of an ioctl argument (0 for None)."""
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg
    if isinstance(arg, bytearray):
        return ctypes.addressof((ctypes.c_char * len(arg)).from_buffer(arg)) if arg else 0
    return ctypes.addressof(arg)


def _oserror() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """libc ``mmap``; returns the address or raises OSError."""
    res = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if res is None or res == _MAP_FAILED:
        raise _oserror()
    return int(res)


def libc_munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        raise _oserror()


_SMALL_COPY = 256  # ioctl arguments: one per-thread scratch buffer, iovecs built once
_tls = threading.local()


class _Scratch:
    __slots__ = ("buf", "local", "plocal", "premote", "remote", "view")

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(_SMALL_COPY)
        self.view = memoryview(self.buf).cast("B")
        self.local = _iovec(ctypes.addressof(self.buf), 0)
        self.remote = _iovec(0, 0)
        self.plocal, self.premote = ctypes.byref(self.local), ctypes.byref(self.remote)


def copy_from_user(addr: int, length: int) -> bytes:
    """Read ``length`` bytes at a user address of this process; EFAULT (never SIGSEGV) if unmapped.

    Uses process_vm_readv on our own pid, which checks the mapping like the kernel's copy_from_user.
    """
    if length == 0:
        return b""
    if addr == 0:
        raise OSError(14, os.strerror(14))
    if 0 < length <= _SMALL_COPY:
        sc: _Scratch | None = getattr(_tls, "scratch", None)
        if sc is None:
            sc = _tls.scratch = _Scratch()
        sc.local.iov_len = sc.remote.iov_len = length
        sc.remote.iov_base = addr
        if _libc.process_vm_readv(os.getpid(), sc.plocal, 1, sc.premote, 1, 0) != length:
            raise OSError(14, os.strerror(14))
        return sc.view[:length].tobytes()
    buf = ctypes.create_string_buffer(length)
    local = _iovec(ctypes.addressof(buf), length)
    remote = _iovec(addr, length)
    n = _libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != length:
        raise OSError(14, os.strerror(14))
    return buf.raw


def copy_to_user(addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at a user address of this process; EFAULT if unmapped or read-only."""
    length = len(data)
    if length == 0:
        return
    if addr == 0:
        raise OSError(14, os.strerror(14))
    src = ctypes.create_string_buffer(bytes(data), length)
    local = _iovec(ctypes.addressof(src), length)
    remote = _iovec(addr, length)
    n = _libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != length:
        raise OSError(14, os.strerror(14))


class Mapping:
    """A memory mapping made through a :class:`Kernel` (``addr``/``length``/``prot``).

    ``view()`` gives a memoryview of the whole mapping (read-only unless PROT_WRITE). Do not keep
    views after :meth:`close`: the memory is gone (as with any munmap).
    """

    def __init__(self, kernel: Kernel, fd: int, addr: int, length: int, prot: int, offset: int) -> None:
        self.kernel = kernel
        self.fd = fd
        self.addr = addr
        self.length = length
        self.prot = prot
        self.offset = offset
        self.closed = False

    def view(self) -> memoryview:
        if self.closed:
            raise ValueError("mapping is closed")
        mv = memoryview((ctypes.c_char * self.length).from_address(self.addr)).cast("B")
        return mv if self.prot & PROT_WRITE else mv.toreadonly()

    def close(self) -> None:
        if not self.closed:
            self.kernel.munmap(self)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mapping(fd={self.fd}, addr={self.addr:#x}, length={self.length:#x}, prot={self.prot})"


class Kernel(Protocol):
    """open/close/ioctl/mmap/munmap/read/write on device fds, raising OSError(errno)."""

    def open(self, path: str, flags: int = os.O_RDWR) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int: ...

    def prepare_ioctl(self, fd: int, request: int, arg: IoctlArg) -> Callable[[], int]:
        """:meth:`ioctl` of ``fd``, ``request`` and ``arg`` as a call made again and again, with
        ``arg`` as it is then (a hot path's NOTIFY): valid while ``fd`` stays open."""
        ...

    def mmap(
        self, fd: int, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED, offset: int = 0
    ) -> Mapping: ...

    def munmap(self, mapping: Mapping) -> None: ...

    def read(self, fd: int, length: int) -> bytes: ...

    def write(self, fd: int, data: bytes) -> int: ...


class RealKernel:
    """The real thing: /dev/xen/* on a dom0."""

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int:
        """A ctypes argument goes through ``fcntl.ioctl`` (its OUT fields land in it), which costs
        the hot path's every NOTIFY and dm_op half what a ctypes call of libc's ioctl does;
        a bare address (or none) through libc, as fcntl takes an integer only as a C int."""
        if arg is None or isinstance(arg, (int, bytearray)):
            ret = _libc.ioctl(fd, request, address_of(arg) or None)
            if ret < 0:
                raise _oserror()
            return int(ret)
        return int(fcntl.ioctl(fd, request, arg, True))

    def prepare_ioctl(self, fd: int, request: int, arg: IoctlArg) -> Callable[[], int]:
        """A ctypes argument's ioctl is ``fcntl.ioctl`` itself, prepared: no Python frame between
        the caller (the IOREQ loop's NOTIFY) and the kernel."""
        if arg is None or isinstance(arg, (int, bytearray)):
            return functools.partial(self.ioctl, fd, request, arg)
        return functools.partial(fcntl.ioctl, fd, request, arg, True)

    def mmap(
        self, fd: int, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED, offset: int = 0
    ) -> Mapping:
        addr = libc_mmap(0, length, prot, flags, fd, offset)
        return Mapping(self, fd, addr, length, prot, offset)

    def munmap(self, mapping: Mapping) -> None:
        libc_munmap(mapping.addr, mapping.length)
        mapping.closed = True

    # os.read and os.write themselves: the IOREQ loop's evtchn read and unmask, prepared with
    # functools.partial (xen/evtchn.py), then reach the kernel with no Python frame between.
    read = staticmethod(os.read)
    write = staticmethod(os.write)

