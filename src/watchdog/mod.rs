//! Watchdog devices: the Linux API ([`dev`]), what sysfs and /proc say about
//! them ([`sysfs`]), arming under FENCING.md rules 2 and 5 ([`arm`]), the
//! `query-watchdog` listing ([`query`]) and fakes for tests ([`fake`]).
//!
//! The pinger sees only the small [`Watchdog`] trait, so tests can hand it a
//! [`fake::MemoryWatchdog`].

pub mod dev;
pub mod fake;
pub mod flags;
pub mod query;
pub mod sysfs;

pub use fake::{read_fake_record, FakeOp, MemoryWatchdog};
pub use flags::{BootStatus, WdFlags};
pub use query::{query, query_open, render_table, DeviceReport};
pub use sysfs::{Holder, KnownHolder, SysRoots};

use crate::config::{DeviceSpec, NowayoutPolicy};
use crate::timing::{self, Budget, BudgetError};
use dev::DeviceFile;
use serde::Serialize;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use sysfs::SysfsEntry;

/// An armed watchdog.
///
/// Dropping a handle without calling [`Watchdog::disarm`] leaves the device
/// ARMED: the descriptor is closed without the magic 'V', so the node resets
/// `W` after the last ping. That is deliberate (FENCING.md rule 4): an agent
/// that dies or bails out while leader must still be reset.
pub trait Watchdog: Send + Sync {
    fn info(&self) -> &ArmedInfo;
    /// Restarts the timer.
    fn ping(&mut self) -> io::Result<()>;
    /// Magic close: write 'V', close. Consumes the handle. Fails (after
    /// closing) if the timer is known to keep running, e.g. with `nowayout`.
    fn disarm(self: Box<Self>) -> io::Result<()>;
}

impl fmt::Debug for dyn Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Watchdog").field(self.info()).finish()
    }
}

/// What arming established about a device (recorded by the audit, rule 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArmedInfo {
    pub path: PathBuf,
    pub identity: String,
    /// The bound kernel driver, if sysfs names one (softdog has none).
    pub driver: Option<String>,
    /// `W`: the timeout read back with WDIOC_GETTIMEOUT.
    pub w_secs: u32,
    /// The timer cannot be stopped once started. True also when sysfs could
    /// not tell (see `nowayout_assumed`).
    pub nowayout: bool,
    /// `nowayout` could not be read and is assumed set.
    pub nowayout_assumed: bool,
    /// WDIOC_GETSUPPORT options.
    pub options: WdFlags,
    pub firmware_version: u32,
    /// WDIOC_GETBOOTSTATUS (or sysfs `bootstatus`), if either answered.
    pub bootstatus: Option<BootStatus>,
}

/// Why a device was not armed. Every variant says whether the device was
/// opened (opening starts its timer) and, if so, in what state it was left.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    #[error("watchdog device kind \"fake\" exists only in builds with the `testing` feature (it fences nothing)")]
    FakeNotAllowed,
    #[error("fake watchdog record {}: {source}", path.display())]
    Fake { path: PathBuf, source: io::Error },
    #[error("no softdog: no entry in {} has identity \"{}\" (load it with `modprobe softdog`); {present}",
        class_dir.display(), sysfs::SOFTDOG_IDENTITY)]
    NoSoftdog { class_dir: PathBuf, present: String },
    #[error("watchdog device {} does not exist; {present}", path.display())]
    Missing { path: PathBuf, present: String },
    #[error("watchdog device {} is busy, NOT opened: {}", path.display(), busy_detail(holders))]
    Busy { path: PathBuf, holders: Vec<Holder> },
    #[error("watchdog device {} has nowayout {}: once opened its timer could never be stopped, and {why}; the device was NOT opened",
        path.display(), if *unreadable { "unreadable (sysfs has no `nowayout` for it), so it is treated as set" } else { "set" })]
    Nowayout {
        path: PathBuf,
        unreadable: bool,
        /// Which setting refused it.
        why: &'static str,
    },
    #[error("cannot open watchdog device {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("watchdog device {} refused after opening: {problem}; {closed}", path.display())]
    Refused {
        path: PathBuf,
        problem: Problem,
        closed: Closed,
        /// With `nowayout` the device could not be disarmed: here is its
        /// still-open handle, so the caller may keep pinging it as a replica
        /// (policy keep-pinging). Dropping it leaves the timer running.
        still_armed: Option<Box<dyn Watchdog>>,
    },
}

fn busy_detail(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "held by a process this scan cannot see (another PID namespace, or /proc not readable)"
            .into();
    }
    holders
        .iter()
        .map(|h| format!("held by {h}: {}", h.fix()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What went wrong after the device was opened.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{0}")]
    Ioctl(io::Error),
    #[error(
        "it is alarm-only (WDIOF_ALARMONLY): it raises an alarm instead of resetting the node"
    )]
    AlarmOnly,
    #[error("{}{budget}", if *settable { "" } else { "its timeout cannot be set (no WDIOF_SETTIMEOUT) and " })]
    Timeout { settable: bool, budget: BudgetError },
    #[error("first ping failed: {0}")]
    Ping(io::Error),
}

