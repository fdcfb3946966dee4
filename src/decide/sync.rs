//! Synchronous replication and the election among replicas (issue 12):
//! which standbys the leader makes PostgreSQL wait for, the `sync` key in
//! etcd that records them, and whether a follower may race for an empty
//! leader key. Pure functions; the core sequences them
//! (`Action::WriteSync`, `Action::SetSyncStandbys`, `Action::ReadCandidates`)
//! and the agent only executes.
//!
//! The safety rule: the recorded set always *covers* what PostgreSQL waits
//! for ([`SyncState::covers`]): every name PostgreSQL may wait for is in it,
//! and its ack count is no higher. So the leader writes the union of the old
//! and new sets before it changes `synchronous_standby_names`, and the new
//! set only after ([`next_step`]). A commit acknowledged under `ANY k` (or
//! `FIRST k`) of `n` names is on `k` of them; any `n - k + 1` of them hold
//! it, so a member of the recorded set that is at least as far as `n - k +
//! 1` members (itself included) holds every acknowledged commit
//! ([`race_verdict`]).

use super::member::Member;
use super::{Action, Core, Fact, KeyHolder, Role};
use crate::clock::BootTime;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The synchronous-replication and election settings (`[postgres]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// `postgres.synchronous_mode_strict`: never fall back to asynchronous;
    /// commits block while no synchronous standby streams.
    pub strict: bool,
    /// `postgres.synchronous_node_count`: acknowledgements a commit waits for.
    pub node_count: u32,
    /// `postgres.synchronous_quorum`: `ANY k (every streaming standby)`
    /// instead of `FIRST k (k chosen standbys)`.
    pub quorum: bool,
    /// `postgres.failover_defer`: how long a follower behind another healthy
    /// candidate holds its race back (bounded: then it races anyway).
    pub defer: Duration,
    /// Check the candidates (`Action::ReadCandidates`) before each race.
    /// Off only for drivers that model no etcd reads (unit tests, simulation).
    pub check_candidates: bool,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            strict: false,
            node_count: 1,
            quorum: false,
            defer: Duration::from_secs(3),
            check_candidates: false,
        }
    }
}

/// The value of the `sync` key: the leader that wrote it, the standbys
/// PostgreSQL may wait for, and how many acknowledgements a commit needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub leader: String,
    /// Sorted, no duplicates. Empty: asynchronous (nothing is waited for,
    /// or strict mode with no standby known yet).
    pub members: Vec<String>,
    /// Acknowledgements a commit waits for (`k`); 0 when asynchronous.
    pub quorum: u32,
}

impl SyncState {
    pub fn asynchronous(leader: &str) -> SyncState {
        SyncState {
            leader: leader.into(),
            members: Vec::new(),
            quorum: 0,
        }
    }

    /// Whether a record of `self` is safe while PostgreSQL waits as `pg`
    /// says: every name waited for is recorded, with no more acks required.
    pub fn covers(&self, pg: &SyncState) -> bool {
        pg.members.iter().all(|m| self.members.contains(m))
            && (pg.members.is_empty() || self.quorum <= pg.quorum)
    }

    /// The smallest record covering both (written before a change).
    pub fn union(&self, other: &SyncState) -> SyncState {
        let mut members: Vec<String> = self.members.clone();
        members.extend(other.members.iter().cloned());
        members.sort();
        members.dedup();
        let quorum = match (self.members.is_empty(), other.members.is_empty()) {
            (true, _) => other.quorum,
            (_, true) => self.quorum,
            _ => self.quorum.min(other.quorum),
        };
        SyncState {
            leader: other.leader.clone(),
            members,
            quorum,
        }
    }
}

/// Standbys that can be synchronous: pg_basebackup's WAL stream and unnamed
/// clients are no replicas.
fn replicas(streaming: &[String]) -> Vec<String> {
    let mut v: Vec<String> = streaming
        .iter()
        .filter(|n| !n.is_empty() && *n != "pg_basebackup")
        .cloned()
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The streaming standbys that may be synchronous, and those whose member
/// record is not listed yet. Only a scope member races for the key, so a
/// standby is a candidate only once its record is listed (`listed`: the
/// leader's last listing, None before the first), and never one tagged
/// `nosync`. A standby not yet listed waits for the next listing, which the
/// core asks for at once.
pub fn sync_candidates(
    streaming: &[String],
    listed: Option<&[Member]>,
) -> (Vec<String>, Vec<String>) {
    let mut ok = Vec::new();
    let mut unknown = Vec::new();
    for n in replicas(streaming) {
        match listed.and_then(|l| l.iter().find(|m| m.node == n)) {
            Some(m) if m.tags.nosync => {}
            Some(_) => ok.push(n),
            None => unknown.push(n),
        }
    }
    (ok, unknown)
}

/// `current` without the members listed as `nosync`: a member tagged since
/// it was chosen is dropped like one that stopped streaming (strict mode
/// keeps members that went away, never one tagged `nosync`).
pub fn without_nosync(current: Option<&SyncState>, listed: Option<&[Member]>) -> Option<SyncState> {
    let nosync =
        |n: &String| listed.is_some_and(|l| l.iter().any(|m| &m.node == n && m.tags.nosync));
    current.map(|c| SyncState {
        members: c.members.iter().filter(|n| !nosync(n)).cloned().collect(),
        ..c.clone()
    })
}

/// The set the leader `leader` wants PostgreSQL to wait for, given the
/// standbys streaming now and the set in force (`current`, kept where it
/// still streams so the choice is stable). Quorum: every streaming standby,
/// `ANY min(k, n)`. Otherwise `k` of them. Strict mode never drops a member
/// below `k` without a streaming replacement: commits block instead.
pub fn wanted(
    leader: &str,
    streaming: &[String],
    current: Option<&SyncState>,
    s: &SyncSettings,
) -> SyncState {
    let live = replicas(streaming);
    let k = s.node_count.max(1) as usize;
    let mut members: Vec<String> = if s.quorum {
        live.clone()
    } else {
        let mut m: Vec<String> = current
            .map(|c| c.members.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| live.contains(n) && n != leader)
            .collect();
        for n in &live {
            if m.len() >= k {
                break;
            }
            if !m.contains(n) {
                m.push(n.clone());
            }
        }
        m
    };
    if s.strict && members.len() < k {
        // Keep the members that went away rather than shrink below k.
        for n in current.map(|c| c.members.clone()).unwrap_or_default() {
            if members.len() >= k {
                break;
            }
            if n != leader && !members.contains(&n) {
                members.push(n);
            }
        }
    }
    members.sort();
    members.dedup();
    let quorum = if members.is_empty() {
        0
    } else {
        (k as u32).min(members.len() as u32)
    };
    SyncState {
        leader: leader.into(),
        members,
        quorum,
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `synchronous_standby_names` for `state`: `ANY k (...)` or `FIRST k
/// (...)`; with no member '' (asynchronous), or `*` in strict mode (every
/// commit waits for some standby, whoever connects: no failover is allowed
/// meanwhile, since no member is recorded).
pub fn names(state: &SyncState, s: &SyncSettings) -> String {
    if state.members.is_empty() {
        return if s.strict { "*".into() } else { String::new() };
    }
    let how = if s.quorum { "ANY" } else { "FIRST" };
    format!("{how} {} ({})", state.quorum, quoted(&state.members))
}

/// The next step from what is recorded in etcd and set in PostgreSQL
/// towards `want`, each taken only once the previous one is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write this to the `sync` key (compare-and-set on the leader's lease).
    Write(SyncState),
    /// Set `synchronous_standby_names` to this.
    SetNames(String),
    Done,
}

