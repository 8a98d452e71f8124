//! The volume's one owner of state: a synchronous state machine fed by events.
//!
//! ```text
//!  guest I/O ──► Event::Guest ──┐                  ┌──► Effect::Send(client, job, request) ──► replica task
//!  replica reply ─► Event::Reply ─┼──► VolumeCore::apply ──┤
//!  replica lost ──► Event::Lost ──┤                  └──► Effect::Complete(guest, result)     ──► initiator
//!  100 ms tick ───► Event::Tick ──┘
//! ```
//!
//! Nothing here touches a socket or a clock: the driver (`volume::driver`)
//! owns the tasks and channels, feeds [`Event`]s in and carries [`Effect`]s
//! out. That is what makes every transition (a replica timing out half-way
//! through a write, a read retried after a checksum error, the volume falling
//! below `min_healthy`) a plain unit test.
//!
//! Invariants the core keeps:
//! * A write or flush completes successfully only when **every** replica that
//!   was active when it was sent and is still active has acknowledged it, and
//!   at least `min_healthy` of them did. A replica that fails is dropped from
//!   the active set and from every job waiting on it.
//! * Requests reach each replica in the order the core emits them, and the
//!   driver keeps one FIFO connection per replica, so overlapping writes land
//!   in the same order everywhere: replicas never diverge, and no lock is held
//!   across a round trip. Reads are the exception: a replica serves them
//!   beside its ordered write lane, so a read may run before a write sent
//!   ahead of it on the same connection. A read whose data is written
//!   elsewhere (a rebuild copy, a repair) is therefore taken as overtaken if
//!   an overlapping write was still unacknowledged at its source when it was
//!   sent, and is read again (a copy) or not used (a repair).
//! * An expansion ([`ControlOp::Resize`]) is a barrier like a snapshot
//!   create, sent to every active replica (a write-only one too: it gets
//!   every write past the old end from then on); a replica that fails it is
//!   dropped, so that once it completes every active replica holds the new
//!   size. The driver publishes the new size the moment the barrier is sent:
//!   any I/O past the old end arrives after it and waits behind it.
//! * Reads go to one read-write replica (the least busy), never to a
//!   write-only (rebuilding) one. A failed read is retried on another replica;
//!   a checksum mismatch is repaired by writing the good block back, unless a
//!   newer write to that range was sent meanwhile (which already repaired it).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use basalt_proto::frame::{Extent, ReplyError};
use bytes::Bytes;

/// Index of a replica in the volume's configured replica list. Guaranteed by
/// construction (see [`VolumeCore::new`]) to be a valid index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub usize);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "replica #{}", self.0 + 1)
    }
}

/// One replica request issued by the core; the id matches its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// Identifies an initiator request waiting for its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestId(pub u64);

/// The mode of one replica, as the volume sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaMode {
    /// Holds every acknowledged write: serves reads and writes.
    ReadWrite,
    /// Being rebuilt: receives every new write but serves no reads.
    WriteOnly,
    /// Dropped from the active set; `cause` says why (logged once).
    Error { cause: String },
}

impl ReplicaMode {
    /// Part of the active set: receives writes and flushes.
    pub fn is_active(&self) -> bool {
        matches!(self, ReplicaMode::ReadWrite | ReplicaMode::WriteOnly)
    }

    /// Short name for `volume info` and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ReplicaMode::ReadWrite => "RW",
            ReplicaMode::WriteOnly => "WO",
            ReplicaMode::Error { .. } => "ERR",
        }
    }
}

/// A snapshot operation, carried to every active replica on the data
/// connection so that it is ordered exactly with the writes around it; or
/// the volume's membership, recorded by every active replica (on the data
/// connection because only the replica's writer may record it); or a
/// resize of every active replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlOp {
    SnapshotCreate(String),
    SnapshotList,
    SnapshotDelete(String),
    SnapshotRevert(String),
    /// Every replica's holds (clones reading one of the volume's snapshots).
    HoldList,
    /// Release a clone's hold on a snapshot, by hand.
    SnapshotRelease {
        name: String,
        holder: String,
    },
    /// Every replica's identity and progress (a clone's hydration).
    Info,
    SetMembership(basalt_proto::pb::replica::Membership),
    /// Grow every active replica to this many bytes (an online expansion).
    Resize(u64),
    /// Ask every active replica whether it could grow to this many bytes,
    /// changing nothing: an expansion asks first, so that a replica that
    /// cannot (its device is too small) refuses the expansion rather than
    /// being dropped by it.
    ResizeCheck(u64),
}

impl ControlOp {
    /// What the operation is, in the words of error messages and logs.
    pub fn what(&self) -> &'static str {
        match self {
            ControlOp::SnapshotCreate(_) => "snapshot create",
            ControlOp::SnapshotList => "snapshot list",
            ControlOp::SnapshotDelete(_) => "snapshot delete",
            ControlOp::SnapshotRevert(_) => "snapshot revert",
            ControlOp::Resize(_) => "resize",
            ControlOp::ResizeCheck(_) => "resize check",
            ControlOp::HoldList => "hold list",
            ControlOp::SnapshotRelease { .. } => "snapshot release",
            ControlOp::Info => "replica info",
            ControlOp::SetMembership(_) => "membership record",
        }
    }

    /// Create, revert and resize are barriers: writes in flight drain first,
    /// and new I/O waits until every replica has answered, so each replica
    /// freezes (or rewinds) exactly the same history, and no I/O past the old
    /// end reaches a replica before it grew. List, delete and a resize check
    /// are not: a merge runs online while I/O goes on.
    fn is_barrier(&self) -> bool {
        matches!(
            self,
            ControlOp::SnapshotCreate(_) | ControlOp::SnapshotRevert(_) | ControlOp::Resize(_)
        )
    }

    /// Whether a replica that fails the operation is dropped from the
    /// volume by the core itself: a replica that did not grow cannot take
    /// the writes past the old end. For the other operations the caller
    /// decides what a failed answer means.
    fn drops_failed(&self) -> bool {
        matches!(self, ControlOp::Resize(_))
    }
}

/// What the initiator (or the management API) asked of the volume.
#[derive(Clone, Debug)]
pub enum GuestOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Unmap {
        offset: u64,
        len: u64,
    },
    Control(ControlOp),
    /// Rebuild: copy `extents` (a list the wire accepts: see
    /// [`Extent::check_list`]) from a read-write replica to the write-only
    /// replica `to`, with one vectored read and one vectored write however
    /// scattered they are. Ordered with guest writes like any write, and
    /// re-read if a guest write to any of the extents is sent while the
    /// copy's read is in flight, so a copy never lands on top of newer data
    /// (the bug class of Longhorn #4354).
    Copy {
        to: ClientId,
        extents: Vec<Extent>,
    },
    /// A flush of every active replica that completes once each has
    /// answered: when it completes, every write sent before it has been
    /// applied everywhere, and is durable. A rebuild drains once it has
    /// copied everything: the copies become durable, and the target takes
    /// on the source's flush numbering at that one flush. Allowed while
    /// degraded (it acknowledges nothing to an initiator).
    Drain,
    /// Completes once every write, unmap and flush admitted before it has
    /// been answered by every replica it was sent to: [`GuestOp::Drain`]'s
    /// ordering without its flush. A rebuild settles after attaching its
    /// target, so that its listings (which read the replicas' in-memory
    /// state, flushed or not) see every write the target did not get; a
    /// flush there would only write back the guest's unflushed data, which
    /// cost a delta rebuild ~60 ms for nothing. Allowed while degraded.
    Settle,
    /// Which of blocks `start_lba..start_lba + count` (4 KiB blocks, at most
    /// 2^20) hold data, asked of every read-write replica (a write-only one
    /// is still incomplete): completes like a control operation, with each
    /// replica's list (see `volume::allocation`). A read, ordered like one.
    Allocation {
        start_lba: u64,
        count: u64,
    },
}

/// What the core asks of one replica.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicaRequest {
    Read {
        offset: u64,
        len: u32,
    },
    /// `data` is the guest's buffer, shared (not copied) between replicas.
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Unmap {
        offset: u64,
        len: u64,
    },
    Control(ControlOp),
    /// A rebuild copy's read: the extents' bytes, concatenated.
    ReadV {
        extents: Vec<Extent>,
    },
    /// A rebuild copy's write: `data` is the [`ReplicaRequest::ReadV`]
    /// answer, passed on as it came.
    WriteV {
        extents: Vec<Extent>,
        data: Bytes,
    },
    /// The blocks of `start_lba..start_lba + count` that hold data.
    BlockCrcs {
        start_lba: u64,
        count: u64,
    },
}

/// A replica's answer to one request.
#[derive(Clone, Debug)]
pub enum ReplicaReply {
    /// Read data, or an empty acknowledgement for the other requests.
    Ok(Bytes),
    /// The replica's store found a block whose checksum does not match: read
    /// it elsewhere and write it back here.
    ChecksumMismatch { lba: u64 },
    /// Any other failure the replica reported for this request; the replica
    /// can no longer be trusted to hold the volume's data.
    Failed(String),
}

/// Why the volume failed an initiator request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// Fewer than `min_healthy` replicas are active: refusing I/O rather than
    /// risking divergence.
    #[error("volume degraded: {active} of {configured} replicas active, {min_healthy} needed")]
    Degraded {
        active: usize,
        configured: usize,
        min_healthy: usize,
    },
    /// The volume is stopping.
    #[error("{0}")]
    Unavailable(String),
    /// Every read-write replica failed to read the range.
    #[error("unrecoverable read at byte offset {offset}: {reason}")]
    Unreadable { offset: u64, reason: String },
}

/// Removing a read-write replica would leave fewer than `min_healthy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("it would leave {remaining} read-write replicas, fewer than min-healthy ({min_healthy})")]
pub struct WouldDegrade {
    pub remaining: usize,
    pub min_healthy: usize,
}

/// What the replicas' answers to an operation that changes the snapshot
/// chain (create, delete, revert) mean for the volume (see [`chain_verdict`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainVerdict {
    /// Enough replicas applied it; those that failed it (each with why) no
    /// longer hold the others' chain and must be dropped (and rebuilt).
    /// Those that refused it because a clone holds the snapshot stay: they
    /// keep the very chain the hold protects, and dropping them would turn a
    /// clone's hold into a lost replica.
    Applied {
        diverged: Vec<(ClientId, String)>,
        held: Vec<(ClientId, String)>,
    },
    /// Fewer than `min_healthy` (or none) applied it: the operation failed as
    /// a whole, and every replica stays.
    Failed { failures: Vec<(ClientId, String)> },
}

/// Whether a replica's refusal (as the link words it: the error's name
/// first) says a clone holds the snapshot.
fn is_held_refusal(error: &str) -> bool {
    error.starts_with(ReplyError::SnapshotHeld.name())
}

