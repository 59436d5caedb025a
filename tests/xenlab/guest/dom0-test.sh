#!/bin/sh
# The lab, inside dom0: the operator's flow and nothing else. Start the Xen toolstack, start each
# guest's back-end by the guest's name (as an operator's back-end unit would, before the guest
# exists), start the dispatcher (`xen-vhost-master watch`, as its unit would: this dom0 has no
# systemd, so `--spawn`), then `xl create` every scenario's guest at once, check their I/O, `xl
# reboot` each (a new domid: served again, I/O again), and `xl destroy` each while its I/O runs.
# Nothing here starts xen-vhost-master for a domain or touches its sockets. Lines starting with
# XENLAB- are read by tests/xenlab/verdict.py on the host; nothing here decides pass/fail.
XENBIN=$(ls -d /usr/lib/xen-4.*/bin | head -1)   # Debian's xen-utils-4.17 or -4.20
export PATH=$XENBIN:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /xenlab/lab.env
# Xen >= 4.18 has xl.cfg's generic `virtio = [...]` (libxl's backend/virtio/<domid>/<devid>, device
# ids 0, 1, ...; skip_attach: libxl does not wait for the back-end); 4.17 only the `disk = [...]` slot
# (backend/virtio_disk, device id 51712 = xvda, libxl waits 10 s for InitWait).
XEN_MINOR=$(cat /sys/hypervisor/version/minor 2>/dev/null || echo 17)
if [ "$XEN_MINOR" -ge 18 ]; then KIND=virtio; DEVID=0; else KIND=virtio_disk; DEVID=51712; fi
up() { cut -d' ' -f1 /proc/uptime; }
t() { echo "XENLAB-T $(up) $*"; }
check() { echo "XENLAB-CHECK $1 $2 ok=$3 ${4:-}"; }   # scenario name ok detail
prefix() { sed "s/^/$1| /"; }
ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
yes01() { "$@" && echo 1 || echo 0; }

mkdir -p /var/run/xen /var/run/xenstored /var/lib/xen /var/log/xen/console /var/lib/xenstored /var/lib/xen/dump /run/xen
t toolstack-start
xenstored --pid-file=/var/run/xenstored.pid; t "xenstored rc=$?"
xen-init-dom0 >/dev/null; t "xen-init-dom0 rc=$?"
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console; t "xenconsoled rc=$?"
xl info | grep -E '^(xen_version|xen_caps|nr_cpus|total_memory|free_memory)' | prefix XL-INFO
python3 -c 'import sys, uvloop, construct, xen_vhost_master, vhost_user; print("XENLAB-PYTHON", sys.version.split()[0], "uvloop", uvloop.__version__, "construct", construct.__version__)'
t python-ok

wait_for() {  # seconds command... : poll every 0.2 s (the guest and xl are other processes: no event to wait on)
  n=$(( $1 * 5 )); shift
  while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n-1)); done
  return 1
}
CONSOLE=/var/log/xen/console
console_count() { n=$(grep -c "$2" $CONSOLE/guest-$1.log 2>/dev/null); echo "${n:-0}"; }
console_has_n() { [ "$(console_count $1 "$2")" -ge "$3" ]; }
alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null; }
domid_of() { xl domid "$1" 2>/dev/null; }
new_domid() { d=$(domid_of "$1") && [ -n "$d" ] && [ "$d" != "$2" ]; }
LOGS=/var/log/xen-vhost-master
ilog() { echo "$LOGS/$1.log"; }   # the dispatcher's log of NAME's instances (every domid, appended)
ilog_has() { grep -q "$2" "$(ilog $1)" 2>/dev/null; }

# --- scenarios: the back-end, and whether the guest grants its buffers -------------------------
# pyblk, qsd: Debian's domU kernel (no CONFIG_XEN_VIRTIO: guest-physical addresses in its rings);
# grant, grantmmap: the lab's kernel (CONFIG_XEN_VIRTIO_FORCE_GRANT: grant addresses, xen_grant_dma).
# net: a virtio-net device (Xen >= 4.18's virtio = [...] only), dpdk-testpmd's net_vhost in dom0
# forwarding each frame back with its MAC, IP addresses and ports swapped (5tswap), so the guest's
# pings to a neighbour that does not exist are answered by its own kernel, through the back-end twice.
# (make bench-xen's fastpath: pyblk's back-end, the instance on the kernel fast path; its pyblk relays)
be_kind() { case $1 in pyblk|grantmmap|fastpath) echo pyblk ;; net) echo testpmd ;; *) echo qsd ;; esac; }
grants_of() { case $1 in grant|grantmmap) echo 1 ;; *) echo 0 ;; esac; }

