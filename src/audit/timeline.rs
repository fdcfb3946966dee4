//! The timeline: for every change of leader, was the old leader fenced before
//! the new one was promoted, by what, and with how much margin? Pure: records
//! in, [`Change`]s out. No clock is shared between nodes: each node's own
//! records (its boot clock, `boot_ns`) prove its local invariants, and etcd
//! revisions (`rev`) order everything across nodes.
//!
//! Inputs: each node's local log, plus the lifecycle records the leaders
//! mirrored to etcd (same [`Record`]s, deduplicated by `hash`). Records of a
//! node come from its local log where one is given; etcd history fills in
//! the rest (e.g. the `acquired` records of a node whose disk is gone).
//!
//! The rule arithmetic (`s + M - R`, `s + T`, `W <= T - M`) is `timing`'s,
//! applied to the budget each node recorded at start-up. Printing the
//! verdicts is the command line's (`cli::audit`).

use super::{BudgetRecord, Event, Record};
use crate::clock::BootTime;
use crate::timing::{self, Budget};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// A device the leader armed in its term.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmedDevice {
    pub device: String,
    pub identity: String,
    pub w_s: u32,
    pub nowayout: bool,
    /// `W <= T - M`; `None` if the budget is unknown.
    pub w_ok: Option<bool>,
}

/// The old leader's step-down, if recorded in its term.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDown {
    pub how: String,
    /// Its own boot clock.
    pub boot_ns: u64,
    /// Revision of the key's deletion, if it released the key after stepping down.
    pub released_rev: Option<i64>,
    /// Its release after the step-down deleted the key (`None`: not released,
    /// or an older agent that did not record it).
    pub release_deleted: Option<bool>,
    /// The key left it by a switchover's hand-over (`switchover_handed_over`):
    /// one transaction, compared on its value and lease, that put the key
    /// as the new holder's at `released_rev`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_over: bool,
}

/// The old leader's next start-up after its term.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NextStartup {
    pub boot_id: String,
    pub new_boot: bool,
    /// Some(true): a device or the previous-boot check reported a watchdog
    /// reset; Some(false): they could tell and reported none; None: no device
    /// reports a boot status.
    pub watchdog_reset: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OldLeader {
    pub node: String,
    pub acquired_rev: i64,
    pub boot_id: String,
    /// A local log of this node was given (not only etcd history).
    pub local_log: bool,
    pub budget: Option<BudgetRecord>,
    pub armed: Vec<ArmedDevice>,
    pub promoted: bool,
    pub pings_refused: u64,
    /// Largest `k - s` of a refused ping, seconds.
    pub max_refused_k_minus_s: Option<f64>,
    /// Largest `k - s` of a ping actually sent (from `ping_summary`), seconds.
    pub max_pinged_k_minus_s: Option<f64>,
    /// Latest `s` recorded in the term (own boot clock, ns).
    pub last_s_ns: Option<u64>,
    /// `last s + M - R`: no ping was permitted after this (own clock).
    pub last_permitted_ping_ns: Option<u64>,
    /// `last permitted ping + W` (largest W armed): the reset lands by then.
    pub reset_deadline_ns: Option<u64>,
    pub step_down: Option<StepDown>,
    pub next_startup: Option<NextStartup>,
    pub queue_dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewLeader {
    pub node: String,
    pub acquired_rev: i64,
    pub local_log: bool,
    pub armed: Vec<String>,
    pub promoted: bool,
    /// Every `promoted` came after an `armed` (None: not promoted or unknown).
    pub armed_before_promote: Option<bool>,
}

/// The verdict on one change of leader.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "SCREAMING-KEBAB-CASE")]
pub enum Verdict {
    /// The old leader neither armed, nor decided to lead unarmed, nor
    /// promoted in its term: its PostgreSQL was never made writable by it,
    /// so there was nothing to fence.
    NeverPromoted,
    FencedByStepDown,
    FencedByReset,
    Unproven {
        missing: Vec<String>,
    },
    Violation {
        rule: String,
    },
}

impl Verdict {
    /// Safe: the old leader was fenced before the new one was promoted, or
    /// never writable at all.
    pub fn is_safe(&self) -> bool {
        matches!(
            self,
            Verdict::NeverPromoted | Verdict::FencedByStepDown | Verdict::FencedByReset
        )
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::NeverPromoted => write!(f, "NEVER-PROMOTED"),
            Verdict::FencedByStepDown => write!(f, "FENCED-BY-STEP-DOWN"),
            Verdict::FencedByReset => write!(f, "FENCED-BY-RESET"),
            Verdict::Unproven { missing } => write!(f, "UNPROVEN ({})", missing.join("; ")),
            Verdict::Violation { rule } => write!(f, "VIOLATION ({rule})"),
        }
    }
}

