//! The watchdog module against fake sysfs / dev / proc trees in a tempdir, and
//! against a real process holding a file, scanned through the real /proc.
//! Device nodes here are regular files: every ioctl on them fails with ENOTTY,
//! which exercises the "refused after opening" paths for real.

use leasedog::config::{DeviceSpec, NowayoutPolicy};
use leasedog::timing::Budget;
use leasedog::watchdog::{
    self, query, query_open, render_table, sysfs, ArmError, Closed, KnownHolder, SysRoots,
};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn budget() -> Budget {
    let s = Duration::from_secs_f64;
    Budget::new(s(5.0), s(2.0), s(1.0), s(0.5), s(0.5)).unwrap()
}

struct Tree {
    _dir: tempfile::TempDir,
    roots: SysRoots,
}

struct Dev<'a> {
    index: u32,
    identity: &'a str,
    driver: Option<&'a str>,
    nowayout: Option<&'a str>,
    bootstatus: &'a str,
    /// sysfs `options` (hex), if the kernel shows it.
    options: Option<&'a str>,
}

impl Tree {
    fn new() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let roots = SysRoots {
            sys: dir.path().join("sys"),
            dev: dir.path().join("dev"),
            proc: dir.path().join("proc"),
        };
        fs::create_dir_all(roots.class_dir()).unwrap();
        fs::create_dir_all(&roots.dev).unwrap();
        fs::create_dir_all(&roots.proc).unwrap();
        Tree { _dir: dir, roots }
    }

    /// Registers watchdogN in sysfs and creates its node (and /dev/watchdog
    /// for watchdog0).
    fn add(&self, d: Dev) -> PathBuf {
        let name = format!("watchdog{}", d.index);
        let dir = self.roots.class_dir().join(&name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("identity"), format!("{}\n", d.identity)).unwrap();
        fs::write(dir.join("timeout"), "30\n").unwrap();
        if d.index == 0 {
            fs::write(dir.join("min_timeout"), "1\n").unwrap();
            fs::write(dir.join("max_timeout"), "1023\n").unwrap();
        }
        fs::write(dir.join("state"), "inactive\n").unwrap();
        fs::write(dir.join("bootstatus"), format!("{}\n", d.bootstatus)).unwrap();
        if let Some(n) = d.nowayout {
            fs::write(dir.join("nowayout"), format!("{n}\n")).unwrap();
        }
        if let Some(o) = d.options {
            fs::write(dir.join("options"), format!("{o}\n")).unwrap();
        }
        if let Some(drv) = d.driver {
            let drvdir = self.roots.sys.join("bus/pci/drivers").join(drv);
            fs::create_dir_all(&drvdir).unwrap();
            fs::create_dir_all(dir.join("device")).unwrap();
            symlink(&drvdir, dir.join("device/driver")).unwrap();
        }
        let node = self.roots.dev.join(&name);
        fs::write(&node, b"").unwrap();
        if d.index == 0 {
            fs::write(self.roots.dev.join("watchdog"), b"").unwrap();
        }
        node
    }

    /// A fake process `pid` named `comm` with fd 3 linked to `target`.
    fn holder(&self, pid: i32, comm: &str, cmdline: &str, target: &Path) {
        let p = self.roots.proc.join(pid.to_string());
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(p.join("cmdline"), cmdline.replace(' ', "\0") + "\0").unwrap();
        symlink(target, p.join("fd/3")).unwrap();
    }
}

fn hw(index: u32) -> Dev<'static> {
    Dev {
        index,
        identity: "i6300ESB timer",
        driver: Some("i6300ESB timer"),
        nowayout: Some("0"),
        bootstatus: "0",
        options: None,
    }
}

fn soft(index: u32) -> Dev<'static> {
    Dev {
        index,
        identity: "Software Watchdog",
        driver: None,
        nowayout: Some("0"),
        bootstatus: "0",
        options: None,
    }
}

fn arm(
    spec: DeviceSpec,
    policy: NowayoutPolicy,
    roots: &SysRoots,
) -> Result<Box<dyn watchdog::Watchdog>, ArmError> {
    watchdog::arm(&spec, &budget(), policy, roots)
}

