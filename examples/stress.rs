//! Ping lateness under pressure (issue 10 item 11, FENCING.md rule 6).
//!
//! Runs the real pinger (`agent::pinger::Pinger`) with an in-memory device
//! beside `stress-ng` (CPU hogs on every core, memory pressure, disk I/O),
//! once without and once with real-time scheduling (mlockall + SCHED_FIFO,
//! as the agent does), and prints ping lateness p50/p99/p99.9/max. A
//! benchmark, not a test: it prints figures.
//!
//! `cargo run --example stress -- [--seconds 30] [--interval-ms 100]
//!  [--modes normal,realtime] [--no-stress] [--vm-bytes 2G] [--json]`
//! (a debug build measures the same: the pinger mostly sleeps).
//!
//! Lateness of ping i is its time minus its slot on the pinger's absolute
//! schedule (reconstructed from the ping times as the pinger keeps it:
//! `next += interval`, resynchronised after a tick later than a whole
//! interval). "max gap" is the longest time between two pings, which is what
//! the watchdog sees. The pinger's own wake-up lateness maximum is printed
//! beside them as a cross-check. Real-time scheduling needs root or
//! CAP_SYS_NICE; the table says whether it was granted.
//!
//! stress-ng comes from Debian (`scripts/setup.sh` installs it). The
//! default memory load (2 GiB) is polite to a shared machine; on a
//! dedicated one, raise `--vm-bytes` towards the free memory (e.g. `80%`)
//! to make the kernel reclaim, which is what mlockall guards against.

use leasedog::agent::pinger::{EvidenceCell, Pinger};
use leasedog::clock;
use leasedog::decide::Evidence;
use leasedog::timing::Budget;
use leasedog::watchdog::{FakeOp, MemoryWatchdog};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

struct Args {
    seconds: u64,
    interval: Duration,
    modes: Vec<String>,
    stress: bool,
    vm_bytes: String,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: stress [--seconds N (30)] [--interval-ms N (100)] \
         [--modes normal,realtime] [--no-stress] [--vm-bytes 2G] [--json]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        seconds: 30,
        interval: Duration::from_millis(100),
        modes: vec!["normal".into(), "realtime".into()],
        stress: true,
        vm_bytes: "2G".into(),
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--seconds" => a.seconds = val().parse().unwrap_or_else(|_| usage()),
            "--interval-ms" => {
                a.interval = Duration::from_millis(val().parse().unwrap_or_else(|_| usage()))
            }
            "--modes" => a.modes = val().split(',').map(str::to_string).collect(),
            "--no-stress" => a.stress = false,
            "--vm-bytes" => a.vm_bytes = val(),
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    if a.seconds == 0 || a.interval.is_zero() {
        usage()
    }
    for m in &a.modes {
        if m != "normal" && m != "realtime" {
            usage()
        }
    }
    a
}

/// stress-ng in its own process group, so that it and its workers can be
/// stopped together by that group's id.
fn start_stress(seconds: u64, vm_bytes: &str, dir: &std::path::Path) -> Child {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Command::new("stress-ng")
        .args([
            "--cpu",
            &cpus.to_string(), // a hog on every core
            "--vm",
            "1",
            "--vm-bytes",
            vm_bytes, // memory pressure: touch and re-touch this much
            "--hdd",
            "1",
            "--hdd-bytes",
            "256M", // disk I/O: write, read, unlink
            "--temp-path",
        ])
        .arg(dir)
        .args(["--timeout", &format!("{}s", seconds + 5), "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null()) // it warns that it "finished prematurely" when stopped
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("cannot run stress-ng: {e} (scripts/setup.sh installs it)");
            std::process::exit(1)
        })
}

fn stop_stress(mut child: Child) {
    let pgid = child.id() as i32;
    // SAFETY: signals the process group this program created for stress-ng.
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    let _ = child.wait();
}

