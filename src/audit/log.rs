//! The driver part of the audit: the append-only file, its verification, and
//! the non-blocking handoff from the pinger.
//!
//! File format: `<dir>/<node>.audit.jsonl`, one [`Record`] per line, each line
//! ended by `\n`. A record's `prev` is the previous record's `hash`, so
//! editing, removing or reordering records breaks the chain.
//!
//! Torn tails: a crash during a write can leave a last line without its `\n`,
//! or (on some file systems) an unparsable last line such as NUL bytes. That
//! is not tampering. [`AuditLog::open`] moves those bytes to `<file>.torn`
//! (appended, with a header line, so nothing is lost), truncates the log to
//! its last whole record, and appends a `torn_tail_recovered` record, so the
//! chain itself says what happened and [`verify`] passes with a note.

use super::{value_hash, Event, Record, GENESIS};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::Arc;

/// Most events one [`Receiver::drain_into`] call writes.
pub const DRAIN_MAX: usize = 4096;

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The kernel's id of the current boot.
pub fn current_boot_id() -> io::Result<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_owned())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {BOOT_ID_PATH}: {e}")))
}

/// The path of a node's log in `dir`.
pub fn log_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.audit.jsonl"))
}

/// A torn last line found (and, by `open`, moved aside).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TornTail {
    /// 1-based line number of the torn line.
    pub line_no: usize,
    /// Byte offset where it starts (= length of the good part).
    pub offset: u64,
    pub bytes: u64,
    /// Where `open` saved the bytes; `None` in a [`verify`] report.
    pub saved_to: Option<PathBuf>,
}

/// Result of checking a whole log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    /// Whole records read (a torn tail is not counted).
    pub records: u64,
    /// Every hash, prev link and seq step holds (a torn tail alone does not
    /// make a log un-intact).
    pub intact: bool,
    /// The first broken or missing link: (1-based line number, what).
    pub first_break: Option<(usize, String)>,
    /// The file ends in a torn line right now (a crash during a write that no
    /// agent start-up has recovered yet).
    pub torn_tail: bool,
    /// Things an auditor should know that are not breaks, e.g. torn tails
    /// recovered earlier.
    pub notes: Vec<String>,
}

/// What [`AuditLog::open`] found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub path: PathBuf,
    /// Whole records already in the file.
    pub records: u64,
    /// The last whole record before this start-up (the chain continues from it).
    pub last: Option<Record>,
    /// A torn last line that was moved to the `.torn` side file.
    pub torn: Option<TornTail>,
    /// The existing chain's first break, if any (tampering or corruption: the
    /// agent should warn loudly; the new records still chain to the last one).
    pub first_break: Option<(usize, String)>,
    /// The last run of the agent in the file (its records since the last
    /// `startup`) stopped cleanly: see [`stopped_cleanly`].
    pub last_run_stopped_cleanly: bool,
    /// (seq, hash) of every whole record, for [`OpenReport::check_anchor`].
    anchor_hashes: Vec<(u64, String)>,
}

struct Scan {
    records: Vec<(usize, Record)>,
    first_break: Option<(usize, String)>,
    torn: Option<TornTail>,
    notes: Vec<String>,
}

