//! Planned switchover (`leasedog switchover --to B`): the leader's side,
//! decided here, executed by the agent.
//!
//! 1. The CLI writes a [`Request`] under `{scope}/switchover`. The leader
//!    reads it each loop (`Action::ReadSwitchover`, off the renewal path)
//!    with the target's member record and lease and whether the scope is
//!    paused, and judges it ([`assess`]): refused with a reason written back
//!    (`Action::AnswerSwitchover`), left waiting (`--at` in the future), or
//!    begun.
//! 2. Begun: a planned step-down (`StepDownReason::Switchover`, the fast
//!    shutdown, pings kept on fresh renewals since the key stays ours).
//! 3. Stopped: the key is *not* released. The agent reads the shutdown
//!    checkpoint (`pg_controldata`); only a clean shutdown ("shut down")
//!    gives a final position ([`final_position`]): the checkpoint record is
//!    the last WAL the old primary wrote. The target's receive LSN is then
//!    asked of its own PostgreSQL every loop (`Action::CheckTargetLsn`: a
//!    member record carries an LSN up to `LSN_EVERY_LOOPS` loops old) until
//!    it is past that record ([`caught_up`]).
//! 4. Caught up: the key is handed to the target in one transaction
//!    (compared on this node's value and lease, put on the target's lease,
//!    `Action::HandOver`): no other node ever sees an empty key to race
//!    for. The old leader then revokes its lease (the target promotes only
//!    once it is gone, as after any win) and disarms (rule 4: stopped, key
//!    gone). The target finds the key on its own lease, reads the key's
//!    history as after a race and takes the win
//!    (`Core::own_key_as_follower`): arm, wait for the old lease, promote.
//!    The old leader follows it; its WAL is a prefix of the target's, so
//!    the rejoin's `pg_rewind` finds nothing to rewind.
//! 5. Not caught up within [`catch_up_wait`] (or the stop was not clean):
//!    the old leader still holds the key and every acknowledged commit is
//!    in its own WAL, so it restarts its server (as a standby of nobody,
//!    never writable) and promotes it again, still armed, under the same
//!    key: no commit lost, the scope leaderless only for the wait.

use super::{Action, Core, Fact, KeyHolder, Member, PgView, PromoteHold, Role, StepDownReason};
use crate::clock::BootTime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;

/// A switchover (or `failover --to`) request as the CLI writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per request: each is answered once.
    pub id: String,
    /// `--from`: the leader the operator expects (checked again here).
    #[serde(default)]
    pub from: Option<String>,
    pub to: String,
    /// `--at`: not before this time (seconds since the Unix epoch).
    #[serde(default)]
    pub at: Option<u64>,
    /// `--force`: skip the lag bound (the catch-up check still holds).
    #[serde(default)]
    pub force: bool,
    /// When the CLI stops waiting (seconds since the epoch): a request its
    /// CLI no longer waits for is never carried out (a crashed CLI could
    /// not withdraw it).
    #[serde(default)]
    pub expires: Option<u64>,
}

/// The leader's answer, written under `{scope}/switchover-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: String,
    /// `refused`, `begun`, `handed_over`, `aborted`.
    pub outcome: String,
    pub reason: String,
    /// The leader that answered.
    pub by: String,
}

/// What the leader does with a request it has read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `--at` is in the future.
    Wait,
    Refuse(String),
    Go,
}

