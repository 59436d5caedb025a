#!/bin/sh
# PID 1 inside User-Mode Linux for the peer tests (tests/peers/harness.py boots it).
# The root is the host's / over hostfs, read-only. Parameters arrive from the kernel command
# line as environment variables:
#   UMLT_MODULES  directory of the UML kernel modules (…/modules/<ver>)
#   UMLT_MODE     blkrw: write UMLT_PATTERN to /dev/vda at UMLT_WSECTOR (512-byte sectors),
#                 read it back and compare; then print the md5 of UMLT_RCOUNT sectors at UMLT_RSECTOR.
#                 probe: only report the size of /dev/vda.
# Every verdict is one console line starting with "UMLT:"; the host reads the console.
# Always ends with poweroff -f, whatever happened.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "UMLT: $*"; }
finish() { say "DONE $1"; sync; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Scratch space: a tmpfs on /mnt (not /tmp: the test's files live under the host's /tmp).
S=/mnt
mount -t tmpfs tmpfs $S || { say "FAIL tmpfs"; finish 1; }
say "BOOTED"

if ! insmod "$UMLT_MODULES/kernel/drivers/block/virtio_blk.ko"; then
    say "FAIL insmod virtio_blk"; finish 1
fi
# The disk appears asynchronously after the driver binds; bounded wait (UML's own clock).
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then say "FAIL no /dev/vda"; finish 1; fi
say "SECTORS $(cat /sys/block/vda/size)"

case "$UMLT_MODE" in
probe)
    finish 0
    ;;
blkrw)
    bytes=$(stat -c %s "$UMLT_PATTERN" 2>$S/err) || { say "FAIL pattern $(cat $S/err)"; finish 1; }
    n=$((bytes / 512))
    if ! dd if="$UMLT_PATTERN" of=/dev/vda bs=512 seek="$UMLT_WSECTOR" count="$n" oflag=direct conv=fsync 2>$S/dd.err; then
        say "FAIL write $(cat $S/dd.err)"; finish 1
    fi
    if ! dd if=/dev/vda of=$S/back bs=512 skip="$UMLT_WSECTOR" count="$n" iflag=direct 2>$S/dd.err; then
        say "FAIL read $(cat $S/dd.err)"; finish 1
    fi
    if cmp -s "$UMLT_PATTERN" $S/back; then say "WRITE-READ-OK $n"; else say "FAIL readback differs"; finish 1; fi
    if [ -n "$UMLT_RCOUNT" ]; then
        dd if=/dev/vda of=$S/r bs=512 skip="$UMLT_RSECTOR" count="$UMLT_RCOUNT" iflag=direct 2>/dev/null
        say "READ-MD5 $(md5sum < $S/r | cut -d' ' -f1)"
    fi
    finish 0
    ;;
*)
    say "FAIL unknown mode '$UMLT_MODE'"; finish 1
    ;;
esac
