"""Metrics of running instances as text a Prometheus scraper reads: ``status --format=openmetrics``
(OpenMetrics 1.0 text) or ``--format=prometheus`` (the Prometheus text format 0.0.4, which
node_exporter's textfile collector parses), built from status documents (:mod:`.status`).

The daemon only counts (integer increments, fixed bucket arrays: see ``Supervisor.status`` and
``ShadowQueueStats``); rendering happens in the ``status`` process. Every per-device sample has
the labels ``domain`` (the guest's name), ``domid``, ``device`` (the device id) and ``type``
(``blk``, ``net``, …). Bytes, requests, the latency histogram, in-flight requests and the bounce
pool are the shadow data path's: it copies every request. A zero-copy path's back-end reads the
guest's rings itself, so for it the kicks and calls are the request figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PREFIX", "render"]

PREFIX = "xen_vhost_master_"
BACKEND_STATES = ("connecting", "waiting", "failed", "connected", "lost")

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Family:
    name: str  # without the _total of a counter
    kind: str  # counter | gauge | histogram
    help: str
    unit: str = ""
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)  # (suffix, labels, value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Families:
    def __init__(self) -> None:
        self._by_name: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help: str, labels: Labels, value: float, unit: str = "") -> None:
        fam = self._family(name, kind, help, unit)
        fam.samples.append(("_total" if kind == "counter" else "", labels, value))

    def histogram(self, name: str, help: str, labels: Labels, bounds: Sequence[float], counts: Sequence[int],
                  total: float, unit: str = "") -> None:
        fam = self._family(name, "histogram", help, unit)
        running = 0
        for bound, count in zip([*bounds, math.inf], counts, strict=True):
            running += count
            fam.samples.append(("_bucket", (*labels, ("le", _number(float(bound)))), running))
        fam.samples.append(("_count", labels, running))
        fam.samples.append(("_sum", labels, total))

    def _family(self, name: str, kind: str, help: str, unit: str) -> _Family:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = _Family(PREFIX + name, kind, help, unit)
        return fam

    def __iter__(self) -> Iterator[_Family]:
        return iter(self._by_name.values())


def _collect(docs: Sequence[dict[str, Any]]) -> _Families:
    out = _Families()
    for doc in docs:
        guest: Labels = (("domain", str(doc.get("name", ""))), ("domid", str(doc.get("domid", ""))))
        out.add("start_time_seconds", "gauge", "When the instance serving the guest started (Unix time).",
                (*guest, ("version", str(doc.get("version", "")))), float(doc.get("started", 0)), unit="seconds")
        ioreqs = doc.get("ioreqs")
        if isinstance(ioreqs, dict) and isinstance(ioreqs.get("waiting"), list):
            out.add("vcpus_waiting", "gauge", "Guest vCPUs Xen holds on an access the daemon has not answered "
                    "yet (a stuck device when it stays above 0).", guest, len(ioreqs["waiting"]))
        for d in doc["devices"]:
            labels: Labels = (*guest, ("device", str(d.get("devid", ""))), ("type", str(d.get("type", ""))))
            state = d.get("backend", "")
            out.add("backend_up", "gauge", "1 while the device's vhost-user back-end is connected.", labels,
                    int(state == "connected"))
            for s in BACKEND_STATES:
                out.add("backend_state", "gauge", "The back-end's state (1 for the current one).",
                        (*labels, ("state", s)), int(state == s))
            out.add("reconnects", "counter", "Back-end reconnections after a lost connection.", labels,
                    int(d.get("reconnects", 0)))
            out.add("kicks", "counter", "Guest notifications (available buffers) passed to the back-end.", labels,
                    _sum(d.get("kicks")))
            out.add("calls", "counter", "Back-end notifications (used buffers) seen by the daemon.", labels,
                    _sum(d.get("calls")))
            out.add("interrupts", "counter", "Interrupts raised in the guest.", labels, int(d.get("interrupts", 0)))
            out.add("guest_errors", "counter", "Guest accesses refused as breaking the virtio rules.", labels,
                    int(d.get("guest_errors", 0)))
            path = d.get("data_path_stats")
            if not isinstance(path, dict):
                continue
            out.add("requests", "counter", "Requests completed (used elements pushed to the guest).", labels,
                    int(path["requests"]))
            out.add("guest_read_bytes", "counter", "Bytes copied from the guest's buffers to the back-end.", labels,
                    int(path["bytes_read"]), unit="bytes")
            out.add("guest_written_bytes", "counter", "Bytes copied from the back-end into the guest's buffers.",
                    labels, int(path["bytes_written"]), unit="bytes")
            out.histogram("request_latency_seconds", "Time from the guest's kick to the used element pushed.",
                          labels, path["latency_bounds"], path["latency_counts"], float(path["latency_sum"]),
                          unit="seconds")
            out.add("inflight_requests", "gauge", "Requests handed to the back-end and not completed yet.", labels,
                    int(path["inflight"]))
            out.add("shadow_pool_size_bytes", "gauge", "The bounce pool's size.", labels, int(path["pool_bytes"]),
                    unit="bytes")
            out.add("shadow_pool_used_bytes", "gauge", "Bounce pool bytes held by requests in flight.", labels,
                    int(path["pool_used_bytes"]), unit="bytes")
            out.add("shadow_backpressure", "counter",
                    "Times a queue stopped taking guest requests for lack of pool or ring space.", labels,
                    int(path["held"]))
            out.add("shadow_held_queues", "gauge", "Queues stopped for lack of pool or ring space now.", labels,
                    int(path["held_now"]))
    return out


def _sum(counts: object) -> int:
    return sum(v for v in counts.values() if isinstance(v, int)) if isinstance(counts, dict) else 0


def render(docs: Sequence[dict[str, Any]], *, openmetrics: bool = True) -> str:
    """The exposition of ``docs`` (status documents of any number of instances): OpenMetrics text
    (``# UNIT`` lines, ``# EOF``), else the Prometheus text format (a counter's family is named
    with its ``_total``)."""
    lines: list[str] = []
    for fam in _collect(docs):
        name = fam.name if openmetrics or fam.kind != "counter" else fam.name + "_total"
        lines.append(f"# TYPE {name} {fam.kind}")
        if openmetrics and fam.unit:
            lines.append(f"# UNIT {name} {fam.unit}")
        lines.append(f"# HELP {name} {fam.help}")
        for suffix, labels, value in fam.samples:
            lines.append(f"{fam.name}{suffix}{_labels(labels)} {_number(value)}")
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n" if lines else ""
