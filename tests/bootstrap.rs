//! Bootstrap of an empty scope (issue 13): real etcd, real PostgreSQL 15
//! (initdb and pg_basebackup run by the agents), fake watchdog devices.
//! Budget as in `tests/failover.rs` (T = 4 s). One test at a time: a 2-core
//! machine running several clusters at once would stall loops.

use leasedog_testbed::cluster::{self, Node};
use leasedog_testbed::etcd::{BlockingClient, EtcdServer};
use leasedog_testbed::pg::{free_port, PgNode};
use leasedog_testbed::wait_until;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The audit events named `event` in `node`'s log.
fn events(node: &Node, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(node.audit_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == event)
        .collect()
}

fn initialize_key(c: &BlockingClient, scope: &str) -> Option<serde_json::Value> {
    let v = c.get(&format!("/leasedog/{scope}/initialize")).ok()??;
    serde_json::from_slice(&v).ok()
}

fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("--- {} ---\n{}", n.name, n.agent().log()))
        .collect()
}

/// Three empty data directories, three agents started together: exactly
/// one `initdb` (one `bootstrap_claimed` record in the three audit logs,
/// by the node the `initialize` key names), one leader (that node), two
/// streaming replicas cloned from it, a row written on the leader read on
/// both. Node c is `nofailover`: it never claims, and once the other two
/// agents are gone it never takes the leader key either.
#[test]
fn three_empty_data_directories_bootstrap_one_cluster_with_one_initdb_and_two_streaming_replicas() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "bootstrap3";
    let opts = "initdb = [\"--encoding=UTF8\", \"--locale=C\"]\nreplication_slots = true\n";
    let bin = Path::new(BIN);
    let mut a = Node::new(bin, scope, "a", &eps, PgNode::empty(free_port()), opts);
    let mut b = Node::new(bin, scope, "b", &eps, PgNode::empty(free_port()), opts);
    let nofailover = format!("{opts}[tags]\nnofailover = true\n");
    let mut c = Node::new(
        bin,
        scope,
        "c",
        &eps,
        PgNode::empty(free_port()),
        &nofailover,
    );
    let t0 = std::time::Instant::now();
    a.start_agent();
    b.start_agent();
    c.start_agent();

    let mut leader = None;
    assert!(
        wait_until(Duration::from_secs(120), || {
            leader = cluster::holder(&client, scope);
            leader.is_some()
        }),
        "nobody leads:\n{}",
        logs(&[&a, &b, &c])
    );
    let leader = leader.unwrap();
    assert_ne!(leader, "c", "c is nofailover");
    let (l, other) = if leader == "a" { (&a, &b) } else { (&b, &a) };
    assert!(
        wait_until(Duration::from_secs(60), || l.writable() == Some(true)),
        "leader {leader} writable:\n{}",
        logs(&[&a, &b, &c])
    );
    let writable_after = t0.elapsed();
    assert!(
        wait_until(Duration::from_secs(180), || other.streaming()
            && c.streaming()),
        "both others stream:\n{}",
        logs(&[&a, &b, &c])
    );
    eprintln!(
        "bootstrap of 3 empty nodes: leader {leader} writable {:.1} s after start, \
         both replicas streaming {:.1} s",
        writable_after.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // Exactly one initdb, by the leader, and the key names it for good.
    let claims: Vec<(String, usize)> = [&a, &b, &c]
        .iter()
        .map(|n| (n.name.clone(), events(n, "bootstrap_claimed").len()))
        .collect();
    let total: usize = claims.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 1, "one initdb in the scope: {claims:?}");
    assert_eq!(events(l, "bootstrap_claimed").len(), 1, "{claims:?}");
    let initdb = events(l, "initdb");
    assert_eq!(initdb.len(), 1, "{initdb:?}");
    assert_eq!(initdb[0]["ok"], true, "{initdb:?}");
    let key = initialize_key(&client, scope).expect("initialize key");
    assert_eq!(key["node"], leader.as_str(), "{key}");
    assert_eq!(key["state"], "initialized", "{key}");
    assert_eq!(
        client
            .get_kv(&format!("/leasedog/{scope}/initialize"))
            .unwrap()
            .unwrap()
            .lease,
        0,
        "a finished bootstrap's key outlives every lease"
    );

    // Two replicas stream from it (a walsender may still say `catchup` for
    // a moment after its standby says `streaming`), and they are copies of it.
    let streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";
    assert!(
        wait_until(Duration::from_secs(30), || l
            .pg
            .try_sql(streaming)
            .is_ok_and(|n| n == "2")),
        "{:?}",
        l.pg.try_sql("SELECT application_name, state FROM pg_stat_replication")
    );
    let sysid = "SELECT system_identifier FROM pg_control_system()";
    assert_eq!(other.pg.sql(sysid), l.pg.sql(sysid));
    assert_eq!(c.pg.sql(sysid), l.pg.sql(sysid));
    l.pg.sql("CREATE TABLE boot (v int); INSERT INTO boot VALUES (42)");
    for r in [other, &c] {
        assert!(
            wait_until(Duration::from_secs(30), || r
                .pg
                .try_sql("SELECT v FROM boot")
                .is_ok_and(|v| v == "42")),
            "{} replays the leader's row",
            r.name
        );
    }

    // Slots: one per other member on the leader, each in use by its standby.
    let slots = "SELECT coalesce(string_agg(slot_name || ':' || active::text, ',' \
                 ORDER BY slot_name), '') FROM pg_replication_slots";
    let want = format!("leasedog_{}:true,leasedog_c:true", other.name);
    assert!(
        wait_until(Duration::from_secs(60), || l
            .pg
            .try_sql(slots)
            .is_ok_and(|v| v == want)),
        "slots on the leader: {:?}, want {want}",
        l.pg.try_sql(slots)
    );
    assert_eq!(
        other.pg.sql("SELECT slot_name FROM pg_stat_wal_receiver"),
        format!("leasedog_{}", other.name)
    );
    assert_eq!(c.pg.sql("SHOW primary_slot_name"), "leasedog_c");
    // `other` leaves (its agent stops its server, its record goes with its
    // lease): its slot is dropped, c's stays.
    other.agent().signal(libc::SIGTERM).unwrap();
    let record = format!("/leasedog/{scope}/members/{}", other.name);
    assert!(
        wait_until(Duration::from_secs(30), || client
            .get(&record)
            .is_ok_and(|v| v.is_none())),
        "{}'s member record is gone",
        other.name
    );
    // A follower stops its standby cleanly before it exits.
    assert!(
        wait_until(Duration::from_secs(30), || other
            .pg
            .postmaster_pid()
            .is_none()),
        "{}'s agent left its server running:\n{}",
        other.name,
        other.agent().log()
    );
    assert!(
        wait_until(Duration::from_secs(60), || l
            .pg
            .try_sql(slots)
            .is_ok_and(|v| v == "leasedog_c:true")),
        "the departed member's slot is dropped: {:?}",
        l.pg.try_sql(slots)
    );

    // nofailover: with the leader's agent stopped too, c never takes the key.
    l.agent().signal(libc::SIGTERM).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || cluster::holder(&client, scope)
            .is_none()),
        "the leader released the key:\n{}",
        logs(&[&a, &b, &c])
    );
    // Three TTLs with the key free: an eligible node would race at once.
    let held = wait_until(Duration::from_secs(12), || {
        cluster::holder(&client, scope).is_some()
    });
    assert!(
        !held,
        "nobody but c runs, and c is nofailover: {:?}\n{}",
        cluster::holder(&client, scope),
        c.agent().log()
    );
    assert!(events(&c, "acquired").is_empty());
    assert!(events(&c, "bootstrap_claimed").is_empty());
}

