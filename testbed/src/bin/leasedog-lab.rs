//! The watchdog lab's command line.
//!
//! - `leasedog-lab bench [--trials N] [--scenarios 1,2,3,4,5] [--json PATH]`:
//!   runs each fencing scenario N times (a fresh guest per trial, the
//!   watchdog alternating between the i6300esb and softdog) and prints the
//!   fencing slack (key deleted - reset, or - step-down for the network cut)
//!   as median [min-max], the trials with slack <= R (must be 0), the
//!   failover time and the lab's own costs.
//! - `leasedog-lab pause [--trials N] [--seconds P]`: freezes the leader
//!   guest (QMP `stop`) for P seconds (default 2T = 10), resumes it, and
//!   prints how long it went on believing it led after the resume, the
//!   overlap with the replica's leadership (its pings stop before its
//!   step-down) and whether its watchdog fired (a VM pause is a limit of any lease).
//! - `leasedog-lab systemd-kill [--trials N] [--fdstore on|off|both] [--observe-restart]`:
//!   scenario 5 (stalled, then killed) with the agent run by systemd 252 as
//!   PID 1 under the shipped unit, with its fd store (`on`, the default) or
//!   without (`FileDescriptorStoreMax=0`); prints the slack, the stall ->
//!   reset time, whether the kernel's close pinged the device ("watchdog did
//!   not stop!") and whether the restarted agent ran before the reset. With
//!   `--observe-restart`, softdog only, with `soft_noboot=1`: the guest
//!   survives the expiry, and the restarted agent's log and any later
//!   firing of the handed-back device are printed.
//! - `leasedog-lab pg [--trials N] [--faults KIND,...] [--async] [--standby host|guest] [--json PATH]`:
//!   the whole promise end to end (issue 14, `lab::pg`): leasedog with
//!   PostgreSQL 15 in a guest with a real watchdog (i6300esb and softdog
//!   alternating), a host node as its synchronous standby, clients on the
//!   host recording a history; one fault per trial (default `stall` and
//!   `stall-all`; `switchover` is the planned one, run with the real CLI);
//!   prints failover time (fault -> new primary writable), writer gap, the history checker's double-writable and lost
//!   acknowledged inserts, the audit timeline's verdicts and the wall time
//!   per trial; writes every history and verdict to PATH (default
//!   `target/lab-pg.json`). KIND is one of `lab::pg::PgFault`'s names.
//!   `--async`: both nodes with `synchronous_mode = false` (here and in
//!   `matrix`): the lost acknowledged inserts are counted, not unmet.
//!   `--standby guest`: the standby is a second guest with the other
//!   watchdog (softdog for an i6300esb leader, and the reverse) instead of
//!   the host node (`lab::second`).
//! - `leasedog-lab reboot [--trials N]`: reset-then-reboot (issue 11,
//!   `lab::reboot`): the leader guest, PostgreSQL run by the agent under the
//!   shipped unit in systemd 252, is partitioned from etcd, reset by its
//!   i6300esb and rebooted while a host node takes the key; prints cut ->
//!   reset, the slack, reset -> second boot -> first accepted connection ->
//!   rejoin, whether the first answer was read-only and the INSERTs
//!   acknowledged after the reset (must be 0).
//! - `leasedog-lab matrix [--faults N] [--kinds KIND,...] [--async] [--standby host|guest] [--json PATH]`: the
//!   fault matrix (issue 14): N faults (default 100) round-robin over the
//!   kinds (default all twelve), the watchdog alternating by round; the
//!   same figures per kind plus resets and trials that broke the kind's
//!   expectation (`PgTrial::failures`), the table after every round, every
//!   trial to PATH (default `target/lab-matrix.json`) as it ends.
//! - `leasedog-lab demo`: an etcd on the host, then (1) two guests running
//!   leasedog; the leader is stalled, its watchdog resets it, the other
//!   guest takes the key; a host-clock timeline and the audit's verdict;
//!   (2) one `lab::pg` trial (stall, i6300esb) and its writer's view
//!   (`testbed::view`). Exits non-zero on a fence not proven (slack <= R,
//!   an audit verdict other than FENCED-BY-RESET), a double-writable
//!   instant, a lost acknowledged insert or a trial that broke its fault's
//!   expectations.
//!
//! The agent is `$LEASEDOG_BIN`, else `leasedog` next to this binary; it
//! must be built with `--features testing` (scenario 2's fault hook).

use leasedog_testbed::etcd::EventKind;
use leasedog_testbed::lab::pg::{run_pg_trial, run_pg_trial_with, PgFault, PgLab, PgTrial};
use leasedog_testbed::lab::scenario::{self, holder, run_trial, Dog, Fault, Lab, NodeOpts, R};
use leasedog_testbed::lab::second::Standby;
use leasedog_testbed::lab::Kernel;
use leasedog_testbed::view;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LEASEDOG_BIN") {
        return PathBuf::from(p);
    }
    // Next to this binary (same profile), else the workspace's debug build
    // (`cargo build --features testing`, as scripts/demo.sh does).
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("leasedog")));
    let debug = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/leasedog");
    match sibling {
        Some(s) if s.is_file() && scenario::check_testing_build(&s).is_ok() => s,
        _ => debug,
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: leasedog-lab bench [--trials N] [--scenarios 1,2,3,4,5] [--json PATH]\n       \
         leasedog-lab pause [--trials N] [--seconds P]\n       \
         leasedog-lab systemd-kill [--trials N] [--fdstore on|off|both] [--observe-restart]\n       \
         leasedog-lab pg [--trials N] [--faults KIND,...] [--async] [--standby host|guest] [--json PATH]\n       \
         leasedog-lab reboot [--trials N]\n       \
         leasedog-lab matrix [--faults N] [--kinds KIND,...] [--async] [--standby host|guest] [--json PATH]\n       \
         leasedog-lab demo"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("demo") => demo(),
        Some("pause") => pause(&args[1..]),
        Some("systemd-kill") => systemd_kill(&args[1..]),
        Some("pg") => pg(&args[1..]),
        Some("reboot") => reboot(&args[1..]),
        Some("matrix") => matrix(&args[1..]),
        _ => usage(),
    }
}

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some((med, s[0], s[n - 1]))
}

