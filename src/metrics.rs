//! The Prometheus `/metrics` and JSON `/status` endpoint.
//!
//! The agent writes into an `Arc<Metrics>` (atomics, plus one mutex for the
//! few strings it updates on change); a plain std thread serves HTTP/1.1 GET
//! from it. The HTTP thread never touches the decision core, the pinger's
//! devices or etcd: a slow or hostile client can at worst delay other
//! scrapes (one connection at a time, each bounded by a short timeout).

use crate::clock::{self, BootTime};
use crate::decide::Evidence;
use crate::evidence::{EvidenceCell, PingStats};
use crate::health::{PgState, Snapshot};
use crate::timing::{self, Budget};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the renewal round-trip histogram.
pub const RTT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What a client reading one connection may take before it is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of `RTT_BUCKETS`, then overflow.
    buckets: [AtomicU64; RTT_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = RTT_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(RTT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// An armed device as shown by `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ArmedInfo {
    pub path: String,
    pub w_s: u32,
    pub nowayout: bool,
}

#[derive(Debug, Clone, Default)]
struct Labels {
    role: String,
    holder: Option<String>,
    armed: Vec<ArmedInfo>,
    /// For the health endpoints: PostgreSQL as last observed, and a
    /// replica's lag behind the leader's last published position.
    postgres: PgState,
    lag_bytes: Option<u64>,
}

/// Everything the endpoint reports. The agent updates it; readers only read.
#[derive(Debug)]
pub struct Metrics {
    pub node: String,
    pub scope: String,
    /// The target watchdog timeout `W = T - M`, whole seconds.
    pub w_secs: u64,
    leader: AtomicU64,
    pub loops: AtomicU64,
    /// Every etcd request the agent made (the driver counts them).
    pub etcd_requests: Arc<AtomicU64>,
    pub step_downs: AtomicU64,
    pub renewal_failures: AtomicU64,
    pub renewal_rtt: Histogram,
    /// BOOTTIME ns of `s`, the last fresh renewal's send time; 0: none.
    last_fresh_ns: AtomicU64,
    labels: Mutex<Labels>,
    pings: OnceLock<Arc<PingStats>>,
    evidence: OnceLock<Arc<EvidenceCell>>,
}

/// The `/status` document (also what `leasedog status` reads back).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub node: String,
    pub scope: String,
    pub version: String,
    pub role: String,
    /// Whether this node holds the leader key with its current lease.
    pub leader: bool,
    /// The key's holder as this node last saw it ("(this node)", a name, or none).
    pub holder: Option<String>,
    pub armed_devices: Vec<ArmedInfo>,
    pub w_s: u64,
    /// `now - s`: seconds since the send time of the last fresh renewal.
    pub since_fresh_renewal_s: Option<f64>,
    /// What the pinger holds: `lease`, `liveness` or `none`.
    pub evidence: String,
    pub pings: u64,
    pub refused: u64,
    pub step_downs: u64,
    pub etcd_requests: u64,
    pub loops: u64,
}

impl Metrics {
    pub fn new(node: &str, scope: &str, w_secs: u64) -> Metrics {
        Metrics {
            node: node.into(),
            scope: scope.into(),
            w_secs,
            leader: AtomicU64::new(0),
            loops: AtomicU64::new(0),
            etcd_requests: Arc::new(AtomicU64::new(0)),
            step_downs: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            renewal_rtt: Histogram::default(),
            last_fresh_ns: AtomicU64::new(0),
            labels: Mutex::new(Labels {
                role: "Starting".into(),
                ..Labels::default()
            }),
            pings: OnceLock::new(),
            evidence: OnceLock::new(),
        }
    }

