//! A node of a test cluster on this host: a real PostgreSQL 15, a real agent
//! with a fake watchdog device, and the monitor that turns the device's
//! expiry into a "reset" (SIGKILL of the agent and every PostgreSQL process).
//! The agent's budget is `agent::fake_device_config`'s (T = 4 s).

use crate::agent::{fake_device_config, AgentProcess};
use crate::etcd::BlockingClient;
use crate::fence::FakeWatchdogMonitor;
use crate::pg::PgNode;
use crate::wait_until;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Node {
    pub name: String,
    scope: String,
    eps: Vec<String>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// TOML appended to the agent's configuration (sections of its own).
    extra: String,
    agent_pid: Arc<AtomicI32>,
    agent: Option<AgentProcess>,
    // Dropped before `pg` (field order): no kill races the cluster's removal.
    pub monitor: FakeWatchdogMonitor,
    pub pg: PgNode,
}

impl Node {
    pub fn new(
        bin: &Path,
        scope: &str,
        name: &str,
        eps: &[String],
        pg: PgNode,
        extra: &str,
    ) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("leasedog-node-{name}-"))
            .tempdir()
            .expect("temporary folder");
        let agent_pid = Arc::new(AtomicI32::new(0));
        let monitor =
            FakeWatchdogMonitor::for_node(dir.path().join("wd"), agent_pid.clone(), pg.data_dir());
        Node {
            name: name.into(),
            scope: scope.into(),
            eps: eps.to_vec(),
            bin: bin.to_path_buf(),
            dir,
            extra: extra.into(),
            agent_pid,
            agent: None,
            monitor,
            pg,
        }
    }

    /// The agent's configuration: fake device, `[postgres]` for this node's
    /// cluster, then `extra`.
    pub fn config(&self) -> String {
        let base = fake_device_config(
            &self.scope,
            &self.name,
            &self.eps,
            "required",
            &self.dir.path().join("wd"),
            &self.dir.path().join("audit"),
        );
        format!(
            "{base}[postgres]\nhost = \"{socket}\"\nport = {port}\ndata_dir = \"{data}\"\n\
             bin_dir = \"{bin}\"\nadvertise_host = \"127.0.0.1\"\nstop_timeout = 1.0\n{extra}\n",
            socket = self.pg.socket_dir().display(),
            port = self.pg.port,
            data = self.pg.data_dir().display(),
            bin = crate::pg::BIN_DIR,
            extra = self.extra,
        )
    }

    pub fn start_agent(&mut self) {
        drop(self.agent.take());
        let a = AgentProcess::spawn(&self.bin, &self.name, &self.config(), &[]).expect("agent");
        self.agent_pid.store(a.pid() as i32, Ordering::SeqCst);
        self.agent = Some(a);
    }

    /// The agent's audit log (`<node>.audit.jsonl` in its audit directory).
    pub fn audit_log(&self) -> PathBuf {
        self.dir
            .path()
            .join("audit")
            .join(format!("{}.audit.jsonl", self.name))
    }

    pub fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent started")
    }

    /// `Some(true)` writable, `Some(false)` in recovery, `None` not answering.
    pub fn writable(&self) -> Option<bool> {
        self.pg
            .try_sql("SELECT pg_is_in_recovery()")
            .ok()
            .map(|v| v == "f")
    }

    pub fn streaming(&self) -> bool {
        self.pg
            .try_sql("SELECT status FROM pg_stat_wal_receiver")
            .is_ok_and(|s| s == "streaming")
    }
}

pub fn leader_key(scope: &str) -> String {
    format!("/leasedog/{scope}/leader")
}

/// The leader key's holder, as etcd has it now.
pub fn holder(c: &BlockingClient, scope: &str) -> Option<String> {
    let v = c.get(&leader_key(scope)).ok().flatten()?;
    let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
    v.get("node")?.as_str().map(String::from)
}

/// Waits until `want` holds the key; false after `within`.
pub fn wait_holder(c: &BlockingClient, scope: &str, want: &str, within: Duration) -> bool {
    wait_until(within, || holder(c, scope).as_deref() == Some(want))
}
