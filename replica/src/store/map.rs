//! The merged volume map: for every block ever written, the newest layer that holds it.
//!
//! A read is one lookup here, whatever the depth of the chain (Longhorn and Jiva keep one byte or two
//! per block of the *volume*, 256 MiB per TiB, and cap the chain at 254/1024 layers). Memory follows
//! what was written: a `BTreeMap` entry (~30 bytes with node overhead) per written or discarded block,
//! nothing for blocks never touched, so a 64 TiB thin volume with 1 GiB written needs about 8 MiB.
//!
//! The CRC is kept here so a read can verify a block without touching the index log.
//!
//! ## Two indexes of the same entries
//!
//! Range queries (multi-block reads, unmap, rebuild listings, log compaction) need order, so the
//! entries live in a `BTreeMap`. But a 4 KiB read is one point lookup, and descending a B-tree of
//! a few hundred thousand entries costs several cache misses: measured at a third of a cached 4 KiB
//! `pread`, more than its CRC32. So point lookups go to [`PointIndex`], a hash table of the same
//! entries whose 16-byte slots hold key and value together: a lookup is one cache line, where
//! `HashMap` touches two (control bytes, then the slot). Entries are never removed (a revert builds
//! a new map), which is what makes plain linear probing enough. The price is memory, about twice
//! the B-tree alone (~60 bytes per written block), still following what was written.
//!
//! The point index is the authority on a block's CRC. The B-tree is right about which blocks are
//! listed, in which layer, with data or a tombstone, but an overwrite that changes only the CRC
//! (the same layer, data before and after: every rewrite of a block of the head) updates the point
//! index alone, so a single 4 KiB write costs no B-tree descent (~6% of its CPU). What lists entries
//! in order takes each CRC from the point index.

use std::collections::BTreeMap;
use std::ops::Range;

use super::log::{replay_in_place, BlockState, LayerBlocks};
use super::types::LayerId;

/// The newest state of one block and the layer that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub layer: LayerId,
    pub state: BlockState,
}

/// An open-addressing hash table `lba -> Entry` with linear probing and no removal.
///
/// A slot is two words: the key word is the block number with [`TOMBSTONE_BIT`] set for a
/// tombstone ([`EMPTY`] for a free slot: no block number reaches 2^63), the value word the layer id
/// (high half) and the CRC32 (low half).
#[derive(Debug, Default)]
struct PointIndex {
    /// A power of two of slots (or none before the first insert).
    slots: Vec<[u64; 2]>,
    len: usize,
}

/// Key word of a free slot.
const EMPTY: u64 = u64::MAX;
/// Set in the key word of a tombstone's slot. Block numbers stay below 2^38 (1 PiB volumes).
const TOMBSTONE_BIT: u64 = 1 << 63;
/// Slots of the first table.
const MIN_SLOTS: usize = 1024;

/// Where `lba`'s probe starts: the murmur3 finalizer, a few cycles, with every input bit reaching
/// the low bits that index the table (a plain multiply would send strided block numbers -- one per
/// 256 MiB, say -- to one place).
fn home(lba: u64, mask: usize) -> usize {
    let mut h = lba;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as usize & mask
}

/// The entry an occupied slot holds.
fn decode([key, value]: [u64; 2]) -> Entry {
    Entry {
        layer: LayerId((value >> 32) as u32),
        state: if key & TOMBSTONE_BIT != 0 {
            BlockState::Tombstone
        } else {
            BlockState::Data { crc: value as u32 }
        },
    }
}

impl PointIndex {
    /// An empty table that takes `entries` entries without growing (the size doubling would reach).
    fn with_capacity(entries: usize) -> PointIndex {
        if entries == 0 {
            return PointIndex::default();
        }
        let slots = entries.saturating_mul(2).next_power_of_two().max(MIN_SLOTS);
        PointIndex {
            slots: vec![[EMPTY, 0]; slots],
            len: 0,
        }
    }

