//! systemd's file-descriptor store for armed devices (sd_notify(3):
//! `FDSTORE=1`, `FDSTOREREMOVE=1`, `BARRIER=1`; the unit's
//! `FileDescriptorStoreMax=`).
//!
//! Why: closing the last descriptor of a running watchdog pings it (kernel
//! `watchdog_release`), so an agent killed while armed resets the node `W`
//! after the kill rather than `W` after its last permitted ping. With a
//! duplicate of each armed device in systemd's store, the agent's death
//! closes nothing that counts. systemd 252 keeps stored descriptors across a
//! crash that is followed by an automatic restart (and a `systemctl restart`)
//! and hands them to the next main process (`LISTEN_FDS`); it closes them
//! when the unit is fully stopped with no job pending (`systemctl stop`, a
//! crash with no restart), which is then the close that pings.
//!
//! A magic close must take the device out of the store first: the kernel
//! stops the timer only on the LAST close, which would otherwise be
//! systemd's, later, with no ping in between. [`NotifySocket::remove`] sends
//! `FDSTOREREMOVE=1` and waits on a `BARRIER=1` (systemd closes the pipe it
//! is given once every earlier message is handled).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

/// Where sd_notify messages go: `$NOTIFY_SOCKET`, a path or an abstract
/// name (`@...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifySocket {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// How long [`NotifySocket::remove`] waits for systemd to confirm.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

impl NotifySocket {
    /// `$NOTIFY_SOCKET`, if the agent runs under a service manager.
    pub fn from_env() -> Option<NotifySocket> {
        let s = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec();
        match bytes.first() {
            Some(b'@') => Some(NotifySocket::Abstract(bytes[1..].to_vec())),
            Some(b'/') => Some(NotifySocket::Path(s.into())),
            _ => None,
        }
    }

    fn sockaddr(&self) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
        // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
        let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let (bytes, offset): (&[u8], usize) = match self {
            NotifySocket::Path(p) => (std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()), 0),
            NotifySocket::Abstract(n) => (n.as_slice(), 1), // leading NUL
        };
        if offset + bytes.len() >= a.sun_path.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET name too long",
            ));
        }
        for (i, b) in bytes.iter().enumerate() {
            a.sun_path[offset + i] = *b as libc::c_char;
        }
        let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
        let len = match self {
            NotifySocket::Path(_) => base + bytes.len() + 1,
            NotifySocket::Abstract(_) => base + 1 + bytes.len(),
        };
        Ok((a, len as libc::socklen_t))
    }

    /// Sends one message with `fds` attached (SCM_RIGHTS).
    pub fn send(&self, state: &str, fds: &[RawFd]) -> io::Result<()> {
        let (addr, addr_len) = self.sockaddr()?;
        // SAFETY: plain socket(2).
        let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sock is a fresh descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut iov = libc::iovec {
            iov_base: state.as_ptr() as *mut libc::c_void,
            iov_len: state.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = if fds.is_empty() {
            0
        } else {
            unsafe { libc::CMSG_SPACE(fd_bytes) as usize }
        };
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain old data; zeroed is valid, fields set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &addr as *const libc::sockaddr_un as *mut libc::c_void;
        msg.msg_namelen = addr_len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: control holds CMSG_SPACE(fd_bytes) bytes, so the first
            // header and its data fit; the pointers come from the CMSG macros.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr() as *const u8,
                    libc::CMSG_DATA(c),
                    fd_bytes as usize,
                );
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts a duplicate of `fd` into the service's store under `name`
    /// (`FDPOLL=0`: a watchdog cannot be polled anyway).
    pub fn store(&self, fd: RawFd, name: &str) -> io::Result<()> {
        self.send(&format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0"), &[fd])
    }

    /// Takes `name` out of the store and returns once systemd has handled
    /// it (or fails after `timeout`: then systemd may still hold it).
    pub fn remove(&self, name: &str, timeout: Duration) -> io::Result<()> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])?;
        self.barrier(timeout)
    }

    /// sd_notify_barrier(3): sends the write end of a pipe with
    /// `BARRIER=1`; the manager closes it after every earlier message.
    pub fn barrier(&self, timeout: Duration) -> io::Result<()> {
        let mut p = [0; 2];
        // SAFETY: p has room for two descriptors.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors we own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        self.send("BARRIER=1", &[w.as_raw_fd()])?;
        drop(w);
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 || pfd.revents & libc::POLLHUP == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the service manager did not confirm within {timeout:?} (BARRIER=1)"),
            ));
        }
        Ok(())
    }
}

