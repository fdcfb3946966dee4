//! The lab's scenarios: a real etcd on the host, leasedog in QEMU guests with
//! real kernel watchdogs, a fault applied to the leader, and the host's own
//! clock (CLOCK_BOOTTIME) recording when the fault took effect, when QEMU saw
//! the reset, when etcd deleted the leader key and when another node took it.
//!
//! The fencing slack of a trial is `key deleted - reset` (or `- step-down` for
//! the network cut): the claim is that it is greater than `R` every time.
//!
//! Each guest gets a host folder shared read-write at `/var/lib/leasedog`
//! (its config, audit log and the agent's stderr), so its records survive
//! its reset and the host reads them directly. The "other node" that takes
//! over is either a second guest or, cheaper, an agent on the host with a
//! fake device ([`Lab::host_replica`]).

use super::{host_boottime, Guest, GuestSpec, QmpEvent, SoftdogOpts, WatchdogAction, Watchdogs};
use crate::agent::AgentProcess;
use crate::etcd::{BlockingClient, EtcdServer, EventKind, KeyWatch, WatchEvent};
use crate::wait_until;
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lab's budget (docs/timing.md): T = 5 s, M = 2 s, R = 1 s, so W = 3 s.
pub const T: Duration = Duration::from_secs(5);
pub const M: Duration = Duration::from_secs(2);
pub const R: Duration = Duration::from_secs(1);
pub const W: Duration = Duration::from_secs(3);
/// Where a guest's shared folder is mounted (its audit dir).
pub const GUEST_DIR: &str = "/var/lib/leasedog";
const FAULT_DIR: &str = "/run/leasedog-fault";
const LONG: Duration = Duration::from_secs(60);

/// Which watchdogs a guest has and its agent arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dog {
    I6300esb,
    Softdog,
    Both,
}

impl Dog {
    pub fn name(self) -> &'static str {
        match self {
            Dog::I6300esb => "i6300esb",
            Dog::Softdog => "softdog",
            Dog::Both => "both",
        }
    }
}

/// The fencing scenarios measured by the benchmark (issue 4's 1-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 1: SIGSTOP of the agent.
    Stall,
    /// 2: the main loop blocked before renewals (fault hook), pinger alive.
    StuckRenewals,
    /// 3: QMP set_link off.
    NetCut,
    /// 4: SIGKILL of the agent.
    Crash,
    /// 5: SIGSTOP of the agent, then SIGKILL [`KILL_AFTER_STALL`] later (the
    /// OOM killer or an operator's `kill -9` of a hung agent). The close of
    /// the running device by the kernel pings it once, so the reset comes
    /// `W` after the kill, not after the last permitted ping.
    StallThenKill,
}

/// Scenario 5's delay between the stall and the kill (the lab measurement
/// that found the late reset used 2.56 s at `T = 5`, `W = 3`).
pub const KILL_AFTER_STALL: Duration = Duration::from_millis(2560);

impl Fault {
    pub fn number(self) -> u8 {
        match self {
            Fault::Stall => 1,
            Fault::StuckRenewals => 2,
            Fault::NetCut => 3,
            Fault::Crash => 4,
            Fault::StallThenKill => 5,
        }
    }
    pub fn from_number(n: u8) -> Option<Fault> {
        Some(match n {
            1 => Fault::Stall,
            2 => Fault::StuckRenewals,
            3 => Fault::NetCut,
            4 => Fault::Crash,
            5 => Fault::StallThenKill,
            _ => return None,
        })
    }
    pub fn title(self) -> &'static str {
        match self {
            Fault::Stall => "stalled agent (SIGSTOP)",
            Fault::StuckRenewals => "stalled renewals, live pinger",
            Fault::NetCut => "network cut (set_link off)",
            Fault::Crash => "crash (SIGKILL)",
            Fault::StallThenKill => "stalled, then killed (SIGSTOP, SIGKILL)",
        }
    }
}

/// Options of a guest node.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub dog: Dog,
    pub softdog_nowayout: bool,
    /// The same QEMU reboots the guest after a reset (see
    /// [`Guest::wait_rebooted`]); the i6300esb then resets instead of
    /// powering off.
    pub reboot: bool,
}

impl NodeOpts {
    pub fn new(dog: Dog) -> NodeOpts {
        NodeOpts {
            dog,
            softdog_nowayout: false,
            reboot: false,
        }
    }
}

/// An etcd on the host loopback, a scratch folder, and the agent binary.
pub struct Lab {
    pub etcd: EtcdServer,
    pub client: BlockingClient,
    pub bin: PathBuf,
    work: tempfile::TempDir,
    seq: std::sync::atomic::AtomicU32,
}