/// One change of leader: the key passed from `old` to `new` at `acquired_rev`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub acquired_rev: i64,
    pub old: OldLeader,
    /// Revision at which the old key was deleted (released, or seen deleted).
    pub key_deleted_rev: Option<i64>,
    pub new: NewLeader,
    pub verdict: Verdict,
    /// The reasoning behind the verdict, in one sentence.
    pub proof: String,
    /// Further findings (more violations than the first, dropped events, ...).
    pub notes: Vec<String>,
}

struct NodeLog {
    records: Vec<Record>,
    local: bool,
}

fn merge(local_logs: &[Vec<Record>], etcd_history: &[Record]) -> BTreeMap<String, NodeLog> {
    let mut nodes: BTreeMap<String, NodeLog> = BTreeMap::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for log in local_logs {
        for r in log {
            if seen.insert((r.node.clone(), r.hash.clone())) {
                let n = nodes.entry(r.node.clone()).or_insert(NodeLog {
                    records: Vec::new(),
                    local: true,
                });
                n.local = true;
                n.records.push(r.clone());
            }
        }
    }
    for r in etcd_history {
        if seen.insert((r.node.clone(), r.hash.clone())) {
            nodes
                .entry(r.node.clone())
                .or_insert(NodeLog {
                    records: Vec::new(),
                    local: false,
                })
                .records
                .push(r.clone());
        }
    }
    for n in nodes.values_mut() {
        n.records.sort_by_key(|r| r.seq);
    }
    nodes
}

/// Compares each local log with what its node mirrored to etcd: a mirrored
/// record missing from the end of the local log is a truncation (which the
/// chain alone cannot see), a mirrored record that differs is a rewrite.
/// Empty when they agree.
pub fn cross_check(local_logs: &[Vec<Record>], etcd_history: &[Record]) -> Vec<String> {
    let mut out = Vec::new();
    for log in local_logs {
        let Some(node) = log.first().map(|r| r.node.as_str()) else {
            continue;
        };
        let last = log.iter().map(|r| r.seq).max().unwrap_or(0);
        let by_seq: BTreeMap<u64, &Record> = log.iter().map(|r| (r.seq, r)).collect();
        let mut beyond: Option<&Record> = None;
        for h in etcd_history.iter().filter(|h| h.node == node) {
            match by_seq.get(&h.seq) {
                Some(l) if l.hash != h.hash => out.push(format!(
                    "{node}: local record {} differs from the copy in etcd history (rewritten)",
                    h.seq
                )),
                Some(_) => {}
                None if h.seq > last => {
                    if beyond.is_none_or(|b| b.seq < h.seq) {
                        beyond = Some(h);
                    }
                }
                None => out.push(format!(
                    "{node}: record {} ({}) is in etcd history but not in the local log (removed)",
                    h.seq,
                    h.event.name()
                )),
            }
        }
        if let Some(h) = beyond {
            out.push(format!(
                "{node}: local log ends at record {last} but etcd history has record {} ({}): records removed from the end",
                h.seq,
                h.event.name()
            ));
        }
    }
    out
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// The budget a start-up record describes, if `timing` can reason with it
/// (`R < M < T`; a hand-edited record may not be).
fn usable(b: &BudgetRecord) -> Option<Budget> {
    let b = b.budget();
    (b.reset_allowance < b.margin && b.margin < b.ttl).then_some(b)
}

/// Where a released key's deletion stands, from a `released` record.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Release {
    /// The transaction's revision: the event's own field, or the record's
    /// `rev` (older agents).
    rev: Option<i64>,
    deleted: Option<bool>,
    /// A switchover's hand-over: the key passed to the new holder in the
    /// same transaction, so its win is at this very revision.
    handover: bool,
}

