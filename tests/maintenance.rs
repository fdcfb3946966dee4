//! Maintenance on real parts: a real etcd, real PostgreSQL 15 clusters,
//! real agents with fake watchdog devices (whose expiry "resets" the node:
//! `testbed::cluster`), driven by the real `leasedog pause`, `resume`,
//! `restart NODE` and `reinit NODE` command lines.
//!
//! Budget (`testbed::agent::fake_device_config`): T = 4 s, loop 0.4 s. The
//! "no promotion while paused" windows are 3 T; the checks are of states
//! and orders, with generous bounds, not of timings.

use leasedog_testbed::agent::{fake_device_config, TEST_TTL_SECS};
use leasedog_testbed::cluster::{self, Node};
use leasedog_testbed::etcd::{BlockingClient, EtcdServer};
use leasedog_testbed::pg::{free_port, PgNode};
use leasedog_testbed::wait_until;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn t() -> Duration {
    Duration::from_secs(TEST_TTL_SECS)
}

/// A 2-node scope: `a` leads a primary, `b` streams from it; each agent
/// gets `extra_a` / `extra_b` appended to its configuration.
struct Scope {
    scope: &'static str,
    _etcd: EtcdServer,
    client: BlockingClient,
    /// The operator's configuration for the command line.
    cli_config: PathBuf,
    _cli_dir: tempfile::TempDir,
    a: Node,
    b: Node,
}

impl Scope {
    fn start(scope: &'static str, extra_a: &str, extra_b: &str) -> Scope {
        let etcd = EtcdServer::start().unwrap();
        let eps = etcd.endpoints();
        let client = BlockingClient::connect(&eps).unwrap();
        let cli_dir = tempfile::tempdir().unwrap();
        let cli_config = cli_dir.path().join("leasedog.toml");
        std::fs::write(
            &cli_config,
            fake_device_config(
                scope,
                "operator",
                &eps,
                "required",
                &cli_dir.path().join("wd"),
                &cli_dir.path().join("audit"),
            ),
        )
        .unwrap();
        let pg_a = PgNode::init(free_port());
        pg_a.start();
        pg_a.sql("CREATE TABLE t (v bigint PRIMARY KEY)");
        let pm = pg_a.postmaster_pid();
        let mut a = Node::new(Path::new(BIN), scope, "a", &eps, pg_a, extra_a);
        a.start_agent();
        assert!(
            cluster::wait_holder(&client, scope, "a", Duration::from_secs(30)),
            "a leads:\n{}",
            a.agent().log()
        );
        // The agent read the pause key before racing: the primary started
        // before it kept rule 8's grace (not fenced, same postmaster).
        assert_eq!(a.pg.postmaster_pid(), pm, "{}", a.agent().log());
        let pg_b = PgNode::replica_of(&a.pg, free_port());
        let mut b = Node::new(Path::new(BIN), scope, "b", &eps, pg_b, extra_b);
        b.start_agent();
        assert!(
            wait_until(Duration::from_secs(60), || b.streaming()),
            "b streams from a:\n{}",
            b.agent().log()
        );
        // Both member records are in etcd (the command line checks names).
        assert!(wait_until(Duration::from_secs(20), || {
            client
                .keys_with_prefix(&format!("/leasedog/{scope}/members/"))
                .is_ok_and(|k| k.len() == 2)
        }));
        Scope {
            scope,
            _etcd: etcd,
            client,
            cli_config,
            _cli_dir: cli_dir,
            a,
            b,
        }
    }

    /// Runs `leasedog ARGS --config CLI`: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.cli_config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn holder(&self) -> Option<String> {
        cluster::holder(&self.client, self.scope)
    }

    /// Both agents have recorded `what` (a maintenance fact) in their audit.
    fn both_saw(&self, what: &str) -> bool {
        let needle = format!("what: \"{what}\"");
        [&self.a, &self.b]
            .iter()
            .all(|n| n.agent().wait_log(&needle, Duration::from_secs(15)))
    }
}

