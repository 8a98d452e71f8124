//! Online rebuild: bring a replica (new, returning, or stale) back to RW
//! while I/O goes on.
//!
//! ```text
//!  1. connect + Hello at the volume's epoch   (the replica now refuses older controllers)
//!  2. attach as WO                            every new write reaches it from here on
//!  3. list block checksums on a RW source and on the target
//!  4. copy what differs, through the core     (ordered with guest writes; a copy overtaken
//!                                              by a guest write is read again)
//!  5. flush, then promote to RW
//! ```
//!
//! Only allocated blocks travel, and for a replica that comes back with most
//! of its data only the blocks whose checksums differ (a delta rebuild). The
//! snapshot chain is not touched: no system snapshot is taken for a rebuild.
//!
//! The [`Rebuilder`] also re-adds replicas that failed and come back at the
//! same address, retrying with back-off.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_proto::frame::{BlockCrc, Message};
use futures::stream::{self, StreamExt};

use super::core::ReplicaMode;
use super::link::{Handshaken, LinkError};
use super::Volume;

/// Largest single copy: 1 MiB (256 blocks). Big enough to stream, small
/// enough that a copy overtaken by a guest write costs little to redo.
const MAX_COPY: u64 = 1 << 20;
/// Copies in flight at once during a rebuild: enough to keep a replica busy
/// over loopback without starving guest I/O of the core's attention.
const COPY_DEPTH: usize = 16;
/// Block checksums asked for per request (48 MiB of volume per page of
/// 12,288 entries at 12 bytes each would be tiny; 2^16 blocks = 256 MiB of
/// volume and at most 768 KiB of answer).
const CRC_PAGE_BLOCKS: u64 = 1 << 16;
const BLOCK: u64 = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off between attempts to re-add a failed replica.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why a rebuild stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("replica {addr} holds volume {found}, not this volume ({expected}); refusing to overwrite it")]
    OtherVolume {
        addr: String,
        found: String,
        expected: String,
    },
    #[error("replica {addr} is {found} bytes, the volume is {expected} bytes")]
    Size { addr: String, found: u64, expected: u64 },
    #[error(
        "replica {addr} has accepted epoch {found}, newer than ours ({ours}): this controller is fenced"
    )]
    Fenced { addr: String, found: u64, ours: u64 },
    #[error("no read-write replica to rebuild from")]
    NoSource,
    #[error("{0}")]
    Volume(String),
}

/// Progress of one rebuild, for `volume info` and metrics.
#[derive(Debug)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub started: Instant,
    /// A delta rebuild (the replica already held most of the data).
    pub delta: AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
            delta: AtomicBool::new(false),
        }
    }

    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        self.done.load(Ordering::Relaxed) as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }
}

/// Rebuilds in progress and replicas removed for good.
#[derive(Default)]
pub struct Rebuilder {
    running: Mutex<HashMap<usize, Arc<Progress>>>,
    removed: Mutex<HashSet<String>>,
    fenced: AtomicBool,
}

impl Rebuilder {
    pub fn new() -> Arc<Rebuilder> {
        Arc::new(Rebuilder::default())
    }

    /// Progress of the rebuild of replica `index`, if one is running.
    pub fn progress(&self, index: usize) -> Option<Arc<Progress>> {
        self.running.lock().expect("rebuild table").get(&index).cloned()
    }

    /// Never re-add `addr` again (`basalt replica rm`).
    pub fn forget(&self, addr: &str) {
        self.removed
            .lock()
            .expect("rebuild table")
            .insert(addr.to_string());
    }

    pub fn is_forgotten(&self, addr: &str) -> bool {
        self.removed.lock().expect("rebuild table").contains(addr)
    }

    pub fn unforget(&self, addr: &str) {
        self.removed.lock().expect("rebuild table").remove(addr);
    }

