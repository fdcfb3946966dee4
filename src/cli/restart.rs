//! `leasedog restart NODE`: restart NODE's PostgreSQL without a failover
//! (the leader keeps its key: its core holds the step-down while the
//! restart runs, bounded by `decide::pause::OP_LIMIT`, then promotes the
//! server it restarted as a standby; a replica restarts as a standby). The
//! request goes through etcd (`<scope>/requests/NODE`); NODE's agent runs it
//! and writes the outcome (`<scope>/results/NODE`), which this waits for.
//! `reinit` (`cli::reinit`) is the same round trip.

use super::pause::{connect_blocking, scope_view};
use crate::config::Config;
use crate::dcs::{OpOutcome, OpRequest};
use crate::decide::Op;
use std::time::{Duration, Instant};

/// Why a request for `node` is refused before it is sent: an unknown
/// member (names the known ones), a reinit of the leader.
pub fn check_request(
    op: Op,
    node: &str,
    leader: Option<&str>,
    members: &[(String, String)],
) -> Result<(), String> {
    if !members.iter().any(|(n, _)| n == node) {
        let known: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!(
            "unknown member {node:?}: no agent of this scope publishes that name (members: {})",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ));
    }
    if op == Op::Reinit && leader == Some(node) {
        return Err(format!(
            "{node} is the leader: reinit wipes the data directory, so it is refused on the \
             leader (switch over first)"
        ));
    }
    Ok(())
}

fn request_id() -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{ns:x}-{}", std::process::id())
}

/// Sends `op` for `node` and waits up to `timeout` for its outcome.
pub(super) fn request(cfg: &Config, op: Op, node: &str, timeout: Duration) -> i32 {
    let id = request_id();
    let r = connect_blocking(cfg, async |d| {
        let (leader, members) = scope_view(d, &cfg.node).await?;
        check_request(op, node, leader.as_deref(), &members)?;
        d.put_request(
            node,
            &OpRequest {
                id: id.clone(),
                op: op.as_str().into(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        println!(
            "{} of {node} requested (id {id}); waiting up to {timeout:?}",
            op.as_str()
        );
        let t0 = Instant::now();
        loop {
            match d.get_result(node).await {
                Ok(Some(o)) if o.id == id => {
                    let _ = d.delete_request(node).await;
                    return Ok(Some(o));
                }
                Ok(_) => {}
                // Keep waiting through a passing etcd error.
                Err(e) => eprintln!("leasedog: reading the outcome: {e}"),
            }
            if t0.elapsed() >= timeout {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    match r {
        Ok(Some(OpOutcome {
            ok: true, detail, ..
        })) => {
            println!("{node}: {} done: {detail}", op.as_str());
            0
        }
        Ok(Some(OpOutcome { detail, .. })) => {
            eprintln!("leasedog {}: {node}: {detail}", op.as_str());
            1
        }
        Ok(None) => {
            eprintln!(
                "leasedog {}: no outcome from {node} within {timeout:?} (is its agent running?); \
                 the request stays in etcd and runs when the agent reads it",
                op.as_str()
            );
            1
        }
        Err(e) => {
            eprintln!("leasedog {}: {e}", op.as_str());
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
    fn requests_for_unknown_members_and_reinit_of_the_leader_are_refused_with_the_reason() {
        let members = m(&[("a", "primary"), ("b", "replica")]);
        let e = check_request(Op::Restart, "zz", Some("a"), &members).unwrap_err();
        assert!(
            e.contains("unknown member \"zz\"") && e.contains("a, b"),
            "{e}"
        );
        let e = check_request(Op::Reinit, "a", Some("a"), &members).unwrap_err();
        assert!(e.contains("a is the leader"), "{e}");
        assert!(check_request(Op::Restart, "a", Some("a"), &members).is_ok());
        assert!(check_request(Op::Reinit, "b", Some("a"), &members).is_ok());
    }
}