    /// A table of the entries of `list`, each block once.
    fn from_sorted<T>(list: &[T], entry: impl Fn(&T) -> (u64, Entry)) -> PointIndex {
        let mut points = PointIndex::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            if let Some(ahead) = list.get(i + PREFETCH_AHEAD) {
                prefetch(SlotAddress(points.home_slot(entry(ahead).0)));
            }
            let (lba, e) = entry(item);
            points.insert(lba, e);
        }
        points
    }

    fn get(&self, lba: u64) -> Option<Entry> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = home(lba, mask);
        loop {
            let [key, value] = self.slots[i];
            if key == EMPTY {
                return None;
            }
            if key & !TOMBSTONE_BIT == lba {
                return Some(decode([key, value]));
            }
            i = (i + 1) & mask;
        }
    }

    /// Where `lba`'s probe begins (null for an empty table).
    fn home_slot(&self, lba: u64) -> *const u8 {
        if self.slots.is_empty() {
            return std::ptr::null();
        }
        (&self.slots[home(lba, self.slots.len() - 1)] as *const [u64; 2]).cast()
    }

    /// Sets `lba`'s entry, returning the one it replaces.
    ///
    /// Only a new block can make the table grow: an overwrite takes no slot. A table built at open
    /// for exactly 2^k entries is exactly half full, and growing before looking doubled and rehashed
    /// all of it (10-18 ms for 262,144 blocks) on the first write after every restart -- the first
    /// block a rebuild copies onto a returning replica, which is always an overwrite there.
    fn insert(&mut self, lba: u64, entry: Entry) -> Option<Entry> {
        let (flag, crc) = match entry.state {
            BlockState::Data { crc } => (0, crc),
            BlockState::Tombstone => (TOMBSTONE_BIT, 0),
        };
        let slot = [lba | flag, u64::from(entry.layer.0) << 32 | u64::from(crc)];
        loop {
            if self.slots.is_empty() {
                self.grow();
            }
            let mask = self.slots.len() - 1;
            let mut i = home(lba, mask);
            loop {
                let key = self.slots[i][0];
                if key == EMPTY {
                    break;
                }
                if key & !TOMBSTONE_BIT == lba {
                    let prev = decode(self.slots[i]);
                    self.slots[i] = slot;
                    return Some(prev);
                }
                i = (i + 1) & mask;
            }
            // A new block. At most half full: a probe then mostly stays in its first cache line.
            if (self.len + 1) * 2 > self.slots.len() {
                self.grow();
                continue;
            }
            self.len += 1;
            self.slots[i] = slot;
            return None;
        }
    }

    fn grow(&mut self) {
        let slots = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![[EMPTY, 0]; slots]);
        let mask = self.slots.len() - 1;
        for slot in old.into_iter().filter(|s| s[0] != EMPTY) {
            let mut i = home(slot[0] & !TOMBSTONE_BIT, mask);
            while self.slots[i][0] != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }
}

/// An address inside a [`VolumeMap`]'s point index, for [`prefetch`] only.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotAddress(*const u8);

/// Starts loading the cache line at `slot` into the CPU cache.
///
/// In a map of a few hundred thousand entries the slot a random read needs is almost never cached
/// (the kernel's copy of the previous read's data evicted it), and waiting for it at the lookup cost
/// about a tenth of a cached 4 KiB `pread`. Prefetched before the read's `pread`, the line is there
/// when the lookup runs (see `Store::read_head_first`). Measured on this project's VM (AMD EPYC), the
/// prefetch instruction itself still stalls for part of the miss -- the page-table walk for a slot
/// whose page is not in the TLB -- so it hides some of the wait, not all of it.
pub(crate) fn prefetch(slot: SlotAddress) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and reads nothing into the program, whatever
    // the address (this one may be stale if the table grew since it was taken).
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(slot.0.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = slot;
}

/// `lba -> Entry` for every block some layer holds.
#[derive(Debug, Default)]
pub(crate) struct VolumeMap {
    entries: BTreeMap<u64, Entry>,
    /// The same entries, for point lookups (see the module documentation).
    points: PointIndex,
}

