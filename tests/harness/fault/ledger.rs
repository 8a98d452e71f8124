//! Self-describing blocks and the ledger of what the volume acknowledged.
//!
//! Every 4 KiB block the harness writes describes itself, so a block read back (or found in a replica's
//! exported image) says which write put it there:
//!
//! ```text
//!   0        8            16            24          32       36                          4096
//!   | magic  | block index | generation  | run tag   | crc32  | payload (from tag, index, gen) |
//! ```
//!
//! The crc covers the whole block (with the crc field zeroed), so a torn, shifted or mixed block is caught;
//! the index catches a block written to the wrong place; the run tag catches data left by another run.
//! An all-zero block is generation 0: never written.
//!
//! The [`Ledger`] records, per block, the last acknowledged generation and the attempted ones after it (sent,
//! but failed or lost with a dead connection), plus which acknowledgements a completed flush covers. The
//! rule a block must satisfy when it is read back:
//!
//! ```text
//!   valid(block) = { last acknowledged generation } ∪ { generations attempted after it }
//! ```
//!
//! A read outside that set is a loss; it is a *flushed* loss if a flush completed after the acknowledgement.
//! The workload never has two writes to one block in flight at once (see [`Ledger::reserve`]), so a block's
//! generations are ordered and "after" is well defined.

use std::fmt;

use bytes::Bytes;

/// Bytes per harness block: the replicas' checksum unit, 8 logical blocks of 512 bytes.
pub const BLOCK_BYTES: usize = 4096;
/// Logical blocks (512 bytes) per harness block.
pub const LBAS_PER_BLOCK: u64 = (BLOCK_BYTES / 512) as u64;

const MAGIC: [u8; 8] = *b"BSLTFLT1";

/// Where a clone's own generations start (see [`Ledger::snapshot_view`]): far above any a source issues
/// in a run (one per block written; a long soak writes a few million blocks).
pub const CLONE_GENERATIONS: Generation = Generation(1 << 40);
const HEADER: usize = 36;

/// Index of a 4 KiB block in the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

impl BlockIndex {
    pub fn lba(self) -> u64 {
        self.0 * LBAS_PER_BLOCK
    }
}

/// Which write produced a block's content: unique across the run, increasing in issue order. 0 = never
/// written (zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl Generation {
    pub const UNWRITTEN: Generation = Generation(0);
}

/// Sequence number of an acknowledgement, to tell which a flush covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckSeq(pub u64);

/// The content of one block: `BLOCK_BYTES` bytes describing `(tag, index, generation)`.
pub fn encode_block(tag: u64, index: BlockIndex, generation: Generation) -> Bytes {
    encode_blocks(tag, index, &[generation])
}

/// The content of consecutive blocks from `first`, one per generation, built in one buffer (the write's
/// payload as it goes on the wire).
pub fn encode_blocks(tag: u64, first: BlockIndex, generations: &[Generation]) -> Bytes {
    let mut buf = vec![0u8; BLOCK_BYTES * generations.len()];
    for ((block, &generation), index) in buf.chunks_mut(BLOCK_BYTES).zip(generations).zip(first.0..) {
        fill_block(block, tag, BlockIndex(index), generation);
    }
    Bytes::from(buf)
}

