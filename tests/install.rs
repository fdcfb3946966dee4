//! The bare-metal installation files, checked with the real tools: systemd's
//! own parser (`systemd-analyze verify`, `security`), udev's rule engine
//! (`udevadm test` on a fake sysfs in a private mount namespace), and the
//! Debian package built by `cargo deb` and installed, removed and purged by
//! `dpkg` in a throwaway root.
//!
//! Needs (Debian 12): `systemd` (systemd-analyze, systemd-sysusers), `udev`
//! (udevadm), `dpkg`, `util-linux` (unshare), `cargo install cargo-deb --locked`,
//! and root (mount namespaces, mknod, chgrp). A missing tool fails the test
//! with the name of what to install: these are the project's install checks,
//! never silently skipped.
//!
//! `unit_sandbox_works_under_real_systemd` boots the unit under real systemd in
//! a QEMU guest (~80 s under TCG; qemu-system-x86, busybox-static, cpio, the
//! `postgres` user, and the lab's kernel, fetched into its cache on first use);
//! `postgres_runs_in_the_delegated_cgroup_under_systemd_252` boots it again
//! with the driver (this test binary) as ExecStart and PostgreSQL 15 (~40 s);
//! `the_installed_deb_clones_promotes_steps_down_and_stops_under_systemd_252`
//! installs the `.deb` in the guest with `dpkg -i` and runs the agent's whole
//! lifecycle beside a host node (`lab::deb`, ~90 s).

use leasedog::config::{Config, ConfigError, WatchdogMode};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const UNIT: &str = "systemd/leasedog.service";
const RULES: &str = "udev/60-leasedog-watchdog.rules";
const SYSUSERS: &str = "systemd/sysusers.d/leasedog.conf";
const CONFFILE: &str = "debian/leasedog.toml";
const GROUP: &str = "leasedog";
/// The `leasedog` group's gid in the QEMU guest.
const GUEST_GID: u32 = 990;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Finds `name` on PATH (and the sbin directories), or fails naming the
/// Debian package that provides it.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("`{name}` not found: install {package}"))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    text(&out)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("cannot create a temp dir")
}

/// `[Service]`-style `Key=value` assignments of a unit file, in order.
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    match setting(settings, key).as_slice() {
        [v] => v,
        other => panic!("{UNIT}: expected exactly one {key}=, found {other:?}"),
    }
}

/// A systemd time span as the unit writes them ("15s", "2min", "90").
fn span(v: &str) -> Duration {
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num
        .parse()
        .unwrap_or_else(|_| panic!("not a time span: {v:?}"));
    match unit {
        "" | "s" | "sec" => Duration::from_secs(n),
        "min" | "m" => Duration::from_secs(60 * n),
        _ => panic!("time span unit not understood by this test: {v:?}"),
    }
}

fn default_config() -> Config {
    Config::parse("node = \"pg1\"").expect("the defaults must validate")
}

// ---------------------------------------------------------------- the unit

/// A root where the unit's world exists: the built agent at usr/bin/leasedog
/// and the host's own systemd units (targets the unit is ordered against).
fn verify_root(unit_text: &str, with_binary: bool) -> tempfile::TempDir {
    let root = tempdir();
    let r = root.path();
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg("/lib/systemd/system")
            .arg(r.join("usr/lib/systemd/")),
    );
    fs::write(r.join("usr/lib/systemd/system/leasedog.service"), unit_text).unwrap();
    if with_binary {
        fs::copy(env!("CARGO_BIN_EXE_leasedog"), r.join("usr/bin/leasedog")).unwrap();
    }
    root
}

/// What `systemd-analyze verify` says about leasedog.service in `root`: the
/// lines that concern our unit (the host's units may have their own warnings).
fn verify_complaints(root: &Path) -> Vec<String> {
    let analyze = tool("systemd-analyze", "the Debian package `systemd`");
    let out = run(Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("leasedog.service"));
    let mut complaints: Vec<String> = text(&out)
        .lines()
        .filter(|l| l.contains("leasedog"))
        .map(str::to_string)
        .collect();
    if !out.status.success() && complaints.is_empty() {
        complaints.push(format!("exit {}: {}", out.status, text(&out)));
    }
    complaints
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = read(UNIT);
    let root = verify_root(&unit, true);
    let complaints = verify_complaints(root.path());
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify on {UNIT}:\n{}",
        complaints.join("\n")
    );

    // The check above can fail: the same verify finds a misspelt key, a bad
    // value and a missing binary (verify exits 0 on the first two, so the
    // check reads its output, not only its status).
    let typo = unit.replace("ProtectSystem=strict", "ProtectSytem=strict");
    let found = verify_complaints(verify_root(&typo, true).path());
    assert!(
        found.iter().any(|l| l.contains("ProtectSytem")),
        "a misspelt key went unnoticed: {found:?}"
    );
    let bad = unit.replace("WatchdogSec=30s", "WatchdogSec=thirty");
    let found = verify_complaints(verify_root(&bad, true).path());
    assert!(
        found
            .iter()
            .any(|l| l.contains("thirty") || l.contains("parse")),
        "an unparsable value went unnoticed: {found:?}"
    );
    let found = verify_complaints(verify_root(&unit, false).path());
    assert!(
        found.iter().any(|l| l.contains("/usr/bin/leasedog")),
        "a missing ExecStart binary went unnoticed: {found:?}"
    );
}

#[test]
fn unit_security_exposure_is_at_most_2_0() {
    let analyze = tool("systemd-analyze", "the Debian package `systemd`");
    let out = run_ok(
        Command::new(analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(repo(UNIT)),
    );
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for leasedog.service"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{out}"));
    // "…leasedog.service: 1.7 OK 🙂", or ":-)" without a UTF-8 locale: the
    // number right after the unit's name, not after the last colon.
    let score: f64 = line
        .split_once("leasedog.service:")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the score in {line:?}"));
    println!("systemd-analyze security exposure: {line}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{out}");

    // The settings that carry the design, by systemd's own reading of them.
    // A passed check is marked "✓", or "+" without a UTF-8 locale.
    let passed = |name: &str| {
        out.lines().any(|l| {
            l.strip_prefix('✓')
                .or_else(|| l.strip_prefix('+'))
                .is_some_and(|rest| rest.trim_start().starts_with(name))
        })
    };
    for name in [
        "User=/DynamicUser=",
        "NoNewPrivileges=",
        "AmbientCapabilities=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_KILL",
        "CapabilityBoundingSet=~CAP_SET(UID|GID|PCAP)",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "MemoryDenyWriteExecute=",
        "SystemCallArchitectures=",
        "RestrictAddressFamilies=~AF_NETLINK",
        "ProtectKernelModules=",
        "UMask=",
    ] {
        assert!(passed(name), "systemd-analyze does not pass {name}:\n{out}");
    }
}

