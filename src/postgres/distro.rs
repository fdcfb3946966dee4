//! The distribution's own unit for the same cluster, which the agent refuses
//! to run beside.
//!
//! leasedog starts and stops PostgreSQL itself, always as a standby (only a
//! promotion after arming makes it writable). Debian's `postgresql@15-main`
//! would instead start the cluster at boot from its `postgresql.conf`, so a
//! former primary reset by its watchdog would come back **writable** before
//! any agent had looked. The agent therefore refuses to start while such a
//! unit is enabled or active for its data directory, and says how to fix it.
//!
//! Debian's layout (postgresql-common): `/etc/postgresql/VERSION/CLUSTER/`
//! holds `postgresql.conf` (`data_directory`, by default
//! `/var/lib/postgresql/VERSION/CLUSTER`) and `start.conf` (`auto`: the
//! systemd generator makes `postgresql.service` want
//! `postgresql@VERSION-CLUSTER`; `manual`: `pg_ctlcluster` only by hand;
//! `disabled`: not even that). An explicit `systemctl enable
//! postgresql@VERSION-CLUSTER` is a link in a `.wants` directory.

use std::path::{Path, PathBuf};

/// The value of `key = value` in a PostgreSQL configuration file (the last
/// one wins, as in PostgreSQL), unquoted.
fn conf_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.split('#').next()?.trim();
            let (k, v) = l.split_once('=').or_else(|| l.split_once(' '))?;
            (k.trim() == key).then(|| v.trim().trim_matches('\'').to_string())
        })
        .next_back()
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    a == b || canon(a) == canon(b)
}

/// The distribution's clusters (`VERSION`, `CLUSTER`, their `/etc` directory
/// inside `root`) whose data directory is `data_dir`.
fn clusters_for(root: &Path, data_dir: &Path) -> Vec<(String, String, PathBuf)> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let list = |d: &Path| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    let mut out = Vec::new();
    for vdir in list(&inside(Path::new("/etc/postgresql"))) {
        for cdir in list(&vdir) {
            let (Some(version), Some(cluster)) = (
                vdir.file_name().and_then(|n| n.to_str()),
                cdir.file_name().and_then(|n| n.to_str()),
            ) else {
                continue;
            };
            let Ok(conf) = std::fs::read_to_string(cdir.join("postgresql.conf")) else {
                continue;
            };
            let configured = conf_value(&conf, "data_directory").map_or_else(
                || PathBuf::from(format!("/var/lib/postgresql/{version}/{cluster}")),
                PathBuf::from,
            );
            if same_dir(&inside(&configured), &inside(data_dir)) {
                out.push((version.to_string(), cluster.to_string(), cdir));
            }
        }
    }
    out
}

