//! Failover of real PostgreSQL 15 clusters by real agents against a real etcd,
//! with fake watchdog devices whose expiry is turned into a "reset" of the
//! node (SIGKILL of its agent and every PostgreSQL process) by
//! `leasedog_testbed::fence::FakeWatchdogMonitor`.
//!
//! Budget: T = 4 s, M = 2 s, R = 1 s (W = 2 s), loop 0.4 s, request 0.5 s.
//! Tests run one at a time (a lock): a 2-core machine running several
//! PostgreSQL clusters and agents at once would stall loops past the budget.

use leasedog_testbed::agent::{fake_device_config, AgentProcess};
use leasedog_testbed::etcd::{boottime_ns, BlockingClient, EtcdServer, EventKind, KeyWatch};
use leasedog_testbed::fence::FakeWatchdogMonitor;
use leasedog_testbed::pg::{free_port, processes_in, PgNode};
use leasedog_testbed::wait_until;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Extra `[postgres]` lines (credentials, data dir, bin dir) for bad-input tests.
#[derive(Default, Clone)]
struct PgOverrides {
    data_dir: Option<PathBuf>,
    bin_dir: Option<String>,
    extra: String,
}

fn config(
    scope: &str,
    node: &str,
    eps: &[String],
    dir: &Path,
    pg: &PgNode,
    o: &PgOverrides,
) -> String {
    let base = fake_device_config(
        scope,
        node,
        eps,
        "required",
        &dir.join("wd"),
        &dir.join("audit"),
    );
    format!(
        r#"{base}[postgres]
host = "{socket}"
port = {port}
data_dir = "{data}"
bin_dir = "{bin}"
advertise_host = "127.0.0.1"
stop_timeout = 1.0
{extra}
"#,
        socket = pg.socket_dir().display(),
        port = pg.port,
        data = o.data_dir.clone().unwrap_or(pg.data_dir()).display(),
        bin = o
            .bin_dir
            .as_deref()
            .unwrap_or(leasedog_testbed::pg::BIN_DIR),
        extra = o.extra,
    )
}

/// One node: its PostgreSQL, its agent (restartable) and the monitor that
/// "resets" it when its fake watchdog expires.
struct Node {
    name: String,
    scope: String,
    eps: Vec<String>,
    dir: tempfile::TempDir,
    overrides: PgOverrides,
    agent_pid: Arc<AtomicI32>,
    agent: Option<AgentProcess>,
    // Dropped before `pg` (field order): no kill races the cluster's removal.
    monitor: FakeWatchdogMonitor,
    pg: PgNode,
}

impl Node {
    fn new(scope: &str, name: &str, eps: &[String], pg: PgNode) -> Node {
        Node::with(scope, name, eps, pg, PgOverrides::default())
    }