# --- back-ends: started by guest name, before any guest exists ---------------------------------
# the daemon's default socket is /run/vhost-user/<name>/<devid>.sock (DEVID above).
backend() {  # scenario
  S=$1; NAME=${XENLAB_PREFIX:-lab}-$S; IMG=/root/disk-$S.img; DIR=/run/vhost-user/$NAME; SOCK=$DIR/$DEVID.sock
  dd if=/dev/zero of=$IMG bs=1M count=${XENLAB_DISK_MB:-16} 2>/dev/null
  mkdir -p $DIR
  # multi-queue blk: the qsd scenario's export has one queue per guest vCPU (XENLAB_QSD_QUEUES)
  Q=1; [ "$S" = qsd ] && [ "${XENLAB_BENCH:-0}" != 1 ] && Q=${XENLAB_QSD_QUEUES:-2}
  case $(be_kind $S) in
    pyblk) python3 -m xen_vhost_master.backend.blk --socket $SOCK --image $IMG > /tmp/backend-$S.log 2>&1 & ;;
    qsd)   qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=$IMG,cache.direct=off \
             --blockdev driver=raw,node-name=disk0,file=file0 \
             --export type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,num-queues=$Q,addr.type=unix,addr.path=$SOCK \
             > /tmp/backend-$S.log 2>&1 & ;;
    # no hugepages (--no-huge: IOVA as VA; the daemon's shadow rings are the shared memory), both
    # lcores on dom0's second vCPU (the forwarding one polls), testpmd listening (client=0)
    testpmd) dpdk-testpmd --no-huge -m ${XENLAB_TESTPMD_MB:-128} --lcores '0@1,1@1' --no-pci --file-prefix=$NAME \
               --vdev "net_vhost0,iface=$SOCK,client=0,queues=1" -- --total-num-mbufs=2048 --port-topology=loop \
               --forward-mode=${XENLAB_NET_FWD:-5tswap} --stats-period=10 --nb-cores=1 \
               < /dev/null > /tmp/backend-$S.log 2>&1 & ;;
  esac
  echo $! > /tmp/backend-$S.pid
  t "back-end $S pid $(cat /tmp/backend-$S.pid) on $SOCK queues=$Q"
}

cfg() {  # scenario
  S=$1; NAME=lab-$S; K=/boot/domu-vmlinuz; EXTRA=""
  if [ "$(grants_of $S)" = 1 ] && [ $KIND = virtio ]; then
    K=/boot/domu-xenlab-vmlinuz   # grant_usage=1: libxl writes it in xenstore and the guest's iommus
  elif [ "$(grants_of $S)" = 1 ]; then
    K=/boot/domu-xenlab-vmlinuz
    # Xen 4.17's libxl writes no grant_usage key for the device (4.18's virtio = [...] does): the
    # operator tells the daemon in the guest's TOML file; the discovered device takes these settings
    # (XENLAB_GRANT_TOML=0 leaves it out: the daemon serves guest RAM, which the guest refuses)
    mkdir -p /etc/xen-vhost-master
    [ "${XENLAB_GRANT_TOML:-1}" = 0 ] || printf '[[device]]\ntype = "blk"\nbase = 0x2000000\nirq = 33\ngrants = true\n' > /etc/xen-vhost-master/$NAME.toml
  fi
  cat > /etc/xen/$NAME.cfg <<EOC
name = "$NAME"
kernel = "$K"
ramdisk = "/boot/domu.cpio.gz"
memory = ${XENLAB_DOMU_MB:-128}
vcpus = ${XENLAB_DOMU_VCPUS:-2}
extra = "console=hvc0 rdinit=/init loglevel=4"
on_reboot = "restart"
EOC
  if [ $KIND = virtio_disk ]; then
    echo "disk = [ \"backend=0,backendtype=standalone,specification=virtio,vdev=xvda,target=/root/disk-$S.img\" ]" >> /etc/xen/$NAME.cfg
  else   # libxl's type is the device-tree compatible: virtio,device<id in hex> (1 net, 2 blk)
    T=device2; [ $S = net ] && T=device1 && EXTRA=xenlab_net
    echo "virtio = [ \"backend=0,type=virtio,$T,transport=mmio,grant_usage=$(grants_of $S)\" ]" >> /etc/xen/$NAME.cfg
  fi
  [ -z "$EXTRA" ] || sed -i "s/^extra = \"\(.*\)\"/extra = \"\1 $EXTRA\"/" /etc/xen/$NAME.cfg
}

create() {  # scenario: xl create in the background, rc and log in /tmp
  S=$1; NAME=lab-$S
  ( T0=$(ms); xl -vvv create /etc/xen/$NAME.cfg > /tmp/xl-create-$S.log 2>&1; echo "$? $(( $(ms) - T0 ))" > /tmp/xl-create-$S.rc ) &
}

created() {  # scenario: xl create's own verdict, libxl's InitWait handshake included
  S=$1; NAME=lab-$S
  wait_for 120 test -s /tmp/xl-create-$S.rc
  set -- $(cat /tmp/xl-create-$S.rc 2>/dev/null || echo "none 0"); XLRC=$1; MS=$2
  D=$(domid_of $NAME); echo "XENLAB-DOMID $S $D"
  HS=$(grep -c "backend/$KIND/$D/$DEVID/state wanted state 2 ok" /tmp/xl-create-$S.log)
  # >= 4.18 (skip_attach): libxl waits for nothing, so there is no handshake of its to see; the
  # device's directory must be there with the daemon's InitWait or Connected
  NEED=1; [ $KIND = virtio ] && NEED=0 && XST=$(xenstore-read /local/domain/0/backend/$KIND/$D/$DEVID/state 2>&1) && HS="n/a(skip_attach) backend_state=$XST"
  check $S xl-create $(yes01 sh -c "[ '$XLRC' = 0 ] && { [ $NEED = 0 ] || [ '$HS' -ge 1 ]; } && ! grep -qiE 'libxl: error|timed out|timeout' /tmp/xl-create-$S.log") \
    "rc=$XLRC ms=$MS domid=$D kind=$KIND initwait_handshake=$HS"
  grep -E 'libxl: (error|warning)|wanted state|Parsing config' /tmp/xl-create-$S.log | prefix "XL-CREATE[$S]"
}

