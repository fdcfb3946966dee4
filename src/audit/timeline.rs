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

use super::{BudgetRecord, Event, Record};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

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
    FencedByStepDown,
    FencedByReset,
    Unproven { missing: Vec<String> },
    Violation { rule: String },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
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

/// What one node's records show about its term that began with the
/// `acquired` record at index `i`.
struct Term<'a> {
    recs: &'a [Record],
    /// The term: from its `acquired` up to (excluding) the node's next
    /// `acquired` or `startup`.
    range: std::ops::Range<usize>,
    budget: Option<BudgetRecord>,
    devices_configured: bool,
    next_startup: Option<&'a Record>,
}

impl<'a> Term<'a> {
    fn new(recs: &'a [Record], i: usize) -> Term<'a> {
        let startup = recs[..i]
            .iter()
            .rev()
            .find(|r| matches!(r.event, Event::Startup { .. }));
        let (budget, devices_configured) = match startup.map(|r| &r.event) {
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
            budget,
            devices_configured,
            next_startup,
        }
    }

    fn records(&self) -> impl Iterator<Item = (usize, &'a Record)> + '_ {
        self.range.clone().map(move |j| (j, &self.recs[j]))
    }

    fn first(&self, f: impl Fn(&Event) -> bool) -> Option<usize> {
        self.records().find(|(_, r)| f(&r.event)).map(|(j, _)| j)
    }

    /// `T - M` and `M - R` in ns.
    fn limits(&self) -> Option<(u64, u64, u64)> {
        self.budget.as_ref().map(|b| {
            let t = b.ttl_s * 1_000_000_000;
            let m = (b.margin_s * 1e9).round() as u64;
            let r = (b.reset_allowance_s * 1e9).round() as u64;
            (t, t.saturating_sub(m), m.saturating_sub(r))
        })
    }

    /// Rule 2: violated if PostgreSQL was promoted before any device was
    /// armed while devices are configured, unless arming failed first (mode
    /// `automatic` then leads unfenced, which is allowed but proves nothing).
    fn promote_before_arm(&self) -> Option<String> {
        let p = self.first(|e| matches!(e, Event::Promoted))?;
        let armed_before = self.recs[self.range.start..p]
            .iter()
            .any(|r| matches!(r.event, Event::Armed { .. }));
        let failed_before = self.recs[self.range.start..p]
            .iter()
            .any(|r| matches!(r.event, Event::ArmFailed { .. }));
        let armed_after = self.recs[p..self.range.end]
            .iter()
            .any(|r| matches!(r.event, Event::Armed { .. }));
        if !armed_before && (armed_after || (self.devices_configured && !failed_before)) {
            Some(format!(
                "rule 2: {} promoted PostgreSQL (record {}) before arming its watchdog",
                self.recs[p].node, self.recs[p].seq
            ))
        } else {
            None
        }
    }
}

/// Builds the list of changes of leader, ordered by the etcd revision at
/// which the new leader won the key.
pub fn timeline(local_logs: &[Vec<Record>], etcd_history: &[Record]) -> Vec<Change> {
    let nodes = merge(local_logs, etcd_history);
    let mut acq: Vec<(i64, String, usize)> = Vec::new();
    for (name, n) in &nodes {
        for (i, r) in n.records.iter().enumerate() {
            if let (Event::Acquired { .. }, Some(rev)) = (&r.event, r.rev) {
                acq.push((rev, name.clone(), i));
            }
        }
    }
    acq.sort();
    let mut changes = Vec::new();
    for w in acq.windows(2) {
        let (old_rev, old_node, oi) = &w[0];
        let (new_rev, new_node, ni) = &w[1];
        changes.push(change(
            &nodes, old_node, *old_rev, *oi, new_node, *new_rev, *ni,
        ));
    }
    changes
}

fn change(
    nodes: &BTreeMap<String, NodeLog>,
    old_node: &str,
    old_rev: i64,
    oi: usize,
    new_node: &str,
    new_rev: i64,
    ni: usize,
) -> Change {
    let mut violations: Vec<String> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    if old_rev == new_rev {
        violations.push(format!(
            "two acquisitions at one revision {new_rev} ({old_node} and {new_node}): the logs contradict etcd"
        ));
    }

    // ---- the old leader's term
    let olog = &nodes[old_node];
    let ot = Term::new(&olog.records, oi);
    let oacq = &olog.records[oi];
    let limits = ot.limits();
    if ot.budget.is_none() {
        missing.push(format!(
            "no start-up record of {old_node} before its term (budget T, M, R unknown)"
        ));
    }

    let mut armed = Vec::new();
    let mut pings_refused = 0;
    let mut max_refused: Option<u64> = None;
    let mut max_pinged: Option<u64> = None;
    let mut last_s: Option<u64> = None;
    let mut queue_dropped = 0;
    let sd_idx = ot.first(|e| matches!(e, Event::StepDownConfirmed { .. }));
    let promoted_idx = ot.first(|e| matches!(e, Event::Promoted));
    let bump_s = |s: u64, last_s: &mut Option<u64>| {
        *last_s = Some(last_s.map_or(s, |x: u64| x.max(s)));
    };
    for (j, r) in ot.records() {
        // Only the term's own boot clock is comparable.
        let same_boot = r.boot_id == oacq.boot_id;
        match &r.event {
            Event::Acquired { s_ns, .. } if same_boot => bump_s(*s_ns, &mut last_s),
            Event::Armed {
                device,
                identity,
                w_s,
                nowayout,
            } => {
                let w_ok = limits.map(|(_, tm, _)| (*w_s as u64) * 1_000_000_000 <= tm);
                if w_ok == Some(false) {
                    violations.push(format!(
                        "rule 2/5: {old_node} armed {device} with W = {w_s} s > T - M = {} s",
                        secs(limits.unwrap().1)
                    ));
                }
                armed.push(ArmedDevice {
                    device: device.clone(),
                    identity: identity.clone(),
                    w_s: *w_s,
                    nowayout: *nowayout,
                    w_ok,
                });
            }
            Event::PingRefused { k_minus_s_ns, s_ns } => {
                pings_refused += 1;
                max_refused = Some(max_refused.map_or(*k_minus_s_ns, |x| x.max(*k_minus_s_ns)));
                if same_boot {
                    bump_s(*s_ns, &mut last_s);
                }
            }
            Event::PingSummary {
                pings,
                max_k_minus_s_ns,
                last_s_ns,
            } if *pings > 0 => {
                // Pings sent as a replica after a confirmed step-down (nowayout
                // keep-pinging) are not on lease evidence and prove nothing.
                let leading = sd_idx.is_none_or(|sd| j < sd);
                if leading {
                    max_pinged =
                        Some(max_pinged.map_or(*max_k_minus_s_ns, |x| x.max(*max_k_minus_s_ns)));
                    if let Some((_, _, win)) = limits {
                        if *max_k_minus_s_ns > win {
                            violations.push(format!(
                                "rule 1: {old_node} pinged at k - s = {:.3} s > M - R = {:.3} s (stale evidence, record {})",
                                secs(*max_k_minus_s_ns),
                                secs(win),
                                r.seq
                            ));
                        }
                    }
                    if same_boot {
                        bump_s(*last_s_ns, &mut last_s);
                    }
                }
            }
            Event::LeaseLost {
                last_s_ns: Some(s), ..
            } if same_boot => bump_s(*s, &mut last_s),
            Event::StepDownBegun { deadline_ns, .. } if same_boot => {
                if let Some((_, tm, _)) = limits {
                    bump_s(deadline_ns.saturating_sub(tm), &mut last_s);
                }
            }
            Event::QueueDropped { count } => queue_dropped += count,
            Event::Disarmed { device } => {
                // Rule 4 applies once PostgreSQL may be writable: disarm only
                // after the stop is confirmed AND the key is released or lost.
                if let Some(p) = promoted_idx {
                    let key_gone = ot.recs[p..j]
                        .iter()
                        .any(|x| matches!(x.event, Event::Released | Event::LeaseLost { .. }));
                    if j > p && sd_idx.is_none_or(|sd| j < sd) {
                        violations.push(format!(
                            "rule 4: {old_node} disarmed {device} (record {}) before its step-down was confirmed",
                            r.seq
                        ));
                    } else if j > p && !key_gone {
                        violations.push(format!(
                            "rule 4: {old_node} disarmed {device} (record {}) while still holding the key (not released, not expired)",
                            r.seq
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(v) = ot.promote_before_arm() {
        violations.push(v);
    }
    if queue_dropped > 0 {
        notes.push(format!(
            "{old_node}'s pinger queue dropped {queue_dropped} events in the term: refusals or ping summaries may be missing"
        ));
    }
    let max_w = armed.iter().map(|a| a.w_s as u64 * 1_000_000_000).max();
    let last_permitted = match (last_s, limits) {
        (Some(s), Some((_, _, win))) => Some(s + win),
        _ => None,
    };
    let reset_deadline = match (last_permitted, max_w) {
        (Some(p), Some(w)) => Some(p + w),
        _ => None,
    };

    let step_down = sd_idx.map(|sd| {
        let released_rev = ot.recs[sd..ot.range.end]
            .iter()
            .find(|r| matches!(r.event, Event::Released))
            .and_then(|r| r.rev);
        let how = match &ot.recs[sd].event {
            Event::StepDownConfirmed { how } => how.clone(),
            _ => unreachable!(),
        };
        StepDown {
            how,
            boot_ns: ot.recs[sd].boot_ns,
            released_rev,
        }
    });

    let next_startup = ot.next_startup.map(|r| {
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
            new_boot: r.boot_id != oacq.boot_id,
            watchdog_reset,
        }
    });

    // Key deletion: the old leader's release, or a deletion anyone saw.
    let mut key_deleted_rev = step_down.as_ref().and_then(|s| s.released_rev);
    if key_deleted_rev.is_none() {
        key_deleted_rev = ot
            .records()
            .find(|(_, r)| matches!(r.event, Event::Released))
            .and_then(|(_, r)| r.rev);
    }
    for n in nodes.values() {
        for r in &n.records {
            if let (Event::LeaderSeen { holder: None }, Some(rv)) = (&r.event, r.rev) {
                if rv > old_rev && rv < new_rev {
                    key_deleted_rev = Some(key_deleted_rev.map_or(rv, |k: i64| k.min(rv)));
                }
            }
        }
    }

    // ---- the new leader's term
    let nlog = &nodes[new_node];
    let nt = Term::new(&nlog.records, ni);
    if let Some(v) = nt.promote_before_arm() {
        violations.push(v);
    }
    let n_promoted = nt.first(|e| matches!(e, Event::Promoted));
    let n_armed: Vec<String> = nt
        .records()
        .filter_map(|(_, r)| match &r.event {
            Event::Armed { device, .. } => Some(device.clone()),
            _ => None,
        })
        .collect();
    let armed_before_promote = n_promoted.map(|p| {
        nlog.records[ni..p]
            .iter()
            .any(|r| matches!(r.event, Event::Armed { .. }))
    });
    if !nlog.local {
        notes.push(format!(
            "no local log of the new leader {new_node}: its arming and promotion are not verified"
        ));
    } else if n_promoted.is_none() {
        notes.push(format!("no promotion of {new_node} recorded in its term"));
    }
    if old_node == new_node {
        notes.push(format!("{old_node} won the key again"));
    }

    // A holder seen between the two acquisitions that left no `acquired`
    // record anywhere: the key passed through a leader we know nothing of.
    let mut gaps: Vec<String> = Vec::new();
    for n in nodes.values() {
        for r in &n.records {
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
    }

    // ---- the verdict
    let old_promoted = promoted_idx.is_some();
    let mut proof = String::new();
    let verdict = if let Some(first) = violations.first() {
        for v in &violations[1..] {
            notes.push(format!("also: {v}"));
        }
        Verdict::Violation {
            rule: first.clone(),
        }
    } else if !gaps.is_empty() {
        proof = format!("the key did not pass directly from {old_node} to {new_node}");
        Verdict::Unproven { missing: gaps }
    } else if let Some(why) = step_down.as_ref().and_then(|sd| {
        // Ordered before the new acquisition by etcd (release revision), or
        // on the old leader's own clock before the key could expire (s + T).
        if let Some(r) = sd.released_rev.filter(|r| *r < new_rev) {
            return Some(format!(
                "{old_node} confirmed its step-down ({}) and then released the key at rev {r}, before {new_node} won it at rev {new_rev}",
                sd.how
            ));
        }
        match (last_s, limits) {
            (Some(s), Some((t, _, _))) if sd.boot_ns <= s + t => Some(format!(
                "{old_node} confirmed its step-down ({}) {:.3} s after its last s, before the earliest expiry s + T; {new_node} could only win the key after that",
                sd.how,
                secs(sd.boot_ns.saturating_sub(s))
            )),
            _ => None,
        }
    }) {
        proof = why;
        Verdict::FencedByStepDown
    } else if let Some(r) = ot
        .records()
        .find(|(_, r)| matches!(r.event, Event::Released))
        .and_then(|(_, r)| r.rev)
        .filter(|r| !old_promoted && *r < new_rev)
    {
        proof = format!(
            "{old_node} never promoted PostgreSQL in its term and released the key at rev {r}, before {new_node} won it at rev {new_rev}"
        );
        Verdict::FencedByStepDown
    } else {
        // The reset argument: armed with W <= T - M, rule 1 held (no stale
        // ping recorded), and the next start-up is a new boot caused by the
        // watchdog.
        if armed.is_empty() {
            missing.push(format!(
                "{old_node} armed no watchdog in its term (no step-down proven either)"
            ));
        }
        if !olog.local {
            missing.push(format!(
                "no local log of the old leader {old_node}: stale pings cannot be ruled out"
            ));
        }
        match &next_startup {
            None => missing.push(format!(
                "no later start-up of {old_node} recorded (no step-down, no reset evidence)"
            )),
            Some(ns) if !ns.new_boot => missing.push(format!(
                "{old_node}'s agent restarted in the same boot (boot id unchanged): no reset, and no step-down is recorded"
            )),
            Some(ns) => match ns.watchdog_reset {
                Some(true) => {}
                Some(false) => missing.push(format!(
                    "{old_node} rebooted but its devices report no watchdog reset (a reboot or power loss at an unknown time)"
                )),
                None => missing.push("reset presumed, boot status unavailable".to_owned()),
            },
        }
        if missing.is_empty() {
            proof = format!(
                "{old_node} was armed with W <= T - M, recorded no ping on stale evidence, and its next boot ({}) began with a watchdog reset{}",
                short(&next_startup.as_ref().unwrap().boot_id),
                match reset_deadline {
                    Some(d) => format!(
                        " due by {:.3} s on its boot clock (before the earliest expiry)",
                        secs(d)
                    ),
                    None => String::new(),
                }
            );
            Verdict::FencedByReset
        } else {
            proof = format!(
                "neither a step-down before rev {new_rev} nor a watchdog reset of {old_node} is proven"
            );
            Verdict::Unproven {
                missing: missing.clone(),
            }
        }
    };
    if matches!(verdict, Verdict::Violation { .. }) {
        proof = "a fencing rule failed (see the verdict)".to_owned();
    }

    Change {
        acquired_rev: new_rev,
        old: OldLeader {
            node: old_node.to_owned(),
            acquired_rev: old_rev,
            boot_id: oacq.boot_id.clone(),
            local_log: olog.local,
            budget: ot.budget.clone(),
            armed,
            promoted: old_promoted,
            pings_refused,
            max_refused_k_minus_s: max_refused.map(secs),
            max_pinged_k_minus_s: max_pinged.map(secs),
            last_s_ns: last_s,
            last_permitted_ping_ns: last_permitted,
            reset_deadline_ns: reset_deadline,
            step_down,
            next_startup,
            queue_dropped,
        },
        key_deleted_rev,
        new: NewLeader {
            node: new_node.to_owned(),
            acquired_rev: new_rev,
            local_log: nlog.local,
            armed: n_armed,
            promoted: n_promoted.is_some(),
            armed_before_promote,
        },
        verdict,
        proof,
        notes,
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// The changes as text, one block per change.
pub fn render_text(changes: &[Change]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if changes.is_empty() {
        o.push_str("no change of leader found (fewer than two `acquired` records)\n");
    }
    for c in changes {
        let old = &c.old;
        let _ = writeln!(
            o,
            "change at rev {}: {} -> {}    {}",
            c.acquired_rev,
            old.node,
            c.new.node,
            match &c.verdict {
                Verdict::Unproven { .. } => "UNPROVEN".to_owned(),
                Verdict::Violation { .. } => "VIOLATION".to_owned(),
                v => v.to_string(),
            }
        );
        let _ = writeln!(
            o,
            "  old leader {} (won rev {}, boot {}{})",
            old.node,
            old.acquired_rev,
            short(&old.boot_id),
            if old.local_log {
                ""
            } else {
                ", etcd history only"
            }
        );
        match &old.budget {
            Some(b) => {
                let _ = writeln!(
                    o,
                    "    budget: T = {} s, M = {} s, R = {} s, T - M = {} s, M - R = {} s",
                    b.ttl_s,
                    b.margin_s,
                    b.reset_allowance_s,
                    b.ttl_s as f64 - b.margin_s,
                    b.margin_s - b.reset_allowance_s
                );
            }
            None => o.push_str("    budget: unknown (no start-up record)\n"),
        }
        if old.armed.is_empty() {
            o.push_str("    armed: nothing\n");
        }
        for a in &old.armed {
            let _ = writeln!(
                o,
                "    armed: {} ({}) W = {} s{}, nowayout {}",
                a.device,
                a.identity,
                a.w_s,
                match a.w_ok {
                    Some(true) => " <= T - M",
                    Some(false) => " > T - M (!)",
                    None => "",
                },
                a.nowayout
            );
        }
        let _ = writeln!(
            o,
            "    promoted: {}; pings refused: {}{}; largest k - s pinged: {}",
            if old.promoted { "yes" } else { "no" },
            old.pings_refused,
            old.max_refused_k_minus_s
                .map(|x| format!(" (largest k - s {x:.3} s)"))
                .unwrap_or_default(),
            old.max_pinged_k_minus_s
                .map(|x| format!("{x:.3} s"))
                .unwrap_or_else(|| "not recorded".into())
        );
        if let Some(s) = old.last_s_ns {
            let _ = writeln!(
                o,
                "    last s {:.3} s; last permitted ping by {}; reset due by {} (its boot clock)",
                secs(s),
                old.last_permitted_ping_ns
                    .map(|x| format!("{:.3} s", secs(x)))
                    .unwrap_or_else(|| "?".into()),
                old.reset_deadline_ns
                    .map(|x| format!("{:.3} s", secs(x)))
                    .unwrap_or_else(|| "?".into()),
            );
        }
        match &old.step_down {
            Some(sd) => {
                let _ = writeln!(
                    o,
                    "    step-down confirmed ({}) at {:.3} s{}",
                    sd.how,
                    secs(sd.boot_ns),
                    sd.released_rev
                        .map(|r| format!(", key released at rev {r}"))
                        .unwrap_or_default()
                );
            }
            None => o.push_str("    step-down: none recorded\n"),
        }
        match &old.next_startup {
            Some(ns) => {
                let _ = writeln!(
                    o,
                    "    next start-up: boot {} ({}), watchdog reset: {}",
                    short(&ns.boot_id),
                    if ns.new_boot { "new boot" } else { "same boot" },
                    match ns.watchdog_reset {
                        Some(true) => "reported",
                        Some(false) => "not reported",
                        None => "unknown (no boot status)",
                    }
                );
            }
            None => o.push_str("    next start-up: none recorded\n"),
        }
        let _ = writeln!(
            o,
            "  key deleted at rev {}; {} won it at rev {}",
            c.key_deleted_rev
                .map(|r| r.to_string())
                .unwrap_or_else(|| "? (expired unobserved)".into()),
            c.new.node,
            c.new.acquired_rev
        );
        let _ = writeln!(
            o,
            "  new leader {}: armed [{}], {}",
            c.new.node,
            c.new.armed.join(", "),
            match (c.new.promoted, c.new.armed_before_promote) {
                (true, Some(true)) => "promoted after arming",
                (true, _) => "promoted WITHOUT arming first",
                (false, _) => "no promotion recorded",
            }
        );
        let _ = writeln!(o, "  verdict: {}", c.verdict);
        if !c.proof.is_empty() {
            let _ = writeln!(o, "  because: {}", c.proof);
        }
        for n in &c.notes {
            let _ = writeln!(o, "  note: {n}");
        }
        o.push('\n');
    }
    o
}

/// `leasedog audit verify FILE`: exit 0 if the chain is intact (a torn tail
/// alone is a note, not a break), 1 if broken, 2 if the file cannot be read.
pub fn cmd_verify(path: &Path, out: &mut dyn Write) -> i32 {
    match super::verify(path) {
        Err(e) => {
            let _ = writeln!(out, "{e}");
            2
        }
        Ok(r) => {
            let _ = writeln!(
                out,
                "{}: {} records, {}",
                path.display(),
                r.records,
                if r.intact {
                    "chain intact"
                } else {
                    "CHAIN BROKEN"
                }
            );
            if let Some((line, what)) = &r.first_break {
                let _ = writeln!(out, "first break at line {line}: {what}");
            }
            for n in &r.notes {
                let _ = writeln!(out, "note: {n}");
            }
            let _ = writeln!(
                out,
                "(a clean truncation of whole last records cannot be seen from the file alone)"
            );
            if r.intact {
                0
            } else {
                1
            }
        }
    }
}

/// `leasedog audit timeline [--json] FILE... [--history]`: reads and verifies
/// the local logs, builds the timeline, prints it. Exit 0 if every change is
/// fenced, 1 on a VIOLATION or a broken chain, 2 if a change is UNPROVEN or
/// a file cannot be read.
pub fn cmd_timeline(
    local: &[PathBuf],
    history: Option<Vec<Record>>,
    json: bool,
    out: &mut dyn Write,
) -> i32 {
    let mut logs = Vec::new();
    let mut checks = Vec::new();
    let mut code = 0;
    for p in local {
        match super::read_log(p) {
            Ok((recs, rep)) => {
                if !rep.intact {
                    code = 1;
                }
                logs.push(recs);
                checks.push((p.clone(), rep));
            }
            Err(e) => {
                let _ = writeln!(out, "{e}");
                return 2;
            }
        }
    }
    // A history record whose hash does not hold was edited: count it, and
    // keep it out of the verdicts.
    let (history, bad): (Vec<Record>, Vec<Record>) = history
        .unwrap_or_default()
        .into_iter()
        .partition(Record::hash_ok);
    let bad_history = bad.len();
    if bad_history > 0 {
        code = 1;
    }
    let disagreements = cross_check(&logs, &history);
    if !disagreements.is_empty() {
        code = 1;
    }
    let changes = timeline(&logs, &history);
    for c in &changes {
        match c.verdict {
            Verdict::Violation { .. } => code = 1,
            Verdict::Unproven { .. } if code == 0 => code = 2,
            _ => {}
        }
    }
    if json {
        let logs: Vec<_> = checks
            .iter()
            .map(|(p, r)| serde_json::json!({ "path": p, "verify": r }))
            .collect();
        let v = serde_json::json!({
            "logs": logs,
            "history_records": history.len(),
            "history_bad_hashes": bad_history,
            "history_disagreements": disagreements,
            "changes": changes,
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        );
    } else {
        for (p, r) in &checks {
            let _ = writeln!(
                out,
                "log {}: {} records, {}{}",
                p.display(),
                r.records,
                match &r.first_break {
                    None => "chain intact".to_owned(),
                    Some((l, w)) =>
                        format!("CHAIN BROKEN at line {l}: {w} (verdicts below rest on it)"),
                },
                if r.torn_tail { ", torn tail" } else { "" }
            );
        }
        if !history.is_empty() || bad_history > 0 {
            let _ = writeln!(
                out,
                "etcd history: {} records{}",
                history.len() + bad_history,
                if bad_history > 0 {
                    format!(", {bad_history} with a wrong hash (edited; left out)")
                } else {
                    String::new()
                }
            );
        }
        for d in &disagreements {
            let _ = writeln!(out, "LOG DISAGREES WITH ETCD: {d}");
        }
        let _ = writeln!(out);
        let _ = write!(out, "{}", render_text(&changes));
    }
    code
}

#[cfg(test)]
mod tests;
