//! The agent's configuration: one TOML file, every value defaulted except the
//! node name, validated into a [`Budget`] with errors that name the key.

pub mod cluster;
pub mod pg_params;
pub mod postgres;
pub mod tags;

use crate::timing::{Budget, BudgetError};
use postgres::PgConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster scope: agents with the same scope race for one leader key.
    #[serde(default = "default_scope")]
    pub scope: String,
    /// This node's name, unique within the scope.
    pub node: String,
    #[serde(default)]
    pub etcd: EtcdConfig,
    #[serde(default)]
    pub timing: TimingConfig,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// The PostgreSQL this agent manages. Without it the agent only holds the
    /// key and arms the watchdogs (useful to test a node's fencing alone).
    #[serde(default)]
    pub postgres: Option<PgConfig>,
    /// The Prometheus `/metrics` and JSON `/status` endpoint (off by default).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Health endpoints for load balancers (off by default).
    #[serde(default)]
    pub health: HealthConfig,
    /// Commands run on changes of PostgreSQL's state (`crate::callbacks`).
    #[serde(default)]
    pub callbacks: crate::callbacks::CallbacksConfig,
    /// `[tags]`: what this node may do in the scope (`nofailover`).
    #[serde(default)]
    pub tags: tags::Tags,
}

/// `[health]`: `/primary`, `/replica`, `/read-only`, `/leader`, `/health`
/// for HAProxy and VIP managers (see `crate::health`). They reveal only the
/// node's role, so they may listen on the node's own address.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `IP:PORT` to listen on, e.g. `0.0.0.0:8008`. Absent: no endpoint.
    #[serde(default)]
    pub listen: Option<String>,
}

