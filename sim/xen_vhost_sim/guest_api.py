"""What a simulated guest's software sees of its machine.

The simulated Xen host implements these protocols for each simulated domain; the spec-following
virtio-mmio guest driver (``sim.guest_driver``) and tests are written against them only, so the
driver never reaches into the hypervisor's internals.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["GuestBus", "GuestRam", "PciBus"]


class GuestRam(Protocol):
    """The guest's physical memory as the guest itself sees it (all banks, holes excluded)."""

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``; ValueError if any byte is outside RAM."""
        ...

    def banks(self) -> list[tuple[int, int]]:
        """The RAM banks as ``(gpa, size)`` pairs, ascending."""
        ...


class GuestBus(Protocol):
    """One simulated domain seen from inside: vCPU MMIO accesses, RAM, interrupt lines, grants."""

    @property
    def ram(self) -> GuestRam: ...

    async def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> int:
        """A load of ``size`` (1, 2, 4 or 8) bytes; the vCPU is blocked until the device model answers."""
        ...

    async def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        """A store; returns once the device model has completed it (synchronous IOREQ)."""
        ...

    def irq_level(self, irq: int) -> bool:
        """Current level of the (level-triggered) interrupt line ``irq`` (a GIC SPI number on Arm)."""
        ...

    async def wait_irq(self, irq: int) -> None:
        """Return as soon as line ``irq`` is asserted (immediately if it already is)."""
        ...

    def grant(self, gfn: int, *, readonly: bool = False) -> int:
        """Grant dom0 access to guest frame ``gfn``; returns the grant reference."""
        ...

    def revoke(self, ref: int) -> None:
        """End the grant ``ref``: later maps fail; existing mappings behave as Xen's do."""
        ...


class PciBus(GuestBus, Protocol):
    """An x86 HVM guest's view of PCI: configuration space of bus 0 (what its CF8/CFC or MMCONFIG
    accesses become once Xen decoded them) and the MSIs its local APIC takes."""

    async def pci_config_read(self, sbdf: int, reg: int, size: int, vcpu: int = 0) -> int:
        """A configuration read of function ``sbdf`` (XEN_DMOP_PCI_SBDF); all-ones if none answers."""
        ...

    async def pci_config_write(self, sbdf: int, reg: int, size: int, value: int, vcpu: int = 0) -> None:
        """A configuration write; returns once the device model has completed it."""
        ...

    async def wait_msi(self, addr: int, data: int) -> None:
        """Take one MSI with this address and data (at once if one is pending)."""
        ...
