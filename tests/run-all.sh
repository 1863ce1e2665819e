#!/usr/bin/env bash
# The whole test suite: installs build prerequisites, then runs every unit and integration
# test (integration tests start the real binary and real mock backends on 127.0.0.1; one
# of them runs `switchyard check` on every policy in policies/, another drives the
# dashboard in headless Chromium, which it installs on first use; the SDK tests install
# the official OpenAI and Anthropic SDKs into tests/sdk, the TLS test curl and h2load, the
# fleet test redis-server and the DNS test libnss-wrapper, the same way).
set -euo pipefail
cd "$(dirname "$0")/.."

tests/setup.sh
cargo test --release
