//! The `[postgres]` section of the configuration: settings, defaults and the
//! validation that needs nothing from the outside world. The driver
//! ([`crate::postgres`]) is built from it; this module depends on no driver.

use super::ConfigError;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `[postgres]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// Where the agent connects: a unix socket directory (starts with `/`) or
    /// a host name / address.
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// The role the agent connects as (needs `pg_promote`, i.e. superuser or a grant).
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default = "default_dbname")]
    pub dbname: String,
    #[serde(default)]
    pub password: Option<String>,
    /// The cluster's data directory (holds `PG_VERSION`). Required.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Where `postgresql.conf` lives when it is not in the data directory
    /// (Debian: `/etc/postgresql/15/main`); passed to `pg_ctl -D`.
    #[serde(default)]
    pub config_dir: Option<PathBuf>,
    /// Directory of `pg_ctl`, `pg_rewind`, `pg_basebackup`, `initdb`, `postgres`.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// Server log written by `pg_ctl start -l`. Default: `<data_dir>/leasedog-postmaster.log`.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// The OS user PostgreSQL runs as; tools run as this user when the agent is root.
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// Seconds to establish a connection (including authentication).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: f64,
    /// Seconds for each query.
    #[serde(default = "default_query_timeout")]
    pub query_timeout: f64,
    /// Seconds `pg_promote` may take.
    #[serde(default = "default_promote_timeout")]
    pub promote_timeout: f64,
    /// Seconds the fence waits for an immediate stop before it SIGKILLs.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: f64,
    /// Seconds the fence waits for SIGKILLed processes to be gone.
    #[serde(default = "default_kill_timeout")]
    pub kill_timeout: f64,
    /// Seconds `pg_ctl start -w` may take (crash recovery can be long).
    #[serde(default = "default_start_timeout")]
    pub start_timeout: f64,
    /// Seconds `pg_basebackup` / `pg_rewind` may take.
    #[serde(default = "default_clone_timeout")]
    pub clone_timeout: f64,
    /// A replica more than this many bytes behind the leader's last known
    /// position is not eligible for promotion.
    #[serde(default = "default_max_lag")]
    pub maximum_lag_on_failover: u64,
    /// Credentials peers use to stream from (and `pg_rewind` from) this node.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// The address peers use to reach this node's PostgreSQL (published in
    /// its member record). Default: `host` when it is an address, else
    /// 127.0.0.1.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// The leader names its streaming standbys in `synchronous_standby_names`
    /// (`FIRST 1 (...)`) so a commit is acknowledged only once a standby has
    /// it, and sets it to '' while none streams (non-strict: a lone primary
    /// keeps accepting writes, unprotected). Trades commit latency for no
    /// lost acknowledged commits at failover.
    #[serde(default)]
    pub synchronous_mode: bool,
    /// Never fall back to asynchronous: while no synchronous standby
    /// streams, commits block (`synchronous_standby_names` keeps the gone
    /// standby, or `*` when none was ever known). Needs `synchronous_mode`.
    #[serde(default)]
    pub synchronous_mode_strict: bool,
    /// Standbys a commit waits for (`k` in `FIRST k` / `ANY k`).
    #[serde(default = "default_sync_count")]
    pub synchronous_node_count: u32,
    /// `ANY k (every streaming standby)`, a quorum commit, instead of
    /// `FIRST k (k chosen standbys)`.
    #[serde(default)]
    pub synchronous_quorum: bool,
    /// Seconds a follower whose WAL is behind another healthy candidate's
    /// holds back its race for an empty key (most advanced wins), at most.
    #[serde(default = "default_failover_defer")]
    pub failover_defer: f64,
    /// Extra `initdb` options for the node that creates the scope's cluster
    /// (bootstrap of an empty scope), e.g. `["--encoding=UTF8",
    /// "--locale=C.UTF-8"]`. The agent passes `-D` and `--data-checksums`.
    #[serde(default)]
    pub initdb: Vec<String>,
    /// `[postgres.parameters]`: written to `leasedog.conf`, which the
    /// agent includes from `postgresql.conf` (`include_if_exists`); they win
    /// over the scope's cluster-wide parameters in etcd.
    #[serde(default)]
    pub parameters: super::pg_params::Params,
    /// `pg_hba.conf` lines; when set, the agent owns `pg_hba.conf` and
    /// writes exactly these (keep a line for its own connection and for
    /// replication).
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// Physical replication slots (`decide::slots`): as leader, keep one
    /// per other member; as standby, stream through this node's. Every
    /// node of a scope must agree (a slot nobody uses keeps WAL). Off by
    /// default: a standby started before the leader created its slot
    /// streams only after its next retry (`wal_retrieve_retry_interval`).
    #[serde(default)]
    pub replication_slots: bool,
}

/// Credentials in the `primary_conninfo` of replicas and the source of `pg_rewind`.
/// The role needs REPLICATION (and a `replication` line in pg_hba.conf) and,
/// for rejoin, superuser or the grants of [`REWIND_GRANTS_SQL`] (plus an `all`
/// line in pg_hba.conf for `postgres.dbname`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
}

