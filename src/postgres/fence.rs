//! The fence (synchronous, no tokio): FENCING.md rule 3's stop of PostgreSQL,
//! confirmed by the [`super::procscan`] of `/proc`.

use super::procscan::{cluster_processes, cluster_procs, descendants, Proc};
use super::{io_err, Pg, PgConfig, PgError};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

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

impl Pg {
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

    // --- observations -----------------------------------------------------

    /// The postmaster's pid if it is alive and runs in our data directory.
    pub fn live_postmaster(&self) -> Option<i32> {
        let pid = read_postmaster_pid(self.data_dir())?;
        cluster_processes(self.data_dir())
            .contains(&pid)
            .then_some(pid)
    }
}
