//! The etcd harness against a real etcd 3.4.

use leasedog_testbed::etcd::{
    boottime_ns, BlockingClient, EtcdCluster, EtcdServer, EventKind, KeyWatch,
};
use std::time::{Duration, Instant};

fn alive(pid: u32) -> bool {
    // Signal 0 probes existence; a reaped child is gone.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn server_put_get_stop_resume_kill_restart() {
    let mut etcd = EtcdServer::start().unwrap();
    assert!(etcd.client_url().starts_with("http://127.0.0.1:"));
    let c = BlockingClient::connect(&etcd.endpoints()).unwrap();
    assert_eq!(c.get("/t/a").unwrap(), None);
    c.put("/t/a", "1").unwrap();
    assert_eq!(c.get("/t/a").unwrap(), Some(b"1".to_vec()));

    // Frozen: a request times out instead of answering.
    etcd.stop().unwrap();
    let t = Instant::now();
    let err = c.get("/t/a").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    etcd.resume().unwrap();
    assert_eq!(c.get("/t/a").unwrap(), Some(b"1".to_vec()));

    // Killed and restarted: the data survives.
    let pid = etcd.pid().unwrap();
    etcd.kill();
    assert!(!alive(pid));
    assert!(c.get("/t/a").is_err());
    etcd.restart().unwrap();
    let c = BlockingClient::connect(&etcd.endpoints()).unwrap();
    assert_eq!(c.get("/t/a").unwrap(), Some(b"1".to_vec()));
    assert!(c.delete("/t/a").unwrap());
    assert!(!c.delete("/t/a").unwrap());
}

#[test]
fn drop_kills_even_a_stopped_server_and_removes_its_data() {
    let mut etcd = EtcdServer::start().unwrap();
    let pid = etcd.pid().unwrap();
    let dir = etcd.data_root().to_path_buf();
    assert!(dir.exists());
    etcd.stop().unwrap();
    drop(etcd);
    assert!(!alive(pid));
    assert!(!dir.exists());
}

#[test]
fn drop_on_panic_kills_the_server() {
    let pid = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    let p = pid.clone();
    let r = std::thread::spawn(move || {
        let etcd = EtcdServer::start().unwrap();
        *p.lock().unwrap() = etcd.pid().unwrap();
        panic!("test failure while etcd runs");
    })
    .join();
    assert!(r.is_err());
    let pid = *pid.lock().unwrap();
    assert!(pid != 0 && !alive(pid));
}

#[test]
fn watch_sees_put_and_delete_in_order_with_increasing_timestamps() {
    let etcd = EtcdServer::start().unwrap();
    let c = BlockingClient::connect(&etcd.endpoints()).unwrap();
    let w = KeyWatch::start(&etcd.endpoints(), "/t/k").unwrap();
    c.put("/t/other", "x").unwrap();
    let before = boottime_ns();
    c.put("/t/k", "v1").unwrap();
    c.put("/t/k", "v2").unwrap();
    let before_delete = boottime_ns();
    c.delete("/t/k").unwrap();
    let del = w
        .wait_for(|e| e.kind == EventKind::Delete, Duration::from_secs(10))
        .expect("delete seen");
    assert!(del.boottime_ns >= before_delete);
    assert_eq!(w.first_delete_after(before).unwrap(), del);
    assert_eq!(w.first_delete_after(boottime_ns()), None);

    let ev = w.events();
    let kinds: Vec<_> = ev.iter().map(|e| (e.kind, e.value_str())).collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::Put, "v1".to_string()),
            (EventKind::Put, "v2".to_string()),
            (EventKind::Delete, String::new()),
        ]
    );
    for pair in ev.windows(2) {
        assert!(pair[0].mod_revision < pair[1].mod_revision);
        assert!(pair[0].boottime_ns <= pair[1].boottime_ns);
        assert!(pair[0].wall <= pair[1].wall);
    }
    assert!(ev[0].boottime_ns >= before);
    assert!(w
        .wait_for(|e| e.value == b"never", Duration::from_millis(200))
        .is_none());
}

#[test]
fn watch_survives_a_restart_without_losing_events() {
    let mut etcd = EtcdServer::start().unwrap();
    let w = KeyWatch::start(&etcd.endpoints(), "/t/r").unwrap();
    etcd.kill();
    etcd.restart().unwrap();
    let c = BlockingClient::connect(&etcd.endpoints()).unwrap();
    c.put("/t/r", "after").unwrap();
    let e = w
        .wait_for(|e| e.kind == EventKind::Put, Duration::from_secs(15))
        .expect("put after restart seen");
    assert_eq!(e.value_str(), "after");
}

#[test]
fn cluster_leader_kill_and_reelection() {
    let mut cl = EtcdCluster::start(3).unwrap();
    assert_eq!(cl.endpoints().len(), 3);
    let c = BlockingClient::connect(&cl.endpoints()).unwrap();
    c.put("/t/c", "1").unwrap();
    let w = KeyWatch::start(&cl.endpoints(), "/t/c").unwrap();
    let l = cl.leader_index(Duration::from_secs(10)).unwrap();
    let pid = cl.pid(l).unwrap();
    cl.kill(l);
    assert!(!alive(pid));
    let l2 = cl.leader_index(Duration::from_secs(20)).unwrap();
    assert_ne!(l, l2);
    // Each surviving member still serves the data.
    for i in (0..3).filter(|&i| i != l) {
        let ci = BlockingClient::connect(&[cl.client_url(i)]).unwrap();
        assert_eq!(ci.get("/t/c").unwrap(), Some(b"1".to_vec()));
    }
    // The host watch follows through the loss of a member (it may have been
    // connected to the one killed).
    c.put("/t/c", "2").unwrap();
    assert!(w
        .wait_for(|e| e.value == b"2", Duration::from_secs(15))
        .is_some());
    // A frozen follower does not stop the rest from agreeing on the leader.
    let f = (0..3).find(|&i| i != l && i != l2).unwrap();
    cl.stop(f).unwrap();
    assert_eq!(cl.leader_index(Duration::from_secs(10)).unwrap(), l2);
    cl.resume(f).unwrap();
    cl.restart(l).unwrap();
    cl.leader_index(Duration::from_secs(20)).unwrap();
}