impl VolumeMap {
    pub fn get(&self, lba: u64) -> Option<Entry> {
        self.points.get(lba)
    }

    /// Where [`VolumeMap::get`] of `lba` will start reading, for [`prefetch`]: an address only,
    /// never dereferenced, so it may be used after the map's lock is released (a table that grew
    /// meanwhile makes the prefetch useless, not wrong).
    pub fn slot_address(&self, lba: u64) -> SlotAddress {
        SlotAddress(self.points.home_slot(lba))
    }

    /// Sets the entry of `lba`, returning the previous one.
    pub fn insert(&mut self, lba: u64, entry: Entry) -> Option<Entry> {
        let prev = self.points.insert(lba, entry);
        // An overwrite in the same layer changes only the CRC: the B-tree is left alone (see the
        // module docs), which saves a single 4 KiB write a descent of it.
        let crc_only = matches!(
            (prev, entry.state),
            (Some(Entry { layer, state: BlockState::Data { .. } }), BlockState::Data { .. })
                if layer == entry.layer
        );
        if !crc_only {
            self.entries.insert(lba, entry);
        }
        prev
    }

    pub fn range(&self, blocks: Range<u64>) -> impl Iterator<Item = (u64, Entry)> + '_ {
        self.entries
            .range(blocks)
            .map(|(&lba, &e)| (lba, self.current(lba, e)))
    }

    /// The entry of `lba`, listed in the B-tree as `listed`: its CRC from the point index when it
    /// holds data (the B-tree's may be an older write's).
    fn current(&self, lba: u64, listed: Entry) -> Entry {
        match listed.state {
            BlockState::Data { .. } => self.points.get(lba).unwrap_or(listed),
            BlockState::Tombstone => listed,
        }
    }

    /// A map of `entries`, which are in block order, each block once.
    ///
    /// The two indexes are independent, so a large map builds them on two threads: a replica
    /// opening after a crash does nothing else meanwhile, and every millisecond of the open is a
    /// millisecond more that a returning replica misses writes (a 262,144-block head: ~7 ms for the
    /// B-tree, ~7 ms for the hash table).
    fn from_sorted<T: Sync>(list: &[T], entry: impl Fn(&T) -> (u64, Entry) + Sync) -> VolumeMap {
        // Sorted input: `from_iter` only checks the order and builds the tree bottom up, instead of
        // descending it for every entry.
        let tree = || BTreeMap::from_iter(list.iter().map(&entry));
        let (entries, points) = if list.len() >= PARALLEL_BUILD_ENTRIES {
            std::thread::scope(|scope| {
                let tree = scope.spawn(tree);
                let points = PointIndex::from_sorted(list, &entry);
                let tree = tree
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (tree, points)
            })
        } else {
            (tree(), PointIndex::from_sorted(list, &entry))
        };
        VolumeMap { entries, points }
    }

    /// The blocks of `layer` as the map sees them (for the head, all it holds).
    pub fn blocks_of(&self, layer: LayerId) -> impl Iterator<Item = (u64, BlockState)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| e.layer == layer)
            .map(|(&lba, &e)| (lba, self.current(lba, e).state))
    }

    /// Coalesced ranges of blocks that hold data in the merged view (tombstones excluded).
    pub fn allocated_blocks(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for (&lba, e) in &self.entries {
            if !matches!(e.state, BlockState::Data { .. }) {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.end == lba => last.end = lba + 1,
                _ => ranges.push(lba..lba + 1),
            }
        }
        ranges
    }
}

