//! The sans-IO decision core.
//!
//! [`Core::handle`] takes one observation and a CLOCK_BOOTTIME reading and
//! returns the actions to take, in order. It never reads a clock, sleeps,
//! does I/O or awaits: the drivers in `agent` execute the actions and feed
//! their outcomes back as new inputs. Every rule of docs/fencing.md that concerns
//! *when* to act is decided here, so each is a unit test below.
//!
//! Rules that live here by name: [`arm_before_promote`] (rule 2) and
//! [`may_disarm`] (rule 4); rule 1 is `timing::ping_permitted`, applied by the
//! pinger to the evidence this core publishes.
//!
//! PostgreSQL's decisions live here too (see [`pg`] and [`member`]): whether
//! this node is eligible (lag behind the leader's published LSN), fencing a
//! writable server before following the leader, the synchronous standby
//! names a leader wants, and when a member record is due. The agent observes
//! and executes; it decides none of these.

pub mod bootstrap;
pub mod member;
pub mod pause;
pub mod pg;
pub mod settings;
pub mod slots;
pub mod switchover;
pub mod sync;

pub use bootstrap::InitKey;
pub use member::{Member, LSN_EVERY_LOOPS};
pub use pause::{CallbackEvent, Op};
pub use pg::{PgRole, PgSettings};

use crate::clock::BootTime;
use crate::config::WatchdogMode;
use crate::postgres::WalPosition;
use crate::timing::{self, Budget};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// etcd's lessor checks expiry every 500 ms; a key on a lease last renewed at
/// `s` is surely gone by `s + T + EXPIRY_SLACK` as far as this node can tell.
pub const EXPIRY_SLACK: Duration = Duration::from_millis(1500);

/// Unanswered releases in a row after which the lease that holds the key
/// is let go (no longer renewed, revoked if etcd answers): a node that
/// cannot release must not hold the key forever.
pub const RELEASE_ATTEMPTS: u32 = 3;

/// Other holders' leases a node keeps owing a wait (see `Core::owed`):
/// past this many, the one seen on the key longest ago is forgotten.
pub const OWED_LEASES_CAP: usize = 16;

/// Loops to wait after a failed `StartStandby` before the next attempt.
pub const START_BACKOFF_LOOPS: u32 = 10;

/// Who holds the leader key, as far as the last read or watch event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHolder {
    /// Not read yet (or the watch broke and a re-read is pending).
    Unknown,
    /// The key does not exist.
    Nobody,
    /// This node, on its current lease.
    Us,
    /// Another node (or this node's name on a lease this process does not own).
    Other(String),
    /// The key holds something that is not a leasedog record.
    Garbage,
}

/// What the pinger may act on. Published as one atomic value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Do not ping.
    None,
    /// Leader: ping while `timing::ping_permitted(now, s)`, `s` being the send
    /// time of the last keepalive etcd acknowledged.
    Lease(BootTime),
    /// A replica still holding a device it cannot disarm (nowayout), after
    /// its key was released or expired: the watchdog only guards the agent's
    /// own liveness; the same window applies to the main loop's last tick.
    Liveness(BootTime),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDownReason {
    /// `now > s + T - M` (rule 3).
    Deadline,
    /// etcd says the lease is gone.
    LeaseLost,
    /// Another holder (or nobody) owns the key.
    KeyLost,
    /// Promotion failed; PostgreSQL's state is unknown.
    PromoteFailed,
    /// The leader's PostgreSQL is down (crashed or stopped behind our back):
    /// hand the key over rather than lead nothing.
    PostgresDown,
    /// SIGTERM / SIGINT.
    Shutdown,
    /// A planned switchover (`decide::switchover`): the key stays ours
    /// until the target has the final WAL.
    Switchover,
}

impl StepDownReason {
    /// The stable name stored in audit records (never a `Debug` string).
    pub fn as_str(&self) -> &'static str {
        match self {
            StepDownReason::Deadline => "deadline",
            StepDownReason::LeaseLost => "lease_lost",
            StepDownReason::KeyLost => "key_lost",
            StepDownReason::PromoteFailed => "promote_failed",
            StepDownReason::PostgresDown => "postgres_down",
            StepDownReason::Shutdown => "shutdown",
            StepDownReason::Switchover => "switchover",
        }
    }
}

/// PostgreSQL as the driver last observed it (`Unmanaged` when the agent
/// runs without a `[postgres]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgView {
    Unmanaged,
    /// Not running (stopped, fenced, crashed, or never started).
    Down,
    /// Running and writable.
    Primary,
    /// Running in recovery, streaming from `following` when known.
    Replica {
        following: Option<String>,
    },
    /// A rejoin or clone is in progress.
    Busy,
}

impl PgView {
    /// The stable name stored in member records.
    pub fn as_str(&self) -> &'static str {
        match self {
            PgView::Unmanaged => "unmanaged",
            PgView::Down => "down",
            PgView::Primary => "primary",
            PgView::Replica { .. } => "replica",
            PgView::Busy => "busy",
        }
    }
}

/// Outcome of arming every configured device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmOutcome {
    /// Devices armed, with the timeout read back and nowayout.
    pub armed: Vec<ArmedDevice>,
    /// Devices that could not be armed, with the reason.
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmedDevice {
    pub path: String,
    pub identity: String,
    pub w_secs: u32,
    pub nowayout: bool,
}

/// Observations fed to the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The agent started: nothing is known yet.
    Start,
    /// The loop timer fired.
    Tick,
    /// When the pinger thread last woke (read from its stats before each
    /// tick). A leader whose pinger has been silent withholds its renewals
    /// ([`Core::pinger_silent`]).
    PingerWoke {
        at: BootTime,
    },
    /// A lease was granted; `sent` is when the grant request was sent (etcd
    /// starts the TTL on receipt, so `sent` is valid evidence like a renewal).
    LeaseGranted {
        lease: i64,
        sent: BootTime,
    },
    /// Granting failed (etcd unreachable, ...).
    GrantFailed {
        error: String,
    },
    /// A keepalive sent at `sent` was acknowledged with `ttl` seconds left.
    Renewed {
        sent: BootTime,
        ttl: i64,
    },
    /// A keepalive failed or missed its deadline. Freshness ages by itself.
    RenewFailed {
        sent: BootTime,
        error: String,
    },
    /// etcd answered that the lease no longer exists (TTL <= 0).
    LeaseGone,
    /// The leader key as read or watched. `lease`: the etcd lease the key
    /// is attached to; for a deletion, the lease the deleted key was on (the
    /// watch's previous value); `None` when absent or not known.
    KeySeen {
        holder: KeyHolder,
        revision: i64,
        lease: Option<i64>,
    },
    /// Outcome of `CheckLeaseGone`: whether `lease` still exists in etcd,
    /// with its remaining TTL in seconds (0 when gone). Not sent when etcd
    /// did not answer: the core asks again on its next loop.
    PreviousLease {
        lease: i64,
        alive: bool,
        ttl: i64,
    },
    /// Our compare-and-set created the key at `revision`.
    Won {
        revision: i64,
    },
    /// The compare-and-set could not be sent or answered.
    AcquireFailed {
        error: String,
    },
    /// Arming finished (some devices may have failed).
    Armed(ArmOutcome),
    /// Arming could not start (evidence went stale, or nothing to arm).
    ArmFailed {
        reason: String,
    },
    Promoted,
    PromoteFailed {
        reason: String,
    },
    /// PostgreSQL is confirmed stopped (no backend can commit).
    SteppedDown {
        how: String,
    },
    StepDownFailed {
        reason: String,
    },
    /// The independent deadline timer (rule 3) stopped PostgreSQL itself
    /// because the main loop was too late to.
    FencedByTimer {
        how: String,
    },
    /// The key was deleted by our release (true) or was no longer ours
    /// (false); `revision`: the release transaction's etcd revision.
    Released {
        deleted: bool,
        revision: Option<i64>,
    },
    ReleaseFailed {
        error: String,
    },
    /// Every device that could be disarmed was (magic close).
    Disarmed,
    /// Whether this node may race for the key (healthy, lag within bounds).
    /// The agent feeds [`Input::PgObserved`] instead and lets the core judge;
    /// this stays for drivers (simulations) that model PostgreSQL abstractly.
    Eligibility {
        eligible: bool,
        reason: String,
    },
    /// PostgreSQL's state as an abstract view (no eligibility judgement).
    /// The agent feeds [`Input::PgObserved`].
    Postgres(PgView),
    /// PostgreSQL answered the observer's status query (once per loop, from
    /// a task of its own, never on the renewal path). The core derives the
    /// view, the eligibility and the LSN of its member record from it.
    PgObserved {
        role: PgRole,
        wal: Option<WalPosition>,
        /// The data directory holds a cluster (`Pg::data_dir_state`): a
        /// stopped server can be started as a standby.
        has_data: bool,
    },
    /// Outcome of `StartStandby`.
    StandbyStarted {
        ok: bool,
    },
    /// The status query failed (timeout, credentials, another data
    /// directory): the server's state is unknown, so the node is not eligible.
    PgObserveFailed {
        error: String,
    },
    /// A `Fence` finished: PostgreSQL is stopped (`ok`) or may still run.
    Fenced {
        ok: bool,
        how: String,
    },
    /// Outcome of `RefreshLeaderMember`: the leader's record (None: absent,
    /// unreadable or etcd did not answer; the last one seen is kept).
    LeaderMember {
        leader: String,
        member: Option<Member>,
    },
    /// Outcome of `PublishMember`.
    MemberPublished {
        member: Member,
        ok: bool,
    },
    /// Synchronous mode: the `application_name`s streaming from this
    /// (primary) server, as the observer saw them.
    StandbysSeen {
        standbys: Vec<String>,
    },
    /// Outcome of `SetSyncStandbys`.
    SyncStandbysSet {
        value: String,
        ok: bool,
    },
    /// A `Follow` finished (PostgreSQL runs as a replica of `leader`) or failed.
    Followed {
        leader: String,
        ok: bool,
    },
    /// The leader watch broke: who holds the key is unknown until re-read.
    WatchBroken,
    /// A reading of the key (a `ReadKey`, or a lost `Acquire`) while no
    /// watch runs: its set-up failed (etcd just regained its quorum, a
    /// member still starting). The reading counts; the key is read and
    /// watched again at every tick until a watch runs, whatever the role,
    /// since a node that knows the holder never reads the key by itself.
    KeySeenUnwatched {
        holder: KeyHolder,
        revision: i64,
        lease: Option<i64>,
    },
    /// SIGTERM or SIGINT.
    Shutdown,
    /// Outcome of `StopPostgres`: `error` when the fast stop failed or
    /// timed out (the agent has logged it and exits all the same).
    PostgresStopped {
        error: Option<String>,
    },
    /// Outcome of `WriteSync` (`ok`: written, the key still ours).
    SyncWritten {
        state: sync::SyncState,
        ok: bool,
    },
    /// Outcome of `ReadCandidates`: the `sync` key (None: absent) and every
    /// member record with its etcd mod revision (`ok`: etcd answered).
    Candidates {
        sync: Option<sync::SyncState>,
        members: Vec<(Member, i64)>,
        ok: bool,
    },
    /// Our compare-and-set created the key at `revision`, with what etcd's
    /// history of the key says came before it (the driver reads it from
    /// [`Core::history_from`] up to `revision`): `previous`, the lease of
    /// every holder the key had in that range; `complete`: false when the
    /// range was compacted away or the read failed or timed out. The agent
    /// always reports a win this way; `Won { revision }` is this with no
    /// previous holder and a complete history.
    WonAfter {
        revision: i64,
        previous: Vec<i64>,
        complete: bool,
    },
    /// Outcome of `ReadHolders`: the key found on this follower's own lease
    /// at `revision` and what etcd's history says came before it, as in
    /// [`Input::WonAfter`].
    HoldersRead {
        revision: i64,
        previous: Vec<i64>,
        complete: bool,
    },
    /// The scope's pause key as read (`decide::pause`).
    Paused {
        paused: bool,
    },
    /// A request for this node's PostgreSQL (`<scope>/requests/<node>`).
    OpRequested {
        id: String,
        op: Op,
    },
    /// A `RunOp` finished.
    OpDone {
        id: String,
        ok: bool,
        detail: String,
    },
    /// Outcome of `ReadSwitchover`: the request (if any), the target's
    /// member record with the lease it is on, whether `{scope}/pause`
    /// exists, and the wall clock (seconds since the epoch) for `--at`.
    SwitchoverSeen {
        request: Option<switchover::Request>,
        target: Option<(Member, i64)>,
        paused: bool,
        unix_now: u64,
    },
    /// Outcome of `ReadShutdownCheckpoint` (`pg_controldata`): the cluster
    /// state and the latest checkpoint location (an error reads as state).
    ShutdownCheckpoint {
        state: String,
        checkpoint: Option<u64>,
    },
    /// Outcome of `CheckTargetLsn`: the target's `pg_last_wal_receive_lsn()`
    /// (None: no answer).
    TargetLsn {
        receive: Option<u64>,
    },
    /// Outcome of `HandOver`: the revision at which the key passed to the
    /// target, or None (compare failed, no answer).
    HandedOver {
        revision: Option<i64>,
    },
    /// The scope's `initialize` key as read, or as a claim left it
    /// (`Claimed` by this node: the claim won). See [`bootstrap`].
    InitializeSeen {
        key: InitKey,
    },
    /// This node's `initdb` ended.
    InitdbDone {
        result: Result<(), String>,
    },
    /// `FinishInitialize` was answered (`ok`: the key is permanent, ours).
    InitializeFinished {
        ok: bool,
    },
    /// Cluster-wide settings from etcd, validated against this node's
    /// budget ([`settings`]).
    ClusterSettings {
        loop_interval: Duration,
        maximum_lag_on_failover: u64,
        synchronous_mode: bool,
    },
    /// The scope's member records (`Action::ReadMembers`; unreadable ones
    /// left out).
    MembersSeen {
        members: Vec<Member>,
    },
    /// `Action::SyncSlots` ended.
    SlotsSynced {
        wanted: Vec<String>,
        ok: bool,
    },
}

