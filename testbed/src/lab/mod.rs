//! The watchdog lab: QEMU TCG guests booting Debian's own kernel with real
//! watchdogs (the emulated Intel 6300ESB and/or softdog), so a test can see a
//! node really being reset, timestamped on the host by QMP.
//!
//! - [`Kernel::get`] fetches `linux-image-amd64`'s versioned package once
//!   (`apt-get download`, `dpkg -x`), keeps the kernel (also as an
//!   uncompressed `vmlinux` for a fast PVH boot) and the needed modules in
//!   `$LEASEDOG_LAB_CACHE` (default `<workspace>/.lab-cache`).
//! - [`Guest::boot`] builds the initramfs (busybox + modules, cached), starts
//!   `qemu-system-x86_64 -accel tcg` and waits for the control shell.
//!   Inside, the host's root is mounted read-only over 9p under a tmpfs
//!   overlay and is the guest's `/`: host binaries run at their host paths
//!   (e.g. `env!("CARGO_BIN_EXE_leasedog")` as is), and host files,
//!   including ones the test writes into a host temp folder after boot, are
//!   readable at their host paths (a cheap way to pass big files: write on
//!   the host, `cp` in the guest). Guest writes land in the overlay's tmpfs
//!   and never reach the host. `/run` is a fresh tmpfs (`/run/lab` holds
//!   the control files and busybox). The host's 127.0.0.1:P is 10.0.2.2:P
//!   in the guest.
//! - [`Guest::run`] / [`Guest::act`] / [`Guest::spawn`] / [`Guest::kill`] /
//!   [`Guest::write_file`] act through a shell on the guest's second serial
//!   port (~50 ms per round trip when idle).
//! - [`Guest::qmp`] gives QEMU's side: [`Qmp::set_link`], `stop`/`cont`,
//!   and every event with its host time. [`Guest::wait_reset`] /
//!   [`Guest::reset_time`] give the reset: `WATCHDOG` (i6300esb) or
//!   `SHUTDOWN {guest: true, reason: "guest-reset"}` (softdog). A kernel
//!   panic (`panic=-1`) also shows as a guest reset: check
//!   [`Guest::console_log`] for `softdog: Initiating system reboot`.
//! - Host times are CLOCK_BOOTTIME as `Duration` ([`host_boottime`]); guest
//!   times are converted with [`Guest::guest_to_host`].
//! - [`scenario`] runs leasedog itself in guests against a host etcd and
//!   measures each fencing scenario on the host clock (reset, key deletion,
//!   new leader); `tests/lab_scenarios.rs` and the `leasedog-lab` binary
//!   (`bench`, `demo`) use it. [`GuestSpec::rw_shares`] keeps a guest's
//!   audit folder on the host across its reset; [`GuestSpec::reboot`] with
//!   [`Guest::wait_rebooted`] lets the same QEMU boot it again.
//! - [`systemd`] boots systemd 252 as PID 1 instead (the shipped
//!   `leasedog.service`, a drop-in, a driver script): its fd store tests
//!   (`tests/watchdog.rs`) and scenario 5 with the agent as a service
//!   ([`systemd::kill_trial`], `leasedog-lab systemd-kill`, tests/lab_systemd.rs).
//! - [`pg`] is the whole promise end to end (issue 14): PostgreSQL 15 under
//!   leasedog in a guest with a real watchdog, a host node as its
//!   synchronous standby, clients recording a history ([`crate::clients`])
//!   checked by [`crate::history`]; `tests/lab_postgres.rs` and
//!   `leasedog-lab pg` use it.
//! - Dropping a [`Guest`] kills QEMU's process group; QEMU also gets SIGKILL
//!   if the test process dies. `LEASEDOG_LAB_KEEP=1` keeps the guest's temp
//!   folder (console.log, qemu.log).
//!
//! ```no_run
//! use leasedog_testbed::lab::{Guest, GuestSpec, SoftdogOpts, Watchdogs};
//! use std::time::Duration;
//! let g = Guest::boot(GuestSpec {
//!     watchdogs: Watchdogs {
//!         i6300esb: true,
//!         i6300esb_nowayout: false,
//!         softdog: Some(SoftdogOpts { margin: 3, nowayout: false }),
//!     },
//!     ..GuestSpec::default()
//! })
//! .unwrap();
//! let dev = g.watchdog("Software Watchdog").unwrap().dev.clone();
//! let armed = g.act(&format!("exec 3>{dev}; echo 1 >&3; sleep 1000 >&3 &")).unwrap();
//! let reset = g.wait_reset(Duration::from_secs(30)).expect("no reset");
//! println!("reset {:?} after arming", reset.boottime - armed.host);
//! ```

pub mod deb;
pub mod gate;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod pg;
pub mod proc;
pub mod qmp;
pub mod reboot;
pub mod scenario;
pub mod second;
pub mod systemd;

pub use guest::{
    shell_quote, Effect, Guest, GuestSpec, GuestWatchdog, RunOutput, SoftdogOpts, Spawned,
    WatchdogAction, Watchdogs,
};
pub use kernel::Kernel;
pub use proc::{host_boottime, realtime_to_boottime, spawn_tied, ChildGuard};
pub use qmp::{Qmp, QmpEvent};
