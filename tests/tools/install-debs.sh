#!/usr/bin/env bash
# Install the Debian packages a command needs, for this host's Debian release; silent when all are there.
#   install-debs.sh [--print] WORD...
# A WORD naming a group of tests/tools/debian-packages.tsv (test, demo, lab) stands for that group's
# packages on this release (bookworm or trixie, from VERSION_CODENAME in /etc/os-release); any other
# WORD is a Debian package name. --print lists the packages (one a line) and installs nothing.
# XVM_OS_RELEASE=FILE reads FILE instead of /etc/os-release (to check another release's choice).
# Exit 2: a release the table does not know, or an apt failure (the reason is printed).
set -euo pipefail
TABLE=$(cd "$(dirname "$0")" && pwd)/debian-packages.tsv
OS_RELEASE=${XVM_OS_RELEASE:-/etc/os-release}
print=0
[ "${1:-}" = --print ] && { print=1; shift; }

release() {
  local id="" codename="" version=""
  [ -r "$OS_RELEASE" ] || { echo "install-debs.sh: cannot read $OS_RELEASE" >&2; exit 2; }
  id=$(sed -n 's/^ID=//p' "$OS_RELEASE" | tr -d '"')
  codename=$(sed -n 's/^VERSION_CODENAME=//p' "$OS_RELEASE" | tr -d '"')
  version=$(sed -n 's/^VERSION_ID=//p' "$OS_RELEASE" | tr -d '"')
  if [ -z "$codename" ]; then
    case "$version" in 12) codename=bookworm ;; 13) codename=trixie ;; esac
  fi
  local known
  known=$(awk '$1 == "#" && $2 == "need" { for (i = 4; i < NF; i++) printf "%s ", $i }' "$TABLE")
  if [ "$id" != debian ] || [ -z "$codename" ] || ! grep -qw -- "$codename" <<<"$known"; then
    echo "install-debs.sh: ${id:-unknown} ${codename:-$version} is not a Debian release tests/tools/debian-packages.tsv knows (${known% })" >&2
    exit 2
  fi
  echo "$codename"
}

rel=""
pkgs=()
for word in "$@"; do
  if awk -v g="$word" '$1 !~ /^#/ && NF >= 5 { n = split($2, gs, ","); for (i = 1; i <= n; i++) if (gs[i] == g) found = 1 }
                      END { exit !found }' "$TABLE"; then
    [ -n "$rel" ] || rel=$(release)
    col=$(awk -v r="$rel" '$1 == "#" && $2 == "need" { for (i = 2; i <= NF; i++) if ($i == r) print i - 1 }' "$TABLE")
    while read -r p; do pkgs+=("$p"); done < <(
      awk -v g="$word" -v c="$col" '$1 !~ /^#/ && NF >= 5 { n = split($2, gs, ","); for (i = 1; i <= n; i++) if (gs[i] == g && $c != "-") print $c }' "$TABLE")
  else
    pkgs+=("$word")
  fi
done
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | awk 'NF && !seen[$0]++')
if [ $print = 1 ]; then
  printf '%s\n' "${pkgs[@]}"
  exit 0
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "install-debs.sh: apt-get update failed (no network to the Debian mirror?)" >&2; exit 2; }
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || { echo "install-debs.sh: apt-get install ${missing[*]} failed" >&2; exit 2; }
