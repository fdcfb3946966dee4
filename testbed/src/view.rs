//! A writer's view of a failover, the demo's main story: what the clients of
//! a [`History`] saw, on the host clock relative to the fault, beside the
//! instants the lab measured (reset, key expiry), then the checker's and
//! the audit's verdicts. Pure: data in, text out ([`render`]); the lab fills
//! [`Failover`] from a trial (`lab::pg::PgTrial::view`).

use crate::history::{History, Kind, Obs, Outcome, Verdict};
use std::fmt::Write as _;

/// One column of the probe's strip.
pub const STEP_NS: u64 = 250_000_000;
/// The strip starts this long before the fault.
pub const LEAD_NS: u64 = 2_000_000_000;
/// At most this many columns (25 s).
pub const MAX_COLS: usize = 100;
/// More runs than this per writer are elided in the middle.
const MAX_RUNS: usize = 12;

/// What the view reads. Instants are host CLOCK_BOOTTIME nanoseconds.
#[derive(Debug, Clone)]
pub struct Failover<'a> {
    pub history: &'a History,
    pub verdict: &'a Verdict,
    /// The primary before the fault, and the node expected after it.
    pub old: &'a str,
    pub new: &'a str,
    pub fault_ns: u64,
    /// What the fault was, for the events ("guest1: its agent stalled").
    pub fault: &'a str,
    /// The reset's name (as QMP reported it) and instant.
    pub reset: Option<(&'a str, u64)>,
    pub key_deleted_ns: Option<u64>,
    pub new_leader_ns: Option<u64>,
    /// `leasedog audit timeline` over both logs: its exit code and its
    /// verdict per change of leader (`a->b VERDICT`).
    pub audit: Option<(i32, Vec<String>)>,
    /// The verdict the change `old->new` must get (`None`: not judged).
    pub expected_fence: Option<&'a str>,
}

/// How one insert ended, as its writer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Acked(String),
    Failed,
    Unknown,
}

/// Consecutive inserts of one writer that ended alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub seen: Seen,
    pub count: usize,
    /// The first insert's start and the last one's end.
    pub from_ns: u64,
    pub to_ns: u64,
    pub first_id: i64,
    pub last_id: i64,
}

/// `client`'s inserts in the order it made them, as runs.
pub fn runs(obs: &[Obs], client: &str) -> Vec<Run> {
    let mut w: Vec<(&Obs, i64, Outcome)> = obs
        .iter()
        .filter(|o| o.client == client)
        .filter_map(|o| match o.kind {
            Kind::Write { id, outcome } => Some((o, id, outcome)),
            Kind::Probe { .. } => None,
        })
        .collect();
    w.sort_by_key(|(o, _, _)| o.invoke_ns);
    let mut out: Vec<Run> = Vec::new();
    for (o, id, outcome) in w {
        let seen = match outcome {
            Outcome::Ok => Seen::Acked(o.node.clone().unwrap_or_else(|| "?".into())),
            Outcome::Fail => Seen::Failed,
            Outcome::Unknown => Seen::Unknown,
        };
        match out.last_mut() {
            Some(r) if r.seen == seen => {
                r.count += 1;
                r.to_ns = r.to_ns.max(o.complete_ns);
                r.last_id = id;
            }
            _ => out.push(Run {
                seen,
                count: 1,
                from_ns: o.invoke_ns,
                to_ns: o.complete_ns,
                first_id: id,
                last_id: id,
            }),
        }
    }
    out
}

/// The longest stretch between completions of `client`'s acknowledged
/// inserts, from the last one completed before `fault_ns` on (what an
/// application waited; `clients::gap_completed`'s figure): its two ends.
pub fn writer_gap(obs: &[Obs], client: &str, fault_ns: u64) -> Option<(u64, u64)> {
    let mut acks: Vec<u64> = obs
        .iter()
        .filter(|o| o.client == client)
        .filter(|o| {
            matches!(
                o.kind,
                Kind::Write {
                    outcome: Outcome::Ok,
                    ..
                }
            )
        })
        .map(|o| o.complete_ns)
        .collect();
    acks.sort_unstable();
    let before = acks.iter().copied().filter(|d| *d < fault_ns).max()?;
    acks.retain(|d| *d >= before);
    acks.windows(2)
        .map(|w| (w[0], w[1]))
        .max_by_key(|(a, b)| b - a)
}