/// Widen the record first, then PostgreSQL, then narrow the record:
/// `recorded` (None: unknown, as after a promotion) always covers what
/// `applied` (the PostgreSQL value last set, None: unknown) waits for.
pub fn next_step(
    recorded: Option<&SyncState>,
    applied: Option<&str>,
    want: &SyncState,
    s: &SyncSettings,
) -> Step {
    let want_names = names(want, s);
    let before = match recorded {
        Some(r) if r.leader == want.leader => r.union(want),
        _ => want.clone(),
    };
    if recorded != Some(&before) && applied != Some(want_names.as_str()) {
        return Step::Write(before);
    }
    if applied != Some(want_names.as_str()) {
        return Step::SetNames(want_names);
    }
    if recorded != Some(want) {
        return Step::Write(want.clone());
    }
    Step::Done
}

/// Whether a follower races for the empty key now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Race,
    /// Another healthy candidate is further: hold back, at most
    /// `SyncSettings::defer` after the vacancy, then race anyway.
    Defer(String),
    /// Not allowed (outside the recorded set, or acknowledged commits may
    /// be missing): do not race; looked at again next loop.
    Hold(String),
}

/// A peer that could lead: a follower record with a replica and an LSN.
fn candidate(m: &Member) -> Option<u64> {
    (m.role == "Follower" && m.postgres == "replica")
        .then_some(m.lsn)
        .flatten()
}

