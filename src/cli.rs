//! The command line: `run`, `check`, `query-watchdog`, `test-watchdog`,
//! `audit verify|timeline`, `status`.

use crate::config::{Config, DeviceSpec, WatchdogMode};
use crate::timing::{self, Budget};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "leasedog",
    version,
    about = "Split-brain-safe PostgreSQL failover: an etcd leader lease paired with kernel watchdogs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent.
    Run {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
    },
    /// Check the configuration, etcd's round trip and the devices (without
    /// arming them); print the budget and a SAFE/UNSAFE verdict.
    Check {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        /// Round trips to measure.
        #[arg(long, default_value_t = 10)]
        samples: u32,
    },
    /// List the watchdog devices from sysfs (nothing is opened unless --open).
    QueryWatchdog {
        /// Also open this device to read its ioctls. Opening ARMS it; it is
        /// closed with the magic 'V' afterwards, which nowayout ignores.
        #[arg(long)]
        open: Option<PathBuf>,
        /// With --open: proceed even if the device has nowayout set (it will
        /// then reset the machine unless something keeps pinging it).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Arm a device and stop pinging it: the machine must reset. Reports
    /// failure if it is still up a few seconds after the timeout.
    TestWatchdog {
        /// A device path such as /dev/watchdog0, or `softdog`.
        #[arg(long)]
        device: String,
        /// Watchdog timeout to set, seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u32,
        /// Do not ask for the typed confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
    /// Read the audit log: verify its chain, or print the fencing timeline.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain of a node's audit log.
    Verify {
        /// The log file (default: this node's log under audit.dir).
        path: Option<PathBuf>,
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
    },
    /// For every change of leader: was the old leader fenced first, and how?
    Timeline {
        /// Local audit logs to merge (any node's).
        logs: Vec<PathBuf>,
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        /// Do not read the history mirrored in etcd.
        #[arg(long)]
        no_etcd: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Entry point: parses arguments, runs the command, returns the exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run { config } => match Config::load(&config) {
            Ok(cfg) => match crate::agent::run(cfg, config_digest(&config)) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e}");
                    1
                }
            },
            Err(e) => {
                eprintln!("leasedog: config: {e}");
                2
            }
        },
        Command::Check { config, samples } => match Config::load(&config) {
            Ok(cfg) => check(&cfg, samples),
            Err(e) => {
                eprintln!("leasedog: config: {e}");
                2
            }
        },
        Command::QueryWatchdog { open, force, json } => query_watchdog(open, force, json),
        Command::TestWatchdog {
            device,
            timeout,
            yes,
        } => test_watchdog(&device, timeout, yes),
        Command::Audit { command } => audit(command),
    }
}

fn audit(command: AuditCommand) -> i32 {
    let mut out = std::io::stdout();
    match command {
        AuditCommand::Verify { path, config } => {
            let path = match path {
                Some(p) => p,
                None => match Config::load(&config) {
                    Ok(cfg) => crate::audit::log_path(&cfg.audit.dir, &cfg.node),
                    Err(e) => {
                        eprintln!("leasedog: no log given and config: {e}");
                        return 2;
                    }
                },
            };
            crate::audit::cmd_verify(&path, &mut out)
        }
        AuditCommand::Timeline {
            logs,
            config,
            no_etcd,
            json,
        } => {
            let history = if no_etcd {
                None
            } else {
                match Config::load(&config) {
                    Ok(cfg) => match fetch_history(&cfg) {
                        Ok(h) => Some(h),
                        Err(e) => {
                            eprintln!("leasedog: etcd history unavailable: {e}");
                            None
                        }
                    },
                    Err(e) => {
                        eprintln!("leasedog: config: {e} (use --no-etcd to read local logs only)");
                        return 2;
                    }
                }
            };
            crate::audit::cmd_timeline(&logs, history, json, &mut out)
        }
    }
}

/// The lifecycle records leaders mirrored into etcd under the scope.
fn fetch_history(cfg: &Config) -> Result<Vec<crate::audit::Record>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut d = crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
            .await
            .map_err(|e| e.to_string())?;
        let values = d.history().await.map_err(|e| e.to_string())?;
        let (records, errors) = crate::audit::parse_history(values.iter().map(|v| v.as_slice()));
        for e in errors {
            eprintln!("leasedog: etcd history: {e}");
        }
        Ok(records)
    })
}

/// Arms `device` with `timeout`, then never pings it. If the machine is
/// still up `timeout + TEST_GRACE` later, the watchdog does not work.
pub const TEST_GRACE: Duration = Duration::from_secs(5);

