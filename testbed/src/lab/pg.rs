//! The whole promise, end to end (issue 14): leasedog with PostgreSQL 15 in a
//! lab guest with a real watchdog, a host node (PostgreSQL + agent with a
//! fake device and the reset stand-in) as its synchronous standby, clients on
//! the host recording a history, one fault, and the checker's verdict.
//!
//! - The guest's data directory is a copy of a template made once on the
//!   host ([`lab_template`]: the testbed's initdb'd cluster, listening on the
//!   guest's 10.0.2.15 as well, trusting the host's 10.0.2.2), copied into
//!   the guest's tmpfs and started there as the primary before its agent.
//! - Addresses are asymmetric: the guest's PostgreSQL listens on a port `G`
//!   forwarded from the host's 127.0.0.1:`G` (the same number on both sides,
//!   [`GuestSpec::forward_tcp_fixed`]), so its member record
//!   (`127.0.0.1:G`) is right for the host; the host node advertises
//!   `10.0.2.2:H`, right for the guest (QEMU's forward to the host loopback).
//! - The host node is a copy of the same template started as a standby of
//!   the guest (a copy of a cleanly stopped cluster is a base backup): no
//!   `pg_basebackup` through QEMU's user network.
//! - Clients ([`crate::clients`]): a writer connecting per insert to the
//!   first read-write node (`target_session_attrs=read-write`, each node in
//!   turn within 1 s, as libpq walks a multi-host string), a writer with a
//!   kept connection to each node, and a probe asking each node
//!   `pg_is_in_recovery()` (a loop per node), all every 50-100 ms.
//! - Faults ([`PgFault`]): e.g. SIGSTOP of the guest's agent, or of the
//!   agent and every PostgreSQL process: the guest's watchdog resets it; the
//!   host node takes the key and promotes. One kind is no fault: a planned
//!   switchover to the host node, asked with the real CLI. The history is checked with
//!   [`crate::history::check`] (terms from the key's watch), and, after the
//!   guest rebooted and its agent wrote its start-up record,
//!   `leasedog audit timeline` runs over both nodes' logs.
//! - [`run_pg_trial_with`] takes the standby as a [`Standby`]: the host node
//!   above, or a second guest with a real watchdog of its own
//!   ([`super::second`]); then the leader advertises 10.0.2.2, where the
//!   second guest reaches it.

use super::scenario::{
    audit_timeline, config_with, holder, switchover_once, Dog, Lab, LabBudget, Node, GUEST_DIR,
    GUEST_NODE, HOST_NODE, SYSTEMD_BUDGET, T,
};
use super::second::{Behind, Second, Standby};
use super::{host_boottime, shell_quote, Guest, GuestSpec, SoftdogOpts, WatchdogAction, Watchdogs};
use crate::agent::AgentProcess;
use crate::clients::{self, Attempt, Every, Target};
use crate::etcd::{EtcdCluster, EventKind, KeyWatch};
use crate::fence::FakeWatchdogMonitor;
use crate::history::{self, History, Verdict};
use crate::pg::{free_port, psql, PgNode, BIN_DIR};
use crate::view;
use crate::wait_until;
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's PostgreSQL: socket folder and data directory (tmpfs).
pub const GUEST_PG: &str = "/run/pg";
/// Where a data directory that survives the guest's reset lives (a host
/// folder shared over 9p, as a disk would).
pub const GUEST_PG_DISK: &str = "/var/lib/leasedog-pg";
/// Bump when the template's settings change.
const TEMPLATE_VERSION: &str = "v3";
/// The clients' period.
pub const EVERY: Every = Every {
    min: Duration::from_millis(50),
    max: Duration::from_millis(100),
};
/// How long the clients run after the host node is writable.
const HOLD_AFTER_PROMOTION: Duration = Duration::from_secs(3);

/// The fault applied to the guest leader (the current primary). See
/// [`PgFault::expect`] for what each must (not) cause and docs/timing.md for
/// the measured figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgFault {
    /// SIGSTOP of the agent (PostgreSQL runs on until the reset).
    Stall,
    /// SIGSTOP of the agent and every PostgreSQL process.
    StallAll,
    /// SIGKILL of the agent: the kernel closes the armed device without the
    /// magic character, which pings it once and leaves it running.
    Kill,
    /// SIGKILL of the postmaster: the agent sees PostgreSQL down, steps down
    /// and releases the key (no reset), then follows the new leader.
    PgCrash,
    /// QMP `set_link off` on the guest's NIC, healed once the host node is
    /// writable.
    NetCut,
    /// QMP `stop` for 2T, then `cont`: the guest's clocks and emulated
    /// watchdog stand still (a limit of any lease, docs/timing.md).
    Pause,
    /// A SCHED_FIFO 99 busy loop per guest CPU, above the agent's real-time
    /// threads (priority 10): the pinger never runs again.
    CpuStarve,
    /// SIGKILL of the etcd raft leader (3 members), restarted 3 s later:
    /// the agents fail over to another member; leases survive.
    EtcdLeaderKill,
    /// Two of the three etcd members killed for T + 3 s, then restarted.
    EtcdQuorumLoss,
    /// `etcdctl del` of the leader key: a deletion is not an expiry.
    KeyDelete,
    /// [`PgFault::Stall`] on a guest whose data directory survives the reset
    /// (a 9p share, not tmpfs): after the reboot its agent must bring
    /// PostgreSQL back read-only, as a standby of the new primary.
    Reboot,
    /// Not a fault: `leasedog switchover --to` the host node, run on the
    /// host under the clients' load. The guest stops PostgreSQL (fast),
    /// waits for the host to receive its final WAL, hands the key over,
    /// and rejoins as a standby; its watchdog stays armed and pinged
    /// throughout, so no reset.
    Switchover,
}

/// What a fault must cause: `Some(true)` it must, `Some(false)` it must
/// not, `None` either is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub reset: Option<bool>,
    pub failover: Option<bool>,
}

