//! Snapshots: create (freeze the head), list, delete (merge into the child, journaled, online) and
//! revert (a fresh head on top of a snapshot). See the store's module doc, "Snapshots".

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_proto::Revision;

use super::{
    install_log, load_index, lock, now_unix_ms, rlock, wlock, BlockState, Entry, LayerId, Lba, LogAppender,
    MapBuilder, PendingMerge, SnapshotRecord, Store, StoreError, BLOCK, BLOCK_SIZE,
};

/// Blocks copied per merge step; writes to those blocks wait for at most one step.
const MERGE_BATCH_BLOCKS: usize = 256;

/// One snapshot as listed by [`Store::snapshot_list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its unique name.
    pub name: String,
    /// When it was taken.
    pub created: SystemTime,
    /// The snapshot below it, `None` for the oldest.
    pub parent: Option<String>,
    /// Bytes of data it holds itself (4 KiB per block it holds; tombstones count nothing).
    pub allocated_bytes: u64,
}

fn validate_snapshot_name(name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidSnapshotName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

impl Store {
    /// Takes a snapshot of the volume as it is now (after an implicit flush). Atomic: after a crash
    /// either the snapshot exists or the volume is as if it was never asked for.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo, StoreError> {
        validate_snapshot_name(name)?;
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        if lock(&self.meta).snapshot_index(name).is_some() {
            return Err(StoreError::SnapshotExists(name.to_string()));
        }
        let mut chain = wlock(&self.chain);
        let old = chain.head.clone();
        // Freeze the head: data synced, log ending in a marker. The log is rewritten only when most
        // of it is superseded; otherwise the marker is appended, like a flush's: rewriting it always
        // would make the first snapshot of a large head write and sync a whole new log while all I/O
        // waits.
        let revision = Revision(self.next_revision.fetch_add(1, Ordering::AcqRel) + 1);
        if old.log_wants_compaction() {
            let blocks: Vec<(u64, BlockState)> = rlock(&self.map).blocks_of(old.id).collect();
            install_log(&*self.backend, &old, blocks.into_iter(), revision, true)
                .map_err(|e| self.fail(e))?;
        } else {
            self.append_marker(&old, revision)?;
            self.sync_layer(&old)?;
        }
        self.revision.fetch_max(revision.0, Ordering::AcqRel);
        self.intent.commit(revision, self.epoch());

        let mut meta = lock(&self.meta);
        let new_id = LayerId(meta.next_layer);
        Self::create_layer_objects(&*self.backend, new_id, self.size_bytes())?;
        let created_unix_ms = now_unix_ms();
        let mut next = meta.clone();
        next.snapshots.push(SnapshotRecord {
            layer: old.id,
            name: name.to_string(),
            created_unix_ms,
        });
        next.head = new_id;
        next.next_layer += 1;
        next.revision = revision;
        let parent = meta.snapshots.last().map(|s| s.name.clone());
        let new_head = Self::open_layer(&*self.backend, new_id, self.size_bytes())
            .and_then(|layer| {
                *lock(&layer.log) = Some(LogAppender::open(&*self.backend, &new_id.log_object(), 0, 0)?);
                Ok(layer)
            })
            .and_then(|layer| next.store(&*self.backend).map(|()| layer));
        let new_head = match new_head {
            Ok(layer) => Arc::new(layer),
            Err(e) => {
                // Not committed: the old head stays the head; the new objects are orphans.
                let _ = self.backend.remove(&new_id.data_object());
                let _ = self.backend.remove(&new_id.log_object());
                return Err(e);
            }
        };
        *meta = next;
        // Frozen: the log's appender goes, and with it any preallocated tail past its last record
        // (zeros, a clean end either way, so a crash before this truncation costs only space).
        if let Some(appender) = lock(&old.log).take() {
            let (object, len) = (appender.object.clone(), appender.len);
            drop(appender); // unmapped before the file shrinks under it
            if let Err(e) = object.truncate(len) {
                tracing::warn!(layer = %old.id, error = %e, "could not trim the frozen index log's preallocated tail");
            }
        }
        chain.layers.insert(new_id, new_head.clone());
        chain.head = new_head;
        Ok(SnapshotInfo {
            name: name.to_string(),
            created: UNIX_EPOCH + Duration::from_millis(created_unix_ms),
            parent,
            allocated_bytes: old.data_blocks.load(Ordering::Relaxed) * BLOCK_SIZE,
        })
    }

    /// The snapshots, oldest first.
    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        let chain = rlock(&self.chain);
        let meta = lock(&self.meta);
        let mut parent = None;
        meta.snapshots
            .iter()
            .map(|s| {
                let held = chain
                    .layers
                    .get(&s.layer)
                    .map_or(0, |l| l.data_blocks.load(Ordering::Relaxed));
                SnapshotInfo {
                    name: s.name.clone(),
                    created: UNIX_EPOCH + Duration::from_millis(s.created_unix_ms),
                    parent: parent.replace(s.name.clone()),
                    allocated_bytes: held * BLOCK_SIZE,
                }
            })
            .collect()
    }

    /// Deletes a snapshot by merging its blocks into its child (the next snapshot, or the head), online:
    /// reads and writes go on between merge steps. Crash-safe at every step (re-run at open).
    pub fn snapshot_delete(&self, name: &str) -> Result<(), StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        self.check_not_held([name])?;
        let merge = {
            let mut meta = lock(&self.meta);
            let i = meta
                .snapshot_index(name)
                .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))?;
            let merge = PendingMerge {
                from: meta.snapshots[i].layer,
                into: meta.snapshots.get(i + 1).map_or(meta.head, |s| s.layer),
            };
            let mut next = meta.clone();
            next.pending_merge = Some(merge);
            next.revision = next.revision.max(self.revision());
            next.store(&*self.backend)?;
            *meta = next;
            merge
        };
        self.run_merge(merge)
    }

    /// Carries out a journaled merge (see the module documentation). The caller holds `ops`.
    pub(super) fn run_merge(&self, merge: PendingMerge) -> Result<(), StoreError> {
        let volume_blocks = self.size_bytes() / BLOCK_SIZE;
        let (from, into, into_is_head) = {
            let chain = rlock(&self.chain);
            (
                chain.layer(merge.from)?.clone(),
                chain.layer(merge.into)?.clone(),
                chain.head.id == merge.into,
            )
        };
        let from_blocks: Vec<(u64, BlockState)> = load_index(&*self.backend, &from, volume_blocks)?
            .blocks
            .into_vec();
        // What the child holds: for the head the map says it (the head is the newest layer); a snapshot
        // child's own index is read from its log and kept up to date here.
        let mut into_index = if into_is_head {
            None
        } else {
            let index = load_index(&*self.backend, &into, volume_blocks)?;
            *lock(&into.log) = Some(LogAppender::open_at_end(
                &*self.backend,
                &into.id.log_object(),
                false,
            )?);
            Some(BTreeMap::from_iter(index.blocks.into_vec()))
        };

        let mut block = vec![0u8; BLOCK];
        for batch in from_blocks.chunks(MERGE_BATCH_BLOCKS) {
            let chain = rlock(&self.chain);
            let _stripes = self.lock_stripes_write(batch.iter().map(|&(lba, _)| lba));
            let copies: Vec<(u64, BlockState)> = {
                let map = rlock(&self.map);
                batch
                    .iter()
                    .copied()
                    .filter(|&(lba, _)| match &into_index {
                        Some(index) => !index.contains_key(&lba),
                        None => map.get(lba).is_none_or(|e| e.layer != into.id),
                    })
                    .collect()
            };
            if copies.is_empty() {
                continue;
            }
            self.append_block_records(&into, &copies)?;
            for &(lba, state) in &copies {
                if let BlockState::Data { .. } = state {
                    // Copied as stored, CRC included: a block that was corrupt in the snapshot stays
                    // detectably corrupt rather than being silently blessed.
                    let offset = Lba(lba).byte_offset();
                    from.data
                        .read_at(&mut block, offset)
                        .map_err(StoreError::io(format!(
                            "reading {} of {} to merge it",
                            Lba(lba),
                            from.id
                        )))?;
                    into.data.write_at(&block, offset).map_err(|e| {
                        self.fail(StoreError::Io {
                            context: format!("writing {} of {}", Lba(lba), into.id),
                            source: e,
                        })
                    })?;
                }
            }
            let mut map = wlock(&self.map);
            for &(lba, state) in &copies {
                into.account(None, state);
                if map.get(lba).is_some_and(|e| e.layer == from.id) {
                    map.insert(
                        lba,
                        Entry {
                            layer: into.id,
                            state,
                        },
                    );
                }
                if let Some(index) = into_index.as_mut() {
                    index.insert(lba, state);
                }
            }
            drop(chain);
        }

        // The child now holds everything the parent contributed: make it durable before the commit.
        match into_index {
            None => {
                self.flush_unnumbered()?;
            }
            Some(index) => {
                install_log(&*self.backend, &into, index.into_iter(), self.revision(), false)
                    .map_err(|e| self.fail(e))?;
            }
        }
        {
            let mut chain = wlock(&self.chain);
            let mut meta = lock(&self.meta);
            let mut next = meta.clone();
            next.snapshots.retain(|s| s.layer != from.id);
            next.pending_merge = None;
            next.revision = next.revision.max(self.revision());
            next.store(&*self.backend)?;
            *meta = next;
            chain.layers.remove(&from.id);
            self.views.chain_changed();
        }
        for name in [from.id.data_object(), from.id.log_object()] {
            if let Err(e) = self.backend.remove(&name) {
                tracing::warn!(object = %name, error = %e, "could not remove a merged snapshot; it is removed at next open");
            }
        }
        Ok(())
    }

    /// Reverts the volume to a snapshot: a fresh empty head on top of it. The old head and every
    /// snapshot newer than it are removed (the chain is a chain, not a tree). The revision is raised.
    pub fn snapshot_revert(&self, name: &str) -> Result<(), StoreError> {
        let _ops = lock(&self.ops);
        self.check_not_failed()?;
        let mut chain = wlock(&self.chain);
        let mut meta = lock(&self.meta);
        let i = meta
            .snapshot_index(name)
            .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))?;
        // The snapshots newer than the target go: none of them may be held.
        if let Some((held, holders)) = meta.snapshots[i + 1..]
            .iter()
            .map(|s| (s.name.clone(), meta.holders_of(&s.name)))
            .find(|(_, holders)| !holders.is_empty())
        {
            return Err(StoreError::SnapshotHeld { name: held, holders });
        }
        let target = meta.snapshots[i].layer;
        let new_id = LayerId(meta.next_layer);
        Self::create_layer_objects(&*self.backend, new_id, self.size_bytes())?;
        let new_head = Self::open_layer(&*self.backend, new_id, self.size_bytes())?;
        *lock(&new_head.log) = Some(LogAppender::open(&*self.backend, &new_id.log_object(), 0, 0)?);

        let revision = Revision(self.next_revision.fetch_add(1, Ordering::AcqRel) + 1);
        let mut next = meta.clone();
        next.snapshots.truncate(i + 1);
        next.head = new_id;
        next.next_layer += 1;
        next.revision = revision;
        if let Err(e) = next.store(&*self.backend) {
            let _ = self.backend.remove(&new_id.data_object());
            let _ = self.backend.remove(&new_id.log_object());
            return Err(e);
        }
        *meta = next;
        drop(meta);
        self.revision.fetch_max(revision.0, Ordering::AcqRel);
        self.intent
            .reverted(revision, self.epoch())
            .map_err(|e| self.fail(e))?;
        let dropped: Vec<LayerId> = chain.layers.keys().copied().filter(|&id| id > target).collect();
        for id in &dropped {
            chain.layers.remove(id);
        }
        let new_head = Arc::new(new_head);
        chain.layers.insert(new_id, new_head.clone());
        chain.head = new_head;

        // Rebuild the merged view from the layers that remain.
        let volume_blocks = self.size_bytes() / BLOCK_SIZE;
        let mut map = MapBuilder::default();
        for (&id, layer) in &chain.layers {
            if id == new_id {
                continue;
            }
            let index = load_index(&*self.backend, layer, volume_blocks).map_err(|e| self.fail(e))?;
            map.add_layer(id, index.blocks);
        }
        *wlock(&self.map) = map.build();
        self.views.chain_changed();
        drop(chain);
        for id in dropped {
            for name in [id.data_object(), id.log_object()] {
                if let Err(e) = self.backend.remove(&name) {
                    tracing::warn!(object = %name, error = %e, "could not remove a reverted layer; it is removed at next open");
                }
            }
        }
        Ok(())
    }
}