/// Whether the leader `me` (at `my_lsn`) may hand over to the request's
/// target now. `target`: its member record (absent: its agent is down, its
/// lease gone, or no such member). `max_lag`: `maximum_lag_on_failover`.
pub fn assess(
    req: &Request,
    me: &str,
    my_lsn: Option<u64>,
    target: Option<&Member>,
    max_lag: u64,
    paused: bool,
    unix_now: u64,
) -> Verdict {
    if let Some(from) = req.from.as_deref().filter(|f| *f != me) {
        return Verdict::Refuse(format!("--from {from} is not the leader ({me} is)"));
    }
    if req.to == me {
        // The switchover has happened (the CLI refuses a request for the
        // leader): its answer stands, the CLI withdraws the request.
        return Verdict::Wait;
    }
    if paused {
        return Verdict::Refuse("the scope is paused (maintenance): no switchover".into());
    }
    if req.at.is_some_and(|at| at > unix_now) {
        return Verdict::Wait;
    }
    if req.expires.is_some_and(|e| e < unix_now) {
        // Nobody waits for the answer: left for `list` to show.
        return Verdict::Wait;
    }
    let to = &req.to;
    let Some(t) = target else {
        return Verdict::Refuse(format!(
            "{to} has no member record: its agent is down or it is not a member of this scope"
        ));
    };
    if t.role != Role::Follower.as_str() || t.postgres != "replica" {
        return Verdict::Refuse(format!(
            "{to} is not a running replica (role {}, postgres {})",
            t.role, t.postgres
        ));
    }
    if t.host.is_none() || t.port.is_none() {
        return Verdict::Refuse(format!("{to}'s member record has no PostgreSQL address"));
    }
    if t.tags.nofailover {
        // It would give the key back, after this node had stopped.
        return Verdict::Refuse(format!("{to} is tagged nofailover: it never leads"));
    }
    if !req.force {
        let theirs = t.receive_lsn.max(t.replay_lsn).or(t.lsn);
        match (my_lsn, theirs) {
            (Some(mine), Some(theirs)) if mine.saturating_sub(theirs) > max_lag => {
                return Verdict::Refuse(format!(
                    "{to} lags {} bytes behind the leader, more than \
                     postgres.maximum_lag_on_failover = {max_lag} (--force skips this bound)",
                    mine - theirs
                ))
            }
            (Some(_), None) => {
                return Verdict::Refuse(format!("{to} has published no WAL position yet"))
            }
            _ => {}
        }
    }
    Verdict::Go
}

/// The stopped primary's final WAL position, from `pg_controldata`: only
/// after a clean shutdown ("shut down") is the latest checkpoint the last
/// record written; after an immediate stop or a crash there may be WAL
/// beyond it.
pub fn final_position(state: &str, checkpoint: Option<u64>) -> Option<u64> {
    (state == "shut down").then_some(checkpoint).flatten()
}

/// The target has the whole shutdown checkpoint record: its receive LSN
/// (the end of what it flushed, always a record boundary, since walsenders
/// send whole flushed records) is past the record's start, and nothing
/// follows that record.
pub fn caught_up(final_lsn: u64, target_receive: Option<u64>) -> bool {
    target_receive.is_some_and(|r| r > final_lsn)
}

/// How long a stopped leader waits for the target to catch up before it
/// takes its own server back: one TTL, at least 5 s. A connected standby
/// has the shutdown checkpoint when the fast shutdown ends, so this only
/// runs out when the target was not streaming.
pub fn catch_up_wait(ttl: Duration) -> Duration {
    ttl.max(Duration::from_secs(5))
}

/// A switchover under way (the leader's side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    id: String,
    to: String,
    host: String,
    port: u16,
    to_lease: i64,
    /// The stop was confirmed at (the catch-up wait starts then).
    stopped_at: Option<BootTime>,
    final_lsn: Option<u64>,
    /// An action is out whose answer is awaited.
    pending: bool,
    /// Taking the server back (started as a standby, then promoted).
    resuming: bool,
}

/// The core's switchover state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Switch {
    /// A `ReadSwitchover` is out.
    reading: bool,
    /// The last request answered (each is answered once).
    answered: Option<String>,
    run: Option<Run>,
}

impl Core {
    /// Once per loop on a leader of a managed PostgreSQL: read the request.
    pub(super) fn maybe_read_switchover(&mut self, out: &mut Vec<Action>) {
        if self.role == Role::Leader
            && self.node.is_some()
            && self.pgs.is_some()
            && !self.switch.reading
            && self.switch.run.is_none()
        {
            self.switch.reading = true;
            out.push(Action::ReadSwitchover);
        }
    }

