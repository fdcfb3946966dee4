//! Talking to the server over SQL, every query under a deadline: role,
//! WAL position, health, eligibility, synchronous standbys, promotion.

use super::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// The non-strict synchronous-mode setting for these standbys: `FIRST 1
/// ("a", "b")` (names quoted as identifiers), or '' when there are none.
pub fn synchronous_standby_names_for(standbys: &[String]) -> String {
    if standbys.is_empty() {
        return String::new();
    }
    let names: Vec<String> = standbys
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    format!("FIRST 1 ({})", names.join(", "))
}

impl Pg {
    pub(super) fn classify(&self, what: &str, e: tokio_postgres::Error) -> PgError {
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                return PgError::Auth {
                    user: self.cfg.user.clone(),
                    sqlstate: code.code().into(),
                    message: db.message().into(),
                };
            }
            return PgError::Sql {
                what: what.into(),
                sqlstate: code.code().into(),
                message: db.message().into(),
            };
        }
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message = format!("{message}: {s}");
            src = s.source();
        }
        PgError::Connect {
            target: self.target(),
            message,
        }
    }

    async fn connect(&self) -> Result<(Client, tokio::task::JoinHandle<()>), PgError> {
        let mut pc = tokio_postgres::Config::new();
        pc.host(&self.cfg.host)
            .port(self.cfg.port)
            .user(&self.cfg.user)
            .dbname(&self.cfg.dbname)
            .application_name("leasedog")
            .connect_timeout(PgConfig::secs(self.cfg.connect_timeout));
        if let Some(p) = &self.cfg.password {
            pc.password(p.as_bytes());
        }
        let within = PgConfig::secs(self.cfg.connect_timeout);
        let (client, conn) = match tokio::time::timeout(within, pc.connect(NoTls)).await {
            Err(_) => {
                return Err(PgError::Timeout {
                    what: format!("connecting to {}", self.target()),
                    after: within,
                })
            }
            Ok(r) => r.map_err(|e| self.classify("connect", e))?,
        };
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((client, task))
    }

    /// Runs `f` on a fresh connection under `within`; on a timeout the
    /// connection is dropped and a cancel request is sent in the background.
    pub(super) async fn with_client<T, F>(
        &self,
        what: &str,
        within: Duration,
        f: F,
    ) -> Result<T, PgError>
    where
        F: for<'c> FnOnce(
            &'c Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    {
        let (client, task) = self.connect().await?;
        let r = tokio::time::timeout(within, f(&client)).await;
        let out = match r {
            Ok(r) => r.map_err(|e| self.classify(what, e)),
            Err(_) => {
                let token = client.cancel_token();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(2), token.cancel_query(NoTls))
                        .await;
                });
                Err(PgError::Timeout {
                    what: what.into(),
                    after: within,
                })
            }
        };
        drop(client);
        task.abort();
        out
    }

    fn is_down(e: &PgError) -> bool {
        match e {
            PgError::Connect { .. } => true,
            // 57P03: the server is starting up, shutting down or in crash recovery.
            PgError::Sql { sqlstate, .. } => sqlstate == "57P03",
            _ => false,
        }
    }

    /// Role and WAL position in one round trip. A dead postmaster or a refused
    /// connection is `Down`; a timeout or wrong credentials are errors (the
    /// server may be alive and writable: the caller must not read "down").
    pub async fn status(&self) -> Result<Status, PgError> {
        // Always ask the server (even without a postmaster in data_dir): a
        // server answering at host:port from another data directory is a
        // configuration error, not "down".
        const Q: &str = "SELECT pg_is_in_recovery(),
              CASE WHEN pg_is_in_recovery() THEN NULL
                   ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END,
              (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint,
              (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint,
              CASE WHEN pg_is_in_recovery()
                   THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver),
                                 (SELECT timeline_id FROM pg_control_checkpoint()))
                   ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
              END,
              (SELECT setting FROM pg_settings WHERE name = 'data_directory')";
        let within = PgConfig::secs(self.cfg.query_timeout);
        let r = self
            .with_client("status query", within, |c| {
                Box::pin(async move { c.query_one(Q, &[]).await })
            })
            .await;
        let row = match r {
            Ok(row) => row,
            Err(e) if Self::is_down(&e) => {
                return Ok(Status {
                    role: Role::Down,
                    wal: None,
                })
            }
            Err(e) => return Err(e),
        };
        // NULL when the role may not read it (pg_read_all_settings).
        if let Some(dir) = row.get::<_, Option<String>>(5) {
            let theirs = Path::new(&dir).canonicalize().ok();
            if theirs.is_none() || theirs != self.data_dir().canonicalize().ok() {
                return Err(PgError::WrongDataDir {
                    path: self.data_dir().to_owned(),
                    reason: format!(
                        "the server at {} runs on data directory {dir}",
                        self.target()
                    ),
                });
            }
        }
        let lsn = |i: usize| row.get::<_, Option<i64>>(i).map(|v| Lsn(v as u64));
        let recovery: bool = row.get(0);
        Ok(Status {
            role: if recovery {
                Role::Replica
            } else {
                Role::Primary
            },
            wal: Some(WalPosition {
                timeline: row.get::<_, i32>(4) as u32,
                current: lsn(1),
                receive: if recovery { lsn(2) } else { None },
                replay: if recovery { lsn(3) } else { None },
            }),
        })
    }

    pub async fn role(&self) -> Result<Role, PgError> {
        Ok(self.status().await?.role)
    }

    /// The WAL position, or an error naming why there is none.
    pub async fn wal_position(&self) -> Result<WalPosition, PgError> {
        self.status()
            .await?
            .wal
            .ok_or_else(|| PgError::State("PostgreSQL is down: no WAL position".into()))
    }

    pub async fn health(&self) -> Health {
        let pid = read_postmaster_pid(self.data_dir());
        let alive = self.live_postmaster().is_some();
        let within = PgConfig::secs(self.cfg.query_timeout);
        let r = self
            .with_client("SELECT 1", within, |c| {
                Box::pin(async move { c.simple_query("SELECT 1").await.map(|_| ()) })
            })
            .await;
        Health {
            postmaster_pid: pid,
            postmaster_alive: alive,
            accepts_connections: r.is_ok(),
            problem: r.err().map(|e| e.to_string()),
        }
    }

    /// Whether this node may be promoted, given the leader's last known LSN.
    pub async fn eligible(&self, leader_lsn: Lsn) -> Result<(), PgError> {
        let st = self.status().await?;
        let wal = st.wal.ok_or(PgError::NotEligible(NotEligible::Down))?;
        eligible(&wal, leader_lsn, self.cfg.maximum_lag_on_failover).map_err(PgError::NotEligible)
    }

    /// The `application_name` of every `pg_stat_replication` row in state
    /// `streaming`, sorted (a stable order keeps the derived setting stable).
    pub async fn streaming_standbys(&self) -> Result<Vec<String>, PgError> {
        const Q: &str = "SELECT application_name FROM pg_stat_replication \
                         WHERE state = 'streaming' ORDER BY application_name";
        let within = PgConfig::secs(self.cfg.query_timeout);
        let rows = self
            .with_client("pg_stat_replication", within, |c| {
                Box::pin(async move { c.query(Q, &[]).await })
            })
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .collect())
    }

    /// Sets `synchronous_standby_names` with `ALTER SYSTEM` (it persists in
    /// `postgresql.auto.conf`) and reloads, only when the running value
    /// differs. Returns whether it changed.
    pub async fn set_synchronous_standby_names(&self, value: &str) -> Result<bool, PgError> {
        let within = PgConfig::secs(self.cfg.query_timeout);
        // ALTER SYSTEM takes no bind parameters: an escape-string literal is
        // safe whatever standard_conforming_strings says.
        let alter = format!(
            "ALTER SYSTEM SET synchronous_standby_names = E'{}'",
            value.replace('\\', "\\\\").replace('\'', "''")
        );
        let value = value.to_owned();
        self.with_client("setting synchronous_standby_names", within, |c| {
            Box::pin(async move {
                let row = c.query_one("SHOW synchronous_standby_names", &[]).await?;
                if row.get::<_, String>(0) == value {
                    return Ok(false);
                }
                c.batch_execute(&alter).await?;
                c.batch_execute("SELECT pg_reload_conf()").await?;
                Ok(true)
            })
        })
        .await
    }

    // --- actions ----------------------------------------------------------

    /// `pg_promote(true, N)` under `postgres.promote_timeout`. Already a
    /// primary (SQLSTATE 55000) is success. FENCING.md rule 2 (arm before
    /// promote) is the caller's to keep. On a timeout the promotion may still
    /// complete later: treat the node as possibly primary.
    pub async fn promote(&self) -> Result<Promotion, PgError> {
        let within = PgConfig::secs(self.cfg.promote_timeout);
        let wait = within.as_secs().max(1) as i32;
        let r = self
            .with_client("pg_promote", within + Duration::from_secs(1), |c| {
                Box::pin(async move { c.query_one("SELECT pg_promote(true, $1)", &[&wait]).await })
            })
            .await;
        match r {
            Ok(row) if row.get::<_, bool>(0) => Ok(Promotion::Promoted),
            Ok(_) => Err(PgError::State(format!(
                "pg_promote: promotion did not complete within {wait} s"
            ))),
            Err(PgError::Sql { sqlstate, .. }) if sqlstate == "55000" => {
                Ok(Promotion::AlreadyPrimary)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synchronous_names_quote_identifiers() {
        assert_eq!(synchronous_standby_names_for(&[]), "");
        let names = ["b".to_string(), "my \"odd\" node".to_string()];
        assert_eq!(
            synchronous_standby_names_for(&names),
            r#"FIRST 1 ("b", "my ""odd"" node")"#
        );
    }
}
