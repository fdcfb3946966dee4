//! Real etcd 3.4 processes on loopback ports, a host-side key watch that
//! timestamps every event on CLOCK_BOOTTIME, and a small blocking client.
//!
//! Every process started here is SIGCONTed and SIGKILLed, and its data dir
//! removed, when its handle drops (also while a test unwinds from a panic).

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

/// Debian's etcd-server package installs the server here.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// Overrides [`ETCD_BIN`] (e.g. a newer etcd for a one-off comparison).
pub const ETCD_BIN_ENV: &str = "LEASEDOG_ETCD";

/// How long a fresh etcd may take to elect a leader on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of every request made by [`BlockingClient`] and the watch thread.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The host's CLOCK_BOOTTIME in nanoseconds: the same clock the agent fences
/// on, so host-side observations can be compared with the agent's records.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn etcd_bin() -> io::Result<PathBuf> {
    let bin = std::env::var_os(ETCD_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ETCD_BIN));
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "etcd not found at {}: install Debian's `etcd-server` package \
                 (apt-get install etcd-server) or set {ETCD_BIN_ENV}",
                bin.display()
            ),
        ))
    }
}

/// A free TCP port on 127.0.0.1 (bound to :0, then released).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Data dirs go to tmpfs when there is one: etcd fsyncs every write, and on a
/// shared 2-core machine disk fsyncs would dominate the tests' run time.
fn data_root() -> io::Result<TempDir> {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix("leasedog-etcd-").to_owned();
    if shm.is_dir() {
        if let Ok(d) = b.tempdir_in(shm) {
            return Ok(d);
        }
    }
    b.tempdir()
}

fn tail(path: &Path, max: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether every thread of `pid` is in state T (stopped), per /proc.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}

/// `GET /health` over plain HTTP: true once the member serves requests and
/// sees a leader.
fn healthy(client_port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, client_port).into(),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// One etcd member: its process, ports and log. The data dir belongs to the
/// owner ([`EtcdServer`] or [`EtcdCluster`]).
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl Member {
    fn new(root: &Path, name: &str) -> io::Result<Member> {
        Ok(Member {
            name: name.to_string(),
            client_port: free_port()?,
            peer_port: free_port()?,
            data_dir: root.join(format!("{name}.etcd")),
            log: root.join(format!("{name}.log")),
            child: None,
            stopped: false,
        })
    }

    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Spawns etcd. `initial_cluster` only matters on the first start: on a
    /// restart etcd reads membership from its data dir.
    fn spawn(&mut self, initial_cluster: &str, token: &str) -> io::Result<()> {
        let bin = etcd_bin()?;
        let log = File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(&bin)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.client_url())
            .arg("--advertise-client-urls")
            .arg(self.client_url())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-token")
            .arg(token)
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {}: {e}", bin.display())))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    fn pid(&self) -> io::Result<u32> {
        self.child.as_ref().map(|c| c.id()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("etcd member {} is not running", self.name),
            )
        })
    }

    /// Fails with the log's tail if the process has already exited.
    fn check_alive(&mut self) -> io::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(io::Error::other(format!("etcd {} not running", self.name)));
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            return Err(io::Error::other(format!(
                "etcd {} exited during start-up ({status}); log tail:\n{}",
                self.name,
                tail(&self.log, 2000)
            )));
        }
        Ok(())
    }

    /// Returns once every thread of etcd is stopped: SIGSTOP is delivered
    /// asynchronously, and on a busy machine a thread can still answer a
    /// request for a moment after kill(2) returned.
    fn stop(&mut self) -> io::Result<()> {
        let pid = self.pid()?;
        signal(pid, libc::SIGSTOP)?;
        self.stopped = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd {} (pid {pid}) not stopped 5 s after SIGSTOP",
                        self.name
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn resume(&mut self) -> io::Result<()> {
        signal(self.pid()?, libc::SIGCONT)?;
        self.stopped = false;
        Ok(())
    }

    /// SIGCONT (a stopped process cannot be reaped promptly), SIGKILL, reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }
}

