//! The etcd driver against a real etcd 3.4 (started by the testbed).

use leasedog::config::EtcdConfig;
use leasedog::dcs::{Acquire, Dcs, DcsError, Holder, LeaderEvent, LeaseId, Renewal};
use leasedog_testbed::etcd::{BlockingClient, EtcdCluster, EtcdServer, EventKind, KeyWatch};
use std::time::{Duration, Instant};

const SCOPE: &str = "t";

fn cfg(endpoints: Vec<String>, request_timeout: f64) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        prefix: "/leasedog".into(),
        request_timeout,
        connect_timeout: 2.0,
        ..EtcdConfig::default()
    }
}

/// The testbed's helpers block on their own runtime: run them outside ours.
fn sync<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn next_event(w: &mut leasedog::dcs::LeaderWatch, within: Duration) -> LeaderEvent {
    tokio::time::timeout(within, w.next())
        .await
        .expect("a leader event in time")
        .expect("watch healthy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_race_release_and_watch() {
    let etcd = sync(EtcdServer::start).unwrap();
    let c = cfg(etcd.endpoints(), 2.0);
    let mut a = Dcs::connect(&c, SCOPE, "a").await.unwrap();
    let mut b = Dcs::connect(&c, SCOPE, "b").await.unwrap();
    let (h, rev0) = a.leader().await.unwrap();
    assert_eq!(h, Holder::Nobody);
    let mut watch = b.watch_leader(rev0).await.unwrap();

    let la = a.grant(10).await.unwrap();
    let lb = b.grant(10).await.unwrap();
    assert_ne!(la, lb);
    let (ra, rb) = tokio::join!(a.try_acquire(la), b.try_acquire(lb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    // Exactly one wins; the other sees the winner by name and lease.
    let (mut winner, wl, mut loser, ll, wname, lost) = match (&ra, &rb) {
        (Acquire::Won { .. }, Acquire::Held { .. }) => (a, la, b, lb, "a", rb),
        (Acquire::Held { .. }, Acquire::Won { .. }) => (b, lb, a, la, "b", ra),
        _ => panic!("exactly one must win: {ra:?} {rb:?}"),
    };
    match lost {
        Acquire::Held { holder, .. } => assert_eq!(
            holder,
            Holder::Node {
                name: wname.into(),
                lease: wl
            }
        ),
        _ => unreachable!(),
    }
    assert_eq!(winner.leader().await.unwrap().0, Holder::Us { lease: wl });

    // The value is our JSON, attached to our lease.
    let key = winner.leader_key().to_string();
    let eps = etcd.endpoints();
    let kv = sync(|| BlockingClient::connect(&eps).unwrap().get_kv(&key).unwrap()).unwrap();
    assert_eq!(kv.lease, wl.0);
    let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(v["node"], wname);
    assert_eq!(v["lease"], format!("{wl}"));
    assert!(v["agent"].as_str().unwrap().starts_with("leasedog/"));

    // Acquiring again while held never overwrites.
    assert!(matches!(
        winner.try_acquire(wl).await.unwrap(),
        Acquire::Held { holder: Holder::Us { lease }, .. } if lease == wl
    ));

    // b's watch saw the winning put.
    match next_event(&mut watch, Duration::from_secs(5)).await {
        LeaderEvent::Put { holder, .. } => {
            assert!(matches!(holder, Holder::Us { .. } | Holder::Node { .. }))
        }
        e => panic!("expected the put, got {e:?}"),
    }

    // The loser's release touches nothing (and revokes only its own lease).
    assert!(!loser.release(ll).await.unwrap().deleted);
    assert_eq!(
        loser.leader().await.unwrap().0,
        Holder::Node {
            name: wname.into(),
            lease: wl
        }
    );
    assert!(matches!(loser.renew(ll).await, Renewal::Gone));

    // The winner's release deletes the key and revokes its lease.
    // Its revision is the deletion's (the audit's `released` record keeps it).
    let r = winner.release(wl).await.unwrap();
    assert!(r.deleted);
    assert_eq!(winner.leader().await.unwrap().0, Holder::Nobody);
    assert!(matches!(winner.renew(wl).await, Renewal::Gone));
    match next_event(&mut watch, Duration::from_secs(5)).await {
        LeaderEvent::Deleted { revision, lease } => {
            assert_eq!(
                revision, r.revision,
                "the release's revision is the deletion's"
            );
            assert_eq!(lease, Some(wl));
        }
        e => panic!("expected the deletion, got {e:?}"),
    }
    // Releasing twice is a no-op.
    let again = winner.release(wl).await.unwrap();
    assert!(!again.deleted);
    assert!(again.revision >= r.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_leader_key_is_an_unknown_holder() {
    let etcd = sync(EtcdServer::start).unwrap();
    let mut d = Dcs::connect(&cfg(etcd.endpoints(), 2.0), SCOPE, "a")
        .await
        .unwrap();
    let key = d.leader_key().to_string();
    let eps = etcd.endpoints();
    let raw: &[u8] = b"\xff\x00not json{";
    sync(|| {
        BlockingClient::connect(&eps)
            .unwrap()
            .put(&key, raw)
            .unwrap()
    });
    let (h, _) = d.leader().await.unwrap();
    assert_eq!(
        h,
        Holder::Unknown {
            bytes: raw.len(),
            lease: LeaseId(0)
        }
    );
    let l = d.grant(5).await.unwrap();
    match d.try_acquire(l).await.unwrap() {
        Acquire::Held { holder, .. } => assert!(matches!(holder, Holder::Unknown { .. })),
        a => panic!("garbage must not count as free: {a:?}"),
    }
    // Valid JSON naming no node is garbage too.
    sync(|| {
        BlockingClient::connect(&eps)
            .unwrap()
            .put(&key, r#"{"lease":"1"}"#)
            .unwrap()
    });
    assert!(matches!(
        d.leader().await.unwrap().0,
        Holder::Unknown { .. }
    ));
    // And release never deletes what is not ours.
    assert!(!d.release(l).await.unwrap().deleted);
    assert!(matches!(
        d.leader().await.unwrap().0,
        Holder::Unknown { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_acked_then_gone_after_revoke_and_after_expiry() {
    let etcd = sync(EtcdServer::start).unwrap();
    let c = cfg(etcd.endpoints(), 2.0);
    let mut d = Dcs::connect(&c, SCOPE, "a").await.unwrap();

    let l = d.grant(10).await.unwrap();
    for _ in 0..3 {
        match d.renew(l).await {
            Renewal::Acked { ttl } => assert!(ttl > 0 && ttl <= 10, "ttl {ttl}"),
            r => panic!("expected Acked, got {r:?}"),
        }
    }
    let left = d.time_to_live(l).await.unwrap().expect("lease alive");
    assert!(left > 0 && left <= 10, "{left}");
    d.revoke(l).await.unwrap();
    assert!(matches!(d.renew(l).await, Renewal::Gone));
    assert_eq!(d.time_to_live(l).await.unwrap(), None);
    // Revoking a lease that is gone is fine.
    d.revoke(l).await.unwrap();

    // Natural expiry: acquire under a 2 s lease, let it lapse.
    let mut other = Dcs::connect(&c, SCOPE, "b").await.unwrap();
    let short = d.grant(2).await.unwrap();
    assert!(matches!(d.renew(short).await, Renewal::Acked { .. }));
    assert!(matches!(
        d.try_acquire(short).await.unwrap(),
        Acquire::Won { .. }
    ));
    d.put_member(short, "a-member").await.unwrap();
    let (h, rev) = other.leader().await.unwrap();
    assert!(matches!(h, Holder::Node { ref name, .. } if name == "a"));
    let mut watch = other.watch_leader(rev).await.unwrap();
    let key = d.member_key();
    let eps = etcd.endpoints();
    assert_eq!(
        sync(|| BlockingClient::connect(&eps).unwrap().get(&key).unwrap()),
        Some(b"a-member".to_vec())
    );
    let t = Instant::now();
    assert!(matches!(
        next_event(&mut watch, Duration::from_secs(10)).await,
        LeaderEvent::Deleted { .. }
    ));
    // Expiry lands T + 0..0.5 s after the last renewal (plus a noisy machine).
    assert!(
        t.elapsed() > Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(d.renew(short).await, Renewal::Gone));
    assert_eq!(other.leader().await.unwrap().0, Holder::Nobody);
    assert_eq!(
        sync(|| BlockingClient::connect(&eps).unwrap().get(&key).unwrap()),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_etcd_renew_times_out_then_recovers() {
    let mut etcd = sync(EtcdServer::start).unwrap();
    let rt = 0.5;
    let mut d = Dcs::connect(&cfg(etcd.endpoints(), rt), SCOPE, "a")
        .await
        .unwrap();
    let l = d.grant(30).await.unwrap();
    assert!(matches!(d.renew(l).await, Renewal::Acked { .. }));

    etcd.stop().unwrap();
    // Both on the open stream and on a reopened one.
    for _ in 0..2 {
        let t = Instant::now();
        let r = d.renew(l).await;
        let took = t.elapsed();
        match r {
            Renewal::Failed(e) => {
                assert!(e.is_timeout(), "{e}");
                let msg = e.to_string();
                assert!(msg.contains("keepalive timed out after 500ms"), "{msg}");
                assert!(msg.contains(&etcd.client_url()), "{msg}");
            }
            r => panic!("frozen etcd cannot ack: {r:?}"),
        }
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(took < Duration::from_secs_f64(rt + 2.0), "{took:?}");
    }
    // Every other request is bounded too.
    let t = Instant::now();
    assert!(d.leader().await.unwrap_err().is_timeout());
    assert!(t.elapsed() < Duration::from_secs_f64(rt + 2.0));

    // So is connecting to it.
    let mut c = cfg(etcd.endpoints(), rt);
    c.connect_timeout = 1.0;
    let t = Instant::now();
    match Dcs::connect(&c, SCOPE, "b").await {
        Err(e) => assert!(e.is_timeout(), "{e}"),
        Ok(_) => panic!("a frozen etcd cannot answer the connect probe"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    etcd.resume().unwrap();
    let mut acked = false;
    for _ in 0..10 {
        if let Renewal::Acked { ttl } = d.renew(l).await {
            assert!(ttl > 0);
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(acked, "renewals must resume after SIGCONT");
    // And the reopened stream keeps working.
    assert!(matches!(d.renew(l).await, Renewal::Acked { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_at_connect_is_a_clear_bounded_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut c = cfg(vec![url.clone()], 0.5);
    c.connect_timeout = 1.0;
    let t = Instant::now();
    let err = match Dcs::connect(&c, SCOPE, "a").await {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let msg = err.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(
        matches!(err, DcsError::Unreachable { .. } | DcsError::Timeout { .. }),
        "{msg}"
    );
    eprintln!("connect error: {msg}");

    c.endpoints = vec![];
    assert!(matches!(
        Dcs::connect(&c, SCOPE, "a").await,
        Err(DcsError::Config(_))
    ));
}

/// FENCING.md: "a change of etcd leader only extends leases". Kill the raft
/// leader of a 3-member cluster: the leader key survives under the same
/// lease, the lease's remaining TTL is not shortened, and renewals resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_change_only_extends_the_lease() {
    let mut cl = sync(|| EtcdCluster::start(3)).unwrap();
    let eps = cl.endpoints();
    let mut d = Dcs::connect(&cfg(eps.clone(), 1.0), SCOPE, "a")
        .await
        .unwrap();
    const T: i64 = 8;
    let l = d.grant(T).await.unwrap();
    assert!(matches!(
        d.try_acquire(l).await.unwrap(),
        Acquire::Won { .. }
    ));
    let s = Instant::now();
    assert!(matches!(d.renew(l).await, Renewal::Acked { .. }));

    let leader = sync(|| cl.leader_index(Duration::from_secs(10))).unwrap();
    sync(|| cl.kill(leader));
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| cl.client_url(i))
        .collect();
    let new_leader = sync(|| cl.leader_index(Duration::from_secs(20))).unwrap();
    assert_ne!(new_leader, leader);

    // Without renewing: the remaining TTL is at least what was left at s.
    let left = sync(|| {
        BlockingClient::connect(&survivors)
            .unwrap()
            .lease_ttl(l.0)
            .unwrap()
    });
    let elapsed = s.elapsed().as_secs_f64();
    assert!(
        elapsed < T as f64 - 1.0,
        "election took too long: {elapsed}"
    );
    assert!(
        left as f64 >= T as f64 - elapsed - 1.0,
        "lease shortened by the leader change: {left}s left, {elapsed:.1}s after the last renewal"
    );
    eprintln!("etcd leader m{leader} killed; m{new_leader} leads; lease has {left}s left {elapsed:.1}s after its last renewal (T = {T}s)");
    // A request may still land on the dead endpoint once (fast failure).
    let mut holder = None;
    for _ in 0..20 {
        match d.leader().await {
            Ok((h, _)) => {
                holder = Some(h);
                break;
            }
            Err(e) => {
                eprintln!("get leader during recovery failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(holder, Some(Holder::Us { lease: l }));

    // Renewals resume within a few seconds, with the dead endpoint still listed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match d.renew(l).await {
            Renewal::Acked { ttl } => {
                assert!(ttl > 0);
                break;
            }
            Renewal::Gone => panic!("the lease must survive an etcd leader change"),
            Renewal::Failed(e) => {
                eprintln!("renewal during recovery failed: {e}");
                assert!(Instant::now() < deadline, "no renewal acked: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let kv = sync(|| {
        BlockingClient::connect(&survivors)
            .unwrap()
            .get_kv(d.leader_key())
            .unwrap()
    })
    .expect("leader key survives");
    assert_eq!(kv.lease, l.0);
    drop(cl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_watch_sees_delete_promptly_on_revoke() {
    let etcd = sync(EtcdServer::start).unwrap();
    let c = cfg(etcd.endpoints(), 2.0);
    let mut primary = Dcs::connect(&c, SCOPE, "a").await.unwrap();
    let mut follower = Dcs::connect(&c, SCOPE, "b").await.unwrap();
    let l = primary.grant(30).await.unwrap();
    assert!(matches!(
        primary.try_acquire(l).await.unwrap(),
        Acquire::Won { .. }
    ));
    let (h, rev) = follower.leader().await.unwrap();
    assert_eq!(
        h,
        Holder::Node {
            name: "a".into(),
            lease: l
        }
    );
    let mut watch = follower.watch_leader(rev).await.unwrap();
    let eps = etcd.endpoints();
    let key = primary.leader_key().to_string();
    let host = sync(|| KeyWatch::start(&eps, &key)).unwrap();

    let t = Instant::now();
    primary.revoke(l).await.unwrap();
    let ev = next_event(&mut watch, Duration::from_secs(5)).await;
    assert!(
        matches!(ev, LeaderEvent::Deleted { revision, lease } if revision > rev && lease == Some(l)),
        "{ev:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The host-side watch agrees.
    assert!(
        sync(|| host.wait_for(|e| e.kind == EventKind::Delete, Duration::from_secs(5))).is_some()
    );

    // A watch started from an old revision replays what it missed.
    let mut replay = follower.watch_leader(rev).await.unwrap();
    assert!(matches!(
        next_event(&mut replay, Duration::from_secs(5)).await,
        LeaderEvent::Deleted { .. }
    ));
}

/// A frozen member (SIGSTOP: its sockets accept, nothing answers) must not
/// keep renewals from being acked by the other two for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_cluster_member_costs_at_most_a_failover() {
    let mut cl = sync(|| EtcdCluster::start(3)).unwrap();
    let rt = 0.5;
    let mut d = Dcs::connect(&cfg(cl.endpoints(), rt), SCOPE, "a")
        .await
        .unwrap();
    let l = d.grant(30).await.unwrap();
    assert!(matches!(d.renew(l).await, Renewal::Acked { .. }));
    // Freeze every member in turn but one at a time; the listed-first member
    // is the one a fresh client is most likely using.
    for frozen in 0..3 {
        let was_leader = sync(|| cl.leader_index(Duration::from_secs(20))).unwrap() == frozen;
        sync(|| cl.stop(frozen)).unwrap();
        let t = Instant::now();
        let mut first_ack = None;
        let mut failures_after = 0;
        // Until the first ack (bounded), then 2 s of steady renewals.
        while t.elapsed() < first_ack.unwrap_or(Duration::from_secs(8)) + Duration::from_secs(2) {
            match d.renew(l).await {
                Renewal::Acked { .. } => {
                    first_ack.get_or_insert(t.elapsed());
                }
                Renewal::Failed(e) => {
                    eprintln!("m{frozen} frozen, {:?}: {e}", t.elapsed());
                    if first_ack.is_some() {
                        failures_after += 1;
                    }
                }
                Renewal::Gone => panic!("lease lost"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "m{frozen} frozen (leader: {was_leader}): first ack after {first_ack:?}, {failures_after} failures after it"
        );
        // An election (if the leader froze) and moving off the frozen member
        // take a few seconds; after that every renewal is acked.
        let first = first_ack.expect("renewals must resume with one member frozen");
        assert!(
            first < Duration::from_secs(8),
            "m{frozen}: first ack after {first:?}"
        );
        assert!(
            failures_after <= 1,
            "m{frozen}: {failures_after} failures after recovery"
        );
        sync(|| cl.resume(frozen)).unwrap();
    }
}

/// A deletion is not an expiry (docs/fencing.md): `etcdctl del` of the
/// leader key leaves its holder's lease alive. The watch's deletion event
/// names that lease (its previous value), and `time_to_live` tells a winner
/// whether it is gone yet: alive after the delete, gone after its holder's
/// revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_key_names_its_lease_which_outlives_the_deletion() {
    let etcd = sync(EtcdServer::start).unwrap();
    let c = cfg(etcd.endpoints(), 2.0);
    let mut primary = Dcs::connect(&c, SCOPE, "a").await.unwrap();
    let mut follower = Dcs::connect(&c, SCOPE, "b").await.unwrap();
    let l = primary.grant(30).await.unwrap();
    assert!(matches!(
        primary.try_acquire(l).await.unwrap(),
        Acquire::Won { .. }
    ));
    let (_, rev) = follower.leader().await.unwrap();
    let mut watch = follower.watch_leader(rev).await.unwrap();
    let eps = etcd.endpoints();
    let key = primary.leader_key().to_string();
    // `etcdctl del`; the blocking client lives and dies off the runtime.
    assert!(sync(|| BlockingClient::connect(&eps).unwrap().delete(&key)).unwrap());
    let ev = next_event(&mut watch, Duration::from_secs(5)).await;
    assert!(
        matches!(ev, LeaderEvent::Deleted { lease, .. } if lease == Some(l)),
        "{ev:?}"
    );
    let ttl = follower.time_to_live(l).await.unwrap();
    assert!(
        ttl.is_some_and(|t| t > 20),
        "the holder's lease lives on: {ttl:?}"
    );
    primary.revoke(l).await.unwrap();
    assert_eq!(follower.time_to_live(l).await.unwrap(), None);
}

/// Issue 10 item 7: a winner that never saw the key's earlier holders
/// learns them from etcd's history of the key. A put by lease a, a delete
/// by hand, a put by lease b, a delete by hand, then our win: both leases
/// are named (both still live: a hand delete revokes nothing). Read from
/// past a's term, only b. Past a compaction, the read says incomplete
/// (and names what it still saw). A frozen etcd: the read's own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_holders_names_every_lease_before_a_win_and_says_when_compacted() {
    let mut etcd = sync(EtcdServer::start).unwrap();
    let eps = etcd.endpoints();
    let c = cfg(eps.clone(), 1.0);
    let client = sync(|| BlockingClient::connect(&eps)).unwrap();
    let key = format!("/leasedog/{SCOPE}/leader");
    let mut a = Dcs::connect(&c, SCOPE, "a").await.unwrap();
    let mut b = Dcs::connect(&c, SCOPE, "b").await.unwrap();
    let mut w = Dcs::connect(&c, SCOPE, "w").await.unwrap();
    let (la, lb, lw) = (
        a.grant(60).await.unwrap(),
        b.grant(60).await.unwrap(),
        w.grant(60).await.unwrap(),
    );
    let won = |r| match r {
        Acquire::Won { revision } => revision,
        other => panic!("expected a win, got {other:?}"),
    };
    let ra = won(a.try_acquire(la).await.unwrap());
    assert!(sync(|| client.delete(&key)).unwrap());
    let rb = won(b.try_acquire(lb).await.unwrap());
    assert!(sync(|| client.delete(&key)).unwrap());
    let rw = won(w.try_acquire(lw).await.unwrap());
    assert!(ra < rb && rb < rw);

    let h = w.previous_holders(1, rw).await.unwrap();
    let mut both = vec![la, lb];
    both.sort();
    assert_eq!(h.leases, both, "{h:?}");
    assert!(h.complete && h.compacted.is_none(), "{h:?}");
    // Both still live: the winner must wait for them.
    assert!(sync(|| client.lease_ttl(la.0)).unwrap() > 0);
    assert!(sync(|| client.lease_ttl(lb.0)).unwrap() > 0);
    // From b's put on: only b. Our own put at `rw` is not "before".
    let h = w.previous_holders(rb, rw).await.unwrap();
    assert_eq!(h.leases, vec![lb], "{h:?}");
    assert!(h.complete);
    let h = w.previous_holders(rw, rw).await.unwrap();
    assert!(h.leases.is_empty() && h.complete, "{h:?}");

    // Compact up to b's put: a's term is gone from the history.
    let mut raw = etcd_client::Client::connect(&eps, None).await.unwrap();
    raw.compact(rb, None).await.unwrap();
    let h = w.previous_holders(1, rw).await.unwrap();
    assert!(!h.complete, "a compacted range must be reported: {h:?}");
    assert_eq!(h.compacted, Some(rb), "{h:?}");
    assert_eq!(h.leases, vec![lb], "what is left is still read: {h:?}");
    // Asked only for what is still there: complete.
    let h = w.previous_holders(rb, rw).await.unwrap();
    assert!(h.complete && h.leases == vec![lb], "{h:?}");

    // A frozen etcd: the read ends at its deadline (1 s), as an error.
    sync(|| etcd.stop()).unwrap();
    let t0 = Instant::now();
    let r = w.previous_holders(1, rw).await;
    let took = t0.elapsed();
    sync(|| etcd.resume()).unwrap();
    assert!(matches!(r, Err(DcsError::Timeout { .. })), "{r:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    sync(move || drop(client));
}
