//! The soak's clone episode: a clone of a snapshot taken while the workload writes, checked against what
//! the ledger says that snapshot must hold, written to, hurt mid-hydration, and checked again.
//!
//! ```text
//!   source (workload running) ─► ledger copy ─► snapshot create ─► generations issued so far
//!        │                       (before)                          (until)
//!        ▼
//!   clone: 3 replicas --clone-from the source's, a controller ─► read back against
//!          before.snapshot_view(until)  ─► its own workload (own generations) ─► [kill a clone replica,
//!          restart it] ─► stop ─► wait: hydrated, every replica RW ─► read back (exact) ─► source's holds
//!          released ─► stop the clone
//! ```
//!
//! The clone's replicas read the source's replicas directly (not through the fault proxies): the episode
//! tests cloning under the source's load, while the other episodes test the source's faults.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fixture::FaultVolume;
use super::initiator::{InitiatorError, Session};
use super::ledger::{Ledger, BLOCK_BYTES};
use super::soak::Plan;
use super::workload::{read_back, IoStats, ReadBack, Workload, WorkloadConfig};
use super::FaultError;
use crate::volume::{replica_mode, volume_info, Cluster, Controller};
use crate::ByteSize;

/// How fast the clone copies its source: slow enough that a clone replica is often killed while it still
/// copies (a source of a few tens of MiB takes seconds), fast enough for the episode to end soon after.
const HYDRATE_RATE: &str = "8M";

/// How long a clone may take to hydrate and have every replica read-write: the copy at [`HYDRATE_RATE`],
/// plus, after a kill, the controller's back-off (up to 30 s) before it rebuilds the returned replica.
const HYDRATE_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a snapshot may be refused (a rebuild of the source still settling) before the episode fails.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one clone episode did and found.
#[derive(Debug, Default)]
pub struct CloneOutcome {
    /// Blocks of the clone read back and checked (both read-backs).
    pub blocks_verified: u64,
    /// Clone replicas killed while the clone was still hydrating.
    pub killed_mid_hydration: u64,
    /// Clone replicas killed after hydration had finished.
    pub killed_after_hydration: u64,
    /// Snapshot requests refused before one was taken.
    pub snapshots_refused: u64,
    pub losses: Vec<super::ledger::Loss>,
}

/// Runs a clone episode on `volume`, whose workload is running: snapshot `name`, clone it, check it,
/// write to it (`io`, `seed`), kill clone replica `plan.replica` for `plan.hold` if `kill`, wait for
/// hydration, check again, stop the clone. `stats` counts the clone's I/O.
pub fn clone_episode(
    volume: &FaultVolume,
    plan: &Plan,
    kill: bool,
    name: &str,
    io: WorkloadConfig,
    seed: u64,
    stats: &Arc<IoStats>,
) -> Result<CloneOutcome, FaultError> {
    let mut outcome = CloneOutcome::default();
    let (before, until) = snapshot_with_view(volume, name, &mut outcome)?;
    let size = ByteSize::bytes_exact(before.block_count() * BLOCK_BYTES as u64);
    let ledger = Arc::new(Mutex::new(before.snapshot_view(until)));

    let mut clone = Cluster::start_clone(
        volume.replica_count(),
        size,
        &volume.cluster,
        name,
        &["--hydrate-rate", HYDRATE_RATE],
    )?;
    let controller = clone.start_controller(&[])?;

    // Usable at once: the snapshot's content, read through the clone while it still copies.
    let first = check(volume, &controller, &ledger)?;
    outcome.blocks_verified += first.blocks_checked;
    outcome.losses.extend(first.losses);
    ledger.lock().expect("ledger lock").close_window();

    let workload = {
        let _runtime = volume.runtime().enter();
        Workload::start(
            ledger.clone(),
            stats.clone(),
            controller.url.portal,
            &controller.url.iqn,
            io,
            seed,
        )
    };
    std::thread::sleep(plan.warmup / 2);
    if kill {
        let hydrated = volume_info(controller.api)?["hydrated"] == true;
        clone.kill_replica(plan.replica);
        if hydrated {
            outcome.killed_after_hydration += 1;
        } else {
            outcome.killed_mid_hydration += 1;
        }
        std::thread::sleep(plan.hold);
        clone.start_replica(plan.replica)?;
    }
    std::thread::sleep(plan.after);
    volume.runtime().block_on(workload.stop())?;

    wait_hydrated(&clone, &controller)?;
    let second = check(volume, &controller, &ledger)?;
    outcome.blocks_verified += second.blocks_checked;
    outcome.losses.extend(second.losses);

    // Hydrated: the clone lets go of the source's snapshot (else it could never be deleted).
    let deadline = Instant::now() + HYDRATE_TIMEOUT;
    while !volume.snapshot_holds()?.is_empty() {
        if Instant::now() > deadline {
            return Err(FaultError::Audit(format!(
                "the hydrated clone of {name} still holds the source's snapshot after {HYDRATE_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    controller.daemon.stop()?;
    for i in 0..clone.replicas.len() {
        clone.stop_replica(i)?;
    }
    Ok(outcome)
}

/// Takes snapshot `name` of the source, retrying while it is refused; returns the ledger as it was just
/// before the request that succeeded, and the first generation not issued when it returned.
fn snapshot_with_view(
    volume: &FaultVolume,
    name: &str,
    outcome: &mut CloneOutcome,
) -> Result<(Ledger, super::ledger::Generation), FaultError> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    loop {
        let before = volume.ledger.lock().expect("ledger lock").clone();
        if volume.snapshot_create(name)? {
            let until = volume.ledger.lock().expect("ledger lock").next_generation();
            return Ok((before, until));
        }
        outcome.snapshots_refused += 1;
        if Instant::now() > deadline {
            return Err(FaultError::Audit(format!(
                "the source refused snapshot {name} for {SNAPSHOT_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Flushes and reads the whole clone through its controller, checking every block against `ledger`.
fn check(
    volume: &FaultVolume,
    controller: &Controller,
    ledger: &Arc<Mutex<Ledger>>,
) -> Result<ReadBack, FaultError> {
    let (portal, iqn) = (controller.url.portal, controller.url.iqn.clone());
    volume
        .runtime()
        .block_on(async {
            let session = Arc::new(Session::login(portal, &iqn).await?);
            let flushed = session.flush().await;
            if !flushed.is_good() {
                return Err(InitiatorError::Command {
                    portal,
                    outcome: flushed,
                });
            }
            read_back(&session, ledger).await
        })
        .map_err(FaultError::from)
}

/// Waits until the clone reports itself hydrated with every replica read-write.
fn wait_hydrated(clone: &Cluster, controller: &Controller) -> Result<(), FaultError> {
    let started = Instant::now();
    let done = |info: &Value| {
        info["hydrated"] == true
            && clone
                .replicas
                .iter()
                .all(|r| replica_mode(info, r.addr).as_deref() == Some("RW"))
    };
    loop {
        let info = volume_info(controller.api)?;
        if done(&info) {
            return Ok(());
        }
        if started.elapsed() > HYDRATE_TIMEOUT {
            return Err(FaultError::NotHealed {
                waited: HYDRATE_TIMEOUT,
                info: format!("the clone: {info}"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
