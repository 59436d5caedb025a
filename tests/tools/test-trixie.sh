#!/usr/bin/env bash
# `make test` on Debian 13 (trixie), from any Debian host, as root: `make test-trixie`.
#   test-trixie.sh [PYTEST ARGUMENTS...]   (e.g. tests/test_install.py -x: only those)
#   test-trixie.sh --run COMMAND...        (COMMAND instead of make test, in the same root: to look)
#
# A trixie root made by mmdebstrap (the apt variant plus what `make test` bootstraps from: python3,
# python3-venv, make, git, ca-certificates) is cached in $XVM_TRIXIE_CACHE/root (default
# /var/cache/xvm-trixie; remove it to start from nothing). Each run clones this checkout's committed
# HEAD into <root>/src and runs `make test` there, chrooted, so that `make deps` installs the trixie
# column of tests/tools/debian-packages.tsv into the root itself (kept for the next run).
#
# The run is in its own mount, PID and cgroup namespaces: fresh /proc, /sys, cgroup2 (a cgroup of
# its own on the host, so trixie's systemd 257, which needs the unified hierarchy, sees a root of
# its own), /dev/pts (a new instance), /dev/shm, /run and /tmp; /dev's device nodes are the host's.
# Nothing is mounted on the host and nothing is left running. The real-Xen lab is left out
# (XENLAB=0): it is pinned to bookworm's Xen 4.17 and dom0 whatever the host runs, and runs on the
# host's `make test`.
# Exit status: make's (0: the suite passed on trixie); 2: the root cannot be made or entered.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${XVM_TRIXIE_CACHE:-/var/cache/xvm-trixie}
ROOT=$CACHE/root
MIRROR=${XVM_TRIXIE_MIRROR:-http://deb.debian.org/debian}
BOOTSTRAP=python3,python3-venv,make,git,ca-certificates

die() { echo "test-trixie.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, chroot, namespaces)"

if [ ! -e "$ROOT/etc/debian_version" ]; then
  command -v mmdebstrap >/dev/null || bash "$REPO/tests/tools/install-debs.sh" mmdebstrap
  mkdir -p "$CACHE"
  rm -rf "$ROOT.new"
  echo "test-trixie.sh: bootstrapping Debian 13 into $ROOT"
  mmdebstrap --quiet --variant=apt --include="$BOOTSTRAP" trixie "$ROOT.new" "$MIRROR" \
    || die "mmdebstrap trixie failed (no network to $MIRROR?)"
  mv "$ROOT.new" "$ROOT"
fi
grep -q '^VERSION_CODENAME=trixie$' "$ROOT/etc/os-release" || die "$ROOT is not a Debian 13 root"

head=$(git -C "$REPO" rev-parse HEAD)
[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] \
  || echo "test-trixie.sh: uncommitted changes in $REPO are not tested (the committed HEAD is cloned)"
rm -rf "$ROOT/src"
git clone -q --no-hardlinks "$REPO" "$ROOT/src"
git -C "$ROOT/src" checkout -q --detach "$head"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# This host's local certificate authorities (update-ca-certificates(8)), e.g. a site's TLS proxy,
# are trusted in the root too: pip reaches PyPI the way the host does.
if [ -d /usr/local/share/ca-certificates ] && \
   ! diff -rq /usr/local/share/ca-certificates "$ROOT/usr/local/share/ca-certificates" >/dev/null 2>&1; then
  rm -rf "$ROOT/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates "$ROOT/usr/local/share/ca-certificates"
  chroot "$ROOT" update-ca-certificates --fresh >/dev/null 2>&1
fi

# The cgroup that becomes the run's cgroup namespace root (cgroup2, wherever the host mounts it).
cg2=$(findmnt -n -t cgroup2 -o TARGET | head -n1)
[ -n "$cg2" ] || die "no cgroup2 hierarchy mounted on this host (trixie's systemd needs one)"
cgroup=$cg2/xvm-trixie.$$
mkdir "$cgroup"
cleanup() {
  # The namespace's PID 1 is gone, so is every process: remove the cgroups its systemd made.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "$cgroup" ] || return 0
    sleep 0.5
  done
  echo "test-trixie.sh: could not remove $cgroup" >&2
}
trap cleanup EXIT

args=""
if [ "${1:-}" = --run ]; then
  shift
  cmd=$(printf '%q ' "$@")
else
  [ $# -eq 0 ] || args=$(printf '%q ' "$@")
  cmd="make -C /src test PYTEST_ARGS=\"$args\""
fi
inner=$(cat <<EOF
set -e
mount --make-rprivate /
R=$ROOT
# The root is a mount of its own, as / is on a machine (\`mount --make-rprivate /\` in it works).
mount --bind \$R \$R
mount -t proc proc \$R/proc
mount -t sysfs sysfs \$R/sys
mount -t cgroup2 cgroup2 \$R/sys/fs/cgroup
mount --bind /dev \$R/dev
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts \$R/dev/pts
mount --bind \$R/dev/pts/ptmx \$R/dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs \$R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs \$R/run
mount -t tmpfs -o mode=1777 tmpfs \$R/tmp
exec chroot \$R /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb XENLAB=0 \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  python3 -c "\$REAPER" $cmd
EOF
)
# PID 1 of the run: starts make, reaps every orphan, exits with make's status.
REAPER='
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, _f: child.send_signal(s))
while True:
    pid, status = os.wait()
    if pid == child.pid:
        sys.exit(os.waitstatus_to_exitcode(status))
'
export REAPER
echo "test-trixie.sh: make test on $(cat "$ROOT/etc/debian_version") (trixie) at ${head:0:12}, XENLAB=0"
start=$SECONDS
rc=0
sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cgroup" \
  unshare --mount --pid --cgroup --fork --kill-child sh -c "$inner" || rc=$?
echo "test-trixie.sh: exit $rc after $((SECONDS - start)) s on Debian $(cat "$ROOT/etc/debian_version")"
exit $rc
