//! Stand-ins for a watchdog device, for tests.
//!
//! - [`FakeWatchdog`] (config `kind = "fake"`, builds with the `testing`
//!   feature only): appends one line per operation to a record file, with
//!   O_APPEND and one `write` per line and no fsync, so a test can read it
//!   while the agent is SIGSTOPped. Lines: `arm <w_secs> <boottime_ns>`,
//!   `ping <boottime_ns>`, `disarm <boottime_ns>`; timestamps are
//!   CLOCK_BOOTTIME ([`crate::clock::now`]) so a test on the same host can
//!   compare them with its own clock. A dropped (not disarmed) handle writes
//!   nothing: like a real device it stays "armed".
//! - [`MemoryWatchdog`]: the same operations into a shared in-memory log, for
//!   unit tests of the pinger.

use super::{ArmedInfo, Watchdog};
use crate::clock::{self, BootTime};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One recorded operation on a fake device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeOp {
    Arm { w_secs: u32, at: BootTime },
    Ping { at: BootTime },
    Disarm { at: BootTime },
}

impl FakeOp {
    pub fn at(&self) -> BootTime {
        match *self {
            FakeOp::Arm { at, .. } | FakeOp::Ping { at } | FakeOp::Disarm { at } => at,
        }
    }

    /// The record-file line, with its newline.
    pub fn to_line(&self) -> String {
        match *self {
            FakeOp::Arm { w_secs, at } => format!("arm {w_secs} {}\n", at.as_nanos()),
            FakeOp::Ping { at } => format!("ping {}\n", at.as_nanos()),
            FakeOp::Disarm { at } => format!("disarm {}\n", at.as_nanos()),
        }
    }

    pub fn parse_line(line: &str) -> Option<FakeOp> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ns = |s: &str| s.parse::<u64>().ok().map(BootTime::from_nanos);
        match f.as_slice() {
            ["arm", w, at] => Some(FakeOp::Arm {
                w_secs: w.parse().ok()?,
                at: ns(at)?,
            }),
            ["ping", at] => Some(FakeOp::Ping { at: ns(at)? }),
            ["disarm", at] => Some(FakeOp::Disarm { at: ns(at)? }),
            _ => None,
        }
    }
}

/// Parses a fake device's record file. A missing file is an error (the device
/// was never armed); a torn last line (the writer died mid-write, which one
/// short O_APPEND write makes very unlikely) is ignored; any other bad line is
/// `InvalidData`.
pub fn read_fake_record(path: &Path) -> io::Result<Vec<FakeOp>> {
    let text = std::fs::read_to_string(path)?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match FakeOp::parse_line(line) {
            Some(op) => out.push(op),
            None if i + 1 == lines.len() && !complete => {}
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}:{}: bad fake-watchdog line {line:?}",
                        path.display(),
                        i + 1
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// A fake device that records into a file (see the module docs).
#[derive(Debug)]
pub struct FakeWatchdog {
    file: File,
    info: ArmedInfo,
    _armed: super::ArmedToken,
}

impl FakeWatchdog {
    /// Opens (creates) `record` for appending and records the arming.
    /// Not gated: [`super::arm`] refuses fake specs outside `testing` builds.
    pub(crate) fn arm(record: &Path, w_secs: u32) -> io::Result<FakeWatchdog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(record)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", record.display())))?;
        let mut fw = FakeWatchdog {
            file,
            info: ArmedInfo {
                path: record.to_owned(),
                identity: "leasedog fake".into(),
                driver: Some("fake".into()),
                w_secs,
                nowayout: false,
                nowayout_assumed: false,
                options: super::flags::WdFlags(
                    super::flags::WDIOF_SETTIMEOUT
                        | super::flags::WDIOF_MAGICCLOSE
                        | super::flags::WDIOF_KEEPALIVEPING,
                ),
                firmware_version: 0,
                bootstatus: None,
            },
            _armed: super::ArmedToken::new(),
        };
        fw.record(FakeOp::Arm {
            w_secs,
            at: clock::now(),
        })?;
        Ok(fw)
    }

    fn record(&mut self, op: FakeOp) -> io::Result<()> {
        let line = op.to_line();
        // One write per line: O_APPEND makes it land whole at the end.
        let n = self.file.write(line.as_bytes())?;
        if n != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write to fake record ({n} of {})", line.len()),
            ));
        }
        Ok(())
    }
}

impl Watchdog for FakeWatchdog {
    fn info(&self) -> &ArmedInfo {
        &self.info
    }

    fn ping(&mut self) -> io::Result<()> {
        self.record(FakeOp::Ping { at: clock::now() })
    }

    fn disarm(mut self: Box<Self>) -> io::Result<()> {
        self.record(FakeOp::Disarm { at: clock::now() })
    }
}

/// The log of a [`MemoryWatchdog`], shared with the test.
pub type MemoryLog = Arc<Mutex<Vec<FakeOp>>>;

/// An in-memory device for unit tests: records arm/ping/disarm into a shared
/// log; pings can be made to fail.
#[derive(Debug)]
pub struct MemoryWatchdog {
    info: ArmedInfo,
    log: MemoryLog,
    fail_pings: Arc<AtomicBool>,
    /// Milliseconds the next ping takes (a slow or preempted write), once.
    delay_next: Arc<AtomicU64>,
    /// Set when the handle is dropped or disarmed: a real device's
    /// descriptor would have been closed (which pings a running device).
    closed: Arc<AtomicBool>,
}