impl PgFault {
    pub const ALL: [PgFault; 12] = [
        PgFault::Stall,
        PgFault::StallAll,
        PgFault::Kill,
        PgFault::PgCrash,
        PgFault::NetCut,
        PgFault::Pause,
        PgFault::CpuStarve,
        PgFault::EtcdLeaderKill,
        PgFault::EtcdQuorumLoss,
        PgFault::KeyDelete,
        PgFault::Reboot,
        PgFault::Switchover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PgFault::Stall => "stall",
            PgFault::StallAll => "stall-all",
            PgFault::Kill => "kill",
            PgFault::PgCrash => "pg-crash",
            PgFault::NetCut => "net-cut",
            PgFault::Pause => "pause",
            PgFault::CpuStarve => "cpu-starve",
            PgFault::EtcdLeaderKill => "etcd-leader",
            PgFault::EtcdQuorumLoss => "etcd-quorum",
            PgFault::KeyDelete => "key-delete",
            PgFault::Reboot => "reboot",
            PgFault::Switchover => "switchover",
        }
    }

    /// What the fault does, for a reader.
    pub fn title(self) -> &'static str {
        match self {
            PgFault::Stall => "the guest leader's agent stopped (SIGSTOP); its PostgreSQL runs on",
            PgFault::StallAll => {
                "the guest leader's agent and all its PostgreSQL stopped (SIGSTOP)"
            }
            PgFault::Kill => "the guest leader's agent killed (SIGKILL)",
            PgFault::PgCrash => "the guest leader's postmaster killed (SIGKILL)",
            PgFault::NetCut => "the guest leader's network cut (QMP set_link off)",
            PgFault::Pause => "the guest leader frozen for 2T (QMP stop, then cont)",
            PgFault::CpuStarve => "the guest leader's CPUs taken by SCHED_FIFO 99 busy loops",
            PgFault::EtcdLeaderKill => "the etcd raft leader killed, restarted 3 s later",
            PgFault::EtcdQuorumLoss => "two of the three etcd members killed for T + 3 s",
            PgFault::KeyDelete => "the leader key deleted by hand (etcdctl del)",
            PgFault::Reboot => {
                "the guest leader's agent stopped (SIGSTOP); its data directory survives a reset"
            }
            PgFault::Switchover => "a planned switchover to the host node (leasedog switchover)",
        }
    }

    pub fn parse(s: &str) -> Option<PgFault> {
        PgFault::ALL.into_iter().find(|f| f.name() == s)
    }

    /// The comma-separated names, for usage messages.
    pub fn names() -> String {
        PgFault::ALL.map(PgFault::name).join(",")
    }

    /// Runs against a 3-member etcd instead of the lab's single one.
    pub fn needs_cluster(self) -> bool {
        matches!(self, PgFault::EtcdLeaderKill | PgFault::EtcdQuorumLoss)
    }

    pub fn expect(self) -> Expect {
        let (reset, failover) = match self {
            PgFault::Stall
            | PgFault::StallAll
            | PgFault::Kill
            | PgFault::CpuStarve
            | PgFault::EtcdQuorumLoss
            | PgFault::Reboot => (Some(true), Some(true)),
            // The agent is alive: it steps down and releases the key.
            PgFault::PgCrash => (Some(false), Some(true)),
            // The leader hands the key over after its confirmed stop and
            // disarms only once the key is gone.
            PgFault::Switchover => (Some(false), Some(true)),
            // Pings stop at s + M - R; the watchdog fires at most W later,
            // before the link is healed; the deadline timer may fence first.
            PgFault::NetCut => (Some(true), Some(true)),
            // Frozen, the guest's watchdog cannot fire; resumed, it hears
            // from etcd within a loop or two and steps down, its device
            // possibly firing first.
            PgFault::Pause => (None, Some(true)),
            // Renewals go to another member; the new raft leader extends
            // every lease.
            PgFault::EtcdLeaderKill => (Some(false), Some(false)),
            // The old leader steps down, revokes its lease after the
            // confirmed stop; whoever wins, no reset.
            PgFault::KeyDelete => (Some(false), None),
        };
        Expect { reset, failover }
    }
}

const LAB_CONF: &str = "
# leasedog lab: the guest's forward arrives on 10.0.2.15; on the host the
# address does not exist and PostgreSQL only warns (127.0.0.1 is enough).
listen_addresses = '127.0.0.1,10.0.2.15'
";

/// In the guest, connections forwarded from the host come from 10.0.2.2.
const LAB_HBA: &str = "
host    all             postgres 10.0.2.2/32    trust
host    replication     postgres 10.0.2.2/32    trust
";

