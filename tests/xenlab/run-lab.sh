#!/bin/bash
# The real-Xen lab, end to end (`make test-xen`): build or reuse the cached artefacts, assemble the
# dom0 initramfs from the working tree, boot Xen + dom0 under qemu-system-aarch64 (TCG), run the
# scenarios, decide from the serial log.
#   env: XENLAB_CACHE (default /var/cache/xen-vhost-master-lab), XENLAB_LOG (default
#        $XENLAB_CACHE/logs/lab.log; failures are also kept as logs/fail-<time>.log), XENLAB_SCENARIOS
#        (default: pyblk qsd grant, and net on Xen 4.20; `make test-xen-full`: every scenario), XENLAB_DOM0_KERNEL (xenlab:
#        the lab's kernel with the privcmd fast path, the default; debian: Debian's), XENLAB_TIMEOUT (s, default 3000: the cap), XENLAB_STALL (s without a new check, default 900), XENLAB_BENCH=1 (`make bench-xen`: the
#        benchmark boot instead of the checks; XENLAB_BENCH_OUT, default ./bench-xen-results.json),
#        XENLAB_TERM_SIGNAL (TERM: the signal the SIGTERM step sends; KILL or STOP show its checks failing),
#        XENLAB_QSD_QUEUES (2: the qsd scenario's export queues; 1 shows multi-queue failing),
#        XENLAB_XEN (4.17 or 4.20; default: the host's Debian release's, see prepare.sh; 4.20's logs are
#        in $XENLAB_CACHE/logs-4.20/, 4.17's in logs/), XENLAB_XEN_SRC (prepare.sh: an upstream Xen source),
#        XENLAB_NET_FWD (the net scenario's testpmd forward mode, 5tswap; rxonly shows net-frames failing)
# exit: 0 pass, 1 fail (the log's tail is printed), 3 the lab cannot be built here (reason printed):
#       both are failures of `make test` (XENLAB=0 is the one way to leave the lab out)
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
TREE=$(cd "$H/../.." && pwd)
export XENLAB_CACHE=${XENLAB_CACHE:-/var/cache/xen-vhost-master-lab}
t0=$(date +%s); step() { echo "== xenlab [$(( $(date +%s) - t0 ))s] $*" >&2; }
GIVEN=${XENLAB_SCENARIOS:-}
if [ "${XENLAB_BENCH:-0}" = 1 ]; then export XENLAB_SCENARIOS=${XENLAB_SCENARIOS:-pyblk fastpath qsd}
else export XENLAB_SCENARIOS=${XENLAB_SCENARIOS:-pyblk qsd grant}; fi
set +e
OUT=$("$H/prepare.sh")
rc=$?
set -e
[ $rc = 0 ] || exit $rc
ART=$(echo "$OUT" | sed -n 's/^XENLAB_ART=//p' | tail -1)
XV=$(echo "$OUT" | sed -n 's/^XENLAB_XEN=//p' | tail -1)
# Xen >= 4.18 (virtio = [...]) also runs the virtio-net scenario by default (the last: its guest gets the SIGTERM step)
[ -n "$GIVEN" ] || [ "$XV" = 4.17 ] || [ "${XENLAB_BENCH:-0}" = 1 ] || export XENLAB_SCENARIOS="$XENLAB_SCENARIOS net"
export XENLAB_KERNEL=$(echo "$OUT" | sed -n 's/^XENLAB_KERNEL=//p' | tail -1)
# dom0's kernel: the lab's (privcmd fast path) unless XENLAB_DOM0_KERNEL=debian (Debian's, no fast path)
export XENLAB_DOM0_KERNEL=${XENLAB_DOM0_KERNEL:-xenlab}
case $XENLAB_DOM0_KERNEL in
  xenlab) DOM0_KERNEL=$XENLAB_KERNEL ;;
  debian) DOM0_KERNEL=$ART/Image ;;
  *) echo "XENLAB_DOM0_KERNEL=$XENLAB_DOM0_KERNEL: use xenlab or debian" >&2; exit 1 ;;
esac
LOGS=$XENLAB_CACHE/logs; [ "$XV" = 4.17 ] || LOGS=$XENLAB_CACHE/logs-$XV   # each Xen release its own logs
mkdir -p "$LOGS"
LOG=${XENLAB_LOG:-$LOGS/lab.log}
INITRD=$(mktemp "${TMPDIR:-/tmp}/xenlab-dom0.XXXXXX.cpio.gz")
LOADS=$(mktemp "${TMPDIR:-/tmp}/xenlab-load.XXXXXX"); SAMPLER=""
trap 'rm -f "$INITRD" "$LOADS"; [ -z "$SAMPLER" ] || kill $SAMPLER 2>/dev/null' EXIT
step "dom0 initramfs from $TREE (scenarios: $XENLAB_SCENARIOS)"
"$H/mk-initramfs.sh" "$ART" "$INITRD"
step "boot Xen $XV + dom0 ($XENLAB_DOM0_KERNEL kernel) under qemu-system-aarch64 (TCG); serial log $LOG"
if [ "${XENLAB_BENCH:-0}" = 1 ]; then   # the host's load over the bench boot, for the report
  ( while :; do echo "$(date +%s) $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 30; done ) >> "$LOADS" & SAMPLER=$!
fi
python3 "$H/boot.py" --xen "$ART/xen-ioreq" --kernel "$DOM0_KERNEL" --initrd "$INITRD" --log "$LOG" \
  --timeout "${XENLAB_TIMEOUT:-3000}" --stall "${XENLAB_STALL:-$([ "${XENLAB_BENCH:-0}" = 1 ] && echo 0 || echo 900)}" || true
if [ "${XENLAB_BENCH:-0}" = 1 ]; then   # make bench-xen: a report, not a verdict
  step "bench-xen report"
  kill $SAMPLER 2>/dev/null || true; SAMPLER=""
  python3 "$H/bench_xen.py" "$LOG" --out "${XENLAB_BENCH_OUT:-$TREE/bench-xen-results.json}" --host-load "$LOADS"
  exit $?
fi
step "verdict"
if python3 "$H/verdict.py" "$LOG" --scenarios "$XENLAB_SCENARIOS"; then
  cp "$LOG" "$LOGS/last-pass.log" 2>/dev/null || true
  step "PASS (log: $LOG)"
  exit 0
fi
KEEP=$LOGS/fail-$(date -u +%Y%m%dT%H%M%SZ).log
cp "$LOG" "$KEEP" 2>/dev/null || KEEP=$LOG
ls -1t "$LOGS"/fail-*.log 2>/dev/null | tail -n +11 | xargs -r rm -f   # keep the last 10 failures
echo "---- last 80 lines of $LOG ----" >&2
tail -80 "$LOG" >&2
step "FAIL (whole log: $LOG, kept as $KEEP)"
exit 1
