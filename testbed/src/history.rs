//! A Jepsen-style checker over what the clients saw.
//!
//! The benchmarks record a history: every write a client attempted (its
//! invoke and completion instants on the host's CLOCK_BOOTTIME, its outcome,
//! and the node that answered), every probe of `pg_is_in_recovery()`, the
//! leader key's terms from etcd's watch, and at the end the rows the final
//! primary holds. The checker then decides, from the history alone:
//!
//! - **Writable outside its term**: a node observed writable (an acknowledged
//!   write, or a probe saying "not in recovery") in a window that lies wholly
//!   outside every term in which it held the leader key. That is FENCING
//!   rule 8 seen from the clients: a node that no longer holds the key
//!   (another node may be promoted) still accepted a write.
//! - **More changes of primary than etcd made**: a chain of observations,
//!   each completed before the next was invoked, that alternates between
//!   nodes more often than the key changed hands (X, then Y, then X again
//!   after a single handover) needs two writable primaries at some instant.
//!   The longest such chain is a lower bound on the changes of primary the
//!   clients' history needs; it needs no clock shared with etcd.
//! - **Lost acknowledged writes**: acknowledged ids the final primary lacks
//!   (must be 0 in synchronous mode). Writes whose outcome is unknown (a
//!   timeout, a broken connection) may or may not be there: counted apart.

use serde_json::{json, Value};
use std::collections::BTreeSet;

/// How a write ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: the commit returned.
    Ok,
    /// Refused before anything was sent (no connection, a read-only server).
    Fail,
    /// Sent, then no answer (timeout, broken connection): may have committed.
    Unknown,
}

/// One observation of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Write {
        id: i64,
        outcome: Outcome,
    },
    /// `Some(true)`: the node said it is not in recovery (writable).
    Probe {
        writable: Option<bool>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Obs {
    /// The node that answered (`None` when no node answered).
    pub node: Option<String>,
    /// Who observed it (a writer's or the probe's name), for the report.
    pub client: String,
    pub invoke_ns: u64,
    pub complete_ns: u64,
    pub kind: Kind,
}

impl Obs {
    /// The node was writable at some instant of `[invoke, complete]`.
    fn writable_node(&self) -> Option<&str> {
        let yes = match self.kind {
            Kind::Write { outcome, .. } => outcome == Outcome::Ok,
            Kind::Probe { writable } => writable == Some(true),
        };
        if yes {
            self.node.as_deref()
        } else {
            None
        }
    }
}

/// A term of the leader key: `node` held it from `from_ns` until `to_ns`
/// (the next deletion or put by another holder; `None`: still held).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub node: String,
    pub from_ns: u64,
    pub to_ns: Option<u64>,
}

/// Builds terms from the key's events in order: `(at_ns, Some(holder))`
/// for a put, `(at_ns, None)` for a deletion. A put by the current holder
/// (a re-acquisition on a new lease) continues its term.
pub fn terms(events: &[(u64, Option<String>)]) -> Vec<Term> {
    let mut out: Vec<Term> = Vec::new();
    for (at, holder) in events {
        let open = out.last().is_some_and(|t| t.to_ns.is_none());
        if open && out.last().map(|t| Some(&t.node)) == Some(holder.as_ref()) {
            continue;
        }
        if open {
            out.last_mut().expect("open term").to_ns = Some(*at);
        }
        if let Some(h) = holder {
            out.push(Term {
                node: h.clone(),
                from_ns: *at,
                to_ns: None,
            });
        }
    }
    out
}

/// Everything the checker reads.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub obs: Vec<Obs>,
    /// The leader key's terms; empty when not recorded (the term check and
    /// the comparison of changes are then skipped).
    pub terms: Vec<Term>,
    /// The ids present on the final primary (`None`: no final primary).
    pub final_rows: Option<BTreeSet<i64>>,
    /// Watch receipt and timestamp granularity allowed around a term's ends.
    pub slack_ns: u64,
}

