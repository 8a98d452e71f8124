//! # A clone replica's side of the wire: reading its source, and hydrating
//!
//! A clone replica (see `store::clone` for the model) talks to replicas of its *source* volume,
//! which may live on any host, over the ordinary data-path protocol:
//!
//! ```text
//!   clone replica                                      source replica (any of those given)
//!   [`prepare`]   Hello (non-writer, epoch 0) ----->   who are you? (volume, size)
//!                 SnapshotHold(S, holder) ------->     durable hold in its volume.meta
//!   [`hydrate`]   SnapshotRuns(S, from cursor) -->     runs holding data in S's view
//!                 ReadSnapshot(S, run) ---------->     S's view of the run
//!                 (fill_base, then advance_hydration: base synced, cursor stored)
//!                 ... to the end of the source, then SnapshotRelease(S, holder) on each
//!   reads of absent blocks: [`SourceReader`] as the store's `SnapshotSource`, ReadSnapshot on demand
//! ```
//!
//! The clone says Hello as a non-writer at epoch 0: a survey that neither raises the source's epoch
//! nor takes its writer role, so the source's controller is not disturbed; the clone's requests are
//! not fenced by the epoch (a snapshot never changes). Whichever source replica answers serves: all
//! of them hold the same snapshot, since it is immutable.
//!
//! Every connection to a source goes through [`connect_source`], which authenticates with the
//! *source* volume's secret (a different one from the clone's own: the clone is another volume),
//! and nowhere else. That secret is given to the clone replica like its own (from a file or the
//! environment, never the command line) and is never stored in the clone's `volume.meta`: a clone
//! restarted before it is hydrated needs it again.
//!
//! Hydration is paced ([`HydrateOptions::rate`]) so that a clone does not take its source's disk
//! from the source's own guest, and it survives everything a replica may go through: the cursor is
//! durable, a restarted clone resumes at it, and an unreachable source is retried with back-off
//! (reads of absent blocks fail meanwhile, with a clear error).

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_proto::auth::{HandshakeError, VolumeSecret};
use basalt_proto::frame::{BlockRun, Message, ReplyError};
use basalt_proto::{Epoch, VolumeId};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::store::{CloneOrigin, SnapshotSource, Store, StoreError, BLOCK_SIZE};
use basalt_proto::client::{ClientError, ReplicaClient};

/// Longest wait for a source replica to accept a connection and answer Hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one answer of a source replica (a 1 MiB read, a listing page): far more than
/// either takes on a working link, so only a hung source hits it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Blocks of the source listed per hydration step, and so between two durable cursor moves (each
/// one syncs the base and rewrites `volume.meta`): 16 MiB, a second of copying at the default pace.
const STEP_BLOCKS: u64 = 4096;
/// Bytes read from the source per request: the largest copy a rebuild makes too.
const READ_BYTES: u64 = 1 << 20;
/// Back-off between attempts when the source cannot be read, and between attempts to release the
/// holds once hydrated: up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why a clone could not be made, or its source not read.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("cannot resolve the source address {addr:?}: {detail}; give the source replica as host:port")]
    Resolve { addr: String, detail: String },
    #[error("source replica {addr}: {source}")]
    Source {
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error(
        "source replica {addr} and this clone do not share the source volume's secret: give the SOURCE \
         volume's secret (not the clone's own) with --clone-source-secret-file or BASALT_CLONE_SOURCE_SECRET"
    )]
    SourceSecret { addr: String },
    #[error("source replica {addr} did not answer within {timeout:?}; is it running and reachable?")]
    Timeout { addr: String, timeout: Duration },
    #[error(
        "source replica {addr} serves volume {found}, not {expected}: give replicas of one volume (and the \
         right --clone-source-volume)"
    )]
    WrongVolume {
        addr: String,
        expected: VolumeId,
        found: VolumeId,
    },
    #[error("source replica {addr} has no snapshot {snapshot:?}; list them with `basalt snapshot ls` on the source")]
    NoSuchSnapshot { addr: String, snapshot: String },
    #[error(
        "the clone would be {clone_bytes} bytes, smaller than its source volume ({source_bytes} bytes): give \
         --size of at least the source's"
    )]
    TooSmall { clone_bytes: u64, source_bytes: u64 },
    #[error("no source replica given: name at least one with --clone-from")]
    NoSource,
    #[error("none of the source replicas could be read: {0}")]
    Unreachable(String),
    #[error("the clone's store failed: {0}")]
    Store(#[from] StoreError),
}

