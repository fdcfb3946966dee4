//! Issue 10 item 7's residual: a winner that never saw the deleted key's
//! holder learns it from etcd's history (`Input::WonAfter`) and promotes
//! only once that lease is gone; an incomplete history never promotes on
//! hope.

use super::fixtures::*;
use super::*;

fn promotes(actions: &[Action]) -> bool {
    has(actions, |a| *a == Action::Promote)
}

/// A node started after the key was deleted: its first read (revision 5,
/// at t = 0) shows nobody, and it never saw who held the key before.
fn fresh_follower() -> Core {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(5));
    let a = c.handle(t(100), granted(100));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
    c
}

#[test]
fn history_from_reads_everything_until_the_watch_covers_t_plus_slack() {
    let mut c = core(WatchdogMode::Required);
    assert_eq!(c.history_from(t(0)), 1, "nothing read yet");
    c.handle(t(0), Input::Start);
    let key = |revision| Input::KeySeen {
        holder: KeyHolder::Nobody,
        revision,
        lease: None,
    };
    c.handle(t(1000), key(5));
    // T + EXPIRY_SLACK = 6.5 s after the first read, not before.
    assert_eq!(c.history_from(t(7499)), 1);
    assert_eq!(c.history_from(t(7500)), 5);
    // Later reads on the same watch do not move the bound.
    c.handle(t(8000), key(9));
    assert_eq!(c.history_from(t(20000)), 5);
    // A broken watch starts over from its re-read.
    c.handle(t(20000), Input::WatchBroken);
    assert_eq!(c.history_from(t(20000)), 1);
    c.handle(t(20100), key(12));
    assert_eq!(c.history_from(t(26599)), 1);
    assert_eq!(c.history_from(t(26600)), 12);
}

