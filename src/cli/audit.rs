//! `leasedog audit verify|timeline`: reads the logs (and etcd's history),
//! asks `audit` for the pure verdicts, and prints them.

use super::AuditCommand;
use crate::audit::timeline::{cross_check, short, timeline, Change, Verdict};
use crate::audit::Record;
use crate::config::Config;
use std::io::Write;
use std::path::{Path, PathBuf};

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

pub(super) fn audit(command: AuditCommand) -> i32 {
    let mut out = std::io::stdout();
    match command {
        AuditCommand::Verify { path, config } => {
            let path = match path {
                Some(p) => p,
                None => match Config::load(&config) {
                    Ok(cfg) => crate::audit::log_path(&cfg.audit.dir, &cfg.node),
                    Err(e) => {
                        eprintln!("leasedog: no log given and config: {e}");
                        return 2;
                    }
                },
            };
            cmd_verify(&path, &mut out)
        }
        AuditCommand::Timeline {
            logs,
            config,
            no_etcd,
            json,
        } => {
            let history = if no_etcd {
                None
            } else {
                match Config::load(&config) {
                    Ok(cfg) => match fetch_history(&cfg) {
                        Ok(h) => Some(h),
                        Err(e) => {
                            eprintln!("leasedog: etcd history unavailable: {e}");
                            None
                        }
                    },
                    Err(e) => {
                        eprintln!("leasedog: config: {e} (use --no-etcd to read local logs only)");
                        return 2;
                    }
                }
            };
            cmd_timeline(&logs, history, json, &mut out)
        }
    }
}

/// The lifecycle records leaders mirrored into etcd under the scope.
fn fetch_history(cfg: &Config) -> Result<Vec<crate::audit::Record>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut d = crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
            .await
            .map_err(|e| e.to_string())?;
        let values = d.history().await.map_err(|e| e.to_string())?;
        let (records, errors) = crate::audit::parse_history(values.iter().map(|v| v.as_slice()));
        for e in errors {
            eprintln!("leasedog: etcd history: {e}");
        }
        Ok(records)
    })
}

/// The changes as text, one block per change.
pub fn render_text(changes: &[Change]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if changes.is_empty() {
        o.push_str("no change of leader found (fewer than two `acquired` records)\n");
    }
    for c in changes {
        let old = &c.old;
        let _ = writeln!(
            o,
            "change at rev {}: {} -> {}    {}",
            c.acquired_rev,
            old.node,
            c.new.node,
            match &c.verdict {
                Verdict::Unproven { .. } => "UNPROVEN".to_owned(),
                Verdict::Violation { .. } => "VIOLATION".to_owned(),
                v => v.to_string(),
            }
        );
        let _ = writeln!(
            o,
            "  old leader {} (won rev {}, boot {}{})",
            old.node,
            old.acquired_rev,
            short(&old.boot_id),
            if old.local_log {
                ""
            } else {
                ", etcd history only"
            }
        );
        match &old.budget {
            Some(b) => {
                let _ = writeln!(
                    o,
                    "    budget: T = {} s, M = {} s, R = {} s, T - M = {} s, M - R = {} s",
                    b.ttl_s,
                    b.margin_s,
                    b.reset_allowance_s,
                    b.ttl_s as f64 - b.margin_s,
                    b.margin_s - b.reset_allowance_s
                );
            }
            None => o.push_str("    budget: unknown (no start-up record)\n"),
        }
        if old.armed.is_empty() {
            o.push_str("    armed: nothing\n");
        }
        for a in &old.armed {
            let _ = writeln!(
                o,
                "    armed: {} ({}) W = {} s{}, nowayout {}",
                a.device,
                a.identity,
                a.w_s,
                match a.w_ok {
                    Some(true) => " <= T - M",
                    Some(false) => " > T - M (!)",
                    None => "",
                },
                a.nowayout
            );
        }
        let _ = writeln!(
            o,
            "    promoted: {}; pings refused: {}{}; largest k - s pinged: {}",
            if old.promoted { "yes" } else { "no" },
            old.pings_refused,
            old.max_refused_k_minus_s
                .map(|x| format!(" (largest k - s {x:.3} s)"))
                .unwrap_or_default(),
            old.max_pinged_k_minus_s
                .map(|x| format!("{x:.3} s"))
                .unwrap_or_else(|| "not recorded".into())
        );
        if let Some(s) = old.last_s_ns {
            let _ = writeln!(
                o,
                "    last s {:.3} s; last permitted ping by {}; reset due by {} (its boot clock)",
                secs(s),
                old.last_permitted_ping_ns
                    .map(|x| format!("{:.3} s", secs(x)))
                    .unwrap_or_else(|| "?".into()),
                old.reset_deadline_ns
                    .map(|x| format!("{:.3} s", secs(x)))
                    .unwrap_or_else(|| "?".into()),
            );
        }
        match &old.step_down {
            Some(sd) => {
                let _ = writeln!(
                    o,
                    "    step-down confirmed ({}) at {:.3} s{}",
                    sd.how,
                    secs(sd.boot_ns),
                    match (sd.released_rev, sd.release_deleted) {
                        (Some(r), _) => format!(", key released at rev {r}"),
                        (None, Some(true)) => ", then released (deleted) the key".to_owned(),
                        (None, Some(false)) =>
                            ", then released: the key was already gone".to_owned(),
                        (None, None) => String::new(),
                    }
                );
            }
            None => o.push_str("    step-down: none recorded\n"),
        }
        match &old.next_startup {
            Some(ns) => {
                let _ = writeln!(
                    o,
                    "    next start-up: boot {} ({}), watchdog reset: {}",
                    short(&ns.boot_id),
                    if ns.new_boot { "new boot" } else { "same boot" },
                    match ns.watchdog_reset {
                        Some(true) => "reported",
                        Some(false) => "not reported",
                        None => "unknown (no boot status)",
                    }
                );
            }
            None => o.push_str("    next start-up: none recorded\n"),
        }
        let _ = writeln!(
            o,
            "  key deleted at rev {}; {} won it at rev {}",
            c.key_deleted_rev
                .map(|r| r.to_string())
                .unwrap_or_else(|| "? (expired unobserved)".into()),
            c.new.node,
            c.new.acquired_rev
        );
        let _ = writeln!(
            o,
            "  new leader {}: armed [{}], {}",
            c.new.node,
            c.new.armed.join(", "),
            match (c.new.promoted, c.new.armed_before_promote) {
                (true, Some(true)) => "promoted after arming",
                (true, _) => "promoted WITHOUT arming first",
                (false, _) => "no promotion recorded",
            }
        );
        let _ = writeln!(o, "  verdict: {}", c.verdict);
        if !c.proof.is_empty() {
            let _ = writeln!(o, "  because: {}", c.proof);
        }
        for n in &c.notes {
            let _ = writeln!(o, "  note: {n}");
        }
        o.push('\n');
    }
    o
}

