"""Configuration: what devices a guest has and how each reaches its back-end.

Pure: strings and dicts in, frozen dataclasses out, :class:`ConfigError` naming the flag or key and
the fix. Three sources, merged with explicit settings winning: libxl's xenstore layout, a TOML file
(``--config``) and ``--device`` flags.
"""

from __future__ import annotations

import enum
import itertools
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .devtypes import parse_cid, parse_mac
from .errors import ConfigError
from .names import path_name, systemd_escape
from .virtio_mmio import MAX_QUEUE_SIZE, WINDOW_SIZE

if TYPE_CHECKING:
    from pathlib import Path  # annotations only: pathlib pulls in urllib.parse and ipaddress

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "NO_ADVANCE_RUSTVMM",
    "NO_ADVANCE_SPEC",
    "SOCKET_KEYS",
    "SOCKET_TEMPLATE",
    "DeviceConfig",
    "GuestConfig",
    "MemoryMode",
    "TomlConfig",
    "check_socket_template",
    "device_from_xenstore",
    "expand_socket",
    "instance_name",
    "load_guest_toml",
    "load_toml",
    "merge",
    "parse_bdf",
    "parse_device_arg",
    "vdev_name",
    "virtio_id",
]

# Where a device's back-end socket lives unless configured: one directory per guest *name*, owned
# by the operator (systemd/xen-vhost-master.tmpfiles.conf creates /run/vhost-user), so a back-end
# unit can create its socket before the guest exists and keeps it across guest reboots.
SOCKET_TEMPLATE = "/run/vhost-user/{name}/{devid}.sock"
# The keys socket= templates may use: the guest's name (systemd-escaped: one path component, the
# %i of a back-end's template unit), its current domain id, the device id, the disk name.
SOCKET_KEYS = ("name", "domid", "devid", "vdev")
DEFAULT_QUEUE_SIZE = 256  # QueueNumMax offered to the guest; QEMU's default for virtio-blk/net
# Arm GIC architecture (IHI 0069, "INTID ranges"): 32..1019 are Shared Peripheral Interrupts, the
# only kind a device's line can be; libxl gives virtio-mmio devices SPIs from 33
# (xen/include/public/arch-arm.h GUEST_VIRTIO_MMIO_SPI_FIRST).
SPI_FIRST, SPI_LAST = 32, 1019
# XEN_MMAP grant regions' "can not be mapped in advance" flag: rust-vmm vm-memory puts 0x8 on the
# wire (what existing Xen back-ends understand), the vhost-user spec says bit 8 (docs/vhost-user-wire.md §3).
NO_ADVANCE_RUSTVMM, NO_ADVANCE_SPEC = 0x8, 0x100
NO_ADVANCE_NAMES = {"rust-vmm": NO_ADVANCE_RUSTVMM, "spec": NO_ADVANCE_SPEC}
# A PCI function's key among a guest's devices: above every guest-physical window base.
PCI_KEY = 1 << 64
TRANSPORTS = ("mmio", "pci")
# QEMU's xenfv (i440fx) machine, the primary device model of a Xen HVM guest, always has its host
# bridge at 00:00.0, the PIIX3 functions at 00:01.x and the VGA at 00:02.0; the Xen platform
# device takes the next free slot (00:03.0) unless xl's xen_platform_pci=0, emulated NICs the ones after.
QEMU_SLOTS = 3

# linux/virtio_ids.h: names accepted for `type=` (numbers and `virtio,deviceNN` work too).
VIRTIO_IDS = {
    "net": 1, "blk": 2, "console": 3, "rng": 4, "balloon": 5, "scsi": 8, "9p": 9, "gpu": 16,
    "input": 18, "vsock": 19, "crypto": 20, "iommu": 23, "mem": 24, "sound": 25, "fs": 26,
    "pmem": 27, "rpmb": 28, "scmi": 32, "i2c": 34, "watchdog": 35, "can": 36, "bt": 40, "gpio": 41,
}


