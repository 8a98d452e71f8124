#!/usr/bin/env bash
# tgt vs Basalt over iSCSI, interleaved, with fio's libiscsi engine. One command:
#
#   benches/iscsi/run.sh                         # all jobs, 15 s each, tgt and basalt, 1 round
#   benches/iscsi/run.sh --runtime 20 --rounds 3
#   benches/iscsi/run.sh --only qd32 --targets tgt,basalt
#   benches/iscsi/run.sh --qos --runtime 15 --rounds 2  # QoS limits (2,000 IOPS, 50 MiB/s) beside no limit, 3 replicas
#
# Installs what it needs (tests/setup.sh: tgt, fio built with libiscsi), builds everything in release mode,
# prints a Markdown table (see benches/README.md, section "iSCSI"). fio's JSON goes to benches/.cache/iscsi.
set -euo pipefail
cd "$(dirname "$0")/../.."

./tests/setup.sh
cargo build --release -p basalt --bin basalt
exec cargo run --release --quiet -p basalt-tests --bin iscsi-bench -- "$@"
