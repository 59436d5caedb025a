"""`python -m xen_vhost_sim.tools.bench_instr` without valgrind: the shadow engine loop it counts
serves every chain it publishes, the vCPU loop's reads are the daemon's answers, and a callgrind
file's total comes from its summary line."""

from __future__ import annotations

import pytest

from xen_vhost_sim.tools import bench_instr


def test_the_counted_shadow_engine_loop_serves_whole_batches() -> None:
    assert bench_instr.engine(40) == 2 * bench_instr.ENGINE_QD  # rounded up to a batch, all returned
    assert bench_instr.engine(10, 4, pages=32) == 12  # 128 KiB requests in indirect tables, as Linux sends
    spent: list[int] = []
    assert bench_instr.engine(8, 4, pages=32, write=True, spent=spent) == 8  # writes: the data device-readable
    assert len(spent) == 2 and all(ns > 0 for ns in spent)  # one notify + used per batch, timed


def test_the_counted_ram_disk_loop_serves_every_read_whole(no_fd_leak: None) -> None:
    # (the bytes written into the guest's buffers: data and the status byte, every request)
    assert bench_instr.backend(3, pages=1) == 3 * (4096 + 1)
    assert bench_instr.backend(2, pages=128) == 2 * (128 * 4096 + 1)


def test_the_wall_figure_is_the_engine_time_per_request(capsys) -> None:
    assert bench_instr.main(["--only", "shadow", "--wall", "--requests", "8", "--depth", "4", "--pages", "2"]) == 0
    name, value = capsys.readouterr().out.rsplit(maxsplit=1)
    assert name.startswith("shadow engine us per 8k read request (QD4") and 0 < float(value) < 10_000


def test_callgrind_total_is_the_summary_line(tmp_path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=main\n5 10\nsummary: 1234567\n")
    assert bench_instr.callgrind_total(str(out)) == 1234567
    out.write_text("version: 1\nevents: Ir\n")  # a killed program leaves no summary
    with pytest.raises(ValueError, match="no summary"):
        bench_instr.callgrind_total(str(out))


@pytest.mark.parametrize("bare", [False, True])
def test_the_counted_kernel_loop_delivers_and_notifies_every_event(no_fd_leak: None, bare: bool) -> None:
    # each event's evtchn read finds the port and its NOTIFY wakes the vCPU (a non-blocking read of
    # the wake eventfd raises otherwise), through SimKernel or, bare, the eventfds themselves
    assert bench_instr.kernel_child(50, bare) == 50


@pytest.mark.asyncio
async def test_the_counted_vcpu_loop_reads_the_daemons_magic_value() -> None:
    # a live daemon answers each held read (vcpu_child raises on a wrong value)
    assert await bench_instr.vcpu_child(5) == 5
