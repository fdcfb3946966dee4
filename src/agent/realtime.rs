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

/// The calling thread's scheduling policy (for tests and `status`).
pub fn current_policy() -> i32 {
    // SAFETY: pid 0 = calling thread.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}
