//! The command line: the parser ([`Cli`], [`parse`]) and [`main`], which
//! hands each command to its module: [`run`], [`check`],
//! [`query_watchdog`], [`test_watchdog`], [`status`], [`audit`].

pub mod audit;
pub mod check;
pub mod query_watchdog;
pub mod run;
pub mod status;
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
