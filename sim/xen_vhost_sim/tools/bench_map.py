"""Benchmark (not a test): cost of building and issuing IOCTL_PRIVCMD_MMAPBATCH_V2 for a whole guest.

    python -m xen_vhost_sim.tools.bench_map [--gib 4] [--repeat 3] [--arch arm64]

Starts a simulated host in a thread, creates a guest of ``--gib`` GiB (1 Mi pages for 4 GiB; on
Arm64 that is 3 GiB in RAM0 + 1 GiB in RAM1) and times, per repetition:

* build: the u64 GFN array for every RAM bank, built vectorised (``array('Q', range(...))``, in C);
* map:   mmap of the privcmd VMA + the MMAPBATCH_V2 ioctl through the real PrivCmd adapter
         (SimKernel's copy_from_user of 8 MiB of GFNs, run detection, the host's answer, MAP_FIXED);
* touch (``--touch``): one byte read per 4 KiB page (checks every page is really there; this
  allocates all of the guest's RAM in the memfd, 4 GiB for 4 GiB, and costs seconds);
* unmap: munmap.

Against a real dom0 (``XEN_VHOST_SIM`` unset, root, ``--domid N``) it maps that guest instead.
"""

from __future__ import annotations

import argparse
import array
import os
import sys
import tempfile
import time

from xen_vhost_sim.host import SimHost
from xen_vhost_sim.memory import Arch, bank_layout
from xen_vhost_master.xen.abi import XEN_PAGE_SHIFT
from xen_vhost_master.xen.kernel import Kernel, RealKernel
from xen_vhost_master.xen.privcmd import PrivCmd

__all__ = ["build_gfns", "main"]


def build_gfns(banks: list[tuple[int, int]]) -> array.array[int]:
    """All GFNs of ``banks`` as one u64 array (no Python list of ints)."""
    gfns = array.array("Q")
    for gpa, size in banks:
        gfns.extend(array.array("Q", range(gpa >> XEN_PAGE_SHIFT, (gpa + size) >> XEN_PAGE_SHIFT)))
    return gfns


def _run(kernel: Kernel, domid: int, banks: list[tuple[int, int]], repeat: int, touch: bool) -> None:
    out = sys.stdout
    with PrivCmd(kernel) as pc:
        for i in range(repeat):
            t0 = time.perf_counter()
            gfns = build_gfns(banks)
            t1 = time.perf_counter()
            fm = pc.map_foreign(domid, gfns)
            t2 = time.perf_counter()
            failed = len(fm.failed())
            checksum = 0
            if touch:
                view = fm.view()
                checksum = sum(view[:: 1 << XEN_PAGE_SHIFT])
                del view
            t3 = time.perf_counter()
            fm.close()
            t4 = time.perf_counter()
            out.write(
                f"run {i}: {len(gfns)} pages ({len(gfns) >> 8} MiB): build {1e3 * (t1 - t0):.1f} ms, "
                f"mmap+MMAPBATCH_V2 {1e3 * (t2 - t1):.1f} ms, failed pages {failed}, "
                + (f"touch {1e3 * (t3 - t2):.1f} ms (sum {checksum}), " if touch else "")
                + f"munmap {1e3 * (t4 - t3):.1f} ms\n"
            )
            out.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--arch", default="arm64", choices=[a.value for a in Arch])
    p.add_argument("--touch", action="store_true", help="read one byte per page (allocates all guest RAM)")
    p.add_argument("--domid", type=int, default=None, help="real dom0: map this guest (banks from --gib/--arch)")
    args = p.parse_args(argv)
    banks = bank_layout(Arch(args.arch), args.gib << 30)
    if args.domid is not None and not os.environ.get("XEN_VHOST_SIM"):
        _run(RealKernel(), args.domid, banks, args.repeat, args.touch)
        return 0
    from xen_vhost_sim.simkernel import SimKernel

    with tempfile.TemporaryDirectory(prefix="xsim-bench-") as d, SimHost(os.path.join(d, "xen.sock")) as host:
        with host.control() as ctl:
            domid = ctl.create_domain(mem_bytes=args.gib << 30, arch=args.arch)
        _run(SimKernel(host.path), domid, banks, args.repeat, args.touch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
