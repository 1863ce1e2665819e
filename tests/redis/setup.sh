#!/usr/bin/env bash
# Installs what the fleet test needs: Debian's redis-server (the test starts its own
# instance on a loopback port, without persistence). Skipped when already installed; a
# failure exits non-zero saying what is missing.
set -euo pipefail

fail() {
  echo "tests/redis/setup.sh: $*" >&2
  exit 1
}

if ! command -v redis-server >/dev/null 2>&1; then
  "$(dirname "$0")/../apt-install.sh" redis-server
  # The package may start a system instance on 6379; the tests start their own.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server 2>/dev/null || true; fi
fi
command -v redis-server >/dev/null 2>&1 || fail "redis-server is missing after install"
