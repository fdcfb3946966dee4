//! Planned switchover, `list` and `failover --to` with real etcd, real
//! PostgreSQL 15 and real agents (fake watchdog devices; T = 4 s).
//!
//! `SWITCHOVER_RUNS=10 cargo test --features testing --test switchover
//! -- --nocapture switchover_under_two_writers` is the benchmark: it
//! switches back and forth that many times under two writers and prints the
//! writer gap, median [min-max], and the lost acknowledged inserts.

use leasedog_testbed::clients::{self, Every, Target};
use leasedog_testbed::cluster::{self, Node};
use leasedog_testbed::etcd::{boottime_ns, BlockingClient, EtcdServer};
use leasedog_testbed::pg::{free_port, PgNode};
use leasedog_testbed::wait_until;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

/// One cluster at a time: two PostgreSQL servers and agents per test
/// already load a 2-core machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

struct Two {
    _etcd: EtcdServer,
    client: BlockingClient,
    scope: String,
    nodes: Vec<Node>,
    /// A configuration for the CLI (node a's).
    cfg: PathBuf,
    _dir: tempfile::TempDir,
}

impl Two {
    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.agent().log()))
            .collect()
    }
}

/// a leads a primary with table `bench`; b streams from it. `extra`: lines
/// for both nodes' `[postgres]` section.
fn two_nodes(scope: &str, extra: &str) -> Two {
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let pg_a = PgNode::init(free_port());
    pg_a.start();
    pg_a.sql("CREATE TABLE bench (id bigint PRIMARY KEY, at timestamptz DEFAULT now())");
    let mut a = Node::new(Path::new(BIN), scope, "a", &eps, pg_a, extra);
    a.start_agent();
    assert!(
        cluster::wait_holder(&client, scope, "a", Duration::from_secs(30)),
        "a leads:\n{}",
        a.agent().log()
    );
    let pg_b = PgNode::replica_of(&a.pg, free_port());
    let mut b = Node::new(Path::new(BIN), scope, "b", &eps, pg_b, extra);
    b.start_agent();
    // The agent restarts b's server under its own management first.
    assert!(
        b.agent()
            .wait_log("PostgreSQL runs as a replica of a", Duration::from_secs(60))
            && wait_until(Duration::from_secs(60), || b.streaming()),
        "b streams from a:\n{}",
        b.agent().log()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("leasedog.toml");
    std::fs::write(&cfg, a.config()).unwrap();
    let two = Two {
        _etcd: etcd,
        client,
        scope: scope.into(),
        nodes: vec![a, b],
        cfg,
        _dir: dir,
    };
    // Both member records up, b's as a replica.
    assert!(
        wait_until(Duration::from_secs(30), || list(&two).is_some_and(|l| {
            l["members"].as_array().is_some_and(|m| {
                m.len() == 2
                    && m.iter()
                        .any(|r| r["node"] == "b" && r["state"] == "replica")
            })
        })),
        "member records:\n{:?}",
        list(&two)
    );
    two
}

/// `leasedog ARGS --config CFG`: exit code, stdout, stderr.
fn cli(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn list(t: &Two) -> Option<serde_json::Value> {
    let (code, out, _) = cli(&t.cfg, &["list", "--json"]);
    (code == 0)
        .then(|| serde_json::from_str(&out).ok())
        .flatten()
}

fn try_row<'a>(l: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    l["members"].as_array()?.iter().find(|r| r["node"] == node)
}

fn row<'a>(l: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    try_row(l, node).unwrap_or_else(|| panic!("{node} in {l}"))
}

fn switchover_key(scope: &str) -> String {
    format!("/leasedog/{scope}/switchover")
}