impl Drop for MemoryWatchdog {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl MemoryWatchdog {
    /// An "armed" device with timeout `w_secs`; records `Arm` now.
    pub fn new(w_secs: u32) -> MemoryWatchdog {
        let log: MemoryLog = Arc::new(Mutex::new(vec![FakeOp::Arm {
            w_secs,
            at: clock::now(),
        }]));
        MemoryWatchdog {
            info: ArmedInfo {
                path: "memory".into(),
                identity: "leasedog memory fake".into(),
                driver: None,
                w_secs,
                nowayout: false,
                nowayout_assumed: false,
                options: super::flags::WdFlags(super::flags::WDIOF_SETTIMEOUT),
                firmware_version: 0,
                bootstatus: None,
            },
            log,
            fail_pings: Arc::new(AtomicBool::new(false)),
            delay_next: Arc::new(AtomicU64::new(0)),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True once the handle was dropped or disarmed (its descriptor closed).
    pub fn closed_flag(&self) -> Arc<AtomicBool> {
        self.closed.clone()
    }

    /// Store `ms` to make the next ping take that long before it lands (it
    /// is recorded at the time it lands, like a write that was preempted).
    pub fn delay_next_switch(&self) -> Arc<AtomicU64> {
        self.delay_next.clone()
    }

    /// The shared log (clone it before boxing the device).
    pub fn log(&self) -> MemoryLog {
        self.log.clone()
    }

    /// Set to make every ping fail with an I/O error (and record nothing).
    pub fn fail_switch(&self) -> Arc<AtomicBool> {
        self.fail_pings.clone()
    }

    fn push(&self, op: FakeOp) {
        // A poisoned log still records: a panicking test thread must not hide ops.
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }
}

impl Watchdog for MemoryWatchdog {
    fn info(&self) -> &ArmedInfo {
        &self.info
    }

    fn ping(&mut self) -> io::Result<()> {
        if self.fail_pings.load(Ordering::SeqCst) {
            return Err(io::Error::other("memory watchdog: ping failure injected"));
        }
        let delay = self.delay_next.swap(0, Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        self.push(FakeOp::Ping { at: clock::now() });
        Ok(())
    }

    fn disarm(self: Box<Self>) -> io::Result<()> {
        self.push(FakeOp::Disarm { at: clock::now() });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lines_in_order_with_increasing_times() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("wd.rec");
        let t0 = clock::now();
        let mut w: Box<dyn Watchdog> = Box::new(FakeWatchdog::arm(&rec, 3).unwrap());
        assert_eq!(w.info().w_secs, 3);
        assert!(!w.info().nowayout);
        w.ping().unwrap();
        w.ping().unwrap();
        w.disarm().unwrap();
        let t1 = clock::now();
        let ops = read_fake_record(&rec).unwrap();
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert!(matches!(ops[0], FakeOp::Arm { w_secs: 3, .. }));
        assert!(matches!(ops[1], FakeOp::Ping { .. }));
        assert!(matches!(ops[2], FakeOp::Ping { .. }));
        assert!(matches!(ops[3], FakeOp::Disarm { .. }));
        assert!(ops.windows(2).all(|p| p[0].at() <= p[1].at()), "{ops:?}");
        assert!(t0 <= ops[0].at() && ops[3].at() <= t1);
        // The file is exactly the lines the parser understood.
        let text = std::fs::read_to_string(&rec).unwrap();
        let again: String = ops.iter().map(FakeOp::to_line).collect();
        assert_eq!(text, again);
    }

    #[test]
    fn drop_without_disarm_records_no_disarm() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("wd.rec");
        {
            let mut w = FakeWatchdog::arm(&rec, 2).unwrap();
            w.ping().unwrap();
        }
        let ops = read_fake_record(&rec).unwrap();
        assert_eq!(ops.len(), 2);
        assert!(!ops.iter().any(|o| matches!(o, FakeOp::Disarm { .. })));
    }

    #[test]
    fn parser_round_trips_and_rejects_garbage() {
        let ops = [
            FakeOp::Arm {
                w_secs: 7,
                at: BootTime(5),
            },
            FakeOp::Ping { at: BootTime(6) },
            FakeOp::Disarm {
                at: BootTime(u64::MAX),
            },
        ];
        for op in ops {
            assert_eq!(FakeOp::parse_line(op.to_line().trim_end()), Some(op));
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        std::fs::write(&p, "arm 3 1\nbogus 2\nping 3\n").unwrap();
        let e = read_fake_record(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(":2:"), "{e}");
        // A torn final line is dropped, the rest kept.
        std::fs::write(&p, "arm 3 1\nping 2\npi").unwrap();
        assert_eq!(read_fake_record(&p).unwrap().len(), 2);
        assert!(read_fake_record(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn memory_watchdog_logs_and_fails_on_demand() {
        let m = MemoryWatchdog::new(4);
        let log = m.log();
        let fail = m.fail_switch();
        let mut w: Box<dyn Watchdog> = Box::new(m);
        w.ping().unwrap();
        fail.store(true, Ordering::SeqCst);
        assert!(w.ping().is_err());
        fail.store(false, Ordering::SeqCst);
        w.ping().unwrap();
        w.disarm().unwrap();
        let ops = log.lock().unwrap().clone();
        let kinds: Vec<&str> = ops
            .iter()
            .map(|o| match o {
                FakeOp::Arm { .. } => "arm",
                FakeOp::Ping { .. } => "ping",
                FakeOp::Disarm { .. } => "disarm",
            })
            .collect();
        assert_eq!(kinds, ["arm", "ping", "ping", "disarm"]);
    }
}
