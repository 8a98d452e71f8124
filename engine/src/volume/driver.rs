//! The owner task: runs the [`VolumeCore`] and carries out its effects.
//!
//! Crucible's select/apply loop: one task owns the core; `select!` waits for
//! the next input (an initiator request, a replica event, the 100 ms tick);
//! the core turns it into effects; the loop sends requests to replica links
//! and completes initiator requests. No lock guards the volume state, and no
//! lock is held across a replica round trip. [`Volume`] is the handle the
//! iSCSI target uses: it implements `BlockDevice`.
//!
//! Initiator reads, writes, unmaps and flushes pass the volume's QoS limits
//! ([`super::qos::Throttle`]) before they reach the core: an op without
//! tokens waits in the throttle's queue, and a timer in the same `select!`
//! admits it when its bucket has refilled. No thread sleeps, and with no
//! limit set an op goes straight through. Rebuild copies, drains, settles
//! and snapshot operations bypass the throttle.
//!
//! ## The size
//!
//! The volume's size is the one mutable fact besides the replicas' state: an
//! online expansion ([`Volume::expand`]) grows it. It lives in one atomic the
//! handle and the owner share; the target reads it for every command. The
//! owner raises it when the core sends the [`ControlOp::Resize`] barrier,
//! in the same turn: an initiator that sees the new size sends I/O past the
//! old end only after that, and the core holds such I/O behind the barrier
//! until every active replica grew (or was dropped for failing to).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_proto::frame::Extent;
use basalt_proto::{Epoch, VolumeId};
use basalt_target::device::{BlockDevice, DeviceError, Geometry, Provisioning};
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, RwLock};

use super::core::{
    chain_verdict, ChainVerdict, ClientId, ControlOp, CoreConfig, Effect, Event, GuestId, GuestOp,
    ReplicaMode, ReplicaRequest, VolumeCore, VolumeError, WouldDegrade,
};
use super::link::{write_crc, Link, Outgoing};
use super::metrics::VolumeMetrics;
use super::qos::{Admitted, Cost, QosChange, QosLimits, Throttle};

/// How often the core looks for replicas past their timeout. A hung replica
/// is dropped at most this long after its timeout expires.
const TICK: Duration = Duration::from_millis(100);

/// WRITE SAME is carried out in chunks of this size so that a 1 GiB WRITE
/// SAME never allocates 1 GiB.
const WRITE_SAME_CHUNK: u64 = 1 << 20;

/// A replica as the driver starts it: connected and raised to the volume's
/// epoch, or not usable (with the reason).
pub enum StartReplica {
    Ready(super::link::Handshaken),
    Unusable { cause: String },
}

/// Static facts about the volume. Its size is not one of them: it grows
/// online (see [`Volume::size_bytes`]).
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    pub name: crate::name::VolumeName,
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub addresses: Vec<String>,
    /// What every connection to a replica proves it knows (and checks the replica knows).
    pub secret: basalt_proto::auth::VolumeSecret,
    /// The generation of the membership the volume started with (0: none recorded yet); each
    /// `replica add` / `rm` records the next one (see [`Volume::membership`]).
    pub membership_generation: u64,
}

/// A point-in-time view of the volume, for `volume info` and health checks.
#[derive(Clone, Debug)]
pub struct VolumeStatus {
    pub size_bytes: u64,
    pub replicas: Vec<ReplicaStatus>,
    pub in_flight: usize,
    pub healthy: usize,
    pub min_healthy: usize,
}

#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    pub address: String,
    pub mode: ReplicaMode,
    pub revision: u64,
    pub outstanding: usize,
}

/// Every active replica's answer to a control operation, by replica index.
pub type ControlResults = Vec<(usize, Result<Bytes, String>)>;