fn device(p: &Path) -> DeviceSpec {
    DeviceSpec::Device { path: p.to_owned() }
}

#[test]
fn query_lists_devices_with_identity_driver_nowayout_and_holder() {
    let t = Tree::new();
    t.add(Dev {
        bootstatus: "32",
        ..hw(0)
    });
    t.add(Dev {
        nowayout: Some("1"),
        ..soft(1)
    });
    // systemd holds the legacy node, which is watchdog0.
    t.holder(
        1,
        "systemd",
        "/sbin/init splash",
        &t.roots.dev.join("watchdog"),
    );
    let r = query(&t.roots);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].name.as_deref(), Some("watchdog0"));
    assert_eq!(r[0].aliases, vec![t.roots.dev.join("watchdog")]);
    assert_eq!(r[0].identity.as_deref(), Some("i6300ESB timer"));
    assert_eq!(r[0].driver.as_deref(), Some("i6300ESB timer"));
    assert_eq!(r[0].nowayout, Some(false));
    assert_eq!(r[0].timeout, Some(30));
    assert_eq!((r[0].min_timeout, r[0].max_timeout), (Some(1), Some(1023)));
    assert_eq!(r[1].max_timeout, None);
    assert_eq!(r[0].was_watchdog_reset, Some(true));
    assert_eq!(r[0].holders.len(), 1);
    assert_eq!(r[0].holders[0].pid, 1);
    assert_eq!(r[0].holders[0].kind, KnownHolder::Systemd);
    assert_eq!(r[0].holders[0].cmdline, "/sbin/init splash");
    assert!(!r[0].opened);
    assert_eq!(r[1].identity.as_deref(), Some("Software Watchdog"));
    assert_eq!(r[1].driver, None);
    assert_eq!(r[1].nowayout, Some(true));
    assert!(r[1].holders.is_empty());

    let table = render_table(&r);
    assert!(table.starts_with("DEVICE"), "{table}");
    assert!(table.contains("i6300ESB timer"), "{table}");
    assert!(table.contains("1 (systemd)"), "{table}");
    assert!(table.contains("RuntimeWatchdogSec"), "{table}");
    assert!(table.contains("CARDRESET"), "{table}");
    assert!(table.contains("30s (1-1023)"), "{table}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json[1]["nowayout"], true);
    assert_eq!(json[0]["holders"][0]["kind"], "systemd");
    // query never opens: the nodes stay untouched.
    assert_eq!(fs::read(t.roots.dev.join("watchdog0")).unwrap(), b"");
    assert!(render_table(&[]).contains("no watchdog"));
}

#[test]
fn softdog_is_found_by_identity() {
    let t = Tree::new();
    t.add(hw(0));
    let softnode = t.add(soft(1));
    let r = watchdog::resolve_softdog(&t.roots).unwrap();
    assert_eq!(r.path, softnode);
    // Arming it really goes to watchdog1 (and fails there: a regular file).
    match arm(DeviceSpec::Softdog, NowayoutPolicy::Refuse, &t.roots).unwrap_err() {
        ArmError::Refused { path, .. } => assert_eq!(path, softnode),
        e => panic!("unexpected {e}"),
    }

    let t2 = Tree::new();
    t2.add(hw(0));
    let e = arm(DeviceSpec::Softdog, NowayoutPolicy::Refuse, &t2.roots).unwrap_err();
    assert!(matches!(e, ArmError::NoSoftdog { .. }), "{e}");
    assert!(e.to_string().contains("modprobe softdog"), "{e}");
    assert!(e.to_string().contains("i6300ESB timer"), "{e}");
}