/// Checks a log's bytes. Pure, shared by `open` and `verify`.
fn scan(bytes: &[u8]) -> Scan {
    // Split into lines with their offsets; a trailing segment without '\n' is torn.
    let mut lines: Vec<(usize, &[u8])> = Vec::new();
    let mut start = 0;
    let mut torn = None;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'\n' {
            lines.push((start, &bytes[start..i]));
            start = i + 1;
        }
    }
    if start < bytes.len() {
        torn = Some(TornTail {
            line_no: lines.len() + 1,
            offset: start as u64,
            bytes: (bytes.len() - start) as u64,
            saved_to: None,
        });
    } else if let Some((off, last)) = lines.last() {
        // A whole but unparsable last line is what a crash leaves on file
        // systems that extend the size before the data lands (NUL bytes).
        if serde_json::from_slice::<Value>(last).is_err() {
            torn = Some(TornTail {
                line_no: lines.len(),
                offset: *off as u64,
                bytes: last.len() as u64 + 1,
                saved_to: None,
            });
            lines.pop();
        }
    }

    let mut parsed: Vec<(usize, Option<Record>, Result<(), String>)> = Vec::new();
    for (i, (_, line)) in lines.iter().enumerate() {
        let line_no = i + 1;
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                parsed.push((
                    line_no,
                    None,
                    Err(format!("line {line_no}: not JSON ({e})")),
                ));
                continue;
            }
        };
        let stored = v.get("hash").and_then(Value::as_str).map(str::to_owned);
        let computed = value_hash(&v);
        match serde_json::from_value::<Record>(v) {
            Ok(r) => {
                let check = if stored.as_deref() == Some(computed.as_str()) {
                    Ok(())
                } else {
                    Err(format!("record {}: hash mismatch (edited)", r.seq))
                };
                parsed.push((line_no, Some(r), check));
            }
            Err(e) => parsed.push((
                line_no,
                None,
                Err(format!("line {line_no}: not an audit record ({e})")),
            )),
        }
    }

    let mut first_break: Option<(usize, String)> = None;
    let brk = |line_no: usize, what: String, fb: &mut Option<(usize, String)>| {
        if fb.is_none() {
            *fb = Some((line_no, what));
        }
    };
    let mut notes = Vec::new();
    let mut records = Vec::new();
    let mut last: Option<(u64, String)> = None; // (seq, hash) of the previous record
    for idx in 0..parsed.len() {
        let (line_no, rec, check) = &parsed[idx];
        if let Err(what) = check {
            brk(*line_no, what.clone(), &mut first_break);
        }
        let Some(r) = rec else { continue };
        let expected = last.as_ref().map_or(0, |(s, _)| s + 1);
        if r.seq != expected {
            let what = match &last {
                None => format!(
                    "first record has seq {}, expected 0 (records missing at the start)",
                    r.seq
                ),
                Some((ps, _)) if r.seq > expected => {
                    let later = parsed[idx + 1..]
                        .iter()
                        .any(|(_, x, _)| x.as_ref().is_some_and(|x| x.seq == expected));
                    if later {
                        format!(
                            "record {} appears after record {} (records reordered)",
                            expected, r.seq
                        )
                    } else {
                        format!(
                            "seq jumps from {ps} to {} (record {expected}{} missing)",
                            r.seq,
                            if r.seq - expected > 1 {
                                format!("..{}", r.seq - 1)
                            } else {
                                String::new()
                            }
                        )
                    }
                }
                Some((ps, _)) => format!(
                    "seq goes back from {ps} to {} (records reordered or duplicated)",
                    r.seq
                ),
            };
            brk(*line_no, what, &mut first_break);
        }
        let want_prev = last.as_ref().map_or(GENESIS, |(_, h)| h.as_str());
        if r.prev != want_prev {
            let what = match &last {
                None => format!("record {}: prev is not the genesis value", r.seq),
                Some((ps, _)) => format!(
                    "record {}: prev does not match record {ps} (a record is missing or reordered)",
                    r.seq
                ),
            };
            brk(*line_no, what, &mut first_break);
        }
        if let Event::TornTailRecovered {
            bytes,
            offset,
            saved_to,
        } = &r.event
        {
            notes.push(format!(
                "record {}: a torn tail of {bytes} bytes at offset {offset} (a crash during a write) was moved to {saved_to}",
                r.seq
            ));
        }
        last = Some((r.seq, r.hash.clone()));
        records.push((*line_no, r.clone()));
    }
    if let Some(t) = &torn {
        notes.push(format!(
            "line {}: torn last line of {} bytes (a crash during a write, not tampering); \
             the next start-up moves it aside",
            t.line_no, t.bytes
        ));
    }
    Scan {
        records,
        first_break,
        torn,
        notes,
    }
}

fn report_of(scan: &Scan) -> VerifyReport {
    VerifyReport {
        records: scan.records.len() as u64,
        intact: scan.first_break.is_none(),
        first_break: scan.first_break.clone(),
        torn_tail: scan.torn.is_some(),
        notes: scan.notes.clone(),
    }
}