impl Release {
    fn of(r: &Record) -> Option<Release> {
        match &r.event {
            Event::Released { revision, deleted } => Some(Release {
                rev: revision.or(r.rev),
                deleted: *deleted,
                handover: false,
            }),
            Event::SwitchoverHandedOver { .. } => Some(Release {
                rev: r.rev,
                deleted: Some(true),
                handover: true,
            }),
            _ => None,
        }
    }

    /// The deletion this release made, if it made one and its revision is known.
    fn deletion_rev(&self) -> Option<i64> {
        if self.deleted == Some(false) {
            None
        } else {
            self.rev
        }
    }
}

/// What one node's records show about its term that began with the
/// `acquired` record at index `i`.
struct Term<'a> {
    recs: &'a [Record],
    /// The term: from its `acquired` up to (excluding) the node's next
    /// `acquired` or `startup`.
    range: std::ops::Range<usize>,
    budget_record: Option<BudgetRecord>,
    budget: Option<Budget>,
    devices_configured: bool,
    next_startup: Option<&'a Record>,
}

impl<'a> Term<'a> {
    fn new(recs: &'a [Record], i: usize) -> Term<'a> {
        let startup = recs[..i]
            .iter()
            .rev()
            .find(|r| matches!(r.event, Event::Startup { .. }));
        let (budget_record, devices_configured) = match startup.map(|r| &r.event) {
            Some(Event::Startup {
                budget, devices, ..
            }) => (Some(budget.clone()), !devices.is_empty()),
            _ => (None, false),
        };
        let end = recs[i + 1..]
            .iter()
            .position(|r| matches!(r.event, Event::Acquired { .. } | Event::Startup { .. }))
            .map_or(recs.len(), |p| i + 1 + p);
        let next_startup = recs
            .get(end)
            .filter(|r| matches!(r.event, Event::Startup { .. }));
        Term {
            recs,
            range: i..end,
            budget: budget_record.as_ref().and_then(usable),
            budget_record,
            devices_configured,
            next_startup,
        }
    }

    fn acquired(&self) -> &'a Record {
        &self.recs[self.range.start]
    }

    fn records(&self) -> impl Iterator<Item = (usize, &'a Record)> + '_ {
        self.range.clone().map(move |j| (j, &self.recs[j]))
    }

    fn first(&self, f: impl Fn(&Event) -> bool) -> Option<usize> {
        self.records().find(|(_, r)| f(&r.event)).map(|(j, _)| j)
    }

    fn any_in(&self, from: usize, to: usize, f: impl Fn(&Event) -> bool) -> bool {
        self.recs[from..to].iter().any(|r| f(&r.event))
    }

    /// The first `released` record at or after index `from`.
    fn release_after(&self, from: usize) -> Option<Release> {
        self.recs[from..self.range.end].iter().find_map(Release::of)
    }

    /// Rule 2: violated if PostgreSQL was promoted before any device was
    /// armed while devices are configured, unless arming failed first (mode
    /// `automatic` then leads unfenced, which is allowed but proves nothing).
    fn promote_before_arm(&self) -> Option<String> {
        let p = self.first(|e| matches!(e, Event::Promoted))?;
        let (start, end) = (self.range.start, self.range.end);
        let armed = |e: &Event| matches!(e, Event::Armed { .. });
        let armed_before = self.any_in(start, p, armed);
        let failed_before = self.any_in(start, p, |e| matches!(e, Event::ArmFailed { .. }));
        let armed_after = self.any_in(p, end, armed);
        if !armed_before && (armed_after || (self.devices_configured && !failed_before)) {
            Some(format!(
                "rule 2: {} promoted PostgreSQL (record {}) before arming its watchdog",
                self.recs[p].node, self.recs[p].seq
            ))
        } else {
            None
        }
    }

    /// Nothing in the term could have made PostgreSQL writable: no device
    /// armed, no decision to lead unarmed, no promotion. Each of those is
    /// fsynced before the action that follows it, so without them the agent
    /// never sent a promote.
    fn never_promoted(&self) -> bool {
        !self.records().any(|(_, r)| {
            matches!(
                r.event,
                Event::Armed { .. } | Event::LeadingUnarmed { .. } | Event::Promoted
            )
        })
    }
}

/// What the verdict is built from: the first violation wins, the rest are
/// notes; `missing` is what a proof lacks.
#[derive(Default)]
struct Findings {
    violations: Vec<String>,
    missing: Vec<String>,
    notes: Vec<String>,
}

/// One `acquired` record: the revision, the node, its index in the node's records.
struct Acq<'a> {
    rev: i64,
    node: &'a str,
    idx: usize,
}