#[test]
fn missing_device_is_refused_naming_what_exists() {
    let t = Tree::new();
    t.add(hw(0));
    let p = t.roots.dev.join("watchdog5");
    let e = arm(device(&p), NowayoutPolicy::KeepPinging, &t.roots).unwrap_err();
    assert!(matches!(e, ArmError::Missing { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("watchdog5") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(msg.contains("watchdog0 (i6300ESB timer)"), "{msg}");
    assert!(!p.exists(), "arming must not create the node");

    let empty = Tree::new();
    let e = arm(device(&p), NowayoutPolicy::KeepPinging, &empty.roots).unwrap_err();
    assert!(e.to_string().contains("no watchdog is registered"), "{e}");
}

#[test]
fn busy_device_names_holder_and_fix() {
    let cases = [
        (1, "systemd", "RuntimeWatchdogSec=off"),
        (4_000_812, "watchdog", "systemctl disable --now watchdog"),
        (4_000_900, "sbd", "SBD_WATCHDOG_DEV"),
        (4_000_901, "corosync", "watchdog_device"),
        (4_000_902, "leasedog", "another leasedog"),
        (4_000_903, "mystery", "stop that process"),
    ];
    for (pid, comm, fix) in cases {
        let t = Tree::new();
        let node = t.add(hw(0));
        t.holder(pid, comm, &format!("/usr/sbin/{comm} -f"), &node);
        // Asked by the legacy name: the alias still finds the holder of watchdog0.
        let e = arm(
            device(&t.roots.dev.join("watchdog")),
            NowayoutPolicy::KeepPinging,
            &t.roots,
        )
        .unwrap_err();
        let msg = e.to_string();
        match &e {
            ArmError::Busy { holders, .. } => assert_eq!(holders[0].pid, pid),
            _ => panic!("{comm}: expected Busy, got {msg}"),
        }
        assert!(msg.contains(&format!("pid {pid} ({comm})")), "{msg}");
        assert!(msg.contains(fix), "{comm}: {msg}");
        assert!(msg.contains("NOT opened"), "{msg}");
        assert_eq!(
            fs::read(&node).unwrap(),
            b"",
            "a busy device must not be touched"
        );
    }
}

/// Kills and reaps the child even when the test fails.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn real_holder_found_through_real_proc() {
    let t = Tree::new();
    let node = t.add(hw(0));
    let roots = SysRoots {
        proc: "/proc".into(),
        ..t.roots.clone()
    };
    // A real process holds the "device" open (as its stdin).
    let child = Reap(
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::from(fs::File::open(&node).unwrap()))
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    // Wait (bounded) until the child has exec'd sleep, so comm and cmdline
    // are final (exec sets comm before the new arguments: in between, the
    // cmdline reads empty).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != "sleep")
        || fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c != b"sleep\x0030\x00")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "child never became sleep"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &roots).unwrap_err();
    let msg = e.to_string();
    match &e {
        ArmError::Busy { holders, .. } => {
            assert_eq!(holders.len(), 1, "{holders:?}");
            assert_eq!(holders[0].pid, pid);
            assert_eq!(holders[0].comm, "sleep");
            assert_eq!(holders[0].cmdline, "sleep 30");
        }
        _ => panic!("expected Busy, got {msg}"),
    }
    assert!(msg.contains(&format!("pid {pid} (sleep)")), "{msg}");
    drop(child);

    // This test process itself as the holder, through the other alias.
    let legacy = t.roots.dev.join("watchdog");
    let held = fs::File::open(&legacy).unwrap();
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &roots).unwrap_err();
    match &e {
        ArmError::Busy { holders, .. } => {
            assert!(
                holders.iter().any(|h| h.pid == std::process::id() as i32),
                "{e}"
            )
        }
        _ => panic!("expected Busy, got {e}"),
    }
    drop(held);
}

#[test]
fn nowayout_refused_before_opening() {
    let t = Tree::new();
    let node = t.add(Dev {
        nowayout: Some("1"),
        ..hw(0)
    });
    let e = arm(device(&node), NowayoutPolicy::Refuse, &t.roots).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            ArmError::Nowayout {
                unreadable: false,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("nowayout set"), "{msg}");
    assert!(msg.contains("NOT opened"), "{msg}");
    assert!(msg.contains("refuse"), "{msg}");
    assert_eq!(fs::read(&node).unwrap(), b"");
}

