"""The zero-copy data paths: how guest memory is described to a back-end that maps it itself.

* :class:`FdExport` — regions backed by ordinary shareable fds (memfds). On Xen this is only
  possible with the simulator's labelled ``sim-memfd`` exposure; it is also what a test uses when
  it plays guest with a memfd.
* :class:`XenMmapExport` — XEN_MMAP regions (protocol feature 17): the back-end receives our
  privcmd fd, the domid and the FOREIGN flag, and maps the guest itself.

In both, ``userspace_addr`` equals the guest-physical address, so the ring addresses the driver
wrote into QueueDesc/Driver/Device can be passed to SET_VRING_ADDR unchanged (docs/vhost-user-wire.md §6).
Design: docs/datapath.md §1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vhost_user import MemoryRegion, ProtocolFeatures, XenMemoryRegion, XenMmapFlags

from ..errors import GuestFault
from ..virtio_mmio import F_EVENT_IDX, F_RING_PACKED, QueueConfig
from .base import RingAddresses

__all__ = ["FdExport", "FdRegion", "XenMmapExport", "ask_not_to_notify", "sim_memfd_export"]


class _ZeroCopy:
    """Zero copy: the back-end uses the guest's own rings; notifies and calls pass straight through."""

    packed = True
    direct = True  # the back-end touches guest rings itself: the kernel fast path may relay

    def __init__(self, read_guest: Callable[[int, int], bytes] | None,
                 write_guest: Callable[[int, bytes], None] | None = None) -> None:
        self._kick: dict[int, int] = {}
        self._read_guest = read_guest
        self._write_guest = write_guest
        self._rings: dict[int, tuple[QueueConfig, int]] = {}  # open queue → (its config, features)
        self._bases: dict[int, int] = {}  # resume_at's
        self._log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None

    def new_connection(self) -> None:
        """Guest RAM itself: every connection gets the same regions (same fds, same geometry)."""
        self._bases = {}

    def resume_at(self, bases: Mapping[int, int],
                  log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None) -> None:
        """The back-end of a connection kept from the previous process stopped these rings (queue →
        GET_VRING_BASE's answer): each one's next resume on this connection restarts it there, as
        QEMU's ``cont`` does, when the guest's ring allows it (between its used and avail
        indices); a chain the back-end took and completes later is then not submitted again."""
        self._bases = {i: b & 0xFFFF for i, b in bases.items()}
        self._log = log

    def open_queue(self, queue: QueueConfig, features: int, kick_fd: int, *, resume: bool = False) -> RingAddresses:
        self._kick[queue.index] = kick_fd
        self._rings[queue.index] = (queue, features)
        base = 0
        kept = self._bases.pop(queue.index, None)
        if resume:
            # Without INFLIGHT_SHMFD, QEMU's rule: restart at the used index; whatever was in flight
            # at the lost back-end is submitted again.
            if self._read_guest is None:
                raise GuestFault(queue.device, "cannot resume a ring without access to guest memory")
            base = int.from_bytes(self._read_guest(queue.device + 2, 2), "little")  # used->idx
            if kept is not None:
                avail = int.from_bytes(self._read_guest(queue.driver + 2, 2), "little")  # avail->idx
                if (kept - base) & 0xFFFF <= min((avail - base) & 0xFFFF, queue.num):
                    base = kept
                elif self._log is not None:
                    self._log.warning("queue %d: the back-end stopped at avail index %d, beyond what the guest made "
                                      "available (used index %d, avail index %d): resuming at the used index",
                                      queue.index, kept, base, avail)
        return RingAddresses(queue.desc, queue.driver, queue.device, base)

    def notify(self, index: int) -> None:
        fd = self._kick.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def used(self, index: int) -> bool:
        return True

    def also_used(self) -> list[int]:
        return []  # the back-end interrupts each queue itself

    def close_queue(self, index: int) -> None:
        self._kick.pop(index, None)
        self._rings.pop(index, None)

    def close(self) -> None:
        self._kick.clear()  # the fds (memfd, privcmd) belong to whoever built the export
        self._rings.clear()

    def quiesce(self) -> list[int]:
        """The device is going while its guest runs on and the back-end has stopped its rings
        (it owned their notification suppression until then): ask the driver not to notify any
        open queue again (:func:`ask_not_to_notify`). Returns the queues asked (none without
        guest-memory access)."""
        if self._read_guest is None or self._write_guest is None:
            return []
        return ask_not_to_notify(self._rings, self._read_guest, self._write_guest,
                                 self._log or logging.getLogger(__name__))


