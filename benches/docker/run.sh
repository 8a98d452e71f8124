#!/usr/bin/env bash
# fio inside a container on a Basalt Docker volume (3 replicas) beside the same fio on Docker's `local` driver on
# the same disk, in one run; and the time from `docker run` to the container's first instruction with a Basalt
# volume (first mount: attach + mount) and with a local one. Figures go to benches/README.md by hand.
#
#   ./benches/docker/run.sh                 BASALT_BIN=path to use a built binary (default build/release/basalt)
#   RUNTIME=20 SIZE=1G ./benches/docker/run.sh
#
# It starts its own agent (embedded store, three pools under a temporary directory on the same disk as
# /var/lib/docker, the plugin as basalt-bench-PID) and removes everything it made on exit. The container image is
# FROM scratch with this host's fio (the libiscsi build from tests/setup.sh is a complete fio) and busybox-static.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNTIME=${RUNTIME:-20}
SIZE=${SIZE:-1G}
bin=${BASALT_BIN:-build/release/basalt}
fio=${FIO:-/usr/local/bin/fio-libiscsi}
[ -x "$bin" ] || { echo "run.sh: $bin missing: cargo build --release -p basalt, or set BASALT_BIN" >&2; exit 1; }
[ -x "$fio" ] || { echo "run.sh: $fio missing: run tests/setup.sh" >&2; exit 1; }

