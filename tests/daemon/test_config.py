"""Configuration parsing: --device, TOML, libxl's xenstore keys, merging; errors name the fix."""

from __future__ import annotations

import pytest

from xen_vhost_master.config import (
    DeviceConfig,
    MemoryMode,
    check_socket_template,
    device_from_xenstore,
    load_guest_toml,
    load_toml,
    merge,
    parse_device_arg,
    vdev_name,
    virtio_id,
)
from xen_vhost_master.errors import ConfigError


@pytest.mark.parametrize("text, expected", [("blk", 2), ("net", 1), ("26", 26), ("0x1a", 26), ("virtio,device1a", 26), ("virtio,device22", 0x22)])
def test_virtio_id_accepts_names_numbers_and_dt_compatibles(text, expected):
    assert virtio_id(text, "type") == expected


@pytest.mark.parametrize("text", ["disk", "virtio,device", "virtio,devicezz", "0", "300", ""])
def test_virtio_id_rejects_unknown_types_with_the_choices(text):
    with pytest.raises(ConfigError, match="unknown virtio device type"):
        virtio_id(text, "type")


def test_device_flag_full_form():
    d = parse_device_arg("type=blk,base=0x2000000,irq=33,socket=/run/qsd.sock,mode=server,queue-size=128,queues=2,memory=shadow", 3)
    assert d == DeviceConfig(devid=3, device_id=2, base=0x2000000, irq=33, socket="/run/qsd.sock", listen=True,
                             queue_size=128, num_queues=2, memory=MemoryMode.SHADOW, source="cli")


def test_device_flag_dt_compatible_type_with_its_comma():
    assert parse_device_arg("type=virtio,device22,base=0x2000200,irq=34").device_id == 0x22


def test_socket_path_defaults_to_the_per_guest_name_template():
    d = parse_device_arg("type=net,base=33554432,irq=33", 1)
    assert d.socket_path("web", 7) == "/run/vhost-user/web/1.sock"
    # {name} is the name itself when it is one plain path component (a back-end unit's %I) ...
    assert d.socket_path("web-1 é", 7) == "/run/vhost-user/web-1 é/1.sock"
    # ... and else escaped as systemd-escape does (a back-end unit's %i): always one component
    assert d.socket_path("../my guest/x", 7) == "/run/vhost-user/\\x2e.-my\\x20guest-x/1.sock"
    assert d.socket_path(".hidden", 7) == "/run/vhost-user/\\x2ehidden/1.sock"


@pytest.mark.parametrize("devid, name", [
    (51712, "xvda"), (51728, "xvdb"), (51729, "xvdb1"), ((202 << 8) | (15 << 4) | 15, "xvdp15"),
    ((1 << 28) | (26 << 8), "xvdaa"), ((1 << 28) | (701 << 8) | 3, "xvdzz3"), ((1 << 28) | (702 << 8), "xvdaaa"),
    ((8 << 8) | (1 << 4), "sdb"), (3 << 8, "hda"), ((3 << 8) | 64 | 2, "hdb2"), ((22 << 8) | 64, "hdd"),
    (0, "0"), (5, "5"), (1 << 29, str(1 << 29)),
])
def test_vdev_decodes_xen_virtual_block_device_ids(devid, name):
    assert vdev_name(devid) == name


def test_socket_templates_take_name_domid_devid_vdev():
    d = parse_device_arg("type=blk,base=0x2000000,irq=33,devid=51712,socket=/run/qsd/{name}-{domid}/{vdev}.{devid}.{{x}}")
    assert d.socket_path("web", 7) == "/run/qsd/web-7/xvda.51712.{x}"
    (t,) = load_toml_text('[[device]]\ntype = "blk"\nbase = 0x2000000\nirq = 33\nsocket = "/s/{vdev}.sock"\n')
    assert t.socket_path("web", 7) == "/s/0.sock"  # devid 0: not a disk number


