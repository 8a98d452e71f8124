//! Online rebuild: bring a replica (new, returning, or stale) back to RW
//! while I/O goes on, holding exactly the source's snapshot chain.
//!
//! ```text
//!  1. connect + Hello at the volume's epoch   (the replica now refuses older controllers)
//!     grow it to the volume's size            (it missed an expansion while it was away)
//!     and choose the source                   the first RW replica whose write-intent record
//!                                              answers for the target, else the first RW one
//!  2. make the target's chain the source's    (before WO: snapshots are immutable, so no
//!                                              guest write needs to reach the target yet)
//!  3. ask the target where it stands          its sync point, and what it may hold unflushed;
//!     and take it off any shared numbering     (it is about to be copied onto)
//!  4. attach as WO                            every new write reaches it from here on,
//!     and settle                              and every earlier one is answered everywhere
//!  5. ask the source's write-intent record    which regions may differ since the target's
//!                                              sync point -- or "unknown"
//!  6. list block checksums on a RW source and on the target, in those regions only
//!     (the whole volume if the record cannot answer): `RunCrcs`, up to 2^16 regions
//!     per request, both replicas at once
//!  7. copy what differs, through the core     (up to 64 runs a copy: one `ReadV` from a RW
//!                                              replica, one `WriteV` to the target; ordered
//!                                              with guest writes; a copy overtaken by a guest
//!                                              write is read again; slower while the guest is
//!                                              busy; the target flushed every 64 MiB so the
//!                                              drain below stays short)
//!  8. check both chains still match, then promote to RW
//!  9. drain: one flush on every replica      (after the promotion: the copy becomes durable,
//!                                              and the target adopts the source's flush
//!                                              numbering at that flush; see `Promoted`)
//! ```
//!
//! Only allocated blocks travel, and for a replica that comes back with most
//! of its data only the blocks whose checksums differ (a delta rebuild).
//!
//! ## Expansions
//!
//! A target smaller than the volume missed an expansion: it is grown first,
//! before its chain is touched (the new blocks read as zeros, as they do on
//! every replica that grew, so nothing past its old end needs a copy that a
//! write did not already bring). An expansion that comes while the rebuild
//! runs reaches the target once it is attached (a write-only replica is
//! active); one that comes between the grow and the attach would be missed,
//! so the volume refuses to attach a replica smaller than itself and the
//! rebuild is retried (and grows it again). The checksum listings are taken
//! over the volume's size as it is after the attach, so they cover every
//! block a grown volume has.
//!
//! ## The write-intent record (steps 3, 5 and 9)
//!
//! Every replica records which 64 KiB regions were written at which flush
//! (`basalt_replica::store` module `intent`), persistently, so a source can
//! answer "what may differ from a replica last in sync with me at flush X"
//! even after a controller restart. A returning replica's own last durable
//! flush is X; the answer is the source's regions written since X, plus the
//! target's own (what it wrote but may have lost, or what a dead controller
//! wrote to it alone). Checksums are then compared only there, instead of
//! over every allocated block of the volume. The record refuses to answer
//! -- and the full comparison runs -- when the target is on another flush
//! numbering (a new, reset or half-rebuilt replica), when X is older than
//! what the record holds, when the target is ahead of the source, or when
//! the two made flush X under different epochs (histories that split).
//!
//! Revisions are per replica; they mean the same flush on two replicas
//! because every flush fans out to the whole active set and each replica
//! places it in stream order, and because a rebuilt replica adopts the
//! source's numbering at step 9: the drain's flush is one flush at one place
//! in both streams, so the target's revision for it is set to the source's.
//!
//! ## The snapshot chain (step 2)
//!
//! The source's and the target's chains are compared by name, oldest first.
//! A snapshot is immutable, so the snapshots both hold under the same names
//! in the same order (the common prefix) are kept. If the chains differ
//! after that prefix, the target drops everything above it -- `SnapshotRevert`
//! to the last common snapshot, or `Reset` (one empty head, same volume id,
//! size and epoch, revision 0) if there is none -- and the source's remaining
//! snapshots are replayed, oldest first:
//!
//! ```text
//!   for each snapshot S to replay:
//!     LayerBlocks(S) on the source, page by page    the blocks S holds *itself*
//!     ReadLayer(S) -> Write on the target's head    runs of data, up to 1 MiB, 16 in flight
//!     Write zeros + Unmap on the target's head      runs of tombstones (the zeros make the
//!                                                    unmap record a tombstone even where no
//!                                                    older layer holds the block)
//!     SnapshotCreate(S) on the target               once every write of S is acknowledged
//! ```
//!
//! Each replayed layer holds exactly the source layer's blocks, so every
//! snapshot reads the same on both, and no "system" snapshot is ever created
//! (Longhorn and Jiva take one per rebuild and run into chain limits). What
//! the head holds is then brought over by the delta of steps 4-5, which only
//! has to cover the writes since the last snapshot.
//!
//! A chain that changed during all this would be copied half-way, so chain
//! operations and rebuilds exclude each other: a rebuild holds the
//! [`Rebuilder`]'s chain lock shared from start to its final drain, and a snapshot
//! operation takes it exclusively or is refused ([`Rebuilder::reserve_chain`]).
//! Step 8 checks the chains once more all the same, and a mismatch fails the
//! rebuild (it is retried).
//!
//! The [`Rebuilder`] also re-adds replicas that failed and come back at the
//! same address, retrying with back-off.
//!
//! A rebuild holds two connections of its own (to the source and to the
//! target) besides the volume's links, and closes both when it ends, however
//! it ends. Its completion log line lists the time of each step.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_proto::client::{ClientError, ReplicaClient};
use basalt_proto::frame::{
    BlockCrc, BlockRun, Extent, LayerBlock, LayerBlockState, Message, SyncPoint, WrittenAnswer, MAX_CRC_RUNS,
    MAX_EXTENTS, MAX_VECTORED_BYTES,
};
use basalt_proto::pb::replica as pb;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use super::core::ReplicaMode;
use super::link::{Handshaken, LinkError, REQUEST_TIMEOUT};
use super::{Volume, VolumeSpec};

/// Largest single copy: 1 MiB (256 blocks). Big enough to stream, small
/// enough that a copy overtaken by a guest write costs little to redo.
const MAX_COPY: u64 = 1 << 20;
/// Most runs one copy gathers (see [`copies_of`]), each an extent of one
/// vectored read and one vectored write. A delta rebuild copies mostly
/// single 4 KiB blocks scattered over the volume (the ones a returning
/// replica missed); one copy each cost a round trip through the core and
/// both replicas' I/O loops per block: 2,600 blocks took 45-65 ms in the
/// rebuild bench. Copying 2,600 such blocks between replica processes on 2
/// cores ([`COPY_DEPTH`] in flight, medians of three sweeps): 38-44 ms one
/// to a copy, 15-22 ms anywhere from 16 to 128 to a copy (the sweeps did not
/// tell these apart), 20-26 ms 256 to a copy (a whole [`MAX_COPY`] of single
/// blocks: the target's first write then waits for 1 MiB scattered reads
/// that the sources run side by side). 64 halves the requests of 32, and a
/// copy of 64 blocks holds the target's write lane, and the guest writes
/// queued behind it, for well under a millisecond, and costs little to read
/// again when a guest write overtakes it.
const COPY_EXTENTS: usize = 64;
// A copy must fit in one vectored request.
const _: () = assert!(COPY_EXTENTS <= MAX_EXTENTS && MAX_COPY <= MAX_VECTORED_BYTES as u64);
/// Copies in flight at once during a rebuild: enough to keep a replica busy
/// over loopback without starving guest I/O of the core's attention. Small
/// copies used to run deeper (up to 256 single blocks, whose round trips
/// otherwise left both replicas idle); gathered into copies of
/// [`COPY_EXTENTS`] they need not: 2,600 scattered blocks (41 copies of 64)
/// copied in 15-22 ms with 8 or 16 in flight, 25 ms with all 41 at once --
/// thousands of scattered reads at once only queue up on the sources'
/// blocking pools while the target waits for its first write.
const COPY_DEPTH: usize = 16;
/// Bytes of copies in flight while the guest is busy (see [`CopyPacer`]):
/// two 1 MiB copies, or up to [`COPY_DEPTH`] smaller ones.
const BUSY_COPY_BYTES: u64 = 2 * MAX_COPY;
/// Bytes a second the copy may take while the guest is busy (see
/// [`CopyPacer`]): 1 GiB in 8 s, inside the 15 s goal for a rebuild under
/// load with room for its drains.
const BUSY_COPY_RATE: u64 = 128 << 20;
/// Guest I/Os per second from which the copy yields to the guest: well
/// above a guest that only ticks (a filesystem's periodic commit), well
/// below one that does real work.
const BUSY_GUEST_IOPS: f64 = 200.0;
/// How often the copy looks at the guest's rate: often enough to yield
/// within a few I/Os' time of a burst, long enough to count a rate.
const PACE_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes copied between two flushes of the target during the copy (see
/// [`TargetWriteback`]): written back in well under the 200 ms a guest I/O
/// may stall, on the disks we measure on, and few enough flushes (16 per
/// GiB) that their fixed cost does not count.
const TARGET_FLUSH_BYTES: u64 = 64 << 20;
const BLOCK: u64 = 4096;
/// Layer runs (a source read and a target write, or a tombstone run) in
/// flight at once while a chain is replayed: like [`COPY_DEPTH`], enough to
/// keep both replicas busy over loopback.
const REPLAY_DEPTH: usize = 16;
/// What a tombstone run writes before it unmaps (see the module docs); one
/// static buffer shared by every such write, never copied.
static ZEROS: [u8; MAX_COPY as usize] = [0; MAX_COPY as usize];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off between attempts to re-add a failed replica.
/// A replica whose host answers but whose port refuses the connection (the
/// process is restarting: the common case) is probed every
/// `REFUSED_RETRY`: a refused connect over loopback or a LAN is one SYN and
/// one RST, nothing worth measuring, and every moment a returning replica
/// waits to be noticed it misses writes it must copy later. A delta rebuild
/// is judged against 5 % of a full one (~70 ms here), so the 20 ms interval
/// this once was cost up to a third of it. A probe that times out (the host
/// is gone or cut off) backs off from `RETRY_MIN`, doubling up to
/// `PROBE_RETRY_MAX`: one connection attempt every 5 s costs nothing worth
/// measuring, and a replica whose network comes back is rebuilt within ~5 s
/// instead of up to 30 s. A replica that answers but fails its rebuild (say,
/// a full disk) backs off up to `RETRY_MAX`: a rebuild attempt is expensive.
/// A port that keeps refusing for `REFUSED_FAST_FOR` is not restarting but
/// down (its process crashed and nobody restarts it): it is then probed
/// every `REFUSED_SLOW_RETRY`, not 200 times a second for hours.
const REFUSED_RETRY: Duration = Duration::from_millis(5);
const REFUSED_FAST_FOR: Duration = Duration::from_secs(10);
const REFUSED_SLOW_RETRY: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(20);
/// How often the watch asks the volume which replicas failed, when no probe
/// is due sooner: a replica that just failed is not back within 20 ms.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);
const PROBE_RETRY_MAX: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the last look at a failed replica found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// It answered: a rebuild was started.
    Answered,
    /// Its host refused the connection: the process is (re)starting.
    Refused,
    /// No answer at all (timeout, unreachable).
    Silent,
}

