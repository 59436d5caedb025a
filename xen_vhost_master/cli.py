"""``xen-vhost-master``: serve one Xen guest's virtio devices with vhost-user back-ends.

    xen-vhost-master --domain web1                   # devices from xenstore (libxl's layout)
    xen-vhost-master --domain 5 --device type=blk,base=0x2000000,irq=33,socket=/run/qsd.sock
    xen-vhost-master status --domain web1            # what the running instance is doing
    xen-vhost-master watch [--spawn]                 # start one instance per guest (dispatcher.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import signal
import socket
import sys
from typing import TYPE_CHECKING

from .config import (
    MemoryMode,
    check_socket_template,
    load_guest_toml,
    parse_device_arg,
)
from .errors import ConfigError, DaemonError, ExitCode
from .names import path_name
from .instance import (
    RUNTIME_ROOT,
    AlreadyServed,
    DomainNotFound,
    GuestDomain,
    InstanceLock,
    find_runtime_by_domid,
    resolve_domain,
    runtime_dir,
)
from .platform import Platform, announce, platform_from_env
from .version import VersionAction
from .xen.xenstore_wire import XenstoreError

if TYPE_CHECKING:
    from .supervisor import Options

# The supervisor (and with it the vhost-user library, construct, the data paths), uvloop and the
# xenstore client (asyncio) are imported only by the commands that use them: --help, a bad
# argument, `status --domain NAME` and `watch` start faster.

__all__ = ["main", "parse_args"]

CONFIG_DIR = "/etc/xen-vhost-master"

EPILOG = """the guest:
  --domain takes the guest's name or its current domain id (all digits: an id, as with xl).
  It is resolved once, at start, through xenstore (/local/domain/*/name). The instance is keyed
  by the NAME: systemd's xen-vhost-master@<name>.service (the instance is the name escaped by
  systemd-escape(1); the unit runs --domain %I), the runtime directory
  /run/xen-vhost-master/<escaped name>/ (lock, state.json, status.sock) and the per-guest
  configuration file <config-dir>/<name>.toml. One instance per guest: a second one exits 73.

devices:
  Without --device/--config, devices come from xenstore: libxl writes them under
  /local/domain/<backend-domid>/backend/{virtio,virtio_disk}/<domid>/<devid> when the guest is
  created (xl.cfg: virtio = [ "type=virtio,device2,transport=mmio" ], or on Xen 4.17
  disk = [ "backendtype=standalone,specification=virtio,..." ]). They are watched: devices
  added or removed while the guest runs appear and disappear. --device and --config entries
  win over xenstore entries at the same MMIO base.

back-end sockets:
  Default: /run/vhost-user/{name}/{devid}.sock, a directory the operator's back-end units own
  (systemd/xen-vhost-master.tmpfiles.conf creates /run/vhost-user). socket= and --socket are
  templates: {name} the guest's name (= %I of a back-end's template unit; escaped as
  systemd-escape does, = %i, only when it is not one plain path component), {domid} its
  current domain id, {devid} the device id, {vdev} the disk name decoded from a Xen
  virtual-block device id (51712 = xvda, 51728 = xvdb, 51729 = xvdb1; Xen 4.17 virtio_disk
  ids are these), else the id itself. {{ and }} are literal braces.
  In server mode the daemon creates the socket's directory (0755) and the socket (0600).

--device keys:
  type=blk|net|fs|...|<number>|virtio,deviceNN   virtio device type (required)
  base=0x2000000     MMIO window base, hex or decimal (required)
  irq=33             interrupt line: the GIC SPI on Arm (required)
  socket=TEMPLATE    back-end socket (default: --socket, see above)
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

configuration files:
  <config-dir>/<name>.toml is read when it exists (a name containing '/' or starting with '.'
  uses its escaped form), then --config FILE; both add devices. Keys: [[device]] tables (the
  --device keys), memory = "MODE", backend-user = ["USER", ...]. Flags win over files.

signals:
  SIGTERM/SIGINT: full teardown (rings stopped, IOREQ server destroyed, XenBus Closed), exit 0.
  SIGHUP (systemctl reload): handover. The back-ends' rings are stopped, state.json saved, and
  the process re-executes itself (same pid); the new image adopts the IOREQ server and devices
  and resumes the rings. The guest sees a pause, no reset.

exit codes: 0 stopped cleanly, or the domain went away; 69 no such domain; 73 the guest is
already served by another instance; 75 transient failure (systemd restarts); 78 configuration
error (fix it; no restart).

On a dom0 the daemon opens /dev/xen/{privcmd,evtchn,gntdev,xenbus}. With XEN_VHOST_SIM=<socket>
in the environment it attaches to a simulated Xen host (xen-vhost-sim, an installed platform)
instead, and its first log line says so.
"""


def _domid_flag(text: str) -> str:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain id (use --domain for a name)")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="xen-vhost-master",
        description="Serve a Xen guest's virtio-mmio devices with vhost-user back-ends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=VersionAction)
    p.add_argument("command", nargs="?", choices=["serve", "status"], default="serve",
                   help="serve (default) the guest, or print the running instance's status")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--domain", metavar="NAME|ID", help="the guest: its name, or its current domain id")
    target.add_argument("--domid", type=_domid_flag, metavar="ID", help="the same as --domain ID")
    p.add_argument("--device", action="append", default=[], metavar="KEY=VALUE,...",
                   help="a device (see 'devices' below); may be repeated")
    p.add_argument("--config", metavar="FILE", help="a TOML file with [[device]] tables (same keys as --device)")
    p.add_argument("--config-dir", metavar="DIR", default=CONFIG_DIR,
                   help=f"where the per-guest <name>.toml is looked for (default {CONFIG_DIR})")
    p.add_argument("--no-xenstore", action="store_true",
                   help="do not use xenstore: no device discovery or watch; --domain must be an id")
    p.add_argument("--memory", choices=[m.value for m in MemoryMode],
                   help="how guest memory reaches back-ends: auto (default; XEN_MMAP when the back-end offers it), "
                        "xen-mmap, shadow (copying; any back-end), sim-memfd (simulator-only baseline)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help=f"lock, state and status socket (default {RUNTIME_ROOT}/<escaped name>); when given, "
                        "back-end sockets default to DIR/{devid}.sock")
    p.add_argument("--socket", metavar="TEMPLATE",
                   help="back-end socket of devices without socket= (default /run/vhost-user/{name}/{devid}.sock)")
    p.add_argument("--backend-user", action="append", default=[], metavar="USER",
                   help="a user (name or uid) whose back-ends may connect or be connected to, besides "
                        "root and the daemon's own user (checked with SO_PEERCRED); may be repeated")
    p.add_argument("--backend-domid", type=int, default=0, help="the domain this daemon runs in (default 0)")
    p.add_argument("--guest-arch", choices=["arm64", "x86_64"], help="guest memory layout (default: the host's)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    args = p.parse_args(argv)
    if args.domain is None:
        args.domain = args.domid
    return args


def guest_config_path(config_dir: str, name: str) -> str:
    """``<config-dir>/<name>.toml`` (:func:`~xen_vhost_master.names.path_name`: a name that is not
    one plain path component uses its systemd-escaped form)."""
    return os.path.join(config_dir, f"{path_name(name)}.toml")


def _options(args: argparse.Namespace, guest: GuestDomain) -> Options:
    from .supervisor import Options  # noqa: PLC0415

    log = logging.getLogger("xen_vhost_master")
    devices = [parse_device_arg(text, i) for i, text in enumerate(args.device)]
    memory = None
    users: list[str] = []
    files = [(guest_config_path(args.config_dir, guest.name), "")]
    if args.config:
        files.append((args.config, "--config"))
    for path, what in files:
        if not what and not os.path.lexists(path):
            continue
        loaded = load_guest_toml(path, what)
        log.info("configuration from %s: %d device(s)", path, len(loaded.devices))
        devices += loaded.devices
        memory = loaded.memory or memory
        users += loaded.backend_users
    runtime = args.runtime_dir or runtime_dir(guest.name)
    if args.socket is not None:
        template = check_socket_template(args.socket, "--socket")
    elif args.runtime_dir:
        template = os.path.join(args.runtime_dir.replace("{", "{{").replace("}", "}}"), "{devid}.sock")
    else:
        template = None
    uids = []
    for user in [*users, *args.backend_user]:
        try:
            uids.append(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"backend-user {user}: no such user") from None
    return Options(
        domid=guest.domid,
        name=guest.name,
        devices=tuple(devices),
        xenstore=not args.no_xenstore,
        memory=MemoryMode(args.memory) if args.memory else memory or MemoryMode.AUTO,
        socket_template=template,
        backend_domid=args.backend_domid,
        runtime_dir=runtime,
        status_socket=os.path.join(runtime, "status.sock"),
        state_file=os.path.join(runtime, "state.json"),
        guest_arch=args.guest_arch,
        backend_uids=tuple(uids),
    )


def _platform(given: Platform | None) -> Platform:
    """The platform the caller handed over, else the one the environment asks for (platform.py)."""
    return given if given is not None else platform_from_env()


async def _resolve(args: argparse.Namespace, platform: Platform) -> GuestDomain:
    if args.no_xenstore:
        return await resolve_domain(None, args.domain, backend_domid=args.backend_domid)
    async with await platform.open_xenstore() as xs:
        return await resolve_domain(xs, args.domain, backend_domid=args.backend_domid)


def _fail(message: object, code: ExitCode) -> int:
    print(f"xen-vhost-master: {message}", file=sys.stderr)
    return int(code)


class _Handover:
    """Returned by :func:`_serve` when the instance asked to re-execute itself (SIGHUP)."""


async def _serve(args: argparse.Namespace, platform: Platform) -> int | _Handover:
    from .supervisor import Supervisor  # noqa: PLC0415

    try:
        guest = await _resolve(args, platform)
        options = _options(args, guest)
    except ConfigError as e:
        return _fail(e, ExitCode.CONFIG)
    except DomainNotFound as e:
        return _fail(e, ExitCode.UNAVAILABLE)
    except (XenstoreError, OSError) as e:
        return _fail(f"cannot resolve --domain {args.domain} through xenstore: {e}", ExitCode.TEMPFAIL)
    assert options.runtime_dir is not None
    try:
        os.makedirs(options.runtime_dir, mode=0o700, exist_ok=True)
        lock = InstanceLock.acquire(os.path.join(options.runtime_dir, "lock"), guest)
    except AlreadyServed as e:
        return _fail(e, ExitCode.ALREADY_SERVED)
    except (OSError, DaemonError) as e:
        return _fail(f"runtime directory {options.runtime_dir}: {e}", ExitCode.TEMPFAIL)
    supervisor = Supervisor(options, platform)
    handover = False
    try:
        code = await supervisor.run()
        handover = supervisor.handover
    finally:
        if handover:
            lock.keep_for_exec()  # the next image of this process holds it on
        else:
            lock.release()
    return _Handover() if handover else code


def _status_socket(args: argparse.Namespace, platform: Platform | None = None) -> str:
    """Where the instance for ``--domain`` answers: its runtime directory, found by name (no
    xenstore needed), or for an id through xenstore, else by the state files' domain ids."""
    if args.runtime_dir:
        return os.path.join(args.runtime_dir, "status.sock")
    text = args.domain
    if not (text.isascii() and text.isdigit()):
        return os.path.join(runtime_dir(text), "status.sock")
    from .eventloop import run  # noqa: PLC0415  (an id is resolved through xenstore)

    try:
        guest = run(_resolve(args, _platform(platform)))
        return os.path.join(runtime_dir(guest.name), "status.sock")
    except (DomainNotFound, XenstoreError, OSError) as e:
        found = find_runtime_by_domid(int(text))
        if found is None:
            raise DomainNotFound(f"no instance serves domain {text} ({e}; no {RUNTIME_ROOT}/*/state.json names it)") from None
        return os.path.join(found, "status.sock")


