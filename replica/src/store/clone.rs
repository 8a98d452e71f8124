//! Clones from a snapshot: a base layer filled from another volume's snapshot, and the holds that
//! keep such a snapshot alive on its source.
//!
//! ## The clone's side
//!
//! ```text
//!   head     [ . D . . T . . . ]   the clone's own writes (and snapshots of it, in between)
//!   base     [ D . . D D . ? ? ]   the source snapshot's view, copied in: filled below the cursor,
//!                        ^          partly above it ('?' = absent: not copied yet, no layer holds it)
//!                        hydrated_below
//! ```
//!
//! A clone replica is created with a **base layer** at the bottom of its chain, listed in no
//! snapshot. The base holds the source snapshot's *view* (what the source volume read when the
//! snapshot was taken), copied over the wire from a replica of the source: every clone replica
//! copies it on its own, and all three end up identical because a snapshot never changes.
//!
//! A block is **absent** while the base is being filled, the block lies at or above the cursor
//! `hydrated_below` and inside the source volume, and no layer holds it. Absent blocks are what the
//! clone may not answer from its own disk:
//!
//! * a read that touches one first fetches it from the source ([`SnapshotSource`]) into the base,
//!   then reads as usual (a read that must not wait, `Wait::No`, says so instead);
//! * a write of part of one (a read-modify-write) fetches it the same way first;
//! * a discard of one puts a tombstone in the head, as it would over any older layer's block;
//! * a checksum listing (a rebuild comparing replicas) fetches the absent blocks it covers first.
//!
//! The background copy ([`Store::fill_base`] then [`Store::advance_hydration`]) goes through the
//! source in block order and fills the base with what it holds; a block that some layer holds by
//! then (a guest write, an earlier fetch) is skipped, since the base is the bottom and only fills
//! what nothing above it has. Once the blocks below a new cursor are in the base, the base is synced
//! and the cursor is stored in `volume.meta`: a clone that restarts resumes there, and anything
//! above the cursor that did not survive is absent again and fetched again (the source has not
//! changed). The base's writes are not the guest's: they go to no write-intent record and take no
//! revision.
//!
//! When the cursor reaches the end of the source, the base becomes the clone's **oldest snapshot**
//! (named after the source snapshot, `NAME-origin` if the clone already has a snapshot of that
//! name) in one meta commit, and the clone no longer needs its source: from then on it is an
//! ordinary volume whose chain a rebuild copies like any other. Until then a clone refuses what
//! needs its whole chain -- layer reads for a rebuild that replays snapshots, a reset, reading one
//! of its snapshots for a clone of the clone -- with [`StoreError::Hydrating`]: those would copy
//! layers without the base beneath them. A delta rebuild between clone replicas (a restarted one,
//! or the reconciliation a new controller runs) needs only checksum listings and reads, which
//! fetch what they need, so it runs while they hydrate.
//!
//! ## The source's side: holds
//!
//! A clone replica **holds** the snapshot on each source replica it was given, durably (in that
//! replica's `volume.meta`), before it copies anything, and releases the holds once it is hydrated.
//! A replica refuses to delete a held snapshot, or to revert past it, with
//! [`StoreError::SnapshotHeld`] naming the holders; holds survive a reset (a rebuild replays the
//! snapshot under the same name). Reading a snapshot's view ([`Store::snapshot_runs`],
//! [`Store::read_snapshot`]) combines the indexes of the snapshot's layer and every older one, kept
//! in a one-entry cache like a rebuild's layer index, dropped whenever the chain's layers change.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_proto::VolumeId;

use super::log::{BlockState, LayerBlocks};
use super::map::{Entry, VolumeMap};
use super::meta::{CloneMeta, HoldRecord, Hydration, SnapshotRecord};
use super::types::{LayerId, Lba, BLOCK, BLOCK_SIZE};
use super::{load_index, lock, now_unix_ms, rlock, wlock, Layer, Store, StoreError, IO_CHUNK_BLOCKS};

