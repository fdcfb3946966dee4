//! The PostgreSQL driver: observes the local server (role, health, WAL
//! position) and carries out what the decision core asks (promote, fence,
//! start as a replica, rejoin, clone, bootstrap). It decides nothing itself.
//!
//! - Every query runs under a deadline: tokio-postgres has none of its own, so
//!   a stalled server would otherwise hang the agent. On a deadline the
//!   connection is dropped and a cancel request is sent (best effort).
//! - The fence ([`fence_by_scan`], in [`fence`], over the `/proc`
//!   scan of [`procscan`]) is synchronous and needs no tokio
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
//!
//! Layout: configuration lives in [`crate::config::postgres`] (re-exported
//! here); this module holds the errors, the observations and the driver;
//! [`procscan`] finds the cluster's processes, [`fence`] stops them,
//! `tools` runs `pg_ctl` & co. on the data directory, `sql` talks to the
//! server.

pub mod cgroup;
pub mod conf;
pub mod distro;
pub mod fence;
pub mod procscan;
mod remote;
mod slots;
mod sql;
mod tools;

pub use remote::checkpoint_location;

pub use crate::config::postgres::{PgConfig, ReplicationConfig, REWIND_GRANTS_SQL};
pub use cgroup::PgCgroup;
pub use distro::{distro_unit_conflict, distro_unit_conflict_in, mark_managed, MANAGED_DIR};
pub use fence::{
    fence_by_cgroup, fence_by_scan, fence_by_scan_in, read_postmaster_pid, StopHow, StopReport,
    Switchover,
};
pub use procscan::{cluster_processes, process_alive, ProcFs};
pub use sql::synchronous_standby_names_for;

use crate::config::ConfigError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

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
    /// The fence cannot see everything that could be the cluster, so it
    /// cannot confirm the stop: nothing may follow from it (no release, no
    /// disarm).
    #[error("fence NOT confirmed: it cannot see whether PostgreSQL in {} is stopped: {why}", data_dir.display())]
    FenceBlind { data_dir: PathBuf, why: String },
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
    /// The cgroup PostgreSQL runs in, when one is delegated to the agent
    /// ([`cgroup`]); None: the fence scans `/proc`.
    cgroup: Option<PgCgroup>,
    /// The scope's cluster-wide parameters as last read from etcd (see
    /// [`conf`]); the node's own `[postgres.parameters]` win over them.
    cluster_params: std::sync::Arc<std::sync::Mutex<crate::config::pg_params::Params>>,
    /// This node's replication slot on the leader (`primary_slot_name`).
    slot_name: Option<String>,
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
    ///
    /// Where systemd delegated the agent's cgroup (`Delegate=yes`), this also
    /// moves the agent into the leaf `agent` and prepares `postgres`, where
    /// every PostgreSQL process will be started ([`PgCgroup::delegated`]).
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
            cgroup: PgCgroup::delegated()?,
            cluster_params: Default::default(),
            slot_name: None,
        })
    }

    /// The same driver with PostgreSQL in `cgroup` (tests; the agent's is
    /// found by [`Pg::new`]), or in none (`/proc` scan only).
    pub fn with_cgroup(mut self, cgroup: Option<PgCgroup>) -> Pg {
        self.cgroup = cgroup;
        self
    }

    /// The cgroup PostgreSQL is started in, if any.
    pub fn cgroup(&self) -> Option<&PgCgroup> {
        self.cgroup.as_ref()
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
}