/// Decide what a chain-changing operation's answers mean. A replica that
/// failed it holds another chain than the others, so the volume cannot keep
/// it; but dropping replicas until fewer than `min_healthy` are left would
/// turn a failed snapshot into a failed volume, so then the operation fails.
/// A replica that refused because a clone holds the snapshot is never
/// dropped (the controller checks the holds before it asks any replica, so
/// only a hold placed in between gets here).
pub fn chain_verdict(results: &[(ClientId, Result<Bytes, String>)], min_healthy: usize) -> ChainVerdict {
    let failures: Vec<(ClientId, String)> = results
        .iter()
        .filter_map(|(c, r)| r.as_ref().err().map(|e| (*c, e.clone())))
        .collect();
    let succeeded = results.len() - failures.len();
    if succeeded == 0 || succeeded < min_healthy {
        ChainVerdict::Failed { failures }
    } else {
        let (held, diverged) = failures.into_iter().partition(|(_, e)| is_held_refusal(e));
        ChainVerdict::Applied { diverged, held }
    }
}

/// Inputs to the core.
#[derive(Debug)]
pub enum Event {
    /// A new initiator request.
    Guest { id: GuestId, op: GuestOp },
    /// A replica answered job `job`.
    Reply {
        client: ClientId,
        job: JobId,
        reply: ReplicaReply,
    },
    /// The connection to a replica is gone (closed, reset, or failed to
    /// encode); it is dropped at once, without waiting for a timeout.
    Lost { client: ClientId, cause: String },
    /// Time passes: replicas with a request older than the timeout fail.
    Tick,
}

/// Outputs of the core, carried out by the driver in order.
#[derive(Debug, PartialEq)]
pub enum Effect {
    Send {
        client: ClientId,
        job: JobId,
        request: ReplicaRequest,
    },
    Complete {
        guest: GuestId,
        result: Result<Bytes, VolumeError>,
    },
    /// A control operation finished: every active replica's answer (the
    /// payload of a successful one, or why it failed).
    ControlDone {
        guest: GuestId,
        results: Vec<(ClientId, Result<Bytes, String>)>,
    },
    /// A replica changed mode; the driver logs it (once) and updates metrics.
    ModeChanged { client: ClientId, mode: ReplicaMode },
    /// Close the connection to a replica that was dropped from the set.
    Disconnect { client: ClientId },
}

/// Tunables of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// A replica that has not answered its oldest outstanding request within
    /// this time is dropped. The default (5 s) is well above a loaded fsync
    /// on a spinning disk and well below initiator SCSI timeouts (30 s on
    /// Linux), so a hung replica costs at most this stall and never a SCSI
    /// abort storm.
    pub replica_timeout: Duration,
    /// Fewest active replicas with which the volume accepts I/O.
    pub min_healthy: usize,
}

impl CoreConfig {
    pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(5);
    /// A snapshot create is a flush plus a metadata update; I/O is paused
    /// while it runs, so a replica that takes longer is dropped.
    pub const SNAPSHOT_CREATE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Deleting a snapshot merges its blocks into its child, online; a big
    /// snapshot on a slow disk can take minutes.
    pub const SNAPSHOT_MERGE_TIMEOUT: Duration = Duration::from_secs(600);
    /// A grow syncs the head and replaces the metadata, like a snapshot
    /// create; I/O is paused while it runs, so a replica that takes longer is
    /// dropped.
    pub const RESIZE_TIMEOUT: Duration = Duration::from_secs(30);

    /// Majority of `replicas`: with 3 replicas the volume survives one loss;
    /// two partitions can never both hold a majority.
    pub fn majority(replicas: usize) -> usize {
        replicas / 2 + 1
    }
}

/// Per-replica bookkeeping.
#[derive(Debug)]
struct Replica {
    mode: ReplicaMode,
    /// Jobs sent and not yet answered, with when they were sent (FIFO: the
    /// first is the oldest, which is what the timeout looks at).
    outstanding: BTreeMap<JobId, Sent>,
}

/// When a request was sent, and by when its answer must arrive.
#[derive(Debug)]
struct Sent {
    at: Instant,
    deadline: Instant,
}

/// What a guest request is waiting for.
#[derive(Debug)]
enum Job {
    /// A write/flush/unmap fanned out to `waiting`; `acked` counts the
    /// read-write replicas that acknowledged it. `range` is the byte range
    /// a write or unmap changes (`None` for a flush): a read sent to a
    /// replica that has not acknowledged it yet may not see it.
    FanOut {
        guest: GuestId,
        waiting: Vec<ClientId>,
        acked: usize,
        range: Option<Range>,
    },
    /// A control operation fanned out to `waiting`; answers are collected,
    /// and a failed answer does not drop the replica.
    Control {
        guest: GuestId,
        waiting: Vec<ClientId>,
        results: Vec<(ClientId, Result<Bytes, String>)>,
        barrier: bool,
        /// A replica that fails it is dropped ([`ControlOp::drops_failed`]).
        drops_failed: bool,
    },
    /// A read sent to one replica; `tried` are replicas that already failed
    /// it, `bad` those that reported a checksum mismatch (to be repaired).
    Read {
        guest: Option<GuestId>,
        offset: u64,
        len: u32,
        at: ClientId,
        tried: Vec<ClientId>,
        bad: Vec<ClientId>,
        /// A write overlapping this range was sent after the read started:
        /// repairing with the read's data could undo it.
        overtaken: bool,
        last_error: String,
    },
    /// A rebuild copy: reading `extents` (`len` bytes in all) from `at` (a
    /// read-write replica), then writing them to `to`.
    Copy {
        guest: GuestId,
        to: ClientId,
        extents: Vec<Extent>,
        len: u32,
        at: Option<ClientId>,
        writing: bool,
        overtaken: bool,
        tried: Vec<ClientId>,
    },
    /// A repair write to one replica (no guest waiting).
    Repair,
}

/// A byte range `start..end` of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
}

impl Range {
    fn new(offset: u64, len: u64) -> Range {
        Range {
            start: offset,
            end: offset.saturating_add(len),
        }
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether any of `extents` (in order, without overlap) overlaps this
    /// range: a binary search, since every guest write asks it of every copy
    /// in flight, and a copy may have up to 256 extents.
    fn overlaps_any(&self, extents: &[Extent]) -> bool {
        let end = |e: &Extent| e.offset.saturating_add(u64::from(e.len));
        let first_past = extents.partition_point(|e| end(e) <= self.start);
        extents.get(first_past).is_some_and(|e| e.offset < self.end)
    }
}

/// The volume state machine. See the module docs.
pub struct VolumeCore {
    config: CoreConfig,
    replicas: Vec<Replica>,
    jobs: HashMap<JobId, Job>,
    next_job: u64,
    /// Time of the latest event, as told by the driver.
    now: Instant,
    /// Guest requests held back behind a barrier (in arrival order).
    queue: VecDeque<(GuestId, GuestOp)>,
    /// A barrier control operation is in flight: nothing else is sent.
    barrier_in_flight: bool,
    /// [`GuestOp::Settle`]s waiting, each with the fan-out jobs it waits for.
    settles: Vec<(GuestId, HashSet<JobId>)>,
}

impl VolumeCore {
    /// A core over replicas in the given initial modes (the driver has
    /// already chosen them and raised their epoch).
    pub fn new(config: CoreConfig, modes: Vec<ReplicaMode>, now: Instant) -> VolumeCore {
        let replicas = modes
            .into_iter()
            .map(|mode| Replica {
                mode,
                outstanding: BTreeMap::new(),
            })
            .collect();
        VolumeCore {
            config,
            replicas,
            jobs: HashMap::new(),
            next_job: 1,
            now,
            queue: VecDeque::new(),
            barrier_in_flight: false,
            settles: Vec::new(),
        }
    }

    pub fn mode(&self, client: ClientId) -> &ReplicaMode {
        &self.replicas[client.0].mode
    }

    pub fn modes(&self) -> impl Iterator<Item = (ClientId, &ReplicaMode)> {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| (ClientId(i), &r.mode))
    }

