"""`make bench`'s reporting (sim/xen_vhost_sim/tools/bench.py), without running anything: fio's JSON
lines, the units, the fixed precision and the phase plan the progress line counts down."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from xen_vhost_sim.tools import bench


def _fioj(job: str, iops: float, bw_bytes: int, p50_ns: int) -> str:
    side = {"iops": iops, "bw_bytes": bw_bytes, "io_bytes": 1, "runtime_ms": 4000, "clat_ns_p50": p50_ns,
            "clat_ns_p99": 2 * p50_ns}
    return f"FIOJ 1 {job} " + json.dumps({"read": side, "write": {**side, "iops": 0.0}})


def test_fio_json_lines_give_iops_and_true_megabytes_per_second() -> None:
    got = bench.parse_fio([
        "UMLT noise",
        _fioj("randread:4k:1", 1234.5, 5_056_512, 700_000),
        _fioj("read:128k:4", 8000.0, 1_048_576_000, 500_000),
        "FIO 1 read:128k:4 old;terse;line",  # the terse form is not read any more
    ])
    assert got["randread_4k_qd1"] == [1234.5]
    assert got["randread_4k_qd1.clat_p50_us"] == [700.0]
    # 1,048,576,000 bytes/s is 1048.576 MB/s (KiB/s / 1000 would say 1024.0)
    assert got["read_128k_qd4"] == [pytest.approx(1048.576)]
    assert got["read_128k_qd4.clat_p99_us"] == [1000.0]


def test_fio_json_lines_give_the_ios_each_job_completed() -> None:
    side = {"iops": 1.0, "bw_bytes": 1, "io_bytes": 40 * 4096, "runtime_ms": 4000}
    big = {**side, "io_bytes": 3 * 131072}
    got = bench.parse_fio([f"FIOJ 1 randread:4k:1 {json.dumps({'read': side, 'write': side})}",
                           f"FIOJ 1 read:128k:4 {json.dumps({'read': big, 'write': side})}"])
    assert got["randread_4k_qd1.ios"] == [40.0] and got["read_128k_qd4.ios"] == [3.0]


def test_job_marks_give_each_job_the_counters_between_its_two_lines(tmp_path: Path) -> None:
    """The console log grows while the guest runs, a line may be cut between two looks; each job
    gets the counters between its FIOS and its FIOJ line, whatever ran before or after."""
    log = tmp_path / "uml.log"
    log.write_bytes(b"")
    counters = {"mmio": 0, "notifies": 0, "interrupts": 0}
    marks = bench.JobMarks(log, lambda: dict(counters))

    def grow(text: bytes, mmio: int) -> None:
        with open(log, "ab") as f:
            f.write(text)
        marks.look()
        counters["mmio"] += mmio  # what the relay counted after this look, before the next
        counters["notifies"] += mmio // 3
        counters["interrupts"] += mmio // 3

    grow(b"[    0.1] boot\r\nUMLT: BOOTED\n", 7)  # boot I/O: nobody's job
    grow(b"UMLT: FIOS 1 randread:4k:1\nUMLT: FI", 300)  # the first job's I/O; a line cut short
    grow(b"OJ 1 randread:4k:1 {\"read\": {}}\n", 0)
    grow(b"UMLT: FIOS 1 randread:4k:32\n", 60)
    grow(b"UMLT: FIOJ 1 randread:4k:32 {}\nUMLT: FIOS 1 read:128k:4\n", 30)
    grow(b"UMLT: FIOJ 1 read:128k:4 {}\nUMLT: DONE 0\n", 5)  # after the last job: not its
    assert marks.jobs == {"randread:4k:1": {"mmio": 300, "notifies": 100, "interrupts": 100},
                          "randread:4k:32": {"mmio": 60, "notifies": 20, "interrupts": 20},
                          "read:128k:4": {"mmio": 30, "notifies": 10, "interrupts": 10}}


def _job_res(direct_iops: float, relayed_iops: float, ios: float, mmio: int) -> dict[str, object]:
    job, spec = "randread_4k_qd1", "randread:4k:1"
    return {"fio": {"direct": {job: [direct_iops]}, "relayed": {job: [relayed_iops], f"{job}.ios": [ios]}},
            "relay": {"raw_eventfd_rtt_s": [10e-6] * 3, "ioreq_held_rtt_s": [40e-6] * 3},
            "daemon": {"relayed": {"jobs": [{spec: {"mmio": mmio, "notifies": mmio // 3, "interrupts": mmio // 3}}]}}}


def test_job_rows_give_ioreqs_per_io_the_qd1_ceiling_and_the_ioreq_share() -> None:
    # direct 20,000 IOPS (50 us per I/O); 3 IOREQs per I/O at the 10 us ping-pong: at best 80 us,
    # 0.625x; relayed at 5,000 IOPS adds 150 us per I/O, of which 3 x 40 us = 120 us are IOREQs
    rows = {r[0]: r for r in bench.job_rows(_job_res(20000.0, 5000.0, 1000.0, 3000), "randread_4k_qd1", "relayed")}
    assert rows["  IOREQs per I/O (relayed)"][2]["median"] == 3.0
    assert "QueueNotify 1.00, interrupts 1.00 per I/O" in rows["  IOREQs per I/O (relayed)"][3]
    assert rows["  relayed/direct ceiling"][2]["median"] == pytest.approx(0.625)
    assert rows["  IOREQ share of the time relayed adds"][2]["median"] == pytest.approx(0.8)
    # a job the marks missed (or results from before them): no row rather than a wrong one
    res = _job_res(20000.0, 5000.0, 1000.0, 3000)
    res["daemon"] = {"relayed": {"jobs": [{}]}}
    assert bench.job_rows(res, "randread_4k_qd1", "relayed") == []
    # the daemon's and the bridge's CPU over the job, per I/O (when the marks took them)
    res = _job_res(20000.0, 5000.0, 1000.0, 3000)
    res["daemon"]["relayed"]["jobs"][0]["randread:4k:1"].update(daemon_ns=45_000_000, guest_ns=30_000_000)  # type: ignore[index]
    rows = {r[0]: r for r in bench.job_rows(res, "randread_4k_qd1", "relayed")}
    assert rows["  daemon CPU per I/O (relayed)"][2]["median"] == 45.0
    assert "target <= 5 per 4k request" in rows["  daemon CPU per I/O (relayed)"][3]
    assert rows["  simulated guest side CPU per I/O (relayed)"][2]["median"] == 30.0
    assert "  of which the daemon served (relayed)" not in rows  # no access answered by the kernel
    # the kernel fast path: the QueueNotify writes the dom0 kernel answered are not the daemon's
    res["daemon"]["relayed"]["jobs"][0]["randread:4k:1"]["kernel_answered"] = 1000  # type: ignore[index]
    rows = {r[0]: r for r in bench.job_rows(res, "randread_4k_qd1", "relayed")}
    assert rows["  IOREQs per I/O (relayed)"][2]["median"] == 3.0
    assert rows["  of which the daemon served (relayed)"][2]["median"] == 2.0
    assert "kernel's ioeventfd answered 1.00 per I/O" in rows["  of which the daemon served (relayed)"][3]
    # QD32: the count only (its I/Os overlap: no ceiling from round trips in series)
    res = _job_res(20000.0, 5000.0, 1000.0, 500)
    res["fio"]["relayed"] = {"randread_4k_qd32": [5000.0], "randread_4k_qd32.ios": [1000.0]}  # type: ignore[index]
    res["daemon"] = {"relayed": {"jobs": [{"randread:4k:32": {"mmio": 500, "notifies": 100, "interrupts": 200}}]}}
    assert [r[0] for r in bench.job_rows(res, "randread_4k_qd32", "relayed")] == ["  IOREQs per I/O (relayed)"]


def test_table_prints_fixed_precision_per_unit() -> None:
    s = bench.summary([1.0, 2.0, 3.0])
    text = bench.table([("a", "IOPS", bench.summary([11800.4]), ""), ("b", "ratio", s, ""), ("c", "us", s, "")])
    rows = text.splitlines()[2:]
    assert rows[0].split()[2:5] == ["11800", "11800", "11800"]
    assert rows[1].split()[2:5] == ["2.000", "1.000", "3.000"]
    assert rows[2].split()[2:5] == ["2.0", "1.0", "3.0"]


def test_plan_lists_every_phase_run_all_announces() -> None:
    args = argparse.Namespace(reps=2, fio_time=4, paths=["relayed", "grant_shadow"], grant_reps=1, only=None,
                              idle_window=3.0, pingpong=2000, map_reps=3)
    names = [n for n, _w in bench.plan(args)]
    assert names == [
        "fio direct, repetition 1/2", "fio relayed, repetition 1/2", "fio grant_shadow, repetition 1/2",
        "fio direct, repetition 2/2", "fio relayed, repetition 2/2",
        "relay and IOREQ microbenchmark", "guest memory mapping",
    ]
    assert all(w > 0 for _n, w in bench.plan(args))


def test_progress_estimates_the_time_left_from_the_pace(capsys: pytest.CaptureFixture[str]) -> None:
    p = bench.Progress([("one", 10.0), ("two", 30.0)])
    p.start("one")
    p.t0 -= 20.0  # the first phase took twice its expected 10 s
    p.start("two")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[1/2] one: 0 s elapsed, about 40 s left")
    assert err[1].startswith("[2/2] two: 20 s elapsed, about 1 min 00 s left")


def _blocks(cpu_us: list[float], wall_us: list[float], floor_us: float = 2.0) -> list[dict[str, float]]:
    return [{"cpu_s": c / 1e6, "wall_s": w / 1e6, "floor_cpu_s": floor_us / 1e6} for c, w in zip(cpu_us, wall_us)]


def test_daemon_cpu_is_the_median_of_blocks_with_their_wall_time_and_floor() -> None:
    rel = {"daemon_cpu_ioreq_blocks": _blocks([10.0, 12.0, 90.0], [30.0, 30.0, 200.0]),
           "daemon_cpu_relay_blocks": _blocks([100.0, 100.0, 100.0], [300.0, 300.0, 300.0])}
    rows = {r[0]: r for r in bench.cpu_rows(rel)}
    ioreq = rows["daemon CPU per IOREQ (1 MMIO read)"]
    assert ioreq[2]["median"] == 12.0 and ioreq[2]["max"] == 90.0  # one slow block does not make the figure
    assert "NOT TRUSTWORTHY" not in ioreq[3]
    assert rows["  wall time per IOREQ (1 MMIO read), same blocks"][2]["median"] == 30.0
    assert rows["  daemon CPU per IOREQ (1 MMIO read)/raw eventfd peer CPU"][2]["median"] == 6.0
    assert rows["raw eventfd peer CPU per round trip"][2]["median"] == 2.0


def test_daemon_cpu_above_the_wall_time_is_flagged() -> None:
    rel = {"daemon_cpu_ioreq_blocks": _blocks([47.0, 12.0], [22.0, 30.0]),
           "daemon_cpu_relay_blocks": _blocks([100.0], [300.0])}
    rows = {r[0]: r for r in bench.cpu_rows(rel)}
    assert "1 block(s) CPU > wall: NOT TRUSTWORTHY" in rows["daemon CPU per IOREQ (1 MMIO read)"][3]
    assert "NOT TRUSTWORTHY" not in rows["daemon CPU per relay round trip"][3]


def test_oncpu_counts_every_thread_of_the_process() -> None:
    import os
    import threading
    import time

    def main_thread_ns() -> int:
        with open(f"/proc/{os.getpid()}/schedstat") as f:
            return int(f.read().split()[0])

    spun, done = threading.Event(), threading.Event()

    def spin() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        spun.set()
        done.wait(60)

    m0, a0 = main_thread_ns(), bench.oncpu_ns(os.getpid())
    t = threading.Thread(target=spin)
    t.start()
    try:
        assert spun.wait(60)  # the main thread waits blocked: the 50 ms are the other thread's
        m1, a1 = main_thread_ns(), bench.oncpu_ns(os.getpid())
    finally:
        done.set()
        t.join()
    assert (a1 - a0) - (m1 - m0) >= 45e6


def test_rss_parts_are_the_kernel_counters_that_sum_to_the_rss() -> None:
    parts = bench.rss_parts_kib(os.getpid())
    assert parts["anon"] > 0 and parts["file"] > 0
    assert parts["anon"] + parts["file"] + parts["shmem"] == parts["rss"]


def test_the_report_gives_the_rss_parts_of_the_peak_and_reads_results_without_them() -> None:
    dm = {**bench._daemon_figs(3.0), "ready_s": [0.5], "rss_idle_kib": [30 << 10], "rss_load_kib": [35 << 10],
          "cpu_s_per_run": [1.0], "idle_wakeups_per_s": [0.0], "idle_cpu_s_per_s": [0.0]}
    rows = bench.report_daemon_rows({"relayed_shadow": dm}, fio_time=4)
    assert [r[0] for r in rows if "of which" in r[0]] == []  # a results file from before the parts
    dm["rss_load_parts_kib"] = [{"anon": 20 << 10, "file": 14 << 10, "shmem": 1 << 10}]
    rows = bench.report_daemon_rows({"relayed_shadow": dm}, fio_time=4)
    parts = {r[0]: r[2]["median"] for r in rows if "of which" in r[0]}
    assert parts == {"  of which anon": 20.0, "  of which file": 14.0, "  of which shmem": 1.0}
    assert not [r for r in rows if "guest side" in r[0]]  # (no figure: no row)
    dm["guest_cpu_s_per_run"] = [2.5, 3.5, 3.0]
    rows = bench.report_daemon_rows({"relayed_shadow": dm}, fio_time=4)
    guest = [(r[0], r[2]["median"]) for r in rows if "guest side" in r[0]]
    assert guest == [("  simulated guest side CPU, same runs (relayed_shadow)", 3.0)]


def test_byte_compile_writes_the_bytecode_of_a_package_where_it_is_imported_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "bench_probe_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # (what an import would honour; compiling does not)
    assert bench.byte_compile(("bench_probe_pkg",)) == []
    assert list((pkg / "__pycache__").glob("__init__.*.pyc")) and list((pkg / "sub" / "__pycache__").glob("*.pyc"))


def test_profiled_daemon_writes_its_statistics(tmp_path: Path) -> None:
    """`bench --profile`: the daemon's command ends with os._exit (cli.entry), so `python -m cProfile`
    never wrote its statistics; the bench runs ``cli.main`` under a profiler instead, which writes
    them however main ends (here: a refused --device, exit status as main returns it)."""
    import pstats
    import subprocess
    import sys

    from xen_vhost_master.errors import ExitCode

    out = tmp_path / "daemon.prof"
    env = {**os.environ, "XEN_VHOST_SIM": str(tmp_path / "no-host.sock")}
    r = subprocess.run([sys.executable, "-c", bench.PROFILED_MAIN, str(out), "--domid", "1", "--no-xenstore",
                        "--device", "not-a-device"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == ExitCode.CONFIG, r.stderr  # main's own refusal, not a traceback
    assert "is not key=value" in r.stderr
    functions = {f"{Path(file).name}:{name}" for file, _line, name in pstats.Stats(str(out)).stats}  # type: ignore[attr-defined]
    assert "cli.py:main" in functions
