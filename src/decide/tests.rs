use super::fixtures::*;
use super::*;
use proptest::prelude::*;

/// Drives a core to Leader at t = 1.0 s with s = 1.0 s.
fn leader(mode: WatchdogMode) -> Core {
    let mut c = core(mode);
    c.handle(t(0), Input::Start);
    win_and_promote(&mut c, mode != WatchdogMode::Off);
    c
}

#[test]
fn start_publishes_no_evidence_then_grants() {
    let mut c = core(WatchdogMode::Required);
    let a = c.handle(t(0), Input::Start);
    assert_eq!(a[0], Action::Publish(Evidence::None));
    assert!(has(&a, |a| *a == Action::Grant));
    assert!(has(&a, |a| *a == Action::ReadKey));
}

#[test]
fn follower_races_only_for_an_empty_key() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    let a = c.handle(t(10), b_holds(3, None));
    assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })));
    let a = c.handle(
        t(20),
        Input::KeySeen {
            holder: KeyHolder::Garbage,
            revision: 4,
            lease: None,
        },
    );
    assert!(
        !has(&a, |a| matches!(a, Action::Acquire { .. })),
        "garbage is held by an unknown owner"
    );
    let a = c.handle(t(30), nobody(5));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }));
}

#[test]
fn ineligible_follower_does_not_race() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(
        t(0),
        Input::Eligibility {
            eligible: false,
            reason: "lag".into(),
        },
    );
    c.handle(t(0), granted(0));
    let a = c.handle(t(10), nobody(5));
    assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })));
    let a = c.handle(
        t(20),
        Input::Eligibility {
            eligible: true,
            reason: String::new(),
        },
    );
    assert!(has(&a, |a| matches!(a, Action::Acquire { .. })));
}

#[test]
fn rule2_arm_before_promote() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(100), granted(100));
    let a = c.handle(t(200), Input::Won { revision: 2 });
    assert!(
        !has(&a, |a| *a == Action::Promote),
        "no promote before arming"
    );
    assert!(
        has(&a, |a| *a == Action::Arm { not_after: t(1100) }),
        "{a:?}"
    );
    let a = c.handle(t(300), armed_ok(false));
    let publish = pos(&a, |a| *a == Action::Publish(Evidence::Lease(t(100))));
    let promote = pos(&a, |a| *a == Action::Promote);
    assert!(publish < promote, "pings permitted before promotion: {a:?}");
    assert_eq!(c.role(), &Role::Promoting);
}

#[test]
fn rule2_stale_evidence_renews_before_arming() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(0), b_holds(1, None));
    // The key frees up 1.5 s after our last renewal: too stale to arm (M - R = 1 s).
    c.handle(t(1500), nobody(3));
    let a = c.handle(t(1500), Input::Won { revision: 4 });
    assert!(!has(&a, |a| matches!(a, Action::Arm { .. })), "{a:?}");
    assert!(has(&a, |a| *a == Action::Renew { lease: 7 }));
    let a = c.handle(t(1600), renewed(1510));
    assert!(
        has(&a, |a| *a == Action::Arm { not_after: t(2510) }),
        "{a:?}"
    );
}

/// Fresh, but with less than half of `M - R` left: arming would likely
/// outlast the evidence on a slow machine (and give the key back), so the
/// win renews first and arms on the fresh renewal, with the whole window.
#[test]
fn a_win_late_in_the_ping_window_renews_before_arming() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(0), b_holds(1, None));
    c.handle(t(700), nobody(3));
    let a = c.handle(t(700), Input::Won { revision: 4 });
    assert!(!has(&a, |a| matches!(a, Action::Arm { .. })), "{a:?}");
    assert!(has(&a, |a| *a == Action::Renew { lease: 7 }), "{a:?}");
    let a = c.handle(t(760), renewed(710));
    assert!(
        has(&a, |a| *a == Action::Arm { not_after: t(1710) }),
        "{a:?}"
    );
    // With half the window left, the win arms at once.
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(0), b_holds(1, None));
    c.handle(t(500), nobody(3));
    let a = c.handle(t(500), Input::Won { revision: 4 });
    assert!(
        has(&a, |a| *a == Action::Arm { not_after: t(1000) }),
        "{a:?}"
    );
}

#[test]
fn rule2_required_arm_failure_releases_and_backs_off() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    let a = c.handle(
        t(20),
        Input::Armed(ArmOutcome {
            armed: vec![dev("/dev/watchdog1", false)],
            failed: vec![("/dev/watchdog0".into(), "busy: held by systemd".into())],
        }),
    );
    assert!(!has(&a, |a| *a == Action::Promote));
    assert!(
        has(&a, |a| *a == Action::Disarm),
        "partially armed devices are disarmed"
    );
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
    assert_eq!(c.role(), &Role::Follower);
    c.handle(
        t(30),
        Input::Released {
            deleted: true,
            revision: Some(9),
        },
    );
    // Events after the release (revision 9) carry later revisions.
    let a = c.handle(t(40), nobody(10));
    assert!(
        !has(&a, |a| matches!(a, Action::Acquire { .. })),
        "backs off"
    );
    let a = c.handle(t(5100), nobody(11));
    assert!(
        has(&a, |a| matches!(a, Action::Acquire { .. })),
        "retries after one TTL"
    );
}

#[test]
fn automatic_mode_leads_unarmed_and_says_so() {
    let mut c = core(WatchdogMode::Automatic);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    let a = c.handle(
        t(20),
        Input::Armed(ArmOutcome {
            armed: vec![],
            failed: vec![("/dev/watchdog0".into(), "no such device".into())],
        }),
    );
    assert!(has(&a, |a| *a == Action::Promote));
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::LeadingUnarmed { .. })
    )));
}

#[test]
fn off_mode_never_arms() {
    let mut c = core(WatchdogMode::Off);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    let a = c.handle(t(10), Input::Won { revision: 2 });
    assert!(!has(&a, |a| matches!(a, Action::Arm { .. })));
    assert!(has(&a, |a| *a == Action::Promote));
}

#[test]
fn rule1_renewal_publishes_first_and_late_acks_are_recorded() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1600), renewed(1500));
    assert_eq!(
        a[0],
        Action::Publish(Evidence::Lease(t(1500))),
        "publish before anything else"
    );
    assert!(!has(&a, |a| matches!(
        a,
        Action::Record(Fact::RenewedLate { .. })
    )));
    // Acked 1.2 s after it was sent: it earns no ping (M - R = 1 s).
    let a = c.handle(t(3200), renewed(2000));
    assert!(has(&a, |a| *a
        == Action::Record(Fact::RenewedLate {
            sent: t(2000),
            acked: t(3200)
        })));
}

/// A leader whose pinger stopped waking (starved by higher-priority work,
/// or stalled) stops renewing: its watchdog will reset it anyway, and each
/// renewal would hold the key from the standbys for another `T`. Recorded
/// once per silence; renewals resume when the pinger wakes again.
#[test]
fn a_leader_whose_pinger_is_silent_withholds_its_renewals() {
    let renews = |a: &[Action]| has(a, |a| matches!(a, Action::Renew { .. }));
    let withheld = |a: &[Action]| {
        has(a, |a| {
            matches!(a, Action::Record(Fact::RenewalWithheld { .. }))
        })
    };
    let mut c = leader(WatchdogMode::Required); // armed at 1.0 s
    c.handle(t(1400), renewed(1400));
    c.handle(t(1400), Input::PingerWoke { at: t(1400) });
    // (M - R) / 2 = 0.5 s of silence is still within what is allowed.
    let a = c.handle(t(1900), Input::Tick);
    assert!(renews(&a) && !withheld(&a), "{a:?}");
    c.handle(t(1950), renewed(1900));
    let a = c.handle(t(2000), Input::Tick);
    assert!(!renews(&a), "silent 0.6 s: no renewal: {a:?}");
    assert!(has(&a, |a| *a
        == Action::Record(Fact::RenewalWithheld { silent: ms(600) })));
    let a = c.handle(t(2500), Input::Tick);
    assert!(!renews(&a) && !withheld(&a), "recorded once: {a:?}");
    c.handle(t(2550), Input::PingerWoke { at: t(2550) });
    let a = c.handle(t(2600), Input::Tick);
    assert!(renews(&a), "the pinger woke: renew again: {a:?}");
}

/// The silence is counted from the arming when the pinger's last wake-up
/// is older (it had no devices before), and never for a follower or an
/// unarmed leader, whose renewals no pinger carries.
#[test]
fn pinger_silence_counts_from_the_arming_and_only_while_armed() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), Input::PingerWoke { at: t(0) });
    win_and_promote(&mut c, true); // armed at 1.0 s
    assert_eq!(c.pinger_silent(t(1400)), None);
    assert_eq!(c.pinger_silent(t(1600)), Some(ms(600)));
    let mut f = core(WatchdogMode::Required);
    f.handle(t(0), Input::Start);
    f.handle(t(0), Input::PingerWoke { at: t(0) });
    f.handle(t(1000), granted(1000));
    assert_eq!(f.pinger_silent(t(3000)), None, "not armed");
    let a = f.handle(t(3000), Input::Tick);
    assert!(has(&a, |a| matches!(a, Action::Renew { .. })), "{a:?}");
    let mut u = core(WatchdogMode::Off);
    u.handle(t(0), Input::Start);
    u.handle(t(0), Input::PingerWoke { at: t(0) });
    win_and_promote(&mut u, false);
    assert_eq!(u.pinger_silent(t(3000)), None, "led unarmed");
}

#[test]
fn rule1_out_of_order_ack_never_moves_evidence_back() {
    let mut c = leader(WatchdogMode::Required);
    c.handle(t(2100), renewed(2000));
    let a = c.handle(t(2200), renewed(1500));
    assert_eq!(a[0], Action::Publish(Evidence::Lease(t(2000))));
    assert_eq!(c.last_fresh(), Some(t(2000)));
}

#[test]
fn rule3_tick_past_deadline_steps_down() {
    let mut c = leader(WatchdogMode::Required);
    // s = 1.0 s, T - M = 3 s: deadline 4.0 s.
    let a = c.handle(t(4000), Input::Tick);
    assert!(
        !has(&a, |a| matches!(a, Action::StepDown { .. })),
        "at the deadline, not past it"
    );
    let a = c.handle(t(4001), Input::Tick);
    assert_eq!(a[0], Action::Publish(Evidence::None), "pings stop first");
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::Deadline,
            fast: None
        }));
    assert!(!has(&a, |a| *a == Action::Disarm));
}

#[test]
fn lease_gone_or_key_lost_steps_down() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1500), Input::LeaseGone);
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::LeaseLost,
            fast: None
        }));
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1500), b_holds(9, None));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::KeyLost,
            fast: None
        }));
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(
        t(1500),
        Input::Renewed {
            sent: t(1400),
            ttl: 0,
        },
    );
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::LeaseLost,
            fast: None
        }));
}

