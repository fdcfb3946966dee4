//! Health endpoints for load balancers and VIP managers (HAProxy's
//! `option httpchk`, keepalived's checks): `GET`, `HEAD` or `OPTIONS` of
//!
//! | path | 200 when |
//! |---|---|
//! | `/primary` (`/read-write`) | this node holds the leader key on a fresh lease **and** PostgreSQL is writable |
//! | `/replica` (`?lag=BYTES`) | this node does not lead, PostgreSQL runs in recovery, and its lag is known and within `lag` if given |
//! | `/read-only` | `/primary` or `/replica` would answer 200 |
//! | `/leader` | this node holds the leader key on a fresh lease (whatever PostgreSQL does) |
//! | `/health` | PostgreSQL is running (primary or replica) |
//!
//! and 503 otherwise, with the [`Snapshot`] as a JSON body (none for `HEAD`).
//! "Fresh" is rule 1's test: the pinger may ping right now. So a leader whose
//! renewals stall stops answering 200 on `/primary` at the same instant its
//! pings stop, well before its watchdog fires: the load balancer moves away
//! from it before any other node can be promoted.
//!
//! The server (hyper, HTTP/1.1) runs on a thread of its own with a runtime of
//! its own: it reads a snapshot the agent keeps current and never touches the
//! core, etcd, PostgreSQL or the pinger.

use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// PostgreSQL as the agent last observed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PgState {
    #[default]
    Unknown,
    Down,
    Primary,
    Replica,
    /// A rejoin or clone is running.
    Busy,
}

/// What the endpoints judge, read at the moment of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub node: String,
    /// This node holds the key on its current lease, and rule 1 permits a
    /// ping right now.
    pub leader_fresh: bool,
    /// The key's holder as this node last saw it.
    pub holder: Option<String>,
    pub postgres: PgState,
    /// Replica: bytes behind the leader's last published position.
    pub lag_bytes: Option<u64>,
}

/// The endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Primary,
    Replica { max_lag: Option<u64> },
    ReadOnly { max_lag: Option<u64> },
    Leader,
    Health,
}

impl Check {
    /// `path` with its query string; `None` for an unknown path or a
    /// malformed `lag`.
    pub fn parse(path_and_query: &str) -> Option<Check> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let mut max_lag = None;
        // Other parameters are ignored: load balancers add their own.
        for kv in query.split('&') {
            if let Some(("lag", v)) = kv.split_once('=') {
                max_lag = Some(v.parse().ok()?);
            }
        }
        Some(match path.trim_end_matches('/') {
            "/primary" | "/read-write" => Check::Primary,
            "/replica" => Check::Replica { max_lag },
            "/read-only" => Check::ReadOnly { max_lag },
            "/leader" => Check::Leader,
            "/health" => Check::Health,
            _ => return None,
        })
    }
}

/// Whether `check` passes for `s`.
pub fn passes(check: Check, s: &Snapshot) -> bool {
    match check {
        Check::Primary => s.leader_fresh && s.postgres == PgState::Primary,
        Check::Replica { max_lag } => {
            !s.leader_fresh
                && s.postgres == PgState::Replica
                && match (max_lag, s.lag_bytes) {
                    (None, _) => true,
                    (Some(max), Some(lag)) => lag <= max,
                    // A bound was asked for and the lag is not known.
                    (Some(_), None) => false,
                }
        }
        Check::ReadOnly { max_lag } => {
            passes(Check::Primary, s) || passes(Check::Replica { max_lag }, s)
        }
        Check::Leader => s.leader_fresh,
        Check::Health => matches!(s.postgres, PgState::Primary | PgState::Replica),
    }
}

/// Status code and body for a request line (method, path with query).
pub fn respond(method: &str, path_and_query: &str, s: &Snapshot) -> (u16, Option<String>) {
    if !matches!(method, "GET" | "HEAD" | "OPTIONS") {
        return (405, Some("only GET, HEAD and OPTIONS\n".into()));
    }
    let Some(check) = Check::parse(path_and_query) else {
        return (
            404,
            Some(
                "endpoints: /primary /read-write /replica[?lag=BYTES] /read-only[?lag=BYTES] \
                 /leader /health\n"
                    .into(),
            ),
        );
    };
    let code = if passes(check, s) { 200 } else { 503 };
    let body = (method != "HEAD").then(|| serde_json::to_string(s).expect("snapshot serializes"));
    (code, body)
}

/// What one request may take before its connection is dropped.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves the endpoints from a thread of its own; returns
/// the bound address. `snapshot` is called once per request.
pub fn serve(
    addr: &str,
    snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("leasedog-health".into())
        .stack_size(256 * 1024)
        .spawn(move || rt.block_on(accept_loop(std_listener, snapshot)))?;
    Ok(bound)
}

