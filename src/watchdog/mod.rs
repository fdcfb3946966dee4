//! Watchdog devices: the Linux API ([`dev`]), what sysfs and /proc say about
//! them ([`sysfs`]), arming under FENCING.md rules 2 and 5 ([`arm`]), the
//! `query-watchdog` listing ([`query()`]) and fakes for tests ([`fake`]).
//!
//! The pinger sees only the small [`Watchdog`] trait, so tests can hand it a
//! [`fake::MemoryWatchdog`].
//!
//! Checked by hand against real drivers (Debian 6.1 kernel in QEMU/TCG,
//! softdog and i6300esb): arming sets and reads back W = 3 for T = 5, M = 2;
//! a second arm is refused as busy naming this process; disarm stops the timer
//! (sysfs `state` inactive); a nowayout softdog is refused under `refuse` and
//! its disarm reports the timer still running; a dropped handle fires W s
//! after the last ping; after an i6300esb reset sysfs `bootstatus` reads
//! CARDRESET. The automated version of that belongs to the lab tests.

pub mod dev;
pub mod fake;
pub mod fdstore;
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
use std::sync::atomic::{AtomicUsize, Ordering};
use sysfs::SysfsEntry;

/// Handles to armed devices this process holds open (see [`ArmedToken`]).
static ARMED_HANDLES: AtomicUsize = AtomicUsize::new(0);

/// How many armed device handles this process holds open right now. A
/// leaked handle counts for ever (its descriptor stays open until exit).
/// The panic hook ([`crate::agent::realtime::park_on_panic_while_armed`])
/// reads it.
pub fn armed_handles() -> usize {
    ARMED_HANDLES.load(Ordering::SeqCst)
}

/// Counts one open armed handle for as long as it lives.
#[derive(Debug)]
pub(crate) struct ArmedToken(());

impl ArmedToken {
    pub(crate) fn new() -> ArmedToken {
        ARMED_HANDLES.fetch_add(1, Ordering::SeqCst);
        ArmedToken(())
    }
}

impl Drop for ArmedToken {
    fn drop(&mut self) {
        ARMED_HANDLES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An armed watchdog.
///
/// Dropping a handle without calling [`Watchdog::disarm`] leaves the device
/// ARMED: the descriptor is closed without the magic 'V'. That is deliberate
/// (FENCING.md rule 4): an agent that dies or bails out while leader must
/// still be reset. But the kernel pings a running device when its last
/// descriptor closes, so the reset comes `W` after the drop, not after the
/// last ping: the agent never drops an armed handle on purpose; it leaks it
/// ([`leak`]) so the descriptor stays open until the process ends.
pub trait Watchdog: Send + Sync {
    fn info(&self) -> &ArmedInfo;
    /// Restarts the timer.
    fn ping(&mut self) -> io::Result<()>;
    /// Magic close: write 'V', close. Consumes the handle. Fails (after
    /// closing) if the timer is known to keep running, e.g. with `nowayout`.
    fn disarm(self: Box<Self>) -> io::Result<()>;
}

/// Keeps armed handles open until the process ends, without closing them
/// (a close pings a running device). Used on every exit path that is not a
/// disarm.
pub fn leak(devices: Vec<Box<dyn Watchdog>>) {
    for d in devices {
        std::mem::forget(d);
    }
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
    /// The bound kernel driver, if sysfs links one (virtual devices such as
    /// softdog, and i6300esb on Debian 6.1, have none).
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
    #[error("watchdog device {} has no magic close (sysfs `options` {options} lacks WDIOF_MAGICCLOSE): \
        with nowayout {} ANY close stops its timer, so a crash or kill of the agent would disarm it; \
        it is only safe with nowayout set (module parameter nowayout=1); the device was NOT opened",
        path.display(), if *nowayout_unreadable { "unreadable" } else { "off" })]
    NoMagicClose {
        path: PathBuf,
        options: WdFlags,
        nowayout_unreadable: bool,
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
        /// (policy keep-pinging). If nobody takes it, it is leaked, not
        /// closed (a close would ping it).
        still_armed: StillArmed,
    },
}

/// The handle of a device left armed by a refusal. Dropping this without
/// [`StillArmed::take`] leaks the handle (its descriptor stays open until the
/// process ends): closing a running device pings it.
pub struct StillArmed(Option<Box<dyn Watchdog>>);

