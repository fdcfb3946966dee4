//! The lease and the leader key: grant, keepalive, acquire by
//! transaction, release, revoke, time-to-live, and the leader watch.

use super::{cause_chain, Dcs, DcsError, Holder, KeepAlive, LeaderValueIn, LeaseId};
use etcd_client::{
    Compare, CompareOp, EventType, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
    WatchStream,
};
use std::collections::VecDeque;

/// The outcome of one keepalive.
#[derive(Debug)]
pub enum Renewal {
    /// etcd acknowledged it; the lease has `ttl` seconds left from now.
    Acked { ttl: i64 },
    /// The lease no longer exists (expired or revoked): TTL <= 0.
    Gone,
    /// No acknowledgement within the deadline, or the stream broke.
    Failed(DcsError),
}

/// The outcome of [`Dcs::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// We created the leader key at `revision`.
    Won { revision: i64 },
    /// The key exists; `revision` is the store revision it was read at.
    Held { holder: Holder, revision: i64 },
}

/// The outcome of [`Dcs::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The transaction deleted the key (it was ours, on `lease`, until then).
    pub deleted: bool,
    /// The store revision of the transaction: the deletion's when `deleted`.
    pub revision: i64,
}

/// A change of the leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderEvent {
    Put {
        holder: Holder,
        revision: i64,
    },
    /// `lease`: the lease the deleted key was on (the watch's previous
    /// value), when etcd still had it.
    Deleted {
        revision: i64,
        lease: Option<LeaseId>,
    },
}

impl Dcs {
    pub async fn grant(&mut self, ttl_secs: i64) -> Result<LeaseId, DcsError> {
        let mut lc = self.client.lease_client();
        let r = self.call("lease grant", lc.grant(ttl_secs, None)).await?;
        if !r.error().is_empty() {
            return Err(DcsError::Failed {
                op: "lease grant",
                endpoints: self.endpoints.clone(),
                cause: r.error().to_string(),
            });
        }
        Ok(LeaseId(r.id()))
    }