fn fill_block(block: &mut [u8], tag: u64, index: BlockIndex, generation: Generation) {
    block[..8].copy_from_slice(&MAGIC);
    block[8..16].copy_from_slice(&index.0.to_le_bytes());
    block[16..24].copy_from_slice(&generation.0.to_le_bytes());
    block[24..32].copy_from_slice(&tag.to_le_bytes());
    let mut state = tag ^ index.0.rotate_left(21) ^ generation.0.rotate_left(42);
    for chunk in block[HEADER..].chunks_mut(8) {
        let word = splitmix64(&mut state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    let crc = crc32fast::hash(block);
    block[32..36].copy_from_slice(&crc.to_le_bytes());
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a block read back turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, correct block of generation `g` (`UNWRITTEN` for zeros).
    Block(Generation),
    /// Not a block this run wrote here: why.
    Corrupt(Corruption),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// Not zeros and no magic: garbage, or a write shifted across the block boundary.
    NoMagic,
    /// The checksum does not match: torn or mixed block.
    BadChecksum,
    /// A block meant for another index: a misdirected write or read.
    WrongIndex(u64),
    /// Written by another run (stale data).
    WrongRun(u64),
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::NoMagic => f.write_str("neither zeros nor a harness block (garbage or shifted data)"),
            Corruption::BadChecksum => f.write_str("checksum mismatch (a torn or mixed block)"),
            Corruption::WrongIndex(i) => write!(f, "holds the block written for index {i} (misdirected)"),
            Corruption::WrongRun(t) => write!(f, "written by another run (tag {t:#x})"),
        }
    }
}

/// Decodes the block at `index` from `bytes` (exactly `BLOCK_BYTES`).
pub fn decode_block(tag: u64, index: BlockIndex, bytes: &[u8]) -> Decoded {
    debug_assert_eq!(bytes.len(), BLOCK_BYTES);
    if bytes[..8] != MAGIC {
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::Block(Generation::UNWRITTEN)
        } else {
            Decoded::Corrupt(Corruption::NoMagic)
        };
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..32]);
    hasher.update(&[0; 4]);
    hasher.update(&bytes[HEADER..]);
    let stored = u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes"));
    if hasher.finalize() != stored {
        return Decoded::Corrupt(Corruption::BadChecksum);
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if word(24) != tag {
        return Decoded::Corrupt(Corruption::WrongRun(word(24)));
    }
    if word(8) != index.0 {
        return Decoded::Corrupt(Corruption::WrongIndex(word(8)));
    }
    Decoded::Block(Generation(word(16)))
}

/// What the ledger knows about one block.
#[derive(Clone, Debug, Default)]
struct BlockRecord {
    /// The last acknowledged generation (UNWRITTEN if none).
    acked: Option<(Generation, AckSeq)>,
    /// Generations sent after `acked` whose outcome is unknown or an error: each may or may not have landed.
    attempted: Vec<Generation>,
    /// A write to this block is in flight.
    busy: bool,
}

/// Why a block read back is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    pub block: BlockIndex,
    pub kind: LossKind,
    /// The acknowledged generation the block should hold (or a later attempted one).
    pub expected: Generation,
    pub attempted: Vec<Generation>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// An older generation (or zeros) where a write acknowledged *and flushed* should be.
    FlushedWriteLost {
        found: Generation,
    },
    /// An older generation (or zeros) where an acknowledged write (not yet covered by a flush) should be.
    AckedWriteLost {
        found: Generation,
    },
    /// A generation this block never had sent to it, or one overtaken by a later acknowledgement.
    Unexpected {
        found: Generation,
    },
    Corrupt(Corruption),
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            LossKind::FlushedWriteLost { found } => {
                format!("FLUSHED write lost, found generation {}", found.0)
            }
            LossKind::AckedWriteLost { found } => {
                format!("acknowledged write lost, found generation {}", found.0)
            }
            LossKind::Unexpected { found } => format!("unexpected generation {}", found.0),
            LossKind::Corrupt(c) => format!("corrupt: {c}"),
        };
        write!(
            f,
            "block {} (LBA {}): {what}; expected generation {} or one of {:?}",
            self.block.0,
            self.block.lba(),
            self.expected.0,
            self.attempted.iter().map(|g| g.0).collect::<Vec<_>>()
        )
    }
}

/// The record of every write and flush the workload issued, and their outcomes.
#[derive(Clone)]
pub struct Ledger {
    tag: u64,
    blocks: Vec<BlockRecord>,
    next_generation: u64,
    next_ack: u64,
    /// Every acknowledgement up to this one is covered by a completed flush.
    flushed_through: AckSeq,
    /// Generations that are valid in any block whose index they carry, besides the rule: those issued
    /// while a snapshot was being taken (see [`Ledger::snapshot_view`]), until the first verified read.
    window: Option<(Generation, Generation)>,
}