/// Refuses a leasedog binary built without `--features testing`: the
/// host replica's fake device and scenario 2's fault hook need it.
pub fn check_testing_build(bin: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = dir.path().join("probe.toml");
    let devices = format!(
        "[[watchdog.device]]\nkind = \"fake\"\nrecord = \"{}\"\n",
        dir.path().join("fake.wd").display()
    );
    let text = config_with(
        &LAB_BUDGET,
        "probe",
        "probe",
        "http://127.0.0.1:1",
        "refuse",
        &devices,
        "/nonexistent",
    )
    .replace("connect_timeout = 0.5", "connect_timeout = 0.1");
    fs::write(&cfg, text).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(bin)
        .args(["check", "--samples", "1", "--config"])
        .arg(&cfg)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if all.contains("only in test builds") {
        return Err(format!(
            "{} was built without the test hooks: build it with \
             `cargo build --features testing` (or point LEASEDOG_BIN at such a build)",
            bin.display()
        ));
    }
    Ok(())
}

/// The leader key's holder, from its JSON value.
pub fn holder(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    v.get("node")?.as_str().map(String::from)
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn from_ns(n: u64) -> Duration {
    Duration::from_nanos(n)
}

impl Lab {
    /// Starts etcd. `bin` is a leasedog binary built with `--features
    /// testing` (fault hook, fake devices).
    pub fn start(bin: &Path) -> Result<Lab, String> {
        if !bin.is_file() {
            return Err(format!(
                "no leasedog binary at {} (cargo build --features testing)",
                bin.display()
            ));
        }
        check_testing_build(bin)?;
        let etcd = EtcdServer::start().map_err(|e| format!("etcd: {e}"))?;
        let client =
            BlockingClient::connect(&etcd.endpoints()).map_err(|e| format!("etcd: {e}"))?;
        // Short and comma-free: the guests' shares live under it.
        // `LEASEDOG_LAB_KEEP` keeps it, like the guests' own folders: the
        // agents' logs and audit logs live here.
        let work = tempfile::Builder::new()
            .prefix("ldlab-")
            .disable_cleanup(std::env::var_os("LEASEDOG_LAB_KEEP").is_some())
            .tempdir_in("/tmp")
            .map_err(|e| format!("temp folder: {e}"))?;
        Ok(Lab {
            etcd,
            client,
            bin: bin.to_path_buf(),
            work,
            seq: Default::default(),
        })
    }

    /// The lab's scratch folder on the host.
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// A fresh scope name (each trial races for its own key).
    pub fn new_scope(&self) -> String {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("lab{}-{n}", std::process::id())
    }

    pub fn key(scope: &str) -> String {
        format!("/leasedog/{scope}/leader")
    }

    /// A watch on the scope's leader key (host-clock timestamps).
    pub fn watch(&self, scope: &str) -> Result<KeyWatch, String> {
        KeyWatch::start(&self.etcd.endpoints(), &Lab::key(scope)).map_err(|e| format!("watch: {e}"))
    }

    /// Boots a guest named `name` with the watchdogs `opts` asks for and a
    /// shared folder at [`GUEST_DIR`].
    pub fn boot_node(&self, name: &str, opts: &NodeOpts) -> Result<Node, String> {
        let share = self.work.path().join(format!(
            "{name}-{}",
            self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        fs::create_dir_all(&share).map_err(|e| format!("{}: {e}", share.display()))?;
        let softdog = matches!(opts.dog, Dog::Softdog | Dog::Both).then_some(SoftdogOpts {
            margin: 30,
            nowayout: opts.softdog_nowayout,
        });
        let guest = Guest::boot(GuestSpec {
            name: name.into(),
            watchdogs: Watchdogs {
                i6300esb: matches!(opts.dog, Dog::I6300esb | Dog::Both),
                i6300esb_nowayout: false,
                softdog,
            },
            watchdog_action: if opts.reboot {
                WatchdogAction::Reset
            } else {
                WatchdogAction::Poweroff
            },
            rw_shares: vec![(share.clone(), GUEST_DIR.into())],
            reboot: opts.reboot,
            ..GuestSpec::default()
        })?;
        Ok(Node {
            name: name.into(),
            guest,
            share,
            dog: opts.dog,
            agent: None,
        })
    }

    /// The config of an agent in a guest.
    pub fn guest_config(&self, scope: &str, node: &Node, nowayout: &str) -> Result<String, String> {
        let ports = [self.etcd.client_port()];
        self.guest_config_with(scope, node, nowayout, &ports)
    }

    /// The config of an agent in a guest whose etcd members listen on the
    /// host loopback's `etcd_ports` (reached through 10.0.2.2).
    pub fn guest_config_with(
        &self,
        scope: &str,
        node: &Node,
        nowayout: &str,
        etcd_ports: &[u16],
    ) -> Result<String, String> {
        let mut devices = String::new();
        if matches!(node.dog, Dog::I6300esb | Dog::Both) {
            let d = node
                .guest
                .watchdog("i6300ESB")
                .ok_or("the guest has no i6300ESB device")?;
            devices.push_str(&format!(
                "[[watchdog.device]]\nkind = \"device\"\npath = \"{}\"\n",
                d.dev
            ));
        }
        if matches!(node.dog, Dog::Softdog | Dog::Both) {
            devices.push_str("[[watchdog.device]]\nkind = \"softdog\"\n");
        }
        let endpoints = etcd_ports
            .iter()
            .map(|p| format!("http://10.0.2.2:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(config_with(
            &LAB_BUDGET,
            scope,
            &node.name,
            &endpoints,
            nowayout,
            &devices,
            GUEST_DIR,
        ))
    }

    /// An agent on the host with a fake device: the replica that takes the
    /// key over when the guest's lease expires.
    pub fn host_replica(&self, scope: &str, name: &str) -> Result<AgentProcess, String> {
        let dir = self.work.path().join(format!("{name}-{scope}"));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let devices = format!(
            "[[watchdog.device]]\nkind = \"fake\"\nrecord = \"{}\"\n",
            dir.join("fake.wd").display()
        );
        let cfg = config_with(
            &LAB_BUDGET,
            scope,
            name,
            &self.etcd.client_url(),
            "keep-pinging",
            &devices,
            &dir.join("audit").to_string_lossy(),
        );
        AgentProcess::spawn(&self.bin, name, &cfg, &[]).map_err(|e| format!("host agent: {e}"))
    }

    /// The host replica's audit log.
    pub fn replica_audit(&self, scope: &str, name: &str) -> PathBuf {
        self.work
            .path()
            .join(format!("{name}-{scope}"))
            .join("audit")
            .join(format!("{name}.audit.jsonl"))
    }
}

/// A lab agent's timing budget, as written into its configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabBudget {
    pub ttl: u64,
    pub margin: f64,
    pub allowance: f64,
    pub loop_interval: f64,
    pub request_timeout: f64,
    pub connect_timeout: f64,
}

/// The budget of the lab's measurements (docs/timing.md's lab figures, the
/// fault matrix): T = 5, M = 2, R = 1, loop 0.5 s, request timeout 0.4 s.
pub const LAB_BUDGET: LabBudget = LabBudget {
    ttl: T.as_secs(),
    margin: 2.0,
    allowance: 1.0,
    loop_interval: 0.5,
    request_timeout: 0.4,
    connect_timeout: 0.5,
};

/// The systemd guests' budget: T = 10, M = 4, R = 1, requests 1.5 s. They
/// check what systemd and the package do (the unit, its cgroup, a reboot
/// after a reset), not failover times; a whole Debian under systemd on one
/// emulated vCPU leaves the agent so little of it that its 0.4 s requests
/// timed out for seconds at a time (CI, stop 19), and the guest lost its
/// lease before the fault. The fence itself does not depend on the budget:
/// `W = T - M` still fires before the lease can expire.
pub const SYSTEMD_BUDGET: LabBudget = LabBudget {
    ttl: 10,
    margin: 4.0,
    allowance: 1.0,
    loop_interval: 0.5,
    request_timeout: 1.5,
    connect_timeout: 1.0,
};

/// The agent configuration used throughout the lab (`b`: [`LAB_BUDGET`]
/// unless the test says otherwise). `endpoint` may list several etcd
/// members, comma-separated.
pub fn config_with(
    b: &LabBudget,
    scope: &str,
    node: &str,
    endpoint: &str,
    nowayout: &str,
    devices: &str,
    audit_dir: &str,
) -> String {
    let endpoints = endpoint
        .split(',')
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"scope = "{scope}"
node = "{node}"
[etcd]
endpoints = [{endpoints}]
request_timeout = {request_timeout}
connect_timeout = {connect_timeout}
[timing]
ttl = {ttl}
safety_margin = {margin:?}
reset_allowance = {allowance:?}
loop_interval = {loop_interval}
[watchdog]
mode = "required"
nowayout = "{nowayout}"
ping_interval = 0.1
{devices}
[audit]
dir = "{audit_dir}"
"#,
        request_timeout = b.request_timeout,
        connect_timeout = b.connect_timeout,
        ttl = b.ttl,
        margin = b.margin,
        allowance = b.allowance,
        loop_interval = b.loop_interval,
    )
}

/// A guest running (or about to run) leasedog.
pub struct Node {
    pub name: String,
    pub guest: Guest,
    /// The host folder shared at [`GUEST_DIR`].
    pub share: PathBuf,
    pub dog: Dog,
    /// The agent's guest pid.
    pub agent: Option<u32>,
}

impl Node {
    /// Writes the config into the shared folder and starts the agent
    /// (`bin`, a host path), its stderr appended to `agent.log` there (kept
    /// across a reset). Returns its guest pid.
    pub fn start_agent(&mut self, bin: &Path, config: &str) -> Result<u32, String> {
        fs::write(self.share.join("leasedog.toml"), config).map_err(|e| e.to_string())?;
        let p = self.guest.spawn(&format!(
            "mkdir -p {FAULT_DIR}; exec env LEASEDOG_LOG=debug LEASEDOG_FAULT_DIR={FAULT_DIR} \
             {bin} run --config {GUEST_DIR}/leasedog.toml 2>>{GUEST_DIR}/agent.log",
            bin = super::shell_quote(&bin.to_string_lossy()),
        ))?;
        self.agent = Some(p.pid);
        Ok(p.pid)
    }

    /// The running agent's pid (error if none was started).
    pub fn pid(&self) -> Result<i64, String> {
        self.agent
            .map(|p| p as i64)
            .ok_or_else(|| format!("{}: no agent started", self.name))
    }

    /// The agent's stderr so far (read on the host).
    pub fn agent_log(&self) -> String {
        strip_ansi(&fs::read_to_string(self.share.join("agent.log")).unwrap_or_default())
    }

    /// The agent's audit log on the host.
    pub fn audit_path(&self) -> PathBuf {
        self.share.join(format!("{}.audit.jsonl", self.name))
    }

    /// The audit records (parsed JSON lines; a torn last line is skipped).
    pub fn audit(&self) -> Vec<Value> {
        audit_records(&self.audit_path())
    }

    /// Waits until the agent logged `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.agent_log().contains(needle))
    }
}

