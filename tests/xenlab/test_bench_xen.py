"""bench_xen.py on a synthetic bench log: one row per scenario and test beside blkback in the same
guest, the kernel fast-path row told apart by its instance's own log line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_xen import TESTS, main  # noqa: E402

SAID = {"pyblk": "kernel fast path (privcmd ioeventfd/irqfd) not used (--no-kernel-fast-path): user-space relay",
        "fastpath": "kernel fast path available: privcmd ioeventfd/irqfd for zero-copy devices",
        "qsd": "kernel fast path available: privcmd ioeventfd/irqfd for zero-copy devices"}


def bench_log(scenarios: dict[str, str] = SAID) -> str:
    out = []
    for s, said in scenarios.items():
        for test in TESTS:
            bs, ios = (1048576, 32) if "1M" in test else (4096, 256)
            for dev, ms in (("vda", 4000), ("xvdb", 2000)):
                out.append(f"[ 1.0] XENLAB-BENCH-CPU {s} DOMU-BENCH-BEGIN {test} {dev} dom0=100 instance=10 backend=5 "
                           "blkback=0 hz=100")
                out.append(f"[ 2.0] BENCH[{s}]| DOMU-BENCH-END {test} {dev} rc=0 bs={bs} ios={ios} ms={ms}")
                out.append(f"[ 2.0] XENLAB-BENCH-CPU {s} DOMU-BENCH-END {test} {dev} dom0=300 instance=60 backend=25 "
                           "blkback=0 hz=100")
        out.append(f"[ 3.0] DAEMON[{s}]| INFO xen_vhost_master: dom1: {said}")
        if s == "qsd":
            out.append(f"[ 3.0] DAEMON[{s}]| INFO xen_vhost_master: dom1: device 51712: shadow virtqueues (the back-end "
                       "knows only shared memory)")
    return "\n".join(out) + "\n"


def test_rows_beside_blkback_with_the_fast_path_said(tmp_path: Path) -> None:
    log, out = tmp_path / "bench.log", tmp_path / "out.json"
    log.write_text(bench_log())
    assert main([str(log), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"]
    rows = result["rows"]
    assert [r["scenario"] for r in rows[::len(TESTS)]] == ["pyblk", "fastpath", "qsd"]
    fast = {r["scenario"]: r["kernel_fast_path"] for r in rows}
    assert fast == {"pyblk": False, "fastpath": True, "qsd": False}  # qsd's shadow path: the daemon relays
    assert all(r["ratio"] == 0.5 for r in rows)  # virtio 4 s against blkback's 2 s in the same guest
    assert next(r for r in rows if r["scenario"] == "fastpath")["target"] == 0.8


def test_a_fastpath_guest_without_the_kernel_fast_path_is_incomplete(tmp_path: Path) -> None:
    """Debian's dom0 kernel (no CONFIG_XEN_PRIVCMD_EVENTFD): the fastpath row would be a relayed one."""
    log, out = tmp_path / "bench.log", tmp_path / "out.json"
    log.write_text(bench_log(dict(SAID, fastpath="kernel fast path (privcmd ioeventfd/irqfd) not available: "
                                                  "user-space relay")))
    assert main([str(log), "--out", str(out)]) == 1
    assert not json.loads(out.read_text())["complete"]


def test_a_phase_that_did_not_run_is_incomplete(tmp_path: Path) -> None:
    log, out = tmp_path / "bench.log", tmp_path / "out.json"
    log.write_text("\n".join(ln for ln in bench_log().splitlines() if "END read-4k xvdb" not in ln))
    assert main([str(log), "--out", str(out)]) == 1