/// Where a clone's missing blocks come from: a reader of the source snapshot's view (over the wire,
/// in the replica server). Called on blocking threads only, never under a store lock.
pub trait SnapshotSource: Send + Sync {
    /// The source snapshot's view of `count` blocks from block `first`: `count * 4096` bytes.
    fn read(&self, first: u64, count: u32) -> Result<Vec<u8>, String>;
}

/// What a clone is made from (see [`Store::create_clone`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneOrigin {
    pub source_volume: VolumeId,
    pub snapshot: String,
    pub source_size_bytes: u64,
    /// The name this replica's holds on the source carry.
    pub holder: String,
    /// The source replicas' addresses.
    pub sources: Vec<String>,
}

/// A clone's origin and progress, as [`Store::clone_status`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneStatus {
    pub origin: CloneOrigin,
    /// Bytes of the source below the cursor (copied for good).
    pub hydrated_bytes: u64,
    /// The base layer is complete and is the oldest snapshot now.
    pub hydrated: bool,
    /// Every hold on the source was released.
    pub released: bool,
}

/// One hold on a snapshot, as [`Store::holds`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub snapshot: String,
    pub holder: String,
    pub since: SystemTime,
}

/// The in-memory half of a clone's hydration (the durable half is [`Hydration`] in the meta).
#[derive(Default)]
pub(crate) struct CloneState {
    /// The base layer is being filled: absent blocks exist.
    filling: AtomicBool,
    base: AtomicU64,
    hydrated_below: AtomicU64,
    source_blocks: AtomicU64,
    source: RwLock<Option<Arc<dyn SnapshotSource>>>,
}

impl CloneState {
    pub(crate) fn from_meta(clone: Option<&CloneMeta>) -> CloneState {
        let state = CloneState::default();
        if let Some(clone) = clone {
            state
                .source_blocks
                .store(clone.source_size_bytes / BLOCK_SIZE, Ordering::Relaxed);
            if let Hydration::Filling { base, hydrated_below } = clone.hydration {
                state.base.store(u64::from(base.0), Ordering::Relaxed);
                state.hydrated_below.store(hydrated_below, Ordering::Relaxed);
                state.filling.store(true, Ordering::Release);
            }
        }
        state
    }

    pub(crate) fn filling(&self) -> bool {
        self.filling.load(Ordering::Acquire)
    }

    /// The blocks of `blocks` that may be absent (see the module docs), before the map is asked.
    fn candidates(&self, blocks: Range<u64>) -> Range<u64> {
        if !self.filling() {
            return 0..0;
        }
        let start = blocks.start.max(self.hydrated_below.load(Ordering::Acquire));
        let end = blocks.end.min(self.source_blocks.load(Ordering::Relaxed));
        start..end.max(start)
    }

    /// Whether block `lba`, which no layer holds (the caller looked it up), is absent.
    pub(crate) fn is_absent_unheld(&self, lba: u64) -> bool {
        self.candidates(lba..lba + 1).contains(&lba)
    }

    /// The absent blocks among `blocks`, in order.
    pub(crate) fn absent<'a>(
        &self,
        map: &'a VolumeMap,
        blocks: Range<u64>,
    ) -> impl Iterator<Item = u64> + 'a {
        self.candidates(blocks).filter(move |&lba| map.get(lba).is_none())
    }
}

/// Runs of consecutive blocks, at most [`IO_CHUNK_BLOCKS`] each.
fn runs_of(lbas: impl IntoIterator<Item = u64>) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for lba in lbas {
        match runs.last_mut() {
            Some(run) if run.end == lba && run.end - run.start < IO_CHUNK_BLOCKS => run.end += 1,
            _ => runs.push(lba..lba + 1),
        }
    }
    runs
}

/// A snapshot's view: its layer and every older one, newest first, each with its own index.
pub(crate) struct SnapshotView {
    layers: Vec<(Arc<Layer>, Arc<LayerBlocks>)>,
}

impl SnapshotView {
    /// The newest state of every block of `blocks` held by a layer of the view, with the index of
    /// that layer in `self.layers`, in block order.
    fn states(&self, blocks: Range<u64>) -> Vec<(u64, usize, BlockState)> {
        let mut all: Vec<(u64, usize, BlockState)> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, (_, index))| {
                index
                    .range(blocks.clone())
                    .iter()
                    .map(move |&(lba, state)| (lba, i, state))
            })
            .collect();
        // Newest layer first for each block, then keep that one.
        all.sort_unstable_by_key(|&(lba, i, _)| (lba, i));
        all.dedup_by_key(|(lba, _, _)| *lba);
        all
    }
}

