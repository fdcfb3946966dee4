//! `leasedog query-watchdog`: what each device is, without arming it.
//!
//! [`query`] reads sysfs and /proc only: opening a device starts its timer.
//! [`query_open`] (the CLI's `--open`) does open one to ask the driver
//! directly, and magic-closes it straight after.

use super::flags::WDIOF_MAGICCLOSE;
use super::sysfs::{self, Holder, SysRoots};
use super::{open, preflight, resolve_path, ArmError, BootStatus, Closed, Problem, WdFlags};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One device, as sysfs (and, with `--open`, the driver) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    /// `watchdogN`, if sysfs knows the device.
    pub name: Option<String>,
    pub path: PathBuf,
    /// Other nodes reaching the same device (`/dev/watchdog` for watchdog0).
    pub aliases: Vec<PathBuf>,
    pub identity: Option<String>,
    pub driver: Option<String>,
    /// Seconds.
    pub timeout: Option<u32>,
    /// The range the driver accepts for WDIOC_SETTIMEOUT, seconds.
    pub min_timeout: Option<u32>,
    pub max_timeout: Option<u32>,
    /// Seconds left before a reset (only while active, only some drivers).
    pub timeleft: Option<u32>,
    pub nowayout: Option<bool>,
    /// `active` / `inactive`.
    pub state: Option<String>,
    pub bootstatus: Option<BootStatus>,
    /// Whether the last boot was a watchdog reset (WDIOF_CARDRESET).
    pub was_watchdog_reset: Option<bool>,
    pub options: Option<WdFlags>,
    /// WDIOF_MAGICCLOSE, if the options are known. Without it any close stops
    /// the timer (nowayout off), so a crash disarms it: `arm` refuses such a
    /// device unless nowayout is set.
    pub magic_close: Option<bool>,
    pub firmware_version: Option<u32>,
    pub holders: Vec<Holder>,
    /// The driver was asked directly (`--open`).
    pub opened: bool,
    pub notes: Vec<String>,
}

impl DeviceReport {
    fn from_entry(e: &sysfs::SysfsEntry, roots: &SysRoots) -> DeviceReport {
        let aliases = e.dev_aliases(roots);
        DeviceReport {
            name: Some(e.name.clone()),
            path: aliases[0].clone(),
            holders: sysfs::holders(&aliases, roots),
            aliases: aliases[1..].to_vec(),
            identity: e.identity.clone(),
            driver: e.driver.clone(),
            timeout: e.timeout,
            min_timeout: e.min_timeout,
            max_timeout: e.max_timeout,
            timeleft: e.timeleft,
            nowayout: e.nowayout,
            state: e.state.clone(),
            bootstatus: e.bootstatus,
            was_watchdog_reset: e.bootstatus.map(|b| b.was_watchdog_reset()),
            options: e.options,
            magic_close: None,
            firmware_version: None,
            opened: false,
            notes: Vec::new(),
        }
        .with_magic_close()
    }

    /// Sets `magic_close` from `options` and, if it is missing, says what
    /// that means (once).
    fn with_magic_close(mut self) -> DeviceReport {
        self.magic_close = self.options.map(|o| o.contains(WDIOF_MAGICCLOSE));
        self.notes.retain(|n| !n.starts_with(NO_MAGIC_CLOSE));
        if self.magic_close == Some(false) {
            self.notes.push(format!(
                "{NO_MAGIC_CLOSE}: any close stops it when nowayout is off, so a crash of the agent \
                 would disarm it; leasedog refuses it unless nowayout is set{}",
                match self.nowayout {
                    Some(true) => " (it is)",
                    Some(false) => " (it is not)",
                    None => " (unreadable here)",
                }
            ));
        }
        self
    }
}

const NO_MAGIC_CLOSE: &str = "no WDIOF_MAGICCLOSE";

/// Every registered watchdog, from sysfs and /proc only (nothing is opened).
pub fn query(roots: &SysRoots) -> Vec<DeviceReport> {
    sysfs::list(roots)
        .iter()
        .map(|e| DeviceReport::from_entry(e, roots))
        .collect()
}