#[test]
fn rule4_disarm_only_after_stop_and_release() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1500), Input::Shutdown);
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::Shutdown,
            fast: Some(ms(2100))
        }));
    assert!(!has(&a, |a| *a == Action::Disarm));
    assert!(
        !has(&a, |a| *a == Action::Publish(Evidence::None)),
        "a clean handover keeps pinging on fresh renewals"
    );
    let a = c.handle(t(1550), renewed(1500));
    assert_eq!(a[0], Action::Publish(Evidence::Lease(t(1500))));
    let a = c.handle(
        t(1600),
        Input::SteppedDown {
            how: "immediate".into(),
        },
    );
    assert!(!has(&a, |a| *a == Action::Disarm), "key still ours: {a:?}");
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
    let a = c.handle(
        t(1700),
        Input::Released {
            deleted: true,
            revision: Some(9),
        },
    );
    let none = pos(&a, |a| *a == Action::Publish(Evidence::None));
    let disarm = pos(&a, |a| *a == Action::Disarm);
    assert!(none < disarm, "pings stop before the magic close");
    let a = c.handle(t(1800), Input::Disarmed);
    let revoke = pos(&a, |a| *a == Action::Revoke { lease: 7 });
    let exit = pos(&a, |a| *a == Action::Exit { code: 0 });
    assert!(revoke < exit);
    assert_eq!(c.role(), &Role::Exited);
}

#[test]
fn lost_lease_stops_pings_at_once_and_later_renewals_do_not_restart_them() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1500), b_holds(9, None));
    assert_eq!(a[0], Action::Publish(Evidence::None));
    let a = c.handle(t(1600), renewed(1550));
    assert!(
        !has(&a, |a| matches!(a, Action::Publish(Evidence::Lease(_)))),
        "{a:?}"
    );
}

#[test]
fn rule4_unreachable_etcd_waits_for_expiry_before_disarm() {
    let mut c = leader(WatchdogMode::Required);
    c.handle(t(4001), Input::Tick); // deadline step-down
    let a = c.handle(
        t(4100),
        Input::SteppedDown {
            how: "immediate".into(),
        },
    );
    assert!(!has(&a, |a| *a == Action::Disarm));
    c.handle(
        t(4200),
        Input::ReleaseFailed {
            error: "timeout".into(),
        },
    );
    // s = 1.0 s; T = 5 s; slack 1.5 s: no disarm before 7.5 s, and no
    // pings meanwhile (no fresh evidence): the watchdog resets the node.
    let a = c.handle(t(7000), Input::Tick);
    assert!(!has(&a, |a| *a == Action::Disarm));
    assert!(!has(&a, |a| matches!(
        a,
        Action::Publish(Evidence::Lease(_) | Evidence::Liveness(_))
    )));
    let a = c.handle(t(7600), Input::Tick);
    assert!(has(&a, |a| *a == Action::Disarm), "{a:?}");
}

#[test]
fn timer_fencing_is_adopted_by_the_loop() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(
        t(4100),
        Input::FencedByTimer {
            how: "killed".into(),
        },
    );
    assert!(
        !has(&a, |a| matches!(a, Action::StepDown { .. })),
        "already stopped by the timer"
    );
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::StepDownConfirmed { .. })
    )));
    assert_eq!(c.role(), &Role::Fenced);
}

#[test]
fn follower_shutdown_revokes_and_exits() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    let a = c.handle(t(10), Input::Shutdown);
    assert!(has(&a, |a| *a == Action::Revoke { lease: 7 }));
    assert!(has(&a, |a| *a == Action::Exit { code: 0 }));
}

fn exits(a: &[Action]) -> bool {
    has(a, |a| matches!(a, Action::Exit { .. }))
}

/// A managed follower of `b` whose standby runs (PostgreSQL seen `pg`).
fn managed_follower_seeing(paused: bool, pg: Input) -> Core {
    let mut c = managed(false).with_maintenance();
    c.handle(t(0), Input::Start);
    c.handle(t(0), Input::Paused { paused });
    c.handle(t(0), granted(0));
    c.handle(t(10), b_holds(3, None));
    c.handle(t(20), pg);
    c
}

#[test]
fn a_follower_stops_its_standby_cleanly_before_it_exits() {
    let mut c = managed_follower_seeing(false, replica(10));
    let a = c.handle(t(30), Input::Shutdown);
    assert!(has(&a, |a| *a == Action::StopPostgres), "{a:?}");
    assert!(!exits(&a), "exit waits for the stop: {a:?}");
    // A second signal asks nothing again.
    let a = c.handle(t(40), Input::Shutdown);
    assert!(
        !has(&a, |a| *a == Action::StopPostgres) && !exits(&a),
        "{a:?}"
    );
    let a = c.handle(t(50), Input::PostgresStopped { error: None });
    assert!(has(&a, |a| *a == Action::Revoke { lease: 7 }), "{a:?}");
    assert!(exits(&a), "{a:?}");
}

#[test]
fn a_failed_stop_at_shutdown_still_exits() {
    let mut c = managed_follower_seeing(false, replica(10));
    c.handle(t(30), Input::Shutdown);
    let a = c.handle(
        t(50),
        Input::PostgresStopped {
            error: Some("pg_ctl timed out".into()),
        },
    );
    assert!(exits(&a), "{a:?}");
}

#[test]
fn a_paused_follower_or_a_stopped_server_exits_without_a_stop() {
    // Paused: PostgreSQL is the operator's; it keeps running.
    let mut c = managed_follower_seeing(true, replica(10));
    let a = c.handle(t(30), Input::Shutdown);
    assert!(!has(&a, |a| *a == Action::StopPostgres), "{a:?}");
    assert!(exits(&a), "{a:?}");
    // Nothing runs: nothing to stop.
    let down = Input::PgObserved {
        role: PgRole::Down,
        wal: None,
        has_data: true,
    };
    let mut c = managed_follower_seeing(false, down);
    let a = c.handle(t(30), Input::Shutdown);
    assert!(!has(&a, |a| *a == Action::StopPostgres), "{a:?}");
    assert!(exits(&a), "{a:?}");
}

#[test]
fn rule5_nowayout_keeps_pinging_on_liveness_as_replica() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    c.handle(t(20), armed_ok(true));
    c.handle(t(30), Input::Promoted);
    c.handle(t(100), Input::LeaseGone);
    c.handle(
        t(200),
        Input::SteppedDown {
            how: "immediate".into(),
        },
    );
    let a = c.handle(t(300), Input::Disarmed);
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::NowayoutKeptArmed { .. })
    )));
    assert_eq!(c.role(), &Role::Follower);
    let a = c.handle(t(900), Input::Tick);
    assert!(has(&a, |a| *a == Action::Publish(Evidence::Liveness(t(900)))));
}

fn follower_seeing(holder: KeyHolder) -> Core {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(
        t(10),
        Input::KeySeen {
            holder,
            revision: 3,
            lease: None,
        },
    );
    c
}

#[test]
fn follower_with_a_writable_postgres_fences_every_time_then_follows() {
    let mut c = follower_seeing(KeyHolder::Other("b".into()));
    let a = c.handle(t(20), Input::Postgres(PgView::Primary));
    assert_eq!(a, vec![Action::Fence], "fence first, nothing else");
    // The fence failed: still writable on the next loop: again, at once.
    c.handle(
        t(30),
        Input::Fenced {
            ok: false,
            how: "x".into(),
        },
    );
    let a = c.handle(t(520), Input::Postgres(PgView::Primary));
    assert_eq!(a, vec![Action::Fence]);
    let a = c.handle(
        t(530),
        Input::Fenced {
            ok: true,
            how: "stopped".into(),
        },
    );
    assert_eq!(
        a,
        vec![
            Action::Record(Fact::FencedNotLeader {
                holder: KeyHolder::Other("b".into()),
                how: "stopped".into(),
                ok: true,
            }),
            Action::Follow {
                leader: "b".into(),
                clone_from: None
            }
        ]
    );
    assert_eq!(c.pg_view(), &PgView::Down);
}

#[test]
fn follower_asks_once_then_waits_for_the_outcome() {
    let mut c = follower_seeing(KeyHolder::Other("b".into()));
    let a = c.handle(t(20), Input::Postgres(PgView::Down));
    assert!(has(&a, |a| *a
        == Action::Follow {
            leader: "b".into(),
            clone_from: None
        }));
    let a = c.handle(t(520), Input::Postgres(PgView::Busy));
    assert!(!has(&a, |a| matches!(a, Action::Follow { .. })));
    let a = c.handle(t(620), Input::Postgres(PgView::Down));
    assert!(!has(&a, |a| matches!(a, Action::Follow { .. })), "pending");
    c.handle(
        t(700),
        Input::Followed {
            leader: "b".into(),
            ok: false,
        },
    );
    let a = c.handle(t(720), Input::Postgres(PgView::Down));
    assert!(
        has(&a, |a| *a
            == Action::Follow {
                leader: "b".into(),
                clone_from: None
            }),
        "retried after a failure"
    );
    let a = c.handle(
        t(820),
        Input::Postgres(PgView::Replica {
            following: Some("b".into()),
        }),
    );
    assert!(!has(&a, |a| matches!(a, Action::Follow { .. })));
    // A new leader: follow it.
    let a = c.handle(
        t(900),
        Input::KeySeen {
            holder: KeyHolder::Other("c".into()),
            revision: 9,
            lease: None,
        },
    );
    assert!(has(&a, |a| *a
        == Action::Follow {
            leader: "c".into(),
            clone_from: None
        }));
}

#[test]
fn a_broken_watch_is_not_a_lost_key() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1200), Input::WatchBroken);
    assert_eq!(a, vec![Action::ReadKey]);
    assert_eq!(c.role(), &Role::Leader);
    let a = c.handle(t(1300), renewed(1250));
    assert_eq!(a[0], Action::Publish(Evidence::Lease(t(1250))));
}

#[test]
fn writable_postgres_under_an_unknown_owner_is_fenced() {
    let mut c = follower_seeing(KeyHolder::Garbage);
    let a = c.handle(t(20), Input::Postgres(PgView::Primary));
    assert!(has(&a, |a| *a == Action::Fence));
}

#[test]
fn leader_whose_postgres_is_down_hands_over() {
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1200), Input::Postgres(PgView::Down));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::PostgresDown,
            fast: None
        }));
    assert!(
        !has(&a, |a| *a == Action::Publish(Evidence::None)),
        "key still ours: pings go on while it is released"
    );
    let a = c.handle(
        t(1300),
        Input::SteppedDown {
            how: "already stopped".into(),
        },
    );
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
}

// ---- PostgreSQL, member records, synchronous mode (moved from the agent)

fn leader_record(node: &str, lsn: Option<u64>) -> Member {
    Member {
        node: node.into(),
        role: "Leader".into(),
        postgres: "primary".into(),
        host: Some("10.0.0.2".into()),
        port: Some(5432),
        lsn,
        watchdog: "required".into(),
        ..Member::default()
    }
}

/// A managed follower with lease 7 that sees `b` lead at revision 3.
fn managed_follower() -> Core {
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(10), b_holds(3, None));
    c
}

#[test]
fn managed_postgres_is_not_eligible_before_the_first_look() {
    let mut c = managed(false);
    assert_eq!(c.eligibility(), Err("PostgreSQL not observed yet"));
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    let a = c.handle(t(10), nobody(5));
    assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })));
    let a = c.handle(t(20), replica(100));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
    assert_eq!(c.eligibility(), Ok(()));
}

