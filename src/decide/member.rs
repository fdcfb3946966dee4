//! Member records: what each agent publishes under `{scope}/members/{node}`
//! on its own lease, so that peers know where to replicate from and how far
//! the leader's WAL had got (eligibility after the leader is gone).
//!
//! The core decides when a record is due ([`due`]); the agent only writes
//! it (`Action::PublishMember`) and reads the leader's
//! (`Action::RefreshLeaderMember`).

use serde::{Deserialize, Serialize};

/// Publish the LSN at most every this many loops when nothing else changed,
/// keeping steady state near one etcd request per node per loop. Followers
/// re-read the leader's record at the same rate.
pub const LSN_EVERY_LOOPS: u64 = 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    /// The core's role, by its stable name (`Role::as_str`: `Follower`, `Leader`, ...).
    pub role: String,
    /// PostgreSQL as observed (`PgView::as_str`): `primary`, `replica`, `down`, `busy`, `unmanaged`.
    pub postgres: String,
    /// Where peers reach this node's PostgreSQL.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Primary: current WAL LSN; replica: the furthest received or replayed.
    #[serde(default)]
    pub lsn: Option<u64>,
    /// Whether this node's watchdog mode lets it lead (`off`, `automatic`, `required`).
    pub watchdog: String,
    /// PostgreSQL's timeline (absent from older records, and when down).
    #[serde(default)]
    pub timeline: Option<u32>,
    /// Replica: `pg_last_wal_receive_lsn()` / `pg_last_wal_replay_lsn()`.
    #[serde(default)]
    pub receive_lsn: Option<u64>,
    #[serde(default)]
    pub replay_lsn: Option<u64>,
    /// The watchdog is armed (devices open and pinged), with the smallest
    /// timeout `W` read back.
    #[serde(default)]
    pub armed: bool,
    #[serde(default)]
    pub w_secs: Option<u32>,
    /// The node's `[tags]` (absent from the JSON when none is set).
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
}

/// A node's `[tags]` as its peers see them in its record (Patroni's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    /// Never races for the leader key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nofailover: bool,
    /// Never chosen as a synchronous standby (`decide::sync`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nosync: bool,
    /// Preferred over the leader as the source of a new member's clone
    /// (`decide::bootstrap::clone_source`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clonefrom: bool,
}

impl Tags {
    pub fn is_empty(&self) -> bool {
        *self == Tags::default()
    }
}

impl Member {
    /// Whether `self` differs from `other` in anything but the LSN.
    pub fn changed_besides_lsn(&self, other: &Member) -> bool {
        let mut a = self.clone();
        a.lsn = other.lsn;
        a.receive_lsn = other.receive_lsn;
        a.replay_lsn = other.replay_lsn;
        a != *other
    }
}

/// Whether `me` must be written now, given the record last written and the
/// loop it was written at: at once on any change but the LSN, and a moved
/// LSN at most every [`LSN_EVERY_LOOPS`] loops, except while the leader key
/// is empty (`vacant`): then at once, since the race compares the
/// candidates' LSNs (most advanced wins, `decide::sync`) and a replica's
/// received LSN no longer moves once its primary is gone.
pub fn due(me: &Member, published: Option<&(Member, u64)>, tick: u64, vacant: bool) -> bool {
    match published {
        None => true,
        Some((old, at)) => {
            me.changed_besides_lsn(old)
                || (me.lsn != old.lsn && (vacant || tick >= at + LSN_EVERY_LOOPS))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> Member {
        Member {
            node: "a".into(),
            role: "Leader".into(),
            postgres: "primary".into(),
            host: Some("127.0.0.1".into()),
            port: Some(5432),
            lsn: Some(1),
            watchdog: "required".into(),
            ..Member::default()
        }
    }

    #[test]
    fn lsn_alone_is_not_a_change() {
        let a = a();
        let mut b = a.clone();
        b.lsn = Some(99);
        assert!(!b.changed_besides_lsn(&a));
        b.postgres = "down".into();
        assert!(b.changed_besides_lsn(&a));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Member>(&json).unwrap(), a);
    }

    #[test]
    fn a_record_written_before_the_list_fields_still_parses() {
        let old = r#"{"node":"a","role":"Leader","postgres":"primary","host":"127.0.0.1","port":5432,"lsn":1,"watchdog":"required"}"#;
        let m: Member = serde_json::from_str(old).unwrap();
        assert_eq!(m, a());
        assert!(!m.armed && m.timeline.is_none() && m.receive_lsn.is_none());
    }

    #[test]
    fn json_keeps_its_field_names() {
        let json = serde_json::to_string(&a()).unwrap();
        assert_eq!(
            json,
            r#"{"node":"a","role":"Leader","postgres":"primary","host":"127.0.0.1","port":5432,"lsn":1,"watchdog":"required","timeline":null,"receive_lsn":null,"replay_lsn":null,"armed":false,"w_secs":null}"#
        );
    }

    #[test]
    fn tags_appear_in_the_json_only_when_set() {
        let mut m = a();
        m.tags.nosync = true;
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.ends_with(r#""tags":{"nosync":true}}"#), "{json}");
        assert_eq!(serde_json::from_str::<Member>(&json).unwrap(), m);
        let mut changed = a();
        changed.tags.clonefrom = true;
        assert!(
            changed.changed_besides_lsn(&a()),
            "a tag change goes out at once"
        );
    }

    #[test]
    fn due_on_change_at_once_and_on_lsn_at_the_cadence() {
        let old = a();
        assert!(due(&old, None, 0, false), "never written");
        let published = (old.clone(), 100);
        assert!(!due(&old, Some(&published), 500, false), "unchanged");
        assert!(!due(&old, Some(&published), 101, true), "unchanged, vacant");
        let mut moved = old.clone();
        moved.lsn = Some(2);
        assert!(!due(
            &moved,
            Some(&published),
            100 + LSN_EVERY_LOOPS - 1,
            false
        ));
        assert!(due(&moved, Some(&published), 100 + LSN_EVERY_LOOPS, false));
        assert!(
            due(&moved, Some(&published), 101, true),
            "with the key empty a moved LSN goes out at once"
        );
        let mut role = old.clone();
        role.role = "SteppingDown".into();
        assert!(
            due(&role, Some(&published), 101, false),
            "a change goes out at once"
        );
    }
}
