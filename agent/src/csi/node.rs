//! The Node service: a published volume made usable on this host, through the host module.
//!
//! ```text
//!   NodeStage    ──► record (staged.rs) ──► Host::attach (holder "csi") ──► mkfs if blank, mount at the
//!                                                                          staging path (block: no mount)
//!   NodePublish  ──► record ──► bind mount of the staging mount at the target (block: of the device, on a
//!                               file at the target), read-only when asked
//!   NodeUnpublish / NodeUnstage: the reverse, each piece that still exists; the record forgotten last
//!   NodeExpand   ──► Host::grow: the device shows the volume's new size, then the filesystem grows online
//! ```
//!
//! What was staged and published lives on this host's disk ([`super::staged`]), written before each step
//! is taken, so that a node plugin killed and restarted between Stage and Unstage still undoes exactly
//! what Stage did. Calls for one volume are serialized (the CO should not overlap them, and a retry
//! after a timeout must not race the call it retries). Host operations block: they run on tokio's
//! blocking pool, each holding the volume's lock until it ends, even when the CO has given up on its
//! call ([`crate::locks`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use basalt_engine::name::VolumeName;
use tonic::{Request, Response, Status};

use super::controller::{capability_problem, condition};
use super::ids::parse_volume_id;
use super::params::DEFAULT_FS;
use super::pb::{self, node_server::Node};
use super::staged::{self, Access, Publication, Restage, Staged, StagedDir, VolumePath, HOLDER};
use super::status::{from_api, from_store, required};
use super::{logged, topology};
use crate::api::{volumes, ApiContext};
use crate::host::{attach, mount, AttachRequest, Filesystem, Host, HostError, IscsiTarget};
use crate::locks::Held;
use crate::model::{keys, NodeRecord, VolumePhase, VolumeRecord};
use crate::store;

/// Volumes one node attaches at most (NodeGetInfo), so the CO schedules no more pods with volumes
/// here: each attachment is an iSCSI session, and on the user-space path a qemu-storage-daemon and a
/// loop device (about 30 MiB of memory each), which a node also running replicas can afford a few
/// hundred of, not thousands.
pub const MAX_VOLUMES_PER_NODE: i64 = 256;

pub struct NodeService {
    api: ApiContext,
    host: Arc<Host>,
    staged: StagedDir,
    locks: crate::locks::VolumeLocks,
}

fn volume_not_found(id: &str) -> Status {
    Status::not_found(format!("no volume with id {id:?}"))
}

/// A host failure as a status: a refusal (data would be lost, a device is busy) is FAILED_PRECONDITION,
/// anything else INTERNAL; the message says which step failed and why.
fn from_host(e: HostError) -> Status {
    match e {
        HostError::Refused(m) => Status::failed_precondition(m),
        other => Status::internal(other.to_string()),
    }
}

/// A required absolute path.
fn path_field(field: &str, value: &str) -> Result<PathBuf, Status> {
    if value.is_empty() {
        return Err(required(field));
    }
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} {value:?} is not an absolute path"
        )));
    }
    Ok(path)
}

/// How a capability asks to use the volume (a pure function): block, or a filesystem (the capability's
/// `fs_type`, else the volume's `fsType` from CreateVolume, else ext4) with its mount flags. A
/// malformed or unsupported capability is INVALID_ARGUMENT.
pub fn access_of(
    cap: Option<&pb::VolumeCapability>,
    volume_context: &std::collections::HashMap<String, String>,
) -> Result<(Access, bool), Status> {
    use pb::volume_capability::access_mode::Mode;
    use pb::volume_capability::AccessType;
    let cap = cap.ok_or_else(|| required("volume_capability"))?;
    if let Some(why) = capability_problem("volume_capability", cap)? {
        return Err(Status::invalid_argument(why));
    }
    let reader_only = cap.access_mode.as_ref().map(|m| m.mode) == Some(Mode::SingleNodeReaderOnly as i32);
    let access = match &cap.access_type {
        Some(AccessType::Mount(m)) => {
            let name = Some(m.fs_type.as_str())
                .filter(|f| !f.is_empty())
                .or(volume_context.get("fsType").map(String::as_str))
                .unwrap_or(DEFAULT_FS);
            let fs: Filesystem = name
                .parse()
                .map_err(|e: String| Status::invalid_argument(format!("volume_capability: {e}")))?;
            mount::check_options(&m.mount_flags)
                .map_err(|e| Status::invalid_argument(format!("volume_capability.mount.mount_flags: {e}")))?;
            Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            }
        }
        // capability_problem refused a capability without an access type.
        _ => Access::Block,
    };
    Ok((access, reader_only))
}

