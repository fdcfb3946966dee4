//! `leasedog-bench failover [--trials N] [--ttl T]`: the failover benchmark.
//!
//! Each trial builds a fresh 2-node scope (real PostgreSQL 15, real etcd,
//! two agents with fake watchdog devices and the monitor that SIGKILLs a node
//! whose device expires), lets it settle, measures steady state (agent RSS
//! and CPU, etcd requests per node per loop), then stalls the leader with
//! SIGSTOP: either its agent and postmaster only (its backends keep serving
//! the kept connection), or its agent and every PostgreSQL process. The stall
//! is held until a few seconds after the other node is promoted, then
//! SIGCONT. Two writers insert a row every 100 ms (one connects per insert
//! through a multi-host read-write connection string, one keeps its
//! connection), a probe asks both nodes `pg_is_in_recovery()` every 100 ms
//! (on a kept connection, which still reaches backends of a stopped
//! postmaster, and on a new one). Synchronous and asynchronous replication
//! alternate between trials. After the stall the stopped node's agent is
//! started again (the node "rebooted") and rejoins.
//!
//! `--nodes 3` (issue 12): a third node, `c`, an asynchronous standby kept
//! behind (its WAL receiver SIGSTOPped from before the stall until after the
//! promotion) beside `b`, the synchronous standby recorded in etcd's `sync`
//! key. In synchronous trials `b` must win and no acknowledged insert may be
//! lost; the table names the winner.
//!
//! Needs the agent built with the `testing` feature (fake devices):
//! `cargo build --features testing`, or set LEASEDOG_BIN. Writes
//! target/failover-bench.json.

use leasedog_testbed::agent::AgentProcess;
use leasedog_testbed::clients::{self, Attempt, Every, Target};
use leasedog_testbed::etcd::{boottime_ns, EtcdServer, EventKind, KeyWatch};
use leasedog_testbed::fence::FakeWatchdogMonitor;
use leasedog_testbed::history::{self, History};
use leasedog_testbed::lab::scenario::holder;
use leasedog_testbed::pg::{free_port, processes_in, PgNode};
use leasedog_testbed::wait_until;
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const HOLD_AFTER_PROMOTION: Duration = Duration::from_secs(3);
const WRITE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stall {
    /// SIGSTOP of the agent and the postmaster only.
    AgentPostmaster,
    /// SIGSTOP of the agent and every PostgreSQL process.
    Everything,
}

impl Stall {
    fn name(self) -> &'static str {
        match self {
            Stall::AgentPostmaster => "agent+postmaster",
            Stall::Everything => "agent+all-postgres",
        }
    }
}

struct Args {
    trials: usize,
    ttl: u64,
    bin: PathBuf,
    /// 2 (a, b) or 3 (a, b, c: c asynchronous and kept behind).
    nodes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    match it.next().as_deref() {
        Some("failover") => {}
        other => {
            return Err(format!(
            "usage: leasedog-bench failover [--trials N] [--ttl T] [--nodes 2|3] (got {other:?})"
        ))
        }
    }
    let mut a = Args {
        trials: 10,
        ttl: 10,
        nodes: 2,
        bin: std::env::var_os("LEASEDOG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/leasedog")
            }),
    };
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--trials" => a.trials = v.parse().map_err(|e| format!("--trials: {e}"))?,
            "--ttl" => a.ttl = v.parse().map_err(|e| format!("--ttl: {e}"))?,
            "--nodes" => {
                a.nodes = match v.as_str() {
                    "2" => 2,
                    "3" => 3,
                    _ => return Err(format!("--nodes: {v} is not 2 or 3")),
                }
            }
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.ttl < 4 {
        return Err("--ttl must be at least 4".into());
    }
    if !a.bin.exists() {
        return Err(format!(
            "no agent binary at {} (cargo build --features testing, or set LEASEDOG_BIN)",
            a.bin.display()
        ));
    }
    Ok(a)
}

struct Node {
    name: &'static str,
    dir: tempfile::TempDir,
    agent_pid: Arc<AtomicI32>,
    agent: Option<AgentProcess>,
    monitor: FakeWatchdogMonitor,
    pg: PgNode,
}

