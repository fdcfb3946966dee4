//! Keeping the pinger alive under pressure (docs/fencing.md rule 6): locked memory
//! and real-time scheduling, each reported when it cannot be had.

/// Real-time priority of the pinger and the deadline timer. Moderate on
/// purpose: above every normal task, below the kernel's own RT threads.
pub const RT_PRIORITY: i32 = 10;

/// Locks all current and future memory of the process, so that a pinger page
/// is never swapped out when it is needed. Returns why it failed.
///
/// MCL_ONFAULT locks each page when it is first touched rather than faulting
/// the whole mapped binary in: every page the agent uses (the pinger's within
/// its first ticks) stays resident, and code it never runs costs nothing.
pub fn lock_memory() -> Result<(), String> {
    // Fewer malloc arenas keep the locked (hence resident) footprint small.
    // SAFETY: mallopt is safe to call at any time; M_ARENA_MAX is a valid param.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // SAFETY: plain syscall with valid flags.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        Err(format!(
            "mlockall: {e} (needs CAP_IPC_LOCK or LimitMEMLOCK=infinity)"
        ))
    }
}

/// Puts the calling thread in SCHED_FIFO at [`RT_PRIORITY`], with
/// SCHED_RESET_ON_FORK so that children (pg_ctl) do not inherit it.
pub fn raise_current_thread() -> Result<(), String> {
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: pid 0 is the calling thread; param is valid for the call.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        Err(format!(
            "SCHED_FIFO: {e} (needs CAP_SYS_NICE or LimitRTPRIO >= {RT_PRIORITY})"
        ))
    }
}

/// Installs a panic hook that, while this process holds an armed watchdog
/// device open ([`crate::watchdog::armed_handles`]), parks the panicking
/// thread forever after the usual panic message instead of letting it unwind.
///
/// Why: unwinding drops handles, and `panic = "abort"` or an exit closes
/// every descriptor; the kernel pings a running device when its last
/// descriptor closes (`watchdog_release`), so a panic would push the reset to
/// `W` after the panic instead of `W` after the last permitted ping. A parked
/// thread keeps everything open: if it was the main loop, the evidence ages
/// and the pinger falls silent by itself (rule 1); if it was the pinger, the
/// pings stop at once; the deadline timer still stops PostgreSQL. The node is
/// reset on time, and systemd's WatchdogSec= (WATCHDOG=1 comes from the main
/// loop) or an operator kills the rest later. Without an armed device the
/// panic unwinds as usual.
pub fn park_on_panic_while_armed() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let armed = crate::watchdog::armed_handles();
        if armed > 0 {
            let name = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            eprintln!(
                "leasedog: PANIC in thread {name} while {armed} watchdog device(s) are armed: \
                 this thread parks forever instead of unwinding, so no armed device is closed \
                 (a close would ping it); pings stop once the evidence is stale and the watchdog \
                 resets the node"
            );
            loop {
                std::thread::park();
            }
        }
    }));
}

/// The calling thread's scheduling policy (for tests and `status`).
pub fn current_policy() -> i32 {
    // SAFETY: pid 0 = calling thread.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const CHILD: &str = "LEASEDOG_TEST_PANIC_CHILD";

    /// Runs only as the child of `a_panic_while_armed_parks_instead_of_closing`:
    /// installs the agent's panic hook, arms a fake device, panics.
    #[test]
    fn panic_child() {
        let Some(rec) = std::env::var_os(CHILD) else {
            return;
        };
        super::park_on_panic_while_armed();
        let _armed = crate::watchdog::fake::FakeWatchdog::arm(rec.as_ref(), 3).unwrap();
        panic!("boom: the agent hit a bug while armed");
    }

    /// A panic while a device is armed must not unwind: unwinding drops the
    /// handle, the close pings the running device (kernel watchdog_release),
    /// and the node resets W after the panic instead of W after the last
    /// permitted ping. The panicking thread parks; the descriptor stays open.
    #[test]
    fn a_panic_while_armed_parks_instead_of_closing() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("wd.rec");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "agent::realtime::tests::panic_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &rec)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let t0 = Instant::now();
        let mut seen = String::new();
        // Both lines of the hook before looking (a loaded machine may take
        // its time between them), then the process and its descriptor.
        while !(seen.contains("boom") && seen.contains("parks forever"))
            && t0.elapsed() < Duration::from_secs(20)
        {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    seen.push_str(&l);
                    seen.push('\n');
                }
                // The child's stderr closed: it exited.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        assert!(seen.contains("boom"), "the child never panicked: {seen}");
        std::thread::sleep(Duration::from_millis(500));
        let alive = child.try_wait().unwrap().is_none();
        let fd_open = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .map(|fds| {
                fds.filter_map(Result::ok)
                    .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == rec))
            })
            .unwrap_or(false);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            alive,
            "the panicking agent exited (closing its devices): {seen}"
        );
        assert!(fd_open, "the armed device was closed by the panic");
        assert!(seen.contains("parks forever"), "the hook says why: {seen}");
    }
}
