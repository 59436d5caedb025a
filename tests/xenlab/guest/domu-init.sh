#!/bin/busybox sh
# The domU's /init: probe the virtio-mmio device, show its status, do real block I/O on /dev/vda,
# then keep I/O running until dom0 destroys the domain. Every verdict line starts with DOMU-.
/bin/busybox --install -s /bin
heartbeats() {  # one heartbeat per CPU, each pinned to its CPU, none touching a device: the guest
  # stays alive whatever its device does (dom0 reads them after stopping the daemon under the
  # guest), and a CPU that stops (its timer, or a vCPU Xen holds) is told apart from the others;
  # the I/O loop's count and vda's in-flight requests
  for c in $(seq 0 $(($(nproc) - 1))); do
    taskset -c $c sh -c 'h=0; while sleep 2; do h=$((h+1)); echo "DOMU-HB $h cpu='$c' loop=$(cat /tmp/loop 2>/dev/null) inflight=$(cat /sys/block/vda/inflight 2>/dev/null | tr -s " " ,)"; done' &
  done
}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
echo "DOMU-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
for n in /proc/device-tree/virtio*; do
  [ -e "$n" ] && echo "DOMU-DT $(basename $n) compatible=$(tr '\0' ' ' < $n/compatible) iommus=$([ -e $n/iommus ] && echo yes || echo no)"
done
# Debian's kernel has virtio as modules; the lab's kernel (no module support) has it built in
[ ! -e /proc/modules ] || { insmod /lib/modules/virtio_mmio.ko; insmod /lib/modules/virtio_blk.ko; }
echo "DOMU-KERNEL $(uname -r)"
if grep -q xenlab_net /proc/cmdline; then
  # virtio-net (dom0: dpdk-testpmd, 5tswap: each frame comes back with its MAC, IP addresses and
  # ports swapped). The pings go to 10.0.0.2, a static neighbour nobody owns: the request comes back
  # as a request from .2, this kernel answers it, the answer comes back as the reply ping waits for.
  # Every frame crosses the back-end; ICMP checksums cover the payloads.
  [ ! -e /proc/modules ] || for m in failover net_failover virtio_net; do [ ! -f /lib/modules/$m.ko ] || insmod /lib/modules/$m.ko; done
  i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
  for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] && echo "DOMU-VIRTIO $(basename $d) device=$(cat $d/device) vendor=$(cat $d/vendor) status=$(cat $d/status) features=$(cat $d/features) driver=$(basename $(readlink $d/driver) 2>/dev/null)"
  done
  ip link set lo up; ip link set eth0 up; ip addr add 10.0.0.1/24 dev eth0
  arp -s 10.0.0.2 02:00:00:00:00:02 2>/dev/null || ip neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev eth0
  w=0; until ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1 || [ $w -ge 15 ]; do w=$((w+1)); done   # the link comes up
  # one probe at a time, each given 10 s: a reply that comes late on a loaded host still counts
  # (`ping -c 10 -W 3` gave up on a tenth reply still on its way at a round trip of 1.6 s)
  N=10; GOT=0; : > /tmp/ping
  for i in $(seq $N); do ping -c 1 -W 10 -s 1000 10.0.0.2 >> /tmp/ping 2>&1 && GOT=$((GOT+1)); done
  ST=/sys/class/net/eth0/statistics
  echo "DOMU-NET mac=$(cat /sys/class/net/eth0/address) carrier=$(cat /sys/class/net/eth0/carrier) warmup_tries=$w sent=$N received=${GOT:-0} rx_packets=$(cat $ST/rx_packets) tx_packets=$(cat $ST/tx_packets) rx_errors=$(cat $ST/rx_errors)"
  if [ "${GOT:-0}" = $N ]; then echo "DOMU-NET-OK replies=$GOT/$N size=1000"; else echo "DOMU-NET-FAIL replies=${GOT:-0}/$N"; tail -3 /tmp/ping | sed 's/^/DOMU-NET-PING /'; fi
  echo "DOMU-NCPU $(nproc)"
  grep -E 'virtio' /proc/interrupts | sed 's/^/DOMU-IRQ /'
  echo "DOMU-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
  heartbeats
  n=0
  while true; do   # frames keep flowing until dom0 destroys us
    ping -c 3 -W 2 10.0.0.2 >/dev/null 2>&1 || echo "DOMU-LOOP-ERR ping"
    n=$((n+1)); echo $n > /tmp/loop; echo "DOMU-LOOP $n"
  done
