//! Operations: etcd over TLS with client certificates and with password
//! auth (a real etcd 3.4 with certificates made here by the openssl CLI),
//! the metrics endpoint scraped during a lease handover, sd_notify to a real
//! datagram socket, `leasedog status`, and the capabilities of an agent
//! started as root.

use leasedog::config::EtcdConfig;
use leasedog::dcs::{Dcs, DcsError, LeaseId, Renewal};
use leasedog::metrics;
use leasedog_testbed::agent::{fake_device_config, AgentProcess};
use leasedog_testbed::etcd::{BlockingClient, EtcdServer};
use leasedog_testbed::wait_until;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`{name}-ca.pem/.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=leasedog test {name} CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
        ],
    );
}

/// A leaf certificate `{leaf}.pem/.key` signed by CA `ca`, valid for
/// 127.0.0.1 as a server and as a client.
fn make_leaf(dir: &Path, ca: &str, leaf: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
        ],
    );
    let ext = dir.join(format!("{leaf}.ext"));
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            &format!("{leaf}.pem"),
        ],
    );
}

/// etcd on https:// with client-certificate auth; killed on drop.
struct TlsEtcd {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsEtcd {
    fn start(certs: &Path) -> TlsEtcd {
        let dir = tempfile::tempdir().unwrap();
        let (cport, pport) = (free_port(), free_port());
        let url = format!("https://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{pport}");
        let log = fs::File::create(dir.path().join("etcd.log")).unwrap();
        let p = |f: &str| certs.join(f).display().to_string();
        let child = Command::new("etcd")
            .args(["--name", "tls", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("tls={peer}")])
            .args([
                "--cert-file",
                &p("server.pem"),
                "--key-file",
                &p("server.key"),
            ])
            .args(["--trusted-ca-file", &p("good-ca.pem"), "--client-cert-auth"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd");
        TlsEtcd { child, url, dir }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

fn tls_cfg(url: &str, certs: &Path, ca: &str, client: Option<&str>) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![url.into()],
        request_timeout: 2.0,
        connect_timeout: 3.0,
        ca_file: Some(certs.join(format!("{ca}-ca.pem"))),
        cert_file: client.map(|c| certs.join(format!("{c}.pem"))),
        key_file: client.map(|c| certs.join(format!("{c}.key"))),
        ..EtcdConfig::default()
    }
}

async fn grant_and_renew(cfg: &EtcdConfig) -> Result<(), DcsError> {
    let mut d = Dcs::connect(cfg, "tls", "a").await?;
    let lease: LeaseId = d.grant(5).await?;
    match d.renew(lease).await {
        Renewal::Acked { ttl } => assert!(ttl > 0 && ttl <= 5, "ttl {ttl}"),
        other => panic!("renewal over TLS: {other:?}"),
    }
    d.revoke(lease).await
}

/// TLS with client certificates: the right CA and client certificate connect
/// and renew; a wrong CA, a client certificate from another CA, or none at
/// all are refused with a TLS error.
#[test]
fn etcd_tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    make_ca(c, "good");
    make_ca(c, "evil");
    make_leaf(c, "good", "server", "127.0.0.1");
    make_leaf(c, "good", "client", "leasedog");
    make_leaf(c, "evil", "impostor", "leasedog");
    let etcd = TlsEtcd::start(c);
    let rt = rt();
    let good = tls_cfg(&etcd.url, c, "good", Some("client"));
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < Duration::from_secs(30) {
        match rt.block_on(grant_and_renew(&good)) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(last.is_none(), "{last:?}\n{}", etcd.log());
    eprintln!("TLS connect + renew ok after {:?}", t0.elapsed());

    for (what, cfg) in [
        ("wrong CA", tls_cfg(&etcd.url, c, "evil", Some("client"))),
        (
            "client cert of another CA",
            tls_cfg(&etcd.url, c, "good", Some("impostor")),
        ),
        ("no client cert", tls_cfg(&etcd.url, c, "good", None)),
    ] {
        let t = Instant::now();
        let e = rt.block_on(grant_and_renew(&cfg)).expect_err(what);
        eprintln!("{what}: refused in {:?}: {e}", t.elapsed());
        assert!(
            matches!(e, DcsError::Tls { .. }),
            "{what}: want a TLS error, got {e:?}"
        );
        assert!(e.to_string().contains("TLS handshake failed"), "{e}");
    }
    // A plain http:// endpoint with TLS options is a configuration error.
    let mut bad = good.clone();
    bad.endpoints = vec![etcd.url.replace("https://", "http://")];
    let e = rt.block_on(Dcs::connect(&bad, "tls", "a")).err().unwrap();
    assert!(matches!(e, DcsError::Config(_)), "{e:?}");
}

fn etcdctl(url: &str, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .args(args)
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// etcd password auth: the right password connects and renews; a wrong one
/// or none at all is an authentication error that says so.
#[test]
fn etcd_password_auth() {
    let etcd = EtcdServer::start().unwrap();
    let url = etcd.client_url();
    etcdctl(&url, &["user", "add", "root:s3cret"]);
    etcdctl(&url, &["auth", "enable"]);
    let rt = rt();
    let cfg = |user: Option<&str>, pw: Option<&str>| EtcdConfig {
        endpoints: vec![url.clone()],
        request_timeout: 2.0,
        connect_timeout: 3.0,
        username: user.map(String::from),
        password: pw.map(String::from),
        ..EtcdConfig::default()
    };
    rt.block_on(grant_and_renew(&cfg(Some("root"), Some("s3cret"))))
        .expect("the right password");
    let e = rt
        .block_on(grant_and_renew(&cfg(Some("root"), Some("wrong"))))
        .expect_err("a wrong password");
    eprintln!("wrong password: {e}");
    assert!(matches!(e, DcsError::Auth { .. }), "{e:?}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    let e = rt
        .block_on(grant_and_renew(&cfg(None, None)))
        .expect_err("no credentials");
    eprintln!("no credentials: {e}");
    assert!(matches!(e, DcsError::Auth { .. }), "{e:?}");
}

fn agent_config(scope: &str, node: &str, eps: &[String], dir: &Path, listen: &str) -> String {
    let record = dir.join(format!("{node}.wd"));
    let base = fake_device_config(scope, node, eps, "required", &record, &dir.join("audit"));
    format!("{base}[metrics]\nlisten = \"{listen}\"\n")
}

struct Node {
    addr: String,
    fault_dir: PathBuf,
    proc_: AgentProcess,
    _dir: tempfile::TempDir,
}

fn spawn(scope: &str, name: &str, eps: &[String], env: &[(&str, &str)]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let fault_dir = dir.path().join("faults");
    fs::create_dir_all(&fault_dir).unwrap();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    let fd = fault_dir.display().to_string();
    env.push(("LEASEDOG_FAULT_DIR", &fd));
    let proc_ = AgentProcess::spawn(
        Path::new(BIN),
        name,
        &agent_config(scope, name, eps, dir.path(), &addr),
        &env,
    )
    .unwrap();
    Node {
        addr,
        fault_dir,
        proc_,
        _dir: dir,
    }
}

impl Node {
    fn scrape(&self) -> Option<String> {
        metrics::get(&self.addr, "/metrics", Duration::from_secs(2)).ok()
    }
    fn sample(&self, name: &str) -> Option<f64> {
        metrics::sample(&self.scrape()?, name)
    }
    fn status(&self) -> Option<metrics::Status> {
        serde_json::from_str(&metrics::get(&self.addr, "/status", Duration::from_secs(2)).ok()?)
            .ok()
    }
    fn config_path(&self) -> PathBuf {
        self.proc_.dir().join("leasedog.toml")
    }
}

/// Collects notify messages on a thread: the kernel queues only
/// `net.unix.max_dgram_qlen` (10) datagrams, and the agent drops rather
/// than blocks when the queue is full.
fn collect(sock: UnixDatagram) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        // Ends when the test process does; reads time out to notice nothing.
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                o.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    out
}

/// Two agents with metrics endpoints. Node a (under systemd's notify
/// protocol) leads; its renewals are then blocked (the fault hook) so that b
/// takes over: `leasedog_leader` goes 1 -> 0 on a and 0 -> 1 on b, a's
/// step-down counter increments, its evidence age grows past M - R while
/// blocked (the endpoint answers though the main loop is stuck). Also reads
/// `leasedog status`, and the notify messages: READY=1, STATUS=, WATCHDOG=1,
/// STOPPING=1.
#[test]
fn metrics_follow_a_lease_handover() {
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let sockdir = tempfile::tempdir().unwrap();
    let sock_path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sp = sock_path.display().to_string();
    let msgs = collect(sock);
    let a = spawn(
        "handover",
        "a",
        &eps,
        &[("NOTIFY_SOCKET", &sp), ("WATCHDOG_USEC", "30000000")],
    );
    // a first, so that it wins the key.
    assert!(
        wait_until(Duration::from_secs(20), || a.sample("leasedog_leader")
            == Some(1.0)),
        "a never led: {}",
        a.proc_.log()
    );
    let b = spawn("handover", "b", &eps, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || b
            .sample("leasedog_loops_total")
            .unwrap_or(0.0)
            >= 5.0),
        "b's endpoint: {}",
        b.proc_.log()
    );
    assert_eq!(b.sample("leasedog_leader"), Some(0.0));
    assert_eq!(a.sample("leasedog_armed_devices"), Some(1.0));
    assert_eq!(b.sample("leasedog_armed_devices"), Some(0.0));
    assert_eq!(a.sample("leasedog_watchdog_timeout_seconds"), Some(2.0));
    let a_steps0 = a.sample("leasedog_step_downs_total").unwrap();
    assert!(a.sample("leasedog_pings_total").unwrap() > 0.0);
    assert!(a.sample("leasedog_renewal_rtt_seconds_count").unwrap() > 0.0);
    let text = a.scrape().unwrap();
    assert!(
        text.contains("leasedog_ping_lateness_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("leasedog_role{role=\"Leader\"} 1"), "{text}");
    // Steady state: etcd requests per loop, leader and follower.
    let per_loop = |n: &Node| {
        let (r0, l0) = (
            n.sample("leasedog_etcd_requests_total").unwrap(),
            n.sample("leasedog_loops_total").unwrap(),
        );
        std::thread::sleep(Duration::from_secs(4));
        let (r1, l1) = (
            n.sample("leasedog_etcd_requests_total").unwrap(),
            n.sample("leasedog_loops_total").unwrap(),
        );
        (r1 - r0) / (l1 - l0).max(1.0)
    };
    let (ra, rb) = (per_loop(&a), per_loop(&b));
    eprintln!("etcd requests per loop in steady state: leader {ra:.2}, follower {rb:.2}");
    assert!(ra > 0.5 && ra < 3.0, "leader: {ra} requests per loop");
    assert!(rb > 0.5 && rb < 3.0, "follower: {rb} requests per loop");

    // /status and `leasedog status`.
    let st = a.status().unwrap();
    assert!(st.leader && st.role == "Leader" && st.holder.as_deref() == Some("a"));
    assert_eq!(st.armed_devices.len(), 1);
    assert_eq!(st.evidence, "lease");
    assert!(st.since_fresh_renewal_s.unwrap() < 2.0, "{st:?}");
    let out = Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(b.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["leader"], "a", "{j}");
    let mut members: Vec<&str> = j["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap())
        .collect();
    members.sort();
    assert_eq!(members, ["a", "b"], "{j}");
    assert_eq!(j["local"]["node"], "b", "{j}");
    assert_eq!(j["local"]["leader"], false, "{j}");
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(a.config_path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(table.contains("leader   a"), "{table}");
    assert!(table.contains("(holds the key)"), "{table}");

    // Handover: a's main loop blocks before its next renewal.
    fs::write(a.fault_dir.join("block-renewals"), "").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || b.sample("leasedog_leader")
            == Some(1.0)),
        "b never took over: {}",
        b.proc_.log()
    );
    let holder = client
        .get("/leasedog/handover/leader")
        .unwrap()
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    assert!(holder.unwrap_or_default().contains("\"b\""));
    // a's endpoint still answers with its main loop stuck; its evidence is
    // past M - R = 1 s and its pinger refuses.
    let age = a.sample("leasedog_lease_evidence_age_seconds").unwrap();
    assert!(age > 1.0, "evidence age {age}");
    fs::remove_file(a.fault_dir.join("block-renewals")).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || a.sample("leasedog_leader")
            == Some(0.0)),
        "a still claims the lead: {}",
        a.proc_.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || a
            .sample("leasedog_step_downs_total")
            .unwrap_or(0.0)
            > a_steps0),
        "no step-down counted: {}",
        a.scrape().unwrap_or_default()
    );
    assert!(a.sample("leasedog_pings_refused_total").unwrap() > 0.0);
    assert_eq!(b.sample("leasedog_armed_devices"), Some(1.0));
    assert!(
        wait_until(Duration::from_secs(10), || a
            .sample("leasedog_armed_devices")
            == Some(0.0)),
        "a never disarmed"
    );
    // a learns the new holder from its watch or its next read, a loop or so
    // after its step-down; SIGTERM before that would leave no STATUS naming b.
    assert!(
        wait_until(Duration::from_secs(10), || a
            .status()
            .is_some_and(|s| s.holder.as_deref() == Some("b"))),
        "a never saw b as the holder: {:?}\n{}",
        a.status(),
        a.proc_.log()
    );

    // sd_notify from a: READY first, WATCHDOG=1 per loop, STATUS changes,
    // then STOPPING=1 on SIGTERM.
    a.proc_.signal(libc::SIGTERM).unwrap();
    assert!(a
        .proc_
        .wait_log("stepping down and exiting", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    let msgs = msgs.lock().unwrap().clone();
    assert!(msgs[0].starts_with("READY=1\nSTATUS="), "{msgs:?}");
    let watchdogs = msgs.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(watchdogs > 10, "{watchdogs} WATCHDOG=1 in {msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("STATUS=Leader; leader: a; armed: /")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("STATUS=") && m.contains("leader: b")),
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m == "STOPPING=1"), "{msgs:?}");
    drop(b);
    drop(a);
}

fn cap_lines(pid: u32, tid: &str) -> Vec<(String, String)> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Started as root without `[postgres]`, the agent keeps no capability in
/// any set of any thread, sets no_new_privs, and still works: its pinger
/// is real-time (RLIMIT_RTPRIO raised before the drop) and it leads and pings.
/// Where root cannot raise limits (no CAP_SYS_RESOURCE, as in containers),
/// exactly CAP_IPC_LOCK and CAP_SYS_NICE stay instead.
#[test]
fn root_agent_drops_every_capability() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let etcd = EtcdServer::start().unwrap();
    let n = spawn("caps", "solo", &etcd.endpoints(), &[]);
    assert!(
        n.proc_
            .wait_log("capabilities dropped", Duration::from_secs(20)),
        "{}",
        n.proc_.log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || n
            .sample("leasedog_pings_total")
            .unwrap_or(0.0)
            > 5.0),
        "{}",
        n.proc_.log()
    );
    let log = n.proc_.log();
    assert!(log.contains("pinger runs at SCHED_FIFO"), "{log}");
    assert!(!log.contains("deadline timer NOT real-time"), "{log}");
    // Where root cannot raise limits, CAP_IPC_LOCK and CAP_SYS_NICE stay.
    let fallback = if own_prm() & (1 << 24) != 0 {
        0
    } else {
        assert!(log.contains("keeping CAP_IPC_LOCK"), "{log}");
        (1 << 14) | (1 << 23)
    };
    assert_task_caps(n.proc_.pid(), own_prm() & fallback);
    // The packaged config is 0640; the harness writes 0644: warned.
    assert!(log.contains("readable by every user"), "{log}");
}

#[test]
fn world_readable_config_is_flagged() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.toml");
    fs::write(&p, "node = 'a'").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(leasedog::cli::warn_if_world_readable(&p));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(!leasedog::cli::warn_if_world_readable(&p));
}

/// The permitted capabilities of this test process.
fn own_prm() -> u64 {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap()
}

/// Every thread of `pid` has exactly `want` in its permitted, effective
/// and bounding sets, nothing inheritable or ambient, and no_new_privs.
fn assert_task_caps(pid: u32, want: u64) {
    let want = format!("{want:016x}");
    eprintln!("expected capabilities: {want}");
    let tasks: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() >= 3, "pinger, timer, signals: {tasks:?}");
    for t in &tasks {
        let caps = cap_lines(pid, t);
        eprintln!("task {t}: {caps:?}");
        for (k, v) in &caps {
            match k.as_str() {
                "CapInh" | "CapAmb" => assert_eq!(v, "0000000000000000", "task {t} {k}"),
                "CapPrm" | "CapEff" | "CapBnd" => assert_eq!(v, &want, "task {t} {k}"),
                "NoNewPrivs" => assert_eq!(v, "1", "task {t}"),
                _ => {}
            }
        }
        assert_eq!(caps.len(), 6, "{caps:?}");
    }
}

/// With `[postgres]`, a root agent keeps exactly what managing PostgreSQL as
/// its os_user needs: CAP_KILL, CAP_SETUID, CAP_SETGID, CAP_CHOWN,
/// CAP_FOWNER, CAP_DAC_OVERRIDE, CAP_SYS_PTRACE (plus the limit fallbacks). PostgreSQL is
/// not running (the data directory does not exist): the agent stays a
/// follower, which is all this needs.
#[test]
fn root_agent_with_postgres_keeps_only_what_postgres_needs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    if !Path::new("/usr/lib/postgresql/15/bin/pg_ctl").exists() {
        eprintln!("skipped: needs postgresql-15");
        return;
    }
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "{}[postgres]\nhost = \"127.0.0.1\"\nport = {}\ndata_dir = \"{}\"\n",
        agent_config("capspg", "pg", &etcd.endpoints(), dir.path(), &addr),
        free_port(),
        dir.path().join("pgdata").display()
    );
    let p = AgentProcess::spawn(Path::new(BIN), "pg", &cfg, &[]).unwrap();
    assert!(
        p.wait_log("capabilities dropped", Duration::from_secs(20)),
        "{}",
        p.log()
    );
    // Let the main loop run a little (it observes PostgreSQL as down).
    assert!(
        wait_until(Duration::from_secs(20), || metrics::get(
            &addr,
            "/metrics",
            Duration::from_secs(2)
        )
        .ok()
        .and_then(|t| metrics::sample(&t, "leasedog_loops_total"))
        .unwrap_or(0.0)
            >= 3.0),
        "{}",
        p.log()
    );
    let log = p.log();
    let fallback = if own_prm() & (1 << 24) != 0 {
        0
    } else {
        (1 << 14) | (1 << 23)
    };
    // KILL 5, SETUID 7, SETGID 6, CHOWN 0, FOWNER 3, DAC_OVERRIDE 1,
    // SYS_PTRACE 19.
    let pg: u64 = (1 << 5) | (1 << 7) | (1 << 6) | 1 | (1 << 3) | (1 << 1) | (1 << 19);
    assert!(log.contains("CAP_KILL"), "{log}");
    assert_task_caps(p.pid(), own_prm() & (pg | fallback));
}