/// `[metrics]`: an HTTP endpoint for Prometheus and `leasedog status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` to listen on, e.g. `127.0.0.1:9187`. Absent: no endpoint.
    #[serde(default)]
    pub listen: Option<String>,
    /// Allow a non-loopback `listen` address. The endpoint has no
    /// authentication; it reveals the cluster's topology.
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`. The client keeps to these and
    /// never switches to the member list etcd advertises.
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix under which scopes live.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Deadline of every etcd request, seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: f64,
    /// Deadline to establish a connection, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: f64,
    /// PEM CA bundle that signed etcd's server certificate (https:// endpoints).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// etcd user and password (etcd `auth enable`). The config file then
    /// holds a secret: keep it mode 0640, group leasedog.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl EtcdConfig {
    /// Whether any TLS option is set (every endpoint must then be https://).
    pub fn tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingConfig {
    /// `T`, the leader lease TTL, whole seconds.
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    /// `M`, seconds: the node must be fenced this long before the lease can expire.
    #[serde(default = "default_margin")]
    pub safety_margin: f64,
    /// `R`, seconds: allowance for the reset itself and timer granularity.
    #[serde(default = "default_reset_allowance")]
    pub reset_allowance: f64,
    /// Seconds between renewals.
    #[serde(default = "default_loop_interval")]
    pub loop_interval: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchdogMode {
    /// No watchdog: the agent still leads, but nothing fences a stalled node.
    Off,
    /// Arm what can be armed; lead without a watchdog if none can.
    Automatic,
    /// Never promote without every configured device armed.
    Required,
}

/// What to do with a device whose `nowayout` is set (FENCING.md rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NowayoutPolicy {
    /// Once armed, keep pinging as a replica while the agent is healthy.
    KeepPinging,
    /// Refuse such a device.
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    #[serde(default = "default_mode")]
    pub mode: WatchdogMode,
    #[serde(default = "default_nowayout")]
    pub nowayout: NowayoutPolicy,
    /// Devices pinged together. Default: none (with mode `off`).
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSpec>,
    /// Seconds between pings while permitted.
    #[serde(default = "default_ping_interval")]
    pub ping_interval: f64,
}

/// One watchdog device to arm.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DeviceSpec {
    /// A character device such as `/dev/watchdog0` (usually the hardware one).
    Device { path: PathBuf },
    /// The kernel's softdog, found by its identity `Software Watchdog`.
    Softdog,
    /// Test builds only: a device that appends each operation to `record`.
    Fake { record: PathBuf },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory of the append-only audit log.
    #[serde(default = "default_audit_dir")]
    pub dir: PathBuf,
}

fn default_scope() -> String {
    "main".into()
}
fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_prefix() -> String {
    "/leasedog".into()
}
fn default_request_timeout() -> f64 {
    1.0
}
fn default_connect_timeout() -> f64 {
    2.0
}
fn default_ttl() -> u64 {
    10
}
fn default_margin() -> f64 {
    5.0
}
fn default_reset_allowance() -> f64 {
    1.0
}
fn default_loop_interval() -> f64 {
    1.0
}
fn default_mode() -> WatchdogMode {
    WatchdogMode::Automatic
}
fn default_nowayout() -> NowayoutPolicy {
    NowayoutPolicy::KeepPinging
}
fn default_ping_interval() -> f64 {
    0.1
}
fn default_audit_dir() -> PathBuf {
    "/var/lib/leasedog".into()
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: default_endpoints(),
            prefix: default_prefix(),
            request_timeout: default_request_timeout(),
            connect_timeout: default_connect_timeout(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
        }
    }
}

impl Default for TimingConfig {
    fn default() -> Self {
        TimingConfig {
            ttl: default_ttl(),
            safety_margin: default_margin(),
            reset_allowance: default_reset_allowance(),
            loop_interval: default_loop_interval(),
        }
    }
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            mode: default_mode(),
            nowayout: default_nowayout(),
            devices: Vec::new(),
            ping_interval: default_ping_interval(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: default_audit_dir(),
        }
    }
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {rule}")]
    Invalid { key: &'static str, rule: String },
}

impl From<BudgetError> for ConfigError {
    fn from(e: BudgetError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            rule: e.rule,
        }
    }
}

fn invalid(key: &'static str, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        rule: rule.into(),
    }
}

fn seconds(key: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || v < 0.0 {
        return Err(invalid(key, format!("{v} is not a number of seconds >= 0")));
    }
    Ok(Duration::from_secs_f64(v))
}

fn check_name(key: &'static str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{v:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        ))
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every rule that does not need the outside world.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("node", &self.node)?;
        check_name("scope", &self.scope)?;
        if self.etcd.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "at least one endpoint is needed"));
        }
        for ep in &self.etcd.endpoints {
            let rest = ep
                .strip_prefix("http://")
                .or_else(|| ep.strip_prefix("https://"))
                .ok_or_else(|| {
                    invalid(
                        "etcd.endpoints",
                        format!("{ep:?} must start with http:// or https://"),
                    )
                })?;
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{ep:?} must be a URL of the form http://HOST:PORT"),
                ));
            }
        }
        if self.etcd.tls() {
            if let Some(ep) = self
                .etcd
                .endpoints
                .iter()
                .find(|e| e.starts_with("http://"))
            {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{ep:?}: TLS options (ca_file, cert_file, key_file) need https:// endpoints"),
                ));
            }
        }
        if self.etcd.cert_file.is_some() != self.etcd.key_file.is_some() {
            return Err(invalid(
                "etcd.cert_file",
                "cert_file and key_file go together (the client certificate and its key)",
            ));
        }
        if self.etcd.username.is_some() != self.etcd.password.is_some() {
            return Err(invalid(
                "etcd.username",
                "username and password go together",
            ));
        }
        if let Some(l) = &self.metrics.listen {
            let addr: std::net::SocketAddr = l.parse().map_err(|e| {
                invalid(
                    "metrics.listen",
                    format!("{l:?} is not an IP:PORT address: {e}"),
                )
            })?;
            if !addr.ip().is_loopback() && !self.metrics.allow_remote {
                return Err(invalid(
                    "metrics.listen",
                    format!(
                        "{l:?} is not a loopback address; the endpoint has no authentication \
                         (set metrics.allow_remote = true to expose it anyway)"
                    ),
                ));
            }
        }
        if let Some(l) = &self.health.listen {
            l.parse::<std::net::SocketAddr>().map_err(|e| {
                invalid(
                    "health.listen",
                    format!("{l:?} is not an IP:PORT address: {e}"),
                )
            })?;
        }
        self.callbacks.check().map_err(|(k, r)| invalid(k, r))?;
        if !self.etcd.prefix.starts_with('/') {
            return Err(invalid("etcd.prefix", "must start with '/'"));
        }
        if seconds("etcd.connect_timeout", self.etcd.connect_timeout)?.is_zero() {
            return Err(invalid("etcd.connect_timeout", "must be greater than zero"));
        }
        let ping = seconds("watchdog.ping_interval", self.watchdog.ping_interval)?;
        self.budget()?;
        let budget = self.budget()?;
        // A quarter: a leader whose pinger is silent for half of M - R stops
        // renewing (`timing::pinger_silent`), which must mean rounds missed.
        if ping.is_zero() || ping * 4 > budget.ping_window() {
            return Err(invalid(
                "watchdog.ping_interval",
                format!(
                    "{ping:?} must be above zero and at most a quarter of M - R = {:?}",
                    budget.ping_window()
                ),
            ));
        }
        match self.watchdog.mode {
            WatchdogMode::Required if self.watchdog.devices.is_empty() => {
                return Err(invalid(
                    "watchdog.device",
                    "mode \"required\" needs at least one [[watchdog.device]]",
                ));
            }
            WatchdogMode::Off if !self.watchdog.devices.is_empty() => {
                return Err(invalid(
                    "watchdog.mode",
                    "devices are listed but mode is \"off\": say \"automatic\" or \"required\", or remove them",
                ));
            }
            _ => {}
        }
        if let Some(pg) = &self.postgres {
            pg.validate()?;
        }
        let mut seen = Vec::new();
        for d in &self.watchdog.devices {
            if seen.contains(&d) {
                return Err(invalid("watchdog.device", format!("{d:?} is listed twice")));
            }
            seen.push(d);
            if let DeviceSpec::Fake { .. } = d {
                if !cfg!(feature = "testing") {
                    return Err(invalid(
                        "watchdog.device",
                        "kind \"fake\" exists only in test builds (it fences nothing)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The validated timing budget.
    pub fn budget(&self) -> Result<Budget, ConfigError> {
        if self.timing.ttl > 3600 {
            return Err(invalid(
                "timing.ttl",
                "more than an hour is not a lease TTL",
            ));
        }
        Ok(Budget::new(
            Duration::from_secs(self.timing.ttl),
            seconds("timing.safety_margin", self.timing.safety_margin)?,
            seconds("timing.reset_allowance", self.timing.reset_allowance)?,
            seconds("timing.loop_interval", self.timing.loop_interval)?,
            seconds("etcd.request_timeout", self.etcd.request_timeout)?,
        )?)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.etcd.connect_timeout)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs_f64(self.watchdog.ping_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key.to_string(),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn node_name_alone_is_enough() {
        let c = Config::parse("node = \"pg1\"").unwrap();
        assert_eq!(c.scope, "main");
        assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:2379"]);
        let b = c.budget().unwrap();
        assert_eq!(b.ttl, Duration::from_secs(10));
        assert_eq!(c.watchdog.mode, WatchdogMode::Automatic);
    }

    #[test]
    fn full_example_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/leasedog.example.toml"
        ))
        .unwrap();
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.watchdog.devices.len(), 2);
        assert_eq!(c.watchdog.devices[1], DeviceSpec::Softdog);
    }

    #[test]
    fn missing_node_is_a_parse_error_naming_it() {
        let e = Config::parse("scope = \"x\"").unwrap_err();
        assert!(e.to_string().contains("node"), "{e}");
    }

    #[test]
    fn metrics_must_be_loopback_unless_allowed() {
        let c = Config::parse("node='a'").unwrap();
        assert!(c.metrics.listen.is_none(), "off by default");
        Config::parse("node='a'\n[metrics]\nlisten='127.0.0.1:9187'").unwrap();
        Config::parse("node='a'\n[metrics]\nlisten='[::1]:9187'").unwrap();
        let e = Config::parse("node='a'\n[metrics]\nlisten='0.0.0.0:9187'").unwrap_err();
        assert_eq!(key_of(e), "metrics.listen");
        Config::parse("node='a'\n[metrics]\nlisten='0.0.0.0:9187'\nallow_remote=true").unwrap();
        let e = Config::parse("node='a'\n[metrics]\nlisten='localhost'").unwrap_err();
        assert_eq!(key_of(e), "metrics.listen");
    }

    /// At most a quarter of M - R: half of it is the silence after which a
    /// leader stops renewing (`timing::pinger_silent`).
    #[test]
    fn ping_interval_is_at_most_a_quarter_of_the_ping_window() {
        let with = |ping: &str| {
            Config::parse(&format!(
                "node='a'\n[timing]\nttl=5\nsafety_margin=2.0\nreset_allowance=1.0\n\
                 loop_interval=0.5\n[etcd]\nrequest_timeout=0.4\n[watchdog]\nping_interval={ping}"
            ))
        };
        with("0.25").unwrap();
        let e = with("0.3").unwrap_err();
        assert!(e.to_string().contains("a quarter of M - R"), "{e}");
        assert_eq!(key_of(e), "watchdog.ping_interval");
    }

    #[test]
    fn tls_and_auth_options_are_checked() {
        let e = Config::parse("node='a'\n[etcd]\nca_file='/x/ca.pem'").unwrap_err();
        assert_eq!(key_of(e), "etcd.endpoints", "TLS with http:// endpoints");
        let c = Config::parse(
            "node='a'\n[etcd]\nendpoints=['https://127.0.0.1:2379']\nca_file='/x/ca.pem'",
        )
        .unwrap();
        assert!(c.etcd.tls());
        let e = Config::parse("node='a'\n[etcd]\nendpoints=['https://h:1']\ncert_file='/x/c.pem'")
            .unwrap_err();
        assert_eq!(key_of(e), "etcd.cert_file");
        let e = Config::parse("node='a'\n[etcd]\nusername='root'").unwrap_err();
        assert_eq!(key_of(e), "etcd.username");
    }

    #[test]
    fn typo_is_rejected() {
        let e = Config::parse("node = \"a\"\n[timing]\nttll = 5").unwrap_err();
        assert!(e.to_string().contains("ttll"), "{e}");
    }

    #[test]
    fn impossible_budgets_name_the_key() {
        let e = Config::parse("node='a'\n[timing]\nttl=1").unwrap_err();
        assert_eq!(key_of(e), "timing.ttl");
        let e = Config::parse("node='a'\n[timing]\nsafety_margin=1.0\nreset_allowance=1.0")
            .unwrap_err();
        assert_eq!(key_of(e), "timing.safety_margin");
        let e = Config::parse("node='a'\n[timing]\nloop_interval=4.0").unwrap_err();
        assert_eq!(key_of(e), "timing.loop_interval");
        let e = Config::parse("node='a'\n[timing]\nsafety_margin=-1").unwrap_err();
        assert_eq!(key_of(e), "timing.safety_margin");
    }

    #[test]
    fn bad_names_and_endpoints() {
        assert_eq!(key_of(Config::parse("node='a b'").unwrap_err()), "node");
        assert_eq!(
            key_of(Config::parse("node='a'\n[etcd]\nendpoints=['127.0.0.1:2379']").unwrap_err()),
            "etcd.endpoints"
        );
        assert_eq!(
            key_of(Config::parse("node='a'\n[etcd]\nendpoints=[]").unwrap_err()),
            "etcd.endpoints"
        );
    }

    #[test]
    fn required_mode_needs_devices() {
        let e = Config::parse("node='a'\n[watchdog]\nmode='required'").unwrap_err();
        assert_eq!(key_of(e), "watchdog.device");
    }

    #[test]
    fn off_mode_with_devices_is_contradictory() {
        let e =
            Config::parse("node='a'\n[watchdog]\nmode='off'\n[[watchdog.device]]\nkind='softdog'")
                .unwrap_err();
        assert_eq!(key_of(e), "watchdog.mode");
    }

    #[test]
    fn duplicate_device_rejected() {
        let e = Config::parse(
            "node='a'\n[[watchdog.device]]\nkind='softdog'\n[[watchdog.device]]\nkind='softdog'",
        )
        .unwrap_err();
        assert_eq!(key_of(e), "watchdog.device");
    }

    #[test]
    fn unknown_device_kind_is_a_parse_error() {
        let e = Config::parse("node='a'\n[[watchdog.device]]\nkind='laser'").unwrap_err();
        assert!(e.to_string().contains("laser"), "{e}");
    }

    #[cfg(not(feature = "testing"))]
    #[test]
    fn fake_devices_refused_outside_test_builds() {
        let e = Config::parse("node='a'\n[[watchdog.device]]\nkind='fake'\nrecord='/tmp/x'")
            .unwrap_err();
        assert_eq!(key_of(e), "watchdog.device");
    }
}