/// The probe's answers about `node`, one character per [`STEP_NS`] from
/// `from_ns`: `W` it said writable, `r` read-only, `-` no answer (over the
/// whole unanswered question, its connect included), `.` not asked. An
/// answer counts in the column where its question started; the strongest
/// wins a column (W, r, -, .).
pub fn strip(obs: &[Obs], node: &str, from_ns: u64, cols: usize) -> String {
    let mut rank = vec![0usize; cols];
    let col = |ns: u64| ns.checked_sub(from_ns).map(|d| (d / STEP_NS) as usize);
    for o in obs.iter().filter(|o| o.node.as_deref() == Some(node)) {
        let Kind::Probe { writable } = o.kind else {
            continue;
        };
        let (first, last, r) = match writable {
            Some(true) => (col(o.invoke_ns), col(o.invoke_ns), 3),
            Some(false) => (col(o.invoke_ns), col(o.invoke_ns), 2),
            None => (Some(col(o.invoke_ns).unwrap_or(0)), col(o.complete_ns), 1),
        };
        if let (Some(a), Some(b)) = (first, last) {
            for x in rank.iter_mut().take(b + 1).skip(a) {
                *x = (*x).max(r);
            }
        }
    }
    rank.iter().map(|r| ['.', '-', 'r', 'W'][*r]).collect()
}

/// Seconds after the fault, signed, to the millisecond.
fn rel(ns: u64, fault_ns: u64) -> String {
    format!("{:+.3}", (ns as i128 - fault_ns as i128) as f64 / 1e9)
}

fn is_ack(o: &Obs) -> bool {
    matches!(
        o.kind,
        Kind::Write {
            outcome: Outcome::Ok,
            ..
        }
    )
}

fn id_of(o: &Obs) -> i64 {
    match o.kind {
        Kind::Write { id, .. } => id,
        Kind::Probe { .. } => 0,
    }
}

fn describe_writer(client: &str) -> String {
    match client.strip_prefix("writer-kept-") {
        Some(node) => format!(
            "{client}: one kept connection to {node} (a new one after any insert that failed)"
        ),
        None if client == "writer-new" => format!(
            "{client}: a new connection per insert, to the first node that takes a read-write \
             session"
        ),
        None => client.to_string(),
    }
}

