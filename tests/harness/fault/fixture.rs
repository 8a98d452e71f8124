//! [`FaultVolume`]: a 3-replica volume of real processes with a proxy in front of every replica, the
//! verifier's workload, and every fault the harness can inject, as plain blocking methods.
//!
//! ```text
//!   Workload (initiator, QD n) ──iSCSI──► controller ──► proxy r1 ──► replica r1   (dir r1/)
//!        │ ledger                          (killable)   proxy r2 ──► replica r2   (killable, stoppable)
//!        ▼                                              proxy r3 ──► replica r3
//!   read_back / audit                                   (Up | Cut | Blackhole)
//! ```
//!
//! Tests (and the soak driver) run on the test thread and call these methods; the workload and the proxies
//! run on a small tokio runtime the fixture owns. Replicas are always reached through their proxies, so a
//! controller started by the fixture never sees a replica's own address.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::initiator::{InitiatorError, Session};
use super::ledger::{decode_block, BlockIndex, Ledger, Loss, BLOCK_BYTES};
use super::proxy::{Link, Proxy};
use super::workload::{read_back, IoStats, ReadBack, Workload, WorkloadConfig};
use super::FaultError;
use crate::volume::{replica_mode, volume_info, Cluster, Controller};
use crate::{basalt_command, io, run_checked, ByteSize};

