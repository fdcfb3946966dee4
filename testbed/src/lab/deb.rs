//! The installed package's lifecycle (issue 11): in a QEMU guest under
//! systemd 252, the `.deb` is installed with `dpkg -i` (its unit, udev rule,
//! sysusers fragment and maintainer scripts, nothing injected but the
//! operator's config and a logging drop-in), the unit is enabled and started
//! (`systemctl enable --now leasedog`); the agent clones its empty data
//! directory from the host node (the leader: PostgreSQL and an agent on the
//! host) and streams; a switchover makes the guest the primary, a second one
//! makes it step down and rejoin; `systemctl stop leasedog` stops it. A
//! driver script in the guest reports the cgroups of every `postgres`
//! process every 2 s (`/proc/PID/cgroup`).

use super::gate::TcpGate;
use super::pg::{lab_template, pg_section, start_host_node};
use super::scenario::{
    config_with, holder, switchover, Lab, GUEST_DIR, GUEST_NODE, HOST_NODE, SYSTEMD_BUDGET,
};
use super::systemd::{Line, SystemdGuest, SystemdSpec, CTL_DIR};
use crate::etcd::EventKind;
use crate::pg::{free_port, psql};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// The guest's data directory: absent until the agent clones it.
pub const DEB_DATA: &str = "/var/lib/postgresql/deb/data";

/// What one run saw.
#[derive(Debug, Clone, Default)]
pub struct DebTrial {
    /// The driver's report of `dpkg -i` (exit code, last lines).
    pub dpkg: Option<String>,
    /// `dpkg-query` status and the unit's fragment path after the install.
    pub installed: Option<String>,
    /// `systemctl enable --now`: exit code, is-enabled, is-active.
    pub enabled: Option<String>,
    /// The agent's "runs as a replica of" line after the clone.
    pub replica: Option<Line>,
    /// The agent's clone line ("cloned" / "pg_basebackup").
    pub cloned: Option<String>,
    /// A row written on the host leader, read on the guest replica.
    pub streamed: Option<Result<String, String>>,
    /// `pg_is_in_recovery()` on the guest as a replica.
    pub replica_recovery: Option<Result<String, String>>,
    /// The switchover to the guest: exit code and output.
    pub switch_to: (i32, String),
    pub promoted: Option<Line>,
    /// An INSERT on the guest as the primary.
    pub guest_write: Option<Result<String, String>>,
    /// The switchover back to the host.
    pub switch_back: (i32, String),
    pub rejoined: Option<Line>,
    /// The guest's write, read on the host after the switchover back.
    pub guest_write_on_host: Option<Result<String, String>>,
    pub rejoined_recovery: Option<Result<String, String>>,
    /// The driver's report after `systemctl stop leasedog`.
    pub stopped: Option<Line>,
    /// The agent logged "disarmed (magic close)" after the stop was asked.
    pub disarmed_at_stop: bool,
    /// `pg_controldata`'s cluster state after the stop ("shut down in
    /// recovery" for a clean stop of a standby).
    pub pg_state: Option<String>,
    /// The key's holder after the stop.
    pub holder_after_stop: Option<String>,
    /// A watchdog reset (QMP) or "watchdog did not stop!" after the stop.
    pub reset_after_stop: Option<String>,
    /// Every `LABDRV PGCG` report: host time, cgroups counted.
    pub pg_cgroups: Vec<(Duration, String)>,
    pub wall: Duration,
    pub console: String,
}

impl DebTrial {
    /// PGCG reports at or after `t` that saw at least one `postgres`.
    pub fn cgroups_after(&self, t: Duration) -> Vec<&str> {
        self.pg_cgroups
            .iter()
            .filter(|(h, c)| *h >= t && c.contains("::"))
            .map(|(_, c)| c.as_str())
            .collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "deb lifecycle: dpkg {:?}; installed {:?}; enable {:?}; cloned {:?}; replica {}; \
             streamed {:?}; recovery {:?}; switchover to guest {:?}; promoted {}; guest write {:?}; \
             switchover back {:?}; rejoined {}; guest write on host {:?}; recovery after {:?}; \
             stopped {:?}; disarmed {}; pg state {:?}; holder after stop {:?}; reset after stop {:?}; \
             {} cgroup reports; trial {:.1} s",
            self.dpkg,
            self.installed,
            self.enabled,
            self.cloned,
            self.replica.as_ref().map_or("-", |l| l.text.as_str()),
            self.streamed,
            self.replica_recovery,
            self.switch_to,
            self.promoted.is_some(),
            self.guest_write,
            self.switch_back,
            self.rejoined.as_ref().map_or("-", |l| l.text.as_str()),
            self.guest_write_on_host,
            self.rejoined_recovery,
            self.stopped.as_ref().map(|l| l.text.as_str()),
            self.disarmed_at_stop,
            self.pg_state,
            self.holder_after_stop,
            self.reset_after_stop,
            self.pg_cgroups.len(),
            self.wall.as_secs_f64(),
        )
    }
}

