"""The one data-path policy: memory mode × grants × what the back-end negotiated → a DataPath.

:func:`decide` is the rule (pure; the table is docs/datapath.md §4). :class:`GuestDataPaths`
builds what it decides from one guest's resources, given explicitly (:class:`GuestResources`);
the supervisor asks it once per device (:meth:`GuestDataPaths.for_device`) and hands the result
to the device: a data path when the choice does not depend on the back-end, else a
:class:`~.base.DataPathChooser` the device calls once the back-end has negotiated.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vhost_user import ProtocolFeatures, XenMmapFlags

from ..config import DeviceConfig, MemoryMode
from ..devtypes import BLK, feeds_lower
from ..errors import ConfigError
from ..guestmem.foreign import ForeignGuestMemory, foreign_reader, foreign_writer
from ..log import LimitedLogger, device_logger
from ..platform import Platform
from ..xen.privcmd import PrivCmd
from .base import DataPath, DataPathChooser
from .zerocopy import XenMmapExport, sim_memfd_export

if TYPE_CHECKING:
    from .shadow import GuestInflightRecord

__all__ = ["GuestDataPaths", "GuestResources", "Kind", "decide", "wanted_protocol_features"]

_ASK_XEN_MMAP: Final = (MemoryMode.AUTO, MemoryMode.XEN_MMAP)


class Kind(enum.Enum):
    """Which data path a device gets (docs/datapath.md §4)."""

    SIM_MEMFD = "sim memfd (SIM-ONLY)"
    XEN_MMAP = "XEN_MMAP over the guest's RAM"
    SHADOW = "shadow virtqueues over foreign-mapped RAM"
    GRANT_XEN_MMAP = "XEN_MMAP grant regions"
    GRANT_SHADOW = "shadow virtqueues over gntdev"


def wanted_protocol_features(mode: MemoryMode) -> ProtocolFeatures:
    """What to ask the back-end for before choosing: XEN_MMAP when the mode may use it."""
    return ProtocolFeatures.XEN_MMAP if mode in _ASK_XEN_MMAP else ProtocolFeatures(0)


def decide(mode: MemoryMode, grants: bool, negotiated: ProtocolFeatures | None = None,
           num_queues: int = 1) -> tuple[Kind, str] | None:
    """The data path for a device and why, or None before negotiation (``negotiated`` None) when
    the choice depends on the back-end. ``memory=xen-mmap`` takes XEN_MMAP whatever the back-end
    offers: the device then refuses a back-end without it."""
    offered = negotiated is not None and bool(negotiated & ProtocolFeatures.XEN_MMAP)
    if not grants:
        if mode is MemoryMode.SIM_MEMFD:
            return Kind.SIM_MEMFD, "memory=sim-memfd"
        if mode is MemoryMode.XEN_MMAP:
            return Kind.XEN_MMAP, "memory=xen-mmap"
        if negotiated is None:
            return None
        if mode is MemoryMode.AUTO and offered:
            return Kind.XEN_MMAP, "back-end maps guest memory itself (XEN_MMAP)"
        return Kind.SHADOW, "shadow virtqueues (the back-end knows only shared memory)"
    if negotiated is None:
        return None
    from .grant_export import MAX_GRANT_QUEUES  # noqa: PLC0415  (loaded for grant devices only)

    if mode is MemoryMode.XEN_MMAP or (mode is MemoryMode.AUTO and offered and num_queues <= MAX_GRANT_QUEUES):
        return Kind.GRANT_XEN_MMAP, "grant-based guest: back-end maps the grants itself (XEN_MMAP grant regions"
    if mode is MemoryMode.AUTO and offered:
        return Kind.GRANT_SHADOW, (f"grant-based guest: shadow virtqueues over gntdev ({num_queues} queues: their rings "
                                   f"may not fit the 8 XEN_MMAP regions)")
    why = " (the back-end does not offer XEN_MMAP)" if mode is MemoryMode.AUTO else ""
    return Kind.GRANT_SHADOW, f"grant-based guest: shadow virtqueues over gntdev{why}"


@dataclass
class GuestResources:
    """What one guest's data paths are built from; all owned by the caller (the supervisor).

    ``grant_span``: bytes of grant space a grant export describes. ``inflight_record(cfg, nq)``:
    the shadow path's in-flight record for a device, or None. ``queue_failed(cfg, index,
    reason)``: a shadow queue was stopped (the device must show NEEDS_RESET)."""

    platform: Platform
    privcmd: PrivCmd
    domid: int
    banks: Sequence[tuple[int, int]]
    grant_span: int
    inflight_record: Callable[[DeviceConfig, int], GuestInflightRecord | None]
    queue_failed: Callable[[DeviceConfig, int, str], None]
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]  # the guest's: each choice is logged there


class _Chooser(DataPathChooser):
    """A choice made once the back-end has negotiated (the device calls it then)."""

    def __init__(self, paths: GuestDataPaths, cfg: DeviceConfig) -> None:
        self.paths, self.cfg = paths, cfg
        self.protocol_features = wanted_protocol_features(cfg.memory)

    def __call__(self, negotiated: ProtocolFeatures, num_queues: int) -> DataPath:
        return self.paths.build(self.cfg, negotiated, num_queues)


class GuestDataPaths:
    """The data paths of one guest's devices, chosen by :func:`decide`. Owns what they share:
    the guest's RAM foreign-mapped once (for shadow devices) and the simulator's RAM memfd."""

    def __init__(self, res: GuestResources) -> None:
        self.res = res
        self.guest_memory: ForeignGuestMemory | None = None
        self._memfd: int | None = None

    def for_device(self, cfg: DeviceConfig) -> DataPath | DataPathChooser:
        """The device's data path, or a chooser when that depends on what its back-end offers."""
        if cfg.grants and cfg.memory not in (MemoryMode.AUTO, MemoryMode.SHADOW, MemoryMode.XEN_MMAP):
            self.res.log.warning("device %d: grant-based guest: memory=%s is not possible, using shadow virtqueues",
                                 cfg.devid, cfg.memory.value)
        if decide(cfg.memory, cfg.grants) is None:
            return _Chooser(self, cfg)
        return self.build(cfg, None, cfg.num_queues or 1)

    def build(self, cfg: DeviceConfig, negotiated: ProtocolFeatures | None, num_queues: int) -> DataPath:
        """Build the data path :func:`decide` picks (logged once the back-end has answered)."""
        decision = decide(cfg.memory, cfg.grants, negotiated if negotiated is not None else ProtocolFeatures(0),
                          num_queues)
        assert decision is not None  # with negotiated given, decide always decides
        kind, why = decision
        if negotiated is not None:
            extra = f", no-advance flag {cfg.xen_no_advance:#x})" if kind is Kind.GRANT_XEN_MMAP else ""
            self.res.log.info("device %d: %s%s", cfg.devid, why, extra)
        if kind is Kind.SIM_MEMFD:
            return self.sim_memfd()
        if kind is Kind.XEN_MMAP:
            return XenMmapExport(self.res.domid, self.res.banks, self.res.privcmd.fileno(),
                                 foreign_reader(self.res.privcmd, self.res.domid),
                                 foreign_writer(self.res.privcmd, self.res.domid))
        if kind is Kind.GRANT_XEN_MMAP:
            return self.grant_export(cfg, num_queues)
        return self.shadow(cfg, num_queues)

    def grant_export(self, cfg: DeviceConfig, num_queues: int) -> DataPath:
        """XEN_MMAP for a grant device: grant space as GRANT regions over a gntdev fd of its own;
        the shadow path serves an activation whose rings do not fit the region limit."""
        from ..xen.gntdev import GrantDev  # noqa: PLC0415  (loaded when a grant device needs it)
        from .grant_export import GrantXenMmapExport  # noqa: PLC0415

        return GrantXenMmapExport(GrantDev(self.res.platform.kernel), self.res.domid, self.res.grant_span,
                                  no_advance=XenMmapFlags(cfg.xen_no_advance),
                                  fallback=lambda: self.shadow(cfg, num_queues),
                                  log=LimitedLogger.over(device_logger("xen_vhost_master.datapath.grant_export", self.res.domid,
                                                                       cfg.devid), time.monotonic))  # (per activation)

    def shadow(self, cfg: DeviceConfig, num_queues: int) -> DataPath:
        """Shadow virtqueues over the guest's RAM, foreign-mapped once per guest; for a grant
        device over its own gntdev mappings of the grants the guest hands out."""
        from .shadow import ShadowDataPath  # noqa: PLC0415  (loaded when a device needs it)

        res = self.res
        log = device_logger("xen_vhost_master.datapath.shadow", res.domid, cfg.devid)
        path: ShadowDataPath
        if cfg.grants:
            from ..guestmem.grants import GrantGuestMemory  # noqa: PLC0415
            from ..xen.gntdev import GrantDev  # noqa: PLC0415
            from .grant_export import GrantShadowDataPath  # noqa: PLC0415

            memory = GrantGuestMemory(GrantDev(res.platform.kernel), res.domid, own_gntdev=True)
            record = None
            try:
                record = res.inflight_record(cfg, num_queues)
                path = GrantShadowDataPath(memory, max_queues=num_queues, max_queue_size=cfg.queue_size, log=log,
                                           inflight=record, harvest_lower=feeds_lower(cfg.device_id),
                                           kicks_when_idle=cfg.device_id == BLK.id)
            except BaseException:  # what this call opened goes with it
                if record is not None:
                    record.close()
                memory.close()
                raise
        else:
            if self.guest_memory is None:
                self.guest_memory = ForeignGuestMemory(res.privcmd, res.domid, res.banks)
                res.log.info("guest RAM mapped: %s", ", ".join(f"{gpa:#x}+{size >> 20} MiB" for gpa, size in res.banks))
            record = res.inflight_record(cfg, num_queues)
            try:
                path = ShadowDataPath(self.guest_memory, res.banks, max_queues=num_queues,
                                      max_queue_size=cfg.queue_size, log=log, inflight=record,
                                      harvest_lower=feeds_lower(cfg.device_id),
                                      kicks_when_idle=cfg.device_id == BLK.id)
            except BaseException:  # the pool's memfd/mmap OSError, or a bad record: the record is not kept
                if record is not None:
                    record.close()
                raise
        path.on_error = lambda index, reason: res.queue_failed(cfg, index, reason)
        return path

    def sim_memfd(self) -> DataPath:
        """SIM-ONLY, labelled baseline: guest RAM exposed as the simulator's memfd."""
        ram_memfd = self.res.platform.sim_ram_memfd
        if ram_memfd is None:
            raise ConfigError(f"memory=sim-memfd only exists in the simulator (platform: {self.res.platform.name})")
        banks, memfd = ram_memfd(self.res.domid)
        if self._memfd is None:
            self._memfd = memfd
        else:
            os.close(memfd)
        self.res.log.warning("SIM-ONLY: guest RAM exposed to back-ends as a memfd (a baseline, impossible on real Xen)")
        return sim_memfd_export(banks, self._memfd, foreign_reader(self.res.privcmd, self.res.domid),
                                foreign_writer(self.res.privcmd, self.res.domid))

    def release_guest_memory(self, in_use: Sequence[DataPath | DataPathChooser]) -> bool:
        """Unmap the guest's RAM unless a shadow path over it is among ``in_use``; True if unmapped."""
        if self.guest_memory is None:
            return False
        from .shadow import ShadowDataPath  # noqa: PLC0415

        if any(isinstance(p, ShadowDataPath) for p in in_use):
            return False
        self.guest_memory.close()
        self.guest_memory = None
        return True

    def close(self, *, unmap: bool = True) -> None:
        """Release what the devices' data paths shared (each data path is closed by its device);
        ``unmap=False`` (a handover) leaves the guest's RAM mapped for the views still held."""
        if unmap and self.guest_memory is not None:
            self.guest_memory.close()
            self.guest_memory = None
        memfd, self._memfd = self._memfd, None
        if memfd is not None:
            os.close(memfd)
