//! Starting a volume controller: survey the replicas, choose the ones that
//! hold the latest data, fence every older controller, then serve.
//!
//! The choice, in order (each rejected replica is logged with its reason):
//! 1. it answered the handshake within the startup wait;
//! 2. it has the volume's size and UUID (`--volume-id`, or the UUID most
//!    replicas share);
//! 3. it is at the highest `(epoch, revision)` among them: the epoch says
//!    which controller it last served, the revision how many flushes of that
//!    controller it made durable. A replica dropped by a controller misses
//!    that controller's later flushes, so it ends up behind and is not used
//!    (the rebuild work brings it back).
//!
//! The chosen replicas are then raised to a new epoch, one above every epoch
//! seen, before any I/O: from then on a replica refuses every frame of an
//! older controller, so a controller cut off by a partition can never write
//! again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use basalt_proto::{Epoch, Revision, VolumeId};

use crate::volume::core::CoreConfig;
use crate::volume::link::{Handshaken, LinkError};
use crate::volume::rebuild::Rebuilder;
use crate::volume::{StartReplica, Volume, VolumeSpec};

/// What a controller is asked to serve.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub name: String,
    pub size_bytes: u64,
    pub replicas: Vec<String>,
    /// The volume's UUID; `None` to take the one most replicas report.
    pub volume_id: Option<VolumeId>,
    pub min_healthy: usize,
    pub replica_timeout: Duration,
    /// How long to wait for every replica to answer at start before going
    /// on with those that did.
    pub startup_wait: Duration,
}

/// Why the controller cannot start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "only {usable} of {configured} replicas are reachable and up to date, and --min-healthy is {min_healthy}: \
         refusing to serve rather than risk serving stale data ({details}). Start the missing replicas, or lower \
         --min-healthy if you accept the risk"
    )]
    TooFewReplicas {
        usable: usize,
        configured: usize,
        min_healthy: usize,
        details: String,
    },
    #[error(
        "the replicas disagree on the volume UUID ({found}); pass --volume-id to say which volume this controller \
         serves"
    )]
    AmbiguousVolume { found: String },
}

