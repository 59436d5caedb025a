#!/bin/bash
# Build (or reuse from the cache) everything the real-Xen lab boots, all from Debian packages:
#   host tools (qemu-system-arm, mmdebstrap, the arm64 cross compiler, dtc, qemu-user, ...: the `lab`
#   group of tests/tools/debian-packages.tsv, named for the host's release, Debian 12 or 13),
#   Debian's arm64 kernel, Debian's Xen 4.17 hypervisor rebuilt with CONFIG_EXPERT=y CONFIG_IOREQ_SERVER=y
#   (Debian's arm64 binary has no IOREQ server, so XEN_DMOP would return ENOSYS),
#   an arm64 dom0 userland (xl, xenstored, python3, qemu-storage-daemon), arm64 wheels for the project,
#   and the lab's own kernel (dom0, grant-based domUs): Debian's linux 6.12 source (bookworm-backports)
#   with kernel/*.patch, configured by kernel/xenlab.config over allnoconfig (privcmd ioeventfd/irqfd).
# Two Xen releases, each with the Debian release it comes from (XENLAB_XEN; the host's Debian release
# picks the default: 12 -> 4.17, 13 -> 4.20, anything else 4.17):
#   4.17: Debian 12 (bookworm): Xen 4.17 source, dom0 userland with python 3.11;
#   4.20: Debian 13 (trixie): Xen 4.20 source, dom0 userland with python 3.13 and dpdk-testpmd.
# The lab's pieces come from that Debian release whatever the host runs: a private apt state under the
# cache ($XENLAB_CACHE/apt for bookworm, $XENLAB_CACHE/apt-trixie for trixie; arm64 packages and
# sources) answers every question about them, so the host's own sources and architectures are neither
# read nor changed, and the two releases share no key, no artefact directory and no lock (the lab
# kernel excepted: one build serves both, see below).
# Xen 4.17 is built with gcc 12, the compiler bookworm builds its own xen package with (Debian 13's
# default gcc 14 stops it with -Werror=array-bounds); Xen 4.20 with gcc 14, trixie's, when the host
# has aarch64-linux-gnu-gcc-14 (Debian 13), else gcc 12 (the compiler is part of the key).
# Python files for the dom0 are byte-compiled by the dom0's own python under qemu-user, so the
# host's python version does not matter.
# Cache: ${XENLAB_CACHE:-/var/cache/xen-vhost-master-lab}/<key>/ where <key> hashes the package versions.
# XENLAB_MIRROR / XENLAB_SECURITY_MIRROR: the Debian archive used (default deb.debian.org).
# The kernel has its own cache directory, ${XENLAB_CACHE}/kernel-<key> (source version, kernel/, compiler).
# Prints "XENLAB_KERNEL=<Image>" and, on its last line, "XENLAB_ART=<dir>". Exit 3 = the lab cannot be built here, the reason on a
# line "XENLAB-CANNOT-BUILD: ..." (test_real_xen.py fails with it). Downloads are tried 3 times,
# XENLAB_RETRY_DELAY (5) and twice that seconds apart.
#   prepare.sh --plan   print what would be built (host packages, kernel, Xen source, compiler, key)
#                       and exit; builds nothing, installs nothing
# XENLAB_XEN=4.17|4.20: the Xen release (default: the host's, see above, or 4.17 when the mirror has
# no source of the host's and XENLAB_XEN_SRC is not given). XVM_OS_RELEASE=FILE reads
# FILE instead of /etc/os-release (test_prepare.py).
# XENLAB_XEN_SRC=GIT_DIR|TARBALL: build the hypervisor from this upstream Xen source instead of
# Debian's (a git repository: its newest RELEASE-<XEN>.N tag; a tarball of a source tree), for a
# mirror without Debian's source (this one answers 404 for every xen 4.20 source file).
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
DEBS=$H/../tools/install-debs.sh
C=${XENLAB_CACHE:-/var/cache/xen-vhost-master-lab}
PLAN=0; [ "${1:-}" = --plan ] && PLAN=1
mkdir -p "$C"
t0=$(date +%s); step() { echo "== xenlab [$(( $(date +%s) - t0 ))s] $*" >&2; }
cant() { echo "XENLAB-CANNOT-BUILD: $*" >&2; exit 3; }
HOST_VERSION=$(sed -n 's/^VERSION_ID=//p' "${XVM_OS_RELEASE:-/etc/os-release}" 2>/dev/null | tr -d '"' || true)
case ${XENLAB_XEN:-} in
  "") case $HOST_VERSION in 13) XV=4.20 ;; *) XV=4.17 ;; esac ;;
  4.17|4.20) XV=$XENLAB_XEN ;;
  *) cant "XENLAB_XEN=$XENLAB_XEN: use 4.17 (Debian 12's) or 4.20 (Debian 13's)" ;;