    /// Connects the pinger's counters and the published evidence (read only).
    pub fn attach(&self, pings: Arc<PingStats>, evidence: Arc<EvidenceCell>) {
        let _ = self.pings.set(pings);
        let _ = self.evidence.set(evidence);
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, Labels> {
        self.labels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates role, holder, leadership and `s`. Returns whether role,
    /// holder or leadership changed (for sd_notify STATUS=).
    pub fn set_state(
        &self,
        role: &str,
        holder: Option<String>,
        leader: bool,
        s: Option<BootTime>,
    ) -> bool {
        self.last_fresh_ns
            .store(s.map_or(0, |s| s.as_nanos().max(1)), Relaxed);
        let was = self.leader.swap(leader as u64, Relaxed);
        let mut l = self.labels();
        let changed = l.role != role || l.holder != holder || was != leader as u64;
        if changed {
            l.role = role.into();
            l.holder = holder;
        }
        changed
    }

    /// PostgreSQL as the agent last observed it, for the health endpoints.
    pub fn set_postgres(&self, postgres: PgState, lag_bytes: Option<u64>) {
        let mut l = self.labels();
        l.postgres = postgres;
        l.lag_bytes = lag_bytes;
    }

    /// What the health endpoints judge at `now`. "Leader" is rule 1's test on
    /// the evidence the pinger holds: the endpoint stops saying "primary" at
    /// the instant the pings stop.
    pub fn health_snapshot(&self, now: BootTime, budget: &Budget) -> Snapshot {
        let fresh = match self.evidence.get().map(|e| e.load()) {
            Some(Evidence::Lease(s)) => timing::ping_permitted(now, s, budget),
            _ => false,
        };
        let l = self.labels();
        Snapshot {
            node: self.node.clone(),
            leader_fresh: fresh && self.leader.load(Relaxed) == 1,
            holder: l.holder.clone(),
            postgres: l.postgres,
            lag_bytes: l.lag_bytes,
        }
    }

    pub fn add_armed(&self, d: ArmedInfo) {
        let mut l = self.labels();
        l.armed.retain(|a| a.path != d.path);
        l.armed.push(d);
    }

    /// Keeps only the devices named in `kept` (nowayout ones stay armed).
    pub fn keep_armed(&self, kept: &[String]) {
        self.labels().armed.retain(|a| kept.contains(&a.path));
    }

    pub fn armed(&self) -> Vec<ArmedInfo> {
        self.labels().armed.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Relaxed) == 1
    }

    /// One line for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let l = self.labels();
        let armed: Vec<&str> = l.armed.iter().map(|a| a.path.as_str()).collect();
        format!(
            "{}; leader: {}; armed: {}",
            l.role,
            l.holder.as_deref().unwrap_or("none"),
            if armed.is_empty() {
                "none".to_string()
            } else {
                format!("{} (W {} s)", armed.join(", "), self.w_secs)
            }
        )
    }

    pub fn status(&self) -> Status {
        self.status_at(clock::now())
    }

    fn since_fresh(&self, now: BootTime) -> Option<f64> {
        match self.last_fresh_ns.load(Relaxed) {
            0 => None,
            s => Some(now.saturating_since(BootTime::from_nanos(s)).as_secs_f64()),
        }
    }

