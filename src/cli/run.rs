//! `leasedog run`: loads the configuration and hands it to
//! [`crate::agent::run`], which does the privileged start-up in the order
//! ARCHITECTURE.md lists ("Start-up of `leasedog run`").

use crate::config::Config;
use std::path::Path;

pub(super) fn run(config: &Path) -> i32 {
    match Config::load(config) {
        Ok(cfg) => {
            super::warn_if_world_readable(config);
            match crate::agent::run(cfg, super::config_digest(config)) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("leasedog: config: {e}");
            2
        }
    }
}
