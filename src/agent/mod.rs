//! The drivers around the decision core: the main loop (etcd, PostgreSQL,
//! arming), the pinger thread and the deadline timer.
//!
//! The main loop runs on a single-threaded tokio runtime. It feeds every
//! observation to [`Core::handle`] and executes the returned actions in order,
//! depth-first: when an action produces an observation (a keepalive reply),
//! the core's answer to it runs before the rest of the batch, so a renewal's
//! `Publish` reaches the pinger before any other etcd or PostgreSQL work
//! (rule 1).

mod bootstrap;
mod cluster_config;
pub mod deadline;
#[cfg(feature = "testing")]
pub mod faults;
pub mod maintenance;
pub mod members;
mod mirror;
mod observer;
pub mod ops;
mod pgconf;
pub mod pinger;
pub mod realtime;
mod slots;

use crate::audit::{self, AuditLog, Event};
use crate::clock;
use crate::config::{Config, DeviceSpec};
use crate::dcs::{self, Acquire, Dcs, Holder, LeaseId, Renewal};
use crate::decide::{
    Action, ArmOutcome, ArmedDevice, Core, CoreConfig, Evidence, Fact, Input, KeyHolder,
    PgSettings, Role,
};
use crate::postgres::{self as pgsql, Pg};
use crate::timing::Budget;
use crate::watchdog::{self, SysRoots, Watchdog};
use deadline::{DeadlineTimer, FenceFn, TimerReport};
use pinger::{EvidenceCell, Pinger};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// Runs the agent until SIGTERM/SIGINT (exit 0) or a fatal error. SIGHUP,
/// SIGUSR1/2 and SIGQUIT are logged and ignored ([`signal_meaning`]).
/// `config_digest` identifies the configuration in the audit's start-up record.
pub fn run(cfg: Config, config_digest: String) -> Result<i32, String> {
    let budget = cfg.budget().map_err(|e| e.to_string())?;
    let audit = open_audit(&cfg, &budget, config_digest)?;
    info!(
        node = %cfg.node, scope = %cfg.scope,
        ttl = ?budget.ttl, margin = ?budget.margin, reset_allowance = ?budget.reset_allowance,
        w = crate::timing::target_timeout(&budget), loop_interval = ?budget.loop_interval,
        "leasedog starting"
    );
    match realtime::lock_memory() {
        Ok(()) => info!("memory locked (mlockall)"),
        Err(e) => warn!("memory NOT locked: {e}; the pinger may be paged out under pressure"),
    }
    ops::startup_conflicts(&cfg);
    // Before any thread starts: threads inherit the reduced set.
    match crate::privs::drop_privileges(
        crate::privs::needed(cfg.postgres.is_some()),
        realtime::RT_PRIORITY,
    ) {
        Ok(crate::privs::Dropped::To { kept, .. }) => {
            info!(kept = ?crate::privs::names(kept), "capabilities dropped")
        }
        Ok(crate::privs::Dropped::Nothing) => {}
        Err(e) => return Err(format!("cannot drop capabilities: {e}")),
    }
    let ops = ops::Ops::start(&cfg, &budget)?;
    let cell = Arc::new(EvidenceCell::default());
    let (pinger, rt) = Pinger::start(cell.clone(), budget, cfg.ping_interval(), true)
        .map_err(|e| format!("cannot start the pinger thread: {e}"))?;
    match rt {
        Ok(()) => info!(
            "pinger runs at SCHED_FIFO priority {}",
            realtime::RT_PRIORITY
        ),
        Err(e) => warn!("pinger NOT real-time: {e}"),
    }
    ops.metrics.attach(pinger.stats.clone(), cell.clone());
    let pg = match &cfg.postgres {
        Some(pc) => Some(
            Pg::new(pc.clone())
                .map_err(|e| format!("postgres: {e}"))?
                .with_slot_name(
                    pc.replication_slots
                        .then(|| crate::decide::slots::slot_name(&cfg.node)),
                ),
        ),
        None => None,
    };
    if let Some(pg) = &pg {
        refuse_distro_unit(pg.data_dir(), pgsql::distro_unit_conflict)?;
        match pgsql::mark_managed(std::path::Path::new(pgsql::MANAGED_DIR), pg.data_dir()) {
            Ok(names) if !names.is_empty() => {
                info!(clusters = ?names, dir = pgsql::MANAGED_DIR, "marked as managed by leasedog")
            }
            Ok(_) => {}
            Err(e) => warn!(
                dir = pgsql::MANAGED_DIR,
                "cannot mark the cluster as managed by leasedog: {e}; the packaged drop-in \
                 will not keep the distribution's unit from starting it"
            ),
        }
    }
    let (timer_tx, timer_rx) = mpsc::unbounded_channel();
    let fence_fn = fence_fn(pg.clone());
    let (timer, rt) = DeadlineTimer::start(
        cell.clone(),
        budget,
        cfg.ping_interval(),
        true,
        fence_fn.clone(),
        move |r| {
            let _ = timer_tx.send(r);
        },
    )
    .map_err(|e| format!("cannot start the deadline timer: {e}"))?;
    if let Err(e) = rt {
        warn!("deadline timer NOT real-time: {e}");
    }
    let (sig_tx, sig_rx) = mpsc::unbounded_channel();
    spawn_signal_thread(sig_tx)?;
    let (side_tx, side_rx) = mpsc::unbounded_channel();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_stack_size(256 * 1024)
        .max_blocking_threads(2)
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    if let Some(pg) = &pg {
        pgconf::apply_at_start(&runtime, pg)?;
    }
    let mut core = Core::new(CoreConfig {
        budget,
        mode: cfg.watchdog.mode,
    })
    .with_node(cfg.node.clone())
    .with_maintenance()
    .with_tags(cfg.tags.published())
    .with_slots(cfg.postgres.as_ref().is_some_and(|p| p.replication_slots));
    if let Some(pc) = &cfg.postgres {
        core = core.with_postgres(PgSettings {
            maximum_lag_on_failover: pc.maximum_lag_on_failover,
            synchronous_mode: pc.synchronous_mode,
            host: pc.advertised_host(),
            port: pc.port,
            sync: crate::decide::sync::SyncSettings {
                strict: pc.synchronous_mode_strict,
                node_count: pc.synchronous_node_count,
                quorum: pc.synchronous_quorum,
                defer: std::time::Duration::from_secs_f64(pc.failover_defer),
                check_candidates: true,
            },
        });
    }
    let mut agent = Agent {
        core,
        cfg,
        budget,
        cell,
        pinger,
        dcs: None,
        watch: None,
        fence_fn,
        audit,
        pg,
        side_tx,
        observer: None,
        member_io: None,
        maint_io: None,
        slot_io: None,
        connect_failed_at: None,
        mirror: None,
        ops,
    };
    let code = runtime.block_on(agent.main_loop(timer_rx, sig_rx, side_rx));
    drop(timer);
    let Agent { pinger, .. } = agent;
    // Devices still held here were not disarmed by the core (nowayout, or an
    // error path): dropping them leaves them armed, as rule 4 demands.
    pinger.stop();
    Ok(code)
}

