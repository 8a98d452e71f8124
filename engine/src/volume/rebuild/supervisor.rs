//! The [`Rebuilder`]: which rebuilds run, which replicas are removed for good, the snapshot chain's
//! lock shared with snapshot operations, and the watch that re-adds a failed replica once it answers
//! again (with back-off, see [`next_probe`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::volume::core::ReplicaMode;
use crate::volume::link::{Handshaken, LinkError};
use crate::volume::Volume;

use super::algorithm::rebuild;
use super::{Progress, RebuildError};

/// Back-off between attempts to re-add a failed replica.
/// A replica whose host answers but whose port refuses the connection (the
/// process is restarting: the common case) is probed every
/// `REFUSED_RETRY`: a refused connect over loopback or a LAN is one SYN and
/// one RST, nothing worth measuring, and every moment a returning replica
/// waits to be noticed it misses writes it must copy later: a delta rebuild
/// is judged against 5 % of a full one, tens of milliseconds, so even a
/// 20 ms interval would be a large share of it. A probe that times out (the host
/// is gone or cut off) backs off from `RETRY_MIN`, doubling up to
/// `PROBE_RETRY_MAX`: one connection attempt every 5 s costs nothing worth
/// measuring, and a replica whose network comes back is rebuilt within ~5 s
/// instead of up to 30 s. A replica that answers but fails its rebuild (say,
/// a full disk) backs off up to `RETRY_MAX`: a rebuild attempt is expensive.
/// A port that keeps refusing for `REFUSED_FAST_FOR` is not restarting but
/// down (its process crashed and nobody restarts it): it is then probed
/// every `REFUSED_SLOW_RETRY`, not 200 times a second for hours.
const REFUSED_RETRY: Duration = Duration::from_millis(5);
const REFUSED_FAST_FOR: Duration = Duration::from_secs(10);
const REFUSED_SLOW_RETRY: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(20);

/// How often the watch asks the volume which replicas failed, when no probe
/// is due sooner: a replica that just failed is not back within 20 ms.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// See [`REFUSED_RETRY`] for these two.
const PROBE_RETRY_MAX: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the last look at a failed replica found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// It answered: a rebuild was started.
    Answered,
    /// Its host refused the connection: the process is (re)starting.
    Refused,
    /// No answer at all (timeout, unreachable).
    Silent,
}

/// After `probe`, how long to wait before the next one, and the back-off to
/// carry (see [`RETRY_MIN`]); `refusing_for` is how long the replica's port
/// has refused connections without a break.
fn next_probe(probe: Probe, backoff: Duration, refusing_for: Duration) -> (Duration, Duration) {
    match probe {
        Probe::Answered => (backoff, (backoff * 2).min(RETRY_MAX)),
        Probe::Refused if refusing_for < REFUSED_FAST_FOR => (REFUSED_RETRY, backoff),
        Probe::Refused => (REFUSED_SLOW_RETRY, backoff),
        Probe::Silent => {
            let wait = backoff.min(PROBE_RETRY_MAX);
            (wait, (wait * 2).min(PROBE_RETRY_MAX))
        }
    }
}

/// Rebuilds in progress and replicas removed for good.
#[derive(Default)]
pub struct Rebuilder {
    running: Mutex<HashMap<usize, Arc<Progress>>>,
    removed: Mutex<HashSet<String>>,
    fenced: AtomicBool,
    /// Held shared by every rebuild and exclusively by a snapshot operation
    /// (see the module docs).
    chain: Arc<RwLock<()>>,
}

impl Rebuilder {
    pub fn new() -> Arc<Rebuilder> {
        Arc::new(Rebuilder::default())
    }

    /// Progress of the rebuild of replica `index`, if one is running.
    pub fn progress(&self, index: usize) -> Option<Arc<Progress>> {
        self.running.lock().expect("rebuild table").get(&index).cloned()
    }

