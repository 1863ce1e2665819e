#!/usr/bin/env bash
# The whole test suite: installs build prerequisites, then runs every unit and integration
# test (integration tests start the real binary and real mock backends on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

tests/setup.sh
cargo build --release --bins
# Policies shipped in policies/ must pass their own tests.
target/release/switchyard check
cargo test --release