/// The state a refused device was left in.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    #[error("it was disarmed (magic close)")]
    Disarmed,
    #[error("magic close attempted, but nowayout could not be read: if it is set, the timer is still running")]
    NowayoutUnknown,
    #[error("the magic close failed ({0}): the timer may still be running")]
    DisarmFailed(io::Error),
    #[error("nowayout is set, so it could NOT be disarmed: it stays ARMED{}; the node resets unless it is pinged",
        match w_secs { Some(w) => format!(" with a {w} s timeout"), None => String::new() })]
    StillArmed { w_secs: Option<u32> },
}

/// A real device opened through /dev.
#[derive(Debug)]
struct LinuxWatchdog {
    dev: DeviceFile,
    info: ArmedInfo,
    /// sysfs `state`, read after a magic close to confirm the timer stopped.
    state_attr: Option<PathBuf>,
}

impl Watchdog for LinuxWatchdog {
    fn info(&self) -> &ArmedInfo {
        &self.info
    }

    fn ping(&mut self) -> io::Result<()> {
        self.dev.ping()
    }

    fn disarm(self: Box<Self>) -> io::Result<()> {
        let LinuxWatchdog {
            dev,
            info,
            state_attr,
        } = *self;
        dev.magic_close()?;
        if info.nowayout {
            return Err(io::Error::other(format!(
                "{}: nowayout{}: the magic close did not stop the timer; the node resets {} s after the last ping",
                info.path.display(),
                if info.nowayout_assumed { " (assumed, unreadable)" } else { "" },
                info.w_secs
            )));
        }
        if let Some(state) = state_attr.and_then(|p| std::fs::read_to_string(p).ok()) {
            if state.trim() == "active" {
                return Err(io::Error::other(format!(
                    "{}: still active after the magic close: the driver did not stop the timer",
                    info.path.display()
                )));
            }
        }
        Ok(())
    }
}

/// A configured device spec resolved to a node (and its sysfs entry, if any).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub path: PathBuf,
    pub entry: Option<SysfsEntry>,
}

impl Resolved {
    /// All paths through which a process could hold this device.
    pub fn aliases(&self, roots: &SysRoots) -> Vec<PathBuf> {
        let mut v = vec![self.path.clone()];
        if let Some(e) = &self.entry {
            for a in e.dev_aliases(roots) {
                if !v.contains(&a) {
                    v.push(a);
                }
            }
        }
        v
    }
}

/// "devices present: ..." for error messages.
fn present(roots: &SysRoots) -> String {
    let list = sysfs::list(roots);
    if list.is_empty() {
        return format!(
            "no watchdog is registered ({} is empty or missing: is a driver loaded?)",
            roots.class_dir().display()
        );
    }
    let items: Vec<String> = list
        .iter()
        .map(|e| {
            format!(
                "{} ({})",
                e.dev_path(roots).display(),
                e.identity.as_deref().unwrap_or("no identity")
            )
        })
        .collect();
    format!("devices present: {}", items.join(", "))
}

/// Finds a device node without opening it.
pub fn resolve_path(path: &Path, roots: &SysRoots) -> Result<Resolved, ArmError> {
    if std::fs::metadata(path).is_err() {
        return Err(ArmError::Missing {
            path: path.to_owned(),
            present: present(roots),
        });
    }
    Ok(Resolved {
        path: path.to_owned(),
        entry: sysfs::entry_for_path(path, roots),
    })
}

/// The softdog's node, found by its sysfs identity.
pub fn resolve_softdog(roots: &SysRoots) -> Result<Resolved, ArmError> {
    let Some(e) = sysfs::find_softdog(roots) else {
        return Err(ArmError::NoSoftdog {
            class_dir: roots.class_dir(),
            present: present(roots),
        });
    };
    let path = e.dev_path(roots);
    if std::fs::metadata(&path).is_err() {
        return Err(ArmError::Missing {
            present: format!(
                "sysfs has softdog as {}, but its node is missing (udev?)",
                e.name
            ),
            path,
        });
    }
    Ok(Resolved {
        path,
        entry: Some(e),
    })
}

/// Checks that must pass BEFORE opening (opening arms): not busy, and the
/// nowayout policy. Returns `(nowayout, assumed)`.
fn preflight(
    dev: &Resolved,
    refuse_nowayout: Option<&'static str>,
    roots: &SysRoots,
) -> Result<(bool, bool), ArmError> {
    let holders = sysfs::holders(&dev.aliases(roots), roots);
    if !holders.is_empty() {
        return Err(ArmError::Busy {
            path: dev.path.clone(),
            holders,
        });
    }
    let known = dev.entry.as_ref().and_then(|e| e.nowayout);
    let (nowayout, assumed) = match known {
        Some(n) => (n, false),
        None => (true, true),
    };
    if let (true, Some(why)) = (nowayout, refuse_nowayout) {
        return Err(ArmError::Nowayout {
            path: dev.path.clone(),
            unreadable: assumed,
            why,
        });
    }
    Ok((nowayout, assumed))
}

