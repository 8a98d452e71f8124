#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotently, see tests/setup.sh), then runs every test
# of the workspace, unit and end-to-end (real tgt / Basalt targets driven by libiscsi, qemu and fio).
# This is the README's test command and what CI runs. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

./tests/setup.sh

# The end-to-end tests start `basalt serve-file`; build it up front so that a compile error shows here, once,
# rather than inside every end-to-end test (the tests would build it themselves otherwise).
cargo build -p basalt --bin basalt

status=0
cargo test --workspace --all-targets --no-fail-fast "$@" || status=$?

# Tests that need root (loop devices) are #[ignore]d, so that a run without root reports them as ignored
# instead of passing without running them. CI runs as root: there they run, and must.
if [ "$(id -u)" = 0 ]; then
    cargo test -p basalt-tests --test blockdev --no-fail-fast -- --ignored || status=$?
    cargo test -p basalt-tests --test agent_lifecycle --no-fail-fast -- --ignored \
        deleting_a_volume_wipes_its_replica_on_a_block_device_pool || status=$?
elif [ -n "${CI:-}" ]; then
    echo "tests/run.sh: CI must run as root: tests/blockdev.rs and a test of agent_lifecycle.rs need loop devices" >&2
    status=1
else
    echo "tests/run.sh: SKIPPED tests/blockdev.rs and agent_lifecycle's block-device test (need root for loop devices; run this script as root)" >&2
fi
exit "$status"
