//! Runs as ExecStart of systemd/leasedog.service (only ExecStart replaced) under
//! real systemd in a QEMU guest, and prints one `PROBE name: ok|FAIL detail`
//! line per thing the agent needs from its sandbox (tests/install.rs,
//! `unit_sandbox_works_under_real_systemd`). Compiled by that test with rustc.
use std::ffi::CString;
use std::io::Write;
extern "C" {
    fn mlockall(flags: i32) -> i32;
    fn sched_setscheduler(pid: i32, policy: i32, param: *const i32) -> i32;
    fn ioctl(fd: i32, req: u64, ...) -> i32;
    fn open(path: *const i8, flags: i32, ...) -> i32;
    fn write(fd: i32, buf: *const u8, n: usize) -> isize;
    fn close(fd: i32) -> i32;
    fn setuid(uid: u32) -> i32;
    fn getuid() -> u32;
    fn getgid() -> u32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn __errno_location() -> *mut i32;
}
fn errno() -> i32 {
    unsafe { *__errno_location() }
}
fn report(name: &str, ok: bool, detail: String) {
    println!("PROBE {name}: {} {detail}", if ok { "ok" } else { "FAIL" });
}
fn wd(path: &str) {
    let p = CString::new(path).unwrap();
    let fd = unsafe { open(p.as_ptr(), 1) };
    if fd < 0 {
        report(&format!("open {path}"), false, format!("errno {}", errno()));
        return;
    }
    let mut t: i32 = 0;
    let r = unsafe { ioctl(fd, 0x80045707, &mut t as *mut i32) };
    report(
        &format!("open+GETTIMEOUT {path}"),
        r == 0,
        format!("timeout {t}"),
    );
    let w = unsafe { write(fd, b"V".as_ptr(), 1) };
    unsafe { close(fd) };
    report(&format!("ping+magic close {path}"), w == 1, String::new());
}
fn main() {
    report(
        "uid/gid",
        true,
        format!("{} {}", unsafe { getuid() }, unsafe { getgid() }),
    );
    let st = std::fs::read_to_string("/proc/self/status").unwrap();
    for l in st
        .lines()
        .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs") || l.starts_with("Seccomp"))
    {
        if let Some((k, v)) = l.split_once(':') {
            println!("PROBE status {k}: {}", v.trim());
        }
    }
    let r = unsafe { mlockall(3) };
    report(
        "mlockall",
        r == 0,
        format!("errno {}", if r == 0 { 0 } else { errno() }),
    );
    let prio: i32 = 10;
    let r = unsafe { sched_setscheduler(0, 1, &prio) };
    report(
        "SCHED_FIFO 10",
        r == 0,
        format!("errno {}", if r == 0 { 0 } else { errno() }),
    );
    wd("/dev/watchdog0");
    wd("/dev/watchdog");
    let k = std::fs::File::open("/dev/kmsg");
    report("kmsg denied", k.is_err(), format!("{:?}", k.err()));
    let b = std::fs::read_to_string("/proc/sys/kernel/random/boot_id");
    report(
        "boot_id",
        b.is_ok(),
        format!("{:?}", b.map(|s| s.trim().to_string())),
    );
    let i = std::fs::read_to_string("/sys/class/watchdog/watchdog0/identity");
    report("sysfs identity", i.is_ok(), format!("{:?}", i));
    let e = std::fs::write("/etc/leasedog-probe", "x");
    report("/etc read-only", e.is_err(), format!("{:?}", e.err()));
    let v = std::fs::write("/var/lib/leasedog/probe.audit.jsonl", "{}\n");
    report("state dir writable", v.is_ok(), format!("{:?}", v.err()));
    let p1 = std::fs::read_to_string("/proc/1/status");
    report("pid 1 hidden", p1.is_err(), String::new());
    let c = std::process::Command::new("/bin/true").status();
    report(
        "spawn /bin/true",
        c.as_ref().map(|s| s.success()).unwrap_or(false),
        format!("{:?}", c),
    );
    let r = unsafe { setuid(0) };
    report("setuid(0) refused", r != 0, format!("errno {}", errno()));
    // A process of the PostgreSQL user (sleeper.service) stands in for a
    // stalled postmaster: the agent must be able to SIGKILL it, and nothing
    // of root's.
    let mut pid = None;
    for _ in 0..50 {
        if let Ok(p) = std::fs::read_to_string("/run/leasedog-sleeper/pid") {
            pid = p.trim().parse::<i32>().ok();
            if pid.is_some() {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match pid {
        Some(p) => {
            let r = unsafe { kill(p, 9) };
            report(
                "SIGKILL postgres-owned process",
                r == 0,
                format!("pid {p} errno {}", if r == 0 { 0 } else { errno() }),
            );
        }
        None => report(
            "SIGKILL postgres-owned process",
            false,
            format!(
                "no pid file; /run: {:?}; /run/leasedog-sleeper: {:?}",
                std::fs::read_dir("/run")
                    .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
                std::fs::read_dir("/run/leasedog-sleeper")
                    .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            ),
        ),
    }
    let r = unsafe { kill(1, 0) };
    report(
        "signal to pid 1 refused",
        r != 0,
        format!("errno {}", errno()),
    );
    let c = std::fs::read_to_string("/etc/leasedog/leasedog.toml");
    report("config readable", c.is_ok(), format!("{:?}", c.err()));
    if let Ok(sock) = std::env::var("NOTIFY_SOCKET") {
        let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let r = s.send_to(b"READY=1\nSTATUS=probe done", &sock);
        report("sd_notify", r.is_ok(), format!("{:?}", r));
    }
    std::io::stdout().flush().unwrap();
}
