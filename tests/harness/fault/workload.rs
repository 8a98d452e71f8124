//! The verifier's I/O: writes of self-describing blocks at queue depth, flushes, and the read-back check.
//!
//! `queue_depth` worker tasks share one iSCSI session. Each loops: pick a run of 1..=N blocks that has no
//! write in flight, claim new generations for it in the [`Ledger`], send one WRITE(16), record the outcome;
//! now and then a SYNCHRONIZE CACHE instead. When the session dies (the controller was killed) the workers
//! wait for a new portal from the fault driver ([`Workload::set_portal`]) and log in again; whatever was in
//! flight stays "attempted" in the ledger.
//!
//! A command that gets no answer within [`COMMAND_TIMEOUT`] is not an outcome the volume is allowed: the
//! worker stops with [`InitiatorError::Stuck`] and the run reports it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::initiator::{CommandOutcome, InitiatorError, Session, MAX_WRITE_BYTES, UNIT_ATTENTION};
use super::ledger::{decode_block, encode_blocks, BlockIndex, Decoded, Ledger, Loss, BLOCK_BYTES};

/// Longest a single command may stay unanswered. A hung replica is dropped after the controller's
/// --replica-timeout (3 s in the harness); a rebuild or a snapshot barrier may hold I/O a little longer on
/// two loaded cores. A minute without an answer is a stuck volume, not a slow one.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// After a write fails with a SCSI error (e.g. the volume fell below --min-healthy) a worker waits this long
/// before the next one, so a degraded volume is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Between login attempts while the controller is down or not serving yet.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(200);

/// Shape of the I/O.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadConfig {
    /// Commands in flight at once (one worker task each).
    pub queue_depth: usize,
    /// Largest write, in 4 KiB blocks (at most 16: the initiator's immediate-data limit).
    pub max_blocks_per_write: u64,
    /// One command in this many is a flush.
    pub flush_one_in: u32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            // Deep enough that writes overtake each other in the controller and the replicas' lanes.
            queue_depth: 16,
            max_blocks_per_write: 8,
            flush_one_in: 20,
        }
    }
}

/// Counters of what the workload did (cumulative over the whole run).
#[derive(Debug, Default)]
pub struct IoStats {
    pub writes_acked: AtomicU64,
    /// Writes that came back with a SCSI error (their data may still have landed).
    pub writes_failed: AtomicU64,
    /// Writes whose connection died before the status: outcome unknown.
    pub writes_unknown: AtomicU64,
    pub flushes_ok: AtomicU64,
    pub flushes_failed: AtomicU64,
    pub logins: AtomicU64,
}

impl IoStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Hands the workers a live session, logging in again (to the newest portal) when the last one died.
struct Connector {
    iqn: String,
    portal: watch::Receiver<Option<SocketAddr>>,
    current: tokio::sync::Mutex<Option<Arc<Session>>>,
    stats: Arc<IoStats>,
}

impl Connector {
    /// A live session, or `None` once `stop` is set.
    async fn session(&self, stop: &watch::Receiver<bool>) -> Option<Arc<Session>> {
        let mut current = self.current.lock().await;
        loop {
            if *stop.borrow() {
                return None;
            }
            if let Some(session) = current.as_ref().filter(|s| !s.is_dead()) {
                return Some(session.clone());
            }
            let portal = *self.portal.borrow();
            if let Some(portal) = portal {
                if let Ok(session) = Session::login(portal, &self.iqn).await {
                    self.stats.logins.fetch_add(1, Ordering::Relaxed);
                    *current = Some(Arc::new(session));
                    continue;
                }
            }
            tokio::time::sleep(RECONNECT_INTERVAL).await;
        }
    }
}

/// A running workload. Stop it with [`Workload::stop`] before checking the volume.
pub struct Workload {
    portal: watch::Sender<Option<SocketAddr>>,
    stop: watch::Sender<bool>,
    workers: JoinSet<Result<(), InitiatorError>>,
    connector: Arc<Connector>,
}

