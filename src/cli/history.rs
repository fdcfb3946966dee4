//! `leasedog history [--json] [--audit FILE...]`: the changes of leader,
//! from the lifecycle records the agents mirror to etcd (`dcs::history`,
//! the newest `HISTORY_KEEP`) and, with `--audit`, from local audit logs
//! (which hold everything, also what etcd trimmed). Records found in both
//! are shown once.

use crate::audit::{Event, Record};
use crate::config::Config;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// One step of a change of leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub wall_ns: u64,
    pub node: String,
    /// The audit event's name (`acquired`, `promoted`, `released`, ...).
    pub event: String,
    pub rev: Option<i64>,
    pub detail: String,
}

/// The records that make up changes of leader, each once (by node and
/// `seq`), oldest first by the writers' wall clocks (for humans only).
pub fn entries(records: &[Record]) -> Vec<Entry> {
    let mut seen = BTreeSet::new();
    let mut out: Vec<Entry> = records
        .iter()
        .filter(|r| seen.insert((r.node.clone(), r.seq)))
        .filter_map(|r| {
            let detail = match &r.event {
                Event::Acquired {
                    lease, postgres, ..
                } => format!(
                    "won the key on lease {lease:x} (PostgreSQL {})",
                    postgres.as_deref().unwrap_or("?")
                ),
                Event::Promoted => "promoted PostgreSQL".into(),
                Event::StepDownBegun { reason, .. } => format!("stepping down ({reason})"),
                Event::StepDownConfirmed { how } => format!("stopped: {how}"),
                Event::Released { deleted, .. } => match deleted {
                    Some(false) => "release found the key gone".into(),
                    _ => "released the key".into(),
                },
                Event::SwitchoverBegun { to } => format!("switchover to {to} begun"),
                Event::SwitchoverRefused { to, reason } => {
                    format!("switchover to {to} refused: {reason}")
                }
                Event::SwitchoverHandedOver { to, final_lsn } => format!(
                    "handed the key to {to} (it had the WAL to {})",
                    crate::postgres::Lsn(*final_lsn)
                ),
                Event::SwitchoverAborted { to, reason } => {
                    format!("switchover to {to} aborted: {reason}")
                }
                _ => return None,
            };
            Some(Entry {
                wall_ns: r.wall_ns,
                node: r.node.clone(),
                event: r.event.name().into(),
                rev: r.rev,
                detail,
            })
        })
        .collect();
    out.sort_by_key(|e| (e.wall_ns, e.node.clone()));
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from ns since the epoch.
pub fn utc(wall_ns: u64) -> String {
    let secs = (wall_ns / 1_000_000_000) as i64;
    let ms = (wall_ns / 1_000_000) % 1000;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(super) fn history(cfg: &Config, json: bool, audit: &[PathBuf]) -> i32 {
    let mut records: Vec<Record> = Vec::new();
    for path in audit {
        match crate::audit::read_log(path) {
            Ok((recs, _)) => records.extend(recs),
            Err(e) => {
                eprintln!("leasedog history: {e}");
                return 2;
            }
        }
    }
    let fetched = super::switchover::block_on(async {
        let mut d = crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
            .await
            .map_err(|e| e.to_string())?;
        d.history().await.map_err(|e| e.to_string())
    });
    match fetched {
        Ok(raw) => records.extend(
            raw.iter()
                .filter_map(|v| serde_json::from_slice::<Record>(v).ok()),
        ),
        Err(e) if !audit.is_empty() => eprintln!("leasedog history: etcd: {e} (audit logs only)"),
        Err(e) => {
            eprintln!("leasedog history: {e}");
            return 1;
        }
    }
    let es = entries(&records);
    if json {
        println!("{}", serde_json::to_string_pretty(&es).expect("serializes"));
    } else {
        for e in &es {
            println!(
                "{}  {:<12} {:<24} rev {:<8} {}",
                utc(e.wall_ns),
                e.node,
                e.event,
                e.rev.map_or("-".into(), |r| r.to_string()),
                e.detail
            );
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_the_wall_clock() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_709_209_800_123_000_000), "2024-02-29T12:30:00.123Z");
    }
}
