//! The deadline timer (docs/fencing.md rule 3).
//!
//! A thread of its own, independent of the main loop: it reads the same
//! published evidence as the pinger and, once `now > s + T - M` on lease
//! evidence, stops pinging and runs the step-down (stop PostgreSQL), then
//! tells the main loop. If even this thread cannot run, rule 1 has already
//! silenced the pinger and the watchdog resets the node before `s + T`.

use super::pinger::EvidenceCell;
use crate::clock::{self, BootTime};
use crate::decide::Evidence;
use crate::timing::{self, Budget};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// The step-down the timer runs: stops whatever could still commit and says
/// how, or why it could not. Must not depend on the main loop or its runtime.
pub type FenceFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Reports from the timer to the main loop.
#[derive(Debug, Clone, PartialEq)]
pub enum TimerReport {
    Fenced {
        s: BootTime,
        at: BootTime,
        how: String,
    },
    StopFailed {
        s: BootTime,
        reason: String,
    },
}

/// Rule 3 as one decision: on lease evidence, is it past the deadline?
pub fn overdue(ev: Evidence, now: BootTime, budget: &Budget) -> Option<BootTime> {
    match ev {
        Evidence::Lease(s) if now > timing::demotion_deadline(s, budget) => Some(s),
        _ => None,
    }
}

pub struct DeadlineTimer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DeadlineTimer {
    /// Starts the timer thread; `report` must not block (an unbounded
    /// channel's send). Returns whether real-time priority was granted.
    pub fn start(
        cell: Arc<EvidenceCell>,
        budget: Budget,
        poll: Duration,
        realtime: bool,
        fence_fn: FenceFn,
        report: impl Fn(TimerReport) + Send + 'static,
    ) -> std::io::Result<(DeadlineTimer, Result<(), String>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let (rt_tx, rt_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("leasedog-deadline".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let rt = if realtime {
                    super::realtime::raise_current_thread()
                } else {
                    Err("not requested".into())
                };
                let _ = rt_tx.send(rt);
                while !st.load(Ordering::SeqCst) {
                    let raw = cell.load_raw();
                    if let Some(s) = overdue(EvidenceCell::decode(raw), clock::now(), &budget) {
                        // Stop pinging unless a renewal landed meanwhile.
                        if cell.clear_if(raw) {
                            let at = clock::now();
                            report(match fence_fn() {
                                Ok(how) => TimerReport::Fenced { s, at, how },
                                Err(reason) => TimerReport::StopFailed { s, reason },
                            });
                        }
                    }
                    thread::sleep(poll);
                }
            })?;
        let rt = rt_rx
            .recv()
            .unwrap_or_else(|_| Err("deadline thread died".into()));
        Ok((
            DeadlineTimer {
                stop,
                thread: Some(thread),
            },
            rt,
        ))
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn budget() -> Budget {
        Budget::new(
            Duration::from_secs(3),
            Duration::from_secs(2),
            Duration::from_millis(500),
            Duration::from_millis(500),
            Duration::from_millis(500),
        )
        .unwrap()
    }

    #[test]
    fn overdue_only_on_lease_evidence_past_deadline() {
        let b = budget(); // T - M = 1 s
        let s = BootTime::from_nanos(1_000_000_000);
        assert_eq!(
            overdue(Evidence::Lease(s), s + Duration::from_millis(1000), &b),
            None
        );
        assert_eq!(
            overdue(Evidence::Lease(s), s + Duration::from_millis(1001), &b),
            Some(s)
        );
        assert_eq!(
            overdue(Evidence::Liveness(s), s + Duration::from_secs(9), &b),
            None
        );
        assert_eq!(
            overdue(Evidence::None, s + Duration::from_secs(9), &b),
            None
        );
    }

    /// With the main loop silent (nobody renews), the timer alone stops
    /// pinging and runs the step-down, once, after `s + T - M`.
    #[test]
    fn fires_once_without_the_main_loop() {
        let b = budget();
        let cell = Arc::new(EvidenceCell::default());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let c2 = calls.clone();
        let r2 = reports.clone();
        let (_t, _) = DeadlineTimer::start(
            cell.clone(),
            b,
            Duration::from_millis(10),
            false,
            Arc::new(move || {
                c2.lock().unwrap().push(clock::now());
                Ok("stopped".into())
            }),
            move |r| r2.lock().unwrap().push(r),
        )
        .unwrap();
        let s = clock::now();
        cell.store(Evidence::Lease(s));
        thread::sleep(Duration::from_millis(1800));
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "one step-down");
        assert!(
            calls[0] > timing::demotion_deadline(s, &b),
            "not before the deadline"
        );
        assert_eq!(cell.load(), Evidence::None, "pings stopped");
        let reports = reports.lock().unwrap();
        assert!(matches!(&reports[0], TimerReport::Fenced { s: rs, .. } if *rs == s));
    }

    /// Renewals that keep arriving keep the timer quiet.
    #[test]
    fn fresh_renewals_keep_it_quiet() {
        let b = budget();
        let cell = Arc::new(EvidenceCell::default());
        let calls = Arc::new(Mutex::new(0));
        let c2 = calls.clone();
        let (_t, _) = DeadlineTimer::start(
            cell.clone(),
            b,
            Duration::from_millis(10),
            false,
            Arc::new(move || {
                *c2.lock().unwrap() += 1;
                Ok("stopped".into())
            }),
            |_| {},
        )
        .unwrap();
        for _ in 0..10 {
            cell.store(Evidence::Lease(clock::now()));
            thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(*calls.lock().unwrap(), 0);
    }
}