/// What a non-superuser replication role needs for [`crate::postgres::Pg::rejoin`]: pg_rewind's
/// file functions and `CHECKPOINT` (pg_checkpoint, PostgreSQL 15). Replace
/// `{role}` with the role name and run it on the primary.
pub const REWIND_GRANTS_SQL: &str = "
GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {role};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {role};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {role};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {role};
GRANT pg_checkpoint TO {role};
";

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            user: default_user(),
            password: None,
        }
    }
}

fn default_host() -> String {
    "/var/run/postgresql".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_dbname() -> String {
    "postgres".into()
}
fn default_bin_dir() -> PathBuf {
    "/usr/lib/postgresql/15/bin".into()
}
fn default_os_user() -> String {
    "postgres".into()
}
fn default_connect_timeout() -> f64 {
    2.0
}
fn default_query_timeout() -> f64 {
    2.0
}
fn default_promote_timeout() -> f64 {
    10.0
}
fn default_stop_timeout() -> f64 {
    1.0
}
fn default_kill_timeout() -> f64 {
    2.0
}
fn default_start_timeout() -> f64 {
    120.0
}
fn default_clone_timeout() -> f64 {
    3600.0
}
fn default_sync_count() -> u32 {
    1
}
fn default_failover_defer() -> f64 {
    3.0
}
fn default_max_lag() -> u64 {
    1 << 20
}

impl PgConfig {
    /// A configuration with every default and the given data directory.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> PgConfig {
        let mut c: PgConfig = toml::from_str("").expect("defaults parse");
        c.data_dir = Some(data_dir.into());
        c
    }

    /// Checks every rule that does not need the outside world; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, rule: &str| {
            Err(ConfigError::Invalid {
                key,
                rule: rule.to_string(),
            })
        };
        match &self.data_dir {
            None => {
                return bad(
                    "postgres.data_dir",
                    "required: the cluster's data directory",
                )
            }
            Some(d) if !d.is_absolute() => {
                return bad("postgres.data_dir", "must be an absolute path")
            }
            _ => {}
        }
        if let Some(d) = &self.config_dir {
            if !d.is_absolute() {
                return bad("postgres.config_dir", "must be an absolute path");
            }
        }
        if !self.bin_dir.is_absolute() {
            return bad("postgres.bin_dir", "must be an absolute path");
        }
        if self.host.is_empty() {
            return bad("postgres.host", "must not be empty");
        }
        if self.host.starts_with('/') && self.host.contains(['\'', '"', '\\', ' ']) {
            return bad(
                "postgres.host",
                "a socket directory must not contain quotes, backslashes or spaces",
            );
        }
        if self.port == 0 {
            return bad("postgres.port", "must be 1-65535");
        }
        for (key, v) in [
            ("postgres.user", &self.user),
            ("postgres.dbname", &self.dbname),
        ] {
            if v.is_empty() {
                return bad(key, "must not be empty");
            }
        }
        if self.os_user.is_empty() {
            return bad("postgres.os_user", "must not be empty");
        }
        if self.replication.user.is_empty() {
            return bad("postgres.replication.user", "must not be empty");
        }
        if let Err(rule) = super::pg_params::check(&self.parameters) {
            return Err(ConfigError::Invalid {
                key: "postgres.parameters",
                rule,
            });
        }
        for line in &self.pg_hba {
            if let Err(rule) = super::pg_params::check_hba_line(line) {
                return Err(ConfigError::Invalid {
                    key: "postgres.pg_hba",
                    rule,
                });
            }
        }
        if let Some(o) = self.initdb.iter().find(|o| !initdb_option_allowed(o)) {
            return Err(ConfigError::Invalid {
                key: "postgres.initdb",
                rule: format!(
                    "{o:?}: the agent sets the data directory (postgres.data_dir) and \
                     options must start with '-' (one option per entry, e.g. \"--encoding=UTF8\")"
                ),
            });
        }
        for (key, v) in [
            ("postgres.connect_timeout", self.connect_timeout),
            ("postgres.query_timeout", self.query_timeout),
            ("postgres.promote_timeout", self.promote_timeout),
            ("postgres.stop_timeout", self.stop_timeout),
            ("postgres.kill_timeout", self.kill_timeout),
            ("postgres.start_timeout", self.start_timeout),
            ("postgres.clone_timeout", self.clone_timeout),
            ("postgres.failover_defer", self.failover_defer),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 86400.0 {
                return Err(ConfigError::Invalid {
                    key,
                    rule: format!("{v} is not a number of seconds in (0, 86400]"),
                });
            }
        }
        if self.synchronous_node_count == 0 || self.synchronous_node_count > 64 {
            return bad(
                "postgres.synchronous_node_count",
                "must be 1-64 (standbys a commit waits for)",
            );
        }
        if !self.synchronous_mode {
            for (key, set) in [
                (
                    "postgres.synchronous_mode_strict",
                    self.synchronous_mode_strict,
                ),
                ("postgres.synchronous_quorum", self.synchronous_quorum),
                (
                    "postgres.synchronous_node_count",
                    self.synchronous_node_count != 1,
                ),
            ] {
                if set {
                    return bad(
                        key,
                        "has no effect without postgres.synchronous_mode = true",
                    );
                }
            }
        }
        Ok(())
    }

    /// The data directory (call after [`PgConfig::validate`]).
    pub fn data_dir(&self) -> &Path {
        self.data_dir
            .as_deref()
            .expect("postgres.data_dir checked by validate()")
    }

    /// The conninfo of the leader at `host:port` for the driver's methods,
    /// with `postgres.replication.user` and no password: the driver adds
    /// `postgres.replication.password` itself where it is needed (PGPASSWORD
    /// for pg_basebackup / pg_rewind, so it never shows in `ps`; the
    /// `primary_conninfo` line, in a file of mode 600).
    /// The host peers should connect to (see `advertise_host`).
    pub fn advertised_host(&self) -> String {
        match &self.advertise_host {
            Some(h) => h.clone(),
            None if self.host.starts_with('/') => "127.0.0.1".into(),
            None => self.host.clone(),
        }
    }

    pub fn replication_conninfo(&self, host: &str, port: u16, application_name: &str) -> String {
        format!(
            "host={} port={port} user={} application_name={}",
            conninfo_value(host),
            conninfo_value(&self.replication.user),
            conninfo_value(application_name)
        )
    }

    /// `conninfo` plus the replication password, unless it carries one.
    pub(crate) fn with_replication_password(&self, conninfo: &str) -> String {
        match &self.replication.password {
            Some(p) if !conninfo.contains("password") => {
                format!("{conninfo} password={}", conninfo_value(p))
            }
            _ => conninfo.to_string(),
        }
    }

    pub(crate) fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }
}