/// Survey, choose, fence, and start the volume.
pub async fn assemble(config: &ControllerConfig) -> Result<Assembled, StartError> {
    let surveyed = survey(&config.replicas, config.startup_wait).await;

    // Which volume is this? The one asked for, or the one most replicas hold.
    let volume = match config.volume_id {
        Some(v) => v,
        None => {
            let mut counts: HashMap<VolumeId, usize> = HashMap::new();
            for h in surveyed.iter().flatten() {
                *counts.entry(h.identity.volume).or_default() += 1;
            }
            let top = counts.values().copied().max().unwrap_or(0);
            let leaders: Vec<VolumeId> = counts
                .iter()
                .filter(|(_, c)| **c == top)
                .map(|(v, _)| *v)
                .collect();
            match leaders.as_slice() {
                [] => VolumeId(uuid::Uuid::nil()),
                [v] => *v,
                many => {
                    let found = many.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
                    return Err(StartError::AmbiguousVolume { found });
                }
            }
        }
    };

    let mut decisions: Vec<Result<Handshaken, String>> = surveyed
        .into_iter()
        .map(|s| {
            let h = s.map_err(|e| format!("unreachable: {e}"))?;
            let id = h.identity;
            if id.volume != volume {
                return Err(format!("holds volume {}, not {volume}", id.volume));
            }
            if id.size_bytes != config.size_bytes {
                return Err(format!(
                    "holds {} bytes, the volume is {} bytes; a volume's size never changes",
                    id.size_bytes, config.size_bytes
                ));
            }
            Ok(h)
        })
        .collect();

    let best: Option<(Epoch, Revision)> = decisions
        .iter()
        .filter_map(|d| d.as_ref().ok())
        .map(|h| (h.identity.epoch, h.identity.revision))
        .max();
    let highest_epoch = decisions
        .iter()
        .filter_map(|d| d.as_ref().ok())
        .map(|h| h.identity.epoch)
        .max();
    let epoch = highest_epoch.unwrap_or_default().next();

    if let Some((best_epoch, best_rev)) = best {
        for d in decisions.iter_mut() {
            if let Ok(h) = d {
                let (e, r) = (h.identity.epoch, h.identity.revision);
                if (e, r) < (best_epoch, best_rev) {
                    *d = Err(format!(
                        "behind: at {e}, {r}; the volume's latest data is at {best_epoch}, {best_rev} \
                         (it missed writes; it needs a rebuild)"
                    ));
                }
            }
        }
    }

    // Fence: raise every chosen replica to the new epoch before any I/O.
    for (addr, d) in config.replicas.iter().zip(decisions.iter_mut()) {
        if let Ok(h) = d {
            if let Err(e) = h.raise_epoch(addr, epoch).await {
                *d = Err(format!("could not raise its epoch: {e}"));
            }
        }
    }

    for (addr, d) in config.replicas.iter().zip(&decisions) {
        match d {
            Ok(h) => tracing::info!(
                replica = %addr, epoch = epoch.0, revision = h.identity.revision.0,
                "replica chosen: up to date, raised to the new epoch"
            ),
            Err(why) => tracing::warn!(replica = %addr, reason = %why, "replica not used"),
        }
    }

    let usable = decisions.iter().filter(|d| d.is_ok()).count();
    if usable < config.min_healthy {
        let details = config
            .replicas
            .iter()
            .zip(&decisions)
            .filter_map(|(a, d)| d.as_ref().err().map(|why| format!("{a}: {why}")))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(StartError::TooFewReplicas {
            usable,
            configured: config.replicas.len(),
            min_healthy: config.min_healthy,
            details,
        });
    }

    // The chosen replicas hold the same flushed history, but a controller
    // that died may have left them different in blocks written after the
    // last flush. The first one is the reference; the others start out of
    // the volume and are reconciled with it (a delta rebuild: only blocks
    // whose checksums differ travel) before the volume serves anyone.
    let mut reconcile = Vec::new();
    let mut reference_taken = false;
    let replicas = decisions
        .into_iter()
        .enumerate()
        .map(|(i, d)| match d {
            Ok(h) if !reference_taken => {
                reference_taken = true;
                StartReplica::Ready(h)
            }
            Ok(_) => {
                reconcile.push(i);
                StartReplica::Unusable {
                    cause: "up to date; reconciling unflushed blocks with the reference".into(),
                }
            }
            Err(cause) => StartReplica::Unusable { cause },
        })
        .collect();
    let spec = VolumeSpec {
        name: config.name.clone(),
        volume,
        size_bytes: config.size_bytes,
        epoch,
        addresses: config.replicas.clone(),
    };
    tracing::info!(volume = %volume, epoch = epoch.0, healthy = usable, "volume assembled");
    let core = CoreConfig {
        replica_timeout: config.replica_timeout,
        min_healthy: config.min_healthy,
    };
    Ok(Assembled {
        volume: Volume::start(spec, replicas, core),
        reconcile,
    })
}

/// A started volume, and the replicas to reconcile before serving.
pub struct Assembled {
    pub volume: Volume,
    /// Indexes of up-to-date replicas to bring in line with the reference.
    pub reconcile: Vec<usize>,
}

/// Reconcile the replicas `assemble` set aside and wait (up to `limit`)
/// until they are RW again. Serving before that would let reads of an
/// unflushed block return one value and then another.
pub async fn reconcile(assembled: &Assembled, rebuilder: &std::sync::Arc<Rebuilder>, limit: Duration) {
    let volume = &assembled.volume;
    let Some(status) = volume.status().await else {
        return;
    };
    for &i in &assembled.reconcile {
        rebuilder.start(volume, i, status.replicas[i].address.clone());
    }
    let deadline = Instant::now() + limit;
    while assembled
        .reconcile
        .iter()
        .any(|&i| rebuilder.progress(i).is_some())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Say Hello to every replica (in parallel), retrying those that do not
/// answer until `wait` has passed.
async fn survey(addrs: &[String], wait: Duration) -> Vec<Result<Handshaken, LinkError>> {
    let deadline = Instant::now() + wait;
    let tasks = addrs.iter().map(|addr| {
        let addr = addr.clone();
        async move {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.clamp(Duration::from_millis(200), Duration::from_secs(3));
                match Handshaken::connect(&addr, VolumeId(uuid::Uuid::nil()), Epoch(0), attempt).await {
                    Ok(h) => return Ok(h),
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(e) => {
                        tracing::debug!(replica = %addr, error = %e, "replica not answering yet; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
    futures::future::join_all(tasks).await
}