struct Figures {
    mode: String,
    scheduling: String,
    pings: usize,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    max_gap: Duration,
    pinger_max: Duration,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Lateness of each ping against the pinger's absolute schedule. The first
/// slot is not known (the pinger starts its schedule before the first ping):
/// it is placed so that the earliest ping before the first resync is on time.
fn lateness(pings: &[u64], interval: Duration) -> (Vec<Duration>, Duration) {
    let iv = interval.as_nanos() as i64;
    let mut late: Vec<i64> = Vec::with_capacity(pings.len());
    let mut max_gap = 0;
    let Some(&first) = pings.first() else {
        return (Vec::new(), Duration::ZERO);
    };
    let mut slot = first as i64;
    let mut first_segment = 1; // pings before the first resync
    late.push(0);
    for w in pings.windows(2) {
        let (prev, this) = (w[0] as i64, w[1] as i64);
        max_gap = max_gap.max(this - prev);
        // The pinger's rule: next = next + interval; if that is already
        // behind the wake-up, next = wake-up + interval.
        slot += iv;
        if slot < prev {
            slot = prev + iv;
        } else if first_segment == late.len() {
            first_segment += 1;
        }
        late.push(this - slot);
    }
    let shift = late[..first_segment]
        .iter()
        .copied()
        .min()
        .unwrap_or(0)
        .min(0);
    for l in &mut late[..first_segment] {
        *l -= shift;
    }
    let late = late
        .into_iter()
        .map(|l| Duration::from_nanos(l.max(0) as u64))
        .collect();
    (late, Duration::from_nanos(max_gap as u64))
}

fn run_mode(mode: &str, a: &Args) -> Figures {
    let realtime = mode == "realtime";
    let mut scheduling = String::from("SCHED_OTHER");
    if realtime {
        match leasedog::agent::realtime::lock_memory() {
            Ok(()) => scheduling = "mlockall".into(),
            Err(e) => eprintln!("{e}"),
        }
    }
    // A budget whose ping window outlasts the run: evidence published once
    // stays fresh, so every tick pings and lateness is the pinger's alone.
    let budget = Budget::new(
        Duration::from_secs(3600),
        Duration::from_secs(3599),
        Duration::from_secs(1),
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .expect("budget");
    let cell = Arc::new(EvidenceCell::default());
    let (pinger, rt) = Pinger::start(cell.clone(), budget, a.interval, realtime).expect("pinger");
    match (realtime, rt) {
        (true, Ok(())) => scheduling = format!("{scheduling}+SCHED_FIFO"),
        (true, Err(e)) => {
            eprintln!("real-time scheduling not granted: {e}");
            scheduling = format!("{scheduling}, FIFO refused");
        }
        _ => {}
    }
    let dev = MemoryWatchdog::new(3);
    let log = dev.log();
    pinger.adopt(vec![Box::new(dev)]);
    cell.store(Evidence::Lease(clock::now()));
    std::thread::sleep(Duration::from_secs(a.seconds));
    let stats = pinger.stats.clone();
    pinger.stop();
    if realtime {
        // SAFETY: undoes the lock for the next mode; no arguments.
        unsafe {
            libc::munlockall();
        }
    }
    let pings: Vec<u64> = log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|op| match op {
            FakeOp::Ping { at } => Some(at.as_nanos()),
            _ => None,
        })
        .collect();
    let (mut late, max_gap) = lateness(&pings, a.interval);
    late.sort();
    Figures {
        mode: mode.into(),
        scheduling,
        pings: pings.len(),
        p50: quantile(&late, 0.5),
        p99: quantile(&late, 0.99),
        p999: quantile(&late, 0.999),
        max: late.last().copied().unwrap_or_default(),
        max_gap,
        pinger_max: Duration::from_nanos(stats.max_lateness_ns.load(Ordering::Relaxed)),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut all = Vec::new();
    for mode in &a.modes {
        let stress = a
            .stress
            .then(|| start_stress(a.seconds, &a.vm_bytes, dir.path()));
        // Let the hogs spin up before measuring.
        if stress.is_some() {
            std::thread::sleep(Duration::from_secs(2));
        }
        all.push(run_mode(mode, &a));
        if let Some(c) = stress {
            stop_stress(c);
        }
    }
    let load = if a.stress {
        format!(
            "stress-ng: cpu x{}, vm 1 x {}, hdd 1 x 256M",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            a.vm_bytes
        )
    } else {
        "no stress".into()
    };
    if a.json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|f| {
                serde_json::json!({
                    "mode": f.mode,
                    "scheduling": f.scheduling,
                    "pings": f.pings,
                    "p50_ms": f.p50.as_secs_f64() * 1e3,
                    "p99_ms": f.p99.as_secs_f64() * 1e3,
                    "p999_ms": f.p999.as_secs_f64() * 1e3,
                    "max_ms": f.max.as_secs_f64() * 1e3,
                    "max_gap_ms": f.max_gap.as_secs_f64() * 1e3,
                    "pinger_max_ms": f.pinger_max.as_secs_f64() * 1e3,
                })
            })
            .collect();
        let out = serde_json::json!({
            "seconds_per_mode": a.seconds,
            "interval_ms": a.interval.as_millis() as u64,
            "load": load,
            "modes": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
        return;
    }
    println!(
        "ping lateness, {} s per mode, ping every {} ms, {load}",
        a.seconds,
        a.interval.as_millis()
    );
    println!(
        "{:<9} {:<24} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11}",
        "mode",
        "scheduling",
        "pings",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "max gap ms",
        "pinger max"
    );
    for f in &all {
        println!(
            "{:<9} {:<24} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11}",
            f.mode,
            f.scheduling,
            f.pings,
            ms(f.p50),
            ms(f.p99),
            ms(f.p999),
            ms(f.max),
            ms(f.max_gap),
            ms(f.pinger_max)
        );
    }
    if all.iter().any(|f| f.pings < 1000) {
        println!(
            "(under 1000 pings a mode, p99.9 is the maximum: lengthen --seconds or \
             shorten --interval-ms for a real tail)"
        );
    }
}
