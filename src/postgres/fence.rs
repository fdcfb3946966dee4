//! The fence (synchronous, no tokio): FENCING.md rule 3's stop of PostgreSQL.
//! Where the agent has a delegated cgroup, the whole [`super::cgroup`] is
//! frozen and killed and confirmed empty; the [`super::procscan`] of `/proc`
//! then stops anything of the data directory outside it, and is the whole
//! fence where there is no cgroup.

use super::cgroup::PgCgroup;
use super::procscan::{cluster_processes, Proc, ProcFs};
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

/// How a planned step-down ([`Pg::stop_for_switchover`]) stopped PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switchover {
    /// The fast shutdown finished in time: shutdown checkpoint written and
    /// sent to every connected standby.
    Fast { took: Duration },
    /// The fast shutdown failed or ran out of time (or nothing was running):
    /// the immediate fence stopped it.
    Fenced(StopReport),
}

/// The pid in the first line of `postmaster.pid`, if the file exists and parses.
pub fn read_postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok().filter(|&p| p > 0)
}

/// What is still alive of `watched`, plus any process now in the data directory.
fn survivors(fs: &ProcFs, data_dir: &Path, watched: &BTreeSet<Proc>) -> BTreeSet<Proc> {
    let mut left: BTreeSet<Proc> = watched.iter().copied().filter(|p| p.alive(fs)).collect();
    left.extend(fs.cluster(data_dir));
    left
}

