//! The `initialize` key (`{prefix}/{scope}/initialize`): who created the
//! scope's cluster. The core decides (`decide::bootstrap`); this only talks
//! to etcd.
//!
//! Value: `{"node": NAME, "state": "initializing" | "initialized", "agent": ...}`.
//! A claim (`initializing`) is created only if the key is absent and lives
//! on the claimant's lease, so a node that dies during `initdb` frees it
//! within a TTL; `initialized` has no lease and stays.

use super::{Dcs, DcsError, LeaseId, AGENT};
use crate::decide::InitKey;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

const INITIALIZING: &str = "initializing";
const INITIALIZED: &str = "initialized";

#[derive(Serialize)]
struct Out<'a> {
    node: &'a str,
    state: &'a str,
    agent: &'a str,
}

#[derive(Deserialize)]
struct In {
    node: String,
    state: String,
}

/// The key's value as the core sees it (absent = `None`).
pub fn parse_initialize(value: Option<&[u8]>) -> InitKey {
    let Some(v) = value else {
        return InitKey::Absent;
    };
    match serde_json::from_slice::<In>(v) {
        Ok(i) if i.state == INITIALIZED => InitKey::Done { node: i.node },
        Ok(i) if i.state == INITIALIZING => InitKey::Claimed { node: i.node },
        _ => InitKey::Garbage,
    }
}

/// A claim naming `me` counts as ours only on `current`, the lease this
/// node holds now: one left by an earlier run (killed during `initdb`) is
/// another claimant's until its lease expires.
pub fn own_claim_only_on(me: &str, key: InitKey, lease: i64, current: Option<LeaseId>) -> InitKey {
    match key {
        InitKey::Claimed { node } if node == me && Some(LeaseId(lease)) != current => {
            InitKey::Claimed {
                node: format!("{node} (an earlier run, lease {})", LeaseId(lease)),
            }
        }
        k => k,
    }
}

impl Dcs {
    fn initialize_key(&self) -> String {
        // `leader_key` is `{prefix}/{scope}/leader`.
        let scope = self.leader_key.trim_end_matches("leader");
        format!("{scope}initialize")
    }

    fn initialize_value(&self, state: &str) -> String {
        serde_json::to_string(&Out {
            node: &self.node,
            state,
            agent: AGENT,
        })
        .expect("serializing strings cannot fail")
    }

    /// The `initialize` key as it stands, for a node on lease `current`.
    pub async fn initialize(&mut self, current: Option<LeaseId>) -> Result<InitKey, DcsError> {
        let mut kv = self.client.kv_client();
        let r = self
            .call("get initialize", kv.get(self.initialize_key(), None))
            .await?;
        Ok(match r.kvs().first() {
            None => InitKey::Absent,
            Some(kv) => own_claim_only_on(
                &self.node,
                parse_initialize(Some(kv.value())),
                kv.lease(),
                current,
            ),
        })
    }

    /// Creates the key as our claim on `lease` if it is absent; returns the
    /// key as it stands after the transaction (`Claimed` by us: won).
    pub async fn claim_initialize(&mut self, lease: LeaseId) -> Result<InitKey, DcsError> {
        let key = self.initialize_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.initialize_value(INITIALIZING),
                Some(PutOptions::new().with_lease(lease.0)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.client.kv_client();
        let r = self.call("claim initialize", kv.txn(txn)).await?;
        if r.succeeded() {
            return Ok(InitKey::Claimed {
                node: self.node.clone(),
            });
        }
        let held = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())),
            _ => None,
        });
        // Deleted between the compare and the get cannot happen within one
        // transaction; an absent value here reads as "unknown", re-read.
        Ok(held.map_or(InitKey::Unknown, |(v, l)| {
            own_claim_only_on(&self.node, parse_initialize(Some(&v)), l, Some(lease))
        }))
    }

    /// Turns our claim on `lease` into the permanent `initialized` (no
    /// lease). False if the claim is no longer ours (expired, deleted).
    pub async fn finish_initialize(&mut self, lease: LeaseId) -> Result<bool, DcsError> {
        let key = self.initialize_key();
        let txn = Txn::new()
            .when([
                Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    self.initialize_value(INITIALIZING),
                ),
                Compare::lease(key.clone(), CompareOp::Equal, lease.0),
            ])
            .and_then([TxnOp::put(key, self.initialize_value(INITIALIZED), None)]);
        let mut kv = self.client.kv_client();
        Ok(self
            .call("finish initialize", kv.txn(txn))
            .await?
            .succeeded())
    }

    /// Deletes our claim on `lease` (after a failed `initdb`).
    pub async fn abandon_initialize(&mut self, lease: LeaseId) -> Result<bool, DcsError> {
        let key = self.initialize_key();
        let txn = Txn::new()
            .when([
                Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    self.initialize_value(INITIALIZING),
                ),
                Compare::lease(key.clone(), CompareOp::Equal, lease.0),
            ])
            .and_then([TxnOp::delete(key, None)]);
        let mut kv = self.client.kv_client();
        Ok(self
            .call("abandon initialize", kv.txn(txn))
            .await?
            .succeeded())
    }

    /// Writes `initialized` naming this node if no key exists (a leader of
    /// a scope created before the key existed). True if it wrote it.
    pub async fn mark_initialized(&mut self) -> Result<bool, DcsError> {
        let key = self.initialize_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, self.initialize_value(INITIALIZED), None)]);
        let mut kv = self.client.kv_client();
        Ok(self
            .call("mark initialized", kv.txn(txn))
            .await?
            .succeeded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_of_this_node_on_an_older_lease_is_not_ours() {
        let mine = || InitKey::Claimed { node: "a".into() };
        assert_eq!(own_claim_only_on("a", mine(), 7, Some(LeaseId(7))), mine());
        assert_eq!(
            own_claim_only_on("a", mine(), 6, Some(LeaseId(7))),
            InitKey::Claimed {
                node: "a (an earlier run, lease 6)".into()
            }
        );
        assert_eq!(
            own_claim_only_on("b", mine(), 6, Some(LeaseId(7))),
            mine(),
            "another node's claim is left alone"
        );
    }

    #[test]
    fn values_parse_to_the_cores_view_and_garbage_is_never_absent() {
        assert_eq!(parse_initialize(None), InitKey::Absent);
        assert_eq!(
            parse_initialize(Some(br#"{"node":"a","state":"initializing","agent":"x"}"#)),
            InitKey::Claimed { node: "a".into() }
        );
        assert_eq!(
            parse_initialize(Some(br#"{"node":"b","state":"initialized"}"#)),
            InitKey::Done { node: "b".into() }
        );
        assert_eq!(parse_initialize(Some(b"6912345678")), InitKey::Garbage);
        assert_eq!(
            parse_initialize(Some(br#"{"node":"b","state":"other"}"#)),
            InitKey::Garbage
        );
    }
}