class MemoryMode(enum.Enum):
    """How guest memory reaches the back-end."""

    AUTO = "auto"  # XEN_MMAP if the back-end offers it, else shadow virtqueues
    XEN_MMAP = "xen-mmap"  # zero copy: the back-end maps guest memory itself
    SHADOW = "shadow"  # copy through bounce buffers the daemon shares with the back-end
    SIM_MEMFD = "sim-memfd"  # simulator only: guest RAM exposed as memfds (a baseline)


@dataclass(frozen=True)
class DeviceConfig:
    devid: int
    device_id: int  # virtio device id (linux/virtio_ids.h)
    base: int  # guest-physical base of the MMIO window
    irq: int  # interrupt line (GIC SPI on Arm)
    socket: str = ""  # back-end socket; "" = SOCKET_TEMPLATE
    listen: bool = False  # True: we listen and the back-end connects (server mode)
    queue_size: int = DEFAULT_QUEUE_SIZE
    num_queues: int | None = None  # None: as many as the back-end's GET_QUEUE_NUM
    grants: bool = False  # grant-based guest (xenstore grant_usage=1)
    memory: MemoryMode = MemoryMode.AUTO
    xen_no_advance: int = NO_ADVANCE_RUSTVMM  # grant devices over XEN_MMAP: NO_ADVANCE_MAP value
    mac: str = ""  # net: the guest's MAC (xl.cfg / xenstore mac=) for an emulated config; "" = derived
    cid: int | None = None  # vsock: the guest's CID for an emulated config (QEMU vhost-vsock guest-cid=)
    source: str = "cli"  # where it came from, for messages: cli, config, xenstore
    transport: str = "mmio"  # mmio (a window at base, line irq) or pci (function bdf of an x86 guest's bus 0)
    bdf: int = 0  # pci: device << 3 | function on bus 0 (XEN_DMOP_PCI_SBDF with segment and bus 0)

    @property
    def pci(self) -> bool:
        return self.transport == "pci"

    @property
    def key(self) -> int:
        """What tells this device from the guest's others: its window's base, or its PCI function."""
        return PCI_KEY | self.bdf if self.pci else self.base

    @property
    def where(self) -> str:
        """The device's place, for messages: ``at 0x2000000 irq 33`` or ``PCI 00:03.0``."""
        return f"PCI 00:{self.bdf >> 3:02x}.{self.bdf & 7}" if self.pci else f"at {self.base:#x} irq {self.irq}"

    def socket_path(self, name: str, domid: int) -> str:
        """The back-end socket of this device of guest ``name`` (domain ``domid``)."""
        return expand_socket(self.socket or SOCKET_TEMPLATE, name=name, domid=domid, devid=self.devid)


@dataclass(frozen=True)
class GuestConfig:
    domid: int
    devices: tuple[DeviceConfig, ...] = ()
    xenstore: bool = True  # discover (more) devices from xenstore and watch for changes
    backend_domid: int = 0
    extra: Mapping[str, object] = field(default_factory=dict)


def instance_name(name: str) -> str:
    """``name`` escaped exactly as ``systemd-escape NAME`` does: the instance part of
    ``xen-vhost-master@<instance>.service``, what its ``%i`` expands to, and a single safe path
    component (no '/', no leading '.'). Works on the UTF-8 bytes (``surrogateescape`` keeps bytes
    that are not UTF-8, as argv and xenstore can carry). The one implementation is
    :func:`xen_vhost_master.names.systemd_escape`, which the dispatcher uses too."""
    return systemd_escape(name)


def _letters(index: int) -> str:
    """0 → a, 25 → z, 26 → aa (Linux's xvd/sd disk letters)."""
    s = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        s = chr(ord("a") + r) + s
    return s


