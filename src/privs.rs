//! Least privilege for an agent started with capabilities (as root by
//! hand; the packaged unit runs it as `postgres` with none).
//!
//! Called once on the main thread after `mlockall` and before any other
//! thread starts: capabilities are per thread, and every thread spawned
//! later inherits the reduced set. Before dropping, it raises the two
//! limits that make the dropped capabilities unnecessary later:
//! `RLIMIT_MEMLOCK` to infinity (with `MCL_FUTURE`, every later allocation
//! is locked and would otherwise fail past the limit without CAP_IPC_LOCK)
//! and `RLIMIT_RTPRIO` to the pinger's priority (so its threads can take
//! SCHED_FIFO without CAP_SYS_NICE). Watchdog devices are opened later, at
//! arming, but root owns them, so no capability is needed for that.
//! When a limit cannot be raised (no CAP_SYS_RESOURCE, as in some
//! containers), the capability it would have replaced is kept instead:
//! CAP_IPC_LOCK (else thread creation fails once locked memory reaches the
//! limit) or CAP_SYS_NICE (else the pinger cannot be real-time).
//!
//! Kept:
//! - nothing, without `[postgres]`;
//! - with `[postgres]`: CAP_KILL (the fence signals postgres-owned
//!   processes), CAP_SETUID + CAP_SETGID (pg_ctl, pg_rewind, pg_basebackup
//!   run as `postgres.os_user`), CAP_CHOWN + CAP_FOWNER + CAP_DAC_OVERRIDE
//!   (creating, writing and chowning files in the os_user's mode-0700 data
//!   directory), CAP_SYS_PTRACE (the fence finds a cluster's processes by
//!   readlink of `/proc/PID/cwd` and `exe`, which the kernel allows across
//!   users only with it). Running as the os_user (the unit) needs none.
//!
//! Everything else leaves the effective, permitted, inheritable, ambient and
//! bounding sets, and `no_new_privs` is set, so neither this process nor a
//! child can regain any of it.

use std::io;

pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_KILL: u32 = 5;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_IPC_LOCK: u32 = 14;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_NICE: u32 = 23;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// A set of capabilities as a bit mask (bit n = capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn of(caps: &[u32]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, c| m | (1u64 << c)))
    }
    pub fn has(&self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// The capabilities the agent keeps after start-up (see the module doc).
pub fn needed(manages_postgres: bool) -> CapSet {
    if manages_postgres {
        CapSet::of(&[
            CAP_KILL,
            CAP_SETUID,
            CAP_SETGID,
            CAP_CHOWN,
            CAP_FOWNER,
            CAP_DAC_OVERRIDE,
            CAP_SYS_PTRACE,
        ])
    } else {
        CapSet::default()
    }
}

fn capget() -> io::Result<(CapSet, CapSet, CapSet)> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: hdr and data are valid for the v3 layout (two data words).
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| CapSet(f(&data[0]) as u64 | (f(&data[1]) as u64) << 32);
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

fn capset(eff: CapSet, prm: CapSet, inh: CapSet) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |s: CapSet| [s.0 as u32, (s.0 >> 32) as u32];
    let (e, p, i) = (split(eff), split(prm), split(inh));
    let data = [
        CapData {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        CapData {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: hdr and data are valid for the v3 layout (two data words).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn raise_limit(resource: libc::__rlimit_resource_t, at_least: libc::rlim_t) -> io::Result<()> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid out-pointer.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let enough = |v: libc::rlim_t| v == libc::RLIM_INFINITY || v >= at_least;
    if enough(r.rlim_cur) && enough(r.rlim_max) {
        return Ok(());
    }
    let new = libc::rlimit {
        rlim_cur: at_least,
        rlim_max: if enough(r.rlim_max) {
            r.rlim_max
        } else {
            at_least
        },
    };
    // SAFETY: new is a valid rlimit.
    if unsafe { libc::setrlimit(resource, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`drop_privileges`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The process had no capabilities to drop.
    Nothing,
    /// Reduced to `kept` (in every set, including the bounding set).
    To { kept: CapSet, had: CapSet },
}

/// Drops every capability but `keep` from this thread (call it before
/// other threads start) and sets no_new_privs. See the module doc.
pub fn drop_privileges(keep: CapSet, rt_priority: i32) -> Result<Dropped, String> {
    let (eff, prm, _inh) = capget().map_err(|e| format!("capget: {e}"))?;
    if prm.is_empty() && eff.is_empty() {
        // Still refuse to gain any through exec (best effort: the unit
        // sets NoNewPrivileges= itself).
        let _ = set_no_new_privs();
        return Ok(Dropped::Nothing);
    }
    // Limits first, while CAP_SYS_RESOURCE may still be held; failures here
    // are reported but not fatal (the unit sets both limits itself).
    let mut notes = Vec::new();
    let mut keep = keep;
    if let Err(e) = raise_limit(libc::RLIMIT_MEMLOCK, libc::RLIM_INFINITY) {
        notes.push(format!(
            "cannot raise RLIMIT_MEMLOCK ({e}): keeping CAP_IPC_LOCK (set LimitMEMLOCK=infinity)"
        ));
        keep.0 |= 1 << CAP_IPC_LOCK;
    }
    if let Err(e) = raise_limit(libc::RLIMIT_RTPRIO, rt_priority as libc::rlim_t) {
        notes.push(format!(
            "cannot raise RLIMIT_RTPRIO ({e}): keeping CAP_SYS_NICE (set LimitRTPRIO={rt_priority})"
        ));
        keep.0 |= 1 << CAP_SYS_NICE;
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    let keep = CapSet(keep.0 & prm.0);
    if prm.has(CAP_SETPCAP) {
        for cap in 0..=last_cap() {
            if !keep.has(cap) {
                // SAFETY: prctl with integer arguments only.
                let rc =
                    unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
                if rc != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        return Err(format!(
                            "cannot drop capability {cap} from the bounding set: {e}"
                        ));
                    }
                }
            }
        }
    } else {
        notes.push("bounding set left as is (no CAP_SETPCAP)".into());
    }
    capset(keep, keep, CapSet::default()).map_err(|e| format!("capset: {e}"))?;
    set_no_new_privs()?;
    let (e2, p2, _) = capget().map_err(|e| format!("capget: {e}"))?;
    if e2 != keep || p2 != keep {
        return Err(format!(
            "capabilities still {:#x}/{:#x} after dropping to {:#x}",
            e2.0, p2.0, keep.0
        ));
    }
    if !notes.is_empty() {
        tracing::warn!("while dropping capabilities: {}", notes.join("; "));
    }
    Ok(Dropped::To {
        kept: keep,
        had: prm,
    })
}

fn set_no_new_privs() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// The names of the capabilities in `s` (for logs).
pub fn names(s: CapSet) -> Vec<String> {
    const KNOWN: [(u32, &str); 10] = [
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_IPC_LOCK, "CAP_IPC_LOCK"),
        (CAP_SYS_NICE, "CAP_SYS_NICE"),
        (CAP_CHOWN, "CAP_CHOWN"),
        (CAP_DAC_OVERRIDE, "CAP_DAC_OVERRIDE"),
        (CAP_FOWNER, "CAP_FOWNER"),
        (CAP_KILL, "CAP_KILL"),
        (CAP_SETGID, "CAP_SETGID"),
        (CAP_SETUID, "CAP_SETUID"),
        (CAP_SETPCAP, "CAP_SETPCAP"),
    ];
    (0..64)
        .filter(|c| s.has(*c))
        .map(|c| {
            KNOWN
                .iter()
                .find(|(k, _)| *k == c)
                .map_or(format!("cap{c}"), |(_, n)| n.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_sets() {
        assert!(needed(false).is_empty());
        let pg = needed(true);
        for c in [
            CAP_KILL,
            CAP_SETUID,
            CAP_SETGID,
            CAP_CHOWN,
            CAP_FOWNER,
            CAP_DAC_OVERRIDE,
            CAP_SYS_PTRACE,
        ] {
            assert!(pg.has(c));
        }
        assert!(!pg.has(CAP_SETPCAP));
        assert_eq!(names(CapSet::of(&[CAP_KILL, 21])), ["CAP_KILL", "cap21"]);
    }
}
