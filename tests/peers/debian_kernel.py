"""Debian's own amd64 kernel for a QEMU guest: ``linux-image-amd64``'s current package, fetched with
``apt-get download`` and cached by package and version; its ``vmlinuz`` and the modules a virtio
disk on PCI needs (Debian builds virtio, virtio_ring, virtio_pci and virtio_blk as modules), with
their dependencies in load order, read from each module's ``.modinfo`` section (the deb ships no
modules.dep: ``depmod`` makes it at install time).

Cache: ``$XVM_QEMU86_CACHE`` or /var/cache/xen-vhost-master-qemu86 (root) or
~/.cache/xen-vhost-master-qemu86, one directory per kernel package and version holding
``vmlinuz``, ``modules/*.ko`` (decompressed), ``modules/order`` and ``done`` (package, version,
modules asked for). Filling it is serialised by a lock file, a directory is only renamed into
place complete, and only the current kernel is kept. When the apt lists are missing or outdated
(the mirror no longer has their kernel), the newest cached kernel serves, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

__all__ = [
    "GuestKernel",
    "KernelUnavailable",
    "cache_root",
    "candidate",
    "elf_info",
    "modinfo",
    "load_order",
    "debian_amd64_kernel",
]

log = logging.getLogger(__name__)

#: The metapackage that names the current kernel of the release (Depends: linux-image-<abi>-amd64 (= V)).
METAPACKAGE: Final = "linux-image-amd64"
#: A virtio-blk disk on virtio-pci: the modules asked for (their dependencies come from .modinfo).
PCI_BLK_MODULES: Final = ("virtio_pci", "virtio_blk")
#: apt-get download of ~70 MB and a pass over the package's data (~400 MB of tar) on a loaded box.
APT_TIMEOUT: Final = 600.0
CACHE_ENV: Final = "XVM_QEMU86_CACHE"

EM_X86_64: Final = 62  # elf.h e_machine
EM_AARCH64: Final = 183
_PT_INTERP: Final = 3  # elf.h p_type


class KernelUnavailable(RuntimeError):
    """The kernel cannot be had: the apt lists do not know it, or the download failed (the reason)."""

    def __init__(self, reason: str, *, known: bool = True) -> None:
        super().__init__(reason)
        #: False when the apt lists do not name the package at all (no ``apt-get update`` yet).
        self.known = known


@dataclass(frozen=True)
class GuestKernel:
    vmlinuz: Path
    #: Module files in load order (dependencies first); empty when all of them are built in.
    modules: tuple[Path, ...]
    package: str
    version: str


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/xen-vhost-master-qemu86")
    return Path.home() / ".cache" / "xen-vhost-master-qemu86"


def candidate(metapackage: str = METAPACKAGE) -> tuple[str, str]:
    """(package, version) of the kernel ``metapackage`` depends on, from the apt lists."""
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", metapackage], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"apt-cache show {metapackage}: {exc}", known=False) from None
    m = re.search(r"^Depends:.*?\b(linux-image-[0-9][^ ,]*) \(= ([^)]+)\)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or m is None:
        raise KernelUnavailable(f"the apt lists do not know {metapackage} (run apt-get update): "
                                f"{(proc.stderr or proc.stdout).strip()[-300:]}", known=False)
    return m.group(1), m.group(2)


# --- ELF ----------------------------------------------------------------------------------------
def _elf64(data: bytes, what: str) -> None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{what}: not a little-endian ELF64 file")


def elf_info(path: Path) -> tuple[int, bool]:
    """(e_machine, statically linked) of an ELF64 executable (elf.h: no PT_INTERP = no dynamic loader)."""
    data = path.read_bytes()
    _elf64(data, str(path))
    (machine,) = struct.unpack_from("<H", data, 0x12)
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    interp = any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == _PT_INTERP for i in range(phnum))
    return machine, not interp


def modinfo(ko: bytes, what: str = "module") -> dict[str, str]:
    """The ``key=value`` strings of a kernel module's ``.modinfo`` section (include/linux/moduleparam.h
    ``__MODULE_INFO``); a key given more than once keeps its last value."""
    try:
        return _modinfo(ko, what)
    except struct.error:
        raise ValueError(f"{what}: truncated ELF file") from None


def _modinfo(ko: bytes, what: str) -> dict[str, str]:
    _elf64(ko, what)
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # (sh_name, sh_offset, sh_size) of Elf64_Shdr
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", ko, base)
        offset, size = struct.unpack_from("<QQ", ko, base + 0x18)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        end = ko.find(b"\0", str_off + name)
        if end < 0:
            raise ValueError(f"{what}: section name {i} is not terminated")
        if ko[str_off + name:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in ko[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info[key] = value
            return info
    raise ValueError(f"{what}: no .modinfo section")


def _mod_name(filename: str) -> str:
    """virtio-rng.ko.xz -> virtio_rng (the kernel's module names use underscores)."""
    return filename.split(".ko")[0].replace("-", "_")


def load_order(wanted: Iterable[str], modules: dict[str, bytes], builtin: set[str]) -> list[str]:
    """``wanted`` and what they depend on, dependencies first; built-in ones are left out.
    ``modules``: name -> module bytes. ValueError names a dependency found nowhere."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        if name in order or name in builtin:
            return
        if name not in modules:
            raise ValueError(f"module {name} (needed by {needed_by}) is neither in the package's virtio "
                             "modules nor built in")
        if name in visiting:
            raise ValueError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dep in filter(None, modinfo(modules[name], name).get("depends", "").split(",")):
            visit(dep.replace("-", "_"), name)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name, "the guest")
    return order


def _decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise ValueError(f"{name}: zstd -dc failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    raise ValueError(f"{name}: unknown module compression")


# --- the package --------------------------------------------------------------------------------
def _run(argv: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"{what}: {exc}") from None
    if proc.returncode != 0:
        raise KernelUnavailable(f"{what} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")


def _extract(deb: Path, out: Path, wanted: Iterable[str]) -> tuple[str, ...]:
    """vmlinuz and the wanted modules (+ dependencies) of ``deb`` into ``out``; the load order."""
    vmlinuz: bytes | None = None
    modules: dict[str, bytes] = {}
    builtin: set[str] = set()
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if not member.isfile():
                    continue
                if re.fullmatch(r"\./boot/vmlinuz-.*|/?boot/vmlinuz-.*", member.name):
                    vmlinuz = _read(tar.extractfile(member))
                elif base == "modules.builtin":
                    text = _read(tar.extractfile(member)).decode()
                    builtin = {_mod_name(os.path.basename(line)) for line in text.split()}
                elif base.startswith("virtio") and ".ko" in base and "/kernel/" in member.name:
                    modules[_mod_name(base)] = _decompress(base, _read(tar.extractfile(member)))
        err = proc.stderr.read().decode(errors="replace") if proc.stderr is not None else ""
    if proc.returncode != 0:
        raise KernelUnavailable(f"dpkg-deb --fsys-tarfile {deb.name} exited {proc.returncode}: {err.strip()[-300:]}")
    if vmlinuz is None:
        raise KernelUnavailable(f"{deb.name} has no boot/vmlinuz-*")
    try:
        order = load_order(wanted, modules, builtin)
    except ValueError as exc:
        raise KernelUnavailable(f"{deb.name}: {exc}") from None
    (out / "modules").mkdir(parents=True)
    (out / "vmlinuz").write_bytes(vmlinuz)
    for name in order:
        (out / "modules" / f"{name}.ko").write_bytes(modules[name])
    (out / "modules" / "order").write_text("".join(f"{n}\n" for n in order))
    return tuple(order)


def _read(f: IO[bytes] | None) -> bytes:
    assert f is not None
    with f:
        return f.read()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _done_line(package: str, version: str, wanted: tuple[str, ...]) -> str:
    return f"{package} {version} {','.join(wanted)}\n"


def _cached(where: Path, package: str, version: str, wanted: tuple[str, ...]) -> GuestKernel | None:
    try:
        if (where / "done").read_text() != _done_line(package, version, wanted):
            return None
    except FileNotFoundError:
        return None
    order = (where / "modules" / "order").read_text().split()
    return GuestKernel(where / "vmlinuz", tuple(where / "modules" / f"{n}.ko" for n in order), package, version)


def debian_amd64_kernel(wanted: Iterable[str] = PCI_BLK_MODULES, root: Path | None = None) -> GuestKernel:
    """The current ``linux-image-amd64`` kernel with ``wanted`` modules, from the cache or fetched
    into it. :class:`KernelUnavailable` says why not."""
    root = cache_root() if root is None else root
    wanted = tuple(wanted)
    try:
        package, version = candidate()
    except KernelUnavailable as exc:
        older = _newest_cached(root, wanted)
        if older is None:
            raise
        log.warning("%s; using the cached %s %s", exc, older.package, older.version)
        return older
    where = root / f"{package}_{version}".replace(":", "%3a")
    found = _cached(where, package, version, wanted)
    if found is not None:
        return found
    with _locked(root):
        found = _cached(where, package, version, wanted)
        if found is not None:
            return found
        try:
            _fetch(package, version, root, where, wanted)
        except KernelUnavailable as exc:
            # The mirror drops a kernel once a newer one replaces it: until the apt lists are
            # updated, the newest kernel fetched before serves.
            older = _newest_cached(root, wanted)
            if older is None:
                raise KernelUnavailable(f"{exc} (an outdated apt list? run apt-get update)") from None
            log.warning("%s; using the cached %s %s instead", exc, older.package, older.version)
            return older
        for old in root.glob("linux-image-*"):  # one kernel kept: the current one
            if old != where:
                shutil.rmtree(old, ignore_errors=True)
    found = _cached(where, package, version, wanted)
    assert found is not None
    return found


def _fetch(package: str, version: str, root: Path, where: Path, wanted: tuple[str, ...]) -> None:
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        # apt's sandbox user cannot write to a root-only cache: download as the caller.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(["apt-get", "download", "-q", *sandbox, f"{package}={version}"], work,
             f"apt-get download {package}={version}")
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise KernelUnavailable(f"apt-get download {package}={version} left {len(debs)} .deb files")
        out = work / "kernel"
        _extract(debs[0], out, wanted)
        (out / "done").write_text(_done_line(package, version, wanted))
        shutil.rmtree(where, ignore_errors=True)  # one fetched for other modules
        os.rename(out, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _newest_cached(root: Path, wanted: tuple[str, ...]) -> GuestKernel | None:
    done = sorted(root.glob("linux-image-*/done"), key=lambda p: p.stat().st_mtime, reverse=True)
    for marker in done:
        package, version = (marker.read_text().split() + ["", ""])[:2]
        found = _cached(marker.parent, package, version, wanted)
        if found is not None:
            return found
    return None