/// The election rule for follower `me` at `my_lsn`, given the `sync` key
/// (`sync_mode`: synchronous mode is on) and every member record read
/// after the vacancy (`others`: fresh figures, not the leader's old LSN).
/// `max_lag`: `maximum_lag_on_failover` against the furthest of them.
pub fn race_verdict(
    me: &str,
    my_lsn: Option<u64>,
    sync_mode: bool,
    strict: bool,
    recorded: Option<&SyncState>,
    others: &[Member],
    max_lag: u64,
) -> Verdict {
    let others: Vec<&Member> = others.iter().filter(|m| m.node != me).collect();
    let mine = my_lsn.unwrap_or(0);
    let set = recorded.filter(|_| sync_mode);
    if let Some(r) = set {
        if r.members.is_empty() {
            if strict && me != r.leader {
                return Verdict::Hold(format!(
                    "strict synchronous mode and no synchronous standby recorded by {}",
                    r.leader
                ));
            }
        } else if !r.members.iter().any(|m| m == me) {
            // Not even the recorded leader: a record left by a replaced
            // leader would let it win over commits acknowledged since.
            return Verdict::Hold(format!(
                "not in the synchronous set [{}] recorded by {}",
                r.members.join(", "),
                r.leader
            ));
        } else {
            // Any n - k + 1 members hold every commit acked by k of them.
            let need = r.members.len() + 1 - (r.quorum.max(1) as usize).min(r.members.len());
            let mut known = 1; // this node
            for m in r.members.iter().filter(|m| *m != me) {
                if let Some(l) = others.iter().find(|o| &o.node == m).and_then(|o| o.lsn) {
                    if l > mine {
                        // Held, not deferred: the commits acknowledged by
                        // k members may be on the further one only.
                        return Verdict::Hold(format!(
                            "synchronous standby {m} is further ({l} > {mine})"
                        ));
                    }
                    known += 1;
                }
            }
            if known < need {
                return Verdict::Hold(format!(
                    "the LSNs of {need} of the synchronous set [{}] are needed, {known} known",
                    r.members.join(", ")
                ));
            }
        }
    }
    // In synchronous mode only a member of the set is a candidate to defer to.
    let allowed_in_set = |n: &str| match set {
        Some(r) if !r.members.is_empty() => r.members.iter().any(|m| m == n),
        _ => true,
    };
    let best = others
        .iter()
        .filter(|m| allowed_in_set(&m.node))
        .filter_map(|m| candidate(m).map(|l| (l, m.node.as_str())))
        .max();
    if let Some((l, node)) = best {
        if my_lsn.is_some() && l.saturating_sub(mine) > max_lag {
            return Verdict::Hold(format!(
                "{} bytes behind {node}, over maximum_lag_on_failover",
                l - mine
            ));
        }
        if l > mine {
            return Verdict::Defer(format!("{node} is further ({l} > {mine})"));
        }
    }
    Verdict::Race
}

