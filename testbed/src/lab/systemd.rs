//! A QEMU guest booting systemd 252 as PID 1 (the lab's kernel, the host's
//! root read-only under a tmpfs overlay), with the shipped `leasedog.service`
//! and its udev rule injected, a drop-in for the unit, and a oneshot
//! `driver.service` running a shell script. Used to check what only systemd
//! itself can show: its fd store (`FileDescriptorStoreMax=`) keeping a killed
//! agent's armed watchdog open across the automatic restart.
//!
//! [`SystemdGuest::boot`] starts it and returns at once; the console (ttyS0,
//! kernel messages and the units' `journal+console` output) is followed by a
//! thread that stamps every line with the host's CLOCK_BOOTTIME on arrival
//! ([`SystemdGuest::lines`]). QMP gives the reset ([`SystemdGuest::wait_reset`]).
//! Optional: the network (10.0.2.2 is the host's loopback, as in
//! [`super::Guest`]), the i6300esb (`-action watchdog=poweroff`), softdog
//! with any module parameters, and a host folder shared read-write at
//! [`CTL_DIR`] (a cheap channel: the host drops a file, the driver polls).
//! [`run_to_poweroff`] is the simple form: boot, wait for QEMU to exit, return
//! the console.

use super::kernel::Kernel;
use super::proc::{host_boottime, spawn_tied, ChildGuard};
use super::qmp::{Qmp, QmpEvent};
use super::scenario::{
    config_with, holder, Dog, Lab, GUEST_NODE, HOST_NODE, KILL_AFTER_STALL, LAB_BUDGET, T,
};
use crate::etcd::EventKind;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where [`SystemdSpec::ctl_dir`] is mounted in the guest.
pub const CTL_DIR: &str = "/mnt/lab";

/// What to boot.
#[derive(Debug, Clone)]
pub struct SystemdSpec {
    pub name: String,
    /// Text of `leasedog.service.d/lab.conf` (at least an `ExecStart=`).
    pub dropin: String,
    /// The driver's shell script (`/bin/sh -c`, runs as root; it should end
    /// with `systemctl poweroff -ff` unless the guest is meant to be reset).
    pub driver: String,
    /// Extra files for the guest's root: (absolute guest path, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// softdog's module parameters (e.g. `soft_margin=5 soft_noboot=1`);
    /// `None`: no softdog.
    pub softdog: Option<String>,
    /// `-device i6300esb -action watchdog=poweroff`.
    pub i6300esb: bool,
    /// The watchdog's action is `reset` instead, and QEMU reboots the guest
    /// (no `-no-reboot`): the same kernel and initramfs boot again, the
    /// tmpfs overlay starts empty, [`SystemdSpec::shares`] keep their files.
    pub watchdog_reset: bool,
    /// A virtio NIC, 10.0.2.15/24 with QEMU's user stack at 10.0.2.2.
    pub network: bool,
    /// A host folder shared read-write at [`CTL_DIR`].
    pub ctl_dir: Option<PathBuf>,
    /// More host folders shared read-write (9p), mounted at the guest path
    /// before systemd starts: what must survive a reboot.
    pub shares: Vec<(PathBuf, String)>,
    /// Host 127.0.0.1:P forwarded to the guest's port P (needs `network`).
    pub forward_tcp: Vec<u16>,
    pub mem_mb: u32,
    /// The unit and the udev rule come from the `.deb` the driver installs
    /// (`dpkg -i`), not from the repository; nothing starts the unit at boot.
    pub packaged: bool,
}

impl Default for SystemdSpec {
    fn default() -> Self {
        SystemdSpec {
            name: "systemd".into(),
            dropin: String::new(),
            driver: "systemctl poweroff -ff".into(),
            files: Vec::new(),
            softdog: None,
            i6300esb: false,
            watchdog_reset: false,
            network: false,
            ctl_dir: None,
            shares: Vec::new(),
            forward_tcp: Vec::new(),
            mem_mb: 1024,
            packaged: false,
        }
    }
}

