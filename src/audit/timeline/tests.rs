use super::*;
use crate::audit::{record_hash, DeviceRecord, GENESIS};
use crate::cli::audit::{cmd_timeline, cmd_verify, render_text};

const S: u64 = 1_000_000_000;

/// A `released` record as agents wrote it before the event had fields: the
/// revision, if any, in the record's `rev`.
const OLD_RELEASE: Event = Event::Released {
    revision: None,
    deleted: None,
};

/// Builds one node's chained records on a clock the test sets.
struct Node {
    name: String,
    recs: Vec<Record>,
    boot: String,
    now: u64,
}

impl Node {
    fn new(name: &str, boot: &str) -> Node {
        Node {
            name: name.into(),
            recs: Vec::new(),
            boot: boot.into(),
            now: 10 * S,
        }
    }

    /// Sets the node's boot clock (seconds).
    fn at(&mut self, secs: f64) -> &mut Self {
        self.now = (secs * 1e9) as u64;
        self
    }

    fn reboot(&mut self, boot: &str) -> &mut Self {
        self.boot = boot.into();
        self.now = 5 * S;
        self
    }

    fn rec(&mut self, rev: Option<i64>, event: Event) -> &mut Self {
        let mut r = Record {
            seq: self.recs.len() as u64,
            node: self.name.clone(),
            wall_ns: 1_790_000_000 * S + self.now,
            boot_ns: self.now,
            boot_id: self.boot.clone(),
            rev,
            event,
            prev: self
                .recs
                .last()
                .map_or(GENESIS.to_owned(), |r| r.hash.clone()),
            hash: String::new(),
        };
        r.hash = record_hash(&r);
        self.recs.push(r);
        self.now += S / 10;
        self
    }

    fn startup(&mut self, bootstatus: Option<u32>, reset: bool) -> &mut Self {
        self.rec(
            None,
            Event::Startup {
                version: "0.1.0".into(),
                config_digest: "c0ffee".into(),
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
                    bootstatus,
                    watchdog_reset: reset,
                }],
                previous_boot_id: None,
                previous_boot_reset: None,
            },
        )
    }

    fn acquired(&mut self, rev: i64, s: f64) -> &mut Self {
        self.rec(
            Some(rev),
            Event::Acquired {
                lease: 7,
                s_ns: (s * 1e9) as u64,
                revision: Some(rev),
                postgres: None,
            },
        )
    }

    /// Its step-down confirmed: PostgreSQL stopped.
    fn stop_confirmed(&mut self) -> &mut Self {
        self.rec(
            None,
            Event::StepDownConfirmed {
                how: "stopped".into(),
            },
        )
    }

    fn disarmed(&mut self) -> &mut Self {
        self.rec(
            None,
            Event::Disarmed {
                device: "/dev/watchdog0".into(),
            },
        )
    }

    fn armed(&mut self, w_s: u32) -> &mut Self {
        self.rec(
            None,
            Event::Armed {
                device: "/dev/watchdog0".into(),
                identity: "i6300ESB timer".into(),
                w_s,
                nowayout: false,
            },
        )
    }

    fn refused(&mut self, s: f64, k: f64) -> &mut Self {
        self.rec(
            None,
            Event::PingRefused {
                k_minus_s_ns: ((k - s) * 1e9) as u64,
                s_ns: (s * 1e9) as u64,
            },
        )
    }

    /// A node that starts, wins the key at `rev` with `s = 100 s`, arms W and
    /// promotes: a healthy leader.
    fn leader(name: &str, boot: &str, rev: i64, w: u32) -> Node {
        let mut n = Node::new(name, boot);
        n.startup(Some(0), false)
            .at(100.0)
            .acquired(rev, 100.0)
            .armed(w)
            .rec(None, Event::Promoted);
        n
    }
}

fn one(changes: Vec<Change>) -> Change {
    assert_eq!(changes.len(), 1, "{changes:#?}");
    changes.into_iter().next().unwrap()
}

fn missing(c: &Change) -> Vec<String> {
    match &c.verdict {
        Verdict::Unproven { missing } => missing.clone(),
        v => panic!("expected UNPROVEN, got {v}: {c:#?}"),
    }
}

fn rule(c: &Change) -> String {
    match &c.verdict {
        Verdict::Violation { rule } => rule.clone(),
        v => panic!("expected VIOLATION, got {v}: {c:#?}"),
    }
}