    fn with(scope: &str, name: &str, eps: &[String], pg: PgNode, overrides: PgOverrides) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("leasedog-fo-{name}-"))
            .tempdir()
            .unwrap();
        let agent_pid = Arc::new(AtomicI32::new(0));
        let monitor =
            FakeWatchdogMonitor::for_node(dir.path().join("wd"), agent_pid.clone(), pg.data_dir());
        Node {
            name: name.into(),
            scope: scope.into(),
            eps: eps.to_vec(),
            dir,
            overrides,
            agent_pid,
            agent: None,
            monitor,
            pg,
        }
    }

    fn start_agent(&mut self) {
        let cfg = config(
            &self.scope,
            &self.name,
            &self.eps,
            self.dir.path(),
            &self.pg,
            &self.overrides,
        );
        // The previous run's log is kept next to the new one for post-mortems.
        if let Some(old) = self.agent.take() {
            drop(old);
        }
        let a = AgentProcess::spawn(Path::new(BIN), &self.name, &cfg, &[]).unwrap();
        self.agent_pid.store(a.pid() as i32, Ordering::SeqCst);
        self.agent = Some(a);
    }

    /// SIGKILL of the agent alone (its PostgreSQL keeps running).
    fn kill_agent(&mut self) {
        if let Some(a) = self.agent.as_mut() {
            a.kill();
        }
        self.agent_pid.store(0, Ordering::SeqCst); // reaped: never signal a recycled pid
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent started")
    }

    fn log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| brief(&a.log()))
            .unwrap_or_default()
    }

    /// `Some(true)` writable, `Some(false)` in recovery, `None` not answering.
    fn writable(&self) -> Option<bool> {
        self.pg
            .try_sql("SELECT pg_is_in_recovery()")
            .ok()
            .map(|v| v == "f")
    }

    fn has_row(&self, table: &str, v: i64) -> bool {
        self.pg
            .try_sql(&format!("SELECT count(*) FROM {table} WHERE v = {v}"))
            .is_ok_and(|c| c == "1")
    }

    fn streaming(&self) -> bool {
        self.pg
            .try_sql("SELECT status FROM pg_stat_wal_receiver")
            .is_ok_and(|s| s == "streaming")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} postmaster log (tail) ----", self.name);
            let log = std::fs::read_to_string(self.pg.data_dir().join("leasedog-postmaster.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The agent's log without the transport's DEBUG chatter.
fn brief(log: &str) -> String {
    log.lines()
        .filter(|l| !l.contains("DEBUG"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn leader_key(scope: &str) -> String {
    format!("/leasedog/{scope}/leader")
}

fn holder_name(value: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    v.get("node")?.as_str().map(String::from)
}

fn holder(c: &BlockingClient, scope: &str) -> Option<String> {
    c.get(&leader_key(scope))
        .ok()
        .flatten()
        .and_then(|v| holder_name(&v))
}

fn wait_holder(c: &BlockingClient, scope: &str, want: &str, within: Duration) {
    assert!(
        wait_until(within, || holder(c, scope).as_deref() == Some(want)),
        "{want} did not take the key within {within:?} (holder: {:?})",
        holder(c, scope)
    );
}

/// The first PUT of the key by another node after `after_ns`.
fn takeover(watch: &KeyWatch, after_ns: u64, old: &str, within: Duration) -> (String, u64) {
    let mut found = None;
    assert!(
        wait_until(within, || {
            found = watch
                .events()
                .into_iter()
                .filter(|e| e.kind == EventKind::Put && e.boottime_ns > after_ns)
                .find_map(|e| {
                    let n = holder_name(e.value_str().as_bytes())?;
                    (n != old).then_some((n, e.boottime_ns))
                });
            found.is_some()
        }),
        "no takeover from {old} within {within:?}"
    );
    found.unwrap()
}

/// Exactly one node answers `pg_is_in_recovery() = false`, checked `n` times.
fn assert_one_writable(nodes: &[&Node], n: usize) -> String {
    let mut writer = String::new();
    for _ in 0..n {
        let w: Vec<&str> = nodes
            .iter()
            .filter(|x| x.writable() == Some(true))
            .map(|x| x.name.as_str())
            .collect();
        assert_eq!(w.len(), 1, "writable nodes: {w:?}");
        writer = w[0].to_string();
        std::thread::sleep(Duration::from_millis(200));
    }
    writer
}

/// A primary `a` (running, initdb'd) with its agent holding the key.
fn bootstrap(scope: &str, eps: &[String], client: &BlockingClient) -> Node {
    let pg = PgNode::init(free_port());
    pg.start();
    pg.sql("CREATE TABLE t (v bigint PRIMARY KEY)");
    let mut a = Node::new(scope, "a", eps, pg);
    a.start_agent();
    wait_holder(client, scope, "a", Duration::from_secs(30));
    assert!(
        a.agent().wait_log("Promoted", Duration::from_secs(30)),
        "a promoted (already primary)"
    );
    a
}

/// Waits until `n` runs as a streaming replica that has the row `v`.
fn wait_replica_with(n: &Node, v: i64, within: Duration) {
    assert!(
        wait_until(within, || n.writable() == Some(false) && n.has_row("t", v)),
        "{} is not a replica with row {v} within {within:?}; writable={:?}\n{}",
        n.name,
        n.writable(),
        n.log()
    );
}

/// Three nodes: bootstrap, a replica made by pg_basebackup and an empty node
/// the agent clones; steady state; SIGKILL of the leader's agent, the
/// monitor's "reset" before the key is gone, promotion of another node; the
/// old leader restarted rejoins the new one and streams.
#[test]
fn three_nodes_clone_failover_on_agent_kill_and_rejoin() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "three";
    let watch = KeyWatch::start(&eps, &leader_key(scope)).unwrap();
    let mut a = bootstrap(scope, &eps, &client);
    let mut b = Node::new(scope, "b", &eps, PgNode::replica_of(&a.pg, free_port()));
    let mut c = Node::new(scope, "c", &eps, PgNode::empty(free_port()));
    b.start_agent();
    c.start_agent();
    a.pg.sql("INSERT INTO t VALUES (1)");
    wait_replica_with(&b, 1, Duration::from_secs(60));
    wait_replica_with(&c, 1, Duration::from_secs(90));
    // The agent logs the clone once `pg_ctl start` returned, which can be
    // after the first rows streamed: wait for the line, don't race it.
    assert!(
        wait_until(Duration::from_secs(30), || c.log().contains("cloned")),
        "c was cloned:\n{}",
        c.log()
    );
    assert_eq!(assert_one_writable(&[&a, &b, &c], 10), "a");
    assert_eq!(holder(&client, scope).as_deref(), Some("a"));
    assert!(b.streaming() && c.streaming());

    // SIGKILL a's agent: nothing renews, nothing pings; the monitor resets a.
    let t_kill = boottime_ns();
    a.kill_agent();
    let reset = a
        .monitor
        .wait_kill(t_kill, Duration::from_secs(20))
        .expect("a's watchdog expired");
    let (new, put_ns) = takeover(&watch, t_kill, "a", Duration::from_secs(30));
    let deleted = watch.first_delete_after(t_kill).expect("the key expired");
    eprintln!(
        "kill at 0: reset {:+.2} s, key deleted {:+.2} s, {new} took it {:+.2} s",
        (reset.at_ns as f64 - t_kill as f64) / 1e9,
        (deleted.boottime_ns as f64 - t_kill as f64) / 1e9,
        (put_ns as f64 - t_kill as f64) / 1e9
    );
    assert!(
        reset.at_ns < deleted.boottime_ns,
        "a was reset before its key expired"
    );
    assert!(
        processes_in(&a.pg.data_dir()).is_empty(),
        "a's PostgreSQL is dead"
    );
    let (n1, n2) = if new == "b" { (&b, &c) } else { (&c, &b) };
    assert!(
        wait_until(Duration::from_secs(30), || n1.writable() == Some(true)),
        "{new} promoted:\n{}",
        n1.log()
    );
    n1.pg.sql("INSERT INTO t VALUES (2)");
    wait_replica_with(n2, 2, Duration::from_secs(60));

    // a comes back: it follows the new leader (rewinding if it must).
    a.start_agent();
    wait_replica_with(&a, 2, Duration::from_secs(90));
    assert_eq!(assert_one_writable(&[&a, &b, &c], 5), new);
    n1.pg.sql("INSERT INTO t VALUES (3)");
    wait_replica_with(&a, 3, Duration::from_secs(30));
    wait_replica_with(n2, 3, Duration::from_secs(30));
}

/// Pids of `n`'s PostgreSQL processes whose title contains `what`.
fn titled(n: &Node, what: &str) -> Vec<i32> {
    processes_in(&n.pg.data_dir())
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(what))
        })
        .collect()
}

fn signal_all(pids: &[i32], sig: i32) {
    for &p in pids {
        // SAFETY: plain kill(2) on pids of our own test clusters.
        unsafe { libc::kill(p, sig) };
    }
}

/// A two-node scope: `a` leads, `b` is a replica its agent has taken over.
fn two_nodes(scope: &str, eps: &[String], client: &BlockingClient, b_extra: &str) -> (Node, Node) {
    let a = bootstrap(scope, eps, client);
    let mut b = Node::with(
        scope,
        "b",
        eps,
        PgNode::replica_of(&a.pg, free_port()),
        PgOverrides {
            extra: b_extra.into(),
            ..Default::default()
        },
    );
    b.start_agent();
    assert!(
        b.agent()
            .wait_log("PostgreSQL runs as a replica of a", Duration::from_secs(60)),
        "b follows a:\n{}",
        b.log()
    );
    a.pg.sql("INSERT INTO t VALUES (1)");
    wait_replica_with(&b, 1, Duration::from_secs(30));
    (a, b)
}

/// SIGSTOP of the leader's agent: its pings stop, the monitor resets the
/// node before the lease expires, b promotes. Rows a acknowledged that b
/// never received make the timelines diverge. a's PostgreSQL started by hand
/// as a primary is fenced by its agent, which then rejoins it with pg_rewind.
#[test]
fn two_nodes_stalled_agent_is_reset_before_takeover_and_rewinds() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "stall";
    let watch = KeyWatch::start(&eps, &leader_key(scope)).unwrap();
    let (mut a, b) = two_nodes(scope, &eps, &client, "");
    let t_stop = boottime_ns();
    a.agent().stall().unwrap();
    // a stops sending (its walsender frozen); still writable until its
    // reset, it commits rows b never sees.
    let ws = titled(&a, "walsender");
    assert!(!ws.is_empty(), "a has a walsender");
    signal_all(&ws, libc::SIGSTOP);
    a.pg.sql("INSERT INTO t SELECT generate_series(100, 199)");
    let reset = a.monitor.wait_kill(t_stop, Duration::from_secs(20));
    let reset = reset.expect("a's watchdog expired");
    let (new, put_ns) = takeover(&watch, t_stop, "a", Duration::from_secs(30));
    assert_eq!(new, "b");
    let deleted = watch.first_delete_after(t_stop).expect("the key expired");
    eprintln!(
        "stall at 0: last ping {:+.2} s, reset {:+.2} s, key deleted {:+.2} s, b took it {:+.2} s",
        (reset.last_ping_ns as f64 - t_stop as f64) / 1e9,
        (reset.at_ns as f64 - t_stop as f64) / 1e9,
        (deleted.boottime_ns as f64 - t_stop as f64) / 1e9,
        (put_ns as f64 - t_stop as f64) / 1e9
    );
    assert!(
        reset.at_ns < deleted.boottime_ns,
        "a was reset before its key expired"
    );
    assert!(
        reset.pids.contains(&(a.agent().pid() as i32)),
        "the reset killed a's agent"
    );
    assert!(a
        .agent
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5))
        .is_some());
    assert!(
        processes_in(&a.pg.data_dir()).is_empty(),
        "a's PostgreSQL is dead"
    );
    assert!(
        wait_until(Duration::from_secs(30), || b.writable() == Some(true)),
        "b promoted:\n{}",
        b.log()
    );
    assert!(!b.has_row("t", 100), "b never received a's last rows");
    b.pg.sql("INSERT INTO t VALUES (2)");
    // The node comes back and someone starts its PostgreSQL by hand, as a
    // primary, before the agent: two writable nodes until the agent fences it.
    a.pg.start();
    assert_eq!(a.writable(), Some(true));
    a.start_agent();
    assert!(
        wait_until(Duration::from_secs(30), || a.writable() != Some(true)),
        "a's agent fenced its writable server:\n{}",
        a.log()
    );
    assert!(a.log().contains("writable while b leads"), "{}", a.log());
    wait_replica_with(&a, 2, Duration::from_secs(90));
    assert!(
        wait_until(Duration::from_secs(30), || a
            .log()
            .contains("rewound: true")),
        "a was rewound:\n{}",
        a.log()
    );
    assert!(!a.has_row("t", 100), "rewind dropped a's unreplicated rows");
    assert!(a.streaming());
    assert_eq!(assert_one_writable(&[&a, &b], 5), "b");
}

