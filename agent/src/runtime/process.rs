//! Services as child processes of the agent (the `process` runtime).
//!
//! Each service is `basalt replica ...` or `basalt controller ...` run from
//! the agent's own executable (or `runtime.binary`), built from its
//! [`ServiceSpec`] by [`command_args`]. Secrets reach it as file paths only.
//! Its stdout and stderr go to `DATA_DIR/logs/VOLUME/SERVICE.log`.
//!
//! ```text
//!  ensure(key, spec) ──► supervisor task ──► spawn ──► wait ──► exit
//!                              ▲                                  │
//!                              └──── back-off (1 s … 30 s) ◄──────┘
//! ```
//!
//! A supervisor task per service restarts it when it exits, after an
//! exponential back-off, and counts the restarts.
//!
//! # Restart safety: adoption
//!
//! The services outlive the agent: an agent that is killed (or stopped with
//! SIGTERM) leaves its volumes serving, so upgrading or restarting it never
//! interrupts I/O. Each start is recorded in `DATA_DIR/run/VOLUME/SERVICE.json`
//! (the pid, the process's start time from `/proc/PID/stat`, and the command
//! line). A new agent reads these records at start; when the reconciler then
//! asks for the same service with the same command line, the process is
//! *adopted*: supervised by polling `/proc` instead of waiting on it as a
//! child. A record whose pid is gone, or belongs to another process now (the
//! start time differs), is dropped; a live process started with another
//! command line is stopped and started anew; a live process the store no
//! longer assigns to this node is stopped ([`Runtime::observe`] reports it
//! so the reconciler sees it).
//!
//! The services stay in the agent's process group: a Ctrl-C in the agent's
//! terminal (or a kill of the whole group) stops them too, cleanly.
//!
//! Size and QoS limits change online (`VolumeExpand`, `VolumeSetQos`), so a
//! spec that differs from the running one only in those never restarts the
//! service: the new values are used at its next start.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use basalt_engine::name::VolumeName;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ControllerSpec, Observed, ReplicaSpec, ReplicaStorage, Runtime, ServiceKey, ServiceSpec};
use crate::model::{QosSpec, ServiceId, ServiceState};

/// First wait before restarting a service that exited: long enough not to
/// spin on a service that fails at once (a port taken, a missing file).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between restarts: a service that keeps failing is retried
/// at least this often, so it comes back soon after its cause is fixed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A service that ran this long before exiting is restarted after the first
/// back-off again: it had recovered, and this is a new failure.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long a service may take to exit after SIGTERM: a controller flushes
/// everything acknowledged and a replica syncs its store before exiting.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// How often an adopted process (not our child: no exit notification) is
/// checked for being alive.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// The `process` runtime (see the module docs).
pub struct ProcessRuntime {
    binary: PathBuf,
    data_dir: PathBuf,
    services: Mutex<BTreeMap<ServiceKey, Supervised>>,
    /// Processes recorded by an earlier agent, not yet adopted or stopped.
    found: Mutex<BTreeMap<ServiceKey, RunRecord>>,
}

struct Supervised {
    identity: Vec<OsString>,
    shared: Arc<Mutex<Shared>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What the supervisor and the runtime share about one service.
struct Shared {
    /// The spec of the next start (size and QoS updated in place).
    spec: ServiceSpec,
    state: ServiceState,
    restarts: u32,
    message: Option<String>,
}

/// A started process as recorded under `DATA_DIR/run/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: tells this process from a later one
    /// that reuses its pid.
    pub start_time: u64,
    /// The command line without the online-changeable values (see
    /// [`identity_args`]).
    pub identity: Vec<String>,
}

/// A process being supervised: our child, or one adopted from an earlier agent.
enum Running {
    Child(tokio::process::Child),
    Adopted { pid: u32, start_time: u64 },
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Child(c) => c.id(),
            Running::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Waits until the process exits; says how.
    async fn exited(&mut self) -> String {
        match self {
            Running::Child(c) => match c.wait().await {
                Ok(status) => format!("exited ({status})"),
                Err(e) => format!("could not be waited for: {e}"),
            },
            Running::Adopted { pid, start_time } => {
                while process_start_time(*pid) == Some(*start_time) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                "exited (adopted from an earlier agent: status unknown)".to_string()
            }
        }
    }