/// Builds the list of changes of leader, ordered by the etcd revision at
/// which the new leader won the key.
pub fn timeline(local_logs: &[Vec<Record>], etcd_history: &[Record]) -> Vec<Change> {
    let nodes = merge(local_logs, etcd_history);
    let mut acq: Vec<(i64, &str, usize)> = Vec::new();
    for (name, n) in &nodes {
        for (i, r) in n.records.iter().enumerate() {
            if let (Event::Acquired { .. }, Some(rev)) = (&r.event, r.rev) {
                acq.push((rev, name.as_str(), i));
            }
        }
    }
    acq.sort();
    acq.windows(2)
        .map(|w| {
            let (old, new) = (w[0], w[1]);
            change(
                &nodes,
                Acq {
                    rev: old.0,
                    node: old.1,
                    idx: old.2,
                },
                Acq {
                    rev: new.0,
                    node: new.1,
                    idx: new.2,
                },
            )
        })
        .collect()
}

/// One change of leader, in named steps: read the old leader's term, find
/// the key's deletion, read the new leader's term, look for holders nobody
/// recorded, then judge.
fn change(nodes: &BTreeMap<String, NodeLog>, old: Acq, new: Acq) -> Change {
    let mut f = Findings::default();
    if old.rev == new.rev {
        f.violations.push(format!(
            "two acquisitions at one revision {} ({} and {}): the logs contradict etcd",
            new.rev, old.node, new.node
        ));
    }
    let olog = &nodes[old.node];
    let ot = Term::new(&olog.records, old.idx);
    let old_leader = read_old_term(&ot, olog.local, &mut f);
    let key_deleted_rev = key_deletion(nodes, &ot, old.rev, new.rev);
    let nlog = &nodes[new.node];
    let new_leader = read_new_term(&Term::new(&nlog.records, new.idx), nlog.local, &mut f);
    if old.node == new.node {
        f.notes.push(format!("{} won the key again", old.node));
    }
    let gaps = unrecorded_holders(nodes, old.node, old.rev, new.rev);
    let (verdict, proof) = judge(&ot, &old_leader, key_deleted_rev, &new_leader, gaps, &mut f);
    Change {
        acquired_rev: new.rev,
        old: old_leader,
        key_deleted_rev,
        new: new_leader,
        verdict,
        proof,
        notes: f.notes,
    }
}

