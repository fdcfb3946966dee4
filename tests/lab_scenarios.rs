//! The project's central claim on real kernel watchdogs: leasedog in QEMU
//! guests against a real etcd on the host; a fault hits the leader, and the
//! host's clock shows the guest reset (or stepped down) at least R before
//! etcd deleted its leader key. One trial per scenario (the benchmark,
//! `leasedog-lab bench`, runs many). Timings print with --nocapture.

use leasedog_testbed::lab::scenario::{
    self, audit_records, first_event, run_trial, setup_leader, Dog, Fault, Lab, NodeOpts, Trial,
    GUEST_NODE, HOST_NODE, R,
};
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasedog");

fn lab() -> Lab {
    Lab::start(Path::new(BIN)).unwrap_or_else(|e| panic!("{e}"))
}

fn trial(fault: Fault, dog: Dog, reboot: bool) -> (Lab, Trial) {
    let lab = lab();
    let t = run_trial(&lab, fault, dog, reboot).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", t.summary());
    for n in &t.notes {
        eprintln!("  note: {n}");
    }
    (lab, t)
}

/// The reset came after the fault, the key was deleted after the reset by
/// more than R, and the host replica took the key after that.
fn assert_fenced(t: &Trial) {
    let reset = t.reset.as_ref().expect("a reset").1;
    assert!(reset > t.fault_at, "reset before the fault: {t:?}");
    let deleted = t.key_deleted.expect("the key was deleted");
    let slack = t.slack().unwrap();
    assert!(
        slack > R.as_secs_f64(),
        "slack {slack:.3} s <= R: reset at {reset:?}, key deleted at {deleted:?}: {t:?}"
    );
    let new = t.new_leader.expect("the host replica took the key");
    assert!(new >= deleted, "{t:?}");
}

/// Scenario 1, and the audit after a reset: SIGSTOP the leader's agent; the
/// i6300esb resets the guest (the same QEMU reboots it), etcd deletes the
/// key more than R later, the host replica takes it. The rebooted guest's
/// agent starts on the same audit folder: its start-up record has a new
/// boot id, names the previous boot and the device's watchdog reset, and
/// `leasedog audit timeline` calls the change of leader FENCED-BY-RESET.
#[test]
fn s1_stalled_agent_is_reset_before_its_lease_expires() {
    let (_lab, t) = trial(Fault::Stall, Dog::I6300esb, true);
    assert_fenced(&t);
    assert!(t.reset.as_ref().unwrap().0.starts_with("WATCHDOG"), "{t:?}");
    let (code, text) = t.audit_timeline.clone().expect("timeline ran");
    eprintln!("{text}");
    assert!(text.contains("FENCED-BY-RESET"), "{text}");
    assert_eq!(code, 0, "{text}");
    if let Ok(dir) = std::env::var("LEASEDOG_LAB_AUDIT_EXAMPLE") {
        std::fs::write(dir, &text).unwrap();
    }
}
