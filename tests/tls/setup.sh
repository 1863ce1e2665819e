#!/usr/bin/env bash
# Installs the clients the TLS / HTTP/2 test drives the proxy with: curl (with HTTP/2) and
# h2load (Debian's nghttp2-client). Each is skipped when already there; any failure exits
# non-zero with a message saying what is missing.
set -euo pipefail

fail() {
  echo "tests/tls/setup.sh: $*" >&2
  exit 1
}

missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo: cannot apt-get install ${missing[*]}"
    sudo="sudo"
  fi
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi
command -v h2load >/dev/null 2>&1 || fail "h2load is missing after installing nghttp2-client"
curl --version | grep -q 'HTTP2' || fail "this curl has no HTTP/2 support"