def vdev_name(devid: int) -> str:
    """The disk name of a Xen virtual block device number (xen docs/misc/vbd-interface.txt, libxl
    ``libxl__device_disk_dev_number``): 51712 = (202 << 8) | (0 << 4) | 0 → ``xvda``, 51729 →
    ``xvdb1``; (8 << 8) | ... → ``sdX``; (3 << 8) / (22 << 8) → ``hda``..``hdd``; the extended
    form (1 << 28) | (disk << 8) | partition → ``xvd<letters>``. Any other id → the number itself
    (a Xen ≥ 4.18 ``virtio`` device's id is a plain index)."""
    def name(prefix: str, disk: int, part: int) -> str:
        return f"{prefix}{_letters(disk)}{part or ''}"

    major, minor = devid >> 8, devid & 0xFF
    if devid >> 28 == 1 and devid < (1 << 29):
        return name("xvd", (devid >> 8) & 0xFFFFF, devid & 0xFF)
    if major == 202:
        return name("xvd", minor >> 4, minor & 0xF)
    if major == 8:
        return name("sd", minor >> 4, minor & 0xF)
    if major == 3:
        return name("hd", minor >> 6, minor & 0x3F)
    if major == 22:
        return name("hd", 2 + (minor >> 6), minor & 0x3F)
    return str(devid)


def check_socket_template(text: str, what: str) -> str:
    """A ``socket=`` value: a path, optionally with ``{name}``, ``{domid}``, ``{devid}``,
    ``{vdev}`` (``{{``/``}}`` for literal braces). Anything else is a ConfigError saying so."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(f"{what}={text!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _literal, key, spec, conversion in parsed:
        if key is None:
            continue
        if key not in SOCKET_KEYS:
            raise ConfigError(f"{what}={text!r}: unknown template key {{{key}}}; use "
                              + ", ".join(f"{{{k}}}" for k in SOCKET_KEYS))
        if spec or conversion:
            raise ConfigError(f"{what}={text!r}: {{{key}}} takes no format spec or conversion")
    if not text:
        raise ConfigError(f"{what}: empty path")
    if not text.startswith("/"):
        raise ConfigError(f"{what}={text!r}: not an absolute path (the daemon's working directory is /)")
    return text


def expand_socket(template: str, *, name: str, domid: int, devid: int) -> str:
    """A checked template (:func:`check_socket_template`) with this device's values."""
    return template.format(name=path_name(name), domid=domid, devid=devid, vdev=vdev_name(devid))


def virtio_id(text: str, what: str) -> int:
    """``blk``, ``2``, ``0x1a`` or ``virtio,device1a`` → the virtio device id."""
    s = text.strip().lower()
    if s.startswith("virtio,device"):
        digits = s[len("virtio,device"):]
        if digits and all(c in "0123456789abcdef" for c in digits):
            return int(digits, 16)
    elif s in VIRTIO_IDS:
        return VIRTIO_IDS[s]
    else:
        try:
            n = int(s, 0)
        except ValueError:
            pass
        else:
            if 0 < n < 256:
                return n
    raise ConfigError(f"{what}: unknown virtio device type {text!r}; use a name ({', '.join(sorted(VIRTIO_IDS))}), a number, or virtio,deviceNN")


def _int(text: object, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    try:
        n = int(str(text).strip(), 0) if not isinstance(text, int) else text
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number (decimal or 0x-hex)") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{what}: {n} is out of range [{lo}, {hi}]")
    return n


def _bool(text: object, what: str) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in ("1", "yes", "true", "on"):
        return True
    if s in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{what}: {text!r} is not a boolean (use 1/0, yes/no, true/false)")


def _device(items: Mapping[str, object], what: str, source: str) -> DeviceConfig:
    known = {"devid", "type", "base", "irq", "socket", "mode", "queue-size", "queues", "grants", "memory", "xen-no-advance",
             "mac", "cid", "transport", "bdf"}
    unknown = set(items) - known
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    transport = str(items.get("transport", "mmio"))
    if transport not in TRANSPORTS:
        raise ConfigError(f"{what}: transport={transport!r}: use mmio (a virtio-mmio window) or pci (a virtio-pci "
                          "function of an x86 HVM guest)")
    if transport == "pci":
        return _pci_device(items, what, source)
    if "bdf" in items:
        raise ConfigError(f"{what}: bdf= is for transport=pci")
    for key in ("type", "base", "irq"):
        if key not in items:
            raise ConfigError(f"{what}: missing {key}= (e.g. type=blk,base=0x2000000,irq=33)")
    common = _common(items, what, source)
    base = _int(items["base"], f"{what}: base")
    if base % WINDOW_SIZE:
        raise ConfigError(f"{what}: base={base:#x}: not aligned to the {WINDOW_SIZE:#x}-byte virtio-mmio window "
                          f"(libxl places devices at 0x2000000 + n * {WINDOW_SIZE:#x})")
    irq = _int(items["irq"], f"{what}: irq")
    if not SPI_FIRST <= irq <= SPI_LAST:
        raise ConfigError(f"{what}: irq={irq}: not a GIC SPI ({SPI_FIRST}..{SPI_LAST}; libxl gives virtio "
                          "devices SPIs from 33)")
    return replace(common, base=base, irq=irq)