fn wait_gone(
    fs: &ProcFs,
    data_dir: &Path,
    watched: &BTreeSet<Proc>,
    until: Instant,
) -> BTreeSet<Proc> {
    loop {
        let left = survivors(fs, data_dir, watched);
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A stop is confirmed only if nothing the scan could not see might be the
/// cluster: no live process of the data directory's owner it cannot read, and
/// no live `postmaster.pid` process it cannot attribute. Otherwise the fence
/// is an error, logged loudly, whatever it did.
fn confirm_nothing_unseen(fs: &ProcFs, data_dir: &Path) -> Result<(), PgError> {
    let mut why = match fs.blind_spots(data_dir) {
        Ok(v) => v,
        Err(e) => vec![e],
    };
    if let Some(pid) = read_postmaster_pid(data_dir) {
        why.extend(fs.unattributed_postmaster(data_dir, pid, &fs.cluster(data_dir)));
    }
    if why.is_empty() {
        return Ok(());
    }
    let e = PgError::FenceBlind {
        data_dir: data_dir.to_owned(),
        why: why.join("; "),
    };
    tracing::error!("{e}; treating PostgreSQL as NOT stopped (no release, no disarm follows)");
    Err(e)
}

fn fence_of(
    cgroup: Option<PgCgroup>,
    data_dir: &Path,
    immediate: Duration,
    kill: Duration,
) -> Result<StopReport, PgError> {
    match cgroup {
        Some(g) => fence_by_cgroup(&g, data_dir, immediate, kill),
        None => fence_by_scan(data_dir, immediate, kill),
    }
}

/// Demotion so that no backend can commit (FENCING.md rule 3): an immediate
/// stop (SIGQUIT to the postmaster, as `pg_ctl stop -m immediate` does) bounded
/// by `immediate`; if anything is left after that, freeze the postmaster and
/// every process of the cluster with SIGSTOP (so none can fork), then SIGKILL
/// them all, postmaster first (a live postmaster would restart crashed
/// children). Returns only once the postmaster and every PostgreSQL process of
/// the data directory are confirmed gone; an error if that cannot be confirmed
/// within `kill` more, or if the scan has blind spots (a process of the data
/// directory's owner it cannot read, a live `postmaster.pid` process it
/// cannot attribute, an unreadable process list): [`PgError::FenceBlind`].
///
/// Synchronous and runtime-free so a plain thread can call it.
pub fn fence_by_scan(
    data_dir: &Path,
    immediate: Duration,
    kill: Duration,
) -> Result<StopReport, PgError> {
    fence_by_scan_in(&ProcFs::real(), data_dir, immediate, kill)
}

/// [`fence_by_scan`] reading processes from `fs` (tests give it a
/// fake tree; signals go to the real pids).
pub fn fence_by_scan_in(
    fs: &ProcFs,
    data_dir: &Path,
    immediate: Duration,
    kill: Duration,
) -> Result<StopReport, PgError> {
    let t0 = Instant::now();
    // The first act is SIGQUIT (an immediate stop) to the postmaster and its
    // children, before any scan: listing every process took 0.55 s on a busy
    // guest resumed from a pause, and the server answered as a primary all
    // that time; and a backend signalled by us rather than by a postmaster
    // still waiting for the CPU handles the signal before it can answer
    // again. The pid file's process is trusted only if it runs in the data
    // directory from a postgres binary; its children are its own.
    let early = read_postmaster_pid(data_dir).and_then(|pid| fs.member(data_dir, pid));
    if let Some(pm) = early {
        pm.signal(fs, libc::SIGQUIT)?;
        for c in fs.children(&pm) {
            c.signal(fs, libc::SIGQUIT)?;
        }
    }
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
    let mut watched = fs.cluster(data_dir);
    // A pid file can outlive its server (and the pid be reused): trust it only
    // for a process that runs in this data directory.
    let pm = read_postmaster_pid(data_dir)
        .and_then(|pid| watched.iter().copied().find(|p| p.pid == pid));
    if watched.is_empty() {
        confirm_nothing_unseen(fs, data_dir)?;
        return Ok(StopReport {
            // Gone before the scan: by the early signal, or before it.
            how: if early.is_some() {
                StopHow::Immediate
            } else {
                StopHow::AlreadyStopped
            },
            took: t0.elapsed(),
            postmaster: early.map(|p| p.pid),
            killed: Vec::new(),
        });
    }
    if let Some(pm) = pm {
        watched.extend(fs.descendants(&BTreeSet::from([pm])));
        if early != Some(pm) {
            pm.signal(fs, libc::SIGQUIT)?;
        }
    }
    // Signalled (now, or early: the postmaster may be gone by the scan while
    // its children are still exiting): give the immediate stop its time.
    if (pm.is_some() || early.is_some())
        && wait_gone(fs, data_dir, &watched, t0 + immediate).is_empty()
    {
        confirm_nothing_unseen(fs, data_dir)?;
        return Ok(StopReport {
            how: StopHow::Immediate,
            took: t0.elapsed(),
            postmaster: pm.or(early).map(|p| p.pid),
            killed: Vec::new(),
        });
    }
    // Freeze until the set is closed (a stopped process cannot fork), then kill.
    for _ in 0..50 {
        let mut now = survivors(fs, data_dir, &watched);
        now.extend(fs.descendants(&now));
        for p in &now {
            p.signal(fs, libc::SIGSTOP)?;
        }
        let grew = !now.is_subset(&watched);
        watched.extend(now);
        if !grew {
            break;
        }
    }
    let mut killed = Vec::new();
    if let Some(pm) = pm.filter(|p| p.alive(fs)) {
        pm.signal(fs, libc::SIGKILL)?;
        killed.push(pm.pid);
    }
    for p in &watched {
        if Some(*p) != pm && p.alive(fs) {
            p.signal(fs, libc::SIGKILL)?;
            killed.push(p.pid);
        }
    }
    let left = wait_gone(fs, data_dir, &watched, Instant::now() + kill);
    if !left.is_empty() {
        return Err(PgError::FenceUnconfirmed {
            took: t0.elapsed(),
            survivors: left.iter().map(|p| p.pid).collect(),
        });
    }
    confirm_nothing_unseen(fs, data_dir)?;
    Ok(StopReport {
        how: StopHow::Killed,
        took: t0.elapsed(),
        postmaster: pm.map(|p| p.pid),
        killed,
    })
}

/// The fence of a cluster started in `cgroup`: SIGQUIT to the postmaster (an
/// immediate stop) bounded by `immediate`; if the group is not empty by then,
/// freeze it (nothing in it can fork any more) and kill it (`cgroup.kill`),
/// confirmed by an empty `cgroup.procs` within `kill`. Then the `/proc` scan
/// fence ([`fence_by_scan`]) for anything of the data directory
/// outside the group (a server started by hand or by another unit), with its
/// blind-spot check. Every process of the group counts, not only those the
/// scan would recognise: a helper the cluster forked is killed too.
pub fn fence_by_cgroup(
    cgroup: &PgCgroup,
    data_dir: &Path,
    immediate: Duration,
    kill: Duration,
) -> Result<StopReport, PgError> {
    let t0 = Instant::now();
    let procs = cgroup.procs().map_err(io_err(format!(
        "fence cannot read {}/cgroup.procs",
        cgroup.dir().display()
    )))?;
    let mut how = StopHow::AlreadyStopped;
    let mut killed = Vec::new();
    let pm = read_postmaster_pid(data_dir).filter(|p| procs.contains(p));
    if !procs.is_empty() {
        how = StopHow::Killed;
        if let Some(pid) = pm {
            // SAFETY: kill has no memory-safety preconditions; the pid is in
            // the group, so it is the cluster's postmaster.
            if unsafe { libc::kill(pid, libc::SIGQUIT) } != 0 {
                return Err(PgError::Signal {
                    pid,
                    source: std::io::Error::last_os_error(),
                });
            }
            // Every other process of the group at once too, as the scan's
            // early signal does: none waits for the postmaster to pass it on.
            for &other in procs.iter().filter(|&&p| p != pid) {
                // SAFETY: as above; the pid is in the cluster's group (gone
                // already is fine: ESRCH is ignored).
                unsafe { libc::kill(other, libc::SIGQUIT) };
            }
            let until = t0 + immediate;
            while cgroup.procs().is_ok_and(|p| !p.is_empty()) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if cgroup.procs().is_ok_and(|p| p.is_empty()) {
                how = StopHow::Immediate;
            }
        }
        if how == StopHow::Killed {
            killed = cgroup.freeze_and_kill(kill)?;
        }
    }
    let rest = fence_by_scan(data_dir, immediate, kill)?;
    killed.extend(rest.killed);
    Ok(StopReport {
        how: match (how, rest.how) {
            (StopHow::Killed, _) | (_, StopHow::Killed) => StopHow::Killed,
            (StopHow::Immediate, _) | (_, StopHow::Immediate) => StopHow::Immediate,
            _ => StopHow::AlreadyStopped,
        },
        took: t0.elapsed(),
        postmaster: pm.or(rest.postmaster),
        killed,
    })
}

impl Pg {
    /// The fence from a plain thread (no tokio): the deadline timer of
    /// FENCING.md rule 3 holds a clone of the driver and calls this. With a
    /// delegated cgroup, [`fence_by_cgroup`]; else
    /// [`fence_by_scan`].
    pub fn fence(&self) -> Result<StopReport, PgError> {
        fence_of(
            self.cgroup.clone(),
            self.data_dir(),
            PgConfig::secs(self.cfg.stop_timeout),
            PgConfig::secs(self.cfg.kill_timeout),
        )
    }

    /// The fence, for async callers: see [`fence_by_scan`]. Uses
    /// `postgres.stop_timeout` and `postgres.kill_timeout`.
    pub async fn fence_async(&self) -> Result<StopReport, PgError> {
        let data = self.data_dir().to_owned();
        let (imm, kill) = (
            PgConfig::secs(self.cfg.stop_timeout),
            PgConfig::secs(self.cfg.kill_timeout),
        );
        let cg = self.cgroup.clone();
        tokio::task::spawn_blocking(move || fence_of(cg, &data, imm, kill))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::process_alive;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;
    use std::process::{Child, Command};

    /// A data directory, a fake /proc and a real `sleep` to stand for a live
    /// process (signals go to real pids; the fence must send none here).
    struct Scene {
        _dir: tempfile::TempDir,
        data: PathBuf,
        proc: PathBuf,
        sleeper: Child,
    }

    impl Scene {
        fn new() -> Scene {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let proc = dir.path().join("proc");
            fs::create_dir_all(&data).unwrap();
            fs::create_dir_all(&proc).unwrap();
            // PostgreSQL never runs as root, so a root-owned data directory
            // would make every test process "not PostgreSQL's": give it a user.
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                std::os::unix::fs::chown(&data, Some(4242), Some(4242)).unwrap();
            }
            let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
            Scene {
                _dir: dir,
                data,
                proc,
                sleeper,
            }
        }
        fn pid(&self) -> i32 {
            self.sleeper.id() as i32
        }
        fn postmaster_pid(&self, pid: i32) {
            fs::write(
                self.data.join("postmaster.pid"),
                format!("{pid}\n{}\n", self.data.display()),
            )
            .unwrap();
        }
        /// A fake /proc entry: `cwd` None = unreadable (not a link), `uid` in
        /// `status`.
        fn entry(&self, pid: i32, cwd: Option<&Path>, uid: u32) {
            let d = self.proc.join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            let zeros = vec!["0"; 17].join(" ");
            fs::write(
                d.join("stat"),
                format!("{pid} (postgres) S 1 {zeros} 4242\n"),
            )
            .unwrap();
            fs::write(
                d.join("status"),
                format!("Name:\tpostgres\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
            match cwd {
                Some(c) => symlink(c, d.join("cwd")).unwrap(),
                None => fs::write(d.join("cwd"), b"").unwrap(),
            }
            symlink("/usr/lib/postgresql/15/bin/postgres", d.join("exe")).unwrap();
        }
        fn fence(&self) -> Result<StopReport, PgError> {
            fence_by_scan_in(
                &ProcFs::at(&self.proc),
                &self.data,
                Duration::from_millis(200),
                Duration::from_millis(200),
            )
        }
        fn owner(&self) -> u32 {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&self.data).unwrap().uid()
        }
    }

    impl Drop for Scene {
        fn drop(&mut self) {
            let _ = self.sleeper.kill();
            let _ = self.sleeper.wait();
        }
    }

    fn blind(r: Result<StopReport, PgError>, pid: i32) -> String {
        match r {
            Err(e @ PgError::FenceBlind { .. }) => {
                let m = e.to_string();
                assert!(m.contains(&pid.to_string()), "names the pid: {m}");
                m
            }
            other => panic!("expected a blind fence, got {other:?}"),
        }
    }

    /// postmaster.pid names a live process whose cwd the scan cannot read:
    /// it may be the postmaster, so the stop is NOT confirmed.
    #[test]
    fn a_live_postmaster_the_scan_cannot_read_is_an_error_not_already_stopped() {
        let s = Scene::new();
        s.postmaster_pid(s.pid());
        s.entry(s.pid(), None, s.owner());
        let m = blind(s.fence(), s.pid());
        assert!(m.contains("postmaster.pid"), "{m}");
        assert!(
            process_alive(s.pid()),
            "an unattributed pid is never signalled"
        );
    }

    /// The same when /proc does not show the process at all (hidepid,
    /// ProtectProc=invisible, another user): kill(pid, 0) still sees it.
    #[test]
    fn a_live_postmaster_hidden_from_proc_is_an_error() {
        let s = Scene::new();
        s.postmaster_pid(s.pid());
        blind(s.fence(), s.pid());
    }

    /// A process of the data directory's owner whose cwd cannot be read could
    /// be an orphaned backend: not confirmed either. Other users' processes
    /// and root's (which PostgreSQL never runs as) do not count.
    #[test]
    fn an_uninspectable_process_of_the_owner_is_an_error() {
        let s = Scene::new();
        s.entry(s.pid(), None, s.owner());
        blind(s.fence(), s.pid());
        let s = Scene::new();
        s.entry(s.pid(), None, s.owner() + 4242);
        assert_eq!(s.fence().unwrap().how, StopHow::AlreadyStopped);
        let s = Scene::new();
        s.entry(s.pid(), None, 0);
        assert_eq!(s.fence().unwrap().how, StopHow::AlreadyStopped);
    }

    /// What the fence can see is fine: a stale postmaster.pid whose pid now
    /// runs elsewhere, or a dead one, confirms the stop.
    #[test]
    fn a_stale_postmaster_pid_is_still_already_stopped() {
        let s = Scene::new();
        s.postmaster_pid(s.pid());
        s.entry(s.pid(), Some(Path::new("/")), s.owner());
        assert_eq!(s.fence().unwrap().how, StopHow::AlreadyStopped);
        assert!(
            process_alive(s.pid()),
            "the early signal goes only to a process of the data directory"
        );
        let s = Scene::new();
        s.postmaster_pid(i32::MAX - 7);
        assert_eq!(s.fence().unwrap().how, StopHow::AlreadyStopped);
    }

    /// The pid file's process, running in the data directory from a
    /// postgres binary, is sent SIGQUIT (an immediate stop) before anything
    /// harsher. The fake tree never shows it gone, so the fence itself ends
    /// unconfirmed; what matters here is the signal the real process got.
    /// Its children (from its `children` file, without a scan) too: a
    /// backend signalled at once cannot answer another query.
    #[test]
    fn the_postmaster_of_the_data_directory_gets_sigquit_first() {
        use std::os::unix::process::ExitStatusExt;
        let mut s = Scene::new();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let cpid = child.id() as i32;
        s.postmaster_pid(s.pid());
        s.entry(s.pid(), Some(&s.data.clone()), s.owner());
        s.entry(cpid, Some(&s.data.clone()), s.owner());
        let task = s.proc.join(s.pid().to_string()).join("task");
        let task = task.join(s.pid().to_string());
        fs::create_dir_all(&task).unwrap();
        fs::write(task.join("children"), format!("{cpid} ")).unwrap();
        assert!(matches!(s.fence(), Err(PgError::FenceUnconfirmed { .. })));
        let status = s.sleeper.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGQUIT), "{status:?}");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGQUIT), "child: {status:?}");
    }

    /// No readable process list at all: nothing can be confirmed.
    #[test]
    fn an_unreadable_proc_is_an_error() {
        let s = Scene::new();
        fs::remove_dir(&s.proc).unwrap();
        match s.fence() {
            Err(e @ PgError::FenceBlind { .. }) => {
                assert!(e.to_string().contains("proc"), "{e}")
            }
            other => panic!("expected a blind fence, got {other:?}"),
        }
    }
}
