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
    /// A virtio NIC, 10.0.2.15/24 with QEMU's user stack at 10.0.2.2.
    pub network: bool,
    /// A host folder shared read-write at [`CTL_DIR`].
    pub ctl_dir: Option<PathBuf>,
    pub mem_mb: u32,
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
            network: false,
            ctl_dir: None,
            mem_mb: 1024,
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
                "[Unit]\nWants=leasedog.service driver.service\n".to_string(),
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
        let ctl = if spec.ctl_dir.is_some() {
            format!(
                "mkdir -p /newroot{CTL_DIR}\n\
                 mount -t 9p -o trans=virtio,version=9p2000.L ctl /newroot{CTL_DIR} || echo 'ctl share failed'\n"
            )
        } else {
            String::new()
        };
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
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
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
        if spec.network {
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,id=nic0",
            ]);
        }
        if spec.i6300esb {
            cmd.args(["-device", "i6300esb", "-action", "watchdog=poweroff"]);
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
