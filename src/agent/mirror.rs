//! Mirrors the audit log's lifecycle records into etcd's `history/` under the
//! scope (docs/fencing.md rule 7), so the cluster's timeline survives the loss of a
//! node's disk, and the newest mirrored record of a node anchors its local
//! log: a clean truncation of the log (whole records cut off its end, which
//! the hash chain alone cannot show) disagrees with it.
//!
//! The writes run in a task of their own with their own etcd connection: a
//! slow or absent etcd never delays the main loop (renewals, step-down). The
//! main loop only pushes into a small bounded backlog; the task writes it in
//! order and retries with backoff. If the backlog overflows, the oldest
//! records are dropped from the mirror (never from the local log) and counted.
//! Records an earlier run could not mirror (it died with a backlog) are
//! back-filled at the next start-up, after the anchor check.

use crate::audit::{self, Record};
use crate::config::EtcdConfig;
use crate::dcs::Dcs;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{error, info, warn};

/// Records waiting for etcd, at most.
pub const BACKLOG: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Backlog {
    /// (seq, record JSON), oldest first.
    queue: VecDeque<(u64, String)>,
    dropped: u64,
}

#[derive(Default)]
struct Shared {
    backlog: Mutex<Backlog>,
    /// A record was pushed.
    wake: Notify,
    /// A record was written (or dropped).
    written: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Backlog> {
        // Nothing panics while holding it; a poisoned lock still holds data.
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The main loop's handle on the mirror.
pub struct Mirror {
    shared: Arc<Shared>,
    /// The agent is shutting down (a `shutdown` record was written).
    pub shutting_down: bool,
}

impl Mirror {
    /// Starts the mirror task (call inside the runtime). It first catches up
    /// with the lifecycle records this run has already written to the local
    /// log at `log_path`, from its last `startup` record on (the start-up
    /// record is written before the agent's loop exists).
    /// `requests` counts its etcd requests (metrics).
    pub fn start(
        etcd: &EtcdConfig,
        scope: &str,
        node: &str,
        log_path: &Path,
        requests: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> Mirror {
        let shared = Arc::new(Shared::default());
        // The first seq of this run: records before it are an earlier run's.
        let mut run_from = None;
        match audit::read_log(log_path) {
            Ok((recs, _)) => {
                let from = recs
                    .iter()
                    .rposition(|r| matches!(r.event, audit::Event::Startup { .. }))
                    .unwrap_or(0);
                run_from = recs.get(from).map(|r| r.seq);
                let mut b = shared.lock();
                for r in recs[from..].iter().filter(|r| r.event.is_lifecycle()) {
                    push(&mut b, r);
                }
            }
            Err(e) => warn!("cannot read back the audit log to mirror this run's start-up: {e}"),
        }
        tokio::spawn(run(
            shared.clone(),
            Target {
                etcd: etcd.clone(),
                scope: scope.to_owned(),
                node: node.to_owned(),
                log: log_path.to_owned(),
                run_from,
                requests,
            },
        ));
        shared.wake.notify_one();
        Mirror {
            shared,
            shutting_down: false,
        }
    }

    /// Queues a record for etcd (never blocks).
    pub fn push(&mut self, r: &Record) {
        push(&mut self.shared.lock(), r);
        self.shared.wake.notify_one();
    }

    /// Waits until every queued record is in etcd, at most `within`.
    /// Returns whether it got there.
    pub async fn flush(&self, within: Duration) -> bool {
        let wait = async {
            loop {
                // Registered before the check, so no write in between is missed.
                let written = self.shared.written.notified();
                if self.shared.lock().queue.is_empty() {
                    return;
                }
                written.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }

    /// Records queued and not yet in etcd.
    pub fn pending(&self) -> usize {
        self.shared.lock().queue.len()
    }
}

fn push(b: &mut Backlog, r: &Record) {
    let json = match serde_json::to_string(r) {
        Ok(j) => j,
        Err(e) => {
            error!(
                seq = r.seq,
                "cannot serialize an audit record for etcd: {e}"
            );
            return;
        }
    };
    if b.queue.len() >= BACKLOG {
        b.queue.pop_front();
        b.dropped += 1;
        warn!(
            dropped = b.dropped,
            "audit mirror backlog full (etcd unreachable?): the oldest record is dropped from the mirror (the local log keeps it)"
        );
    }
    b.queue.push_back((r.seq, json));
}

struct Target {
    etcd: EtcdConfig,
    scope: String,
    node: String,
    log: PathBuf,
    run_from: Option<u64>,
    requests: Option<Arc<std::sync::atomic::AtomicU64>>,
}

async fn run(shared: Arc<Shared>, t: Target) {
    let mut dcs: Option<Dcs> = None;
    let mut anchored = false;
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        // Registered before the check, so a push in between is not missed.
        let woken = shared.wake.notified();
        if shared.lock().queue.is_empty() {
            woken.await;
            continue;
        }
        let step = async {
            if dcs.is_none() {
                let mut d = Dcs::connect(&t.etcd, &t.scope, &t.node).await?;
                if let Some(c) = &t.requests {
                    d.count_requests(c.clone());
                }
                dcs = Some(d);
            }
            let d = dcs.as_mut().expect("connected above");
            if !anchored {
                // Before this run's first write, so the newest mirrored
                // record is an earlier run's: the anchor.
                let backfill = check_anchor(d, &t).await?;
                if !backfill.is_empty() {
                    info!(
                        records = backfill.len(),
                        "mirroring audit records an earlier run left unmirrored"
                    );
                }
                let mut b = shared.lock();
                for r in backfill.iter().rev() {
                    if let Ok(j) = serde_json::to_string(r) {
                        b.queue.push_front((r.seq, j));
                    }
                }
                anchored = true;
            }
            let Some((seq, json)) = shared.lock().queue.front().cloned() else {
                return Ok(None);
            };
            d.append_history(&json).await.map(|()| Some(seq))
        };
        match step.await {
            Ok(None) => {}
            Ok(Some(seq)) => {
                {
                    let mut b = shared.lock();
                    // The overflow may have dropped it meanwhile.
                    if b.queue.front().is_some_and(|(s, _)| *s == seq) {
                        b.queue.pop_front();
                    }
                }
                shared.written.notify_waiters();
                if failing {
                    info!(seq, "audit mirror to etcd works again");
                    failing = false;
                }
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                warn!("cannot mirror audit records to etcd: {e}; retrying in {backoff:?}");
                failing = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Compares the local log with the newest record this node mirrored in an
/// earlier run. A disagreement (records cut off the end, or rewritten) is
/// logged as an error; the agent runs on (the timeline reports it too).
/// If they agree, returns the earlier runs' lifecycle records after the
/// anchor that never reached etcd (at most [`BACKLOG`], the newest).
async fn check_anchor(d: &mut Dcs, t: &Target) -> Result<Vec<Record>, crate::dcs::DcsError> {
    let Some(v) = d.history_newest(&t.node).await? else {
        return Ok(Vec::new());
    };
    let (anchor, bad) = audit::parse_history([v.as_slice()]);
    for b in bad {
        warn!("etcd audit history: {b}");
    }
    let local = match audit::read_log(&t.log) {
        Ok((local, _)) => local,
        Err(e) => {
            warn!("cannot read the audit log to check its anchor: {e}");
            return Ok(Vec::new());
        }
    };
    let disagreements = audit::cross_check(std::slice::from_ref(&local), &anchor);
    for what in &disagreements {
        error!("the audit log disagrees with its anchor in etcd: {what}");
    }
    let (Some(a), true) = (anchor.first(), disagreements.is_empty()) else {
        return Ok(Vec::new());
    };
    let end = t.run_from.unwrap_or(u64::MAX);
    let mut missed: Vec<Record> = local
        .into_iter()
        .filter(|r| r.seq > a.seq && r.seq < end && r.event.is_lifecycle())
        .collect();
    if missed.len() > BACKLOG {
        missed.drain(..missed.len() - BACKLOG);
    }
    Ok(missed)
}
