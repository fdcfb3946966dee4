//! A small QMP client: the capabilities handshake, commands, and a reader
//! thread that records every event with QEMU's own timestamp (host wall
//! clock) and the host CLOCK_BOOTTIME at which it arrived.

use super::proc::{host_boottime, realtime_to_boottime};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One QMP event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// e.g. `WATCHDOG`, `SHUTDOWN`, `STOP`.
    pub name: String,
    pub data: Value,
    /// QEMU's timestamp of the event (host wall-clock time).
    pub qmp_time: SystemTime,
    /// `qmp_time` converted to host CLOCK_BOOTTIME (offset sampled on
    /// receipt): the time to compare with other host boottime readings.
    pub boottime: Duration,
    /// Host CLOCK_BOOTTIME when the client read the event (a little later).
    pub received: Duration,
}

impl QmpEvent {
    /// [`QmpEvent::boottime`] in nanoseconds.
    pub fn boottime_ns(&self) -> u64 {
        self.boottime.as_nanos() as u64
    }

    /// A watchdog reset as QEMU reports it: a `WATCHDOG` event (i6300esb
    /// expiry) or `SHUTDOWN` with `guest: true, reason: "guest-reset"` (the
    /// guest kernel restarting, e.g. softdog; with `-no-reboot` QEMU exits;
    /// without it, the same restart is a `RESET` event and the guest reboots).
    /// A kernel panic with `panic=-1` looks the same: check the console.
    pub fn is_reset(&self) -> bool {
        self.name == "WATCHDOG"
            || ((self.name == "SHUTDOWN" || self.name == "RESET")
                && self.data["guest"] == json!(true)
                && self.data["reason"] == json!("guest-reset"))
    }
}

#[derive(Default)]
struct State {
    events: Vec<QmpEvent>,
    closed: bool,
}

pub struct Qmp {
    writer: Mutex<UnixStream>,
    state: Arc<(Mutex<State>, Condvar)>,
    replies: Mutex<mpsc::Receiver<Value>>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").finish_non_exhaustive()
    }
}

fn parse_stamp(v: &Value) -> SystemTime {
    let s = v["seconds"].as_u64().unwrap_or(0);
    let us = v["microseconds"].as_u64().unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us)
}

impl Qmp {
    /// Connects to QEMU's QMP socket (retrying until `deadline` while QEMU
    /// creates it) and negotiates capabilities.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp, String> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("cannot connect to QMP {}: {e}", path.display())),
            }
        };
        let reader = stream.try_clone().map_err(|e| e.to_string())?;
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let st = state.clone();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(reader, st, tx))
            .map_err(|e| e.to_string())?;
        let q = Qmp {
            writer: Mutex::new(stream),
            state,
            replies: Mutex::new(rx),
        };
        // The greeting arrives as the first non-event message.
        q.recv_reply(Duration::from_secs(30))
            .map_err(|e| format!("no QMP greeting: {e}"))?;
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn recv_reply(&self, timeout: Duration) -> Result<Value, String> {
        self.replies
            .lock()
            .unwrap()
            .recv_timeout(timeout)
            .map_err(|e| format!("QMP: no reply ({e})"))
    }

    /// Runs a QMP command; its `return` value, or the QMP error as text.
    pub fn execute(&self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut w = self.writer.lock().unwrap();
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        writeln!(w, "{msg}").map_err(|e| format!("QMP {cmd}: write: {e}"))?;
        // Replies come in order; the writer lock keeps commands one at a time.
        let r = self.recv_reply(Duration::from_secs(30))?;
        drop(w);
        if let Some(e) = r.get("error") {
            return Err(format!("QMP {cmd}: {e}"));
        }
        Ok(r.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `set_link` on a NIC (`nic0` in lab guests): `up = false` cuts it.
    /// Prefer [`super::Guest::set_link`]; likewise use `Guest::pause`/`resume`
    /// rather than `stop`/`cont` here, so the guest clock offset is redone.
    pub fn set_link(&self, name: &str, up: bool) -> Result<(), String> {
        self.execute("set_link", json!({ "name": name, "up": up }))
            .map(|_| ())
    }

    /// Freezes the whole guest (vCPUs stop; its clocks and timers too).
    pub fn stop(&self) -> Result<(), String> {
        self.execute("stop", json!({})).map(|_| ())
    }

    pub fn cont(&self) -> Result<(), String> {
        self.execute("cont", json!({})).map(|_| ())
    }

    /// `query-status`'s `status`, e.g. `running`, `paused`.
    pub fn status(&self) -> Result<String, String> {
        let r = self.execute("query-status", json!({}))?;
        Ok(r["status"].as_str().unwrap_or("").to_string())
    }

    /// Every event received so far.
    pub fn events(&self) -> Vec<QmpEvent> {
        self.state.0.lock().unwrap().events.clone()
    }

    /// True once QEMU closed the socket (it exited).
    pub fn closed(&self) -> bool {
        self.state.0.lock().unwrap().closed
    }

    /// Waits for the first event (already received or future) matching `f`.
    /// `None` on timeout or once QEMU has gone without sending one.
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&QmpEvent) -> bool) -> Option<QmpEvent> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.state;
        let mut st = m.lock().unwrap();
        loop {
            if let Some(e) = st.events.iter().find(|e| f(e)) {
                return Some(e.clone());
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// The first event named `name`.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Option<QmpEvent> {
        self.wait_for(timeout, |e| e.name == name)
    }

    /// The first reset event ([`QmpEvent::is_reset`]).
    pub fn wait_reset(&self, timeout: Duration) -> Option<QmpEvent> {
        self.wait_for(timeout, QmpEvent::is_reset)
    }

    /// The first reset event received so far, if any.
    pub fn reset_event(&self) -> Option<QmpEvent> {
        self.state
            .0
            .lock()
            .unwrap()
            .events
            .iter()
            .find(|e| e.is_reset())
            .cloned()
    }
}

fn read_loop(
    stream: UnixStream,
    state: Arc<(Mutex<State>, Condvar)>,
    replies: mpsc::Sender<Value>,
) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let received = host_boottime();
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let qmp_time = parse_stamp(&v["timestamp"]);
            let ev = QmpEvent {
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
                qmp_time,
                boottime: realtime_to_boottime(qmp_time),
                received,
            };
            let (m, cv) = &*state;
            m.lock().unwrap().events.push(ev);
            cv.notify_all();
        } else {
            let _ = replies.send(v);
        }
    }
    let (m, cv) = &*state;
    m.lock().unwrap().closed = true;
    cv.notify_all();
}