/// What a signal means to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalMeaning {
    /// Step down, release, disarm and exit 0 (SIGTERM, SIGINT).
    Shutdown,
    /// Logged and otherwise ignored: an agent that dies armed gets its node
    /// reset, so no signal an operator may send kills it by default.
    Note(&'static str),
}

/// The signals the agent handles; every other catchable one an operator
/// might send keeps its default action (SIGKILL cannot be caught).
pub const HANDLED_SIGNALS: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
];

pub fn signal_meaning(sig: i32) -> SignalMeaning {
    match sig {
        libc::SIGTERM | libc::SIGINT => SignalMeaning::Shutdown,
        libc::SIGHUP => SignalMeaning::Note("SIGHUP: reload not supported; restart to apply"),
        libc::SIGUSR1 => SignalMeaning::Note("SIGUSR1: ignored"),
        libc::SIGUSR2 => SignalMeaning::Note("SIGUSR2: ignored"),
        libc::SIGQUIT => SignalMeaning::Note(
            "SIGQUIT: ignored (an agent that dies armed gets its node reset); \
             SIGTERM steps down and exits",
        ),
        _ => SignalMeaning::Note("unexpected signal: ignored"),
    }
}

fn spawn_signal_thread(tx: mpsc::UnboundedSender<i32>) -> Result<(), String> {
    let mut signals = signal_hook::iterator::Signals::new(HANDLED_SIGNALS)
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("leasedog-signals".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(s).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

struct Agent {
    cfg: Config,
    budget: Budget,
    core: Core,
    cell: Arc<EvidenceCell>,
    pinger: Pinger,
    dcs: Option<Dcs>,
    /// The leader watch, when one runs (the core is told of readings
    /// without one: `Input::KeySeenUnwatched`).
    watch: Option<dcs::LeaderWatch>,
    fence_fn: FenceFn,
    audit: AuditLog,
    /// Lifecycle records to etcd's history; started at the first one.
    mirror: Option<mirror::Mirror>,
    pg: Option<Pg>,
    /// Inputs from the tasks off the renewal path: the PostgreSQL observer,
    /// the member records, background `Follow`s.
    side_tx: mpsc::UnboundedSender<Input>,
    /// The PostgreSQL observer (started with the loop when PostgreSQL is managed).
    observer: Option<observer::Observer>,
    /// Member record I/O (started with the loop).
    member_io: Option<members::MemberIo>,
    /// The pause and request keys (started with the loop).
    maint_io: Option<maintenance::MaintenanceIo>,
    /// Member listing and replication slots (started with the loop).
    slot_io: Option<slots::SlotIo>,
    /// When the last connection attempt failed (one attempt per loop).
    connect_failed_at: Option<clock::BootTime>,
    /// sd_notify and the metrics endpoint.
    ops: ops::Ops,
}

/// The step-down that both the main loop and the deadline timer run: a fence
/// of PostgreSQL that needs no runtime (rule 3).
fn fence_fn(pg: Option<Pg>) -> FenceFn {
    match pg {
        None => Arc::new(|| Ok("nothing to stop: no PostgreSQL configured".into())),
        Some(pg) => Arc::new(move || {
            pg.fence()
                .map(|r| {
                    format!(
                        "PostgreSQL stopped ({}) in {:.3} s",
                        audit::stop_how(r.how),
                        r.took.as_secs_f64()
                    )
                })
                .map_err(|e| e.to_string())
        }),
    }
}

/// Opens the audit log (refusing to run without one: rule 7), warns if the
/// previous boot ended under a running agent, and writes the start-up record.
fn open_audit(cfg: &Config, budget: &Budget, config_digest: String) -> Result<AuditLog, String> {
    let dir = &cfg.audit.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
    let (mut log, report) = AuditLog::open(dir, &cfg.node)
        .map_err(|e| format!("audit log in {}: {e}", dir.display()))?;
    if let Some(t) = &report.torn {
        warn!("audit log had a torn last line (a crash mid-write): {t:?}; continued after it");
    }
    if let Some((line, what)) = &report.first_break {
        error!("audit log chain is broken at line {line}: {what}; run `leasedog audit verify`");
    }
    let prev = audit::previous_boot(&report, log.boot_id());
    let devices: Vec<audit::DeviceRecord> = watchdog::query(&SysRoots::real())
        .into_iter()
        .map(|d| audit::DeviceRecord {
            path: d.path.display().to_string(),
            identity: d.identity.unwrap_or_default(),
            timeout_s: d.timeout.unwrap_or(0),
            nowayout: d.nowayout.unwrap_or(true),
            bootstatus: d.bootstatus.map(|b| b.0 .0),
            watchdog_reset: d.was_watchdog_reset.unwrap_or(false),
        })
        .collect();
    let reset_seen = devices.iter().any(|d| d.watchdog_reset);
    if let Some(p) = &prev {
        if !p.clean_shutdown {
            warn!(
                previous_boot = %p.boot_id,
                last_record_wall_ns = p.last_record_wall,
                last_event = p.last_event.name(),
                watchdog_reset = reset_seen,
                "the previous boot ended while this agent was running{}",
                if reset_seen { ": a watchdog reset (device boot status)" } else { " (reset, crash or power loss)" }
            );
        }
    }
    log.append(
        None,
        Event::Startup {
            version: env!("CARGO_PKG_VERSION").into(),
            config_digest,
            budget: budget.into(),
            devices,
            previous_boot_id: prev.as_ref().map(|p| p.boot_id.clone()),
            previous_boot_reset: prev.as_ref().map(|p| !p.clean_shutdown && reset_seen),
        },
    )
    .map_err(|e| format!("audit log: {e}"))?;
    info!(path = %log.path().display(), "audit log open");
    Ok(log)
}

/// The audit record of a core fact (and the etcd revision it carries).
fn audit_event(fact: &Fact) -> (Option<i64>, Event) {
    let ns = |t: clock::BootTime| t.as_nanos();
    match fact.clone() {
        Fact::LeaseGranted { lease } => (None, Event::LeaseGranted { lease }),
        Fact::Acquired {
            lease,
            revision,
            s,
            postgres,
        } => (
            Some(revision),
            Event::Acquired {
                lease,
                s_ns: ns(s),
                revision: Some(revision),
                postgres: Some(postgres.into()),
            },
        ),
        Fact::LeaderSeen { holder, revision } => (
            Some(revision),
            Event::LeaderSeen {
                holder: holder_name(holder),
            },
        ),
        Fact::FencedNotLeader { holder, how, ok } => (
            None,
            Event::FencedNotLeader {
                holder: holder_name(holder),
                how,
                ok,
            },
        ),
        Fact::AwaitingPreviousLease { lease } => (
            None,
            Event::AwaitingPreviousLease {
                lease: LeaseId(lease).to_string(),
            },
        ),
        Fact::PreviousLeaseGone { lease, waited } => (
            None,
            Event::PreviousLeaseGone {
                lease: LeaseId(lease).to_string(),
                waited_ns: waited.as_nanos() as u64,
            },
        ),
        Fact::PreviousLeaseAlive { lease, ttl } => (
            None,
            Event::PreviousLeaseAlive {
                lease: LeaseId(lease).to_string(),
                ttl_s: ttl,
            },
        ),
        Fact::PreviousHoldersUnknown { wait } => (
            None,
            Event::PreviousHoldersUnknown {
                wait_ns: wait.as_nanos() as u64,
            },
        ),
        Fact::RenewedLate { sent, acked } => (
            None,
            Event::RenewedLate {
                sent_ns: ns(sent),
                acked_ns: ns(acked),
            },
        ),
        Fact::RenewalWithheld { silent } => (
            None,
            Event::RenewalWithheld {
                silent_ns: silent.as_nanos() as u64,
            },
        ),
        Fact::LeaseLost { last_s } => (
            None,
            Event::LeaseLost {
                reason: "etcd reports the lease gone".into(),
                last_s_ns: last_s.map(ns),
            },
        ),
        Fact::Armed(d) => (
            None,
            Event::Armed {
                device: d.path,
                identity: d.identity,
                w_s: d.w_secs,
                nowayout: d.nowayout,
            },
        ),
        Fact::ArmFailed { device, reason } => (None, Event::ArmFailed { device, reason }),
        Fact::LeadingUnarmed { reason } => (None, Event::LeadingUnarmed { reason }),
        Fact::Promoted => (None, Event::Promoted),
        Fact::StepDownBegun { reason, deadline } => (
            None,
            Event::StepDownBegun {
                reason: reason.as_str().into(),
                deadline_ns: deadline.map_or(0, ns),
            },
        ),
        Fact::StepDownConfirmed { how } => (None, Event::StepDownConfirmed { how }),
        Fact::StepDownFailed { reason } => (None, Event::StepDownFailed { reason }),
        Fact::Released { deleted, revision } => (revision, Event::released(revision, deleted)),
        Fact::ReleaseFailed {
            error,
            attempts,
            abandoned,
        } => (
            None,
            Event::ReleaseFailed {
                error,
                attempts,
                abandoned,
            },
        ),
        Fact::Disarmed => (
            None,
            Event::Disarmed {
                device: "all disarmable".into(),
            },
        ),
        Fact::NowayoutKeptArmed { devices } => (None, Event::NowayoutKeptArmed { devices }),
        Fact::SyncRecorded {
            members,
            quorum,
            fallback,
        } => (
            None,
            Event::SyncRecorded {
                members,
                quorum,
                fallback,
            },
        ),
        Fact::RaceHeld { reason, deferred } => (None, Event::RaceHeld { reason, deferred }),
        Fact::Shutdown => (
            None,
            Event::Shutdown {
                reason: "signal".into(),
            },
        ),
        Fact::Maintenance { what, detail } => (None, Event::Maintenance { what, detail }),
        Fact::SwitchoverBegun { to } => (None, Event::SwitchoverBegun { to }),
        Fact::SwitchoverRefused { to, reason } => (None, Event::SwitchoverRefused { to, reason }),
        Fact::SwitchoverHandedOver {
            to,
            revision,
            final_lsn,
        } => (
            Some(revision),
            Event::SwitchoverHandedOver { to, final_lsn },
        ),
        Fact::SwitchoverAborted { to, reason } => (None, Event::SwitchoverAborted { to, reason }),
        Fact::BootstrapClaimed { lease } => (
            None,
            Event::BootstrapClaimed {
                lease: LeaseId(lease).to_string(),
            },
        ),
        Fact::Initdb { ok, detail } => (None, Event::Initdb { ok, detail }),
    }
}

/// How an audit record names a holder (null: nobody or unknown).
fn holder_name(holder: KeyHolder) -> Option<String> {
    match holder {
        KeyHolder::Nobody | KeyHolder::Unknown => None,
        KeyHolder::Us => Some("(this node)".into()),
        KeyHolder::Other(n) => Some(n),
        KeyHolder::Garbage => Some("(not a leasedog record)".into()),
    }
}

/// The leases that held the leader key in `[from, before)` and whether that
/// history is complete (an unread one is not).
async fn read_holders(d: &mut Dcs, from: i64, before: i64) -> (Vec<i64>, bool) {
    match d.previous_holders(from, before).await {
        Ok(h) => {
            if !h.complete {
                warn!(from, compacted = ?h.compacted, "the leader key's history before the win is incomplete");
            }
            (h.leases.iter().map(|l| l.0).collect(), h.complete)
        }
        Err(e) => {
            warn!("cannot read the leader key's history before the win: {e}");
            (Vec::new(), false)
        }
    }
}

/// A read or watched leader key as the core's input, with its lease;
/// `watched`: whether a watch runs behind the reading.
fn key_seen(h: Holder, current: Option<i64>, revision: i64, watched: bool) -> Input {
    let lease = match &h {
        Holder::Nobody => None,
        Holder::Us { lease } | Holder::Node { lease, .. } | Holder::Unknown { lease, .. } => {
            Some(lease.0).filter(|l| *l != 0)
        }
    };
    let holder = key_holder(h, current);
    if watched {
        Input::KeySeen {
            holder,
            revision,
            lease,
        }
    } else {
        Input::KeySeenUnwatched {
            holder,
            revision,
            lease,
        }
    }
}

/// The core's view of a holder. Our own name on a lease this process does
/// not hold (a previous run's) counts as another owner: it must expire.
fn key_holder(h: Holder, current: Option<i64>) -> KeyHolder {
    match h {
        Holder::Nobody => KeyHolder::Nobody,
        Holder::Us { lease } if Some(lease.0) == current => KeyHolder::Us,
        Holder::Us { lease } => KeyHolder::Other(format!("this node on an older lease {lease}")),
        Holder::Node { name, .. } => KeyHolder::Other(name),
        Holder::Unknown { .. } => KeyHolder::Garbage,
    }
}

impl Agent {
    async fn main_loop(
        &mut self,
        mut timer_rx: mpsc::UnboundedReceiver<TimerReport>,
        mut sig_rx: mpsc::UnboundedReceiver<i32>,
        mut side_rx: mpsc::UnboundedReceiver<Input>,
    ) -> i32 {
        // Off the renewal path: PostgreSQL is observed and member records
        // are written by tasks of their own; their results come back as
        // inputs through `side_rx`.
        if let Some(pg) = self.pg.clone() {
            self.observer = Some(observer::Observer::start(
                pg,
                self.budget.loop_interval,
                self.side_tx.clone(),
            ));
        }
        self.member_io = Some(members::MemberIo::start(
            &self.cfg.etcd,
            &self.cfg.scope,
            &self.cfg.node,
            self.ops.metrics.etcd_requests.clone(),
            self.side_tx.clone(),
        ));
        self.slot_io = Some(slots::SlotIo::start(
            &self.cfg.etcd,
            &self.cfg.scope,
            &self.cfg.node,
            self.pg.clone(),
            self.ops.metrics.etcd_requests.clone(),
            self.side_tx.clone(),
        ));
        cluster_config::start(
            self.cfg.clone(),
            self.pg.clone(),
            self.ops.metrics.etcd_requests.clone(),
            self.side_tx.clone(),
        );
        self.maint_io = Some(maintenance::MaintenanceIo::start(
            &self.cfg.etcd,
            &self.cfg.scope,
            &self.cfg.node,
            // Every other loop: half a request per loop in steady state.
            self.budget.loop_interval * 2,
            self.ops.metrics.etcd_requests.clone(),
            self.side_tx.clone(),
        ));
        let mut pending = VecDeque::new();
        // The pause state before the first race (`decide::pause`): one
        // bounded read, nothing armed yet. Unknown, the node does not race,
        // and a primary started before its agent would lose rule 8's grace.
        if let Ok(d) = self.dcs().await {
            match d.get_pause().await {
                Ok(v) => pending.push_back(Input::Paused {
                    paused: v.is_some(),
                }),
                Err(e) => warn!("cannot read the pause key at start-up: {e}"),
            }
        }
        pending.push_back(Input::Start);
        loop {
            while let Some(input) = pending.pop_front() {
                if let Some(code) = self.feed(input).await {
                    return code;
                }
            }
            self.drain_pinger();
            self.ops.after(&self.core, false);
            // The core says when it next needs a tick (the next loop, or a
            // deadline of its own before it).
            let wait = self
                .core
                .next_deadline()
                .map_or(Duration::ZERO, |d| d.saturating_since(clock::now()));
            let input = tokio::select! {
                // Signals and the deadline timer first: a busy loop (etcd
                // down, every tick ready) must not starve them.
                biased;
                Some(sig) = sig_rx.recv() => match signal_meaning(sig) {
                    SignalMeaning::Shutdown => {
                        info!("signal {sig}: stepping down and exiting");
                        self.ops.stopping();
                        Input::Shutdown
                    }
                    SignalMeaning::Note(what) => {
                        warn!("{what}");
                        continue;
                    }
                },
                Some(r) = timer_rx.recv() => match r {
                    TimerReport::Fenced { s, at, how } => {
                        warn!(s = s.as_secs_f64(), at = at.as_secs_f64(), "deadline timer fenced the node: {how}");
                        Input::FencedByTimer { how }
                    }
                    TimerReport::StopFailed { reason, .. } => {
                        error!("deadline timer could not stop PostgreSQL: {reason}; the watchdog will reset the node");
                        Input::StepDownFailed { reason }
                    }
                },
                _ = tokio::time::sleep(wait) => {
                    let woke = self.pinger.stats.last_wake_ns.load(std::sync::atomic::Ordering::Relaxed);
                    if woke > 0 {
                        self.handle(Input::PingerWoke { at: clock::BootTime::from_nanos(woke) });
                    }
                    if let Some(code) = self.feed(Input::Tick).await {
                        return code;
                    }
                    self.ops.after(&self.core, true);
                    continue;
                }
                Some(input) = side_rx.recv() => input,
                ev = next_watch(&mut self.watch) => match ev {
                    Ok(dcs::LeaderEvent::Put { holder, revision }) => key_seen(holder, self.core.lease(), revision, true),
                    Ok(dcs::LeaderEvent::Deleted { revision, lease }) => {
                        info!(revision, lease = ?lease.map(|l| l.to_string()), "the leader key was deleted");
                        Input::KeySeen { holder: KeyHolder::Nobody, revision, lease: lease.map(|l| l.0) }
                    }
                    Err(e) => {
                        warn!("leader watch broke: {e}; re-reading");
                        self.watch = None;
                        Input::WatchBroken
                    }
                },
            };
            pending.push_back(input);
        }
    }

    /// Feeds one input and executes the resulting actions depth-first (the
    /// contract on [`Core::handle`]).
    async fn feed(&mut self, input: Input) -> Option<i32> {
        let mut queue: VecDeque<Action> = self.handle(input).into();
        while let Some(action) = queue.pop_front() {
            if let Action::Exit { code } = action {
                return Some(code);
            }
            if let Some(next) = self.execute(action).await {
                self.ops.input(&next);
                let more = self.handle(next);
                for a in more.into_iter().rev() {
                    queue.push_front(a);
                }
            }
        }
        None
    }

    /// One `Core::handle`, logging a change of eligibility (the core's
    /// judgement, which it makes from `PgObserved`).
    fn handle(&mut self, input: Input) -> Vec<Action> {
        let before = self.core.eligibility().is_ok();
        let actions = self.core.handle(clock::now(), input);
        match self.core.eligibility() {
            Ok(()) if !before => info!("eligible for leadership"),
            Err(reason) if before => info!("not eligible for leadership: {reason}"),
            _ => {}
        }
        actions
    }

    /// Moves the pinger's events into the audit log (one fsync for all).
    fn drain_pinger(&mut self) {
        let mut n = 0;
        while let Some(ev) = self.pinger.events.try_recv() {
            match &ev {
                Event::PingRefused { k_minus_s_ns, .. } if n == 0 => warn!(
                    k_minus_s = ?Duration::from_nanos(*k_minus_s_ns),
                    "ping refused: the last acknowledged renewal is older than M - R"
                ),
                Event::PingFailed { device, error } => {
                    error!(%device, "watchdog ping failed: {error}")
                }
                _ => {}
            }
            if let Err(e) = self.audit.append_nosync(None, ev) {
                error!("audit log write failed: {e}");
            }
            n += 1;
        }
        let dropped = self.pinger.events.take_dropped();
        if dropped > 0 {
            warn!(dropped, "pinger events dropped (queue full)");
            let _ = self
                .audit
                .append_nosync(None, Event::QueueDropped { count: dropped });
            n += 1;
        }
        if n > 0 {
            if let Err(e) = self.audit.sync() {
                error!("audit log sync failed: {e}");
            }
        }
    }

    async fn dcs(&mut self) -> Result<&mut Dcs, String> {
        self.connect().await?;
        Ok(self.dcs.as_mut().expect("connected"))
    }

    async fn connect(&mut self) -> Result<(), String> {
        if self.dcs.is_none() {
            // One connection attempt per loop: with etcd down, every action
            // of a batch would otherwise wait out its own connect timeout.
            let now = clock::now();
            if let Some(at) = self.connect_failed_at {
                if now.saturating_since(at) < self.budget.loop_interval {
                    return Err("etcd unreachable (retrying next loop)".into());
                }
            }
            self.connect_failed_at = Some(now);
            let mut d = Dcs::connect(&self.cfg.etcd, &self.cfg.scope, &self.cfg.node)
                .await
                .map_err(|e| e.to_string())?;
            d.count_requests(self.ops.metrics.etcd_requests.clone());
            info!(endpoints = ?self.cfg.etcd.endpoints, "connected to etcd");
            self.connect_failed_at = None;
            self.dcs = Some(d);
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action) -> Option<Input> {
        match action {
            Action::Publish(ev) => {
                self.cell.store(ev);
                None
            }
            Action::Grant => {
                let ttl = self.budget.ttl_secs();
                let sent = clock::now();
                match self.dcs().await {
                    Ok(d) => match d.grant(ttl).await {
                        Ok(lease) => Some(Input::LeaseGranted {
                            lease: lease.0,
                            sent,
                        }),
                        Err(e) => {
                            warn!("lease grant failed: {e}");
                            Some(Input::GrantFailed {
                                error: e.to_string(),
                            })
                        }
                    },
                    Err(e) => {
                        warn!("etcd unreachable: {e}");
                        Some(Input::GrantFailed { error: e })
                    }
                }
            }
            Action::Renew { lease } => {
                #[cfg(feature = "testing")]
                faults::before_renewal();
                let d = match self.dcs().await {
                    Ok(d) => d,
                    Err(e) => {
                        return Some(Input::RenewFailed {
                            sent: clock::now(),
                            error: e,
                        })
                    }
                };
                let sent = clock::now();
                match d.renew(LeaseId(lease)).await {
                    Renewal::Acked { ttl } => {
                        let rtt = clock::now().saturating_since(sent);
                        debug!(rtt_us = rtt.as_micros() as u64, ttl, "renewed");
                        Some(Input::Renewed { sent, ttl })
                    }
                    Renewal::Gone => {
                        warn!(lease, "etcd says the lease is gone");
                        Some(Input::LeaseGone)
                    }
                    Renewal::Failed(e) => {
                        warn!("renewal failed: {e}");
                        Some(Input::RenewFailed {
                            sent,
                            error: e.to_string(),
                        })
                    }
                }
            }
            Action::ReadKey => {
                let current = self.core.lease();
                if self.connect().await.is_err() {
                    return None;
                }
                let d = self.dcs.as_mut().expect("connected");
                match d.leader().await {
                    Ok((holder, revision)) => {
                        if self.watch.is_none() {
                            #[cfg(feature = "testing")]
                            let refused = faults::watch_refused();
                            #[cfg(not(feature = "testing"))]
                            let refused = false;
                            let w = if refused {
                                Err("refused by the fault hook".to_string())
                            } else {
                                d.watch_leader(revision).await.map_err(|e| e.to_string())
                            };
                            match w {
                                Ok(w) => self.watch = Some(w),
                                Err(e) => warn!("cannot watch the leader key: {e}"),
                            }
                        }
                        Some(key_seen(holder, current, revision, self.watch.is_some()))
                    }
                    Err(e) => {
                        warn!("cannot read the leader key: {e}");
                        None
                    }
                }
            }
            Action::Acquire { lease } => {
                // Taken before the race: an earlier instant only reads more.
                let from = self.core.history_from(clock::now());
                let d = match self.dcs().await {
                    Ok(d) => d,
                    Err(e) => return Some(Input::AcquireFailed { error: e }),
                };
                match d.try_acquire(LeaseId(lease)).await {
                    Ok(Acquire::Won { revision }) => {
                        info!(revision, "won the leader key");
                        // Who held the key before, from etcd's history: the
                        // core waits for each (a deletion is not an expiry).
                        let (previous, complete) = read_holders(d, from, revision).await;
                        Some(Input::WonAfter {
                            revision,
                            previous,
                            complete,
                        })
                    }
                    Ok(Acquire::Held { holder, revision }) => {
                        // Mapped with the core's lease now, not the action's:
                        // an Acquire left in a batch behind LeaseGone -> Grant
                        // -> Won must see the new key as ours (rule 4).
                        let watched = self.watch.is_some();
                        Some(key_seen(holder, self.core.lease(), revision, watched))
                    }
                    Err(e) => Some(Input::AcquireFailed {
                        error: e.to_string(),
                    }),
                }
            }
            Action::Arm { not_after } => Some(self.arm(not_after).await),
            Action::Promote => match self.pg.clone() {
                None => {
                    info!("promoted (leader; no PostgreSQL configured)");
                    Some(Input::Promoted)
                }
                // Off the loop: pg_promote may wait up to
                // postgres.promote_timeout, and renewals must go on meanwhile
                // (the core stays Promoting until the outcome arrives).
                Some(pg) => {
                    let tx = self.side_tx.clone();
                    tokio::spawn(async move {
                        let input = match pg.promote().await {
                            Ok(how) => {
                                info!(?how, "promoted (leader): PostgreSQL is primary");
                                Input::Promoted
                            }
                            Err(e) => {
                                error!("promotion failed: {e}");
                                Input::PromoteFailed {
                                    reason: e.to_string(),
                                }
                            }
                        };
                        let _ = tx.send(input);
                    });
                    None
                }
            },
            Action::Fence => {
                match self.core.holder() {
                    KeyHolder::Other(leader) => {
                        warn!(%leader, "PostgreSQL is writable while {leader} leads: fencing it")
                    }
                    _ => warn!("PostgreSQL is writable while the key is not ours: fencing it"),
                }
                let stop = self.fence_fn.clone();
                let r = tokio::task::spawn_blocking(move || stop())
                    .await
                    .unwrap_or_else(|e| Err(format!("fence task failed: {e}")));
                Some(match r {
                    Ok(how) => {
                        info!("{how}");
                        Input::Fenced { ok: true, how }
                    }
                    Err(e) => {
                        error!("fence failed: {e}");
                        Input::Fenced { ok: false, how: e }
                    }
                })
            }
            Action::Follow { leader, clone_from } => self.follow(leader, clone_from),
            Action::ReadInitialize
            | Action::ClaimInitialize { .. }
            | Action::Initdb
            | Action::FinishInitialize { .. }
            | Action::AbandonInitialize { .. }
            | Action::MarkInitialized => self.bootstrap(action).await,
            Action::ReadMembers => {
                if let Some(s) = &self.slot_io {
                    s.send(slots::Cmd::ReadMembers);
                }
                None
            }
            Action::SyncSlots { wanted } => {
                if let Some(s) = &self.slot_io {
                    s.send(slots::Cmd::Sync(wanted));
                }
                None
            }
            Action::StartStandby { leader } => self.start_standby(leader),
            Action::PublishMember(member) => {
                if let (Some(io), Some(lease)) = (&self.member_io, self.core.lease()) {
                    io.publish(lease, member);
                    None
                } else {
                    Some(Input::MemberPublished { member, ok: false })
                }
            }
            Action::RefreshLeaderMember { leader } => match &self.member_io {
                Some(io) => {
                    io.read(leader);
                    None
                }
                None => Some(Input::LeaderMember {
                    leader,
                    member: None,
                }),
            },
            Action::WriteSync(state) => match (&self.member_io, self.core.lease()) {
                (Some(io), Some(lease)) => {
                    io.write_sync(lease, state);
                    None
                }
                _ => Some(Input::SyncWritten { state, ok: false }),
            },
            Action::ReadCandidates => match &self.member_io {
                Some(io) => {
                    io.candidates();
                    None
                }
                None => Some(Input::Candidates {
                    sync: None,
                    members: Vec::new(),
                    ok: false,
                }),
            },
            Action::SetSyncStandbys(value) => match &self.observer {
                Some(o) => {
                    o.set_sync_standbys(value);
                    None
                }
                None => Some(Input::SyncStandbysSet { value, ok: false }),
            },
            Action::StepDown { reason, fast } => {
                warn!(?reason, ?fast, "stepping down");
                let r = match (fast, self.pg.clone()) {
                    (Some(within), Some(pg)) => {
                        switchover(&pg, within, self.fence_fn.clone()).await
                    }
                    _ => {
                        let stop = self.fence_fn.clone();
                        tokio::task::spawn_blocking(move || stop())
                            .await
                            .unwrap_or_else(|e| Err(format!("step-down task failed: {e}")))
                    }
                };
                Some(match r {
                    Ok(how) => Input::SteppedDown { how },
                    Err(reason) => Input::StepDownFailed { reason },
                })
            }
            Action::Release { lease } => {
                let d = match self.dcs().await {
                    Ok(d) => d,
                    Err(e) => return Some(Input::ReleaseFailed { error: e }),
                };
                match d.release(LeaseId(lease)).await {
                    Ok(r) => Some(Input::Released {
                        deleted: r.deleted,
                        revision: Some(r.revision),
                    }),
                    Err(e) => {
                        warn!("release failed: {e}");
                        Some(Input::ReleaseFailed {
                            error: e.to_string(),
                        })
                    }
                }
            }
            Action::ReadHolders { from, before } => {
                let (previous, complete) = match self.dcs().await {
                    Ok(d) => read_holders(d, from, before).await,
                    Err(e) => {
                        warn!("cannot read the leader key's history before the win: {e}");
                        (Vec::new(), false)
                    }
                };
                Some(Input::HoldersRead {
                    revision: before,
                    previous,
                    complete,
                })
            }
            Action::CheckLeaseGone { lease } => {
                let d = match self.dcs().await {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("cannot ask etcd about the previous holder's lease: {e}");
                        return None;
                    }
                };
                match d.time_to_live(LeaseId(lease)).await {
                    Ok(ttl) => {
                        let alive = ttl.is_some();
                        if alive {
                            info!(lease = %LeaseId(lease), ttl, "the previous holder's lease still lives: not promoting yet");
                        } else {
                            info!(lease = %LeaseId(lease), "the previous holder's lease is gone");
                        }
                        Some(Input::PreviousLease {
                            lease,
                            alive,
                            ttl: ttl.unwrap_or(0),
                        })
                    }
                    Err(e) => {
                        warn!("cannot ask etcd about the previous holder's lease: {e}");
                        None
                    }
                }
            }
            Action::Disarm => {
                let devices = self.pinger.surrender().await;
                let mut keep: Vec<Box<dyn Watchdog>> = Vec::new();
                for d in devices {
                    let path = d.info().path.display().to_string();
                    let listed = self.core.nowayout_devices().contains(&path);
                    if listed || d.info().nowayout {
                        if !listed {
                            // Never closed: closing it would not stop it.
                            error!(%path, "nowayout device the core did not list as armed: kept armed");
                        }
                        warn!(%path, "nowayout: cannot disarm; pinging on as a replica while healthy");
                        keep.push(d);
                    } else if let Err(e) = d.disarm() {
                        error!(%path, "disarm failed: {e}");
                    } else {
                        info!(%path, "disarmed (magic close)");
                    }
                }
                self.pinger.adopt(keep);
                Some(Input::Disarmed)
            }
            Action::Revoke { lease } => {
                if let Ok(d) = self.dcs().await {
                    match d.revoke(LeaseId(lease)).await {
                        Ok(()) => info!(lease = %LeaseId(lease), "lease revoked"),
                        Err(e) => warn!("lease revoke failed: {e} (it will expire)"),
                    }
                }
                None
            }
            Action::Record(fact) => {
                self.record(&fact).await;
                None
            }
            Action::Exit { .. } => None,
            Action::StopPostgres => {
                let Some(pg) = self.pg.clone() else {
                    return Some(Input::PostgresStopped { error: None });
                };
                let tx = self.side_tx.clone();
                tokio::spawn(async move {
                    let error = match pg.stop_clean().await {
                        Ok(()) => {
                            info!("PostgreSQL stopped (fast) before exit");
                            None
                        }
                        Err(e) => {
                            warn!("PostgreSQL's fast stop before exit failed: {e}");
                            Some(e.to_string())
                        }
                    };
                    let _ = tx.send(Input::PostgresStopped { error });
                });
                None
            }
            Action::RunOp {
                id,
                op,
                leader,
                clone_from,
            } => self.run_op(id, op, leader, clone_from),
            Action::ReportOp { id, ok, detail } => {
                if let Some(m) = &self.maint_io {
                    m.report(dcs::OpOutcome { id, ok, detail });
                }
                None
            }
            Action::Callback { event, role } => {
                // A thread of its own: nothing here waits for it.
                crate::callbacks::spawn(&self.cfg.callbacks, event, role, &self.cfg.scope);
                None
            }
            Action::ReadSwitchover => match &self.member_io {
                Some(io) => {
                    io.read_switchover();
                    None
                }
                None => Some(Input::SwitchoverSeen {
                    request: None,
                    target: None,
                    paused: false,
                    unix_now: 0,
                }),
            },
            Action::AnswerSwitchover(answer) => {
                info!(?answer, "switchover");
                if let Some(io) = &self.member_io {
                    io.answer_switchover(answer);
                }
                None
            }
            Action::ReadShutdownCheckpoint => {
                let Some(pg) = self.pg.clone() else {
                    return Some(Input::ShutdownCheckpoint {
                        state: "no PostgreSQL managed".into(),
                        checkpoint: None,
                    });
                };
                let tx = self.side_tx.clone();
                tokio::spawn(async move {
                    let input = match pg.shutdown_checkpoint().await {
                        Ok((state, lsn)) => Input::ShutdownCheckpoint {
                            state,
                            checkpoint: lsn.map(|l| l.0),
                        },
                        Err(e) => Input::ShutdownCheckpoint {
                            state: format!("pg_controldata failed: {e}"),
                            checkpoint: None,
                        },
                    };
                    let _ = tx.send(input);
                });
                None
            }
            Action::CheckTargetLsn { host, port } => {
                let Some(pg) = self.pg.clone() else {
                    return Some(Input::TargetLsn { receive: None });
                };
                let tx = self.side_tx.clone();
                tokio::spawn(async move {
                    let receive = match pg.remote_receive_lsn(&host, port).await {
                        Ok(l) => l.map(|l| l.0),
                        Err(e) => {
                            warn!("switchover target's receive LSN: {e}");
                            None
                        }
                    };
                    let _ = tx.send(Input::TargetLsn { receive });
                });
                None
            }
            Action::HandOver {
                lease,
                to,
                to_lease,
            } => {
                let d = match self.dcs().await {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("hand-over: {e}");
                        return Some(Input::HandedOver { revision: None });
                    }
                };
                let revision = match d.hand_over(LeaseId(lease), &to, LeaseId(to_lease)).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!("hand-over failed: {e}");
                        None
                    }
                };
                Some(Input::HandedOver { revision })
            }
        }
    }

    /// Logs a fact and appends it to the audit log, durably: the action it
    /// precedes in the core's list runs only after the fsync. A lifecycle
    /// record is then queued for etcd's history (never waited for, except
    /// at the very end of a shutdown, see [`Agent::mirror`]).
    async fn record(&mut self, fact: &Fact) {
        match fact {
            Fact::RenewedLate { .. }
            | Fact::LeaseLost { .. }
            | Fact::ArmFailed { .. }
            | Fact::LeadingUnarmed { .. }
            | Fact::StepDownBegun { .. }
            | Fact::StepDownFailed { .. }
            | Fact::NowayoutKeptArmed { .. }
            | Fact::SyncRecorded { fallback: true, .. } => warn!(?fact, "audit"),
            _ => info!(?fact, "audit"),
        }
        self.ops.fact(fact);
        let (rev, ev) = audit_event(fact);
        match self.audit.append(rev, ev) {
            Ok(r) => self.mirror(fact, &r).await,
            Err(e) => error!("audit log write failed: {e}"),
        }
    }

    /// Queues a lifecycle record for etcd's history (after the local fsync).
    /// The writes run in their own task, so fencing never waits on them.
    /// Once shutting down and no longer leading (PostgreSQL stopped, key
    /// released, devices disarmed: nothing left to fence), it waits, bounded,
    /// for the backlog to reach etcd, as the process is about to exit.
    async fn mirror(&mut self, fact: &Fact, r: &audit::Record) {
        if !r.event.is_lifecycle() {
            return;
        }
        let m = match &mut self.mirror {
            Some(m) => {
                m.push(r);
                m
            }
            // Catches up from the local log, which includes `r`.
            None => self.mirror.insert(mirror::Mirror::start(
                &self.cfg.etcd,
                &self.cfg.scope,
                &self.cfg.node,
                self.audit.path(),
                Some(self.ops.metrics.etcd_requests.clone()),
            )),
        };
        if matches!(fact, Fact::Shutdown) {
            m.shutting_down = true;
        }
        if m.shutting_down && matches!(self.core.role(), Role::Follower | Role::Exited) {
            let within = (self.budget.request_timeout * 3).max(Duration::from_secs(1));
            if !m.flush(within).await {
                warn!(
                    pending = m.pending(),
                    "audit records not mirrored to etcd before exit (the local log has them)"
                );
            }
        }
    }

    /// Arms every configured device (rule 2), never after `not_after`: the
    /// evidence that permits arming's first ping runs out then.
    async fn arm(&mut self, not_after: clock::BootTime) -> Input {
        // Devices kept from an earlier term (nowayout) are re-used.
        let mut held = self.pinger.surrender().await;
        let roots = SysRoots::real();
        let mut outcome = ArmOutcome {
            armed: Vec::new(),
            failed: Vec::new(),
        };
        let mut fresh: Vec<Box<dyn Watchdog>> = Vec::new();
        for spec in &self.cfg.watchdog.devices {
            let name = spec_name(spec);
            if clock::now() > not_after {
                outcome
                    .failed
                    .push((name, "evidence went stale before arming".into()));
                continue;
            }
            if let Some(i) = held
                .iter()
                .position(|d| watchdog::same_device(spec, d.info(), &roots))
            {
                let mut d = held.swap_remove(i);
                match d.ping() {
                    Ok(()) => {
                        outcome.armed.push(armed_device(d.as_ref()));
                        fresh.push(d);
                    }
                    Err(e) => {
                        outcome.failed.push((name, format!("ping failed: {e}")));
                        held.push(d);
                    }
                }
                continue;
            }
            match watchdog::arm(spec, &self.budget, self.cfg.watchdog.nowayout, &roots) {
                Ok(d) => {
                    info!(
                        path = %d.info().path.display(), identity = %d.info().identity,
                        w = d.info().w_secs, nowayout = d.info().nowayout, "armed"
                    );
                    outcome.armed.push(armed_device(d.as_ref()));
                    fresh.push(d);
                }
                Err(e) => {
                    error!(device = %name, "cannot arm: {e}");
                    outcome.failed.push((name, e.to_string()));
                }
            }
        }
        fresh.extend(held);
        self.pinger.adopt(fresh);
        Input::Armed(outcome)
    }
}

