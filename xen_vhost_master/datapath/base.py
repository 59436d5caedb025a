"""What a data path is: how guest memory reaches a back-end (docs/datapath.md).

The device (:mod:`xen_vhost_master.device`) drives a :class:`DataPath` and knows nothing else of
this package; :mod:`.choose` decides which one a device gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vhost_user import MemoryRegion, ProtocolFeatures, XenMemoryRegion

from ..virtio_mmio import QueueConfig

__all__ = ["DataPath", "DataPathChooser", "RingAddresses"]


@dataclass(frozen=True)
class RingAddresses:
    """Where the back-end finds a queue's rings (addresses in the memory table's space)."""

    desc: int
    avail: int
    used: int
    base: int = 0  # SET_VRING_BASE: the next avail index the back-end is to read


class DataPath(Protocol):
    """How the back-end reaches the guest's buffers: directly (zero copy) or through the daemon.

    Zero copy (:mod:`.zerocopy`): the memory table describes guest RAM itself, the back-end gets the
    guest's ring addresses, a guest notify is a kick, a back-end call is an interrupt. A copying
    data path (shadow virtqueues, :mod:`.shadow`) describes its own memory, gives the back-end its
    own rings, and moves chains between the two on notifies and calls.
    """

    @property
    def name(self) -> str:
        """What ``status`` shows as the device's data path (e.g. "xen-mmap", "shadow")."""
        ...

    @property
    def direct(self) -> bool:
        """Whether the back-end touches the guest's rings itself (zero copy): then the kernel fast
        path may relay its notifications and INFLIGHT_SHMFD tracks what it has in flight."""
        ...

    @property
    def protocol_features(self) -> ProtocolFeatures:
        """Protocol features the back-end must have (XEN_MMAP for Xen mappings, none for memfds)."""
        ...

    @property
    def packed(self) -> bool:
        """Whether packed rings can be offered to the guest."""
        ...

    def banks(self) -> Sequence[tuple[int, int]]:
        """Guest RAM banks ``(gpa, size)``: the guest's rings must lie inside them."""
        ...

    def new_connection(self) -> None:
        """A new back-end connection was opened: the next :meth:`regions` is its first table."""
        ...

    def regions(self, queues: Sequence[QueueConfig]) -> tuple[Sequence[MemoryRegion | XenMemoryRegion], Sequence[int]]:
        """The memory table and one fd per region (still owned by the data path), for a start of
        ``queues``; asked at every start, before :meth:`open_queue`. A copying data path gives each
        connection memory of its own and keeps it for that connection's later starts (a guest
        reset); grant regions follow the rings. Within one connection a region whose geometry
        (address, size, user address) is unchanged must be the same memory: DPDK
        (``vhost_user_set_mem_table``) keeps its old mapping when only the fds differ."""
        ...

    def open_queue(self, queue: QueueConfig, features: int, kick_fd: int, *, resume: bool = False) -> RingAddresses:
        """The driver made ``queue`` ready and the device starts; ``kick_fd`` is the back-end's.
        ``resume``: the queue ran with a back-end that is gone; say where the new one restarts."""
        ...

    def notify(self, index: int) -> None:
        """The guest notified queue ``index``."""
        ...

    def used(self, index: int) -> bool:
        """The back-end signalled queue ``index``; True if the guest should be interrupted."""
        ...

    def also_used(self) -> list[int]:
        """Other queues whose completions the last :meth:`used` took to the guest and whose
        guest must be interrupted too (a PCI function interrupts each queue on its own vector);
        each is reported once."""
        ...

    def close_queue(self, index: int) -> None:
        """The back-end has stopped the queue (GET_VRING_BASE answered)."""
        ...

    def close(self) -> None:
        """The device is gone: release what the data path owns."""
        ...


class DataPathChooser:
    """Picks the data path once the back-end's protocol features are known (``memory=auto``:
    XEN_MMAP when the back-end has it, else shadow virtqueues). Subclass and implement __call__."""

    #: what to ask the back-end for; the data path is then chosen from what it granted
    protocol_features = ProtocolFeatures(0)
    name = "not chosen yet"  # the back-end has not answered yet

    def __call__(self, negotiated: ProtocolFeatures, num_queues: int) -> DataPath:
        raise NotImplementedError