/// Opens a node; EBUSY becomes [`ArmError::Busy`] with a fresh holder scan.
fn open(dev: &Resolved, roots: &SysRoots) -> Result<DeviceFile, ArmError> {
    DeviceFile::open(&dev.path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            ArmError::Busy {
                path: dev.path.clone(),
                holders: sysfs::holders(&dev.aliases(roots), roots),
            }
        } else {
            ArmError::Open {
                path: dev.path.clone(),
                source: e,
            }
        }
    })
}

/// FENCING.md rules 2 and 5: arm one device for a leader with budget `budget`.
///
/// Before opening: refuse a missing or busy device (naming the holder and the
/// fix) and, under [`NowayoutPolicy::Refuse`], a nowayout device (unreadable
/// counts as set). After opening: refuse an alarm-only device, set the timeout
/// to [`timing::target_timeout`] when the driver can, read back `W` and
/// [`timing::check_readback`] it, ping once. A refusal after opening disarms
/// the device (we are not leader yet) unless nowayout makes that impossible,
/// which the error says, returning the still-armed handle.
pub fn arm(
    spec: &DeviceSpec,
    budget: &Budget,
    policy: NowayoutPolicy,
    roots: &SysRoots,
) -> Result<Box<dyn Watchdog>, ArmError> {
    let dev = match spec {
        DeviceSpec::Fake { record } => {
            if !cfg!(feature = "testing") {
                return Err(ArmError::FakeNotAllowed);
            }
            return fake::FakeWatchdog::arm(record, timing::target_timeout(budget))
                .map(|w| Box::new(w) as Box<dyn Watchdog>)
                .map_err(|source| ArmError::Fake {
                    path: record.clone(),
                    source,
                });
        }
        DeviceSpec::Device { path } => resolve_path(path, roots)?,
        DeviceSpec::Softdog => resolve_softdog(roots)?,
    };
    let refuse = match policy {
        NowayoutPolicy::Refuse => Some("watchdog.nowayout = \"refuse\""),
        NowayoutPolicy::KeepPinging => None,
    };
    let (nowayout, assumed) = preflight(&dev, refuse, roots)?;
    let mut file = open(&dev, roots)?;
    let entry = dev.entry.as_ref();

    let configured = (|| {
        let support = file.get_support().map_err(Problem::Ioctl)?;
        if support.options.contains(flags::WDIOF_ALARMONLY) {
            return Err(Problem::AlarmOnly);
        }
        let settable = support.options.contains(flags::WDIOF_SETTIMEOUT);
        if settable {
            file.set_timeout(timing::target_timeout(budget))
                .map_err(Problem::Ioctl)?;
        }
        let w = file.get_timeout().map_err(Problem::Ioctl)?;
        timing::check_readback(w, budget)
            .map_err(|budget| Problem::Timeout { settable, budget })?;
        let bootstatus = file
            .get_bootstatus()
            .ok()
            .or_else(|| entry.and_then(|e| e.bootstatus));
        file.ping().map_err(Problem::Ping)?;
        Ok((support, w, bootstatus))
    })();

    match configured {
        Ok((support, w_secs, bootstatus)) => Ok(Box::new(LinuxWatchdog {
            dev: file,
            info: ArmedInfo {
                path: dev.path.clone(),
                identity: if support.identity.is_empty() {
                    entry.and_then(|e| e.identity.clone()).unwrap_or_default()
                } else {
                    support.identity
                },
                driver: entry.and_then(|e| e.driver.clone()),
                w_secs,
                nowayout,
                nowayout_assumed: assumed,
                options: support.options,
                firmware_version: support.firmware_version,
                bootstatus,
            },
            state_attr: entry.map(|e| e.dir.join("state")),
        })),
        Err(problem) if nowayout && !assumed => {
            let w_secs = file.get_timeout().ok();
            let still = LinuxWatchdog {
                dev: file,
                info: ArmedInfo {
                    path: dev.path.clone(),
                    identity: entry.and_then(|e| e.identity.clone()).unwrap_or_default(),
                    driver: entry.and_then(|e| e.driver.clone()),
                    w_secs: w_secs.unwrap_or(0),
                    nowayout: true,
                    nowayout_assumed: false,
                    options: WdFlags(0),
                    firmware_version: 0,
                    bootstatus: None,
                },
                state_attr: None,
            };
            Err(ArmError::Refused {
                path: dev.path.clone(),
                problem,
                closed: Closed::StillArmed { w_secs },
                still_armed: Some(Box::new(still)),
            })
        }
        Err(problem) => {
            let closed = match file.magic_close() {
                Ok(()) if nowayout => Closed::NowayoutUnknown,
                Ok(()) => Closed::Disarmed,
                Err(e) => Closed::DisarmFailed(e),
            };
            Err(ArmError::Refused {
                path: dev.path,
                problem,
                closed,
                still_armed: None,
            })
        }
    }
}