served_io() {  # scenario boot-number: the guest's boot N finished its I/O; the image holds its pattern
  S=$1; N=$2; NAME=lab-$S; IMG=/root/disk-$S.img
  if ! wait_for ${XENLAB_DOMU_WAIT:-150} console_has_n $NAME DOMU-DONE $N; then
    t "scenario $S: no DOMU-DONE #$N"   # what the guest and dom0 were doing, now (the console is dumped at the end too)
    tail -40 $CONSOLE/guest-$NAME.log | tr -d '\r' | prefix "STUCK-DOMU[$S]"
    for p in $(pgrep -f "xen_vhost_master --domain=$(domid_of $NAME)( |\$)") $(cat /tmp/backend-$S.pid); do
      for tk in /proc/$p/task/*; do echo "STUCK-TASK[$S] pid=$p tid=${tk##*/} $(sed -n 's/^State:\t//p' $tk/status) wchan=$(cat $tk/wchan 2>/dev/null)"; done
    done
  fi
  if [ "$(be_kind $S)" = testpmd ]; then
    # the guest's pings answered through the back-end (DOMU-NET-OK), and testpmd counted the frames
    # it received from and sent to the guest (its port stats, every 10 s)
    # boot N's result line, OK or FAIL (counting OK lines alone, one failed boot fails every later one)
    RES=$(grep -E 'DOMU-NET-(OK|FAIL)' $CONSOLE/guest-$NAME.log 2>/dev/null | sed -n "${N}p" | tr -d '\r')
    OKLINE=$(echo "$RES" | grep 'DOMU-NET-OK')
    wait_for 30 sh -c "grep 'RX-packets: *[1-9]' /tmp/backend-$S.log | grep -q ." 
    RX=$(sed -n 's/.*RX-packets: *\([0-9]*\).*/\1/p' /tmp/backend-$S.log | tail -1)
    TX=$(sed -n 's/.*TX-packets: *\([0-9]*\).*/\1/p' /tmp/backend-$S.log | tail -1)
    [ -n "$OKLINE" ] && [ "${RX:-0}" -gt 0 ] && [ "${TX:-0}" -gt 0 ]
    R=$?; echo "guest='${RES:-no DOMU-NET result #$N}' testpmd_rx=${RX:-none} testpmd_tx=${TX:-none} fwd=${XENLAB_NET_FWD:-5tswap}" > /tmp/io-$S-$N.txt; return $R
  fi
  OKLINE=$(grep 'DOMU-IO-OK' $CONSOLE/guest-$NAME.log 2>/dev/null | sed -n "${N}p")
  WANT=$(echo "$OKLINE" | sed -n 's/.*md5=\([0-9a-f]*\).*/\1/p'); MARK=$(echo "$OKLINE" | sed -n 's/.*mark=\([A-Za-z0-9-]*\).*/\1/p')
  HAVE=$(dd if=$IMG bs=65536 skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
  HEAD=$(dd if=$IMG bs=64 skip=16384 count=1 2>/dev/null | head -1)
  [ -n "$WANT" ] && [ "$WANT" = "$HAVE" ] && [ "$HEAD" = "$MARK" ]
  R=$?; echo "guest=$WANT image=$HAVE mark=$MARK image_head=$HEAD" > /tmp/io-$S-$N.txt; return $R
}

status_line() {  # scenario: the instance's status; asked again (3 times in all) when it does not answer in
  # the CLI's 5 s, as an instance under TCG beside three busy guests did once
  for i in 1 2 3; do
    OUT=$(xen-vhost-master status --json --domain lab-$1 2>&1 | tr -d '\n ')
    case "$OUT" in '{'*) break ;; esac
  done
  echo "XENLAB-STATUS $1 $OUT"
}

instance_pid() {  # name: the pid its instance's status gives, asked 3 times as status_line does (the
  # SIGTERM step found none once beside two CPU hogs: the CLI and the instance shared dom0's
  # emulated CPUs with three guests)
  for i in 1 2 3; do
    IPID=$(xen-vhost-master status --json --domain $1 2>/dev/null | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -1)
    [ -z "$IPID" ] || break
  done
  echo "$IPID"
}

beats() {  # name cpus: each CPU's heartbeat count so far, space-separated, in the order of cpus
  for c in $2; do printf '%s ' "$(console_count $1 "DOMU-HB [0-9]* cpu=$c ")"; done
}
moved() {  # name cpus counts n: the CPUs (of cpus) whose heartbeat count grew by n or more since counts, comma-separated
  M=""; i=1
  for n in $(beats $1 "$2"); do
    b=$(echo "$3" | cut -d' ' -f$i); c=$(echo "$2" | cut -d' ' -f$i)
    [ $((n - b)) -ge $4 ] && M="$M$c,"; i=$((i+1))
  done; echo "${M%,}"
}
all_moved() { [ "$(moved "$@")" = "$(echo $2 | tr ' ' ,)" ]; }   # name cpus counts n
waiting_of() {  # name: the vCPUs its instance's status says Xen holds on an access it has not answered
  # ("?": no answer in 3 tries, as status_line)
  for i in 1 2 3; do
    OUT=$(xen-vhost-master status --json --domain $1 2>/dev/null | tr -d '\n ')
    case "$OUT" in *'"waiting":['*) echo "$OUT" | sed -n 's/.*"waiting":\[\([0-9,]*\)\].*/\1/p'; return ;; esac
  done
  echo "?"
}

