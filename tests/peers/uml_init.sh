#!/bin/sh
# PID 1 inside User-Mode Linux for the peer tests (tests/peers/harness.py boots it).
# The root is the host's / over hostfs, read-only. Parameters arrive from the kernel command
# line as environment variables:
#   UMLT_MODULES  directory of the UML kernel modules (…/modules/<ver>)
#   UMLT_MODE     blkrw: write UMLT_PATTERN to /dev/vda at UMLT_WSECTOR (512-byte sectors),
#                 read it back and compare (O_DIRECT, UMLT_BS bytes per request, 512 unless
#                 set: it must divide the pattern and the offset); then print the md5 of
#                 UMLT_RCOUNT sectors at UMLT_RSECTOR.
#                 probe: only report the size of /dev/vda.
#                 net: virtio_net instead of virtio_blk; send UMLT_NET_FRAMES raw broadcast frames on
#                 eth0 and count those that come back intact within UMLT_NET_WAIT s (12) ("NET
#                 sent=N looped=M").
#                 UMLT_RELOAD=1 (blkrw, net): then unload the driver (rmmod: the device is reset),
#                 load it again, and do the same check once more ("RELOAD-WRITE-READ-OK n" at
#                 UMLT_WSECTOR2, "RELOAD-NET sent=N looped=M").
#                 fio: for each of UMLT_FIO_REPS repetitions, for each job of UMLT_FIO_JOBS
#                 (comma-separated rw:bs:iodepth, e.g. randread:4k:32), run fio for UMLT_FIO_TIME
#                 seconds on /dev/vda with UMLT_FIO_ENGINE (libaio, or psync: iodepth becomes
#                 numjobs) and print "FIO <rep> <job> <terse v3 line>"; with UMLT_FIO_OUTPUT=json,
#                 "FIOJ <rep> <job> <one-line JSON>" instead: fio's JSON output (read and write
#                 sections: iops, bw_bytes, io_bytes, runtime ms, clat percentiles ns) condensed,
#                 each job announced first by "FIOS <rep> <job>" and a second with no I/O (the
#                 bench reads its relay's counters in that gap: what each job cost, per I/O).
#   UMLT_EXEC     (any mode) a host program run once the device is up: each line it prints becomes
#                 a verdict, then "EXEC-RC <its exit status>".
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

# wait_for TEST: bounded wait (UML's own clock, 5 s) until TEST holds; its status.
wait_for() { i=0; while ! test "$@" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done; test "$@"; }

load_net() {
    insmod "$UMLT_MODULES/kernel/drivers/net/virtio_net.ko" || { say "FAIL insmod virtio_net"; finish 1; }
    wait_for -e /sys/class/net/eth0 || { say "FAIL no eth0"; finish 1; }
    ip link set eth0 up || { say "FAIL link up"; finish 1; }
}

load_blk() {
    insmod "$UMLT_MODULES/kernel/drivers/block/virtio_blk.ko" || { say "FAIL insmod virtio_blk"; finish 1; }
    # The disk appears asynchronously after the driver binds.
    wait_for -b /dev/vda || { say "FAIL no /dev/vda"; finish 1; }
}

# unload MODULE GONE: rmmod (the driver's removal resets the device), wait until GONE is gone.
unload() {
    rmmod "$1" || { say "FAIL rmmod $1"; finish 1; }
    wait_for ! -e "$2" || { say "FAIL $2 still there after rmmod $1"; finish 1; }
}

if [ "$UMLT_MODE" = net ]; then
    for m in net/core/failover drivers/net/net_failover; do
        insmod "$UMLT_MODULES/kernel/$m.ko" || { say "FAIL insmod $m"; finish 1; }
    done
    load_net
    say "MAC $(cat /sys/class/net/eth0/address)"
else
    load_blk
    say "SECTORS $(cat /sys/block/vda/size)"
fi
if [ -n "$UMLT_EXEC" ]; then
    "$UMLT_EXEC" > $S/exec.out 2>&1
    rc=$?
    while IFS= read -r line; do say "$line"; done < $S/exec.out
    say "EXEC-RC $rc"
fi

# blk_rw SECTOR: the pattern written at SECTOR with O_DIRECT, read back, compared; 0 if equal.
blk_rw() {
    bs=${UMLT_BS:-512}
    if ! dd if="$UMLT_PATTERN" of=/dev/vda bs=$bs seek=$(($1 * 512 / bs)) count=$((n * 512 / bs)) oflag=direct conv=fsync 2>$S/dd.err; then
        say "FAIL write $(cat $S/dd.err)"; finish 1
    fi
    if ! dd if=/dev/vda of=$S/back bs=$bs skip=$(($1 * 512 / bs)) count=$((n * 512 / bs)) iflag=direct 2>$S/dd.err; then
        say "FAIL read $(cat $S/dd.err)"; finish 1
    fi
    cmp -s "$UMLT_PATTERN" $S/back
}

case "$UMLT_MODE" in
probe)
    finish 0
    ;;