fn test_watchdog(device: &str, timeout: u32, yes: bool) -> i32 {
    let spec = if device == "softdog" {
        DeviceSpec::Softdog
    } else {
        DeviceSpec::Device {
            path: PathBuf::from(device),
        }
    };
    if timeout == 0 {
        eprintln!("leasedog: --timeout must be at least 1 s");
        return 2;
    }
    println!(
        "This arms {device} with a {timeout} s timeout and stops pinging it.\n\
         If the watchdog works, THIS MACHINE WILL BE RESET about {timeout} s from now,\n\
         without shutting anything down. Stop PostgreSQL and anything else first."
    );
    if !yes {
        println!("Type Proceed to continue:");
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() || line.trim() != "Proceed" {
            println!("not confirmed; nothing armed");
            return 2;
        }
    }
    // A budget whose target timeout is exactly `timeout`.
    let budget = match Budget::new(
        Duration::from_secs(timeout as u64 + 1),
        Duration::from_secs(1),
        Duration::from_millis(500),
        Duration::from_millis(100),
        Duration::from_millis(100),
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("leasedog: {e}");
            return 2;
        }
    };
    let roots = crate::watchdog::SysRoots::real();
    let dog = match crate::watchdog::arm(
        &spec,
        &budget,
        crate::config::NowayoutPolicy::KeepPinging,
        &roots,
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("leasedog: cannot arm {device}: {e}");
            return 1;
        }
    };
    let armed_at = crate::clock::now();
    let w = dog.info().w_secs;
    println!(
        "armed {} ({}), W = {w} s read back, nowayout = {}; no more pings. Reset expected at +{w} s.",
        dog.info().path.display(),
        dog.info().identity,
        dog.info().nowayout
    );
    let limit = Duration::from_secs(w as u64) + TEST_GRACE;
    loop {
        let since = crate::clock::now().saturating_since(armed_at);
        if since >= limit {
            break;
        }
        println!("+{:.0} s", since.as_secs_f64());
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "FAILED: the machine is still up {:.0} s after arming ({w} s timeout + {} s grace): \
         the watchdog did not reset it",
        limit.as_secs_f64(),
        TEST_GRACE.as_secs()
    );
    match dog.disarm() {
        Ok(()) => println!("the device was disarmed (magic close)"),
        Err(e) => println!("the device could not be disarmed: {e}"),
    }
    1
}

fn config_digest(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| crate::audit::digest_hex(&b))
        .unwrap_or_default()
}

fn init_logging() {
    let level = std::env::var("LEASEDOG_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // LEASEDOG_LOG raises leasedog's own level; libraries stay at INFO.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("leasedog", level)
        .with_default(level.min(tracing::Level::INFO));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter),
        )
        .try_init();
}

/// One finding of `check`.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub unsafe_: bool,
    pub what: String,
}

/// The verdict of `check` from what it measured: pure, so it is tested on
/// its own. `rtts` are etcd round trips (empty: unreachable).
pub fn assess(
    cfg: &Config,
    budget: &Budget,
    rtts: &[Duration],
    etcd_error: Option<&str>,
    devices: &[(String, Result<String, String>)],
) -> Vec<Finding> {
    let mut f = Vec::new();
    let mut bad = |what: String| {
        f.push(Finding {
            unsafe_: true,
            what,
        })
    };
    if let Some(e) = etcd_error {
        bad(format!("etcd unreachable: {e}"));
    }
    if let Some(worst) = rtts.iter().max() {
        if *worst > budget.request_timeout {
            bad(format!(
                "worst etcd round trip {worst:?} exceeds etcd.request_timeout {:?}: renewals would time out",
                budget.request_timeout
            ));
        }
        if budget.loop_interval + *worst > budget.ping_window() {
            bad(format!(
                "loop_interval {:?} + worst round trip {worst:?} exceeds M - R = {:?}: pings would pause",
                budget.loop_interval,
                budget.ping_window()
            ));
        }
    }
    match cfg.watchdog.mode {
        WatchdogMode::Off => bad("watchdog mode is off: nothing fences a stalled node".into()),
        WatchdogMode::Automatic if cfg.watchdog.devices.is_empty() => {
            bad("no watchdog device configured: nothing fences a stalled node".into())
        }
        _ => {}
    }
    for (name, r) in devices {
        if let Err(e) = r {
            bad(format!("{name}: {e}"));
        }
    }
    for d in &cfg.watchdog.devices {
        if let DeviceSpec::Fake { .. } = d {
            bad("a fake (test) device fences nothing".into());
        }
    }
    let mut out = f;
    if out.is_empty() {
        out.push(Finding {
            unsafe_: false,
            what: "every renewal fits the budget and every device can be armed".into(),
        });
    }
    out
}