/// After `probe`, how long to wait before the next one, and the back-off to
/// carry (see [`RETRY_MIN`]); `refusing_for` is how long the replica's port
/// has refused connections without a break.
fn next_probe(probe: Probe, backoff: Duration, refusing_for: Duration) -> (Duration, Duration) {
    match probe {
        Probe::Answered => (backoff, (backoff * 2).min(RETRY_MAX)),
        Probe::Refused if refusing_for < REFUSED_FAST_FOR => (REFUSED_RETRY, backoff),
        Probe::Refused => (REFUSED_SLOW_RETRY, backoff),
        Probe::Silent => {
            let wait = backoff.min(PROBE_RETRY_MAX);
            (wait, (wait * 2).min(PROBE_RETRY_MAX))
        }
    }
}

/// Why a rebuild stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("replica {addr} holds volume {found}, not this volume ({expected}); refusing to overwrite it")]
    OtherVolume {
        addr: String,
        found: String,
        expected: String,
    },
    #[error(
        "replica {addr} is {found} bytes, larger than the volume ({expected} bytes): it belongs to a volume \
         that grew beyond this one, and a volume never shrinks"
    )]
    Size { addr: String, found: u64, expected: u64 },
    #[error(
        "replica {addr} has accepted epoch {found}, newer than ours ({ours}): this controller is fenced"
    )]
    Fenced { addr: String, found: u64, ours: u64 },
    #[error("no read-write replica to rebuild from")]
    NoSource,
    #[error("{what} on replica {addr} failed: {source}")]
    Replica {
        addr: String,
        what: String,
        #[source]
        source: ClientError,
    },
    #[error(
        "the snapshot chain changed during the rebuild: source {source_addr} holds [{source_chain}], \
         target {addr} [{target_chain}]; the rebuild is retried"
    )]
    ChainChanged {
        addr: String,
        source_addr: String,
        source_chain: String,
        target_chain: String,
    },
    #[error("{0}")]
    Volume(String),
}

/// Progress of one rebuild, for `volume info` and metrics.
#[derive(Debug)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub started: Instant,
    /// A delta rebuild (the replica already held most of the data).
    pub delta: AtomicBool,
    /// The source's write-intent record said where to look (no full
    /// checksum comparison).
    pub from_record: AtomicBool,
    /// Where the time went, step by step (see [`Progress::lap`]).
    laps: Mutex<Laps>,
}

