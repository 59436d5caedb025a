#!/bin/bash
# Assemble the dom0 initramfs of the real-Xen lab: the cached arm64 userland (prepare.sh) + this
# project from the working tree + the arm64 wheels + the domU (same kernel, busybox initramfs
# running guest/domu-init.sh) + the lab scripts.
# usage: mk-initramfs.sh ART_DIR OUT.cpio.gz
#   env: XENLAB_SCENARIOS (default "pyblk qsd grant"), XENLAB_KERNEL (the lab's kernel Image, for grant domUs)
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
TREE=$(cd "$H/../.." && pwd)
A=$1; OUT=$2
W=$(mktemp -d "${TMPDIR:-/tmp}/xenlab-initramfs.XXXXXX")
trap 'rm -rf "$W"' EXIT
R=$W/root
cp -al "$A/rootfs" "$R"   # hard links: the cache is never modified (only new files are added below)
PYV=$(ls "$R/usr/lib" | grep -E '^python3\.[0-9]+$' | head -1)   # the dom0's python (3.11 on Debian 12, 3.13 on 13)
SITE=$R/usr/local/lib/$PYV/dist-packages
mkdir -p "$SITE" "$R/usr/local/bin" "$R/lib/modules/xenlab" "$R/boot" "$R/etc/xen" "$R/root" "$R/xenlab" \
         "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/run" "$R/var"
rm -rf "$R/var/run"
# this project, from the working tree (what is checked out, committed or not)
for pkg in "$TREE/protocol/vhost_user" "$TREE/xen_vhost_master"; do
  (cd "$(dirname "$pkg")" && find "$(basename "$pkg")" -name '*.py' -o -name 'py.typed') | \
    (cd "$(dirname "$pkg")" && cpio -pdm --quiet "$SITE")
done
for whl in "$A"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$SITE"; done
# the dom0's python compiles (its magic number, whatever python the host runs); paths as dom0 sees them
J=0; [ "$PYV" = python3.11 ] || J=1   # python 3.13's compileall workers break under qemu-user
"$H/dom0-python.sh" "$R" -m compileall -q -j$J --invalidation-mode unchecked-hash -s "$R" -p / "$SITE" >/dev/null
# the daemon alone: a dom0 runs no simulator (sim/xen_vhost_sim is not copied)
printf '#!/usr/bin/python3\nfrom xen_vhost_master.cli import entry\nentry()\n' > "$R/usr/local/bin/xen-vhost-master"
chmod +x "$R/usr/local/bin/xen-vhost-master"
cp "$A"/modules/*.ko "$R/lib/modules/xenlab/"
# the domU: Debian's kernel again, busybox initramfs with the test script
D=$W/domu
mkdir -p "$D"/{bin,proc,sys,dev,tmp,lib/modules}
cp "$A/rootfs/bin/busybox" "$D/bin/"
cp "$A/modules/virtio_mmio.ko" "$A/modules/virtio_blk.ko" "$D/lib/modules/"
for m in failover net_failover virtio_net; do [ ! -f "$A/modules/$m.ko" ] || cp "$A/modules/$m.ko" "$D/lib/modules/"; done   # the net scenario
[ ! -f "$A/modules/xen-blkfront.ko" ] || cp "$A/modules/xen-blkfront.ko" "$D/lib/modules/"   # make bench-xen's PV disk
# make bench-xen's fio (prepare.sh, XENLAB_BENCH=1 only): /fio/fio and the libraries it loads, run
# through their own loader; make test's domU has none (its initramfs stays small)
if [ "${XENLAB_BENCH:-0}" = 1 ] && [ -x "$A/fio/fio" ]; then mkdir -p "$D/fio"; cp -r "$A/fio/fio" "$A/fio/lib" "$D/fio/"; fi
cp "$H/guest/domu-init.sh" "$D/init"; chmod +x "$D/init"
(cd "$D" && find . | cpio -o -H newc --quiet | gzip -1) > "$R/boot/domu.cpio.gz"
ln "$A/Image" "$R/boot/domu-vmlinuz" 2>/dev/null || cp "$A/Image" "$R/boot/domu-vmlinuz"
# grant-based domUs boot the lab's kernel (CONFIG_XEN_VIRTIO_FORCE_GRANT, everything built in)
[ -z "${XENLAB_KERNEL:-}" ] || ln "$XENLAB_KERNEL" "$R/boot/domu-xenlab-vmlinuz" 2>/dev/null || cp "$XENLAB_KERNEL" "$R/boot/domu-xenlab-vmlinuz"
# the lab
cp "$H/guest/dom0-init.sh" "$R/init"; cp "$H/guest/dom0-test.sh" "$R/xenlab/"
chmod +x "$R/init" "$R/xenlab/dom0-test.sh"
{ echo "XENLAB_SCENARIOS=\"${XENLAB_SCENARIOS:-pyblk qsd grant}\""; echo "export XENLAB_SCENARIOS"
  for v in XENLAB_TERM_SIGNAL XENLAB_QSD_QUEUES XENLAB_DOMU_VCPUS XENLAB_BENCH XENLAB_DOMU_WAIT XENLAB_GRANT_TOML XENLAB_DOM0_KERNEL \
           XENLAB_NET_FWD XENLAB_TESTPMD_MB XENLAB_CLOSED_MS; do
    [ -n "${!v:-}" ] && echo "$v=\"${!v}\"" && echo "export $v"
  done; } > "$R/xenlab/lab.env"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
