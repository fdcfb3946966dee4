//! `leasedog test-watchdog --device DEV`: arms a device and stops pinging
//! it, after a typed confirmation; the machine must reset.

use crate::config::DeviceSpec;
use crate::timing::Budget;
use std::path::PathBuf;
use std::time::Duration;

/// Arms `device` with `timeout`, then never pings it. If the machine is
/// still up `timeout + TEST_GRACE` later, the watchdog does not work.
pub const TEST_GRACE: Duration = Duration::from_secs(5);

pub(super) fn test_watchdog(device: &str, timeout: u32, yes: bool) -> i32 {
    let spec = if device == "softdog" {
        DeviceSpec::Softdog
    } else {
        DeviceSpec::Device {
            path: PathBuf::from(device),
        }
    };
    if timeout == 0 {
        eprintln!("leasedog: --timeout must be at least 1 s");
        return 2;
    }
    println!(
        "This arms {device} with a {timeout} s timeout and stops pinging it.\n\
         If the watchdog works, THIS MACHINE WILL BE RESET about {timeout} s from now,\n\
         without shutting anything down. Stop PostgreSQL and anything else first."
    );
    if !yes {
        println!("Type Proceed to continue:");
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() || line.trim() != "Proceed" {
            println!("not confirmed; nothing armed");
            return 2;
        }
    }
    // A budget whose target timeout is exactly `timeout`.
    let budget = match Budget::new(
        Duration::from_secs(timeout as u64 + 1),
        Duration::from_secs(1),
        Duration::from_millis(500),
        Duration::from_millis(100),
        Duration::from_millis(100),
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("leasedog: {e}");
            return 2;
        }
    };
    let roots = crate::watchdog::SysRoots::real();
    let dog = match crate::watchdog::arm(
        &spec,
        &budget,
        crate::config::NowayoutPolicy::KeepPinging,
        &roots,
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("leasedog: cannot arm {device}: {e}");
            return 1;
        }
    };
    let armed_at = crate::clock::now();
    let w = dog.info().w_secs;
    println!(
        "armed {} ({}), W = {w} s read back, nowayout = {}; no more pings. Reset expected at +{w} s.",
        dog.info().path.display(),
        dog.info().identity,
        dog.info().nowayout
    );
    let limit = Duration::from_secs(w as u64) + TEST_GRACE;
    loop {
        let since = crate::clock::now().saturating_since(armed_at);
        if since >= limit {
            break;
        }
        println!("+{:.0} s", since.as_secs_f64());
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "FAILED: the machine is still up {:.0} s after arming ({w} s timeout + {} s grace): \
         the watchdog did not reset it",
        limit.as_secs_f64(),
        TEST_GRACE.as_secs()
    );
    match dog.disarm() {
        Ok(()) => println!("the device was disarmed (magic close)"),
        Err(e) => println!("the device could not be disarmed: {e}"),
    }
    1
}
