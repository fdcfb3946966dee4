//! The scope's cluster-wide settings (`config::cluster`), read from etcd
//! every [`CONFIG_EVERY_LOOPS`] loops by a task of its own with its own
//! connection (never on the renewal path). A new value is validated as the
//! TOML is (applied to this node's configuration: budget feasibility,
//! parameter names against the installed PostgreSQL); if good, the core
//! gets the loop interval, lag bound and synchronous mode
//! (`Input::ClusterSettings`) and PostgreSQL's files are rewritten and
//! reloaded (`agent::pgconf`). A malformed value is logged with its cause
//! once per revision, and the last good settings stay in force.

use crate::config::cluster::ClusterConfig;
use crate::config::Config;
use crate::dcs::Dcs;
use crate::decide::Input;
use crate::postgres::Pg;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Loops between two reads of the key.
pub const CONFIG_EVERY_LOOPS: u32 = 5;

/// Starts the task (call inside the runtime).
pub fn start(
    cfg: Config,
    pg: Option<Pg>,
    requests: Arc<AtomicU64>,
    out: mpsc::UnboundedSender<Input>,
) {
    tokio::spawn(run(cfg, pg, requests, out));
}

async fn run(
    cfg: Config,
    pg: Option<Pg>,
    requests: Arc<AtomicU64>,
    out: mpsc::UnboundedSender<Input>,
) {
    let every = Duration::from_secs_f64(cfg.timing.loop_interval) * CONFIG_EVERY_LOOPS;
    let mut dcs: Option<Dcs> = None;
    let mut seen = -1i64;
    loop {
        if dcs.is_none() {
            match Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node).await {
                Ok(mut d) => {
                    d.count_requests(requests.clone());
                    dcs = Some(d);
                }
                Err(e) => warn!("cluster config: etcd unreachable: {e}"),
            }
        }
        if let Some(d) = dcs.as_mut() {
            match d.cluster_config().await {
                Ok((value, revision)) if revision != seen => {
                    seen = revision;
                    let parsed = match &value {
                        None => Ok(ClusterConfig::default()),
                        Some(v) => ClusterConfig::from_json(v),
                    };
                    match parsed {
                        Ok(c) => apply(&cfg, pg.as_ref(), &c, revision, &out).await,
                        Err(e) => error!(
                            revision,
                            "the scope's cluster config in etcd is malformed ({e}); keeping \
                             the last good settings (fix it with leasedog edit-config --file)"
                        ),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!("cluster config: cannot read it: {e}");
                    dcs = None;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn apply(
    cfg: &Config,
    pg: Option<&Pg>,
    c: &ClusterConfig,
    revision: i64,
    out: &mpsc::UnboundedSender<Input>,
) {
    let applied = match c.apply_to(cfg) {
        Ok(a) => a,
        Err(e) => {
            error!(
                revision,
                "the scope's cluster config is refused here ({e}); keeping the last good settings"
            );
            return;
        }
    };
    if let Some(pg) = pg {
        let previous = pg.cluster_parameters();
        pg.set_cluster_parameters(c.parameters.clone());
        if let Err(e) = pg.check_parameters(&pg.parameters()).await {
            error!(
                revision,
                "the scope's cluster config is refused here ({e}); keeping the last good settings"
            );
            pg.set_cluster_parameters(previous);
            return;
        }
        super::pgconf::apply(pg).await;
    }
    let budget = match applied.budget() {
        Ok(b) => b,
        Err(e) => {
            error!(revision, "cluster config: {e}");
            return;
        }
    };
    let (lag, sync) = applied.postgres.as_ref().map_or((0, false), |p| {
        (p.maximum_lag_on_failover, p.synchronous_mode)
    });
    info!(revision, loop_interval = ?budget.loop_interval, maximum_lag_on_failover = lag, synchronous_mode = sync, "cluster config applied");
    let _ = out.send(Input::ClusterSettings {
        loop_interval: budget.loop_interval,
        maximum_lag_on_failover: lag,
        synchronous_mode: sync,
    });
}