#[test]
fn eligibility_within_and_over_the_lag_bound_of_the_leaders_lsn() {
    let mut c = managed_follower();
    c.handle(
        t(20),
        Input::LeaderMember {
            leader: "b".into(),
            member: Some(leader_record("b", Some(5000))),
        },
    );
    c.handle(t(30), replica(4000)); // 1000 behind: the bound itself
    assert_eq!(c.eligibility(), Ok(()));
    c.handle(
        t(35),
        Input::Followed {
            leader: "b".into(),
            ok: true,
        },
    );
    c.handle(t(40), replica(3999)); // 1001 behind
    let why = c.eligibility().unwrap_err().to_string();
    assert!(why.contains("1001 bytes behind"), "{why}");
    // The leader dies (key gone): its last LSN still counts.
    let a = c.handle(t(50), nobody(9));
    assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })), "lagging");
    let a = c.handle(t(60), replica(4500));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "caught up");
    c.handle(
        t(70),
        Input::PgObserved {
            role: PgRole::Down,
            wal: None,
            has_data: false,
        },
    );
    assert_eq!(c.eligibility(), Err("PostgreSQL is down"));
    c.handle(t(80), replica(4500));
    c.handle(
        t(90),
        Input::PgObserveFailed {
            error: "password authentication failed".into(),
        },
    );
    assert!(c.eligibility().unwrap_err().contains("password"));
}

#[test]
fn member_record_is_due_on_change_and_its_lsn_at_the_cadence() {
    let mut c = managed_follower();
    c.handle(t(20), replica(100));
    let a = c.handle(t(500), Input::Tick);
    let me = match a.iter().find(|a| matches!(a, Action::PublishMember(_))) {
        Some(Action::PublishMember(m)) => m.clone(),
        _ => panic!("first record due: {a:?}"),
    };
    assert_eq!(
        (
            me.role.as_str(),
            me.postgres.as_str(),
            me.lsn,
            me.watchdog.as_str()
        ),
        ("Follower", "replica", Some(100), "required")
    );
    assert_eq!(
        (me.host.as_deref(), me.port),
        (Some("10.0.0.1"), Some(5432))
    );
    // Not re-sent while the write is out.
    let a = c.handle(t(1000), Input::Tick);
    assert!(!has(&a, |a| matches!(a, Action::PublishMember(_))));
    c.handle(
        t(1010),
        Input::MemberPublished {
            member: me.clone(),
            ok: true,
        },
    );
    // The LSN moves: not before LSN_EVERY_LOOPS loops.
    c.handle(t(1020), replica(200));
    for i in 0..LSN_EVERY_LOOPS - 1 {
        let a = c.handle(t(1500 + i * 500), Input::Tick);
        assert!(!has(&a, |a| matches!(a, Action::PublishMember(_))), "{i}");
    }
    let a = c.handle(t(20_000), Input::Tick);
    assert!(has(
        &a,
        |a| matches!(a, Action::PublishMember(m) if m.lsn == Some(200))
    ));
    c.handle(
        t(20_010),
        Input::MemberPublished {
            member: me.clone(),
            ok: false,
        },
    );
    // A failed write is retried on the next loop; a change goes at once.
    c.handle(
        t(20_020),
        Input::PgObserved {
            role: PgRole::Down,
            wal: None,
            has_data: false,
        },
    );
    let a = c.handle(t(20_500), Input::Tick);
    assert!(has(
        &a,
        |a| matches!(a, Action::PublishMember(m) if m.postgres == "down")
    ));
}

#[test]
fn member_record_on_a_new_lease_is_due_again() {
    let mut c = managed_follower();
    let a = c.handle(t(500), Input::Tick);
    let Some(Action::PublishMember(me)) = a
        .into_iter()
        .find(|a| matches!(a, Action::PublishMember(_)))
    else {
        panic!("due")
    };
    c.handle(t(510), Input::LeaseGone);
    c.handle(
        t(520),
        Input::LeaseGranted {
            lease: 8,
            sent: t(520),
        },
    );
    // The reply to the write on the old lease does not count.
    c.handle(
        t(530),
        Input::MemberPublished {
            member: me,
            ok: true,
        },
    );
    let a = c.handle(t(1000), Input::Tick);
    assert!(has(&a, |a| matches!(a, Action::PublishMember(_))), "{a:?}");
}

#[test]
fn follow_waits_for_the_leaders_address_and_refreshes_at_the_cadence() {
    let mut c = managed_follower();
    let a = c.handle(
        t(20),
        Input::PgObserved {
            role: PgRole::Down,
            wal: None,
            has_data: false,
        },
    );
    assert_eq!(
        a,
        vec![Action::RefreshLeaderMember { leader: "b".into() }],
        "no follow without the leader's address"
    );
    let a = c.handle(
        t(30),
        Input::PgObserved {
            role: PgRole::Down,
            wal: None,
            has_data: false,
        },
    );
    assert!(a.is_empty(), "one read at a time: {a:?}");
    let a = c.handle(
        t(40),
        Input::LeaderMember {
            leader: "b".into(),
            member: Some(leader_record("b", Some(1))),
        },
    );
    // An empty data directory: the member listing first (`clonefrom`).
    assert_eq!(a, vec![Action::ReadMembers]);
    c.handle(
        t(40),
        Input::MembersSeen {
            members: vec![leader_record("b", Some(1))],
        },
    );
    let a = c.handle(
        t(50),
        Input::PgObserved {
            role: PgRole::Down,
            wal: None,
            has_data: false,
        },
    );
    assert_eq!(
        a,
        vec![Action::Follow {
            leader: "b".into(),
            clone_from: None
        }]
    );
    assert_eq!(c.leader_member().map(|m| m.node.as_str()), Some("b"));
    // While the follow runs, observations read as busy (not eligible).
    c.handle(t(50), replica(1));
    assert_eq!(c.pg_view(), &PgView::Busy);
    assert_eq!(c.eligibility(), Err("rejoin in progress"));
    c.handle(
        t(60),
        Input::Followed {
            leader: "b".into(),
            ok: true,
        },
    );
    c.handle(t(70), replica(1));
    assert_eq!(
        c.pg_view(),
        &PgView::Replica {
            following: Some("b".into())
        }
    );
    // Steady state: the leader's record is re-read every LSN_EVERY_LOOPS loops.
    let mut reads = 0;
    for i in 0..LSN_EVERY_LOOPS * 2 {
        let a = c.handle(t(500 + i * 500), Input::Tick);
        if has(&a, |a| matches!(a, Action::RefreshLeaderMember { .. })) {
            reads += 1;
            c.handle(
                t(501 + i * 500),
                Input::LeaderMember {
                    leader: "b".into(),
                    member: None,
                },
            );
        }
    }
    assert_eq!(reads, 2);
    assert!(
        c.leader_member().is_some(),
        "an absent record keeps the last"
    );
}

#[test]
fn fence_then_follow_from_observations() {
    let mut c = managed_follower();
    c.handle(
        t(15),
        Input::LeaderMember {
            leader: "b".into(),
            member: Some(leader_record("b", None)),
        },
    );
    let a = c.handle(t(20), primary(100));
    assert_eq!(a, vec![Action::Fence]);
    let a = c.handle(
        t(30),
        Input::Fenced {
            ok: true,
            how: "killed".into(),
        },
    );
    assert_eq!(
        a,
        vec![
            Action::Record(Fact::FencedNotLeader {
                holder: KeyHolder::Other("b".into()),
                how: "killed".into(),
                ok: true,
            }),
            Action::Follow {
                leader: "b".into(),
                clone_from: None
            }
        ]
    );
    // A stale observation of the writable server, read while the follow runs.
    let a = c.handle(t(40), primary(100));
    assert!(a.is_empty(), "{a:?}");
}

/// A leader, managed, in synchronous mode (s = 1.0 s).
fn sync_leader() -> Core {
    let mut c = managed(true);
    c.handle(t(0), Input::Start);
    c.handle(t(0), replica(10));
    let a = win_and_promote(&mut c, true);
    assert_eq!(
        a.last(),
        Some(&Action::SetSyncStandbys(String::new())),
        "a fresh primary waits for no standby"
    );
    c.handle(
        t(1000),
        Input::SyncStandbysSet {
            value: String::new(),
            ok: true,
        },
    );
    c.handle(t(1000), primary(20));
    c
}

#[test]
fn sync_names_set_when_standbys_change_and_not_resent_when_equal() {
    // Issue 12: the `sync` key is written before PostgreSQL waits for a
    // standby, and after it stops waiting (decide::sync::next_step).
    use crate::decide::sync::SyncState;
    let mut c = sync_leader();
    let seen = |v: &[&str]| Input::StandbysSeen {
        standbys: v.iter().map(|s| s.to_string()).collect(),
    };
    let written = |c: &mut Core, st: &SyncState| {
        c.handle(
            t(1000),
            Input::SyncWritten {
                state: st.clone(),
                ok: true,
            },
        )
    };
    let none = SyncState::asynchronous("a");
    let b = SyncState {
        leader: "a".into(),
        members: vec!["b".into()],
        quorum: 1,
    };
    // A fresh leader records its (asynchronous) set first.
    assert_eq!(
        c.handle(t(1100), seen(&[])),
        vec![Action::WriteSync(none.clone())]
    );
    let a = written(&mut c, &none);
    assert!(has(&a, |x| matches!(
        x,
        Action::Record(Fact::SyncRecorded { fallback: true, .. })
    )));
    assert!(c.handle(t(1100), seen(&[])).is_empty(), "'' already set");
    assert!(c.handle(t(1100), seen(&["pg_basebackup"])).is_empty());
    let want = r#"FIRST 1 ("b")"#.to_string();
    // b streams before its member record is listed: the listing first.
    assert_eq!(c.handle(t(1150), seen(&["b"])), vec![Action::ReadMembers]);
    assert!(
        c.handle(t(1160), seen(&["b"])).is_empty(),
        "not asked twice for the same"
    );
    c.handle(
        t(1170),
        Input::MembersSeen {
            members: ["a", "b"]
                .iter()
                .map(|n| Member {
                    node: n.to_string(),
                    ..Member::default()
                })
                .collect(),
        },
    );
    // Widening: the key first...
    assert_eq!(
        c.handle(t(1200), seen(&["b"])),
        vec![Action::WriteSync(b.clone())]
    );
    assert!(c.handle(t(1250), seen(&["b"])).is_empty(), "one at a time");
    written(&mut c, &b);
    // ...then PostgreSQL.
    let a = c.handle(t(1260), seen(&["b"]));
    assert_eq!(a, vec![Action::SetSyncStandbys(want.clone())]);
    assert!(c.handle(t(1270), seen(&["b"])).is_empty(), "one at a time");
    c.handle(
        t(1300),
        Input::SyncStandbysSet {
            value: want.clone(),
            ok: true,
        },
    );
    assert!(
        c.handle(t(1400), seen(&["b"])).is_empty(),
        "equal: not re-sent"
    );
    // Narrowing (non-strict fallback): PostgreSQL first, then the key.
    let a = c.handle(t(1500), seen(&[]));
    assert_eq!(a, vec![Action::SetSyncStandbys(String::new())]);
    c.handle(
        t(1510),
        Input::SyncStandbysSet {
            value: String::new(),
            ok: true,
        },
    );
    assert_eq!(
        c.handle(t(1520), seen(&[])),
        vec![Action::WriteSync(none.clone())]
    );
    let a = written(&mut c, &none);
    assert_eq!(
        a,
        vec![Action::Record(Fact::SyncRecorded {
            members: vec![],
            quorum: 0,
            fallback: true
        })]
    );
}