def ask_not_to_notify(rings: Mapping[int, tuple[QueueConfig, int]], read_guest: Callable[[int, int], bytes],
                      write_guest: Callable[[int, bytes], None],
                      log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> list[int]:
    """Write into the guest's rings (queue → its config and negotiated features) that its driver
    is not to notify again. Split ring (virtio 1.2 §2.7.10): VIRTQ_USED_F_NO_NOTIFY in the used
    ring's flags, and with EVENT_IDX ``avail_event`` half the index space away from the driver's
    avail idx; packed ring (§2.8.10): the device event suppression structure's flags
    RING_EVENT_FLAGS_DISABLE. A queue whose ring cannot be written (GuestFault, OSError) is logged
    in one line and left. Returns the queues asked."""
    asked = []
    for index, (q, features) in sorted(rings.items()):
        try:
            if features >> F_RING_PACKED & 1:
                write_guest(q.device + 2, (1).to_bytes(2, "little"))
            else:
                write_guest(q.device, (1).to_bytes(2, "little"))
                if features >> F_EVENT_IDX & 1:
                    avail = int.from_bytes(read_guest(q.driver + 2, 2), "little")
                    write_guest(q.device + 4 + 8 * q.num, ((avail + 0x8000) & 0xFFFF).to_bytes(2, "little"))
        except (GuestFault, OSError) as e:
            log.warning("queue %d: cannot ask the driver not to notify: %s", index, e)
            continue
        asked.append(index)
    return asked


@dataclass(frozen=True)
class FdRegion:
    gpa: int
    size: int
    fd: int  # owned by whoever built the export
    offset: int = 0  # of the region's first byte in the fd


class FdExport(_ZeroCopy):
    """Guest RAM banks that are (sim-only) shareable fds: plain vhost-user regions."""

    name = "sim-memfd"
    protocol_features = ProtocolFeatures(0)

    def __init__(self, regions: Sequence[FdRegion], read_guest: Callable[[int, int], bytes] | None = None,
                 write_guest: Callable[[int, bytes], None] | None = None) -> None:
        super().__init__(read_guest, write_guest)
        self._regions = tuple(regions)

    def banks(self) -> Sequence[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self._regions]

    def regions(self, queues: Sequence[QueueConfig] = ()) -> tuple[Sequence[MemoryRegion], Sequence[int]]:
        table = [MemoryRegion(guest_phys_addr=r.gpa, memory_size=r.size, userspace_addr=r.gpa, mmap_offset=r.offset) for r in self._regions]
        return table, [r.fd for r in self._regions]


class XenMmapExport(_ZeroCopy):
    """XEN_MMAP: the back-end maps the guest's RAM banks through the privcmd fd we pass."""

    name = "xen-mmap"
    protocol_features = ProtocolFeatures.XEN_MMAP

    def __init__(self, domid: int, banks: Sequence[tuple[int, int]], privcmd_fd: int,
                 read_guest: Callable[[int, int], bytes] | None = None,
                 write_guest: Callable[[int, bytes], None] | None = None) -> None:
        super().__init__(read_guest, write_guest)
        self._domid = domid
        self._banks = tuple(banks)
        self._fd = privcmd_fd

    def banks(self) -> Sequence[tuple[int, int]]:
        return self._banks

    def regions(self, queues: Sequence[QueueConfig] = ()) -> tuple[Sequence[XenMemoryRegion], Sequence[int]]:
        table = [
            XenMemoryRegion(
                guest_phys_addr=gpa, memory_size=size, userspace_addr=gpa, mmap_offset=0,
                xen_mmap_flags=int(XenMmapFlags.FOREIGN), domid=self._domid,
            )
            for gpa, size in self._banks
        ]
        return table, [self._fd] * len(table)


def sim_memfd_export(banks: Sequence[tuple[int, int]], memfd: int,
                     read_guest: Callable[[int, int], bytes] | None = None,
                     write_guest: Callable[[int, bytes], None] | None = None) -> FdExport:
    """SIM-ONLY baseline: the simulator's RAM memfd holds the banks back to back."""
    regions, offset = [], 0
    for gpa, size in banks:
        regions.append(FdRegion(gpa, size, memfd, offset))
        offset += size
    return FdExport(regions, read_guest, write_guest)
