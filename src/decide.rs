//! The sans-IO decision core.
//!
//! [`Core::handle`] takes one observation and a CLOCK_BOOTTIME reading and
//! returns the actions to take, in order. It never reads a clock, sleeps,
//! does I/O or awaits: the drivers in `agent` execute the actions and feed
//! their outcomes back as new inputs. Every rule of docs/fencing.md that concerns
//! *when* to act is decided here, so each is a unit test below.
//!
//! Rules that live here by name: [`arm_before_promote`] (rule 2) and
//! [`may_disarm`] (rule 4); rule 1 is `timing::ping_permitted`, applied by the
//! pinger to the evidence this core publishes.

use crate::clock::BootTime;
use crate::config::WatchdogMode;
use crate::timing::{self, Budget};
use std::time::Duration;

/// etcd's lessor checks expiry every 500 ms; a key on a lease last renewed at
/// `s` is surely gone by `s + T + EXPIRY_SLACK` as far as this node can tell.
pub const EXPIRY_SLACK: Duration = Duration::from_millis(1500);

/// Who holds the leader key, as far as the last read or watch event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHolder {
    /// Not read yet (or the watch broke and a re-read is pending).
    Unknown,
    /// The key does not exist.
    Nobody,
    /// This node, on its current lease.
    Us,
    /// Another node (or this node's name on a lease this process does not own).
    Other(String),
    /// The key holds something that is not a leasedog record.
    Garbage,
}

/// What the pinger may act on. Published as one atomic value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Do not ping.
    None,
    /// Leader: ping while `timing::ping_permitted(now, s)`, `s` being the send
    /// time of the last keepalive etcd acknowledged.
    Lease(BootTime),
    /// A replica still holding a device it cannot disarm (nowayout), after
    /// its key was released or expired: the watchdog only guards the agent's
    /// own liveness; the same window applies to the main loop's last tick.
    Liveness(BootTime),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDownReason {
    /// `now > s + T - M` (rule 3).
    Deadline,
    /// etcd says the lease is gone.
    LeaseLost,
    /// Another holder (or nobody) owns the key.
    KeyLost,
    /// Promotion failed; PostgreSQL's state is unknown.
    PromoteFailed,
    /// The leader's PostgreSQL is down (crashed or stopped behind our back):
    /// hand the key over rather than lead nothing.
    PostgresDown,
    /// SIGTERM / SIGINT.
    Shutdown,
}

/// PostgreSQL as the driver last observed it (`Unmanaged` when the agent
/// runs without a `[postgres]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgView {
    Unmanaged,
    /// Not running (stopped, fenced, crashed, or never started).
    Down,
    /// Running and writable.
    Primary,
    /// Running in recovery, streaming from `following` when known.
    Replica {
        following: Option<String>,
    },
    /// A rejoin or clone is in progress.
    Busy,
}

/// Outcome of arming every configured device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmOutcome {
    /// Devices armed, with the timeout read back and nowayout.
    pub armed: Vec<ArmedDevice>,
    /// Devices that could not be armed, with the reason.
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmedDevice {
    pub path: String,
    pub identity: String,
    pub w_secs: u32,
    pub nowayout: bool,
}

/// Observations fed to the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The agent started: nothing is known yet.
    Start,
    /// The loop timer fired.
    Tick,
    /// A lease was granted; `sent` is when the grant request was sent (etcd
    /// starts the TTL on receipt, so `sent` is valid evidence like a renewal).
    LeaseGranted {
        lease: i64,
        sent: BootTime,
    },
    /// Granting failed (etcd unreachable, ...).
    GrantFailed {
        error: String,
    },
    /// A keepalive sent at `sent` was acknowledged with `ttl` seconds left.
    Renewed {
        sent: BootTime,
        ttl: i64,
    },
    /// A keepalive failed or missed its deadline. Freshness ages by itself.
    RenewFailed {
        sent: BootTime,
        error: String,
    },
    /// etcd answered that the lease no longer exists (TTL <= 0).
    LeaseGone,
    /// The leader key as read or watched.
    KeySeen {
        holder: KeyHolder,
        revision: i64,
    },
    /// Our compare-and-set created the key at `revision`.
    Won {
        revision: i64,
    },
    /// The compare-and-set could not be sent or answered.
    AcquireFailed {
        error: String,
    },
    /// Arming finished (some devices may have failed).
    Armed(ArmOutcome),
    /// Arming could not start (evidence went stale, or nothing to arm).
    ArmFailed {
        reason: String,
    },
    Promoted,
    PromoteFailed {
        reason: String,
    },
    /// PostgreSQL is confirmed stopped (no backend can commit).
    SteppedDown {
        how: String,
    },
    StepDownFailed {
        reason: String,
    },
    /// The independent deadline timer (rule 3) stopped PostgreSQL itself
    /// because the main loop was too late to.
    FencedByTimer {
        how: String,
    },
    /// The key was deleted by our release (true) or was no longer ours (false).
    Released {
        deleted: bool,
    },
    ReleaseFailed {
        error: String,
    },
    /// Every device that could be disarmed was (magic close).
    Disarmed,
    /// Whether this node may race for the key (healthy, lag within bounds).
    Eligibility {
        eligible: bool,
        reason: String,
    },
    /// PostgreSQL's state, observed once per loop.
    Postgres(PgView),
    /// A `Follow` finished (PostgreSQL runs as a replica of `leader`) or failed.
    Followed {
        leader: String,
        ok: bool,
    },
    /// The leader watch broke: who holds the key is unknown until re-read.
    WatchBroken,
    /// SIGTERM or SIGINT.
    Shutdown,
}

