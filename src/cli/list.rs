//! `leasedog list [--json]` (like `patronictl list`): the scope's members
//! from etcd alone (their member records), with the leader key's holder,
//! each replica's lag behind the leader in bytes, each node's watchdog, and
//! the pending switchover.

use crate::config::Config;
use crate::decide::switchover::{Answer, Request};
use crate::decide::Member;
use serde::Serialize;

/// One member, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub node: String,
    /// `Leader` for the key's holder, else the record's core role.
    pub role: String,
    /// PostgreSQL as observed: `primary`, `replica`, `down`, `busy`, ...
    pub state: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub timeline: Option<u32>,
    /// Primary: current LSN; replica: furthest received or replayed.
    pub lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    /// Bytes behind the leader's published LSN (replicas only).
    pub lag_bytes: Option<u64>,
    /// Watchdog mode, whether armed now, and the smallest `W` armed.
    pub watchdog: String,
    pub armed: bool,
    pub w_secs: Option<u32>,
    /// Pending operations naming this node (`switchover from` / `to`, a
    /// `restart` or `reinit` request not yet answered), `; `-separated.
    pub pending: Option<String>,
    /// The node's `[tags]` that are set (`nofailover`, `nosync`, `clonefrom`).
    pub tags: Vec<String>,
}

/// A maintenance request (`leasedog restart` / `reinit`) not yet answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingOp {
    pub node: String,
    pub op: String,
    pub id: String,
}

/// What `list --json` prints.
#[derive(Debug, Serialize)]
pub struct ListReport {
    pub scope: String,
    pub leader: Option<String>,
    /// Maintenance mode (`leasedog pause`): no automatic failover.
    pub paused: bool,
    pub members: Vec<Row>,
    /// Records that did not parse, by node.
    pub unreadable: Vec<String>,
    pub switchover: Option<Request>,
    pub last_answer: Option<Answer>,
}

/// The rows, in the records' order (pure: what `list` shows is tested here).
pub fn rows(
    leader: Option<&str>,
    members: &[Member],
    pending: Option<&Request>,
    ops: &[PendingOp],
) -> Vec<Row> {
    let leader_lsn = members
        .iter()
        .find(|m| Some(m.node.as_str()) == leader)
        .and_then(|m| m.lsn);
    members
        .iter()
        .map(|m| {
            let is_leader = Some(m.node.as_str()) == leader;
            let theirs = m.receive_lsn.max(m.replay_lsn).or(m.lsn);
            let lag_bytes = match (is_leader, leader_lsn, theirs) {
                (false, Some(l), Some(t)) => Some(l.saturating_sub(t)),
                _ => None,
            };
            let switchover = pending.and_then(|r| {
                let at = r.at.map(|a| format!(" at {a}")).unwrap_or_default();
                if r.to == m.node {
                    Some(format!("switchover to{at}"))
                } else if is_leader {
                    Some(format!("switchover from{at}"))
                } else {
                    None
                }
            });
            let pending: Vec<String> = switchover
                .into_iter()
                .chain(
                    ops.iter()
                        .filter(|o| o.node == m.node)
                        .map(|o| format!("{} requested", o.op)),
                )
                .collect();
            let tags = [
                ("nofailover", m.tags.nofailover),
                ("nosync", m.tags.nosync),
                ("clonefrom", m.tags.clonefrom),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
            .collect();
            Row {
                node: m.node.clone(),
                role: if is_leader {
                    "Leader".into()
                } else {
                    m.role.clone()
                },
                state: m.postgres.clone(),
                host: m.host.clone(),
                port: m.port,
                timeline: m.timeline,
                lsn: m.lsn,
                receive_lsn: m.receive_lsn,
                replay_lsn: m.replay_lsn,
                lag_bytes,
                watchdog: m.watchdog.clone(),
                armed: m.armed,
                w_secs: m.w_secs,
                pending: (!pending.is_empty()).then(|| pending.join("; ")),
                tags,
            }
        })
        .collect()
}

fn lsn(v: Option<u64>) -> String {
    v.map_or("-".into(), |l| crate::postgres::Lsn(l).to_string())
}

/// The human table.
pub fn table(r: &ListReport) -> String {
    let mut out = format!(
        "scope {} (leader: {}){}\n",
        r.scope,
        r.leader.as_deref().unwrap_or("none"),
        if r.paused {
            " PAUSED: no automatic failover"
        } else {
            ""
        }
    );
    out.push_str(&format!(
        "{:<12} {:<12} {:<8} {:<21} {:>3} {:>12} {:>12} {:>12} {:>10} {:<18} {:<20} {}\n",
        "member",
        "role",
        "state",
        "host",
        "TL",
        "lsn",
        "receive",
        "replay",
        "lag bytes",
        "watchdog",
        "tags",
        "pending"
    ));
    for m in &r.members {
        let host = match (&m.host, m.port) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            _ => "-".into(),
        };
        let wd = match (m.armed, m.w_secs) {
            (true, Some(w)) => format!("{} armed W={w}s", m.watchdog),
            (true, None) => format!("{} armed", m.watchdog),
            (false, _) => format!("{} unarmed", m.watchdog),
        };
        out.push_str(&format!(
            "{:<12} {:<12} {:<8} {:<21} {:>3} {:>12} {:>12} {:>12} {:>10} {:<18} {:<20} {}\n",
            m.node,
            m.role,
            m.state,
            host,
            m.timeline.map_or("-".into(), |t| t.to_string()),
            lsn(m.lsn),
            lsn(m.receive_lsn),
            lsn(m.replay_lsn),
            m.lag_bytes.map_or("-".into(), |l| l.to_string()),
            wd,
            if m.tags.is_empty() {
                "-".to_string()
            } else {
                m.tags.join(",")
            },
            m.pending.as_deref().unwrap_or("")
        ));
    }
    for u in &r.unreadable {
        out.push_str(&format!("{u}: unreadable member record\n"));
    }
    if let Some(a) = &r.last_answer {
        out.push_str(&format!(
            "last switchover answer: {} by {}: {}\n",
            a.outcome, a.by, a.reason
        ));
    }
    out
}

