#!/usr/bin/env bash
# Where one queue-depth-1 write (or read) spends its time: a Basalt volume on 127.0.0.1, fio's libiscsi engine at
# QD1, and a tcpdump of the loopback interface split by benches/iscsi/breakdown.py into the controller's inbound
# path, the replica round trips, the controller's outbound path and fio's own turn (see benches/README.md,
# "Replicated volume", "Where a QD1 write's time goes").
#
#   benches/iscsi/breakdown.sh                      # 3 replicas, 4 KiB random writes, 6 s
#   benches/iscsi/breakdown.sh --replicas 1 --rw randread --runtime 10
#   benches/iscsi/breakdown.sh --serve-file         # the same target over a plain file (no replicas)
#   benches/iscsi/breakdown.sh --no-capture         # no tcpdump: fio's latency and each process's CPU only
#   benches/iscsi/breakdown.sh --busy-poll 0        # the volume's processes never poll (default: theirs)
#   benches/iscsi/breakdown.sh --no-capture --iodepth 32   # CPU per command at another queue depth
#
# The capture costs every loopback send a copy to tcpdump, which slows each hop: compare phases between captured
# runs, and latencies and CPU per command between --no-capture runs.
# Uses build/release/basalt (or $BASALT_BIN) as it is: build it first (benches/iscsi/run.sh does).
set -euo pipefail
cd "$(dirname "$0")/../.."

replicas=3 rw=randwrite runtime=6 serve_file=0 capture=1 poll=() iodepth=1
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas=$2; shift 2 ;;
    --rw) rw=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --serve-file) serve_file=1; shift ;;
    --no-capture) capture=0; shift ;;
    --busy-poll) poll=(--busy-poll "$2"); shift 2 ;;
    --iodepth) iodepth=$2; shift 2 ;;
    *) echo "breakdown.sh: unknown argument $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done
if [ "$iodepth" != 1 ] && [ "$capture" = 1 ]; then
  echo "breakdown.sh: the capture splits one command at a time; use --no-capture with --iodepth $iodepth" >&2
  exit 2
fi
bin=${BASALT_BIN:-${CARGO_TARGET_DIR:-$PWD/build}/release/basalt}
fio=${FIO_LIBISCSI:-/usr/local/bin/fio-libiscsi}
command -v tcpdump >/dev/null || apt-get install -y -qq tcpdump >/dev/null
for tool in "$bin" "$fio" tcpdump python3; do
  command -v "$tool" >/dev/null || { echo "breakdown.sh: $tool not found (run tests/setup.sh, build release)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/basalt-breakdown.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
[ -n "${BREAKDOWN_KEEP:-}" ] && [ "$capture" = 1 ] && trap "cp $work/capture.pcap $BREAKDOWN_KEEP; cleanup" EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "breakdown.sh: nothing listens on port $1; logs in $work" >&2; exit 1
}

export BASALT_VOLUME_SECRET=basalt-breakdown-volume-secret BASALT_API_TOKEN=basalt-breakdown-api-token
size=$((1 << 30))
iscsi=$(free_port)
replica_ports=()
if [ "$serve_file" = 1 ]; then
  truncate -s "$size" "$work/lun.img"
  "$bin" serve-file --file "$work/lun.img" --iscsi "127.0.0.1:$iscsi" --name bd "${poll[@]}" >"$work/target.log" 2>&1 &
  pids+=($!)
  roles=("target=$!")
else
  volume=$(python3 -c 'import uuid; print(uuid.uuid4())')
  args=()
  roles=()
  for i in $(seq "$replicas"); do
    port=$(free_port)
    replica_ports+=("$port")
    "$bin" replica --dir "$work/r$i" --size "$size" --listen "127.0.0.1:$port" --volume-id "$volume" \
      "${poll[@]}" >"$work/replica-$i.log" 2>&1 &
    pids+=($!)
    roles+=("replica-$i=$!")
    args+=(--replica "127.0.0.1:$port")
  done
  for port in "${replica_ports[@]}"; do wait_port "$port"; done
  "$bin" controller --name bd --size "$size" --iscsi "127.0.0.1:$iscsi" --api "127.0.0.1:$(free_port)" \
    --volume-id "$volume" "${args[@]}" "${poll[@]}" >"$work/target.log" 2>&1 &
  pids+=($!)
  roles=("controller=$!" "${roles[@]}")
fi
wait_port "$iscsi"
url="iscsi\\://127.0.0.1\\:$iscsi/iqn.2026-11.io.basalt\\:bd/0"
# Prefill the region the job uses, as the side-by-side harness does (reads then hit data, writes overwrite).
"$fio" --name=prefill --ioengine=libiscsi --filename="$url" --rw=write --bs=1M --iodepth=8 --size=256M \
  --output=/dev/null
ports=("$iscsi" "${replica_ports[@]}")
filter=$(printf 'tcp port %s or ' "${ports[@]}")
if [ "$capture" = 1 ]; then
  tcpdump -i lo -n -s 128 -B 65536 -w "$work/capture.pcap" "${filter% or }" 2>"$work/tcpdump.log" &
  tcpdump_pid=$!
  pids+=("$tcpdump_pid")
  sleep 1
fi
# Scheduler statistics of every thread of each process (/proc/PID/task/*/schedstat: ns on a CPU, ns runnable
# but waiting for one, times scheduled in), before and after the job: per command, what each process costs
# in CPU and how long it waited for a CPU, independent of how the wall clock was shared.
schedstat() {
  for role in "${roles[@]}"; do
    echo "${role%%=*} $(cat /proc/"${role#*=}"/task/*/schedstat | awk '{r+=$1; w+=$2; s+=$3} END {printf "%d %d %d", r, w, s}')"
  done
}
schedstat >"$work/sched.before"
# BREAKDOWN_PERF=DIR: also profile every process during the job (perf record -g, one file per process).
perf_pids=()
if [ -n "${BREAKDOWN_PERF:-}" ]; then
  mkdir -p "$BREAKDOWN_PERF"
  for role in "${roles[@]}"; do
    perf record -q -g -F 4999 -p "${role#*=}" -o "$BREAKDOWN_PERF/${role%%=*}.data" 2>/dev/null &
    perf_pids+=($!)
  done
fi
"$fio" --name=qd1 --ioengine=libiscsi --filename="$url" --rw="$rw" --bs=4k --iodepth="$iodepth" --size=256M \
  --time_based=1 --runtime="$runtime" --norandommap=1 --randrepeat=0 --output-format=json \
  --output="$work/fio.json"
schedstat >"$work/sched.after"
for p in "${perf_pids[@]}"; do kill -INT "$p"; wait "$p" 2>/dev/null || true; done
echo "ports (iSCSI, then replicas): ${ports[*]}"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$capture" = 1 ]; then
  sleep 0.5
  kill -INT "$tcpdump_pid"
  wait "$tcpdump_pid" 2>/dev/null || true
  python3 benches/iscsi/breakdown.py --fio "$work/fio.json" --sched "$work/sched.before" "$work/sched.after" \
    "$work/capture.pcap" "${ports[@]}"
else
  python3 benches/iscsi/breakdown.py --fio "$work/fio.json" --sched "$work/sched.before" "$work/sched.after"
fi