#[test]
fn a_holder_known_only_from_history_is_awaited_before_promotion() {
    let mut c = fresh_follower();
    // etcd's history names lease 42 (the deleted key's) and our own 7.
    let a = c.handle(
        t(100),
        Input::WonAfter {
            revision: 6,
            previous: vec![42, 7],
            complete: true,
        },
    );
    assert!(has(&a, |a| *a
        == Action::Record(Fact::AwaitingPreviousLease { lease: 42 })));
    assert!(
        !has(&a, |a| matches!(
            a,
            Action::Record(Fact::AwaitingPreviousLease { lease: 7 })
        )),
        "never our own lease: {a:?}"
    );
    assert!(!has(&a, |a| matches!(
        a,
        Action::Record(Fact::PreviousHoldersUnknown { .. })
    )));
    let a = c.handle(t(200), armed_ok(false));
    assert!(!promotes(&a), "{a:?}");
    assert!(has(&a, |a| *a == Action::CheckLeaseGone { lease: 42 }));
    assert!(!has(&a, |a| *a == Action::CheckLeaseGone { lease: 7 }));
    // Still alive: asked again each loop, no promotion.
    let a = c.handle(
        t(250),
        Input::PreviousLease {
            lease: 42,
            alive: true,
            ttl: 4,
        },
    );
    assert!(!promotes(&a));
    let a = c.handle(t(700), Input::Tick);
    assert!(has(&a, |a| *a == Action::CheckLeaseGone { lease: 42 }));
    assert!(!promotes(&a));
    // Gone (revoked by its holder after its stop): promotion follows.
    c.handle(t(700), renewed(700));
    let a = c.handle(
        t(750),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(promotes(&a), "{a:?}");
}

#[test]
fn an_incomplete_history_waits_t_plus_slack_after_the_win() {
    let mut c = fresh_follower();
    let a = c.handle(
        t(100),
        Input::WonAfter {
            revision: 6,
            previous: vec![],
            complete: false,
        },
    );
    assert!(has(&a, |a| *a
        == Action::Record(Fact::PreviousHoldersUnknown {
            wait: Duration::from_millis(6500)
        })));
    let a = c.handle(t(200), armed_ok(false));
    assert!(!promotes(&a), "not on hope: {a:?}");
    // Renewed and ticking on fresh evidence up to the bound: no promotion.
    let mut at = 200;
    while at < 6600 {
        at += 500;
        let now = at.min(6599);
        let a = c.handle(
            t(now),
            Input::Renewed {
                sent: t(now),
                ttl: 5,
            },
        );
        assert!(!promotes(&a), "at {now} ms: {a:?}");
        let a = c.handle(t(now), Input::Tick);
        assert!(!promotes(&a), "at {now} ms: {a:?}");
        if now == 6599 {
            break;
        }
    }
    assert_eq!(c.role(), &Role::Promoting);
    // Win at 0.1 s + 6.5 s: the next fresh loop promotes.
    // The first fresh renewal (or tick) past the bound promotes.
    let mut a = c.handle(t(6600), renewed(6600));
    a.extend(c.handle(t(6600), Input::Tick));
    assert!(promotes(&a), "{a:?}");
}

#[test]
fn an_incomplete_history_with_known_holders_waits_for_both() {
    let mut c = fresh_follower();
    c.handle(
        t(100),
        Input::WonAfter {
            revision: 6,
            previous: vec![42],
            complete: false,
        },
    );
    c.handle(t(200), armed_ok(false));
    c.handle(t(300), renewed(300));
    // 42 gone early: the incomplete history still holds the promotion.
    let a = c.handle(
        t(300),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(!promotes(&a), "{a:?}");
    // The first fresh renewal (or tick) past the bound promotes.
    let mut a = c.handle(t(6700), renewed(6700));
    a.extend(c.handle(t(6700), Input::Tick));
    assert!(promotes(&a), "{a:?}");
}

#[test]
fn a_deletion_seen_late_still_owes_its_lease() {
    // The watch lags: a read at revision 10 shows nobody, then the
    // deletion at revision 8 (lease 42) arrives. Older than the read, it
    // says nothing about the key now, but its lease may still live.
    let mut c = fresh_follower();
    c.handle(t(100), nobody(10));
    c.handle(
        t(150),
        Input::KeySeen {
            holder: KeyHolder::Nobody,
            revision: 8,
            lease: Some(42),
        },
    );
    let a = c.handle(t(200), Input::Won { revision: 11 });
    assert!(has(&a, |a| *a
        == Action::Record(Fact::AwaitingPreviousLease { lease: 42 })));
}

fn own_key(revision: i64) -> Input {
    Input::KeySeen {
        holder: KeyHolder::Us,
        revision,
        lease: Some(7),
    }
}

fn holders_read(revision: i64, previous: Vec<i64>, complete: bool) -> Input {
    Input::HoldersRead {
        revision,
        previous,
        complete,
    }
}

#[test]
fn own_key_is_taken_after_a_history_read_as_after_a_race() {
    // The key found on the follower's own lease (a switchover's hand-over,
    // `failover --to`, an Acquire whose answer was lost but applied): the
    // key's history is read first, once, and the win waits only for the
    // holders it names, not T + EXPIRY_SLACK blind.
    let mut c = fresh_follower();
    let a = c.handle(t(200), own_key(6));
    assert!(
        has(&a, |a| *a == Action::ReadHolders { from: 1, before: 6 }),
        "{a:?}"
    );
    assert!(!has(&a, |a| matches!(
        a,
        Action::Record(Fact::Acquired { .. })
    )));
    assert_eq!(c.role(), &Role::Follower);
    // A later read of the same key (the store's revision) asks no more.
    let a = c.handle(t(250), own_key(8));
    assert!(
        !has(&a, |a| matches!(a, Action::ReadHolders { .. })),
        "{a:?}"
    );
    let a = c.handle(t(300), holders_read(6, vec![42, 7], true));
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::Acquired { revision: 6, .. })
    )));
    assert!(has(&a, |a| *a
        == Action::Record(Fact::AwaitingPreviousLease { lease: 42 })));
    assert!(!has(&a, |a| matches!(
        a,
        Action::Record(Fact::PreviousHoldersUnknown { .. })
    )));
    let a = c.handle(t(350), armed_ok(false));
    assert!(has(&a, |a| *a == Action::CheckLeaseGone { lease: 42 }));
    assert!(!promotes(&a), "{a:?}");
    c.handle(
        t(400),
        Input::Renewed {
            sent: t(400),
            ttl: 5,
        },
    );
    let a = c.handle(
        t(450),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(promotes(&a), "promoted once lease 42 is gone: {a:?}");
}

#[test]
fn own_key_with_an_unread_history_is_not_promoted_on_hope() {
    let mut c = fresh_follower();
    c.handle(t(200), own_key(6));
    let a = c.handle(t(210), holders_read(6, vec![], false));
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::PreviousHoldersUnknown { .. })
    )));
    let a = c.handle(t(300), armed_ok(false));
    assert!(!promotes(&a), "{a:?}");
}