esac
if [ $XV = 4.17 ]; then
  REL=bookworm; AP=$C/apt; LOCK=$C/.lock; PYV=3.11
  XCC=aarch64-linux-gnu-gcc-12
  USERLAND=xen-utils-4.17,xenstore-utils,python3-minimal,python3,busybox-static,qemu-system-common,libc-bin
else
  REL=trixie; AP=$C/apt-trixie; LOCK=$C/.lock-trixie; PYV=3.13
  # trixie's xen package is built by its default gcc, 14; a Debian 12 host has only gcc 12's cross compiler
  XCC=aarch64-linux-gnu-gcc-14; command -v $XCC >/dev/null || XCC=aarch64-linux-gnu-gcc-12
  # Debian 13: qemu-storage-daemon is in qemu-utils. dpdk-testpmd (virtio-net's back-end) is in
  # dpdk-dev, whose headers pull a compiler: its binary alone is taken (step 4), with the libraries it
  # links (readelf -d), the vhost PMD and the ring mempool driver (plugins EAL loads) as packages
  USERLAND=xen-utils-4.20,xenstore-utils,python3-minimal,python3,busybox-static,qemu-utils,libc-bin,ibverbs-providers
  for l in ethdev eal kvargs log telemetry net mbuf mempool ring meter cmdline crypto-scheduler cryptodev rcu \
           bus-vdev reorder security bitratestats metrics bpf gro gso latencystats pdump pcapng net-bnxt bus-pci pci \
           hash net-i40e net-ixgbe bus-dpaa common-dpaax eventdev timer dmadev mempool-dpaa net-dpaa net-bond sched \
           ip-frag net-iavf common-iavf net-ice net-mlx5- common-mlx5- bus-auxiliary net-vhost vhost mempool-ring; do
    USERLAND=$USERLAND,librte-${l}25
  done
fi
# the lab kernel (dom0, grant-based domUs) is one build for both releases: gcc 12, bookworm-backports' 6.12
LKCC=aarch64-linux-gnu-gcc-12
retry() {  # 3 tries, 5 s then 10 s apart (XENLAB_RETRY_DELAY): a mirror or PyPI hiccup is not a reason to give up
  local n=1
  until "$@"; do
    [ $n -ge 3 ] && return 1
    sleep $((n * ${XENLAB_RETRY_DELAY:-5})); n=$((n + 1))
  done
}
export DEBIAN_FRONTEND=noninteractive
exec 9>"$LOCK"; flock 9    # one builder at a time per Debian release (its apt state, its artefacts)

# 0. host packages, by the host's release
if [ $PLAN = 1 ]; then
  HOST=$(bash "$DEBS" --print lab 2>&1) || cant "$HOST"
  echo "host-packages: $(echo $HOST)"
else
  out=$(bash "$DEBS" lab 2>&1) || cant "host packages for the lab: $out"
  # earlier versions of this script added a bookworm deb-src entry to the host's own sources
  rm -f /etc/apt/sources.list.d/xen-vhost-master-lab-src.sources
fi

