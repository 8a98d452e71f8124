//! What a rebuild or a resync asks of a store: which ranges hold data, the CRCs of blocks, and which
//! regions were written since a sync point (the write-intent record, [`super::intent`]).

use std::ops::Range;
use std::sync::atomic::Ordering;

use basalt_proto::frame::{SyncPoint, WrittenAnswer};
use basalt_proto::Revision;

use super::{lock, map, rlock, wlock, BlockState, Entry, Record, Store, StoreError, BLOCK_SIZE};

/// Largest range that [`Store::block_crcs_in`] lists by looking each block up rather than by a range
/// of the ordered entries: a range lists only the blocks it holds, so a long, sparse one is cheaper
/// that way, while a short one costs a search of the ordered entries per range.
const POINT_LISTED_BLOCKS: u64 = 64;

impl Store {
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
    /// another, and then looks every block it lists up in the hash table anyway, for its CRC. For a
    /// record's thousands of regions of a block or two those waits add up to milliseconds (the more
    /// so on a replica that never restarted, whose ordered entries are all in a B-tree).
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
    /// under (see `intent`).
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
}
