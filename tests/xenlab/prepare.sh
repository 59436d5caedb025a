#!/bin/bash
# Build (or reuse from the cache) everything the real-Xen lab boots, all from Debian packages:
#   host tools (qemu-system-arm, mmdebstrap, the arm64 cross compiler, dtc, ...),
#   Debian's arm64 kernel, Debian's Xen 4.17 hypervisor rebuilt with CONFIG_EXPERT=y CONFIG_IOREQ_SERVER=y
#   (Debian's arm64 binary has no IOREQ server, so XEN_DMOP would return ENOSYS),
#   an arm64 dom0 userland (xl, xenstored, python3, qemu-storage-daemon) and arm64 wheels for the project.
# Cache: ${XENLAB_CACHE:-/var/cache/xen-vhost-master-lab}/<key>/ where <key> hashes the package versions.
# XENLAB_MIRROR / XENLAB_SECURITY_MIRROR: the Debian archive mmdebstrap fetches from (default deb.debian.org).
# Prints "XENLAB_ART=<dir>" on its last line. Exit 3 = the lab cannot be built here (no mirror, no apt):
# the pytest entry turns that into a skip with the reason printed just before.
set -euo pipefail
C=${XENLAB_CACHE:-/var/cache/xen-vhost-master-lab}
mkdir -p "$C"
t0=$(date +%s); step() { echo "== xenlab [$(( $(date +%s) - t0 ))s] $*" >&2; }
cant() { echo "XENLAB-CANNOT-BUILD: $*" >&2; exit 3; }
export DEBIAN_FRONTEND=noninteractive
exec 9>"$C/.lock"; flock 9    # one builder at a time

HOST_PKGS=(qemu-system-arm qemu-utils device-tree-compiler cpio bc mmdebstrap gcc-aarch64-linux-gnu flex bison
           dpkg-dev python3-pip busybox-static xz-utils)
missing=()
for p in "${HOST_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
need_update=0
[ "${#missing[@]}" -gt 0 ] && need_update=1
dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; need_update=1; }
SRC=/etc/apt/sources.list.d/xen-vhost-master-lab-src.sources
if [ ! -f $SRC ]; then
  printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > $SRC
  need_update=1
fi
# a stale list (older than a day) is refreshed: the kernel ABI and Xen versions move with point releases
if [ $need_update = 1 ] || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*arm64_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  step "apt-get update"
  apt-get update -qq >/dev/null 2>&1 || cant "apt-get update failed (no network to the Debian mirror?)"
fi
if [ "${#missing[@]}" -gt 0 ]; then
  step "host packages: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || cant "apt-get install ${missing[*]} failed"
fi