/// A failed `initdb` (an invalid locale) gives the claim back with the
/// error on the record, and another node bootstraps the scope; the failed
/// node, still empty, clones the new leader instead of trying again.
#[test]
fn a_failed_initdb_gives_the_claim_back_and_another_node_bootstraps() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "bootstrapfail";
    let bin = Path::new(BIN);
    let bad = "initdb = [\"--locale=xx_NO.bogus\"]\n";
    let mut a = Node::new(bin, scope, "a", &eps, PgNode::empty(free_port()), bad);
    a.start_agent();
    assert!(
        wait_until(Duration::from_secs(60), || !events(&a, "initdb").is_empty()),
        "a tried initdb:\n{}",
        a.agent().log()
    );
    let failed = &events(&a, "initdb")[0];
    assert_eq!(failed["ok"], false, "{failed}");
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("initdb") && detail.contains("locale"),
        "{detail}"
    );
    // The claim is given back: the key is absent again (a claims again
    // only after a TTL's back-off).
    assert!(
        wait_until(Duration::from_secs(10), || initialize_key(&client, scope)
            .is_none()),
        "claim deleted: {:?}",
        initialize_key(&client, scope)
    );

    let mut b = Node::new(bin, scope, "b", &eps, PgNode::empty(free_port()), "");
    b.start_agent();
    assert!(
        cluster::wait_holder(&client, scope, "b", Duration::from_secs(120)),
        "b bootstraps and leads:\n{}",
        logs(&[&a, &b])
    );
    assert!(
        wait_until(Duration::from_secs(120), || a.streaming()),
        "a clones b:\n{}",
        logs(&[&a, &b])
    );
    let key = initialize_key(&client, scope).expect("initialize key");
    assert_eq!(key["node"], "b", "{key}");
    assert_eq!(key["state"], "initialized", "{key}");
    assert!(events(&a, "initdb").iter().all(|e| e["ok"] == false));
}

