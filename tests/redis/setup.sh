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
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo: cannot apt-get install redis-server"
    sudo="sudo"
  fi
  echo "setup: installing redis-server" >&2
  $sudo apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null \
    || fail "apt-get install redis-server failed"
  # The package starts a system instance on 6379; the tests use their own.
  if command -v systemctl >/dev/null 2>&1; then $sudo systemctl stop redis-server 2>/dev/null || true; fi
fi
command -v redis-server >/dev/null 2>&1 || fail "redis-server is missing after install"
