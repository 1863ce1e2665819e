#!/usr/bin/env bash
# Installs Debian packages for the test set-up scripts: `tests/apt-install.sh PKG...`.
# Uses sudo when not root; quiet unless something fails, then says what and exits non-zero.
set -euo pipefail
[ $# -gt 0 ] || exit 0

fail() {
  echo "tests/apt-install.sh: $*" >&2
  exit 1
}

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || fail "not root and no sudo: cannot apt-get install $*"
  sudo="sudo"
fi
# One install at a time: the tests of one binary run their set-up at once, and apt-get
# refuses to run beside itself. Whoever waited finds the packages installed.
exec 9>"${TMPDIR:-/tmp}/switchyard-apt-install.lock"
flock 9 || fail "cannot take ${TMPDIR:-/tmp}/switchyard-apt-install.lock"
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -gt 0 ] || exit 0
echo "setup: installing ${missing[*]}" >&2
$sudo apt-get update -qq || fail "apt-get update failed"
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
  || fail "apt-get install ${missing[*]} failed"