fn rpc(t: pb::node_service_capability::rpc::Type) -> pb::NodeServiceCapability {
    pb::NodeServiceCapability {
        r#type: Some(pb::node_service_capability::Type::Rpc(
            pb::node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// The node's capabilities: staged volumes, stats with their condition, online expansion.
pub fn capabilities() -> Vec<pb::NodeServiceCapability> {
    use pb::node_service_capability::rpc::Type;
    vec![
        rpc(Type::StageUnstageVolume),
        rpc(Type::GetVolumeStats),
        rpc(Type::ExpandVolume),
        rpc(Type::VolumeCondition),
    ]
}

/// Usage as CSI reports it (a pure function): bytes and inodes of a filesystem.
pub fn usage(stats: &mount::FsStats) -> Vec<pb::VolumeUsage> {
    let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
    vec![
        pb::VolumeUsage {
            available: clamp(stats.available_bytes),
            total: clamp(stats.total_bytes),
            used: clamp(stats.total_bytes.saturating_sub(stats.free_bytes)),
            unit: pb::volume_usage::Unit::Bytes as i32,
        },
        pb::VolumeUsage {
            available: clamp(stats.free_inodes),
            total: clamp(stats.total_inodes),
            used: clamp(stats.total_inodes.saturating_sub(stats.free_inodes)),
            unit: pb::volume_usage::Unit::Inodes as i32,
        },
    ]
}

/// Runs a blocking host step that reads only (no lock needed) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(host_step_failed)?
}

/// Runs a blocking host step on the blocking pool, the volume's lock held until it ends even if the
/// CO gives up on the call first (see [`crate::locks`]).
async fn step<T: Send + 'static>(
    held: &Held,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    held.blocking(f).await.map_err(host_step_failed)?
}

fn host_step_failed(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a host operation panicked or was cancelled: {e}"))
}

/// Creates the publication's target: a directory for a mount, a file for a block device.
fn make_target(target: &Path, access: &Access) -> Result<(), Status> {
    let made = match access {
        Access::Mount { .. } => std::fs::create_dir_all(target),
        Access::Block => {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Status::internal(format!("creating {}: {e}", parent.display())))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(target)
                .map(drop)
        }
    };
    made.map_err(|e| Status::internal(format!("creating the target {}: {e}", target.display())))
}

/// Unmounts a publication's target and removes what publishing made there (the spec: the SP deletes
/// the file or directory it created). Gone already: nothing to do.
fn undo_publication(publication: &Publication) -> Result<(), Status> {
    let target = &publication.target;
    mount::unmount(target).map_err(from_host)?;
    let removed = match publication.access {
        Access::Mount { .. } => std::fs::remove_dir(target),
        Access::Block => std::fs::remove_file(target),
    };
    match removed {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Status::internal(format!(
                "unmounted {} but cannot remove it: {e}",
                target.display()
            )))
        }
    }
    match &publication.read_only_device {
        Some(view) if attach::is_read_only_view(view) => attach::detach_loop(view).map_err(from_host),
        _ => Ok(()),
    }
}

impl NodeService {
    pub fn new(api: ApiContext, host: Arc<Host>, data_dir: &Path) -> anyhow::Result<NodeService> {
        Ok(NodeService {
            api,
            host,
            staged: StagedDir::open(data_dir)?,
            locks: Default::default(),
        })
    }

    async fn lock(&self, volume: &VolumeName) -> Held {
        self.locks.lock(volume).await
    }

    /// The volume `id` names, from the cluster store, or NOT_FOUND.
    async fn load(&self, id: &str) -> Result<VolumeRecord, Status> {
        let name = parse_volume_id(id).ok_or_else(|| volume_not_found(id))?;
        match volumes::load_volume(&*self.api.store, &name).await {
            Ok(v) if v.value.phase != VolumePhase::Deleting => Ok(v.value),
            Ok(_) => Err(volume_not_found(id)),
            Err(e) if e.status == hyper::StatusCode::NOT_FOUND => Err(volume_not_found(id)),
            Err(e) => Err(from_api(e)),
        }
    }

