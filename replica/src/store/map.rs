//! The merged volume map: for every block ever written, the newest layer that holds it.
//!
//! A read is one lookup here, whatever the depth of the chain (Longhorn and Jiva keep one byte or two
//! per block of the *volume*, 256 MiB per TiB, and cap the chain at 254/1024 layers). Memory follows
//! what was written, nothing for blocks never touched: 16-24 bytes per written or discarded block for
//! the ordered list, 32-64 for the hash table, ~30 more for a block whose layer or kind changed since
//! the map was built, so a 64 TiB thin volume with 1 GiB written needs 12-30 MiB.
//!
//! The CRC is kept here so a read can verify a block without touching the index log.
//!
//! ## Two indexes of the same entries
//!
//! Range queries (unmap, rebuild listings, log compaction) need order. A read is one point lookup
//! per block, and descending an ordered index of a few hundred thousand entries costs several cache
//! misses, each waiting for the one before: measured at a third of a cached 4 KiB `pread`, more than
//! its CRC32. So point lookups go to [`PointIndex`], a hash table of the same entries whose 16-byte
//! slots hold key and value together: a lookup is one cache line, where `HashMap` touches two
//! (control bytes, then the slot), and the lookups of a multi-block read are independent, so their
//! misses overlap. Entries are never removed (a revert builds a new map), which is what makes plain
//! linear probing enough.
//!
//! The ordered index costs almost nothing to build: it is the sorted block list the map was built
//! from ([`Base`]: at open, the head's own list as its log's replay left it, and every 16th block of
//! it to search by), with a `BTreeMap` of what changed since on top. An open is the one time a
//! replica builds its map, and a returning replica misses writes until it is done: building a B-tree
//! of a 262,144-block head there cost ~7 ms of CPU and ~6 MiB of freshly faulted memory, as much as
//! the hash table. What changed is never folded back into the list: a block rewritten into a newer
//! layer (after a snapshot) is listed twice, the newer entry winning, which costs memory (the ~30
//! bytes above) and no time on the write path.
//!
//! The point index is the authority on a block's CRC. The ordered entries are right about which
//! blocks are listed, in which layer, with data or a tombstone, but an overwrite that changes only
//! the CRC (the same layer, data before and after: every rewrite of a block of the head) updates the
//! point index alone, so a single 4 KiB write costs no B-tree descent (~6% of its CPU), and the
//! rewrites of the blocks a map was built with never reach the `BTreeMap`. What lists entries in
//! order takes each CRC from the point index.

use std::collections::{btree_map, BTreeMap, VecDeque};
use std::iter::Peekable;
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
/// A slot is two words: the key word is the block number plus one, with [`TOMBSTONE_BIT`] set for a
/// tombstone ([`EMPTY`], zero, for a free slot: a fresh table is zeroed memory as the kernel hands it
/// out, so the threads that fill it at open fault its halves in side by side instead of one thread
/// writing all of it first); the value word holds the layer id (high half) and the CRC32 (low half).
#[derive(Debug, Default)]
struct PointIndex {
    /// A power of two of slots (or none before the first insert).
    slots: Slots,
    len: usize,
}

/// Slots per cache line, and so blocks per group of consecutive blocks whose probes start in one
/// line (see [`home`]).
const LINE_SLOTS: usize = 64 / SLOT_BYTES;

/// The slots of a [`PointIndex`]: an anonymous mapping, seen as one slice of slots.
///
/// A mapping is page-aligned, so the slots of a group of blocks (see [`home`]) share one cache line
/// instead of straddling two, and it is the kernel's zeroed pages, not yet faulted in, so the threads
/// that fill a table at open fault its halves in side by side (see [`fault_in`]). The allocator gives
/// one or the other: `calloc` aligns to 16 bytes, and an aligned zeroed allocation is written with
/// zeros by the allocating thread first.
#[derive(Debug, Default)]
struct Slots(Option<memmap2::MmapMut>);

/// Bytes per slot.
const SLOT_BYTES: usize = std::mem::size_of::<[u64; 2]>();

