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
"$(dirname "$0")/../apt-install.sh" ${missing[@]+"${missing[@]}"}
command -v h2load >/dev/null 2>&1 || fail "h2load is missing after installing nghttp2-client"
curl --version | grep -q 'HTTP2' || fail "this curl has no HTTP/2 support"