# 1. the release's private apt state (bookworm: $C/apt, trixie: $C/apt-trixie); bookworm-backports'
# sources in both, for the lab kernel
M=${XENLAB_MIRROR:-http://deb.debian.org/debian}; MS=${XENLAB_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
mkdir -p "$AP/lists/partial" "$AP/archives/partial" "$AP/cache" "$AP/sources.list.d" "$AP/preferences.d"
touch "$AP/status"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$AP/sources.list.new" <<EOF
deb [signed-by=$KEYRING] $M $REL main
deb [signed-by=$KEYRING] $MS $REL-security main
deb-src [signed-by=$KEYRING] $M $REL main
deb-src [signed-by=$KEYRING] $MS $REL-security main
deb-src [signed-by=$KEYRING] $M bookworm-backports main
EOF
cat > "$AP/apt.conf" <<EOF
Dir::Etc::sourcelist "$AP/sources.list";
Dir::Etc::sourceparts "$AP/sources.list.d";
Dir::Etc::preferencesparts "$AP/preferences.d";
Dir::State::Lists "$AP/lists";
Dir::State::status "$AP/status";
Dir::Cache "$AP/cache";
Dir::Cache::archives "$AP/archives";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
EOF
ag() { APT_CONFIG="$AP/apt.conf" apt-get "$@"; }
ac() { APT_CONFIG="$AP/apt.conf" apt-cache "$@"; }
stale=0
cmp -s "$AP/sources.list.new" "$AP/sources.list" 2>/dev/null || { mv "$AP/sources.list.new" "$AP/sources.list"; stale=1; }
rm -f "$AP/sources.list.new"
# refreshed once a day: the kernel ABI and Xen versions move with point releases
[ -n "$(find "$AP/updated" -mmin -1440 2>/dev/null)" ] || stale=1
if [ $stale = 1 ]; then
  step "apt-get update ($REL, arm64, private lists in $AP)"
  rm -f "$AP/updated"
  retry ag update -qq --error-on=any >/dev/null 2>&1 || cant "apt-get update of $REL from $M failed 3 times (no network to the Debian mirror?)"
  touch "$AP/updated"
fi

ver() { ac policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -1; }
KPKG=$(ac depends linux-image-arm64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -1 || true)
[ -n "$KPKG" ] || cant "$REL's apt lists do not know linux-image-arm64"
XEN_SRC=$(ac showsrc xen 2>/dev/null | sed -n 's/^Version: //p' | grep "^${XV%.*}\.${XV#*.}\." | sort -Vru || true)
[ -n "$XEN_SRC" ] || cant "$REL's apt lists know no xen $XV source"
XCC_VERSION=$($XCC -dumpfullversion 2>/dev/null || echo "not installed")
LKCC_VERSION=$($LKCC -dumpfullversion 2>/dev/null || echo "not installed")
# the lab's own kernel (dom0, grant-based domUs): Debian's newest 6.12 source of bookworm-backports
# (~bpo12: trixie's own 6.12 would be another build), kernel/xenlab.config over allnoconfig; its own
# key, so a change of the fragment rebuilds only it
LK_SRC=$(ac showsrc linux 2>/dev/null | sed -n 's/^Version: //p' | grep '^6\.12\..*~bpo12' | sort -Vru || true)
[ -n "$LK_SRC" ] || cant "bookworm-backports' apt lists know no linux 6.12 source"
LK_KEY=$(cat "$H/kernel/xenlab.config" "$H/kernel/"*.patch | sha256sum | cut -c1-12)
LK_VERS="linux-src=$(echo $LK_SRC | cut -d' ' -f1) config=$LK_KEY cc=$LKCC-$LKCC_VERSION"
LK=$C/kernel-$(echo "$LK_VERS" | sha256sum | cut -c1-16)
if [ $XV = 4.17 ]; then
  VERS="$KPKG=$(ver "$KPKG") xen-hypervisor-4.17-arm64=$(ver xen-hypervisor-4.17-arm64) xen-utils-4.17=$(ver xen-utils-4.17) python3=$(ver python3) qemu-system-common=$(ver qemu-system-common) busybox-static=$(ver busybox-static) xen-src=$(echo $XEN_SRC | tr ' ' ,) cc=$XCC-$XCC_VERSION lab=3"
else
  VERS="rel=$REL $KPKG=$(ver "$KPKG") xen-utils-4.20=$(ver xen-utils-4.20) python3=$(ver python3) qemu-utils=$(ver qemu-utils) dpdk=$(ver dpdk) busybox-static=$(ver busybox-static) xen-src=$(echo $XEN_SRC | tr ' ' ,) cc=$XCC-$XCC_VERSION userland=$(echo $USERLAND | sha256sum | cut -c1-8) lab=1"
fi
XSRC=""
if [ -n "${XENLAB_XEN_SRC:-}" ]; then
  if git -C "$XENLAB_XEN_SRC" rev-parse --git-dir >/dev/null 2>&1; then
    tag=$(git -C "$XENLAB_XEN_SRC" tag -l "RELEASE-$XV.*" | sort -V | tail -1)
    [ -n "$tag" ] || cant "XENLAB_XEN_SRC=$XENLAB_XEN_SRC: no RELEASE-$XV.* tag"
    XSRC="git:$tag@$(git -C "$XENLAB_XEN_SRC" rev-parse --short=12 "$tag^{commit}")"
  elif [ -f "$XENLAB_XEN_SRC" ]; then XSRC="tar:$(sha256sum < "$XENLAB_XEN_SRC" | cut -c1-16)"
  else cant "XENLAB_XEN_SRC=$XENLAB_XEN_SRC: neither a git repository nor a tarball"
  fi
  VERS="$VERS xen-upstream=$XSRC"
fi
KEY=$(echo "$VERS" | sha256sum | cut -c1-16)
if [ $PLAN = 1 ]; then
  echo "xen: $XV"
  echo "release: $REL"
  echo "apt-state: $AP"
  echo "kernel: $KPKG"
  echo "xen-source: ${XSRC:-$(echo $XEN_SRC | cut -d' ' -f1)}"
  echo "cross-compiler: $XCC $XCC_VERSION"
  echo "lab-kernel-compiler: $LKCC $LKCC_VERSION"
  echo "dom0-python: $PYV"
  echo "lab-kernel: $LK_VERS"
  echo "lab-kernel-dir: $LK"
  echo "versions: $VERS"
  echo "key: $KEY"
  exit 0
fi
A=$C/$KEY
mkdir -p "$A"; echo "$VERS" > "$A/versions.txt"
MIRRORS=("deb $M $REL main" "deb $MS $REL-security main")

# 2. kernel (Image + modules); kernel.done lists the modules taken, so a longer list extracts again
KMODS="drivers/xen/xen-privcmd.ko drivers/xen/xen-evtchn.ko drivers/xen/xen-gntdev.ko drivers/xen/xen-gntalloc.ko \
drivers/xen/xenfs/xenfs.ko drivers/virtio/virtio_mmio.ko drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
drivers/block/virtio_blk.ko drivers/block/xen-blkback/xen-blkback.ko drivers/block/xen-blkfront.ko drivers/block/loop.ko"
[ $XV = 4.17 ] || KMODS="$KMODS net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko"   # the net scenario
if [ "$(cat "$A/kernel.done" 2>/dev/null)" != "$KMODS" ]; then
  step "arm64 kernel ($KPKG)"
  kernel() {
    rm -rf "$A/kern"
    mmdebstrap --quiet --variant=extract --arch=arm64 --include="$KPKG" $REL "$A/kern" "${MIRRORS[@]}" >/dev/null 2>&1
  }
  retry kernel || cant "mmdebstrap of $KPKG from $M failed 3 times (no network to the Debian mirror?)"
  KM=$A/kern/lib/modules; [ -d "$KM" ] || KM=$A/kern/usr/lib/modules   # Debian 13: merged /usr
  KV=$(ls "$KM" | head -1)
  cp "$A/kern/boot/vmlinuz-$KV" "$A/Image"
  mkdir -p "$A/modules"
  for m in $KMODS; do   # a module Debian builds in is simply not there (nothing to load)
    f=$KM/$KV/kernel/$m
    if [ -f "$f" ]; then cp "$f" "$A/modules/"
    elif [ -f "$f.xz" ]; then xz -dc "$f.xz" > "$A/modules/$(basename "$m")"   # Debian 13's are xz'd: busybox insmod wants them plain
    fi
  done
  grep -E '^CONFIG_(XEN_BLKDEV_BACKEND|XEN_BLKDEV_FRONTEND|BLK_DEV_LOOP)=' "$A/kern/boot/config-$KV" > "$A/kernel-blk.config" || true
  echo "$KV" > "$A/kernel-version"
  rm -rf "$A/kern"; echo "$KMODS" > "$A/kernel.done"
fi

# 3. hypervisor: Debian's xen source package (the release's main or security), rebuilt with the IOREQ server
if [ ! -f "$A/xen-ioreq" ]; then
  step "Xen $XV hypervisor from $REL's source, CONFIG_IOREQ_SERVER=y, $XCC"
  xt0=$(date +%s)
  S=$A/xen-src; rm -rf "$S"; mkdir -p "$S"; cd "$S"
  if [ -n "$XSRC" ]; then   # upstream source (XENLAB_XEN_SRC)
    mkdir xen
    case $XSRC in
      git:*) t=${XSRC#git:}; git -C "$XENLAB_XEN_SRC" archive "${t%@*}" | tar -x -C xen ;;
      tar:*) tar -xf "$XENLAB_XEN_SRC" -C xen --strip-components=1 ;;
    esac
    [ -f xen/xen/Makefile ] || cant "XENLAB_XEN_SRC=$XENLAB_XEN_SRC: no xen/Makefile in the source"
    echo "upstream $XSRC" > "$A/xen-src-version"
  else
    ok=0
    for v in $XEN_SRC; do
      if retry ag source -qq --download-only "xen=$v" >/dev/null 2>&1; then ok=1; echo "$v" > "$A/xen-src-version"; break; fi
      rm -f xen_*   # a version whose tarball is missing on the mirror: try the next
    done
    if [ $ok = 0 ] && [ -z "${XENLAB_XEN:-}" ] && [ $XV != 4.17 ]; then
      # the host's default release cannot be built from this mirror: the lab runs the other one (a
      # make test on a Debian 13 host must not fail for a source the mirror does not carry)
      cd "$C"; rm -rf "$S"
      step "no xen $XV source on $M: this host's default falls back to Xen 4.17 (XENLAB_XEN=$XV XENLAB_XEN_SRC=<upstream Xen> builds $XV)"
      exec env XENLAB_XEN=4.17 bash "$0" "$@"
    fi
    [ $ok = 1 ] || cant "apt-get source xen failed for every $XV version ($(echo $XEN_SRC | tr ' ' ,)) from $M: not on the mirror? XENLAB_XEN_SRC=<upstream Xen git repository or tarball> builds it from upstream"
    dpkg-source -x --skip-debianization "$(ls xen_$XV*.dsc | head -1)" xen >/dev/null 2>&1 || dpkg-source -x "$(ls xen_$XV*.dsc | head -1)" xen >/dev/null
  fi
  MK=(make -C xen/xen XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- CC=$XCC)
  printf 'CONFIG_DEBUG=n\nCONFIG_EXPERT=y\nCONFIG_IOREQ_SERVER=y\n' > xen/xen/.config
  "${MK[@]}" olddefconfig >"$A/xen-build.log" 2>&1 || { tail -30 "$A/xen-build.log" >&2; exit 1; }
  grep -q '^CONFIG_IOREQ_SERVER=y' xen/xen/.config || { echo "IOREQ_SERVER not enabled by olddefconfig" >&2; exit 1; }
  "${MK[@]}" -j"$(nproc)" >>"$A/xen-build.log" 2>&1 || { tail -30 "$A/xen-build.log" >&2; exit 1; }
  cp xen/xen/xen "$A/xen-ioreq.tmp"; cp xen/xen/.config "$A/xen-ioreq.config"
  cd "$A"; rm -rf "$S"; mv "$A/xen-ioreq.tmp" "$A/xen-ioreq"
  echo "$(( $(date +%s) - xt0 ))" > "$A/xen-build-seconds"
  step "Xen $XV built in $(cat "$A/xen-build-seconds") s"
