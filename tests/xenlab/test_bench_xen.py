"""bench_xen.py on synthetic bench logs: fio's JSON report read into each phase's figures, one row
per scenario and test beside blkback in the same guest (the ratio, the target, dom0 CPU per I/O
from fio's own I/O count), the kernel fast-path row told apart by its instance's own log line, dd's
rows where the guest had no fio, and every broken phase making the report incomplete."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_xen import DD_TESTS, FIO_TESTS, fio_result, host_load, main  # noqa: E402

HERE = Path(__file__).parent
SAID = {"pyblk": "kernel fast path (privcmd ioeventfd/irqfd) not used (--no-kernel-fast-path): user-space relay",
        "fastpath": "kernel fast path available: privcmd ioeventfd/irqfd for zero-copy devices",
        "qsd": "kernel fast path available: privcmd ioeventfd/irqfd for zero-copy devices"}


def fio_json(test: str, *, ios: int, bw_bytes: float, p50_ns: int, error: int = 0) -> str:
    """fio 3.33's --output-format=json report of one job, reduced to what a report always has, on
    one line as the guest prints it."""
    rw = FIO_TESTS[test][0]
    active = "write" if "write" in rw else "read"

    def direction(n: int) -> dict[str, object]:
        bs = 1048576 if "1M" in test else 4096
        return {"io_bytes": n * bs, "io_kbytes": n * bs // 1024, "bw_bytes": bw_bytes if n else 0,
                "bw": int(bw_bytes / 1024) if n else 0, "iops": bw_bytes / bs if n else 0.0,
                "runtime": int(n * bs / bw_bytes * 1000) if n else 0, "total_ios": n, "short_ios": 0,
                "clat_ns": {"min": p50_ns // 2, "max": p50_ns * 3, "mean": float(p50_ns), "N": n,
                            "percentile": {"50.000000": p50_ns, "99.000000": p50_ns * 2}} if n else
                {"min": 0, "max": 0, "mean": 0.0, "N": 0}}
    job = {"jobname": test, "groupid": 0, "error": error, "job options": {"name": test, "rw": rw},
           "read": direction(ios if active == "read" else 0), "write": direction(ios if active == "write" else 0),
           "trim": direction(0)}
    return json.dumps({"fio version": "fio-3.33", "jobs": [job]})


def bench_log(scenarios: dict[str, str] = SAID, *, fio: dict[tuple[str, str, str], str] | None = None) -> str:
    """A bench boot's log: each scenario's guest ran every fio phase; the virtio disk moved half
    blkback's bytes per second (60 MB/s against 120), its dom0 CPU counters moved 2 s (200 jiffies
    at 100 Hz) per phase; fio's JSON lines can be replaced, (scenario, test, disk) -> line."""
    out = []
    for s, said in scenarios.items():
        out.append(f"[ 0.5] BENCH[{s}]| DOMU-BENCH-METHOD fio fio-3.33 ioengine=libaio")
        for test in FIO_TESTS:
            for dev, bw in (("vda", 60e6), ("xvdb", 120e6)):
                out.append(f"[ 1.0] XENLAB-BENCH-CPU {s} DOMU-BENCH-BEGIN {test} {dev} dom0=100 instance=10 "
                           "instance_sys=4 instance_wake=1000 backend=5 backend_sys=1 blkback=0 hz=100")
                out.append(f"[ 2.0] BENCH[{s}]| DOMU-BENCH-END {test} {dev} rc=0 method=fio ms=9000")
                out.append(f"[ 2.0] XENLAB-BENCH-CPU {s} DOMU-BENCH-END {test} {dev} dom0=300 instance=60 "
                           "instance_sys=19 instance_wake=1700 backend=25 backend_sys=6 blkback=0 hz=100")
                line = (fio or {}).get((s, test, dev), fio_json(test, ios=200, bw_bytes=bw, p50_ns=250_000 if dev == "vda"
                                                                 else 100_000))
                out.append(f"[ 2.5] BENCH[{s}]| DOMU-BENCH-FIO {test} {dev} {line}")
        out.append(f"[ 3.0] DAEMON[{s}]| INFO xen_vhost_master: dom1: {said}")
        if s == "qsd":
            out.append(f"[ 3.0] DAEMON[{s}]| INFO xen_vhost_master: dom1: device 51712: shadow virtqueues (the back-end "
                       "knows only shared memory)")
    return "\n".join(out) + "\n"


