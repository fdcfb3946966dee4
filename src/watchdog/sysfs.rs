//! What the kernel says about watchdogs without opening them (opening arms):
//! `/sys/class/watchdog/watchdogN/*`, the `/dev` nodes, and which process holds
//! a device (from `/proc/*/fd`). Every root is injectable so tests run on a
//! fake tree.

use super::flags::{BootStatus, WdFlags};
use serde::Serialize;
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The roots under which sysfs, device nodes and procfs are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoots {
    /// Normally `/sys`.
    pub sys: PathBuf,
    /// Normally `/dev`.
    pub dev: PathBuf,
    /// Normally `/proc`.
    pub proc: PathBuf,
}

impl SysRoots {
    pub fn real() -> SysRoots {
        SysRoots {
            sys: "/sys".into(),
            dev: "/dev".into(),
            proc: "/proc".into(),
        }
    }

    /// `<sys>/class/watchdog`.
    pub fn class_dir(&self) -> PathBuf {
        self.sys.join("class/watchdog")
    }
}

/// The sysfs identity of the kernel's softdog.
pub const SOFTDOG_IDENTITY: &str = "Software Watchdog";

/// One registered watchdog as sysfs shows it. Every attribute is optional:
/// older kernels and some drivers lack some of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsEntry {
    /// `watchdogN`.
    pub name: String,
    pub index: u32,
    /// `<sys>/class/watchdog/watchdogN`.
    pub dir: PathBuf,
    pub identity: Option<String>,
    /// Name of the bound driver (basename of the `device/driver` link). None
    /// when the driver registered no parent device: on Debian's 6.1 kernel
    /// both softdog and i6300esb live under /sys/devices/virtual.
    pub driver: Option<String>,
    pub timeout: Option<u32>,
    pub min_timeout: Option<u32>,
    pub max_timeout: Option<u32>,
    pub timeleft: Option<u32>,
    pub nowayout: Option<bool>,
    /// `active` or `inactive`.
    pub state: Option<String>,
    pub bootstatus: Option<BootStatus>,
    /// sysfs `status` (hex): the driver's WDIOC_GETSTATUS bits.
    pub status: Option<WdFlags>,
    /// sysfs `options` (hex, newer kernels).
    pub options: Option<WdFlags>,
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

fn parse_uint(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `watchdogN` -> N.
fn index_of(name: &str) -> Option<u32> {
    name.strip_prefix("watchdog")?.parse().ok()
}

impl SysfsEntry {
    pub fn read(dir: &Path) -> Option<SysfsEntry> {
        let name = dir.file_name()?.to_str()?.to_string();
        let index = index_of(&name)?;
        let driver = fs::read_link(dir.join("device/driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        let attr = |n| read_attr(dir, n);
        Some(SysfsEntry {
            index,
            dir: dir.to_owned(),
            identity: attr("identity"),
            driver,
            timeout: attr("timeout").as_deref().and_then(parse_uint),
            min_timeout: attr("min_timeout").as_deref().and_then(parse_uint),
            max_timeout: attr("max_timeout").as_deref().and_then(parse_uint),
            timeleft: attr("timeleft").as_deref().and_then(parse_uint),
            nowayout: attr("nowayout").as_deref().and_then(|s| match s {
                "0" => Some(false),
                "1" => Some(true),
                _ => None,
            }),
            state: attr("state"),
            bootstatus: attr("bootstatus")
                .as_deref()
                .and_then(parse_uint)
                .map(BootStatus::from_raw),
            status: attr("status").as_deref().and_then(parse_uint).map(WdFlags),
            options: attr("options").as_deref().and_then(parse_uint).map(WdFlags),
            name,
        })
    }

    /// The device node: `<dev>/watchdogN`.
    pub fn dev_path(&self, roots: &SysRoots) -> PathBuf {
        roots.dev.join(&self.name)
    }

    /// Every node that reaches this device: `<dev>/watchdogN`, and for
    /// watchdog0 also the legacy `<dev>/watchdog` (the kernel gives the misc
    /// device to the first registered watchdog, which is watchdog0).
    pub fn dev_aliases(&self, roots: &SysRoots) -> Vec<PathBuf> {
        let mut v = vec![self.dev_path(roots)];
        if self.index == 0 {
            v.push(roots.dev.join("watchdog"));
        }
        v
    }
}

/// All registered watchdogs, ordered by N.
pub fn list(roots: &SysRoots) -> Vec<SysfsEntry> {
    let mut v: Vec<SysfsEntry> = match fs::read_dir(roots.class_dir()) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| SysfsEntry::read(&e.path()))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort_by_key(|e| e.index);
    v
}

/// The softdog's entry, found by identity.
pub fn find_softdog(roots: &SysRoots) -> Option<SysfsEntry> {
    list(roots)
        .into_iter()
        .find(|e| e.identity.as_deref() == Some(SOFTDOG_IDENTITY))
}

/// The sysfs entry behind a device node: by name (`watchdogN`, or `watchdog`
/// = watchdog0, after following symlinks), else by the node's major:minor
/// against sysfs `dev`.
pub fn entry_for_path(path: &Path, roots: &SysRoots) -> Option<SysfsEntry> {
    let entries = list(roots);
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    for p in [path, canonical.as_path()] {
        let name = p.file_name().and_then(|n| n.to_str());
        let idx = match name {
            Some("watchdog") => Some(0),
            Some(n) => index_of(n),
            None => None,
        };
        if let Some(i) = idx {
            if let Some(e) = entries.iter().find(|e| e.index == i) {
                return Some(e.clone());
            }
        }
    }
    let md = fs::metadata(path).ok()?;
    if !md.file_type().is_char_device() {
        return None;
    }
    let rdev = md.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    entries
        .into_iter()
        .find(|e| read_attr(&e.dir, "dev").is_some_and(|d| d == format!("{maj}:{min}")))
}

/// A process we recognise as a watchdog user, with the way to free the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KnownHolder {
    /// systemd's RuntimeWatchdogSec=.
    Systemd,
    /// The `watchdog` daemon (or its `wd_keepalive` companion).
    WatchdogDaemon,
    Sbd,
    Corosync,
    /// Another leasedog: one agent per device.
    Leasedog,
    /// The calling process itself (an earlier handle was never disarmed).
    ThisProcess,
    Unknown,
}

impl KnownHolder {
    fn classify(pid: i32, comm: &str) -> KnownHolder {
        match comm {
            _ if pid as u32 == std::process::id() => KnownHolder::ThisProcess,
            "systemd" if pid == 1 => KnownHolder::Systemd,
            "watchdog" | "wd_keepalive" => KnownHolder::WatchdogDaemon,
            "sbd" => KnownHolder::Sbd,
            "corosync" => KnownHolder::Corosync,
            "leasedog" => KnownHolder::Leasedog,
            _ => KnownHolder::Unknown,
        }
    }
}

/// A process holding a watchdog device open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: i32,
    /// `/proc/<pid>/comm`.
    pub comm: String,
    /// `/proc/<pid>/cmdline`, NULs as spaces.
    pub cmdline: String,
    pub kind: KnownHolder,
}

