//! Flush: a marker carrying the next revision in the head's log, then the head's data and log synced.
//!
//! A flush is split in two ([`Store::flush_begin`], [`Store::flush_finish`]) so that a replica can
//! append the marker in order with its writes and run the syncs off the connection's lane.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use basalt_proto::Revision;

use super::{install_log, log, rlock, wlock, BlockState, Layer, Lba, Record, Store, StoreError, RECORD_LEN};

/// A flush whose marker is appended and whose syncs are still to do (see [`Store::flush_begin`]).
pub struct FlushTicket {
    head: Arc<Layer>,
    revision: u64,
    shift: i64,
}

impl Store {
    /// Starts writing the head's data back to disk, without waiting and without making anything
    /// durable (see [`Store::flush`]): a caller that keeps starting it while writes go on keeps the
    /// data a flush must write back small (see the replica server's module docs).
    pub fn start_writeback(&self) -> Result<(), StoreError> {
        let head = rlock(&self.chain).head.clone();
        head.data
            .start_writeback()
            .map_err(StoreError::io(format!("starting the writeback of {}", head.id)))
    }

    /// Makes every write that completed before this call durable, and returns the new revision.
    pub fn flush(&self) -> Result<Revision, StoreError> {
        let ticket = self.flush_begin()?;
        self.flush_finish(ticket)
    }

    /// The first half of [`Store::flush`]: appends the flush marker (cheap: no I/O wait) and stamps the
    /// write-intent record, so the flush takes its place in the order of the writes around it; the
    /// caller may go on with later writes before [`Store::flush_finish`] makes it durable. A replica
    /// connection does so in arrival order, which keeps the flushes of every replica in step.
    pub fn flush_begin(&self) -> Result<FlushTicket, StoreError> {
        self.check_not_failed()?;
        let (head, revision) = {
            // Exclusive only while the marker is appended: no write is then between its record and
            // its data, so every record before the marker has its data in the page cache.
            let chain = wlock(&self.chain);
            let revision = self.next_revision.fetch_add(1, Ordering::AcqRel) + 1;
            self.append_marker(&chain.head, Revision(revision))?;
            self.intent.commit(Revision(revision), self.epoch());
            (chain.head.clone(), revision)
        };
        Ok(FlushTicket {
            head,
            revision,
            shift: self.revision_shift.load(Ordering::Acquire),
        })
    }

    /// Makes every write that completed before this call durable, like [`Store::flush`], without
    /// taking a revision: for the flushes a replica makes on its own -- a snapshot merge's end, a
    /// clean shutdown -- not at a place in the controller's stream. Revisions number the stream's
    /// flushes, the same flush on every replica; one taken here would shift this replica's
    /// numbering against the others', and the write-intent record would then answer for the wrong
    /// flush (see `intent`). The next numbered flush stamps what this one made durable.
    pub fn flush_unnumbered(&self) -> Result<(), StoreError> {
        self.check_not_failed()?;
        let head = {
            // As in `flush_begin`: no write between its record and its data while the marker goes in.
            let chain = wlock(&self.chain);
            self.append_marker(&chain.head, Revision(self.next_revision.load(Ordering::Acquire)))?;
            // The marker ends the log's unflushed tail, which is where a reopen would have found
            // the regions written since the last numbered flush: the record keeps them itself.
            self.intent.keep_pending();
            chain.head.clone()
        };
        self.sync_layer(&head)
    }

    /// Appends the records of `blocks` to a layer's log, in one append; a failure fails the store.
    pub(super) fn append_block_records(
        &self,
        layer: &Layer,
        blocks: &[(u64, BlockState)],
    ) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(blocks.len() * RECORD_LEN);
        log::encode_into(
            &mut records,
            blocks
                .iter()
                .map(|&(lba, state)| Record::Block { lba: Lba(lba), state }),
        );
        layer.append_log(&records, blocks.len() as u64).map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("appending to the index log of {}", layer.id),
                source: e,
            })
        })
    }

    /// Appends a flush marker for `revision` to a layer's log; a failure fails the store (the log's
    /// state is then unknown). Callers hold the chain lock exclusively (see [`Store::flush_begin`]).
    pub(super) fn append_marker(&self, layer: &Layer, revision: Revision) -> Result<(), StoreError> {
        let marker = Record::Flush { revision }.encode();
        layer.append_log(&marker, 1).map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("appending a flush marker to {}", layer.id),
                source: e,
            })
        })
    }

    /// Syncs a layer's data, then its log. After a failed fsync the page cache state is unknown
    /// (fsyncgate): the store fails, and only a reopen is safe.
    pub(super) fn sync_layer(&self, layer: &Layer) -> Result<(), StoreError> {
        layer.data.sync().map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("syncing the data of {}", layer.id),
                source: e,
            })
        })?;
        layer.sync_log().map_err(|e| {
            self.fail(StoreError::Io {
                context: format!("syncing the index log of {}", layer.id),
                source: e,
            })
        })
    }

    /// The second half of [`Store::flush`]: syncs data and log, and returns the flush's revision (in
    /// the current numbering, should the replica have been renumbered meanwhile).
    pub fn flush_finish(&self, ticket: FlushTicket) -> Result<Revision, StoreError> {
        let FlushTicket {
            head,
            revision,
            shift,
        } = ticket;
        self.sync_layer(&head)?;
        let moved = self.revision_shift.load(Ordering::Acquire) - shift;
        let revision = revision.saturating_add_signed(moved);
        self.revision.fetch_max(revision, Ordering::AcqRel);
        self.maybe_compact_head(&head)?;
        Ok(Revision(revision))
    }

    /// Rewrites the head's log when most of its records are superseded, so replay at open stays
    /// proportional to what the head holds.
    fn maybe_compact_head(&self, head: &Arc<Layer>) -> Result<(), StoreError> {
        if !head.log_wants_compaction() {
            return Ok(());
        }
        let chain = wlock(&self.chain);
        if !Arc::ptr_eq(&chain.head, head) {
            return Ok(());
        }
        let blocks: Vec<(u64, BlockState)> = rlock(&self.map).blocks_of(head.id).collect();
        let revision = Revision(self.next_revision.load(Ordering::Acquire));
        install_log(&*self.backend, head, blocks.into_iter(), revision, true).map_err(|e| self.fail(e))
    }
}