/// The leader's postmaster dies (kill -9): the leader steps down and
/// releases the key without a reset, b promotes, a rejoins. Then SIGTERM of
/// b hands back cleanly: b stops, releases and disarms (no reset), a promotes.
#[test]
fn two_nodes_postgres_crash_then_sigterm_handover() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "crash";
    let (a, mut b) = two_nodes(scope, &eps, &client, "");
    let t_crash = boottime_ns();
    signal_all(&[a.pg.postmaster_pid().unwrap()], libc::SIGKILL);
    wait_holder(&client, scope, "b", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || b.writable() == Some(true)),
        "b promoted:\n{}",
        b.log()
    );
    assert!(
        a.log().contains("PostgresDown"),
        "a stepped down:\n{}",
        a.log()
    );
    assert!(
        a.monitor.kills().is_empty(),
        "a released and disarmed: no reset"
    );
    assert!(a.agent.as_ref().map(|x| x.pid()).is_some_and(|p| p > 0));
    b.pg.sql("INSERT INTO t VALUES (2)");
    wait_replica_with(&a, 2, Duration::from_secs(90));
    assert_eq!(assert_one_writable(&[&a, &b], 5), "b");
    let _ = t_crash;

    // Clean handover: SIGTERM the leader.
    b.agent().signal(libc::SIGTERM).unwrap();
    let st = b
        .agent
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(30))
        .expect("b exits after SIGTERM");
    assert!(st.success(), "b exit status {st}:\n{}", b.log());
    wait_holder(&client, scope, "a", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || a.writable() == Some(true)),
        "a promoted:\n{}",
        a.log()
    );
    assert!(
        processes_in(&b.pg.data_dir()).is_empty(),
        "b's PostgreSQL stopped"
    );
    let rec = std::fs::read_to_string(b.monitor.record()).unwrap();
    assert!(
        rec.lines().last().unwrap().starts_with("disarm"),
        "b disarmed last: {rec}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        b.monitor.kills().is_empty(),
        "no reset after a clean handover"
    );
    a.pg.sql("INSERT INTO t VALUES (3)");
    b.start_agent();
    wait_replica_with(&b, 3, Duration::from_secs(90));
}