impl StillArmed {
    pub fn none() -> StillArmed {
        StillArmed(None)
    }
    pub fn some(h: Box<dyn Watchdog>) -> StillArmed {
        StillArmed(Some(h))
    }
    /// Takes the handle (to keep pinging it, or to hand it to the pinger).
    pub fn take(&mut self) -> Option<Box<dyn Watchdog>> {
        self.0.take()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl Drop for StillArmed {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            std::mem::forget(h);
        }
    }
}

impl fmt::Debug for StillArmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(h) => write!(f, "StillArmed({:?})", h.info().path),
            None => f.write_str("StillArmed(none)"),
        }
    }
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
    #[error(
        "it has no magic close (no WDIOF_MAGICCLOSE) and nowayout is not known to be set: \
         ANY close stops its timer, so a crash of the agent would disarm it"
    )]
    NoMagicClose,
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
    /// The duplicate put into systemd's fd store, if any (see [`fdstore`]).
    stored: Option<(fdstore::NotifySocket, String)>,
    _armed: ArmedToken,
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
            stored,
            _armed,
        } = *self;
        // The kernel stops the timer only on the LAST close: systemd's copy
        // must be gone before ours is closed, or the 'V' is wasted and the
        // node resets W after it (fdstore module docs).
        let unstored = match &stored {
            Some((sock, name)) => sock.remove(name, fdstore::BARRIER_TIMEOUT).err(),
            None => None,
        };
        dev.magic_close()?;
        if let Some(e) = unstored {
            let still = state_attr
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .is_none_or(|s| s.trim() != "inactive");
            if still {
                return Err(io::Error::other(format!(
                    "{}: could not take it out of systemd's fd store ({e}): systemd's copy keeps \
                     it open, so the magic close may not have stopped the timer",
                    info.path.display()
                )));
            }
        }
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

/// A device without WDIOF_MAGICCLOSE stops on any close unless nowayout is
/// set (FENCING.md, Facts): an agent that crashes would disarm it. Refused
/// before opening when sysfs shows the options (newer kernels); otherwise
/// [`configure`] refuses it after opening, from WDIOC_GETSUPPORT.
fn refuse_without_magic_close(
    dev: &Resolved,
    nowayout: bool,
    assumed: bool,
) -> Result<(), ArmError> {
    let nowayout_known_set = nowayout && !assumed;
    match dev.entry.as_ref().and_then(|e| e.options) {
        Some(options) if !options.contains(flags::WDIOF_MAGICCLOSE) && !nowayout_known_set => {
            Err(ArmError::NoMagicClose {
                path: dev.path.clone(),
                options,
                nowayout_unreadable: assumed,
            })
        }
        _ => Ok(()),
    }
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

/// The driver calls arming makes once the device is open (a trait so the
/// decisions can be tested against a scripted driver).
pub(crate) trait DriverOps {
    fn get_support(&self) -> io::Result<dev::Support>;
    fn set_timeout(&self, secs: u32) -> io::Result<u32>;
    fn get_timeout(&self) -> io::Result<u32>;
    fn get_bootstatus(&self) -> io::Result<BootStatus>;
    fn ping(&mut self) -> io::Result<()>;
}

impl DriverOps for DeviceFile {
    fn get_support(&self) -> io::Result<dev::Support> {
        DeviceFile::get_support(self)
    }
    fn set_timeout(&self, secs: u32) -> io::Result<u32> {
        DeviceFile::set_timeout(self, secs)
    }
    fn get_timeout(&self) -> io::Result<u32> {
        DeviceFile::get_timeout(self)
    }
    fn get_bootstatus(&self) -> io::Result<BootStatus> {
        DeviceFile::get_bootstatus(self)
    }
    fn ping(&mut self) -> io::Result<()> {
        DeviceFile::ping(self)
    }
}

/// How many timeouts arming asks for (`T - M`, then one second less each
/// time) when a driver rounds the request up past `T - M`.
const SHORTER_ASKS: u32 = 3;

/// Rule 5 on an open device: refuse alarm-only, and a device without magic
/// close unless `nowayout_set` (known, not assumed); set the timeout to
/// `T - M` if the driver can (asking for less if it rounds up); read back `W` (the value in force, whatever was
/// asked) and check it against the budget; ping once. Returns the support
/// info, `W` and the boot status (the driver's, else sysfs's).
pub(crate) fn configure(
    d: &mut impl DriverOps,
    budget: &Budget,
    sysfs_bootstatus: Option<BootStatus>,
    nowayout_set: bool,
) -> Result<(dev::Support, u32, Option<BootStatus>), Problem> {
    let support = d.get_support().map_err(Problem::Ioctl)?;
    if support.options.contains(flags::WDIOF_ALARMONLY) {
        return Err(Problem::AlarmOnly);
    }
    if !support.options.contains(flags::WDIOF_MAGICCLOSE) && !nowayout_set {
        return Err(Problem::NoMagicClose);
    }
    let settable = support.options.contains(flags::WDIOF_SETTIMEOUT);
    let target = timing::target_timeout(budget);
    let mut request = target;
    let w = loop {
        if settable {
            d.set_timeout(request).map_err(Problem::Ioctl)?;
        }
        let w = d.get_timeout().map_err(Problem::Ioctl)?;
        match timing::check_readback(w, budget) {
            Ok(()) => break w,
            // A driver that rounded up may fit when asked for a little less.
            Err(_)
                if settable && w > target && request > 1 && target - request + 1 < SHORTER_ASKS =>
            {
                request -= 1
            }
            Err(budget) => return Err(Problem::Timeout { settable, budget }),
        }
    };
    let bootstatus = d.get_bootstatus().ok().or(sysfs_bootstatus);
    d.ping().map_err(Problem::Ping)?;
    Ok((support, w, bootstatus))
}

fn resolve(spec: &DeviceSpec, roots: &SysRoots) -> Result<Option<Resolved>, ArmError> {
    match spec {
        DeviceSpec::Fake { .. } if !cfg!(feature = "testing") => Err(ArmError::FakeNotAllowed),
        DeviceSpec::Fake { .. } => Ok(None),
        DeviceSpec::Device { path } => resolve_path(path, roots).map(Some),
        DeviceSpec::Softdog => resolve_softdog(roots).map(Some),
    }
}

fn refusal(policy: NowayoutPolicy) -> Option<&'static str> {
    match policy {
        NowayoutPolicy::Refuse => Some("watchdog.nowayout = \"refuse\""),
        NowayoutPolicy::KeepPinging => None,
    }
}

