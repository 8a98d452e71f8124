//! One rebuild, steps 1 to 9 of the module docs of [`super`]: connect, choose the source, make the
//! chains match, attach write-only, compare checksums where the write-intent record says, copy what
//! differs, promote, and make the copy durable at one drain.

use std::sync::atomic::Ordering;

use basalt_proto::client::ReplicaClient;
use basalt_proto::frame::{BlockRun, Message, SyncPoint, WrittenAnswer};
use futures::stream::StreamExt;

use crate::volume::core::ReplicaMode;
use crate::volume::link::Handshaken;
use crate::volume::{Volume, VolumeSpec};

use super::delta::{copies_of, copy_len, crcs_in, runs_to_copy, union_runs};
use super::pacing::{CopyPacer, TargetWriteback};
use super::replicas::{ask, client, Pair, CONNECT_TIMEOUT};
use super::{Progress, RebuildError, BLOCK};

/// Run one rebuild to completion (see the module docs).
pub(super) async fn rebuild(
    volume: &Volume,
    index: usize,
    addr: &str,
    progress: &Progress,
) -> Result<Promoted, RebuildError> {
    let spec = volume.spec();
    let (epoch, size) = (spec.epoch, volume.size_bytes());
    // The rebuild's own connection to the target first: its Hello raises
    // the epoch, and it holds the writer role (for a chain replay) until
    // the link below takes it over.
    let target = client(addr, spec, true).await?;
    let id = target.identity();
    if id.epoch > epoch {
        return Err(RebuildError::Fenced {
            addr: addr.into(),
            found: id.epoch.0,
            ours: epoch.0,
        });
    }
    if id.volume != spec.volume {
        return Err(RebuildError::OtherVolume {
            addr: addr.into(),
            found: id.volume.to_string(),
            expected: spec.volume.to_string(),
        });
    }
    if id.size_bytes > size {
        return Err(RebuildError::Size {
            addr: addr.into(),
            found: id.size_bytes,
            expected: size,
        });
    }
    if id.size_bytes < size {
        let grow = Message::Resize {
            size_bytes: size,
            check_only: false,
        };
        match ask(&target, addr, "growing it to the volume's size", grow).await? {
            Message::ResizeOk { size_bytes } if size_bytes == size => {
                tracing::info!(replica = %addr, from = id.size_bytes, to = size,
                    "rebuild: the replica missed an expansion; grown before anything is copied");
            }
            other => {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} answered a grow to {size} bytes with {:?}",
                    other.op()
                )))
            }
        }
    }
    progress.lap("connect_target");
    // Its epoch is ours now (Hello raised it): older controllers are fenced
    // out of it before it receives a single write.
    let status = volume
        .status()
        .await
        .ok_or_else(|| RebuildError::Volume("the volume stopped".into()))?;
    let candidates: Vec<String> = status
        .replicas
        .iter()
        .filter(|r| r.mode == ReplicaMode::ReadWrite)
        .map(|r| r.address.clone())
        .collect();
    let volume_blocks = size / BLOCK;
    let (source_addr, source) = choose_source(&candidates, &target, addr, spec, volume_blocks).await?;
    let replicas = Pair {
        source,
        target,
        source_addr: source_addr.clone(),
        addr: addr.to_string(),
    };
    progress.lap("connect_source");

    // The chain first, while no guest write reaches the target (a reset or
    // revert would drop them).
    let replayed = replicas.sync_chain(volume_blocks, volume, progress).await?;
    progress.lap("chain");

    // Step 3. After a replay the target holds what it was sent, not a
    // state of its own that any record could speak of.
    let target_since = if replayed {
        None
    } else {
        Some(
            replicas
                .written_since(&replicas.target, &replicas.addr, None, volume_blocks)
                .await?,
        )
    };
    progress.lap("target_record");
    replicas.leave_numbering().await?;
    progress.lap("leave_numbering");

    // The link takes the target's writer role over from the replay.
    let conn = Handshaken::connect_writer(addr, spec.volume, epoch, &spec.secret, CONNECT_TIMEOUT).await?;
    progress.lap("connect_link");

    volume
        .attach(index, conn)
        .await
        .map_err(|e| RebuildError::Volume(e.to_string()))?;
    progress.lap("attach");
    tracing::info!(replica = %addr, "replica WO: rebuild started");

    // Listed after the attach *and a settle*: a write sent before the attach
    // may still be queued at the source (the listings travel on other
    // connections, unordered with the data path), and the target never gets
    // it; once every such write is answered it is applied and listed (the
    // record and the checksums include unflushed writes, so no flush is
    // needed). Anything sent after the attach reaches the target directly.
    volume
        .settle()
        .await
        .map_err(|e| RebuildError::Volume(e.to_string()))?;
    progress.lap("settle");
    // An expansion since the start reached the target (it is attached, and
    // the attach refuses a target smaller than the volume): list up to the
    // end the volume has now.
    let volume_blocks = volume.size_bytes() / BLOCK;
    // Step 5: where to compare.
    let regions = match target_since {
        Some((position, WrittenAnswer::Regions(own))) => {
            match replicas
                .written_since(&replicas.source, &source_addr, Some(position), volume_blocks)
                .await?
            {
                (_, WrittenAnswer::Regions(theirs)) => {
                    let runs = union_runs(&theirs, &own);
                    tracing::info!(
                        replica = %addr, source = %source_addr, since = position.revision.0,
                        regions = runs.len(), blocks = runs.iter().map(|r| r.blocks).sum::<u64>(),
                        "rebuild: the source's write-intent record names the regions to compare"
                    );
                    Some(runs)
                }
                (_, WrittenAnswer::Unknown(why)) => {
                    tracing::info!(replica = %addr, source = %source_addr, reason = %why,
                        "rebuild: no usable write-intent record; comparing the checksums of the whole volume");
                    None
                }
            }
        }
        Some((_, WrittenAnswer::Unknown(why))) => {
            tracing::info!(replica = %addr, reason = %why,
                "rebuild: the target cannot say what it holds unflushed; comparing the checksums of the whole volume");
            None
        }
        None => None,
    };
    progress.lap("source_record");
    progress.from_record.store(regions.is_some(), Ordering::Relaxed);
    let compared = regions.unwrap_or_else(|| {
        vec![BlockRun {
            lba: 0,
            blocks: volume_blocks,
        }]
    });
    // Both listings at once: they are independent, and each is only a few
    // requests (see `crcs_in`).
    let (source, target) = tokio::try_join!(
        crcs_in(&replicas.source, &source_addr, &compared),
        crcs_in(&replicas.target, addr, &compared),
    )?;
    progress.lap("checksums");
    // After a replay the target holds what it was sent, not what it had.
    if !replayed {
        progress.delta.store(
            progress.from_record.load(Ordering::Relaxed) || !target.is_empty(),
            Ordering::Relaxed,
        );
    }
    let runs = runs_to_copy(&source, &target);
    let bytes: u64 = runs.iter().map(|(_, len)| *len as u64).sum();
    let total = progress.total.fetch_add(bytes, Ordering::Relaxed) + bytes;
    volume
        .metrics
        .rebuild_total
        .with_label_values(&[addr])
        .set(total as i64);
    tracing::info!(
        replica = %addr, source = %source_addr, bytes,
        source_blocks = source.len(), target_blocks = target.len(), "rebuild: copying what differs"
    );

    let copies_to_make = copies_of(&runs);
    let mut pacer = CopyPacer::new(volume, &copies_to_make);
    let mut pending = copies_to_make.into_iter().peekable();
    let mut copies = futures::stream::FuturesUnordered::new();
    let mut writeback = TargetWriteback::default();
    loop {
        let mut held = None;
        while copies.len() < pacer.depth() && pending.peek().is_some() {
            held = pacer.held_until();
            if held.is_some() {
                break;
            }
            let Some(extents) = pending.next() else {
                break;
            };
            let len = copy_len(&extents);
            pacer.spend(len);
            copies.push(async move { volume.copy(index, extents).await.map(|_| len) });
        }
        let done = match held {
            // Only the busy guest's share holds the next copy back: take
            // what completes meanwhile, and look again when it is due.
            Some(until) => tokio::select! {
                done = copies.next(), if !copies.is_empty() => done,
                () = tokio::time::sleep_until(until.into()) => continue,
            },
            None => copies.next().await,
        };
        let Some(done) = done else {
            break;
        };
        let len = done.map_err(|e| RebuildError::Volume(e.to_string()))?;
        let d = progress.done.fetch_add(len, Ordering::Relaxed) + len;
        volume
            .metrics
            .rebuild_done
            .with_label_values(&[addr])
            .set(d as i64);
        writeback.copied(len, &replicas).await?;
    }
    writeback.finish(&replicas).await?;
    progress.lap("copy");
    replicas.check_same_chain().await?;
    progress.lap("check_chain");
    // Step 8: it holds everything the sources hold, so it serves reads and
    // counts as a replica from here on. What it was sent is not yet durable
    // on it, and needs not be: every flush a guest is acknowledged from now
    // on reaches it too and covers it, and every flush acknowledged before
    // is durable on the sources, which the promotion takes nothing from.
    volume.promote(index);
    let source_index = status.replicas.iter().position(|r| r.address == source_addr);
    Ok(Promoted {
        replicas,
        source_index,
        epoch,
        volume_blocks,
    })
}

