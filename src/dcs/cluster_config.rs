//! The scope's cluster-wide settings (`{prefix}/{scope}/config`, JSON, no
//! lease), read by every agent and written by `leasedog edit-config`
//! (`config::cluster` holds what they mean; this only talks to etcd).

use super::{Dcs, DcsError};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

impl Dcs {
    fn config_key(&self) -> String {
        let scope = self.leader_key.trim_end_matches("leader");
        format!("{scope}config")
    }

    /// The stored bytes and their mod revision (0: absent).
    pub async fn cluster_config(&mut self) -> Result<(Option<Vec<u8>>, i64), DcsError> {
        let mut kv = self.client.kv_client();
        let r = self
            .call("get config", kv.get(self.config_key(), None))
            .await?;
        Ok(match r.kvs().first() {
            Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
            None => (None, 0),
        })
    }

    /// Writes `value` only if the key is still at `revision` (0: absent),
    /// so two editors do not overwrite each other. True if written.
    pub async fn put_cluster_config(
        &mut self,
        value: String,
        revision: i64,
    ) -> Result<bool, DcsError> {
        let key = self.config_key();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        let mut kv = self.client.kv_client();
        Ok(self.call("put config", kv.txn(txn)).await?.succeeded())
    }
}
