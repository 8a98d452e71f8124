//! The fault driver: episodes of I/O under one fault each, drawn from a seed, each ending in a full check.
//!
//! ```text
//!   episode k:  I/O ─► warm-up ─► [snapshot create] ─► FAULT ─► hold ─► heal ─► I/O ─► [snapshot rm]
//!               ─► stop I/O ─► wait until every replica is RW ─► flush ─► read the whole volume, check
//!               ─► (every `audit_every` episodes) stop all, export every replica, compare block for block
//! ```
//!
//! A `CloneVolume` episode's fault is a clone of the volume, made, hurt and checked while the volume's own
//! workload runs (see [`super::clone`]).
//!
//! The seed fixes the schedule (which fault, which replica, how long, which snapshot operations) and the
//! workload's choice of blocks; the interleaving of completions is the machine's. A failing seed therefore
//! replays the same story, though not the same nanoseconds. The fault kinds are drawn as shuffled rounds of
//! [`FaultKind::ALL`], so every `ALL.len()` consecutive episodes inject every kind once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::clone::clone_episode;
use super::fixture::{refused_to_serve, FaultVolume, HEAL_TIMEOUT, REPLICA_TIMEOUT};
use super::ledger::Loss;
use super::proxy::Link;
use super::workload::{IoStats, WorkloadConfig};
use super::FaultError;
use crate::ByteSize;

/// The faults the driver injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL a replica, restart it after a while (it must be rebuilt).
    KillReplica,
    /// SIGSTOP a replica, SIGCONT it later: sometimes shorter, sometimes longer than --replica-timeout.
    HangReplica,
    /// Reset the replica's connections and refuse new ones, then let it back.
    CutReplica,
    /// Hold every byte between controller and replica (connections stay open), then let them flow.
    BlackholeReplica,
    /// SIGKILL the controller and start a new one; the initiator logs in to the new portal.
    KillController,
    /// SIGKILL a replica, grow the volume online while it is down (the initiator's session sees the unit
    /// attention, later episodes write past the old end), then restart it with its old --size: it is grown
    /// and rebuilt.
    ExpandVolume,
    /// Snapshot the volume under I/O and clone the snapshot (3 more replicas and a controller): check the
    /// clone holds the snapshot's data, write to it, SIGKILL one clone replica (often mid-hydration) and
    /// restart it, wait for hydration, check again, stop the clone (see [`super::clone`]).
    CloneVolume,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::KillReplica,
        FaultKind::HangReplica,
        FaultKind::CutReplica,
        FaultKind::BlackholeReplica,
        FaultKind::KillController,
        FaultKind::ExpandVolume,
        FaultKind::CloneVolume,
    ];
}

/// How much an [`FaultKind::ExpandVolume`] episode grows the volume: a few episodes' worth stays small
/// enough for the whole-volume read-back and the audits.
const EXPANSION: ByteSize = ByteSize::mib(4);

/// One episode's schedule.
#[derive(Clone, Debug)]
pub struct Plan {
    pub kind: FaultKind,
    /// The replica the fault hits (unused for `KillController`).
    pub replica: usize,
    /// I/O before the fault.
    pub warmup: Duration,
    /// How long the fault lasts before it is healed.
    pub hold: Duration,
    /// I/O after the heal, before the check.
    pub after: Duration,
    /// Take a snapshot before the fault.
    pub snapshot_before: bool,
    /// Take a snapshot while the fault holds (refusals expected while a rebuild runs).
    pub snapshot_during: bool,
    /// Delete the oldest snapshot after the heal.
    pub delete_after: bool,
    /// `CloneVolume`: kill a clone replica (`replica`) for `hold`.
    pub kill_clone_replica: bool,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::KillController => write!(f, "{:?}", self.kind)?,
            kind => write!(f, "{kind:?}(r{})", self.replica + 1)?,
        }
        write!(f, " hold {:.1}s", self.hold.as_secs_f64())
    }
}

/// Draws episode plans from a seed.
pub struct Schedule {
    rng: StdRng,
    round: Vec<FaultKind>,
    replicas: usize,
}