/// Rule 1 evidence, rule 4 order and the deadlines of the old leader's term.
fn read_old_term(ot: &Term, local_log: bool, f: &mut Findings) -> OldLeader {
    let oacq = ot.acquired();
    let node = oacq.node.as_str();
    let b = ot.budget;
    if ot.budget_record.is_none() {
        f.missing.push(format!(
            "no start-up record of {node} before its term (budget T, M, R unknown)"
        ));
    } else if b.is_none() {
        f.missing.push(format!(
            "{node}'s recorded budget does not satisfy R < M < T: its deadlines cannot be computed"
        ));
    }
    let mut o = OldLeader {
        node: node.to_owned(),
        acquired_rev: oacq.rev.unwrap_or_default(),
        boot_id: oacq.boot_id.clone(),
        local_log,
        budget: ot.budget_record.clone(),
        armed: Vec::new(),
        promoted: false,
        pings_refused: 0,
        max_refused_k_minus_s: None,
        max_pinged_k_minus_s: None,
        last_s_ns: None,
        last_permitted_ping_ns: None,
        reset_deadline_ns: None,
        step_down: None,
        next_startup: None,
        queue_dropped: 0,
    };
    let sd_idx = ot.first(|e| matches!(e, Event::StepDownConfirmed { .. }));
    let promoted_idx = ot.first(|e| matches!(e, Event::Promoted));
    o.promoted = promoted_idx.is_some();
    let mut last_s: Option<u64> = None;
    let mut bump_s = |s: u64| last_s = Some(last_s.map_or(s, |x| x.max(s)));
    let mut max_refused: Option<u64> = None;
    let mut max_pinged: Option<u64> = None;
    for (j, r) in ot.records() {
        // Only the term's own boot clock is comparable.
        let same_boot = r.boot_id == oacq.boot_id;
        match &r.event {
            Event::Acquired { s_ns, .. } if same_boot => bump_s(*s_ns),
            Event::Armed {
                device,
                identity,
                w_s,
                nowayout,
            } => o
                .armed
                .push(armed_device(node, b, device, identity, *w_s, *nowayout, f)),
            Event::PingRefused { k_minus_s_ns, s_ns } => {
                o.pings_refused += 1;
                max_refused = Some(max_refused.map_or(*k_minus_s_ns, |x| x.max(*k_minus_s_ns)));
                if same_boot {
                    bump_s(*s_ns);
                }
            }
            Event::PingSummary {
                pings,
                max_k_minus_s_ns,
                last_s_ns,
            } if *pings > 0 => {
                // Pings sent as a replica after a confirmed step-down (nowayout
                // keep-pinging) are not on lease evidence and prove nothing.
                if sd_idx.is_none_or(|sd| j < sd) {
                    max_pinged =
                        Some(max_pinged.map_or(*max_k_minus_s_ns, |x| x.max(*max_k_minus_s_ns)));
                    if let Some(v) = stale_pings(node, b, *max_k_minus_s_ns, r.seq) {
                        f.violations.push(v);
                    }
                }
                if same_boot {
                    bump_s(*last_s_ns);
                }
            }
            Event::LeaseLost {
                last_s_ns: Some(s), ..
            } if same_boot => bump_s(*s),
            Event::StepDownBegun { deadline_ns, .. } if same_boot && *deadline_ns > 0 => {
                // The deadline is `s + T - M`: it names the s it was set from.
                if let Some(b) = &b {
                    let offset = timing::demotion_deadline(BootTime::ZERO, b).as_nanos();
                    bump_s(deadline_ns.saturating_sub(offset));
                }
            }
            Event::QueueDropped { count } => o.queue_dropped += count,
            Event::Disarmed { device } => {
                if let Some(v) = disarm_too_early(ot, promoted_idx, sd_idx, j, device) {
                    f.violations.push(v);
                }
            }
            _ => {}
        }
    }
    if let Some(v) = ot.promote_before_arm() {
        f.violations.push(v);
    }
    if o.queue_dropped > 0 {
        f.notes.push(format!(
            "{node}'s pinger queue dropped {} events in the term: refusals or ping summaries may be missing",
            o.queue_dropped
        ));
    }
    o.max_refused_k_minus_s = max_refused.map(secs);
    o.max_pinged_k_minus_s = max_pinged.map(secs);
    o.last_s_ns = last_s;
    // Rule 1: no ping after `s + M - R`; the reset lands W after the last one.
    o.last_permitted_ping_ns = match (last_s, &b) {
        (Some(s), Some(b)) => Some(timing::fresh_until(BootTime(s), b).as_nanos()),
        _ => None,
    };
    let max_w = o.armed.iter().map(|a| a.w_s).max();
    o.reset_deadline_ns = match (o.last_permitted_ping_ns, max_w) {
        (Some(p), Some(w)) => Some((BootTime(p) + std::time::Duration::from_secs(w.into())).0),
        _ => None,
    };
    o.step_down = sd_idx.map(|sd| {
        let release = ot.release_after(sd);
        StepDown {
            how: match &ot.recs[sd].event {
                Event::StepDownConfirmed { how } => how.clone(),
                _ => unreachable!("sd_idx points at a step_down_confirmed"),
            },
            boot_ns: ot.recs[sd].boot_ns,
            released_rev: release.and_then(|r| r.deletion_rev()),
            release_deleted: release.and_then(|r| r.deleted),
            handed_over: release.is_some_and(|r| r.handover),
        }
    });
    o.next_startup = ot.next_startup.map(|r| next_startup(r, &oacq.boot_id));
    o
}

/// A device armed in the old term, checked against rule 2/5 (`W <= T - M`).
fn armed_device(
    node: &str,
    b: Option<Budget>,
    device: &str,
    identity: &str,
    w_s: u32,
    nowayout: bool,
    f: &mut Findings,
) -> ArmedDevice {
    let w_ok = b.map(|b| timing::check_readback(w_s, &b).is_ok());
    if let (Some(false), Some(b)) = (w_ok, b) {
        f.violations.push(format!(
            "rule 2/5: {node} armed {device} with W = {w_s} s > T - M = {} s",
            (b.ttl - b.margin).as_secs_f64()
        ));
    }
    ArmedDevice {
        device: device.to_owned(),
        identity: identity.to_owned(),
        w_s,
        nowayout,
        w_ok,
    }
}

