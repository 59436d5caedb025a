"""``xen-vhost-master status``: ask running instances what they serve, and show it.

An instance answers on ``<runtime dir>/status.sock`` (0600, the daemon's user) with one JSON
document, :data:`STATUS_SCHEMA` in its ``schema`` key, written by ``Supervisor.status``: the
guest (``name``, ``domid``, ``pid``, ``version``, ``started``, ``uptime``) and one entry per
device, whatever its back-end's state (connecting, waiting, failed, connected, lost), the
xenstore entries refused as malformed included (failed). This module reads it and renders a table
(the default), the JSON itself, or metrics (:mod:`.metrics`). With ``--all`` every instance under
the runtime root is asked (``<root>/*/status.sock``).

Only the standard library and the daemon's pure modules: ``status`` must answer without loading
the supervisor, the vhost-user library or an event loop (tests/daemon/test_startup_imports.py).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

from .config import VIRTIO_IDS
from .errors import ExitCode
from .virtio_mmio import Status

__all__ = [
    "STATUS_SCHEMA",
    "StatusError",
    "driver_status_names",
    "instance_sockets",
    "query",
    "render_json",
    "render_table",
    "status_error",
    "type_name",
]

# Version of the status document. Bump it when a key changes meaning or goes away (adding keys
# does not): 1 = schema, version, started, uptime, type, driver_status, data_path_stats.
STATUS_SCHEMA = 1
QUERY_TIMEOUT = 5.0  # seconds: an instance answers from its event loop at once, or it is stuck
_NAMES = {number: name for name, number in VIRTIO_IDS.items()}
# virtio 1.2 §2.1: the bits in the order a driver sets them, then the two error bits
_STATUS_ORDER = (Status.ACKNOWLEDGE, Status.DRIVER, Status.FEATURES_OK, Status.DRIVER_OK,
                 Status.DEVICE_NEEDS_RESET, Status.FAILED)


def type_name(device_id: int) -> str:
    """``blk`` for 2 (linux/virtio_ids.h names, as ``type=`` takes them), else the number."""
    return _NAMES.get(device_id, str(device_id))


def driver_status_names(status: int) -> list[str]:
    """The device status register by bit name, e.g. ``["ACKNOWLEDGE", "DRIVER", "FEATURES_OK",
    "DRIVER_OK"]`` for 15; ``[]`` for 0 (reset: no driver yet, shown as ``-``); unknown bits as hex."""
    names = [bit.name or "" for bit in _STATUS_ORDER if status & bit]
    rest = status & ~sum(_STATUS_ORDER)
    return [*names, f"{rest:#x}"] if rest else names


class StatusError(Exception):
    """An instance could not be asked: ``code`` is what ``status`` exits with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def status_error(e: OSError, path: str) -> StatusError:
    """What asking the instance behind ``path`` failing with ``e`` means, and the exit code: the
    one place the status client sorts its errors."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return StatusError(f"permission denied on {path} ({e.strerror}): run status as root", ExitCode.NOPERM)
    if e.errno == errno.ENOENT:
        return StatusError(f"nothing answers on {path}: it does not exist", ExitCode.NOT_RUNNING)
    if e.errno == errno.ECONNREFUSED:
        return StatusError(f"nothing answers on {path}: it is left from an instance that is not running",
                           ExitCode.NOT_RUNNING)
    if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
        return StatusError(f"the instance on {path} did not answer within {QUERY_TIMEOUT:.0f} s", ExitCode.TEMPFAIL)
    return StatusError(f"cannot ask the instance on {path}: {e.strerror or e}", ExitCode.TEMPFAIL)


def query(path: str, timeout: float = QUERY_TIMEOUT) -> dict[str, Any]:
    """The status document of the instance answering on ``path`` (:class:`StatusError` if none)."""
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        raise status_error(e, path) from None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise StatusError(f"the instance on {path} answered something that is not JSON: {e}", ExitCode.TEMPFAIL) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        raise StatusError(f"the instance on {path} answered no status document", ExitCode.TEMPFAIL)
    return doc


def instance_sockets(root: str) -> list[str]:
    """The status sockets of every instance under ``root`` (``<root>/*/status.sock``), sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(root), "*", "status.sock")))


def render_json(docs: Sequence[dict[str, Any]], failures: Sequence[tuple[str, StatusError]], *, many: bool) -> str:
    """One instance's document as it answered, or for ``--all`` ``{"schema", "instances",
    "unreachable"}``."""
    if not many:
        return json.dumps(docs[0], indent=2)
    return json.dumps({"schema": STATUS_SCHEMA, "instances": list(docs),
                       "unreachable": [{"socket": path, "error": str(e)} for path, e in failures]}, indent=2)


def _duration(seconds: float) -> str:
    """``3d 04:05:06``, ``04:05:06``."""
    s = max(int(seconds), 0)
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def _total(counts: object) -> int:
    """A per-queue counter (``{"0": 3, "1": 4}``) summed."""
    return sum(v for v in counts.values() if isinstance(v, int)) if isinstance(counts, dict) else 0


COLUMNS = ("DEV", "TYPE", "BASE", "IRQ", "BACKEND", "DATA PATH", "DRIVER STATUS", "KICKS", "CALLS", "RECONN",
           "LAST ERROR")


def _row(d: dict[str, Any]) -> tuple[str, ...]:
    driver = d.get("driver_status")
    return (
        str(d.get("devid", "?")), str(d.get("type", d.get("device_id", "?"))), str(d.get("base", "?")),
        str(d.get("irq", "?")), str(d.get("backend", "?")), str(d.get("data_path", "?")),
        "|".join(driver) if isinstance(driver, list) and driver else "-",
        str(_total(d.get("kicks"))), str(_total(d.get("calls"))), str(d.get("reconnects", 0)),
        str(d.get("last_error") or "-").replace("\n", " "),
    )


def _waiting(ioreqs: object) -> str:
    """"  vCPUs waiting 0,1" when accesses of those vCPUs are not answered yet (Xen holds them
    stopped until they are): normal for an instant, a stuck device when it stays; else ""."""
    waiting = ioreqs.get("waiting") if isinstance(ioreqs, dict) else None
    return f"  vCPUs waiting {','.join(str(v) for v in waiting)}" if waiting else ""


def render_table(docs: Sequence[dict[str, Any]]) -> str:
    """Per instance a header line (guest, domid, pid, version, uptime) and one row per device."""
    out: list[str] = []
    for doc in docs:
        if out:
            out.append("")
        out.append(f"guest {doc.get('name', '?')}  domid {doc.get('domid', '?')}  pid {doc.get('pid', '?')}  "
                   f"version {doc.get('version', '?')}  up {_duration(float(doc.get('uptime', 0)))}  "
                   f"restricted {'yes' if doc.get('restricted') else 'no'}  "
                   f"kernel fast path {'yes' if doc.get('kernel_fast_path') else 'no'}"
                   + _waiting(doc.get("ioreqs")))
        rows = [COLUMNS, *(_row(d) for d in doc["devices"])]
        if len(rows) == 1:
            out.append("  (no devices)")
            continue
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return "\n".join(out)
