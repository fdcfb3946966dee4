//! A QEMU TCG guest running Debian's kernel with real watchdogs, the host's
//! root shared read-only (so it runs the host's binaries), a network that
//! reaches the host's loopback through 10.0.2.2, QMP for the host-side record,
//! and a control shell on its second serial port.

use super::initramfs;
use super::kernel::Kernel;
use super::proc::{host_boottime, spawn_tied, ChildGuard};
use super::qmp::{Qmp, QmpEvent};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// softdog module parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftdogOpts {
    /// `soft_margin=` in seconds (the initial timeout).
    pub margin: u32,
    /// `nowayout=`: a magic close cannot stop it.
    pub nowayout: bool,
}

/// Which watchdogs the guest has. Devices are numbered in load order:
/// i6300esb first, then softdog; use [`Guest::watchdog`] to find one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watchdogs {
    /// `-device i6300esb` and its driver (default timeout 30 s).
    pub i6300esb: bool,
    /// The i6300esb driver's `nowayout=1`.
    pub i6300esb_nowayout: bool,
    pub softdog: Option<SoftdogOpts>,
}

/// What QEMU does when the i6300esb expires (`-action watchdog=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatchdogAction {
    #[default]
    Poweroff,
    /// Guest reset; with `-no-reboot` QEMU then exits.
    Reset,
    /// The guest is paused (stays inspectable).
    Pause,
}

#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub watchdogs: Watchdogs,
    pub watchdog_action: WatchdogAction,
    /// Guest TCP ports to forward from a free host port on 127.0.0.1
    /// (see [`Guest::host_port`]).
    pub forward_tcp: Vec<u16>,
    /// `(host port, guest port)` pairs forwarded from the host's 127.0.0.1
    /// as given: a server that must be reachable at the same port number on
    /// both sides (an address a peer reads from etcd) uses `(p, p)`.
    pub forward_tcp_fixed: Vec<(u16, u16)>,
    pub mem_mb: u32,
    pub smp: u32,
    /// Limit for boot up to the control shell answering.
    pub boot_timeout: Duration,
    /// Extra kernel command line words.
    pub extra_append: String,
    /// Extra QEMU arguments.
    pub extra_qemu_args: Vec<String>,
    /// A name for logs and the temp folder.
    pub name: String,
    /// Host folders shared read-write with the guest, mounted (9p) at the
    /// given guest path at boot and again after each reboot: what the guest
    /// writes there survives its reset and is readable on the host.
    pub rw_shares: Vec<(PathBuf, String)>,
    /// Let the same QEMU reboot the guest after a reset (no `-no-reboot`):
    /// see [`Guest::wait_rebooted`]. Off: QEMU exits at the first reset.
    pub reboot: bool,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            watchdogs: Watchdogs::default(),
            watchdog_action: WatchdogAction::Poweroff,
            forward_tcp: Vec::new(),
            forward_tcp_fixed: Vec::new(),
            mem_mb: 512,
            smp: 1,
            boot_timeout: Duration::from_secs(120),
            extra_append: String::new(),
            extra_qemu_args: Vec::new(),
            name: "guest".into(),
            rw_shares: Vec::new(),
            reboot: false,
        }
    }
}

/// A watchdog device inside the guest, from /sys/class/watchdog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWatchdog {
    /// e.g. `/dev/watchdog0`.
    pub dev: String,
    /// e.g. `i6300ESB timer`, `Software Watchdog`.
    pub identity: String,
    pub timeout: u32,
    pub nowayout: bool,
}

/// The result of [`Guest::run`].
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub rc: i32,
    /// stdout and stderr, interleaved.
    pub output: String,
    /// Host boottime when the request was written / the reply read.
    pub sent: Duration,
    pub replied: Duration,
    /// Guest CLOCK_BOOTTIME (/proc/uptime, 10 ms resolution) just after the
    /// command finished.
    pub guest_uptime: Duration,
}

impl RunOutput {
    pub fn ok(&self) -> bool {
        self.rc == 0
    }
}

/// A background command started with [`Guest::spawn`].
#[derive(Debug, Clone)]
pub struct Spawned {
    /// Its pid; also its session and process group id.
    pub pid: u32,
    /// Guest path of its stdout+stderr.
    pub log: String,
}

