//! Host clocks, and child processes that cannot outlive the test.
//!
//! Every child is started in its own process group (so the whole group can be
//! killed) with `PR_SET_PDEATHSIG = SIGKILL`. The kernel delivers that signal
//! when the *thread* that forked the child exits, not the process; a test that
//! boots guests from short-lived threads would see them killed early. So all
//! forks happen on one spawner thread that lives as long as the process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({id}) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The host's CLOCK_BOOTTIME (the clock leasedog itself uses), as time since
/// boot. All host-side timestamps of the lab are on this clock.
pub fn host_boottime() -> Duration {
    clock(libc::CLOCK_BOOTTIME)
}

/// `realtime - boottime` right now: add it to a boottime to get wall-clock
/// time, subtract it from a wall-clock time (a QMP timestamp) to get boottime.
/// Sampled as the tightest of a few back-to-back readings.
pub fn realtime_minus_boottime() -> Duration {
    let mut best: Option<(Duration, Duration)> = None; // (gap, offset)
    for _ in 0..5 {
        let b0 = clock(libc::CLOCK_BOOTTIME);
        let r = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock before 1970");
        let b1 = clock(libc::CLOCK_BOOTTIME);
        let mid = b0 + (b1 - b0) / 2;
        let cand = (b1 - b0, r.saturating_sub(mid));
        if best.is_none_or(|b| cand.0 < b.0) {
            best = Some(cand);
        }
    }
    best.unwrap().1
}

/// Converts a host wall-clock instant (e.g. a QMP event timestamp) to host
/// CLOCK_BOOTTIME, using the current offset between the two clocks.
pub fn realtime_to_boottime(t: SystemTime) -> Duration {
    let since_epoch = t.duration_since(UNIX_EPOCH).expect("time before 1970");
    since_epoch.saturating_sub(realtime_minus_boottime())
}

type SpawnReq = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnReq>> {
    static TX: OnceLock<Mutex<mpsc::Sender<SpawnReq>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        std::thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    })
}

/// Spawns `cmd` in a new process group, with SIGKILL as its parent-death
/// signal, from a thread that lives as long as this process. Pair the child
/// with [`ChildGuard`] so it is killed when the handle drops.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: getpid() is async-signal-safe; called before fork.
    let parent = unsafe { libc::getpid() };
    cmd.process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread dropped the request"))?
}

/// Owns a child started by [`spawn_tied`]: on drop, SIGKILLs its whole process
/// group and reaps it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    exited: Option<std::process::ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard {
            child: Some(child),
            exited: None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Some(status)` once the child has exited (reaps it). After that the
    /// guard no longer signals the group: its id may be reused.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        if let Some(st) = self.exited {
            return Ok(Some(st));
        }
        let st = match self.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => None,
        };
        if let Some(st) = st {
            self.exited = Some(st);
            self.child = None;
        }
        Ok(st)
    }

    /// Kills the process group now and reaps the leader.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as libc::pid_t;
            // SAFETY: plain syscall; the group id is the child's pid.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