fn new_leader(rev: i64) -> Node {
    Node::leader("pg2", "boot-pg2", rev, 3)
}

#[test]
fn a_step_down_then_release_before_the_new_acquisition_is_fenced() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(104.0)
        .rec(
            None,
            Event::StepDownBegun {
                reason: "switchover".into(),
                deadline_ns: 103 * S,
            },
        )
        .stop_confirmed()
        .rec(Some(20), OLD_RELEASE)
        .disarmed();
    let pg2 = new_leader(21);
    let c = one(timeline(&[pg1.recs, pg2.recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert_eq!(c.acquired_rev, 21);
    assert_eq!(c.old.node, "pg1");
    assert_eq!(c.new.node, "pg2");
    assert_eq!(c.key_deleted_rev, Some(20));
    assert_eq!(c.old.step_down.as_ref().unwrap().released_rev, Some(20));
    assert_eq!(c.new.armed_before_promote, Some(true));
    assert!(
        c.proof.contains("released the key at rev 20"),
        "{}",
        c.proof
    );
}

#[test]
fn a_step_down_before_the_earliest_expiry_is_fenced_without_a_release() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    // Last acknowledged renewal sent at 103 s; confirmed stopped at 106 s,
    // before 103 + T = 108 s, the earliest the key could expire.
    pg1.at(104.5)
        .refused(103.0, 104.5)
        .at(106.0)
        .stop_confirmed();
    let c = one(timeline(&[pg1.recs, new_leader(30).recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert_eq!(c.old.last_s_ns, Some(103 * S));
    assert!(
        c.proof.contains("before the earliest expiry"),
        "{}",
        c.proof
    );
}

#[test]
fn a_late_step_down_proves_nothing_by_itself() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(109.0).stop_confirmed();
    let c = one(timeline(&[pg1.recs, new_leader(30).recs], &[]));
    let m = missing(&c);
    assert!(
        m.iter().any(|m| m.contains("no later start-up of pg1")),
        "{m:?}"
    );
}

#[test]
fn a_watchdog_reset_with_boot_status_is_fenced_by_reset() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    // Renewals stop; the pinger refuses on stale evidence; then the node is
    // reset and the next start-up reads the device's boot status.
    pg1.at(101.2)
        .refused(100.0, 101.2)
        .refused(100.0, 101.3)
        .reboot("boot-b")
        .startup(Some(0x20), true);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByReset, "{c:#?}");
    assert_eq!(c.old.pings_refused, 2);
    assert_eq!(c.old.last_s_ns, Some(100 * S));
    assert_eq!(c.old.last_permitted_ping_ns, Some(101 * S));
    assert_eq!(c.old.reset_deadline_ns, Some(104 * S));
    assert_eq!(c.old.armed[0].w_ok, Some(true));
    let ns = c.old.next_startup.as_ref().unwrap();
    assert!(ns.new_boot);
    assert_eq!(ns.watchdog_reset, Some(true));
}

#[test]
fn a_reboot_without_boot_status_is_a_presumed_reset() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.reboot("boot-b").startup(None, false);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert_eq!(missing(&c), vec!["reset presumed, boot status unavailable"]);
}

#[test]
fn a_reboot_the_device_says_was_not_a_reset_is_unproven() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.reboot("boot-b").startup(Some(0), false);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert!(missing(&c)[0].contains("report no watchdog reset"));
}

#[test]
fn an_agent_restart_in_the_same_boot_is_unproven() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(200.0).startup(Some(0), false);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert!(missing(&c)[0].contains("same boot"), "{c:#?}");
}

#[test]
fn no_local_log_of_the_old_leader_is_unproven_even_with_its_history() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.reboot("boot-b").startup(Some(0x20), true);
    let pg2 = new_leader(25);
    // Only pg2's local log; pg1 is known from what it mirrored to etcd.
    let c = one(timeline(std::slice::from_ref(&pg2.recs), &pg1.recs));
    assert!(!c.old.local_log);
    let m = missing(&c);
    assert!(
        m.iter()
            .any(|m| m.contains("no local log of the old leader pg1")),
        "{m:?}"
    );
}

