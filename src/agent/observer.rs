//! The PostgreSQL observer: a task of its own that queries the server once
//! per loop and reports what it saw to the core (`Input::PgObserved`,
//! `Input::PgObserveFailed`, `Input::StandbysSeen`), and runs the core's
//! `SetSyncStandbys`. It decides nothing, and the renewal loop never awaits
//! it: a hung server (each query bounded by `postgres.query_timeout`) delays
//! only the next observation, never a renewal.

use crate::decide::Input;
use crate::postgres::{Pg, Role};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

enum Cmd {
    SetSyncStandbys(String),
}

pub struct Observer {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Observer {
    /// Starts the task (call inside the runtime): an observation every
    /// `every`, results on `out`.
    pub fn start(pg: Pg, every: Duration, out: mpsc::UnboundedSender<Input>) -> Observer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pg, every, rx, out));
        Observer { tx }
    }

    /// Sets `synchronous_standby_names`; answered by `SyncStandbysSet`.
    pub fn set_sync_standbys(&self, value: String) {
        let _ = self.tx.send(Cmd::SetSyncStandbys(value));
    }
}

async fn run(
    pg: Pg,
    every: Duration,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    out: mpsc::UnboundedSender<Input>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let inputs = tokio::select! {
            biased;
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::SetSyncStandbys(value)) => vec![set_sync(&pg, value).await],
            },
            _ = tick.tick() => observe(&pg).await,
        };
        for i in inputs {
            if out.send(i).is_err() {
                return;
            }
        }
    }
}

fn within(pg: &Pg) -> Duration {
    Duration::from_secs_f64(pg.config().query_timeout)
}

async fn observe(pg: &Pg) -> Vec<Input> {
    let st = match tokio::time::timeout(within(pg), pg.status()).await {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => {
            warn!("cannot observe PostgreSQL: {e}");
            return vec![Input::PgObserveFailed {
                error: e.to_string(),
            }];
        }
        Err(_) => {
            warn!("cannot observe PostgreSQL: no answer within postgres.query_timeout");
            return vec![Input::PgObserveFailed {
                error: "no answer within postgres.query_timeout".into(),
            }];
        }
    };
    // A stopped server with a cluster in its data directory can be started
    // as a standby (the core decides when).
    let has_data = st.role != Role::Down
        || matches!(
            pg.data_dir_state(),
            Ok(crate::postgres::DataDirState::Cluster { .. })
        );
    let mut out = vec![Input::PgObserved {
        role: st.role,
        wal: st.wal,
        has_data,
    }];
    if pg.config().synchronous_mode && st.role == Role::Primary {
        match tokio::time::timeout(within(pg), pg.streaming_standbys()).await {
            Ok(Ok(standbys)) => out.push(Input::StandbysSeen { standbys }),
            Ok(Err(e)) => warn!("synchronous mode: cannot list the streaming standbys: {e}"),
            Err(_) => warn!("synchronous mode: the streaming standbys not listed in time"),
        }
    }
    out
}

async fn set_sync(pg: &Pg, value: String) -> Input {
    let ok = match tokio::time::timeout(within(pg), pg.set_synchronous_standby_names(&value)).await
    {
        Ok(Ok(changed)) => {
            if changed {
                info!(value = %value, "synchronous mode: synchronous_standby_names set");
            }
            true
        }
        Ok(Err(e)) => {
            warn!("synchronous mode: cannot set synchronous_standby_names: {e}");
            false
        }
        Err(_) => {
            warn!(
                "synchronous mode: synchronous_standby_names not set within postgres.query_timeout"
            );
            false
        }
    };
    Input::SyncStandbysSet { value, ok }
}
