//! # The replica server: one store, one TCP address, the data-path protocol
//!
//! A controller connects, says Hello, and then pipelines requests; this
//! module executes them against the [`Store`] and answers each by id.
//!
//! ```text
//!                 +-------------------- one connection ------------------------------+
//!  socket rx ---> | reader task: decode, check Hello, take an in-flight budget       |
//!                 |   |-- Ping ------------------------------------------------------+--> written at once
//!                 |   |-- Read/ReadV, cached --> store on the reader task ----------+--> written at once
//!                 |   |-- Read/ReadV, not cached --> spawn_blocking (concurrently) -+--> reply channel
//!                 |   |-- plain Write/WriteV, lane idle --> batched, on the reader -+--> written at once
//!                 |   '-- Unmap/FUA write/Flush/Snapshot*/Info/SetEpoch, or a       |
//!                 |       write behind one --> ordered lane: ONE blocking thread ---+--> reply channel
//!                 |                                                                  |
//!                 | writer task: drain reply channel, one vectored write/batch       |
//!  socket tx <--- | "written at once": one vectored write on the reader task, unless |
//!                 | replies are queued ahead (then behind them, by the flusher task) |
//!                 +------------------------------------------------------------------+
//! ```
//!
//! ## Why this shape
//!
//! * **Writes in arrival order.** Everything that changes the volume is
//!   executed in the order the controller sent it, so overlapping writes land
//!   in that order, a Flush reply covers every write that arrived before it,
//!   and a snapshot sits exactly between the writes before and after it. Plain
//!   writes run on the reader task itself, batched (one store call, one
//!   index-log append for every write decoded back to back), but only while
//!   the lane is idle; anything that may wait for the disk goes to the lane,
//!   and a write that arrives while the lane has work queues behind it there.
//!   A FUA write is a write plus a flush on the lane.
//! * **Reads concurrently.** Reads may overtake each other and queued writes:
//!   a controller only reads data whose write it has seen acknowledged (a
//!   SCSI initiator does the same), so ordering reads behind writes would only
//!   add latency. A read whose blocks are all in the page cache is answered on
//!   the reader task (`preadv2(RWF_NOWAIT)`); any other read goes to
//!   `spawn_blocking`.
//! * **The runtime never waits for the disk.** On the runtime's threads the
//!   store only copies to and from the page cache (buffered writes, cached
//!   reads); fdatasync, cache misses and snapshot work run on blocking
//!   threads. Why not everything on blocking threads: a 4 KiB page-cache copy
//!   takes a few microseconds, the hand-off to a blocking thread and back two
//!   wake-ups and two context switches, most of a replica's CPU per 4 KiB
//!   write on a small machine (`benches/README.md`). The cost:
//!   a buffered write can be throttled by dirty-page writeback (bounded by the
//!   kernel's dirty limits), and it then holds up this connection's frames.
//! * **Bounded memory.** The reader takes a budget of in-flight bytes
//!   ([`MAX_IN_FLIGHT_BYTES`]) before dispatching a request and the budget is
//!   returned when the reply is queued, so a fast sender is slowed down by
//!   TCP instead of filling the replica's memory.
//!
//! ## Authentication
//!
//! A connection is served only after it proved that it knows the volume's
//! secret (Hello, then Auth: see `basalt_proto::auth`), and the replica
//! proves the same to it in its HelloOk. Before a valid Auth, the only
//! requests answered are Hello and Auth; everything else is refused
//! `NotAuthenticated` and executes nothing. What a Hello asks for that
//! changes the replica -- raising the epoch, taking the writer role -- is
//! carried out only once its Auth checks out, so a client without the secret
//! can neither fence the real controller nor shut its link out. A failed
//! Auth is answered `AuthFailed`, logged (without any secret or proof), and
//! closes the connection.
//!
//! ## Epoch fencing
//!
//! Every request but Hello and Auth must carry exactly the store's current epoch:
//! a lower one is answered `StaleEpoch{current}` (a newer controller owns the
//! volume; logged), a higher one `EpochNotRaised{current}` (only Hello and
//! SetEpoch raise the epoch, durably, so that a replica never adopts an epoch
//! by accident of a data request). The check runs when the request
//! *executes*, under a fence lock that SetEpoch takes exclusively: once a
//! SetEpoch(e) is acknowledged, no request of an older epoch is running or
//! will run, even if it was queued earlier on another connection.
//!
//! ## Bad input
//!
//! A frame that does not decode (bad magic, CRC, length, version, op) closes
//! its connection with a log line: after a corrupt header the stream cannot
//! be trusted. Requests that decode but are wrong (out of range, unaligned,
//! stale epoch, unknown snapshot, request before Hello) get a `Failed` reply
//! with a status and a message, and are never executed. Other connections
//! are not affected either way.
//!
//! ## Dead peers
//!
//! Every accepted socket gets the data path's dead-peer detection
//! (`basalt_proto::peer`), so a controller that vanished without FIN or RST
//! loses its connection, and what it held, within a bound. A controller that
//! comes back need not wait for that: a new writer connection at the same or
//! a higher epoch takes the writer role at once, and the old connection's
//! changes are refused `Superseded`; one at a lower epoch never takes it.
//!
//! ## Shutdown
//!
//! [`Server::run`] stops accepting when its token is cancelled; each
//! connection stops reading, finishes what it has accepted, sends the
//! replies, and closes; finally the store is flushed.