ver() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -1; }
KPKG=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^:]*\).*/\1/p' | head -1)
[ -n "$KPKG" ] || cant "apt does not know linux-image-arm64:arm64"
VERS="$KPKG=$(ver $KPKG:arm64) xen-hypervisor-4.17-arm64=$(ver xen-hypervisor-4.17-arm64:arm64) xen-utils-4.17=$(ver xen-utils-4.17:arm64) python3=$(ver python3:arm64) qemu-system-common=$(ver qemu-system-common:arm64) busybox-static=$(ver busybox-static:arm64) xen-src=$(apt-cache showsrc xen 2>/dev/null | sed -n 's/^Version: //p' | sort -Vr | tr '\n' ,) lab=2"
KEY=$(echo "$VERS" | sha256sum | cut -c1-16)
A=$C/$KEY
mkdir -p "$A"; echo "$VERS" > "$A/versions.txt"
M=${XENLAB_MIRROR:-http://deb.debian.org/debian}; MS=${XENLAB_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
MIRRORS=("deb $M bookworm main" "deb $MS bookworm-security main")

# 1. kernel (Image + modules) and Debian's own hypervisor package (for its .config reference)
if [ ! -f "$A/kernel.done" ]; then
  step "arm64 kernel ($KPKG)"
  rm -rf "$A/kern"
  mmdebstrap --quiet --variant=extract --arch=arm64 --include="$KPKG" bookworm "$A/kern" "${MIRRORS[@]}" >/dev/null 2>&1 \
    || cant "mmdebstrap of $KPKG failed (no network to the Debian mirror?)"
  KV=$(ls "$A/kern/lib/modules" | head -1)
  cp "$A/kern/boot/vmlinuz-$KV" "$A/Image"
  mkdir -p "$A/modules"
  for m in drivers/xen/xen-privcmd.ko drivers/xen/xen-evtchn.ko drivers/xen/xen-gntdev.ko drivers/xen/xen-gntalloc.ko \
           drivers/xen/xenfs/xenfs.ko drivers/virtio/virtio_mmio.ko drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
           drivers/block/virtio_blk.ko; do
    [ -f "$A/kern/lib/modules/$KV/kernel/$m" ] && cp "$A/kern/lib/modules/$KV/kernel/$m" "$A/modules/"
  done
  echo "$KV" > "$A/kernel-version"
  rm -rf "$A/kern"; touch "$A/kernel.done"
fi

# 2. hypervisor: Debian's xen source package, rebuilt with the IOREQ server
if [ ! -f "$A/xen-ioreq" ]; then
  step "Xen 4.17 hypervisor from Debian's source, CONFIG_IOREQ_SERVER=y"
  S=$A/xen-src; rm -rf "$S"; mkdir -p "$S"; cd "$S"
  ok=0
  for v in $(apt-cache showsrc xen 2>/dev/null | sed -n 's/^Version: //p' | grep '^4\.17' | sort -Vr); do
    if apt-get source -qq --download-only "xen=$v" >/dev/null 2>&1; then ok=1; echo "$v" > "$A/xen-src-version"; break; fi
    rm -f xen_*   # a version whose tarball is missing on the mirror: try the next
  done
  [ $ok = 1 ] || cant "apt-get source xen (4.17) failed for every version"
  dpkg-source -x --skip-debianization "$(ls xen_4.17*.dsc | head -1)" xen >/dev/null 2>&1 || dpkg-source -x "$(ls xen_4.17*.dsc | head -1)" xen >/dev/null
  M=(make -C xen/xen XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)
  printf 'CONFIG_DEBUG=n\nCONFIG_EXPERT=y\nCONFIG_IOREQ_SERVER=y\n' > xen/xen/.config
  "${M[@]}" olddefconfig >/dev/null 2>&1
  grep -q '^CONFIG_IOREQ_SERVER=y' xen/xen/.config || { echo "IOREQ_SERVER not enabled by olddefconfig" >&2; exit 1; }
  "${M[@]}" -j"$(nproc)" >"$A/xen-build.log" 2>&1 || { tail -30 "$A/xen-build.log" >&2; exit 1; }
  cp xen/xen/xen "$A/xen-ioreq.tmp"; cp xen/xen/.config "$A/xen-ioreq.config"
  cd "$A"; rm -rf "$S"; mv "$A/xen-ioreq.tmp" "$A/xen-ioreq"
fi

# 3. dom0 userland base (unpacked only: no maintainer scripts, no qemu-user second stage)
if [ ! -f "$A/rootfs.done" ]; then
  step "dom0 userland (xen-utils-4.17, python3, qemu-storage-daemon, busybox)"
  rm -rf "$A/rootfs"
  mmdebstrap --quiet --variant=extract --arch=arm64 \
    --include=xen-utils-4.17,xenstore-utils,python3-minimal,python3,busybox-static,qemu-system-common,libc-bin \
    bookworm "$A/rootfs" "${MIRRORS[@]}" >/dev/null 2>&1 || cant "mmdebstrap of the dom0 userland failed"
  R=$A/rootfs
  rm -rf "$R"/usr/share/{doc,man,locale,info,bash-completion,qemu,seabios,ipxe} "$R"/usr/lib/python3*/test \
         "$R"/usr/lib/python3*/{idlelib,tkinter,lib2to3,ensurepip,pydoc_data} "$R"/var/cache/apt "$R"/var/lib/apt/lists
  find "$R" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
  rm -rf "$R"/usr/lib/aarch64-linux-gnu/gconv
  [ -x "$R/usr/bin/qemu-storage-daemon" ] || { echo "no qemu-storage-daemon in qemu-system-common:arm64" >&2; exit 1; }
  # byte-compile the stdlib now (dpkg's py3compile never ran): python starts in ~1 s instead of
  # many under TCG, which matters for xl's 10 s back-end handshake. Same 3.11 bytecode as the host.
  python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || cant "host python3 is not 3.11 (needed to byte-compile the arm64 dom0's python 3.11)"
  python3 -m compileall -q -j0 --invalidation-mode unchecked-hash "$R/usr/lib/python3.11" "$R/usr/lib/python3/dist-packages" >/dev/null 2>&1 || true
  touch "$A/rootfs.done"
fi

# 4. arm64 wheels of the project's dependencies (PyPI), for the dom0's python 3.11
if [ ! -f "$A/wheels.done" ]; then
  step "arm64 wheels (uvloop, construct, construct-typing)"
  rm -rf "$A/wheels"; mkdir -p "$A/wheels"
  python3 -m pip download -q --disable-pip-version-check --no-deps --dest "$A/wheels" \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp \
    --only-binary=:all: 'uvloop>=0.19' 'construct==2.10.70' 'construct-typing>=0.8' 'typing-extensions' >/dev/null 2>&1 \
    || cant "pip download of arm64 wheels failed (no network to PyPI?)"
  touch "$A/wheels.done"
fi
step "artefacts ready in $A"
echo "XENLAB_ART=$A"