    fn alive(&mut self) -> bool {
        match self {
            Running::Child(c) => matches!(c.try_wait(), Ok(None)),
            Running::Adopted { pid, start_time } => process_start_time(*pid) == Some(*start_time),
        }
    }
}

impl ProcessRuntime {
    /// A runtime running `binary`, keeping logs and run records under
    /// `data_dir`. Reads the records an earlier agent left (see the module
    /// docs): live processes among them are reported by `observe` until they
    /// are adopted or stopped.
    pub fn new(binary: PathBuf, data_dir: PathBuf) -> anyhow::Result<ProcessRuntime> {
        let found = read_run_records(&data_dir.join("run"))?;
        Ok(ProcessRuntime {
            binary,
            data_dir,
            services: Mutex::new(BTreeMap::new()),
            found: Mutex::new(found),
        })
    }

    fn log_path(&self, key: &ServiceKey) -> PathBuf {
        self.data_dir
            .join("logs")
            .join(key.volume.as_str())
            .join(format!("{}.log", key.service))
    }

    fn run_path(&self, key: &ServiceKey) -> PathBuf {
        run_path(&self.data_dir, key)
    }

    fn spawn(&self, key: &ServiceKey, spec: &ServiceSpec) -> anyhow::Result<Running> {
        spawn(&self.binary, &self.log_path(key), &self.run_path(key), spec)
    }

    fn start_supervisor(&self, key: &ServiceKey, spec: &ServiceSpec, running: Running) -> Supervised {
        let shared = Arc::new(Mutex::new(Shared {
            spec: spec.clone(),
            state: ServiceState::Running,
            restarts: 0,
            message: None,
        }));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(supervise(
            key.clone(),
            running,
            shared.clone(),
            cancel.clone(),
            self.binary.clone(),
            self.log_path(key),
            self.run_path(key),
        ));
        Supervised {
            identity: identity_args(spec),
            shared,
            cancel,
            task,
        }
    }

    fn take(&self, key: &ServiceKey) -> Option<Supervised> {
        lock(&self.services).remove(key)
    }
}

impl Drop for ProcessRuntime {
    /// The agent is going away: its supervisors end, its services keep
    /// running for the next agent to adopt (see the module docs).
    fn drop(&mut self) {
        for s in lock(&self.services).values() {
            s.task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind,
    // still consistent: go on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runtime for ProcessRuntime {
    fn ensure<'a>(&'a self, key: &'a ServiceKey, spec: &'a ServiceSpec) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let identity = identity_args(spec);
            let restart = {
                let services = lock(&self.services);
                match services.get(key) {
                    Some(s) if s.identity == identity => {
                        // The same service: only size or QoS may differ, which
                        // apply online; keep them for its next start.
                        lock(&s.shared).spec = spec.clone();
                        return Ok(());
                    }
                    Some(_) => true,
                    None => false,
                }
            };
            if restart {
                tracing::info!(volume = %key.volume, service = %key.service, "spec changed: restarting");
                if let Some(old) = self.take(key) {
                    stop_supervised(old).await;
                }
            }
            let found = lock(&self.found).remove(key);
            let running = match found {
                Some(rec) if process_start_time(rec.pid) == Some(rec.start_time) => {
                    if rec.identity == to_strings(&identity) {
                        tracing::info!(volume = %key.volume, service = %key.service, pid = rec.pid,
                            "adopted a running service started by an earlier agent");
                        Running::Adopted {
                            pid: rec.pid,
                            start_time: rec.start_time,
                        }
                    } else {
                        tracing::info!(volume = %key.volume, service = %key.service, pid = rec.pid,
                            "a service left by an earlier agent runs with another spec: replacing it");
                        terminate(&mut Running::Adopted {
                            pid: rec.pid,
                            start_time: rec.start_time,
                        })
                        .await;
                        self.spawn(key, spec)?
                    }
                }
                _ => self.spawn(key, spec)?,
            };
            let supervised = self.start_supervisor(key, spec, running);
            lock(&self.services).insert(key.clone(), supervised);
            Ok(())
        })
    }

    fn stop<'a>(&'a self, key: &'a ServiceKey) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if let Some(s) = self.take(key) {
                stop_supervised(s).await;
            }
            let found = lock(&self.found).remove(key);
            if let Some(rec) = found {
                terminate(&mut Running::Adopted {
                    pid: rec.pid,
                    start_time: rec.start_time,
                })
                .await;
            }
            remove_if_exists(&self.run_path(key))
        })
    }

    fn observe(&self) -> BoxFuture<'_, anyhow::Result<Vec<(ServiceKey, Observed)>>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (key, s) in lock(&self.services).iter() {
                let sh = lock(&s.shared);
                out.push((
                    key.clone(),
                    Observed {
                        state: sh.state,
                        restarts: sh.restarts,
                        message: sh.message.clone(),
                    },
                ));
            }
            let mut found = lock(&self.found);
            found.retain(|_, rec| process_start_time(rec.pid) == Some(rec.start_time));
            for key in found.keys() {
                out.push((
                    key.clone(),
                    Observed {
                        state: ServiceState::Running,
                        restarts: 0,
                        message: Some("left running by an earlier agent; not adopted yet".into()),
                    },
                ));
            }
            Ok(out)
        })
    }
}