/// A replica whose lag exceeds `maximum_lag_on_failover` does not race for
/// the key when the leader dies.
#[test]
fn a_replica_too_far_behind_is_not_promoted() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "lag";
    let (mut a, b) = two_nodes(scope, &eps, &client, "maximum_lag_on_failover = 65536");
    let wr = titled(&b, "walreceiver");
    assert!(!wr.is_empty(), "b has a walreceiver");
    signal_all(&wr, libc::SIGSTOP);
    a.pg.sql("INSERT INTO t SELECT generate_series(1000, 20999)");
    // The lag itself: "not eligible for leadership: rejoin in progress"
    // (logged while b first follows a) must not end the wait.
    let seen = b
        .agent()
        .wait_log("bytes behind the leader", Duration::from_secs(30));
    if !seen {
        signal_all(&wr, libc::SIGCONT);
        panic!("b never judged itself too far behind:\n{}", b.log());
    }
    let t_kill = boottime_ns();
    a.kill_agent();
    let reset = a.monitor.wait_kill(t_kill, Duration::from_secs(20));
    // Well past the lease's expiry: nobody may have taken the key.
    std::thread::sleep(Duration::from_secs(8));
    let h = holder(&client, scope);
    let b_recovery = b.writable();
    signal_all(&wr, libc::SIGCONT);
    assert!(reset.is_some(), "a was reset");
    assert_eq!(h, None, "no promotion of a lagging replica");
    assert_eq!(b_recovery, Some(false), "b stays a replica");
    assert!(!b.log().contains("won the leader key"), "{}", b.log());
    let line = b
        .log()
        .lines()
        .find(|l| l.contains("not eligible"))
        .unwrap()
        .to_string();
    eprintln!("{line}");
}