/// A rebuilt replica that was just promoted to RW: what step 9 needs.
pub(super) struct Promoted {
    replicas: Pair,
    source_index: Option<usize>,
    epoch: basalt_proto::Epoch,
    volume_blocks: u64,
}

impl Promoted {
    /// Step 9: one flush of every replica (a drain, allowed while degraded,
    /// unlike a guest flush) makes what was copied durable, and at that one
    /// flush, at one place in every replica's stream, the target takes on
    /// the source's flush numbering. Until then the target is RW but off the
    /// numbering: a controller taking over meanwhile finds it stale and
    /// rebuilds it, and no rebuild takes it as a source that can say what
    /// another replica missed. It runs after the promotion, not before:
    /// writing back a delta's scattered blocks is the disk's slowest work
    /// (as long as the whole rest of a delta rebuild: `benches/README.md`,
    /// "Rebuild"), and nothing about the data the guest sees or the
    /// durability of what it flushed waits for it.
    pub(super) async fn make_durable(
        &self,
        volume: &Volume,
        index: usize,
        progress: &Progress,
    ) -> Result<(), RebuildError> {
        let (replicas, addr) = (&self.replicas, &self.replicas.addr);
        let drained = volume
            .drain_revisions()
            .await
            .map_err(|e| RebuildError::Volume(e.to_string()))?;
        progress.lap("final_drain");
        let revision_of = |i: Option<usize>| {
            drained
                .iter()
                .find(|(c, _)| Some(*c) == i)
                .and_then(|(_, r)| r.as_ref().ok())
                .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
                .map(|b| basalt_proto::Revision(u64::from_le_bytes(b)))
        };
        match drained.iter().find(|(c, _)| *c == index) {
            Some((_, Err(e))) => {
                return Err(RebuildError::Volume(format!(
                    "the drain flush failed on {addr}: {e}"
                )))
            }
            None => {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} left the volume before what was copied to it was flushed"
                )))
            }
            Some(_) => {}
        }
        match (revision_of(self.source_index), revision_of(Some(index))) {
            (Some(at_source), Some(at_target)) => {
                let (lineage_of_source, _) = replicas
                    .written_since(&replicas.source, &replicas.source_addr, None, self.volume_blocks)
                    .await?;
                let point = SyncPoint {
                    lineage: lineage_of_source.lineage,
                    revision: at_source,
                    epoch: self.epoch,
                };
                replicas.adopt(point, at_target).await?;
            }
            _ => tracing::warn!(replica = %addr, source = %replicas.source_addr,
                "the drain did not report both revisions; the replica stays off the shared flush numbering"),
        }
        progress.lap("adopt_numbering");
        Ok(())
    }
}