/// What happened, for the audit log (docs/fencing.md rule 7).
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    LeaseGranted {
        lease: i64,
    },
    Acquired {
        lease: i64,
        revision: i64,
        s: BootTime,
        /// PostgreSQL as last observed when the key was won
        /// ([`PgView::as_str`]).
        postgres: &'static str,
    },
    /// Rule 8: PostgreSQL was writable while this node did not lead and was
    /// fenced (`ok`: confirmed stopped).
    FencedNotLeader {
        holder: KeyHolder,
        how: String,
        ok: bool,
    },
    LeaderSeen {
        holder: KeyHolder,
        revision: i64,
    },
    RenewedLate {
        sent: BootTime,
        acked: BootTime,
    },
    /// A leader stopped renewing: its pinger had not woken for `silent`
    /// (starved or stalled), so its watchdog will reset the node and a
    /// renewal would only keep the key from the others longer.
    RenewalWithheld {
        silent: Duration,
    },
    LeaseLost {
        last_s: Option<BootTime>,
    },
    Armed(ArmedDevice),
    ArmFailed {
        device: String,
        reason: String,
    },
    LeadingUnarmed {
        reason: String,
    },
    Promoted,
    StepDownBegun {
        reason: StepDownReason,
        deadline: Option<BootTime>,
    },
    StepDownConfirmed {
        how: String,
    },
    StepDownFailed {
        reason: String,
    },
    Released {
        deleted: bool,
        revision: Option<i64>,
    },
    /// A release was not answered (`attempts` in a row). `abandoned`: the
    /// lease that holds the key is no longer renewed (revoked if etcd
    /// answers, else it expires), rather than hold the key forever.
    ReleaseFailed {
        error: String,
        attempts: u32,
        abandoned: bool,
    },
    /// Won after a holder on `lease`: promotion waits until it is gone.
    AwaitingPreviousLease {
        lease: i64,
    },
    /// The previous holder's lease is gone (`waited` since the win):
    /// promotion may follow.
    PreviousLeaseGone {
        lease: i64,
        waited: Duration,
    },
    /// The previous holder's lease outlived `T + EXPIRY_SLACK` after the
    /// win: its holder still renews it; the key is given back unpromoted.
    PreviousLeaseAlive {
        lease: i64,
        ttl: i64,
    },
    Disarmed,
    NowayoutKeptArmed {
        devices: Vec<String>,
    },
    Shutdown,
    /// The leader wrote the `sync` key (see [`sync`]); `fallback`: no
    /// synchronous standby left, non-strict mode: commits are asynchronous.
    SyncRecorded {
        members: Vec<String>,
        quorum: u32,
        fallback: bool,
    },
    /// A follower holds back its race for the empty key (`deferred`: for
    /// at most `postgres.failover_defer`), and why.
    RaceHeld {
        reason: String,
        deferred: bool,
    },
    /// Won without knowing every earlier holder of the key (its history
    /// was compacted or could not be read): promotion waits `wait` after
    /// the win (see [`Core::history_from`]).
    PreviousHoldersUnknown {
        wait: Duration,
    },
    /// Pause, resume, a request begun, done, failed or refused (`decide::pause`).
    Maintenance {
        what: String,
        detail: String,
    },
    /// A switchover to `to` was judged safe: the planned step-down begins.
    SwitchoverBegun {
        to: String,
    },
    SwitchoverRefused {
        to: String,
        reason: String,
    },
    /// The key passed to `to` at `revision`, after `to` received the WAL
    /// up to the shutdown checkpoint at `final_lsn`.
    SwitchoverHandedOver {
        to: String,
        revision: i64,
        final_lsn: u64,
    },
    /// The switchover stopped before the hand-over; this node takes its
    /// server back under the key it still holds.
    SwitchoverAborted {
        to: String,
        reason: String,
    },
    /// This node won the scope's `initialize` key on `lease` and runs `initdb`.
    BootstrapClaimed {
        lease: i64,
    },
    /// This node's `initdb` ended (`detail`: the error when not `ok`).
    Initdb {
        ok: bool,
        detail: String,
    },
}