/// Rule 1: a ping summary whose largest `k - s` exceeds `M - R`.
fn stale_pings(node: &str, b: Option<Budget>, max_k_minus_s: u64, seq: u64) -> Option<String> {
    let b = b?;
    let window = ns(b.ping_window());
    (max_k_minus_s > window).then(|| {
        format!(
            "rule 1: {node} pinged at k - s = {:.3} s > M - R = {:.3} s (stale evidence, record {seq})",
            secs(max_k_minus_s),
            secs(window),
        )
    })
}

/// Rule 4 applies once PostgreSQL may be writable: disarm only after the
/// stop is confirmed AND the key is released or lost.
fn disarm_too_early(
    ot: &Term,
    promoted: Option<usize>,
    step_down: Option<usize>,
    j: usize,
    device: &str,
) -> Option<String> {
    let p = promoted.filter(|p| j > *p)?;
    let r = &ot.recs[j];
    if step_down.is_none_or(|sd| j < sd) {
        return Some(format!(
            "rule 4: {} disarmed {device} (record {}) before its step-down was confirmed",
            r.node, r.seq
        ));
    }
    // A step-down for `key_lost` is written when etcd itself said the key
    // is deleted or another's (a watch event or a read, never the node's
    // own clock): the key is gone for this node, even when its clock,
    // frozen by a VM pause, still counts its lease as fresh.
    let key_gone = ot.any_in(p, j, |e| match e {
        Event::Released { .. } | Event::LeaseLost { .. } | Event::SwitchoverHandedOver { .. } => {
            true
        }
        // `decide::StepDownReason::KeyLost`'s stable name.
        Event::StepDownBegun { reason, .. } => reason == "key_lost",
        _ => false,
    });
    (!key_gone).then(|| {
        format!(
            "rule 4: {} disarmed {device} (record {}) while still holding the key (not released, not expired)",
            r.node, r.seq
        )
    })
}

/// The old leader's next start-up: a new boot? caused by a watchdog?
fn next_startup(r: &Record, term_boot_id: &str) -> NextStartup {
    let watchdog_reset = match &r.event {
        Event::Startup {
            devices,
            previous_boot_reset,
            ..
        } => {
            if *previous_boot_reset == Some(true) || devices.iter().any(|d| d.watchdog_reset) {
                Some(true)
            } else if previous_boot_reset.is_some()
                || devices.iter().any(|d| d.bootstatus.is_some())
            {
                Some(false)
            } else {
                None
            }
        }
        _ => None,
    };
    NextStartup {
        boot_id: r.boot_id.clone(),
        new_boot: r.boot_id != term_boot_id,
        watchdog_reset,
    }
}

