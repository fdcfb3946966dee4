//! The audit history in etcd (docs/fencing.md rule 7): one mirrored
//! lifecycle record per key under `history/{node}/`, no lease, bounded by
//! trimming the oldest by create revision.

use super::{Dcs, DcsError};
use etcd_client::{GetOptions, SortOrder, SortTarget, Txn, TxnOp};

/// How many mirrored audit records the history keeps (newest first).
pub const HISTORY_KEEP: usize = 1000;
/// Trim the history on every this many appends (one keys-only read then).
pub const HISTORY_TRIM_EVERY: u64 = 100;
/// Most deletions in one trimming transaction (etcd's default
/// `--max-txn-ops` is 128).
const TRIM_TXN_OPS: usize = 64;

impl Dcs {
    /// Every value under the scope's `history/` prefix (mirrored lifecycle
    /// records of the nodes' audit logs), oldest first in etcd's order: by
    /// the revision that created each key.
    pub async fn history(&mut self) -> Result<Vec<Vec<u8>>, DcsError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let r = self
            .call(
                "get history",
                kv.get(self.history_prefix.clone(), Some(opts)),
            )
            .await?;
        Ok(r.kvs().iter().map(|kv| kv.value().to_vec()).collect())
    }

    /// The newest record `node` mirrored (its anchor: the last `seq` and
    /// `hash` of its local log that etcd holds), if any.
    pub async fn history_newest(&mut self, node: &str) -> Result<Option<Vec<u8>>, DcsError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1);
        let key = format!("{}{node}/", self.history_prefix);
        let r = self.call("get history", kv.get(key, Some(opts))).await?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub fn history_prefix(&self) -> &str {
        &self.history_prefix
    }

    /// Keep the newest `keep` history records, trimming every `trim_every`
    /// appends (defaults [`HISTORY_KEEP`], [`HISTORY_TRIM_EVERY`]).
    pub fn set_history_bound(&mut self, keep: usize, trim_every: u64) {
        self.history_keep = keep;
        self.history_trim_every = trim_every.max(1);
    }

    /// Mirrors one audit record (its JSON, unchanged, so its hash still
    /// holds) under `history/{node}/{seq:020}-{hash[..16]}`, with no lease.
    /// Rewriting the same record is harmless (same key, same value). One put
    /// under the request deadline; when a trim is due it follows the put,
    /// and its failure only postpones it to the next append (it is logged,
    /// the append still succeeded).
    pub async fn append_history(&mut self, record_json: &str) -> Result<(), DcsError> {
        let key = self.history_key(record_json)?;
        let mut kv = self.client.kv_client();
        self.call("append history", kv.put(key, record_json, None))
            .await?;
        if self.history_appends % self.history_trim_every == 0 {
            self.history_trim_due = true;
        }
        self.history_appends += 1;
        if self.history_trim_due {
            match self.trim_history().await {
                Ok(_) => self.history_trim_due = false,
                Err(e) => tracing::warn!(
                    "cannot trim the audit history in etcd: {e}; retried at the next append"
                ),
            }
        }
        Ok(())
    }

    fn history_key(&self, record_json: &str) -> Result<String, DcsError> {
        let bad = |why: &str| DcsError::Failed {
            op: "append history",
            endpoints: self.endpoints.clone(),
            cause: format!("not an audit record ({why})"),
        };
        let v: serde_json::Value =
            serde_json::from_str(record_json).map_err(|e| bad(&e.to_string()))?;
        let seq = v
            .get("seq")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| bad("no seq"))?;
        let hash = v
            .get("hash")
            .and_then(|h| h.as_str())
            .filter(|h| h.len() >= 16 && h.is_ascii())
            .ok_or_else(|| bad("no hash"))?;
        let node = v.get("node").and_then(|n| n.as_str()).unwrap_or(&self.node);
        Ok(format!(
            "{}{node}/{seq:020}-{}",
            self.history_prefix,
            &hash[..16]
        ))
    }

    /// Deletes the oldest history records (by create revision) beyond the
    /// bound. Costs a count, then (only if over the bound) a keys-only read
    /// of the excess and batched deletes. Returns how many it deleted.
    /// Concurrent trims by several nodes are harmless: deleting a key twice
    /// deletes nothing the second time.
    pub async fn trim_history(&mut self) -> Result<usize, DcsError> {
        let mut kv = self.client.kv_client();
        let prefix = self.history_prefix.clone();
        let count = self
            .call(
                "count history",
                kv.get(
                    prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
            )
            .await?
            .count();
        let excess = count - self.history_keep as i64;
        if excess <= 0 {
            return Ok(0);
        }
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(excess);
        let r = self
            .call("list old history", kv.get(prefix, Some(opts)))
            .await?;
        let keys: Vec<Vec<u8>> = r.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        for chunk in keys.chunks(TRIM_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect();
            self.call("trim history", kv.txn(Txn::new().and_then(ops)))
                .await?;
        }
        Ok(keys.len())
    }
}
