#!/bin/sh
# The lab, inside dom0: start the Xen toolstack, then for each scenario in $XENLAB_SCENARIOS
# create a domU whose virtio-mmio disk is served by the daemon (started as an operator would:
# xen-vhost-master --domain=NAME) and a vhost-user back-end, collect the guest's verdict, destroy the
# domU while its I/O runs, and check the teardown. Lines starting with XENLAB- are read by
# tests/xenlab/verdict.py on the host; nothing here decides pass/fail on its own.
export PATH=/usr/lib/xen-4.17/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /xenlab/lab.env
up() { cut -d' ' -f1 /proc/uptime; }
t() { echo "XENLAB-T $(up) $*"; }
check() { echo "XENLAB-CHECK $1 $2 ok=$3 ${4:-}"; }   # scenario name ok detail
prefix() { sed "s/^/$1| /"; }
ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }

mkdir -p /var/run/xen /var/run/xenstored /var/lib/xen /var/log/xen/console /var/lib/xenstored /var/lib/xen/dump /run/xen
t toolstack-start
xenstored --pid-file=/var/run/xenstored.pid; t "xenstored rc=$?"
xen-init-dom0 >/dev/null; t "xen-init-dom0 rc=$?"
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console; t "xenconsoled rc=$?"
xl info | grep -E '^(xen_version|xen_caps|nr_cpus|total_memory|free_memory)' | prefix XL-INFO
python3 -c 'import sys, uvloop, construct, xen_vhost_master, vhost_user; print("XENLAB-PYTHON", sys.version.split()[0], "uvloop", uvloop.__version__, "construct", construct.__version__)'
t python-ok

wait_for() {  # seconds command... : poll every 0.2 s
  n=$(( $1 * 5 )); shift
  while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n-1)); done
  return 1
}
console_has() { grep -q "$2" /var/log/xen/console/guest-$1.log 2>/dev/null; }
alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null; }

