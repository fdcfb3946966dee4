//! Steady-state figures for two agents on loopback (issue 2's closing note):
//! renewal round trip, ping lateness, resident memory, and etcd requests per
//! node per loop. A benchmark, not a test: it prints figures.
//!
//! `cargo run --release --features testing --example steady -- [SECONDS]`

use leasedog::watchdog::{read_fake_record, FakeOp};
use leasedog_testbed::agent::AgentProcess;
use leasedog_testbed::etcd::EtcdServer;
use std::path::Path;
use std::time::{Duration, Instant};

fn config(node: &str, endpoints: &[String], dir: &Path) -> String {
    format!(
        r#"scope = "steady"
node = "{node}"
[etcd]
endpoints = ["{ep}"]
[watchdog]
mode = "required"
[[watchdog.device]]
kind = "fake"
record = "{rec}"
[audit]
dir = "{audit}"
"#,
        ep = endpoints[0],
        rec = dir.join(format!("{node}.wd")).display(),
        audit = dir.join("audit").display()
    )
}

/// Sum of gRPC messages etcd received (unary requests and stream messages).
fn etcd_messages(client_url: &str) -> u64 {
    let addr = client_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("etcd metrics");
    use std::io::{Read, Write};
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/leasedog");
    let bin = if bin.exists() {
        bin
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/leasedog")
    };
    let etcd = EtcdServer::start().expect("etcd");
    let eps = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let agents: Vec<AgentProcess> = ["a", "b"]
        .iter()
        .map(|n| AgentProcess::spawn(&bin, n, &config(n, &eps, dir.path()), &[]).unwrap())
        .collect();
    // Let both settle (lease, key, arming) before measuring.
    std::thread::sleep(Duration::from_secs(5));
    let m0 = etcd_messages(&etcd.client_url());
    let t0 = Instant::now();
    let mut rss_max = [0u64; 2];
    while t0.elapsed() < Duration::from_secs(secs) {
        for (i, a) in agents.iter().enumerate() {
            rss_max[i] = rss_max[i].max(a.rss_kib().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let m1 = etcd_messages(&etcd.client_url());
    let elapsed = t0.elapsed().as_secs_f64();
    let loops = elapsed / 1.0; // default loop_interval
    let leader = ["a", "b"]
        .iter()
        .find(|n| {
            read_fake_record(&dir.path().join(format!("{n}.wd")))
                .map(|ops| !ops.is_empty())
                .unwrap_or(false)
        })
        .expect("a leader");
    let pings: Vec<u64> = read_fake_record(&dir.path().join(format!("{leader}.wd")))
        .unwrap()
        .into_iter()
        .filter_map(|o| match o {
            FakeOp::Ping { at } => Some(at.as_nanos()),
            _ => None,
        })
        .collect();
    let mut late: Vec<f64> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1e6 - 100.0)
        .collect();
    let mut rtts: Vec<f64> = agents
        .iter()
        .flat_map(|a| {
            a.log()
                .lines()
                .filter_map(|l| {
                    l.split("rtt_us=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
                .collect::<Vec<_>>()
        })
        .map(|us| us / 1000.0)
        .collect();
    println!("steady state, two agents on loopback, {elapsed:.0} s, T=10 M=5 R=1 loop=1 s, ping every 100 ms");
    println!(
        "renewal round trip: median {:.2} ms, p99 {:.2} ms, worst {:.2} ms ({} renewals)",
        quantile(&mut rtts, 0.5),
        quantile(&mut rtts, 0.99),
        quantile(&mut rtts, 1.0),
        rtts.len()
    );
    println!(
        "ping lateness (interval - 100 ms): median {:.3} ms, p99 {:.3} ms, worst {:.3} ms ({} pings)",
        quantile(&mut late, 0.5),
        quantile(&mut late, 0.99),
        quantile(&mut late, 1.0),
        pings.len()
    );
    println!(
        "resident memory (max VmRSS): a {} KiB, b {} KiB",
        rss_max[0], rss_max[1]
    );
    println!(
        "etcd requests (gRPC messages received) per node per loop: {:.2}",
        (m1 - m0) as f64 / 2.0 / loops
    );
}