    /// Reserve the snapshot chain for a snapshot operation (create, delete,
    /// revert), which holds the guard until it is done. Refused with the
    /// indices of the replicas being rebuilt while any rebuild runs: a
    /// rebuild copies the chain as it is. Waits for another snapshot
    /// operation in progress. While the guard is held, a rebuild that starts
    /// waits before it looks at any chain.
    ///
    /// Cancellation safe: dropping the future gives up the reservation.
    pub async fn reserve_chain(&self) -> Result<OwnedRwLockWriteGuard<()>, Vec<usize>> {
        let mut rebuilding: Vec<usize> = self
            .running
            .lock()
            .expect("rebuild table")
            .keys()
            .copied()
            .collect();
        if !rebuilding.is_empty() {
            rebuilding.sort_unstable();
            return Err(rebuilding);
        }
        Ok(self.chain.clone().write_owned().await)
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
            // Waits for a snapshot operation in progress; none starts until
            // this rebuild is over.
            let chain = this.chain.clone().read_owned().await;
            progress.lap("wait_for_snapshot_ops");
            let started = Instant::now();
            let outcome = match rebuild(&volume, index, &addr, &progress).await {
                Ok(promoted) => {
                    tracing::info!(
                        replica = %addr,
                        bytes = progress.done.load(Ordering::Relaxed),
                        delta = progress.delta.load(Ordering::Relaxed),
                        from_record = progress.from_record.load(Ordering::Relaxed),
                        seconds = started.elapsed().as_secs_f64(),
                        steps = %progress.laps(),
                        "replica RW: rebuild complete"
                    );
                    let rw = Instant::now();
                    promoted.make_durable(&volume, index, &progress).await.map(|()| {
                        tracing::info!(
                            replica = %addr,
                            seconds = started.elapsed().as_secs_f64(),
                            after_rw = rw.elapsed().as_secs_f64(),
                            steps = %progress.laps(),
                            "rebuilt replica flushed: what was copied is durable, flushes numbered like the source's"
                        )
                    })
                }
                Err(e) => Err(e),
            };
            drop(chain);
            match outcome {
                Ok(()) => {}
                Err(RebuildError::Fenced { .. }) => {
                    this.fenced.store(true, Ordering::Relaxed);
                    tracing::error!(replica = %addr, "rebuild stopped: a newer controller owns this volume");
                }
                Err(e) => {
                    tracing::warn!(replica = %addr, error = %e, steps = %progress.laps(), "rebuild failed; will retry");
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
        // Per failed replica: when to probe it next, the back-off to carry, and since when its port
        // has refused connections (if it does).
        let mut next_try: HashMap<String, (Instant, Duration, Option<Instant>)> = HashMap::new();
        let mut wake = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            // The next look: at the latest one interval from now, sooner if
            // a probe is due sooner (only failed replicas have one).
            wake = Instant::now() + WATCH_INTERVAL;
            if self.fenced.load(Ordering::Relaxed) {
                return;
            }
            let Some(status) = volume.status().await else {
                return;
            };
            for (index, r) in status.replicas.iter().enumerate() {
                if r.mode == ReplicaMode::ReadWrite {
                    // Healthy again: its next failure starts a fresh back-off.
                    next_try.remove(&r.address);
                }
                if !matches!(r.mode, ReplicaMode::Error { .. })
                    || self.removed.lock().expect("rebuild table").contains(&r.address)
                    || self.progress(index).is_some()
                {
                    continue;
                }
                let now = Instant::now();
                let (when, backoff, refusing_since) = next_try
                    .get(&r.address)
                    .copied()
                    .unwrap_or((now, RETRY_MIN, None));
                if now < when {
                    wake = wake.min(when);
                    continue;
                }
                // Only start a rebuild once the replica answers: a quick
                // probe, so a dead one costs nothing but the attempt.
                let probe = Handshaken::connect(
                    &r.address,
                    basalt_proto::VolumeId(uuid::Uuid::nil()),
                    basalt_proto::Epoch(0),
                    &volume.spec().secret,
                    Duration::from_secs(1),
                )
                .await;
                let probe = match probe {
                    Ok(_) => {
                        tracing::info!(replica = %r.address, "failed replica answers again; rebuilding it");
                        self.start(&volume, index, r.address.clone());
                        // If this rebuild fails too, the next one waits longer.
                        Probe::Answered
                    }
                    Err(LinkError::Connect { source, .. })
                        if source.kind() == std::io::ErrorKind::ConnectionRefused =>
                    {
                        // The host is up, the replica not yet: cheap to ask again soon.
                        Probe::Refused
                    }
                    Err(_) => Probe::Silent,
                };
                let refusing_since = match probe {
                    Probe::Refused => Some(refusing_since.unwrap_or(now)),
                    _ => None,
                };
                let refusing_for = refusing_since.map_or(Duration::ZERO, |since| now - since);
                let (wait, backoff) = next_probe(probe, backoff, refusing_for);
                let when = Instant::now() + wait;
                wake = wake.min(when);
                next_try.insert(r.address.clone(), (when, backoff, refusing_since));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_back_off_to_5_s_for_a_silent_host_and_30_s_for_failing_rebuilds() {
        // A restarting replica is asked again at once, whatever happened before.
        assert_eq!(
            next_probe(Probe::Refused, RETRY_MAX, Duration::ZERO),
            (REFUSED_RETRY, RETRY_MAX)
        );
        // ... for a while: a port refusing for longer is down, not restarting.
        assert_eq!(
            next_probe(Probe::Refused, RETRY_MIN, Duration::from_secs(9)).0,
            REFUSED_RETRY
        );
        assert_eq!(
            next_probe(Probe::Refused, RETRY_MIN, Duration::from_secs(11)).0,
            REFUSED_SLOW_RETRY
        );
        // A silent host: doubling from 20 ms, never more than 5 s apart, even after failed rebuilds.
        let mut backoff = RETRY_MIN;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let (wait, next) = next_probe(Probe::Silent, backoff, Duration::ZERO);
            waits.push(wait);
            backoff = next;
        }
        assert_eq!(waits[0], RETRY_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), PROBE_RETRY_MAX);
        assert_eq!(
            next_probe(Probe::Silent, RETRY_MAX, Duration::ZERO).0,
            PROBE_RETRY_MAX
        );
        // Rebuilds that keep failing space out to 30 s.
        let mut backoff = RETRY_MIN;
        for _ in 0..20 {
            backoff = next_probe(Probe::Answered, backoff, Duration::ZERO).1;
        }
        assert_eq!(backoff, RETRY_MAX);
    }

    #[tokio::test]
    async fn snapshot_operations_are_refused_while_a_rebuild_runs_and_wait_for_each_other() {
        let rebuilder = Rebuilder::new();
        let guard = rebuilder.reserve_chain().await.expect("no rebuild is running");
        let second = rebuilder.reserve_chain();
        tokio::pin!(second);
        assert!(
            futures::poll!(&mut second).is_pending(),
            "a second snapshot operation waits for the first"
        );
        drop(guard);
        drop(second.await.expect("then it runs"));

        rebuilder
            .running
            .lock()
            .unwrap()
            .insert(2, Arc::new(Progress::new()));
        assert_eq!(rebuilder.reserve_chain().await.err(), Some(vec![2]));
    }
}