/// What happened, for the audit log (docs/fencing.md rule 7).
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    LeaseGranted {
        lease: i64,
    },
    Acquired {
        lease: i64,
        revision: i64,
        s: BootTime,
    },
    LeaderSeen {
        holder: KeyHolder,
        revision: i64,
    },
    RenewedLate {
        sent: BootTime,
        acked: BootTime,
    },
    LeaseLost {
        last_s: Option<BootTime>,
    },
    Armed(ArmedDevice),
    ArmFailed {
        device: String,
        reason: String,
    },
    LeadingUnarmed {
        reason: String,
    },
    Promoted,
    StepDownBegun {
        reason: StepDownReason,
        deadline: Option<BootTime>,
    },
    StepDownConfirmed {
        how: String,
    },
    StepDownFailed {
        reason: String,
    },
    Released {
        deleted: bool,
    },
    Disarmed,
    NowayoutKeptArmed {
        devices: Vec<String>,
    },
    Shutdown,
}

/// Side effects for the drivers, in the order they must happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Grant,
    Renew {
        lease: i64,
    },
    ReadKey,
    Acquire {
        lease: i64,
    },
    /// Open, set, read back and ping every device, but not after `not_after`
    /// (the evidence that permits the first ping runs out then).
    Arm {
        not_after: BootTime,
    },
    /// Store this for the pinger (and the deadline timer). Always the first
    /// action after a renewal, before any other etcd or PostgreSQL work.
    Publish(Evidence),
    Promote,
    StepDown {
        reason: StepDownReason,
    },
    /// Not leading and PostgreSQL is writable while an unknown owner holds
    /// the key: stop it at once (immediate stop, SIGKILL if needed).
    Fence,
    /// Run PostgreSQL as a replica of `leader`: fence it first if it is
    /// writable, then rewind or clone as needed. Runs in the background.
    Follow {
        leader: String,
    },
    Release {
        lease: i64,
    },
    Disarm,
    Revoke {
        lease: i64,
    },
    Record(Fact),
    Exit {
        code: i32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Won the key; waiting for fresh evidence and the devices.
    Arming,
    Promoting,
    Leader,
    /// Pings stopped; PostgreSQL being stopped.
    SteppingDown,
    /// PostgreSQL confirmed stopped; waiting for the key to be gone to disarm.
    Fenced,
    Exited,
}

/// Fixed settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub budget: Budget,
    pub mode: WatchdogMode,
}