fn armed_device(d: &dyn Watchdog) -> ArmedDevice {
    let i = d.info();
    ArmedDevice {
        path: i.path.display().to_string(),
        identity: i.identity.clone(),
        w_secs: i.w_secs,
        nowayout: i.nowayout,
    }
}

fn spec_name(spec: &DeviceSpec) -> String {
    match spec {
        DeviceSpec::Device { path } => path.display().to_string(),
        DeviceSpec::Softdog => "softdog".into(),
        DeviceSpec::Fake { record } => format!("fake:{}", record.display()),
    }
}

async fn next_watch(w: &mut Option<dcs::LeaderWatch>) -> Result<dcs::LeaderEvent, String> {
    match w {
        Some(w) => w.next().await.map_err(|e| e.to_string()),
        None => std::future::pending().await,
    }
}

/// Whether the pinger holds lease evidence right now (for `status`).
pub fn evidence_kind(cell: &EvidenceCell) -> &'static str {
    match cell.load() {
        Evidence::None => "none",
        Evidence::Lease(_) => "lease",
        Evidence::Liveness(_) => "liveness",
    }
}

/// PostgreSQL: following the leader (the core decides when; this runs it).
impl Agent {
    /// Starts a stopped PostgreSQL as a standby of `leader` (its member
    /// record's address) or of nobody, in the background, reporting
    /// `StandbyStarted` on the side channel.
    fn start_standby(&mut self, leader: Option<String>) -> Option<Input> {
        let Some(pg) = self.pg.clone() else {
            return Some(Input::StandbyStarted { ok: false });
        };
        let conninfo = leader.as_ref().and_then(|l| {
            let m = self.core.leader_member().filter(|m| &m.node == l)?;
            Some(
                pg.config()
                    .replication_conninfo(m.host.as_ref()?, m.port?, &self.cfg.node),
            )
        });
        let tx = self.side_tx.clone();
        info!(leader = ?leader, "starting PostgreSQL as a standby");
        tokio::spawn(async move {
            let ok = match pg.start_as_standby(conninfo.as_deref()).await {
                Ok(()) => {
                    info!(leader = ?leader, "PostgreSQL started as a standby");
                    true
                }
                Err(e) => {
                    error!("cannot start PostgreSQL as a standby: {e}");
                    false
                }
            };
            let _ = tx.send(Input::StandbyStarted { ok });
        });
        None
    }

