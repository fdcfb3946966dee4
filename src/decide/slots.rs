//! Physical replication slots: the leader keeps one per other member of
//! the scope (`leasedog_<node>`), created when a member record appears and
//! dropped (when inactive) once it is gone; followers stream with
//! `primary_slot_name` = their own slot ([`slot_name`]). The core decides
//! which slots the leader wants; the agent lists the member records
//! (`Action::ReadMembers`) and runs the SQL (`Action::SyncSlots`), both in
//! a task of their own, off the renewal path.

use super::{Action, Core, Member, PgView, Role};

/// A leader re-reads the member records every this many loops.
pub const SLOTS_EVERY_LOOPS: u64 = 5;

/// Slots a leader created carry this prefix: it drops no other slot.
pub const SLOT_PREFIX: &str = "leasedog_";

/// `leasedog_<node>` in the characters a slot name allows (lower-case
/// letters, digits, `_`; at most 63 bytes).
pub fn slot_name(node: &str) -> String {
    let mut s: String = SLOT_PREFIX.into();
    s.extend(node.chars().map(|c| {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '_'
        }
    }));
    s.truncate(63);
    s
}

/// The slots a leader named `me` wants for the member records `members`.
pub fn wanted(members: &[String], me: &str) -> Vec<String> {
    let mut v: Vec<String> = members
        .iter()
        .filter(|m| m.as_str() != me)
        .map(|m| slot_name(m))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The core's slot bookkeeping, and the member listing it shares with
/// synchronous replication (`nosync`) and clones (`clonefrom`).
#[derive(Debug, Default)]
pub struct Slots {
    /// `postgres.replication_slots` (see [`Core::with_slots`]).
    enabled: bool,
    /// A `ReadMembers` is out.
    pub(super) reading: bool,
    syncing: bool,
    /// What the last successful sync left on this term's primary.
    synced: Option<Vec<String>>,
    /// The member records listed in this term (leader) or for the clone
    /// about to run (follower); None: not listed since.
    pub(super) listed: Option<Vec<Member>>,
    /// `listed` was read while leading (else it is a follower's, older than
    /// this term).
    listed_leading: bool,
    /// The streaming standbys with no record listed when the last listing
    /// was asked for them (`decide::sync`): not asked again for the same.
    pub(super) asked_for: Vec<String>,
}

impl Core {
    /// `postgres.replication_slots`: this node keeps slots when it leads.
    pub fn with_slots(mut self, enabled: bool) -> Core {
        self.slots.enabled = enabled;
        self
    }

    fn leads_primary(&self) -> bool {
        self.role == Role::Leader && self.pg == PgView::Primary && self.node.is_some()
    }

    fn keeps_slots(&self) -> bool {
        self.slots.enabled && self.leads_primary()
    }

    /// A leader lists the members for its slots and, in synchronous mode,
    /// for the standbys' `nosync` tags.
    fn lists_members(&self) -> bool {
        self.leads_primary()
            && (self.slots.enabled || self.pgs.as_ref().is_some_and(|p| p.synchronous_mode))
    }

    /// Asks for the member records unless a listing is already out.
    pub(super) fn read_members(&mut self, out: &mut Vec<Action>) {
        if !self.slots.reading {
            self.slots.reading = true;
            out.push(Action::ReadMembers);
        }
    }

    /// Per loop: a leader of a primary re-reads the member records (at once
    /// in a new term, then every [`SLOTS_EVERY_LOOPS`] loops).
    pub(super) fn slots_tick(&mut self, out: &mut Vec<Action>) {
        if !self.lists_members() {
            self.slots.synced = None;
            if self.role == Role::Leader {
                self.slots.listed = None;
            }
            return;
        }
        if self.slots.listed.is_some()
            && self.slots.listed_leading
            && self.ticks % SLOTS_EVERY_LOOPS != 0
        {
            return;
        }
        self.read_members(out);
    }

    /// The member records: kept for `nosync` and `clonefrom`; the slots
    /// synced if they differ from what the last sync left.
    pub(super) fn on_members_seen(&mut self, members: Vec<Member>, out: &mut Vec<Action>) {
        self.slots.reading = false;
        let nodes: Vec<String> = members.iter().map(|m| m.node.clone()).collect();
        self.clone_listing(&members);
        self.reinit_listing(&members, out);
        self.slots.listed = Some(members);
        self.slots.listed_leading = self.role == Role::Leader;
        if !self.keeps_slots() || self.slots.syncing {
            return;
        }
        let me = self.node.clone().unwrap_or_default();
        let want = wanted(&nodes, &me);
        if self.slots.synced.as_ref() == Some(&want) {
            return;
        }
        self.slots.syncing = true;
        out.push(Action::SyncSlots { wanted: want });
    }

    pub(super) fn on_slots_synced(&mut self, wanted: Vec<String>, ok: bool) {
        // Also the answer to a member listing that failed.
        self.slots.reading = false;
        self.slots.syncing = false;
        self.slots.synced = (ok && self.keeps_slots()).then_some(wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn listing(nodes: &[&str]) -> Vec<Member> {
        nodes
            .iter()
            .map(|n| Member {
                node: n.to_string(),
                ..Member::default()
            })
            .collect()
    }

    #[test]
    fn slot_names_are_valid_and_exclude_the_leader() {
        assert_eq!(slot_name("db-2.Example"), "leasedog_db_2_example");
        assert_eq!(slot_name(&"x".repeat(100)).len(), 63);
        assert_eq!(
            wanted(&["c".into(), "a".into(), "b".into(), "c".into()], "a"),
            vec!["leasedog_b".to_string(), "leasedog_c".to_string()]
        );
    }

    #[test]
    fn a_leader_syncs_slots_for_each_member_and_again_when_one_leaves() {
        let budget = Budget::new(
            Duration::from_secs(5),
            Duration::from_secs(2),
            Duration::from_secs(1),
            Duration::from_millis(500),
            Duration::from_millis(400),
        )
        .unwrap();
        let mut c = Core::new(CoreConfig {
            budget,
            mode: WatchdogMode::Off,
        })
        .with_node("a")
        .with_postgres(PgSettings {
            maximum_lag_on_failover: 1 << 20,
            synchronous_mode: false,
            host: "127.0.0.1".into(),
            port: 5432,
            sync: Default::default(),
        })
        .with_slots(true);
        let t = |ms: u64| BootTime::from_nanos(ms * 1_000_000);
        let obs = |role| Input::PgObserved {
            role,
            wal: None,
            has_data: true,
        };
        c.handle(t(0), Input::Start);
        c.handle(t(0), obs(PgRole::Replica));
        // A follower keeps no slots.
        let a = c.handle(t(100), Input::Tick);
        assert!(!a.contains(&Action::ReadMembers), "{a:?}");
        c.handle(
            t(100),
            Input::KeySeen {
                holder: KeyHolder::Nobody,
                revision: 1,
                lease: None,
            },
        );
        c.handle(
            t(100),
            Input::LeaseGranted {
                lease: 7,
                sent: t(100),
            },
        );
        c.handle(t(100), Input::Won { revision: 2 });
        c.handle(t(150), Input::Promoted);
        c.handle(t(200), obs(PgRole::Primary));
        assert_eq!(c.role(), &Role::Leader);
        let a = c.handle(t(600), Input::Tick);
        assert!(
            a.contains(&Action::ReadMembers),
            "at once in a new term: {a:?}"
        );
        let a = c.handle(
            t(600),
            Input::MembersSeen {
                members: listing(&["a", "b", "c"]),
            },
        );
        let want = vec!["leasedog_b".to_string(), "leasedog_c".to_string()];
        assert_eq!(
            a,
            vec![Action::SyncSlots {
                wanted: want.clone()
            }]
        );
        c.handle(
            t(700),
            Input::SlotsSynced {
                wanted: want.clone(),
                ok: true,
            },
        );
        // Unchanged: nothing to do; re-read only at the cadence.
        let mut reads = 0;
        for i in 0..SLOTS_EVERY_LOOPS {
            c.handle(
                t(1100 + 500 * i),
                Input::Renewed {
                    sent: t(1100 + 500 * i),
                    ttl: 5,
                },
            );
            let a = c.handle(t(1100 + 500 * i), Input::Tick);
            if a.contains(&Action::ReadMembers) {
                reads += 1;
                let a = c.handle(
                    t(1100 + 500 * i),
                    Input::MembersSeen {
                        members: listing(&["a", "b", "c"]),
                    },
                );
                assert!(a.is_empty(), "{a:?}");
            }
        }
        assert_eq!(reads, 1);
        // c left: its slot goes.
        let mut a = Vec::new();
        for i in 0..SLOTS_EVERY_LOOPS {
            c.handle(
                t(4000 + 500 * i),
                Input::Renewed {
                    sent: t(4000 + 500 * i),
                    ttl: 5,
                },
            );
            a = c.handle(t(4000 + 500 * i), Input::Tick);
            if a.contains(&Action::ReadMembers) {
                a = c.handle(
                    t(4000 + 500 * i),
                    Input::MembersSeen {
                        members: listing(&["a", "b"]),
                    },
                );
                break;
            }
        }
        assert_eq!(
            a,
            vec![Action::SyncSlots {
                wanted: vec!["leasedog_b".into()]
            }]
        );
    }
}