mod connection;
mod metrics;

pub mod clone;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use basalt_proto::auth::VolumeSecret;
use basalt_proto::frame::ReplyError;
use basalt_proto::Epoch;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Store, StoreError, SECTOR_SIZE};

pub use metrics::{bind_metrics, serve_metrics, Metrics};

/// Budget of request bytes (payloads of writes, lengths of reads; at least
/// [`BUDGET_UNIT`] per request) one connection may have accepted and not yet
/// answered: 64 MiB is 4 maximum-size frames, or 16,384 4 KiB requests,
/// which keeps a 10 GbE link busy at any queue depth a controller uses.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// The budget is counted in 4 KiB units (a tokio semaphore counts permits).
const BUDGET_UNIT: usize = 4096;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}; is another replica already using that address?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "final flush of the store at shutdown failed: {0}; data written since the last flush may be lost"
    )]
    FinalFlush(#[source] StoreError),
    #[error("the final flush task did not complete: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A replica server bound to its address, not yet serving.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// What every connection of a server shares.
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub metrics: Metrics,
    /// The volume's secret: every connection proves it knows it, and so does the replica.
    pub secret: VolumeSecret,
    /// Taken shared by every request while it checks its epoch and executes,
    /// exclusively by an epoch change: see "Epoch fencing" above.
    fence: RwLock<()>,
    /// The connection that may change the store (0: any). A controller's
    /// data link takes this role at Hello (or when it raises the epoch), so
    /// frames an older link left in a socket buffer -- a link the controller
    /// dropped as hung, then replaced for a rebuild -- are refused instead of
    /// landing on top of newer data.
    writer: std::sync::atomic::AtomicU64,
    /// Source of connection ids (never 0).
    next_conn: std::sync::atomic::AtomicU64,
    /// Bytes written since the last writeback was started (see [`Shared::wrote`]).
    since_writeback: std::sync::atomic::AtomicU64,
    /// A writeback is being started on a blocking thread.
    writeback_running: Arc<std::sync::atomic::AtomicBool>,
}

/// Bytes written after which the replica starts writing its data back (see [`Shared::wrote`]).
const WRITEBACK_BYTES: u64 = 64 << 20;

/// Who sent a request: the connection, and whether it asked to be the
/// writer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnId {
    pub id: u64,
    pub writer: bool,
}

