#!/bin/bash
# Assemble the x86 scout's dom0 initramfs: the cached amd64 userland (prepare.sh), the Xen modules,
# the domU (Debian's kernel again, a busybox initramfs running guest/domu-init.sh), guest/dom0-init.sh.
# usage: mk-initramfs.sh ART_DIR OUT.cpio.gz
#   env: XENLAB_X86_DOMU_MEM (MiB, 256), XENLAB_X86_DOMU_WAIT (s, 600; 1200 with a scenario),
#        XENLAB_X86_DOMU_CMDLINE (added to the domU's kernel command line, default "pci=noearly":
#        see README.md, "Where the time goes"),
#        XENLAB_X86_SCENARIO ("" = the scout: boot the domU and list its PCI functions; "pci-pyblk":
#        the daemon serves a virtio-pci disk of the domU from the Python RAM-disk back-end, XEN_MMAP)
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
TREE=$(cd "$H/../../.." && pwd)
A=$1; OUT=$2
W=$(mktemp -d "${TMPDIR:-/tmp}/xenlab-x86-initramfs.XXXXXX")
trap 'rm -rf "$W"' EXIT
R=$W/root
cp -al "$A/rootfs" "$R"   # hard links: the cache is never modified
mkdir -p "$R/lib/modules/xenlab" "$R/boot" "$R/etc/xen" "$R/xenlab" "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/run" "$R/var"
rm -rf "$R/var/run"
cp "$A"/modules/*.ko "$R/lib/modules/xenlab/"
if [ -n "${XENLAB_X86_SCENARIO:-}" ]; then
  # this project from the working tree (committed or not) + the amd64 wheels, for dom0's python3.11
  SITE=$R/usr/local/lib/python3.11/dist-packages
  mkdir -p "$SITE" "$R/usr/local/bin" "$R/root"
  for pkg in "$TREE/protocol/vhost_user" "$TREE/xen_vhost_master"; do
    (cd "$(dirname "$pkg")" && find "$(basename "$pkg")" -name '*.py' -o -name 'py.typed') | \
      (cd "$(dirname "$pkg")" && cpio -pdm --quiet "$SITE")
  done
  for whl in "$A"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$SITE"; done
  # byte-compiled ahead (python under TCG is slow); only by a python of dom0's version (same magic)
  if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python3 -m compileall -q -j0 --invalidation-mode unchecked-hash -s "$R" -p / "$SITE" >/dev/null
  fi
  printf '#!/usr/bin/python3\nfrom xen_vhost_master.cli import entry\nentry()\n' > "$R/usr/local/bin/xen-vhost-master"
  chmod +x "$R/usr/local/bin/xen-vhost-master"
fi
D=$W/domu
mkdir -p "$D"/{bin,proc,sys,dev,tmp,lib/modules}
if [ -n "${XENLAB_X86_SCENARIO:-}" ]; then cp "$A"/domu-modules/*.ko "$D/lib/modules/"; fi
cp "$A/rootfs/bin/busybox" "$D/bin/"
cp "$H/guest/domu-init.sh" "$D/init"; chmod +x "$D/init"
(cd "$D" && find . | cpio -o -H newc --quiet | gzip -1) > "$R/boot/domu.cpio.gz"
cp "$A/vmlinuz" "$R/boot/domu-vmlinuz"
rm -f "$R/init"; cp "$H/guest/dom0-init.sh" "$R/init"; chmod +x "$R/init"
{ echo "XENLAB_X86_DOMU_MEM=${XENLAB_X86_DOMU_MEM:-256}"
  # (a daemon scenario's domU under load: userspace 549 s after unpause, its I/O done at 790 s)
  echo "XENLAB_X86_DOMU_WAIT=${XENLAB_X86_DOMU_WAIT:-$([ -n "${XENLAB_X86_SCENARIO:-}" ] && echo 1200 || echo 600)}"
  echo "XENLAB_X86_DOMU_CMDLINE=\"${XENLAB_X86_DOMU_CMDLINE-pci=noearly}\""
  echo "XENLAB_X86_SCENARIO=\"${XENLAB_X86_SCENARIO:-}\""; } > "$R/xenlab/lab.env"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
