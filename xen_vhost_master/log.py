"""Logging helpers: a ``dom<N>/<device>`` prefix on every line, rate limiting for guest noise, and
the format of stderr: journald's or a terminal's.

A hostile guest can make the device model log on every register write; :class:`RateLimit` bounds
that volume (per reason key) and reports how many lines it suppressed when it speaks again.

When stderr is connected to the journal (systemd.exec(5): ``$JOURNAL_STREAM`` holds the device and
inode of that stream, ``<st_dev>:<st_ino>``), every line starts with its syslog priority ``<N>``
(sd-daemon(3): ``SD_ERR`` is ``<3>``) and carries no time stamp (the journal has its own), so
``journalctl -p err`` finds the errors. A message of several lines (a traceback) has the prefix on
each line: journald stores each line as its own entry. Run by hand, lines are as they always were.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any, TextIO

__all__ = ["DeviceLogger", "JournalFormatter", "LimitedLogger", "RateLimit", "device_logger", "journal_priority",
           "say", "setup_logging", "stderr_is_journal"]

FORMAT = "%(levelname)s %(name)s: %(message)s"  # by hand
JOURNAL_FORMAT = "%(name)s: %(message)s"  # the priority prefix says the level
# sd-daemon(3) SD_* (syslog(3) LOG_*): logging's levels to the journal's priorities.
SD_CRIT, SD_ERR, SD_WARNING, SD_NOTICE, SD_INFO, SD_DEBUG = 2, 3, 4, 5, 6, 7


def journal_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return SD_CRIT
    if levelno >= logging.ERROR:
        return SD_ERR
    if levelno >= logging.WARNING:
        return SD_WARNING
    if levelno >= logging.INFO:
        return SD_INFO
    return SD_DEBUG


def _prefixed(text: str, priority: int) -> str:
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


class JournalFormatter(logging.Formatter):
    """Each line of a record (its traceback's too) prefixed with the record's ``<N>``."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return _prefixed(super().format(record), journal_priority(record.levelno))


def stderr_is_journal(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` (stderr) is the stream ``$JOURNAL_STREAM`` names (systemd.exec(5))."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, colon, ino = value.partition(":")
    if not colon or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: int, stream: TextIO | None = None) -> None:
    """The root logger to ``stream`` (stderr) at ``level``: journal-native or the terminal format."""
    out = stream or sys.stderr
    journal = stderr_is_journal(out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    if journal:
        sys.excepthook = _log_uncaught  # a crash's traceback, line by line at <2>, not bare text


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("xen_vhost_master").critical("uncaught exception (a bug)", exc_info=(kind, value, tb))


def say(message: object, priority: int = SD_ERR, stream: TextIO | None = None) -> None:
    """One ``xen-vhost-master: message`` line on stderr, outside logging (a command's verdict),
    with its priority when stderr is the journal."""
    out = stream or sys.stderr
    line = f"xen-vhost-master: {message}"
    print(_prefixed(line, priority) if stderr_is_journal(out) else line, file=out)

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


_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


class LimitedLogger(DeviceLogger):
    """A :class:`DeviceLogger` whose lines are rate-limited: for lines a guest or a back-end can
    cause as often as it likes. One budget per level and message template (numbers in the
    template do not make a new one); the next line let through says how many were suppressed."""

    def __init__(self, logger: logging.Logger, prefix: str, limit: RateLimit) -> None:
        super().__init__(logger, {"prefix": prefix})
        self.limit = limit

    @classmethod
    def over(cls, log: DeviceLogger, clock: Callable[[], float]) -> LimitedLogger:
        """The same logger and prefix as ``log``, rate-limited."""
        if isinstance(log, LimitedLogger):
            return log
        return cls(log.logger, str((log.extra or {})["prefix"]), RateLimit(clock))

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        allowed, suppressed = self.limit.allow(f"{level}:{_NUMBERS.sub('#', str(msg))}")
        if not allowed:
            return
        if suppressed:
            msg = f"{msg} ({suppressed} similar lines suppressed)"
        super().log(level, msg, *args, **kwargs)