    fn staged(&self, volume: &VolumeName) -> Result<Option<Staged>, Status> {
        self.staged.load(volume).map_err(Status::internal)
    }

    fn save(&self, staged: &Staged) -> Result<(), Status> {
        self.staged.save(staged).map_err(Status::internal)
    }

    /// The record of a volume staged here, or NOT_FOUND (the volume is unknown, or not staged here).
    async fn staged_or_not_found(&self, id: &str) -> Result<Staged, Status> {
        let name = parse_volume_id(id).ok_or_else(|| volume_not_found(id))?;
        match self.staged(&name)? {
            Some(s) => Ok(s),
            None => {
                self.load(id).await?;
                Err(Status::not_found(format!(
                    "volume {id} is not staged on this node ({})",
                    self.api.node
                )))
            }
        }
    }

    /// The LUN of a volume this node may attach: published here (ControllerPublish), and serving.
    async fn lun(&self, record: &VolumeRecord) -> Result<(IscsiTarget, u64), Status> {
        let name = &record.spec.name;
        if record.attached_to.as_ref() != Some(&self.api.node) {
            return Err(Status::failed_precondition(format!(
                "volume {name} is not published to this node ({}){}: ControllerPublishVolume it here first",
                self.api.node,
                record
                    .attached_to
                    .as_ref()
                    .map(|n| format!(" but to {n}"))
                    .unwrap_or_default()
            )));
        }
        let view = volumes::inspect(&self.api, name).await.map_err(from_api)?;
        match (&view.iscsi_url, view.phase) {
            (Some(url), VolumePhase::Ready | VolumePhase::Degraded) => {
                let target = IscsiTarget::parse_url(url).map_err(Status::internal)?;
                Ok((self.host.login_portal(target), view.size_bytes))
            }
            _ => Err(Status::unavailable(format!(
                "volume {name} does not serve yet (phase {:?}); retry",
                view.phase
            ))),
        }
    }