def _pci_device(items: Mapping[str, object], what: str, source: str) -> DeviceConfig:
    for key in ("type", "bdf"):
        if key not in items:
            raise ConfigError(f"{what}: missing {key}= (e.g. type=blk,transport=pci,bdf=00:03.0)")
    for key in ("base", "irq"):
        if key in items:
            raise ConfigError(f"{what}: {key}= is for transport=mmio: a PCI function's BAR is placed by the "
                              "guest and it interrupts with MSI-X or INTx")
    common = _common(items, what, source)
    if common.grants:
        raise ConfigError(f"{what}: grants=1 with transport=pci: grant DMA is described to the guest per "
                          "virtio-mmio device (device tree); use grants=0")
    return replace(common, transport="pci", bdf=parse_bdf(str(items["bdf"]), f"{what}: bdf"))


def parse_bdf(text: str, what: str = "bdf") -> int:
    """``00:08.0`` (or ``0000:00:08.0``) → device << 3 | function; only segment 0, bus 0: the
    bus an HVM guest's PCI functions live on (XEN_DMOP_set_pci_intx_level takes no other), and
    function 0 (Linux's pci_scan_slot looks for the others only behind a multi-function 0)."""
    parts = text.strip().lower().split(":")
    if len(parts) == 3:
        segment, bus, rest = parts
    elif len(parts) == 2:
        segment, (bus, rest) = "0", parts
    else:
        raise ConfigError(f"{what}={text!r}: not BB:DD.F (e.g. 00:03.0)")
    dev, dot, fn = rest.partition(".")
    try:
        s, b, d, f = int(segment, 16), int(bus, 16), int(dev, 16), int(fn, 16) if dot else -1
    except ValueError:
        raise ConfigError(f"{what}={text!r}: not BB:DD.F with hexadecimal numbers (e.g. 00:03.0)") from None
    if s or b:
        raise ConfigError(f"{what}={text!r}: only segment 0, bus 0 (an HVM guest's PCI bus)")
    if not 0 <= d <= 0x1F or not 0 <= f <= 7:
        raise ConfigError(f"{what}={text!r}: device 00..1f and function 0..7")
    if f:
        raise ConfigError(f"{what}={text!r}: function {f}: a guest scans functions 1-7 of a slot only when its "
                          "function 0 is there and multi-function; use function 0 of a free slot")
    if d < QEMU_SLOTS:
        raise ConfigError(f"{what}={text!r}: slots 00..{QEMU_SLOTS - 1:02x} hold QEMU's own devices on a Xen HVM "
                          "guest (host bridge 00:00.0, PIIX3 00:01.x, VGA 00:02.0): use a free slot, e.g. 00:08.0")
    return d << 3 | f