/// Why `basalt replica rm` did not remove a replica.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no replica {address} in this volume; `basalt volume info` lists them")]
    NotFound { address: String },
    #[error(
        "removing {address} would leave {} read-write replicas, fewer than min-healthy ({}); add and \
         rebuild another replica first",
        refusal.remaining,
        refusal.min_healthy
    )]
    WouldDegrade { address: String, refusal: WouldDegrade },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// Why a snapshot create, delete or revert did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(
        "replica {address} is being rebuilt; a rebuild copies the chain as it is, so {what} must wait until \
         it is RW (see `basalt volume info`)"
    )]
    Rebuilding { what: &'static str, address: String },
    /// Too few replicas applied it (see [`chain_verdict`]); each failure
    /// names its replica.
    #[error("{what} failed: {}", failures.join("; "))]
    Failed {
        what: &'static str,
        failures: Vec<String>,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// A snapshot create, delete or revert that the volume applied.
#[derive(Debug, Default)]
pub struct ChainDone {
    /// Replicas that failed it and were dropped from the volume (their chain
    /// differs now; they are rebuilt when they come back).
    pub dropped: Vec<String>,
}

enum Command {
    Io {
        op: GuestOp,
        reply: Reply,
    },
    Status {
        reply: oneshot::Sender<VolumeStatus>,
    },
    Drop {
        replica: usize,
        cause: String,
    },
    /// Add a replica address to the volume (in ERR until it is rebuilt);
    /// answers its index (the existing one if already known).
    Add {
        address: String,
        reply: oneshot::Sender<usize>,
    },
    /// Start I/O to a connected replica as write-only (rebuild begins).
    /// Refused (with why) when the replica is smaller than the volume: an
    /// expansion was sent while it was being prepared, and it missed it.
    Attach {
        replica: usize,
        conn: Box<super::link::Handshaken>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Rebuild finished: the replica holds everything.
    Promote {
        replica: usize,
    },
    /// Change the QoS limits (if `change` is given); answers the limits now
    /// in force.
    Qos {
        change: Option<QosChange>,
        reply: oneshot::Sender<QosLimits>,
    },
    /// Remove a replica for good, if the volume can spare it.
    Remove {
        address: String,
        reply: oneshot::Sender<Result<(), RemoveError>>,
    },
    /// A snapshot create, delete or revert, under the volume's policy for
    /// replicas that fail it.
    Chain {
        op: ControlOp,
        reply: oneshot::Sender<Result<ChainDone, ChainError>>,
    },
}

enum Reply {
    Io(oneshot::Sender<Result<Bytes, VolumeError>>),
    Control(oneshot::Sender<Result<ControlResults, VolumeError>>),
    Chain {
        what: &'static str,
        reply: oneshot::Sender<Result<ChainDone, ChainError>>,
    },
}

/// The handle to a running volume. Cheap to clone.
#[derive(Clone)]
pub struct Volume {
    spec: Arc<VolumeSpec>,
    /// Bytes; shared with the owner task, which raises it (see the module docs).
    size: Arc<AtomicU64>,
    /// Held by an expansion from its first question to the replicas to its
    /// answer: two expansions at once would interleave their checks and grows.
    pub(super) expanding: Arc<tokio::sync::Mutex<()>>,
    tx: mpsc::UnboundedSender<Command>,
    /// COMPARE AND WRITE must be atomic against every other write: writes
    /// take this shared, COMPARE AND WRITE exclusive. Uncontended, it costs a
    /// few atomic operations per write.
    caw: Arc<RwLock<()>>,
    pub metrics: Arc<VolumeMetrics>,
    /// The generation of the membership last recorded. Held across a change (decide, record on every
    /// replica, answer), so two `replica add` / `rm` never record the same generation.
    pub membership: Arc<tokio::sync::Mutex<u64>>,
}

impl Volume {
    /// Start the owner task over the given replicas, every ready one of
    /// which holds `size_bytes`.
    pub fn start(
        spec: VolumeSpec,
        size_bytes: u64,
        replicas: Vec<StartReplica>,
        config: CoreConfig,
    ) -> Volume {
        let metrics = Arc::new(VolumeMetrics::new());
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut modes = Vec::new();
        let mut links = Vec::new();
        let mut revisions = Vec::new();
        for (i, r) in replicas.into_iter().enumerate() {
            let revision = Arc::new(AtomicU64::new(0));
            match r {
                StartReplica::Ready(h) => {
                    tracing::info!(replica = %spec.addresses[i], "replica RW: chosen at start");
                    modes.push(ReplicaMode::ReadWrite);
                    links.push(Some(h.start(
                        ClientId(i),
                        spec.epoch,
                        events_tx.clone(),
                        revision.clone(),
                    )));
                }
                StartReplica::Unusable { cause } => {
                    tracing::warn!(replica = %spec.addresses[i], %cause, "replica ERR at start");
                    modes.push(ReplicaMode::Error { cause });
                    links.push(None);
                }
            }
            revisions.push(revision);
        }
        for (addr, m) in spec.addresses.iter().zip(&modes) {
            metrics.set_mode(addr, m);
        }
        let core = VolumeCore::new(config, modes, Instant::now());
        let size = Arc::new(AtomicU64::new(size_bytes));
        let owner = Owner {
            core,
            size: size.clone(),
            addresses: spec.addresses.clone(),
            membership_changed: false,
            events_tx: events_tx.clone(),
            spec: Arc::new(spec),
            outbox: links.iter().map(|_| Vec::new()).collect(),
            links,
            revisions,
            guests: HashMap::new(),
            next_guest: 1,
            metrics: metrics.clone(),
            throttle: Throttle::new(QosLimits::default(), Instant::now()),
            admitted: Vec::new(),
        };
        let spec = owner.spec.clone();
        tokio::spawn(owner.run(rx, events_rx));
        Volume {
            membership: Arc::new(tokio::sync::Mutex::new(spec.membership_generation)),
            spec,
            size,
            expanding: Arc::new(tokio::sync::Mutex::new(())),
            tx,
            caw: Arc::new(RwLock::new(())),
            metrics,
        }
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    /// The volume's size now, in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A point-in-time status; `None` if the owner task has stopped.
    pub async fn status(&self) -> Option<VolumeStatus> {
        self.ask(|reply| Command::Status { reply }).await.ok()
    }

    /// Run a snapshot operation on every active replica, ordered with the
    /// I/O around it.
    pub async fn control(&self, op: ControlOp) -> Result<ControlResults, VolumeError> {
        self.ask(|reply| Command::Io {
            op: GuestOp::Control(op),
            reply: Reply::Control(reply),
        })
        .await?
    }

    /// Freeze the head as snapshot `name` on every active replica.
    pub async fn snapshot_create(&self, name: String) -> Result<ChainDone, ChainError> {
        // A snapshot is a barrier: all I/O waits while every replica syncs
        // its head. A flush first, while I/O goes on, leaves the barrier only
        // what is written in between to sync (the first snapshot under load
        // paused writes for 700 ms without it). Only a shortcut: a failure
        // here is the snapshot's to report.
        if let Err(e) = self.drain_revisions().await {
            tracing::debug!(error = %e, "the flush before a snapshot failed");
        }
        self.change_chain(ControlOp::SnapshotCreate(name)).await
    }

    /// Merge snapshot `name` into its child on every active replica.
    pub async fn snapshot_delete(&self, name: String) -> Result<ChainDone, ChainError> {
        self.change_chain(ControlOp::SnapshotDelete(name)).await
    }

    /// Discard the head and every snapshot after `name` on every active
    /// replica.
    pub async fn snapshot_revert(&self, name: String) -> Result<ChainDone, ChainError> {
        self.change_chain(ControlOp::SnapshotRevert(name)).await
    }

    /// Run a chain-changing operation. The owner refuses it while a replica
    /// is being rebuilt, and decides what the answers mean (see
    /// [`chain_verdict`]): replicas that failed it are dropped in the same
    /// step, before any other command reaches the volume.
    async fn change_chain(&self, op: ControlOp) -> Result<ChainDone, ChainError> {
        self.ask(|reply| Command::Chain { op, reply }).await?
    }

    /// Remove the replica at `address` for good (`basalt replica rm`):
    /// refused if it is read-write and fewer than min-healthy read-write
    /// replicas would be left. The owner decides and drops in one step, so
    /// removals arriving together can never go below min-healthy between
    /// them.
    pub async fn remove_replica(&self, address: String) -> Result<(), RemoveError> {
        self.ask(|reply| Command::Remove { address, reply }).await?
    }

    /// Send the owner task a command and wait for its answer; the only
    /// failure is the owner having stopped.
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, VolumeError> {
        let gone = || VolumeError::Unavailable("the volume is shutting down".into());
        let (reply, rx) = oneshot::channel();
        self.tx.send(command(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Drop replica `replica` (by index) from the volume, with the cause
    /// logged once.
    pub fn drop_replica(&self, replica: usize, cause: String) {
        let _ = self.tx.send(Command::Drop { replica, cause });
    }

    /// The index of the replica at `address`, adding it (in ERR, until it
    /// is rebuilt) if the volume does not know it yet.
    pub async fn add_replica(&self, address: String) -> Result<usize, VolumeError> {
        self.ask(|reply| Command::Add { address, reply }).await
    }

    /// Start sending every new write to replica `replica` (write-only mode):
    /// the first step of its rebuild.
    pub async fn attach(&self, replica: usize, conn: super::link::Handshaken) -> Result<(), VolumeError> {
        self.ask(|reply| Command::Attach {
            replica,
            conn: Box::new(conn),
            reply,
        })
        .await?
        .map_err(VolumeError::Unavailable)
    }

    /// Wait until every write sent before this call has been answered by
    /// every active replica, without flushing (see [`GuestOp::Settle`]).
    pub async fn settle(&self) -> Result<(), VolumeError> {
        self.ask(|reply| Command::Io {
            op: GuestOp::Settle,
            reply: Reply::Control(reply),
        })
        .await?
        .map(|_| ())
    }

    /// Wait until every write sent before this call has been applied on
    /// every active replica and flushed (see [`GuestOp::Drain`]), answering
    /// with the revision each active replica gave the drain's flush (8 bytes little-endian per replica index): one
    /// flush, at one place in every replica's stream.
    pub async fn drain_revisions(&self) -> Result<ControlResults, VolumeError> {
        self.ask(|reply| Command::Io {
            op: GuestOp::Drain,
            reply: Reply::Control(reply),
        })
        .await?
    }

    /// The QoS limits in force; `None` if the owner task has stopped.
    pub async fn qos(&self) -> Option<QosLimits> {
        self.ask(|reply| Command::Qos { change: None, reply }).await.ok()
    }

    /// Change the QoS limits at once (ops waiting for a lifted limit are
    /// admitted); answers the limits now in force.
    pub async fn set_qos(&self, change: QosChange) -> Result<QosLimits, VolumeError> {
        self.ask(|reply| Command::Qos {
            change: Some(change),
            reply,
        })
        .await
    }

    /// The rebuild of `replica` is complete: it serves reads again.
    pub fn promote(&self, replica: usize) {
        let _ = self.tx.send(Command::Promote { replica });
    }

    /// Copy `extents` from a read-write replica to write-only `replica`, in
    /// one vectored read and one vectored write (see [`GuestOp::Copy`]).
    pub async fn copy(&self, replica: usize, extents: Vec<Extent>) -> Result<(), VolumeError> {
        let op = GuestOp::Copy {
            to: ClientId(replica),
            extents,
        };
        self.ask(|reply| Command::Io {
            op,
            reply: Reply::Io(reply),
        })
        .await?
        .map(|_| ())
    }

    async fn io(&self, op: GuestOp) -> Result<Bytes, DeviceError> {
        let (reply, rx) = oneshot::channel();
        let reply = Reply::Io(reply);
        self.tx
            .send(Command::Io { op, reply })
            .map_err(|_| DeviceError::Unavailable("the volume is shutting down".into()))?;
        let result = rx
            .await
            .map_err(|_| DeviceError::Unavailable("the volume is shutting down".into()))?;
        result.map_err(device_error)
    }

    async fn write_unlocked(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.io(GuestOp::Write { offset, data, fua }).await.map(|_| ())
    }
}

impl BlockDevice for Volume {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes(),
            logical_block_size: 512,
            // Replicas checksum and store 4 KiB blocks: tell initiators, so
            // that they align I/O and avoid read-modify-write.
            physical_block_exponent: 3,
            thin: true,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        self.io(GuestOp::Read { offset, len }).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let _shared = self.caw.read().await;
        self.write_unlocked(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.io(GuestOp::Flush).await.map(|_| ())
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _shared = self.caw.read().await;
        self.io(GuestOp::Unmap { offset, len }).await.map(|_| ())
    }

    async fn write_same(&self, offset: u64, len: u64, pattern: Bytes) -> Result<(), DeviceError> {
        if pattern.is_empty() || len == 0 {
            return Ok(());
        }
        let _shared = self.caw.read().await;
        let chunk_len = WRITE_SAME_CHUNK.min(len) / pattern.len() as u64 * pattern.len() as u64;
        let chunk_len = chunk_len.max(pattern.len() as u64);
        let mut buf = BytesMut::with_capacity(chunk_len as usize);
        while (buf.len() as u64) < chunk_len {
            buf.extend_from_slice(&pattern);
        }
        let chunk = buf.freeze();
        let mut done = 0;
        while done < len {
            let n = chunk_len.min(len - done);
            self.write_unlocked(offset + done, chunk.slice(..n as usize), false)
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn compare_and_write(&self, offset: u64, compare: Bytes, data: Bytes) -> Result<(), DeviceError> {
        let _exclusive = self.caw.write().await;
        let current = self
            .io(GuestOp::Read {
                offset,
                len: compare.len() as u32,
            })
            .await?;
        if let Some(pos) = current.iter().zip(compare.iter()).position(|(a, b)| a != b) {
            return Err(DeviceError::Miscompare { offset: pos as u64 });
        }
        self.write_unlocked(offset, data, false).await
    }

    async fn provisioning(&self, offset: u64, max_len: u64) -> Result<(Provisioning, u64), DeviceError> {
        use super::allocation::{first_run, BLOCK, WINDOW_BLOCKS};
        let end = offset.saturating_add(max_len).min(self.size_bytes());
        if offset >= end {
            return Ok((Provisioning::Mapped, 0));
        }
        // One window of blocks from the one holding `offset`; the initiator
        // asks again from where the answer stops.
        let start_lba = offset / BLOCK;
        let count = end.div_ceil(BLOCK).saturating_sub(start_lba).min(WINDOW_BLOCKS);
        let window_end = end.min((start_lba + count) * BLOCK);
        let answers = self
            .ask(|reply| Command::Io {
                op: GuestOp::Allocation { start_lba, count },
                reply: Reply::Control(reply),
            })
            .await
            .and_then(|answer| answer)
            .map_err(device_error)?;
        let answers: Vec<Result<Bytes, String>> = answers.into_iter().map(|(_, a)| a).collect();
        Ok(first_run(offset, window_end, &answers))
    }
}

/// How a volume error reaches the SCSI layer.
fn device_error(e: VolumeError) -> DeviceError {
    match e {
        VolumeError::Degraded { .. } | VolumeError::Unavailable(_) => DeviceError::Unavailable(e.to_string()),
        VolumeError::Unreadable { offset, reason } => DeviceError::Medium { offset, reason },
    }
}

/// What an op takes from the QoS buckets; `None` for the volume's own work
/// (rebuild copies, drains, settles, snapshot operations), which is never
/// throttled. See [`super::qos`] for why each op counts as it does.
fn throttle_cost(op: &GuestOp) -> Option<Cost> {
    match op {
        GuestOp::Read { len, .. } => Some(Cost::read(u64::from(*len))),
        GuestOp::Write { data, .. } => Some(Cost::write(data.len() as u64)),
        GuestOp::Flush => Some(Cost::FLUSH),
        GuestOp::Unmap { .. } => Some(Cost::UNMAP),
        GuestOp::Control(_)
        | GuestOp::Copy { .. }
        | GuestOp::Drain
        | GuestOp::Settle
        | GuestOp::Allocation { .. } => None,
    }
}

/// The state owned by the driver task.
struct Owner {
    core: VolumeCore,
    spec: Arc<VolumeSpec>,
    /// The volume's size, shared with every [`Volume`] handle.
    size: Arc<AtomicU64>,
    links: Vec<Option<Link>>,
    /// Requests for each replica produced in this turn, sent to its link as
    /// one batch at the end of the turn (by replica index, like `links`).
    outbox: Vec<Vec<Outgoing>>,
    revisions: Vec<Arc<AtomicU64>>,
    guests: HashMap<GuestId, Pending>,
    next_guest: u64,
    metrics: Arc<VolumeMetrics>,
    /// Replica addresses by index: the configured ones, then any added.
    addresses: Vec<String>,
    /// A replica left the active set since the last membership flush.
    membership_changed: bool,
    /// For links started later (rebuilt replicas); also keeps the event
    /// channel open with no replica connected.
    events_tx: mpsc::UnboundedSender<Event>,
    /// Initiator ops waiting for their QoS tokens.
    throttle: Throttle<(GuestId, GuestOp)>,
    /// Ops the throttle let through in this turn (kept for its allocation).
    admitted: Vec<Admitted<(GuestId, GuestOp)>>,
}

struct Pending {
    reply: Reply,
    kind: &'static str,
    bytes: u64,
    started: Instant,
}

impl Owner {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Fires when the oldest throttled op's tokens are there (armed only
        // while ops wait).
        let throttle_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(throttle_timer);
        let mut armed: Option<Instant> = None;
        let mut effects = Vec::new();
        loop {
            tokio::select! {
                // Replica events first: completing work frees the initiator
                // to send more, and a lost replica must be noticed before
                // new I/O is sent to it.
                biased;
                Some(event) = events.recv() => {
                    self.core.apply(Instant::now(), event, &mut effects);
                    // Drain what else is ready before acting: one wake-up
                    // handles a whole burst of replies.
                    while let Ok(event) = events.try_recv() {
                        self.core.apply(Instant::now(), event, &mut effects);
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.command(cmd, &mut effects);
                        while let Ok(cmd) = rx.try_recv() {
                            self.command(cmd, &mut effects);
                        }
                    }
                    None => return,
                },
                _ = &mut throttle_timer, if armed.is_some() => {
                    armed = None;
                    self.release_throttled(&mut effects);
                }
                _ = tick.tick() => self.core.apply(Instant::now(), Event::Tick, &mut effects),
            }
            self.carry_out(&mut effects);
            if let Some(at) = self.throttle.wake_at() {
                // Tokens that came while this turn ran: no need to wait for
                // the timer (on a busy loop it might lose to the branches
                // above for a while).
                if Instant::now() >= at {
                    self.release_throttled(&mut effects);
                    self.carry_out(&mut effects);
                }
                match self.throttle.wake_at() {
                    Some(at) if armed != Some(at) => {
                        throttle_timer.as_mut().reset(tokio::time::Instant::from_std(at));
                        armed = Some(at);
                    }
                    Some(_) => {}
                    None => armed = None,
                }
            } else {
                armed = None;
            }
            let healthy = self.core.healthy_count() >= self.core.config().min_healthy;
            if std::mem::take(&mut self.membership_changed) && healthy {
                self.membership_flush(&mut effects);
                self.carry_out(&mut effects);
            }
            self.metrics.in_flight.set(self.core.in_flight() as i64);
        }
    }

    /// A replica was dropped: flush the ones that remain, so that their
    /// revision moves past the dropped one's. A later controller comparing
    /// revisions then knows the dropped replica missed writes, even if no
    /// initiator flushed in between.
    fn membership_flush(&mut self, effects: &mut Vec<Effect>) {
        let id = GuestId(self.next_guest);
        self.next_guest += 1;
        // Nobody waits for the answer: a failure is handled like any other.
        let (reply, _) = oneshot::channel();
        let pending = Pending {
            reply: Reply::Io(reply),
            kind: "flush",
            bytes: 0,
            started: Instant::now(),
        };
        self.guests.insert(id, pending);
        self.core.apply(
            Instant::now(),
            Event::Guest {
                id,
                op: GuestOp::Flush,
            },
            effects,
        );
    }

    /// Hand a request to the core (through the QoS throttle for initiator
    /// I/O), remembering who waits for its answer.
    fn admit(&mut self, op: GuestOp, reply: Reply, effects: &mut Vec<Effect>) {
        let now = Instant::now();
        let id = GuestId(self.next_guest);
        self.next_guest += 1;
        let (kind, bytes) = match &op {
            GuestOp::Read { len, .. } => ("read", u64::from(*len)),
            GuestOp::Write { data, .. } => ("write", data.len() as u64),
            GuestOp::Flush => ("flush", 0),
            GuestOp::Unmap { len, .. } => ("unmap", *len),
            GuestOp::Control(_) => ("control", 0),
            GuestOp::Copy { extents, .. } => ("rebuild", extents.iter().map(|e| u64::from(e.len)).sum()),
            GuestOp::Drain => ("drain", 0),
            GuestOp::Settle => ("settle", 0),
            GuestOp::Allocation { .. } => ("allocation", 0),
        };
        self.guests.insert(
            id,
            Pending {
                reply,
                kind,
                bytes,
                started: now,
            },
        );
        match throttle_cost(&op) {
            Some(cost) => {
                self.throttle.offer(cost, (id, op), now, &mut self.admitted);
                self.admit_throttled(effects);
            }
            None => self.core.apply(now, Event::Guest { id, op }, effects),
        }
    }

    fn command(&mut self, cmd: Command, effects: &mut Vec<Effect>) {
        match cmd {
            Command::Io { op, reply } => self.admit(op, reply, effects),
            Command::Remove { address, reply } => {
                let result = match self.addresses.iter().position(|a| *a == address) {
                    None => Err(RemoveError::NotFound { address }),
                    Some(i) => self
                        .core
                        .remove_replica(ClientId(i), "removed with `basalt replica rm`".into(), effects)
                        .map_err(|refusal| RemoveError::WouldDegrade { address, refusal }),
                };
                let _ = reply.send(result);
            }
            Command::Chain { op, reply } => {
                let what = op.what();
                let rebuilding = self.core.modes().find(|(_, m)| **m == ReplicaMode::WriteOnly);
                if let Some((c, _)) = rebuilding {
                    let address = self.addresses[c.0].clone();
                    let _ = reply.send(Err(ChainError::Rebuilding { what, address }));
                } else {
                    self.admit(GuestOp::Control(op), Reply::Chain { what, reply }, effects);
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Drop { replica, cause } => {
                if replica < self.addresses.len() {
                    self.core.drop_replica(ClientId(replica), cause, effects);
                }
            }
            Command::Add { address, reply } => {
                let index = match self.addresses.iter().position(|a| *a == address) {
                    Some(i) => i,
                    None => {
                        let cause = "added; waiting for its rebuild".to_string();
                        let client = self.core.add_replica(ReplicaMode::Error { cause: cause.clone() });
                        self.metrics.set_mode(&address, &ReplicaMode::Error { cause });
                        tracing::info!(replica = %address, "replica added to the volume");
                        self.addresses.push(address);
                        self.links.push(None);
                        self.outbox.push(Vec::new());
                        self.revisions.push(Arc::new(AtomicU64::new(0)));
                        client.0
                    }
                };
                let _ = reply.send(index);
            }
            Command::Attach { replica, conn, reply } => {
                let size = self.size.load(Ordering::Acquire);
                if conn.identity.size_bytes < size {
                    let _ = reply.send(Err(format!(
                        "replica {} holds {} bytes, the volume {size}: it was expanded while the replica was \
                         being prepared; its rebuild grows it first when it is retried",
                        self.addresses.get(replica).map_or("?", String::as_str),
                        conn.identity.size_bytes
                    )));
                    return;
                }
                if replica < self.addresses.len() && !self.core.mode(ClientId(replica)).is_active() {
                    let link = conn.start(
                        ClientId(replica),
                        self.spec.epoch,
                        self.events_tx.clone(),
                        self.revisions[replica].clone(),
                    );
                    self.links[replica] = Some(link);
                    self.core
                        .set_mode(ClientId(replica), ReplicaMode::WriteOnly, effects);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Promote { replica } => {
                if replica < self.addresses.len()
                    && *self.core.mode(ClientId(replica)) == ReplicaMode::WriteOnly
                {
                    self.core
                        .set_mode(ClientId(replica), ReplicaMode::ReadWrite, effects);
                }
            }
            Command::Qos { change, reply } => {
                if let Some(change) = change {
                    let limits = self.throttle.limits().changed(&change);
                    self.throttle
                        .set_limits(limits, Instant::now(), &mut self.admitted);
                    self.metrics.set_qos_limits(&limits);
                    tracing::info!(%limits, "QoS limits set");
                    self.admit_throttled(effects);
                    self.export_waiting();
                }
                let _ = reply.send(self.throttle.limits());
            }
        }
    }

    /// Admit the throttled ops whose tokens are there by now.
    fn release_throttled(&mut self, effects: &mut Vec<Effect>) {
        self.throttle.release(Instant::now(), &mut self.admitted);
        self.admit_throttled(effects);
    }

    /// Hand what the throttle let through to the core, in its order.
    fn admit_throttled(&mut self, effects: &mut Vec<Effect>) {
        let mut admitted = std::mem::take(&mut self.admitted);
        for a in admitted.drain(..) {
            if !a.waited.is_zero() {
                self.metrics.observe_throttled(a.direction, a.waited);
            }
            let (id, op) = a.item;
            self.core.apply(Instant::now(), Event::Guest { id, op }, effects);
        }
        self.admitted = admitted;
        // Nothing waits without limits (clearing them releases every op).
        if !self.throttle.limits().is_empty() {
            self.export_waiting();
        }
    }

    fn export_waiting(&self) {
        for d in super::qos::Direction::ALL {
            self.metrics.set_qos_waiting(d, self.throttle.waiting(d));
        }
    }

    fn status(&self) -> VolumeStatus {
        let replicas = self
            .core
            .modes()
            .map(|(c, mode)| ReplicaStatus {
                address: self.addresses[c.0].clone(),
                mode: mode.clone(),
                revision: self.revisions[c.0].load(Ordering::Relaxed),
                outstanding: self.core.outstanding(c),
            })
            .collect();
        VolumeStatus {
            size_bytes: self.size.load(Ordering::Acquire),
            replicas,
            in_flight: self.core.in_flight(),
            healthy: self.core.healthy_count(),
            min_healthy: self.core.config().min_healthy,
        }
    }

    /// Apply the volume's policy to the answers to a chain-changing
    /// operation (see [`chain_verdict`]), dropping the replicas that failed
    /// it.
    fn chain_done(
        &mut self,
        what: &'static str,
        results: &[(ClientId, Result<Bytes, String>)],
        effects: &mut Vec<Effect>,
    ) -> Result<ChainDone, ChainError> {
        match chain_verdict(results, self.core.config().min_healthy) {
            ChainVerdict::Failed { failures } => Err(ChainError::Failed {
                what,
                failures: failures
                    .into_iter()
                    .map(|(c, e)| format!("{}: {e}", self.addresses[c.0]))
                    .collect(),
            }),
            ChainVerdict::Applied { diverged, held } => {
                for (c, e) in held {
                    tracing::warn!(
                        replica = %self.addresses[c.0],
                        error = %e,
                        "{what} refused there: a clone holds the snapshot; the replica stays"
                    );
                }
                let mut dropped = Vec::new();
                for (c, e) in diverged {
                    let cause = format!("{what} failed there ({e}); its snapshot chain differs");
                    self.core.drop_replica(c, cause, effects);
                    dropped.push(self.addresses[c.0].clone());
                }
                Ok(ChainDone { dropped })
            }
        }
    }

    fn carry_out(&mut self, effects: &mut Vec<Effect>) {
        // Consecutive sends of one write share one payload CRC.
        let mut crc_for: Option<(super::core::JobId, Option<u32>)> = None;
        // What deciding on a chain operation's answers causes (replicas
        // dropped), carried out after this batch.
        let mut followups = Vec::new();
        for effect in effects.drain(..) {
            match effect {
                Effect::Send { client, job, request } => {
                    if let ReplicaRequest::Control(ControlOp::Resize(size)) = &request {
                        // The barrier is out: I/O past the old end now waits behind it.
                        self.size.fetch_max(*size, Ordering::AcqRel);
                    }
                    let payload_crc = match crc_for {
                        Some((j, crc)) if j == job => crc,
                        _ => {
                            let crc = write_crc(&request);
                            crc_for = Some((job, crc));
                            crc
                        }
                    };
                    if self.links[client.0].is_some() {
                        self.outbox[client.0].push(Outgoing {
                            job,
                            request,
                            payload_crc,
                        });
                    }
                }
                Effect::Complete { guest, result } => {
                    if let Some(p) = self.guests.remove(&guest) {
                        self.metrics
                            .observe(p.kind, p.bytes, p.started.elapsed(), result.is_ok());
                        if let Err(e) = &result {
                            tracing::warn!(op = p.kind, error = %e, "I/O failed");
                        }
                        match p.reply {
                            Reply::Io(tx) => {
                                let _ = tx.send(result);
                            }
                            Reply::Control(tx) => {
                                let _ = tx.send(result.map(|_| Vec::new()));
                            }
                            Reply::Chain { reply, .. } => {
                                let _ = reply
                                    .send(result.map(|_| ChainDone::default()).map_err(ChainError::from));
                            }
                        }
                    }
                }
                Effect::ControlDone { guest, results } => match self.guests.remove(&guest).map(|p| p.reply) {
                    Some(Reply::Control(tx)) => {
                        let _ = tx.send(Ok(results.into_iter().map(|(c, r)| (c.0, r)).collect()));
                    }
                    Some(Reply::Chain { what, reply }) => {
                        let outcome = self.chain_done(what, &results, &mut followups);
                        let _ = reply.send(outcome);
                    }
                    _ => {}
                },
                Effect::ModeChanged { client, mode } => {
                    let addr = &self.addresses[client.0];
                    match &mode {
                        ReplicaMode::Error { cause } => {
                            self.membership_changed = true;
                            tracing::warn!(replica = %addr, %cause, "replica ERR: dropped from the volume");
                            self.metrics.replica_errors.with_label_values(&[addr]).inc();
                        }
                        m => tracing::info!(replica = %addr, mode = m.label(), "replica mode changed"),
                    }
                    self.metrics.set_mode(addr, &mode);
                    if self.core.healthy_count() < self.core.config().min_healthy {
                        tracing::error!(
                            healthy = self.core.healthy_count(),
                            min_healthy = self.core.config().min_healthy,
                            "volume degraded: fewer read-write replicas than --min-healthy; failing I/O"
                        );
                    }
                }
                Effect::Disconnect { client } => {
                    // Requests queued for the old connection go down with it.
                    self.outbox[client.0].clear();
                    self.links[client.0] = None;
                }
            }
        }
        if !followups.is_empty() {
            self.carry_out(&mut followups);
        }
        for (link, outbox) in self.links.iter().zip(&mut self.outbox) {
            if let (Some(link), false) = (link, outbox.is_empty()) {
                link.send(std::mem::take(outbox));
            }
        }
        self.metrics.healthy.set(self.core.healthy_count() as i64);
    }
}