/// The steps of one rebuild as they ended: `(name, time since the
/// previous step ended)`, logged with the rebuild's outcome. A delta
/// rebuild is judged against 5 % of a full one, so what matters is which
/// step the time went to (a slow connect, a slow listing, a slow copy or a
/// slow drain look the same from outside).
#[derive(Debug)]
struct Laps {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
            delta: AtomicBool::new(false),
            from_record: AtomicBool::new(false),
            laps: Mutex::new(Laps {
                last: Instant::now(),
                steps: Vec::new(),
            }),
        }
    }

    /// Step `name` has just ended.
    fn lap(&self, name: &'static str) {
        let mut laps = self.laps.lock().expect("rebuild laps");
        let now = Instant::now();
        let took = now - laps.last;
        laps.last = now;
        laps.steps.push((name, took));
    }

    /// The steps so far, as `name=1.2ms` words in order, for a log line.
    fn laps(&self) -> String {
        let laps = self.laps.lock().expect("rebuild laps");
        laps.steps
            .iter()
            .map(|(name, took)| format!("{name}={:.1}ms", took.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        self.done.load(Ordering::Relaxed) as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }
}

/// Rebuilds in progress and replicas removed for good.
#[derive(Default)]
pub struct Rebuilder {
    running: Mutex<HashMap<usize, Arc<Progress>>>,
    removed: Mutex<HashSet<String>>,
    fenced: AtomicBool,
    /// Held shared by every rebuild and exclusively by a snapshot operation
    /// (see the module docs).
    chain: Arc<RwLock<()>>,
}

impl Rebuilder {
    pub fn new() -> Arc<Rebuilder> {
        Arc::new(Rebuilder::default())
    }

    /// Progress of the rebuild of replica `index`, if one is running.
    pub fn progress(&self, index: usize) -> Option<Arc<Progress>> {
        self.running.lock().expect("rebuild table").get(&index).cloned()
    }

    /// Reserve the snapshot chain for a snapshot operation (create, delete,
    /// revert), which holds the guard until it is done. Refused with the
    /// indices of the replicas being rebuilt while any rebuild runs: a
    /// rebuild copies the chain as it is. Waits for another snapshot
    /// operation in progress. While the guard is held, a rebuild that starts
    /// waits before it looks at any chain.
    ///
    /// Cancellation safe: dropping the future gives up the reservation.
    pub async fn reserve_chain(&self) -> Result<OwnedRwLockWriteGuard<()>, Vec<usize>> {
        let mut rebuilding: Vec<usize> = self
            .running
            .lock()
            .expect("rebuild table")
            .keys()
            .copied()
            .collect();
        if !rebuilding.is_empty() {
            rebuilding.sort_unstable();
            return Err(rebuilding);
        }
        Ok(self.chain.clone().write_owned().await)
    }

    /// Never re-add `addr` again (`basalt replica rm`).
    pub fn forget(&self, addr: &str) {
        self.removed
            .lock()
            .expect("rebuild table")
            .insert(addr.to_string());
    }

    pub fn is_forgotten(&self, addr: &str) -> bool {
        self.removed.lock().expect("rebuild table").contains(addr)
    }

    pub fn unforget(&self, addr: &str) {
        self.removed.lock().expect("rebuild table").remove(addr);
    }

    /// Start rebuilding replica `index` at `addr` in the background, unless
    /// a rebuild of it is already running. Returns whether one was started.
    pub fn start(self: &Arc<Self>, volume: &Volume, index: usize, addr: String) -> bool {
        let progress = {
            let mut running = self.running.lock().expect("rebuild table");
            if running.contains_key(&index) {
                return false;
            }
            let p = Arc::new(Progress::new());
            running.insert(index, p.clone());
            p
        };
        let this = self.clone();
        let volume = volume.clone();
        tokio::spawn(async move {
            // Waits for a snapshot operation in progress; none starts until
            // this rebuild is over.
            let chain = this.chain.clone().read_owned().await;
            progress.lap("wait_for_snapshot_ops");
            let started = Instant::now();
            let outcome = match rebuild(&volume, index, &addr, &progress).await {
                Ok(promoted) => {
                    tracing::info!(
                        replica = %addr,
                        bytes = progress.done.load(Ordering::Relaxed),
                        delta = progress.delta.load(Ordering::Relaxed),
                        from_record = progress.from_record.load(Ordering::Relaxed),
                        seconds = started.elapsed().as_secs_f64(),
                        steps = %progress.laps(),
                        "replica RW: rebuild complete"
                    );
                    let rw = Instant::now();
                    promoted.make_durable(&volume, index, &progress).await.map(|()| {
                        tracing::info!(
                            replica = %addr,
                            seconds = started.elapsed().as_secs_f64(),
                            after_rw = rw.elapsed().as_secs_f64(),
                            steps = %progress.laps(),
                            "rebuilt replica flushed: what was copied is durable, flushes numbered like the source's"
                        )
                    })
                }
                Err(e) => Err(e),
            };
            drop(chain);
            match outcome {
                Ok(()) => {}
                Err(RebuildError::Fenced { .. }) => {
                    this.fenced.store(true, Ordering::Relaxed);
                    tracing::error!(replica = %addr, "rebuild stopped: a newer controller owns this volume");
                }
                Err(e) => {
                    tracing::warn!(replica = %addr, error = %e, steps = %progress.laps(), "rebuild failed; will retry");
                    volume.drop_replica(index, format!("rebuild failed: {e}"));
                }
            }
            volume.metrics.rebuild_done.with_label_values(&[&addr]).set(0);
            volume.metrics.rebuild_total.with_label_values(&[&addr]).set(0);
            this.running.lock().expect("rebuild table").remove(&index);
        });
        true
    }

    /// Watch for failed replicas that answer again and rebuild them, with
    /// back-off per replica, until `shutdown`.
    pub async fn watch(self: Arc<Self>, volume: Volume, shutdown: tokio_util::sync::CancellationToken) {
        // Per failed replica: when to probe it next, the back-off to carry, and since when its port
        // has refused connections (if it does).
        let mut next_try: HashMap<String, (Instant, Duration, Option<Instant>)> = HashMap::new();
        let mut wake = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            // The next look: at the latest one interval from now, sooner if
            // a probe is due sooner (only failed replicas have one).
            wake = Instant::now() + WATCH_INTERVAL;
            if self.fenced.load(Ordering::Relaxed) {
                return;
            }
            let Some(status) = volume.status().await else {
                return;
            };
            for (index, r) in status.replicas.iter().enumerate() {
                if r.mode == ReplicaMode::ReadWrite {
                    // Healthy again: its next failure starts a fresh back-off.
                    next_try.remove(&r.address);
                }
                if !matches!(r.mode, ReplicaMode::Error { .. })
                    || self.removed.lock().expect("rebuild table").contains(&r.address)
                    || self.progress(index).is_some()
                {
                    continue;
                }
                let now = Instant::now();
                let (when, backoff, refusing_since) = next_try
                    .get(&r.address)
                    .copied()
                    .unwrap_or((now, RETRY_MIN, None));
                if now < when {
                    wake = wake.min(when);
                    continue;
                }
                // Only start a rebuild once the replica answers: a quick
                // probe, so a dead one costs nothing but the attempt.
                let probe = Handshaken::connect(
                    &r.address,
                    basalt_proto::VolumeId(uuid::Uuid::nil()),
                    basalt_proto::Epoch(0),
                    &volume.spec().secret,
                    Duration::from_secs(1),
                )
                .await;
                let probe = match probe {
                    Ok(_) => {
                        tracing::info!(replica = %r.address, "failed replica answers again; rebuilding it");
                        self.start(&volume, index, r.address.clone());
                        // If this rebuild fails too, the next one waits longer.
                        Probe::Answered
                    }
                    Err(LinkError::Connect { source, .. })
                        if source.kind() == std::io::ErrorKind::ConnectionRefused =>
                    {
                        // The host is up, the replica not yet: cheap to ask again soon.
                        Probe::Refused
                    }
                    Err(_) => Probe::Silent,
                };
                let refusing_since = match probe {
                    Probe::Refused => Some(refusing_since.unwrap_or(now)),
                    _ => None,
                };
                let refusing_for = refusing_since.map_or(Duration::ZERO, |since| now - since);
                let (wait, backoff) = next_probe(probe, backoff, refusing_for);
                let when = Instant::now() + wait;
                wake = wake.min(when);
                next_try.insert(r.address.clone(), (when, backoff, refusing_since));
            }
        }
    }
}

/// Run one rebuild to completion (see the module docs).
async fn rebuild(
    volume: &Volume,
    index: usize,
    addr: &str,
    progress: &Progress,
) -> Result<Promoted, RebuildError> {
    let spec = volume.spec();
    let (epoch, size) = (spec.epoch, volume.size_bytes());
    // The rebuild's own connection to the target first: its Hello raises
    // the epoch, and it holds the writer role (for a chain replay) until
    // the link below takes it over.
    let target = client(addr, spec, true).await?;
    let id = target.identity();
    if id.epoch > epoch {
        return Err(RebuildError::Fenced {
            addr: addr.into(),
            found: id.epoch.0,
            ours: epoch.0,
        });
    }
    if id.volume != spec.volume {
        return Err(RebuildError::OtherVolume {
            addr: addr.into(),
            found: id.volume.to_string(),
            expected: spec.volume.to_string(),
        });
    }
    if id.size_bytes > size {
        return Err(RebuildError::Size {
            addr: addr.into(),
            found: id.size_bytes,
            expected: size,
        });
    }
    if id.size_bytes < size {
        let grow = Message::Resize {
            size_bytes: size,
            check_only: false,
        };
        match ask(&target, addr, "growing it to the volume's size", grow).await? {
            Message::ResizeOk { size_bytes } if size_bytes == size => {
                tracing::info!(replica = %addr, from = id.size_bytes, to = size,
                    "rebuild: the replica missed an expansion; grown before anything is copied");
            }
            other => {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} answered a grow to {size} bytes with {:?}",
                    other.op()
                )))
            }
        }
    }
    progress.lap("connect_target");
    // Its epoch is ours now (Hello raised it): older controllers are fenced
    // out of it before it receives a single write.
    let status = volume
        .status()
        .await
        .ok_or_else(|| RebuildError::Volume("the volume stopped".into()))?;
    let candidates: Vec<String> = status
        .replicas
        .iter()
        .filter(|r| r.mode == ReplicaMode::ReadWrite)
        .map(|r| r.address.clone())
        .collect();
    let volume_blocks = size / BLOCK;
    let (source_addr, source) = choose_source(&candidates, &target, addr, spec, volume_blocks).await?;
    let replicas = Pair {
        source,
        target,
        source_addr: source_addr.clone(),
        addr: addr.to_string(),
    };
    progress.lap("connect_source");

    // The chain first, while no guest write reaches the target (a reset or
    // revert would drop them).
    let replayed = replicas.sync_chain(volume_blocks, volume, progress).await?;
    progress.lap("chain");

    // Step 3. After a replay the target holds what it was sent, not a
    // state of its own that any record could speak of.
    let target_since = if replayed {
        None
    } else {
        Some(
            replicas
                .written_since(&replicas.target, &replicas.addr, None, volume_blocks)
                .await?,
        )
    };
    progress.lap("target_record");
    replicas.leave_numbering().await?;
    progress.lap("leave_numbering");

    // The link takes the target's writer role over from the replay.
    let conn = Handshaken::connect_writer(addr, spec.volume, epoch, &spec.secret, CONNECT_TIMEOUT).await?;
    progress.lap("connect_link");

    volume
        .attach(index, conn)
        .await
        .map_err(|e| RebuildError::Volume(e.to_string()))?;
    progress.lap("attach");
    tracing::info!(replica = %addr, "replica WO: rebuild started");

    // Listed after the attach *and a settle*: a write sent before the attach
    // may still be queued at the source (the listings travel on other
    // connections, unordered with the data path), and the target never gets
    // it; once every such write is answered it is applied and listed (the
    // record and the checksums include unflushed writes, so no flush is
    // needed). Anything sent after the attach reaches the target directly.
    volume
        .settle()
        .await
        .map_err(|e| RebuildError::Volume(e.to_string()))?;
    progress.lap("settle");
    // An expansion since the start reached the target (it is attached, and
    // the attach refuses a target smaller than the volume): list up to the
    // end the volume has now.
    let volume_blocks = volume.size_bytes() / BLOCK;
    // Step 5: where to compare.
    let regions = match target_since {
        Some((position, WrittenAnswer::Regions(own))) => {
            match replicas
                .written_since(&replicas.source, &source_addr, Some(position), volume_blocks)
                .await?
            {
                (_, WrittenAnswer::Regions(theirs)) => {
                    let runs = union_runs(&theirs, &own);
                    tracing::info!(
                        replica = %addr, source = %source_addr, since = position.revision.0,
                        regions = runs.len(), blocks = runs.iter().map(|r| r.blocks).sum::<u64>(),
                        "rebuild: the source's write-intent record names the regions to compare"
                    );
                    Some(runs)
                }
                (_, WrittenAnswer::Unknown(why)) => {
                    tracing::info!(replica = %addr, source = %source_addr, reason = %why,
                        "rebuild: no usable write-intent record; comparing the checksums of the whole volume");
                    None
                }
            }
        }
        Some((_, WrittenAnswer::Unknown(why))) => {
            tracing::info!(replica = %addr, reason = %why,
                "rebuild: the target cannot say what it holds unflushed; comparing the checksums of the whole volume");
            None
        }
        None => None,
    };
    progress.lap("source_record");
    progress.from_record.store(regions.is_some(), Ordering::Relaxed);
    let compared = regions.unwrap_or_else(|| {
        vec![BlockRun {
            lba: 0,
            blocks: volume_blocks,
        }]
    });
    // Both listings at once: they are independent, and each is only a few
    // requests (see `crcs_in`).
    let (source, target) = tokio::try_join!(
        crcs_in(&replicas.source, &source_addr, &compared),
        crcs_in(&replicas.target, addr, &compared),
    )?;
    progress.lap("checksums");
    // After a replay the target holds what it was sent, not what it had.
    if !replayed {
        progress.delta.store(
            progress.from_record.load(Ordering::Relaxed) || !target.is_empty(),
            Ordering::Relaxed,
        );
    }
    let runs = runs_to_copy(&source, &target);
    let bytes: u64 = runs.iter().map(|(_, len)| *len as u64).sum();
    let total = progress.total.fetch_add(bytes, Ordering::Relaxed) + bytes;
    volume
        .metrics
        .rebuild_total
        .with_label_values(&[addr])
        .set(total as i64);
    tracing::info!(
        replica = %addr, source = %source_addr, bytes,
        source_blocks = source.len(), target_blocks = target.len(), "rebuild: copying what differs"
    );

    let copies_to_make = copies_of(&runs);
    let mut pacer = CopyPacer::new(volume, &copies_to_make);
    let mut pending = copies_to_make.into_iter().peekable();
    let mut copies = futures::stream::FuturesUnordered::new();
    let mut writeback = TargetWriteback::default();
    loop {
        let mut held = None;
        while copies.len() < pacer.depth() && pending.peek().is_some() {
            held = pacer.held_until();
            if held.is_some() {
                break;
            }
            let Some(extents) = pending.next() else {
                break;
            };
            let len = copy_len(&extents);
            pacer.spend(len);
            copies.push(async move { volume.copy(index, extents).await.map(|_| len) });
        }
        let done = match held {
            // Only the busy guest's share holds the next copy back: take
            // what completes meanwhile, and look again when it is due.
            Some(until) => tokio::select! {
                done = copies.next(), if !copies.is_empty() => done,
                () = tokio::time::sleep_until(until.into()) => continue,
            },
            None => copies.next().await,
        };
        let Some(done) = done else {
            break;
        };
        let len = done.map_err(|e| RebuildError::Volume(e.to_string()))?;
        let d = progress.done.fetch_add(len, Ordering::Relaxed) + len;
        volume
            .metrics
            .rebuild_done
            .with_label_values(&[addr])
            .set(d as i64);
        writeback.copied(len, &replicas).await?;
    }
    writeback.finish(&replicas).await?;
    progress.lap("copy");
    replicas.check_same_chain().await?;
    progress.lap("check_chain");
    // Step 8: it holds everything the sources hold, so it serves reads and
    // counts as a replica from here on. What it was sent is not yet durable
    // on it, and needs not be: every flush a guest is acknowledged from now
    // on reaches it too and covers it, and every flush acknowledged before
    // is durable on the sources, which the promotion takes nothing from.
    volume.promote(index);
    let source_index = status.replicas.iter().position(|r| r.address == source_addr);
    Ok(Promoted {
        replicas,
        source_index,
        epoch,
        volume_blocks,
    })
}

