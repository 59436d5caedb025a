"""SIM-ONLY: the page that lets a guest's vCPU reach its device model without the simulated host.

On Xen a vCPU's MMIO access to a range an IOREQ server claims is decided in the hypervisor, written
into the server's ioreq page, and signalled on the server's event channel; the device model's
EVTCHNOP_send completes it. In the simulator the guest's vCPUs live in another process than the
simulated host, so each of those steps would be a round trip to the host. Instead the host
publishes what the vCPU needs to decide by itself in one page per domain (a memfd the guest maps;
the host is its only writer, under a sequence counter), and hands the guest, for each vCPU port a
dom0 evtchn fd has bound, two eventfds: ``deliver`` (the dom0 port's pending event, which the
daemon's SimKernel reads from its evtchn fd) and ``wake`` (the guest port's event, written by the
daemon's IOCTL_EVTCHN_NOTIFY). An access then costs what it costs on Xen: the slot write, one
event to the device model, one event back.

Whenever the page says anything else (paused, dying, unclaimed, a kernel ioeventfd on the server,
more ranges than fit) the guest takes the host's path (the ``mmio`` request), which is the
reference semantics.

Layout (little endian): u64 seq (odd while the host writes), u32 flags, u32 nent, then ``nent``
entries ``{u64 start; u64 end; u32 uid; u32 fast_vcpus; u32 route_gen}`` (enabled servers' MEMORY
ranges, in the order the hypervisor searches them; ``fast_vcpus`` bit i: vCPU i's port has the
eventfd route; ``route_gen`` changes whenever a route of the server is made or dropped);
at LIVE_OFF: u32 count, u32 uid[count] (servers alive); at BUSY_OFF: one byte per vCPU, written by
the guest only (1 while a fast access is in flight, for ``pending_access``); at IRQ_OFF: one byte
per SPI (``IRQ_BASE`` + i), 1 while its interrupt is pending.

The dom0 kernel's privcmd ioeventfd (sim.fastpath) takes it too. Its handler shares the vCPU
port's interrupt: on Xen it runs in dom0's kernel on the IOREQ event, completes a matching
QueueNotify itself (eventfd signalled, IORESP_READY, port notified) and leaves the event to the
evtchn device's user as well. Here, when every handler on a vCPU's port watches that server's slot of
that vCPU, the route also carries the ioeventfds (``vcpu_server``) and the vCPU plays the handler:
a matching write signals the eventfd, leaves the slot completed (never READY) and still raises
the port's event for user space; no process is woken on the way but the back-end. The handler
only runs while user space has the port unmasked (a late-EOI interrupt): each route has a *route
page* shared by the host, the daemon's SimKernel (which writes the port's mask there) and the
guest. Layout: u8 masked @0 (set by whoever raises the port's event, as the evtchn device masks the
interrupt when it queues it; cleared by the SimKernel's unmask), u8 waiting @1 (the guest: it waits for the unmask, and
the SimKernel's unmask then writes the vCPU's ``wake``), u64 consumed @8 and u64 passed @16 (the
handler's counters, written by the guest; the host adds them to its own). A host-path access
(not through the vCPU channel) on such a port runs the host's handler only while the page says
unmasked; otherwise user space serves it (divergence: Linux would run the handler at the unmask).

The dom0 kernel's privcmd irqfd does too when its dm_op is a well-formed XEN_DMOP_set_irq_level of
a line the page holds: the guest fetches those irqfds (``irqfds``: the eventfds, each line and
level, and the host's irq eventfd; fetched again when the u32 at IRQFD_GEN_OFF changes) and, while
it looks at or waits for a line, reads them itself and writes the level and both irq eventfds, as
the kernel's irqfd worker and the hypervisor would: a back-end's call raises the guest's line with
no process in between. The host keeps reading them too (whoever reads the counter first injects;
the other finds it empty), so a line nobody in the guest looks at is still raised; the guests'
injections are counted in the u64 at IRQFD_COUNT_OFF.

Interrupt lines take the same shortcut: the pending bytes live in the page, set by whoever runs
XEN_DMOP_set_irq_level (the host, or the device model's SimKernel once the host has handed it the
page and the domain's two *irq* eventfds after a first dm_op it carried out itself). A raise
(level 1) sets the byte first, then writes the guest's irq eventfd (which the guest's ``wait_irq``
polls) and the host's (which wakes the waiters of the host's reference path); level 0 writes
nothing. That is Xen on Arm for libxl's edge-rising virtio-mmio SPIs (docs/xen-abi.md §6:
vgic_inject_irq ignores a falling edge): each raise is an edge, pending until the guest takes the
interrupt (``wait_irq`` clears the byte, as the GIC's acknowledge does), and raises while it is
pending are one interrupt. (An x86 GSI, set_pci_intx_level, is a level and stays until lowered.)
"""

