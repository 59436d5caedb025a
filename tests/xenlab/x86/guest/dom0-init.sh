#!/bin/busybox sh
# dom0's /init in the x86 scout: mount, load the Xen modules, start the toolstack, create one HVM
# domU (QEMU the primary device model, Debian's kernel by direct boot, its serial port in a file),
# relay its serial lines, destroy it, power off. Lines starting with XENLAB-X86- are read on the host.
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/usr/lib/xen-4.17/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
ln -sfn /run /var/run
up() { cut -d' ' -f1 /proc/uptime; }
t() { echo "XENLAB-X86-T $(up) $*"; }
for m in xen-privcmd xen-evtchn xen-gntdev xen-gntalloc xenfs; do
  insmod /lib/modules/xenlab/$m.ko 2>/dev/null || echo "XENLAB-X86-WARN insmod $m failed"
done
mkdir -p /proc/xen; mount -t xenfs xenfs /proc/xen
echo "XENLAB-X86-DOM0-UP uptime=$(up) caps=$(cat /proc/xen/capabilities 2>/dev/null) xen=$(cat /sys/hypervisor/version/major).$(cat /sys/hypervisor/version/minor)"
mkdir -p /var/run/xen /var/run/xenstored /var/lib/xen /var/log/xen/console /var/lib/xenstored /var/lib/xen/dump /run/xen
xenstored --pid-file=/var/run/xenstored.pid; t "xenstored rc=$?"
xen-init-dom0 >/dev/null; t "xen-init-dom0 rc=$?"
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console; t "xenconsoled rc=$?"
xl info | grep -E '^(xen_version|xen_caps|virt_caps|nr_cpus|total_memory|free_memory)' | sed 's/^/XENLAB-X86-XLINFO /'
xl dmesg | grep -iE 'svm|hvm|hap|vmx|asid|npt|nested' | sed 's/^/XENLAB-X86-XLDMESG /'
. /xenlab/lab.env
# the daemon's scenarios (issue 20): pci-<back-end>[-intx][-smp]
#   back-end pyblk: the Python RAM-disk back-end (XEN_MMAP); qsd: qemu-storage-daemon's vhost-user-blk
#   export (no XEN_MMAP: the daemon serves it through shadow virtqueues)
#   -intx: the domU's Linux without MSI (pci=nomsi): virtio_pci falls back to INTx
#   -smp: a 2-vCPU domU doing I/O pinned to each vCPU
DAEMON=0; BACKEND=; VCPUS=1
case "$XENLAB_X86_SCENARIO" in
  pci-*)
    DAEMON=1
    case "$XENLAB_X86_SCENARIO" in pci-qsd*) BACKEND=qsd ;; *) BACKEND=pyblk ;; esac
    case "$XENLAB_X86_SCENARIO" in *-intx*) XENLAB_X86_DOMU_CMDLINE="$XENLAB_X86_DOMU_CMDLINE pci=nomsi" ;; esac
    case "$XENLAB_X86_SCENARIO" in *-smp*) VCPUS=2 ;; esac ;;
esac
echo "XENLAB-X86-SCENARIO name=$XENLAB_X86_SCENARIO daemon=$DAEMON backend=$BACKEND vcpus=$VCPUS cmdline=$XENLAB_X86_DOMU_CMDLINE"
SER=/var/log/xen/domu-serial.log
# the daemon's scenarios: one more of QEMU's devices, an e1000 NIC (no network, no option ROM) in
# slot 00:06, which the daemon must not claim (its slot check, QMP query-pci)
DM_ARGS=; [ $DAEMON = 1 ] && DM_ARGS='device_model_args_hvm = [ "-device", "e1000,addr=0x6,romfile=" ]'
mkdir -p /etc/xen
cat > /etc/xen/hvm1.cfg <<CFG
name = "hvm1"
type = "hvm"
device_model_version = "qemu-xen"
device_model_override = "/usr/libexec/xen-qemu-system-i386"
memory = $XENLAB_X86_DOMU_MEM
vcpus = $VCPUS
kernel = "/boot/domu-vmlinuz"
ramdisk = "/boot/domu.cpio.gz"
cmdline = "console=ttyS0,115200 loglevel=4 $XENLAB_X86_DOMU_CMDLINE"
serial = "file:$SER"
vnc = 0
sdl = 0
vga = "none"
boot = "c"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "preserve"
$DM_ARGS
CFG
wait_for() {  # seconds command...: poll every 0.5 s
  local s=$1 n=0; shift
  while [ $n -lt $((s * 2)) ]; do "$@" && return 0; sleep 0.5; n=$((n + 1)); done; return 1
}
IMG=/root/disk.img; SOCK=/run/vhost-user/hvm1/pci.sock
if [ $DAEMON = 1 ]; then
  # issue 20: the daemon a secondary IOREQ server of the HVM domU beside QEMU, one virtio-pci
  # function (00:04.0) served by the scenario's vhost-user-blk back-end
  echo "XENLAB-X86-PY $(python3 -c 'import sys, uvloop, construct; print(sys.version.split()[0], uvloop.__version__, construct.__version__)' 2>&1)"
  dd if=/dev/zero of=$IMG bs=1M count=16 2>/dev/null; mkdir -p /run/vhost-user/hvm1
  case $BACKEND in
    pyblk) python3 -m xen_vhost_master.backend.blk --socket $SOCK --image $IMG > /tmp/backend.log 2>&1 & ;;
    qsd) echo "XENLAB-X86-QSD $(qemu-storage-daemon --version 2>&1 | head -1)"
         qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=$IMG,cache.direct=off \
           --blockdev driver=raw,node-name=disk0,file=file0 \
           --export type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,addr.type=unix,addr.path=$SOCK \
           > /tmp/backend.log 2>&1 & ;;
  esac
  BEPID=$!; t "back-end $BACKEND pid $BEPID"
  wait_for 120 test -S $SOCK && t "back-end listening" || t "back-end socket never appeared"