/// Connects to the source replica at `addr`, checking it serves `volume` (nil: any, the caller
/// checks the identity), and authenticates both ways with `secret`, the source volume's. The one
/// place a clone connects to its source.
pub async fn connect_source(
    addr: &str,
    volume: VolumeId,
    secret: &VolumeSecret,
) -> Result<ReplicaClient, CloneError> {
    let resolved = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| CloneError::Resolve {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?
        .next()
        .ok_or_else(|| CloneError::Resolve {
            addr: addr.to_string(),
            detail: "no address found".into(),
        })?;
    // Epoch 0 is below any epoch the source has: the Hello is a survey that changes nothing there.
    let connect = ReplicaClient::connect_as(resolved, volume, Epoch(0), false, secret);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Err(_) => Err(CloneError::Timeout {
            addr: addr.to_string(),
            timeout: CONNECT_TIMEOUT,
        }),
        // Either side may be the first to find the other's proof wrong.
        Ok(Err(
            ClientError::Handshake(HandshakeError::ReplicaNotProven)
            | ClientError::Replica {
                error: ReplyError::AuthFailed,
                ..
            },
        )) => Err(CloneError::SourceSecret {
            addr: addr.to_string(),
        }),
        Ok(result) => result.map_err(|source| CloneError::Source {
            addr: addr.to_string(),
            source,
        }),
    }
}

/// Sends `message` to a source replica and waits for the answer within [`REQUEST_TIMEOUT`].
async fn ask(client: &ReplicaClient, addr: &str, message: Message) -> Result<Message, CloneError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, client.call(message)).await {
        Err(_) => Err(CloneError::Timeout {
            addr: addr.to_string(),
            timeout: REQUEST_TIMEOUT,
        }),
        Ok(Err(ClientError::Replica {
            error: ReplyError::NoSuchSnapshot,
            message,
            ..
        })) => Err(CloneError::NoSuchSnapshot {
            addr: addr.to_string(),
            snapshot: message,
        }),
        Ok(result) => result.map_err(|source| CloneError::Source {
            addr: addr.to_string(),
            source,
        }),
    }
}

/// What a clone replica is made from, as given on its command line.
#[derive(Clone, Debug)]
pub struct CloneRequest {
    /// The source's replicas (host:port); a hold is placed on each.
    pub sources: Vec<String>,
    /// The source volume, if known: every source replica must serve it.
    pub source_volume: Option<VolumeId>,
    pub snapshot: String,
    /// The source volume's secret, which every source replica checks.
    pub source_secret: VolumeSecret,
}

