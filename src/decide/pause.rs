//! Maintenance, as the core decides it: the scope-wide pause (`leasedog
//! pause` / `resume`, the `<scope>/pause` key), the requests of one node's
//! PostgreSQL (`leasedog restart NODE`, `reinit NODE`, the
//! `<scope>/requests/<node>` key) and the callbacks the operator hangs on
//! changes of role (`[callbacks]`).
//!
//! A pause only takes actions away, never a fence: while paused no follower
//! races for the key (so nothing is promoted), the agent neither starts,
//! follows nor restarts PostgreSQL, and a leader whose PostgreSQL is down
//! (stopped by hand) keeps its key. Renewals, rule 1's pings, the deadline
//! timer (rule 3) and rule 8's fence of a writable server on a node that
//! does not lead stay as they are, so the watchdog stays armed on the
//! leader and the safety argument needs no new case (docs/fencing.md,
//! "Maintenance").
//!
//! With [`Core::with_maintenance`] (the agent always), the pause state is
//! unknown until first read: no race before it is known, so an agent
//! restarted in a paused scope never takes the key.

use super::{Action, Core, Fact, Input, PgView, Role, StepDownReason};
use crate::clock::BootTime;
use std::time::Duration;

/// How long a request may run before the core gives up on it: a leader
/// whose restart is not done by then steps down (PostgreSQL down), so a
/// restart never holds the key for ever.
pub const OP_LIMIT: Duration = Duration::from_secs(120);

/// A request of one node's PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Restart PostgreSQL without a failover (a leader keeps its key).
    Restart,
    /// Wipe the data directory and clone it from the leader (replicas only).
    Reinit,
}

impl Op {
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Restart => "restart",
            Op::Reinit => "reinit",
        }
    }

    pub fn parse(s: &str) -> Result<Op, String> {
        match s {
            "restart" => Ok(Op::Restart),
            "reinit" => Ok(Op::Reinit),
            other => Err(format!(
                "unknown operation {other:?} (expected restart or reinit)"
            )),
        }
    }
}

/// The commands of `[callbacks]` (Patroni's names), each run as
/// `COMMAND action role scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackEvent {
    /// The agent started PostgreSQL (as a standby).
    OnStart,
    /// The agent stopped PostgreSQL (a step-down, a fence).
    OnStop,
    /// This node became the leader (`primary`) or stopped leading (`replica`).
    OnRoleChange,
}

impl CallbackEvent {
    pub fn as_str(&self) -> &'static str {
        match self {
            CallbackEvent::OnStart => "on_start",
            CallbackEvent::OnStop => "on_stop",
            CallbackEvent::OnRoleChange => "on_role_change",
        }
    }
}

/// The core's maintenance state (a field of [`Core`]).
#[derive(Debug, Default)]
pub struct Maintenance {
    /// The agent reads the pause key: unknown means no race.
    required: bool,
    /// As last read from `<scope>/pause`; `None` before the first read.
    paused: Option<bool>,
    /// The request running on this node, when it began, and whether this
    /// node led when it began.
    running: Option<(String, Op, BootTime, bool)>,
    /// The last request id taken (a request is run once).
    last_id: Option<String>,
    /// A reinit waiting for the member listing (`clonefrom`): its id, the
    /// leader, and the loop at which the listing was asked for.
    reinit_waiting: Option<(String, String, u64)>,
}

impl Maintenance {
    /// Whether a follower may race for the key as far as maintenance goes.
    pub fn race_allowed(&self) -> bool {
        if self.required {
            self.paused == Some(false) && self.running.is_none()
        } else {
            self.paused != Some(true) && self.running.is_none()
        }
    }

    /// The scope is paused (as last read), or its state is not known yet
    /// where it must be: leave PostgreSQL as it is.
    pub fn hands_off(&self) -> bool {
        self.paused == Some(true) || (self.required && self.paused.is_none())
    }

    pub fn is_paused(&self) -> bool {
        self.paused == Some(true)
    }

    pub fn running(&self) -> Option<(&str, Op)> {
        self.running
            .as_ref()
            .map(|(id, op, _, _)| (id.as_str(), *op))
    }
}

impl Core {
    /// The agent's core: the pause state is read from etcd, and until it is
    /// known this node does not race (see the module documentation).
    pub fn with_maintenance(mut self) -> Core {
        self.maint.required = true;
        self
    }

