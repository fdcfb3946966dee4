//! `leasedog reinit NODE`: a replica wipes its data directory and clones it
//! again from the leader (`pg_basebackup`), then streams. Refused on the
//! leader, here and again by the node's core (`decide::pause`). The round
//! trip through etcd is `cli::restart`'s.

use crate::config::Config;
use crate::decide::Op;
use std::time::Duration;

pub(super) fn reinit(cfg: &Config, node: &str, timeout: Duration) -> i32 {
    super::restart::request(cfg, Op::Reinit, node, timeout)
}
