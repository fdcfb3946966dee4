//! Reset, then reboot (issue 11): the leader guest, PostgreSQL 15 run by
//! `leasedog run` under the shipped unit in systemd 252, its data directory
//! on a host folder shared over 9p (it survives the reboot; the tmpfs
//! overlay does not), with the host node of [`super::pg`] (PostgreSQL and an
//! agent) as its synchronous standby, is partitioned from etcd
//! ([`TcpGate::cut`]: only the path to etcd, so clients on the host still
//! reach its PostgreSQL through QEMU's port forward). Its lease runs out,
//! the host node takes the key and promotes, the guest's i6300esb resets it
//! (`-action watchdog=reset`) and the same QEMU boots it again with the unit
//! enabled (`labtest.target` wants it). The partition is healed at the
//! reset, so the rebooted agent finds the new leader and rejoins it. A
//! host-side probe asks the guest's `pg_is_in_recovery()` and tries an
//! INSERT every ~100 ms throughout: after the reset, the server that was
//! the primary must answer read-only from its first accepted connection.
//! (With etcd out of reach after the reboot the agent would not start
//! PostgreSQL at all, holder unknown: nothing to observe. With the key left
//! to expire and no other node, the rebooted agent would rightly win it
//! again and promote.)

use super::gate::TcpGate;
use super::pg::{lab_template, pg_section, start_host_node};
use super::proc::host_boottime;
use super::scenario::{config_with, holder, Lab, GUEST_DIR, GUEST_NODE, HOST_NODE, SYSTEMD_BUDGET};
use super::systemd::{Line, SystemdGuest, SystemdSpec};
use crate::etcd::EventKind;
use crate::pg::{free_port, psql};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the shared folder is mounted in the guest (under the unit's
/// `ReadWritePaths=/var/lib/postgresql`).
pub const PG_SHARE: &str = "/var/lib/postgresql/lab";

/// What the probe asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Recovery,
    Insert,
}

/// One probe attempt (host CLOCK_BOOTTIME).
#[derive(Debug, Clone)]
pub struct Attempt {
    pub op: Op,
    pub start: Duration,
    pub end: Duration,
    /// psql's output, or its error text.
    pub result: Result<String, String>,
}

impl Attempt {
    /// The server accepted the connection (an SQL error still counts: the
    /// server answered).
    pub fn connected(&self) -> bool {
        match &self.result {
            Ok(_) => true,
            Err(e) => e.contains("ERROR"),
        }
    }
}

/// What one trial saw.
#[derive(Debug, Clone)]
pub struct RebootTrial {
    /// QEMU started -> the guest's agent won the key.
    pub boot: Duration,
    pub cut_at: Duration,
    /// QEMU's WATCHDOG event (its action) and host time.
    pub reset: Option<(String, Duration)>,
    pub key_deleted: Option<Duration>,
    /// The host node took the key.
    pub new_leader: Option<Duration>,
    /// The guest's agent wrote the key after the cut.
    pub rewon: Option<Duration>,
    /// The rebooted agent's "runs as a replica of" (rejoined the new leader).
    pub rejoined: Option<Duration>,
    /// The driver's count of `postgres` processes per cgroup, per boot.
    pub pg_cgroups: Vec<String>,
    /// The rebooted agent found its audit log cut short of its etcd anchor.
    pub audit_disagrees: bool,
    /// The driver's boot line of the second boot (host arrival).
    pub rebooted: Option<Duration>,
    /// The rebooted agent's "PostgreSQL started as a standby".
    pub standby_started: Option<Duration>,
    pub attempts: Vec<Attempt>,
    pub wall: Duration,
    pub console: String,
}

fn rel(d: Duration, from: Duration) -> f64 {
    d.as_secs_f64() - from.as_secs_f64()
}