#[test]
fn local_records_and_their_etcd_mirror_are_not_counted_twice() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.reboot("boot-b").startup(Some(0x20), true);
    let pg2 = new_leader(25);
    let mut history = pg1.recs.clone();
    history.extend(pg2.recs.iter().cloned());
    let c = one(timeline(&[pg1.recs, pg2.recs], &history));
    assert_eq!(c.verdict, Verdict::FencedByReset);
    assert!(c.old.local_log);
}

#[test]
fn a_leader_seen_but_never_recorded_leaves_the_change_unproven() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(104.0).stop_confirmed().rec(Some(20), OLD_RELEASE);
    // pg2 saw pg9 win the key at rev 22 before pg2 won it at 30; pg9 has
    // neither a local log nor mirrored records.
    let mut pg2 = Node::new("pg2", "boot-pg2");
    pg2.startup(Some(0), false)
        .rec(
            Some(22),
            Event::LeaderSeen {
                holder: Some("pg9".into()),
            },
        )
        .acquired(30, 50.0)
        .armed(3)
        .rec(None, Event::Promoted);
    let c = one(timeline(&[pg1.recs, pg2.recs], &[]));
    let m = missing(&c);
    assert!(
        m[0].starts_with("pg9 held the key at rev 22 (seen by pg2)"),
        "{m:?}"
    );
}

#[test]
fn w_above_t_minus_m_is_a_violation() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 4);
    pg1.reboot("boot-b").startup(Some(0x20), true);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    let r = rule(&c);
    assert!(r.contains("W = 4 s > T - M = 3 s"), "{r}");
    assert_eq!(c.old.armed[0].w_ok, Some(false));
}

#[test]
fn a_ping_on_stale_evidence_is_a_violation() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(102.0)
        .rec(
            None,
            Event::PingSummary {
                pings: 20,
                max_k_minus_s_ns: 1_500_000_000,
                last_s_ns: 100 * S,
            },
        )
        .reboot("boot-b")
        .startup(Some(0x20), true);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    let r = rule(&c);
    assert!(
        r.starts_with("rule 1: pg1 pinged at k - s = 1.500 s > M - R = 1.000 s"),
        "{r}"
    );
    assert_eq!(c.old.max_pinged_k_minus_s, Some(1.5));
}

#[test]
fn fresh_pings_are_evidence_that_rule_1_held() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(102.0)
        .rec(
            None,
            Event::PingSummary {
                pings: 20,
                max_k_minus_s_ns: 600_000_000,
                last_s_ns: 101 * S,
            },
        )
        .reboot("boot-b")
        .startup(Some(0x20), true);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByReset);
    assert_eq!(c.old.last_s_ns, Some(101 * S));
}

#[test]
fn disarming_before_the_step_down_is_confirmed_is_a_violation() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(103.0)
        .disarmed()
        .stop_confirmed()
        .rec(Some(20), OLD_RELEASE);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert!(rule(&c).starts_with("rule 4: pg1 disarmed /dev/watchdog0"));
}

#[test]
fn disarming_while_still_holding_the_key_is_a_violation() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(103.0)
        .stop_confirmed()
        .disarmed()
        .rec(Some(20), OLD_RELEASE);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert!(rule(&c).contains("while still holding the key"), "{c:#?}");
}

/// A leader that heard from etcd that its key is gone (a step-down for
/// `key_lost`) may disarm once its stop is confirmed, whatever its own
/// clock says of the lease: after a VM pause it counts the lease fresh
/// (found by the lab's fault matrix, which had this as a VIOLATION).
#[test]
fn disarming_after_a_key_lost_step_down_is_not_a_violation() {
    // pg1 steps down for `reason`, confirms its stop and disarms.
    let disarmed_after = |reason: &str| {
        let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
        pg1.at(101.0)
            .rec(
                None,
                Event::StepDownBegun {
                    reason: reason.into(),
                    deadline_ns: 103 * S,
                },
            )
            .stop_confirmed()
            .disarmed();
        one(timeline(&[pg1.recs, new_leader(25).recs], &[]))
    };
    let c = disarmed_after("key_lost");
    assert!(!matches!(c.verdict, Verdict::Violation { .. }), "{c:#?}");
    // Any other reason still needs a release or an expiry first.
    let c = disarmed_after("deadline");
    assert!(rule(&c).contains("while still holding the key"), "{c:#?}");
}

