"""L2 back-end API, device side: subclass :class:`VhostUserDevice` to write a device in Python.

The server (:mod:`vhost_user.aio.server`) owns the protocol; the device answers a few
questions (features, config) and reacts to vring life-cycle calls:

* ``vring_started(vring)`` — the ring has addresses, a size and a kick fd, and memory is
  mapped; ``vring.gpa_desc/gpa_avail/gpa_used`` are translated to guest-physical addresses.
* ``handle_kick(vring)`` — the front-end kicked an enabled, started ring (the eventfd has
  already been read). Process buffers, then :meth:`Vring.call` to interrupt the driver.
* ``vring_stopped(vring)`` — GET_VRING_BASE: stop using the ring; the server answers with
  :attr:`Vring.last_avail_idx`.

Memory: :attr:`VhostUserDevice.memory` (a :class:`~vhost_user.memory.GuestMemory`) with
``view(gpa, length) -> memoryview``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from ..memory import GuestMemory, XenMapper
from ..wire.enums import ProtocolFeatures, VirtioFeatures
from ..wire.payloads import VringAddr

__all__ = ["Vring", "VhostUserDevice", "DEFAULT_BACKEND_PROTOCOL_FEATURES"]

log = logging.getLogger("vhost_user.aio.device")

P = ProtocolFeatures
DEFAULT_BACKEND_PROTOCOL_FEATURES = (
    P.MQ | P.REPLY_ACK | P.CONFIG | P.CONFIGURE_MEM_SLOTS | P.RESET_DEVICE | P.STATUS | P.BACKEND_REQ
)
del P


class Vring:
    """State of one virtqueue as the back-end sees it."""

    def __init__(self, index: int, memory: GuestMemory) -> None:
        self.index = index
        self.memory = memory
        self.num = 0
        self.base = 0  # SET_VRING_BASE
        self.addr: VringAddr | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False
        self.gpa_desc = self.gpa_avail = self.gpa_used = 0
        self.queue: Any = None  # a device may keep its SplitQueueDevice here
        self.inflight: Any = None  # InflightQueue (SET_INFLIGHT_FD), given to split_queue()
        self.event_idx = False

    @property
    def last_avail_idx(self) -> int:
        """The next avail index the device will read (GET_VRING_BASE answer)."""
        if self.queue is not None and hasattr(self.queue, "last_avail_idx"):
            return int(self.queue.last_avail_idx) & 0xFFFF
        return self.base & 0xFFFF

    def split_queue(self) -> Any:
        """A :class:`vhost_user.virtqueue.SplitQueueDevice` on this ring (created once per start)."""
        if self.queue is None:
            from ..virtqueue import SplitQueueDevice  # owned by the virtqueue module

            self.queue = SplitQueueDevice(
                self.memory,
                self.num,
                self.gpa_desc,
                self.gpa_avail,
                self.gpa_used,
                event_idx=self.event_idx,
                last_avail_idx=self.base,
                inflight=self.inflight,
            )
        return self.queue

    def drop_queue(self) -> None:
        """Release the ring views of :attr:`queue` (before memory is unmapped) and forget it."""
        queue, self.queue = self.queue, None
        release = getattr(queue, "release", None)
        if release is not None:
            release()

    def call(self) -> None:
        """Signal the call eventfd (used-buffer notification). No-op without a call fd."""
        if self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except BlockingIOError:  # counter saturated: the driver is already notified
                pass

    def set_fd(self, attr: str, fd: int | None) -> None:
        """Replace kick/call/err fd, closing the old one (the server owns these fds)."""
        old = getattr(self, attr)
        if old is not None and old != fd:
            with contextlib.suppress(OSError):
                os.close(old)
        setattr(self, attr, fd)

    def close(self) -> None:
        for attr in ("kick_fd", "call_fd", "err_fd"):
            self.set_fd(attr, None)
        self.drop_queue()
        self.started = False

    def __repr__(self) -> str:
        return f"Vring({self.index}, num={self.num}, started={self.started}, enabled={self.enabled})"


class VhostUserDevice:
    """Base class of a Python vhost-user device. Override what you need.

    Class attributes give the offer: ``device_features`` (virtio bits; the server adds
    VHOST_USER_F_PROTOCOL_FEATURES), ``protocol_features``, ``num_queues``, ``max_mem_slots``.
    """

    device_features: int = VirtioFeatures.VERSION_1
    protocol_features: ProtocolFeatures = DEFAULT_BACKEND_PROTOCOL_FEATURES
    num_queues: int = 1
    max_mem_slots: int = 32

    def __init__(self) -> None:
        self.memory = GuestMemory()
        #: Set to map XEN_MMAP regions (e.g. through /dev/xen/privcmd); the server offers
        #: VHOST_USER_PROTOCOL_F_XEN_MMAP exactly when this is set. Takes ownership of the fd.
        self.xen_mapper: XenMapper | None = None
        self.features = 0  # what the front-end set (SET_FEATURES)
        self.status = 0  # SET_STATUS
        self.server: Any = None  # the BackendServer serving us (set by it)

    # -- negotiation / config -----------------------------------------------------------
    def set_features(self, features: int) -> None:
        self.features = features

    def get_config(self, offset: int, size: int) -> bytes:
        """Device config space bytes ``[offset, offset+size)``; empty bytes = refuse."""
        return b""

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        """Write config space; return False to refuse."""
        return False

    # -- memory -----------------------------------------------------------------------
    def memory_changed(self) -> None:
        """The memory table changed (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG)."""

    # -- vrings -----------------------------------------------------------------------
    def vring_started(self, vring: Vring) -> None:
        """The ring is usable (addresses, size, kick fd, memory)."""

    def vring_stopped(self, vring: Vring) -> None:
        """GET_VRING_BASE stopped the ring; finish with it synchronously."""

    def vring_enabled(self, vring: Vring, enabled: bool) -> None:
        """SET_VRING_ENABLE."""

    def handle_kick(self, vring: Vring) -> None:
        """The front-end kicked the ring (an enabled, started ring)."""

    # -- device ------------------------------------------------------------------------
    def reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER / SET_STATUS(0). The rings are stopped first; after
        SET_STATUS(0) each keeps its position (GET_VRING_BASE may still follow)."""

    def observe(self, event: Any) -> None:
        """Called with every :class:`~vhost_user.events.RequestReceived` before it is handled
        (the recording dummy back-end uses it)."""

    def close(self) -> None:
        """The connection ended; release resources."""
        self.memory.clear()
