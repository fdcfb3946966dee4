use super::super::fixtures::*;
use super::super::*;
use super::OP_LIMIT;
use crate::postgres::{Lsn, WalPosition};

fn acquires(a: &[Action]) -> bool {
    has(a, |a| matches!(a, Action::Acquire { .. }))
}

/// A managed node `a` (the lab budget) that reads the pause key (as the
/// agent's core does).
fn mcore() -> Core {
    managed(false).with_maintenance()
}

fn observed(role: PgRole, lsn: u64) -> Input {
    let l = Some(Lsn(lsn));
    let (current, receive) = if role == PgRole::Primary {
        (l, None)
    } else {
        (None, l)
    };
    Input::PgObserved {
        role,
        wal: Some(WalPosition {
            timeline: 1,
            current,
            receive,
            replay: receive,
        }),
        has_data: true,
    }
}

fn down() -> Input {
    Input::PgObserved {
        role: PgRole::Down,
        wal: None,
        has_data: true,
    }
}

/// An operation `op` requested under `id`.
fn requested(id: &str, op: Op) -> Input {
    Input::OpRequested { id: id.into(), op }
}

/// The driver's report of request `id`.
fn done(id: &str, ok: bool, detail: &str) -> Input {
    Input::OpDone {
        id: id.into(),
        ok,
        detail: detail.into(),
    }
}

fn paused(p: bool) -> Input {
    Input::Paused { paused: p }
}

/// Started, granted lease 7, PostgreSQL a running standby of nobody, the
/// key read empty; the pause key not read yet.
fn follower_before_pause_read() -> (Core, Vec<Action>) {
    let mut c = mcore();
    c.handle(t(0), Input::Start);
    c.handle(t(0), observed(PgRole::Replica, 100));
    c.handle(t(0), nobody(1));
    let a = c.handle(t(1000), granted(1000));
    (c, a)
}

/// `a` leads (promoted at t = 1 s), the scope not paused.
fn managed_leader() -> Core {
    let (mut c, _) = follower_before_pause_read();
    let a = c.handle(t(1000), paused(false));
    assert!(acquires(&a));
    c.handle(t(1000), Input::Won { revision: 2 });
    let a = c.handle(
        t(1000),
        Input::Armed(ArmOutcome {
            armed: vec![ArmedDevice {
                path: "/dev/watchdog0".into(),
                identity: "softdog".into(),
                w_secs: 3,
                nowayout: false,
            }],
            failed: vec![],
        }),
    );
    assert!(has(&a, |a| *a == Action::Promote));
    c.handle(t(1000), Input::Promoted);
    c.handle(t(1100), observed(PgRole::Primary, 200));
    assert_eq!(c.role(), &Role::Leader);
    c
}

/// `a` follows `b`, whose record (address) is known; PostgreSQL streams.
fn managed_follower() -> Core {
    let mut c = mcore();
    c.handle(t(0), Input::Start);
    c.handle(t(0), paused(false));
    c.handle(t(0), granted(0));
    c.handle(t(10), b_holds(3, None));
    c.handle(
        t(20),
        Input::LeaderMember {
            leader: "b".into(),
            member: Some(Member {
                node: "b".into(),
                role: "Leader".into(),
                postgres: "primary".into(),
                host: Some("10.0.0.2".into()),
                port: Some(5432),
                lsn: Some(100),
                watchdog: "required".into(),
                ..Default::default()
            }),
        },
    );
    c.handle(
        t(30),
        Input::Followed {
            leader: "b".into(),
            ok: true,
        },
    );
    c.handle(t(40), observed(PgRole::Replica, 100));
    c
}