impl Slots {
    /// `slots` free slots (a free slot is all zeros: `EMPTY`).
    fn zeroed(slots: usize) -> Slots {
        let bytes = slots * SLOT_BYTES;
        match memmap2::MmapMut::map_anon(bytes) {
            Ok(map) => Slots(Some(map)),
            // Out of memory, as a `Vec` of the same size would be.
            Err(_) => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(bytes, 4096).expect("a table's size is a power of two"),
            ),
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [[u64; 2]];

    fn deref(&self) -> &[[u64; 2]] {
        match &self.0 {
            // SAFETY: the mapping is page-aligned (more than a slot's 8-byte alignment), `len()` bytes
            // long and lives as long as the borrow; any bit pattern is a valid slot.
            Some(map) => unsafe { std::slice::from_raw_parts(map.as_ptr().cast(), map.len() / SLOT_BYTES) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [[u64; 2]] {
        match &mut self.0 {
            // SAFETY: as for `deref`, borrowed exclusively.
            Some(map) => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().cast(), map.len() / SLOT_BYTES)
            },
            None => &mut [],
        }
    }
}

/// Key word of a free slot.
const EMPTY: u64 = 0;
/// Set in the key word of a tombstone's slot. Block numbers stay below 2^38 (1 PiB volumes).
const TOMBSTONE_BIT: u64 = 1 << 63;
/// Slots of the first table.
const MIN_SLOTS: usize = 1024;

/// Where `lba`'s probe starts. Blocks go by groups of [`LINE_SLOTS`] consecutive ones, each group's
/// probes starting side by side in one cache line: a volume is mostly written in runs, and a table
/// filled from a sorted list then takes a cache miss per group instead of one per block, as do the
/// lookups of a multi-block read. With the table page-aligned (see [`Slots`]), the fill's CPU at
/// the open of a 1 GiB head about halved (perf samples over 30 opens, two alternations: 6,848 /
/// 5,615 -> 3,673 / 2,452) and the open's median went 14.0 -> 13.2 ms. Which line is the murmur3
/// finalizer of the group, a few cycles, with every input bit reaching the low bits that index the
/// table (a plain multiply would send strided block numbers -- one per 256 MiB, say -- to one
/// place). A group whose line is taken by another's spills into the next lines: linear probing by
/// lines, at most half full.
fn home(lba: u64, mask: usize) -> usize {
    let group_slots = LINE_SLOTS as u64;
    let mut h = lba / group_slots;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h.wrapping_mul(group_slots) | (lba % group_slots)) as usize & mask
}

/// The key word of `lba`'s slot, without the tombstone bit.
fn key_of(lba: u64) -> u64 {
    lba + 1
}

/// The slot that holds `entry` for `lba`.
fn encode(lba: u64, entry: Entry) -> [u64; 2] {
    let (flag, crc) = match entry.state {
        BlockState::Data { crc } => (0, crc),
        BlockState::Tombstone => (TOMBSTONE_BIT, 0),
    };
    [
        key_of(lba) | flag,
        u64::from(entry.layer.0) << 32 | u64::from(crc),
    ]
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

/// The block number of an occupied slot.
fn lba_of([key, _]: [u64; 2]) -> u64 {
    (key & !TOMBSTONE_BIT) - 1
}

impl PointIndex {
    /// An empty table that takes `entries` entries without growing (the size doubling would reach).
    fn with_capacity(entries: usize) -> PointIndex {
        if entries == 0 {
            return PointIndex::default();
        }
        let slots = entries.saturating_mul(2).next_power_of_two().max(MIN_SLOTS);
        PointIndex {
            slots: Slots::zeroed(slots),
            len: 0,
        }
    }

    /// A table of the entries of `list`, each block once.
    ///
    /// A large table is filled on two threads, each faulting in and filling the slots of its own
    /// half: the entries whose probe starts there. An entry whose probe runs past the end of its half
    /// is set aside and inserted after both are done, when the rule of linear probing still holds
    /// for it (every slot from its home to where it lands is taken). Filling is mostly waiting for
    /// memory: groups of consecutive blocks are scattered over the whole table, and every page of
    /// it is fresh (a 262,144-block head: a 16 MiB table).
    fn from_list<T: Sync>(list: &[T], entry: impl Fn(&T) -> (u64, Entry) + Sync) -> PointIndex {
        let mut points = PointIndex::with_capacity(list.len());
        if list.is_empty() {
            return points;
        }
        let mask = points.slots.len() - 1;
        let half = points.slots.len() / 2;
        let (low, high) = points.slots.split_at_mut(half);
        let ((low_len, mut set_aside), (high_len, high_set_aside)) = if list.len() >= PARALLEL_BUILD_ENTRIES {
            std::thread::scope(|scope| {
                let high = scope.spawn(|| fill_part(high, half, mask, list, &entry));
                let low = fill_part(low, 0, mask, list, &entry);
                let high = high
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (low, high)
            })
        } else {
            (
                fill_part(low, 0, mask, list, &entry),
                fill_part(high, half, mask, list, &entry),
            )
        };
        points.len = low_len + high_len;
        set_aside.extend(high_set_aside);
        for (lba, e) in set_aside {
            points.insert(lba, e);
        }
        points
    }

    fn get(&self, lba: u64) -> Option<Entry> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let key = key_of(lba);
        let mut i = home(lba, mask);
        loop {
            let slot = self.slots[i];
            if slot[0] == EMPTY {
                return None;
            }
            if slot[0] & !TOMBSTONE_BIT == key {
                return Some(decode(slot));
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
        let slot = encode(lba, entry);
        let key = key_of(lba);
        loop {
            if self.slots.is_empty() {
                self.grow();
            }
            let mask = self.slots.len() - 1;
            let mut i = home(lba, mask);
            loop {
                let taken = self.slots[i][0];
                if taken == EMPTY {
                    break;
                }
                if taken & !TOMBSTONE_BIT == key {
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
        let mut table = Slots::zeroed(slots);
        fault_in(&mut table);
        let old = std::mem::replace(&mut self.slots, table);
        let mask = self.slots.len() - 1;
        for &slot in old.iter().filter(|s| s[0] != EMPTY) {
            let mut i = home(lba_of(slot), mask);
            while self.slots[i][0] != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }
}

/// Fills `part`, the slots of a table from `first` on, with the entries of `list` whose probe starts
/// there, each block once. Returns how many it placed and those whose probe ran past the part's end.
///
/// The slot of each entry is prefetched [`PREFETCH_AHEAD`] entries before it is written, so that
/// many cache misses are in flight instead of one (the part is faulted in first, front to back).
fn fill_part<T>(
    part: &mut [[u64; 2]],
    first: usize,
    mask: usize,
    list: &[T],
    entry: impl Fn(&T) -> (u64, Entry),
) -> (usize, Vec<(u64, Entry)>) {
    fault_in(part);
    let mut placed = 0;
    let mut set_aside = Vec::new();
    let mut pending: VecDeque<(usize, u64, Entry)> = VecDeque::with_capacity(PREFETCH_AHEAD + 1);
    let mut place = |part: &mut [[u64; 2]], (at, lba, e): (usize, u64, Entry)| match part[at..]
        .iter()
        .position(|slot| slot[0] == EMPTY)
    {
        Some(free) => {
            part[at + free] = encode(lba, e);
            placed += 1;
        }
        None => set_aside.push((lba, e)),
    };
    for item in list {
        let (lba, e) = entry(item);
        let Some(at) = home(lba, mask).checked_sub(first).filter(|&at| at < part.len()) else {
            continue;
        };
        prefetch(SlotAddress((&part[at] as *const [u64; 2]).cast()));
        pending.push_back((at, lba, e));
        if pending.len() > PREFETCH_AHEAD {
            let next = pending.pop_front().expect("more than PREFETCH_AHEAD pending");
            place(part, next);
        }
    }
    for next in pending {
        place(part, next);
    }
    (placed, set_aside)
}

/// Writes every slot of a fresh (zeroed, not yet faulted in) table front to back, so that its pages
/// are faulted in in order. Left to the inserts, which write the slots in random order, the same
/// faults took twice as long (a 16 MiB table at open: ~5 ms more of a returning replica's restart).
/// Not inlined: the compiler would drop a write of zeros to memory it knows was allocated zeroed.
#[inline(never)]
fn fault_in(slots: &mut [[u64; 2]]) {
    slots.fill([EMPTY, 0]);
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
    /// The entries the map was built with, in block order.
    base: Base,
    /// Entries set since the map was built, where a listing must show them instead of (or besides)
    /// `base`'s: a new block, a block now in another layer, data turned tombstone or back. A change
    /// of CRC alone is not kept here (see the module documentation).
    changed: BTreeMap<u64, Entry>,
    /// The same entries, for point lookups (see the module documentation).
    points: PointIndex,
}

/// The sorted entries a [`VolumeMap`] was built from, kept as they came, and a sparse index of them.
#[derive(Debug, Default)]
struct Base {
    list: BaseList,
    /// The block of every [`FENCE_STRIDE`]-th entry of `list`: where a range starts is found by a
    /// binary search of these (132 KiB for 262,144 entries, mostly cached) and then of one stretch
    /// of 16 entries, instead of a binary search of the whole list, whose every step is a cache
    /// miss that waits for the one before (a 16 KiB read took twice as long).
    fences: Vec<u64>,
}

/// Entries of a [`Base`] list per fence.
const FENCE_STRIDE: usize = 16;

#[derive(Debug)]
enum BaseList {
    /// One layer's own block list: a head without snapshots, the common case. Kept as the log's
    /// replay left it, without even a copy that adds the layer to each entry.
    Layer(LayerId, LayerBlocks),
    /// The entries of several layers, replayed (each block once, in its newest layer).
    Merged(Vec<(u64, Entry)>),
}

impl Default for BaseList {
    fn default() -> BaseList {
        BaseList::Merged(Vec::new())
    }
}

impl Base {
    fn new(list: BaseList) -> Base {
        fn fences<T>(list: &[(u64, T)]) -> Vec<u64> {
            list.iter().step_by(FENCE_STRIDE).map(|&(lba, _)| lba).collect()
        }
        let fences = match &list {
            BaseList::Layer(_, blocks) => fences(blocks.as_slice()),
            BaseList::Merged(entries) => fences(entries),
        };
        Base { list, fences }
    }

    /// The entries of `blocks`.
    fn slice(&self, blocks: Range<u64>) -> BaseSlice<'_> {
        match &self.list {
            BaseList::Layer(layer, list) => BaseSlice::Layer(*layer, self.cut(list.as_slice(), blocks)),
            BaseList::Merged(list) => BaseSlice::Merged(self.cut(list, blocks)),
        }
    }

    /// The entries of `list` (this base's) among `blocks`.
    fn cut<'a, T>(&self, list: &'a [(u64, T)], blocks: Range<u64>) -> &'a [(u64, T)] {
        let start = self.first_at(list, blocks.start);
        let end = match list.get(start) {
            Some(&(first, _)) if first < blocks.end => self.first_at(list, blocks.end),
            _ => start,
        };
        &list[start..end]
    }

    /// Where in `list` (this base's) the first entry at or after block `lba` is.
    fn first_at<T>(&self, list: &[(u64, T)], lba: u64) -> usize {
        // Fences before `lba`: the entry is past the last of them, and no further than the next.
        match self.fences.partition_point(|&fence| fence < lba) {
            0 => 0,
            n => {
                let stretch = (n - 1) * FENCE_STRIDE..(n * FENCE_STRIDE).min(list.len());
                stretch.start + list[stretch].partition_point(|&(entry, _)| entry < lba)
            }
        }
    }
}

/// Part of a [`Base`] list.
#[derive(Clone, Copy)]
enum BaseSlice<'a> {
    Layer(LayerId, &'a [(u64, BlockState)]),
    Merged(&'a [(u64, Entry)]),
}

impl BaseSlice<'_> {
    fn get(self, i: usize) -> Option<(u64, Entry)> {
        match self {
            BaseSlice::Layer(layer, list) => list.get(i).map(|&(lba, state)| (lba, Entry { layer, state })),
            BaseSlice::Merged(list) => list.get(i).copied(),
        }
    }

    fn lba(self, i: usize) -> Option<u64> {
        match self {
            BaseSlice::Layer(_, list) => list.get(i).map(|&(lba, _)| lba),
            BaseSlice::Merged(list) => list.get(i).map(|&(lba, _)| lba),
        }
    }
}

/// The entries of a range of a [`VolumeMap`] in block order: its base's, and what changed since on
/// top of them.
///
/// Listing a range looks every block that holds data up in the hash table for its CRC, a cache
/// miss at a random place each. This iterator prefetches the slot of the base entry
/// [`PREFETCH_AHEAD`] places ahead (and of the first ones when it starts), so that many misses are
/// in flight at once: left to the processor, a listing of 262,144 blocks took 46-54 ms instead of 5.
pub(crate) struct Entries<'a> {
    map: &'a VolumeMap,
    base: BaseSlice<'a>,
    /// The next entry of `base`.
    at: usize,
    changed: Peekable<btree_map::Range<'a, u64, Entry>>,
    /// Whether to take each CRC from the hash table (see [`VolumeMap::current`]).
    crcs: bool,
}

impl<'a> Entries<'a> {
    fn new(map: &'a VolumeMap, blocks: Range<u64>, crcs: bool) -> Entries<'a> {
        let entries = Entries {
            map,
            base: map.base.slice(blocks.clone()),
            at: 0,
            changed: map.changed.range(blocks).peekable(),
            crcs,
        };
        if crcs {
            (0..PREFETCH_AHEAD).for_each(|i| entries.prefetch(i));
        }
        entries
    }

    fn prefetch(&self, i: usize) {
        if let Some(lba) = self.base.lba(i) {
            prefetch(self.map.slot_address(lba));
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = (u64, Entry);

    fn next(&mut self) -> Option<(u64, Entry)> {
        let base = self.base.get(self.at);
        let (lba, listed) = match (base, self.changed.peek()) {
            (Some((lba, _)), Some(&(&changed, &entry))) if changed <= lba => {
                self.changed.next();
                if changed == lba {
                    self.at += 1;
                }
                (changed, entry)
            }
            (Some(entry), _) => {
                self.at += 1;
                if self.crcs {
                    self.prefetch(self.at + PREFETCH_AHEAD - 1);
                }
                entry
            }
            (None, _) => self.changed.next().map(|(&lba, &entry)| (lba, entry))?,
        };
        Some((
            lba,
            if self.crcs {
                self.map.current(lba, listed)
            } else {
                listed
            },
        ))
    }
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
        // An overwrite in the same layer changes only the CRC: the ordered entries are left alone
        // (see the module docs), which saves a single 4 KiB write a descent of a B-tree.
        let crc_only = matches!(
            (prev, entry.state),
            (Some(Entry { layer, state: BlockState::Data { .. } }), BlockState::Data { .. })
                if layer == entry.layer
        );
        if !crc_only {
            self.changed.insert(lba, entry);
        }
        prev
    }

    /// The entries of `blocks`, in block order.
    pub fn range(&self, blocks: Range<u64>) -> Entries<'_> {
        Entries::new(self, blocks, true)
    }

    /// Every entry, in block order.
    fn all(&self) -> Entries<'_> {
        self.range(0..u64::MAX)
    }

    /// The entry of `lba`, listed in order as `listed`: its CRC from the point index when it holds
    /// data (the listed one may be an older write's).
    fn current(&self, lba: u64, listed: Entry) -> Entry {
        match listed.state {
            BlockState::Data { .. } => self.points.get(lba).unwrap_or(listed),
            BlockState::Tombstone => listed,
        }
    }

    /// A map of `base`: the list itself is the ordered index, so only the point index is built.
    fn from_base(base: Base) -> VolumeMap {
        let points = match &base.list {
            BaseList::Layer(layer, list) => {
                let layer = *layer;
                PointIndex::from_list(list.as_slice(), |&(lba, state)| (lba, Entry { layer, state }))
            }
            BaseList::Merged(list) => PointIndex::from_list(list, |&entry| entry),
        };
        VolumeMap {
            base,
            changed: BTreeMap::new(),
            points,
        }
    }

    /// The blocks of `layer` as the map sees them (for the head, all it holds).
    pub fn blocks_of(&self, layer: LayerId) -> impl Iterator<Item = (u64, BlockState)> + '_ {
        self.all()
            .filter(move |(_, e)| e.layer == layer)
            .map(|(lba, e)| (lba, e.state))
    }

    /// Coalesced ranges of blocks that hold data in the merged view (tombstones excluded).
    pub fn allocated_blocks(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        // Data or not is all this needs: the listing is right about it without the CRCs.
        for (lba, e) in Entries::new(self, 0..u64::MAX, false) {
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
/// layer of each block kept), then the point index is built in bulk: entry by entry, a 262,144-block
/// head cost 50-75 ms of B-tree descents and hash-table doublings at every open. The gathered list is
/// replayed whenever it has grown to twice what the last replay left, so a long chain that rewrote the
/// same blocks in every layer holds at most about three times the final map, not every layer at once.
///
/// The first layer is kept as it was added until a second one comes: a chain without snapshots (a
/// head alone, the common case) then keeps the head's own list as the map's ordered entries, without
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

/// How many entries ahead a pass over many blocks prefetches their hash-table slots ([`fill_part`],
/// [`Entries`], `Store::block_crcs_in`), so that that many cache misses are in flight instead of one.
/// Filling a table at open, where the groups of consecutive blocks are scattered over the whole
/// table, took ~12 ms for 262,144 blocks one miss at a time, ~7 ms with 16 misses in flight (before
/// blocks went by groups; 48 and 96 ahead did no better since).
pub(crate) const PREFETCH_AHEAD: usize = 16;

/// Entries from which [`PointIndex::from_list`] fills its table on two threads: below it, a thread
/// costs more than it saves.
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
        if let Some((layer, blocks)) = self.first.take() {
            return VolumeMap::from_base(Base::new(BaseList::Layer(layer, blocks)));
        }
        self.replay();
        VolumeMap::from_base(Base::new(BaseList::Merged(self.entries)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn data(crc: u32) -> Entry {
        Entry {
            layer: LayerId(1),
            state: BlockState::Data { crc },
        }
    }

    /// Blocks whose probe starts at slot `at` of a table of `slots` slots.
    fn blocks_homed_at(at: usize, slots: usize, count: usize) -> Vec<u64> {
        (1_000_000..)
            .filter(|&lba| home(lba, slots - 1) == at)
            .take(count)
            .collect()
    }

    #[test]
    fn a_table_filled_by_halves_finds_entries_whose_probe_ran_past_a_half() {
        // 600 entries take a table of 2,048 slots, filled as two halves of 1,024. Clusters at the
        // last slot of each half: their probes run into the other half, and past the table's end
        // back to slot 0.
        let mut lbas: Vec<u64> = (0..560).collect();
        lbas.extend(blocks_homed_at(1023, 2048, 20));
        lbas.extend(blocks_homed_at(2047, 2048, 20));
        lbas.sort();
        let entries: Vec<(u64, Entry)> = lbas.iter().map(|&lba| (lba, data(lba as u32))).collect();
        let points = PointIndex::from_list(&entries, |&e| e);
        assert_eq!(points.slots.len(), 2048);
        assert_eq!(points.len, 600);
        for &(lba, entry) in &entries {
            assert_eq!(points.get(lba), Some(entry), "block {lba}");
        }
        assert_eq!(points.get(560), None);
        // The same by inserts, one at a time: the same entries in the same number of slots.
        let mut inserted = PointIndex::default();
        for &(lba, entry) in &entries {
            inserted.insert(lba, entry);
        }
        let mut a: Vec<[u64; 2]> = points.slots.iter().copied().filter(|s| s[0] != EMPTY).collect();
        let mut b: Vec<[u64; 2]> = inserted.slots.iter().copied().filter(|s| s[0] != EMPTY).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn a_large_table_is_filled_on_two_threads_like_one_entry_at_a_time() {
        // Above the threshold for two threads; every block of a 1 GiB head, and block 0 (whose key
        // word must not read as a free slot).
        let entries: Vec<(u64, Entry)> = (0..(PARALLEL_BUILD_ENTRIES as u64 * 4))
            .map(|lba| {
                (
                    lba,
                    if lba % 5 == 0 {
                        Entry {
                            layer: LayerId(3),
                            state: BlockState::Tombstone,
                        }
                    } else {
                        data(lba as u32)
                    },
                )
            })
            .collect();
        let points = PointIndex::from_list(&entries, |&e| e);
        assert_eq!(points.len, entries.len());
        for &(lba, entry) in &entries {
            assert_eq!(points.get(lba), Some(entry), "block {lba}");
        }
        assert_eq!(points.get(entries.len() as u64), None);
    }

    /// A change made to a map after it was built.
    #[derive(Clone, Debug)]
    struct Change {
        lba: u64,
        layer: u32,
        crc: Option<u32>,
    }

    fn change() -> impl Strategy<Value = Change> {
        (0..400u64, 1..4u32, proptest::option::of(any::<u32>())).prop_map(|(lba, layer, crc)| Change {
            lba,
            layer,
            crc,
        })
    }

    fn entry_of(layer: u32, crc: Option<u32>) -> Entry {
        Entry {
            layer: LayerId(layer),
            state: crc.map_or(BlockState::Tombstone, |crc| BlockState::Data { crc }),
        }
    }

    proptest! {
        #[test]
        fn a_built_map_changed_afterwards_lists_what_a_plain_ordered_map_would(
            layers in proptest::collection::vec(proptest::collection::vec((0..400u64, proptest::option::of(any::<u32>())), 0..200), 0..4),
            changes in proptest::collection::vec(change(), 0..200),
            ranges in proptest::collection::vec((0..420u64, 0..420u64), 1..8),
        ) {
            let mut model: BTreeMap<u64, Entry> = BTreeMap::new();
            let mut builder = MapBuilder::default();
            for (i, records) in layers.iter().enumerate() {
                let layer = i as u32 + 1;
                let mut blocks = Vec::new();
                for &(lba, crc) in records {
                    let e = entry_of(layer, crc);
                    blocks.push((lba, e.state));
                    model.insert(lba, e);
                }
                builder.add_layer(LayerId(layer), LayerBlocks::replay(blocks));
            }
            let mut map = builder.build();
            for c in &changes {
                let e = entry_of(c.layer, c.crc);
                prop_assert_eq!(map.insert(c.lba, e), model.insert(c.lba, e));
            }
            for &(a, b) in &ranges {
                let blocks = a.min(b)..a.max(b);
                let listed: Vec<(u64, Entry)> = map.range(blocks.clone()).collect();
                let expected: Vec<(u64, Entry)> = model.range(blocks).map(|(&lba, &e)| (lba, e)).collect();
                prop_assert_eq!(listed, expected);
            }
            prop_assert_eq!(map.all().collect::<Vec<_>>(), model.iter().map(|(&lba, &e)| (lba, e)).collect::<Vec<_>>());
            for lba in 0..420 {
                prop_assert_eq!(map.get(lba), model.get(&lba).copied());
            }
            let mut allocated: Vec<Range<u64>> = Vec::new();
            for (&lba, _) in model.iter().filter(|(_, e)| matches!(e.state, BlockState::Data { .. })) {
                match allocated.last_mut() {
                    Some(last) if last.end == lba => last.end += 1,
                    _ => allocated.push(lba..lba + 1),
                }
            }
            prop_assert_eq!(map.allocated_blocks(), allocated);
            for layer in 1..5 {
                let expected: Vec<(u64, BlockState)> = model
                    .iter()
                    .filter(|(_, e)| e.layer == LayerId(layer))
                    .map(|(&lba, e)| (lba, e.state))
                    .collect();
                prop_assert_eq!(map.blocks_of(LayerId(layer)).collect::<Vec<_>>(), expected);
            }
        }
    }

    #[test]
    fn a_full_table_grows_for_a_new_block_never_for_an_overwrite() {
        let data = |crc| Entry {
            layer: LayerId(1),
            state: BlockState::Data { crc },
        };
        // What an open builds for 2^12 blocks: exactly half full.
        let entries: Vec<(u64, Entry)> = (0..4096).map(|lba| (lba, data(1))).collect();
        let mut points = PointIndex::from_list(&entries, |&e| e);
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
        assert_eq!(map.points.len, map.all().count());
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
            let expected: Vec<(u64, Entry)> = expected.all().collect();
            assert_eq!(built.all().collect::<Vec<_>>(), expected, "{depth} layers");
            assert_eq!(built.points.len, expected.len());
            for &(lba, entry) in &expected {
                assert_eq!(built.get(lba), Some(entry), "block {lba}");
            }
            assert_eq!(built.get(300_001), None);
        }
    }
}
