"""The event loop the daemon runs on: uvloop when it is installed, else asyncio's own.

uvloop is the default (a faster loop for the relays); without it everything works the same on
asyncio's loop (every test runs on both, tests/conftest.py), so its absence is one log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")

log = logging.getLogger("xen_vhost_master")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop: uvloop's, or asyncio's when uvloop is missing."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError as e:
        log.warning("uvloop is not available (%s): running on asyncio's event loop", e)
        return asyncio.run(main)
    return uvloop.run(main)