    pub(super) fn on_switchover_seen(
        &mut self,
        now: BootTime,
        request: Option<Request>,
        target: Option<(Member, i64)>,
        paused: bool,
        unix_now: u64,
        out: &mut Vec<Action>,
    ) {
        self.switch.reading = false;
        let (Some(req), Some(me), Some(pgs)) = (request, self.node.clone(), self.pgs.as_ref())
        else {
            return;
        };
        if self.role != Role::Leader
            || self.switch.run.is_some()
            || self.switch.answered.as_ref() == Some(&req.id)
        {
            return;
        }
        let target = target.filter(|(m, _)| m.node == req.to);
        let verdict = assess(
            &req,
            &me,
            self.last_lsn,
            target.as_ref().map(|(m, _)| m),
            pgs.maximum_lag_on_failover,
            paused,
            unix_now,
        );
        let answer = |outcome: &str, reason: String| {
            Action::AnswerSwitchover(Answer {
                id: req.id.clone(),
                outcome: outcome.into(),
                reason,
                by: me.clone(),
            })
        };
        match verdict {
            Verdict::Wait => {}
            Verdict::Refuse(reason) => {
                self.switch.answered = Some(req.id.clone());
                out.push(Action::Record(Fact::SwitchoverRefused {
                    to: req.to.clone(),
                    reason: reason.clone(),
                }));
                out.push(answer("refused", reason));
            }
            Verdict::Go => {
                let (m, to_lease) = target.expect("Go needs a target");
                self.switch.answered = Some(req.id.clone());
                self.switch.run = Some(Run {
                    id: req.id.clone(),
                    to: req.to.clone(),
                    host: m.host.clone().expect("checked"),
                    port: m.port.expect("checked"),
                    to_lease,
                    stopped_at: None,
                    final_lsn: None,
                    pending: false,
                    resuming: false,
                });
                out.push(Action::Record(Fact::SwitchoverBegun { to: req.to.clone() }));
                out.push(answer("begun", format!("stopping {me} for {}", req.to)));
                self.step_down(now, StepDownReason::Switchover, out);
            }
        }
    }

    /// Called first by `after_fenced`: while a switchover runs and the key
    /// is still ours, the key is neither released nor the devices disarmed;
    /// the next step of the hand-over is asked instead. True while it holds.
    pub(super) fn switchover_holds(&mut self, now: BootTime, out: &mut Vec<Action>) -> bool {
        if self.key_gone || self.shutting_down {
            // Lost meanwhile (lease gone, key taken), or SIGTERM: nothing
            // to hand over or take back; the usual release follows.
            if let Some(run) = self.switch.run.take() {
                let why = if self.key_gone {
                    "the key was lost"
                } else {
                    "the agent is shutting down: the key is released"
                };
                out.push(self.switch_answer(&run, "aborted", why.into()));
            }
            return false;
        }
        let expired = self.s.is_none_or(|s| {
            now > crate::timing::earliest_expiry(s, self.budget()) + super::EXPIRY_SLACK
        });
        if expired {
            // No fresh renewal for a whole TTL: the key may be gone; the
            // usual inference in `after_fenced` takes over.
            if let Some(run) = self.switch.run.take() {
                out.push(self.switch_answer(&run, "aborted", "the lease lapsed".into()));
            }
            return false;
        }
        let wait = catch_up_wait(self.budget().ttl);
        let Some(run) = self.switch.run.as_mut() else {
            return false;
        };
        if run.resuming {
            return true;
        }
        let stopped_at = *run.stopped_at.get_or_insert(now);
        if run.pending {
            return true;
        }
        if now > stopped_at + wait {
            let reason = format!(
                "{} did not receive the final WAL within {wait:?}: taking the server back",
                run.to
            );
            self.resume(reason, out);
            return true;
        }
        run.pending = true;
        match run.final_lsn {
            None => out.push(Action::ReadShutdownCheckpoint),
            Some(_) => out.push(Action::CheckTargetLsn {
                host: run.host.clone(),
                port: run.port,
            }),
        }
        true
    }

