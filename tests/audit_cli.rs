//! `leasedog audit verify` and `leasedog audit timeline` on the logs of real
//! agent processes against a real etcd 3.4, with fake watchdog devices; and
//! the etcd history the agents mirror into (bounded, in etcd's order).
//!
//! Budget as in tests/agent.rs: T = 4 s, M = 2 s, R = 1 s (W = 2 s).
//! `cargo test --features testing --test audit_cli -- --nocapture` prints
//! the timelines (docs/audit.md quotes the handover one).

use leasedog::config::EtcdConfig;
use leasedog::dcs::Dcs;
use leasedog::watchdog::{read_fake_record, FakeOp};
use leasedog_testbed::agent::{fake_device_config, AgentProcess};
use leasedog_testbed::etcd::{boottime_ns, BlockingClient, EtcdServer, EventKind, KeyWatch};
use leasedog_testbed::wait_until;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");
const T: u64 = 4;
const W_NS: u64 = 2_000_000_000;
const R_NS: u64 = 1_000_000_000;
const M_MINUS_R_NS: u64 = 1_000_000_000;

fn config(scope: &str, node: &str, endpoints: &[String], record: &Path) -> String {
    let audit = record.parent().unwrap().join("audit");
    fake_device_config(scope, node, endpoints, "required", record, &audit)
}

/// One node: its fake device record and audit log live in `dir`, which
/// outlives the agent process, so a restarted agent finds them again.
struct Node {
    name: String,
    dir: tempfile::TempDir,
    proc_: AgentProcess,
}

impl Node {
    fn spawn(scope: &str, name: &str, eps: &[String]) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("leasedog-audit-{name}-"))
            .tempdir()
            .unwrap();
        let proc_ = Self::start(&dir, scope, name, eps);
        Node {
            name: name.into(),
            dir,
            proc_,
        }
    }
    fn start(dir: &tempfile::TempDir, scope: &str, name: &str, eps: &[String]) -> AgentProcess {
        let record = dir.path().join(format!("{name}.wd"));
        AgentProcess::spawn(
            Path::new(BIN),
            name,
            &config(scope, name, eps, &record),
            &[],
        )
        .unwrap()
    }
    /// A new agent process for the same node (same audit dir, same device).
    fn restart(&mut self, scope: &str, eps: &[String]) {
        self.proc_ = Self::start(&self.dir, scope, &self.name, eps);
    }
    fn log(&self) -> PathBuf {
        self.dir
            .path()
            .join("audit")
            .join(format!("{}.audit.jsonl", self.name))
    }
    fn config(&self) -> PathBuf {
        self.proc_.dir().join("leasedog.toml")
    }
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    fn count(&self, event: &str) -> usize {
        self.records()
            .iter()
            .filter(|r| r["event"] == event)
            .count()
    }
    fn pings(&self) -> Vec<u64> {
        let p = self.dir.path().join(format!("{}.wd", self.name));
        if !p.exists() {
            return Vec::new();
        }
        read_fake_record(&p)
            .unwrap()
            .iter()
            .filter_map(|o| match o {
                FakeOp::Ping { at } => Some(at.as_nanos()),
                _ => None,
            })
            .collect()
    }
    fn stop(&mut self) {
        self.proc_.signal(libc::SIGTERM).unwrap();
        let st = self
            .proc_
            .wait_exit(Duration::from_secs(15))
            .expect("agent exits on SIGTERM");
        assert_eq!(st.code(), Some(0), "{}", self.proc_.log());
    }
}

fn leader_key(scope: &str) -> String {
    format!("/leasedog/{scope}/leader")
}

fn holder(client: &BlockingClient, scope: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(&client.get(&leader_key(scope)).ok()??).ok()?;
    v["node"].as_str().map(String::from)
}

/// Runs `leasedog audit ...`; returns (exit status, stdout, stderr).
fn audit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("audit").args(args).output().unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The history records etcd holds for the scope, as JSON.
fn etcd_history(client: &BlockingClient, scope: &str) -> Vec<Value> {
    let prefix = format!("/leasedog/{scope}/history/");
    client
        .keys_with_prefix(&prefix)
        .unwrap()
        .iter()
        .map(|k| serde_json::from_slice(&client.get(k).unwrap().unwrap()).unwrap())
        .collect()
}