fn fmt_stats(v: &[f64]) -> String {
    stats(v).map_or("-".into(), |(m, lo, hi)| {
        format!("{m:.2} [{lo:.2}-{hi:.2}]")
    })
}

fn bench(args: &[String]) -> ExitCode {
    let mut trials = 20usize;
    let mut scenarios = vec![1u8, 2, 3, 4];
    let mut json_path = PathBuf::from("target/lab-bench.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) => trials = n,
                None => return usage(),
            },
            "--scenarios" => {
                let Some(v) = it.next() else { return usage() };
                scenarios = match v.split(',').map(|x| x.trim().parse()).collect() {
                    Ok(s) => s,
                    Err(_) => return usage(),
                };
            }
            "--json" => match it.next() {
                Some(p) => json_path = PathBuf::from(p),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    let faults: Vec<Fault> = match scenarios.iter().map(|&n| Fault::from_number(n)).collect() {
        Some(f) => f,
        None => {
            eprintln!("leasedog-lab: scenarios are 1-5");
            return ExitCode::from(2);
        }
    };
    let bin = agent_bin();
    eprintln!("agent: {}", bin.display());
    let k = match Kernel::get() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("leasedog-lab: kernel: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "kernel {} ({} cache, {:.1} s)",
        k.release,
        if k.fetched_cold { "cold" } else { "warm" },
        k.fetch_time.as_secs_f64()
    );
    let lab = match Lab::start(&bin) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("leasedog-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut all = Vec::new();
    let mut rows = Vec::new();
    let mut bad = false;
    for &f in &faults {
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for i in 0..trials {
            let dog = if i % 2 == 0 {
                Dog::I6300esb
            } else {
                Dog::Softdog
            };
            match run_trial(&lab, f, dog, false) {
                Ok(t) => {
                    eprintln!("[{}/{trials}] {}", i + 1, t.summary());
                    all.push(t.to_json());
                    done.push(t);
                }
                Err(e) => {
                    let first = e.lines().next().unwrap_or("").to_string();
                    eprintln!(
                        "[{}/{trials}] scenario {} ({}) FAILED: {first}",
                        i + 1,
                        f.number(),
                        dog.name()
                    );
                    all.push(json!({"scenario": f.number(), "watchdog": dog.name(), "error": e}));
                    errors.push(e);
                }
            }
        }
        let slack: Vec<f64> = done.iter().filter_map(|t| t.slack()).collect();
        let unfenced = done
            .iter()
            .filter(|t| t.slack().is_none_or(|s| s <= R.as_secs_f64()))
            .count();
        let failover: Vec<f64> = done.iter().filter_map(|t| t.failover()).collect();
        let boot: Vec<f64> = done.iter().map(|t| t.boot.as_secs_f64()).collect();
        let wall: Vec<f64> = done.iter().map(|t| t.wall.as_secs_f64()).collect();
        let resets = done.iter().filter(|t| t.reset.is_some()).count();
        bad |= unfenced > 0 || !errors.is_empty();
        rows.push((
            f,
            done.len(),
            errors.len(),
            slack,
            unfenced,
            failover,
            boot,
            wall,
            resets,
        ));
    }
    let total = started.elapsed();
    println!();
    println!(
        "fencing slack = key deleted - reset (scenario 3: - step-down), host CLOCK_BOOTTIME; \
         T = 5 s, M = 2 s, R = {} s, W = 3 s; seconds, median [min-max]",
        R.as_secs()
    );
    println!(
        "{:<34} {:>6} {:>20} {:>9} {:>20} {:>7} {:>18} {:>18}",
        "scenario",
        "trials",
        "slack",
        "slack<=R",
        "fault->new leader",
        "resets",
        "guest boot",
        "wall per trial"
    );
    let mut summary = Vec::new();
    for (f, n, errs, slack, unfenced, failover, boot, wall, resets) in &rows {
        println!(
            "{:<34} {:>6} {:>20} {:>9} {:>20} {:>7} {:>18} {:>18}",
            format!("{} {}", f.number(), f.title()),
            if *errs > 0 {
                format!("{n}+{errs}err")
            } else {
                n.to_string()
            },
            fmt_stats(slack),
            unfenced,
            fmt_stats(failover),
            resets,
            fmt_stats(boot),
            fmt_stats(wall),
        );
        summary.push(json!({
            "scenario": f.number(), "title": f.title(), "trials": n, "errors": errs,
            "slack_s": stats(slack).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
            "slack_le_r": unfenced,
            "failover_s": stats(failover).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
            "resets": resets,
            "boot_s": stats(boot).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
            "wall_s": stats(wall).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
        }));
    }
    println!("total wall time {:.0} s", total.as_secs_f64());
    let doc = json!({
        "budget": {"ttl_s": 5, "margin_s": 2, "reset_allowance_s": R.as_secs(), "w_s": 3},
        "kernel": k.release,
        "total_wall_s": total.as_secs_f64(),
        "summary": summary,
        "trials": all,
    });
    if let Some(d) = json_path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    match std::fs::write(&json_path, serde_json::to_string_pretty(&doc).unwrap()) {
        Ok(()) => println!("wrote {}", json_path.display()),
        Err(e) => eprintln!("leasedog-lab: {}: {e}", json_path.display()),
    }
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn pg(args: &[String]) -> ExitCode {
    let mut trials = 4usize;
    let mut faults = vec![PgFault::Stall, PgFault::StallAll];
    let mut opts = PlanOpts::new("lab-pg.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) => trials = n,
                None => return usage(),
            },
            "--faults" => match it.next().and_then(|v| parse_kinds(v)) {
                Some(f) => faults = f,
                None => return kinds_error(),
            },
            other => {
                if !opts.take(other, &mut it) {
                    return usage();
                }
            }
        }
    }
    // Each round runs every fault once, the watchdog alternating by round.
    let plan: Vec<(PgFault, Dog)> = (0..trials)
        .flat_map(|i| faults.iter().map(move |&f| (f, dog_of_round(i))))
        .collect();
    run_pg_plan(&faults, &plan, false, &opts)
}

/// The options `pg` and `matrix` share: `--json PATH`, `--async`,
/// `--standby host|guest`.
struct PlanOpts {
    json_path: PathBuf,
    /// Both nodes' `synchronous_mode` (off with `--async`).
    synchronous: bool,
    /// The standby is a second guest with the other watchdog.
    guest_standby: bool,
}

impl PlanOpts {
    fn new(json_file: &str) -> PlanOpts {
        PlanOpts {
            json_path: workspace_target(json_file),
            synchronous: true,
            guest_standby: false,
        }
    }

    /// Takes `arg` (and its value from `rest`); false if it is none of
    /// these options or its value is missing or unknown.
    fn take<'a>(&mut self, arg: &str, rest: &mut impl Iterator<Item = &'a String>) -> bool {
        match arg {
            "--json" => match rest.next() {
                Some(p) => self.json_path = PathBuf::from(p),
                None => return false,
            },
            "--async" => self.synchronous = false,
            "--standby" => match rest.next().map(String::as_str) {
                Some("host") => self.guest_standby = false,
                Some("guest") => self.guest_standby = true,
                _ => return false,
            },
            _ => return false,
        }
        true
    }
}