impl Schedule {
    pub fn new(seed: u64, replicas: usize) -> Schedule {
        Schedule {
            rng: StdRng::seed_from_u64(seed),
            round: Vec::new(),
            replicas,
        }
    }

    pub fn next_plan(&mut self) -> Plan {
        if self.round.is_empty() {
            self.round = FaultKind::ALL.to_vec();
            self.round.shuffle(&mut self.rng);
        }
        let kind = self.round.pop().expect("refilled above");
        let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..=hi));
        let timeout = REPLICA_TIMEOUT.as_millis() as u64;
        let hold = match kind {
            FaultKind::KillReplica | FaultKind::ExpandVolume | FaultKind::CloneVolume => {
                ms(&mut self.rng, 300, 3000)
            }
            // Both sides of --replica-timeout: a short stall the controller rides out, or a drop + rebuild.
            FaultKind::HangReplica | FaultKind::BlackholeReplica => ms(&mut self.rng, 500, 2 * timeout),
            FaultKind::CutReplica => ms(&mut self.rng, 300, 3000),
            FaultKind::KillController => ms(&mut self.rng, 0, 1000),
        };
        Plan {
            kind,
            replica: self.rng.random_range(0..self.replicas),
            warmup: ms(&mut self.rng, 800, 2000),
            hold,
            after: ms(&mut self.rng, 500, 1500),
            snapshot_before: self.rng.random_ratio(1, 2),
            snapshot_during: self.rng.random_ratio(1, 3),
            delete_after: self.rng.random_ratio(1, 2),
            kill_clone_replica: self.rng.random_ratio(3, 4),
        }
    }
}

/// How long and how hard to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    pub seed: u64,
    /// Stop after this many episodes...
    pub episodes: Option<u64>,
    /// ...or once this much time has passed (checked between episodes).
    pub duration: Option<Duration>,
    pub volume_size: ByteSize,
    pub io: WorkloadConfig,
    /// Export and compare every replica's image every this many episodes (and after the last one).
    pub audit_every: u64,
    /// Print one line per episode to stderr.
    pub verbose: bool,
}

impl SoakConfig {
    /// The short, fixed-seed run CI does: one round of every fault kind on a 32 MiB volume.
    pub fn ci() -> SoakConfig {
        SoakConfig {
            seed: 0x00ba_5a17,
            episodes: Some(FaultKind::ALL.len() as u64),
            duration: None,
            volume_size: ByteSize::mib(32),
            io: WorkloadConfig::default(),
            audit_every: 2,
            verbose: true,
        }
    }
}

/// What a run did and found. `losses` must be empty.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub episodes: u64,
    pub elapsed: Duration,
    pub faults: BTreeMap<FaultKind, u64>,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub writes_unknown: u64,
    pub flushes: u64,
    pub logins: u64,
    /// Blocks checked by whole-volume read-backs (every episode).
    pub blocks_verified: u64,
    /// Blocks compared across replica images (audits).
    pub blocks_audited: u64,
    pub audits: u64,
    pub snapshots_created: u64,
    pub snapshots_deleted: u64,
    /// Snapshot operations the controller refused (expected while a rebuild runs).
    pub snapshots_refused: u64,
    pub losses: Vec<(u64, Loss)>,
    pub divergent: Vec<(u64, String)>,
    /// Controllers that refused to start although every replica was running (availability failures);
    /// the harness recovered with `--min-healthy 1` to go on. Must be empty.
    pub refused_starts: Vec<(u64, String)>,
    /// Clones made, checked and stopped (`CloneVolume` episodes).
    pub clones: u64,
    /// Clone replicas killed while their clone was still hydrating, and after.
    pub clone_kills_mid_hydration: u64,
    pub clone_kills_after_hydration: u64,
    /// Blocks of clones read back and checked.
    pub clone_blocks_verified: u64,
    /// Writes the clones acknowledged.
    pub clone_writes_acked: u64,
}