impl Failover<'_> {
    /// What broke the demo's promise: a double-writable instant, a lost
    /// acknowledged insert, or an audit verdict other than the expected one.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let v = self.verdict;
        if v.double_writable() > 0 {
            out.push(format!("{} double-writable instants", v.double_writable()));
        }
        if !v.lost_acked.is_empty() {
            out.push(format!(
                "{} acknowledged inserts lost: {:?}",
                v.lost_acked.len(),
                v.lost_acked
            ));
        }
        if let Some(want) = self.expected_fence {
            let change = format!("{}->{}", self.old, self.new);
            match &self.audit {
                None => out.push("no audit timeline".into()),
                Some((code, verdicts)) => {
                    if *code != 0 {
                        out.push(format!("the audit timeline exited {code}"));
                    }
                    let got: Vec<&String> = verdicts
                        .iter()
                        .filter(|x| x.split_whitespace().next() == Some(change.as_str()))
                        .collect();
                    if !got
                        .iter()
                        .any(|x| x.split_whitespace().last() == Some(want))
                    {
                        out.push(format!(
                            "the audit called the change {change} {}, expected {want}",
                            if got.is_empty() {
                                "nothing".to_string()
                            } else {
                                got.iter()
                                    .map(|x| x.split_whitespace().last().unwrap_or(""))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ));
                    }
                }
            }
        }
        out
    }

    /// The events, one per line, in time order: the fault, the old
    /// primary's last acknowledged insert, the reset, the key's expiry and
    /// new holder, the new primary first seen writable and its first
    /// acknowledged insert.
    fn events(&self) -> Vec<(u64, String)> {
        let obs = &self.history.obs;
        let f = self.fault_ns;
        let mut ev = vec![(f, self.fault.to_string())];
        let on = |o: &&Obs, n: &str| o.node.as_deref() == Some(n);
        if let Some(o) = obs
            .iter()
            .filter(|o| on(o, self.old) && is_ack(o))
            .max_by_key(|o| o.complete_ns)
        {
            let margin = self.key_deleted_ns.map_or(String::new(), |k| {
                let d = (k as f64 - o.complete_ns as f64) / 1e9;
                if d >= 0.0 {
                    format!(", {d:.3} s before its key expired")
                } else {
                    format!(", {:.3} s AFTER its key expired", -d)
                }
            });
            ev.push((
                o.complete_ns,
                format!(
                    "last insert acknowledged by {} (id {}, {}{margin})",
                    self.old,
                    id_of(o),
                    o.client
                ),
            ));
        }
        if let Some((name, at)) = self.reset {
            ev.push((at, format!("{} RESET by its watchdog ({name})", self.old)));
        }
        if let Some(at) = self.key_deleted_ns {
            ev.push((
                at,
                format!("etcd deleted the leader key: {}'s lease expired", self.old),
            ));
        }
        if let Some(at) = self.new_leader_ns {
            ev.push((at, format!("{} took the leader key", self.new)));
        }
        let after = |o: &&Obs| o.invoke_ns >= f && on(o, self.new);
        let says_writable = |o: &&Obs| {
            matches!(
                o.kind,
                Kind::Probe {
                    writable: Some(true)
                }
            )
        };
        if let Some(o) = obs
            .iter()
            .filter(after)
            .filter(says_writable)
            .min_by_key(|o| o.complete_ns)
        {
            ev.push((
                o.complete_ns,
                format!("{} first answered the probe as writable", self.new),
            ));
        }
        if let Some(o) = obs
            .iter()
            .filter(after)
            .filter(|o| is_ack(o))
            .min_by_key(|o| o.complete_ns)
        {
            ev.push((
                o.complete_ns,
                format!(
                    "first insert acknowledged by {} (id {}, {})",
                    self.new,
                    id_of(o),
                    o.client
                ),
            ));
        }
        ev.sort_by_key(|e| e.0);
        ev
    }
}

