"""Logging helpers: a ``dom<N>/<device>`` prefix on every line, and rate limiting for guest noise.

A hostile guest can make the device model log on every register write; :class:`RateLimit` bounds
that volume (per reason key) and reports how many lines it suppressed when it speaks again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["DeviceLogger", "RateLimit", "device_logger"]

# A guest may cause at most this many lines per key per window before we go quiet.
GUEST_LOG_BURST = 10
GUEST_LOG_WINDOW = 10.0  # seconds


class DeviceLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes messages with ``dom<N>/<dev>: `` (aioquic's QuicConnectionAdapter pattern)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"{(self.extra or {})['prefix']}: {msg}", kwargs


def device_logger(name: str, domid: int, device: str | int | None = None) -> DeviceLogger:
    prefix = f"dom{domid}" if device is None else f"dom{domid}/{device}"
    return DeviceLogger(logging.getLogger(name), {"prefix": prefix})


class RateLimit:
    """Allow ``burst`` events per key in each ``window`` seconds; ``clock`` is injected (tests)."""

    def __init__(self, clock: Callable[[], float], burst: int = GUEST_LOG_BURST, window: float = GUEST_LOG_WINDOW) -> None:
        self._clock = clock
        self._burst = burst
        self._window = window
        self._state: dict[str, tuple[float, int, int]] = {}  # key -> (window start, used, suppressed)

    def allow(self, key: str) -> tuple[bool, int]:
        """(may log now, number of lines suppressed since the last allowed one)."""
        now = self._clock()
        start, used, suppressed = self._state.get(key, (now, 0, 0))
        if now - start >= self._window:
            start, used = now, 0
        if used < self._burst:
            self._state[key] = (start, used + 1, 0)
            return True, suppressed
        self._state[key] = (start, used, suppressed + 1)
        return False, 0