/// The one snapshot view kept (see the module docs).
#[derive(Default)]
pub(crate) struct ViewCache {
    entry: Mutex<Option<(String, u64, Arc<SnapshotView>)>>,
    /// Raised whenever the chain's layers change (a merge, a revert, a reset, a promoted base).
    generation: AtomicU64,
}

impl ViewCache {
    pub(crate) fn chain_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        *lock(&self.entry) = None;
    }
}

/// The name the base layer takes when it becomes a snapshot: the source snapshot's, unless the clone
/// already has one of that name.
fn origin_name(snapshot: &str, taken: &[SnapshotRecord]) -> String {
    let free = |name: &str| taken.iter().all(|s| s.name != name);
    if free(snapshot) {
        return snapshot.to_string();
    }
    let base = format!("{snapshot}-origin");
    (1..)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|name| free(name))
        .unwrap_or(base)
}

impl Store {
    // ------------------------------------------------------------------------------------------------
    // The clone's side
    // ------------------------------------------------------------------------------------------------

    /// Where this store fetches absent blocks from (the replica server attaches a reader of the
    /// source once it has one; until then a read of an absent block fails with
    /// [`StoreError::SourceUnavailable`]).
    pub fn attach_source(&self, source: Arc<dyn SnapshotSource>) {
        *wlock(&self.clone.source) = Some(source);
    }

    /// This volume's origin and hydration, if it is a clone.
    pub fn clone_status(&self) -> Option<CloneStatus> {
        let meta = lock(&self.meta);
        let clone = meta.clone.as_ref()?;
        let (hydrated_bytes, hydrated, released) = match clone.hydration {
            Hydration::Filling { hydrated_below, .. } => (hydrated_below * BLOCK_SIZE, false, false),
            Hydration::Hydrated { released } => (clone.source_size_bytes, true, released),
        };
        Some(CloneStatus {
            origin: CloneOrigin {
                source_volume: clone.source_volume,
                snapshot: clone.snapshot.clone(),
                source_size_bytes: clone.source_size_bytes,
                holder: clone.holder.clone(),
                sources: clone.sources.clone(),
            },
            hydrated_bytes,
            hydrated,
            released,
        })
    }

    /// Whether this is a clone whose base layer is still being filled.
    pub fn is_hydrating(&self) -> bool {
        self.clone.filling()
    }

    /// Refuses with [`StoreError::Hydrating`] while the base layer is being filled: `what` needs
    /// the whole view.
    pub(crate) fn check_hydrated(&self, what: &str) -> Result<(), StoreError> {
        if self.clone.filling() {
            return Err(StoreError::Hydrating {
                detail: format!("{what} needs every block of the volume on this replica"),
            });
        }
        Ok(())
    }

    /// Fetches the absent blocks among `blocks` from the source into the base layer, so that what
    /// follows reads (or patches, or lists the checksums of) them from disk. A no-op for a volume
    /// that is not hydrating. Waits for the source: call it off the runtime's threads.
    pub fn fetch_absent(&self, blocks: Range<u64>) -> Result<(), StoreError> {
        if !self.clone.filling() {
            return Ok(());
        }
        let runs = runs_of(self.clone.absent(&rlock(&self.map), blocks).collect::<Vec<_>>());
        if runs.is_empty() {
            return Ok(());
        }
        let source = rlock(&self.clone.source)
            .clone()
            .ok_or_else(|| StoreError::SourceUnavailable {
                detail: "no source replica connected yet".into(),
            })?;
        for run in runs {
            let count = (run.end - run.start) as u32;
            let data = source
                .read(run.start, count)
                .map_err(|detail| StoreError::SourceUnavailable { detail })?;
            if data.len() != count as usize * BLOCK {
                return Err(StoreError::SourceUnavailable {
                    detail: format!(
                        "asked {count} blocks from block {}, got {} bytes",
                        run.start,
                        data.len()
                    ),
                });
            }
            self.fill_base(run.start, &data)?;
        }
        Ok(())
    }