/// `[postgres.parameters]` and `pg_hba` are written to the files the agent
/// owns before it starts PostgreSQL, and are in force (`SHOW`, including a
/// restart-only parameter); a misspelt parameter stops the agent at
/// start-up with an error naming it, before anything is written.
#[test]
fn parameters_and_pg_hba_are_written_and_applied_and_a_bad_parameter_is_refused() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "params";
    let bin = Path::new(BIN);
    let extra = "pg_hba = [\"local all all trust\", \"host all all 127.0.0.1/32 trust\", \
                 \"host replication all 127.0.0.1/32 trust\"]\n\
                 [postgres.parameters]\nwork_mem = \"7MB\"\nmax_connections = 120\n\
                 log_min_duration_statement = 250\n";
    let mut a = Node::new(bin, scope, "a", &eps, PgNode::init(free_port()), extra);
    a.start_agent();
    assert!(
        cluster::wait_holder(&client, scope, "a", Duration::from_secs(60))
            && wait_until(Duration::from_secs(60), || a.writable() == Some(true)),
        "a leads:\n{}",
        a.agent().log()
    );
    assert_eq!(a.pg.sql("SHOW work_mem"), "7MB");
    assert_eq!(
        a.pg.sql("SHOW max_connections"),
        "120",
        "a restart-only parameter"
    );
    assert_eq!(a.pg.sql("SHOW log_min_duration_statement"), "250ms");
    let dir = a.pg.data_dir();
    let conf = std::fs::read_to_string(dir.join("postgresql.conf")).unwrap();
    assert_eq!(
        conf.matches("include_if_exists = 'leasedog.conf'").count(),
        1,
        "included once"
    );
    let hba = std::fs::read_to_string(dir.join("pg_hba.conf")).unwrap();
    assert!(hba.starts_with("# Written by leasedog"), "{hba}");
    assert!(
        hba.contains("host replication all 127.0.0.1/32 trust\n"),
        "{hba}"
    );
    assert_eq!(
        a.pg.sql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NULL"),
        "3"
    );

    let bad = Node::new(
        bin,
        scope,
        "bad",
        &eps,
        PgNode::empty(free_port()),
        "[postgres.parameters]\nshared_bufers = \"1MB\"\n",
    );
    let mut p = leasedog_testbed::agent::AgentProcess::spawn(bin, "bad", &bad.config(), &[])
        .expect("agent");
    let st = p
        .wait_exit(Duration::from_secs(30))
        .expect("the agent exits");
    assert!(!st.success());
    let log = p.log();
    assert!(
        log.contains("shared_bufers: unknown to this PostgreSQL"),
        "the error names the parameter:\n{log}"
    );
    assert_eq!(cluster::holder(&client, scope).as_deref(), Some("a"));
}

