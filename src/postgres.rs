//! The PostgreSQL driver: observes the local server (role, health, WAL
//! position) and carries out what the decision core asks (promote, fence,
//! start as a replica, rejoin, clone, bootstrap). It decides nothing itself.
//!
//! - Every query runs under a deadline: tokio-postgres has none of its own, so
//!   a stalled server would otherwise hang the agent. On a deadline the
//!   connection is dropped and a cancel request is sent (best effort).
//! - The fence ([`stop_fast_fence_blocking`]) is synchronous and needs no tokio
//!   runtime, so the independent deadline timer of FENCING.md rule 3 can run it
//!   from a plain thread. It signals processes itself rather than spawning
//!   `pg_ctl stop -m immediate` (which sends the same SIGQUIT): a fork under
//!   memory pressure must not be what stands between a stalled primary and its
//!   fence.
//! - Tools (`pg_ctl`, `pg_rewind`, `pg_basebackup`, `initdb`, `postgres
//!   --single`) run as `postgres.os_user` when the agent is root.
//! - Standby configuration: `standby.signal` plus a `primary_conninfo` line the
//!   driver owns in `postgresql.auto.conf` (where `pg_basebackup -R` puts it
//!   too). It is rewritten after every clone and rewind, because both copy the
//!   source's `postgresql.auto.conf`.
//! - The server is started with `-c port=` (and `-c unix_socket_directories=`
//!   when `postgres.host` is a directory) so that the agent always talks to the
//!   server it started, whatever a copied `postgresql.conf` says.

use crate::config::ConfigError;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
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

// ---------------------------------------------------------------------------
// Configuration

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

/// What a non-superuser replication role needs for [`Pg::rejoin`]: pg_rewind's
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
        for (key, v) in [
            ("postgres.connect_timeout", self.connect_timeout),
            ("postgres.query_timeout", self.query_timeout),
            ("postgres.promote_timeout", self.promote_timeout),
            ("postgres.stop_timeout", self.stop_timeout),
            ("postgres.kill_timeout", self.kill_timeout),
            ("postgres.start_timeout", self.start_timeout),
            ("postgres.clone_timeout", self.clone_timeout),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 86400.0 {
                return Err(ConfigError::Invalid {
                    key,
                    rule: format!("{v} is not a number of seconds in (0, 86400]"),
                });
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
    fn with_replication_password(&self, conninfo: &str) -> String {
        match &self.replication.password {
            Some(p) if !conninfo.contains("password") => {
                format!("{conninfo} password={}", conninfo_value(p))
            }
            _ => conninfo.to_string(),
        }
    }

    fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }
}

/// Quotes a libpq conninfo value when it needs it.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=', '\t', '\n']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

// ---------------------------------------------------------------------------
// Errors

/// Why the driver could not observe or act. Each names its cause.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL is not installed at postgres.bin_dir = {bin_dir}: no executable {missing} there")]
    NotInstalled { bin_dir: PathBuf, missing: String },
    #[error("postgres.data_dir = {path} is not a PostgreSQL data directory: {reason}")]
    WrongDataDir { path: PathBuf, reason: String },
    #[error("postgres.os_user = {0:?} does not exist")]
    NoSuchOsUser(String),
    #[error("authentication failed for user {user:?} (SQLSTATE {sqlstate}): {message}; check postgres.user / postgres.password and pg_hba.conf")]
    Auth {
        user: String,
        sqlstate: String,
        message: String,
    },
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what} failed (SQLSTATE {sqlstate}): {message}")]
    Sql {
        what: String,
        sqlstate: String,
        message: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    State(String),
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program} did not finish within {after:?} and was killed")]
    ToolTimeout { program: String, after: Duration },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("not eligible for promotion: {0}")]
    NotEligible(NotEligible),
    #[error("cannot signal PostgreSQL process {pid}: {source} (the agent must run as root or as postgres.os_user)")]
    Signal { pid: i32, source: std::io::Error },
    #[error("fence NOT confirmed after {took:?}: PostgreSQL processes still alive: {survivors:?}")]
    FenceUnconfirmed { took: Duration, survivors: Vec<i32> },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

// ---------------------------------------------------------------------------
// Observations

/// A WAL position (`pg_lsn`), in bytes since the start of WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN X/Y"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("{s:?}: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("{s:?}: {e}"))?;
        if hi > 0xffff_ffff || lo > 0xffff_ffff {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// No postmaster, connection refused, or the server is starting / stopping.
    Down,
}

