//! The clients of the failover benchmarks (the host bench and the lab's
//! PostgreSQL trials): writers inserting unique ids into `bench` and a probe
//! asking each node `pg_is_in_recovery()`, on tokio-postgres, every
//! observation timestamped on the host's CLOCK_BOOTTIME and turned into a
//! [`crate::history::Obs`] for the checker.
//!
//! Nodes are identified by the port their server answers on
//! (`INSERT ... RETURNING inet_server_port()`): each node of a trial needs
//! its own port number, as seen by the server itself.

use crate::etcd::boottime_ns;
use crate::history::{Kind, Obs, Outcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The table every writer inserts into.
pub const TABLE_SQL: &str =
    "CREATE TABLE bench (id bigint PRIMARY KEY, at timestamptz DEFAULT now())";

/// A node as the clients see it: its name (for the history) and the port
/// on 127.0.0.1 they reach it at, which is also the port its server answers
/// `inet_server_port()` with.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub port: u16,
}

/// A conninfo to `t` as the superuser (trust on loopback in the testbed).
pub fn conninfo(t: &Target) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=1",
        t.port
    )
}

/// A libpq multi-host conninfo over `targets` asking for a read-write
/// session: what an application uses to find the primary.
pub fn read_write_conninfo(targets: &[Target]) -> String {
    let hosts = vec!["127.0.0.1"; targets.len()].join(",");
    let ports: Vec<String> = targets.iter().map(|t| t.port.to_string()).collect();
    format!(
        "host={hosts} port={} user=postgres dbname=postgres \
         target_session_attrs=read-write connect_timeout=1",
        ports.join(",")
    )
}

/// How often a client acts: uniformly in `[min, max]` (a fixed period when
/// they are equal).
#[derive(Debug, Clone, Copy)]
pub struct Every {
    pub min: Duration,
    pub max: Duration,
}

impl Every {
    pub fn fixed(d: Duration) -> Every {
        Every { min: d, max: d }
    }

    fn next(&self, rng: &mut u64) -> Duration {
        let span = self.max.saturating_sub(self.min).as_nanos() as u64;
        if span == 0 {
            return self.min;
        }
        // xorshift64: spread only, nothing depends on its quality.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        self.min + Duration::from_nanos(*rng % span)
    }
}

/// Ticks at `every` from now (the first at once), like a tokio interval
/// that delays missed ticks: an action longer than the period pushes the
/// next tick back instead of bunching ticks up.
struct Ticker {
    every: Every,
    rng: u64,
    next: tokio::time::Instant,
}

impl Ticker {
    fn new(every: Every, salt: i64) -> Ticker {
        Ticker {
            every,
            rng: seed(salt),
            next: tokio::time::Instant::now(),
        }
    }

    async fn tick(&mut self) {
        tokio::time::sleep_until(self.next).await;
        let now = tokio::time::Instant::now();
        let d = self.every.next(&mut self.rng);
        self.next = if self.next + d < now {
            now + d
        } else {
            self.next + d
        };
    }
}

