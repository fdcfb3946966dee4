//! `leasedog pause` / `resume`: the scope's maintenance mode, one key in
//! etcd (`<scope>/pause`, see `dcs::maintenance`). Agents read it once per
//! loop; the core decides what it means (`decide::pause`). Each agent
//! records the change in its audit log when it sees it.

use crate::config::Config;
use crate::dcs::{Dcs, Holder, PauseRecord};

/// Why a resume is unsafe now, from the leader key's holder and the member
/// records (`(node, postgres)` as each agent last published it): a
/// writable PostgreSQL on a node that does not hold the key would race the
/// next promotion. Empty: safe to resume.
pub fn resume_blockers(leader: Option<&str>, members: &[(String, String)]) -> Vec<String> {
    members
        .iter()
        .filter(|(node, pg)| pg == "primary" && Some(node.as_str()) != leader)
        .map(|(node, _)| {
            format!(
                "{node}'s PostgreSQL is writable but {node} does not hold the leader key \
                 (leader: {}): stop it or start it as a standby first",
                leader.unwrap_or("none")
            )
        })
        .collect()
}

/// What an operator should know before the resume takes effect.
pub fn resume_notes(leader: Option<&str>, members: &[(String, String)]) -> Vec<String> {
    let mut notes = Vec::new();
    match leader {
        None => notes
            .push("no node holds the leader key: the eligible replicas race for it at once".into()),
        Some(l) => {
            if let Some((_, pg)) = members.iter().find(|(n, _)| n == l) {
                if pg == "down" {
                    notes.push(format!(
                        "the leader {l}'s PostgreSQL is down: {l} steps down at the resume and \
                         a replica is promoted"
                    ));
                }
            }
        }
    }
    notes
}

pub(crate) fn connect_blocking<T>(
    cfg: &Config,
    f: impl AsyncFnOnce(&mut Dcs) -> Result<T, String>,
) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut d = Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
            .await
            .map_err(|e| e.to_string())?;
        f(&mut d).await
    })
}

/// The leader key's holder by name, and every member's `(node, postgres)`.
pub(crate) async fn scope_view(
    d: &mut Dcs,
    me: &str,
) -> Result<(Option<String>, Vec<(String, String)>), String> {
    let (holder, _) = d.leader().await.map_err(|e| e.to_string())?;
    let leader = match holder {
        Holder::Nobody => None,
        Holder::Us { .. } => Some(me.to_string()),
        Holder::Node { name, .. } => Some(name),
        Holder::Unknown { bytes, .. } => Some(format!("(not a leasedog record, {bytes} bytes)")),
    };
    let members = d
        .members()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(node, v)| {
            let pg = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|m| m.get("postgres")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".into());
            (node, pg)
        })
        .collect();
    Ok((leader, members))
}

pub(super) fn pause(cfg: &Config) -> i32 {
    let by = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "?".into()),
        cfg.node
    );
    let at_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match connect_blocking(cfg, async |d| {
        if d.get_pause().await.map_err(|e| e.to_string())?.is_some() {
            return Ok(false);
        }
        d.set_pause(&PauseRecord { by, at_unix })
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }) {
        Ok(true) => {
            println!(
                "scope {} paused: no failover or promotion until `leasedog resume`; \
                 agents see it within two loops",
                cfg.scope
            );
            0
        }
        Ok(false) => {
            println!("scope {} is already paused", cfg.scope);
            0
        }
        Err(e) => {
            eprintln!("leasedog pause: {e}");
            1
        }
    }
}

pub(super) fn resume(cfg: &Config, force: bool) -> i32 {
    let r = connect_blocking(cfg, async |d| {
        let (leader, members) = scope_view(d, &cfg.node).await?;
        let blockers = resume_blockers(leader.as_deref(), &members);
        if !blockers.is_empty() && !force {
            return Err(format!("refused: {} (or --force)", blockers.join("; ")));
        }
        let was = d.clear_pause().await.map_err(|e| e.to_string())?;
        Ok((was, resume_notes(leader.as_deref(), &members)))
    });
    match r {
        Ok((was, notes)) => {
            if was {
                println!("scope {} resumed: automatic failover is back", cfg.scope);
            } else {
                println!("scope {} was not paused", cfg.scope);
            }
            for n in notes {
                println!("note: {n}");
            }
            0
        }
        Err(e) => {
            eprintln!("leasedog resume: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn resume_is_refused_while_a_node_without_the_key_is_writable() {
        let members = m(&[("a", "primary"), ("b", "primary"), ("c", "replica")]);
        let b = resume_blockers(Some("a"), &members);
        assert_eq!(b.len(), 1);
        assert!(b[0].starts_with("b's PostgreSQL is writable"), "{}", b[0]);
        let b = resume_blockers(None, &members);
        assert_eq!(b.len(), 2, "nobody leads: every writable server blocks");
        assert!(resume_blockers(Some("a"), &m(&[("a", "primary"), ("b", "down")])).is_empty());
    }

    #[test]
    fn status_shows_a_paused_scope_and_by_whom() {
        let mut r = crate::cli::StatusReport {
            scope: "main".into(),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            leader: Some("a".into()),
            members: vec![],
            local: None,
            local_error: None,
            etcd_error: None,
            paused: None,
        };
        assert!(!crate::cli::status_table(&r).contains("PAUSED"));
        r.paused = Some(serde_json::json!({"by": "root@a", "at_unix": 1}));
        let table = crate::cli::status_table(&r);
        let line = table
            .lines()
            .find(|l| l.starts_with("PAUSED"))
            .expect(&table);
        assert!(line.contains("root@a"), "{line}");
    }

    #[test]
    fn resume_notes_say_who_races_or_steps_down() {
        let n = resume_notes(Some("a"), &m(&[("a", "down"), ("b", "replica")]));
        assert!(n[0].contains("a steps down"), "{n:?}");
        let n = resume_notes(None, &m(&[("b", "replica")]));
        assert!(n[0].contains("race"), "{n:?}");
        assert!(resume_notes(Some("a"), &m(&[("a", "primary")])).is_empty());
    }
}
