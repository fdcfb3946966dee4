//! Member records in etcd: the record type and its cadence are the core's
//! (`decide::member`); this is the I/O, in a task of its own with its own
//! etcd connection, so that a slow etcd never delays the renewal loop.

pub use crate::decide::member::{Member, LSN_EVERY_LOOPS};

use crate::config::EtcdConfig;
use crate::dcs::{Dcs, LeaseId};
use crate::decide::Input;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

enum Cmd {
    Publish { lease: i64, member: Member },
    Read { leader: String },
}

/// The main loop's handle on the member task. Every command is answered
/// with an input on the agent's side channel (`MemberPublished`,
/// `LeaderMember`), success or not.
pub struct MemberIo {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl MemberIo {
    /// Starts the task (call inside the runtime).
    pub fn start(
        etcd: &EtcdConfig,
        scope: &str,
        node: &str,
        requests: Arc<AtomicU64>,
        out: mpsc::UnboundedSender<Input>,
    ) -> MemberIo {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(
            etcd.clone(),
            scope.to_owned(),
            node.to_owned(),
            requests,
            rx,
            out,
        ));
        MemberIo { tx }
    }

    pub fn publish(&self, lease: i64, member: Member) {
        let _ = self.tx.send(Cmd::Publish { lease, member });
    }

    pub fn read(&self, leader: String) {
        let _ = self.tx.send(Cmd::Read { leader });
    }
}

async fn run(
    etcd: EtcdConfig,
    scope: String,
    node: String,
    requests: Arc<AtomicU64>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    out: mpsc::UnboundedSender<Input>,
) {
    let mut dcs: Option<Dcs> = None;
    while let Some(cmd) = rx.recv().await {
        if dcs.is_none() {
            match Dcs::connect(&etcd, &scope, &node).await {
                Ok(mut d) => {
                    d.count_requests(requests.clone());
                    info!("member records: connected to etcd");
                    dcs = Some(d);
                }
                Err(e) => warn!("member records: etcd unreachable: {e}"),
            }
        }
        let reply = match cmd {
            Cmd::Publish { lease, member } => {
                let ok = match dcs.as_mut() {
                    None => false,
                    Some(d) => {
                        let json = serde_json::to_string(&member).expect("member serializes");
                        match d.put_member(LeaseId(lease), &json).await {
                            Ok(()) => true,
                            Err(e) => {
                                warn!("cannot publish the member record: {e}");
                                false
                            }
                        }
                    }
                };
                Input::MemberPublished { member, ok }
            }
            Cmd::Read { leader } => {
                let member = match dcs.as_mut() {
                    None => None,
                    Some(d) => match d.get_member(&leader).await {
                        Ok(Some(raw)) => match serde_json::from_slice::<Member>(&raw) {
                            Ok(m) => Some(m),
                            Err(e) => {
                                warn!(%leader, "unreadable member record: {e}");
                                None
                            }
                        },
                        Ok(None) => None, // gone with its lease
                        Err(e) => {
                            warn!(%leader, "cannot read the leader's member record: {e}");
                            None
                        }
                    },
                };
                Input::LeaderMember { leader, member }
            }
        };
        if out.send(reply).is_err() {
            return;
        }
    }
}