/// The settings fencing depends on, and the same group named everywhere.
#[test]
fn unit_settings_fit_the_fencing_design() {
    let unit = read(UNIT);
    let s = unit_settings(&unit);
    let cfg = default_config();
    let budget = cfg.budget().unwrap();

    assert_eq!(one(&s, "Type"), "notify");
    assert_eq!(one(&s, "Restart"), "on-failure");
    assert_eq!(
        one(&s, "ExecStart"),
        "/usr/bin/leasedog run --config /etc/leasedog/leasedog.toml"
    );
    // A restarted agent must not meet its own old lease: wait out T.
    let restart = span(one(&s, "RestartSec"));
    assert!(
        restart >= budget.ttl,
        "RestartSec {restart:?} < default T {:?}",
        budget.ttl
    );
    // systemd's watchdog must not kill a healthy agent: one notification per
    // loop, which may take a loop interval plus a request deadline plus a
    // reconnect; demand twice that.
    let loop_worst = budget.loop_interval + budget.request_timeout + cfg.connect_timeout();
    let wd = span(one(&s, "WatchdogSec"));
    assert!(
        wd >= loop_worst * 2,
        "WatchdogSec {wd:?} < 2 x {loop_worst:?}"
    );
    assert!(span(one(&s, "TimeoutStopSec")) >= Duration::from_secs(30));
    assert_eq!(one(&s, "KillMode"), "mixed");

    // Pinger under pressure (rule 6) without capabilities.
    assert_eq!(one(&s, "LimitMEMLOCK"), "infinity");
    let rtprio: u32 = one(&s, "LimitRTPRIO").parse().unwrap();
    assert!(rtprio >= 1, "LimitRTPRIO={rtprio} forbids SCHED_FIFO");
    assert_eq!(one(&s, "RestrictRealtime"), "no");
    assert_eq!(one(&s, "CapabilityBoundingSet"), "");
    assert_eq!(one(&s, "NoNewPrivileges"), "yes");
    // PostgreSQL's shared memory belongs to the same user.
    assert_eq!(one(&s, "User"), "postgres");
    assert_eq!(one(&s, "RemoveIPC"), "no");
    // PostgreSQL runs in the unit, in a cgroup delegated to the agent, and
    // writes only its data and socket directories.
    assert_eq!(one(&s, "Delegate"), "yes");
    assert_eq!(one(&s, "ProtectControlGroups"), "yes");
    let mut rw = setting(&s, "ReadWritePaths");
    rw.sort();
    assert_eq!(
        rw,
        [
            "-/run/postgresql",
            "-/sys/fs/cgroup/system.slice/leasedog.service",
            "-/sys/fs/cgroup/unified/system.slice/leasedog.service",
            "/var/lib/postgresql"
        ]
    );
    assert_eq!(one(&s, "ProtectSystem"), "strict");

    // Devices: only the watchdogs, by the kernel's name for their major.
    assert_eq!(one(&s, "DevicePolicy"), "closed");
    let mut allow = setting(&s, "DeviceAllow");
    allow.sort();
    assert_eq!(allow, ["/dev/watchdog rw", "char-watchdog rw"]);
    let devices = fs::read_to_string("/proc/devices").unwrap();
    let majors: Vec<&str> = devices
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| n.contains("watchdog"))
        .collect();
    assert!(
        majors.iter().all(|n| *n == "watchdog"),
        "/proc/devices calls the watchdog major {majors:?}, the unit says char-watchdog"
    );

    // One group: the unit's, udev's, sysusers' and the postinst's.
    assert_eq!(one(&s, "Group"), GROUP);
    assert!(read(RULES).contains(&format!("GROUP=\"{GROUP}\"")));
    assert!(read(SYSUSERS)
        .lines()
        .any(|l| l.starts_with(&format!("u {GROUP} "))));
    assert!(read("debian/postinst").contains(&format!("$1 == \"{GROUP}\"")));
    assert_eq!(one(&s, "StateDirectory"), "leasedog");
    assert_eq!(
        cfg.audit.dir,
        Path::new("/var/lib").join(one(&s, "StateDirectory"))
    );
}

// ---------------------------------------------------------------- udev

/// One device in the fake sysfs: its syspath under /sys/devices/virtual,
/// subsystem, node name and numbers.
struct FakeDev {
    subsystem: &'static str,
    name: &'static str,
    major: u32,
    minor: u32,
}

const WATCHDOG0: FakeDev = FakeDev {
    subsystem: "watchdog",
    name: "watchdog0",
    major: 249,
    minor: 0,
};
const WATCHDOG1: FakeDev = FakeDev {
    subsystem: "watchdog",
    name: "watchdog1",
    major: 249,
    minor: 1,
};
const LEGACY: FakeDev = FakeDev {
    subsystem: "misc",
    name: "watchdog",
    major: 10,
    minor: 130,
};
const FUSE: FakeDev = FakeDev {
    subsystem: "misc",
    name: "fuse",
    major: 10,
    minor: 229,
};