/// A console line and the host CLOCK_BOOTTIME at which it was seen.
#[derive(Debug, Clone)]
pub struct Line {
    pub host: Duration,
    pub text: String,
}

impl Line {
    /// The kernel's `[   12.345678]` timestamp, if the line has one.
    pub fn kernel_time(&self) -> Option<Duration> {
        let s = self.text.split_once('[')?.1;
        let v: f64 = s.split_once(']')?.0.trim().parse().ok()?;
        (v >= 0.0).then(|| Duration::from_secs_f64(v))
    }
}

/// A running systemd guest; dropping it kills QEMU.
pub struct SystemdGuest {
    qemu: Mutex<ChildGuard>,
    qmp: Qmp,
    console: PathBuf,
    lines: Arc<Mutex<Vec<Line>>>,
    stop: Arc<AtomicBool>,
    follower: Option<std::thread::JoinHandle<()>>,
    spawned_at: Duration,
    dir: Option<tempfile::TempDir>,
}

fn tool(name: &str) -> Result<PathBuf, String> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` not found"))
}

/// The shipped unit and udev rule (the workspace's `systemd/`, `udev/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl SystemdGuest {
    pub fn boot(spec: SystemdSpec) -> Result<SystemdGuest, String> {
        let kernel = Kernel::get()?;
        let e = |what: &str, err: std::io::Error| format!("{what}: {err}");
        let dir = tempfile::Builder::new()
            .prefix("ldsd-")
            .tempdir_in("/tmp")
            .map_err(|err| e("temp folder", err))?;
        let ir = dir.path().join("ir");
        let inject = ir.join("inject");
        for sub in [
            "bin",
            "mods",
            "proc",
            "sys",
            "dev",
            "inject/etc/systemd/system/leasedog.service.d",
            "inject/etc/udev/rules.d",
        ] {
            fs::create_dir_all(ir.join(sub)).map_err(|err| e(sub, err))?;
        }
        fs::copy(tool("busybox")?, ir.join("bin/busybox")).map_err(|err| e("busybox", err))?;
        let mut roots = vec!["virtio_pci", "9pnet_virtio", "9p", "overlay", "watchdog"];
        if spec.network {
            roots.push("virtio_net");
        }
        let mut mods = kernel.load_order(&roots)?;
        mods.retain(|m| m != "softdog" && m != "i6300esb");
        let mut wd = Vec::new();
        if spec.i6300esb {
            wd.push("insmod /mods/i6300esb.ko".to_string());
        }
        if let Some(p) = &spec.softdog {
            wd.push(format!("insmod /mods/softdog.ko {p}"));
        }
        for m in mods
            .iter()
            .map(String::as_str)
            .chain(["i6300esb", "softdog"])
        {
            fs::copy(kernel.module_path(m), ir.join(format!("mods/{m}.ko")))
                .map_err(|err| e(&format!("module {m}"), err))?;
        }
        let repo = repo();
        if !spec.packaged {
            fs::copy(
                repo.join("systemd/leasedog.service"),
                inject.join("etc/systemd/system/leasedog.service"),
            )
            .map_err(|err| e("leasedog.service", err))?;
            fs::copy(
                repo.join("udev/60-leasedog-watchdog.rules"),
                inject.join("etc/udev/rules.d/60-leasedog-watchdog.rules"),
            )
            .map_err(|err| e("udev rule", err))?;
        }
        fs::write(
            inject.join("etc/lab-driver.sh"),
            format!("#!/bin/sh\n{}\n", spec.driver),
        )
        .map_err(|err| e("driver", err))?;
        let units = [
            ("leasedog.service.d/lab.conf", spec.dropin.clone()),
            (
                "driver.service",
                "[Service]\nType=oneshot\nTimeoutStartSec=infinity\n\
                 StandardOutput=journal+console\nStandardError=journal+console\n\
                 ExecStart=/bin/sh /etc/lab-driver.sh\n"
                    .to_string(),
            ),
            (
                "labtest.target",
                if spec.packaged {
                    "[Unit]\nWants=driver.service\n".to_string()
                } else {
                    "[Unit]\nWants=leasedog.service driver.service\n".to_string()
                },
            ),
        ];
        for (name, text) in &units {
            fs::write(inject.join("etc/systemd/system").join(name), text)
                .map_err(|err| e(name, err))?;
        }
        for (path, bytes) in &spec.files {
            let p = inject.join(path.trim_start_matches('/'));
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(|err| e(path, err))?;
            }
            fs::write(&p, bytes).map_err(|err| e(path, err))?;
        }
        let net = if spec.network {
            "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n\
             ip link set lo up; ip link set eth0 up\n\
             ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2\n"
        } else {
            ""
        };
        let mut ctl = if spec.ctl_dir.is_some() {
            format!(
                "mkdir -p /newroot{CTL_DIR}\n\
                 mount -t 9p -o trans=virtio,version=9p2000.L ctl /newroot{CTL_DIR} || echo 'ctl share failed'\n"
            )
        } else {
            String::new()
        };
        for (i, (_, at)) in spec.shares.iter().enumerate() {
            ctl.push_str(&format!(
                "mkdir -p /newroot{at}\n\
                 mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share{i} /newroot{at} \
                 || echo 'share {at} failed'\n"
            ));
        }
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
             for m in {mods}; do insmod /mods/$m.ko || echo \"insmod $m failed\"; done\n\
             {wd}\n\
             {net}\
             mkdir -p /host /rw /newroot\n\
             i=0; until mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host; do \
               i=$((i+1)); [ $i -gt 50 ] && break; sleep 0.1; done\n\
             mount -t tmpfs tmpfs /rw; mkdir -p /rw/upper /rw/work\n\
             mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot\n\
             cp -a /inject/. /newroot/\n\
             {ctl}\
             grep -q '^leasedog:' /newroot/etc/group || echo leasedog:x:990: >> /newroot/etc/group\n\
             umount /proc /sys\n\
             mount --move /dev /newroot/dev\n\
             exec switch_root /newroot /lib/systemd/systemd systemd.unit=labtest.target\n",
            mods = mods.join(" "),
            wd = wd.join("\n"),
        );
        fs::write(ir.join("init"), init).map_err(|err| e("init", err))?;
        fs::set_permissions(ir.join("init"), fs::Permissions::from_mode(0o755))
            .map_err(|err| e("init", err))?;
        let initrd = dir.path().join("initrd.cpio");
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . | {} -o -H newc > {} 2>/dev/null",
                ir.display(),
                tool("cpio")?.display(),
                initrd.display()
            ))
            .status()
            .map_err(|err| e("cpio", err))?;
        if !st.success() {
            return Err("cpio failed".into());
        }
        let console = dir.path().join("console.log");
        let qmp_sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new(tool("qemu-system-x86_64")?);
        cmd.args(["-accel", "tcg", "-nodefaults", "-display", "none"])
            .args(if spec.watchdog_reset {
                &[][..]
            } else {
                &["-no-reboot"][..]
            })
            .args(["-m", &spec.mem_mb.to_string()])
            .arg("-kernel")
            .arg(&kernel.boot_image)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                "console=ttyS0 panic=-1 systemd.unit=labtest.target",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ]);
        if let Some(c) = &spec.ctl_dir {
            cmd.arg("-virtfs").arg(format!(
                "local,path={},mount_tag=ctl,security_model=none,multidevs=remap",
                c.display()
            ));
        }
        for (i, (host, _)) in spec.shares.iter().enumerate() {
            cmd.arg("-virtfs").arg(format!(
                "local,path={},mount_tag=share{i},security_model=none,multidevs=remap",
                host.display()
            ));
        }
        if spec.network {
            let mut netdev = "user,id=n0".to_string();
            for p in &spec.forward_tcp {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{p}-:{p}"));
            }
            cmd.args([
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-pci,netdev=n0,id=nic0",
            ]);
        }
        if spec.i6300esb {
            let action = if spec.watchdog_reset {
                "watchdog=reset"
            } else {
                "watchdog=poweroff"
            };
            cmd.args(["-device", "i6300esb", "-action", action]);
        }
        let log = fs::File::create(dir.path().join("qemu.log")).map_err(|err| e("log", err))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|err| e("log", err))?)
            .stderr(log);
        let spawned_at = host_boottime();
        let child = spawn_tied(cmd).map_err(|err| e("qemu-system-x86_64", err))?;
        let mut qemu = ChildGuard::new(child);
        let qmp = match Qmp::connect(&qmp_sock, Instant::now() + Duration::from_secs(30)) {
            Ok(q) => q,
            Err(err) => {
                qemu.kill();
                return Err(format!("QMP: {err}"));
            }
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let follower = {
            let (lines, stop, path) = (lines.clone(), stop.clone(), console.clone());
            std::thread::Builder::new()
                .name("systemd-guest console".into())
                .spawn(move || follow(&path, &lines, &stop))
                .map_err(|err| e("thread", err))?
        };
        Ok(SystemdGuest {
            qemu: Mutex::new(qemu),
            qmp,
            console,
            lines,
            stop,
            follower: Some(follower),
            spawned_at,
            dir: Some(dir),
        })
    }

    /// The console so far.
    pub fn console_log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Console lines seen so far, each with its host arrival time.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// The first console line containing `needle`.
    pub fn line(&self, needle: &str) -> Option<Line> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.text.contains(needle))
            .cloned()
    }

    /// Waits up to `timeout` for a line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Option<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.line(needle) {
                return Some(l);
            }
            if Instant::now() >= deadline || !self.is_running() {
                // One last look: the follower may lag the exit a little.
                std::thread::sleep(Duration::from_millis(100));
                return self.line(needle);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Guest kernel time -> host CLOCK_BOOTTIME: the smallest (arrival -
    /// kernel timestamp) over the console lines printed within 20 s of `t`
    /// (each arrives a little after it was printed, so the smallest is the
    /// tightest; the window keeps the guest clock's drift out).
    pub fn kernel_to_host(&self, t: Duration) -> Option<Duration> {
        const WINDOW: Duration = Duration::from_secs(20);
        let off = self
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let k = l.kernel_time()?;
                (k + WINDOW >= t && k <= t + WINDOW).then_some(())?;
                l.host.checked_sub(k)
            })
            .min()?;
        Some(off + t)
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The first reset QEMU reported (WATCHDOG, or SHUTDOWN guest-reset).
    pub fn wait_reset(&self, timeout: Duration) -> Option<QmpEvent> {
        self.qmp.wait_reset(timeout)
    }

    pub fn is_running(&self) -> bool {
        matches!(self.qemu.lock().unwrap().try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for QEMU to exit; true if it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    pub fn spawned_at(&self) -> Duration {
        self.spawned_at
    }

    /// The guest's temp folder on the host (console.log, qemu.log).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new(""))
    }
}

impl Drop for SystemdGuest {
    fn drop(&mut self) {
        self.qemu.lock().unwrap_or_else(|e| e.into_inner()).kill();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.follower.take() {
            let _ = t.join();
        }
        if std::env::var_os("LEASEDOG_LAB_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("systemd guest: kept {}", d.keep().display());
            }
        }
    }
}

