//! One snapshot layer at a time: what a rebuild needs to copy a chain, and the reset before it.
//!
//! A rebuild whose target holds another chain than its source resets the target
//! ([`Store::reset`]) and replays the source's chain onto it, oldest snapshot first:
//!
//! ```text
//!   source                                   target (after reset: one empty head)
//!   snap a [ D D . . ]  --layer_blocks(a)-->  head [ D D . . ]   --snapshot_create(a)-->  a
//!          read_layer(a) for the D runs       (a T is replayed as write zeros + unmap)
//!   snap b [ T . D . ]  --layer_blocks(b)-->  head [ T . D . ]   --snapshot_create(b)-->  b
//! ```
//!
//! Replaying each layer's *own* blocks -- data and tombstones alike -- rebuilds every layer exactly,
//! so every snapshot's view matches too, and no extra ("system") snapshot is ever created.
//!
//! ## Where a layer's index comes from
//!
//! The merged [`VolumeMap`] only knows the newest layer of each block; what an older snapshot holds
//! itself lives on disk, in its index log. [`Store::layer_blocks`] and [`Store::read_layer`] read and
//! parse that log ([`load_index`]) and keep the result in a one-entry cache, [`LayerIndexCache`]: a
//! rebuild asks about one layer at a time, page after page and read after read, and parsing the whole
//! log for every 1 MiB read would cost time in the square of the layer's size. Only one layer's index
//! is ever held (at most as large as the merged map already is), and it is replaced when another
//! layer is asked for.
//!
//! A snapshot's index changes only when a snapshot delete merges its parent into it, and such a merge
//! only *adds* blocks the snapshot did not hold, so it raises the layer's held-block counters. The
//! cache entry remembers the counters it was loaded at and is reloaded when they moved; it is loaded
//! under the `ops` lock, so never while a merge is appending to the log it reads.
//!
//! Reading a layer needs no stripe lock: the blocks a snapshot holds are never rewritten (a merge
//! into it writes only blocks it did not hold, which [`Store::read_layer`] answers as zeros from the
//! index it has), and a layer dropped meanwhile stays readable through its open data object.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use basalt_proto::frame::{LayerBlock, LayerBlockState};
use basalt_proto::Revision;

use super::log::{BlockState, LayerBlocks};
use super::map::VolumeMap;
use super::types::{LayerId, Lba, BLOCK, BLOCK_SIZE};
use super::{load_index, lock, rlock, wlock, Chain, Layer, LogAppender, Store, StoreError};

/// The blocks one layer holds itself, shared between the cache and its readers.
type OwnBlocks = Arc<LayerBlocks>;

/// A snapshot's own blocks in a range, as [`Store::layer_blocks`] lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerListing {
    /// The blocks the layer holds itself, in block order.
    pub blocks: Vec<LayerBlock>,
    /// The listing is complete for every block below this one; a caller paging through a layer
    /// asks again from here.
    pub end_lba: u64,
}

/// The parsed index of the one layer a rebuild is copying (see the module documentation).
#[derive(Default)]
pub(crate) struct LayerIndexCache(Mutex<Option<CachedIndex>>);

struct CachedIndex {
    layer: LayerId,
    /// The layer's held-block count (data + tombstones) when the index was loaded.
    held: u64,
    blocks: OwnBlocks,
}

impl LayerIndexCache {
    fn get(&self, layer: &Layer) -> Option<OwnBlocks> {
        lock(&self.0)
            .as_ref()
            .filter(|c| c.layer == layer.id && c.held == held(layer))
            .map(|c| c.blocks.clone())
    }

    fn clear(&self) {
        *lock(&self.0) = None;
    }
}

/// Blocks a layer holds (data and tombstones), from its counters.
fn held(layer: &Layer) -> u64 {
    layer.data_blocks.load(Ordering::Relaxed) + layer.tombstones.load(Ordering::Relaxed)
}

fn wire_state(state: BlockState) -> LayerBlockState {
    match state {
        BlockState::Data { crc } => LayerBlockState::Data { crc },
        BlockState::Tombstone => LayerBlockState::Tombstone,
    }
}