    /// Whether any block of `blocks` is absent (a read that must not wait then cannot be served).
    pub(crate) fn any_absent(&self, blocks: Range<u64>) -> bool {
        self.clone.filling() && self.clone.absent(&rlock(&self.map), blocks).next().is_some()
    }

    /// Puts the source's view of blocks `first..` (`data`, whole blocks) into the base layer, where
    /// no layer holds them yet (see the module docs); the rest is skipped. All-zero blocks are
    /// recorded as tombstones: no data to store, and the block is no longer absent. Not durable
    /// until [`Store::advance_hydration`] passes them (a crash leaves them absent again, which
    /// costs a second fetch of the same data, nothing else). A no-op once the clone is hydrated.
    pub fn fill_base(&self, first: u64, data: &[u8]) -> Result<(), StoreError> {
        if !data.len().is_multiple_of(BLOCK) {
            return Err(StoreError::Unaligned {
                offset: first * BLOCK_SIZE,
                len: data.len() as u64,
            });
        }
        let end = first + (data.len() / BLOCK) as u64;
        if end > self.size_bytes() / BLOCK_SIZE {
            return Err(StoreError::OutOfRange {
                offset: first * BLOCK_SIZE,
                len: data.len() as u64,
                size: self.size_bytes(),
            });
        }
        self.check_not_failed()?;
        let chain = rlock(&self.chain);
        if !self.clone.filling() {
            return Ok(());
        }
        let base = chain
            .layer(LayerId(self.clone.base.load(Ordering::Acquire) as u32))?
            .clone();
        for piece in (first..end).step_by(IO_CHUNK_BLOCKS as usize) {
            let piece = piece..end.min(piece + IO_CHUNK_BLOCKS);
            let _stripes = self.write_stripes(piece.clone());
            let fills: Vec<(u64, BlockState)> = {
                let map = rlock(&self.map);
                self.clone
                    .absent(&map, piece.clone())
                    .map(|lba| {
                        let at = (lba - first) as usize * BLOCK;
                        let block = &data[at..at + BLOCK];
                        let state = if block.iter().all(|&b| b == 0) {
                            BlockState::Tombstone
                        } else {
                            BlockState::Data {
                                crc: crc32fast::hash(block),
                            }
                        };
                        (lba, state)
                    })
                    .collect()
            };
            if fills.is_empty() {
                continue;
            }
            self.append_block_records(&base, &fills)?;
            let data_runs = runs_of(
                fills
                    .iter()
                    .filter(|(_, s)| matches!(s, BlockState::Data { .. }))
                    .map(|&(lba, _)| lba),
            );
            for run in data_runs {
                let bytes = &data[(run.start - first) as usize * BLOCK..(run.end - first) as usize * BLOCK];
                base.data
                    .write_at(bytes, Lba(run.start).byte_offset())
                    .map_err(|e| {
                        self.fail(StoreError::Io {
                            context: format!("writing {}..{} of the base {}", run.start, run.end, base.id),
                            source: e,
                        })
                    })?;
            }
            let mut map = wlock(&self.map);
            for &(lba, state) in &fills {
                map.insert(
                    lba,
                    Entry {
                        layer: base.id,
                        state,
                    },
                );
                base.account(None, state);
            }
        }
        Ok(())
    }

