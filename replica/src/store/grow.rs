//! Growing a volume online: the new blocks past the old end read as zeros, and every block below it
//! keeps its content.
//!
//! ```text
//!   before:  [ volume.meta size = S ]   head data object sized for S (a segment table, a capacity)
//!   1. lock: the chain exclusively (no I/O in flight), the snapshot operations' lock
//!   2. sync the head's data and log          (see why below)
//!   3. reopen the head's data object for S'  (the backend makes room: more segment slots on a host
//!                                              directory; a larger bound on a device, checked first)
//!   4. replace volume.meta with size = S'    <- the commit point: write, fsync, rename, fsync dir
//!   5. swap the reopened head in, publish S'
//! ```
//!
//! Nothing before step 4 changes what is on disk in a way the old size cannot open (reopening an
//! object creates nothing; a segment file appears only when a block past the old end is written,
//! which needs the new size), and nothing after it is needed for the new size to open: a crash at
//! any point leaves the old size or the new one, and the volume opens either way. Blocks past the
//! old end were never written (a volume never shrinks, and a write past the end is refused), so they
//! read as zeros with no work at all: a grow costs the same at any size.
//!
//! Snapshots need nothing: a snapshot's blocks all lie below the size the volume had when it was
//! taken, and a revert keeps the volume's current size (the blocks past the snapshot's end read as
//! zeros, as they did then).
//!
//! Step 2 is for a flush whose marker was appended before the grow and whose syncs run after it: the
//! reopened head takes the log's appender over, so that flush would find nothing to sync on the head
//! it holds; syncing here, under the chain lock, makes its marker durable first (as a snapshot create
//! does for the head it freezes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{lock, wlock, Layer, Store, StoreError, BLOCK_SIZE, MAX_VOLUME_BYTES};

/// What a grow to a given size would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Growth {
    /// The volume already has that size: nothing to do (a retried expansion).
    Unchanged,
    /// The volume grows from `from` bytes.
    From(u64),
}

impl Store {
    /// The largest size this volume can grow to: the store's own limit, or less where the storage
    /// under it holds less (a block device).
    pub fn max_size_bytes(&self) -> u64 {
        self.backend
            .max_volume_bytes()
            .map_or(MAX_VOLUME_BYTES, |max| max.min(MAX_VOLUME_BYTES))
    }

    /// Whether the volume could grow to `size_bytes`, changing nothing: a multiple of 4096 bytes, not
    /// below the current size ([`StoreError::Shrink`]), and within what the storage holds
    /// ([`StoreError::TooLarge`]).
    pub fn check_grow(&self, size_bytes: u64) -> Result<Growth, StoreError> {
        if !size_bytes.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::InvalidSize {
                size: size_bytes,
                reason: "it must be a multiple of 4096 bytes",
            });
        }
        let size = self.size_bytes();
        if size_bytes < size {
            return Err(StoreError::Shrink {
                size,
                requested: size_bytes,
            });
        }
        if size_bytes == size {
            return Ok(Growth::Unchanged);
        }
        let max = self.max_size_bytes();
        if size_bytes > max {
            return Err(StoreError::TooLarge {
                location: self.backend.location(),
                requested: size_bytes,
                max,
            });
        }
        Ok(Growth::From(size))
    }

    /// Grows the volume to `size_bytes`, durably before it returns (see the module documentation);
    /// the same size is a no-op. Refused as [`Store::check_grow`] refuses. I/O waits while the head
    /// is synced and the metadata replaced, then goes on at the new size.
    pub fn grow(&self, size_bytes: u64) -> Result<Growth, StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        let growth = self.check_grow(size_bytes)?;
        if growth == Growth::Unchanged {
            return Ok(growth);
        }
        let mut chain = wlock(&self.chain);
        let old = chain.head.clone();
        self.sync_layer(&old)?;
        let name = old.id.data_object();
        let data = self
            .backend
            .open(&name, size_bytes)
            .map_err(StoreError::io(format!("reopening {name} for {size_bytes} bytes")))?;
        {
            let mut meta = lock(&self.meta);
            let mut next = meta.clone();
            next.size_bytes = size_bytes;
            next.revision = next.revision.max(self.revision());
            next.store(&*self.backend)?;
            *meta = next;
        }
        let head = Arc::new(Layer {
            id: old.id,
            data,
            log: Mutex::new(lock(&old.log).take()),
            data_blocks: AtomicU64::new(old.data_blocks.load(Ordering::Relaxed)),
            tombstones: AtomicU64::new(old.tombstones.load(Ordering::Relaxed)),
        });
        chain.layers.insert(head.id, head.clone());
        chain.head = head;
        self.size_bytes.store(size_bytes, Ordering::Release);
        Ok(growth)
    }
}
