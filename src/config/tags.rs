//! `[tags]`: per-node limits on what the node may do in its scope.

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    /// Never race for the leader key (and never create the scope's cluster):
    /// the node only ever replicates. Default false.
    #[serde(default)]
    pub nofailover: bool,
    /// Never chosen as a synchronous standby (so, in synchronous mode,
    /// never eligible for the key through the `sync` set). Default false.
    #[serde(default)]
    pub nosync: bool,
    /// A new member (bootstrap clone, `reinit`) clones from a healthy
    /// member with this tag rather than from the leader. Default false.
    #[serde(default)]
    pub clonefrom: bool,
}

impl Tags {
    /// As published in the member record.
    pub fn published(&self) -> crate::decide::member::Tags {
        crate::decide::member::Tags {
            nofailover: self.nofailover,
            nosync: self.nosync,
            clonefrom: self.clonefrom,
        }
    }
}
