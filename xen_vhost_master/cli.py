"""``xen-vhost-master``: serve one Xen guest's virtio devices with vhost-user back-ends.

    xen-vhost-master --domain web1                   # serve (the default command); devices from xenstore
    xen-vhost-master serve --domain 5 --device type=blk,base=0x2000000,irq=33,socket=/run/qsd.sock
    xen-vhost-master status --domain web1            # what the running instance is doing (status.py)
    xen-vhost-master status --all --format=openmetrics   # metrics of every instance (metrics.py)
    xen-vhost-master watch [--spawn]                 # start one instance per guest (dispatcher.py)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import pwd
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

from .config import (
    MemoryMode,
    check_socket_template,
    load_guest_toml,
    parse_device_arg,
)
from .errors import ConfigError, DaemonError, ExitCode, HostError, XenError
from .log import say, setup_logging
from .names import path_name
from .instance import (
    DOMID_FIRST_RESERVED,
    ENV_LOCK_FD,
    RUNTIME_ROOT,
    AlreadyServed,
    DomainNotFound,
    GuestDomain,
    InstanceLock,
    RuntimeDir,
    find_runtime_by_domid,
    resolve_domain,
    runtime_dir,
)
from .platform import Platform, announce, platform_from_env
from .status import StatusError, instance_sockets, query, render_json, render_table
from .version import VersionAction
from .xen.xenstore_wire import XenstoreError

if TYPE_CHECKING:
    from .supervisor import Options

# The supervisor (and with it the vhost-user library, construct, the data paths), uvloop and the
# xenstore client (asyncio) are imported only by the commands that use them: --help, a bad
# argument, `status --domain NAME` and `watch` start faster.

__all__ = ["main", "parse_args"]

CONFIG_DIR = "/etc/xen-vhost-master"
COMMANDS = ("serve", "status", "watch")

DESCRIPTION = """commands:
  serve    serve a guest's virtio devices (the default: 'xen-vhost-master --domain NAME ...' is
           'xen-vhost-master serve --domain NAME ...', what xen-vhost-master@.service runs)
  status   show what running instances serve: a table, --json, or metrics (--format)
  watch    start one instance per guest with virtio devices (a dispatcher)

'xen-vhost-master COMMAND --help' shows each command's options."""

STATUS_EPILOG = """formats:
  table        (default) per instance a header (guest, domid, pid, version, uptime) and a row
               per device: id, type, MMIO base and irq, back-end state (connecting | waiting |
               failed | connected | lost), data path, driver status by name, kicks and calls
               (summed over queues), reconnects, last error
  json         the instance's status document (its "schema" key versions it); with --all
               {"schema", "instances": [...], "unreachable": [...]}
  openmetrics  OpenMetrics 1.0 text: per device back-end up/state, reconnects, kicks, calls,
               and for shadow devices requests, bytes, a request latency histogram, in-flight
               requests, bounce pool use and back-pressure
  prometheus   the same in the Prometheus text format 0.0.4 (node_exporter's textfile collector)

exit codes: 0 every instance asked answered; 3 no instance serves the domain (or its socket is
left from one that is not running); 69 no such domain; 75 an instance did not answer in time;
77 permission denied (the status socket is the daemon's user's only: run as root); 2 a bad
argument; 78 a guest name that cannot name a runtime directory (give --runtime-dir)."""

EXIT_CODES = """exit codes (each failure also prints one line saying what is wrong and how to fix it; all but
1 and 75 are permanent: the units' RestartPreventExitStatus= lists them):
   0  stopped cleanly, or the domain went away
   1  unexpected error (a bug: the log has its traceback); restarted
   2  bad command line, e.g. --domain 0 (a guest's domain id is 1..32751)
   3  status: no daemon serves the domain
  69  no such domain
  72  not a Xen dom0: /dev/xen/privcmd missing, or /proc/xen/capabilities without control_d
  73  the guest is already served by another instance
  74  the runtime directory cannot be created or locked, or is not to be trusted (owned by
      another user, or writable by group or others)
  75  transient failure (xenstore not answering, ...): systemd restarts
  76  Xen has no IOREQ server (dm_op ENOSYS/EOPNOTSUPP): rebuild Xen with CONFIG_IOREQ_SERVER=y
  77  permission denied on /dev/xen/* (or by Xen): run as root
  78  configuration error (fix it)"""