/// Checks every source replica (same volume, the snapshot exists, the clone is large enough) and
/// holds the snapshot on each for `holder`, before the clone's store is created. All or nothing:
/// if any check or hold fails, the holds already placed are released and nothing has changed.
pub async fn prepare(
    request: &CloneRequest,
    clone_bytes: u64,
    holder: &str,
) -> Result<CloneOrigin, CloneError> {
    if request.sources.is_empty() {
        return Err(CloneError::NoSource);
    }
    let mut volume = request.source_volume;
    let mut source_bytes = 0;
    let mut held: Vec<(String, ReplicaClient)> = Vec::new();
    let mut outcome = Ok(());
    for addr in &request.sources {
        let step = async {
            let client = connect_source(
                addr,
                volume.unwrap_or(VolumeId(uuid::Uuid::nil())),
                &request.source_secret,
            )
            .await?;
            let identity = client.identity();
            match volume {
                Some(expected) if expected != identity.volume => {
                    return Err(CloneError::WrongVolume {
                        addr: addr.clone(),
                        expected,
                        found: identity.volume,
                    })
                }
                _ => volume = Some(identity.volume),
            }
            // The smallest source replica's size: every one of them held the snapshot, so none was
            // smaller than the volume when it was taken (replicas only grow), while a larger one may
            // have been grown since (expanded) or not yet (down during the expansion). The
            // snapshot's view lies below it, and every source replica can answer for all of it.
            source_bytes = if source_bytes == 0 {
                identity.size_bytes
            } else {
                source_bytes.min(identity.size_bytes)
            };
            if identity.size_bytes > clone_bytes {
                return Err(CloneError::TooSmall {
                    clone_bytes,
                    source_bytes: identity.size_bytes,
                });
            }
            let hold = Message::SnapshotHold {
                snapshot: request.snapshot.clone(),
                holder: holder.to_string(),
            };
            match ask(&client, addr, hold).await {
                Err(CloneError::NoSuchSnapshot { addr, .. }) => Err(CloneError::NoSuchSnapshot {
                    addr,
                    snapshot: request.snapshot.clone(),
                }),
                Err(e) => Err(e),
                Ok(_) => Ok(client),
            }
        };
        match step.await {
            Ok(client) => held.push((addr.clone(), client)),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    if let Err(e) = outcome {
        for (addr, client) in &held {
            let release = Message::SnapshotRelease {
                snapshot: request.snapshot.clone(),
                holder: holder.to_string(),
            };
            if let Err(e) = ask(client, addr, release).await {
                tracing::warn!(%addr, error = %e, "could not release the hold of a clone that was not made");
            }
        }
        return Err(e);
    }
    let source_volume = volume.ok_or(CloneError::NoSource)?;
    Ok(CloneOrigin {
        source_volume,
        snapshot: request.snapshot.clone(),
        source_size_bytes: source_bytes,
        holder: holder.to_string(),
        sources: request.sources.clone(),
    })
}

/// Reads the source snapshot's view from whichever source replica answers (see the module docs).
pub struct SourceReader {
    origin: CloneOrigin,
    /// The source volume's secret (never stored with the clone).
    secret: VolumeSecret,
    runtime: tokio::runtime::Handle,
    /// The connection in use and the index of its address, if any.
    current: tokio::sync::Mutex<Option<(usize, Arc<ReplicaClient>)>>,
}

impl SourceReader {
    /// A reader of `origin`'s snapshot, authenticating with `secret` (the source volume's); it
    /// connects when first asked. `runtime` runs its I/O when the store calls it from a blocking
    /// thread.
    pub fn new(
        origin: CloneOrigin,
        secret: VolumeSecret,
        runtime: tokio::runtime::Handle,
    ) -> Arc<SourceReader> {
        Arc::new(SourceReader {
            origin,
            secret,
            runtime,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// Asks the current source replica, or the next ones in turn when it fails: every source
    /// holds the same snapshot, so any answer is the answer.
    async fn ask_any(&self, message: Message) -> Result<Message, CloneError> {
        let mut current = self.current.lock().await;
        let sources = &self.origin.sources;
        let start = current.as_ref().map_or(0, |(i, _)| *i);
        let mut failures = Vec::new();
        for attempt in 0..sources.len() {
            let i = (start + attempt) % sources.len();
            let addr = &sources[i];
            let client = match current.as_ref().filter(|(at, _)| *at == i) {
                Some((_, client)) => client.clone(),
                None => match connect_source(addr, self.origin.source_volume, &self.secret).await {
                    Ok(client) => Arc::new(client),
                    Err(e) => {
                        failures.push(e.to_string());
                        continue;
                    }
                },
            };
            match ask(&client, addr, message.clone()).await {
                Ok(answer) => {
                    *current = Some((i, client));
                    return Ok(answer);
                }
                Err(e) => {
                    failures.push(e.to_string());
                    *current = None;
                }
            }
        }
        Err(CloneError::Unreachable(failures.join("; ")))
    }

    /// The runs holding data in the snapshot's view from block `start`, and up to where the answer
    /// is complete.
    async fn runs(&self, start: u64, count: u64) -> Result<(Vec<BlockRun>, u64), CloneError> {
        let request = Message::SnapshotRuns {
            snapshot: self.origin.snapshot.clone(),
            start_lba: start,
            count,
        };
        match self.ask_any(request).await? {
            Message::SnapshotRunsOk { runs, end_lba } if end_lba > start => Ok((runs, end_lba)),
            other => Err(CloneError::Unreachable(format!(
                "the source answered a listing from block {start} with {:?}",
                other.op()
            ))),
        }
    }

    /// The snapshot's view of `count` blocks from `first`.
    async fn read_blocks(&self, first: u64, count: u32) -> Result<Bytes, CloneError> {
        let len = count as u64 * BLOCK_SIZE;
        let request = Message::ReadSnapshot {
            snapshot: self.origin.snapshot.clone(),
            offset: first * BLOCK_SIZE,
            len: len as u32,
        };
        match self.ask_any(request).await? {
            Message::ReadSnapshotOk { data } if data.len() as u64 == len => Ok(data),
            other => Err(CloneError::Unreachable(format!(
                "the source answered a read of {count} blocks from block {first} with {:?}",
                other.op()
            ))),
        }
    }

    /// Releases this clone's hold on every source replica; `Err` names those that could not be
    /// reached (to be retried).
    async fn release_all(&self) -> Result<(), String> {
        let mut failed = Vec::new();
        for addr in &self.origin.sources {
            let release = Message::SnapshotRelease {
                snapshot: self.origin.snapshot.clone(),
                holder: self.origin.holder.clone(),
            };
            let outcome = match connect_source(addr, self.origin.source_volume, &self.secret).await {
                Ok(client) => ask(&client, addr, release).await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                failed.push(format!("{addr}: {e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

impl SnapshotSource for SourceReader {
    fn read(&self, first: u64, count: u32) -> Result<Vec<u8>, String> {
        // The store calls this on a blocking thread (never on the runtime's), so waiting is fine.
        self.runtime
            .block_on(self.read_blocks(first, count))
            .map(|data| data.to_vec())
            .map_err(|e| e.to_string())
    }
}

/// How a clone hydrates.
#[derive(Clone, Copy, Debug)]
pub struct HydrateOptions {
    /// Bytes per second copied from the source at most (`None`: as fast as it goes).
    pub rate: Option<u64>,
}

/// Copies the source's view into the store's base layer from its cursor to the end, then
/// releases the holds on the source: see the module docs. Returns when done or at `shutdown`;
/// failures are retried with back-off, never given up.
pub async fn hydrate(
    store: Arc<Store>,
    reader: Arc<SourceReader>,
    options: HydrateOptions,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let mut copied = 0u64;
    let mut backoff = RETRY_MIN;
    loop {
        let Some(status) = store.clone_status() else {
            return;
        };
        if status.hydrated {
            break;
        }
        let cursor = status.hydrated_bytes / BLOCK_SIZE;
        match hydrate_step(&store, &reader, cursor, options, started, &mut copied, &shutdown).await {
            Ok(()) => backoff = RETRY_MIN,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "hydration step failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
    let mut backoff = RETRY_MIN;
    while !store.clone_status().is_some_and(|c| c.released) {
        match reader.release_all().await {
            Ok(()) => {
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.mark_source_released()).await {
                    Ok(Ok(())) => tracing::info!("every hold on the clone's source released"),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot record the released holds"),
                    Err(e) => tracing::error!(error = %e, "recording the released holds failed"),
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot release the hold on every source replica yet");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// One step: the source's runs in [`STEP_BLOCKS`] blocks from `cursor`, copied into the base, then
/// the cursor moved past them, durably.
async fn hydrate_step(
    store: &Arc<Store>,
    reader: &SourceReader,
    cursor: u64,
    options: HydrateOptions,
    started: Instant,
    copied: &mut u64,
    shutdown: &CancellationToken,
) -> Result<(), CloneError> {
    let (runs, end) = reader.runs(cursor, STEP_BLOCKS).await?;
    for run in runs {
        let blocks_per_read = READ_BYTES / BLOCK_SIZE;
        let mut at = run.lba.max(cursor);
        let stop = run.lba + run.blocks;
        while at < stop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let count = (stop - at).min(blocks_per_read);
            let data = reader.read_blocks(at, count as u32).await?;
            let (store, first) = (store.clone(), at);
            spawn_store(move || store.fill_base(first, &data)).await?;
            at += count;
            *copied += count * BLOCK_SIZE;
            if let Some(rate) = options.rate.filter(|&r| r > 0) {
                // Paced: the copy so far may not have taken less time than `rate` allows.
                let due = Duration::from_secs_f64(*copied as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
    let store = store.clone();
    let done = spawn_store(move || store.advance_hydration(end)).await?;
    if done {
        tracing::info!("clone hydrated: it no longer reads from its source");
    }
    Ok(())
}

/// Runs a store call on a blocking thread.
async fn spawn_store<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CloneError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| CloneError::Unreachable(format!("a store task failed: {e}")))?
        .map_err(CloneError::Store)
}