/// A rebuilt replica that was just promoted to RW: what step 9 needs.
struct Promoted {
    replicas: Pair,
    source_index: Option<usize>,
    epoch: basalt_proto::Epoch,
    volume_blocks: u64,
}

impl Promoted {
    /// Step 9: one flush of every replica (a drain, allowed while degraded,
    /// unlike a guest flush) makes what was copied durable, and at that one
    /// flush, at one place in every replica's stream, the target takes on
    /// the source's flush numbering. Until then the target is RW but off the
    /// numbering: a controller taking over meanwhile finds it stale and
    /// rebuilds it, and no rebuild takes it as a source that can say what
    /// another replica missed. It runs after the promotion, not before:
    /// writing back a delta's scattered blocks is the disk's slowest work
    /// (2,610 random 4 KiB blocks: ~50 ms on the disk we measure on, as much
    /// as the whole rest of the rebuild), and nothing about the data the
    /// guest sees or the durability of what it flushed waits for it.
    async fn make_durable(
        &self,
        volume: &Volume,
        index: usize,
        progress: &Progress,
    ) -> Result<(), RebuildError> {
        let (replicas, addr) = (&self.replicas, &self.replicas.addr);
        let drained = volume
            .drain_revisions()
            .await
            .map_err(|e| RebuildError::Volume(e.to_string()))?;
        progress.lap("final_drain");
        let revision_of = |i: Option<usize>| {
            drained
                .iter()
                .find(|(c, _)| Some(*c) == i)
                .and_then(|(_, r)| r.as_ref().ok())
                .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
                .map(|b| basalt_proto::Revision(u64::from_le_bytes(b)))
        };
        match drained.iter().find(|(c, _)| *c == index) {
            Some((_, Err(e))) => {
                return Err(RebuildError::Volume(format!(
                    "the drain flush failed on {addr}: {e}"
                )))
            }
            None => {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} left the volume before what was copied to it was flushed"
                )))
            }
            Some(_) => {}
        }
        match (revision_of(self.source_index), revision_of(Some(index))) {
            (Some(at_source), Some(at_target)) => {
                let (lineage_of_source, _) = replicas
                    .written_since(&replicas.source, &replicas.source_addr, None, self.volume_blocks)
                    .await?;
                let point = SyncPoint {
                    lineage: lineage_of_source.lineage,
                    revision: at_source,
                    epoch: self.epoch,
                };
                replicas.adopt(point, at_target).await?;
            }
            _ => tracing::warn!(replica = %addr, source = %replicas.source_addr,
                "the drain did not report both revisions; the replica stays off the shared flush numbering"),
        }
        progress.lap("adopt_numbering");
        Ok(())
    }
}

/// Step 1b: the source. Every read-write replica holds the same data, but
/// not every one can say what the target missed: one that was itself just
/// rebuilt keeps no record from before its rebuild. So the first read-write
/// replica whose write-intent record answers for the target's position is
/// taken (one question each, no listing), and the first of all when none
/// does or the target cannot say where it stands -- the whole volume is
/// compared then, whichever the source. The source's connection only reads:
/// the volume's link to it keeps the writer role.
async fn choose_source(
    candidates: &[String],
    target: &ReplicaClient,
    addr: &str,
    spec: &VolumeSpec,
    volume_blocks: u64,
) -> Result<(String, ReplicaClient), RebuildError> {
    let first = candidates.first().ok_or(RebuildError::NoSource)?;
    let first_client = client(first, spec, false).await?;
    let (position, own) = record_verdict(target, addr, None, volume_blocks).await?;
    if own.is_some() {
        return Ok((first.clone(), first_client));
    }
    let mut why_not = Vec::new();
    let mut first_client = Some(first_client);
    for (i, candidate) in candidates.iter().enumerate() {
        let connected = match (i, first_client.take()) {
            (0, Some(c)) => Ok(c),
            (_, kept) => {
                first_client = kept;
                client(candidate, spec, false).await
            }
        };
        let c = match connected {
            Ok(c) => c,
            Err(e) => {
                why_not.push(format!("{candidate}: {e}"));
                continue;
            }
        };
        match record_verdict(&c, candidate, Some(position), volume_blocks).await {
            Ok((_, None)) => {
                if i > 0 {
                    tracing::info!(replica = %addr, source = %candidate, passed_over = %why_not.join("; "),
                        "rebuild: taking the first read-write replica whose write-intent record answers");
                }
                return Ok((candidate.clone(), c));
            }
            Ok((_, Some(why))) => why_not.push(format!("{candidate}: {why}")),
            Err(e) => why_not.push(format!("{candidate}: {e}")),
        }
        if i == 0 {
            first_client = Some(c);
        }
    }
    let source = match first_client {
        Some(c) => c,
        None => client(first, spec, false).await?,
    };
    tracing::info!(replica = %addr, source = %first, records = %why_not.join("; "),
        "rebuild: no read-write replica's write-intent record answers for this replica");
    Ok((first.clone(), source))
}