fn maintenance_facts(a: &[Action]) -> Vec<String> {
    a.iter()
        .filter_map(|a| match a {
            Action::Record(Fact::Maintenance { what, .. }) => Some(what.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_agent_does_not_race_before_it_knows_whether_the_scope_is_paused() {
    let (mut c, a) = follower_before_pause_read();
    assert!(!acquires(&a), "pause state unknown: no race");
    let a = c.handle(t(1100), paused(true));
    assert!(!acquires(&a), "paused: no race");
    assert_eq!(maintenance_facts(&a), ["paused"]);
    let a = c.handle(t(1200), Input::Tick);
    assert!(!acquires(&a));
    let a = c.handle(t(1300), paused(false));
    assert_eq!(maintenance_facts(&a), ["resumed"]);
    assert!(acquires(&a), "resumed: the empty key is raced for at once");
}

#[test]
fn the_first_read_of_an_unpaused_scope_is_no_transition_but_lets_the_node_race() {
    let (mut c, _) = follower_before_pause_read();
    let a = c.handle(t(1100), paused(false));
    assert!(maintenance_facts(&a).is_empty());
    assert!(acquires(&a));
    // The same state again changes nothing.
    let a = c.handle(t(1200), paused(false));
    assert!(a.is_empty(), "{a:?}");
}

#[test]
fn without_maintenance_the_core_races_as_before() {
    let mut c = mcore();
    c.maint.required = false;
    c.handle(t(0), Input::Start);
    c.handle(t(0), observed(PgRole::Replica, 100));
    c.handle(t(0), nobody(1));
    let a = c.handle(t(1000), granted(1000));
    assert!(acquires(&a));
}

#[test]
fn a_paused_leader_keeps_its_key_while_postgres_is_stopped_by_hand() {
    let mut c = managed_leader();
    c.handle(t(1200), paused(true));
    let a = c.handle(t(1300), down());
    assert!(!has(&a, |a| matches!(a, Action::StepDown { .. })), "{a:?}");
    assert!(!has(&a, |a| matches!(a, Action::StartStandby { .. })));
    // It keeps renewing, and the renewal keeps the pings going (rule 1).
    let a = c.handle(t(1500), Input::Tick);
    assert!(has(&a, |a| *a == Action::Renew { lease: 7 }));
    let a = c.handle(t(1510), renewed(1500));
    assert_eq!(a[0], Action::Publish(Evidence::Lease(t(1500))));
    assert_eq!(c.role(), &Role::Leader);
    // Still stopped at the resume: the ordinary step-down.
    let a = c.handle(t(1600), paused(false));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::PostgresDown,
            fast: None
        }));
}

#[test]
fn a_paused_leader_restarted_by_hand_keeps_leading_after_the_resume() {
    let mut c = managed_leader();
    c.handle(t(1200), paused(true));
    c.handle(t(1300), down());
    c.handle(t(1800), observed(PgRole::Primary, 300));
    let a = c.handle(t(1900), paused(false));
    assert!(!has(&a, |a| matches!(a, Action::StepDown { .. })), "{a:?}");
    assert_eq!(c.role(), &Role::Leader);
}

#[test]
fn rule3_still_demotes_a_paused_leader_whose_renewals_stop() {
    let mut c = managed_leader();
    c.handle(t(1200), paused(true));
    // s = 1.0 s, T - M = 3 s: past 4.0 s the loop steps down.
    let a = c.handle(t(4100), Input::Tick);
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::Deadline,
            fast: None
        }));
}

#[test]
fn paused_follower_neither_starts_nor_follows_postgres() {
    let mut c = managed_follower();
    c.handle(t(100), paused(true));
    // Stopped by hand: not started again while paused.
    let a = c.handle(t(200), down());
    assert!(
        !has(&a, |a| matches!(a, Action::StartStandby { .. })),
        "{a:?}"
    );
    let a = c.handle(t(700), Input::Tick);
    assert!(!has(&a, |a| matches!(
        a,
        Action::StartStandby { .. } | Action::Follow { .. }
    )));
    // The leader's key went away: nobody races while paused.
    let a = c.handle(t(800), nobody(9));
    assert!(!acquires(&a));
    // Resumed: the server is started again (as a standby) and the key raced for.
    let a = c.handle(t(900), paused(false));
    assert!(
        has(&a, |a| *a == Action::StartStandby { leader: None }),
        "{a:?}"
    );
}