async fn stop_supervised(s: Supervised) {
    s.cancel.cancel();
    if let Err(e) = s.task.await {
        tracing::warn!(error = %e, "a service's supervisor ended abnormally");
    }
}

/// The supervisor of one service: waits for it to exit, restarts it after a
/// back-off; on `cancel`, stops it (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]) and removes its run record.
async fn supervise(
    key: ServiceKey,
    mut running: Running,
    shared: Arc<Mutex<Shared>>,
    cancel: CancellationToken,
    binary: PathBuf,
    log: PathBuf,
    run: PathBuf,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let how = tokio::select! {
            how = running.exited() => how,
            () = cancel.cancelled() => {
                terminate(&mut running).await;
                let _ = remove_if_exists(&run);
                lock(&shared).state = ServiceState::Stopped;
                return;
            }
        };
        if started.elapsed() >= STABLE_RUN {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(volume = %key.volume, service = %key.service, "service {how}; restarting in {backoff:?}");
        {
            let mut sh = lock(&shared);
            sh.state = ServiceState::Failed;
            sh.message = Some(format!(
                "{how}; restarting in {backoff:?} (log: {})",
                log.display()
            ));
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = cancel.cancelled() => {
                    let _ = remove_if_exists(&run);
                    lock(&shared).state = ServiceState::Stopped;
                    return;
                }
            }
            backoff = next_backoff(backoff);
            let spec = lock(&shared).spec.clone();
            match spawn(&binary, &log, &run, &spec) {
                Ok(r) => {
                    running = r;
                    let mut sh = lock(&shared);
                    sh.restarts += 1;
                    sh.state = ServiceState::Running;
                    break;
                }
                Err(e) => {
                    tracing::warn!(volume = %key.volume, service = %key.service, error = %format!("{e:#}"),
                        "cannot restart service; retrying in {backoff:?}");
                    lock(&shared).message = Some(format!("{e:#}"));
                }
            }
        }
    }
}

/// The wait after `current`: doubled, at most [`MAX_BACKOFF`].
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

/// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL.
async fn terminate(running: &mut Running) {
    let Some(pid) = running.pid() else { return };
    if !running.alive() {
        return;
    }
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        match running {
            Running::Child(c) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, c.wait()).await.is_ok() {
                    return;
                }
            }
            Running::Adopted { .. } => {
                if !running.alive() {
                    return;
                }
                if Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        tracing::warn!(
            pid,
            "service did not exit within {STOP_GRACE:?} of SIGTERM: killing it"
        );
        signal(pid, libc::SIGKILL);
        if let Running::Child(c) = running {
            let _ = c.wait().await;
        } else {
            while running.alive() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        return;
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: a plain syscall; the pid was checked to be the process we
    // started (its start time) just before.
    unsafe { libc::kill(pid, sig) };
}

/// Starts the service and records it under `run`.
fn spawn(binary: &Path, log: &Path, run: &Path, spec: &ServiceSpec) -> anyhow::Result<Running> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the service log {}", log.display()))?;
    let err = out.try_clone().context("duplicating a log file descriptor")?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(command_args(spec))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        // Secrets go by file only: never pass on the agent's own.
        .env_remove("BASALT_VOLUME_SECRET")
        .env_remove("BASALT_API_TOKEN")
        .env_remove("BASALT_CLONE_SOURCE_SECRET")
        // The service outlives the agent (adoption): no kill on drop.
        .kill_on_drop(false);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("{} exited at once", binary.display()))?;
    let start_time = process_start_time(pid).unwrap_or(0);
    let record = RunRecord {
        pid,
        start_time,
        identity: to_strings(&identity_args(spec)),
    };
    write_run_record(run, &record)?;
    Ok(Running::Child(child))
}

fn to_strings(args: &[OsString]) -> Vec<String> {
    args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
}

/// `DATA_DIR/run/VOLUME/SERVICE.json`.
fn run_path(data_dir: &Path, key: &ServiceKey) -> PathBuf {
    data_dir
        .join("run")
        .join(key.volume.as_str())
        .join(format!("{}.json", key.service))
}

fn write_run_record(path: &Path, record: &RunRecord) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(record).context("encoding a run record")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

fn remove_if_exists(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Every run record under `run_dir` (`VOLUME/SERVICE.json`). A record that
/// cannot be read is skipped with a warning: it only costs an adoption.
fn read_run_records(run_dir: &Path) -> anyhow::Result<BTreeMap<ServiceKey, RunRecord>> {
    let mut out = BTreeMap::new();
    let volumes = match std::fs::read_dir(run_dir) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", run_dir.display())),
    };
    for vol in volumes.flatten() {
        let Some(volume) = vol.file_name().to_str().and_then(|n| VolumeName::new(n).ok()) else {
            continue;
        };
        let Ok(files) = std::fs::read_dir(vol.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            let Some(service) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(parse_service_id)
            else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<RunRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(rec) => {
                    out.insert(
                        ServiceKey {
                            volume: volume.clone(),
                            service,
                        },
                        rec,
                    );
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable run record")
                }
            }
        }
    }
    Ok(out)
}

/// `replica-N` or `controller` (the [`ServiceId`]'s `Display`).
pub fn parse_service_id(s: &str) -> Option<ServiceId> {
    if s == "controller" {
        return Some(ServiceId::Controller);
    }
    s.strip_prefix("replica-")?.parse().ok().map(ServiceId::Replica)
}

/// A process's start time (field 22 of `/proc/PID/stat`, in clock ticks
/// since boot); `None` if there is no such process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses: count from the last `)`.
/// A zombie (state `Z`) has exited: `None`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; the start time is field 22, 19 further on.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The command line of a service (after the binary).
pub fn command_args(spec: &ServiceSpec) -> Vec<OsString> {
    let mut a = Args::default();
    match spec {
        ServiceSpec::Replica(r) => replica_args(&mut a, r),
        ServiceSpec::Controller(c) => controller_args(&mut a, c),
    }
    a.0
}

