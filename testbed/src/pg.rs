//! Real PostgreSQL 15 clusters for tests, run as the `postgres` user (the
//! server refuses root) on 127.0.0.1 and a unix socket in the node's own temp
//! dir. `initdb` runs once per machine into a cached template that every node
//! copies (`cp -a`), so a node costs a copy and a start, not an initdb.
//!
//! Node-specific settings (port, socket dir) are passed on the command line,
//! never written into the data dir: pg_basebackup and pg_rewind copy
//! `postgresql.conf` from the source, so a port written there would follow it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
pub const OS_USER: &str = "postgres";
/// Bump when the template's settings change, so a stale cache is not reused.
const TEMPLATE_VERSION: &str = "v2";

const EXTRA_CONF: &str = "
# leasedog testbed
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '128MB'
wal_log_hints = on
hot_standby = on
max_connections = 30
shared_buffers = '16MB'
fsync = off
full_page_writes = on
logging_collector = off
wal_receiver_status_interval = '1s'
";

/// Tests only: trust for the superuser on loopback (also for replication);
/// other roles must give a password (so a wrong one can be tested).
const HBA: &str = "
local   all             all                     trust
host    all             postgres 127.0.0.1/32   trust
host    replication     postgres 127.0.0.1/32   trust
host    all             all      127.0.0.1/32   scram-sha-256
host    replication     all      127.0.0.1/32   scram-sha-256
";

fn bin(name: &str) -> PathBuf {
    Path::new(BIN_DIR).join(name)
}

/// A free TCP port on 127.0.0.1 (bind :0, read, close).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// `uid`, `gid` of a user, via getpwnam.
pub fn user_ids(name: &str) -> (u32, u32) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: getpwnam returns null or a pointer to static storage; read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(!pw.is_null(), "no such user {name:?}");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A command that runs as the `postgres` user (when we are root).
pub fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let (uid, gid) = user_ids(OS_USER);
        c.uid(uid).gid(gid);
    }
    c.current_dir("/").env("HOME", "/var/lib/postgresql");
    c
}