#[test]
fn the_new_leader_promoting_before_arming_is_a_violation() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(104.0).stop_confirmed().rec(Some(20), OLD_RELEASE);
    let mut pg2 = Node::new("pg2", "boot-pg2");
    pg2.startup(Some(0), false)
        .acquired(21, 50.0)
        .rec(None, Event::Promoted)
        .armed(3);
    let c = one(timeline(&[pg1.recs, pg2.recs], &[]));
    assert!(
        rule(&c).starts_with("rule 2: pg2 promoted PostgreSQL"),
        "{c:#?}"
    );
    assert_eq!(c.new.armed_before_promote, Some(false));
}

#[test]
fn automatic_mode_after_a_failed_arm_is_not_a_violation_but_proves_no_reset() {
    let mut pg1 = Node::new("pg1", "boot-a");
    pg1.startup(Some(0), false)
        .acquired(10, 100.0)
        .rec(
            None,
            Event::ArmFailed {
                device: "/dev/watchdog0".into(),
                reason: "busy (held by pid 1 systemd)".into(),
            },
        )
        .rec(None, Event::Promoted)
        .reboot("boot-b")
        .startup(Some(0x20), true);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    assert!(missing(&c)[0].contains("armed no watchdog"), "{c:#?}");
}

/// A term that armed nothing and promoted nothing was never writable,
/// whatever became of the key: the won-could-not-arm-released-won-again
/// sequence of a loaded lab, with an old-format release (no revision).
#[test]
fn a_term_without_arming_or_promotion_is_never_promoted() {
    let mut pg1 = Node::new("pg1", "boot-a");
    pg1.startup(Some(0), false)
        .acquired(10, 100.0)
        .rec(
            None,
            Event::ArmFailed {
                device: "/dev/watchdog0".into(),
                reason: "evidence went stale before arming".into(),
            },
        )
        .rec(None, OLD_RELEASE)
        .at(103.0)
        .acquired(15, 103.0)
        .armed(3)
        .rec(None, Event::Promoted);
    let c = one(timeline(&[pg1.recs.clone()], &[]));
    assert_eq!(c.verdict, Verdict::NeverPromoted, "{c:#?}");
    assert!(c.verdict.is_safe());
    assert!(c.proof.contains("never writable"), "{}", c.proof);
    assert!(!c.old.promoted);
    assert_eq!((c.old.node.as_str(), c.new.node.as_str()), ("pg1", "pg1"));
    let text = render_text(std::slice::from_ref(&c));
    assert!(
        text.contains("change at rev 15: pg1 -> pg1    NEVER-PROMOTED"),
        "{text}"
    );

    // The command exits 0 on it (it exited 2, UNPROVEN, before).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pg1.jsonl");
    let mut text = String::new();
    for r in &pg1.recs {
        text.push_str(&serde_json::to_string(r).unwrap());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    let mut out = Vec::new();
    let code = cmd_timeline(&[path], None, true, &mut out);
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"verdict\": \"NEVER-PROMOTED\""), "{out}");
}

/// Leading unarmed (mode automatic or off) is followed by a promotion the
/// agent may not have lived to record: not "never promoted".
#[test]
fn a_term_that_chose_to_lead_unarmed_is_not_never_promoted() {
    let mut pg1 = Node::new("pg1", "boot-a");
    pg1.startup(Some(0), false).acquired(10, 100.0).rec(
        None,
        Event::LeadingUnarmed {
            reason: "watchdog mode is off".into(),
        },
    );
    let c = one(timeline(&[pg1.recs, new_leader(12).recs], &[]));
    assert!(missing(&c)[0].contains("armed no watchdog"), "{c:#?}");
}

/// Only the etcd copy of the term: it may lack the tail of the term, so
/// the absence of a promotion proves nothing.
#[test]
fn never_promoted_needs_the_local_log() {
    let mut pg1 = Node::new("pg1", "boot-a");
    pg1.startup(Some(0), false).acquired(10, 100.0);
    let pg2 = new_leader(12);
    let c = one(timeline(std::slice::from_ref(&pg2.recs), &pg1.recs));
    assert!(
        missing(&c)
            .iter()
            .any(|m| m.contains("no local log of the old leader pg1")),
        "{c:#?}"
    );
}