/// Over `window`: the key's holder stays within `allowed` and `b` never
/// answers as writable. Returns the holders seen.
fn hold_over(s: &Scope, window: Duration, allowed: &[Option<&str>]) -> Vec<Option<String>> {
    let end = Instant::now() + window;
    let mut seen: Vec<Option<String>> = Vec::new();
    while Instant::now() < end {
        let h = s.holder();
        assert!(
            allowed.contains(&h.as_deref()),
            "the key moved to {h:?} while paused:\n--- b ---\n{}",
            s.b.agent().log()
        );
        assert_ne!(s.b.writable(), Some(true), "b promoted while paused");
        if seen.last() != Some(&h) {
            seen.push(h);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    seen
}

#[test]
fn paused_no_promotion_after_the_leaders_postgres_or_agent_dies_resume_fails_over() {
    let _g = serial();
    let s = Scope::start("pause1", "", "");
    let (code, out, err) = s.cli(&["pause"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(s.both_saw("paused"), "both agents record the pause");
    let (_, status, _) = s.cli(&["status"]);
    assert!(status.contains("PAUSED"), "{status}");

    // The leader's PostgreSQL crashes (every process of its cluster killed):
    // a keeps the key, b waits.
    for pid in s.a.pg.processes() {
        // SAFETY: kill(2) of the cluster this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(wait_until(Duration::from_secs(10), || s
        .a
        .pg
        .processes()
        .is_empty()));
    hold_over(&s, 3 * t(), &[Some("a")]);
    assert_eq!(
        s.a.writable(),
        None,
        "the agent did not start it while paused"
    );
    // Started again by hand (crash recovery, writable: a holds a fresh
    // lease): still a.
    s.a.pg.start();
    assert_eq!(s.a.writable(), Some(true));
    hold_over(&s, t(), &[Some("a")]);

    // The leader's agent dies: its watchdog resets the node (the fake
    // device's monitor kills its PostgreSQL), its key expires, and nobody
    // takes it while paused.
    s.a.agent().signal(libc::SIGKILL).unwrap();
    let seen = hold_over(&s, 3 * t(), &[Some("a"), None]);
    assert_eq!(seen.last(), Some(&None), "a's key expired: {seen:?}");
    assert!(
        wait_until(Duration::from_secs(10), || s.a.writable().is_none()),
        "the reset stopped a's PostgreSQL"
    );

    // Resume: b races, waits for a's lease (gone), promotes.
    let t0 = Instant::now();
    let (code, out, err) = s.cli(&["resume"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("race"), "the resume says who races: {out}");
    assert!(
        cluster::wait_holder(&s.client, s.scope, "b", Duration::from_secs(30)),
        "b takes the key after the resume:\n{}",
        s.b.agent().log()
    );
    assert!(wait_until(Duration::from_secs(30), || s.b.writable() == Some(true)));
    eprintln!("resume to b writable: {:.2} s", t0.elapsed().as_secs_f64());
    assert!(s
        .b
        .agent()
        .wait_log("what: \"resumed\"", Duration::from_secs(5)));
}

#[test]
fn restart_of_the_leaders_postgres_keeps_the_leader_and_the_replica_streams_again() {
    let _g = serial();
    let s = Scope::start("restart1", "", "");
    let pm = s.a.pg.postmaster_pid().expect("a's postmaster");
    s.a.pg.sql("INSERT INTO t VALUES (1)");
    // Watch the key from a thread: it must never change hands.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, eps, scope) = (stop.clone(), s._etcd.endpoints(), s.scope);
        std::thread::spawn(move || {
            let c = BlockingClient::connect(&eps).unwrap();
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let h = cluster::holder(&c, scope);
                if seen.last() != Some(&h) {
                    seen.push(h);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        })
    };
    let t0 = Instant::now();
    let (code, out, err) = s.cli(&["restart", "a", "--timeout", "120"]);
    let took = t0.elapsed();
    assert_eq!(code, 0, "{out}{err}\n--- a ---\n{}", s.a.agent().log());
    assert!(out.contains("a: restart done"), "{out}");
    assert!(
        wait_until(Duration::from_secs(30), || s.a.writable() == Some(true)),
        "a is writable again:\n{}",
        s.a.agent().log()
    );
    let pm2 = s.a.pg.postmaster_pid().expect("a's new postmaster");
    assert_ne!(pm, pm2, "a new postmaster");
    s.a.pg.sql("INSERT INTO t VALUES (2)");
    assert!(
        wait_until(Duration::from_secs(60), || s
            .b
            .pg
            .try_sql("SELECT count(*) FROM t")
            .is_ok_and(|n| n == "2")),
        "b replays a's write after the restart:\n{}",
        s.b.agent().log()
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    assert_eq!(seen, vec![Some("a".to_string())], "the key never moved");
    assert_eq!(s.b.writable(), Some(false));
    eprintln!(
        "restart of the leader: {:.2} s request to outcome",
        took.as_secs_f64()
    );
}

#[test]
fn reinit_reclones_a_replica_and_is_refused_on_the_leader_or_an_unknown_member() {
    let _g = serial();
    let s = Scope::start("reinit1", "", "");
    let (code, _, err) = s.cli(&["reinit", "a"]);
    assert_eq!(code, 1);
    assert!(err.contains("a is the leader"), "{err}");
    let (code, _, err) = s.cli(&["restart", "nosuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown member \"nosuch\""), "{err}");
    assert_eq!(s.a.writable(), Some(true), "a untouched");

    let marker = s.b.pg.data_dir().join("leasedog-test-marker");
    std::fs::write(&marker, "old data directory").unwrap();
    s.a.pg.sql("INSERT INTO t VALUES (10)");
    let t0 = Instant::now();
    let (code, out, err) = s.cli(&["reinit", "b", "--timeout", "300"]);
    assert_eq!(code, 0, "{out}{err}\n--- b ---\n{}", s.b.agent().log());
    assert!(!marker.exists(), "the data directory was wiped");
    assert!(
        wait_until(Duration::from_secs(60), || s.b.streaming()),
        "b streams again:\n{}",
        s.b.agent().log()
    );
    s.a.pg.sql("INSERT INTO t VALUES (11)");
    assert!(wait_until(Duration::from_secs(60), || s
        .b
        .pg
        .try_sql("SELECT count(*) FROM t")
        .is_ok_and(|n| n == "2")));
    assert_eq!(s.holder().as_deref(), Some("a"));
    eprintln!(
        "reinit of b: {:.2} s request to outcome",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn callbacks_get_patronis_arguments_and_a_hanging_one_does_not_delay_promotion() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("callbacks");
    let pids = dir.path().join("pids");
    // Appends its arguments, then hangs far past any bound of this test.
    let script = dir.path().join("cb.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ >>{pids}\necho \"$*\" >>{log}\nexec sleep 600\n",
            pids = pids.display(),
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let callbacks = format!(
        "[callbacks]\non_role_change = \"{s}\"\non_start = \"{s}\"\non_stop = \"{s}\"\ntimeout = 300.0\n",
        s = script.display()
    );
    let s = Scope::start("callbacks1", &callbacks, &callbacks);
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || lines()
            .lines()
            .any(|l| l == "on_role_change primary callbacks1")),
        "a's promotion ran on_role_change with (action, role, scope): {:?}",
        lines()
    );
    // a's hanging callback did not stop it from leading: it keeps its key.
    hold_over(&s, t(), &[Some("a")]);

    // A restart of b leaves its on_start hanging (timeout 300 s) ...
    let (code, out, err) = s.cli(&["restart", "b", "--timeout", "120"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_until(Duration::from_secs(10), || lines()
            .lines()
            .any(|l| l == "on_start replica callbacks1")),
        "b's restart ran on_start: {:?}",
        lines()
    );
    // ... when a's agent dies and its node is "reset": b promotes anyway.
    s.a.agent().signal(libc::SIGKILL).unwrap();
    let killed = Instant::now();
    assert!(
        cluster::wait_holder(&s.client, s.scope, "b", Duration::from_secs(30)),
        "b takes the key:\n{}",
        s.b.agent().log()
    );
    assert!(wait_until(Duration::from_secs(30), || s.b.writable() == Some(true)));
    let promoted = killed.elapsed();
    assert!(
        wait_until(Duration::from_secs(10), || lines()
            .lines()
            .filter(|l| *l == "on_role_change primary callbacks1")
            .count()
            == 2),
        "b's promotion ran its callback too: {:?}",
        lines()
    );
    // b's loop is not blocked by its hanging callbacks: it keeps the key.
    let end = Instant::now() + 2 * t();
    while Instant::now() < end {
        assert_eq!(s.holder().as_deref(), Some("b"));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Promotion within the failover bound (T + slack + promotion), far
    // below the callbacks' 600 s hang.
    assert!(promoted < Duration::from_secs(30), "{promoted:?}");
    eprintln!(
        "kill of a to b writable, with hanging callbacks: {:.2} s",
        promoted.as_secs_f64()
    );
    // The hanging callbacks this test started (their own process groups).
    for pid in std::fs::read_to_string(&pids).unwrap_or_default().lines() {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) of a callback this test's script started (the
            // script execs its sleep: same pid).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn an_agent_restarted_in_a_paused_scope_neither_races_nor_starts_postgres() {
    let _g = serial();
    let mut s = Scope::start("pause2", "", "");
    let (code, out, err) = s.cli(&["pause"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(s.both_saw("paused"));
    // SIGTERM is the ordinary step-down, pause or not: the leader stops
    // PostgreSQL, releases the key and exits.
    s.a.agent().signal(libc::SIGTERM).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || s.holder().is_none()),
        "a released the key:\n{}",
        s.a.agent().log()
    );
    assert!(wait_until(Duration::from_secs(30), || s
        .a
        .writable()
        .is_none()));
    s.a.start_agent();
    assert!(
        s.a.agent()
            .wait_log("what: \"paused\"", Duration::from_secs(30)),
        "the new agent reads the pause:\n{}",
        s.a.agent().log()
    );
    // Neither node takes the key, a's PostgreSQL stays down, b stays a replica.
    let end = Instant::now() + 3 * t();
    while Instant::now() < end {
        assert_eq!(s.holder(), None, "a key taken while paused");
        assert_eq!(s.a.writable(), None, "a's PostgreSQL started while paused");
        assert_ne!(s.b.writable(), Some(true));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The new agent's own audit: no key won.
    assert!(
        !s.a.agent().log().contains("Acquired {"),
        "{}",
        s.a.agent().log()
    );
    // Resume: one node leads with a writable server, the other is not writable.
    let (code, out, err) = s.cli(&["resume"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_until(Duration::from_secs(60), || match s.holder().as_deref() {
            Some("a") => s.a.writable() == Some(true) && s.b.writable() != Some(true),
            Some("b") => s.b.writable() == Some(true) && s.a.writable() != Some(true),
            _ => false,
        }),
        "one leader after the resume: {:?}\n--- a ---\n{}\n--- b ---\n{}",
        s.holder(),
        s.a.agent().log(),
        s.b.agent().log()
    );
}
