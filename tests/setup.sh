#!/usr/bin/env bash
# Installs what building Switchyard needs beyond the Rust toolchain, on Debian/Ubuntu:
# cmake (Pingora's zlib-ng build) and a C compiler (vendored Lua 5.4).
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
"$(dirname "$0")/apt-install.sh" ${missing[@]+"${missing[@]}"}