fn run(mut c: Command, what: &str) -> Output {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn make_dir_for_postgres(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    let (uid, gid) = user_ids(OS_USER);
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// The cached template cluster, made by initdb at most once per machine (and
/// version of its settings). Concurrent test processes race harmlessly: each
/// builds in its own dir and the first rename wins.
fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/leasedog-pg15-template-{TEMPLATE_VERSION}"));
        if dir.join("PG_VERSION").exists() {
            return dir;
        }
        let tmp = PathBuf::from(format!("{}.{}", dir.display(), std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        make_dir_for_postgres(&tmp);
        let mut c = as_postgres(bin("initdb"));
        c.args(["-D"]).arg(&tmp).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        run(c, "initdb");
        let conf = tmp.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(EXTRA_CONF);
        std::fs::write(&conf, text).unwrap();
        std::fs::write(tmp.join("pg_hba.conf"), HBA).unwrap();
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process won the race; its template is as good as ours.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        assert!(
            dir.join("PG_VERSION").exists(),
            "template missing at {}",
            dir.display()
        );
        dir
    })
}

/// One PostgreSQL cluster in a temp dir. Dropping it stops the server (even a
/// SIGSTOPped one) and removes the dir.
pub struct PgNode {
    pub port: u16,
    root: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn new_root() -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("leasedog-pg-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    make_dir_for_postgres(&root);
    // The socket dir is the root itself: short paths (sun_path is 108 bytes).
    root
}

impl PgNode {
    /// A fresh, stopped cluster (a copy of the template) that will listen on `port`.
    pub fn init(port: u16) -> PgNode {
        let node = PgNode::empty(port);
        let _ = std::fs::remove_dir(node.data_dir());
        let mut c = Command::new("cp");
        c.arg("-a").arg(template()).arg(node.data_dir());
        run(c, "cp -a template");
        node
    }

    /// A node with an empty data dir (owned by postgres, mode 700): for clones.
    pub fn empty(port: u16) -> PgNode {
        let node = PgNode {
            port,
            root: new_root(),
        };
        make_dir_for_postgres(&node.data_dir());
        node
    }

    /// A streaming replica of `primary`, made with pg_basebackup -R, started.
    pub fn replica_of(primary: &PgNode, port: u16) -> PgNode {
        let node = PgNode::empty(port);
        let mut c = as_postgres(bin("pg_basebackup"));
        c.arg("-D")
            .arg(node.data_dir())
            .args(["-X", "stream", "-R", "-c", "fast", "-d"])
            .arg(primary.conninfo());
        run(c, "pg_basebackup");
        node.start();
        node
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    /// Directory of the unix socket (`host=` for libpq).
    pub fn socket_dir(&self) -> PathBuf {
        self.root.clone()
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("postmaster.log")
    }
    /// libpq conninfo over TCP as the superuser.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn start(&self) {
        let mut c = as_postgres(bin("pg_ctl"));
        c.arg("start")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .arg("-o")
            .arg(format!(
                "-p {} -k {}",
                self.port,
                self.socket_dir().display()
            ));
        let out = c.stdin(Stdio::null()).output().expect("run pg_ctl start");
        if !out.status.success() {
            panic!(
                "pg_ctl start on port {} failed: {}\n--- {} ---\n{}",
                self.port,
                String::from_utf8_lossy(&out.stderr),
                self.log_file().display(),
                self.log()
            );
        }
    }

    /// A clean (fast) stop.
    pub fn stop(&self) {
        let mut c = as_postgres(bin("pg_ctl"));
        c.arg("stop")
            .args(["-w", "-t", "60", "-m", "fast", "-D"])
            .arg(self.data_dir());
        run(c, "pg_ctl stop");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Runs SQL with psql over the unix socket; returns unaligned, tuples-only output.
    pub fn sql(&self, query: &str) -> String {
        self.try_sql(query)
            .unwrap_or_else(|e| panic!("psql {query:?} on port {}: {e}", self.port))
    }

    pub fn try_sql(&self, query: &str) -> Result<String, String> {
        let out = Command::new(bin("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", query])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn is_in_recovery(&self) -> bool {
        self.sql("SELECT pg_is_in_recovery()") == "t"
    }

    /// The postmaster's pid from `postmaster.pid`, if the file exists.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Pids of live (non-zombie) processes running in this data dir: every
    /// PostgreSQL process chdirs to its data dir.
    pub fn processes(&self) -> Vec<i32> {
        processes_in(&self.data_dir())
    }

    /// Polls `f` every 50 ms until it holds or `within` passes.
    pub fn wait_until(within: Duration, f: impl FnMut() -> bool) -> bool {
        crate::wait_until(within, f)
    }
}

/// Live processes whose cwd is `dir`.
pub fn processes_in(dir: &Path) -> Vec<i32> {
    let want = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    // What the kernel shows for a cwd that was removed.
    let deleted = PathBuf::from(format!("{} (deleted)", want.display()));
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if !std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c == want || c == deleted) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        if state != Some("Z") && !stat.is_empty() {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` is a live process (a zombie is dead: it can run nothing).
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory preconditions; errors (ESRCH) are ignored.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let data = self.data_dir();
        if let Some(pid) = self.postmaster_pid() {
            // Immediate shutdown (removes shared memory), continued if a test stopped it.
            signal(pid, libc::SIGQUIT);
            signal(pid, libc::SIGCONT);
        }
        let gone = PgNode::wait_until(Duration::from_secs(5), || processes_in(&data).is_empty());
        if !gone {
            for pid in processes_in(&data) {
                signal(pid, libc::SIGKILL);
            }
            PgNode::wait_until(Duration::from_secs(5), || processes_in(&data).is_empty());
        }
        remove_orphaned_shm(&data);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A killed postmaster leaves its small SysV segment behind (the key and id
/// are on line 7 of postmaster.pid); remove it when nothing is attached.
fn remove_orphaned_shm(data: &Path) {
    let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(shmid) = text
        .lines()
        .nth(6)
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it, IPC_RMID only marks the id.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0 && ds.shm_nattch == 0 {
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

/// `psql -c query` over TCP to 127.0.0.1:`port` (tuples only, unaligned).
pub fn psql(port: u16, query: &str) -> Result<String, String> {
    let out = Command::new(bin("psql"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args([
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-c", query])
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
