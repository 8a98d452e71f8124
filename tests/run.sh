#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotently), then runs
# every test of the workspace. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

./tests/setup.sh libiscsi-bin

cargo test --workspace --all-targets "$@"
