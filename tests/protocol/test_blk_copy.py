"""RamDiskBlk's data path (vhost_user/testing/blk.py ``handle_request``): the guest's buffers and
the disk exchange data in one copy, whatever shape the guest gives its chain: a header sharing a
buffer with data, data split over several buffers, an empty descriptor after the status byte,
and a buffer outside guest memory (the request fails before the disk changes)."""

from __future__ import annotations

import struct

import pytest

from vhost_user.testing.blk import RamDiskBlk
from vhost_user.virtqueue import Buffer, Chain, FlatMemory, RingError, read_buffers, write_buffers

T_IN, T_OUT, S_OK, S_IOERR = 0, 1, 0, 1
HDR = struct.Struct("<IIQ")


def blk_with(ram: bytearray, disk_bytes: int = 1 << 20) -> RamDiskBlk:
    dev = RamDiskBlk(disk_bytes)
    dev.memory = FlatMemory(ram)  # type: ignore[assignment]
    return dev


def serve(dev: RamDiskBlk, chain: Chain) -> int:
    return dev.handle_request(chain, read_buffers, write_buffers)


def test_a_read_scatters_the_disk_over_the_buffers_and_ends_with_the_status_byte() -> None:
    ram = bytearray(64 << 10)
    dev = blk_with(ram)
    dev.disk[4096:4096 + 3072] = bytes(range(256)) * 12
    HDR.pack_into(ram, 0, T_IN, 0, 8)
    # 1000 + 2072 bytes of data, then 1 byte of status alone, then an empty descriptor
    chain = Chain(0, [Buffer(0, 16)], [Buffer(0x1000, 1000), Buffer(0x3000, 2072), Buffer(0x5000, 1), Buffer(0x6000, 0)])
    ram[0x5000] = 0xEE
    assert serve(dev, chain) == 3073
    assert ram[0x1000:0x1000 + 1000] + ram[0x3000:0x3000 + 2072] == dev.disk[4096:4096 + 3072]
    assert ram[0x5000] == S_OK


def test_a_write_gathers_from_after_the_header_even_inside_its_buffer() -> None:
    ram = bytearray(64 << 10)
    dev = blk_with(ram)
    data = (bytes(range(251)) * 9)[:2048]  # 4 sectors at sector 2
    HDR.pack_into(ram, 0x100, T_OUT, 0, 2)
    ram[0x110:0x110 + 500] = data[:500]  # the header's own buffer carries the first 500 bytes
    ram[0x2000:0x2000 + 1548] = data[500:]
    chain = Chain(0, [Buffer(0x100, 516), Buffer(0x2000, 1548)], [Buffer(0x4000, 1)])
    assert serve(dev, chain) == 1
    assert bytes(dev.disk[1024:1024 + 2048]) == data and ram[0x4000] == S_OK
    assert not any(dev.disk[:1024]) and not any(dev.disk[3072:8192])


def test_a_write_with_a_buffer_outside_guest_memory_fails_before_the_disk_changes() -> None:
    ram = bytearray(64 << 10)
    dev = blk_with(ram)
    HDR.pack_into(ram, 0, T_OUT, 0, 0)
    ram[0x1000:0x1200] = b"\xAB" * 512
    chain = Chain(0, [Buffer(0, 16), Buffer(0x1000, 512), Buffer(1 << 30, 512)], [Buffer(0x4000, 1)])
    with pytest.raises(RingError, match="not in guest memory"):
        serve(dev, chain)
    assert not any(dev.disk[:1024])


def test_a_request_past_the_disk_end_gets_an_io_error_and_zeroes() -> None:
    ram = bytearray(64 << 10)
    dev = blk_with(ram, disk_bytes=4096)
    HDR.pack_into(ram, 0, T_IN, 0, 7)
    ram[0x1000:0x1000 + 1024] = b"\xFF" * 1024
    chain = Chain(0, [Buffer(0, 16)], [Buffer(0x1000, 1024), Buffer(0x2000, 1)])
    assert serve(dev, chain) == 1025
    assert not any(ram[0x1000:0x1000 + 1024]) and ram[0x2000] == S_IOERR