/// Where the local server's WAL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPosition {
    /// Primary: the current timeline. Replica: the timeline of the WAL last
    /// received, or of the last checkpoint when no WAL receiver runs.
    pub timeline: u32,
    /// Primary only: `pg_current_wal_lsn()`.
    pub current: Option<Lsn>,
    /// Replica only: `pg_last_wal_receive_lsn()` (None before anything streamed).
    pub receive: Option<Lsn>,
    /// Replica only: `pg_last_wal_replay_lsn()`.
    pub replay: Option<Lsn>,
}

impl WalPosition {
    /// The position that counts for eligibility: a primary's current LSN; a
    /// replica's furthest of received and replayed (promotion replays all it received).
    pub fn position(&self) -> Option<Lsn> {
        self.current.or(match (self.receive, self.replay) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        })
    }
}

/// Role and WAL position from one round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub role: Role,
    /// None when Down.
    pub wal: Option<WalPosition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// First line of `postmaster.pid`, when that file exists.
    pub postmaster_pid: Option<i32>,
    /// That pid is a live PostgreSQL process running in our data directory.
    pub postmaster_alive: bool,
    /// A connection succeeded and answered `SELECT 1` within the deadlines.
    pub accepts_connections: bool,
    /// Why it does not accept connections, when it does not.
    pub problem: Option<String>,
}

/// Why a replica must not be promoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotEligible {
    #[error("this node is down")]
    Down,
    #[error("this node has no WAL position (nothing received yet)")]
    NoPosition,
    #[error("replica is {lag_bytes} bytes behind the leader ({local} < {leader}), more than postgres.maximum_lag_on_failover = {max}")]
    Lagging {
        lag_bytes: u64,
        max: u64,
        local: Lsn,
        leader: Lsn,
    },
}

/// Rule for promotion eligibility: `local` is at most `max_lag` bytes behind
/// `leader_lsn` (the leader's last known position).
pub fn eligible(local: &WalPosition, leader_lsn: Lsn, max_lag: u64) -> Result<(), NotEligible> {
    let pos = local.position().ok_or(NotEligible::NoPosition)?;
    let lag = leader_lsn.0.saturating_sub(pos.0);
    if lag > max_lag {
        return Err(NotEligible::Lagging {
            lag_bytes: lag,
            max: max_lag,
            local: pos,
            leader: leader_lsn,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    Promoted,
    /// `pg_promote` said "recovery is not in progress" (SQLSTATE 55000).
    AlreadyPrimary,
}

/// What a data directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDirState {
    Missing,
    Empty,
    /// Holds `PG_VERSION` with this major version.
    Cluster {
        version: String,
    },
    /// Holds files but no `PG_VERSION`.
    NotACluster,
}

/// What `rejoin` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejoinReport {
    /// A single-user run completed crash recovery (the node had been stopped
    /// immediately or killed; pg_rewind requires a clean shutdown).
    pub crash_recovery: Option<Duration>,
    /// pg_rewind's run time, and whether it copied anything.
    pub rewind: Duration,
    pub rewound: bool,
}

// ---------------------------------------------------------------------------
// The fence (synchronous, no tokio)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopHow {
    /// Nothing of PostgreSQL was running in the data directory.
    AlreadyStopped,
    /// The immediate stop (SIGQUIT) finished within its bound.
    Immediate,
    /// The postmaster and every PostgreSQL process were SIGKILLed.
    Killed,
}

/// A confirmed stop: the postmaster and every process in the data directory are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    pub how: StopHow,
    pub took: Duration,
    pub postmaster: Option<i32>,
    /// Pids that received SIGKILL.
    pub killed: Vec<i32>,
}

struct ProcInfo {
    ppid: i32,
    zombie: bool,
    /// Start time in clock ticks since boot: with the pid, the process's identity.
    start: u64,
}