@pytest.mark.parametrize("socket, message", [
    ("/run/{nmae}.sock", "unknown template key {nmae}; use {name}, {domid}, {devid}, {vdev}"),
    ("/run/{}.sock", "unknown template key {}"),
    ("/run/{name.x}.sock", "unknown template key {name.x}"),
    ("/run/{devid:04d}.sock", "{devid} takes no format spec or conversion"),
    ("/run/{name!r}.sock", "{name} takes no format spec or conversion"),
    ("/run/{name.sock", "expected '}' before end of string"),
    ("/run/}.sock", "Single '}' encountered"),
])
def test_bad_socket_templates_are_one_line_config_errors(socket, message):
    with pytest.raises(ConfigError) as e:
        parse_device_arg(f"type=blk,base=0x2000000,irq=33,socket={socket}")
    assert message in str(e.value) and "--device" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--socket"):
        check_socket_template(socket, "--socket")


def test_the_edges_of_the_valid_ranges_are_accepted():
    for text in ("type=blk,base=0x2000200,irq=32,queue-size=1", "type=blk,base=0,irq=1019,queue-size=32768",
                 "type=blk,base=0x2000000,irq=33,socket=/run/{name}/{devid}.sock"):
        parse_device_arg(text)
    with pytest.raises(ConfigError, match="--socket='x/{devid}.sock': not an absolute path"):
        check_socket_template("x/{devid}.sock", "--socket")


def load_toml_text(text: str) -> list[DeviceConfig]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        return load_toml(f.name)


@pytest.mark.parametrize(
    "text, message",
    [
        ("type=blk,irq=33", "missing base="),
        ("type=blk,base=0x2000000,irq=33,mode=both", "mode='both'"),
        ("type=blk,base=zz,irq=33", "base: 'zz' is not a number"),
        ("type=blk,base=0x2000000,irq=33,queue-size=0", "queue-size: 0 is out of range"),
        ("type=blk,base=0x2000000,irq=33,queue-size=65536", "queue-size: 65536 is out of range"),
        ("type=blk,base=0x2000000,irq=33,queue-size=7", "queue-size=7: not a power of two"),
        ("type=blk,base=0x2000000,irq=33,queue-size=384", "queue-size=384: not a power of two"),
        ("type=blk,base=0x2000100,irq=33", "base=0x2000100: not aligned to the 0x200-byte virtio-mmio window"),
        ("type=blk,base=0x2000001,irq=33", "base=0x2000001: not aligned"),
        ("type=blk,base=0x2000000,irq=5", "irq=5: not a GIC SPI (32..1019"),
        ("type=blk,base=0x2000000,irq=31", "irq=31: not a GIC SPI"),
        ("type=blk,base=0x2000000,irq=1020", "irq=1020: not a GIC SPI"),
        ("type=blk,base=0x2000000,irq=33,socket=qsd.sock", "socket='qsd.sock': not an absolute path"),
        ("type=blk,base=0x2000000,irq=33,socket={name}/{devid}.sock", "not an absolute path"),
        ("type=blk,base=0x2000000,irq=33,colour=red", "unknown key"),
        ("type=blk,base=0x2000000,irq=33,memory=magic", "memory='magic'"),
        ("type=blk,0x2000000,irq=33", "not key=value"),
    ],
)
def test_device_flag_errors_name_the_key_and_the_fix(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        parse_device_arg(text)
    assert "--device" in str(e.value)


def test_toml_devices(tmp_path):
    path = tmp_path / "guest.toml"
    path.write_text('[[device]]\ntype = "blk"\nbase = 0x2000000\nirq = 33\nsocket = "/run/a.sock"\n\n'
                    '[[device]]\ntype = "net"\nbase = "0x2000200"\nirq = 34\nmode = "server"\n')
    a, b = load_toml(path)
    assert (a.device_id, a.base, a.socket, a.source) == (2, 0x2000000, "/run/a.sock", "config")
    assert (b.devid, b.device_id, b.base, b.listen) == (1, 1, 0x2000200, True)


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[device]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="No such file"):
        load_toml(tmp_path / "missing.toml")