fn answer(c: &BlockingClient, scope: &str) -> Option<serde_json::Value> {
    let v = c
        .get(&format!("/leasedog/{scope}/switchover-status"))
        .ok()??;
    serde_json::from_slice(&v).ok()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn switchover_under_two_writers_loses_no_acknowledged_insert() {
    let _g = serial();
    let runs: usize = std::env::var("SWITCHOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let t = two_nodes("switch", "");

    // list --json: roles, state, timeline, LSNs, the leader's armed watchdog.
    assert!(
        wait_until(Duration::from_secs(30), || list(&t).is_some_and(|l| {
            try_row(&l, "a").is_some_and(|r| r["armed"] == true)
                && try_row(&l, "b").is_some_and(|r| r["receive_lsn"].is_u64())
        })),
        "{:?}",
        list(&t)
    );
    let l = list(&t).unwrap();
    assert_eq!(l["leader"], "a");
    let (a, b) = (row(&l, "a"), row(&l, "b"));
    assert_eq!(a["role"], "Leader");
    assert_eq!(a["state"], "primary");
    assert_eq!(a["timeline"], 1);
    assert_eq!(a["w_secs"], 2, "the fake device's W");
    assert!(a["lag_bytes"].is_null(), "the leader has no lag");
    assert_eq!(b["role"], "Follower");
    assert_eq!(b["state"], "replica");
    assert_eq!(b["armed"], false);
    assert!(b["lag_bytes"].is_u64(), "{b}");
    assert!(b["replay_lsn"].is_u64(), "{b}");

    let targets: Vec<Target> = t
        .nodes
        .iter()
        .map(|n| Target {
            name: n.name.clone(),
            port: n.pg.port,
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let conninfo = clients::read_write_conninfo(&targets);
    let writers: Vec<_> = [(0i64, true), (1_000_000_000, false)]
        .into_iter()
        .map(|(base, kept)| {
            rt.spawn(clients::writer(
                vec![conninfo.clone()],
                targets.clone(),
                base,
                kept,
                Every::fixed(Duration::from_millis(20)),
                stop.clone(),
            ))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    let mut starts = Vec::new();
    let mut leader = "a";
    for run in 0..runs {
        let to = if leader == "a" { "b" } else { "a" };
        let before = t
            .node(leader)
            .agent()
            .log()
            .lines()
            .filter(|l| started_line(l))
            .count();
        starts.push(boottime_ns());
        // Every second run is scheduled (`--at`), the first one at once.
        let mut args = vec!["switchover", "--to", to, "--wait", "60"];
        if run % 2 == 1 {
            args.extend(["--at", "+2s"]);
        }
        let (code, out, err) = cli(&t.cfg, &args);
        if run % 2 == 1 {
            assert!(out.contains("(in 2 s)"), "{out}");
            let waited = (boottime_ns() - starts[run]) as f64 / 1e9;
            assert!(waited >= 1.0, "--at +2s carried out after {waited:.2} s");
        }
        assert_eq!(
            code,
            0,
            "run {run}: switchover {leader} -> {to}: {out}{err}\n{}",
            t.logs()
        );
        assert!(out.contains(&format!("{to} is the leader")), "{out}");
        assert!(
            out.contains("handed_over") || out.contains("holds the key"),
            "{out}"
        );
        assert_eq!(cluster::holder(&t.client, &t.scope).as_deref(), Some(to));
        // The old leader rejoins as a standby of the new one, no rewind.
        let old = t.node(leader);
        assert!(
            wait_until(Duration::from_secs(60), || old.streaming()),
            "run {run}: {leader} streams from {to}:\n{}",
            t.logs()
        );
        // Either a rejoin whose pg_rewind found nothing to do, or a start
        // as a standby of the new leader (the stopped server seen before
        // the follow): never a rewind, never crash recovery.
        // (The server may stream before the agent logs the start's end.)
        wait_until(Duration::from_secs(10), || {
            old.agent()
                .log()
                .lines()
                .filter(|l| started_line(l))
                .count()
                > before
        });
        let rejoin = old
            .agent()
            .log()
            .lines()
            .rfind(|l| started_line(l))
            .unwrap_or_default()
            .to_string();
        assert!(
            rejoin.contains("PostgreSQL started as a standby")
                || (rejoin.contains("crash_recovery: None") && rejoin.contains("rewound: false")),
            "run {run}: {leader} rejoined without crash recovery or rewind: {rejoin}\n{}",
            old.agent().log()
        );
        assert!(
            t.client.get(&switchover_key(&t.scope)).unwrap().is_none(),
            "the CLI withdrew its request"
        );
        // Both member records back before the next switchover.
        assert!(
            wait_until(Duration::from_secs(30), || list(&t).is_some_and(|l| {
                l["leader"] == to
                    && try_row(&l, to).is_some_and(|r| r["role"] == "Leader")
                    && try_row(&l, leader).is_some_and(|r| r["state"] == "replica")
            })),
            "{:?}",
            list(&t)
        );
        leader = to;
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<Vec<clients::Attempt>> = writers
        .into_iter()
        .map(|w| rt.block_on(w).unwrap())
        .collect();

    // Every acknowledged insert is on the last leader.
    let rows = t
        .node(leader)
        .pg
        .sql("SELECT coalesce(string_agg(id::text, ','), '') FROM bench");
    let have: std::collections::BTreeSet<i64> =
        rows.split(',').filter_map(|v| v.parse().ok()).collect();
    let acked: Vec<i64> = logs
        .iter()
        .flatten()
        .filter(|a| a.acked())
        .map(|a| a.id)
        .collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !have.contains(id))
        .collect();
    // The writer gap of each run: the longest wait between acknowledged
    // inserts of either writer from the switchover's start to the next.
    let mut gaps: Vec<f64> = starts
        .iter()
        .enumerate()
        .map(|(i, &t0)| {
            let end = starts.get(i + 1).copied().unwrap_or(u64::MAX);
            logs.iter()
                .filter_map(|log| {
                    let part: Vec<clients::Attempt> =
                        log.iter().filter(|a| a.at_ns < end).cloned().collect();
                    clients::gap_completed(&part, t0)
                })
                .fold(0.0, f64::max)
        })
        .collect();
    let (min, max) = (
        gaps.iter().copied().fold(f64::MAX, f64::min),
        gaps.iter().copied().fold(0.0, f64::max),
    );
    eprintln!(
        "switchover: {runs} runs, writer gap median {:.2} s [{min:.2}-{max:.2}], \
         {} acknowledged inserts, {} lost",
        median(&mut gaps),
        acked.len(),
        lost.len()
    );
    assert!(acked.len() > 100, "the writers committed: {}", acked.len());
    assert!(lost.is_empty(), "acknowledged inserts lost: {lost:?}");
    for n in &t.nodes {
        assert!(n.monitor.kills().is_empty(), "{} was never reset", n.name);
    }

    // history: the hand-overs, from etcd's copy of the audit records.
    let (code, out, err) = cli(&t.cfg, &["history"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("switchover_handed_over").count(), runs, "{out}");
    assert!(out.contains("promoted"), "{out}");

    // audit timeline: each hand-over is a proven change of leader.
    let logs: Vec<String> = t.nodes.iter().map(audit_log).collect();
    let mut args = vec!["audit", "timeline"];
    args.extend(logs.iter().map(String::as_str));
    let (code, out, err) = cli(&t.cfg, &args);
    eprintln!("{out}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.matches("FENCED-BY-STEP-DOWN").count() >= runs,
        "every switchover proven by the confirmed stop before the hand-over:\n{out}"
    );
    assert!(
        !out.contains("UNPROVEN") && !out.contains("VIOLATION"),
        "{out}"
    );
    // The target reads the key's history when it finds the key on its own
    // lease: no hand-over is taken as an unknown history, whose promotion
    // would wait T + 1.5 s blind (it did: a writer gap of 6 s).
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains("\"previous_holders_unknown\""),
            "{log}: a win over an unknown history"
        );
    }
}

/// An agent's log line saying its server runs as a standby again.
fn started_line(l: &str) -> bool {
    l.contains("PostgreSQL runs as a replica of") || l.contains("PostgreSQL started as a standby")
}

/// The node's audit log (the `[audit] dir` of its configuration).
fn audit_log(n: &Node) -> String {
    let cfg = n.config();
    let dir = cfg
        .lines()
        .skip_while(|l| l.trim() != "[audit]")
        .find_map(|l| l.strip_prefix("dir = "))
        .expect("an [audit] dir")
        .trim_matches('"')
        .to_string();
    format!("{dir}/{}.audit.jsonl", n.name)
}

#[test]
fn refused_switchovers_name_their_cause_and_the_leader_stays() {
    let _g = serial();
    let t = two_nodes("refuse", "");
    let cfg = &t.cfg;

    // Bad input: the CLI's own checks (exit 2), nothing written.
    let (code, _, err) = cli(cfg, &["switchover", "--to", "zz"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown member \"zz\": the scope's members are a, b"),
        "{err}"
    );
    let (code, _, err) = cli(cfg, &["switchover", "--from", "b", "--to", "b"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--from b is not the leader (a is)"), "{err}");
    let (code, _, err) = cli(cfg, &["switchover", "--to", "a"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a is already the leader"), "{err}");
    let (code, _, err) = cli(cfg, &["switchover", "--to", "b", "--at", "tomorrow"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a time"), "{err}");
    let (code, _, err) = cli(
        cfg,
        &["switchover", "--to", "b", "--at", "2001-01-01T00:00:00Z"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is in the past"), "{err}");
    let (code, _, err) = cli(cfg, &["failover", "--to", "b"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("a holds the leader key; use `leasedog switchover --to b`"),
        "{err}"
    );
    assert!(t.client.get(&switchover_key(&t.scope)).unwrap().is_none());

    // A lagging target: b's WAL receiver stopped, then 3 MB of WAL on a
    // (maximum_lag_on_failover is 1 MiB): the leader refuses, a leads on.
    let b = t.node("b");
    let receiver: i32 =
        b.pg.sql("SELECT pid FROM pg_stat_wal_receiver")
            .parse()
            .unwrap();
    // SAFETY: kill(2) on a process of the cluster this test started.
    unsafe { libc::kill(receiver, libc::SIGSTOP) };
    let a = t.node("a");
    a.pg.sql("CREATE TABLE big AS SELECT repeat('x', 1000) AS v FROM generate_series(1, 3000)");
    std::thread::sleep(Duration::from_secs(1)); // a's observer sees its LSN
    let (code, out, err) = cli(cfg, &["switchover", "--to", "b", "--wait", "30"]);
    // SAFETY: as above.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    assert_eq!(code, 1, "{out}{err}\n{}", t.logs());
    assert!(
        err.contains("refused by a: b lags") && err.contains("maximum_lag_on_failover"),
        "{err}"
    );
    assert_eq!(cluster::holder(&t.client, &t.scope).as_deref(), Some("a"));
    assert_eq!(a.writable(), Some(true));
    assert!(a.agent().log().contains("switchover"), "recorded");
    assert!(t.client.get(&switchover_key(&t.scope)).unwrap().is_none());

    // A paused scope (the `pause` command's key): refused.
    let pause = format!("/leasedog/{}/pause", t.scope);
    t.client.put(&pause, "{}").unwrap();
    let (code, out, err) = cli(cfg, &["switchover", "--to", "b", "--wait", "30"]);
    let listed = list(&t).expect("list --json");
    t.client.delete(&pause).unwrap();
    assert_eq!(listed["paused"], true, "{listed}");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refused by a: the scope is paused"), "{err}");
    assert_eq!(cluster::holder(&t.client, &t.scope).as_deref(), Some("a"));

    // A target whose agent is down: its member record goes with its lease.
    // The CLI says so; a request written by hand is refused by the leader.
    let b = t.node("b");
    b.agent().signal(libc::SIGKILL).unwrap();
    b.pg.stop();
    let (cfg, client) = (&t.cfg, &t.client);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (_, out, _) = cli(cfg, &["list", "--json"]);
            serde_json::from_str::<serde_json::Value>(&out)
                .is_ok_and(|l| l["members"].as_array().is_some_and(|m| m.len() == 1))
        }),
        "b's record expired"
    );
    let (code, _, err) = cli(cfg, &["switchover", "--to", "b"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown member \"b\": the scope's members are a"),
        "{err}"
    );
    client
        .put(&switchover_key(&t.scope), r#"{"id":"by-hand","to":"b"}"#)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || answer(client, &t.scope)
            .is_some_and(|a| a["id"] == "by-hand")),
        "the leader answered"
    );
    let ans = answer(client, &t.scope).unwrap();
    assert_eq!(ans["outcome"], "refused", "{ans}");
    assert!(
        ans["reason"]
            .as_str()
            .unwrap()
            .contains("b has no member record: its agent is down"),
        "{ans}"
    );
    assert_eq!(cluster::holder(client, &t.scope).as_deref(), Some("a"));
}

#[test]
fn failover_to_a_lagging_replica_of_a_leaderless_scope() {
    let _g = serial();
    let t = two_nodes("failover", "");
    let (a, b) = (t.node("a"), t.node("b"));
    // b falls more than maximum_lag_on_failover (1 MiB) behind a's
    // published LSN: its WAL receiver stopped, 30 MB of WAL on a (more
    // than loopback's socket buffers hold: a resumed receiver would
    // otherwise catch up from them after a is gone).
    let receiver: i32 =
        b.pg.sql("SELECT pid FROM pg_stat_wal_receiver")
            .parse()
            .unwrap();
    // Only what b logs from now on: its rejoin at start-up may have logged
    // "not eligible for leadership: rejoin in progress" already.
    let from = b.agent().log().len();
    // SAFETY: kill(2) on a process of the cluster this test started.
    unsafe { libc::kill(receiver, libc::SIGSTOP) };
    a.pg.sql("CREATE TABLE big AS SELECT repeat('x', 1000) AS v FROM generate_series(1, 30000)");
    // a publishes its LSN and b re-reads it every 20 loops (8 s each).
    let ineligible = wait_until(Duration::from_secs(90), || {
        b.agent()
            .log()
            .get(from..)
            .is_some_and(|l| l.contains("not eligible for leadership"))
    });
    // a dies, agent and PostgreSQL (a "reset"), before b's receiver goes
    // on: b stays behind, and nobody may promote.
    a.agent().signal(libc::SIGKILL).unwrap();
    for pid in a.pg.processes() {
        // SAFETY: kill(2) on the processes of a cluster this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SAFETY: as above.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    assert!(ineligible, "b sees its lag:\n{}", t.logs());
    assert!(
        wait_until(Duration::from_secs(20), || cluster::holder(
            &t.client, &t.scope
        )
        .is_none()),
        "a's key expired: holder {:?}\n{}",
        cluster::holder(&t.client, &t.scope),
        t.logs()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster::holder(&t.client, &t.scope),
        None,
        "b lags: it does not race:\n{}",
        b.agent().log()
    );

    let (code, _, err) = cli(&t.cfg, &["failover", "--to", "zz"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown member \"zz\""), "{err}");
    let (code, out, err) = cli(&t.cfg, &["failover", "--to", "b", "--wait", "60"]);
    assert_eq!(code, 0, "{out}{err}\n{}", t.logs());
    assert!(out.contains("b is the leader"), "{out}");
    assert_eq!(b.writable(), Some(true));
    assert_eq!(cluster::holder(&t.client, &t.scope).as_deref(), Some("b"));
}

#[test]
fn a_target_that_cannot_catch_up_gets_nothing_and_the_leader_takes_its_server_back() {
    let _g = serial();
    let t = two_nodes("abort", "");
    let (a, b) = (t.node("a"), t.node("b"));
    // b's WAL receiver stopped: it cannot receive a's final WAL.
    let receiver: i32 =
        b.pg.sql("SELECT pid FROM pg_stat_wal_receiver")
            .parse()
            .unwrap();
    // SAFETY: kill(2) on a process of the cluster this test started.
    unsafe { libc::kill(receiver, libc::SIGSTOP) };
    a.pg.sql("INSERT INTO bench (id) SELECT generate_series(1, 100)");
    let (code, out, err) = cli(
        &t.cfg,
        &["switchover", "--to", "b", "--force", "--wait", "40"],
    );
    // SAFETY: as above.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    assert_eq!(code, 1, "{out}{err}\n{}", t.logs());
    eprintln!("{out}{err}");
    assert!(err.contains("aborted by a"), "{out}{err}");
    assert_eq!(cluster::holder(&t.client, &t.scope).as_deref(), Some("a"));
    assert!(
        wait_until(Duration::from_secs(30), || a.writable() == Some(true)),
        "a promoted again:\n{}",
        a.agent().log()
    );
    assert_eq!(
        a.pg.sql("SELECT count(*) FROM bench"),
        "100",
        "nothing lost"
    );
    assert!(
        a.monitor.kills().is_empty(),
        "a's watchdog was pinged throughout the wait"
    );
    assert_ne!(b.writable(), Some(true), "b never promoted");
    let log = a.agent().log();
    assert!(log.contains("SwitchoverAborted"), "{log}");
}