/// Reads the console file as it grows and stamps each complete line.
fn follow(path: &Path, lines: &Mutex<Vec<Line>>, stop: &AtomicBool) {
    let mut pending: Vec<u8> = Vec::new();
    let mut file = None;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        if file.is_none() {
            file = fs::File::open(path).ok();
        }
        let mut got = false;
        if let Some(f) = file.as_mut() {
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got = true;
                pending.extend_from_slice(&buf[..n]);
            }
        }
        if got {
            let now = host_boottime();
            let mut v = lines.lock().unwrap();
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = pending.drain(..=i).collect();
                v.push(Line {
                    host: now,
                    text: String::from_utf8_lossy(&l)
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots systemd 252 as PID 1 with the shipped unit, its ExecStart replaced
/// by `exec_start` (`Restart=on-failure`, `RestartSec=2s`, no start limit,
/// output to the console), softdog with `soft_margin=5 soft_noboot=1` (an
/// expiry is a log line, not a reset) and the oneshot `driver` script, which
/// must end with `systemctl poweroff -ff`. Waits (up to 480 s) for QEMU to
/// exit and returns the console log.
pub fn run_to_poweroff(exec_start: &str, driver: &str) -> Result<String, String> {
    let g = SystemdGuest::boot(SystemdSpec {
        name: "fdstore".into(),
        dropin: format!(
            "[Unit]\nStartLimitIntervalSec=0\n\
             [Service]\nExecStart=\nExecStart={exec_start}\n\
             Restart=on-failure\nRestartSec=2s\n\
             StandardOutput=journal+console\nStandardError=journal+console\n"
        ),
        driver: driver.into(),
        softdog: Some("soft_margin=5 nowayout=0 soft_noboot=1".into()),
        ..SystemdSpec::default()
    })?;
    if !g.wait_exit(Duration::from_secs(480)) {
        return Err(format!("the guest did not power off:\n{}", g.console_log()));
    }
    Ok(g.console_log())
}

/// Scenario 5 under systemd: what one trial measured, on the host's
/// CLOCK_BOOTTIME.
#[derive(Debug, Clone)]
pub struct KillTrial {
    pub dog: Dog,
    /// The unit kept `FileDescriptorStoreMax=16` (else 0: no store).
    pub fdstore: bool,
    /// QEMU started -> the guest's agent won the key.
    pub boot: Duration,
    pub wall: Duration,
    /// SIGSTOP and SIGKILL of the agent's main pid took effect (the
    /// driver's kernel-log marks, mapped to the host clock).
    pub stopped_at: Duration,
    pub killed_at: Option<Duration>,
    /// QEMU's reset event (name, host time).
    pub reset: Option<(String, Duration)>,
    pub key_deleted: Option<Duration>,
    pub new_leader: Option<Duration>,
    /// The kernel's "watchdog did not stop!" (the close that pings), if any
    /// was printed before the reset.
    pub did_not_stop: Option<Duration>,
    /// The restarted agent's "handed back" line (host arrival), if it ran.
    pub restarted: Option<Duration>,
    /// What the driver saw right after the kill (`systemctl show`).
    pub after_kill: Option<String>,
    pub notes: Vec<String>,
    /// The console (the agent's log, systemd's, the kernel's).
    pub console: String,
}

fn rel(d: Duration, from: Duration) -> f64 {
    d.as_secs_f64() - from.as_secs_f64()
}

impl KillTrial {
    /// key deleted - reset, seconds.
    pub fn slack(&self) -> Option<f64> {
        Some(rel(self.key_deleted?, self.reset.as_ref()?.1))
    }
    /// The kill took effect before the reset: the trial tested the kill's
    /// close (after the reset there is nothing left to ping).
    pub fn killed_before_reset(&self) -> bool {
        matches!((self.killed_at, &self.reset), (Some(k), Some(r)) if k < r.1)
    }
    /// The restarted agent ran before the reset.
    pub fn restarted_before_reset(&self) -> bool {
        matches!((self.restarted, &self.reset), (Some(a), Some(r)) if a < r.1)
            || (self.restarted.is_some() && self.reset.is_none())
    }
    /// stall -> reset, seconds.
    pub fn reset_after_stall(&self) -> Option<f64> {
        Some(rel(self.reset.as_ref()?.1, self.stopped_at))
    }
    /// stall -> the host replica's key, seconds.
    pub fn failover(&self) -> Option<f64> {
        Some(rel(self.new_leader?, self.stopped_at))
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let r = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:+.3}", rel(d, self.stopped_at))
            })
        };
        format!(
            "systemd, fd store {} ({}): kill {}, \"did not stop\" {}, reset {} {}, key deleted {}, \
             new leader {}, restarted agent {} (s after the stall); slack {}; boot {:.1} s, trial {:.1} s",
            if self.fdstore { "on" } else { "off" },
            self.dog.name(),
            r(self.killed_at),
            r(self.did_not_stop),
            self.reset.as_ref().map_or("none", |x| x.0.as_str()),
            r(self.reset.as_ref().map(|x| x.1)),
            r(self.key_deleted),
            r(self.new_leader),
            r(self.restarted),
            self.slack().map_or("-".into(), |s| format!("{s:.3} s")),
            self.boot.as_secs_f64(),
            self.wall.as_secs_f64(),
        )
    }
}