/// The command line with the values that change online (size, QoS, a
/// controller's replicas) left out: two specs with the same identity are the
/// same running service. A controller's replicas change through its API
/// (`replica add` / `rm`, recorded on the replicas, which a restarted
/// controller follows), never by restarting it.
pub fn identity_args(spec: &ServiceSpec) -> Vec<OsString> {
    let mut spec = spec.clone();
    match &mut spec {
        ServiceSpec::Replica(r) => r.size_bytes = 0,
        ServiceSpec::Controller(c) => {
            c.size_bytes = 0;
            c.qos = QosSpec::default();
            c.replicas.clear();
        }
    }
    command_args(&spec)
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, name: &str, value: impl Into<OsString>) {
        self.0.push(name.into());
        self.0.push(value.into());
    }
    fn opt(&mut self, name: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.flag(name, v.to_string());
        }
    }
}

fn replica_args(a: &mut Args, r: &ReplicaSpec) {
    a.0.push("replica".into());
    match &r.storage {
        ReplicaStorage::Directory(dir) => a.flag("--dir", dir),
        ReplicaStorage::BlockDevice(dev) => a.flag("--device", dev),
    }
    a.flag("--size", r.size_bytes.to_string());
    a.flag("--listen", r.listen.to_string());
    a.flag("--volume-id", r.volume_id.to_string());
    a.flag("--secret-file", &r.secret_file);
    if let Some(clone) = &r.clone {
        for src in &clone.replicas {
            a.flag("--clone-from", src.to_string());
        }
        a.flag("--clone-snapshot", &clone.snapshot);
        a.flag("--clone-source-volume", clone.source_volume_id.to_string());
        a.flag("--clone-source-secret-file", &clone.source_secret_file);
    }
}

