#!/usr/bin/env bash
# The demo (`leasedog-lab demo`), about a minute: an etcd on this machine's
# loopback, then
#  1. two QEMU guests running leasedog with real kernel watchdogs; the leader
#     is stalled, its watchdog resets it before its lease expires, the other
#     guest takes over; a host-clock timeline and the audit's verdict;
#  2. PostgreSQL 15 under leasedog: a guest leader (i6300esb) and a host node
#     as its synchronous standby, clients writing and probing on the host;
#     the guest's agent is stalled; a writer's view of the failover (last and
#     first acknowledged inserts, failed attempts, the writer gap, a per-node
#     writable strip beside the reset and key expiry) and the verdicts of the
#     history checker and the audit timeline.
# Exits non-zero on a fence not proven, a double-writable instant or a lost
# acknowledged insert.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --features testing --quiet
exec cargo run --quiet -p leasedog-testbed --bin leasedog-lab -- demo "$@"