#[test]
fn a_nosync_standby_is_never_made_synchronous_nor_recorded() {
    // Tag nosync: only the leader's listing of the member records says so.
    use crate::decide::sync::SyncState;
    let mut c = sync_leader();
    let rec = |n: &str, nosync: bool| Member {
        node: n.into(),
        tags: member::Tags {
            nosync,
            ..Default::default()
        },
        ..Member::default()
    };
    let seen = |v: &[&str]| Input::StandbysSeen {
        standbys: v.iter().map(|s| s.to_string()).collect(),
    };
    let none = SyncState::asynchronous("a");
    assert_eq!(
        c.handle(t(1100), seen(&["b"])),
        vec![Action::ReadMembers, Action::WriteSync(none.clone())],
        "b unlisted: listed first, asynchronous meanwhile"
    );
    c.handle(
        t(1100),
        Input::SyncWritten {
            state: none.clone(),
            ok: true,
        },
    );
    c.handle(
        t(1110),
        Input::MembersSeen {
            members: vec![rec("a", false), rec("b", true)],
        },
    );
    for i in 0..5 {
        let a = c.handle(t(1200 + i), seen(&["b"]));
        assert!(a.is_empty(), "b is nosync: nothing to change: {a:?}");
    }
    // c streams too, untagged: c is chosen, never b.
    let a = c.handle(t(1300), seen(&["b", "c"]));
    assert_eq!(a, vec![Action::ReadMembers]);
    c.handle(
        t(1310),
        Input::MembersSeen {
            members: vec![rec("a", false), rec("b", true), rec("c", false)],
        },
    );
    let a = c.handle(t(1320), seen(&["b", "c"]));
    let c_only = SyncState {
        leader: "a".into(),
        members: vec!["c".into()],
        quorum: 1,
    };
    assert_eq!(a, vec![Action::WriteSync(c_only)]);
    // A new term lists the members at once (tags may have changed).
    let mut c = sync_leader();
    let a = c.handle(t(1500), Input::Tick);
    assert!(has(&a, |a| *a == Action::ReadMembers), "{a:?}");
}

#[test]
fn sync_names_left_alone_unless_leading_a_primary_in_sync_mode() {
    let standbys = Input::StandbysSeen {
        standbys: vec!["b".into()],
    };
    let mut c = managed_follower();
    assert!(c.handle(t(20), standbys.clone()).is_empty(), "follower");
    let mut c = sync_leader();
    c.handle(
        t(1100),
        Input::PgObserved {
            role: PgRole::Down,
            wal: None,
            has_data: false,
        },
    );
    assert!(
        c.handle(t(1100), standbys.clone()).is_empty(),
        "not primary"
    );
    let mut c = managed(false);
    assert!(c.handle(t(20), standbys).is_empty(), "mode off");
}

#[test]
fn nowayout_devices_are_tracked_in_the_core_only() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    c.handle(
        t(20),
        Input::Armed(ArmOutcome {
            armed: vec![dev("/dev/watchdog0", true), dev("/dev/watchdog1", false)],
            failed: vec![],
        }),
    );
    assert_eq!(c.nowayout_devices(), ["/dev/watchdog0".to_string()]);
    // Re-armed in a later term: listed once.
    c.handle(t(30), Input::Promoted);
    c.handle(t(100), Input::LeaseGone);
    c.handle(t(200), Input::SteppedDown { how: "x".into() });
    c.handle(t(300), Input::Disarmed);
    assert_eq!(c.nowayout_devices(), ["/dev/watchdog0".to_string()]);
    assert!(c.is_armed(), "kept armed, pinged on liveness");
}

#[test]
fn next_deadline_is_the_next_loop_or_a_deadline_before_it() {
    let mut c = core(WatchdogMode::Required);
    assert_eq!(c.next_deadline(), None, "before the first tick: now");
    c.handle(t(0), Input::Start);
    c.handle(t(100), Input::Tick);
    assert_eq!(c.next_deadline(), Some(t(600)), "loop 0.5 s");
    // A leader whose last renewal was at s = 1.0 s: demotion deadline 4.0 s.
    let mut c = leader(WatchdogMode::Required);
    c.handle(t(3800), Input::Tick);
    assert_eq!(
        c.next_deadline(),
        Some(t(4000) + Duration::from_nanos(1)),
        "just past the demotion deadline, before the next loop"
    );
    let a = c.handle(c.next_deadline().unwrap(), Input::Tick);
    assert!(has(&a, |a| matches!(a, Action::StepDown { .. })));
    // Backing off after a refused arm: the end of the back-off.
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    c.handle(
        t(20),
        Input::ArmFailed {
            reason: "stale".into(),
        },
    );
    c.handle(t(4900), Input::Tick);
    assert_eq!(c.next_deadline(), Some(t(5020)), "back-off ends at 5.02 s");
    c.handle(t(5100), Input::Shutdown);
    assert_eq!(c.role(), &Role::Exited);
    assert_eq!(c.next_deadline(), None);
}

#[test]
fn stored_names_are_stable() {
    assert_eq!(StepDownReason::PostgresDown.as_str(), "postgres_down");
    assert_eq!(StepDownReason::KeyLost.as_str(), "key_lost");
    assert_eq!(Role::SteppingDown.as_str(), "SteppingDown");
    assert_eq!(mode_name(WatchdogMode::Automatic), "automatic");
    assert_eq!(PgView::Replica { following: None }.as_str(), "replica");
    for r in [
        Role::Follower,
        Role::Arming,
        Role::Promoting,
        Role::Leader,
        Role::SteppingDown,
        Role::Fenced,
        Role::Exited,
    ] {
        assert_eq!(r.as_str(), format!("{r:?}"), "same words as before");
    }
}

/// Won at 0.2 s on a grant sent at 0.1 s: arming must finish by 1.1 s.
fn arming_core() -> Core {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(100), granted(100));
    let a = c.handle(t(200), Input::Won { revision: 2 });
    assert!(has(&a, |a| *a == Action::Arm { not_after: t(1100) }));
    c
}

#[test]
fn rule2_promotion_rechecks_freshness_after_arming() {
    let mut c = arming_core();
    let a = c.handle(t(1100), armed_ok(false));
    assert!(
        has(&a, |a| *a == Action::Promote),
        "fresh at the bound: {a:?}"
    );
    // Arming took too long: the evidence that permitted its ping is stale.
    let mut c = arming_core();
    let a = c.handle(t(1101), armed_ok(false));
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
    assert!(
        !has(&a, |a| matches!(a, Action::Publish(Evidence::Lease(_)))),
        "{a:?}"
    );
    let none = pos(&a, |a| *a == Action::Publish(Evidence::None));
    let disarm = pos(&a, |a| *a == Action::Disarm);
    let release = pos(&a, |a| *a == Action::Release { lease: 7 });
    assert!(none < disarm && disarm < release, "{a:?}");
    assert_eq!(c.role(), &Role::Follower);
    // Automatic mode, nothing armed: the same check.
    let mut c = core(WatchdogMode::Automatic);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(100), granted(100));
    c.handle(t(200), Input::Won { revision: 2 });
    let a = c.handle(
        t(2000),
        Input::Armed(ArmOutcome {
            armed: vec![],
            failed: vec![("/dev/watchdog0".into(), "gone".into())],
        }),
    );
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
}

#[test]
fn stale_key_events_do_not_unseat_a_leader() {
    // The leader won at revision 2; events older than that were
    // delivered late (the loop read and acquired before polling the watch).
    let mut c = leader(WatchdogMode::Required);
    for holder in [KeyHolder::Nobody, KeyHolder::Other("b".into())] {
        let a = c.handle(
            t(1200),
            Input::KeySeen {
                holder,
                revision: 1,
                lease: None,
            },
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(c.role(), &Role::Leader);
        assert_eq!(c.holder(), &KeyHolder::Us);
    }
    let a = c.handle(t(1300), nobody(3));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::KeyLost,
            fast: None
        }));
}

#[test]
fn a_follower_keeps_the_newest_owner_it_saw() {
    let mut c = follower_seeing(KeyHolder::Other("b".into())); // revision 3
    c.handle(
        t(20),
        Input::KeySeen {
            holder: KeyHolder::Other("c".into()),
            revision: 8,
            lease: None,
        },
    );
    let a = c.handle(t(30), nobody(7));
    assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })), "{a:?}");
    assert_eq!(c.holder(), &KeyHolder::Other("c".into()));
    // A lost lease (an etcd restored from a snapshot runs behind):
    // revisions count again from there.
    c.handle(t(40), Input::LeaseGone);
    c.handle(
        t(50),
        Input::KeySeen {
            holder: KeyHolder::Other("d".into()),
            revision: 2,
            lease: None,
        },
    );
    assert_eq!(c.holder(), &KeyHolder::Other("d".into()));
}

#[test]
fn promoting_keeps_renewing_until_the_outcome_arrives() {
    let mut c = arming_core();
    let a = c.handle(t(300), armed_ok(false));
    assert_eq!(a.last(), Some(&Action::Promote));
    // pg_promote runs off the loop: ticks and renewals go on meanwhile.
    let a = c.handle(t(600), Input::Tick);
    assert!(has(&a, |a| *a == Action::Renew { lease: 7 }), "{a:?}");
    let a = c.handle(t(700), renewed(600));
    assert_eq!(a[0], Action::Publish(Evidence::Lease(t(600))));
    assert_eq!(c.role(), &Role::Promoting);
    c.handle(t(5000), Input::Promoted);
    assert_eq!(c.role(), &Role::Leader);
    // An outcome that arrives after a step-down changes nothing.
    let mut c = arming_core();
    c.handle(t(300), armed_ok(false));
    c.handle(t(400), Input::Shutdown);
    assert_eq!(c.role(), &Role::SteppingDown);
    let a = c.handle(t(500), Input::Promoted);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(c.role(), &Role::SteppingDown);
}

// ---- Rule 8: writable only under a fresh lease

#[test]
fn rule8_at_start_up_before_etcd_answers_a_writable_server_is_fenced() {
    let mut c = managed(false);
    c.handle(t(0), Input::Start); // no lease, no key read: etcd silent
    let a = c.handle(t(10), primary(100));
    assert!(has(&a, |a| *a == Action::Fence), "{a:?}");
    // A broken watch makes the owner unknown again: same.
    let mut c = managed_follower();
    c.handle(t(20), Input::WatchBroken);
    let a = c.handle(t(30), primary(100));
    assert!(has(&a, |a| *a == Action::Fence), "{a:?}");
}

#[test]
fn rule8_nobody_holds_the_key_and_this_node_cannot_race_now() {
    // Backing off after a refused arm: PostgreSQL writable (started by
    // hand) while nobody holds the key.
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), replica(10));
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    c.handle(
        t(20),
        Input::ArmFailed {
            reason: "busy".into(),
        },
    );
    c.handle(
        t(30),
        Input::Released {
            deleted: true,
            revision: Some(9),
        },
    );
    c.handle(t(40), nobody(3));
    let a = c.handle(t(50), primary(100));
    assert!(has(&a, |a| *a == Action::Fence), "{a:?}");
    assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })));
}

