#!/bin/busybox sh
# The domU's /init: probe the virtio-mmio device, show its status, do real block I/O on /dev/vda,
# then keep I/O running until dom0 destroys the domain. Every verdict line starts with DOMU-.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
echo "DOMU-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
for n in /proc/device-tree/virtio*; do
  [ -e "$n" ] && echo "DOMU-DT $(basename $n) compatible=$(tr '\0' ' ' < $n/compatible) iommus=$([ -e $n/iommus ] && echo yes || echo no)"
done
insmod /lib/modules/virtio_mmio.ko; insmod /lib/modules/virtio_blk.ko
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
  grep -E 'virtio' /proc/interrupts | sed 's/^/DOMU-IRQ /'
fi
echo "DOMU-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
# keep I/O running until dom0 destroys us (xl destroy while I/O runs)
n=0
while [ -b /dev/vda ]; do
  dd if=/dev/urandom of=/dev/vda bs=65536 seek=64 count=16 conv=fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/dev/null bs=65536 skip=64 count=16 2>/dev/null
  n=$((n+1)); echo "DOMU-LOOP $n"
done
while true; do sleep 3600; done