/// The writer's view; see the module documentation.
pub fn render(v: &Failover) -> String {
    let obs = &v.history.obs;
    let f = v.fault_ns;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "What happened and what the clients saw (host CLOCK_BOOTTIME, seconds after the fault):"
    );
    for (at, what) in v.events() {
        let _ = writeln!(s, "  {:>8}  {what}", rel(at, f));
    }

    // Each writer's inserts as runs of like outcomes.
    let mut writers: Vec<&str> = Vec::new();
    for o in obs {
        if matches!(o.kind, Kind::Write { .. }) && !writers.contains(&o.client.as_str()) {
            writers.push(&o.client);
        }
    }
    writers.sort_by_key(|c| (*c != "writer-new", *c));
    let _ = writeln!(
        s,
        "\nWriters (every 50-100 ms; runs of inserts that ended alike, first start .. last end):"
    );
    for w in writers {
        let _ = writeln!(s, "  {}", describe_writer(w));
        let rs = runs(obs, w);
        let shown: Vec<Option<&Run>> = if rs.len() > MAX_RUNS {
            let head = rs.iter().take(MAX_RUNS / 2).map(Some);
            let tail = rs.iter().skip(rs.len() - MAX_RUNS / 2 + 1).map(Some);
            head.chain(std::iter::once(None)).chain(tail).collect()
        } else {
            rs.iter().map(Some).collect()
        };
        for r in shown {
            let Some(r) = r else {
                let _ = writeln!(s, "    ... ({} runs in all)", rs.len());
                continue;
            };
            let what = match &r.seen {
                Seen::Acked(n) => format!("acknowledged by {n}"),
                Seen::Failed => "failed: no connection or refused, nothing committed".into(),
                Seen::Unknown => "unknown: sent, no answer, may have committed".into(),
            };
            let ids = if r.count == 1 {
                format!("id {}", r.first_id)
            } else {
                format!("ids {}..{}", r.first_id, r.last_id)
            };
            let _ = writeln!(
                s,
                "    {:>8} .. {:>8}  {:>4} {what} ({ids})",
                rel(r.from_ns, f),
                rel(r.to_ns, f),
                r.count
            );
        }
        // A writer that saw the change of primary waited this long; one
        // whose acknowledgements all came from one node did not wait for it.
        let acked_by = |n: &str| rs.iter().any(|r| r.seen == Seen::Acked(n.into()));
        let gap = (acked_by(v.old) && acked_by(v.new))
            .then(|| writer_gap(obs, w, f))
            .flatten();
        if let Some((a, b)) = gap {
            let node_at = |ns: u64| {
                obs.iter()
                    .find(|o| o.client == w && is_ack(o) && o.complete_ns == ns)
                    .and_then(|o| o.node.clone())
                    .unwrap_or_default()
            };
            let _ = writeln!(
                s,
                "    writer gap: {:.3} s without an acknowledged insert ({} {} -> {} {})",
                (b - a) as f64 / 1e9,
                rel(a, f),
                node_at(a),
                rel(b, f),
                node_at(b)
            );
        }
    }

    // The probe's strip, one row per node, the events under it.
    let from = f.saturating_sub(LEAD_NS);
    let end = obs.iter().map(|o| o.complete_ns).max().unwrap_or(f);
    let cols = (end.saturating_sub(from).div_ceil(STEP_NS) as usize).min(MAX_COLS);
    let mut nodes: Vec<&str> = Vec::new();
    for n in [v.old, v.new] {
        if !nodes.contains(&n) {
            nodes.push(n);
        }
    }
    let width = nodes.iter().map(|n| n.len()).max().unwrap_or(0).max(7) + 2;
    let _ = writeln!(
        s,
        "\nProbe (pg_is_in_recovery() on a kept connection to each node, every 50-100 ms), \
         one column per {} ms:\nW writable, r read-only, - no answer, . not asked",
        STEP_NS / 1_000_000
    );
    let _ = writeln!(s, "  {:<width$}{}", "seconds", ruler(from, f, cols));
    for n in &nodes {
        let _ = writeln!(s, "  {:<width$}{}", n, strip(obs, n, from, cols));
    }
    let mut marks = vec![(f, '^')];
    marks.extend(v.reset.map(|(_, at)| (at, 'R')));
    marks.extend(v.key_deleted_ns.map(|at| (at, 'X')));
    let _ = writeln!(
        s,
        "  {:<width$}{}   (^ fault, R reset, X key expired)",
        "events",
        mark_row(from, cols, &marks)
    );

    // The verdicts.
    let c = v.verdict;
    let _ = writeln!(
        s,
        "\nChecker (testbed::history over {} observations, terms from etcd's watch):",
        obs.len()
    );
    let _ = writeln!(
        s,
        "  inserts: {} acknowledged, {} failed, {} unknown ({} of them present on the final \
         primary, {} absent)",
        c.writes_ok, c.writes_failed, c.writes_unknown, c.unknown_present, c.unknown_absent
    );
    let _ = writeln!(
        s,
        "  double-writable instants: {} (writable outside its term: {}; changes of primary the \
         clients' history needs: {}, etcd made: {})",
        c.double_writable(),
        c.outside_term.len(),
        c.chain.changes,
        c.recorded_changes.map_or("?".into(), |r| r.to_string())
    );
    let _ = writeln!(
        s,
        "  lost acknowledged inserts: {}{}",
        c.lost_acked.len(),
        match &v.history.final_rows {
            Some(r) => format!(" (the final primary holds {} rows)", r.len()),
            None => " (no final primary to read)".into(),
        }
    );
    match &v.audit {
        Some((code, verdicts)) => {
            let _ = writeln!(
                s,
                "Audit (leasedog audit timeline over both nodes' logs, exit {code}):"
            );
            if verdicts.is_empty() {
                let _ = writeln!(s, "  no change of leader");
            }
            for x in verdicts {
                let _ = writeln!(s, "  {x}");
            }
        }
        None => {
            let _ = writeln!(s, "Audit: not run");
        }
    }
    let problems = v.problems();
    if problems.is_empty() {
        let _ = writeln!(
            s,
            "\nSAFE: no double-writable instant, no acknowledged insert lost{}.",
            v.expected_fence.map_or(String::new(), |e| format!(
                ", the change {}->{} {e}",
                v.old, v.new
            ))
        );
    } else {
        let _ = writeln!(s, "\nNOT SAFE: {}.", problems.join("; "));
    }
    s
}