#[test]
fn unreadable_nowayout_is_treated_as_set() {
    let t = Tree::new();
    let node = t.add(Dev {
        nowayout: None,
        ..hw(0)
    });
    let e = arm(device(&node), NowayoutPolicy::Refuse, &t.roots).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            ArmError::Nowayout {
                unreadable: true,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("unreadable") && msg.contains("treated as set"),
        "{msg}"
    );
    assert!(msg.contains("NOT opened"), "{msg}");

    // Keep-pinging opens it; the failure after opening is magic-closed, and
    // the error warns that the close may not have stopped it.
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &t.roots).unwrap_err();
    match &e {
        ArmError::Refused {
            closed,
            still_armed,
            ..
        } => {
            assert!(matches!(closed, Closed::NowayoutUnknown), "{e}");
            assert!(still_armed.is_empty());
        }
        _ => panic!("expected Refused, got {e}"),
    }
    assert_eq!(fs::read(&node).unwrap(), b"V");
}

#[test]
fn failure_after_open_magic_closes_with_a_clean_enotty() {
    let t = Tree::new();
    let node = t.add(hw(0));
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &t.roots).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("WDIOC_GETSUPPORT") && msg.contains("ENOTTY"),
        "{msg}"
    );
    assert!(msg.contains("disarmed"), "{msg}");
    assert!(
        matches!(
            e,
            ArmError::Refused {
                closed: Closed::Disarmed,
                ..
            }
        ),
        "{msg}"
    );
    // Exactly the magic character was written: no ping reached it.
    assert_eq!(fs::read(&node).unwrap(), b"V");
}

#[test]
fn nowayout_failure_after_open_stays_armed_and_hands_back_the_handle() {
    let t = Tree::new();
    let node = t.add(Dev {
        nowayout: Some("1"),
        ..hw(0)
    });
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &t.roots).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("could NOT be disarmed") && msg.contains("ARMED"),
        "{msg}"
    );
    let ArmError::Refused {
        mut still_armed, ..
    } = e
    else {
        panic!("expected a still-armed handle: {msg}")
    };
    let mut h = still_armed
        .take()
        .unwrap_or_else(|| panic!("expected a still-armed handle: {msg}"));
    assert!(h.info().nowayout);
    assert_eq!(fs::read(&node).unwrap(), b"", "no 'V' may be written");
    h.ping().unwrap();
    drop(h); // dropping leaves it armed: still no 'V'
    assert_eq!(fs::read(&node).unwrap(), b"\0");
}

/// Whether this process holds `path` open.
fn held_open(path: &Path) -> bool {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
}

/// A refused nowayout device whose handle nobody takes (the error is just
/// logged and dropped) must stay open: closing a running device pings it.
#[test]
fn a_dropped_refusal_never_closes_the_still_armed_device() {
    let t = Tree::new();
    let node = t.add(Dev {
        nowayout: Some("1"),
        ..hw(0)
    });
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &t.roots).unwrap_err();
    assert!(matches!(e, ArmError::Refused { .. }), "{e}");
    assert!(held_open(&node));
    drop(e);
    assert!(
        held_open(&node),
        "dropping the error closed the still-armed device"
    );
}

#[test]
fn query_open_refuses_nowayout_unless_forced_and_closes_after() {
    let t = Tree::new();
    let node = t.add(Dev {
        nowayout: Some("1"),
        ..hw(0)
    });
    let e = query_open(&node, &t.roots, false).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(e.to_string().contains("NOT opened"), "{e}");
    assert_eq!(fs::read(&node).unwrap(), b"");
    // Forced: it opens; a regular file answers ENOTTY, and is closed with 'V'.
    let e = query_open(&node, &t.roots, true).unwrap_err();
    assert!(e.to_string().contains("ENOTTY"), "{e}");
    assert_eq!(fs::read(&node).unwrap(), b"V");
}

