//! The lab's own proof: real kernel watchdogs inside QEMU TCG guests fire (or
//! do not) as the kernel promises, and the host sees it on its own clock.
//! Each test boots a guest (~5-20 s); timings are printed with --nocapture.

use leasedog_testbed::lab::{
    host_boottime, Guest, GuestSpec, Kernel, SoftdogOpts, WatchdogAction, Watchdogs,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn boot(name: &str, watchdogs: Watchdogs, forward_tcp: Vec<u16>) -> Guest {
    let t0 = Instant::now();
    let k = Kernel::get().expect("lab kernel");
    eprintln!(
        "[{name}] kernel {} ready ({} fetch took {:.2} s in this process)",
        k.release,
        if k.fetched_cold { "cold" } else { "warm" },
        k.fetch_time.as_secs_f64()
    );
    let g = Guest::boot(GuestSpec {
        name: name.into(),
        watchdogs,
        watchdog_action: WatchdogAction::Poweroff,
        forward_tcp,
        ..GuestSpec::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[{name}] boot to control shell: {:.2} s (call took {:.2} s)",
        g.boot_time().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    g
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// softdog with nowayout=1: the guest pings twice, then even writes the magic
/// 'V' and closes; nowayout keeps the timer running, and the kernel restarts
/// the guest `margin` seconds after the last ping.
#[test]
fn softdog_fires_margin_after_last_ping_despite_magic_close_with_nowayout() {
    let g = boot(
        "softdog",
        Watchdogs {
            i6300esb: false,
            i6300esb_nowayout: false,
            softdog: Some(SoftdogOpts {
                margin: 3,
                nowayout: true,
            }),
        },
        vec![],
    );
    let wd = g
        .watchdog("Software Watchdog")
        .expect("softdog device")
        .clone();
    assert_eq!(wd.timeout, 3, "{wd:?}");
    assert!(wd.nowayout, "nowayout=1 was not applied: {wd:?}");
    assert!(g.reset_time().is_none());

    let r = g
        .run(
            &format!(
                "exec 3>{dev}; echo 1 >&3; sleep 1; echo 1 >&3; cut -d' ' -f1 /proc/uptime; \
                 printf V >&3; exec 3>&-",
                dev = wd.dev
            ),
            T,
        )
        .unwrap();
    assert!(r.ok(), "{r:?}");
    let ping_guest = Duration::from_secs_f64(r.output.trim().parse().expect("uptime"));
    let ping_host = g.guest_to_host(ping_guest).expect("clock offset");

    let reset = g.wait_reset(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "no reset within 30 s; events {:?}\n{}",
            g.qmp().events(),
            g.console_log()
        )
    });
    assert_eq!(reset.name, "SHUTDOWN", "{reset:?}");
    assert!(
        g.wait_exit(Duration::from_secs(10)),
        "QEMU still running after the reset"
    );
    let console = g.console_log();
    assert!(
        console.contains("softdog: Initiating system reboot"),
        "{console}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");

    // Hard bounds, independent of the clock-offset estimate: the last ping
    // came at least 1 s after the request was sent, and before the reply.
    let margin = Duration::from_secs(3);
    let slack = Duration::from_millis(300);
    assert!(
        reset.boottime + slack >= r.sent + Duration::from_secs(1) + margin,
        "reset came too early: {reset:?}, request sent at {:?}",
        r.sent
    );
    assert!(
        reset.boottime <= r.replied + margin + Duration::from_secs(10),
        "reset came far too late: {reset:?}, reply at {:?}",
        r.replied
    );
    eprintln!(
        "[softdog] last ping (host est.) {:.3} s, reset {:.3} s: lateness vs margin {:+.3} s \
         (QMP receipt {:+.3} s after the stamp)",
        secs(ping_host),
        secs(reset.boottime),
        secs(reset.boottime) - secs(ping_host + margin),
        secs(reset.received) - secs(reset.boottime),
    );
}

/// The emulated 6300ESB (driver loaded with nowayout=1): busybox `watchdog`
/// sets a 4 s timeout and pings every 200 ms; SIGSTOP freezes it; QEMU
/// reports WATCHDOG ~4 s later.
#[test]
fn i6300esb_fires_after_its_pinger_is_stopped() {
    let g = boot(
        "i6300esb",
        Watchdogs {
            i6300esb: true,
            i6300esb_nowayout: true,
            softdog: None,
        },
        vec![],
    );
    let wd = g.watchdog("i6300ESB").expect("i6300esb device").clone();
    assert_eq!(wd.timeout, 30, "the driver's default: {wd:?}");
    assert!(wd.nowayout, "nowayout=1 was not applied: {wd:?}");

    let p = g
        .spawn(&format!(
            "exec /run/lab/busybox watchdog -T 4 -t 200ms -F {}",
            wd.dev
        ))
        .unwrap();
    let name = wd.dev.trim_start_matches("/dev/");
    // Wait until the new timeout is in force, then let it ping a while.
    let deadline = Instant::now() + T;
    loop {
        let t = g
            .run_ok(&format!("cat /sys/class/watchdog/{name}/timeout"), T)
            .unwrap();
        if t.trim() == "4" {
            break;
        }
        assert!(Instant::now() < deadline, "timeout never became 4: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(g.reset_time().is_none(), "fired while being pinged");

    let stop = g.kill(p.pid as i64, "STOP").unwrap();
    let reset = g.wait_reset(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "no WATCHDOG within 30 s; events {:?}\n{}",
            g.qmp().events(),
            g.console_log()
        )
    });
    assert_eq!(reset.name, "WATCHDOG", "{reset:?}");
    assert_eq!(reset.data["action"], "poweroff", "{reset:?}");
    assert!(
        g.wait_exit(Duration::from_secs(10)),
        "QEMU still running after poweroff"
    );

    // The last ping came at most 200 ms (+ scheduling) before the stop, which
    // happened between the request and the reply.
    let timeout = Duration::from_secs(4);
    let slack = Duration::from_millis(300);
    assert!(
        reset.boottime + Duration::from_millis(200) + slack >= stop.sent + timeout,
        "fired too early: {reset:?} vs stop {stop:?}"
    );
    assert!(
        reset.boottime <= stop.replied + timeout + Duration::from_secs(10),
        "fired far too late: {reset:?} vs stop {stop:?}"
    );
    eprintln!(
        "[i6300esb] stop (host est.) {:.3} s, WATCHDOG {:.3} s: lateness vs stop+4 s {:+.3} s \
         (last ping up to 0.2 s before the stop)",
        secs(stop.host),
        secs(reset.boottime),
        secs(reset.boottime) - secs(stop.host + timeout)
    );
}

/// The guest reaches a host loopback listener through 10.0.2.2 using the
/// host's own bash (from the 9p root), and the host reaches a guest listener
/// through a forwarded port; a cut link partitions it. A guest dropped by a
/// panicking test leaves no QEMU behind.
#[test]
fn guest_reaches_host_loopback_and_runs_host_binaries() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (s, peer) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut s = s;
        writeln!(s, "pong {}", line.trim()).unwrap();
        (line, peer)
    });

    let g = boot("net", Watchdogs::default(), vec![7000]);
    let nonce = format!("{}-{}", std::process::id(), host_boottime().as_nanos());

    // bash is not in the initramfs: this one comes from the host over 9p.
    let out = g
        .run_ok(
            &format!(
                "/bin/bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}; echo ping {nonce} >&3; \
                 read -r l <&3; echo \"$l\"'"
            ),
            T,
        )
        .unwrap();
    assert_eq!(out.trim(), format!("pong ping {nonce}"));
    let (line, peer) = server.join().unwrap();
    assert_eq!(line.trim(), format!("ping {nonce}"));
    assert!(peer.ip().is_loopback(), "{peer}");

    // The guest's /usr/bin/etcdctl is the host's file, byte for byte.
    let host_sum = std::process::Command::new("sha256sum")
        .arg("/usr/bin/etcdctl")
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&host_sum.stdout);
    let guest_sum = g.run_ok("sha256sum /usr/bin/etcdctl", T).unwrap();
    assert_eq!(
        guest_sum.split_whitespace().next(),
        host_sum.split_whitespace().next()
    );
    let v = g.run_ok("/usr/bin/etcdctl version", T).unwrap();
    assert!(v.contains("etcdctl version"), "{v}");

    // A guest etcdctl writes into a host etcd on loopback.
    let etcd = leasedog_testbed::etcd::EtcdServer::start().expect("etcd");
    g.run_ok(
        &format!(
            "etcdctl --endpoints=http://10.0.2.2:{} --dial-timeout=5s put /lab/{nonce} from-guest",
            etcd.client_port()
        ),
        T,
    )
    .unwrap();
    let got = std::process::Command::new("etcdctl")
        .arg(format!(
            "--endpoints=http://127.0.0.1:{}",
            etcd.client_port()
        ))
        .args(["get", "--print-value-only", &format!("/lab/{nonce}")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "from-guest");

    // Cutting the link partitions the guest from etcd; restoring heals it.
    let get = format!(
        "etcdctl --endpoints=http://10.0.2.2:{} --dial-timeout=2s --command-timeout=3s \
         get --print-value-only /lab/{nonce}",
        etcd.client_port()
    );
    g.set_link(false).unwrap();
    let r = g.run(&get, T).unwrap();
    assert!(!r.ok(), "etcd reachable with the link cut: {r:?}");
    assert_eq!(
        g.run_ok("cat /sys/class/net/eth0/carrier", T)
            .unwrap()
            .trim(),
        "0"
    );
    g.set_link(true).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let r = g.run(&get, T).unwrap();
        if r.ok() {
            assert_eq!(r.output.trim(), "from-guest");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd unreachable after relink: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(etcd);

    // A host file written after boot is readable at its host path (even
    // under the host's /tmp); guest writes stay in the guest.
    let host_dir = tempfile::tempdir().unwrap();
    let host_file = host_dir.path().join("from-host");
    std::fs::write(&host_file, format!("host {nonce}")).unwrap();
    let seen = g.read_file(host_file.to_str().unwrap()).unwrap();
    assert_eq!(seen, format!("host {nonce}"));
    g.run_ok(&format!("echo guest > {}", host_file.display()), T)
        .unwrap();
    assert_eq!(g.read_file(host_file.to_str().unwrap()).unwrap(), "guest\n");
    assert_eq!(
        std::fs::read_to_string(&host_file).unwrap(),
        format!("host {nonce}")
    );

    // Host -> guest through hostfwd.
    g.write_file("/run/msg", format!("hello {nonce}\n").as_bytes())
        .unwrap();
    g.spawn("exec /run/lab/busybox nc -l -p 7000 < /run/msg")
        .unwrap();
    let hp = g.host_port(7000).unwrap();
    let deadline = Instant::now() + T;
    let got = loop {
        // QEMU accepts on the host side even before the guest listens, then
        // closes: retry until data comes back.
        let mut buf = String::new();
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", hp)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.read_to_string(&mut buf);
        }
        if !buf.is_empty() || Instant::now() > deadline {
            break buf;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(got.trim(), format!("hello {nonce}"));

    // A paused guest's clock stands still: after resuming it is behind the
    // host by about the pause.
    let before = g.probe_clock().unwrap();
    g.pause().unwrap();
    assert_eq!(g.qmp().status().unwrap(), "paused");
    std::thread::sleep(Duration::from_secs(2));
    g.resume().unwrap();
    assert_eq!(g.qmp().status().unwrap(), "running");
    let after = g.probe_clock().unwrap();
    let lag = secs(after) - secs(before);
    eprintln!("[net] guest clock lag after a 2 s pause: {lag:.3} s");
    assert!((1.5..4.0).contains(&lag), "lag {lag}");

    // A Guest dropped while its test panics still kills QEMU.
    let pid = g.qemu_pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _g = g;
        panic!("deliberate panic to check cleanup with a live guest: expected, ignore");
    }));
    assert!(res.is_err());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} survived a panicking test"
    );
}