/// A follower's check of the candidates for one vacancy of the key (reset
/// whenever the holder changes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaceGate {
    /// A `ReadCandidates` is out.
    pub pending: bool,
    /// The verdict was `Race` (or a deferral ran out): race now.
    pub cleared: bool,
    /// The verdict was `Hold` or `Defer`: no race (and no rule-8 grace).
    pub held: bool,
    /// The first `Defer` of this vacancy.
    pub defer_since: Option<BootTime>,
    /// The last reason recorded (one `race_held` record per reason).
    pub reason: Option<String>,
    /// Answers still due to reads of earlier vacancies: dropped on arrival
    /// (the member task answers in order), never taken for this one.
    pub stale: u32,
    /// The etcd revision at which the key was seen empty: a member record
    /// written after it is a fresh figure, one before it may be 20 loops old.
    pub vacancy_rev: i64,
    /// This node's record went out once since the vacancy.
    pub published: bool,
}

impl RaceGate {
    /// The gate of a new vacancy (or of none), after `old`.
    pub fn after(old: &RaceGate, revision: i64) -> RaceGate {
        RaceGate {
            stale: old.stale + u32::from(old.pending),
            vacancy_rev: revision,
            ..RaceGate::default()
        }
    }
}

impl Core {
    fn sync_settings(&self) -> Option<&SyncSettings> {
        self.pgs.as_ref().map(|p| &p.sync)
    }

    /// A fresh primary drops a copied setting at once ('', or `*` in
    /// strict mode: every commit waits for some standby).
    pub(super) fn sync_names_at_promotion(&self) -> String {
        if self.sync_settings().is_some_and(|s| s.strict) {
            "*".into()
        } else {
            String::new()
        }
    }

    /// One step of [`next_step`] per observation of the streaming standbys,
    /// each after the previous one is confirmed.
    pub(super) fn sync_step(&mut self, standbys: &[String], out: &mut Vec<Action>) {
        // A standby streaming with no record listed: list the members now
        // (once per such set), so it is judged without waiting a cadence.
        let (_, unknown) = sync_candidates(standbys, self.slots.listed.as_deref());
        if unknown.is_empty() {
            self.slots.asked_for.clear();
        } else if unknown != self.slots.asked_for && !self.slots.reading {
            self.slots.asked_for = unknown;
            self.read_members(out);
        }
        if self.sync_pending {
            return;
        }
        let Some(s) = self.sync_settings().cloned() else {
            return;
        };
        let me = self.node.clone().unwrap_or_default();
        let listed = self.slots.listed.as_deref();
        let (standbys, _) = sync_candidates(standbys, listed);
        let current = without_nosync(self.sync_recorded.as_ref(), listed);
        let want = wanted(&me, &standbys, current.as_ref(), &s);
        match next_step(
            self.sync_recorded.as_ref(),
            self.sync_names.as_deref(),
            &want,
            &s,
        ) {
            Step::Write(state) => {
                self.sync_pending = true;
                out.push(Action::WriteSync(state));
            }
            Step::SetNames(names) => {
                self.sync_pending = true;
                out.push(Action::SetSyncStandbys(names));
            }
            Step::Done => {}
        }
    }

    pub(super) fn on_sync_written(&mut self, state: SyncState, ok: bool, out: &mut Vec<Action>) {
        self.sync_pending = false;
        if !ok || self.role != Role::Leader {
            return;
        }
        let strict = self.sync_settings().is_some_and(|s| s.strict);
        let fallback = state.members.is_empty() && !strict;
        // Recorded once per change: a fallback is on the record, as is the
        // set that makes a node electable.
        if self.sync_recorded.as_ref() != Some(&state) {
            out.push(Action::Record(Fact::SyncRecorded {
                members: state.members.clone(),
                quorum: state.quorum,
                fallback,
            }));
        }
        self.sync_recorded = Some(state);
    }

    /// Whether the candidates check of this vacancy lets this node race;
    /// asks for it when not done yet. Always true without the check.
    pub(super) fn race_cleared(&mut self, out: &mut Vec<Action>) -> bool {
        if !self.sync_settings().is_some_and(|s| s.check_candidates) || self.race_gate.cleared {
            return true;
        }
        if !self.race_gate.pending {
            self.race_gate.pending = true;
            out.push(Action::ReadCandidates);
        }
        false
    }