impl Workload {
    /// Starts `config.queue_depth` workers against the target `iqn` at `portal`. `seed` fixes the choice of
    /// blocks and sizes (the interleaving of completions is up to the machine).
    pub fn start(
        ledger: Arc<Mutex<Ledger>>,
        stats: Arc<IoStats>,
        portal: SocketAddr,
        iqn: &str,
        config: WorkloadConfig,
        seed: u64,
    ) -> Workload {
        let (portal_tx, portal_rx) = watch::channel(Some(portal));
        let (stop_tx, stop_rx) = watch::channel(false);
        let connector = Arc::new(Connector {
            iqn: iqn.to_string(),
            portal: portal_rx,
            current: tokio::sync::Mutex::new(None),
            stats: stats.clone(),
        });
        let mut workers = JoinSet::new();
        let max_blocks = config
            .max_blocks_per_write
            .clamp(1, u64::from(MAX_WRITE_BYTES) / BLOCK_BYTES as u64);
        for worker in 0..config.queue_depth {
            let rng = StdRng::seed_from_u64(seed ^ (worker as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            workers.spawn(run_worker(
                Worker {
                    ledger: ledger.clone(),
                    stats: stats.clone(),
                    connector: connector.clone(),
                    stop: stop_rx.clone(),
                    max_blocks,
                    flush_one_in: config.flush_one_in.max(1),
                },
                rng,
            ));
        }
        Workload {
            portal: portal_tx,
            stop: stop_tx,
            workers,
            connector,
        }
    }

    /// Points reconnecting workers at a new controller's portal.
    pub fn set_portal(&self, portal: SocketAddr) {
        let _ = self.portal.send(Some(portal));
    }

    /// Stops issuing I/O and waits for every command in flight to resolve. Returns the session (if one is
    /// alive) for the read-back, or the first liveness failure.
    pub async fn stop(mut self) -> Result<Option<Arc<Session>>, InitiatorError> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        while let Some(joined) = self.workers.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(InitiatorError::Protocol {
                        portal: self
                            .portal
                            .borrow()
                            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                        reason: format!("a workload task panicked: {e}"),
                    });
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let current = self.connector.current.lock().await.clone();
        Ok(current.filter(|s| !s.is_dead()))
    }
}

struct Worker {
    ledger: Arc<Mutex<Ledger>>,
    stats: Arc<IoStats>,
    connector: Arc<Connector>,
    stop: watch::Receiver<bool>,
    max_blocks: u64,
    flush_one_in: u32,
}

async fn run_worker(w: Worker, mut rng: StdRng) -> Result<(), InitiatorError> {
    let block_count = w.ledger.lock().expect("ledger lock").block_count();
    let tag = w.ledger.lock().expect("ledger lock").tag();
    loop {
        let Some(session) = w.connector.session(&w.stop).await else {
            return Ok(());
        };
        if rng.random_ratio(1, w.flush_one_in) {
            let covers = w.ledger.lock().expect("ledger lock").flush_started();
            let outcome = within_timeout("a SYNCHRONIZE CACHE", session.flush()).await?;
            if outcome.is_good() {
                w.ledger.lock().expect("ledger lock").flush_completed(covers);
                w.stats.flushes_ok.fetch_add(1, Ordering::Relaxed);
            } else if is_unit_attention(&outcome) {
                // Not executed: the target tells of a change (a grown capacity) first, as SCSI says.
                continue;
            } else {
                w.stats.flushes_failed.fetch_add(1, Ordering::Relaxed);
                if outcome != CommandOutcome::Disconnected {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
            continue;
        }
        let count = rng.random_range(1..=w.max_blocks);
        let first = BlockIndex(rng.random_range(0..=block_count - count));
        let Some(generations) = w.ledger.lock().expect("ledger lock").reserve(first, count) else {
            // Another worker is writing there; pick again.
            tokio::task::yield_now().await;
            continue;
        };
        let data = encode_blocks(tag, first, &generations);
        let outcome = within_timeout("a WRITE(16)", session.write(first.lba(), data)).await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                w.ledger.lock().expect("ledger lock").unresolved(first, count);
                return Err(e);
            }
        };
        match outcome {
            CommandOutcome::Good(_) => {
                w.ledger
                    .lock()
                    .expect("ledger lock")
                    .acknowledged(first, &generations);
                w.stats.writes_acked.fetch_add(1, Ordering::Relaxed);
            }
            CommandOutcome::Disconnected => {
                w.ledger.lock().expect("ledger lock").unresolved(first, count);
                w.stats.writes_unknown.fetch_add(1, Ordering::Relaxed);
            }
            // Not executed (the target tells of a change first, e.g. a grown capacity): the write never
            // happened, so its generation stays merely possible, and the worker goes on as an initiator's
            // mid-layer does, without counting a failure.
            ref ua if is_unit_attention(ua) => {
                w.ledger.lock().expect("ledger lock").unresolved(first, count);
            }
            _ => {
                w.ledger.lock().expect("ledger lock").unresolved(first, count);
                w.stats.writes_failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
}

fn is_unit_attention(outcome: &CommandOutcome) -> bool {
    matches!(outcome, CommandOutcome::CheckCondition { key, .. } if *key == UNIT_ATTENTION)
}

/// A READ(16), issued again after a unit attention (which it was refused for, unexecuted).
async fn read_past_attentions(
    session: &Session,
    lba: u64,
    blocks: u32,
) -> Result<CommandOutcome, InitiatorError> {
    // A nexus holds a few attentions at most (power on, capacity changed); more means a loop.
    for _ in 0..4 {
        let outcome = within_timeout("a READ(16)", session.read(lba, blocks)).await?;
        if !is_unit_attention(&outcome) {
            return Ok(outcome);
        }
    }
    within_timeout("a READ(16)", session.read(lba, blocks)).await
}

async fn within_timeout(
    what: &str,
    command: impl std::future::Future<Output = CommandOutcome>,
) -> Result<CommandOutcome, InitiatorError> {
    tokio::time::timeout(COMMAND_TIMEOUT, command)
        .await
        .map_err(|_| InitiatorError::Stuck {
            what: what.to_string(),
            waited: COMMAND_TIMEOUT,
        })
}

/// What a whole-volume read-back found.
#[derive(Debug, Default)]
pub struct ReadBack {
    pub blocks_checked: u64,
    /// Blocks that held data written by the harness (not zeros).
    pub blocks_written: u64,
    pub losses: Vec<Loss>,
}

/// Bytes per READ(16) of the read-back.
const READ_CHUNK_BLOCKS: u64 = 32;
/// READs in flight during the read-back.
const READ_DEPTH: usize = 4;

/// Reads the whole volume through `session` with nothing else in flight, checks every block against the
/// ledger, and settles the ledger to what was found (see [`Ledger::settle`]). Fails if a read fails: with
/// every replica healed the volume must serve every read.
pub async fn read_back(
    session: &Arc<Session>,
    ledger: &Arc<Mutex<Ledger>>,
) -> Result<ReadBack, InitiatorError> {
    let (block_count, tag) = {
        let ledger = ledger.lock().expect("ledger lock");
        (ledger.block_count(), ledger.tag())
    };
    let mut result = ReadBack::default();
    let mut reads = JoinSet::new();
    let mut next = 0u64;
    let mut done = Vec::new();
    while next < block_count || !reads.is_empty() {
        while next < block_count && reads.len() < READ_DEPTH {
            let count = READ_CHUNK_BLOCKS.min(block_count - next);
            let session = session.clone();
            let first = next;
            reads.spawn(async move {
                let lbas = (count * (BLOCK_BYTES as u64 / 512)) as u32;
                let outcome = read_past_attentions(&session, BlockIndex(first).lba(), lbas).await;
                (first, count, outcome)
            });
            next += count;
        }
        let Some(joined) = reads.join_next().await else {
            break;
        };
        let (first, count, outcome) = joined.map_err(|e| InitiatorError::Protocol {
            portal: session.portal(),
            reason: format!("a read-back task panicked: {e}"),
        })?;
        match outcome? {
            CommandOutcome::Good(data) if data.len() as u64 == count * BLOCK_BYTES as u64 => {
                done.push((first, data));
            }
            CommandOutcome::Good(data) => {
                return Err(InitiatorError::Protocol {
                    portal: session.portal(),
                    reason: format!(
                        "READ of {count} blocks at block {first} returned {} bytes",
                        data.len()
                    ),
                })
            }
            other => {
                return Err(InitiatorError::Command {
                    portal: session.portal(),
                    outcome: other,
                })
            }
        }
    }
    let mut ledger = ledger.lock().expect("ledger lock");
    for (first, data) in done {
        for (offset, bytes) in data.chunks(BLOCK_BYTES).enumerate() {
            let index = BlockIndex(first + offset as u64);
            let found = decode_block(tag, index, bytes);
            result.blocks_checked += 1;
            match ledger.check(index, found) {
                Ok(()) => {
                    if let Decoded::Block(generation) = found {
                        if generation.0 != 0 {
                            result.blocks_written += 1;
                        }
                        ledger.settle(index, generation);
                    }
                }
                // Not settled: the acknowledged value stays the truth, so an audit then tells which
                // replica lost it (and a later read-back reports it again if it is still lost).
                Err(loss) => result.losses.push(loss),
            }
        }
    }
    Ok(result)
}