/// A device without WDIOF_MAGICCLOSE stops on ANY close when nowayout is off:
/// a crash of the agent would disarm it. Refused before opening unless
/// nowayout is set; `query-watchdog` and `check` say so.
#[test]
fn device_without_magic_close_is_refused_unless_nowayout() {
    let t = Tree::new();
    // SETTIMEOUT | KEEPALIVEPING, no MAGICCLOSE.
    let node = t.add(Dev {
        options: Some("0x8080"),
        ..hw(0)
    });
    for policy in [NowayoutPolicy::Refuse, NowayoutPolicy::KeepPinging] {
        let e = arm(device(&node), policy, &t.roots).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ArmError::NoMagicClose { .. }), "{msg}");
        assert!(
            msg.contains("MAGICCLOSE") && msg.contains("NOT opened"),
            "{msg}"
        );
        assert_eq!(fs::read(&node).unwrap(), b"", "never opened: {msg}");
    }
    let e = watchdog::inspect(&device(&node), NowayoutPolicy::KeepPinging, &t.roots)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MAGICCLOSE"), "{e}");
    let r = query(&t.roots);
    assert_eq!(r[0].magic_close, Some(false));
    let table = render_table(&r);
    assert!(
        table.contains("no WDIOF_MAGICCLOSE") && table.contains("refuses"),
        "{table}"
    );

    // With nowayout set, any close leaves it running: accepted (and here
    // refused only after opening, by the regular file's ENOTTY).
    let t = Tree::new();
    let node = t.add(Dev {
        options: Some("0x8080"),
        nowayout: Some("1"),
        ..hw(0)
    });
    let e = arm(device(&node), NowayoutPolicy::KeepPinging, &t.roots).unwrap_err();
    assert!(matches!(e, ArmError::Refused { .. }), "{e}");
    let ok = watchdog::inspect(&device(&node), NowayoutPolicy::KeepPinging, &t.roots).unwrap();
    assert!(ok.contains("magic close no"), "{ok}");

    // A device that has it is described as such.
    let t = Tree::new();
    let node = t.add(Dev {
        options: Some("0x8180"),
        ..hw(0)
    });
    let ok = watchdog::inspect(&device(&node), NowayoutPolicy::Refuse, &t.roots).unwrap();
    assert!(ok.contains("magic close yes"), "{ok}");
    assert_eq!(query(&t.roots)[0].magic_close, Some(true));
}

#[test]
fn holder_scan_ignores_unrelated_fds() {
    let t = Tree::new();
    let n0 = t.add(hw(0));
    let n1 = t.add(soft(1));
    t.holder(4_000_050, "postgres", "postgres", &t.roots.dev.join("null"));
    t.holder(4_000_051, "watchdog", "watchdog", &n1);
    assert!(sysfs::holders(std::slice::from_ref(&n0), &t.roots).is_empty());
    let h = sysfs::holders(&[n1], &t.roots);
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].kind, KnownHolder::WatchdogDaemon);
}

#[cfg(feature = "testing")]
#[test]
fn fake_spec_arms_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("fake.rec");
    let t = Tree::new();
    let mut w = arm(
        DeviceSpec::Fake {
            record: rec.clone(),
        },
        NowayoutPolicy::Refuse,
        &t.roots,
    )
    .unwrap();
    assert_eq!(w.info().w_secs, 3, "target_timeout of T=5, M=2");
    w.ping().unwrap();
    w.disarm().unwrap();
    let ops = watchdog::read_fake_record(&rec).unwrap();
    assert_eq!(ops.len(), 3);
    assert!(matches!(ops[0], watchdog::FakeOp::Arm { w_secs: 3, .. }));
    assert!(matches!(ops[2], watchdog::FakeOp::Disarm { .. }));
}

#[cfg(not(feature = "testing"))]
#[test]
fn fake_spec_refused_without_the_testing_feature() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("fake.rec");
    let t = Tree::new();
    let e = arm(
        DeviceSpec::Fake {
            record: rec.clone(),
        },
        NowayoutPolicy::KeepPinging,
        &t.roots,
    )
    .unwrap_err();
    assert!(matches!(e, ArmError::FakeNotAllowed), "{e}");
    assert!(!rec.exists());
}

/// `leasedog query-watchdog` and `leasedog check`, the binaries themselves,
/// against a fake tree (test builds read `LEASEDOG_SYSROOT`) and a real etcd.
#[cfg(feature = "testing")]
mod cli {
    use super::*;