/// A replica's sync point, and whether its write-intent record can answer
/// for `since` (`None`: for its own last flush): `None` if it can, or why
/// not. One question, no listing (it is asked from past the last block).
async fn record_verdict(
    client: &ReplicaClient,
    addr: &str,
    since: Option<SyncPoint>,
    volume_blocks: u64,
) -> Result<(SyncPoint, Option<String>), RebuildError> {
    let question = Message::WrittenSince {
        since,
        start_lba: volume_blocks,
    };
    match ask(client, addr, "asking its write-intent record", question).await? {
        Message::WrittenSinceOk { position, answer, .. } => Ok((
            position,
            match answer {
                WrittenAnswer::Regions(_) => None,
                WrittenAnswer::Unknown(why) => Some(why),
            },
        )),
        other => Err(RebuildError::Volume(format!(
            "replica {addr} answered a write-intent question with {:?}",
            other.op()
        ))),
    }
}

/// [`ReplicaClient::call`] bounded by [`REQUEST_TIMEOUT`], for every request
/// of a rebuild: a replica that stops answering (SIGSTOP, a hung disk) fails
/// the rebuild, which is retried, instead of hanging it. The connection is
/// dropped with the failed rebuild, so a late answer lands nowhere.
async fn call_bounded(client: &ReplicaClient, message: Message) -> Result<Message, ClientError> {
    call_within(client, message, REQUEST_TIMEOUT).await
}

async fn call_within(
    client: &ReplicaClient,
    message: Message,
    limit: Duration,
) -> Result<Message, ClientError> {
    tokio::time::timeout(limit, client.call(message))
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Disconnected {
                reason: format!("no answer within {limit:?}"),
            })
        })
}

/// One request on a rebuild connection, bounded by [`REQUEST_TIMEOUT`]: a
/// replica that stops answering (SIGSTOP, a hung disk) fails the rebuild,
/// which is retried, instead of hanging it. `what` names the request in the
/// error.
async fn ask(
    client: &ReplicaClient,
    addr: &str,
    what: &str,
    message: Message,
) -> Result<Message, RebuildError> {
    call_bounded(client, message)
        .await
        .map_err(|source| RebuildError::Replica {
            addr: addr.to_string(),
            what: what.to_string(),
            source,
        })
}

/// Flushes of the target while the copy goes on, one every
/// [`TARGET_FLUSH_BYTES`] copied, each running while the next bytes are
/// copied. Durability is the final drain's business; these only keep the
/// target's unwritten page cache small. Without them a full rebuild left
/// ~1 GiB dirty on the target, and the drain's flush wrote it back in one
/// go (800 ms): every guest write waits for the write-only target too, and
/// the target's writes queue behind that writeback, so the guest stalled
/// for 437 ms just before the replica turned RW.
///
/// The flushes travel on the rebuild's own connection to the target, not
/// through the volume: the target is off any shared flush numbering from
/// step 3 until the final drain, so flushes of its own number nothing anyone
/// relies on, and each is awaited before that drain.
#[derive(Default)]
struct TargetWriteback {
    since_flush: u64,
    flushing: Option<tokio::task::JoinHandle<Result<basalt_proto::Revision, ClientError>>>,
}

impl TargetWriteback {
    /// `bytes` more were copied; starts a flush once enough have been since
    /// the last one (after waiting for that one, so one runs at a time).
    async fn copied(&mut self, bytes: u64, replicas: &Pair) -> Result<(), RebuildError> {
        self.since_flush += bytes;
        if self.since_flush < TARGET_FLUSH_BYTES {
            return Ok(());
        }
        self.finish(replicas).await?;
        self.since_flush = 0;
        self.flushing = Some(tokio::spawn(replicas.target.flush()));
        Ok(())
    }

    /// Waits for the flush in progress, if any.
    async fn finish(&mut self, replicas: &Pair) -> Result<(), RebuildError> {
        let Some(flushing) = self.flushing.take() else {
            return Ok(());
        };
        match flushing.await {
            Ok(flushed) => flushed
                .map(drop)
                .map_err(replicas.on_target("flushing what was copied so far")),
            Err(e) => Err(RebuildError::Volume(format!(
                "the flush of {} during its copy did not finish: {e}",
                replicas.addr
            ))),
        }
    }
}

/// A pipelined connection for the chain replay (many requests in flight,
/// replies matched by id), at the volume's epoch; with `writer` it takes the
/// replica's writer role.
async fn client(addr: &str, spec: &VolumeSpec, writer: bool) -> Result<ReplicaClient, RebuildError> {
    let resolved = tokio::net::lookup_host(addr)
        .await
        .and_then(|mut a| {
            a.next()
                .ok_or_else(|| std::io::Error::other("the name resolves to no address"))
        })
        .map_err(|source| LinkError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let connect = ReplicaClient::connect_as(resolved, spec.volume, spec.epoch, writer, &spec.secret);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(RebuildError::Replica {
            addr: addr.to_string(),
            what: "connecting for the rebuild".into(),
            source,
        }),
        Err(_) => Err(LinkError::Timeout {
            addr: addr.to_string(),
            timeout: CONNECT_TIMEOUT,
        }
        .into()),
    }
}

/// A run of adjacent blocks of one layer, all data or all tombstones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LayerRun {
    lba: u64,
    blocks: u64,
    tombstones: bool,
}

impl LayerRun {
    fn offset(&self) -> u64 {
        self.lba * BLOCK
    }

    fn len(&self) -> u64 {
        self.blocks * BLOCK
    }
}

/// Coalesces a layer's blocks (in block order) into runs of one kind of at
/// most [`MAX_COPY`] bytes.
fn layer_runs(blocks: &[LayerBlock]) -> Vec<LayerRun> {
    let mut runs: Vec<LayerRun> = Vec::new();
    for b in blocks {
        let tombstones = b.state == LayerBlockState::Tombstone;
        match runs.last_mut() {
            Some(r) if r.lba + r.blocks == b.lba && r.tombstones == tombstones && r.len() < MAX_COPY => {
                r.blocks += 1
            }
            _ => runs.push(LayerRun {
                lba: b.lba,
                blocks: 1,
                tombstones,
            }),
        }
    }
    runs
}

