//! The watchdog lab: QEMU TCG guests booting Debian's own kernel with real
//! watchdogs (the emulated Intel 6300ESB and/or softdog), so a test can see a
//! node really being reset, timestamped on the host by QMP.
//!
//! ```no_run
//! use leasedog_testbed::lab::{Guest, GuestSpec, SoftdogOpts, Watchdogs};
//! use std::time::Duration;
//! let g = Guest::boot(GuestSpec {
//!     watchdogs: Watchdogs { i6300esb: true, softdog: Some(SoftdogOpts { margin: 3, nowayout: false }) },
//!     ..GuestSpec::default()
//! }).unwrap();
//! let dev = g.watchdog("Software Watchdog").unwrap().dev.clone();
//! g.run(&format!("exec 3>{dev}; echo 1 >&3"), Duration::from_secs(10)).unwrap();
//! let reset = g.wait_reset(Duration::from_secs(30)).expect("no reset");
//! println!("reset at host boottime {:?}", reset.boottime);
//! ```

pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod proc;
pub mod qmp;

pub use guest::{
    shell_quote, Effect, Guest, GuestSpec, GuestWatchdog, RunOutput, SoftdogOpts, Spawned,
    WatchdogAction, Watchdogs,
};
pub use kernel::Kernel;
pub use proc::{host_boottime, realtime_to_boottime, spawn_tied, ChildGuard};
pub use qmp::{Qmp, QmpEvent};