/// Builds a [`VolumeMap`] from whole layers, oldest first (at open, and after a revert).
///
/// The layers' entries are gathered into one list and replayed at once (a stable sort, the newest
/// layer of each block kept), then both indexes are built in bulk: entry by entry, a 262,144-block
/// head cost 50-75 ms of B-tree descents and hash-table doublings at every open. The gathered list is
/// replayed whenever it has grown to twice what the last replay left, so a long chain that rewrote the
/// same blocks in every layer holds at most about three times the final map, not every layer at once.
///
/// The first layer is kept as it was added until a second one comes: a chain without snapshots (a
/// head alone, the common case) then builds its indexes straight from the head's own list, without
/// gathering a copy of it first (~3 ms and 6 MiB of fresh memory for 262,144 blocks, at every open).
#[derive(Default)]
pub(crate) struct MapBuilder {
    /// The only layer added so far, as it came.
    first: Option<(LayerId, LayerBlocks)>,
    /// The entries added, layer after layer; in block order and each block once up to `replayed`.
    entries: Vec<(u64, Entry)>,
    replayed: usize,
    /// Layers added since the last replay: with one run in order (one layer and nothing replayed
    /// before it, the usual single head), there is nothing to replay.
    runs: usize,
}

/// How many entries ahead [`VolumeMap::from_sorted`] prefetches the hash-table slot it will fill: the
/// slots of consecutive blocks are scattered over the whole table, and filling it one miss at a time
/// took ~12 ms for 262,144 blocks, ~7 ms with 16 misses in flight.
const PREFETCH_AHEAD: usize = 16;

/// Entries from which [`VolumeMap::from_sorted`] builds its two indexes on two threads: below it, a
/// thread costs more than it saves.
const PARALLEL_BUILD_ENTRIES: usize = 1 << 16;

/// Entries gathered before the first replay: below this, replaying is cheap whatever the chain.
const MIN_REPLAY_ENTRIES: usize = 1 << 16;

impl MapBuilder {
    /// Puts a newer layer's blocks on top of those added before.
    pub fn add_layer(&mut self, layer: LayerId, blocks: LayerBlocks) {
        if self.first.is_none() && self.runs == 0 {
            self.first = Some((layer, blocks));
            return;
        }
        if let Some((first, first_blocks)) = self.first.take() {
            self.gather(first, &first_blocks);
        }
        self.gather(layer, &blocks);
    }

    fn gather(&mut self, layer: LayerId, blocks: &LayerBlocks) {
        self.entries.extend(
            blocks
                .as_slice()
                .iter()
                .map(|&(lba, state)| (lba, Entry { layer, state })),
        );
        self.runs += 1;
        if self.entries.len() > self.replayed.max(MIN_REPLAY_ENTRIES) * 2 {
            self.replay();
        }
    }

    fn replay(&mut self) {
        if self.runs > 1 {
            replay_in_place(&mut self.entries);
        }
        self.replayed = self.entries.len();
        self.runs = 1;
    }