/// The key's deletion between the two acquisitions: the old leader's
/// release, or the earliest deletion anyone saw.
fn key_deletion(
    nodes: &BTreeMap<String, NodeLog>,
    ot: &Term,
    old_rev: i64,
    new_rev: i64,
) -> Option<i64> {
    let released = ot
        .records()
        .find_map(|(_, r)| Release::of(r))
        .and_then(|r| r.deletion_rev());
    let seen = nodes
        .values()
        .flat_map(|n| &n.records)
        .filter_map(|r| match (&r.event, r.rev) {
            (Event::LeaderSeen { holder: None }, Some(rv)) if rv > old_rev && rv < new_rev => {
                Some(rv)
            }
            _ => None,
        })
        .min();
    match (released, seen) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The new leader's term: armed before promoting (rule 2)?
fn read_new_term(nt: &Term, local_log: bool, f: &mut Findings) -> NewLeader {
    let nacq = nt.acquired();
    let node = nacq.node.as_str();
    if let Some(v) = nt.promote_before_arm() {
        f.violations.push(v);
    }
    let promoted = nt.first(|e| matches!(e, Event::Promoted));
    let armed: Vec<String> = nt
        .records()
        .filter_map(|(_, r)| match &r.event {
            Event::Armed { device, .. } => Some(device.clone()),
            _ => None,
        })
        .collect();
    let armed_before_promote =
        promoted.map(|p| nt.any_in(nt.range.start, p, |e| matches!(e, Event::Armed { .. })));
    if !local_log {
        f.notes.push(format!(
            "no local log of the new leader {node}: its arming and promotion are not verified"
        ));
    } else if promoted.is_none() {
        f.notes
            .push(format!("no promotion of {node} recorded in its term"));
    }
    NewLeader {
        node: node.to_owned(),
        acquired_rev: nacq.rev.unwrap_or_default(),
        local_log,
        armed,
        promoted: promoted.is_some(),
        armed_before_promote,
    }
}

/// A holder seen between the two acquisitions that left no `acquired`
/// record anywhere: the key passed through a leader we know nothing of.
fn unrecorded_holders(
    nodes: &BTreeMap<String, NodeLog>,
    old_node: &str,
    old_rev: i64,
    new_rev: i64,
) -> Vec<String> {
    let mut gaps: Vec<String> = Vec::new();
    for r in nodes.values().flat_map(|n| &n.records) {
        if let (Event::LeaderSeen { holder: Some(h) }, Some(rv)) = (&r.event, r.rev) {
            if rv > old_rev && rv < new_rev && h != old_node {
                let g = format!(
                    "{h} held the key at rev {rv} (seen by {}) but left no acquired record: a change in between is not covered",
                    r.node
                );
                if !gaps.contains(&g) {
                    gaps.push(g);
                }
            }
        }
    }
    gaps
}

/// The verdict and its one-sentence proof, in order of strength: a broken
/// rule; a gap in the record; never writable; a step-down that provably came
/// first; a watchdog reset; otherwise what is missing.
fn judge(
    ot: &Term,
    old: &OldLeader,
    key_deleted_rev: Option<i64>,
    new: &NewLeader,
    gaps: Vec<String>,
    f: &mut Findings,
) -> (Verdict, String) {
    let (o, n, new_rev) = (old.node.as_str(), new.node.as_str(), new.acquired_rev);
    if let Some(first) = f.violations.first().cloned() {
        for v in &f.violations[1..] {
            f.notes.push(format!("also: {v}"));
        }
        return (
            Verdict::Violation { rule: first },
            "a fencing rule failed (see the verdict)".to_owned(),
        );
    }
    if !gaps.is_empty() {
        return (
            Verdict::Unproven { missing: gaps },
            format!("the key did not pass directly from {o} to {n}"),
        );
    }
    if old.local_log && ot.never_promoted() {
        return (
            Verdict::NeverPromoted,
            format!(
                "{o} armed nothing, did not choose to lead unarmed and never promoted PostgreSQL in its term: it was never writable, so there was nothing to fence before {n} won the key at rev {new_rev}"
            ),
        );
    }
    let before_step_down = f.missing.len();
    if let Some(why) = old
        .step_down
        .as_ref()
        .and_then(|sd| step_down_first(o, n, new_rev, sd, old, key_deleted_rev, f))
    {
        return (Verdict::FencedByStepDown, why);
    }
    // What the step-down argument could not prove must not sink the reset
    // argument, which stands on its own (a leader cut off from etcd both
    // steps down and is reset: a quorum loss ends with a deletion that is
    // an expiry the auditor cannot tell from a hand delete).
    let step_down_gaps = f.missing.split_off(before_step_down);
    if !old.promoted {
        if let Some(why) = ot
            .release_after(ot.range.start)
            .and_then(|r| released_first(o, n, new_rev, r))
        {
            return (
                Verdict::FencedByStepDown,
                format!("{o} never promoted PostgreSQL in its term and {why}"),
            );
        }
    }
    let (verdict, why) = reset_or_missing(old, new_rev, f);
    if matches!(verdict, Verdict::FencedByReset) {
        f.notes.extend(step_down_gaps);
        return (verdict, why);
    }
    f.missing.splice(0..0, step_down_gaps);
    match verdict {
        Verdict::Unproven { .. } => (
            Verdict::Unproven {
                missing: f.missing.clone(),
            },
            why,
        ),
        v => (v, why),
    }
}

/// How a release orders before the new acquisition, if it does: by its
/// revision, or because it deleted the key (compared on this node's value
/// and lease), which therefore nobody else held until then.
fn released_first(o: &str, n: &str, new_rev: i64, r: Release) -> Option<String> {
    match (r.deletion_rev(), r.deleted) {
        (Some(rev), _) if r.handover && rev == new_rev => Some(format!(
            "handed the key to {n} at rev {rev} (switchover: one transaction compared on {o}'s value and lease, sent after the confirmed stop), which is {n}'s win"
        )),
        (Some(rev), _) if rev < new_rev => Some(format!(
            "released the key at rev {rev}, before {n} won it at rev {new_rev}"
        )),
        (None, Some(true)) => Some(format!(
            "its release deleted the key, still {o}'s on its own lease, so {n} could only win it (rev {new_rev}) after that"
        )),
        _ => None,
    }
}

/// The step-down argument: the confirmed stop is ordered before the new
/// acquisition by the release that followed it, or, on the old leader's own
/// clock, came before the earliest expiry `s + T`. The latter holds only if
/// the key went by expiry: a deletion at a known revision that is not the
/// old leader's own release may have been an `etcdctl del` or a revoke
/// (docs/fencing.md), and then it proves nothing.
fn step_down_first(
    o: &str,
    n: &str,
    new_rev: i64,
    sd: &StepDown,
    old: &OldLeader,
    key_deleted_rev: Option<i64>,
    f: &mut Findings,
) -> Option<String> {
    let release = Release {
        rev: sd.released_rev,
        deleted: sd.release_deleted,
        handover: sd.handed_over,
    };
    if let Some(why) = released_first(o, n, new_rev, release) {
        return Some(format!(
            "{o} confirmed its step-down ({}) and then {why}",
            sd.how
        ));
    }
    let b = old.budget.as_ref().and_then(usable)?;
    let s = old.last_s_ns?;
    let expiry = timing::earliest_expiry(BootTime(s), &b);
    if BootTime(sd.boot_ns) > expiry {
        return None;
    }
    if let Some(rv) = key_deleted_rev.filter(|rv| Some(*rv) != sd.released_rev) {
        f.missing.push(format!(
            "{o} confirmed its step-down before its earliest expiry s + T, but the key was deleted at rev {rv}, not by {o}'s own release: a deletion need not be an expiry, so nothing orders the step-down before {n}'s win"
        ));
        return None;
    }
    Some(format!(
        "{o} confirmed its step-down ({}) {:.3} s after its last s, before the earliest expiry s + T; {n} could only win the key after that",
        sd.how,
        secs(sd.boot_ns.saturating_sub(s))
    ))
}

/// The reset argument: armed with `W <= T - M`, rule 1 held (no stale ping
/// recorded), and the next start-up is a new boot caused by the watchdog.
fn reset_or_missing(old: &OldLeader, new_rev: i64, f: &mut Findings) -> (Verdict, String) {
    let o = old.node.as_str();
    if old.armed.is_empty() {
        f.missing.push(format!(
            "{o} armed no watchdog in its term (no step-down proven either)"
        ));
    }
    if !old.local_log {
        f.missing.push(format!(
            "no local log of the old leader {o}: stale pings cannot be ruled out"
        ));
    }
    match &old.next_startup {
        None => f.missing.push(format!(
            "no later start-up of {o} recorded (no step-down, no reset evidence)"
        )),
        Some(ns) if !ns.new_boot => f.missing.push(format!(
            "{o}'s agent restarted in the same boot (boot id unchanged): no reset, and no step-down is recorded"
        )),
        Some(ns) => match ns.watchdog_reset {
            Some(true) => {}
            Some(false) => f.missing.push(format!(
                "{o} rebooted but its devices report no watchdog reset (a reboot or power loss at an unknown time)"
            )),
            None => f
                .missing
                .push("reset presumed, boot status unavailable".to_owned()),
        },
    }
    if !f.missing.is_empty() {
        return (
            Verdict::Unproven {
                missing: f.missing.clone(),
            },
            format!(
                "neither a step-down before rev {new_rev} nor a watchdog reset of {o} is proven"
            ),
        );
    }
    let boot = old.next_startup.as_ref().map_or("", |n| n.boot_id.as_str());
    (
        Verdict::FencedByReset,
        format!(
            "{o} was armed with W <= T - M, recorded no ping on stale evidence, and its next boot ({}) began with a watchdog reset{}",
            short(boot),
            match old.reset_deadline_ns {
                Some(d) => format!(
                    " due by {:.3} s on its boot clock (before the earliest expiry)",
                    secs(d)
                ),
                None => String::new(),
            }
        ),
    )
}

/// The first 8 characters of a boot id.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

#[cfg(test)]
mod tests;
