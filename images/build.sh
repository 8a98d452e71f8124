#!/usr/bin/env bash
# Builds the `basalt` container image with no image registry: FROM scratch plus exactly what the binary needs.
#
#   ./images/build.sh                      cargo build --release, then docker build -t basalt:<version> -t basalt:latest
#   ./images/build.sh --tag basalt:dev     another tag (repeatable)
#   BASALT_BIN=path ./images/build.sh      use this binary instead of building one
#
# Why not a static binary: a statically linked glibc binary still dlopen()s NSS modules for getaddrinfo and then
# needs the *same* glibc's libnss_* at run time (the classic static-glibc NSS trap: host names of compose services
# or Kubernetes Services stop resolving); musl is not installed here and cannot be downloaded. So the image is the
# ordinary dynamically linked release binary plus the shared libraries `ldd` lists, the loader, the NSS modules and
# an nsswitch.conf, copied into an empty (scratch) root. ~10 files, no shell, no package manager.
#
# The staging directory (the docker build context) is printed and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

tags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tags+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "images/build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v docker >/dev/null || { echo "images/build.sh: docker is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || {
  echo "images/build.sh: the Docker engine is not reachable (start it: dockerd &, or systemctl start docker)" >&2
  exit 1
}

bin=${BASALT_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -p basalt --bin basalt
  # cargo's output directory is build/ (see .cargo/config.toml), unless CARGO_TARGET_DIR says otherwise.
  bin=${CARGO_TARGET_DIR:-build}/release/basalt
fi
[ -x "$bin" ] || { echo "images/build.sh: $bin is not an executable" >&2; exit 1; }

version=$("$bin" --version | awk '{print $2}')
[ ${#tags[@]} -gt 0 ] || tags=("basalt:$version" "basalt:latest")

stage=$(mktemp -d /tmp/basalt-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root=$stage/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$stage/data"

# The binary without its debug info (the release profile keeps line tables for backtraces on the host; the image
# does not need them).
objcopy --strip-debug "$bin" "$root/usr/local/bin/basalt"

# Every shared library the loader will map, at the path it will look for it, plus the loader itself.
copy_lib() {
  local src=$1
  mkdir -p "$root$(dirname "$src")"
  cp -L "$src" "$root$src"
}
libs=$(ldd "$bin" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}')
[ -n "$libs" ] || { echo "images/build.sh: ldd listed no libraries for $bin (is it static?)" >&2; exit 1; }
for lib in $libs; do copy_lib "$lib"; done
# getaddrinfo's NSS modules come from the same glibc as libc.so.6 (glibc >= 2.34 has files+dns built in; the
# modules are copied anyway so the image also works with an older glibc).
libdir=$(dirname "$(ldd "$bin" | awk '/libc\.so\.6 => / {print $3}')")
for nss in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
  [ -e "$libdir/$nss" ] && copy_lib "$libdir/$nss"
done

cat >"$root/etc/nsswitch.conf" <<'NSS'
# Host names: /etc/hosts (written by the container runtime), then DNS (compose / Kubernetes service names).
hosts: files dns
passwd: files
group: files
NSS
# The unprivileged user the roles run as (65532, as in distroless "nonroot").
printf 'root:x:0:0:root:/:/sbin/nologin\nbasalt:x:65532:65532:basalt:/data:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nbasalt:x:65532:\n' >"$root/etc/group"

cp images/Dockerfile "$stage/Dockerfile"
tag_args=()
for t in "${tags[@]}"; do tag_args+=(-t "$t"); done
echo "images/build.sh: building ${tags[*]} from $bin ($(echo $libs | wc -w) libraries) in $stage"
docker build --label "io.basalt.version=$version" "${tag_args[@]}" "$stage"
docker image inspect "${tags[0]}" --format 'images/build.sh: built {{.Id}} ({{.Size}} bytes)'