/// Whole seconds after the fault, each at its column.
fn ruler(from_ns: u64, fault_ns: u64, cols: usize) -> String {
    let mut row = vec![' '; cols];
    let mut sec = -((fault_ns - from_ns).div_ceil(1_000_000_000) as i64);
    loop {
        let at = fault_ns as i128 + sec as i128 * 1_000_000_000;
        if at >= from_ns as i128 {
            let c = ((at - from_ns as i128) as u64 / STEP_NS) as usize;
            let label = if sec == 0 {
                "0".to_string()
            } else {
                format!("{sec:+}")
            };
            if c + label.len() > cols {
                break;
            }
            for (i, ch) in label.chars().enumerate() {
                row[c + i] = ch;
            }
        }
        sec += 1;
    }
    row.into_iter().collect::<String>().trim_end().to_string()
}

/// `marks` at their columns; two in one column show as `*`.
fn mark_row(from_ns: u64, cols: usize, marks: &[(u64, char)]) -> String {
    let mut row = vec![' '; cols];
    for &(at, ch) in marks {
        let Some(c) = at.checked_sub(from_ns).map(|d| (d / STEP_NS) as usize) else {
            continue;
        };
        if let Some(x) = row.get_mut(c) {
            *x = if *x == ' ' { ch } else { '*' };
        }
    }
    row.into_iter().collect::<String>().trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{check, terms};

    const MS: u64 = 1_000_000;

    fn probe(node: &str, at_ms: u64, to_ms: u64, writable: Option<bool>) -> Obs {
        Obs {
            node: Some(node.into()),
            client: "probe-kept".into(),
            invoke_ns: at_ms * MS,
            complete_ns: to_ms * MS,
            kind: Kind::Probe { writable },
        }
    }

    fn write(client: &str, node: Option<&str>, at_ms: u64, to_ms: u64, id: i64, o: Outcome) -> Obs {
        Obs {
            node: node.map(Into::into),
            client: client.into(),
            invoke_ns: at_ms * MS,
            complete_ns: to_ms * MS,
            kind: Kind::Write { id, outcome: o },
        }
    }

    /// a leads until its key expires at 12 s, b holds it from 12.1 s; the
    /// fault at 10 s, a's reset at 11 s.
    fn failover() -> History {
        let mut obs = Vec::new();
        for t in (8000..=10750).step_by(250) {
            obs.push(probe("a", t, t + 2, Some(true)));
        }
        // a's reset: each question (its connect included) goes unanswered.
        obs.push(probe("a", 11000, 12000, None));
        obs.push(probe("a", 12000, 13000, None));
        for t in (8000..=12750).step_by(250) {
            obs.push(probe("b", t, t + 1, Some(false)));
        }
        for t in (13000..=14000).step_by(250) {
            obs.push(probe("b", t, t + 1, Some(true)));
        }
        let w = "writer-new";
        obs.extend([
            write(w, Some("a"), 9000, 9005, 1, Outcome::Ok),
            write(w, Some("a"), 9500, 9505, 2, Outcome::Ok),
            write(w, Some("a"), 10500, 10505, 3, Outcome::Ok),
            write(w, None, 11000, 13000, 4, Outcome::Unknown),
            write(w, None, 13100, 13105, 5, Outcome::Fail),
            write(w, Some("b"), 13500, 13505, 6, Outcome::Ok),
            write(w, Some("b"), 14000, 14005, 7, Outcome::Ok),
        ]);
        History {
            obs,
            terms: terms(&[
                (0, Some("a".into())),
                (12000 * MS, None),
                (12100 * MS, Some("b".into())),
            ]),
            final_rows: Some([1, 2, 3, 6, 7].into_iter().collect()),
            slack_ns: 50 * MS,
        }
    }

    fn view<'a>(h: &'a History, v: &'a Verdict, audit: &str) -> Failover<'a> {
        Failover {
            history: h,
            verdict: v,
            old: "a",
            new: "b",
            fault_ns: 10000 * MS,
            fault: "a: its agent stalled",
            reset: Some(("WATCHDOG", 11000 * MS)),
            key_deleted_ns: Some(12000 * MS),
            new_leader_ns: Some(12100 * MS),
            audit: Some((0, vec![format!("a->b {audit}")])),
            expected_fence: Some("FENCED-BY-RESET"),
        }
    }

    #[test]
    fn the_strip_shows_who_was_writable_when_and_the_gap_is_the_writers_wait() {
        let h = failover();
        let v = check(&h);
        let from = 8000 * MS;
        assert_eq!(strip(&h.obs, "a", from, 25), "WWWWWWWWWWWW---------....");
        assert_eq!(strip(&h.obs, "b", from, 25), "rrrrrrrrrrrrrrrrrrrrWWWWW");
        // From the last acknowledgement before the fault (9.505 s) on, the
        // longest wait is from a's last to b's first.
        assert_eq!(
            writer_gap(&h.obs, "writer-new", 10000 * MS),
            Some((10505 * MS, 13505 * MS))
        );
        let runs = runs(&h.obs, "writer-new");
        let seen: Vec<(Seen, usize)> = runs.iter().map(|r| (r.seen.clone(), r.count)).collect();
        assert_eq!(
            seen,
            [
                (Seen::Acked("a".into()), 3),
                (Seen::Unknown, 1),
                (Seen::Failed, 1),
                (Seen::Acked("b".into()), 2)
            ]
        );

        let f = view(&h, &v, "FENCED-BY-RESET");
        assert!(f.problems().is_empty(), "{:?}", f.problems());
        let text = render(&f);
        eprintln!("{text}");
        assert!(
            text.contains(
                "writer gap: 3.000 s without an acknowledged insert (+0.505 a -> +3.505 b)"
            ),
            "{text}"
        );
        assert!(
            text.contains("  a        WWWWWWWWWWWW---------....\n"),
            "{text}"
        );
        assert!(
            text.contains("  seconds  -2  -1  0   +1  +2  +3\n"),
            "{text}"
        );
        // The fault at 0 s, the reset at +1 s, the key's expiry at +2 s.
        assert!(text.contains("  events           ^   R   X   (^"), "{text}");
        let order: Vec<usize> = [
            "+0.000  a: its agent stalled",
            "+0.505  last insert acknowledged by a (id 3, writer-new, 1.495 s before its key expired)",
            "+1.000  a RESET by its watchdog (WATCHDOG)",
            "+2.000  etcd deleted the leader key",
            "+2.100  b took the leader key",
            "+3.001  b first answered the probe as writable",
            "+3.505  first insert acknowledged by b (id 6, writer-new)",
        ]
        .iter()
        .map(|l| text.find(l).unwrap_or_else(|| panic!("{l:?} in\n{text}")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.contains("\nSAFE: "), "{text}");
    }

    #[test]
    fn a_write_after_the_term_a_lost_insert_or_a_wrong_fence_fails_the_view() {
        let mut h = failover();
        // a's kept connection commits at 12.5 s, after its key expired; b
        // never got it.
        h.obs.push(write(
            "writer-kept-a",
            Some("a"),
            12500,
            12505,
            8,
            Outcome::Ok,
        ));
        let v = check(&h);
        let p = view(&h, &v, "UNPROVEN").problems();
        assert!(render(&view(&h, &v, "UNPROVEN"))
            .contains("+2.505  last insert acknowledged by a (id 8, writer-kept-a, 0.505 s AFTER"),);
        assert!(p.iter().any(|x| x.contains("double-writable")), "{p:?}");
        assert!(p.iter().any(|x| x.contains("lost: [8]")), "{p:?}");
        assert!(
            p.iter()
                .any(|x| x.contains("a->b UNPROVEN, expected FENCED-BY-RESET")),
            "{p:?}"
        );
        let text = render(&view(&h, &v, "UNPROVEN"));
        assert!(text.contains("\nNOT SAFE: "), "{text}");
        // writer-kept-a only ever heard from a: it waited for no failover.
        assert_eq!(text.matches("writer gap:").count(), 1, "{text}");
    }
}