/// A node that armed but never promoted, then released: fenced by the
/// release, ordered by its revision (new record field, or the record's `rev`
/// of older agents) or, without one, by the deletion itself.
#[test]
fn an_armed_term_that_never_promoted_and_released_is_fenced() {
    let term = |release: Event, rev: Option<i64>| {
        let mut pg1 = Node::new("pg1", "boot-a");
        pg1.startup(Some(0), false)
            .acquired(10, 100.0)
            .armed(3)
            .rec(
                None,
                Event::ArmFailed {
                    device: "/dev/watchdog1".into(),
                    reason: "alarm-only device".into(),
                },
            )
            .rec(
                None,
                Event::Disarmed {
                    device: "all disarmable".into(),
                },
            )
            .rec(rev, release);
        one(timeline(&[pg1.recs, new_leader(12).recs], &[]))
    };
    for (release, rev) in [
        (Event::released(Some(11), true), None),
        (OLD_RELEASE, Some(11)),
    ] {
        let c = term(release, rev);
        assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
        assert!(c.proof.contains("never promoted"), "{}", c.proof);
        assert!(
            c.proof.contains("released the key at rev 11"),
            "{}",
            c.proof
        );
        assert_eq!(c.key_deleted_rev, Some(11));
    }
    let c = term(Event::released(None, true), None);
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert!(
        c.proof.contains("its release deleted the key"),
        "{}",
        c.proof
    );
    assert_eq!(c.key_deleted_rev, None);
    // Released, but the key was no longer its own: nothing is ordered.
    let c = term(Event::released(None, false), None);
    assert!(matches!(c.verdict, Verdict::Unproven { .. }), "{c:#?}");
}

