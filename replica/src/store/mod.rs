//! # The replica store: a live head over a chain of immutable sparse snapshots
//!
//! ```text
//!   volume view (what read() returns) = newest layer holding each block, zeros if none does
//!
//!   head  (id 9)  [ . D . . T . ]   writable; D = data, T = tombstone (discarded: reads zeros)
//!   snap  (id 7)  [ D . . D D . ]   immutable
//!   snap  (id 3)  [ D D . . . D ]   immutable (oldest)
//!                   | | | | | '--- from id 3
//!                   | | | | '----- zeros (tombstone in the head hides id 7)
//!   VolumeMap: lba -> (newest layer, crc)   -- one lookup per read, whatever the depth
//! ```
//!
//! Every layer is two backend objects: a sparse **data object** with block `lba` at byte `lba * 4096`,
//! and an append-only **index log** ([`log`]) of `{lba, crc32, Data|Tombstone}` records and flush
//! markers. `volume.meta` ([`meta`]) names the chain, the volume id, size and epoch; it is replaced
//! atomically and only on rare events.
//!
//! ## Write, flush and what survives a crash
//!
//! A write of block `lba` appends its record (with the new CRC) to the head's log, then `pwrite`s the
//! data; no fsync. On the host-directory backend the append is a copy into a shared memory mapping of
//! the log, not a syscall (see `LogAppender`), so a single write costs one syscall.
//! [`Store::write_batch`] does the same for many writes at once -- all their records in one append,
//! then their data, adjacent blocks in one `pwritev` -- which saves the per-write costs of small
//! writes (and the append syscall of every write on a backend that cannot map); the ordered lane of
//! a replica connection feeds it every write queued at once. `flush()` appends a flush marker
//! carrying revision + 1 while no write is between its record and its data (it briefly takes the
//! chain lock exclusively), then fdatasyncs the head's data and log. At open, records after the last
//! marker are checked against the data on disk, so after `kill -9` at any instant:
//!
//! * every write completed before the last successful flush reads back intact;
//! * a block written after it reads back old or new, with a valid CRC -- never a checksum error;
//! * the chain is whatever the last committed `volume.meta` says, and each snapshot operation commits
//!   with one atomic replace of it.
//!
//! **Power loss** is weaker for unflushed writes only: flushed data is intact (everything is synced
//! before flush returns), but the kernel may write the log page holding a later flush marker before the
//! data it vouches for, so an in-place overwrite that was never flushed can read back as
//! [`StoreError::ChecksumMismatch`]. The controller treats that like any corrupt block: it reads the
//! block from another replica and writes it here, which repairs it.
//!
//! The revision is carried by the flush markers, not by a per-write counter (Longhorn's per-write
//! `revision.counter` halved its write IOPS); `volume.meta` copies it whenever it is rewritten.
//!
//! ## Concurrency
//!
//! `Store` is `Send + Sync` and every method takes `&self`:
//!
//! * `chain: RwLock<Chain>`: I/O holds it shared for the whole operation; flush holds it exclusively
//!   only to append its marker; snapshot create/revert hold it exclusively.
//! * `stripes`: 1,024 `RwLock`s, one per 64 KiB granule modulo 1,024. A write (and a sector write's
//!   read-modify-write, and a merge step) holds its blocks' stripes exclusively, so concurrent writes
//!   to one block are serialized. A read first goes without them: every block it returns is checked
//!   against the CRC its map entry had, so a block caught half-written fails the check, and only then
//!   is it read again holding its stripes shared, which waits for the writer -- a block is never
//!   *returned* half-written, and the common read costs no stripe lock.
//! * `map`: held only for lookups and updates, never across I/O.
//!
//! Lock order: `ops` -> `chain` -> `stripes` (ascending) -> `map` -> a layer's log -> `meta`.
//!
//! ## Snapshots
//!
//! * **create**: flush, compact the head's log, then one atomic meta replace turns the head into a
//!   snapshot and puts a fresh empty head on top.
//! * **delete** merges the snapshot `S` into its child `C` (maybe the live head), online: the meta
//!   journals "merging S into C"; every block of `S` that `C` does not hold (C's tombstones win) is
//!   copied into `C` in batches under the stripe locks, so a concurrent newer write is never
//!   overwritten; `C` is made durable; a meta replace drops `S`; `S`'s objects are removed (any
//!   leftover is an orphan removed at open). A crash at any step re-runs the merge at open, and a re-run
//!   is idempotent because blocks `C` already holds are skipped.
//! * **revert(S)** puts a fresh empty head on top of `S`. The chain is a chain, not a tree, so the old
//!   head and every snapshot newer than `S` are removed: keeping them would need branches.
//!
//! Indexes are per layer on disk but merged in memory: a read costs one map lookup at any depth, and a
//! 1,000-snapshot chain costs one data file descriptor per layer (the soft `RLIMIT_NOFILE` is raised to
//! the hard limit at open).
//!
//! ## Where things are
//!
//! | file | what it does |
//! | --- | --- |
//! | `mod.rs` | the [`Store`], its layers and chain, identity (epoch, membership), range checks |
//! | `open.rs` | create and open: `volume.meta`, log replay, the volume map, finishing a merge (recovery) |
//! | `read.rs` | reads, checked block by block against their CRCs |
//! | `write.rs` | writes, batches of writes, unmaps: record, then data, under stripe locks |
//! | `flush.rs` | flush markers, syncs, compaction of the head's log |
//! | `snapshot.rs` | snapshot create, list, delete (merge) and revert |
//! | `queries.rs` | what a rebuild asks: allocated ranges, block CRCs, writes since a sync point |
//! | `appender.rs`, `stripes.rs` | the head log's appender; the stripe locks |
//! | `log.rs`, `map.rs`, `meta.rs`, `intent.rs` | on-disk index log, in-memory map, `volume.meta`, write-intent record |
//! | `backend.rs`, `layers.rs`, `clone.rs`, `grow.rs` | where objects live; layer copies; clones; growth |

