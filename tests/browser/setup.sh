#!/usr/bin/env bash
# Installs what the dashboard browser test needs: Debian's Chromium (playwright never
# downloads a browser here) and playwright-core in tests/browser/node_modules. Each step is
# skipped when already done; any failure exits non-zero with a message saying what is missing.
set -euo pipefail
cd "$(dirname "$0")"

fail() {
  echo "tests/browser/setup.sh: $*" >&2
  exit 1
}

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
../apt-install.sh ${missing[@]+"${missing[@]}"}
[ -x /usr/bin/chromium ] || fail "chromium installed but /usr/bin/chromium is missing"
command -v node >/dev/null 2>&1 || fail "node is missing after install"
command -v npm >/dev/null 2>&1 || fail "npm is missing after install"

if [ ! -f node_modules/playwright-core/package.json ]; then
  echo "setup: installing playwright-core" >&2
  # The browser comes from Debian; never let playwright fetch one of its own.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund >&2 \
    || fail "npm install playwright-core failed"
fi