    pub fn active_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.mode.is_active()).count()
    }

    pub fn in_flight(&self) -> usize {
        self.jobs.len()
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Outstanding requests at one replica (for `volume info`).
    pub fn outstanding(&self, client: ClientId) -> usize {
        self.replicas[client.0].outstanding.len()
    }

    /// A new replica slot (e.g. `basalt replica add`), in the given mode.
    pub fn add_replica(&mut self, mode: ReplicaMode) -> ClientId {
        self.replicas.push(Replica {
            mode,
            outstanding: BTreeMap::new(),
        });
        ClientId(self.replicas.len() - 1)
    }

    /// Bring a replica (back) into the active set, e.g. write-only while it
    /// is rebuilt, then read-write when it holds everything.
    pub fn set_mode(&mut self, client: ClientId, mode: ReplicaMode, out: &mut Vec<Effect>) {
        if self.replicas[client.0].mode != mode {
            self.replicas[client.0].mode = mode.clone();
            out.push(Effect::ModeChanged { client, mode });
        }
    }

    /// Apply one event at time `now`, appending what must happen to `out`.
    pub fn apply(&mut self, now: Instant, event: Event, out: &mut Vec<Effect>) {
        self.now = now;
        match event {
            Event::Guest { id, op } => self.guest(id, op, out),
            Event::Reply { client, job, reply } => self.reply(client, job, reply, out),
            Event::Lost { client, cause } => self.fail(client, cause, out),
            Event::Tick => self.tick(out),
        }
        self.pump(out);
    }

    /// Read-write replicas: the ones that hold every acknowledged write. A
    /// write-only replica being rebuilt receives writes but does not count
    /// towards `min_healthy`: it does not yet hold the older data.
    pub fn healthy_count(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.mode == ReplicaMode::ReadWrite)
            .count()
    }

    fn degraded(&self) -> Option<VolumeError> {
        let active = self.healthy_count();
        (active < self.config.min_healthy).then_some(VolumeError::Degraded {
            active,
            configured: self.replicas.len(),
            min_healthy: self.config.min_healthy,
        })
    }

    fn new_job(&mut self) -> JobId {
        let id = JobId(self.next_job);
        self.next_job += 1;
        id
    }

    fn send(&mut self, client: ClientId, job: JobId, request: ReplicaRequest, out: &mut Vec<Effect>) {
        let allowed = match &request {
            ReplicaRequest::Control(ControlOp::SnapshotCreate(_)) => CoreConfig::SNAPSHOT_CREATE_TIMEOUT,
            ReplicaRequest::Control(ControlOp::SnapshotDelete(_) | ControlOp::SnapshotRevert(_)) => {
                CoreConfig::SNAPSHOT_MERGE_TIMEOUT
            }
            ReplicaRequest::Control(ControlOp::Resize(_)) => CoreConfig::RESIZE_TIMEOUT,
            _ => self.config.replica_timeout,
        };
        self.replicas[client.0].outstanding.insert(
            job,
            Sent {
                at: self.now,
                deadline: self.now + allowed,
            },
        );
        out.push(Effect::Send { client, job, request });
    }

    fn guest(&mut self, guest: GuestId, op: GuestOp, out: &mut Vec<Effect>) {
        if self.barrier_in_flight || !self.queue.is_empty() {
            self.queue.push_back((guest, op));
            return;
        }
        if matches!(&op, GuestOp::Control(c) if c.is_barrier()) && self.guest_jobs() > 0 {
            // Drain first: `pump` sends it once the last job completes.
            self.queue.push_back((guest, op));
            return;
        }
        self.admit(guest, op, out);
    }

    /// Jobs an initiator waits for (repairs do not hold a barrier back: they
    /// are ordered before it on each connection anyway).
    fn guest_jobs(&self) -> usize {
        self.jobs.values().filter(|j| !matches!(j, Job::Repair)).count()
    }

    /// Send what the queue holds, in order, up to the next barrier that
    /// must wait for the volume to drain.
    fn pump(&mut self, out: &mut Vec<Effect>) {
        while !self.barrier_in_flight {
            let Some((_, op)) = self.queue.front() else { return };
            if matches!(op, GuestOp::Control(c) if c.is_barrier()) && self.guest_jobs() > 0 {
                return;
            }
            let (guest, op) = self.queue.pop_front().expect("front exists");
            self.admit(guest, op, out);
        }
    }

    fn admit(&mut self, guest: GuestId, op: GuestOp, out: &mut Vec<Effect>) {
        // A rebuild copy is how a degraded volume gets healthy again: it
        // needs one read-write source, not a majority.
        let copy = matches!(op, GuestOp::Copy { .. } | GuestOp::Drain | GuestOp::Settle);
        if let Some(err) = self.degraded().filter(|_| !copy) {
            out.push(Effect::Complete {
                guest,
                result: Err(err),
            });
            return;
        }
        let mut range = None;
        let request = match op {
            GuestOp::Read { offset, len } => {
                let job = self.new_job();
                self.jobs.insert(
                    job,
                    Job::Read {
                        guest: Some(guest),
                        offset,
                        len,
                        at: ClientId(usize::MAX),
                        tried: Vec::new(),
                        bad: Vec::new(),
                        overtaken: false,
                        last_error: String::new(),
                    },
                );
                self.dispatch_read(job, out);
                return;
            }
            GuestOp::Write { offset, data, fua } => {
                self.mark_reads_overtaken(offset, data.len() as u64);
                range = Some(Range::new(offset, data.len() as u64));
                ReplicaRequest::Write { offset, data, fua }
            }
            GuestOp::Unmap { offset, len } => {
                self.mark_reads_overtaken(offset, len);
                range = Some(Range::new(offset, len));
                ReplicaRequest::Unmap { offset, len }
            }
            GuestOp::Flush => ReplicaRequest::Flush,
            GuestOp::Drain => {
                let job = self.new_job();
                let targets: Vec<ClientId> = self
                    .modes()
                    .filter(|(_, m)| m.is_active())
                    .map(|(c, _)| c)
                    .collect();
                self.ask_each(job, guest, targets, ReplicaRequest::Flush, out);
                return;
            }
            GuestOp::Settle => {
                let before: HashSet<JobId> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| matches!(j, Job::FanOut { .. }))
                    .map(|(&id, _)| id)
                    .collect();
                if before.is_empty() {
                    out.push(Effect::ControlDone {
                        guest,
                        results: Vec::new(),
                    });
                } else {
                    self.settles.push((guest, before));
                }
                return;
            }
            GuestOp::Copy { to, extents } => {
                // The overlap checks rely on the list's order, and the wire
                // would refuse anything else (closing the connection).
                let len = match Extent::check_list(&extents) {
                    Ok(len) => len,
                    Err(e) => {
                        let why = format!("rebuild copy not sent: {e}");
                        out.push(Effect::Complete {
                            guest,
                            result: Err(VolumeError::Unavailable(why)),
                        });
                        return;
                    }
                };
                let job = self.new_job();
                let copy = Job::Copy {
                    guest,
                    to,
                    extents,
                    len,
                    at: None,
                    writing: false,
                    overtaken: false,
                    tried: vec![to],
                };
                self.jobs.insert(job, copy);
                self.dispatch_copy_read(job, out);
                return;
            }
            GuestOp::Allocation { start_lba, count } => {
                let job = self.new_job();
                let targets: Vec<ClientId> = self
                    .modes()
                    .filter(|(_, m)| **m == ReplicaMode::ReadWrite)
                    .map(|(c, _)| c)
                    .collect();
                let request = ReplicaRequest::BlockCrcs { start_lba, count };
                self.ask_each(job, guest, targets, request, out);
                // Not degraded, so at least one read-write replica was asked;
                // completes at once otherwise.
                self.maybe_complete(job, out);
                return;
            }
            GuestOp::Control(op) => {
                let job = self.new_job();
                let targets: Vec<ClientId> = self
                    .modes()
                    .filter(|(_, m)| m.is_active())
                    .map(|(c, _)| c)
                    .collect();
                let barrier = op.is_barrier();
                let drops_failed = op.drops_failed();
                for &client in &targets {
                    self.send(client, job, ReplicaRequest::Control(op.clone()), out);
                }
                self.barrier_in_flight = barrier;
                self.jobs.insert(
                    job,
                    Job::Control {
                        guest,
                        waiting: targets,
                        results: Vec::new(),
                        barrier,
                        drops_failed,
                    },
                );
                return;
            }
        };
        let job = self.new_job();
        let targets: Vec<ClientId> = self
            .modes()
            .filter(|(_, m)| m.is_active())
            .map(|(c, _)| c)
            .collect();
        for &client in &targets {
            self.send(client, job, request.clone(), out);
        }
        self.jobs.insert(
            job,
            Job::FanOut {
                guest,
                waiting: targets,
                acked: 0,
                range,
            },
        );
    }

    /// Send `request` to each of `targets` as job `job`, collecting their
    /// answers for `guest` like a (non-barrier) control operation's.
    fn ask_each(
        &mut self,
        job: JobId,
        guest: GuestId,
        targets: Vec<ClientId>,
        request: ReplicaRequest,
        out: &mut Vec<Effect>,
    ) {
        for &client in &targets {
            self.send(client, job, request.clone(), out);
        }
        let collect = Job::Control {
            guest,
            waiting: targets,
            results: Vec::new(),
            barrier: false,
            drops_failed: false,
        };
        self.jobs.insert(job, collect);
    }

    /// A write to `offset..offset+len` is being sent: any read of that range
    /// still in flight must not use its data to repair a replica, nor any
    /// copy whose extents it touches to write the target.
    fn mark_reads_overtaken(&mut self, offset: u64, len: u64) {
        let written = Range::new(offset, len);
        for job in self.jobs.values_mut() {
            if let Job::Read {
                offset: r_off,
                len: r_len,
                overtaken,
                bad,
                ..
            } = job
            {
                if !bad.is_empty() && offset < *r_off + u64::from(*r_len) && *r_off < offset + len {
                    *overtaken = true;
                }
            } else if let Job::Copy {
                extents,
                writing: false,
                overtaken,
                ..
            } = job
            {
                if written.overlaps_any(extents) {
                    *overtaken = true;
                }
            }
        }
    }

    /// Send a rebuild copy's read to the least busy read-write replica not
    /// yet tried; fail the copy if none is left.
    fn dispatch_copy_read(&mut self, job: JobId, out: &mut Vec<Effect>) {
        let Some(Job::Copy { tried, extents, .. }) = self.jobs.get(&job) else {
            return;
        };
        let source = self.least_busy_reader(tried);
        let unapplied = source.is_some_and(|s| self.write_unacknowledged_at(s, |r| r.overlaps_any(extents)));
        let Some(Job::Copy {
            guest,
            extents,
            at,
            overtaken,
            ..
        }) = self.jobs.get_mut(&job)
        else {
            return;
        };
        match source {
            Some(client) => {
                *at = Some(client);
                // A replica serves reads beside its ordered write lane, not
                // behind it: a write sent to the source before this read and
                // not yet acknowledged may still be unapplied when the read
                // runs, yet the target already has it queued ahead of the
                // copy's write. Such a read is taken as overtaken.
                *overtaken = unapplied;
                let request = ReplicaRequest::ReadV {
                    extents: extents.clone(),
                };
                self.send(client, job, request, out);
            }
            None => {
                let (guest, offset) = (*guest, extents.first().map_or(0, |e| e.offset));
                self.jobs.remove(&job);
                let reason = "no read-write replica left to copy from".to_string();
                out.push(Effect::Complete {
                    guest,
                    result: Err(VolumeError::Unreadable { offset, reason }),
                });
            }
        }
    }

    fn copy_reply(&mut self, client: ClientId, job_id: JobId, reply: ReplicaReply, out: &mut Vec<Effect>) {
        let Some(Job::Copy {
            guest,
            to,
            extents,
            len,
            writing,
            overtaken,
            tried,
            ..
        }) = self.jobs.get_mut(&job_id)
        else {
            return;
        };
        let (guest, to) = (*guest, *to);
        if *writing {
            // The target answered the copy's write.
            self.jobs.remove(&job_id);
            let result = match reply {
                ReplicaReply::Ok(_) => Ok(Bytes::new()),
                other => {
                    let why = format!("rebuild write failed: {other:?}");
                    self.fail(to, why.clone(), out);
                    Err(VolumeError::Unavailable(why))
                }
            };
            out.push(Effect::Complete { guest, result });
            return;
        }
        match reply {
            ReplicaReply::Ok(data) if data.len() != *len as usize => {
                // Writing it would put other bytes at the extents than the
                // source holds there: the source is broken, not the copy.
                let why = format!("answered a copy's read of {len} bytes with {} bytes", data.len());
                tried.push(client);
                self.fail(client, why, out);
                self.dispatch_copy_read(job_id, out);
            }
            ReplicaReply::Ok(_) if *overtaken => {
                // A guest write to this range went out after our read: the
                // data may be older than what the target already received.
                self.dispatch_copy_read(job_id, out);
            }
            ReplicaReply::Ok(data) => {
                if !self.replicas[to.0].mode.is_active() {
                    self.jobs.remove(&job_id);
                    let why = format!("{to} left the volume during its rebuild");
                    out.push(Effect::Complete {
                        guest,
                        result: Err(VolumeError::Unavailable(why)),
                    });
                    return;
                }
                *writing = true;
                // Sent now, in stream order after every guest write sent to
                // the target so far; the read cannot be redone from here on.
                let extents = std::mem::take(extents);
                self.send(to, job_id, ReplicaRequest::WriteV { extents, data }, out);
            }
            ReplicaReply::ChecksumMismatch { .. } => {
                tried.push(client);
                self.dispatch_copy_read(job_id, out);
            }
            ReplicaReply::Failed(e) => {
                tried.push(client);
                self.fail(client, e, out);
                self.dispatch_copy_read(job_id, out);
            }
        }
    }

    /// A write or unmap whose range `overlaps` was sent to `client` and not
    /// yet acknowledged by it: a read sent there now may run before it.
    fn write_unacknowledged_at(&self, client: ClientId, overlaps: impl Fn(&Range) -> bool) -> bool {
        self.replicas[client.0].outstanding.keys().any(|job| {
            matches!(
                self.jobs.get(job),
                Some(Job::FanOut { range: Some(r), .. }) if overlaps(r)
            )
        })
    }

    /// The read-write replica with the fewest requests outstanding, among
    /// those not in `tried`. Write-only replicas never serve reads.
    fn least_busy_reader(&self, tried: &[ClientId]) -> Option<ClientId> {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(i, r)| r.mode == ReplicaMode::ReadWrite && !tried.contains(&ClientId(*i)))
            .min_by_key(|(_, r)| r.outstanding.len())
            .map(|(i, _)| ClientId(i))
    }

    /// Send (or re-send) a read to the least busy read-write replica not yet
    /// tried; fail it if none is left.
    fn dispatch_read(&mut self, job: JobId, out: &mut Vec<Effect>) {
        let Some(Job::Read {
            tried,
            bad,
            offset,
            len,
            ..
        }) = self.jobs.get(&job)
        else {
            return;
        };
        let candidate = self.least_busy_reader(tried);
        // Only a read whose data will repair another replica must not be
        // older than a write already sent (see `dispatch_copy_read`); a guest
        // read racing a write it has not seen acknowledged may see either.
        let range = Range::new(*offset, u64::from(*len));
        let unapplied = !bad.is_empty()
            && candidate.is_some_and(|c| self.write_unacknowledged_at(c, |r| r.overlaps(&range)));
        let Some(Job::Read {
            guest,
            offset,
            len,
            at,
            last_error,
            overtaken,
            ..
        }) = self.jobs.get_mut(&job)
        else {
            return;
        };
        match candidate {
            Some(client) => {
                *at = client;
                *overtaken |= unapplied;
                let request = ReplicaRequest::Read {
                    offset: *offset,
                    len: *len,
                };
                self.send(client, job, request, out);
            }
            None => {
                let (guest, offset) = (*guest, *offset);
                let reason = if last_error.is_empty() {
                    "no read-write replica available".to_string()
                } else {
                    last_error.clone()
                };
                self.jobs.remove(&job);
                if let Some(guest) = guest {
                    out.push(Effect::Complete {
                        guest,
                        result: Err(VolumeError::Unreadable { offset, reason }),
                    });
                }
            }
        }
    }

    fn reply(&mut self, client: ClientId, job_id: JobId, reply: ReplicaReply, out: &mut Vec<Effect>) {
        if matches!(self.jobs.get(&job_id), Some(Job::Copy { .. })) {
            if self.replicas[client.0].outstanding.remove(&job_id).is_some() {
                self.copy_reply(client, job_id, reply, out);
            }
            return;
        }
        if self.replicas[client.0].outstanding.remove(&job_id).is_none() {
            // A late answer from a replica already dropped from this job (it
            // was failed meanwhile): nothing waits for it.
            return;
        }
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        match job {
            // Routed to `copy_reply` above.
            Job::Copy { .. } => {}
            Job::FanOut { waiting, .. } => {
                let cause = match reply {
                    ReplicaReply::Ok(_) => return self.ack(job_id, client, out),
                    ReplicaReply::ChecksumMismatch { lba } => {
                        format!("checksum mismatch at block {lba} on a write")
                    }
                    ReplicaReply::Failed(e) => e,
                };
                // It answered, so it is no longer outstanding there and
                // `fail` would not find it: stop waiting for it here.
                waiting.retain(|c| *c != client);
                self.fail(client, cause, out);
                self.maybe_complete(job_id, out);
            }
            Job::Control {
                waiting,
                results,
                drops_failed,
                ..
            } => {
                waiting.retain(|c| *c != client);
                let result = match reply {
                    ReplicaReply::Ok(data) => Ok(data),
                    ReplicaReply::ChecksumMismatch { lba } => {
                        Err(format!("checksum mismatch at block {lba}"))
                    }
                    ReplicaReply::Failed(e) => Err(e),
                };
                let dropped = match (&result, *drops_failed) {
                    (Err(e), true) => Some(format!("failed to grow with the volume: {e}")),
                    _ => None,
                };
                results.push((client, result));
                if let Some(cause) = dropped {
                    // It answered: this job no longer waits for it, and
                    // `fail` finds nothing of it outstanding here.
                    self.fail(client, cause, out);
                }
                self.maybe_complete(job_id, out);
            }
            Job::Repair => {
                self.jobs.remove(&job_id);
                if let ReplicaReply::Failed(e) = reply {
                    self.fail(client, format!("repair write failed: {e}"), out);
                }
            }
            Job::Read {
                guest,
                offset,
                len,
                tried,
                bad,
                overtaken,
                last_error,
                ..
            } => match reply {
                ReplicaReply::Ok(data) if data.len() != *len as usize => {
                    // Handing it to the guest (or writing it back as a
                    // repair) would answer with other bytes than the volume
                    // holds: the replica is broken, not the read.
                    let why = format!("answered a read of {len} bytes with {} bytes", data.len());
                    tried.push(client);
                    *last_error = format!("{client}: {why}");
                    self.fail(client, why, out);
                    self.dispatch_read(job_id, out);
                }
                ReplicaReply::Ok(data) => {
                    let (offset, overtaken) = (*offset, *overtaken);
                    let bad = std::mem::take(bad);
                    if let Some(guest) = guest.take() {
                        out.push(Effect::Complete {
                            guest,
                            result: Ok(data.clone()),
                        });
                    }
                    self.jobs.remove(&job_id);
                    if !overtaken {
                        for target in bad {
                            if self.replicas[target.0].mode.is_active() {
                                let repair = self.new_job();
                                self.jobs.insert(repair, Job::Repair);
                                let request = ReplicaRequest::Write {
                                    offset,
                                    data: data.clone(),
                                    fua: false,
                                };
                                self.send(target, repair, request, out);
                            }
                        }
                    }
                }
                ReplicaReply::ChecksumMismatch { lba } => {
                    tried.push(client);
                    bad.push(client);
                    *last_error = format!("checksum mismatch at block {lba} on {client}");
                    self.dispatch_read(job_id, out);
                }
                ReplicaReply::Failed(e) => {
                    tried.push(client);
                    *last_error = format!("{client}: {e}");
                    self.fail(client, e, out);
                    self.dispatch_read(job_id, out);
                }
            },
        }
    }

    /// `client` acknowledged fan-out job `job`.
    fn ack(&mut self, job_id: JobId, client: ClientId, out: &mut Vec<Effect>) {
        if let Some(Job::FanOut { waiting, acked, .. }) = self.jobs.get_mut(&job_id) {
            if let Some(pos) = waiting.iter().position(|c| *c == client) {
                waiting.swap_remove(pos);
                if self.replicas[client.0].mode == ReplicaMode::ReadWrite {
                    *acked += 1;
                }
            }
        }
        self.maybe_complete(job_id, out);
    }

    /// Complete a fan-out job once nobody it waits for is left.
    fn maybe_complete(&mut self, job_id: JobId, out: &mut Vec<Effect>) {
        if let Some(Job::Control { waiting, .. }) = self.jobs.get(&job_id) {
            if waiting.is_empty() {
                if let Some(Job::Control {
                    guest,
                    results,
                    barrier,
                    ..
                }) = self.jobs.remove(&job_id)
                {
                    if barrier {
                        self.barrier_in_flight = false;
                    }
                    out.push(Effect::ControlDone { guest, results });
                }
            }
            return;
        }
        let Some(Job::FanOut {
            guest,
            waiting,
            acked,
            ..
        }) = self.jobs.get(&job_id)
        else {
            return;
        };
        if !waiting.is_empty() {
            return;
        }
        let (guest, acked) = (*guest, *acked);
        self.jobs.remove(&job_id);
        if !self.settles.is_empty() {
            self.settles.retain_mut(|(settle, before)| {
                before.remove(&job_id);
                if before.is_empty() {
                    out.push(Effect::ControlDone {
                        guest: *settle,
                        results: Vec::new(),
                    });
                }
                !before.is_empty()
            });
        }
        // Every replica that was sent the request and is still active has
        // it; the rest were dropped. Too few holders means the write may not
        // survive a further failure: the initiator must not be told it did.
        let result = if acked >= self.config.min_healthy {
            Ok(Bytes::new())
        } else {
            Err(VolumeError::Degraded {
                active: self.healthy_count(),
                configured: self.replicas.len(),
                min_healthy: self.config.min_healthy,
            })
        };
        out.push(Effect::Complete { guest, result });
    }

    /// Drop `client` from the active set: every job stops waiting for it.
    /// Drop a replica on the caller's word (e.g. its snapshot chain no
    /// longer matches the others').
    pub fn drop_replica(&mut self, client: ClientId, cause: String, out: &mut Vec<Effect>) {
        self.fail(client, cause, out);
        self.pump(out);
    }

    /// Remove `client` for good (`basalt replica rm`), unless it is
    /// read-write and the volume would be left with fewer than
    /// `min_healthy` read-write replicas. Decided and done in one step, so
    /// that removals arriving together are each judged against what the
    /// others left.
    pub fn remove_replica(
        &mut self,
        client: ClientId,
        cause: String,
        out: &mut Vec<Effect>,
    ) -> Result<(), WouldDegrade> {
        if self.replicas[client.0].mode == ReplicaMode::ReadWrite {
            let remaining = self.healthy_count() - 1;
            if remaining < self.config.min_healthy {
                return Err(WouldDegrade {
                    remaining,
                    min_healthy: self.config.min_healthy,
                });
            }
        }
        self.drop_replica(client, cause, out);
        Ok(())
    }

    fn fail(&mut self, client: ClientId, cause: String, out: &mut Vec<Effect>) {
        let replica = &mut self.replicas[client.0];
        if !replica.mode.is_active() {
            return;
        }
        replica.mode = ReplicaMode::Error { cause: cause.clone() };
        let orphaned: Vec<JobId> = std::mem::take(&mut replica.outstanding).into_keys().collect();
        out.push(Effect::ModeChanged {
            client,
            mode: ReplicaMode::Error { cause },
        });
        out.push(Effect::Disconnect { client });
        for job_id in orphaned {
            match self.jobs.get_mut(&job_id) {
                Some(Job::FanOut { waiting, .. }) => {
                    waiting.retain(|c| *c != client);
                    self.maybe_complete(job_id, out);
                }
                Some(Job::Control { waiting, results, .. }) => {
                    waiting.retain(|c| *c != client);
                    results.push((client, Err("the replica was dropped from the volume".into())));
                    self.maybe_complete(job_id, out);
                }
                Some(Job::Read { tried, .. }) => {
                    tried.push(client);
                    self.dispatch_read(job_id, out);
                }
                Some(Job::Copy {
                    guest,
                    to,
                    writing,
                    tried,
                    ..
                }) => {
                    if *to == client {
                        let guest = *guest;
                        self.jobs.remove(&job_id);
                        let why = format!("{client} left the volume during its rebuild");
                        out.push(Effect::Complete {
                            guest,
                            result: Err(VolumeError::Unavailable(why)),
                        });
                    } else if !*writing {
                        tried.push(client);
                        self.dispatch_copy_read(job_id, out);
                    }
                }
                Some(Job::Repair) => {
                    self.jobs.remove(&job_id);
                }
                None => {}
            }
        }
    }

    fn tick(&mut self, out: &mut Vec<Effect>) {
        let now = self.now;
        let late: Vec<(ClientId, Duration, Duration)> = self
            .replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let late = r.outstanding.values().find(|s| now >= s.deadline)?;
                Some((
                    ClientId(i),
                    now.saturating_duration_since(late.at),
                    late.deadline - late.at,
                ))
            })
            .collect();
        for (client, age, allowed) in late {
            self.fail(
                client,
                format!(
                    "no reply for {} ms (timeout {} ms)",
                    age.as_millis(),
                    allowed.as_millis()
                ),
                out,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core driven by scripted replica replies: errors, timeouts,
    //! reordering. No sockets, no sleeps.
    use super::*;

    struct Harness {
        core: VolumeCore,
        now: Instant,
        out: Vec<Effect>,
        next_guest: u64,
    }

    impl Harness {
        fn new(replicas: usize) -> Harness {
            let config = CoreConfig {
                replica_timeout: Duration::from_secs(5),
                min_healthy: CoreConfig::majority(replicas),
            };
            let now = Instant::now();
            let core = VolumeCore::new(config, vec![ReplicaMode::ReadWrite; replicas], now);
            Harness {
                core,
                now,
                out: Vec::new(),
                next_guest: 1,
            }
        }

        fn guest(&mut self, op: GuestOp) -> GuestId {
            let id = GuestId(self.next_guest);
            self.next_guest += 1;
            self.core.apply(self.now, Event::Guest { id, op }, &mut self.out);
            id
        }

        fn reply(&mut self, client: usize, job: JobId, reply: ReplicaReply) {
            self.core.apply(
                self.now,
                Event::Reply {
                    client: ClientId(client),
                    job,
                    reply,
                },
                &mut self.out,
            );
        }

        fn lost(&mut self, client: usize) {
            let ev = Event::Lost {
                client: ClientId(client),
                cause: "connection closed".into(),
            };
            self.core.apply(self.now, ev, &mut self.out);
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.core.apply(self.now, Event::Tick, &mut self.out);
        }

        fn take(&mut self) -> Vec<Effect> {
            std::mem::take(&mut self.out)
        }

        /// The (client, job, request) of every Send in `effects`.
        fn sends(effects: &[Effect]) -> Vec<(usize, JobId, ReplicaRequest)> {
            effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Send { client, job, request } => Some((client.0, *job, request.clone())),
                    _ => None,
                })
                .collect()
        }

        fn completions(effects: &[Effect]) -> Vec<(GuestId, Result<Bytes, VolumeError>)> {
            effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Complete { guest, result } => Some((*guest, result.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    fn write(offset: u64, byte: u8) -> GuestOp {
        GuestOp::Write {
            offset,
            data: Bytes::from(vec![byte; 4096]),
            fua: false,
        }
    }

    #[test]
    fn write_completes_only_when_every_replica_acknowledged() {
        let mut h = Harness::new(3);
        let g = h.guest(write(0, 1));
        let sends = Harness::sends(&h.take());
        assert_eq!(sends.len(), 3, "one send per replica");
        let job = sends[0].1;
        h.reply(2, job, ReplicaReply::Ok(Bytes::new()));
        h.reply(0, job, ReplicaReply::Ok(Bytes::new()));
        assert!(
            Harness::completions(&h.take()).is_empty(),
            "must wait for the third replica"
        );
        h.reply(1, job, ReplicaReply::Ok(Bytes::new()));
        assert_eq!(Harness::completions(&h.take()), vec![(g, Ok(Bytes::new()))]);
    }

    #[test]
    fn write_payload_is_shared_not_copied_between_replicas() {
        let mut h = Harness::new(3);
        let data = Bytes::from(vec![7u8; 4096]);
        h.guest(GuestOp::Write {
            offset: 0,
            data: data.clone(),
            fua: true,
        });
        for (_, _, request) in Harness::sends(&h.take()) {
            let ReplicaRequest::Write { data: sent, fua, .. } = request else {
                panic!("not a write")
            };
            assert!(fua);
            assert_eq!(sent.as_ptr(), data.as_ptr(), "same buffer for every replica");
        }
    }

    #[test]
    fn lost_replica_is_dropped_at_once_and_write_completes_on_the_others() {
        let mut h = Harness::new(3);
        let g = h.guest(write(0, 1));
        let job = Harness::sends(&h.take())[0].1;
        h.reply(0, job, ReplicaReply::Ok(Bytes::new()));
        h.reply(1, job, ReplicaReply::Ok(Bytes::new()));
        h.lost(2);
        let effects = h.take();
        assert!(effects.contains(&Effect::ModeChanged {
            client: ClientId(2),
            mode: ReplicaMode::Error {
                cause: "connection closed".into()
            }
        }));
        assert_eq!(Harness::completions(&effects), vec![(g, Ok(Bytes::new()))]);
        // Later writes go to the survivors only.
        h.guest(write(4096, 2));
        let targets: Vec<usize> = Harness::sends(&h.take()).iter().map(|s| s.0).collect();
        assert_eq!(targets, vec![0, 1]);
    }

    #[test]
    fn hung_replica_fails_after_the_timeout_not_before() {
        let mut h = Harness::new(3);
        let g = h.guest(write(0, 1));
        let job = Harness::sends(&h.take())[0].1;
        h.reply(0, job, ReplicaReply::Ok(Bytes::new()));
        h.reply(1, job, ReplicaReply::Ok(Bytes::new()));
        h.advance(Duration::from_millis(4900));
        assert!(Harness::completions(&h.take()).is_empty());
        h.advance(Duration::from_millis(100));
        let effects = h.take();
        assert_eq!(Harness::completions(&effects), vec![(g, Ok(Bytes::new()))]);
        assert_eq!(h.core.mode(ClientId(2)).label(), "ERR");
        // Its answer arriving late changes nothing.
        h.reply(2, job, ReplicaReply::Ok(Bytes::new()));
        assert!(h.take().is_empty());
    }

    #[test]
    fn write_fails_when_too_few_replicas_remain_to_hold_it() {
        let mut h = Harness::new(3);
        let g = h.guest(write(0, 1));
        let job = Harness::sends(&h.take())[0].1;
        h.reply(0, job, ReplicaReply::Ok(Bytes::new()));
        h.lost(1);
        h.lost(2);
        let completions = Harness::completions(&h.take());
        assert_eq!(completions.len(), 1);
        assert!(matches!(
            completions[0].1,
            Err(VolumeError::Degraded {
                active: 1,
                min_healthy: 2,
                ..
            })
        ));
        // New I/O is refused outright, reads included: the survivor alone
        // cannot prove it holds the latest data.
        let g2 = h.guest(GuestOp::Read { offset: 0, len: 4096 });
        let effects = h.take();
        assert!(Harness::sends(&effects).is_empty());
        assert!(
            matches!(Harness::completions(&effects)[0], (id, Err(VolumeError::Degraded { .. })) if id == g2)
        );
        let _ = g;
    }

    #[test]
    fn replica_error_reply_drops_it_and_the_write_completes_on_the_others() {
        let mut h = Harness::new(3);
        let g = h.guest(write(0, 1));
        let job = Harness::sends(&h.take())[0].1;
        h.reply(1, job, ReplicaReply::Failed("disk full".into()));
        h.reply(0, job, ReplicaReply::Ok(Bytes::new()));
        h.reply(2, job, ReplicaReply::Ok(Bytes::new()));
        let effects = h.take();
        assert!(effects.contains(&Effect::Disconnect { client: ClientId(1) }));
        assert_eq!(Harness::completions(&effects), vec![(g, Ok(Bytes::new()))]);
    }

    #[test]
    fn replies_out_of_order_complete_the_right_guests() {
        let mut h = Harness::new(2);
        let g1 = h.guest(write(0, 1));
        let g2 = h.guest(write(8192, 2));
        let sends = Harness::sends(&h.take());
        let (j1, j2) = (sends[0].1, sends[2].1);
        assert_ne!(j1, j2);
        h.reply(1, j2, ReplicaReply::Ok(Bytes::new()));
        h.reply(0, j2, ReplicaReply::Ok(Bytes::new()));
        assert_eq!(Harness::completions(&h.take()), vec![(g2, Ok(Bytes::new()))]);
        h.reply(0, j1, ReplicaReply::Ok(Bytes::new()));
        h.reply(1, j1, ReplicaReply::Ok(Bytes::new()));
        assert_eq!(Harness::completions(&h.take()), vec![(g1, Ok(Bytes::new()))]);
    }

    #[test]
    fn overlapping_writes_are_sent_to_every_replica_in_the_same_order() {
        let mut h = Harness::new(3);
        h.guest(write(0, 1));
        h.guest(write(0, 2));
        h.guest(write(0, 3));
        let sends = Harness::sends(&h.take());
        for client in 0..3 {
            let bytes: Vec<u8> = sends
                .iter()
                .filter(|s| s.0 == client)
                .map(|s| match &s.2 {
                    ReplicaRequest::Write { data, .. } => data[0],
                    _ => panic!(),
                })
                .collect();
            assert_eq!(
                bytes,
                vec![1, 2, 3],
                "replica {client} sees the writes in submission order"
            );
        }
    }

    #[test]
    fn read_goes_to_one_replica_the_least_busy() {
        let mut h = Harness::new(3);
        h.guest(GuestOp::Read { offset: 0, len: 4096 });
        h.guest(GuestOp::Read { offset: 0, len: 4096 });
        h.guest(GuestOp::Read { offset: 0, len: 4096 });
        let targets: Vec<usize> = Harness::sends(&h.take()).iter().map(|s| s.0).collect();
        assert_eq!(targets.len(), 3);
        let mut sorted = targets.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2], "spread over all replicas, one each");
    }

    #[test]
    fn read_never_goes_to_a_write_only_replica() {
        let mut h = Harness::new(3);
        let mut effects = Vec::new();
        h.core.set_mode(ClientId(0), ReplicaMode::WriteOnly, &mut effects);
        for _ in 0..6 {
            h.guest(GuestOp::Read { offset: 0, len: 4096 });
        }
        assert!(Harness::sends(&h.take()).iter().all(|s| s.0 != 0));
        // But it receives writes.
        h.guest(write(0, 1));
        assert!(Harness::sends(&h.take()).iter().any(|s| s.0 == 0));
    }

    #[test]
    fn checksum_mismatch_is_read_elsewhere_and_repaired() {
        let mut h = Harness::new(3);
        let g = h.guest(GuestOp::Read {
            offset: 8192,
            len: 4096,
        });
        let (first, job, _) = Harness::sends(&h.take())[0].clone();
        h.reply(first, job, ReplicaReply::ChecksumMismatch { lba: 2 });
        let retry = Harness::sends(&h.take());
        assert_eq!(retry.len(), 1);
        assert_ne!(retry[0].0, first, "retried on another replica");
        let good = Bytes::from(vec![9u8; 4096]);
        h.reply(retry[0].0, retry[0].1, ReplicaReply::Ok(good.clone()));
        let effects = h.take();
        assert_eq!(Harness::completions(&effects), vec![(g, Ok(good.clone()))]);
        let repair = Harness::sends(&effects);
        assert_eq!(
            repair.iter().map(|s| (s.0, s.2.clone())).collect::<Vec<_>>(),
            vec![(
                first,
                ReplicaRequest::Write {
                    offset: 8192,
                    data: good,
                    fua: false
                }
            )],
            "the good block is written back to the bad replica"
        );
        assert_eq!(
            h.core.mode(ClientId(first)).label(),
            "RW",
            "a repairable replica stays in the set"
        );
    }

    #[test]
    fn a_read_answered_with_the_wrong_length_fails_that_replica_and_is_read_elsewhere() {
        let mut h = Harness::new(3);
        let g = h.guest(GuestOp::Read {
            offset: 8192,
            len: 8192,
        });
        let (first, job, _) = Harness::sends(&h.take())[0].clone();
        h.reply(first, job, ReplicaReply::Ok(Bytes::from(vec![1u8; 4096])));
        let effects = h.take();
        assert!(
            Harness::completions(&effects).is_empty(),
            "a short answer never reaches the guest"
        );
        assert_eq!(h.core.mode(ClientId(first)).label(), "ERR", "{effects:?}");
        let retry = Harness::sends(&effects);
        assert_eq!(retry.len(), 1);
        assert_ne!(retry[0].0, first, "read again from another replica");
        let good = Bytes::from(vec![9u8; 8192]);
        h.reply(retry[0].0, retry[0].1, ReplicaReply::Ok(good.clone()));
        assert_eq!(Harness::completions(&h.take()), vec![(g, Ok(good))]);
    }

    #[test]
    fn repair_is_skipped_when_a_newer_write_overtook_the_read() {
        let mut h = Harness::new(3);
        h.guest(GuestOp::Read { offset: 0, len: 4096 });
        let (first, job, _) = Harness::sends(&h.take())[0].clone();
        h.reply(first, job, ReplicaReply::ChecksumMismatch { lba: 0 });
        let retry = Harness::sends(&h.take())[0].clone();
        // A guest write to the same block is sent while the retry is in flight.
        h.guest(write(0, 5));
        h.take();
        h.reply(retry.0, retry.1, ReplicaReply::Ok(Bytes::from(vec![1u8; 4096])));
        let repairs: Vec<_> = Harness::sends(&h.take());
        assert!(
            repairs.is_empty(),
            "writing the old data back would undo the newer write"
        );
    }

    #[test]
    fn read_fails_with_medium_error_when_every_replica_is_corrupt() {
        let mut h = Harness::new(3);
        let g = h.guest(GuestOp::Read { offset: 0, len: 4096 });
        for _ in 0..3 {
            let (c, job, _) = Harness::sends(&h.take())[0].clone();
            h.reply(c, job, ReplicaReply::ChecksumMismatch { lba: 0 });
        }
        let completions = Harness::completions(&h.take());
        assert!(matches!(&completions[0], (id, Err(VolumeError::Unreadable { offset: 0, .. })) if *id == g));
    }

    #[test]
    fn read_in_flight_on_a_lost_replica_is_resent_to_another() {
        let mut h = Harness::new(3);
        let g = h.guest(GuestOp::Read { offset: 0, len: 4096 });
        let (c, _, _) = Harness::sends(&h.take())[0].clone();
        h.lost(c);
        let resent = Harness::sends(&h.take());
        assert_eq!(resent.len(), 1);
        assert_ne!(resent[0].0, c);
        let data = Bytes::from(vec![7u8; 4096]);
        h.reply(resent[0].0, resent[0].1, ReplicaReply::Ok(data.clone()));
        assert_eq!(Harness::completions(&h.take()), vec![(g, Ok(data))]);
    }

    #[test]
    fn flush_fans_out_and_waits_for_all() {
        let mut h = Harness::new(3);
        let g = h.guest(GuestOp::Flush);
        let sends = Harness::sends(&h.take());
        assert!(sends.iter().all(|s| s.2 == ReplicaRequest::Flush));
        for (c, job, _) in &sends[..2] {
            h.reply(*c, *job, ReplicaReply::Ok(Bytes::new()));
        }
        assert!(Harness::completions(&h.take()).is_empty());
        h.reply(sends[2].0, sends[2].1, ReplicaReply::Ok(Bytes::new()));
        assert_eq!(Harness::completions(&h.take()), vec![(g, Ok(Bytes::new()))]);
    }
    #[test]
    fn settle_waits_for_the_writes_before_it_sends_nothing_and_holds_nothing_back() {
        let mut h = Harness::new(3);
        let alone = h.guest(GuestOp::Settle);
        let effects = h.take();
        assert!(Harness::sends(&effects).is_empty(), "a settle sends no request");
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::ControlDone { guest, .. } if *guest == alone)),
            "with nothing in flight it completes at once"
        );

        h.guest(write(0, 1));
        let w1 = Harness::sends(&h.take());
        let settle = h.guest(GuestOp::Settle);
        let later = h.guest(write(4096, 2));
        let w2 = Harness::sends(&h.take());
        assert_eq!(w2.len(), 3, "writes after a settle are not held back");
        let settled = |effects: &[Effect]| {
            effects
                .iter()
                .any(|e| matches!(e, Effect::ControlDone { guest, .. } if *guest == settle))
        };
        for (c, job, _) in &w1[..2] {
            h.reply(*c, *job, ReplicaReply::Ok(Bytes::new()));
        }
        assert!(
            !settled(&h.take()),
            "one replica has not answered the earlier write"
        );
        h.reply(w1[2].0, w1[2].1, ReplicaReply::Ok(Bytes::new()));
        assert!(
            settled(&h.take()),
            "every write before it answered everywhere: settled, though a later write is still in flight"
        );
        let _ = later;
    }

    #[test]
    fn snapshot_create_drains_writes_in_flight_and_holds_new_io_until_done() {
        let mut h = Harness::new(3);
        h.guest(write(0, 1));
        let w1 = Harness::sends(&h.take());
        let snap = h.guest(GuestOp::Control(ControlOp::SnapshotCreate("s1".into())));
        assert!(
            Harness::sends(&h.take()).is_empty(),
            "the snapshot waits for the write in flight"
        );
        let later = h.guest(write(0, 2));
        assert!(
            Harness::sends(&h.take()).is_empty(),
            "new I/O waits behind the snapshot"
        );
        for (c, job, _) in &w1 {
            h.reply(*c, *job, ReplicaReply::Ok(Bytes::new()));
        }
        let sends = Harness::sends(&h.take());
        assert_eq!(
            sends.len(),
            3,
            "the snapshot goes to every replica once the write drained"
        );
        assert!(sends
            .iter()
            .all(|s| s.2 == ReplicaRequest::Control(ControlOp::SnapshotCreate("s1".into()))));
        for (c, job, _) in &sends {
            h.reply(*c, *job, ReplicaReply::Ok(Bytes::from_static(b"info")));
        }
        let effects = h.take();
        let done = effects.iter().find_map(|e| match e {
            Effect::ControlDone { guest, results } if *guest == snap => Some(results.len()),
            _ => None,
        });
        assert_eq!(done, Some(3), "every replica's answer is reported");
        let resumed = Harness::sends(&effects);
        assert_eq!(resumed.len(), 3, "the held write goes out after the snapshot");
        assert!(matches!(&resumed[0].2, ReplicaRequest::Write { data, .. } if data[0] == 2));
        let _ = later;
    }

    #[test]
    fn snapshot_delete_is_not_a_barrier_and_a_failed_answer_keeps_the_replica() {
        let mut h = Harness::new(3);
        h.guest(write(0, 1));
        h.take();
        let del = h.guest(GuestOp::Control(ControlOp::SnapshotDelete("s1".into())));
        let sends = Harness::sends(&h.take());
        assert_eq!(
            sends.len(),
            3,
            "sent at once, ordered after the write on each connection"
        );
        h.guest(write(4096, 2));
        assert_eq!(Harness::sends(&h.take()).len(), 3, "I/O goes on during the merge");
        h.reply(
            sends[0].0,
            sends[0].1,
            ReplicaReply::Failed("no_such_snapshot: s1".into()),
        );
        h.reply(sends[1].0, sends[1].1, ReplicaReply::Ok(Bytes::new()));
        h.reply(sends[2].0, sends[2].1, ReplicaReply::Ok(Bytes::new()));
        let effects = h.take();
        let results = effects
            .iter()
            .find_map(|e| match e {
                Effect::ControlDone { guest, results } if *guest == del => Some(results.clone()),
                _ => None,
            })
            .expect("done");
        assert_eq!(results.iter().filter(|(_, r)| r.is_err()).count(), 1);
        assert_eq!(
            h.core.mode(ClientId(sends[0].0)).label(),
            "RW",
            "the caller decides what a refusal means"
        );
    }

    #[test]
    fn a_resize_drains_writes_reaches_every_active_replica_and_drops_one_that_fails_it() {
        let mut h = Harness::new(5);
        rebuilding(&mut h, 4);
        h.guest(write(0, 1));
        let w1 = Harness::sends(&h.take());
        assert_eq!(w1.len(), 5, "the write-only replica gets writes too");
        let grow = h.guest(GuestOp::Control(ControlOp::Resize(64 << 20)));
        assert!(
            Harness::sends(&h.take()).is_empty(),
            "the resize waits for the write in flight"
        );
        let later = h.guest(write(40 << 20, 2));
        assert!(
            Harness::sends(&h.take()).is_empty(),
            "new I/O waits behind the resize"
        );
        for (c, job, _) in &w1 {
            h.reply(*c, *job, ReplicaReply::Ok(Bytes::new()));
        }
        let sends = Harness::sends(&h.take());
        let mut targets: Vec<usize> = sends.iter().map(|s| s.0).collect();
        targets.sort_unstable();
        assert_eq!(
            targets,
            [0, 1, 2, 3, 4],
            "every active replica grows, the write-only one too"
        );
        assert!(sends
            .iter()
            .all(|s| s.2 == ReplicaRequest::Control(ControlOp::Resize(64 << 20))));
        let size = Bytes::copy_from_slice(&(64u64 << 20).to_le_bytes());
        for (c, job, _) in &sends {
            let reply = if *c == 1 {
                ReplicaReply::Failed("too_large: the device holds less".into())
            } else {
                ReplicaReply::Ok(size.clone())
            };
            h.reply(*c, *job, reply);
        }
        let effects = h.take();
        let results = effects
            .iter()
            .find_map(|e| match e {
                Effect::ControlDone { guest, results } if *guest == grow => Some(results.clone()),
                _ => None,
            })
            .expect("the resize completes");
        assert_eq!(results.len(), 5);
        assert_eq!(results.iter().filter(|(_, r)| r.is_err()).count(), 1);
        assert!(
            matches!(h.core.mode(ClientId(1)), ReplicaMode::Error { cause } if cause.contains("grow")),
            "a replica that did not grow is dropped: it could not take writes past the old end"
        );
        assert!(effects.contains(&Effect::Disconnect { client: ClientId(1) }));
        let resumed = Harness::sends(&effects);
        let mut resumed_at: Vec<usize> = resumed.iter().map(|s| s.0).collect();
        resumed_at.sort_unstable();
        assert_eq!(
            resumed_at,
            [0, 2, 3, 4],
            "the held write goes to the replicas that grew"
        );
        assert!(resumed
            .iter()
            .all(|s| matches!(&s.2, ReplicaRequest::Write { offset, .. } if *offset == 40 << 20)));
        let _ = later;
    }

    #[test]
    fn a_resize_check_is_not_a_barrier_and_a_refusal_keeps_the_replica() {
        let mut h = Harness::new(3);
        h.guest(write(0, 1));
        h.take();
        let check = h.guest(GuestOp::Control(ControlOp::ResizeCheck(1 << 40)));
        let sends = Harness::sends(&h.take());
        assert_eq!(sends.len(), 3, "asked at once, while the write is in flight");
        h.guest(write(4096, 2));
        assert_eq!(Harness::sends(&h.take()).len(), 3, "I/O goes on during the check");
        h.reply(
            sends[0].0,
            sends[0].1,
            ReplicaReply::Failed("too_large: at most 1 GiB".into()),
        );
        h.reply(sends[1].0, sends[1].1, ReplicaReply::Ok(Bytes::new()));
        h.reply(sends[2].0, sends[2].1, ReplicaReply::Ok(Bytes::new()));
        let effects = h.take();
        assert!(effects.iter().any(
            |e| matches!(e, Effect::ControlDone { guest, results } if *guest == check && results.len() == 3)
        ));
        assert!(h.core.modes().all(|(_, m)| m.label() == "RW"));
    }

    #[test]
    fn a_resize_that_never_answers_drops_the_replica_after_its_own_timeout() {
        let mut h = Harness::new(3);
        h.guest(GuestOp::Control(ControlOp::Resize(1 << 30)));
        let sends = Harness::sends(&h.take());
        h.reply(sends[0].0, sends[0].1, ReplicaReply::Ok(Bytes::new()));
        h.reply(sends[1].0, sends[1].1, ReplicaReply::Ok(Bytes::new()));
        h.advance(Duration::from_secs(10));
        assert_eq!(
            h.core.mode(ClientId(sends[2].0)).label(),
            "RW",
            "a grow may take a sync"
        );
        h.advance(CoreConfig::RESIZE_TIMEOUT);
        assert_eq!(h.core.mode(ClientId(sends[2].0)).label(), "ERR");
    }

    #[test]
    fn a_long_merge_is_not_mistaken_for_a_hung_replica() {
        let mut h = Harness::new(3);
        h.guest(GuestOp::Control(ControlOp::SnapshotDelete("big".into())));
        h.take();
        h.advance(Duration::from_secs(60));
        assert!(h.core.modes().all(|(_, m)| m.label() == "RW"));
        h.advance(CoreConfig::SNAPSHOT_MERGE_TIMEOUT);
        assert!(
            h.core.modes().all(|(_, m)| m.label() == "ERR"),
            "but a merge that never ends is"
        );
    }
    #[test]
    fn a_removal_is_refused_once_the_others_left_too_few_read_write_replicas() {
        let mut h = Harness::new(3);
        let mut out = Vec::new();
        assert_eq!(h.core.remove_replica(ClientId(0), "rm".into(), &mut out), Ok(()));
        assert_eq!(
            h.core.remove_replica(ClientId(1), "rm".into(), &mut out),
            Err(WouldDegrade {
                remaining: 1,
                min_healthy: 2
            })
        );
        assert_eq!(h.core.healthy_count(), 2);
        assert_eq!(
            h.core.remove_replica(ClientId(0), "rm again".into(), &mut out),
            Ok(()),
            "a replica already out can always be removed"
        );
        rebuilding(&mut h, 0);
        assert_eq!(
            h.core.remove_replica(ClientId(0), "rm".into(), &mut out),
            Ok(()),
            "so can one being rebuilt: it does not count towards min-healthy"
        );
    }

    #[test]
    fn a_chain_operation_drops_the_replicas_that_failed_it_unless_too_few_applied_it() {
        let ok = |c| (ClientId(c), Ok(Bytes::new()));
        let failed = |c| (ClientId(c), Err(format!("disk {c} full")));
        assert_eq!(
            chain_verdict(&[ok(0), failed(1), ok(2)], 2),
            ChainVerdict::Applied {
                diverged: vec![(ClientId(1), "disk 1 full".into())],
                held: vec![]
            }
        );
        assert_eq!(
            chain_verdict(&[ok(0), ok(1)], 2),
            ChainVerdict::Applied {
                diverged: vec![],
                held: vec![]
            }
        );
        assert_eq!(
            chain_verdict(&[ok(0), failed(1), failed(2)], 2),
            ChainVerdict::Failed {
                failures: vec![
                    (ClientId(1), "disk 1 full".into()),
                    (ClientId(2), "disk 2 full".into())
                ]
            }
        );
        assert!(matches!(
            chain_verdict(&[failed(0)], 1),
            ChainVerdict::Failed { .. }
        ));
        assert!(
            matches!(chain_verdict(&[], 1), ChainVerdict::Failed { .. }),
            "nobody applied it"
        );
    }

    #[test]
    fn a_replica_that_refused_a_chain_operation_because_a_clone_holds_the_snapshot_is_never_dropped() {
        let ok = |c| (ClientId(c), Ok(Bytes::new()));
        let held = |c| {
            (
                ClientId(c),
                Err(format!(
                    "{}: snapshot s1 is held by clone-a",
                    ReplyError::SnapshotHeld.name()
                )),
            )
        };
        let failed = |c| (ClientId(c), Err(format!("disk {c} full")));
        assert_eq!(
            chain_verdict(&[ok(0), held(1), failed(2), ok(3)], 2),
            ChainVerdict::Applied {
                diverged: vec![(ClientId(2), "disk 2 full".into())],
                held: vec![(
                    ClientId(1),
                    "snapshot_held: snapshot s1 is held by clone-a".into()
                )]
            }
        );
        // Held refusals count as not applied: too few applied it, so it failed and nobody goes.
        assert_eq!(
            chain_verdict(&[ok(0), held(1), held(2)], 2),
            ChainVerdict::Failed {
                failures: vec![
                    (
                        ClientId(1),
                        "snapshot_held: snapshot s1 is held by clone-a".into()
                    ),
                    (
                        ClientId(2),
                        "snapshot_held: snapshot s1 is held by clone-a".into()
                    )
                ]
            }
        );
    }

    #[test]
    fn an_allocation_query_asks_every_read_write_replica_and_not_the_one_being_rebuilt() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        h.take();
        let q = h.guest(GuestOp::Allocation {
            start_lba: 16,
            count: 256,
        });
        let sends = Harness::sends(&h.take());
        let asked: Vec<usize> = sends.iter().map(|s| s.0).collect();
        assert_eq!(asked, vec![0, 1], "the write-only replica is not asked");
        assert!(sends.iter().all(|s| s.2
            == ReplicaRequest::BlockCrcs {
                start_lba: 16,
                count: 256
            }));
        h.reply(0, sends[0].1, ReplicaReply::Ok(Bytes::from_static(&[1; 8])));
        assert!(h.take().is_empty(), "waits for every read-write replica");
        h.lost(1);
        let results = h
            .take()
            .into_iter()
            .find_map(|e| match e {
                Effect::ControlDone { guest, results } if guest == q => Some(results),
                _ => None,
            })
            .expect("done once every asked replica answered or left");
        assert_eq!(results.len(), 2);
        assert!(results.contains(&(ClientId(0), Ok(Bytes::from_static(&[1; 8])))));
        assert!(
            results.iter().any(|(c, r)| *c == ClientId(1) && r.is_err()),
            "a replica that left is an answer missing, which the caller treats as mapped"
        );
    }

    fn rebuilding(h: &mut Harness, target: usize) {
        let mut effects = Vec::new();
        h.core
            .set_mode(ClientId(target), ReplicaMode::WriteOnly, &mut effects);
    }

    fn extent(offset: u64, len: u32) -> Extent {
        Extent { offset, len }
    }

    /// A copy of `extents` to replica 2 (being rebuilt).
    fn copy(extents: &[Extent]) -> GuestOp {
        GuestOp::Copy {
            to: ClientId(2),
            extents: extents.to_vec(),
        }
    }

    /// Five single blocks scattered over the first 1 MiB, with gaps between them.
    fn five_scattered_blocks() -> Vec<Extent> {
        [0u64, 16, 64, 65, 200]
            .iter()
            .map(|lba| extent(lba * 4096, 4096))
            .collect()
    }

    fn read_v(extents: &[Extent]) -> ReplicaRequest {
        ReplicaRequest::ReadV {
            extents: extents.to_vec(),
        }
    }

    /// Answers a copy's read (job `job` at `source`) with data that may be stale: nothing goes to
    /// the target, the copy's extents are read again (on the job's next source, returned).
    fn read_again(h: &mut Harness, (source, job): (usize, JobId), extents: &[Extent]) -> (usize, JobId) {
        let stale = Bytes::from(vec![1u8; extents.iter().map(|e| e.len as usize).sum()]);
        h.reply(source, job, ReplicaReply::Ok(stale));
        let again = Harness::sends(&h.take());
        assert_eq!(
            again.iter().map(|s| (s.1, s.2.clone())).collect::<Vec<_>>(),
            vec![(job, read_v(extents))],
            "nothing is written to the target; every extent is read again"
        );
        (again[0].0, job)
    }

    /// Answers copy `guest`'s read (job `job` at `source`) with the source's data: exactly that
    /// data goes to the target (replica 2) at the copy's extents, and once the target acknowledges
    /// it the copy completes.
    fn copy_completes(h: &mut Harness, guest: GuestId, (source, job): (usize, JobId), extents: &[Extent]) {
        let data = Bytes::from(vec![7u8; extents.iter().map(|e| e.len as usize).sum()]);
        h.reply(source, job, ReplicaReply::Ok(data.clone()));
        let write = ReplicaRequest::WriteV {
            extents: extents.to_vec(),
            data,
        };
        assert_eq!(Harness::sends(&h.take()), vec![(2, job, write)]);
        h.reply(2, job, ReplicaReply::Ok(Bytes::new()));
        assert_eq!(Harness::completions(&h.take()), vec![(guest, Ok(Bytes::new()))]);
    }

    #[test]
    fn rebuild_copy_reads_a_read_write_replica_and_writes_the_target() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        let g = h.guest(copy(&extents));
        let read = Harness::sends(&h.take());
        assert_eq!(read.len(), 1, "one read for every extent");
        assert_ne!(read[0].0, 2, "never read from the replica being rebuilt");
        assert_eq!(read[0].2, read_v(&extents));
        let data = Bytes::from(vec![3u8; 5 * 4096]);
        h.reply(read[0].0, read[0].1, ReplicaReply::Ok(data.clone()));
        let write = Harness::sends(&h.take());
        assert_eq!(
            write,
            vec![(
                2,
                read[0].1,
                ReplicaRequest::WriteV {
                    extents,
                    data: data.clone()
                }
            )],
            "one write for every extent"
        );
        let ReplicaRequest::WriteV { data: sent, .. } = &write[0].2 else {
            unreachable!()
        };
        assert_eq!(
            sent.as_ptr(),
            data.as_ptr(),
            "the source's answer is sent on, not copied"
        );
        h.reply(2, write[0].1, ReplicaReply::Ok(Bytes::new()));
        assert_eq!(Harness::completions(&h.take()), vec![(g, Ok(Bytes::new()))]);
    }

    #[test]
    fn rebuild_copy_overtaken_by_a_sector_write_is_read_again() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        h.guest(copy(&[extent(0, 4096)]));
        let read = Harness::sends(&h.take())[0].clone();
        // A 512-byte guest write into the block goes to every replica,
        // the target included, while the copy's read is in flight.
        h.guest(GuestOp::Write {
            offset: 512,
            data: Bytes::from(vec![9u8; 512]),
            fua: false,
        });
        let guest_write = Harness::sends(&h.take());
        assert!(
            guest_write.iter().any(|s| s.0 == 2),
            "the target receives guest writes while rebuilt"
        );
        // The stale block is not written; it is read again, after the guest write.
        read_again(&mut h, (read.0, read.1), &[extent(0, 4096)]);
    }

    #[test]
    fn a_vectored_copy_overtaken_by_a_write_to_its_third_extent_is_read_again_whole() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        h.guest(copy(&extents));
        let read = Harness::sends(&h.take())[0].clone();
        h.guest(write(extents[2].offset, 9));
        h.take();
        read_again(&mut h, (read.0, read.1), &extents);
    }

    #[test]
    fn a_write_into_a_gap_between_extents_does_not_overtake_a_copy() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        let g = h.guest(copy(&extents));
        let read = Harness::sends(&h.take())[0].clone();
        // Blocks 1..16, 17..64 and 66..200 lie between the extents; so does everything past 201.
        h.guest(GuestOp::Write {
            offset: 4096,
            data: Bytes::from(vec![9u8; 15 * 4096]),
            fua: false,
        });
        h.guest(write(17 * 4096, 9));
        h.guest(write(66 * 4096, 9));
        h.guest(write(199 * 4096, 9));
        h.guest(write(201 * 4096, 9));
        h.take();
        // No write touched its extents: the copy's data is written.
        copy_completes(&mut h, g, (read.0, read.1), &extents);
    }

    #[test]
    fn rebuild_copy_read_sent_behind_an_unacknowledged_write_is_read_again() {
        // The replica serves a read beside its write lane: a copy read sent
        // after a guest write the source has not yet acknowledged may return
        // the block from before that write, while the target already holds
        // the write. Writing that data to the target would lose the write.
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        h.guest(write(extents[4].offset, 9));
        let guest_write = Harness::sends(&h.take());
        assert_eq!(guest_write.len(), 3, "the target receives the guest write too");
        h.reply(2, guest_write[0].1, ReplicaReply::Ok(Bytes::new()));
        let g = h.guest(copy(&extents));
        let read = Harness::sends(&h.take())[0].clone();
        // The read ran first at the source: its answer is the block from
        // before the guest write, though the write's acknowledgement comes
        // back first.
        for (client, job, _) in &guest_write[..2] {
            h.reply(*client, *job, ReplicaReply::Ok(Bytes::new()));
        }
        h.take();
        // Possibly stale data is not written to the target: it is read again.
        let again = read_again(&mut h, (read.0, read.1), &extents);
        // Read again after the source acknowledged the write: now it is used.
        copy_completes(&mut h, g, again, &extents);
    }

    #[test]
    fn an_unacknowledged_write_between_the_extents_does_not_hold_a_copy_back() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        h.guest(write(100 * 4096, 9));
        h.take();
        let g = h.guest(copy(&extents));
        let read = Harness::sends(&h.take())[0].clone();
        copy_completes(&mut h, g, (read.0, read.1), &extents);
    }

    #[test]
    fn a_copy_read_answered_with_the_wrong_length_fails_that_source_and_is_read_elsewhere() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        let g = h.guest(copy(&extents));
        let first = Harness::sends(&h.take())[0].clone();
        h.reply(
            first.0,
            first.1,
            ReplicaReply::Ok(Bytes::from(vec![1u8; 4 * 4096])),
        );
        let effects = h.take();
        assert_eq!(h.core.mode(ClientId(first.0)).label(), "ERR", "{effects:?}");
        let again = Harness::sends(&effects);
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].0, first.0);
        assert_eq!(again[0].2, read_v(&extents));
        assert!(Harness::completions(&effects).is_empty(), "the copy goes on");
        copy_completes(&mut h, g, (again[0].0, again[0].1), &extents);
    }

    #[test]
    fn a_checksum_mismatch_at_the_source_sends_the_copy_to_another_and_none_left_is_unreadable() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let extents = five_scattered_blocks();
        let g = h.guest(copy(&extents));
        let first = Harness::sends(&h.take())[0].clone();
        h.reply(first.0, first.1, ReplicaReply::ChecksumMismatch { lba: 64 });
        let effects = h.take();
        assert_eq!(
            h.core.mode(ClientId(first.0)).label(),
            "RW",
            "a corrupt block does not drop the replica"
        );
        let second = Harness::sends(&effects)[0].clone();
        assert_ne!(second.0, first.0);
        assert_ne!(second.0, 2, "never the target");
        assert_eq!(second.2, read_v(&extents));
        h.reply(second.0, second.1, ReplicaReply::ChecksumMismatch { lba: 64 });
        let effects = h.take();
        assert!(Harness::sends(&effects).is_empty());
        assert!(matches!(
            &Harness::completions(&effects)[..],
            [(id, Err(VolumeError::Unreadable { offset: 0, .. }))] if *id == g
        ));
    }

    #[test]
    fn a_failed_copy_write_fails_the_copy_and_drops_the_target() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let g = h.guest(copy(&five_scattered_blocks()));
        let read = Harness::sends(&h.take())[0].clone();
        h.reply(read.0, read.1, ReplicaReply::Ok(Bytes::from(vec![1u8; 5 * 4096])));
        h.take();
        h.reply(2, read.1, ReplicaReply::Failed("io: disk gone".into()));
        let effects = h.take();
        assert!(matches!(
            &Harness::completions(&effects)[..],
            [(id, Err(VolumeError::Unavailable(_)))] if *id == g
        ));
        assert_eq!(h.core.mode(ClientId(2)).label(), "ERR");
        assert_eq!(h.core.healthy_count(), 3 - 1, "the read-write replicas stay");
    }

    #[test]
    fn a_copy_of_a_list_the_wire_would_refuse_is_failed_without_a_request() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        for extents in [
            vec![],
            vec![extent(8192, 4096), extent(0, 4096)],
            vec![extent(0, 8192), extent(4096, 4096)],
            vec![extent(0, 0)],
        ] {
            let g = h.guest(copy(&extents));
            let effects = h.take();
            assert!(Harness::sends(&effects).is_empty(), "{extents:?}");
            assert!(
                matches!(&Harness::completions(&effects)[..], [(id, Err(VolumeError::Unavailable(_)))] if *id == g),
                "{extents:?}: {effects:?}"
            );
        }
    }

    #[test]
    fn repair_read_sent_behind_an_unacknowledged_write_repairs_nothing() {
        let mut h = Harness::new(3);
        let g = h.guest(GuestOp::Read { offset: 0, len: 4096 });
        let first = Harness::sends(&h.take())[0].clone();
        // A guest write to the block goes out while the read is in flight.
        h.guest(write(0, 9));
        let guest_write = Harness::sends(&h.take());
        h.reply(first.0, first.1, ReplicaReply::ChecksumMismatch { lba: 0 });
        let retry = Harness::sends(&h.take())[0].clone();
        assert_ne!(retry.0, first.0);
        // The retry went to a replica that had not acknowledged the write:
        // its data may predate it, and must not be written over it.
        h.reply(retry.0, retry.1, ReplicaReply::Ok(Bytes::from(vec![1u8; 4096])));
        let effects = h.take();
        assert!(
            Harness::sends(&effects).is_empty(),
            "no repair write: {effects:?}"
        );
        assert_eq!(Harness::completions(&effects).len(), 1);
        assert_eq!(Harness::completions(&effects)[0].0, g);
        assert_eq!(guest_write.len(), 3);
    }

    #[test]
    fn target_lost_during_a_copy_fails_the_copy_not_the_volume() {
        let mut h = Harness::new(3);
        rebuilding(&mut h, 2);
        let g = h.guest(copy(&[extent(0, 4096)]));
        let read = Harness::sends(&h.take())[0].clone();
        h.reply(read.0, read.1, ReplicaReply::Ok(Bytes::from(vec![1u8; 4096])));
        h.take();
        h.lost(2);
        let completions = Harness::completions(&h.take());
        assert!(matches!(&completions[0], (id, Err(VolumeError::Unavailable(_))) if *id == g));
        assert_eq!(h.core.healthy_count(), 2);
    }
}