/// What `leasedog check` may learn of a device WITHOUT opening it (opening
/// arms): it exists, nobody holds it, and the nowayout policy accepts it.
/// Returns a one-line description.
pub fn inspect(
    spec: &DeviceSpec,
    policy: NowayoutPolicy,
    roots: &SysRoots,
) -> Result<String, ArmError> {
    let Some(dev) = resolve(spec, roots)? else {
        return Ok("fake device (test builds only)".into());
    };
    let (nowayout, assumed) = preflight(&dev, refusal(policy), roots)?;
    refuse_without_magic_close(&dev, nowayout, assumed)?;
    let e = dev.entry.as_ref();
    Ok(format!(
        "{} identity {:?}, current timeout {}, nowayout {}{}, magic close {}; free",
        dev.path.display(),
        e.and_then(|e| e.identity.clone()).unwrap_or_default(),
        e.and_then(|e| e.timeout)
            .map_or("unknown".to_string(), |t| format!("{t} s")),
        nowayout,
        if assumed {
            " (assumed: unreadable)"
        } else {
            ""
        },
        match e.and_then(|e| e.options) {
            Some(o) if o.contains(flags::WDIOF_MAGICCLOSE) => "yes",
            Some(_) => "no (safe only because nowayout is set)",
            None => "unknown (checked from the driver when arming)",
        },
    ))
}

/// Whether an armed device is the one `spec` names (to re-use a device kept
/// open from an earlier term instead of opening it twice).
pub fn same_device(spec: &DeviceSpec, armed: &ArmedInfo, roots: &SysRoots) -> bool {
    match spec {
        DeviceSpec::Fake { record } => armed.path == *record,
        _ => resolve(spec, roots)
            .ok()
            .flatten()
            .is_some_and(|r| r.path == armed.path || r.aliases(roots).contains(&armed.path)),
    }
}

