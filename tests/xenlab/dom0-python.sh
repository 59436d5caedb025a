#!/bin/bash
# The lab dom0's own python (Debian 12's 3.11, arm64) run on this host under qemu-user, for work
# whose result must match that interpreter (byte-compiling: .pyc files carry its magic number).
#   dom0-python.sh ROOTFS ARGS...
set -euo pipefail
R=$1; shift
PY=$(ls "$R"/usr/bin/python3.[0-9]* 2>/dev/null | grep -E '/python3\.[0-9]+$' | head -1)
[ -n "$PY" ] || { echo "dom0-python.sh: no python3.N in $R/usr/bin" >&2; exit 1; }
exec qemu-aarch64 -L "$R" "$PY" -S "$@"
