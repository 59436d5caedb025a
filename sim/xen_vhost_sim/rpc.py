"""Framing between SimKernel (the "kernel driver" side, in the daemon's process) and the simulated
hypervisor (``sim.server``).

One message = header ``struct { u32 json_len; u32 blob_len; }`` + JSON object + binary blob, with
any file descriptors as SCM_RIGHTS on the ``sendmsg`` that carries the header. Requests carry
``"op"``; replies carry ``"errno"`` (0 = success) and, for multiplexed connections, the request's
``"tag"``. Only the simulated host ever sends fds (memfds of guest RAM to SimKernel for foreign
mapping, the evtchn ring socket); a client sends fds only with a request that counts them in
``"nfds"`` (SIM-ONLY: an external RAM fd for ``create_domain``).
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

__all__ = [
    "MAX_BLOB",
    "MAX_FDS",
    "MAX_JSON",
    "MessageReader",
    "RING_NOTIFY",
    "RpcError",
    "encode",
    "recv_blocking",
    "send_blocking",
]

_HDR = struct.Struct("<II")
MAX_JSON = 1 << 20  # no request needs more; larger is a malformed peer
MAX_BLOB = 64 << 20  # 8 MiB of GFNs is the largest real payload (1 Mi pages)
MAX_FDS = 16
#: On an evtchn ring, a u32 with this bit is EVTCHNOP_send of the port in the low bits (posted by
#: SimKernel's IOCTL_EVTCHN_NOTIFY); without it, the u32 is an unmask (a write(2) of the port).
RING_NOTIFY = 1 << 31


class RpcError(Exception):
    """The peer broke the framing (closes the connection)."""


def encode(obj: dict[str, Any], blob: bytes | bytearray | memoryview = b"") -> tuple[bytes, memoryview]:
    """(header + JSON, blob) of one message."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _HDR.pack(len(body), len(blob)) + body, memoryview(blob)


def send_blocking(
    sock: socket.socket, obj: dict[str, Any], blob: bytes | bytearray | memoryview = b"", fds: list[int] | None = None
) -> None:
    head, tail = encode(obj, blob)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([head], anc)
    if sent < len(head):
        sock.sendall(memoryview(head)[sent:])
    if len(tail):
        sock.sendall(tail)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise ConnectionResetError("simulated host closed the connection")
        got += r
    return bytes(buf)


def recv_blocking(sock: socket.socket) -> tuple[dict[str, Any], bytes, list[int]]:
    """One message (obj, blob, fds). The caller owns the returned fds."""
    fds: list[int] = []
    data, anc, _flags, _addr = sock.recvmsg(_HDR.size, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % 4])
            fds.extend(arr)
    if not data:
        raise ConnectionResetError("simulated host closed the connection")
    if len(data) < _HDR.size:
        data += _recv_exact(sock, _HDR.size - len(data))
    jlen, blen = _HDR.unpack(data)
    if jlen > MAX_JSON or blen > MAX_BLOB:
        raise RpcError(f"oversized message ({jlen}, {blen})")
    obj = json.loads(_recv_exact(sock, jlen))
    blob = _recv_exact(sock, blen) if blen else b""
    if not isinstance(obj, dict):
        raise RpcError("message is not a JSON object")
    return obj, blob, fds


class MessageReader:
    """Incremental parser for the server side: ``feed(bytes)`` → complete (obj, blob) messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._buf += data
        out: list[tuple[dict[str, Any], bytes]] = []
        while len(self._buf) >= _HDR.size:
            jlen, blen = _HDR.unpack_from(self._buf)
            if jlen > MAX_JSON or blen > MAX_BLOB:
                raise RpcError(f"oversized message ({jlen}, {blen})")
            total = _HDR.size + jlen + blen
            if len(self._buf) < total:
                break
            try:
                obj = json.loads(bytes(self._buf[_HDR.size : _HDR.size + jlen]))
            except (ValueError, RecursionError) as exc:
                raise RpcError(f"bad JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise RpcError("message is not a JSON object")
            blob = bytes(self._buf[_HDR.size + jlen : total])
            del self._buf[:total]
            out.append((obj, blob))
        return out
