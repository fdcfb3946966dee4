//! sd_notify(3) without libsystemd: one datagram per message to the socket
//! named by `$NOTIFY_SOCKET` (a path, or an abstract name starting with '@').
//!
//! The unit is `Type=notify` with `WatchdogSec=`: READY=1 once the main loop
//! runs, WATCHDOG=1 from every loop (so systemd restarts a hung loop),
//! STATUS= on changes, STOPPING=1 on shutdown. Outside systemd every call is
//! a no-op. Sends never block: a full socket drops the message.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, SockAddr)>,
    /// `$WATCHDOG_USEC`, when systemd asked for keep-alives.
    watchdog: Option<Duration>,
}

enum SockAddr {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring `$WATCHDOG_PID`
    /// when set: keep-alives are only for the process systemd watches).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec();
            let addr = match bytes.first() {
                Some(b'@') => SockAddr::Abstract(bytes[1..].to_vec()),
                Some(b'/') => SockAddr::Path(s.into()),
                _ => return None,
            };
            let sock = UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        });
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_ok)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            socket: None,
            watchdog: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// systemd's watchdog interval, if it expects WATCHDOG=1.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message, e.g. "READY=1\nSTATUS=...".
    pub fn send(&self, msg: &str) -> io::Result<()> {
        let Some((sock, addr)) = &self.socket else {
            return Ok(());
        };
        match addr {
            SockAddr::Path(p) => sock.send_to(msg.as_bytes(), p).map(|_| ()),
            SockAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let a = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &a).map(|_| ())
            }
        }
    }

    pub fn ready(&self, status: &str) {
        let _ = self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        let _ = self.send(&format!("STATUS={}", one_line(status)));
    }

    /// WATCHDOG=1, only when systemd asked for it.
    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            let _ = self.send("WATCHDOG=1");
        }
    }

    pub fn stopping(&self) {
        let _ = self.send("STOPPING=1");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    // The environment is process-wide: tests that set it take turns.
    static ENV: Mutex<()> = Mutex::new(());

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn with_env<T>(vars: &[(&str, Option<&str>)], f: impl FnOnce() -> T) -> T {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in vars {
            match v {
                // SAFETY: serialized by ENV; no other thread reads these vars.
                Some(v) => unsafe { std::env::set_var(k, v) },
                None => unsafe { std::env::remove_var(k) },
            }
        }
        f()
    }

    #[test]
    fn path_socket_gets_ready_status_watchdog_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = with_env(
            &[
                ("NOTIFY_SOCKET", Some(path.to_str().unwrap())),
                ("WATCHDOG_USEC", Some("30000000")),
                ("WATCHDOG_PID", None),
            ],
            Notifier::from_env,
        );
        assert!(n.enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(30)));
        n.ready("role Follower\nleader b");
        assert_eq!(recv(&server), "READY=1\nSTATUS=role Follower leader b");
        n.watchdog();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.status("role Leader");
        assert_eq!(recv(&server), "STATUS=role Leader");
        n.stopping();
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn abstract_socket_and_no_watchdog_without_usec() {
        let name = format!("leasedog-notify-test-{}", std::process::id());
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = with_env(
            &[
                ("NOTIFY_SOCKET", Some(&format!("@{name}"))),
                ("WATCHDOG_USEC", None),
            ],
            Notifier::from_env,
        );
        assert!(n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.watchdog(); // not asked for: nothing sent
        n.stopping();
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn watchdog_for_another_pid_is_ignored_and_no_socket_is_a_noop() {
        let n = with_env(
            &[
                ("NOTIFY_SOCKET", None),
                ("WATCHDOG_USEC", Some("1000000")),
                ("WATCHDOG_PID", Some("1")),
            ],
            Notifier::from_env,
        );
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x"); // no socket: silently nothing
        assert!(n.send("READY=1").is_ok());
    }
}