impl Shared {
    /// `n` bytes were written. Every [`WRITEBACK_BYTES`] the store's writeback is started, on a
    /// blocking thread (it may wait for the disk's queue), one at a time. Without it a guest that
    /// writes fast and seldom flushes leaves hundreds of MiB dirty, and the next flush -- the guest's,
    /// a snapshot's, the drain that ends a rebuild -- writes them all back while new writes wait
    /// behind it, and the guest stalls (at the end of a rebuild under load, most visibly). Costs
    /// nothing on durability (only a flush makes anything durable), and some disk bandwidth where a
    /// page rewritten after its writeback is written twice: a smaller step stalls less but costs the
    /// guest IOPS during a rebuild, this one costs none measurable (`benches/README.md`, "Rebuild").
    pub(super) fn wrote(&self, n: usize) {
        use std::sync::atomic::Ordering;
        self.metrics.bytes_written(n);
        let total = self.since_writeback.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total < WRITEBACK_BYTES || self.writeback_running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.since_writeback.store(0, Ordering::Relaxed);
        let (store, running) = (self.store.clone(), self.writeback_running.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.start_writeback() {
                tracing::debug!(error = %e, "starting the writeback failed; the next flush writes it all");
            }
            running.store(false, Ordering::Release);
        });
    }

    fn fence_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.fence.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn fence_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.fence.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `op` if `epoch` is the store's current epoch, with no epoch
    /// change possible until it returns.
    pub(crate) fn fenced<T>(
        &self,
        epoch: Epoch,
        op: impl FnOnce(&Store) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let _fence = self.fence_shared();
        self.check_epoch(epoch)?;
        op(&self.store)
    }

    /// Whether a request of `epoch` may run now.
    pub(crate) fn check_epoch(&self, epoch: Epoch) -> Result<(), Refusal> {
        let current = self.store.epoch();
        if epoch < current {
            tracing::warn!(
                request_epoch = epoch.0,
                current = current.0,
                "refused a request of a stale epoch"
            );
            return Err(Refusal::new(
                ReplyError::StaleEpoch { current },
                format!(
                    "request of {epoch} refused: this replica is at {current}; a newer controller owns it"
                ),
            ));
        }
        if epoch > current {
            return Err(Refusal::new(
                ReplyError::EpochNotRaised { current },
                format!(
                    "request of {epoch} refused: this replica is at {current}; raise it with Hello or \
                     SetEpoch before sending I/O"
                ),
            ));
        }
        Ok(())
    }

    /// Raises the store's epoch to `epoch` (no-op if equal), after every
    /// request of the old epoch has finished.
    /// A fresh connection id.
    pub(crate) fn new_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Make `conn` the only writer, if it asked to be one and is not of a
    /// stale epoch. Waits for requests executing under the old writer, so
    /// none of them is still changing the store afterwards.
    pub(crate) fn take_writer(&self, conn: ConnId, epoch: Epoch) {
        if conn.writer && epoch >= self.store.epoch() {
            let _fence = self.fence_exclusive();
            let before = self.writer.swap(conn.id, std::sync::atomic::Ordering::AcqRel);
            if before != conn.id && before != 0 {
                tracing::info!(
                    connection = conn.id,
                    "a new writer connection took over; the old one is shut out"
                );
            }
        }
    }

    /// Refused unless `conn` may change the store (see [`Shared::fenced_write`]).
    pub(crate) fn check_writer(&self, conn: ConnId) -> Result<(), Refusal> {
        let writer = self.writer.load(std::sync::atomic::Ordering::Acquire);
        if writer != 0 && writer != conn.id {
            return Err(Refusal::new(
                ReplyError::Superseded,
                "this connection was superseded by a newer writer connection; reconnect to continue",
            ));
        }
        Ok(())
    }

    /// Like [`Shared::fenced`], for requests that change the store: refused
    /// unless `conn` is the writer (or no connection has claimed the role).
    pub(crate) fn fenced_write<T>(
        &self,
        epoch: Epoch,
        conn: ConnId,
        op: impl FnOnce(&Store) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        self.fenced(epoch, |store| {
            self.check_writer(conn)?;
            op(store)
        })
    }

    pub(crate) fn raise_epoch(&self, epoch: Epoch) -> Result<(), Refusal> {
        let _fence = self.fence_exclusive();
        let before = self.store.epoch();
        self.store.set_epoch(epoch).map_err(Refusal::from)?;
        if epoch > before {
            tracing::info!(from = before.0, to = epoch.0, "epoch raised");
        }
        Ok(())
    }
}