mod appender;
pub mod backend;
pub mod clone;
mod error;
mod flush;
mod grow;
mod intent;
pub mod layers;
mod log;
mod map;
mod meta;
mod open;
mod queries;
mod read;
mod snapshot;
mod stripes;
pub mod types;
mod write;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use basalt_proto::{Epoch, Revision, VolumeId};

pub use backend::{Backend, DirBackend, Object};
pub use clone::{CloneOrigin, CloneStatus, Hold, SnapshotSource};
pub use error::StoreError;
pub use grow::Growth;
pub use types::{LayerId, Lba, BLOCK_SIZE, SECTOR_SIZE};

use log::{BlockState, LayerIndex, Record, RECORD_LEN};
use map::{Entry, MapBuilder, VolumeMap};
pub use meta::Membership;
use meta::{PendingMerge, SnapshotRecord, VolumeMeta};
use types::BLOCK;

use appender::{install_log, LogAppender};
pub use flush::FlushTicket;
use open::load_index;
pub use snapshot::SnapshotInfo;

pub use basalt_proto::MAX_VOLUME_BYTES;

/// Most blocks handled under one set of stripe locks: bounds how long a large I/O holds other I/O
/// off its blocks (1 MiB).
const IO_CHUNK_BLOCKS: u64 = 256;

/// A head log is compacted at flush once it has this many records and most are superseded: below it,
/// replay at open is cheap anyway (64 Ki records = 1.5 MiB).
const COMPACT_MIN_RECORDS: u64 = 1 << 16;

/// One layer of the chain: the head or a snapshot.
struct Layer {
    id: LayerId,
    data: Box<dyn Object>,
    /// `Some` while the layer is writable: the head, or a snapshot being merged into.
    log: Mutex<Option<LogAppender>>,
    /// Blocks this layer holds with data / with a tombstone.
    data_blocks: AtomicU64,
    tombstones: AtomicU64,
}