/// Rule 2: promotion is allowed only once every required device is armed
/// (mode `required`: all configured devices and none failed; `automatic`:
/// whatever could be armed; `off`: no devices).
pub fn arm_before_promote(mode: WatchdogMode, outcome: &ArmOutcome) -> Result<(), String> {
    match mode {
        WatchdogMode::Required if !outcome.failed.is_empty() => Err(format!(
            "required watchdog not armed: {}",
            outcome
                .failed
                .iter()
                .map(|(d, e)| format!("{d}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
        WatchdogMode::Required if outcome.armed.is_empty() => {
            Err("required watchdog: no device armed".into())
        }
        _ => Ok(()),
    }
}

/// Rule 4: a device may be disarmed only when PostgreSQL is confirmed
/// stopped and the key is released or expired.
pub fn may_disarm(postgres_stopped: bool, key_gone: bool) -> bool {
    postgres_stopped && key_gone
}

/// The decision core's state. See the module documentation.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    role: Role,
    lease: Option<i64>,
    /// Send time of the last acknowledged keepalive (or grant) on `lease`.
    s: Option<BootTime>,
    holder: KeyHolder,
    /// Devices are open in the pinger (armed) and not yet disarmed.
    armed: bool,
    /// Some armed device has nowayout: it cannot be disarmed.
    nowayout: Vec<String>,
    /// PostgreSQL confirmed stopped since we last led.
    stopped: bool,
    /// The key we held is released or expired.
    key_gone: bool,
    eligible: bool,
    pg: PgView,
    /// The leader a `Follow` was last asked for (not repeated while pending).
    following: Option<String>,
    /// Do not race for the key before this instant (after a failed arm).
    backoff_until: BootTime,
    shutting_down: bool,
    granting: bool,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Core {
        Core {
            cfg,
            role: Role::Follower,
            lease: None,
            s: None,
            holder: KeyHolder::Unknown,
            armed: false,
            nowayout: Vec::new(),
            stopped: true,
            key_gone: true,
            eligible: true,
            pg: PgView::Unmanaged,
            following: None,
            backoff_until: BootTime::ZERO,
            shutting_down: false,
            granting: false,
        }
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    pub fn last_fresh(&self) -> Option<BootTime> {
        self.s
    }

    pub fn holder(&self) -> &KeyHolder {
        &self.holder
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    fn budget(&self) -> &Budget {
        &self.cfg.budget
    }

    fn leading(&self) -> bool {
        matches!(self.role, Role::Arming | Role::Promoting | Role::Leader)
    }

    /// The evidence is fresh enough for a ping right now (rule 1).
    fn fresh(&self, now: BootTime) -> bool {
        self.s
            .is_some_and(|s| timing::ping_permitted(now, s, self.budget()))
    }

    /// Feeds one observation; returns the actions to execute in order.
    pub fn handle(&mut self, now: BootTime, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role == Role::Exited {
            return out;
        }
        match input {
            Input::Start => {
                self.granting = true;
                out.push(Action::Publish(Evidence::None));
                out.push(Action::Grant);
                out.push(Action::ReadKey);
            }
            Input::Tick => self.on_tick(now, &mut out),
            Input::LeaseGranted { lease, sent } => {
                self.granting = false;
                self.lease = Some(lease);
                self.s = Some(sent);
                out.push(Action::Record(Fact::LeaseGranted { lease }));
                self.maybe_acquire(now, &mut out);
            }
            Input::GrantFailed { .. } => self.granting = false,
            Input::Renewed { sent, ttl } => {
                if ttl <= 0 {
                    self.on_lease_gone(now, &mut out);
                } else {
                    self.on_renewed(now, sent, &mut out);
                }
            }
            Input::RenewFailed { .. } => {}
            Input::LeaseGone => self.on_lease_gone(now, &mut out),
            Input::KeySeen { holder, revision } => self.on_key(now, holder, revision, &mut out),
            Input::Won { revision } => self.on_won(now, revision, &mut out),
            Input::AcquireFailed { .. } => {}
            Input::Armed(outcome) => self.on_armed(now, outcome, &mut out),
            Input::ArmFailed { reason } => {
                if self.role == Role::Arming {
                    self.arm_refused(now, vec![("*".into(), reason)], &mut out);
                }
            }
            Input::Promoted => {
                if self.role == Role::Promoting {
                    self.role = Role::Leader;
                    out.push(Action::Record(Fact::Promoted));
                }
            }
            Input::PromoteFailed { .. } => {
                if self.role == Role::Promoting {
                    self.step_down(StepDownReason::PromoteFailed, &mut out);
                }
            }
            Input::SteppedDown { how } => {
                if self.role == Role::SteppingDown {
                    self.stopped = true;
                    self.role = Role::Fenced;
                    out.push(Action::Record(Fact::StepDownConfirmed { how }));
                    self.after_fenced(now, &mut out);
                }
            }
            Input::FencedByTimer { how } => {
                if self.leading() {
                    self.step_down(StepDownReason::Deadline, &mut out);
                    out.retain(|a| !matches!(a, Action::StepDown { .. }));
                }
                if self.role == Role::SteppingDown {
                    out.extend(self.handle(now, Input::SteppedDown { how }));
                }
            }
            Input::StepDownFailed { reason } => {
                out.push(Action::Record(Fact::StepDownFailed { reason }));
            }
            Input::Released { deleted } => {
                self.key_gone = true;
                if self.holder == KeyHolder::Us {
                    self.holder = KeyHolder::Unknown;
                }
                out.push(Action::Record(Fact::Released { deleted }));
                self.after_fenced(now, &mut out);
            }
            Input::ReleaseFailed { .. } => {}
            Input::Disarmed => {
                self.armed = false;
                out.push(Action::Record(Fact::Disarmed));
                if !self.nowayout.is_empty() {
                    // Devices with nowayout stay open and pinged on liveness.
                    self.armed = true;
                    out.push(Action::Record(Fact::NowayoutKeptArmed {
                        devices: self.nowayout.clone(),
                    }));
                }
                if self.role == Role::Fenced {
                    self.role = Role::Follower;
                }
                self.maybe_exit(&mut out);
            }
            Input::Eligibility { eligible, .. } => {
                self.eligible = eligible;
                self.maybe_acquire(now, &mut out);
            }
            Input::WatchBroken => {
                // Not evidence of a lost key: a leader keeps leading on its
                // renewals (rule 1 still rules the pings) and re-reads.
                if !self.leading() {
                    self.holder = KeyHolder::Unknown;
                }
                out.push(Action::ReadKey);
            }
            Input::Postgres(view) => {
                self.pg = view;
                if self.role == Role::Leader && self.pg == PgView::Down {
                    self.step_down(StepDownReason::PostgresDown, &mut out);
                }
                self.follow_leader(&mut out);
            }
            Input::Followed { leader, ok } => {
                if !ok && self.following.as_deref() == Some(leader.as_str()) {
                    self.following = None; // asked again on a later loop
                }
            }
            Input::Shutdown => {
                if !self.shutting_down {
                    self.shutting_down = true;
                    out.push(Action::Record(Fact::Shutdown));
                }
                match self.role {
                    Role::Arming | Role::Promoting | Role::Leader => {
                        self.step_down(StepDownReason::Shutdown, &mut out)
                    }
                    Role::Fenced => self.after_fenced(now, &mut out),
                    Role::Follower => self.maybe_exit(&mut out),
                    Role::SteppingDown | Role::Exited => {}
                }
            }
        }
        out
    }

    fn on_tick(&mut self, now: BootTime, out: &mut Vec<Action>) {
        // Rule 3 inside the loop (the deadline timer does it independently).
        if self.leading() {
            if let Some(s) = self.s {
                if now > timing::demotion_deadline(s, self.budget()) {
                    self.step_down(StepDownReason::Deadline, out);
                    return;
                }
            }
        }
        match self.lease {
            Some(lease) => out.push(Action::Renew { lease }),
            None if !self.granting && !self.shutting_down => {
                self.granting = true;
                out.push(Action::Grant);
            }
            None => {}
        }
        match self.role {
            Role::SteppingDown => out.push(Action::StepDown {
                reason: StepDownReason::Deadline,
            }),
            Role::Fenced => self.after_fenced(now, out),
            Role::Follower => {
                if self.armed {
                    // Only nowayout devices stay armed in a follower.
                    out.push(Action::Publish(Evidence::Liveness(now)));
                }
                if self.holder == KeyHolder::Unknown {
                    out.push(Action::ReadKey);
                }
                self.maybe_acquire(now, out);
                self.maybe_exit(out);
            }
            _ => {}
        }
    }

    fn on_renewed(&mut self, now: BootTime, sent: BootTime, out: &mut Vec<Action>) {
        // A late reply to an older keepalive must not move `s` backwards.
        let s = self.s.map_or(sent, |old| old.max(sent));
        self.s = Some(s);
        match self.role {
            // Rule 1 holds whatever the role: while the key is ours on this
            // lease, a fresh renewal permits pings, which also keeps a clean
            // step-down from being cut short by a reset.
            Role::Promoting | Role::Leader | Role::SteppingDown | Role::Fenced
                if !self.key_gone =>
            {
                out.push(Action::Publish(Evidence::Lease(s)));
                if !timing::ping_permitted(now, sent, self.budget()) {
                    out.push(Action::Record(Fact::RenewedLate { sent, acked: now }));
                }
            }
            Role::Arming if !self.armed && self.fresh(now) => {
                out.push(Action::Arm {
                    not_after: timing::fresh_until(s, self.budget()),
                });
            }
            _ => {}
        }
    }

    fn on_lease_gone(&mut self, now: BootTime, out: &mut Vec<Action>) {
        let last_s = self.s;
        self.lease = None;
        self.s = None;
        out.push(Action::Record(Fact::LeaseLost { last_s }));
        if self.leading() {
            self.key_gone = true;
            self.step_down(StepDownReason::LeaseLost, out);
        } else if matches!(self.role, Role::SteppingDown | Role::Fenced) {
            self.key_gone = true;
            if self.role == Role::Fenced {
                self.after_fenced(now, out);
            }
        }
        if self.holder == KeyHolder::Us {
            self.holder = KeyHolder::Unknown;
        }
        if !self.shutting_down && !self.granting {
            self.granting = true;
            out.push(Action::Grant);
        }
    }

    fn on_key(&mut self, now: BootTime, holder: KeyHolder, revision: i64, out: &mut Vec<Action>) {
        let changed = holder != self.holder;
        self.holder = holder;
        if self.leading() && self.holder != KeyHolder::Us {
            // Safety first: pings stop before anything is written down.
            self.key_gone = true;
            self.step_down(StepDownReason::KeyLost, out);
        } else if matches!(self.role, Role::SteppingDown | Role::Fenced)
            && self.holder != KeyHolder::Us
        {
            self.key_gone = true;
            out.push(Action::Publish(Evidence::None));
        }
        if changed {
            out.push(Action::Record(Fact::LeaderSeen {
                holder: self.holder.clone(),
                revision,
            }));
        }
        self.after_fenced(now, out);
        self.follow_leader(out);
        self.maybe_acquire(now, out);
    }

    /// A follower's PostgreSQL must never be writable while another node (or
    /// an unknown owner) holds the key, and should replicate from the leader.
    fn follow_leader(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Follower || self.shutting_down {
            return;
        }
        match &self.holder {
            KeyHolder::Other(leader) => {
                let settled = match &self.pg {
                    PgView::Unmanaged | PgView::Busy => true,
                    // Writable while another node leads: act now, every time.
                    PgView::Primary => false,
                    PgView::Replica { following: Some(f) } => f == leader,
                    PgView::Replica { following: None } | PgView::Down => {
                        self.following.as_ref() == Some(leader)
                    }
                };
                if !settled {
                    self.following = Some(leader.clone());
                    out.push(Action::Follow {
                        leader: leader.clone(),
                    });
                }
            }
            KeyHolder::Garbage if self.pg == PgView::Primary => out.push(Action::Fence),
            _ => {}
        }
    }

    fn maybe_acquire(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if self.role != Role::Follower
            || self.shutting_down
            || !self.eligible
            || now < self.backoff_until
            || self.holder != KeyHolder::Nobody
        {
            return;
        }
        if let Some(lease) = self.lease {
            out.push(Action::Acquire { lease });
        }
    }

    fn on_won(&mut self, now: BootTime, revision: i64, out: &mut Vec<Action>) {
        let (Some(lease), Role::Follower) = (self.lease, &self.role) else {
            return;
        };
        self.holder = KeyHolder::Us;
        self.key_gone = false;
        self.stopped = false;
        self.following = None;
        self.role = Role::Arming;
        out.push(Action::Record(Fact::Acquired {
            lease,
            revision,
            s: self.s.unwrap_or(now),
        }));
        if self.cfg.mode == WatchdogMode::Off {
            out.push(Action::Record(Fact::LeadingUnarmed {
                reason: "watchdog mode is off".into(),
            }));
            self.role = Role::Promoting;
            out.push(Action::Publish(Evidence::None));
            out.push(Action::Promote);
        } else if self.fresh(now) {
            // Devices still open from an earlier term (nowayout) are re-checked
            // and pinged by the same arming step.
            out.push(Action::Arm {
                not_after: timing::fresh_until(self.s.expect("fresh implies s"), self.budget()),
            });
        } else {
            // Arming pings; a ping needs fresh evidence (rule 1). Renew first.
            out.push(Action::Renew { lease });
        }
    }

    fn on_armed(&mut self, now: BootTime, outcome: ArmOutcome, out: &mut Vec<Action>) {
        if self.role != Role::Arming {
            return;
        }
        if !outcome.armed.is_empty() {
            self.armed = true;
        }
        for d in &outcome.armed {
            if d.nowayout && !self.nowayout.contains(&d.path) {
                self.nowayout.push(d.path.clone());
            }
            out.push(Action::Record(Fact::Armed(d.clone())));
        }
        for (device, reason) in &outcome.failed {
            out.push(Action::Record(Fact::ArmFailed {
                device: device.clone(),
                reason: reason.clone(),
            }));
        }
        match arm_before_promote(self.cfg.mode, &outcome) {
            Ok(()) => {
                if outcome.armed.is_empty() {
                    out.push(Action::Record(Fact::LeadingUnarmed {
                        reason: "watchdog mode is automatic and no device could be armed".into(),
                    }));
                }
                self.arm_done(now, out);
            }
            Err(reason) => self.arm_refused(now, vec![("required".into(), reason)], out),
        }
    }

    /// Devices armed (or not needed): publish lease evidence, then promote.
    fn arm_done(&mut self, _now: BootTime, out: &mut Vec<Action>) {
        self.role = Role::Promoting;
        let ev = self.s.map_or(Evidence::None, Evidence::Lease);
        out.push(Action::Publish(ev));
        out.push(Action::Promote);
    }

    /// Rule 2's other half: arming failed in required mode (or could not
    /// start): release the key, stay a replica, back off for one TTL.
    fn arm_refused(&mut self, now: BootTime, failed: Vec<(String, String)>, out: &mut Vec<Action>) {
        for (device, reason) in failed {
            out.push(Action::Record(Fact::ArmFailed { device, reason }));
        }
        self.role = Role::Follower;
        self.stopped = true;
        self.backoff_until = now + self.budget().ttl;
        if self.armed {
            // Partially armed devices: PostgreSQL was never promoted.
            out.push(Action::Publish(Evidence::None));
            out.push(Action::Disarm);
        }
        if let Some(lease) = self.lease {
            out.push(Action::Release { lease });
        }
    }

    fn step_down(&mut self, reason: StepDownReason, out: &mut Vec<Action>) {
        let deadline = self.s.map(|s| timing::demotion_deadline(s, self.budget()));
        self.role = Role::SteppingDown;
        // Pings stop first: if the stop hangs, the watchdog finishes the job.
        // Only a voluntary step-down, with the key still ours, keeps pinging
        // on fresh renewals (rule 1) so that a clean handover is not reset.
        if !matches!(
            reason,
            StepDownReason::Shutdown | StepDownReason::PromoteFailed | StepDownReason::PostgresDown
        ) || self.key_gone
        {
            out.push(Action::Publish(Evidence::None));
        }
        out.push(Action::Record(Fact::StepDownBegun {
            reason: reason.clone(),
            deadline,
        }));
        out.push(Action::StepDown { reason });
    }

    /// PostgreSQL is stopped: release the key if it may still be ours, and
    /// disarm once it is gone (rule 4). Until then only fresh lease evidence
    /// permits pings: a leader cut off from etcd is stopped by its deadline
    /// and then reset by its watchdog, since it cannot prove the key gone.
    fn after_fenced(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if self.role != Role::Fenced {
            return;
        }
        if !self.key_gone {
            if let Some(s) = self.s {
                if now > timing::earliest_expiry(s, self.budget()) + EXPIRY_SLACK {
                    self.key_gone = true;
                }
            }
        }
        if !self.key_gone {
            if let Some(lease) = self.lease {
                out.push(Action::Release { lease });
            }
            return;
        }
        if may_disarm(self.stopped, self.key_gone) {
            if self.armed {
                out.push(Action::Publish(Evidence::None));
                out.push(Action::Disarm);
                if !self.nowayout.is_empty() {
                    out.push(Action::Publish(Evidence::Liveness(now)));
                }
            } else {
                self.role = Role::Follower;
                self.maybe_exit(out);
            }
        }
    }

    fn maybe_exit(&mut self, out: &mut Vec<Action>) {
        if !self.shutting_down || self.role != Role::Follower {
            return;
        }
        if self.armed && self.nowayout.is_empty() {
            return;
        }
        if let Some(lease) = self.lease.take() {
            out.push(Action::Revoke { lease });
        }
        self.role = Role::Exited;
        out.push(Action::Exit { code: 0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// T = 5, M = 2, R = 1, loop 0.5 s, request timeout 0.4 s (the lab budget).
    fn core(mode: WatchdogMode) -> Core {
        let budget = Budget::new(
            Duration::from_secs(5),
            Duration::from_secs(2),
            Duration::from_secs(1),
            ms(500),
            ms(400),
        )
        .unwrap();
        Core::new(CoreConfig { budget, mode })
    }

    fn t(ms_: u64) -> BootTime {
        BootTime::from_nanos(ms_ * 1_000_000)
    }

    fn dev(path: &str, nowayout: bool) -> ArmedDevice {
        ArmedDevice {
            path: path.into(),
            identity: "Software Watchdog".into(),
            w_secs: 3,
            nowayout,
        }
    }

    fn armed_ok(nowayout: bool) -> Input {
        Input::Armed(ArmOutcome {
            armed: vec![dev("/dev/watchdog0", nowayout)],
            failed: vec![],
        })
    }

    fn has(actions: &[Action], pred: impl Fn(&Action) -> bool) -> bool {
        actions.iter().any(pred)
    }

    fn pos(actions: &[Action], pred: impl Fn(&Action) -> bool) -> usize {
        actions.iter().position(pred).expect("action present")
    }

    /// Drives a core to Leader at t = 1.0 s with s = 1.0 s.
    fn leader(mode: WatchdogMode) -> Core {
        let mut c = core(mode);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
            },
        );
        let a = c.handle(
            t(1000),
            Input::LeaseGranted {
                lease: 7,
                sent: t(1000),
            },
        );
        assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }));
        c.handle(t(1000), Input::Won { revision: 2 });
        if mode != WatchdogMode::Off {
            c.handle(t(1000), armed_ok(false));
        }
        c.handle(t(1000), Input::Promoted);
        assert_eq!(c.role(), &Role::Leader);
        c
    }

    #[test]
    fn start_publishes_no_evidence_then_grants() {
        let mut c = core(WatchdogMode::Required);
        let a = c.handle(t(0), Input::Start);
        assert_eq!(a[0], Action::Publish(Evidence::None));
        assert!(has(&a, |a| *a == Action::Grant));
        assert!(has(&a, |a| *a == Action::ReadKey));
    }

    #[test]
    fn follower_races_only_for_an_empty_key() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        let a = c.handle(
            t(10),
            Input::KeySeen {
                holder: KeyHolder::Other("b".into()),
                revision: 3,
            },
        );
        assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })));
        let a = c.handle(
            t(20),
            Input::KeySeen {
                holder: KeyHolder::Garbage,
                revision: 4,
            },
        );
        assert!(
            !has(&a, |a| matches!(a, Action::Acquire { .. })),
            "garbage is held by an unknown owner"
        );
        let a = c.handle(
            t(30),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 5,
            },
        );
        assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }));
    }

    #[test]
    fn ineligible_follower_does_not_race() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::Eligibility {
                eligible: false,
                reason: "lag".into(),
            },
        );
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        let a = c.handle(
            t(10),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 5,
            },
        );
        assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })));
        let a = c.handle(
            t(20),
            Input::Eligibility {
                eligible: true,
                reason: String::new(),
            },
        );
        assert!(has(&a, |a| matches!(a, Action::Acquire { .. })));
    }

    #[test]
    fn rule2_arm_before_promote() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
            },
        );
        c.handle(
            t(100),
            Input::LeaseGranted {
                lease: 7,
                sent: t(100),
            },
        );
        let a = c.handle(t(200), Input::Won { revision: 2 });
        assert!(
            !has(&a, |a| *a == Action::Promote),
            "no promote before arming"
        );
        assert!(
            has(&a, |a| *a == Action::Arm { not_after: t(1100) }),
            "{a:?}"
        );
        let a = c.handle(t(300), armed_ok(false));
        let publish = pos(&a, |a| *a == Action::Publish(Evidence::Lease(t(100))));
        let promote = pos(&a, |a| *a == Action::Promote);
        assert!(publish < promote, "pings permitted before promotion: {a:?}");
        assert_eq!(c.role(), &Role::Promoting);
    }

    #[test]
    fn rule2_stale_evidence_renews_before_arming() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Other("b".into()),
                revision: 1,
            },
        );
        // The key frees up 1.5 s after our last renewal: too stale to arm (M - R = 1 s).
        c.handle(
            t(1500),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 3,
            },
        );
        let a = c.handle(t(1500), Input::Won { revision: 4 });
        assert!(!has(&a, |a| matches!(a, Action::Arm { .. })), "{a:?}");
        assert!(has(&a, |a| *a == Action::Renew { lease: 7 }));
        let a = c.handle(
            t(1600),
            Input::Renewed {
                sent: t(1510),
                ttl: 5,
            },
        );
        assert!(
            has(&a, |a| *a == Action::Arm { not_after: t(2510) }),
            "{a:?}"
        );
    }

    #[test]
    fn rule2_required_arm_failure_releases_and_backs_off() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
            },
        );
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        c.handle(t(10), Input::Won { revision: 2 });
        let a = c.handle(
            t(20),
            Input::Armed(ArmOutcome {
                armed: vec![dev("/dev/watchdog1", false)],
                failed: vec![("/dev/watchdog0".into(), "busy: held by systemd".into())],
            }),
        );
        assert!(!has(&a, |a| *a == Action::Promote));
        assert!(
            has(&a, |a| *a == Action::Disarm),
            "partially armed devices are disarmed"
        );
        assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
        assert_eq!(c.role(), &Role::Follower);
        c.handle(t(30), Input::Released { deleted: true });
        let a = c.handle(
            t(40),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 5,
            },
        );
        assert!(
            !has(&a, |a| matches!(a, Action::Acquire { .. })),
            "backs off"
        );
        let a = c.handle(
            t(5100),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 6,
            },
        );
        assert!(
            has(&a, |a| matches!(a, Action::Acquire { .. })),
            "retries after one TTL"
        );
    }

    #[test]
    fn automatic_mode_leads_unarmed_and_says_so() {
        let mut c = core(WatchdogMode::Automatic);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
            },
        );
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        c.handle(t(10), Input::Won { revision: 2 });
        let a = c.handle(
            t(20),
            Input::Armed(ArmOutcome {
                armed: vec![],
                failed: vec![("/dev/watchdog0".into(), "no such device".into())],
            }),
        );
        assert!(has(&a, |a| *a == Action::Promote));
        assert!(has(&a, |a| matches!(
            a,
            Action::Record(Fact::LeadingUnarmed { .. })
        )));
    }

    #[test]
    fn off_mode_never_arms() {
        let mut c = core(WatchdogMode::Off);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
            },
        );
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        let a = c.handle(t(10), Input::Won { revision: 2 });
        assert!(!has(&a, |a| matches!(a, Action::Arm { .. })));
        assert!(has(&a, |a| *a == Action::Promote));
    }

    #[test]
    fn rule1_renewal_publishes_first_and_late_acks_are_recorded() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(
            t(1600),
            Input::Renewed {
                sent: t(1500),
                ttl: 5,
            },
        );
        assert_eq!(
            a[0],
            Action::Publish(Evidence::Lease(t(1500))),
            "publish before anything else"
        );
        assert!(!has(&a, |a| matches!(
            a,
            Action::Record(Fact::RenewedLate { .. })
        )));
        // Acked 1.2 s after it was sent: it earns no ping (M - R = 1 s).
        let a = c.handle(
            t(3200),
            Input::Renewed {
                sent: t(2000),
                ttl: 5,
            },
        );
        assert!(has(&a, |a| *a
            == Action::Record(Fact::RenewedLate {
                sent: t(2000),
                acked: t(3200)
            })));
    }

    #[test]
    fn rule1_out_of_order_ack_never_moves_evidence_back() {
        let mut c = leader(WatchdogMode::Required);
        c.handle(
            t(2100),
            Input::Renewed {
                sent: t(2000),
                ttl: 5,
            },
        );
        let a = c.handle(
            t(2200),
            Input::Renewed {
                sent: t(1500),
                ttl: 5,
            },
        );
        assert_eq!(a[0], Action::Publish(Evidence::Lease(t(2000))));
        assert_eq!(c.last_fresh(), Some(t(2000)));
    }

    #[test]
    fn rule3_tick_past_deadline_steps_down() {
        let mut c = leader(WatchdogMode::Required);
        // s = 1.0 s, T - M = 3 s: deadline 4.0 s.
        let a = c.handle(t(4000), Input::Tick);
        assert!(
            !has(&a, |a| matches!(a, Action::StepDown { .. })),
            "at the deadline, not past it"
        );
        let a = c.handle(t(4001), Input::Tick);
        assert_eq!(a[0], Action::Publish(Evidence::None), "pings stop first");
        assert!(has(&a, |a| *a
            == Action::StepDown {
                reason: StepDownReason::Deadline
            }));
        assert!(!has(&a, |a| *a == Action::Disarm));
    }

    #[test]
    fn lease_gone_or_key_lost_steps_down() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(t(1500), Input::LeaseGone);
        assert!(has(&a, |a| *a
            == Action::StepDown {
                reason: StepDownReason::LeaseLost
            }));
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(
            t(1500),
            Input::KeySeen {
                holder: KeyHolder::Other("b".into()),
                revision: 9,
            },
        );
        assert!(has(&a, |a| *a
            == Action::StepDown {
                reason: StepDownReason::KeyLost
            }));
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(
            t(1500),
            Input::Renewed {
                sent: t(1400),
                ttl: 0,
            },
        );
        assert!(has(&a, |a| *a
            == Action::StepDown {
                reason: StepDownReason::LeaseLost
            }));
    }

    #[test]
    fn rule4_disarm_only_after_stop_and_release() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(t(1500), Input::Shutdown);
        assert!(has(&a, |a| *a
            == Action::StepDown {
                reason: StepDownReason::Shutdown
            }));
        assert!(!has(&a, |a| *a == Action::Disarm));
        assert!(
            !has(&a, |a| *a == Action::Publish(Evidence::None)),
            "a clean handover keeps pinging on fresh renewals"
        );
        let a = c.handle(
            t(1550),
            Input::Renewed {
                sent: t(1500),
                ttl: 5,
            },
        );
        assert_eq!(a[0], Action::Publish(Evidence::Lease(t(1500))));
        let a = c.handle(
            t(1600),
            Input::SteppedDown {
                how: "immediate".into(),
            },
        );
        assert!(!has(&a, |a| *a == Action::Disarm), "key still ours: {a:?}");
        assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
        let a = c.handle(t(1700), Input::Released { deleted: true });
        let none = pos(&a, |a| *a == Action::Publish(Evidence::None));
        let disarm = pos(&a, |a| *a == Action::Disarm);
        assert!(none < disarm, "pings stop before the magic close");
        let a = c.handle(t(1800), Input::Disarmed);
        let revoke = pos(&a, |a| *a == Action::Revoke { lease: 7 });
        let exit = pos(&a, |a| *a == Action::Exit { code: 0 });
        assert!(revoke < exit);
        assert_eq!(c.role(), &Role::Exited);
    }

    #[test]
    fn lost_lease_stops_pings_at_once_and_later_renewals_do_not_restart_them() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(
            t(1500),
            Input::KeySeen {
                holder: KeyHolder::Other("b".into()),
                revision: 9,
            },
        );
        assert_eq!(a[0], Action::Publish(Evidence::None));
        let a = c.handle(
            t(1600),
            Input::Renewed {
                sent: t(1550),
                ttl: 5,
            },
        );
        assert!(
            !has(&a, |a| matches!(a, Action::Publish(Evidence::Lease(_)))),
            "{a:?}"
        );
    }

    #[test]
    fn rule4_unreachable_etcd_waits_for_expiry_before_disarm() {
        let mut c = leader(WatchdogMode::Required);
        c.handle(t(4001), Input::Tick); // deadline step-down
        let a = c.handle(
            t(4100),
            Input::SteppedDown {
                how: "immediate".into(),
            },
        );
        assert!(!has(&a, |a| *a == Action::Disarm));
        c.handle(
            t(4200),
            Input::ReleaseFailed {
                error: "timeout".into(),
            },
        );
        // s = 1.0 s; T = 5 s; slack 1.5 s: no disarm before 7.5 s, and no
        // pings meanwhile (no fresh evidence): the watchdog resets the node.
        let a = c.handle(t(7000), Input::Tick);
        assert!(!has(&a, |a| *a == Action::Disarm));
        assert!(!has(&a, |a| matches!(
            a,
            Action::Publish(Evidence::Lease(_) | Evidence::Liveness(_))
        )));
        let a = c.handle(t(7600), Input::Tick);
        assert!(has(&a, |a| *a == Action::Disarm), "{a:?}");
    }

    #[test]
    fn timer_fencing_is_adopted_by_the_loop() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(
            t(4100),
            Input::FencedByTimer {
                how: "killed".into(),
            },
        );
        assert!(
            !has(&a, |a| matches!(a, Action::StepDown { .. })),
            "already stopped by the timer"
        );
        assert!(has(&a, |a| matches!(
            a,
            Action::Record(Fact::StepDownConfirmed { .. })
        )));
        assert_eq!(c.role(), &Role::Fenced);
    }

    #[test]
    fn follower_shutdown_revokes_and_exits() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        let a = c.handle(t(10), Input::Shutdown);
        assert!(has(&a, |a| *a == Action::Revoke { lease: 7 }));
        assert!(has(&a, |a| *a == Action::Exit { code: 0 }));
    }

    #[test]
    fn rule5_nowayout_keeps_pinging_on_liveness_as_replica() {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
            },
        );
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        c.handle(t(10), Input::Won { revision: 2 });
        c.handle(t(20), armed_ok(true));
        c.handle(t(30), Input::Promoted);
        c.handle(t(100), Input::LeaseGone);
        c.handle(
            t(200),
            Input::SteppedDown {
                how: "immediate".into(),
            },
        );
        let a = c.handle(t(300), Input::Disarmed);
        assert!(has(&a, |a| matches!(
            a,
            Action::Record(Fact::NowayoutKeptArmed { .. })
        )));
        assert_eq!(c.role(), &Role::Follower);
        let a = c.handle(t(900), Input::Tick);
        assert!(has(&a, |a| *a == Action::Publish(Evidence::Liveness(t(900)))));
    }

    fn follower_seeing(holder: KeyHolder) -> Core {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(
            t(0),
            Input::LeaseGranted {
                lease: 7,
                sent: t(0),
            },
        );
        c.handle(
            t(10),
            Input::KeySeen {
                holder,
                revision: 3,
            },
        );
        c
    }

    #[test]
    fn follower_with_a_writable_postgres_follows_the_leader_every_time() {
        let mut c = follower_seeing(KeyHolder::Other("b".into()));
        let a = c.handle(t(20), Input::Postgres(PgView::Primary));
        assert!(has(&a, |a| *a == Action::Follow { leader: "b".into() }));
        // Still writable on the next loop (the follow failed): again, at once.
        let a = c.handle(t(520), Input::Postgres(PgView::Primary));
        assert!(has(&a, |a| *a == Action::Follow { leader: "b".into() }));
    }

    #[test]
    fn follower_asks_once_then_waits_for_the_outcome() {
        let mut c = follower_seeing(KeyHolder::Other("b".into()));
        let a = c.handle(t(20), Input::Postgres(PgView::Down));
        assert!(has(&a, |a| *a == Action::Follow { leader: "b".into() }));
        let a = c.handle(t(520), Input::Postgres(PgView::Busy));
        assert!(!has(&a, |a| matches!(a, Action::Follow { .. })));
        let a = c.handle(t(620), Input::Postgres(PgView::Down));
        assert!(!has(&a, |a| matches!(a, Action::Follow { .. })), "pending");
        c.handle(
            t(700),
            Input::Followed {
                leader: "b".into(),
                ok: false,
            },
        );
        let a = c.handle(t(720), Input::Postgres(PgView::Down));
        assert!(
            has(&a, |a| *a == Action::Follow { leader: "b".into() }),
            "retried after a failure"
        );
        let a = c.handle(
            t(820),
            Input::Postgres(PgView::Replica {
                following: Some("b".into()),
            }),
        );
        assert!(!has(&a, |a| matches!(a, Action::Follow { .. })));
        // A new leader: follow it.
        let a = c.handle(
            t(900),
            Input::KeySeen {
                holder: KeyHolder::Other("c".into()),
                revision: 9,
            },
        );
        assert!(has(&a, |a| *a == Action::Follow { leader: "c".into() }));
    }

    #[test]
    fn a_broken_watch_is_not_a_lost_key() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(t(1200), Input::WatchBroken);
        assert_eq!(a, vec![Action::ReadKey]);
        assert_eq!(c.role(), &Role::Leader);
        let a = c.handle(
            t(1300),
            Input::Renewed {
                sent: t(1250),
                ttl: 5,
            },
        );
        assert_eq!(a[0], Action::Publish(Evidence::Lease(t(1250))));
    }

    #[test]
    fn writable_postgres_under_an_unknown_owner_is_fenced() {
        let mut c = follower_seeing(KeyHolder::Garbage);
        let a = c.handle(t(20), Input::Postgres(PgView::Primary));
        assert!(has(&a, |a| *a == Action::Fence));
    }

    #[test]
    fn leader_whose_postgres_is_down_hands_over() {
        let mut c = leader(WatchdogMode::Required);
        let a = c.handle(t(1200), Input::Postgres(PgView::Down));
        assert!(has(&a, |a| *a
            == Action::StepDown {
                reason: StepDownReason::PostgresDown
            }));
        assert!(
            !has(&a, |a| *a == Action::Publish(Evidence::None)),
            "key still ours: pings go on while it is released"
        );
        let a = c.handle(
            t(1300),
            Input::SteppedDown {
                how: "already stopped".into(),
            },
        );
        assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
    }

    /// Inputs a fuzzer may throw at the core, with a time step.
    fn any_input() -> impl Strategy<Value = (u64, Input)> {
        let holder = prop_oneof![
            Just(KeyHolder::Nobody),
            Just(KeyHolder::Us),
            Just(KeyHolder::Other("b".into())),
            Just(KeyHolder::Garbage),
        ];
        let input = prop_oneof![
            Just(Input::Tick),
            (0u64..3000).prop_map(|back| Input::LeaseGranted {
                lease: 9,
                sent: BootTime(back)
            }),
            (0u64..3000, -1i64..6).prop_map(|(back, ttl)| Input::Renewed {
                sent: BootTime(back),
                ttl
            }),
            Just(Input::LeaseGone),
            (holder, 0i64..100).prop_map(|(holder, revision)| Input::KeySeen { holder, revision }),
            (0i64..100).prop_map(|revision| Input::Won { revision }),
            any::<(bool, bool, bool)>().prop_map(|(ok, fail, nowayout)| Input::Armed(ArmOutcome {
                armed: if ok {
                    vec![dev("/dev/watchdog0", nowayout)]
                } else {
                    vec![]
                },
                failed: if fail {
                    vec![("/dev/watchdog1".into(), "busy".into())]
                } else {
                    vec![]
                },
            })),
            Just(Input::Promoted),
            Just(Input::PromoteFailed { reason: "x".into() }),
            Just(Input::SteppedDown {
                how: "immediate".into()
            }),
            Just(Input::FencedByTimer {
                how: "killed".into()
            }),
            any::<bool>().prop_map(|deleted| Input::Released { deleted }),
            Just(Input::Disarmed),
            Just(Input::Shutdown),
            Just(Input::WatchBroken),
            prop_oneof![
                Just(PgView::Down),
                Just(PgView::Primary),
                Just(PgView::Replica { following: None }),
                Just(PgView::Busy)
            ]
            .prop_map(Input::Postgres),
        ];
        (0u64..1500, input)
    }

    proptest! {
        /// Whatever arrives in whatever order, the action stream keeps the
        /// orderings of rules 1, 2 and 4.
        #[test]
        fn orderings_hold_under_any_input_sequence(
            mode in prop_oneof![Just(WatchdogMode::Required), Just(WatchdogMode::Automatic)],
            steps in proptest::collection::vec(any_input(), 1..80),
        ) {
            let mut c = core(mode);
            let mut now = 10_000u64; // ms
            c.handle(t(now), Input::Start);
            // What the drivers would know:
            let mut arm_ok_since_won = false; // an Armed satisfying rule 2 since the last Won
            let mut pg_may_write = false;     // Promote emitted, no confirmed stop since
            for (dt, mut input) in steps {
                now += dt;
                // Send times lie in the past.
                match &mut input {
                    Input::LeaseGranted { sent, .. } | Input::Renewed { sent, .. } => {
                        *sent = t(now.saturating_sub(sent.0));
                    }
                    _ => {}
                }
                let role_before = c.role().clone();
                if let Input::Won { .. } = input { arm_ok_since_won = false; }
                if let Input::Armed(o) = &input {
                    if role_before == Role::Arming && arm_before_promote(mode, o).is_ok() {
                        arm_ok_since_won = true;
                    }
                }
                if matches!(input, Input::SteppedDown { .. } | Input::FencedByTimer { .. })
                    && matches!(role_before, Role::SteppingDown | Role::Arming | Role::Promoting | Role::Leader)
                {
                    pg_may_write = false;
                }
                let actions = c.handle(t(now), input);
                for a in &actions {
                    match a {
                        Action::Promote => {
                            prop_assert!(arm_ok_since_won, "rule 2: promote without arming: {actions:?}");
                            pg_may_write = true;
                        }
                        Action::Disarm => {
                            prop_assert!(!pg_may_write, "rule 4: disarm while PostgreSQL may write: {actions:?}");
                        }
                        Action::Arm { not_after } => {
                            prop_assert!(*not_after >= t(now), "rule 1: arming on stale evidence");
                        }
                        Action::Publish(Evidence::Lease(s)) => {
                            prop_assert!(*s <= t(now));
                            prop_assert!(
                                matches!(c.role(), Role::Promoting | Role::Leader | Role::SteppingDown | Role::Fenced),
                                "lease evidence published outside leadership: {:?}", c.role()
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
