//! Attaching a volume on this host: its iSCSI LUN becomes a local block device, which gets a filesystem
//! (made only when the device is blank) and is mounted where a container or a pod wants it.
//!
//! ```text
//!   Host::attach(volume) ──► Attacher (chosen per host, logged) ──► /dev/sdX or /dev/loopN
//!        │                     ├─ KernelIscsi: iscsiadm login (production hosts)
//!        │                     └─ UserSpace:   qemu-storage-daemon (iSCSI → FUSE file) + losetup
//!        ▼
//!   Host::mount(volume, target, fs, options, read_only) ──► mount.rs: blkid -p, mkfs if blank, mount
//!   Host::unmount / Host::detach: the reverse; Host::grow: the LUN's new size, then resize2fs/xfs_growfs
//! ```
//!
//! Every step is recorded on the host's disk before and after it is taken (state.rs, one file per
//! volume under `DATA_DIR/host/`): a restarted agent finds what it attached, reuses what still works
//! ([`Host::recover`]) and undoes what does not, so that an attach forgotten across a restart never
//! leaves a stale mount for the next container. The qemu-storage-daemon of the user-space path is
//! recorded by pid and start time and outlives the agent (like the runtime's services), so a mounted
//! filesystem keeps working while the agent restarts.
//!
//! The functions here block (they run `mount`, `mkfs`, `losetup`, wait for devices): async callers run
//! them with `tokio::task::spawn_blocking`. Calls for one volume are serialized by [`Host`]; calls for
//! different volumes run in parallel.

pub mod attach;
pub mod mount;
pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use basalt_engine::name::VolumeName;

pub use attach::{AttachMethod, Attacher, HostProbe, IscsiTarget};
pub use mount::{Filesystem, FsStats};
pub use state::{AttachRecord, MountRecord};

/// Why a host operation failed. Every message says what was being done and what to do.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{what}: `{command}` failed ({status}): {stderr}")]
    Command {
        what: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The request is refused (it would destroy data, or asks for something this host cannot do).
    #[error("{0}")]
    Refused(String),
    #[error("{what}: gave up after {waited:?}; {hint}")]
    Timeout {
        what: String,
        waited: std::time::Duration,
        hint: String,
    },
}

impl HostError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostError {
        let what = what.into();
        move |source| HostError::Io { what, source }
    }
}

pub type HostResult<T> = Result<T, HostError>;

/// What to attach: a volume's LUN, and who asks (each holder cleans up only its own attachments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    pub volume: VolumeName,
    pub target: IscsiTarget,
    /// The LUN's size: the user-space path waits until its file shows it.
    pub size_bytes: u64,
    /// `docker`, `csi`, ...: recorded, so that one endpoint's clean-up at start never undoes another's.
    pub holder: String,
}

