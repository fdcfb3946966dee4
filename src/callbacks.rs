//! `[callbacks]`: the operator's commands on changes of PostgreSQL's state
//! (Patroni's `on_start`, `on_stop`, `on_role_change`), run as
//! `/bin/sh -c 'COMMAND "$@"' leasedog-callback EVENT ROLE SCOPE`.
//!
//! The core decides when (`Action::Callback`); this runs one on a thread of
//! its own and returns at once, so nothing on the fence path, the pinger or
//! a promotion ever waits for a callback. A callback still running at its
//! timeout is killed with its whole process group. Output and exit status
//! are logged.

use crate::decide::CallbackEvent;
use serde::Deserialize;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// `[callbacks]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksConfig {
    #[serde(default)]
    pub on_start: Option<String>,
    #[serde(default)]
    pub on_stop: Option<String>,
    #[serde(default)]
    pub on_role_change: Option<String>,
    /// Seconds a callback may run before it is killed.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

fn default_timeout() -> f64 {
    30.0
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        CallbacksConfig {
            on_start: None,
            on_stop: None,
            on_role_change: None,
            timeout: default_timeout(),
        }
    }
}

impl CallbacksConfig {
    /// The configuration rule: a positive, finite timeout; no empty command.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            return Err((
                "callbacks.timeout",
                format!("{} is not a positive number of seconds", self.timeout),
            ));
        }
        for (key, c) in [
            ("callbacks.on_start", &self.on_start),
            ("callbacks.on_stop", &self.on_stop),
            ("callbacks.on_role_change", &self.on_role_change),
        ] {
            if c.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err((key, "is empty (leave it out for no callback)".into()));
            }
        }
        Ok(())
    }

    pub fn command(&self, event: CallbackEvent) -> Option<&str> {
        match event {
            CallbackEvent::OnStart => self.on_start.as_deref(),
            CallbackEvent::OnStop => self.on_stop.as_deref(),
            CallbackEvent::OnRoleChange => self.on_role_change.as_deref(),
        }
    }
}

/// How a callback ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exited(Option<i32>),
    /// Killed at its timeout.
    TimedOut,
    /// Could not be started.
    Failed(String),
}

/// Runs `event`'s command, if one is configured, on a thread of its own;
/// returns at once. The thread's handle is for tests.
pub fn spawn(
    cfg: &CallbacksConfig,
    event: CallbackEvent,
    role: &str,
    scope: &str,
) -> Option<std::thread::JoinHandle<Ended>> {
    let command = cfg.command(event)?.to_owned();
    let timeout = Duration::from_secs_f64(cfg.timeout);
    let args = [event.as_str().to_owned(), role.to_owned(), scope.to_owned()];
    std::thread::Builder::new()
        .name(format!("callback-{}", event.as_str()))
        .spawn(move || {
            let ended = run(&command, &args, timeout);
            match &ended {
                Ended::Exited(Some(0)) => {}
                Ended::Exited(code) => warn!(%command, ?code, "callback {} failed", args[0]),
                Ended::TimedOut => {
                    warn!(%command, ?timeout, "callback {} killed at its timeout", args[0])
                }
                Ended::Failed(e) => warn!(%command, "callback {} could not start: {e}", args[0]),
            }
            ended
        })
        .ok()
}

/// Runs one callback to its end or its timeout (the process group is killed
/// then), logging its output.
pub fn run(command: &str, args: &[String], timeout: Duration) -> Ended {
    let mut child = match Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{command} \"$@\""))
        .arg("leasedog-callback")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: the kill at the timeout reaches what it started.
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    // Readers on threads of their own, reporting through a channel: a
    // grandchild that left the group may keep a pipe open for ever, and the
    // runner must not wait for it.
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    for (i, r) in [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(mut r) = r else { continue };
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut s = Vec::new();
            // Bounded: a chatty callback must not fill the agent's memory.
            let _ = (&mut r).take(64 * 1024).read_to_end(&mut s);
            let _ = tx.send((i, String::from_utf8_lossy(&s).into_owned()));
        });
    }
    drop(tx);
    let started = Instant::now();
    let ended = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ended::Exited(status.code()),
            Ok(None) if started.elapsed() >= timeout => {
                // SAFETY: kill(2) on the group this child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break Ended::TimedOut;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Ended::Failed(e.to_string()),
        }
    };
    let mut out = [String::new(), String::new()];
    let until = Instant::now() + Duration::from_secs(1);
    while let Ok((i, text)) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        out[i] = text;
    }
    info!(
        %command,
        args = ?args,
        ?ended,
        took = ?started.elapsed(),
        stdout = out[0].as_str(),
        stderr = out[1].as_str(),
        "callback ran"
    );
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_gets_event_role_and_scope_as_its_arguments() {
        let dir = std::env::temp_dir().join(format!("leasedog-cb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("args");
        let cmd = format!("echo >>{}", file.display());
        let args = ["on_start".to_string(), "replica".into(), "main".into()];
        assert_eq!(
            run(&cmd, &args, Duration::from_secs(20)),
            Ended::Exited(Some(0))
        );
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "on_start replica main\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hanging_callback_and_its_children_are_killed_at_the_timeout() {
        let t0 = Instant::now();
        // The shell's child (sleep) holds the output pipes: only a kill of
        // the group lets the readers finish.
        let ended = run(
            "sleep 600; true",
            &["on_stop".into()],
            Duration::from_millis(300),
        );
        assert_eq!(ended, Ended::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_grandchild_that_leaves_the_group_holding_the_output_does_not_hold_the_runner() {
        let t0 = Instant::now();
        // setsid escapes the group kill; its sleep keeps stdout open.
        let ended = run("setsid sleep 30 & exit 0;", &[], Duration::from_secs(20));
        assert_eq!(ended, Ended::Exited(Some(0)));
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_failing_callback_reports_its_exit_status() {
        assert_eq!(
            run("exit 3;", &[], Duration::from_secs(20)),
            Ended::Exited(Some(3))
        );
    }

    #[test]
    fn bad_callback_settings_name_the_key() {
        let mut c = CallbacksConfig::default();
        assert!(c.check().is_ok());
        c.timeout = 0.0;
        assert_eq!(c.check().unwrap_err().0, "callbacks.timeout");
        c.timeout = 5.0;
        c.on_stop = Some("  ".into());
        assert_eq!(c.check().unwrap_err().0, "callbacks.on_stop");
    }
}