impl Store {
    /// The layer of snapshot `name`.
    fn snapshot_layer(&self, name: &str) -> Result<Arc<Layer>, StoreError> {
        let chain = rlock(&self.chain);
        let meta = lock(&self.meta);
        let i = meta
            .snapshot_index(name)
            .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))?;
        chain.layer(meta.snapshots[i].layer).cloned()
    }

    /// Snapshot `name`'s layer and its own index, from the cache or from its log.
    fn snapshot_index(&self, name: &str) -> Result<(Arc<Layer>, OwnBlocks), StoreError> {
        // A snapshot of a hydrating clone reads through to a base layer that has holes, which a
        // rebuild replaying the snapshot's own layer would not copy (see `clone`).
        self.check_hydrated("copying a snapshot layer")?;
        let layer = self.snapshot_layer(name)?;
        if let Some(blocks) = self.layer_indexes.get(&layer) {
            return Ok((layer, blocks));
        }
        // No merge appends to a log while `ops` is held; and the snapshot may have been merged away
        // while we waited for it, so look it up again.
        let _ops = lock(&self.ops);
        let layer = self.snapshot_layer(name)?;
        let held_before = held(&layer);
        let index = load_index(&*self.backend, &layer, self.size_bytes() / BLOCK_SIZE)?;
        let blocks = Arc::new(index.blocks);
        *lock(&self.layer_indexes.0) = Some(CachedIndex {
            layer: layer.id,
            held: held_before,
            blocks: blocks.clone(),
        });
        Ok((layer, blocks))
    }

    /// The blocks snapshot `snapshot` holds itself (not what it inherits from older snapshots) among
    /// `blocks`, in block order, data with its CRC32 and tombstones; at most `limit` of them (at least
    /// one). [`LayerListing::end_lba`] says how far the listing got. Costs no data I/O: the index
    /// comes from the layer's log (see the module documentation).
    pub fn layer_blocks(
        &self,
        snapshot: &str,
        blocks: Range<u64>,
        limit: usize,
    ) -> Result<LayerListing, StoreError> {
        let (_, index) = self.snapshot_index(snapshot)?;
        let end = blocks.end.min(self.size_bytes() / BLOCK_SIZE).max(blocks.start);
        let limit = limit.max(1);
        let mut listed = Vec::new();
        for &(lba, state) in index.range(blocks.start..end) {
            if listed.len() == limit {
                return Ok(LayerListing {
                    blocks: listed,
                    end_lba: lba,
                });
            }
            listed.push(LayerBlock {
                lba,
                state: wire_state(state),
            });
        }
        Ok(LayerListing {
            blocks: listed,
            end_lba: end,
        })
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512) from snapshot `snapshot`'s own
    /// layer: the blocks it holds as data, each checked against its CRC32 (a mismatch is
    /// [`StoreError::ChecksumMismatch`]), and zeros for every other block, whatever older layers hold.
    pub fn read_layer(&self, snapshot: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (layer, index) = self.snapshot_index(snapshot)?;
        let first = offset / BLOCK_SIZE;
        let end = (offset + buf.len() as u64).div_ceil(BLOCK_SIZE);
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && buf.len().is_multiple_of(BLOCK);
        let mut scratch = Vec::new();
        let blocks: &mut [u8] = if aligned {
            buf
        } else {
            scratch.resize(((end - first) * BLOCK_SIZE) as usize, 0);
            &mut scratch
        };
        read_layer_blocks(&layer, &index, first, blocks)?;
        if !aligned {
            let within = (offset - first * BLOCK_SIZE) as usize;
            buf.copy_from_slice(&scratch[within..within + buf.len()]);
        }
        Ok(())
    }

    /// Drops every snapshot and the head and starts over with one empty head, keeping the volume's id,
    /// size and epoch. The revision starts again at 0: the replica now holds nothing, so it must not
    /// look up to date to a controller choosing among replicas.
    ///
    /// Crash-safe: the new head's objects are created first, then one atomic meta replace switches to
    /// the new chain; the old layers' objects are removed after it (any left over by a crash are
    /// orphans, removed at open). I/O waits while the chain is swapped and then goes to the new head.
    pub fn reset(&self) -> Result<(), StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        // A hydrating clone's base layer would go with everything else, and nothing would bring
        // it back: a rebuild replays snapshots, and the base is none yet.
        self.check_hydrated("a reset")?;
        let mut chain = wlock(&self.chain);
        let mut meta = lock(&self.meta);
        let new_id = LayerId(meta.next_layer);
        Self::create_layer_objects(&*self.backend, new_id, self.size_bytes())?;
        let new_head = Self::open_layer(&*self.backend, new_id, self.size_bytes()).and_then(|layer| {
            *lock(&layer.log) = Some(LogAppender::open(&*self.backend, &new_id.log_object(), 0, 0)?);
            Ok(layer)
        });
        let mut next = meta.clone();
        next.snapshots.clear();
        next.head = new_id;
        next.next_layer += 1;
        next.pending_merge = None;
        next.revision = Revision(0);
        let committed = new_head.and_then(|layer| next.store(&*self.backend).map(|()| layer));
        let new_head = match committed {
            Ok(layer) => Arc::new(layer),
            Err(e) => {
                // Not committed: the old chain stays; the new objects are orphans.
                let _ = self.backend.remove(&new_id.data_object());
                let _ = self.backend.remove(&new_id.log_object());
                return Err(e);
            }
        };
        *meta = next;
        drop(meta);
        self.revision.store(0, Ordering::Release);
        self.next_revision.store(0, Ordering::Release);
        // Holding nothing, it is in sync with nobody.
        self.intent.reset().map_err(|e| self.fail(e))?;
        let old = std::mem::replace(
            &mut *chain,
            Chain {
                layers: BTreeMap::from([(new_id, new_head.clone())]),
                head: new_head,
            },
        );
        *wlock(&self.map) = VolumeMap::default();
        self.layer_indexes.clear();
        self.views.chain_changed();
        drop(chain);
        for id in old.layers.keys() {
            for name in [id.data_object(), id.log_object()] {
                if let Err(e) = self.backend.remove(&name) {
                    tracing::warn!(object = %name, error = %e, "could not remove a layer dropped by a reset; it is removed at next open");
                }
            }
        }
        Ok(())
    }
}

