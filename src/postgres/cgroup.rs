//! PostgreSQL in a cgroup (v2) of its own, delegated to the agent.
//!
//! Under the packaged unit (`Delegate=yes`) systemd hands the agent its
//! unit's cgroup, e.g. `/system.slice/leasedog.service`, owned by the unit's
//! user. The agent moves itself into the leaf `agent` and starts every
//! PostgreSQL process in the sibling `postgres`: the tool joins it in the
//! child between fork and exec ([`PgCgroup::join_in_child`]), so `pg_ctl`,
//! the postmaster and every backend it forks are in it from their first
//! instruction. The fence then stops the whole cluster at once: freeze
//! (`cgroup.freeze`: nothing can fork any more), kill (`cgroup.kill`, Linux
//! ≥ 5.14; else SIGKILL to each pid of the frozen group), and confirm by
//! `cgroup.procs` being empty. No process of the cluster can be missed by a
//! scan or forked after it.
//!
//! Where no cgroup is delegated (host tests, containers, a root agent outside
//! systemd) there is none, and the driver falls back to the `/proc` scan of
//! [`super::procscan`], which fails loudly when it is blind.

use super::PgError;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup PostgreSQL runs in (a directory of the cgroup2 hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgCgroup {
    dir: PathBuf,
}

/// Where cgroup2 is mounted, from `mountinfo` text (field 5 is the mount
/// point, the file system type follows the " - " separator).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Where cgroup2 is mounted on this machine (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` in systemd's hybrid layout).
pub fn cgroup2_mount_point() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The process's cgroup2 path (`0::/path` in `/proc/PID/cgroup`).
pub fn cgroup_path_of(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The cgroup2 directory this process runs in, if cgroup2 is mounted.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let mount = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    let path = cgroup_path_of(&std::fs::read_to_string("/proc/self/cgroup").ok()?)?;
    let rel = path.trim_start_matches('/');
    (!path.contains(" (deleted)")).then(|| mount.join(rel))
}

fn xattr_is_one(dir: &Path, name: &str) -> bool {
    let (Ok(p), Ok(n)) = (
        CString::new(dir.as_os_str().as_encoded_bytes()),
        CString::new(name),
    ) else {
        return false;
    };
    let mut buf = [0u8; 8];
    // SAFETY: both strings are NUL-terminated; buf is writable for its length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    r > 0 && buf[..r as usize].starts_with(b"1")
}

/// Is `dir` (not the root of the hierarchy) delegated to this process?
/// systemd marks a delegated cgroup with the `trusted.delegate` (and, since
/// 253, `user.delegate`) extended attribute, and for a unit with `User=`
/// hands the directory and its `cgroup.procs` to that user. A root agent
/// trusts only the attribute (root can write anywhere); any other agent also
/// the ownership (nobody else would give a cgroup to it).
fn delegated(dir: &Path, mount: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if dir == mount {
        return false;
    }
    if xattr_is_one(dir, "trusted.delegate") || xattr_is_one(dir, "user.delegate") {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    me != 0
        && [dir.to_owned(), dir.join("cgroup.procs")]
            .iter()
            .all(|p| std::fs::metadata(p).is_ok_and(|m| m.uid() == me))
}

/// Writes `text` to a cgroup control file.
fn write_ctl(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(text.as_bytes())
}

impl PgCgroup {
    /// The cgroup at `dir`, which must exist (tests; [`PgCgroup::delegated`]
    /// for the agent).
    pub fn at(dir: impl Into<PathBuf>) -> PgCgroup {
        PgCgroup { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets up the delegated layout under `parent` (which this process may
    /// manage): creates `parent/agent` and `parent/postgres`, moves this
    /// whole process (all its threads) into `agent` (cgroup2 lets processes
    /// live only in leaves once subgroups use controllers, and systemd
    /// expects a delegated unit to keep its root empty), and returns the
    /// `postgres` group.
    pub fn set_up_under(parent: &Path) -> Result<PgCgroup, PgError> {
        let err = |what: String| move |source| PgError::Io { what, source };
        let agent = parent.join("agent");
        let pg = parent.join("postgres");
        for d in [&agent, &pg] {
            match std::fs::create_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(err(format!("creating cgroup {}", d.display()))(e))
                }
                _ => {}
            }
        }
        write_ctl(&agent.join("cgroup.procs"), &std::process::id().to_string())
            .map_err(err(format!("moving the agent into {}", agent.display())))?;
        // A group left frozen by an interrupted fence would freeze the next start.
        let _ = write_ctl(&pg.join("cgroup.freeze"), "0");
        Ok(PgCgroup { dir: pg })
    }

    /// The delegated cgroup of the running agent, set up
    /// ([`PgCgroup::set_up_under`]), or None where no cgroup is delegated
    /// (cgroup2 not mounted, the root cgroup, a unit without `Delegate=yes`)
    /// or where it cannot be set up (logged as an error): the fence then
    /// scans `/proc`. An agent already moved into its `agent`
    /// leaf (a second driver in the same process) finds the same group.
    pub fn delegated() -> Result<Option<PgCgroup>, PgError> {
        let Some(mount) = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| cgroup2_mount(&m))
        else {
            return Ok(None);
        };
        let Some(own) = own_cgroup_dir() else {
            return Ok(None);
        };
        let base = match (own.file_name(), own.parent()) {
            (Some(n), Some(p)) if n == "agent" && delegated(p, &mount) => p.to_owned(),
            _ if delegated(&own, &mount) => own,
            _ => return Ok(None),
        };
        match PgCgroup::set_up_under(&base) {
            Ok(g) => Ok(Some(g)),
            // Delegated, but not writable here (a sandbox that keeps the
            // hierarchy read-only): PostgreSQL then runs in the agent's own
            // cgroup and the fence scans /proc, which still fails loudly
            // when blind. Said at start-up, not hidden.
            Err(e) => {
                tracing::error!(
                    "cgroup {} is delegated but cannot be set up ({e}): PostgreSQL will NOT \
                     run in a cgroup of its own; the fence falls back to the /proc scan",
                    base.display()
                );
                Ok(None)
            }
        }
    }

    /// The pids in the group (`cgroup.procs`; exited processes leave it at
    /// once, zombies included).
    pub fn procs(&self) -> io::Result<Vec<i32>> {
        Ok(std::fs::read_to_string(self.dir.join("cgroup.procs"))?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// What a child must do between fork and exec to join the group: write
    /// "0" (itself) to `cgroup.procs`. Prepared here (no allocation in the
    /// child); [`join_in_child`] does the write.
    pub fn procs_path(&self) -> CString {
        CString::new(self.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .expect("a cgroup path has no NUL")
    }

    /// Freezes the group, kills every process in it and confirms it is empty
    /// within `within`. Returns the pids it killed. Leaves the group thawed
    /// (a killed group is empty; a thawed empty group is ready for the next
    /// start).
    pub fn freeze_and_kill(&self, within: Duration) -> Result<Vec<i32>, PgError> {
        let t0 = Instant::now();
        let io = |what: &str| {
            let what = format!("{what} {}", self.dir.display());
            move |source| PgError::Io { what, source }
        };
        write_ctl(&self.dir.join("cgroup.freeze"), "1").map_err(io("freezing cgroup"))?;
        // Freezing is asynchronous; a frozen process cannot fork, but SIGKILL
        // reaches it. Wait briefly for "frozen 1", then kill whatever the state.
        let until = t0 + within.min(Duration::from_millis(500));
        while !self.events("frozen") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        let pids = self.procs().map_err(io("reading cgroup.procs of"))?;
        let kill_file = self.dir.join("cgroup.kill");
        if kill_file.exists() {
            write_ctl(&kill_file, "1").map_err(io("writing cgroup.kill of"))?;
        } else {
            for &pid in &pids {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = t0 + within;
        loop {
            let left = self.procs().map_err(io("reading cgroup.procs of"))?;
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(PgError::FenceUnconfirmed {
                    took: t0.elapsed(),
                    survivors: left,
                });
            }
            if !kill_file.exists() {
                for &pid in &left {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = write_ctl(&self.dir.join("cgroup.freeze"), "0");
        Ok(pids)
    }

    /// Whether `cgroup.events` has `key 1`.
    fn events(&self, key: &str) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .is_ok_and(|t| t.lines().any(|l| l.split_once(' ') == Some((key, "1"))))
    }
}

/// In a forked child before exec: joins the cgroup whose `cgroup.procs` is
/// `procs` (from [`PgCgroup::procs_path`]). Async-signal-safe: open, write,
/// close, nothing allocated.
pub fn join_in_child(procs: &CString) -> io::Result<()> {
    // SAFETY: procs is a valid NUL-terminated path; the buffer is static.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::write(fd, b"0".as_ptr().cast(), 1);
        let e = io::Error::last_os_error();
        libc::close(fd);
        if r != 1 {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_and_path() {
        let mi = "24 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw\n\
                  35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                  36 24 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
        let pc = "4:memory:/x\n0::/system.slice/leasedog.service/agent\n";
        assert_eq!(
            cgroup_path_of(pc).as_deref(),
            Some("/system.slice/leasedog.service/agent")
        );
    }

    #[test]
    fn the_root_of_the_hierarchy_is_never_delegated() {
        let d = tempfile::tempdir().unwrap();
        assert!(!delegated(d.path(), d.path()));
    }
}