/// The lab's data directory template on the host, made once per machine
/// from the testbed's (owned by `postgres`, mode 700). Both nodes start
/// from a copy of it.
pub fn lab_template() -> Result<PathBuf, String> {
    let dir = PathBuf::from(format!(
        "/tmp/leasedog-pg15-lab-template-{TEMPLATE_VERSION}"
    ));
    if dir.join("PG_VERSION").exists() {
        return Ok(dir);
    }
    let base = PgNode::init(free_port());
    append(&base.data_dir().join("postgresql.conf"), LAB_CONF)?;
    append(&base.data_dir().join("pg_hba.conf"), LAB_HBA)?;
    // Started and stopped cleanly once, so that its control file carries
    // the settings (a standby refuses a max_connections lower than its
    // primary's, pg_rewind wants wal_log_hints): initdb wrote its defaults.
    base.start();
    base.stop();
    let tmp = PathBuf::from(format!("{}.{}", dir.display(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    cp_a(&base.data_dir(), &tmp)?;
    if fs::rename(&tmp, &dir).is_err() {
        let _ = fs::remove_dir_all(&tmp); // another process won the race
    }
    if !dir.join("PG_VERSION").exists() {
        return Err(format!("no template at {}", dir.display()));
    }
    Ok(dir)
}

fn cp_a(from: &Path, to: &Path) -> Result<(), String> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| format!("cp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cp -a {} {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    let mut s = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.push_str(text);
    fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn pg_section(host: &str, port: u16, data: &str, advertise: &str) -> String {
    pg_section_mode(host, port, data, advertise, true)
}

/// [`pg_section`] with `synchronous_mode` as given.
pub(crate) fn pg_section_mode(
    host: &str,
    port: u16,
    data: &str,
    advertise: &str,
    synchronous: bool,
) -> String {
    format!(
        r#"[postgres]
host = "{host}"
port = {port}
data_dir = "{data}"
advertise_host = "{advertise}"
synchronous_mode = {synchronous}
stop_timeout = 1.0
"#
    )
}

/// The lab for PostgreSQL trials: [`Lab`] (its single etcd, the agent
/// binary, the scratch folder) and, started on first need, a 3-member etcd
/// for the etcd faults.
pub struct PgLab {
    pub lab: Lab,
    cluster: Mutex<Option<EtcdCluster>>,
    /// Both nodes' `synchronous_mode` (default true). Asynchronous, an
    /// acknowledged commit the standby had not received when the primary
    /// was fenced is lost: counted, not a failure.
    pub synchronous: bool,
}

/// Where a trial's agents and clients find etcd.
#[derive(Debug, Clone)]
pub struct EtcdEnds {
    /// Host URLs.
    pub host: Vec<String>,
    /// The same members' ports (the guest reaches them through 10.0.2.2).
    pub ports: Vec<u16>,
}

impl PgLab {
    pub fn start(bin: &Path) -> Result<PgLab, String> {
        Ok(PgLab {
            lab: Lab::start(bin)?,
            cluster: Mutex::new(None),
            synchronous: true,
        })
    }

    fn ends(&self, fault: PgFault) -> Result<EtcdEnds, String> {
        if !fault.needs_cluster() {
            return Ok(EtcdEnds {
                host: self.lab.etcd.endpoints(),
                ports: vec![self.lab.etcd.client_port()],
            });
        }
        let mut c = self.cluster.lock().unwrap();
        if c.is_none() {
            *c = Some(EtcdCluster::start(3).map_err(|e| format!("3-member etcd: {e}"))?);
        }
        let c = c.as_ref().expect("started");
        Ok(EtcdEnds {
            host: c.endpoints(),
            ports: (0..c.len()).map(|i| c.client_port(i)).collect(),
        })
    }

    /// Runs `f` on the 3-member etcd (started by [`PgLab::ends`]).
    fn with_cluster<R>(
        &self,
        f: impl FnOnce(&mut EtcdCluster) -> Result<R, String>,
    ) -> Result<R, String> {
        let mut c = self.cluster.lock().unwrap();
        f(c.as_mut().ok_or("no 3-member etcd")?)
    }
}

/// The host node: PostgreSQL (a standby of the guest at first), its agent
/// with a fake device, and the reset stand-in watching that device.
pub struct HostNode {
    pub agent: AgentProcess,
    pub agent_pid: Arc<AtomicI32>,
    // Dropped before `pg`: no kill races the cluster's removal.
    pub monitor: FakeWatchdogMonitor,
    pub pg: PgNode,
    pub dir: PathBuf,
}

impl HostNode {
    pub fn audit_path(&self) -> PathBuf {
        self.dir
            .join("audit")
            .join(format!("{HOST_NODE}.audit.jsonl"))
    }
    pub fn config_path(&self) -> PathBuf {
        self.agent.dir().join("leasedog.toml")
    }
}

/// Starts the host node as a synchronous standby of a systemd guest's
/// PostgreSQL at 127.0.0.1:`guest_port`, then its agent, with the guest's
/// budget ([`SYSTEMD_BUDGET`]).
pub fn start_host_node(
    lab: &Lab,
    etcd: &[String],
    scope: &str,
    template: &Path,
    guest_port: u16,
) -> Result<HostNode, String> {
    start_host_node_mode(
        lab,
        etcd,
        scope,
        template,
        guest_port,
        true,
        &SYSTEMD_BUDGET,
    )
}

/// Starts the host node as a standby of the guest's PostgreSQL at
/// 127.0.0.1:`guest_port` with the agent's `synchronous_mode` as given, then
/// its agent with `budget`.
pub fn start_host_node_mode(
    lab: &Lab,
    etcd: &[String],
    scope: &str,
    template: &Path,
    guest_port: u16,
    synchronous: bool,
    budget: &LabBudget,
) -> Result<HostNode, String> {
    let dir = lab.work().join(format!("{HOST_NODE}-{scope}"));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pg = PgNode::empty(free_port());
    let _ = fs::remove_dir(pg.data_dir());
    cp_a(template, &pg.data_dir())?;
    fs::write(pg.data_dir().join("standby.signal"), "").map_err(|e| e.to_string())?;
    append(
        &pg.data_dir().join("postgresql.auto.conf"),
        &format!(
            "primary_conninfo = 'host=127.0.0.1 port={guest_port} user=postgres \
             application_name={HOST_NODE}'\n"
        ),
    )?;
    pg.start();
    let agent_pid = Arc::new(AtomicI32::new(0));
    let monitor =
        FakeWatchdogMonitor::for_node(dir.join("fake.wd"), agent_pid.clone(), pg.data_dir());
    let devices = format!(
        "[[watchdog.device]]\nkind = \"fake\"\nrecord = \"{}\"\n",
        dir.join("fake.wd").display()
    );
    let cfg = config_with(
        budget,
        scope,
        HOST_NODE,
        &etcd.join(","),
        "keep-pinging",
        &devices,
        &dir.join("audit").to_string_lossy(),
    ) + &pg_section_mode(
        &pg.socket_dir().to_string_lossy(),
        pg.port,
        &pg.data_dir().to_string_lossy(),
        "10.0.2.2",
        synchronous,
    );
    let agent = AgentProcess::spawn(&lab.bin, HOST_NODE, &cfg, &[])
        .map_err(|e| format!("host agent: {e}"))?;
    agent_pid.store(agent.pid() as i32, Ordering::SeqCst);
    Ok(HostNode {
        agent,
        agent_pid,
        monitor,
        pg,
        dir,
    })
}

/// Boots the guest leader: its watchdog(s), 1 GiB, the PostgreSQL port
/// forwarded at the same number, its shared audit folder; with `persistent`
/// also a host folder at [`GUEST_PG_DISK`] for a data directory that
/// survives a reset.
pub fn boot_pg_guest(
    lab: &Lab,
    scope: &str,
    dog: Dog,
    pg_port: u16,
    persistent: bool,
) -> Result<Node, String> {
    boot_pg_guest_named(lab, GUEST_NODE, scope, dog, pg_port, persistent)
}

/// [`boot_pg_guest`] for a guest named `name` (a second guest,
/// [`super::second`]).
pub fn boot_pg_guest_named(
    lab: &Lab,
    name: &str,
    scope: &str,
    dog: Dog,
    pg_port: u16,
    persistent: bool,
) -> Result<Node, String> {
    let share = lab.work().join(format!("{name}-{scope}"));
    fs::create_dir_all(&share).map_err(|e| format!("{}: {e}", share.display()))?;
    let mut rw_shares = vec![(share.clone(), GUEST_DIR.to_string())];
    if persistent {
        let disk = lab.work().join(format!("{name}-{scope}-pg"));
        fs::create_dir_all(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        rw_shares.push((disk, GUEST_PG_DISK.to_string()));
    }
    let softdog = matches!(dog, Dog::Softdog | Dog::Both).then_some(SoftdogOpts {
        margin: 30,
        nowayout: false,
    });
    let guest = Guest::boot(GuestSpec {
        name: name.into(),
        watchdogs: Watchdogs {
            i6300esb: matches!(dog, Dog::I6300esb | Dog::Both),
            i6300esb_nowayout: false,
            softdog,
        },
        // The same QEMU reboots it, so its agent can write the start-up
        // record the audit timeline needs.
        watchdog_action: WatchdogAction::Reset,
        reboot: true,
        rw_shares,
        forward_tcp_fixed: vec![(pg_port, pg_port)],
        mem_mb: 1024,
        ..GuestSpec::default()
    })?;
    Ok(Node {
        name: name.into(),
        guest,
        share,
        dog,
        agent: None,
    })
}

/// Copies the template into `data` in the guest (tmpfs under [`GUEST_PG`],
/// or the 9p folder at [`GUEST_PG_DISK`]) and starts PostgreSQL there (a
/// primary, before its agent: the agent never starts a primary itself).
pub fn start_guest_pg(
    g: &Guest,
    template: &Path,
    port: u16,
    data: &str,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    g.run_ok(
        &format!(
            "mkdir -p {GUEST_PG} && cp -a {tpl} {data} && chown postgres:postgres {GUEST_PG} \
             && chown -R postgres:postgres {data} && chmod 700 {GUEST_PG} {data}",
            tpl = shell_quote(&template.to_string_lossy()),
        ),
        Duration::from_secs(120),
    )?;
    g.run_ok(
        &format!(
            "cd / && HOME=/var/lib/postgresql /usr/bin/setpriv --reuid=postgres --regid=postgres \
             --init-groups {BIN_DIR}/pg_ctl start -w -t 120 -D {data} -l {GUEST_PG}/postmaster.log \
             -o \"-c port={port} -c unix_socket_directories='{GUEST_PG}'\" </dev/null"
        ),
        Duration::from_secs(150),
    )
    .map_err(|e| {
        let log = g
            .read_file(&format!("{GUEST_PG}/postmaster.log"))
            .unwrap_or_default();
        format!("{e}\npostmaster.log:\n{log}")
    })?;
    Ok(t0.elapsed())
}

/// What one end-to-end trial measured (host CLOCK_BOOTTIME).
#[derive(Debug, Clone)]
pub struct PgTrial {
    pub fault: PgFault,
    pub dog: Dog,
    /// Both nodes in `synchronous_mode` ([`PgLab::synchronous`]).
    pub synchronous: bool,
    pub standby: Standby,
    /// The second node's name ([`Second::name`]).
    pub second: &'static str,
    /// A reset of the second node (a guest): never expected.
    pub second_reset: Option<(String, Duration)>,
    /// Guest boot to its control shell.
    pub boot: Duration,
    /// The template copied and PostgreSQL started in the guest.
    pub guest_pg_start: Duration,
    /// Trial start to the clients starting (both nodes up, synchronous).
    pub setup: Duration,
    pub fault_at: Duration,
    /// For [`PgFault::EtcdQuorumLoss`]: when etcd had a leader again after
    /// the restart (no failover can happen before, whatever the agents do).
    pub healed_at: Option<Duration>,
    pub reset: Option<(String, Duration)>,
    pub key_deleted: Option<Duration>,
    /// The host node's put of the key.
    pub new_leader: Option<Duration>,
    /// The first observation of the host node writable after the fault
    /// (its completion).
    pub writable_at: Option<Duration>,
    /// The per-insert (read-write) writer's longest stretch between
    /// completions of acknowledged inserts, from the last one before the
    /// fault.
    pub writer_gap: Option<f64>,
    pub verdict: Verdict,
    /// What the checker read: every observation, the key's terms, the final
    /// primary's rows.
    pub checked: History,
    /// Of the checker's observations outside a term, those whose window
    /// overlaps another node's writable observation: the two nodes may have
    /// been writable at one instant. (A hand-deleted key ends the term of a
    /// primary that cannot know yet: its writes until its fence are outside
    /// its term, but before the new leader promotes.)
    pub overlapping: usize,
    /// `leasedog audit timeline` over both logs: exit code and text.
    pub timeline: Option<(i32, String)>,
    /// The old primary's PostgreSQL answered `pg_is_in_recovery() = t`
    /// after the fault (it followed the new primary; after a reboot for
    /// [`PgFault::Reboot`]).
    pub rejoined_read_only: Option<Duration>,
    pub wall: Duration,
    pub notes: Vec<String>,
    /// The whole history, as JSON (observations, terms, final rows).
    pub history: Value,
}

fn rel(d: Option<Duration>, t0: Duration) -> Option<f64> {
    d.map(|d| d.as_secs_f64() - t0.as_secs_f64())
}

impl PgTrial {
    /// Fault -> the new primary observed writable, seconds.
    pub fn failover(&self) -> Option<f64> {
        rel(self.writable_at, self.fault_at)
    }

    /// Quorum back -> the new primary observed writable, seconds (only for
    /// the faults that record a heal: the etcd quorum loss). etcd's new
    /// leader renews every lease by `T` when it is elected, so `T` is the
    /// least this can be.
    pub fn failover_after_heal(&self) -> Option<f64> {
        rel(self.writable_at, self.healed_at?)
    }

    /// The checker's count: observations outside a term plus the changes
    /// of primary the clients' history needs beyond etcd's.
    pub fn double_writable(&self) -> usize {
        self.verdict.double_writable()
    }

    /// What may have been two writable nodes at one instant: changes the
    /// history needs beyond etcd's, plus observations outside a term that
    /// overlap another node's writable observation.
    pub fn simultaneous(&self) -> usize {
        let excess = self
            .verdict
            .recorded_changes
            .map_or(0, |r| self.verdict.chain.changes.saturating_sub(r));
        excess + self.overlapping
    }

    pub fn lost_acked(&self) -> usize {
        self.verdict.lost_acked.len()
    }

    /// Of [`PgTrial::double_writable`], the observations outside a term that
    /// were acknowledged writes (not probes): a commit a client was told
    /// succeeded on a node that no longer held the key.
    pub fn acked_outside_term(&self) -> usize {
        self.verdict
            .outside_term
            .iter()
            .filter(|o| matches!(o.kind, history::Kind::Write { .. }))
            .count()
    }

    /// Where the trial broke the fault's [`Expect`] or the safety checks
    /// (double-writable, lost acknowledged inserts in synchronous mode, a VIOLATION, an
    /// UNPROVEN reset on the i6300esb, a reboot that did not come back
    /// read-only).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let e = self.fault.expect();
        match (e.reset, self.reset.is_some()) {
            (Some(true), false) => out.push("no reset".to_string()),
            (Some(false), true) => out.push("unexpected reset".to_string()),
            _ => {}
        }
        match (e.failover, self.writable_at.is_some()) {
            (Some(true), false) => out.push("no failover".to_string()),
            (Some(false), true) => out.push("unexpected failover".to_string()),
            _ => {}
        }
        if self.simultaneous() > 0 {
            out.push(format!(
                "{} possibly simultaneous writable",
                self.simultaneous()
            ));
        }
        // Outside its term is expected only where the term ends before the
        // old primary can know: a deletion by hand.
        if self.fault != PgFault::KeyDelete && self.double_writable() > 0 {
            out.push(format!(
                "{} writable outside the term",
                self.double_writable()
            ));
        }
        // Asynchronous replication promises no acknowledged commit: the
        // count is reported, not a broken expectation.
        if self.lost_acked() > 0 && self.synchronous {
            out.push(format!("{} lost acknowledged", self.lost_acked()));
        }
        for v in self.timeline_verdicts() {
            let word = v.split_whitespace().last().unwrap_or("");
            // The i6300esb proves the leader's reset; a second guest's own
            // changes (a failed promotion, raced again) are its own device's.
            let leaders = v.starts_with(&format!("{GUEST_NODE}->"));
            if word == "VIOLATION"
                || (word == "UNPROVEN"
                    && leaders
                    && self.dog == Dog::I6300esb
                    && self.reset.is_some())
            {
                out.push(v);
            }
        }
        if let Some((name, _)) = &self.second_reset {
            out.push(format!("{} reset ({name})", self.second));
        }
        if self.fault == PgFault::Reboot && self.rejoined_read_only.is_none() {
            out.push("the rebooted node's PostgreSQL never answered read-only".into());
        }
        out
    }

    /// Each UNPROVEN change with what the timeline found missing (its
    /// `verdict: UNPROVEN (...)` line).
    pub fn unproven(&self) -> Vec<String> {
        let Some((_, text)) = &self.timeline else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut change = None;
        for l in text.lines() {
            if l.starts_with("change at rev") {
                change = l.ends_with("UNPROVEN").then(|| l.to_string());
            } else if let (Some(c), Some(why)) =
                (&change, l.trim().strip_prefix("verdict: UNPROVEN"))
            {
                out.push(format!("{c}: {}", why.trim()));
                change = None;
            }
        }
        out
    }

    /// The timeline's verdict per change of leader (`change at rev N: a ->
    /// b    VERDICT` lines): `a->b VERDICT`.
    pub fn timeline_verdicts(&self) -> Vec<String> {
        let Some((_, text)) = &self.timeline else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| l.starts_with("change at rev"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let arrow = w.iter().position(|x| *x == "->")?;
                Some(format!(
                    "{}->{} {}",
                    w.get(arrow - 1)?,
                    w.get(arrow + 1)?,
                    w.last()?
                ))
            })
            .collect()
    }

    /// The writer's view of this trial ([`crate::view::render`]); the
    /// audit must call the change FENCED-BY-RESET after an expected reset
    /// of an i6300esb guest (softdog keeps no boot status to report it), and
    /// FENCED-BY-STEP-DOWN after a PostgreSQL crash.
    pub fn view(&self) -> view::Failover<'_> {
        let expected_fence = match (self.fault, self.fault.expect().reset, self.dog) {
            (PgFault::PgCrash, ..) => Some("FENCED-BY-STEP-DOWN"),
            (_, Some(true), Dog::I6300esb | Dog::Both) => Some("FENCED-BY-RESET"),
            _ => None,
        };
        view::Failover {
            history: &self.checked,
            verdict: &self.verdict,
            old: GUEST_NODE,
            new: self.second,
            fault_ns: ns(self.fault_at),
            fault: self.fault.title(),
            reset: self.reset.as_ref().map(|(n, at)| (n.as_str(), ns(*at))),
            key_deleted_ns: self.key_deleted.map(ns),
            new_leader_ns: self.new_leader.map(ns),
            audit: self
                .timeline
                .as_ref()
                .map(|(code, _)| (*code, self.timeline_verdicts())),
            expected_fence,
        }
    }

    pub fn to_json(&self) -> Value {
        let t0 = self.fault_at;
        json!({
            "fault": self.fault.name(),
            "watchdog": self.dog.name(),
            "synchronous_mode": self.synchronous,
            "standby": self.standby.name(),
            "standby_reset": self.second_reset.as_ref().map(|r| r.0.clone()),
            "boot_s": self.boot.as_secs_f64(),
            "guest_pg_start_s": self.guest_pg_start.as_secs_f64(),
            "setup_s": self.setup.as_secs_f64(),
            "wall_s": self.wall.as_secs_f64(),
            "fault_boottime_s": t0.as_secs_f64(),
            "reset_event": self.reset.as_ref().map(|r| r.0.clone()),
            "reset_after_fault_s": rel(self.reset.as_ref().map(|r| r.1), t0),
            "key_deleted_after_fault_s": rel(self.key_deleted, t0),
            "new_leader_after_fault_s": rel(self.new_leader, t0),
            "failover_s": self.failover(),
            "failover_after_heal_s": self.failover_after_heal(),
            "writer_gap_s": self.writer_gap,
            "double_writable": self.double_writable(),
            "possibly_simultaneous": self.simultaneous(),
            "acked_outside_term": self.acked_outside_term(),
            "lost_acked": self.lost_acked(),
            "rejoined_read_only_after_fault_s": rel(self.rejoined_read_only, t0),
            "expected": {"reset": self.fault.expect().reset, "failover": self.fault.expect().failover},
            "failures": self.failures(),
            "unproven": self.unproven(),
            "verdict": self.verdict.to_json(),
            "timeline_code": self.timeline.as_ref().map(|t| t.0),
            "timeline": self.timeline.as_ref().map(|t| t.1.clone()),
            "timeline_verdicts": self.timeline_verdicts(),
            "notes": self.notes,
            "history": self.history,
        })
    }

    pub fn summary(&self) -> String {
        let t0 = self.fault_at;
        let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:+.2}"));
        format!(
            "{} ({}{}, standby {}): reset {} {}, key deleted {}, {} took key {}, writable {} s after the fault{}; \
             writer gap {} s; outside term {} (possibly simultaneous {}), lost acked {} (ok {}, failed {}, unknown {}); \
             old primary read-only {}; timeline {:?}; boot {:.1} s, guest pg {:.1} s, setup {:.1} s, \
             trial {:.1} s{}",
            self.fault.name(),
            self.dog.name(),
            if self.synchronous { "" } else { ", async" },
            self.standby.name(),
            self.reset.as_ref().map_or("none", |r| r.0.as_str()),
            f(rel(self.reset.as_ref().map(|r| r.1), t0)),
            f(rel(self.key_deleted, t0)),
            self.second,
            f(rel(self.new_leader, t0)),
            f(self.failover()),
            self.failover_after_heal()
                .map_or(String::new(), |h| format!(" ({h:.2} s after quorum was back)")),
            self.writer_gap.map_or("-".into(), |g| format!("{g:.2}")),
            self.double_writable(),
            self.simultaneous(),
            self.lost_acked(),
            self.verdict.writes_ok,
            self.verdict.writes_failed,
            self.verdict.writes_unknown,
            f(rel(self.rejoined_read_only, t0)),
            self.timeline_verdicts(),
            self.boot.as_secs_f64(),
            self.guest_pg_start.as_secs_f64(),
            self.setup.as_secs_f64(),
            self.wall.as_secs_f64(),
            match self.failures() {
                f if f.is_empty() => String::new(),
                f => format!("; FAILED: {}", f.join(", ")),
            },
        )
    }
}

fn key_events(watch: &KeyWatch) -> Vec<(u64, Option<String>)> {
    watch
        .events()
        .iter()
        .map(|e| match e.kind {
            EventKind::Put => (e.boottime_ns, holder(&e.value)),
            EventKind::Delete => (e.boottime_ns, None),
        })
        .collect()
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// How long the etcd leader stays down in [`PgFault::EtcdLeaderKill`].
const ETCD_LEADER_DOWN: Duration = Duration::from_secs(3);
/// How long quorum stays lost in [`PgFault::EtcdQuorumLoss`]: longer than T.
const QUORUM_LOST: Duration = Duration::from_secs(8);
/// How long a fault that must not fail over is watched.
const WATCH_NO_FAILOVER: Duration = Duration::from_secs(12);

/// Applies `fault` to the guest leader; returns the host instant it took
/// effect. Timed faults (pause, etcd) also heal themselves here; `healed`
/// gets the instant etcd had a leader again after a quorum loss.
#[allow(clippy::too_many_arguments)]
fn apply(
    plab: &PgLab,
    node: &Node,
    host: &Second,
    fault: PgFault,
    data: &str,
    scope: &str,
    etcd: &EtcdEnds,
    notes: &mut Vec<String>,
    healed: &mut Option<Duration>,
) -> Result<Duration, String> {
    let pid = node.pid()?;
    let g = &node.guest;
    Ok(match fault {
        PgFault::Stall | PgFault::Reboot => g.kill(pid, "STOP")?.host,
        PgFault::StallAll => {
            g.act(&format!("kill -STOP {pid} $(pgrep -u postgres)"))?
                .host
        }
        PgFault::Kill => g.kill(pid, "KILL")?.host,
        PgFault::PgCrash => {
            g.act(&format!("kill -KILL $(head -1 {data}/postmaster.pid)"))?
                .host
        }
        PgFault::NetCut => {
            let at = host_boottime();
            g.set_link(false)?;
            at
        }
        PgFault::Pause => {
            let at = host_boottime();
            g.pause()?;
            std::thread::sleep(2 * T);
            g.resume()?;
            at
        }
        PgFault::CpuStarve => {
            // One loop per CPU, pids kept so a guest that is not reset can
            // be relieved; SCHED_FIFO 99 is above the agent's threads (10).
            g.act(
                "n=$(nproc); i=0; while [ $i -lt $n ]; do \
                 chrt -f 99 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & \
                 echo $! >> /run/hogs; i=$((i+1)); done",
            )?
            .host
        }
        PgFault::KeyDelete => {
            let at = host_boottime();
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", etcd.host.join(",")))
                .args(["del", &Lab::key(scope)])
                .output()
                .map_err(|e| format!("etcdctl: {e}"))?;
            let said = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || said.trim() != "1" {
                return Err(format!(
                    "etcdctl del: {said}{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            at
        }
        PgFault::EtcdLeaderKill => {
            let li = plab.with_cluster(|c| {
                c.leader_index(Duration::from_secs(10))
                    .map_err(|e| e.to_string())
            })?;
            let at = host_boottime();
            plab.with_cluster(|c| {
                c.kill(li);
                Ok(())
            })?;
            std::thread::sleep(ETCD_LEADER_DOWN);
            plab.with_cluster(|c| c.restart(li).map_err(|e| format!("etcd restart: {e}")))?;
            notes.push(format!("etcd member {li} (the leader) killed, restarted"));
            at
        }
        PgFault::EtcdQuorumLoss => {
            let li = plab.with_cluster(|c| {
                c.leader_index(Duration::from_secs(10))
                    .map_err(|e| e.to_string())
            })?;
            let other = (li + 1) % 3;
            let at = host_boottime();
            plab.with_cluster(|c| {
                c.kill(li);
                c.kill(other);
                Ok(())
            })?;
            std::thread::sleep(QUORUM_LOST);
            plab.with_cluster(|c| {
                c.restart_many(&[li, other])
                    .map_err(|e| format!("etcd restart: {e}"))?;
                c.leader_index(Duration::from_secs(30))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })?;
            *healed = Some(host_boottime());
            notes.push(format!(
                "etcd members {li} (leader) and {other} killed, restarted"
            ));
            at
        }
        PgFault::Switchover => {
            // Asked again while the leader refuses because the host's
            // member record does not show a running replica yet; the
            // fault's instant is the start of the request that was taken.
            let t = Instant::now();
            loop {
                let at = host_boottime();
                let (code, out) = switchover_once(&plab.lab, &host.config_path(), host.name());
                if code == 0 {
                    break at;
                }
                if !out.contains("not a running replica") || t.elapsed() > Duration::from_secs(30) {
                    return Err(format!("leasedog switchover exited {code}:\n{out}"));
                }
                notes.push(format!("switchover refused, asked again: {}", out.trim()));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    })
}

/// One end-to-end trial; see the module documentation. `rt` runs the
/// clients.
pub fn run_pg_trial(
    plab: &PgLab,
    rt: &tokio::runtime::Runtime,
    fault: PgFault,
    dog: Dog,
) -> Result<PgTrial, String> {
    run_pg_trial_with(plab, rt, fault, dog, Standby::Host)
}

/// [`run_pg_trial`] with `standby` as the guest leader's standby: the host
/// node or a second guest ([`super::second`]).
pub fn run_pg_trial_with(
    plab: &PgLab,
    rt: &tokio::runtime::Runtime,
    fault: PgFault,
    dog: Dog,
    standby: Standby,
) -> Result<PgTrial, String> {
    let lab = &plab.lab;
    let t0 = Instant::now();
    let template = lab_template()?;
    let etcd = plab.ends(fault)?;
    let scope = lab.new_scope();
    let watch =
        KeyWatch::start(&etcd.host, &Lab::key(&scope)).map_err(|e| format!("watch: {e}"))?;
    let gport = free_port();
    let persistent = fault == PgFault::Reboot;
    let mut node = boot_pg_guest(lab, &scope, dog, gport, persistent)?;
    let data = if persistent {
        format!("{GUEST_PG_DISK}/data")
    } else {
        format!("{GUEST_PG}/data")
    };
    let guest_pg_start = start_guest_pg(&node.guest, &template, gport, &data)?;
    let cfg = lab.guest_config_with(&scope, &node, "keep-pinging", &etcd.ports)?
        + &pg_section_mode(
            GUEST_PG,
            gport,
            &data,
            standby.leader_advertise(),
            plab.synchronous,
        );
    node.start_agent(&lab.bin, &cfg)?;
    if !node.wait_log("promoted (leader", Duration::from_secs(90)) {
        return Err(format!(
            "the guest's agent did not lead within 90 s; its log:\n{}",
            node.agent_log()
        ));
    }
    psql(gport, clients::TABLE_SQL).map_err(|e| format!("create table on the guest: {e}"))?;
    let host = Second::start(
        lab,
        standby,
        &etcd,
        &scope,
        &template,
        gport,
        plab.synchronous,
    )?;
    let second = host.name();
    // Asynchronous: streaming, and never made synchronous by the agent.
    let want = if plab.synchronous { "sync" } else { "async" };
    let sync = wait_until(Duration::from_secs(90), || {
        psql(
            gport,
            &format!(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{second}' \
                 AND state = 'streaming'"
            ),
        )
        .is_ok_and(|s| s == want)
    });
    if !sync {
        return Err(format!(
            "{second} never became the guest's {want} standby; guest agent:\n{}\n{second}'s agent:\n{}",
            tail(&node.agent_log(), 30),
            tail(&host.agent_log(), 30)
        ));
    }
    if let Some(r) = node.guest.reset_time() {
        return Err(format!("the guest reset while healthy: {r:?}"));
    }
    if let Some(r) = host.reset() {
        return Err(format!("{second} reset while healthy: {r:?}"));
    }
    let setup = t0.elapsed();

    // The clients, from here to the end.
    let targets = vec![
        Target {
            name: GUEST_NODE.into(),
            port: gport,
        },
        Target {
            name: second.into(),
            port: host.port(),
        },
    ];
    let stop = Arc::new(AtomicBool::new(false));
    // An error below must not leave the clients running into the next trial.
    let _stop_on_error = StopOnDrop(stop.clone());
    let w_new = rt.spawn(clients::writer(
        clients::read_write_each(&targets),
        targets.clone(),
        1_000_000_000,
        false,
        EVERY,
        stop.clone(),
    ));
    let w_kept: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            rt.spawn(clients::writer(
                vec![clients::conninfo(t)],
                targets.clone(),
                (i as i64 + 2) * 1_000_000_000,
                true,
                EVERY,
                stop.clone(),
            ))
        })
        .collect();
    let probe = rt.spawn(clients::probe_each(targets.clone(), EVERY, stop.clone()));
    std::thread::sleep(Duration::from_secs(3));
    let mut notes = Vec::new();

    // The fault.
    let expect = fault.expect();
    let mut healed_at = None;
    let fault_at = apply(
        plab,
        &node,
        &host,
        fault,
        &data,
        &scope,
        &etcd,
        &mut notes,
        &mut healed_at,
    )?;
    notes.push(super::second::host_load());
    let host_writable = || host.writable();
    if expect.reset == Some(true) && node.guest.wait_reset(Duration::from_secs(30)).is_none() {
        notes.push("no reset within 30 s of the fault".into());
    }
    // Reset (or not), the old leader's guest yields the CPU to a standby
    // guest until the failover is done.
    let behind =
        (node.guest.reset_time().is_some()).then(|| Behind::reboot_of(&node.guest, standby));
    let writable = if expect.failover == Some(false) {
        // Watched for a while: the host node must stay a standby.
        wait_until(WATCH_NO_FAILOVER, host_writable)
    } else {
        wait_until(Duration::from_secs(40), host_writable)
    };
    drop(behind);
    if fault == PgFault::NetCut {
        node.guest.set_link(true)?;
    }
    if fault == PgFault::CpuStarve && node.guest.reset_time().is_none() {
        let _ = node
            .guest
            .run("kill $(cat /run/hogs)", Duration::from_secs(30));
    }
    if writable {
        std::thread::sleep(HOLD_AFTER_PROMOTION);
    } else if expect.failover == Some(true) {
        notes.push(format!("{second} was not writable within 40 s"));
    }
    let reset = node.guest.reset_time();

    // The old primary again: rebooted after a reset (its agent started on
    // the same audit folder, which records the reset), or still running.
    // Its PostgreSQL is watched coming back read-only while the clients
    // still run, so the history covers it.
    let mut rejoined_read_only = None;
    let mut after_notes = Vec::new();
    if reset.is_some() {
        match node.guest.wait_rebooted(Duration::from_secs(120)) {
            Ok(d) => {
                after_notes.push(format!(
                    "rebooted: control shell {:.1} s after the reset",
                    d.as_secs_f64()
                ));
                let before = node.audit().len();
                // The socket folder was on tmpfs.
                node.guest.run_ok(
                    &format!("mkdir -p {GUEST_PG} && chown postgres:postgres {GUEST_PG} && chmod 700 {GUEST_PG}"),
                    Duration::from_secs(30),
                )?;
                node.start_agent(&lab.bin, &cfg)?;
                let started = wait_until(Duration::from_secs(30), || {
                    node.audit()
                        .iter()
                        .skip(before)
                        .any(|r| r["event"] == "startup")
                });
                if !started {
                    after_notes.push("no start-up record after the reboot".into());
                }
                // Let it see the host's key (a leader_seen record).
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => after_notes.push(format!("no reboot: {e}")),
        }
    }
    if fault == PgFault::Reboot || (reset.is_none() && writable) {
        let ok = wait_until(Duration::from_secs(90), || {
            psql(gport, "SELECT pg_is_in_recovery()").is_ok_and(|s| s == "t")
        });
        if ok {
            rejoined_read_only = Some(host_boottime());
            std::thread::sleep(Duration::from_secs(2));
        } else {
            after_notes.push("the old primary did not answer read-only within 90 s".into());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let join = |h: tokio::task::JoinHandle<Vec<Attempt>>| rt.block_on(h).map_err(|e| e.to_string());
    let log_new = join(w_new)?;
    let mut logs_kept = Vec::new();
    for h in w_kept {
        logs_kept.push(join(h)?);
    }
    let probe_obs = rt.block_on(probe).map_err(|e| e.to_string())?;

    let after = |e: &crate::etcd::WatchEvent| e.boottime_ns >= ns(fault_at);
    let events = watch.events();
    let key_deleted = events
        .iter()
        .find(|e| after(e) && e.kind == EventKind::Delete)
        .map(|e| Duration::from_nanos(e.boottime_ns));
    let new_leader = events
        .iter()
        .find(|e| {
            after(e) && e.kind == EventKind::Put && holder(&e.value).as_deref() == Some(second)
        })
        .map(|e| Duration::from_nanos(e.boottime_ns));
    // The final primary: whichever node is writable now.
    let rows = |port: u16| {
        psql(port, "SELECT id FROM bench")
            .ok()
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    };
    let final_rows = if host_writable() {
        rows(host.port())
    } else if psql(gport, "SELECT pg_is_in_recovery()").is_ok_and(|s| s == "f") {
        rows(gport)
    } else {
        notes.push("no writable node at the end".into());
        None
    };
    notes.extend(after_notes);
    let mut obs = probe_obs;
    obs.extend(clients::write_obs("writer-new", &targets, &log_new));
    for (t, log) in targets.iter().zip(&logs_kept) {
        obs.extend(clients::write_obs(
            &format!("writer-kept-{}", t.name),
            &targets,
            log,
        ));
    }
    let writable_at = obs
        .iter()
        .filter(|o| o.node.as_deref() == Some(second) && o.invoke_ns >= ns(fault_at))
        .filter(|o| match o.kind {
            history::Kind::Write { outcome, .. } => outcome == history::Outcome::Ok,
            history::Kind::Probe { writable } => writable == Some(true),
        })
        .map(|o| o.complete_ns)
        .min()
        .map(Duration::from_nanos);
    let h = History {
        obs,
        terms: history::terms(&key_events(&watch)),
        final_rows,
        slack_ns: 50_000_000,
    };
    let verdict = history::check(&h);
    let overlapping = overlapping(&h, &verdict);
    let history_json = history_to_json(&h);
    let timeline = Some(audit_timeline(
        &lab.bin,
        &[node.audit_path(), host.audit_path()],
        Some(&host.config_path()),
    )?);

    let second_reset = host.reset();
    let trial = PgTrial {
        fault,
        dog,
        synchronous: plab.synchronous,
        standby,
        second,
        second_reset,
        boot: node.guest.boot_time(),
        guest_pg_start,
        setup,
        fault_at,
        healed_at,
        reset: reset.map(|r| {
            let name = match r.data.get("action").and_then(Value::as_str) {
                Some(a) => format!("{} ({a})", r.name),
                None => r.name.clone(),
            };
            (name, r.boottime)
        }),
        key_deleted,
        new_leader,
        writable_at,
        writer_gap: clients::gap_completed(&log_new, ns(fault_at)),
        verdict,
        checked: h,
        overlapping,
        timeline,
        rejoined_read_only,
        wall: t0.elapsed(),
        notes,
        history: history_json,
    };
    drop(node);
    drop(host);
    Ok(trial)
}

/// Observations outside a term whose window overlaps a writable
/// observation of another node (see [`PgTrial::overlapping`]).
fn overlapping(h: &History, v: &Verdict) -> usize {
    let writable = |o: &history::Obs| match o.kind {
        history::Kind::Write { outcome, .. } => outcome == history::Outcome::Ok,
        history::Kind::Probe { writable } => writable == Some(true),
    };
    v.outside_term
        .iter()
        .filter(|a| {
            h.obs.iter().any(|b| {
                writable(b)
                    && b.node.is_some()
                    && b.node != a.node
                    && b.invoke_ns < a.complete_ns
                    && a.invoke_ns < b.complete_ns
            })
        })
        .count()
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn history_to_json(h: &History) -> Value {
    json!({
        "obs": h.obs.iter().map(|o| {
            let (kind, id, outcome, writable) = match &o.kind {
                history::Kind::Write { id, outcome } => ("write", Some(*id), Some(format!("{outcome:?}")), None),
                history::Kind::Probe { writable } => ("probe", None, None, *writable),
            };
            json!({
                "node": o.node, "client": o.client, "invoke_ns": o.invoke_ns,
                "complete_ns": o.complete_ns, "kind": kind, "id": id,
                "outcome": outcome, "writable": writable,
            })
        }).collect::<Vec<_>>(),
        "terms": h.terms.iter().map(|t| json!({"node": t.node, "from_ns": t.from_ns, "to_ns": t.to_ns})).collect::<Vec<_>>(),
        "final_rows": h.final_rows.as_ref().map(|r| r.len()),
    })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