/// Bad input: an agent that cannot see its own PostgreSQL properly never
/// takes the key (so never promotes, and never fences the running server).
#[test]
fn bad_input_is_a_clear_error_and_no_promotion() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let pg = PgNode::init(free_port());
    pg.start();
    pg.sql("CREATE ROLE leasedog_agent LOGIN SUPERUSER PASSWORD 'right'");
    let not_a_cluster = tempfile::tempdir().unwrap();
    std::fs::write(not_a_cluster.path().join("README"), "not a cluster").unwrap();
    let cases: Vec<(&str, PgOverrides, &str)> = vec![
        (
            "not-installed",
            PgOverrides {
                bin_dir: Some("/usr/lib/postgresql/99/bin".into()),
                ..Default::default()
            },
            "PostgreSQL is not installed at postgres.bin_dir = /usr/lib/postgresql/99/bin",
        ),
        (
            "wrong-password",
            PgOverrides {
                extra: "user = \"leasedog_agent\"\npassword = \"wrong\"".into(),
                ..Default::default()
            },
            "cannot observe PostgreSQL: authentication failed",
        ),
        (
            "wrong-data-dir",
            PgOverrides {
                data_dir: Some(not_a_cluster.path().to_owned()),
                ..Default::default()
            },
            "is not a PostgreSQL data directory: the server at",
        ),
    ];
    for (scope, o, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(scope, "x", &eps, dir.path(), &pg, &o);
        if scope == "wrong-password" {
            // Over TCP, where pg_hba.conf asks this role for a password.
            cfg = cfg.replace(
                &format!("host = \"{}\"", pg.socket_dir().display()),
                "host = \"127.0.0.1\"",
            );
        }
        let mut agent = AgentProcess::spawn(Path::new(BIN), scope, &cfg, &[]).unwrap();
        let seen = agent.wait_log(needle, Duration::from_secs(20));
        std::thread::sleep(Duration::from_secs(6)); // > T: time enough to have raced
        let log = brief(&agent.log());
        assert!(seen, "{scope}: the error names {needle:?}:\n{log}");
        assert_eq!(
            holder(&client, scope),
            None,
            "{scope}: no key taken:\n{log}"
        );
        assert!(!log.contains("won the leader key"), "{scope}:\n{log}");
        assert!(!log.contains("promoted"), "{scope}:\n{log}");
        assert_eq!(
            pg.writable_check(),
            Some(true),
            "{scope}: the server was left alone"
        );
        if scope == "not-installed" {
            let st = agent.wait_exit(Duration::from_secs(5)).expect("exits");
            assert!(!st.success());
        }
        drop(agent);
    }
}

