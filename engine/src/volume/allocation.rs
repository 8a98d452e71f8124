//! What GET LBA STATUS answers: which blocks of the volume hold data,
//! according to the replicas.
//!
//! A replica's store knows, from its in-memory block map, which 4 KiB blocks
//! hold data in its merged view (written, and not unmapped since): the
//! `BlockCrcs` request lists exactly those, and costs no disk I/O. The volume
//! asks every read-write replica for one window of blocks (a write-only
//! replica is still being rebuilt and may lack blocks the others hold), on the
//! data connection like any other request, and answers from the union:
//!
//! ```text
//!   block    0 1 2 3 4 5 6 7
//!   r1       D D . . D . . .        D: holds data   .: reads as zeros
//!   r2       D D . . . . . D
//!   volume   M M U U M U U M        M: mapped   U: deallocated
//! ```
//!
//! "Deallocated" is a promise that the block reads as zeros, and backup or
//! copy tools skip such blocks; "mapped" is always a correct answer (SBC lets
//! an initiator rely on nothing more). So a block is mapped if *any*
//! read-write replica holds data there, and a window for which any
//! read-write replica failed to answer is mapped as a whole.

use basalt_proto::frame::BlockCrc;
use basalt_target::device::Provisioning;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The replicas' block size.
pub const BLOCK: u64 = 4096;

/// Most blocks one query asks each replica about: 256 MiB of the volume. A
/// replica answers 8 bytes per block holding data, so a fully written
/// window costs 512 KiB per replica, well inside a frame, and listing it
/// holds the replica's block map for about a millisecond; an initiator
/// mapping a larger volume simply asks again from where the answer stops.
pub const WINDOW_BLOCKS: u64 = 1 << 16;

/// A replica's `BlockCrcs` answer as the core carries it: the blocks that
/// hold data, 8 bytes little-endian each, in block order.
pub fn encode(blocks: &[BlockCrc]) -> Bytes {
    let mut out = BytesMut::with_capacity(blocks.len() * 8);
    for b in blocks {
        out.put_u64_le(b.lba);
    }
    out.freeze()
}

/// The blocks one answer lists, or `None` if it is not a list of whole
/// entries.
fn decode(mut answer: &[u8]) -> Option<Vec<u64>> {
    if !answer.len().is_multiple_of(8) {
        return None;
    }
    let mut blocks = Vec::with_capacity(answer.len() / 8);
    while answer.has_remaining() {
        blocks.push(answer.get_u64_le());
    }
    Some(blocks)
}

/// The provisioning of the run of bytes that starts at `offset`, and that
/// run's length, within `offset..end` (one window: `end` is at most
/// [`WINDOW_BLOCKS`] blocks past the block holding `offset`), from every
/// read-write replica's answer about that window. Conservative: a block is
/// mapped if any answer lists it, and everything is mapped if any answer is
/// missing or unreadable.
pub fn first_run(offset: u64, end: u64, answers: &[Result<Bytes, String>]) -> (Provisioning, u64) {
    let whole = (Provisioning::Mapped, end.saturating_sub(offset));
    if answers.is_empty() {
        return whole;
    }
    let mut mapped = Vec::new();
    for answer in answers {
        match answer.as_ref().ok().and_then(|a| decode(a)) {
            Some(blocks) => mapped.extend(blocks),
            None => return whole,
        }
    }
    mapped.sort_unstable();
    mapped.dedup();
    let first = offset / BLOCK;
    let at = mapped.partition_point(|&b| b < first);
    let holds_first = mapped.get(at) == Some(&first);
    let run_end_block = if holds_first {
        // Mapped: up to the first block after `first` that no replica holds.
        let consecutive = mapped[at..]
            .iter()
            .zip(first..)
            .take_while(|(b, want)| **b == *want)
            .count() as u64;
        first + consecutive
    } else {
        // Deallocated: up to the next block some replica holds.
        mapped.get(at).copied().unwrap_or(u64::MAX)
    };
    let state = if holds_first {
        Provisioning::Mapped
    } else {
        Provisioning::Deallocated
    };
    let run_end = run_end_block.saturating_mul(BLOCK).min(end);
    (state, run_end.saturating_sub(offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(blocks: &[u64]) -> Result<Bytes, String> {
        let crcs: Vec<BlockCrc> = blocks.iter().map(|&lba| BlockCrc { lba, crc: 7 }).collect();
        Ok(encode(&crcs))
    }

    const END: u64 = 16 * BLOCK;

    #[test]
    fn a_block_any_replica_holds_is_mapped_and_the_run_ends_where_none_does() {
        let r1 = answer(&[0, 1, 4]);
        let r2 = answer(&[0, 1, 2, 7]);
        let answers = [r1, r2];
        assert_eq!(first_run(0, END, &answers), (Provisioning::Mapped, 3 * BLOCK));
        assert_eq!(
            first_run(3 * BLOCK, END, &answers),
            (Provisioning::Deallocated, BLOCK)
        );
        assert_eq!(first_run(4 * BLOCK, END, &answers), (Provisioning::Mapped, BLOCK));
        assert_eq!(
            first_run(5 * BLOCK, END, &answers),
            (Provisioning::Deallocated, 2 * BLOCK)
        );
        assert_eq!(
            first_run(8 * BLOCK, END, &answers),
            (Provisioning::Deallocated, 8 * BLOCK)
        );
    }

    #[test]
    fn a_run_is_cut_at_the_end_of_the_window_and_starts_mid_block() {
        let answers = [answer(&[2, 3, 4, 5])];
        // 512 bytes into block 2: the run goes on to the end of block 5, or the window's end.
        let offset = 2 * BLOCK + 512;
        assert_eq!(
            first_run(offset, END, &answers),
            (Provisioning::Mapped, 6 * BLOCK - offset)
        );
        assert_eq!(
            first_run(offset, 4 * BLOCK, &answers),
            (Provisioning::Mapped, 4 * BLOCK - offset)
        );
        assert_eq!(
            first_run(512, END, &answers),
            (Provisioning::Deallocated, 2 * BLOCK - 512)
        );
    }

    #[test]
    fn an_empty_window_is_deallocated_to_its_end() {
        assert_eq!(
            first_run(0, END, &[answer(&[]), answer(&[])]),
            (Provisioning::Deallocated, END)
        );
    }

    #[test]
    fn a_missing_or_garbled_answer_maps_the_whole_window() {
        for bad in [Err("dropped".to_string()), Ok(Bytes::from_static(&[1, 2, 3]))] {
            assert_eq!(
                first_run(BLOCK, END, &[answer(&[]), bad]),
                (Provisioning::Mapped, END - BLOCK)
            );
        }
        assert_eq!(
            first_run(0, END, &[]),
            (Provisioning::Mapped, END),
            "no answer at all"
        );
    }
}