def _common(items: Mapping[str, object], what: str, source: str = "cli") -> DeviceConfig:
    """What both transports share: type, back-end, queues, data path."""
    mode = str(items.get("mode", "client"))
    if mode not in ("client", "server"):
        raise ConfigError(f"{what}: mode={mode!r}: use client (connect to a listening back-end) or server (listen)")
    memory = str(items.get("memory", "auto"))
    try:
        mem = MemoryMode(memory)
    except ValueError:
        raise ConfigError(f"{what}: memory={memory!r}: use one of {', '.join(m.value for m in MemoryMode)}") from None
    queue_size = _int(items.get("queue-size", DEFAULT_QUEUE_SIZE), f"{what}: queue-size", 1, MAX_QUEUE_SIZE)
    if queue_size & (queue_size - 1):
        raise ConfigError(f"{what}: queue-size={queue_size}: not a power of two (virtio 1.2 §2.7: a split "
                          f"virtqueue's size is a power of two, at most {MAX_QUEUE_SIZE})")
    queues = items.get("queues")
    no_advance = _no_advance(items.get("xen-no-advance", "rust-vmm"), f"{what}: xen-no-advance")
    mac = str(items.get("mac", ""))
    if mac:
        try:
            parse_mac(mac)
        except ValueError as e:
            raise ConfigError(f"{what}: {e}") from None
    device_id = virtio_id(str(items["type"]), f"{what}: type")
    cid = None
    if "cid" in items:
        if device_id != VIRTIO_IDS["vsock"]:
            raise ConfigError(f"{what}: cid= is the guest's vsock address: only for type=vsock")
        try:
            cid = parse_cid(str(items["cid"]))
        except ValueError as e:
            raise ConfigError(f"{what}: {e}") from None
    return DeviceConfig(
        devid=_int(items.get("devid", 0), f"{what}: devid", 0, 2**31 - 1),
        device_id=device_id,
        base=0,
        irq=0,
        socket=check_socket_template(str(items["socket"]), f"{what}: socket") if "socket" in items else "",
        listen=mode == "server",
        queue_size=queue_size,
        num_queues=None if queues is None else _int(queues, f"{what}: queues", 1, 1024),
        grants=_bool(items.get("grants", False), f"{what}: grants"),
        memory=mem,
        xen_no_advance=no_advance,
        mac=mac.strip().lower(),
        cid=cid,
        source=source,
    )


def _no_advance(text: object, what: str) -> int:
    """``rust-vmm`` / ``0x8`` or ``spec`` / ``0x100``."""
    s = str(text).strip().lower()
    if s in NO_ADVANCE_NAMES:
        return NO_ADVANCE_NAMES[s]
    try:
        n = int(s, 0)
    except ValueError:
        n = -1
    if n in (NO_ADVANCE_RUSTVMM, NO_ADVANCE_SPEC):
        return n
    raise ConfigError(f"{what}={text!r}: use rust-vmm (0x8, what rust-vmm Xen back-ends expect) or spec (0x100, the vhost-user spec's bit 8)")


def parse_device_arg(text: str, index: int = 0) -> DeviceConfig:
    """``--device type=blk,base=0x2000000,irq=33,socket=/run/qsd.sock[,mode=server,...]``."""
    items: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            # `type=virtio,device22` contains a comma: glue the fragment back on.
            if key.startswith("device") and items.get("type") == "virtio":
                items["type"] = f"virtio,{key}"
                continue
            raise ConfigError(f"--device {text!r}: {part!r} is not key=value")
        items[key.strip()] = value.strip()
    items.setdefault("devid", index)
    return _device(items, f"--device {text!r}", "cli")


@dataclass(frozen=True)
class TomlConfig:
    """What a TOML file sets: ``[[device]]`` tables, and optionally ``memory = "..."`` and
    ``backend-user = [...]`` (the same as ``--memory`` and ``--backend-user``)."""

    devices: tuple[DeviceConfig, ...] = ()
    memory: MemoryMode | None = None
    backend_users: tuple[str, ...] = ()


TOML_KEYS = ("device", "memory", "backend-user")