impl SoakReport {
    pub fn faults_injected(&self) -> u64 {
        self.faults.values().sum()
    }

    /// Losses and replica divergences, described (for assertion messages).
    pub fn problems(&self) -> String {
        let mut out = String::new();
        for (episode, loss) in self.losses.iter().take(20) {
            out += &format!("episode {episode}: {loss}\n");
        }
        for (episode, d) in self.divergent.iter().take(20) {
            out += &format!("episode {episode}: replicas differ at {d}\n");
        }
        for (episode, why) in self.refused_starts.iter().take(20) {
            out += &format!("episode {episode}: a new controller refused to serve: {why}\n");
        }
        out
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {:#x}: {} episodes in {:.0?}",
            self.seed, self.episodes, self.elapsed
        )?;
        writeln!(
            f,
            "faults injected: {} ({})",
            self.faults_injected(),
            self.faults
                .iter()
                .map(|(k, n)| format!("{k:?} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "writes: {} acknowledged, {} failed, {} unknown (connection lost); flushes: {}; logins: {}",
            self.writes_acked, self.writes_failed, self.writes_unknown, self.flushes, self.logins
        )?;
        writeln!(
            f,
            "verified: {} blocks read back, {} blocks compared across replicas in {} audits",
            self.blocks_verified, self.blocks_audited, self.audits
        )?;
        writeln!(
            f,
            "snapshots: {} created, {} deleted, {} refused",
            self.snapshots_created, self.snapshots_deleted, self.snapshots_refused
        )?;
        writeln!(
            f,
            "clones: {} ({} clone replicas killed mid-hydration, {} after); {} clone writes acknowledged; \
             {} clone blocks verified",
            self.clones,
            self.clone_kills_mid_hydration,
            self.clone_kills_after_hydration,
            self.clone_writes_acked,
            self.clone_blocks_verified
        )?;
        write!(
            f,
            "losses: {}, divergent blocks: {}, controllers refusing to start: {}",
            self.losses.len(),
            self.divergent.len(),
            self.refused_starts.len()
        )
    }
}

/// Runs episodes until `config` says stop. Errors are harness failures or liveness failures (the volume
/// stopped answering, or did not heal); data losses are in the report.
pub fn run(config: &SoakConfig) -> Result<SoakReport, FaultError> {
    let started = Instant::now();
    let mut volume = FaultVolume::start(3, config.volume_size, config.seed)?;
    let mut report = SoakReport {
        seed: config.seed,
        ..SoakReport::default()
    };
    start_controller(&mut volume, 0, &mut report)?;
    let mut schedule = Schedule::new(config.seed, volume.replica_count());
    let mut snapshot_serial = 0u64;
    let clone_stats = Arc::new(IoStats::default());
    loop {
        let done_by_count = config.episodes.is_some_and(|n| report.episodes >= n);
        let done_by_time = config.duration.is_some_and(|d| started.elapsed() >= d);
        if done_by_count || done_by_time || (config.episodes.is_none() && config.duration.is_none()) {
            break;
        }
        let episode = report.episodes + 1;
        let plan = schedule.next_plan();
        let before = counters(&volume.stats);
        let episode_started = Instant::now();
        run_episode(
            &mut volume,
            &plan,
            config,
            episode,
            &mut snapshot_serial,
            &clone_stats,
            &mut report,
        )
        .map_err(|e| FaultError::Episode {
            seed: config.seed,
            episode,
            plan: plan.to_string(),
            source: Box::new(e),
        })?;
        *report.faults.entry(plan.kind).or_default() += 1;
        report.episodes = episode;

        volume
            .wait_all_read_write(HEAL_TIMEOUT)
            .map_err(|e| FaultError::Episode {
                seed: config.seed,
                episode,
                plan: plan.to_string(),
                source: Box::new(e),
            })?;
        let back = volume.read_back()?;
        report.blocks_verified += back.blocks_checked;
        for loss in back.losses.iter().take(10) {
            eprintln!("fault harness: episode {episode}: LOSS on read-back: {loss}");
        }
        report
            .losses
            .extend(back.losses.into_iter().map(|l| (episode, l)));
        let last = config.episodes.is_some_and(|n| episode >= n)
            || config.duration.is_some_and(|d| started.elapsed() >= d);
        let audited = config.audit_every > 0 && (episode.is_multiple_of(config.audit_every) || last);
        if audited {
            let audit = volume.audit()?;
            for problem in audit.divergent.iter().take(10) {
                eprintln!("fault harness: episode {episode}: replicas DIVERGE at {problem}");
            }
            for loss in audit.losses.iter().take(10) {
                eprintln!("fault harness: episode {episode}: LOSS in a replica image: {loss}");
            }
            report.audits += 1;
            report.blocks_audited += audit.blocks_compared;
            report
                .divergent
                .extend(audit.divergent.into_iter().map(|d| (episode, d)));
            report
                .losses
                .extend(audit.losses.into_iter().map(|l| (episode, l)));
            start_controller(&mut volume, episode, &mut report)?;
        }
        let after = counters(&volume.stats);
        if config.verbose {
            eprintln!(
                "fault harness: episode {episode} [{plan}] {:.1}s: {} writes acked, {} failed/unknown, {} flushes; \
                 {} blocks verified ({} written){}; losses so far {}",
                episode_started.elapsed().as_secs_f64(),
                after.0 - before.0,
                (after.1 + after.2) - (before.1 + before.2),
                after.3 - before.3,
                back.blocks_checked,
                back.blocks_written,
                if audited { ", replicas audited" } else { "" },
                report.losses.len() + report.divergent.len() + report.refused_starts.len(),
            );
        }
    }
    let totals = counters(&volume.stats);
    (
        report.writes_acked,
        report.writes_failed,
        report.writes_unknown,
        report.flushes,
    ) = totals;
    report.logins = IoStats::get(&volume.stats.logins);
    report.clone_writes_acked = IoStats::get(&clone_stats.writes_acked);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Starts a controller. If it refuses to serve with every replica running, that is an availability failure:
/// recorded, then worked around (a controller with `--min-healthy 1`, waiting until every replica is RW
/// again) so that the run goes on and reports everything it finds.
fn start_controller(
    volume: &mut FaultVolume,
    episode: u64,
    report: &mut SoakReport,
) -> Result<(), FaultError> {
    let refusal = match volume.start_controller() {
        Ok(_) => return Ok(()),
        Err(e) => refused_to_serve(&e).ok_or(e)?,
    };
    eprintln!("fault harness: episode {episode}: AVAILABILITY FAILURE: {refusal}");
    report.refused_starts.push((episode, refusal));
    // Keep this controller: a clean restart would be refused again (rebuilds do not bring the replicas'
    // revisions level). Writes still go to every active replica; only the floor for serving is lower.
    volume.start_controller_with(&["--min-healthy", "1"])?;
    volume.wait_all_read_write(HEAL_TIMEOUT)?;
    Ok(())
}

fn counters(stats: &IoStats) -> (u64, u64, u64, u64) {
    (
        IoStats::get(&stats.writes_acked),
        IoStats::get(&stats.writes_failed),
        IoStats::get(&stats.writes_unknown),
        IoStats::get(&stats.flushes_ok),
    )
}

fn run_episode(
    volume: &mut FaultVolume,
    plan: &Plan,
    config: &SoakConfig,
    episode: u64,
    snapshot_serial: &mut u64,
    clone_stats: &Arc<IoStats>,
    report: &mut SoakReport,
) -> Result<(), FaultError> {
    let io_seed = config.seed.wrapping_mul(0x100_0000_01b3).wrapping_add(episode);
    volume.start_io(config.io, io_seed)?;
    std::thread::sleep(plan.warmup);
    let mut snapshot = |volume: &FaultVolume, report: &mut SoakReport| -> Result<(), FaultError> {
        *snapshot_serial += 1;
        if volume.snapshot_create(&format!("fault-{episode}-{snapshot_serial}"))? {
            report.snapshots_created += 1;
        } else {
            report.snapshots_refused += 1;
        }
        Ok(())
    };
    if plan.snapshot_before {
        snapshot(volume, report)?;
    }
    let r = plan.replica;
    match plan.kind {
        FaultKind::KillReplica => {
            volume.kill_replica(r);
            hold(volume, plan, &mut snapshot, report)?;
            volume.restart_replica(r)?;
        }
        FaultKind::HangReplica => {
            volume.hang_replica(r);
            hold(volume, plan, &mut snapshot, report)?;
            volume.resume_replica(r);
        }
        FaultKind::CutReplica => {
            volume.set_link(r, Link::Cut);
            hold(volume, plan, &mut snapshot, report)?;
            volume.set_link(r, Link::Up);
        }
        FaultKind::BlackholeReplica => {
            volume.set_link(r, Link::Blackhole);
            hold(volume, plan, &mut snapshot, report)?;
            volume.set_link(r, Link::Up);
        }
        FaultKind::ExpandVolume => {
            volume.kill_replica(r);
            std::thread::sleep(plan.hold / 2);
            let size = volume.expand(EXPANSION)?;
            if config.verbose {
                eprintln!("fault harness: episode {episode}: volume grown to {size} bytes");
            }
            hold(volume, plan, &mut snapshot, report)?;
            volume.restart_replica(r)?;
        }
        FaultKind::CloneVolume => {
            *snapshot_serial += 1;
            let name = format!("clone-{episode}-{snapshot_serial}");
            let clone_seed = io_seed ^ 0xc10e;
            let outcome = clone_episode(
                volume,
                plan,
                plan.kill_clone_replica,
                &name,
                config.io,
                clone_seed,
                clone_stats,
            )?;
            report.snapshots_created += 1;
            report.snapshots_refused += outcome.snapshots_refused;
            report.clones += 1;
            report.clone_kills_mid_hydration += outcome.killed_mid_hydration;
            report.clone_kills_after_hydration += outcome.killed_after_hydration;
            report.clone_blocks_verified += outcome.blocks_verified;
            for loss in outcome.losses.iter().take(10) {
                eprintln!("fault harness: episode {episode}: LOSS in the clone of {name}: {loss}");
            }
            report
                .losses
                .extend(outcome.losses.into_iter().map(|l| (episode, l)));
            if config.verbose {
                eprintln!(
                    "fault harness: episode {episode}: clone of {name} verified ({} blocks){}",
                    outcome.blocks_verified,
                    match (outcome.killed_mid_hydration, outcome.killed_after_hydration) {
                        (0, 0) => "",
                        (0, _) => ", a clone replica killed after hydration",
                        _ => ", a clone replica killed mid-hydration",
                    }
                );
            }
        }
        FaultKind::KillController => {
            volume.kill_controller();
            std::thread::sleep(plan.hold);
            start_controller(volume, episode, report)?;
            if plan.snapshot_during {
                snapshot(volume, report)?;
            }
        }
    }
    std::thread::sleep(plan.after);
    if plan.delete_after {
        if let Some(oldest) = volume.snapshot_list()?.into_iter().next() {
            if volume.snapshot_delete(&oldest)? {
                report.snapshots_deleted += 1;
            } else {
                report.snapshots_refused += 1;
            }
        }
    }
    volume.stop_io()
}

/// Lets the fault last `plan.hold`, taking a snapshot half-way if the plan says so.
fn hold(
    volume: &FaultVolume,
    plan: &Plan,
    snapshot: &mut impl FnMut(&FaultVolume, &mut SoakReport) -> Result<(), FaultError>,
    report: &mut SoakReport,
) -> Result<(), FaultError> {
    if plan.snapshot_during {
        std::thread::sleep(plan.hold / 2);
        let started = Instant::now();
        snapshot(volume, report)?;
        std::thread::sleep((plan.hold / 2).saturating_sub(started.elapsed()));
    } else {
        std::thread::sleep(plan.hold);
    }
    Ok(())
}
