//! Stripe locks: how concurrent I/O to the same blocks is serialized without a lock per block.
//!
//! A write holds its blocks' stripes exclusively; a read goes without them first and takes them shared
//! only to re-read a block caught half-written (see the store's module doc, "Concurrency").

use std::ops::Range;
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use super::{rlock, wlock, Store};

/// Number of stripe locks. 1,024 makes two unrelated concurrent I/Os collide with probability ~0.1%.
pub(super) const STRIPES: usize = 1024;
/// Blocks per stripe granule: 16 blocks = 64 KiB, so a 1 MiB I/O takes 16 locks, not 256.
const STRIPE_GRANULE: u64 = 16;

/// Stripe guards, held for their `Drop` only.
pub(super) enum Held<G> {
    One(#[allow(dead_code)] G),
    Many(#[allow(dead_code)] Vec<G>),
}

impl Store {
    /// Write-locks the stripes of the given blocks, in ascending order (no deadlock).
    pub(super) fn lock_stripes_write(
        &self,
        lbas: impl Iterator<Item = u64>,
    ) -> Vec<RwLockWriteGuard<'_, ()>> {
        Self::stripe_ids(lbas)
            .into_iter()
            .map(|i| wlock(&self.stripes[i]))
            .collect()
    }

    fn lock_stripes_read(&self, lbas: impl Iterator<Item = u64>) -> Vec<RwLockReadGuard<'_, ()>> {
        Self::stripe_ids(lbas)
            .into_iter()
            .map(|i| rlock(&self.stripes[i]))
            .collect()
    }

    /// Read-locks the stripes of a run of blocks; a run inside one granule (most I/O) allocates nothing.
    pub(super) fn read_stripes(&self, blocks: Range<u64>) -> Held<RwLockReadGuard<'_, ()>> {
        if blocks.start / STRIPE_GRANULE == (blocks.end - 1) / STRIPE_GRANULE {
            Held::One(rlock(&self.stripes[Self::stripe_of(blocks.start)]))
        } else {
            Held::Many(self.lock_stripes_read(blocks))
        }
    }

    /// Write-locks the stripes of a run of blocks, like [`Store::read_stripes`].
    pub(super) fn write_stripes(&self, blocks: Range<u64>) -> Held<RwLockWriteGuard<'_, ()>> {
        if blocks.start / STRIPE_GRANULE == (blocks.end - 1) / STRIPE_GRANULE {
            Held::One(wlock(&self.stripes[Self::stripe_of(blocks.start)]))
        } else {
            Held::Many(self.lock_stripes_write(blocks))
        }
    }

    fn stripe_of(lba: u64) -> usize {
        ((lba / STRIPE_GRANULE) % STRIPES as u64) as usize
    }

    fn stripe_ids(lbas: impl Iterator<Item = u64>) -> Vec<usize> {
        let mut ids: Vec<usize> = lbas.map(Self::stripe_of).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