async fn accept_loop(
    std_listener: std::net::TcpListener,
    snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = match tokio::net::TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("health endpoint: {e}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("health endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string();
                    let (code, body) = respond(req.method().as_str(), &pq, &snapshot());
                    let mut resp =
                        hyper::Response::new(Full::new(Bytes::from(body.unwrap_or_default())));
                    *resp.status_mut() = hyper::StatusCode::from_u16(code).expect("valid status");
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONN_TIMEOUT, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(leader_fresh: bool, postgres: PgState, lag: Option<u64>) -> Snapshot {
        Snapshot {
            node: "pg1".into(),
            leader_fresh,
            holder: None,
            postgres,
            lag_bytes: lag,
        }
    }

    #[test]
    fn primary_needs_a_fresh_lease_and_a_writable_server() {
        assert!(passes(Check::Primary, &snap(true, PgState::Primary, None)));
        // Writable without a fresh lease (stalled renewals, a stale key):
        // the balancer must move away before anyone else can be promoted.
        assert!(!passes(
            Check::Primary,
            &snap(false, PgState::Primary, None)
        ));
        // Leading, still promoting (PostgreSQL in recovery).
        assert!(!passes(Check::Primary, &snap(true, PgState::Replica, None)));
        assert!(passes(Check::Leader, &snap(true, PgState::Replica, None)));
        assert!(!passes(Check::Leader, &snap(false, PgState::Primary, None)));
    }

    #[test]
    fn replica_honours_the_lag_bound_and_refuses_an_unknown_lag() {
        let r = |lag| snap(false, PgState::Replica, lag);
        assert!(passes(Check::Replica { max_lag: None }, &r(None)));
        assert!(passes(Check::Replica { max_lag: Some(100) }, &r(Some(100))));
        assert!(!passes(
            Check::Replica { max_lag: Some(100) },
            &r(Some(101))
        ));
        assert!(!passes(Check::Replica { max_lag: Some(100) }, &r(None)));
        assert!(!passes(
            Check::Replica { max_lag: None },
            &snap(false, PgState::Busy, None)
        ));
        assert!(!passes(
            Check::Replica { max_lag: None },
            &snap(true, PgState::Replica, None)
        ));
        let ro = Check::ReadOnly { max_lag: Some(10) };
        assert!(passes(ro, &snap(true, PgState::Primary, None)));
        assert!(passes(ro, &r(Some(5))));
        assert!(!passes(ro, &snap(false, PgState::Primary, None)));
    }

    #[test]
    fn health_is_postgres_running() {
        assert!(passes(Check::Health, &snap(false, PgState::Replica, None)));
        assert!(passes(Check::Health, &snap(false, PgState::Primary, None)));
        assert!(!passes(Check::Health, &snap(false, PgState::Down, None)));
        assert!(!passes(Check::Health, &snap(false, PgState::Unknown, None)));
    }

    #[test]
    fn paths_methods_and_queries() {
        assert_eq!(Check::parse("/read-write"), Some(Check::Primary));
        assert_eq!(Check::parse("/primary/"), Some(Check::Primary));
        assert_eq!(
            Check::parse("/replica?lag=1048576&x=1"),
            Some(Check::Replica {
                max_lag: Some(1048576)
            })
        );
        assert_eq!(Check::parse("/replica?lag=1MB"), None);
        assert_eq!(Check::parse("/master"), None);
        let s = snap(true, PgState::Primary, None);
        assert_eq!(respond("GET", "/primary", &s).0, 200);
        assert_eq!(respond("HEAD", "/primary", &s), (200, None));
        assert_eq!(respond("OPTIONS", "/replica", &s).0, 503);
        assert_eq!(respond("POST", "/primary", &s).0, 405);
        assert_eq!(respond("GET", "/nope", &s).0, 404);
        let body = respond("GET", "/leader", &s).1.unwrap();
        assert!(body.contains("\"postgres\":\"primary\""), "{body}");
    }

    /// Over a real socket: the answer follows the snapshot of the moment.
    #[test]
    fn the_server_answers_from_the_current_snapshot() {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let leading = Arc::new(AtomicBool::new(true));
        let l = leading.clone();
        let addr = serve(
            "127.0.0.1:0",
            Arc::new(move || snap(l.load(Ordering::SeqCst), PgState::Primary, None)),
        )
        .unwrap();
        let get = |path: &str| -> String {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                c,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        };
        assert!(get("/primary").starts_with("HTTP/1.1 200"));
        leading.store(false, Ordering::SeqCst);
        let r = get("/primary");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("\"leader_fresh\":false"), "{r}");
    }
}