EPILOG = """the guest:
  --domain takes the guest's name or its current domain id (all digits: an id, as with xl).
  It is resolved once, at start, through xenstore (/local/domain/*/name). The instance is keyed
  by the NAME: systemd's xen-vhost-master@<name>.service (the instance is the name escaped by
  systemd-escape(1); the unit runs --domain %I), the runtime directory
  /run/xen-vhost-master/<name>/ (lock, state.json, status.sock) and the per-guest
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
  base=0x2000000     MMIO window base, hex or decimal, a multiple of 0x200 (required for mmio)
  irq=33             interrupt line: a GIC SPI, 32..1019 (required for mmio)
  transport=mmio|pci mmio (default): a virtio-mmio window; pci: a virtio-pci modern function
                     of an x86 HVM guest (--guest-arch x86_64), served as a secondary IOREQ
                     server beside QEMU: no base=/irq=, interrupts by MSI-X or INTx
  bdf=00:08.0        transport=pci: the function on bus 0 (device 03..1f, function 0; 00..02
                     are QEMU's, its Xen platform device at 02 or 03 (03 with an emulated
                     VGA), NICs the slots after: 00:04.0 on real Xen with vga="none")
  socket=TEMPLATE    back-end socket, an absolute path (default: --socket, see above)
  mode=client|server client: connect to a listening back-end (qemu-storage-daemon);
                     server: listen, the back-end connects (dpdk-testpmd client=1, vhost-device-*)
  queue-size=256     QueueNumMax offered to the guest: a power of two, at most 32768
  queues=N           number of queues (default: the back-end's GET_QUEUE_NUM, else 1)
  memory=MODE        auto | xen-mmap | shadow | sim-memfd (see --memory)
  grants=0|1         grant-based guest (xl grant_usage=1)
  xen-no-advance=rust-vmm|spec
                     grant guest over XEN_MMAP: the "not mapped in advance" region flag,
                     rust-vmm = 0x8 (default: what rust-vmm Xen back-ends expect),
                     spec = 0x100 (the vhost-user spec's bit 8); the back-end must agree
  mac=00:16:3e:..    net: the guest's MAC when the back-end has no config space (dpdk-testpmd);
                     default: a locally administered one derived from the guest's name and devid
  cid=N              vsock: the guest's CID (3..4294967294) when the back-end has no config
                     space (QEMU vhost-vsock's guest-cid=); a back-end's own config wins
  devid=N            device id (default: position on the command line)

configuration files:
  <config-dir>/<name>.toml is read when it exists (a name containing '/' or starting with '.'
  uses its escaped form), then --config FILE; both add devices. Keys: [[device]] tables (the
  --device keys), memory = "MODE", backend-user = ["USER", ...]; any other key or table is an
  error (exit 78). Flags win over files.

signals:
  SIGTERM/SIGINT: full teardown (rings stopped, IOREQ server destroyed, XenBus Closed), exit 0.
  SIGHUP (systemctl reload): handover. The back-ends' rings are stopped, state.json saved, and
  the process re-executes itself (same pid) with the back-end connections; the new image adopts
  the IOREQ server and devices, goes on with each connection (not renegotiated: a back-end's
  session survives) and resumes the rings. The guest sees a pause, no reset.

back-end connections across a crash:
  Under a service manager with a file descriptor store (systemd's FileDescriptorStoreMax=, the
  dispatcher's 'watch --spawn') each device's connection is stored (FDSTORE=1) and handed back
  to the restarted daemon (LISTEN_FDS), which goes on with it; one it cannot use is logged and
  replaced by a fresh connection.

On a dom0 the daemon opens /dev/xen/{privcmd,evtchn,gntdev,xenbus}. With XEN_VHOST_SIM=<socket>
in the environment it attaches to a simulated Xen host (xen-vhost-sim, an installed platform)
instead, and its first log line says so.
"""


def _domid_flag(text: str) -> str:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain id (use --domain for a name)")
    return text


def _domid_range_error(text: str) -> str | None:
    """Why ``--domain``/``--domid`` ``text``, an id, is no guest's (None for a name or a fine id)."""
    if not (text.isascii() and text.isdigit()) or 0 < int(text) < DOMID_FIRST_RESERVED:
        return None
    what = "domain 0 is dom0, where the daemon itself runs" if int(text) == 0 else "reserved by Xen"
    return f"{text}: {what}; a guest's domain id is 1..{DOMID_FIRST_RESERVED - 1}"