/// The names of a chain, oldest first, for messages.
fn names(chain: &[pb::SnapshotInfo]) -> String {
    chain
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The source and the target of a rebuild, on their replay connections.
struct Pair {
    source: ReplicaClient,
    target: ReplicaClient,
    source_addr: String,
    addr: String,
}

impl Pair {
    fn on_source(&self, what: impl Into<String>) -> impl FnOnce(ClientError) -> RebuildError {
        let (addr, what) = (self.source_addr.clone(), what.into());
        move |source| RebuildError::Replica { addr, what, source }
    }

    fn on_target(&self, what: impl Into<String>) -> impl FnOnce(ClientError) -> RebuildError {
        let (addr, what) = (self.addr.clone(), what.into());
        move |source| RebuildError::Replica { addr, what, source }
    }

    async fn chain(client: &ReplicaClient, addr: &str) -> Result<Vec<pb::SnapshotInfo>, RebuildError> {
        match call_bounded(client, Message::SnapshotList).await {
            Ok(Message::SnapshotListOk(chain)) => Ok(chain),
            Ok(other) => Err(RebuildError::Volume(format!(
                "replica {addr} answered a snapshot list with {:?}",
                other.op()
            ))),
            Err(source) => Err(RebuildError::Replica {
                addr: addr.to_string(),
                what: "listing snapshots".into(),
                source,
            }),
        }
    }

    /// Step 2 of the module docs: make the target's chain the source's.
    /// Returns whether snapshots were replayed (the chains differed).
    async fn sync_chain(
        &self,
        volume_blocks: u64,
        volume: &Volume,
        progress: &Progress,
    ) -> Result<bool, RebuildError> {
        let source = Self::chain(&self.source, &self.source_addr).await?;
        let target = Self::chain(&self.target, &self.addr).await?;
        let common = source
            .iter()
            .zip(&target)
            .take_while(|(s, t)| s.name == t.name)
            .count();
        if common == source.len() && common == target.len() {
            tracing::info!(replica = %self.addr, snapshots = common, "rebuild: the snapshot chain matches the source's");
            return Ok(false);
        }
        let replay = &source[common..];
        let bytes: u64 = replay.iter().map(|s| s.allocated_bytes).sum();
        progress.total.fetch_add(bytes, Ordering::Relaxed);
        volume
            .metrics
            .rebuild_total
            .with_label_values(&[&self.addr])
            .set(progress.total.load(Ordering::Relaxed) as i64);
        progress.delta.store(common > 0, Ordering::Relaxed);
        tracing::info!(
            replica = %self.addr, source = %self.source_addr,
            source_chain = %names(&source), target_chain = %names(&target),
            kept = common, replayed = replay.len(), bytes,
            "rebuild: replaying the source's snapshot chain"
        );
        let request = match common.checked_sub(1).map(|i| &source[i].name) {
            None => Message::Reset,
            Some(name) => Message::SnapshotRevert { name: name.clone() },
        };
        let what = format!("dropping the snapshots that differ ({:?})", request.op().0);
        match call_bounded(&self.target, request)
            .await
            .map_err(self.on_target(what))?
        {
            Message::ResetOk | Message::SnapshotRevertOk => {}
            other => {
                return Err(RebuildError::Volume(format!(
                    "replica {} answered a reset with {:?}",
                    self.addr,
                    other.op()
                )))
            }
        }
        for snapshot in replay {
            self.replay_layer(&snapshot.name, volume_blocks, volume, progress)
                .await?;
            call_bounded(
                &self.target,
                Message::SnapshotCreate {
                    name: snapshot.name.clone(),
                },
            )
            .await
            .map_err(self.on_target(format!("creating snapshot {:?}", snapshot.name)))?;
            tracing::info!(replica = %self.addr, snapshot = %snapshot.name, "rebuild: snapshot replayed");
        }
        Ok(true)
    }

    /// Copies the blocks snapshot `name` holds itself from the source onto
    /// the target's head, page by page, [`REPLAY_DEPTH`] runs in flight.
    async fn replay_layer(
        &self,
        name: &str,
        volume_blocks: u64,
        volume: &Volume,
        progress: &Progress,
    ) -> Result<(), RebuildError> {
        let mut start = 0;
        while start < volume_blocks {
            let listing = call_bounded(
                &self.source,
                Message::LayerBlocks {
                    snapshot: name.to_string(),
                    start_lba: start,
                    count: volume_blocks - start,
                },
            )
            .await
            .map_err(self.on_source(format!("listing the blocks of snapshot {name:?}")))?;
            let Message::LayerBlocksOk { blocks, end_lba } = listing else {
                return Err(RebuildError::Volume(format!(
                    "replica {} answered a layer listing with {:?}",
                    self.source_addr,
                    listing.op()
                )));
            };
            if end_lba <= start || blocks.iter().any(|b| b.lba < start || b.lba >= end_lba) {
                return Err(RebuildError::Volume(format!(
                    "replica {} listed snapshot {name:?} from block {start} inconsistently (up to {end_lba})",
                    self.source_addr
                )));
            }
            stream::iter(layer_runs(&blocks))
                .map(|run| self.replay_run(name, run))
                .buffer_unordered(REPLAY_DEPTH)
                .try_for_each(|bytes| {
                    let done = progress.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    volume
                        .metrics
                        .rebuild_done
                        .with_label_values(&[&self.addr])
                        .set(done as i64);
                    futures::future::ready(Ok(()))
                })
                .await?;
            start = end_lba;
        }
        Ok(())
    }

    /// Copies one run; returns the bytes of data it copied.
    async fn replay_run(&self, name: &str, run: LayerRun) -> Result<u64, RebuildError> {
        let (offset, len) = (run.offset(), run.len());
        if run.tombstones {
            // Both are queued now, in this order, on one connection: the
            // replica applies the unmap after the zeros.
            let zeros = self
                .target
                .write(offset, Bytes::from_static(&ZEROS[..len as usize]), false);
            let unmap = self.target.unmap(offset, len);
            zeros
                .await
                .map_err(self.on_target(format!("writing zeros under tombstones at byte {offset}")))?;
            unmap
                .await
                .map_err(self.on_target(format!("replaying tombstones at byte {offset}")))?;
            return Ok(0);
        }
        let read = call_bounded(
            &self.source,
            Message::ReadLayer {
                snapshot: name.to_string(),
                offset,
                len: len as u32,
            },
        )
        .await
        .map_err(self.on_source(format!("reading {len} bytes at {offset} of snapshot {name:?}")))?;
        let data = match read {
            Message::ReadLayerOk { data } if data.len() as u64 == len => data,
            other => {
                return Err(RebuildError::Volume(format!(
                    "replica {} answered a layer read of {len} bytes with {:?}",
                    self.source_addr,
                    other.op()
                )))
            }
        };
        self.target
            .write(offset, data, false)
            .await
            .map_err(self.on_target(format!("writing {len} bytes at {offset} of snapshot {name:?}")))?;
        Ok(len)
    }

    /// A replica's sync point and its write-intent answer since `since`
    /// (`None`: since its own last durable flush), every page of it. With
    /// `start` past the end, the position alone.
    async fn written_since(
        &self,
        client: &ReplicaClient,
        addr: &str,
        since: Option<SyncPoint>,
        volume_blocks: u64,
    ) -> Result<(SyncPoint, WrittenAnswer), RebuildError> {
        let mut runs = Vec::new();
        let mut start = 0;
        loop {
            let reply = call_bounded(
                client,
                Message::WrittenSince {
                    since,
                    start_lba: start,
                },
            )
            .await
            .map_err(|source| RebuildError::Replica {
                addr: addr.to_string(),
                what: "asking its write-intent record".into(),
                source,
            })?;
            let Message::WrittenSinceOk {
                position,
                answer,
                end_lba,
            } = reply
            else {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} answered a write-intent question with {:?}",
                    reply.op()
                )));
            };
            match answer {
                WrittenAnswer::Unknown(why) => return Ok((position, WrittenAnswer::Unknown(why))),
                WrittenAnswer::Regions(page) => runs.extend(page),
            }
            if end_lba >= volume_blocks {
                return Ok((position, WrittenAnswer::Regions(runs)));
            }
            if end_lba <= start {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} listed its write-intent record from block {start} without progress"
                )));
            }
            start = end_lba;
        }
    }

    /// Step 3: the target leaves any shared flush numbering, durably, before
    /// anything is copied onto it: should the rebuild stop half-way, no
    /// record would take it for a replica in sync at its revision.
    async fn leave_numbering(&self) -> Result<(), RebuildError> {
        call_bounded(
            &self.target,
            Message::AdoptSyncPoint {
                point: None,
                own_revision: basalt_proto::Revision(0),
            },
        )
        .await
        .map_err(self.on_target("leaving the shared flush numbering"))
        .map(drop)
    }

    /// Step 9: the target's flush `own` is the source's `point`.
    async fn adopt(&self, point: SyncPoint, own: basalt_proto::Revision) -> Result<(), RebuildError> {
        match call_bounded(
            &self.target,
            Message::AdoptSyncPoint {
                point: Some(point),
                own_revision: own,
            },
        )
        .await
        .map_err(self.on_target("adopting the source's flush numbering"))?
        {
            Message::AdoptSyncPointOk { position } => {
                tracing::info!(replica = %self.addr, source = %self.source_addr, revision = position.revision.0,
                    was = own.0, "rebuild: the replica now numbers flushes like the source");
                Ok(())
            }
            other => Err(RebuildError::Volume(format!(
                "replica {} answered a renumbering with {:?}",
                self.addr,
                other.op()
            ))),
        }
    }

    /// Step 9: the target holds the source's chain, names in order.
    async fn check_same_chain(&self) -> Result<(), RebuildError> {
        let source = Self::chain(&self.source, &self.source_addr).await?;
        let target = Self::chain(&self.target, &self.addr).await?;
        let shape = |c: &[pb::SnapshotInfo]| c.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        if shape(&source) != shape(&target) {
            return Err(RebuildError::ChainChanged {
                addr: self.addr.clone(),
                source_addr: self.source_addr.clone(),
                source_chain: names(&source),
                target_chain: names(&target),
            });
        }
        Ok(())
    }
}

/// The runs of both lists (each in block order), coalesced.
fn union_runs(a: &[BlockRun], b: &[BlockRun]) -> Vec<BlockRun> {
    let mut all: Vec<BlockRun> = a.iter().chain(b).copied().filter(|r| r.blocks > 0).collect();
    all.sort_unstable_by_key(|r| r.lba);
    let mut out: Vec<BlockRun> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.lba <= last.lba + last.blocks => {
                last.blocks = last.blocks.max(r.lba + r.blocks - last.lba)
            }
            _ => out.push(r),
        }
    }
    out
}

/// The CRC32 of every allocated block in `runs` (in block order), in as few
/// requests as the protocol allows: [`MAX_CRC_RUNS`] runs per request, all
/// of them in flight at once (a record names at most 2^20 regions, so that
/// is at most 16 requests). A rebuild guided by a write-intent record names
/// thousands of small regions; listing them one request each cost thousands
/// of round trips through the replica's ordered lane, which made the
/// listing slower than the copy it decides.
async fn crcs_in(
    client: &ReplicaClient,
    addr: &str,
    runs: &[BlockRun],
) -> Result<Vec<BlockCrc>, RebuildError> {
    let pages = futures::future::try_join_all(
        runs.chunks(MAX_CRC_RUNS)
            .map(|chunk| list_runs(client, addr, chunk)),
    )
    .await?;
    Ok(pages.into_iter().flatten().collect())
}

