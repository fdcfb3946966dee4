//! The audit record (docs/fencing.md rule 7): a tamper-evident, append-only log per
//! node of everything that decides a fence, and a pure timeline that turns
//! those logs into a verdict for every change of leader.
//!
//! - [`Record`] / [`Event`]: one JSON line each; `hash` covers the canonical
//!   record, `prev` links it to the previous record's `hash`.
//! - [`log`]: the driver part: the writer ([`AuditLog`]), the non-blocking
//!   handoff for the pinger ([`queue`]), [`verify`], [`previous_boot`].
//! - [`timeline`](mod@timeline): pure; records in, [`Change`]s with verdicts out.
//!
//! Operator documentation: docs/audit.md.

pub mod log;
pub mod timeline;

pub use log::{
    current_boot_id, log_path, parse_history, previous_boot, queue, read_log, stopped_cleanly,
    verify, AuditLog, OpenReport, PreviousBoot, Receiver, Sender, TornTail, VerifyReport,
};
pub use timeline::{cross_check, timeline, Change, Verdict};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of a node's audit log.
///
/// `boot_ns` is CLOCK_BOOTTIME on the writing node: comparable only with other
/// records of the same `boot_id`. Records of different nodes are ordered by
/// etcd revisions (`rev`), never by clocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// 0, 1, 2, ... across the whole file (it continues over restarts and boots).
    pub seq: u64,
    pub node: String,
    /// Wall clock, ns since the Unix epoch: for humans, never for proofs.
    /// (u64 holds nanoseconds until the year 2554.)
    pub wall_ns: u64,
    /// CLOCK_BOOTTIME when the record was written.
    pub boot_ns: u64,
    /// /proc/sys/kernel/random/boot_id of the boot that wrote the record.
    pub boot_id: String,
    /// The etcd revision the event refers to, where one applies.
    pub rev: Option<i64>,
    #[serde(flatten)]
    pub event: Event,
    /// `hash` of the previous record, or [`GENESIS`].
    pub prev: String,
    /// Hex SHA-256 of the canonical record without `hash` (see [`record_hash`]).
    pub hash: String,
}

/// Budget numbers as recorded at start-up (seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetRecord {
    pub ttl_s: u64,
    pub margin_s: f64,
    pub reset_allowance_s: f64,
    pub loop_interval_s: f64,
}

impl From<&crate::timing::Budget> for BudgetRecord {
    fn from(b: &crate::timing::Budget) -> Self {
        BudgetRecord {
            ttl_s: b.ttl.as_secs(),
            margin_s: b.margin.as_secs_f64(),
            reset_allowance_s: b.reset_allowance.as_secs_f64(),
            loop_interval_s: b.loop_interval.as_secs_f64(),
        }
    }
}

impl BudgetRecord {
    /// The budget these numbers describe, for `timing`'s arithmetic (the
    /// request timeout is not recorded: zero). Not validated: a record is
    /// judged as it was written.
    pub fn budget(&self) -> crate::timing::Budget {
        use std::time::Duration;
        // A hand-edited record may hold anything: never panic on it.
        let secs = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
        crate::timing::Budget {
            ttl: Duration::from_secs(self.ttl_s),
            margin: secs(self.margin_s),
            reset_allowance: secs(self.reset_allowance_s),
            loop_interval: secs(self.loop_interval_s),
            request_timeout: Duration::ZERO,
        }
    }
}

/// A watchdog device as probed at start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub path: String,
    /// WDIOC_GETSUPPORT identity, e.g. "iTCO_wdt" or "Software Watchdog".
    pub identity: String,
    pub timeout_s: u32,
    pub nowayout: bool,
    /// WDIOC_GETBOOTSTATUS / sysfs `bootstatus`; `None` where the device cannot say.
    pub bootstatus: Option<u32>,
    /// The device says the previous boot ended in a watchdog reset (WDIOF_CARDRESET).
    pub watchdog_reset: bool,
}

