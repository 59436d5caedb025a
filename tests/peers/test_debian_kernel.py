"""tests/peers/debian_kernel.py without the network: module metadata, load order, the cache."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from tests.peers import debian_kernel
from tests.peers.debian_kernel import GuestKernel, KernelUnavailable


def fake_ko(info: dict[str, str]) -> bytes:
    """A minimal little-endian ELF64 relocatable with a .modinfo section (elf.h Elf64_Ehdr, Elf64_Shdr)."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body = modinfo + shstrtab
    shoff = 64 + len(body)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def shdr(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1 if name else 0, 0, 0, offset, size, 0, 0, 1, 0)

    sections = shdr(0, 0, 0) + shdr(1, 64, len(modinfo)) + shdr(10, 64 + len(modinfo), len(shstrtab))
    data = header + body
    return data + b"\0" * (shoff - len(data)) + sections


def test_modinfo_reads_the_depends_field() -> None:
    ko = fake_ko({"license": "GPL", "depends": "virtio,virtio_ring", "name": "virtio_blk"})
    assert debian_kernel.modinfo(ko)["depends"] == "virtio,virtio_ring"


def test_a_truncated_or_foreign_module_is_a_value_error() -> None:
    ko = fake_ko({"depends": ""})
    with pytest.raises(ValueError, match="truncated"):
        debian_kernel.modinfo(ko[:-40], "virtio_blk")
    with pytest.raises(ValueError, match="not a little-endian ELF64"):
        debian_kernel.modinfo(b"\x7fELF" + b"\1" * 60)


def test_load_order_puts_dependencies_first_and_leaves_builtins_out() -> None:
    modules = {
        "virtio_blk": fake_ko({"depends": "virtio,virtio_ring"}),
        "virtio_pci": fake_ko({"depends": "virtio_pci_modern_dev,virtio,virtio_ring"}),
        "virtio_pci_modern_dev": fake_ko({"depends": ""}),
        "virtio": fake_ko({"depends": "virtio_ring"}),
        "virtio_ring": fake_ko({"depends": ""}),
    }
    assert debian_kernel.load_order(["virtio_pci", "virtio_blk"], modules, set()) == [
        "virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci", "virtio_blk"]
    # Debian 13's 6.12 builds virtio, virtio_ring and virtio_pci in: only virtio_blk is loaded
    assert debian_kernel.load_order(["virtio_pci", "virtio_blk"], {"virtio_blk": modules["virtio_blk"]},
                                    {"virtio", "virtio_ring", "virtio_pci"}) == ["virtio_blk"]


def test_a_dependency_found_nowhere_is_named() -> None:
    with pytest.raises(ValueError, match="module virtio_ring \\(needed by virtio_blk\\)"):
        debian_kernel.load_order(["virtio_blk"], {"virtio_blk": fake_ko({"depends": "virtio_ring"})}, set())


def test_compressed_modules_are_decompressed() -> None:
    ko = fake_ko({"depends": ""})
    assert debian_kernel._decompress("virtio_blk.ko.xz", lzma.compress(ko)) == ko
    assert debian_kernel._decompress("virtio_blk.ko.gz", gzip.compress(ko)) == ko
    assert debian_kernel._decompress("virtio_blk.ko", ko) == ko
    with pytest.raises(ValueError, match="unknown module compression"):
        debian_kernel._decompress("virtio_blk.ko.lz4", ko)


def cached_kernel(root: Path, package: str, version: str, modules: tuple[str, ...]) -> Path:
    where = root / f"{package}_{version}"
    (where / "modules").mkdir(parents=True)
    (where / "vmlinuz").write_bytes(b"kernel")
    (where / "modules" / "order").write_text("virtio_blk\n")
    (where / "modules" / "virtio_blk.ko").write_bytes(b"ko")
    (where / "done").write_text(debian_kernel._done_line(package, version, modules))
    return where


def test_a_cached_kernel_is_used_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = ("virtio_pci", "virtio_blk")
    where = cached_kernel(tmp_path, "linux-image-9.1-amd64", "9.1-1", wanted)
    monkeypatch.setattr(debian_kernel, "candidate", lambda: ("linux-image-9.1-amd64", "9.1-1"))

    def no_apt(*args: object) -> None:
        raise AssertionError("apt-get ran although the kernel is cached")

    monkeypatch.setattr(debian_kernel, "_run", no_apt)
    k = debian_kernel.debian_amd64_kernel(wanted, tmp_path)
    assert k == GuestKernel(where / "vmlinuz", (where / "modules" / "virtio_blk.ko",), "linux-image-9.1-amd64", "9.1-1")


def test_a_failed_download_falls_back_to_the_newest_cached_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = ("virtio_pci", "virtio_blk")
    monkeypatch.setattr(debian_kernel, "candidate", lambda: ("linux-image-9.2-amd64", "9.2-1"))

    def offline(argv: list[str], cwd: Path, what: str) -> None:
        raise KernelUnavailable(f"{what} exited 100: 404 Not Found")

    monkeypatch.setattr(debian_kernel, "_run", offline)
    with pytest.raises(KernelUnavailable, match="404 Not Found .*run apt-get update"):
        debian_kernel.debian_amd64_kernel(wanted, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # no half-made directory left

    cached_kernel(tmp_path, "linux-image-9.1-amd64", "9.1-1", wanted)
    assert debian_kernel.debian_amd64_kernel(wanted, tmp_path).version == "9.1-1"
    # a kernel cached with other modules does not serve
    with pytest.raises(KernelUnavailable):
        debian_kernel.debian_amd64_kernel(("virtio_mmio", "virtio_blk"), tmp_path)