/// Waits until every listed member answers /health, failing early (with its
/// log) if one exits.
fn wait_healthy(members: &mut [&mut Member]) -> io::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut all = true;
        for m in members.iter_mut() {
            m.check_alive()?;
            if !healthy(m.client_port) {
                all = false;
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = members
                .iter()
                .map(|m| format!("--- {} ---\n{}", m.name, tail(&m.log, 1500)))
                .collect();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "etcd not healthy after {START_TIMEOUT:?}; logs:\n{}",
                    logs.join("\n")
                ),
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How often start-up is retried with fresh ports: a port picked free can be
/// taken by another test before etcd binds it.
const START_ATTEMPTS: usize = 3;

/// A single-member etcd on 127.0.0.1 (QEMU guests reach it through 10.0.2.2,
/// user-mode networking's forward to the host loopback).
pub struct EtcdServer {
    member: Member,
    // Dropped after `member` is killed (field order), removing the data dir.
    dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd on free ports in a fresh data dir and waits until it is
    /// healthy (bounded by 30 s).
    pub fn start() -> io::Result<EtcdServer> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let dir = data_root()?;
            let mut member = Member::new(dir.path(), "single")?;
            let cluster = format!("{}={}", member.name, member.peer_url());
            member.spawn(&cluster, "leasedog-single")?;
            match wait_healthy(&mut [&mut member]) {
                Ok(()) => return Ok(EtcdServer { member, dir }),
                Err(e) => {
                    member.kill();
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> String {
        self.member.client_url()
    }

    pub fn client_port(&self) -> u16 {
        self.member.client_port
    }

    /// `[client_url()]`, for APIs that take an endpoint list.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url()]
    }

    pub fn pid(&self) -> Option<u32> {
        self.member.child.as_ref().map(|c| c.id())
    }

    /// Freezes etcd with SIGSTOP: its sockets stay open but nothing answers.
    pub fn stop(&mut self) -> io::Result<()> {
        self.member.stop()
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn resume(&mut self) -> io::Result<()> {
        self.member.resume()
    }

    /// SIGKILL; the data dir is kept so [`restart`](Self::restart) can reuse it.
    pub fn kill(&mut self) {
        self.member.kill()
    }

    /// Starts the (killed) server again on the same ports and data dir and
    /// waits until it is healthy. Leases survive; etcd refreshes them.
    pub fn restart(&mut self) -> io::Result<()> {
        self.member.kill();
        let cluster = format!("{}={}", self.member.name, self.member.peer_url());
        self.member.spawn(&cluster, "leasedog-single")?;
        wait_healthy(&mut [&mut self.member])
    }

    /// etcd's own log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.member.log
    }

    pub fn data_root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.member.kill();
    }
}

/// An n-member etcd cluster on loopback with a static initial cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    // Dropped after the members are killed (field order).
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until all are healthy (they agree on a
    /// leader).
    pub fn start(n: usize) -> io::Result<EtcdCluster> {
        assert!(n >= 1, "a cluster needs at least one member");
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let dir = data_root()?;
            let members = (0..n)
                .map(|i| Member::new(dir.path(), &format!("m{i}")))
                .collect::<io::Result<Vec<_>>>()?;
            // Ports picked one after another can collide with each other too.
            let ports: HashSet<u16> = members
                .iter()
                .flat_map(|m| [m.client_port, m.peer_port])
                .collect();
            if ports.len() != 2 * n {
                continue;
            }
            let token = format!(
                "leasedog-{}",
                dir.path().file_name().unwrap().to_string_lossy()
            );
            let mut cluster = EtcdCluster {
                members,
                token,
                dir,
            };
            match cluster.spawn_all() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e), // Drop kills what started
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("could not pick distinct free ports")))
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_all(&mut self) -> io::Result<()> {
        let ic = self.initial_cluster();
        for m in &mut self.members {
            m.spawn(&ic, &self.token)?;
        }
        let mut refs: Vec<&mut Member> = self.members.iter_mut().collect();
        wait_healthy(&mut refs)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of all members (killed ones included): give the agent
    /// all of them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    pub fn client_url(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    /// The index of the member the running, unfrozen members agree is the
    /// raft leader. Waits (bounded) through an election.
    pub fn leader_index(&self, timeout: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut last_err;
        loop {
            match self.leader_once() {
                Ok(Some(i)) => return Ok(i),
                Ok(None) => last_err = "members do not agree on a leader".into(),
                Err(e) => last_err = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no etcd leader after {timeout:?}: {last_err}"),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn leader_once(&self) -> io::Result<Option<usize>> {
        let live: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some() && !self.members[i].stopped)
            .collect();
        let mut ids = vec![None; self.members.len()];
        let mut leaders = HashSet::new();
        for &i in &live {
            let c = BlockingClient::connect(&[self.members[i].client_url()])?;
            let (member_id, leader_id) = c.status()?;
            ids[i] = Some(member_id);
            leaders.insert(leader_id);
        }
        if leaders.len() != 1 {
            return Ok(None);
        }
        let leader = leaders.into_iter().next().unwrap();
        Ok(ids.iter().position(|id| *id == Some(leader)))
    }

    /// SIGKILLs member `i` (its data dir is kept for [`restart`](Self::restart)).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill()
    }

    /// Freezes member `i` with SIGSTOP.
    pub fn stop(&mut self, i: usize) -> io::Result<()> {
        self.members[i].stop()
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) -> io::Result<()> {
        self.members[i].resume()
    }

    /// Starts killed member `i` again from its data dir and waits until it
    /// is healthy.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        let ic = self.initial_cluster();
        let m = &mut self.members[i];
        m.kill();
        m.spawn(&ic, &self.token)?;
        wait_healthy(&mut [m])
    }

    /// Starts the killed members `idx` again together (after a loss of
    /// quorum none of them can be healthy alone) and waits until all are.
    pub fn restart_many(&mut self, idx: &[usize]) -> io::Result<()> {
        let ic = self.initial_cluster();
        for &i in idx {
            let m = &mut self.members[i];
            m.kill();
            m.spawn(&ic, &self.token)?;
        }
        let mut refs: Vec<&mut Member> = self
            .members
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| idx.contains(i))
            .map(|(_, m)| m)
            .collect();
        wait_healthy(&mut refs)
    }

    pub fn log_path(&self, i: usize) -> &Path {
        &self.members[i].log
    }

    pub fn data_root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