/// The guest's script: install, configure, enable and start; report the
/// cgroups of PostgreSQL's processes until the host asks for the stop.
fn driver(deb: &Path) -> String {
    format!(
        r#"log() {{ echo "LABDRV $*" > /dev/kmsg; }}
dpkg -i {deb} > /tmp/dpkg.log 2>&1
log "DPKG rc=$? $(tail -n 3 /tmp/dpkg.log | tr '\n' ' ')"
log "INSTALLED $(dpkg-query -W -f='${{Status}} ${{Version}}' leasedog) $(systemctl show -p FragmentPath leasedog.service) $(ls -ln /dev/watchdog0 | cut -d' ' -f1,3,4)"
install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/deb
install -m 0640 -o root -g leasedog /etc/lab/leasedog.toml /etc/leasedog/leasedog.toml
systemctl enable --now leasedog.service
log "ENABLED rc=$? $(systemctl is-enabled leasedog.service) $(systemctl is-active leasedog.service)"
while [ ! -e {CTL_DIR}/stop ]; do
  log "PGCG $(for p in $(pgrep -x postgres); do cat /proc/$p/cgroup; done | sort | uniq -c | tr -s ' \n' '  ')"
  sleep 2
done
systemctl stop leasedog.service
log "STOPPED rc=$? $(systemctl show leasedog.service -p ActiveState -p Result | tr '\n' ' ') postgres left $(pgrep -x postgres | wc -l)"
log "PGSTATE $(/usr/lib/postgresql/15/bin/pg_controldata {DEB_DATA} | grep 'cluster state')"
"#,
        deb = deb.display()
    )
}

