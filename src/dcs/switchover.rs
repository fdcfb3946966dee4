//! Switchover keys, under `{prefix}/{scope}/`:
//! - `switchover`: the operator's request (`decide::switchover::Request`),
//!   written by `leasedog switchover` / `failover`, no lease (it must
//!   survive the leader it addresses);
//! - `switchover-status`: the leader's answer (`decide::switchover::Answer`);
//! - `pause`: maintenance, written by the `pause` command (only its
//!   existence is read here).
//!
//! And the two writes of the leader key a switchover needs: the hand-over
//! (the holder puts the key as the target's, on the target's lease, in one
//! transaction compared on its own value and lease), and `failover --to`
//! (the key created for the target on its lease, only if absent). Both
//! write exactly the value the target would write itself, so the target
//! finds the key on its own current lease and takes the win.

use super::{Dcs, DcsError, LeaderValueOut, LeaseId, AGENT};
use crate::decide::switchover::{Answer, Request};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

impl Dcs {
    pub(super) fn scope_key(&self, name: &str) -> String {
        let base = self
            .leader_key
            .strip_suffix("leader")
            .expect("the leader key ends in 'leader'");
        format!("{base}{name}")
    }

    async fn get_raw(&mut self, name: &str) -> Result<Option<Vec<u8>>, DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.scope_key(name);
        let r = self.call("get switchover key", kv.get(key, None)).await?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put_raw(&mut self, name: &str, value: String) -> Result<(), DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.scope_key(name);
        self.call("put switchover key", kv.put(key, value, None))
            .await
            .map(|_| ())
    }

    /// The pending request, if any (an unreadable one is an error naming it).
    pub async fn switchover_request(&mut self) -> Result<Option<Request>, DcsError> {
        let Some(raw) = self.get_raw("switchover").await? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| DcsError::Failed {
                op: "read switchover request",
                endpoints: self.endpoints.clone(),
                cause: format!("the switchover key holds no request: {e}"),
            })
    }

    pub async fn put_switchover_request(&mut self, req: &Request) -> Result<(), DcsError> {
        let json = serde_json::to_string(req).expect("a request serializes");
        self.put_raw("switchover", json).await
    }

    pub async fn delete_switchover_request(&mut self) -> Result<(), DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.scope_key("switchover");
        self.call("delete switchover request", kv.delete(key, None))
            .await
            .map(|_| ())
    }

    pub async fn switchover_answer(&mut self) -> Result<Option<Answer>, DcsError> {
        Ok(self
            .get_raw("switchover-status")
            .await?
            .and_then(|raw| serde_json::from_slice(&raw).ok()))
    }

    pub async fn put_switchover_answer(&mut self, answer: &Answer) -> Result<(), DcsError> {
        let json = serde_json::to_string(answer).expect("an answer serializes");
        self.put_raw("switchover-status", json).await
    }

    /// Whether `{scope}/pause` exists (maintenance).
    pub async fn paused(&mut self) -> Result<bool, DcsError> {
        Ok(self.get_raw("pause").await?.is_some())
    }

    /// `node`'s member record and the lease it is on.
    pub async fn member_with_lease(
        &mut self,
        node: &str,
    ) -> Result<Option<(Vec<u8>, i64)>, DcsError> {
        let mut kv = self.client.kv_client();
        let key = format!("{}{}", self.members_prefix, node);
        let r = self.call("get member", kv.get(key, None)).await?;
        Ok(r.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())))
    }

    fn value_for(node: &str, lease: LeaseId) -> String {
        serde_json::to_string(&LeaderValueOut {
            node,
            lease: lease.to_string(),
            agent: AGENT,
        })
        .expect("serializing a struct of strings cannot fail")
    }

    /// Hands the leader key, still ours on `lease`, to `to` on `to_lease`:
    /// one transaction. The revision of the put when it happened, None when
    /// the key was no longer ours.
    pub async fn hand_over(
        &mut self,
        lease: LeaseId,
        to: &str,
        to_lease: LeaseId,
    ) -> Result<Option<i64>, DcsError> {
        let key = self.leader_key.clone();
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, self.leader_value(lease)),
                Compare::lease(key.clone(), CompareOp::Equal, lease.0),
            ])
            .and_then([TxnOp::put(
                key,
                Self::value_for(to, to_lease),
                Some(PutOptions::new().with_lease(to_lease.0)),
            )]);
        let mut kv = self.client.kv_client();
        let r = self.call("hand over", kv.txn(txn)).await?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok(r.succeeded().then_some(revision))
    }

    /// `failover --to`: creates the leader key for `to` on its lease, only
    /// if the key is absent. The revision when created, None when a leader
    /// holds it.
    pub async fn create_leader_for(
        &mut self,
        to: &str,
        to_lease: LeaseId,
    ) -> Result<Option<i64>, DcsError> {
        let key = self.leader_key.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                Self::value_for(to, to_lease),
                Some(PutOptions::new().with_lease(to_lease.0)),
            )]);
        let mut kv = self.client.kv_client();
        let r = self.call("failover", kv.txn(txn)).await?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok(r.succeeded().then_some(revision))
    }
}
