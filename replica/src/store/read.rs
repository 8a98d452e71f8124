//! Reads: one map lookup per block, every block checked against its CRC.
//!
//! A read goes without stripe locks first and re-reads under them only a block that fails its check,
//! so the common read costs no lock (see the store's module doc, "Concurrency"). A read that must not
//! wait for the disk ([`Store::read_cached`]) gives up instead of blocking.

use std::sync::atomic::Ordering;

use super::{map, rlock, BlockState, Chain, Entry, Layer, Lba, Store, StoreError, BLOCK, BLOCK_SIZE};

/// Whether a read may wait for the medium ([`Store::read`]) or must give up instead
/// ([`Store::read_cached`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

impl Store {
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
    pub(super) fn read_blocks(&self, chain: &Chain, first: u64, out: &mut [u8]) -> Result<(), StoreError> {
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
    /// the previous block evicted it), and waiting for it is a sizeable part of a cached 4 KiB
    /// `pread` and of what the store adds over a plain file (`benches/README.md`, "Store").
    /// Prefetching the slot and
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
}