/// `leasedog-lab matrix [--faults N] [--kinds a,b] [--json PATH]`: N faults
/// round-robin over the kinds, the watchdog alternating by round; the table
/// after every round.
fn matrix(args: &[String]) -> ExitCode {
    let mut n = 100usize;
    let mut kinds = PgFault::ALL.to_vec();
    let mut opts = PlanOpts::new("lab-matrix.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--faults" => match it.next().and_then(|v| v.parse().ok()) {
                Some(x) => n = x,
                None => return usage(),
            },
            "--kinds" => match it.next().and_then(|v| parse_kinds(v)) {
                Some(f) => kinds = f,
                None => return kinds_error(),
            },
            other => {
                if !opts.take(other, &mut it) {
                    return usage();
                }
            }
        }
    }
    let plan: Vec<(PgFault, Dog)> = (0..n)
        .map(|i| (kinds[i % kinds.len()], dog_of_round(i / kinds.len())))
        .collect();
    run_pg_plan(&kinds, &plan, true, &opts)
}

fn dog_of_round(i: usize) -> Dog {
    if i.is_multiple_of(2) {
        Dog::I6300esb
    } else {
        Dog::Softdog
    }
}

fn parse_kinds(v: &str) -> Option<Vec<PgFault>> {
    v.split(',').map(|x| PgFault::parse(x.trim())).collect()
}

fn kinds_error() -> ExitCode {
    eprintln!("leasedog-lab: fault kinds are {}", PgFault::names());
    ExitCode::from(2)
}

fn workspace_target(file: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    root.parent().unwrap_or(root).join("target").join(file)
}

