#!/usr/bin/env bash
# Installs everything leasedog's tests, benchmarks and demo need on a fresh
# Debian 12 machine. Idempotent: installs only what is missing.
set -euo pipefail

need_pkgs=(
  etcd-server etcd-client      # real etcd 3.4 for the tests and the lab
  protobuf-compiler            # etcd-client's build needs protoc
  postgresql-15                # real PostgreSQL clusters (initdb, pg_ctl, ...)
  qemu-system-x86              # the watchdog lab: TCG guests with i6300esb/softdog
  busybox-static cpio xz-utils zstd kmod  # the lab's initramfs and kernel modules
  systemd udev                 # systemd-analyze / udevadm checks of the unit and rules
  iproute2 procps psmisc       # ip, ps/pgrep, fuser
  dpkg-dev                     # dpkg-deb checks of the package
  openssl                      # certificates for the etcd TLS tests (tests/ops.rs)
)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's postgresql-15 starts a default cluster on 5432; the tests make their
# own clusters and need none running.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1, $2}' | while read -r v c; do
    pg_ctlcluster "$v" "$c" stop || true
  done
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found (the machine's Rust toolchain is expected)" >&2
  exit 1
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "setup: installing cargo-deb"
  cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
echo "setup: ok"