from __future__ import annotations

import mmap
import struct

__all__ = [
    "BUSY_OFF", "IRQFD_COUNT_OFF", "IRQFD_GEN_OFF", "bump_irqfd_gen", "count_irqfd", "irqfd_count", "irqfd_gen",
    "ROUTE_MASKED", "ROUTE_PAGE", "ROUTE_WAITING", "count_route", "route_counters", "IRQ_BASE", "IRQ_OFF", "NR_IRQS", "irq_offset", "FLAG_ARM64", "FLAG_DYING", "FLAG_RUNNING", "LIVE_OFF", "MAX_ENTRIES", "MAX_FAST_VCPUS",
    "MAX_LIVE", "PAGE", "Snapshot", "flags_of", "read_snapshot", "seq_of", "write",
]

PAGE = 4096
FLAG_RUNNING = 1
FLAG_DYING = 2
FLAG_ARM64 = 4
FLAG_OVERFLOW = 8  # more ranges or servers than the page holds: every access takes the host's path
_HEAD = struct.Struct("<QII")
_SEQ = struct.Struct("<Q")
_U64 = _SEQ
_FLAGS = struct.Struct("<I")
_ENT = struct.Struct("<QQIII")
ENT_OFF = _HEAD.size
LIVE_OFF = 2048
BUSY_OFF = 3072
MAX_ENTRIES = (LIVE_OFF - ENT_OFF) // _ENT.size
MAX_LIVE = (BUSY_OFF - LIVE_OFF - 4) // 4
MAX_FAST_VCPUS = 32
IRQ_OFF = 3584
IRQ_BASE = 32  # the first SPI
NR_IRQS = 64  # SPIs 32..95 (hypervisor.NR_SPIS)
FLAGS_OFF = 8
IRQFD_GEN_OFF = IRQ_OFF + NR_IRQS  # u32, the host's: bumped whenever the domain's irqfds change
IRQFD_COUNT_OFF = IRQFD_GEN_OFF + 8  # u64, the guests': injections they carried out themselves
_U32 = struct.Struct("<I")


def irqfd_gen(buf: mmap.mmap | bytearray) -> int:
    return int(_U32.unpack_from(buf, IRQFD_GEN_OFF)[0])


def bump_irqfd_gen(buf: mmap.mmap | bytearray) -> None:
    _U32.pack_into(buf, IRQFD_GEN_OFF, (irqfd_gen(buf) + 1) & 0xFFFFFFFF)


def irqfd_count(buf: mmap.mmap | bytearray) -> int:
    return int(_SEQ.unpack_from(buf, IRQFD_COUNT_OFF)[0])


def count_irqfd(buf: mmap.mmap | bytearray) -> None:
    _SEQ.pack_into(buf, IRQFD_COUNT_OFF, irqfd_count(buf) + 1)


