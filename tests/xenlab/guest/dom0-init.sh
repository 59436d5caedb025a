#!/bin/busybox sh
# dom0's /init in the real-Xen lab: mount, load the Xen modules, run the lab, power off.
/bin/busybox --install -s /bin 2>/dev/null
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
ln -sfn /run /var/run
# Debian's kernel has them as modules; the lab's kernel (no module support) has them built in
if [ -e /proc/modules ]; then
  for m in xen-privcmd xen-evtchn xen-gntdev xen-gntalloc xenfs; do
    insmod /lib/modules/xenlab/$m.ko 2>/dev/null || echo "XENLAB-WARN insmod $m failed"
  done
fi
mkdir -p /proc/xen; mount -t xenfs xenfs /proc/xen
echo "XENLAB-DOM0-UP uptime=$(cut -d' ' -f1 /proc/uptime) caps=$(cat /proc/xen/capabilities 2>/dev/null) xen=$(cat /sys/hypervisor/version/major).$(cat /sys/hypervisor/version/minor) kernel=$(uname -r)"
/bin/sh /xenlab/dom0-test.sh
echo "XENLAB-DOM0-END uptime=$(cut -d' ' -f1 /proc/uptime)"
if grep -q xenlab_interactive /proc/cmdline; then exec setsid cttyhack sh; fi
sync
poweroff -f