    /// A held race is looked at again every loop while the key stays empty.
    pub(super) fn recheck_race(&mut self, out: &mut Vec<Action>) {
        if self.holder == KeyHolder::Nobody
            && self.role == Role::Follower
            && self.race_gate.held
            && !self.race_gate.pending
        {
            self.race_gate.pending = true;
            out.push(Action::ReadCandidates);
        }
    }

    /// Every follower writes its record once after a vacancy (its LSN no
    /// longer moves), so the others compare fresh figures.
    pub(super) fn vacancy_publish_due(&mut self) -> bool {
        let due = self.holder == KeyHolder::Nobody
            && self.role == Role::Follower
            && !self.race_gate.published
            && self.sync_settings().is_some_and(|s| s.check_candidates);
        if due {
            self.race_gate.published = true;
        }
        due
    }

    pub(super) fn on_candidates(
        &mut self,
        now: BootTime,
        recorded: Option<SyncState>,
        members: Vec<(Member, i64)>,
        ok: bool,
        out: &mut Vec<Action>,
    ) {
        if self.race_gate.stale > 0 {
            self.race_gate.stale -= 1;
            return;
        }
        self.race_gate.pending = false;
        if !ok || self.holder != KeyHolder::Nobody {
            return; // asked again at the next loop (or no vacancy any more)
        }
        let Some(p) = self.pgs.clone() else { return };
        let me = self.node.clone().unwrap_or_default();
        let (fresh, stale): (Vec<_>, Vec<_>) = members
            .into_iter()
            .partition(|(_, rev)| *rev > self.race_gate.vacancy_rev);
        let fresh: Vec<Member> = fresh.into_iter().map(|(m, _)| m).collect();
        let stale: Vec<Member> = stale.into_iter().map(|(m, _)| m).collect();
        let verdict = with_stale(
            race_verdict(
                &me,
                self.last_lsn,
                p.synchronous_mode,
                p.sync.strict,
                recorded.as_ref(),
                &fresh,
                p.maximum_lag_on_failover,
            ),
            &me,
            p.synchronous_mode,
            recorded.as_ref(),
            &stale,
        );
        let (held, reason, deferred) = match verdict {
            Verdict::Race => (false, None, false),
            Verdict::Defer(r) => {
                let since = *self.race_gate.defer_since.get_or_insert(now);
                // Bounded: past the defer, the furthest one has had its chance.
                (now < since + p.sync.defer, Some(r), true)
            }
            Verdict::Hold(r) => (true, Some(r), false),
        };
        self.race_gate.held = held;
        if held {
            if self.race_gate.reason != reason {
                self.race_gate.reason = reason.clone();
                out.push(Action::Record(Fact::RaceHeld {
                    reason: reason.unwrap_or_default(),
                    deferred,
                }));
            }
            return;
        }
        self.race_gate.cleared = true;
        self.maybe_acquire(now, out);
    }
}

