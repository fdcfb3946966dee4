//! What the main loop tells the outside: systemd (sd_notify) and the
//! metrics/status endpoint. Hooks only: it observes inputs, facts and the
//! core's state, and decides nothing.

use crate::config::Config;
use crate::decide::{Core, Fact, Input, KeyHolder, PgView, Role};
use crate::health::PgState;
use crate::metrics::{self, ArmedInfo, Metrics};
use crate::notify::Notifier;
use crate::timing::Budget;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tracing::{info, warn};

/// Start-up check, made while the agent still has the privileges to see
/// every process (the holder scan reads other processes' `/proc/PID/fd`):
/// warns, with the fix, about each configured device another process holds
/// open (systemd's RuntimeWatchdogSec, the watchdog daemon, sbd, corosync).
/// Arming refuses such a device later anyway; after the capability drop the
/// scan there may no longer see a privileged holder, so it is named here.
pub fn startup_conflicts(cfg: &Config) -> Vec<String> {
    use crate::config::DeviceSpec;
    use crate::watchdog::{self, SysRoots};
    let roots = SysRoots::real();
    let mut out = Vec::new();
    for spec in &cfg.watchdog.devices {
        let resolved = match spec {
            DeviceSpec::Device { path } => watchdog::resolve_path(path, &roots),
            DeviceSpec::Softdog => watchdog::resolve_softdog(&roots),
            DeviceSpec::Fake { .. } => continue,
        };
        let Ok(dev) = resolved else { continue };
        for h in watchdog::sysfs::holders(&dev.aliases(&roots), &roots) {
            let msg = format!(
                "watchdog {} is held open by {h}: {}; arming it will fail",
                dev.path.display(),
                h.fix()
            );
            warn!("{msg}");
            out.push(msg);
        }
    }
    out
}

pub struct Ops {
    pub metrics: Arc<Metrics>,
    notify: Notifier,
    ready: bool,
}

impl Ops {
    /// Creates the shared metrics and starts the endpoint if configured.
    /// A configured endpoint that cannot bind is fatal: the operator asked
    /// for it and monitoring would silently see nothing.
    pub fn start(cfg: &Config, budget: &Budget) -> Result<Ops, String> {
        let metrics = Arc::new(Metrics::new(
            &cfg.node,
            &cfg.scope,
            crate::timing::target_timeout(budget) as u64,
        ));
        if let Some(listen) = &cfg.health.listen {
            let (m, b) = (metrics.clone(), *budget);
            let addr = crate::health::serve(
                listen,
                Arc::new(move || m.health_snapshot(crate::clock::now(), &b)),
            )
            .map_err(|e| format!("health.listen {listen}: cannot listen: {e}"))?;
            info!(%addr, "health endpoints: /primary /replica /read-only /leader /health");
        }
        if let Some(listen) = &cfg.metrics.listen {
            let addr = metrics::serve(listen, metrics.clone())
                .map_err(|e| format!("metrics.listen {listen}: cannot listen: {e}"))?;
            info!(%addr, "metrics endpoint: /metrics and /status");
        }
        let notify = Notifier::from_env();
        if let Some(w) = notify.watchdog_interval() {
            info!(interval = ?w, "systemd watchdog: WATCHDOG=1 from every loop");
            if w < budget.loop_interval * 2 {
                warn!(
                    "systemd's WatchdogSec ({w:?}) is under two loop intervals ({:?}): \
                     a slow loop gets the agent killed",
                    budget.loop_interval
                );
            }
        }
        Ok(Ops {
            metrics,
            notify,
            ready: false,
        })
    }

    /// Every observation fed to the core (renewal round trips).
    pub fn input(&self, input: &Input) {
        match input {
            Input::Renewed { sent, .. } => self
                .metrics
                .renewal_rtt
                .observe(crate::clock::now().saturating_since(*sent)),
            Input::RenewFailed { .. } => {
                self.metrics.renewal_failures.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }

    /// Every fact the core records (step-downs, armed devices).
    pub fn fact(&self, fact: &Fact) {
        match fact {
            Fact::StepDownBegun { .. } => {
                self.metrics.step_downs.fetch_add(1, Relaxed);
            }
            Fact::Armed(d) => self.metrics.add_armed(ArmedInfo {
                path: d.path.clone(),
                w_s: d.w_secs,
                nowayout: d.nowayout,
            }),
            Fact::Disarmed => {
                let keep: Vec<String> = self
                    .metrics
                    .armed()
                    .into_iter()
                    .filter(|a| a.nowayout)
                    .map(|a| a.path)
                    .collect();
                self.metrics.keep_armed(&keep);
            }
            Fact::NowayoutKeptArmed { devices } => self.metrics.keep_armed(devices),
            _ => {}
        }
    }

    /// After every main-loop iteration and every handled event: publishes
    /// the core's state, tells systemd (READY=1 the first time, STATUS= on
    /// change). `looped`: a full loop ran (WATCHDOG=1, loop count).
    pub fn after(&mut self, core: &Core, looped: bool) {
        let holder = match core.holder() {
            KeyHolder::Nobody => None,
            KeyHolder::Unknown => None,
            KeyHolder::Us => Some(self.metrics.node.clone()),
            KeyHolder::Other(n) => Some(n.clone()),
            KeyHolder::Garbage => Some("(not a leasedog record)".into()),
        };
        let leader = *core.holder() == KeyHolder::Us
            && matches!(core.role(), Role::Arming | Role::Promoting | Role::Leader);
        let changed =
            self.metrics
                .set_state(core.role().as_str(), holder, leader, core.last_fresh());
        self.metrics
            .set_postgres(pg_state(core.pg_view()), lag_bytes(core));
        if looped {
            self.metrics.loops.fetch_add(1, Relaxed);
            self.notify.watchdog();
        }
        if !self.ready {
            self.ready = true;
            self.notify.ready(&self.metrics.summary());
        } else if changed {
            self.notify.status(&self.metrics.summary());
        }
    }

    pub fn stopping(&self) {
        self.notify.stopping();
    }
}

/// The health endpoints' word for PostgreSQL's state.
fn pg_state(v: &PgView) -> PgState {
    match v {
        PgView::Unmanaged => PgState::Unknown,
        PgView::Down => PgState::Down,
        PgView::Primary => PgState::Primary,
        PgView::Replica { .. } => PgState::Replica,
        PgView::Busy => PgState::Busy,
    }
}

/// A replica's lag behind the leader's last published LSN, in bytes.
fn lag_bytes(core: &Core) -> Option<u64> {
    let own = core.member()?.lsn?;
    let leader = core.leader_member()?.lsn?;
    Some(leader.saturating_sub(own))
}