fn read_proc_stat(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parens: the fields after the last ')' are fixed
    // (state is field 3, ppid 4, starttime 22).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(ProcInfo {
        ppid: rest.get(1)?.parse().ok()?,
        zombie: matches!(*rest.first()?, "Z" | "X"),
        start: rest.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` is a live process (a zombie is dead: it runs nothing, commits nothing).
pub fn process_alive(pid: i32) -> bool {
    read_proc_stat(pid).is_some_and(|p| !p.zombie)
}

/// A process by identity, so a recycled pid is never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Proc {
    pid: i32,
    start: u64,
}

impl Proc {
    fn of(pid: i32) -> Option<Proc> {
        read_proc_stat(pid).filter(|p| !p.zombie).map(|p| Proc {
            pid,
            start: p.start,
        })
    }
    fn alive(&self) -> bool {
        Proc::of(self.pid) == Some(*self)
    }
    /// Signals the process if it is still the same one; gone is fine.
    fn signal(&self, sig: libc::c_int) -> Result<(), PgError> {
        if !self.alive() {
            return Ok(());
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(self.pid, sig) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(PgError::Signal {
            pid: self.pid,
            source: e,
        })
    }
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every live PostgreSQL server process of this cluster: PostgreSQL processes
/// chdir to their data directory, so this also finds backends orphaned by a
/// postmaster that died earlier (e.g. OOM-killed), which a ppid walk cannot.
pub fn cluster_processes(data_dir: &Path) -> Vec<i32> {
    cluster_procs(data_dir).into_iter().map(|p| p.pid).collect()
}

fn cluster_procs(data_dir: &Path) -> BTreeSet<Proc> {
    let want = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_owned());
    // A removed directory still holds its processes: the kernel shows it so.
    let deleted = PathBuf::from(format!("{} (deleted)", want.display()));
    all_pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd == want || cwd == deleted)
                && std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .and_then(|p| p.file_name()?.to_str().map(|n| n.starts_with("postgres")))
                    .unwrap_or(false)
        })
        .filter_map(Proc::of)
        .collect()
}

/// All live descendants of `roots`, from one scan of /proc.
fn descendants(roots: &BTreeSet<Proc>) -> BTreeSet<Proc> {
    let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
    for pid in all_pids() {
        if let Some(p) = read_proc_stat(pid) {
            if !p.zombie {
                children.entry(p.ppid).or_default().push(Proc {
                    pid,
                    start: p.start,
                });
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut todo: Vec<i32> = roots.iter().map(|p| p.pid).collect();
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            if out.insert(c) {
                todo.push(c.pid);
            }
        }
    }
    out
}

/// The pid in the first line of `postmaster.pid`, if the file exists and parses.
pub fn read_postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok().filter(|&p| p > 0)
}

/// What is still alive of `watched`, plus any process now in the data directory.
fn survivors(data_dir: &Path, watched: &BTreeSet<Proc>) -> BTreeSet<Proc> {
    let mut left: BTreeSet<Proc> = watched.iter().copied().filter(Proc::alive).collect();
    left.extend(cluster_procs(data_dir));
    left
}

fn wait_gone(data_dir: &Path, watched: &BTreeSet<Proc>, until: Instant) -> BTreeSet<Proc> {
    loop {
        let left = survivors(data_dir, watched);
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Demotion so that no backend can commit (FENCING.md rule 3): an immediate
/// stop (SIGQUIT to the postmaster, as `pg_ctl stop -m immediate` does) bounded
/// by `immediate`; if anything is left after that, freeze the postmaster and
/// every process of the cluster with SIGSTOP (so none can fork), then SIGKILL
/// them all, postmaster first (a live postmaster would restart crashed
/// children). Returns only once the postmaster and every PostgreSQL process of
/// the data directory are confirmed gone; an error if that cannot be confirmed
/// within `kill` more.
///
/// Synchronous and runtime-free so a plain thread can call it.
pub fn stop_fast_fence_blocking(
    data_dir: &Path,
    immediate: Duration,
    kill: Duration,
) -> Result<StopReport, PgError> {
    let t0 = Instant::now();
    // Processes are found by their cwd: a path that cannot be resolved (an I/O
    // error, a vanished mount) might find none and "confirm" a stop that did
    // not happen, so say so instead. A missing directory still finds processes
    // left in it (as "<dir> (deleted)").
    if let Err(e) = data_dir.canonicalize() {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io_err(format!(
                "fence cannot resolve the data directory {} to find PostgreSQL's processes",
                data_dir.display()
            ))(e));
        }
    }
    let mut watched = cluster_procs(data_dir);
    // A pid file can outlive its server (and the pid be reused): trust it only
    // for a process that runs in this data directory.
    let pm = read_postmaster_pid(data_dir)
        .and_then(|pid| watched.iter().copied().find(|p| p.pid == pid));
    if watched.is_empty() {
        return Ok(StopReport {
            how: StopHow::AlreadyStopped,
            took: t0.elapsed(),
            postmaster: None,
            killed: Vec::new(),
        });
    }
    if let Some(pm) = pm {
        watched.extend(descendants(&BTreeSet::from([pm])));
        pm.signal(libc::SIGQUIT)?;
        if wait_gone(data_dir, &watched, t0 + immediate).is_empty() {
            return Ok(StopReport {
                how: StopHow::Immediate,
                took: t0.elapsed(),
                postmaster: Some(pm.pid),
                killed: Vec::new(),
            });
        }
    }
    // Freeze until the set is closed (a stopped process cannot fork), then kill.
    for _ in 0..50 {
        let mut now = survivors(data_dir, &watched);
        now.extend(descendants(&now));
        for p in &now {
            p.signal(libc::SIGSTOP)?;
        }
        let grew = !now.is_subset(&watched);
        watched.extend(now);
        if !grew {
            break;
        }
    }
    let mut killed = Vec::new();
    if let Some(pm) = pm.filter(Proc::alive) {
        pm.signal(libc::SIGKILL)?;
        killed.push(pm.pid);
    }
    for p in &watched {
        if Some(*p) != pm && p.alive() {
            p.signal(libc::SIGKILL)?;
            killed.push(p.pid);
        }
    }
    let left = wait_gone(data_dir, &watched, Instant::now() + kill);
    if !left.is_empty() {
        return Err(PgError::FenceUnconfirmed {
            took: t0.elapsed(),
            survivors: left.iter().map(|p| p.pid).collect(),
        });
    }
    Ok(StopReport {
        how: StopHow::Killed,
        took: t0.elapsed(),
        postmaster: pm.map(|p| p.pid),
        killed,
    })
}

// ---------------------------------------------------------------------------
// The driver

/// The driver of the local PostgreSQL.
#[derive(Debug, Clone)]
pub struct Pg {
    cfg: PgConfig,
    /// uid/gid of os_user when tools must drop root to run.
    run_as: Option<(u32, u32)>,
    os_home: PathBuf,
    /// Major version of the binaries in bin_dir, e.g. "15".
    major: String,
}

fn lookup_user(name: &str) -> Option<(u32, u32, PathBuf)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at once
    // (the driver is built once, at start-up, before threads race on it).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    unsafe {
        let home = std::ffi::CStr::from_ptr((*pw).pw_dir)
            .to_string_lossy()
            .into_owned();
        Some(((*pw).pw_uid, (*pw).pw_gid, PathBuf::from(home)))
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Pg {
    /// Validates the configuration and checks that PostgreSQL is installed at
    /// `bin_dir` and that `os_user` exists. The data directory is checked by
    /// each action (an empty one is fine for `clone_from` / `initdb`).
    pub fn new(cfg: PgConfig) -> Result<Pg, PgError> {
        cfg.validate()?;
        for tool in ["pg_ctl", "postgres"] {
            if !is_executable(&cfg.bin_dir.join(tool)) {
                return Err(PgError::NotInstalled {
                    bin_dir: cfg.bin_dir.clone(),
                    missing: tool.into(),
                });
            }
        }
        let (uid, gid, home) =
            lookup_user(&cfg.os_user).ok_or_else(|| PgError::NoSuchOsUser(cfg.os_user.clone()))?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // "postgres (PostgreSQL) 15.20 (Debian ...)": the major version, to
        // catch a data directory of another version early.
        let out = std::process::Command::new(cfg.bin_dir.join("postgres"))
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!(
                "running {}/postgres --version",
                cfg.bin_dir.display()
            )))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| PgError::NotInstalled {
                bin_dir: cfg.bin_dir.clone(),
                missing: format!("working postgres (--version printed {:?})", text.trim()),
            })?
            .to_string();
        Ok(Pg {
            run_as: (root && uid != 0).then_some((uid, gid)),
            os_home: home,
            major,
            cfg,
        })
    }

    pub fn config(&self) -> &PgConfig {
        &self.cfg
    }

    pub fn data_dir(&self) -> &Path {
        self.cfg.data_dir()
    }

    /// Major version of the PostgreSQL binaries in `bin_dir`, e.g. "15".
    pub fn major_version(&self) -> &str {
        &self.major
    }

    fn target(&self) -> String {
        format!("{}:{}", self.cfg.host, self.cfg.port)
    }

    fn log_file(&self) -> PathBuf {
        self.cfg
            .log_file
            .clone()
            .unwrap_or_else(|| self.data_dir().join("leasedog-postmaster.log"))
    }

    // --- data directory ---------------------------------------------------

    pub fn data_dir_state(&self) -> Result<DataDirState, PgError> {
        let d = self.data_dir();
        let mut rd = match std::fs::read_dir(d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DataDirState::Missing),
            Err(e) => return Err(io_err(format!("reading {}", d.display()))(e)),
        };
        if rd.next().is_none() {
            return Ok(DataDirState::Empty);
        }
        match std::fs::read_to_string(d.join("PG_VERSION")) {
            Ok(v) => Ok(DataDirState::Cluster {
                version: v.trim().to_string(),
            }),
            Err(_) => Ok(DataDirState::NotACluster),
        }
    }

    /// The data directory must hold a cluster (`PG_VERSION`).
    pub fn require_cluster(&self) -> Result<String, PgError> {
        let reason = match self.data_dir_state()? {
            DataDirState::Cluster { version } if version == self.major => return Ok(version),
            DataDirState::Cluster { version } => {
                return Err(PgError::WrongDataDir {
                    path: self.data_dir().to_owned(),
                    reason: format!(
                        "it holds PostgreSQL {version}, but postgres.bin_dir = {} is PostgreSQL {}",
                        self.cfg.bin_dir.display(),
                        self.major
                    ),
                })
            }
            DataDirState::Missing => "it does not exist",
            DataDirState::Empty => "it is empty (clone or initdb first)",
            DataDirState::NotACluster => "it has no PG_VERSION file",
        };
        Err(PgError::WrongDataDir {
            path: self.data_dir().to_owned(),
            reason: reason.into(),
        })
    }

    fn require_empty(&self) -> Result<(), PgError> {
        match self.data_dir_state()? {
            DataDirState::Missing | DataDirState::Empty => Ok(()),
            _ => Err(PgError::WrongDataDir {
                path: self.data_dir().to_owned(),
                reason: "it is not empty: refusing to overwrite it".into(),
            }),
        }
    }

    /// Creates the data directory (mode 700, owned by os_user) if missing.
    fn make_data_dir(&self) -> Result<(), PgError> {
        let d = self.data_dir();
        std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", d.display())))?;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod 700 {}", d.display())))
    }

    /// Writes a file in the data directory atomically, owned by os_user.
    fn write_owned(&self, name: &str, text: &str) -> Result<(), PgError> {
        let path = self.data_dir().join(name);
        let tmp = self.data_dir().join(format!("{name}.leasedog-tmp"));
        std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", tmp.display())))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))
    }

    fn remove_if_present(&self, name: &str) -> Result<(), PgError> {
        let p = self.data_dir().join(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(format!("removing {}", p.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// `standby.signal` plus our `primary_conninfo` line in `postgresql.auto.conf`
    /// (any other `primary_conninfo` line there is dropped).
    pub fn write_standby_config(&self, leader_conninfo: &str) -> Result<(), PgError> {
        let auto = self.data_dir().join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&auto).unwrap_or_default();
        let mut text: String = old
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!(
            "primary_conninfo = '{}'  # managed by leasedog\n",
            self.cfg
                .with_replication_password(leader_conninfo)
                .replace('\\', "\\\\")
                .replace('\'', "''")
        ));
        self.write_owned("postgresql.auto.conf", &text)?;
        self.remove_if_present("recovery.signal")?;
        self.write_owned("standby.signal", "")
    }

    // --- tools ------------------------------------------------------------

    fn tool(&self, name: &str) -> Result<tokio::process::Command, PgError> {
        let path = self.cfg.bin_dir.join(name);
        if !is_executable(&path) {
            return Err(PgError::NotInstalled {
                bin_dir: self.cfg.bin_dir.clone(),
                missing: name.into(),
            });
        }
        let mut c = tokio::process::Command::new(path);
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.current_dir("/")
            .env("HOME", &self.os_home)
            .env("LC_ALL", "C")
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = &self.cfg.replication.password {
            c.env("PGPASSWORD", p); // tools only talk to the leader
        }
        Ok(c)
    }

    async fn run(
        &self,
        name: &str,
        mut c: tokio::process::Command,
        within: Duration,
    ) -> Result<String, PgError> {
        let child = c.spawn().map_err(io_err(format!("starting {name}")))?;
        let out = match tokio::time::timeout(within, child.wait_with_output()).await {
            Err(_) => {
                return Err(PgError::ToolTimeout {
                    program: name.into(),
                    after: within,
                })
            }
            Ok(r) => r.map_err(io_err(format!("running {name}")))?,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(PgError::Tool {
                program: name.into(),
                status: out.status.to_string(),
                stderr: format!("{}{}", stderr.trim(), stdout.trim()),
            });
        }
        Ok(stdout + &String::from_utf8_lossy(&out.stderr))
    }

    fn pg_ctl_dir(&self) -> &Path {
        self.cfg.config_dir.as_deref().unwrap_or(self.data_dir())
    }

    async fn pg_ctl_start(&self) -> Result<(), PgError> {
        self.require_cluster()?;
        if let Some(pid) = self.live_postmaster() {
            return Err(PgError::State(format!(
                "PostgreSQL is already running (postmaster {pid}): stop it first"
            )));
        }
        self.clear_stale_lock_files().await?;
        let mut opts = format!("-c port={}", self.cfg.port);
        if self.cfg.host.starts_with('/') {
            opts.push_str(&format!(" -c unix_socket_directories='{}'", self.cfg.host));
        }
        let t = PgConfig::secs(self.cfg.start_timeout);
        let mut c = self.tool("pg_ctl")?;
        c.arg("start")
            .arg("-w")
            .arg("-t")
            .arg(t.as_secs().max(1).to_string())
            .arg("-D")
            .arg(self.pg_ctl_dir())
            .arg("-l")
            .arg(self.log_file())
            .arg("-o")
            .arg(opts);
        self.run("pg_ctl start", c, t + Duration::from_secs(5))
            .await?;
        Ok(())
    }

    /// A killed postmaster leaves `postmaster.pid` and the socket's lock
    /// file naming it, and PostgreSQL refuses to start while that pid exists,
    /// even as a zombie not yet reaped (init can take a moment). So wait for
    /// the reap (bounded); if it never comes, and no live process of the
    /// cluster is left, the files guard nothing: remove them.
    async fn clear_stale_lock_files(&self) -> Result<(), PgError> {
        let Some(pid) = read_postmaster_pid(self.data_dir()) else {
            return Ok(());
        };
        if !cluster_processes(self.data_dir()).is_empty() {
            return Ok(()); // not stale: let pg_ctl say so
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
            if process_alive(pid) {
                return Ok(()); // a reused pid, not ours: PostgreSQL copes with that itself
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(());
        }
        self.remove_if_present("postmaster.pid")?;
        if self.cfg.host.starts_with('/') {
            let lock = Path::new(&self.cfg.host).join(format!(".s.PGSQL.{}.lock", self.cfg.port));
            let names_pid = std::fs::read_to_string(&lock)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
                == Some(pid);
            if names_pid {
                let _ = std::fs::remove_file(&lock);
            }
        }
        Ok(())
    }

    /// Starts as a standby of `leader_conninfo` (see [`PgConfig::replication_conninfo`]).
    pub async fn start_as_replica(&self, leader_conninfo: &str) -> Result<(), PgError> {
        self.require_cluster()?;
        self.write_standby_config(leader_conninfo)?;
        self.pg_ctl_start().await
    }

    /// Starts as a primary (bootstrap): removes `standby.signal`/`recovery.signal` first.
    pub async fn start_primary(&self) -> Result<(), PgError> {
        self.require_cluster()?;
        self.remove_if_present("standby.signal")?;
        self.remove_if_present("recovery.signal")?;
        self.pg_ctl_start().await
    }

    /// A clean stop (`pg_ctl stop -m fast`) for switchovers; not a fence.
    pub async fn stop_clean(&self) -> Result<(), PgError> {
        if self.live_postmaster().is_none() {
            return Ok(());
        }
        let t = PgConfig::secs(self.cfg.start_timeout);
        let mut c = self.tool("pg_ctl")?;
        c.args(["stop", "-w", "-m", "fast", "-t"])
            .arg(t.as_secs().max(1).to_string())
            .arg("-D")
            .arg(self.pg_ctl_dir());
        self.run("pg_ctl stop", c, t + Duration::from_secs(5))
            .await
            .map(|_| ())
    }

    /// The fence from a plain thread (no tokio): the deadline timer of
    /// FENCING.md rule 3 holds a clone of the driver and calls this.
    pub fn stop_fast_fence_sync(&self) -> Result<StopReport, PgError> {
        stop_fast_fence_blocking(
            self.data_dir(),
            PgConfig::secs(self.cfg.stop_timeout),
            PgConfig::secs(self.cfg.kill_timeout),
        )
    }

    /// The fence, for async callers: see [`stop_fast_fence_blocking`]. Uses
    /// `postgres.stop_timeout` and `postgres.kill_timeout`.
    pub async fn stop_fast_fence(&self) -> Result<StopReport, PgError> {
        let data = self.data_dir().to_owned();
        let (imm, kill) = (
            PgConfig::secs(self.cfg.stop_timeout),
            PgConfig::secs(self.cfg.kill_timeout),
        );
        tokio::task::spawn_blocking(move || stop_fast_fence_blocking(&data, imm, kill))
            .await
            .map_err(|e| PgError::State(format!("fence thread failed: {e}")))?
    }

    /// `initdb` of an empty or missing data directory (first node of a scope only).
    pub async fn initdb(&self, extra_args: &[&str]) -> Result<(), PgError> {
        self.require_empty()?;
        self.make_data_dir()?;
        let mut c = self.tool("initdb")?;
        c.arg("-D")
            .arg(self.data_dir())
            .arg("--data-checksums")
            .args(extra_args);
        self.run("initdb", c, PgConfig::secs(self.cfg.clone_timeout))
            .await
            .map(|_| ())
    }

    /// Fills an empty data directory from the leader (`pg_basebackup -X stream
    /// -R`). Does not start the server: call [`Pg::start_as_replica`].
    pub async fn clone_from(&self, leader_conninfo: &str) -> Result<Duration, PgError> {
        self.require_empty()?;
        self.make_data_dir()?;
        let t0 = Instant::now();
        let mut c = self.tool("pg_basebackup")?;
        c.arg("-D")
            .arg(self.data_dir())
            .args(["-X", "stream", "-R", "-c", "fast", "-d"])
            .arg(leader_conninfo);
        self.run("pg_basebackup", c, PgConfig::secs(self.cfg.clone_timeout))
            .await?;
        self.write_standby_config(leader_conninfo)?;
        Ok(t0.elapsed())
    }

    /// `Database cluster state` from `pg_controldata`.
    pub async fn control_state(&self) -> Result<String, PgError> {
        self.require_cluster()?;
        let mut c = self.tool("pg_controldata")?;
        c.arg("-D").arg(self.data_dir());
        let out = self
            .run(
                "pg_controldata",
                c,
                PgConfig::secs(self.cfg.query_timeout) * 5,
            )
            .await?;
        out.lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| PgError::State("pg_controldata printed no cluster state".into()))
    }

    /// Makes a stopped former primary (or any stopped node) a standby of the
    /// leader: crash recovery in single-user mode if it was not shut down
    /// cleanly (pg_rewind requires a clean shutdown; single-user mode opens no
    /// port, so the node cannot take writes meanwhile), `pg_rewind` (which
    /// itself finds out whether the timelines diverged and does nothing if
    /// not), then [`Pg::start_as_replica`].
    pub async fn rejoin(&self, leader_conninfo: &str) -> Result<RejoinReport, PgError> {
        self.require_cluster()?;
        if let Some(pid) = self.live_postmaster() {
            return Err(PgError::State(format!(
                "PostgreSQL is running (postmaster {pid}): fence or stop it before rejoin"
            )));
        }
        let mut crash_recovery = None;
        let state = self.control_state().await?;
        if state != "shut down" && state != "shut down in recovery" {
            // Single-user mode refuses standby mode, and checks the pid file too.
            self.clear_stale_lock_files().await?;
            self.remove_if_present("standby.signal")?;
            self.remove_if_present("recovery.signal")?;
            let t0 = Instant::now();
            let mut c = self.tool("postgres")?;
            c.arg("--single")
                .arg("-D")
                .arg(self.pg_ctl_dir())
                .args(["-c", "archive_mode=off", "-c"])
                .arg(format!("port={}", self.cfg.port))
                .arg(&self.cfg.dbname);
            let r = self
                .run(
                    "postgres --single (crash recovery)",
                    c,
                    PgConfig::secs(self.cfg.start_timeout),
                )
                .await;
            // Whatever happened, a later start by hand must come up read-only.
            self.write_owned("standby.signal", "")?;
            r?;
            crash_recovery = Some(t0.elapsed());
        }
        let source = format!(
            "{leader_conninfo} dbname={}",
            conninfo_value(&self.cfg.dbname)
        );
        self.checkpoint_source(&source).await?;
        let t0 = Instant::now();
        let mut c = self.tool("pg_rewind")?;
        c.arg("--target-pgdata")
            .arg(self.data_dir())
            .arg(format!("--source-server={source}"));
        let r = self
            .run("pg_rewind", c, PgConfig::secs(self.cfg.clone_timeout))
            .await;
        // pg_rewind may drop files the source lacks; a node that fails here
        // must not start as a primary by hand either.
        self.write_owned("standby.signal", "")?;
        let out = r?;
        let rewind = t0.elapsed();
        let rewound = !out.contains("no rewind required");
        self.start_as_replica(leader_conninfo).await?;
        Ok(RejoinReport {
            crash_recovery,
            rewind,
            rewound,
        })
    }

    /// pg_rewind reads the source's timeline from its control file, which a
    /// promotion updates only at the next checkpoint: until then it reports
    /// "same timeline, no rewind required" for a diverged node, which would
    /// then fail to stream. So make the source checkpoint when its control
    /// file lags its current timeline.
    async fn checkpoint_source(&self, source: &str) -> Result<(), PgError> {
        const Q: &str = "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),
              ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";
        // CHECKPOINT on a busy source can take a while: bound it like a start.
        let within = PgConfig::secs(self.cfg.start_timeout);
        let what = "checkpointing the rewind source";
        let mut cfg: tokio_postgres::Config = source
            .parse()
            .map_err(|e| PgError::State(format!("leader conninfo is not valid: {e}")))?;
        let leader = cfg
            .get_hosts()
            .iter()
            .zip(cfg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(h, port)| match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect::<Vec<_>>()
            .join(",");
        if let (None, Some(p)) = (cfg.get_password(), &self.cfg.replication.password) {
            cfg.password(p.as_bytes());
        }
        let r = tokio::time::timeout(within, async {
            let (client, conn) = cfg.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let row = client.query_one(Q, &[]).await?;
            let (ckpt, cur): (i32, i32) = (row.get(0), row.get(1));
            if ckpt != cur {
                // Immediate: the new primary has just been promoted.
                client.batch_execute("CHECKPOINT").await?;
            }
            task.abort();
            Ok::<_, tokio_postgres::Error>(())
        });
        match r.await {
            Err(_) => Err(PgError::Timeout {
                what: what.into(),
                after: within,
            }),
            Ok(Err(e)) => Err(match self.classify(what, e) {
                PgError::Auth {
                    sqlstate, message, ..
                } => PgError::Auth {
                    user: format!("{} (replication)", self.cfg.replication.user),
                    sqlstate,
                    message,
                },
                PgError::Connect { message, .. } => PgError::Connect {
                    target: format!("the leader (rewind source) {leader}"),
                    message,
                },
                other => other,
            }),
            Ok(Ok(())) => Ok(()),
        }
    }

    // --- observations -----------------------------------------------------

    /// The postmaster's pid if it is alive and runs in our data directory.
    pub fn live_postmaster(&self) -> Option<i32> {
        let pid = read_postmaster_pid(self.data_dir())?;
        cluster_processes(self.data_dir())
            .contains(&pid)
            .then_some(pid)
    }

    fn classify(&self, what: &str, e: tokio_postgres::Error) -> PgError {
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
    async fn with_client<T, F>(&self, what: &str, within: Duration, f: F) -> Result<T, PgError>
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
    fn lsn_round_trips() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn eligibility_uses_furthest_of_receive_and_replay() {
        let w = WalPosition {
            timeline: 1,
            current: None,
            receive: Some(Lsn(5 << 20)),
            replay: Some(Lsn(1 << 20)),
        };
        assert_eq!(eligible(&w, Lsn(6 << 20), 1 << 20), Ok(()));
        let e = eligible(&w, Lsn((6 << 20) + 1), 1 << 20).unwrap_err();
        assert!(matches!(e, NotEligible::Lagging { lag_bytes, .. } if lag_bytes == (1 << 20) + 1));
        let none = WalPosition {
            timeline: 1,
            current: None,
            receive: None,
            replay: None,
        };
        assert_eq!(eligible(&none, Lsn(0), 0), Err(NotEligible::NoPosition));
    }

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
    fn synchronous_names_quote_identifiers() {
        assert_eq!(synchronous_standby_names_for(&[]), "");
        let names = ["b".to_string(), "my \"odd\" node".to_string()];
        assert_eq!(
            synchronous_standby_names_for(&names),
            r#"FIRST 1 ("b", "my ""odd"" node")"#
        );
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