/// What happened. Serialized flat into the record with an `event` tag.
/// Names are stable: add variants and optional fields, never rename.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Startup {
        version: String,
        /// Hex SHA-256 of the configuration text ([`digest_hex`]).
        config_digest: String,
        budget: BudgetRecord,
        devices: Vec<DeviceRecord>,
        /// boot_id of the last record of the previous run, if it was another boot.
        previous_boot_id: Option<String>,
        /// Whether that boot ended in a watchdog reset, where a device could say.
        previous_boot_reset: Option<bool>,
    },
    LeaseGranted {
        lease: i64,
    },
    /// Won the leader key at etcd revision `rev`; `s_ns` is the send time of
    /// the grant/put that etcd acknowledged (this node's boot clock).
    Acquired {
        lease: i64,
        s_ns: u64,
        /// The winning revision (also in the record's `rev`); absent from
        /// logs of older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<i64>,
        /// PostgreSQL as the agent last observed it when it won
        /// (`PgView::as_str`: `primary`, `replica`, `down`, `busy`,
        /// `unmanaged`); absent from logs of older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        postgres: Option<String>,
    },
    /// Won after a holder on `lease` (hex as etcdctl prints it): the
    /// promotion waits until that lease is gone (a deletion is not an
    /// expiry, docs/fencing.md).
    AwaitingPreviousLease {
        lease: String,
    },
    /// The previous holder's lease is gone, `waited_ns` after the win.
    PreviousLeaseGone {
        lease: String,
        waited_ns: u64,
    },
    /// The previous holder's lease still lived `T + 1.5 s` after the win:
    /// the key is given back unpromoted.
    PreviousLeaseAlive {
        lease: String,
        ttl_s: i64,
    },
    /// Won without knowing every earlier holder of the key (its history
    /// in etcd was compacted or could not be read): the promotion waits
    /// `wait_ns` after the win (`T + 1.5 s`, docs/fencing.md).
    PreviousHoldersUnknown {
        wait_ns: u64,
    },
    /// Rule 8: PostgreSQL was writable while this node did not lead; the
    /// agent fenced it (`how`: the fence's outcome). `holder`: the key's
    /// holder as the agent saw it (null: nobody or unknown). Not a change
    /// of leader: the timeline lists it, under no verdict.
    FencedNotLeader {
        holder: Option<String>,
        how: String,
        ok: bool,
    },
    /// A change of holder observed, at revision `rev`; `None` = key deleted.
    LeaderSeen {
        holder: Option<String>,
    },
    /// An acknowledgement that came back too late to earn a ping.
    RenewedLate {
        sent_ns: u64,
        acked_ns: u64,
    },
    /// The leader stopped renewing: its pinger had not woken for
    /// `silent_ns` (starved or stalled; its watchdog will reset the node).
    RenewalWithheld {
        silent_ns: u64,
    },
    LeaseLost {
        reason: String,
        last_s_ns: Option<u64>,
    },
    Armed {
        device: String,
        identity: String,
        w_s: u32,
        nowayout: bool,
    },
    ArmFailed {
        device: String,
        reason: String,
    },
    /// The pinger refused a ping at `k` because `k - s > M - R` (rule 1).
    PingRefused {
        k_minus_s_ns: u64,
        s_ns: u64,
    },
    /// Optional periodic summary from the pinger of the pings it did send since
    /// the last summary: the evidence that rule 1 held (or did not) while pinging.
    PingSummary {
        pings: u64,
        max_k_minus_s_ns: u64,
        last_s_ns: u64,
    },
    /// Events the pinger could not hand over (queue full) since the last one.
    QueueDropped {
        count: u64,
    },
    /// A device did not accept a ping (from the pinger).
    PingFailed {
        device: String,
        error: String,
    },
    /// Leading without a watchdog (mode `automatic`, nothing could be armed;
    /// or mode `off`): nothing fences this node if it stalls.
    LeadingUnarmed {
        reason: String,
    },
    /// PostgreSQL could not be confirmed stopped; the watchdog will finish.
    StepDownFailed {
        reason: String,
    },
    /// Devices with nowayout that stay armed (pinged on liveness) after a
    /// clean step-down.
    NowayoutKeptArmed {
        devices: Vec<String>,
    },
    Promoted,
    StepDownBegun {
        reason: String,
        deadline_ns: u64,
    },
    /// PostgreSQL confirmed stopped or read-only; `how` says which.
    StepDownConfirmed {
        how: String,
    },
    /// The agent released the leader key: a delete of the key compared on its
    /// value and lease, then a revoke of the lease. Both fields are absent
    /// from logs written before they existed (they still parse and verify).
    Released {
        /// The etcd revision of the release's transaction (the deletion's
        /// revision when `deleted`). Older agents put it in the record's
        /// `rev`, or nowhere.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<i64>,
        /// The transaction deleted the key: it was still this node's, on its
        /// lease, until then, so nobody else could have won it earlier.
        /// `Some(false)`: the key was already gone or someone else's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deleted: Option<bool>,
    },
    /// A release went unanswered (`attempts` in a row); `abandoned`: the
    /// lease that holds the key is let go (no longer renewed, revoked if
    /// etcd answers) rather than hold the key forever.
    ReleaseFailed {
        error: String,
        attempts: u32,
        abandoned: bool,
    },
    Disarmed {
        device: String,
    },
    Shutdown {
        reason: String,
    },
    /// Written by [`AuditLog::open`] when it found a torn last line after a
    /// crash: the bytes were moved to `saved_to`, the chain continues here.
    TornTailRecovered {
        bytes: u64,
        offset: u64,
        saved_to: String,
    },
    /// The leader recorded the synchronous standby set in etcd's `sync`
    /// key; `fallback`: none left, non-strict mode, commits asynchronous.
    SyncRecorded {
        members: Vec<String>,
        quorum: u32,
        fallback: bool,
    },
    /// A follower held back its race for the empty leader key.
    RaceHeld {
        reason: String,
        deferred: bool,
    },
    /// Pause, resume, a request (restart, reinit) begun, done, failed or
    /// refused (`decide::pause`): `what` names it, `detail` says more.
    Maintenance {
        what: String,
        detail: String,
    },
    /// A leader judged a switchover request safe and begins its planned
    /// step-down for `to` (docs/operations.md).
    SwitchoverBegun {
        to: String,
    },
    /// A leader refused a switchover request; `reason` is what the CLI shows.
    SwitchoverRefused {
        to: String,
        reason: String,
    },
    /// The stopped leader handed the key to `to` (the record's `rev` is the
    /// hand-over's revision) once `to` had received the WAL up to the
    /// shutdown checkpoint at `final_lsn`.
    SwitchoverHandedOver {
        to: String,
        final_lsn: u64,
    },
    /// The switchover stopped before the hand-over; the old leader takes
    /// its server back under the key it still holds.
    SwitchoverAborted {
        to: String,
        reason: String,
    },
    /// This node won the scope's `initialize` key (hex lease) and runs
    /// `initdb`: in a bootstrap, exactly one node of the scope writes this.
    BootstrapClaimed {
        lease: String,
    },
    /// This node's `initdb` ended; `detail` is the error when not `ok`.
    Initdb {
        ok: bool,
        detail: String,
    },
}