/// Retries `q` on `port` until it answers `want` (or 60 s), the last answer.
fn psql_until(port: u16, q: &str, want: &str) -> Result<String, String> {
    let mut last = Err("never asked".to_string());
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        last = psql(port, q);
        if last.as_deref() == Ok(want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    last
}

/// One run of the lifecycle (see the module's comment); `deb` is the
/// package file (the guest reads it through the host's root).
pub fn deb_trial(lab: &Lab, deb: &Path) -> Result<DebTrial, String> {
    let t0 = Instant::now();
    let scope = lab.new_scope();
    let watch = lab.watch(&scope)?;
    let gate = TcpGate::start(lab.etcd.client_port()).map_err(|e| format!("gate: {e}"))?;
    let port = free_port();
    // The host node first, alone: it wins the key and promotes.
    let template = lab_template()?;
    let host = start_host_node(lab, &lab.etcd.endpoints(), &scope, &template, port)?;
    watch
        .wait_for(
            |e| e.kind == EventKind::Put && holder(&e.value).as_deref() == Some(HOST_NODE),
            Duration::from_secs(60),
        )
        .ok_or_else(|| format!("the host node did not lead:\n{}", host.agent.log()))?;
    let ctl = lab.work().join(format!("debctl-{scope}"));
    fs::create_dir_all(&ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
    let mut cfg = config_with(
        &SYSTEMD_BUDGET,
        &scope,
        GUEST_NODE,
        &format!("http://10.0.2.2:{}", gate.port()),
        "keep-pinging",
        "[[watchdog.device]]\nkind = \"device\"\npath = \"/dev/watchdog0\"\n",
        GUEST_DIR,
    );
    cfg.push_str(&pg_section("/run/postgresql", port, DEB_DATA, "127.0.0.1"));
    let g = SystemdGuest::boot(SystemdSpec {
        name: "deb".into(),
        // Logging only: the unit and its ExecStart are the package's.
        dropin: "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n".into(),
        driver: driver(deb),
        files: vec![("/etc/lab/leasedog.toml".into(), cfg.into_bytes())],
        i6300esb: true,
        network: true,
        ctl_dir: Some(ctl.clone()),
        forward_tcp: vec![port],
        packaged: true,
        ..SystemdSpec::default()
    })?;
    let mut t = DebTrial::default();
    let text = |l: Option<Line>| l.map(|l| l.text);
    let finish = |mut t: DebTrial, g: &SystemdGuest| {
        t.pg_cgroups = g
            .lines()
            .into_iter()
            .filter_map(|l| {
                Some((
                    l.host,
                    l.text.split_once("LABDRV PGCG")?.1.trim().to_string(),
                ))
            })
            .collect();
        t.wall = t0.elapsed();
        t.console = format!(
            "{}\n--- host agent ---\n{}",
            g.console_log(),
            host.agent.log()
        );
        t
    };
    t.dpkg = text(g.wait_line("LABDRV DPKG", Duration::from_secs(240)));
    t.installed = text(g.wait_line("LABDRV INSTALLED", Duration::from_secs(30)));
    t.enabled = text(g.wait_line("LABDRV ENABLED", Duration::from_secs(60)));
    t.replica = g.wait_line("runs as a replica of", Duration::from_secs(240));
    if t.replica.is_none() {
        return Ok(finish(t, &g));
    }
    t.cloned = g
        .lines()
        .into_iter()
        .find(|l| l.text.contains("cloned") || l.text.contains("basebackup"))
        .map(|l| l.text);
    let sync = crate::wait_until(Duration::from_secs(120), || {
        psql(
            host.pg.port,
            &format!(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{GUEST_NODE}'"
            ),
        )
        .is_ok_and(|s| s == "sync")
    });
    if !sync {
        return Ok(finish(t, &g));
    }
    let _ = psql(
        host.pg.port,
        "CREATE TABLE deb (n int); INSERT INTO deb VALUES (1)",
    );
    t.streamed = Some(psql_until(
        port,
        "SELECT count(*) FROM deb WHERE n = 1",
        "1",
    ));
    t.replica_recovery = Some(psql(port, "SELECT pg_is_in_recovery()"));
    t.switch_to = switchover(lab, &host.config_path(), GUEST_NODE);
    t.promoted = g.wait_line("promoted (leader", Duration::from_secs(120));
    if t.promoted.is_none() {
        return Ok(finish(t, &g));
    }
    t.guest_write = Some(psql_until(
        port,
        "INSERT INTO deb VALUES (2) RETURNING n",
        "2",
    ));
    // Synchronous again (the host node now follows the guest) before the
    // switchover back, which waits for the target to have the final WAL.
    crate::wait_until(Duration::from_secs(120), || {
        psql(
            port,
            &format!(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{HOST_NODE}'"
            ),
        )
        .is_ok_and(|s| s == "sync")
    });
    t.switch_back = switchover(lab, &host.config_path(), HOST_NODE);
    let promoted_at = t.promoted.as_ref().unwrap().host;
    crate::wait_until(Duration::from_secs(120), || {
        t.rejoined = g
            .lines()
            .into_iter()
            .find(|l| l.host > promoted_at && l.text.contains("runs as a replica of"));
        t.rejoined.is_some()
    });
    t.guest_write_on_host = Some(psql_until(
        host.pg.port,
        "SELECT count(*) FROM deb WHERE n = 2",
        "1",
    ));
    t.rejoined_recovery = Some(psql_until(port, "SELECT pg_is_in_recovery()", "t"));
    // One more cgroup report after the rejoin.
    std::thread::sleep(Duration::from_secs(5));
    let stop_at = crate::lab::proc::host_boottime();
    fs::write(ctl.join("stop"), "stop\n").map_err(|e| e.to_string())?;
    t.stopped = g.wait_line("LABDRV STOPPED", Duration::from_secs(120));
    let after = |needle: &str| {
        g.lines()
            .into_iter()
            .any(|l| l.host > stop_at && l.text.contains(needle))
    };
    t.disarmed_at_stop = after("disarmed (magic close)");
    t.pg_state = text(g.wait_line("LABDRV PGSTATE", Duration::from_secs(10)));
    // W = T - M = 3 s: a device left armed would reset the guest by now.
    let reset = g.wait_reset(Duration::from_secs(10));
    t.reset_after_stop = reset
        .map(|r| r.name)
        .or_else(|| after("watchdog did not stop!").then(|| "did not stop".into()));
    t.holder_after_stop = watch
        .events()
        .last()
        .filter(|e| e.kind == EventKind::Put)
        .and_then(|e| holder(&e.value));
    Ok(finish(t, &g))
}
