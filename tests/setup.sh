#!/usr/bin/env bash
# Installs every system tool Basalt's end-to-end tests and iSCSI benchmarks need, on Debian 12 (bookworm).
# Idempotent and fast when already done: each step checks first and does nothing if satisfied.
#
#   ./tests/setup.sh            everything (what tests/run.sh and benches/iscsi/run.sh call)
#   ./tests/setup.sh PKG...     only these extra Debian packages (kept for callers that need one tool)
#
# What and why:
#   libiscsi-bin            iscsi-test-cu (conformance), iscsi-ls, iscsi-inq
#   tgt                     Debian's user-space target: the comparison peer (tests run against it too)
#   qemu 7.2 (bookworm)     qemu-img / qemu-storage-daemon with the iSCSI block driver. The machine may carry a
#                           newer qemu-utils from backports with no matching qemu-block-extra (which holds the
#                           iSCSI driver), so all three packages are pinned to ONE bookworm version, downgrading.
#   fio + libiscsi engine   Debian's fio is built without libiscsi; we rebuild Debian's own fio source with
#                           --enable-libiscsi and install it as $FIO_LIBISCSI (not the system fio).
#   e2fsprogs, xfsprogs, util-linux, fuse3   mkfs/fsck/resize, losetup/mount, FUSE export of qemu-storage-daemon.
#   docker.io, docker-compose      the container tests; dockerd is started if not running.
#   busybox-static          the Docker plugin tests' container image (FROM scratch: no registry here).
#   etcd-server, etcd-client       the agents' cluster store on several hosts (the packaged service is stopped).
#   openssl                        a CA and certificates for the test of etcd over TLS with client certificates.
#   iproute2, iptables             hosts as network namespaces, and cutting their links (multi-host tests).
set -euo pipefail

FIO_LIBISCSI=${FIO_LIBISCSI:-/usr/local/bin/fio-libiscsi}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Several engineers (and their setups) share this machine: wait for dpkg's lock instead of failing.
APT=($SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 -y -qq)

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

updated=0
apt_update() {
  if [ $updated -eq 0 ]; then
    "${APT[@]}" update
    updated=1
  fi
}

install_missing() {
  local need=()
  for p in "$@"; do have "$p" || need+=("$p"); done
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    apt_update
    "${APT[@]}" install --no-install-recommends "${need[@]}"
  fi
}

if [ $# -gt 0 ]; then
  install_missing "$@"
  exit 0
fi

install_missing libiscsi-bin tgt e2fsprogs xfsprogs util-linux fuse3 libiscsi-dev libaio-dev zlib1g-dev \
  dpkg-dev build-essential pkg-config busybox-static

# --- qemu 7.2 with the iSCSI driver -------------------------------------------------------------------------
qemu_pkgs=(qemu-utils qemu-block-extra qemu-system-common)
qemu_ok=1
for p in "${qemu_pkgs[@]}"; do
  case "$(version_of "$p")" in 1:7.2*) ;; *) qemu_ok=0 ;; esac
done
if [ $qemu_ok -eq 0 ]; then
  apt_update
  # The newest 7.2 build that every one of the three packages has (bookworm or bookworm-security).
  qv=$(apt-cache madison qemu-block-extra | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep '^1:7\.2' |
    while read -r v; do
      ok=1
      for p in "${qemu_pkgs[@]}"; do
        apt-cache madison "$p" | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$v" || ok=0
      done
      [ $ok -eq 1 ] && echo "$v"
    done | sort -V | tail -1)
  if [ -z "$qv" ]; then
    echo "setup: no qemu 7.2 version found in apt for ${qemu_pkgs[*]}; is the bookworm archive in apt sources?" >&2
    exit 1
  fi
  echo "setup: installing qemu $qv (${qemu_pkgs[*]})"
  "${APT[@]}" install --no-install-recommends --allow-downgrades \
    "${qemu_pkgs[@]/%/=$qv}"
fi

# --- fio with the libiscsi engine -----------------------------------------------------------------------------
fio_has_libiscsi() { [ -x "$FIO_LIBISCSI" ] && "$FIO_LIBISCSI" --enghelp=libiscsi >/dev/null 2>&1; }
if ! fio_has_libiscsi; then
  # Debian's source package, so the fio we measure with is the distribution's version and patches.
  # deb-src entries are derived from the machine's own deb822 sources (same archives, same suites).
  if ! apt-cache showsrc fio >/dev/null 2>&1 || [ -z "$(apt-cache showsrc fio 2>/dev/null)" ]; then
    src_list=/etc/apt/sources.list.d/basalt-deb-src.sources
    if [ ! -f "$src_list" ]; then
      echo "setup: enabling deb-src ($src_list)"
      sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | $SUDO tee "$src_list" >/dev/null
    fi
    updated=0
    apt_update
  fi
  work=$(mktemp -d /tmp/basalt-fio-build.XXXXXX)
  # apt-get source downloads as the unprivileged _apt user when it can write to the directory.
  if id _apt >/dev/null 2>&1; then $SUDO chown _apt "$work"; fi
  trap 'rm -rf "$work"' EXIT
  echo "setup: building fio with --enable-libiscsi in $work"
  (
    cd "$work"
    apt-get source -qq fio >/dev/null
    cd fio-*/
    ./configure --enable-libiscsi >configure.log 2>&1 || { cat configure.log >&2; exit 1; }
    grep -q '^CONFIG_LIBISCSI=y' config-host.mak || {
      echo "setup: fio's configure did not enable libiscsi (is libiscsi-dev installed?)" >&2
      cat configure.log >&2
      exit 1
    }
    make -j"$(nproc)" fio >make.log 2>&1 || { tail -50 make.log >&2; exit 1; }
    $SUDO install -m 0755 fio "$FIO_LIBISCSI"
  )
  fio_has_libiscsi || { echo "setup: $FIO_LIBISCSI was built but has no libiscsi engine" >&2; exit 1; }
