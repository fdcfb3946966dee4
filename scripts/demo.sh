#!/usr/bin/env bash
# The demo: an etcd on this machine's loopback, two QEMU guests running
# leasedog with real kernel watchdogs; the leader is stalled, its watchdog
# resets it before its lease expires, and the other guest takes over. Prints
# a host-clock timeline and the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --features testing --quiet
exec cargo run --quiet -p leasedog-testbed --bin leasedog-lab -- demo "$@"