term_guest() {  # scenario: SIGTERM to the guest's instance while the guest lives and does I/O, as
  # `systemctl stop xen-vhost-master@NAME` does. The operator stopped it: the instance tears down
  # (its IOREQ server destroyed, XenBus Closed), exits 0, and the dispatcher does NOT start it again
  # for that domain (an exit 0 is a stop, not a crash). The guest keeps running without its device.
  S=$1; NAME=lab-$S; D=$(domid_of $NAME); SIG=${XENLAB_TERM_SIGNAL:-TERM}
  P=$(instance_pid $NAME)
  STARTS=$(grep -c "$NAME: domain $D has [0-9]* virtio device(s): starting its instance" /tmp/watch.log)
  N=$(console_count $NAME DOMU-LOOP)
  # the guest's CPUs (a heartbeat each, domu-init.sh) beating before the stop: a CPU that stopped
  # before it (its timer: an RCU stall of Xen under TCG on a loaded host, tests/xenlab/README.md) is
  # not the stop's doing, unless the daemon holds that vCPU on an access it has not answered
  NCPU=$(sed -n 's/.*DOMU-NCPU \([0-9]*\).*/\1/p' $CONSOLE/guest-$NAME.log | tail -1)
  CPUS=$(seq 0 $((${NCPU:-1} - 1)) | tr '\n' ' '); CPUS=${CPUS% }
  B0=$(beats $NAME "$CPUS")
  wait_for 30 console_has_n $NAME DOMU-LOOP $((N + 1)) || t "scenario $S: guest I/O loop not seen"
  wait_for 20 all_moved $NAME "$CPUS" "$B0" 1
  BEFORE=$(moved $NAME "$CPUS" "$B0" 1); SILENT=""; HELD=""
  for c in $CPUS; do case ",$BEFORE," in *",$c,"*) ;; *) SILENT="$SILENT$c," ;; esac; done; SILENT=${SILENT%,}
  if [ -n "$SILENT" ]; then
    W1=$(waiting_of $NAME); sleep 2; W2=$(waiting_of $NAME)   # held in both looks: not one access in passing
    for c in $(echo $SILENT | tr , ' '); do
      case ",$W1,:,$W2," in *"?"*|*",$c,"*":"*",$c,"*) HELD="$HELD$c," ;; esac
    done; HELD=${HELD%,}
    xl vcpu-list $NAME 2>&1 | prefix "TERM-VCPUS[$S]"
    t "scenario $S: guest CPU(s) $SILENT stopped beating before the stop (rcu_stalls=$(grep -c 'rcu.*detected stalls' $CONSOLE/guest-$NAME.log)); daemon status waiting=[$W1] then [$W2]"
  fi
  T0=$(ms)
  [ -n "$P" ] && kill -$SIG $P
  wait_for 30 grep -q "instance for domain $D (pid [0-9]*) exited" /tmp/watch.log
  T1=$(ms)
  TRC=$(grep "instance for domain $D (pid [0-9]*) exited" /tmp/watch.log | tail -1 | sed -n 's/.*exited with status \(-\?[0-9]*\).*/\1/p')
  check $S term-exit $(yes01 sh -c "[ -n '$P' ] && [ '$TRC' = 0 ]") "signal=$SIG pid=${P:-none} rc=${TRC:-none} ms=$((T1-T0))"
  XS=$(xenstore-read /local/domain/0/backend/$KIND/$D/$DEVID/state 2>&1)
  LIVE=$(yes01 test -n "$(domid_of $NAME)")
  check $S term-closed $(yes01 sh -c "[ '$XS' = 6 ] && [ $LIVE = 1 ]") "backend_state=$XS domain_alive=$LIVE"
  SID=$(sed -n "s/.*dom$D: ioreq server \([0-9]*\) created.*/\1/p" "$(ilog $NAME)" | tail -1)
  GONE=$(grep -E "dom$D: ioreq server $SID destroyed" "$(ilog $NAME)" | tail -1 | sed 's/.*: ioreq/ioreq/')
  check $S term-ioreq-destroyed $(yes01 sh -c "[ -n '$SID' ] && [ -n '$GONE' ]") "id=$SID ${GONE:-no 'destroyed' line}"
  # the guest lives on: every CPU that beat before the stop goes on beating (no disk involved), no
  # panic; what its I/O does
  BCPUS=$(echo $BEFORE | tr , ' '); H=$(beats $NAME "$CPUS"); HB=$(beats $NAME "$BCPUS")
  [ -z "$BCPUS" ] || wait_for 60 all_moved $NAME "$BCPUS" "$HB" 3
  AFTER=$(moved $NAME "$CPUS" "$H" 3)
  # (its next access to the window finds no ioreq server: Xen injects a data abort, which Linux
  # reports as an oops of the accessing task; in-flight requests never complete: virtio-blk has no
  # timeout. Reported, not failed: what fails is a guest that stops or panics.)
  PANIC=$(grep -ciE 'Kernel panic' $CONSOLE/guest-$NAME.log)
  FAULTS=$(grep -ciE 'Internal error|Unhandled fault|Oops' $CONSOLE/guest-$NAME.log)
  LAST=$(grep DOMU-HB $CONSOLE/guest-$NAME.log | tail -1 | tr -d '\r')
  ERRS=$(grep -c DOMU-LOOP-ERR $CONSOLE/guest-$NAME.log)
  LOST=""; for c in $(echo $BEFORE | tr , ' '); do case ",$AFTER," in *",$c,"*) ;; *) LOST="$LOST$c," ;; esac; done
  check $S term-guest-alive $(yes01 sh -c "[ -n '$BEFORE' ] && [ -z '$LOST' ] && [ -z '$HELD' ] && [ $PANIC = 0 ]") \
    "cpus_beating_before=${BEFORE:-none} after=${AFTER:-none} stopped_before=${SILENT:-none} held_by_daemon=${HELD:-none} panics=$PANIC kernel_faults=$FAULTS io_errors=$ERRS last='$LAST'"
  grep -iE -A3 'Internal error|Unhandled fault' $CONSOLE/guest-$NAME.log | head -8 | prefix "TERM-FAULT[$S]"
  # meanwhile (>= 6 s of guest time) the dispatcher started nothing for this domain
  NOW=$(grep -c "$NAME: domain $D has [0-9]* virtio device(s): starting its instance" /tmp/watch.log)
  ALIVE=$(ps -o args 2>/dev/null | grep -c -E "[x]en_vhost_master --domain=$D( |\$)")
  check $S term-not-restarted $(yes01 sh -c "[ $NOW = $STARTS ] && [ $ALIVE = 0 ]") "starts_before=$STARTS after=$NOW instances_for_domain=$ALIVE"
  grep -E "DOMU-(HB|LOOP-ERR)" $CONSOLE/guest-$NAME.log | tail -3 | prefix "TERM[$S]"
  [ "$SIG" != STOP ] || [ -z "$P" ] || kill -CONT $P   # a hung instance (STOP) is let go for the teardown
}

