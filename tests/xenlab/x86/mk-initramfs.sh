#!/bin/bash
# Assemble the x86 scout's dom0 initramfs: the cached amd64 userland (prepare.sh), the Xen modules,
# the domU (Debian's kernel again, a busybox initramfs running guest/domu-init.sh), guest/dom0-init.sh.
# usage: mk-initramfs.sh ART_DIR OUT.cpio.gz
#   env: XENLAB_X86_DOMU_MEM (MiB, 256), XENLAB_X86_DOMU_WAIT (s, 600),
#        XENLAB_X86_DOMU_CMDLINE (added to the domU's kernel command line, default "pci=noearly":
#        see README.md, "Where the time goes")
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
A=$1; OUT=$2
W=$(mktemp -d "${TMPDIR:-/tmp}/xenlab-x86-initramfs.XXXXXX")
trap 'rm -rf "$W"' EXIT
R=$W/root
cp -al "$A/rootfs" "$R"   # hard links: the cache is never modified
mkdir -p "$R/lib/modules/xenlab" "$R/boot" "$R/etc/xen" "$R/xenlab" "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/run" "$R/var"
rm -rf "$R/var/run"
cp "$A"/modules/*.ko "$R/lib/modules/xenlab/"
D=$W/domu
mkdir -p "$D"/{bin,proc,sys,dev,tmp}
cp "$A/rootfs/bin/busybox" "$D/bin/"
cp "$H/guest/domu-init.sh" "$D/init"; chmod +x "$D/init"
(cd "$D" && find . | cpio -o -H newc --quiet | gzip -1) > "$R/boot/domu.cpio.gz"
cp "$A/vmlinuz" "$R/boot/domu-vmlinuz"
rm -f "$R/init"; cp "$H/guest/dom0-init.sh" "$R/init"; chmod +x "$R/init"
{ echo "XENLAB_X86_DOMU_MEM=${XENLAB_X86_DOMU_MEM:-256}"
  echo "XENLAB_X86_DOMU_WAIT=${XENLAB_X86_DOMU_WAIT:-600}"
  echo "XENLAB_X86_DOMU_CMDLINE=\"${XENLAB_X86_DOMU_CMDLINE-pci=noearly}\""; } > "$R/xenlab/lab.env"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
