"""The pure virtio-mmio v2 device model: registers, status machine, interrupts, hostile writes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_vhost_master.virtio_mmio import (
    MAGIC,
    Activate,
    ConfigWrite,
    GuestError,
    IrqLevel,
    Notify,
    Reg,
    Reset,
    Status,
    VirtioMmioDevice,
    guest_features,
)

RAM = [(0x4000_0000, 0x1000_0000)]
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
BLK_CONFIG = (131072).to_bytes(8, "little") + bytes(52)


def make(queues=(256, 256), features=VERSION_1 | EVENT_IDX | 0x46) -> VirtioMmioDevice:
    return VirtioMmioDevice(device_id=2, device_features=features, queue_sizes=queues, config=BLK_CONFIG, ram=RAM)


def w(dev: VirtioMmioDevice, reg: int, value: int) -> list:
    return dev.write(reg, 4, value)


def r(dev: VirtioMmioDevice, reg: int) -> int:
    value, actions = dev.read(reg, 4)
    assert not actions
    return value


def negotiate(dev: VirtioMmioDevice, features: int, *, high_first: bool = True) -> None:
    w(dev, Reg.STATUS, 0)
    w(dev, Reg.STATUS, Status.ACKNOWLEDGE)
    w(dev, Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
    for sel in (1, 0) if high_first else (0, 1):
        w(dev, Reg.DRIVER_FEATURES_SEL, sel)
        w(dev, Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    w(dev, Reg.STATUS, r(dev, Reg.STATUS) | Status.FEATURES_OK)


def setup_queue(dev: VirtioMmioDevice, index: int, num: int = 256, base: int = 0x4010_0000) -> list:
    w(dev, Reg.QUEUE_SEL, index)
    w(dev, Reg.QUEUE_NUM, num)
    for reg, addr in ((Reg.QUEUE_DESC_LOW, base), (Reg.QUEUE_DRIVER_LOW, base + 0x1000), (Reg.QUEUE_DEVICE_LOW, base + 0x2000)):
        w(dev, reg, addr & 0xFFFFFFFF)
        w(dev, reg + 4, addr >> 32)
    return w(dev, Reg.QUEUE_READY, 1)


def test_identity_registers_read_as_virtio_mmio_v2():
    dev = make()
    assert (r(dev, Reg.MAGIC_VALUE), r(dev, Reg.VERSION), r(dev, Reg.DEVICE_ID)) == (MAGIC, 2, 2)


@pytest.mark.parametrize("high_first", [True, False])
def test_feature_pages_negotiate_in_either_select_order(high_first):
    dev = make()
    negotiate(dev, VERSION_1 | 0x40, high_first=high_first)
    assert r(dev, Reg.STATUS) & Status.FEATURES_OK
    assert dev.driver_features == VERSION_1 | 0x40


def test_device_features_are_paged_by_select_and_pages_beyond_one_read_zero():
    dev = make(features=VERSION_1 | 0xABCD)
    for sel, expected in ((0, 0xABCD), (1, 1), (2, 0), (7, 0)):
        w(dev, Reg.DEVICE_FEATURES_SEL, sel)
        assert r(dev, Reg.DEVICE_FEATURES) == expected


def test_features_ok_refused_when_driver_accepts_features_the_device_lacks():
    dev = make(features=VERSION_1)
    negotiate(dev, VERSION_1 | 0x1)
    assert not r(dev, Reg.STATUS) & Status.FEATURES_OK


def test_features_ok_refused_without_version_1():
    dev = make()
    negotiate(dev, 0x40)
    assert not r(dev, Reg.STATUS) & Status.FEATURES_OK


def test_driver_ok_activates_with_ready_queues_only():
    dev = make()
    negotiate(dev, VERSION_1)
    assert setup_queue(dev, 1) == []
    actions = w(dev, Reg.STATUS, r(dev, Reg.STATUS) | Status.DRIVER_OK)
    assert len(actions) == 1 and isinstance(actions[0], Activate) and actions[0].features == VERSION_1
    (q,) = actions[0].queues
    assert (q.index, q.num, q.desc, q.driver, q.device) == (1, 256, 0x4010_0000, 0x4010_1000, 0x4010_2000)
    assert dev.active


def test_status_cannot_skip_backwards_or_set_driver_ok_before_features_ok():
    dev = make()
    w(dev, Reg.STATUS, Status.ACKNOWLEDGE)
    actions = w(dev, Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    assert any(isinstance(a, GuestError) for a in actions)
    assert r(dev, Reg.STATUS) == Status.ACKNOWLEDGE


@pytest.mark.parametrize(
    "num, base, reason",
    [
        (100, 0x4010_0000, "power of two"),
        (512, 0x4010_0000, "QueueNumMax"),
        (0, 0x4010_0000, "QueueNum 0"),
        (256, 0x4010_0008, "aligned"),
        (256, 0x1000, "outside guest RAM"),
        (256, 0x4FFF_F000, "outside guest RAM"),
    ],
)
def test_invalid_queue_setup_sets_needs_reset_and_queue_stays_not_ready(num, base, reason):
    dev = make()
    negotiate(dev, VERSION_1)
    actions = setup_queue(dev, 0, num=num, base=base)
    assert any(isinstance(a, GuestError) and reason in a.reason for a in actions), actions
    assert r(dev, Reg.STATUS) & Status.DEVICE_NEEDS_RESET
    assert r(dev, Reg.QUEUE_READY) == 0
    # A reset clears it, and a good setup then works.
    negotiate(dev, VERSION_1)
    assert setup_queue(dev, 0) == []
    assert not r(dev, Reg.STATUS) & Status.DEVICE_NEEDS_RESET


def test_notify_for_ready_queue_kicks_and_others_are_refused():
    dev = make()
    negotiate(dev, VERSION_1)
    setup_queue(dev, 0)
    assert any(isinstance(a, GuestError) for a in w(dev, Reg.QUEUE_NOTIFY, 0))  # before DRIVER_OK
    w(dev, Reg.STATUS, r(dev, Reg.STATUS) | Status.DRIVER_OK)
    assert w(dev, Reg.QUEUE_NOTIFY, 0) == [Notify(0)]
    assert isinstance(w(dev, Reg.QUEUE_NOTIFY, 1)[0], GuestError)  # not ready
    assert isinstance(w(dev, Reg.QUEUE_NOTIFY, 9)[0], GuestError)  # absent


def active_device() -> VirtioMmioDevice:
    dev = make()
    negotiate(dev, VERSION_1)
    setup_queue(dev, 0)
    w(dev, Reg.STATUS, r(dev, Reg.STATUS) | Status.DRIVER_OK)
    return dev


def test_interrupt_line_follows_status_and_ack():
    dev = active_device()
    assert dev.used_buffer() == [IrqLevel(True)]
    assert dev.used_buffer() == []  # already high: no duplicate assert
    assert r(dev, Reg.INTERRUPT_STATUS) == 1
    assert w(dev, Reg.INTERRUPT_ACK, 1) == [IrqLevel(False)]
    assert r(dev, Reg.INTERRUPT_STATUS) == 0


def test_ack_leaving_bits_set_pulses_the_line_for_edge_triggered_guests():
    dev = active_device()
    dev.used_buffer()
    dev.config_changed(b"\x01" + BLK_CONFIG[1:])
    assert r(dev, Reg.INTERRUPT_STATUS) == 3
    assert w(dev, Reg.INTERRUPT_ACK, 1) == [IrqLevel(False), IrqLevel(True)]
    assert w(dev, Reg.INTERRUPT_ACK, 2) == [IrqLevel(False)]


def test_config_space_reads_at_natural_widths_and_generation_bumps_on_change():
    dev = active_device()
    assert dev.read(0x100, 8) == (131072, [])
    assert dev.read(0x100, 4) == (131072, [])
    gen = r(dev, Reg.CONFIG_GENERATION)
    assert dev.config_changed(BLK_CONFIG) == []  # unchanged: no bump, no interrupt
    assert r(dev, Reg.CONFIG_GENERATION) == gen
    new = (262144).to_bytes(8, "little") + BLK_CONFIG[8:]
    assert dev.config_changed(new) == [IrqLevel(True)]
    assert r(dev, Reg.CONFIG_GENERATION) == gen + 1
    assert r(dev, Reg.INTERRUPT_STATUS) == 2
    assert dev.read(0x100, 8)[0] == 262144


def test_read_register_gives_reads_value_for_aligned_32_bit_registers_and_declines_every_other_load():
    """The IOREQ hot path's read: the value alone where :meth:`read` has no actions; None (so
    that ``read`` serves it, with its guest error or from the config space) for any other load."""
    dev = active_device()
    for offset in range(0x100 + 16):
        for size in (1, 2, 4, 8):
            got = dev.read_register(offset, size)
            if size == 4 and offset % 4 == 0 and offset < 0x100:
                assert (got, []) == dev.read(offset, size), (offset, size)
            else:
                assert got is None, (offset, size)
    assert dev.read_register(Reg.MAGIC_VALUE, 4) == MAGIC
    assert isinstance(dev.read(Reg.STATUS, 2)[1][0], GuestError)


def test_config_write_is_forwarded_and_out_of_range_refused():
    dev = active_device()
    assert dev.write(0x100 + 20, 1, 0x1FF) == [ConfigWrite(20, b"\xff")]
    assert isinstance(dev.write(0x100 + 60, 4, 1)[0], GuestError)
    assert isinstance(dev.read(0x1F0, 4)[1][0], GuestError)


def test_reset_reports_whether_device_was_active_and_drops_line():
    dev = active_device()
    dev.used_buffer()
    actions = w(dev, Reg.STATUS, 0)
    assert actions == [Reset(True), IrqLevel(False)]
    assert (r(dev, Reg.STATUS), r(dev, Reg.INTERRUPT_STATUS)) == (0, 0)
    w(dev, Reg.QUEUE_SEL, 0)
    assert r(dev, Reg.QUEUE_READY) == 0
    assert r(dev, Reg.QUEUE_NUM_MAX) == 256  # a property of the device, survives reset
    assert w(dev, Reg.STATUS, 0) == [Reset(False)]


def test_back_end_failure_sets_needs_reset_with_config_interrupt():
    dev = active_device()
    actions = dev.needs_reset("back-end gone")
    assert IrqLevel(True) in actions
    assert r(dev, Reg.STATUS) & Status.DEVICE_NEEDS_RESET
    assert not dev.active
    assert isinstance(w(dev, Reg.QUEUE_NOTIFY, 0)[0], GuestError)


def test_queue_registers_locked_while_ready_and_odd_accesses_refused():
    dev = active_device()
    w(dev, Reg.QUEUE_SEL, 0)
    assert isinstance(w(dev, Reg.QUEUE_NUM, 16)[0], GuestError)
    assert isinstance(dev.write(Reg.STATUS, 2, 0)[0], GuestError)
    assert isinstance(dev.write(Reg.STATUS + 1, 4, 0)[0], GuestError)
    assert isinstance(dev.read(Reg.MAGIC_VALUE, 8)[1][0], GuestError)
    assert isinstance(w(dev, Reg.MAGIC_VALUE, 0)[0], GuestError)
    assert dev.active


def test_shm_registers_report_no_region():
    dev = make()
    w(dev, Reg.SHM_SEL, 0)
    assert (r(dev, Reg.SHM_LEN_LOW), r(dev, Reg.SHM_LEN_HIGH)) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_guest_features_drop_vhost_and_unsupported_transport_bits():
    qsd = 0x0000000175007E46  # qemu-storage-daemon's GET_FEATURES (docs/peers.md §1a)
    offered = guest_features(qsd)
    assert offered & (1 << 30) == 0 and offered & (1 << 26) == 0 and offered & (1 << 24) == 0
    assert offered & VERSION_1 and offered & EVENT_IDX and offered & 0x7E46 == 0x7E46
    assert guest_features(qsd, grants=True) & (1 << 33)
    assert not guest_features((1 << 34) | (1 << 35), packed=False)  # shadow: split rings, no IN_ORDER
    assert guest_features((1 << 34) | (1 << 35)) == (1 << 34) | (1 << 35)
    assert not guest_features(1 << 38)


registers = st.sampled_from([int(x) for x in Reg] + [0x100, 0x104, 0x13C, 0x1FC, 0x3, 0x6])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), registers, st.sampled_from([1, 2, 4, 8, 3]), st.integers(0, 2**64 - 1)), max_size=60))
def test_random_register_sequences_never_raise_and_keep_line_consistent(ops):
    dev = make()
    for is_write, offset, size, value in ops:
        if is_write:
            actions = dev.write(offset, size, value)
        else:
            got, actions = dev.read(offset, size)
            assert 0 <= got < 2 ** (8 * max(size, 4))
        assert all(isinstance(a, (IrqLevel, Notify, Activate, Reset, ConfigWrite, GuestError)) for a in actions)
        for a in actions:
            if isinstance(a, Notify):
                assert dev.queues[a.index].ready
            if isinstance(a, Activate):
                assert all(dev._in_ram(q.desc, 16 * q.num) for q in a.queues)
        assert dev.line == (dev.interrupt_status != 0)


def test_snapshot_restore_round_trip_keeps_the_driver_view():
    import json

    from xen_vhost_master.virtio_mmio import restore, snapshot

    dev = active_device()
    dev.used_buffer()
    state = json.loads(json.dumps(snapshot(dev)))
    fresh = make()
    restore(fresh, state)
    for reg in (Reg.STATUS, Reg.INTERRUPT_STATUS, Reg.CONFIG_GENERATION):
        assert r(fresh, reg) == r(dev, reg)
    assert fresh.active and fresh.line and fresh.driver_features == dev.driver_features
    assert w(fresh, Reg.QUEUE_NOTIFY, 0) == [Notify(0)]
    with pytest.raises(ValueError, match="queues"):
        restore(make(queues=(256,)), state)
    with pytest.raises(ValueError, match="features"):
        restore(make(features=0), state)


@pytest.mark.parametrize("change", [
    {"selectors": 7}, {"queues": "q"}, {"status": "4"}, {"driver_features": -1}, {"queues": [[1, 1, 0, 0]]},
    {"selectors": [0, 0, 0, 1 << 32]}, {"queues": None, "status": None},
])
def test_restore_refuses_a_malformed_snapshot_with_value_error(change):
    from xen_vhost_master.virtio_mmio import restore, snapshot

    state = {**snapshot(make()), **change}
    with pytest.raises(ValueError, match="snapshot"):
        restore(make(), state)
    missing = snapshot(make())
    del missing["config_generation"]
    with pytest.raises(ValueError, match="snapshot lacks config_generation"):
        restore(make(), missing)


@pytest.mark.parametrize(("change", "why"), [
    ({"status": 0x10}, "status 0x10 has bits no status defines"),
    ({"status": 0x7}, "status 0x7 has DRIVER_OK without FEATURES_OK"),
    ({"status": 0xE}, "status 0xe has DRIVER without ACKNOWLEDGE"),
    ({"status": 0xB, "driver_features": 0}, "FEATURES_OK without the required features 0x100000000"),
    ({"queues": [[512, 0, 0, 0, 0], [0, 0, 0, 0, 0]]}, "queue 0 num 512 exceeds QueueNumMax 256"),
])
def test_restore_refuses_a_state_no_driver_could_have_reached(change, why):
    """A state file read back is not trusted to be one the model produced: a status a driver
    cannot reach through the virtio 1.2 §3.1.1 steps, FEATURES_OK without what the device
    requires (checked when the driver sets it), a queue larger than the device offers."""
    import json

    from xen_vhost_master.virtio_mmio import restore, snapshot

    state = {**json.loads(json.dumps(snapshot(active_device()))), **change}
    with pytest.raises(ValueError, match=re.escape(why)):
        restore(make(), state)


def _place(dev: VirtioMmioDevice, index: int, desc: int, driver: int, device: int, num: int = 16) -> list:
    w(dev, Reg.QUEUE_SEL, index)
    w(dev, Reg.QUEUE_NUM, num)
    for reg, addr in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, driver), (Reg.QUEUE_DEVICE_LOW, device)):
        w(dev, reg, addr & 0xFFFFFFFF)
        w(dev, reg + 4, addr >> 32)
    return w(dev, Reg.QUEUE_READY, 1)


@pytest.mark.parametrize("case", ["used over avail", "avail in the table", "same rings as queue 0", "used in queue 0's table"])
def test_overlapping_ring_areas_are_refused_at_queue_ready_as_a_guest_error(case):
    """16 entries: table 256 bytes, driver area 38, device area 134 (split, EVENT_IDX)."""
    b = 0x4010_0000
    dev = make()
    negotiate(dev, VERSION_1 | EVENT_IDX)
    if case == "used over avail":
        actions = _place(dev, 0, b, b + 0x100, b + 0x110)
    elif case == "avail in the table":
        actions = _place(dev, 0, b, b + 0xF0, b + 0x200)
    else:
        assert _place(dev, 0, b, b + 0x100, b + 0x200) == []
        other = (b, b + 0x100, b + 0x200) if case == "same rings as queue 0" else (b + 0x1000, b + 0x1100, b + 0x80)
        actions = _place(dev, 1, *other)
    assert any(isinstance(a, GuestError) and "overlaps" in a.reason for a in actions), actions
    assert r(dev, Reg.STATUS) & Status.DEVICE_NEEDS_RESET and r(dev, Reg.QUEUE_READY) == 0
    # packed right up against each other is fine
    negotiate(dev, VERSION_1 | EVENT_IDX)
    assert _place(dev, 0, b, b + 0x100, b + 0x128) == [] and _place(dev, 1, b + 0x1B0, b + 0x2B0, b + 0x2D8) == []