/// Opens `path` to read GETSUPPORT, GETTIMEOUT, GETTIMELEFT and GETBOOTSTATUS,
/// then magic-closes it. Refuses a busy device, and a nowayout one (unreadable
/// counts as set: it could not be stopped again) unless `force`.
pub fn query_open(path: &Path, roots: &SysRoots, force: bool) -> Result<DeviceReport, ArmError> {
    let dev = resolve_path(path, roots)?;
    let refuse = (!force).then_some("`--force` was not given");
    let (nowayout, assumed) = preflight(&dev, refuse, roots)?;
    let mut report = match &dev.entry {
        Some(e) => DeviceReport::from_entry(e, roots),
        None => DeviceReport {
            name: None,
            path: dev.path.clone(),
            aliases: Vec::new(),
            identity: None,
            driver: None,
            timeout: None,
            min_timeout: None,
            max_timeout: None,
            timeleft: None,
            nowayout: None,
            state: None,
            bootstatus: None,
            was_watchdog_reset: None,
            options: None,
            magic_close: None,
            firmware_version: None,
            holders: Vec::new(),
            opened: false,
            notes: vec!["no sysfs entry found for this node".into()],
        },
    };
    report.path = dev.path.clone();
    let file = open(&dev, roots)?;
    let support = match file.get_support() {
        Ok(s) => s,
        Err(e) => {
            let closed = match file.magic_close() {
                Ok(()) if nowayout => Closed::NowayoutUnknown,
                Ok(()) => Closed::Disarmed,
                Err(e) => Closed::DisarmFailed(e),
            };
            return Err(ArmError::Refused {
                path: dev.path,
                problem: Problem::Ioctl(e),
                closed,
                still_armed: super::StillArmed::none(),
            });
        }
    };
    report.opened = true;
    report.identity = Some(support.identity);
    report.options = Some(support.options);
    report = report.with_magic_close();
    report.firmware_version = Some(support.firmware_version);
    match file.get_timeout() {
        Ok(t) => report.timeout = Some(t),
        Err(e) => report.notes.push(e.to_string()),
    }
    match file.get_timeleft() {
        Ok(t) => report.timeleft = Some(t),
        Err(e) => report.notes.push(e.to_string()),
    }
    match file.get_bootstatus() {
        Ok(b) => {
            report.bootstatus = Some(b);
            report.was_watchdog_reset = Some(b.was_watchdog_reset());
        }
        Err(e) => report.notes.push(e.to_string()),
    }
    match file.magic_close() {
        Ok(()) if nowayout => report.notes.push(format!(
            "nowayout is {}: the device may still be ARMED after this query; \
             the node resets unless something pings it",
            if assumed {
                "unreadable (assumed set)"
            } else {
                "set"
            }
        )),
        Ok(()) => report
            .notes
            .push("opened, then disarmed (magic close)".into()),
        Err(e) => report.notes.push(format!(
            "magic close failed ({e}): the device may still be ARMED"
        )),
    }
    Ok(report)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |x| x.to_string())
}

/// A human table, then one line per holder with the fix, and the notes.
pub fn render_table(reports: &[DeviceReport]) -> String {
    if reports.is_empty() {
        return "no watchdog devices found (is a driver loaded? try `modprobe softdog`)\n".into();
    }
    let header = [
        "DEVICE",
        "IDENTITY",
        "DRIVER",
        "TIMEOUT",
        "NOWAYOUT",
        "STATE",
        "BOOTSTATUS",
        "HELD BY",
    ];
    let rows: Vec<[String; 8]> = reports
        .iter()
        .map(|r| {
            let mut dev = r.path.display().to_string();
            for a in &r.aliases {
                let _ = write!(dev, " ({})", a.display());
            }
            [
                dev,
                opt(&r.identity),
                opt(&r.driver),
                match (r.timeout, r.min_timeout, r.max_timeout) {
                    (Some(t), Some(lo), Some(hi)) => format!("{t}s ({lo}-{hi})"),
                    (Some(t), _, _) => format!("{t}s"),
                    _ => "-".into(),
                },
                r.nowayout
                    .map_or("unknown", |n| if n { "yes" } else { "no" })
                    .to_string(),
                opt(&r.state),
                opt(&r.bootstatus),
                if r.holders.is_empty() {
                    "-".into()
                } else {
                    r.holders
                        .iter()
                        .map(|h| format!("{} ({})", h.pid, h.comm))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    for r in reports {
        for h in &r.holders {
            let _ = writeln!(out, "{}: held by {h}: {}", r.path.display(), h.fix());
        }
        if r.was_watchdog_reset == Some(true) {
            let _ = writeln!(
                out,
                "{}: the previous boot was a watchdog reset (CARDRESET)",
                r.path.display()
            );
        }
        for n in &r.notes {
            let _ = writeln!(out, "{}: {n}", r.path.display());
        }
    }
    out
}