/// A clean SIGTERM handover a -> b: each log verifies, the timeline (local
/// logs + etcd history) says FENCED-BY-STEP-DOWN and exits 0, so does the
/// etcd history alone (the mirror carries the whole lifecycle), `--json`
/// parses, an edited record is named by `verify`, and a log cut short at its
/// end disagrees with its anchor in etcd.
#[test]
fn clean_handover_verifies_and_is_fenced_by_step_down() {
    const SCOPE: &str = "handover";
    let t0 = Instant::now();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let mut a = Node::spawn(SCOPE, "a", &eps);
    assert!(wait_until(Duration::from_secs(20), || holder(
        &client, SCOPE
    )
    .as_deref()
        == Some("a")));
    let mut b = Node::spawn(SCOPE, "b", &eps);
    assert!(wait_until(Duration::from_secs(10), || a.count("promoted")
        == 1
        && b.count("lease_granted") == 1));
    std::thread::sleep(Duration::from_secs(1));
    a.stop();
    assert!(wait_until(Duration::from_secs(10), || b.count("promoted") == 1));
    b.stop();
    let a_cfg = a.config();

    // The mirror: a's whole lifecycle reached etcd before it exited, its
    // records unchanged (their hashes hold).
    let hist = etcd_history(&client, SCOPE);
    let a_events: Vec<&str> = hist
        .iter()
        .filter(|r| r["node"] == "a")
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    for e in [
        "startup",
        "acquired",
        "armed",
        "promoted",
        "step_down_confirmed",
        "disarmed",
        "shutdown",
    ] {
        assert!(a_events.contains(&e), "{e} not mirrored: {a_events:?}");
    }
    assert!(
        !hist.iter().any(|r| r["event"] == "ping_summary"),
        "pinger chatter is not mirrored"
    );
    for r in &hist {
        let rec: leasedog::audit::Record = serde_json::from_value(r.clone()).unwrap();
        assert!(rec.hash_ok(), "{r}");
    }

    for log in [a.log(), b.log()] {
        let (code, out, err) = audit(&["verify", s(&log)]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("chain intact"), "{out}");
    }

    let (code, out, err) = audit(&["timeline", s(&a.log()), s(&b.log()), "--config", s(&a_cfg)]);
    eprintln!("---- audit timeline a.log b.log (exit {code}) ----\n{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("change at rev").count(), 1, "{out}");
    assert!(out.contains("a -> b    FENCED-BY-STEP-DOWN"), "{out}");
    assert!(out.contains("verdict: FENCED-BY-STEP-DOWN"), "{out}");
    // Proven by a's own release, whose revision its `released` record now
    // keeps (issue 10 item 10): the deletion is ordered before b's win by
    // etcd revisions alone, no expiry assumed.
    let released_rev = a
        .records()
        .iter()
        .find(|r| r["event"] == "released")
        .and_then(|r| r["revision"].as_i64())
        .expect("a's released record carries its revision");
    assert!(
        out.contains(&format!(
            "and then released the key at rev {released_rev}, before b won it at rev"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("key deleted at rev {released_rev}; b won it")),
        "{out}"
    );
    assert!(
        out.contains("etcd history: "),
        "etcd history was read: {out}"
    );
    assert!(!out.contains("DISAGREES"), "{out}");

    // etcd alone: the timeline survives the loss of both disks.
    let (code, out, err) = audit(&["timeline", "--config", s(&a_cfg)]);
    eprintln!("---- audit timeline, etcd history only (exit {code}) ----\n{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("a -> b    FENCED-BY-STEP-DOWN"), "{out}");
    assert!(out.contains("etcd history only"), "{out}");
    // The mirrored `released` record carries its revision too.
    assert!(
        out.contains(&format!("released the key at rev {released_rev}")),
        "{out}"
    );

    // --json for tooling.
    let (code, out, err) = audit(&[
        "timeline",
        "--json",
        s(&a.log()),
        s(&b.log()),
        "--config",
        s(&a_cfg),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{out}");
    assert_eq!(changes[0]["verdict"]["verdict"], "FENCED-BY-STEP-DOWN");
    assert_eq!(changes[0]["old"]["node"], "a");
    assert_eq!(changes[0]["new"]["node"], "b");
    assert_eq!(changes[0]["new"]["armed_before_promote"], true);
    assert!(v["history_records"].as_u64().unwrap() > 0);
    assert_eq!(v["logs"].as_array().unwrap().len(), 2);

    // An edited record in a copy of a's log is found and named.
    let text = std::fs::read_to_string(a.log()).unwrap();
    let armed = text
        .lines()
        .find(|l| l.contains("\"event\":\"armed\""))
        .unwrap();
    let seq = serde_json::from_str::<Value>(armed).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let edited = armed.replace("\"w_s\":2", "\"w_s\":1");
    assert_ne!(edited, armed);
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("a.audit.jsonl");
    std::fs::write(&copy, text.replace(armed, &edited)).unwrap();
    let (code, out, _) = audit(&["verify", s(&copy)]);
    eprintln!("---- audit verify of an edited copy (exit {code}) ----\n{out}");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("CHAIN BROKEN"), "{out}");
    assert!(
        out.contains(&format!("record {seq}: hash mismatch (edited)")),
        "{out}"
    );

    // A copy cut cleanly after its `promoted` record: the chain alone holds,
    // the anchor in etcd does not.
    let lines: Vec<&str> = text.lines().collect();
    let p = lines
        .iter()
        .position(|l| l.contains("\"event\":\"promoted\""))
        .unwrap();
    let cut = tmp.path().join("cut.audit.jsonl");
    std::fs::write(&cut, lines[..=p].join("\n") + "\n").unwrap();
    assert_eq!(
        audit(&["verify", s(&cut)]).0,
        0,
        "a clean cut keeps the chain"
    );
    let (code, out, err) = audit(&["timeline", s(&cut), s(&b.log()), "--config", s(&a_cfg)]);
    eprintln!("---- audit timeline with a's log cut short (exit {code}) ----\n{out}");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("LOG DISAGREES WITH ETCD: a: local log ends at record"),
        "{out}"
    );
    assert!(out.contains("records removed from the end"), "{out}");

    // The agent itself checks its log against its anchor in etcd at
    // start-up: cut a's real log the same way and start a again.
    std::fs::write(a.log(), lines[..=p].join("\n") + "\n").unwrap();
    a.restart(SCOPE, &eps);
    assert!(
        a.proc_.wait_log(
            "the audit log disagrees with its anchor in etcd",
            Duration::from_secs(15)
        ),
        "{}",
        a.proc_.log()
    );
    assert!(a.proc_.log().contains("records removed from the end"));
    a.stop();
    eprintln!("test took {:?}", t0.elapsed());
}

/// A stalled leader (SIGSTOP) replaced by another after its lease expired:
/// without a later start-up of the old node nothing proves its fence, and
/// the timeline says exactly what is missing. The fake device's record shows
/// the reset that would have happened. A restarted agent in the same boot
/// (same boot id: no reset, none faked) does not make it FENCED-BY-RESET.
#[test]
fn stalled_leader_is_unproven_until_a_reset_is_recorded() {
    const SCOPE: &str = "stall";
    let t0 = Instant::now();
    let etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let watch = KeyWatch::start(&eps, &leader_key(SCOPE)).unwrap();
    let mut a = Node::spawn(SCOPE, "a", &eps);
    assert!(wait_until(Duration::from_secs(20), || holder(
        &client, SCOPE
    )
    .as_deref()
        == Some("a")));
    let mut b = Node::spawn(SCOPE, "b", &eps);
    assert!(wait_until(Duration::from_secs(10), || a.count("promoted")
        == 1
        && b.count("lease_granted") == 1));
    std::thread::sleep(Duration::from_secs(1));
    let t_stop = boottime_ns();
    a.proc_.stall().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || b.count("promoted") == 1),
        "b took over"
    );
    // Let b's mirror settle (etcd must not get ahead of the local log read).
    std::thread::sleep(Duration::from_secs(1));
    let deleted = watch
        .first_delete_after(t_stop)
        .expect("the stalled leader's key expired");
    let last_ping = *a.pings().last().unwrap();
    eprintln!(
        "stall at 0: a's last ping {:+.3} s, its reset would land by {:+.3} s, key deleted {:+.3} s",
        (last_ping as f64 - t_stop as f64) / 1e9,
        (last_ping + W_NS) as f64 / 1e9 - t_stop as f64 / 1e9,
        (deleted.boottime_ns as f64 - t_stop as f64) / 1e9
    );
    assert!(last_ping + W_NS + R_NS <= deleted.boottime_ns);
    assert!(watch
        .events()
        .iter()
        .any(|e| e.kind == EventKind::Put && e.boottime_ns > deleted.boottime_ns));

    let timeline = |a: &Node, b: &Node| {
        let (code, out, err) = audit(&[
            "timeline",
            s(&a.log()),
            s(&b.log()),
            "--config",
            s(&b.config()),
        ]);
        let (jcode, json, _) = audit(&[
            "timeline",
            "--json",
            s(&a.log()),
            s(&b.log()),
            "--config",
            s(&b.config()),
        ]);
        assert_eq!(code, jcode);
        let v: Value = serde_json::from_str(&json).unwrap();
        (code, out + &err, v)
    };

    // While a is stopped: no step-down, no start-up after its term.
    let (code, out, v) = timeline(&a, &b);
    eprintln!("---- audit timeline, a stalled (exit {code}) ----\n{out}");
    assert_eq!(code, 2, "UNPROVEN exits 2: {out}");
    let c = &v["changes"][0];
    assert_eq!(v["changes"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(
        (c["old"]["node"].as_str(), c["new"]["node"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(
        c["verdict"],
        serde_json::json!({"verdict": "UNPROVEN", "missing": [
            "no later start-up of a recorded (no step-down, no reset evidence)"
        ]}),
        "{out}"
    );
    assert!(out.contains("a -> b    UNPROVEN"), "{out}");
    // The timeline's numbers come from a's own records: its last *recorded*
    // s (acquired, ping summaries every 10 s, refusals). A process stopped
    // whole records no refusal, so its real last s may be later: the real
    // last ping may lie after the "last permitted ping" printed (docs/audit.md
    // says so). What must hold: the recorded s precedes the real last ping,
    // and the deadlines follow from it by M - R and W.
    let last_s = c["old"]["last_s_ns"].as_u64().unwrap();
    let permitted = c["old"]["last_permitted_ping_ns"].as_u64().unwrap();
    let reset_due = c["old"]["reset_deadline_ns"].as_u64().unwrap();
    eprintln!(
        "recorded last s {:+.3} s; printed last permitted ping {:+.3} s; real last ping {:+.3} s",
        (last_s as f64 - t_stop as f64) / 1e9,
        (permitted as f64 - t_stop as f64) / 1e9,
        (last_ping as f64 - t_stop as f64) / 1e9
    );
    assert!(last_s <= last_ping, "a recorded s after its last ping");
    assert_eq!(permitted, last_s + M_MINUS_R_NS);
    assert_eq!(reset_due, permitted + W_NS);

    // The old agent dies where it stood (SIGKILL while stopped: it runs no
    // more code) and a new agent starts for node a in the same boot.
    a.proc_.signal(libc::SIGKILL).unwrap();
    assert!(a.proc_.wait_exit(Duration::from_secs(10)).is_some());
    let before = a.records().len();
    a.restart(SCOPE, &eps);
    assert!(wait_until(Duration::from_secs(15), || a.count("startup")
        == 2
        && a.count("lease_granted") == 2));
    a.stop();
    let recs = a.records();
    let startup = recs[before..]
        .iter()
        .find(|r| r["event"] == "startup")
        .unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(startup["boot_id"], boot_id.trim(), "the real boot id");
    assert_eq!(startup["previous_boot_id"], Value::Null, "same boot");
    let (code, out) = {
        let (code, out, _) = audit(&["verify", s(&a.log())]);
        (code, out)
    };
    assert_eq!(code, 0, "SIGKILL leaves an intact chain: {out}");

    let (code, out, v) = timeline(&a, &b);
    eprintln!("---- audit timeline, a restarted in the same boot (exit {code}) ----\n{out}");
    assert_eq!(code, 2, "{out}");
    let c = &v["changes"][0];
    assert_eq!(
        c["verdict"],
        serde_json::json!({"verdict": "UNPROVEN", "missing": [
            "a's agent restarted in the same boot (boot id unchanged): no reset, and no step-down is recorded"
        ]}),
        "{out}"
    );
    assert_eq!(c["old"]["next_startup"]["new_boot"], false);
    assert!(!out.contains("FENCED-BY-RESET"), "{out}");
    b.stop();
    eprintln!("test took {:?}", t0.elapsed());
}

/// A frozen etcd: the leader fences itself on time (its records are fsynced
/// locally while every etcd write hangs), the mirror logs its failures and
/// retries, and once etcd answers again the records reach the history, in
/// order and unchanged.
#[test]
fn mirror_retries_after_an_etcd_outage_without_delaying_the_fence() {
    const SCOPE: &str = "outage";
    let t0 = Instant::now();
    let mut etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let mut n = Node::spawn(SCOPE, "solo", &eps);
    assert!(wait_until(Duration::from_secs(20), || n.count("promoted") == 1));
    std::thread::sleep(Duration::from_millis(500));
    etcd.stop().unwrap();
    let frozen_at = Instant::now();
    // T - M = 2 s after the last renewal the node fences itself.
    let fenced = wait_until(Duration::from_secs(10), || {
        n.count("step_down_confirmed") == 1
    });
    let fenced_after = frozen_at.elapsed();
    let mirror_failed = n
        .proc_
        .wait_log("cannot mirror audit record", Duration::from_secs(10));
    etcd.resume().unwrap();
    assert!(
        fenced,
        "no step-down while etcd was frozen: {}",
        n.proc_.log()
    );
    assert!(
        fenced_after < Duration::from_secs(T),
        "step-down {fenced_after:?} after the freeze"
    );
    assert!(mirror_failed, "{}", n.proc_.log());
    let mirrored = || {
        etcd_history(&client, SCOPE)
            .iter()
            .any(|r| r["event"] == "step_down_confirmed")
    };
    assert!(
        wait_until(Duration::from_secs(20), mirrored),
        "the backlog never reached etcd: {}",
        n.proc_.log()
    );
    n.stop();
    let local: Vec<Value> = n.records();
    let hist: Vec<Value> = etcd_history(&client, SCOPE);
    let seqs: Vec<u64> = hist.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "keys of one node sort by seq");
    for h in &hist {
        let l = &local[h["seq"].as_u64().unwrap() as usize];
        assert_eq!(l, h, "the etcd copy is the local record");
    }
    eprintln!(
        "fenced {fenced_after:?} after the freeze; {} of {} records mirrored; test took {:?}",
        hist.len(),
        local.len(),
        t0.elapsed()
    );
}

/// An agent killed with records still unmirrored (etcd frozen while it
/// fenced itself): its next run back-fills them into etcd after checking its
/// anchor, so the etcd history still shows the step-down.
#[test]
fn an_earlier_runs_unmirrored_records_are_back_filled() {
    const SCOPE: &str = "backfill";
    let t0 = Instant::now();
    let mut etcd = EtcdServer::start().unwrap();
    let eps = etcd.endpoints();
    let client = BlockingClient::connect(&eps).unwrap();
    let mut n = Node::spawn(SCOPE, "solo", &eps);
    assert!(wait_until(Duration::from_secs(20), || n.count("promoted") == 1));
    // Wait for the mirror to catch up before the freeze.
    assert!(wait_until(Duration::from_secs(10), || etcd_history(
        &client, SCOPE
    )
    .iter()
    .any(|r| r["event"] == "promoted")));
    etcd.stop().unwrap();
    let fenced = wait_until(Duration::from_secs(10), || {
        n.count("step_down_confirmed") == 1
    });
    n.proc_.signal(libc::SIGKILL).unwrap();
    assert!(n.proc_.wait_exit(Duration::from_secs(10)).is_some());
    etcd.resume().unwrap();
    assert!(fenced, "{}", n.proc_.log());
    let has = |e: &str| etcd_history(&client, SCOPE).iter().any(|r| r["event"] == e);
    assert!(
        !has("step_down_confirmed"),
        "mirrored despite the frozen etcd?"
    );
    n.restart(SCOPE, &eps);
    assert!(
        wait_until(Duration::from_secs(20), || has("step_down_confirmed")),
        "not back-filled: {}",
        n.proc_.log()
    );
    assert!(n.proc_.log().contains("an earlier run left unmirrored"));
    n.stop();
    let local = n.records();
    for h in etcd_history(&client, SCOPE) {
        assert_eq!(local[h["seq"].as_u64().unwrap() as usize], h);
    }
    let (code, out, err) = audit(&["verify", s(&n.log())]);
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("test took {:?}", t0.elapsed());
}

fn etcd_cfg(endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        prefix: "/leasedog".into(),
        request_timeout: 2.0,
        connect_timeout: 5.0,
        ..EtcdConfig::default()
    }
}

fn fake_record(node: &str, seq: u64) -> String {
    let hash = format!("{:064x}", seq * 1_000_003 + node.len() as u64);
    serde_json::json!({"seq": seq, "node": node, "event": "promoted", "hash": hash}).to_string()
}

fn seqs_of(values: &[Vec<u8>]) -> Vec<(String, u64)> {
    values
        .iter()
        .map(|v| {
            let v: Value = serde_json::from_slice(v).unwrap();
            (
                v["node"].as_str().unwrap().to_owned(),
                v["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The history is read in etcd's order (the revision of each put), not in
/// key order, across nodes; it is bounded: the oldest beyond the bound are
/// trimmed every few appends, so it never grows past bound + trim interval.
#[test]
fn history_is_in_etcd_order_and_bounded() {
    let etcd = EtcdServer::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = etcd_cfg(etcd.endpoints());
        let mut dy = Dcs::connect(&cfg, "bounded", "y").await.unwrap();
        let mut dx = Dcs::connect(&cfg, "bounded", "x").await.unwrap();
        const KEEP: usize = 10;
        const EVERY: u64 = 4;
        dy.set_history_bound(KEEP, EVERY);
        dx.set_history_bound(KEEP, EVERY);
        let mut appended = Vec::new();
        for i in 0..23u64 {
            // Node "y" writes first, though its keys sort after "x"'s.
            let (d, node) = if i % 2 == 0 {
                (&mut dy, "y")
            } else {
                (&mut dx, "x")
            };
            d.append_history(&fake_record(node, i)).await.unwrap();
            appended.push((node.to_owned(), i));
            let n = d.history().await.unwrap().len();
            assert!(
                n <= KEEP + 2 * EVERY as usize,
                "history grew to {n} after {} appends",
                i + 1
            );
        }
        // Re-appending a record is harmless (same key, same value).
        dy.append_history(&fake_record("y", 22)).await.unwrap();
        let h = seqs_of(&dy.history().await.unwrap());
        assert!(h.len() >= KEEP, "{h:?}");
        assert_eq!(
            h,
            appended[appended.len() - h.len()..],
            "newest kept, in put order"
        );
        assert_eq!(dy.trim_history().await.unwrap(), h.len() - KEEP);
        let h = seqs_of(&dy.history().await.unwrap());
        assert_eq!(h, appended[appended.len() - KEEP..]);
        assert_eq!(dy.trim_history().await.unwrap(), 0);
        // The newest record of one node is its anchor.
        let newest = dy.history_newest("x").await.unwrap().unwrap();
        assert_eq!(seqs_of(&[newest]), vec![("x".to_owned(), 21)]);
        assert!(dy.history_newest("nobody").await.unwrap().is_none());
        assert!(dy.append_history("{\"not\": \"a record\"}").await.is_err());
    });
}
