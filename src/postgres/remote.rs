//! What a planned switchover asks of PostgreSQL: the stopped primary's
//! shutdown checkpoint (`pg_controldata`), and the target's receive LSN,
//! asked of the target's own server (its member record's LSN may be up to
//! `LSN_EVERY_LOOPS` loops old). The core decides what they mean
//! (`decide::switchover`).

use super::{Lsn, Pg, PgConfig, PgError};
use tokio_postgres::NoTls;

/// `Latest checkpoint location:` from `pg_controldata`'s output.
pub fn checkpoint_location(controldata: &str) -> Option<Lsn> {
    controldata
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Pg {
    /// The cluster state and latest checkpoint location of the stopped
    /// server (`pg_controldata`).
    pub async fn shutdown_checkpoint(&self) -> Result<(String, Option<Lsn>), PgError> {
        let out = self.controldata().await?;
        let state = out
            .lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| PgError::State("pg_controldata printed no cluster state".into()))?;
        Ok((state, checkpoint_location(&out)))
    }

    /// `pg_last_wal_receive_lsn()` of the server at `host:port`, with this
    /// node's credentials, under the connect and query timeouts (the
    /// connection is dropped on a timeout).
    pub async fn remote_receive_lsn(&self, host: &str, port: u16) -> Result<Option<Lsn>, PgError> {
        let target = format!("{host}:{port}");
        let mut pc = tokio_postgres::Config::new();
        pc.host(host)
            .port(port)
            .user(&self.cfg.user)
            .dbname(&self.cfg.dbname)
            .application_name("leasedog-switchover")
            .connect_timeout(PgConfig::secs(self.cfg.connect_timeout));
        if let Some(p) = &self.cfg.password {
            pc.password(p.as_bytes());
        }
        let within = PgConfig::secs(self.cfg.connect_timeout + self.cfg.query_timeout);
        let work = async {
            let (client, conn) = pc.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let r = client
                .query_one(
                    "SELECT (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint",
                    &[],
                )
                .await;
            drop(client);
            task.abort();
            r.map(|row| row.get::<_, Option<i64>>(0).map(|v| Lsn(v as u64)))
        };
        match tokio::time::timeout(within, work).await {
            Ok(r) => r.map_err(|e| PgError::Connect {
                target,
                message: e.to_string(),
            }),
            Err(_) => Err(PgError::Timeout {
                what: format!("asking {target} for its receive LSN"),
                after: within,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_location_is_read_from_controldata() {
        let out = "Database cluster state:               shut down\n\
                   Latest checkpoint location:           0/3000028\n";
        assert_eq!(checkpoint_location(out), Some(Lsn(0x3000028)));
        assert_eq!(checkpoint_location("nothing"), None);
    }
}