    /// Maintenance as the core sees it (for `status` and the metrics).
    pub fn maintenance(&self) -> &Maintenance {
        &self.maint
    }

    /// `Input::Paused`, `Input::OpRequested`, `Input::OpDone`.
    pub(super) fn on_maintenance(&mut self, now: BootTime, input: Input, out: &mut Vec<Action>) {
        match input {
            Input::Paused { paused } => self.on_paused(now, paused, out),
            Input::OpRequested { id, op } => self.on_op_requested(now, id, op, out),
            Input::OpDone { id, ok, detail } => self.on_op_done(now, id, ok, detail, out),
            _ => {}
        }
    }

    fn on_paused(&mut self, now: BootTime, paused: bool, out: &mut Vec<Action>) {
        let before = self.maint.paused;
        self.maint.paused = Some(paused);
        if before == Some(paused) {
            return;
        }
        if paused || before.is_some() {
            // The first read of "not paused" is no transition.
            let what = if paused { "paused" } else { "resumed" };
            out.push(Action::Record(Fact::Maintenance {
                what: what.into(),
                detail: format!("role {}", self.role.as_str()),
            }));
        }
        if paused {
            return;
        }
        // Resumed (or the state is known at last): what the pause held back.
        if self.role == Role::Leader && self.pg == PgView::Down && self.maint.running.is_none() {
            self.step_down(now, StepDownReason::PostgresDown, out);
        }
        self.follow_leader(now, out);
        self.maybe_acquire(now, out);
    }

    fn refuse(&self, id: String, why: String, out: &mut Vec<Action>) {
        out.push(Action::Record(Fact::Maintenance {
            what: "request_refused".into(),
            detail: format!("{id}: {why}"),
        }));
        out.push(Action::ReportOp {
            id,
            ok: false,
            detail: why,
        });
    }

    fn on_op_requested(&mut self, now: BootTime, id: String, op: Op, out: &mut Vec<Action>) {
        if self.maint.last_id.as_deref() == Some(id.as_str()) {
            return; // already taken
        }
        self.maint.last_id = Some(id.clone());
        if self.pgs.is_none() {
            return self.refuse(id, "this node manages no PostgreSQL".into(), out);
        }
        if self.maint.running.is_some() || self.busy {
            let why = "another operation runs on this node (restart, reinit, follow or start)";
            return self.refuse(id, why.into(), out);
        }
        if self.shutting_down {
            return self.refuse(id, "the agent is shutting down".into(), out);
        }
        let leads = self.role == Role::Leader;
        let leader = match (&self.role, &self.holder, op) {
            (Role::Leader, _, Op::Restart) => None,
            (Role::Follower, super::KeyHolder::Other(l), _) if self.knows_leader(l) => {
                Some(l.clone())
            }
            (Role::Follower, _, Op::Restart) => None, // a standby of nobody
            (Role::Leader, _, Op::Reinit) => {
                let why = "this node is the leader: reinit wipes the data directory, so it is \
                           refused on the leader (switch over first)";
                return self.refuse(id, why.into(), out);
            }
            (Role::Follower, _, Op::Reinit) => {
                let why = "no leader with a known address to clone from";
                return self.refuse(id, why.into(), out);
            }
            (role, _, _) => {
                let why = format!("this node is {}: try again once it settles", role.as_str());
                return self.refuse(id, why, out);
            }
        };
        // Observations read `Busy` while it runs: a leader's PostgreSQL
        // down during its own restart is no reason to step down, and a
        // follower neither follows nor starts beside it.
        self.busy = true;
        self.maint.running = Some((id.clone(), op, now, leads));
        out.push(Action::Record(Fact::Maintenance {
            what: format!("{}_begun", op.as_str()),
            detail: id.clone(),
        }));
        if leads {
            out.push(Action::Callback {
                event: CallbackEvent::OnStop,
                role: "primary",
            });
        }
        if let (Op::Reinit, Some(leader)) = (op, &leader) {
            // The member listing first: a healthy `clonefrom` member is
            // cloned from rather than the leader (`bootstrap::clone_source`).
            self.maint.reinit_waiting = Some((id, leader.clone(), self.ticks));
            self.read_members(out);
            return;
        }
        out.push(Action::RunOp {
            id,
            op,
            leader,
            clone_from: None,
        });
    }

