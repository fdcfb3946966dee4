//! The etcd driver: the leader key, its lease, member keys and the leader
//! watch. It only talks to etcd; every decision belongs to `decide`.
//!
//! Every request carries its own deadline (`etcd.request_timeout`): etcd
//! client streams have none, and a frozen etcd would otherwise block a
//! renewal forever. The client keeps to the configured endpoints and never
//! syncs to the member list etcd advertises (members advertise 127.0.0.1).
//!
//! Keys, under `{prefix}/{scope}/`:
//! - `leader`: `{"node": NAME, "lease": "HEX", "agent": "leasedog/VERSION"}`,
//!   attached to the holder's lease, created only if absent.
//! - `members/{node}`: free-form, attached to the member's lease.
//! - `history/{node}/{seq:020}-{hash[..16]}`: one mirrored audit record
//!   (FENCING.md rule 7), the record's JSON unchanged. No lease: the history
//!   must outlive the node. Its order across nodes is etcd's own: the create
//!   revision of each key (the revision of the put), which is how
//!   [`Dcs::history`] reads it and how trimming picks the oldest
//!   (`etcdctl get --prefix --sort-by=CREATE` shows the same order). Within
//!   one node the key order is the node's `seq` order too. The newest
//!   [`HISTORY_KEEP`] are kept; every [`HISTORY_TRIM_EVERY`] appends (and on
//!   a connection's first) the oldest beyond that are deleted.

use crate::config::EtcdConfig;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// What the agent writes into the leader key's `agent` field.
pub const AGENT: &str = concat!("leasedog/", env!("CARGO_PKG_VERSION"));

/// How many mirrored audit records the history keeps (newest first).
pub const HISTORY_KEEP: usize = 1000;
/// Trim the history on every this many appends (one keys-only read then).
pub const HISTORY_TRIM_EVERY: u64 = 100;
/// Most deletions in one trimming transaction (etcd's default
/// `--max-txn-ops` is 128).
const TRIM_TXN_OPS: usize = 64;

/// An etcd lease id (printed in hex, as etcdctl does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Who holds the leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The key is absent.
    Nobody,
    /// The key names this node. `lease` is the lease the key is attached to
    /// in etcd: compare it with the current one (a previous run of this node
    /// may have left a key under an older lease).
    Us { lease: LeaseId },
    /// Another node, by its JSON value; `lease` is the key's etcd lease.
    Node { name: String, lease: LeaseId },
    /// The key holds something that is not our JSON: treated as held by an
    /// unknown owner, never as free. `lease` 0 means it never expires.
    Unknown { bytes: usize, lease: LeaseId },
}

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

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd at {endpoints}: {op} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        after: Duration,
        endpoints: String,
    },
    #[error("etcd at {endpoints} unreachable ({op}): {cause}")]
    Unreachable {
        op: &'static str,
        endpoints: String,
        cause: String,
    },
    #[error("etcd at {endpoints}: {op} failed: {cause}")]
    Failed {
        op: &'static str,
        endpoints: String,
        cause: String,
    },
    #[error("invalid etcd configuration: {0}")]
    Config(String),
    /// etcd refused the configured username/password (or auth is off and a
    /// user was configured, or auth is on and none was).
    #[error("etcd at {endpoints}: authentication failed: {cause}")]
    Auth { endpoints: String, cause: String },
    /// The TLS handshake failed: wrong CA, a rejected or missing client
    /// certificate, or a server name that does not match.
    #[error("etcd at {endpoints}: TLS handshake failed: {cause} (check etcd.ca_file, cert_file, key_file)")]
    Tls { endpoints: String, cause: String },
}

impl DcsError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, DcsError::Timeout { .. })
    }
}

/// The JSON in the leader key. Field order is fixed (struct, not map) so our
/// own value is byte-for-byte reproducible for the compare in `release`.
#[derive(Serialize)]
struct LeaderValueOut<'a> {
    node: &'a str,
    lease: String,
    agent: &'a str,
}

#[derive(Deserialize)]
struct LeaderValueIn {
    node: String,
}

struct KeepAlive {
    lease: LeaseId,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// A connection to etcd for one node in one scope.
pub struct Dcs {
    client: Client,
    endpoints: String,
    node: String,
    leader_key: String,
    members_prefix: String,
    history_prefix: String,
    request_timeout: Duration,
    keepalive: Option<KeepAlive>,
    history_keep: usize,
    history_trim_every: u64,
    /// Appends by this connection; a trim is due when it is a multiple of
    /// `history_trim_every` (so also on the first).
    history_appends: u64,
    history_trim_due: bool,
    /// Counts every request made through this connection (metrics).
    requests: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

fn secs(key: &str, v: f64) -> Result<Duration, DcsError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| DcsError::Config(format!("{key} = {v} is not a positive number of seconds")))
}

