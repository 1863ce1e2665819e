#!/usr/bin/env bash
# Installs what the DNS test needs: Debian's libnss-wrapper, which answers the proxy's host
# lookups from a hosts file the test writes (LD_PRELOAD=libnss_wrapper.so with
# NSS_WRAPPER_HOSTS), so no real DNS is asked. Skipped when already installed.
set -euo pipefail

have() { compgen -G '/usr/lib/*/libnss_wrapper.so' >/dev/null || compgen -G '/usr/lib/libnss_wrapper.so' >/dev/null; }
have || "$(dirname "$0")/../apt-install.sh" libnss-wrapper
have || { echo "tests/dns/setup.sh: libnss_wrapper.so is missing after install" >&2; exit 1; }