scenario() {
  S=$1; NAME=lab-$S; IMG=/root/disk-$S.img; MEMOPT=""
  t "scenario $S begin"
  dd if=/dev/zero of=$IMG bs=1M count=${XENLAB_DISK_MB:-16} 2>/dev/null
  cat > /etc/xen/$NAME.cfg <<EOC
name = "$NAME"
kernel = "/boot/domu-vmlinuz"
ramdisk = "/boot/domu.cpio.gz"
memory = ${XENLAB_DOMU_MB:-128}
vcpus = 1
extra = "console=hvc0 rdinit=/init loglevel=4"
disk = [ "backend=0,backendtype=standalone,specification=virtio,vdev=xvda,target=$IMG" ]
EOC
  # trace the backend directory (what libxl and the daemon write, in order) for the log
  xenstore-watch /local/domain/0/backend/virtio_disk 2>/dev/null | while read -r p tok; do
    echo "XS-TRACE[$S] $(up) $p = $(xenstore-read $p 2>&1 | head -c 60)"; done &
  XSW=$!
  # the back-end runs before the guest exists (a service of dom0, as an operator would have it);
  # the daemon is pointed at its socket (--socket)
  SOCK=/run/xenlab/$S.sock; mkdir -p /run/xenlab; rm -f $SOCK
  case $S in
    pyblk) python3 -m xen_vhost_master.xen_blk_backend --socket $SOCK --image $IMG > /tmp/backend-$S.log 2>&1 & ;;
    qsd)   MEMOPT="--memory shadow"
           qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=$IMG,cache.direct=off \
             --blockdev driver=raw,node-name=disk0,file=file0 \
             --export type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,addr.type=unix,addr.path=$SOCK \
             > /tmp/backend-$S.log 2>&1 & ;;
  esac
  BE=$!
  wait_for 30 test -S $SOCK || t "scenario $S: back-end socket $SOCK missing"
  T0=$(ms)
  xl -vvv create /etc/xen/$NAME.cfg > /tmp/xl-create-$S.log 2>&1 &
  XL=$!
  # the operator's part: once the domain exists, `xen-vhost-master --domain=NAME` (the systemd unit's line)
  if ! wait_for 30 sh -c "xl domid $NAME >/dev/null 2>&1"; then
    check $S domain-created 0 "no domain $NAME after 30 s"; cat /tmp/xl-create-$S.log | prefix "XL[$S]"; return
  fi
  D=$(xl domid $NAME)
  echo "XENLAB-DOMID $S $D"
  xen-vhost-master --domain=$NAME --socket $SOCK $MEMOPT > /tmp/daemon-$S.log 2>&1 &
  DM=$!
  t "scenario $S domain $D: back-end pid $BE, daemon pid $DM"
  wait $XL; XLRC=$?
  T1=$(ms)
  # libxl's own word that the back-end reached InitWait (devstate_callback "wanted state 2 ok")
  HS=$(grep -c "backend/virtio_disk/$D/51712/state wanted state 2 ok" /tmp/xl-create-$S.log)
  check $S xl-create $([ $XLRC = 0 ] && [ "$HS" -ge 1 ] && ! grep -qiE 'libxl: error|timed out|timeout' /tmp/xl-create-$S.log && echo 1 || echo 0) "rc=$XLRC ms=$((T1-T0)) initwait_handshake=$HS"
  grep -E 'libxl: (error|warning)|wanted state|Parsing config' /tmp/xl-create-$S.log | prefix "XL-CREATE[$S]"
  xenstore-ls -f /local/domain/0/backend/virtio_disk/$D 2>/dev/null | prefix "XENSTORE[$S]"
  if wait_for ${XENLAB_DOMU_WAIT:-120} console_has $NAME DOMU-DONE; then :; else t "scenario $S: no DOMU-DONE"; fi
  # the back-end's image in dom0 must hold what the guest wrote
  OKLINE=$(grep -m1 'DOMU-IO-OK' /var/log/xen/console/guest-$NAME.log 2>/dev/null)
  WANT=$(echo "$OKLINE" | sed -n 's/.*md5=\([0-9a-f]*\).*/\1/p'); MARK=$(echo "$OKLINE" | sed -n 's/.*mark=\([A-Za-z0-9-]*\).*/\1/p')
  HAVE=$(dd if=$IMG bs=65536 skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
  HEAD=$(dd if=$IMG bs=64 skip=16384 count=1 2>/dev/null | head -1)
  check $S image-has-pattern $([ -n "$WANT" ] && [ "$WANT" = "$HAVE" ] && [ "$HEAD" = "$MARK" ] && echo 1 || echo 0) "guest=$WANT image=$HAVE mark=$MARK image_head=$HEAD"
  xen-vhost-master status --domid $D 2>&1 | tr -d '\n ' | sed 's/^/XENLAB-STATUS '"$S"' /'; echo
  # destroy while the guest's I/O loop runs
  wait_for 30 console_has $NAME 'DOMU-LOOP 2' || t "scenario $S: guest I/O loop not seen"
  T2=$(ms)
  xl -vvv destroy $NAME > /tmp/xl-destroy-$S.log 2>&1; XDRC=$?
  T3=$(ms)
  LOOPS=$(grep -c DOMU-LOOP /var/log/xen/console/guest-$NAME.log)
  HS=$(grep -c "backend/virtio_disk/$D/51712/state wanted state 6 ok" /tmp/xl-destroy-$S.log)
  check $S xl-destroy $([ $XDRC = 0 ] && [ "$HS" -ge 1 ] && ! grep -qiE 'libxl: error|timed out|timeout' /tmp/xl-destroy-$S.log && echo 1 || echo 0) "rc=$XDRC ms=$((T3-T2)) closed_handshake=$HS guest_io_loops=$LOOPS"
  prefix "XL-DESTROY[$S]" < /tmp/xl-destroy-$S.log
  if wait_for 30 dead $DM; then wait $DM; DRC=$?; else DRC=timeout; kill -TERM $DM; sleep 2; kill -KILL $DM 2>/dev/null; fi
  check $S daemon-exit $([ "$DRC" = 0 ] && echo 1 || echo 0) "rc=$DRC"
  SID=$(sed -n 's/.*ioreq server \([0-9]*\) created.*/\1/p' /tmp/daemon-$S.log | head -1)
  # destroyed by the daemon, or by Xen with the dying domain (the daemon's destroy then gets ENOENT/ESRCH)
  GONE=$(grep -E "ioreq server $SID (destroyed|went with its domain)" /tmp/daemon-$S.log | head -1 | sed 's/.*: ioreq/ioreq/')
  check $S ioreq-server-destroyed $([ -n "$SID" ] && [ -n "$GONE" ] && echo 1 || echo 0) "id=$SID $GONE"
  # no zombie: a domain whose pages are still mapped by dom0 lingers as a dying "(null)" domain
  sleep 1
  LEFT=$(xl list | awk 'NR>1 && $2 != 0' | wc -l)
  check $S domain-gone $([ "$LEFT" = 0 ] && echo 1 || echo 0) "domains_left=$LEFT"
  xl list | prefix "XL-LIST[$S]"
  check $S backend-alive $(alive $BE && echo 1 || echo 0) "pid=$BE"
  kill -TERM $BE 2>/dev/null; wait_for 10 dead $BE || kill -KILL $BE 2>/dev/null; wait $BE 2>/dev/null
  kill $XSW 2>/dev/null
  prefix "DOMU[$S]" < /var/log/xen/console/guest-$NAME.log
  prefix "DAEMON[$S]" < /tmp/daemon-$S.log
  prefix "BACKEND[$S]" < /tmp/backend-$S.log
  t "scenario $S end"
}

for S in $XENLAB_SCENARIOS; do scenario $S; done
xl dmesg 2>/dev/null | tail -40 | prefix XEN-DMESG
echo "XENLAB-FINISHED scenarios=$(echo $XENLAB_SCENARIOS | tr ' ' ,)"