/// Checks every hash, every `prev` link and seq continuity of a log file.
///
/// Limit: a *clean* truncation (whole last records removed) leaves a valid
/// chain and cannot be seen from the file alone; only an outside anchor (the
/// last seq/hash the agent mirrored to etcd, or another node's view) shows it.
pub fn verify(path: &Path) -> io::Result<VerifyReport> {
    let bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    Ok(report_of(&scan(&bytes)))
}

/// Reads a log's whole records and its verification report (for the timeline).
pub fn read_log(path: &Path) -> io::Result<(Vec<Record>, VerifyReport)> {
    let bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    let s = scan(&bytes);
    let rep = report_of(&s);
    Ok((s.records.into_iter().map(|(_, r)| r).collect(), rep))
}

/// Parses records mirrored to etcd (one JSON record per value). Returns the
/// records and, for each value that is not a record, why (with its index).
pub fn parse_history<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Record>, Vec<String>) {
    let mut recs = Vec::new();
    let mut errs = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        match serde_json::from_slice::<Record>(v) {
            Ok(r) => recs.push(r),
            Err(e) => errs.push(format!("history value {i}: not an audit record ({e})")),
        }
    }
    (recs, errs)
}

/// The append-only writer of one node's log.
pub struct AuditLog {
    file: File,
    path: PathBuf,
    node: String,
    boot_id: String,
    next_seq: u64,
    last_hash: String,
    /// Length of the file up to the last whole record.
    len: u64,
}

impl AuditLog {
    /// Opens (creating `dir` and the file if needed) `<dir>/<node>.audit.jsonl`
    /// and continues its chain from the last whole record. A torn last line is
    /// moved to `<file>.torn` and recorded (see the module doc).
    pub fn open(dir: &Path, node: &str) -> io::Result<(AuditLog, OpenReport)> {
        Self::open_with_boot_id(dir, node, &current_boot_id()?)
    }

    /// [`AuditLog::open`] with the boot id given (tests simulate reboots with it).
    pub fn open_with_boot_id(
        dir: &Path,
        node: &str,
        boot_id: &str,
    ) -> io::Result<(AuditLog, OpenReport)> {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
        })?;
        let path = log_path(dir, node);
        let ctx = |e: io::Error, what: &str| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| ctx(e, "cannot open"))?;
        lock_exclusive(&file).map_err(|e| ctx(e, "cannot lock"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| ctx(e, "cannot read"))?;
        let mut s = scan(&bytes);

        if let Some(t) = &mut s.torn {
            // Save the torn bytes durably before cutting them off the log.
            let side = path.with_extension("jsonl.torn");
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&side)
                .map_err(|e| ctx(e, &format!("cannot open {} for", side.display())))?;
            writeln!(
                f,
                "# torn tail of {} at byte offset {} ({} bytes), moved aside at wall_ns {}",
                path.display(),
                t.offset,
                t.bytes,
                crate::clock::wall_nanos()
            )?;
            f.write_all(&bytes[t.offset as usize..])?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            file.set_len(t.offset)
                .map_err(|e| ctx(e, "cannot truncate torn tail of"))?;
            file.sync_all()?;
            t.saved_to = Some(side);
        }
        let len = file.seek(SeekFrom::End(0))?;
        if bytes.is_empty() {
            // A new file: make its directory entry durable too.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }

        let last = s.records.last().map(|(_, r)| r.clone());
        let mut log = AuditLog {
            file,
            path: path.clone(),
            node: node.to_owned(),
            boot_id: boot_id.to_owned(),
            next_seq: last.as_ref().map_or(0, |r| r.seq + 1),
            last_hash: last.as_ref().map_or(GENESIS.to_owned(), |r| r.hash.clone()),
            len,
        };
        let report = OpenReport {
            path,
            records: s.records.len() as u64,
            last,
            torn: s.torn.clone(),
            first_break: s.first_break.clone(),
            last_run_stopped_cleanly: {
                let recs: Vec<Record> = s.records.iter().map(|(_, r)| r.clone()).collect();
                stopped_cleanly(&recs)
            },
            anchor_hashes: s
                .records
                .iter()
                .map(|(_, r)| (r.seq, r.hash.clone()))
                .collect(),
        };
        if let Some(t) = &report.torn {
            log.append(
                None,
                Event::TornTailRecovered {
                    bytes: t.bytes,
                    offset: t.offset,
                    saved_to: t
                        .saved_to
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                },
            )?;
        }
        Ok((log, report))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The seq the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one record and fsyncs it: when this returns Ok, the record
    /// survives a crash. Use it for records that decide a fence, before the
    /// action they justify.
    pub fn append(&mut self, rev: Option<i64>, event: Event) -> io::Result<Record> {
        let r = self.append_nosync(rev, event)?;
        self.sync()?;
        Ok(r)
    }

    /// Appends one record without fsync (a later [`AuditLog::sync`] or
    /// `append` makes it durable): for batches drained from the queue.
    pub fn append_nosync(&mut self, rev: Option<i64>, event: Event) -> io::Result<Record> {
        let mut r = Record {
            seq: self.next_seq,
            node: self.node.clone(),
            wall_ns: crate::clock::wall_nanos().min(u64::MAX as u128) as u64,
            boot_ns: crate::clock::now().as_nanos(),
            boot_id: self.boot_id.clone(),
            rev,
            event,
            prev: self.last_hash.clone(),
            hash: String::new(),
        };
        r.hash = super::record_hash(&r);
        let mut line = serde_json::to_string(&r).map_err(io::Error::other)?;
        line.push('\n');
        // One write of the whole line: a crash leaves at most a torn last line.
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            // A partial write (e.g. ENOSPC) must not stay in the middle of the
            // chain when a later append succeeds: cut it back.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::End(0));
            return Err(io::Error::new(
                e.kind(),
                format!("cannot append to {}: {e}", self.path.display()),
            ));
        }
        self.len += line.len() as u64;
        self.next_seq += 1;
        self.last_hash = r.hash.clone();
        Ok(r)
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot fsync {}: {e}", self.path.display()),
            )
        })
    }
}

