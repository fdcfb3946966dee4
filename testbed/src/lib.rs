//! Real parts for leasedog's tests, benchmarks and demo: etcd processes on
//! loopback ports, PostgreSQL clusters, and QEMU guests with real kernel
//! watchdogs. Everything started here is stopped when its handle drops.
pub mod agent;
pub mod clients;
pub mod cluster;
pub mod etcd;
pub mod fence;
pub mod history;
pub mod lab;
pub mod pg;
pub mod view;

use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it holds (true) or `within` passes (false).
/// The one wait of the tests, benchmarks and lab.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
