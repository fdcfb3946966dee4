//! Maintenance I/O, deciding nothing (`decide::pause` decides): a task with
//! its own etcd connection reads the scope's pause key and this node's
//! request key every other loop (one etcd transaction) and feeds `Input::Paused` /
//! `Input::OpRequested`; it writes outcomes back (`Action::ReportOp`).
//! Requests run in tasks of their own (`run_op`), reporting `Input::OpDone`.

use crate::config::EtcdConfig;
use crate::dcs::{Dcs, OpOutcome};
use crate::decide::{Input, Op};
use crate::postgres::{DataDirState, Pg};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The main loop's handle on the maintenance task.
pub struct MaintenanceIo {
    tx: mpsc::UnboundedSender<OpOutcome>,
}

impl MaintenanceIo {
    /// Starts the task (call inside the runtime); it polls every `every`
    /// (one etcd request each).
    pub fn start(
        etcd: &EtcdConfig,
        scope: &str,
        node: &str,
        every: Duration,
        requests: Arc<AtomicU64>,
        out: mpsc::UnboundedSender<Input>,
    ) -> MaintenanceIo {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(poll(
            etcd.clone(),
            scope.to_owned(),
            node.to_owned(),
            every,
            requests,
            rx,
            out,
        ));
        MaintenanceIo { tx }
    }

    pub fn report(&self, outcome: OpOutcome) {
        let _ = self.tx.send(outcome);
    }
}

async fn poll(
    etcd: EtcdConfig,
    scope: String,
    node: String,
    every: Duration,
    requests: Arc<AtomicU64>,
    mut rx: mpsc::UnboundedReceiver<OpOutcome>,
    out: mpsc::UnboundedSender<Input>,
) {
    let mut dcs: Option<Dcs> = None;
    let mut last_id: Option<String> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let report = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => Some(r),
                None => return,
            },
            _ = tick.tick() => None,
        };
        if dcs.is_none() {
            match Dcs::connect(&etcd, &scope, &node).await {
                Ok(mut d) => {
                    d.count_requests(requests.clone());
                    dcs = Some(d);
                }
                Err(e) => {
                    warn!("maintenance: etcd unreachable: {e}");
                    if let Some(r) = report {
                        warn!(id = %r.id, "maintenance: outcome not written: {}", r.detail);
                    }
                    continue;
                }
            }
        }
        let d = dcs.as_mut().expect("connected above");
        if let Some(r) = report {
            match d.put_result(&node, &r).await {
                Ok(()) => info!(id = %r.id, ok = r.ok, "request outcome written: {}", r.detail),
                Err(e) => warn!(id = %r.id, "cannot write the request's outcome: {e}"),
            }
            continue;
        }
        // An unanswered read leaves the core's view as it was.
        let (pause, request) = match d.maintenance_state(&node).await {
            Ok(v) => v,
            Err(e) => {
                warn!("maintenance: cannot read the pause and request keys: {e}");
                continue;
            }
        };
        if out
            .send(Input::Paused {
                paused: pause.is_some(),
            })
            .is_err()
        {
            return;
        }
        match request {
            Some(Ok(req)) if last_id.as_ref() != Some(&req.id) => {
                last_id = Some(req.id.clone());
                match Op::parse(&req.op) {
                    Ok(op) => {
                        info!(id = %req.id, op = op.as_str(), "request received");
                        if out.send(Input::OpRequested { id: req.id, op }).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let r = OpOutcome {
                            id: req.id,
                            ok: false,
                            detail: e,
                        };
                        if let Err(e) = d.put_result(&node, &r).await {
                            warn!("cannot write the request's outcome: {e}");
                        }
                    }
                }
            }
            Some(Err(e)) => warn!("maintenance: unreadable request for this node: {e}"),
            _ => {}
        }
    }
}

/// Runs one request on this node's PostgreSQL. `Restart`: a fast stop,
/// then the only start there is, as a standby (of `conninfo`, else of
/// nobody: a leader's core promotes it again). `Reinit`: a fast stop, the
/// data directory emptied, `pg_basebackup` from `source` (a member tagged
/// `clonefrom`: its name and conninfo) or else `conninfo`, a start as the
/// standby of `conninfo`. `Ok` carries what happened, for the outcome.
pub async fn run_op(
    pg: &Pg,
    op: Op,
    conninfo: Option<&str>,
    source: Option<(String, String)>,
) -> Result<String, String> {
    match op {
        Op::Restart => {
            let t0 = std::time::Instant::now();
            pg.stop_clean().await.map_err(|e| format!("stop: {e}"))?;
            pg.start_as_standby(conninfo)
                .await
                .map_err(|e| format!("start: {e}"))?;
            Ok(format!(
                "PostgreSQL restarted as a standby of {} in {:.1} s",
                if conninfo.is_some() {
                    "the leader"
                } else {
                    "nobody (to be promoted)"
                },
                t0.elapsed().as_secs_f64()
            ))
        }
        Op::Reinit => {
            let conninfo = conninfo.ok_or("no leader address to clone from")?;
            pg.stop_clean().await.map_err(|e| format!("stop: {e}"))?;
            if pg.live_postmaster().is_some() {
                return Err("PostgreSQL still runs after the stop: data directory kept".into());
            }
            empty_dir(pg.data_dir())
                .map_err(|e| format!("cannot empty {}: {e}", pg.data_dir().display()))?;
            if !matches!(
                pg.data_dir_state().map_err(|e| e.to_string())?,
                DataDirState::Empty | DataDirState::Missing
            ) {
                return Err("the data directory is not empty after the wipe".into());
            }
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
            Ok(format!(
                "data directory re-cloned from {from} in {:.1} s; streaming from the leader",
                took.as_secs_f64()
            ))
        }
    }
}

/// Removes everything inside `dir` (the directory itself stays: its owner
/// and mode are the operator's).
fn empty_dir(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}