    pub(super) fn on_shutdown_checkpoint(
        &mut self,
        now: BootTime,
        state: String,
        checkpoint: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let Some(run) = self.switch.run.as_mut() else {
            return;
        };
        run.pending = false;
        match final_position(&state, checkpoint) {
            Some(lsn) => {
                run.final_lsn = Some(lsn);
                self.after_fenced(now, out);
            }
            None => self.resume(
                format!("the stop was not clean (pg_controldata: {state}): taking the server back"),
                out,
            ),
        }
    }

    pub(super) fn on_target_lsn(&mut self, receive: Option<u64>, out: &mut Vec<Action>) {
        let Some(run) = self.switch.run.as_mut() else {
            return;
        };
        run.pending = false;
        let Some(final_lsn) = run.final_lsn else {
            return;
        };
        if !caught_up(final_lsn, receive) || self.key_gone || self.role != Role::Fenced {
            return; // asked again at the next loop, until the wait runs out
        }
        let Some(lease) = self.lease else { return };
        run.pending = true;
        out.push(Action::HandOver {
            lease,
            to: run.to.clone(),
            to_lease: run.to_lease,
        });
    }

    /// Outcome of `HandOver`: `revision` when the key passed to the
    /// target; `None` when the transaction failed or was not answered (then
    /// the usual release runs: it deletes the key only if still ours).
    pub(super) fn on_handed_over(
        &mut self,
        now: BootTime,
        revision: Option<i64>,
        out: &mut Vec<Action>,
    ) {
        let Some(run) = self.switch.run.take() else {
            return;
        };
        match revision {
            Some(revision) => {
                self.key_gone = true;
                self.holder = KeyHolder::Other(run.to.clone());
                self.key_revision = self.key_revision.max(revision);
                out.push(Action::Publish(super::Evidence::None));
                out.push(Action::Record(Fact::SwitchoverHandedOver {
                    to: run.to.clone(),
                    revision,
                    final_lsn: run.final_lsn.unwrap_or(0),
                }));
                out.push(self.switch_answer(
                    &run,
                    "handed_over",
                    format!("{} holds the key", run.to),
                ));
                // The target promotes once this lease is gone.
                if let Some(lease) = self.lease.take() {
                    self.s = None;
                    out.push(Action::Revoke { lease });
                }
            }
            None => {
                out.push(self.switch_answer(
                    &run,
                    "aborted",
                    "the hand-over transaction failed: the key is released instead".into(),
                ));
            }
        }
        self.after_fenced(now, out);
    }

    /// Take the stopped server back: start it as a standby (never
    /// writable), then promote it under the key this node still holds.
    fn resume(&mut self, reason: String, out: &mut Vec<Action>) {
        let Some(run) = self.switch.run.as_mut() else {
            return;
        };
        run.resuming = true;
        run.pending = true;
        let run = run.clone();
        out.push(Action::Record(Fact::SwitchoverAborted {
            to: run.to.clone(),
            reason: reason.clone(),
        }));
        out.push(self.switch_answer(&run, "aborted", reason));
        self.busy = true;
        self.starting = true;
        out.push(Action::StartStandby { leader: None });
    }

    /// Outcome of the resume's `StartStandby`: promote again (rule 2 still
    /// holds: armed, and `try_promote` waits for fresh evidence). A failed
    /// start ends the switchover; the usual release follows.
    pub(super) fn on_resume_started(&mut self, now: BootTime, ok: bool, out: &mut Vec<Action>) {
        if !self.switch.run.as_ref().is_some_and(|r| r.resuming) {
            return;
        }
        self.switch.run = None;
        if !ok || self.key_gone || self.shutting_down || self.role != Role::Fenced {
            self.after_fenced(now, out);
            return;
        }
        self.role = Role::Promoting;
        self.stopped = false;
        self.hold = Some(PromoteHold {
            leases: BTreeSet::new(),
            since: now,
            armed: true,
            not_before: None,
        });
        self.try_promote(now, out);
    }

