//! The second node of a [`super::pg`] trial, the guest leader's synchronous
//! standby and the node expected to take over: the host node (PostgreSQL and
//! an agent with a fake device, [`start_host_node`]) or a second QEMU guest
//! with a real watchdog of its own (issue 14's "two guests with real
//! watchdogs").
//!
//! Two guests reach each other through the host: guest B's agent follows
//! the leader's member record `10.0.2.2:gA` (QEMU's forward to the host
//! loopback, then the host's forward into A), so in a two-guest trial both
//! guests advertise `10.0.2.2`; the host's clients use `127.0.0.1:g` of
//! each. Guest B's PostgreSQL is a copy of the template with
//! `standby.signal`, started by its own agent as a standby of the leader.

use super::pg::{boot_pg_guest_named, start_host_node_mode, EtcdEnds, HostNode, GUEST_PG};
use super::scenario::{Dog, Lab, Node, HOST_NODE, LAB_BUDGET};
use super::shell_quote;
use crate::pg::{free_port, psql};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The second guest's node name (audit logs, member record, history).
pub const GUEST_B: &str = "guest2";

/// Which node stands by for the guest leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standby {
    /// PostgreSQL and an agent on the host, a fake device and the reset
    /// stand-in.
    Host,
    /// A second guest with this watchdog.
    Guest(Dog),
}

impl Standby {
    /// A second guest with the watchdog the leader does not have (softdog
    /// for an i6300esb leader, the i6300esb otherwise): a trial covers both
    /// kernel drivers.
    pub fn guest_for(leader: Dog) -> Standby {
        Standby::Guest(match leader {
            Dog::I6300esb => Dog::Softdog,
            Dog::Softdog | Dog::Both => Dog::I6300esb,
        })
    }

    pub fn name(self) -> String {
        match self {
            Standby::Host => "host".into(),
            Standby::Guest(d) => format!("guest ({})", d.name()),
        }
    }

    /// What the guest leader advertises in its member record: the address
    /// its standby reaches it at (the host's loopback from the host node,
    /// QEMU's 10.0.2.2 from another guest).
    pub fn leader_advertise(self) -> &'static str {
        match self {
            Standby::Host => "127.0.0.1",
            Standby::Guest(_) => "10.0.2.2",
        }
    }
}

/// The second node, started.
pub enum Second {
    Host(HostNode),
    Guest {
        // Boxed: a guest is much larger than the host node.
        node: Box<Node>,
        /// Its PostgreSQL port, forwarded from the host at the same number.
        port: u16,
        /// Its config with etcd at the host's loopback, for `leasedog audit
        /// timeline` run on the host.
        host_config: PathBuf,
    },
}