/// How long a healed volume may take to have every replica back in read-write mode: the controller
/// re-adds a returning replica after a back-off of up to 30 s, then rebuilds it (a delta, by checksums).
pub const HEAL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a test waits for the workload to make the progress it asks for (a few hundred writes and
/// flushes, a login to a new controller): well under a second on an idle machine, seconds on a loaded
/// shared one with a debug build; past this the volume is stuck, not slow.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// The controller's --replica-timeout in the harness (the `Cluster` fixture's value): a replica silent for
/// this long is dropped. Hangs are drawn on both sides of it.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(3);

/// What [`FaultVolume::audit`] found.
#[derive(Debug, Default)]
pub struct Audit {
    /// Blocks compared across the replicas' exported images.
    pub blocks_compared: u64,
    /// Blocks that differ between replicas, with the replicas' generations (first few).
    pub divergent: Vec<String>,
    /// Blocks whose exported content fails the ledger (first few).
    pub losses: Vec<Loss>,
}

pub struct FaultVolume {
    // Drop order: workload and controller before the replicas, the runtime (proxies) last but before the
    // cluster's directory.
    workload: Option<Workload>,
    controller: Option<Controller>,
    proxies: Vec<Proxy>,
    hung: Vec<bool>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub stats: Arc<IoStats>,
    runtime: tokio::runtime::Runtime,
    pub cluster: Cluster,
    controller_args: Vec<String>,
}

impl Drop for FaultVolume {
    fn drop(&mut self) {
        // A SIGSTOPped replica would ignore the SIGTERM its guard sends first: wake it up.
        for i in 0..self.hung.len() {
            if self.hung[i] {
                self.resume_replica(i);
            }
        }
    }
}

impl FaultVolume {
    /// Starts `replicas` replica processes of a new volume of `size` and a proxy for each (no controller).
    /// `tag` marks this run's blocks.
    pub fn start(replicas: usize, size: ByteSize, tag: u64) -> Result<FaultVolume, FaultError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io("start the fault harness's tokio runtime"))?;
        let cluster = Cluster::start(replicas, size)?;
        let mut proxies = Vec::new();
        for r in &cluster.replicas {
            let proxy = runtime
                .block_on(Proxy::start(r.addr))
                .map_err(io(format!("start a proxy for replica {}", r.addr)))?;
            proxies.push(proxy);
        }
        let blocks = size.bytes() / BLOCK_BYTES as u64;
        Ok(FaultVolume {
            workload: None,
            controller: None,
            proxies,
            hung: vec![false; replicas],
            ledger: Arc::new(Mutex::new(Ledger::new(tag, blocks))),
            stats: Arc::new(IoStats::default()),
            runtime,
            cluster,
            controller_args: Vec::new(),
        })
    }

    /// Extra arguments for every controller this fixture starts (e.g. `--min-healthy 2`).
    pub fn set_controller_args(&mut self, args: &[&str]) {
        self.controller_args = args.iter().map(|a| a.to_string()).collect();
    }

    pub fn replica_count(&self) -> usize {
        self.cluster.replicas.len()
    }

    /// The address the controller knows replica `i` by (its proxy).
    pub fn replica_address(&self, i: usize) -> SocketAddr {
        self.proxies[i].listen
    }

    /// Starts a new controller over the proxies and points the workload (if running) at it.
    pub fn start_controller(&mut self) -> Result<&Controller, FaultError> {
        self.start_controller_with(&[])
    }

    /// [`FaultVolume::start_controller`] with `extra` arguments for this controller only (after the
    /// fixture's own, so they win).
    pub fn start_controller_with(&mut self, extra: &[&str]) -> Result<&Controller, FaultError> {
        let via: Vec<String> = self.proxies.iter().map(|p| p.listen.to_string()).collect();
        let mut args: Vec<&str> = self.controller_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let controller = self.cluster.start_controller_via(&via, &args)?;
        if let Some(workload) = &self.workload {
            workload.set_portal(controller.url.portal);
        }
        Ok(self.controller.insert(controller))
    }

    pub fn controller(&self) -> Result<&Controller, FaultError> {
        self.controller.as_ref().ok_or(FaultError::NoController)
    }

    /// SIGKILLs the controller (its process group), like a node crash. Replicas keep running.
    pub fn kill_controller(&mut self) {
        if let Some(controller) = self.controller.take() {
            signal_group(controller.daemon.pid(), libc::SIGKILL);
            let _ = controller.daemon.stop();
        }
    }

    /// Stops the controller cleanly (SIGTERM: it flushes every replica and exits).
    pub fn stop_controller(&mut self) -> Result<(), FaultError> {
        if let Some(controller) = self.controller.take() {
            controller.daemon.stop()?;
        }
        Ok(())
    }

    /// SIGKILLs replica `i`.
    pub fn kill_replica(&mut self, i: usize) {
        if self.hung[i] {
            self.resume_replica(i);
        }
        self.cluster.kill_replica(i);
    }

    /// Starts replica `i` again on its directory and address.
    pub fn restart_replica(&mut self, i: usize) -> Result<(), FaultError> {
        Ok(self.cluster.start_replica(i)?)
    }

    /// SIGSTOPs replica `i`: its connections stay open but nothing answers (a hung process or node).
    pub fn hang_replica(&mut self, i: usize) {
        if let Some(d) = &self.cluster.replicas[i].daemon {
            signal_group(d.pid(), libc::SIGSTOP);
            self.hung[i] = true;
        }
    }

    /// SIGCONTs replica `i`.
    pub fn resume_replica(&mut self, i: usize) {
        if let Some(d) = &self.cluster.replicas[i].daemon {
            signal_group(d.pid(), libc::SIGCONT);
        }
        self.hung[i] = false;
    }

    /// Sets the network link between the controller and replica `i`.
    pub fn set_link(&mut self, i: usize, link: Link) {
        self.proxies[i].set(link);
    }

    /// Starts the verifier's workload against the current controller.
    pub fn start_io(&mut self, config: WorkloadConfig, seed: u64) -> Result<(), FaultError> {
        let controller = self.controller()?;
        let (portal, iqn) = (controller.url.portal, controller.url.iqn.clone());
        let _guard = self.runtime.enter();
        self.workload = Some(Workload::start(
            self.ledger.clone(),
            self.stats.clone(),
            portal,
            &iqn,
            config,
            seed,
        ));
        Ok(())
    }

    /// Stops the workload and waits for every command in flight.
    pub fn stop_io(&mut self) -> Result<(), FaultError> {
        if let Some(workload) = self.workload.take() {
            self.runtime.block_on(workload.stop())?;
        }
        Ok(())
    }

    /// `basalt volume info --json` of the current controller.
    pub fn info(&self) -> Result<Value, FaultError> {
        Ok(volume_info(self.controller()?.api)?)
    }

    /// Waits until the controller serves with every replica read-write (after faults are healed).
    pub fn wait_all_read_write(&mut self, timeout: Duration) -> Result<Value, FaultError> {
        let start = Instant::now();
        let mut last = Value::Null;
        loop {
            if let Some(c) = self.controller.as_mut() {
                c.daemon.check_running()?;
            }
            if let Ok(info) = self.info() {
                let all_rw = info["replicas"].as_array().is_some_and(|rs| {
                    rs.len() == self.replica_count() && rs.iter().all(|r| r["mode"] == "RW")
                });
                if all_rw && info["state"] == "serving" {
                    return Ok(info);
                }
                last = info;
            }
            if start.elapsed() > timeout {
                return Err(FaultError::NotHealed {
                    waited: timeout,
                    info: last.to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until `ready` holds of the workload's counters (checked every 20 ms, and that the controller
    /// still runs), for at most [`PROGRESS_TIMEOUT`]. Tests wait for what they need to have happened --
    /// writes acknowledged, a login to a new controller -- never for a fixed time, which is too short on a
    /// loaded machine and needlessly long on an idle one.
    pub fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&IoStats) -> bool,
    ) -> Result<(), FaultError> {
        let start = Instant::now();
        while !ready(&self.stats) {
            if let Some(c) = self.controller.as_mut() {
                c.daemon.check_running()?;
            }
            if start.elapsed() > PROGRESS_TIMEOUT {
                return Err(FaultError::NoProgress {
                    what: what.into(),
                    waited: PROGRESS_TIMEOUT,
                    stats: format!("{:?}", self.stats),
                    info: self.info().map(|i| i.to_string()).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until the workload has had `writes` more writes and `flushes` more flushes acknowledged than
    /// when called.
    pub fn wait_for_io(&mut self, writes: u64, flushes: u64) -> Result<(), FaultError> {
        let (w0, f0) = (
            IoStats::get(&self.stats.writes_acked),
            IoStats::get(&self.stats.flushes_ok),
        );
        let what = format!("{writes} more writes and {flushes} more flushes acknowledged");
        self.wait_until(&what, |stats| {
            IoStats::get(&stats.writes_acked) >= w0 + writes
                && IoStats::get(&stats.flushes_ok) >= f0 + flushes
        })
    }

    /// Waits until `volume info` shows replica `i` in `mode` ("RW", "WO", "ERR"), for at most
    /// [`PROGRESS_TIMEOUT`].
    pub fn wait_for_mode(&mut self, i: usize, mode: &str) -> Result<(), FaultError> {
        let addr = self.replica_address(i);
        let start = Instant::now();
        loop {
            if let Some(c) = self.controller.as_mut() {
                c.daemon.check_running()?;
            }
            let info = self.info()?;
            if replica_mode(&info, addr).as_deref() == Some(mode) {
                return Ok(());
            }
            if start.elapsed() > PROGRESS_TIMEOUT {
                return Err(FaultError::NoProgress {
                    what: format!("replica {addr} in mode {mode}"),
                    waited: PROGRESS_TIMEOUT,
                    stats: format!("{:?}", self.stats),
                    info: info.to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Logs in to the current controller (a fresh session, for checks).
    pub fn session(&self) -> Result<Arc<Session>, FaultError> {
        let controller = self.controller()?;
        let (portal, iqn) = (controller.url.portal, controller.url.iqn.clone());
        Ok(Arc::new(self.runtime.block_on(Session::login(portal, &iqn))?))
    }

    /// Flushes, then reads the whole volume through the controller and checks it against the ledger. The
    /// workload must be stopped.
    pub fn read_back(&self) -> Result<ReadBack, FaultError> {
        let session = self.session()?;
        self.runtime
            .block_on(async {
                let flushed = session.flush().await;
                if !flushed.is_good() {
                    return Err(InitiatorError::Command {
                        portal: session.portal(),
                        outcome: flushed,
                    });
                }
                read_back(&session, &self.ledger).await
            })
            .map_err(FaultError::from)
    }

    /// Stops the controller and every replica cleanly, exports each replica's image with `basalt replica
    /// export`, and compares them block for block with each other and with the ledger. Every replica must
    /// be read-write before (call [`FaultVolume::wait_all_read_write`]). Restarts the replicas (not the
    /// controller) afterwards.
    pub fn audit(&mut self) -> Result<Audit, FaultError> {
        const SHOWN: usize = 10;
        self.stop_io()?;
        self.stop_controller()?;
        let n = self.replica_count();
        for i in 0..n {
            if self.hung[i] {
                self.resume_replica(i);
            }
            self.cluster.stop_replica(i)?;
        }
        let mut images = Vec::new();
        for i in 0..n {
            let path = self.cluster.export_replica(i)?;
            images.push(crate::read_file(&path)?);
            std::fs::remove_file(&path).map_err(io(format!("remove {}", path.display())))?;
        }
        let (tag, blocks) = {
            let ledger = self.ledger.lock().expect("ledger lock");
            (ledger.tag(), ledger.block_count())
        };
        let mut audit = Audit::default();
        for (i, image) in images.iter().enumerate() {
            if image.len() as u64 != blocks * BLOCK_BYTES as u64 {
                return Err(FaultError::Audit(format!(
                    "replica r{}'s export is {} bytes, the volume {}",
                    i + 1,
                    image.len(),
                    blocks * BLOCK_BYTES as u64
                )));
            }
        }
        let ledger = self.ledger.lock().expect("ledger lock");
        for b in 0..blocks {
            let index = BlockIndex(b);
            let range = b as usize * BLOCK_BYTES..(b as usize + 1) * BLOCK_BYTES;
            audit.blocks_compared += 1;
            let first = &images[0][range.clone()];
            if images[1..].iter().any(|img| &img[range.clone()] != first) {
                if audit.divergent.len() < SHOWN {
                    let seen: Vec<String> = images
                        .iter()
                        .enumerate()
                        .map(|(i, img)| {
                            format!("r{}: {:?}", i + 1, decode_block(tag, index, &img[range.clone()]))
                        })
                        .collect();
                    audit.divergent.push(format!("block {b}: {}", seen.join(", ")));
                } else {
                    audit.divergent.push(format!("block {b}"));
                }
            }
            for img in &images {
                if let Err(loss) = ledger.check(index, decode_block(tag, index, &img[range.clone()])) {
                    audit.losses.push(loss);
                }
            }
        }
        drop(ledger);
        for i in 0..n {
            self.cluster.start_replica(i)?;
        }
        Ok(audit)
    }

    /// Grows the volume by `by` with `basalt volume expand`, while I/O goes on, and the ledger with it (the
    /// new blocks read as zeros); returns the new size in bytes.
    pub fn expand(&self, by: ByteSize) -> Result<u64, FaultError> {
        let size = self.info()?["size_bytes"].as_u64().unwrap_or(0);
        let to = size + by.bytes();
        let api = self.controller()?.api.to_string();
        let mut cmd = basalt_command()?;
        cmd.args(["volume", "expand", "--api", &api, "--size", &to.to_string()]);
        run_checked(&mut cmd)?;
        self.ledger
            .lock()
            .expect("ledger lock")
            .grow(to / BLOCK_BYTES as u64);
        Ok(to)
    }

    /// `basalt snapshot create NAME`; `Ok(false)` if the controller refused (e.g. a rebuild is running).
    pub fn snapshot_create(&self, name: &str) -> Result<bool, FaultError> {
        self.snapshot_command(&["create", name])
    }

    /// `basalt snapshot rm NAME`; `Ok(false)` if refused.
    pub fn snapshot_delete(&self, name: &str) -> Result<bool, FaultError> {
        self.snapshot_command(&["rm", name])
    }

    /// The snapshot chain, oldest first.
    pub fn snapshot_list(&self) -> Result<Vec<String>, FaultError> {
        Ok(self.snapshot_json("ls")?["snapshots"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|s| s["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `basalt snapshot SUBCOMMAND --json`, parsed.
    fn snapshot_json(&self, subcommand: &str) -> Result<Value, FaultError> {
        let api = self.controller()?.api.to_string();
        let mut cmd = basalt_command()?;
        cmd.args(["snapshot", subcommand, "--json", "--api", &api]);
        let out = run_checked(&mut cmd)?;
        Ok(
            serde_json::from_slice(&out.stdout).map_err(|e| crate::HarnessError::Parse {
                what: format!("basalt snapshot {subcommand} --json"),
                detail: e.to_string(),
            })?,
        )
    }

    fn snapshot_command(&self, args: &[&str]) -> Result<bool, FaultError> {
        let api = self.controller()?.api.to_string();
        let mut cmd = basalt_command()?;
        cmd.arg("snapshot").args(args).args(["--api", &api]);
        match run_checked(&mut cmd) {
            Ok(_) => Ok(true),
            Err(crate::HarnessError::CommandFailed { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The holds clones have on the source's snapshots (`basalt snapshot holds --json`).
    pub fn snapshot_holds(&self) -> Result<Vec<Value>, FaultError> {
        Ok(self.snapshot_json("holds")?["holds"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The fixture's runtime, on which its workloads and proxies run (for workloads of other volumes).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Runs `f` on the fixture's runtime (for tests that drive the initiator directly).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// If `error` is a controller that refused to start because too few replicas were up to date, its
/// explanation (the controller's last log line).
pub fn refused_to_serve(error: &FaultError) -> Option<String> {
    match error {
        FaultError::Harness(crate::HarnessError::Daemon { log, .. }) if log.contains("refusing to serve") => {
            log.lines()
                .rev()
                .find(|l| l.contains("refusing to serve"))
                .map(str::to_string)
        }
        _ => None,
    }
}

/// Sends `signal` to the process group led by `pid` (our own child).
fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a process group we spawned; no memory is touched.
    unsafe { libc::kill(-(pid as libc::pid_t), signal) };
}