/// The volumes attached on this host, their records on disk, and the attacher that makes devices.
pub struct Host {
    state: state::StateDir,
    attacher: Box<dyn Attacher>,
    /// One lock per volume: two calls for one volume never interleave their steps.
    locks: Mutex<BTreeMap<VolumeName, Arc<Mutex<()>>>>,
    /// The iSCSI login redirector this host's initiators log in through
    /// (`endpoints.iscsi_redirector`): see [`Host::login_portal`].
    redirector: Option<SocketAddr>,
    /// The initiator name its logins carry: see [`Host::initiator`].
    initiator: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Host {
    /// The host under `data_dir` (records in `DATA_DIR/host/`), with the attacher this host supports:
    /// the kernel initiator where it has one, the user-space path otherwise. The choice is logged.
    /// `initiator` is the iSCSI initiator name the user-space path logs in as; the kernel initiator
    /// logs in under the host's own name (`/etc/iscsi/initiatorname.iscsi`), read here. Either is
    /// [`Host::initiator`], which the node registers so that a volume published to it lets that name in.
    pub fn open(data_dir: &Path, initiator: Option<String>) -> HostResult<Host> {
        let probe = HostProbe::this_host();
        let method = attach::choose(&probe).map_err(HostError::Refused)?;
        let initiator = match method {
            AttachMethod::KernelIscsi => Some(attach::kernel_initiator_name().map_err(HostError::Refused)?),
            AttachMethod::UserSpace => initiator,
        };
        tracing::info!(
            method = method.as_str(),
            why = attach::why(&probe, method),
            initiator = initiator.as_deref().unwrap_or("libiscsi's default"),
            "volumes attach on this host through {}",
            method.as_str()
        );
        Host::with_method_as(data_dir, method, initiator)
    }

    /// The iSCSI initiator name this host's logins carry: the kernel initiator's own, or the name given
    /// to the user-space path (`None`: libiscsi's default, which no restricted target lets in).
    pub fn initiator(&self) -> Option<&str> {
        self.initiator.as_deref()
    }

    /// The host with a given attach method (tests; an operator's override).
    pub fn with_method(data_dir: &Path, method: AttachMethod) -> HostResult<Host> {
        Host::with_method_as(data_dir, method, None)
    }

    /// The same, logging in as `initiator` on the user-space path (see [`Host::open`]).
    pub fn with_method_as(
        data_dir: &Path,
        method: AttachMethod,
        initiator: Option<String>,
    ) -> HostResult<Host> {
        if let Some(bad) = initiator
            .as_ref()
            .filter(|i| i.is_empty() || i.contains([',', '=']) || i.chars().any(char::is_whitespace))
        {
            return Err(HostError::Refused(format!(
                "iSCSI initiator name {bad:?} is not valid: an IQN holds no comma, '=' or whitespace"
            )));
        }
        let dir =
            std::path::absolute(data_dir.join("host")).map_err(HostError::io("resolving DATA_DIR/host"))?;
        let state = state::StateDir::open(&dir)?;
        let attacher: Box<dyn Attacher> = match method {
            AttachMethod::KernelIscsi => Box::new(attach::KernelIscsi),
            AttachMethod::UserSpace => Box::new(attach::UserSpace::new(dir, initiator.clone())),
        };
        Ok(Host {
            state,
            attacher,
            locks: Mutex::new(BTreeMap::new()),
            redirector: None,
            initiator,
        })
    }

    /// Logs in through the redirector at `redirector` from now on (`None`: at each controller's own
    /// address). The agent's redirector must listen there before the first attach.
    pub fn redirecting_through(mut self, redirector: Option<SocketAddr>) -> Host {
        self.redirector = redirector;
        self
    }

    /// Where this host logs in to `target`, served now at `target.portal`: through the redirector
    /// when there is one. The initiator keeps that address and goes back to it whenever its session
    /// drops, so a controller that moved to another host is found again (the redirector sends the
    /// login on to wherever the controller runs then) without this host doing anything.
    pub fn login_portal(&self, target: IscsiTarget) -> IscsiTarget {
        match self.redirector {
            Some(portal) => IscsiTarget { portal, ..target },
            None => target,
        }
    }

    pub fn method(&self) -> AttachMethod {
        self.attacher.method()
    }

    fn volume_lock(&self, volume: &VolumeName) -> Arc<Mutex<()>> {
        lock(&self.locks).entry(volume.clone()).or_default().clone()
    }

    /// What an earlier agent left, checked now: attachments that still work are kept (and reused by
    /// the next [`Host::attach`]), with the mounts that are still there; an attachment that no longer
    /// works (its daemon died, its device is gone) is undone: its mounts lazily unmounted, its device
    /// detached, its record removed. Returns the records kept.
    pub fn recover(&self) -> HostResult<Vec<AttachRecord>> {
        let mut kept = Vec::new();
        for mut record in self.state.list()? {
            let guard = self.volume_lock(&record.volume);
            let _held = lock(&guard);
            if self.attacher.is_healthy(&record) {
                let before = record.mounts.len();
                record.mounts.retain(|m| mount::is_mounted(&m.target));
                if record.mounts.len() != before {
                    self.state.save(&record)?;
                }
                tracing::info!(volume = %record.volume, device = ?record.device, mounts = record.mounts.len(),
                    "found an attachment of an earlier agent still working: reusing it");
                kept.push(record);
            } else {
                tracing::warn!(volume = %record.volume, "an attachment of an earlier agent no longer works: undoing it");
                for m in &record.mounts {
                    if mount::is_mounted(&m.target) {
                        mount::unmount_lazy(&m.target)?;
                    }
                }
                self.attacher.detach(&record)?;
                self.state.remove(&record.volume)?;
            }
        }
        Ok(kept)
    }

    /// Every attachment recorded on this host.
    pub fn attachments(&self) -> HostResult<Vec<AttachRecord>> {
        self.state.list()
    }

    /// The record of `volume`, if it is attached here.
    pub fn attachment(&self, volume: &VolumeName) -> HostResult<Option<AttachRecord>> {
        self.state.load(volume)
    }

    /// Attach the volume's LUN as a block device here and answer its path. Idempotent: an attachment
    /// that works is reused; one that does not (the daemon died) is undone and made again.
    pub fn attach(&self, req: &AttachRequest) -> HostResult<PathBuf> {
        let guard = self.volume_lock(&req.volume);
        let _held = lock(&guard);
        if let Some(record) = self.state.load(&req.volume)? {
            if record.target != req.target {
                return Err(HostError::Refused(format!(
                    "volume {} is attached on this host from {}, not {}; detach it first",
                    req.volume,
                    record.target.url(),
                    req.target.url()
                )));
            }
            if let (Some(device), true) = (&record.device, self.attacher.is_healthy(&record)) {
                return Ok(device.clone());
            }
            tracing::warn!(volume = %req.volume, "its attachment no longer works: attaching it again");
            if !record.mounts.is_empty() {
                return Err(HostError::Refused(format!(
                    "volume {} is still mounted at {} over an attachment that no longer works; unmount it first",
                    req.volume,
                    record.mounts[0].target.display()
                )));
            }
            self.attacher.detach(&record)?;
            self.state.remove(&req.volume)?;
        }
        let record = self.attacher.attach(req, &self.state)?;
        record
            .device
            .clone()
            .ok_or_else(|| HostError::Refused(format!("volume {}: the attacher gave no device", req.volume)))
    }

    /// Mount the attached volume at `target` (created if absent): a filesystem `fs` is made first if
    /// the device is blank (never on one that holds data: a device with another filesystem, a
    /// partition table or any non-zero byte at its start is refused). Idempotent for the same target.
    pub fn mount(
        &self,
        volume: &VolumeName,
        target: &Path,
        fs: Filesystem,
        options: &[String],
        read_only: bool,
    ) -> HostResult<()> {
        let guard = self.volume_lock(volume);
        let _held = lock(&guard);
        let mut record = self.attached(volume)?;
        let device = record.device.clone().unwrap_or_default();
        // The first read-write mount of the device grows its filesystem to it if the volume grew while
        // it was not mounted (or while an agent could not grow it online).
        let first = !read_only && !record.mounts.iter().any(|m| mount::is_mounted(&m.target));
        if !read_only {
            mount::make_filesystem_if_blank(&device, fs)?;
        }
        if first {
            mount::grow_unmounted(&device, fs)?;
        }
        let was_mounted = mount::is_mounted(target);
        mount::mount(&device, target, fs, options, read_only)?;
        if first && !was_mounted {
            mount::grow_after_mount(target, fs)?;
        }
        if !record.mounts.iter().any(|m| m.target == target) {
            record.mounts.push(MountRecord {
                target: target.to_path_buf(),
                fs,
                read_only,
            });
            self.state.save(&record)?;
        }
        Ok(())
    }

    /// Unmount `target` (already unmounted: no error) and forget it.
    pub fn unmount(&self, volume: &VolumeName, target: &Path) -> HostResult<()> {
        let guard = self.volume_lock(volume);
        let _held = lock(&guard);
        mount::unmount(target)?;
        if let Some(mut record) = self.state.load(volume)? {
            let before = record.mounts.len();
            record.mounts.retain(|m| m.target != target);
            if record.mounts.len() != before {
                self.state.save(&record)?;
            }
        }
        Ok(())
    }

    /// Flush and detach the volume (not attached: no error). Refused while it is mounted.
    pub fn detach(&self, volume: &VolumeName) -> HostResult<()> {
        let guard = self.volume_lock(volume);
        let _held = lock(&guard);
        let Some(record) = self.state.load(volume)? else {
            return Ok(());
        };
        if let Some(m) = record.mounts.iter().find(|m| mount::is_mounted(&m.target)) {
            return Err(HostError::Refused(format!(
                "volume {volume} is still mounted at {}; unmount it before detaching",
                m.target.display()
            )));
        }
        self.attacher.detach(&record)?;
        self.state.remove(volume)
    }

    /// Online expansion: make the device show the LUN's new size (recorded), then grow its read-write
    /// mounted filesystem. A filesystem that cannot grow while mounted (ext4 without CAP_SYS_RESOURCE)
    /// is an error naming why; the device has grown regardless, and the filesystem grows at its next
    /// first mount ([`Host::mount`]).
    pub fn grow(&self, volume: &VolumeName, size_bytes: u64) -> HostResult<()> {
        let guard = self.volume_lock(volume);
        let _held = lock(&guard);
        let mut record = self.attached(volume)?;
        self.attacher.refresh_size(&record, size_bytes)?;
        record.size_bytes = size_bytes;
        self.state.save(&record)?;
        let device = record.device.clone().unwrap_or_default();
        if let Some(m) = record.mounts.iter().find(|m| !m.read_only) {
            mount::grow_filesystem(&device, &m.target, m.fs)?;
        }
        Ok(())
    }

    fn attached(&self, volume: &VolumeName) -> HostResult<AttachRecord> {
        match self.state.load(volume)? {
            Some(r) if r.device.is_some() => Ok(r),
            _ => Err(HostError::Refused(format!(
                "volume {volume} is not attached on this host; attach it first"
            ))),
        }
    }
}