fn seed(salt: i64) -> u64 {
    (boottime_ns() ^ (salt as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// One insert as its writer saw it.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub at_ns: u64,
    pub done_ns: u64,
    pub id: i64,
    pub outcome: Outcome,
    /// The node (index into the targets) that acknowledged it.
    pub node: Option<usize>,
}

impl Attempt {
    pub fn acked(&self) -> bool {
        self.outcome == Outcome::Ok
    }
}

/// Connects within `within` (the whole multi-host walk), spawning the
/// connection's task.
pub async fn connect(conninfo: &str, within: Duration) -> Option<tokio_postgres::Client> {
    let fut = tokio_postgres::connect(conninfo, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(within, fut).await.ok()?.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

/// Inserts `id`; the outcome and the port of the server that committed it.
/// A refusal by the server (read-only, duplicate) is a failure; a timeout or
/// a broken connection after sending may have committed: unknown.
pub async fn insert(c: &tokio_postgres::Client, id: i64) -> (Outcome, Option<u16>) {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    let q = c.query_one(
        "INSERT INTO bench (id) VALUES ($1) RETURNING inet_server_port()",
        &params,
    );
    match tokio::time::timeout(Duration::from_secs(2), q).await {
        Ok(Ok(row)) => (Outcome::Ok, row.get::<_, Option<i32>>(0).map(|p| p as u16)),
        Ok(Err(e)) => match e.code() {
            Some(c)
                if *c == tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION
                    || *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION =>
            {
                (Outcome::Fail, None)
            }
            _ => (Outcome::Unknown, None),
        },
        Err(_) => (Outcome::Unknown, None),
    }
}

/// One read-write conninfo per target, to try in order: what libpq does
/// with a multi-host string, except that each host gets its own bound on
/// the whole connection (libpq's `connect_timeout` covers the startup
/// exchange too; tokio-postgres's covers only the TCP connect, so a host
/// whose TCP connect succeeds and whose server never answers, like a guest
/// behind QEMU's forward that is stopped or rebooting, would hold up the
/// walk until the outer bound).
pub fn read_write_each(targets: &[Target]) -> Vec<String> {
    targets
        .iter()
        .map(|t| format!("{} target_session_attrs=read-write", conninfo(t)))
        .collect()
}

/// Inserts ids `base + n` at `every` until `stop`, connecting through the
/// first of `conninfos` that connects (each within 1 s; a single conninfo,
/// e.g. a multi-host one, gets 1 s per target); `kept` keeps one connection
/// (reconnecting only when it broke or an outcome was not an
/// acknowledgement), else connects per insert.
pub async fn writer(
    conninfos: Vec<String>,
    targets: Vec<Target>,
    base: i64,
    kept: bool,
    every: Every,
    stop: Arc<AtomicBool>,
) -> Vec<Attempt> {
    let mut log = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    let connect_within = if conninfos.len() == 1 {
        Duration::from_secs(1 + targets.len() as u64)
    } else {
        Duration::from_secs(1)
    };
    let mut n = 0;
    let mut tick = Ticker::new(every, base);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let id = base + n;
        let at_ns = boottime_ns();
        if client.as_ref().is_none_or(|c| c.is_closed()) || !kept {
            client = None;
            for ci in &conninfos {
                client = connect(ci, connect_within).await;
                if client.is_some() {
                    break;
                }
            }
        }
        let (outcome, port) = match &client {
            Some(c) => insert(c, id).await,
            None => (Outcome::Fail, None),
        };
        if outcome != Outcome::Ok && kept {
            client = None; // unknown state: start over on a fresh connection
        }
        log.push(Attempt {
            at_ns,
            done_ns: boottime_ns(),
            id,
            outcome,
            node: port.and_then(|p| targets.iter().position(|t| t.port == p)),
        });
    }
    log
}

/// The attempts of writer `client` as observations for the checker.
pub fn write_obs(client: &str, targets: &[Target], log: &[Attempt]) -> Vec<Obs> {
    log.iter()
        .map(|a| Obs {
            node: a.node.map(|i| targets[i].name.clone()),
            client: client.into(),
            invoke_ns: a.at_ns,
            complete_ns: a.done_ns,
            kind: Kind::Write {
                id: a.id,
                outcome: a.outcome,
            },
        })
        .collect()
}

/// One probe round: its time and, per target, `Some(true)` if any of its
/// connections said `pg_is_in_recovery() = false`.
pub type ProbeRow = (u64, Vec<Option<bool>>);

async fn ask(c: &tokio_postgres::Client) -> Option<bool> {
    let q = c.query_one("SELECT pg_is_in_recovery()", &[]);
    let row = tokio::time::timeout(Duration::from_millis(300), q)
        .await
        .ok()?
        .ok()?;
    Some(!row.get::<_, bool>(0))
}

/// One target's questions of a round: on its kept connection (taken and
/// given back), and with `fresh` on a new one.
async fn ask_one(
    t: Target,
    mut kept: Option<tokio_postgres::Client>,
    fresh: bool,
) -> (Option<tokio_postgres::Client>, Vec<Obs>, Option<bool>) {
    let mut obs = Vec::new();
    let mut note = |client: &str, invoke_ns: u64, writable: Option<bool>| {
        obs.push(Obs {
            node: Some(t.name.clone()),
            client: client.into(),
            invoke_ns,
            complete_ns: boottime_ns(),
            kind: Kind::Probe { writable },
        })
    };
    let ci = conninfo(&t);
    // A connect that fails is part of the no-answer's window (what the
    // writer's view shows as "no answer"); a writable answer's window starts
    // after its connect, as the checker wants it tight.
    let connecting = boottime_ns();
    if kept.as_ref().is_none_or(|c| c.is_closed()) {
        kept = connect(&ci, Duration::from_secs(1)).await;
    }
    let asked = boottime_ns();
    let a = match &kept {
        Some(c) => ask(c).await,
        None => None,
    };
    note(
        "probe-kept",
        if kept.is_some() { asked } else { connecting },
        a,
    );
    if a.is_none() {
        kept = None;
    }
    let mut f = None;
    if fresh {
        let asked = boottime_ns();
        f = match connect(&ci, Duration::from_millis(300)).await {
            Some(c) => ask(&c).await,
            None => None,
        };
        note("probe-new", asked, f);
    }
    let w = match (a, f) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (None, None) => None,
        _ => Some(false),
    };
    (kept, obs, w)
}

/// Asks every target `pg_is_in_recovery()` at `every` until `stop`, on a
/// kept connection (which still reaches backends of a stopped postmaster)
/// and, with `fresh`, also on a new one per round. The targets of a round
/// are asked concurrently, so a node that hangs (a stopped server) does not
/// delay the questions to the others. Returns the rounds and every single
/// question as an observation.
pub async fn probe(
    targets: Vec<Target>,
    every: Every,
    fresh: bool,
    stop: Arc<AtomicBool>,
) -> (Vec<ProbeRow>, Vec<Obs>) {
    let mut kept: Vec<Option<tokio_postgres::Client>> = targets.iter().map(|_| None).collect();
    let mut out = Vec::new();
    let mut obs = Vec::new();
    let mut tick = Ticker::new(every, -1);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let at = boottime_ns();
        let handles: Vec<_> = targets
            .iter()
            .zip(kept.iter_mut())
            .map(|(t, k)| tokio::spawn(ask_one(t.clone(), k.take(), fresh)))
            .collect();
        let mut w = Vec::with_capacity(targets.len());
        for (i, h) in handles.into_iter().enumerate() {
            match h.await {
                Ok((k, o, x)) => {
                    kept[i] = k;
                    obs.extend(o);
                    w.push(x);
                }
                Err(_) => w.push(None),
            }
        }
        out.push((at, w));
    }
    (out, obs)
}

/// Asks each target `pg_is_in_recovery()` at `every` until `stop`, on a
/// kept connection, each target on a loop of its own: unlike [`probe`]'s
/// rounds, a node that does not answer (a connect waits up to 1 s) does not
/// thin out the questions to the others. Returns every question as an
/// observation.
pub async fn probe_each(targets: Vec<Target>, every: Every, stop: Arc<AtomicBool>) -> Vec<Obs> {
    let loops: Vec<_> = targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut kept = None;
                let mut obs = Vec::new();
                let mut tick = Ticker::new(every, -1 - i as i64);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let (k, o, _) = ask_one(t.clone(), kept.take(), false).await;
                    kept = k;
                    obs.extend(o);
                }
                obs
            })
        })
        .collect();
    let mut obs = Vec::new();
    for l in loops {
        obs.extend(l.await.unwrap_or_default());
    }
    obs
}