/// Reads the scope from etcd.
pub async fn fetch(cfg: &Config) -> Result<ListReport, String> {
    let mut d = crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
        .await
        .map_err(|e| e.to_string())?;
    let (holder, _) = d.leader().await.map_err(|e| e.to_string())?;
    let leader = super::switchover::holder_name(&holder, &cfg.node);
    let mut members = Vec::new();
    let mut unreadable = Vec::new();
    for (node, raw) in d.members().await.map_err(|e| e.to_string())? {
        match serde_json::from_slice::<Member>(&raw) {
            Ok(m) => members.push(m),
            Err(_) => unreadable.push(node),
        }
    }
    let switchover = d.switchover_request().await.map_err(|e| e.to_string())?;
    let last_answer = d.switchover_answer().await.map_err(|e| e.to_string())?;
    let paused = d.get_pause().await.map_err(|e| e.to_string())?.is_some();
    let mut ops = Vec::new();
    for m in &members {
        // A request is pending until a result with its id is written.
        if let Some(req) = d.get_request(&m.node).await.map_err(|e| e.to_string())? {
            let done = d
                .get_result(&m.node)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|r| r.id == req.id);
            if !done {
                ops.push(PendingOp {
                    node: m.node.clone(),
                    op: req.op,
                    id: req.id,
                });
            }
        }
    }
    Ok(ListReport {
        scope: cfg.scope.clone(),
        members: rows(leader.as_deref(), &members, switchover.as_ref(), &ops),
        leader,
        paused,
        unreadable,
        switchover,
        last_answer,
    })
}

pub(super) fn list(cfg: &Config, json: bool) -> i32 {
    let r = match super::switchover::block_on(fetch(cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("leasedog list: {e}");
            return 1;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("the report serializes")
        );
    } else {
        print!("{}", table(&r));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(node: &str, role: &str, pg: &str, lsn: u64) -> Member {
        Member {
            node: node.into(),
            role: role.into(),
            postgres: pg.into(),
            lsn: Some(lsn),
            watchdog: "required".into(),
            ..Member::default()
        }
    }

    #[test]
    fn replicas_show_their_lag_behind_the_leader_and_pending_switchovers() {
        let mut b = m("b", "Follower", "replica", 900);
        b.receive_lsn = Some(950);
        b.replay_lsn = Some(940);
        let mut a = m("a", "Leader", "primary", 1000);
        a.armed = true;
        a.w_secs = Some(5);
        let req = Request {
            id: "x".into(),
            from: None,
            to: "b".into(),
            at: None,
            force: false,
            expires: None,
        };
        let mut c = m("c", "Follower", "down", 0);
        c.tags.nosync = true;
        c.tags.clonefrom = true;
        let ops = [PendingOp {
            node: "b".into(),
            op: "restart".into(),
            id: "r1".into(),
        }];
        let r = rows(Some("a"), &[a, b, c], Some(&req), &ops);
        assert_eq!(r[0].role, "Leader");
        assert_eq!(r[0].lag_bytes, None, "the leader has no lag");
        assert_eq!(r[0].pending.as_deref(), Some("switchover from"));
        assert!(r[0].armed && r[0].w_secs == Some(5));
        assert_eq!(r[1].lag_bytes, Some(50), "lag from the furthest received");
        assert_eq!(
            r[1].pending.as_deref(),
            Some("switchover to; restart requested")
        );
        assert_eq!(r[2].lag_bytes, Some(1000));
        assert_eq!(r[2].pending, None);
        assert!(r[0].tags.is_empty());
        assert_eq!(r[2].tags, vec!["nosync", "clonefrom"]);
        let json = serde_json::to_value(&r[2]).unwrap();
        assert_eq!(json["tags"], serde_json::json!(["nosync", "clonefrom"]));
    }

    #[test]
    fn the_table_shows_the_watchdog_and_the_last_answer() {
        let mut a = m("a", "Leader", "primary", 0x3000028);
        a.armed = true;
        a.w_secs = Some(5);
        a.timeline = Some(2);
        let r = ListReport {
            scope: "s".into(),
            leader: Some("a".into()),
            paused: true,
            members: rows(
                Some("a"),
                &[a, m("b", "Follower", "replica", 0x3000000)],
                None,
                &[],
            ),
            unreadable: vec!["c".into()],
            switchover: None,
            last_answer: Some(Answer {
                id: "1".into(),
                outcome: "refused".into(),
                reason: "b lags".into(),
                by: "a".into(),
            }),
        };
        let t = table(&r);
        assert!(
            t.starts_with("scope s (leader: a) PAUSED: no automatic failover\n"),
            "{t}"
        );
        assert!(t.contains("required armed W=5s"), "{t}");
        assert!(t.contains("0/3000028"), "{t}");
        assert!(t.contains("required unarmed"), "{t}");
        assert!(t.contains("c: unreadable member record"), "{t}");
        assert!(
            t.contains("last switchover answer: refused by a: b lags"),
            "{t}"
        );
    }

    #[test]
    fn without_a_leader_nobody_has_a_lag() {
        let r = rows(None, &[m("b", "Follower", "replica", 5)], None, &[]);
        assert_eq!(r[0].lag_bytes, None);
        assert_eq!(r[0].role, "Follower");
    }
}