impl RebootTrial {
    fn reset_at(&self) -> Option<Duration> {
        self.reset.as_ref().map(|r| r.1)
    }
    /// Attempts started after the reset.
    pub fn after_reset(&self) -> Vec<&Attempt> {
        let Some(r) = self.reset_at() else {
            return Vec::new();
        };
        self.attempts.iter().filter(|a| a.start > r).collect()
    }
    /// The first attempt after the reset that the server answered.
    pub fn first_connection(&self) -> Option<&Attempt> {
        self.after_reset().into_iter().find(|a| a.connected())
    }
    /// INSERTs started after the reset that were acknowledged.
    pub fn writes_after_reset(&self) -> Vec<&Attempt> {
        self.after_reset()
            .into_iter()
            .filter(|a| a.op == Op::Insert && a.result.is_ok())
            .collect()
    }
    /// Acknowledged INSERTs before the cut (the probe could write).
    pub fn writes_before_cut(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.op == Op::Insert && a.result.is_ok() && a.end < self.cut_at)
            .count()
    }
    /// The last acknowledged INSERT (host time its answer came).
    pub fn last_write(&self) -> Option<Duration> {
        self.attempts
            .iter()
            .filter(|a| a.op == Op::Insert && a.result.is_ok())
            .map(|a| a.end)
            .max()
    }

    /// cut -> reset, seconds.
    pub fn cut_to_reset(&self) -> Option<f64> {
        Some(rel(self.reset_at()?, self.cut_at))
    }
    /// key deleted - reset, seconds (the fencing slack).
    pub fn slack(&self) -> Option<f64> {
        Some(rel(self.key_deleted?, self.reset_at()?))
    }
    /// reset -> the driver's line of the second boot, seconds.
    pub fn reset_to_reboot(&self) -> Option<f64> {
        Some(rel(self.rebooted?, self.reset_at()?))
    }
    /// reset -> the first answer of the rebooted server, seconds.
    pub fn reset_to_first_connection(&self) -> Option<f64> {
        Some(rel(self.first_connection()?.end, self.reset_at()?))
    }
    /// reset -> the rebooted agent's rejoin of the new leader, seconds.
    pub fn reset_to_rejoin(&self) -> Option<f64> {
        Some(rel(self.rejoined?, self.reset_at()?))
    }
    /// The first answer after the reset was `pg_is_in_recovery() = t`, or
    /// a read-only refusal of an INSERT.
    pub fn first_answer_read_only(&self) -> Option<bool> {
        let a = self.first_connection()?;
        Some(match (&a.op, &a.result) {
            (Op::Recovery, Ok(v)) => v == "t",
            (Op::Insert, Err(e)) => e.contains("read-only"),
            _ => false,
        })
    }

    pub fn summary(&self) -> String {
        let c = self.cut_at;
        let r = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:+.1}", rel(d, c)));
        let after = self.after_reset();
        let recov = after
            .iter()
            .filter(|a| a.op == Op::Recovery && a.result.is_ok())
            .count();
        let refused = after
            .iter()
            .filter(|a| a.op == Op::Insert && a.connected() && a.result.is_err())
            .count();
        format!(
            "reset-then-reboot: boot {:.1} s; after the cut (s): last write {}, reset {} {}, \
             key deleted {}, new leader {}, rebooted {}, standby started {}, first connection {} ({}), \
             rejoined {}, guest leads again {}; postgres cgroups per boot {:?}; \
             after the reset: {} recovery answers, {} INSERTs refused by the server, {} accepted; \
             trial {:.1} s",
            self.boot.as_secs_f64(),
            r(self.last_write()),
            self.reset.as_ref().map_or("none", |x| x.0.as_str()),
            r(self.reset_at()),
            r(self.key_deleted),
            r(self.new_leader),
            r(self.rebooted),
            r(self.standby_started),
            r(self.first_connection().map(|a| a.end)),
            self.first_connection()
                .map_or("-".to_string(), |a| format!("{:?} -> {:?}", a.op, a.result)),
            r(self.rejoined),
            r(self.rewon),
            self.pg_cgroups,
            recov,
            refused,
            self.writes_after_reset().len(),
            self.wall.as_secs_f64(),
        )
    }
}

