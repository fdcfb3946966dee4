//! Finding a cluster's processes in `/proc` without trusting `postmaster.pid`
//! alone: PostgreSQL processes run with their data directory as cwd.
//!
//! The root is injectable ([`ProcFs::at`]) so the fence's blind spots can be
//! tested on a fake tree; signals always go to the real pids.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

/// Where process information is read: normally `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFs {
    root: PathBuf,
}

pub(super) struct ProcInfo {
    pub(super) ppid: i32,
    pub(super) zombie: bool,
    /// Start time in clock ticks since boot: with the pid, the process's identity.
    pub(super) start: u64,
}

impl ProcFs {
    pub fn real() -> ProcFs {
        ProcFs::at("/proc")
    }

    /// A procfs-like tree at `root` (tests).
    pub fn at(root: impl Into<PathBuf>) -> ProcFs {
        ProcFs { root: root.into() }
    }

    pub(super) fn path(&self, pid: i32, what: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(what)
    }

    pub(super) fn stat(&self, pid: i32) -> Option<ProcInfo> {
        let stat = std::fs::read_to_string(self.path(pid, "stat")).ok()?;
        // comm may hold spaces and parens: the fields after the last ')' are fixed
        // (state is field 3, ppid 4, starttime 22).
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(ProcInfo {
            ppid: rest.get(1)?.parse().ok()?,
            zombie: matches!(*rest.first()?, "Z" | "X"),
            start: rest.get(19)?.parse().ok()?,
        })
    }

    pub(super) fn pids(&self) -> io::Result<Vec<i32>> {
        Ok(std::fs::read_dir(&self.root)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect())
    }

    /// Every live PostgreSQL server process of the cluster in `data_dir`.
    pub(super) fn cluster(&self, data_dir: &Path) -> BTreeSet<Proc> {
        let (want, deleted) = wanted(data_dir);
        self.pids()
            .unwrap_or_default()
            .into_iter()
            .filter(|&pid| self.runs_in(pid, &want, &deleted))
            .filter_map(|pid| Proc::of(self, pid))
            .collect()
    }

    /// One process, if it is a live PostgreSQL server process of the cluster
    /// in `data_dir`: the same test as [`ProcFs::cluster`] without listing
    /// every process (the fence's first signal cannot wait for a scan).
    pub(super) fn member(&self, data_dir: &Path, pid: i32) -> Option<Proc> {
        let (want, deleted) = wanted(data_dir);
        self.runs_in(pid, &want, &deleted)
            .then(|| Proc::of(self, pid))
            .flatten()
    }

    /// The direct children of `parent` from its main thread's `children`
    /// file (one read, no scan; the postmaster forks from its main
    /// thread). Empty if the file cannot be read.
    pub(super) fn children(&self, parent: &Proc) -> Vec<Proc> {
        let path = self
            .path(parent.pid, "task")
            .join(parent.pid.to_string())
            .join("children");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter_map(|pid| Proc::of(self, pid))
            .collect()
    }

    fn runs_in(&self, pid: i32, want: &Path, deleted: &Path) -> bool {
        std::fs::read_link(self.path(pid, "cwd")).is_ok_and(|cwd| cwd == want || cwd == deleted)
            && std::fs::read_link(self.path(pid, "exe"))
                .ok()
                .and_then(|p| p.file_name()?.to_str().map(|n| n.starts_with("postgres")))
                .unwrap_or(false)
    }