/// A step-down followed by a release that deleted the key orders before the
/// new win with or without the release's revision.
#[test]
fn a_step_down_then_a_release_that_deleted_the_key_is_fenced_without_its_revision() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    // Confirmed at 120 s, long after s + T = 105 s: only the release proves it.
    pg1.at(120.0)
        .stop_confirmed()
        .rec(None, Event::released(None, true));
    let mut pg2 = Node::new("pg2", "boot-pg2");
    pg2.startup(Some(0), false)
        .rec(Some(20), Event::LeaderSeen { holder: None })
        .acquired(21, 50.0)
        .armed(3)
        .rec(None, Event::Promoted);
    let c = one(timeline(&[pg1.recs, pg2.recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert!(
        c.proof
            .contains("its release deleted the key, still pg1's on its own lease"),
        "{}",
        c.proof
    );
    assert_eq!(
        c.old.step_down.as_ref().unwrap().release_deleted,
        Some(true)
    );
    assert_eq!(c.key_deleted_rev, Some(20));
}

/// A step-down before s + T proves nothing when the key was deleted at a
/// known revision by someone else: `etcdctl del` or a revoke need not wait
/// for the expiry. With the old leader's own release at that revision, it
/// does.
#[test]
fn a_step_down_before_expiry_does_not_assume_an_expiry_when_a_deletion_is_known() {
    let old = |release: Option<Event>| {
        let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
        pg1.at(104.0).stop_confirmed();
        if let Some(r) = release {
            pg1.rec(None, r);
        }
        pg1
    };
    let mut pg2 = Node::new("pg2", "boot-pg2");
    pg2.startup(Some(0), false)
        .rec(Some(20), Event::LeaderSeen { holder: None })
        .acquired(21, 50.0)
        .armed(3)
        .rec(None, Event::Promoted);

    for release in [None, Some(OLD_RELEASE), Some(Event::released(None, false))] {
        let c = one(timeline(&[old(release).recs, pg2.recs.clone()], &[]));
        let m = missing(&c);
        assert!(
            m[0].contains("the key was deleted at rev 20, not by pg1's own release"),
            "{m:?}"
        );
    }
    let c = one(timeline(
        &[
            old(Some(Event::released(Some(20), true))).recs,
            pg2.recs.clone(),
        ],
        &[],
    ));
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert!(
        c.proof.contains("released the key at rev 20"),
        "{}",
        c.proof
    );
    // No deletion known (pg2 did not watch it): the expiry argument stands.
    let mut pg2 = Node::new("pg2", "boot-pg2");
    pg2.startup(Some(0), false)
        .acquired(21, 50.0)
        .armed(3)
        .rec(None, Event::Promoted);
    let c = one(timeline(&[old(None).recs, pg2.recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert!(
        c.proof.contains("before the earliest expiry"),
        "{}",
        c.proof
    );
}

/// A leader cut off from etcd (quorum lost) both steps down and is reset;
/// the key goes later by an expiry the auditor cannot tell from a delete.
/// The step-down argument fails on the deletion, but must not sink the
/// reset argument (found by the lab's fault matrix: UNPROVEN on an
/// i6300esb that reported its reset).
#[test]
fn a_step_down_unproven_by_a_deletion_does_not_hide_a_proven_reset() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(101.2)
        .refused(100.0, 101.2)
        .at(103.7)
        .stop_confirmed()
        .reboot("boot-b")
        .startup(Some(0x20), true);
    let mut pg2 = Node::new("pg2", "boot-pg2");
    pg2.startup(Some(0), false)
        .rec(Some(20), Event::LeaderSeen { holder: None })
        .acquired(21, 50.0)
        .armed(3)
        .rec(None, Event::Promoted);
    let c = one(timeline(&[pg1.recs.clone(), pg2.recs.clone()], &[]));
    assert_eq!(c.verdict, Verdict::FencedByReset, "{c:#?}");
    // Without the reset's evidence both arguments' gaps are listed.
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(103.7)
        .stop_confirmed()
        .reboot("boot-b")
        .startup(Some(0), false);
    let c = one(timeline(&[pg1.recs, pg2.recs], &[]));
    let m = missing(&c);
    assert!(m[0].contains("the key was deleted at rev 20"), "{m:?}");
    assert!(m.iter().any(|x| x.contains("no watchdog reset")), "{m:?}");
}

#[test]
fn three_leaders_give_two_changes_in_revision_order() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.reboot("boot-b").startup(Some(0x20), true);
    let mut pg2 = new_leader(25);
    pg2.at(300.0).stop_confirmed().rec(Some(40), OLD_RELEASE);
    let pg3 = Node::leader("pg3", "boot-c", 41, 3);
    // Logs in any order.
    let ch = timeline(&[pg3.recs, pg1.recs, pg2.recs], &[]);
    assert_eq!(ch.len(), 2);
    assert_eq!((ch[0].old.node.as_str(), ch[0].acquired_rev), ("pg1", 25));
    assert_eq!(ch[0].verdict, Verdict::FencedByReset);
    assert_eq!((ch[1].old.node.as_str(), ch[1].acquired_rev), ("pg2", 41));
    assert_eq!(ch[1].verdict, Verdict::FencedByStepDown);
    let text = render_text(&ch);
    assert!(
        text.contains("change at rev 25: pg1 -> pg2    FENCED-BY-RESET"),
        "{text}"
    );
    assert!(
        text.contains("change at rev 41: pg2 -> pg3    FENCED-BY-STEP-DOWN"),
        "{text}"
    );
    let json = serde_json::to_value(&ch).unwrap();
    assert_eq!(json[0]["verdict"]["verdict"], "FENCED-BY-RESET");
    assert_eq!(json[1]["verdict"]["verdict"], "FENCED-BY-STEP-DOWN");
}

#[test]
fn verdicts_serialize_with_their_operator_names() {
    let v = serde_json::to_value(Verdict::Unproven {
        missing: vec!["x".into()],
    })
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"verdict": "UNPROVEN", "missing": ["x"]})
    );
    let v = serde_json::to_value(Verdict::Violation { rule: "r".into() }).unwrap();
    assert_eq!(v, serde_json::json!({"verdict": "VIOLATION", "rule": "r"}));
}

#[test]
fn etcd_history_sees_a_truncated_or_rewritten_local_log() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(104.0).stop_confirmed();
    let history = pg1.recs.clone();
    assert!(cross_check(std::slice::from_ref(&pg1.recs), &history).is_empty());

    // Cut the step-down off the local log: the chain is still valid, but
    // etcd has the record.
    let mut cut = pg1.recs.clone();
    cut.pop();
    let d = cross_check(&[cut], &history);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].contains(
            "local log ends at record 3 but etcd history has record 4 (step_down_confirmed)"
        ),
        "{d:?}"
    );

    // Rewrite record 2 (armed W) with a consistent new chain: etcd's copy differs.
    let mut other = Node::new("pg1", "boot-a");
    other
        .startup(Some(0), false)
        .at(100.0)
        .acquired(10, 100.0)
        .armed(2);
    let d = cross_check(&[other.recs], &history);
    assert!(
        d.iter().any(|d| d.contains("local record 2 differs")),
        "{d:?}"
    );
}

