//! Writes and unmaps into the head: record first, then data, under the blocks' stripe locks.
//!
//! The order (log record, then data) is what lets open tell a torn write from a good one (see
//! [`super::log`]); sub-block writes and discards are read-modify-write of the whole block.

use std::ops::Range;

use super::{
    log, rlock, wlock, BlockState, Chain, Entry, Lba, Record, Store, StoreError, BLOCK, BLOCK_SIZE,
    IO_CHUNK_BLOCKS, RECORD_LEN,
};

/// Blocks of a write whose CRCs and log records are built on the stack (beyond, on the heap): 32 is
/// what a replica's ordered lane hands over from an initiator at open-iscsi's default queue depth.
const STACK_BLOCKS: usize = 32;

/// A sub-block change applied by read-modify-write.
enum Patch<'a> {
    Data(&'a [u8]),
    /// A sub-block discard: zero this many bytes.
    Zeros(usize),
}

impl Store {
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
        // 4 KiB write is a few microseconds, so two heap allocations would be a visible share of it.
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
}