trait Writable {
    fn writable_check(&self) -> Option<bool>;
}
impl Writable for PgNode {
    fn writable_check(&self) -> Option<bool> {
        self.try_sql("SELECT pg_is_in_recovery()")
            .ok()
            .map(|v| v == "f")
    }
}

fn sync_names(n: &Node) -> Result<String, String> {
    n.pg.try_sql("SHOW synchronous_standby_names")
}

/// Synchronous mode on a 2-node scope: the leader names the replica while it
/// streams; once the replica's agent and PostgreSQL are killed, the leader
/// sets '' and commits go on (non-strict).
#[test]
fn synchronous_mode_names_the_replica_and_drops_it_when_it_dies() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "sync";
    let sync = PgOverrides {
        extra: "synchronous_mode = true".into(),
        ..Default::default()
    };
    let pg = PgNode::init(free_port());
    pg.start();
    pg.sql("CREATE TABLE t (v bigint PRIMARY KEY)");
    let mut a = Node::with(scope, "a", &eps, pg, sync.clone());
    a.start_agent();
    wait_holder(&client, scope, "a", Duration::from_secs(30));
    let mut b = Node::with(
        scope,
        "b",
        &eps,
        PgNode::replica_of(&a.pg, free_port()),
        sync,
    );
    b.start_agent();
    assert!(
        wait_until(Duration::from_secs(60), || {
            sync_names(&a).as_deref() == Ok(r#"FIRST 1 ("b")"#)
                && a.pg
                    .try_sql(
                        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'b'",
                    )
                    .is_ok_and(|s| s == "sync")
        }),
        "a never made b its synchronous standby ({:?})\n{}\n{}",
        sync_names(&a),
        a.log(),
        b.log()
    );
    assert_eq!(
        sync_names(&b).as_deref(),
        Ok(""),
        "a follower leaves its own alone"
    );
    a.pg.sql("INSERT INTO t VALUES (1)");
    wait_replica_with(&b, 1, Duration::from_secs(30));

    let t0 = Instant::now();
    b.kill_agent();
    signal_all(&processes_in(&b.pg.data_dir()), libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(30), || sync_names(&a).as_deref()
            == Ok("")),
        "a kept naming a dead standby ({:?})\n{}",
        sync_names(&a),
        a.log()
    );
    eprintln!(
        "TIMING sync names cleared {:?} after the replica died",
        t0.elapsed()
    );
    // A commit must not wait for the dead standby: run it where a hang
    // cannot hold the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let (sock, port) = (a.pg.socket_dir(), a.pg.port);
    std::thread::spawn(move || {
        let ok = std::process::Command::new(format!("{}/psql", leasedog_testbed::pg::BIN_DIR))
            .arg("-h")
            .arg(sock)
            .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-X", "-q", "-c", "INSERT INTO t VALUES (2)"])
            .status()
            .is_ok_and(|s| s.success());
        let _ = tx.send(ok);
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)),
        Ok(true),
        "a commit on the lone leader went through"
    );
    assert!(a.has_row("t", 2));
    assert_eq!(holder(&client, scope).as_deref(), Some("a"));
    let log = a.log();
    assert!(
        log.contains("synchronous_standby_names set"),
        "each change is logged:\n{log}"
    );
}