def test_toml_top_level_memory_and_backend_users(tmp_path):
    path = tmp_path / "web.toml"
    path.write_text('memory = "shadow"\nbackend-user = ["qsd", 1001]\n[[device]]\ntype = "blk"\nbase = 0x2000000\nirq = 33\n')
    got = load_guest_toml(path, "")
    assert (got.memory, got.backend_users, len(got.devices)) == (MemoryMode.SHADOW, ("qsd", "1001"), 1)
    assert load_guest_toml(_write(tmp_path, 'backend-user = "qsd"\n')).backend_users == ("qsd",)


@pytest.mark.parametrize("text, message", [
    ("memory = 'fast'\n", "memory='fast': use one of auto, xen-mmap, shadow, sim-memfd"),
    ("backend-user = [true]\n", "backend-user must be a user name or uid"),
    ("devices = []\n", 'unknown key devices; known: [[device]] tables, memory = "MODE", backend-user = [...]'),
    ("[[devices]]\ntype = 'blk'\nbase = 0x2000000\nirq = 33\n", "unknown table [[devices]]; known: [[device]] tables"),
    ("[options]\nmemory = 'shadow'\n", "unknown table [options]"),
    ("[[device]]\ntype = 'blk'\nbase = 0x2000000\nirq = 33\nsockets = '/s'\n", "device #0: unknown key(s) sockets"),
    ("[[device]]\ntype = 'blk'\nbase = 0x2000000\nirq = 33\n[device.extra]\nx = 1\n", "device #0: unknown key(s) extra"),
    ("[[device]]\ntype = 'blk'\nbase = 0x2000100\nirq = 33\n", "device #0: base=0x2000100: not aligned"),
    ("[[device]]\ntype = 'blk'\n", "device #0: missing base="),
    ("\xff = 1\n", "not valid TOML"),
    ("[[device]\n", "not valid TOML"),
])
def test_malformed_guest_files_name_the_file_in_one_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_guest_toml(path, "")
    assert str(e.value).startswith(f"{path}") and message in str(e.value) and "\n" not in str(e.value)


def _write(tmp_path, text: str):
    path = tmp_path / "g.toml"
    path.write_bytes(text.encode("latin-1"))
    return path


def test_xenstore_virtio_kind_hex_base_and_virtio_disk_decimal_base():
    v = device_from_xenstore("virtio", 0, {"type": "virtio,device22", "base": "0x2000000", "irq": "33", "transport": "mmio", "grant_usage": "1"})
    assert (v.device_id, v.base, v.irq, v.grants, v.source) == (0x22, 0x2000000, 33, True, "xenstore")
    d = device_from_xenstore("virtio_disk", 51712, {"specification": "virtio", "base": "33554432", "irq": "33", "transport": "mmio"})
    assert (d.devid, d.device_id, d.base, d.grants) == (51712, 2, 0x2000000, False)


@pytest.mark.parametrize("keys, message", [
    ({"type": "virtio,device2", "base": "0x2000000", "irq": "33", "transport": "pci"}, "only mmio"),
    ({"type": "virtio,device2", "irq": "33"}, "missing base"),
    ({"type": "virtio,device2", "base": "0x2000000", "irq": "banana"}, "irq: 'banana'"),
])
def test_malformed_xenstore_entries_are_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        device_from_xenstore("virtio", 4, keys)


def test_merge_explicit_wins_and_keeps_discovered_devid():
    found = device_from_xenstore("virtio", 5, {"type": "virtio,device2", "base": "0x2000000", "irq": "33"})
    given = parse_device_arg("type=blk,base=0x2000000,irq=33,socket=/x.sock", 0)
    (d,) = merge([found], [given])
    assert (d.devid, d.socket, d.source) == (5, "/x.sock", "cli")


