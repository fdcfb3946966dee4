//! The timing budget of FENCING.md as pure functions.
//!
//! Names follow FENCING.md: `T` lease TTL, `W` watchdog timeout read back from
//! the device, `M = T - W` safety margin, `R` reset allowance, `s` send time of
//! the last keepalive etcd acknowledged, `k` the time of a ping.
//!
//! The key fact: etcd keeps the leader key until at least `s + T`. A ping at `k`
//! schedules a reset at `k + W`. Rule 1 allows the ping only if that reset still
//! lands by `s + T - R`.

use crate::clock::BootTime;
use std::time::Duration;

/// etcd refuses (silently raises) lease TTLs below its minimum, which with
/// default election settings is about 2 s.
pub const ETCD_MIN_TTL_SECS: u64 = 2;

/// The numbers every fencing decision depends on. Built and validated by
/// `config`; see [`Budget::new`] for the rules it enforces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// `T`: the leader lease's TTL, whole seconds as etcd takes it.
    pub ttl: Duration,
    /// `M`: how long before the lease's earliest expiry the node must be fenced.
    pub margin: Duration,
    /// `R`: allowance for the reset itself and timer granularity.
    pub reset_allowance: Duration,
    /// How often the main loop renews.
    pub loop_interval: Duration,
    /// Deadline of each etcd request (a renewal that takes longer is abandoned).
    pub request_timeout: Duration,
}

/// Why a budget cannot be fenced safely. `key` names the configuration key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {rule}")]
pub struct BudgetError {
    pub key: &'static str,
    pub rule: String,
}

fn err(key: &'static str, rule: impl Into<String>) -> BudgetError {
    BudgetError {
        key,
        rule: rule.into(),
    }
}

impl Budget {
    /// Checks that the budget can be honoured at all:
    /// - `T >= 2 s` (etcd's minimum) and whole seconds;
    /// - `R < M < T`, and `T - M >= 1 s` (watchdog timeouts are whole seconds);
    /// - `max(loop_interval, loop_work) + request_timeout <= M - R`
    ///   ([`Budget::renewal_gap`]), so that a renewal sent on time is
    ///   acknowledged before the ping permit of the previous one runs out: in
    ///   steady state the pings never pause. `loop_work` is the worst case of
    ///   what a leader's loop does per tick ([`Budget::loop_work`]).
    pub fn new(
        ttl: Duration,
        margin: Duration,
        reset_allowance: Duration,
        loop_interval: Duration,
        request_timeout: Duration,
    ) -> Result<Budget, BudgetError> {
        if ttl.subsec_nanos() != 0 {
            return Err(err(
                "timing.ttl",
                "must be whole seconds (etcd lease TTLs are)",
            ));
        }
        if ttl.as_secs() < ETCD_MIN_TTL_SECS {
            return Err(err(
                "timing.ttl",
                format!(
                    "{} s is below etcd's minimum lease TTL of {ETCD_MIN_TTL_SECS} s",
                    ttl.as_secs()
                ),
            ));
        }
        if margin <= reset_allowance {
            return Err(err(
                "timing.safety_margin",
                format!(
                    "M = {:?} must exceed the reset allowance R = {:?} (rule 1 permits pings for M - R after a renewal)",
                    margin, reset_allowance
                ),
            ));
        }
        if margin >= ttl || ttl - margin < Duration::from_secs(1) {
            return Err(err(
                "timing.safety_margin",
                format!(
                    "T - M = {:?} leaves no whole second for the watchdog timeout W (T = {:?}, M = {:?})",
                    ttl.saturating_sub(margin),
                    ttl,
                    margin
                ),
            ));
        }
        if loop_interval.is_zero() {
            return Err(err("timing.loop_interval", "must be greater than zero"));
        }
        if request_timeout.is_zero() {
            return Err(err("etcd.request_timeout", "must be greater than zero"));
        }
        let window = margin - reset_allowance;
        let b = Budget {
            ttl,
            margin,
            reset_allowance,
            loop_interval,
            request_timeout,
        };
        if b.renewal_gap() > window {
            return Err(err(
                "timing.loop_interval",
                format!(
                    "the renewal loop's worst gap, max(loop_interval {:?}, its work per tick {:?}) \
                     + etcd.request_timeout {:?}, exceeds M - R = {:?}: \
                     pings would pause between renewals; shorten the loop or the request \
                     deadline, or raise the margin",
                    loop_interval,
                    b.loop_work(),
                    request_timeout,
                    window
                ),
            ));
        }
        Ok(b)
    }