    fn status_at(&self, now: BootTime) -> Status {
        let l = self.labels().clone();
        let (pings, refused) = self
            .pings
            .get()
            .map_or((0, 0), |p| (p.pings.load(Relaxed), p.refused.load(Relaxed)));
        Status {
            node: self.node.clone(),
            scope: self.scope.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            role: l.role,
            leader: self.is_leader(),
            holder: l.holder,
            armed_devices: l.armed,
            w_s: self.w_secs,
            since_fresh_renewal_s: self.since_fresh(now),
            evidence: self
                .evidence
                .get()
                .map_or("none", |c| match c.load() {
                    Evidence::None => "none",
                    Evidence::Lease(_) => "lease",
                    Evidence::Liveness(_) => "liveness",
                })
                .into(),
            pings,
            refused,
            step_downs: self.step_downs.load(Relaxed),
            etcd_requests: self.etcd_requests.load(Relaxed),
            loops: self.loops.load(Relaxed),
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let now = clock::now();
        let st = self.status_at(now);
        let mut o = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "leasedog_info",
            "gauge",
            "This agent's node, scope and version.",
            &[(
                format!(
                    "{{node=\"{}\",scope=\"{}\",version=\"{}\"}}",
                    esc(&st.node),
                    esc(&st.scope),
                    esc(&st.version)
                ),
                "1".into(),
            )],
        );
        metric(
            "leasedog_leader",
            "gauge",
            "1 while this node holds the leader key under its current lease.",
            &one((st.leader as u8).to_string()),
        );
        metric(
            "leasedog_role",
            "gauge",
            "The decision core's role (1 for the current one).",
            &[(format!("{{role=\"{}\"}}", esc(&st.role)), "1".into())],
        );
        let mut rtt = Vec::new();
        let mut cum = 0;
        for (i, b) in RTT_BUCKETS.iter().enumerate() {
            cum += self.renewal_rtt.buckets[i].load(Relaxed);
            rtt.push((format!("_bucket{{le=\"{b}\"}}"), cum.to_string()));
        }
        cum += self.renewal_rtt.buckets[RTT_BUCKETS.len()].load(Relaxed);
        rtt.push(("_bucket{le=\"+Inf\"}".into(), cum.to_string()));
        rtt.push(("_sum".into(), secs(self.renewal_rtt.sum_ns.load(Relaxed))));
        rtt.push(("_count".into(), cum.to_string()));
        metric(
            "leasedog_renewal_rtt_seconds",
            "histogram",
            "Round trip of acknowledged lease renewals (send to ack).",
            &rtt,
        );
        if let Some(p) = self.pings.get() {
            let mut lat = Vec::new();
            let mut cum = 0;
            for (i, c) in p.lateness_us_log2.iter().enumerate() {
                cum += c.load(Relaxed);
                let le = (1u64 << (i + 1)) as f64 / 1e6;
                lat.push((format!("_bucket{{le=\"{le}\"}}"), cum.to_string()));
            }
            lat.push(("_bucket{le=\"+Inf\"}".into(), cum.to_string()));
            lat.push(("_sum".into(), secs(p.lateness_sum_ns.load(Relaxed))));
            lat.push(("_count".into(), cum.to_string()));
            metric(
                "leasedog_ping_lateness_seconds",
                "histogram",
                "How late the pinger thread woke for its ticks.",
                &lat,
            );
        }
        metric(
            "leasedog_pings_total",
            "counter",
            "Ping rounds sent to every armed device.",
            &one(st.pings.to_string()),
        );
        metric(
            "leasedog_pings_refused_total",
            "counter",
            "Pings withheld because the lease evidence was older than M - R.",
            &one(st.refused.to_string()),
        );
        metric(
            "leasedog_step_downs_total",
            "counter",
            "Step-downs begun (lost or stale lease, shutdown, failed promotion).",
            &one(st.step_downs.to_string()),
        );
        metric(
            "leasedog_renewal_failures_total",
            "counter",
            "Renewals that timed out or failed.",
            &one(self.renewal_failures.load(Relaxed).to_string()),
        );
        if let Some(age) = st.since_fresh_renewal_s {
            metric(
                "leasedog_lease_evidence_age_seconds",
                "gauge",
                "now - s: age of the last fresh renewal's send time.",
                &one(format!("{age:.6}")),
            );
        }
        metric(
            "leasedog_armed_devices",
            "gauge",
            "Watchdog devices armed and pinged by this node.",
            &one(st.armed_devices.len().to_string()),
        );
        metric(
            "leasedog_watchdog_timeout_seconds",
            "gauge",
            "W = T - M, the watchdog timeout the agent sets.",
            &one(st.w_s.to_string()),
        );
        metric(
            "leasedog_etcd_requests_total",
            "counter",
            "etcd requests made by the agent.",
            &one(st.etcd_requests.to_string()),
        );
        metric(
            "leasedog_loops_total",
            "counter",
            "Main loop iterations (one renewal each while holding a lease).",
            &one(st.loops.to_string()),
        );
        o
    }
}

fn secs(ns: u64) -> String {
    format!("{:.9}", ns as f64 / 1e9)
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds `listen` and serves `/metrics` and `/status` from a std thread.
/// Returns the bound address (`listen` may use port 0).
pub fn serve(listen: &str, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("leasedog-metrics".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let _ = handle(c, &metrics);
                    }
                    // e.g. out of descriptors: do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(addr)
}

fn handle(mut c: TcpStream, m: &Metrics) -> io::Result<()> {
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            return respond(
                &mut c,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(&mut c, "405 Method Not Allowed", "text/plain", "GET only\n");
    }
    match path {
        "/metrics" => respond(
            &mut c,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &m.render(),
        ),
        "/status" => {
            let body = serde_json::to_string_pretty(&m.status()).expect("status serializes");
            respond(&mut c, "200 OK", "application/json", &(body + "\n"))
        }
        _ => respond(
            &mut c,
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n",
        ),
    }
}

fn respond(c: &mut TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    c.flush()
}

/// A GET of `path` from a leasedog endpoint at `addr` (for `leasedog status`
/// and tests): the body of a 200 answer, or why there is none.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let sa: SocketAddr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an IP:PORT address: {e}"))?;
    let mut c =
        TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    c.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: malformed HTTP answer"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(format!("{addr}{path}: {status}"));
    }
    Ok(body.to_string())
}