impl Holder {
    /// How to free the device from this holder.
    pub fn fix(&self) -> String {
        match self.kind {
            KnownHolder::Systemd => {
                "systemd holds it for RuntimeWatchdogSec=: set RuntimeWatchdogSec=off (or 0) \
                 in /etc/systemd/system.conf (or a drop-in in /etc/systemd/system.conf.d/) and run \
                 `systemctl daemon-reexec`, or give leasedog another device"
                    .into()
            }
            KnownHolder::WatchdogDaemon => {
                format!(
                "the watchdog daemon holds it: `systemctl disable --now {}` (and wd_keepalive), \
                 or give leasedog another device",
                if self.comm == "wd_keepalive" { "wd_keepalive" } else { "watchdog" }
            )
            }
            KnownHolder::Sbd => {
                "sbd holds it: sbd and leasedog cannot share a device; point SBD_WATCHDOG_DEV \
                 (/etc/sysconfig/sbd or /etc/default/sbd) at another device, or stop sbd"
                    .into()
            }
            KnownHolder::Corosync => "corosync holds it: set its watchdog_device option \
                 (resources.watchdog_device in corosync.conf) to off or to another device"
                .into(),
            KnownHolder::Leasedog => {
                "another leasedog holds it: only one agent may use a device".into()
            }
            KnownHolder::ThisProcess => "this process already holds it open (an earlier handle \
                 was never disarmed): keep using that handle"
                .into(),
            KnownHolder::Unknown => "stop that process or give leasedog another device".into(),
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)?;
        if !self.cmdline.is_empty() && self.cmdline != self.comm {
            write!(f, " `{}`", self.cmdline)?;
        }
        Ok(())
    }
}

/// The processes whose open descriptors point at any of `paths`.
///
/// Uses readlink only (never stat: stat through a descriptor of a hung network
/// file system can block). Processes we may not inspect are skipped; the
/// kernel's EBUSY at open is the backstop. Only this PID namespace is visible.
pub fn holders(paths: &[PathBuf], roots: &SysRoots) -> Vec<Holder> {
    let mut wanted: Vec<PathBuf> = Vec::new();
    for p in paths {
        wanted.push(p.clone());
        if let Ok(c) = fs::canonicalize(p) {
            wanted.push(c);
        }
    }
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(&roots.proc) else {
        return out;
    };
    let mut pids: Vec<i32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let pdir = roots.proc.join(pid.to_string());
        let Ok(fds) = fs::read_dir(pdir.join("fd")) else {
            continue;
        };
        let holds = fds
            .filter_map(|e| e.ok())
            .any(|e| fs::read_link(e.path()).is_ok_and(|t| wanted.contains(&t)));
        if holds {
            let comm = read_attr(&pdir, "comm").unwrap_or_default();
            let cmdline = fs::read(pdir.join("cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .split('\0')
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push(Holder {
                pid,
                kind: KnownHolder::classify(pid, &comm),
                comm,
                cmdline,
            });
        }
    }
    out
}