#[test]
fn rule8_the_race_for_an_empty_key_is_the_only_grace() {
    // Bootstrap: a primary started before its agent, nobody leads, the
    // node is eligible and races at once; it fences if it loses.
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(0), nobody(1));
    let a = c.handle(t(10), primary(100));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
    assert!(!has(&a, |a| *a == Action::Fence), "{a:?}");
    let a = c.handle(t(20), b_holds(2, None));
    assert!(has(&a, |a| *a == Action::Fence), "lost the race: {a:?}");
    // A race that etcd does not answer is no grace either.
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(0), nobody(1));
    c.handle(t(10), primary(100));
    c.handle(
        t(20),
        Input::AcquireFailed {
            error: "timeout".into(),
        },
    );
    assert_eq!(c.holder(), &KeyHolder::Unknown);
    let a = c.handle(t(500), primary(100));
    assert!(has(&a, |a| *a == Action::Fence), "{a:?}");
    let a = c.handle(t(520), Input::Tick);
    assert!(has(&a, |a| *a == Action::ReadKey), "re-read: {a:?}");
}

#[test]
fn rule8_arming_is_not_leading() {
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), replica(10));
    c.handle(t(0), nobody(1));
    c.handle(t(1000), granted(0));
    // Won on stale evidence: renew first; meanwhile PostgreSQL is writable.
    let a = c.handle(t(1500), Input::Won { revision: 2 });
    assert!(has(&a, |a| matches!(a, Action::Renew { .. })));
    assert_eq!(c.role(), &Role::Arming);
    let a = c.handle(t(1600), primary(100));
    assert!(has(&a, |a| *a == Action::Fence), "{a:?}");
}

/// Inputs a fuzzer may throw at the core, with a time step.
fn any_input() -> impl Strategy<Value = (u64, Input)> {
    let holder = prop_oneof![
        Just(KeyHolder::Nobody),
        Just(KeyHolder::Us),
        Just(KeyHolder::Other("b".into())),
        Just(KeyHolder::Garbage),
    ];
    let input = prop_oneof![
        Just(Input::Tick),
        (0u64..3000).prop_map(|back| Input::LeaseGranted {
            lease: 9,
            sent: BootTime(back)
        }),
        (0u64..3000, -1i64..6).prop_map(|(back, ttl)| Input::Renewed {
            sent: BootTime(back),
            ttl
        }),
        Just(Input::LeaseGone),
        (holder, 0i64..100, proptest::option::of(10i64..13)).prop_map(
            |(holder, revision, lease)| Input::KeySeen {
                holder,
                revision,
                lease
            }
        ),
        (10i64..13, any::<bool>()).prop_map(|(lease, alive)| Input::PreviousLease {
            lease,
            alive,
            ttl: if alive { 3 } else { 0 }
        }),
        (0i64..100).prop_map(|revision| Input::Won { revision }),
        (
            0i64..100,
            proptest::collection::vec(9i64..13, 0..3),
            any::<bool>()
        )
            .prop_map(|(revision, previous, complete)| Input::WonAfter {
                revision,
                previous,
                complete
            }),
        (
            0i64..100,
            proptest::collection::vec(9i64..13, 0..3),
            any::<bool>()
        )
            .prop_map(|(revision, previous, complete)| Input::HoldersRead {
                revision,
                previous,
                complete
            }),
        any::<(bool, bool, bool)>().prop_map(|(ok, fail, nowayout)| Input::Armed(ArmOutcome {
            armed: if ok {
                vec![dev("/dev/watchdog0", nowayout)]
            } else {
                vec![]
            },
            failed: if fail {
                vec![("/dev/watchdog1".into(), "busy".into())]
            } else {
                vec![]
            },
        })),
        Just(Input::Promoted),
        Just(Input::PromoteFailed { reason: "x".into() }),
        Just(Input::SteppedDown {
            how: "immediate".into()
        }),
        Just(Input::FencedByTimer {
            how: "killed".into()
        }),
        any::<bool>().prop_map(|deleted| Input::Released {
            deleted,
            revision: None
        }),
        Just(Input::ReleaseFailed {
            error: "timeout".into()
        }),
        Just(Input::Disarmed),
        Just(Input::Shutdown),
        Just(Input::WatchBroken),
        prop_oneof![
            Just(PgView::Down),
            Just(PgView::Primary),
            Just(PgView::Replica { following: None }),
            Just(PgView::Busy)
        ]
        .prop_map(Input::Postgres),
        (0u64..3, 0u64..10_000).prop_map(|(r, lsn)| match r {
            0 => primary(lsn),
            1 => replica(lsn),
            _ => Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: false,
            },
        }),
        any::<bool>().prop_map(|ok| Input::Fenced {
            ok,
            how: "x".into()
        }),
        (0u64..10_000).prop_map(|lsn| Input::LeaderMember {
            leader: "b".into(),
            member: Some(leader_record("b", Some(lsn)))
        }),
        any::<bool>().prop_map(|b| Input::StandbysSeen {
            standbys: if b { vec!["b".into()] } else { vec![] }
        }),
    ];
    (0u64..1500, input)
}

