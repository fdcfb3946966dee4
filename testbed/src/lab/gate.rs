//! A TCP gate on the host's loopback in front of one port (the lab's etcd):
//! guests connect to 10.0.2.2:[`TcpGate::port`] and are relayed to the
//! target. [`TcpGate::cut`] partitions them from it alone: every relayed
//! connection is shut down and new ones are closed at once, while the
//! guest's other traffic (a port forward to its PostgreSQL) goes on, unlike
//! QMP `set_link`, which takes the whole NIC down.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct TcpGate {
    port: u16,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpGate {
    /// Listens on 127.0.0.1 (a free port) and relays to 127.0.0.1:`target`.
    pub fn start(target: u16) -> io::Result<TcpGate> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let open = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (o, s, c) = (open.clone(), stop.clone(), conns.clone());
        std::thread::Builder::new()
            .name("tcp gate".into())
            .spawn(move || {
                for down in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(down) = down else { continue };
                    if !o.load(Ordering::SeqCst) {
                        continue; // cut: closed at once
                    }
                    let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let mut held = c.lock().unwrap();
                    // Checked again under the lock: a cut in between would miss it.
                    if !o.load(Ordering::SeqCst) {
                        continue;
                    }
                    for (from, to) in [(&down, &up), (&up, &down)] {
                        let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                            continue;
                        };
                        std::thread::spawn(move || {
                            let _ = io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Write);
                        });
                    }
                    held.push(down);
                    held.push(up);
                }
            })?;
        Ok(TcpGate {
            port,
            open,
            stop,
            conns,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Heals the partition: new connections are relayed again.
    pub fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Partitions: relayed connections are shut down, new ones refused.
    pub fn cut(&self) {
        let mut held = self.conns.lock().unwrap();
        self.open.store(false, Ordering::SeqCst);
        for c in held.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
