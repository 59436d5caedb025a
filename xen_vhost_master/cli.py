"""``xen-vhost-master``: serve one Xen guest's virtio devices with vhost-user back-ends.

    xen-vhost-master --domid 5                       # devices from xenstore (libxl's layout)
    xen-vhost-master --domid 5 --device type=blk,base=0x2000000,irq=33,socket=/run/qsd.sock
    xen-vhost-master status --domid 5                # what the running daemon is doing
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import socket
import sys
from typing import TYPE_CHECKING

from .config import MemoryMode, load_toml, parse_device_arg
from .errors import ConfigError

if TYPE_CHECKING:
    from .supervisor import Options

# The supervisor (and with it the vhost-user library, construct, the data paths) and uvloop are
# imported only by the commands that use them: --help, a bad argument and `status` start faster.

__all__ = ["main", "parse_args"]

RUNTIME_DIR = "/run/xen-vhost-master/{domid}"

EPILOG = """\
devices:
  Without --device/--config, devices come from xenstore: libxl writes them under
  /local/domain/<backend-domid>/backend/{virtio,virtio_disk}/<domid>/<devid> when the guest is
  created (xl.cfg: virtio = [ "type=virtio,device2,transport=mmio" ], or on Xen 4.17
  disk = [ "backendtype=standalone,specification=virtio,..." ]). They are watched: devices
  added or removed while the guest runs appear and disappear. --device and --config entries
  win over xenstore entries at the same MMIO base.

--device keys:
  type=blk|net|fs|...|<number>|virtio,deviceNN   virtio device type (required)
  base=0x2000000     MMIO window base, hex or decimal (required)
  irq=33             interrupt line: the GIC SPI on Arm (required)
  socket=PATH        back-end socket (default: <runtime-dir>/<devid>.sock)
  mode=client|server client: connect to a listening back-end (qemu-storage-daemon);
                     server: listen, the back-end connects (dpdk-testpmd client=1, vhost-device-*)
  queue-size=256     QueueNumMax offered to the guest
  queues=N           number of queues (default: the back-end's GET_QUEUE_NUM, else 1)
  memory=MODE        auto | xen-mmap | shadow | sim-memfd (see --memory)
  grants=0|1         grant-based guest (xl grant_usage=1)
  xen-no-advance=rust-vmm|spec
                     grant guest over XEN_MMAP: the "not mapped in advance" region flag,
                     rust-vmm = 0x8 (default: what rust-vmm Xen back-ends expect),
                     spec = 0x100 (the vhost-user spec's bit 8); the back-end must agree
  devid=N            device id (default: position on the command line)

exit codes: 0 stopped cleanly; 69 no such domain; 75 transient failure (systemd restarts);
78 configuration error (fix it; no restart).

On a dom0 the daemon opens /dev/xen/{privcmd,evtchn,gntdev,xenbus}. With XEN_VHOST_SIM=<socket>
in the environment it attaches to a simulated Xen host (xen-vhost-sim) instead.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="xen-vhost-master",
        description="Serve a Xen guest's virtio-mmio devices with vhost-user back-ends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", nargs="?", choices=["serve", "status"], default="serve",
                   help="serve (default) the guest, or print the running daemon's status")
    p.add_argument("--domid", type=int, required=True, help="the guest's domain id")
    p.add_argument("--device", action="append", default=[], metavar="KEY=VALUE,...",
                   help="a device (see 'devices' below); may be repeated")
    p.add_argument("--config", metavar="FILE", help="a TOML file with [[device]] tables (same keys as --device)")
    p.add_argument("--no-xenstore", action="store_true", help="do not discover or watch devices in xenstore")
    p.add_argument("--memory", default="auto", choices=[m.value for m in MemoryMode],
                   help="how guest memory reaches back-ends: auto (XEN_MMAP when the back-end offers it), "
                        "xen-mmap, shadow (copying; any back-end), sim-memfd (simulator-only baseline)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help=f"back-end sockets and status socket (default {RUNTIME_DIR.format(domid='<domid>')})")
    p.add_argument("--backend-user", action="append", default=[], metavar="USER",
                   help="a user (name or uid) whose back-ends may connect or be connected to, besides "
                        "root and the daemon's own user (checked with SO_PEERCRED); may be repeated")
    p.add_argument("--backend-domid", type=int, default=0, help="the domain this daemon runs in (default 0)")
    p.add_argument("--guest-arch", choices=["arm64", "x86_64"], help="guest memory layout (default: the host's)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p.parse_args(argv)


def _options(args: argparse.Namespace) -> Options:
    from .supervisor import Options  # noqa: PLC0415

    if args.domid < 0 or args.domid >= 0x7FF0:
        raise ConfigError(f"--domid {args.domid}: a guest's domain id is between 1 and 32751")
    devices = [parse_device_arg(text, i) for i, text in enumerate(args.device)]
    if args.config:
        devices += load_toml(args.config)
    runtime = args.runtime_dir or RUNTIME_DIR.format(domid=args.domid)
    uids = []
    for user in args.backend_user:
        try:
            uids.append(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"--backend-user {user}: no such user") from None
    return Options(
        domid=args.domid,
        devices=tuple(devices),
        xenstore=not args.no_xenstore,
        memory=MemoryMode(args.memory),
        socket_dir=runtime,
        backend_domid=args.backend_domid,
        status_socket=os.path.join(runtime, "status.sock"),
        state_file=os.path.join(runtime, "state.json"),
        guest_arch=args.guest_arch,
        backend_uids=tuple(uids),
    )


def _status(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError as e:
            print(f"xen-vhost-master: no daemon answers on {path}: {e.strerror}", file=sys.stderr)
            from .supervisor import ExitCode  # noqa: PLC0415

            return int(ExitCode.UNAVAILABLE)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print(json.dumps(json.loads(data), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose or args.command == "serve" else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = _options(args)
    except ConfigError as e:
        print(f"xen-vhost-master: {e}", file=sys.stderr)
        from .supervisor import ExitCode  # noqa: PLC0415

        return int(ExitCode.CONFIG)
    if args.command == "status":
        assert options.status_socket is not None
        return _status(options.status_socket)
    os.makedirs(options.socket_dir or ".", mode=0o700, exist_ok=True)
    import uvloop  # noqa: PLC0415

    from .supervisor import Supervisor  # noqa: PLC0415

    return uvloop.run(Supervisor(options).run())


if __name__ == "__main__":
    raise SystemExit(main())