/// The probe: `pg_is_in_recovery()`, then an INSERT, every ~100 ms, each
/// on a new connection through the port forward, until `stop`.
fn probe(port: u16, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Attempt>>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        for op in [Op::Recovery, Op::Insert] {
            n += 1;
            let q = match op {
                Op::Recovery => "SELECT pg_is_in_recovery()".to_string(),
                Op::Insert => format!("INSERT INTO probe (n) VALUES ({n}) RETURNING n"),
            };
            let start = host_boottime();
            let result = psql(port, &q);
            log.lock().unwrap().push(Attempt {
                op,
                start,
                end: host_boottime(),
                result,
            });
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
}

/// The driver, at every boot: a mark with the boot id, then, once the
/// postmaster of this boot runs and has had 5 s to start its children, the
/// cgroups of every `postgres` process, counted (`/proc/PID/cgroup`).
fn driver() -> String {
    format!(
        r#"echo "LABDRV BOOT $(cat /proc/sys/kernel/random/boot_id)" > /dev/kmsg
i=0
while [ $i -lt 600 ]; do
  pid=$(head -n 1 {PG_SHARE}/data/postmaster.pid 2>/dev/null)
  if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = postgres ]; then
    sleep 5
    echo "LABDRV PGCG $(for p in $(pgrep -x postgres); do cat /proc/$p/cgroup; done | sort | uniq -c | tr -s ' 
' '  ')" > /dev/kmsg
    break
  fi
  i=$((i+1)); sleep 0.5
done
"#
    )
}

