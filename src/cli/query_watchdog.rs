//! `leasedog query-watchdog`: the watchdog devices from sysfs; nothing is
//! opened unless `--open` names one.

use std::path::PathBuf;

pub(super) fn query_watchdog(open: Option<PathBuf>, force: bool, json: bool) -> i32 {
    let roots = super::sysroots();
    let reports = match open {
        None => crate::watchdog::query(&roots),
        Some(path) => {
            eprintln!(
                "leasedog: opening {} ARMS it; it will be closed with the magic 'V'.",
                path.display()
            );
            match crate::watchdog::query_open(&path, &roots, force) {
                Ok(r) => vec![r],
                Err(e) => {
                    eprintln!("leasedog: {e}");
                    return 1;
                }
            }
        }
    };
    if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("leasedog: {e}");
                return 1;
            }
        }
    } else if reports.is_empty() {
        println!("no watchdog devices in /sys/class/watchdog");
    } else {
        print!("{}", crate::watchdog::render_table(&reports));
    }
    0
}
