//! The command line: the parser ([`Cli`], [`parse`]) and [`main`], which
//! hands each command to its module: [`run`], [`check`],
//! [`query_watchdog`], [`test_watchdog`], [`status`], [`audit`].

pub mod audit;
pub mod check;
pub mod edit_config;
pub mod history;
pub mod list;
pub mod pause;
pub mod query_watchdog;
pub mod reinit;
pub mod restart;
pub mod run;
pub mod status;
pub mod switchover;
pub mod test_watchdog;

pub use check::{assess, Finding};
pub use status::{status_table, StatusReport};
pub use test_watchdog::TEST_GRACE;

use crate::config::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    /// The scope's leader and members from etcd, and this node's own view
    /// (role, armed devices, W, time since the last fresh renewal) from its
    /// `[metrics]` endpoint when configured.
    Status {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Read the audit log: verify its chain, or print the fencing timeline.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Maintenance mode: no automatic failover or promotion in the scope
    /// until `resume`; the leader keeps its key and PostgreSQL may be
    /// restarted by hand (docs/operations-maintenance.md).
    Pause {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
    },
    /// End the maintenance mode. Refused while a node that does not hold
    /// the key has a writable PostgreSQL (unless --force).
    Resume {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Restart NODE's PostgreSQL without a failover (the leader keeps its
    /// key); waits for the outcome.
    Restart {
        node: String,
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        /// Seconds to wait for the node's outcome.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Wipe a replica's data directory and clone it again from the leader;
    /// refused on the leader. Waits for the outcome.
    Reinit {
        node: String,
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        /// Seconds to wait for the node's outcome.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The scope's members: role, state, timeline, LSNs, lag, watchdog,
    /// pending operations (etcd only).
    List {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The changes of leader, from etcd's history and any audit logs given.
    History {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Local audit logs to read as well.
        #[arg(long, num_args = 1..)]
        audit: Vec<PathBuf>,
    },
    /// A planned switchover: no acknowledged commit lost.
    Switchover {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        /// The leader expected (refused if another leads).
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: String,
        /// Not before: seconds since the epoch, +30s/+5m/+1h, or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long)]
        at: Option<String>,
        /// Skip the lag bound (the catch-up check still holds).
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the outcome (after --at).
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// A scope with no leader: give the key to one replica.
    Failover {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Show or change the scope's cluster-wide settings in etcd (loop
    /// interval, lag bound, synchronous mode, PostgreSQL parameters),
    /// validated before anything is written. Prints the result as JSON.
    EditConfig {
        #[arg(long, default_value = "/etc/leasedog/leasedog.toml")]
        config: PathBuf,
        /// KEY=VALUE (repeatable): timing.loop_interval,
        /// postgres.maximum_lag_on_failover, postgres.synchronous_mode,
        /// postgres.parameters.NAME; an empty VALUE removes the key.
        #[arg(long)]
        set: Vec<String>,
        /// Replace the whole config with this JSON file (`-`: stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the stored config (the default without --set or --file).
        #[arg(long)]
        show: bool,
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

/// Parses a command line (without the program name) with the real parser,
/// executing nothing. `Ok(None)`: the line asks for `--help` or `--version`.
/// Used by `main` and by the test that keeps the documentation's command
/// lines in step with the binary (`tests/docs.rs`).
pub fn parse<I, T>(args: I) -> Result<Option<Command>, String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from("leasedog"))
        .chain(args.into_iter().map(Into::into));
    match Cli::try_parse_from(argv) {
        Ok(cli) => Ok(Some(cli.command)),
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Entry point: parses arguments, runs the command, returns the exit status.
/// Each command lives in the module of its name.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run { config } => run::run(&config),
        Command::Status { config, json } => with_config(&config, |cfg| status::status(cfg, json)),
        Command::Check { config, samples } => {
            with_config(&config, |cfg| check::check(cfg, samples))
        }
        Command::QueryWatchdog { open, force, json } => {
            query_watchdog::query_watchdog(open, force, json)
        }
        Command::TestWatchdog {
            device,
            timeout,
            yes,
        } => test_watchdog::test_watchdog(&device, timeout, yes),
        Command::Audit { command } => audit::audit(command),
        Command::Pause { config } => with_config(&config, pause::pause),
        Command::Resume { config, force } => with_config(&config, |c| pause::resume(c, force)),
        Command::Restart {
            node,
            config,
            timeout,
        } => with_config(&config, |c| {
            let t = std::time::Duration::from_secs(timeout);
            restart::request(c, crate::decide::Op::Restart, &node, t)
        }),
        Command::Reinit {
            node,
            config,
            timeout,
        } => with_config(&config, |c| {
            reinit::reinit(c, &node, std::time::Duration::from_secs(timeout))
        }),
        Command::List { config, json } => with_config(&config, |cfg| list::list(cfg, json)),
        Command::History {
            config,
            json,
            audit,
        } => with_config(&config, |cfg| history::history(cfg, json, &audit)),
        Command::Switchover {
            config,
            from,
            to,
            at,
            force,
            wait,
        } => with_config(&config, |cfg| {
            switchover::switchover(
                cfg,
                switchover::SwitchoverArgs {
                    from,
                    to,
                    at,
                    force,
                    wait,
                },
            )
        }),
        Command::Failover { config, to, wait } => {
            with_config(&config, |cfg| switchover::failover(cfg, &to, wait))
        }
        Command::EditConfig {
            config,
            set,
            file,
            show,
        } => with_config(&config, |cfg| {
            edit_config::edit_config(cfg, &set, file, show)
        }),
    }
}

/// Loads the configuration and runs `f` on it; exit 2 if it cannot be loaded.
fn with_config(path: &std::path::Path, f: impl FnOnce(&Config) -> i32) -> i32 {
    match Config::load(path) {
        Ok(cfg) => f(&cfg),
        Err(e) => {
            eprintln!("leasedog: config: {e}");
            2
        }
    }
}

/// Warns when the config file is readable by everyone: it may hold etcd
/// credentials (the package installs it 0640, group leasedog).
pub fn warn_if_world_readable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o004 != 0 => {
            tracing::warn!(
                "{} is readable by every user (mode {:o}) and may hold etcd credentials: \
                 chmod 0640 it (group leasedog)",
                path.display(),
                m.permissions().mode() & 0o7777
            );
            true
        }
        _ => false,
    }
}

pub(crate) fn config_digest(path: &std::path::Path) -> String {
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

/// The sysfs, /dev and /proc that `check` and `query-watchdog` read. Test
/// builds may point them at a fake tree (`$LEASEDOG_SYSROOT/{sys,dev,proc}`).
pub(crate) fn sysroots() -> crate::watchdog::SysRoots {
    #[cfg(feature = "testing")]
    if let Some(root) = std::env::var_os("LEASEDOG_SYSROOT") {
        let root = PathBuf::from(root);
        return crate::watchdog::SysRoots {
            sys: root.join("sys"),
            dev: root.join("dev"),
            proc: root.join("proc"),
        };
    }
    crate::watchdog::SysRoots::real()
}