def _status(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError as e:
            print(f"xen-vhost-master: no daemon answers on {path}: {e.strerror}", file=sys.stderr)
            return int(ExitCode.UNAVAILABLE)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print(json.dumps(json.loads(data), indent=2))
    return 0


def main(argv: list[str] | None = None, platform: Platform | None = None) -> int:
    """``platform``: what to run on (a simulator's own launcher hands its own); None = the one the
    environment asks for (:func:`xen_vhost_master.platform.platform_from_env`), looked up once."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["watch"]:
        from .dispatcher import main as watch  # noqa: PLC0415

        return watch(argv[1:], platform)
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose or args.command == "serve" else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "status":
        try:
            return _status(_status_socket(args, platform))
        except ConfigError as e:
            return _fail(e, ExitCode.CONFIG)
        except DomainNotFound as e:
            return _fail(e, ExitCode.UNAVAILABLE)
    # A reload asked for before the handler exists: this image already is the new one.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        platform = _platform(platform)
    except ConfigError as e:
        return _fail(e, ExitCode.CONFIG)
    announce(platform, logging.getLogger("xen_vhost_master"))
    from .eventloop import run  # noqa: PLC0415

    result = run(_serve(args, platform))
    if isinstance(result, _Handover):
        return _reexec(sys.argv[1:] if argv is None else argv)
    return result


def _reexec(argv: list[str]) -> int:
    """Replace this process's image with a fresh one of the same command: same pid, so systemd's
    MainPID stays; the lock's fd and the notification socket are inherited. Returns only if exec
    fails: exit 75, and a restart adopts the guest from state.json as after a crash."""
    log = logging.getLogger("xen_vhost_master")
    log.info("handover: re-executing %s -m xen_vhost_master", sys.executable)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: no SIGHUP may kill the new image early
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-m", "xen_vhost_master", *argv])
    except OSError as e:
        log.error("handover: cannot execute %s: %s", sys.executable, e)
    return int(ExitCode.TEMPFAIL)


if __name__ == "__main__":
    raise SystemExit(main())