/// The value of an unlabeled sample `name` in a `/metrics` text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/primary` follows rule 1 on the evidence the pinger holds: it stops
    /// the instant pings would, and never for a node that does not lead.
    #[test]
    fn health_snapshot_is_leader_only_on_fresh_lease_evidence() {
        let s = |secs: f64| BootTime::from_nanos((secs * 1e9) as u64);
        let budget = Budget::new(
            Duration::from_secs(5),
            Duration::from_secs(2),
            Duration::from_secs(1),
            Duration::from_millis(500),
            Duration::from_millis(400),
        )
        .unwrap();
        let m = Metrics::new("a", "main", 3);
        let cell = Arc::new(EvidenceCell::default());
        m.attach(Arc::new(PingStats::default()), cell.clone());
        m.set_postgres(PgState::Primary, None);
        m.set_state("leader", Some("a".into()), true, Some(s(10.0)));
        cell.store(Evidence::Lease(s(10.0)));
        let snap = m.health_snapshot(s(10.9), &budget);
        assert!(
            snap.leader_fresh && snap.postgres == PgState::Primary,
            "{snap:?}"
        );
        // Past s + M - R: the pinger stops, and so does "leader".
        assert!(!m.health_snapshot(s(11.1), &budget).leader_fresh);
        // Pings on liveness (a nowayout replica) are no leadership.
        cell.store(Evidence::Liveness(s(10.0)));
        assert!(!m.health_snapshot(s(10.5), &budget).leader_fresh);
        // Lease evidence but not leading (a step-down still renewing).
        cell.store(Evidence::Lease(s(10.0)));
        m.set_state("stepping_down", Some("a".into()), false, Some(s(10.0)));
        assert!(!m.health_snapshot(s(10.5), &budget).leader_fresh);
    }

    #[test]
    fn renders_and_serves_metrics_and_status() {
        let m = Arc::new(Metrics::new("a", "main", 5));
        let stats = Arc::new(PingStats::default());
        stats.pings.store(7, Relaxed);
        stats.refused.store(2, Relaxed);
        stats.lateness_us_log2[3].store(4, Relaxed);
        let cell = Arc::new(EvidenceCell::default());
        m.attach(stats, cell.clone());
        m.renewal_rtt.observe(Duration::from_millis(3));
        m.renewal_rtt.observe(Duration::from_secs(9));
        assert!(m.set_state(
            "Leader",
            Some("(this node)".into()),
            true,
            Some(clock::now())
        ));
        assert!(!m.set_state(
            "Leader",
            Some("(this node)".into()),
            true,
            Some(clock::now())
        ));
        m.add_armed(ArmedInfo {
            path: "/dev/watchdog0".into(),
            w_s: 5,
            nowayout: false,
        });
        m.step_downs.fetch_add(1, Relaxed);
        let addr = serve("127.0.0.1:0", m.clone()).unwrap().to_string();
        let text = get(&addr, "/metrics", Duration::from_secs(5)).unwrap();
        assert_eq!(sample(&text, "leasedog_leader"), Some(1.0));
        assert_eq!(sample(&text, "leasedog_pings_total"), Some(7.0));
        assert_eq!(sample(&text, "leasedog_pings_refused_total"), Some(2.0));
        assert_eq!(sample(&text, "leasedog_step_downs_total"), Some(1.0));
        assert_eq!(sample(&text, "leasedog_armed_devices"), Some(1.0));
        assert_eq!(
            sample(&text, "leasedog_renewal_rtt_seconds_count"),
            Some(2.0)
        );
        assert!(text.contains("leasedog_renewal_rtt_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("leasedog_renewal_rtt_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("leasedog_renewal_rtt_seconds_bucket{le=\"2.5\"} 1"));
        assert!(text.contains("leasedog_renewal_rtt_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("leasedog_ping_lateness_seconds_bucket{le=\"0.000016\"} 4"));
        assert!(text.contains("leasedog_role{role=\"Leader\"} 1"));
        assert!(sample(&text, "leasedog_lease_evidence_age_seconds").unwrap() < 60.0);
        let st: Status =
            serde_json::from_str(&get(&addr, "/status", Duration::from_secs(5)).unwrap()).unwrap();
        assert_eq!(st.role, "Leader");
        assert!(st.leader);
        assert_eq!(st.armed_devices.len(), 1);
        assert_eq!((st.pings, st.refused, st.w_s), (7, 2, 5));
        assert_eq!(st.evidence, "none");
        let err = get(&addr, "/nope", Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("404"), "{err}");
        assert!(
            m.summary().contains("/dev/watchdog0 (W 5 s)"),
            "{}",
            m.summary()
        );
        m.keep_armed(&[]);
        assert!(m.armed().is_empty());
    }
}