    /// Runs PostgreSQL as a replica of `leader` (the core has fenced a
    /// writable server first): stops, rewinds or clones and restarts it in
    /// the background, reporting `Followed` on the side channel.
    fn follow(
        &mut self,
        leader: String,
        clone_from: Option<crate::decide::bootstrap::CloneSource>,
    ) -> Option<Input> {
        let Some(pg) = self.pg.clone() else {
            return Some(Input::Followed { leader, ok: false });
        };
        let Some((host, port)) = self
            .core
            .leader_member()
            .filter(|m| m.node == leader)
            .and_then(|m| Some((m.host.clone()?, m.port?)))
        else {
            warn!(%leader, "the leader has published no PostgreSQL address yet");
            return Some(Input::Followed { leader, ok: false });
        };
        let conninfo = pg
            .config()
            .replication_conninfo(&host, port, &self.cfg.node);
        let source = clone_from.map(|s| {
            info!(%leader, source = %s.node, "an empty data directory is cloned from {} (clonefrom)", s.node);
            (
                s.node,
                pg.config()
                    .replication_conninfo(&s.host, s.port, &self.cfg.node),
            )
        });
        let tx = self.side_tx.clone();
        info!(%leader, %host, port, "following the leader");
        tokio::spawn(async move {
            let r = follow_leader(&pg, &conninfo, source).await;
            let ok = match r {
                Ok(how) => {
                    info!(%leader, "PostgreSQL runs as a replica of {leader} ({how})");
                    true
                }
                Err(e) => {
                    error!(%leader, "cannot follow {leader}: {e}");
                    false
                }
            };
            let _ = tx.send(Input::Followed { leader, ok });
        });
        None
    }
}