impl Event {
    /// The snake_case tag, as written in the log.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Startup { .. } => "startup",
            Event::LeaseGranted { .. } => "lease_granted",
            Event::Acquired { .. } => "acquired",
            Event::AwaitingPreviousLease { .. } => "awaiting_previous_lease",
            Event::PreviousLeaseGone { .. } => "previous_lease_gone",
            Event::PreviousLeaseAlive { .. } => "previous_lease_alive",
            Event::PreviousHoldersUnknown { .. } => "previous_holders_unknown",
            Event::FencedNotLeader { .. } => "fenced_not_leader",
            Event::LeaderSeen { .. } => "leader_seen",
            Event::RenewedLate { .. } => "renewed_late",
            Event::RenewalWithheld { .. } => "renewal_withheld",
            Event::LeaseLost { .. } => "lease_lost",
            Event::Armed { .. } => "armed",
            Event::ArmFailed { .. } => "arm_failed",
            Event::PingRefused { .. } => "ping_refused",
            Event::PingSummary { .. } => "ping_summary",
            Event::QueueDropped { .. } => "queue_dropped",
            Event::PingFailed { .. } => "ping_failed",
            Event::LeadingUnarmed { .. } => "leading_unarmed",
            Event::StepDownFailed { .. } => "step_down_failed",
            Event::NowayoutKeptArmed { .. } => "nowayout_kept_armed",
            Event::Promoted => "promoted",
            Event::StepDownBegun { .. } => "step_down_begun",
            Event::StepDownConfirmed { .. } => "step_down_confirmed",
            Event::Released { .. } => "released",
            Event::ReleaseFailed { .. } => "release_failed",
            Event::SyncRecorded { .. } => "sync_recorded",
            Event::RaceHeld { .. } => "race_held",
            Event::Disarmed { .. } => "disarmed",
            Event::Shutdown { .. } => "shutdown",
            Event::TornTailRecovered { .. } => "torn_tail_recovered",
            Event::Maintenance { .. } => "maintenance",
            Event::SwitchoverBegun { .. } => "switchover_begun",
            Event::SwitchoverRefused { .. } => "switchover_refused",
            Event::SwitchoverHandedOver { .. } => "switchover_handed_over",
            Event::SwitchoverAborted { .. } => "switchover_aborted",
            Event::BootstrapClaimed { .. } => "bootstrap_claimed",
            Event::Initdb { .. } => "initdb",
        }
    }
}

