use super::*;
use crate::audit::{BudgetRecord, DeviceRecord};
use std::time::{Duration, Instant};

const BOOT_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const BOOT_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn startup() -> Event {
    Event::Startup {
        version: "0.1.0".into(),
        config_digest: crate::audit::digest_hex(b"node = \"pg1\""),
        budget: BudgetRecord {
            ttl_s: 5,
            margin_s: 2.0,
            reset_allowance_s: 1.0,
            loop_interval_s: 0.5,
        },
        devices: vec![DeviceRecord {
            path: "/dev/watchdog0".into(),
            identity: "i6300ESB timer".into(),
            timeout_s: 3,
            nowayout: false,
            bootstatus: Some(0),
            watchdog_reset: false,
        }],
        previous_boot_id: None,
        previous_boot_reset: None,
    }
}

/// A log of `n` records (startup + pings refused) in a fresh temp dir.
fn write_log(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert_eq!(rep.records, 0);
    assert!(rep.last.is_none() && rep.torn.is_none() && rep.first_break.is_none());
    log.append(None, startup()).unwrap();
    for i in 1..n {
        log.append(
            Some(100 + i as i64),
            Event::PingRefused {
                k_minus_s_ns: 1_000_000_000 + i,
                s_ns: 5_000_000_000 * i,
            },
        )
        .unwrap();
    }
    let path = log.path().to_owned();
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

#[test]
fn append_then_verify_is_intact_and_reopen_continues_the_chain() {
    let (dir, path) = write_log(5);
    assert_eq!(path, log_path(dir.path(), "pg1"));
    let r = verify(&path).unwrap();
    assert_eq!(r.records, 5);
    assert!(r.intact, "{r:?}");
    assert!(!r.torn_tail && r.first_break.is_none());

    // Each line parses back into a record whose hash checks out.
    let (recs, _) = read_log(&path).unwrap();
    assert!(recs.iter().all(Record::hash_ok));
    assert_eq!(recs[0].prev, crate::audit::GENESIS);
    assert_eq!(recs[3].prev, recs[2].hash);
    assert_eq!(recs[2].rev, Some(102));

    let (mut log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert_eq!(rep.records, 5);
    assert_eq!(rep.last.as_ref().unwrap().seq, 4);
    assert_eq!(log.next_seq(), 5);
    let r5 = log.append(None, Event::Promoted).unwrap();
    assert_eq!(r5.seq, 5);
    assert_eq!(r5.prev, recs[4].hash);
    assert!(verify(&path).unwrap().intact);
}

#[test]
fn an_edited_record_is_a_hash_mismatch() {
    let (_d, path) = write_log(6);
    let mut l = lines(&path);
    l[3] = l[3].replace("\"k_minus_s_ns\":1000000003", "\"k_minus_s_ns\":900000003");
    assert_ne!(lines(&path)[3], l[3], "the edit must change the line");
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert!(!r.intact);
    assert_eq!(
        r.first_break,
        Some((4, "record 3: hash mismatch (edited)".into()))
    );
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let (_d, path) = write_log(6);
    let mut l = lines(&path);
    let mut v: Value = serde_json::from_str(&l[3]).unwrap();
    v["k_minus_s_ns"] = 5.into();
    let h = crate::audit::value_hash(&v);
    v["hash"] = h.into();
    l[3] = serde_json::to_string(&v).unwrap();
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert_eq!(
        r.first_break,
        Some((
            5,
            "record 4: prev does not match record 3 (a record is missing or reordered)".into()
        ))
    );
}

#[test]
fn an_added_field_is_an_edit() {
    let (_d, path) = write_log(3);
    let mut l = lines(&path);
    l[1] = l[1].replacen('{', "{\"note\":\"all fine\",", 1);
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert_eq!(
        r.first_break,
        Some((2, "record 1: hash mismatch (edited)".into()))
    );
}

#[test]
fn a_removed_record_is_a_seq_jump() {
    let (_d, path) = write_log(6);
    let mut l = lines(&path);
    l.remove(3);
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert!(!r.intact);
    assert_eq!(
        r.first_break,
        Some((4, "seq jumps from 2 to 4 (record 3 missing)".into()))
    );
    assert_eq!(r.records, 5);
}

#[test]
fn a_removed_first_record_is_seen() {
    let (_d, path) = write_log(3);
    let mut l = lines(&path);
    l.remove(0);
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert_eq!(
        r.first_break,
        Some((
            1,
            "first record has seq 1, expected 0 (records missing at the start)".into()
        ))
    );
}

#[test]
fn a_reordered_pair_is_named() {
    let (_d, path) = write_log(6);
    let mut l = lines(&path);
    l.swap(2, 3);
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert!(!r.intact);
    assert_eq!(
        r.first_break,
        Some((
            3,
            "record 2 appears after record 3 (records reordered)".into()
        ))
    );
}

/// The honest limit: removing whole records at the end leaves a valid chain.
/// The file alone cannot show it; the next start-up's OpenReport shows the
/// last seq it continues from, which the agent can compare with the last
/// seq it mirrored to etcd.
#[test]
fn a_clean_truncation_is_invisible_to_the_chain_alone() {
    let (dir, path) = write_log(6);
    let all = lines(&path);
    let mut l = all.clone();
    l.truncate(4);
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert!(r.intact, "a clean truncation is undetectable from the file");
    assert_eq!(r.records, 4);
    let (_log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert_eq!(rep.last.as_ref().unwrap().seq, 3);
    // The outside anchor the agent mirrored (last seq 5 and its hash) sees it.
    let anchor: Record = serde_json::from_str(&all[5]).unwrap();
    let why = rep.check_anchor(5, &anchor.hash).expect("truncation seen");
    assert!(why.contains("ends at record 3"), "{why}");
    // An anchor at a record still present and unchanged is consistent; a
    // wrong hash for it is a rewrite.
    let r2: Record = serde_json::from_str(&l[2]).unwrap();
    assert_eq!(rep.check_anchor(2, &r2.hash), None);
    assert!(rep.check_anchor(2, "beef").unwrap().contains("rewritten"));
}

#[test]
fn a_torn_last_line_is_not_tampering_and_the_chain_continues() {
    let (dir, path) = write_log(4);
    let good = std::fs::read(&path).unwrap();
    // A crash in the middle of writing record 4: half a line, no newline.
    let mut torn = good.clone();
    torn.extend_from_slice(b"{\"seq\":4,\"node\":\"pg1\",\"wall_ns\":17");
    std::fs::write(&path, &torn).unwrap();

    let r = verify(&path).unwrap();
    assert!(r.intact, "{r:?}");
    assert!(r.torn_tail);
    assert_eq!(r.records, 4);
    assert!(r.notes[0].contains("torn last line"), "{:?}", r.notes);

    let (mut log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    let t = rep.torn.clone().expect("reported as torn");
    assert_eq!(t.offset, good.len() as u64);
    assert_eq!(t.bytes, (torn.len() - good.len()) as u64);
    assert!(rep.first_break.is_none(), "torn is not a break");
    assert_eq!(rep.records, 4);
    // Nothing silently lost: the bytes are in the side file.
    let side = std::fs::read(t.saved_to.as_ref().unwrap()).unwrap();
    assert!(side
        .windows(20)
        .any(|w| w == &torn[good.len()..good.len() + 20]));
    // The chain continues after the recovery record.
    assert_eq!(log.next_seq(), 5);
    log.append(None, Event::Promoted).unwrap();

    let r = verify(&path).unwrap();
    assert!(r.intact && !r.torn_tail, "{r:?}");
    assert_eq!(r.records, 6);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("record 4: a torn tail of")),
        "{:?}",
        r.notes
    );
    let (recs, _) = read_log(&path).unwrap();
    assert!(matches!(recs[4].event, Event::TornTailRecovered { .. }));
}

#[test]
fn a_whole_but_unparsable_last_line_is_torn() {
    // What ext4 can leave after a crash: the size grew, the data is zeros.
    let (dir, path) = write_log(3);
    let mut b = std::fs::read(&path).unwrap();
    b.extend_from_slice(&[0u8; 40]);
    b.push(b'\n');
    std::fs::write(&path, &b).unwrap();
    let r = verify(&path).unwrap();
    assert!(r.intact && r.torn_tail, "{r:?}");
    let (_log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert_eq!(rep.torn.unwrap().bytes, 41);
    assert!(verify(&path).unwrap().intact);
}

#[test]
fn garbage_in_the_middle_is_a_break_not_a_torn_tail() {
    let (_d, path) = write_log(4);
    let mut l = lines(&path);
    l[1] = "{\"seq\":1,\"no".into();
    write_lines(&path, &l);
    let r = verify(&path).unwrap();
    assert!(!r.intact && !r.torn_tail);
    assert_eq!(r.first_break.as_ref().unwrap().0, 2);
    assert!(r.first_break.unwrap().1.contains("not JSON"));
}

#[test]
fn previous_boot_is_reported_after_a_reboot() {
    let (dir, _path) = write_log(3);
    let (_log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert!(previous_boot(&rep, BOOT_A).is_none(), "same boot");
    let pb = previous_boot(&rep, BOOT_B).expect("another boot");
    assert_eq!(pb.boot_id, BOOT_A);
    assert_eq!(pb.last_seq, 2);
    assert!(!pb.clean_shutdown);
    assert!(matches!(pb.last_event, Event::PingRefused { .. }));
    assert_eq!(pb.last_record_wall, rep.last.unwrap().wall_ns);
    drop(_log);

    let (mut log, _) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_B).unwrap();
    log.append(
        None,
        Event::Shutdown {
            reason: "SIGTERM".into(),
        },
    )
    .unwrap();
    drop(log);
    let (_log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert!(previous_boot(&rep, BOOT_A).unwrap().clean_shutdown);
}

/// A leader's clean stop records `shutdown` first, then its step-down,
/// release and disarm: the next boot must not read it as a boot that ended
/// under a running agent (it did, until `previous_boot` looked past the
/// last record).
#[test]
fn a_leaders_clean_stop_is_a_clean_shutdown_at_the_next_boot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    log.append(None, startup()).unwrap();
    for (rev, e) in leader_stop() {
        log.append(rev, e).unwrap();
    }
    // The pinger's last summary is drained after the disarm.
    log.append(
        None,
        Event::PingSummary {
            pings: 3,
            max_k_minus_s_ns: 1,
            last_s_ns: 2,
        },
    )
    .unwrap();
    drop(log);
    let (_log, rep) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_B).unwrap();
    assert!(rep.last_run_stopped_cleanly);
    let pb = previous_boot(&rep, BOOT_B).expect("another boot");
    assert!(pb.clean_shutdown, "{pb:?}");
}

/// The records of a leader's SIGTERM, in the order the agent writes them.
fn leader_stop() -> Vec<(Option<i64>, Event)> {
    vec![
        (
            Some(10),
            Event::Acquired {
                lease: 7,
                s_ns: 1,
                revision: None,
                postgres: None,
            },
        ),
        (
            None,
            Event::Armed {
                device: "/dev/watchdog0".into(),
                identity: "i6300ESB timer".into(),
                w_s: 3,
                nowayout: false,
            },
        ),
        (None, Event::Promoted),
        (
            None,
            Event::Shutdown {
                reason: "signal".into(),
            },
        ),
        (
            None,
            Event::StepDownBegun {
                reason: "shutdown".into(),
                deadline_ns: 4,
            },
        ),
        (
            None,
            Event::StepDownConfirmed {
                how: "stopped".into(),
            },
        ),
        (None, Event::released(Some(11), true)),
        (
            None,
            Event::Disarmed {
                device: "all disarmable".into(),
            },
        ),
    ]
}

#[test]
fn only_a_completed_stop_with_nothing_left_armed_is_clean() {
    let rec = |seq: u64, (rev, event): (Option<i64>, Event)| Record {
        seq,
        node: "pg1".into(),
        wall_ns: seq,
        boot_ns: seq,
        boot_id: BOOT_A.into(),
        rev,
        event,
        prev: String::new(),
        hash: String::new(),
    };
    let run = |events: Vec<(Option<i64>, Event)>| -> Vec<Record> {
        std::iter::once((None, startup()))
            .chain(events)
            .enumerate()
            .map(|(i, e)| rec(i as u64, e))
            .collect()
    };
    let stop = leader_stop();
    assert!(stopped_cleanly(&run(stop.clone())), "leader, whole stop");
    // A replica: shutdown is its last record.
    assert!(stopped_cleanly(&run(vec![stop[3].clone()])), "replica");
    // No shutdown at all: the boot ended under a running agent.
    assert!(!stopped_cleanly(&run(stop[..3].to_vec())));
    // Killed or reset in the middle of the stop: still armed.
    for cut in 4..7 {
        assert!(!stopped_cleanly(&run(stop[..cut].to_vec())), "cut at {cut}");
    }
    // The step-down failed: the watchdog was left to finish.
    let mut failed = stop[..5].to_vec();
    failed.push((
        None,
        Event::StepDownFailed {
            reason: "timeout".into(),
        },
    ));
    failed.extend(stop[6..].iter().cloned());
    assert!(!stopped_cleanly(&run(failed)));
    // nowayout: the device stays armed and resets the node after the exit.
    let mut nowayout = stop.clone();
    nowayout.push((
        None,
        Event::NowayoutKeptArmed {
            devices: vec!["/dev/watchdog0".into()],
        },
    ));
    assert!(!stopped_cleanly(&run(nowayout)));
    // Only the last run counts: a clean stop, then a run that was cut short.
    let mut two = run(stop.clone());
    two.extend(run(stop[..3].to_vec()));
    assert!(!stopped_cleanly(&two));
}

#[test]
fn the_real_boot_id_is_read() {
    let id = current_boot_id().unwrap();
    assert_eq!(id.len(), 36, "{id:?}");
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = AuditLog::open(dir.path(), "pg1").unwrap();
    let r = log.append(None, Event::released(None, true)).unwrap();
    assert_eq!(r.boot_id, id);
    assert!(r.boot_ns > 0 && r.wall_ns > 0);
}

#[test]
fn a_full_queue_drops_counts_and_never_blocks() {
    let (tx, rx) = queue(4);
    let started = Instant::now();
    let mut accepted = 0;
    for i in 0..10_000u64 {
        if tx.try_push(Event::PingRefused {
            k_minus_s_ns: i,
            s_ns: 0,
        }) {
            accepted += 1;
        }
    }
    // Generous bound: 10 000 pushes on a full queue, on a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "try_push must not wait"
    );
    assert_eq!(accepted, 4);
    assert_eq!(tx.dropped(), 9_996);

    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    assert_eq!(rx.drain_into(&mut log).unwrap(), 5);
    assert_eq!(tx.dropped(), 0, "counted drops are handed to the log");
    let (recs, rep) = read_log(log.path()).unwrap();
    assert!(rep.intact);
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[4].event, Event::QueueDropped { count: 9_996 });
    // Drained: room again, and nothing more to record.
    assert!(tx.try_push(Event::Promoted));
    assert_eq!(rx.drain_into(&mut log).unwrap(), 1);
    assert_eq!(rx.drain_into(&mut log).unwrap(), 0);
}

