//! `[tags]`: per-node limits on what the node may do in its scope.

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    /// Never race for the leader key (and never create the scope's cluster):
    /// the node only ever replicates. Default false.
    #[serde(default)]
    pub nofailover: bool,
}