/// Parsed JSON lines of an audit log.
pub fn audit_records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first record of `event` in `records`.
pub fn first_event<'a>(records: &'a [Value], event: &str) -> Option<&'a Value> {
    records.iter().find(|r| r["event"] == event)
}

/// What one trial of a fencing scenario measured, on the host's
/// CLOCK_BOOTTIME.
#[derive(Debug, Clone)]
pub struct Trial {
    pub fault: Fault,
    pub dog: Dog,
    /// Guest boot to its control shell.
    pub boot: Duration,
    /// The whole trial, boot included.
    pub wall: Duration,
    /// The guest's agent won the key (watch receipt).
    pub acquired: Duration,
    /// The fault took effect (the guest's clock after the action, mapped to
    /// the host; for the network cut: just before QMP `set_link`).
    pub fault_at: Duration,
    /// QEMU's reset event (name, host time), if one came.
    pub reset: Option<(String, Duration)>,
    /// Scenario 3: when the agent's deadline timer fenced (stepped down),
    /// from its log, mapped to the host clock; and the deadline s + T - M.
    pub step_down: Option<Duration>,
    pub step_down_deadline: Option<Duration>,
    /// etcd deleted the leader key (watch receipt).
    pub key_deleted: Option<Duration>,
    /// The other node's Put of the key (watch receipt).
    pub new_leader: Option<Duration>,
    pub notes: Vec<String>,
    /// With `reboot`: `leasedog audit timeline`'s exit code and text.
    pub audit_timeline: Option<(i32, String)>,
    /// The guest agent's audit log (on the host, in the lab's folder).
    pub guest_audit: PathBuf,
}