proptest! {
    /// Whatever arrives in whatever order, the action stream keeps the
    /// orderings of rules 1, 2 and 4.
    #[test]
    fn orderings_hold_under_any_input_sequence(
        mode in prop_oneof![Just(WatchdogMode::Required), Just(WatchdogMode::Automatic)],
        steps in proptest::collection::vec(any_input(), 1..80),
    ) {
        let mut c = core(mode).with_node("a").with_postgres(settings(true));
        let mut now = 10_000u64; // ms
        c.handle(t(now), Input::Start);
        // What the drivers would know:
        let mut arm_ok_since_won = false; // an Armed satisfying rule 2 since the last Won
        let mut pg_may_write = false;     // Promote emitted, no confirmed stop since
        // A deletion is not an expiry: every other holder's lease seen and
        // not confirmed gone, the ones a win waits for, and the newest key
        // revision.
        let (mut owed, mut awaited, mut key_rev) =
            (std::collections::BTreeSet::<i64>::new(), std::collections::BTreeSet::<i64>::new(), 0i64);
        // A win over an incomplete history promotes only T + 1.5 s after it.
        let mut promote_not_before = 0u64;
        for (dt, mut input) in steps {
            now += dt;
            // Send times lie in the past.
            match &mut input {
                Input::LeaseGranted { sent, .. } | Input::Renewed { sent, .. } => {
                    *sent = t(now.saturating_sub(sent.0));
                }
                _ => {}
            }
            let role_before = c.role().clone();
            if let Input::Won { .. } | Input::WonAfter { .. } | Input::HoldersRead { .. } = input { arm_ok_since_won = false; }
            if let Input::Armed(o) = &input {
                if role_before == Role::Arming && arm_before_promote(mode, o).is_ok() {
                    arm_ok_since_won = true;
                }
            }
            if matches!(input, Input::SteppedDown { .. } | Input::FencedByTimer { .. })
                && matches!(role_before, Role::SteppingDown | Role::Arming | Role::Promoting | Role::Leader)
            {
                pg_may_write = false;
            }
            match &input {
                Input::KeySeen { holder, revision, lease } if !(*revision > 0 && *revision < key_rev) => {
                    key_rev = key_rev.max(*revision);
                    if let (true, Some(l)) = (*holder != KeyHolder::Us, lease) {
                        owed.insert(*l);
                    }
                }
                Input::Won { revision } if role_before == Role::Follower && c.lease().is_some() => {
                    key_rev = key_rev.max(*revision);
                    awaited = owed.clone();
                    promote_not_before = 0;
                }
                // A history read after the key was found on our lease is a
                // win too (if the core still takes it).
                Input::WonAfter { revision, previous, complete }
                | Input::HoldersRead { revision, previous, complete }
                    if role_before == Role::Follower && c.lease().is_some() =>
                {
                    key_rev = key_rev.max(*revision);
                    owed.extend(previous.iter().copied().filter(|l| Some(*l) != c.lease()));
                    awaited = owed.clone();
                    promote_not_before = if *complete { 0 } else { now + 6500 };
                }
                Input::LeaseGone => key_rev = 0,
                Input::Renewed { ttl, .. } if *ttl <= 0 => key_rev = 0,
                Input::PreviousLease { lease, alive: false, .. } => {
                    owed.remove(lease);
                    awaited.remove(lease);
                }
                _ => {}
            }
            let actions = c.handle(t(now), input);
            for a in &actions {
                match a {
                    Action::Promote => {
                        prop_assert!(awaited.is_empty(), "promote before every previous lease is gone: {actions:?}");
                        prop_assert!(now >= promote_not_before, "promote on an incomplete history: {actions:?}");
                        prop_assert!(arm_ok_since_won, "rule 2: promote without arming: {actions:?}");
                        prop_assert!(
                            c.last_fresh().is_some_and(|s| timing::ping_permitted(t(now), s, &c.cfg.budget)),
                            "rule 2: promote on stale evidence: {actions:?}"
                        );
                        pg_may_write = true;
                    }
                    Action::Disarm => {
                        prop_assert!(!pg_may_write, "rule 4: disarm while PostgreSQL may write: {actions:?}");
                    }
                    Action::Arm { not_after } => {
                        prop_assert!(*not_after >= t(now), "rule 1: arming on stale evidence");
                    }
                    Action::Follow { .. } => {
                        prop_assert!(c.pg_view() != &PgView::Primary, "follow of a writable server: {actions:?}");
                    }
                    Action::Fence => {
                        prop_assert!(!matches!(c.role(), Role::Promoting | Role::Leader), "fence while leading");
                    }
                    Action::Publish(Evidence::Lease(s)) => {
                        prop_assert!(*s <= t(now));
                        prop_assert!(
                            matches!(c.role(), Role::Promoting | Role::Leader | Role::SteppingDown | Role::Fenced),
                            "lease evidence published outside leadership: {:?}", c.role()
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A follower that saw "b" hold the key on lease 42, then its deletion
/// (`etcdctl del`: the watch's previous value names lease 42), races and wins.
fn won_after_a_deletion(at: u64) -> (Core, Vec<Action>) {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(
        t(0),
        Input::LeaseGranted {
            lease: 7,
            sent: t(at),
        },
    );
    c.handle(t(at), b_holds(3, Some(42)));
    let a = c.handle(
        t(at),
        Input::KeySeen {
            holder: KeyHolder::Nobody,
            revision: 4,
            lease: Some(42),
        },
    );
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }));
    let a = c.handle(t(at), Input::Won { revision: 5 });
    assert!(has(&a, |a| *a
        == Action::Record(Fact::AwaitingPreviousLease { lease: 42 })));
    assert!(
        has(&a, |a| matches!(a, Action::Arm { .. })),
        "arming proceeds: {a:?}"
    );
    let a = c.handle(t(at), armed_ok(false));
    (c, a)
}

#[test]
fn deletion_is_not_an_expiry_promotion_waits_for_the_previous_lease() {
    let (mut c, a) = won_after_a_deletion(1000);
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
    assert!(
        has(&a, |a| *a == Action::CheckLeaseGone { lease: 42 }),
        "{a:?}"
    );
    assert!(has(&a, |a| matches!(
        a,
        Action::Publish(Evidence::Lease(_))
    )));
    assert_eq!(c.role(), &Role::Promoting);
    // Still alive: wait, renewing, and ask again at the next loop.
    let a = c.handle(
        t(1010),
        Input::PreviousLease {
            lease: 42,
            alive: true,
            ttl: 4,
        },
    );
    assert!(a.is_empty(), "{a:?}");
    let a = c.handle(t(1500), Input::Tick);
    assert!(has(&a, |a| *a == Action::Renew { lease: 7 }));
    assert!(
        pos(&a, |a| *a == Action::Renew { lease: 7 })
            < pos(&a, |a| *a == Action::CheckLeaseGone { lease: 42 })
    );
    c.handle(t(1510), renewed(1500));
    // Gone (its holder revoked it after its confirmed stop): promote.
    let a = c.handle(
        t(1520),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(has(&a, |a| *a
        == Action::Record(Fact::PreviousLeaseGone {
            lease: 42,
            waited: ms(520)
        })));
    assert_eq!(a.last(), Some(&Action::Promote), "{a:?}");
}

#[test]
fn a_win_after_no_other_holder_promotes_at_once() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(0), nobody(1));
    c.handle(t(0), Input::Won { revision: 2 });
    let a = c.handle(t(0), armed_ok(false));
    assert_eq!(a.last(), Some(&Action::Promote));
    assert!(!has(&a, |a| matches!(a, Action::CheckLeaseGone { .. })));
}

#[test]
fn previous_lease_gone_on_stale_evidence_waits_for_a_fresh_renewal() {
    let (mut c, _) = won_after_a_deletion(1000);
    // M - R = 1 s: at 2.2 s the evidence of 1.0 s is stale.
    let a = c.handle(
        t(2200),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
    let a = c.handle(t(2300), renewed(2250));
    assert_eq!(a[0], Action::Publish(Evidence::Lease(t(2250))));
    assert_eq!(a.last(), Some(&Action::Promote), "{a:?}");
}

#[test]
fn previous_lease_alive_past_t_plus_slack_gives_the_key_back_unpromoted() {
    let (mut c, _) = won_after_a_deletion(1000);
    let mut now = 1000;
    while now < 8000 {
        now += 400;
        c.handle(t(now), Input::Tick);
        c.handle(
            t(now + 5),
            Input::Renewed {
                sent: t(now),
                ttl: 5,
            },
        );
        let a = c.handle(
            t(now + 10),
            Input::PreviousLease {
                lease: 42,
                alive: true,
                ttl: 4,
            },
        );
        // T + EXPIRY_SLACK = 6.5 s after the win at 1.0 s.
        if now + 10 <= 7500 {
            assert!(a.is_empty(), "at {now}: {a:?}");
        } else {
            assert!(has(&a, |a| *a
                == Action::Record(Fact::PreviousLeaseAlive {
                    lease: 42,
                    ttl: 4
                })));
            assert!(has(&a, |a| *a == Action::Disarm));
            assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
            assert!(!has(&a, |a| *a == Action::Promote));
            assert_eq!(c.role(), &Role::Follower);
            return;
        }
    }
    panic!("never gave the key back");
}

/// A follower with lease 7 (granted at 1.0 s) that saw each `(node, lease)`
/// hold the key in turn, each deleted (by hand or by its own release)
/// before the next won, and then wins itself.
fn won_after_deletions(holders: &[(&str, i64)]) -> (Core, Vec<Action>) {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(1000));
    let mut rev = 2;
    for (i, (node, lease)) in holders.iter().enumerate() {
        let at = t(1000 + i as u64);
        rev += 1;
        c.handle(
            at,
            Input::KeySeen {
                holder: KeyHolder::Other((*node).into()),
                revision: rev,
                lease: Some(*lease),
            },
        );
        rev += 1;
        c.handle(
            at,
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: rev,
                lease: Some(*lease),
            },
        );
    }
    let a = c.handle(t(1100), Input::Won { revision: rev + 1 });
    (c, a)
}

fn awaiting(a: &[Action]) -> Vec<i64> {
    a.iter()
        .filter_map(|a| match a {
            Action::Record(Fact::AwaitingPreviousLease { lease }) => Some(*lease),
            _ => None,
        })
        .collect()
}

fn checks(a: &[Action]) -> Vec<i64> {
    a.iter()
        .filter_map(|a| match a {
            Action::CheckLeaseGone { lease } => Some(*lease),
            _ => None,
        })
        .collect()
}

/// Issue 10 item 7's chain (simulation seed 33): a's key is deleted by
/// hand; b wins, waits for a, gives up and releases (its key deleted with
/// lease 43, 43 revoked at once). The next winner waits for both leases,
/// not only the last one: 43 gone does not promote while 42 lives.
#[test]
fn deletion_is_not_an_expiry_chained_deletions_the_winner_waits_for_every_lease() {
    let (mut c, a) = won_after_deletions(&[("a", 42), ("b", 43)]);
    assert_eq!(awaiting(&a), vec![42, 43], "{a:?}");
    let a = c.handle(t(1110), armed_ok(false));
    assert_eq!(checks(&a), vec![42, 43], "{a:?}");
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
    // b's lease is gone at once (revoked with its release): not enough.
    let a = c.handle(
        t(1120),
        Input::PreviousLease {
            lease: 43,
            alive: false,
            ttl: 0,
        },
    );
    assert!(has(&a, |a| *a
        == Action::Record(Fact::PreviousLeaseGone {
            lease: 43,
            waited: ms(20)
        })));
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
    assert!(checks(&a).is_empty(), "{a:?}");
    // a's lease is still alive; 43, confirmed gone, is not asked again.
    let a = c.handle(
        t(1130),
        Input::PreviousLease {
            lease: 42,
            alive: true,
            ttl: 4,
        },
    );
    assert!(a.is_empty(), "{a:?}");
    let a = c.handle(t(1500), Input::Tick);
    assert_eq!(checks(&a), vec![42], "{a:?}");
    c.handle(t(1510), renewed(1500));
    let a = c.handle(
        t(1520),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert_eq!(a.last(), Some(&Action::Promote), "{a:?}");
}

/// A lease confirmed gone leaves the owed set in any role (here a late
/// answer to a follower): the next win does not wait for it again.
#[test]
fn previous_lease_confirmed_gone_is_not_awaited_again() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(1000));
    for (rev, holder) in [(3, KeyHolder::Other("b".into())), (4, KeyHolder::Nobody)] {
        c.handle(
            t(1000),
            Input::KeySeen {
                holder,
                revision: rev,
                lease: Some(42),
            },
        );
    }
    let a = c.handle(
        t(1010),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(a.is_empty(), "{a:?}");
    let a = c.handle(t(1020), Input::Won { revision: 5 });
    assert!(awaiting(&a).is_empty(), "{a:?}");
    let a = c.handle(t(1030), armed_ok(false));
    assert!(checks(&a).is_empty(), "{a:?}");
    assert_eq!(a.last(), Some(&Action::Promote), "{a:?}");
}

/// A lease that outlived the wait (the key given back unpromoted) stays
/// owed: this node's next win waits for it again, however long after it
/// was last seen on the key.
#[test]
fn previous_lease_alive_after_a_give_back_is_still_awaited_at_the_next_win() {
    let (mut c, _) = won_after_a_deletion(1000);
    let mut now = 1000;
    loop {
        now += 400;
        assert!(now < 8000, "never gave the key back");
        c.handle(t(now), Input::Tick);
        c.handle(
            t(now + 5),
            Input::Renewed {
                sent: t(now),
                ttl: 5,
            },
        );
        let a = c.handle(
            t(now + 10),
            Input::PreviousLease {
                lease: 42,
                alive: true,
                ttl: 4,
            },
        );
        if has(&a, |a| *a == Action::Release { lease: 7 }) {
            break;
        }
    }
    assert_eq!(c.role(), &Role::Follower);
    c.handle(
        t(now + 20),
        Input::Released {
            deleted: true,
            revision: Some(10),
        },
    );
    c.handle(t(now + 30), Input::Disarmed);
    // Past the back-off (one TTL), the key is free again: win it.
    let later = now + 6000;
    c.handle(
        t(later),
        Input::Renewed {
            sent: t(later),
            ttl: 5,
        },
    );
    let a = c.handle(
        t(later),
        Input::KeySeen {
            holder: KeyHolder::Nobody,
            revision: 11,
            lease: Some(7),
        },
    );
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
    let a = c.handle(t(later), Input::Won { revision: 12 });
    assert_eq!(awaiting(&a), vec![42], "{a:?}");
    let a = c.handle(t(later), armed_ok(false));
    assert_eq!(checks(&a), vec![42], "{a:?}");
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
}

/// The owed set is bounded: past `OWED_LEASES_CAP` leases, the one seen on
/// the key longest ago is forgotten and a win no longer waits for it.
#[test]
fn owed_previous_leases_are_capped_forgetting_the_one_seen_longest_ago() {
    let names: Vec<String> = (0..=OWED_LEASES_CAP).map(|i| format!("n{i}")).collect();
    let holders: Vec<(&str, i64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), 100 + i as i64))
        .collect();
    let (_, a) = won_after_deletions(&holders);
    let want: Vec<i64> = (101..=100 + OWED_LEASES_CAP as i64).collect();
    assert_eq!(awaiting(&a), want, "{a:?}");
}

#[test]
fn old_leader_revokes_its_lease_after_a_confirmed_step_down_on_key_lost() {
    let mut c = leader(WatchdogMode::Required);
    // `etcdctl del` of our key while we lead.
    let a = c.handle(
        t(1100),
        Input::KeySeen {
            holder: KeyHolder::Nobody,
            revision: 9,
            lease: Some(7),
        },
    );
    assert_eq!(a[0], Action::Publish(Evidence::None));
    assert!(
        !has(&a, |a| matches!(a, Action::Revoke { .. })),
        "not before the stop: {a:?}"
    );
    let a = c.handle(
        t(1200),
        Input::SteppedDown {
            how: "immediate".into(),
        },
    );
    let confirmed = pos(&a, |a| {
        matches!(a, Action::Record(Fact::StepDownConfirmed { .. }))
    });
    let revoke = pos(&a, |a| *a == Action::Revoke { lease: 7 });
    assert!(confirmed < revoke, "{a:?}");
    assert!(has(&a, |a| *a == Action::Disarm));
    assert_eq!(c.lease(), None);
    // A new lease next loop; no renewal of the revoked one.
    c.handle(t(1250), Input::Disarmed);
    let a = c.handle(t(1700), Input::Tick);
    assert!(has(&a, |a| *a == Action::Grant), "{a:?}");
    assert!(!has(&a, |a| matches!(a, Action::Renew { .. })));
}

#[test]
fn rule8_fence_is_recorded_as_fenced_not_leader() {
    let mut c = managed_follower();
    let a = c.handle(t(20), primary(100));
    assert!(has(&a, |a| *a == Action::Fence), "{a:?}");
    let a = c.handle(
        t(30),
        Input::Fenced {
            ok: true,
            how: "PostgreSQL stopped (immediate)".into(),
        },
    );
    assert_eq!(
        a[0],
        Action::Record(Fact::FencedNotLeader {
            holder: KeyHolder::Other("b".into()),
            how: "PostgreSQL stopped (immediate)".into(),
            ok: true,
        })
    );
}

