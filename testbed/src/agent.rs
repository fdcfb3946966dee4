//! leasedog agents as real processes: a config written to a temp dir, the
//! binary spawned with its stderr captured to a log file, and helpers to
//! stall (SIGSTOP), resume, kill and stop it. Dropping the handle SIGCONTs
//! and SIGKILLs the process.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub struct AgentProcess {
    pub name: String,
    child: Option<Child>,
    dir: TempDir,
    exit: Option<ExitStatus>,
}

impl AgentProcess {
    /// Writes `config` and starts `bin run --config`. `env` is added to the
    /// agent's environment (e.g. LEASEDOG_FAULT_DIR).
    pub fn spawn(bin: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("leasedog-agent-{name}-"))
            .tempdir()?;
        let cfg = dir.path().join("leasedog.toml");
        fs::write(&cfg, config)?;
        let log = fs::File::create(dir.path().join("agent.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("LEASEDOG_LOG", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        Ok(AgentProcess {
            name: name.into(),
            child: Some(child),
            dir,
            exit: None,
        })
    }

    /// A directory owned by this agent's handle (for records and fault flags).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: kill with a pid we spawned.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn stall(&self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    pub fn resume(&self) -> io::Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.exit = Some(st);
                }
            }
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Polls the log until `needle` appears.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Resident memory in KiB (VmRSS), if the process is alive.
    pub fn rss_kib(&self) -> Option<u64> {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.exit.get_or_insert(st);
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of agent {} ----\n{}", self.name, self.log());
        }
    }
}

/// The budget the process-level tests use: T = 4 s, M = 2 s, R = 1 s (so
/// W = 2 s and the ping window M - R = 1 s), loop 0.4 s, requests 0.5 s,
/// pings every 50 ms.
pub const TEST_TTL_SECS: u64 = 4;

/// An agent configuration with the test budget, one fake watchdog device
/// recording into `record` (test builds only), and the audit log in `audit`.
/// Tests append further sections (`[postgres]`, `[metrics]`) to the text.
pub fn fake_device_config(
    scope: &str,
    node: &str,
    endpoints: &[String],
    mode: &str,
    record: &Path,
    audit: &Path,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        r#"scope = "{scope}"
node = "{node}"
[etcd]
endpoints = [{eps}]
request_timeout = 0.5
[timing]
ttl = {TEST_TTL_SECS}
safety_margin = 2.0
reset_allowance = 1.0
loop_interval = 0.4
[watchdog]
mode = "{mode}"
ping_interval = 0.05
[[watchdog.device]]
kind = "fake"
record = "{record}"
[audit]
dir = "{audit}"
"#,
        eps = eps.join(", "),
        record = record.display(),
        audit = audit.display()
    )
}