/// How to run a [`kill_trial`].
#[derive(Debug, Clone, Copy)]
pub struct KillOpts {
    /// i6300esb or softdog (one per guest).
    pub dog: Dog,
    /// `FileDescriptorStoreMax=16` as shipped; `false`: 0, no store.
    pub fdstore: bool,
    /// SIGSTOP -> SIGKILL ([`KILL_AFTER_STALL`] in the benchmark).
    pub kill_after: Duration,
    /// softdog with `soft_noboot=1`: its expiry is the kernel's
    /// "softdog: Triggered - Reboot ignored", the guest lives on, and the
    /// restarted agent (`RestartSec=` T after the kill) can be watched with
    /// the handed-back device: a second "Triggered" `W` or more later
    /// would mean something pinged it after it fired.
    pub observe_restart: bool,
}

impl KillOpts {
    pub fn new(dog: Dog, fdstore: bool) -> KillOpts {
        KillOpts {
            dog,
            fdstore,
            kill_after: KILL_AFTER_STALL,
            observe_restart: false,
        }
    }
}

/// The driver of a trial: waits for the host's `go` (the replica is up),
/// stops the agent's main pid, kills it `kill_after` later, marks both in
/// the kernel log, reports the unit's state, then waits for the reset (or,
/// observing the restart, reports and powers off after `linger` s).
fn kill_driver(kill_after: Duration, linger: u64) -> String {
    let kill_after = kill_after.as_secs_f64();
    format!(
        r#"log() {{ echo "LABDRV $*" > /dev/kmsg; }}
i=0; until [ -e {CTL_DIR}/go ]; do i=$((i+1)); if [ $i -gt 3000 ]; then log "no go"; systemctl poweroff -ff; fi; sleep 0.1; done
pid=$(systemctl show -p MainPID --value leasedog.service)
log "before: pid $pid store $(systemctl show -p NFileDescriptorStore --value leasedog.service)"
kill -STOP "$pid" && log "STOPPED $pid"
sleep {kill_after}
kill -KILL "$pid" && log "KILLED $pid"
sleep 0.5
log "AFTERKILL $(systemctl show leasedog.service -p NFileDescriptorStore -p NRestarts -p ActiveState -p SubState | tr '\n' ' ')"
sleep {linger}
log "NORESET $(systemctl show leasedog.service -p NFileDescriptorStore -p NRestarts -p ActiveState -p SubState | tr '\n' ' ')"
systemctl poweroff -ff
"#
    )
}

