//! The PostgreSQL harness itself: real clusters start, answer SQL, stream.

use leasedog_testbed::pg::{free_port, is_alive, processes_in, PgNode};
use std::time::Duration;

#[test]
fn init_start_sql_and_drop_cleans_up() {
    let node = PgNode::init(free_port());
    node.start();
    assert_eq!(node.sql("SELECT 40 + 2"), "42");
    assert!(!node.is_in_recovery());
    let pid = node.postmaster_pid().expect("postmaster.pid");
    assert!(node.processes().contains(&pid));
    let root = node.root().to_path_buf();
    drop(node);
    assert!(!root.exists(), "drop must remove {}", root.display());
    assert!(!is_alive(pid), "postmaster {pid} survived drop");
}

#[test]
fn replica_streams_from_primary() {
    let primary = PgNode::init(free_port());
    primary.start();
    primary.sql("CREATE TABLE t (v text)");
    let replica = PgNode::replica_of(&primary, free_port());
    assert!(replica.is_in_recovery());
    primary.sql("INSERT INTO t VALUES ('hello')");
    let seen = PgNode::wait_until(Duration::from_secs(30), || {
        replica.try_sql("SELECT v FROM t").as_deref() == Ok("hello")
    });
    assert!(seen, "row did not reach the replica within 30 s");
}

#[test]
fn drop_stops_a_sigstopped_server() {
    let node = PgNode::init(free_port());
    node.start();
    let pid = node.postmaster_pid().unwrap();
    // SAFETY: signalling our own test's postmaster.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let data = node.data_dir();
    drop(node);
    assert!(processes_in(&data).is_empty());
    assert!(!is_alive(pid), "stopped postmaster {pid} survived drop");
}