impl Ledger {
    /// A ledger for a fresh (all-zero) volume of `blocks` 4 KiB blocks; `tag` marks this run's blocks.
    pub fn new(tag: u64, blocks: u64) -> Ledger {
        Ledger {
            tag,
            blocks: vec![BlockRecord::default(); blocks as usize],
            next_generation: 1,
            next_ack: 1,
            flushed_through: AckSeq(0),
            window: None,
        }
    }

    /// The first generation not yet issued.
    pub fn next_generation(&self) -> Generation {
        Generation(self.next_generation)
    }

    /// The ledger of a clone of a snapshot, made from this ledger as it was just before the snapshot was
    /// asked for (`self`), when the writes issued up to `issued_until` (exclusive) had been sent by the time
    /// the snapshot was taken. A snapshot is one point in time between the two: a block holds what this
    /// ledger allows, or a generation issued for it in between (which may or may not have landed before
    /// that point). No write is in flight in the clone, and its own writes get generations from
    /// [`CLONE_GENERATIONS`] on, so that none is taken for one the source issued later (a clone that
    /// showed the source's later data would then pass). The in-between generations stay valid until
    /// [`Ledger::close_window`] (after a verified read has settled every block).
    pub fn snapshot_view(&self, issued_until: Generation) -> Ledger {
        let mut view = self.clone();
        for record in &mut view.blocks {
            record.busy = false;
        }
        view.window = Some((self.next_generation(), issued_until));
        view.next_generation = issued_until.0.max(CLONE_GENERATIONS.0);
        view
    }