/// End to end through the real writer and the CLI functions: two nodes'
/// files on disk, etcd history for a third view, exit codes.
#[test]
fn cmd_timeline_and_cmd_verify_on_real_files() {
    use crate::audit::AuditLog;
    let dir = tempfile::tempdir().unwrap();
    let mut model = Node::leader("pg1", "boot-a", 10, 3);
    model.reboot("boot-b").startup(Some(0x20), true);
    // Write pg1's events through the real writer, boot by boot.
    let mut paths = Vec::new();
    for boot in ["boot-a", "boot-b"] {
        let (mut log, _) = AuditLog::open_with_boot_id(dir.path(), "pg1", boot).unwrap();
        for r in model.recs.iter().filter(|r| r.boot_id == boot) {
            log.append(r.rev, r.event.clone()).unwrap();
        }
        paths.push(log.path().to_owned());
    }
    let (mut log2, _) = AuditLog::open_with_boot_id(dir.path(), "pg2", "boot-pg2").unwrap();
    for r in &new_leader(25).recs {
        log2.append(r.rev, r.event.clone()).unwrap();
    }
    let files = vec![paths[0].clone(), log2.path().to_owned()];

    let mut out = Vec::new();
    assert_eq!(cmd_timeline(&files, None, false, &mut out), 0);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("FENCED-BY-RESET"), "{text}");
    assert!(text.contains("chain intact"), "{text}");

    let mut out = Vec::new();
    assert_eq!(cmd_timeline(&files, None, true, &mut out), 0);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["changes"][0]["verdict"]["verdict"], "FENCED-BY-RESET");

    let mut out = Vec::new();
    assert_eq!(cmd_verify(&files[0], &mut out), 0);

    // pg2's disk alone: pg1 only from etcd history => UNPROVEN, exit 2.
    let (hist, _) = crate::audit::read_log(&files[0]).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        cmd_timeline(&files[1..], Some(hist.clone()), false, &mut out),
        2
    );

    // An edited history record is flagged and fails the run.
    let mut bad = hist;
    bad[1].rev = Some(11);
    let mut out = Vec::new();
    assert_eq!(cmd_timeline(&files, Some(bad), false, &mut out), 1);
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("with a wrong hash"));

    // Tampering with pg1's file: verify exits 1, the timeline warns and exits 1.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(&files[0], text.replacen("\"w_s\":3", "\"w_s\":2", 1)).unwrap();
    let mut out = Vec::new();
    assert_eq!(cmd_verify(&files[0], &mut out), 1);
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("hash mismatch (edited)"));
    let mut out = Vec::new();
    assert_eq!(cmd_timeline(&files, None, false, &mut out), 1);
    assert!(String::from_utf8(out).unwrap().contains("CHAIN BROKEN"));

    let mut out = Vec::new();
    assert_eq!(cmd_verify(&dir.path().join("nope.jsonl"), &mut out), 2);
}

/// Prints the example in docs/audit.md (run with --nocapture to refresh it).
#[test]
fn docs_example() {
    let mut pg1 = Node::leader("pg1", "3f2a9c1e-boot-a", 1042, 3);
    pg1.at(131.4)
        .refused(130.2, 131.4)
        .refused(130.2, 131.5)
        .reboot("9c1e77d0-boot-b")
        .startup(Some(0x20), true);
    let mut pg2 = Node::leader("pg2", "b7d41f08-boot-c", 1057, 3);
    pg2.at(400.0)
        .rec(
            None,
            Event::StepDownBegun {
                reason: "switchover requested".into(),
                deadline_ns: 402 * S,
            },
        )
        .rec(
            None,
            Event::StepDownConfirmed {
                how: "postgres stopped (fast)".into(),
            },
        )
        .rec(Some(1090), OLD_RELEASE)
        .disarmed();
    let pg3 = Node::leader("pg3", "e0c2aa51-boot-d", 1091, 3);
    for r in &pg1.recs[1..4] {
        println!("{}", serde_json::to_string(r).unwrap());
    }
    println!();
    let ch = timeline(&[pg1.recs, pg2.recs, pg3.recs], &[]);
    println!("{}", render_text(&ch));
    assert_eq!(ch.len(), 2);
}

