//! Physical replication slots on the primary (the core decides which:
//! `decide::slots`), and the slot a standby streams from.

use super::*;
use crate::decide::slots::SLOT_PREFIX;

impl Pg {
    /// The slot this node's standby uses (`primary_slot_name`), if any.
    pub fn with_slot_name(mut self, slot: Option<String>) -> Pg {
        self.slot_name = slot;
        self
    }

    pub fn slot_name(&self) -> Option<&str> {
        self.slot_name.as_deref()
    }

    /// Makes the physical slots named `leasedog_*` exactly `wanted`:
    /// creates the missing ones (WAL reserved at once), drops the others
    /// that are inactive (an active one is dropped at a later sync, once
    /// its standby is gone). Returns (created, dropped).
    pub async fn sync_physical_slots(
        &self,
        wanted: &[String],
    ) -> Result<(Vec<String>, Vec<String>), PgError> {
        let within = PgConfig::secs(self.cfg.query_timeout);
        let wanted = wanted.to_vec();
        let pattern = format!("{}%", SLOT_PREFIX.replace('_', "\\_"));
        self.with_client("replication slots", within, move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT slot_name::text, active FROM pg_replication_slots \
                         WHERE slot_type = 'physical' AND slot_name LIKE $1",
                        &[&pattern],
                    )
                    .await?;
                let have: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                let mut created = Vec::new();
                for w in &wanted {
                    if !have.iter().any(|(n, _)| n == w) {
                        c.execute("SELECT pg_create_physical_replication_slot($1, true)", &[w])
                            .await?;
                        created.push(w.clone());
                    }
                }
                let mut dropped = Vec::new();
                for (n, active) in &have {
                    if !active && !wanted.contains(n) {
                        c.execute("SELECT pg_drop_replication_slot($1)", &[n])
                            .await?;
                        dropped.push(n.clone());
                    }
                }
                Ok((created, dropped))
            })
        })
        .await
    }
}