/// One `RunCrcs` listing of `runs`, continued from where the replica cut its
/// answer short until it covers every run (each request bounded, see [`ask`]).
async fn list_runs(
    client: &ReplicaClient,
    addr: &str,
    runs: &[BlockRun],
) -> Result<Vec<BlockCrc>, RebuildError> {
    let mut all = Vec::new();
    let mut rest = runs.to_vec();
    while let (Some(first), Some(last)) = (rest.first().copied(), rest.last().copied()) {
        let question = Message::RunCrcs { runs: rest.clone() };
        let reply = ask(client, addr, "listing block checksums", question).await?;
        let Message::RunCrcsOk { crcs, end_lba } = reply else {
            return Err(RebuildError::Volume(format!(
                "replica {addr} answered a checksum listing with {:?}",
                reply.op()
            )));
        };
        let in_order = crcs.windows(2).all(|w| w[0].lba < w[1].lba);
        let inside = crcs.iter().all(|c| c.lba >= first.lba && c.lba < end_lba);
        if end_lba <= first.lba || !in_order || !inside {
            return Err(RebuildError::Volume(format!(
                "replica {addr} listed the checksums of blocks {}.. inconsistently (up to {end_lba})",
                first.lba
            )));
        }
        all.extend(crcs);
        if end_lba >= last.lba + last.blocks {
            break;
        }
        rest = rest
            .into_iter()
            .filter(|r| r.lba + r.blocks > end_lba)
            .map(|r| {
                let lba = r.lba.max(end_lba);
                BlockRun {
                    lba,
                    blocks: r.lba + r.blocks - lba,
                }
            })
            .collect();
    }
    Ok(all)
}

/// Copies in flight for copies of `average` bytes with `budget` bytes in
/// flight: at least one, at most [`COPY_DEPTH`].
fn copy_depth(average: u64, budget: u64) -> usize {
    let depth = budget / average.max(BLOCK);
    usize::try_from(depth).unwrap_or(usize::MAX).clamp(1, COPY_DEPTH)
}

/// How fast the copy may go, from how busy the guest is.
///
/// Idle, the copy runs as fast as the replicas take it: [`COPY_DEPTH`]
/// copies of [`MAX_COPY`] bytes' worth in flight. While the guest does I/O
/// the copy yields: at most [`BUSY_COPY_BYTES`] in flight and
/// [`BUSY_COPY_RATE`] bytes a second. On a small machine the copy and the
/// guest share the same cores (controller, replicas, loopback): at full
/// speed (~700 MB/s) the copy left the guest 2k of its 12k write IOPS, and
/// two copies in flight alone still ~560 MB/s and 4k, against a goal of
/// half. The rebuild under load has a 15 s goal for 1 GiB and took under
/// 3 s, so there is time to give back. The guest's rate is read from the
/// volume's own I/O counters every [`PACE_INTERVAL`].
struct CopyPacer<'a> {
    volume: &'a Volume,
    idle_depth: usize,
    busy_depth: usize,
    busy: bool,
    last: (Instant, u64),
    /// While busy: when the bytes started so far are paid for at [`BUSY_COPY_RATE`].
    next_at: Instant,
}

impl<'a> CopyPacer<'a> {
    fn new(volume: &'a Volume, copies: &[Vec<Extent>]) -> CopyPacer<'a> {
        let bytes: u64 = copies.iter().map(|c| copy_len(c)).sum();
        let average = bytes / (copies.len() as u64).max(1);
        let mut pacer = CopyPacer {
            volume,
            idle_depth: copy_depth(average, COPY_DEPTH as u64 * MAX_COPY),
            busy_depth: copy_depth(average, BUSY_COPY_BYTES),
            busy: false,
            last: (Instant::now(), 0),
            next_at: Instant::now(),
        };
        pacer.last.1 = pacer.guest_ops();
        pacer
    }

    fn guest_ops(&self) -> u64 {
        let m = &self.volume.metrics;
        m.counter(&m.ops, "write") + m.counter(&m.ops, "read")
    }

    /// Copies allowed in flight now.
    fn depth(&mut self) -> usize {
        let now = Instant::now();
        let elapsed = now - self.last.0;
        if elapsed >= PACE_INTERVAL {
            let ops = self.guest_ops();
            let rate = (ops - self.last.1.min(ops)) as f64 / elapsed.as_secs_f64();
            self.busy = rate >= BUSY_GUEST_IOPS;
            self.last = (now, ops);
        }
        if self.busy {
            self.busy_depth
        } else {
            self.idle_depth
        }
    }

    /// When the next copy may start, if the guest is busy and the copies
    /// started so far have used up its share until then.
    fn held_until(&self) -> Option<Instant> {
        (self.busy && self.next_at > Instant::now()).then_some(self.next_at)
    }

    /// A copy of `bytes` starts now.
    fn spend(&mut self, bytes: u64) {
        if self.busy {
            let cost = Duration::from_secs_f64(bytes as f64 / BUSY_COPY_RATE as f64);
            self.next_at = self.next_at.max(Instant::now()) + cost;
        }
    }
}

/// The runs to copy, gathered into copies: runs in block order, up to
/// [`COPY_EXTENTS`] of them and [`MAX_COPY`] bytes per copy (a run of
/// [`MAX_COPY`] bytes is a copy of its own). Each copy is then one vectored
/// read of the source and one vectored write of the target, however
/// scattered its runs.
fn copies_of(runs: &[(u64, u32)]) -> Vec<Vec<Extent>> {
    let mut copies: Vec<Vec<Extent>> = Vec::new();
    let mut bytes = 0;
    for &(offset, len) in runs {
        let extent = Extent { offset, len };
        match copies.last_mut() {
            Some(copy) if copy.len() < COPY_EXTENTS && bytes + u64::from(len) <= MAX_COPY => {
                copy.push(extent);
                bytes += u64::from(len);
            }
            _ => {
                copies.push(vec![extent]);
                bytes = u64::from(len);
            }
        }
    }
    copies
}

/// The bytes one copy moves.
fn copy_len(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| u64::from(e.len)).sum()
}