def _target(p: argparse.ArgumentParser, *, required: bool = True) -> argparse._MutuallyExclusiveGroup:
    target = p.add_mutually_exclusive_group(required=required)
    target.add_argument("--domain", metavar="NAME|ID", help="the guest: its name, or its current domain id")
    target.add_argument("--domid", type=_domid_flag, metavar="ID", help="the same as --domain ID")
    return target


def _serve_flags(p: argparse.ArgumentParser) -> None:
    _target(p)
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
                   help=f"lock, state and status socket (default {RUNTIME_ROOT}/<name>); when given, "
                        "back-end sockets default to DIR/{devid}.sock")
    p.add_argument("--socket", metavar="TEMPLATE",
                   help="back-end socket of devices without socket= (default /run/vhost-user/{name}/{devid}.sock)")
    p.add_argument("--backend-user", action="append", default=[], metavar="USER",
                   help="a user (name or uid) whose back-ends may connect or be connected to, besides "
                        "root and the daemon's own user (checked with SO_PEERCRED); may be repeated")
    p.add_argument("--backend-domid", type=int, default=0, help="the domain this daemon runs in (default 0)")
    p.add_argument("--guest-arch", choices=["arm64", "x86_64"], help="guest memory layout (default: the host's)")
    p.add_argument("--qmp-socket", metavar="PATH",
                   help="QEMU's QMP socket: transport=pci functions in a slot of one of QEMU's devices are refused "
                        "(default /var/run/xen/qmp-libxl-<domid>, libxl's; not checked when there is none; "
                        "'' never asks)")
    p.add_argument("--no-kernel-fast-path", action="store_true",
                   help="relay every notification in user space even where privcmd offers ioeventfd/irqfd "
                        "(Linux >= 6.7, CONFIG_XEN_PRIVCMD_EVENTFD)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")


