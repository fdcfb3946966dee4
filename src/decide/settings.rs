//! Cluster-wide settings from etcd (`config::cluster`), already validated
//! against this node's budget by the agent: the core takes the loop
//! interval, the lag bound and synchronous mode from the next loop on. The
//! TTL, margin and reset allowance never change at run time (the pinger
//! and the deadline timer hold them), so neither does anything rule 1 or 3
//! depends on.

use super::{Action, Core, Role};
use std::time::Duration;

impl Core {
    pub(super) fn on_cluster_settings(
        &mut self,
        loop_interval: Duration,
        maximum_lag_on_failover: u64,
        synchronous_mode: bool,
        out: &mut Vec<Action>,
    ) {
        self.cfg.budget.loop_interval = loop_interval;
        let Some(p) = self.pgs.as_mut() else { return };
        p.maximum_lag_on_failover = maximum_lag_on_failover;
        let was_sync = p.synchronous_mode;
        p.synchronous_mode = synchronous_mode;
        if was_sync && !synchronous_mode && self.role == Role::Leader {
            // Nobody manages the names any more: leave none behind that
            // would make every commit wait for a standby.
            self.sync_names = None;
            self.sync_pending = true;
            out.push(Action::SetSyncStandbys(String::new()));
        }
    }

    /// The loop interval in force (the TOML's, or etcd's once applied).
    pub fn loop_interval(&self) -> Duration {
        self.cfg.budget.loop_interval
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn cluster_settings_change_the_loop_and_lag_and_turning_sync_off_clears_the_names() {
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
        .with_postgres(PgSettings {
            maximum_lag_on_failover: 1,
            synchronous_mode: true,
            host: "127.0.0.1".into(),
            port: 5432,
            sync: Default::default(),
        });
        let t = |ms: u64| BootTime::from_nanos(ms * 1_000_000);
        c.handle(t(0), Input::Start);
        c.handle(t(0), Input::Tick);
        assert_eq!(c.next_deadline(), Some(t(500)));
        let a = c.handle(
            t(100),
            Input::ClusterSettings {
                loop_interval: Duration::from_millis(250),
                maximum_lag_on_failover: 99,
                synchronous_mode: false,
            },
        );
        assert!(a.is_empty(), "a follower sets nothing: {a:?}");
        assert_eq!(
            c.next_deadline(),
            Some(t(250)),
            "the next loop comes sooner"
        );
        assert_eq!(c.pgs.as_ref().unwrap().maximum_lag_on_failover, 99);

        // A leader in synchronous mode that leaves it clears the names.
        c.handle(
            t(200),
            Input::ClusterSettings {
                loop_interval: Duration::from_millis(250),
                maximum_lag_on_failover: 99,
                synchronous_mode: true,
            },
        );
        c.role = Role::Leader;
        let a = c.handle(
            t(300),
            Input::ClusterSettings {
                loop_interval: Duration::from_millis(250),
                maximum_lag_on_failover: 99,
                synchronous_mode: false,
            },
        );
        assert_eq!(a, vec![Action::SetSyncStandbys(String::new())]);
    }
}
