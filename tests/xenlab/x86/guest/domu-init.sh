#!/bin/busybox sh
# The HVM domU's /init: say when userspace starts, show what the guest sees (CPU, PCI functions
# the device model put there), then power off. Every line the host reads starts with DOMU-.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "DOMU-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "DOMU-CPU $(grep -m1 'model name' /proc/cpuinfo) hypervisor=$(cat /sys/hypervisor/type 2>/dev/null) xen_guest=$(grep -c . /sys/hypervisor/properties/features 2>/dev/null)"
for d in /sys/bus/pci/devices/*; do
  [ -e "$d" ] && echo "DOMU-PCI $(basename $d) vendor=$(cat $d/vendor) device=$(cat $d/device) class=$(cat $d/class)"
done
# (every busybox command costs ~1 s of host time here: the scenario skips the scout's dmesg lines)
[ -f /lib/modules/virtio_pci.ko ] || dmesg | grep -iE 'xen|hvm|pvh|clocksource|virtio' | head -20 | sed 's/^/DOMU-DMESG /'
if [ -f /lib/modules/virtio_pci.ko ]; then
  # issue 20: the daemon's virtio-pci function (00:04.0): bind Linux's virtio_pci + virtio_blk,
  # a 1 MiB pattern written to /dev/vda and read back (dom0 finds its marker in the image)
  # in dependency order (Debian 6.1: virtio.ko needs virtio_ring.ko's virtio_break_device)
  for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev; do
    insmod /lib/modules/$m.ko || echo "DOMU-WARN insmod $m failed"
  done
  # the probes in the background: a probe waiting for an interrupt that never comes must not
  # hide what the guest sees (the wait below is counted in commands, ~1 s each here)
  ( insmod /lib/modules/virtio_pci.ko && insmod /lib/modules/virtio_blk.ko; echo "DOMU-INSMOD rc=$?" ) &
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
  echo "DOMU-WAITED-VDA loops=$i"
  F=/sys/bus/pci/devices/0000:00:04.0
  [ -e $F ] && echo "DOMU-FN 00:04.0 driver=$(basename $(readlink $F/driver) 2>/dev/null) irq=$(cat $F/irq) msi_irqs=$(ls $F/msi_irqs 2>/dev/null | tr '\n' ,) enable=$(cat $F/enable) resource0=$(head -1 $F/resource)"
  for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] && echo "DOMU-VIRTIO $(basename $d) device=$(cat $d/device) vendor=$(cat $d/vendor) status=$(cat $d/status) features=$(cat $d/features) driver=$(basename $(readlink $d/driver) 2>/dev/null)"
  done
  grep -iE 'virtio|CPU0' /proc/interrupts | sed 's/^/DOMU-IRQ /'
  if [ ! -b /dev/vda ]; then
    echo "DOMU-IO-FAIL no /dev/vda"
    dmesg | grep -iE 'virtio|vda|00:04.0|msi|blk' | tail -30 | sed 's/^/DOMU-DMESG-PCI /'
    for f in /proc/*/stack; do grep -q virt "$f" 2>/dev/null && sed "s|^|DOMU-STACK $f |" "$f"; done
  else
    echo "DOMU-VDA size=$(cat /sys/block/vda/size) sectors"
    MARK="XENLAB-PATTERN-$(head -c 8 /dev/urandom | md5sum | cut -c1-16)"
    { echo "$MARK"; head -c 1048576 /dev/urandom; } | head -c 1048576 > /tmp/pat
    WANT=$(md5sum < /tmp/pat | cut -d' ' -f1)
    dd if=/tmp/pat of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null; wrc=$?
    sync; echo 3 > /proc/sys/vm/drop_caches
    GOT=$(dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    echo "DOMU-IO write_rc=$wrc want=$WANT got=$GOT mark=$MARK"
    [ "$WANT" = "$GOT" ] && [ $wrc = 0 ] && echo "DOMU-IO-OK md5=$WANT mark=$MARK" || echo "DOMU-IO-FAIL md5 mismatch"
    grep -iE 'virtio' /proc/interrupts | sed 's/^/DOMU-IRQ-AFTER /'
    # a 2-vCPU domU: I/O pinned to each vCPU at once (busybox taskset, O_DIRECT), so that each
    # vCPU's accesses reach the daemon through that vCPU's own ioreq slot and event channel
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
    # how the function's interrupts came: summed over the virtio lines of /proc/interrupts, those
    # of an MSI/MSI-X vector apart from the others (INTx)
    awk '/virtio/ { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
                    if (/[Mm][Ss][Ii]/) m += n; else x += n }
         END { printf "DOMU-IRQ-KIND msi=%d intx=%d\n", m, x }' /proc/interrupts
    # the daemon's status is read in dom0 now, while the guest still lives (bounded: 20 s)
    echo "DOMU-IO-END"; sleep 20
  fi
  dmesg | grep -iE 'virtio|vda|00:04.0|msi' | tail -30 | sed 's/^/DOMU-DMESG-PCI /'
fi
# where the kernel's time went: every gap of 2 s or more between two dmesg lines (the lines around it)
dmesg | awk '/^\[ *[0-9]+\.[0-9]+\]/ { s = $0; sub(/^\[ */, "", s); t = s + 0
  if (n++ && t - p >= 2) printf "DOMU-GAP %.1fs between: %s  ->  %s\n", t - p, q, $0; p = t; q = $0 }'
echo "DOMU-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
