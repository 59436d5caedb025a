"""A recording dummy back-end (rust-vmm ``dummy_backend.rs`` analogue) for tests.

It accepts every supported request, records each one (:attr:`DummyBackend.log`), offers a
configurable feature set and config space, and can be told to fail chosen requests
(REPLY_ACK status 1) so front-end error paths can be tested.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from ..aio.device import DEFAULT_BACKEND_PROTOCOL_FEATURES, VhostUserDevice, Vring
from ..events import RequestReceived
from ..wire.enums import FrontendRequest, ProtocolFeatures, VirtioFeatures

__all__ = ["DummyBackend", "Recorded"]


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request as the dummy back-end saw it. ``fd_kinds``: ``readlink`` of each fd."""

    request: FrontendRequest
    payload: Any
    nfds: int
    fd_kinds: tuple[str, ...]
    need_reply: bool


def _kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


class DummyBackend(VhostUserDevice):
    """Records requests; ``fail`` lists requests to refuse; ``config`` is the config space."""

    def __init__(
        self,
        *,
        features: int = VirtioFeatures.VERSION_1,
        protocol_features: ProtocolFeatures = DEFAULT_BACKEND_PROTOCOL_FEATURES,
        num_queues: int = 2,
        config: bytes = bytes(range(64)),
        fail: Iterable[FrontendRequest] = (),
    ) -> None:
        super().__init__()
        self.device_features = int(features)
        self.protocol_features = ProtocolFeatures(protocol_features)
        self.num_queues = num_queues
        self.config = bytearray(config)
        self.fail = set(fail)
        self.log: list[Recorded] = []
        self.kicks: list[int] = []
        self.started: list[int] = []
        self.stopped: list[int] = []
        self.resets = 0

    def requests(self) -> list[FrontendRequest]:
        """Just the request codes, in order."""
        return [r.request for r in self.log]

    def observe(self, event: RequestReceived) -> None:
        self.log.append(
            Recorded(
                event.request,  # type: ignore[arg-type]
                event.payload,
                len(event.fds),
                tuple(_kind(fd) for fd in event.fds),
                event.need_reply,
            )
        )
        if event.request in self.fail and self.server is not None:
            # Make the server's handler refuse it: swap in a failing handler for this code.
            self.server._handlers[event.request] = self._refuse

    @staticmethod
    def _refuse(event: RequestReceived) -> bool:
        for fd in event.fds:
            os.close(fd)
        return False

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            return b""
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        if offset + len(data) > len(self.config):
            return False
        self.config[offset : offset + len(data)] = data
        return True

    def vring_started(self, vring: Vring) -> None:
        self.started.append(vring.index)

    def vring_stopped(self, vring: Vring) -> None:
        self.stopped.append(vring.index)

    def handle_kick(self, vring: Vring) -> None:
        self.kicks.append(vring.index)
        vring.call()

    def reset(self) -> None:
        self.resets += 1
