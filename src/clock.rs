//! Readings of CLOCK_BOOTTIME, the one clock every fencing decision uses.
//!
//! CLOCK_BOOTTIME keeps counting through suspend (CLOCK_MONOTONIC does not),
//! so a node that slept cannot mistake an old renewal for a fresh one. The
//! pure core never reads a clock: drivers call [`now`] and pass the value in.

use std::ops::{Add, Sub};
use std::time::Duration;

/// An instant on CLOCK_BOOTTIME, in nanoseconds since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BootTime(pub u64);

impl BootTime {
    pub const ZERO: BootTime = BootTime(0);

    pub fn from_nanos(ns: u64) -> Self {
        BootTime(ns)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: BootTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

impl Sub<Duration> for BootTime {
    type Output = BootTime;
    fn sub(self, d: Duration) -> BootTime {
        BootTime(
            self.0
                .saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

/// The current CLOCK_BOOTTIME reading.
pub fn now() -> BootTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_BOOTTIME exists on every
    // Linux since 2.6.39, so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    BootTime(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Wall-clock time in nanoseconds since the Unix epoch (for records humans read).
pub fn wall_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances() {
        let a = now();
        std::thread::sleep(Duration::from_millis(5));
        let b = now();
        assert!(b.saturating_since(a) >= Duration::from_millis(5));
        assert_eq!(a.saturating_since(b), Duration::ZERO);
    }

    #[test]
    fn arithmetic_saturates() {
        let t = BootTime(10);
        assert_eq!(t - Duration::from_nanos(20), BootTime(0));
        assert_eq!(
            BootTime(u64::MAX) + Duration::from_secs(1),
            BootTime(u64::MAX)
        );
    }
}