/// A hung PostgreSQL (every process SIGSTOPped: connections are accepted
/// by the kernel and never answered) must not delay the leader's renewals.
/// Its observation waits up to `postgres.query_timeout` (2 s, twice
/// M - R = 1 s) but runs off the renewal loop: the pings never pause, the
/// deadline timer does not fire, nobody resets the node, the key stays.
#[test]
fn a_hung_postgres_does_not_delay_the_renewals() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "hung";
    let a = bootstrap(scope, &eps, &client);
    let pids = processes_in(&a.pg.data_dir());
    assert!(!pids.is_empty());
    let t0 = boottime_ns();
    signal_all(&pids, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    let t1 = boottime_ns();
    signal_all(&pids, libc::SIGCONT);
    let pings: Vec<u64> = leasedog::watchdog::read_fake_record(a.monitor.record())
        .unwrap()
        .iter()
        .filter_map(|o| match o {
            leasedog::watchdog::FakeOp::Ping { at } => Some(at.as_nanos()),
            _ => None,
        })
        .filter(|&at| at >= t0 && at <= t1)
        .collect();
    // From the stop to the first ping, between pings, and to the end.
    let bounds: Vec<u64> = std::iter::once(t0)
        .chain(pings.iter().copied())
        .chain(std::iter::once(t1))
        .collect();
    let gap = bounds
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(u64::MAX);
    eprintln!(
        "TIMING {} pings while PostgreSQL hung, longest gap {:.3} s",
        pings.len(),
        gap as f64 / 1e9
    );
    let log = a.log();
    assert!(
        log.contains("cannot observe PostgreSQL"),
        "the observer saw the hang:\n{log}"
    );
    assert!(
        gap < 1_000_000_000,
        "pings paused {:.3} s (M - R = 1 s): a renewal waited for PostgreSQL\n{log}",
        gap as f64 / 1e9
    );
    assert!(a.monitor.kills().is_empty(), "no reset");
    assert!(!log.contains("deadline timer fenced"), "{log}");
    assert_eq!(holder(&client, scope).as_deref(), Some("a"));
    assert_eq!(a.writable(), Some(true), "still the primary");
}

/// Rule 8 at start-up: a node whose agent cannot reach etcd does not know
/// who leads, so a writable PostgreSQL found there (started by hand, or a
/// primary that came back after a reset) is fenced at once, not left
/// writable until etcd answers.
#[test]
fn a_writable_server_is_fenced_while_etcd_is_unreachable() {
    let _g = serial();
    let dead = vec![format!("http://127.0.0.1:{}", free_port())];
    let pg = PgNode::init(free_port());
    pg.start();
    let mut a = Node::new("unreachable", "a", &dead, pg);
    assert_eq!(a.writable(), Some(true));
    a.start_agent();
    assert!(
        wait_until(Duration::from_secs(20), || a.writable() != Some(true)),
        "still writable:\n{}",
        a.log()
    );
    let log = a.log();
    assert!(
        log.contains("PostgreSQL is writable while the key is not ours: fencing it"),
        "{log}"
    );
    assert!(!log.contains("won the leader key"), "{log}");
    // Rule 8's fence is on the record (rule 7), with nobody known to hold
    // the key, and confirmed.
    let audit = a.dir.path().join("audit").join("a.audit.jsonl");
    let fenced = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["event"] == "fenced_not_leader")
    };
    assert!(
        wait_until(Duration::from_secs(5), || fenced().is_some()),
        "no fenced_not_leader record in {}",
        audit.display()
    );
    let r = fenced().unwrap();
    assert_eq!(r["holder"], serde_json::Value::Null, "{r}");
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        a.agent.as_mut().unwrap().try_exit().is_none(),
        "keeps running"
    );
}