/// Side effects for the drivers, in the order they must happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Grant,
    Renew {
        lease: i64,
    },
    ReadKey,
    Acquire {
        lease: i64,
    },
    /// Open, set, read back and ping every device, but not after `not_after`
    /// (the evidence that permits the first ping runs out then).
    Arm {
        not_after: BootTime,
    },
    /// Store this for the pinger (and the deadline timer). Always the first
    /// action after a renewal, before any other etcd or PostgreSQL work.
    Publish(Evidence),
    Promote,
    /// Ask etcd whether `lease` (the previous holder's) still exists
    /// (`LeaseTimeToLive`). Outcome: [`Input::PreviousLease`]. A deletion
    /// of the key is not an expiry: the winner promotes only once the lease
    /// that held the key before it is gone (docs/fencing.md).
    CheckLeaseGone {
        lease: i64,
    },
    /// Read etcd's history of the leader key from store revision `from` up
    /// to `before` (exclusive): every lease that held it (as after a won
    /// race). Outcome: [`Input::HoldersRead`], always sent (an unanswered
    /// read is an incomplete history).
    ReadHolders {
        from: i64,
        before: i64,
    },
    /// Stop PostgreSQL and confirm it (outcome [`Input::SteppedDown`] or
    /// [`Input::StepDownFailed`]). `fast`: a planned step-down (SIGTERM
    /// handover with fresh evidence and the key still ours) may first try a
    /// fast shutdown (shutdown checkpoint sent to the connected standbys)
    /// for at most this long, then the fence; it ends before the demotion
    /// deadline `s + T - M`. `None`: the fence at once (rule 3).
    StepDown {
        reason: StepDownReason,
        fast: Option<Duration>,
    },
    /// Not leading and PostgreSQL is writable: stop it at once (immediate
    /// stop, SIGKILL if needed). Outcome: [`Input::Fenced`]; a follower
    /// follows the leader only after a successful fence.
    Fence,
    /// Run PostgreSQL as a replica of `leader` (never emitted while it is
    /// observed writable: that is a `Fence` first): stop, rewind or clone
    /// as needed, from the address in the leader's member record
    /// ([`Core::leader_member`]). Runs in the background; outcome
    /// [`Input::Followed`].
    Follow {
        leader: String,
        /// An empty data directory is cloned from this member (tagged
        /// `clonefrom`, [`bootstrap::clone_source`]), then replicates from
        /// the leader; None: cloned from the leader.
        clone_from: Option<bootstrap::CloneSource>,
    },
    /// Start a stopped PostgreSQL (observed down, a cluster in its data
    /// directory, no `Follow` running, this node not leading) as a standby
    /// (`standby.signal`: never writable) of `leader` when its address is
    /// known, else of nobody: after a full-cluster reboot a running replica
    /// is eligible, so one node is elected and promotes. Runs in the
    /// background; outcome [`Input::StandbyStarted`], retried after
    /// [`START_BACKOFF_LOOPS`] loops on failure.
    StartStandby {
        leader: Option<String>,
    },
    /// Write this node's member record on the current lease. Outcome:
    /// [`Input::MemberPublished`] (may arrive later: off the renewal path).
    PublishMember(Member),
    /// Read `leader`'s member record. Outcome: [`Input::LeaderMember`].
    RefreshLeaderMember {
        leader: String,
    },
    /// Synchronous mode: set `synchronous_standby_names` to this value.
    /// Outcome: [`Input::SyncStandbysSet`].
    SetSyncStandbys(String),
    Release {
        lease: i64,
    },
    Disarm,
    /// A follower's clean stop at shutdown: stop the managed PostgreSQL (a
    /// standby) with a fast shutdown before the agent exits. Outcome:
    /// [`Input::PostgresStopped`].
    StopPostgres,
    Revoke {
        lease: i64,
    },
    Record(Fact),
    Exit {
        code: i32,
    },
    /// Synchronous mode: write the `sync` key, compare-and-set on this
    /// leader's lease holding the leader key. Outcome: [`Input::SyncWritten`].
    WriteSync(sync::SyncState),
    /// Read the `sync` key and every member record before racing for an
    /// empty key. Outcome: [`Input::Candidates`].
    ReadCandidates,
    /// Run a request on this node's PostgreSQL in the background: `Restart`
    /// stops it and starts it as a standby (of `leader`, else of nobody;
    /// a leader then promotes it again), `Reinit` wipes the data directory
    /// and clones it from `leader`. Outcome: [`Input::OpDone`].
    RunOp {
        id: String,
        op: Op,
        leader: Option<String>,
        /// A reinit clones from this member (tagged `clonefrom`), then
        /// replicates from `leader`; None: from the leader.
        clone_from: Option<bootstrap::CloneSource>,
    },
    /// Write a request's outcome back to etcd (`<scope>/results/<node>`).
    ReportOp {
        id: String,
        ok: bool,
        detail: String,
    },
    /// Run the `[callbacks]` command for `event` as `COMMAND event role
    /// scope`, in the background: nothing waits for it.
    Callback {
        event: CallbackEvent,
        role: &'static str,
    },
    /// Read `{scope}/switchover`, the target's member record and lease, and
    /// `{scope}/pause`. Outcome: [`Input::SwitchoverSeen`] (off the loop).
    ReadSwitchover,
    /// Write the answer to a switchover request (best effort, off the loop).
    AnswerSwitchover(switchover::Answer),
    /// `pg_controldata` of the stopped server. Outcome: [`Input::ShutdownCheckpoint`].
    ReadShutdownCheckpoint,
    /// Ask the target's PostgreSQL for its receive LSN, bounded, off the
    /// loop. Outcome: [`Input::TargetLsn`].
    CheckTargetLsn {
        host: String,
        port: u16,
    },
    /// Put the leader key, compared on this node's value and `lease`, as
    /// `to`'s on `to_lease`. Outcome: [`Input::HandedOver`].
    HandOver {
        lease: i64,
        to: String,
        to_lease: i64,
    },
    /// Read the scope's `initialize` key. Outcome: [`Input::InitializeSeen`]
    /// (none if etcd does not answer: read again next loop).
    ReadInitialize,
    /// Create the `initialize` key on `lease` if absent (create revision
    /// 0). Outcome: [`Input::InitializeSeen`] with the key as it stands.
    ClaimInitialize {
        lease: i64,
    },
    /// Run `initdb` (options `postgres.initdb`) in the background. Outcome:
    /// [`Input::InitdbDone`].
    Initdb,
    /// Make our claim on `lease` permanent (`Done`, no lease). Outcome:
    /// [`Input::InitializeFinished`].
    FinishInitialize {
        lease: i64,
    },
    /// Delete our claim on `lease` after a failed `initdb`. No outcome.
    AbandonInitialize {
        lease: i64,
    },
    /// Write `Done` naming this node if no `initialize` key exists (a
    /// leader of a scope made before the key existed). No outcome.
    MarkInitialized,
    /// List the scope's member records. Outcome: [`Input::MembersSeen`]
    /// (none if etcd does not answer).
    ReadMembers,
    /// Leader: make the physical slots named `leasedog_*` exactly `wanted`
    /// (create missing ones, drop inactive others). Outcome:
    /// [`Input::SlotsSynced`]. See [`slots`].
    SyncSlots {
        wanted: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Won the key; waiting for fresh evidence and the devices.
    Arming,
    Promoting,
    Leader,
    /// Pings stopped; PostgreSQL being stopped.
    SteppingDown,
    /// PostgreSQL confirmed stopped; waiting for the key to be gone to disarm.
    Fenced,
    Exited,
}

impl Role {
    /// The stable name stored in member records and shown by `status`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Follower => "Follower",
            Role::Arming => "Arming",
            Role::Promoting => "Promoting",
            Role::Leader => "Leader",
            Role::SteppingDown => "SteppingDown",
            Role::Fenced => "Fenced",
            Role::Exited => "Exited",
        }
    }
}

/// The stable name of a watchdog mode (as configured, and in member records).
pub fn mode_name(mode: WatchdogMode) -> &'static str {
    match mode {
        WatchdogMode::Off => "off",
        WatchdogMode::Automatic => "automatic",
        WatchdogMode::Required => "required",
    }
}

/// Fixed settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub budget: Budget,
    pub mode: WatchdogMode,
}

