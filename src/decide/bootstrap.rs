//! Bootstrap of an empty scope: who runs `initdb`.
//!
//! A scope is "initialized" once its `initialize` key says so
//! (`{scope}/initialize`, see `dcs::initialize`). In an empty scope (no
//! leader key, no `initialize` key) every node whose data directory is empty
//! races for that key by compare-and-set (create revision 0), on its own
//! lease; the winner alone runs `initdb`, then makes the key permanent
//! (`Done`). Nothing else is special: the new cluster is a stopped server
//! with data, which the core starts as a standby of nobody
//! (`Core::maybe_start_standby`), which is then eligible, races for the
//! leader key, arms (rule 2) and promotes like any other node. The losers
//! wait, read-only and ineligible (no data), until a leader publishes its
//! address, then clone it (`Action::Follow` runs `pg_basebackup` on an empty
//! data directory).
//!
//! A node never runs `initdb` when the key names a cluster or another
//! claimant, or when the leader key is held: in an initialized scope an
//! empty data directory is cloned. A failed `initdb` deletes the claim (and
//! the claim's lease would drop it anyway if the node died), records why,
//! and backs off one TTL, so another node can try. A leader that promotes
//! in a scope without the key (created before this existed) writes it, so
//! an empty node that joins later never initdb's beside a live cluster.

use super::{Action, Core, Fact, KeyHolder, Member, PgView, Role};
use crate::clock::BootTime;

/// The scope's `initialize` key as last read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InitKey {
    /// Not read yet, or the last read failed.
    #[default]
    Unknown,
    /// No key: the scope has no cluster yet.
    Absent,
    /// `node` claimed it on its lease and runs `initdb`.
    Claimed { node: String },
    /// The scope's cluster exists (created by `node`).
    Done { node: String },
    /// Something that is not leasedog's: never treated as absent.
    Garbage,
}

/// The core's bootstrap state.
#[derive(Debug, Default)]
pub struct Bootstrap {
    pub(super) key: InitKey,
    /// A read or claim of the key is out: not asked again meanwhile.
    pub(super) pending: bool,
    /// Our `initdb` runs (in the background).
    pub(super) initdb_running: bool,
    /// Our `initdb` succeeded on this lease: the claim is to be made permanent.
    pub(super) finishing: Option<i64>,
    /// No claim before this instant (after a failed `initdb`).
    pub(super) backoff_until: BootTime,
}

/// What the core does next about bootstrap (pure, see [`next_step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Read the `initialize` key.
    Read,
    /// Claim it on `lease`.
    Claim {
        lease: i64,
    },
    /// We hold the claim: run `initdb`.
    Initdb,
}

/// The facts [`next_step`] needs.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    /// This node's name.
    pub node: &'a str,
    /// Its current lease.
    pub lease: Option<i64>,
    /// The data directory holds no cluster and the server is down.
    pub empty_and_down: bool,
    /// The leader key is known absent.
    pub leader_key_absent: bool,
    /// A follower, not shutting down, no `Follow`/start running.
    pub idle_follower: bool,
    /// `tags.nofailover`: never creates a cluster it would then have to lead.
    pub nofailover: bool,
    pub now: BootTime,
}

/// Whether to read, claim, run `initdb`, or do nothing. Bootstrap concerns
/// only an idle follower with an empty, stopped data directory while the
/// leader key is absent; a held leader key means the scope has a cluster
/// (clone it: `Follow`).
pub fn next_step(b: &Bootstrap, s: &Situation) -> Step {
    if !s.empty_and_down || !s.leader_key_absent || !s.idle_follower {
        return Step::Nothing;
    }
    if b.pending || b.initdb_running || b.finishing.is_some() {
        return Step::Nothing;
    }
    match (&b.key, s.lease) {
        (InitKey::Claimed { node }, _) if node == s.node => Step::Initdb,
        (InitKey::Absent, Some(lease)) if !s.nofailover && s.now >= b.backoff_until => {
            Step::Claim { lease }
        }
        // Re-read each loop: a claimant that fails deletes the key (or its
        // lease expires), and a finished one turns it into `Done`.
        _ => Step::Read,
    }
}

