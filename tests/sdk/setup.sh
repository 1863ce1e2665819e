#!/usr/bin/env bash
# Installs what the SDK tests (tests/sdk.rs) need, locally and only when missing:
#   - python3 with venv (Debian's python3-venv when the venv module is absent),
#   - tests/sdk/.venv with the official `openai` and `anthropic` Python SDKs from PyPI
#     (versions pinned in requirements.txt),
#   - node and npm (Debian's), and the official `openai` Node SDK in tests/sdk/node/node_modules.
# Nothing is installed globally but Debian packages. Any failure exits non-zero saying what
# is missing.
set -euo pipefail
cd "$(dirname "$0")"

fail() {
  echo "tests/sdk/setup.sh: $*" >&2
  exit 1
}

apt_install() {
  ../apt-install.sh "$@"
}

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if command -v python3 >/dev/null 2>&1; then
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
else
  missing+=(python3-venv)
fi
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || fail "python3 has no working venv module"

# The venv is (re)built when it is missing, broken, or its pinned SDKs differ.
stamp=.venv/.requirements
if ! { [ -x .venv/bin/python ] && cmp -s requirements.txt "$stamp" \
       && .venv/bin/python -c 'import openai, anthropic' >/dev/null 2>&1; }; then
  echo "setup: creating tests/sdk/.venv with the Python SDKs" >&2
  rm -rf .venv
  python3 -m venv .venv || fail "python3 -m venv failed"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2 \
    || fail "pip install -r requirements.txt failed"
  cp requirements.txt "$stamp"
fi

if [ ! -f node/node_modules/openai/package.json ]; then
  echo "setup: installing the openai Node SDK" >&2
  (cd node && npm install --no-audit --no-fund >&2) || fail "npm install openai failed"
fi
