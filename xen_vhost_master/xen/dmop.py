"""Typed wrappers of the XEN_DMOP_* operations the daemon uses (xen/hvm/dm_op.h), sent through
IOCTL_PRIVCMD_DM_OP with the full 32-byte ``xen_dm_op`` (docs/xen-abi.md §4, §10.13)."""

from __future__ import annotations

from dataclasses import dataclass

from xen_vhost_master.xen.abi import (
    HVM_IOREQSRV_BUFIOREQ_OFF,
    XEN_DMOP_no_gfns,
    DmOp,
    IoRangeType,
    xen_dm_op,
)
from xen_vhost_master.xen.privcmd import PreparedDmOp, PrivCmd

__all__ = ["DeviceModel", "IoreqServerInfo"]


@dataclass(frozen=True)
class IoreqServerInfo:
    id: int
    bufioreq_port: int
    ioreq_gfn: int
    bufioreq_gfn: int


class DeviceModel:
    """DM ops on one guest through a :class:`PrivCmd`."""

    def __init__(self, privcmd: PrivCmd, domid: int) -> None:
        self.privcmd, self.domid = privcmd, domid
        self._irq_ops: dict[tuple[int, int], PreparedDmOp] = {}  # (irq, level) -> its set_irq_level

    def _op(self, op: DmOp) -> xen_dm_op:
        return xen_dm_op(op=op)

    def _send(self, d: xen_dm_op) -> xen_dm_op:
        self.privcmd.dm_op(self.domid, d)
        return d

    def nr_vcpus(self) -> int:
        return int(self._send(self._op(DmOp.nr_vcpus)).u.nr_vcpus.vcpus)

    def create_ioreq_server(self, handle_bufioreq: int = HVM_IOREQSRV_BUFIOREQ_OFF) -> int:
        d = self._op(DmOp.create_ioreq_server)
        d.u.create_ioreq_server.handle_bufioreq = handle_bufioreq
        return int(self._send(d).u.create_ioreq_server.id)

    def get_ioreq_server_info(self, server_id: int, *, no_gfns: bool = True) -> IoreqServerInfo:
        d = self._op(DmOp.get_ioreq_server_info)
        g = d.u.get_ioreq_server_info
        g.id, g.flags = server_id, XEN_DMOP_no_gfns if no_gfns else 0
        self._send(d)
        return IoreqServerInfo(server_id, int(g.bufioreq_port), int(g.ioreq_gfn), int(g.bufioreq_gfn))

    def _range(self, op: DmOp, server_id: int, start: int, end: int, kind: IoRangeType) -> None:
        d = self._op(op)
        r = d.u.map_io_range_to_ioreq_server
        r.id, r.type, r.start, r.end = server_id, kind, start, end
        self._send(d)

    def map_io_range(self, server_id: int, start: int, end: int, kind: IoRangeType = IoRangeType.MEMORY) -> None:
        """Claim ``[start, end]`` (end inclusive) for the server."""
        self._range(DmOp.map_io_range_to_ioreq_server, server_id, start, end, kind)

    def unmap_io_range(self, server_id: int, start: int, end: int, kind: IoRangeType = IoRangeType.MEMORY) -> None:
        self._range(DmOp.unmap_io_range_from_ioreq_server, server_id, start, end, kind)

    def set_ioreq_server_state(self, server_id: int, enabled: bool) -> None:
        d = self._op(DmOp.set_ioreq_server_state)
        d.u.set_ioreq_server_state.id = server_id
        d.u.set_ioreq_server_state.enabled = int(enabled)
        self._send(d)

    def destroy_ioreq_server(self, server_id: int) -> None:
        d = self._op(DmOp.destroy_ioreq_server)
        d.u.destroy_ioreq_server.id = server_id
        self._send(d)

    def set_irq_level(self, irq: int, level: int) -> None:
        """Arm: drive SPI ``irq`` to ``level`` (0/1). The op has no OUT fields (Xen does not copy it
        back), so each (irq, level) is built once: every interrupt raises and lowers a line."""
        op = self._irq_ops.get((irq, level))
        if op is None:
            d = self._op(DmOp.set_irq_level)
            d.u.set_irq_level.irq, d.u.set_irq_level.level = irq, level
            op = self._irq_ops[(irq, level)] = self.privcmd.prepare_dm_op(self.domid, d)
        op()

    def set_pci_intx_level(self, bus: int, device: int, intx: int, level: int, segment: int = 0) -> None:
        """x86: drive PCI device ``device``'s pin ``intx`` (0 = INTA) to ``level`` (0/1)."""
        d = self._op(DmOp.set_pci_intx_level)
        x = d.u.set_pci_intx_level
        x.domain, x.bus, x.device, x.intx, x.level = segment, bus, device, intx, level
        self._send(d)

    def inject_msi(self, addr: int, data: int) -> None:
        """x86: inject an MSI."""
        d = self._op(DmOp.inject_msi)
        d.u.inject_msi.addr, d.u.inject_msi.data = addr, data
        self._send(d)