impl Core {
    fn bootstrap_situation(&self, now: BootTime) -> Option<Situation<'_>> {
        let node = self.node.as_deref()?;
        self.pgs.as_ref()?;
        Some(Situation {
            node,
            lease: self.lease,
            empty_and_down: self.pg == PgView::Down && !self.pg_has_data,
            leader_key_absent: self.holder == KeyHolder::Nobody,
            idle_follower: self.role == Role::Follower
                && !self.shutting_down
                && !self.busy
                && !self.starting,
            nofailover: self.nofailover,
            now,
        })
    }

    /// Once per loop (`read`), and when the key's state arrives (no
    /// re-read then: that would loop within one batch): the next step.
    pub(super) fn bootstrap_work(&mut self, now: BootTime, read: bool, out: &mut Vec<Action>) {
        let Some(s) = self.bootstrap_situation(now) else {
            return;
        };
        match next_step(&self.boot, &s) {
            Step::Nothing => {}
            Step::Read if !read => {}
            Step::Read => {
                self.boot.pending = true;
                out.push(Action::ReadInitialize);
            }
            Step::Claim { lease } => {
                self.boot.pending = true;
                out.push(Action::ClaimInitialize { lease });
            }
            Step::Initdb => {
                let lease = self.lease.expect("claimed on a lease");
                self.boot.initdb_running = true;
                // Observations read `Busy` meanwhile: nothing starts or
                // follows a half-made data directory.
                self.busy = true;
                out.push(Action::Record(Fact::BootstrapClaimed { lease }));
                out.push(Action::Initdb);
            }
        }
    }

    /// The key as read (or as a claim left it: `Claimed` by us = won).
    pub(super) fn on_initialize_seen(
        &mut self,
        now: BootTime,
        key: InitKey,
        out: &mut Vec<Action>,
    ) {
        self.boot.pending = false;
        self.boot.key = key;
        self.bootstrap_work(now, false, out);
    }

    /// `initdb` ended: on success make the claim permanent (the start as a
    /// standby of nobody and the race for the leader key follow by the
    /// usual rules); on failure give the claim back and back off one TTL.
    pub(super) fn on_initdb_done(
        &mut self,
        now: BootTime,
        result: Result<(), String>,
        out: &mut Vec<Action>,
    ) {
        if !self.boot.initdb_running {
            return;
        }
        self.boot.initdb_running = false;
        self.busy = false;
        let lease = self.lease;
        match result {
            Ok(()) => {
                out.push(Action::Record(Fact::Initdb {
                    ok: true,
                    detail: "initdb done: this node creates the scope's cluster".into(),
                }));
                if let Some(lease) = lease {
                    self.boot.finishing = Some(lease);
                    out.push(Action::FinishInitialize { lease });
                }
            }
            Err(error) => {
                out.push(Action::Record(Fact::Initdb {
                    ok: false,
                    detail: error,
                }));
                self.boot.key = InitKey::Unknown;
                self.boot.backoff_until = now + self.budget().ttl;
                if let Some(lease) = lease {
                    out.push(Action::AbandonInitialize { lease });
                }
            }
        }
    }

    /// The claim was made permanent (or not: then the next read says how
    /// the key stands; the data directory now holds our cluster, so no
    /// second `initdb` runs here).
    pub(super) fn on_initialize_finished(&mut self, ok: bool) {
        self.boot.finishing = None;
        if ok {
            if let Some(node) = self.node.clone() {
                self.boot.key = InitKey::Done { node };
            }
        } else {
            self.boot.key = InitKey::Unknown;
        }
    }

    /// At promotion: a scope led without the key (made before it existed,
    /// or whose finishing write was lost) gets it, so a later empty node
    /// clones instead of creating a second cluster.
    pub(super) fn bootstrap_on_promoted(&mut self, out: &mut Vec<Action>) {
        if self.pgs.is_some() && !matches!(self.boot.key, InitKey::Done { .. }) {
            out.push(Action::MarkInitialized);
        }
    }

    /// The `initialize` key as this node last read it.
    pub fn initialize_key(&self) -> &InitKey {
        &self.boot.key
    }
}

/// Where a new member's clone (`pg_basebackup`) comes from when it is not
/// the leader: a member tagged `clonefrom`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSource {
    pub node: String,
    pub host: String,
    pub port: u16,
}

