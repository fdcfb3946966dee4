#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every test of the
# workspace (real etcd, real PostgreSQL, QEMU watchdog lab) with the test-only
# hooks compiled in.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --features testing --quiet
cargo test --workspace --features testing --no-fail-fast -- --test-threads=2
