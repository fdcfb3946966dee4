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
use crate::watchdog::Watchdog;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread;
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

/// Ping counts and lateness, readable by anyone at any time.
#[derive(Debug, Default)]
pub struct PingStats {
    pub pings: AtomicU64,
    pub refused: AtomicU64,
    /// BOOTTIME of the last successful ping round.
    pub last_ping_ns: AtomicU64,
    /// Lateness histogram of tick wake-ups, bucket i counts lateness in
    /// [2^i, 2^(i+1)) microseconds (bucket 0 also holds < 1 µs).
    pub lateness_us_log2: [AtomicU64; 24],
    pub max_lateness_ns: AtomicU64,
    /// Sum of all lateness, for the Prometheus histogram's `_sum`.
    pub lateness_sum_ns: AtomicU64,
}

impl PingStats {
    fn note_lateness(&self, late: Duration) {
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

    /// Hands devices to the pinger.
    pub fn adopt(&self, devices: Vec<Box<dyn Watchdog>>) {
        if !devices.is_empty() {
            let _ = self.commands.send(Command::Adopt(devices));
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

    /// Stops the thread. Devices it still holds are dropped WITHOUT magic
    /// close, i.e. left armed (rule 4: never disarm on an exit path).
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
    pings: u64,
    max_k_minus_s: Duration,
    last_s: Option<BootTime>,
    since: Option<BootTime>,
}

impl Summary {
    fn note(&mut self, k: BootTime, s: BootTime) {
        self.pings += 1;
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
                    let _ = reply.send(std::mem::take(&mut devices));
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    summary.flush(clock::now(), true, &events);
                    return;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        let now = clock::now();
        let ev = cell.load();
        if !devices.is_empty() {
            if permits(ev, now, budget) {
                let mut ok = true;
                for d in devices.iter_mut() {
                    if let Err(e) = d.ping() {
                        ok = false;
                        events.try_push(Event::PingFailed {
                            device: d.info().path.display().to_string(),
                            error: e.to_string(),
                        });
                    }
                }
                if ok {
                    stats.pings.fetch_add(1, Ordering::Relaxed);
                    stats.last_ping_ns.store(now.as_nanos(), Ordering::Relaxed);
                    if let Evidence::Lease(s) | Evidence::Liveness(s) = ev {
                        summary.note(now, s);
                    }
                }
                summary.flush(now, false, &events);
            } else {
                summary.flush(now, true, &events);
                if let Evidence::Lease(s) = ev {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    events.try_push(Event::PingRefused {
                        k_minus_s_ns: now.saturating_since(s).as_nanos() as u64,
                        s_ns: s.as_nanos(),
                    });
                }
            }
        }
        // Sleep to the next tick on the absolute schedule; note how late we woke.
        let now = clock::now();
        if now < next {
            thread::sleep(next.saturating_since(now));
        }
        let woke = clock::now();
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