def run(tmp_path: Path, text: str, *extra: str) -> tuple[int, dict[str, object]]:
    log, out = tmp_path / "bench.log", tmp_path / "out.json"
    log.write_text(text)
    rc = main([str(log), "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_fio_s_own_report_is_read() -> None:
    """A report fio 3.33 wrote (randread, 4k, QD32, 2048 I/Os; the guest prints it on one line,
    newlines dropped and blanks squeezed)."""
    r = fio_result(re.sub(" +", " ", (HERE / "fio-3.33-randread-4k-qd32.json").read_text().replace("\n", "")))
    assert (r.ios, r.io_bytes, r.runtime_ms) == (2048, 2048 * 4096, 39)
    assert r.iops == pytest.approx(52512.820513)
    assert r.bw_bytes == 215092512
    assert r.clat_p50_us == pytest.approx(477.184)
    assert r.clat_p50_us is not None and r.clat_p99_us is not None and r.clat_p99_us > r.clat_p50_us


@pytest.mark.parametrize(("text", "reason"), [
    ('{"fio version": "fio-3.33", "jobs": [{"jobname": "x", "error": 5', "not JSON"),
    ("", "not JSON"),
    ('{"jobs": []}', "not one fio job"),
    (fio_json("randread-4k-qd1", ios=10, bw_bytes=1e6, p50_ns=1, error=5), "failed: error 5"),
    (fio_json("randread-4k-qd1", ios=0, bw_bytes=1e6, p50_ns=1), "did no I/O"),
])
def test_a_report_that_is_not_fio_s_says_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        fio_result(text)


def test_rows_beside_blkback_with_the_fast_path_said(tmp_path: Path) -> None:
    rc, result = run(tmp_path, bench_log())
    assert rc == 0 and result["complete"]
    rows = result["rows"]
    assert isinstance(rows, list)
    assert [r["scenario"] for r in rows[::len(FIO_TESTS)]] == ["pyblk", "fastpath", "qsd"]
    assert [r["test"] for r in rows[:len(FIO_TESTS)]] == list(FIO_TESTS)
    assert {r["method"] for r in rows} == {"fio"}
    fast = {r["scenario"]: r["kernel_fast_path"] for r in rows}
    assert fast == {"pyblk": False, "fastpath": True, "qsd": False}  # qsd's shadow path: the daemon relays
    assert all(r["ratio"] == 0.5 for r in rows)  # 60 MB/s against blkback's 120 in the same guest
    assert {(r["virtio_MBps"], r["blkback_MBps"]) for r in rows} == {(60.0, 120.0)}
    assert all(r["virtio_clat_p50_us"] == 250 and r["blkback_clat_p50_us"] == 100 for r in rows)
    # dom0's counters moved 2 s over fio's 200 I/Os (not the guest's wall time): 10 ms per I/O
    assert {r["dom0_cpu_us_per_io_virtio"] for r in rows} == {10000}
    assert {(r["instance_cpu_us_per_io"], r["backend_cpu_us_per_io"]) for r in rows} == {(2500, 1000)}
    # of the instance's 50 jiffies 15 in dom0's kernel, 700 wake-ups over 200 I/Os; the back-end's 5 of 20
    assert {(r["instance_sys_share"], r["instance_wakeups_per_io"], r["backend_sys_share"]) for r in rows} == {(0.3, 3.5, 0.25)}
    by = {(r["scenario"], r["test"]): r for r in rows}
    assert by["fastpath", "seqread-1M"]["target"] == 0.8 and by["fastpath", "seqread-1M"]["met"] is False
    assert by["pyblk", "randread-4k-qd1"]["target"] == 0.5 and by["pyblk", "randread-4k-qd1"]["met"] is True
    assert by["pyblk", "randread-4k-qd32"]["target"] is None and by["qsd", "seqread-1M"]["target"] is None
    assert (by["pyblk", "randwrite-4k-qd32"]["rw"], by["pyblk", "randwrite-4k-qd32"]["iodepth"]) == ("randwrite", 32)
    assert "fio-3.33" in str(result["method"])


def test_the_ratio_is_virtio_s_throughput_over_blkback_s(tmp_path: Path) -> None:
    slow = {("pyblk", "seqwrite-1M", "vda"): fio_json("seqwrite-1M", ios=32, bw_bytes=30e6, p50_ns=1),
            ("pyblk", "seqwrite-1M", "xvdb"): fio_json("seqwrite-1M", ios=32, bw_bytes=40e6, p50_ns=1),
            ("pyblk", "randread-4k-qd1", "vda"): fio_json("randread-4k-qd1", ios=256, bw_bytes=2e6, p50_ns=1),
            ("pyblk", "randread-4k-qd1", "xvdb"): fio_json("randread-4k-qd1", ios=256, bw_bytes=1e6, p50_ns=1)}
    rc, result = run(tmp_path, bench_log({"pyblk": SAID["pyblk"]}, fio=slow))
    assert rc == 0
    by = {r["test"]: r for r in result["rows"]}  # type: ignore[attr-defined]
    assert (by["seqwrite-1M"]["ratio"], by["seqwrite-1M"]["met"]) == (0.75, False)  # under 0.8
    assert (by["randread-4k-qd1"]["ratio"], by["randread-4k-qd1"]["met"]) == (2.0, True)
    assert by["randread-4k-qd1"]["virtio_iops"] == pytest.approx(2e6 / 4096, abs=0.1)


@pytest.mark.parametrize("line", ['{"jobs": [{"jobname": "seqread-1M", "read": {"total', ""])
def test_an_unreadable_fio_report_is_incomplete(tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A report cut on the console, or none (fio wrote nothing): the row has no ratio, and says why."""
    rc, result = run(tmp_path, bench_log(fio={("qsd", "seqread-1M", "xvdb"): line}))
    assert rc == 1 and not result["complete"]
    row = next(r for r in result["rows"] if (r["scenario"], r["test"]) == ("qsd", "seqread-1M"))  # type: ignore[attr-defined]
    assert row["ratio"] is None and row["blkback_MBps"] is None
    assert "xvdb: fio's report: not JSON" in row["errors"][0]
    assert "qsd seqread-1M: no ratio" in capsys.readouterr().err


def test_a_guest_without_fio_gives_dd_s_rows_so_labelled(tmp_path: Path) -> None:
    out = []
    for test in DD_TESTS:
        bs, ios = (1048576, 32) if "1M" in test else (4096, 256)
        for dev, ms in (("vda", 4000), ("xvdb", 2000)):
            out.append(f"[ 1.0] XENLAB-BENCH-CPU pyblk DOMU-BENCH-BEGIN {test} {dev} dom0=100 instance=10 backend=5 hz=100")
            out.append(f"[ 2.0] BENCH[pyblk]| DOMU-BENCH-END {test} {dev} rc=0 method=dd bs={bs} ios={ios} ms={ms}")
            out.append(f"[ 2.0] XENLAB-BENCH-CPU pyblk DOMU-BENCH-END {test} {dev} dom0=300 instance=60 backend=25 hz=100")
    out.append(f"[ 3.0] DAEMON[pyblk]| INFO xen_vhost_master: dom1: {SAID['pyblk']}")
    out.append("[ 3.0] BENCH[pyblk]| DOMU-BENCH-METHOD dd (no fio: not in this initramfs)")
    rc, result = run(tmp_path, "\n".join(out) + "\n")
    assert rc == 0
    rows = result["rows"]
    assert [r["test"] for r in rows] == list(DD_TESTS)  # type: ignore[attr-defined]
    assert all(r["method"] == "dd" and r["ratio"] == 0.5 and r["virtio_clat_p50_us"] is None for r in rows)  # type: ignore[attr-defined]
    # a log of a lab before the kernel's share and the wake-ups were counted: those columns are empty
    assert all(r["instance_sys_share"] is None and r["instance_wakeups_per_io"] is None for r in rows)  # type: ignore[attr-defined]
    assert str(result["method"]).startswith("busybox dd")


def test_a_fastpath_guest_without_the_kernel_fast_path_is_incomplete(tmp_path: Path) -> None:
    """Debian's dom0 kernel (no CONFIG_XEN_PRIVCMD_EVENTFD): the fastpath row would be a relayed one."""
    rc, result = run(tmp_path, bench_log(dict(SAID, fastpath="kernel fast path (privcmd ioeventfd/irqfd) not available: "
                                                             "user-space relay")))
    assert rc == 1 and not result["complete"]


def test_a_phase_that_did_not_run_is_incomplete(tmp_path: Path) -> None:
    rc, result = run(tmp_path, "\n".join(ln for ln in bench_log().splitlines()
                                         if "randread-4k-qd32 xvdb" not in ln))
    assert rc == 1 and not result["complete"]


def test_a_failed_fio_run_is_incomplete(tmp_path: Path) -> None:
    text = bench_log().replace("DOMU-BENCH-END randwrite-4k-qd1 vda rc=0", "DOMU-BENCH-END randwrite-4k-qd1 vda rc=1")
    rc, result = run(tmp_path, text)
    assert rc == 1 and not result["complete"]


def test_the_host_s_load_over_the_run(tmp_path: Path) -> None:
    samples = "1796350000 5.10 3.00 1.00\n1796350030 7.90 4.00 1.20\ngarbage\n1796350060 6.00 4.50 1.30\n"
    assert host_load(samples) == {"min": 5.1, "median": 6.0, "max": 7.9, "samples": 3}
    (tmp_path / "load").write_text(samples)
    _, result = run(tmp_path, bench_log(), "--host-load", str(tmp_path / "load"))
    assert result["host_load_1min"] == {"min": 5.1, "median": 6.0, "max": 7.9, "samples": 3}


def test_a_fio_guest_whose_phases_never_came_is_incomplete_with_fio_s_rows(tmp_path: Path) -> None:
    """Its guest said fio, then dom0 saw only the first phase's edges (the guest hung, the log was cut)."""
    text = "\n".join(ln for ln in bench_log({"pyblk": SAID["pyblk"]}).splitlines()
                     if "METHOD" in ln or "DAEMON" in ln or "BEGIN seqwrite-1M vda" in ln) + "\n"
    rc, result = run(tmp_path, text)
    assert rc == 1 and not result["complete"]
    assert [r["test"] for r in result["rows"]] == list(FIO_TESTS)  # type: ignore[attr-defined]
