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
//!
//! ## Where things are
//!
//! | file | what it does |
//! | --- | --- |
//! | `mod.rs` | this overview, [`RebuildError`], [`Progress`] |
//! | `supervisor.rs` | the [`Rebuilder`]: running rebuilds, the chain lock, re-adding failed replicas |
//! | `algorithm.rs` | one rebuild, steps 1 to 9 above |
//! | `chain.rs` | step 2: the snapshot chain made the source's, layers replayed |
//! | `delta.rs` | steps 5 to 7: where to compare, what differs, how it is gathered into copies |
//! | `pacing.rs` | how fast the copy goes beside a busy guest; the target's writeback |
//! | `replicas.rs` | the rebuild's own bounded connections to its source and target |

mod algorithm;
mod chain;
mod delta;
mod pacing;
mod replicas;
mod supervisor;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use basalt_proto::client::ClientError;

use crate::volume::link::LinkError;
pub use supervisor::Rebuilder;

/// Largest single copy: 1 MiB (256 blocks). Big enough to stream, small
/// enough that a copy overtaken by a guest write costs little to redo.
const MAX_COPY: u64 = 1 << 20;

/// The replicas' block: checksums and copies are counted in it.
const BLOCK: u64 = basalt_proto::BLOCK_SIZE;

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