fi
if grep -q xenlab_bench /proc/cmdline; then
  # make bench-xen: the same I/O, O_DIRECT (no page cache), on the virtio disk the daemon serves
  # (vda) and on a Xen PV disk served by dom0's blkback (xvdb), phase by phase, each framed by idle
  # gaps so that dom0 snapshots its CPU counters while nothing runs. fio (Debian's, its JSON report
  # on one DOMU-BENCH-FIO line after each phase) when the initramfs has it and it runs; else busybox
  # dd at queue depth 1, the phases named as dd's, method=dd on each line.
  insmod /lib/modules/xen-blkfront.ko 2>/dev/null
  i=0; while { [ ! -b /dev/vda ] || [ ! -b /dev/xvdb ]; } && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
  echo "DOMU-BENCH-DISKS vda=$(cat /sys/block/vda/size 2>/dev/null) xvdb=$(cat /sys/block/xvdb/size 2>/dev/null)"
  ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
  fio() { /fio/lib/ld-linux-aarch64.so.1 --library-path /fio/lib /fio/fio "$@"; }
  if [ -x /fio/fio ] && V=$(fio --version 2>&1); then
    # NAME RW BS IODEPTH IOS: a phase ends at IOS I/Os or after 15 s, whichever first (random
    # offsets within 32 MiB of the 40 MiB disks)
    ENGINE=libaio   # Debian's domU kernel has CONFIG_AIO
    echo "DOMU-BENCH-METHOD fio $V ioengine=$ENGINE"
    for spec in "seqwrite-1M write 1M 1 32" "seqread-1M read 1M 1 32" "randwrite-4k-qd1 randwrite 4k 1 256" \
                "randread-4k-qd1 randread 4k 1 256" "randwrite-4k-qd32 randwrite 4k 32 2048" "randread-4k-qd32 randread 4k 32 2048"; do
      set -- $spec; TEST=$1
      for dev in vda xvdb; do
        echo "DOMU-BENCH-BEGIN $TEST $dev"; sleep 2
        rm -f /tmp/fio.json; T0=$(ms)
        fio --name=$TEST --filename=/dev/$dev --ioengine=$ENGINE --direct=1 --rw=$2 --bs=$3 --iodepth=$4 \
            --size=32M --number_ios=$5 --runtime=15 --percentile_list=50:99 --output-format=json --output=/tmp/fio.json \
            >/tmp/fio.err 2>&1; rc=$?
        T1=$(ms)
        echo "DOMU-BENCH-END $TEST $dev rc=$rc method=fio ms=$((T1 - T0))"; sleep 2
        [ $rc = 0 ] || sed "s/^/DOMU-BENCH-FIO-ERR $TEST $dev /" /tmp/fio.err | head -5
        echo "DOMU-BENCH-FIO $TEST $dev $(tr -d '\n' < /tmp/fio.json 2>/dev/null | tr -s ' ')"
      done
    done
  else
    echo "DOMU-BENCH-METHOD dd (no fio: ${V:-not in this initramfs})"
    N4=${N4:-256}; N1=${N1:-32}
    for spec in "seqwrite-1M 1048576 $N1 w" "seqread-1M 1048576 $N1 r" "write-4k 4096 $N4 w" "read-4k 4096 $N4 r"; do
      set -- $spec; TEST=$1; BS=$2; CNT=$3; DIR=$4
      for dev in vda xvdb; do
        echo "DOMU-BENCH-BEGIN $TEST $dev"; sleep 2
        T0=$(ms)
        if [ $DIR = w ]; then dd if=/dev/zero of=/dev/$dev bs=$BS count=$CNT oflag=direct 2>/dev/null; rc=$?
        else dd if=/dev/$dev of=/dev/null bs=$BS count=$CNT iflag=direct 2>/dev/null; rc=$?; fi
        T1=$(ms)
        echo "DOMU-BENCH-END $TEST $dev rc=$rc method=dd bs=$BS ios=$CNT ms=$((T1 - T0))"; sleep 2
      done
    done
  fi
  echo "DOMU-BENCH-DONE"
  while true; do sleep 3600; done