fn secs_f(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn diff(a: Duration, b: Duration) -> f64 {
    secs_f(a) - secs_f(b)
}

impl Trial {
    /// When the old leader was fenced: the reset, or the step-down for the
    /// network cut (whichever came first there).
    pub fn fenced_at(&self) -> Option<Duration> {
        let reset = self.reset.as_ref().map(|r| r.1);
        match self.fault {
            Fault::NetCut => match (self.step_down, reset) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            _ => reset,
        }
    }

    /// key deleted - fenced, seconds.
    pub fn slack(&self) -> Option<f64> {
        Some(diff(self.key_deleted?, self.fenced_at()?))
    }

    /// fault -> the other node holds the key, seconds.
    pub fn failover(&self) -> Option<f64> {
        Some(diff(self.new_leader?, self.fault_at))
    }

    pub fn to_json(&self) -> Value {
        let rel = |d: Option<Duration>| d.map(|d| diff(d, self.fault_at));
        json!({
            "scenario": self.fault.number(),
            "title": self.fault.title(),
            "watchdog": self.dog.name(),
            "boot_s": secs_f(self.boot),
            "wall_s": secs_f(self.wall),
            "fault_boottime_s": secs_f(self.fault_at),
            "reset_event": self.reset.as_ref().map(|r| r.0.clone()),
            "reset_after_fault_s": rel(self.reset.as_ref().map(|r| r.1)),
            "step_down_after_fault_s": rel(self.step_down),
            "step_down_deadline_after_fault_s": rel(self.step_down_deadline),
            "key_deleted_after_fault_s": rel(self.key_deleted),
            "new_leader_after_fault_s": rel(self.new_leader),
            "slack_s": self.slack(),
            "failover_s": self.failover(),
            "notes": self.notes,
        })
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let rel = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:+.3}", diff(d, self.fault_at))
            })
        };
        format!(
            "scenario {} ({}, {}): reset {} {}, step-down {}, key deleted {}, new leader {} \
             (s after the fault); slack {}; boot {:.1} s, trial {:.1} s",
            self.fault.number(),
            self.fault.title(),
            self.dog.name(),
            self.reset.as_ref().map_or("none", |r| r.0.as_str()),
            rel(self.reset.as_ref().map(|r| r.1)),
            rel(self.step_down),
            rel(self.key_deleted),
            rel(self.new_leader),
            self.slack().map_or("-".into(), |s| format!("{s:.3} s")),
            secs_f(self.boot),
            secs_f(self.wall),
        )
    }
}