/// A `Race` waits (bounded, as a `Defer`) for the fresh record of every
/// healthy candidate whose record predates the vacancy: its old LSN may be
/// behind what it holds now. In synchronous mode with members, only
/// members count.
pub fn with_stale(
    verdict: Verdict,
    me: &str,
    sync_mode: bool,
    recorded: Option<&SyncState>,
    stale: &[Member],
) -> Verdict {
    if verdict != Verdict::Race {
        return verdict;
    }
    let set = recorded.filter(|r| sync_mode && !r.members.is_empty());
    let waiting: Vec<&str> = stale
        .iter()
        .filter(|m| m.node != me && candidate(m).is_some())
        .filter(|m| set.is_none_or(|r| r.members.contains(&m.node)))
        .map(|m| m.node.as_str())
        .collect();
    if waiting.is_empty() {
        Verdict::Race
    } else {
        Verdict::Defer(format!(
            "waiting for a record written since the vacancy from {}",
            waiting.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(leader: &str, m: &[&str], k: u32) -> SyncState {
        SyncState {
            leader: leader.into(),
            members: m.iter().map(|s| s.to_string()).collect(),
            quorum: k,
        }
    }
    fn names_of(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn first(k: u32) -> SyncSettings {
        SyncSettings {
            node_count: k,
            ..Default::default()
        }
    }
    fn member(node: &str, lsn: u64) -> Member {
        Member {
            node: node.into(),
            role: "Follower".into(),
            postgres: "replica".into(),
            host: None,
            port: None,
            lsn: Some(lsn),
            watchdog: "off".into(),
            ..Default::default()
        }
    }

    fn tagged(node: &str, nosync: bool) -> Member {
        Member {
            tags: crate::decide::member::Tags {
                nosync,
                ..Default::default()
            },
            ..member(node, 1)
        }
    }

    #[test]
    fn a_nosync_or_unlisted_standby_is_no_candidate() {
        let streaming = names_of(&["d", "c", "b", "pg_basebackup", ""]);
        let listed = [tagged("a", false), tagged("b", false), tagged("c", true)];
        assert_eq!(
            sync_candidates(&streaming, Some(&listed)),
            (names_of(&["b"]), names_of(&["d"])),
            "c is nosync, d not listed yet"
        );
        assert_eq!(
            sync_candidates(&streaming, None),
            (vec![], names_of(&["b", "c", "d"])),
            "nothing listed yet: nobody"
        );
        // Every mode, with the candidates only: never the nosync member.
        let (ok, _) = sync_candidates(&streaming, Some(&listed));
        for s in [
            first(1),
            first(2),
            SyncSettings {
                quorum: true,
                ..first(1)
            },
            SyncSettings {
                strict: true,
                ..first(2)
            },
        ] {
            let current = without_nosync(Some(&st("a", &["c"], 1)), Some(&listed));
            let w = wanted("a", &ok, current.as_ref(), &s);
            assert!(!w.members.contains(&"c".to_string()), "{s:?}: {w:?}");
            assert!(!names(&w, &s).contains("\"c\""), "{s:?}");
        }
    }

    #[test]
    fn a_member_tagged_nosync_after_it_was_chosen_is_dropped_even_in_strict_mode() {
        let listed = [tagged("b", true), tagged("c", false)];
        let current = st("a", &["b"], 1);
        assert_eq!(
            without_nosync(Some(&current), Some(&listed)),
            Some(st("a", &[], 1))
        );
        let strict = SyncSettings {
            strict: true,
            ..first(1)
        };
        let w = wanted(
            "a",
            &[],
            without_nosync(Some(&current), Some(&listed)).as_ref(),
            &strict,
        );
        assert!(w.members.is_empty(), "{w:?}");
        assert_eq!(names(&w, &strict), "*", "strict: any standby, none named");
        // A member that only went away (no record listed) is kept by strict.
        let w = wanted(
            "a",
            &[],
            without_nosync(Some(&current), Some(&[])).as_ref(),
            &strict,
        );
        assert_eq!(w.members, names_of(&["b"]));
    }

    #[test]
    fn first_k_keeps_the_chosen_standby_while_it_streams() {
        let s = first(1);
        let w = wanted("a", &names_of(&["c", "b", "pg_basebackup"]), None, &s);
        assert_eq!(w, st("a", &["b"], 1));
        // c chosen before: kept while it streams, even though b sorts first.
        let w = wanted("a", &names_of(&["b", "c"]), Some(&st("a", &["c"], 1)), &s);
        assert_eq!(w, st("a", &["c"], 1));
        assert_eq!(names(&w, &s), r#"FIRST 1 ("c")"#);
        // c gone: b replaces it.
        let w = wanted("a", &names_of(&["b"]), Some(&st("a", &["c"], 1)), &s);
        assert_eq!(w, st("a", &["b"], 1));
        // nothing streams: asynchronous ('').
        let w = wanted("a", &[], Some(&st("a", &["b"], 1)), &s);
        assert_eq!(w, SyncState::asynchronous("a"));
        assert_eq!(names(&w, &s), "");
    }

    #[test]
    fn strict_never_drops_below_k_and_starts_with_star() {
        let s = SyncSettings {
            strict: true,
            ..first(1)
        };
        let w = wanted("a", &[], Some(&st("a", &["b"], 1)), &s);
        assert_eq!(w, st("a", &["b"], 1), "b is kept: commits block");
        assert_eq!(names(&w, &s), r#"FIRST 1 ("b")"#);
        let w = wanted("a", &[], None, &s);
        assert_eq!(names(&w, &s), "*");
        // A streaming replacement is taken.
        let w = wanted("a", &names_of(&["c"]), Some(&st("a", &["b"], 1)), &s);
        assert_eq!(w, st("a", &["c"], 1));
    }

    #[test]
    fn quorum_names_every_streaming_standby_with_any_k() {
        let s = SyncSettings {
            quorum: true,
            ..first(2)
        };
        let w = wanted("a", &names_of(&["d", "b", "c"]), None, &s);
        assert_eq!(w, st("a", &["b", "c", "d"], 2));
        assert_eq!(names(&w, &s), r#"ANY 2 ("b", "c", "d")"#);
        let w = wanted("a", &names_of(&["b"]), None, &s);
        assert_eq!(w, st("a", &["b"], 1), "k is capped at n");
    }

    #[test]
    fn the_record_always_covers_what_postgres_waits_for() {
        let s = first(1);
        // Widening a -> b, c (swap b for c): union first, then PostgreSQL,
        // then the narrowed record.
        let old = st("a", &["b"], 1);
        let want = st("a", &["c"], 1);
        let mut rec = Some(old.clone());
        let mut applied = Some(names(&old, &s));
        let mut pg = old.clone();
        for _ in 0..5 {
            match next_step(rec.as_ref(), applied.as_deref(), &want, &s) {
                Step::Write(w) => {
                    assert!(w.covers(&pg), "{w:?} must cover {pg:?}");
                    rec = Some(w);
                }
                Step::SetNames(n) => {
                    assert!(rec.as_ref().unwrap().covers(&want), "record first");
                    applied = Some(n);
                    pg = want.clone();
                }
                Step::Done => break,
            }
        }
        assert_eq!(rec, Some(want.clone()));
        assert_eq!(applied.as_deref(), Some(r#"FIRST 1 ("c")"#));
        // The first step was the union.
        assert_eq!(
            next_step(Some(&old), Some(&names(&old, &s)), &want, &s),
            Step::Write(st("a", &["b", "c"], 1))
        );
        // Narrowing to asynchronous: PostgreSQL first, the record after.
        let none = SyncState::asynchronous("a");
        assert_eq!(
            next_step(Some(&old), Some(&names(&old, &s)), &none, &s),
            Step::SetNames(String::new())
        );
        assert_eq!(
            next_step(Some(&old), Some(""), &none, &s),
            Step::Write(none.clone())
        );
        // Unknown record (fresh leader): written before PostgreSQL waits.
        assert_eq!(
            next_step(None, Some(""), &old, &s),
            Step::Write(old.clone())
        );
        // A record of another leader is replaced, not merged.
        assert_eq!(
            next_step(Some(&st("z", &["a"], 1)), Some(""), &old, &s),
            Step::Write(old.clone())
        );
        assert!(!st("a", &["b"], 2).covers(&st("a", &["b", "c"], 1)));
        assert!(st("a", &["b", "c"], 1).covers(&st("a", &["b", "c"], 2)));
    }

    #[test]
    fn only_the_recorded_synchronous_standby_may_race() {
        let rec = st("a", &["b"], 1);
        // c is async and behind: held whatever it knows.
        let v = race_verdict("c", Some(100), true, false, Some(&rec), &[], 1 << 20);
        assert!(
            matches!(v, Verdict::Hold(ref r) if r.contains("not in the synchronous set")),
            "{v:?}"
        );
        // Even when c is further than b (it cannot know b's last acks).
        let v = race_verdict(
            "c",
            Some(900),
            true,
            false,
            Some(&rec),
            &[member("b", 100)],
            1 << 20,
        );
        assert!(matches!(v, Verdict::Hold(_)));
        // b races, even when c claims more.
        let v = race_verdict(
            "b",
            Some(100),
            true,
            false,
            Some(&rec),
            &[member("c", 90)],
            1 << 20,
        );
        assert_eq!(v, Verdict::Race);
        // Nor the leader that wrote it (it may have been replaced since).
        let v = race_verdict("a", Some(100), true, false, Some(&rec), &[], 1 << 20);
        assert!(matches!(v, Verdict::Hold(_)));
        // Synchronous mode off: the record does not count.
        let v = race_verdict("c", Some(100), false, false, Some(&rec), &[], 1 << 20);
        assert_eq!(v, Verdict::Race);
        // Non-strict fallback recorded: anyone; strict with none: nobody else.
        let none = SyncState::asynchronous("a");
        assert_eq!(
            race_verdict("c", Some(1), true, false, Some(&none), &[], 1 << 20),
            Verdict::Race
        );
        assert!(matches!(
            race_verdict("c", Some(1), true, true, Some(&none), &[], 1 << 20),
            Verdict::Hold(_)
        ));
    }

    #[test]
    fn quorum_needs_n_minus_k_plus_one_known_and_none_further() {
        let rec = st("a", &["b", "c", "d"], 2);
        // n - k + 1 = 2: b alone is not enough.
        let v = race_verdict("b", Some(100), true, false, Some(&rec), &[], 1 << 20);
        assert!(
            matches!(v, Verdict::Hold(ref r) if r.contains("2 of")),
            "{v:?}"
        );
        let v = race_verdict(
            "b",
            Some(100),
            true,
            false,
            Some(&rec),
            &[member("c", 100)],
            1 << 20,
        );
        assert_eq!(v, Verdict::Race);
        let v = race_verdict(
            "b",
            Some(100),
            true,
            false,
            Some(&rec),
            &[member("c", 101)],
            1 << 20,
        );
        // Held, not merely deferred: the acks may be on c only.
        assert!(
            matches!(v, Verdict::Hold(ref r) if r.contains("c is further")),
            "{v:?}"
        );
    }

    #[test]
    fn a_record_older_than_the_vacancy_defers_the_race() {
        let old = [member("c", 50)];
        let v = with_stale(Verdict::Race, "b", false, None, &old);
        assert!(
            matches!(v, Verdict::Defer(ref r) if r.contains("from c")),
            "{v:?}"
        );
        // Not a member of the recorded set: c's record does not matter.
        let rec = st("a", &["b"], 1);
        assert_eq!(
            with_stale(Verdict::Race, "b", true, Some(&rec), &old),
            Verdict::Race
        );
        // A hold stays a hold; no stale record: race.
        let hold = Verdict::Hold("x".into());
        assert_eq!(with_stale(hold.clone(), "b", false, None, &old), hold);
        assert_eq!(
            with_stale(Verdict::Race, "b", false, None, &[]),
            Verdict::Race
        );
    }

    #[test]
    fn most_advanced_wins_and_the_lag_bound_uses_fresh_figures() {
        // Asynchronous: the one behind defers, the furthest races.
        let v = race_verdict(
            "b",
            Some(100),
            false,
            false,
            None,
            &[member("c", 150)],
            1 << 20,
        );
        assert!(
            matches!(v, Verdict::Defer(ref r) if r.contains("c is further")),
            "{v:?}"
        );
        assert_eq!(
            race_verdict(
                "c",
                Some(150),
                false,
                false,
                None,
                &[member("b", 100)],
                1 << 20
            ),
            Verdict::Race
        );
        // A peer that is not a healthy replica does not count.
        let mut down = member("c", 150);
        down.postgres = "down".into();
        assert_eq!(
            race_verdict("b", Some(100), false, false, None, &[down], 1 << 20),
            Verdict::Race
        );
        // Over the lag bound against the furthest peer: held.
        let v = race_verdict(
            "b",
            Some(100),
            false,
            false,
            None,
            &[member("c", 100 + 65537)],
            65536,
        );
        assert!(
            matches!(v, Verdict::Hold(ref r) if r.contains("65537 bytes behind c")),
            "{v:?}"
        );
    }
}