/// Maintenance requests (the core decides which; this runs them).
impl Agent {
    /// Runs a request in the background, reporting `OpDone` on the side
    /// channel; `leader`'s address from its member record.
    fn run_op(
        &mut self,
        id: String,
        op: crate::decide::Op,
        leader: Option<String>,
        clone_from: Option<crate::decide::bootstrap::CloneSource>,
    ) -> Option<Input> {
        let Some(pg) = self.pg.clone() else {
            let detail = "this node manages no PostgreSQL".into();
            return Some(Input::OpDone {
                id,
                ok: false,
                detail,
            });
        };
        let conninfo = leader.as_ref().and_then(|l| {
            let m = self.core.leader_member().filter(|m| &m.node == l)?;
            Some(
                pg.config()
                    .replication_conninfo(m.host.as_ref()?, m.port?, &self.cfg.node),
            )
        });
        let source = clone_from.map(|s| {
            let c = pg
                .config()
                .replication_conninfo(&s.host, s.port, &self.cfg.node);
            (s.node, c)
        });
        let tx = self.side_tx.clone();
        info!(%id, op = op.as_str(), leader = ?leader, source = ?source.as_ref().map(|s| &s.0), "running the request");
        tokio::spawn(async move {
            let (ok, detail) = match maintenance::run_op(&pg, op, conninfo.as_deref(), source).await
            {
                Ok(d) => (true, d),
                Err(e) => (false, e),
            };
            if ok {
                info!(%id, "request done: {detail}");
            } else {
                error!(%id, "request failed: {detail}");
            }
            let _ = tx.send(Input::OpDone { id, ok, detail });
        });
        None
    }
}