/// A request the replica did not carry out: the status and the words for it.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub error: ReplyError,
    pub message: String,
}

impl Refusal {
    pub fn new(error: ReplyError, message: impl Into<String>) -> Refusal {
        Refusal {
            error,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(ReplyError::BadRequest, message)
    }
}

impl From<StoreError> for Refusal {
    /// The store's message says what was wrong; the status says what kind of
    /// wrong, so the controller can react without parsing text.
    fn from(e: StoreError) -> Refusal {
        let error = match &e {
            StoreError::ChecksumMismatch { lba } => ReplyError::ChecksumMismatch { lba: *lba },
            StoreError::OutOfRange { size, .. } => ReplyError::OutOfRange { size_bytes: *size },
            StoreError::Unaligned { .. } => ReplyError::Unaligned {
                alignment: SECTOR_SIZE,
            },
            StoreError::StaleEpoch { current, .. } => ReplyError::StaleEpoch { current: *current },
            StoreError::NoSuchSnapshot(_) => ReplyError::NoSuchSnapshot,
            StoreError::SnapshotExists(_) => ReplyError::SnapshotExists,
            StoreError::InvalidSnapshotName { .. }
            | StoreError::BadSyncPoint { .. }
            | StoreError::InvalidSize { .. } => ReplyError::BadRequest,
            StoreError::Shrink { size, .. } => ReplyError::ShrinkRefused { size_bytes: *size },
            StoreError::TooLarge { max, .. } => ReplyError::TooLarge { max_bytes: *max },
            StoreError::VolumeMismatch { .. } => ReplyError::VolumeMismatch,
            StoreError::SnapshotHeld { .. } => ReplyError::SnapshotHeld,
            StoreError::Hydrating { .. } => ReplyError::Hydrating,
            StoreError::SourceUnavailable { .. } => ReplyError::SourceUnavailable,
            StoreError::StaleMembership { current, .. } => ReplyError::StaleMembership { current: *current },
            StoreError::Io { .. }
            | StoreError::Failed { .. }
            | StoreError::Corrupt { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::InUse { .. }
            | StoreError::NotAVolume { .. } => ReplyError::Io,
        };
        if error == ReplyError::Io {
            tracing::error!(error = %e, "store I/O failed");
        }
        Refusal {
            error,
            message: e.to_string(),
        }
    }
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]). Only clients that know
    /// `secret` are served.
    pub async fn bind(
        addr: SocketAddr,
        store: Arc<Store>,
        metrics: Metrics,
        secret: VolumeSecret,
    ) -> Result<Server, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                store,
                metrics,
                secret,
                fence: RwLock::new(()),
                writer: std::sync::atomic::AtomicU64::new(0),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                since_writeback: std::sync::atomic::AtomicU64::new(0),
                writeback_running: Default::default(),
            }),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has a local address; fall back to
        // unspecified rather than panic if the OS says otherwise.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` is cancelled, then drains every connection
    /// and flushes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let connections = TaskTracker::new();
        tracing::info!(
            addr = %self.local_addr(),
            volume = %self.shared.store.volume_id(),
            size_bytes = self.shared.store.size_bytes(),
            epoch = self.shared.store.epoch().0,
            revision = self.shared.store.revision().0,
            "replica serving"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = self.shared.clone();
                        let stop = shutdown.child_token();
                        connections.spawn(connection::serve(stream, peer, shared, stop));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        // EMFILE and friends: retrying at once would spin.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(self.listener);
        tracing::info!("shutting down: draining connections");
        connections.close();
        connections.wait().await;
        let store = self.shared.store.clone();
        // Unnumbered: this flush is the replica's own, not one of the controller's stream (see
        // `Store::flush_unnumbered`).
        let revision =
            tokio::task::spawn_blocking(move || store.flush_unnumbered().map(|()| store.revision()))
                .await?
                .map_err(ServerError::FinalFlush)?;
        tracing::info!(revision = revision.0, "replica stopped cleanly");
        Ok(())
    }
}
