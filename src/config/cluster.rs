//! Cluster-wide settings, kept in etcd under `{prefix}/{scope}/config` as
//! JSON and edited with `leasedog edit-config`: the settings every node of
//! a scope must agree on, and PostgreSQL parameters shared by all.
//!
//! Precedence (docs/operations-bootstrap.md):
//! - `timing.loop_interval`, `postgres.maximum_lag_on_failover`,
//!   `postgres.synchronous_mode`: etcd's value, when set, wins over the
//!   node's TOML (which is the default for a scope that sets nothing);
//! - `postgres.parameters.NAME`: the node's `[postgres.parameters]` win
//!   over etcd's for the same name (per-node sizing), etcd's apply to
//!   every other name;
//! - node identity, etcd endpoints and credentials, devices, `ttl`,
//!   `safety_margin`, `reset_allowance`: only in the node's TOML.
//!
//! The same validation as the TOML's (`Config::validate`, `Config::budget`:
//! timing feasibility, parameter names) runs on the settings applied to a
//! node's configuration, by `edit-config` before writing and by the agent
//! before using them; a malformed value in etcd is an error naming the key,
//! and the agent keeps its last good settings.

use super::pg_params::{self, Params};
use super::{Config, ConfigError};
use serde::{Deserialize, Serialize};

/// The keys `edit-config --set` accepts (besides `postgres.parameters.NAME`).
pub const KEYS: &[&str] = &[
    "timing.loop_interval",
    "postgres.maximum_lag_on_failover",
    "postgres.synchronous_mode",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_interval: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_lag_on_failover: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Params::is_empty")]
    pub parameters: Params,
}

fn invalid(key: &'static str, rule: String) -> ConfigError {
    ConfigError::Invalid { key, rule }
}

impl ClusterConfig {
    /// Parses the JSON stored in etcd (or given to `--file`); errors name
    /// the cause.
    pub fn from_json(bytes: &[u8]) -> Result<ClusterConfig, ConfigError> {
        let c: ClusterConfig = serde_json::from_slice(bytes)
            .map_err(|e| invalid("config", format!("not a valid cluster config: {e}")))?;
        c.check()?;
        Ok(c)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("serializable")
    }

