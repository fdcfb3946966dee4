//! A real HAProxy (Debian's) in front of a 2-node cluster, routing to the
//! node whose leasedog answers 200 on `/primary` (docs/haproxy.md's
//! configuration): a client that only knows HAProxy's address writes to the
//! primary, follows a failover to the new one, and never writes to the old
//! primary once the new one has taken a write.

use leasedog_testbed::cluster::{self, Node};
use leasedog_testbed::etcd::{BlockingClient, EtcdServer};
use leasedog_testbed::pg::{self, free_port, PgNode};
use leasedog_testbed::wait_until;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");
const HAPROXY: &str = "/usr/sbin/haproxy";

/// The shipped example (docs/haproxy.md) with this test's ports.
fn haproxy_config(front: u16, servers: &[(&str, u16, u16)]) -> String {
    let mut s = format!(
        "global\n  maxconn 200\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  timeout check 1s\n\
         listen postgres_primary\n  bind 127.0.0.1:{front}\n  option httpchk\n  \
         http-check send meth GET uri /primary\n  http-check expect status 200\n  \
         default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions\n"
    );
    for (name, pg_port, health_port) in servers {
        s.push_str(&format!(
            "  server {name} 127.0.0.1:{pg_port} check port {health_port}\n"
        ));
    }
    s
}