/// FENCING.md rules 2 and 5: arm one device for a leader with budget `budget`.
///
/// Before opening: refuse a missing or busy device (naming the holder and the
/// fix), under [`NowayoutPolicy::Refuse`] a nowayout device (unreadable
/// counts as set), and a device whose sysfs `options` lack WDIOF_MAGICCLOSE
/// unless nowayout is known set. After opening: refuse an alarm-only device
/// and one without magic close (same rule, from the driver), set the timeout
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
    let dev = match resolve(spec, roots)? {
        Some(dev) => dev,
        None => {
            let DeviceSpec::Fake { record } = spec else {
                unreachable!("only fake specs resolve to no device")
            };
            return fake::FakeWatchdog::arm(record, timing::target_timeout(budget))
                .map(|w| Box::new(w) as Box<dyn Watchdog>)
                .map_err(|source| ArmError::Fake {
                    path: record.clone(),
                    source,
                });
        }
    };
    let (nowayout, assumed) = preflight(&dev, refusal(policy), roots)?;
    refuse_without_magic_close(&dev, nowayout, assumed)?;
    let mut file = open(&dev, roots)?;
    let entry = dev.entry.as_ref();

    let configured = configure(
        &mut file,
        budget,
        entry.and_then(|e| e.bootstatus),
        nowayout && !assumed,
    );

    match configured {
        Ok((support, w_secs, bootstatus)) => Ok(Box::new(LinuxWatchdog {
            // Under systemd, a duplicate in its fd store keeps the agent's
            // death from being the close that pings (fdstore module docs).
            // Best effort: without FileDescriptorStoreMax= systemd drops it.
            stored: fdstore::NotifySocket::from_env().and_then(|sock| {
                let name = fdstore::fd_name(&dev.path);
                sock.store(file.raw_fd(), &name).ok().map(|()| (sock, name))
            }),
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
            _armed: ArmedToken::new(),
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
                stored: None,
                _armed: ArmedToken::new(),
            };
            Err(ArmError::Refused {
                path: dev.path.clone(),
                problem,
                closed: Closed::StillArmed { w_secs },
                still_armed: StillArmed::some(Box::new(still)),
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
                still_armed: StillArmed::none(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;
    use std::time::Duration;

    fn budget() -> Budget {
        // T = 5, M = 2: the target W is 3 s.
        let s = Duration::from_secs_f64;
        Budget::new(s(5.0), s(2.0), s(1.0), s(0.5), s(0.5)).unwrap()
    }

    /// A scripted driver: `options`, what SETTIMEOUT leaves in force (`round`
    /// maps the request), a fixed timeout for drivers that cannot set one.
    struct Scripted {
        options: u32,
        timeout: std::cell::Cell<u32>,
        round: fn(u32) -> u32,
        fail_ping: bool,
        calls: std::cell::RefCell<Vec<String>>,
    }

    impl Scripted {
        fn new(options: u32, timeout: u32) -> Scripted {
            Scripted {
                options,
                timeout: timeout.into(),
                round: |x| x,
                fail_ping: false,
                calls: Default::default(),
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
    }

    impl DriverOps for Scripted {
        fn get_support(&self) -> io::Result<dev::Support> {
            self.calls.borrow_mut().push("support".into());
            Ok(dev::Support {
                options: WdFlags(self.options),
                firmware_version: 1,
                identity: "scripted".into(),
            })
        }
        fn set_timeout(&self, secs: u32) -> io::Result<u32> {
            self.calls.borrow_mut().push(format!("set {secs}"));
            self.timeout.set((self.round)(secs));
            Ok(self.timeout.get())
        }
        fn get_timeout(&self) -> io::Result<u32> {
            self.calls.borrow_mut().push("get".into());
            Ok(self.timeout.get())
        }
        fn get_bootstatus(&self) -> io::Result<BootStatus> {
            Err(io::Error::from_raw_os_error(libc::ENOTTY))
        }
        fn ping(&mut self) -> io::Result<()> {
            self.calls.borrow_mut().push("ping".into());
            if self.fail_ping {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
    }

    const STD: u32 = WDIOF_SETTIMEOUT | WDIOF_MAGICCLOSE | WDIOF_KEEPALIVEPING;

    #[test]
    fn sets_reads_back_then_pings() {
        let mut d = Scripted::new(STD, 30);
        let boot = Some(BootStatus::from_raw(WDIOF_CARDRESET));
        let (s, w, b) = configure(&mut d, &budget(), boot, false).unwrap();
        assert_eq!(w, 3);
        assert_eq!(s.identity, "scripted");
        assert_eq!(b, boot, "falls back to sysfs bootstatus");
        assert_eq!(d.calls(), ["support", "set 3", "get", "ping"]);
    }

    #[test]
    fn the_read_back_value_counts_not_the_request() {
        // Rounds down: W = 2 still fits T - M = 3.
        let mut d = Scripted::new(STD, 30);
        d.round = |x| x - 1;
        assert_eq!(configure(&mut d, &budget(), None, false).unwrap().1, 2);
        // Rounds up: asked 3, W = 4 would reset after the lease expires, so
        // it asks for 2 and gets 3.
        let mut d = Scripted::new(STD, 30);
        d.round = |x| x + 1;
        assert_eq!(configure(&mut d, &budget(), None, false).unwrap().1, 3);
        assert_eq!(
            d.calls(),
            ["support", "set 3", "get", "set 2", "get", "ping"]
        );
        // A driver with a 10 s step never fits: refused after a few asks.
        let mut d = Scripted::new(STD, 30);
        d.round = |_| 10;
        let e = configure(&mut d, &budget(), None, false).unwrap_err();
        assert!(matches!(e, Problem::Timeout { settable: true, .. }), "{e}");
        assert!(e.to_string().contains("W = 10"), "{e}");
        let asks = d.calls().iter().filter(|c| c.starts_with("set")).count();
        assert_eq!(asks, 3, "asks 3, 2, 1 s: {:?}", d.calls());
        assert!(
            !d.calls().contains(&"ping".to_string()),
            "no ping on refusal"
        );
    }

    #[test]
    fn fixed_timeout_only_if_it_fits() {
        let mut d = Scripted::new(WDIOF_MAGICCLOSE, 2);
        assert_eq!(configure(&mut d, &budget(), None, false).unwrap().1, 2);
        assert_eq!(d.calls(), ["support", "get", "ping"], "never SETTIMEOUT");
        let mut d = Scripted::new(WDIOF_MAGICCLOSE, 60);
        let e = configure(&mut d, &budget(), None, false).unwrap_err();
        assert!(e.to_string().contains("cannot be set"), "{e}");
        assert!(e.to_string().contains("W = 60"), "{e}");
    }

    #[test]
    fn alarm_only_and_failed_ping_are_refused() {
        let mut d = Scripted::new(STD | WDIOF_ALARMONLY, 3);
        let e = configure(&mut d, &budget(), None, false).unwrap_err();
        assert!(matches!(e, Problem::AlarmOnly));
        assert_eq!(
            d.calls(),
            ["support"],
            "refused before touching the timeout"
        );
        let mut d = Scripted::new(STD, 3);
        d.fail_ping = true;
        let e = configure(&mut d, &budget(), None, false).unwrap_err();
        assert!(matches!(e, Problem::Ping(_)), "{e}");
    }

    /// Without WDIOF_MAGICCLOSE any close stops the timer (nowayout off), so a
    /// crash would disarm: refused after opening, before touching the timeout,
    /// unless nowayout is known to be set.
    #[test]
    fn no_magic_close_is_refused_unless_nowayout_is_set() {
        let mut d = Scripted::new(WDIOF_SETTIMEOUT | WDIOF_KEEPALIVEPING, 30);
        let e = configure(&mut d, &budget(), None, false).unwrap_err();
        assert!(matches!(e, Problem::NoMagicClose), "{e}");
        assert!(e.to_string().contains("MAGICCLOSE"), "{e}");
        assert_eq!(d.calls(), ["support"]);
        let mut d = Scripted::new(WDIOF_SETTIMEOUT | WDIOF_KEEPALIVEPING, 30);
        assert_eq!(configure(&mut d, &budget(), None, true).unwrap().1, 3);
    }

    #[test]
    fn errors_explain_the_state_left_behind() {
        let e = ArmError::Refused {
            path: "/dev/watchdog1".into(),
            problem: Problem::AlarmOnly,
            closed: Closed::StillArmed { w_secs: Some(30) },
            still_armed: StillArmed::none(),
        };
        let m = e.to_string();
        assert!(
            m.contains("/dev/watchdog1") && m.contains("alarm-only"),
            "{m}"
        );
        assert!(m.contains("stays ARMED with a 30 s timeout"), "{m}");
        let e = ArmError::Busy {
            path: "/dev/watchdog".into(),
            holders: vec![],
        };
        assert!(e.to_string().contains("cannot see"), "{e}");
    }
}