/// The data directory: a copy of the lab's template in a host folder the
/// guest mounts at [`PG_SHARE`] (owned by `postgres` as on the host: the
/// guest shares the host's /etc/passwd).
fn data_share(lab: &Lab, scope: &str) -> Result<std::path::PathBuf, String> {
    let share = lab.work().join(format!("pgshare-{scope}"));
    fs::create_dir_all(&share).map_err(|e| format!("{}: {e}", share.display()))?;
    fs::set_permissions(&share, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    // The lab's work folder may be private to root; the share's root is
    // what the guest sees, its parents are not.
    let template = lab_template()?;
    let out = Command::new("cp")
        .arg("-a")
        .arg(&template)
        .arg(share.join("data"))
        .output()
        .map_err(|e| format!("cp: {e}"))?;
    if !out.status.success() {
        return Err(format!("cp: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(share)
}

/// One reset-then-reboot trial (see the module's comment).
pub fn reboot_trial(lab: &Lab) -> Result<RebootTrial, String> {
    let t0 = Instant::now();
    let scope = lab.new_scope();
    let watch = lab.watch(&scope)?;
    let gate = TcpGate::start(lab.etcd.client_port()).map_err(|e| format!("gate: {e}"))?;
    let share = data_share(lab, &scope)?;
    // The audit log survives the reboot too, as on a real disk: the
    // rebooted agent continues its chain and records why it restarted.
    let audit = lab.work().join(format!("auditshare-{scope}"));
    fs::create_dir_all(&audit).map_err(|e| format!("{}: {e}", audit.display()))?;
    let port = free_port();
    let mut cfg = config_with(
        &SYSTEMD_BUDGET,
        &scope,
        GUEST_NODE,
        &format!("http://10.0.2.2:{}", gate.port()),
        "keep-pinging",
        "[[watchdog.device]]\nkind = \"device\"\npath = \"/dev/watchdog0\"\n",
        GUEST_DIR,
    );
    cfg.push_str(&pg_section(
        "/run/postgresql",
        port,
        &format!("{PG_SHARE}/data"),
        "127.0.0.1",
    ));
    let g = SystemdGuest::boot(SystemdSpec {
        name: "reboot".into(),
        dropin: format!(
            "[Unit]\nStartLimitIntervalSec=0\n\
             [Service]\nExecStart=\nExecStart={bin} run --config /etc/leasedog/leasedog.toml\n\
             StandardOutput=journal+console\nStandardError=journal+console\n",
            bin = lab.bin.display(),
        ),
        driver: driver(),
        files: vec![("/etc/leasedog/leasedog.toml".into(), cfg.into_bytes())],
        i6300esb: true,
        watchdog_reset: true,
        network: true,
        shares: vec![
            (share.clone(), PG_SHARE.into()),
            (audit.clone(), GUEST_DIR.into()),
        ],
        forward_tcp: vec![port],
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
    g.wait_line("promoted (leader", Duration::from_secs(120))
        .ok_or_else(|| fail("the guest's agent won but did not promote".into()))?;
    let mut made = Err(String::new());
    for _ in 0..60 {
        made = psql(
            port,
            "CREATE TABLE IF NOT EXISTS probe (n bigint, at timestamptz DEFAULT now())",
        );
        if made.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    made.map_err(|e| fail(format!("no probe table on the promoted guest: {e}")))?;
    let template = lab_template()?;
    let host = start_host_node(lab, &lab.etcd.endpoints(), &scope, &template, port)?;
    let sync = crate::wait_until(Duration::from_secs(120), || {
        psql(
            port,
            &format!(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{HOST_NODE}'"
            ),
        )
        .is_ok_and(|s| s == "sync")
    });
    if !sync {
        return Err(fail(format!(
            "the host node never became the guest's synchronous standby; host agent:\n{}",
            host.agent.log()
        )));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let prober = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || probe(port, stop, log))
    };
    let wrote = |log: &Mutex<Vec<Attempt>>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|a| a.op == Op::Insert && a.result.is_ok())
            .count()
    };
    crate::wait_until(Duration::from_secs(30), || wrote(&log) >= 5);
    let cut_at = host_boottime();
    gate.cut();
    let reset = g.wait_reset(Duration::from_secs(60));
    // Healed at the reset: the rebooted agent finds the new leader.
    gate.reopen();
    let boots = |g: &SystemdGuest| {
        g.lines()
            .into_iter()
            .filter(|l| l.text.contains("LABDRV BOOT"))
            .collect::<Vec<Line>>()
    };
    let mut rebooted = None;
    let mut standby_started = None;
    let mut rejoined = None;
    if let Some(r) = &reset {
        let after = |l: &Line| l.host > r.boottime;
        crate::wait_until(Duration::from_secs(240), || {
            rebooted = boots(&g).into_iter().find(after).map(|l| l.host);
            standby_started = g
                .lines()
                .into_iter()
                .find(|l| after(l) && l.text.contains("PostgreSQL started as a standby"))
                .map(|l| l.host);
            rejoined = g
                .lines()
                .into_iter()
                .find(|l| after(l) && l.text.contains("runs as a replica of"))
                .map(|l| l.host);
            let answered = log
                .lock()
                .unwrap()
                .iter()
                .any(|a| a.start > r.boottime && a.connected());
            let cgroups = g
                .lines()
                .into_iter()
                .filter(|l| after(l) && l.text.contains("LABDRV PGCG"))
                .count();
            rebooted.is_some() && rejoined.is_some() && answered && cgroups > 0
        });
        // Probed on for a while: nothing may turn it writable.
        std::thread::sleep(Duration::from_secs(10));
    }
    stop.store(true, Ordering::SeqCst);
    let _ = prober.join();
    let key_deleted = watch
        .wait_for(
            |e| e.kind == EventKind::Delete && e.boottime_ns >= cut_at.as_nanos() as u64,
            Duration::from_secs(1),
        )
        .map(|e| Duration::from_nanos(e.boottime_ns));
    let new_leader = watch
        .wait_for(
            |e| {
                e.kind == EventKind::Put
                    && e.boottime_ns >= cut_at.as_nanos() as u64
                    && holder(&e.value).as_deref() == Some(HOST_NODE)
            },
            Duration::from_millis(100),
        )
        .map(|e| Duration::from_nanos(e.boottime_ns));
    let rewon = watch
        .wait_for(
            |e| {
                e.kind == EventKind::Put
                    && e.boottime_ns >= cut_at.as_nanos() as u64
                    && holder(&e.value).as_deref() == Some(GUEST_NODE)
            },
            Duration::from_millis(100),
        )
        .map(|e| Duration::from_nanos(e.boottime_ns));
    let attempts = log.lock().unwrap().clone();
    Ok(RebootTrial {
        boot,
        cut_at,
        reset: reset.map(|r| {
            let name = match r.data.get("action").and_then(|a| a.as_str()) {
                Some(a) => format!("{} ({a})", r.name),
                None => r.name.clone(),
            };
            (name, r.boottime)
        }),
        key_deleted,
        new_leader,
        rewon,
        rebooted,
        standby_started,
        rejoined,
        pg_cgroups: g
            .lines()
            .into_iter()
            .filter_map(|l| Some(l.text.split_once("LABDRV PGCG")?.1.trim().to_string()))
            .collect(),
        audit_disagrees: g.line("disagrees with its anchor").is_some(),
        attempts,
        wall: t0.elapsed(),
        console: format!(
            "{}\n--- host agent ---\n{}",
            g.console_log(),
            host.agent.log()
        ),
    })
}