/// The process, and the folder holding its configuration (kept alive).
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(config: &str) -> Haproxy {
        assert!(
            Path::new(HAPROXY).is_file(),
            "{HAPROXY} not found: install Debian's haproxy (scripts/setup.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config).unwrap();
        let check = Command::new(HAPROXY)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c refused the configuration:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Haproxy { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inserts `v` through HAProxy; the port of the server that committed it.
fn insert_via(front: u16, v: i64) -> Option<u16> {
    pg::psql(
        front,
        &format!("INSERT INTO t VALUES ({v}) RETURNING inet_server_port()"),
    )
    .ok()?
    .parse()
    .ok()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// A 2-node cluster (a leading, b streaming from it, each with its health
/// listener) behind an HAProxy on `front`; what a test needs kept alive.
struct Pair {
    _etcd: EtcdServer,
    client: BlockingClient,
    scope: &'static str,
    a: Node,
    b: Node,
    /// a's and b's health ports.
    ha: u16,
    hb: u16,
    front: u16,
    _proxy: Haproxy,
}

fn two_nodes_behind_haproxy(scope: &'static str) -> Pair {
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let (ha, hb) = (free_port(), free_port());
    let health = |p: u16| format!("[health]\nlisten = \"127.0.0.1:{p}\"\n");
    let pg_a = PgNode::init(free_port());
    pg_a.start();
    pg_a.sql("CREATE TABLE t (v bigint PRIMARY KEY)");
    let mut a = Node::new(Path::new(BIN), scope, "a", &eps, pg_a, &health(ha));
    a.start_agent();
    assert!(
        cluster::wait_holder(&client, scope, "a", Duration::from_secs(30)),
        "a leads:\n{}",
        a.agent().log()
    );
    let pg_b = PgNode::replica_of(&a.pg, free_port());
    let mut b = Node::new(Path::new(BIN), scope, "b", &eps, pg_b, &health(hb));
    b.start_agent();
    assert!(
        b.agent()
            .wait_log("PostgreSQL runs as a replica of a", Duration::from_secs(60))
            && wait_until(Duration::from_secs(60), || b.streaming()),
        "b streams from a:\n{}",
        b.agent().log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || http_status(ha, "/primary")
            == Some(200)),
        "a's /primary {:?}",
        http_status(ha, "/primary")
    );
    let front = free_port();
    let _proxy = Haproxy::start(&haproxy_config(
        front,
        &[("a", a.pg.port, ha), ("b", b.pg.port, hb)],
    ));
    Pair {
        _etcd: etcd,
        client,
        scope,
        a,
        b,
        ha,
        hb,
        front,
        _proxy,
    }
}

#[test]
fn a_client_through_haproxy_follows_a_failover_and_never_writes_to_the_old_primary() {
    let Pair {
        client,
        scope,
        a,
        b,
        ha,
        hb,
        front,
        _etcd,
        _proxy,
    } = two_nodes_behind_haproxy("haproxy");
    // The endpoints themselves: a primary on a fresh lease, b a replica.
    assert_eq!(http_status(ha, "/primary"), Some(200));
    assert_eq!(http_status(hb, "/primary"), Some(503));
    assert_eq!(http_status(ha, "/replica"), Some(503));
    assert!(
        wait_until(Duration::from_secs(20), || http_status(hb, "/replica")
            == Some(200)),
        "b /replica {:?}",
        http_status(hb, "/replica")
    );
    let mut v = 0;
    let mut next = || {
        v += 1;
        v
    };
    assert!(
        wait_until(Duration::from_secs(20), || insert_via(front, next())
            == Some(a.pg.port)),
        "a write through HAProxy lands on a"
    );

    // Stall a's agent and postmaster: its backends could still commit, but
    // its health endpoint stops answering (the agent is stopped) and HAProxy
    // drops it; the fake watchdog resets it; b takes the key and promotes.
    let pm = a.pg.postmaster_pid().expect("a's postmaster");
    a.agent().stall().unwrap();
    // SAFETY: kill(2) on the postmaster this test started.
    unsafe { libc::kill(pm, libc::SIGSTOP) };
    let stalled = Instant::now();
    let mut landed: Vec<(Duration, u16)> = Vec::new();
    let moved = wait_until(Duration::from_secs(40), || {
        if let Some(port) = insert_via(front, next()) {
            landed.push((stalled.elapsed(), port));
        }
        landed.iter().filter(|(_, p)| *p == b.pg.port).count() >= 5
    });
    // SAFETY: as above (the monitor may already have killed it).
    unsafe { libc::kill(pm, libc::SIGCONT) };
    assert!(
        moved,
        "writes through HAProxy did not move to b: {landed:?}\n{}",
        b.agent().log()
    );
    let first_b = landed.iter().position(|(_, p)| *p == b.pg.port).unwrap();
    assert!(
        landed[first_b..].iter().all(|(_, p)| *p == b.pg.port),
        "a write landed on a after b had taken one: {landed:?}"
    );
    eprintln!(
        "stall at 0: first write through HAProxy on b at {:.2} s; {} writes after the stall, {} on a",
        landed[first_b].0.as_secs_f64(),
        landed.len(),
        first_b
    );
    assert_eq!(cluster::holder(&client, scope).as_deref(), Some("b"));
    assert_eq!(http_status(hb, "/primary"), Some(200));
}

/// A planned switchover (`leasedog switchover --to b`) behind HAProxy: the
/// client follows it to b, and nothing lands on a once b has taken a write.
#[test]
fn a_client_through_haproxy_follows_a_switchover() {
    let Pair {
        a,
        b,
        client: _,
        scope: _,
        ha,
        hb,
        front,
        _etcd,
        _proxy,
    } = two_nodes_behind_haproxy("haproxy-switch");
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("leasedog.toml");
    std::fs::write(&cfg, a.config()).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || insert_via(front, 1)
            == Some(a.pg.port)),
        "a write through HAProxy lands on a"
    );
    // b's member record must show it streaming before the leader accepts.
    assert!(wait_until(Duration::from_secs(20), || {
        let out = Command::new(BIN)
            .args(["list", "--json", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("\"state\": \"replica\"")
    }));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = {
        let stop = stop.clone();
        let start = Instant::now();
        std::thread::spawn(move || {
            let mut landed: Vec<(Duration, u16)> = Vec::new();
            let mut v = 1;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                v += 1;
                if let Some(port) = insert_via(front, v) {
                    landed.push((start.elapsed(), port));
                }
            }
            landed
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(BIN)
        .args(["switchover", "--to", "b", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "switchover: {}{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        a.agent().log(),
        b.agent().log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || http_status(hb, "/primary")
            == Some(200)),
        "b's /primary"
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let landed = writes.join().unwrap();
    let first_b = landed
        .iter()
        .position(|(_, p)| *p == b.pg.port)
        .unwrap_or_else(|| panic!("no write through HAProxy reached b: {landed:?}"));
    assert!(first_b > 0, "writes landed on a before the switchover");
    assert!(
        landed[first_b..].iter().all(|(_, p)| *p == b.pg.port),
        "a write landed on a after b had taken one: {landed:?}"
    );
    assert_eq!(http_status(ha, "/primary"), Some(503));
    eprintln!(
        "switchover through HAProxy: last write on a at {:.2} s, first on b at {:.2} s",
        landed[first_b - 1].0.as_secs_f64(),
        landed[first_b].0.as_secs_f64()
    );
}
