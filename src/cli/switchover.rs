//! `leasedog switchover [--from A] --to B [--at TIME] [--force]` and
//! `leasedog failover --to B`. The CLI only validates and writes: the
//! switchover request goes to `{scope}/switchover` and the leader's core
//! decides (`decide::switchover`); the CLI then waits for the leader's
//! answer (`{scope}/switchover-status`) and for B to lead, with a timeout.
//! `failover --to B` is for a scope with no leader: the key is created for
//! B on B's lease (only if absent), so B alone holds it; B takes it under
//! the usual rules (arm, wait for the previous lease, promote) or, if it
//! may not lead, gives it back.

use crate::config::Config;
use crate::dcs::{Dcs, Holder, LeaseId};
use crate::decide::switchover::{Answer, Request};
use crate::decide::Member;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(super) fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f)
}

/// The leader key's holder by name (`self_node` for this node's own key).
pub(super) fn holder_name(h: &Holder, self_node: &str) -> Option<String> {
    match h {
        Holder::Nobody => None,
        Holder::Us { .. } => Some(self_node.to_string()),
        Holder::Node { name, .. } => Some(name.clone()),
        Holder::Unknown { bytes, .. } => Some(format!("(not a leasedog record, {bytes} bytes)")),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `--at`: seconds since the epoch (`1767225600`), relative (`+30s`,
/// `+5m`, `+1h`), or UTC `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_at(s: &str, now: u64) -> Result<u64, String> {
    let bad = || {
        format!(
            "--at {s:?} is not a time: give seconds since the epoch, +30s / +5m / +1h, \
             or YYYY-MM-DDTHH:MM:SSZ (UTC)"
        )
    };
    if let Some(rel) = s.strip_prefix('+') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: u64 = n.parse().map_err(|_| bad())?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        return n
            .checked_mul(mult)
            .and_then(|d| d.checked_add(now))
            .ok_or_else(bad);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
        let t = s.parse().map_err(|_| bad())?;
        return not_past(s, t, now);
    }
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<i64>().map_err(|_| bad());
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let t = u64::try_from(days * 86400 + h * 3600 + mi * 60 + se).map_err(|_| bad())?;
    not_past(s, t, now)
}

/// A scheduled time already gone is refused, not run at once.
fn not_past(s: &str, t: u64, now: u64) -> Result<u64, String> {
    if t < now {
        return Err(format!(
            "--at {s:?} is in the past ({} s ago): give a time to come, or leave --at out \
             to switch over now",
            now - t
        ));
    }
    Ok(t)
}

/// The CLI's checks before it writes a request: who leads, who is asked.
pub fn validate(
    leader: Option<&str>,
    members: &[Member],
    from: Option<&str>,
    to: &str,
) -> Result<(), String> {
    let names: Vec<&str> = members.iter().map(|m| m.node.as_str()).collect();
    let Some(leader) = leader else {
        return Err("no leader holds the key: a switchover needs one; \
                    for a leaderless scope use `leasedog failover --to NODE`"
            .into());
    };
    if let Some(from) = from.filter(|f| *f != leader) {
        return Err(format!("--from {from} is not the leader ({leader} is)"));
    }
    if to == leader {
        return Err(format!("{to} is already the leader"));
    }
    if !names.contains(&to) {
        return Err(format!(
            "unknown member {to:?}: the scope's members are {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    if members.iter().any(|m| m.node == to && m.tags.nofailover) {
        return Err(format!("{to} is tagged nofailover: it never leads"));
    }
    Ok(())
}

async fn connect(cfg: &Config) -> Result<Dcs, String> {
    Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
        .await
        .map_err(|e| e.to_string())
}

async fn members(d: &mut Dcs) -> Result<Vec<Member>, String> {
    Ok(d.members()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|(_, raw)| serde_json::from_slice(&raw).ok())
        .collect())
}

/// Waits until `to`'s member record says it leads and the key names it.
async fn wait_leading(d: &mut Dcs, cfg: &Config, to: &str, until: Instant) -> Result<(), String> {
    loop {
        let (holder, _) = d.leader().await.map_err(|e| e.to_string())?;
        let leads = holder_name(&holder, &cfg.node).as_deref() == Some(to);
        let ms = members(d).await?;
        let promoted = ms.iter().any(|m| m.node == to && m.role == "Leader");
        if leads && promoted {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!(
                "{to} does not lead yet (key holder: {})",
                holder_name(&holder, &cfg.node).unwrap_or_else(|| "none".into())
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct SwitchoverArgs {
    pub from: Option<String>,
    pub to: String,
    pub at: Option<String>,
    pub force: bool,
    pub wait: u64,
}

pub(super) fn switchover(cfg: &Config, a: SwitchoverArgs) -> i32 {
    let now = unix_now();
    let at = match a.at.as_deref().map(|s| parse_at(s, now)).transpose() {
        Ok(at) => at,
        Err(e) => {
            eprintln!("leasedog switchover: {e}");
            return 2;
        }
    };
    let r = block_on(async {
        let mut d = connect(cfg).await?;
        let (holder, _) = d.leader().await.map_err(|e| e.to_string())?;
        let leader = holder_name(&holder, &cfg.node);
        let ms = members(&mut d).await?;
        validate(leader.as_deref(), &ms, a.from.as_deref(), &a.to)
            .map_err(|e| format!("refused: {e}"))?;
        let req = Request {
            id: format!("{}-{}", now, std::process::id()),
            from: a.from.clone(),
            to: a.to.clone(),
            at,
            force: a.force,
            expires: Some(at.unwrap_or(now).max(now) + a.wait),
        };
        d.put_switchover_request(&req)
            .await
            .map_err(|e| e.to_string())?;
        println!(
            "switchover {} -> {} requested{}",
            leader.as_deref().unwrap_or("?"),
            a.to,
            at.map(|t| format!(" for {t} (in {} s)", t.saturating_sub(now)))
                .unwrap_or_default()
        );
        let until =
            Instant::now() + Duration::from_secs(a.wait + at.map_or(0, |t| t.saturating_sub(now)));
        let outcome = wait_answer(&mut d, &req.id, until).await;
        let result = match outcome {
            Ok(ans) if ans.outcome == "handed_over" => {
                println!("{}: {}", ans.by, ans.reason);
                wait_leading(&mut d, cfg, &a.to, until)
                    .await
                    .map(|()| format!("{} is the leader", a.to))
            }
            Ok(ans) => Err(format!("{} by {}: {}", ans.outcome, ans.by, ans.reason)),
            Err(e) => Err(e),
        };
        // Answered or not, the request is done: a late one must not fire.
        let _ = d.delete_switchover_request().await;
        result
    });
    match r {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("leasedog switchover: {e}");
            // Bad input (the CLI's own checks) is 2; the leader's refusal 1.
            if e.starts_with("refused: ") {
                2
            } else {
                1
            }
        }
    }
}

/// The leader's final answer to request `id` (`begun` is printed, not final).
async fn wait_answer(d: &mut Dcs, id: &str, until: Instant) -> Result<Answer, String> {
    let mut begun = false;
    loop {
        if let Some(ans) = d.switchover_answer().await.map_err(|e| e.to_string())? {
            if ans.id == id {
                match ans.outcome.as_str() {
                    "begun" if !begun => {
                        begun = true;
                        println!("{}: {}", ans.by, ans.reason);
                    }
                    "begun" => {}
                    _ => return Ok(ans),
                }
            }
        }
        if Instant::now() > until {
            return Err(if begun {
                "timed out waiting for the hand-over (the request is withdrawn; see `leasedog list`)".into()
            } else {
                "no answer from the leader in time (the request is withdrawn)".into()
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) fn failover(cfg: &Config, to: &str, wait: u64) -> i32 {
    let r =
        block_on(async {
            let mut d = connect(cfg).await?;
            let (holder, _) = d.leader().await.map_err(|e| e.to_string())?;
            if let Some(l) = holder_name(&holder, &cfg.node) {
                return Err(format!(
                    "refused: {l} holds the leader key; use `leasedog switchover --to {to}`"
                ));
            }
            let ms = members(&mut d).await?;
            let Some((raw, lease)) = d.member_with_lease(to).await.map_err(|e| e.to_string())?
            else {
                let names: Vec<&str> = ms.iter().map(|m| m.node.as_str()).collect();
                return Err(format!(
                "refused: unknown member {to:?} (or its agent is down): the scope's members are {}",
                if names.is_empty() { "none".into() } else { names.join(", ") }
            ));
            };
            let m: Member = serde_json::from_slice(&raw)
                .map_err(|e| format!("refused: {to}'s member record is unreadable: {e}"))?;
            if m.postgres != "replica" {
                return Err(format!(
                    "refused: {to} is not a running replica (postgres {}, role {})",
                    m.postgres, m.role
                ));
            }
            if m.tags.nofailover {
                return Err(format!(
                    "refused: {to} is tagged nofailover: it never leads"
                ));
            }
            match d
                .create_leader_for(to, LeaseId(lease))
                .await
                .map_err(|e| e.to_string())?
            {
                None => Err("refused: a leader took the key meanwhile".to_string()),
                Some(rev) => {
                    println!("leader key created for {to} at revision {rev}");
                    let until = Instant::now() + Duration::from_secs(wait);
                    wait_leading(&mut d, cfg, to, until)
                        .await
                        .map(|()| format!("{to} is the leader"))
                }
            }
        });
    match r {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("leasedog failover: {e}");
            if e.starts_with("refused: ") {
                2
            } else {
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(node: &str) -> Member {
        Member {
            node: node.into(),
            ..Member::default()
        }
    }

    #[test]
    fn bad_requests_are_refused_with_their_cause() {
        let ms = [m("a"), m("b")];
        assert!(validate(Some("a"), &ms, None, "b").is_ok());
        assert!(validate(Some("a"), &ms, Some("a"), "b").is_ok());
        let e = validate(None, &ms, None, "b").unwrap_err();
        assert!(
            e.contains("no leader") && e.contains("failover --to"),
            "{e}"
        );
        let e = validate(Some("a"), &ms, Some("b"), "b").unwrap_err();
        assert_eq!(e, "--from b is not the leader (a is)");
        let e = validate(Some("a"), &ms, None, "a").unwrap_err();
        assert_eq!(e, "a is already the leader");
        let e = validate(Some("a"), &ms, None, "zz").unwrap_err();
        assert_eq!(e, "unknown member \"zz\": the scope's members are a, b");
        let mut c = m("c");
        c.tags.nofailover = true;
        let e = validate(Some("a"), &[m("a"), c], None, "c").unwrap_err();
        assert_eq!(e, "c is tagged nofailover: it never leads");
    }

    #[test]
    fn times_parse_or_name_the_accepted_forms() {
        assert_eq!(parse_at("+30s", 100), Ok(130));
        assert_eq!(parse_at("+2m", 100), Ok(220));
        assert_eq!(parse_at("+1h", 0), Ok(3600));
        assert_eq!(parse_at("1767225600", 0), Ok(1_767_225_600));
        assert_eq!(parse_at("2026-01-01T00:00:00Z", 0), Ok(1_767_225_600));
        assert_eq!(parse_at("1970-01-01T00:00:10Z", 0), Ok(10));
        assert_eq!(parse_at("2024-02-29T12:30:00Z", 0), Ok(1_709_209_800));
        let now = 1_767_225_600;
        assert_eq!(
            parse_at("2026-01-01T00:00:00Z", now),
            Ok(now),
            "now is not past"
        );
        for past in ["2025-12-31T23:59:59Z", "1767225599"] {
            let e = parse_at(past, now).unwrap_err();
            assert!(e.contains("is in the past (1 s ago)"), "{past}: {e}");
        }
        for bad in [
            "",
            "soon",
            "+5x",
            "+s",
            "+99999999999999999h",
            "2026-13-01T00:00:00Z",
            "2026-01-01 00:00:00",
        ] {
            let e = parse_at(bad, 0).unwrap_err();
            assert!(e.contains("is not a time"), "{bad}: {e}");
        }
    }
}