    /// The worst case of the I/O a leader's loop does per tick, before its
    /// next renewal can be sent: the renewal itself (one etcd request, at
    /// most `request_timeout`). Everything else a steady leader needs runs
    /// off the loop: PostgreSQL's observation and `synchronous_standby_names`
    /// (the observer task, each query bounded by `postgres.query_timeout`),
    /// member records (their own task and etcd connection), the audit mirror
    /// (its own task), promotion (`pg_promote`, up to
    /// `postgres.promote_timeout`, in a task of its own). What still shares
    /// the loop happens at a change of state, not per tick, and is bounded
    /// or harmless to the pings: arming (bounded by the permit it pings on,
    /// `Arm { not_after }`), the fences of a step-down (pings already
    /// stopped, and the deadline timer does not wait for the loop), acquire,
    /// release and the key read of a follower, and the audit log's fsync of
    /// each fact.
    pub fn loop_work(&self) -> Duration {
        self.request_timeout
    }

    /// The longest a fresh permit must last until the next renewal is
    /// acknowledged: the next renewal is sent `max(loop_interval,
    /// loop_work)` after the last one and answered within `request_timeout`.
    pub fn renewal_gap(&self) -> Duration {
        self.loop_interval.max(self.loop_work()) + self.request_timeout
    }

    /// `T` in whole seconds, as etcd's LeaseGrant takes it.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs() as i64
    }

    /// The window after `s` in which pings are permitted: `M - R`.
    pub fn ping_window(&self) -> Duration {
        self.margin - self.reset_allowance
    }
}

/// The watchdog timeout to ask the device for: the largest whole number of
/// seconds not above `T - M`. Drivers may round; what counts is the read-back
/// value, checked by [`check_readback`].
pub fn target_timeout(b: &Budget) -> u32 {
    (b.ttl - b.margin).as_secs() as u32
}

/// Rule 1: a ping at `k` is permitted only if `k - s <= M - R`, so that the
/// reset it schedules (`k + W`, with `W <= T - M`) lands by `s + T - R`.
pub fn ping_permitted(k: BootTime, s: BootTime, b: &Budget) -> bool {
    k.saturating_since(s) <= b.ping_window()
}

/// Rule 3: the instant after which a leader must already be stepping down,
/// independently of its main loop: `s + T - M`.
pub fn demotion_deadline(s: BootTime, b: &Budget) -> BootTime {
    s + (b.ttl - b.margin)
}

/// The last instant at which a ping may be sent on the evidence of `s`:
/// `s + M - R` (what the pinger compares its clock against).
pub fn fresh_until(s: BootTime, b: &Budget) -> BootTime {
    s + b.ping_window()
}

/// The earliest instant at which etcd may delete a key on a lease last
/// renewed by a keepalive sent at `s`.
pub fn earliest_expiry(s: BootTime, b: &Budget) -> BootTime {
    s + b.ttl
}

/// A leader's pinger that has not woken since `woke` is silent if that was
/// more than half the ping window (`(M - R) / 2`) ago: it wakes every
/// `watchdog.ping_interval` (at most a quarter of `M - R`, 0.1 s by
/// default), so it missed rounds, and a renewal it cannot carry to the
/// devices only holds the key longer for a node its watchdog is about to
/// reset. `Some(how long)` if silent.
pub fn pinger_silent(now: BootTime, woke: BootTime, b: &Budget) -> Option<Duration> {
    let silent = now.saturating_since(woke);
    (silent > b.ping_window() / 2).then_some(silent)
}

