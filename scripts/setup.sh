#!/usr/bin/env bash
# Installs everything leasedog's tests, benchmarks and demo need on a fresh
# Debian 12 machine. Idempotent: installs only what is missing.
set -euo pipefail

need_pkgs=(
  etcd-server etcd-client      # real etcd 3.4 for the tests and the lab
  protobuf-compiler libprotobuf-dev  # etcd-client's build: protoc and the well-known .proto files (only recommended by protobuf-compiler)
  postgresql-15                # real PostgreSQL clusters (initdb, pg_ctl, ...)
  qemu-system-x86              # the watchdog lab: TCG guests with i6300esb/softdog
  busybox-static cpio xz-utils zstd kmod  # the lab's initramfs and kernel modules
  systemd udev                 # systemd-analyze / udevadm checks of the unit and rules
  iproute2 procps psmisc       # ip, ps/pgrep, fuser
  dpkg-dev                     # dpkg-deb checks of the package
  openssl                      # certificates for the etcd TLS tests (tests/ops.rs)
  haproxy                      # a real load balancer in front of a cluster (tests/haproxy.rs)
  stress-ng                    # CPU, memory and disk pressure for the ping lateness benchmark (examples/stress.rs)
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
# What the build and the tests need, checked rather than assumed: a package
# can install without what it only recommends (libprotobuf-dev for protoc's
# well-known .proto files hid behind a machine that had it from earlier).
missing_tools=()
need() { # need WHAT COMMAND...: runs the command quietly, records WHAT if it fails
  local what=$1; shift
  "$@" >/dev/null 2>&1 || missing_tools+=("$what")
}
probe=$(mktemp -d)
printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$probe/p.proto"
need "protoc with google/protobuf/descriptor.proto (libprotobuf-dev)" \
  protoc -I"$probe" --descriptor_set_out="$probe/out" "$probe/p.proto"
rm -rf "$probe"
need "initdb (postgresql-15)" test -x /usr/lib/postgresql/15/bin/initdb
need "pg_basebackup and pg_rewind (postgresql-15)" \
  test -x /usr/lib/postgresql/15/bin/pg_basebackup -a -x /usr/lib/postgresql/15/bin/pg_rewind
need "etcd (etcd-server)" etcd --version
need "etcdctl (etcd-client)" etcdctl version
need "qemu-system-x86_64 (qemu-system-x86)" qemu-system-x86_64 --version
need "busybox (busybox-static)" test -x /bin/busybox
need "cpio" cpio --version
need "systemd-analyze (systemd)" systemd-analyze --version
need "udevadm (udev)" udevadm --version
need "openssl" openssl version
need "haproxy" /usr/sbin/haproxy -v
need "dpkg-deb (dpkg-dev)" dpkg-deb --version
need "cargo-deb" cargo deb --version
# The lab's kernel comes from Debian's archive at test time (testbed::lab::kernel):
# the versioned image package behind linux-image-amd64 must be downloadable.
kimage() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg=$(kimage)
[ -n "$kpkg" ] || { apt-get update -q >/dev/null 2>&1 || true; kpkg=$(kimage); }
need "the lab kernel package (linux-image-amd64 in the apt lists: run apt-get update)" \
  test -n "$kpkg"
[ -n "$kpkg" ] && need "the lab kernel package $kpkg (apt-get download)" \
  sh -c "apt-get download --print-uris '$kpkg' | grep -q ."
if [ ${#missing_tools[@]} -gt 0 ]; then
  for m in "${missing_tools[@]}"; do echo "setup: MISSING: $m" >&2; done
  exit 1
fi
echo "setup: ok"