impl Node {
    fn new(name: &'static str, pg: PgNode) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("leasedog-bench-{name}-"))
            .tempdir()
            .unwrap();
        let agent_pid = Arc::new(AtomicI32::new(0));
        let monitor =
            FakeWatchdogMonitor::for_node(dir.path().join("wd"), agent_pid.clone(), pg.data_dir());
        Node {
            name,
            dir,
            agent_pid,
            agent: None,
            monitor,
            pg,
        }
    }

    fn start_agent(&mut self, bin: &Path, eps: &[String], ttl: u64, sync: bool) {
        let b = BenchBudget::for_ttl(ttl);
        let cfg = format!(
            r#"scope = "bench"
node = "{name}"
[etcd]
endpoints = [{eps}]
request_timeout = {request_timeout}
[timing]
ttl = {ttl}
safety_margin = {margin}
reset_allowance = {reset_allowance}
loop_interval = {loop_interval}
[watchdog]
mode = "required"
ping_interval = 0.1
[[watchdog.device]]
kind = "fake"
record = "{record}"
[audit]
dir = "{audit}"
[postgres]
host = "{socket}"
port = {port}
data_dir = "{data}"
advertise_host = "127.0.0.1"
synchronous_mode = {sync}
"#,
            name = self.name,
            margin = b.margin,
            reset_allowance = b.reset_allowance,
            loop_interval = b.loop_interval,
            request_timeout = b.request_timeout,
            eps = eps
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            record = self.dir.path().join("wd").display(),
            audit = self.dir.path().join("audit").display(),
            socket = self.pg.socket_dir().display(),
            port = self.pg.port,
            data = self.pg.data_dir().display(),
        );
        self.agent = None;
        let a = AgentProcess::spawn(bin, self.name, &cfg, &[]).unwrap();
        self.agent_pid.store(a.pid() as i32, Ordering::SeqCst);
        self.agent = Some(a);
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().unwrap()
    }

    /// utime + stime of the agent, in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.agent().pid())).ok()?;
        let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }
}

/// A budget the agent's own validation accepts for `T = ttl`: `M = T / 2`
/// (whole seconds), `R = 1`, and the loop's work (one loop interval plus one
/// etcd request timeout) inside `M - R`, capped at the defaults of 1 s each.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BenchBudget {
    margin: f64,
    reset_allowance: f64,
    loop_interval: f64,
    request_timeout: f64,
}

impl BenchBudget {
    fn for_ttl(ttl: u64) -> BenchBudget {
        let margin = (ttl / 2) as f64;
        let reset_allowance = 1.0;
        let room = margin - reset_allowance;
        let loop_interval = (room / 2.0).min(1.0);
        let request_timeout = (room - loop_interval - 0.1).min(1.0);
        BenchBudget {
            margin,
            reset_allowance,
            loop_interval,
            request_timeout,
        }
    }
}

/// The agent's log when it did not reach `what`: its own error (a refused
/// budget, an unreachable etcd) says why, which a bare "never led" hides.
fn agent_failed(node: &Node, what: &str) -> String {
    let log = node.agent().log();
    let tail: Vec<&str> = log.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "{what}; agent {} log tail:\n  {}",
        node.name,
        tail.join("\n  ")
    )
}

fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) on processes this benchmark started.
        unsafe { libc::kill(pid, sig) };
    }
}

