//! What to compare and what to copy: the regions both write-intent records name, the checksums in
//! them, the blocks whose checksums differ, gathered into copies of one vectored request each.

use basalt_proto::client::ReplicaClient;
use basalt_proto::frame::{
    BlockCrc, BlockRun, Extent, Message, MAX_CRC_RUNS, MAX_EXTENTS, MAX_VECTORED_BYTES,
};

use super::replicas::ask;
use super::{RebuildError, BLOCK, MAX_COPY};

/// Most runs one copy gathers (see [`copies_of`]), each an extent of one
/// vectored read and one vectored write. A delta rebuild copies mostly
/// single 4 KiB blocks scattered over the volume (the ones a returning
/// replica missed), and one copy per block costs a round trip through the
/// core and both replicas' I/O loops for each. Gathering them pays off from
/// a few dozen to a copy; a whole [`MAX_COPY`] of single blocks is slower
/// again, because the target's first write then waits for 1 MiB of
/// scattered reads (the sweep is in `benches/README.md`, "Rebuild"). 64
/// halves the requests of 32, and a copy of 64 blocks holds the target's
/// write lane, and the guest writes queued behind it, for well under a
/// millisecond, and costs little to read again when a guest write
/// overtakes it.
const COPY_EXTENTS: usize = 64;

// A copy must fit in one vectored request.
const _: () = assert!(COPY_EXTENTS <= MAX_EXTENTS && MAX_COPY <= MAX_VECTORED_BYTES as u64);

/// The runs of both lists (each in block order), coalesced.
pub(super) fn union_runs(a: &[BlockRun], b: &[BlockRun]) -> Vec<BlockRun> {
    let mut all: Vec<BlockRun> = a.iter().chain(b).copied().filter(|r| r.blocks > 0).collect();
    all.sort_unstable_by_key(|r| r.lba);
    let mut out: Vec<BlockRun> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.lba <= last.lba + last.blocks => {
                last.blocks = last.blocks.max(r.lba + r.blocks - last.lba)
            }
            _ => out.push(r),
        }
    }
    out
}

/// The CRC32 of every allocated block in `runs` (in block order), in as few
/// requests as the protocol allows: [`MAX_CRC_RUNS`] runs per request, all
/// of them in flight at once (a record names at most 2^20 regions, so that
/// is at most 16 requests). A rebuild guided by a write-intent record names
/// thousands of small regions; listing them one request each cost thousands
/// of round trips through the replica's ordered lane, which made the
/// listing slower than the copy it decides.
pub(super) async fn crcs_in(
    client: &ReplicaClient,
    addr: &str,
    runs: &[BlockRun],
) -> Result<Vec<BlockCrc>, RebuildError> {
    let pages = futures::future::try_join_all(
        runs.chunks(MAX_CRC_RUNS)
            .map(|chunk| list_runs(client, addr, chunk)),
    )
    .await?;
    Ok(pages.into_iter().flatten().collect())
}

/// One `RunCrcs` listing of `runs`, continued from where the replica cut its
/// answer short until it covers every run (each request bounded, see [`ask`]).
async fn list_runs(
    client: &ReplicaClient,
    addr: &str,
    runs: &[BlockRun],
) -> Result<Vec<BlockCrc>, RebuildError> {
    let mut all = Vec::new();
    let mut rest = runs.to_vec();
    while let (Some(first), Some(last)) = (rest.first().copied(), rest.last().copied()) {
        let question = Message::RunCrcs { runs: rest.clone() };
        let reply = ask(client, addr, "listing block checksums", question).await?;
        let Message::RunCrcsOk { crcs, end_lba } = reply else {
            return Err(RebuildError::Volume(format!(
                "replica {addr} answered a checksum listing with {:?}",
                reply.op()
            )));
        };
        let in_order = crcs.windows(2).all(|w| w[0].lba < w[1].lba);
        let inside = crcs.iter().all(|c| c.lba >= first.lba && c.lba < end_lba);
        if end_lba <= first.lba || !in_order || !inside {
            return Err(RebuildError::Volume(format!(
                "replica {addr} listed the checksums of blocks {}.. inconsistently (up to {end_lba})",
                first.lba
            )));
        }
        all.extend(crcs);
        if end_lba >= last.lba + last.blocks {
            break;
        }
        rest = rest
            .into_iter()
            .filter(|r| r.lba + r.blocks > end_lba)
            .map(|r| {
                let lba = r.lba.max(end_lba);
                BlockRun {
                    lba,
                    blocks: r.lba + r.blocks - lba,
                }
            })
            .collect();
    }
    Ok(all)
}

/// The runs to copy, gathered into copies: runs in block order, up to
/// [`COPY_EXTENTS`] of them and [`MAX_COPY`] bytes per copy (a run of
/// [`MAX_COPY`] bytes is a copy of its own). Each copy is then one vectored
/// read of the source and one vectored write of the target, however
/// scattered its runs.
pub(super) fn copies_of(runs: &[(u64, u32)]) -> Vec<Vec<Extent>> {
    let mut copies: Vec<Vec<Extent>> = Vec::new();
    let mut bytes = 0;
    for &(offset, len) in runs {
        let extent = Extent { offset, len };
        match copies.last_mut() {
            Some(copy) if copy.len() < COPY_EXTENTS && bytes + u64::from(len) <= MAX_COPY => {
                copy.push(extent);
                bytes += u64::from(len);
            }
            _ => {
                copies.push(vec![extent]);
                bytes = u64::from(len);
            }
        }
    }
    copies
}

