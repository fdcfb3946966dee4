//! The `sync` key (issue 12): the leader's record of the synchronous
//! standby set, and the read a follower makes before racing for an empty
//! leader key. What to write and whether to race are `decide::sync`'s.

use super::{Dcs, DcsError, LeaseId};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

impl Dcs {
    /// `{prefix}/{scope}/sync`, beside `leader` and `members/`.
    pub fn sync_key(&self) -> String {
        let base = self
            .members_prefix
            .strip_suffix("members/")
            .unwrap_or(&self.members_prefix);
        format!("{base}sync")
    }

    /// Writes `value` to the `sync` key only if the leader key is this
    /// node's on `lease` (its exact value and lease): a leader that lost
    /// the key can no longer change the set. Ok(false): not written.
    pub async fn write_sync(&mut self, lease: LeaseId, value: &str) -> Result<bool, DcsError> {
        let key = self.leader_key.clone();
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, self.leader_value(lease)),
                Compare::lease(key, CompareOp::Equal, lease.0),
            ])
            .and_then([TxnOp::put(self.sync_key(), value, None)]);
        let mut kv = self.client.kv_client();
        let r = self.call("write sync", kv.txn(txn)).await?;
        Ok(r.succeeded())
    }

    /// The `sync` key (None: absent) and every member record, as (value,
    /// mod revision), in one read-only transaction: one revision for both.
    #[allow(clippy::type_complexity)]
    pub async fn candidates(&mut self) -> Result<(Option<Vec<u8>>, Vec<(Vec<u8>, i64)>), DcsError> {
        let prefix = self.members_prefix.clone();
        let txn = Txn::new().and_then([
            TxnOp::get(self.sync_key(), None),
            TxnOp::get(prefix, Some(GetOptions::new().with_prefix())),
        ]);
        let mut kv = self.client.kv_client();
        let r = self.call("read candidates", kv.txn(txn)).await?;
        let mut sync = None;
        let mut members = Vec::new();
        for (i, op) in r.op_responses().into_iter().enumerate() {
            if let TxnOpResponse::Get(g) = op {
                if i == 0 {
                    sync = g.kvs().first().map(|kv| kv.value().to_vec());
                } else {
                    for kv in g.kvs() {
                        members.push((kv.value().to_vec(), kv.mod_revision()));
                    }
                }
            }
        }
        Ok((sync, members))
    }
}