fn release_failed(c: &mut Core, at: u64) -> Vec<Action> {
    c.handle(
        t(at),
        Input::ReleaseFailed {
            error: "etcd: release timed out".into(),
        },
    )
}

/// Issue 10 item 10: a follower whose release (after a refused arming) goes
/// unanswered retried nothing and renewed the lease holding the key
/// forever: the scope had no leader until a restart. Now the release is
/// retried every loop, and after `RELEASE_ATTEMPTS` the lease is let go.
#[test]
fn an_unanswered_release_is_retried_each_loop_then_the_lease_is_let_go() {
    let mut c = core(WatchdogMode::Required);
    c.handle(t(0), Input::Start);
    c.handle(t(0), nobody(1));
    c.handle(t(0), granted(0));
    c.handle(t(10), Input::Won { revision: 2 });
    let a = c.handle(
        t(20),
        Input::Armed(ArmOutcome {
            armed: vec![],
            failed: vec![("/dev/watchdog0".into(), "busy".into())],
        }),
    );
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
    let mut now = 20;
    for attempt in 1..RELEASE_ATTEMPTS {
        let a = release_failed(&mut c, now + 5);
        assert_eq!(
            a,
            vec![Action::Record(Fact::ReleaseFailed {
                error: "etcd: release timed out".into(),
                attempts: attempt,
                abandoned: false,
            })]
        );
        now += 500;
        let a = c.handle(t(now), Input::Tick);
        assert!(
            has(&a, |a| *a == Action::Release { lease: 7 }),
            "retried: {a:?}"
        );
    }
    let a = release_failed(&mut c, now + 5);
    assert!(has(&a, |a| *a
        == Action::Record(Fact::ReleaseFailed {
            error: "etcd: release timed out".into(),
            attempts: RELEASE_ATTEMPTS,
            abandoned: true,
        })));
    assert!(has(&a, |a| *a == Action::Revoke { lease: 7 }), "{a:?}");
    assert_eq!(c.lease(), None);
    // The key's lease is no longer renewed: it expires if the revoke is
    // not answered either. A new lease for this node.
    let a = c.handle(t(now + 500), Input::Tick);
    assert!(has(&a, |a| *a == Action::Grant), "{a:?}");
    assert!(!has(&a, |a| matches!(
        a,
        Action::Renew { .. } | Action::Release { .. }
    )));
}

/// The same for a leader's release after its step-down: it lets the lease
/// go, stops pinging, takes no new lease, and disarms only once the key
/// has surely expired (rule 4).
#[test]
fn a_fenced_leader_that_cannot_release_lets_its_lease_expire_before_disarming() {
    let mut c = leader(WatchdogMode::Required);
    c.handle(t(1100), Input::Shutdown);
    let a = c.handle(
        t(1200),
        Input::SteppedDown {
            how: "immediate".into(),
        },
    );
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
    let mut now = 1200;
    for _ in 1..RELEASE_ATTEMPTS {
        release_failed(&mut c, now + 5);
        now += 500;
        let a = c.handle(t(now), Input::Tick);
        assert!(has(&a, |a| *a == Action::Release { lease: 7 }), "{a:?}");
    }
    let a = release_failed(&mut c, now + 5);
    assert!(has(&a, |a| *a == Action::Publish(Evidence::None)));
    assert!(has(&a, |a| *a == Action::Revoke { lease: 7 }), "{a:?}");
    assert!(!has(&a, |a| *a == Action::Disarm), "not before the expiry");
    let a = c.handle(t(now + 500), Input::Tick);
    assert!(
        !has(&a, |a| matches!(
            a,
            Action::Grant | Action::Renew { .. } | Action::Release { .. } | Action::Disarm
        )),
        "{a:?}"
    );
    // s = 1.0 s, T = 5 s: surely expired after 7.5 s.
    let a = c.handle(t(7600), Input::Tick);
    assert!(has(&a, |a| *a == Action::Disarm), "{a:?}");
}

/// While a won key waits for the previous holder's lease, rule 3 still
/// holds: renewals that stop coming end in a step-down at `s + T - M`,
/// never in a promotion.
#[test]
fn waiting_for_the_previous_lease_without_renewals_steps_down_at_the_deadline() {
    let (mut c, _) = won_after_a_deletion(1000);
    // s = 1.0 s, T - M = 3 s: past 4.0 s the loop steps down.
    let a = c.handle(t(3900), Input::Tick);
    assert!(has(&a, |a| *a == Action::CheckLeaseGone { lease: 42 }));
    let a = c.handle(t(4001), Input::Tick);
    assert!(has(&a, |a| matches!(
        a,
        Action::StepDown {
            reason: StepDownReason::Deadline,
            fast: None
        }
    )));
    assert!(!has(&a, |a| *a == Action::Promote));
    let a = c.handle(
        t(4010),
        Input::PreviousLease {
            lease: 42,
            alive: false,
            ttl: 0,
        },
    );
    assert!(!has(&a, |a| *a == Action::Promote), "{a:?}");
}

fn down(has_data: bool) -> Input {
    Input::PgObserved {
        role: PgRole::Down,
        wal: None,
        has_data,
    }
}

fn starts(a: &[Action]) -> Vec<Option<String>> {
    a.iter()
        .filter_map(|a| match a {
            Action::StartStandby { leader } => Some(leader.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_shutdown_step_down_tries_a_fast_stop_bounded_by_the_demotion_deadline() {
    // s = 1.0 s, T - M = 3 s: deadline 4.0 s; request timeout 0.4 s.
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1500), Input::Shutdown);
    let fast = a.iter().find_map(|a| match a {
        Action::StepDown { reason, fast } => Some((reason.clone(), *fast)),
        _ => None,
    });
    assert_eq!(fast, Some((StepDownReason::Shutdown, Some(ms(2100)))));
    // Stale evidence (past s + M - R): no time for a fast stop, the fence.
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(2100), Input::Shutdown);
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::Shutdown,
            fast: None
        }));
    // Every other reason is the fence.
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1200), Input::Postgres(PgView::Down));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::PostgresDown,
            fast: None
        }));
    // Key gone before SIGTERM: someone else may promote, the fence.
    let mut c = leader(WatchdogMode::Required);
    c.handle(t(1200), b_holds(9, None));
    let a = c.handle(t(1300), Input::Shutdown);
    assert!(!has(&a, |a| matches!(
        a,
        Action::StepDown { fast: Some(_), .. }
    )));
}

#[test]
fn a_stopped_server_with_data_starts_as_a_standby_of_nobody_and_is_then_eligible() {
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(t(10), nobody(3));
    // Down without a cluster in the data directory: nothing to start.
    assert!(starts(&c.handle(t(20), down(false))).is_empty());
    // Down with one: started as a standby of nobody, once.
    assert_eq!(starts(&c.handle(t(30), down(true))), vec![None]);
    assert!(
        starts(&c.handle(t(40), down(true))).is_empty(),
        "one at a time"
    );
    assert_eq!(c.eligibility(), Err("rejoin in progress"));
    c.handle(t(50), Input::StandbyStarted { ok: true });
    // A running replica with no known leader LSN is eligible: it races.
    let a = c.handle(t(60), replica(100));
    assert_eq!(c.eligibility(), Ok(()));
    assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }));
}

#[test]
fn a_failed_standby_start_is_retried_after_a_back_off() {
    let mut c = managed_follower();
    c.handle(
        t(10),
        Input::KeySeen {
            holder: KeyHolder::Unknown,
            revision: 4,
            lease: None,
        },
    );
    assert_eq!(starts(&c.handle(t(20), down(true))), vec![None]);
    c.handle(t(30), Input::StandbyStarted { ok: false });
    // START_BACKOFF_LOOPS * 0.5 s = 5 s.
    assert!(starts(&c.handle(t(4000), down(true))).is_empty());
    assert_eq!(starts(&c.handle(t(5030), down(true))), vec![None]);
}

#[test]
fn a_follower_whose_server_stopped_restarts_it_as_a_standby_of_the_known_leader() {
    let mut c = managed_follower();
    c.handle(
        t(20),
        Input::LeaderMember {
            leader: "b".into(),
            member: Some(leader_record("b", Some(5000))),
        },
    );
    // Down and never followed: the Follow (rewind, start) comes first.
    let a = c.handle(t(25), down(true));
    assert!(has(&a, |a| *a
        == Action::Follow {
            leader: "b".into(),
            clone_from: None
        }));
    assert!(starts(&a).is_empty());
    c.handle(
        t(30),
        Input::Followed {
            leader: "b".into(),
            ok: true,
        },
    );
    c.handle(t(40), replica(4000));
    // Crashed or stopped behind the agent's back: the Follow is done, so
    // only a start brings it back, as b's standby.
    assert_eq!(starts(&c.handle(t(50), down(true))), vec![Some("b".into())]);
}

#[test]
fn nothing_starts_a_server_while_this_node_leads_or_shuts_down() {
    // A leader whose server is down hands over (rule 3's fence): no start.
    let mut c = leader(WatchdogMode::Required);
    let a = c.handle(t(1200), down(true));
    assert!(starts(&a).is_empty());
    // Shutting down: nothing starts either.
    let mut c = managed_follower();
    c.handle(t(15), Input::Shutdown);
    assert!(starts(&c.handle(t(20), down(true))).is_empty());
}

#[test]
fn no_follow_starts_while_a_standby_start_runs() {
    let mut c = managed(false);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(
        t(10),
        Input::KeySeen {
            holder: KeyHolder::Unknown,
            revision: 3,
            lease: None,
        },
    );
    assert_eq!(starts(&c.handle(t(20), down(true))), vec![None]);
    // The leader shows up while pg_ctl start runs: no Follow beside it.
    c.handle(t(30), b_holds(4, None));
    let a = c.handle(
        t(40),
        Input::LeaderMember {
            leader: "b".into(),
            member: Some(leader_record("b", Some(5000))),
        },
    );
    assert!(!has(&a, |a| matches!(a, Action::Follow { .. })), "{a:?}");
    c.handle(t(50), Input::StandbyStarted { ok: true });
    // Running as a standby of nobody: now it follows b (rewind if needed).
    let a = c.handle(t(60), replica(4900));
    assert!(has(&a, |a| *a
        == Action::Follow {
            leader: "b".into(),
            clone_from: None
        }));
}

/// An `Acquire` that timed out but that etcd applied: a follower that then
/// sees the key on its own current lease takes it as the win it asked for
/// (not renewing a key it never leads); one that may no longer race gives
/// it back.
#[test]
fn follower_seeing_its_own_key_wins_or_releases() {
    let raced = || {
        let mut c = core(WatchdogMode::Required);
        c.handle(t(0), Input::Start);
        c.handle(t(0), granted(0));
        let a = c.handle(t(10), nobody(5));
        assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }));
        c.handle(
            t(1010),
            Input::AcquireFailed {
                error: "timeout".into(),
            },
        );
        c
    };
    let own = Input::KeySeen {
        holder: KeyHolder::Us,
        revision: 6,
        lease: Some(7),
    };

    let mut c = raced();
    let a = c.handle(t(1020), own.clone());
    assert!(has(&a, |a| matches!(
        a,
        Action::ReadHolders { before: 6, .. }
    )));
    let a = c.handle(
        t(1030),
        Input::HoldersRead {
            revision: 6,
            previous: vec![],
            complete: true,
        },
    );
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::Acquired {
            lease: 7,
            revision: 6,
            ..
        })
    )));
    assert_eq!(c.role(), &Role::Arming);
    assert!(!has(&a, |a| matches!(a, Action::Release { .. })));

    let mut c = raced();
    c.handle(
        t(1015),
        Input::Eligibility {
            eligible: false,
            reason: "lag".into(),
        },
    );
    let a = c.handle(t(1020), own);
    assert!(has(&a, |a| *a == Action::Release { lease: 7 }));
    assert_eq!(c.role(), &Role::Follower);
}