/// The bytes one copy moves.
pub(super) fn copy_len(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| u64::from(e.len)).sum()
}

/// The byte ranges to copy from source to target: blocks the source holds
/// with another checksum than the target's (or that the target lacks), and
/// blocks only the target holds (the copy brings the source's zeros).
/// Adjacent blocks coalesce into runs of at most [`MAX_COPY`].
pub(super) fn runs_to_copy(source: &[BlockCrc], target: &[BlockCrc]) -> Vec<(u64, u32)> {
    let mut lbas = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < source.len() || j < target.len() {
        match (source.get(i), target.get(j)) {
            (Some(s), Some(t)) if s.lba == t.lba => {
                if s.crc != t.crc {
                    lbas.push(s.lba);
                }
                i += 1;
                j += 1;
            }
            (Some(s), Some(t)) if s.lba < t.lba => {
                lbas.push(s.lba);
                i += 1;
            }
            (Some(_), Some(t)) => {
                lbas.push(t.lba);
                j += 1;
            }
            (Some(s), None) => {
                lbas.push(s.lba);
                i += 1;
            }
            (None, Some(t)) => {
                lbas.push(t.lba);
                j += 1;
            }
            (None, None) => break,
        }
    }
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for lba in lbas {
        match runs.last_mut() {
            Some((off, len)) if *off + *len as u64 == lba * BLOCK && (*len as u64) < MAX_COPY => {
                *len += BLOCK as u32
            }
            _ => runs.push((lba * BLOCK, BLOCK as u32)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crcs(list: &[(u64, u32)]) -> Vec<BlockCrc> {
        list.iter().map(|&(lba, crc)| BlockCrc { lba, crc }).collect()
    }

    #[test]
    fn an_empty_target_gets_exactly_the_allocated_blocks_coalesced() {
        let source = crcs(&[(0, 1), (1, 2), (2, 3), (10, 4)]);
        assert_eq!(runs_to_copy(&source, &[]), vec![(0, 3 * 4096), (10 * 4096, 4096)]);
    }

    #[test]
    fn a_returning_replica_gets_only_what_differs() {
        let source = crcs(&[(0, 1), (1, 2), (2, 3), (3, 4)]);
        let target = crcs(&[(0, 1), (1, 9), (2, 3), (3, 4), (7, 5)]);
        assert_eq!(
            runs_to_copy(&source, &target),
            vec![(4096, 4096), (7 * 4096, 4096)]
        );
    }

    #[test]
    fn the_regions_of_source_and_target_are_compared_together_once_each() {
        let run = |lba, blocks| BlockRun { lba, blocks };
        assert_eq!(
            union_runs(
                &[run(0, 16), run(64, 16)],
                &[run(16, 16), run(70, 4), run(200, 16)]
            ),
            vec![run(0, 32), run(64, 16), run(200, 16)]
        );
        assert_eq!(union_runs(&[], &[]), vec![]);
    }

    #[test]
    fn scattered_blocks_travel_64_to_a_copy() {
        // A delta rebuild's usual work: single blocks, no two adjacent.
        let source: Vec<BlockCrc> = (0..150).map(|i| BlockCrc { lba: i * 7, crc: 1 }).collect();
        let copies = copies_of(&runs_to_copy(&source, &[]));
        assert_eq!(copies.iter().map(Vec::len).collect::<Vec<_>>(), vec![64, 64, 22]);
        let all: Vec<Extent> = copies.concat();
        assert_eq!(all.len(), 150, "every block once, in block order");
        assert!(all.windows(2).all(|w| w[0].end() < Some(w[1].offset)));
        assert!(
            copies.iter().all(|c| Extent::check_list(c).is_ok()),
            "each copy is one request the wire accepts"
        );
    }

    #[test]
    fn a_copy_stops_at_one_mebibyte_and_a_whole_mebibyte_run_is_a_copy_of_its_own() {
        const K: u32 = 4096;
        let runs = [
            (0, K),
            (1 << 20, 1 << 20),
            (3 << 20, 512 * 1024),
            (4 << 20, 512 * 1024),
            (5 << 20, K),
        ];
        assert_eq!(copies_of(&runs).iter().map(|c| copy_len(c)).max(), Some(MAX_COPY));
        let extents = |list: &[(u64, u32)]| -> Vec<Extent> {
            list.iter().map(|&(offset, len)| Extent { offset, len }).collect()
        };
        assert_eq!(
            copies_of(&runs),
            vec![
                extents(&runs[..1]),
                extents(&runs[1..2]),
                extents(&runs[2..4]),
                extents(&runs[4..]),
            ]
        );
        assert!(copies_of(&[]).is_empty());
    }

    #[test]
    fn runs_stop_at_one_mebibyte() {
        let source: Vec<BlockCrc> = (0..300).map(|lba| BlockCrc { lba, crc: 0 }).collect();
        let runs = runs_to_copy(&source, &[]);
        assert_eq!(runs, vec![(0, 1 << 20), (1 << 20, 44 * 4096)]);
    }
}