blkrw)
    bytes=$(stat -c %s "$UMLT_PATTERN" 2>$S/err) || { say "FAIL pattern $(cat $S/err)"; finish 1; }
    n=$((bytes / 512))
    if blk_rw "$UMLT_WSECTOR"; then say "WRITE-READ-OK $n"; else say "FAIL readback differs"; finish 1; fi
    if [ "$UMLT_RELOAD" = 1 ]; then
        unload virtio_blk /dev/vda
        load_blk
        if blk_rw "$UMLT_WSECTOR2"; then say "RELOAD-WRITE-READ-OK $n"; else say "FAIL readback differs after reload"; finish 1; fi
    fi
    if [ -n "$UMLT_RCOUNT" ]; then
        dd if=/dev/vda of=$S/r bs=512 skip="$UMLT_RSECTOR" count="$UMLT_RCOUNT" iflag=direct 2>/dev/null
        say "READ-MD5 $(md5sum < $S/r | cut -d' ' -f1)"
    fi
    finish 0
    ;;
net)
    # Raw frames (EtherType 0x88b5, local experimental) to broadcast on eth0 (virtio_net); a peer
    # that loops the port back (dpdk-testpmd io forwarding) returns them: count the returned ones
    # whose bytes match what was sent.
    cat >$S/net.py <<'PYEOF'
import os, socket, sys, time
n = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind(("eth0", 0))
deadline = time.monotonic() + float(os.environ.get("UMLT_NET_WAIT", "12"))
src = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
sent = set()
for i in range(n):
    f = b"\xff" * 6 + src + b"\x88\xb5" + i.to_bytes(4, "big") + os.urandom(60 + i)
    sent.add(f)
    s.send(f)
back = 0
try:  # the peer may still be starting (mapping guest memory): wait up to UMLT_NET_WAIT s in all
    while back < n:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        data, addr = s.recvfrom(4096)
        if addr[2] != socket.PACKET_OUTGOING and data in sent:
            sent.discard(data)
            back += 1
except socket.timeout:
    pass
print("NET sent=%d looped=%d" % (n, back))
PYEOF
    python3 $S/net.py "${UMLT_NET_FRAMES:-32}" >$S/net.out 2>&1
    say "$(tail -n 1 $S/net.out | tr '\n' ' ')"
    if [ "$UMLT_RELOAD" = 1 ]; then
        ip link set eth0 down
        unload virtio_net /sys/class/net/eth0
        load_net
        python3 $S/net.py "${UMLT_NET_FRAMES:-32}" >$S/net.out 2>&1
        say "RELOAD-$(tail -n 1 $S/net.out | tr '\n' ' ')"
    fi
    finish 0
    ;;
fio)
    reps=${UMLT_FIO_REPS:-1}; r=1
    while [ $r -le $reps ]; do
        for job in $(echo "$UMLT_FIO_JOBS" | tr ',' ' '); do
            rw=${job%%:*}; rest=${job#*:}; bs=${rest%%:*}; qd=${rest#*:}
            if [ "$UMLT_FIO_ENGINE" = psync ]; then par="--ioengine=psync --numjobs=$qd --group_reporting"
            else par="--ioengine=${UMLT_FIO_ENGINE:-libaio} --iodepth=$qd"; fi
            if [ "$UMLT_FIO_OUTPUT" = json ]; then
                say "FIOS $r $job"; sleep 1
                fio --name=j --filename=/dev/vda --direct=1 --rw="$rw" --bs="$bs" $par \
                    --runtime="${UMLT_FIO_TIME:-3}" --time_based --output-format=json --output=$S/fio.json \
                    2>$S/fio.err || { say "FAIL fio $job $(head -c 300 $S/fio.err | tr '\n' ' ')"; finish 1; }
                out=$(python3 - $S/fio.json <<'PYEOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
def side(d):
    pct = d.get("clat_ns", {}).get("percentile", {})
    return {"iops": d["iops"], "bw_bytes": d["bw_bytes"], "io_bytes": d["io_bytes"], "runtime_ms": d["runtime"],
            "clat_ns_p50": pct.get("50.000000"), "clat_ns_p99": pct.get("99.000000")}
print(json.dumps({"read": side(job["read"]), "write": side(job["write"])}, separators=(",", ":")))
PYEOF
) || { say "FAIL fio json $job"; finish 1; }
                say "FIOJ $r $job $out"
                continue
            fi
            out=$(fio --name=j --filename=/dev/vda --direct=1 --rw="$rw" --bs="$bs" $par \
                  --runtime="${UMLT_FIO_TIME:-3}" --time_based --output-format=terse --terse-version=3 \
                  2>$S/fio.err) || { say "FAIL fio $job $(head -c 300 $S/fio.err | tr '\n' ' ')"; finish 1; }
            say "FIO $r $job $out"
        done
        r=$((r + 1))
    done
    finish 0
    ;;
*)
    say "FAIL unknown mode '$UMLT_MODE'"; finish 1
    ;;
esac