#[test]
fn rule8_holds_in_pause_a_writable_server_on_a_follower_is_fenced_and_recorded() {
    let mut c = managed_follower();
    c.handle(t(100), paused(true));
    let a = c.handle(t(200), observed(PgRole::Primary, 500));
    assert_eq!(a, vec![Action::Fence]);
    let a = c.handle(
        t(300),
        Input::Fenced {
            ok: true,
            how: "stopped".into(),
        },
    );
    assert!(has(&a, |a| matches!(
        a,
        Action::Record(Fact::FencedNotLeader { .. })
    )));
    assert!(
        !has(&a, |a| matches!(a, Action::Follow { .. })),
        "paused: not followed"
    );
}

#[test]
fn a_leader_restart_holds_the_key_then_promotes_the_restarted_standby() {
    let mut c = managed_leader();
    let a = c.handle(t(1200), requested("r1", Op::Restart));
    assert_eq!(maintenance_facts(&a), ["restart_begun"]);
    let run = pos(&a, |a| matches!(a, Action::RunOp { .. }));
    assert_eq!(
        a[run],
        Action::RunOp {
            id: "r1".into(),
            op: Op::Restart,
            leader: None,
            clone_from: None
        }
    );
    // PostgreSQL down (or a standby) meanwhile: no step-down, still renewing.
    let a = c.handle(t(1300), down());
    assert!(!has(&a, |a| matches!(a, Action::StepDown { .. })), "{a:?}");
    let a = c.handle(t(1500), Input::Tick);
    assert!(has(&a, |a| *a == Action::Renew { lease: 7 }));
    c.handle(t(1510), renewed(1500));
    let a = c.handle(t(1600), done("r1", true, "restarted"));
    assert!(has(&a, |a| *a
        == Action::ReportOp {
            id: "r1".into(),
            ok: true,
            detail: "restarted".into()
        }));
    assert!(has(&a, |a| *a == Action::Promote), "{a:?}");
    assert_eq!(c.role(), &Role::Promoting);
    c.handle(t(1700), Input::Promoted);
    assert_eq!(c.role(), &Role::Leader);
}

#[test]
fn a_failed_leader_restart_steps_down() {
    let mut c = managed_leader();
    c.handle(t(1200), requested("r1", Op::Restart));
    let a = c.handle(t(1300), done("r1", false, "start: timed out"));
    assert!(has(&a, |a| matches!(a, Action::ReportOp { ok: false, .. })));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::PostgresDown,
            fast: None
        }));
}

#[test]
fn a_request_past_its_limit_is_given_up_and_a_leader_steps_down() {
    let mut c = managed_leader();
    c.handle(t(1200), requested("r1", Op::Restart));
    // Keep the evidence fresh so that only the limit can end it.
    let mut now = 1200;
    let limit = 1200 + OP_LIMIT.as_millis() as u64;
    let mut gave_up = None;
    while now < limit + 2000 {
        now += 500;
        let a = c.handle(t(now), Input::Tick);
        c.handle(
            t(now),
            Input::Renewed {
                sent: t(now),
                ttl: 5,
            },
        );
        if has(&a, |a| matches!(a, Action::ReportOp { ok: false, .. })) {
            gave_up = Some((now, a));
            break;
        }
    }
    let (at, a) = gave_up.expect("given up");
    assert!(at > limit && at <= limit + 500, "{at} vs {limit}");
    assert!(has(&a, |a| matches!(
        a,
        Action::StepDown {
            reason: StepDownReason::PostgresDown,
            ..
        }
    )));
}

#[test]
fn reinit_is_refused_on_the_leader_with_the_reason() {
    let mut c = managed_leader();
    let a = c.handle(t(1200), requested("x", Op::Reinit));
    let Some(Action::ReportOp { ok, detail, .. }) =
        a.iter().find(|a| matches!(a, Action::ReportOp { .. }))
    else {
        panic!("no outcome: {a:?}")
    };
    assert!(!ok);
    assert!(detail.contains("is the leader"), "{detail}");
    assert!(!has(&a, |a| matches!(a, Action::RunOp { .. })));
    assert_eq!(maintenance_facts(&a), ["request_refused"]);
}