fn controller_args(a: &mut Args, c: &ControllerSpec) {
    a.0.push("controller".into());
    a.flag("--name", c.name.as_str());
    a.flag("--size", c.size_bytes.to_string());
    for r in &c.replicas {
        a.flag("--replica", r.to_string());
    }
    a.flag("--iscsi", c.iscsi.to_string());
    a.flag("--api", c.api.to_string());
    a.flag("--volume-id", c.volume_id.to_string());
    a.opt("--min-healthy", c.min_healthy.map(u64::from));
    a.flag("--secret-file", &c.secret_file);
    a.flag("--api-token-file", &c.api_token_file);
    let q = &c.qos;
    a.opt("--qos-read-iops", q.read_iops);
    a.opt("--qos-write-iops", q.write_iops);
    a.opt("--qos-iops", q.total_iops);
    a.opt("--qos-read-bps", q.read_bytes_per_sec);
    a.opt("--qos-write-bps", q.write_bytes_per_sec);
    a.opt("--qos-bps", q.total_bytes_per_sec);
    if c.closed {
        a.0.push("--allow-none".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::CloneSource;
    use proptest::prelude::*;

    fn controller() -> ServiceSpec {
        ServiceSpec::Controller(ControllerSpec {
            name: VolumeName::new("vol-a").unwrap(),
            volume_id: uuid::Uuid::nil(),
            size_bytes: 1 << 30,
            replicas: vec![
                "127.0.0.1:7100".parse().unwrap(),
                "127.0.0.1:7101".parse().unwrap(),
            ],
            iscsi: "127.0.0.1:7102".parse().unwrap(),
            api: "127.0.0.1:7103".parse().unwrap(),
            min_healthy: Some(1),
            qos: QosSpec::default(),
            secret_file: "/d/secrets/vol-a/peer-secret".into(),
            api_token_file: "/d/secrets/vol-a/api-token".into(),
            closed: false,
        })
    }

    fn replica() -> ServiceSpec {
        ServiceSpec::Replica(ReplicaSpec {
            volume_id: uuid::Uuid::nil(),
            size_bytes: 1 << 30,
            storage: ReplicaStorage::Directory("/p/x/replica-1".into()),
            listen: "127.0.0.1:7100".parse().unwrap(),
            secret_file: "/d/secrets/vol-a/peer-secret".into(),
            clone: None,
        })
    }

    fn strings(spec: &ServiceSpec) -> Vec<String> {
        to_strings(&command_args(spec))
    }

    #[test]
    fn a_replica_runs_with_its_directory_address_and_secret_file() {
        let args = strings(&replica()).join(" ");
        assert_eq!(
            args,
            "replica --dir /p/x/replica-1 --size 1073741824 --listen 127.0.0.1:7100 \
             --volume-id 00000000-0000-0000-0000-000000000000 --secret-file /d/secrets/vol-a/peer-secret"
        );
    }

    #[test]
    fn a_clone_replica_names_every_source_replica_and_the_source_secret_file() {
        let ServiceSpec::Replica(mut r) = replica() else {
            unreachable!()
        };
        r.clone = Some(CloneSource {
            replicas: vec![
                "127.0.0.1:7000".parse().unwrap(),
                "127.0.0.1:7001".parse().unwrap(),
            ],
            snapshot: "s1".into(),
            source_volume_id: uuid::Uuid::nil(),
            source_secret_file: "/d/secrets/src/peer-secret".into(),
        });
        let args = strings(&ServiceSpec::Replica(r)).join(" ");
        assert!(args.ends_with(
            "--clone-from 127.0.0.1:7000 --clone-from 127.0.0.1:7001 --clone-snapshot s1 \
             --clone-source-volume 00000000-0000-0000-0000-000000000000 \
             --clone-source-secret-file /d/secrets/src/peer-secret"
        ));
    }

    #[test]
    fn a_controller_runs_with_every_replica_and_its_limits_and_no_secret_on_the_command_line() {
        let ServiceSpec::Controller(mut c) = controller() else {
            unreachable!()
        };
        c.qos.write_iops = Some(500);
        c.qos.total_bytes_per_sec = Some(1 << 20);
        let args = strings(&ServiceSpec::Controller(c)).join(" ");
        assert!(args.starts_with("controller --name vol-a --size 1073741824 --replica 127.0.0.1:7100 --replica 127.0.0.1:7101 --iscsi 127.0.0.1:7102 --api 127.0.0.1:7103"));
        assert!(args.contains("--min-healthy 1"));
        assert!(args.contains(
            "--secret-file /d/secrets/vol-a/peer-secret --api-token-file /d/secrets/vol-a/api-token"
        ));
        assert!(args.ends_with("--qos-write-iops 500 --qos-bps 1048576"));
    }

    #[test]
    fn size_qos_and_replicas_do_not_change_a_services_identity_but_anything_else_does() {
        let ServiceSpec::Controller(c) = controller() else {
            unreachable!()
        };
        let mut grown = c.clone();
        grown.size_bytes *= 2;
        grown.qos.read_iops = Some(100);
        grown.replicas[1] = "127.0.0.1:7200".parse().unwrap();
        assert_eq!(
            identity_args(&ServiceSpec::Controller(c.clone())),
            identity_args(&ServiceSpec::Controller(grown))
        );
        let mut moved = c.clone();
        moved.api = "127.0.0.1:7201".parse().unwrap();
        assert_ne!(
            identity_args(&ServiceSpec::Controller(c)),
            identity_args(&ServiceSpec::Controller(moved))
        );
    }

    #[test]
    fn the_start_time_is_field_22_even_when_the_command_name_holds_parentheses() {
        let stat =
            "1234 (basalt (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 100";
        assert_eq!(parse_start_time(stat), Some(987654));
        let zombie = "1234 (basalt) Z 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_start_time(zombie), None);
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (x) S 1 2"), None);
    }

    #[test]
    fn our_own_process_has_a_start_time_and_a_pid_that_is_gone_has_none() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn service_ids_parse_back_from_their_names() {
        for id in [
            ServiceId::Controller,
            ServiceId::Replica(0),
            ServiceId::Replica(17),
        ] {
            assert_eq!(parse_service_id(&id.to_string()), Some(id));
        }
        assert_eq!(parse_service_id("replica-x"), None);
        assert_eq!(parse_service_id("ctl"), None);
    }

    proptest! {
        #[test]
        fn the_backoff_grows_and_never_passes_its_cap(steps in 0usize..40) {
            let mut b = FIRST_BACKOFF;
            for _ in 0..steps {
                let n = next_backoff(b);
                prop_assert!(n >= b);
                prop_assert!(n <= MAX_BACKOFF);
                b = n;
            }
        }
    }

    /// A real child process (`sleep`) under the supervisor: it is restarted
    /// when killed, counted, and stopped for good by `stop`.
    #[tokio::test]
    async fn a_killed_service_is_restarted_and_stop_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        // A shell script stands in for the basalt binary (this unit test is
        // about supervision, not about what runs): it runs until killed.
        let bin = dir.path().join("fake-basalt");
        std::fs::write(&bin, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let rt = ProcessRuntime::new(bin, dir.path().to_path_buf()).unwrap();
        let key = ServiceKey {
            volume: VolumeName::new("vol-a").unwrap(),
            service: ServiceId::Replica(1),
        };
        rt.ensure(&key, &replica()).await.unwrap();
        let rec: RunRecord =
            serde_json::from_slice(&std::fs::read(run_path(dir.path(), &key)).unwrap()).unwrap();
        assert_eq!(process_start_time(rec.pid), Some(rec.start_time));
        // The same spec again changes nothing.
        rt.ensure(&key, &replica()).await.unwrap();
        signal(rec.pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let obs = rt.observe().await.unwrap();
            let (_, o) = obs.iter().find(|(k, _)| *k == key).unwrap();
            if o.restarts == 1 && o.state == ServiceState::Running {
                break;
            }
            assert!(Instant::now() < deadline, "not restarted: {o:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rec2: RunRecord =
            serde_json::from_slice(&std::fs::read(run_path(dir.path(), &key)).unwrap()).unwrap();
        assert_ne!(rec2.pid, rec.pid);
        rt.stop(&key).await.unwrap();
        assert_eq!(process_start_time(rec2.pid), None);
        assert!(!run_path(dir.path(), &key).exists());
        assert!(rt.observe().await.unwrap().is_empty());
    }

    /// A second runtime over the same data dir (an agent restarted) adopts a
    /// process the first left running, when the spec is the same, and
    /// replaces it when it differs.
    #[tokio::test]
    async fn a_new_runtime_adopts_a_running_service_with_the_same_spec_and_replaces_one_with_another() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-basalt");
        std::fs::write(&bin, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let key = ServiceKey {
            volume: VolumeName::new("vol-a").unwrap(),
            service: ServiceId::Controller,
        };
        let first = ProcessRuntime::new(bin.clone(), dir.path().to_path_buf()).unwrap();
        first.ensure(&key, &controller()).await.unwrap();
        let rec: RunRecord =
            serde_json::from_slice(&std::fs::read(run_path(dir.path(), &key)).unwrap()).unwrap();
        // The agent goes away without stopping its services.
        drop(first);

        let second = ProcessRuntime::new(bin.clone(), dir.path().to_path_buf()).unwrap();
        let seen = second.observe().await.unwrap();
        assert_eq!(seen.len(), 1, "the left-over service is reported: {seen:?}");
        // A grown size is the same service: adopted, not restarted.
        let ServiceSpec::Controller(mut grown) = controller() else {
            unreachable!()
        };
        grown.size_bytes *= 2;
        second
            .ensure(&key, &ServiceSpec::Controller(grown.clone()))
            .await
            .unwrap();
        assert_eq!(process_start_time(rec.pid), Some(rec.start_time));
        drop(second);

        let third = ProcessRuntime::new(bin, dir.path().to_path_buf()).unwrap();
        grown.api = "127.0.0.1:7201".parse().unwrap();
        third.ensure(&key, &ServiceSpec::Controller(grown)).await.unwrap();
        assert_eq!(process_start_time(rec.pid), None, "the stale service was stopped");
        let rec3: RunRecord =
            serde_json::from_slice(&std::fs::read(run_path(dir.path(), &key)).unwrap()).unwrap();
        assert_ne!(rec3.pid, rec.pid);
        third.stop(&key).await.unwrap();
        assert_eq!(process_start_time(rec3.pid), None);
    }
}
