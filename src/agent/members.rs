//! Member records in etcd: the record type and its cadence are the core's
//! (`decide::member`); this is the I/O, in a task of its own with its own
//! etcd connection, so that a slow etcd never delays the renewal loop.
//! The `sync` key's write and the candidates read before a race
//! (`decide::sync`) go through the same task.

pub use crate::decide::member::{Member, LSN_EVERY_LOOPS};

use crate::config::EtcdConfig;
use crate::dcs::{Dcs, LeaseId};
use crate::decide::switchover::Answer;
use crate::decide::sync::SyncState;
use crate::decide::Input;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

enum Cmd {
    Publish { lease: i64, member: Member },
    Read { leader: String },
    WriteSync { lease: i64, state: SyncState },
    Candidates,
    ReadSwitchover,
    Answer(Answer),
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

    /// Answered by `SyncWritten`.
    pub fn write_sync(&self, lease: i64, state: SyncState) {
        let _ = self.tx.send(Cmd::WriteSync { lease, state });
    }

    /// Answered by `Candidates`.
    pub fn candidates(&self) {
        let _ = self.tx.send(Cmd::Candidates);
    }

    /// Answered with `SwitchoverSeen` (see `read_switchover`).
    pub fn read_switchover(&self) {
        let _ = self.tx.send(Cmd::ReadSwitchover);
    }

    /// Best effort: a lost answer leaves the CLI to time out.
    pub fn answer_switchover(&self, answer: Answer) {
        let _ = self.tx.send(Cmd::Answer(answer));
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
            Cmd::WriteSync { lease, state } => {
                let ok = match dcs.as_mut() {
                    None => false,
                    Some(d) => {
                        let json = serde_json::to_string(&state).expect("sync state serializes");
                        match d.write_sync(LeaseId(lease), &json).await {
                            Ok(true) => {
                                info!(members = ?state.members, quorum = state.quorum, "synchronous set recorded in etcd");
                                true
                            }
                            Ok(false) => {
                                warn!("the sync key not written: the leader key is no longer ours");
                                false
                            }
                            Err(e) => {
                                warn!("cannot write the sync key: {e}");
                                false
                            }
                        }
                    }
                };
                Input::SyncWritten { state, ok }
            }
            Cmd::Candidates => match dcs.as_mut().map(|d| d.candidates()) {
                None => Input::Candidates {
                    sync: None,
                    members: Vec::new(),
                    ok: false,
                },
                Some(f) => match f.await {
                    Ok((raw, members)) => {
                        // An unreadable sync key is no permission: not ok,
                        // so the race waits for a readable one.
                        let sync = raw.map(|r| serde_json::from_slice::<SyncState>(&r));
                        let ok = !matches!(sync, Some(Err(_)));
                        if let Some(Err(e)) = &sync {
                            warn!("unreadable sync key: {e}");
                        }
                        Input::Candidates {
                            sync: sync.and_then(Result::ok),
                            members: members
                                .iter()
                                .filter_map(|(v, rev)| {
                                    serde_json::from_slice::<Member>(v).ok().map(|m| (m, *rev))
                                })
                                .collect(),
                            ok,
                        }
                    }
                    Err(e) => {
                        warn!("cannot read the candidates: {e}");
                        Input::Candidates {
                            sync: None,
                            members: Vec::new(),
                            ok: false,
                        }
                    }
                },
            },
            Cmd::ReadSwitchover => match dcs.as_mut() {
                Some(d) => read_switchover(d).await,
                None => no_switchover(),
            },
            Cmd::Answer(answer) => {
                if let Some(d) = dcs.as_mut() {
                    if let Err(e) = d.put_switchover_answer(&answer).await {
                        warn!("cannot write the switchover answer: {e}");
                    }
                }
                continue;
            }
        };
        if out.send(reply).is_err() {
            return;
        }
    }
}

fn no_switchover() -> Input {
    Input::SwitchoverSeen {
        request: None,
        target: None,
        paused: false,
        unix_now: 0,
    }
}

/// The request, the target's record with its lease, and the pause key. Any
/// failure reads as "no request" (asked again at the next loop).
async fn read_switchover(d: &mut Dcs) -> Input {
    let request = match d.switchover_request().await {
        Ok(Some(r)) => r,
        Ok(None) => return no_switchover(),
        Err(e) => {
            warn!("cannot read the switchover request: {e}");
            return no_switchover();
        }
    };
    let target = match d.member_with_lease(&request.to).await {
        Ok(Some((raw, lease))) => serde_json::from_slice::<Member>(&raw)
            .ok()
            .map(|m| (m, lease)),
        Ok(None) => None,
        Err(e) => {
            warn!("cannot read the switchover target's record: {e}");
            return no_switchover();
        }
    };
    let paused = match d.paused().await {
        Ok(p) => p,
        Err(e) => {
            warn!("cannot read the pause key: {e}");
            return no_switchover();
        }
    };
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Input::SwitchoverSeen {
        request: Some(request),
        target,
        paused,
        unix_now,
    }
}