/// Step 1b: the source. Every read-write replica holds the same data, but
/// not every one can say what the target missed: one that was itself just
/// rebuilt keeps no record from before its rebuild. So the first read-write
/// replica whose write-intent record answers for the target's position is
/// taken (one question each, no listing), and the first of all when none
/// does or the target cannot say where it stands -- the whole volume is
/// compared then, whichever the source. The source's connection only reads:
/// the volume's link to it keeps the writer role.
async fn choose_source(
    candidates: &[String],
    target: &ReplicaClient,
    addr: &str,
    spec: &VolumeSpec,
    volume_blocks: u64,
) -> Result<(String, ReplicaClient), RebuildError> {
    let first = candidates.first().ok_or(RebuildError::NoSource)?;
    let first_client = client(first, spec, false).await?;
    let (position, own) = record_verdict(target, addr, None, volume_blocks).await?;
    if own.is_some() {
        return Ok((first.clone(), first_client));
    }
    let mut why_not = Vec::new();
    let mut first_client = Some(first_client);
    for (i, candidate) in candidates.iter().enumerate() {
        let connected = match (i, first_client.take()) {
            (0, Some(c)) => Ok(c),
            (_, kept) => {
                first_client = kept;
                client(candidate, spec, false).await
            }
        };
        let c = match connected {
            Ok(c) => c,
            Err(e) => {
                why_not.push(format!("{candidate}: {e}"));
                continue;
            }
        };
        match record_verdict(&c, candidate, Some(position), volume_blocks).await {
            Ok((_, None)) => {
                if i > 0 {
                    tracing::info!(replica = %addr, source = %candidate, passed_over = %why_not.join("; "),
                        "rebuild: taking the first read-write replica whose write-intent record answers");
                }
                return Ok((candidate.clone(), c));
            }
            Ok((_, Some(why))) => why_not.push(format!("{candidate}: {why}")),
            Err(e) => why_not.push(format!("{candidate}: {e}")),
        }
        if i == 0 {
            first_client = Some(c);
        }
    }
    let source = match first_client {
        Some(c) => c,
        None => client(first, spec, false).await?,
    };
    tracing::info!(replica = %addr, source = %first, records = %why_not.join("; "),
        "rebuild: no read-write replica's write-intent record answers for this replica");
    Ok((first.clone(), source))
}

/// A replica's sync point, and whether its write-intent record can answer
/// for `since` (`None`: for its own last flush): `None` if it can, or why
/// not. One question, no listing (it is asked from past the last block).
async fn record_verdict(
    client: &ReplicaClient,
    addr: &str,
    since: Option<SyncPoint>,
    volume_blocks: u64,
) -> Result<(SyncPoint, Option<String>), RebuildError> {
    let question = Message::WrittenSince {
        since,
        start_lba: volume_blocks,
    };
    match ask(client, addr, "asking its write-intent record", question).await? {
        Message::WrittenSinceOk { position, answer, .. } => Ok((
            position,
            match answer {
                WrittenAnswer::Regions(_) => None,
                WrittenAnswer::Unknown(why) => Some(why),
            },
        )),
        other => Err(RebuildError::Volume(format!(
            "replica {addr} answered a write-intent question with {:?}",
            other.op()
        ))),
    }
}