/// `leasedog audit verify FILE`: exit 0 if the chain is intact (a torn tail
/// alone is a note, not a break), 1 if broken, 2 if the file cannot be read.
pub fn cmd_verify(path: &Path, out: &mut dyn Write) -> i32 {
    match crate::audit::verify(path) {
        Err(e) => {
            let _ = writeln!(out, "{e}");
            2
        }
        Ok(r) => {
            let _ = writeln!(
                out,
                "{}: {} records, {}",
                path.display(),
                r.records,
                if r.intact {
                    "chain intact"
                } else {
                    "CHAIN BROKEN"
                }
            );
            if let Some((line, what)) = &r.first_break {
                let _ = writeln!(out, "first break at line {line}: {what}");
            }
            for n in &r.notes {
                let _ = writeln!(out, "note: {n}");
            }
            let _ = writeln!(
                out,
                "(a clean truncation of whole last records cannot be seen from the file alone)"
            );
            if r.intact {
                0
            } else {
                1
            }
        }
    }
}

/// `leasedog audit timeline [--json] FILE... [--history]`: reads and verifies
/// the local logs, builds the timeline, prints it. Exit 0 if every change is
/// fenced, 1 on a VIOLATION or a broken chain, 2 if a change is UNPROVEN or
/// a file cannot be read.
pub fn cmd_timeline(
    local: &[PathBuf],
    history: Option<Vec<Record>>,
    json: bool,
    out: &mut dyn Write,
) -> i32 {
    let mut logs = Vec::new();
    let mut checks = Vec::new();
    let mut code = 0;
    for p in local {
        match crate::audit::read_log(p) {
            Ok((recs, rep)) => {
                if !rep.intact {
                    code = 1;
                }
                logs.push(recs);
                checks.push((p.clone(), rep));
            }
            Err(e) => {
                let _ = writeln!(out, "{e}");
                return 2;
            }
        }
    }
    // A history record whose hash does not hold was edited: count it, and
    // keep it out of the verdicts.
    let (history, bad): (Vec<Record>, Vec<Record>) = history
        .unwrap_or_default()
        .into_iter()
        .partition(Record::hash_ok);
    let bad_history = bad.len();
    if bad_history > 0 {
        code = 1;
    }
    let disagreements = cross_check(&logs, &history);
    if !disagreements.is_empty() {
        code = 1;
    }
    let changes = timeline(&logs, &history);
    for c in &changes {
        match c.verdict {
            Verdict::Violation { .. } => code = 1,
            Verdict::Unproven { .. } if code == 0 => code = 2,
            _ => {}
        }
    }
    if json {
        let logs: Vec<_> = checks
            .iter()
            .map(|(p, r)| serde_json::json!({ "path": p, "verify": r }))
            .collect();
        let v = serde_json::json!({
            "logs": logs,
            "history_records": history.len(),
            "history_bad_hashes": bad_history,
            "history_disagreements": disagreements,
            "changes": changes,
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        );
    } else {
        for (p, r) in &checks {
            let _ = writeln!(
                out,
                "log {}: {} records, {}{}",
                p.display(),
                r.records,
                match &r.first_break {
                    None => "chain intact".to_owned(),
                    Some((l, w)) =>
                        format!("CHAIN BROKEN at line {l}: {w} (verdicts below rest on it)"),
                },
                if r.torn_tail { ", torn tail" } else { "" }
            );
        }
        if !history.is_empty() || bad_history > 0 {
            let _ = writeln!(
                out,
                "etcd history: {} records{}",
                history.len() + bad_history,
                if bad_history > 0 {
                    format!(", {bad_history} with a wrong hash (edited; left out)")
                } else {
                    String::new()
                }
            );
        }
        for d in &disagreements {
            let _ = writeln!(out, "LOG DISAGREES WITH ETCD: {d}");
        }
        let _ = writeln!(out);
        let _ = write!(out, "{}", render_text(&changes));
    }
    code
}