/// Takes an advisory exclusive lock on the log for as long as `file` is open:
/// two writers would interleave two chains into one broken file.
fn lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid open descriptor; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "another process (a second leasedog agent?) holds the log open for writing",
        ))
    } else {
        Err(e)
    }
}

impl OpenReport {
    /// Compares the log with an outside anchor: the last `(seq, hash)` the
    /// agent mirrored to etcd (or any copy kept elsewhere). This is what sees
    /// a clean truncation, which the chain alone cannot. `None` if consistent.
    pub fn check_anchor(&self, seq: u64, hash: &str) -> Option<String> {
        match &self.last {
            None => Some(format!(
                "{} is empty but the anchor says record {seq} was written (the log was removed or truncated)",
                self.path.display()
            )),
            Some(l) if l.seq < seq => Some(format!(
                "{} ends at record {} but the anchor says record {seq} was written (records removed from the end)",
                self.path.display(),
                l.seq
            )),
            // The anchored record must still be in the file, unchanged.
            Some(_) => {
                let ok = self
                    .anchor_hashes
                    .iter()
                    .any(|(s, h)| *s == seq && h == hash);
                (!ok).then(|| {
                    format!(
                        "{}: record {seq} differs from the anchor (rewritten)",
                        self.path.display()
                    )
                })
            }
        }
    }
}