/// An FDNAME for a device path: its file name, with what systemd does not
/// accept (control characters, ':') replaced.
pub fn fd_name(path: &std::path::Path) -> String {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "device".into());
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect();
    format!("leasedog-{clean}")
}

/// At start-up: descriptors systemd handed back from its store
/// (`LISTEN_FDS` for this pid) are devices a previous agent left ARMED. They
/// must stay open (a close pings them) and must not leak into children
/// (`pg_ctl`, PostgreSQL): mark them close-on-exec and drop the variables.
/// They are never pinged: this agent has no evidence of its own for them,
/// so the node resets `W` after the previous agent's last ping. Returns the
/// descriptors and their names.
pub fn keep_handed_back() -> Vec<(RawFd, String)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    let mut out = Vec::new();
    if pid_ok {
        for i in 0..n.clamp(0, 1024) {
            let fd = 3 + i;
            // SAFETY: F_SETFD on a descriptor we inherited; failure is harmless.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            out.push((fd, names.get(i as usize).cloned().unwrap_or_default()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use std::os::unix::net::UnixDatagram;

    /// Receives one datagram and the descriptors attached to it.
    fn recv(sock: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut buf = [0u8; 512];
        let mut control = [0u8; 256];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: test-only recvmsg into local buffers.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len() as _;
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            assert!(n >= 0, "{}", io::Error::last_os_error());
            let mut fds = Vec::new();
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count =
                        ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            (
                String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
                fds,
            )
        }
    }

    /// The manager gets the same open file description (what keeps a
    /// running watchdog from being released when the agent dies), under
    /// its name.
    #[test]
    fn store_passes_a_duplicate_of_the_same_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&sock_path).unwrap();
        let mut dev = std::fs::File::create(dir.path().join("dev")).unwrap();
        let ns = NotifySocket::Path(sock_path);
        ns.store(dev.as_raw_fd(), &fd_name(Path::new("/dev/watchdog1")))
            .unwrap();
        let (text, fds) = recv(&manager);
        assert_eq!(text, "FDSTORE=1\nFDNAME=leasedog-watchdog1\nFDPOLL=0");
        assert_eq!(fds.len(), 1);
        // One open file description: a write through the manager's copy
        // moves the agent's offset.
        let mut theirs = std::fs::File::from(fds.into_iter().next().unwrap());
        theirs.write_all(b"V").unwrap();
        assert_eq!(dev.stream_position().unwrap(), 1);
        dev.write_all(b"x").unwrap();
    }

    /// remove = FDSTOREREMOVE=1 + a barrier the manager releases by
    /// closing the pipe; without an answer it fails (the caller then cannot
    /// know that its magic close would be the last close).
    #[test]
    fn remove_waits_for_the_manager() {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&sock_path).unwrap();
        let ns = NotifySocket::Path(sock_path.clone());
        let t = std::thread::spawn(move || {
            let (a, none) = recv(&manager);
            let (b, pipe) = recv(&manager);
            drop(pipe); // what systemd does once it has handled `a`
            (a, none.len(), b, manager)
        });
        ns.remove("leasedog-watchdog1", Duration::from_secs(5))
            .unwrap();
        let (a, n, b, _manager) = t.join().unwrap();
        assert_eq!(a, "FDSTOREREMOVE=1\nFDNAME=leasedog-watchdog1");
        assert_eq!(n, 0);
        assert_eq!(b, "BARRIER=1");

        let _silent = UnixDatagram::bind(dir.path().join("silent")).unwrap();
        let ns = NotifySocket::Path(dir.path().join("silent"));
        let e = ns
            .remove("leasedog-watchdog1", Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // Nobody listening at all: an error at once.
        let ns = NotifySocket::Path(dir.path().join("nobody"));
        assert!(ns.store(0, "x").is_err());
    }

    #[test]
    fn names_are_what_systemd_accepts() {
        assert_eq!(fd_name(Path::new("/dev/watchdog")), "leasedog-watchdog");
        assert_eq!(fd_name(Path::new("/dev/odd:name\n")), "leasedog-odd_name_");
    }

    use std::path::Path;
}