    const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

    fn sysroot(t: &Tree) -> PathBuf {
        t.roots.sys.parent().unwrap().to_owned()
    }

    fn run(t: &Tree, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("LEASEDOG_SYSROOT", sysroot(t))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    #[test]
    fn query_watchdog_lists_the_fake_tree_without_opening() {
        let t = Tree::new();
        let hw0 = t.add(hw(0));
        t.add(soft(1));
        t.holder(1, "systemd", "/sbin/init", &hw0);
        let (code, out) = run(&t, &["query-watchdog", "--json"]);
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let devs = v.as_array().unwrap();
        assert_eq!(devs.len(), 2);
        assert!(out.contains("i6300ESB timer") && out.contains("Software Watchdog"));
        assert!(
            out.contains("systemd"),
            "the holder of watchdog0 is named: {out}"
        );
        let (code, table) = run(&t, &["query-watchdog"]);
        assert_eq!(code, 0);
        assert!(table.contains("watchdog1"), "{table}");
        // A device without magic close is called out, in both forms.
        t.add(Dev {
            options: Some("0x8080"),
            ..hw(2)
        });
        let (code, table) = run(&t, &["query-watchdog"]);
        assert_eq!(code, 0);
        assert!(
            table.contains("watchdog2: no WDIOF_MAGICCLOSE") && table.contains("refuses it"),
            "{table}"
        );
        let (_, out) = run(&t, &["query-watchdog", "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v[2]["magic_close"], false, "{out}");
    }

    /// Descriptors systemd hands back from its fd store (devices a previous
    /// agent left armed) are named at start-up and kept, not closed.
    #[test]
    fn handed_back_descriptors_are_named_and_kept() {
        let t = Tree::new();
        let dir = tempfile::tempdir().unwrap();
        let held = dir.path().join("held");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 3>>'{}'; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=leasedog-watchdog1 exec '{BIN}' query-watchdog",
                held.display()
            ))
            .env("LEASEDOG_SYSROOT", sysroot(&t))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("handed back 1 descriptor(s)")
                && err.contains("fd 3 (leasedog-watchdog1)"),
            "{err}"
        );
        assert!(err.contains("never pinged"), "{err}");
        // Another process's LISTEN_PID: not ours, nothing said.
        let out = Command::new(BIN)
            .arg("query-watchdog")
            .env("LEASEDOG_SYSROOT", sysroot(&t))
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "1")
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stderr).contains("handed back"));
    }

    #[test]
    fn check_is_safe_or_unsafe_with_the_reason() {
        let etcd = leasedog_testbed::etcd::EtcdServer::start().unwrap();
        let t = Tree::new();
        let hw0 = t.add(hw(0));
        t.add(soft(1));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        let write = |devices: &str| {
            fs::write(
                &cfg,
                format!(
                    "node = 'a'\n[etcd]\nendpoints = ['{}']\n[watchdog]\nmode = 'required'\n{devices}",
                    etcd.client_url()
                ),
            )
            .unwrap()
        };
        write(&format!(
            "[[watchdog.device]]\nkind = 'device'\npath = '{}'\n[[watchdog.device]]\nkind = 'softdog'\n",
            hw0.display()
        ));
        let (code, out) = run(
            &t,
            &["check", "--config", cfg.to_str().unwrap(), "--samples", "3"],
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("verdict: SAFE"), "{out}");
        assert!(
            out.contains("W (watchdog timeout)") && out.contains("round trips"),
            "{out}"
        );
        // systemd holds the hardware device: UNSAFE, naming it and the fix.
        t.holder(1, "systemd", "/sbin/init", &hw0);
        let (code, out) = run(
            &t,
            &["check", "--config", cfg.to_str().unwrap(), "--samples", "3"],
        );
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("verdict: UNSAFE") && out.contains("systemd"),
            "{out}"
        );
        assert!(
            out.contains("RuntimeWatchdogSec"),
            "the fix is named: {out}"
        );
        // A device without magic close: UNSAFE, saying why.
        let nomagic = t.add(Dev {
            options: Some("0x8080"),
            ..hw(2)
        });
        write(&format!(
            "[[watchdog.device]]\nkind = 'device'\npath = '{}'\n",
            nomagic.display()
        ));
        let (code, out) = run(
            &t,
            &["check", "--config", cfg.to_str().unwrap(), "--samples", "3"],
        );
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("verdict: UNSAFE") && out.contains("WDIOF_MAGICCLOSE"),
            "{out}"
        );
        // Nothing listening: UNSAFE, etcd unreachable.
        drop(etcd);
        let (code, out) = run(
            &t,
            &["check", "--config", cfg.to_str().unwrap(), "--samples", "1"],
        );
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("unreachable") || out.contains("timed out"),
            "{out}"
        );
    }
}