/// The longest stretch between completions of acknowledged inserts in
/// `log` (what an application waits), from the last one completed before
/// `t0` on.
pub fn gap_completed(log: &[Attempt], t0: u64) -> Option<f64> {
    let mut acks: Vec<u64> = log
        .iter()
        .filter(|a| a.acked())
        .map(|a| a.done_ns)
        .collect();
    acks.sort_unstable();
    let before = acks.iter().copied().filter(|d| *d < t0).max()?;
    acks.retain(|d| *d >= before);
    acks.windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1e9)
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))))
}

/// The longest stretch without an acknowledged insert in `log`, from the
/// last one acknowledged before `t0` on (a kept connection to a stopped
/// postmaster's backend may go on succeeding for a while after `t0`).
pub fn gap(log: &[Attempt], t0: u64) -> Option<f64> {
    let before = log
        .iter()
        .filter(|a| a.acked() && a.at_ns < t0)
        .map(|a| a.at_ns)
        .max()?;
    let acks: Vec<u64> = log
        .iter()
        .filter(|a| a.acked() && a.at_ns >= before)
        .map(|a| a.at_ns)
        .collect();
    acks.windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1e9)
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stays_in_its_range() {
        let e = Every {
            min: Duration::from_millis(50),
            max: Duration::from_millis(100),
        };
        let mut rng = seed(7);
        for _ in 0..1000 {
            let d = e.next(&mut rng);
            assert!(d >= e.min && d < e.max, "{d:?}");
        }
        let f = Every::fixed(Duration::from_millis(100));
        assert_eq!(f.next(&mut rng), Duration::from_millis(100));
    }

    #[test]
    fn read_write_conninfo_lists_every_port() {
        let t = |p| Target {
            name: format!("n{p}"),
            port: p,
        };
        let c = read_write_conninfo(&[t(1), t(2)]);
        assert!(c.starts_with("host=127.0.0.1,127.0.0.1 port=1,2 "), "{c}");
        assert!(c.contains("target_session_attrs=read-write"));
    }
}