/// Rule 2: promotion is allowed only once every required device is armed
/// (mode `required`: all configured devices and none failed; `automatic`:
/// whatever could be armed; `off`: no devices).
pub fn arm_before_promote(mode: WatchdogMode, outcome: &ArmOutcome) -> Result<(), String> {
    match mode {
        WatchdogMode::Required if !outcome.failed.is_empty() => Err(format!(
            "required watchdog not armed: {}",
            outcome
                .failed
                .iter()
                .map(|(d, e)| format!("{d}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
        WatchdogMode::Required if outcome.armed.is_empty() => {
            Err("required watchdog: no device armed".into())
        }
        _ => Ok(()),
    }
}

/// Rule 4: a device may be disarmed only when PostgreSQL is confirmed
/// stopped and the key is released or expired.
pub fn may_disarm(postgres_stopped: bool, key_gone: bool) -> bool {
    postgres_stopped && key_gone
}

/// The decision core's state. See the module documentation.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    role: Role,
    lease: Option<i64>,
    /// Send time of the last acknowledged keepalive (or grant) on `lease`.
    s: Option<BootTime>,
    holder: KeyHolder,
    /// Devices are open in the pinger (armed) and not yet disarmed.
    armed: bool,
    /// When `armed` last became true.
    armed_at: Option<BootTime>,
    /// The pinger's last wake-up as the driver last reported it.
    pinger_woke: Option<BootTime>,
    /// A `RenewalWithheld` is recorded for the current silence.
    withholding: bool,
    /// Some armed device has nowayout: it cannot be disarmed.
    nowayout: Vec<String>,
    /// PostgreSQL confirmed stopped since we last led.
    stopped: bool,
    /// The key we held is released or expired.
    key_gone: bool,
    eligible: bool,
    /// Why not, when not eligible.
    ineligible_because: String,
    pg: PgView,
    /// The leader a `Follow` was last asked for (not repeated while pending).
    following: Option<String>,
    /// Do not race for the key before this instant (after a failed arm).
    backoff_until: BootTime,
    shutting_down: bool,
    /// A `StopPostgres` at shutdown is pending (`Exit` waits for it).
    stopping_pg: bool,
    /// That stop ran (it is asked once).
    pg_stop_done: bool,
    granting: bool,
    /// The newest etcd revision at which the key was read, watched or won:
    /// older reports are stale.
    key_revision: i64,
    /// This node's name: member records are published (see [`Core::with_node`]).
    node: Option<String>,
    /// The managed PostgreSQL (see [`Core::with_postgres`]).
    pgs: Option<PgSettings>,
    /// A `Follow` runs in the background (observations read as `Busy`).
    busy: bool,
    /// The leader our PostgreSQL streams from, as arranged by the last `Follow`.
    following_pg: Option<String>,
    /// Our PostgreSQL's WAL position at the last observation.
    last_lsn: Option<u64>,
    /// The current (or last) leader's member record.
    leader_member: Option<Member>,
    leader_member_pending: bool,
    /// Our last written member record and the loop it was written at.
    published: Option<(Member, u64)>,
    /// A `PublishMember` is out, on this lease.
    publish_pending: Option<i64>,
    /// `synchronous_standby_names` as last set or seen (synchronous mode).
    sync_names: Option<String>,
    sync_pending: bool,
    /// Loops (ticks) so far, for the member and re-read cadences.
    ticks: u64,
    last_tick: Option<BootTime>,
    /// Every other holder's lease seen on the key (a read, a watch event,
    /// or a deletion's previous value) and not yet confirmed gone, with
    /// when it was last seen holding or losing the key. A win waits until
    /// all of them are gone, not only the last one: after `etcdctl del` of
    /// A's key, B may win on b, wait for a, give the key back and release
    /// (b revoked at once); a winner that waited only for b would promote
    /// beside A.
    ///
    /// Entries leave only when etcd says the lease is gone
    /// (`Input::PreviousLease { alive: false }`, in any role), never by
    /// age: an entry last seen more than `T + EXPIRY_SLACK` ago is either
    /// gone (asking costs one request) or still renewed by a holder that
    /// has not stopped, and nothing on this side bounds how long that lasts
    /// (B's give-back after `T + EXPIRY_SLACK` is exactly the case where
    /// a's holder still renews a; C winning after B's give-back wins more
    /// than `T + EXPIRY_SLACK` after a was last seen, and must still wait).
    /// So the count is capped instead ([`OWED_LEASES_CAP`]): past it, the
    /// entry seen longest ago is forgotten, and a win no longer waits for
    /// that lease; its holder is then covered only by its own reaction (its
    /// watch, failing renewals, rule 3), as after a revoke by hand. A
    /// follower that never wins keeps every leader's lease it saw, so in a
    /// long-lived cluster the forgotten one is the oldest leader's, gone
    /// long ago.
    owed: BTreeMap<i64, BootTime>,
    /// The revision of the first key report after start-up or a broken
    /// watch, and when this core got it: every holder whose key went before
    /// that revision lost it before that instant (see `history_from`).
    /// `None` also tells a leader to re-read every loop.
    watch_from: Option<(i64, BootTime)>,
    /// The key found on this follower's own lease (a switchover's hand-over,
    /// `failover --to`, an unanswered acquire that etcd applied): the
    /// revision and lease whose history read (`ReadHolders`) is awaited
    /// before the win is taken, and when it was asked.
    holders_read: Option<(i64, i64, BootTime)>,
    /// Releases failed in a row (see [`RELEASE_ATTEMPTS`]).
    release_failures: u32,
    /// A follower's release of the key on this lease (after a refused arming
    /// or a give-back) is still to be answered: retried every loop.
    unreleased: Option<i64>,
    /// Armed (or arming) after a win whose `Promote` is held back: until the
    /// previous holder's lease is gone, and until the evidence is fresh.
    hold: Option<PromoteHold>,
    /// The data directory held a cluster at the last observation.
    pg_has_data: bool,
    /// No `StartStandby` before this instant (after a failed one).
    start_backoff_until: BootTime,
    /// A `StartStandby` runs (no `Follow` beside it).
    starting: bool,
    /// The `sync` key as this leader last wrote it (None: unknown).
    sync_recorded: Option<sync::SyncState>,
    /// The candidates check of the current vacancy (`sync::RaceGate`).
    race_gate: sync::RaceGate,
    /// Pause and requests (`decide::pause`).
    maint: pause::Maintenance,
    /// A planned switchover (`decide::switchover`).
    switch: switchover::Switch,
    /// The last WAL position observed (member record: timeline, LSNs).
    last_wal: Option<WalPosition>,
    /// The smallest watchdog timeout `W` armed (member record).
    w_secs: Option<u32>,
    /// Ineligible only because the running replica lags (`failover --to`).
    lagging_only: bool,
    /// Bootstrap of an empty scope ([`bootstrap`]).
    boot: bootstrap::Bootstrap,
    /// `tags.nofailover`: never races for the leader or `initialize` key.
    nofailover: bool,
    /// `[tags]` as published in the member record (`nosync`, `clonefrom`
    /// are for the peers to act on).
    tags: member::Tags,
    /// Clone sources for an empty data directory ([`bootstrap::clone_source`]).
    clone: bootstrap::CloneState,
    /// Replication slots a leader keeps ([`slots`]).
    slots: slots::Slots,
}

/// Why a won key's promotion waits (see [`Core::try_promote`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PromoteHold {
    /// The other holders' leases owed a wait at the win (`Core::owed`),
    /// each until etcd says it is gone.
    leases: BTreeSet<i64>,
    /// When the key was won: the wait is bounded by `T + EXPIRY_SLACK`.
    since: BootTime,
    /// Not promoted before this instant: the win's history was incomplete.
    not_before: Option<BootTime>,
    /// Arming is done: only the hold keeps `Promote` back.
    armed: bool,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Core {
        Core {
            cfg,
            role: Role::Follower,
            lease: None,
            s: None,
            holder: KeyHolder::Unknown,
            armed: false,
            armed_at: None,
            pinger_woke: None,
            withholding: false,
            nowayout: Vec::new(),
            stopped: true,
            key_gone: true,
            eligible: true,
            ineligible_because: String::new(),
            pg: PgView::Unmanaged,
            following: None,
            backoff_until: BootTime::ZERO,
            shutting_down: false,
            stopping_pg: false,
            pg_stop_done: false,
            granting: false,
            key_revision: 0,
            node: None,
            pgs: None,
            busy: false,
            following_pg: None,
            last_lsn: None,
            leader_member: None,
            leader_member_pending: false,
            published: None,
            publish_pending: None,
            sync_names: None,
            sync_pending: false,
            ticks: 0,
            last_tick: None,
            owed: BTreeMap::new(),
            watch_from: None,
            holders_read: None,
            release_failures: 0,
            unreleased: None,
            hold: None,
            pg_has_data: false,
            start_backoff_until: BootTime::ZERO,
            starting: false,
            sync_recorded: None,
            race_gate: sync::RaceGate::default(),
            maint: Default::default(),
            switch: switchover::Switch::default(),
            last_wal: None,
            w_secs: None,
            lagging_only: false,
            boot: bootstrap::Bootstrap::default(),
            nofailover: false,
            tags: member::Tags::default(),
            clone: bootstrap::CloneState::default(),
            slots: slots::Slots::default(),
        }
    }

    /// `tags.nofailover`: this node never races for the leader key (nor
    /// creates the scope's cluster); it only ever replicates.
    pub fn with_nofailover(mut self, nofailover: bool) -> Core {
        self.nofailover = nofailover;
        self
    }

    /// The node's `[tags]`: `nofailover` as [`Core::with_nofailover`];
    /// all of them published in the member record.
    pub fn with_tags(mut self, tags: member::Tags) -> Core {
        self.nofailover = tags.nofailover;
        self.tags = tags;
        self
    }

    /// Publishes member records for `node` (`Action::PublishMember`) and
    /// follows a leader only once its record (the PostgreSQL address) is known.
    pub fn with_node(mut self, node: impl Into<String>) -> Core {
        self.node = Some(node.into());
        self
    }

    /// Manages a PostgreSQL: not eligible until it has been observed once
    /// (`Input::PgObserved`).
    pub fn with_postgres(mut self, pg: PgSettings) -> Core {
        self.pgs = Some(pg);
        self.eligible = false;
        self.ineligible_because = "PostgreSQL not observed yet".into();
        self
    }

    /// Whether this node may race for the key, and why not.
    pub fn eligibility(&self) -> Result<(), &str> {
        if self.eligible {
            Ok(())
        } else {
            Err(&self.ineligible_because)
        }
    }

    /// PostgreSQL as last observed.
    pub fn pg_view(&self) -> &PgView {
        &self.pg
    }

    /// The current (or last) leader's member record, as last read.
    pub fn leader_member(&self) -> Option<&Member> {
        self.leader_member.as_ref()
    }

    /// Devices armed with nowayout: `Disarm` must keep them open (and the
    /// core keeps pinging them on liveness as a replica).
    pub fn nowayout_devices(&self) -> &[String] {
        &self.nowayout
    }

    /// The next instant at which the core needs an `Input::Tick` (like
    /// quinn-proto's `poll_timeout`): the next loop (`loop_interval` after
    /// the last tick), and earlier when a deadline of its own falls first:
    /// just past the demotion deadline while leading (rule 3, in the loop),
    /// the end of a back-off, or the lease's sure expiry while fenced.
    /// `None` before the first tick (tick now) and once exited.
    pub fn next_deadline(&self) -> Option<BootTime> {
        if self.role == Role::Exited {
            return None;
        }
        let last = self.last_tick?;
        let mut next = last + self.budget().loop_interval;
        let mut earlier = |t: BootTime| {
            if t < next {
                next = t;
            }
        };
        const JUST_PAST: Duration = Duration::from_nanos(1);
        match (&self.role, self.s) {
            (Role::Arming | Role::Promoting | Role::Leader, Some(s)) => {
                earlier(timing::demotion_deadline(s, self.budget()) + JUST_PAST)
            }
            (Role::Fenced, Some(s)) if !self.key_gone => {
                earlier(timing::earliest_expiry(s, self.budget()) + EXPIRY_SLACK + JUST_PAST)
            }
            (Role::Follower, _) if self.backoff_until > last => earlier(self.backoff_until),
            _ => {}
        }
        Some(next)
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    pub fn last_fresh(&self) -> Option<BootTime> {
        self.s
    }

    pub fn holder(&self) -> &KeyHolder {
        &self.holder
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    fn budget(&self) -> &Budget {
        &self.cfg.budget
    }

    fn leading(&self) -> bool {
        matches!(self.role, Role::Arming | Role::Promoting | Role::Leader)
    }

    /// How long an armed node's pinger has been silent, if longer than
    /// [`timing::pinger_silent`] allows: counted from its last reported
    /// wake-up or from the arming, whichever is later. Only once the driver
    /// reports wake-ups at all (unit tests of other rules feed none).
    pub fn pinger_silent(&self, now: BootTime) -> Option<Duration> {
        let woke = self.pinger_woke?;
        if !self.armed {
            return None;
        }
        let since = self.armed_at.map_or(woke, |a| a.max(woke));
        timing::pinger_silent(now, since, self.budget())
    }

    /// No renewal this loop: recorded once per silence of the pinger.
    fn withhold_renewal(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if let (false, Some(silent)) = (self.withholding, self.pinger_silent(now)) {
            self.withholding = true;
            out.push(Action::Record(Fact::RenewalWithheld { silent }));
        }
    }

    /// The evidence is fresh enough for a ping right now (rule 1).
    fn fresh(&self, now: BootTime) -> bool {
        self.s
            .is_some_and(|s| timing::ping_permitted(now, s, self.budget()))
    }

    /// Fresh with at least half of the ping window `M - R` left: a win
    /// arms only then, else it renews first. Arming (the win's audit
    /// records, device opens, SETTIMEOUT) takes time; started late in the
    /// window on a slow machine it outlasts the evidence, and the key is
    /// given back unpromoted (the lab's two TCG guests: 6 of 17 failovers).
    fn fresh_to_arm(&self, now: BootTime) -> bool {
        self.s
            .is_some_and(|s| now.saturating_since(s) <= self.budget().ping_window() / 2)
    }

    /// Feeds one observation taken at `now` (CLOCK_BOOTTIME); returns the
    /// actions to execute. The contract every driver keeps:
    ///
    /// - Actions are executed in the order returned.
    /// - `Publish` is executed before any other I/O of the batch: the core
    ///   puts it first wherever a renewal earns or loses a permit (rule 1).
    /// - Each `Record(Fact)` is appended to the audit log and fsynced before
    ///   the next action runs (rule 7: `acquired`, `armed` are on disk before
    ///   the `Promote` that follows them).
    /// - An action's outcome (the `Input` it produces) is fed back, and the
    ///   actions the core returns for it are executed, before the rest of the
    ///   batch (depth-first). Actions that run off the main loop (`Promote`
    ///   of a managed PostgreSQL, `Follow`, `PublishMember`,
    ///   `RefreshLeaderMember`, `SetSyncStandbys`) report their outcome
    ///   later, as an input of its own; the core waits in its state
    ///   (`Promoting`, ...) and keeps renewing meanwhile.
    /// - `Exit` ends the driver; nothing after it runs.
    /// - The driver feeds `Tick` at [`Core::next_deadline`] (or on its own
    ///   loop, at least as often).
    pub fn handle(&mut self, now: BootTime, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role == Role::Exited {
            return out;
        }
        match input {
            Input::Start => {
                self.granting = true;
                self.watch_from = None;
                out.push(Action::Publish(Evidence::None));
                out.push(Action::Grant);
                out.push(Action::ReadKey);
            }
            Input::Tick => self.on_tick(now, &mut out),
            Input::PingerWoke { at } => self.pinger_woke = Some(at),
            Input::LeaseGranted { lease, sent } => {
                self.granting = false;
                self.lease = Some(lease);
                self.s = Some(sent);
                // A new lease carries no member record yet.
                self.published = None;
                out.push(Action::Record(Fact::LeaseGranted { lease }));
                self.maybe_acquire(now, &mut out);
            }
            Input::GrantFailed { .. } => self.granting = false,
            Input::Renewed { sent, ttl } => {
                if ttl <= 0 {
                    self.on_lease_gone(now, &mut out);
                } else {
                    self.on_renewed(now, sent, &mut out);
                }
            }
            Input::RenewFailed { .. } => {}
            Input::LeaseGone => self.on_lease_gone(now, &mut out),
            Input::KeySeen {
                holder,
                revision,
                lease,
            } => self.on_key(now, holder, revision, lease, &mut out),
            Input::PreviousLease { lease, alive, ttl } => {
                self.on_previous_lease(now, lease, alive, ttl, &mut out)
            }
            Input::Won { revision } => self.on_won(now, revision, &[], true, &mut out),
            Input::WonAfter {
                revision,
                previous,
                complete,
            } => self.on_won(now, revision, &previous, complete, &mut out),
            Input::HoldersRead {
                revision,
                previous,
                complete,
            } => self.on_holders_read(now, revision, &previous, complete, &mut out),
            Input::AcquireFailed { .. } => {
                // Unanswered: who holds the key is unknown until re-read (a
                // writable server gets no grace from a race not run).
                if self.holder == KeyHolder::Nobody {
                    self.holder = KeyHolder::Unknown;
                }
            }
            Input::Armed(outcome) => self.on_armed(now, outcome, &mut out),
            Input::ArmFailed { reason } => {
                if self.role == Role::Arming {
                    self.arm_refused(now, vec![("*".into(), reason)], &mut out);
                }
            }
            Input::Promoted => {
                if self.role == Role::Promoting {
                    self.role = Role::Leader;
                    self.following_pg = None;
                    out.push(Action::Record(Fact::Promoted));
                    out.push(Action::Callback {
                        event: CallbackEvent::OnRoleChange,
                        role: "primary",
                    });
                    self.bootstrap_on_promoted(&mut out);
                    if self.pgs.as_ref().is_some_and(|p| p.synchronous_mode) {
                        // A fresh primary has no standby yet: drop a copied
                        // setting at once, or every commit would wait.
                        self.sync_names = None;
                        self.sync_pending = true;
                        self.sync_recorded = None;
                        out.push(Action::SetSyncStandbys(self.sync_names_at_promotion()));
                    }
                }
            }
            Input::PromoteFailed { .. } => {
                if self.role == Role::Promoting {
                    self.step_down(now, StepDownReason::PromoteFailed, &mut out);
                }
            }
            Input::SteppedDown { how } => {
                if self.role == Role::SteppingDown {
                    self.stopped = true;
                    self.role = Role::Fenced;
                    out.push(Action::Record(Fact::StepDownConfirmed { how }));
                    // Last in the batch's order of importance: the driver
                    // only spawns them.
                    out.push(Action::Callback {
                        event: CallbackEvent::OnStop,
                        role: "primary",
                    });
                    out.push(Action::Callback {
                        event: CallbackEvent::OnRoleChange,
                        role: "replica",
                    });
                    if self.key_gone {
                        // The key was taken or deleted (not released by us):
                        // revoke the lease it was on, now that PostgreSQL is
                        // confirmed stopped. A winner promotes only once that
                        // lease is gone, so a hand-deleted key hands over in
                        // a loop or two instead of a full TTL. A new lease
                        // is granted at the next loop.
                        if let Some(lease) = self.lease.take() {
                            self.s = None;
                            out.push(Action::Revoke { lease });
                        }
                    }
                    self.after_fenced(now, &mut out);
                }
            }
            Input::FencedByTimer { how } => {
                if self.leading() {
                    self.step_down(now, StepDownReason::Deadline, &mut out);
                    out.retain(|a| !matches!(a, Action::StepDown { .. }));
                }
                if self.role == Role::SteppingDown {
                    out.extend(self.handle(now, Input::SteppedDown { how }));
                }
            }
            Input::StepDownFailed { reason } => {
                out.push(Action::Record(Fact::StepDownFailed { reason }));
            }
            Input::Released { deleted, revision } => {
                self.key_gone = true;
                self.release_failures = 0;
                self.unreleased = None;
                if self.holder == KeyHolder::Us {
                    self.holder = KeyHolder::Unknown;
                }
                // A watch event from before our release (our own key) says
                // nothing about the key now: ignored like any older event.
                if let Some(r) = revision {
                    self.key_revision = self.key_revision.max(r);
                }
                out.push(Action::Record(Fact::Released { deleted, revision }));
                self.after_fenced(now, &mut out);
            }
            Input::ReleaseFailed { error } => self.on_release_failed(error, &mut out),
            Input::Disarmed => {
                self.armed = false;
                out.push(Action::Record(Fact::Disarmed));
                if !self.nowayout.is_empty() {
                    // Devices with nowayout stay open and pinged on liveness.
                    self.armed = true;
                    out.push(Action::Record(Fact::NowayoutKeptArmed {
                        devices: self.nowayout.clone(),
                    }));
                }
                if self.role == Role::Fenced {
                    self.role = Role::Follower;
                }
                self.maybe_exit(&mut out);
            }
            Input::Eligibility { eligible, reason } => {
                self.set_eligibility(now, if eligible { Ok(()) } else { Err(reason) }, &mut out);
            }
            Input::WatchBroken => {
                // Not evidence of a lost key: a leader keeps leading on its
                // renewals (rule 1 still rules the pings) and re-reads.
                if !self.leading() {
                    self.holder = KeyHolder::Unknown;
                }
                self.watch_from = None;
                out.push(Action::ReadKey);
            }
            Input::KeySeenUnwatched {
                holder,
                revision,
                lease,
            } => {
                self.on_key(now, holder, revision, lease, &mut out);
                // No watch: the next tick reads again (`on_tick`), and a
                // win's history is read from the start.
                self.watch_from = None;
            }
            Input::Postgres(view) => self.on_pg_view(now, view, &mut out),
            Input::PgObserved {
                role,
                wal,
                has_data,
            } => {
                self.pg_has_data = has_data;
                self.clone.empty = !has_data;
                self.on_pg_observed(now, role, wal, &mut out)
            }
            Input::StandbyStarted { ok } => {
                self.busy = false;
                self.starting = false;
                if ok {
                    out.push(Action::Callback {
                        event: CallbackEvent::OnStart,
                        role: "replica",
                    });
                }
                if !ok {
                    self.start_backoff_until =
                        now + self.budget().loop_interval * START_BACKOFF_LOOPS;
                }
                self.on_resume_started(now, ok, &mut out);
            }
            Input::PgObserveFailed { error } => {
                // A server we cannot query (wrong credentials, another data
                // directory) must not be led: the promotion would fail and
                // its step-down would fence that server. Its view stands.
                self.lagging_only = false;
                let why = format!("cannot observe PostgreSQL: {error}");
                self.set_eligibility(now, Err(why), &mut out);
            }
            Input::Fenced { ok, how } => {
                // Only rule 8 fences (`follow_leader`): on the record, as
                // no change of leader.
                out.push(Action::Record(Fact::FencedNotLeader {
                    holder: self.holder.clone(),
                    how,
                    ok,
                }));
                if ok {
                    self.pg = PgView::Down;
                    self.follow_leader(now, &mut out);
                }
            }
            Input::Followed { leader, ok } => {
                self.busy = false;
                self.clone_done(ok);
                if ok {
                    self.following_pg = Some(leader);
                    out.push(Action::Callback {
                        event: CallbackEvent::OnStart,
                        role: "replica",
                    });
                } else if self.following.as_deref() == Some(leader.as_str()) {
                    self.following = None; // asked again on a later loop
                }
            }
            Input::LeaderMember { leader, member } => {
                self.leader_member_pending = false;
                if let Some(m) = member.filter(|m| m.node == leader) {
                    self.leader_member = Some(m);
                }
                self.follow_leader(now, &mut out);
            }
            Input::MemberPublished { member, ok } => {
                let lease = self.publish_pending.take();
                if ok && lease.is_some() && lease == self.lease {
                    self.published = Some((member, self.ticks));
                }
            }
            Input::StandbysSeen { standbys } => self.manage_sync(&standbys, &mut out),
            Input::SyncStandbysSet { value, ok } => {
                self.sync_pending = false;
                if ok {
                    self.sync_names = Some(value);
                }
            }
            Input::SyncWritten { state, ok } => self.on_sync_written(state, ok, &mut out),
            Input::Candidates { sync, members, ok } => {
                self.on_candidates(now, sync, members, ok, &mut out)
            }
            Input::Paused { .. } | Input::OpRequested { .. } | Input::OpDone { .. } => {
                self.on_maintenance(now, input, &mut out)
            }
            Input::InitializeSeen { key } => self.on_initialize_seen(now, key, &mut out),
            Input::InitdbDone { result } => self.on_initdb_done(now, result, &mut out),
            Input::InitializeFinished { ok } => self.on_initialize_finished(ok),
            Input::MembersSeen { members } => self.on_members_seen(members, &mut out),
            Input::SlotsSynced { wanted, ok } => self.on_slots_synced(wanted, ok),
            Input::ClusterSettings {
                loop_interval,
                maximum_lag_on_failover,
                synchronous_mode,
            } => self.on_cluster_settings(
                loop_interval,
                maximum_lag_on_failover,
                synchronous_mode,
                &mut out,
            ),
            Input::Shutdown => {
                if !self.shutting_down {
                    self.shutting_down = true;
                    out.push(Action::Record(Fact::Shutdown));
                }
                match self.role {
                    Role::Arming | Role::Promoting | Role::Leader => {
                        self.step_down(now, StepDownReason::Shutdown, &mut out)
                    }
                    Role::Fenced => self.after_fenced(now, &mut out),
                    Role::Follower => {
                        self.stop_postgres_before_exit(&mut out);
                        self.maybe_exit(&mut out)
                    }
                    Role::SteppingDown | Role::Exited => {}
                }
            }
            // A failed stop is the agent's warning; the exit goes on
            // (systemd's stop kills what is left of the cgroup).
            Input::PostgresStopped { .. } => {
                self.stopping_pg = false;
                self.maybe_exit(&mut out);
            }
            Input::SwitchoverSeen {
                request,
                target,
                paused,
                unix_now,
            } => self.on_switchover_seen(now, request, target, paused, unix_now, &mut out),
            Input::ShutdownCheckpoint { state, checkpoint } => {
                self.on_shutdown_checkpoint(now, state, checkpoint, &mut out)
            }
            Input::TargetLsn { receive } => self.on_target_lsn(receive, &mut out),
            Input::HandedOver { revision } => self.on_handed_over(now, revision, &mut out),
        }
        out
    }

    fn on_tick(&mut self, now: BootTime, out: &mut Vec<Action>) {
        self.ticks += 1;
        self.last_tick = Some(now);
        if self.ticks % LSN_EVERY_LOOPS == 0 {
            // Re-read the server's value now and then, in case someone changed it.
            self.sync_names = None;
        }
        self.loop_work(now, out);
        self.recheck_race(out);
        if self.watch_from.is_none() && !out.contains(&Action::ReadKey) {
            // No watch runs (a re-read went unanswered, or its watch could
            // not be set up): read again every loop, after the renewal, or a
            // leader cut off while its key was deleted by hand would never
            // learn it (a win's `history_from` relies on that), nor a
            // follower that the key is free.
            out.push(Action::ReadKey);
        }
        self.maintenance_tick(now, out);
        self.maybe_publish_member(out);
        self.maybe_refresh_leader_member(false, out);
        self.maybe_read_switchover(out);
        self.bootstrap_work(now, true, out);
        self.slots_tick(out);
    }

    fn loop_work(&mut self, now: BootTime, out: &mut Vec<Action>) {
        // Rule 3 inside the loop (the deadline timer does it independently).
        if self.leading() {
            if let Some(s) = self.s {
                if now > timing::demotion_deadline(s, self.budget()) {
                    self.step_down(now, StepDownReason::Deadline, out);
                    return;
                }
            }
        }
        match self.lease {
            Some(_) if self.leading() && self.pinger_silent(now).is_some() => {
                self.withhold_renewal(now, out)
            }
            Some(lease) => {
                self.withholding = false;
                out.push(Action::Renew { lease })
            }
            // A fenced node that let its lease go waits for the key's expiry
            // first: lease evidence is only ever the key's lease's.
            None if self.role == Role::Fenced && !self.key_gone => {}
            None if !self.granting && !self.shutting_down => {
                self.granting = true;
                out.push(Action::Grant);
            }
            None => {}
        }
        match self.role {
            Role::SteppingDown => out.push(Action::StepDown {
                reason: StepDownReason::Deadline,
                fast: None,
            }),
            Role::Fenced => self.after_fenced(now, out),
            // Re-ask whether the previous holder's lease is gone.
            Role::Promoting
                if self
                    .hold
                    .as_ref()
                    .is_some_and(|h| !h.leases.is_empty() || h.not_before.is_some()) =>
            {
                self.try_promote(now, out)
            }
            Role::Follower => {
                if self.armed {
                    // Only nowayout devices stay armed in a follower.
                    out.push(Action::Publish(Evidence::Liveness(now)));
                }
                if self.holder == KeyHolder::Unknown {
                    out.push(Action::ReadKey);
                }
                if let (Some(l), Some(lease)) = (self.unreleased, self.lease) {
                    if l == lease {
                        out.push(Action::Release { lease });
                    }
                }
                self.maybe_acquire(now, out);
                self.maybe_exit(out);
            }
            _ => {}
        }
    }

    fn on_renewed(&mut self, now: BootTime, sent: BootTime, out: &mut Vec<Action>) {
        // A late reply to an older keepalive must not move `s` backwards.
        let s = self.s.map_or(sent, |old| old.max(sent));
        self.s = Some(s);
        match self.role {
            // Rule 1 holds whatever the role: while the key is ours on this
            // lease, a fresh renewal permits pings, which also keeps a clean
            // step-down from being cut short by a reset.
            Role::Promoting | Role::Leader | Role::SteppingDown | Role::Fenced
                if !self.key_gone =>
            {
                out.push(Action::Publish(Evidence::Lease(s)));
                if !timing::ping_permitted(now, sent, self.budget()) {
                    out.push(Action::Record(Fact::RenewedLate { sent, acked: now }));
                }
                // A promotion held back only for fresh evidence goes now.
                if self.hold.as_ref().is_some_and(|h| h.leases.is_empty()) {
                    self.try_promote(now, out);
                }
            }
            Role::Arming if !self.armed && self.fresh(now) => {
                out.push(Action::Arm {
                    not_after: timing::fresh_until(s, self.budget()),
                });
            }
            _ => {}
        }
    }

    fn on_lease_gone(&mut self, now: BootTime, out: &mut Vec<Action>) {
        let last_s = self.s;
        // etcd lost our lease: it may be a store restored from a snapshot,
        // whose revisions run behind the ones seen. Nothing this node leads
        // survives this, and a follower's acquire is checked by etcd itself.
        self.key_revision = 0;
        self.lease = None;
        self.s = None;
        self.release_failures = 0;
        self.unreleased = None;
        out.push(Action::Record(Fact::LeaseLost { last_s }));
        if self.leading() {
            self.key_gone = true;
            self.step_down(now, StepDownReason::LeaseLost, out);
        } else if matches!(self.role, Role::SteppingDown | Role::Fenced) {
            self.key_gone = true;
            if self.role == Role::Fenced {
                self.after_fenced(now, out);
            }
        }
        if self.holder == KeyHolder::Us {
            self.holder = KeyHolder::Unknown;
        }
        if !self.shutting_down && !self.granting {
            self.granting = true;
            out.push(Action::Grant);
        }
    }

    fn on_key(
        &mut self,
        now: BootTime,
        holder: KeyHolder,
        revision: i64,
        lease: Option<i64>,
        out: &mut Vec<Action>,
    ) {
        if self.watch_from.is_none() {
            self.watch_from = Some((revision, now));
        }
        // Another holder's lease (also the one a deleted key was on): a win
        // after it promotes only once it is gone. Lease 0 never expires.
        // Owed even from a stale event: a lagging watch's deletion still
        // names a lease that may live.
        if let Some(l) = lease.filter(|l| *l != 0 && Some(*l) != self.lease) {
            if holder != KeyHolder::Us {
                self.owe(l, now);
            }
        }
        // etcd's revisions order every read and event: one older than the
        // newest seen (a watch event delivered after a newer read, or after
        // the revision at which we won) says nothing about the key now.
        if revision > 0 && revision < self.key_revision {
            return;
        }
        self.key_revision = self.key_revision.max(revision);
        let changed = holder != self.holder;
        self.holder = holder;
        if changed {
            self.race_gate = sync::RaceGate::after(&self.race_gate, revision); // a new vacancy, a new check
        }
        if self.leading() && self.holder != KeyHolder::Us {
            // Safety first: pings stop before anything is written down.
            self.key_gone = true;
            self.step_down(now, StepDownReason::KeyLost, out);
        } else if matches!(self.role, Role::SteppingDown | Role::Fenced)
            && self.holder != KeyHolder::Us
        {
            self.key_gone = true;
            out.push(Action::Publish(Evidence::None));
        }
        if changed {
            out.push(Action::Record(Fact::LeaderSeen {
                holder: self.holder.clone(),
                revision,
            }));
        }
        if self.role == Role::Follower
            && self.holder == KeyHolder::Us
            && self.own_key_as_follower(now, revision, out)
        {
            return; // as on `Won`
        }
        self.after_fenced(now, out);
        self.follow_leader(now, out);
        self.maybe_acquire(now, out);
    }

    /// Rule 8: a node that does not lead with fresh evidence never has a
    /// writable PostgreSQL, whoever holds the key (another node, garbage,
    /// nobody, unknown: at start-up before etcd answers, after a broken
    /// watch) and while arming. The only grace is the race for an empty key
    /// this node runs right now ([`Core::may_race`]): it fences if it loses.
    /// A leader's writable server is rule 3's (the demotion deadline).
    /// Then a follower replicates from the leader: a writable server is
    /// fenced first (`Fence`), and only its confirmed stop
    /// (`Input::Fenced`) leads to a `Follow`.
    fn follow_leader(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if self.pg == PgView::Primary
            && matches!(self.role, Role::Follower | Role::Arming)
            && !(self.holder == KeyHolder::Nobody && self.may_race(now))
        {
            out.push(Action::Fence);
            return;
        }
        if self.maint.hands_off() {
            return; // paused: PostgreSQL is the operator's (decide::pause)
        }
        if self.role != Role::Follower || self.shutting_down {
            return;
        }
        let KeyHolder::Other(leader) = self.holder.clone() else {
            self.maybe_start_standby(now, None, out);
            return;
        };
        let settled = match &self.pg {
            PgView::Unmanaged | PgView::Busy | PgView::Primary => true,
            PgView::Replica { following: Some(f) } => *f == leader,
            PgView::Replica { following: None } | PgView::Down => {
                self.following.as_ref() == Some(&leader)
            }
        };
        if settled {
            if self.pg == PgView::Down {
                let known = self.knows_leader(&leader).then_some(leader);
                self.maybe_start_standby(now, known, out);
            }
            return;
        }
        if self.starting {
            return; // a standby start runs: its outcome comes first
        }
        if self.node.is_some() && !self.knows_leader(&leader) {
            // Its address first; the follow comes with the record.
            self.maybe_refresh_leader_member(true, out);
            return;
        }
        let Some(clone_from) = self.clone_choice(&leader, out) else {
            return; // the member listing first (`clonefrom`)
        };
        self.following = Some(leader.clone());
        self.busy = true;
        out.push(Action::Follow { leader, clone_from });
    }

    /// Nothing else starts a stopped PostgreSQL (the distribution's unit is
    /// refused): a follower whose server is observed down with a cluster in
    /// its data directory, no `Follow` or start running, starts it as a
    /// standby (of `leader`, else of nobody), never writable.
    fn maybe_start_standby(
        &mut self,
        now: BootTime,
        leader: Option<String>,
        out: &mut Vec<Action>,
    ) {
        if self.pg != PgView::Down
            || !self.pg_has_data
            || self.busy
            || self.role != Role::Follower
            || self.shutting_down
            || now < self.start_backoff_until
        {
            return;
        }
        self.busy = true;
        self.starting = true;
        out.push(Action::StartStandby { leader });
    }

    fn knows_leader(&self, leader: &str) -> bool {
        self.leader_member
            .as_ref()
            .is_some_and(|m| m.node == leader && m.host.is_some() && m.port.is_some())
    }

    fn on_pg_view(&mut self, now: BootTime, view: PgView, out: &mut Vec<Action>) {
        self.pg = view;
        if self.role == Role::Leader && self.pg == PgView::Down && !self.maint.is_paused() {
            self.step_down(now, StepDownReason::PostgresDown, out);
        }
        self.follow_leader(now, out);
    }

    fn on_pg_observed(
        &mut self,
        now: BootTime,
        role: PgRole,
        wal: Option<WalPosition>,
        out: &mut Vec<Action>,
    ) {
        let Some(max_lag) = self.pgs.as_ref().map(|p| p.maximum_lag_on_failover) else {
            return; // not managed: nothing to observe
        };
        self.last_lsn = wal.and_then(|w| w.position()).map(|l| l.0);
        self.last_wal = wal;
        let (view, eligible) = if self.busy {
            (PgView::Busy, Err("rejoin in progress".to_string()))
        } else {
            let view = match role {
                PgRole::Primary => PgView::Primary,
                PgRole::Replica => PgView::Replica {
                    following: self.following_pg.clone(),
                },
                PgRole::Down => PgView::Down,
            };
            let leader_lsn = self.leader_member.as_ref().and_then(|m| m.lsn);
            (
                view,
                pg::eligibility(role, wal.as_ref(), leader_lsn, max_lag),
            )
        };
        self.note_lag(&view, &eligible);
        // Eligibility first: an eligible node that races for an empty key
        // at once keeps a writable server through the race (rule 8's grace).
        self.set_eligibility(now, eligible, out);
        self.on_pg_view(now, view, out);
    }

    fn set_eligibility(&mut self, now: BootTime, e: Result<(), String>, out: &mut Vec<Action>) {
        let eligible = e.is_ok();
        self.ineligible_because = e.err().unwrap_or_default();
        if eligible != self.eligible {
            self.eligible = eligible;
            self.maybe_acquire(now, out);
        }
    }

    /// Synchronous mode: as leader of a primary, keeps
    /// `synchronous_standby_names` naming the streaming standbys ('' when
    /// none stream), sent only when the wanted value differs from the last
    /// one set. Anything else leaves the setting alone.
    fn manage_sync(&mut self, standbys: &[String], out: &mut Vec<Action>) {
        if !self.pgs.as_ref().is_some_and(|p| p.synchronous_mode) {
            return;
        }
        if self.role != Role::Leader || self.pg != PgView::Primary {
            self.sync_names = None;
            return;
        }
        self.sync_step(standbys, out);
    }

    /// This node's member record as it stands.
    pub fn member(&self) -> Option<Member> {
        let node = self.node.clone()?;
        Some(Member {
            node,
            role: self.role.as_str().into(),
            postgres: self.pg.as_str().into(),
            host: self.pgs.as_ref().map(|p| p.host.clone()),
            port: self.pgs.as_ref().map(|p| p.port),
            lsn: self.last_lsn,
            watchdog: mode_name(self.cfg.mode).into(),
            timeline: self.last_wal.map(|w| w.timeline),
            receive_lsn: self.last_wal.and_then(|w| w.receive).map(|l| l.0),
            replay_lsn: self.last_wal.and_then(|w| w.replay).map(|l| l.0),
            armed: self.armed,
            w_secs: self.w_secs.filter(|_| self.armed),
            tags: member::Tags {
                nofailover: self.nofailover,
                ..self.tags
            },
        })
    }

    /// Once per loop: the member record when due ([`member::due`]), on the
    /// current lease, one write at a time.
    fn maybe_publish_member(&mut self, out: &mut Vec<Action>) {
        let (Some(lease), None) = (self.lease, self.publish_pending) else {
            return;
        };
        let Some(me) = self.member() else { return };
        if member::due(
            &me,
            self.published.as_ref(),
            self.ticks,
            self.holder == KeyHolder::Nobody,
        ) || self.vacancy_publish_due()
        {
            self.publish_pending = Some(lease);
            out.push(Action::PublishMember(me));
        }
    }

    /// Followers read the leader's record when it is another node's than
    /// the one known (`now`), or every `LSN_EVERY_LOOPS` loops; one read at
    /// a time.
    fn maybe_refresh_leader_member(&mut self, now: bool, out: &mut Vec<Action>) {
        let KeyHolder::Other(leader) = &self.holder else {
            return;
        };
        if self.node.is_none() || self.leader_member_pending {
            return;
        }
        let stale = self.leader_member.as_ref().map(|m| &m.node) != Some(leader);
        if now || stale || self.ticks % LSN_EVERY_LOOPS == 0 {
            self.leader_member_pending = true;
            out.push(Action::RefreshLeaderMember {
                leader: leader.clone(),
            });
        }
    }

    /// Whether this node races for an empty key when it sees one now.
    fn may_race(&self, now: BootTime) -> bool {
        self.role == Role::Follower
            && !self.shutting_down
            && !self.nofailover
            && self.eligible
            && now >= self.backoff_until
            && self.lease.is_some()
            && !self.race_gate.held
            && self.maint.race_allowed()
    }

    fn maybe_acquire(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if self.holder != KeyHolder::Nobody || !self.may_race(now) {
            return;
        }
        if !self.race_cleared(out) {
            return; // the candidates are read first (`decide::sync`)
        }
        if let Some(lease) = self.lease {
            out.push(Action::Acquire { lease });
        }
    }

    /// The oldest revision of the leader key's history a win must read
    /// (up to the winning revision) to learn every earlier holder it did
    /// not see (a deletion is not an expiry): holders from `watch_from`'s
    /// revision on are all in the history read, whatever the watch
    /// delivered; holders whose key went before it are read too (from
    /// revision 1, as far as etcd retains) until `T + EXPIRY_SLACK` after
    /// that report. After that, a key deleted before it was deleted more
    /// than `T + EXPIRY_SLACK` ago:
    /// its holder saw the deletion and stepped down (its watch, or a
    /// failed renewal and rule 3), or it stopped renewing and its lease
    /// has expired (watchdog-fenced). Not covered: a holder that keeps
    /// renewing and never learns of the deletion (the same limit as a
    /// revoke by hand, docs/fencing.md).
    pub fn history_from(&self, now: BootTime) -> i64 {
        match self.watch_from {
            Some((revision, since))
                if revision > 0 && now >= since + self.budget().ttl + EXPIRY_SLACK =>
            {
                revision
            }
            _ => 1,
        }
    }

    /// A win at `revision`. `previous`: the holders etcd's history names
    /// before it (see [`Core::history_from`]), owed a wait like those seen;
    /// `complete`: false when that history was compacted or unread. Then
    /// the promotion waits `T + EXPIRY_SLACK` after the win as well: any
    /// holder whose key went before the win has by then seen the deletion
    /// (and stepped down and revoked) or stopped renewing (its lease has
    /// expired and the watchdog reset it); the same limit as `history_from`.
    fn on_won(
        &mut self,
        now: BootTime,
        revision: i64,
        history: &[i64],
        complete: bool,
        out: &mut Vec<Action>,
    ) {
        let (Some(lease), Role::Follower) = (self.lease, &self.role) else {
            return;
        };
        for &l in history {
            if l != 0 && l != lease {
                self.owe(l, now);
            }
        }
        let not_before = (!complete).then(|| now + self.budget().ttl + EXPIRY_SLACK);
        self.holder = KeyHolder::Us;
        self.key_revision = self.key_revision.max(revision);
        self.key_gone = false;
        self.stopped = false;
        self.following = None;
        self.role = Role::Arming;
        let previous: BTreeSet<i64> = self.owed.keys().copied().filter(|l| *l != lease).collect();
        self.hold = Some(PromoteHold {
            leases: previous.clone(),
            since: now,
            not_before,
            armed: false,
        });
        out.push(Action::Record(Fact::Acquired {
            lease,
            revision,
            s: self.s.unwrap_or(now),
            postgres: self.pg.as_str(),
        }));
        for previous in previous {
            out.push(Action::Record(Fact::AwaitingPreviousLease {
                lease: previous,
            }));
        }
        if !complete {
            out.push(Action::Record(Fact::PreviousHoldersUnknown {
                wait: self.budget().ttl + EXPIRY_SLACK,
            }));
        }
        if self.cfg.mode == WatchdogMode::Off {
            out.push(Action::Record(Fact::LeadingUnarmed {
                reason: "watchdog mode is off".into(),
            }));
            self.role = Role::Promoting;
            out.push(Action::Publish(Evidence::None));
            self.hold_armed(now, out);
        } else if self.fresh_to_arm(now) {
            // Devices still open from an earlier term (nowayout) are re-checked
            // and pinged by the same arming step.
            out.push(Action::Arm {
                not_after: timing::fresh_until(self.s.expect("fresh implies s"), self.budget()),
            });
        } else {
            // Arming pings; a ping needs fresh evidence (rule 1), and the
            // promotion after it too (rule 2): renew first.
            out.push(Action::Renew { lease });
        }
    }

    fn on_armed(&mut self, now: BootTime, outcome: ArmOutcome, out: &mut Vec<Action>) {
        if self.role != Role::Arming {
            return;
        }
        if !outcome.armed.is_empty() {
            self.armed = true;
            self.armed_at = Some(now);
            self.w_secs = outcome.armed.iter().map(|d| d.w_secs).min();
        }
        for d in &outcome.armed {
            if d.nowayout && !self.nowayout.contains(&d.path) {
                self.nowayout.push(d.path.clone());
            }
            out.push(Action::Record(Fact::Armed(d.clone())));
        }
        for (device, reason) in &outcome.failed {
            out.push(Action::Record(Fact::ArmFailed {
                device: device.clone(),
                reason: reason.clone(),
            }));
        }
        match arm_before_promote(self.cfg.mode, &outcome) {
            // Rule 2 with rule 1: the promotion follows arming only while
            // the evidence that permitted arming's ping is still fresh.
            Ok(()) if !self.fresh(now) => {
                let age = self.s.map(|s| now.saturating_since(s));
                let reason = format!(
                    "evidence went stale while arming ({age:?} since the last acknowledged \
                     renewal, M - R = {:?}): not promoting",
                    self.budget().ping_window()
                );
                self.arm_refused(now, vec![("*".into(), reason)], out)
            }
            Ok(()) => {
                if outcome.armed.is_empty() {
                    out.push(Action::Record(Fact::LeadingUnarmed {
                        reason: "watchdog mode is automatic and no device could be armed".into(),
                    }));
                }
                self.arm_done(now, out);
            }
            Err(reason) => self.arm_refused(now, vec![("required".into(), reason)], out),
        }
    }

    /// Devices armed (or not needed) on fresh evidence: publish lease
    /// evidence, then promote.
    fn arm_done(&mut self, now: BootTime, out: &mut Vec<Action>) {
        self.role = Role::Promoting;
        let ev = self.s.map_or(Evidence::None, Evidence::Lease);
        out.push(Action::Publish(ev));
        self.hold_armed(now, out);
    }

    /// Arming is done (rule 2): promote now, or once the hold is lifted.
    fn hold_armed(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if let Some(h) = self.hold.as_mut() {
            h.armed = true;
        }
        self.try_promote(now, out);
    }

    /// A deletion is not an expiry (docs/fencing.md): a won key is promoted
    /// only once every other holder's lease still owed a wait (`owed` at
    /// the win) is gone (its holder revoked it after its confirmed stop, or
    /// it expired), each asked of etcd once per loop while it lives, and
    /// only on fresh evidence (rule 2's recheck; else at the next fresh
    /// renewal). If one still lives `T + EXPIRY_SLACK` after the win, its
    /// holder is renewing it: the key is given back unpromoted, as after a
    /// refused arming, and the lease stays owed.
    fn try_promote(&mut self, now: BootTime, out: &mut Vec<Action>) {
        let Some(h) = self.hold.as_ref() else { return };
        if self.role != Role::Promoting || !h.armed {
            return;
        }
        if !h.leases.is_empty() {
            for &lease in &h.leases {
                out.push(Action::CheckLeaseGone { lease });
            }
            return;
        }
        if h.not_before.is_some_and(|t| now < t) {
            return; // an incomplete history: the tick after the wait promotes
        }
        if self.cfg.mode != WatchdogMode::Off && !self.fresh(now) {
            return; // the next fresh renewal promotes
        }
        self.hold = None;
        out.push(Action::Promote);
    }

    /// Another holder's lease seen holding or losing the key at `now`: a
    /// win waits for it (see `owed` for the cap and why not by age).
    fn owe(&mut self, lease: i64, now: BootTime) {
        self.owed.insert(lease, now);
        while self.owed.len() > OWED_LEASES_CAP {
            let oldest = self
                .owed
                .iter()
                .min_by_key(|(l, seen)| (**seen, **l))
                .map(|(l, _)| *l)
                .expect("not empty");
            self.owed.remove(&oldest);
        }
    }

    fn on_previous_lease(
        &mut self,
        now: BootTime,
        lease: i64,
        alive: bool,
        ttl: i64,
        out: &mut Vec<Action>,
    ) {
        if !alive {
            // Gone for good, whatever the role (a late answer too).
            self.owed.remove(&lease);
        }
        let Some(h) = self.hold.as_mut() else { return };
        if !h.leases.contains(&lease) || self.role != Role::Promoting {
            return;
        }
        if !alive {
            h.leases.remove(&lease);
            let waited = now.saturating_since(h.since);
            out.push(Action::Record(Fact::PreviousLeaseGone { lease, waited }));
            if h.leases.is_empty() {
                self.try_promote(now, out);
            }
            return;
        }
        if now > h.since + self.budget().ttl + EXPIRY_SLACK {
            self.hold = None;
            out.push(Action::Record(Fact::PreviousLeaseAlive { lease, ttl }));
            self.give_back(now, out);
        }
    }

    /// A won key that cannot be promoted (the previous holder renews its
    /// lease): nothing was promoted, so disarm, release and back off one TTL.
    fn give_back(&mut self, now: BootTime, out: &mut Vec<Action>) {
        self.role = Role::Follower;
        self.stopped = true;
        self.backoff_until = now + self.budget().ttl;
        out.push(Action::Publish(Evidence::None));
        if self.armed {
            out.push(Action::Disarm);
        }
        self.release_as_follower(out);
    }

    /// Rule 2's other half: arming failed in required mode (or could not
    /// start): release the key, stay a replica, back off for one TTL.
    fn arm_refused(&mut self, now: BootTime, failed: Vec<(String, String)>, out: &mut Vec<Action>) {
        for (device, reason) in failed {
            out.push(Action::Record(Fact::ArmFailed { device, reason }));
        }
        self.hold = None;
        self.role = Role::Follower;
        self.stopped = true;
        self.backoff_until = now + self.budget().ttl;
        if self.armed {
            // Partially armed devices: PostgreSQL was never promoted.
            out.push(Action::Publish(Evidence::None));
            out.push(Action::Disarm);
        }
        self.release_as_follower(out);
    }

    /// A follower sees the key on its own current lease: an `Acquire` whose
    /// answer was lost (timeout) but that etcd applied. Left alone, the
    /// follower would renew that lease forever and no node could lead. If
    /// it may still race, it is the win it asked for: `on_won` at that
    /// revision (previous lease awaited, arm, promote under the usual
    /// rules), which costs no etcd write and no second handover. Otherwise
    /// (shutting down, ineligible, backing off) it gives the key back. A
    /// release already under way is left to its retries. True when it took
    /// the win.
    fn own_key_as_follower(&mut self, now: BootTime, revision: i64, out: &mut Vec<Action>) -> bool {
        if self.unreleased.is_some() && self.unreleased == self.lease {
            return false;
        }
        if self.may_race(now) || self.may_take_given_key(now) {
            // Who held the key before, from etcd's history as after a won
            // race (`on_holders_read` takes the win); without it the
            // promotion would wait `T + EXPIRY_SLACK` blind, the whole
            // downtime of a switchover.
            let (Some(lease), pending) = (self.lease, self.holders_read) else {
                return false;
            };
            // Asked once per lease: a later report of the same key (a read
            // gives the store's revision) waits for the answer, unless it
            // is a TTL late (an answer lost must not leave the key held).
            let asked =
                pending.is_some_and(|(_, l, at)| l == lease && now < at + self.budget().ttl);
            if !asked {
                self.holders_read = Some((revision, lease, now));
                out.push(Action::ReadHolders {
                    from: self.history_from(now),
                    before: revision,
                });
            }
            return true;
        }
        self.release_as_follower(out);
        false
    }

    /// The history asked by `own_key_as_follower`: the win, if the key is
    /// still ours on the same lease and this node may still take it; else
    /// the key is given back. A stale answer is dropped.
    fn on_holders_read(
        &mut self,
        now: BootTime,
        revision: i64,
        previous: &[i64],
        complete: bool,
        out: &mut Vec<Action>,
    ) {
        let Some((asked, lease, _)) = self.holders_read else {
            return;
        };
        if asked != revision {
            return;
        }
        self.holders_read = None;
        if self.role != Role::Follower || self.holder != KeyHolder::Us || self.lease != Some(lease)
        {
            return; // the key or the lease moved on meanwhile
        }
        if self.may_race(now) || self.may_take_given_key(now) {
            self.on_won(now, revision, previous, complete, out);
        } else {
            self.release_as_follower(out);
        }
    }

    /// A follower still holding the key (a refused arming, a give-back):
    /// release it, retried every loop until answered.
    fn release_as_follower(&mut self, out: &mut Vec<Action>) {
        if let Some(lease) = self.lease {
            self.unreleased = Some(lease);
            out.push(Action::Release { lease });
        }
    }

    /// Rule 7 and liveness: every unanswered release is recorded; after
    /// [`RELEASE_ATTEMPTS`] the lease holding the key is let go. A leader
    /// (fenced: PostgreSQL stopped) then waits for that lease's expiry
    /// before it disarms, and takes no new lease until then; a follower
    /// takes a new one at once.
    fn on_release_failed(&mut self, error: String, out: &mut Vec<Action>) {
        if self.key_gone && self.unreleased.is_none() {
            return; // a late answer: the key is gone already
        }
        self.release_failures += 1;
        let attempts = self.release_failures;
        let abandon = attempts >= RELEASE_ATTEMPTS && self.lease.is_some();
        out.push(Action::Record(Fact::ReleaseFailed {
            error,
            attempts,
            abandoned: abandon,
        }));
        if !abandon {
            return;
        }
        let lease = self.lease.take().expect("checked");
        self.release_failures = 0;
        self.unreleased = None;
        if self.role == Role::Fenced {
            // Its evidence goes with the lease: pings stop now, and `s`
            // stays for the expiry estimate (`after_fenced`).
            out.push(Action::Publish(Evidence::None));
        } else {
            self.s = None;
        }
        out.push(Action::Revoke { lease });
    }

    fn step_down(&mut self, now: BootTime, reason: StepDownReason, out: &mut Vec<Action>) {
        self.hold = None;
        let fast = self.fast_stop_within(now, &reason);
        let deadline = self.s.map(|s| timing::demotion_deadline(s, self.budget()));
        self.role = Role::SteppingDown;
        // Pings stop first: if the stop hangs, the watchdog finishes the job.
        // Only a voluntary step-down, with the key still ours, keeps pinging
        // on fresh renewals (rule 1) so that a clean handover is not reset.
        if !matches!(
            reason,
            StepDownReason::Shutdown
                | StepDownReason::PromoteFailed
                | StepDownReason::PostgresDown
                | StepDownReason::Switchover
        ) || self.key_gone
        {
            out.push(Action::Publish(Evidence::None));
        }
        out.push(Action::Record(Fact::StepDownBegun {
            reason: reason.clone(),
            deadline,
        }));
        out.push(Action::StepDown { reason, fast });
    }

    /// How long a planned step-down may try a fast shutdown before the
    /// fence: only for `Shutdown` with the key still ours and fresh
    /// evidence, and only what is left until the demotion deadline
    /// `s + T - M` less one request timeout (for the release that follows),
    /// at least a second (pg_ctl's own granularity); else `None`.
    fn fast_stop_within(&self, now: BootTime, reason: &StepDownReason) -> Option<Duration> {
        let planned = matches!(
            reason,
            StepDownReason::Shutdown | StepDownReason::Switchover
        );
        if !planned || self.key_gone || !self.fresh(now) {
            return None;
        }
        let deadline = timing::demotion_deadline(self.s?, self.budget());
        let left = deadline
            .saturating_since(now)
            .checked_sub(self.budget().request_timeout)?;
        (left >= Duration::from_secs(1)).then_some(left)
    }

    /// PostgreSQL is stopped: release the key if it may still be ours, and
    /// disarm once it is gone (rule 4). Until then only fresh lease evidence
    /// permits pings: a leader cut off from etcd is stopped by its deadline
    /// and then reset by its watchdog, since it cannot prove the key gone.
    fn after_fenced(&mut self, now: BootTime, out: &mut Vec<Action>) {
        if self.role != Role::Fenced || self.switchover_holds(now, out) {
            return;
        }
        if !self.key_gone {
            if let Some(s) = self.s {
                if now > timing::earliest_expiry(s, self.budget()) + EXPIRY_SLACK {
                    self.key_gone = true;
                    // Inferred, not seen: a lease etcd kept alive (a new
                    // etcd leader renews every lease) may still hold it.
                    // Re-read it; if still ours, `own_key_as_follower`.
                    if self.holder == KeyHolder::Us {
                        self.holder = KeyHolder::Unknown;
                    }
                }
            }
        }
        if !self.key_gone {
            if let Some(lease) = self.lease {
                out.push(Action::Release { lease });
            }
            return;
        }
        if may_disarm(self.stopped, self.key_gone) {
            if self.armed {
                out.push(Action::Publish(Evidence::None));
                out.push(Action::Disarm);
                if !self.nowayout.is_empty() {
                    out.push(Action::Publish(Evidence::Liveness(now)));
                }
            } else {
                self.role = Role::Follower;
                self.maybe_exit(out);
            }
        }
    }

    /// A follower's shutdown stops its standby cleanly (fast shutdown)
    /// before it exits, so `systemctl stop` finds nothing left to kill and
    /// the cluster reads `shut down in recovery`. Not in a paused scope
    /// (PostgreSQL is the operator's there), nor when nothing runs.
    fn stop_postgres_before_exit(&mut self, out: &mut Vec<Action>) {
        if self.stopping_pg
            || self.pg_stop_done
            || matches!(self.pg, PgView::Unmanaged | PgView::Down)
            || self.maint.hands_off()
        {
            return;
        }
        self.stopping_pg = true;
        self.pg_stop_done = true;
        out.push(Action::StopPostgres);
    }

    fn maybe_exit(&mut self, out: &mut Vec<Action>) {
        if !self.shutting_down || self.role != Role::Follower || self.stopping_pg {
            return;
        }
        if self.armed && self.nowayout.is_empty() {
            return;
        }
        if let Some(lease) = self.lease.take() {
            out.push(Action::Revoke { lease });
        }
        self.role = Role::Exited;
        out.push(Action::Exit { code: 0 });
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod won_after_tests;