/// The start-up refusal: a distribution unit (`postgresql@V-C`) that
/// manages the same data directory could start a former primary writable
/// after a reset; `conflict` (`postgres::distro_unit_conflict`) names it and
/// the fix.
fn refuse_distro_unit(
    data_dir: &std::path::Path,
    conflict: impl Fn(&std::path::Path) -> Option<String>,
) -> Result<(), String> {
    match conflict(data_dir) {
        Some(c) => Err(format!("postgres: {c}")),
        None => Ok(()),
    }
}

/// A planned step-down: a fast shutdown (`Pg::stop_for_switchover`) bounded
/// by `within` as a whole (the core's budget: it ends before the demotion
/// deadline), else the fence. `Ok` only for a confirmed stop.
async fn switchover(pg: &Pg, within: Duration, fence: FenceFn) -> Result<String, String> {
    let pg_within = within
        .saturating_sub(Duration::from_secs(2))
        .max(Duration::from_secs(1));
    match tokio::time::timeout(within, pg.stop_for_switchover(pg_within)).await {
        Ok(Ok(pgsql::Switchover::Fast { took })) => Ok(format!(
            "PostgreSQL stopped (fast shutdown, checkpoint sent to the standbys) in {:.3} s",
            took.as_secs_f64()
        )),
        Ok(Ok(pgsql::Switchover::Fenced(r))) => Ok(format!(
            "PostgreSQL stopped ({}, the fast shutdown did not finish) in {:.3} s",
            audit::stop_how(r.how),
            r.took.as_secs_f64()
        )),
        Ok(Err(e)) => {
            warn!("switchover stop failed ({e}); fencing");
            fence_now(fence).await
        }
        Err(_) => {
            warn!(?within, "switchover stop ran out of time; fencing");
            fence_now(fence).await
        }
    }
}