/// A chain of observations proving more changes of primary than recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub changes: usize,
    /// `(node, invoke_ns, complete_ns)` of each observation of the chain
    /// where the node changes (and the first).
    pub witness: Vec<(String, u64, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub writes_ok: usize,
    pub writes_failed: usize,
    pub writes_unknown: usize,
    pub writable_observations: usize,
    /// Observations of a node writable wholly outside its terms.
    pub outside_term: Vec<Obs>,
    /// Changes of the key's holder that etcd recorded (`None`: no terms).
    pub recorded_changes: Option<usize>,
    /// The longest alternating chain: a lower bound on changes of primary.
    pub chain: Chain,
    pub lost_acked: Vec<i64>,
    pub unknown_present: usize,
    pub unknown_absent: usize,
}

impl Verdict {
    /// Instants at which two nodes were writable, as far as the history
    /// proves them: observations outside their node's terms, plus the
    /// changes of primary the clients needed beyond those etcd made.
    pub fn double_writable(&self) -> usize {
        let excess = self
            .recorded_changes
            .map_or(0, |r| self.chain.changes.saturating_sub(r));
        self.outside_term.len() + excess
    }

    pub fn ok(&self, synchronous: bool) -> bool {
        self.double_writable() == 0 && (!synchronous || self.lost_acked.is_empty())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "writes": {"ok": self.writes_ok, "failed": self.writes_failed, "unknown": self.writes_unknown},
            "writable_observations": self.writable_observations,
            "double_writable": self.double_writable(),
            "outside_term": self.outside_term.iter().map(|o| json!({
                "node": o.node, "client": o.client, "invoke_ns": o.invoke_ns, "complete_ns": o.complete_ns,
            })).collect::<Vec<_>>(),
            "recorded_changes": self.recorded_changes,
            "changes_needed": self.chain.changes,
            "chain": self.chain.witness.iter().map(|(n, i, c)| json!([n, i, c])).collect::<Vec<_>>(),
            "lost_acked": self.lost_acked,
            "unknown_present": self.unknown_present,
            "unknown_absent": self.unknown_absent,
        })
    }
}

/// Checks `h`; see the module documentation.
pub fn check(h: &History) -> Verdict {
    let count = |o: Outcome| {
        h.obs
            .iter()
            .filter(|x| matches!(x.kind, Kind::Write { outcome, .. } if outcome == o))
            .count()
    };
    let writable: Vec<&Obs> = h
        .obs
        .iter()
        .filter(|o| o.writable_node().is_some())
        .collect();
    let outside_term = if h.terms.is_empty() {
        Vec::new()
    } else {
        writable
            .iter()
            .filter(|o| !within_own_term(o, &h.terms, h.slack_ns))
            .map(|o| (*o).clone())
            .collect()
    };
    let recorded_changes = (!h.terms.is_empty()).then(|| {
        h.terms
            .windows(2)
            .filter(|w| w[0].node != w[1].node)
            .count()
    });
    let (mut lost_acked, mut unknown_present, mut unknown_absent) = (Vec::new(), 0, 0);
    if let Some(rows) = &h.final_rows {
        for o in &h.obs {
            if let Kind::Write { id, outcome } = o.kind {
                match (outcome, rows.contains(&id)) {
                    (Outcome::Ok, false) => lost_acked.push(id),
                    (Outcome::Unknown, true) => unknown_present += 1,
                    (Outcome::Unknown, false) => unknown_absent += 1,
                    _ => {}
                }
            }
        }
    }
    lost_acked.sort_unstable();
    Verdict {
        writes_ok: count(Outcome::Ok),
        writes_failed: count(Outcome::Fail),
        writes_unknown: count(Outcome::Unknown),
        writable_observations: writable.len(),
        outside_term,
        recorded_changes,
        chain: longest_alternation(&writable),
        lost_acked,
        unknown_present,
        unknown_absent,
    }
}

