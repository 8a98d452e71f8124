#!/usr/bin/env bash
# Rebuild and snapshot-pause figures of a 3-replica Basalt volume on 127.0.0.1. One command:
#
#   benches/rebuild/run.sh                          # fill 1 GiB of 10 GiB, full/delta/loaded rebuilds, 50 snapshots
#   benches/rebuild/run.sh --phases full,delta      # a subset
#
# Installs what it needs (tests/setup.sh: fio built with libiscsi), builds in release mode, prints a Markdown
# table (see benches/README.md, sections "Rebuild" and "Snapshot pause"). fio's output goes to
# benches/.cache/rebuild.
set -euo pipefail
cd "$(dirname "$0")/../.."

./tests/setup.sh
cargo build --release -p basalt --bin basalt
BASALT_BIN="$PWD/build/release/basalt" exec cargo run --release --quiet -p basalt-tests --bin rebuild-bench -- "$@"