/// `pg_controldata` of `n`'s data directory: (cluster state, latest
/// checkpoint location).
fn control(n: &Node) -> (String, u64) {
    let out = leasedog_testbed::pg::as_postgres(format!(
        "{}/pg_controldata",
        leasedog_testbed::pg::BIN_DIR
    ))
    .arg("-D")
    .arg(n.pg.data_dir())
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{k} in pg_controldata:\n{text}"))
    };
    (
        field("Database cluster state:"),
        lsn(&field("Latest checkpoint location:")),
    )
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Where `n`'s newest timeline branched off (its newest `.history` file's
/// last line): the end of the WAL it had received when it promoted.
fn newest_switchpoint(n: &Node) -> u64 {
    let mut h: Vec<PathBuf> = std::fs::read_dir(n.pg.data_dir().join("pg_wal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "history"))
        .collect();
    h.sort();
    let text = std::fs::read_to_string(h.last().expect("a history file")).unwrap();
    let line = text.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    lsn(line.split_whitespace().nth(1).unwrap())
}

/// Synchronous mode, SIGTERM of the leader's agent while a client commits:
/// the planned step-down is a fast shutdown, so every acknowledged commit is
/// on the new primary, and the standby had received the old primary's
/// shutdown checkpoint before it promoted (its timeline branches after it).
#[test]
fn sigterm_handover_in_synchronous_mode_is_a_fast_shutdown_that_loses_nothing() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "sigterm-sync";
    let sync = PgOverrides {
        extra: "synchronous_mode = true".into(),
        ..Default::default()
    };
    let pg = PgNode::init(free_port());
    pg.start();
    pg.sql("CREATE TABLE t (v bigint PRIMARY KEY)");
    let mut a = Node::with(scope, "a", &eps, pg, sync.clone());
    a.start_agent();
    wait_holder(&client, scope, "a", Duration::from_secs(30));
    let mut b = Node::with(
        scope,
        "b",
        &eps,
        PgNode::replica_of(&a.pg, free_port()),
        sync,
    );
    b.start_agent();
    assert!(
        wait_until(Duration::from_secs(60), || a
            .pg
            .try_sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'b'")
            .is_ok_and(|s| s == "sync")),
        "b never became a's synchronous standby\n{}\n{}",
        a.log(),
        b.log()
    );

    // A client commits one row at a time; what a acknowledged is recorded.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sock, port) = (a.pg.socket_dir(), a.pg.port);
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for v in 100i64.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let ok =
                    std::process::Command::new(format!("{}/psql", leasedog_testbed::pg::BIN_DIR))
                        .arg("-h")
                        .arg(&sock)
                        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
                        .args(["-c", &format!("INSERT INTO t VALUES ({v})")])
                        .stdin(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                if ok {
                    acked.push(v);
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    a.agent().signal(libc::SIGTERM).unwrap();
    let st = a
        .agent
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(30))
        .expect("a exits after SIGTERM");
    assert!(st.success(), "a exit status {st}:\n{}", a.log());
    wait_holder(&client, scope, "b", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || b.writable() == Some(true)),
        "b promoted:\n{}",
        b.log()
    );
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().unwrap();
    assert!(!acked.is_empty(), "the client committed something");
    let log = a.log();
    assert!(
        log.contains("fast shutdown, checkpoint sent to the standbys"),
        "a's step-down was a fast shutdown:\n{log}"
    );
    let (state, checkpoint) = control(&a);
    assert_eq!(state, "shut down", "a shut down cleanly");
    let switch = newest_switchpoint(&b);
    assert!(
        switch > checkpoint,
        "b branched at {switch:X}, before a's shutdown checkpoint at {checkpoint:X}"
    );
    let missing: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|v| !b.has_row("t", *v))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged commits lost: {missing:?} of {}",
        acked.len()
    );
    assert!(
        a.monitor.kills().is_empty(),
        "no reset after a clean handover"
    );
    eprintln!(
        "handover: {} commits acknowledged, none lost; a's checkpoint {checkpoint:X}, b branched at {switch:X}",
        acked.len()
    );
}

/// A full-cluster reboot: both PostgreSQL servers down (nothing else starts
/// them: the distribution's unit is refused), the key expired, both agents
/// started. Each starts its server as a standby of nobody, which makes it
/// eligible; exactly one wins and promotes, the other follows it.
#[test]
fn after_a_full_cluster_reboot_one_node_is_elected_and_the_other_follows() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "reboot";
    let (mut a, mut b) = two_nodes(scope, &eps, &client, "");
    // The "power cut": both agents and both servers die at once.
    let t0 = boottime_ns();
    a.kill_agent();
    b.kill_agent();
    signal_all(&processes_in(&a.pg.data_dir()), libc::SIGKILL);
    signal_all(&processes_in(&b.pg.data_dir()), libc::SIGKILL);
    // a was armed: wait for its "reset" so it cannot hit the next agent.
    a.monitor.wait_kill(t0, Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(20), || holder(&client, scope).is_none()),
        "the key expired"
    );
    assert!(processes_in(&a.pg.data_dir()).is_empty());
    assert!(processes_in(&b.pg.data_dir()).is_empty());

    a.start_agent();
    b.start_agent();
    assert!(
        wait_until(Duration::from_secs(60), || holder(&client, scope).is_some()),
        "nobody was elected\n{}\n{}",
        a.log(),
        b.log()
    );
    let new = holder(&client, scope).unwrap();
    let (l, f) = if new == "a" { (&a, &b) } else { (&b, &a) };
    assert!(
        wait_until(Duration::from_secs(30), || l.writable() == Some(true)),
        "{new} promoted:\n{}",
        l.log()
    );
    assert!(
        l.log().contains("starting PostgreSQL as a standby"),
        "{new}'s server was started by its agent:\n{}",
        l.log()
    );
    l.pg.sql("INSERT INTO t VALUES (2)");
    wait_replica_with(f, 2, Duration::from_secs(90));
    assert!(
        wait_until(Duration::from_secs(30), || f.streaming()),
        "{} streams from {new}",
        f.name
    );
    assert_eq!(assert_one_writable(&[&a, &b], 5), new);
}
