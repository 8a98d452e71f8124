#!/usr/bin/env bash
# libiscsi's conformance suite (iscsi-test-cu --dataloss) against Basalt's serve-file and Debian's tgt, each on
# a fresh 64 MiB sparse file, counts side by side (a Markdown table for benches/README.md), then the tests
# each target fails. Takes about a minute per target.
#
#   tests/tools/conformance.sh                        # basalt and tgt, whole suite
#   tests/tools/conformance.sh --targets tgt --filter SCSI.Unmap
set -euo pipefail
cd "$(dirname "$0")/../.."

./tests/setup.sh
cargo build --release -p basalt --bin basalt
exec cargo run --release --quiet -p basalt-tests --bin conformance-report -- "$@"