/// The `at=` value of the agent's "deadline timer fenced the node" line (its
/// CLOCK_BOOTTIME, seconds) and the `s=` it judged.
pub fn parse_timer_fence(log: &str) -> Option<(Duration, Duration)> {
    let line = log
        .lines()
        .find(|l| l.contains("deadline timer fenced the node"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.trim_matches(',').parse::<f64>().ok())
            .filter(|v| *v >= 0.0)
            .map(Duration::from_secs_f64)
    };
    Some((field("at=")?, field("s=")?))
}

/// The name the guest's agent uses in the trials.
pub const GUEST_NODE: &str = "guest1";
/// The host replica's name.
pub const HOST_NODE: &str = "host2";

/// A started leader: a guest whose agent holds the key, a host replica
/// ready to take over, and the key's watch.
pub struct Setup {
    pub scope: String,
    pub node: Node,
    pub replica: AgentProcess,
    pub watch: KeyWatch,
    pub acquired: Duration,
    pub t0: Instant,
}

/// Boots a guest with `opts`, starts its agent (nowayout policy
/// `keep-pinging`), waits until it holds the key and promoted, then starts
/// the host replica.
pub fn setup_leader(lab: &Lab, opts: &NodeOpts) -> Result<Setup, String> {
    let t0 = Instant::now();
    let scope = lab.new_scope();
    let watch = lab.watch(&scope)?;
    let mut node = lab.boot_node(GUEST_NODE, opts)?;
    let cfg = lab.guest_config(&scope, &node, "keep-pinging")?;
    node.start_agent(&lab.bin, &cfg)?;
    let won = watch
        .wait_for(
            |e| e.kind == EventKind::Put && holder(&e.value).as_deref() == Some(GUEST_NODE),
            LONG,
        )
        .ok_or_else(|| {
            format!(
                "the guest's agent did not win the key within {LONG:?}; its log:\n{}",
                node.agent_log()
            )
        })?;
    if !node.wait_log("promoted (leader", Duration::from_secs(30)) {
        return Err(format!(
            "the guest's agent won but did not promote; its log:\n{}",
            node.agent_log()
        ));
    }
    let replica = lab.host_replica(&scope, HOST_NODE)?;
    // Let the replica see the key and the leader settle into its pings.
    if !wait_until(Duration::from_secs(20), || {
        replica.log().contains("connected to etcd")
    }) {
        return Err(format!(
            "the host replica did not connect:\n{}",
            replica.log()
        ));
    }
    std::thread::sleep(Duration::from_secs(1));
    if let Some(r) = node.guest.reset_time() {
        return Err(format!(
            "the guest reset while healthy: {r:?}\n{}",
            node.agent_log()
        ));
    }
    Ok(Setup {
        scope,
        node,
        replica,
        watch,
        acquired: from_ns(won.boottime_ns),
        t0,
    })
}