impl Event {
    /// The record of a release: `revision` is the transaction's etcd
    /// revision where the caller has it, `deleted` whether it deleted the key.
    pub fn released(revision: Option<i64>, deleted: bool) -> Event {
        Event::Released {
            revision,
            deleted: Some(deleted),
        }
    }

    /// The lifecycle events a leader mirrors to etcd's `history/` prefix (the
    /// timeline's view of a node whose disk is gone, and the outside copy
    /// that shows a truncated local log). Mirror the whole [`Record`]
    /// unchanged (`serde_json::to_vec(&record)`), so its `hash` still holds.
    pub fn is_lifecycle(&self) -> bool {
        !matches!(
            self,
            Event::LeaderSeen { .. }
                | Event::RenewedLate { .. }
                | Event::RenewalWithheld { .. }
                | Event::PingRefused { .. }
                | Event::PingSummary { .. }
                | Event::QueueDropped { .. }
                | Event::PingFailed { .. }
        )
    }
}

/// The stable name of how the PostgreSQL fence ended: records are read by
/// other versions and by tools, so they never hold a `Debug` string (which
/// changes with a rename). Add names; never change one. Step-down reasons
/// have theirs in `StepDownReason::as_str`.
pub fn stop_how(h: crate::postgres::StopHow) -> &'static str {
    use crate::postgres::StopHow as H;
    match h {
        H::AlreadyStopped => "already_stopped",
        H::Immediate => "immediate",
        H::Killed => "killed",
    }
}

/// Hex SHA-256 of some bytes (e.g. the configuration text for `config_digest`).
pub fn digest_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The canonical text of a JSON value: compact, object keys sorted
/// bytewise at every level. Independent of field order in the line and of
/// serde_json's `preserve_order` feature, so any build verifies any log.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The hash a record line must carry: SHA-256 over the canonical form of the
/// whole JSON object minus its `hash` field. Computed on the parsed line, not
/// on [`Record`], so that a field added by hand also breaks it.
pub fn value_hash(v: &Value) -> String {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("hash");
    }
    digest_hex(canonical(&v).as_bytes())
}

/// [`value_hash`] of a record (its own `hash` field is ignored).
pub fn record_hash(r: &Record) -> String {
    value_hash(&serde_json::to_value(r).expect("a Record always serializes"))
}

impl Record {
    /// Whether `hash` matches the content (for records that did not come from
    /// a line, e.g. mirrored in etcd).
    pub fn hash_ok(&self) -> bool {
        record_hash(self) == self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_events() -> Vec<Event> {
        vec![
            Event::Startup {
                version: "0.1.0".into(),
                config_digest: digest_hex(b"x"),
                budget: BudgetRecord {
                    ttl_s: 10,
                    margin_s: 5.0,
                    reset_allowance_s: 1.0,
                    loop_interval_s: 0.3,
                },
                devices: vec![DeviceRecord {
                    path: "/dev/watchdog1".into(),
                    identity: "Software Watchdog".into(),
                    timeout_s: 5,
                    nowayout: true,
                    bootstatus: None,
                    watchdog_reset: false,
                }],
                previous_boot_id: Some("b".into()),
                previous_boot_reset: Some(true),
            },
            Event::LeaseGranted { lease: -1 },
            Event::Acquired {
                lease: 7_587_000_000_000_000,
                s_ns: u64::MAX,
                revision: Some(i64::MAX),
                postgres: Some("replica".into()),
            },
            Event::LeaderSeen { holder: None },
            Event::LeaderSeen {
                holder: Some("pg2".into()),
            },
            Event::RenewedLate {
                sent_ns: 1,
                acked_ns: 2,
            },
            Event::RenewalWithheld { silent_ns: 3 },
            Event::LeaseLost {
                reason: "expired".into(),
                last_s_ns: None,
            },
            Event::Armed {
                device: "/dev/watchdog0".into(),
                identity: "iTCO_wdt".into(),
                w_s: 5,
                nowayout: false,
            },
            Event::ArmFailed {
                device: "/dev/watchdog0".into(),
                reason: "busy: held by pid 1 (systemd)".into(),
            },
            Event::PingRefused {
                k_minus_s_ns: 3,
                s_ns: 4,
            },
            Event::PingSummary {
                pings: 5,
                max_k_minus_s_ns: 6,
                last_s_ns: 7,
            },
            Event::QueueDropped { count: 8 },
            Event::Promoted,
            Event::StepDownBegun {
                reason: "lease lost".into(),
                deadline_ns: 9,
            },
            Event::StepDownConfirmed {
                how: "read-only".into(),
            },
            Event::Released {
                revision: None,
                deleted: None,
            },
            Event::Released {
                revision: Some(42),
                deleted: Some(true),
            },
            Event::Disarmed {
                device: "/dev/watchdog0".into(),
            },
            Event::Shutdown {
                reason: "SIGTERM".into(),
            },
            Event::TornTailRecovered {
                bytes: 10,
                offset: 11,
                saved_to: "/x.torn".into(),
            },
        ]
    }

    /// Every variant survives the line format (flattened, tagged) unchanged,
    /// its hash holds after the round trip, and its tag is `name()`.
    #[test]
    fn every_event_round_trips_through_a_line() {
        for (i, ev) in all_events().into_iter().enumerate() {
            let mut r = Record {
                seq: i as u64,
                node: "pg1".into(),
                wall_ns: 1_790_000_000_000_000_000,
                boot_ns: 123,
                boot_id: "a".into(),
                rev: if i % 2 == 0 { Some(i as i64) } else { None },
                event: ev.clone(),
                prev: GENESIS.into(),
                hash: String::new(),
            };
            r.hash = record_hash(&r);
            let line = serde_json::to_string(&r).unwrap();
            let back: Record = serde_json::from_str(&line).unwrap();
            assert_eq!(back, r, "{line}");
            assert!(back.hash_ok());
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["event"], ev.name(), "{line}");
            assert_eq!(value_hash(&v), r.hash);
        }
    }