/// Loops a follower waits for the member listing before an empty data
/// directory is cloned from the leader anyway.
pub const CLONE_LISTING_LOOPS: u64 = 3;

/// The source of the clone of an empty data directory (Patroni's
/// `clonefrom`): among the members tagged `clonefrom` that are healthy (a
/// running replica following, an address, an LSN within `max_lag` of the
/// leader's when both are known), the furthest (then the first by name);
/// None: the leader. `avoid`: a source whose last clone failed.
pub fn clone_source(
    members: &[Member],
    me: &str,
    leader: &str,
    max_lag: u64,
    avoid: Option<&str>,
) -> Option<CloneSource> {
    let leader_lsn = members
        .iter()
        .find(|m| m.node == leader)
        .and_then(|m| m.lsn);
    members
        .iter()
        .filter(|m| m.tags.clonefrom && m.node != me && m.node != leader)
        .filter(|m| Some(m.node.as_str()) != avoid)
        .filter(|m| m.role == Role::Follower.as_str() && m.postgres == "replica")
        .filter(|m| match (leader_lsn, m.lsn) {
            (Some(l), Some(t)) => l.saturating_sub(t) <= max_lag,
            (None, Some(_)) => true,
            (_, None) => false,
        })
        .filter_map(|m| {
            Some((
                m.lsn,
                std::cmp::Reverse(m.node.clone()),
                CloneSource {
                    node: m.node.clone(),
                    host: m.host.clone()?,
                    port: m.port?,
                },
            ))
        })
        .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
        .map(|(_, _, s)| s)
}

/// The core's clone bookkeeping.
#[derive(Debug, Default)]
pub struct CloneState {
    /// The last observation found no cluster in the data directory (a
    /// `PgObserved`; nothing else says so).
    pub(super) empty: bool,
    /// The loop at which the listing for the next clone was asked for.
    asked: Option<u64>,
    /// The members listed for it.
    listing: Option<Vec<Member>>,
    /// The source of the clone running now (None: the leader).
    running: Option<String>,
    /// A source whose last clone failed: not chosen for the next one.
    failed: Option<String>,
}

impl Core {
    /// A follower about to `Follow` `leader`: with an empty data directory
    /// the member listing comes first (`Action::ReadMembers`, bounded by
    /// [`CLONE_LISTING_LOOPS`]), then [`clone_source`]. None: wait for the
    /// listing; `Some(None)`: from the leader (or a rewind).
    pub(super) fn clone_choice(
        &mut self,
        leader: &str,
        out: &mut Vec<Action>,
    ) -> Option<Option<CloneSource>> {
        if !self.clone.empty {
            return Some(None);
        }
        if let Some(listing) = self.clone.listing.take() {
            self.clone.asked = None;
            let me = self.node.clone().unwrap_or_default();
            let max_lag = self
                .pgs
                .as_ref()
                .map_or(u64::MAX, |p| p.maximum_lag_on_failover);
            let src = clone_source(&listing, &me, leader, max_lag, self.clone.failed.as_deref());
            self.clone.running = src.as_ref().map(|s| s.node.clone());
            return Some(src);
        }
        match self.clone.asked {
            Some(at) if self.ticks >= at + CLONE_LISTING_LOOPS => {
                // etcd did not answer: the leader is a source too.
                self.clone.asked = None;
                self.clone.running = None;
                Some(None)
            }
            Some(_) => {
                self.read_members(out);
                None
            }
            None => {
                self.clone.asked = Some(self.ticks);
                self.read_members(out);
                None
            }
        }
    }

    /// A member listing: kept if a clone waits for it.
    pub(super) fn clone_listing(&mut self, members: &[Member]) {
        if self.clone.asked.is_some() {
            self.clone.listing = Some(members.to_vec());
        }
    }