    /// Makes the base layer durable and moves the cursor to block `to`, durably: every block of the
    /// source's view below it must be in the base (the caller filled them with [`Store::fill_base`]).
    /// At the end of the source, the base becomes the oldest snapshot and the clone is hydrated.
    /// Returns whether it is.
    pub fn advance_hydration(&self, to: u64) -> Result<bool, StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        if !self.clone.filling() {
            return Ok(true);
        }
        let source_blocks = self.clone.source_blocks.load(Ordering::Relaxed);
        let to = to.min(source_blocks);
        if to < self.clone.hydrated_below.load(Ordering::Acquire) {
            return Ok(false);
        }
        let base = {
            // Exclusive only while the marker is appended: no fill is then between its record and
            // its data (the same rule as a flush's).
            let chain = wlock(&self.chain);
            let base = chain
                .layer(LayerId(self.clone.base.load(Ordering::Acquire) as u32))?
                .clone();
            self.append_marker(&base, self.revision())?;
            base
        };
        self.sync_layer(&base)?;
        let done = to == source_blocks;
        let mut meta = lock(&self.meta);
        let mut next = meta.clone();
        let Some(clone) = next.clone.as_mut() else {
            return Ok(true);
        };
        if done {
            let name = origin_name(&clone.snapshot, &next.snapshots);
            clone.hydration = Hydration::Hydrated { released: false };
            next.snapshots.insert(
                0,
                SnapshotRecord {
                    layer: base.id,
                    name: name.clone(),
                    created_unix_ms: now_unix_ms(),
                },
            );
            tracing::info!(snapshot = %name, "clone hydrated: its base layer is now its oldest snapshot");
        } else {
            clone.hydration = Hydration::Filling {
                base: base.id,
                hydrated_below: to,
            };
        }
        next.revision = next.revision.max(self.revision());
        next.store(&*self.backend)?;
        *meta = next;
        drop(meta);
        self.clone.hydrated_below.store(to, Ordering::Release);
        if done {
            self.clone.filling.store(false, Ordering::Release);
            // Frozen, like a snapshot's: no appender, no preallocated tail.
            if let Some(appender) = lock(&base.log).take() {
                let (object, len) = (appender.object.clone(), appender.len);
                drop(appender);
                if let Err(e) = object.truncate(len) {
                    tracing::warn!(layer = %base.id, error = %e, "could not trim the base log's preallocated tail");
                }
            }
            self.views.chain_changed();
        }
        Ok(done)
    }

    /// Records, durably, that every hold this clone had on its source was released.
    pub fn mark_source_released(&self) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        let mut next = meta.clone();
        match next.clone.as_mut() {
            Some(clone) if matches!(clone.hydration, Hydration::Hydrated { released: false }) => {
                clone.hydration = Hydration::Hydrated { released: true };
            }
            _ => return Ok(()),
        }
        next.store(&*self.backend)?;
        *meta = next;
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------
    // The source's side
    // ------------------------------------------------------------------------------------------------

    /// Holds snapshot `name` for `holder`, durably (see the module docs). Idempotent.
    pub fn snapshot_hold(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let _ops = lock(&self.ops);
        let mut meta = lock(&self.meta);
        if meta.snapshot_index(name).is_none() {
            return Err(StoreError::NoSuchSnapshot(name.to_string()));
        }
        if meta
            .holds
            .iter()
            .any(|h| h.snapshot == name && h.holder == holder)
        {
            return Ok(());
        }
        let mut next = meta.clone();
        next.holds.push(HoldRecord {
            snapshot: name.to_string(),
            holder: holder.to_string(),
            since_unix_ms: now_unix_ms(),
        });
        next.store(&*self.backend)?;
        *meta = next;
        Ok(())
    }

    /// Releases `holder`'s hold on `name`, durably; returns whether there was one.
    pub fn snapshot_release(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let _ops = lock(&self.ops);
        let mut meta = lock(&self.meta);
        let mut next = meta.clone();
        next.holds.retain(|h| !(h.snapshot == name && h.holder == holder));
        if next.holds.len() == meta.holds.len() {
            return Ok(false);
        }
        next.store(&*self.backend)?;
        *meta = next;
        Ok(true)
    }

    /// Every hold on this volume's snapshots.
    pub fn holds(&self) -> Vec<Hold> {
        lock(&self.meta)
            .holds
            .iter()
            .map(|h| Hold {
                snapshot: h.snapshot.clone(),
                holder: h.holder.clone(),
                since: UNIX_EPOCH + Duration::from_millis(h.since_unix_ms),
            })
            .collect()
    }

    /// Refuses unless no snapshot among `names` is held.
    pub(crate) fn check_not_held<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), StoreError> {
        let meta = lock(&self.meta);
        for name in names {
            let holders = meta.holders_of(name);
            if !holders.is_empty() {
                return Err(StoreError::SnapshotHeld {
                    name: name.to_string(),
                    holders,
                });
            }
        }
        Ok(())
    }

    /// Snapshot `name`'s view, from the cache or from the logs of its layers.
    fn snapshot_view(&self, name: &str) -> Result<Arc<SnapshotView>, StoreError> {
        self.check_hydrated("reading a snapshot's view")?;
        let generation = self.views.generation.load(Ordering::Acquire);
        if let Some((cached, at, view)) = lock(&self.views.entry).as_ref() {
            if cached == name && *at == generation {
                return Ok(view.clone());
            }
        }
        // No merge appends to a log while `ops` is held (see `layers`).
        let _ops = lock(&self.ops);
        let generation = self.views.generation.load(Ordering::Acquire);
        let layers: Vec<Arc<Layer>> = {
            let chain = rlock(&self.chain);
            let meta = lock(&self.meta);
            let i = meta
                .snapshot_index(name)
                .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))?;
            meta.snapshots[..=i]
                .iter()
                .rev()
                .map(|s| chain.layer(s.layer).cloned())
                .collect::<Result<_, _>>()?
        };
        let volume_blocks = self.size_bytes() / BLOCK_SIZE;
        let layers = layers
            .into_iter()
            .map(|layer| {
                let index = load_index(&*self.backend, &layer, volume_blocks)?;
                Ok((layer, Arc::new(index.blocks)))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let view = Arc::new(SnapshotView { layers });
        *lock(&self.views.entry) = Some((name.to_string(), generation, view.clone()));
        Ok(view)
    }

    /// The runs of blocks holding data in snapshot `name`'s view among `blocks` (at most
    /// `max_blocks` of the range are looked at), and the block up to which the listing is
    /// complete.
    pub fn snapshot_runs(
        &self,
        name: &str,
        blocks: Range<u64>,
        max_blocks: u64,
    ) -> Result<(Vec<Range<u64>>, u64), StoreError> {
        let view = self.snapshot_view(name)?;
        let volume_blocks = self.size_bytes() / BLOCK_SIZE;
        let end = blocks
            .end
            .min(volume_blocks)
            .min(blocks.start.saturating_add(max_blocks.max(1)));
        let start = blocks.start.min(end);
        let data = view
            .states(start..end)
            .into_iter()
            .filter(|(_, _, s)| matches!(s, BlockState::Data { .. }))
            .map(|(lba, _, _)| lba);
        let mut runs: Vec<Range<u64>> = Vec::new();
        for lba in data {
            match runs.last_mut() {
                Some(run) if run.end == lba => run.end += 1,
                _ => runs.push(lba..lba + 1),
            }
        }
        Ok((runs, end))
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 4096) of snapshot `name`'s view: what
    /// the volume read when the snapshot was taken, every block checked against its CRC32.
    pub fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.check_range(offset, buf.len() as u64)?;
        if !offset.is_multiple_of(BLOCK_SIZE) || !buf.len().is_multiple_of(BLOCK) {
            return Err(StoreError::Unaligned {
                offset,
                len: buf.len() as u64,
            });
        }
        let view = self.snapshot_view(name)?;
        let first = offset / BLOCK_SIZE;
        let end = first + (buf.len() / BLOCK) as u64;
        buf.fill(0);
        let states = view.states(first..end);
        let mut i = 0;
        while i < states.len() {
            let (lba, layer, BlockState::Data { .. }) = states[i] else {
                i += 1;
                continue;
            };
            // One pread for a run of blocks held by the same layer.
            let mut j = i + 1;
            while j < states.len()
                && states[j].0 == states[j - 1].0 + 1
                && states[j].1 == layer
                && matches!(states[j].2, BlockState::Data { .. })
            {
                j += 1;
            }
            let stop = states[j - 1].0 + 1;
            let out = &mut buf[(lba - first) as usize * BLOCK..(stop - first) as usize * BLOCK];
            // The run holds data blocks only (the loop above stops at anything else).
            let crcs = states[i..j].iter().filter_map(|&(block, _, state)| match state {
                BlockState::Data { crc } => Some((block, crc)),
                BlockState::Tombstone => None,
            });
            super::layers::read_run_checked(&view.layers[layer].0, lba, out, crcs)?;
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