def load_guest_toml(path: str | Path, what: str = "--config") -> TomlConfig:
    """A TOML file (``--config FILE``, or the per-guest ``/etc/xen-vhost-master/<name>.toml``);
    ``what`` starts every error message (which is one line, naming the file)."""
    import tomllib  # noqa: PLC0415  (only a daemon given a file pays for the parser)

    where = f"{what} {path}" if what else str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    except ValueError as e:  # tomllib.TOMLDecodeError, or bytes that are not UTF-8
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(TOML_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown {', '.join(_toml_item(k, data[k]) for k in unknown)}; known: "
                          "[[device]] tables, memory = \"MODE\", backend-user = [...]")
    tables = data.get("device", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: 'device' must be an array of tables ([[device]])")
    devices = tuple(_device({"devid": i, **t}, f"{where} device #{i}", "config") for i, t in enumerate(tables))
    memory = None
    if "memory" in data:
        try:
            memory = MemoryMode(data["memory"])
        except ValueError:
            raise ConfigError(f"{where}: memory={data['memory']!r}: use one of "
                              f"{', '.join(m.value for m in MemoryMode)}") from None
    users = data.get("backend-user", [])
    if isinstance(users, (str, int)):
        users = [users]
    if not isinstance(users, list) or not all(isinstance(u, (str, int)) and not isinstance(u, bool) for u in users):
        raise ConfigError(f"{where}: backend-user must be a user name or uid, or a list of them")
    return TomlConfig(devices, memory, tuple(str(u) for u in users))


def _toml_item(key: str, value: object) -> str:
    """How ``key`` was written at the top level: ``[[key]]``, ``[key]`` or ``key = ...``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"table [[{key}]]"
    if isinstance(value, dict):
        return f"table [{key}]"
    return f"key {key}"


def load_toml(path: str | Path) -> list[DeviceConfig]:
    """A TOML file's ``[[device]]`` tables (same keys as ``--device``)."""
    return list(load_guest_toml(path).devices)


def device_from_xenstore(kind: str, devid: int, keys: Mapping[str, str]) -> DeviceConfig:
    """A device from libxl's backend directory (kind ``virtio`` ≥ 4.18 or ``virtio_disk`` 4.17).

    ``base`` is hex for ``virtio`` and decimal for ``virtio_disk`` and early libxl: ``int(s, 0)``
    reads both.
    """
    what = f"xenstore backend/{kind}/{devid}"
    transport = keys.get("transport", "mmio")
    if transport != "mmio":
        raise ConfigError(f"{what}: transport={transport!r}: only mmio is supported")
    if kind == "virtio_disk":
        if keys.get("specification", "virtio") != "virtio":
            raise ConfigError(f"{what}: specification={keys.get('specification')!r} is not virtio")
        type_ = "2"
    elif kind == "virtio":
        type_ = keys.get("type", "")
    else:
        raise ConfigError(f"{what}: unknown device kind {kind!r}")
    items: dict[str, object] = {"devid": devid, "type": type_, "grants": keys.get("grant_usage", "0")}
    for key in ("base", "irq", "mac"):
        if key in keys:
            items[key] = keys[key]
    return _device(items, what, "xenstore")


def merge(discovered: Iterable[DeviceConfig], explicit: Iterable[DeviceConfig]) -> tuple[DeviceConfig, ...]:
    """Explicit devices (CLI/TOML) win over discovered ones with the same MMIO base (or PCI function).

    An explicit device that matches a discovered one takes the discovered devid (so the socket
    template and the xenstore handshake refer to the same device); settings come from the explicit one.
    """
    by_key = {d.key: d for d in discovered}
    out: dict[int, DeviceConfig] = dict(by_key)
    given: dict[int, DeviceConfig] = {}
    for d in explicit:
        if d.key in given:  # two explicit devices at one place: neither may silently win
            other = given[d.key]
            if d.pci:
                raise ConfigError(f"devices {other.devid} ({other.source}) and {d.devid} ({d.source}) are both "
                                  f"{d.where}")
            raise ConfigError(f"devices {other.devid} ({other.source}) and {d.devid} ({d.source}) overlap: "
                              f"MMIO windows at {other.base:#x} and {d.base:#x}")
        given[d.key] = d
        if d.key in by_key:
            d = replace(d, devid=by_key[d.key].devid)
        out[d.key] = d
    devices = sorted(out.values(), key=lambda d: d.key)
    windows = [d for d in devices if not d.pci]
    for a, b in itertools.pairwise(windows):
        if a.base + WINDOW_SIZE > b.base:
            raise ConfigError(f"devices {a.devid} ({a.source}) and {b.devid} ({b.source}) overlap: MMIO windows at {a.base:#x} and {b.base:#x}")
    return tuple(devices)
