"""ABI conformance: a C program compiled against the real headers prints every size, offset, ioctl
number and constant that ``xen_vhost_master.xen.abi`` defines; the test compares them.

Headers: Xen's public headers and ``<xen/sys/privcmd.h>`` (libxen-dev; the Linux UAPI
``<xen/privcmd.h>`` does not compile in userspace, docs/xen-abi.md §10.12), Linux UAPI ``<xen/evtchn.h>``
and ``<xen/gntdev.h>`` (linux-libc-dev). IRQFD / IOEVENTFD are newer than these headers and are
checked against the values in docs/xen-abi.md §1.

On arm64 (docs/xen-abi.md §10.14) every value here is identical; if a cross compiler and qemu-user are
installed, :func:`test_arm64_values_match_x86_64` proves it again, otherwise it is skipped.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from tests.peers import programs
from xen_vhost_sim import memory as sim_memory
from xen_vhost_master.xen import abi

HEADERS = """
#define __XEN_TOOLS__ 1
#define _GNU_SOURCE
#include <stdio.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/version.h>
#include <xen/memory.h>
#include <xen/grant_table.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/dm_op.h>
#include <xen/hvm/ioreq.h>
#include <xen/domctl.h>
#include <xen/sys/privcmd.h>
#include <xen/evtchn.h>
#include <xen/gntdev.h>
"""

# (python ctypes struct, C type, {python field: C field}); fields starting with "_" are our explicit
# padding, which the C struct leaves implicit.
STRUCTS: list[tuple[type[ctypes.Structure], str, dict[str, str]]] = [
    (abi.privcmd_hypercall, "privcmd_hypercall_t", {}),
    (abi.privcmd_mmapbatch_v2, "privcmd_mmapbatch_v2_t", {}),
    (abi.privcmd_dm_op_buf, "privcmd_dm_op_buf_t", {}),
    (abi.privcmd_dm_op, "privcmd_dm_op_t", {}),
    (abi.privcmd_mmap_resource, "privcmd_mmap_resource_t", {}),
    (abi.ioctl_evtchn_bind_virq, "struct ioctl_evtchn_bind_virq", {}),
    (abi.ioctl_evtchn_bind_interdomain, "struct ioctl_evtchn_bind_interdomain", {}),
    (abi.ioctl_evtchn_bind_unbound_port, "struct ioctl_evtchn_bind_unbound_port", {}),
    (abi.ioctl_evtchn_unbind, "struct ioctl_evtchn_unbind", {}),
    (abi.ioctl_evtchn_notify, "struct ioctl_evtchn_notify", {}),
    (abi.ioctl_evtchn_restrict_domid, "struct ioctl_evtchn_restrict_domid", {}),
    (abi.ioctl_gntdev_grant_ref, "struct ioctl_gntdev_grant_ref", {}),
    (abi.ioctl_gntdev_map_grant_ref, "struct ioctl_gntdev_map_grant_ref", {}),
    (abi.ioctl_gntdev_unmap_grant_ref, "struct ioctl_gntdev_unmap_grant_ref", {}),
    (abi.ioctl_gntdev_unmap_notify, "struct ioctl_gntdev_unmap_notify", {}),
    (abi.xen_dm_op, "struct xen_dm_op", {}),
    (abi.xen_dm_op_create_ioreq_server, "struct xen_dm_op_create_ioreq_server", {}),
    (abi.xen_dm_op_get_ioreq_server_info, "struct xen_dm_op_get_ioreq_server_info", {}),
    (abi.xen_dm_op_ioreq_server_range, "struct xen_dm_op_ioreq_server_range", {}),
    (abi.xen_dm_op_set_ioreq_server_state, "struct xen_dm_op_set_ioreq_server_state", {}),
    (abi.xen_dm_op_destroy_ioreq_server, "struct xen_dm_op_destroy_ioreq_server", {}),
    (abi.xen_dm_op_inject_msi, "struct xen_dm_op_inject_msi", {}),
    (abi.xen_dm_op_set_irq_level, "struct xen_dm_op_set_irq_level", {}),
    (abi.xen_dm_op_set_pci_intx_level, "struct xen_dm_op_set_pci_intx_level", {}),
    (abi.xen_dm_op_nr_vcpus, "struct xen_dm_op_nr_vcpus", {}),
    (abi.xen_domctl, "struct xen_domctl", {}),
    # the bitfield byte (flags) has no offsetof; its bits are checked below
    (abi.ioreq_t, "ioreq_t", {"flags": ""}),
]


def _ioreq_bit(field: str, value: int) -> str:
    return f"({{ ioreq_t r; memset(&r, 0, sizeof r); r.{field} = {value}; ((unsigned char *)&r)[30]; }})"


def checks() -> list[tuple[str, int]]:
    """(C expression, the Python definition's value)."""
    out: list[tuple[str, int]] = []
    for py, c, rename in STRUCTS:
        out.append((f"sizeof({c})", ctypes.sizeof(py)))
        for name, *_ in py._fields_:
            cname = rename.get(name, name)
            if name.startswith("_") or not cname:
                continue
            out.append((f"offsetof({c}, {cname})", getattr(py, name).offset))
    out += [
        ("offsetof(ioreq_t, type)", abi.ioreq_t.type.offset),
        (_ioreq_bit("state", 0xF), abi.ioreq_t.STATE_MASK),
        (_ioreq_bit("data_is_ptr", 1), abi.ioreq_t.DATA_IS_PTR),
        (_ioreq_bit("dir", 1), abi.ioreq_t.DIR),
        (_ioreq_bit("df", 1), abi.ioreq_t.DF),
        ("sizeof(shared_iopage_t)", abi.IOREQ_SLOT_SIZE),
    ]
    for m in abi.PrivcmdIoctl:
        if m.name not in ("IRQFD", "IOEVENTFD"):
            out.append((f"IOCTL_PRIVCMD_{m.name}", int(m)))
    out += [(f"IOCTL_EVTCHN_{m.name}", int(m)) for m in abi.EvtchnIoctl]
    out += [(f"IOCTL_GNTDEV_{m.name}", int(m)) for m in abi.GntdevIoctl]
    out += [(f"XEN_DMOP_{m.name}", int(m)) for m in abi.DmOp]
    out += [(f"XEN_DMOP_IO_RANGE_{m.name}", int(m)) for m in abi.IoRangeType]
    out += [(f"STATE_IOREQ_{m.name}", int(m)) for m in abi.IoreqState if m.name != "IORESP_READY"]
    out += [("STATE_IORESP_READY", abi.IoreqState.IORESP_READY)]
    out += [(f"IOREQ_{m.name}", int(m)) for m in abi.IoreqDir]
    out += [(f"IOREQ_TYPE_{m.name}", int(m)) for m in abi.IoreqType]
    out += [(f"__HYPERVISOR_{m.name}", int(m)) for m in abi.Hypercall]
    out += [(f"XENMEM_{m.name}", int(m)) for m in abi.XenMem]
    out += [(f"XEN_DOMCTL_{m.name}", int(m)) for m in abi.DomctlCmd]
    out += [(f"XENVER_{m.name}", int(m)) for m in abi.XenVer]
    out += [(f"XENMEM_resource_{m.name}", int(m)) for m in abi.ResourceType]
    out += [(f"UNMAP_NOTIFY_{m.name}", int(m)) for m in abi.GntdevUnmapNotify]
    out += [
        ("XENMEM_resource_ioreq_server_frame_ioreq(0)", abi.XENMEM_resource_ioreq_server_frame_ioreq(0)),
        ("XENMEM_resource_ioreq_server_frame_bufioreq", abi.XENMEM_resource_ioreq_server_frame_bufioreq),
        ("HVM_IOREQSRV_BUFIOREQ_OFF", abi.HVM_IOREQSRV_BUFIOREQ_OFF),
        ("HVM_IOREQSRV_BUFIOREQ_LEGACY", abi.HVM_IOREQSRV_BUFIOREQ_LEGACY),
        ("HVM_IOREQSRV_BUFIOREQ_ATOMIC", abi.HVM_IOREQSRV_BUFIOREQ_ATOMIC),
        ("XEN_DMOP_no_gfns", abi.XEN_DMOP_no_gfns),
        ("XEN_DMOP_PCI_SBDF(0, 0, 3, 0)", abi.XEN_DMOP_PCI_SBDF(0, 0, 3, 0)),
        ("XEN_DMOP_PCI_SBDF(0x1234, 0xab, 0x1f, 7)", abi.XEN_DMOP_PCI_SBDF(0x1234, 0xAB, 0x1F, 7)),
        ("IOREQ_BUFFER_SLOT_NUM", abi.BufIoreq.SLOT_NUM),
        ("DOMID_FIRST_RESERVED", abi.DOMID_FIRST_RESERVED),
        ("DOMID_SELF", abi.DOMID_SELF),
        ("DOMID_INVALID", abi.DOMID_INVALID),
        ("sizeof(domid_t)", 2),
        ("sizeof(xen_pfn_t)", 8),
    ]
    return out


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_and_run(tmp_path: Path, cc: str, extra: list[str], runner: list[str]) -> dict[str, int]:
    src = tmp_path / "abi_check.c"
    body = [HEADERS, "int main(void) {"]
    for expr, _ in checks():
        body.append(f'    printf("%s=%llu\\n", {_c_string(expr)}, (unsigned long long)({expr}));')
    body.append("#ifdef __aarch64__")
    for expr, _ in ARM_ONLY:
        body.append(f'    printf("%s=%llu\\n", {_c_string(expr)}, (unsigned long long)({expr}));')
    body.append("#endif")
    body += ["    return 0;", "}"]
    src.write_text("\n".join(body))
    exe = tmp_path / "abi_check"
    res = subprocess.run([cc, "-std=gnu11", "-Wall", "-O0", *extra, "-o", str(exe), str(src)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        expr, _, val = line.rpartition("=")
        values[expr] = int(val)
    return values


def test_python_abi_matches_real_headers(tmp_path: Path) -> None:
    for need in ("gcc", "xen-tools-headers", "xen-linux-headers"):
        programs.require(need)
    values = build_and_run(tmp_path, "gcc", [], [])
    expected = dict(checks())
    assert len(values) == len(expected) > 150
    mismatches = {e: (values[e], v) for e, v in expected.items() if values[e] != v}
    assert not mismatches, f"C vs Python: {mismatches}"


# xen/arch-arm.h (__XEN_TOOLS__), visible only to an arm64 build: the simulated Arm guest layout.
ARM_ONLY: list[tuple[str, int]] = [
    ("GUEST_RAM0_BASE", sim_memory.ARM_RAM0_BASE),
    ("GUEST_RAM0_SIZE", sim_memory.ARM_RAM0_SIZE),
    ("GUEST_RAM1_BASE", sim_memory.ARM_RAM1_BASE),
    ("GUEST_RAM_BANKS", 2),
]


# docs/xen-abi.md §1 (Linux >= 6.7 include/uapi/xen/privcmd.h)
ABI_MD_EVENTFD = {
    "IOCTL_PRIVCMD_IRQFD": 0x40185008,
    "IOCTL_PRIVCMD_IOEVENTFD": 0x40305009,
    "sizeof(privcmd_irqfd)": 24,
    "privcmd_irqfd.dm_op": 0, "privcmd_irqfd.size": 8, "privcmd_irqfd.fd": 12, "privcmd_irqfd.flags": 16,
    "privcmd_irqfd.dom": 20,
    "sizeof(privcmd_ioeventfd)": 48,
    "privcmd_ioeventfd.ioreq": 0, "privcmd_ioeventfd.ports": 8, "privcmd_ioeventfd.addr": 16,
    "privcmd_ioeventfd.addr_len": 24, "privcmd_ioeventfd.event_fd": 28, "privcmd_ioeventfd.vcpus": 32,
    "privcmd_ioeventfd.vq": 36, "privcmd_ioeventfd.flags": 40, "privcmd_ioeventfd.dom": 44,
}


def test_irqfd_ioeventfd_match_abi_md() -> None:
    got: dict[str, int] = {
        "IOCTL_PRIVCMD_IRQFD": abi.PrivcmdIoctl.IRQFD,
        "IOCTL_PRIVCMD_IOEVENTFD": abi.PrivcmdIoctl.IOEVENTFD,
        "sizeof(privcmd_irqfd)": ctypes.sizeof(abi.privcmd_irqfd),
        "sizeof(privcmd_ioeventfd)": ctypes.sizeof(abi.privcmd_ioeventfd),
    }
    for cls in (abi.privcmd_irqfd, abi.privcmd_ioeventfd):
        for name, *_ in cls._fields_:
            if f"{cls.__name__}.{name}" in ABI_MD_EVENTFD:
                got[f"{cls.__name__}.{name}"] = getattr(cls, name).offset
    assert got == ABI_MD_EVENTFD
    # _IOW, not _IOC_NONE (docs/xen-abi.md §10.1)
    assert abi.PrivcmdIoctl.IRQFD >> 30 == 1 and abi.PrivcmdIoctl.IOEVENTFD >> 30 == 1


def test_arm64_values_match_x86_64(tmp_path: Path) -> None:
    """Every value above is the same on arm64, and the simulated Arm guest layout is xen/arch-arm.h's."""
    for need in ("gcc", "xen-tools-headers", "xen-linux-headers", "aarch64-linux-gnu-gcc", "arm64-libc-headers",
                 "arm64-linux-headers", "qemu-aarch64"):
        programs.require(need)
    (tmp_path / "x86").mkdir()
    (tmp_path / "arm").mkdir()
    x86 = build_and_run(tmp_path / "x86", "gcc", [], [])
    arm = build_and_run(tmp_path / "arm", "aarch64-linux-gnu-gcc", ["-static", "-idirafter", "/usr/include"], ["qemu-aarch64"])
    assert {k: (v, arm[k]) for k, v in x86.items() if arm[k] != v} == {}
    assert {e: arm[e] for e, _ in ARM_ONLY} == dict(ARM_ONLY)