fi
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d" ] && echo "DOMU-VIRTIO $(basename $d) device=$(cat $d/device) vendor=$(cat $d/vendor) status=$(cat $d/status) features=$(cat $d/features) driver=$(basename $(readlink $d/driver) 2>/dev/null)"
done
if [ ! -b /dev/vda ]; then
  echo "DOMU-IO-FAIL no /dev/vda"; dmesg | grep -iE 'virtio|vda' | tail -20
else
  echo "DOMU-VDA size=$(cat /sys/block/vda/size) sectors"
  # 1 MiB pattern at 1 MiB: a marker line (dom0 finds it in the back-end's image) + random data
  MARK="XENLAB-PATTERN-$(head -c 8 /dev/urandom | md5sum | cut -c1-16)"
  { echo "$MARK"; head -c 1048576 /dev/urandom; } | head -c 1048576 > /tmp/pat
  WANT=$(md5sum < /tmp/pat | cut -d' ' -f1)
  dd if=/tmp/pat of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null; wrc=$?
  sync; echo 3 > /proc/sys/vm/drop_caches
  GOT=$(dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "DOMU-IO write_rc=$wrc want=$WANT got=$GOT mark=$MARK"
  [ "$WANT" = "$GOT" ] && [ $wrc = 0 ] && echo "DOMU-IO-OK md5=$WANT mark=$MARK" || echo "DOMU-IO-FAIL md5 mismatch"
  # I/O from every vCPU at once (busybox taskset): each vCPU's virtio notifies reach the daemon
  # through that vCPU's own ioreq slot and event channel. O_DIRECT, so the reads go to the device.
  NCPU=$(nproc)
  if [ "$NCPU" -ge 2 ]; then
    c=0
    while [ $c -lt $NCPU ]; do
      ( head -c 262144 /dev/urandom > /tmp/cpu$c; W=$(md5sum < /tmp/cpu$c | cut -d' ' -f1)
        taskset -c $c dd if=/tmp/cpu$c of=/dev/vda bs=4096 seek=$((2048 + c * 64)) oflag=direct 2>/dev/null; r1=$?
        R=$(taskset -c $c dd if=/dev/vda bs=4096 skip=$((2048 + c * 64)) count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        echo "DOMU-VCPU-IO cpu=$c ok=$([ $r1 = 0 ] && [ "$W" = "$R" ] && echo 1 || echo 0) want=$W got=$R" ) &
      c=$((c + 1))
    done
    wait
  fi
  echo "DOMU-NCPU $NCPU"
  # blk-mq: one hardware queue per virtqueue (virtio_blk, VIRTIO_BLK_F_MQ), each with the CPUs it
  # serves; how often each was run, where the kernel has block debugfs
  mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
  Q=""; C=""; R=""
  for h in /sys/block/vda/mq/*; do
    [ -d "$h" ] || continue
    n=${h##*/}; Q="$Q $n"; C="$C/$(tr -d ' \n' < $h/cpu_list)"
    f=/sys/kernel/debug/block/vda/hctx$n/run; [ -r $f ] && R="$R,$(cat $f)"
  done
  echo "DOMU-MQ queues=$(echo $Q | wc -w) cpus=${C#/} runs=${R#,}"
  # grant DMA (drivers/xen/grant-dma-ops.c): "Using dom0 as backend" when the device's buffers are granted
  dmesg | grep -E 'Using dom0 as backend|grant' | sed 's/^/DOMU-GRANT-DMA /'
  grep -E 'virtio' /proc/interrupts | sed 's/^/DOMU-IRQ /'
fi
echo "DOMU-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
heartbeats
# keep I/O running until dom0 destroys us (xl destroy while I/O runs); a failing dd is reported
n=0
while [ -b /dev/vda ]; do
  dd if=/dev/urandom of=/dev/vda bs=65536 seek=64 count=16 conv=fsync 2>/dev/null || echo "DOMU-LOOP-ERR write rc=$?"
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/dev/null bs=65536 skip=64 count=16 2>/dev/null || echo "DOMU-LOOP-ERR read rc=$?"
  n=$((n+1)); echo $n > /tmp/loop; echo "DOMU-LOOP $n"
done
while true; do sleep 3600; done