    /// Start rebuilding replica `index` at `addr` in the background, unless
    /// a rebuild of it is already running. Returns whether one was started.
    pub fn start(self: &Arc<Self>, volume: &Volume, index: usize, addr: String) -> bool {
        let progress = {
            let mut running = self.running.lock().expect("rebuild table");
            if running.contains_key(&index) {
                return false;
            }
            let p = Arc::new(Progress::new());
            running.insert(index, p.clone());
            p
        };
        let this = self.clone();
        let volume = volume.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            match rebuild(&volume, index, &addr, &progress).await {
                Ok(()) => tracing::info!(
                    replica = %addr,
                    bytes = progress.done.load(Ordering::Relaxed),
                    delta = progress.delta.load(Ordering::Relaxed),
                    seconds = started.elapsed().as_secs_f64(),
                    "replica RW: rebuild complete"
                ),
                Err(RebuildError::Fenced { .. }) => {
                    this.fenced.store(true, Ordering::Relaxed);
                    tracing::error!(replica = %addr, "rebuild stopped: a newer controller owns this volume");
                }
                Err(e) => {
                    tracing::warn!(replica = %addr, error = %e, "rebuild failed; will retry");
                    volume.drop_replica(index, format!("rebuild failed: {e}"));
                }
            }
            volume.metrics.rebuild_done.with_label_values(&[&addr]).set(0);
            volume.metrics.rebuild_total.with_label_values(&[&addr]).set(0);
            this.running.lock().expect("rebuild table").remove(&index);
        });
        true
    }

    /// Watch for failed replicas that answer again and rebuild them, with
    /// back-off per replica, until `shutdown`.
    pub async fn watch(self: Arc<Self>, volume: Volume, shutdown: tokio_util::sync::CancellationToken) {
        let mut next_try: HashMap<String, (Instant, Duration)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.fenced.load(Ordering::Relaxed) {
                return;
            }
            let Some(status) = volume.status().await else {
                return;
            };
            for (index, r) in status.replicas.iter().enumerate() {
                if !matches!(r.mode, ReplicaMode::Error { .. })
                    || self.removed.lock().expect("rebuild table").contains(&r.address)
                    || self.progress(index).is_some()
                {
                    continue;
                }
                let now = Instant::now();
                let (when, backoff) = next_try.get(&r.address).copied().unwrap_or((now, RETRY_MIN));
                if now < when {
                    continue;
                }
                // Only start a rebuild once the replica answers: a quick
                // probe, so a dead one costs nothing but the attempt.
                let probe = Handshaken::connect(
                    &r.address,
                    basalt_proto::VolumeId(uuid::Uuid::nil()),
                    basalt_proto::Epoch(0),
                    Duration::from_secs(1),
                )
                .await;
                if probe.is_ok() {
                    tracing::info!(replica = %r.address, "failed replica answers again; rebuilding it");
                    self.start(&volume, index, r.address.clone());
                    next_try.insert(r.address.clone(), (now + RETRY_MIN, RETRY_MIN));
                } else {
                    next_try.insert(r.address.clone(), (now + backoff, (backoff * 2).min(RETRY_MAX)));
                }
            }
        }
    }
}

