//! Test-only fault injection (compiled only with the `testing` feature, so no
//! configuration can enable it in a production build).
//!
//! With `LEASEDOG_FAULT_DIR` set, the main loop blocks before each renewal
//! for as long as `$LEASEDOG_FAULT_DIR/block-renewals` exists: the loop is
//! stuck while the pinger and the deadline timer run on, which is how the lab
//! shows that a live pinger refuses to ping on stale evidence. While
//! `$LEASEDOG_FAULT_DIR/refuse-watch` exists, setting up the leader watch
//! fails (as it can when etcd has just regained its quorum).

use std::path::PathBuf;
use std::time::Duration;

fn flag() -> Option<PathBuf> {
    std::env::var_os("LEASEDOG_FAULT_DIR").map(|d| PathBuf::from(d).join("block-renewals"))
}

/// Blocks the calling (main loop) thread while the flag file exists.
pub fn before_renewal() {
    if let Some(f) = flag() {
        let mut announced = false;
        while f.exists() {
            if !announced {
                tracing::warn!("fault hook: renewals blocked by {}", f.display());
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True while `$LEASEDOG_FAULT_DIR/refuse-watch` exists.
pub fn watch_refused() -> bool {
    std::env::var_os("LEASEDOG_FAULT_DIR")
        .is_some_and(|d| PathBuf::from(d).join("refuse-watch").exists())
}