/// Runs udev's real rule engine (`udevadm test`) with only `rules_text`
/// installed, on fake devices, inside a private mount namespace whose /sys,
/// /dev, /run, /etc/group and rules directories are temporary. Returns, per
/// device, the node's (mode, gid) afterwards, the gid of the group, and
/// udevadm's log.
fn udev_run(rules_text: &str, devs: &[&FakeDev]) -> (BTreeMap<String, (u32, u32)>, u32, String) {
    let udevadm = tool("udevadm", "the Debian package `udev`");
    let unshare = tool("unshare", "the Debian package `util-linux`");
    let t = tempdir();
    let d = t.path();
    for sub in ["sys/class", "rules", "empty", "out"] {
        fs::create_dir_all(d.join(sub)).unwrap();
    }
    fs::write(d.join("rules/60-leasedog-watchdog.rules"), rules_text).unwrap();

    // The host may already know the group (package installed); else add it.
    let host_group = fs::read_to_string("/etc/group").unwrap();
    let existing = host_group
        .lines()
        .find(|l| l.starts_with(&format!("{GROUP}:")))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|g| g.parse().ok());
    let gid: u32 = existing.unwrap_or(4242);
    let mut group = host_group.clone();
    if existing.is_none() {
        assert!(
            !host_group
                .lines()
                .any(|l| l.split(':').nth(2) == Some("4242")),
            "gid 4242 is taken on this host"
        );
        if !group.ends_with('\n') {
            group.push('\n');
        }
        group.push_str(&format!("{GROUP}:x:{gid}:\n"));
    }
    fs::write(d.join("group"), group).unwrap();

    let mut script = String::from("set -e\n");
    for dev in devs {
        let sys = d.join(format!(
            "sys/devices/virtual/{}/{}",
            dev.subsystem, dev.name
        ));
        fs::create_dir_all(&sys).unwrap();
        fs::write(
            sys.join("uevent"),
            format!(
                "MAJOR={}\nMINOR={}\nDEVNAME={}\n",
                dev.major, dev.minor, dev.name
            ),
        )
        .unwrap();
        fs::write(sys.join("dev"), format!("{}:{}\n", dev.major, dev.minor)).unwrap();
        let class = d.join("sys/class").join(dev.subsystem);
        fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../../class/{}", dev.subsystem),
            sys.join("subsystem"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            format!("../../devices/virtual/{}/{}", dev.subsystem, dev.name),
            class.join(dev.name),
        )
        .unwrap();
    }
    let dir = d.display();
    script.push_str(&format!(
        "mount --bind {dir}/sys /sys\n\
         mount --bind {dir}/rules /etc/udev/rules.d\n\
         mount --bind {dir}/empty /lib/udev/rules.d\n\
         if [ -d /usr/lib/udev/rules.d ]; then mount --bind {dir}/empty /usr/lib/udev/rules.d; fi\n\
         mount --bind {dir}/group /etc/group\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t tmpfs tmpfs /dev\n"
    ));
    for dev in devs {
        // Nodes as the kernel's devtmpfs makes them: root, 0600.
        script.push_str(&format!(
            "mknod -m 0600 /dev/{n} c {ma} {mi}\n\
             SYSTEMD_DEVICE_VERIFY_SYSFS=0 {udevadm} test --action=add \
               /sys/devices/virtual/{sub}/{n} >>{dir}/out/log 2>&1\n\
             stat -c '{n} %a %g' /dev/{n} >>{dir}/out/stat\n",
            n = dev.name,
            ma = dev.major,
            mi = dev.minor,
            sub = dev.subsystem,
            udevadm = udevadm.display(),
        ));
    }
    run_ok(
        Command::new(unshare)
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script),
    );
    let log = fs::read_to_string(d.join("out/log")).unwrap_or_default();
    let stats = fs::read_to_string(d.join("out/stat")).unwrap();
    let nodes = stats
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                (u32::from_str_radix(f[1], 8).unwrap(), f[2].parse().unwrap()),
            )
        })
        .collect();
    (nodes, gid, log)
}

/// Lines where udev complains about our rules file.
fn rule_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("60-leasedog-watchdog.rules"))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("ignoring")
                || l.contains("invalid")
                || l.contains("error")
                || l.contains("unknown")
        })
        .collect()
}

#[test]
fn udev_rules_give_watchdogs_to_the_group_and_nothing_else() {
    let (nodes, gid, log) = udev_run(&read(RULES), &[&WATCHDOG0, &WATCHDOG1, &LEGACY, &FUSE]);
    let complaints = rule_complaints(&log);
    assert!(
        complaints.is_empty(),
        "udev complains about {RULES}:\n{}",
        complaints.join("\n")
    );
    for dev in [&WATCHDOG0, &WATCHDOG1, &LEGACY] {
        assert_eq!(
            nodes.get(dev.name),
            Some(&(0o660, gid)),
            "/dev/{} ({}) should be 0660 group {GROUP} ({gid}); udevadm said:\n{log}",
            dev.name,
            dev.subsystem
        );
    }
    assert_eq!(
        nodes.get("fuse"),
        Some(&(0o600, 0)),
        "a non-watchdog misc device must be left alone"
    );

    // The check can fail: a misspelt key is reported by udev's parser.
    let broken = read(RULES).replacen("GROUP=\"leasedog\"", "GRUOP=\"leasedog\"", 1);
    let (_, _, log) = udev_run(&broken, &[&WATCHDOG0]);
    assert!(
        !rule_complaints(&log).is_empty(),
        "udev's parser did not report a misspelt key:\n{log}"
    );
}

// ---------------------------------------------------------------- the package

/// Builds the .deb once per test run with `cargo deb --no-build`, packaging
/// the binary this test run already built: cargo-deb looks for
/// target/release/leasedog, so a scratch target dir (under cargo's
/// CARGO_TARGET_TMPDIR, reused by every run, nothing left in /tmp) holds a
/// link to it there. No second compile; the release package is plain
/// `cargo deb`.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let probe = run(Command::new(&cargo).args(["deb", "--version"]));
        assert!(
            probe.status.success(),
            "cargo-deb is missing: run `cargo install cargo-deb --locked`\n{}",
            text(&probe)
        );
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("install-deb");
        let _ = fs::remove_dir_all(&scratch);
        let target = scratch.join("target");
        fs::create_dir_all(target.join("release")).unwrap();
        let bin = target.join("release/leasedog");
        fs::hard_link(env!("CARGO_BIN_EXE_leasedog"), &bin)
            .or_else(|_| fs::copy(env!("CARGO_BIN_EXE_leasedog"), &bin).map(drop))
            .unwrap();
        let out_dir = scratch.join("out");
        let started = Instant::now();
        run_ok(
            Command::new(&cargo)
                .args(["deb", "--no-build", "--offline", "--manifest-path"])
                .arg(repo("Cargo.toml"))
                .arg("--output")
                .arg(&out_dir)
                .env("CARGO_TARGET_DIR", &target),
        );
        println!("cargo deb --no-build took {:?}", started.elapsed());
        let _ = fs::remove_dir_all(&target);
        let deb = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .expect("cargo deb wrote no .deb");
        deb
    })
}

fn dpkg_deb() -> PathBuf {
    tool("dpkg-deb", "the Debian package `dpkg`")
}

