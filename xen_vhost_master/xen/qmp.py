"""The PCI functions of an HVM guest's device model (QEMU), asked over its QMP socket.

libxl starts QEMU (``device_model_version = "qemu-xen"``) with a QMP monitor on
``/var/run/xen/qmp-libxl-<domid>`` (libxl's ``libxl__qemu_qmp_path``: ``XEN_RUN_DIR``); the
daemon asks it ``query-pci`` (QEMU's qapi/pci.json) before it claims a PCI function of its own, so
that a claim never takes a slot away from one of QEMU's devices (Xen routes a function's
configuration space to the secondary IOREQ server that claims its SBDF, QEMU's device or not).

The QMP wire protocol (QEMU's docs/interop/qmp-spec.rst): the server greets with ``{"QMP": ...}``,
the client sends ``qmp_capabilities`` and then commands, one JSON object each; every command is
answered by an object with ``return`` or ``error``; asynchronous ``event`` objects may come in
between. The monitor serves one client at a time (libxl connects for each of its operations):
the connection is held only for the two commands, bounded in time and in size.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from typing import Any, Final

from .xenstore import connect_stream

__all__ = ["QMP_SOCKET_TEMPLATE", "QmpError", "QemuPciFunction", "query_pci"]

QMP_SOCKET_TEMPLATE: Final = "/var/run/xen/qmp-libxl-{domid}"
MAX_REPLY: Final = 1 << 20  # one reply (a line) at most: query-pci of a full bus is some 10 KiB
MAX_OBJECTS: Final = 64  # objects read for one command (events in between included)


class QmpError(Exception):
    """The monitor could not be asked, or answered something else than the protocol says."""


@dataclass(frozen=True)
class QemuPciFunction:
    """One function QEMU emulates (``PciDeviceInfo``): where, what, and its qdev id."""

    bus: int
    slot: int
    function: int
    vendor: int
    device: int
    description: str
    qdev_id: str

    def __str__(self) -> str:
        name = f" {self.qdev_id!r}" if self.qdev_id else ""
        return f"{self.bus:02x}:{self.slot:02x}.{self.function} {self.vendor:04x}:{self.device:04x} ({self.description}){name}"


async def query_pci(path: str, timeout: float) -> list[QemuPciFunction]:
    """Every PCI function QEMU lists (bridges' buses too), in its order; QmpError if the monitor
    at ``path`` cannot be reached or answers wrongly within ``timeout`` seconds (OSError of the
    connection included: FileNotFoundError when there is no socket)."""
    async with asyncio.timeout(timeout):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened = False
        try:
            sock.setblocking(False)
            await connect_stream(sock, path)  # (open_unix_connection's would take a full backlog for success)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REPLY)
            opened = True
        finally:
            if not opened:  # refused, timed out or cancelled: the writer would have owned it
                sock.close()
        try:
            greeting = await _read(reader)
            if "QMP" not in greeting:
                raise QmpError(f"no QMP greeting: {_short(greeting)}")
            await _command(reader, writer, "qmp_capabilities", 1)
            buses = await _command(reader, writer, "query-pci", 2)
        finally:
            writer.close()
    found: list[QemuPciFunction] = []
    if not isinstance(buses, list):
        raise QmpError(f"query-pci returned {_short(buses)}, not a list of buses")
    for bus in buses:
        _devices(bus, found)
    return found


def _devices(bus: object, found: list[QemuPciFunction]) -> None:
    """The functions of one ``PciInfo`` (and of the buses behind its bridges)."""
    devices = bus.get("devices") if isinstance(bus, dict) else None
    if not isinstance(devices, list):
        raise QmpError(f"query-pci: a bus without its device list: {_short(bus)}")
    for d in devices:
        try:
            ident, klass = d["id"], d["class_info"]
            found.append(QemuPciFunction(
                int(d["bus"]), int(d["slot"]), int(d["function"]), int(ident["vendor"]), int(ident["device"]),
                str(klass.get("desc") or f"class {int(klass['class']):#06x}"), str(d.get("qdev_id", ""))))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise QmpError(f"query-pci: a device without bus/slot/function/id/class_info: {_short(d)}") from None
        bridge = d.get("pci_bridge")
        if isinstance(bridge, dict) and "devices" in bridge:
            _devices(bridge, found)


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, ident: int) -> Any:
    writer.write(json.dumps({"execute": name, "id": ident}).encode() + b"\n")
    await writer.drain()
    for _ in range(MAX_OBJECTS):
        reply = await _read(reader)
        if "event" in reply:
            continue
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc") if isinstance(error, dict) else error
            raise QmpError(f"{name}: {desc}")
        if "return" in reply:
            return reply["return"]
        raise QmpError(f"{name}: neither return nor error: {_short(reply)}")
    raise QmpError(f"{name}: no answer among {MAX_OBJECTS} objects")


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise QmpError("the monitor closed the connection") from None
    except asyncio.LimitOverrunError:
        raise QmpError(f"a reply longer than {MAX_REPLY} bytes") from None
    try:
        obj = json.loads(line)
    except ValueError:
        raise QmpError(f"not JSON: {_short(line)}") from None
    if not isinstance(obj, dict):
        raise QmpError(f"not a JSON object: {_short(obj)}")
    return obj


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
