//! Step 2: make the target's snapshot chain the source's -- keep the common prefix, drop the rest,
//! and replay the source's remaining snapshots layer by layer (see "The snapshot chain" in [`super`]).

use std::sync::atomic::Ordering;

use basalt_proto::client::ReplicaClient;
use basalt_proto::frame::{LayerBlock, LayerBlockState, Message};
use basalt_proto::pb::replica as pb;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};

use crate::volume::Volume;

use super::replicas::{call_bounded, Pair};
use super::{Progress, RebuildError, BLOCK, MAX_COPY};

/// Layer runs (a source read and a target write, or a tombstone run) in
/// flight at once while a chain is replayed: like [`COPY_DEPTH`], enough to
/// keep both replicas busy over loopback.
const REPLAY_DEPTH: usize = 16;

/// What a tombstone run writes before it unmaps (see the module docs); one
/// static buffer shared by every such write, never copied.
static ZEROS: [u8; MAX_COPY as usize] = [0; MAX_COPY as usize];

/// A run of adjacent blocks of one layer, all data or all tombstones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LayerRun {
    lba: u64,
    blocks: u64,
    tombstones: bool,
}

impl LayerRun {
    fn offset(&self) -> u64 {
        self.lba * BLOCK
    }

    fn len(&self) -> u64 {
        self.blocks * BLOCK
    }
}

/// Coalesces a layer's blocks (in block order) into runs of one kind of at
/// most [`MAX_COPY`] bytes.
fn layer_runs(blocks: &[LayerBlock]) -> Vec<LayerRun> {
    let mut runs: Vec<LayerRun> = Vec::new();
    for b in blocks {
        let tombstones = b.state == LayerBlockState::Tombstone;
        match runs.last_mut() {
            Some(r) if r.lba + r.blocks == b.lba && r.tombstones == tombstones && r.len() < MAX_COPY => {
                r.blocks += 1
            }
            _ => runs.push(LayerRun {
                lba: b.lba,
                blocks: 1,
                tombstones,
            }),
        }
    }
    runs
}