/// Run one rebuild to completion (see the module docs).
async fn rebuild(volume: &Volume, index: usize, addr: &str, progress: &Progress) -> Result<(), RebuildError> {
    let spec = volume.spec();
    let (epoch, size) = (spec.epoch, spec.size_bytes);
    let conn = Handshaken::connect(addr, spec.volume, epoch, CONNECT_TIMEOUT).await?;
    let id = conn.identity;
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
    if id.size_bytes != size {
        return Err(RebuildError::Size {
            addr: addr.into(),
            found: id.size_bytes,
            expected: size,
        });
    }
    // Its epoch is ours now (Hello raised it): older controllers are fenced
    // out of it before it receives a single write.
    let mut target_meta = Handshaken::connect(addr, spec.volume, epoch, CONNECT_TIMEOUT).await?;
    volume
        .attach(index, conn)
        .await
        .map_err(|e| RebuildError::Volume(e.to_string()))?;
    tracing::info!(replica = %addr, "replica WO: rebuild started");

    let status = volume
        .status()
        .await
        .ok_or_else(|| RebuildError::Volume("the volume stopped".into()))?;
    let source_addr = status
        .replicas
        .iter()
        .find(|r| r.mode == ReplicaMode::ReadWrite)
        .map(|r| r.address.clone())
        .ok_or(RebuildError::NoSource)?;
    let mut source_meta = Handshaken::connect(&source_addr, spec.volume, epoch, CONNECT_TIMEOUT).await?;

    // Listed after the attach: anything written before it is in the
    // source's list, anything after reaches the target directly.
    let source = block_crcs(&mut source_meta, &source_addr, epoch, size).await?;
    let target = block_crcs(&mut target_meta, addr, epoch, size).await?;
    progress.delta.store(!target.is_empty(), Ordering::Relaxed);
    let runs = runs_to_copy(&source, &target);
    let total: u64 = runs.iter().map(|(_, len)| *len as u64).sum();
    progress.total.store(total, Ordering::Relaxed);
    volume
        .metrics
        .rebuild_total
        .with_label_values(&[addr])
        .set(total as i64);
    tracing::info!(
        replica = %addr, source = %source_addr, bytes = total,
        source_blocks = source.len(), target_blocks = target.len(), "rebuild: copying what differs"
    );

    let mut copies = stream::iter(runs)
        .map(|(offset, len)| async move { volume.copy(index, offset, len).await.map(|_| len) })
        .buffer_unordered(COPY_DEPTH);
    while let Some(done) = copies.next().await {
        let len = done.map_err(|e| RebuildError::Volume(e.to_string()))?;
        let d = progress.done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        volume
            .metrics
            .rebuild_done
            .with_label_values(&[addr])
            .set(d as i64);
    }
    // Make what was copied durable before the replica counts as holding it.
    // (On the target's own connection: a guest flush would be refused while
    // the volume is degraded, and this one concerns the target alone.)
    match target_meta.request(addr, epoch, Message::Flush).await? {
        Message::FlushOk { .. } => {}
        other => {
            return Err(RebuildError::Volume(format!(
                "unexpected answer to a flush: {:?}",
                other.op()
            )))
        }
    }
    volume.promote(index);
    Ok(())
}

/// Every allocated block of a replica's volume, with its CRC32, in order.
async fn block_crcs(
    conn: &mut Handshaken,
    addr: &str,
    epoch: basalt_proto::Epoch,
    size: u64,
) -> Result<Vec<BlockCrc>, RebuildError> {
    let mut all = Vec::new();
    let blocks = size / BLOCK;
    let mut start = 0;
    while start < blocks {
        let count = CRC_PAGE_BLOCKS.min(blocks - start);
        match conn
            .request(
                addr,
                epoch,
                Message::BlockCrcs {
                    start_lba: start,
                    count,
                },
            )
            .await?
        {
            Message::BlockCrcsOk(page) => all.extend(page),
            other => {
                return Err(RebuildError::Volume(format!(
                    "unexpected answer to a checksum listing: {:?}",
                    other.op()
                )))
            }
        }
        start += count;
    }
    Ok(all)
}

/// The byte ranges to copy from source to target: blocks the source holds
/// with another checksum than the target's (or that the target lacks), and
/// blocks only the target holds (the copy brings the source's zeros).
/// Adjacent blocks coalesce into runs of at most [`MAX_COPY`].
fn runs_to_copy(source: &[BlockCrc], target: &[BlockCrc]) -> Vec<(u64, u32)> {
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
    fn runs_stop_at_one_mebibyte() {
        let source: Vec<BlockCrc> = (0..300).map(|lba| BlockCrc { lba, crc: 0 }).collect();
        let runs = runs_to_copy(&source, &[]);
        assert_eq!(runs, vec![(0, 1 << 20), (1 << 20, 44 * 4096)]);
    }
}
