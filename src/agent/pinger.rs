//! The pinger thread (docs/fencing.md rules 1 and 6).
//!
//! It owns the armed devices and reads one atomic value, the published
//! [`Evidence`], plus the clock. It never logs, never touches the disk or the
//! network and never takes a lock that I/O can hold: commands arrive on a
//! channel it polls without blocking, and what it has to say (refusals, ping
//! failures, periodic summaries) leaves through the audit module's bounded
//! queue, which drops (and counts) rather than waits. If the main loop
//! stalls, the evidence ages past `M - R` and the pings stop by themselves.

use crate::audit::{self, Event};
use crate::clock::{self, BootTime};
use crate::decide::Evidence;
use crate::timing::{self, Budget};
use crate::watchdog::{self, Watchdog};
// The evidence cell and the ping statistics live in `crate::evidence` (read
// by the deadline timer and by metrics too); re-exported for old paths.
pub use crate::evidence::{EvidenceCell, PingStats};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// How often, while pinging, the pinger hands over a `PingSummary` (the
/// audit's proof that no ping went out on stale evidence).
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Commands to the pinger thread.
pub enum Command {
    /// Take ownership of freshly armed devices.
    Adopt(Vec<Box<dyn Watchdog>>),
    /// Hand every device back (to disarm, or to re-arm).
    Surrender(tokio::sync::oneshot::Sender<Vec<Box<dyn Watchdog>>>),
    Stop,
}