/// The names of a chain, oldest first, for messages.
fn names(chain: &[pb::SnapshotInfo]) -> String {
    chain
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Pair {
    async fn chain(client: &ReplicaClient, addr: &str) -> Result<Vec<pb::SnapshotInfo>, RebuildError> {
        match call_bounded(client, Message::SnapshotList).await {
            Ok(Message::SnapshotListOk(chain)) => Ok(chain),
            Ok(other) => Err(RebuildError::Volume(format!(
                "replica {addr} answered a snapshot list with {:?}",
                other.op()
            ))),
            Err(source) => Err(RebuildError::Replica {
                addr: addr.to_string(),
                what: "listing snapshots".into(),
                source,
            }),
        }
    }

    /// Step 2 of the module docs: make the target's chain the source's.
    /// Returns whether snapshots were replayed (the chains differed).
    pub(super) async fn sync_chain(
        &self,
        volume_blocks: u64,
        volume: &Volume,
        progress: &Progress,
    ) -> Result<bool, RebuildError> {
        let source = Self::chain(&self.source, &self.source_addr).await?;
        let target = Self::chain(&self.target, &self.addr).await?;
        let common = source
            .iter()
            .zip(&target)
            .take_while(|(s, t)| s.name == t.name)
            .count();
        if common == source.len() && common == target.len() {
            tracing::info!(replica = %self.addr, snapshots = common, "rebuild: the snapshot chain matches the source's");
            return Ok(false);
        }
        let replay = &source[common..];
        let bytes: u64 = replay.iter().map(|s| s.allocated_bytes).sum();
        progress.total.fetch_add(bytes, Ordering::Relaxed);
        volume
            .metrics
            .rebuild_total
            .with_label_values(&[&self.addr])
            .set(progress.total.load(Ordering::Relaxed) as i64);
        progress.delta.store(common > 0, Ordering::Relaxed);
        tracing::info!(
            replica = %self.addr, source = %self.source_addr,
            source_chain = %names(&source), target_chain = %names(&target),
            kept = common, replayed = replay.len(), bytes,
            "rebuild: replaying the source's snapshot chain"
        );
        let request = match common.checked_sub(1).map(|i| &source[i].name) {
            None => Message::Reset,
            Some(name) => Message::SnapshotRevert { name: name.clone() },
        };
        let what = format!("dropping the snapshots that differ ({:?})", request.op().0);
        match call_bounded(&self.target, request)
            .await
            .map_err(self.on_target(what))?
        {
            Message::ResetOk | Message::SnapshotRevertOk => {}
            other => {
                return Err(RebuildError::Volume(format!(
                    "replica {} answered a reset with {:?}",
                    self.addr,
                    other.op()
                )))
            }
        }
        for snapshot in replay {
            self.replay_layer(&snapshot.name, volume_blocks, volume, progress)
                .await?;
            call_bounded(
                &self.target,
                Message::SnapshotCreate {
                    name: snapshot.name.clone(),
                },
            )
            .await
            .map_err(self.on_target(format!("creating snapshot {:?}", snapshot.name)))?;
            tracing::info!(replica = %self.addr, snapshot = %snapshot.name, "rebuild: snapshot replayed");
        }
        Ok(true)
    }

    /// Copies the blocks snapshot `name` holds itself from the source onto
    /// the target's head, page by page, [`REPLAY_DEPTH`] runs in flight.
    async fn replay_layer(
        &self,
        name: &str,
        volume_blocks: u64,
        volume: &Volume,
        progress: &Progress,
    ) -> Result<(), RebuildError> {
        let mut start = 0;
        while start < volume_blocks {
            let listing = call_bounded(
                &self.source,
                Message::LayerBlocks {
                    snapshot: name.to_string(),
                    start_lba: start,
                    count: volume_blocks - start,
                },
            )
            .await
            .map_err(self.on_source(format!("listing the blocks of snapshot {name:?}")))?;
            let Message::LayerBlocksOk { blocks, end_lba } = listing else {
                return Err(RebuildError::Volume(format!(
                    "replica {} answered a layer listing with {:?}",
                    self.source_addr,
                    listing.op()
                )));
            };
            if end_lba <= start || blocks.iter().any(|b| b.lba < start || b.lba >= end_lba) {
                return Err(RebuildError::Volume(format!(
                    "replica {} listed snapshot {name:?} from block {start} inconsistently (up to {end_lba})",
                    self.source_addr
                )));
            }
            stream::iter(layer_runs(&blocks))
                .map(|run| self.replay_run(name, run))
                .buffer_unordered(REPLAY_DEPTH)
                .try_for_each(|bytes| {
                    let done = progress.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    volume
                        .metrics
                        .rebuild_done
                        .with_label_values(&[&self.addr])
                        .set(done as i64);
                    futures::future::ready(Ok(()))
                })
                .await?;
            start = end_lba;
        }
        Ok(())
    }

    /// Copies one run; returns the bytes of data it copied.
    async fn replay_run(&self, name: &str, run: LayerRun) -> Result<u64, RebuildError> {
        let (offset, len) = (run.offset(), run.len());
        if run.tombstones {
            // Both are queued now, in this order, on one connection: the
            // replica applies the unmap after the zeros.
            let zeros = self
                .target
                .write(offset, Bytes::from_static(&ZEROS[..len as usize]), false);
            let unmap = self.target.unmap(offset, len);
            zeros
                .await
                .map_err(self.on_target(format!("writing zeros under tombstones at byte {offset}")))?;
            unmap
                .await
                .map_err(self.on_target(format!("replaying tombstones at byte {offset}")))?;
            return Ok(0);
        }
        let read = call_bounded(
            &self.source,
            Message::ReadLayer {
                snapshot: name.to_string(),
                offset,
                len: len as u32,
            },
        )
        .await
        .map_err(self.on_source(format!("reading {len} bytes at {offset} of snapshot {name:?}")))?;
        let data = match read {
            Message::ReadLayerOk { data } if data.len() as u64 == len => data,
            other => {
                return Err(RebuildError::Volume(format!(
                    "replica {} answered a layer read of {len} bytes with {:?}",
                    self.source_addr,
                    other.op()
                )))
            }
        };
        self.target
            .write(offset, data, false)
            .await
            .map_err(self.on_target(format!("writing {len} bytes at {offset} of snapshot {name:?}")))?;
        Ok(len)
    }

    /// Step 9: the target holds the source's chain, names in order.
    pub(super) async fn check_same_chain(&self) -> Result<(), RebuildError> {
        let source = Self::chain(&self.source, &self.source_addr).await?;
        let target = Self::chain(&self.target, &self.addr).await?;
        let shape = |c: &[pb::SnapshotInfo]| c.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        if shape(&source) != shape(&target) {
            return Err(RebuildError::ChainChanged {
                addr: self.addr.clone(),
                source_addr: self.source_addr.clone(),
                source_chain: names(&source),
                target_chain: names(&target),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_runs_split_at_kind_changes_gaps_and_one_mebibyte() {
        let data = |lba| LayerBlock {
            lba,
            state: LayerBlockState::Data { crc: 0 },
        };
        let tomb = |lba| LayerBlock {
            lba,
            state: LayerBlockState::Tombstone,
        };
        let mut blocks = vec![data(0), data(1), tomb(2), tomb(3), data(5)];
        blocks.extend((10..10 + 300).map(data));
        let run = |lba, blocks, tombstones| LayerRun {
            lba,
            blocks,
            tombstones,
        };
        assert_eq!(
            layer_runs(&blocks),
            vec![
                run(0, 2, false),
                run(2, 2, true),
                run(5, 1, false),
                run(10, 256, false),
                run(266, 44, false)
            ]
        );
    }
}