/// `grpc_server_msg_received_total` per gRPC method (every message etcd
/// received: unary requests and each keepalive / watch message on streams).
fn etcd_requests(client_url: &str) -> Option<std::collections::BTreeMap<String, f64>> {
    let addr = client_url.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let mut out = std::collections::BTreeMap::new();
    for l in body
        .lines()
        .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
    {
        let method = l
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *out.entry(method.to_string()).or_insert(0.0) += v;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Writers and the probe: leasedog_testbed::clients, on a runtime of their own

const NAMES: [&str; 3] = ["a", "b", "c"];

// ---------------------------------------------------------------------------
// One trial

#[derive(Debug, Default, Clone)]
struct Trial {
    stall: &'static str,
    sync: bool,
    key_deleted_s: Option<f64>,
    promoted_s: Option<f64>,
    reset_s: Option<f64>,
    reset_before_promotion: Option<bool>,
    gap_new_conn_s: Option<f64>,
    gap_kept_conn_s: Option<f64>,
    two_writable_intervals: usize,
    /// The history checker's verdict (testbed::history).
    double_writable: usize,
    verdict: Option<serde_json::Value>,
    lost_acked_new_conn: usize,
    lost_acked_kept_conn: usize,
    /// The node promoted after the stall (3-node mode: `b`, never `c`, in
    /// synchronous trials).
    winner: Option<&'static str>,
    rss_kib_max: u64,
    cpu_percent: f64,
    etcd_req_per_node_per_loop: Option<f64>,
    /// The same, per gRPC method.
    etcd_by_method: String,
    error: Option<String>,
}

fn secs_since(t0: u64, t: u64) -> f64 {
    (t as f64 - t0 as f64) / 1e9
}

fn run_trial(args: &Args, rt: &tokio::runtime::Runtime, stall: Stall, sync: bool) -> Trial {
    let mut t = Trial {
        stall: stall.name(),
        sync,
        ..Default::default()
    };
    if let Err(e) = trial_inner(args, rt, stall, sync, &mut t) {
        t.error = Some(e);
    }
    t
}

fn trial_inner(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    stall: Stall,
    sync: bool,
    t: &mut Trial,
) -> Result<(), String> {
    let etcd = EtcdServer::start().map_err(|e| format!("etcd: {e}"))?;
    let eps = etcd.endpoints();
    let watch = KeyWatch::start(&eps, "/leasedog/bench/leader").map_err(|e| e.to_string())?;
    let pg_a = PgNode::init(free_port());
    pg_a.start();
    pg_a.sql("CREATE TABLE bench (id bigint PRIMARY KEY, at timestamptz DEFAULT now())");
    // Synchronous trials: the agents run with postgres.synchronous_mode, the
    // leader naming its streaming standby in synchronous_standby_names.
    let pg_b = PgNode::replica_of(&pg_a, free_port());
    let mut ports = vec![pg_a.port, pg_b.port];
    let mut nodes = vec![Node::new("a", pg_a), Node::new("b", pg_b)];
    nodes[0].start_agent(&args.bin, &eps, args.ttl, sync);
    if !nodes[0]
        .agent()
        .wait_log("Promoted", Duration::from_secs(60))
    {
        return Err(agent_failed(&nodes[0], "a never led"));
    }
    nodes[1].start_agent(&args.bin, &eps, args.ttl, sync);
    if !nodes[1]
        .agent()
        .wait_log("PostgreSQL runs as a replica of a", Duration::from_secs(60))
    {
        return Err(agent_failed(&nodes[1], "b never followed a"));
    }
    if !wait_until(Duration::from_secs(30), || {
        nodes[1]
            .pg
            .try_sql("SELECT status FROM pg_stat_wal_receiver")
            .is_ok_and(|s| s == "streaming")
    }) {
        return Err("b never streamed".into());
    }
    if sync
        && !wait_until(Duration::from_secs(30), || {
            nodes[0]
                .pg
                .try_sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'b'")
                .is_ok_and(|s| s == "sync")
        })
    {
        return Err("a's agent never made b a synchronous standby".into());
    }
    // 3-node mode: c joins once b is the synchronous standby, so c stays
    // asynchronous (k = 1 keeps b while it streams).
    let mut c_receiver = None;
    if args.nodes == 3 {
        let pg_c = PgNode::replica_of(&nodes[0].pg, free_port());
        ports.push(pg_c.port);
        nodes.push(Node::new("c", pg_c));
        nodes[2].start_agent(&args.bin, &eps, args.ttl, sync);
        if !wait_until(Duration::from_secs(60), || {
            nodes[0]
                .pg
                .try_sql("SELECT state FROM pg_stat_replication WHERE application_name = 'c'")
                .is_ok_and(|s| s == "streaming")
        }) {
            return Err(agent_failed(&nodes[2], "c never streamed from a"));
        }
    }

    // Writers and the probe run from here to the end.
    let stop = Arc::new(AtomicBool::new(false));
    let targets: Vec<Target> = NAMES
        .iter()
        .zip(ports.iter().copied())
        .map(|(n, port)| Target {
            name: n.to_string(),
            port,
        })
        .collect();
    let multi = clients::read_write_conninfo(&targets);
    let every = Every::fixed(WRITE_EVERY);
    let w_new = rt.spawn(clients::writer(
        vec![multi.clone()],
        targets.clone(),
        1_000_000_000,
        false,
        every,
        stop.clone(),
    ));
    let w_kept = rt.spawn(clients::writer(
        vec![multi],
        targets.clone(),
        2_000_000_000,
        true,
        every,
        stop.clone(),
    ));
    let p = rt.spawn(clients::probe(targets.clone(), every, true, stop.clone()));

    // Steady state: 10 loops of both agents.
    std::thread::sleep(Duration::from_secs(2));
    // Loops of one agent in the 10 s measured (the loop is shorter at small T).
    let loops = 10.0 / BenchBudget::for_ttl(args.ttl).loop_interval;
    let r0 = etcd_requests(&etcd.client_url());
    let c0: Vec<Option<u64>> = nodes.iter().map(|n| n.cpu_ticks()).collect();
    let mut rss = 0;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        for n in &nodes {
            rss = rss.max(n.agent().rss_kib().unwrap_or(0));
        }
    }
    let r1 = etcd_requests(&etcd.client_url());
    let c1: Vec<Option<u64>> = nodes.iter().map(|n| n.cpu_ticks()).collect();
    t.rss_kib_max = rss;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu: Vec<f64> = c0
        .iter()
        .zip(&c1)
        .filter_map(|(a, b)| Some((b.as_ref()? - a.as_ref()?) as f64 / hz / 10.0 * 100.0))
        .collect();
    t.cpu_percent = cpu.iter().cloned().fold(0.0, f64::max);
    if let (Some(a), Some(b)) = (r0, r1) {
        let per: Vec<(String, f64)> = b
            .iter()
            .map(|(m, v)| {
                (
                    m.clone(),
                    (v - a.get(m).unwrap_or(&0.0)) / nodes.len() as f64 / loops,
                )
            })
            .filter(|(_, v)| *v > 0.0)
            .collect();
        t.etcd_req_per_node_per_loop = Some(per.iter().map(|(_, v)| v).sum());
        t.etcd_by_method = per
            .iter()
            .map(|(m, v)| format!("{m}={v:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
    }

    if args.nodes == 3 {
        // Keep c behind from now on: its WAL receiver stops receiving.
        let pid: i32 = nodes[2]
            .pg
            .try_sql("SELECT pid FROM pg_stat_wal_receiver")
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or("c has no WAL receiver")?;
        signal(pid, libc::SIGSTOP);
        c_receiver = Some(pid);
        std::thread::sleep(Duration::from_secs(1));
    }

    // Stall the leader.
    let leader = &nodes[0];
    let pm = leader.pg.postmaster_pid().ok_or("a has no postmaster")?;
    let mut stopped = vec![leader.agent().pid() as i32];
    match stall {
        Stall::AgentPostmaster => stopped.push(pm),
        Stall::Everything => {
            stopped.push(pm);
            stopped.extend(processes_in(&leader.pg.data_dir()));
        }
    }
    let t0 = boottime_ns();
    for &pid in &stopped {
        signal(pid, libc::SIGSTOP);
    }
    if stall == Stall::Everything {
        // Anything forked meanwhile.
        for pid in processes_in(&leader.pg.data_dir()) {
            if !stopped.contains(&pid) {
                signal(pid, libc::SIGSTOP);
                stopped.push(pid);
            }
        }
    }
    let promoted = wait_until(Duration::from_secs(args.ttl * 4), || {
        nodes[1..]
            .iter()
            .any(|n| n.pg.try_sql("SELECT pg_is_in_recovery()").as_deref() == Ok("f"))
    });
    t.winner = nodes[1..]
        .iter()
        .find(|n| n.pg.try_sql("SELECT pg_is_in_recovery()").as_deref() == Ok("f"))
        .map(|n| n.name);
    if promoted {
        std::thread::sleep(HOLD_AFTER_PROMOTION);
    }
    for &pid in &stopped {
        signal(pid, libc::SIGCONT);
    }
    if let Some(pid) = c_receiver {
        signal(pid, libc::SIGCONT);
    }
    // The stalled node was reset (or is resumed): its agent starts again, as
    // after a reboot, and rejoins.
    std::thread::sleep(Duration::from_millis(500));
    let was_reset = nodes[0].monitor.wait_kill(t0, Duration::ZERO);
    if let Some(k) = &was_reset {
        t.reset_s = Some(secs_since(t0, k.at_ns));
        let _ = nodes[0]
            .agent
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(5));
        nodes[0].start_agent(&args.bin, &eps, args.ttl, sync);
    }
    let rejoined = wait_until(Duration::from_secs(90), || {
        nodes[0]
            .pg
            .try_sql("SELECT status FROM pg_stat_wal_receiver")
            .is_ok_and(|s| s == "streaming")
    });
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let log_new = rt.block_on(w_new).map_err(|e| e.to_string())?;
    let log_kept = rt.block_on(w_kept).map_err(|e| e.to_string())?;
    let (probe_rows, probe_obs) = rt.block_on(p).map_err(|e| e.to_string())?;

    t.key_deleted_s = watch
        .first_delete_after(t0)
        .map(|e| secs_since(t0, e.boottime_ns));
    let put_b = watch.events().into_iter().find(|e| {
        e.kind == EventKind::Put && e.boottime_ns > t0 && e.value_str().contains("\"b\"")
    });
    let promoted_at = probe_rows
        .iter()
        .find(|r| r.0 > t0 && r.1[1..].contains(&Some(true)))
        .map(|r| r.0);
    t.promoted_s = promoted_at.map(|p| secs_since(t0, p));
    t.reset_before_promotion = match (&was_reset, promoted_at) {
        (Some(k), Some(p)) => Some(k.at_ns < p),
        (None, Some(_)) => Some(false),
        _ => None,
    };
    let _ = put_b;
    t.gap_new_conn_s = clients::gap(&log_new, t0);
    t.gap_kept_conn_s = clients::gap(&log_kept, t0);
    let mut both = false;
    for r in &probe_rows {
        let now_both = r.1.iter().filter(|w| **w == Some(true)).count() >= 2;
        if now_both && !both {
            t.two_writable_intervals += 1;
        }
        both = now_both;
    }
    // Which acknowledged rows the final primary lacks.
    let primary = nodes
        .iter()
        .find(|n| n.pg.try_sql("SELECT pg_is_in_recovery()").as_deref() == Ok("f"))
        .ok_or("no primary at the end")?;
    let have: std::collections::HashSet<i64> = primary
        .pg
        .sql("SELECT id FROM bench")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    // The history checker: writes, probes, the key's terms, the final rows.
    let mut obs = probe_obs;
    for (client, log) in [("writer-new", &log_new), ("writer-kept", &log_kept)] {
        obs.extend(clients::write_obs(client, &targets, log));
    }
    let key_events: Vec<(u64, Option<String>)> = watch
        .events()
        .iter()
        .map(|e| match e.kind {
            EventKind::Put => (e.boottime_ns, holder(&e.value)),
            EventKind::Delete => (e.boottime_ns, None),
        })
        .collect();
    let verdict = history::check(&History {
        obs,
        terms: history::terms(&key_events),
        final_rows: Some(have.iter().copied().collect()),
        slack_ns: 50_000_000,
    });
    t.double_writable = verdict.double_writable();
    t.verdict = Some(verdict.to_json());
    let lost = |log: &[Attempt]| {
        log.iter()
            .filter(|a| verdict.lost_acked.binary_search(&a.id).is_ok())
            .count()
    };
    t.lost_acked_new_conn = lost(&log_new);
    t.lost_acked_kept_conn = lost(&log_kept);
    if t.promoted_s.is_none_or(|p| p > 2.0 * args.ttl as f64) {
        // Slow or no promotion: what the standbys' agents said.
        for n in &nodes[1..] {
            let log = n.agent().log();
            let said: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("renewed"))
                .rev()
                .take(40)
                .collect();
            let said: Vec<&str> = said.into_iter().rev().collect();
            eprintln!(
                "  agent {} (last 40 lines):\n    {}",
                n.name,
                said.join("\n    ")
            );
        }
    }
    if !promoted {
        t.error = Some("no standby was promoted".into());
    } else if !rejoined {
        t.error = Some("a did not rejoin".into());
    }
    drop(nodes);
    drop(etcd);
    Ok(())
}

// ---------------------------------------------------------------------------
// Report

fn stats(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    format!("{med:.2} [{:.2}-{:.2}]", s[0], s[s.len() - 1])
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

fn print_table(trials: &[Trial], ttl: u64, nodes: usize) {
    println!("{nodes} nodes");
    println!(
        "{:<3} {:<19} {:<5} {:>3} {:>6} {:>6} {:>6} {:>6} {:>6} {:>4} {:>5} {:>5} {:>6} {:>5} {:>5} {:>6}  error",
        "#", "stall", "repl", "won", "keydel", "promo", "reset", "gapNew", "gapKpt", "2W", "lostN", "lostK",
        "rssKiB", "cpu%", "req/l", "kill<p"
    );
    for (i, t) in trials.iter().enumerate() {
        println!(
            "{:<3} {:<19} {:<5} {:>3} {:>6} {:>6} {:>6} {:>6} {:>6} {:>4} {:>5} {:>5} {:>6} {:>5.2} {:>5} {:>6}  {}",
            i + 1,
            t.stall,
            if t.sync { "sync" } else { "async" },
            t.winner.unwrap_or("-"),
            opt(t.key_deleted_s),
            opt(t.promoted_s),
            opt(t.reset_s),
            opt(t.gap_new_conn_s),
            opt(t.gap_kept_conn_s),
            t.two_writable_intervals,
            t.lost_acked_new_conn,
            t.lost_acked_kept_conn,
            t.rss_kib_max,
            t.cpu_percent,
            opt(t.etcd_req_per_node_per_loop),
            t.reset_before_promotion.map_or("-".into(), |b| b.to_string()),
            t.error.clone().unwrap_or_default()
        );
    }
    println!("\nsummary, median [min-max] (T = {ttl} s):");
    for stall in [Stall::AgentPostmaster, Stall::Everything] {
        let ts: Vec<&Trial> = trials.iter().filter(|t| t.stall == stall.name()).collect();
        if ts.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Trial) -> Option<f64>| -> String {
            stats(&ts.iter().filter_map(|t| f(t)).collect::<Vec<_>>())
        };
        println!("  stall {} ({} trials):", stall.name(), ts.len());
        println!(
            "    time to key deletion      {}",
            col(&|t| t.key_deleted_s)
        );
        println!("    time to promotion         {}", col(&|t| t.promoted_s));
        println!("    time to reset (kill)      {}", col(&|t| t.reset_s));
        for sync in [false, true] {
            let r = if sync { "sync" } else { "async" };
            let only = |f: &dyn Fn(&Trial) -> Option<f64>| -> String {
                stats(
                    &ts.iter()
                        .filter(|t| t.sync == sync)
                        .filter_map(|t| f(t))
                        .collect::<Vec<_>>(),
                )
            };
            println!(
                "    [{r}] writer gap, new conn   {}",
                only(&|t| t.gap_new_conn_s)
            );
            println!(
                "    [{r}] writer gap, kept conn  {}",
                only(&|t| t.gap_kept_conn_s)
            );
            println!(
                "    [{r}] lost acked (new/kept)  {} / {}",
                only(&|t| Some(t.lost_acked_new_conn as f64)),
                only(&|t| Some(t.lost_acked_kept_conn as f64))
            );
        }
        println!(
            "    two-writable intervals    {} (total {})",
            col(&|t| Some(t.two_writable_intervals as f64)),
            ts.iter().map(|t| t.two_writable_intervals).sum::<usize>()
        );
        println!(
            "    double-writable (checker) {} (total {})",
            col(&|t| Some(t.double_writable as f64)),
            ts.iter().map(|t| t.double_writable).sum::<usize>()
        );
        println!(
            "    reset before promotion    {} of {}",
            ts.iter()
                .filter(|t| t.reset_before_promotion == Some(true))
                .count(),
            ts.len()
        );
        println!(
            "    agent RSS KiB (max)       {}",
            col(&|t| Some(t.rss_kib_max as f64))
        );
        println!(
            "    agent CPU %               {}",
            col(&|t| Some(t.cpu_percent))
        );
        println!(
            "    etcd req/node/loop        {}",
            col(&|t| t.etcd_req_per_node_per_loop)
        );
        if let Some(t) = ts.first() {
            println!("      by method (trial 1)     {}", t.etcd_by_method);
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("leasedog-bench: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut trials = Vec::new();
    for i in 0..args.trials {
        for stall in [Stall::AgentPostmaster, Stall::Everything] {
            let sync = i % 2 == 0;
            eprintln!(
                "trial {}/{} ({} nodes): stall {}, {} replication",
                i + 1,
                args.trials,
                args.nodes,
                stall.name(),
                if sync { "sync" } else { "async" }
            );
            let t = run_trial(&args, &rt, stall, sync);
            eprintln!(
                "  {:?}",
                Trial {
                    verdict: None,
                    ..t.clone()
                }
            );
            trials.push(t);
        }
    }
    print_table(&trials, args.ttl, args.nodes);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join(if args.nodes == 3 {
        "../target/failover-bench-3.json"
    } else {
        "../target/failover-bench.json"
    });
    let j = json!({
        "ttl": args.ttl,
        "nodes": args.nodes,
        "trials": trials.iter().map(|t| json!({
            "stall": t.stall, "sync": t.sync, "winner": t.winner,
            "key_deleted_s": t.key_deleted_s, "promoted_s": t.promoted_s,
            "reset_s": t.reset_s, "reset_before_promotion": t.reset_before_promotion,
            "gap_new_conn_s": t.gap_new_conn_s, "gap_kept_conn_s": t.gap_kept_conn_s,
            "two_writable_intervals": t.two_writable_intervals,
            "double_writable": t.double_writable,
            "verdict": t.verdict,
            "lost_acked_new_conn": t.lost_acked_new_conn,
            "lost_acked_kept_conn": t.lost_acked_kept_conn,
            "agent_rss_kib_max": t.rss_kib_max, "agent_cpu_percent": t.cpu_percent,
            "etcd_requests_per_node_per_loop": t.etcd_req_per_node_per_loop,
            "etcd_requests_by_method": t.etcd_by_method,
            "error": t.error,
        })).collect::<Vec<_>>(),
    });
    match std::fs::write(&out, serde_json::to_string_pretty(&j).unwrap()) {
        Ok(()) => println!("\nwrote {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::BenchBudget;
    use std::time::Duration;

    fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }

    /// Every `--ttl` the benchmark accepts yields a budget the agent starts
    /// with (it refused `--ttl 5` when the loop stayed at 1 s).
    #[test]
    fn derived_budget_is_accepted_by_the_agent_for_every_ttl() {
        for ttl in 4..=60u64 {
            let b = BenchBudget::for_ttl(ttl);
            leasedog::timing::Budget::new(
                Duration::from_secs(ttl),
                secs(b.margin),
                secs(b.reset_allowance),
                secs(b.loop_interval),
                secs(b.request_timeout),
            )
            .unwrap_or_else(|e| panic!("--ttl {ttl}: {b:?} refused: {e}"));
        }
        let b = BenchBudget::for_ttl(10);
        assert_eq!((b.loop_interval, b.request_timeout), (1.0, 1.0));
    }
}