fi

# 4. dom0 userland base (unpacked only: no maintainer scripts, no qemu-user second stage)
if [ ! -f "$A/rootfs.done" ]; then
  step "dom0 userland ($REL: $USERLAND)"
  R=$A/rootfs
  userland() {
    rm -rf "$R"
    mmdebstrap --quiet --variant=extract --arch=arm64 --include=$USERLAND $REL "$R" "${MIRRORS[@]}" >/dev/null 2>&1
  }
  retry userland || cant "mmdebstrap of the dom0 userland from $M failed 3 times"
  # Debian 13's packages are /usr-merged and only base-files (not unpacked here) makes the links
  for d in bin sbin lib; do [ -e "$R/$d" ] || ln -s usr/$d "$R/$d"; done
  rm -rf "$R"/usr/share/{doc,man,locale,info,bash-completion,qemu,seabios,ipxe} "$R"/usr/lib/python3*/test \
         "$R"/usr/lib/python3*/{idlelib,tkinter,lib2to3,ensurepip,pydoc_data} "$R"/var/cache/apt "$R"/var/lib/apt/lists
  find "$R" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
  rm -rf "$R"/usr/lib/aarch64-linux-gnu/gconv
  [ -x "$R/usr/bin/qemu-storage-daemon" ] || { echo "no qemu-storage-daemon in the $REL dom0 userland" >&2; exit 1; }
  if [ $XV = 4.20 ]; then   # dpdk-testpmd from dpdk-dev, without the rest of that package
    ( cd "$A" && rm -rf dpdk-dev && mkdir dpdk-dev && cd dpdk-dev && retry ag download -qq dpdk-dev >/dev/null 2>&1 \
      && dpkg-deb -x dpdk-dev_*.deb x && cp x/usr/bin/dpdk-testpmd "$R/usr/bin/" ) || cant "dpdk-dev (dpdk-testpmd) from $M failed 3 times"
    rm -rf "$A/dpdk-dev"
    missing=$(readelf -d "$R/usr/bin/dpdk-testpmd" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | while read -r l; do
      [ -e "$R/usr/lib/aarch64-linux-gnu/$l" ] || [ -e "$R/usr/lib/$l" ] || echo "$l"; done)
    [ -z "$missing" ] || { echo "dpdk-testpmd needs libraries the userland lacks: $(echo $missing)" >&2; exit 1; }
  fi
  # byte-compile the stdlib now (dpkg's py3compile never ran): python starts in ~1 s instead of
  # many under TCG, which matters for xl's 10 s back-end handshake. The dom0's own interpreter does
  # it, under qemu-user: its bytecode, whatever python the host has.
  # (python 3.13's compileall workers, started through multiprocessing's fd passing, break under
  # qemu-user: one process there)
  J=0; [ $PYV = 3.11 ] || J=1
  "$H/dom0-python.sh" "$R" -m compileall -q -j$J --invalidation-mode unchecked-hash -s "$R" -p / \
    "$R/usr/lib/python$PYV" "$R/usr/lib/python3/dist-packages" >/dev/null 2>&1 \
    || { echo "byte-compiling the dom0's python stdlib with its own python (qemu-user) failed" >&2; exit 1; }
  touch "$A/rootfs.done"