reboot_guest() {  # scenario: xl reboot, a new domid, served again, I/O again
  S=$1; NAME=lab-$S; OLD=$(domid_of $NAME)
  T0=$(ms)
  xl reboot $NAME > /tmp/xl-reboot-$S.log 2>&1; RRC=$?
  wait_for 90 new_domid $NAME $OLD; NEW=$(domid_of $NAME)
  served_io $S 2; IO=$?
  T1=$(ms)
  # the old domain's instance exited 0 and a new one serves the new domid (dispatcher's word)
  wait_for 30 grep -q "instance for domain $OLD (pid [0-9]*) exited" /tmp/watch.log
  OLDEXIT=$(grep -c "instance for domain $OLD (pid [0-9]*) exited with status 0" /tmp/watch.log)
  check $S reboot-served $(yes01 sh -c "[ $RRC = 0 ] && [ -n '$NEW' ] && [ '$NEW' != '$OLD' ] && [ $IO = 0 ] && [ $OLDEXIT -ge 1 ]") \
    "rc=$RRC old=$OLD new=$NEW ms=$((T1-T0)) old_instance_exit0=$OLDEXIT $(cat /tmp/io-$S-2.txt)"
}

destroy_guest() {  # scenario: xl destroy while the guest's I/O loop runs; the teardown checks
  S=$1; NAME=lab-$S; D=$(domid_of $NAME); BE=$(cat /tmp/backend-$S.pid)
  N=$(console_count $NAME DOMU-LOOP)
  [ "$S" = "$TERM_S" ] || wait_for 30 console_has_n $NAME DOMU-LOOP $((N + 1)) || t "scenario $S: guest I/O loop not seen"
  # the device's XenBus state as libxl's Closing and the daemon's Closed come (dom0 time of each
  # watch event and what it read then: 6, or gone once libxl removed the directory after the 6)
  SP=/local/domain/0/backend/$KIND/$D/$DEVID/state
  ( xenstore-watch $SP 2>/dev/null & echo $! > /tmp/closing-watch-$S.pid; wait ) | while read -r _p _t; do
    echo "$(up) $(xenstore-read $SP 2>/dev/null || echo gone)"; done > /tmp/closing-$S.txt &
  wait_for 10 test -s /tmp/closing-$S.txt   # (the watch's first event: registered)
  T2=$(ms); DS=$(up)
  xl -vvv destroy $NAME > /tmp/xl-destroy-$S.log 2>&1; XDRC=$?
  T3=$(ms)
  wait_for 15 grep -qE ' (6|gone)$' /tmp/closing-$S.txt
  kill $(cat /tmp/closing-watch-$S.pid) 2>/dev/null
  HS=$(grep -c "backend/$KIND/$D/$DEVID/state wanted state 6 ok" /tmp/xl-destroy-$S.log)
  check $S xl-destroy $(yes01 sh -c "[ $XDRC = 0 ] && [ $HS -ge 1 ] && ! grep -qiE 'libxl: error|timed out|timeout' /tmp/xl-destroy-$S.log") \
    "rc=$XDRC ms=$((T3-T2)) domid=$D closed_handshake=$HS"
  # Closing -> Closed (or gone after it) in dom0 time; libxl gives the back-end 10 s (0: Closed
  # before the destroy, the instance stopped by SIGTERM). Each event's value is read when the
  # shell gets to it: a daemon that answers Closing first leaves no 5 to see, and the time is
  # then counted from the destroy's start (an upper bound, from=destroy).
  CL=$(awk -v ds="$DS" 'NR == 1 && $2 == 6 { printf "0 from=sigterm"; exit } $2 == 5 && !c { c = $1 }
            NR > 1 && ($2 == 6 || $2 == "gone") { printf "%d from=%s", ($1 - (c ? c : ds)) * 1000, (c ? "closing" : "destroy"); exit }' /tmp/closing-$S.txt)
  CLMS=${CL%% *}
  check $S closed-in-time $(yes01 sh -c "[ $HS -ge 1 ] && [ -n '$CLMS' ] && [ '$CLMS' -le ${XENLAB_CLOSED_MS:-10000} ]") \
    "closing_to_closed_ms=${CL:-none} limit_ms=${XENLAB_CLOSED_MS:-10000} trace=$(tr '\n' , < /tmp/closing-$S.txt | head -c 200)"
  prefix "XL-DESTROY[$S]" < /tmp/xl-destroy-$S.log
  # the instance that served domain D: exit code from the dispatcher's log
  wait_for 30 grep -q "instance for domain $D (pid [0-9]*) exited" /tmp/watch.log
  DRC=$(grep "instance for domain $D (pid [0-9]*) exited" /tmp/watch.log | tail -1 | sed -n 's/.*exited with status \(-\?[0-9]*\).*/\1/p')
  check $S daemon-exit $(yes01 test "$DRC" = 0) "rc=${DRC:-none}"
  # destroyed by the daemon, or by Xen with the dying domain (the daemon's destroy then gets ENOENT/ESRCH)
  SID=$(sed -n "s/.*dom$D: ioreq server \([0-9]*\) created.*/\1/p" "$(ilog $NAME)" | tail -1)
  GONE=$(grep -E "dom$D: ioreq server $SID (destroyed|went with its domain)" "$(ilog $NAME)" | tail -1 | sed 's/.*: ioreq/ioreq/')
  check $S ioreq-server-destroyed $(yes01 sh -c "[ -n '$SID' ] && [ -n '$GONE' ]") "id=$SID $GONE"
  check $S backend-alive $(yes01 alive $BE) "pid=$BE"
}

# --- make bench-xen (XENLAB_BENCH=1): one guest per scenario, one after the other, two disks each --
# xvda virtio through the daemon and the scenario's back-end, xvdb a Xen PV disk (the dom0 kernel's
# blkback over a loop device on a file of the same RAM-backed filesystem as the back-end's image).
# Each guest has 384 MiB (XENLAB_DOMU_MB): its initramfs carries fio and the libraries it loads (~81 MiB).
# dom0's CPU counters are read at each phase's edges (the guest idles 2 s around every phase, and
# this reader reacts to the console line within that gap): all dom0 CPUs (/proc/stat: user+nice+
# system+irq+softirq jiffies), and the instance's and the back-end's own (utime+stime).
phy_script() {  # libxl's block hotplug protocol for a phy: device (tools/hotplug/Linux/block),
  # without bash (this dom0 has none): physical-device as hex major:minor, then hotplug-status
  cat > /xenlab/block-phy <<'EOS'
#!/bin/sh
export PATH=$(ls -d /usr/lib/xen-4.*/bin | head -1):/usr/sbin:/usr/bin:/sbin:/bin
[ "$1" = add ] || exit 0
dev=$(xenstore-read "$XENBUS_PATH/params")
xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c '%t:%T' "$dev")" \
  "$XENBUS_PATH/physical-device-path" "$dev" "$XENBUS_PATH/hotplug-status" connected
EOS
  chmod +x /xenlab/block-phy
}
jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
pticks() {  # awk expression of /proc/PID/stat's fields after "(comm) " ($12 utime, $13 stime), pids: their sum
  E=$1; shift
  for p in "$@"; do [ -r /proc/$p/stat ] && sed 's/.*) //' /proc/$p/stat | awk "{print $E}"; done | awk '{s+=$1} END {print s+0}'; }