    pub fn build(mut self) -> VolumeMap {
        if let Some((layer, blocks)) = &self.first {
            let layer = *layer;
            return VolumeMap::from_sorted(blocks.as_slice(), |&(lba, state)| (lba, Entry { layer, state }));
        }
        self.replay();
        VolumeMap::from_sorted(&self.entries, |&entry| entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_grows_for_a_new_block_never_for_an_overwrite() {
        let data = |crc| Entry {
            layer: LayerId(1),
            state: BlockState::Data { crc },
        };
        // What an open builds for 2^12 blocks: exactly half full.
        let entries: Vec<(u64, Entry)> = (0..4096).map(|lba| (lba, data(1))).collect();
        let mut points = PointIndex::from_sorted(&entries, |&e| e);
        let slots = points.slots.len();
        assert_eq!(points.len * 2, slots, "built exactly half full");
        for lba in (0..4096).step_by(7) {
            assert_eq!(points.insert(lba, data(2)), Some(data(1)));
        }
        assert_eq!(points.slots.len(), slots, "overwrites take no slot");
        assert_eq!(points.insert(4096, data(3)), None);
        assert_eq!(points.slots.len(), slots * 2, "a new block does");
        assert!((0..4097).all(|lba| points.get(lba).is_some()));
        assert_eq!(points.get(7), Some(data(2)));
    }

    #[test]
    fn point_lookups_agree_with_the_ordered_entries_through_growth_and_overwrites() {
        let mut map = VolumeMap::default();
        // Strided and dense block numbers, the largest one a 1 PiB volume has, overwrites that flip
        // between data and tombstone.
        let lbas: Vec<u64> = (0..5000u64)
            .map(|i| i * 65_536)
            .chain(0..3000)
            .chain([(1 << 38) - 1])
            .collect();
        for (n, &lba) in lbas.iter().enumerate() {
            let state = if n % 3 == 0 {
                BlockState::Tombstone
            } else {
                BlockState::Data { crc: n as u32 }
            };
            map.insert(
                lba,
                Entry {
                    layer: LayerId(n as u32 % 7 + 1),
                    state,
                },
            );
        }
        // Rewrites in the same layer, data to data: only the CRC changes (the B-tree is not
        // touched), and every view of the map must show the new one.
        for lba in 0..3000u64 {
            if let Some(Entry {
                layer,
                state: BlockState::Data { .. },
            }) = map.get(lba)
            {
                let prev = map.insert(
                    lba,
                    Entry {
                        layer,
                        state: BlockState::Data { crc: 0xc0de },
                    },
                );
                assert!(matches!(
                    prev,
                    Some(Entry {
                        state: BlockState::Data { .. },
                        ..
                    })
                ));
            }
        }
        for &lba in &lbas {
            let expected = map.range(lba..lba + 1).next().map(|(_, e)| e);
            assert!(expected.is_some());
            assert_eq!(map.get(lba), expected, "block {lba}");
        }
        let rewritten = map
            .range(0..3000)
            .filter(|(_, e)| e.state == BlockState::Data { crc: 0xc0de });
        assert_eq!(
            rewritten.count(),
            2000,
            "two in three of blocks 0..3000 hold data"
        );
        for layer in 1..=7 {
            for (lba, state) in map.blocks_of(LayerId(layer)) {
                assert_eq!(
                    map.get(lba).map(|e| e.state),
                    Some(state),
                    "block {lba} of layer {layer}"
                );
            }
        }
        assert_eq!(map.points.len, map.entries.len());
        for lba in [3000, 65_537, 1 << 37, u64::MAX >> 1] {
            assert_eq!(map.get(lba), None, "block {lba}");
        }
    }

    #[test]
    fn a_map_built_from_layers_equals_one_built_entry_by_entry_oldest_layer_first() {
        let data = |lba: u64, layer: u32| BlockState::Data {
            crc: (lba as u32) ^ (layer << 24),
        };
        // Large enough that the builder replays between layers as well as at the end.
        let layers: Vec<(LayerId, Vec<(u64, BlockState)>)> = vec![
            (LayerId(1), (0..100_000).map(|lba| (lba, data(lba, 1))).collect()),
            (
                LayerId(2),
                (0..50_000)
                    .map(|lba| (lba * 2, BlockState::Tombstone))
                    .chain((200_000..300_000).map(|lba| (lba, data(lba, 2))))
                    .collect(),
            ),
            (LayerId(3), Vec::new()),
            (
                LayerId(4),
                (0..300_000)
                    .step_by(7)
                    .map(|lba| (lba, data(lba, 4)))
                    .chain([(1 << 37, BlockState::Tombstone)])
                    .collect(),
            ),
        ];
        // The whole chain, and its oldest layer alone (a head without snapshots, built from the
        // layer's own list).
        for depth in [layers.len(), 1] {
            let mut expected = VolumeMap::default();
            let mut builder = MapBuilder::default();
            for (layer, blocks) in &layers[..depth] {
                for &(lba, state) in blocks {
                    expected.insert(lba, Entry { layer: *layer, state });
                }
                builder.add_layer(*layer, LayerBlocks::replay(blocks.clone()));
            }
            let built = builder.build();
            assert_eq!(built.entries, expected.entries, "{depth} layers");
            assert_eq!(built.points.len, expected.entries.len());
            for (&lba, &entry) in &expected.entries {
                assert_eq!(built.get(lba), Some(entry), "block {lba}");
            }
            assert_eq!(built.get(300_001), None);
        }
    }
}
