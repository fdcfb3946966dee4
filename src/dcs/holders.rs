//! The leader key's retained history before a win: which leases held the
//! key that the winner may never have seen (its watch lagged behind a
//! deletion, or it started after one). A deletion is not an expiry
//! (docs/fencing.md): the core promotes only once each of them is gone.

use super::{Dcs, DcsError, LeaseId};
use etcd_client::{EventType, WatchOptions};
use std::collections::BTreeSet;

/// The outcome of [`Dcs::previous_holders`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousHolders {
    /// Every lease the key was put on, or was on when deleted, in the range
    /// read (ascending, without repeats; lease 0 left out).
    pub leases: Vec<LeaseId>,
    /// False when etcd had compacted part of the range asked for (the
    /// leases there are unknown) or a deletion came without its previous
    /// value.
    pub complete: bool,
    /// etcd's compaction bound, when it cut the range.
    pub compacted: Option<i64>,
}

impl Dcs {
    /// The leases that held the leader key between store revisions `from`
    /// and `before` (exclusive; pass the winning revision), read from etcd's
    /// history of the key: a watch from `from` with previous values, whose
    /// events stop at `before` (our own put). If `from` was compacted, etcd
    /// cancels the watch with its compaction bound; the read goes on from
    /// there and the answer is marked incomplete. The whole read runs under
    /// one request deadline (a watch stream has none of its own).
    pub async fn previous_holders(
        &mut self,
        from: i64,
        before: i64,
    ) -> Result<PreviousHolders, DcsError> {
        self.count();
        let key = self.leader_key.clone();
        let mut wc = self.client.watch_client();
        let endpoints = self.endpoints.clone();
        let failed = |cause: String| DcsError::Failed {
            op: "read leader history",
            endpoints: endpoints.clone(),
            cause,
        };
        let read = async {
            let mut out = PreviousHolders {
                leases: Vec::new(),
                complete: true,
                compacted: None,
            };
            let mut leases = BTreeSet::new();
            let mut start = from.max(1);
            'watch: while start < before {
                let opts = WatchOptions::new()
                    .with_prev_key()
                    .with_start_revision(start);
                let mut s = wc
                    .watch(key.clone(), Some(opts))
                    .await
                    .map_err(|e| self.error("read leader history", e))?;
                loop {
                    let m = s
                        .message()
                        .await
                        .map_err(|e| self.error("read leader history", e))?
                        .ok_or_else(|| failed("watch stream closed by etcd".into()))?;
                    if m.compact_revision() > 0 {
                        // ErrCompacted: the history starts at the bound now.
                        out.complete = false;
                        out.compacted = Some(m.compact_revision());
                        start = m.compact_revision().max(start + 1);
                        continue 'watch;
                    }
                    if m.canceled() {
                        return Err(failed(format!(
                            "watch canceled by etcd: {}",
                            m.cancel_reason()
                        )));
                    }
                    for e in m.events() {
                        let Some(kv) = e.kv() else { continue };
                        if kv.mod_revision() >= before {
                            break 'watch;
                        }
                        let lease = match e.event_type() {
                            EventType::Put => Some(kv.lease()),
                            EventType::Delete => e.prev_kv().map(|p| p.lease()),
                        };
                        match lease {
                            Some(0) => {}
                            Some(l) => {
                                leases.insert(l);
                            }
                            None => out.complete = false,
                        }
                    }
                }
            }
            out.leases = leases.into_iter().map(LeaseId).collect();
            Ok(out)
        };
        match tokio::time::timeout(self.request_timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(DcsError::Timeout {
                op: "read leader history",
                after: self.request_timeout,
                endpoints: self.endpoints.clone(),
            }),
        }
    }
}
