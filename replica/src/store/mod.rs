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

pub mod backend;
pub mod clone;
mod error;
mod grow;
mod intent;
pub mod layers;
mod log;
mod map;
mod meta;
pub mod types;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_proto::frame::{SyncPoint, WrittenAnswer};
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

pub use basalt_proto::MAX_VOLUME_BYTES;

/// Number of stripe locks. 1,024 makes two unrelated concurrent I/Os collide with probability ~0.1%.
const STRIPES: usize = 1024;
/// Blocks per stripe granule: 16 blocks = 64 KiB, so a 1 MiB I/O takes 16 locks, not 256.
const STRIPE_GRANULE: u64 = 16;
/// Most blocks handled under one set of stripe locks: bounds how long a large I/O holds other I/O
/// off its blocks (1 MiB).
const IO_CHUNK_BLOCKS: u64 = 256;
/// Blocks of a write whose CRCs and log records are built on the stack (beyond, on the heap): 32 is
/// what a replica's ordered lane hands over from an initiator at open-iscsi's default queue depth.
const STACK_BLOCKS: usize = 32;
/// Largest range that [`Store::block_crcs_in`] lists by looking each block up rather than by a range
/// of the ordered entries: a range lists only the blocks it holds, so a long, sparse one is cheaper
/// that way, while a short one costs a search of the ordered entries per range.
const POINT_LISTED_BLOCKS: u64 = 64;
/// Blocks copied per merge step; writes to those blocks wait for at most one step.
const MERGE_BATCH_BLOCKS: usize = 256;
/// A head log is compacted at flush once it has this many records and most are superseded: below it,
/// replay at open is cheap anyway (64 Ki records = 1.5 MiB).
const COMPACT_MIN_RECORDS: u64 = 1 << 16;

/// One snapshot as listed by [`Store::snapshot_list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its unique name.
    pub name: String,
    /// When it was taken.
    pub created: SystemTime,
    /// The snapshot below it, `None` for the oldest.
    pub parent: Option<String>,
    /// Bytes of data it holds itself (4 KiB per block it holds; tombstones count nothing).
    pub allocated_bytes: u64,
}

/// Bytes of index log mapped at a time, and the step in which a mapped log file grows (preallocated,
/// zero-filled): 1 MiB holds ~43,000 records. Mapping the next window costs one `fallocate` and one
/// `mmap` (tens of microseconds, every ~43,000 writes); the price is up to 1 MiB of zeros at the end
/// of each log that was appended to, read and skipped at open.
const LOG_WINDOW: u64 = 1 << 20;

/// The open index log of a writable layer.
///
/// Appends go through a shared memory mapping of the log where the backend offers one
/// ([`Object::map_for_append`]): a write's record is then a `memcpy` into the page cache instead of
/// a `pwrite` -- which, appending past the end of the file, also updated its size in the file
/// system's journal every time; that was a third of a 4 KiB store write. The order the crash rules
/// need ([`log`]: record before data) holds the same way: the record is in the page cache before the
/// data's `pwrite` starts, and a `kill -9` leaves the page cache alone. The file is preallocated a
/// [`LOG_WINDOW`] at a time, so the log ends in zeros, which the log's parser takes as its clean end.
struct LogAppender {
    object: Arc<dyn Object>,
    /// Where the next record goes: the log's logical end, not its file's length.
    len: u64,
    /// Records in the log, for the compaction decision.
    records: u64,
    window: LogWindow,
}

/// Where a [`LogAppender`]'s appends go.
enum LogWindow {
    /// Nothing mapped yet: the window is mapped at the first append, so a log that is opened but
    /// never appended to (a snapshot's, frozen by [`install_log`]) gets no preallocated tail.
    Unmapped,
    /// `[start, start + LOG_WINDOW)` of the log, mapped.
    Mapped { start: u64, map: memmap2::MmapMut },
    /// The backend cannot map the log: every append is an [`Object::write_at`].
    WriteAt,
}

impl LogAppender {
    /// Opens the index log `name` for appending at byte `len`, holding `records` records.
    fn open(backend: &dyn Backend, name: &str, len: u64, records: u64) -> Result<LogAppender, StoreError> {
        let object = backend
            .open(name, 0)
            .map_err(StoreError::io(format!("opening {name}")))?;
        Ok(LogAppender {
            object: Arc::from(object),
            len,
            records,
            window: LogWindow::Unmapped,
        })
    }

    /// Opens the index log `name` for appending at its end, which must be clean (see
    /// [`log::logical_end`]).
    fn open_at_end(
        backend: &dyn Backend,
        name: &str,
        count_records: bool,
    ) -> Result<LogAppender, StoreError> {
        let mut log = LogAppender::open(backend, name, 0, 0)?;
        log.len = log::logical_end(&*log.object).map_err(StoreError::io(format!("sizing {name}")))?;
        if count_records {
            log.records = log.len / RECORD_LEN as u64;
        }
        Ok(log)
    }

    /// Appends `bytes` (whole records, `records` of them) at the end of the log.
    fn append(&mut self, bytes: &[u8], records: u64) -> io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            match &mut self.window {
                LogWindow::Mapped { start, map } if self.len < *start + map.len() as u64 => {
                    let at = (self.len - *start) as usize;
                    let n = rest.len().min(map.len() - at);
                    map[at..at + n].copy_from_slice(&rest[..n]);
                    self.len += n as u64;
                    rest = &rest[n..];
                }
                LogWindow::WriteAt => {
                    self.object.write_at(rest, self.len)?;
                    self.len += rest.len() as u64;
                    rest = &[];
                }
                // Not mapped yet, or the window is full (a batch's records may straddle two).
                _ => {
                    self.window = LogWindow::Unmapped;
                    let start = self.len - self.len % LOG_WINDOW;
                    self.window = match self.object.map_for_append(start, LOG_WINDOW as usize)? {
                        Some(map) => LogWindow::Mapped { start, map },
                        None => LogWindow::WriteAt,
                    };
                }
            }
        }
        self.records += records;
        Ok(())
    }
}

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

/// A sub-block change applied by read-modify-write.
enum Patch<'a> {
    Data(&'a [u8]),
    /// A sub-block discard: zero this many bytes.
    Zeros(usize),
}