/// The error and every cause beneath it, e.g. "transport error: tcp connect
/// error: Connection refused (os error 111)".
fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        src = c.source();
    }
    s
}

/// Adds TLS (CA, client identity) and user/password to `options`.
fn secure(cfg: &EtcdConfig, mut options: ConnectOptions) -> Result<ConnectOptions, DcsError> {
    let read = |key: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| DcsError::Config(format!("etcd.{key} {}: {e}", p.display())))
    };
    if cfg.tls() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &cfg.ca_file {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read("ca_file", ca)?));
        }
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("cert_file", c)?,
                read("key_file", k)?,
            ));
        }
        options = options.with_tls(tls);
    }
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        options = options.with_user(u.clone(), p.clone());
    }
    Ok(options)
}

/// How a connection etcd drops right after the TLS handshake reads (the
/// wording depends on which side of h2 notices first).
fn closed_at_once(cause: &str) -> bool {
    let c = cause.to_lowercase();
    ["connection closed", "broken pipe", "connection reset"]
        .iter()
        .any(|w| c.contains(w))
}

/// Tells authentication and TLS failures from plain unreachability, so
/// the operator reads which setting to fix.
fn reclassify(endpoints: String, cause: String) -> DcsError {
    let lower = cause.to_lowercase();
    if lower.contains("authentication failed")
        || lower.contains("user name is empty")
        || lower.contains("invalid auth token")
        || lower.contains("permission denied")
        || lower.contains("authentication is not enabled")
    {
        DcsError::Auth { endpoints, cause }
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("alert")
    {
        DcsError::Tls { endpoints, cause }
    } else {
        DcsError::Unreachable {
            op: "connect",
            endpoints,
            cause,
        }
    }
}

fn classify_connect(endpoints: &str, e: etcd_client::Error) -> DcsError {
    match &e {
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
            DcsError::Config(format!("etcd.endpoints {endpoints}: {e}"))
        }
        _ => reclassify(endpoints.to_string(), cause_chain(&e)),
    }
}

impl Dcs {
    /// Connects and proves it with one read of the leader key, all within
    /// `connect_timeout`. Endpoints are used as given, never synced.
    pub async fn connect(cfg: &EtcdConfig, scope: &str, node: &str) -> Result<Dcs, DcsError> {
        let request_timeout = secs("etcd.request_timeout", cfg.request_timeout)?;
        let connect_timeout = secs("etcd.connect_timeout", cfg.connect_timeout)?;
        if cfg.endpoints.is_empty() {
            return Err(DcsError::Config("etcd.endpoints is empty".into()));
        }
        let endpoints = cfg.endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            // A member cut off from its quorum fails requests at once
            // instead of holding them.
            .with_require_leader(true)
            // HTTP/2 pings drop a connection whose peer vanished silently, so
            // the balancer reconnects. etcd's server sends GOAWAY to clients
            // pinging more often than every 5 s, or while idle.
            .with_keep_alive(
                Duration::from_secs(10),
                request_timeout.max(Duration::from_secs(1)),
            )
            .with_keep_alive_while_idle(false);
        let options = secure(cfg, options)?;
        // With a user, connect() authenticates at once (one request); bound it.
        let client = match tokio::time::timeout(
            connect_timeout,
            Client::connect(&cfg.endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(classify_connect(&endpoints, e)),
            Err(_) => {
                return Err(DcsError::Timeout {
                    op: "connect",
                    after: connect_timeout,
                    endpoints,
                })
            }
        };
        let prefix = cfg.prefix.trim_end_matches('/');
        let mut dcs = Dcs {
            client,
            endpoints,
            node: node.to_string(),
            leader_key: format!("{prefix}/{scope}/leader"),
            members_prefix: format!("{prefix}/{scope}/members/"),
            history_prefix: format!("{prefix}/{scope}/history/"),
            request_timeout,
            keepalive: None,
            history_keep: HISTORY_KEEP,
            history_trim_every: HISTORY_TRIM_EVERY,
            history_appends: 0,
            history_trim_due: true,
            requests: None,
        };
        dcs.probe(connect_timeout).await.map_err(|e| match e {
            // Under TLS 1.3 the client finishes its handshake before the
            // server checks the client certificate; a rejected one shows as
            // a connection etcd closes at once.
            DcsError::Unreachable {
                endpoints, cause, ..
            } if cfg.tls() && closed_at_once(&cause) => DcsError::Tls {
                endpoints,
                cause: format!(
                    "{cause} at once after the handshake: etcd most likely rejected the client \
                     certificate (missing, or not signed by etcd's --trusted-ca-file)"
                ),
            },
            DcsError::Unreachable {
                endpoints, cause, ..
            }
            | DcsError::Failed {
                endpoints, cause, ..
            } => reclassify(endpoints, cause),
            other => other,
        })?;
        Ok(dcs)
    }

    /// The client connects lazily; a read proves the cluster answers. With
    /// several endpoints one may be down, so retry until the deadline.
    async fn probe(&mut self, within: Duration) -> Result<(), DcsError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(last.unwrap_or(DcsError::Timeout {
                    op: "connect",
                    after: within,
                    endpoints: self.endpoints.clone(),
                }));
            }
            let mut kv = self.client.kv_client();
            let key = self.leader_key.clone();
            // A frozen member must not eat the whole window.
            let attempt = left.min(self.request_timeout);
            match tokio::time::timeout(attempt, kv.get(key, None)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = Some(self.error("connect", e)),
                // An attempt cut short by the window's end says less than
                // the error before it (e.g. a TLS failure): keep that one.
                Err(_) if attempt < self.request_timeout && last.is_some() => {}
                Err(_) => {
                    last = Some(DcsError::Timeout {
                        op: "connect",
                        after: attempt,
                        endpoints: self.endpoints.clone(),
                    })
                }
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
    }

