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
dmesg | grep -iE 'xen|hvm|pvh|clocksource|virtio' | head -20 | sed 's/^/DOMU-DMESG /'
# where the kernel's time went: every gap of 2 s or more between two dmesg lines (the lines around it)
dmesg | awk '/^\[ *[0-9]+\.[0-9]+\]/ { s = $0; sub(/^\[ */, "", s); t = s + 0
  if (n++ && t - p >= 2) printf "DOMU-GAP %.1fs between: %s  ->  %s\n", t - p, q, $0; p = t; q = $0 }'
echo "DOMU-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