#[test]
fn reinit_of_a_replica_clones_from_the_leader_and_holds_everything_else_meanwhile() {
    let mut c = managed_follower();
    let a = c.handle(t(100), requested("i1", Op::Reinit));
    // The member listing first (clonefrom); none tagged: the leader.
    assert!(has(&a, |a| *a == Action::ReadMembers), "{a:?}");
    assert!(!has(&a, |a| matches!(a, Action::RunOp { .. })), "{a:?}");
    let a = c.handle(
        t(150),
        Input::MembersSeen {
            members: vec![Member {
                node: "b".into(),
                ..Member::default()
            }],
        },
    );
    assert!(has(&a, |a| *a
        == Action::RunOp {
            id: "i1".into(),
            op: Op::Reinit,
            leader: Some("b".into()),
            clone_from: None
        }));
    // Down while it clones: neither started nor followed, and no race.
    let a = c.handle(t(200), down());
    assert!(!has(&a, |a| matches!(
        a,
        Action::StartStandby { .. } | Action::Follow { .. }
    )));
    let a = c.handle(t(300), nobody(9));
    assert!(!acquires(&a), "no race while a request runs");
    let a = c.handle(t(400), done("i1", true, "cloned"));
    assert!(has(&a, |a| matches!(a, Action::ReportOp { ok: true, .. })));
    assert!(has(&a, |a| *a
        == Action::Callback {
            event: CallbackEvent::OnStart,
            role: "replica"
        }));
}

#[test]
fn a_request_is_taken_once_and_a_second_one_meanwhile_is_refused() {
    let mut c = managed_follower();
    let req = |id: &str| Input::OpRequested {
        id: id.into(),
        op: Op::Restart,
    };
    let a = c.handle(t(100), req("r1"));
    assert!(has(&a, |a| matches!(a, Action::RunOp { .. })));
    assert!(
        c.handle(t(150), req("r1")).is_empty(),
        "the same id again: nothing"
    );
    let a = c.handle(t(200), req("r2"));
    assert!(has(&a, |a| matches!(a, Action::ReportOp { ok: false, .. })));
    assert!(!has(&a, |a| matches!(a, Action::RunOp { .. })));
    // An outcome for another id is not this request's.
    let a = c.handle(
        t(300),
        Input::OpDone {
            id: "r2".into(),
            ok: true,
            detail: String::new(),
        },
    );
    assert!(a.is_empty());
    assert_eq!(c.maintenance().running(), Some(("r1", Op::Restart)));
}

#[test]
fn callbacks_come_after_the_fact_and_never_before_a_stop_or_promotion() {
    // Promotion: on_role_change primary, after the record.
    let (mut c, _) = follower_before_pause_read();
    c.handle(t(1000), paused(false));
    c.handle(t(1000), Input::Won { revision: 2 });
    let a = c.handle(
        t(1000),
        Input::Armed(ArmOutcome {
            armed: vec![ArmedDevice {
                path: "/dev/watchdog0".into(),
                identity: "softdog".into(),
                w_secs: 3,
                nowayout: false,
            }],
            failed: vec![],
        }),
    );
    assert!(
        !has(&a, |a| matches!(a, Action::Callback { .. })),
        "none before Promote"
    );
    let a = c.handle(t(1000), Input::Promoted);
    let cb = pos(&a, |a| {
        *a == Action::Callback {
            event: CallbackEvent::OnRoleChange,
            role: "primary",
        }
    });
    assert!(pos(&a, |a| *a == Action::Record(Fact::Promoted)) < cb);
    // Step-down: nothing before the stop; on_stop once it is confirmed.
    let a = c.handle(t(1200), Input::Shutdown);
    assert!(!has(&a, |a| matches!(a, Action::Callback { .. })));
    let a = c.handle(t(1300), Input::SteppedDown { how: "fast".into() });
    let stop = pos(&a, |a| {
        *a == Action::Callback {
            event: CallbackEvent::OnStop,
            role: "primary",
        }
    });
    assert!(
        pos(&a, |a| matches!(
            a,
            Action::Record(Fact::StepDownConfirmed { .. })
        )) < stop
    );
    assert!(has(&a, |a| *a
        == Action::Callback {
            event: CallbackEvent::OnRoleChange,
            role: "replica"
        }));
}