impl Layer {
    fn append_log(&self, bytes: &[u8], records: u64) -> io::Result<()> {
        let mut log = lock(&self.log);
        let Some(app) = log.as_mut() else {
            return Err(io::Error::other(format!("{} is not writable", self.id)));
        };
        app.append(bytes, records)
    }

    fn sync_log(&self) -> io::Result<()> {
        // Clone the object out so appenders are not held off during the fsync.
        let object = lock(&self.log).as_ref().map(|a| a.object.clone());
        match object {
            Some(object) => object.sync(),
            None => Ok(()),
        }
    }

    fn log_records(&self) -> u64 {
        lock(&self.log).as_ref().map_or(0, |a| a.records)
    }

    /// Whether the log is long and mostly superseded: worth rewriting, so that replay at open stays
    /// proportional to what the layer holds.
    fn log_wants_compaction(&self) -> bool {
        let live = self.data_blocks.load(Ordering::Relaxed) + self.tombstones.load(Ordering::Relaxed);
        let records = self.log_records();
        records >= COMPACT_MIN_RECORDS && records > 2 * live
    }

    /// Keeps the held-block counters right when the entry of a block goes from `prev` to `new` in this
    /// layer. `prev` only counts if it was this layer's.
    fn account(&self, prev: Option<Entry>, new: BlockState) {
        match prev.filter(|e| e.layer == self.id).map(|e| e.state) {
            Some(BlockState::Data { .. }) => self.data_blocks.fetch_sub(1, Ordering::Relaxed),
            Some(BlockState::Tombstone) => self.tombstones.fetch_sub(1, Ordering::Relaxed),
            None => 0,
        };
        match new {
            BlockState::Data { .. } => self.data_blocks.fetch_add(1, Ordering::Relaxed),
            BlockState::Tombstone => self.tombstones.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The layers, by id, and which one is the head.
struct Chain {
    layers: BTreeMap<LayerId, Arc<Layer>>,
    head: Arc<Layer>,
}

impl Chain {
    fn layer(&self, id: LayerId) -> Result<&Arc<Layer>, StoreError> {
        self.layers.get(&id).ok_or_else(|| StoreError::Corrupt {
            what: "the volume map".to_string(),
            detail: format!("it points at {id}, which is not in the chain"),
        })
    }
}

/// A replica's volume: see the module documentation.
pub struct Store {
    backend: Arc<dyn Backend>,
    volume: VolumeId,
    /// Changes only by [`Store::grow`], under the chain lock held exclusively (see [`grow`]).
    size_bytes: AtomicU64,
    chain: RwLock<Chain>,
    map: RwLock<VolumeMap>,
    stripes: Box<[RwLock<()>]>,
    /// The persisted meta as last committed.
    meta: Mutex<VolumeMeta>,
    /// Serializes snapshot operations (a merge holds it throughout while writes go on).
    ops: Mutex<()>,
    epoch: AtomicU64,
    /// Highest revision whose flush completed (durable).
    revision: AtomicU64,
    /// Highest revision handed to a flush marker.
    next_revision: AtomicU64,
    /// Set when an I/O failure left memory and disk possibly out of step (see [`StoreError::Failed`]).
    failed: Mutex<Option<String>>,
    failed_flag: AtomicBool,
    /// The index of the snapshot layer a rebuild is copying (see [`layers`]).
    layer_indexes: layers::LayerIndexCache,
    /// Which regions were written at which flush ([`intent`]).
    intent: intent::IntentRecord,
    /// Sum of every renumbering by [`Store::adopt_sync_point`]: a flush that was marked before one
    /// and completes after it reports its revision in the new numbering.
    revision_shift: std::sync::atomic::AtomicI64,
    /// Records the head's log held after its last flush marker when the store was opened.
    recovered_unflushed: u64,
    /// A clone's hydration ([`clone`]); inert for a volume that is not a clone.
    clone: clone::CloneState,
    /// The snapshot view a clone of this volume is reading ([`clone`]).
    views: clone::ViewCache,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn rlock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn wlock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    // ------------------------------------------------------------------------------------------------
    // Identity and ordering
    // ------------------------------------------------------------------------------------------------

    /// The volume's id.
    pub fn volume_id(&self) -> VolumeId {
        self.volume
    }

    /// The volume's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// The highest epoch accepted (durable).
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// The revision of the last completed flush (durable).
    pub fn revision(&self) -> Revision {
        Revision(self.revision.load(Ordering::Acquire))
    }

    /// How many writes and discards the head's log held after its last flush when this store was
    /// opened: what the open had to check against the data (0 after a clean shutdown, which flushes;
    /// after a crash, what was written since the last flush). Logged when a replica starts.
    pub fn recovered_unflushed(&self) -> u64 {
        self.recovered_unflushed
    }

    /// Raises the epoch, durably, before returning. Setting the current epoch again is a no-op; a
    /// lower one is refused with [`StoreError::StaleEpoch`].
    pub fn set_epoch(&self, epoch: Epoch) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        if epoch < meta.epoch {
            return Err(StoreError::StaleEpoch {
                current: meta.epoch,
                requested: epoch,
            });
        }
        if epoch == meta.epoch {
            return Ok(());
        }
        let mut next = meta.clone();
        next.epoch = epoch;
        next.revision = next.revision.max(self.revision());
        next.store(&*self.backend)?;
        *meta = next;
        self.epoch.store(epoch.0, Ordering::Release);
        Ok(())
    }

    /// The membership last recorded here, if any.
    pub fn membership(&self) -> Option<Membership> {
        lock(&self.meta).membership.clone()
    }

    /// Records the volume's membership durably (the meta is written, fsynced, renamed, the directory
    /// fsynced) before returning. Recording the same generation again is allowed (a controller that
    /// retries after a lost reply); an older generation is refused, so a stale controller cannot roll the
    /// membership back.
    pub fn set_membership(&self, membership: Membership) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        if let Some(current) = &meta.membership {
            if membership.generation < current.generation {
                return Err(StoreError::StaleMembership {
                    current: current.generation,
                    requested: membership.generation,
                });
            }
        }
        let mut next = meta.clone();
        next.membership = Some(membership);
        next.revision = next.revision.max(self.revision());
        next.store(&*self.backend)?;
        *meta = next;
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------
    // Checks and splitting shared by reads and writes
    // ------------------------------------------------------------------------------------------------

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(StoreError::Unaligned { offset, len });
        }
        let size = self.size_bytes();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(StoreError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn check_not_failed(&self) -> Result<(), StoreError> {
        if self.failed_flag.load(Ordering::Acquire) {
            let detail = lock(&self.failed).clone().unwrap_or_default();
            return Err(StoreError::Failed { detail });
        }
        Ok(())
    }

    /// Records an I/O failure after which memory and disk may disagree: every later change is refused
    /// until the store is reopened (and recovery re-verifies what was not flushed).
    fn fail(&self, error: StoreError) -> StoreError {
        lock(&self.failed).get_or_insert_with(|| error.to_string());
        self.failed_flag.store(true, Ordering::Release);
        error
    }

    /// Splits a byte range into pieces that are either whole-block runs (at most [`IO_CHUNK_BLOCKS`])
    /// or a part of one block: `(lba, offset in block, bytes)`.
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let mut at = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let lba = at / BLOCK_SIZE;
            let within = (at % BLOCK_SIZE) as usize;
            let n = if within != 0 || end - at < BLOCK_SIZE {
                (BLOCK - within).min((end - at) as usize)
            } else {
                (((end - at) / BLOCK_SIZE).min(IO_CHUNK_BLOCKS) * BLOCK_SIZE) as usize
            };
            at += n as u64;
            Some((lba, within, n))
        })
    }
}
