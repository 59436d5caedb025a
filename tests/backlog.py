"""A Unix listener whose backlog is full, as a busy xenstored (its backlog is 1) or back-end leaves
it: connections queued that nobody has accepted yet, so that the next non-blocking connect fails
with EAGAIN and the socket stays unconnected."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def full_backlog(path: str) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A non-blocking listener on ``path`` with a backlog of 1, filled. Yields it and the queued
    connections (accepting as many makes room again); every socket closed on the way out."""
    queued: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        try:
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                queued.append(s)
                try:
                    s.connect(path)
                except BlockingIOError:
                    queued.pop().close()
                    break
            else:
                pytest.fail("the listen backlog never filled")
            yield listener, queued
        finally:
            for s in queued:
                s.close()
