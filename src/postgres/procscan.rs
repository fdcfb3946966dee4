//! Finding a cluster's processes in `/proc` without trusting `postmaster.pid`
//! alone: PostgreSQL processes run with their data directory as cwd.

use super::PgError;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

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
pub(super) struct Proc {
    pub(super) pid: i32,
    pub(super) start: u64,
}

impl Proc {
    pub(super) fn of(pid: i32) -> Option<Proc> {
        read_proc_stat(pid).filter(|p| !p.zombie).map(|p| Proc {
            pid,
            start: p.start,
        })
    }
    pub(super) fn alive(&self) -> bool {
        Proc::of(self.pid) == Some(*self)
    }
    /// Signals the process if it is still the same one; gone is fine.
    pub(super) fn signal(&self, sig: libc::c_int) -> Result<(), PgError> {
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

pub(super) fn cluster_procs(data_dir: &Path) -> BTreeSet<Proc> {
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
pub(super) fn descendants(roots: &BTreeSet<Proc>) -> BTreeSet<Proc> {
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