impl Second {
    /// Starts the second node as a standby of the guest leader's
    /// PostgreSQL (at 127.0.0.1:`leader_port` on the host, 10.0.2.2 in a
    /// guest).
    pub fn start(
        lab: &Lab,
        standby: Standby,
        etcd: &EtcdEnds,
        scope: &str,
        template: &Path,
        leader_port: u16,
        synchronous: bool,
    ) -> Result<Second, String> {
        let dog = match standby {
            Standby::Host => {
                return start_host_node_mode(
                    lab,
                    &etcd.host,
                    scope,
                    template,
                    leader_port,
                    synchronous,
                    &LAB_BUDGET,
                )
                .map(Second::Host)
            }
            Standby::Guest(d) => d,
        };
        let port = free_port();
        let mut node = boot_pg_guest_named(lab, GUEST_B, scope, dog, port, false)?;
        let data = format!("{GUEST_PG}/data");
        // Its agent starts it as a standby of the leader it finds in etcd
        // (primary_conninfo from the leader's member record).
        node.guest.run_ok(
            &format!(
                "mkdir -p {GUEST_PG} && cp -a {tpl} {data} && touch {data}/standby.signal \
                 && chown postgres:postgres {GUEST_PG} && chown -R postgres:postgres {data} \
                 && chmod 700 {GUEST_PG} {data}",
                tpl = shell_quote(&template.to_string_lossy()),
            ),
            Duration::from_secs(120),
        )?;
        let cfg = lab.guest_config_with(scope, &node, "keep-pinging", &etcd.ports)?
            + &super::pg::pg_section_mode(GUEST_PG, port, &data, "10.0.2.2", synchronous);
        node.start_agent(&lab.bin, &cfg)?;
        let host_config = node.share.join("leasedog-host.toml");
        fs::write(
            &host_config,
            cfg.replace("http://10.0.2.2:", "http://127.0.0.1:"),
        )
        .map_err(|e| format!("{}: {e}", host_config.display()))?;
        Ok(Second::Guest {
            node: Box::new(node),
            port,
            host_config,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Second::Host(_) => HOST_NODE,
            Second::Guest { .. } => GUEST_B,
        }
    }

    /// Its PostgreSQL port on the host loopback.
    pub fn port(&self) -> u16 {
        match self {
            Second::Host(h) => h.pg.port,
            Second::Guest { port, .. } => *port,
        }
    }

    /// Its PostgreSQL answers `pg_is_in_recovery() = f`.
    pub fn writable(&self) -> bool {
        psql(self.port(), "SELECT pg_is_in_recovery()").as_deref() == Ok("f")
    }

    pub fn audit_path(&self) -> PathBuf {
        match self {
            Second::Host(h) => h.audit_path(),
            Second::Guest { node, .. } => node.audit_path(),
        }
    }

    /// A config `leasedog audit timeline` can read etcd's history with on
    /// the host.
    pub fn config_path(&self) -> PathBuf {
        match self {
            Second::Host(h) => h.config_path(),
            Second::Guest { host_config, .. } => host_config.clone(),
        }
    }

    /// Its agent's log so far.
    pub fn agent_log(&self) -> String {
        match self {
            Second::Host(h) => h.agent.log(),
            Second::Guest { node, .. } => node.agent_log(),
        }
    }

    /// A reset of the second guest (its watchdog or QEMU's): it has no
    /// reason to be reset in any fault of the leader, so the trial counts
    /// one as a failure. The host node has no guest to reset.
    pub fn reset(&self) -> Option<(String, Duration)> {
        match self {
            Second::Host(_) => None,
            Second::Guest { node, .. } => node.guest.reset_time().map(|r| (r.name, r.boottime)),
        }
    }
}

/// A guest's QEMU threads at a lower CPU priority until dropped. On this
/// host two TCG guests share two cores, which separate machines never do:
/// the reset leader rebooting (a TCG boot is CPU-bound) starved the standby
/// guest's agent between winning the key and arming (ArmFailed, "evidence
/// went stale while arming") and kept it from promoting for as long as the
/// boot took. With the reboot behind the standby, the budget is left as it
/// is.
pub struct Behind {
    tids: Vec<String>,
}

impl Behind {
    /// `guest`'s QEMU at nice 19 when the standby is a guest; nothing for
    /// the host node, which runs natively.
    pub fn reboot_of(guest: &super::Guest, standby: Standby) -> Behind {
        let tids = match standby {
            Standby::Host => Vec::new(),
            Standby::Guest(_) => threads(guest.qemu_pid()),
        };
        renice(&tids, 19);
        Behind { tids }
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        renice(&self.tids, 0);
    }
}

/// Nice is per thread on Linux: every thread of `pid`.
fn threads(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn renice(tids: &[String], nice: i32) {
    if tids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(tids)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// The host's 1-minute load and the QEMU guests running that this process
/// did not start (another user's lab on the same cores), for a trial's
/// notes: the two-guest trial's liveness depends on the CPU it gets.
pub fn host_load() -> String {
    let me = std::process::id().to_string();
    let others = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
                .filter(|stat| {
                    // pid (comm) state ppid ...
                    let Some((comm, rest)) = stat.split_once(") ") else {
                        return false;
                    };
                    comm.contains("(qemu-system")
                        && rest.split_whitespace().nth(1) != Some(me.as_str())
                })
                .count()
        })
        .unwrap_or(0);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "host at the fault: load {}, {others} QEMU guest(s) of other processes",
        load.split_whitespace().next().unwrap_or("?")
    )
}