/// The byte ranges to copy from source to target: blocks the source holds
/// with another checksum than the target's (or that the target lacks), and
/// blocks only the target holds (the copy brings the source's zeros).
/// Adjacent blocks coalesce into runs of at most [`MAX_COPY`].
fn runs_to_copy(source: &[BlockCrc], target: &[BlockCrc]) -> Vec<(u64, u32)> {
    let mut lbas = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < source.len() || j < target.len() {
        match (source.get(i), target.get(j)) {
            (Some(s), Some(t)) if s.lba == t.lba => {
                if s.crc != t.crc {
                    lbas.push(s.lba);
                }
                i += 1;
                j += 1;
            }
            (Some(s), Some(t)) if s.lba < t.lba => {
                lbas.push(s.lba);
                i += 1;
            }
            (Some(_), Some(t)) => {
                lbas.push(t.lba);
                j += 1;
            }
            (Some(s), None) => {
                lbas.push(s.lba);
                i += 1;
            }
            (None, Some(t)) => {
                lbas.push(t.lba);
                j += 1;
            }
            (None, None) => break,
        }
    }
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for lba in lbas {
        match runs.last_mut() {
            Some((off, len)) if *off + *len as u64 == lba * BLOCK && (*len as u64) < MAX_COPY => {
                *len += BLOCK as u32
            }
            _ => runs.push((lba * BLOCK, BLOCK as u32)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crcs(list: &[(u64, u32)]) -> Vec<BlockCrc> {
        list.iter().map(|&(lba, crc)| BlockCrc { lba, crc }).collect()
    }

    /// A replica that says Hello and then never answers (SIGSTOP, a hung disk) fails the request
    /// within its bound instead of hanging the rebuild.
    #[tokio::test]
    async fn a_replica_that_stops_answering_fails_the_request_within_its_bound() {
        use basalt_proto::auth::{Challenge, Nonce, Prover, VolumeSecret};
        use basalt_proto::frame::{Frame, FrameCodec, ProtocolVersion, ReplicaIdentity};
        use futures::{SinkExt, StreamExt};
        let test_secret = || VolumeSecret::new("rebuild-test-secret-0123").unwrap();
        use tokio_util::codec::Framed;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut frames = Framed::new(stream, FrameCodec);
            let hello = frames.next().await.unwrap().unwrap();
            let Message::Hello { nonce, .. } = hello.message else {
                panic!("expected Hello");
            };
            let volume = basalt_proto::VolumeId::random();
            let challenge = Challenge {
                volume,
                client: nonce,
                replica: Nonce::random(),
            };
            let ok = Message::HelloOk {
                version: ProtocolVersion::CURRENT,
                volume,
                nonce: challenge.replica,
                proof: challenge.prove(&test_secret(), Prover::Replica),
            };
            frames.send(Frame::new(hello.id, hello.epoch, ok)).await.unwrap();
            let auth = frames.next().await.unwrap().unwrap();
            let ok = Message::AuthOk {
                replica: ReplicaIdentity {
                    volume,
                    size_bytes: 1 << 20,
                    epoch: auth.epoch,
                    revision: basalt_proto::Revision(0),
                },
                membership: None,
            };
            frames.send(Frame::new(auth.id, auth.epoch, ok)).await.unwrap();
            // Read what comes and never answer.
            while frames.next().await.is_some() {}
        });
        let client = ReplicaClient::connect_as(
            addr,
            basalt_proto::VolumeId(uuid::Uuid::nil()),
            basalt_proto::Epoch(1),
            false,
            &test_secret(),
        )
        .await
        .expect("the handshake is answered");
        let started = Instant::now();
        let limit = Duration::from_millis(200);
        let outcome = call_within(&client, Message::SnapshotList, limit).await;
        assert!(
            matches!(&outcome, Err(ClientError::Disconnected { reason }) if reason.contains("no answer")),
            "{outcome:?}"
        );
        assert!(started.elapsed() < limit * 10, "took {:?}", started.elapsed());
        drop(client);
        silent.abort();
    }

    #[test]
    fn probes_back_off_to_5_s_for_a_silent_host_and_30_s_for_failing_rebuilds() {
        // A restarting replica is asked again at once, whatever happened before.
        assert_eq!(
            next_probe(Probe::Refused, RETRY_MAX, Duration::ZERO),
            (REFUSED_RETRY, RETRY_MAX)
        );
        // ... for a while: a port refusing for longer is down, not restarting.
        assert_eq!(
            next_probe(Probe::Refused, RETRY_MIN, Duration::from_secs(9)).0,
            REFUSED_RETRY
        );
        assert_eq!(
            next_probe(Probe::Refused, RETRY_MIN, Duration::from_secs(11)).0,
            REFUSED_SLOW_RETRY
        );
        // A silent host: doubling from 20 ms, never more than 5 s apart, even after failed rebuilds.
        let mut backoff = RETRY_MIN;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let (wait, next) = next_probe(Probe::Silent, backoff, Duration::ZERO);
            waits.push(wait);
            backoff = next;
        }
        assert_eq!(waits[0], RETRY_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), PROBE_RETRY_MAX);
        assert_eq!(
            next_probe(Probe::Silent, RETRY_MAX, Duration::ZERO).0,
            PROBE_RETRY_MAX
        );
        // Rebuilds that keep failing space out to 30 s.
        let mut backoff = RETRY_MIN;
        for _ in 0..20 {
            backoff = next_probe(Probe::Answered, backoff, Duration::ZERO).1;
        }
        assert_eq!(backoff, RETRY_MAX);
    }

    #[test]
    fn an_empty_target_gets_exactly_the_allocated_blocks_coalesced() {
        let source = crcs(&[(0, 1), (1, 2), (2, 3), (10, 4)]);
        assert_eq!(runs_to_copy(&source, &[]), vec![(0, 3 * 4096), (10 * 4096, 4096)]);
    }

    #[test]
    fn a_returning_replica_gets_only_what_differs() {
        let source = crcs(&[(0, 1), (1, 2), (2, 3), (3, 4)]);
        let target = crcs(&[(0, 1), (1, 9), (2, 3), (3, 4), (7, 5)]);
        assert_eq!(
            runs_to_copy(&source, &target),
            vec![(4096, 4096), (7 * 4096, 4096)]
        );
    }

    #[tokio::test]
    async fn snapshot_operations_are_refused_while_a_rebuild_runs_and_wait_for_each_other() {
        let rebuilder = Rebuilder::new();
        let guard = rebuilder.reserve_chain().await.expect("no rebuild is running");
        let second = rebuilder.reserve_chain();
        tokio::pin!(second);
        assert!(
            futures::poll!(&mut second).is_pending(),
            "a second snapshot operation waits for the first"
        );
        drop(guard);
        drop(second.await.expect("then it runs"));

        rebuilder
            .running
            .lock()
            .unwrap()
            .insert(2, Arc::new(Progress::new()));
        assert_eq!(rebuilder.reserve_chain().await.err(), Some(vec![2]));
    }

    #[test]
    fn layer_runs_split_at_kind_changes_gaps_and_one_mebibyte() {
        let data = |lba| LayerBlock {
            lba,
            state: LayerBlockState::Data { crc: 0 },
        };
        let tomb = |lba| LayerBlock {
            lba,
            state: LayerBlockState::Tombstone,
        };
        let mut blocks = vec![data(0), data(1), tomb(2), tomb(3), data(5)];
        blocks.extend((10..10 + 300).map(data));
        let run = |lba, blocks, tombstones| LayerRun {
            lba,
            blocks,
            tombstones,
        };
        assert_eq!(
            layer_runs(&blocks),
            vec![
                run(0, 2, false),
                run(2, 2, true),
                run(5, 1, false),
                run(10, 256, false),
                run(266, 44, false)
            ]
        );
    }

    #[test]
    fn the_regions_of_source_and_target_are_compared_together_once_each() {
        let run = |lba, blocks| BlockRun { lba, blocks };
        assert_eq!(
            union_runs(
                &[run(0, 16), run(64, 16)],
                &[run(16, 16), run(70, 4), run(200, 16)]
            ),
            vec![run(0, 32), run(64, 16), run(200, 16)]
        );
        assert_eq!(union_runs(&[], &[]), vec![]);
    }

    #[test]
    fn copies_in_flight_are_bounded_in_number_and_while_the_guest_is_busy_in_bytes() {
        let idle = |average| copy_depth(average, COPY_DEPTH as u64 * MAX_COPY);
        assert_eq!(idle(1 << 20), COPY_DEPTH, "16 MiB in flight");
        assert_eq!(idle(64 * 4096), COPY_DEPTH, "scattered blocks, 64 to a copy");
        assert_eq!(idle(4096), COPY_DEPTH);
        assert_eq!(idle(0), COPY_DEPTH);
        let busy = |average| copy_depth(average, BUSY_COPY_BYTES);
        assert_eq!(busy(1 << 20), 2, "a busy guest leaves two 1 MiB copies in flight");
        assert_eq!(busy(64 * 4096), 8, "or eight copies of 64 scattered blocks");
        assert_eq!(busy(4096), COPY_DEPTH, "and never more copies than when idle");
        assert_eq!(busy(4 << 20), 1, "at least one");
    }

    #[test]
    fn scattered_blocks_travel_64_to_a_copy() {
        // A delta rebuild's usual work: single blocks, no two adjacent.
        let source: Vec<BlockCrc> = (0..150).map(|i| BlockCrc { lba: i * 7, crc: 1 }).collect();
        let copies = copies_of(&runs_to_copy(&source, &[]));
        assert_eq!(copies.iter().map(Vec::len).collect::<Vec<_>>(), vec![64, 64, 22]);
        let all: Vec<Extent> = copies.concat();
        assert_eq!(all.len(), 150, "every block once, in block order");
        assert!(all.windows(2).all(|w| w[0].end() < Some(w[1].offset)));
        assert!(
            copies.iter().all(|c| Extent::check_list(c).is_ok()),
            "each copy is one request the wire accepts"
        );
    }

    #[test]
    fn a_copy_stops_at_one_mebibyte_and_a_whole_mebibyte_run_is_a_copy_of_its_own() {
        const K: u32 = 4096;
        let runs = [
            (0, K),
            (1 << 20, 1 << 20),
            (3 << 20, 512 * 1024),
            (4 << 20, 512 * 1024),
            (5 << 20, K),
        ];
        assert_eq!(copies_of(&runs).iter().map(|c| copy_len(c)).max(), Some(MAX_COPY));
        let extents = |list: &[(u64, u32)]| -> Vec<Extent> {
            list.iter().map(|&(offset, len)| Extent { offset, len }).collect()
        };
        assert_eq!(
            copies_of(&runs),
            vec![
                extents(&runs[..1]),
                extents(&runs[1..2]),
                extents(&runs[2..4]),
                extents(&runs[4..]),
            ]
        );
        assert!(copies_of(&[]).is_empty());
    }

    #[test]
    fn runs_stop_at_one_mebibyte() {
        let source: Vec<BlockCrc> = (0..300).map(|lba| BlockCrc { lba, crc: 0 }).collect();
        let runs = runs_to_copy(&source, &[]);
        assert_eq!(runs, vec![(0, 1 << 20), (1 << 20, 44 * 4096)]);
    }
}