/// Whether `o`'s window meets a term of its node (widened by `slack`).
///
/// Term bounds are watch receipts, each some time after etcd made the
/// change. For a term's end that is lenient; for its start it would be
/// strict in the wrong direction: a new leader that won, armed and promoted
/// faster than the watch delivered its put (seen: 65 ms late on a loaded
/// machine) would look writable before its term. All the history knows is
/// that the put came after the previous change, so a term may start as early
/// as the previous term's end (as received). A writable old leader is
/// judged by its own term's end, which this does not touch.
fn within_own_term(o: &Obs, terms: &[Term], slack: u64) -> bool {
    let node = o.writable_node().expect("writable observation");
    terms
        .iter()
        .enumerate()
        .filter(|(_, t)| t.node == node)
        .any(|(i, t)| {
            let earliest = match i.checked_sub(1).map(|p| &terms[p]) {
                Some(prev) => prev.to_ns.unwrap_or(t.from_ns).min(t.from_ns),
                None => t.from_ns,
            };
            let starts_before_end = t
                .to_ns
                .is_none_or(|to| o.invoke_ns <= to.saturating_add(slack));
            let ends_after_start = o.complete_ns.saturating_add(slack) >= earliest;
            starts_before_end && ends_after_start
        })
}

/// The chain of writable observations (each completed before the next was
/// invoked) with the most changes of node. O(n²) over a few thousand.
fn longest_alternation(writable: &[&Obs]) -> Chain {
    let mut v: Vec<&Obs> = writable.to_vec();
    v.sort_by_key(|o| (o.invoke_ns, o.complete_ns));
    let n = v.len();
    // best[i]: most changes of a chain ending at i; prev[i]: its predecessor.
    let mut best = vec![0usize; n];
    let mut prev: Vec<Option<usize>> = vec![None; n];
    for i in 0..n {
        for j in 0..i {
            if v[j].complete_ns < v[i].invoke_ns {
                let c = best[j] + usize::from(v[j].writable_node() != v[i].writable_node());
                if c > best[i] || (c == best[i] && prev[i].is_none()) {
                    best[i] = c;
                    prev[i] = Some(j);
                }
            }
        }
    }
    let Some(end) = (0..n).max_by_key(|&i| best[i]) else {
        return Chain {
            changes: 0,
            witness: Vec::new(),
        };
    };
    let mut path = vec![end];
    while let Some(p) = prev[*path.last().expect("non-empty")] {
        path.push(p);
    }
    path.reverse();
    let mut witness: Vec<(String, u64, u64)> = Vec::new();
    for i in path {
        let node = v[i].writable_node().expect("writable").to_string();
        if witness.last().map(|w| &w.0) != Some(&node) {
            witness.push((node, v[i].invoke_ns, v[i].complete_ns));
        }
    }
    Chain {
        changes: best[end],
        witness,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn write(node: &str, at_ms: u64, id: i64, outcome: Outcome) -> Obs {
        Obs {
            node: Some(node.into()),
            client: "w".into(),
            invoke_ns: at_ms * MS,
            complete_ns: (at_ms + 5) * MS,
            kind: Kind::Write { id, outcome },
        }
    }

    fn probe(node: &str, at_ms: u64, writable: bool) -> Obs {
        Obs {
            node: Some(node.into()),
            client: "p".into(),
            invoke_ns: at_ms * MS,
            complete_ns: (at_ms + 2) * MS,
            kind: Kind::Probe {
                writable: Some(writable),
            },
        }
    }

    /// a leads until 1000 ms (expiry), b from 1100 ms.
    fn one_failover() -> Vec<Term> {
        terms(&[
            (0, Some("a".into())),
            (1000 * MS, None),
            (1100 * MS, Some("b".into())),
        ])
    }

    fn history(obs: Vec<Obs>, rows: &[i64]) -> History {
        History {
            obs,
            terms: one_failover(),
            final_rows: Some(rows.iter().copied().collect()),
            slack_ns: 50 * MS,
        }
    }

    #[test]
    fn terms_follow_puts_and_deletions() {
        let t = terms(&[
            (1, Some("a".into())),
            (2, Some("a".into())), // a again on a new lease: one term
            (3, None),
            (4, Some("b".into())),
            (5, Some("a".into())), // put by another holder ends b's term
        ]);
        assert_eq!(
            t,
            vec![
                Term {
                    node: "a".into(),
                    from_ns: 1,
                    to_ns: Some(3)
                },
                Term {
                    node: "b".into(),
                    from_ns: 4,
                    to_ns: Some(5)
                },
                Term {
                    node: "a".into(),
                    from_ns: 5,
                    to_ns: None
                },
            ]
        );
    }

    #[test]
    fn a_clean_failover_passes() {
        let h = history(
            vec![
                write("a", 100, 1, Outcome::Ok),
                probe("a", 500, true),
                write("a", 900, 2, Outcome::Unknown),
                write("a", 1200, 3, Outcome::Fail),
                probe("b", 1200, true),
                write("b", 1300, 4, Outcome::Ok),
            ],
            &[1, 4],
        );
        let v = check(&h);
        assert_eq!(v.double_writable(), 0, "{v:?}");
        assert_eq!(v.recorded_changes, Some(1));
        assert_eq!(v.chain.changes, 1);
        assert!(v.lost_acked.is_empty());
        assert_eq!((v.unknown_present, v.unknown_absent), (0, 1));
        assert_eq!((v.writes_ok, v.writes_failed, v.writes_unknown), (2, 1, 1));
        assert!(v.ok(true));
    }

    #[test]
    fn a_write_on_the_old_primary_after_its_term_is_caught() {
        // a's kept connection commits at 1500 ms, long after its key went.
        let h = history(
            vec![
                write("a", 100, 1, Outcome::Ok),
                write("b", 1300, 2, Outcome::Ok),
                write("a", 1500, 3, Outcome::Ok),
            ],
            &[1, 2],
        );
        let v = check(&h);
        assert_eq!(v.outside_term.len(), 1, "{v:?}");
        assert_eq!(v.outside_term[0].invoke_ns, 1500 * MS);
        // a, b, a: two changes of primary where etcd made one.
        assert_eq!(v.chain.changes, 2);
        assert_eq!(v.double_writable(), 2);
        assert_eq!(v.lost_acked, vec![3]);
        assert!(!v.ok(false));
    }

    #[test]
    fn a_new_leader_seen_writable_before_its_put_arrived_is_in_its_term() {
        // a's key deleted at 1000 ms (receipt), b's put received at 1100 ms;
        // b promoted before the put's receipt: within what etcd allows.
        let h = history(
            vec![write("a", 100, 1, Outcome::Ok), probe("b", 1020, true)],
            &[1],
        );
        let v = check(&h);
        assert!(v.outside_term.is_empty(), "{v:?}");
        // Before a's term ended (as received), b writable is outside.
        let v = check(&history(vec![probe("b", 900, true)], &[]));
        assert_eq!(v.outside_term.len(), 1, "{v:?}");
    }

    #[test]
    fn alternation_needs_no_etcd_history() {
        let mut h = history(
            vec![
                probe("a", 100, true),
                probe("b", 200, true),
                probe("a", 300, true),
            ],
            &[],
        );
        h.terms.clear();
        let v = check(&h);
        assert_eq!(v.chain.changes, 2);
        assert_eq!(
            v.chain
                .witness
                .iter()
                .map(|w| w.0.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "a"]
        );
        // Without terms there is nothing to compare the changes with.
        assert_eq!(v.double_writable(), 0);
        assert!(v.to_json()["recorded_changes"].is_null());
    }

    #[test]
    fn overlapping_windows_prove_nothing() {
        // b's probe overlaps both of a's writes: no strict order a, b, a.
        let mut obs = vec![
            write("a", 1000, 1, Outcome::Ok),
            write("a", 1004, 2, Outcome::Ok),
        ];
        obs.push(Obs {
            complete_ns: 1009 * MS,
            ..probe("b", 1003, true)
        });
        let v = check(&History {
            terms: terms(&[(0, Some("a".into())), (1000 * MS, Some("b".into()))]),
            ..history(obs, &[1, 2])
        });
        // No observation completed before another of a different node began.
        assert_eq!(v.chain.changes, 0, "{v:?}");
        assert_eq!(v.double_writable(), 0, "{v:?}");
    }

    #[test]
    fn a_lost_acknowledged_write_fails_synchronous_mode_only() {
        let v = check(&history(
            vec![
                write("a", 100, 1, Outcome::Ok),
                write("b", 1300, 2, Outcome::Ok),
            ],
            &[2],
        ));
        assert_eq!(v.lost_acked, vec![1]);
        assert_eq!(v.double_writable(), 0);
        assert!(!v.ok(true));
        assert!(v.ok(false));
    }
}
