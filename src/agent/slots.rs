//! Runs `Action::ReadMembers` and `Action::SyncSlots` (the core decides,
//! `decide::slots`) in a task of its own with its own etcd connection, so
//! neither a prefix read nor PostgreSQL's answer ever delays a renewal.
//! Outcomes come back on the agent's side channel.

use crate::config::EtcdConfig;
use crate::dcs::Dcs;
use crate::decide::{Input, Member};
use crate::postgres::Pg;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub enum Cmd {
    ReadMembers,
    Sync(Vec<String>),
}

pub struct SlotIo {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl SlotIo {
    /// Starts the task (call inside the runtime).
    pub fn start(
        etcd: &EtcdConfig,
        scope: &str,
        node: &str,
        pg: Option<Pg>,
        requests: Arc<AtomicU64>,
        out: mpsc::UnboundedSender<Input>,
    ) -> SlotIo {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(
            etcd.clone(),
            scope.to_owned(),
            node.to_owned(),
            pg,
            requests,
            rx,
            out,
        ));
        SlotIo { tx }
    }

    pub fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
    }
}

async fn run(
    etcd: EtcdConfig,
    scope: String,
    node: String,
    pg: Option<Pg>,
    requests: Arc<AtomicU64>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    out: mpsc::UnboundedSender<Input>,
) {
    let mut dcs: Option<Dcs> = None;
    while let Some(cmd) = rx.recv().await {
        let reply = match cmd {
            Cmd::ReadMembers => {
                if dcs.is_none() {
                    match Dcs::connect(&etcd, &scope, &node).await {
                        Ok(mut d) => {
                            d.count_requests(requests.clone());
                            dcs = Some(d);
                        }
                        Err(e) => warn!("member listing: etcd unreachable: {e}"),
                    }
                }
                // Unanswered, the core would never ask again: a failure is
                // answered as one.
                let failed = Input::SlotsSynced {
                    wanted: Vec::new(),
                    ok: false,
                };
                let Some(d) = dcs.as_mut() else {
                    if out.send(failed).is_err() {
                        return;
                    }
                    continue;
                };
                match d.members().await {
                    Ok(m) => Input::MembersSeen {
                        members: m
                            .into_iter()
                            .filter_map(|(_, raw)| serde_json::from_slice::<Member>(&raw).ok())
                            .collect(),
                    },
                    Err(e) => {
                        warn!("cannot list the members: {e}");
                        dcs = None;
                        // Answered, so the core asks again at its cadence.
                        failed
                    }
                }
            }
            Cmd::Sync(wanted) => {
                let ok = match &pg {
                    None => false,
                    Some(pg) => match pg.sync_physical_slots(&wanted).await {
                        Ok((created, dropped)) => {
                            if !created.is_empty() || !dropped.is_empty() {
                                info!(?created, ?dropped, "replication slots synced");
                            }
                            true
                        }
                        Err(e) => {
                            warn!("replication slots: {e}");
                            false
                        }
                    },
                };
                Input::SlotsSynced { wanted, ok }
            }
        };
        if out.send(reply).is_err() {
            return;
        }
    }
}