/// Runs `plan` one trial at a time, writing every trial to `opts.json_path` as
/// it ends; prints the table at the end, and with `as_it_goes` after every
/// round of `kinds` too (a run cut short still gives its figures).
/// `synchronous`: both nodes' `synchronous_mode`; with `guest_standby` the
/// standby is a second guest with the other watchdog.
fn run_pg_plan(
    kinds: &[PgFault],
    plan: &[(PgFault, Dog)],
    as_it_goes: bool,
    opts: &PlanOpts,
) -> ExitCode {
    let PlanOpts {
        json_path,
        synchronous,
        guest_standby,
    } = opts;
    let (synchronous, guest_standby) = (*synchronous, *guest_standby);
    let bin = agent_bin();
    eprintln!("agent: {}", bin.display());
    let lab = match PgLab::start(&bin) {
        Ok(mut l) => {
            l.synchronous = synchronous;
            l
        }
        Err(e) => {
            eprintln!("leasedog-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let mut all = Vec::new();
    let mut done: Vec<PgTrial> = Vec::new();
    let mut errors: Vec<(PgFault, String)> = Vec::new();
    let write = |all: &Vec<serde_json::Value>, summary: serde_json::Value| {
        let doc = json!({
            "budget": {"ttl_s": 5, "margin_s": 2, "reset_allowance_s": R.as_secs(), "w_s": 3},
            "synchronous_mode": synchronous,
            "summary": summary,
            "trials": all,
        });
        if let Some(d) = json_path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = std::fs::write(json_path, serde_json::to_string_pretty(&doc).unwrap()) {
            eprintln!("leasedog-lab: {}: {e}", json_path.display());
        }
    };
    let total = plan.len();
    for (i, &(f, dog)) in plan.iter().enumerate() {
        let standby = if guest_standby {
            Standby::guest_for(dog)
        } else {
            Standby::Host
        };
        match run_pg_trial_with(&lab, &rt, f, dog, standby) {
            Ok(t) => {
                eprintln!("[{}/{total}] {}", i + 1, t.summary());
                for n in &t.notes {
                    eprintln!("  note: {n}");
                }
                for u in t.unproven() {
                    eprintln!("  unproven: {u}");
                }
                all.push(t.to_json());
                done.push(t);
            }
            Err(e) => {
                eprintln!(
                    "[{}/{total}] {} ({}) FAILED: {}",
                    i + 1,
                    f.name(),
                    dog.name(),
                    e.lines().next().unwrap_or("")
                );
                all.push(json!({"fault": f.name(), "watchdog": dog.name(), "error": e}));
                errors.push((f, e));
            }
        }
        let round_done = (i + 1).is_multiple_of(kinds.len()) && i + 1 < total;
        if as_it_goes && round_done {
            let (summary, _) = table(kinds, &done, &errors, started, synchronous);
            write(&all, summary);
        } else {
            write(&all, json!(null));
        }
    }
    let (summary, bad) = table(kinds, &done, &errors, started, synchronous);
    write(&all, summary);
    println!("wrote {}", json_path.display());
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints the per-fault table; returns its JSON and whether anything broke
/// a fault's expectations or the safety checks.
fn table(
    kinds: &[PgFault],
    done: &[PgTrial],
    errors: &[(PgFault, String)],
    started: Instant,
    synchronous: bool,
) -> (serde_json::Value, bool) {
    println!();
    println!(
        "end to end: PostgreSQL 15 ({}) under leasedog in a guest with a real watchdog, \
         the host node or a second guest (--standby) as its standby; T = 5 s, M = 2 s, R = 1 s, W = 3 s; seconds, median [min-max]; \
         {} trials, {} errors, {:.0} s so far",
        if synchronous {
            "synchronous"
        } else {
            "asynchronous: lost-ack is reported, not unmet"
        },
        done.len(),
        errors.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<12} {:>7} {:>7} {:>20} {:>20} {:>14} {:>8} {:>6} {:<44} {:>20}",
        "fault",
        "trials",
        "resets",
        "failover",
        "writer gap",
        "2-writ/out(ack)",
        "lost-ack",
        "unmet",
        "verdicts",
        "wall per trial"
    );
    let mut summary = Vec::new();
    let mut healed = Vec::new();
    let mut bad = !errors.is_empty();
    for &f in kinds {
        let ts: Vec<&PgTrial> = done.iter().filter(|t| t.fault == f).collect();
        let errs = errors.iter().filter(|e| e.0 == f).count();
        if ts.is_empty() && errs == 0 {
            continue;
        }
        let failover: Vec<f64> = ts.iter().filter_map(|t| t.failover()).collect();
        let after_heal: Vec<f64> = ts.iter().filter_map(|t| t.failover_after_heal()).collect();
        let gap: Vec<f64> = ts.iter().filter_map(|t| t.writer_gap).collect();
        let wall: Vec<f64> = ts.iter().map(|t| t.wall.as_secs_f64()).collect();
        if !after_heal.is_empty() {
            healed.push(format!("{} {}", f.name(), fmt_stats(&after_heal)));
        }
        let resets = ts.iter().filter(|t| t.reset.is_some()).count();
        let dw: usize = ts.iter().map(|t| t.double_writable()).sum();
        let sim: usize = ts.iter().map(|t| t.simultaneous()).sum();
        let dw_acked: usize = ts.iter().map(|t| t.acked_outside_term()).sum();
        let lost: usize = ts.iter().map(|t| t.lost_acked()).sum();
        let unmet = ts.iter().filter(|t| !t.failures().is_empty()).count();
        let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
        // Per watchdog: softdog keeps no boot status across a reset, so
        // the rebooted agent cannot report the reset and the auditor (rightly)
        // calls the change UNPROVEN; the i6300esb reports it.
        for t in &ts {
            let v = t.timeline_verdicts();
            if v.is_empty() {
                *verdicts
                    .entry(format!("{}:none", t.dog.name()))
                    .or_default() += 1;
            }
            for x in v {
                let word = x.split_whitespace().last().unwrap_or("").to_string();
                *verdicts
                    .entry(format!("{}:{word}", t.dog.name()))
                    .or_default() += 1;
            }
        }
        let vtext = verdicts
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        bad |= unmet > 0;
        println!(
            "{:<12} {:>7} {:>7} {:>20} {:>20} {:>14} {:>8} {:>6} {:<44} {:>20}",
            f.name(),
            if errs > 0 {
                format!("{}+{errs}e", ts.len())
            } else {
                ts.len().to_string()
            },
            resets,
            fmt_stats(&failover),
            fmt_stats(&gap),
            format!("{sim} / {dw} ({dw_acked})"),
            lost,
            unmet,
            vtext,
            fmt_stats(&wall),
        );
        summary.push(json!({
            "fault": f.name(), "trials": ts.len(), "errors": errs, "resets": resets,
            "expected": {"reset": f.expect().reset, "failover": f.expect().failover},
            "failover_s": stats(&failover).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
            "failover_after_heal_s": stats(&after_heal).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
            "writer_gap_s": stats(&gap).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
            "possibly_simultaneous": sim,
            "outside_term": dw,
            "outside_term_acked_writes": dw_acked,
            "lost_acked": lost,
            "unmet": unmet,
            "timeline_verdicts": verdicts,
            "wall_s": stats(&wall).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})),
        }));
    }
    println!(
        "failover = fault -> first observation of the standby writable; writer gap = the \
         per-insert read-write writer's longest wait between acknowledged inserts; 2-writ = \
         possibly two writable at one instant (changes of primary beyond etcd's, plus \
         writable observations outside a term overlapping another node's); out(ack) = \
         observations of a node writable outside its term (of which acknowledged writes); \
         lost-ack = acknowledged ids missing on the final primary; unmet = trials that broke \
         the fault's expectation (reset, failover) or a safety check"
    );
    if !healed.is_empty() {
        println!(
            "failover after the fault healed (no failover can start while etcd has no quorum; \
             its new leader renews every lease by T): {}",
            healed.join("; ")
        );
    }
    (json!(summary), bad)
}