pcpu() { pticks '$12+$13' "$@"; }
psys() { pticks '$13' "$@"; }
pwake() {  # pids: the times their threads went to sleep waiting for something (each a wake-up later)
  for p in "$@"; do cat /proc/$p/task/*/status 2>/dev/null; done | awk '/^voluntary_ctxt_switches/{s+=$2} END {print s+0}'; }
bench_guest() {  # scenario
  S=$1; NAME=bench-$S; IMG=/root/disk-$S.img; PV=/root/pv-$S.img
  dd if=/dev/zero of=$PV bs=1M count=40 2>/dev/null
  LOOP=$(losetup -f); losetup $LOOP $PV
  cat > /etc/xen/$NAME.cfg <<EOC
name = "$NAME"
kernel = "/boot/domu-vmlinuz"
ramdisk = "/boot/domu.cpio.gz"
memory = ${XENLAB_DOMU_MB:-384}
vcpus = 1
extra = "console=hvc0 rdinit=/init loglevel=4 xenlab_bench"
disk = [ "backend=0,backendtype=standalone,specification=virtio,vdev=xvda,target=$IMG",
         "format=raw,vdev=xvdb,access=rw,backendtype=phy,script=/xenlab/block-phy,target=$LOOP" ]
EOC
  xl create /etc/xen/$NAME.cfg > /tmp/xl-create-$NAME.log 2>&1; echo "XENLAB-BENCH-CREATE $S rc=$? loop=$LOOP"
  wait_for 30 sh -c "xen-vhost-master status --json --domain $NAME 2>/dev/null | grep -q '\"pid\"'"
  IP=$(instance_pid $NAME)
  BP=$(cat /tmp/backend-$S.pid)
  tail -F $CONSOLE/guest-$NAME.log 2>/dev/null | while read -r l; do
    case "$l" in
      *DOMU-BENCH-BEGIN*|*DOMU-BENCH-END*)
        KT=$(ps -o pid,comm 2>/dev/null | awk '/blkback/{print $1}')
        echo "XENLAB-BENCH-CPU $S $(echo "$l" | tr -d '\r' | awk '{print $1, $2, $3}') dom0=$(jiffies) instance=$(pcpu $IP) instance_sys=$(psys $IP) instance_wake=$(pwake $IP) backend=$(pcpu $BP) backend_sys=$(psys $BP) blkback=$(pcpu $KT) hz=$(getconf CLK_TCK 2>/dev/null || echo 100)";;
      *DOMU-BENCH-DONE*) echo "XENLAB-BENCH-GUEST-DONE $S";;
    esac
  done &
  echo $! >> /tmp/tails.pid
  wait_for 1500 console_has_n $NAME DOMU-BENCH-DONE 1 || t "bench $S: no DOMU-BENCH-DONE"
  sleep 2   # the reader prints the last edge from the console (busybox tail -F polls each second)
  grep DOMU-BENCH $CONSOLE/guest-$NAME.log | tr -d '\r' | prefix "BENCH[$S]"
  xl destroy $NAME; losetup -d $LOOP 2>/dev/null
  rm -f $PV $IMG   # dom0's root is its initramfs, in RAM: room for the next scenario's disks
  prefix "DAEMON[$S]" < "$(ilog $NAME)" | grep -E "XEN_MMAP|shadow virtqueues|ioreq server|kernel fast path" | head -6
}
bench_args() {  # scenario: the instance's extra flags (pyblk: notifications relayed by the daemon even
  # on a dom0 kernel with privcmd ioeventfd/irqfd; fastpath: left to that kernel)
  case $1 in pyblk) echo --no-kernel-fast-path ;; esac
}
if [ "${XENLAB_BENCH:-0}" = 1 ]; then
  for m in loop xen-blkback; do insmod /lib/modules/xenlab/$m.ko 2>/dev/null || t "insmod $m failed"; done
  phy_script; mkdir -p $LOGS
  for S in $XENLAB_SCENARIOS; do XENLAB_PREFIX=bench XENLAB_DISK_MB=40 backend $S; done
  for S in $XENLAB_SCENARIOS; do wait_for 60 test -S /run/vhost-user/bench-$S/$DEVID.sock || t "back-end $S: no socket"; done
  for S in $XENLAB_SCENARIOS; do   # one dispatcher per guest: each scenario's instance flags
    xen-vhost-master watch --spawn --log-dir $LOGS --instance-args="$(bench_args $S)" > /tmp/watch-$S.log 2>&1 &
    WATCH=$!
    wait_for 60 grep -q "watching" /tmp/watch-$S.log || t "dispatcher: no 'watching' line"
    bench_guest $S
    kill -TERM $WATCH; wait_for 20 dead $WATCH
    cat /tmp/watch-$S.log >> /tmp/watch.log
  done
  for S in $XENLAB_SCENARIOS; do kill -TERM $(cat /tmp/backend-$S.pid) 2>/dev/null; done
  kill $(cat /tmp/tails.pid) 2>/dev/null
  prefix WATCH < /tmp/watch.log | tail -20
  echo "XENLAB-BENCH-FINISHED scenarios=$(echo $XENLAB_SCENARIOS | tr ' ' ,)"
  echo "XENLAB-FINISHED scenarios=$(echo $XENLAB_SCENARIOS | tr ' ' ,)"
  exit 0
fi

# --- the flow ----------------------------------------------------------------------------------
mkdir -p $LOGS
# dom0 first: its vCPUs run the daemon and the back-ends that every guest vCPU waits for, so when the
# host starves this emulated machine, guest vCPUs busy with I/O must not starve dom0 (xl(1)
# sched-credit2 / sched-credit: -w weight, default 256). What a dom0 serving device models is given.
xl sched-credit2 -d 0 -w 1024 >/dev/null 2>&1 || xl sched-credit -d 0 -w 1024 >/dev/null 2>&1 || true
echo "XENLAB-T $(up) dom0 weight: $(xl sched-credit2 -d 0 2>/dev/null | tail -1 || true)"
for S in $XENLAB_SCENARIOS; do backend $S; cfg $S; done
for S in $XENLAB_SCENARIOS; do wait_for 60 test -S /run/vhost-user/lab-$S/$DEVID.sock || t "back-end $S: no socket"; done
# trace the backend directory (what libxl, the dispatcher and the daemon write, in order) for the log
xenstore-watch /local/domain/0/backend/$KIND 2>/dev/null | while read -r p tok; do
  echo "XS-TRACE $(up) $p = $(xenstore-read $p 2>&1 | head -c 60)"; done &
XSW=$!
# every instance's log, as it is written (the verdict reads the DAEMON lines; a stall shows where)
for S in $XENLAB_SCENARIOS; do
  # line by line (sed's block buffering held lines back for minutes), each with dom0's time
  : > "$(ilog lab-$S)"; tail -F "$(ilog lab-$S)" 2>/dev/null | awk -v p="DAEMON[$S]" \
    '{ getline u < "/proc/uptime"; close("/proc/uptime"); split(u, a, " "); print p "@" a[1] "| " $0; fflush() }' &
  echo $! >> /tmp/tails.pid
done
# a heartbeat: dom0's load and busiest processes, so a starved or spinning dom0 shows in the log,
# and each guest console's last line, so a guest that stops making progress shows where it stopped
# (its console stays in dom0's RAM, which a lab stopped for want of checks never prints)
( while sleep 20; do echo "XENLAB-HB $(up) load=$(cut -d' ' -f1-3 /proc/loadavg)"; top -b -n1 2>/dev/null | sed -n '4,8p' | prefix XENLAB-HB-TOP
    for f in $CONSOLE/guest-*.log; do
      if [ -s "$f" ]; then echo "XENLAB-HB-GUEST $(basename "$f" .log)| $(tail -n 1 "$f" | tr -d '\r' | cut -c1-160)"; fi
    done
  done ) &
HB=$!
# the dispatcher, as xen-vhost-master-watch.service runs it (no systemd in this dom0: --spawn)
xen-vhost-master watch --spawn --log-dir $LOGS > /tmp/watch.log 2>&1 &
WATCH=$!
tail -F /tmp/watch.log 2>/dev/null | prefix "WATCH" &
echo $! >> /tmp/tails.pid
wait_for 60 grep -q "watching" /tmp/watch.log || t "dispatcher: no 'watching' line"
t "dispatcher pid $WATCH"

# every guest at once
for S in $XENLAB_SCENARIOS; do create $S; done
for S in $XENLAB_SCENARIOS; do created $S; done
ALL=1
for S in $XENLAB_SCENARIOS; do
  served_io $S 1; IO=$?
  C=image-has-pattern; [ "$(be_kind $S)" = testpmd ] && C=net-frames
  check $S $C $(yes01 test $IO = 0) "$(cat /tmp/io-$S-1.txt)"
  [ $IO = 0 ] || ALL=0
  status_line $S
done
# the guests ran at the same time, each served by its own instance
RUNNING=$(xl list | awk 'NR>1 && $2 != 0' | wc -l)
PIDS=$(for S in $XENLAB_SCENARIOS; do instance_pid lab-$S; done | sort -u | grep -c .)
for S in $XENLAB_SCENARIOS; do
  check $S second-guest $(yes01 sh -c "[ $ALL = 1 ] && [ $RUNNING -ge $(echo $XENLAB_SCENARIOS | wc -w) ]") \
    "guests_running=$RUNNING all_io_ok=$ALL instances=$PIDS"
done

RB=""; for S in $XENLAB_SCENARIOS; do reboot_guest $S & RB="$RB $!"; done   # every guest reboots at once
wait $RB
# the daemon stopped under a live guest: the last scenario's (rebooted) guest, instead of its xl
# destroy during I/O (the other scenarios keep that); xl destroy then ends the guest
TERM_S=$(echo $XENLAB_SCENARIOS | awk '{print $NF}')
term_guest $TERM_S
for S in $XENLAB_SCENARIOS; do destroy_guest $S; done

# no zombie: a domain whose pages are still mapped by dom0 lingers as a dying "(null)" domain
wait_for 10 sh -c "[ \$(xl list | awk 'NR>1 && \$2 != 0' | wc -l) = 0 ]"
LEFT=$(xl list | awk 'NR>1 && $2 != 0' | wc -l)
for S in $XENLAB_SCENARIOS; do check $S domain-gone $(yes01 test "$LEFT" = 0) "domains_left=$LEFT"; done
xl list | prefix "XL-LIST"

# the dispatcher stops cleanly and leaves nothing running
kill -TERM $WATCH; wait_for 20 dead $WATCH; wait $WATCH; WRC=$?
LEFTP=$(pgrep -f 'xen_vhost_master --domain|xen-vhost-master --domain' | wc -l)
echo "XENLAB-WATCH rc=$WRC instances_left=$LEFTP"
for S in $XENLAB_SCENARIOS; do
  BE=$(cat /tmp/backend-$S.pid); kill -TERM $BE 2>/dev/null; wait_for 10 dead $BE || kill -KILL $BE 2>/dev/null
done
kill $XSW $HB $(cat /tmp/tails.pid) 2>/dev/null
for S in $XENLAB_SCENARIOS; do
  prefix "DOMU[$S]" < $CONSOLE/guest-lab-$S.log
  prefix "BACKEND[$S]" < /tmp/backend-$S.log
done
xl dmesg 2>/dev/null | tail -40 | prefix XEN-DMESG
echo "XENLAB-FINISHED scenarios=$(echo $XENLAB_SCENARIOS | tr ' ' ,)"