    /// Adds every later request (one per call: a renewal, a read, a
    /// transaction; `release` makes two, its delete and the revoke) to `c`.
    pub fn count_requests(&mut self, c: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.requests = Some(c);
    }

    fn count(&self) {
        if let Some(c) = &self.requests {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every member record of the scope, as (node, value), in key order.
    pub async fn members(&mut self) -> Result<Vec<(String, Vec<u8>)>, DcsError> {
        let mut kv = self.client.kv_client();
        let opts = etcd_client::GetOptions::new()
            .with_prefix()
            .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
        let prefix = self.members_prefix.clone();
        let r = self
            .call("get members", kv.get(prefix.clone(), Some(opts)))
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let node = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                (node, kv.value().to_vec())
            })
            .collect())
    }

    pub fn leader_key(&self) -> &str {
        &self.leader_key
    }

    pub fn member_key(&self) -> String {
        format!("{}{}", self.members_prefix, self.node)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The configured endpoints, comma-separated (as errors name them).
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The exact bytes this node writes into the leader key under `lease`.
    pub fn leader_value(&self, lease: LeaseId) -> String {
        serde_json::to_string(&LeaderValueOut {
            node: &self.node,
            lease: lease.to_string(),
            agent: AGENT,
        })
        .expect("serializing a struct of strings cannot fail")
    }

    fn error(&self, op: &'static str, e: etcd_client::Error) -> DcsError {
        let endpoints = self.endpoints.clone();
        match &e {
            // A status with a source is tonic reporting its own transport
            // failure (e.g. code Unknown, "transport error", broken pipe).
            etcd_client::Error::GRpcStatus(s)
                if s.code() == tonic::Code::Unavailable
                    || std::error::Error::source(s).is_some() =>
            {
                // The root cause says it best ("Connection refused (os
                // error 111)"); the layers above repeat "transport error".
                let mut cause = s.message().to_string();
                let mut src = std::error::Error::source(s);
                while let Some(c) = src {
                    cause = c.to_string();
                    src = c.source();
                }
                DcsError::Unreachable {
                    op,
                    endpoints,
                    cause,
                }
            }
            etcd_client::Error::GRpcStatus(s) => DcsError::Failed {
                op,
                endpoints,
                cause: format!("{:?}: {}", s.code(), s.message()),
            },
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                DcsError::Unreachable {
                    op,
                    endpoints,
                    cause: cause_chain(&e),
                }
            }
            _ => DcsError::Failed {
                op,
                endpoints,
                cause: cause_chain(&e),
            },
        }
    }

    /// Runs one request under the request deadline.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, DcsError> {
        self.count();
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(op, e)),
            Err(_) => Err(DcsError::Timeout {
                op,
                after: self.request_timeout,
                endpoints: self.endpoints.clone(),
            }),
        }
    }

    fn holder(&self, kv: &KeyValue) -> Holder {
        holder_of(&self.node, kv)
    }

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

    /// Writes `members/{node}` under `lease`.
    /// Another node's member record, if it has one.
    pub async fn get_member(&mut self, node: &str) -> Result<Option<Vec<u8>>, DcsError> {
        let mut kv = self.client.kv_client();
        let key = format!("{}{}", self.members_prefix, node);
        let r = self.call("get member", kv.get(key, None)).await?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub async fn put_member(&mut self, lease: LeaseId, value: &str) -> Result<(), DcsError> {
        let mut kv = self.client.kv_client();
        let key = self.member_key();
        self.call(
            "put member",
            kv.put(key, value, Some(PutOptions::new().with_lease(lease.0))),
        )
        .await
        .map(|_| ())
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

fn holder_of(node: &str, kv: &KeyValue) -> Holder {
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
