//! The PostgreSQL configuration files the agent owns, in the directory
//! `pg_ctl -D` reads (`postgres.config_dir`, else the data directory):
//!
//! - `leasedog.conf`: the parameters (cluster-wide from etcd, then the
//!   node's `[postgres.parameters]` over them), included from the end of
//!   `postgresql.conf` by one `include_if_exists` line the agent appends
//!   once, so they win over what is above it;
//! - `pg_hba.conf`, only when `postgres.pg_hba` is set.
//!
//! Written before every start (a clone copies the leader's files) and on a
//! change, then reloaded; parameters that need a restart are reported
//! (`pg_settings.pending_restart`). Names are checked against the installed
//! server (`postgres --describe-config`) before anything is written.

use super::*;
use crate::config::pg_params::{self, Params};
use std::collections::BTreeMap;

/// The include file's name.
pub const INCLUDE_FILE: &str = "leasedog.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'leasedog.conf'\t# added by leasedog";

/// One parameter as `postgres --describe-config` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// `postmaster` (restart), `sighup`, `superuser`, `user`, ...
    pub context: String,
    /// `BOOLEAN`, `INTEGER`, `REAL`, `STRING`, `ENUM`.
    pub kind: String,
}

/// `postgres --describe-config`: one tab-separated line per parameter
/// (name, context, group, type, ...).
pub fn parse_describe_config(text: &str) -> BTreeMap<String, Described> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() >= 4).then(|| {
                (
                    f[0].to_ascii_lowercase(),
                    Described {
                        context: f[1].into(),
                        kind: f[3].into(),
                    },
                )
            })
        })
        .collect()
}

fn bool_like(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    ["on", "off", "true", "false", "yes", "no", "1", "0"].contains(&s.as_str())
        || (s.len() >= 2 && ["true", "false", "yes"].iter().any(|w| w.starts_with(&s)))
}

/// A number with an optional unit (`128MB`, `10s`, `1.5`).
fn number_like(s: &str, real: bool) -> bool {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '-' || c == '+' || c == '.' || c == 'e'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let num_ok = if real {
        num.parse::<f64>().is_ok()
    } else {
        num.parse::<i64>().is_ok() || (num.parse::<f64>().is_ok() && !unit.is_empty())
    };
    num_ok
        && [
            "", "B", "kB", "MB", "GB", "TB", "us", "ms", "s", "min", "h", "d",
        ]
        .contains(&unit.trim())
}

/// Every name known to the installed server (or an extension's `x.y`),
/// every value of the right kind; returns the names that take effect only
/// after a restart (context `postmaster`).
pub fn check_described(
    params: &Params,
    described: &BTreeMap<String, Described>,
) -> Result<Vec<String>, String> {
    pg_params::check(params)?;
    let mut restart = Vec::new();
    for (name, v) in &pg_params::flatten(params) {
        let Some(d) = described.get(&name.to_ascii_lowercase()) else {
            if name.contains('.') {
                continue; // an extension's placeholder: PostgreSQL accepts it
            }
            return Err(format!(
                "{name}: unknown to this PostgreSQL (postgres --describe-config)"
            ));
        };
        let ok = match (d.kind.as_str(), v) {
            ("BOOLEAN", toml::Value::Boolean(_)) => true,
            ("BOOLEAN", toml::Value::String(s)) => bool_like(s),
            ("BOOLEAN", toml::Value::Integer(i)) => *i == 0 || *i == 1,
            ("INTEGER", toml::Value::Integer(_)) => true,
            ("INTEGER", toml::Value::String(s)) => number_like(s, false),
            ("REAL", toml::Value::Integer(_) | toml::Value::Float(_)) => true,
            ("REAL", toml::Value::String(s)) => number_like(s, true),
            ("INTEGER" | "REAL", _) => false,
            ("BOOLEAN", _) => false,
            _ => true, // strings and enums: the server judges the value
        };
        if !ok {
            return Err(format!(
                "{name} = {v}: not a valid {} value",
                d.kind.to_ascii_lowercase()
            ));
        }
        if d.context == "postmaster" {
            restart.push(name.clone());
        }
    }
    Ok(restart)
}

/// `postgresql.conf` with the include line appended, or `None` if it has it.
pub fn with_include(conf: &str) -> Option<String> {
    let has = conf.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("include_if_exists") && l.contains(INCLUDE_FILE)
    });
    if has {
        return None;
    }
    let mut s = conf.to_string();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(INCLUDE_LINE);
    s.push('\n');
    Some(s)
}

impl Pg {
    /// The parameters to write: cluster-wide, then the node's over them.
    pub fn parameters(&self) -> Params {
        let cluster = self
            .cluster_params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        pg_params::merge(&cluster, &self.cfg.parameters)
    }

