//! Guest probe for tests/watchdog.rs (`a_clean_disarm_under_systemd_takes_the_device_out_of_the_fd_store_first`):
//! run by systemd as the unit's main process, it arms softdog through
//! `watchdog::arm` (which puts a duplicate into systemd's fd store), pings
//! once, disarms through `Watchdog::disarm` (FDSTOREREMOVE=1 + BARRIER=1,
//! then the magic close) and prints what sysfs says, one `PROBE` line each.
//! Then it stays up past `W`, so a timer the disarm failed to stop fires.

use leasedog::config::{DeviceSpec, NowayoutPolicy};
use leasedog::timing::Budget;
use leasedog::watchdog::{self, SysRoots};
use std::time::Duration;

fn main() {
    let s = Duration::from_secs;
    let budget = Budget::new(
        s(9),
        s(1),
        Duration::from_millis(500),
        Duration::from_millis(100),
        Duration::from_millis(100),
    )
    .expect("budget");
    let state = || {
        std::fs::read_to_string("/sys/class/watchdog/watchdog0/state")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mut dog = match watchdog::arm(
        &DeviceSpec::Softdog,
        &budget,
        NowayoutPolicy::Refuse,
        &SysRoots::real(),
    ) {
        Ok(d) => d,
        Err(e) => {
            println!("PROBE armed: FAIL {e}");
            std::process::exit(1);
        }
    };
    println!(
        "PROBE armed: ok W = {} state {}",
        dog.info().w_secs,
        state()
    );
    std::thread::sleep(s(2));
    println!("PROBE ping: {:?}", dog.ping());
    match dog.disarm() {
        Ok(()) => println!("PROBE disarm: ok state {}", state()),
        Err(e) => println!("PROBE disarm: FAIL {e} state {}", state()),
    }
    std::thread::sleep(s(12));
    println!("PROBE done: ok");
}