    /// Checks that need no node configuration.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(v) = self.loop_interval {
            if !v.is_finite() || v <= 0.0 {
                return Err(invalid(
                    "timing.loop_interval",
                    format!("{v} is not a positive number of seconds"),
                ));
            }
        }
        pg_params::check(&self.parameters).map_err(|e| invalid("postgres.parameters", e))
    }

    /// `--set KEY=VALUE`: one of [`KEYS`] or `postgres.parameters.NAME`;
    /// `VALUE` empty removes the key.
    pub fn set(&mut self, assignment: &str) -> Result<(), ConfigError> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| invalid("--set", format!("{assignment:?} is not KEY=VALUE")))?;
        let (key, value) = (key.trim(), value.trim());
        let num = |k: &'static str| -> Result<f64, ConfigError> {
            value
                .parse::<f64>()
                .map_err(|_| invalid(k, format!("{value:?} is not a number")))
        };
        match key {
            "timing.loop_interval" if value.is_empty() => self.loop_interval = None,
            "timing.loop_interval" => self.loop_interval = Some(num("timing.loop_interval")?),
            "postgres.maximum_lag_on_failover" if value.is_empty() => {
                self.maximum_lag_on_failover = None
            }
            "postgres.maximum_lag_on_failover" => {
                self.maximum_lag_on_failover = Some(value.parse().map_err(|_| {
                    invalid(
                        "postgres.maximum_lag_on_failover",
                        format!("{value:?} is not a number of bytes"),
                    )
                })?)
            }
            "postgres.synchronous_mode" if value.is_empty() => self.synchronous_mode = None,
            "postgres.synchronous_mode" => {
                self.synchronous_mode = Some(match value {
                    "true" | "on" => true,
                    "false" | "off" => false,
                    _ => {
                        return Err(invalid(
                            "postgres.synchronous_mode",
                            format!("{value:?} is not true or false"),
                        ))
                    }
                })
            }
            k if k.starts_with("postgres.parameters.") => {
                let name = &k["postgres.parameters.".len()..];
                if value.is_empty() {
                    self.parameters.remove(name);
                } else {
                    // Numbers and booleans as such, anything else a string.
                    let v = if let Ok(i) = value.parse::<i64>() {
                        toml::Value::Integer(i)
                    } else if let Ok(f) = value.parse::<f64>() {
                        toml::Value::Float(f)
                    } else if let Ok(b) = value.parse::<bool>() {
                        toml::Value::Boolean(b)
                    } else {
                        toml::Value::String(value.trim_matches('\'').to_string())
                    };
                    self.parameters.insert(name.to_string(), v);
                }
            }
            other => {
                return Err(invalid(
                    "--set",
                    format!(
                        "{other:?} is not a cluster-wide setting (one of {}, or \
                         postgres.parameters.NAME; the rest stays in each node's TOML)",
                        KEYS.join(", ")
                    ),
                ))
            }
        }
        self.check()
    }

    /// The node's configuration with these settings applied (see the
    /// precedence above), validated as the TOML is, budget included.
    pub fn apply_to(&self, node: &Config) -> Result<Config, ConfigError> {
        self.check()?;
        let mut c = node.clone();
        if let Some(v) = self.loop_interval {
            c.timing.loop_interval = v;
        }
        if let Some(pg) = c.postgres.as_mut() {
            if let Some(v) = self.maximum_lag_on_failover {
                pg.maximum_lag_on_failover = v;
            }
            if let Some(v) = self.synchronous_mode {
                pg.synchronous_mode = v;
            }
        }
        c.validate()?;
        c.budget()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Config {
        Config::parse("node = \"a\"\n[watchdog]\nmode = \"off\"\n[postgres]\ndata_dir = \"/d\"\n")
            .unwrap()
    }

    #[test]
    fn set_round_trips_through_json_and_applies_over_the_node() {
        let mut c = ClusterConfig::default();
        for s in [
            "timing.loop_interval=0.5",
            "postgres.maximum_lag_on_failover=1048576",
            "postgres.synchronous_mode=true",
            "postgres.parameters.work_mem=8MB",
            "postgres.parameters.max_connections=200",
        ] {
            c.set(s).unwrap();
        }
        let back = ClusterConfig::from_json(c.to_json().as_bytes()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.parameters["work_mem"].as_str(), Some("8MB"));
        assert_eq!(back.parameters["max_connections"].as_integer(), Some(200));
        let applied = c.apply_to(&node()).unwrap();
        assert_eq!(applied.timing.loop_interval, 0.5);
        let pg = applied.postgres.unwrap();
        assert!(pg.synchronous_mode);
        assert_eq!(pg.maximum_lag_on_failover, 1048576);
        c.set("postgres.parameters.work_mem=").unwrap();
        assert!(!c.parameters.contains_key("work_mem"));
    }

    #[test]
    fn malformed_or_infeasible_settings_are_refused_naming_the_key() {
        let mut c = ClusterConfig::default();
        for (s, want) in [
            ("timing.ttl=10", "not a cluster-wide setting"),
            ("node=b", "not a cluster-wide setting"),
            ("timing.loop_interval=fast", "timing.loop_interval"),
            ("postgres.synchronous_mode=maybe", "not true or false"),
            ("postgres.parameters.port=5433", "set from postgres.port"),
            ("loop_interval", "not KEY=VALUE"),
        ] {
            let e = c.set(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        // Feasible alone, not with the node's budget: the loop must fit M - R.
        let mut slow = ClusterConfig::default();
        slow.set("timing.loop_interval=30").unwrap();
        let e = slow.apply_to(&node()).unwrap_err().to_string();
        assert!(e.contains("loop_interval"), "{e}");
        for bad in [
            &b"{\"loop_interval\": \"x\"}"[..],
            b"{\"ttl\": 3}",
            b"not json",
        ] {
            let e = ClusterConfig::from_json(bad).unwrap_err().to_string();
            assert!(e.starts_with("config: not a valid cluster config"), "{e}");
        }
    }
}
