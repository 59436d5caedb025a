"""A virtio-pci function's slot checked against QEMU's devices (issue 20): before it claims a
function, the daemon asks the guest's device model over its QMP socket (``query-pci``,
xen_vhost_master/xen/qmp.py) and refuses, in one line and with nothing left behind, a function in
a slot one of QEMU's devices holds (Xen would route that slot's configuration space to the daemon
and take the device away from the guest). A free slot is served; no monitor, or one that does not
answer, leaves the slot unchecked (said in the log) and the function served.

QEMU's side is played by a QMP server in the test's event loop (QEMU's docs/interop/qmp-spec.rst:
greeting, ``qmp_capabilities``, events between answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from test_pci_daemon import DEV, DOMID, pci_options
from test_waiting_backend import TIMEOUT, Backend, running

from xen_vhost_master.errors import ExitCode
from xen_vhost_master.supervisor import Supervisor
from xen_vhost_master.xen.qmp import QmpError, query_pci

# what Xen 4.17's qemu-xen answers for an HVM guest with vga="none" (the x86 lab), bus 0
I440FX = {"bus": 0, "slot": 0, "function": 0, "class_info": {"class": 0x600, "desc": "Host bridge"},
          "id": {"vendor": 0x8086, "device": 0x1237}, "qdev_id": "", "regions": []}
PIIX3 = {"bus": 0, "slot": 1, "function": 0, "class_info": {"class": 0x601, "desc": "ISA bridge"},
         "id": {"vendor": 0x8086, "device": 0x7000}, "qdev_id": "", "regions": []}
PLATFORM = {"bus": 0, "slot": 2, "function": 0, "class_info": {"class": 0xFF80},
            "id": {"vendor": 0x5853, "device": 0x0001}, "qdev_id": "", "regions": []}


def nic(slot: int) -> dict[str, Any]:
    return {"bus": 0, "slot": slot, "function": 0, "class_info": {"class": 0x200, "desc": "Ethernet controller"},
            "id": {"vendor": 0x8086, "device": 0x100E}, "qdev_id": "nic0", "regions": []}


class Monitor:
    """A QMP monitor: greets, takes ``qmp_capabilities``, answers ``query-pci`` with ``devices``
    (an event first, as a real monitor may send); ``answer`` replaces the whole exchange."""

    def __init__(self, path: str, devices: list[dict[str, Any]],
                 answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] | None = None) -> None:
        self.path, self.devices, self.answer = path, devices, answer
        self.commands: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.answer is not None:
                await self.answer(reader, writer)
                return
            writer.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}\n')
            while line := await reader.readline():
                cmd = json.loads(line)
                self.commands.append(cmd["execute"])
                if cmd["execute"] == "query-pci":
                    writer.write(b'{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}\n')
                    ret: Any = [{"bus": 0, "devices": self.devices}]
                else:
                    ret = {}
                writer.write(json.dumps({"return": ret, "id": cmd.get("id")}).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Monitor]:
        self.server = await asyncio.start_unix_server(self._client, self.path)
        try:
            yield self
        finally:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.asyncio
async def test_a_function_in_a_slot_of_qemus_devices_is_refused_in_one_line(platform, sim_host, sim_control,
                                                                             sim_dir, caplog):
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, arch="x86_64")
    qmp = os.path.join(sim_dir, "qmp")
    async with Monitor(qmp, [I440FX, PIIX3, PLATFORM, nic(DEV)]).serving() as monitor:
        sup = Supervisor(replace(pci_options(os.path.join(sim_dir, "blk.sock")), qmp_socket=qmp), platform)
        assert await asyncio.wait_for(sup.run(), TIMEOUT) == ExitCode.CONFIG
    assert monitor.commands == ["qmp_capabilities", "query-pci"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"dom{DOMID}: configuration error: device 0 (transport=pci, bdf=00:{DEV:02x}.0): slot 00:{DEV:02x} is QEMU's (the guest's "
                      f"device model): 00:{DEV:02x}.0 8086:100e (Ethernet controller) 'nic0'; choose a free slot"]
    info = sim_control.domain_info(DOMID)
    assert info["servers"] == []  # no IOREQ server, no SBDF claimed: nothing left behind


@pytest.mark.asyncio
async def test_a_free_slot_is_served_and_the_slots_qemu_uses_are_logged(platform, sim_host, sim_control, sim_dir,
                                                                        caplog):
    caplog.set_level(logging.INFO)
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, arch="x86_64")
    sock, qmp = os.path.join(sim_dir, "blk.sock"), os.path.join(sim_dir, "qmp")
    backend = Backend(sock)
    await backend.start()
    try:
        async with Monitor(qmp, [I440FX, PIIX3, PLATFORM, nic(DEV + 1)]).serving():
            async with running(platform, replace(pci_options(sock), qmp_socket=qmp)) as daemon:
                await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
        assert f"QEMU's PCI functions (00:00, 00:01, 00:02, 00:{DEV + 1:02x}) leave slot(s) 00:{DEV:02x} free" \
            in caplog.text
    finally:
        await backend.stop()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # greets nobody, answers nothing: the daemon's bound ends it


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"Welcome to something else\n")
    await writer.drain()


@pytest.mark.asyncio
@pytest.mark.parametrize("monitor", ["none", "silent", "garbage"])
async def test_without_an_answering_monitor_the_slot_is_unchecked_and_served(platform, sim_host, sim_control,
                                                                             sim_dir, caplog, monkeypatch, monitor):
    import xen_vhost_master.supervisor as supervisor

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(supervisor, "QMP_TIMEOUT", 0.5)
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, arch="x86_64")
    sock, qmp = os.path.join(sim_dir, "blk.sock"), os.path.join(sim_dir, "qmp")
    backend = Backend(sock)
    await backend.start()
    answer = {"silent": _silent, "garbage": _garbage}.get(monitor)
    try:
        async with Monitor(qmp, [], answer).serving() if answer else _nothing():
            async with running(platform, replace(pci_options(sock), qmp_socket=qmp)) as daemon:
                await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
        said = {"none": f"no QEMU monitor at {qmp} (No such file or directory): PCI slots not checked",
                "silent": f"QEMU's monitor at {qmp} did not list its PCI functions (no answer in 0.5 s)",
                "garbage": f"QEMU's monitor at {qmp} did not list its PCI functions (not JSON: "}[monitor]
        assert said in caplog.text
    finally:
        await backend.stop()


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield None


@pytest.mark.asyncio
async def test_query_pci_lists_the_functions_behind_a_bridge_and_refuses_a_malformed_device(sim_dir):
    behind = {**nic(3), "bus": 1}
    bridge = {**PIIX3, "slot": 5, "class_info": {"class": 0x604, "desc": "PCI bridge"},
              "pci_bridge": {"bus": {"number": 1, "secondary": 1, "subordinate": 1}, "devices": [behind]}}
    qmp = os.path.join(sim_dir, "qmp")
    async with Monitor(qmp, [I440FX, bridge]).serving():
        found = await query_pci(qmp, TIMEOUT)
    assert [(f.bus, f.slot, f.function, f.vendor, f.device) for f in found] == [
        (0, 0, 0, 0x8086, 0x1237), (0, 5, 0, 0x8086, 0x7000), (1, 3, 0, 0x8086, 0x100E)]
    async with Monitor(qmp, [{"bus": 0, "slot": 4}]).serving():
        with pytest.raises(QmpError, match="a device without bus/slot/function/id/class_info"):
            await query_pci(qmp, TIMEOUT)