fn delete_after(watch: &KeyWatch, after: Duration, timeout: Duration) -> Option<WatchEvent> {
    watch.wait_for(
        |e| e.kind == EventKind::Delete && e.boottime_ns >= ns(after),
        timeout,
    )
}

fn put_by(watch: &KeyWatch, who: &str, after: Duration, timeout: Duration) -> Option<WatchEvent> {
    watch.wait_for(
        |e| {
            e.kind == EventKind::Put
                && e.boottime_ns >= ns(after)
                && holder(&e.value).as_deref() == Some(who)
        },
        timeout,
    )
}

/// Applies `fault` to the guest's agent; the host time it took effect.
pub fn apply_fault(node: &Node, fault: Fault) -> Result<Duration, String> {
    let pid = node.pid()?;
    Ok(match fault {
        Fault::Stall => node.guest.kill(pid, "STOP")?.host,
        Fault::Crash => node.guest.kill(pid, "KILL")?.host,
        Fault::StallThenKill => {
            let at = node.guest.kill(pid, "STOP")?.host;
            std::thread::sleep(KILL_AFTER_STALL.saturating_sub(host_boottime().saturating_sub(at)));
            node.guest.kill(pid, "KILL")?;
            at
        }
        Fault::StuckRenewals => {
            node.guest
                .act(&format!("touch {FAULT_DIR}/block-renewals"))?
                .host
        }
        Fault::NetCut => {
            let at = host_boottime();
            node.guest.set_link(false)?;
            at
        }
    })
}

/// One trial of a fencing scenario (1-4) with the host replica as the
/// other node. With `reboot` (scenario 1's audit check), the guest reboots
/// after its reset, its agent starts again on the same audit folder, and
/// `leasedog audit timeline` is run over both nodes' logs.
pub fn run_trial(lab: &Lab, fault: Fault, dog: Dog, reboot: bool) -> Result<Trial, String> {
    let opts = NodeOpts {
        dog,
        softdog_nowayout: false,
        reboot,
    };
    let mut st = setup_leader(lab, &opts)?;
    let mut notes = Vec::new();
    let fault_at = apply_fault(&st.node, fault)?;
    let g = &st.node.guest;
    let reset_wait = if fault == Fault::NetCut {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(30)
    };
    if fault == Fault::StuckRenewals {
        // The pinger thread is alive: the process is running, not stopped.
        std::thread::sleep(Duration::from_millis(500));
        match g.run(
            &format!("grep State /proc/{}/status", st.node.pid()?),
            Duration::from_secs(10),
        ) {
            Ok(r) if g.reset_time().is_none() => {
                notes.push(format!("agent during the fault: {}", r.output.trim()))
            }
            _ => {}
        }
    }
    let reset: Option<QmpEvent> = g.wait_reset(reset_wait);
    if reset.is_none() && fault != Fault::NetCut {
        return Err(format!(
            "scenario {}: no reset within {reset_wait:?} of the fault; agent log:\n{}",
            fault.number(),
            st.node.agent_log()
        ));
    }
    let deleted = delete_after(&st.watch, fault_at, Duration::from_secs(30));
    let new_leader = put_by(&st.watch, HOST_NODE, fault_at, Duration::from_secs(30));
    let (mut step_down, mut step_down_deadline) = (None, None);
    if fault == Fault::NetCut {
        // The main loop's own deadline check (rule 3 inside the loop) or
        // the independent deadline timer, whichever acted: the audit's
        // step_down_begun record (its boot clock) has the moment and s+T-M.
        let recs = st.node.audit();
        if let Some(r) = recs.iter().rev().find(|r| r["event"] == "step_down_begun") {
            step_down = r["boot_ns"]
                .as_u64()
                .and_then(|n| g.guest_to_host(from_ns(n)));
            step_down_deadline = r["deadline_ns"]
                .as_u64()
                .filter(|n| *n > 0)
                .and_then(|n| g.guest_to_host(from_ns(n)));
            notes.push(format!("step-down reason {}", r["reason"]));
        } else {
            notes.push("the audit has no step_down_begun record".into());
        }
        if let Some((at, s)) = parse_timer_fence(&st.node.agent_log()) {
            notes.push("the deadline timer fenced".into());
            let at = g.guest_to_host(at);
            if step_down.is_none() || at < step_down {
                step_down = at;
                step_down_deadline = g.guest_to_host(s + T - M);
            }
        }
    }
    if let Some(r) = &reset {
        if r.boottime < fault_at {
            notes.push("reset BEFORE the fault took effect".into());
        }
    }
    let mut trial = Trial {
        fault,
        dog,
        boot: g.boot_time(),
        wall: Duration::ZERO,
        acquired: st.acquired,
        fault_at,
        reset: reset.map(|r| {
            let name = match r.data.get("action").and_then(Value::as_str) {
                Some(a) => format!("{} ({a})", r.name),
                None => r.name.clone(),
            };
            (name, r.boottime)
        }),
        step_down,
        step_down_deadline,
        key_deleted: deleted.map(|e| from_ns(e.boottime_ns)),
        new_leader: new_leader.map(|e| from_ns(e.boottime_ns)),
        notes,
        audit_timeline: None,
        guest_audit: st.node.audit_path(),
    };
    if reboot && trial.reset.is_some() {
        let after = st.node.guest.wait_rebooted(Duration::from_secs(120))?;
        trial.notes.push(format!(
            "rebooted: control shell {:.1} s after the reset",
            secs_f(after)
        ));
        let before = st.node.audit().len();
        let cfg =
            fs::read_to_string(st.node.share.join("leasedog.toml")).map_err(|e| e.to_string())?;
        st.node.start_agent(&lab.bin, &cfg)?;
        if !wait_until(Duration::from_secs(30), || {
            st.node
                .audit()
                .iter()
                .skip(before)
                .any(|r| r["event"] == "startup")
        }) {
            return Err(format!(
                "no start-up record after the reboot; agent log:\n{}",
                st.node.agent_log()
            ));
        }
        // Let it see the replica's key (a leader_seen record).
        std::thread::sleep(Duration::from_secs(2));
        trial.audit_timeline = Some(audit_timeline(
            &lab.bin,
            &[
                st.node.audit_path(),
                lab.replica_audit(&st.scope, HOST_NODE),
            ],
            Some(&st.replica.dir().join("leasedog.toml")),
        )?);
    }
    trial.wall = st.t0.elapsed();
    Ok(trial)
}