#[test]
fn a_push_with_the_consumer_gone_is_counted_not_blocking() {
    let (tx, rx) = queue(1);
    drop(rx);
    assert!(!tx.try_push(Event::Promoted));
    assert_eq!(tx.dropped(), 1);
}

#[test]
fn the_producer_is_never_held_by_a_stalled_consumer() {
    // The consumer (like a writer stuck in fsync) holds its end and reads
    // nothing until the producer has finished. A blocking push would hang
    // until the consumer gives up after 30 s, and the test would fail.
    let (tx, rx) = queue(8);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let consumer = std::thread::spawn(move || {
        let signalled = done_rx.recv_timeout(Duration::from_secs(30)).is_ok();
        drop(rx);
        signalled
    });
    for i in 0..1000u64 {
        tx.try_push(Event::QueueDropped { count: i });
    }
    let _ = done_tx.send(());
    assert!(consumer.join().unwrap(), "try_push waited on the consumer");
    assert_eq!(tx.dropped(), 992);
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).unwrap();
    let e = AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A)
        .err()
        .expect("second writer refused");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(e.to_string().contains("pg1.audit.jsonl"), "{e}");
    drop(log);
    assert!(AuditLog::open_with_boot_id(dir.path(), "pg1", BOOT_A).is_ok());
}

#[test]
fn mirrored_values_parse_back_into_records() {
    let (_d, path) = write_log(3);
    let raw: Vec<Vec<u8>> = lines(&path).into_iter().map(String::into_bytes).collect();
    let mut values: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
    values.push(b"{not a record}");
    let (recs, errs) = parse_history(values);
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(Record::hash_ok));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("history value 3: not an audit record"),
        "{errs:?}"
    );
}