/// Boots systemd 252 as PID 1 in a QEMU guest with the shipped unit, its
/// ExecStart replaced by `exec_start`, and a oneshot `driver` shell script that
/// must end with `systemctl poweroff -ff`; softdog with `soft_noboot=1`, so
/// that expiry is a log line, not a reset. Returns the console log. The
/// builder is the lab's (`leasedog_testbed::lab::systemd`), shared with
/// `leasedog-lab systemd-kill` and tests/lab_systemd.rs.
#[cfg(feature = "testing")]
fn systemd_guest(exec_start: &str, driver: &str) -> String {
    leasedog_testbed::lab::systemd::run_to_poweroff(exec_start, driver)
        .unwrap_or_else(|e| panic!("systemd guest: {e}"))
}

/// "REPORT [   12.345678] ..." lines of the driver's `dmesg`: the first
/// timestamp of a line holding `needle`.
#[cfg(feature = "testing")]
fn kmsg_at(log: &str, needle: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("REPORT [") && l.contains(needle))
        .find_map(|l| {
            let s = l.split_once("REPORT [")?.1;
            s.split_once(']')?.0.trim().parse().ok()
        })
}

/// systemd 252's fd store, for real: the shipped unit (ExecStart replaced by
/// `leasedog test-watchdog`, which arms softdog through `watchdog::arm` and
/// stops pinging) runs under systemd as PID 1 in a QEMU guest. The agent is
/// SIGKILLed 4 s after arming with W = 8 s. Without the store its close
/// would ping the device ("watchdog did not stop!") and the softdog would
/// fire 8 s after the kill; with it, systemd's duplicate keeps the device
/// open through the automatic restart, nothing pings, and it fires 8 s after
/// arming, 4 s after the kill. The restarted agent names the descriptor
/// systemd handed back. `systemctl stop` then empties the store, and that
/// close is the one that pings ("watchdog did not stop!").
///
/// A TCG guest (about 25 s), run by the suite like tests/install.rs's.
/// Needs what that guest needs (qemu-system-x86, busybox-static, cpio, the lab kernel).
#[cfg(feature = "testing")]
#[test]
fn fd_store_keeps_a_killed_agents_device_unpinged_under_systemd_252() {
    let bin = env!("CARGO_BIN_EXE_leasedog");
    let log = systemd_guest(
        &format!("{bin} test-watchdog --device softdog --timeout 8 --yes"),
        // Waits for the device to be armed, marks the kill in the kernel
        // log, kills the agent, lets the softdog fire, reports, powers off.
        "i=0; until [ \"$(cat /sys/class/watchdog/watchdog0/state)\" = active ]; do \
           i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.1; done; \
         echo LEASEDOG-ARMED > /dev/kmsg; sleep 4; \
         echo LEASEDOG-KILL > /dev/kmsg; systemctl kill -s KILL leasedog.service; \
         sleep 12; \
         systemctl show leasedog.service -p NFileDescriptorStore -p NRestarts | sed \"s/^/REPORT /\"; \
         echo LEASEDOG-STOP > /dev/kmsg; systemctl stop leasedog.service; sleep 1; \
         systemctl show leasedog.service -p NFileDescriptorStore | sed \"s/^/REPORT stopped /\"; \
         dmesg | grep -E \"LEASEDOG|softdog|did not stop\" | sed \"s/^/REPORT /\"; \
         systemctl poweroff -ff",
    );
    let at = |needle: &str| kmsg_at(&log, needle);
    let armed = at("LEASEDOG-ARMED").unwrap_or_else(|| panic!("never armed:\n{log}"));
    let kill = at("LEASEDOG-KILL").unwrap_or_else(|| panic!("never killed:\n{log}"));
    let fired = at("softdog: Triggered").unwrap_or_else(|| panic!("softdog never fired:\n{log}"));
    println!("armed {armed:.3}, killed {kill:.3}, fired {fired:.3}");
    // The only close that pings is systemd's own, at `systemctl stop`.
    let stop = at("LEASEDOG-STOP").unwrap_or_else(|| panic!("never stopped:\n{log}"));
    let released = at("did not stop");
    assert!(
        released.is_some_and(|t| t > stop),
        "the agent's death closed (and pinged) the device, or the stop did not release it \
         (did not stop at {released:?}, stop at {stop:.3}):\n{log}"
    );
    assert!(
        log.contains("REPORT stopped NFileDescriptorStore=0"),
        "systemctl stop kept the store:\n{log}"
    );
    assert!(
        fired - kill < 8.0 - 2.0 && fired - armed < 8.0 + 1.5,
        "softdog fired {:.3} s after the kill and {:.3} s after arming: the kill pinged it\n{log}",
        fired - kill,
        fired - armed
    );
    assert!(
        log.contains("handed back 1 descriptor(s)") && log.contains("leasedog-watchdog0"),
        "the restarted agent did not get the device back:\n{log}"
    );
    assert!(
        log.contains("REPORT NFileDescriptorStore=1"),
        "systemd does not hold the device:\n{log}"
    );
}

