//! The command line: `run`, `check`, `query-watchdog`.

pub fn main() -> i32 {
    eprintln!("leasedog: not yet");
    2
}
