#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotently, see tests/setup.sh), then runs every test
# of the workspace, unit and end-to-end (real tgt / Basalt targets driven by libiscsi, qemu and fio).
# This is the README's test command and what CI runs. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

./tests/setup.sh

# The end-to-end tests start `basalt serve-file`; build it up front so that a compile error shows here, once,
# rather than inside every end-to-end test (the tests would build it themselves otherwise).
cargo build -p basalt-engine --bin basalt

cargo test --workspace --all-targets --no-fail-fast "$@"