/// The other half of the fd store: a clean disarm. The kernel stops a timer
/// only on the LAST close, so while systemd holds a duplicate the magic close
/// would not stop it and the node would reset W after a clean step-down.
/// `examples/fdstore_probe.rs` runs as the unit's main process under systemd
/// 252: it arms softdog (W = 8 s; systemd then holds a copy), disarms it two
/// seconds later through `Watchdog::disarm` and stays up 12 s more. The
/// device must be stopped (sysfs `inactive`), out of the store, and the
/// softdog must never fire.
#[cfg(feature = "testing")]
#[test]
fn a_clean_disarm_under_systemd_takes_the_device_out_of_the_fd_store_first() {
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "--features",
            "testing",
            "--example",
            "fdstore_probe",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(st.success(), "cannot build the probe");
    // target/debug/deps/watchdog-* -> target/debug/examples/fdstore_probe
    let probe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/fdstore_probe");
    assert!(probe.is_file(), "{}", probe.display());
    let log = systemd_guest(
        &probe.display().to_string(),
        "i=0; until [ \"$(cat /sys/class/watchdog/watchdog0/state)\" = active ]; do \
           i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.1; done; \
         sleep 1; \
         systemctl show leasedog.service -p NFileDescriptorStore | sed \"s/^/REPORT before /\"; \
         sleep 12; \
         dmesg | grep -E \"softdog|did not stop\" | sed \"s/^/REPORT /\"; \
         systemctl show leasedog.service -p NFileDescriptorStore | sed \"s/^/REPORT after /\"; \
         systemctl poweroff -ff",
    );
    assert!(log.contains("PROBE armed: ok W = 8"), "{log}");
    assert!(
        log.contains("REPORT before NFileDescriptorStore=1"),
        "systemd did not hold the armed device:\n{log}"
    );
    assert!(
        log.contains("PROBE disarm: ok state inactive"),
        "the disarm did not stop the device:\n{log}"
    );
    assert!(
        kmsg_at(&log, "softdog: Triggered").is_none(),
        "the softdog fired after a clean disarm:\n{log}"
    );
    assert!(kmsg_at(&log, "did not stop").is_none(), "{log}");
    assert!(
        log.contains("REPORT after NFileDescriptorStore=0"),
        "the device is still in systemd's store:\n{log}"
    );
}