/// The moment a guest-side action took effect.
#[derive(Debug, Clone, Copy)]
pub struct Effect {
    /// Guest /proc/uptime read right after the action.
    pub guest_uptime: Duration,
    /// That instant on the host's CLOCK_BOOTTIME (via [`Guest::guest_to_host`]).
    pub host: Duration,
    pub sent: Duration,
    pub replied: Duration,
}

struct Ctl {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

/// A running guest. Dropping it kills QEMU (and its process group) and
/// removes its temp folder (kept if `LEASEDOG_LAB_KEEP` is set); if the
/// thread is panicking, the console's tail is printed to stderr first.
pub struct Guest {
    spec: GuestSpec,
    qemu: Mutex<ChildGuard>,
    qmp: Qmp,
    ctl: Mutex<Ctl>,
    dir: Option<tempfile::TempDir>,
    console: PathBuf,
    host_ports: BTreeMap<u16, u16>,
    qemu_pid: u32,
    spawned_at: Duration,
    ready_at: Duration,
    watchdogs: Vec<GuestWatchdog>,
    /// (host receipt, receipt - guest uptime) of recent control replies:
    /// guest -> host clock offset samples.
    offset: Mutex<Vec<(Duration, Duration)>>,
    bg_seq: Mutex<u64>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("name", &self.spec.name)
            .field("dir", &self.dir())
            .finish_non_exhaustive()
    }
}

