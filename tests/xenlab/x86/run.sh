#!/bin/bash
# The x86 real-Xen scout, end to end: prepare (cached), dom0 initramfs, one boot under
# `nice -n ${XENLAB_X86_NICE:-15}`; the timestamped serial log in $XENLAB_X86_LOG
# (default <cache>/logs/boot-<time>.log). Exit 0 when the HVM domU reached userspace.
# Not part of `make test`: `make test-xen-x86`.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
C=${XENLAB_X86_CACHE:-/var/cache/xen-vhost-master-lab-x86}
out=$(bash "$H/prepare.sh") || exit $?
A=$(echo "$out" | sed -n 's/^XENLAB_X86_ART=//p' | tail -1)
mkdir -p "$C/logs"
LOG=${XENLAB_X86_LOG:-$C/logs/boot-$(date -u +%Y%m%dT%H%M%SZ).log}
INITRD=$(mktemp "${TMPDIR:-/tmp}/xenlab-x86-dom0.XXXXXX.cpio.gz")
trap 'rm -f "$INITRD"' EXIT
bash "$H/mk-initramfs.sh" "$A" "$INITRD"
echo "== xenlab-x86: booting, log $LOG (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
rc=0
nice -n "${XENLAB_X86_NICE:-15}" python3 "$H/boot.py" "$A" "$INITRD" "$LOG" \
  --timeout "${XENLAB_X86_TIMEOUT:-$([ -n "${XENLAB_X86_SCENARIO:-}" ] && echo 2100 || echo 1500)}" ${XENLAB_X86_BOOT_ARGS:-} || rc=$?
[ -n "${XENLAB_X86_SCENARIO:-}" ] || exit $rc
# the scenario's verdict (verdict.sh): every check printed, in the log too; any failed check fails the run
vrc=0
bash "$H/verdict.sh" "$XENLAB_X86_SCENARIO" "$LOG" | tee -a "$LOG" >&2 || vrc=1
[ $vrc = 0 ] && [ $rc = 0 ]