/// Handles to a running pinger.
pub struct Pinger {
    pub commands: mpsc::Sender<Command>,
    pub events: audit::Receiver,
    pub stats: Arc<PingStats>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Capacity of the event queue; beyond it events are dropped and counted.
pub const EVENT_QUEUE: usize = 256;

impl Pinger {
    /// Starts the pinger thread. `realtime` asks for SCHED_FIFO; whether it
    /// was granted is returned for the caller to log (the thread cannot).
    pub fn start(
        cell: Arc<EvidenceCell>,
        budget: Budget,
        interval: Duration,
        realtime: bool,
    ) -> std::io::Result<(Pinger, Result<(), String>)> {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ev_tx, ev_rx) = audit::queue(EVENT_QUEUE);
        let stats = Arc::new(PingStats::default());
        let (rt_tx, rt_rx) = mpsc::channel();
        let st = stats.clone();
        let thread = thread::Builder::new()
            .name("leasedog-pinger".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let rt = if realtime {
                    crate::agent::realtime::raise_current_thread()
                } else {
                    Err("not requested".into())
                };
                let _ = rt_tx.send(rt);
                run(&cell, &budget, interval, cmd_rx, ev_tx, &st)
            })?;
        let rt = rt_rx
            .recv()
            .unwrap_or_else(|_| Err("pinger thread died".into()));
        Ok((
            Pinger {
                commands: cmd_tx,
                events: ev_rx,
                stats,
                thread: Some(thread),
            },
            rt,
        ))
    }

    /// Hands devices to the pinger. If its thread is gone they are leaked,
    /// never closed (a close would ping them).
    pub fn adopt(&self, devices: Vec<Box<dyn Watchdog>>) {
        if !devices.is_empty() {
            if let Err(mpsc::SendError(Command::Adopt(devices))) =
                self.commands.send(Command::Adopt(devices))
            {
                watchdog::leak(devices);
            }
        }
    }

    /// Takes every device back from the pinger.
    pub async fn surrender(&self) -> Vec<Box<dyn Watchdog>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.commands.send(Command::Surrender(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the thread. Devices it still holds are neither disarmed (rule 4:
    /// never disarm on an exit path) nor closed (closing a running device
    /// pings it): they are leaked, open, until the process ends.
    pub fn stop(mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The evidence permits a ping at `now` (rule 1 for both kinds).
pub fn permits(ev: Evidence, now: BootTime, budget: &Budget) -> bool {
    match ev {
        Evidence::None => false,
        Evidence::Lease(s) | Evidence::Liveness(s) => timing::ping_permitted(now, s, budget),
    }
}

/// What the pinger has pinged since its last summary.
#[derive(Default)]
struct Summary {
    /// Rounds in which at least one device was written.
    pings: u64,
    /// Over every device write: the time the write returned minus `s`.
    max_k_minus_s: Duration,
    last_s: Option<BootTime>,
    since: Option<BootTime>,
}

impl Summary {
    /// One device write that returned at `k` on evidence `s`.
    fn note_write(&mut self, k: BootTime, s: BootTime) {
        self.max_k_minus_s = self.max_k_minus_s.max(k.saturating_since(s));
        self.last_s = Some(s);
        self.since.get_or_insert(k);
    }

    /// Hands the summary over (and resets it) when due or when pinging stops.
    fn flush(&mut self, now: BootTime, force: bool, events: &audit::Sender) {
        let due = self
            .since
            .is_some_and(|t| now.saturating_since(t) >= SUMMARY_EVERY);
        if self.pings > 0 && (force || due) {
            events.try_push(Event::PingSummary {
                pings: self.pings,
                max_k_minus_s_ns: self.max_k_minus_s.as_nanos() as u64,
                last_s_ns: self.last_s.map_or(0, BootTime::as_nanos),
            });
            *self = Summary::default();
        }
    }
}

/// One tick: pings every device, each only if the evidence, read together
/// with the clock immediately before that device's write, permits it (rule 1
/// per write: a slow write to one device cannot carry stale evidence to the
/// next). A ping is recorded at the time its write returned, not at the time
/// it was checked, so a write that landed late shows in the summary as a
/// `k - s` beyond `M - R`. The first refusal ends the round.
fn ping_round(
    devices: &mut [Box<dyn Watchdog>],
    cell: &EvidenceCell,
    budget: &Budget,
    events: &audit::Sender,
    stats: &PingStats,
    summary: &mut Summary,
) {
    let mut written = 0;
    let mut failed = false;
    let mut refused = None;
    for d in devices.iter_mut() {
        let ev = cell.load();
        let k = clock::now();
        let s = match ev {
            Evidence::Lease(s) | Evidence::Liveness(s) if permits(ev, k, budget) => s,
            _ => {
                refused = Some((ev, k));
                break;
            }
        };
        match d.ping() {
            Ok(()) => {
                let landed = clock::now();
                written += 1;
                summary.note_write(landed, s);
                stats
                    .last_ping_ns
                    .store(landed.as_nanos(), Ordering::Relaxed);
            }
            Err(e) => {
                failed = true;
                events.try_push(Event::PingFailed {
                    device: d.info().path.display().to_string(),
                    error: e.to_string(),
                });
            }
        }
    }
    if written > 0 {
        summary.pings += 1;
        if !failed && refused.is_none() {
            stats.pings.fetch_add(1, Ordering::Relaxed);
        }
    }
    match refused {
        None => summary.flush(clock::now(), false, events),
        Some((ev, k)) => {
            summary.flush(k, true, events);
            if let Evidence::Lease(s) = ev {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                events.try_push(Event::PingRefused {
                    k_minus_s_ns: k.saturating_since(s).as_nanos() as u64,
                    s_ns: s.as_nanos(),
                });
            }
        }
    }
}

fn run(
    cell: &EvidenceCell,
    budget: &Budget,
    interval: Duration,
    commands: Receiver<Command>,
    events: audit::Sender,
    stats: &PingStats,
) {
    let mut devices: Vec<Box<dyn Watchdog>> = Vec::new();
    let mut summary = Summary::default();
    let mut next = clock::now() + interval;
    loop {
        loop {
            match commands.try_recv() {
                Ok(Command::Adopt(mut d)) => devices.append(&mut d),
                Ok(Command::Surrender(reply)) => {
                    summary.flush(clock::now(), true, &events);
                    // Nobody waits for them any more: keep them (and their pings).
                    if let Err(back) = reply.send(std::mem::take(&mut devices)) {
                        devices = back;
                    }
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    summary.flush(clock::now(), true, &events);
                    watchdog::leak(devices);
                    return;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if !devices.is_empty() {
            ping_round(&mut devices, cell, budget, &events, stats, &mut summary);
        }
        // Sleep to the next tick on the absolute schedule; note how late we woke.
        let now = clock::now();
        if now < next {
            thread::sleep(next.saturating_since(now));
        }
        let woke = clock::now();
        stats.last_wake_ns.store(woke.as_nanos(), Ordering::Relaxed);
        stats.note_lateness(woke.saturating_since(next));
        next = next + interval;
        if next < woke {
            next = woke + interval; // fell behind (stopped, or starved): resync
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watchdog::MemoryWatchdog;

    fn budget() -> Budget {
        Budget::new(
            Duration::from_secs(5),
            Duration::from_secs(2),
            Duration::from_secs(1),
            Duration::from_millis(300),
            Duration::from_millis(300),
        )
        .unwrap()
    }

    #[test]
    fn permits_follows_rule_1_for_both_kinds() {
        let b = budget();
        let s = BootTime::from_nanos(10_000_000_000);
        let in_window = s + Duration::from_millis(999);
        let past = s + Duration::from_millis(1001);
        assert!(permits(Evidence::Lease(s), in_window, &b));
        assert!(!permits(Evidence::Lease(s), past, &b));
        assert!(permits(Evidence::Liveness(s), in_window, &b));
        assert!(!permits(Evidence::Liveness(s), past, &b));
        assert!(!permits(Evidence::None, s, &b));
    }

    /// The pinger pings while the evidence is fresh, stops by itself when it
    /// ages past M - R (no cooperation from the main loop), and reports the
    /// refusals with their k - s.
    #[test]
    fn pings_stop_by_themselves_when_evidence_ages() {
        let b = budget();
        let cell = Arc::new(EvidenceCell::default());
        let (p, _rt) = Pinger::start(cell.clone(), b, Duration::from_millis(20), false).unwrap();
        let dev = MemoryWatchdog::new(3);
        let log = dev.log();
        p.adopt(vec![Box::new(dev)]);
        let s = clock::now();
        cell.store(Evidence::Lease(s));
        // M - R = 1 s: wait well past it.
        thread::sleep(Duration::from_millis(1600));
        let pinged = pings(&log);
        assert!(pinged.len() >= 10, "pinged while fresh: {}", pinged.len());
        let last = *pinged.last().unwrap();
        assert!(
            last.saturating_since(s) <= b.ping_window(),
            "a ping at k - s = {:?} > M - R",
            last.saturating_since(s)
        );
        let events = drain(&p);
        let refused: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::PingRefused { k_minus_s_ns, s_ns } => Some((*k_minus_s_ns, *s_ns)),
                _ => None,
            })
            .collect();
        assert!(!refused.is_empty());
        for (k_minus_s, es) in refused {
            assert_eq!(es, s.as_nanos());
            assert!(Duration::from_nanos(k_minus_s) > b.ping_window());
        }
        // The summary handed over when pinging stopped proves no stale ping.
        let summary = events
            .iter()
            .find_map(|e| match e {
                Event::PingSummary {
                    pings,
                    max_k_minus_s_ns,
                    last_s_ns,
                } => Some((*pings, *max_k_minus_s_ns, *last_s_ns)),
                _ => None,
            })
            .expect("a ping summary");
        assert!(summary.0 >= 10);
        assert!(Duration::from_nanos(summary.1) <= b.ping_window());
        assert_eq!(summary.2, s.as_nanos());
        // A fresh renewal resumes pinging.
        let before = pings(&log).len();
        cell.store(Evidence::Lease(clock::now()));
        thread::sleep(Duration::from_millis(200));
        assert!(pings(&log).len() > before);
        let devs = futures_lite_block_on(p.surrender());
        assert_eq!(devs.len(), 1);
        p.stop();
    }

    /// Rule 1 holds per device write, not per round: the clock and the
    /// evidence are read right before each write, so a write that lands late
    /// (here the first device's takes 1.3 s, past M - R = 1 s) keeps the
    /// next device from being pinged on evidence that went stale meanwhile,
    /// and the late write shows in the summary as its k - s at the time it
    /// landed (the audit's rule-1 check sees it).
    #[test]
    fn each_write_is_checked_and_recorded_at_its_own_time() {
        let b = budget();
        let cell = Arc::new(EvidenceCell::default());
        let (p, _rt) = Pinger::start(cell.clone(), b, Duration::from_millis(20), false).unwrap();
        let slow = MemoryWatchdog::new(3);
        let slow_log = slow.log();
        slow.delay_next_switch().store(1300, Ordering::SeqCst);
        let next = MemoryWatchdog::new(3);
        let next_log = next.log();
        p.adopt(vec![Box::new(slow), Box::new(next)]);
        let s = clock::now();
        cell.store(Evidence::Lease(s));
        thread::sleep(Duration::from_millis(1800));
        let late = pings(&slow_log);
        assert_eq!(late.len(), 1, "one (late) write to the slow device");
        assert!(late[0].saturating_since(s) > b.ping_window());
        for k in pings(&next_log) {
            assert!(
                k.saturating_since(s) <= b.ping_window(),
                "second device pinged at k - s = {:?} > M - R after the slow write",
                k.saturating_since(s)
            );
        }
        let events = drain(&p);
        let max = events
            .iter()
            .filter_map(|e| match e {
                Event::PingSummary {
                    max_k_minus_s_ns, ..
                } => Some(Duration::from_nanos(*max_k_minus_s_ns)),
                _ => None,
            })
            .max()
            .expect("a ping summary");
        assert!(
            max >= late[0].saturating_since(s),
            "the summary records the write time (k - s >= {:?}), not the check time: {max:?}",
            late[0].saturating_since(s)
        );
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::PingRefused { .. })));
        p.stop();
    }

    /// A full event queue never blocks the pinger: events are dropped and
    /// counted while pings go on.
    #[test]
    fn full_event_queue_drops_and_counts() {
        let b = budget();
        let cell = Arc::new(EvidenceCell::default());
        let (p, _rt) = Pinger::start(cell.clone(), b, Duration::from_millis(1), false).unwrap();
        let dev = MemoryWatchdog::new(3);
        let log = dev.log();
        p.adopt(vec![Box::new(dev)]);
        // Stale evidence: every tick is a refusal; nobody drains the queue.
        cell.store(Evidence::Lease(BootTime::from_nanos(1)));
        // Until the queue overflowed (a loaded machine gives fewer ticks).
        let t0 = std::time::Instant::now();
        while p.events.dropped() == 0 && t0.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(20));
        }
        // No evidence, no refusals: the queue holds still while it is drained
        // (otherwise the 1 ms pinger refills slots as they free up).
        cell.store(Evidence::None);
        thread::sleep(Duration::from_millis(50));
        let events = drain(&p);
        assert_eq!(events.len(), EVENT_QUEUE);
        assert!(p.events.dropped() > 0, "drops are counted");
        assert!(pings(&log).is_empty());
        // Fresh evidence: pings resume although the queue was full.
        cell.store(Evidence::Lease(clock::now()));
        let t0 = std::time::Instant::now();
        while pings(&log).is_empty() && t0.elapsed() < Duration::from_millis(900) {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(!pings(&log).is_empty());
        p.stop();
    }

    /// Rule 4 and the close-pings fact: stopping the pinger, or handing
    /// devices to a pinger that is gone, must not close armed devices (a
    /// close pings a running device and would reset the node W after the
    /// close instead of W after the last permitted ping). They are leaked
    /// until the process ends.
    #[test]
    fn stop_and_failed_adopt_never_close_armed_devices() {
        let cell = Arc::new(EvidenceCell::default());
        let (p, _rt) =
            Pinger::start(cell.clone(), budget(), Duration::from_millis(10), false).unwrap();
        let dev = MemoryWatchdog::new(3);
        let closed = dev.closed_flag();
        p.adopt(vec![Box::new(dev)]);
        thread::sleep(Duration::from_millis(50));
        let commands = p.commands.clone();
        p.stop();
        assert!(
            !closed.load(Ordering::SeqCst),
            "Pinger::stop closed an armed device"
        );
        // The thread is gone: a late adopt must not drop (close) the devices.
        let late = MemoryWatchdog::new(3);
        let late_closed = late.closed_flag();
        let late_pinger = Pinger {
            commands,
            events: audit::queue(1).1,
            stats: Arc::new(PingStats::default()),
            thread: None,
        };
        late_pinger.adopt(vec![Box::new(late)]);
        assert!(
            !late_closed.load(Ordering::SeqCst),
            "adopt to a dead pinger closed an armed device"
        );
    }

    fn pings(log: &crate::watchdog::fake::MemoryLog) -> Vec<BootTime> {
        log.lock()
            .unwrap()
            .iter()
            .filter_map(|op| match op {
                crate::watchdog::FakeOp::Ping { at } => Some(*at),
                _ => None,
            })
            .collect()
    }

    fn drain(p: &Pinger) -> Vec<Event> {
        std::iter::from_fn(|| p.events.try_recv()).collect()
    }

    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}
