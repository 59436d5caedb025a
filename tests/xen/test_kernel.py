"""The real kernel object on ordinary fds (no Xen needed), and the user-memory helpers that the
simulated drivers use."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from xen_vhost_master.xen.abi import PrivcmdIoctl
from xen_vhost_master.xen.kernel import PROT_READ, RealKernel, address_of, copy_from_user, copy_to_user


def test_real_kernel_mmap_read_write_and_readonly_views(no_fd_leak: None) -> None:
    k = RealKernel()
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8192)
        with k.mmap(fd, 8192) as m:
            m.view()[4096:4100] = b"abcd"
        with k.mmap(fd, 8192, PROT_READ) as ro:
            v = ro.view()
            assert bytes(v[4096:4100]) == b"abcd" and v.readonly
            del v
        assert os.pread(fd, 4, 4096) == b"abcd"
    finally:
        os.close(fd)


def test_real_kernel_ioctl_on_a_non_xen_fd_is_enotty(no_fd_leak: None) -> None:
    k = RealKernel()
    fd = k.open("/dev/null")
    try:
        with pytest.raises(OSError) as ei:
            k.ioctl(fd, PrivcmdIoctl.HYPERCALL, bytearray(48))
        assert ei.value.errno == errno.ENOTTY
    finally:
        k.close(fd)


def test_user_memory_copies_fault_cleanly() -> None:
    buf = ctypes.create_string_buffer(b"0123456789")
    assert copy_from_user(ctypes.addressof(buf), 10) == b"0123456789"
    copy_to_user(ctypes.addressof(buf) + 2, b"xy")
    assert buf.raw[:10] == b"01xy456789"
    for bad in (0, 8, 1 << 47):
        with pytest.raises(OSError) as ei:
            copy_from_user(bad, 4)
        assert ei.value.errno == errno.EFAULT
        with pytest.raises(OSError) as ei:
            copy_to_user(bad, b"x")
        assert ei.value.errno == errno.EFAULT
    ba = bytearray(b"hello")
    assert copy_from_user(address_of(ba), 5) == b"hello"
    assert address_of(None) == 0 and address_of(1234) == 1234


def test_real_kernel_ioctl_out_fields_land_in_every_kind_of_argument(no_fd_leak: None) -> None:
    """FIONREAD (asm-generic/ioctls.h: writes an int): the answer lands in place whether the
    argument is a ctypes structure, array or simple value (fcntl.ioctl), a bytearray or a bare
    address (libc's ioctl); an error is the driver's errno either way."""
    import termios

    class _Count(ctypes.Structure):
        _fields_ = [("n", ctypes.c_int)]

    k = RealKernel()
    r, w = os.pipe()
    try:
        os.write(w, b"12345")
        st, arr, one, ba = _Count(-1), (ctypes.c_int * 1)(-1), ctypes.c_int(-1), bytearray(4)
        for arg in (st, arr, one, ba):
            assert k.ioctl(r, termios.FIONREAD, arg) == 0
        assert (st.n, arr[0], one.value, int.from_bytes(ba, "little")) == (5, 5, 5, 5)
        raw = ctypes.c_int(-1)
        assert k.ioctl(r, termios.FIONREAD, ctypes.addressof(raw)) == 0 and raw.value == 5
        for arg2 in (_Count(), None, ctypes.addressof(raw)):
            with pytest.raises(OSError) as ei:
                k.ioctl(r, termios.TCGETS, arg2)  # a pipe is no terminal
            assert ei.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as ei:
            k.ioctl(r, termios.FIONREAD, 8)  # a bad address: EFAULT, not a crash
        assert ei.value.errno == errno.EFAULT
    finally:
        os.close(r)
        os.close(w)


def test_real_kernel_prepared_ioctl_is_made_again_with_its_argument_as_it_is_then(no_fd_leak: None) -> None:
    """prepare_ioctl (the IOREQ loop's NOTIFY): each call is the ioctl again, the answer landing
    in the same argument; a bare address or none goes through libc as ioctl does."""
    import termios

    k = RealKernel()
    r, w = os.pipe()
    try:
        count = ctypes.c_int(-1)
        again = k.prepare_ioctl(r, termios.FIONREAD, count)
        os.write(w, b"12345")
        assert again() == 0 and count.value == 5
        os.write(w, b"678")
        assert again() == 0 and count.value == 8
        assert k.read(r, 3) == b"123" and k.write(w, b"9") == 1  # (os.read and os.write themselves)
        assert again() == 0 and count.value == 6
        raw = ctypes.c_int(-1)
        assert k.prepare_ioctl(r, termios.FIONREAD, ctypes.addressof(raw))() == 0 and raw.value == 6
        with pytest.raises(OSError) as ei:
            k.prepare_ioctl(r, termios.TCGETS, count)()  # a pipe is no terminal
        assert ei.value.errno == errno.ENOTTY
    finally:
        os.close(r)
        os.close(w)