    /// A member listing: a waiting reinit runs, from the source chosen.
    pub(super) fn reinit_listing(&mut self, members: &[super::Member], out: &mut Vec<Action>) {
        let Some((id, leader, _)) = self.maint.reinit_waiting.take() else {
            return;
        };
        let me = self.node.clone().unwrap_or_default();
        let max_lag = self
            .pgs
            .as_ref()
            .map_or(u64::MAX, |p| p.maximum_lag_on_failover);
        let clone_from = super::bootstrap::clone_source(members, &me, &leader, max_lag, None);
        out.push(Action::RunOp {
            id,
            op: Op::Reinit,
            leader: Some(leader),
            clone_from,
        });
    }

    /// A reinit whose listing went unanswered for
    /// [`CLONE_LISTING_LOOPS`](super::bootstrap::CLONE_LISTING_LOOPS) loops
    /// clones from the leader; until then the listing is asked for again.
    fn reinit_tick(&mut self, out: &mut Vec<Action>) {
        let Some((_, _, asked)) = &self.maint.reinit_waiting else {
            return;
        };
        if self.ticks < asked + super::bootstrap::CLONE_LISTING_LOOPS {
            self.read_members(out);
            return;
        }
        let (id, leader, _) = self.maint.reinit_waiting.take().expect("checked");
        out.push(Action::RunOp {
            id,
            op: Op::Reinit,
            leader: Some(leader),
            clone_from: None,
        });
    }

    fn on_op_done(
        &mut self,
        now: BootTime,
        id: String,
        ok: bool,
        detail: String,
        out: &mut Vec<Action>,
    ) {
        let Some((rid, op, _, led)) = self.maint.running.clone() else {
            return;
        };
        if rid != id {
            return;
        }
        self.finish_op(now, id, op, led, ok, detail, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_op(
        &mut self,
        now: BootTime,
        id: String,
        op: Op,
        led: bool,
        ok: bool,
        detail: String,
        out: &mut Vec<Action>,
    ) {
        self.maint.running = None;
        self.maint.reinit_waiting = None;
        self.busy = false;
        let what = format!("{}_{}", op.as_str(), if ok { "done" } else { "failed" });
        out.push(Action::Record(Fact::Maintenance {
            what,
            detail: format!("{id}: {detail}"),
        }));
        out.push(Action::ReportOp {
            id,
            ok,
            detail: detail.clone(),
        });
        if led {
            if self.role != Role::Leader {
                return; // it lost the key meanwhile: the step-down runs
            }
            if ok {
                // Restarted as a standby (the only start there is): the
                // leader promotes it again, on fresh evidence (rule 2 holds:
                // still armed).
                self.role = Role::Promoting;
                self.hold = Some(super::PromoteHold {
                    leases: Default::default(),
                    since: now,
                    armed: true,
                    not_before: None,
                });
                self.try_promote(now, out);
            } else if !self.maint.is_paused() {
                self.step_down(now, StepDownReason::PostgresDown, out);
            }
            // Paused: PostgreSQL is the operator's; as for one stopped by
            // hand, the leader keeps its key (and steps down at the resume
            // if it is still down).
        } else if ok {
            if let Some(l) = self.holder_name_other() {
                self.following = Some(l.clone());
                self.following_pg = Some(l);
            }
            out.push(Action::Callback {
                event: CallbackEvent::OnStart,
                role: "replica",
            });
        }
    }

    fn holder_name_other(&self) -> Option<String> {
        match &self.holder {
            super::KeyHolder::Other(l) if self.knows_leader(l) => Some(l.clone()),
            _ => None,
        }
    }

    /// Once per loop: a request past [`OP_LIMIT`] is given up (its driver
    /// bounds its own work; this bounds the hold whatever happens).
    pub(super) fn maintenance_tick(&mut self, now: BootTime, out: &mut Vec<Action>) {
        let Some((id, op, since, led)) = self.maint.running.clone() else {
            return;
        };
        self.reinit_tick(out);
        if now.saturating_since(since) > OP_LIMIT {
            let detail = format!("not done within {} s", OP_LIMIT.as_secs());
            self.finish_op(now, id, op, led, false, detail, out);
        }
    }
}

#[cfg(test)]
mod tests;