    /// Ends the validity of a snapshot view's in-between generations: from now on the rule is exact.
    pub fn close_window(&mut self) {
        self.window = None;
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    pub fn block_count(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The volume grew to `blocks` blocks: the new ones are zeros, never written (a volume never shrinks, so
    /// a smaller count changes nothing).
    pub fn grow(&mut self, blocks: u64) {
        if blocks as usize > self.blocks.len() {
            self.blocks.resize(blocks as usize, BlockRecord::default());
        }
    }

    /// Claims `count` blocks from `first` for one write, if none has a write in flight; returns the new
    /// generation of each block. The claim ends with [`Ledger::acknowledged`] or [`Ledger::unresolved`].
    pub fn reserve(&mut self, first: BlockIndex, count: u64) -> Option<Vec<Generation>> {
        let range = first.0 as usize..(first.0 + count) as usize;
        if range.end > self.blocks.len() || self.blocks[range.clone()].iter().any(|b| b.busy) {
            return None;
        }
        let mut generations = Vec::with_capacity(count as usize);
        for record in &mut self.blocks[range] {
            let generation = Generation(self.next_generation);
            self.next_generation += 1;
            record.busy = true;
            record.attempted.push(generation);
            generations.push(generation);
        }
        Some(generations)
    }

    /// The write of `generations` from `first` was acknowledged: those are now the blocks' values, and
    /// every earlier attempt is overtaken.
    pub fn acknowledged(&mut self, first: BlockIndex, generations: &[Generation]) {
        let seq = AckSeq(self.next_ack);
        self.next_ack += 1;
        for (record, &generation) in self.blocks[first.0 as usize..].iter_mut().zip(generations) {
            record.acked = Some((generation, seq));
            record.attempted.retain(|&g| g > generation);
            record.busy = false;
        }
    }

    /// The write failed or its outcome is unknown: the generations stay possible, the blocks are free.
    pub fn unresolved(&mut self, first: BlockIndex, count: u64) {
        for record in &mut self.blocks[first.0 as usize..(first.0 + count) as usize] {
            record.busy = false;
        }
    }

    /// Called when a flush is sent: the acknowledgements it will cover.
    pub fn flush_started(&self) -> AckSeq {
        AckSeq(self.next_ack - 1)
    }

    /// The flush started at `covers` completed GOOD.
    pub fn flush_completed(&mut self, covers: AckSeq) {
        self.flushed_through = self.flushed_through.max(covers);
    }

    /// Checks `found` (read back from block `index`) against the rule in the module doc.
    pub fn check(&self, index: BlockIndex, found: Decoded) -> Result<(), Loss> {
        let record = &self.blocks[index.0 as usize];
        let (expected, seq) = record.acked.unwrap_or((Generation::UNWRITTEN, AckSeq(0)));
        let loss = |kind| Loss {
            block: index,
            kind,
            expected,
            attempted: record.attempted.clone(),
        };
        let in_window = |g: Generation| self.window.is_some_and(|(from, until)| from <= g && g < until);
        match found {
            Decoded::Corrupt(c) => Err(loss(LossKind::Corrupt(c))),
            Decoded::Block(g) if g == expected || record.attempted.contains(&g) || in_window(g) => Ok(()),
            Decoded::Block(g) if g < expected && seq <= self.flushed_through => {
                Err(loss(LossKind::FlushedWriteLost { found: g }))
            }
            Decoded::Block(g) if g < expected => Err(loss(LossKind::AckedWriteLost { found: g })),
            Decoded::Block(g) => Err(loss(LossKind::Unexpected { found: g })),
        }
    }

    /// After a verified read with nothing in flight: the block *is* `found` now, so later checks are exact.
    /// (Once read back, an attempted generation that did not land must never appear later, and one that did
    /// must stay.)
    pub fn settle(&mut self, index: BlockIndex, found: Generation) {
        let seq = AckSeq(self.next_ack);
        self.next_ack += 1;
        let record = &mut self.blocks[index.0 as usize];
        record.acked = Some((found, seq));
        record.attempted.clear();
    }

    /// Blocks with a write in flight (must be 0 when the workload is stopped).
    pub fn busy_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.busy).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: u64 = 0x5eed;

    #[test]
    fn a_block_decodes_to_the_generation_that_wrote_it() {
        let block = encode_block(TAG, BlockIndex(7), Generation(42));
        assert_eq!(
            decode_block(TAG, BlockIndex(7), &block),
            Decoded::Block(Generation(42))
        );
        assert_eq!(
            decode_block(TAG, BlockIndex(7), &[0; BLOCK_BYTES]),
            Decoded::Block(Generation::UNWRITTEN)
        );
    }

    #[test]
    fn torn_misplaced_and_foreign_blocks_are_corrupt() {
        let a = encode_block(TAG, BlockIndex(3), Generation(1));
        let b = encode_block(TAG, BlockIndex(3), Generation(2));
        let mut torn = a.to_vec();
        torn[2048..].copy_from_slice(&b[2048..]);
        assert_eq!(
            decode_block(TAG, BlockIndex(3), &torn),
            Decoded::Corrupt(Corruption::BadChecksum)
        );
        assert_eq!(
            decode_block(TAG, BlockIndex(4), &a),
            Decoded::Corrupt(Corruption::WrongIndex(3))
        );
        assert_eq!(
            decode_block(TAG + 1, BlockIndex(3), &a),
            Decoded::Corrupt(Corruption::WrongRun(TAG))
        );
        let mut shifted = vec![0u8; BLOCK_BYTES];
        shifted[512..].copy_from_slice(&a[..BLOCK_BYTES - 512]);
        assert_eq!(
            decode_block(TAG, BlockIndex(3), &shifted),
            Decoded::Corrupt(Corruption::NoMagic)
        );
    }

    #[test]
    fn a_snapshot_view_allows_what_was_issued_while_the_snapshot_was_taken_until_its_window_closes() {
        let mut source = Ledger::new(TAG, 4);
        let (a, b) = (BlockIndex(0), BlockIndex(1));
        let g1 = source.reserve(a, 1).expect("free")[0];
        source.acknowledged(a, &[g1]);
        // In flight when the snapshot is asked for: it may or may not be in it.
        let in_flight = source.reserve(b, 1).expect("free")[0];
        let before = source.clone();
        // Issued while the snapshot is taken.
        let during = source.reserve(a, 1).expect("free")[0];
        source.acknowledged(a, &[during]);
        let mut clone = before.snapshot_view(source.next_generation());
        assert_eq!(clone.check(a, Decoded::Block(g1)), Ok(()));
        assert_eq!(clone.check(a, Decoded::Block(during)), Ok(()));
        assert_eq!(clone.check(b, Decoded::Block(in_flight)), Ok(()));
        assert_eq!(clone.check(b, Decoded::Block(Generation::UNWRITTEN)), Ok(()));
        assert!(
            clone.check(a, Decoded::Block(Generation::UNWRITTEN)).is_err(),
            "a write acknowledged before the snapshot must be in it"
        );
        // Issued after the snapshot returned: never in it.
        let c = BlockIndex(2);
        let after = source.reserve(c, 1).expect("free")[0];
        assert!(clone.check(c, Decoded::Block(after)).is_err());
        // The clone writes where the source had a write in flight, with generations of its own.
        let own = clone.reserve(b, 1).expect("no write in flight in a clone")[0];
        assert!(own > after && own >= CLONE_GENERATIONS, "{own:?}");
        clone.acknowledged(b, &[own]);
        clone.settle(a, g1);
        clone.close_window();
        assert!(
            clone.check(a, Decoded::Block(during)).is_err(),
            "exact once settled"
        );
        assert_eq!(clone.check(b, Decoded::Block(own)), Ok(()));
    }

    #[test]
    fn a_block_may_hold_its_acknowledged_or_a_later_attempted_generation_only() {
        let mut ledger = Ledger::new(TAG, 4);
        let b = BlockIndex(1);
        let g1 = ledger.reserve(b, 1).expect("free")[0];
        ledger.acknowledged(b, &[g1]);
        let g2 = ledger.reserve(b, 1).expect("free")[0];
        ledger.unresolved(b, 1);
        assert_eq!(ledger.check(b, Decoded::Block(g1)), Ok(()));
        assert_eq!(
            ledger.check(b, Decoded::Block(g2)),
            Ok(()),
            "the lost write may have landed"
        );
        let lost = ledger
            .check(b, Decoded::Block(Generation::UNWRITTEN))
            .expect_err("g1 was acked");
        assert_eq!(
            lost.kind,
            LossKind::AckedWriteLost {
                found: Generation::UNWRITTEN
            }
        );

        // A later acknowledged write overtakes the unresolved one: g2 reappearing would be a lost write.
        let g3 = ledger.reserve(b, 1).expect("free")[0];
        ledger.acknowledged(b, &[g3]);
        assert!(ledger.check(b, Decoded::Block(g2)).is_err());
    }

    #[test]
    fn a_loss_after_a_completed_flush_is_a_flushed_loss() {
        let mut ledger = Ledger::new(TAG, 2);
        let b = BlockIndex(0);
        let g = ledger.reserve(b, 1).expect("free")[0];
        ledger.acknowledged(b, &[g]);
        let covers = ledger.flush_started();
        ledger.flush_completed(covers);
        let lost = ledger
            .check(b, Decoded::Block(Generation::UNWRITTEN))
            .expect_err("flushed");
        assert_eq!(
            lost.kind,
            LossKind::FlushedWriteLost {
                found: Generation::UNWRITTEN
            }
        );
    }

    #[test]
    fn overlapping_writes_are_never_in_flight_together() {
        let mut ledger = Ledger::new(TAG, 8);
        let gens = ledger.reserve(BlockIndex(2), 3).expect("free");
        assert_eq!(ledger.reserve(BlockIndex(4), 2), None, "block 4 is busy");
        assert_eq!(ledger.reserve(BlockIndex(7), 2), None, "past the end");
        ledger.acknowledged(BlockIndex(2), &gens);
        assert!(ledger.reserve(BlockIndex(4), 2).is_some());
        assert_eq!(ledger.busy_blocks(), 2);
    }
}