/// Stripe guards, held for their `Drop` only.
enum Held<G> {
    One(#[allow(dead_code)] G),
    Many(#[allow(dead_code)] Vec<G>),
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

/// A flush whose marker is appended and whose syncs are still to do (see [`Store::flush_begin`]).
pub struct FlushTicket {
    head: Arc<Layer>,
    revision: u64,
    shift: i64,
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

/// Raises the soft open-file limit to the hard one: a 1,000-snapshot chain keeps 1,000+ files open.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn validate_snapshot_name(name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidSnapshotName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Replaces a layer's log with exactly `blocks` followed by a flush marker, after syncing its data (the
/// new records are all trusted, so their data must be durable first). With `keep_open`, the layer's
/// appender is reopened on the new log.
fn install_log(
    backend: &dyn Backend,
    layer: &Layer,
    blocks: impl Iterator<Item = (u64, BlockState)>,
    revision: Revision,
    keep_open: bool,
) -> Result<(), StoreError> {
    let name = layer.id.log_object();
    layer
        .data
        .sync()
        .map_err(StoreError::io(format!("syncing the data of {}", layer.id)))?;
    let mut bytes = Vec::new();
    let mut records = 0;
    log::encode_into(
        &mut bytes,
        blocks.map(|(lba, state)| {
            records += 1;
            Record::Block { lba: Lba(lba), state }
        }),
    );
    log::encode_into(&mut bytes, [Record::Flush { revision }]);
    backend
        .replace_blob(&name, &bytes)
        .map_err(StoreError::io(format!("rewriting {name}")))?;
    let mut log = lock(&layer.log);
    *log = None;
    if keep_open {
        *log = Some(LogAppender::open(
            backend,
            &name,
            bytes.len() as u64,
            records + 1,
        )?);
    }
    Ok(())
}

/// Reads a layer's log and replays it against its data.
fn load_index(backend: &dyn Backend, layer: &Layer, volume_blocks: u64) -> Result<LayerIndex, StoreError> {
    load_index_and_tail(backend, layer, volume_blocks).map(|(index, _)| index)
}

/// [`load_index`], with the blocks the log names after its last flush marker (the unflushed tail,
/// whatever of it survived): the write-intent record counts them as written since that flush.
fn load_index_and_tail(
    backend: &dyn Backend,
    layer: &Layer,
    volume_blocks: u64,
) -> Result<(LayerIndex, Vec<u64>), StoreError> {
    let name = layer.id.log_object();
    let what = format!("{}/{name}", backend.location());
    let bytes = backend
        .read_whole(&name)
        .map_err(StoreError::io(format!("reading {what}")))?
        .ok_or_else(|| StoreError::Corrupt {
            what: what.clone(),
            detail: "the index log is missing".into(),
        })?;
    let parsed = log::parse(&bytes, &what, volume_blocks)?;
    let tail = parsed.unverified.iter().map(|(lba, _)| lba.0).collect();
    Ok((log::resolve(parsed, &*layer.data, &what)?, tail))
}

impl Store {
    // ------------------------------------------------------------------------------------------------
    // Opening
    // ------------------------------------------------------------------------------------------------

    /// Creates a new volume of `size_bytes` (a multiple of 4 KiB, at most [`MAX_VOLUME_BYTES`]) in
    /// `dir` (created if missing). Refuses a directory that already holds a volume.
    pub fn create(dir: &Path, volume: VolumeId, size_bytes: u64) -> Result<Store, StoreError> {
        Store::create_with_backend(Self::dir_backend(dir)?, volume, size_bytes)
    }

    /// Opens the volume in `dir`, recovering from any crash (see the module documentation).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_backend(Self::dir_backend(dir)?)
    }

    /// Opens the volume in `dir`, or creates it of `size_bytes` if there is none. An existing volume
    /// of another id (when `volume` is given) is refused; one of another size opens at its own size,
    /// whatever `size_bytes` says: a volume changes size only by [`Store::grow`] (an expansion through
    /// its controller), so a replica restarted with the size it was first given after an expansion
    /// keeps the larger size, and a larger `size_bytes` never grows it behind its controller's back
    /// (its controller grows it when it rejoins a larger volume). The caller logs the difference.
    pub fn open_or_create(
        dir: &Path,
        size_bytes: u64,
        volume: Option<VolumeId>,
    ) -> Result<Store, StoreError> {
        let backend = Self::dir_backend(dir)?;
        match VolumeMeta::load(&*backend)? {
            Some(meta) => {
                if let Some(v) = volume.filter(|&v| v != meta.volume) {
                    return Err(StoreError::VolumeMismatch {
                        dir: backend.location(),
                        on_disk: meta.volume,
                        requested: v,
                    });
                }
                Store::open_with_backend(backend)
            }
            None => Store::create_with_backend(backend, volume.unwrap_or_else(VolumeId::random), size_bytes),
        }
    }

    fn dir_backend(dir: &Path) -> Result<Arc<dyn Backend>, StoreError> {
        Ok(Arc::new(DirBackend::new(dir)?))
    }

    /// [`Store::create`] on any backend.
    pub fn create_with_backend(
        backend: Arc<dyn Backend>,
        volume: VolumeId,
        size_bytes: u64,
    ) -> Result<Store, StoreError> {
        Store::create_volume(backend, volume, size_bytes, None)
    }

    /// Creates a new volume that is a clone of `origin` (see [`clone`]): usable at once, its blocks
    /// read from the source until they are copied. Its size must be at least the source's.
    pub fn create_clone(
        backend: Arc<dyn Backend>,
        volume: VolumeId,
        size_bytes: u64,
        origin: CloneOrigin,
    ) -> Result<Store, StoreError> {
        Store::create_volume(backend, volume, size_bytes, Some(origin))
    }

    fn create_volume(
        backend: Arc<dyn Backend>,
        volume: VolumeId,
        size_bytes: u64,
        origin: Option<CloneOrigin>,
    ) -> Result<Store, StoreError> {
        let invalid = |reason| {
            Err(StoreError::InvalidSize {
                size: size_bytes,
                reason,
            })
        };
        if size_bytes == 0 {
            return invalid("a volume cannot be empty");
        }
        if !size_bytes.is_multiple_of(BLOCK_SIZE) {
            return invalid("it must be a multiple of 4096 bytes");
        }
        if size_bytes > MAX_VOLUME_BYTES {
            return invalid("it is larger than the 1 PiB maximum");
        }
        if origin.as_ref().is_some_and(|o| o.source_size_bytes > size_bytes) {
            return invalid("a clone cannot be smaller than the volume it is cloned from");
        }
        if VolumeMeta::load(&*backend)?.is_some() {
            return Err(StoreError::AlreadyExists {
                dir: backend.location(),
            });
        }
        let listing = backend
            .list()
            .map_err(StoreError::io(format!("listing {}", backend.location())))?;
        for name in listing.iter().filter(|n| LayerId::of_object(n).is_some()) {
            // Left by a create that crashed before its meta was written.
            backend
                .remove(name)
                .map_err(StoreError::io(format!("removing stale {name}")))?;
        }
        // A clone's base layer is the bottom of its chain, so it takes the lowest id.
        let base = origin.as_ref().map(|_| LayerId(1));
        let head = LayerId(if base.is_some() { 2 } else { 1 });
        for id in base.into_iter().chain([head]) {
            Self::create_layer_objects(&*backend, id, size_bytes)?;
        }
        let clone = origin.zip(base).map(|(origin, base)| meta::CloneMeta {
            source_volume: origin.source_volume,
            snapshot: origin.snapshot,
            source_size_bytes: origin.source_size_bytes,
            holder: origin.holder,
            sources: origin.sources,
            hydration: meta::Hydration::Filling {
                base,
                hydrated_below: 0,
            },
        });
        let meta = VolumeMeta {
            format: meta::FORMAT_VERSION,
            volume,
            size_bytes,
            epoch: Epoch::default(),
            revision: Revision::default(),
            snapshots: Vec::new(),
            head,
            next_layer: head.0 + 1,
            pending_merge: None,
            clone,
            holds: Vec::new(),
            membership: None,
        };
        intent::IntentRecord::create(backend.clone())?;
        meta.store(&*backend)?;
        Store::open_with_backend(backend)
    }

    /// Creates a layer's empty data object and log, durably.
    fn create_layer_objects(backend: &dyn Backend, id: LayerId, size_bytes: u64) -> Result<(), StoreError> {
        for (name, capacity) in [(id.data_object(), size_bytes), (id.log_object(), 0)] {
            let object = backend
                .create(&name, capacity)
                .map_err(StoreError::io(format!("creating {name}")))?;
            object.sync().map_err(StoreError::io(format!("syncing {name}")))?;
        }
        backend
            .sync_namespace()
            .map_err(StoreError::io(format!("syncing {}", backend.location())))
    }

    fn open_layer(backend: &dyn Backend, id: LayerId, size_bytes: u64) -> Result<Layer, StoreError> {
        let name = id.data_object();
        let data = backend.open(&name, size_bytes).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Corrupt {
                what: format!("{}/{name}", backend.location()),
                detail: "the data object of a layer in the chain is missing".into(),
            },
            _ => StoreError::Io {
                context: format!("opening {name}"),
                source: e,
            },
        })?;
        Ok(Layer {
            id,
            data,
            log: Mutex::new(None),
            data_blocks: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
        })
    }

    /// [`Store::open`] on any backend.
    pub fn open_with_backend(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        raise_open_file_limit();
        let meta = VolumeMeta::load(&*backend)?.ok_or_else(|| StoreError::NotAVolume {
            dir: backend.location(),
        })?;
        let volume_blocks = meta.size_bytes / BLOCK_SIZE;

        // Objects of layers no longer in the chain: left by a delete, revert or snapshot create that
        // crashed around its meta commit.
        let live: HashSet<LayerId> = meta.layers().into_iter().collect();
        let listing = backend
            .list()
            .map_err(StoreError::io(format!("listing {}", backend.location())))?;
        for name in listing {
            if LayerId::of_object(&name).is_some_and(|id| !live.contains(&id)) {
                backend
                    .remove(&name)
                    .map_err(StoreError::io(format!("removing orphan {name}")))?;
            }
        }

        let mut map = MapBuilder::default();
        let mut layers = BTreeMap::new();
        let mut revision = meta.revision;
        let mut tail = Vec::new();
        // Logs to rewrite, each with its recovered blocks, revision and whether it stays open.
        let mut rewrites = Vec::new();
        for id in meta.layers() {
            let layer = Self::open_layer(&*backend, id, meta.size_bytes)?;
            let index = if id == meta.head {
                let (index, unflushed) = load_index_and_tail(&*backend, &layer, volume_blocks)?;
                tail = unflushed;
                index
            } else {
                load_index(&*backend, &layer, volume_blocks)?
            };
            if id == meta.head {
                revision = revision.max(index.last_revision.unwrap_or_default());
            }
            // A clone's base layer is appended to until it is complete.
            let keep_open = id == meta.head || meta.filling_base() == Some(id);
            layer.data_blocks.store(index.data_blocks(), Ordering::Relaxed);
            layer.tombstones.store(index.tombstones(), Ordering::Relaxed);
            if index.needs_rewrite {
                let at = revision.max(index.last_revision.unwrap_or_default());
                // Rare (a crash left an unflushed or torn tail): the copy costs nothing worth saving.
                rewrites.push((id, index.blocks.as_slice().to_vec(), at, keep_open));
            }
            map.add_layer(id, index.blocks);
            if !index.needs_rewrite && keep_open {
                *lock(&layer.log) = Some(LogAppender::open_at_end(&*backend, &id.log_object(), true)?);
            }
            layers.insert(id, Arc::new(layer));
        }
        // The map is built while the logs and the intent record are written and synced: a head of
        // 262,144 blocks takes ~10 ms of CPU for the one and as long in fsync waits for the others.
        let (map, intent) = std::thread::scope(|scope| {
            let map = scope.spawn(|| map.build());
            let durable = rewrites
                .iter()
                .try_for_each(|(id, blocks, at, keep_open)| {
                    // Make the recovered state the durable one before anything new is appended.
                    let blocks = blocks.iter().copied();
                    install_log(&*backend, &layers[id], blocks, *at, *keep_open)
                })
                .and_then(|()| intent::IntentRecord::open(backend.clone(), revision, tail.iter().copied()));
            let map = map
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            durable.map(|intent| (map, intent))
        })?;
        let head = layers[&meta.head].clone();
        let pending = meta.pending_merge;
        let clone = clone::CloneState::from_meta(meta.clone.as_ref());
        let store = Store {
            volume: meta.volume,
            size_bytes: AtomicU64::new(meta.size_bytes),
            chain: RwLock::new(Chain { layers, head }),
            map: RwLock::new(map),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            epoch: AtomicU64::new(meta.epoch.0),
            revision: AtomicU64::new(revision.0),
            next_revision: AtomicU64::new(revision.0),
            meta: Mutex::new(meta),
            ops: Mutex::new(()),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            layer_indexes: Default::default(),
            intent,
            revision_shift: Default::default(),
            recovered_unflushed: tail.len() as u64,
            clone,
            views: Default::default(),
            backend,
        };
        if let Some(merge) = pending {
            let _ops = lock(&store.ops);
            store.run_merge(merge)?;
        }
        Ok(store)
    }

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
    // Data path
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

    /// Write-locks the stripes of the given blocks, in ascending order (no deadlock).
    fn lock_stripes_write(&self, lbas: impl Iterator<Item = u64>) -> Vec<RwLockWriteGuard<'_, ()>> {
        Self::stripe_ids(lbas)
            .into_iter()
            .map(|i| wlock(&self.stripes[i]))
            .collect()
    }

