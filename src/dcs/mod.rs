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
//! - `sync`: the synchronous standby set (`decide::sync::SyncState` as
//!   JSON), no lease (it must outlive its leader), written only by a
//!   transaction that compares the leader key on the writer's lease
//!   (`dcs::sync`).
//! - `initialize`: who created the scope's cluster (`dcs::initialize`).
//! - `config`: cluster-wide settings, JSON (`dcs::cluster_config`, `config::cluster`).
//! - `history/{node}/{seq:020}-{hash[..16]}`: one mirrored audit record
//!   (FENCING.md rule 7), the record's JSON unchanged. No lease: the history
//!   must outlive the node. Its order across nodes is etcd's own: the create
//!   revision of each key (the revision of the put), which is how
//!   [`Dcs::history`] reads it and how trimming picks the oldest
//!   (`etcdctl get --prefix --sort-by=CREATE` shows the same order). Within
//!   one node the key order is the node's `seq` order too. The newest
//!   [`HISTORY_KEEP`] are kept; every [`HISTORY_TRIM_EVERY`] appends (and on
//!   a connection's first) the oldest beyond that are deleted.
//!
//! By concept: `dcs::lease` holds the lease and the leader key (grant,
//! keepalive, acquire, release, revoke, time-to-live, the leader watch);
//! `dcs::history` the audit history; this module the connection, errors and
//! member records.

mod cluster_config;
mod history;
mod holders;
mod initialize;
mod lease;
mod maintenance;
mod switchover;
mod sync;

pub use history::{HISTORY_KEEP, HISTORY_TRIM_EVERY};
pub use holders::PreviousHolders;
pub use initialize::parse_initialize;
pub use lease::{Acquire, LeaderEvent, LeaderWatch, Released, Renewal};
pub use maintenance::{OpOutcome, OpRequest, PauseRecord};

use crate::config::EtcdConfig;
use etcd_client::{
    Client, ConnectOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
};
use lease::holder_of;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// What the agent writes into the leader key's `agent` field.
pub const AGENT: &str = concat!("leasedog/", env!("CARGO_PKG_VERSION"));

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

    /// Another node's member record, if it has one.
    pub async fn get_member(&mut self, node: &str) -> Result<Option<Vec<u8>>, DcsError> {
        let mut kv = self.client.kv_client();
        let key = format!("{}{}", self.members_prefix, node);
        let r = self.call("get member", kv.get(key, None)).await?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes `members/{node}` under `lease`.
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
