"""A small real virtio-blk device on the back-end API: a RAM disk (or an mmap'd image file).

Requests (virtio 1.2 §5.2.6): ``struct virtio_blk_req { le32 type; le32 reserved; le64 sector;
u8 data[]; u8 status; }`` — VIRTIO_BLK_T_IN (0), OUT (1), FLUSH (4), GET_ID (8); anything else
gets VIRTIO_BLK_S_UNSUPP. Config (§5.2.4): capacity (512-byte sectors) @0, seg_max @12,
blk_size @20, num_queues @34. Uses the device side of :mod:`vhost_user.virtqueue`.

Offers INFLIGHT_SHMFD (inflight I/O tracking, :mod:`vhost_user.inflight`) unless told not to.
With ``reorder`` (a seeded ``random.Random``) it completes out of order on purpose: each chain is
served when popped but put in the used ring after a random delay of up to ``hold`` seconds, so
a back-end killed at any moment has chains in flight behind completed younger ones (what
inflight tracking exists for). Held chains are completed at once when the ring stops.

Run standalone: ``python -m vhost_user.testing.blk --socket-path PATH | --fd FDNUM [--size 64M]
[--blk-file FILE] [--read-only] [--reorder SEED [--hold-ms MS]] [--no-inflight]``; it follows
vhost-user.rst's back-end program conventions (``--print-capabilities``, SIGTERM ends it cleanly;
``--socket`` and ``--image`` are kept as aliases of ``--socket-path`` and ``--blk-file``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import mmap
import os
import random
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..aio.device import VhostUserDevice, Vring
from ..aio.server import serve_unix
from ..aio.transport import UnixListener
from ..errors import VhostUserError
from ..virtqueue import Buffer, read_buffers, read_into, write_buffers
from ..wire.enums import ProtocolFeatures, VirtioFeatures

__all__ = [
    "RamDiskBlk",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH",
    "VIRTIO_BLK_F_MQ",
    "SECTOR_SIZE",
    "CAPABILITIES",
    "build_parser",
    "main",
]

log = logging.getLogger("vhost_user.testing.blk")

# virtio 1.2 §5.2.6 request types and status values.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
# virtio 1.2 §5.2.3 feature bits.
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_MQ = 1 << 12
SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
CONFIG_SIZE = 60  # up to write_zeroes_may_unmap + padding, what QEMU reads
_REQ_HDR = struct.Struct("<IIQ")


class RamDiskBlk(VhostUserDevice):
    """virtio-blk over a bytearray (``size`` bytes) or a shared mmap of ``image``."""

    # BACKEND_REQ is offered because Linux 6.1 virtio_uml only allocates its device IRQ when it
    # sets up the back-end channel; without it, the vring IRQ request fails with EBUSY.
    protocol_features = (
        ProtocolFeatures.MQ
        | ProtocolFeatures.BACKEND_REQ
        | ProtocolFeatures.REPLY_ACK
        | ProtocolFeatures.CONFIG
        | ProtocolFeatures.CONFIGURE_MEM_SLOTS
        | ProtocolFeatures.RESET_DEVICE
        | ProtocolFeatures.STATUS
    )

    def __init__(
        self,
        size: int = 8 << 20,
        *,
        image: str | os.PathLike[str] | None = None,
        num_queues: int = 1,
        event_idx: bool = True,
        serial: bytes = b"pyvhost-ramdisk",
        queue_size_max: int = 1024,
        inflight: bool = True,
        reorder: random.Random | None = None,
        hold: float = 0.02,
        read_only: bool = False,
    ) -> None:
        super().__init__()
        self.num_queues = num_queues
        if inflight:
            self.protocol_features = type(self).protocol_features | ProtocolFeatures.INFLIGHT_SHMFD
        self.reorder = reorder
        self.hold = hold
        self.read_only = read_only
        # vring index -> head -> (bytes written, timer that completes it)
        self._held: dict[int, dict[int, tuple[int, asyncio.TimerHandle]]] = {}
        self._image_map: mmap.mmap | None = None
        if image is not None:
            fd = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                self._image_map = mmap.mmap(fd, size, access=mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE)
            finally:
                os.close(fd)
            self.disk: Any = self._image_map
        else:
            self.disk = bytearray(size)
        if size % SECTOR_SIZE or size == 0:
            raise ValueError("disk size must be a non-zero multiple of 512")
        self.size = size
        self.serial = serial[:VIRTIO_BLK_ID_BYTES]
        features = VirtioFeatures.VERSION_1 | VirtioFeatures.RING_INDIRECT_DESC | VIRTIO_BLK_F_SEG_MAX
        features |= VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if event_idx:
            features |= VirtioFeatures.RING_EVENT_IDX
        if num_queues > 1:
            features |= VIRTIO_BLK_F_MQ
        if read_only:
            features |= VIRTIO_BLK_F_RO
        self.device_features = int(features)
        self.queue_size_max = queue_size_max
        self.requests = {VIRTIO_BLK_T_IN: 0, VIRTIO_BLK_T_OUT: 0, VIRTIO_BLK_T_FLUSH: 0, VIRTIO_BLK_T_GET_ID: 0}
        self.flushes = 0

    # -- config ------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", cfg, 0, self.size // SECTOR_SIZE)  # capacity
        struct.pack_into("<I", cfg, 12, 126)  # seg_max
        struct.pack_into("<I", cfg, 20, SECTOR_SIZE)  # blk_size
        struct.pack_into("<H", cfg, 34, self.num_queues)  # num_queues
        return bytes(cfg)

    def get_config(self, offset: int, size: int) -> bytes:
        cfg = self.config_bytes()
        if offset + size > len(cfg):
            return b""
        return cfg[offset : offset + size]

    # -- data path ---------------------------------------------------------------------
    def handle_kick(self, vring: Vring) -> None:
        queue = vring.split_queue()
        while True:
            chain = queue.pop()
            if chain is None:
                if queue.event_idx and queue.enable_notify():
                    continue  # more arrived while we re-enabled notifications
                break
            written = self.handle_request(chain, read_buffers, write_buffers)
            if self.reorder is None:
                queue.push(chain.head, written)
            else:
                self._hold_completion(vring, chain.head, written)
        if queue.needs_notify():
            vring.call()

    # -- out-of-order completion ---------------------------------------------------------
    def _hold_completion(self, vring: Vring, head: int, written: int) -> None:
        assert self.reorder is not None
        delay = self.reorder.uniform(0, self.hold)
        handle = asyncio.get_running_loop().call_later(delay, self._complete_held, vring, head)
        self._held.setdefault(vring.index, {})[head] = (written, handle)

    def _complete_held(self, vring: Vring, head: int) -> None:
        entry = self._held.get(vring.index, {}).pop(head, None)
        if entry is None:  # (completed meanwhile by a ring stop)
            return
        written = entry[0]
        try:
            queue = vring.split_queue()
            queue.push(head, written)
            if queue.needs_notify():
                vring.call()
        except (VhostUserError, ValueError) as exc:
            log.error("vring %d: completing chain %d failed: %s", vring.index, head, exc)

    def vring_stopped(self, vring: Vring) -> None:
        """GET_VRING_BASE: whatever is held is completed now (in random order), as a real
        back-end drains its I/O before answering."""
        held = self._held.pop(vring.index, {})
        self._cancel(held)
        if not held:
            return
        heads = list(held)
        if self.reorder is not None:
            self.reorder.shuffle(heads)
        try:
            queue = vring.split_queue()
            queue.push_many((h, held[h][0]) for h in heads)
            if queue.needs_notify():
                vring.call()
        except (VhostUserError, ValueError) as exc:
            log.error("vring %d: completing held chains failed: %s", vring.index, exc)

    @staticmethod
    def _cancel(held: dict[int, tuple[int, asyncio.TimerHandle]]) -> None:
        for _written, handle in held.values():
            handle.cancel()

    def handle_request(self, chain: Any, read_buffers: Any, write_buffers: Any) -> int:
        """Serve one virtio-blk request chain; returns the used length. A subclass may refuse a
        request before it (returning 0) or clean up after it, e.g. a Xen-aware back-end
        (xen_vhost_master/backend/blk.py). Data moves between the guest's buffers and the disk
        in one copy (a 1 MiB request under TCG in the real-Xen lab spent most of its time in
        the three or four copies through bytes objects it took before)."""
        mem = self.memory
        header = read_buffers(mem, chain.readable, _REQ_HDR.size)
        writable_len = sum(b.length for b in chain.writable)
        if len(header) < _REQ_HDR.size or writable_len < 1:
            log.warning("malformed virtio-blk request on chain %d", chain.head)
            return 0
        req_type, _, sector = _REQ_HDR.unpack_from(header)
        data_out_len = sum(b.length for b in chain.readable) - _REQ_HDR.size
        data_in_len = writable_len - 1
        self.requests[req_type] = self.requests.get(req_type, 0) + 1
        payload = b""
        status = VIRTIO_BLK_S_OK
        start = sector * SECTOR_SIZE
        if req_type == VIRTIO_BLK_T_IN:
            if data_in_len % SECTOR_SIZE or start + data_in_len > self.size:
                status, payload = VIRTIO_BLK_S_IOERR, bytes(data_in_len)
            else:
                with memoryview(self.disk) as disk, disk[start : start + data_in_len] as part:
                    done: int = write_buffers(mem, chain.writable, part)
                last = next(b for b in reversed(chain.writable) if b.length)  # the status byte ends the chain
                done += write_buffers(mem, [Buffer(last.addr + last.length - 1, 1)], bytes([status]))
                return done
        elif req_type == VIRTIO_BLK_T_OUT:
            if self.read_only or data_out_len % SECTOR_SIZE or start + data_out_len > self.size:
                status = VIRTIO_BLK_S_IOERR
            else:
                with memoryview(self.disk) as disk, disk[start : start + data_out_len] as part:
                    read_into(mem, chain.readable, part, _REQ_HDR.size)
            payload = bytes(data_in_len)
        elif req_type == VIRTIO_BLK_T_FLUSH:
            self.flushes += 1
            if self._image_map is not None:
                self._image_map.flush()
            payload = bytes(data_in_len)
        elif req_type == VIRTIO_BLK_T_GET_ID:
            payload = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:data_in_len].ljust(data_in_len, b"\0")
        else:
            status, payload = VIRTIO_BLK_S_UNSUPP, bytes(data_in_len)
        written: int = write_buffers(mem, chain.writable, payload + bytes([status]))
        return written

    def close(self) -> None:
        for held in self._held.values():
            self._cancel(held)
        self._held.clear()
        super().close()

    def release_disk(self) -> None:
        """Unmap the image file (when one was given)."""
        if self._image_map is not None:
            self._image_map.close()
            self._image_map = None


#: ``--print-capabilities`` (vhost-user.rst "Backend program conventions"; the
#: ``VHostUserBackendCapabilitiesBlock`` shape of QEMU's docs/interop/vhost-user.json).
CAPABILITIES: dict[str, Any] = {"type": "block", "features": ["read-only", "blk-file"]}


def build_parser(prog: str | None = None, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The command line: vhost-user.rst's back-end program conventions (``--socket-path`` or
    ``--fd``, ``--print-capabilities``, and its vhost-user-blk ``--blk-file``, ``--read-only``),
    ``--version``, and this device's own options."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog=prog or "python -m vhost_user.testing.blk", parents=list(parents),
                                     description="RAM-disk virtio-blk vhost-user back-end")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", metavar="PATH", help="AF_UNIX path to listen on")
    where.add_argument("--socket", dest="socket_path", metavar="PATH", help="deprecated alias of --socket-path")
    where.add_argument("--fd", type=int, metavar="FDNUM", help="serve on this inherited, listening AF_UNIX socket")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end capabilities as JSON and exit (other options are ignored)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--size", default="64M", help="disk size (K/M/G suffix), ignored with --blk-file")
    parser.add_argument("--blk-file", "--image", dest="image", metavar="PATH",
                        help="serve this file (mmap'd shared) instead of RAM")
    parser.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO and refuse writes")
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--connections", type=int, default=None, help="exit after N front-ends")
    parser.add_argument("--no-inflight", action="store_true", help="do not offer INFLIGHT_SHMFD")
    parser.add_argument("--reorder", type=int, metavar="SEED", default=None,
                        help="complete requests out of order on purpose (random delays, seeded)")
    parser.add_argument("--hold-ms", type=float, default=20.0, help="longest delay of a completion with --reorder")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None,
         configure: Callable[[RamDiskBlk], None] | None = None,
         parents: Sequence[argparse.ArgumentParser] = (), device_class: type[RamDiskBlk] | None = None) -> int:
    """``python -m vhost_user.testing.blk``. ``configure(device)`` runs on each new device (a
    Xen-aware launcher sets ``device.xen_mapper`` there); ``parents`` add a launcher's own
    options (argparse parents, already parsed by it) to ``--help``; ``device_class`` is the
    :class:`RamDiskBlk` subclass to serve with."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    if "--print-capabilities" in args_in:  # "other options and arguments should be ignored"
        print(json.dumps(CAPABILITIES))
        return 0
    parser = build_parser(prog, parents)
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size_s = args.size.upper()
    try:
        size = int(size_s[:-1]) * units[size_s[-1]] if size_s[-1] in units else int(size_s)
    except ValueError:
        parser.error(f"--size {args.size}: use a number of bytes or a K/M/G suffix")
    image = args.image
    if image is not None and not os.path.isfile(image):
        parser.error(f"--blk-file {image}: no such file")
    where: str | UnixListener
    if args.fd is not None:
        try:
            where = UnixListener.from_fd(args.fd)
        except ValueError as exc:
            parser.error(f"--fd {args.fd}: {exc}")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.socket_path)), mode=0o700, exist_ok=True)
        where = args.socket_path
    disk_holder: dict[str, bytearray] = {}
    rng = None if args.reorder is None else random.Random(args.reorder)

    def factory() -> RamDiskBlk:
        dev = (device_class or RamDiskBlk)(size, image=image, num_queues=args.queues, inflight=not args.no_inflight,
                         reorder=rng, hold=args.hold_ms / 1000, read_only=args.read_only)
        # RAM disks keep their content across reconnects within one process.
        if image is None:
            dev.disk = disk_holder.setdefault("disk", dev.disk)
        if configure is not None:
            configure(dev)
        return dev

    async def serve() -> None:
        # vhost-user.rst: end "as quickly and cleanly as possible" on SIGTERM (the listener
        # unlinks its path on the way out).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_unix(factory, where, connections=args.connections)

    try:
        try:
            import uvloop
        except ImportError as e:
            log.warning("uvloop is not available (%s): running on asyncio's event loop", e)
            asyncio.run(serve())
        else:
            uvloop.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