const OFFSET_WINDOW: Duration = Duration::from_secs(30);

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Base64 without padding rules beyond the standard alphabet (for the
/// control channel; busybox decodes it).
pub(crate) fn b64encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

pub(crate) fn b64decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for ch in s.bytes() {
        let v = match ch {
            b'A'..=b'Z' => ch - b'A',
            b'a'..=b'z' => ch - b'a' + 26,
            b'0'..=b'9' => ch - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\r' | b'\n' => continue,
            _ => return Err(format!("bad base64 byte {ch:#x}")),
        } as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

fn secs(s: &str) -> Option<Duration> {
    s.parse::<f64>()
        .ok()
        .filter(|x| *x >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Shell-quotes `s` in single quotes.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Guest {
    /// Boots a guest and waits until its control shell answers.
    pub fn boot(spec: GuestSpec) -> Result<Guest, String> {
        let kernel = Kernel::get()?;
        let initrd = initramfs::get(kernel)?;
        // Short and plain: QEMU splits options at commas, and unix socket
        // paths are limited to 108 bytes.
        let tag: String = spec
            .name
            .chars()
            .take(20)
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("leasedog-lab-{tag}-"))
            .tempdir()
            .map_err(|e| format!("cannot create a temp folder: {e}"))?;
        let qmp_sock = dir.path().join("qmp.sock");
        let longest = dir.path().join("ctl.sock").as_os_str().len();
        if longest > 100 || dir.path().to_string_lossy().contains(',') {
            return Err(format!(
                "guest folder {} is too long or has a comma (QEMU options, socket paths): set TMPDIR",
                dir.path().display()
            ));
        }
        let ctl_sock = dir.path().join("ctl.sock");
        let console = dir.path().join("console.log");
        let qemu_log = dir.path().join("qemu.log");

        let mut host_ports = BTreeMap::new();
        let mut netdev = "user,id=n0".to_string();
        for &gp in &spec.forward_tcp {
            let hp = free_port()?;
            host_ports.insert(gp, hp);
            let _ = write!(netdev, ",hostfwd=tcp:127.0.0.1:{hp}-:{gp}");
        }
        for &(hp, gp) in &spec.forward_tcp_fixed {
            host_ports.insert(gp, hp);
            let _ = write!(netdev, ",hostfwd=tcp:127.0.0.1:{hp}-:{gp}");
        }
        let mut wd = Vec::new();
        let mut append = "console=ttyS0 quiet panic=-1".to_string();
        if spec.watchdogs.i6300esb {
            wd.push("i6300esb");
            if spec.watchdogs.i6300esb_nowayout {
                append.push_str(" lab.i6300esb=nowayout=1");
            }
        }
        if let Some(s) = spec.watchdogs.softdog {
            wd.push("softdog");
            let _ = write!(
                append,
                " lab.softdog=soft_margin={},nowayout={}",
                s.margin, s.nowayout as u8
            );
        }
        if !wd.is_empty() {
            let _ = write!(append, " lab.wd={}", wd.join(","));
        }
        if !spec.extra_append.is_empty() {
            append.push(' ');
            append.push_str(&spec.extra_append);
        }

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-nodefaults", "-display", "none"]);
        if !spec.reboot {
            cmd.arg("-no-reboot");
        }
        for (i, (host, _)) in spec.rw_shares.iter().enumerate() {
            let h = host.to_string_lossy();
            if h.contains(',') {
                return Err(format!("share {h} has a comma (QEMU options)"));
            }
            cmd.arg("-virtfs").arg(format!(
                "local,path={h},mount_tag=rw{i},security_model=none,multidevs=remap"
            ));
        }
        cmd.args([
            "-m",
            &spec.mem_mb.to_string(),
            "-smp",
            &spec.smp.to_string(),
        ])
        .arg("-kernel")
        .arg(&kernel.boot_image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("unix:{},server=on,wait=off", ctl_sock.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .args([
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-pci,netdev=n0,id=nic0",
        ]);
        if spec.watchdogs.i6300esb {
            let action = match spec.watchdog_action {
                WatchdogAction::Poweroff => "poweroff",
                WatchdogAction::Reset => "reset",
                WatchdogAction::Pause => "pause",
            };
            cmd.args(["-device", "i6300esb", "-action"])
                .arg(format!("watchdog={action}"));
        }
        cmd.args(&spec.extra_qemu_args);
        let log = fs::File::create(&qemu_log).map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);

        let spawned_at = host_boottime();
        let deadline = Instant::now() + spec.boot_timeout;
        let child = spawn_tied(cmd).map_err(|e| {
            format!("cannot start qemu-system-x86_64 (install qemu-system-x86): {e}")
        })?;
        let mut qemu = ChildGuard::new(child);
        let fail =
            |qemu: &mut ChildGuard, what: String| -> String {
                let exited = qemu.try_wait().ok().flatten();
                qemu.kill();
                format!(
                "guest {} failed to boot: {what}{}\n--- qemu.log ---\n{}\n--- console tail ---\n{}",
                spec.name,
                exited.map(|s| format!(" (QEMU exited: {s})")).unwrap_or_default(),
                fs::read_to_string(&qemu_log).unwrap_or_default(),
                tail(&fs::read_to_string(&console).unwrap_or_default(), 40)
            )
            };
        let qmp = match Qmp::connect(&qmp_sock, deadline) {
            Ok(q) => q,
            Err(e) => return Err(fail(&mut qemu, e)),
        };
        let stream = loop {
            match UnixStream::connect(&ctl_sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(fail(&mut qemu, format!("control socket: {e}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut ctl = Ctl {
            stream,
            buf: Vec::new(),
            next_id: 1,
        };
        // Wait for the control shell's banner (or QEMU's death).
        let ready = loop {
            match read_line(&mut ctl, Duration::from_millis(200)) {
                Ok(Some(l)) => {
                    if let Some(rest) = l.strip_prefix("<<LD-READY ") {
                        break rest.trim_end_matches(">>").to_string();
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(fail(&mut qemu, e)),
            }
            if qmp.closed() || matches!(qemu.try_wait(), Ok(Some(_))) {
                return Err(fail(
                    &mut qemu,
                    "QEMU exited before the control shell started".into(),
                ));
            }
            if Instant::now() >= deadline {
                return Err(fail(
                    &mut qemu,
                    format!("no control shell within {:?}", spec.boot_timeout),
                ));
            }
        };
        let ready_at = host_boottime();
        let mut g = Guest {
            qemu_pid: qemu.id(),
            spec,
            qemu: Mutex::new(qemu),
            qmp,
            ctl: Mutex::new(ctl),
            dir: Some(dir),
            console,
            host_ports,
            spawned_at,
            ready_at,
            watchdogs: Vec::new(),
            offset: Mutex::new(Vec::new()),
            bg_seq: Mutex::new(0),
        };
        if let Some(up) = secs(&ready) {
            g.note_offset(ready_at, up);
        }
        g.mount_shares()?;
        g.watchdogs = g.read_watchdogs()?;
        Ok(g)
    }

    fn mount_shares(&self) -> Result<(), String> {
        for (i, (_, guest)) in self.spec.rw_shares.iter().enumerate() {
            let q = shell_quote(guest);
            self.run_ok(
                &format!(
                    "mkdir -p {q} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 rw{i} {q}"
                ),
                Duration::from_secs(30),
            )?;
        }
        Ok(())
    }

    /// After a reset of a guest booted with [`GuestSpec::reboot`]: waits up
    /// to `timeout` for the rebooted guest's control shell, then mounts the
    /// shares again and re-reads the watchdogs. Returns the new boot time
    /// (host boottime from the reset event to the control shell).
    pub fn wait_rebooted(&mut self, timeout: Duration) -> Result<Duration, String> {
        let reset = self
            .reset_time()
            .map(|e| e.boottime)
            .unwrap_or_else(host_boottime);
        let deadline = Instant::now() + timeout;
        let ready = {
            let mut ctl = self.ctl.lock().unwrap();
            loop {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{}: no control shell within {timeout:?} of the reboot",
                        self.spec.name
                    ));
                }
                if let Some(l) = read_line(&mut ctl, Duration::from_millis(200))? {
                    if let Some(rest) = l.strip_prefix("<<LD-READY ") {
                        break rest.trim_end_matches(">>").to_string();
                    }
                }
            }
        };
        let at = host_boottime();
        self.offset.lock().unwrap().clear();
        if let Some(up) = secs(&ready) {
            self.note_offset(at, up);
        }
        self.mount_shares()?;
        self.watchdogs = self.read_watchdogs()?;
        Ok(at.saturating_sub(reset))
    }

    fn read_watchdogs(&self) -> Result<Vec<GuestWatchdog>, String> {
        let out = self.run_ok(
            "for d in /sys/class/watchdog/watchdog*; do [ -e \"$d\" ] || continue; \
             echo \"/dev/${d##*/}|$(cat $d/identity)|$(cat $d/timeout)|$(cat $d/nowayout)\"; done",
            Duration::from_secs(30),
        )?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                (f.len() == 4).then(|| GuestWatchdog {
                    dev: f[0].to_string(),
                    identity: f[1].to_string(),
                    timeout: f[2].trim().parse().unwrap_or(0),
                    nowayout: f[3].trim() == "1",
                })
            })
            .collect())
    }

    fn note_offset(&self, host: Duration, guest_uptime: Duration) {
        if let Some(o) = host.checked_sub(guest_uptime) {
            let mut v = self.offset.lock().unwrap();
            v.push((host, o));
            // Recent samples only: the two clocks may drift apart slowly.
            let keep_from = host.saturating_sub(OFFSET_WINDOW);
            v.retain(|(h, _)| *h >= keep_from);
        }
    }

    /// Guest CLOCK_BOOTTIME -> host CLOCK_BOOTTIME offset: the smallest
    /// (reply receipt - guest uptime) over the last 30 s of control replies.
    /// Each reply leaves the guest right after its uptime is read, so every
    /// sample is the offset plus a small positive delay; /proc/uptime has
    /// 10 ms resolution. Call [`Guest::probe_clock`] to refresh it.
    pub fn clock_offset(&self) -> Option<Duration> {
        self.offset.lock().unwrap().iter().map(|s| s.1).min()
    }

    /// Takes a few fresh clock-offset samples; returns the new estimate.
    pub fn probe_clock(&self) -> Result<Duration, String> {
        for _ in 0..3 {
            self.run_ok("true", Duration::from_secs(10))?;
        }
        self.clock_offset()
            .ok_or_else(|| "no clock offset sample".to_string())
    }

    /// Host boottime at which QEMU was started.
    pub fn spawned_at(&self) -> Duration {
        self.spawned_at
    }

    /// Host boottime from starting QEMU to the control shell answering.
    pub fn boot_time(&self) -> Duration {
        self.ready_at.saturating_sub(self.spawned_at)
    }

    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    /// The guest's temp folder on the host (console.log, qemu.log, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new(""))
    }

    /// The serial console so far.
    pub fn console_log(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The host port forwarded to guest port `guest_port` (127.0.0.1).
    pub fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.host_ports.get(&guest_port).copied()
    }

    /// The guest's watchdog devices as seen at boot.
    pub fn watchdogs(&self) -> &[GuestWatchdog] {
        &self.watchdogs
    }

    /// The device whose identity contains `identity_part` (e.g. `i6300ESB`,
    /// `Software Watchdog`).
    pub fn watchdog(&self, identity_part: &str) -> Option<&GuestWatchdog> {
        self.watchdogs
            .iter()
            .find(|w| w.identity.contains(identity_part))
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The first reset QEMU reported (WATCHDOG, or SHUTDOWN guest-reset), if
    /// one happened yet.
    pub fn reset_time(&self) -> Option<QmpEvent> {
        self.qmp.reset_event()
    }

    /// Waits up to `timeout` for a reset.
    pub fn wait_reset(&self, timeout: Duration) -> Option<QmpEvent> {
        self.qmp.wait_reset(timeout)
    }

    /// Waits up to `timeout` for QEMU to exit; true if it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if matches!(self.qemu.lock().unwrap().try_wait(), Ok(Some(_))) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The QEMU process's pid (also its process group id).
    pub fn qemu_pid(&self) -> u32 {
        self.qemu_pid
    }

    /// True while the QEMU process exists.
    pub fn is_running(&self) -> bool {
        matches!(self.qemu.lock().unwrap().try_wait(), Ok(None))
    }

    /// Guest CLOCK_BOOTTIME -> host CLOCK_BOOTTIME, from the offset seen on
    /// control replies (good to a few tens of ms; it is an upper bound: the
    /// true host instant is at most this, minus the reply's serial delay).
    pub fn guest_to_host(&self, guest_uptime: Duration) -> Option<Duration> {
        self.clock_offset().map(|o| o + guest_uptime)
    }

    /// Runs `script` with busybox sh in the guest's root (the host's root
    /// overlaid; PATH=/sbin:/usr/sbin:/bin:/usr/bin), stdin /dev/null,
    /// killed after `timeout`. Commands are executed one at a time; a reply
    /// takes about 0.1-0.7 s, so timestamp effects, not requests (see
    /// [`RunOutput::guest_uptime`], [`Guest::kill`]).
    pub fn run(&self, script: &str, timeout: Duration) -> Result<RunOutput, String> {
        let mut ctl = self.ctl.lock().unwrap();
        let id = format!("{}-{}", std::process::id(), ctl.next_id);
        ctl.next_id += 1;
        let t = timeout.as_secs().max(1);
        let line = format!("{id} {t} {}\n", b64encode(script.as_bytes()));
        let sent = host_boottime();
        ctl.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: control channel write: {e}", self.spec.name))?;
        // The guest kills the command at `t`; allow for the channel itself.
        let deadline = Instant::now() + Duration::from_secs(t) + Duration::from_secs(15);
        let prefix = format!("<<LD-OUT {id} ");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "{}: no reply to {script:?} within {timeout:?} (+15 s)",
                    self.spec.name
                ));
            }
            match read_line(&mut ctl, left.min(Duration::from_millis(200))) {
                Ok(Some(l)) => {
                    let replied = host_boottime();
                    let Some(rest) = l.strip_prefix(&prefix) else {
                        continue;
                    };
                    let rest = rest.trim_end().trim_end_matches(">>");
                    let mut f = rest.splitn(3, ' ');
                    let rc = f.next().and_then(|x| x.parse().ok()).unwrap_or(-1);
                    let up = f.next().and_then(secs).unwrap_or_default();
                    let out = b64decode(f.next().unwrap_or("").trim())?;
                    drop(ctl);
                    self.note_offset(replied, up);
                    return Ok(RunOutput {
                        rc,
                        output: String::from_utf8_lossy(&out).into_owned(),
                        sent,
                        replied,
                        guest_uptime: up,
                    });
                }
                Ok(None) => {
                    if self.qmp.closed() {
                        return Err(format!(
                            "{}: QEMU exited while running {script:?}",
                            self.spec.name
                        ));
                    }
                }
                Err(e) => return Err(format!("{}: control channel: {e}", self.spec.name)),
            }
        }
    }

    /// [`Guest::run`], requiring exit status 0; returns the output.
    pub fn run_ok(&self, script: &str, timeout: Duration) -> Result<String, String> {
        let r = self.run(script, timeout)?;
        if r.rc != 0 {
            return Err(format!(
                "{}: {script:?} exited {}: {}",
                self.spec.name, r.rc, r.output
            ));
        }
        Ok(r.output)
    }

    /// Writes `contents` to `path` in the guest (parent folders created).
    /// Sent through the serial control channel: meant for small files
    /// (configs); for big ones write a host file and `cp` it in the guest.
    pub fn write_file(&self, path: &str, contents: &[u8]) -> Result<(), String> {
        let q = shell_quote(path);
        self.run_ok(
            &format!(
                "mkdir -p \"$(dirname {q})\" && echo {} | /run/lab/busybox base64 -d > {q}",
                b64encode(contents)
            ),
            Duration::from_secs(30),
        )
        .map(|_| ())
    }

    /// A guest file's contents (as text; invalid UTF-8 is replaced).
    pub fn read_file(&self, path: &str) -> Result<String, String> {
        self.run_ok(
            &format!("cat {}", shell_quote(path)),
            Duration::from_secs(30),
        )
    }

    /// Starts `script` (busybox sh) in the background in its own session,
    /// output to a log file in the guest. Start it with `exec` to make the
    /// returned pid the program's own (e.g. `exec /path/leasedog run ...`).
    pub fn spawn(&self, script: &str) -> Result<Spawned, String> {
        let n = {
            let mut s = self.bg_seq.lock().unwrap();
            *s += 1;
            *s
        };
        let file = format!("/run/lab/bg{n}.sh");
        let log = format!("/run/lab/bg{n}.log");
        self.write_file(&file, script.as_bytes())?;
        let out = self.run_ok(
            &format!(
                "/run/lab/busybox setsid /run/lab/busybox sh {file} </dev/null >{log} 2>&1 & echo $!"
            ),
            Duration::from_secs(30),
        )?;
        let pid = out
            .trim()
            .parse()
            .map_err(|_| format!("spawn: no pid in {out:?}"))?;
        Ok(Spawned { pid, log })
    }

    /// Runs `script` (which must succeed) and returns when it took effect:
    /// the guest's uptime right after it finished, and that instant on the
    /// host's clock. Use this, not the request time, to timestamp an action.
    pub fn act(&self, script: &str) -> Result<Effect, String> {
        let r = self.run(script, Duration::from_secs(30))?;
        if r.rc != 0 {
            return Err(format!(
                "{}: {script:?} exited {}: {}",
                self.spec.name,
                r.rc,
                r.output.trim()
            ));
        }
        Ok(Effect {
            guest_uptime: r.guest_uptime,
            host: self.guest_to_host(r.guest_uptime).unwrap_or(r.replied),
            sent: r.sent,
            replied: r.replied,
        })
    }

    /// Sends `signal` (e.g. `STOP`, `KILL`, `TERM`, `CONT`) to `pid` in the
    /// guest (a negative pid: its process group); see [`Guest::act`].
    pub fn kill(&self, pid: i64, signal: &str) -> Result<Effect, String> {
        self.act(&format!("kill -{signal} {pid}"))
    }

    /// Freezes the whole guest (QMP `stop`): its vCPU, its clocks and the
    /// emulated watchdog all stand still, so no watchdog fires while paused.
    pub fn pause(&self) -> Result<(), String> {
        self.qmp.stop()
    }

    /// Resumes a paused guest. Its clock resumes where it stopped, so it is
    /// now behind the host by the pause: the clock-offset samples are reset.
    pub fn resume(&self) -> Result<(), String> {
        self.qmp.cont()?;
        self.offset.lock().unwrap().clear();
        Ok(())
    }

    /// Cuts (`false`) or restores the guest's network link (QMP `set_link`
    /// on its NIC: the guest sees carrier loss, packets are dropped both ways).
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        self.qmp.set_link("nic0", up)
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One line from the control channel; `None` if nothing complete arrived
/// within `wait`.
fn read_line(ctl: &mut Ctl, wait: Duration) -> Result<Option<String>, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(i) = ctl.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = ctl.buf.drain(..=i).collect();
            return Ok(Some(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        ctl.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 65536];
        match ctl.stream.read(&mut b) {
            Ok(0) => return Err("control channel closed (QEMU exited?)".into()),
            Ok(n) => ctl.buf.extend_from_slice(&b[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.qemu.lock().unwrap_or_else(|e| e.into_inner()).kill();
        if std::thread::panicking() {
            eprintln!(
                "--- guest {} console ({}) ---\n{}\n--- end ---",
                self.spec.name,
                self.console.display(),
                tail(&self.console_log(), 60)
            );
        }
        if std::env::var_os("LEASEDOG_LAB_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("guest {}: kept {}", self.spec.name, d.keep().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "hello\nworld'\"$x\0\u{ff}"] {
            let e = b64encode(s.as_bytes());
            assert_eq!(b64decode(&e).unwrap(), s.as_bytes(), "{s:?} -> {e}");
        }
        assert_eq!(b64encode(b"abcd"), "YWJjZA==");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