    /// One keepalive under its own deadline. Reads no clock: the caller
    /// records the send time before calling. A stream that timed out or
    /// broke is dropped (a late reply on it must never be taken for the
    /// answer to a later keepalive) and reopened on the next call.
    pub async fn renew(&mut self, lease: LeaseId) -> Renewal {
        self.count();
        if self.keepalive.as_ref().is_some_and(|k| k.lease != lease) {
            self.keepalive = None;
        }
        let timeout = self.request_timeout;
        let mut lc = self.client.lease_client();
        let ka = &mut self.keepalive;
        let round = async move {
            if ka.is_none() {
                // Opening the stream sends one keepalive and checks its TTL,
                // but drops the reply; the round below reports the TTL.
                let (keeper, stream) = lc.keep_alive(lease.0).await?;
                *ka = Some(KeepAlive {
                    lease,
                    keeper,
                    stream,
                });
            }
            let k = ka.as_mut().expect("opened above");
            k.keeper.keep_alive().await?;
            k.stream.message().await
        };
        let res = tokio::time::timeout(timeout, round).await;
        match res {
            Ok(Ok(Some(r))) if r.ttl() > 0 => Renewal::Acked { ttl: r.ttl() },
            Ok(Ok(Some(_))) => {
                self.keepalive = None;
                Renewal::Gone
            }
            // etcd-client's only way of saying "TTL <= 0" when it opens a stream.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == "lease not found" => {
                self.keepalive = None;
                Renewal::Gone
            }
            // The request side of the stream is gone: the connection to
            // the member carrying it broke.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) => {
                self.keepalive = None;
                Renewal::Failed(DcsError::Unreachable {
                    op: "keepalive",
                    endpoints: self.endpoints.clone(),
                    cause: format!("keepalive stream broken: {m}"),
                })
            }
            Ok(Ok(None)) => {
                self.keepalive = None;
                Renewal::Failed(DcsError::Failed {
                    op: "keepalive",
                    endpoints: self.endpoints.clone(),
                    cause: "stream closed by etcd".into(),
                })
            }
            Ok(Err(e)) => {
                self.keepalive = None;
                Renewal::Failed(self.error("keepalive", e))
            }
            Err(_) => {
                self.keepalive = None;
                Renewal::Failed(DcsError::Timeout {
                    op: "keepalive",
                    after: timeout,
                    endpoints: self.endpoints.clone(),
                })
            }
        }
    }

    /// Creates the leader key under `lease` if it is absent; otherwise
    /// reports who holds it. One transaction.
    pub async fn try_acquire(&mut self, lease: LeaseId) -> Result<Acquire, DcsError> {
        let key = self.leader_key.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.leader_value(lease),
                Some(PutOptions::new().with_lease(lease.0)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.client.kv_client();
        let r = self.call("acquire", kv.txn(txn)).await?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        if r.succeeded() {
            return Ok(Acquire::Won { revision });
        }
        let holder = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| self.holder(kv)),
                _ => None,
            })
            // The compare saw the key, so the get in the same transaction
            // must too; if not, say so rather than call the key free.
            .ok_or_else(|| DcsError::Failed {
                op: "acquire",
                endpoints: self.endpoints.clone(),
                cause: "key existed but the transaction returned no value".into(),
            })?;
        Ok(Acquire::Held { holder, revision })
    }

    /// The leader key's holder and the store revision it was read at (pass
    /// that to [`watch_leader`](Self::watch_leader) to miss no change).
    pub async fn leader(&mut self) -> Result<(Holder, i64), DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.leader_key.clone();
        let r = self.call("get leader", kv.get(key, None)).await?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        let holder = r.kvs().first().map_or(Holder::Nobody, |kv| self.holder(kv));
        Ok((holder, revision))
    }

    /// Deletes the leader key only if it is ours under `lease` (value and
    /// lease compared in one transaction), then revokes `lease`. Returns
    /// whether the key was deleted, and the transaction's revision. The revoke is best effort: a lease that
    /// is no longer renewed expires within its TTL; call
    /// [`revoke`](Self::revoke) to see its error.
    pub async fn release(&mut self, lease: LeaseId) -> Result<Released, DcsError> {
        let key = self.leader_key.clone();
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, self.leader_value(lease)),
                Compare::lease(key.clone(), CompareOp::Equal, lease.0),
            ])
            .and_then([TxnOp::delete(key, None)]);
        let mut kv = self.client.kv_client();
        let r = self.call("release", kv.txn(txn)).await?;
        let released = Released {
            deleted: r.succeeded(),
            revision: r.header().map(|h| h.revision()).unwrap_or(0),
        };
        let _ = self.revoke(lease).await;
        Ok(released)
    }

    /// Revokes `lease`, deleting every key attached to it. Revoking a lease
    /// that no longer exists is not an error.
    pub async fn revoke(&mut self, lease: LeaseId) -> Result<(), DcsError> {
        if self.keepalive.as_ref().is_some_and(|k| k.lease == lease) {
            self.keepalive = None;
        }
        let mut lc = self.client.lease_client();
        match self.call("lease revoke", lc.revoke(lease.0)).await {
            Ok(_) => Ok(()),
            Err(DcsError::Failed { cause, .. }) if cause.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The lease's remaining TTL in seconds as etcd's leader sees it, or
    /// `None` if it expired or was revoked. For records and checks only: it
    /// renews nothing.
    pub async fn time_to_live(&mut self, lease: LeaseId) -> Result<Option<i64>, DcsError> {
        let mut lc = self.client.lease_client();
        let r = self
            .call("lease time-to-live", lc.time_to_live(lease.0, None))
            .await?;
        Ok((r.ttl() > 0).then_some(r.ttl()))
    }

    /// Watches the leader key for changes after store revision
    /// `after_revision` (0: from now). Returns once etcd confirmed the watch.
    pub async fn watch_leader(&mut self, after_revision: i64) -> Result<LeaderWatch, DcsError> {
        // The previous value names the lease a deleted key was on.
        let mut opts = WatchOptions::new().with_prev_key();
        if after_revision > 0 {
            opts = opts.with_start_revision(after_revision + 1);
        }
        let mut wc = self.client.watch_client();
        let key = self.leader_key.clone();
        let (stream, first) = self
            .call("watch leader", async {
                let mut s = wc.watch(key, Some(opts)).await?;
                // Wait for "created" so that no change after return is missed.
                let first = s.message().await?;
                Ok((s, first))
            })
            .await?;
        let mut w = LeaderWatch {
            stream,
            pending: VecDeque::new(),
            node: self.node.clone(),
            endpoints: self.endpoints.clone(),
        };
        match first {
            None => Err(w.closed()),
            Some(m) => {
                w.absorb(&m)?;
                Ok(w)
            }
        }
    }
}

/// A stream of leader-key changes. [`next`](Self::next) is cancel-safe, so
/// the caller can `select!` on it. An error means the watch is broken (or
/// was canceled by etcd, e.g. compaction): re-read the key and watch again.
/// A frozen etcd leaves a watch silent, not broken: renewals are what notice.
pub struct LeaderWatch {
    stream: WatchStream,
    pending: VecDeque<LeaderEvent>,
    node: String,
    endpoints: String,
}

impl LeaderWatch {
    fn closed(&self) -> DcsError {
        DcsError::Failed {
            op: "watch leader",
            endpoints: self.endpoints.clone(),
            cause: "watch stream closed by etcd".into(),
        }
    }

    fn absorb(&mut self, m: &etcd_client::WatchResponse) -> Result<(), DcsError> {
        if m.canceled() {
            return Err(DcsError::Failed {
                op: "watch leader",
                endpoints: self.endpoints.clone(),
                cause: format!(
                    "watch canceled by etcd: {} (compact revision {})",
                    m.cancel_reason(),
                    m.compact_revision()
                ),
            });
        }
        for e in m.events() {
            let Some(kv) = e.kv() else { continue };
            let revision = kv.mod_revision();
            self.pending.push_back(match e.event_type() {
                EventType::Delete => LeaderEvent::Deleted {
                    revision,
                    lease: e.prev_kv().map(|p| LeaseId(p.lease())).filter(|l| l.0 != 0),
                },
                EventType::Put => LeaderEvent::Put {
                    holder: holder_of(&self.node, kv),
                    revision,
                },
            });
        }
        Ok(())
    }

    /// The next change. Cancel-safe: its only await is the stream read, and
    /// events are queued before the await resolves.
    pub async fn next(&mut self) -> Result<LeaderEvent, DcsError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            match self.stream.message().await {
                Ok(Some(m)) => self.absorb(&m)?,
                Ok(None) => return Err(self.closed()),
                Err(e) => {
                    return Err(DcsError::Unreachable {
                        op: "watch leader",
                        endpoints: self.endpoints.clone(),
                        cause: cause_chain(&e),
                    })
                }
            }
        }
    }
}

pub(super) fn holder_of(node: &str, kv: &KeyValue) -> Holder {
    let lease = LeaseId(kv.lease());
    match serde_json::from_slice::<LeaderValueIn>(kv.value()) {
        Ok(v) if v.node == node => Holder::Us { lease },
        Ok(v) => Holder::Node {
            name: v.node,
            lease,
        },
        Err(_) => Holder::Unknown {
            bytes: kv.value().len(),
            lease,
        },
    }
}
