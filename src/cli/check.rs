//! `leasedog check`: the budget, etcd's measured round trip and the
//! devices (inspected, never armed), with a SAFE/UNSAFE verdict.

use crate::config::{Config, DeviceSpec, WatchdogMode};
use crate::timing::{self, Budget};
use std::time::Duration;

/// One finding of `check`.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub unsafe_: bool,
    pub what: String,
}

/// The verdict of `check` from what it measured: pure, so it is tested on
/// its own. `rtts` are etcd round trips (empty: unreachable).
pub fn assess(
    cfg: &Config,
    budget: &Budget,
    rtts: &[Duration],
    etcd_error: Option<&str>,
    devices: &[(String, Result<String, String>)],
) -> Vec<Finding> {
    let mut f = Vec::new();
    let mut bad = |what: String| {
        f.push(Finding {
            unsafe_: true,
            what,
        })
    };
    if let Some(e) = etcd_error {
        bad(format!("etcd unreachable: {e}"));
    }
    if let Some(worst) = rtts.iter().max() {
        if *worst > budget.request_timeout {
            bad(format!(
                "worst etcd round trip {worst:?} exceeds etcd.request_timeout {:?}: renewals would time out",
                budget.request_timeout
            ));
        }
        if budget.loop_interval + *worst > budget.ping_window() {
            bad(format!(
                "loop_interval {:?} + worst round trip {worst:?} exceeds M - R = {:?}: pings would pause",
                budget.loop_interval,
                budget.ping_window()
            ));
        }
    }
    match cfg.watchdog.mode {
        WatchdogMode::Off => bad("watchdog mode is off: nothing fences a stalled node".into()),
        WatchdogMode::Automatic if cfg.watchdog.devices.is_empty() => {
            bad("no watchdog device configured: nothing fences a stalled node".into())
        }
        _ => {}
    }
    for (name, r) in devices {
        if let Err(e) = r {
            bad(format!("{name}: {e}"));
        }
    }
    for d in &cfg.watchdog.devices {
        if let DeviceSpec::Fake { .. } = d {
            bad("a fake (test) device fences nothing".into());
        }
    }
    let mut out = f;
    if out.is_empty() {
        out.push(Finding {
            unsafe_: false,
            what: "every renewal fits the budget and every device can be armed".into(),
        });
    }
    out
}

pub(super) fn check(cfg: &Config, samples: u32) -> i32 {
    let budget = match cfg.budget() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("leasedog: config: {e}");
            return 2;
        }
    };
    let (rtts, etcd_error) = measure_etcd(cfg, samples);
    let roots = super::sysroots();
    let devices: Vec<(String, Result<String, String>)> = cfg
        .watchdog
        .devices
        .iter()
        .map(|spec| {
            let name = format!("{spec:?}");
            let r = crate::watchdog::inspect(spec, cfg.watchdog.nowayout, &roots)
                .map_err(|e| e.to_string());
            (name, r)
        })
        .collect();
    println!("budget:");
    println!(
        "  T (lease ttl)         {:>8.3} s",
        budget.ttl.as_secs_f64()
    );
    println!(
        "  W (watchdog timeout)  {:>8} s  (T - M, whole seconds)",
        timing::target_timeout(&budget)
    );
    println!(
        "  M (safety margin)     {:>8.3} s",
        budget.margin.as_secs_f64()
    );
    println!(
        "  R (reset allowance)   {:>8.3} s",
        budget.reset_allowance.as_secs_f64()
    );
    println!(
        "  ping window M - R     {:>8.3} s",
        budget.ping_window().as_secs_f64()
    );
    println!(
        "  loop interval         {:>8.3} s",
        budget.loop_interval.as_secs_f64()
    );
    println!(
        "  etcd request timeout  {:>8.3} s",
        budget.request_timeout.as_secs_f64()
    );
    match rtts.iter().max() {
        Some(w) => println!(
            "etcd: {} round trips, median {:.1} ms, worst {:.1} ms",
            rtts.len(),
            median(&rtts).as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3
        ),
        None => println!("etcd: no round trip measured"),
    }
    for (name, r) in &devices {
        match r {
            Ok(desc) => println!("device {name}: ok: {desc}"),
            Err(e) => println!("device {name}: REFUSED: {e}"),
        }
    }
    let findings = assess(cfg, &budget, &rtts, etcd_error.as_deref(), &devices);
    let unsafe_ = findings.iter().any(|f| f.unsafe_);
    println!("verdict: {}", if unsafe_ { "UNSAFE" } else { "SAFE" });
    for f in &findings {
        println!("  - {}", f.what);
    }
    if unsafe_ {
        1
    } else {
        0
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// Measures `samples` etcd round trips (reads of the leader key).
fn measure_etcd(cfg: &Config, samples: u32) -> (Vec<Duration>, Option<String>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    rt.block_on(async {
        let mut d = match crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node).await {
            Ok(d) => d,
            Err(e) => return (Vec::new(), Some(e.to_string())),
        };
        let mut rtts = Vec::new();
        for _ in 0..samples.max(1) {
            let t0 = std::time::Instant::now();
            if let Err(e) = d.leader().await {
                return (rtts, Some(e.to_string()));
            }
            rtts.push(t0.elapsed());
        }
        (rtts, None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::parse(&format!("node='a'\n{extra}")).unwrap()
    }

    #[test]
    fn safe_when_everything_fits() {
        let c = cfg("[watchdog]\nmode='required'\n[[watchdog.device]]\nkind='softdog'");
        let b = c.budget().unwrap();
        let f = assess(
            &c,
            &b,
            &[Duration::from_millis(2)],
            None,
            &[("softdog".into(), Ok("ok".into()))],
        );
        assert!(f.iter().all(|f| !f.unsafe_), "{f:?}");
    }

    #[test]
    fn slow_etcd_is_unsafe() {
        let c = cfg("[watchdog]\nmode='required'\n[[watchdog.device]]\nkind='softdog'");
        let b = c.budget().unwrap();
        let f = assess(&c, &b, &[Duration::from_millis(1500)], None, &[]);
        assert!(
            f.iter()
                .any(|f| f.unsafe_ && f.what.contains("request_timeout")),
            "{f:?}"
        );
        let f = assess(&c, &b, &[], Some("connection refused"), &[]);
        assert!(f
            .iter()
            .any(|f| f.unsafe_ && f.what.contains("unreachable")));
    }

    #[test]
    fn no_watchdog_is_unsafe() {
        let c = cfg("");
        let b = c.budget().unwrap();
        let f = assess(&c, &b, &[Duration::from_millis(1)], None, &[]);
        assert!(f
            .iter()
            .any(|f| f.unsafe_ && f.what.contains("nothing fences")));
    }

    #[test]
    fn refused_device_is_unsafe() {
        let c = cfg("[watchdog]\nmode='required'\n[[watchdog.device]]\nkind='softdog'");
        let b = c.budget().unwrap();
        let f = assess(
            &c,
            &b,
            &[Duration::from_millis(1)],
            None,
            &[("softdog".into(), Err("busy: held by systemd".into()))],
        );
        assert!(f
            .iter()
            .any(|f| f.unsafe_ && f.what.contains("held by systemd")));
    }
}
