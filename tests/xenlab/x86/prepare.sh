#!/bin/bash
# Build (or reuse from the cache) what the x86 real-Xen scout boots, all Debian 12 (bookworm) amd64
# packages, no rebuild (x86 Xen has the IOREQ server built in):
#   xen-hypervisor-4.17-amd64 (xen.gz, gunzipped: the 32-bit multiboot ELF that QEMU's -kernel loads),
#   linux-image-amd64 (dom0 and domU kernel, the few Xen modules dom0 needs),
#   the dom0 userland: xen-utils-4.17 (xl, hvmloader), xenstore-utils, qemu-system-xen (the HVM
#   guest's device model, SeaBIOS and the linuxboot option ROM for direct kernel boot), busybox-static,
#   qemu-system-common (qemu-storage-daemon: the vhost-user-blk back-end of the pci-qsd scenarios).
# A private apt state under the cache ($C/apt: bookworm + bookworm-security, amd64) answers every
# question: the host's apt sources, lists, lock and architectures are neither read nor changed.
# Cache: ${XENLAB_X86_CACHE:-/var/cache/xen-vhost-master-lab-x86}/<key>/, key = hash of the versions.
# Prints "XENLAB_X86_ART=<dir>" on its last line. Exit 3 = cannot be built here
# ("XENLAB-CANNOT-BUILD: reason" on stderr).
set -euo pipefail
C=${XENLAB_X86_CACHE:-/var/cache/xen-vhost-master-lab-x86}
mkdir -p "$C"
t0=$(date +%s); step() { echo "== xenlab-x86 [$(( $(date +%s) - t0 ))s] $*" >&2; }
cant() { echo "XENLAB-CANNOT-BUILD: $*" >&2; exit 3; }
retry() { local n=1; until "$@"; do [ $n -ge 3 ] && return 1; sleep $((n * 5)); n=$((n + 1)); done; }
for tool in mmdebstrap qemu-system-x86_64 cpio gzip; do
  command -v $tool >/dev/null || cant "$tool is not installed on this host"
done
exec 9>"$C/.lock"; flock 9

M=${XENLAB_MIRROR:-http://deb.debian.org/debian}; MS=${XENLAB_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
AP=$C/apt
mkdir -p "$AP/lists/partial" "$AP/archives/partial" "$AP/cache" "$AP/sources.list.d" "$AP/preferences.d"
touch "$AP/status"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
printf 'deb [signed-by=%s] %s bookworm main\ndeb [signed-by=%s] %s bookworm-security main\n' \
  "$KEYRING" "$M" "$KEYRING" "$MS" > "$AP/sources.list"
cat > "$AP/apt.conf" <<EOF
Dir::Etc::sourcelist "$AP/sources.list";
Dir::Etc::sourceparts "$AP/sources.list.d";
Dir::Etc::preferencesparts "$AP/preferences.d";
Dir::State::Lists "$AP/lists";
Dir::State::status "$AP/status";
Dir::Cache "$AP/cache";
Dir::Cache::archives "$AP/archives";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
EOF
ac() { APT_CONFIG="$AP/apt.conf" apt-cache "$@"; }
if [ -z "$(find "$AP/updated" -mmin -1440 2>/dev/null)" ]; then
  step "apt-get update (bookworm amd64, private lists in $AP)"
  retry env APT_CONFIG="$AP/apt.conf" apt-get update -qq --error-on=any >/dev/null 2>&1 \
    || cant "apt-get update of bookworm from $M failed 3 times"
  touch "$AP/updated"
fi
ver() { ac policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -1; }
KPKG=$(ac depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -1 || true)
[ -n "$KPKG" ] || cant "bookworm's apt lists do not know linux-image-amd64"
PKGS="$KPKG xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils qemu-system-xen busybox-static libc-bin python3 qemu-system-common"
VERS=$(for p in $PKGS; do printf '%s=%s ' "$p" "$(ver "$p")"; done; echo "x86lab=3")
KEY=$(echo "$VERS" | sha256sum | cut -c1-16)
A=$C/$KEY
mkdir -p "$A"; echo "$VERS" > "$A/versions.txt"
MIRRORS=("deb $M bookworm main" "deb $MS bookworm-security main")

# dom0's modules: Debian builds these Xen drivers as modules (a built-in one is simply not there)
KMODS="drivers/xen/xen-privcmd.ko drivers/xen/xen-evtchn.ko drivers/xen/xen-gntdev.ko drivers/xen/xen-gntalloc.ko \
drivers/xen/xenfs/xenfs.ko drivers/xen/xen-pciback/xen-pciback.ko"
# the domU's virtio-pci driver stack (issue 20): whichever of these Debian builds as modules
DOMU_KMODS="drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko drivers/virtio/virtio_pci_modern_dev.ko \
drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko"
if [ ! -f "$A/rootfs.done" ]; then
  step "dom0 userland + kernel + hypervisor (mmdebstrap --variant=extract, amd64)"
  R=$A/rootfs
  userland() {
    rm -rf "$R"
    mmdebstrap --quiet --variant=extract --arch=amd64 --include="$(echo $PKGS | tr ' ' ,)" \
      bookworm "$R" "${MIRRORS[@]}" >"$A/mmdebstrap.log" 2>&1
  }
  retry userland || cant "mmdebstrap of $PKGS from $M failed 3 times (see $A/mmdebstrap.log)"
  KV=$(ls "$R/lib/modules" | head -1)
  cp "$R/boot/vmlinuz-$KV" "$A/vmlinuz"; echo "$KV" > "$A/kernel-version"
  XGZ=$(ls "$R"/boot/xen-4.17*-amd64.gz | head -1)
  gunzip -c "$XGZ" > "$A/xen"     # QEMU's multiboot loader wants the ELF, not the gzip
  mkdir -p "$A/modules"
  for m in $KMODS; do [ -f "$R/lib/modules/$KV/kernel/$m" ] && cp "$R/lib/modules/$KV/kernel/$m" "$A/modules/"; done
  mkdir -p "$A/domu-modules"
  for m in $DOMU_KMODS; do [ -f "$R/lib/modules/$KV/kernel/$m" ] && cp "$R/lib/modules/$KV/kernel/$m" "$A/domu-modules/"; done
  [ -x "$R/usr/bin/qemu-storage-daemon" ] || cant "no /usr/bin/qemu-storage-daemon in bookworm's qemu-system-common"
  rm -rf "$R"/boot "$R"/lib/modules "$R"/lib/firmware "$R"/usr/share/{doc,man,locale,info,bash-completion} \
         "$R"/var/cache/apt "$R"/var/lib/apt/lists "$R"/usr/lib/python3*/test
  touch "$A/rootfs.done"
fi
# amd64 wheels of the project's dependencies (PyPI), for the dom0's python 3.11 (the daemon's scenario)
if [ ! -f "$A/wheels.done" ]; then
  step "amd64 wheels (uvloop, construct, construct-typing)"
  rm -rf "$A/wheels"; mkdir -p "$A/wheels"
  retry python3 -m pip download -q --disable-pip-version-check --no-deps --dest "$A/wheels" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --python-version 3.11 --implementation cp \
    --only-binary=:all: 'uvloop>=0.19' 'construct==2.10.70' 'construct-typing>=0.8' 'typing-extensions' >/dev/null 2>&1 \
    || cant "pip download of the dom0's amd64 wheels failed 3 times (no network to PyPI?)"
  touch "$A/wheels.done"
fi
step "artefacts ready in $A"
echo "XENLAB_X86_ART=$A"
