//! `leasedog status`: the scope's leader and members from etcd, and this
//! node's own view from its `[metrics]` endpoint.

use crate::config::Config;
use std::time::Duration;

/// What `leasedog status --json` prints.
#[derive(Debug, serde::Serialize)]
pub struct StatusReport {
    pub scope: String,
    pub endpoints: Vec<String>,
    /// The leader key's holder (node name), if any.
    pub leader: Option<String>,
    pub members: Vec<serde_json::Value>,
    /// This node's `/status`, when its endpoint answered.
    pub local: Option<crate::metrics::Status>,
    /// Why there is no `local`.
    pub local_error: Option<String>,
    /// Why etcd could not be read (leader and members are then empty).
    pub etcd_error: Option<String>,
    /// The pause record while the scope is paused (`leasedog pause`).
    pub paused: Option<serde_json::Value>,
}

pub(super) fn status(cfg: &Config, json: bool) -> i32 {
    let mut r = StatusReport {
        scope: cfg.scope.clone(),
        endpoints: cfg.etcd.endpoints.clone(),
        leader: None,
        members: Vec::new(),
        local: None,
        local_error: None,
        etcd_error: None,
        paused: None,
    };
    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let mut d = crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
                    .await
                    .map_err(|e| e.to_string())?;
                let (holder, _) = d.leader().await.map_err(|e| e.to_string())?;
                let members = d.members().await.map_err(|e| e.to_string())?;
                // Any value pauses the scope (the agents read it so too).
                r.paused = d.get_pause().await.map_err(|e| e.to_string())?.map(|v| {
                    serde_json::from_slice(&v)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&v).into_owned().into())
                });
                Ok::<_, String>((holder, members))
            })
        });
    match fetched {
        Ok((holder, members)) => {
            r.leader = match holder {
                crate::dcs::Holder::Nobody => None,
                crate::dcs::Holder::Us { .. } => Some(cfg.node.clone()),
                crate::dcs::Holder::Node { name, .. } => Some(name),
                crate::dcs::Holder::Unknown { bytes, .. } => {
                    Some(format!("(not a leasedog record, {bytes} bytes)"))
                }
            };
            r.members = members
                .into_iter()
                .map(|(node, v)| {
                    serde_json::from_slice(&v).unwrap_or_else(|_| {
                        serde_json::json!({ "node": node, "unreadable": String::from_utf8_lossy(&v) })
                    })
                })
                .collect();
        }
        Err(e) => r.etcd_error = Some(e),
    }
    match &cfg.metrics.listen {
        None => r.local_error = Some("no [metrics] listen configured".into()),
        Some(addr) => {
            match crate::metrics::get(addr, "/status", Duration::from_secs(2)).and_then(|b| {
                serde_json::from_str(&b).map_err(|e| format!("unreadable /status: {e}"))
            }) {
                Ok(s) => r.local = Some(s),
                Err(e) => r.local_error = Some(format!("agent not answering: {e}")),
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serializes")
        );
    } else {
        print!("{}", status_table(&r));
    }
    if r.etcd_error.is_some() {
        1
    } else {
        0
    }
}

/// The human form of `leasedog status`.
pub fn status_table(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "scope    {}  (etcd {})", r.scope, r.endpoints.join(","));
    match &r.etcd_error {
        Some(e) => {
            let _ = writeln!(o, "etcd     UNREACHABLE: {e}");
        }
        None => {
            let _ = writeln!(o, "leader   {}", r.leader.as_deref().unwrap_or("(none)"));
            if let Some(p) = &r.paused {
                let _ = writeln!(
                    o,
                    "PAUSED   no failover or promotion until `leasedog resume` ({p})"
                );
            }
            let _ = writeln!(
                o,
                "\n{:<16} {:<13} {:<10} {:<22} {:>14} WATCHDOG",
                "MEMBER", "ROLE", "POSTGRES", "ADDRESS", "LSN"
            );
            for m in &r.members {
                let f = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                let addr = match (m.get("host").and_then(|v| v.as_str()), m.get("port")) {
                    (Some(h), Some(p)) if !p.is_null() => format!("{h}:{p}"),
                    _ => "-".into(),
                };
                let lsn = m
                    .get("lsn")
                    .and_then(|v| v.as_u64())
                    .map_or("-".into(), |l| {
                        format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
                    });
                let _ = writeln!(
                    o,
                    "{:<16} {:<13} {:<10} {:<22} {:>14} {}",
                    f("node"),
                    f("role"),
                    f("postgres"),
                    addr,
                    lsn,
                    f("watchdog")
                );
            }
            if r.members.is_empty() {
                let _ = writeln!(o, "(no member records)");
            }
        }
    }
    let _ = writeln!(o);
    match (&r.local, &r.local_error) {
        (Some(s), _) => {
            let _ = writeln!(o, "this node {} (leasedog {})", s.node, s.version);
            let _ = writeln!(
                o,
                "  role               {}{}",
                s.role,
                if s.leader { " (holds the key)" } else { "" }
            );
            let _ = writeln!(
                o,
                "  leader seen        {}",
                s.holder.as_deref().unwrap_or("(none)")
            );
            if s.armed_devices.is_empty() {
                let _ = writeln!(o, "  armed devices      none (W would be {} s)", s.w_s);
            } else {
                for d in &s.armed_devices {
                    let _ = writeln!(
                        o,
                        "  armed              {} W {} s{}",
                        d.path,
                        d.w_s,
                        if d.nowayout { " nowayout" } else { "" }
                    );
                }
            }
            let _ = writeln!(
                o,
                "  last fresh renewal {}",
                s.since_fresh_renewal_s
                    .map_or("never".into(), |a| format!("{a:.3} s ago"))
            );
            let _ = writeln!(o, "  evidence           {}", s.evidence);
            let _ = writeln!(
                o,
                "  pings              {} ({} refused)",
                s.pings, s.refused
            );
            let _ = writeln!(o, "  step-downs         {}", s.step_downs);
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "this node: {e}");
        }
        (None, None) => {}
    }
    o
}