fn check(cfg: &Config, samples: u32) -> i32 {
    let budget = match cfg.budget() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("leasedog: config: {e}");
            return 2;
        }
    };
    let (rtts, etcd_error) = measure_etcd(cfg, samples);
    let roots = crate::watchdog::SysRoots::real();
    let devices: Vec<(String, Result<String, String>)> = cfg
        .watchdog
        .devices
        .iter()
        .map(|spec| {
            let name = format!("{spec:?}");
            let r = crate::watchdog::inspect(spec, cfg.watchdog.nowayout, &roots)
                .map_err(|e| e.to_string());
            (name, r)
        })
        .collect();
    println!("budget:");
    println!(
        "  T (lease ttl)         {:>8.3} s",
        budget.ttl.as_secs_f64()
    );
    println!(
        "  W (watchdog timeout)  {:>8} s  (T - M, whole seconds)",
        timing::target_timeout(&budget)
    );
    println!(
        "  M (safety margin)     {:>8.3} s",
        budget.margin.as_secs_f64()
    );
    println!(
        "  R (reset allowance)   {:>8.3} s",
        budget.reset_allowance.as_secs_f64()
    );
    println!(
        "  ping window M - R     {:>8.3} s",
        budget.ping_window().as_secs_f64()
    );
    println!(
        "  loop interval         {:>8.3} s",
        budget.loop_interval.as_secs_f64()
    );
    println!(
        "  etcd request timeout  {:>8.3} s",
        budget.request_timeout.as_secs_f64()
    );
    match rtts.iter().max() {
        Some(w) => println!(
            "etcd: {} round trips, median {:.1} ms, worst {:.1} ms",
            rtts.len(),
            median(&rtts).as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3
        ),
        None => println!("etcd: no round trip measured"),
    }
    for (name, r) in &devices {
        match r {
            Ok(desc) => println!("device {name}: ok: {desc}"),
            Err(e) => println!("device {name}: REFUSED: {e}"),
        }
    }
    let findings = assess(cfg, &budget, &rtts, etcd_error.as_deref(), &devices);
    let unsafe_ = findings.iter().any(|f| f.unsafe_);
    println!("verdict: {}", if unsafe_ { "UNSAFE" } else { "SAFE" });
    for f in &findings {
        println!("  - {}", f.what);
    }
    if unsafe_ {
        1
    } else {
        0
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// Measures `samples` etcd round trips (reads of the leader key).
fn measure_etcd(cfg: &Config, samples: u32) -> (Vec<Duration>, Option<String>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    rt.block_on(async {
        let mut d = match crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node).await {
            Ok(d) => d,
            Err(e) => return (Vec::new(), Some(e.to_string())),
        };
        let mut rtts = Vec::new();
        for _ in 0..samples.max(1) {
            let t0 = std::time::Instant::now();
            if let Err(e) = d.leader().await {
                return (rtts, Some(e.to_string()));
            }
            rtts.push(t0.elapsed());
        }
        (rtts, None)
    })
}

fn query_watchdog(open: Option<PathBuf>, force: bool, json: bool) -> i32 {
    let roots = crate::watchdog::SysRoots::real();
    let reports = match open {
        None => crate::watchdog::query(&roots),
        Some(path) => {
            eprintln!(
                "leasedog: opening {} ARMS it; it will be closed with the magic 'V'.",
                path.display()
            );
            match crate::watchdog::query_open(&path, &roots, force) {
                Ok(r) => vec![r],
                Err(e) => {
                    eprintln!("leasedog: {e}");
                    return 1;
                }
            }
        }
    };
    if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("leasedog: {e}");
                return 1;
            }
        }
    } else if reports.is_empty() {
        println!("no watchdog devices in /sys/class/watchdog");
    } else {
        print!("{}", crate::watchdog::render_table(&reports));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::parse(&format!("node='a'\n{extra}")).unwrap()
    }

    #[test]
    fn safe_when_everything_fits() {
        let c = cfg("[watchdog]\nmode='required'\n[[watchdog.device]]\nkind='softdog'");
        let b = c.budget().unwrap();
        let f = assess(
            &c,
            &b,
            &[Duration::from_millis(2)],
            None,
            &[("softdog".into(), Ok("ok".into()))],
        );
        assert!(f.iter().all(|f| !f.unsafe_), "{f:?}");
    }

    #[test]
    fn slow_etcd_is_unsafe() {
        let c = cfg("[watchdog]\nmode='required'\n[[watchdog.device]]\nkind='softdog'");
        let b = c.budget().unwrap();
        let f = assess(&c, &b, &[Duration::from_millis(1500)], None, &[]);
        assert!(
            f.iter()
                .any(|f| f.unsafe_ && f.what.contains("request_timeout")),
            "{f:?}"
        );
        let f = assess(&c, &b, &[], Some("connection refused"), &[]);
        assert!(f
            .iter()
            .any(|f| f.unsafe_ && f.what.contains("unreachable")));
    }

    #[test]
    fn no_watchdog_is_unsafe() {
        let c = cfg("");
        let b = c.budget().unwrap();
        let f = assess(&c, &b, &[Duration::from_millis(1)], None, &[]);
        assert!(f
            .iter()
            .any(|f| f.unsafe_ && f.what.contains("nothing fences")));
    }

    #[test]
    fn refused_device_is_unsafe() {
        let c = cfg("[watchdog]\nmode='required'\n[[watchdog.device]]\nkind='softdog'");
        let b = c.budget().unwrap();
        let f = assess(
            &c,
            &b,
            &[Duration::from_millis(1)],
            None,
            &[("softdog".into(), Err("busy: held by systemd".into()))],
        );
        assert!(f
            .iter()
            .any(|f| f.unsafe_ && f.what.contains("held by systemd")));
    }
}
