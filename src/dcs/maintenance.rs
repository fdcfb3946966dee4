//! Maintenance keys, under `{prefix}/{scope}/` (no lease: they outlive the
//! agents and the CLI that write them):
//! - `pause`: present while the scope is paused, `{"by": WHO, "at_unix": S}`
//!   (`leasedog pause` writes it, `resume` deletes it).
//! - `requests/{node}`: one request for that node's PostgreSQL,
//!   `{"id": ID, "op": "restart"|"reinit"}` (`leasedog restart|reinit NODE`),
//!   run once per id by the node's agent.
//! - `results/{node}`: the agent's outcome, `{"id": ID, "ok": B, "detail": S}`.

use super::{Dcs, DcsError};
use etcd_client::{Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRecord {
    pub by: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRequest {
    pub id: String,
    pub op: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpOutcome {
    pub id: String,
    pub ok: bool,
    pub detail: String,
}

fn parse<T: for<'a> Deserialize<'a>>(endpoints: &str, key: &str, v: &[u8]) -> Result<T, DcsError> {
    serde_json::from_slice(v).map_err(|e| DcsError::Failed {
        op: "parse",
        endpoints: endpoints.to_string(),
        cause: format!(
            "{key} holds no leasedog record ({e}): {}",
            String::from_utf8_lossy(v)
        ),
    })
}

impl Dcs {
    pub fn pause_key(&self) -> String {
        self.scope_key("pause")
    }

    async fn get_value(
        &mut self,
        op: &'static str,
        key: String,
    ) -> Result<Option<Vec<u8>>, DcsError> {
        let mut kv = self.client.kv_client();
        let r = self.call(op, kv.get(key, None)).await?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put_value(
        &mut self,
        op: &'static str,
        key: String,
        value: String,
    ) -> Result<(), DcsError> {
        let mut kv = self.client.kv_client();
        self.call(op, kv.put(key, value, None)).await.map(|_| ())
    }

    /// The pause record, if the scope is paused. Any value under the key
    /// pauses the scope (a malformed one too: pausing is the safe reading).
    pub async fn get_pause(&mut self) -> Result<Option<Vec<u8>>, DcsError> {
        let key = self.pause_key();
        self.get_value("get pause", key).await
    }

    pub async fn set_pause(&mut self, rec: &PauseRecord) -> Result<(), DcsError> {
        let key = self.pause_key();
        let v = serde_json::to_string(rec).expect("serializes");
        self.put_value("put pause", key, v).await
    }

    /// Deletes the pause key; whether it was there.
    pub async fn clear_pause(&mut self) -> Result<bool, DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.pause_key();
        let r = self.call("delete pause", kv.delete(key, None)).await?;
        Ok(r.deleted() > 0)
    }

    pub async fn get_request(&mut self, node: &str) -> Result<Option<OpRequest>, DcsError> {
        let key = self.scope_key(&format!("requests/{node}"));
        match self.get_value("get request", key.clone()).await? {
            None => Ok(None),
            Some(v) => parse(&self.endpoints, &key, &v).map(Some),
        }
    }

    /// The pause key's value and `node`'s request, in one read (one
    /// request per poll: the agents poll every other loop).
    #[allow(clippy::type_complexity)]
    pub async fn maintenance_state(
        &mut self,
        node: &str,
    ) -> Result<(Option<Vec<u8>>, Option<Result<OpRequest, DcsError>>), DcsError> {
        let mut kv = self.client.kv_client();
        let req_key = self.scope_key(&format!("requests/{node}"));
        let txn = Txn::new().and_then([
            TxnOp::get(self.pause_key(), None),
            TxnOp::get(req_key.clone(), None),
        ]);
        let r = self.call("get maintenance keys", kv.txn(txn)).await?;
        let mut values = r.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let pause = values.next().flatten();
        let request = values
            .next()
            .flatten()
            .map(|v| parse(&self.endpoints, &req_key, &v));
        Ok((pause, request))
    }

    pub async fn put_request(&mut self, node: &str, req: &OpRequest) -> Result<(), DcsError> {
        let key = self.scope_key(&format!("requests/{node}"));
        let v = serde_json::to_string(req).expect("serializes");
        self.put_value("put request", key, v).await
    }

    pub async fn delete_request(&mut self, node: &str) -> Result<(), DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.scope_key(&format!("requests/{node}"));
        self.call("delete request", kv.delete(key, None))
            .await
            .map(|_| ())
    }

    pub async fn get_result(&mut self, node: &str) -> Result<Option<OpOutcome>, DcsError> {
        let key = self.scope_key(&format!("results/{node}"));
        match self.get_value("get result", key.clone()).await? {
            None => Ok(None),
            Some(v) => parse(&self.endpoints, &key, &v).map(Some),
        }
    }

    pub async fn put_result(&mut self, node: &str, outcome: &OpOutcome) -> Result<(), DcsError> {
        let key = self.scope_key(&format!("results/{node}"));
        let v = serde_json::to_string(outcome).expect("serializes");
        self.put_value("put result", key, v).await
    }
}