/// Whether the agent's last run (the records after the last `startup`)
/// ended in a completed, clean stop. The `shutdown` record comes first in a
/// stop, not last: a leader then steps down, releases the key and disarms
/// before it exits. So the run is clean when it recorded `shutdown`, no
/// step-down failed after it, its last lifecycle record is the end of a
/// stop (`shutdown` itself for a replica, `released` for a leader without
/// devices, `disarmed`), and no device was left armed (armed after the last
/// `disarmed`, or kept armed for nowayout: that device resets the node, and
/// the next start-up must report it).
pub fn stopped_cleanly(records: &[Record]) -> bool {
    let from = records
        .iter()
        .rposition(|r| matches!(r.event, Event::Startup { .. }))
        .unwrap_or(0);
    let run = &records[from..];
    let last_index = |f: fn(&Event) -> bool| run.iter().rposition(|r| f(&r.event));
    let Some(shutdown) = last_index(|e| matches!(e, Event::Shutdown { .. })) else {
        return false;
    };
    if run[shutdown..]
        .iter()
        .any(|r| matches!(r.event, Event::StepDownFailed { .. }))
    {
        return false;
    }
    let armed = last_index(|e| matches!(e, Event::Armed { .. }));
    let disarmed = last_index(|e| matches!(e, Event::Disarmed { .. }));
    let kept = last_index(|e| matches!(e, Event::NowayoutKeptArmed { .. }));
    let left_armed = armed > disarmed || (kept.is_some() && kept >= armed);
    let last = run
        .iter()
        .rev()
        .find(|r| r.event.is_lifecycle() && !matches!(r.event, Event::TornTailRecovered { .. }));
    let ends_a_stop = last.is_some_and(|r| {
        matches!(
            r.event,
            Event::Shutdown { .. } | Event::Released { .. } | Event::Disarmed { .. }
        )
    });
    ends_a_stop && !left_armed
}

/// The previous boot, as the last record before this start-up shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousBoot {
    pub boot_id: String,
    /// Wall clock of the last record written in that boot.
    pub last_record_wall: u64,
    pub last_seq: u64,
    pub last_event: Event,
    /// The agent's last run stopped cleanly before the reboot
    /// ([`stopped_cleanly`]). Otherwise the boot ended under a running
    /// agent, or with a device it left armed (a reset, a crash or a power
    /// loss); the devices' boot status says which.
    pub clean_shutdown: bool,
}

/// Whether the log's last record was written in another boot than
/// `current_boot_id`, and what it was. The agent warns when
/// `!clean_shutdown`, and fills `Startup.previous_boot_id` from it.
pub fn previous_boot(report: &OpenReport, current_boot_id: &str) -> Option<PreviousBoot> {
    let last = report.last.as_ref()?;
    if last.boot_id == current_boot_id {
        return None;
    }
    Some(PreviousBoot {
        boot_id: last.boot_id.clone(),
        last_record_wall: last.wall_ns,
        last_seq: last.seq,
        last_event: last.event.clone(),
        clean_shutdown: report.last_run_stopped_cleanly,
    })
}

/// Producer half of the pinger's handoff: never blocks, never allocates a
/// lock the consumer can hold. Clone it freely.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::SyncSender<Event>,
    dropped: Arc<AtomicU64>,
}

/// Consumer half: drained by a writer thread or the main loop.
pub struct Receiver {
    rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
}

/// A bounded queue of `capacity` events (at least 1).
pub fn queue(capacity: usize) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::sync_channel(capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Sender {
            tx,
            dropped: dropped.clone(),
        },
        Receiver { rx, dropped },
    )
}

impl Sender {
    /// Hands an event over, or counts it as dropped if the queue is full (or
    /// the consumer is gone). Returns whether it was queued. Never blocks:
    /// std's bounded channel `try_send` is a lock-free array slot claim.
    pub fn try_push(&self, event: Event) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Events dropped and not yet recorded.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Receiver {
    /// Writes every queued event to `log`, then a `queue_dropped` record if
    /// events were dropped since the last drain, then one fsync. Returns the
    /// number of records written.
    pub fn drain_into(&self, log: &mut AuditLog) -> io::Result<usize> {
        let mut n = 0;
        // Bounded, so a producer pushing as fast as we write cannot keep the
        // consumer here forever.
        while n < DRAIN_MAX {
            let Ok(ev) = self.rx.try_recv() else { break };
            log.append_nosync(None, ev)?;
            n += 1;
        }
        let count = self.dropped.swap(0, Ordering::Relaxed);
        if count > 0 {
            log.append_nosync(None, Event::QueueDropped { count })?;
            n += 1;
        }
        if n > 0 {
            log.sync()?;
        }
        Ok(n)
    }

    /// The next queued event, if any (never blocks).
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Events dropped and not yet recorded.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events dropped since the last call (the caller records the count).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the next event (for a writer thread).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }
}

#[cfg(test)]
mod tests;