#[test]
fn a_history_answered_after_the_key_moved_on_takes_nothing() {
    let mut c = fresh_follower();
    c.handle(t(200), own_key(6));
    // Not the read asked: dropped.
    let a = c.handle(t(210), holders_read(5, vec![], true));
    assert!(!has(&a, |a| matches!(
        a,
        Action::Record(Fact::Acquired { .. })
    )));
    c.handle(t(220), b_holds(9, Some(42)));
    let a = c.handle(t(230), holders_read(6, vec![], true));
    assert!(!has(&a, |a| matches!(
        a,
        Action::Record(Fact::Acquired { .. })
    )));
    assert_eq!(c.role(), &Role::Follower);
}

#[test]
fn a_reading_without_a_watch_is_read_again_every_loop_until_one_runs() {
    // etcd answered the read (b holds the key) but the watch could not be
    // set up: a follower that knows the holder never reads by itself, so
    // the core asks for a read (and a watch) at every tick until one runs.
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    let unwatched = |holder: KeyHolder, revision| Input::KeySeenUnwatched {
        holder,
        revision,
        lease: None,
    };
    let b = KeyHolder::Other("b".into());
    c.handle(t(10), unwatched(b.clone(), 5));
    assert_eq!(c.holder(), &b, "the reading counts");
    assert_eq!(c.history_from(t(60_000)), 1, "no watch: the whole history");
    let reads = |a: &[Action]| a.iter().filter(|a| **a == Action::ReadKey).count();
    for at in [500, 1000] {
        let a = c.handle(t(at), Input::Tick);
        assert_eq!(reads(&a), 1, "at {at}: {a:?}");
        c.handle(t(at), unwatched(b.clone(), 5));
    }
    // Read again without a watch, the key is free: the race runs at once.
    let a = c.handle(t(1100), unwatched(KeyHolder::Nobody, 8));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
    // Lost while still unwatched (the Acquire's answer): still no watch.
    c.handle(t(1110), unwatched(b.clone(), 9));
    let a = c.handle(t(1500), Input::Tick);
    assert_eq!(reads(&a), 1, "{a:?}");
    // A watch runs behind the next reading: no more reads at ticks.
    c.handle(t(1500), b_holds(9, None));
    let a = c.handle(t(2000), Input::Tick);
    assert_eq!(reads(&a), 0, "watched: {a:?}");
    assert_eq!(c.history_from(t(1500)), 1);
    assert_eq!(c.history_from(t(8000)), 9, "the watch's first revision");
}

#[test]
fn a_leader_whose_re_read_went_unanswered_reads_again_every_loop() {
    // A leader's watch breaks and its re-read is lost (cut off): it must
    // read again each loop until one answers, or a deletion by hand in the
    // meantime would never reach it (`history_from` relies on it).
    let mut c = fresh_follower();
    c.handle(t(100), Input::Won { revision: 6 });
    c.handle(t(100), armed_ok(false));
    c.handle(t(200), Input::Promoted);
    assert_eq!(c.role(), &Role::Leader);
    let a = c.handle(t(300), Input::Tick);
    assert!(!has(&a, |a| *a == Action::ReadKey), "watch up: {a:?}");
    let a = c.handle(t(400), Input::WatchBroken);
    assert!(has(&a, |a| *a == Action::ReadKey));
    c.handle(t(400), renewed(400));
    let a = c.handle(t(900), Input::Tick);
    assert!(has(&a, |a| *a == Action::ReadKey), "unanswered: {a:?}");
    c.handle(t(900), renewed(900));
    let a = c.handle(t(1400), Input::Tick);
    assert!(
        has(&a, |a| *a == Action::ReadKey),
        "still unanswered: {a:?}"
    );
    // The read answers: the key was deleted meanwhile; the leader steps down.
    let a = c.handle(t(1450), nobody(8));
    assert!(has(&a, |a| matches!(a, Action::StepDown { .. })), "{a:?}");
    let a = c.handle(t(1900), Input::Tick);
    assert!(!has(&a, |a| *a == Action::ReadKey), "answered: {a:?}");
}

#[test]
fn a_history_read_unanswered_for_a_ttl_is_asked_again() {
    let mut c = fresh_follower();
    let a = c.handle(t(200), own_key(6));
    assert!(has(&a, |a| matches!(a, Action::ReadHolders { .. })));
    let a = c.handle(t(5199), own_key(8));
    assert!(
        !has(&a, |a| matches!(a, Action::ReadHolders { .. })),
        "{a:?}"
    );
    let a = c.handle(t(5200), own_key(9));
    assert!(
        has(&a, |a| matches!(a, Action::ReadHolders { before: 9, .. })),
        "{a:?}"
    );
}