    /// Remembers whether the node is ineligible only because its running
    /// replica lags the leader's published LSN.
    pub(super) fn note_lag(&mut self, view: &PgView, eligible: &Result<(), String>) {
        self.lagging_only =
            matches!(view, PgView::Replica { .. }) && eligible.is_err() && self.last_lsn.is_some();
    }

    /// `failover --to`: the key put on this node's lease by the operator
    /// (or by a leader's hand-over) is taken by a running replica even when
    /// it lags past `maximum_lag_on_failover`: the operator chose to lose
    /// that lag rather than stay leaderless. Every other rule holds: arm
    /// first, wait for each previous holder's lease, promote. (The core
    /// cannot tell this key from its own `Acquire` that timed out but was
    /// applied; that one was sent while eligible, so taking it while
    /// lagging differs from the race only by the lag gained since.)
    pub(super) fn may_take_given_key(&self, now: BootTime) -> bool {
        self.role == Role::Follower
            && !self.shutting_down
            && self.lease.is_some()
            && now >= self.backoff_until
            && !self.eligible
            && self.lagging_only
    }

    fn switch_answer(&self, run: &Run, outcome: &str, reason: String) -> Action {
        Action::AnswerSwitchover(Answer {
            id: run.id.clone(),
            outcome: outcome.into(),
            reason,
            by: self.node.clone().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(to: &str) -> Request {
        Request {
            id: "1".into(),
            from: None,
            to: to.into(),
            at: None,
            force: false,
            expires: None,
        }
    }

    fn replica(node: &str, lsn: u64) -> Member {
        Member {
            node: node.into(),
            role: "Follower".into(),
            postgres: "replica".into(),
            host: Some("127.0.0.1".into()),
            port: Some(5433),
            lsn: Some(lsn),
            watchdog: "required".into(),
            receive_lsn: Some(lsn),
            ..Member::default()
        }
    }

    #[test]
    fn a_healthy_target_within_the_lag_bound_goes() {
        let b = replica("b", 1000);
        assert_eq!(
            assess(&req("b"), "a", Some(1500), Some(&b), 1000, false, 0),
            Verdict::Go
        );
    }

    #[test]
    fn refusals_name_their_cause() {
        let b = replica("b", 1000);
        let refuse = |v: Verdict, needle: &str| match v {
            Verdict::Refuse(r) => assert!(r.contains(needle), "{r:?} lacks {needle:?}"),
            other => panic!("expected a refusal with {needle:?}, got {other:?}"),
        };
        let mut from = req("b");
        from.from = Some("c".into());
        refuse(
            assess(&from, "a", Some(1), Some(&b), 10, false, 0),
            "--from c is not the leader",
        );
        assert_eq!(
            assess(&req("a"), "a", Some(1), None, 10, false, 0),
            Verdict::Wait,
            "a request for this leader is one it carried out: left for the CLI to withdraw"
        );
        refuse(
            assess(&req("b"), "a", Some(1000), Some(&b), 10, true, 0),
            "paused",
        );
        refuse(
            assess(&req("b"), "a", Some(1), None, 10, false, 0),
            "no member record",
        );
        let mut down = b.clone();
        down.postgres = "down".into();
        refuse(
            assess(&req("b"), "a", Some(1000), Some(&down), 10, false, 0),
            "not a running replica",
        );
        refuse(
            assess(&req("b"), "a", Some(1_000_000), Some(&b), 1000, false, 0),
            "lags 999000 bytes",
        );
        let mut forced = req("b");
        forced.force = true;
        assert_eq!(
            assess(&forced, "a", Some(1_000_000), Some(&b), 1000, false, 0),
            Verdict::Go,
            "--force skips the lag bound only"
        );
        let mut nofailover = b.clone();
        nofailover.tags.nofailover = true;
        refuse(
            assess(&forced, "a", Some(1000), Some(&nofailover), 10, false, 0),
            "b is tagged nofailover",
        );
    }

    #[test]
    fn a_request_for_later_waits_until_its_time() {
        let b = replica("b", 1000);
        let mut later = req("b");
        later.at = Some(100);
        assert_eq!(
            assess(&later, "a", Some(1000), Some(&b), 10, false, 99),
            Verdict::Wait
        );
        assert_eq!(
            assess(&later, "a", Some(1000), Some(&b), 10, false, 100),
            Verdict::Go
        );
        later.expires = Some(160);
        assert_eq!(
            assess(&later, "a", Some(1000), Some(&b), 10, false, 160),
            Verdict::Go
        );
        assert_eq!(
            assess(&later, "a", Some(1000), Some(&b), 10, false, 161),
            Verdict::Wait,
            "a request its CLI no longer waits for is never carried out"
        );
    }

    #[test]
    fn only_a_clean_shutdown_gives_a_final_position() {
        assert_eq!(final_position("shut down", Some(42)), Some(42));
        assert_eq!(final_position("in production", Some(42)), None);
        assert_eq!(final_position("shut down", None), None);
    }

    #[test]
    fn the_target_must_be_past_the_checkpoint_record() {
        assert!(!caught_up(100, None));
        assert!(
            !caught_up(100, Some(100)),
            "at its start: the record is not there yet"
        );
        assert!(caught_up(100, Some(101)));
    }
}

/// The leader's side of a switchover, through `Core::handle`.
#[cfg(test)]
mod core_tests {
    use super::*;
    use crate::decide::fixtures::*;
    use crate::decide::{Evidence, Input, PgRole};

    /// A managed leader "a" at t = 1 s.
    fn leader() -> Core {
        let mut c = managed(false);
        c.handle(t(0), Input::Start);
        c.handle(t(0), primary(5000));
        win_and_promote(&mut c, true);
        c
    }

    fn seen(to: &str, lsn: u64) -> Input {
        Input::SwitchoverSeen {
            request: Some(Request {
                id: "r1".into(),
                from: None,
                to: to.into(),
                at: None,
                force: false,
                expires: None,
            }),
            target: Some((
                Member {
                    node: "b".into(),
                    role: "Follower".into(),
                    postgres: "replica".into(),
                    host: Some("10.0.0.2".into()),
                    port: Some(5432),
                    lsn: Some(lsn),
                    receive_lsn: Some(lsn),
                    watchdog: "required".into(),
                    ..Member::default()
                },
                99,
            )),
            paused: false,
            unix_now: 0,
        }
    }

    fn outcome(a: &[Action]) -> Option<String> {
        a.iter().find_map(|a| match a {
            Action::AnswerSwitchover(ans) => Some(ans.outcome.clone()),
            _ => None,
        })
    }

    /// Through the step-down to the stopped leader, key still ours.
    fn stopped_leader() -> Core {
        let mut c = leader();
        let a = c.handle(t(1200), renewed(1200));
        assert!(a.contains(&Action::Publish(Evidence::Lease(t(1200)))));
        let a = c.handle(t(1300), seen("b", 4500));
        assert_eq!(outcome(&a).as_deref(), Some("begun"));
        assert!(
            a.iter().any(|a| matches!(
                a,
                Action::StepDown {
                    reason: StepDownReason::Switchover,
                    fast: Some(_)
                }
            )),
            "a fast planned stop: {a:?}"
        );
        assert!(
            !a.contains(&Action::Publish(Evidence::None)),
            "pings go on while the key is ours"
        );
        let a = c.handle(t(1500), Input::SteppedDown { how: "fast".into() });
        assert!(a.contains(&Action::ReadShutdownCheckpoint), "{a:?}");
        assert!(
            !a.iter()
                .any(|a| matches!(a, Action::Release { .. } | Action::Disarm)),
            "no release, no disarm before the target has the WAL: {a:?}"
        );
        c
    }

    #[test]
    fn the_key_goes_to_the_target_only_once_it_has_the_final_wal() {
        let mut c = stopped_leader();
        let a = c.handle(
            t(1600),
            Input::ShutdownCheckpoint {
                state: "shut down".into(),
                checkpoint: Some(6000),
            },
        );
        assert!(a.contains(&Action::CheckTargetLsn {
            host: "10.0.0.2".into(),
            port: 5432
        }));
        let a = c.handle(
            t(1700),
            Input::TargetLsn {
                receive: Some(6000),
            },
        );
        assert!(a.is_empty(), "at the record's start: not yet ({a:?})");
        // Asked again at the next loop; the renewals keep the evidence fresh.
        c.handle(t(2000), renewed(2000));
        let a = c.handle(t(2000), Input::Tick);
        assert!(a.iter().any(|a| matches!(a, Action::CheckTargetLsn { .. })));
        let a = c.handle(
            t(2100),
            Input::TargetLsn {
                receive: Some(6120),
            },
        );
        assert_eq!(
            a,
            vec![Action::HandOver {
                lease: 7,
                to: "b".into(),
                to_lease: 99
            }]
        );
        let a = c.handle(t(2200), Input::HandedOver { revision: Some(40) });
        let publish = a
            .iter()
            .position(|a| *a == Action::Publish(Evidence::None))
            .unwrap();
        let revoke = a
            .iter()
            .position(|a| *a == Action::Revoke { lease: 7 })
            .unwrap();
        let disarm = a.iter().position(|a| *a == Action::Disarm).unwrap();
        assert!(publish < revoke && revoke < disarm, "{a:?}");
        assert_eq!(outcome(&a).as_deref(), Some("handed_over"));
        assert!(!a.iter().any(|a| matches!(a, Action::Release { .. })));
        assert_eq!(c.holder(), &KeyHolder::Other("b".into()));
    }

    #[test]
    fn a_target_that_never_catches_up_gets_nothing_the_old_leader_takes_its_server_back() {
        let mut c = stopped_leader();
        c.handle(
            t(1600),
            Input::ShutdownCheckpoint {
                state: "shut down".into(),
                checkpoint: Some(6000),
            },
        );
        c.handle(t(1700), Input::TargetLsn { receive: None });
        let mut now = 2000;
        let resumed = loop {
            c.handle(
                t(now),
                Input::Renewed {
                    sent: t(now),
                    ttl: 5,
                },
            );
            let a = c.handle(t(now), Input::Tick);
            assert!(!a
                .iter()
                .any(|a| matches!(a, Action::HandOver { .. } | Action::Release { .. })));
            if a.contains(&Action::StartStandby { leader: None }) {
                assert_eq!(outcome(&a).as_deref(), Some("aborted"));
                break now;
            }
            c.handle(t(now), Input::TargetLsn { receive: Some(10) });
            now += 500;
            assert!(now < 20_000, "the wait must end");
        };
        assert!(resumed >= 1500 + 5000, "waited the whole catch-up wait");
        let a = c.handle(t(resumed + 100), Input::StandbyStarted { ok: true });
        // Callbacks (`on_start`) are fire-and-forget reports beside it.
        let a: Vec<_> = a
            .into_iter()
            .filter(|a| !matches!(a, Action::Callback { .. }))
            .collect();
        assert_eq!(
            a,
            vec![Action::Promote],
            "promoted again under the same key"
        );
        c.handle(t(resumed + 200), Input::Promoted);
        assert_eq!(c.role(), &Role::Leader);
    }

    #[test]
    fn an_unclean_stop_gives_no_final_position_and_no_hand_over() {
        let mut c = stopped_leader();
        let a = c.handle(
            t(1600),
            Input::ShutdownCheckpoint {
                state: "in production".into(),
                checkpoint: Some(6000),
            },
        );
        assert!(a.contains(&Action::StartStandby { leader: None }), "{a:?}");
        assert!(!a.iter().any(|a| matches!(a, Action::HandOver { .. })));
    }

    #[test]
    fn a_lagging_target_is_refused_once_and_the_leader_keeps_leading() {
        let mut c = leader();
        let a = c.handle(t(1300), seen("b", 100));
        assert_eq!(outcome(&a).as_deref(), Some("refused"));
        assert!(a
            .iter()
            .any(|a| matches!(a, Action::Record(Fact::SwitchoverRefused { .. }))));
        assert_eq!(c.role(), &Role::Leader);
        let a = c.handle(t(1400), seen("b", 100));
        assert!(a.is_empty(), "each request is answered once: {a:?}");
    }

    /// A managed follower "a" (lease 7) of leader "b" whose record says
    /// LSN 1_000_000, its own replica at `lsn`.
    fn follower(lsn: u64) -> Core {
        let mut c = leader_less_follower();
        c.handle(
            t(20),
            Input::LeaderMember {
                leader: "b".into(),
                member: Some(Member {
                    node: "b".into(),
                    role: "Leader".into(),
                    postgres: "primary".into(),
                    host: Some("10.0.0.2".into()),
                    port: Some(5432),
                    lsn: Some(1_000_000),
                    watchdog: "required".into(),
                    ..Member::default()
                }),
            },
        );
        c.handle(t(30), replica(lsn));
        c
    }

    fn leader_less_follower() -> Core {
        let mut c = managed(false);
        c.handle(t(0), Input::Start);
        c.handle(t(0), granted(0));
        c.handle(t(10), b_holds(3, Some(5)));
        c
    }

    #[test]
    fn failover_to_a_lagging_replica_takes_the_given_key_a_down_one_gives_it_back() {
        let mut c = follower(10);
        assert!(c.eligibility().is_err(), "lags 999_990 bytes > 1000");
        let a = c.handle(
            t(40),
            Input::KeySeen {
                holder: KeyHolder::Us,
                revision: 60,
                lease: Some(7),
            },
        );
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::ReadHolders { before: 60, .. })),
            "the key's history is read first: {a:?}"
        );
        let a = c.handle(
            t(45),
            Input::HoldersRead {
                revision: 60,
                previous: vec![],
                complete: true,
            },
        );
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::Record(Fact::Acquired { .. }))),
            "the operator's key is taken: {a:?}"
        );
        let mut down = follower(10);
        down.handle(
            t(35),
            Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: true,
            },
        );
        let a = down.handle(
            t(40),
            Input::KeySeen {
                holder: KeyHolder::Us,
                revision: 60,
                lease: Some(7),
            },
        );
        assert!(
            a.contains(&Action::Release { lease: 7 }),
            "given back: {a:?}"
        );
    }

    #[test]
    fn sigterm_during_the_wait_releases_the_key_as_any_shutdown() {
        let mut c = stopped_leader();
        let a = c.handle(t(1600), Input::Shutdown);
        assert_eq!(outcome(&a).as_deref(), Some("aborted"));
        assert!(a.contains(&Action::Release { lease: 7 }), "{a:?}");
        assert!(!a.iter().any(|a| matches!(a, Action::StartStandby { .. })));
    }

    #[test]
    fn a_lost_key_during_the_wait_ends_the_switchover_without_a_hand_over() {
        let mut c = stopped_leader();
        let a = c.handle(
            t(1600),
            Input::KeySeen {
                holder: KeyHolder::Other("c".into()),
                revision: 50,
                lease: Some(5),
            },
        );
        assert_eq!(outcome(&a).as_deref(), Some("aborted"));
        let a = c.handle(
            t(1700),
            Input::ShutdownCheckpoint {
                state: "shut down".into(),
                checkpoint: Some(1),
            },
        );
        assert!(!a
            .iter()
            .any(|a| matches!(a, Action::CheckTargetLsn { .. } | Action::HandOver { .. })));
    }
}
