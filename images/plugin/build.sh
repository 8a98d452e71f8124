#!/usr/bin/env bash
# Builds Basalt's Docker volume plugin as a *managed* plugin (`docker plugin create`), with no image registry.
#
#   ./images/plugin/build.sh                       cargo build --release, then create the plugin `basalt:latest`
#   ./images/plugin/build.sh --name basalt:dev     another plugin name
#   ./images/plugin/build.sh --dir DIR             keep the plugin directory (config.json + rootfs/) in DIR
#   BASALT_BIN=path ./images/plugin/build.sh       use this binary instead of building one
#
# What it does:
#   1. stages a FROM-scratch root filesystem: the basalt binary, and what attaching a volume on a host needs
#      (qemu-storage-daemon with qemu's iSCSI block module, losetup, mount, umount, blkid, mkfs.ext4, resize2fs,
#      mkfs.xfs/xfs_growfs where installed), each with the shared libraries ldd lists, plus the agent's config
#      (plugin.yaml, next to this script, as /etc/basalt/agent.yaml);
#   2. builds it as an image and exports that image's filesystem into DIR/rootfs (docker create + docker export:
#      the rootfs IS the image's);
#   3. writes DIR/config.json (config.json next to this script) and runs `docker plugin create NAME DIR`.
# Then: `docker plugin enable NAME` and `docker volume create -d NAME -o size=10G v1`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

name=basalt:latest
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "images/plugin/build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
docker info >/dev/null 2>&1 || { echo "images/plugin/build.sh: the Docker engine is not reachable" >&2; exit 1; }

bin=${BASALT_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -p basalt --bin basalt
  bin=${CARGO_TARGET_DIR:-build}/release/basalt
fi
[ -x "$bin" ] || { echo "images/plugin/build.sh: $bin is not an executable" >&2; exit 1; }

stage=$(mktemp -d /tmp/basalt-plugin.XXXXXX)
cleanup() { rm -rf "$stage"; }
trap cleanup EXIT
root=$stage/image/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/basalt" "$root/var/lib/basalt" "$root/run/docker/plugins" "$root/tmp"

copy() { # copy a file to the same path in the rootfs, following links
  mkdir -p "$root$(dirname "$1")"
  cp -L "$1" "$root$1"
}
copy_with_libs() { # a binary or module, and every library the loader maps for it
  copy "$1"
  for lib in $(ldd "$1" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}'); do
    [ -e "$root$lib" ] || copy "$lib"
  done
}
objcopy --strip-debug "$bin" "$root/usr/local/bin/basalt"
copy_with_libs "$bin"
rm -f "$root$bin" 2>/dev/null || true

tools=(qemu-storage-daemon losetup mount umount blkid mkfs.ext4 mke2fs resize2fs)
for opt in mkfs.xfs xfs_growfs; do command -v "$opt" >/dev/null && tools+=("$opt"); done
for t in "${tools[@]}"; do
  path=$(command -v "$t") || { echo "images/plugin/build.sh: $t is not installed (tests/setup.sh installs it)" >&2; exit 1; }
  copy_with_libs "$path"
done
qemu_iscsi=/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so
[ -e "$qemu_iscsi" ] || { echo "images/plugin/build.sh: $qemu_iscsi is missing (qemu-block-extra)" >&2; exit 1; }
copy_with_libs "$qemu_iscsi"
[ -e /etc/mke2fs.conf ] && copy /etc/mke2fs.conf
cp "$here/plugin.yaml" "$root/etc/basalt/agent.yaml"
printf 'root:x:0:0:root:/:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

cat >"$stage/image/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/usr/local/bin/basalt", "agent", "--config", "/etc/basalt/agent.yaml"]
DOCKERFILE
image="basalt-plugin-rootfs:$(echo "$name" | tr -c 'a-zA-Z0-9_.\n-' '-')"
docker build -q -t "$image" "$stage/image" >/dev/null

[ -n "$dir" ] || dir=$stage/plugin
mkdir -p "$dir/rootfs"
container=$(docker create "$image")
docker export "$container" | tar -x -C "$dir/rootfs"
docker rm "$container" >/dev/null
docker image rm "$image" >/dev/null
cp "$here/config.json" "$dir/config.json"
docker plugin create "$name" "$dir"
echo "images/plugin/build.sh: created the plugin $name (enable it with: docker plugin enable $name)"
