"""A stand-in device model process for tests/sim/test_sim_process.py (not a test module).

    python dm_client.py first <domid> <base>    create an IOREQ server, take one request, then hang
    python dm_client.py again <domid> <value>   re-attach to the existing server, answer what is pending

It uses only the real adapters over the kernel of ``platform_from_env()`` (XEN_VHOST_SIM) and reports on
stdout.
"""

from __future__ import annotations

import select
import signal
import sys

from xen_vhost_master.errors import XenError
from xen_vhost_master.platform import platform_from_env
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd

TIMEOUT = 10.0


def wait_ports(ev: EventChannel) -> list[int]:
    while True:
        ports = ev.read_pending()
        if ports:
            ev.unmask(*ports)
            return ports
        if not select.select([ev.fileno()], [], [], TIMEOUT)[0]:
            raise TimeoutError("no event")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    phase, domid = sys.argv[1], int(sys.argv[2])
    kernel = platform_from_env().kernel
    pc, ev = PrivCmd(kernel), EventChannel(kernel)
    dm = DeviceModel(pc, domid)
    nr = dm.nr_vcpus()
    if phase == "first":
        base = int(sys.argv[3], 0)
        new = dm.create_ioreq_server()
        page = IoreqPage.map(pc, domid, new, nr)
        dm.set_ioreq_server_state(new, True)
        ports = [ev.bind_interdomain(domid, page.vp_eport(i)) for i in range(nr)]
        dm.map_io_range(new, base, base + 0x1FF)
        wait_ports(ev)  # the conservative event of the fresh binding
        say(f"attached {new}")
        while True:
            for port in wait_ports(ev):
                req = page.take(ports.index(port))
                if req is not None:
                    say(f"took {req.addr:#x}")  # ... and die before answering
                    signal.pause()
    value = int(sys.argv[3], 0)
    sid: int | None = None
    for candidate in range(8):  # find our predecessor's server
        try:
            dm.get_ioreq_server_info(candidate)
        except XenError:
            continue
        sid = candidate
        break
    if sid is None:
        say("no server")
        return 1
    page = IoreqPage.map(pc, domid, sid, nr)
    ports = [ev.bind_interdomain(domid, page.vp_eport(i)) for i in range(nr)]
    wait_ports(ev)  # binding raises an event; the slot tells what is pending
    served = 0
    for vcpu in page.unfinished():
        req = page.take(vcpu, recover=True)
        assert req is not None
        page.complete(vcpu, value)
        ev.notify(ports[vcpu])
        served += 1
        say(f"served {req.addr:#x}")
    say(f"done {served}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
