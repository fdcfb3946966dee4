//! Member records: what each agent publishes under `{scope}/members/{node}`
//! on its own lease, so that peers know where to replicate from and how far
//! the leader's WAL had got (eligibility after the leader is gone).

use serde::{Deserialize, Serialize};

/// Publish the LSN at most every this many loops when nothing else changed,
/// keeping steady state near one etcd request per node per loop.
pub const LSN_EVERY_LOOPS: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    /// The core's role (`Follower`, `Leader`, ...).
    pub role: String,
    /// PostgreSQL as observed: `primary`, `replica`, `down`, `busy`, `unmanaged`.
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
}

impl Member {
    /// Whether `self` differs from `other` in anything but the LSN.
    pub fn changed_besides_lsn(&self, other: &Member) -> bool {
        let mut a = self.clone();
        a.lsn = other.lsn;
        a != *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_alone_is_not_a_change() {
        let a = Member {
            node: "a".into(),
            role: "Leader".into(),
            postgres: "primary".into(),
            host: Some("127.0.0.1".into()),
            port: Some(5432),
            lsn: Some(1),
            watchdog: "required".into(),
        };
        let mut b = a.clone();
        b.lsn = Some(99);
        assert!(!b.changed_besides_lsn(&a));
        b.postgres = "down".into();
        assert!(b.changed_besides_lsn(&a));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Member>(&json).unwrap(), a);
    }
}
