//! The data directory and the PostgreSQL tools (`pg_ctl`, `pg_rewind`,
//! `pg_basebackup`, `initdb`, `postgres --single`), run as `postgres.os_user`
//! when the agent is root, each under a deadline.

use super::*;
use crate::config::postgres::conninfo_value;
use std::time::Instant;
use tokio_postgres::NoTls;

impl Pg {
    // --- data directory ---------------------------------------------------

    pub fn data_dir_state(&self) -> Result<DataDirState, PgError> {
        let d = self.data_dir();
        let mut rd = match std::fs::read_dir(d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DataDirState::Missing),
            Err(e) => return Err(io_err(format!("reading {}", d.display()))(e)),
        };
        if rd.next().is_none() {
            return Ok(DataDirState::Empty);
        }
        match std::fs::read_to_string(d.join("PG_VERSION")) {
            Ok(v) => Ok(DataDirState::Cluster {
                version: v.trim().to_string(),
            }),
            Err(_) => Ok(DataDirState::NotACluster),
        }
    }

    /// The data directory must hold a cluster (`PG_VERSION`).
    pub fn require_cluster(&self) -> Result<String, PgError> {
        let reason = match self.data_dir_state()? {
            DataDirState::Cluster { version } if version == self.major => return Ok(version),
            DataDirState::Cluster { version } => {
                return Err(PgError::WrongDataDir {
                    path: self.data_dir().to_owned(),
                    reason: format!(
                        "it holds PostgreSQL {version}, but postgres.bin_dir = {} is PostgreSQL {}",
                        self.cfg.bin_dir.display(),
                        self.major
                    ),
                })
            }
            DataDirState::Missing => "it does not exist",
            DataDirState::Empty => "it is empty (clone or initdb first)",
            DataDirState::NotACluster => "it has no PG_VERSION file",
        };
        Err(PgError::WrongDataDir {
            path: self.data_dir().to_owned(),
            reason: reason.into(),
        })
    }

    fn require_empty(&self) -> Result<(), PgError> {
        match self.data_dir_state()? {
            DataDirState::Missing | DataDirState::Empty => Ok(()),
            _ => Err(PgError::WrongDataDir {
                path: self.data_dir().to_owned(),
                reason: "it is not empty: refusing to overwrite it".into(),
            }),
        }
    }

    /// Creates the data directory (mode 700, owned by os_user) if missing.
    fn make_data_dir(&self) -> Result<(), PgError> {
        let d = self.data_dir();
        std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", d.display())))?;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod 700 {}", d.display())))
    }

    /// Writes a file in the data directory atomically, owned by os_user.
    fn write_owned(&self, name: &str, text: &str) -> Result<(), PgError> {
        let path = self.data_dir().join(name);
        let tmp = self.data_dir().join(format!("{name}.leasedog-tmp"));
        std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", tmp.display())))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))
    }

    fn remove_if_present(&self, name: &str) -> Result<(), PgError> {
        let p = self.data_dir().join(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(format!("removing {}", p.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// `standby.signal` plus our `primary_conninfo` line in `postgresql.auto.conf`
    /// (any other `primary_conninfo` line there is dropped). With no leader
    /// known (`None`) there is no `primary_conninfo` at all: the standby waits,
    /// read-only, and streams from nobody (never from a stale leader).
    pub fn write_standby_config(&self, leader_conninfo: Option<&str>) -> Result<(), PgError> {
        let auto = self.data_dir().join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&auto).unwrap_or_default();
        let mut text: String = old
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !l.starts_with("primary_conninfo") && !l.starts_with("primary_slot_name")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if let Some(leader) = leader_conninfo {
            text.push_str(&format!(
                "primary_conninfo = '{}'  # managed by leasedog\n",
                self.cfg
                    .with_replication_password(leader)
                    .replace('\\', "\\\\")
                    .replace('\'', "''")
            ));
            if let Some(slot) = &self.slot_name {
                // Created by the leader for our member record (decide::slots).
                text.push_str(&format!(
                    "primary_slot_name = '{slot}'  # managed by leasedog\n"
                ));
            }
        }
        self.write_owned("postgresql.auto.conf", &text)?;
        self.remove_if_present("recovery.signal")?;
        self.write_owned("standby.signal", "")
    }

    // --- tools ------------------------------------------------------------

    pub(super) fn tool(&self, name: &str) -> Result<tokio::process::Command, PgError> {
        let path = self.cfg.bin_dir.join(name);
        if !is_executable(&path) {
            return Err(PgError::NotInstalled {
                bin_dir: self.cfg.bin_dir.clone(),
                missing: name.into(),
            });
        }
        let mut c = tokio::process::Command::new(path);
        // In the child, before exec: join PostgreSQL's cgroup first (as the
        // agent's user, who may move processes within its delegated cgroup;
        // os_user may not), then drop to os_user. So the tool and everything
        // it forks (the postmaster, every backend) are in the group from
        // their first instruction.
        let procs = self.cgroup.as_ref().map(|g| g.procs_path());
        let run_as = self.run_as;
        // SAFETY: the closure only makes async-signal-safe calls (open,
        // write, close, setgroups, setgid, setuid) and allocates nothing.
        unsafe {
            c.pre_exec(move || {
                if let Some(p) = &procs {
                    cgroup::join_in_child(p)?;
                }
                if let Some((uid, gid)) = run_as {
                    if libc::setgroups(1, &gid) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        c.current_dir("/")
            .env("HOME", &self.os_home)
            .env("LC_ALL", "C")
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = &self.cfg.replication.password {
            c.env("PGPASSWORD", p); // tools only talk to the leader
        }
        Ok(c)
    }

    pub(super) async fn run(
        &self,
        name: &str,
        mut c: tokio::process::Command,
        within: Duration,
    ) -> Result<String, PgError> {
        let child = c.spawn().map_err(io_err(format!("starting {name}")))?;
        let out = match tokio::time::timeout(within, child.wait_with_output()).await {
            Err(_) => {
                return Err(PgError::ToolTimeout {
                    program: name.into(),
                    after: within,
                })
            }
            Ok(r) => r.map_err(io_err(format!("running {name}")))?,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(PgError::Tool {
                program: name.into(),
                status: out.status.to_string(),
                stderr: format!("{}{}", stderr.trim(), stdout.trim()),
            });
        }
        Ok(stdout + &String::from_utf8_lossy(&out.stderr))
    }

    fn pg_ctl_dir(&self) -> &Path {
        self.cfg.config_dir.as_deref().unwrap_or(self.data_dir())
    }

    /// The only way the driver starts the server: as a standby. It refuses
    /// to start without `standby.signal` (a server started writable by the
    /// agent would be rule 8's split brain); only `promote` makes it writable.
    async fn pg_ctl_start(&self) -> Result<(), PgError> {
        self.require_cluster()?;
        if !self.data_dir().join("standby.signal").exists() {
            return Err(PgError::State(format!(
                "refusing to start PostgreSQL in {} without standby.signal: the agent starts it read-only only",
                self.data_dir().display()
            )));
        }
        if let Some(pid) = self.live_postmaster() {
            return Err(PgError::State(format!(
                "PostgreSQL is already running (postmaster {pid}): stop it first"
            )));
        }
        self.clear_stale_lock_files().await?;
        // jit=off: the packaged unit denies writable+executable memory
        // (MemoryDenyWriteExecute=yes), which LLVM's JIT needs.
        let mut opts = format!("-c port={} -c jit=off", self.cfg.port);
        if self.cfg.host.starts_with('/') {
            opts.push_str(&format!(" -c unix_socket_directories='{}'", self.cfg.host));
        }
        let t = PgConfig::secs(self.cfg.start_timeout);
        let mut c = self.tool("pg_ctl")?;
        c.arg("start")
            .arg("-w")
            .arg("-t")
            .arg(t.as_secs().max(1).to_string())
            .arg("-D")
            .arg(self.pg_ctl_dir())
            .arg("-l")
            .arg(self.log_file())
            .arg("-o")
            .arg(opts)
            // The agent runs at oom_score_adj -1000 (the unit's
            // OOMScoreAdjust): the postmaster keeps it, its children go back
            // to 0, as PostgreSQL's documentation recommends.
            .env("PG_OOM_ADJUST_FILE", "/proc/self/oom_score_adj")
            .env("PG_OOM_ADJUST_VALUE", "0");
        self.run("pg_ctl start", c, t + Duration::from_secs(5))
            .await?;
        Ok(())
    }

    /// A killed postmaster leaves `postmaster.pid` and the socket's lock
    /// file naming it, and PostgreSQL refuses to start while that pid exists,
    /// even as a zombie not yet reaped (init can take a moment). So wait for
    /// the reap (bounded); if it never comes, and no live process of the
    /// cluster is left, the files guard nothing: remove them.
    async fn clear_stale_lock_files(&self) -> Result<(), PgError> {
        let Some(pid) = read_postmaster_pid(self.data_dir()) else {
            return Ok(());
        };
        if !cluster_processes(self.data_dir()).is_empty() {
            return Ok(()); // not stale: let pg_ctl say so
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
            if process_alive(pid) {
                return Ok(()); // a reused pid, not ours: PostgreSQL copes with that itself
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(());
        }
        self.remove_if_present("postmaster.pid")?;
        if self.cfg.host.starts_with('/') {
            let lock = Path::new(&self.cfg.host).join(format!(".s.PGSQL.{}.lock", self.cfg.port));
            let names_pid = std::fs::read_to_string(&lock)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
                == Some(pid);
            if names_pid {
                let _ = std::fs::remove_file(&lock);
            }
        }
        Ok(())
    }

    /// Starts the server as a standby, always: writes `standby.signal` (and
    /// removes `recovery.signal`), with `primary_conninfo` of the current
    /// leader, or none while no leader is known. A data directory that was a
    /// primary comes up read-only (`pg_is_in_recovery()`); only
    /// [`Pg::promote`], which the core runs after arming, makes it writable.
    /// There is no other way to start it: bootstrap is `initdb`, this, then
    /// the promotion of a node that won the key.
    pub async fn start_as_standby(&self, leader_conninfo: Option<&str>) -> Result<(), PgError> {
        self.require_cluster()?;
        self.write_standby_config(leader_conninfo)?;
        // A clone copied the leader's files: this node's own, before it runs.
        self.write_config_files()?;
        self.pg_ctl_start().await
    }

    /// [`Pg::start_as_standby`] of `leader_conninfo` (see
    /// [`PgConfig::replication_conninfo`]).
    pub async fn start_as_replica(&self, leader_conninfo: &str) -> Result<(), PgError> {
        self.start_as_standby(Some(leader_conninfo)).await
    }

    /// A clean stop (`pg_ctl stop -m fast`) of a replica before a rejoin; not
    /// a fence. A leader's planned step-down uses [`Pg::stop_for_switchover`].
    pub async fn stop_clean(&self) -> Result<(), PgError> {
        if self.live_postmaster().is_none() {
            return Ok(());
        }
        let t = PgConfig::secs(self.cfg.start_timeout);
        self.pg_ctl_stop_fast(t).await
    }

    /// `pg_ctl stop -m fast -w`: backends are terminated, a shutdown
    /// checkpoint is written, and the walsenders send every record up to it
    /// to the connected standbys before the postmaster exits. Bounded by `t`
    /// (pg_ctl's own `-t` plus a margin for the tool itself).
    async fn pg_ctl_stop_fast(&self, t: Duration) -> Result<(), PgError> {
        let mut c = self.tool("pg_ctl")?;
        c.args(["stop", "-w", "-m", "fast", "-t"])
            .arg(t.as_secs().max(1).to_string())
            .arg("-D")
            .arg(self.pg_ctl_dir());
        self.run("pg_ctl stop -m fast", c, t + Duration::from_secs(2))
            .await
            .map(|_| ())
    }

    /// A planned step-down (switchover, `systemctl stop`): a fast shutdown
    /// within `within`, so the standbys receive everything the primary wrote
    /// and the next primary misses nothing; if it does not finish in time (a
    /// hung checkpoint, a stalled disk) or fails, the immediate fence
    /// ([`Pg::fence_async`]) follows. Only a confirmed stop is `Ok`.
    pub async fn stop_for_switchover(&self, within: Duration) -> Result<Switchover, PgError> {
        let t0 = Instant::now();
        if self.live_postmaster().is_none() {
            return self.fence_async().await.map(Switchover::Fenced);
        }
        let fast = self.pg_ctl_stop_fast(within).await;
        // Whatever pg_ctl says, confirm with the fence (which finds nothing
        // after a clean stop); after a failed one it is the fallback.
        let report = self.fence_async().await?;
        match fast {
            Ok(()) if report.how == StopHow::AlreadyStopped => {
                Ok(Switchover::Fast { took: t0.elapsed() })
            }
            Ok(()) => Ok(Switchover::Fenced(report)),
            Err(e) => {
                tracing::warn!("fast shutdown for the switchover failed ({e}); fenced instead");
                Ok(Switchover::Fenced(report))
            }
        }
    }

    /// `initdb` of an empty or missing data directory (first node of a scope only).
    pub async fn initdb(&self, extra_args: &[&str]) -> Result<(), PgError> {
        self.require_empty()?;
        self.make_data_dir()?;
        let mut c = self.tool("initdb")?;
        c.arg("-D")
            .arg(self.data_dir())
            .arg("--data-checksums")
            .args(extra_args);
        self.run("initdb", c, PgConfig::secs(self.cfg.clone_timeout))
            .await
            .map(|_| ())
    }

    /// Fills an empty data directory from the leader (`pg_basebackup -X stream
    /// -R`). Does not start the server: call [`Pg::start_as_standby`].
    pub async fn clone_from(&self, leader_conninfo: &str) -> Result<Duration, PgError> {
        self.require_empty()?;
        self.make_data_dir()?;
        let t0 = Instant::now();
        let mut c = self.tool("pg_basebackup")?;
        c.arg("-D")
            .arg(self.data_dir())
            .args(["-X", "stream", "-R", "-c", "fast", "-d"])
            .arg(leader_conninfo);
        self.run("pg_basebackup", c, PgConfig::secs(self.cfg.clone_timeout))
            .await?;
        self.write_standby_config(Some(leader_conninfo))?;
        Ok(t0.elapsed())
    }

    /// `pg_controldata`'s whole output.
    pub(super) async fn controldata(&self) -> Result<String, PgError> {
        self.require_cluster()?;
        let mut c = self.tool("pg_controldata")?;
        c.arg("-D").arg(self.data_dir());
        self.run(
            "pg_controldata",
            c,
            PgConfig::secs(self.cfg.query_timeout) * 5,
        )
        .await
    }

    /// `Database cluster state` from `pg_controldata`.
    pub async fn control_state(&self) -> Result<String, PgError> {
        self.require_cluster()?;
        let mut c = self.tool("pg_controldata")?;
        c.arg("-D").arg(self.data_dir());
        let out = self
            .run(
                "pg_controldata",
                c,
                PgConfig::secs(self.cfg.query_timeout) * 5,
            )
            .await?;
        out.lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| PgError::State("pg_controldata printed no cluster state".into()))
    }

    /// Makes a stopped former primary (or any stopped node) a standby of the
    /// leader: crash recovery in single-user mode if it was not shut down
    /// cleanly (pg_rewind requires a clean shutdown; single-user mode opens no
    /// port, so the node cannot take writes meanwhile), `pg_rewind` (which
    /// itself finds out whether the timelines diverged and does nothing if
    /// not), then [`Pg::start_as_replica`].
    pub async fn rejoin(&self, leader_conninfo: &str) -> Result<RejoinReport, PgError> {
        self.require_cluster()?;
        if let Some(pid) = self.live_postmaster() {
            return Err(PgError::State(format!(
                "PostgreSQL is running (postmaster {pid}): fence or stop it before rejoin"
            )));
        }
        let mut crash_recovery = None;
        let state = self.control_state().await?;
        if state == "in archive recovery" {
            // A crashed standby: single-user crash recovery would end its
            // recovery and write a checkpoint on the same timeline, past the
            // primary's end of WAL; pg_rewind then sees nothing to do and
            // the standby reports a flush position it never received, which
            // releases synchronous commits it does not hold (issue 12,
            // tests/sync.rs strict test). Recover it as a standby of nobody
            // instead, then stop it cleanly ("shut down in recovery").
            let t0 = Instant::now();
            self.clear_stale_lock_files().await?;
            self.start_as_standby(None).await?;
            self.stop_clean().await?;
            crash_recovery = Some(t0.elapsed());
        } else if state != "shut down" && state != "shut down in recovery" {
            // Single-user mode refuses standby mode, and checks the pid file too.
            self.clear_stale_lock_files().await?;
            self.remove_if_present("standby.signal")?;
            self.remove_if_present("recovery.signal")?;
            let t0 = Instant::now();
            let mut c = self.tool("postgres")?;
            c.arg("--single")
                .arg("-D")
                .arg(self.pg_ctl_dir())
                .args(["-c", "archive_mode=off", "-c"])
                .arg(format!("port={}", self.cfg.port))
                .arg(&self.cfg.dbname);
            let r = self
                .run(
                    "postgres --single (crash recovery)",
                    c,
                    PgConfig::secs(self.cfg.start_timeout),
                )
                .await;
            // Whatever happened, a later start by hand must come up read-only.
            self.write_owned("standby.signal", "")?;
            r?;
            crash_recovery = Some(t0.elapsed());
        }
        let source = format!(
            "{leader_conninfo} dbname={}",
            conninfo_value(&self.cfg.dbname)
        );
        self.checkpoint_source(&source).await?;
        let t0 = Instant::now();
        let mut c = self.tool("pg_rewind")?;
        c.arg("--target-pgdata")
            .arg(self.data_dir())
            .arg(format!("--source-server={source}"));
        let r = self
            .run("pg_rewind", c, PgConfig::secs(self.cfg.clone_timeout))
            .await;
        // pg_rewind may drop files the source lacks; a node that fails here
        // must not start as a primary by hand either.
        self.write_owned("standby.signal", "")?;
        let out = r?;
        let rewind = t0.elapsed();
        let rewound = !out.contains("no rewind required");
        self.start_as_replica(leader_conninfo).await?;
        Ok(RejoinReport {
            crash_recovery,
            rewind,
            rewound,
        })
    }

    /// pg_rewind reads the source's timeline from its control file, which a
    /// promotion updates only at the next checkpoint: until then it reports
    /// "same timeline, no rewind required" for a diverged node, which would
    /// then fail to stream. So make the source checkpoint when its control
    /// file lags its current timeline.
    async fn checkpoint_source(&self, source: &str) -> Result<(), PgError> {
        const Q: &str = "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),
              ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";
        // CHECKPOINT on a busy source can take a while: bound it like a start.
        let within = PgConfig::secs(self.cfg.start_timeout);
        let what = "checkpointing the rewind source";
        let mut cfg: tokio_postgres::Config = source
            .parse()
            .map_err(|e| PgError::State(format!("leader conninfo is not valid: {e}")))?;
        let leader = cfg
            .get_hosts()
            .iter()
            .zip(cfg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(h, port)| match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect::<Vec<_>>()
            .join(",");
        if let (None, Some(p)) = (cfg.get_password(), &self.cfg.replication.password) {
            cfg.password(p.as_bytes());
        }
        let r = tokio::time::timeout(within, async {
            let (client, conn) = cfg.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let row = client.query_one(Q, &[]).await?;
            let (ckpt, cur): (i32, i32) = (row.get(0), row.get(1));
            if ckpt != cur {
                // Immediate: the new primary has just been promoted.
                client.batch_execute("CHECKPOINT").await?;
            }
            task.abort();
            Ok::<_, tokio_postgres::Error>(())
        });
        match r.await {
            Err(_) => Err(PgError::Timeout {
                what: what.into(),
                after: within,
            }),
            Ok(Err(e)) => Err(match self.classify(what, e) {
                PgError::Auth {
                    sqlstate, message, ..
                } => PgError::Auth {
                    user: format!("{} (replication)", self.cfg.replication.user),
                    sqlstate,
                    message,
                },
                PgError::Connect { message, .. } => PgError::Connect {
                    target: format!("the leader (rewind source) {leader}"),
                    message,
                },
                other => other,
            }),
            Ok(Ok(())) => Ok(()),
        }
    }
}