fn pause(args: &[String]) -> ExitCode {
    let mut trials = 5usize;
    let mut secs = 2 * scenario::T.as_secs();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), v) {
            ("--trials", Some(n)) => trials = n as usize,
            ("--seconds", Some(n)) => secs = n,
            _ => return usage(),
        }
    }
    let bin = agent_bin();
    let lab = match Lab::start(&bin) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("leasedog-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut believed, mut overlap, mut resets, mut errors) =
        (Vec::new(), Vec::new(), 0usize, 0usize);
    for i in 0..trials {
        let dog = if i % 2 == 0 {
            Dog::I6300esb
        } else {
            Dog::Softdog
        };
        match scenario::pause_trial(&lab, dog, Duration::from_secs(secs)) {
            Ok(t) => {
                let b = t.believed_leader_for().map(|d| d.as_secs_f64());
                let o = t.overlap().map(|d| d.as_secs_f64());
                eprintln!(
                    "trial {i} ({}): believed it led {b:?} s after resume, overlap {o:?} s, \
                     reason {:?}, reset after resume {}, wall {:.1} s",
                    dog.name(),
                    t.step_down_reason,
                    t.reset_after_resume.is_some(),
                    t.wall.as_secs_f64()
                );
                believed.extend(b);
                overlap.extend(o);
                resets += usize::from(t.reset_after_resume.is_some());
            }
            Err(e) => {
                eprintln!("trial {i}: {e}");
                errors += 1;
            }
        }
    }
    println!(
        "\nVM pause for {secs} s at T = {} s, {trials} trials ({errors} failed):",
        scenario::T.as_secs()
    );
    println!("| resume -> old leader steps down | overlap with the new leader | watchdog reset after resume |");
    println!("|---|---|---|");
    println!(
        "| {} | {} | {resets} of {} |",
        fmt_stats(&believed),
        fmt_stats(&overlap),
        trials - errors
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn demo() -> ExitCode {
    match run_demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("leasedog-lab demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_demo() -> Result<bool, String> {
    let t0 = Instant::now();
    let bin = agent_bin();
    println!("leasedog demo, in two parts (about a minute on a 2-core machine):");
    println!(
        "  1. the mechanism: two QEMU guests (pg1, pg2) run leasedog with an emulated Intel \
         6300ESB\n     hardware watchdog each; pg1's agent is stalled, its watchdog resets it \
         before its lease\n     expires, pg2 takes the key;"
    );
    println!(
        "  2. the promise, with PostgreSQL 15: a guest (guest1) runs leasedog and the primary, \
         this machine\n     (host2) its synchronous standby; clients insert and probe all \
         along; guest1's agent is\n     stalled; what the clients saw, judged by the history \
         checker and the audit."
    );
    println!("Budget: T = 5 s lease, M = 2 s margin, R = 1 s reset allowance, W = T - M = 3 s.\n");
    let k = Kernel::get()?;
    println!(
        "kernel {} ready ({:.1} s)",
        k.release,
        k.fetch_time.as_secs_f64()
    );
    let plab = PgLab::start(&bin)?;
    println!("etcd listening on {}", plab.lab.etcd.client_url());

    println!("\n== 1. The mechanism: a stalled leader is reset before its lease expires ==\n");
    let (ok1, said1) = match mechanism(&plab.lab) {
        Ok(r) => r,
        Err(e) => {
            println!("part 1 could not run: {e}");
            (
                false,
                format!("could not run: {}", e.lines().next().unwrap_or("")),
            )
        }
    };

    println!("\n== 2. PostgreSQL under leasedog: a writer's view of the failover ==\n");
    let (ok2, said2) = match postgres(&plab) {
        Ok(r) => r,
        Err(e) => {
            println!("part 2 could not run: {e}");
            (
                false,
                format!("could not run: {}", e.lines().next().unwrap_or("")),
            )
        }
    };

    println!("\nDemo {}:", if ok1 && ok2 { "PASSED" } else { "FAILED" });
    println!("  1. {said1}");
    println!("  2. {said2}");
    println!("demo took {:.0} s", t0.elapsed().as_secs_f64());
    Ok(ok1 && ok2)
}

/// Part 2: one [`run_pg_trial`] (stall, i6300esb) and its writer's view.
/// Passes when the view finds no double-writable instant, no lost
/// acknowledged insert and the audit's FENCED-BY-RESET, and the trial met
/// its fault's expectations (`PgTrial::failures`).
fn postgres(plab: &PgLab) -> Result<(bool, String), String> {
    println!(
        "guest1: a QEMU guest with an i6300esb running leasedog and PostgreSQL 15, the primary;"
    );
    println!(
        "host2:  PostgreSQL 15 and leasedog on this machine, guest1's synchronous standby \
         (synchronous_mode = true);"
    );
    println!(
        "clients on this machine, each every 50-100 ms: a writer connecting per insert to \
         whichever node\ntakes a read-write session, a writer with a kept connection to each \
         node, and a probe asking\neach node pg_is_in_recovery(). After 3 s of writes, guest1's \
         agent is stopped (SIGSTOP)."
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let t = run_pg_trial(plab, &rt, PgFault::Stall, Dog::I6300esb)?;
    println!(
        "(set-up {:.1} s: guest boot {:.1} s, PostgreSQL in the guest {:.1} s, host2 \
         synchronous; the trial {:.1} s in all)\n",
        t.setup.as_secs_f64(),
        t.boot.as_secs_f64(),
        t.guest_pg_start.as_secs_f64(),
        t.wall.as_secs_f64()
    );
    let v = t.view();
    print!("{}", view::render(&v));
    for n in &t.notes {
        println!("note: {n}");
    }
    let mut bad = v.problems();
    let failures = t.failures();
    if !failures.is_empty() {
        println!("The trial broke its expectations: {}", failures.join(", "));
        bad.extend(failures);
    }
    let c = &t.verdict;
    let said = format!(
        "{}: host2 writable {} s after the stall, writer gap {} s; {} acknowledged inserts, {} \
         lost, {} double-writable instants; audit {}",
        if bad.is_empty() { "SAFE" } else { "NOT SAFE" },
        t.failover().map_or("-".into(), |f| format!("{f:.2}")),
        t.writer_gap.map_or("-".into(), |g| format!("{g:.2}")),
        c.writes_ok,
        c.lost_acked.len(),
        c.double_writable(),
        match t.timeline_verdicts().as_slice() {
            [] => "none".to_string(),
            vs => vs.join(", "),
        }
    );
    Ok((bad.is_empty(), said))
}

/// Part 1: two guests without PostgreSQL; pg1 leads, is stalled, reset by
/// its i6300esb before its lease expires; pg2 takes the key. Passes when
/// the reset came more than R before the expiry and pg2 took over.
fn mechanism(lab: &Lab) -> Result<(bool, String), String> {
    println!("two QEMU guests (pg1, pg2) running leasedog with an emulated Intel 6300ESB each.");
    let scope = lab.new_scope();
    let watch = lab.watch(&scope)?;
    // The same QEMU reboots pg1 after its reset, so its agent can start
    // again on its (host-shared) audit folder: the audit then proves the
    // fence on its own.
    let opts = NodeOpts {
        reboot: true,
        ..NodeOpts::new(Dog::I6300esb)
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| lab.boot_node("pg1", &opts));
        let b = s.spawn(|| lab.boot_node("pg2", &opts));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (mut pg1, mut pg2) = (a?, b?);
    println!(
        "guests booted: pg1 in {:.1} s, pg2 in {:.1} s (software emulation)",
        pg1.guest.boot_time().as_secs_f64(),
        pg2.guest.boot_time().as_secs_f64()
    );
    let cfg1 = lab.guest_config(&scope, &pg1, "keep-pinging")?;
    pg1.start_agent(&lab.bin, &cfg1)?;
    let won = watch
        .wait_for(
            |e| e.kind == EventKind::Put && holder(&e.value).as_deref() == Some("pg1"),
            Duration::from_secs(60),
        )
        .ok_or_else(|| format!("pg1 did not win the key:\n{}", pg1.agent_log()))?;
    if !pg1.wait_log("promoted (leader", Duration::from_secs(30)) {
        return Err(format!("pg1 did not promote:\n{}", pg1.agent_log()));
    }
    let cfg2 = lab.guest_config(&scope, &pg2, "keep-pinging")?;
    pg2.start_agent(&lab.bin, &cfg2)?;
    if !pg2.wait_log("connected to etcd", Duration::from_secs(30)) {
        return Err(format!("pg2's agent did not connect:\n{}", pg2.agent_log()));
    }
    let armed = pg1
        .audit()
        .iter()
        .filter(|r| r["event"] == "armed")
        .map(|r| {
            format!(
                "{} ({}) W = {} s",
                r["device"].as_str().unwrap_or("?"),
                r["identity"].as_str().unwrap_or("?"),
                r["w_s"]
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!("pg1 holds the leader key and armed {armed}; pg2 is a replica.");
    std::thread::sleep(Duration::from_secs(2));
    println!("\nStalling pg1's agent (kill -STOP inside the guest)...");
    let stall = pg1.guest.kill(pg1.pid()?, "STOP")?.host;
    let reset = pg1.guest.wait_reset(Duration::from_secs(30));
    let deleted = watch.wait_for(
        |e| e.kind == EventKind::Delete && e.boottime_ns >= stall.as_nanos() as u64,
        Duration::from_secs(30),
    );
    let newl = watch.wait_for(
        |e| {
            e.kind == EventKind::Put
                && e.boottime_ns >= stall.as_nanos() as u64
                && holder(&e.value).as_deref() == Some("pg2")
        },
        Duration::from_secs(30),
    );
    let rel = |ns: u64| ns as f64 / 1e9 - stall.as_secs_f64();
    println!("\nTimeline (host CLOCK_BOOTTIME, seconds after the stall):");
    println!(
        "  {:>+8.3}  pg1 won the leader key (etcd watch)",
        rel(won.boottime_ns)
    );
    println!("  {:>+8.3}  pg1's agent stalled (SIGSTOP took effect)", 0.0);
    println!(
        "  {:>8}  last ping: at the stall at the latest (the pinger is frozen with the agent)",
        "<= 0.000"
    );
    match &reset {
        Some(r) => println!(
            "  {:>+8.3}  pg1 RESET by its watchdog (QMP {} {})",
            rel(r.boottime_ns()),
            r.name,
            r.data
        ),
        None => println!("  (no reset within 30 s)"),
    }
    match &deleted {
        Some(d) => println!(
            "  {:>+8.3}  etcd deleted the leader key (pg1's lease expired)",
            rel(d.boottime_ns)
        ),
        None => println!("  (the key was not deleted within 30 s)"),
    }
    match &newl {
        Some(n) => println!("  {:>+8.3}  pg2 took the leader key", rel(n.boottime_ns)),
        None => println!("  (pg2 did not take the key within 30 s)"),
    }
    println!();
    let (fenced, slack) = match (&reset, &deleted) {
        (Some(r), Some(d)) => {
            let slack = (d.boottime_ns as f64 - r.boottime_ns() as f64) / 1e9;
            if slack > R.as_secs_f64() {
                println!(
                    "FENCED: pg1 was reset {slack:.3} s before its lease expired (> R = {} s).",
                    R.as_secs()
                );
                (true, Some(slack))
            } else {
                println!(
                    "NOT FENCED IN TIME: slack {slack:.3} s <= R = {} s.",
                    R.as_secs()
                );
                (false, Some(slack))
            }
        }
        _ => {
            println!("NOT PROVEN: missing reset or key deletion.");
            (false, None)
        }
    };
    if fenced && newl.is_none() {
        println!("(but pg2 did not take over: its log)\n{}", pg2.agent_log());
    }
    // The audit must prove the fence on its own: FENCED-BY-RESET.
    let mut audit = "not run".to_string();
    let mut audited = false;
    if reset.is_some() {
        println!("\npg1 reboots (the same QEMU); its agent starts again on the same audit log...");
        match audit_after_reboot(lab, &mut pg1, &pg2) {
            Ok((code, text)) => {
                println!(
                    "\n$ leasedog audit timeline --no-etcd pg1.audit.jsonl pg2.audit.jsonl   \
                     (exit {code})\n{text}"
                );
                let verdict = text
                    .lines()
                    .find(|l| l.starts_with("change at rev") && l.contains("pg1 -> pg2"))
                    .and_then(|l| l.split_whitespace().last())
                    .unwrap_or("none");
                audited = code == 0 && verdict == "FENCED-BY-RESET";
                audit = format!("pg1->pg2 {verdict} (exit {code})");
            }
            Err(e) => {
                println!("(audit after the reboot unavailable: {e})");
                audit = "unavailable".into();
            }
        }
    }
    let ok = fenced && newl.is_some() && audited;
    let said = format!(
        "{}: pg1 reset {} s before its lease expired (R = {} s), pg2 {} the key; audit {audit}",
        if ok { "FENCED" } else { "NOT FENCED" },
        slack.map_or("-".into(), |s| format!("{s:.3}")),
        R.as_secs(),
        if newl.is_some() {
            "took"
        } else {
            "did not take"
        },
    );
    Ok((ok, said))
}

/// After pg1's reset: waits for its reboot, starts its agent again, and
/// runs `leasedog audit timeline` over both nodes' logs: exit code, text.
fn audit_after_reboot(
    lab: &Lab,
    pg1: &mut scenario::Node,
    pg2: &scenario::Node,
) -> Result<(i32, String), String> {
    let up = pg1.guest.wait_rebooted(Duration::from_secs(90))?;
    let before = pg1.audit().len();
    let cfg =
        std::fs::read_to_string(pg1.share.join("leasedog.toml")).map_err(|e| e.to_string())?;
    pg1.start_agent(&lab.bin, &cfg)?;
    let t = Instant::now();
    let start = loop {
        if let Some(r) = pg1
            .audit()
            .into_iter()
            .skip(before)
            .find(|r| r["event"] == "startup")
        {
            break r;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("no start-up record:\n{}", pg1.agent_log()));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "pg1 back {:.1} s after the reset; its agent's start-up record: boot {}, previous boot {}, \
         watchdog reset reported by a device: {}",
        up.as_secs_f64(),
        start["boot_id"].as_str().unwrap_or("?"),
        start["previous_boot_id"].as_str().unwrap_or("none"),
        start["previous_boot_reset"]
    );
    scenario::audit_timeline(&lab.bin, &[pg1.audit_path(), pg2.audit_path()], None)
}

/// Scenario 5 under systemd (issue 10 item 3): `lab::systemd::kill_trial`.
fn systemd_kill(args: &[String]) -> ExitCode {
    use leasedog_testbed::lab::systemd::{kill_trial, KillOpts, KillTrial};
    let mut trials = 10usize;
    let mut modes = vec![true];
    let mut observe = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--observe-restart" {
            observe = true;
            continue;
        }
        match (a.as_str(), it.next().map(String::as_str)) {
            ("--trials", Some(n)) => match n.parse() {
                Ok(n) => trials = n,
                Err(_) => return usage(),
            },
            ("--fdstore", Some("on")) => modes = vec![true],
            ("--fdstore", Some("off")) => modes = vec![false],
            ("--fdstore", Some("both")) => modes = vec![true, false],
            _ => return usage(),
        }
    }
    let bin = agent_bin();
    eprintln!("agent: {}", bin.display());
    let lab = match Lab::start(&bin) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("leasedog-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut rows: Vec<(bool, Vec<KillTrial>, usize)> = Vec::new();
    for &fdstore in &modes {
        let (mut done, mut errors) = (Vec::new(), 0usize);
        for i in 0..trials {
            let dog = if i % 2 == 0 && !observe {
                Dog::I6300esb
            } else {
                Dog::Softdog
            };
            let opts = KillOpts {
                observe_restart: observe,
                ..KillOpts::new(dog, fdstore)
            };
            match kill_trial(&lab, opts) {
                Ok(t) => {
                    eprintln!("[{}/{trials}] {}", i + 1, t.summary());
                    for n in &t.notes {
                        eprintln!("    {n}");
                    }
                    if let Some(a) = &t.after_kill {
                        eprintln!("    after the kill: {a}");
                    }
                    done.push(t);
                }
                Err(e) => {
                    eprintln!("[{}/{trials}] {} FAILED: {e}", i + 1, dog.name());
                    errors += 1;
                }
            }
        }
        rows.push((fdstore, done, errors));
    }
    println!(
        "\nscenario 5 under systemd 252 (SIGSTOP, SIGKILL {:.2} s later; Restart=on-failure, \
         RestartSec={} s); slack = key deleted - reset, host CLOCK_BOOTTIME; T = 5 s, M = 2 s, \
         R = {} s, W = 3 s; seconds, median [min-max]",
        scenario::KILL_AFTER_STALL.as_secs_f64(),
        scenario::T.as_secs(),
        R.as_secs()
    );
    println!(
        "{:<10} {:>7} {:>20} {:>9} {:>20} {:>12} {:>20} {:>13} {:>16} {:>18}",
        "fd store",
        "trials",
        "slack",
        "slack<=R",
        "stall->reset",
        "kill<reset",
        "fault->new leader",
        "did not stop",
        "restart<reset",
        "wall per trial"
    );
    let mut bad = false;
    for (fdstore, done, errors) in &rows {
        let slack: Vec<f64> = done.iter().filter_map(KillTrial::slack).collect();
        let unfenced = done
            .iter()
            .filter(|t| t.slack().is_none_or(|s| s <= R.as_secs_f64()))
            .count();
        let reset: Vec<f64> = done
            .iter()
            .filter_map(KillTrial::reset_after_stall)
            .collect();
        let failover: Vec<f64> = done.iter().filter_map(KillTrial::failover).collect();
        let wall: Vec<f64> = done.iter().map(|t| t.wall.as_secs_f64()).collect();
        let pinged = done.iter().filter(|t| t.did_not_stop.is_some()).count();
        let restarted = done.iter().filter(|t| t.restarted_before_reset()).count();
        // A kill after the reset would test nothing.
        let killed_first = done.iter().filter(|t| t.killed_before_reset()).count();
        bad |= *errors > 0 || (*fdstore && unfenced > 0);
        println!(
            "{:<10} {:>7} {:>20} {:>9} {:>20} {:>12} {:>20} {:>13} {:>16} {:>18}",
            if *fdstore { "on (16)" } else { "off (0)" },
            if *errors > 0 {
                format!("{}+{errors}err", done.len())
            } else {
                done.len().to_string()
            },
            fmt_stats(&slack),
            unfenced,
            fmt_stats(&reset),
            format!("{killed_first} of {}", done.len()),
            fmt_stats(&failover),
            format!("{pinged} of {}", done.len()),
            format!("{restarted} of {}", done.len()),
            fmt_stats(&wall),
        );
    }
    println!("total wall time {:.0} s", started.elapsed().as_secs_f64());
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn reboot(args: &[String]) -> ExitCode {
    use leasedog_testbed::lab::reboot::{reboot_trial, RebootTrial};
    let mut trials = 3usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next().map(|n| n.parse::<usize>())) {
            ("--trials", Some(Ok(n))) => trials = n,
            _ => return usage(),
        }
    }
    let bin = agent_bin();
    eprintln!("agent: {}", bin.display());
    let lab = match Lab::start(&bin) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("leasedog-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let (mut done, mut errors) = (Vec::new(), 0usize);
    for i in 0..trials {
        match reboot_trial(&lab) {
            Ok(t) => {
                eprintln!("[{}/{trials}] {}", i + 1, t.summary());
                done.push(t);
            }
            Err(e) => {
                eprintln!("[{}/{trials}] FAILED: {e}", i + 1);
                errors += 1;
            }
        }
    }
    let col =
        |f: fn(&RebootTrial) -> Option<f64>| -> Vec<f64> { done.iter().filter_map(f).collect() };
    let read_only = done
        .iter()
        .filter(|t| t.first_answer_read_only() == Some(true))
        .count();
    let writes: usize = done.iter().map(|t| t.writes_after_reset().len()).sum();
    println!(
        "\nreset-then-reboot under systemd 252 (i6300esb, action reset; partitioned from etcd; \
         host CLOCK_BOOTTIME; T = 5 s, R = {} s; seconds, median [min-max])",
        R.as_secs()
    );
    println!(
        "{:<8} {:>18} {:>18} {:>18} {:>22} {:>18} {:>14} {:>16} {:>16}",
        "trials",
        "cut->reset",
        "slack",
        "reset->reboot",
        "reset->1st connection",
        "reset->rejoin",
        "1st read-only",
        "writes after",
        "wall per trial"
    );
    println!(
        "{:<8} {:>18} {:>18} {:>18} {:>22} {:>18} {:>14} {:>16} {:>16}",
        if errors > 0 {
            format!("{}+{errors}err", done.len())
        } else {
            done.len().to_string()
        },
        fmt_stats(&col(RebootTrial::cut_to_reset)),
        fmt_stats(&col(RebootTrial::slack)),
        fmt_stats(&col(RebootTrial::reset_to_reboot)),
        fmt_stats(&col(RebootTrial::reset_to_first_connection)),
        fmt_stats(&col(RebootTrial::reset_to_rejoin)),
        format!("{read_only} of {}", done.len()),
        writes,
        fmt_stats(
            &done
                .iter()
                .map(|t| t.wall.as_secs_f64())
                .collect::<Vec<_>>()
        ),
    );
    println!("total wall time {:.0} s", started.elapsed().as_secs_f64());
    if errors > 0 || writes > 0 || read_only < done.len() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
