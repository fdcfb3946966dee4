//! What the main loop publishes and the pinger reads, in atomics only: the
//! [`EvidenceCell`] (rule 1's `s`, with its kind) and the [`PingStats`]. The
//! agent's threads and `metrics` both import from here, so nothing below the
//! agent reaches up into it.

use crate::clock::BootTime;
use crate::decide::Evidence;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The published evidence, packed into one atomic word so that the pinger and
/// the deadline timer read a consistent (kind, instant) pair without a lock.
/// The top two bits hold the kind; the low 62 bits the CLOCK_BOOTTIME
/// nanoseconds (enough for 146 years of uptime).
#[derive(Debug, Default)]
pub struct EvidenceCell(AtomicU64);

const KIND_SHIFT: u32 = 62;
const TIME_MASK: u64 = (1 << KIND_SHIFT) - 1;

impl EvidenceCell {
    pub fn encode(ev: Evidence) -> u64 {
        match ev {
            Evidence::None => 0,
            Evidence::Lease(s) => (1 << KIND_SHIFT) | (s.as_nanos() & TIME_MASK),
            Evidence::Liveness(s) => (2 << KIND_SHIFT) | (s.as_nanos() & TIME_MASK),
        }
    }

    pub fn decode(raw: u64) -> Evidence {
        let at = BootTime::from_nanos(raw & TIME_MASK);
        match raw >> KIND_SHIFT {
            1 => Evidence::Lease(at),
            2 => Evidence::Liveness(at),
            _ => Evidence::None,
        }
    }

    pub fn store(&self, ev: Evidence) {
        self.0.store(Self::encode(ev), Ordering::SeqCst);
    }

    pub fn load(&self) -> Evidence {
        Self::decode(self.0.load(Ordering::SeqCst))
    }

    pub fn load_raw(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Replaces the evidence only if it is still `current` (the deadline
    /// timer must not clobber a renewal published meanwhile).
    pub fn clear_if(&self, current: u64) -> bool {
        self.0
            .compare_exchange(current, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// Ping counts and lateness, readable by anyone at any time.
#[derive(Debug, Default)]
pub struct PingStats {
    /// Rounds in which every device was written.
    pub pings: AtomicU64,
    pub refused: AtomicU64,
    /// BOOTTIME at which the last successful device write returned.
    pub last_ping_ns: AtomicU64,
    /// BOOTTIME at which the pinger thread last woke (pinging or not): the
    /// main loop's sign that the pinger still runs.
    pub last_wake_ns: AtomicU64,
    /// Lateness histogram of tick wake-ups, bucket i counts lateness in
    /// [2^i, 2^(i+1)) microseconds (bucket 0 also holds < 1 µs).
    pub lateness_us_log2: [AtomicU64; 24],
    pub max_lateness_ns: AtomicU64,
    /// Sum of all lateness, for the Prometheus histogram's `_sum`.
    pub lateness_sum_ns: AtomicU64,
}

impl PingStats {
    pub(crate) fn note_lateness(&self, late: Duration) {
        let us = late.as_micros() as u64;
        let bucket = if us == 0 {
            0
        } else {
            (63 - us.leading_zeros()) as usize
        };
        self.lateness_us_log2[bucket.min(23)].fetch_add(1, Ordering::Relaxed);
        self.max_lateness_ns
            .fetch_max(late.as_nanos() as u64, Ordering::Relaxed);
        self.lateness_sum_ns
            .fetch_add(late.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Approximate lateness quantile (upper bound of the bucket holding it).
    pub fn lateness_quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .lateness_us_log2
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Duration::from_micros(1u64 << (i + 1));
            }
        }
        Duration::from_nanos(self.max_lateness_ns.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_round_trips_through_one_word() {
        for ev in [
            Evidence::None,
            Evidence::Lease(BootTime::from_nanos(123_456_789_012)),
            Evidence::Liveness(BootTime::from_nanos(TIME_MASK)),
        ] {
            assert_eq!(EvidenceCell::decode(EvidenceCell::encode(ev)), ev);
        }
        let c = EvidenceCell::default();
        assert_eq!(c.load(), Evidence::None);
        c.store(Evidence::Lease(BootTime::from_nanos(5)));
        let raw = c.load_raw();
        c.store(Evidence::Lease(BootTime::from_nanos(6)));
        assert!(!c.clear_if(raw), "a newer renewal must not be clobbered");
        assert!(c.clear_if(c.load_raw()));
        assert_eq!(c.load(), Evidence::None);
    }
}
