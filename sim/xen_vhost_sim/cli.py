"""``xen-vhost-sim``: run a simulated Xen host as its own process.

    xen-vhost-sim --socket /run/xen-sim.sock --domain domid=1,mem=1G,vcpus=2 \\
                  --domain domid=2,mem=4G,arch=x86_64,hole=0x50000000+0x100000 \\
                  --virtio domid=1,device_id=2,base=0x2000000,irq=33

A daemon attaches with ``XEN_VHOST_SIM=/run/xen-sim.sock xen-vhost-master ...``; guests live in
this process, so the daemon can be killed and restarted while they keep running. ``--ready-fd N``
writes ``ready\\n`` to fd N once the socket listens (for supervisors and tests).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from xen_vhost_sim.host import serve
from xen_vhost_sim.hypervisor import HvError, Hypervisor
from xen_vhost_sim.server import SimServer

__all__ = ["main", "parse_domain_spec", "parse_size", "parse_virtio_spec"]

log = logging.getLogger("xen_vhost_sim")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``512M``, ``1G``, ``0x1000``."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS and not t.startswith("0X") else ""
    return int(t[: len(t) - len(unit)] if unit else t, 0) * _UNITS[unit]


def parse_domain_spec(spec: str) -> dict[str, object]:
    """``domid=1,mem=1G,vcpus=2,arch=arm64,name=g,hole=GPA+SIZE[,hole=...][,paged=GPA+SIZE]``
    → create_domain kwargs (holes: unpopulated; paged: ENOENT on the first foreign map)."""
    out: dict[str, object] = {"holes": []}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        if key == "domid":
            out["domid"] = int(value, 0)
        elif key == "mem":
            out["mem_bytes"] = parse_size(value)
        elif key == "vcpus":
            out["vcpus"] = int(value)
        elif key in ("arch", "name"):
            out[key] = value
        elif key in ("hole", "paged"):
            gpa, plus, size = value.partition("+")
            if not plus:
                raise argparse.ArgumentTypeError(f"{key}=GPA+SIZE")
            ranges = out.setdefault(key if key == "paged" else "holes", [])
            assert isinstance(ranges, list)
            ranges.append((int(gpa, 0), parse_size(size)))
        else:
            raise argparse.ArgumentTypeError(f"unknown domain key {key!r}")
    return out


def parse_virtio_spec(spec: str) -> dict[str, object]:
    """``domid=1,device_id=2,base=0x2000000,irq=33[,devid=0][,backend_domid=0][,kind=virtio]``."""
    out: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("domid", "devid", "device_id", "base", "irq", "backend_domid", "kind", "grant_usage"):
            raise argparse.ArgumentTypeError(f"bad virtio item {item!r}")
        out[key] = value if key == "kind" else int(value, 0)
    for key in ("domid", "device_id", "base", "irq"):
        if key not in out:
            raise argparse.ArgumentTypeError(f"virtio spec needs {key}=")
    return out


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="xen-vhost-sim", description="Simulated Xen host for xen-vhost-master")
    p.add_argument("--socket", required=True, help="Unix socket to listen on (clients: XEN_VHOST_SIM=<path>)")
    p.add_argument("--domain", action="append", default=[], type=parse_domain_spec, metavar="SPEC",
                   help="create a guest: domid=N,mem=SIZE,vcpus=N,arch=arm64|x86_64,hole=GPA+SIZE")
    p.add_argument("--virtio", action="append", default=[], type=parse_virtio_spec, metavar="SPEC",
                   help="add a virtio-mmio device (libxl xenstore nodes): domid=N,device_id=2,base=0x2000000,irq=33[,devid=0]")
    p.add_argument("--xenstore-socket", default=None, metavar="PATH",
                   help="also serve the simulated xenstored on this Unix socket (like /var/run/xenstored/socket)")
    p.add_argument("--privcmd-eventfd", choices=["enotty", "eopnotsupp", "on"], default="enotty",
                   help="dom0 kernel's privcmd IRQFD/IOEVENTFD: enotty (Linux 6.1, default), "
                        "eopnotsupp (no CONFIG_XEN_PRIVCMD_EVENTFD), on (Linux >= 6.7 with it)")
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready\\n' to this fd when listening")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s xen-vhost-sim %(levelname)s %(name)s: %(message)s")

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        failure: list[HvError] = []

        def started(hv: Hypervisor, server: SimServer) -> None:
            for spec in args.domain:
                try:
                    dom = hv.create_domain(**spec)
                except (HvError, ValueError) as exc:
                    log.error("cannot create domain %s: %s", spec, exc)
                    failure.append(HvError(22, str(exc)))
                    stop.set()
                    return
                if server.toolstack is not None:
                    server.toolstack.domain_created(dom)
            for vspec in args.virtio:
                if server.toolstack is None:
                    log.error("--virtio needs the simulated xenstored")
                    failure.append(HvError(2))
                    stop.set()
                    return
                server.toolstack.add_virtio_device(vspec)
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)

        await serve(args.socket, started, stop, xenstore_socket=args.xenstore_socket,
                    privcmd_eventfd=args.privcmd_eventfd)
        return 1 if failure else 0

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
