//! Shared test fixtures for the core's unit tests: the lab budget, clock
//! readings, device outcomes and PostgreSQL observations, so that each test
//! module builds the same core the same way.

use super::*;
use crate::postgres::{Lsn, WalPosition};

pub(super) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A boot-clock reading `ms_` milliseconds after boot.
pub(super) fn t(ms_: u64) -> BootTime {
    BootTime::from_nanos(ms_ * 1_000_000)
}

/// T = 5, M = 2, R = 1, loop 0.5 s, request timeout 0.4 s (the lab budget).
pub(super) fn core(mode: WatchdogMode) -> Core {
    let budget = Budget::new(
        Duration::from_secs(5),
        Duration::from_secs(2),
        Duration::from_secs(1),
        ms(500),
        ms(400),
    )
    .unwrap();
    Core::new(CoreConfig { budget, mode })
}

pub(super) fn settings(sync: bool) -> PgSettings {
    PgSettings {
        maximum_lag_on_failover: 1000,
        synchronous_mode: sync,
        host: "10.0.0.1".into(),
        port: 5432,
        sync: Default::default(),
    }
}

/// The lab budget, watchdog required, node "a" managing PostgreSQL.
pub(super) fn managed(sync: bool) -> Core {
    core(WatchdogMode::Required)
        .with_node("a")
        .with_postgres(settings(sync))
}

pub(super) fn dev(path: &str, nowayout: bool) -> ArmedDevice {
    ArmedDevice {
        path: path.into(),
        identity: "Software Watchdog".into(),
        w_secs: 3,
        nowayout,
    }
}

/// One device armed, none failed.
pub(super) fn armed_ok(nowayout: bool) -> Input {
    Input::Armed(ArmOutcome {
        armed: vec![dev("/dev/watchdog0", nowayout)],
        failed: vec![],
    })
}

pub(super) fn has(actions: &[Action], pred: impl Fn(&Action) -> bool) -> bool {
    actions.iter().any(pred)
}

pub(super) fn pos(actions: &[Action], pred: impl Fn(&Action) -> bool) -> usize {
    actions.iter().position(pred).expect("action present")
}

/// The key read empty at `revision`.
pub(super) fn nobody(revision: i64) -> Input {
    Input::KeySeen {
        holder: KeyHolder::Nobody,
        revision,
        lease: None,
    }
}

/// PostgreSQL seen running as a standby at `lsn` (received and replayed).
pub(super) fn replica(lsn: u64) -> Input {
    Input::PgObserved {
        role: PgRole::Replica,
        wal: Some(WalPosition {
            timeline: 1,
            current: None,
            receive: Some(Lsn(lsn)),
            replay: Some(Lsn(lsn)),
        }),
        has_data: true,
    }
}

/// PostgreSQL seen writable at `lsn`.
pub(super) fn primary(lsn: u64) -> Input {
    Input::PgObserved {
        role: PgRole::Primary,
        wal: Some(WalPosition {
            timeline: 1,
            current: Some(Lsn(lsn)),
            receive: None,
            replay: None,
        }),
        has_data: true,
    }
}

/// From a started core: the key read empty at t = 0; lease 7 granted and the
/// key won at t = 1 s (s = 1 s), the device armed when `arm`, promoted.
/// Returns what the core asked on `Promoted`.
pub(super) fn win_and_promote(c: &mut Core, arm: bool) -> Vec<Action> {
    c.handle(t(0), nobody(1));
    let a = c.handle(
        t(1000),
        Input::LeaseGranted {
            lease: 7,
            sent: t(1000),
        },
    );
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
    c.handle(t(1000), Input::Won { revision: 2 });
    if arm {
        c.handle(t(1000), armed_ok(false));
    }
    let a = c.handle(t(1000), Input::Promoted);
    assert_eq!(c.role(), &Role::Leader);
    a
}

/// Lease 7 granted on a request sent at `at_ms`.
pub(super) fn granted(at_ms: u64) -> Input {
    Input::LeaseGranted {
        lease: 7,
        sent: t(at_ms),
    }
}

/// The key seen held by node "b" at `revision` (on `lease`, when known).
pub(super) fn b_holds(revision: i64, lease: Option<i64>) -> Input {
    Input::KeySeen {
        holder: KeyHolder::Other("b".into()),
        revision,
        lease,
    }
}

/// A renewal sent at `sent_ms`, acknowledged with TTL 5.
pub(super) fn renewed(sent_ms: u64) -> Input {
    Input::Renewed {
        sent: t(sent_ms),
        ttl: 5,
    }
}