    /// What a scan of `data_dir`'s cluster cannot rule out: live processes
    /// that could be PostgreSQL's (not root's: PostgreSQL refuses to run as
    /// root; the data directory's owner's, or while that is unknown any
    /// user's the agent could not read anyway) whose cwd or binary cannot be
    /// read, so they might be cluster processes the scan skipped. A cwd that
    /// reads as "not found" is a process already in exit (it released its
    /// files): it runs nothing. Err if the process list cannot be read.
    pub(super) fn blind_spots(&self, data_dir: &Path) -> Result<Vec<String>, String> {
        use std::os::unix::fs::MetadataExt;
        let pids = self
            .pids()
            .map_err(|e| format!("cannot list processes in {}: {e}", self.root.display()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let owner = match std::fs::metadata(data_dir) {
            Ok(m) => Some(m.uid()),
            Err(_) if me != 0 => Some(me),
            Err(_) => None,
        };
        let (want, deleted) = wanted(data_dir);
        let mut out = Vec::new();
        for pid in pids {
            if self.stat(pid).is_none_or(|p| p.zombie) {
                continue; // gone, or a zombie: runs nothing
            }
            let problem = match std::fs::read_link(self.path(pid, "cwd")) {
                Ok(c) if c != want && c != deleted => continue,
                Ok(_) => match std::fs::read_link(self.path(pid, "exe")) {
                    Ok(_) => continue, // attributed (or not PostgreSQL) by `cluster`
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        format!("runs in the data directory, but its binary cannot be read ({e})")
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => format!("its cwd cannot be read ({e})"),
            };
            let uid = self.euid(pid);
            let candidate = match (uid, owner) {
                (Some(0), _) => false,
                (Some(u), Some(o)) => u == o,
                _ => true,
            };
            if candidate {
                out.push(format!(
                    "pid {pid} ({}): {problem}",
                    uid.map_or("uid unknown".to_string(), |u| format!("uid {u}"))
                ));
            }
        }
        Ok(out)
    }

    /// The effective uid in `status`.
    fn euid(&self, pid: i32) -> Option<u32> {
        let status = std::fs::read_to_string(self.path(pid, "status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2)?.parse().ok()
    }

    /// Alive by `stat`, or (if this tree does not show it) by kill(pid, 0),
    /// which sees through hidepid and other users' processes.
    pub(super) fn live(&self, pid: i32) -> bool {
        match self.stat(pid) {
            Some(p) => !p.zombie,
            None => pid_exists(pid),
        }
    }

    /// Why `postmaster.pid`'s `pid`, if alive and not among `attributed`,
    /// cannot be ruled out as this cluster's postmaster (None: it can).
    pub(super) fn unattributed_postmaster(
        &self,
        data_dir: &Path,
        pid: i32,
        attributed: &BTreeSet<Proc>,
    ) -> Option<String> {
        if attributed.iter().any(|p| p.pid == pid) || !self.live(pid) || !pid_exists(pid) {
            return None;
        }
        let (want, deleted) = wanted(data_dir);
        let why = match std::fs::read_link(self.path(pid, "cwd")) {
            Ok(c) if c != want && c != deleted => return None, // a reused pid
            Ok(_) => match std::fs::read_link(self.path(pid, "exe")) {
                Ok(exe)
                    if !exe
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("postgres")) =>
                {
                    return None; // not PostgreSQL (a shell in the data directory)
                }
                Ok(_) => "it runs PostgreSQL in the data directory but vanished from the scan"
                    .to_string(),
                Err(e) => format!("its binary cannot be read ({e})"),
            },
            // In exit: it released its files and runs nothing.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && self.root.join(pid.to_string()).exists() =>
            {
                return None
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                format!(
                    "{} does not show it (hidepid, ProtectProc=invisible, another PID namespace?)",
                    self.root.display()
                )
            }
            Err(e) => format!("its cwd cannot be read ({e})"),
        };
        Some(format!(
            "postmaster.pid names pid {pid}, which is alive, but the scan cannot attribute it: {why}"
        ))
    }

    /// All live descendants of `roots`, from one scan.
    pub(super) fn descendants(&self, roots: &BTreeSet<Proc>) -> BTreeSet<Proc> {
        let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
        for pid in self.pids().unwrap_or_default() {
            if let Some(p) = self.stat(pid) {
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
}

/// The cwd of a cluster process: the data directory, or, once it was
/// removed, the same path marked "(deleted)" as the kernel shows it.
fn wanted(data_dir: &Path) -> (PathBuf, PathBuf) {
    let want = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_owned());
    let deleted = PathBuf::from(format!("{} (deleted)", want.display()));
    (want, deleted)
}

/// kill(pid, 0): the pid exists (maybe as another user's, or hidden from
/// /proc), or it does not (ESRCH).
fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence and permission.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Whether `pid` is a live process (a zombie is dead: it runs nothing, commits nothing).
pub fn process_alive(pid: i32) -> bool {
    ProcFs::real().stat(pid).is_some_and(|p| !p.zombie)
}

/// A process by identity, so a recycled pid is never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Proc {
    pub(super) pid: i32,
    pub(super) start: u64,
}

impl Proc {
    pub(super) fn of(fs: &ProcFs, pid: i32) -> Option<Proc> {
        fs.stat(pid).filter(|p| !p.zombie).map(|p| Proc {
            pid,
            start: p.start,
        })
    }
    pub(super) fn alive(&self, fs: &ProcFs) -> bool {
        Proc::of(fs, self.pid) == Some(*self)
    }
    /// Signals the process if it is still the same one; gone is fine.
    pub(super) fn signal(&self, fs: &ProcFs, sig: libc::c_int) -> Result<(), super::PgError> {
        if !self.alive(fs) {
            return Ok(());
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(self.pid, sig) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(super::PgError::Signal {
            pid: self.pid,
            source: e,
        })
    }
}

/// Every live PostgreSQL server process of this cluster: PostgreSQL processes
/// chdir to their data directory, so this also finds backends orphaned by a
/// postmaster that died earlier (e.g. OOM-killed), which a ppid walk cannot.
pub fn cluster_processes(data_dir: &Path) -> Vec<i32> {
    ProcFs::real()
        .cluster(data_dir)
        .into_iter()
        .map(|p| p.pid)
        .collect()
}