/// `leasedog switchover --to`, asked again (up to 60 s) while the leader
/// refuses because the target's member record does not show a running
/// replica yet (it is published every few loops, after the state changes).
pub fn switchover(lab: &Lab, cfg: &Path, to: &str) -> (i32, String) {
    let t = Instant::now();
    loop {
        let r = switchover_once(lab, cfg, to);
        if r.0 == 0
            || !r.1.contains("not a running replica")
            || t.elapsed() > Duration::from_secs(60)
        {
            return r;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One `leasedog switchover --to` with `cfg`: exit code and output.
pub fn switchover_once(lab: &Lab, cfg: &Path, to: &str) -> (i32, String) {
    match std::process::Command::new(&lab.bin)
        .args(["switchover", "--to", to, "--wait", "120", "--config"])
        .arg(cfg)
        .output()
    {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (-1, e.to_string()),
    }
}

/// Runs `leasedog audit timeline` over `logs` (with `config` to read etcd's
/// mirrored history, else `--no-etcd`): exit code and stdout (+ stderr).
pub fn audit_timeline(
    bin: &Path,
    logs: &[PathBuf],
    config: Option<&Path>,
) -> Result<(i32, String), String> {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["audit", "timeline"]).args(logs);
    match config {
        Some(c) => cmd.arg("--config").arg(c),
        None => cmd.arg("--no-etcd"),
    };
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        text.push_str(&err);
    }
    Ok((out.status.code().unwrap_or(-1), text))
}

/// The text without ANSI escape sequences (the agent colours its log).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_fence_is_parsed_from_a_coloured_log() {
        let log = "\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m deadline timer fenced the node: nothing \
                   \u{1b}[3ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m10.5 \u{1b}[3mat\u{1b}[0m\u{1b}[2m=\u{1b}[0m13.6";
        let (at, s) = parse_timer_fence(&strip_ansi(log)).unwrap();
        assert_eq!(at, Duration::from_secs_f64(13.6));
        assert_eq!(s, Duration::from_secs_f64(10.5));
    }

    #[test]
    fn config_fits_the_lab_budget() {
        let c = config_with(
            &LAB_BUDGET,
            "s",
            "n",
            "http://10.0.2.2:1",
            "refuse",
            "",
            "/x",
        );
        assert!(c.contains("ttl = 5") && c.contains("safety_margin = 2.0"));
    }

    /// Both budgets are ones the agent itself accepts (a refused config
    /// would only show as a guest that never leads), with the values given.
    #[test]
    fn both_lab_budgets_pass_the_agents_own_validation() {
        let dev = "[[watchdog.device]]\nkind = \"softdog\"\n";
        for b in [LAB_BUDGET, SYSTEMD_BUDGET] {
            let c = config_with(&b, "s", "n", "http://10.0.2.2:1", "refuse", dev, "/x");
            let cfg =
                leasedog::config::Config::parse(&c).unwrap_or_else(|e| panic!("{b:?}: {e}\n{c}"));
            let budget = cfg.budget().unwrap_or_else(|e| panic!("{b:?}: {e}"));
            assert_eq!(budget.ttl, Duration::from_secs(b.ttl), "{c}");
            assert_eq!(
                budget.request_timeout,
                Duration::from_secs_f64(b.request_timeout)
            );
        }
    }
}

