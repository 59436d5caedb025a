"""SIM-ONLY domains whose RAM is an external fd (User-Mode Linux's physical memory file): the
host keeps its own duplicate, foreign mapping and the guest's view reach the same bytes as the
fd's owner, and bad requests (no fd, too small a file, overlapping banks) are refused with an errno
and no leaked fd."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from xen_vhost_sim.guest import SimControl, SimGuest, SimHostError
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.privcmd import PrivCmd

SIZE = 8 << 20


def _file(size: int) -> int:
    fd = os.memfd_create("uml-like-physmem", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.asyncio
async def test_external_fd_is_the_guest_ram_seen_by_privcmd_and_the_guest(
    no_fd_leak: None, sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    fd = _file(SIZE)
    try:
        owner = mmap.mmap(fd, SIZE)  # the fd's owner (UML) writes its "physical" memory
        owner[0x3000:0x3008] = b"uml-phys"
        domid = sim_control.create_domain_on_fd(fd, [(0, SIZE)], vcpus=2, holes=[(0, 0x2000)])
    finally:
        os.close(fd)  # the host keeps its own duplicate
    info = sim_control.domain_info(domid)
    assert info["banks"] == [[0, SIZE]] and info["vcpus"] == 2 and info["holes"] == [[0, 0x2000]]
    with PrivCmd(kernel) as pc:
        fm = pc.map_foreign_range(domid, 0, 4)
        try:
            assert fm.failed() == [0, 1]  # the hole (UML's kernel image, not in the file)
            with fm.view() as view:
                assert bytes(view[0x3000:0x3008]) == b"uml-phys"
                view[0x3100:0x3104] = b"dm0!"
        finally:
            fm.close()
    assert owner[0x3100:0x3104] == b"dm0!"  # the owner sees what dom0 wrote
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        assert guest.ram.view(0x3000, 8).tobytes() == b"uml-phys"
        assert guest.ram.banks() == [(0, SIZE)]
    finally:
        guest.close()
    sim_control.destroy_domain(domid)
    owner.close()


@pytest.mark.parametrize(
    ("size", "banks", "code"),
    [
        (SIZE // 2, [(0, SIZE)], errno.EINVAL),  # the file is smaller than the banks
        (SIZE, [(0, SIZE // 2), (SIZE // 4, SIZE // 4)], errno.EINVAL),  # overlapping banks
        (SIZE, [(0, 4097)], errno.EINVAL),  # not page aligned
        (SIZE, [], errno.EINVAL),  # no banks
    ],
)
def test_bad_external_ram_is_refused_without_leaking(
    no_fd_leak: None, sim_control: SimControl, size: int, banks: list[tuple[int, int]], code: int
) -> None:
    fd = _file(size)
    try:
        with pytest.raises(SimHostError) as ei:
            sim_control.create_domain_on_fd(fd, banks)
        assert ei.value.errno == code
    finally:
        os.close(fd)
    # the host is still fine: an ordinary domain can be created
    assert sim_control.create_domain(mem_bytes=1 << 20) > 0


def test_fd_count_mismatch_is_refused(no_fd_leak: None, sim_host: SimHost, sim_control: SimControl) -> None:
    with pytest.raises(SimHostError) as ei:  # external_ram without an fd
        sim_control.call({"op": "create_domain", "external_ram": True, "banks": [[0, SIZE]]})
    assert ei.value.errno == errno.EBADF
    fd = _file(SIZE)
    try:  # an fd sent with a request that does not take it is closed by the host
        reply, _ = sim_control.call({"op": "domain_info", "domid": sim_control.create_domain(mem_bytes=1 << 20)}, fds=[fd])
        assert reply["vcpus"] == 1
    finally:
        os.close(fd)
    with SimControl(sim_host.path) as ctl:  # a request claiming fds it did not send: connection dropped
        with pytest.raises((ConnectionError, OSError)):
            ctl.call({"op": "domain_info", "domid": 1, "nfds": 2})
    assert len([c for c in sim_host.hv.domains]) >= 2  # the host survived


def test_guest_memory_closes_while_a_view_is_still_held(no_fd_leak: None) -> None:
    """A guest driver whose close() never ran still holds ring views: closing the guest's RAM must not
    raise a second error (BufferError from mmap.close) over the test's own failure, and must still
    give back the memfd; the view stays valid until it is released."""
    from xen_vhost_sim.memory import GuestMemory

    mem = GuestMemory([(0, 0x4000)])
    view = mem.view(0x1000, 16)
    view[:4] = b"ring"
    fd = mem.memfd
    mem.close()
    assert mem.memfd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    assert bytes(view[:4]) == b"ring"
    view.release()
    with pytest.raises(ValueError):
        mem.view(0x1000, 16)