/// A magic close ('V' then close) disarms both watchdogs when nowayout is
/// off: the guest outlives both timeouts. Then softdog, opened again and
/// held open without pings, does reset it.
#[test]
fn magic_close_disarms_without_nowayout_and_a_held_open_softdog_fires() {
    let g = boot(
        "magic",
        Watchdogs {
            i6300esb: true,
            i6300esb_nowayout: false,
            softdog: Some(SoftdogOpts {
                margin: 3,
                nowayout: false,
            }),
        },
        vec![],
    );
    let soft = g.watchdog("Software Watchdog").expect("softdog").clone();
    let esb = g.watchdog("i6300ESB").expect("i6300esb").clone();
    assert!(!soft.nowayout && !esb.nowayout);
    let offset0 = g.probe_clock().unwrap();

    // busybox watchdog writes 'V' and closes on SIGTERM.
    let p = g
        .spawn(&format!(
            "exec /run/lab/busybox watchdog -T 4 -t 200ms -F {}",
            esb.dev
        ))
        .unwrap();
    let r = g
        .run(
            &format!("exec 3>{}; echo 1 >&3; printf V >&3; exec 3>&-", soft.dev),
            T,
        )
        .unwrap();
    assert!(r.ok(), "{r:?}");
    std::thread::sleep(Duration::from_secs(1));
    g.kill(p.pid as i64, "TERM").unwrap();
    // Longer than either timeout (3 s, 4 s), with room.
    std::thread::sleep(Duration::from_secs(7));
    assert!(g.reset_time().is_none(), "reset: {:?}", g.reset_time());
    assert_eq!(g.qmp().status().unwrap(), "running");
    let dmesg = g.run_ok("dmesg", T).unwrap();
    assert!(!dmesg.contains("did not stop"), "{dmesg}");
    assert!(g.is_running());
    let offset1 = g.probe_clock().unwrap();
    eprintln!(
        "[magic] guest->host clock offset {:.3} s, {:+.3} s later",
        secs(offset0),
        secs(offset1) - secs(offset0)
    );

    // The contrast: softdog opened again and held open by a process that
    // never pings nor closes it resets the guest `margin` after the ping.
    let r = g
        .run(
            &format!(
                "exec 3>{}; echo 1 >&3; cut -d' ' -f1 /proc/uptime; \
                 /run/lab/busybox setsid sleep 1000 </dev/null >/dev/null 2>&1 &",
                soft.dev
            ),
            T,
        )
        .unwrap();
    assert!(r.ok(), "{r:?}");
    let ping_host = g
        .guest_to_host(Duration::from_secs_f64(r.output.trim().parse().unwrap()))
        .unwrap();
    let reset = g
        .wait_reset(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("held-open softdog did not fire\n{}", g.console_log()));
    assert_eq!(reset.name, "SHUTDOWN", "{reset:?}");
    let margin = Duration::from_secs(3);
    assert!(reset.boottime + Duration::from_millis(300) >= r.sent + margin);
    assert!(reset.boottime <= r.replied + margin + Duration::from_secs(10));
    assert!(g
        .console_log()
        .contains("softdog: Initiating system reboot"));
    eprintln!(
        "[magic] held-open softdog: lateness vs margin {:+.3} s",
        secs(reset.boottime) - secs(ping_host + margin)
    );
}
