//! The host-level reset stand-in for tests on one machine: a monitor that
//! watches a fake watchdog device's record (lines `arm <w> <ns>`, `ping <ns>`,
//! `disarm <ns>`, CLOCK_BOOTTIME) and, when the device is armed and its last
//! ping is more than `W` old, does what the kernel would do on expiry: it
//! freezes and SIGKILLs the node (the agent and every PostgreSQL process the
//! `victims` closure names), like sbd's test bed. After such a "reset" the
//! device counts as closed until the record shows a new `arm`.
//!
//! It stands in for a reset ONLY in tests: the real one is the QEMU lab's.

use crate::etcd::boottime_ns;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One expiry the monitor acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// CLOCK_BOOTTIME when the victims were frozen (the "reset").
    pub at_ns: u64,
    /// The last ping (or the arming) before the expiry.
    pub last_ping_ns: u64,
    /// The device timeout from the `arm` line.
    pub w_secs: u64,
    /// Processes frozen and killed.
    pub pids: Vec<i32>,
}

/// What the record says so far; advanced line by line.
#[derive(Debug, Default)]
struct DeviceState {
    consumed: usize,
    /// `(w_secs, last ping ns)` while armed.
    armed: Option<(u64, u64)>,
}

impl DeviceState {
    /// Feeds the complete lines of `text` not seen yet.
    fn advance(&mut self, text: &str) {
        if text.len() < self.consumed {
            *self = DeviceState::default(); // truncated: start over
        }
        let fresh = &text[self.consumed..];
        let complete = match fresh.rfind('\n') {
            Some(i) => &fresh[..=i],
            None => return,
        };
        for line in complete.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match f.first().copied() {
                Some("arm") => {
                    if let (Some(w), Some(at)) = (num(1), num(2)) {
                        self.armed = Some((w, at));
                    }
                }
                Some("ping") => {
                    if let (Some((_, last)), Some(at)) = (self.armed.as_mut(), num(1)) {
                        *last = (*last).max(at);
                    }
                }
                Some("disarm") => self.armed = None,
                _ => {}
            }
        }
        self.consumed += complete.len();
    }

    /// `Some(last_ping, w)` if the device has expired at `now`.
    fn expired(&self, now: u64) -> Option<(u64, u64)> {
        let (w, last) = self.armed?;
        (now > last + w * 1_000_000_000).then_some((last, w))
    }
}

pub struct FakeWatchdogMonitor {
    record: PathBuf,
    stop: Arc<AtomicBool>,
    kills: Arc<Mutex<Vec<Kill>>>,
    thread: Option<JoinHandle<()>>,
}

/// How often the record is read: the "reset" lands within this of `last ping + W`.
const POLL: Duration = Duration::from_millis(10);

impl FakeWatchdogMonitor {
    /// The reset stand-in for one node: on expiry, kills the agent whose pid
    /// `agent_pid` holds (0 = none yet) and every process of the PostgreSQL
    /// running in `data_dir`.
    pub fn for_node(
        record: impl Into<PathBuf>,
        agent_pid: std::sync::Arc<std::sync::atomic::AtomicI32>,
        data_dir: PathBuf,
    ) -> FakeWatchdogMonitor {
        FakeWatchdogMonitor::start(record, move || {
            let mut v = vec![agent_pid.load(std::sync::atomic::Ordering::SeqCst)];
            v.extend(crate::pg::processes_in(&data_dir));
            v
        })
    }

    /// Watches `record`; on expiry SIGKILLs every pid `victims()` returns
    /// (called at that moment, so it can name a restarted agent).
    pub fn start(
        record: impl Into<PathBuf>,
        victims: impl Fn() -> Vec<i32> + Send + 'static,
    ) -> FakeWatchdogMonitor {
        let record = record.into();
        let stop = Arc::new(AtomicBool::new(false));
        let kills = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (record, stop, kills) = (record.clone(), stop.clone(), kills.clone());
            std::thread::Builder::new()
                .name("fake-wd-monitor".into())
                .spawn(move || {
                    let mut state = DeviceState::default();
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(text) = std::fs::read_to_string(&record) {
                            state.advance(&text);
                        }
                        if let Some((last_ping_ns, w_secs)) = state.expired(boottime_ns()) {
                            let (at_ns, pids) = reset(&victims);
                            state.armed = None; // the reset closed the device
                            kills.lock().unwrap().push(Kill {
                                at_ns,
                                last_ping_ns,
                                w_secs,
                                pids,
                            });
                        }
                        std::thread::sleep(POLL);
                    }
                })
                .expect("spawn the fake watchdog monitor")
        };
        FakeWatchdogMonitor {
            record,
            stop,
            kills,
            thread: Some(thread),
        }
    }

    pub fn record(&self) -> &Path {
        &self.record
    }

    /// Every expiry acted on so far.
    pub fn kills(&self) -> Vec<Kill> {
        self.kills.lock().unwrap().clone()
    }

    /// The first kill at or after `after_ns`, waiting up to `timeout`.
    pub fn wait_kill(&self, after_ns: u64, timeout: Duration) -> Option<Kill> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(k) = self.kills().into_iter().find(|k| k.at_ns >= after_ns) {
                return Some(k);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeWatchdogMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill has no memory preconditions; ESRCH is ignored.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Freezes every victim (so none can fork or act), looks again for
/// processes started meanwhile, then SIGKILLs them all.
fn reset(victims: &dyn Fn() -> Vec<i32>) -> (u64, Vec<i32>) {
    let mut pids = victims();
    for &p in &pids {
        signal(p, libc::SIGSTOP);
    }
    let at = boottime_ns();
    for p in victims() {
        if !pids.contains(&p) {
            signal(p, libc::SIGSTOP);
            pids.push(p);
        }
    }
    for &p in &pids {
        signal(p, libc::SIGKILL);
    }
    (at, pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_arm_ping_disarm_and_partial_lines() {
        let mut s = DeviceState::default();
        s.advance("arm 2 100\nping 200\nping 3");
        assert_eq!(s.armed, Some((2, 200)));
        assert_eq!(s.expired(2_000_000_200), None);
        assert_eq!(s.expired(2_000_000_201), Some((200, 2)));
        s.advance("arm 2 100\nping 200\nping 300\n");
        assert_eq!(s.armed, Some((2, 300)));
        s.advance("arm 2 100\nping 200\nping 300\ndisarm 400\n");
        assert_eq!(s.armed, None);
        assert_eq!(s.expired(u64::MAX / 2), None);
        s.advance("");
        assert_eq!(s.consumed, 0, "truncation restarts");
    }

    #[test]
    fn an_expired_device_kills_the_victims_once() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("wd");
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let now = boottime_ns();
        std::fs::write(&rec, format!("arm 1 {now}\nping {now}\n")).unwrap();
        let m = FakeWatchdogMonitor::start(&rec, move || vec![pid]);
        let k = m.wait_kill(0, Duration::from_secs(10)).expect("killed");
        assert!(k.at_ns > now + 1_000_000_000, "not before last ping + W");
        assert_eq!(k.pids, vec![pid]);
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(m.kills().len(), 1, "a reset closes the device");
    }
}
