//! PostgreSQL as the core decides about it: eligibility for leadership
//! (the synchronous standby names a leader wants: `decide::sync`). Pure functions; the agent's
//! observer only reports what it saw (`Input::PgObserved`,
//! `Input::StandbysSeen`).

use crate::postgres::{self as pgsql, Lsn, WalPosition};

pub use crate::postgres::Role as PgRole;

/// What the core needs to know about a managed PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// `postgres.maximum_lag_on_failover`, bytes.
    pub maximum_lag_on_failover: u64,
    /// `postgres.synchronous_mode`: the leader names its streaming standbys.
    pub synchronous_mode: bool,
    /// Where peers reach this server (published in the member record).
    pub host: String,
    pub port: u16,
    /// Strict mode, `k`, quorum, the race's defer (`decide::sync`).
    pub sync: super::sync::SyncSettings,
}

/// Whether a server observed as `role` with `wal` may race for the key:
/// running, and (a replica) at most `max_lag` bytes behind `leader_lsn`,
/// the last LSN the leader published. Without a known leader LSN a running
/// replica is eligible (nothing to compare with).
pub fn eligibility(
    role: PgRole,
    wal: Option<&WalPosition>,
    leader_lsn: Option<u64>,
    max_lag: u64,
) -> Result<(), String> {
    match (role, wal, leader_lsn) {
        (PgRole::Down, _, _) => Err("PostgreSQL is down".into()),
        (PgRole::Replica, Some(wal), Some(lsn)) => {
            pgsql::eligible(wal, Lsn(lsn), max_lag).map_err(|e| e.to_string())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica_at(lsn: u64) -> WalPosition {
        WalPosition {
            timeline: 1,
            current: None,
            receive: Some(Lsn(lsn)),
            replay: Some(Lsn(lsn)),
        }
    }

    #[test]
    fn eligible_within_the_lag_bound_and_not_over_it() {
        let w = replica_at(1000);
        assert_eq!(
            eligibility(PgRole::Replica, Some(&w), Some(1000 + 65536), 65536),
            Ok(())
        );
        let e = eligibility(PgRole::Replica, Some(&w), Some(1000 + 65537), 65536).unwrap_err();
        assert!(e.contains("65537 bytes behind"), "{e}");
        assert_eq!(eligibility(PgRole::Replica, Some(&w), None, 0), Ok(()));
        assert_eq!(
            eligibility(PgRole::Down, None, Some(1), 65536),
            Err("PostgreSQL is down".into())
        );
        let p = WalPosition {
            timeline: 1,
            current: Some(Lsn(5)),
            receive: None,
            replay: None,
        };
        assert_eq!(
            eligibility(PgRole::Primary, Some(&p), Some(999_999), 0),
            Ok(())
        );
    }
}