    /// The cluster-wide parameters in force (from etcd).
    pub fn cluster_parameters(&self) -> Params {
        self.cluster_params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the cluster-wide parameters (from etcd); true if they changed.
    pub fn set_cluster_parameters(&self, p: Params) -> bool {
        let mut g = self
            .cluster_params
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let changed = *g != p;
        *g = p;
        changed
    }

    /// `postgres --describe-config` of the installed server.
    pub async fn describe_config(&self) -> Result<BTreeMap<String, Described>, PgError> {
        let mut c = self.tool("postgres")?;
        c.arg("--describe-config");
        let out = self
            .run("postgres --describe-config", c, Duration::from_secs(10))
            .await?;
        Ok(parse_describe_config(&out))
    }

    /// Checks `params` against the installed server; returns the names
    /// that need a restart. The error names the parameter.
    pub async fn check_parameters(&self, params: &Params) -> Result<Vec<String>, PgError> {
        let d = self.describe_config().await?;
        check_described(params, &d).map_err(|e| PgError::State(format!("postgres.parameters: {e}")))
    }

    /// Writes `leasedog.conf`, the include line and (if configured)
    /// `pg_hba.conf`; true if any file changed. Nothing when the data
    /// directory holds no cluster yet (initdb and clones come first), nor
    /// when no parameter or pg_hba line was ever configured.
    pub fn write_config_files(&self) -> Result<bool, PgError> {
        if !matches!(self.data_dir_state()?, DataDirState::Cluster { .. }) {
            return Ok(false);
        }
        let dir = self.cfg.config_dir.as_deref().unwrap_or(self.data_dir());
        let params = self.parameters();
        if params.is_empty() && self.cfg.pg_hba.is_empty() && !dir.join(INCLUDE_FILE).exists() {
            // Nothing configured, nothing written before: a cluster set up
            // by hand (or a read-only config_dir) is left untouched.
            return Ok(false);
        }
        let mut changed =
            self.write_if_changed(dir, INCLUDE_FILE, &pg_params::render_conf(&params))?;
        let main = dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&main)
            .map_err(io_err(format!("reading {}", main.display())))?;
        if let Some(new) = with_include(&text) {
            changed |= self.write_if_changed(dir, "postgresql.conf", &new)?;
        }
        if !self.cfg.pg_hba.is_empty() {
            changed |= self.write_if_changed(
                dir,
                "pg_hba.conf",
                &pg_params::render_hba(&self.cfg.pg_hba),
            )?;
        }
        Ok(changed)
    }

    fn write_if_changed(&self, dir: &Path, name: &str, text: &str) -> Result<bool, PgError> {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        let tmp = dir.join(format!("{name}.leasedog-tmp"));
        std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", tmp.display())))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
        Ok(true)
    }

    /// `pg_reload_conf()`, then the parameters still waiting for a restart
    /// (`pg_settings.pending_restart`, read on a new connection a moment
    /// later: the postmaster reloads asynchronously).
    pub async fn reload(&self) -> Result<Vec<String>, PgError> {
        let within = PgConfig::secs(self.cfg.query_timeout);
        self.with_client("pg_reload_conf", within, |c| {
            Box::pin(async move { c.execute("SELECT pg_reload_conf()", &[]).await })
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.pending_restart().await
    }

    /// Names of parameters changed in the files that need a restart.
    pub async fn pending_restart(&self) -> Result<Vec<String>, PgError> {
        let within = PgConfig::secs(self.cfg.query_timeout);
        let rows = self
            .with_client("pending_restart", within, |c| {
                Box::pin(async move {
                    c.query(
                        "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
                        &[],
                    )
                    .await
                })
            })
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIBED: &str =
        "shared_buffers\tpostmaster\tResource Usage / Memory\tINTEGER\t0\t16\t1073741823\tx\t\n\
        work_mem\tuser\tResource Usage / Memory\tINTEGER\t0\t64\t2147483647\tx\t\n\
        fsync\tsighup\tWAL\tBOOLEAN\ton\t\t\tx\t\n\
        random_page_cost\tuser\tQuery\tREAL\t4\t0\t1.79769e+308\tx\t\n\
        wal_level\tpostmaster\tWAL\tENUM\treplica\t\t\tx\t\n";

    fn params(t: &str) -> Params {
        toml::from_str(t).unwrap()
    }

    #[test]
    fn names_and_kinds_are_checked_against_the_server_and_restarts_reported() {
        let d = parse_describe_config(DESCRIBED);
        assert_eq!(d["fsync"].kind, "BOOLEAN");
        let ok = params(
            "shared_buffers = '128MB'\nwork_mem = 4096\nfsync = 'on'\nrandom_page_cost = 1.1\n\
             wal_level = 'logical'\n\"pg_stat_statements.max\" = 100\n",
        );
        assert_eq!(
            check_described(&ok, &d).unwrap(),
            vec!["shared_buffers".to_string(), "wal_level".to_string()]
        );
        for (t, want) in [
            (
                "shared_bufers = '128MB'",
                "shared_bufers: unknown to this PostgreSQL",
            ),
            ("work_mem = 'lots'", "not a valid integer value"),
            ("fsync = 'maybe'", "not a valid boolean value"),
            ("random_page_cost = true", "not a valid real value"),
            ("port = 1", "set from postgres.port"),
        ] {
            let e = check_described(&params(t), &d).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn the_include_line_is_appended_once() {
        let once = with_include("max_connections = 100").unwrap();
        assert!(once.ends_with("include_if_exists = 'leasedog.conf'\t# added by leasedog\n"));
        assert_eq!(with_include(&once), None);
    }
}