/// One trial of scenario 5 with the agent as a systemd service: a guest
/// booting systemd 252 runs `leasedog run` under the shipped unit (its
/// `FileDescriptorStoreMax=16`, or 0 without `fdstore`; `Restart=on-failure`,
/// `RestartSec=` T) against the lab's etcd, with one real watchdog (`dog`:
/// i6300esb or softdog). Once it leads and the host replica is up, its main
/// pid is stopped and killed [`KILL_AFTER_STALL`] later.
pub fn kill_trial(lab: &Lab, opts: KillOpts) -> Result<KillTrial, String> {
    let KillOpts {
        dog,
        fdstore,
        kill_after,
        observe_restart,
    } = opts;
    if observe_restart && dog != Dog::Softdog {
        return Err("observing the restart needs softdog (soft_noboot=1)".into());
    }
    let t0 = Instant::now();
    let scope = lab.new_scope();
    let watch = lab.watch(&scope)?;
    let ctl = lab.work().join(format!("sd-{scope}"));
    fs::create_dir_all(&ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
    let devices = match dog {
        Dog::I6300esb => "[[watchdog.device]]\nkind = \"device\"\npath = \"/dev/watchdog0\"\n",
        Dog::Softdog => "[[watchdog.device]]\nkind = \"softdog\"\n",
        Dog::Both => return Err("one watchdog per systemd trial".into()),
    };
    let cfg = config_with(
        &LAB_BUDGET,
        &scope,
        GUEST_NODE,
        &format!("http://10.0.2.2:{}", lab.etcd.client_port()),
        "keep-pinging",
        devices,
        "/var/lib/leasedog",
    );
    let store = if fdstore {
        ""
    } else {
        "FileDescriptorStoreMax=0\n"
    };
    let g = SystemdGuest::boot(SystemdSpec {
        name: format!("kill-{}", dog.name()),
        dropin: format!(
            "[Unit]\nStartLimitIntervalSec=0\n\
             [Service]\nExecStart=\nExecStart={bin} run --config /etc/leasedog/leasedog.toml\n\
             Restart=on-failure\nRestartSec={restart}s\n{store}\
             StandardOutput=journal+console\nStandardError=journal+console\n",
            bin = lab.bin.display(),
            restart = T.as_secs(),
        ),
        driver: kill_driver(kill_after, if observe_restart { 20 } else { 40 }),
        files: vec![("/etc/leasedog/leasedog.toml".into(), cfg.into_bytes())],
        softdog: (dog == Dog::Softdog).then(|| {
            if observe_restart {
                "nowayout=0 soft_noboot=1".to_string()
            } else {
                "nowayout=0".to_string()
            }
        }),
        i6300esb: dog == Dog::I6300esb,
        network: true,
        ctl_dir: Some(ctl.clone()),
        ..SystemdSpec::default()
    })?;
    let fail = |what: String| format!("{what}\n--- console ---\n{}", g.console_log());
    let won = watch
        .wait_for(
            |e| e.kind == EventKind::Put && holder(&e.value).as_deref() == Some(GUEST_NODE),
            Duration::from_secs(300),
        )
        .ok_or_else(|| fail("the guest's agent did not win the key within 300 s".into()))?;
    let boot = Duration::from_nanos(won.boottime_ns).saturating_sub(g.spawned_at());
    g.wait_line("promoted (leader", Duration::from_secs(30))
        .ok_or_else(|| fail("the guest's agent won but did not promote".into()))?;
    let replica = lab.host_replica(&scope, HOST_NODE)?;
    if !crate::wait_until(Duration::from_secs(20), || {
        replica.log().contains("connected to etcd")
    }) {
        return Err(fail(format!(
            "the host replica did not connect:\n{}",
            replica.log()
        )));
    }
    std::thread::sleep(Duration::from_secs(1));
    if let Some(r) = g.qmp().reset_event() {
        return Err(fail(format!("the guest reset while healthy: {r:?}")));
    }
    fs::write(ctl.join("go"), "go\n").map_err(|e| e.to_string())?;
    let when = |l: &Line| {
        l.kernel_time()
            .and_then(|t| g.kernel_to_host(t))
            .unwrap_or(l.host)
    };
    let stopped = g
        .wait_line("LABDRV STOPPED", Duration::from_secs(60))
        .ok_or_else(|| fail("the driver never stopped the agent".into()))?;
    let stopped_at = when(&stopped);
    let reset = if observe_restart {
        // No reset: the expiry is a log line; then watch the restarted
        // agent until the driver powers off.
        let fired = g.wait_line("softdog: Triggered", Duration::from_secs(30));
        g.wait_exit(Duration::from_secs(90));
        fired.map(|l| QmpEvent {
            name: "softdog Triggered (soft_noboot)".into(),
            data: serde_json::Value::Null,
            qmp_time: std::time::SystemTime::now(),
            boottime: when(&l),
            received: l.host,
        })
    } else {
        g.wait_reset(Duration::from_secs(30))
    };
    let deleted = watch.wait_for(
        |e| e.kind == EventKind::Delete && e.boottime_ns >= stopped_at.as_nanos() as u64,
        Duration::from_secs(30),
    );
    let new_leader = watch.wait_for(
        |e| {
            e.kind == EventKind::Put
                && e.boottime_ns >= stopped_at.as_nanos() as u64
                && holder(&e.value).as_deref() == Some(HOST_NODE)
        },
        Duration::from_secs(30),
    );
    // The console may lag QEMU's exit by a poll.
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = g.line("LABDRV KILLED").map(|l| when(&l));
    let mut notes = Vec::new();
    let reset_at = reset.as_ref().map(|r| r.boottime);
    let before_reset = |t: Duration| reset_at.is_none_or(|r| t <= r);
    let did_not_stop = g
        .line("did not stop")
        .map(|l| when(&l))
        .filter(|t| before_reset(*t));
    let restarted = g.line("handed back").map(|l| l.host);
    if let Some(l) = g.line("handed back") {
        notes.push(format!("restarted agent: {}", l.text.trim()));
    }
    let after_kill = g.line("LABDRV AFTERKILL").map(|l| {
        l.text
            .split_once("AFTERKILL")
            .map_or("", |x| x.1)
            .trim()
            .to_string()
    });
    if let Some(l) = g.line("LABDRV before:") {
        notes.push(
            l.text
                .split_once("LABDRV")
                .map_or("", |x| x.1)
                .trim()
                .to_string(),
        );
    }
    if let Some(l) = g.line("LABDRV NORESET") {
        let state = l
            .text
            .split_once("NORESET")
            .map_or("", |x| x.1)
            .trim()
            .to_string();
        if observe_restart {
            let fires: Vec<String> = g
                .lines()
                .iter()
                .filter(|l| l.text.contains("softdog: Triggered"))
                .map(|l| format!("{:+.3}", rel(when(l), stopped_at)))
                .collect();
            notes.push(format!(
                "softdog fired at {} s after the stall (a second firing means a ping after the \
                 first); unit at the end: {state}",
                fires.join(", ")
            ));
            for l in g.lines().iter().filter(|l| {
                l.host > restarted.unwrap_or(Duration::MAX)
                    && (l.text.contains("leasedog[") || l.text.contains("leasedog:"))
            }) {
                notes.push(format!(
                    "  {:+.3} {}",
                    rel(l.host, stopped_at),
                    l.text.trim()
                ));
            }
        } else {
            notes.push(format!("no reset within 40 s of the kill; unit: {state}"));
        }
    }
    Ok(KillTrial {
        dog,
        fdstore,
        boot,
        wall: t0.elapsed(),
        stopped_at,
        killed_at,
        reset: reset.map(|r| {
            let name = match r.data.get("action").and_then(|a| a.as_str()) {
                Some(a) => format!("{} ({a})", r.name),
                None => r.name.clone(),
            };
            (name, r.boottime)
        }),
        key_deleted: deleted.map(|e| Duration::from_nanos(e.boottime_ns)),
        new_leader: new_leader.map(|e| Duration::from_nanos(e.boottime_ns)),
        did_not_stop,
        restarted,
        after_kill,
        notes,
        console: g.console_log(),
    })
}
