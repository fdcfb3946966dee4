//! The PostgreSQL driver against real PostgreSQL 15 clusters (testbed::pg).

use leasedog::postgres::{
    cluster_processes, fence_by_scan, process_alive, NotEligible, Pg, PgConfig, PgError, Promotion,
    Role, StopHow,
};
use leasedog_testbed::pg::{free_port, PgNode};
use std::time::{Duration, Instant};

fn cfg_for(node: &PgNode) -> PgConfig {
    let mut c = PgConfig::with_data_dir(node.data_dir());
    c.host = node.socket_dir().display().to_string();
    c.port = node.port;
    c.log_file = Some(node.log_file());
    c
}

fn driver(node: &PgNode) -> Pg {
    Pg::new(cfg_for(node)).expect("driver")
}

async fn client(node: &PgNode) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&node.conninfo(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

fn wait_row(node: &PgNode, query: &str, want: &str) -> bool {
    PgNode::wait_until(Duration::from_secs(30), || {
        node.try_sql(query).as_deref() == Ok(want)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observes_primary_and_replica() {
    let primary = PgNode::init(free_port());
    primary.start();
    primary.sql("CREATE TABLE t (v int)");
    let replica = PgNode::replica_of(&primary, free_port());
    let (p, r) = (driver(&primary), driver(&replica));

    let ps = p.status().await.unwrap();
    assert_eq!(ps.role, Role::Primary);
    let pw = ps.wal.unwrap();
    assert_eq!(pw.timeline, 1);
    assert!(pw.receive.is_none() && pw.replay.is_none());
    let psql_lsn: leasedog::postgres::Lsn =
        primary.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    assert!(pw.current.unwrap() <= psql_lsn);

    primary.sql("INSERT INTO t SELECT generate_series(1, 1000)");
    let target: leasedog::postgres::Lsn =
        primary.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    assert!(wait_row(&replica, "SELECT count(*) FROM t", "1000"));
    let rs = r.status().await.unwrap();
    assert_eq!(rs.role, Role::Replica);
    let rw = rs.wal.unwrap();
    assert!(rw.current.is_none());
    assert!(rw.replay.unwrap() >= target, "{rw:?} vs {target}");
    assert_eq!(rw.timeline, 1);
    r.eligible(target)
        .await
        .expect("a caught-up replica is eligible");

    let h = p.health().await;
    assert!(h.postmaster_alive && h.accepts_connections, "{h:?}");
    assert_eq!(h.postmaster_pid, primary.postmaster_pid());

    primary.stop();
    assert_eq!(p.role().await.unwrap(), Role::Down);
    let h = p.health().await;
    assert!(
        !h.postmaster_alive && !h.accepts_connections && h.problem.is_some(),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotes_a_replica_and_promote_on_primary_is_ok() {
    let primary = PgNode::init(free_port());
    primary.start();
    let replica = PgNode::replica_of(&primary, free_port());
    let r = driver(&replica);
    let t0 = Instant::now();
    assert_eq!(r.promote().await.unwrap(), Promotion::Promoted);
    eprintln!("TIMING promote: {:?}", t0.elapsed());
    let st = r.status().await.unwrap();
    assert_eq!(st.role, Role::Primary);
    assert_eq!(
        st.wal.unwrap().timeline,
        2,
        "promotion starts a new timeline"
    );
    replica.sql("CREATE TABLE now_writable (v int)");
    // 55000 "recovery is not in progress" is success.
    assert_eq!(r.promote().await.unwrap(), Promotion::AlreadyPrimary);
    assert_eq!(
        driver(&primary).promote().await.unwrap(),
        Promotion::AlreadyPrimary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_stops_immediately_and_an_open_connection_cannot_commit() {
    let node = PgNode::init(free_port());
    node.start();
    node.sql("CREATE TABLE t (v int)");
    let c = client(&node).await;
    c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    let pm = node.postmaster_pid().unwrap();
    let report = driver(&node).fence_async().await.unwrap();
    eprintln!("TIMING immediate stop: {:?}", report.took);
    assert_eq!(report.how, StopHow::Immediate);
    assert_eq!(report.postmaster, Some(pm));
    assert!(!process_alive(pm));
    assert!(cluster_processes(&node.data_dir()).is_empty());
    assert!(c.execute("INSERT INTO t VALUES (2)", &[]).await.is_err());
    // Idempotent: a second fence finds nothing to stop.
    let again = fence_by_scan(
        &node.data_dir(),
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .unwrap();
    assert_eq!(again.how, StopHow::AlreadyStopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_kills_a_sigstopped_postmaster_and_all_its_backends() {
    let node = PgNode::init(free_port());
    node.start();
    node.sql("CREATE TABLE t (v int)");
    let c = client(&node).await;
    let pm = node.postmaster_pid().unwrap();
    // SAFETY: signalling our own test server.
    assert_eq!(unsafe { libc::kill(pm, libc::SIGSTOP) }, 0);
    // A stalled postmaster does not stop its backends: this one still commits.
    c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    // Observing a stalled server ends at the deadline, as an error, not "down".
    let mut cfg = cfg_for(&node);
    cfg.connect_timeout = 0.5;
    let stalled = Pg::new(cfg).unwrap();
    let t0 = Instant::now();
    let e = stalled.status().await.unwrap_err();
    assert!(matches!(e, PgError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let h = stalled.health().await;
    assert!(h.postmaster_alive && !h.accepts_connections, "{h:?}");

    let data = node.data_dir();
    let before = cluster_processes(&data);
    assert!(
        before.len() > 3,
        "postmaster, backend, auxiliaries: {before:?}"
    );
    // From a plain thread, no tokio: as the deadline timer calls it.
    let report = std::thread::spawn(move || {
        fence_by_scan(&data, Duration::from_millis(500), Duration::from_secs(5))
    })
    .join()
    .unwrap()
    .unwrap();
    eprintln!("TIMING fence of a stopped postmaster: {:?}", report.took);
    assert_eq!(report.how, StopHow::Killed);
    assert!(report.killed.contains(&pm));
    // The fence signals the postmaster's children itself: they quit on
    // SIGQUIT though the stopped postmaster cannot pass it on, and only
    // what is left (the postmaster) needs SIGKILL.
    assert!(
        report.killed.len() < before.len(),
        "the children quit on the fence's own SIGQUIT: killed {:?} of {before:?}",
        report.killed
    );
    assert!(!process_alive(pm));
    assert!(cluster_processes(&node.data_dir()).is_empty());
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.execute("INSERT INTO t VALUES (2)", &[]),
    )
    .await;
    assert!(
        matches!(r, Ok(Err(_))),
        "the kept-open backend must be dead: {r:?}"
    );
    // The killed cluster starts again (crash recovery, read-only: the driver
    // only starts standbys) and kept the committed row.
    let d = driver(&node);
    d.start_as_standby(None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    assert_eq!(node.sql("SELECT count(*) FROM t"), "1");
    assert!(node.is_in_recovery());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoins_a_diverged_old_primary_with_pg_rewind() {
    let a = PgNode::init(free_port());
    a.start();
    a.sql("CREATE TABLE t (who text)");
    // Rewind as a non-superuser with the documented grants (CHECKPOINT included).
    a.sql("CREATE ROLE repl REPLICATION LOGIN PASSWORD 'rpw'");
    a.sql(
        leasedog::postgres::REWIND_GRANTS_SQL
            .replace("{role}", "repl")
            .as_str(),
    );
    let b = PgNode::replica_of(&a, free_port());
    a.sql("INSERT INTO t VALUES ('before')");
    assert!(wait_row(&b, "SELECT count(*) FROM t", "1"));
    let mut cfg_a = cfg_for(&a);
    cfg_a.replication.user = "repl".into();
    cfg_a.replication.password = Some("rpw".into());
    let (da, db) = (Pg::new(cfg_a.clone()).unwrap(), driver(&b));
    assert_eq!(db.promote().await.unwrap(), Promotion::Promoted);
    // Divergence: both write after the promotion.
    a.sql("INSERT INTO t SELECT 'a-only' FROM generate_series(1, 1000)");
    b.sql("INSERT INTO t VALUES ('b-after')");
    let fence = da.fence_async().await.unwrap();
    assert_eq!(fence.how, StopHow::Immediate);

    let t0 = Instant::now();
    let info = cfg_a.replication_conninfo("127.0.0.1", b.port, "a");
    let report = da.rejoin(&info).await.unwrap();
    eprintln!(
        "TIMING rejoin {:?} (crash recovery {:?}, pg_rewind {:?})",
        t0.elapsed(),
        report.crash_recovery,
        report.rewind
    );
    assert!(
        report.crash_recovery.is_some(),
        "an immediate stop is not a clean shutdown"
    );
    assert!(
        report.rewound,
        "timelines diverged: pg_rewind must have copied"
    );
    assert_eq!(da.role().await.unwrap(), Role::Replica);
    b.sql("INSERT INTO t VALUES ('b-later')");
    assert!(wait_row(
        &a,
        "SELECT string_agg(who, ',' ORDER BY who) FROM t",
        "b-after,b-later,before"
    ));
    let st = da.status().await.unwrap();
    assert_eq!(st.wal.unwrap().timeline, 2);
    assert_eq!(
        b.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'a'"),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_an_empty_node_with_replication_credentials() {
    let primary = PgNode::init(free_port());
    primary.start();
    primary.sql("CREATE ROLE repl REPLICATION LOGIN PASSWORD 'rpw'");
    // What pg_rewind (and the driver's checkpoint before it) needs; see ReplicationConfig.
    primary.sql(
        leasedog::postgres::REWIND_GRANTS_SQL
            .replace("{role}", "repl")
            .as_str(),
    );
    primary.sql("CREATE TABLE t AS SELECT 7 AS v");
    let empty = PgNode::empty(free_port());
    let mut cfg = cfg_for(&empty);
    cfg.replication.user = "repl".into();
    cfg.replication.password = Some("wrong".into());
    let info = cfg.replication_conninfo("127.0.0.1", primary.port, "clone");
    assert!(!info.contains("password"));

    // A wrong replication password: a clear error, and the dir is left empty.
    let e = Pg::new(cfg.clone())
        .unwrap()
        .clone_from(&info)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("password authentication failed for user \"repl\""),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(empty.data_dir()).unwrap().count(), 0);

    cfg.replication.password = Some("rpw".into());
    let d = Pg::new(cfg).unwrap();
    let took = d.clone_from(&info).await.unwrap();
    eprintln!("TIMING pg_basebackup: {took:?}");
    // Refuses to clone over a cluster.
    assert!(matches!(
        d.clone_from(&info).await,
        Err(PgError::WrongDataDir { .. })
    ));
    d.start_as_replica(&info).await.unwrap();
    assert_eq!(d.role().await.unwrap(), Role::Replica);
    primary.sql("INSERT INTO t VALUES (8)");
    assert!(wait_row(&empty, "SELECT sum(v) FROM t", "15"));
    assert_eq!(
        primary.sql("SELECT usename FROM pg_stat_replication WHERE application_name = 'clone'"),
        "repl"
    );

    // A clean replica on the leader's timeline rejoins without a rewind.
    d.stop_clean().await.unwrap();
    let r = d.rejoin(&info).await.unwrap();
    assert_eq!(r.crash_recovery, None);
    assert!(!r.rewound, "{r:?}");
    primary.sql("INSERT INTO t VALUES (9)");
    assert!(wait_row(&empty, "SELECT sum(v) FROM t", "24"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors() {
    let node = PgNode::init(free_port());
    node.start();
    node.sql("CREATE ROLE app LOGIN PASSWORD 'right'");

    // Wrong password (TCP, where pg_hba asks for scram-sha-256).
    let mut c = cfg_for(&node);
    c.host = "127.0.0.1".into();
    c.user = "app".into();
    c.password = Some("wrong".into());
    let e = Pg::new(c).unwrap().status().await.unwrap_err();
    assert!(
        matches!(&e, PgError::Auth { sqlstate, .. } if sqlstate == "28P01"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("authentication failed for user \"app\""),
        "{e}"
    );

    // A directory without PG_VERSION.
    let mut c = cfg_for(&node);
    c.data_dir = Some(node.root().to_path_buf());
    let e = Pg::new(c)
        .unwrap()
        .start_as_standby(None)
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::WrongDataDir { .. }), "{e}");
    assert!(e.to_string().contains("no PG_VERSION"), "{e}");

    // A server that answers at host:port from another data directory.
    let other = PgNode::init(free_port());
    let mut c = cfg_for(&node);
    c.data_dir = Some(other.data_dir());
    let e = Pg::new(c).unwrap().status().await.unwrap_err();
    assert!(matches!(e, PgError::WrongDataDir { .. }), "{e}");
    assert!(e.to_string().contains("runs on data directory"), "{e}");

    // A data directory of another major version.
    let old = PgNode::empty(free_port());
    std::fs::write(old.data_dir().join("PG_VERSION"), "14\n").unwrap();
    let e = driver(&old).start_as_standby(None).await.unwrap_err();
    assert!(e.to_string().contains("holds PostgreSQL 14"), "{e}");

    // bin_dir without pg_ctl.
    let mut c = cfg_for(&node);
    c.bin_dir = "/usr/bin".into();
    let e = Pg::new(c).unwrap_err();
    assert!(matches!(e, PgError::NotInstalled { .. }), "{e}");
    assert!(e.to_string().contains("no executable pg_ctl"), "{e}");

    // A replica cut off from its primary falls behind and is not eligible.
    let replica = PgNode::replica_of(&node, free_port());
    replica.sql("ALTER SYSTEM SET primary_conninfo = ''");
    replica.sql("SELECT pg_reload_conf()");
    assert!(wait_row(
        &replica,
        "SELECT count(*) FROM pg_stat_wal_receiver",
        "0"
    ));
    node.sql("CREATE TABLE big AS SELECT repeat('x', 1000) AS v FROM generate_series(1, 5000)");
    let leader = driver(&node).wal_position().await.unwrap().current.unwrap();
    let e = driver(&replica).eligible(leader).await.unwrap_err();
    match &e {
        PgError::NotEligible(NotEligible::Lagging { lag_bytes, max, .. }) => {
            assert!(lag_bytes > max, "{e}")
        }
        other => panic!("expected Lagging, got {other}"),
    }
    assert!(e.to_string().contains("maximum_lag_on_failover"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initdb_then_start_and_stop_a_first_primary() {
    let node = PgNode::empty(free_port());
    let d = driver(&node);
    assert!(matches!(
        d.start_as_standby(None).await,
        Err(PgError::WrongDataDir { .. })
    ));
    d.initdb(&["-U", "postgres", "--auth=trust", "-N"])
        .await
        .unwrap();
    // Bootstrap is a standby of nobody, then the promotion the core runs
    // after arming: the driver has no way to start it writable.
    d.start_as_standby(None).await.unwrap();
    assert_eq!(d.role().await.unwrap(), Role::Replica);
    assert_eq!(d.promote().await.unwrap(), Promotion::Promoted);
    assert_eq!(d.role().await.unwrap(), Role::Primary);
    assert!(matches!(
        d.initdb(&[]).await,
        Err(PgError::WrongDataDir { .. })
    ));
    d.stop_clean().await.unwrap();
    assert_eq!(d.role().await.unwrap(), Role::Down);
    assert_eq!(d.control_state().await.unwrap(), "shut down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_finds_backends_orphaned_by_a_dead_postmaster() {
    let node = PgNode::init(free_port());
    node.start();
    node.sql("CREATE TABLE t (v int)");
    let c = client(&node).await;
    let backend: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pm = node.postmaster_pid().unwrap();
    // SAFETY: signalling our own test server. The stopped backend cannot
    // notice its postmaster's death, as one busy in a long query would not.
    unsafe {
        assert_eq!(libc::kill(backend, libc::SIGSTOP), 0);
        assert_eq!(libc::kill(pm, libc::SIGKILL), 0);
    }
    assert!(PgNode::wait_until(Duration::from_secs(10), || {
        !process_alive(pm)
    }));
    assert!(process_alive(backend));
    let d = driver(&node);
    assert_eq!(d.live_postmaster(), None);
    let report = std::thread::spawn(move || d.fence())
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(report.how, StopHow::Killed);
    assert_eq!(report.postmaster, None);
    assert!(report.killed.contains(&backend), "{report:?}");
    assert!(!process_alive(backend));
    assert!(cluster_processes(&node.data_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_finds_a_cluster_whose_data_dir_was_removed() {
    let node = PgNode::init(free_port());
    node.start();
    let pm = node.postmaster_pid().unwrap();
    // Removed under a running server (operator error, a lost mount): its
    // processes keep running in "<dir> (deleted)".
    std::fs::remove_dir_all(node.data_dir()).unwrap();
    assert!(process_alive(pm));
    let report = driver(&node).fence().unwrap();
    assert_ne!(report.how, StopHow::AlreadyStopped, "{report:?}");
    assert!(report.killed.contains(&pm), "{report:?}");
    assert!(!process_alive(pm));
}

/// The agent spawns these on a multi-threaded runtime: they must be Send.
#[test]
fn driver_futures_are_send() {
    fn send<T: Send>(_: T) {}
    let pg = Pg::new(PgConfig::with_data_dir("/nonexistent")).unwrap();
    send(pg.status());
    send(pg.health());
    send(pg.promote());
    send(pg.fence_async());
    send(pg.start_as_replica(""));
    send(pg.rejoin(""));
    send(pg.clone_from(""));
    send(pg.initdb(&[]));
    send(pg.start_as_standby(None));
    send(pg.stop_for_switchover(Duration::from_secs(1)));
    send(pg.stop_clean());
    fn sync<T: Send + Sync + Clone + 'static>(_: &T) {}
    sync(&pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rejoin_leaves_a_node_that_starts_read_only() {
    let node = PgNode::init(free_port());
    node.start();
    let d = driver(&node);
    d.fence_async().await.unwrap();
    let nobody =
        PgConfig::with_data_dir("/unused").replication_conninfo("127.0.0.1", free_port(), "x");
    let e = d.rejoin(&nobody).await.unwrap_err();
    assert!(matches!(&e, PgError::Connect { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("rewind source") && text.contains("Connection refused"),
        "{e}"
    );
    assert!(node.data_dir().join("standby.signal").exists());
    assert_eq!(
        d.control_state().await.unwrap(),
        "shut down",
        "crash recovery ran"
    );
    node.start(); // by hand, as an operator might
    assert!(node.is_in_recovery());
}

/// Synchronous mode's driver calls, and that ALTER SYSTEM (which rewrites
/// postgresql.auto.conf) and `write_standby_config` (which rewrites its
/// primary_conninfo line) keep each other's lines, in both orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_standby_names_and_the_standby_config_coexist() {
    use leasedog::postgres::synchronous_standby_names_for;
    let a = PgNode::init(free_port());
    a.start();
    a.sql("CREATE TABLE t (v int)");
    let b = PgNode::replica_of(&a, free_port());
    let (da, db) = (driver(&a), driver(&b));
    // pg_basebackup -R names no application: the walreceiver default.
    assert!(PgNode::wait_until(Duration::from_secs(30), || {
        b.try_sql("SELECT status FROM pg_stat_wal_receiver")
            .as_deref()
            == Ok("streaming")
    }));
    assert_eq!(da.streaming_standbys().await.unwrap(), vec!["walreceiver"]);
    assert_eq!(db.streaming_standbys().await.unwrap(), Vec::<String>::new());

    // On the standby: ALTER SYSTEM first, then the standby config with an
    // odd application name (quotes in it), then a restart.
    let odd = r#"node "b" it's"#;
    let quirky = r#"FIRST 1 ("x\y", "it's")"#; // a literal quote and backslash survive
    assert!(db.set_synchronous_standby_names(quirky).await.unwrap());
    assert!(wait_row(&b, "SHOW synchronous_standby_names", quirky));
    assert!(!db.set_synchronous_standby_names(quirky).await.unwrap());
    let info = cfg_for(&b).replication_conninfo("127.0.0.1", a.port, odd);
    db.write_standby_config(Some(&info)).unwrap();
    b.stop();
    b.start();
    assert!(wait_row(&b, "SHOW synchronous_standby_names", quirky));
    let names = || async {
        let mut got = Vec::new();
        for _ in 0..300 {
            got = da.streaming_standbys().await.unwrap();
            if got == [odd] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        got
    };
    assert_eq!(names().await, vec![odd], "b streams under its new name");

    // Then ALTER SYSTEM again on the standby: primary_conninfo survives it
    // (and a restart).
    assert!(db.set_synchronous_standby_names("").await.unwrap());
    let auto = std::fs::read_to_string(b.data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("primary_conninfo"), "{auto}");
    b.stop();
    b.start();
    assert_eq!(
        names().await,
        vec![odd],
        "b still streams after ALTER SYSTEM"
    );

    // On the primary: name b; a commit now waits for it.
    let want = synchronous_standby_names_for(&da.streaming_standbys().await.unwrap());
    assert_eq!(want, r#"FIRST 1 ("node ""b"" it's")"#);
    assert!(da.set_synchronous_standby_names(&want).await.unwrap());
    assert!(wait_row(
        &a,
        "SELECT sync_state FROM pg_stat_replication",
        "sync"
    ));
    a.sql("INSERT INTO t VALUES (1)");
    assert!(wait_row(&b, "SELECT count(*) FROM t", "1"));

    // b gone: commits would block until the setting is cleared.
    b.stop();
    assert!(da.set_synchronous_standby_names("").await.unwrap());
    assert!(wait_row(&a, "SHOW synchronous_standby_names", ""));
    let (tx, rx) = std::sync::mpsc::channel();
    let port = a.port;
    let sock = a.socket_dir();
    std::thread::spawn(move || {
        let out = std::process::Command::new(format!("{}/psql", leasedog_testbed::pg::BIN_DIR))
            .arg("-h")
            .arg(sock)
            .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-X", "-q", "-c", "INSERT INTO t VALUES (2)"])
            .status();
        let _ = tx.send(out.map(|s| s.success()));
    });
    let r = rx.recv_timeout(Duration::from_secs(20));
    assert!(
        matches!(r, Ok(Ok(true))),
        "a commit with no standby and '' must not wait: {r:?}"
    );
}

/// Rule 8 at start: a data directory that was a primary (no standby.signal),
/// started by the driver, comes up read-only, with or without a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_started_by_the_driver_comes_up_read_only() {
    let node = PgNode::init(free_port());
    node.start();
    node.sql("CREATE TABLE t (v int)");
    node.sql("INSERT INTO t VALUES (1)");
    assert!(!node.is_in_recovery());
    node.stop();
    assert!(!node.data_dir().join("standby.signal").exists());
    let d = driver(&node);
    d.start_as_standby(None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    assert_eq!(node.sql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(d.role().await.unwrap(), Role::Replica);
    assert!(node.try_sql("INSERT INTO t VALUES (2)").is_err());
    let auto = std::fs::read_to_string(node.data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(
        !auto.contains("primary_conninfo"),
        "no leader, no conninfo: {auto}"
    );
    // Stopped again and restarted with a leader: still a standby, now of it.
    d.stop_clean().await.unwrap();
    let leader = PgNode::init(free_port());
    leader.start();
    let info = format!(
        "host={} port={} user=postgres",
        leader.socket_dir().display(),
        leader.port
    );
    d.start_as_replica(&info).await.unwrap();
    assert_eq!(node.sql("SELECT pg_is_in_recovery()"), "t");
    let auto = std::fs::read_to_string(node.data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(&format!("port={}", leader.port)), "{auto}");
}

/// A planned step-down: the fast shutdown writes its checkpoint and sends
/// everything to the connected standby before the postmaster exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_stop_is_fast_and_the_standby_has_everything() {
    let primary = PgNode::init(free_port());
    primary.start();
    primary.sql("CREATE TABLE t (v text)");
    let replica = PgNode::replica_of(&primary, free_port());
    assert!(wait_row(
        &primary,
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
        "1"
    ));
    primary.sql("INSERT INTO t SELECT repeat('x', 200) FROM generate_series(1, 20000)");
    let written: leasedog::postgres::Lsn = primary
        .sql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    let d = driver(&primary);
    let how = d
        .stop_for_switchover(Duration::from_secs(20))
        .await
        .unwrap();
    eprintln!("TIMING switchover stop: {how:?}");
    assert!(
        matches!(how, leasedog::postgres::Switchover::Fast { .. }),
        "{how:?}"
    );
    assert!(cluster_processes(&primary.data_dir()).is_empty());
    assert_eq!(d.control_state().await.unwrap(), "shut down");
    // The shutdown checkpoint is the primary's last record: the standby
    // received up to and past it, at once (no waiting).
    let out = leasedog_testbed::pg::as_postgres(format!(
        "{}/pg_controldata",
        cfg_for(&primary).bin_dir.display()
    ))
    .arg("-D")
    .arg(primary.data_dir())
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ckpt: leasedog::postgres::Lsn = text
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let received: leasedog::postgres::Lsn = replica
        .sql("SELECT pg_last_wal_receive_lsn()")
        .parse()
        .unwrap();
    assert!(ckpt >= written, "{ckpt} vs {written}");
    assert!(
        received > ckpt,
        "standby received {received}, primary's shutdown checkpoint at {ckpt}"
    );
    // Nothing running: the switchover stop confirms with the fence.
    assert!(matches!(
        d.stop_for_switchover(Duration::from_secs(5)).await.unwrap(),
        leasedog::postgres::Switchover::Fenced(r) if r.how == StopHow::AlreadyStopped
    ));
}

/// A test cgroup under the cgroup2 mount, removed at the end.
struct TestCgroup {
    base: std::path::PathBuf,
}

impl TestCgroup {
    /// None (the test is skipped, loudly) without root or cgroup2.
    fn new(name: &str) -> Option<TestCgroup> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: the cgroup fence test needs root");
            return None;
        }
        let mount = leasedog::postgres::cgroup::cgroup2_mount_point()?;
        let base = mount.join(format!("leasedog-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&base).ok()?;
        std::fs::create_dir(base.join("postgres")).unwrap();
        Some(TestCgroup { base })
    }
    fn pg(&self) -> leasedog::postgres::PgCgroup {
        leasedog::postgres::PgCgroup::at(self.base.join("postgres"))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.base.join("postgres/cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir(self.base.join("postgres"));
        let _ = std::fs::remove_dir(&self.base);
    }
}

fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| leasedog::postgres::cgroup::cgroup_path_of(&t))
        .unwrap_or_default()
}

/// The cgroup fence, for real: PostgreSQL started by the driver in a cgroup
/// of its own (every process in it), extra backends, a helper the cluster
/// forked that is not a postgres binary and ignores SIGTERM and SIGQUIT; the
/// fence freezes and kills the group, and nothing survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cgroup_fence_kills_every_process_of_the_cluster_and_its_helpers() {
    let Some(tcg) = TestCgroup::new("fence") else {
        eprintln!("SKIP: no cgroup2 to test in");
        return;
    };
    let node = PgNode::init(free_port());
    // Once as a primary (its control file then records this configuration's
    // max_connections, which a standby must not undercut), then stopped.
    node.start();
    node.stop();
    let cg = tcg.pg();
    let d = driver(&node).with_cgroup(Some(cg.clone()));
    d.start_as_standby(None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let pm = node.postmaster_pid().unwrap();
    let want = format!(
        "/{}",
        tcg.base
            .join("postgres")
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    );
    assert!(cgroup_of(pm).ends_with(&want), "{}", cgroup_of(pm));
    let (c1, c2) = (client(&node).await, client(&node).await);
    for c in [&c1, &c2] {
        c.query_one("SELECT 1", &[]).await.unwrap();
    }
    // A helper forked by a backend, detached, not PostgreSQL's binary, deaf
    // to SIGTERM and SIGQUIT: the /proc scan would not recognise it.
    c1.batch_execute(
        "COPY (SELECT 1) TO PROGRAM 'nohup sh -c ''trap \"\" TERM QUIT HUP; while :; do sleep 1; done'' >/dev/null 2>&1 &'",
    )
    .await
    .unwrap();
    // The helper is the looping shell (`sh -c 'trap ...'`); not the shell
    // that started it nor a `sleep 1` of its loop, which exit on their own
    // and so may be gone before the fence gets to kill them.
    let is_helper = |p: &i32| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.len() > 2 && args[1] == b"-c" && args[2].starts_with(b"trap")
        })
    };
    let mut procs = cg.procs().unwrap();
    for _ in 0..100 {
        if procs.iter().any(is_helper) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        procs = cg.procs().unwrap();
    }
    for p in cluster_processes(&node.data_dir()) {
        assert!(procs.contains(&p), "postgres pid {p} outside the cgroup");
    }
    let helpers: Vec<i32> = procs.iter().copied().filter(is_helper).collect();
    assert!(
        !helpers.is_empty(),
        "the helper runs in the group: {procs:?}"
    );
    assert!(
        procs.len() >= 7,
        "postmaster, auxiliaries, 2 backends, helper: {procs:?}"
    );
    let report = d.fence().unwrap();
    eprintln!("TIMING cgroup fence: {report:?}");
    // The helper outlives the postmaster's SIGQUIT: only the group's kill gets it.
    assert_eq!(report.how, StopHow::Killed);
    for h in &helpers {
        assert!(report.killed.contains(h), "{report:?} {helpers:?}");
    }
    assert!(cg.procs().unwrap().is_empty());
    for p in &procs {
        assert!(!process_alive(*p), "pid {p} survived the cgroup fence");
    }
    assert!(cluster_processes(&node.data_dir()).is_empty());
    // The group is left thawed and empty: the next start works in it.
    d.start_as_standby(None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    assert!(cgroup_of(node.postmaster_pid().unwrap()).ends_with(&want));
    let again = d.fence().unwrap();
    assert!(cg.procs().unwrap().is_empty(), "{again:?}");
}