id=bench$$
work=$(mktemp -d /var/tmp/basalt-docker-bench.XXXXXX)
driver=basalt-$id
socket=/run/docker/plugins/$driver.sock
agent_pid=""
cleanup() {
  docker rm -f "fio-$id" >/dev/null 2>&1 || true
  docker volume rm -f "bv-$id" "lv-$id" "iv-$id" "tv-$id" "tl-$id" >/dev/null 2>&1 || true
  [ -n "${image:-}" ] && docker rmi -f "$image" >/dev/null 2>&1 || true
  if [ -n "$agent_pid" ]; then kill -TERM -- "-$agent_pid" 2>/dev/null || true; sleep 2; kill -KILL -- "-$agent_pid" 2>/dev/null || true; fi
  for m in $(awk '{print $2}' /proc/self/mounts | grep "^$work/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  for l in $(losetup -a | grep "$work/" | cut -d: -f1); do losetup -d "$l" 2>/dev/null || true; done
  rm -f "$socket"
  rm -rf "$work"
}
trap cleanup EXIT

# The image: fio and its libraries, busybox for the shell.
img=$work/image
mkdir -p "$img/root/bin"
copy() { mkdir -p "$img/root$(dirname "$1")"; cp -L "$1" "$img/root$1"; }
mkdir -p "$img/root/usr/local/bin"
cp -L "$fio" "$img/root/usr/local/bin/fio"
for lib in $(ldd "$fio" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}'); do copy "$lib"; done
cp /bin/busybox "$img/root/bin/busybox"
printf 'FROM scratch\nCOPY root/ /\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\nENV PATH=/bin:/usr/local/bin\n' >"$img/Dockerfile"
image=basalt-bench-fio:$id
docker build -q -t "$image" "$img" >/dev/null

port=$(( 21000 + RANDOM % 8000 ))
cat >"$work/agent.yaml" <<YAML
node:
  name: $id
  address: 127.0.0.1
  ports: $((port + 10))-$((port + 60))
data_dir: $work/data
pools:
  - name: p0
    path: $work/pool0
    capacity: 4G
  - name: p1
    path: $work/pool1
    capacity: 4G
  - name: p2
    path: $work/pool2
    capacity: 4G
endpoints:
  api:
    listen: 127.0.0.1:$port
  docker: $socket
runtime:
  kind: process
  binary: $(realpath "$bin")
YAML
setsid "$bin" agent --config "$work/agent.yaml" >"$work/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 1 600); do [ -S "$socket" ] && break; kill -0 "$agent_pid" 2>/dev/null || break; sleep 0.2; done
[ -S "$socket" ] || { echo "run.sh: the agent did not serve $socket; log:" >&2; cat "$work/agent.log" >&2; exit 1; }

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
docker volume create -d "$driver" -o size="$SIZE" -o replicas=3 "bv-$id" >/dev/null
docker volume create "lv-$id" >/dev/null

job() { # VOLUME NAME RW BS DEPTH → IOPS and MiB/s of the job
  docker run --rm --name "fio-$id" -v "$1:/data" "$image" fio --name="$2" --filename=/data/fio --size=256M \
    --rw="$3" --bs="$4" --iodepth="$5" --ioengine=libaio --direct=1 --runtime="$RUNTIME" --time_based \
    --output-format=json >"$work/job.json" 2>"$work/job.err" ||
    { echo "run.sh: fio in a container on $1 failed:" >&2; cat "$work/job.err" "$work/job.json" >&2; tail -20 "$work/agent.log" >&2; exit 1; }
  python3 -c 'import json,sys; t=open(sys.argv[2]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; d=j["write" if "write" in sys.argv[1] else "read"]; print("%.0f %.1f" % (d["iops"], d["bw_bytes"]/1048576))' "$3" "$work/job.json" ||
    { echo "run.sh: fio's output in a container on $1 is not its JSON:" >&2; head -c 2000 "$work/job.json" "$work/job.err" >&2; exit 1; }
}
# The third column: a volume like bv's, never mounted, driven from the host by fio's libiscsi engine: the volume
# itself, without the attach path (qemu-storage-daemon's FUSE export under a loop device) between it and fio.
docker volume create -d "$driver" -o size="$SIZE" -o replicas=3 "iv-$id" >/dev/null
url=""
for _ in $(seq 1 300); do
  url=$("$bin" volume inspect "iv-$id" --json --agent "http://127.0.0.1:$port" --agent-token-file "$work/data/api-token" 2>/dev/null |
    python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["iscsi_url"] if v.get("phase") == "ready" and v.get("iscsi_url") else "")' 2>/dev/null || true)
  [ -n "$url" ] && break
  sleep 0.5
done
[ -n "$url" ] || { echo "run.sh: volume iv-$id never became ready; agent log:" >&2; tail -20 "$work/agent.log" >&2; exit 1; }
direct() { # RW BS DEPTH → IOPS of the job on iv's LUN from the host
  "$fio" --name=direct --ioengine=libiscsi --filename="${url//:/\\:}" --size=256M --rw="$1" --bs="$2" --iodepth="$3" \
    --runtime="$RUNTIME" --time_based --output-format=json >"$work/direct.json" 2>"$work/direct.err" ||
    { echo "run.sh: fio on $url failed:" >&2; cat "$work/direct.err" "$work/direct.json" >&2; exit 1; }
  python3 -c 'import json,sys; t=open(sys.argv[2]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; d=j["write" if "write" in sys.argv[1] else "read"]; print("%.0f" % d["iops"])' "$1" "$work/direct.json" ||
    { echo "run.sh: fio's output on $url is not its JSON:" >&2; head -c 2000 "$work/direct.json" "$work/direct.err" >&2; exit 1; }
}
printf '%-22s %16s %14s %8s %22s\n' job basalt-3-replicas local ratio "same volume, libiscsi"
for spec in "randwrite 4k 16" "randread 4k 16" "write 1M 4" "read 1M 4"; do
  set -- $spec
  b=$(job "bv-$id" bench "$1" "$2" "$3")
  l=$(job "lv-$id" bench "$1" "$2" "$3")
  d=$(direct "$1" "$2" "$3")
  bi=${b%% *}; li=${l%% *}
  printf '%-22s %11s IOPS %9s IOPS %7.2f %17s IOPS\n' "$1 $2 QD$3" "$bi" "$li" \
    "$(awk -v a="$bi" -v b="$li" 'BEGIN{print (b>0)?a/b:0}')" "$d"
done

# docker run → first instruction: the container reads the kernel's uptime clock (/proc/uptime, 10 ms steps; the
# container shares the host's kernel, and busybox's date has no nanoseconds) as its first act.
first() { # VOLUME → milliseconds from the docker run to the container's first instruction
  local start end
  start=$(cut -d' ' -f1 /proc/uptime)
  end=$(docker run --rm -v "$1:/data" "$image" cat /proc/uptime 2>/dev/null | cut -d' ' -f1)
  awk -v a="$start" -v b="${end:-0}" 'BEGIN { printf "%.0f\n", (b - a) * 1000 }'
}
docker volume create -d "$driver" -o size=256M -o replicas=3 "tv-$id" >/dev/null
docker volume create "tl-$id" >/dev/null
for i in 1 2 3; do
  b=$(first "tv-$id"); sleep 3  # each run attaches and mounts afresh: the last unmount detached
  l=$(first "tl-$id")
  echo "docker run to first instruction, run $i: basalt ${b} ms, local ${l} ms"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