fn client_options() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(Duration::from_secs(2))
}

fn to_io(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// A synchronous etcd client for tests: each call runs on its own
/// current-thread runtime with a 5 s deadline.
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: Vec<String>,
}

/// A key's value and metadata as [`BlockingClient::get_kv`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
    pub create_revision: i64,
    pub mod_revision: i64,
}

impl BlockingClient {
    pub fn connect<S: AsRef<str>>(endpoints: &[S]) -> io::Result<BlockingClient> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt
            .block_on(async {
                tokio::time::timeout(
                    CLIENT_TIMEOUT,
                    Client::connect(&endpoints, Some(client_options())),
                )
                .await
            })
            .map_err(|_| to_io(&format!("connecting to {endpoints:?}"), "timed out"))?
            .map_err(|e| to_io(&format!("connecting to {endpoints:?}"), e))?;
        Ok(BlockingClient {
            rt,
            client,
            endpoints,
        })
    }

    /// Runs `f` against the client under one 5 s deadline, retrying while
    /// the failure is a broken connection: with several endpoints, the first
    /// request after a member died can land on its dead connection.
    fn run<T, F, Fut>(&self, what: &str, f: F) -> io::Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let res = self
                .rt
                .block_on(async { tokio::time::timeout(left, f(self.client.clone())).await });
            match res {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if is_transport(&e) && Instant::now() + RETRY_PAUSE < deadline => {
                    thread::sleep(RETRY_PAUSE);
                }
                Ok(Err(e)) => return Err(to_io(&format!("{what} at {:?}", self.endpoints), e)),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{what} at {:?} timed out after {CLIENT_TIMEOUT:?}",
                            self.endpoints
                        ),
                    ))
                }
            }
        }
    }

    pub fn put(&self, key: &str, value: impl AsRef<[u8]>) -> io::Result<()> {
        let v = value.as_ref().to_vec();
        self.run("put", |mut c| {
            let v = v.clone();
            async move { c.put(key, v, None).await.map(|_| ()) }
        })
    }

    pub fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.get_kv(key)?.map(|kv| kv.value))
    }

    pub fn get_kv(&self, key: &str) -> io::Result<Option<KeyValue>> {
        self.run("get", |mut c| async move {
            let r = c.get(key, None).await?;
            Ok(r.kvs().first().map(|kv| KeyValue {
                value: kv.value().to_vec(),
                lease: kv.lease(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
            }))
        })
    }

    /// Keys under `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.run("get prefix", |mut c| async move {
            let r = c
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect())
        })
    }

    /// Whether the key existed.
    pub fn delete(&self, key: &str) -> io::Result<bool> {
        self.run("delete", |mut c| async move {
            Ok(c.delete(key, None).await?.deleted() > 0)
        })
    }

    /// Remaining TTL of a lease in seconds (-1: expired or never existed).
    pub fn lease_ttl(&self, lease: i64) -> io::Result<i64> {
        self.run("lease time-to-live", |mut c| async move {
            Ok(c.lease_time_to_live(lease, None).await?.ttl())
        })
    }

    /// `(member id, leader id)` as seen by the (first) endpoint.
    pub fn status(&self) -> io::Result<(u64, u64)> {
        self.run("status", |mut c| async move {
            let s = c.status().await?;
            let member = s.header().map(|h| h.member_id()).unwrap_or(0);
            Ok((member, s.leader()))
        })
    }
}

const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A failure of the connection rather than an answer from etcd.
fn is_transport(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            std::error::Error::source(s).is_some()
                || s.message().contains("transport error")
                || s.message().contains("connect")
        }
        _ => false,
    }
}

/// What happened to the watched key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One watch event, timestamped when the host received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// Empty for deletes.
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// Host CLOCK_BOOTTIME at receipt, ns (see [`boottime_ns`]).
    pub boottime_ns: u64,
    pub wall: SystemTime,
}