#[test]
fn package_holds_the_files_at_their_paths_and_modes() {
    let deb = deb();
    let listing = run_ok(Command::new(dpkg_deb()).arg("-c").arg(deb));
    // "-rw-r----- 0/0  2389 2026-11-26 00:00 ./etc/leasedog/leasedog.toml"
    let files: BTreeMap<String, (String, String)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5)?.trim_start_matches('.');
            (!f[0].starts_with('d'))
                .then(|| (path.to_string(), (f[0].to_string(), f[1].to_string())))
        })
        .collect();
    let want = [
        ("/usr/bin/leasedog", "-rwxr-xr-x"),
        ("/etc/leasedog/leasedog.toml", "-rw-r-----"),
        ("/usr/lib/systemd/system/leasedog.service", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/leasedog.conf", "-rw-r--r--"),
        (
            "/usr/lib/modules-load.d/leasedog-softdog.conf",
            "-rw-r--r--",
        ),
        ("/lib/modprobe.d/leasedog-softdog.conf", "-rw-r--r--"),
        ("/lib/udev/rules.d/60-leasedog-watchdog.rules", "-rw-r--r--"),
        (
            "/usr/lib/systemd/system/postgresql@.service.d/50-leasedog.conf",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/leasedog/install.md", "-rw-r--r--"),
        (
            "/usr/share/doc/leasedog/leasedog.example.toml",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/leasedog/copyright", "-rw-r--r--"),
    ];
    for (path, mode) in want {
        let got = files
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"));
        assert_eq!(got, &(mode.to_string(), "0/0".to_string()), "{path}");
    }

    // The files are the repository's, unchanged.
    let x = tempdir();
    run_ok(Command::new(dpkg_deb()).arg("-x").arg(deb).arg(x.path()));
    for (src, dest) in [
        (UNIT, "usr/lib/systemd/system/leasedog.service"),
        (RULES, "lib/udev/rules.d/60-leasedog-watchdog.rules"),
        (SYSUSERS, "usr/lib/sysusers.d/leasedog.conf"),
        (CONFFILE, "etc/leasedog/leasedog.toml"),
        (
            "systemd/modprobe.d/leasedog-softdog.conf",
            "lib/modprobe.d/leasedog-softdog.conf",
        ),
        (
            "systemd/modules-load.d/leasedog-softdog.conf",
            "usr/lib/modules-load.d/leasedog-softdog.conf",
        ),
        ("docs/install.md", "usr/share/doc/leasedog/install.md"),
    ] {
        assert_eq!(
            fs::read(repo(src)).unwrap(),
            fs::read(x.path().join(dest)).unwrap(),
            "{dest} differs from {src}"
        );
    }

    // The example config is the one conffile; dependencies as documented.
    let conffiles = run_ok(Command::new(dpkg_deb()).arg("-I").arg(deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/leasedog/leasedog.toml");
    let depends = run_ok(Command::new(dpkg_deb()).arg("-f").arg(deb).arg("Depends"));
    assert!(depends.contains("systemd-sysusers"), "Depends: {depends}");
    assert!(depends.contains("libc6"), "Depends: {depends}");

    // Installing never starts the agent: no maintainer script invokes it.
    let ctl = tempdir();
    run_ok(Command::new(dpkg_deb()).arg("-e").arg(deb).arg(ctl.path()));
    for script in ["postinst", "prerm", "postrm"] {
        let body = fs::read_to_string(ctl.path().join(script))
            .unwrap_or_else(|e| panic!("control member {script}: {e}"));
        let mode = fs::metadata(ctl.path().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "{script} is not executable");
        if script == "postinst" {
            assert!(
                !body.contains("deb-systemd-invoke") && !body.contains("systemctl start"),
                "postinst starts or restarts the unit:\n{body}"
            );
        }
    }
}

/// An empty dpkg database in a throwaway root.
fn dpkg_root() -> tempfile::TempDir {
    let root = tempdir();
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        fs::create_dir_all(root.path().join(d)).unwrap();
    }
    fs::write(root.path().join("var/lib/dpkg/status"), "").unwrap();
    root
}

/// `dpkg --root` without chroot: maintainer scripts run on the host with
/// DPKG_ROOT set, so the root needs no shell or libc of its own.
/// `--force-depends`: the root has no libc6 or systemd packages.
fn dpkg(root: &Path, args: &[&str]) -> String {
    let dpkg = tool("dpkg", "the Debian package `dpkg`");
    run_ok(
        Command::new(dpkg)
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
            ])
            .args(args),
    )
}

fn group_of(root: &Path) -> Option<(u32, String)> {
    let groups = fs::read_to_string(root.join("etc/group")).ok()?;
    let line = groups
        .lines()
        .find(|l| l.starts_with(&format!("{GROUP}:")))?;
    Some((line.split(':').nth(2)?.parse().ok()?, line.to_string()))
}

#[test]
fn package_installs_arms_nothing_and_purge_keeps_the_audit_log() {
    tool("systemd-sysusers", "the Debian package `systemd`");
    let deb = deb().to_str().unwrap().to_string();
    let root = dpkg_root();
    let r = root.path();

    dpkg(r, &["-i", &deb]);
    let (gid, line) = group_of(r).expect("postinst did not create the leasedog group");
    let passwd = fs::read_to_string(r.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("leasedog:"))
        .expect("postinst did not create the leasedog user");
    assert!(user.ends_with(":/usr/sbin/nologin"), "{user}");
    assert!(gid > 0 && gid < 1000, "not a system group: {line}");

    let conf = fs::metadata(r.join("etc/leasedog/leasedog.toml")).unwrap();
    assert_eq!(conf.mode() & 0o7777, 0o640);
    assert_eq!(
        (conf.uid(), conf.gid()),
        (0, gid),
        "config must be root:leasedog"
    );
    assert!(r.join("usr/bin/leasedog").is_file());
    // Not enabled: no unit symlink anywhere under etc/systemd.
    let enabled: Vec<_> = walk(&r.join("etc/systemd"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("leasedog"))
        .collect();
    assert!(enabled.is_empty(), "install enabled the unit: {enabled:?}");

    // The agent would write its audit log here (StateDirectory=leasedog).
    let audit_dir = r.join("var/lib/leasedog");
    fs::create_dir_all(&audit_dir).unwrap();
    let audit = audit_dir.join("pg1.audit.jsonl");
    let evidence = "{\"event\":\"armed\",\"device\":\"/dev/watchdog0\",\"w\":5}\n";
    fs::write(&audit, evidence).unwrap();

    // Reinstalling (an upgrade to the same version) re-applies the group.
    fs::set_permissions(
        r.join("etc/leasedog/leasedog.toml"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    dpkg(r, &["-i", &deb]);
    let conf = fs::metadata(r.join("etc/leasedog/leasedog.toml")).unwrap();
    assert_eq!((conf.mode() & 0o7777, conf.gid()), (0o640, gid));

    dpkg(r, &["--remove", "leasedog"]);
    assert!(
        !r.join("usr/bin/leasedog").exists(),
        "remove left the binary"
    );
    assert!(
        r.join("etc/leasedog/leasedog.toml").exists(),
        "remove must keep the conffile"
    );
    assert_eq!(
        fs::read_to_string(&audit).unwrap(),
        evidence,
        "remove touched the audit log"
    );

    dpkg(r, &["--purge", "leasedog"]);
    assert!(
        !r.join("etc/leasedog/leasedog.toml").exists(),
        "purge kept the conffile"
    );
    assert_eq!(
        fs::read_to_string(&audit).unwrap(),
        evidence,
        "purge touched the audit log"
    );
    assert!(
        !r.join("usr/lib/systemd/system/leasedog.service").exists(),
        "purge left the unit"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------- the conffile

fn uncomment(text: &str, prefixes: &[&str]) -> String {
    text.lines()
        .map(
            |l| match prefixes.iter().find(|p| l.starts_with(&format!("#{p}"))) {
                Some(_) => &l[1..],
                None => l,
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_conffile_refuses_to_run_until_node_and_devices_are_chosen() {
    let shipped = read(CONFFILE);
    // As shipped: no node, so nothing runs at all.
    match Config::parse(&shipped) {
        Err(ConfigError::Parse { message, .. }) => {
            assert!(message.contains("node"), "{message}")
        }
        other => panic!("the shipped conffile must not be runnable: {other:?}"),
    }
    // With a node but no device, mode "required" still refuses.
    let with_node = uncomment(&shipped, &["node ="]);
    match Config::parse(&with_node) {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "watchdog.device"),
        other => panic!("required mode without devices must be refused: {other:?}"),
    }
    // Uncommenting the documented lines gives a valid, fenced configuration
    // with the same budget and endpoints as docs/leasedog.example.toml.
    let edited = uncomment(&with_node, &["[[watchdog.device]]", "kind =", "path ="]);
    let cfg = Config::parse(&edited).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.watchdog.mode, WatchdogMode::Required);
    assert_eq!(cfg.watchdog.devices.len(), 2);
    let example = Config::parse(&read("docs/leasedog.example.toml")).unwrap();
    assert_eq!(cfg.budget().unwrap(), example.budget().unwrap());
    assert_eq!(cfg.etcd.endpoints, example.etcd.endpoints);
    assert_eq!(cfg.watchdog.devices, example.watchdog.devices);
    assert_eq!(cfg.audit.dir, example.audit.dir);
}

// ---------------------------------------------------------------- softdog

#[test]
fn softdog_is_loaded_at_boot_with_options_that_arm_nothing_and_can_disarm() {
    let active = |rel: &str| -> Vec<String> {
        read(rel)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        active("systemd/modules-load.d/leasedog-softdog.conf"),
        ["softdog"]
    );
    let lines = active("systemd/modprobe.d/leasedog-softdog.conf");
    let [line] = lines.as_slice() else {
        panic!("expected one options line, got {lines:?}")
    };
    let mut words = line.split_whitespace();
    assert_eq!(
        (words.next(), words.next()),
        (Some("options"), Some("softdog"))
    );
    let opts: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
    // A clean switchover can disarm; expiry really resets; loading arms nothing.
    assert_eq!(opts.get("nowayout"), Some(&"0"));
    assert_eq!(opts.get("soft_noboot"), Some(&"0"));
    assert_eq!(opts.get("soft_panic"), Some(&"0"));
    assert_eq!(opts.get("soft_active_on_boot"), Some(&"0"));
    // Before the agent sets W, the margin is no longer than the default W.
    let margin: u64 = opts["soft_margin"].parse().unwrap();
    let b = default_config().budget().unwrap();
    assert!(
        Duration::from_secs(margin) <= b.ttl - b.margin,
        "soft_margin {margin} s > default W"
    );
}

// ---------------------------------------------------------------- real systemd

/// The lab's kernel cache (`$LEASEDOG_LAB_CACHE`, else `<workspace>/.lab-cache`,
/// filled by the lab's `Kernel::get`): a `kernel-*/` folder with `vmlinuz` and
/// `modules/*.ko` of Debian's 6.1 kernel.
fn lab_kernel() -> PathBuf {
    // The lab's kernel cache (fetched and unpacked on first use).
    let k = leasedog_testbed::lab::Kernel::get().unwrap_or_else(|e| panic!("lab kernel: {e}"));
    assert!(k.dir.join("vmlinuz").is_file() && k.module_path("softdog").is_file());
    k.dir.clone()
}

/// Kills QEMU if the test fails half-way.
struct Qemu(std::process::Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The unit file as shipped, with only ExecStart replaced by a probe, run by
/// real systemd 252 as PID 1 in a QEMU guest (the host's root over 9p under a
/// tmpfs overlay, softdog loaded with the package's options, the udev rule
/// applied by the real udevd). Shows what `verify` and `security` cannot: that
/// the sandbox still lets the agent do its job (mlockall and SCHED_FIFO without
/// capabilities, both watchdog nodes opened through the group, SIGKILL of a
/// PostgreSQL-owned process, sd_notify) and nothing beyond it.
/// Boots the host's root (9p, read-only, under a tmpfs overlay) with real
/// systemd 252 as PID 1 in a QEMU guest: the shipped unit, udev rule and
/// conffile, plus `units` (name under /etc/systemd/system, text) and
/// `init_extra` (shell run by the initramfs before switch_root, the new
/// root at /newroot); the guest starts `leasedogtest.target` and must power
/// itself off. Returns the console log.
fn boot_guest(units: &[(&str, String)], init_extra: &str) -> String {
    let kernel = lab_kernel();
    let qemu = tool("qemu-system-x86_64", "the Debian package `qemu-system-x86`");
    let busybox = tool("busybox", "the Debian package `busybox-static`");
    let cpio = tool("cpio", "the Debian package `cpio`");
    let t = tempdir();
    let d = t.path();
    let ir = d.join("ir");
    let inject = ir.join("inject");
    for sub in [
        "bin",
        "mods",
        "proc",
        "sys",
        "dev",
        "inject/etc/systemd/system/leasedog.service.d",
        "inject/etc/udev/rules.d",
        "inject/etc/leasedog",
        "inject/usr/local/bin",
    ] {
        fs::create_dir_all(ir.join(sub)).unwrap();
    }
    fs::copy(&busybox, ir.join("bin/busybox")).unwrap();
    const MODULES: [&str; 13] = [
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "9pnet",
        "9pnet_virtio",
        "netfs",
        "fscache",
        "9p",
        "overlay",
        "watchdog",
        "softdog",
    ];
    for m in MODULES {
        fs::copy(
            kernel.join(format!("modules/{m}.ko")),
            ir.join(format!("mods/{m}.ko")),
        )
        .unwrap_or_else(|e| panic!("module {m}: {e}"));
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    run_ok(
        Command::new(rustc)
            .args(["-O", "--edition", "2021", "-o"])
            .arg(inject.join("usr/local/bin/leasedog-probe"))
            .arg(repo("tests/install/probe.rs")),
    );
    fs::copy(
        repo(UNIT),
        inject.join("etc/systemd/system/leasedog.service"),
    )
    .unwrap();
    fs::copy(
        repo(RULES),
        inject.join("etc/udev/rules.d/60-leasedog-watchdog.rules"),
    )
    .unwrap();
    fs::copy(repo(CONFFILE), inject.join("etc/leasedog/leasedog.toml")).unwrap();
    for (name, text) in units {
        let path = inject.join("etc/systemd/system").join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    let gid = GUEST_GID;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         for m in {mods}; do insmod /mods/$m.ko || echo \"insmod $m failed\"; done\n\
         insmod /mods/softdog.ko {softdog}\n\
         mkdir -p /host /rw /newroot\n\
         i=0; until mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host; do \
           i=$((i+1)); [ $i -gt 50 ] && break; sleep 0.1; done\n\
         mount -t tmpfs tmpfs /rw; mkdir -p /rw/upper /rw/work\n\
         mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot\n\
         cp -a /inject/. /newroot/\n\
         echo leasedog:x:{gid}: >> /newroot/etc/group\n\
         chown 0:{gid} /newroot/etc/leasedog/leasedog.toml; chmod 0640 /newroot/etc/leasedog/leasedog.toml\n\
         umount /proc /sys\n\
         {init_extra}\n\
         mount --move /dev /newroot/dev\n\
         exec switch_root /newroot /lib/systemd/systemd systemd.unit=leasedogtest.target\n",
        mods = MODULES[..MODULES.len() - 1].join(" "),
        init_extra = init_extra,
        // The package's softdog options, as modprobe would pass them.
        softdog = read("systemd/modprobe.d/leasedog-softdog.conf")
            .lines()
            .find_map(|l| l.strip_prefix("options softdog "))
            .expect("no softdog options line"),
    );
    fs::write(ir.join("init"), init).unwrap();
    fs::set_permissions(ir.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = d.join("initrd.cpio");
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | {} -o -H newc > {} 2>/dev/null",
        ir.display(),
        cpio.display(),
        initrd.display()
    )));

    let console = d.join("console.log");
    let started = Instant::now();
    let child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
            "-kernel",
        ])
        .arg(kernel.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 systemd.unit=leasedogtest.target",
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&console).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot start qemu");
    let mut qemu = Qemu(child);
    let deadline = Duration::from_secs(480);
    loop {
        if qemu.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the guest did not power off within {deadline:?}:\n{}",
            fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("guest ran {:?}", started.elapsed());
    let log = String::from_utf8_lossy(&fs::read(&console).unwrap()).into_owned();
    log
}

#[test]
fn unit_sandbox_works_under_real_systemd() {
    let units: Vec<(&str, String)> = [
        (
            "leasedog.service.d/probe.conf",
            "[Unit]\nWants=sleeper.service\nAfter=sleeper.service\n\
             [Service]\nExecStart=\nExecStart=/usr/local/bin/leasedog-probe\n\
             Restart=no\nStandardOutput=journal+console\n",
        ),
        (
            "sleeper.service",
            // systemd turns $$ into $, so $$$$ reaches sh as its own pid.
            "[Service]\nUser=postgres\nRuntimeDirectory=leasedog-sleeper\n\
             ExecStart=/bin/sh -c 'echo $$$$ > /run/leasedog-sleeper/pid; exec sleep 1000'\n",
        ),
        (
            "reporter.service",
            "[Unit]\nAfter=leasedog.service\n[Service]\nType=oneshot\n\
             StandardOutput=journal+console\n\
             ExecStart=/bin/sh -c 'sleep 2; \
               systemctl show leasedog.service -p Result -p StatusText | sed \"s/^/REPORT /\"; \
               systemctl show sleeper.service -p ActiveState -p ExecMainStatus | sed \"s/^/REPORT sleeper/\"; \
               ls -ln /dev/watchdog /dev/watchdog0 | sed \"s/^/REPORT node /\"; \
               systemctl poweroff -ff'\n",
        ),
        (
            "leasedogtest.target",
            "[Unit]\nRequires=leasedog.service reporter.service\n\
             After=leasedog.service reporter.service\n",
        ),
    ]
    .into_iter()
    .map(|(n, t)| (n, t.to_string()))
    .collect();
    let log = boot_guest(&units, "");
    let gid = GUEST_GID;
    let probes: BTreeMap<String, String> = log
        .lines()
        .filter_map(|l| l.split_once("PROBE ")?.1.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for name in [
        "mlockall",
        "SCHED_FIFO 10",
        "open+GETTIMEOUT /dev/watchdog0",
        "ping+magic close /dev/watchdog0",
        "open+GETTIMEOUT /dev/watchdog",
        "ping+magic close /dev/watchdog",
        "kmsg denied",
        "boot_id",
        "sysfs identity",
        "/etc read-only",
        "state dir writable",
        "pid 1 hidden",
        "spawn /bin/true",
        "setuid(0) refused",
        "SIGKILL postgres-owned process",
        "signal to pid 1 refused",
        "config readable",
        "sd_notify",
    ] {
        let got = probes
            .get(name)
            .unwrap_or_else(|| panic!("probe {name:?} did not report:\n{log}"));
        assert!(got.starts_with("ok"), "probe {name}: {got}\n{log}");
    }
    let postgres_uid = fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .and_then(|l| l.split(':').nth(2).map(str::to_string))
        .expect("no postgres user on the host (postgresql-15 installs it)");
    assert_eq!(probes["uid/gid"], format!("ok {postgres_uid} {gid}"));
    for cap in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        let v = probes
            .get(&format!("status {cap}"))
            .unwrap_or_else(|| panic!("no {cap}:\n{log}"));
        assert_eq!(v, "0000000000000000", "{cap}");
    }
    let report = |needle: &str| log.lines().any(|l| l.contains(&format!("REPORT {needle}")));
    assert!(report("Result=success"), "{log}");
    assert!(report("StatusText=probe done"), "{log}");
    assert!(
        report("sleeperExecMainStatus=9"),
        "the postgres-owned process was not killed by SIGKILL:\n{log}"
    );
    let nodes: Vec<&str> = log.lines().filter(|l| l.contains("REPORT node ")).collect();
    assert_eq!(nodes.len(), 2, "{log}");
    for n in nodes {
        assert!(
            n.contains("crw-rw----") && n.contains(&format!(" 0 {gid} ")),
            "udevd did not give the node to the group: {n}"
        );
    }
}

// ------------------------------------------- PostgreSQL under the unit, for real

/// The data directory the guest's PostgreSQL runs in (copied there by the
/// initramfs from a testbed cluster of the host).
const GUEST_DATA: &str = "/var/lib/postgresql/leasedog-guest";

/// The driver itself (this test binary, through the host's root) as the
/// unit's ExecStart under systemd 252: the shipped unit with only ExecStart
/// (and Restart) replaced. PostgreSQL is started by the driver in the cgroup
/// systemd delegated (`leasedog.service/postgres`, the agent in
/// `leasedog.service/agent`), read-only, its socket in /run/postgresql, its
/// backends back at oom_score_adj 0; the sandbox lets it write its data
/// directory and nothing in /etc or /usr; the real Debian cluster of the host
/// (start.conf auto) is reported as a conflict; the cgroup fence empties the
/// group; a fast stop works.
#[test]
fn postgres_runs_in_the_delegated_cgroup_under_systemd_252() {
    use leasedog_testbed::pg::{free_port, PgNode};
    let node = PgNode::init(free_port());
    // Its control file then records this configuration (max_connections).
    node.start();
    node.stop();
    let exe = std::env::current_exe().unwrap();
    let units: Vec<(&str, String)> = vec![
        (
            "leasedog.service.d/probe.conf",
            format!(
                "[Service]\nExecStart=\n\
                 ExecStart={} guest_postgres_probe --exact --nocapture --test-threads=1\n\
                 Environment=LEASEDOG_GUEST_PG={GUEST_DATA}\n\
                 Restart=no\nStandardOutput=journal+console\n",
                exe.display()
            ),
        ),
        (
            "reporter.service",
            "[Unit]\nAfter=leasedog.service\n[Service]\nType=oneshot\n\
             StandardOutput=journal+console\n\
             ExecStart=/bin/sh -c 'sleep 2; \
               systemctl show leasedog.service -p Result -p StatusText | sed \"s/^/REPORT /\"; \
               systemctl start postgresql@15-main.service; \
               systemctl show postgresql@15-main.service -p ConditionResult -p ActiveState \
                 | sed \"s/^/REPORT distro /\"; \
               systemctl poweroff -ff'\n"
                .to_string(),
        ),
        (
            "postgresql@.service.d/50-leasedog.conf",
            read("systemd/postgresql@.service.d/50-leasedog.conf"),
        ),
        (
            "leasedogtest.target",
            "[Unit]\nRequires=leasedog.service reporter.service\n\
             After=leasedog.service reporter.service\n"
                .to_string(),
        ),
    ];
    let copy = format!(
        "cp -a /newroot{} /newroot{GUEST_DATA} || echo 'copying the data directory failed'",
        node.data_dir().display()
    );
    let log = boot_guest(&units, &copy);
    let probes: BTreeMap<String, String> = log
        .lines()
        .filter_map(|l| l.split_once("PROBE ")?.1.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for name in [
        "driver",
        "agent in its leaf",
        "postgres cgroup",
        "distro unit of 15/main refused",
        "no distro unit for the agent's cluster",
        "start as standby",
        "postmaster in the delegated cgroup",
        "every cluster process in the cgroup",
        "socket in /run/postgresql",
        "read-only",
        "postmaster oom_score_adj",
        "backend oom_score_adj",
        "data directory writable",
        "/etc read-only",
        "/usr read-only",
        "cgroup fence",
        "cgroup freeze and kill",
        "fast stop",
        "15/main marked as the agent's",
    ] {
        println!(
            "PROBE {name}: {}",
            probes.get(name).map_or("-", |v| &v[..v.len().min(200)])
        );
        let got = probes
            .get(name)
            .unwrap_or_else(|| panic!("probe {name:?} did not report:\n{log}"));
        assert!(got.starts_with("ok"), "probe {name}: {got}\n{log}");
    }
    assert!(
        log.lines().any(|l| l.contains("REPORT Result=success")),
        "{log}"
    );
    // The packaged drop-in keeps Debian's unit from starting a cluster the
    // agent has marked as its own, even when asked to.
    assert!(
        log.lines()
            .any(|l| l.contains("REPORT distro ConditionResult=no")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("REPORT distro ActiveState=inactive")),
        "{log}"
    );
}

/// The guest half of the test above: runs only as the unit's ExecStart
/// (`LEASEDOG_GUEST_PG` set); on the host it does nothing.
#[test]
fn guest_postgres_probe() {
    use leasedog::postgres::{cgroup, cluster_processes, read_postmaster_pid, Pg, PgConfig, Role};
    let Ok(data) = std::env::var("LEASEDOG_GUEST_PG") else {
        return;
    };
    let report = |name: &str, ok: bool, detail: String| {
        println!("PROBE {name}: {} {detail}", if ok { "ok" } else { "FAIL" });
    };
    let cgroup_of = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| cgroup::cgroup_path_of(&t))
            .unwrap_or_default()
    };
    let notifier = leasedog::notify::Notifier::from_env();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = PgConfig::with_data_dir(&data);
    cfg.host = "/run/postgresql".into();
    cfg.port = 5433;
    cfg.start_timeout = 120.0;
    cfg.stop_timeout = 20.0;
    let pg = match Pg::new(cfg) {
        Ok(pg) => pg,
        Err(e) => {
            report("driver", false, e.to_string());
            notifier.ready("probe failed");
            return;
        }
    };
    report("driver", true, String::new());
    let own = cgroup_of(std::process::id());
    report(
        "agent in its leaf",
        own.ends_with("/leasedog.service/agent"),
        own,
    );
    let cg = pg.cgroup().cloned();
    report(
        "postgres cgroup",
        cg.as_ref()
            .is_some_and(|g| g.dir().ends_with("leasedog.service/postgres")),
        format!("{cg:?}"),
    );
    let conflict =
        leasedog::postgres::distro_unit_conflict(Path::new("/var/lib/postgresql/15/main"));
    report(
        "distro unit of 15/main refused",
        conflict
            .as_deref()
            .is_some_and(|c| c.contains("systemctl disable --now postgresql@15-main")),
        format!("{conflict:?}"),
    );
    let marked = leasedog::postgres::mark_managed(
        Path::new(leasedog::postgres::MANAGED_DIR),
        Path::new("/var/lib/postgresql/15/main"),
    );
    report(
        "15/main marked as the agent's",
        marked.as_ref().is_ok_and(|m| m == &["15-main"]),
        format!("{marked:?}"),
    );
    let none = leasedog::postgres::distro_unit_conflict(Path::new(&data));
    report(
        "no distro unit for the agent's cluster",
        none.is_none(),
        format!("{none:?}"),
    );
    let started = rt.block_on(pg.start_as_standby(None));
    let pglog =
        fs::read_to_string(Path::new(&data).join("leasedog-postmaster.log")).unwrap_or_default();
    report(
        "start as standby",
        started.is_ok(),
        format!("{started:?} {pglog}"),
    );
    let pm = read_postmaster_pid(Path::new(&data)).unwrap_or(0);
    let pm_cg = cgroup_of(pm as u32);
    report(
        "postmaster in the delegated cgroup",
        pm_cg.ends_with("/leasedog.service/postgres"),
        format!("pid {pm} in {pm_cg}"),
    );
    let procs = cg.as_ref().and_then(|g| g.procs().ok()).unwrap_or_default();
    let cluster = cluster_processes(Path::new(&data));
    report(
        "every cluster process in the cgroup",
        cluster.len() >= 4 && cluster.iter().all(|p| procs.contains(p)),
        format!("cluster {cluster:?}, cgroup {procs:?}"),
    );
    report(
        "socket in /run/postgresql",
        Path::new("/run/postgresql/.s.PGSQL.5433").exists(),
        String::new(),
    );
    let role = rt.block_on(pg.role());
    report(
        "read-only",
        matches!(role, Ok(Role::Replica)),
        format!("{role:?}"),
    );
    let adj = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    report("postmaster oom_score_adj", adj(pm) == "-1000", adj(pm));
    let child = cluster.iter().copied().find(|&p| p != pm).unwrap_or(0);
    report("backend oom_score_adj", adj(child) == "0", adj(child));
    report(
        "data directory writable",
        Path::new(&data).join("standby.signal").exists()
            && fs::write(Path::new(&data).join("probe"), "x").is_ok(),
        String::new(),
    );
    report(
        "/etc read-only",
        fs::write("/etc/leasedog-probe", "x").is_err(),
        String::new(),
    );
    report(
        "/usr read-only",
        fs::write("/usr/leasedog-probe", "x").is_err(),
        String::new(),
    );
    let fence = pg.fence();
    let left = cg.as_ref().and_then(|g| g.procs().ok());
    report(
        "cgroup fence",
        fence.is_ok() && left.as_ref().is_some_and(|l| l.is_empty()),
        format!("{fence:?} left {left:?}"),
    );
    // The kill path itself (freeze, cgroup.kill) under the sandbox: the
    // immediate stop above may not have needed it.
    let restarted = rt.block_on(pg.start_as_standby(None));
    let killed = restarted.map_err(|e| e.to_string()).and_then(|()| {
        cg.as_ref()
            .ok_or("no cgroup".to_string())?
            .freeze_and_kill(Duration::from_secs(20))
            .map_err(|e| e.to_string())
    });
    let left = cg.as_ref().and_then(|g| g.procs().ok());
    report(
        "cgroup freeze and kill",
        killed.as_ref().is_ok_and(|k| k.len() >= 4) && left.as_ref().is_some_and(|l| l.is_empty()),
        format!("{killed:?} left {left:?}"),
    );
    let again = rt.block_on(pg.start_as_standby(None));
    let stop = again.map_err(|e| e.to_string()).and_then(|()| {
        rt.block_on(pg.stop_for_switchover(Duration::from_secs(30)))
            .map_err(|e| e.to_string())
    });
    report(
        "fast stop",
        matches!(stop, Ok(leasedog::postgres::Switchover::Fast { .. })),
        format!("{stop:?}"),
    );
    notifier.ready("probe done");
}

// ------------------------------------ the installed package's whole lifecycle

/// Issue 11, under systemd 252 in a QEMU guest (TCG, ~3 min): the `.deb`
/// installed with `dpkg -i`, a config written, `systemctl enable --now
/// leasedog`; the agent clones its empty data directory from the host node
/// (the leader) and streams; a switchover makes the guest the primary and it
/// takes writes; a switchover back makes it step down and rejoin; `systemctl
/// stop leasedog` shuts PostgreSQL down cleanly, leaves the key with the host
/// node and no watchdog armed. PostgreSQL's processes are in
/// `leasedog.service/postgres` at every step. No failover, so no
/// `pg_rewind`: a clean switchover needs none (the fence-then-rewind path is
/// `tests/lab_pg.rs`'s).
#[test]
fn the_installed_deb_clones_promotes_steps_down_and_stops_under_systemd_252() {
    use leasedog_testbed::lab::deb::deb_trial;
    use leasedog_testbed::lab::scenario::{Lab, HOST_NODE};
    let deb = deb();
    let lab =
        Lab::start(Path::new(env!("CARGO_BIN_EXE_leasedog"))).unwrap_or_else(|e| panic!("{e}"));
    let t = deb_trial(&lab, deb).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", t.summary());
    let ctx = || format!("{}\n--- console ---\n{}", t.summary(), t.console);
    let has = |v: &Option<String>, needle: &str| v.as_deref().is_some_and(|s| s.contains(needle));
    assert!(has(&t.dpkg, "rc=0"), "dpkg -i failed: {}", ctx());
    assert!(
        has(&t.installed, "install ok installed")
            && has(
                &t.installed,
                "FragmentPath=/lib/systemd/system/leasedog.service"
            ),
        "the unit is not the package's: {}",
        ctx()
    );
    assert!(
        has(&t.enabled, "rc=0 enabled active"),
        "systemctl enable --now: {}",
        ctx()
    );
    let replica = t
        .replica
        .as_ref()
        .unwrap_or_else(|| panic!("the agent never ran a replica: {}", ctx()));
    assert!(
        t.cloned.is_some(),
        "the data directory was not cloned: {}",
        ctx()
    );
    let ok = |r: &Option<Result<String, String>>, want: &str| {
        r.as_ref().is_some_and(|r| r.as_deref() == Ok(want))
    };
    assert!(
        ok(&t.streamed, "1"),
        "the leader's write never reached the guest: {}",
        ctx()
    );
    assert!(
        ok(&t.replica_recovery, "t"),
        "the replica was writable: {}",
        ctx()
    );
    assert_eq!(t.switch_to.0, 0, "switchover to the guest: {}", ctx());
    let promoted = t
        .promoted
        .as_ref()
        .unwrap_or_else(|| panic!("the guest never promoted: {}", ctx()));
    assert!(
        ok(&t.guest_write, "2"),
        "the promoted guest took no write: {}",
        ctx()
    );
    assert_eq!(t.switch_back.0, 0, "switchover back: {}", ctx());
    let rejoined = t
        .rejoined
        .as_ref()
        .unwrap_or_else(|| panic!("the guest did not rejoin: {}", ctx()));
    assert!(
        rejoined.text.contains("RejoinReport"),
        "the guest rejoined by another path than pg_rewind's: {}",
        ctx()
    );
    assert!(
        ok(&t.guest_write_on_host, "1"),
        "the guest's write was lost: {}",
        ctx()
    );
    assert!(
        ok(&t.rejoined_recovery, "t"),
        "the rejoined guest is writable: {}",
        ctx()
    );
    // PostgreSQL's processes at each step, and at every report.
    for (step, at) in [
        ("replica", replica.host),
        ("primary", promoted.host),
        ("rejoined", rejoined.host),
    ] {
        assert!(
            !t.cgroups_after(at).is_empty(),
            "no postgres process seen as {step}: {}",
            ctx()
        );
    }
    for c in t.cgroups_after(Duration::ZERO) {
        let groups: Vec<&str> = c.split_whitespace().filter(|w| w.contains("::")).collect();
        assert!(
            groups
                .iter()
                .all(|g| g.ends_with("/leasedog.service/postgres")),
            "postgres processes outside leasedog.service/postgres: {c}\n{}",
            ctx()
        );
    }
    let stopped = t
        .stopped
        .as_ref()
        .unwrap_or_else(|| panic!("systemctl stop did not return: {}", ctx()));
    assert!(
        stopped.text.contains("rc=0")
            && stopped.text.contains("ActiveState=inactive")
            && stopped.text.contains("Result=success")
            && stopped.text.contains("postgres left 0"),
        "not a clean stop: {}",
        ctx()
    );
    // A replica's agent stops its standby with a fast shutdown before it
    // exits (`decide`: `StopPostgres` at shutdown): a clean stop, not the
    // final SIGKILL of KillMode=mixed ("in archive recovery").
    assert!(
        has(&t.pg_state, "shut down in recovery"),
        "PostgreSQL's control file after the stop: {}",
        ctx()
    );
    assert_eq!(t.holder_after_stop.as_deref(), Some(HOST_NODE), "{}", ctx());
    assert!(
        t.reset_after_stop.is_none(),
        "a watchdog was left armed: {}",
        ctx()
    );
}