    fn lock_stripes_read(&self, lbas: impl Iterator<Item = u64>) -> Vec<RwLockReadGuard<'_, ()>> {
        Self::stripe_ids(lbas)
            .into_iter()
            .map(|i| rlock(&self.stripes[i]))
            .collect()
    }

    /// Read-locks the stripes of a run of blocks; a run inside one granule (most I/O) allocates nothing.
    fn read_stripes(&self, blocks: Range<u64>) -> Held<RwLockReadGuard<'_, ()>> {
        if blocks.start / STRIPE_GRANULE == (blocks.end - 1) / STRIPE_GRANULE {
            Held::One(rlock(&self.stripes[Self::stripe_of(blocks.start)]))
        } else {
            Held::Many(self.lock_stripes_read(blocks))
        }
    }

    /// Write-locks the stripes of a run of blocks, like [`Store::read_stripes`].
    fn write_stripes(&self, blocks: Range<u64>) -> Held<RwLockWriteGuard<'_, ()>> {
        if blocks.start / STRIPE_GRANULE == (blocks.end - 1) / STRIPE_GRANULE {
            Held::One(wlock(&self.stripes[Self::stripe_of(blocks.start)]))
        } else {
            Held::Many(self.lock_stripes_write(blocks))
        }
    }

    fn stripe_of(lba: u64) -> usize {
        ((lba / STRIPE_GRANULE) % STRIPES as u64) as usize
    }

    fn stripe_ids(lbas: impl Iterator<Item = u64>) -> Vec<usize> {
        let mut ids: Vec<usize> = lbas.map(Self::stripe_of).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
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

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). Every block is checked against its
    /// CRC32; a mismatch is [`StoreError::ChecksumMismatch`] with the block's index.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.read_as(offset, buf, Wait::Yes).map(|_| ())
    }

    /// [`Store::read`] if it can be done without waiting for the medium (the blocks are in the page
    /// cache): `Ok(false)` if it would have had to wait (then `buf` holds nothing useful and the
    /// caller reads again with [`Store::read`], off its latency-sensitive thread).
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, StoreError> {
        self.read_as(offset, buf, Wait::No)
    }

    fn read_as(&self, offset: u64, buf: &mut [u8], wait: Wait) -> Result<bool, StoreError> {
        self.check_range(offset, buf.len() as u64)?;
        // A clone's blocks not copied from its source yet are fetched first (see [`clone`]).
        let blocks = offset / BLOCK_SIZE..(offset + buf.len() as u64).div_ceil(BLOCK_SIZE);
        match wait {
            Wait::Yes => self.fetch_absent(blocks)?,
            Wait::No if self.any_absent(blocks) => return Ok(false),
            Wait::No => {}
        }
        let chain = rlock(&self.chain);
        let mut done = 0;
        for (lba, within, n) in Self::pieces(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n];
            let complete = if within == 0 && n % BLOCK == 0 {
                self.read_optimistic(&chain, lba, out, wait)?
            } else {
                let mut block = [0u8; BLOCK];
                let complete = self.read_optimistic(&chain, lba, &mut block, wait)?;
                out.copy_from_slice(&block[within..within + n]);
                complete
            };
            if !complete {
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }

    /// Reads whole blocks without their stripe locks, and again under them only if a block fails its
    /// checksum. That is safe because every block read is checked against the CRC its map entry held
    /// at lookup time: a block caught half-written, or rewritten or discarded between the lookup and
    /// the `pread`, fails the check, and the locked retry waits for the writer and gives the answer
    /// (a real mismatch fails again and is reported). Two uncontended atomic operations per read are
    /// a few percent of a cached 4 KiB read, and the retry is rare: it needs a write to the very
    /// block being read.
    fn read_optimistic(
        &self,
        chain: &Chain,
        first: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, StoreError> {
        match self.read_blocks_as(chain, first, out, wait) {
            Err(StoreError::ChecksumMismatch { .. }) => {
                let _stripes = self.read_stripes(first..first + (out.len() / BLOCK) as u64);
                self.read_blocks_as(chain, first, out, wait)
            }
            done => done,
        }
    }

    /// Reads whole blocks from the merged view into `out`, each checked against its CRC32. Without
    /// the blocks' stripes held, a block being written may fail the check (see
    /// [`Store::read_optimistic`]).
    fn read_blocks(&self, chain: &Chain, first: u64, out: &mut [u8]) -> Result<(), StoreError> {
        self.read_blocks_as(chain, first, out, Wait::Yes).map(|_| ())
    }

    /// [`Store::read_blocks`]; with [`Wait::No`], `Ok(false)` as soon as a block is not in memory.
    fn read_blocks_as(
        &self,
        chain: &Chain,
        first: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, StoreError> {
        if out.len() == BLOCK && self.head_is_dense(chain) {
            self.read_head_first(chain, first, out, wait)
        } else {
            self.read_lookup_first(chain, first, out, wait)
        }
    }

    /// Whether the head holds data for at least 15/16 of the volume's blocks, so that a block read
    /// is almost surely answered by the head (see [`Store::read_head_first`]). A fully written volume
    /// without snapshots, or whose recent writes have covered it, is the common case; a thin volume
    /// or a fresh head over a snapshot is not, and keeps the lookup-first order.
    fn head_is_dense(&self, chain: &Chain) -> bool {
        let blocks = self.size_bytes() / BLOCK_SIZE;
        chain.head.data_blocks.load(Ordering::Relaxed) >= blocks - blocks / 16
    }

    /// Reads one block from the head *before* looking it up, and uses what was read only if the map
    /// then says the head holds the block, checking it against that entry's CRC.
    ///
    /// Why: the map slot a random read needs is almost never in the CPU cache (the kernel's copy of
    /// the previous block evicted it), and waiting for it cost about a tenth of a cached 4 KiB
    /// `pread` -- a third of the store's whole overhead over a plain file. Prefetching the slot and
    /// then doing the `pread` hides that wait behind the syscall. The price is a wasted `pread` for
    /// a block the head does not hold, which is why this order is only taken when the head holds
    /// nearly every block ([`Store::head_is_dense`]); otherwise, and whenever the head does not hold
    /// the block, the ordinary lookup-first read answers.
    ///
    /// It is as safe as the lookup-first order (see [`Store::read_optimistic`]): the block returned
    /// matches the CRC the map held for it in the head after the read, so it is a whole version of
    /// the block that the map vouched for; a write racing with the read, in either order, makes the
    /// data and that CRC disagree, which sends the read to the locked retry.
    fn read_head_first(
        &self,
        chain: &Chain,
        lba: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, StoreError> {
        let slot = rlock(&self.map).slot_address(lba);
        map::prefetch(slot);
        let head = &chain.head;
        let read = Self::pread_layer(head, lba, out, wait);
        let entry = rlock(&self.map).get(lba);
        match (entry, read) {
            (
                Some(Entry {
                    layer,
                    state: BlockState::Data { crc },
                }),
                Ok(complete),
            ) if layer == head.id => {
                if complete {
                    Self::verify(lba, out, crc)?;
                }
                Ok(complete)
            }
            // Another layer's block, a tombstone or never written; or the head could not be read,
            // which matters only if the head holds the block: the lookup-first read decides.
            _ => self.read_lookup_first(chain, lba, out, wait),
        }
    }

    /// Reads whole blocks of one layer's data object, starting at block `first`; with
    /// [`Wait::No`], `Ok(false)` if they are not all in memory.
    fn pread_layer(layer: &Layer, first: u64, run: &mut [u8], wait: Wait) -> Result<bool, StoreError> {
        let offset = Lba(first).byte_offset();
        let read = match wait {
            Wait::Yes => layer.data.read_at(run, offset).map(|()| true),
            Wait::No => layer.data.read_cached_at(run, offset),
        };
        read.map_err(|e| StoreError::Io {
            context: format!("reading {} of {}", Lba(first), layer.id),
            source: e,
        })
    }

    /// Checks one block read for `lba` against the CRC32 its map entry holds.
    fn verify(lba: u64, block: &[u8], crc: u32) -> Result<(), StoreError> {
        if crc32fast::hash(block) == crc {
            Ok(())
        } else {
            Err(StoreError::ChecksumMismatch { lba })
        }
    }

    /// Reads whole blocks: looks them all up, then reads each run of blocks held by one layer with
    /// one `pread`, and checks every block against its entry's CRC.
    fn read_lookup_first(
        &self,
        chain: &Chain,
        first: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, StoreError> {
        let n = out.len() / BLOCK;
        // Small reads (the common 4 KiB case) keep their lookups on the stack.
        let mut small = [None::<Entry>; 16];
        let mut large = Vec::new();
        let entries: &mut [Option<Entry>] = if n <= small.len() {
            &mut small[..n]
        } else {
            large.resize(n, None);
            &mut large
        };
        {
            // One point lookup per block, not a range of the ordered entries: a range looks up
            // each block it lists in the hash table anyway (for its CRC), after a search whose cache
            // misses each wait for the one before. The probes are independent, so with their slots
            // prefetched first their misses overlap.
            let map = rlock(&self.map);
            let lbas = first..first + n as u64;
            lbas.clone().for_each(|lba| map::prefetch(map.slot_address(lba)));
            for (entry, lba) in entries.iter_mut().zip(lbas) {
                *entry = map.get(lba);
            }
        }
        let mut i = 0;
        while i < n {
            let Some(Entry {
                layer,
                state: BlockState::Data { .. },
            }) = entries[i]
            else {
                out[i * BLOCK..(i + 1) * BLOCK].fill(0);
                i += 1;
                continue;
            };
            // One pread for a run of blocks held by the same layer.
            let mut j = i + 1;
            while j < n
                && matches!(entries[j], Some(Entry { layer: l, state: BlockState::Data { .. } }) if l == layer)
            {
                j += 1;
            }
            // Most reads hit what was written since the last snapshot: skip the layer lookup then.
            let source = if layer == chain.head.id {
                &chain.head
            } else {
                chain.layer(layer)?
            };
            if !Self::pread_layer(source, first + i as u64, &mut out[i * BLOCK..j * BLOCK], wait)? {
                return Ok(false);
            }
            for k in i..j {
                let Some(Entry {
                    state: BlockState::Data { crc },
                    ..
                }) = entries[k]
                else {
                    continue;
                };
                Self::verify(first + k as u64, &out[k * BLOCK..(k + 1) * BLOCK], crc)?;
            }
            i = j;
        }
        Ok(true)
    }

    /// Writes `data` at `offset` (both multiples of 512) into the head. Volatile until [`Store::flush`].
    /// A write of a whole block also repairs a block that failed its checksum.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.check_range(offset, data.len() as u64)?;
        self.check_not_failed()?;
        self.fetch_partial_blocks(offset, data.len() as u64)?;
        let chain = rlock(&self.chain);
        let mut done = 0;
        for (lba, within, n) in Self::pieces(offset, data.len() as u64) {
            let piece = &data[done..done + n];
            if within == 0 && n % BLOCK == 0 {
                let _stripes = self.write_stripes(lba..lba + (n / BLOCK) as u64);
                self.write_locked(&chain, lba, piece)?;
            } else {
                self.patch_block(&chain, lba, within, Patch::Data(piece))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Writes whole blocks into the head; the caller holds their stripes.
    fn write_locked(&self, chain: &Chain, first: u64, data: &[u8]) -> Result<(), StoreError> {
        self.write_runs_locked(chain, &[(first, data)])
    }

    /// Writes runs of whole blocks `(first block, data)` into the head, in order (a later run wins
    /// where runs overlap); the caller holds their stripes. All the runs' records go first, in one
    /// append, then their data -- see [`log`] for why that order makes crashes safe -- with runs that
    /// follow each other on disk gathered into one vectored write.
    fn write_runs_locked(&self, chain: &Chain, runs: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let head = &chain.head;
        let blocks: usize = runs.iter().map(|(_, data)| data.len() / BLOCK).sum();
        // Up to a queue depth's worth of blocks, the CRCs and records stay on the stack: a single
        // 4 KiB write is a few microseconds, and two heap allocations were a few percent of it.
        let (mut small_crcs, mut small_records) = ([0u32; STACK_BLOCKS], [0u8; STACK_BLOCKS * RECORD_LEN]);
        let (mut large_crcs, mut large_records) = (Vec::new(), Vec::new());
        let (crcs, records): (&mut [u32], &mut [u8]) = if blocks <= STACK_BLOCKS {
            (
                &mut small_crcs[..blocks],
                &mut small_records[..blocks * RECORD_LEN],
            )
        } else {
            large_crcs.resize(blocks, 0);
            large_records.resize(blocks * RECORD_LEN, 0);
            (&mut large_crcs, &mut large_records)
        };
        let lbas = runs
            .iter()
            .flat_map(|&(first, data)| (first..).zip(data.chunks_exact(BLOCK)));
        for ((lba, block), (crc, record)) in
            lbas.zip(crcs.iter_mut().zip(records.chunks_exact_mut(RECORD_LEN)))
        {
            *crc = crc32fast::hash(block);
            record.copy_from_slice(
                &Record::Block {
                    lba: Lba(lba),
                    state: BlockState::Data { crc: *crc },
                }
                .encode(),
            );
        }
        head.append_log(records, blocks as u64).map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("appending to the index log of {}", head.id),
                source: e,
            })
        })?;
        self.intent.note(
            runs.iter()
                .flat_map(|&(first, data)| first..first + (data.len() / BLOCK) as u64),
        );
        let mut i = 0;
        while i < runs.len() {
            let (first, data) = runs[i];
            let mut end = first + (data.len() / BLOCK) as u64;
            let mut j = i + 1;
            while j < runs.len() && runs[j].0 == end {
                end += (runs[j].1.len() / BLOCK) as u64;
                j += 1;
            }
            let written = if j == i + 1 {
                head.data.write_at(data, Lba(first).byte_offset())
            } else {
                let bufs: Vec<&[u8]> = runs[i..j].iter().map(|&(_, d)| d).collect();
                head.data.write_vectored_at(&bufs, Lba(first).byte_offset())
            };
            written.map_err(|e| {
                self.fail(StoreError::Io {
                    context: format!("writing {}..{end} of {}", Lba(first), head.id),
                    source: e,
                })
            })?;
            i = j;
        }
        let mut map = wlock(&self.map);
        let mut crcs = crcs.iter().copied();
        for &(first, data) in runs {
            for (lba, crc) in (first..first + (data.len() / BLOCK) as u64).zip(crcs.by_ref()) {
                let state = BlockState::Data { crc };
                let prev = map.insert(
                    lba,
                    Entry {
                        layer: head.id,
                        state,
                    },
                );
                head.account(prev, state);
            }
        }
        Ok(())
    }

    /// Applies `writes` `(offset, data)` in order, exactly as if [`Store::write`] were called for each
    /// in turn, and returns one result per write. The ordered lane of a replica connection hands over
    /// every write queued behind the one it picks up, so what a batch saves is per-write syscalls:
    /// consecutive whole-block writes (up to 1 MiB together) share one index-log append -- all their
    /// records still reach the log before any of their data -- and those that are adjacent on disk
    /// one `pwritev`. A write that is refused (unaligned, out of range) fails alone; sub-block writes
    /// and writes over 1 MiB run as they would alone, in their place in the order.
    pub fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::with_capacity(writes.len());
        let mut group: Vec<(u64, &[u8])> = Vec::new();
        let mut group_blocks = 0u64;
        for &(offset, data) in writes {
            let blocks = (data.len() / BLOCK) as u64;
            let batchable = !data.is_empty()
                && offset.is_multiple_of(BLOCK_SIZE)
                && data.len().is_multiple_of(BLOCK)
                && blocks <= IO_CHUNK_BLOCKS
                && self.check_range(offset, data.len() as u64).is_ok();
            if batchable && group_blocks + blocks <= IO_CHUNK_BLOCKS {
                group.push((offset / BLOCK_SIZE, data));
                group_blocks += blocks;
                continue;
            }
            self.write_group(&group, &mut results);
            group.clear();
            group_blocks = 0;
            if batchable {
                group.push((offset / BLOCK_SIZE, data));
                group_blocks = blocks;
            } else {
                results.push(self.write(offset, data));
            }
        }
        self.write_group(&group, &mut results);
        results
    }

    /// Writes one group of [`Store::write_batch`] under one set of stripe locks and pushes a result
    /// per run: they share one fate, since they share one log append.
    fn write_group(&self, runs: &[(u64, &[u8])], results: &mut Vec<Result<(), StoreError>>) {
        if runs.is_empty() {
            return;
        }
        let outcome = self.check_not_failed().and_then(|()| {
            let chain = rlock(&self.chain);
            let _stripes = self.lock_stripes_write(
                runs.iter()
                    .flat_map(|&(first, data)| first..first + (data.len() / BLOCK) as u64),
            );
            self.write_runs_locked(&chain, runs)
        });
        match outcome {
            Ok(()) => results.extend(runs.iter().map(|_| Ok(()))),
            Err(error) => {
                // `StoreError` is not `Clone` (it carries an `io::Error`): the first run gets the
                // error itself, the others the failure it recorded.
                let detail = error.to_string();
                results.push(Err(error));
                results.extend(runs[1..].iter().map(|_| {
                    Err(self
                        .check_not_failed()
                        .err()
                        .unwrap_or_else(|| StoreError::Failed {
                            detail: detail.clone(),
                        }))
                }));
            }
        }
    }

    /// Fetches a clone's absent blocks that a write or discard of `len` bytes at `offset` covers only
    /// in part: their read-modify-write must start from the source's data, not from zeros.
    fn fetch_partial_blocks(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let end = offset + len;
        if len > 0 && !offset.is_multiple_of(BLOCK_SIZE) {
            let lba = offset / BLOCK_SIZE;
            self.fetch_absent(lba..lba + 1)?;
        }
        if len > 0 && !end.is_multiple_of(BLOCK_SIZE) {
            let lba = end / BLOCK_SIZE;
            self.fetch_absent(lba..lba + 1)?;
        }
        Ok(())
    }

    /// Read-modify-write of part of one block (a sector write or a sector discard).
    fn patch_block(
        &self,
        chain: &Chain,
        lba: u64,
        within: usize,
        patch: Patch<'_>,
    ) -> Result<(), StoreError> {
        let _stripe = self.write_stripes(lba..lba + 1);
        let mut block = [0u8; BLOCK];
        self.read_blocks(chain, lba, &mut block)?;
        match patch {
            Patch::Data(bytes) => block[within..within + bytes.len()].copy_from_slice(bytes),
            Patch::Zeros(n) => {
                block[within..within + n].fill(0);
                if block.iter().all(|&b| b == 0) {
                    // The whole block is now zeros: a tombstone gives its space back.
                    return self.tombstone_locked(chain, &[lba]);
                }
            }
        }
        self.write_locked(chain, lba, &block)
    }

    /// Discards `len` bytes at `offset` (both multiples of 512): they read as zeros from now on, even
    /// where an older snapshot holds data. Snapshots are never changed; the head gives the space of
    /// whole discarded blocks back to the filesystem. Costs time in proportion to the blocks written
    /// in the range, not to its size (mkfs discards a whole device).
    pub fn unmap(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_range(offset, len)?;
        self.check_not_failed()?;
        self.fetch_partial_blocks(offset, len)?;
        let chain = rlock(&self.chain);
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE);
        let end_full = end / BLOCK_SIZE;
        if first_full > end_full {
            // Inside one block.
            return self.patch_block(
                &chain,
                offset / BLOCK_SIZE,
                (offset % BLOCK_SIZE) as usize,
                Patch::Zeros(len as usize),
            );
        }
        if !offset.is_multiple_of(BLOCK_SIZE) {
            let within = (offset % BLOCK_SIZE) as usize;
            self.patch_block(&chain, offset / BLOCK_SIZE, within, Patch::Zeros(BLOCK - within))?;
        }
        if !end.is_multiple_of(BLOCK_SIZE) {
            self.patch_block(&chain, end_full, 0, Patch::Zeros((end % BLOCK_SIZE) as usize))?;
        }
        let mut cursor = first_full;
        while cursor < end_full {
            let head = chain.head.id;
            let lbas: Vec<u64> = {
                let map = rlock(&self.map);
                let chunk = IO_CHUNK_BLOCKS as usize;
                let mut lbas: Vec<u64> = map
                    .range(cursor..end_full)
                    .filter(|(_, e)| !(e.layer == head && e.state == BlockState::Tombstone))
                    .take(chunk)
                    .map(|(lba, _)| lba)
                    .collect();
                // A clone's absent blocks read as the source's data until discarded here too. Both
                // lists are in order, so the first `chunk` of their union is in their first `chunk`s.
                lbas.extend(self.clone.absent(&map, cursor..end_full).take(chunk));
                lbas.sort_unstable();
                lbas.dedup();
                lbas.truncate(chunk);
                lbas
            };
            let Some(&last) = lbas.last() else { break };
            cursor = last + 1;
            let _stripes = self.lock_stripes_write(lbas.iter().copied());
            self.tombstone_locked(&chain, &lbas)?;
        }
        Ok(())
    }

    /// Puts tombstones on `lbas` (sorted) in the head and punches the head's data there; the caller
    /// holds their stripes. Blocks no layer holds already read as zeros and are skipped.
    fn tombstone_locked(&self, chain: &Chain, lbas: &[u64]) -> Result<(), StoreError> {
        let head = &chain.head;
        let lbas: Vec<u64> = {
            let map = rlock(&self.map);
            lbas.iter()
                .copied()
                .filter(|&l| match map.get(l) {
                    Some(e) => !(e.layer == head.id && e.state == BlockState::Tombstone),
                    // Unheld, it reads as zeros -- unless it is a clone's absent block.
                    None => self.clone.is_absent_unheld(l),
                })
                .collect()
        };
        if lbas.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(lbas.len() * RECORD_LEN);
        log::encode_into(
            &mut records,
            lbas.iter().map(|&l| Record::Block {
                lba: Lba(l),
                state: BlockState::Tombstone,
            }),
        );
        head.append_log(&records, lbas.len() as u64).map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("appending to the index log of {}", head.id),
                source: e,
            })
        })?;
        self.intent.note(lbas.iter().copied());
        let mut punch: Vec<Range<u64>> = Vec::new();
        {
            let mut map = wlock(&self.map);
            for &lba in &lbas {
                let prev = map.insert(
                    lba,
                    Entry {
                        layer: head.id,
                        state: BlockState::Tombstone,
                    },
                );
                head.account(prev, BlockState::Tombstone);
                if prev.is_some_and(|e| e.layer == head.id) {
                    match punch.last_mut() {
                        Some(run) if run.end == lba => run.end += 1,
                        _ => punch.push(lba..lba + 1),
                    }
                }
            }
        }
        for run in punch {
            head.data
                .punch(Lba(run.start).byte_offset(), (run.end - run.start) * BLOCK_SIZE)
                .map_err(|e| {
                    self.fail(StoreError::Io {
                        context: format!("punching {}..{} of {}", run.start, run.end, head.id),
                        source: e,
                    })
                })?;
        }
        Ok(())
    }

    /// Starts writing the head's data back to disk, without waiting and without making anything
    /// durable (see [`Store::flush`]): a caller that keeps starting it while writes go on keeps the
    /// data a flush must write back small (see the replica server's module docs).
    pub fn start_writeback(&self) -> Result<(), StoreError> {
        let head = rlock(&self.chain).head.clone();
        head.data
            .start_writeback()
            .map_err(StoreError::io(format!("starting the writeback of {}", head.id)))
    }

    /// Makes every write that completed before this call durable, and returns the new revision.
    pub fn flush(&self) -> Result<Revision, StoreError> {
        let ticket = self.flush_begin()?;
        self.flush_finish(ticket)
    }

    /// The first half of [`Store::flush`]: appends the flush marker (cheap: no I/O wait) and stamps the
    /// write-intent record, so the flush takes its place in the order of the writes around it; the
    /// caller may go on with later writes before [`Store::flush_finish`] makes it durable. A replica
    /// connection does so in arrival order, which keeps the flushes of every replica in step.
    pub fn flush_begin(&self) -> Result<FlushTicket, StoreError> {
        self.check_not_failed()?;
        let (head, revision) = {
            // Exclusive only while the marker is appended: no write is then between its record and
            // its data, so every record before the marker has its data in the page cache.
            let chain = wlock(&self.chain);
            let revision = self.next_revision.fetch_add(1, Ordering::AcqRel) + 1;
            self.append_marker(&chain.head, Revision(revision))?;
            self.intent.commit(Revision(revision), self.epoch());
            (chain.head.clone(), revision)
        };
        Ok(FlushTicket {
            head,
            revision,
            shift: self.revision_shift.load(Ordering::Acquire),
        })
    }

    /// Makes every write that completed before this call durable, like [`Store::flush`], without
    /// taking a revision: for the flushes a replica makes on its own -- a snapshot merge's end, a
    /// clean shutdown -- not at a place in the controller's stream. Revisions number the stream's
    /// flushes, the same flush on every replica; one taken here would shift this replica's
    /// numbering against the others', and the write-intent record would then answer for the wrong
    /// flush (see [`intent`]). The next numbered flush stamps what this one made durable.
    pub fn flush_unnumbered(&self) -> Result<(), StoreError> {
        self.check_not_failed()?;
        let head = {
            // As in `flush_begin`: no write between its record and its data while the marker goes in.
            let chain = wlock(&self.chain);
            self.append_marker(&chain.head, Revision(self.next_revision.load(Ordering::Acquire)))?;
            // The marker ends the log's unflushed tail, which is where a reopen would have found
            // the regions written since the last numbered flush: the record keeps them itself.
            self.intent.keep_pending();
            chain.head.clone()
        };
        self.sync_layer(&head)
    }

    /// Appends the records of `blocks` to a layer's log, in one append; a failure fails the store.
    fn append_block_records(&self, layer: &Layer, blocks: &[(u64, BlockState)]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(blocks.len() * RECORD_LEN);
        log::encode_into(
            &mut records,
            blocks
                .iter()
                .map(|&(lba, state)| Record::Block { lba: Lba(lba), state }),
        );
        layer.append_log(&records, blocks.len() as u64).map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("appending to the index log of {}", layer.id),
                source: e,
            })
        })
    }

    /// Appends a flush marker for `revision` to a layer's log; a failure fails the store (the log's
    /// state is then unknown). Callers hold the chain lock exclusively (see [`Store::flush_begin`]).
    fn append_marker(&self, layer: &Layer, revision: Revision) -> Result<(), StoreError> {
        let marker = Record::Flush { revision }.encode();
        layer.append_log(&marker, 1).map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("appending a flush marker to {}", layer.id),
                source: e,
            })
        })
    }

    /// Syncs a layer's data, then its log. After a failed fsync the page cache state is unknown
    /// (fsyncgate): the store fails, and only a reopen is safe.
    fn sync_layer(&self, layer: &Layer) -> Result<(), StoreError> {
        layer.data.sync().map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("syncing the data of {}", layer.id),
                source: e,
            })
        })?;
        layer.sync_log().map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("syncing the index log of {}", layer.id),
                source: e,
            })
        })
    }

    /// The second half of [`Store::flush`]: syncs data and log, and returns the flush's revision (in
    /// the current numbering, should the replica have been renumbered meanwhile).
    pub fn flush_finish(&self, ticket: FlushTicket) -> Result<Revision, StoreError> {
        let FlushTicket {
            head,
            revision,
            shift,
        } = ticket;
        self.sync_layer(&head)?;
        let moved = self.revision_shift.load(Ordering::Acquire) - shift;
        let revision = revision.saturating_add_signed(moved);
        self.revision.fetch_max(revision, Ordering::AcqRel);
        self.maybe_compact_head(&head)?;
        Ok(Revision(revision))
    }

    /// Rewrites the head's log when most of its records are superseded, so replay at open stays
    /// proportional to what the head holds.
    fn maybe_compact_head(&self, head: &Arc<Layer>) -> Result<(), StoreError> {
        if !head.log_wants_compaction() {
            return Ok(());
        }
        let chain = wlock(&self.chain);
        if !Arc::ptr_eq(&chain.head, head) {
            return Ok(());
        }
        let blocks: Vec<(u64, BlockState)> = rlock(&self.map).blocks_of(head.id).collect();
        let revision = Revision(self.next_revision.load(Ordering::Acquire));
        install_log(&*self.backend, head, blocks.into_iter(), revision, true).map_err(|e| self.fail(e))
    }

    /// Coalesced byte ranges of the volume that hold data (in the merged view): what a rebuild copies.
    pub fn allocated_ranges(&self) -> Vec<Range<u64>> {
        rlock(&self.map)
            .allocated_blocks()
            .into_iter()
            .map(|r| r.start * BLOCK_SIZE..r.end * BLOCK_SIZE)
            .collect()
    }

    /// Every block of `blocks` (block numbers) that holds data in the merged view, with the CRC32 of
    /// its content, in block order. Blocks that read as zeros (never written, or discarded) are
    /// left out. A rebuild compares these lists between replicas so that only blocks that differ
    /// travel; the CRCs come from the in-memory map, so listing costs no disk I/O.
    pub fn block_crcs(&self, blocks: Range<u64>) -> Vec<(u64, u32)> {
        rlock(&self.map)
            .range(blocks)
            .filter_map(|(lba, e)| match e.state {
                BlockState::Data { crc } => Some((lba, crc)),
                BlockState::Tombstone => None,
            })
            .collect()
    }

    /// [`Store::block_crcs`] over many ranges of blocks (in block order, not overlapping) under one
    /// hold of the map, at most `max` entries: a rebuild guided by the write-intent record lists
    /// thousands of small regions scattered over the volume, and one listing per region cost more in
    /// round trips than the copy it decides. Returns the list and the block up to which it is
    /// complete: the end of the last range, or the first block left out when `max` was reached.
    ///
    /// A range of up to [`POINT_LISTED_BLOCKS`] blocks is listed by looking each block up in the
    /// hash table, with the slots of the blocks ahead prefetched (across ranges), as a read does: a
    /// range listing searches the ordered entries first, several cache misses that wait for one
    /// another, and then looks every block it lists up in the hash table anyway, for its CRC. A
    /// record's ~2,000 regions of a block or two took 2-5 ms to list that way (the more so on a
    /// replica that never restarted, whose ordered entries are all in a B-tree).
    pub fn block_crcs_in(&self, ranges: &[Range<u64>], max: usize) -> (Vec<(u64, u32)>, u64) {
        let map = rlock(&self.map);
        let small = |blocks: &&Range<u64>| blocks.end - blocks.start <= POINT_LISTED_BLOCKS;
        // The blocks looked up one by one, as many ahead of the lookups as the map's own listings prefetch.
        let mut ahead = ranges.iter().filter(small).flat_map(Range::clone);
        ahead
            .by_ref()
            .take(map::PREFETCH_AHEAD)
            .for_each(|lba| map::prefetch(map.slot_address(lba)));
        let mut list = Vec::new();
        let take = |list: &mut Vec<(u64, u32)>, lba: u64, e: Entry| match e.state {
            BlockState::Data { .. } if list.len() == max => Some(lba),
            BlockState::Data { crc } => {
                list.push((lba, crc));
                None
            }
            BlockState::Tombstone => None,
        };
        for blocks in ranges {
            if small(&blocks) {
                for lba in blocks.clone() {
                    if let Some(next) = ahead.next() {
                        map::prefetch(map.slot_address(next));
                    }
                    if let Some(cut) = map.get(lba).and_then(|e| take(&mut list, lba, e)) {
                        return (list, cut);
                    }
                }
            } else {
                for (lba, e) in map.range(blocks.clone()) {
                    if let Some(cut) = take(&mut list, lba, e) {
                        return (list, cut);
                    }
                }
            }
        }
        (list, ranges.last().map_or(0, |r| r.end))
    }

    /// This replica's sync point: its lineage, its durable revision and the epoch that flush was made
    /// under (see [`intent`]).
    pub fn sync_point(&self) -> SyncPoint {
        self.intent.position(self.revision())
    }

    /// Which regions may differ between this replica and one last in sync with it at `since` (`None`:
    /// at this replica's own last durable flush), listed from block `start_lba`, and up to which block
    /// the answer is complete. A superset of what was written here since, never less; "unknown" when
    /// the record cannot say (other lineage, too old, ahead of this replica, split history).
    pub fn written_since(&self, since: Option<SyncPoint>, start_lba: u64) -> (WrittenAnswer, u64) {
        self.intent
            .written_since(since, self.revision(), start_lba, self.size_bytes() / BLOCK_SIZE)
    }

    /// Puts this replica on another flush numbering: its flush `own` is `point.revision` of
    /// `point.lineage` (a rebuild got both from one drain flush, once the copy was complete), so every
    /// revision it hands out from now on is the one the source gives the same flush. With `None`, it
    /// leaves any numbering (a rebuild starts copying): nobody's record answers for it any more.
    /// Durable before it returns; a crash half-way leaves it on no shared numbering.
    pub fn adopt_sync_point(&self, point: Option<SyncPoint>, own: Revision) -> Result<SyncPoint, StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        // First off any numbering, durably: nothing may trust a replica whose revisions are moving.
        self.intent.forget()?;
        let Some(point) = point else {
            return Ok(self.sync_point());
        };
        let chain = wlock(&self.chain);
        let next = self.next_revision.load(Ordering::Acquire);
        if own.0 > next {
            return Err(StoreError::BadSyncPoint {
                detail: format!(
                    "revision {} is not one of this replica's (it is at {next})",
                    own.0
                ),
            });
        }
        let delta = i128::from(point.revision.0) - i128::from(own.0);
        let renumbered = u64::try_from(i128::from(next) + delta).map_err(|_| StoreError::BadSyncPoint {
            detail: format!("revision {next} cannot move by {delta}"),
        })?;
        // A marker in the new numbering, synced with the data it covers, and the meta that says it:
        // open takes the last marker and the meta's revision, both now the renumbered one.
        let marker = Record::Flush {
            revision: Revision(renumbered),
        }
        .encode();
        let durable = chain
            .head
            .append_log(&marker, 1)
            .and_then(|()| chain.head.data.sync())
            .and_then(|()| chain.head.sync_log());
        durable.map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("renumbering the flushes of {}", chain.head.id),
                source: e,
            })
        })?;
        {
            let mut meta = lock(&self.meta);
            let mut next_meta = meta.clone();
            next_meta.revision = Revision(renumbered);
            next_meta.store(&*self.backend)?;
            *meta = next_meta;
        }
        self.next_revision.store(renumbered, Ordering::Release);
        self.revision.store(renumbered, Ordering::Release);
        self.revision_shift
            .fetch_add(i64::try_from(delta).unwrap_or(i64::MAX), Ordering::AcqRel);
        self.intent.adopt(point, own, Revision(renumbered))?;
        drop(chain);
        Ok(self.sync_point())
    }

    /// Bytes of data the head holds itself (4 KiB per block written since the last snapshot).
    pub fn head_allocated_bytes(&self) -> u64 {
        rlock(&self.chain).head.data_blocks.load(Ordering::Relaxed) * BLOCK_SIZE
    }

    // ------------------------------------------------------------------------------------------------
    // Snapshots
    // ------------------------------------------------------------------------------------------------

    /// Takes a snapshot of the volume as it is now (after an implicit flush). Atomic: after a crash
    /// either the snapshot exists or the volume is as if it was never asked for.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo, StoreError> {
        validate_snapshot_name(name)?;
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        if lock(&self.meta).snapshot_index(name).is_some() {
            return Err(StoreError::SnapshotExists(name.to_string()));
        }
        let mut chain = wlock(&self.chain);
        let old = chain.head.clone();
        // Freeze the head: data synced, log ending in a marker. The log is rewritten only when most
        // of it is superseded; otherwise the marker is appended, like a flush's. Rewriting it always
        // cost the first snapshot of a head holding 1 GiB a 6 MiB log written and synced while all
        // I/O waited (700 ms).
        let revision = Revision(self.next_revision.fetch_add(1, Ordering::AcqRel) + 1);
        if old.log_wants_compaction() {
            let blocks: Vec<(u64, BlockState)> = rlock(&self.map).blocks_of(old.id).collect();
            install_log(&*self.backend, &old, blocks.into_iter(), revision, true)
                .map_err(|e| self.fail(e))?;
        } else {
            self.append_marker(&old, revision)?;
            self.sync_layer(&old)?;
        }
        self.revision.fetch_max(revision.0, Ordering::AcqRel);
        self.intent.commit(revision, self.epoch());

        let mut meta = lock(&self.meta);
        let new_id = LayerId(meta.next_layer);
        Self::create_layer_objects(&*self.backend, new_id, self.size_bytes())?;
        let created_unix_ms = now_unix_ms();
        let mut next = meta.clone();
        next.snapshots.push(SnapshotRecord {
            layer: old.id,
            name: name.to_string(),
            created_unix_ms,
        });
        next.head = new_id;
        next.next_layer += 1;
        next.revision = revision;
        let parent = meta.snapshots.last().map(|s| s.name.clone());
        let new_head = Self::open_layer(&*self.backend, new_id, self.size_bytes())
            .and_then(|layer| {
                *lock(&layer.log) = Some(LogAppender::open(&*self.backend, &new_id.log_object(), 0, 0)?);
                Ok(layer)
            })
            .and_then(|layer| next.store(&*self.backend).map(|()| layer));
        let new_head = match new_head {
            Ok(layer) => Arc::new(layer),
            Err(e) => {
                // Not committed: the old head stays the head; the new objects are orphans.
                let _ = self.backend.remove(&new_id.data_object());
                let _ = self.backend.remove(&new_id.log_object());
                return Err(e);
            }
        };
        *meta = next;
        // Frozen: the log's appender goes, and with it any preallocated tail past its last record
        // (zeros, a clean end either way, so a crash before this truncation costs only space).
        if let Some(appender) = lock(&old.log).take() {
            let (object, len) = (appender.object.clone(), appender.len);
            drop(appender); // unmapped before the file shrinks under it
            if let Err(e) = object.truncate(len) {
                tracing::warn!(layer = %old.id, error = %e, "could not trim the frozen index log's preallocated tail");
            }
        }
        chain.layers.insert(new_id, new_head.clone());
        chain.head = new_head;
        Ok(SnapshotInfo {
            name: name.to_string(),
            created: UNIX_EPOCH + Duration::from_millis(created_unix_ms),
            parent,
            allocated_bytes: old.data_blocks.load(Ordering::Relaxed) * BLOCK_SIZE,
        })
    }

    /// The snapshots, oldest first.
    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        let chain = rlock(&self.chain);
        let meta = lock(&self.meta);
        let mut parent = None;
        meta.snapshots
            .iter()
            .map(|s| {
                let held = chain
                    .layers
                    .get(&s.layer)
                    .map_or(0, |l| l.data_blocks.load(Ordering::Relaxed));
                SnapshotInfo {
                    name: s.name.clone(),
                    created: UNIX_EPOCH + Duration::from_millis(s.created_unix_ms),
                    parent: parent.replace(s.name.clone()),
                    allocated_bytes: held * BLOCK_SIZE,
                }
            })
            .collect()
    }

    /// Deletes a snapshot by merging its blocks into its child (the next snapshot, or the head), online:
    /// reads and writes go on between merge steps. Crash-safe at every step (re-run at open).
    pub fn snapshot_delete(&self, name: &str) -> Result<(), StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        self.check_not_held([name])?;
        let merge = {
            let mut meta = lock(&self.meta);
            let i = meta
                .snapshot_index(name)
                .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))?;
            let merge = PendingMerge {
                from: meta.snapshots[i].layer,
                into: meta.snapshots.get(i + 1).map_or(meta.head, |s| s.layer),
            };
            let mut next = meta.clone();
            next.pending_merge = Some(merge);
            next.revision = next.revision.max(self.revision());
            next.store(&*self.backend)?;
            *meta = next;
            merge
        };
        self.run_merge(merge)
    }

    /// Carries out a journaled merge (see the module documentation). The caller holds `ops`.
    fn run_merge(&self, merge: PendingMerge) -> Result<(), StoreError> {
        let volume_blocks = self.size_bytes() / BLOCK_SIZE;
        let (from, into, into_is_head) = {
            let chain = rlock(&self.chain);
            (
                chain.layer(merge.from)?.clone(),
                chain.layer(merge.into)?.clone(),
                chain.head.id == merge.into,
            )
        };
        let from_blocks: Vec<(u64, BlockState)> = load_index(&*self.backend, &from, volume_blocks)?
            .blocks
            .into_vec();
        // What the child holds: for the head the map says it (the head is the newest layer); a snapshot
        // child's own index is read from its log and kept up to date here.
        let mut into_index = if into_is_head {
            None
        } else {
            let index = load_index(&*self.backend, &into, volume_blocks)?;
            *lock(&into.log) = Some(LogAppender::open_at_end(
                &*self.backend,
                &into.id.log_object(),
                false,
            )?);
            Some(BTreeMap::from_iter(index.blocks.into_vec()))
        };

        let mut block = vec![0u8; BLOCK];
        for batch in from_blocks.chunks(MERGE_BATCH_BLOCKS) {
            let chain = rlock(&self.chain);
            let _stripes = self.lock_stripes_write(batch.iter().map(|&(lba, _)| lba));
            let copies: Vec<(u64, BlockState)> = {
                let map = rlock(&self.map);
                batch
                    .iter()
                    .copied()
                    .filter(|&(lba, _)| match &into_index {
                        Some(index) => !index.contains_key(&lba),
                        None => map.get(lba).is_none_or(|e| e.layer != into.id),
                    })
                    .collect()
            };
            if copies.is_empty() {
                continue;
            }
            self.append_block_records(&into, &copies)?;
            for &(lba, state) in &copies {
                if let BlockState::Data { .. } = state {
                    // Copied as stored, CRC included: a block that was corrupt in the snapshot stays
                    // detectably corrupt rather than being silently blessed.
                    let offset = Lba(lba).byte_offset();
                    from.data
                        .read_at(&mut block, offset)
                        .map_err(StoreError::io(format!(
                            "reading {} of {} to merge it",
                            Lba(lba),
                            from.id
                        )))?;
                    into.data.write_at(&block, offset).map_err(|e| {
                        self.fail(StoreError::Io {
                            context: format!("writing {} of {}", Lba(lba), into.id),
                            source: e,
                        })
                    })?;
                }
            }
            let mut map = wlock(&self.map);
            for &(lba, state) in &copies {
                into.account(None, state);
                if map.get(lba).is_some_and(|e| e.layer == from.id) {
                    map.insert(
                        lba,
                        Entry {
                            layer: into.id,
                            state,
                        },
                    );
                }
                if let Some(index) = into_index.as_mut() {
                    index.insert(lba, state);
                }
            }
            drop(chain);
        }

        // The child now holds everything the parent contributed: make it durable before the commit.
        match into_index {
            None => {
                self.flush_unnumbered()?;
            }
            Some(index) => {
                install_log(&*self.backend, &into, index.into_iter(), self.revision(), false)
                    .map_err(|e| self.fail(e))?;
            }
        }
        {
            let mut chain = wlock(&self.chain);
            let mut meta = lock(&self.meta);
            let mut next = meta.clone();
            next.snapshots.retain(|s| s.layer != from.id);
            next.pending_merge = None;
            next.revision = next.revision.max(self.revision());
            next.store(&*self.backend)?;
            *meta = next;
            chain.layers.remove(&from.id);
            self.views.chain_changed();
        }
        for name in [from.id.data_object(), from.id.log_object()] {
            if let Err(e) = self.backend.remove(&name) {
                tracing::warn!(object = %name, error = %e, "could not remove a merged snapshot; it is removed at next open");
            }
        }
        Ok(())
    }

    /// Reverts the volume to a snapshot: a fresh empty head on top of it. The old head and every
    /// snapshot newer than it are removed (the chain is a chain, not a tree). The revision is raised.
    pub fn snapshot_revert(&self, name: &str) -> Result<(), StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        let mut chain = wlock(&self.chain);
        let mut meta = lock(&self.meta);
        let i = meta
            .snapshot_index(name)
            .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))?;
        // The snapshots newer than the target go: none of them may be held.
        if let Some((held, holders)) = meta.snapshots[i + 1..]
            .iter()
            .map(|s| (s.name.clone(), meta.holders_of(&s.name)))
            .find(|(_, holders)| !holders.is_empty())
        {
            return Err(StoreError::SnapshotHeld { name: held, holders });
        }
        let target = meta.snapshots[i].layer;
        let new_id = LayerId(meta.next_layer);
        Self::create_layer_objects(&*self.backend, new_id, self.size_bytes())?;
        let new_head = Self::open_layer(&*self.backend, new_id, self.size_bytes())?;
        *lock(&new_head.log) = Some(LogAppender::open(&*self.backend, &new_id.log_object(), 0, 0)?);

        let revision = Revision(self.next_revision.fetch_add(1, Ordering::AcqRel) + 1);
        let mut next = meta.clone();
        next.snapshots.truncate(i + 1);
        next.head = new_id;
        next.next_layer += 1;
        next.revision = revision;
        if let Err(e) = next.store(&*self.backend) {
            let _ = self.backend.remove(&new_id.data_object());
            let _ = self.backend.remove(&new_id.log_object());
            return Err(e);
        }
        *meta = next;
        drop(meta);
        self.revision.fetch_max(revision.0, Ordering::AcqRel);
        self.intent
            .reverted(revision, self.epoch())
            .map_err(|e| self.fail(e))?;
        let dropped: Vec<LayerId> = chain.layers.keys().copied().filter(|&id| id > target).collect();
        for id in &dropped {
            chain.layers.remove(id);
        }
        let new_head = Arc::new(new_head);
        chain.layers.insert(new_id, new_head.clone());
        chain.head = new_head;

        // Rebuild the merged view from the layers that remain.
        let volume_blocks = self.size_bytes() / BLOCK_SIZE;
        let mut map = MapBuilder::default();
        for (&id, layer) in &chain.layers {
            if id == new_id {
                continue;
            }
            let index = load_index(&*self.backend, layer, volume_blocks).map_err(|e| self.fail(e))?;
            map.add_layer(id, index.blocks);
        }
        *wlock(&self.map) = map.build();
        self.views.chain_changed();
        drop(chain);
        for id in dropped {
            for name in [id.data_object(), id.log_object()] {
                if let Err(e) = self.backend.remove(&name) {
                    tracing::warn!(object = %name, error = %e, "could not remove a reverted layer; it is removed at next open");
                }
            }
        }
        Ok(())
    }
}

/// Whether a read may wait for the medium ([`Store::read`]) or must give up instead
/// ([`Store::read_cached`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}