fi

# 4b. make bench-xen's fio (XENLAB_BENCH=1 only: make test's domU has none): Debian's arm64 fio and
# the shared libraries it loads (the NEEDED closure of its binary, found in its library packages and
# the dom0 userland), nothing else of those packages; $A/fio/{fio,lib/}, fio.done names the version
if [ "${XENLAB_BENCH:-0}" = 1 ] && [ "$(cat "$A/fio.done" 2>/dev/null)" != "fio=$(ver fio)" ]; then
  step "fio for the bench domU (fio=$(ver fio) and the libraries it loads)"
  F=$A/fio-debs; rm -rf "$F" "$A/fio"; mkdir -p "$F/x" "$A/fio/lib"
  # fio's dependencies that can hold a library (no interpreters, no libc: the userland has it)
  FPK=$(ac depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances fio \
        2>/dev/null | grep -E '^(fio|lib|zlib)[^ :<]*$' | grep -vE '^(libc6|libpython|libperl)' | sort -u || true)
  echo "$FPK" | grep -qx fio || cant "$REL's apt lists do not know fio (make bench-xen's guest tool)"
  (cd "$F" && retry ag download -qq $FPK >/dev/null 2>&1) || cant "apt-get download of fio and its libraries from $M failed 3 times"
  for d in "$F"/*.deb; do dpkg-deb -x "$d" "$F/x"; done
  cp "$F/x/usr/bin/fio" "$A/fio/fio"
  RL=$A/rootfs/lib/aarch64-linux-gnu; RU=$A/rootfs/usr/lib/aarch64-linux-gnu
  todo="$A/fio/fio"
  while [ -n "$todo" ]; do
    next=""
    for e in $todo; do
      for so in $(readelf -d "$e" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -e "$A/fio/lib/$so" ] && continue
        src=""; for dir in "$F/x/usr/lib/aarch64-linux-gnu" "$F/x/lib/aarch64-linux-gnu" "$RU" "$RL"; do
          [ -e "$dir/$so" ] && { src=$dir/$so; break; }; done
        [ -n "$src" ] || src=$(find "$F/x" -name "$so" | head -1)   # a private directory (RUNPATH: librados' ceph/)
        [ -n "$src" ] || { echo "fio needs $so: in none of its packages nor the dom0 userland" >&2; exit 1; }
        cp -L "$src" "$A/fio/lib/$so"; next="$next $A/fio/lib/$so"
      done
    done
    todo=$next
  done
  cp -L "$(ls "$RL/ld-linux-aarch64.so.1" "$RU/ld-linux-aarch64.so.1" 2>/dev/null | head -1)" "$A/fio/lib/"
  rm -rf "$F"; echo "fio=$(ver fio)" > "$A/fio.done"
  step "fio: $(ls "$A/fio/lib" | wc -l) libraries, $(du -sh "$A/fio" | cut -f1)"
fi

# 5. arm64 wheels of the project's dependencies (PyPI), for the dom0's python
if [ ! -f "$A/wheels.done" ]; then
  step "arm64 wheels (uvloop, construct, construct-typing)"
  rm -rf "$A/wheels"; mkdir -p "$A/wheels"
  retry python3 -m pip download -q --disable-pip-version-check --no-deps --dest "$A/wheels" \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --python-version $PYV --implementation cp \
    --only-binary=:all: 'uvloop>=0.19' 'construct==2.10.70' 'construct-typing>=0.8' 'typing-extensions' >/dev/null 2>&1 \
    || cant "pip download of the dom0's arm64 wheels failed 3 times (no network to PyPI?)"
  touch "$A/wheels.done"
fi
# 6. the lab's kernel: Debian's linux 6.12 source, the lab's minimal configuration, everything built
# in: CONFIG_XEN_PRIVCMD_EVENTFD (privcmd ioeventfd/irqfd) for dom0, CONFIG_XEN_VIRTIO_FORCE_GRANT
# for grant-based domUs (see kernel/xen-virtio-force-grant-dt.patch)
exec 8>"$C/.lock-kernel"; flock 8   # one kernel builder, whichever release asks
if [ ! -f "$LK/Image" ]; then
  step "lab kernel: linux $(echo $LK_SRC | cut -d' ' -f1) with kernel/xenlab.config, $LKCC (nice, -j$(nproc))"
  kt0=$(date +%s)
  rm -rf "$LK"; mkdir -p "$LK/src"; cd "$LK/src"
  ok=0
  for v in $LK_SRC; do
    if retry ag source -qq --download-only "linux=$v" >/dev/null 2>&1; then ok=1; echo "$v" > "$LK/linux-src-version"; break; fi
    rm -f linux_*
  done
  [ $ok = 1 ] || cant "apt-get source linux failed for every 6.12 version ($(echo $LK_SRC | tr ' ' ,))"
  dpkg-source -x "$(ls linux_6.12*.dsc | head -1)" linux >"$LK/build.log" 2>&1 || { tail -20 "$LK/build.log" >&2; exit 1; }
  for pt in "$H/kernel/"*.patch; do
    patch -d linux -p1 --forward --quiet < "$pt" >>"$LK/build.log" 2>&1 || { echo "kernel patch $pt does not apply" >&2; exit 1; }
  done
  KMK=(nice -n 10 make -C linux ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- CC=$LKCC O="$LK/src/build")
  "${KMK[@]}" KCONFIG_ALLCONFIG="$H/kernel/xenlab.config" allnoconfig >>"$LK/build.log" 2>&1 || { tail -30 "$LK/build.log" >&2; exit 1; }
  missing=$(grep -v '^#' "$H/kernel/xenlab.config" | grep . | while read -r l; do grep -qxF "$l" build/.config || echo "$l"; done)
  [ -z "$missing" ] || { echo "kernel/xenlab.config: not in the resulting .config (unmet dependencies?): $(echo $missing)" >&2; exit 1; }
  TIMEFORMAT="make: wall %R s, user %U s, sys %S s"
  { time "${KMK[@]}" -j"$(nproc)" Image >>"$LK/build.log" 2>&1; } 2>"$LK/make-time" || { tail -30 "$LK/build.log" >&2; exit 1; }
  cp build/.config "$LK/config"; cp build/include/config/kernel.release "$LK/kernel-version"
  cp build/arch/arm64/boot/Image "$LK/Image.tmp"
  cd "$C"; rm -rf "$LK/src"; mv "$LK/Image.tmp" "$LK/Image"
  echo "$(( $(date +%s) - kt0 ))" > "$LK/build-seconds"
  step "lab kernel $(cat "$LK/kernel-version") built in $(cat "$LK/build-seconds") s ($(cat "$LK/make-time"))"
fi
step "artefacts ready in $A (lab kernel $LK)"
echo "$XV" > "$A/xen-version"
echo "XENLAB_KERNEL=$LK/Image"
echo "XENLAB_XEN=$XV"
echo "XENLAB_ART=$A"