def test_merge_refuses_overlapping_windows():
    a = parse_device_arg("type=blk,base=0x2000000,irq=33", 0)
    b = DeviceConfig(devid=1, device_id=1, base=0x2000100, irq=34)  # parsing refuses the misaligned base
    with pytest.raises(ConfigError, match="overlap"):
        merge([], [a, b])
    same = parse_device_arg("type=net,base=0x2000000,irq=34", 1)
    with pytest.raises(ConfigError, match="devices 0 \\(cli\\) and 1 \\(cli\\) overlap: MMIO windows at 0x2000000 and 0x2000000"):
        merge([], [a, same])


@pytest.mark.parametrize("value, expected", [("rust-vmm", 0x8), ("0x8", 0x8), ("8", 0x8), ("spec", 0x100), ("0x100", 0x100),
                                             ("SPEC", 0x100)])
def test_xen_no_advance_names_and_values(value, expected):
    d = parse_device_arg(f"type=blk,base=0x2000000,irq=33,grants=1,xen-no-advance={value}")
    assert d.xen_no_advance == expected and d.grants


def test_xen_no_advance_defaults_to_rust_vmm_and_works_in_toml(tmp_path):
    assert parse_device_arg("type=blk,base=0x2000000,irq=33").xen_no_advance == 0x8  # what rust-vmm back-ends expect
    path = tmp_path / "guest.toml"
    path.write_text('[[device]]\ntype = "blk"\nbase = 0x2000000\nirq = 33\ngrants = true\nxen-no-advance = "spec"\n')
    (d,) = load_toml(path)
    assert d.xen_no_advance == 0x100


@pytest.mark.parametrize("value", ["0x4", "bit8", "", "0x108"])
def test_xen_no_advance_rejects_other_values_naming_both(value):
    with pytest.raises(ConfigError, match=r"xen-no-advance=.*rust-vmm \(0x8.*spec \(0x100"):
        parse_device_arg(f"type=blk,base=0x2000000,irq=33,xen-no-advance={value}")


def test_net_mac_from_the_device_flag_and_from_xenstore():
    assert parse_device_arg("type=net,base=0x2000000,irq=33,mac=00:16:3E:0a:0b:0c").mac == "00:16:3e:0a:0b:0c"
    assert parse_device_arg("type=net,base=0x2000000,irq=33").mac == ""
    d = device_from_xenstore("virtio", 0, {"type": "virtio,device1", "base": "0x2000000", "irq": "33", "transport": "mmio",
                                           "mac": "00:16:3e:01:02:03"})
    assert d.mac == "00:16:3e:01:02:03"


@pytest.mark.parametrize("mac", ["00:16:3e:0a:0b", "01:16:3e:0a:0b:0c", "zz:16:3e:0a:0b:0c"])
def test_a_bad_mac_is_a_one_line_config_error(mac):
    with pytest.raises(ConfigError, match=r"^--device .*: mac="):
        parse_device_arg(f"type=net,base=0x2000000,irq=33,mac={mac}")


def test_vsock_cid_from_the_device_flag_and_from_toml():
    assert parse_device_arg("type=vsock,base=0x2000000,irq=33,cid=3").cid == 3
    assert parse_device_arg("type=vsock,base=0x2000000,irq=33,cid=0xfffffffe").cid == 2**32 - 2
    assert parse_device_arg("type=vsock,base=0x2000000,irq=33").cid is None
    (d,) = load_toml_text('[[device]]\ntype = "vsock"\nbase = 0x2000000\nirq = 33\ncid = 42\n')
    assert d.cid == 42


@pytest.mark.parametrize("cid", ["0", "1", "2", "0xffffffff", "0x100000000", "-3", "guest", ""])
def test_a_bad_vsock_cid_is_a_one_line_config_error(cid):
    with pytest.raises(ConfigError, match=r"^--device .*: cid=.*(out of range 3\.\.4294967294|not a number)") as e:
        parse_device_arg(f"type=vsock,base=0x2000000,irq=33,cid={cid}")
    assert "\n" not in str(e.value)