/// One VM-pause trial (issue 10 item 12: a limit of any lease, measured, not
/// fixed): the leader guest is frozen with QMP `stop` for `pause`, while the
/// host replica takes the key after the lease expires; then `cont`. The
/// guest's clocks and its emulated watchdog stood still, so on resuming it
/// believes its evidence fresh until etcd tells it otherwise.
#[derive(Debug, Clone)]
pub struct PauseTrial {
    pub dog: Dog,
    pub pause: Duration,
    /// Host instants: QMP `stop`, the replica's key, QMP `cont`.
    pub stopped_at: Duration,
    pub new_leader: Option<Duration>,
    pub resumed_at: Duration,
    /// The old leader's `step_down_begun`, mapped to the host clock with an
    /// offset taken after resume. Its pings stopped before it (the core
    /// publishes "no evidence" before the record), so pings after the resume
    /// are bounded by this window; the pinger's summaries are too coarse
    /// (every 10 s, counting pings from before the pause) to count them.
    pub step_down: Option<Duration>,
    pub step_down_reason: Option<String>,
    /// QEMU's reset event after the resume, if the watchdog fired.
    pub reset_after_resume: Option<Duration>,
    pub wall: Duration,
}

impl PauseTrial {
    /// How long after `cont` the old leader still believed it led.
    pub fn believed_leader_for(&self) -> Option<Duration> {
        self.step_down.map(|s| s.saturating_sub(self.resumed_at))
    }

    /// How long two nodes believed they led: from the replica's key (or
    /// the resume, whichever is later) to the old leader's step-down.
    pub fn overlap(&self) -> Option<Duration> {
        let from = self.new_leader?.max(self.resumed_at);
        self.step_down.map(|s| s.saturating_sub(from))
    }
}

/// Freezes the leader guest for `pause`, resumes it, and measures how long it
/// goes on believing it leads (see [`PauseTrial`]).
pub fn pause_trial(lab: &Lab, dog: Dog, pause: Duration) -> Result<PauseTrial, String> {
    let st = setup_leader(lab, &NodeOpts::new(dog))?;
    let g = &st.node.guest;
    let before = g.probe_clock()?;
    let stopped_at = host_boottime();
    g.pause()?;
    // The guest's clock stands still from here: a record stamped later than
    // this guest instant was written after the resume.
    let guest_frozen = stopped_at.saturating_sub(before);
    std::thread::sleep(pause);
    let new_leader =
        put_by(&st.watch, HOST_NODE, stopped_at, Duration::ZERO).map(|e| from_ns(e.boottime_ns));
    let resumed_at = host_boottime();
    g.resume()?;
    g.probe_clock()?;
    let stepped = wait_until(Duration::from_secs(20), || {
        st.node.audit().iter().any(|r| {
            r["event"] == "step_down_begun" && r["boot_ns"].as_u64() > Some(ns(guest_frozen))
        })
    });
    // Long enough for a reset to show if the device was left to fire.
    let reset_after_resume = g.wait_reset(W + Duration::from_secs(2)).map(|e| e.boottime);
    let recs = st.node.audit();
    let after = |r: &&Value| r["boot_ns"].as_u64() > Some(ns(guest_frozen));
    let down = recs
        .iter()
        .filter(after)
        .find(|r| r["event"] == "step_down_begun");
    let step_down = down
        .and_then(|r| r["boot_ns"].as_u64())
        .and_then(|n| g.guest_to_host(from_ns(n)));
    if !stepped {
        return Err(format!(
            "the resumed leader never stepped down; its log:\n{}",
            st.node.agent_log()
        ));
    }
    Ok(PauseTrial {
        dog,
        pause,
        stopped_at,
        new_leader,
        resumed_at,
        step_down,
        step_down_reason: down.map(|r| r["reason"].to_string()),
        reset_after_resume,
        wall: st.t0.elapsed(),
    })
}