# the route page (one per vCPU route; see the docstring)
ROUTE_PAGE = 4096
ROUTE_MASKED = 0
ROUTE_WAITING = 1
_ROUTE_COUNTERS = struct.Struct("<QQ")
ROUTE_COUNTERS_OFF = 8


def route_counters(buf: mmap.mmap) -> tuple[int, int]:
    """(consumed, passed) that the guest's vCPUs counted on this route."""
    consumed, passed = _ROUTE_COUNTERS.unpack_from(buf, ROUTE_COUNTERS_OFF)
    return int(consumed), int(passed)


def count_route(buf: mmap.mmap, consumed: bool) -> None:
    """The guest's handler: one more notify consumed (or one write left to user space)."""
    off = ROUTE_COUNTERS_OFF + (0 if consumed else 8)
    _U64.pack_into(buf, off, _U64.unpack_from(buf, off)[0] + 1)


def irq_offset(irq: int) -> int | None:
    """The byte holding ``irq``'s level, or None for a line the page does not hold."""
    return IRQ_OFF + irq - IRQ_BASE if IRQ_BASE <= irq < IRQ_BASE + NR_IRQS else None


def flags_of(buf: mmap.mmap | bytearray) -> int:
    """The page's flags word (one aligned 32-bit load: no torn read)."""
    return int(_FLAGS.unpack_from(buf, FLAGS_OFF)[0])


class Snapshot:
    __slots__ = ("entries", "flags", "live", "seq")

    def __init__(self, seq: int, flags: int, entries: list[tuple[int, int, int, int, int]], live: set[int]) -> None:
        self.seq, self.flags, self.entries, self.live = seq, flags, entries, live

    def claim(self, addr: int, size: int) -> tuple[int, int, int] | None:
        """(uid, fast_vcpus, route_gen) of the first server claiming [addr, addr+size), or None."""
        last = addr + size - 1
        for start, end, uid, fast, gen in self.entries:
            if start <= addr and last <= end:
                return uid, fast, gen
        return None

    def gen_of(self, uid: int) -> int | None:
        return next((e[4] for e in self.entries if e[2] == uid), None)


def write(buf: mmap.mmap | bytearray, seq: int, flags: int, entries: list[tuple[int, int, int, int, int]],
          live: list[int]) -> int:
    """Host side: publish a new state under the sequence counter; returns the new (even) seq."""
    if len(entries) > MAX_ENTRIES or len(live) > MAX_LIVE:
        flags |= FLAG_OVERFLOW
        entries, live = [], []
    body = b"".join(_ENT.pack(*e) for e in entries)
    lv = struct.pack(f"<I{len(live)}I", len(live), *live)
    _HEAD.pack_into(buf, 0, seq + 1, flags, len(entries))  # odd: being written
    buf[ENT_OFF:ENT_OFF + len(body)] = body
    buf[LIVE_OFF:LIVE_OFF + len(lv)] = lv
    _HEAD.pack_into(buf, 0, seq + 2, flags, len(entries))
    return seq + 2


def seq_of(buf: mmap.mmap | bytearray) -> int:
    """The page's sequence counter: a snapshot with this ``seq`` is still current."""
    return int(_SEQ.unpack_from(buf, 0)[0])


def read_snapshot(buf: mmap.mmap | bytearray) -> Snapshot | None:
    """Guest side: a consistent copy of the page, or None if the host was writing (take its path)."""
    seq, flags, n = _HEAD.unpack_from(buf, 0)
    if seq & 1 or n > MAX_ENTRIES:
        return None
    entries = [_ENT.unpack_from(buf, ENT_OFF + i * _ENT.size) for i in range(n)]
    (count,) = struct.unpack_from("<I", buf, LIVE_OFF)
    live = set(struct.unpack_from(f"<{min(count, MAX_LIVE)}I", buf, LIVE_OFF + 4))
    if _HEAD.unpack_from(buf, 0)[0] != seq:
        return None
    return Snapshot(seq, flags, entries, live)