/// A fenced leader that inferred its key gone by expiry (renewals
/// unanswered) while etcd in fact kept the lease (a new etcd leader renews
/// every lease): as a follower it re-reads the key, and finding it still
/// its own it wins it again or gives it back, never sits on it.
#[test]
fn fenced_leader_rereads_a_key_inferred_gone_and_does_not_sit_on_it() {
    let mut c = leader(WatchdogMode::Required);
    c.handle(t(4001), Input::Tick); // deadline step-down
    c.handle(
        t(4100),
        Input::SteppedDown {
            how: "immediate".into(),
        },
    );
    let a = c.handle(t(7600), Input::Tick);
    assert!(has(&a, |a| *a == Action::Disarm), "{a:?}");
    c.handle(t(7600), Input::Disarmed);
    assert_eq!(c.role(), &Role::Follower);
    let a = c.handle(t(8100), Input::Tick);
    assert!(has(&a, |a| *a == Action::ReadKey), "{a:?}");
    let a = c.handle(
        t(8110),
        Input::KeySeen {
            holder: KeyHolder::Us,
            revision: 2,
            lease: Some(7),
        },
    );
    if !has(&a, |a| *a == Action::Release { lease: 7 }) {
        // Taken as a win once the key's history is read.
        assert!(
            has(&a, |a| matches!(a, Action::ReadHolders { before: 2, .. })),
            "{a:?}"
        );
        let a = c.handle(
            t(8120),
            Input::HoldersRead {
                revision: 2,
                previous: vec![],
                complete: true,
            },
        );
        assert!(
            has(&a, |a| matches!(
                a,
                Action::Record(Fact::Acquired { lease: 7, .. })
            )),
            "{a:?}"
        );
    }
}

// --- issue 12: the race for an empty key checks the candidates first ---

fn candidate_follower(node: &str, sync: bool, lsn: u64) -> Core {
    let mut pgs = settings(sync);
    pgs.sync.check_candidates = true;
    let mut c = core(WatchdogMode::Required)
        .with_node(node)
        .with_postgres(pgs);
    c.handle(t(0), Input::Start);
    c.handle(t(0), granted(0));
    c.handle(
        t(10),
        Input::KeySeen {
            holder: KeyHolder::Other("a".into()),
            revision: 3,
            lease: Some(5),
        },
    );
    c.handle(t(20), replica(lsn));
    c
}

fn vacancy(c: &mut Core, at: u64) -> Vec<Action> {
    c.handle(
        t(at),
        Input::KeySeen {
            holder: KeyHolder::Nobody,
            revision: 9,
            lease: Some(5),
        },
    )
}

fn peer(node: &str, lsn: u64) -> Member {
    Member {
        node: node.into(),
        role: "Follower".into(),
        postgres: "replica".into(),
        host: Some("127.0.0.1".into()),
        port: Some(5432),
        lsn: Some(lsn),
        watchdog: "required".into(),
        ..Default::default()
    }
}

fn acquires(a: &[Action]) -> bool {
    has(a, |x| matches!(x, Action::Acquire { .. }))
}

#[test]
fn an_asynchronous_standby_outside_the_sync_key_never_races() {
    use crate::decide::sync::SyncState;
    let mut c = candidate_follower("c", true, 900);
    let a = vacancy(&mut c, 100);
    assert!(has(&a, |x| *x == Action::ReadCandidates), "{a:?}");
    assert!(!acquires(&a), "no race before the candidates are read");
    let rec = SyncState {
        leader: "a".into(),
        members: vec!["b".into()],
        quorum: 1,
    };
    let cands = |rec: &SyncState| Input::Candidates {
        sync: Some(rec.clone()),
        members: vec![(peer("b", 100), 50)],
        ok: true,
    };
    let a = c.handle(t(110), cands(&rec));
    assert!(!acquires(&a), "{a:?}");
    assert!(
        has(
            &a,
            |x| matches!(x, Action::Record(Fact::RaceHeld { deferred: false, reason }) if reason.contains("not in the synchronous set"))
        ),
        "{a:?}"
    );
    // Held at every loop, re-read each time, recorded once.
    for i in 1..5 {
        let a = c.handle(t(100 + i * 500), Input::Tick);
        assert!(has(&a, |x| *x == Action::ReadCandidates), "{a:?}");
        let a = c.handle(t(110 + i * 500), cands(&rec));
        assert!(a.is_empty(), "{a:?}");
    }
    // A writable server gets no rule-8 grace while held.
    let a = c.handle(
        t(3000),
        Input::PgObserved {
            role: PgRole::Primary,
            wal: None,
            has_data: true,
        },
    );
    assert!(has(&a, |x| *x == Action::Fence), "{a:?}");
}

#[test]
fn the_recorded_synchronous_standby_races_at_once() {
    use crate::decide::sync::SyncState;
    let mut c = candidate_follower("b", true, 100);
    vacancy(&mut c, 100);
    let a = c.handle(
        t(110),
        Input::Candidates {
            sync: Some(SyncState {
                leader: "a".into(),
                members: vec!["b".into()],
                quorum: 1,
            }),
            members: vec![(peer("c", 900), 50)],
            ok: true,
        },
    );
    assert!(acquires(&a), "{a:?}");
    // An unanswered read is no permission: asked again at the next loop.
    let mut c = candidate_follower("b", true, 100);
    vacancy(&mut c, 100);
    let a = c.handle(
        t(110),
        Input::Candidates {
            sync: None,
            members: vec![],
            ok: false,
        },
    );
    assert!(!acquires(&a));
    let a = c.handle(t(600), Input::Tick);
    assert!(has(&a, |x| *x == Action::ReadCandidates), "{a:?}");
}

#[test]
fn a_follower_behind_defers_its_race_for_a_bounded_time() {
    let mut c = candidate_follower("b", false, 100);
    vacancy(&mut c, 1000);
    let behind = || Input::Candidates {
        sync: None,
        members: vec![(peer("c", 150), 50)],
        ok: true,
    };
    let a = c.handle(t(1010), behind());
    assert!(!acquires(&a));
    assert!(
        has(&a, |x| matches!(
            x,
            Action::Record(Fact::RaceHeld { deferred: true, .. })
        )),
        "{a:?}"
    );
    // Within the defer (3 s by default): still held.
    c.handle(t(3000), Input::Tick);
    assert!(!acquires(&c.handle(t(3010), behind())));
    // Past it: races anyway (the furthest had its chance).
    let a = c.handle(t(4020), Input::Tick);
    assert!(has(&a, |x| *x == Action::ReadCandidates), "{a:?}");
    let a = c.handle(t(4030), behind());
    assert!(acquires(&a), "{a:?}");
    // The furthest one races at once.
    let mut c = candidate_follower("c", false, 150);
    vacancy(&mut c, 1000);
    let a = c.handle(
        t(1010),
        Input::Candidates {
            sync: None,
            members: vec![(peer("b", 100), 50)],
            ok: true,
        },
    );
    assert!(acquires(&a), "{a:?}");
}

#[test]
fn member_lsn_goes_out_at_once_while_the_key_is_empty() {
    let mut c = candidate_follower("b", false, 100);
    let a = c.handle(t(500), Input::Tick);
    let published = a.iter().find_map(|x| match x {
        Action::PublishMember(m) => Some(m.clone()),
        _ => None,
    });
    let m = published.expect("first record");
    c.handle(
        t(510),
        Input::MemberPublished {
            member: m,
            ok: true,
        },
    );
    c.handle(t(520), replica(200));
    assert!(
        !has(&c.handle(t(1000), Input::Tick), |x| matches!(
            x,
            Action::PublishMember(_)
        )),
        "leader present: at the cadence"
    );
    vacancy(&mut c, 1100);
    let a = c.handle(t(1500), Input::Tick);
    assert!(
        has(
            &a,
            |x| matches!(x, Action::PublishMember(m) if m.lsn == Some(200))
        ),
        "{a:?}"
    );
}

#[test]
fn a_late_answer_for_an_earlier_vacancy_is_not_taken_for_the_next() {
    use crate::decide::sync::SyncState;
    let mut c = candidate_follower("c", true, 900);
    let a = vacancy(&mut c, 100);
    assert!(has(&a, |x| *x == Action::ReadCandidates));
    // The key is taken, then empty again, before the first answer arrives.
    c.handle(t(150), b_holds(10, Some(6)));
    let a = c.handle(
        t(200),
        Input::KeySeen {
            holder: KeyHolder::Nobody,
            revision: 11,
            lease: Some(6),
        },
    );
    assert!(has(&a, |x| *x == Action::ReadCandidates), "{a:?}");
    let with = |members: &[&str]| Input::Candidates {
        sync: Some(SyncState {
            leader: "a".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            quorum: 1,
        }),
        members: vec![],
        ok: true,
    };
    // The first read's answer (c was a member then) is dropped...
    assert!(!acquires(&c.handle(t(210), with(&["c"]))));
    // ...and the second one's (b recorded c out since) rules.
    let a = c.handle(t(220), with(&["b"]));
    assert!(!acquires(&a), "{a:?}");
    assert!(has(&a, |x| matches!(
        x,
        Action::Record(Fact::RaceHeld { .. })
    )));
}

#[test]
fn a_peer_record_older_than_the_vacancy_is_waited_for_then_compared() {
    // c's record predates the vacancy (revision 5 < 9): its LSN there may
    // be older than what c holds now, so b waits for a fresh one.
    let mut c = candidate_follower("b", false, 100);
    vacancy(&mut c, 1000);
    let a = c.handle(
        t(1010),
        Input::Candidates {
            sync: None,
            members: vec![(peer("c", 50), 5)],
            ok: true,
        },
    );
    assert!(!acquires(&a), "{a:?}");
    assert!(
        has(
            &a,
            |x| matches!(x, Action::Record(Fact::RaceHeld { deferred: true, reason }) if reason.contains("since the vacancy from c"))
        ),
        "{a:?}"
    );
    // b's own record goes out once after the vacancy, LSN unchanged or not.
    let a = c.handle(t(1500), Input::Tick);
    assert!(has(&a, |x| matches!(x, Action::PublishMember(_))), "{a:?}");
    assert!(has(&a, |x| *x == Action::ReadCandidates), "{a:?}");
    // c's fresh record: behind b, so b races.
    let a = c.handle(
        t(1510),
        Input::Candidates {
            sync: None,
            members: vec![(peer("c", 50), 12)],
            ok: true,
        },
    );
    assert!(acquires(&a), "{a:?}");
}
