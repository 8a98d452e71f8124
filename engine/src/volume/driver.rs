//! The owner task: runs the [`VolumeCore`] and carries out its effects.
//!
//! Crucible's select/apply loop: one task owns the core; `select!` waits for
//! the next input (an initiator request, a replica event, the 100 ms tick);
//! the core turns it into effects; the loop sends requests to replica links
//! and completes initiator requests. No lock guards the volume state, and no
//! lock is held across a replica round trip. [`Volume`] is the handle the
//! iSCSI target uses: it implements `BlockDevice`.

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
    ClientId, ControlOp, CoreConfig, Effect, Event, GuestId, GuestOp, ReplicaMode, VolumeCore, VolumeError,
};
use super::link::{write_crc, Link, Outgoing};
use super::metrics::VolumeMetrics;

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

/// Static facts about the volume.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    pub name: String,
    pub volume: VolumeId,
    pub size_bytes: u64,
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
    Attach {
        replica: usize,
        conn: Box<super::link::Handshaken>,
        reply: oneshot::Sender<()>,
    },
    /// Rebuild finished: the replica holds everything.
    Promote {
        replica: usize,
    },
}

enum Reply {
    Io(oneshot::Sender<Result<Bytes, VolumeError>>),
    Control(oneshot::Sender<Result<ControlResults, VolumeError>>),
}

/// The handle to a running volume. Cheap to clone.
#[derive(Clone)]
pub struct Volume {
    spec: Arc<VolumeSpec>,
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
    /// Start the owner task over the given replicas.
    pub fn start(spec: VolumeSpec, replicas: Vec<StartReplica>, config: CoreConfig) -> Volume {
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
        let owner = Owner {
            core,
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
        };
        let spec = owner.spec.clone();
        tokio::spawn(owner.run(rx, events_rx));
        Volume {
            membership: Arc::new(tokio::sync::Mutex::new(spec.membership_generation)),
            spec,
            tx,
            caw: Arc::new(RwLock::new(())),
            metrics,
        }
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
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
        .await
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
        result.map_err(|e| match e {
            VolumeError::Degraded { .. } | VolumeError::Unavailable(_) => {
                DeviceError::Unavailable(e.to_string())
            }
            VolumeError::Unreadable { offset, reason } => DeviceError::Medium { offset, reason },
        })
    }

    async fn write_unlocked(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.io(GuestOp::Write { offset, data, fua }).await.map(|_| ())
    }
}

impl BlockDevice for Volume {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.spec.size_bytes,
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
        // Replicas do not report their allocation maps to the controller:
        // "mapped" is always a correct answer (an initiator may not rely on a
        // deallocated report), just not the most informative one.
        let len = max_len.min(self.spec.size_bytes.saturating_sub(offset));
        Ok((Provisioning::Mapped, len))
    }
}

/// The state owned by the driver task.
struct Owner {
    core: VolumeCore,
    spec: Arc<VolumeSpec>,
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
                _ = tick.tick() => self.core.apply(Instant::now(), Event::Tick, &mut effects),
            }
            self.carry_out(&mut effects);
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

    fn command(&mut self, cmd: Command, effects: &mut Vec<Effect>) {
        match cmd {
            Command::Io { op, reply } => {
                let id = GuestId(self.next_guest);
                self.next_guest += 1;
                let (kind, bytes) = match &op {
                    GuestOp::Read { len, .. } => ("read", u64::from(*len)),
                    GuestOp::Write { data, .. } => ("write", data.len() as u64),
                    GuestOp::Flush => ("flush", 0),
                    GuestOp::Unmap { len, .. } => ("unmap", *len),
                    GuestOp::Control(_) => ("control", 0),
                    GuestOp::Copy { extents, .. } => {
                        ("rebuild", extents.iter().map(|e| u64::from(e.len)).sum())
                    }
                    GuestOp::Drain => ("drain", 0),
                    GuestOp::Settle => ("settle", 0),
                };
                self.guests.insert(
                    id,
                    Pending {
                        reply,
                        kind,
                        bytes,
                        started: Instant::now(),
                    },
                );
                self.core.apply(Instant::now(), Event::Guest { id, op }, effects);
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
                let _ = reply.send(());
            }
            Command::Promote { replica } => {
                if replica < self.addresses.len()
                    && *self.core.mode(ClientId(replica)) == ReplicaMode::WriteOnly
                {
                    self.core
                        .set_mode(ClientId(replica), ReplicaMode::ReadWrite, effects);
                }
            }
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
            replicas,
            in_flight: self.core.in_flight(),
            healthy: self.core.healthy_count(),
            min_healthy: self.core.config().min_healthy,
        }
    }

    fn carry_out(&mut self, effects: &mut Vec<Effect>) {
        // Consecutive sends of one write share one payload CRC.
        let mut crc_for: Option<(super::core::JobId, Option<u32>)> = None;
        for effect in effects.drain(..) {
            match effect {
                Effect::Send { client, job, request } => {
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
                        }
                    }
                }
                Effect::ControlDone { guest, results } => {
                    if let Some(Pending {
                        reply: Reply::Control(tx),
                        ..
                    }) = self.guests.remove(&guest)
                    {
                        let _ = tx.send(Ok(results.into_iter().map(|(c, r)| (c.0, r)).collect()));
                    }
                }
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
        for (link, outbox) in self.links.iter().zip(&mut self.outbox) {
            if let (Some(link), false) = (link, outbox.is_empty()) {
                link.send(std::mem::take(outbox));
            }
        }
        self.metrics.healthy.set(self.core.healthy_count() as i64);
    }
}
