"""``vhost-user-dump``: a man-in-the-middle that logs every vhost-user message, decoded.

It listens for a front-end, connects to the back-end, and relays each message verbatim
(including SCM_RIGHTS fds). SET_BACKEND_REQ_FD is relayed too: the back-end gets one end of a
new socketpair and the back-end channel is pumped (and decoded) the same way. One line per
message, on the ``vhost_user.trace`` logger (stdout when run as a command)::

    F->B SET_VRING_ADDR(9) flags=0x1[v1] size=40 index=0 flags=0 desc_user_addr=0x... 
    B->F GET_FEATURES(1) flags=0x5[v1,REPLY] size=8 u64=0x0000000175007e46 ...
    B=>F CONFIG_CHANGE_MSG(2) ...  (back-end channel; F=>B are its ACKs)

Usage: ``vhost-user-dump --listen /tmp/front.sock --connect /tmp/backend.sock`` and point the
front-end at ``/tmp/front.sock``. Or ``python -m vhost_user.trace``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import cast

from .aio.transport import FdSocket, UnixListener, close_fds, connect_unix
from .errors import Disconnected, VhostUserError
from .wire.codec import BACKEND_SPECS, FRONTEND_SPECS, MessageFramer, decode_reply, decode_request
from .wire.describe import describe_fds, describe_flags, describe_payload
from .wire.enums import BackendRequest, FrontendRequest, HeaderFlags, ProtocolFeatures
from .wire.header import Header

__all__ = ["Tracer", "main"]

log = logging.getLogger("vhost_user.trace")


class _Session:
    """Decoding state shared by the directions of one front-end connection."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.xen_mmap = False
        self.seq = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.sockets: list[FdSocket] = []

    def line(self, direction: str, header: Header, body: bytes, fds: list[int], channel: str) -> None:
        self.seq += 1
        enum = FrontendRequest if channel == "front-end" else BackendRequest
        req = enum.from_code(header.request)
        is_reply = bool(header.flags & HeaderFlags.REPLY)
        text = f"{self.seq:4d} {direction} {req.name}({header.request}) flags={describe_flags(header.flags)} size={header.size}"
        if fds:
            text += f" fds={describe_fds(fds)}"
        try:
            if is_reply:
                specs = FRONTEND_SPECS if channel == "front-end" else BACKEND_SPECS
                spec = specs.get(req)  # type: ignore[call-overload]
                ack = spec is None or spec.reply is None
                msg = decode_reply(header, body, fds, expected=cast("FrontendRequest | BackendRequest", req), ack=ack,
                                   channel=channel)
                detail = describe_payload(req, msg.payload, reply=True, ack=ack)
                if ack:
                    detail = "REPLY_ACK " + detail + (" (success)" if msg.payload.value == 0 else " (FAILURE)")
            else:
                msg = decode_request(header, body, fds, channel=channel, xen_mmap=self.xen_mmap)
                detail = describe_payload(req, msg.payload)
                if req == FrontendRequest.SET_PROTOCOL_FEATURES and channel == "front-end":
                    self.xen_mmap = bool(msg.payload.value & ProtocolFeatures.XEN_MMAP)
        except VhostUserError as exc:
            detail = f"!! {type(exc).__name__}: {exc} raw={body[:64].hex()}"
        self.emit(text + ("\n      " + detail if detail else ""))


class Tracer:
    """Relay between one listening path (front-end side) and a back-end path."""

    def __init__(
        self, listen: str | os.PathLike[str], connect: str | os.PathLike[str], *, emit: Callable[[str], None] | None = None
    ) -> None:
        self.listen_path = os.fspath(listen)
        self.connect_path = os.fspath(connect)
        self.emit = emit or log.info
        self.listener: UnixListener | None = None

    def start_listening(self) -> None:
        self.listener = UnixListener(self.listen_path)

    async def serve(self, *, connections: int | None = None) -> None:
        """Accept front-ends one after the other and relay each session until it ends."""
        if self.listener is None:
            self.start_listening()
        assert self.listener is not None
        try:
            served = 0
            while connections is None or served < connections:
                front = await self.listener.accept(timeout=None)
                served += 1
                await self.relay(front)
        finally:
            self.listener.close()

    async def relay(self, front: FdSocket) -> None:
        try:
            back = await connect_unix(self.connect_path)
        except VhostUserError as exc:
            self.emit(f"cannot connect to back-end {self.connect_path}: {exc}")
            front.close()
            return
        self.emit(f"front-end connected; connected to back-end {self.connect_path}")
        session = _Session(self.emit)
        session.sockets += [front, back]
        f2b = asyncio.create_task(self._pump(session, front, back, "F->B", "front-end", expect_reply=False))
        b2f = asyncio.create_task(self._pump(session, back, front, "B->F", "front-end", expect_reply=True))
        session.tasks += [f2b, b2f]
        try:
            await asyncio.wait([f2b, b2f], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in list(session.tasks):
                task.cancel()
            for task in list(session.tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for s in session.sockets:
                s.close()
            self.emit("session closed")

    async def _pump(
        self, session: _Session, src: FdSocket, dst: FdSocket, direction: str, channel: str, *, expect_reply: bool | None
    ) -> None:
        framer = MessageFramer(expect_reply=None)
        raw = bytearray()
        raw_fds: list[int] = []
        try:
            while True:
                data, fds = await src.recv(max(1, framer.bytes_needed))
                raw_fds += fds
                if not data:
                    self.emit(f"{direction[0]} closed the {channel} channel")
                    return
                raw += data
                try:
                    frames = framer.feed(data, fds)
                except VhostUserError as exc:
                    self.emit(f"{direction} unframeable data, closing: {exc}")
                    return
                for header, body, msg_fds in frames:
                    session.line(direction, header, body, msg_fds, channel)
                    send_fds = list(msg_fds)
                    if (
                        channel == "front-end"
                        and direction == "F->B"
                        and header.request == FrontendRequest.SET_BACKEND_REQ_FD
                        and len(msg_fds) == 1
                        and not header.flags & HeaderFlags.REPLY
                    ):
                        send_fds = [self._splice_backend_channel(session, msg_fds[0])]
                    try:
                        await dst.send(bytes(raw), send_fds)
                    except Disconnected as exc:  # (a reply to a front-end that has hung up)
                        self.emit(f"{direction} not delivered, the {'back' if direction[0] == 'F' else 'front'}"
                                  f"-end is gone: {exc}")
                        return
                    finally:
                        close_fds(raw_fds, send_fds)
                        raw.clear()
                        raw_fds = []
        finally:
            close_fds(raw_fds)

    def _splice_backend_channel(self, session: _Session, front_fd: int) -> int:
        """Give the back-end our own socketpair end and pump it to the front-end's fd."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        front_chan = FdSocket(socket.socket(fileno=os.dup(front_fd)))
        ours_s = FdSocket(ours)
        session.sockets += [front_chan, ours_s]
        session.tasks.append(
            asyncio.create_task(self._pump(session, ours_s, front_chan, "B=>F", "back-end", expect_reply=False))
        )
        session.tasks.append(
            asyncio.create_task(self._pump(session, front_chan, ours_s, "F=>B", "back-end", expect_reply=True))
        )
        return theirs.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vhost-user-dump", description="Relay a vhost-user session and print every message decoded."
    )
    parser.add_argument("--listen", required=True, help="path the front-end connects to")
    parser.add_argument("--connect", required=True, help="path of the listening back-end")
    parser.add_argument("--once", action="store_true", help="exit after one front-end session")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    tracer = Tracer(args.listen, args.connect)
    try:
        asyncio.run(tracer.serve(connections=1 if args.once else None))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
