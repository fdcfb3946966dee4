//! Scenario 5 (stalled, then killed) with the agent run by systemd 252 as
//! PID 1, as shipped: `leasedog run` under `leasedog.service` (its
//! `FileDescriptorStoreMax=16`, `Restart=on-failure`, `RestartSec=` T) in a
//! QEMU guest with a real i6300esb, against a real etcd on the host and a
//! host replica. The fd store keeps the kill from being the last close of
//! the armed device, so the node resets `W` after the last permitted ping,
//! before the lease expires, not `W` after the kill. `leasedog-lab
//! systemd-kill` runs many trials. A TCG guest, about 30 s.

#![cfg(feature = "testing")]

use leasedog_testbed::lab::scenario::{Dog, Lab, R, W};
use leasedog_testbed::lab::systemd::{kill_trial, KillOpts};
use std::path::Path;
use std::time::Duration;

/// The ordering that matters: stall, kill, reset (with no "watchdog did not
/// stop!": nothing pinged), the key's deletion more than R later, then the
/// replica's key. The kill comes 1.5 s after the stall here (the benchmark
/// uses 2.56 s) so that it lands before the reset (due about W after the
/// stall) even on a loaded machine; without the store the reset would then
/// come W after the kill, 4.5 s after the stall, within R of the key's
/// expiry about 5 s after it.
#[test]
fn a_stalled_then_killed_agent_under_systemd_resets_more_than_r_before_its_key_expires() {
    let lab =
        Lab::start(Path::new(env!("CARGO_BIN_EXE_leasedog"))).unwrap_or_else(|e| panic!("{e}"));
    let t = kill_trial(
        &lab,
        KillOpts {
            kill_after: Duration::from_millis(1500),
            ..KillOpts::new(Dog::I6300esb, true)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", t.summary());
    for n in &t.notes {
        eprintln!("  note: {n}");
    }
    let ctx = || format!("{}\n--- console ---\n{}", t.summary(), t.console);
    assert!(
        t.notes.iter().any(|n| n.contains("store 1")),
        "systemd did not hold the armed device before the stall: {}",
        ctx()
    );
    let reset = t
        .reset
        .as_ref()
        .unwrap_or_else(|| panic!("no reset: {}", ctx()))
        .1;
    let killed = t
        .killed_at
        .unwrap_or_else(|| panic!("never killed: {}", ctx()));
    assert!(
        t.stopped_at < killed && killed < reset,
        "not stall < kill < reset: {}",
        ctx()
    );
    assert!(
        t.did_not_stop.is_none(),
        "the kill's close pinged the device: {}",
        ctx()
    );
    // W after the last ping, which is at most M - R after the last renewal:
    // well before W after the kill (generous for a loaded 2-core machine).
    let after_stall = t.reset_after_stall().unwrap();
    assert!(
        after_stall < (W + Duration::from_millis(1400)).as_secs_f64(),
        "reset {after_stall:.3} s after the stall: {}",
        ctx()
    );
    let slack = t
        .slack()
        .unwrap_or_else(|| panic!("the key was not deleted: {}", ctx()));
    assert!(
        slack > R.as_secs_f64(),
        "slack {slack:.3} s <= R: {}",
        ctx()
    );
    let new_leader = t
        .new_leader
        .unwrap_or_else(|| panic!("no new leader: {}", ctx()));
    assert!(
        new_leader > reset,
        "the replica led before the reset: {}",
        ctx()
    );
}
