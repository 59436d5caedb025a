"""Foreign mapping through the real PrivCmd adapter against the simulated host."""

from __future__ import annotations

import errno
import os

import pytest

from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel, gfn_runs
from xen_vhost_master.xen.privcmd import PrivCmd

GIB = 1 << 30
RAM0 = 0x40000000
HOLE_GPA = RAM0 + 0x2000_0000  # 512 MiB into the guest
HOLE_SIZE = 64 * 4096


@pytest.mark.asyncio
async def test_map_1gib_with_hole_reports_hole_per_page_and_reads_back_guest_writes(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    from xen_vhost_sim.guest import SimGuest

    domid = sim_control.create_domain(mem_bytes=GIB, holes=[(HOLE_GPA, HOLE_SIZE)])
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        marks = [RAM0, RAM0 + 0x1234_5000, HOLE_GPA - 4096, HOLE_GPA + HOLE_SIZE, RAM0 + GIB - 4096]
        for i, gpa in enumerate(marks):
            guest.ram.view(gpa, 16)[:] = f"page-{i:03d}-{gpa:06x}"[:16].encode().ljust(16, b".")
        with PrivCmd(kernel) as pc:
            fm = pc.map_foreign_range(domid, RAM0 >> 12, GIB >> 12)
            try:
                first_hole = (HOLE_GPA - RAM0) >> 12
                assert fm.failed() == list(range(first_hole, first_hole + HOLE_SIZE // 4096))
                assert list(fm.failures) == [first_hole, HOLE_SIZE // 4096, -errno.EINVAL]  # one run
                view = fm.view()
                for i, gpa in enumerate(marks):
                    off = gpa - RAM0
                    assert bytes(view[off : off + 16]) == guest.ram.view(gpa, 16).tobytes()
                    assert bytes(view[off : off + 5]) == b"page-"
                # and the other direction: the daemon writes, the guest sees it
                view[0x100:0x104] = b"dm0!"
                assert guest.ram.view(RAM0 + 0x100, 4).tobytes() == b"dm0!"
                del view
            finally:
                fm.close()
    finally:
        guest.close()


def test_gfn_runs_splits_at_discontinuities() -> None:
    import array

    gfns = array.array("Q", list(range(10, 20)) + [100, 101, 5] + list(range(30, 33)))
    runs = gfn_runs(memoryview(gfns))
    assert [tuple(runs[i : i + 3]) for i in range(0, len(runs), 3)] == [(0, 10, 10), (10, 100, 2), (12, 5, 1), (13, 30, 3)]
    # the same array in pieces (as MMAPBATCH_V2 reads it): a run across two pieces is one run
    pieces = array.array("Q")
    for lo in range(0, len(gfns), 4):
        gfn_runs(memoryview(gfns)[lo : lo + 4], lo, pieces)
    assert pieces == runs


def test_failed_frames_across_the_step_the_arrays_are_read_by_are_one_run(kernel: SimKernel) -> None:
    from xen_vhost_master.xen.privcmd import FRAME_STEP

    with PrivCmd(kernel) as pc:
        fm = pc.map_foreign_range(77, RAM0 >> 12, 2 * FRAME_STEP + 5)  # no domain 77
        try:
            assert list(fm.failures) == [0, 2 * FRAME_STEP + 5, -errno.ESRCH]
            assert fm.failed() == list(range(2 * FRAME_STEP + 5))
        finally:
            fm.close()


def test_map_foreign_of_unknown_domain_fails_every_page_with_esrch(kernel: SimKernel) -> None:
    with PrivCmd(kernel) as pc:
        fm = pc.map_foreign_range(77, RAM0 >> 12, 16)
        try:
            assert list(fm.failures) == [0, 16, -errno.ESRCH]  # one run of 16 frames
        finally:
            fm.close()


def test_restricted_privcmd_refuses_other_domains(sim_control: SimControl, kernel: SimKernel) -> None:
    d1 = sim_control.create_domain(mem_bytes=16 << 20)
    d2 = sim_control.create_domain(mem_bytes=16 << 20)
    with PrivCmd(kernel) as pc:
        pc.restrict(d1)
        with pytest.raises(XenError) as ei:
            pc.map_foreign_range(d2, RAM0 >> 12, 1)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(XenError) as ei:
            pc.restrict(d2)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(XenError) as ei:
            pc.xen_version()
        assert ei.value.errno == errno.EPERM
        fm = pc.map_foreign_range(d1, RAM0 >> 12, 4)
        assert fm.ok()
        fm.close()


def test_scattered_gfns_map_page_by_page(sim_control: SimControl, kernel: SimKernel) -> None:
    """A fragmented batch (every other frame, reversed) still maps each frame to the right page."""
    import array

    domid = sim_control.create_domain(mem_bytes=64 << 20)
    base = RAM0 >> 12
    gfns = array.array("Q", range(base + 8190, base - 1, -2))  # 4096 single-frame runs
    with PrivCmd(kernel) as pc:
        whole = pc.map_foreign_range(domid, base, 8192)
        for i in range(0, 8192, 2):
            whole.view()[i * 4096 : i * 4096 + 4] = i.to_bytes(4, "little")
        fm = pc.map_foreign(domid, gfns)
        try:
            assert fm.ok()
            v = fm.view()
            for j in (0, 1, 2047, 4095):
                assert int.from_bytes(v[j * 4096 : j * 4096 + 4], "little") == gfns[j] - base
            del v
        finally:
            fm.close()
            whole.close()


def test_paged_out_frames_fail_with_enoent_and_map_on_retry(sim_control: SimControl, kernel: SimKernel) -> None:
    import array

    paged_gpa = RAM0 + 0x10000
    domid = sim_control.create_domain(mem_bytes=1 << 20, paged=[(paged_gpa, 3 * 4096)])
    gfns = array.array("Q", range(RAM0 >> 12, (RAM0 >> 12) + 256))
    with PrivCmd(kernel) as pc:
        fm = pc.map_foreign(domid, gfns)  # the ioctl's ENOENT is reported per page, not raised
        try:
            first = (paged_gpa - RAM0) >> 12
            assert fm.failed() == [first, first + 1, first + 2]
            assert list(fm.failures) == [first, 3, -errno.ENOENT]
            assert pc.retry_paged(fm, domid, gfns) == 0
            assert fm.ok()
            fm.view()[first * 4096 : first * 4096 + 2] = b"in"
            again = pc.map_foreign_range(domid, paged_gpa >> 12, 1)
            assert bytes(again.view()[:2]) == b"in"
            again.close()
        finally:
            fm.close()


def test_raw_mmapbatch_returns_enoent_when_a_frame_is_paged_out(sim_control: SimControl, kernel: SimKernel) -> None:
    import array

    from xen_vhost_master.xen.abi import PrivcmdIoctl, privcmd_mmapbatch_v2

    domid = sim_control.create_domain(mem_bytes=1 << 20, paged=[(RAM0 + 4096, 4096)])
    with PrivCmd(kernel) as pc:
        m = kernel.mmap(pc.fileno(), 4 * 4096)
        gfns = array.array("Q", range(RAM0 >> 12, (RAM0 >> 12) + 4))
        errs = array.array("i", [7] * 4)
        arg = privcmd_mmapbatch_v2(num=4, dom=domid, addr=m.addr, arr=gfns.buffer_info()[0], err=errs.buffer_info()[0])
        with pytest.raises(OSError) as ei:
            kernel.ioctl(pc.fileno(), PrivcmdIoctl.MMAPBATCH_V2, arg)
        assert ei.value.errno == errno.ENOENT
        assert list(errs) == [0, -errno.ENOENT, 0, 0]
        m.close()


def test_mapping_a_large_guest_builds_no_temporary_that_grows_with_it(sim_dir: str) -> None:
    """The frame and error arrays of a 1 GiB guest (2 MiB and 1 MiB) are filled, copied and scanned
    a step at a time, the daemon's in mappings of their own: the heap's peak while mapping and what
    the mapping keeps stay far below their size (a MiB-sized malloc'd temporary leaves its pages
    resident in the daemon's heap). The host runs in its own process, as it does for a daemon; what
    is traced is this process: the adapters and the simulated kernel (whose per-page map of the
    VMA, 256 KiB here, stands for the kernel's own memory)."""
    import tracemalloc

    from xen_vhost_master.guestmem.foreign import ForeignGuestMemory
    from tests.sim.simproc import sim_command, start_sim_process, stop_process

    path = os.path.join(sim_dir, "xen.sock")
    proc = start_sim_process([*sim_command(), "--socket", path, "--domain", "domid=3,mem=1024M,vcpus=1"])
    try:
        with PrivCmd(SimKernel(path)) as pc:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                memory = ForeignGuestMemory(pc, 3, [(RAM0, GIB)])
                kept, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            try:
                assert len(memory.view(RAM0 + GIB - 4096, 4096)) == 4096  # all of it mapped
            finally:
                memory.close()
    finally:
        stop_process(proc)
    assert peak - before < 1 << 20, f"peak {(peak - before) >> 10} KiB while mapping"
    assert kept - before < 512 << 10, f"{(kept - before) >> 10} KiB kept"