/// Quotes a libpq conninfo value when it needs it.
/// An `initdb` option the agent may pass: an option (not a positional
/// data directory), and not one that names the data directory itself.
fn initdb_option_allowed(o: &str) -> bool {
    let name = o.split('=').next().unwrap_or(o);
    o.starts_with('-') && !["-D", "--pgdata"].contains(&name) && !o.starts_with("-D")
}

pub(crate) fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=', '\t', '\n']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_errors_name_keys() {
        let c: PgConfig = toml::from_str("data_dir = \"/var/lib/postgresql/15/main\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.port, 5432);
        assert_eq!(c.maximum_lag_on_failover, 1 << 20);
        let key = |text: &str| match toml::from_str::<PgConfig>(text).unwrap().validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key(""), "postgres.data_dir");
        assert_eq!(key("data_dir = \"rel\""), "postgres.data_dir");
        assert_eq!(
            key("data_dir = \"/d\"\nquery_timeout = 0"),
            "postgres.query_timeout"
        );
        assert!(toml::from_str::<PgConfig>("data_dir = \"/d\"\nbogus = 1").is_err());
    }

    #[test]
    fn synchronous_keys_need_synchronous_mode_and_a_sane_count() {
        let key = |text: &str| match toml::from_str::<PgConfig>(text).unwrap().validate() {
            Err(ConfigError::Invalid { key, rule }) => format!("{key}: {rule}"),
            other => panic!("{other:?}"),
        };
        let e = key("data_dir = \"/d\"\nsynchronous_mode_strict = true");
        assert!(
            e.starts_with("postgres.synchronous_mode_strict: has no effect without"),
            "{e}"
        );
        let e = key("data_dir = \"/d\"\nsynchronous_mode = true\nsynchronous_node_count = 0");
        assert!(
            e.starts_with("postgres.synchronous_node_count: must be 1-64"),
            "{e}"
        );
        let e = key("data_dir = \"/d\"\nfailover_defer = -1");
        assert!(e.starts_with("postgres.failover_defer"), "{e}");
        let ok: PgConfig = toml::from_str(
            "data_dir = \"/d\"\nsynchronous_mode = true\nsynchronous_mode_strict = true\n\
             synchronous_quorum = true\nsynchronous_node_count = 2",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.failover_defer, 3.0);
    }

    #[test]
    fn initdb_options_that_name_the_data_directory_are_refused() {
        let mut c = PgConfig::with_data_dir("/d");
        c.initdb = vec!["--encoding=UTF8".into(), "-k".into()];
        assert!(c.validate().is_ok());
        for bad in ["-D/x", "--pgdata=/x", "/x", "-D"] {
            c.initdb = vec![bad.into()];
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("postgres.initdb:") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn conninfo_quotes_what_needs_it() {
        let mut c = PgConfig::with_data_dir("/d");
        c.replication.password = Some("it's secret".into());
        let info = c.replication_conninfo("10.0.0.1", 5433, "my node");
        assert_eq!(
            info,
            "host=10.0.0.1 port=5433 user=postgres application_name='my node'"
        );
        assert_eq!(
            c.with_replication_password(&info),
            format!("{info} password='it\\'s secret'")
        );
    }
}