fi
t "xl-create-start"
T0=$(up)
CREATE="xl -v create"; [ $DAEMON = 1 ] && CREATE="xl -v create -p"
$CREATE /etc/xen/hvm1.cfg > /tmp/xl-create.log 2>&1; rc=$?
t "xl-create rc=$rc"
sed 's/^/XENLAB-X86-XLCREATE /' /tmp/xl-create.log | tail -40
xl list | sed 's/^/XENLAB-X86-XLLIST /'
DOMID=$(xl domid hvm1 2>/dev/null || echo none)
if [ $DAEMON = 1 ]; then
  # a function in the slot of QEMU's e1000 (00:06.0, device_model_args_hvm): refused in one line,
  # exit 78, before anything is claimed (the daemon asks QEMU's QMP socket, query-pci)
  xen-vhost-master serve --domid $DOMID --guest-arch x86_64 --runtime-dir /run/xvm-hvm1-conflict \
    --device type=blk,transport=pci,bdf=00:06.0,socket=$SOCK > /tmp/daemon-conflict.log 2>&1; crc=$?
  sed 's/^/XENLAB-X86-CONFLICT /' /tmp/daemon-conflict.log | tail -5
  echo "XENLAB-X86-CONFLICT-RC $crc errors=$(grep -c ERROR /tmp/daemon-conflict.log)"
  xen-vhost-master serve --domid $DOMID --guest-arch x86_64 -vv --runtime-dir /run/xvm-hvm1 \
    --device type=blk,transport=pci,bdf=00:04.0,socket=$SOCK > /tmp/daemon.log 2>&1 &
  DPID=$!; t "daemon pid $DPID"
  if wait_for 180 grep -q "serving virtio device" /tmp/daemon.log; then t "daemon serving"
  else t "daemon not serving after 180s"; fi
  sed 's/^/XENLAB-X86-DAEMON /' /tmp/daemon.log
  dsent=$(wc -l < /tmp/daemon.log)
  xl unpause hvm1; t "xl-unpause rc=$?"
  T0=$(up)