/// The timeout read back from a device (`W`, whole seconds) must fit the
/// budget: at least 1 s, and `W <= T - M`.
pub fn check_readback(w_secs: u32, b: &Budget) -> Result<(), BudgetError> {
    if w_secs == 0 {
        return Err(err("watchdog", "device reports a timeout of 0 s"));
    }
    let limit = b.ttl - b.margin;
    if Duration::from_secs(w_secs as u64) > limit {
        return Err(err(
            "watchdog",
            format!(
                "device timeout W = {w_secs} s exceeds T - M = {:?}: a reset could land after the lease expires",
                limit
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn lab() -> Budget {
        Budget::new(secs(5.0), secs(2.0), secs(1.0), secs(0.5), secs(0.5)).unwrap()
    }

    #[test]
    fn lab_budget_targets_three_seconds() {
        let b = lab();
        assert_eq!(target_timeout(&b), 3);
        assert_eq!(b.ping_window(), secs(1.0));
    }

    #[test]
    fn permit_stops_exactly_at_m_minus_r() {
        let b = lab();
        let s = BootTime::from_nanos(100_000_000_000);
        assert!(ping_permitted(s, s, &b));
        assert!(ping_permitted(s + secs(1.0), s, &b));
        assert!(!ping_permitted(
            s + secs(1.0) + Duration::from_nanos(1),
            s,
            &b
        ));
        assert_eq!(fresh_until(s, &b), s + secs(1.0));
    }

    #[test]
    fn deadline_is_t_minus_m_after_send() {
        let b = lab();
        let s = BootTime::from_nanos(7_000_000_000);
        assert_eq!(
            demotion_deadline(s, &b),
            BootTime::from_nanos(10_000_000_000)
        );
        assert_eq!(earliest_expiry(s, &b), BootTime::from_nanos(12_000_000_000));
    }

    #[test]
    fn readback_above_t_minus_m_is_refused() {
        let b = lab();
        assert!(check_readback(3, &b).is_ok());
        assert!(check_readback(2, &b).is_ok());
        let e = check_readback(4, &b).unwrap_err();
        assert!(e.rule.contains("exceeds T - M"), "{e}");
        assert!(check_readback(0, &b).is_err());
    }

    #[test]
    fn impossible_budgets_name_their_key() {
        let e = Budget::new(secs(1.0), secs(0.5), secs(0.1), secs(0.1), secs(0.1)).unwrap_err();
        assert_eq!(e.key, "timing.ttl");
        let e = Budget::new(secs(5.5), secs(2.0), secs(1.0), secs(0.1), secs(0.1)).unwrap_err();
        assert_eq!(e.key, "timing.ttl");
        let e = Budget::new(secs(5.0), secs(1.0), secs(1.0), secs(0.1), secs(0.1)).unwrap_err();
        assert_eq!(e.key, "timing.safety_margin");
        assert!(e.rule.contains("reset allowance"));
        let e = Budget::new(secs(5.0), secs(4.5), secs(1.0), secs(0.1), secs(0.1)).unwrap_err();
        assert_eq!(e.key, "timing.safety_margin");
        let e = Budget::new(secs(10.0), secs(5.0), secs(1.0), secs(3.5), secs(1.0)).unwrap_err();
        assert_eq!(e.key, "timing.loop_interval");
        assert!(e.rule.contains("pings would pause"));
        // A request deadline above the loop: the renewal itself is the
        // loop's work, so the next one goes out no sooner than it.
        let e = Budget::new(secs(5.0), secs(2.0), secs(1.0), secs(0.3), secs(0.6)).unwrap_err();
        assert_eq!(e.key, "timing.loop_interval");
        let b = Budget::new(secs(5.0), secs(2.0), secs(1.0), secs(0.5), secs(0.5)).unwrap();
        assert_eq!(
            b.renewal_gap(),
            b.ping_window(),
            "the lab budget fits exactly"
        );
    }

    /// Builds a valid budget from fractions, so that every generated case is
    /// usable (no mass rejection): T in [2, 600] s, M in (R, T - 1 s], and a
    /// loop + request timeout that fits M - R.
    fn budget_from(ttl: u64, fm: f64, fr: f64, fl: f64, ft: f64) -> Budget {
        let t_ms = ttl * 1000;
        let m_ms = 2 + ((t_ms - 1000 - 2) as f64 * fm) as u64; // 2 ..= T - 1 s
        let r_ms = ((m_ms - 1) as f64 * fr) as u64; // 0 ..= M - 1 ms
        let window = m_ms - r_ms;
        let l_ms = 1 + ((window / 2).saturating_sub(1) as f64 * fl) as u64;
        let d_ms = 1 + ((window / 2).saturating_sub(1) as f64 * ft) as u64;
        Budget::new(
            Duration::from_secs(ttl),
            Duration::from_millis(m_ms),
            Duration::from_millis(r_ms),
            Duration::from_millis(l_ms),
            Duration::from_millis(d_ms),
        )
        .expect("constructed budget is valid")
    }

    proptest! {
        /// The safety claim of rule 1: whatever the budget, a permitted ping on
        /// a device whose read-back timeout passed the check schedules its
        /// reset no later than `s + T - R`, i.e. at least R before etcd can
        /// delete the key.
        #[test]
        fn permitted_ping_resets_before_expiry(
            ttl in 2u64..600,
            fm in 0.0f64..1.0, fr in 0.0f64..1.0, fl in 0.0f64..1.0, ft in 0.0f64..1.0,
            w in 0u32..700,
            s_ns in 0u64..1_000_000_000_000_000,
            dk_ns in 0u64..1_000_000_000_000,
        ) {
            let b = budget_from(ttl, fm, fr, fl, ft);
            let s = BootTime::from_nanos(s_ns);
            let k = BootTime::from_nanos(s_ns + dk_ns);
            let reset = k + Duration::from_secs(w as u64);
            if ping_permitted(k, s, &b) && check_readback(w, &b).is_ok() {
                prop_assert!(reset <= earliest_expiry(s, &b) - b.reset_allowance);
                // the demotion deadline falls before the earliest expiry
                prop_assert!(demotion_deadline(s, &b) < earliest_expiry(s, &b));
            }
        }

        /// The target timeout always passes its own read-back check, and a
        /// ping straight after a renewal is always permitted.
        #[test]
        fn valid_budgets_are_usable(
            ttl in 2u64..600,
            fm in 0.0f64..1.0, fr in 0.0f64..1.0, fl in 0.0f64..1.0, ft in 0.0f64..1.0,
        ) {
            let b = budget_from(ttl, fm, fr, fl, ft);
            prop_assert!(check_readback(target_timeout(&b), &b).is_ok());
            let s = BootTime::from_nanos(1);
            prop_assert!(ping_permitted(s, s, &b));
        }
    }
}