#[test]
fn op_names_parse_and_unknown_ones_are_named() {
    assert_eq!(Op::parse("restart"), Ok(Op::Restart));
    assert_eq!(Op::parse("reinit"), Ok(Op::Reinit));
    let e = Op::parse("rebuild").unwrap_err();
    assert!(
        e.contains("\"rebuild\"") && e.contains("restart or reinit"),
        "{e}"
    );
}

#[test]
fn a_failed_leader_restart_in_a_paused_scope_keeps_the_key_until_the_resume() {
    let mut c = managed_leader();
    c.handle(t(1100), paused(true));
    c.handle(t(1200), requested("r1", Op::Restart));
    let a = c.handle(t(1300), done("r1", false, "start: timed out"));
    assert!(has(&a, |a| matches!(a, Action::ReportOp { ok: false, .. })));
    assert!(!has(&a, |a| matches!(a, Action::StepDown { .. })), "{a:?}");
    c.handle(t(1400), down());
    assert_eq!(c.role(), &Role::Leader);
    let a = c.handle(t(1500), paused(false));
    assert!(has(&a, |a| *a
        == Action::StepDown {
            reason: StepDownReason::PostgresDown,
            fast: None
        }));
}

#[test]
fn reinit_clones_from_a_clonefrom_member_and_from_the_leader_if_the_listing_is_unanswered() {
    use crate::decide::bootstrap::{CloneSource, CLONE_LISTING_LOOPS};
    let req = |id: &str| Input::OpRequested {
        id: id.into(),
        op: Op::Reinit,
    };
    let rec = |node: &str, role: &str, pg: &str, clonefrom: bool| Member {
        node: node.into(),
        role: role.into(),
        postgres: pg.into(),
        host: Some("10.0.0.3".into()),
        port: Some(5432),
        lsn: Some(100),
        tags: member::Tags {
            clonefrom,
            ..Default::default()
        },
        ..Member::default()
    };
    let mut c = managed_follower();
    let a = c.handle(t(100), req("i1"));
    assert!(has(&a, |a| *a == Action::ReadMembers), "{a:?}");
    let a = c.handle(
        t(150),
        Input::MembersSeen {
            members: vec![
                rec("b", "Leader", "primary", false),
                rec("c", "Follower", "replica", true),
            ],
        },
    );
    assert!(
        has(&a, |a| *a
            == Action::RunOp {
                id: "i1".into(),
                op: Op::Reinit,
                leader: Some("b".into()),
                clone_from: Some(CloneSource {
                    node: "c".into(),
                    host: "10.0.0.3".into(),
                    port: 5432
                })
            }),
        "{a:?}"
    );

    // etcd does not answer: asked again each loop, then from the leader.
    let mut c = managed_follower();
    c.handle(t(100), req("i2"));
    let mut ran = None;
    for i in 0..=CLONE_LISTING_LOOPS + 1 {
        c.handle(
            t(200 + 500 * i),
            Input::SlotsSynced {
                wanted: vec![],
                ok: false,
            },
        );
        let a = c.handle(t(200 + 500 * i), Input::Tick);
        if let Some(r) = a.iter().find(|a| matches!(a, Action::RunOp { .. })) {
            ran = Some((i, r.clone()));
            break;
        }
        assert!(has(&a, |a| *a == Action::ReadMembers), "{a:?}");
    }
    let (i, r) = ran.expect("ran in the end");
    assert!(i + 1 >= CLONE_LISTING_LOOPS, "not before the bound: {i}");
    assert_eq!(
        r,
        Action::RunOp {
            id: "i2".into(),
            op: Op::Reinit,
            leader: Some("b".into()),
            clone_from: None
        }
    );
}