    async fn stage_inner(
        &self,
        req: pb::NodeStageVolumeRequest,
    ) -> Result<pb::NodeStageVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let staging_path = path_field("staging_target_path", &req.staging_target_path)?;
        let (access, read_only) = access_of(req.volume_capability.as_ref(), &req.volume_context)?;
        let record = self.load(&req.volume_id).await?;
        let volume = record.spec.name.clone();
        let held = self.lock(&volume).await;
        let before = self.staged(&volume)?;
        let staged = match &before {
            Some(s) => match staged::restage(s, &staging_path, &access, read_only) {
                None => s.clone(),
                Some(Restage::Incompatible(why)) => return Err(Status::already_exists(why)),
                Some(Restage::ElsewhereAlready(why)) => return Err(Status::failed_precondition(why)),
            },
            None => Staged {
                volume: volume.clone(),
                staging_path: staging_path.clone(),
                access: access.clone(),
                read_only,
                publications: Vec::new(),
            },
        };
        let (target, size_bytes) = self.lun(&record).await?;
        // Recorded before anything is done: a plugin killed from here on finds it at restart.
        self.save(&staged)?;
        let host = self.host.clone();
        let attach = AttachRequest {
            volume: volume.clone(),
            target,
            size_bytes,
            holder: HOLDER.into(),
        };
        let wanted = staged.clone();
        let done = step(&held, move || {
            host.attach(&attach).map_err(from_host)?;
            if let Access::Mount { fs, flags } = &wanted.access {
                host.mount(&wanted.volume, &wanted.staging_path, *fs, flags, wanted.read_only)
                    .map_err(from_host)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = done {
            // A first stage that failed leaves nothing behind (the CO may never call Unstage for it);
            // a repeated one keeps what the earlier success made.
            if before.is_none() {
                if let Err(undo) = self.unstage_steps(&held, &staged).await {
                    tracing::warn!(volume = %volume, error = %undo.message(), "undoing a failed NodeStage failed too");
                }
            }
            return Err(e);
        }
        Ok(pb::NodeStageVolumeResponse {})
    }

    /// Undo a stage: unmount the staging path, detach, forget the record.
    async fn unstage_steps(&self, held: &Held, staged: &Staged) -> Result<(), Status> {
        let host = self.host.clone();
        let undone = staged.clone();
        step(held, move || {
            if matches!(undone.access, Access::Mount { .. }) {
                host.unmount(&undone.volume, &undone.staging_path).map_err(from_host)?;
            }
            match host.attachment(&undone.volume).map_err(from_host)? {
                Some(a) if a.holder != HOLDER => {
                    tracing::warn!(volume = %undone.volume, holder = a.holder, "the volume's attachment is another endpoint's; leaving it");
                    Ok(())
                }
                Some(a) => {
                    // Read-only views of the device a killed plugin made but never recorded.
                    if let Some(device) = &a.device {
                        for view in attach::loops_over(device).map_err(from_host)? {
                            attach::detach_loop(&view).map_err(from_host)?;
                        }
                    }
                    host.detach(&undone.volume).map_err(from_host)
                }
                None => Ok(()),
            }
        })
        .await?;
        self.staged.remove(&staged.volume).map_err(Status::internal)
    }

    async fn unstage_inner(
        &self,
        req: pb::NodeUnstageVolumeRequest,
    ) -> Result<pb::NodeUnstageVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let staging_path = path_field("staging_target_path", &req.staging_target_path)?;
        let volume = parse_volume_id(&req.volume_id).ok_or_else(|| volume_not_found(&req.volume_id))?;
        let held = self.lock(&volume).await;
        let Some(mut staged) = self.staged(&volume)? else {
            // Not staged here: done already, if the volume exists at all.
            self.load(&req.volume_id).await?;
            return Ok(pb::NodeUnstageVolumeResponse {});
        };
        if staged.staging_path != staging_path {
            return Ok(pb::NodeUnstageVolumeResponse {});
        }
        // A publication still mounted stops the unstage (the CO unpublishes first: unmounting under a
        // pod would pull its data away); what unmounted ones left at their targets is removed.
        if let Some(p) = staged.publications.iter().find(|p| mount::is_mounted(&p.target)) {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is still published at {}; NodeUnpublishVolume it first",
                p.target.display()
            )));
        }
        let leftovers = std::mem::take(&mut staged.publications);
        step(&held, move || leftovers.iter().try_for_each(undo_publication)).await?;
        self.unstage_steps(&held, &staged).await?;
        Ok(pb::NodeUnstageVolumeResponse {})
    }

    async fn publish_inner(
        &self,
        req: pb::NodePublishVolumeRequest,
    ) -> Result<pb::NodePublishVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let target = path_field("target_path", &req.target_path)?;
        let (asked, reader_only) = access_of(req.volume_capability.as_ref(), &req.volume_context)?;
        if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME); \
                 NodeStageVolume first, then publish from the staging path",
            ));
        }
        let staging_path = path_field("staging_target_path", &req.staging_target_path)?;
        let volume = parse_volume_id(&req.volume_id).ok_or_else(|| volume_not_found(&req.volume_id))?;
        let held = self.lock(&volume).await;
        let mut staged = match self.staged(&volume)? {
            Some(s) if s.staging_path == staging_path => s,
            _ => {
                self.load(&req.volume_id).await?;
                return Err(Status::failed_precondition(format!(
                    "volume {volume} is not staged at {}; NodeStageVolume it there first",
                    staging_path.display()
                )));
            }
        };
        // The filesystem is the staged one (a publish capability may leave fs_type empty); block and
        // mount cannot be mixed.
        let access = match (&staged.access, asked) {
            (Access::Block, Access::Block) => Access::Block,
            (Access::Mount { fs, .. }, Access::Mount { fs: want, flags }) => {
                let named = req
                    .volume_capability
                    .as_ref()
                    .and_then(|c| c.access_type.as_ref())
                    .is_some_and(
                        |t| matches!(t, pb::volume_capability::AccessType::Mount(m) if !m.fs_type.is_empty()),
                    );
                if named && want != *fs {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume} is staged with a {fs} filesystem, not {want}"
                    )));
                }
                Access::Mount { fs: *fs, flags }
            }
            (had, want) => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume} is staged for {}, and cannot be published for {}",
                    had.describe(),
                    want.describe()
                )))
            }
        };
        // The staged volume must still be there: after its attachment broke (its export daemon died,
        // and the agent's recovery undid it), a bind of the staging directory would give the pod the
        // node's own disk, where its writes would silently never reach the volume.
        self.device(&held, &volume).await?;
        if matches!(access, Access::Mount { .. }) && !mount::is_mounted(&staging_path) {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is no longer mounted at its staging path {}; NodeUnstage and NodeStage it again",
                staging_path.display()
            )));
        }
        let mut publication = Publication {
            target: target.clone(),
            read_only: req.readonly || reader_only || staged.read_only,
            access,
            read_only_device: None,
        };
        let fresh = match staged.publications.iter().find(|p| p.target == target) {
            Some(existing) => {
                if let Some(why) = staged::republish(existing, &publication) {
                    return Err(Status::already_exists(why));
                }
                publication = existing.clone();
                false
            }
            None => {
                staged.publications.push(publication.clone());
                self.save(&staged)?;
                true
            }
        };
        let source = match publication.access {
            Access::Mount { .. } => staged.staging_path.clone(),
            Access::Block => {
                let device = self.device(&held, &volume).await?;
                match (&publication.read_only_device, publication.read_only) {
                    (Some(view), _) if attach::is_read_only_view(view) => view.clone(),
                    (_, false) => device,
                    // A read-only view of its own, recorded at once (a leftover of a crash in between is
                    // found over the device at unstage).
                    (_, true) => {
                        let view =
                            step(&held, move || attach::read_only_loop(&device).map_err(from_host)).await?;
                        publication.read_only_device = Some(view.clone());
                        if let Some(p) = staged.publications.iter_mut().find(|p| p.target == target) {
                            *p = publication.clone();
                        }
                        self.save(&staged)?;
                        view
                    }
                }
            }
        };
        let wanted = publication.clone();
        let done = step(&held, move || {
            make_target(&wanted.target, &wanted.access)?;
            mount::bind_mount(&source, &wanted.target, wanted.read_only).map_err(from_host)
        })
        .await;
        if let Err(e) = done {
            if fresh {
                let undo = publication.clone();
                if step(&held, move || undo_publication(&undo)).await.is_ok() {
                    staged.publications.retain(|p| p.target != target);
                    self.save(&staged)?;
                }
            }
            return Err(e);
        }
        Ok(pb::NodePublishVolumeResponse {})
    }

    /// The block device of a volume attached here.
    async fn device(&self, held: &Held, volume: &VolumeName) -> Result<PathBuf, Status> {
        let host = self.host.clone();
        let v = volume.clone();
        step(held, move || host.attachment(&v).map_err(from_host))
            .await?
            .and_then(|a| a.device)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "volume {volume} is not attached on this node any more; NodeUnstage and NodeStage it again"
                ))
            })
    }

    async fn unpublish_inner(
        &self,
        req: pb::NodeUnpublishVolumeRequest,
    ) -> Result<pb::NodeUnpublishVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let target = path_field("target_path", &req.target_path)?;
        let volume = parse_volume_id(&req.volume_id).ok_or_else(|| volume_not_found(&req.volume_id))?;
        let held = self.lock(&volume).await;
        let staged = self.staged(&volume)?;
        let Some((mut staged, publication)) = staged.and_then(|s| {
            let p = s.publications.iter().find(|p| p.target == target).cloned();
            p.map(|p| (s, p))
        }) else {
            // Not published there: done already, if the volume exists at all.
            self.load(&req.volume_id).await?;
            return Ok(pb::NodeUnpublishVolumeResponse {});
        };
        step(&held, move || undo_publication(&publication)).await?;
        staged.publications.retain(|p| p.target != target);
        self.save(&staged)?;
        Ok(pb::NodeUnpublishVolumeResponse {})
    }

    async fn stats_inner(
        &self,
        req: pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let path = path_field("volume_path", &req.volume_path)?;
        let staged = self.staged_or_not_found(&req.volume_id).await?;
        let access = match staged::find_path(&staged, &path) {
            Some(VolumePath::Staging) => &staged.access,
            Some(VolumePath::Published(p)) => &p.access,
            None => {
                return Err(Status::not_found(format!(
                    "volume {} is not staged or published at {}",
                    staged.volume,
                    path.display()
                )))
            }
        };
        let view = match volumes::inspect(&self.api, &staged.volume).await {
            Ok(v) => v,
            Err(e) if e.status == hyper::StatusCode::NOT_FOUND => {
                return Err(volume_not_found(&req.volume_id))
            }
            Err(e) => return Err(from_api(e)),
        };
        let mut health = condition(&view);
        let (usage, problem) = match access {
            Access::Block => {
                let host = self.host.clone();
                let v = staged.volume.clone();
                let record = blocking(move || host.attachment(&v).map_err(from_host)).await?;
                let total = record.as_ref().map_or(0, |r| r.size_bytes).min(i64::MAX as u64) as i64;
                let usage = vec![pb::VolumeUsage {
                    total,
                    unit: pb::volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }];
                let problem = record
                    .is_none()
                    .then(|| "the volume is not attached on this node any more".to_string());
                (usage, problem)
            }
            Access::Mount { .. } => {
                let at = path.clone();
                let measured = blocking(move || {
                    if !mount::is_mounted(&at) {
                        return Ok(Err(format!("nothing is mounted at {} any more", at.display())));
                    }
                    Ok(mount::stats(&at).map_err(|e| format!("cannot measure {}: {e}", at.display())))
                })
                .await?;
                match measured {
                    Ok(stats) => (usage(&stats), None),
                    Err(why) => (Vec::new(), Some(why)),
                }
            }
        };
        if let Some(why) = problem {
            health.abnormal = true;
            health.message = format!("{why}; {}", health.message);
        }
        Ok(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(health),
        })
    }

    async fn expand_inner(
        &self,
        req: pb::NodeExpandVolumeRequest,
    ) -> Result<pb::NodeExpandVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let path = path_field("volume_path", &req.volume_path)?;
        if let Some(cap) = &req.volume_capability {
            if let Some(why) = capability_problem("volume_capability", cap)? {
                return Err(Status::invalid_argument(why));
            }
        }
        let staged = self.staged_or_not_found(&req.volume_id).await?;
        if staged::find_path(&staged, &path).is_none() {
            return Err(Status::not_found(format!(
                "volume {} is not staged or published at {}",
                staged.volume,
                path.display()
            )));
        }
        let held = self.lock(&staged.volume).await;
        let record = self.load(&req.volume_id).await?;
        let size = record.spec.size_bytes;
        if let Some(range) = &req.capacity_range {
            let (required_bytes, limit) = (
                range.required_bytes.max(0) as u64,
                range.limit_bytes.max(0) as u64,
            );
            if required_bytes > size || (limit > 0 && limit < size) {
                return Err(Status::out_of_range(format!(
                    "volume {} is {size} bytes; the capacity range asks for {required_bytes} to {limit} bytes \
                     (ControllerExpandVolume it first)",
                    staged.volume
                )));
            }
        }
        let host = self.host.clone();
        let v = staged.volume.clone();
        step(&held, move || host.grow(&v, size).map_err(from_host)).await?;
        Ok(pb::NodeExpandVolumeResponse {
            capacity_bytes: size.min(i64::MAX as u64) as i64,
        })
    }

    async fn info_inner(&self) -> Result<pb::NodeGetInfoResponse, Status> {
        let record = store::get_json::<NodeRecord>(&*self.api.store, &keys::node(&self.api.node))
            .await
            .map_err(from_store)?
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "node {} is not registered yet; retry once the agent is up",
                    self.api.node
                ))
            })?;
        Ok(pb::NodeGetInfoResponse {
            node_id: self.api.node.to_string(),
            max_volumes_per_node: MAX_VOLUMES_PER_NODE,
            accessible_topology: (!record.value.labels.is_empty())
                .then(|| topology::from_labels(&record.value.labels)),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        logged("NodeStageVolume", request, async |r| self.stage_inner(r).await).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        logged("NodeUnstageVolume", request, async |r| {
            self.unstage_inner(r).await
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        logged("NodePublishVolume", request, async |r| {
            self.publish_inner(r).await
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        logged("NodeUnpublishVolume", request, async |r| {
            self.unpublish_inner(r).await
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        logged("NodeGetVolumeStats", request, async |r| self.stats_inner(r).await).await
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        logged("NodeExpandVolume", request, async |r| self.expand_inner(r).await).await
    }

    async fn node_get_capabilities(
        &self,
        request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        logged("NodeGetCapabilities", request, async |_| {
            Ok(pb::NodeGetCapabilitiesResponse {
                capabilities: capabilities(),
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        logged("NodeGetInfo", request, async |_| self.info_inner().await).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
    use std::collections::HashMap;

    fn cap(access: AccessType, mode: Mode) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn mount_cap(fs: &str, flags: &[&str]) -> pb::VolumeCapability {
        cap(
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                ..Default::default()
            }),
            Mode::SingleNodeWriter,
        )
    }

    #[test]
    fn the_filesystem_comes_from_the_capability_then_the_volume_context_then_ext4() {
        let none = HashMap::new();
        let xfs_context: HashMap<String, String> = [("fsType".to_string(), "xfs".to_string())].into();
        let fs = |c: &pb::VolumeCapability, ctx: &HashMap<String, String>| match access_of(Some(c), ctx)
            .unwrap()
            .0
        {
            Access::Mount { fs, .. } => fs,
            Access::Block => panic!("a mount capability gave block access"),
        };
        assert_eq!(fs(&mount_cap("", &[]), &none), Filesystem::Ext4);
        assert_eq!(fs(&mount_cap("", &[]), &xfs_context), Filesystem::Xfs);
        assert_eq!(fs(&mount_cap("ext4", &[]), &xfs_context), Filesystem::Ext4);
        let block = cap(AccessType::Block(BlockVolume {}), Mode::SingleNodeReaderOnly);
        assert_eq!(access_of(Some(&block), &none).unwrap(), (Access::Block, true));
    }

    #[test]
    fn bad_capabilities_are_invalid_arguments() {
        let none = HashMap::new();
        let code = |c: Option<&pb::VolumeCapability>| access_of(c, &none).unwrap_err().code();
        assert_eq!(code(None), tonic::Code::InvalidArgument);
        assert_eq!(code(Some(&mount_cap("btrfs", &[]))), tonic::Code::InvalidArgument);
        assert_eq!(
            code(Some(&mount_cap("ext4", &["ro,exec"]))),
            tonic::Code::InvalidArgument
        );
        let multi = cap(
            AccessType::Mount(MountVolume::default()),
            Mode::MultiNodeMultiWriter,
        );
        assert_eq!(code(Some(&multi)), tonic::Code::InvalidArgument);
        assert_eq!(
            code(Some(&pb::VolumeCapability {
                access_type: None,
                ..mount_cap("", &[])
            })),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn usage_reports_bytes_and_inodes() {
        let u = usage(&mount::FsStats {
            total_bytes: 1000,
            free_bytes: 300,
            available_bytes: 250,
            total_inodes: 64,
            free_inodes: 60,
        });
        assert_eq!(u[0].unit, pb::volume_usage::Unit::Bytes as i32);
        assert_eq!((u[0].total, u[0].used, u[0].available), (1000, 700, 250));
        assert_eq!(u[1].unit, pb::volume_usage::Unit::Inodes as i32);
        assert_eq!((u[1].total, u[1].used, u[1].available), (64, 4, 60));
    }

    #[test]
    fn paths_must_be_given_and_absolute() {
        assert_eq!(
            path_field("target_path", "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            path_field("target_path", "relative/p").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(path_field("target_path", "/a/b").unwrap(), PathBuf::from("/a/b"));
    }

    #[test]
    fn the_node_offers_stage_stats_expansion_and_condition() {
        use pb::node_service_capability::rpc::Type;
        let got: Vec<i32> = capabilities()
            .into_iter()
            .filter_map(|c| c.r#type.map(|pb::node_service_capability::Type::Rpc(r)| r.r#type))
            .collect();
        for t in [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
        ] {
            assert!(got.contains(&(t as i32)), "{t:?} missing");
        }
    }
}