/// Reads one run of consecutive data blocks of `layer`, starting at block `start`, into `bytes` with one
/// `pread`, and checks each block against its CRC (`crcs`: the run's blocks in order, with their CRCs).
pub(super) fn read_run_checked(
    layer: &Layer,
    start: u64,
    bytes: &mut [u8],
    crcs: impl Iterator<Item = (u64, u32)>,
) -> Result<(), StoreError> {
    let stop = start + (bytes.len() / BLOCK) as u64;
    layer
        .data
        .read_at(bytes, Lba(start).byte_offset())
        .map_err(StoreError::io(format!(
            "reading {}..{stop} of {}",
            Lba(start),
            layer.id
        )))?;
    for (k, (lba, crc)) in crcs.enumerate() {
        if crc32fast::hash(&bytes[k * BLOCK..(k + 1) * BLOCK]) != crc {
            return Err(StoreError::ChecksumMismatch { lba });
        }
    }
    Ok(())
}

/// Reads whole blocks `first..` of one layer into `out`: runs of data blocks with one `pread` each,
/// every block checked against its CRC, zeros for blocks the layer does not hold as data.
fn read_layer_blocks(
    layer: &Layer,
    index: &LayerBlocks,
    first: u64,
    out: &mut [u8],
) -> Result<(), StoreError> {
    let n = (out.len() / BLOCK) as u64;
    out.fill(0);
    let data: Vec<(u64, u32)> = index
        .range(first..first + n)
        .iter()
        .filter_map(|&(lba, state)| match state {
            BlockState::Data { crc } => Some((lba, crc)),
            BlockState::Tombstone => None,
        })
        .collect();
    let mut i = 0;
    while i < data.len() {
        let mut j = i + 1;
        while j < data.len() && data[j].0 == data[j - 1].0 + 1 {
            j += 1;
        }
        let (start, stop) = (data[i].0, data[j - 1].0 + 1);
        let bytes = &mut out[((start - first) as usize) * BLOCK..((stop - first) as usize) * BLOCK];
        read_run_checked(layer, start, bytes, data[i..j].iter().copied())?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::{Epoch, VolumeId};

    const MIB: u64 = 1 << 20;

    fn block(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK]
    }

    fn data(byte: u8) -> LayerBlockState {
        LayerBlockState::Data {
            crc: crc32fast::hash(&block(byte)),
        }
    }

    fn listing(store: &Store, snapshot: &str) -> Vec<(u64, LayerBlockState)> {
        store
            .layer_blocks(snapshot, 0..u64::MAX, usize::MAX)
            .unwrap()
            .blocks
            .into_iter()
            .map(|b| (b.lba, b.state))
            .collect()
    }

    /// a = {0: 0xa0, 1: 0xa1, 3: 0xa3}; b = {0: tombstone, 1: 0xb1, 5: 0xb5}; head = {9: 0xc9}.
    fn two_snapshots(dir: &std::path::Path) -> Store {
        let store = Store::create(dir, VolumeId::random(), 4 * MIB).unwrap();
        for (lba, byte) in [(0u64, 0xa0u8), (1, 0xa1), (3, 0xa3)] {
            store.write(lba * BLOCK_SIZE, &block(byte)).unwrap();
        }
        store.snapshot_create("a").unwrap();
        store.unmap(0, BLOCK_SIZE).unwrap();
        for (lba, byte) in [(1u64, 0xb1u8), (5, 0xb5)] {
            store.write(lba * BLOCK_SIZE, &block(byte)).unwrap();
        }
        store.snapshot_create("b").unwrap();
        store.write(9 * BLOCK_SIZE, &block(0xc9)).unwrap();
        store
    }

    #[test]
    fn layer_blocks_lists_only_what_each_snapshot_holds_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        assert_eq!(
            listing(&store, "a"),
            vec![(0, data(0xa0)), (1, data(0xa1)), (3, data(0xa3))]
        );
        assert_eq!(
            listing(&store, "b"),
            vec![(0, LayerBlockState::Tombstone), (1, data(0xb1)), (5, data(0xb5))]
        );
    }

    #[test]
    fn a_layer_listing_pages_through_the_layer_and_says_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        let page = store.layer_blocks("a", 0..1024, 2).unwrap();
        assert_eq!(page.blocks.iter().map(|b| b.lba).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(
            page.end_lba, 3,
            "the next page starts at the first block not listed"
        );
        let page = store.layer_blocks("a", page.end_lba..1024, 2).unwrap();
        assert_eq!(page.blocks.iter().map(|b| b.lba).collect::<Vec<_>>(), [3]);
        assert_eq!(page.end_lba, 1024);
        let beyond = store.layer_blocks("a", 0..u64::MAX, 10).unwrap();
        assert_eq!(beyond.end_lba, 1024, "a listing stops at the end of the volume");
        let zero = store.layer_blocks("a", 0..1024, 0).unwrap();
        assert_eq!(zero.blocks.len(), 1, "a limit of 0 still makes progress");
    }

    #[test]
    fn read_layer_returns_the_layers_own_data_and_zeros_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        let mut buf = vec![0xffu8; 6 * BLOCK];
        store.read_layer("b", 0, &mut buf).unwrap();
        let blocks: Vec<&[u8]> = buf.chunks(BLOCK).collect();
        assert_eq!(blocks[0], block(0), "a tombstone reads as zeros");
        assert_eq!(blocks[1], block(0xb1));
        assert_eq!(blocks[3], block(0), "block 3 is a's, not b's");
        assert_eq!(blocks[5], block(0xb5));
        // A sector inside a block, and a read of the older layer.
        let mut sector = vec![0u8; 512];
        store.read_layer("a", 3 * BLOCK_SIZE + 1024, &mut sector).unwrap();
        assert!(sector.iter().all(|&b| b == 0xa3));
        assert!(matches!(
            store.read_layer("a", 100, &mut sector),
            Err(StoreError::Unaligned { .. })
        ));
        assert!(matches!(
            store.read_layer("nope", 0, &mut sector),
            Err(StoreError::NoSuchSnapshot(_))
        ));
        assert!(matches!(
            store.layer_blocks("head", 0..10, 10),
            Err(StoreError::NoSuchSnapshot(_))
        ));
    }

    #[test]
    fn read_layer_reports_a_corrupt_snapshot_block_as_a_checksum_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        let layer = store.snapshot_layer("a").unwrap().id;
        let path = dir.path().join(layer.data_object());
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, &[0x55; 16], 3 * BLOCK_SIZE + 100).unwrap();
        let mut buf = vec![0u8; 4 * BLOCK];
        assert!(matches!(
            store.read_layer("a", 0, &mut buf),
            Err(StoreError::ChecksumMismatch { lba: 3 })
        ));
    }

    #[test]
    fn a_merge_into_a_snapshot_is_seen_by_the_next_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        assert_eq!(listing(&store, "b").len(), 3, "b's index is now cached");
        store.snapshot_delete("a").unwrap();
        // a's block 3 moved into b; b's own tombstone on 0 and block 1 win over a's.
        assert_eq!(
            listing(&store, "b"),
            vec![
                (0, LayerBlockState::Tombstone),
                (1, data(0xb1)),
                (3, data(0xa3)),
                (5, data(0xb5))
            ]
        );
        let mut buf = vec![0u8; BLOCK];
        store.read_layer("b", 3 * BLOCK_SIZE, &mut buf).unwrap();
        assert_eq!(buf, block(0xa3));
    }

    #[test]
    fn reset_drops_every_layer_keeps_the_identity_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        store.set_epoch(Epoch(7)).unwrap();
        store.flush().unwrap();
        let volume = store.volume_id();
        store.reset().unwrap();
        assert!(store.snapshot_list().is_empty());
        assert_eq!(
            store.revision(),
            Revision(0),
            "an empty replica is not up to date"
        );
        assert_eq!(store.epoch(), Epoch(7));
        assert!(store.allocated_ranges().is_empty());
        let mut buf = vec![0xffu8; 10 * BLOCK];
        store.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "every block reads as zeros");
        assert!(matches!(
            store.layer_blocks("a", 0..10, 10),
            Err(StoreError::NoSuchSnapshot(_))
        ));
        let layers: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| LayerId::of_object(n).is_some())
            .collect();
        assert_eq!(
            layers.len(),
            2,
            "only the new head's data and log remain: {layers:?}"
        );

        // The store goes on as a fresh one, and the reset is durable.
        store.write(2 * BLOCK_SIZE, &block(0xd2)).unwrap();
        store.snapshot_create("a").unwrap();
        let revision = store.flush().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.volume_id(), volume);
        assert_eq!(store.epoch(), Epoch(7));
        assert_eq!(store.revision(), revision);
        assert_eq!(listing(&store, "a"), vec![(2, data(0xd2))]);
        store.read(0, &mut buf).unwrap();
        assert_eq!(&buf[2 * BLOCK..3 * BLOCK], &block(0xd2)[..]);
        assert!(buf[..2 * BLOCK].iter().chain(&buf[3 * BLOCK..]).all(|&b| b == 0));
    }

    /// The two crash windows of a reset: before its meta commit the new head's objects are orphans,
    /// after it the old layers' objects are; either way open removes them and keeps the committed chain.
    #[test]
    fn a_reset_interrupted_on_either_side_of_its_commit_opens_cleanly() {
        let layer_objects = |dir: &std::path::Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| LayerId::of_object(n).is_some())
                .collect();
            names.sort();
            names
        };
        // Crashed before the commit: the new head was created, the meta still names the old chain.
        let dir = tempfile::tempdir().unwrap();
        let store = two_snapshots(dir.path());
        store.flush().unwrap();
        let before = layer_objects(dir.path());
        let next = LayerId(lock(&store.meta).next_layer);
        Store::create_layer_objects(&*store.backend, next, store.size_bytes()).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(layer_objects(dir.path()), before, "the uncommitted head is gone");
        assert_eq!(listing(&store, "b").len(), 3, "the old chain is intact");

        // Crashed after the commit: the old layers' objects are still there.
        let saved: Vec<(String, Vec<u8>)> = before
            .iter()
            .map(|n| (n.clone(), std::fs::read(dir.path().join(n)).unwrap()))
            .collect();
        store.reset().unwrap();
        let after = layer_objects(dir.path());
        drop(store);
        for (name, bytes) in saved {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            layer_objects(dir.path()),
            after,
            "the dropped layers' objects are removed at open"
        );
        assert!(store.snapshot_list().is_empty());
        assert!(store.allocated_ranges().is_empty());
    }

    #[test]
    fn replaying_each_layer_onto_a_reset_store_reproduces_the_chain_exactly() {
        let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = two_snapshots(src_dir.path());
        // A tombstone over nothing at all: the head wrote block 7 and discarded it before `c`.
        source.write(7 * BLOCK_SIZE, &block(0x77)).unwrap();
        source.unmap(7 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
        source.snapshot_create("c").unwrap();
        let target = Store::create(dst_dir.path(), source.volume_id(), 4 * MIB).unwrap();
        target.write(0, &block(0xee)).unwrap();
        target.snapshot_create("stale").unwrap();
        target.reset().unwrap();

        for snapshot in source.snapshot_list() {
            for (lba, state) in listing(&source, &snapshot.name) {
                let offset = lba * BLOCK_SIZE;
                match state {
                    LayerBlockState::Data { .. } => {
                        let mut buf = block(0);
                        source.read_layer(&snapshot.name, offset, &mut buf).unwrap();
                        target.write(offset, &buf).unwrap();
                    }
                    // Zeros first, so the head holds the block and the unmap records a tombstone
                    // even where no older layer holds it.
                    LayerBlockState::Tombstone => {
                        target.write(offset, &block(0)).unwrap();
                        target.unmap(offset, BLOCK_SIZE).unwrap();
                    }
                }
            }
            target.snapshot_create(&snapshot.name).unwrap();
        }
        let names = |s: &Store| s.snapshot_list().into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(&target), ["a", "b", "c"]);
        for name in ["a", "b", "c"] {
            assert_eq!(listing(&target, name), listing(&source, name), "layer {name}");
        }
        assert_eq!(
            listing(&target, "c"),
            vec![(7, LayerBlockState::Tombstone), (9, data(0xc9))]
        );
    }
}
