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
//! child can regain any of it. The sets are read and written through the
//! `caps` crate, the limits and `no_new_privs` through `nix`: this module
//! has no `unsafe` of its own.

use caps::{CapSet as Set, CapsHashSet};
use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

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

    /// As the `caps` crate's set (capabilities it does not know are left out).
    fn to_caps(self) -> CapsHashSet {
        caps::all()
            .into_iter()
            .filter(|c| self.0 & c.bitmask() != 0)
            .collect()
    }

    fn from_caps(set: &CapsHashSet) -> CapSet {
        CapSet(set.iter().fold(0, |m, c| m | c.bitmask()))
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

/// This thread's `set`.
fn read(set: Set) -> Result<CapSet, String> {
    caps::read(None, set)
        .map(|s| CapSet::from_caps(&s))
        .map_err(|e| format!("reading the {set:?} capabilities: {e}"))
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Raises a resource limit to at least `at_least` (soft and hard), unless
/// it is already there.
fn raise_limit(resource: Resource, at_least: u64) -> nix::Result<()> {
    let (cur, max) = getrlimit(resource)?;
    let enough = |v: u64| v == RLIM_INFINITY || v >= at_least;
    if enough(cur) && enough(max) {
        return Ok(());
    }
    setrlimit(resource, at_least, if enough(max) { max } else { at_least })
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
    let eff = read(Set::Effective)?;
    let prm = read(Set::Permitted)?;
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
    if let Err(e) = raise_limit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY) {
        notes.push(format!(
            "cannot raise RLIMIT_MEMLOCK ({e}): keeping CAP_IPC_LOCK (set LimitMEMLOCK=infinity)"
        ));
        keep.0 |= 1 << CAP_IPC_LOCK;
    }
    if let Err(e) = raise_limit(Resource::RLIMIT_RTPRIO, rt_priority.max(0) as u64) {
        notes.push(format!(
            "cannot raise RLIMIT_RTPRIO ({e}): keeping CAP_SYS_NICE (set LimitRTPRIO={rt_priority})"
        ));
        keep.0 |= 1 << CAP_SYS_NICE;
    }
    if let Err(e) = caps::clear(None, Set::Ambient) {
        // Before Linux 4.3 there is no ambient set to clear.
        notes.push(format!("ambient set not cleared: {e}"));
    }
    let keep = CapSet(keep.0 & prm.0);
    if prm.has(CAP_SETPCAP) {
        let last = last_cap();
        for cap in caps::all() {
            let n = u32::from(cap.index());
            // A capability this kernel does not know is in no set.
            if n <= last && !keep.has(n) {
                caps::drop(None, Set::Bounding, cap)
                    .map_err(|e| format!("cannot drop {cap} from the bounding set: {e}"))?;
            }
        }
        if last > max_known_cap() {
            notes.push(format!(
                "the kernel knows capabilities up to {last}, the caps crate up to {}: those above stay in the bounding set (none is permitted)",
                max_known_cap()
            ));
        }
    } else {
        notes.push("bounding set left as is (no CAP_SETPCAP)".into());
    }
    // Effective must shrink with permitted; inheritable empties.
    let kept = keep.to_caps();
    caps::set(None, Set::Inheritable, &CapsHashSet::new())
        .and_then(|()| caps::set(None, Set::Effective, &kept))
        .and_then(|()| caps::set(None, Set::Permitted, &kept))
        .map_err(|e| format!("capset: {e}"))?;
    set_no_new_privs()?;
    let (e2, p2) = (read(Set::Effective)?, read(Set::Permitted)?);
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

/// The highest capability number the `caps` crate can name.
fn max_known_cap() -> u32 {
    caps::all()
        .iter()
        .map(|c| u32::from(c.index()))
        .max()
        .unwrap_or(0)
}

fn set_no_new_privs() -> Result<(), String> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))
}

/// The names of the capabilities in `s` (for logs): `CAP_KILL`, or `capN`
/// for one the `caps` crate does not name.
pub fn names(s: CapSet) -> Vec<String> {
    (0..64)
        .filter(|c| s.has(*c))
        .map(|c| {
            caps::all()
                .into_iter()
                .find(|k| u32::from(k.index()) == c)
                .map_or(format!("cap{c}"), |k| k.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use caps::Capability;

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
        assert_eq!(
            names(CapSet::of(&[CAP_KILL, 21, 63])),
            ["CAP_KILL", "CAP_SYS_ADMIN", "cap63"]
        );
    }

    /// The numbers this module uses are the kernel's, as `caps` knows them.
    #[test]
    fn numbers_agree_with_caps() {
        for (n, c) in [
            (CAP_CHOWN, Capability::CAP_CHOWN),
            (CAP_DAC_OVERRIDE, Capability::CAP_DAC_OVERRIDE),
            (CAP_FOWNER, Capability::CAP_FOWNER),
            (CAP_KILL, Capability::CAP_KILL),
            (CAP_SETGID, Capability::CAP_SETGID),
            (CAP_SETUID, Capability::CAP_SETUID),
            (CAP_SETPCAP, Capability::CAP_SETPCAP),
            (CAP_IPC_LOCK, Capability::CAP_IPC_LOCK),
            (CAP_SYS_PTRACE, Capability::CAP_SYS_PTRACE),
            (CAP_SYS_NICE, Capability::CAP_SYS_NICE),
        ] {
            assert_eq!(u32::from(c.index()), n, "{c}");
        }
        let pg = needed(true);
        assert_eq!(CapSet::from_caps(&pg.to_caps()), pg);
    }
}