    /// A `Follow` ended: a failed clone from a source rules it out once.
    pub(super) fn clone_done(&mut self, ok: bool) {
        let src = self.clone.running.take();
        if src.is_some() {
            self.clone.failed = if ok { None } else { src };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn at(ms: u64) -> BootTime {
        BootTime::from_nanos(ms * 1_000_000)
    }

    fn core() -> Core {
        let budget = Budget::new(
            Duration::from_secs(5),
            Duration::from_secs(2),
            Duration::from_secs(1),
            Duration::from_millis(500),
            Duration::from_millis(400),
        )
        .unwrap();
        Core::new(CoreConfig {
            budget,
            mode: WatchdogMode::Required,
        })
        .with_node("a")
        .with_postgres(PgSettings {
            maximum_lag_on_failover: 1 << 20,
            synchronous_mode: false,
            host: "127.0.0.1".into(),
            port: 5432,
            sync: Default::default(),
        })
    }

    /// A core with lease 7, an empty stopped data directory, key `holder`.
    fn empty_node(holder: KeyHolder) -> Core {
        let mut c = core();
        c.handle(at(0), Input::Start);
        c.handle(
            at(0),
            Input::LeaseGranted {
                lease: 7,
                sent: at(0),
            },
        );
        c.handle(
            at(0),
            Input::KeySeen {
                holder,
                revision: 1,
                lease: None,
            },
        );
        c.handle(
            at(0),
            Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: false,
            },
        );
        c
    }

    fn has(a: &[Action], p: impl Fn(&Action) -> bool) -> bool {
        a.iter().any(p)
    }

    fn tick(c: &mut Core, ms: u64) -> Vec<Action> {
        c.handle(at(ms), Input::Tick)
    }

    #[test]
    fn an_empty_node_in_an_empty_scope_claims_then_runs_initdb_once() {
        let mut c = empty_node(KeyHolder::Nobody);
        let a = tick(&mut c, 500);
        assert!(has(&a, |a| *a == Action::ReadInitialize), "{a:?}");
        assert!(
            !has(&tick(&mut c, 1000), |a| *a == Action::ReadInitialize),
            "one read at a time"
        );
        let a = c.handle(
            at(1000),
            Input::InitializeSeen {
                key: InitKey::Absent,
            },
        );
        assert!(
            has(&a, |a| *a == Action::ClaimInitialize { lease: 7 }),
            "{a:?}"
        );
        let a = c.handle(
            at(1000),
            Input::InitializeSeen {
                key: InitKey::Claimed { node: "a".into() },
            },
        );
        let i = a.iter().position(|a| *a == Action::Initdb).expect("initdb");
        assert!(
            matches!(
                a[i - 1],
                Action::Record(Fact::BootstrapClaimed { lease: 7 })
            ),
            "claim recorded before initdb: {a:?}"
        );
        assert_eq!(c.pg_view(), &PgView::Down);
        // While initdb runs: no second initdb, no read, no start, no follow.
        for ms in [1500, 2000, 2500] {
            let a = tick(&mut c, ms);
            assert!(
                !has(&a, |a| matches!(
                    a,
                    Action::Initdb
                        | Action::ReadInitialize
                        | Action::StartStandby { .. }
                        | Action::Follow { .. }
                )),
                "{a:?}"
            );
        }
        let a = c.handle(
            at(3000),
            Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: false,
            },
        );
        assert!(!has(&a, |a| *a == Action::Initdb));
        assert_eq!(c.pg_view(), &PgView::Busy);
        let a = c.handle(at(3000), Input::InitdbDone { result: Ok(()) });
        assert!(
            has(&a, |a| *a == Action::FinishInitialize { lease: 7 }),
            "{a:?}"
        );
        assert!(has(&a, |a| matches!(
            a,
            Action::Record(Fact::Initdb { ok: true, .. })
        )));
        c.handle(at(3000), Input::InitializeFinished { ok: true });
        assert_eq!(c.initialize_key(), &InitKey::Done { node: "a".into() });
        // Data now: started as a standby of nobody, never a second initdb.
        let a = c.handle(
            at(3500),
            Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: true,
            },
        );
        assert!(
            has(&a, |a| *a == Action::StartStandby { leader: None }),
            "{a:?}"
        );
        assert!(!has(&a, |a| *a == Action::Initdb));
    }

    #[test]
    fn a_lost_claim_waits_and_never_runs_initdb() {
        let mut c = empty_node(KeyHolder::Nobody);
        tick(&mut c, 500);
        let a = c.handle(
            at(500),
            Input::InitializeSeen {
                key: InitKey::Claimed { node: "b".into() },
            },
        );
        assert!(!has(&a, |a| matches!(
            a,
            Action::Initdb | Action::ClaimInitialize { .. }
        )));
        // It keeps reading (b may fail), never claims while b holds it.
        let a = tick(&mut c, 1000);
        assert!(has(&a, |a| *a == Action::ReadInitialize));
        let a = c.handle(
            at(1000),
            Input::InitializeSeen {
                key: InitKey::Done { node: "b".into() },
            },
        );
        assert!(!has(&a, |a| matches!(
            a,
            Action::Initdb | Action::ClaimInitialize { .. }
        )));
        assert!(
            c.eligibility().is_err(),
            "no data: never races for the leader key"
        );
    }

    #[test]
    fn an_empty_node_in_an_initialized_scope_never_claims_and_follows_the_leader() {
        let mut c = empty_node(KeyHolder::Other("b".into()));
        for ms in [500, 1000, 1500] {
            let a = tick(&mut c, ms);
            assert!(
                !has(&a, |a| matches!(
                    a,
                    Action::ReadInitialize | Action::ClaimInitialize { .. } | Action::Initdb
                )),
                "{a:?}"
            );
        }
        // Even an absent key (a scope made before the key existed) with a
        // leader: clone, never initdb.
        let a = c.handle(
            at(1500),
            Input::InitializeSeen {
                key: InitKey::Absent,
            },
        );
        assert!(!has(&a, |a| matches!(
            a,
            Action::ClaimInitialize { .. } | Action::Initdb
        )));
        let a = c.handle(
            at(1500),
            Input::LeaderMember {
                leader: "b".into(),
                member: Some(Member {
                    node: "b".into(),
                    role: "Leader".into(),
                    postgres: "primary".into(),
                    host: Some("127.0.0.1".into()),
                    port: Some(5433),
                    lsn: Some(1),
                    watchdog: "required".into(),
                    ..Default::default()
                }),
            },
        );
        // An empty data directory: the member listing first (clonefrom).
        assert_eq!(a, vec![Action::ReadMembers], "{a:?}");
        c.handle(
            at(1500),
            Input::MembersSeen {
                members: vec![rec("b", "Leader", "primary", 100, false)],
            },
        );
        let a = observe_empty(&mut c, 1600);
        assert!(
            has(&a, |a| *a
                == Action::Follow {
                    leader: "b".into(),
                    clone_from: None
                }),
            "{a:?}"
        );
    }

    fn rec(node: &str, role: &str, pg: &str, lsn: u64, clonefrom: bool) -> Member {
        Member {
            node: node.into(),
            role: role.into(),
            postgres: pg.into(),
            host: Some("127.0.0.1".into()),
            port: Some(5400),
            lsn: Some(lsn),
            watchdog: "required".into(),
            tags: crate::decide::member::Tags {
                clonefrom,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn observe_empty(c: &mut Core, ms: u64) -> Vec<Action> {
        c.handle(
            at(ms),
            Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: false,
            },
        )
    }

    fn source(node: &str) -> Option<CloneSource> {
        Some(CloneSource {
            node: node.into(),
            host: "127.0.0.1".into(),
            port: 5400,
        })
    }

    #[test]
    fn clone_source_prefers_a_healthy_clonefrom_member_else_the_leader() {
        let leader = rec("b", "Leader", "primary", 1000, false);
        let c1 = rec("c", "Follower", "replica", 990, true);
        let d1 = rec("d", "Follower", "replica", 995, true);
        let plain = rec("e", "Follower", "replica", 1000, false);
        let pick = |ms: &[Member], avoid| clone_source(ms, "a", "b", 100, avoid);
        assert_eq!(pick(&[leader.clone(), plain.clone()], None), None);
        assert_eq!(
            pick(&[leader.clone(), c1.clone(), plain.clone()], None),
            source("c")
        );
        assert_eq!(
            pick(&[leader.clone(), c1.clone(), d1.clone()], None),
            source("d"),
            "the furthest clonefrom member"
        );
        assert_eq!(
            pick(&[leader.clone(), c1.clone(), d1.clone()], Some("d")),
            source("c"),
            "not the one whose clone just failed"
        );
        let mut tie = c1.clone();
        tie.node = "bb".into();
        assert_eq!(
            pick(&[leader.clone(), c1.clone(), tie], None),
            source("bb"),
            "equal LSNs: the first by name"
        );
        // Unhealthy clonefrom members are passed over for the leader.
        let lagging = rec("c", "Follower", "replica", 800, true);
        let down = rec("c", "Follower", "down", 1000, true);
        let no_lsn = Member {
            lsn: None,
            ..c1.clone()
        };
        let no_addr = Member {
            host: None,
            ..c1.clone()
        };
        let arming = rec("c", "Arming", "replica", 1000, true);
        for bad in [lagging, down, no_lsn, no_addr, arming] {
            assert_eq!(pick(&[leader.clone(), bad.clone()], None), None, "{bad:?}");
        }
        // Itself, or the leader tagged: the leader.
        assert_eq!(
            clone_source(&[leader.clone(), c1.clone()], "c", "b", 100, None),
            None
        );
        let mut tagged_leader = leader.clone();
        tagged_leader.tags.clonefrom = true;
        assert_eq!(pick(&[tagged_leader], None), None);
        // Without the leader's record the lag is not known: any live one.
        assert_eq!(pick(std::slice::from_ref(&c1), None), source("c"));
    }

    /// An empty node following leader `b`, whose address is known.
    fn empty_follower_of_b() -> Core {
        let mut c = empty_node(KeyHolder::Other("b".into()));
        let a = c.handle(
            at(100),
            Input::LeaderMember {
                leader: "b".into(),
                member: Some(rec("b", "Leader", "primary", 1000, false)),
            },
        );
        // The leader's address is known: the listing comes before a Follow.
        assert_eq!(a, vec![Action::ReadMembers]);
        c
    }

    /// The listing: leader b and replica c, tagged clonefrom.
    fn leader_b_and_clonefrom_c() -> Input {
        Input::MembersSeen {
            members: vec![
                rec("b", "Leader", "primary", 1000, false),
                rec("c", "Follower", "replica", 1000, true),
            ],
        }
    }

    #[test]
    fn an_empty_follower_lists_the_members_then_clones_from_the_clonefrom_member() {
        let mut c = empty_follower_of_b();
        let a = observe_empty(&mut c, 600);
        assert!(
            !has(&a, |a| matches!(
                a,
                Action::ReadMembers | Action::Follow { .. }
            )),
            "one listing at a time: {a:?}"
        );
        c.handle(at(700), leader_b_and_clonefrom_c());
        let a = observe_empty(&mut c, 800);
        assert!(
            has(&a, |a| *a
                == Action::Follow {
                    leader: "b".into(),
                    clone_from: source("c")
                }),
            "{a:?}"
        );
        // The clone from c failed: the next attempt lists again and, with
        // no other clonefrom member, clones from the leader.
        c.handle(
            at(900),
            Input::Followed {
                leader: "b".into(),
                ok: false,
            },
        );
        let a = observe_empty(&mut c, 1000);
        assert!(has(&a, |a| *a == Action::ReadMembers), "{a:?}");
        c.handle(at(1100), leader_b_and_clonefrom_c());
        let a = observe_empty(&mut c, 1200);
        assert!(
            has(&a, |a| *a
                == Action::Follow {
                    leader: "b".into(),
                    clone_from: None
                }),
            "{a:?}"
        );
    }

    #[test]
    fn an_unanswered_listing_clones_from_the_leader_after_a_bound() {
        let mut c = empty_follower_of_b();
        c.handle(
            at(600),
            Input::SlotsSynced {
                wanted: vec![],
                ok: false,
            },
        );
        let mut followed = None;
        for i in 0..=CLONE_LISTING_LOOPS + 1 {
            let ms = 1000 + 500 * i;
            tick(&mut c, ms);
            let a = observe_empty(&mut c, ms);
            if let Some(f) = a.iter().find(|a| matches!(a, Action::Follow { .. })) {
                followed = Some((i, f.clone()));
                break;
            }
            assert!(has(&a, |a| *a == Action::ReadMembers), "asked again: {a:?}");
            c.handle(
                at(ms),
                Input::SlotsSynced {
                    wanted: vec![],
                    ok: false,
                },
            );
        }
        let (i, f) = followed.expect("cloned from the leader in the end");
        assert!(i >= CLONE_LISTING_LOOPS - 1, "not before the bound: {i}");
        assert_eq!(
            f,
            Action::Follow {
                leader: "b".into(),
                clone_from: None
            }
        );
    }

    #[test]
    fn a_node_with_data_rewinds_without_a_listing() {
        let mut c = empty_follower_of_b();
        let a = c.handle(
            at(500),
            Input::PgObserved {
                role: PgRole::Down,
                wal: None,
                has_data: true,
            },
        );
        assert!(!has(&a, |a| *a == Action::ReadMembers), "{a:?}");
        assert!(
            has(&a, |a| *a
                == Action::Follow {
                    leader: "b".into(),
                    clone_from: None
                }),
            "{a:?}"
        );
    }

    #[test]
    fn a_failed_initdb_gives_the_claim_back_with_its_error_and_backs_off() {
        let mut c = empty_node(KeyHolder::Nobody);
        tick(&mut c, 500);
        c.handle(
            at(500),
            Input::InitializeSeen {
                key: InitKey::Claimed { node: "a".into() },
            },
        );
        let a = c.handle(
            at(1000),
            Input::InitdbDone {
                result: Err("initdb: invalid locale name \"xx\"".into()),
            },
        );
        assert!(
            has(&a, |a| *a == Action::AbandonInitialize { lease: 7 }),
            "{a:?}"
        );
        assert!(has(&a, |a| matches!(
            a,
            Action::Record(Fact::Initdb { ok: false, detail }) if detail.contains("invalid locale")
        )));
        // Backs off one TTL (5 s): reads, but no claim before t = 6 s.
        tick(&mut c, 1500);
        let a = c.handle(
            at(1500),
            Input::InitializeSeen {
                key: InitKey::Absent,
            },
        );
        assert!(
            !has(&a, |a| matches!(a, Action::ClaimInitialize { .. })),
            "{a:?}"
        );
        tick(&mut c, 6000);
        let a = c.handle(
            at(6000),
            Input::InitializeSeen {
                key: InitKey::Absent,
            },
        );
        assert!(
            has(&a, |a| *a == Action::ClaimInitialize { lease: 7 }),
            "{a:?}"
        );
    }

    #[test]
    fn nofailover_never_claims_the_initialize_key_nor_races_for_the_leader_key() {
        let mut c = empty_node(KeyHolder::Nobody).with_nofailover(true);
        tick(&mut c, 500);
        let a = c.handle(
            at(500),
            Input::InitializeSeen {
                key: InitKey::Absent,
            },
        );
        assert!(
            !has(&a, |a| matches!(a, Action::ClaimInitialize { .. })),
            "{a:?}"
        );
        // A running replica that would be eligible never acquires.
        let a = c.handle(
            at(1000),
            Input::PgObserved {
                role: PgRole::Replica,
                wal: None,
                has_data: true,
            },
        );
        assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })), "{a:?}");
        let a = tick(&mut c, 1500);
        assert!(!has(&a, |a| matches!(a, Action::Acquire { .. })), "{a:?}");
    }

    #[test]
    fn a_promoted_leader_marks_the_scope_initialized_unless_known_done() {
        let mut c = core();
        c.handle(at(0), Input::Start);
        c.handle(
            at(0),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
                lease: None,
            },
        );
        c.handle(
            at(0),
            Input::PgObserved {
                role: PgRole::Replica,
                wal: None,
                has_data: true,
            },
        );
        let a = c.handle(
            at(1000),
            Input::LeaseGranted {
                lease: 7,
                sent: at(1000),
            },
        );
        assert!(has(&a, |a| *a == Action::Acquire { lease: 7 }), "{a:?}");
        c.handle(at(1000), Input::Won { revision: 2 });
        let a = c.handle(
            at(1000),
            Input::Armed(ArmOutcome {
                armed: vec![ArmedDevice {
                    path: "/dev/watchdog0".into(),
                    identity: "x".into(),
                    w_secs: 3,
                    nowayout: false,
                }],
                failed: vec![],
            }),
        );
        assert!(has(&a, |a| *a == Action::Promote), "{a:?}");
        let a = c.handle(at(1100), Input::Promoted);
        assert!(has(&a, |a| *a == Action::MarkInitialized), "{a:?}");
    }
}