def _status_flags(p: argparse.ArgumentParser) -> None:
    target = _target(p)
    target.add_argument("--all", action="store_true", help="every instance under the runtime root")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--format", choices=["table", "json", "openmetrics", "prometheus"], default="table",
                     help="what to print (default table; see 'formats' below)")
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format=json")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="the instance's runtime directory, if it was started with --runtime-dir")
    p.add_argument("--runtime-root", metavar="DIR", default=RUNTIME_ROOT,
                   help=f"where instances keep their runtime directories (default {RUNTIME_ROOT})")
    p.add_argument("--backend-domid", type=int, default=0, help="the domain the instances run in (default 0)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.set_defaults(no_xenstore=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``[serve|status] FLAGS``: without a command, serve (``xen-vhost-master --domain X`` is what
    the unit runs). ``watch`` has its own parser (:func:`xen_vhost_master.dispatcher.parse_args`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="xen-vhost-master",
        description="Serve a Xen guest's virtio-mmio devices with vhost-user back-ends.\n\n" + DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _serve_flags(sub.add_parser("serve", description="Serve a Xen guest's virtio-mmio devices with vhost-user back-ends.",
                                epilog=EPILOG + "\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter))
    _status_flags(sub.add_parser("status", description="Show what running instances serve.",
                                 epilog=STATUS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("watch", add_help=False)  # (listed; main hands it to the dispatcher's own parser)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = p.parse_args(argv)
    if args.command == "watch":  # (main hands it to the dispatcher first)
        p.error("watch: use 'xen-vhost-master watch --help'")
    if args.domain is None:
        args.domain = args.domid
    if args.domain is not None and (why := _domid_range_error(args.domain)) is not None:
        p.error(f"argument --domain/--domid: {why}")
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
        qmp_socket=args.qmp_socket,
        backend_uids=tuple(uids),
        kernel_fast_path=not args.no_kernel_fast_path,
    )


def _check_flags(args: argparse.Namespace) -> None:
    """--device, --socket and --config FILE, checked before anything touches Xen or xenstore: a bad
    one is a configuration error (78) on any host. (The per-guest file needs the guest's name.)"""
    for i, text in enumerate(args.device):
        parse_device_arg(text, i)
    if args.socket is not None:
        check_socket_template(args.socket, "--socket")
    if args.config:
        load_guest_toml(args.config, "--config")


def _platform(given: Platform | None) -> Platform:
    """The platform the caller handed over, else the one the environment asks for (platform.py)."""
    return given if given is not None else platform_from_env()


async def _resolve(args: argparse.Namespace, platform: Platform) -> GuestDomain:
    if args.no_xenstore:
        return await resolve_domain(None, args.domain, backend_domid=args.backend_domid)
    async with await platform.open_xenstore() as xs:
        return await resolve_domain(xs, args.domain, backend_domid=args.backend_domid)


def _fail(message: object, code: ExitCode) -> int:
    say(message)
    return int(code)


def _runtime_dir_code(error: OSError) -> ExitCode:
    """Space or memory may come back (75); a read-only, missing or forbidden path will not (74)."""
    return ExitCode.TEMPFAIL if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EAGAIN) else ExitCode.RUNTIME_DIR


class _Handover:
    """Returned by :func:`_serve` when the instance asked to re-execute itself (SIGHUP), with the
    back-end connections' fds the next image goes on with (fdstore.py)."""

    def __init__(self, fds: list[tuple[str, int]]) -> None:
        self.fds = fds


async def _serve(args: argparse.Namespace, platform: Platform) -> int | _Handover:
    from .supervisor import Supervisor  # noqa: PLC0415
    from .xen.dom0 import check_dom0  # noqa: PLC0415  (ctypes: only for who serves)

    try:
        _check_flags(args)
        check_dom0(platform.kernel)
        guest = await _resolve(args, platform)
        options = _options(args, guest)
    except HostError as e:
        return _fail(e, e.code)
    except ConfigError as e:
        return _fail(e, ExitCode.CONFIG)
    except DomainNotFound as e:
        return _fail(e, ExitCode.UNAVAILABLE)
    except XenError as e:
        return _fail(e, ExitCode.TEMPFAIL)
    except (XenstoreError, OSError) as e:
        return _fail(f"cannot resolve --domain {args.domain} through xenstore: {e}", ExitCode.TEMPFAIL)
    assert options.runtime_dir is not None
    runtime: RuntimeDir | None = None
    try:
        runtime = RuntimeDir.open(options.runtime_dir)
        lock = InstanceLock.acquire(os.path.join(options.runtime_dir, "lock"), guest, runtime=runtime)
    except (OSError, DaemonError) as e:
        if runtime is not None:
            runtime.close()
        if isinstance(e, AlreadyServed):
            return _fail(e, ExitCode.ALREADY_SERVED)
        if isinstance(e, HostError):
            return _fail(e, e.code)
        if isinstance(e, OSError):
            return _fail(f"cannot create the runtime directory {options.runtime_dir}: {e.strerror or e} "
                         "(give --runtime-dir, or run as root: the unit's RuntimeDirectory= makes it)", _runtime_dir_code(e))
        return _fail(f"runtime directory {options.runtime_dir}: {e}", ExitCode.RUNTIME_DIR)
    supervisor = Supervisor(options, platform, runtime=runtime)
    handover = False
    try:
        code = await supervisor.run()
        handover = supervisor.handover
    finally:
        if handover:
            lock.keep_for_exec()  # the next image of this process holds it on
        else:
            lock.release()
        runtime.close()
    return _Handover(supervisor.handed_over) if handover else code


def _status_socket(args: argparse.Namespace, platform: Platform | None = None) -> str:
    """Where the instance for ``--domain`` answers: its runtime directory, found by name (no
    xenstore needed), or for an id through xenstore, else by the state files' domain ids."""
    if args.runtime_dir:
        return os.path.join(args.runtime_dir, "status.sock")
    root = getattr(args, "runtime_root", RUNTIME_ROOT)
    text = args.domain
    if not (text.isascii() and text.isdigit()):
        return os.path.join(runtime_dir(text, root), "status.sock")
    from .eventloop import run  # noqa: PLC0415  (an id is resolved through xenstore)

    try:
        guest = run(_resolve(args, _platform(platform)))
        return os.path.join(runtime_dir(guest.name, root), "status.sock")
    except (DomainNotFound, XenstoreError, OSError) as e:
        found = find_runtime_by_domid(int(text), root)
        if found is not None:
            return os.path.join(found, "status.sock")
        if isinstance(e, DomainNotFound):
            raise
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
            raise HostError(ExitCode.NOPERM, f"permission denied resolving domain {text} through xenstore "
                                             f"({e}): run status as root") from None
        raise _NotServed(f"no daemon serves domain {text} ({e}; no {root}/*/state.json names it)") from None


class _NotServed(DaemonError):
    """``status``: nothing answers for the domain (exit 3)."""


def _status(args: argparse.Namespace, platform: Platform | None) -> int:
    """Ask one instance, or every one (``--all``), and print what they answer in ``--format``."""
    paths = instance_sockets(args.runtime_root) if args.all else [_status_socket(args, platform)]
    docs, failures = [], []
    for path in paths:
        try:
            docs.append(query(path))
        except StatusError as e:
            failures.append((path, e))
    if not args.all and failures:
        error = failures[0][1]
        what = f"no daemon serves domain {args.domain} ({error})" if error.code == ExitCode.NOT_RUNNING else error
        print(f"xen-vhost-master: {what}", file=sys.stderr)
        return error.code
    if args.format == "json":
        print(render_json(docs, failures, many=args.all))
    elif args.format in ("openmetrics", "prometheus"):
        from .metrics import render  # noqa: PLC0415

        sys.stdout.write(render(docs, openmetrics=args.format == "openmetrics"))
    else:
        print(render_table(docs) if docs else f"no instance is running (no {args.runtime_root}/*/status.sock)")
    for path, error in failures:  # (--all: the others are shown; these are said once, on stderr)
        print(f"xen-vhost-master: {path}: {error}", file=sys.stderr)
    return max((error.code for _, error in failures), default=0)


def main(argv: list[str] | None = None, platform: Platform | None = None) -> int:
    """``platform``: what to run on (a simulator's own launcher hands its own); None = the one the
    environment asks for (:func:`xen_vhost_master.platform.platform_from_env`), looked up once."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["watch"]:
        from .dispatcher import main as watch  # noqa: PLC0415

        return watch(argv[1:], platform)
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose or args.command == "serve" else logging.WARNING
    setup_logging(level)
    if args.command == "status":
        try:
            return _status(args, platform)
        except ConfigError as e:
            return _fail(e, ExitCode.CONFIG)
        except DomainNotFound as e:
            return _fail(e, ExitCode.UNAVAILABLE)
        except HostError as e:
            return _fail(e, e.code)
        except _NotServed as e:
            return _fail(e, ExitCode.NOT_RUNNING)
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
        return _reexec(sys.argv[1:] if argv is None else argv, result.fds)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped: a late stop has nothing left to stop
    return result


def entry() -> NoReturn:
    """The command (console script, ``python -m xen_vhost_master``): :func:`main`, then the process
    ends without the interpreter's finalization. Everything the daemon holds was closed by its
    teardown (runtime files, sockets, mappings, the IOREQ server); what finalization would add is
    freeing every module's objects, ~50 ms here and seconds on a loaded dom0 under emulation, past
    the unit's TimeoutStopSec (tests/xenlab: an instance still ran 22 s after "stopped"). Logs and
    standard streams are flushed first. An exception (argparse's exit included) ends it as usual."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # (a reader gone, a stream closed)
            stream.flush()
    os._exit(int(code))


def _reexec(argv: list[str], fds: list[tuple[str, int]]) -> int:
    """Replace this process's image with a fresh one of the same command: same pid, so systemd's
    MainPID stays; the lock's fd, the notification socket and the back-end connections ``fds``
    (as systemd hands stored fds back: fdstore.py) are inherited. Returns only if exec fails:
    exit 75, and a restart adopts the guest from state.json as after a crash."""
    from .fdstore import exec_with_fds  # noqa: PLC0415

    log = logging.getLogger("xen_vhost_master")
    log.info("handover: re-executing %s -m xen_vhost_master%s", sys.executable,
             f" with {len(fds)} back-end connection fd(s)" if fds else "")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: no SIGHUP may kill the new image early
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        exec_with_fds([sys.executable, "-m", "xen_vhost_master", *argv], fds, keep_env=[ENV_LOCK_FD])
    except OSError as e:
        log.error("handover: cannot execute %s: %s", sys.executable, e)
    return int(ExitCode.TEMPFAIL)


if __name__ == "__main__":
    raise SystemExit(main())