fi

# --- Docker engine, for tests/containers.rs (images and a volume as containers) -----------------------------
install_missing docker.io docker-compose
if ! docker info >/dev/null 2>&1; then
  # No init system runs services here (CI included): start the daemon ourselves, on its unix socket only.
  echo "setup: starting dockerd (log: /var/log/basalt-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/var/log/basalt-dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/basalt-dockerd.log" >&2; exit 1; }
fi
# dockerd keeps every legacy volume plugin it has used until it restarts (tests/docker_plugin.rs serves one per
# test); once a plugin's socket is gone, every volume lookup retries it for ~15 s, and docker-compose's requests
# time out (tests/containers.rs). A dockerd in that state is restarted before the tests: its log names the dead
# plugins, and `docker volume ls` takes seconds instead of milliseconds.
lookup_start=$(date +%s)
docker volume ls >/dev/null 2>&1 || true
if [ $(( $(date +%s) - lookup_start )) -ge 5 ]; then
  echo "setup: dockerd answers volume lookups slowly (legacy volume plugins whose sockets are gone): restarting it"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] && systemctl is-active --quiet docker; then
    $SUDO systemctl restart docker
  else
    $SUDO pkill -TERM -x dockerd || true
    for _ in $(seq 1 60); do pgrep -x dockerd >/dev/null || break; sleep 0.5; done
    $SUDO sh -c 'nohup dockerd >/var/log/basalt-dockerd.log 2>&1 &'
  fi
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not restart; see /var/log/basalt-dockerd.log" >&2; exit 1; }
fi

# --- etcd 3.4, the agents' shared cluster store (agent/tests/store_contract.rs, tests/agent_multihost.rs) --------
# iproute2 and iptables: the multi-host tests make their hosts as network namespaces and cut their links.
install_missing etcd-server etcd-client iproute2 iptables openssl
# The package runs a member as a service on the default ports; the tests start their own members on free ports
# with their own data directories, so the packaged one is stopped and kept from starting at boot.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  if systemctl is-enabled --quiet etcd 2>/dev/null || systemctl is-active --quiet etcd 2>/dev/null; then
    echo "setup: stopping the packaged etcd service"
    $SUDO systemctl disable --now etcd
  fi
elif [ -x /etc/init.d/etcd ] && /etc/init.d/etcd status >/dev/null 2>&1; then
  echo "setup: stopping the packaged etcd service"
  $SUDO /etc/init.d/etcd stop
fi

# --- Helm SDK from PyPI, for tests/helm.rs (charts/helm_check.py lints and renders the chart offline) ------
PYTHON="${BASALT_PYTHON:-python3}"
if ! "$PYTHON" -c "import helm_python, yaml" >/dev/null 2>&1; then
  echo "setup: installing helm-python-sdk and pyyaml for $PYTHON"
  "$PYTHON" -m pip install -q helm-python-sdk pyyaml
fi
"$PYTHON" -c "import helm_python, yaml" || { echo "setup: helm-python-sdk is not importable by $PYTHON" >&2; exit 1; }

# --- schemathesis from PyPI, for tests/agent_api.rs (fuzzes the agent's REST API with agent/openapi.json) ---
# In its own venv (its dependencies stay out of the system's Python), pinned so that a run is reproducible.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV="${BASALT_SCHEMATHESIS_VENV:-$HOME/.cache/basalt-schemathesis}"
if ! "$SCHEMATHESIS_VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  echo "setup: installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
  "$PYTHON" -m venv "$SCHEMATHESIS_VENV" || { echo "setup: $PYTHON cannot make a venv (install python3-venv)" >&2; exit 1; }
  "$SCHEMATHESIS_VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$SCHEMATHESIS_VENV/bin/schemathesis" --version | grep -qF "$SCHEMATHESIS_VERSION" \
  || { echo "setup: schemathesis $SCHEMATHESIS_VERSION is not runnable from $SCHEMATHESIS_VENV" >&2; exit 1; }

# --- checks: fail here, loudly, rather than in the middle of a test ------------------------------------------
for tool in iscsi-test-cu iscsi-ls iscsi-inq tgtd tgtadm qemu-img qemu-storage-daemon mkfs.ext4 fsck.ext4 \
  losetup mount umount etcd etcdctl ip iptables "$FIO_LIBISCSI"; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is missing after setup" >&2; exit 1; }
done
for lib in /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so; do
  [ -e "$lib" ] || { echo "setup: qemu's iSCSI driver $lib is missing (qemu-block-extra)" >&2; exit 1; }
done
echo "setup: ok (qemu $(version_of qemu-utils), tgt $(version_of tgt), fio-libiscsi $("$FIO_LIBISCSI" --version))"