    /// A `released` line written before the event had fields still parses,
    /// its hash still holds (the fields are not serialized when absent), and
    /// its revision is read from the record's `rev`.
    #[test]
    fn an_old_released_record_still_parses_and_verifies() {
        let mut v = serde_json::json!({
            "seq": 3, "node": "pg1", "wall_ns": 1, "boot_ns": 2, "boot_id": "b",
            "rev": 17, "event": "released", "prev": GENESIS,
        });
        let h = value_hash(&v);
        v["hash"] = Value::String(h.clone());
        let r: Record = serde_json::from_value(v).unwrap();
        assert_eq!(
            r.event,
            Event::Released {
                revision: None,
                deleted: None
            }
        );
        assert_eq!(r.rev, Some(17));
        assert_eq!(r.hash, h);
        assert!(r.hash_ok(), "re-serialized, the old record hashes the same");
    }

    #[test]
    fn canonical_form_ignores_key_order_but_not_values() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,2],"x":"s"},"hash":"h"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical(&b), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        assert_eq!(value_hash(&a), value_hash(&b));
        let c: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[2,1]},"b":1}"#).unwrap();
        assert_ne!(value_hash(&a), value_hash(&c));
    }

    /// An edited budget cannot make the auditor panic.
    #[test]
    fn any_recorded_budget_converts() {
        for v in [f64::NAN, -1.0, 1e300, 0.0] {
            let b = BudgetRecord {
                ttl_s: u64::MAX,
                margin_s: v,
                reset_allowance_s: v,
                loop_interval_s: v,
            }
            .budget();
            assert!(b.margin == std::time::Duration::MAX || b.margin.as_secs_f64() < 1.0);
        }
    }

    /// The names records store are fixed: a renamed variant must not change
    /// what new records say.
    #[test]
    fn stored_names_are_stable() {
        use crate::decide::StepDownReason as R;
        use crate::postgres::StopHow as H;
        let reasons = [
            (R::Deadline, "deadline"),
            (R::LeaseLost, "lease_lost"),
            (R::KeyLost, "key_lost"),
            (R::PromoteFailed, "promote_failed"),
            (R::PostgresDown, "postgres_down"),
            (R::Shutdown, "shutdown"),
        ];
        for (r, name) in reasons {
            assert_eq!(r.as_str(), name);
        }
        for (h, name) in [
            (H::AlreadyStopped, "already_stopped"),
            (H::Immediate, "immediate"),
            (H::Killed, "killed"),
        ] {
            assert_eq!(stop_how(h), name);
        }
    }

    #[test]
    fn pinger_chatter_is_not_mirrored() {
        let mirrored: Vec<_> = all_events()
            .iter()
            .filter(|e| e.is_lifecycle())
            .map(Event::name)
            .collect();
        assert!(mirrored.contains(&"acquired") && mirrored.contains(&"step_down_confirmed"));
        assert!(!mirrored.contains(&"ping_refused") && !mirrored.contains(&"leader_seen"));
    }
}