fn edit_config(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("edit-config")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("leasedog edit-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `edit-config` writes the scope's cluster-wide settings after validating
/// them (`--set`, `--file`, `--show` round trip); a running agent applies
/// a parameter with a reload (`SHOW`); bad input is refused with the cause
/// and nothing written; a malformed value put in etcd by hand is reported
/// by the agent and by `edit-config`, and the last good settings stay.
#[test]
fn edit_config_round_trips_is_validated_and_applied_and_malformed_config_keeps_the_last_good() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "editcfg";
    // Started once as a primary: the template's control file records
    // max_connections = 100, its postgresql.conf says 30, and a standby
    // refuses fewer than its primary had.
    let pg = PgNode::init(free_port());
    pg.start();
    let mut a = Node::new(Path::new(BIN), scope, "a", &eps, pg, "");
    a.start_agent();
    assert!(
        cluster::wait_holder(&client, scope, "a", Duration::from_secs(60))
            && wait_until(Duration::from_secs(60), || a.writable() == Some(true)),
        "a leads:\n{}\n{}",
        a.agent().log(),
        std::fs::read_to_string(a.pg.data_dir().join("leasedog-postmaster.log"))
            .unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("leasedog.toml");
    std::fs::write(&cfg, a.config()).unwrap();

    let (ok, out, err) = edit_config(
        &cfg,
        &[
            "--set",
            "postgres.parameters.work_mem=9MB",
            "--set",
            "timing.loop_interval=0.3",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parameters"]["work_mem"], "9MB");
    assert_eq!(v["loop_interval"], 0.3);
    let (ok, shown, _) = edit_config(&cfg, &["--show"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&shown).unwrap(),
        v
    );
    assert!(
        wait_until(Duration::from_secs(30), || a.pg.sql("SHOW work_mem")
            == "9MB"),
        "the agent applies it:\n{}",
        a.agent().log()
    );

    for (set, why) in [
        (
            "postgres.parameters.shared_bufers=1MB",
            "shared_bufers: unknown to this PostgreSQL",
        ),
        (
            "postgres.parameters.work_mem=lots",
            "not a valid integer value",
        ),
        ("timing.loop_interval=30", "timing.loop_interval"),
        ("timing.ttl=3", "not a cluster-wide setting"),
        ("postgres.parameters.port=5", "set from postgres.port"),
    ] {
        let (ok, _, err) = edit_config(&cfg, &["--set", set]);
        assert!(!ok, "{set} refused");
        assert!(err.contains(why), "{set}: {err}");
    }
    let (_, after, _) = edit_config(&cfg, &["--show"]);
    assert_eq!(after, shown, "nothing written by a refused edit");

    let file = dir.path().join("cluster.json");
    std::fs::write(&file, r#"{"parameters": {"work_mem": "10MB"}}"#).unwrap();
    let (ok, _, err) = edit_config(&cfg, &["--file", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(wait_until(Duration::from_secs(30), || a
        .pg
        .sql("SHOW work_mem")
        == "10MB"));

    // By hand, bypassing the validation: the agent says so and keeps 10MB.
    client
        .put(
            &format!("/leasedog/{scope}/config"),
            "{\"loop_interval\": \"fast\"",
        )
        .unwrap();
    assert!(
        a.agent().wait_log(
            "cluster config in etcd is malformed",
            Duration::from_secs(30)
        ),
        "{}",
        a.agent().log()
    );
    assert_eq!(a.pg.sql("SHOW work_mem"), "10MB");
    let (ok, _, err) = edit_config(&cfg, &["--show"]);
    assert!(!ok && err.contains("malformed"), "{err}");
    let (ok, _, err) = edit_config(&cfg, &["--set", "postgres.parameters.work_mem=1MB"]);
    assert!(!ok && err.contains("--file"), "{err}");
    let (ok, _, err) = edit_config(&cfg, &["--file", file.to_str().unwrap()]);
    assert!(ok, "--file repairs it: {err}");
    assert_eq!(cluster::holder(&client, scope).as_deref(), Some("a"));
}

/// The `BACKUP FROM:` line of the backup a node was cloned from
/// (PostgreSQL renames `backup_label` to `backup_label.old` once it has
/// started from it): `standby` or `primary`.
fn backup_from(n: &Node) -> Option<String> {
    let label = std::fs::read_to_string(n.pg.data_dir().join("backup_label.old")).ok()?;
    label
        .lines()
        .find_map(|l| l.strip_prefix("BACKUP FROM: "))
        .map(str::to_owned)
}

fn member_record(c: &BlockingClient, scope: &str, node: &str) -> Option<serde_json::Value> {
    let v = c.get(&format!("/leasedog/{scope}/members/{node}")).ok()??;
    serde_json::from_slice(&v).ok()
}

/// Tag `clonefrom`: a new member with an empty data directory clones from
/// the healthy replica tagged `clonefrom`, not the leader (its backup label
/// says `BACKUP FROM: standby`), then streams from the leader. Once that
/// replica is gone (crashed, its record possibly still up), the next new
/// member clones from the leader (`BACKUP FROM: primary`).
#[test]
fn a_new_member_clones_from_the_clonefrom_replica_and_from_the_leader_once_it_is_gone() {
    let _g = serial();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let scope = "clonefrom";
    let bin = Path::new(BIN);
    let pg_a = PgNode::init(free_port());
    pg_a.start();
    pg_a.sql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)");
    let mut a = Node::new(bin, scope, "a", &eps, pg_a, "");
    a.start_agent();
    assert!(
        cluster::wait_holder(&client, scope, "a", Duration::from_secs(30)),
        "a leads:\n{}",
        a.agent().log()
    );
    let pg_c = PgNode::replica_of(&a.pg, free_port());
    let mut c = Node::new(bin, scope, "c", &eps, pg_c, "[tags]\nclonefrom = true\n");
    c.start_agent();
    assert!(
        wait_until(Duration::from_secs(60), || c.streaming()
            && member_record(&client, scope, "c").is_some_and(|m| m
                ["postgres"]
                == "replica"
                && m["tags"]["clonefrom"] == true
                && m["lsn"].is_u64())),
        "c streams and publishes its tag:\n{}",
        logs(&[&a, &c])
    );

    let mut d = Node::new(bin, scope, "d", &eps, PgNode::empty(free_port()), "");
    d.start_agent();
    assert!(
        wait_until(Duration::from_secs(120), || d.streaming()),
        "d streams:\n{}",
        logs(&[&a, &c, &d])
    );
    assert_eq!(
        backup_from(&d).as_deref(),
        Some("standby"),
        "d was cloned from c:\n{}",
        d.agent().log()
    );
    assert!(
        d.agent().log().contains("cloned from c"),
        "{}",
        d.agent().log()
    );
    assert_eq!(
        a.pg.try_sql("SELECT state FROM pg_stat_replication WHERE application_name = 'd'")
            .as_deref(),
        Ok("streaming"),
        "d streams from the leader, not from c"
    );
    a.pg.sql("INSERT INTO t VALUES (2)");
    assert!(
        wait_until(Duration::from_secs(30), || d
            .pg
            .try_sql("SELECT count(*) FROM t")
            .as_deref()
            == Ok("2")),
        "d replays the leader's writes"
    );

    // `leasedog reinit d` re-clones from c too.
    let marker = d.pg.data_dir().join("leasedog-test-marker");
    std::fs::write(&marker, "old data directory").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("leasedog.toml");
    std::fs::write(&cfg, a.config()).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["reinit", "d", "--timeout", "120", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{said}
{}",
        d.agent().log()
    );
    assert!(said.contains("re-cloned from c"), "{said}");
    assert!(!marker.exists(), "the data directory was wiped");
    assert!(
        wait_until(Duration::from_secs(60), || d.streaming()),
        "d streams again:\n{}",
        d.agent().log()
    );
    assert_eq!(backup_from(&d).as_deref(), Some("standby"));

    // c crashes (agent and server): its record may outlive it for a TTL.
    let _ = c.agent().signal(libc::SIGKILL);
    for p in leasedog_testbed::pg::processes_in(&c.pg.data_dir()) {
        // SAFETY: signalling processes of a cluster this test started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let mut e = Node::new(bin, scope, "e", &eps, PgNode::empty(free_port()), "");
    e.start_agent();
    assert!(
        wait_until(Duration::from_secs(120), || e.streaming()),
        "e streams:\n{}",
        logs(&[&a, &d, &e])
    );
    assert_eq!(
        backup_from(&e).as_deref(),
        Some("primary"),
        "e was cloned from the leader:\n{}",
        e.agent().log()
    );
    // Which way e got there: c's record expired first, or e tried c.
    eprintln!(
        "e: {} clone(s) from the crashed c failed before the leader's",
        e.agent().log().matches("clone from c:").count()
    );
}