async fn fence_now(fence: FenceFn) -> Result<String, String> {
    tokio::task::spawn_blocking(move || fence())
        .await
        .unwrap_or_else(|e| Err(format!("fence task failed: {e}")))
}

/// Stops a running replica cleanly, then clones an empty data directory
/// (from `source` when given: a member tagged `clonefrom`, else the leader)
/// or rewinds an existing one, and starts it as a standby of `conninfo`.
async fn follow_leader(
    pg: &Pg,
    conninfo: &str,
    source: Option<(String, String)>,
) -> Result<String, String> {
    if pg.live_postmaster().is_some() {
        pg.stop_clean().await.map_err(|e| format!("stop: {e}"))?;
    }
    match pg.data_dir_state().map_err(|e| e.to_string())? {
        pgsql::DataDirState::Missing | pgsql::DataDirState::Empty => {
            let (from, from_conninfo) = match &source {
                Some((node, c)) => (node.as_str(), c.as_str()),
                None => ("the leader", conninfo),
            };
            let took = pg
                .clone_from(from_conninfo)
                .await
                .map_err(|e| format!("clone from {from}: {e}"))?;
            pg.start_as_replica(conninfo)
                .await
                .map_err(|e| format!("start: {e}"))?;
            Ok(format!("cloned from {from} in {took:?}"))
        }
        _ => {
            let r = pg
                .rejoin(conninfo)
                .await
                .map_err(|e| format!("rejoin: {e}"))?;
            Ok(format!("{r:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_refuses_a_distribution_unit_for_the_same_data_directory_and_names_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let data = "/var/lib/postgresql/15/main";
        let etc = root.path().join("etc/postgresql/15/main");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("postgresql.conf"), "port = 5432\n").unwrap();
        std::fs::write(etc.join("start.conf"), "auto\n").unwrap();
        let in_root =
            |d: &std::path::Path| pgsql::distro_unit_conflict_in(root.path(), d, &|_| Some(false));
        let e = refuse_distro_unit(std::path::Path::new(data), in_root).unwrap_err();
        assert!(e.starts_with("postgres: postgresql@15-main.service"), "{e}");
        assert!(
            e.contains("systemctl disable --now postgresql@15-main"),
            "{e}"
        );
        assert!(e.contains("start_conf manual"), "{e}");
        // Host tests' temporary data directories: no distribution cluster.
        assert_eq!(
            refuse_distro_unit(std::path::Path::new("/tmp/x/data"), in_root),
            Ok(())
        );
        std::fs::write(etc.join("start.conf"), "manual\n").unwrap();
        assert_eq!(
            refuse_distro_unit(std::path::Path::new(data), in_root),
            Ok(())
        );
    }

    #[test]
    fn only_sigterm_and_sigint_stop_the_agent() {
        for sig in HANDLED_SIGNALS {
            let stops = matches!(signal_meaning(sig), SignalMeaning::Shutdown);
            assert_eq!(stops, sig == libc::SIGTERM || sig == libc::SIGINT, "{sig}");
        }
        assert_eq!(
            signal_meaning(libc::SIGHUP),
            SignalMeaning::Note("SIGHUP: reload not supported; restart to apply")
        );
    }
}
