"""What every /dev/xen/* adapter shares: an fd opened through the kernel object, ioctls whose
failures become :class:`~xen_vhost_master.errors.XenError` naming the operation, and closing."""

from __future__ import annotations

import errno
import os
from typing import Any

from xen_vhost_master.errors import XenError
from xen_vhost_master.xen.kernel import Kernel

__all__ = ["XenDeviceFile"]


class XenDeviceFile:
    """One open Xen device node (``fd`` given: adopt an already open one, e.g. received over SCM_RIGHTS)."""

    def __init__(self, kernel: Kernel, path: str, flags: int = os.O_RDWR, *, fd: int | None = None) -> None:
        self.kernel = kernel
        try:
            self.fd = kernel.open(path, flags) if fd is None else fd
        except OSError as exc:
            raise XenError(f"open {path}", exc.errno or errno.EIO) from None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            self.kernel.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, op: str, request: int, arg: object) -> int:
        try:
            return self.kernel.ioctl(self.fd, request, arg)  # type: ignore[arg-type]
        except OSError as exc:
            raise XenError(op, exc.errno or errno.EIO) from None