/// [`distro_unit_conflict`] on a file system tree at `root` (`/` for the
/// real one), asking `is_active(unit)` whether a unit runs (None: cannot
/// tell). Paths read from the configuration are taken inside `root`.
pub fn distro_unit_conflict_in(
    root: &Path,
    data_dir: &Path,
    is_active: &dyn Fn(&str) -> Option<bool>,
) -> Option<String> {
    let mut problems = Vec::new();
    for (version, cluster, cdir) in clusters_for(root, data_dir) {
        let unit = format!("postgresql@{version}-{cluster}.service");
        let mut why = Vec::new();
        let start = std::fs::read_to_string(cdir.join("start.conf"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                    .find(|l| !l.is_empty())
            })
            .unwrap_or_else(|| "auto".into());
        if start == "auto" {
            why.push(format!(
                "/etc/postgresql/{version}/{cluster}/start.conf is \"auto\" (postgresql.service starts it at boot)"
            ));
        }
        for wants in [
            "etc/systemd/system/multi-user.target.wants",
            "etc/systemd/system/postgresql.service.wants",
            "run/systemd/system/multi-user.target.wants",
        ] {
            if root.join(wants).join(&unit).symlink_metadata().is_ok() {
                why.push(format!("it is enabled (/{wants}/{unit})"));
            }
        }
        if is_active(&unit) == Some(true) {
            why.push("it is active".into());
        }
        if !why.is_empty() {
            problems.push(format!(
                "{unit} manages the same data directory {} ({}): after a reset it would \
                 start a former primary writable before leasedog looks; leasedog starts \
                 PostgreSQL itself, always as a standby. Fix: `systemctl disable --now {}` \
                 and `pg_conftool {version} {cluster} set start_conf manual` (or write \
                 \"manual\" or \"disabled\" to /etc/postgresql/{version}/{cluster}/start.conf)",
                data_dir.display(),
                why.join(", "),
                unit.trim_end_matches(".service"),
            ));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Where the agent records the clusters it runs; the packaged drop-in
/// `postgresql@.service.d/50-leasedog.conf` has
/// `ConditionPathExists=!/var/lib/leasedog/managed/%i`.
pub const MANAGED_DIR: &str = "/var/lib/leasedog/managed";

/// Records in `dir` ([`MANAGED_DIR`]) that this agent runs the
/// distribution's cluster(s) whose data directory is `data_dir`: one empty
/// file `VERSION-CLUSTER` each. From then on the packaged drop-in keeps
/// `postgresql@VERSION-CLUSTER` from ever starting it, even if someone
/// re-enables it or sets `start.conf` back to `auto`: after a reset only the
/// agent starts it, read-only. Returns the names recorded (none for a data
/// directory the distribution does not know).
pub fn mark_managed(dir: &Path, data_dir: &Path) -> std::io::Result<Vec<String>> {
    mark_managed_in(Path::new("/"), dir, data_dir)
}

/// [`mark_managed`] reading the distribution's configuration under `root`.
pub fn mark_managed_in(root: &Path, dir: &Path, data_dir: &Path) -> std::io::Result<Vec<String>> {
    let names: Vec<String> = clusters_for(root, data_dir)
        .into_iter()
        .map(|(v, c, _)| format!("{v}-{c}"))
        .collect();
    if !names.is_empty() {
        std::fs::create_dir_all(dir)?;
    }
    for n in &names {
        std::fs::write(dir.join(n), "")?;
    }
    Ok(names)
}

/// The start-up refusal: the error text if a distribution unit
/// (`postgresql@VERSION-CLUSTER`) for `data_dir` is enabled, started at boot
/// by `start.conf` = `auto`, or active; None when the agent alone runs the
/// cluster. Asks `systemctl is-active` (bounded; no answer counts as "cannot
/// tell", the files still decide).
pub fn distro_unit_conflict(data_dir: &Path) -> Option<String> {
    distro_unit_conflict_in(Path::new("/"), data_dir, &systemctl_is_active)
}

fn systemctl_is_active(unit: &str) -> Option<bool> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(st) = child.try_wait().ok()? {
            return Some(st.success());
        }
        if std::time::Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn cluster(root: &Path, v: &str, c: &str, data: Option<&str>, start: Option<&str>) {
        let d = root.join(format!("etc/postgresql/{v}/{c}"));
        fs::create_dir_all(&d).unwrap();
        let conf = match data {
            Some(p) => {
                format!("# comment\ndata_directory = '{p}'\t# use data in another directory\n")
            }
            None => "port = 5432\n".into(),
        };
        fs::write(d.join("postgresql.conf"), conf).unwrap();
        if let Some(s) = start {
            fs::write(d.join("start.conf"), format!("# Automatic startup\n{s}\n")).unwrap();
        }
    }

    fn never(_: &str) -> Option<bool> {
        None
    }

    #[test]
    fn an_auto_started_cluster_on_the_same_data_directory_is_refused_with_the_fix() {
        let r = tempfile::tempdir().unwrap();
        cluster(
            r.path(),
            "15",
            "main",
            Some("/var/lib/postgresql/15/main"),
            Some("auto"),
        );
        let e = distro_unit_conflict_in(r.path(), Path::new("/var/lib/postgresql/15/main"), &never)
            .expect("a conflict");
        assert!(e.contains("postgresql@15-main.service"), "{e}");
        assert!(
            e.contains("systemctl disable --now postgresql@15-main"),
            "{e}"
        );
        assert!(e.contains("set start_conf manual"), "{e}");
        assert!(e.contains("start.conf is \"auto\""), "{e}");
    }

    #[test]
    fn the_default_data_directory_counts_and_no_start_conf_means_auto() {
        let r = tempfile::tempdir().unwrap();
        cluster(r.path(), "15", "main", None, None);
        assert!(distro_unit_conflict_in(
            r.path(),
            Path::new("/var/lib/postgresql/15/main"),
            &never
        )
        .is_some());
    }

    #[test]
    fn manual_or_disabled_is_fine_unless_enabled_or_active() {
        let r = tempfile::tempdir().unwrap();
        let data = Path::new("/srv/pg/15");
        cluster(r.path(), "15", "main", Some("/srv/pg/15"), Some("manual"));
        cluster(r.path(), "15", "other", Some("/srv/pg/other"), Some("auto"));
        assert_eq!(distro_unit_conflict_in(r.path(), data, &never), None);
        let e =
            distro_unit_conflict_in(r.path(), data, &|u| Some(u == "postgresql@15-main.service"))
                .expect("active");
        assert!(e.contains("it is active"), "{e}");
        let wants = r.path().join("etc/systemd/system/multi-user.target.wants");
        fs::create_dir_all(&wants).unwrap();
        std::os::unix::fs::symlink(
            "/lib/systemd/system/postgresql@.service",
            wants.join("postgresql@15-main.service"),
        )
        .unwrap();
        let e = distro_unit_conflict_in(r.path(), data, &never).expect("enabled");
        assert!(e.contains("it is enabled"), "{e}");
        cluster(r.path(), "15", "main", Some("/srv/pg/15"), Some("disabled"));
        fs::remove_file(wants.join("postgresql@15-main.service")).unwrap();
        assert_eq!(distro_unit_conflict_in(r.path(), data, &never), None);
    }

    #[test]
    fn the_agent_marks_the_clusters_it_runs_for_the_drop_in() {
        let r = tempfile::tempdir().unwrap();
        cluster(r.path(), "15", "main", None, Some("manual"));
        cluster(r.path(), "15", "other", Some("/srv/other"), Some("auto"));
        let dir = r.path().join("managed");
        let names =
            mark_managed_in(r.path(), &dir, Path::new("/var/lib/postgresql/15/main")).unwrap();
        assert_eq!(names, ["15-main"]);
        assert!(dir.join("15-main").is_file() && !dir.join("15-other").exists());
        // %i of postgresql@15-main.service is "15-main": the drop-in's path.
        let dropin = include_str!("../../systemd/postgresql@.service.d/50-leasedog.conf");
        assert!(
            dropin.contains(&format!("ConditionPathExists=!{MANAGED_DIR}/%i")),
            "{dropin}"
        );
        let none = mark_managed_in(r.path(), &r.path().join("m2"), Path::new("/srv/x")).unwrap();
        assert!(none.is_empty() && !r.path().join("m2").exists());
    }

    #[test]
    fn no_distribution_clusters_is_no_conflict() {
        let r = tempfile::tempdir().unwrap();
        assert_eq!(
            distro_unit_conflict_in(r.path(), Path::new("/var/lib/postgresql/15/main"), &never),
            None
        );
    }
}