def test_a_vsock_cid_in_toml_out_of_range_or_on_another_type_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "guest.toml"
    path.write_text('[[device]]\ntype = "vsock"\nbase = 0x2000000\nirq = 33\ncid = 2\n')
    with pytest.raises(ConfigError, match=r"^--config .*guest\.toml device #0: cid='2' is out of range"):
        load_guest_toml(path)
    with pytest.raises(ConfigError, match=r"^--device .*: cid= is the guest's vsock address: only for type=vsock$"):
        parse_device_arg("type=net,base=0x2000000,irq=33,cid=5")
# --- transport=pci (issue 20) -----------------------------------------------------------------------


@pytest.mark.parametrize(("bdf", "expected"), [("00:08.0", 8 << 3), ("0000:00:1f.0", 0x1F << 3), ("00:0a.0", 0xA << 3)])
def test_a_pci_device_names_its_function_on_bus_0(bdf, expected):
    d = parse_device_arg(f"type=blk,transport=pci,bdf={bdf},socket=/run/qsd.sock", 2)
    assert (d.transport, d.bdf, d.pci, d.base, d.irq, d.devid) == ("pci", expected, True, 0, 0, 2)
    assert d.key != d.base and d.where == f"PCI 00:{expected >> 3:02x}.{expected & 7}"


@pytest.mark.parametrize(("text", "message"), [
    ("type=blk,transport=pci", "missing bdf="),
    ("type=blk,transport=pci,bdf=00:03.0,base=0x2000000", "base= is for transport=mmio"),
    ("type=blk,transport=pci,bdf=00:03.0,irq=33", "irq= is for transport=mmio"),
    ("type=blk,transport=pci,bdf=01:03.0", "only segment 0, bus 0"),
    ("type=blk,transport=pci,bdf=00:20.0", "device 00..1f and function 0..7"),
    ("type=blk,transport=pci,bdf=00:03", "device 00..1f and function 0..7"),
    ("type=blk,transport=pci,bdf=00:02.0", "hold QEMU's own devices"),
    ("type=blk,transport=pci,bdf=00:08.1", "function 1: a guest scans functions 1-7"),
    ("type=blk,transport=pci,bdf=00:00.0", "host bridge 00:00.0"),
    ("type=blk,transport=pci,bdf=xx", "not BB:DD.F"),
    ("type=blk,transport=pci,bdf=00:zz.0", "hexadecimal"),
    ("type=blk,transport=pci,bdf=00:03.0,grants=1", "grants=1 with transport=pci"),
    ("type=blk,transport=isa,base=0x2000000,irq=33", "transport='isa'"),
    ("type=blk,base=0x2000000,irq=33,bdf=00:03.0", "bdf= is for transport=pci"),
])
def test_pci_device_errors_name_the_key_and_the_fix(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_device_arg(text)


def test_pci_devices_merge_by_function_and_do_not_collide_with_windows(tmp_path):
    mmio = parse_device_arg("type=blk,base=0x2000000,irq=33")
    a = parse_device_arg("type=blk,transport=pci,bdf=00:03.0", 1)
    b = parse_device_arg("type=net,transport=pci,bdf=00:09.0", 2)
    assert merge([], [mmio, a, b]) == (mmio, a, b)
    with pytest.raises(ConfigError, match="are both PCI 00:03.0"):
        merge([], [a, parse_device_arg("type=net,transport=pci,bdf=00:03.0", 3)])
    toml = tmp_path / "g.toml"
    toml.write_text('[[device]]\ntype = "blk"\ntransport = "pci"\nbdf = "00:05.0"\n')
    (d,) = load_toml(toml)
    assert d.pci and d.bdf == 5 << 3 and d.source == "config"