impl WatchEvent {
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

#[derive(Default)]
struct WatchShared {
    events: Mutex<Vec<WatchEvent>>,
    cv: Condvar,
}

/// A host-side watch on one key, on its own thread and runtime. Events are
/// timestamped the moment they arrive; a broken watch reconnects and resumes
/// from the revision after the last event seen, so none is lost.
pub struct KeyWatch {
    shared: Arc<WatchShared>,
    stop: Arc<AtomicBool>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KeyWatch {
    /// Returns once the watch is established: every later change is seen.
    pub fn start<S: AsRef<str>>(endpoints: &[S], key: &str) -> io::Result<KeyWatch> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
        let key = key.to_string();
        let shared = Arc::new(WatchShared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (sh, st) = (shared.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name(format!("keywatch {key}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(to_io("watch runtime", e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = watch_loop(&endpoints, &key, &sh, &st, ready_tx) => {}
                    }
                });
            })?;
        let watch = KeyWatch {
            shared,
            stop,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(CLIENT_TIMEOUT * 2) {
            Ok(Ok(())) => Ok(watch),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "key watch not established in time",
            )),
        }
    }

    /// All events so far, in order.
    pub fn events(&self) -> Vec<WatchEvent> {
        self.shared.events.lock().unwrap().clone()
    }

    /// The first event (past or future) matching `pred`, waiting up to `timeout`.
    pub fn wait_for(
        &self,
        pred: impl Fn(&WatchEvent) -> bool,
        timeout: Duration,
    ) -> Option<WatchEvent> {
        let deadline = Instant::now() + timeout;
        let mut ev = self.shared.events.lock().unwrap();
        loop {
            if let Some(e) = ev.iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            ev = self.shared.cv.wait_timeout(ev, left).unwrap().0;
        }
    }

    /// The first delete received at or after `boottime_ns`, if one has arrived.
    pub fn first_delete_after(&self, boottime_ns: u64) -> Option<WatchEvent> {
        self.shared
            .events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.kind == EventKind::Delete && e.boottime_ns >= boottime_ns)
            .cloned()
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn watch_loop(
    endpoints: &[String],
    key: &str,
    shared: &WatchShared,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let mut ready = Some(ready);
    // 0 = from now; afterwards resume right after the last event seen.
    let mut next_rev = 0i64;
    while !stop.load(Ordering::SeqCst) {
        let res = watch_once(endpoints, key, shared, &mut next_rev, &mut ready).await;
        if let Err(e) = res {
            if let Some(r) = ready.take() {
                let _ = r.send(Err(e));
                return;
            }
        }
        // Broken after it was established: reconnect shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch_once(
    endpoints: &[String],
    key: &str,
    shared: &WatchShared,
    next_rev: &mut i64,
    ready: &mut Option<std::sync::mpsc::Sender<io::Result<()>>>,
) -> io::Result<()> {
    let what = format!("watching {key} at {endpoints:?}");
    let mut client = tokio::time::timeout(
        CLIENT_TIMEOUT,
        Client::connect(endpoints, Some(client_options())),
    )
    .await
    .map_err(|_| to_io(&what, "connect timed out"))?
    .map_err(|e| to_io(&what, e))?;
    let mut opts = WatchOptions::new();
    if *next_rev > 0 {
        opts = opts.with_start_revision(*next_rev);
    }
    let mut stream = tokio::time::timeout(CLIENT_TIMEOUT, client.watch(key, Some(opts)))
        .await
        .map_err(|_| to_io(&what, "watch request timed out"))?
        .map_err(|e| to_io(&what, e))?;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(to_io(&what, "stream ended")),
            Err(e) => return Err(to_io(&what, e)),
        };
        // Timestamp first, before any other work.
        let boottime = boottime_ns();
        let wall = SystemTime::now();
        if msg.created() {
            if *next_rev == 0 {
                // Resume point if this stream breaks before any event.
                *next_rev = msg.header().map(|h| h.revision() + 1).unwrap_or(0);
            }
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
        }
        if msg.canceled() {
            return Err(to_io(
                &what,
                format!(
                    "watch canceled: {} (compacted at {})",
                    msg.cancel_reason(),
                    msg.compact_revision()
                ),
            ));
        }
        if msg.events().is_empty() {
            continue;
        }
        let mut ev = shared.events.lock().unwrap();
        for e in msg.events() {
            let Some(kv) = e.kv() else { continue };
            ev.push(WatchEvent {
                kind: match e.event_type() {
                    EventType::Put => EventKind::Put,
                    EventType::Delete => EventKind::Delete,
                },
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                boottime_ns: boottime,
                wall,
            });
            *next_rev = kv.mod_revision() + 1;
        }
        drop(ev);
        shared.cv.notify_all();
    }
}