/// A start-up record whose budget cannot be reasoned with (edited, or
/// corrupt) leaves the deadlines unknown instead of computing nonsense.
#[test]
fn an_unusable_recorded_budget_is_named_not_used() {
    let mut pg1 = Node::new("pg1", "boot-a");
    pg1.rec(
        None,
        Event::Startup {
            version: "0.1.0".into(),
            config_digest: "c0ffee".into(),
            budget: BudgetRecord {
                ttl_s: 5,
                margin_s: 9.0,
                reset_allowance_s: 1e300,
                loop_interval_s: 0.5,
            },
            devices: vec![],
            previous_boot_id: None,
            previous_boot_reset: None,
        },
    )
    .acquired(10, 100.0)
    .armed(3)
    .rec(None, Event::Promoted)
    .reboot("boot-b")
    .startup(Some(0x20), true);
    let c = one(timeline(&[pg1.recs, new_leader(25).recs], &[]));
    let m = missing(&c);
    assert!(m[0].contains("does not satisfy R < M < T"), "{m:?}");
    assert_eq!(c.old.last_permitted_ping_ns, None);
    assert_eq!(c.old.armed[0].w_ok, None);
}

/// A rule-8 fence (a writable server on a node that does not lead) is on
/// the record as `fenced_not_leader`, and it is not a change of leader: the
/// timeline's verdicts and changes are the same with or without it.
#[test]
fn a_rule8_fence_is_no_change_of_leader() {
    let fenced = |holder: &str| Event::FencedNotLeader {
        holder: Some(holder.into()),
        how: "PostgreSQL stopped (immediate) in 0.2 s".into(),
        ok: true,
    };
    let old_leader = || {
        let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
        pg1.at(104.0)
            .rec(
                None,
                Event::StepDownBegun {
                    reason: "shutdown".into(),
                    deadline_ns: 103 * S,
                },
            )
            .stop_confirmed()
            .rec(None, Event::released(Some(20), true));
        pg1
    };
    let plain = one(timeline(&[old_leader().recs, new_leader(21).recs], &[]));
    let mut pg1 = old_leader();
    pg1.rec(None, fenced("pg2"));
    let mut pg3 = Node::new("pg3", "boot-c");
    pg3.startup(Some(0), false).rec(None, fenced("pg2"));
    let with = one(timeline(&[pg1.recs, new_leader(21).recs, pg3.recs], &[]));
    assert_eq!(with.verdict, Verdict::FencedByStepDown, "{with:#?}");
    assert_eq!(with.verdict, plain.verdict);
    assert_eq!(with.acquired_rev, plain.acquired_rev);
    assert_eq!(with.old.node, "pg1");
}

#[test]
fn a_switchover_hand_over_at_the_new_win_after_the_confirmed_stop_is_fenced() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(104.0)
        .rec(None, Event::SwitchoverBegun { to: "pg2".into() })
        .rec(
            None,
            Event::StepDownBegun {
                reason: "switchover".into(),
                deadline_ns: 106 * S,
            },
        )
        .rec(
            None,
            Event::StepDownConfirmed {
                how: "fast shutdown".into(),
            },
        )
        .rec(
            Some(21),
            Event::SwitchoverHandedOver {
                to: "pg2".into(),
                final_lsn: 0x3000028,
            },
        )
        .disarmed();
    // The hand-over's transaction is pg2's win: the same revision.
    let c = one(timeline(&[pg1.recs, new_leader(21).recs], &[]));
    assert_eq!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
    assert!(c.old.step_down.as_ref().unwrap().handed_over);
    assert!(
        c.proof.contains("handed the key to pg2 at rev 21"),
        "{}",
        c.proof
    );
}

#[test]
fn a_hand_over_recorded_without_a_confirmed_stop_proves_nothing() {
    let mut pg1 = Node::leader("pg1", "boot-a", 10, 3);
    pg1.at(104.0).rec(
        Some(21),
        Event::SwitchoverHandedOver {
            to: "pg2".into(),
            final_lsn: 1,
        },
    );
    let c = one(timeline(&[pg1.recs, new_leader(21).recs], &[]));
    assert_ne!(c.verdict, Verdict::FencedByStepDown, "{c:#?}");
}