fi
# relay the guest's serial until its init has spoken (or the budget is spent)
n=0; seen=0; sent=0; STATUS_SEEN='';
while [ $n -lt $((XENLAB_X86_DOMU_WAIT * 2)) ]; do
  if [ -f $SER ]; then
    total=$(wc -l < $SER)
    if [ $total -gt $sent ]; then sed -n "$((sent + 1)),${total}p" $SER | sed 's/^/XENLAB-X86-DOMU| /'; sent=$total; fi
    if [ $seen = 0 ] && grep -q DOMU-INIT $SER; then
      seen=1; t "domu-first-userspace after=$(awk -v a=$T0 -v b=$(up) 'BEGIN{printf "%.1f", b-a}')"
    fi
    if [ $DAEMON = 1 ] && [ -z "$STATUS_SEEN" ] && grep -q 'DOMU-IO-END' $SER; then
      STATUS_SEEN=1   # the daemon's own view after all of the guest's I/O, while the guest still runs
      xen-vhost-master status --json --runtime-dir /run/xvm-hvm1 --domid $DOMID 2>&1 | tr -d '\n ' | sed 's/^/XENLAB-X86-STATUS-IO-END /'; echo
    fi
    if [ $DAEMON = 1 ]; then   # the daemon's log, live
      dtotal=$(wc -l < /tmp/daemon.log)
      if [ $dtotal -gt $dsent ]; then sed -n "$((dsent + 1)),${dtotal}p" /tmp/daemon.log | sed 's/^/XENLAB-X86-DAEMON /'; dsent=$dtotal; fi
      if [ $((n % 60)) = 59 ] && grep -q 'DOMU-PCI 0000:00:04.0' $SER; then
        xen-vhost-master status --json --runtime-dir /run/xvm-hvm1 --domid $DOMID 2>&1 | tr -d '\n ' | sed 's/^/XENLAB-X86-STATUS /'; echo
      fi
    fi
    grep -q DOMU-DONE $SER && break
  fi
  # xl is slow to start under TCG: ask xenstore (cheaper) every 5 s whether the domain still lives
  [ $((n % 10)) = 9 ] && ! xenstore-exists /local/domain/$DOMID 2>/dev/null && { t "domain hvm1 is gone"; break; }
  sleep 0.5; n=$((n + 1))
done
# the last line may still be without its newline (the guest is slow): wait a little, print it anyway
sleep 2; [ -f $SER ] && sed -n "$((sent + 1)),\$p" $SER | sed 's/^/XENLAB-X86-DOMU| /'
[ $seen = 1 ] || t "domu-first-userspace never (waited ${XENLAB_X86_DOMU_WAIT}s)"
if [ $DAEMON = 1 ]; then
  sed -n "$((dsent + 1)),\$p" /tmp/daemon.log | sed 's/^/XENLAB-X86-DAEMON /'
  tail -40 /tmp/backend.log | sed 's/^/XENLAB-X86-BACKEND /'
  MARK=$(sed -n 's/.*DOMU-IO-OK .*mark=\(XENLAB-PATTERN-[0-9a-f]*\).*/\1/p' $SER | head -1)
  # (the domU kernel's console messages may split that line, e.g. an RCU stall warning under TCG:
  # the same mark is on the line before it, with both checksums)
  [ -n "$MARK" ] || MARK=$(sed -n 's/.*DOMU-IO write_rc=0 want=\([0-9a-f]*\) got=\1 mark=\(XENLAB-PATTERN-[0-9a-f]*\).*/\2/p' $SER | head -1)
  if [ -n "$MARK" ] && dd if=$IMG bs=65536 skip=16 count=1 2>/dev/null | head -1 | grep -q "^$MARK\$"; then
    echo "XENLAB-X86-CHECK image-has-pattern ok mark=$MARK"
  else echo "XENLAB-X86-CHECK image-has-pattern FAIL mark=$MARK"; fi
fi
xl list | sed 's/^/XENLAB-X86-XLLIST /'
for f in /var/log/xen/qemu-dm-hvm1.log /var/log/xen/xl-hvm1.log; do
  [ -f $f ] && tail -20 $f | sed "s|^|XENLAB-X86-LOG $(basename $f) |"
done
xl dmesg | tail -30 | sed 's/^/XENLAB-X86-XLDMESG-END /'
# the guest powers itself off after DOMU-DONE (on_poweroff = "destroy"): give xl's own clean-up 10 s
n=0; while [ $n -lt 20 ] && xenstore-exists /local/domain/$DOMID 2>/dev/null; do sleep 0.5; n=$((n + 1)); done
if xenstore-exists /local/domain/$DOMID 2>/dev/null; then xl destroy hvm1; t "xl-destroy rc=$?"; else t "hvm1 powered itself off"; fi
if [ $DAEMON = 1 ]; then
  # the domain is gone: the daemon stops by itself (SIGTERM only if it does not)
  wait_for 60 sh -c "! kill -0 $DPID 2>/dev/null" || { t "daemon still running: SIGTERM"; kill -TERM $DPID; wait_for 60 sh -c "! kill -0 $DPID 2>/dev/null"; }
  wait $DPID; t "daemon exit rc=$?"; tail -5 /tmp/daemon.log | sed 's/^/XENLAB-X86-DAEMON-END /'
  kill -TERM $BEPID 2>/dev/null
fi
echo "XENLAB-X86-DOM0-END uptime=$(up)"
if grep -q xenlab_interactive /proc/cmdline; then exec setsid cttyhack sh; fi
sync
poweroff -f
