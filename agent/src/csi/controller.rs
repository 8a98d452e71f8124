//! The Controller service: volumes, publications, snapshots and capacity, over the REST API's own
//! functions (`api::volumes`, `api::snapshots`), so that a CSI volume is checked, placed and recorded
//! exactly as one made with `basalt volume create`.
//!
//! Each RPC checks its request first, with the spec's error code for each case the spec names, then
//! acts. Idempotency: CreateVolume and CreateSnapshot by name (the request is recorded before the
//! volume or snapshot is made, see [`super::records`]), the others by state (deleting what is gone,
//! publishing what is published, unpublishing what is not: `OK`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use basalt_engine::name::VolumeName;
use hyper::StatusCode;
use tonic::{Request, Response, Status};

use super::ids::{self, parse_snapshot_id, parse_volume_id};
use super::params::{self, DEFAULT_FS, FILESYSTEMS};
use super::pb::{self, controller_server::Controller};
use super::records::{self, CloneSource, ContentSource, CsiSnapshot, CsiVolume};
use super::status::{from_api, from_store, required};
use super::{logged, topology};
use crate::api::views::{AttachVolume, CreateSnapshot, CreateVolume, ExpandVolume, Qos, VolumeView};
use crate::api::{snapshots, volumes, ApiContext, ApiError};
use crate::model::{
    keys, NodeName, NodeRecord, SnapshotRef, TargetAccess, TopologyRule, VolumePhase, VolumeRecord,
};
use crate::placement;
use crate::store::{self, Expect, StoreError};

/// Size of a volume whose request names no capacity: small enough to fit anywhere, large enough for
/// a filesystem.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The replicas' block size: every size is a multiple of it.
const BLOCK: u64 = 4096;
/// How long ControllerPublish/Unpublish wait for the volume's target to let in exactly the published
/// node (the controller's agent applies it on its next pass, every few seconds), before telling the CO
/// to retry.
const ACCESS_WAIT: Duration = Duration::from_secs(30);
/// How long ControllerExpandVolume waits for the controller to serve the new size before it tells the
/// CO to retry: the agent grows every replica durably first, seconds on a busy host.
const EXPAND_WAIT: Duration = Duration::from_secs(60);

pub struct ControllerService {
    pub api: ApiContext,
}

/// Why a capability cannot be served: `Err` when it is malformed (INVALID_ARGUMENT everywhere),
/// `Ok(Some(why))` when it is well-formed but unsupported.
pub fn capability_problem(field: &str, cap: &pb::VolumeCapability) -> Result<Option<String>, Status> {
    use pb::volume_capability::access_mode::Mode;
    use pb::volume_capability::AccessType;
    let access = cap
        .access_type
        .as_ref()
        .ok_or_else(|| required(&format!("{field}.access_type (block or mount)")))?;
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| required(&format!("{field}.access_mode")))?;
    if !matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    ) {
        return Ok(Some(format!(
            "{field}: access mode {} is not supported: a Basalt volume is used from one node at a time",
            mode.as_str_name()
        )));
    }
    if let AccessType::Mount(m) = access {
        if !m.fs_type.is_empty() && !FILESYSTEMS.contains(&m.fs_type.as_str()) {
            return Ok(Some(format!(
                "{field}: filesystem {:?} is not supported (this plugin makes {})",
                m.fs_type,
                FILESYSTEMS.join(" or ")
            )));
        }
    }
    Ok(None)
}

/// Every capability well-formed and supported, else INVALID_ARGUMENT.
fn check_capabilities(field: &str, caps: &[pb::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(required(field));
    }
    for (i, cap) in caps.iter().enumerate() {
        if let Some(why) = capability_problem(&format!("{field}[{i}]"), cap)? {
            return Err(Status::invalid_argument(why));
        }
    }
    Ok(())
}

/// The size to give a volume asked for with `range`, at least `minimum` (a clone's source): the
/// smallest multiple of the block size in the range (a pure function).
pub fn size_for(range: Option<&pb::CapacityRange>, minimum: u64) -> Result<u64, Status> {
    let (required_bytes, limit) = match range {
        None => (0, 0),
        Some(r) => (r.required_bytes, r.limit_bytes),
    };
    if required_bytes < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes must not be negative",
        ));
    }
    let (required_bytes, limit) = (required_bytes as u64, limit as u64);
    if limit > 0 && required_bytes > limit {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required_bytes} is above limit_bytes {limit}"
        )));
    }
    let wanted = if required_bytes == 0 {
        // Only a limit (or nothing): the default, within the limit.
        let default = if limit > 0 {
            DEFAULT_SIZE.min(limit)
        } else {
            DEFAULT_SIZE
        };
        default.max(minimum)
    } else {
        required_bytes.max(minimum)
    };
    let size = wanted.div_ceil(BLOCK).saturating_mul(BLOCK);
    if limit > 0 && size > limit {
        return Err(Status::out_of_range(format!(
            "capacity_range: the volume would be {size} bytes (a multiple of 4096{}), above limit_bytes {limit}",
            if minimum > 0 { ", at least its source's size" } else { "" }
        )));
    }
    Ok(size)
}

/// Whether a volume of `size` bytes satisfies `range`.
fn fits(range: Option<&pb::CapacityRange>, size: u64) -> bool {
    range.is_none_or(|r| {
        size >= r.required_bytes.max(0) as u64 && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
    })
}

fn volume_not_found(id: &str) -> Status {
    Status::not_found(format!("no volume with id {id:?}"))
}

/// Whether an API error is a 404.
fn is_not_found(e: &ApiError) -> bool {
    e.status == StatusCode::NOT_FOUND
}

/// The name a clone's source snapshot gets on its source volume.
fn clone_snapshot_name(clone: &VolumeName) -> String {
    format!("clone-for-{clone}")
}

impl ControllerService {
    fn store(&self) -> &dyn store::Store {
        &*self.api.store
    }

    async fn csi_volume(&self, name: &VolumeName) -> Result<Option<store::Versioned<CsiVolume>>, Status> {
        store::get_json(self.store(), &records::volume_key(name))
            .await
            .map_err(from_store)
    }

    /// The volume `id` names, or NOT_FOUND.
    async fn load(&self, id: &str) -> Result<VolumeRecord, Status> {
        let name = parse_volume_id(id).ok_or_else(|| volume_not_found(id))?;
        match volumes::load_volume(self.store(), &name).await {
            Ok(v) if v.value.phase != VolumePhase::Deleting => Ok(v.value),
            Ok(_) => Err(volume_not_found(id)),
            Err(e) if is_not_found(&e) => Err(volume_not_found(id)),
            Err(e) => Err(from_api(e)),
        }
    }

    /// The CSI view of a volume.
    async fn volume_message(
        &self,
        record: &VolumeRecord,
        csi: Option<&CsiVolume>,
    ) -> Result<pb::Volume, Status> {
        let nodes = volumes::node_views(self.store()).await.map_err(from_api)?;
        let labels: Vec<&BTreeMap<String, String>> = record
            .placement
            .replicas
            .iter()
            .filter_map(|slot| nodes.iter().find(|n| n.record.name == slot.node))
            .map(|n| &n.record.labels)
            .collect();
        let content_source = match csi.and_then(|c| c.content_source.clone()) {
            Some(ContentSource::Volume(id)) => Some(pb::volume_content_source::Type::Volume(
                pb::volume_content_source::VolumeSource { volume_id: id },
            )),
            Some(ContentSource::Snapshot(id)) => Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource { snapshot_id: id },
            )),
            None => record.spec.source.as_ref().map(|s| {
                pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                    snapshot_id: ids::snapshot_id(s),
                })
            }),
        };
        Ok(pb::Volume {
            capacity_bytes: record.spec.size_bytes as i64,
            volume_id: record.spec.name.to_string(),
            volume_context: csi
                .map(|c| c.volume_context.clone().into_iter().collect())
                .unwrap_or_default(),
            content_source: content_source.map(|t| pb::VolumeContentSource { r#type: Some(t) }),
            accessible_topology: topology::accessible(&record.spec.topology, &labels),
        })
    }

    /// Published nodes and the volume's condition: abnormal while it is degraded or a service failed.
    async fn volume_status(
        &self,
        record: &VolumeRecord,
    ) -> Result<(Vec<String>, pb::VolumeCondition), Status> {
        let view = volumes::view(self.store(), record.clone())
            .await
            .map_err(from_api)?;
        Ok((
            record.attached_to.iter().map(|n| n.to_string()).collect(),
            condition(&view),
        ))
    }

    /// A snapshot as CSI shows it, from the controller's list.
    async fn snapshot_message(&self, snapshot: &SnapshotRef) -> Result<Option<pb::Snapshot>, Status> {
        let list = match snapshots::list(&self.api, &snapshot.volume).await {
            Ok(l) => l,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(from_api(e)),
        };
        let Some(found) = list.snapshots.iter().find(|s| s.name == snapshot.snapshot) else {
            return Ok(None);
        };
        let recorded = self.recorded_snapshot(snapshot).await?;
        let size = match recorded {
            Some(r) => r.size_bytes,
            None => match volumes::load_volume(self.store(), &snapshot.volume).await {
                Ok(v) => v.value.spec.size_bytes,
                Err(_) => 0,
            },
        };
        Ok(Some(pb::Snapshot {
            size_bytes: size as i64,
            snapshot_id: ids::snapshot_id(snapshot),
            source_volume_id: snapshot.volume.to_string(),
            creation_time: Some(prost_types::Timestamp {
                seconds: found.created_unix,
                nanos: 0,
            }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }))
    }

    /// The CSI record of a snapshot, found by what it names.
    async fn recorded_snapshot(&self, snapshot: &SnapshotRef) -> Result<Option<CsiSnapshot>, Status> {
        let (all, _) = store::list_json::<CsiSnapshot>(self.store(), records::SNAPSHOTS)
            .await
            .map_err(from_store)?;
        Ok(all
            .into_iter()
            .map(|(_, v)| v.value)
            .find(|s| &s.snapshot == snapshot))
    }

    async fn create_volume_inner(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::CreateVolumeResponse, Status> {
        ids::check_csi_name("name", &req.name).map_err(Status::invalid_argument)?;
        check_capabilities("volume_capabilities", &req.volume_capabilities)?;
        let p = params::parse(&req.parameters).map_err(Status::invalid_argument)?;
        let rule =
            topology::rule(req.accessibility_requirements.as_ref()).map_err(Status::invalid_argument)?;
        let name = ids::volume_name(&req.name);
        let content_source = match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(pb::volume_content_source::Type::Snapshot(s)) if s.snapshot_id.is_empty() => {
                return Err(required("volume_content_source.snapshot.snapshot_id"))
            }
            Some(pb::volume_content_source::Type::Volume(v)) if v.volume_id.is_empty() => {
                return Err(required("volume_content_source.volume.volume_id"))
            }
            Some(pb::volume_content_source::Type::Snapshot(s)) => {
                Some(ContentSource::Snapshot(s.snapshot_id.clone()))
            }
            Some(pb::volume_content_source::Type::Volume(v)) => {
                Some(ContentSource::Volume(v.volume_id.clone()))
            }
        };
        let wanted = CsiVolume {
            csi_name: req.name.clone(),
            parameters: params::significant(&req.parameters),
            content_source: content_source.clone(),
            topology: rule.clone(),
            volume_context: [(
                "fsType".to_string(),
                p.fs_type.clone().unwrap_or_else(|| DEFAULT_FS.to_string()),
            )]
            .into(),
        };
        let range = req.capacity_range.as_ref();
        let incompatible = |what: &str| {
            Status::already_exists(format!(
                "a volume named {:?} exists with {what}; use another name or the same request",
                req.name
            ))
        };

        // The request is recorded first: a retry finds it, and a concurrent one waits its turn.
        let revision = match self.csi_volume(&name).await? {
            Some(found) => {
                let had = &found.value;
                if had.csi_name != req.name {
                    return Err(incompatible("another CSI name mapping to the same volume"));
                }
                if had.parameters != wanted.parameters {
                    return Err(incompatible("other parameters"));
                }
                if had.content_source != wanted.content_source {
                    return Err(incompatible("another content source"));
                }
                if had.topology != wanted.topology {
                    return Err(incompatible("other accessibility requirements"));
                }
                match volumes::load_volume(self.store(), &name).await {
                    Ok(v) if v.value.phase == VolumePhase::Deleting => {
                        return Err(Status::aborted(format!(
                            "volume {name} is still being deleted; retry once it is gone"
                        )))
                    }
                    Ok(v) => {
                        if !fits(range, v.value.spec.size_bytes) {
                            return Err(incompatible(&format!(
                                "a size of {} bytes",
                                v.value.spec.size_bytes
                            )));
                        }
                        let volume = self.volume_message(&v.value, Some(had)).await?;
                        return Ok(pb::CreateVolumeResponse { volume: Some(volume) });
                    }
                    // Recorded, but the volume was never made (an earlier attempt stopped between the two).
                    Err(e) if is_not_found(&e) => found.revision,
                    Err(e) => return Err(from_api(e)),
                }
            }
            None => {
                if self
                    .store()
                    .get(&keys::volume(&name))
                    .await
                    .map_err(from_store)?
                    .is_some()
                {
                    return Err(Status::already_exists(format!(
                        "a Basalt volume named {name} exists that this plugin did not create; pick another name"
                    )));
                }
                match store::put_json(
                    self.store(),
                    &records::volume_key(&name),
                    &wanted,
                    Expect::Absent,
                    None,
                )
                .await
                {
                    Ok(rev) => rev,
                    Err(StoreError::Conflict { .. }) => {
                        return Err(Status::aborted(format!(
                            "another CreateVolume of {:?} is in progress; retry",
                            req.name
                        )))
                    }
                    Err(e) => return Err(from_store(e)),
                }
            }
        };

        match self
            .make_volume(&name, &req, &p, rule, range, content_source.as_ref())
            .await
        {
            Ok(record) => {
                let volume = self.volume_message(&record, Some(&wanted)).await?;
                Ok(pb::CreateVolumeResponse { volume: Some(volume) })
            }
            Err(status) => {
                // Nothing was made: forget the request, so a retry with other arguments is not refused.
                let _ = self
                    .store()
                    .delete(&records::volume_key(&name), Expect::Revision(revision))
                    .await;
                Err(status)
            }
        }
    }

    /// Create the Basalt volume of a recorded CreateVolume request.
    async fn make_volume(
        &self,
        name: &VolumeName,
        req: &pb::CreateVolumeRequest,
        p: &params::Params,
        rule: TopologyRule,
        range: Option<&pb::CapacityRange>,
        source: Option<&ContentSource>,
    ) -> Result<VolumeRecord, Status> {
        let from_snapshot = match source {
            None => None,
            Some(ContentSource::Snapshot(id)) => {
                let snap = parse_snapshot_id(id)
                    .ok_or_else(|| Status::not_found(format!("no snapshot with id {id:?}")))?;
                if self.snapshot_message(&snap).await?.is_none() {
                    return Err(Status::not_found(format!("no snapshot with id {id:?}")));
                }
                Some(snap)
            }
            Some(ContentSource::Volume(id)) => {
                let source = self.load(id).await?;
                Some(self.clone_source(name, &source.spec.name).await?)
            }
        };
        let minimum = match &from_snapshot {
            Some(s) => self.load(s.volume.as_str()).await?.spec.size_bytes,
            None => 0,
        };
        let size = size_for(range, minimum)?;
        let create = CreateVolume {
            name: name.to_string(),
            size_bytes: Some(size),
            replicas: p.replicas,
            min_healthy: p.min_healthy,
            selector: p.selector.clone(),
            spread_key: p.spread_key.clone(),
            qos: Qos(p.qos.clone()),
            from_snapshot: from_snapshot.as_ref().map(ids::snapshot_id),
            topology: rule,
            // Authorized access: only the node it is published to may log in.
            access: TargetAccess::AttachedNode,
        };
        let _ = req;
        match volumes::create(&self.api, create).await {
            Ok(_) => volumes::load_volume(self.store(), name)
                .await
                .map(|v| v.value)
                .map_err(from_api),
            Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
                Err(Status::resource_exhausted(e.message))
            }
            Err(e) => Err(from_api(e)),
        }
    }

    /// The snapshot of `source` a clone `clone` is made from: taken once, recorded, reused by a retry.
    async fn clone_source(&self, clone: &VolumeName, source: &VolumeName) -> Result<SnapshotRef, Status> {
        let key = records::clone_source_key(clone);
        let snapshot = SnapshotRef {
            volume: source.clone(),
            snapshot: clone_snapshot_name(clone),
        };
        match store::get_json::<CloneSource>(self.store(), &key)
            .await
            .map_err(from_store)?
        {
            Some(found) if found.value.snapshot == snapshot => {}
            Some(found) => {
                return Err(Status::already_exists(format!(
                    "volume {clone} was cloned from {} before; use another name",
                    ids::snapshot_id(&found.value.snapshot)
                )))
            }
            None => {
                let record = CloneSource {
                    snapshot: snapshot.clone(),
                };
                match store::put_json(self.store(), &key, &record, Expect::Absent, None).await {
                    Ok(_) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(from_store(e)),
                }
            }
        }
        if self.snapshot_message(&snapshot).await?.is_none() {
            let made = snapshots::create(
                &self.api,
                source,
                CreateSnapshot {
                    name: snapshot.snapshot.clone(),
                },
            )
            .await;
            if let Err(e) = made {
                if e.status != StatusCode::CONFLICT {
                    return Err(from_api(e));
                }
            }
        }
        Ok(snapshot)
    }

    async fn delete_volume_inner(
        &self,
        req: pb::DeleteVolumeRequest,
    ) -> Result<pb::DeleteVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let Some(name) = parse_volume_id(&req.volume_id) else {
            return Ok(pb::DeleteVolumeResponse {});
        };
        let (snaps, _) = store::list_json::<CsiSnapshot>(self.store(), records::SNAPSHOTS)
            .await
            .map_err(from_store)?;
        if let Some((_, s)) = snaps.iter().find(|(_, s)| s.value.snapshot.volume == name) {
            return Err(Status::failed_precondition(format!(
                "volume {name} has snapshot {}, which would be lost with it (a snapshot lives in its volume's \
                 replicas); delete its snapshots first",
                ids::snapshot_id(&s.value.snapshot)
            )));
        }
        // Snapshots taken to clone this volume: released now, or refused while a clone still copies one.
        let (sources, _) = store::list_json::<CloneSource>(self.store(), records::CLONE_SOURCES)
            .await
            .map_err(from_store)?;
        for (key, src) in sources.iter().filter(|(_, s)| s.value.snapshot.volume == name) {
            if self.snapshot_message(&src.value.snapshot).await?.is_none() {
                let _ = self.store().delete(key, Expect::Revision(src.revision)).await;
                continue;
            }
            match snapshots::delete(&self.api, &name, &src.value.snapshot.snapshot).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) if e.status == StatusCode::CONFLICT => {
                    return Err(Status::failed_precondition(format!(
                        "volume {name} is the source of a clone still copying it ({}); retry once the clone is hydrated",
                        e.message
                    )))
                }
                Err(e) => return Err(from_api(e)),
            }
            let _ = self.store().delete(key, Expect::Revision(src.revision)).await;
        }
        match volumes::delete(&self.api, &name).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if e.status == StatusCode::CONFLICT => return Err(Status::failed_precondition(e.message)),
            Err(e) => return Err(from_api(e)),
        }
        // This volume's own clone source (if it was a clone of a volume): its snapshot is no longer needed.
        if let Some(own) = store::get_json::<CloneSource>(self.store(), &records::clone_source_key(&name))
            .await
            .map_err(from_store)?
        {
            if snapshots::delete(
                &self.api,
                &own.value.snapshot.volume,
                &own.value.snapshot.snapshot,
            )
            .await
            .is_ok()
            {
                let _ = self
                    .store()
                    .delete(&records::clone_source_key(&name), Expect::Revision(own.revision))
                    .await;
            }
        }
        if let Some(found) = self.csi_volume(&name).await? {
            let _ = self
                .store()
                .delete(&records::volume_key(&name), Expect::Revision(found.revision))
                .await;
        }
        Ok(pb::DeleteVolumeResponse {})
    }

    async fn publish_inner(
        &self,
        req: pb::ControllerPublishVolumeRequest,
    ) -> Result<pb::ControllerPublishVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        if req.node_id.is_empty() {
            return Err(required("node_id"));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| required("volume_capability"))?;
        if let Some(why) = capability_problem("volume_capability", cap)? {
            return Err(Status::invalid_argument(why));
        }
        let record = self.load(&req.volume_id).await?;
        let node = NodeName::new(&req.node_id)
            .map_err(|_| Status::not_found(format!("no node with id {:?}", req.node_id)))?;
        let Some(node_record) = store::get_json::<NodeRecord>(self.store(), &keys::node(&node))
            .await
            .map_err(from_store)?
        else {
            return Err(Status::not_found(format!(
                "no node with id {:?} is registered (its agent never started)",
                req.node_id
            )));
        };
        if let Some(other) = record.attached_to.as_ref().filter(|n| **n != node) {
            return Err(Status::failed_precondition(format!(
                "volume {} is published to node {other}; unpublish it there first (one node at a time)",
                record.spec.name
            )));
        }
        volumes::attach(
            &self.api,
            &record.spec.name,
            AttachVolume {
                node: node.to_string(),
            },
        )
        .await
        .map_err(|e| match e.status {
            StatusCode::CONFLICT => Status::failed_precondition(e.message),
            _ => from_api(e),
        })?;
        self.wait_for_access(&record.spec.name).await?;
        Ok(pb::ControllerPublishVolumeResponse {
            publish_context: [
                ("node".to_string(), node.to_string()),
                ("initiator".to_string(), node_record.value.initiator_name()),
            ]
            .into(),
        })
    }

    async fn unpublish_inner(
        &self,
        req: pb::ControllerUnpublishVolumeRequest,
    ) -> Result<pb::ControllerUnpublishVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        // A volume or node that is gone is unpublished from it: OK.
        let record = match self.load(&req.volume_id).await {
            Ok(r) => r,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(pb::ControllerUnpublishVolumeResponse {})
            }
            Err(s) => return Err(s),
        };
        let published_here = match &record.attached_to {
            None => false,
            Some(n) => req.node_id.is_empty() || n.as_str() == req.node_id,
        };
        if published_here {
            volumes::detach(&self.api, &record.spec.name)
                .await
                .map_err(from_api)?;
            // Answered once the node can no longer log in: the CO may then publish it elsewhere.
            self.wait_for_access(&record.spec.name).await?;
        }
        Ok(pb::ControllerUnpublishVolumeResponse {})
    }

    async fn validate_inner(
        &self,
        req: pb::ValidateVolumeCapabilitiesRequest,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(required("volume_capabilities"));
        }
        let mut problems = Vec::new();
        for (i, cap) in req.volume_capabilities.iter().enumerate() {
            if let Some(why) = capability_problem(&format!("volume_capabilities[{i}]"), cap)? {
                problems.push(why);
            }
        }
        let record = self.load(&req.volume_id).await?;
        let csi = self.csi_volume(&record.spec.name).await?.map(|v| v.value);
        if !req.volume_context.is_empty() {
            let have: HashMap<String, String> = csi
                .as_ref()
                .map(|c| c.volume_context.clone().into_iter().collect())
                .unwrap_or_default();
            if have != req.volume_context {
                problems.push("volume_context is not the one this volume was created with".into());
            }
        }
        if !req.parameters.is_empty() {
            let have = csi.as_ref().map(|c| c.parameters.clone()).unwrap_or_default();
            if have != params::significant(&req.parameters) {
                problems.push("parameters are not the ones this volume was created with".into());
            }
        }
        if !problems.is_empty() {
            return Ok(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: problems.join("; "),
            });
        }
        Ok(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    async fn list_volumes_inner(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, Status> {
        let max = page_size(req.max_entries)?;
        if !req.starting_token.is_empty() && parse_volume_id(&req.starting_token).is_none() {
            return Err(Status::aborted(format!(
                "starting_token {:?} is not one this plugin gave out; list from the start",
                req.starting_token
            )));
        }
        let mut all: Vec<VolumeRecord> = volumes::all_volumes(self.store())
            .await
            .map_err(from_api)?
            .into_iter()
            .filter(|v| v.phase != VolumePhase::Deleting)
            .filter(|v| req.starting_token.is_empty() || v.spec.name.as_str() > req.starting_token.as_str())
            .collect();
        all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let more = all.len() > max;
        all.truncate(max);
        let next_token = if more {
            all.last().map(|v| v.spec.name.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let mut entries = Vec::with_capacity(all.len());
        for record in &all {
            let csi = self.csi_volume(&record.spec.name).await?.map(|v| v.value);
            let (published, condition) = self.volume_status(record).await?;
            entries.push(pb::list_volumes_response::Entry {
                volume: Some(self.volume_message(record, csi.as_ref()).await?),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: published,
                    volume_condition: Some(condition),
                }),
            });
        }
        Ok(pb::ListVolumesResponse { entries, next_token })
    }

    async fn get_capacity_inner(
        &self,
        req: pb::GetCapacityRequest,
    ) -> Result<pb::GetCapacityResponse, Status> {
        let p = params::parse(&req.parameters).map_err(Status::invalid_argument)?;
        for (i, cap) in req.volume_capabilities.iter().enumerate() {
            if capability_problem(&format!("volume_capabilities[{i}]"), cap)?.is_some() {
                // Volumes with these capabilities cannot be made at all.
                return Ok(pb::GetCapacityResponse::default());
            }
        }
        let segment = match &req.accessible_topology {
            Some(t) => topology::to_labels(t).map_err(Status::invalid_argument)?,
            None => BTreeMap::new(),
        };
        let nodes = volumes::node_views(self.store()).await.map_err(from_api)?;
        let all = volumes::all_volumes(self.store()).await.map_err(from_api)?;
        let usage = placement::usage(&all);
        let rule = TopologyRule {
            requisite: if segment.is_empty() { vec![] } else { vec![segment] },
            preferred: vec![],
        };
        Ok(capacity(&nodes, &usage, &p, rule))
    }

    async fn create_snapshot_inner(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::CreateSnapshotResponse, Status> {
        if req.source_volume_id.is_empty() {
            return Err(required("source_volume_id"));
        }
        ids::check_csi_name("name", &req.name).map_err(Status::invalid_argument)?;
        let key = records::snapshot_key(&req.name);
        let existing = store::get_json::<CsiSnapshot>(self.store(), &key)
            .await
            .map_err(from_store)?;
        if let Some(found) = &existing {
            if found.value.snapshot.volume.as_str() != req.source_volume_id
                || found.value.csi_name != req.name
            {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} exists, of volume {}; use another name",
                    req.name, found.value.snapshot.volume
                )));
            }
        }
        let volume = self.load(&req.source_volume_id).await?;
        let snapshot = SnapshotRef {
            volume: volume.spec.name.clone(),
            snapshot: ids::snapshot_name(&req.name),
        };
        let revision = match existing {
            Some(found) => found.revision,
            None => {
                let record = CsiSnapshot {
                    csi_name: req.name.clone(),
                    snapshot: snapshot.clone(),
                    size_bytes: volume.spec.size_bytes,
                    created_unix: 0,
                };
                match store::put_json(self.store(), &key, &record, Expect::Absent, None).await {
                    Ok(rev) => rev,
                    Err(StoreError::Conflict { .. }) => {
                        return Err(Status::aborted(format!(
                            "another CreateSnapshot of {:?} is in progress; retry",
                            req.name
                        )))
                    }
                    Err(e) => return Err(from_store(e)),
                }
            }
        };
        if self.snapshot_message(&snapshot).await?.is_none() {
            let made = snapshots::create(
                &self.api,
                &snapshot.volume,
                CreateSnapshot {
                    name: snapshot.snapshot.clone(),
                },
            )
            .await;
            if let Err(e) = made {
                let _ = self.store().delete(&key, Expect::Revision(revision)).await;
                return Err(from_api(e));
            }
        }
        let message = self.snapshot_message(&snapshot).await?.ok_or_else(|| {
            Status::internal(format!(
                "snapshot {} vanished as it was made",
                ids::snapshot_id(&snapshot)
            ))
        })?;
        Ok(pb::CreateSnapshotResponse {
            snapshot: Some(message),
        })
    }

    async fn delete_snapshot_inner(
        &self,
        req: pb::DeleteSnapshotRequest,
    ) -> Result<pb::DeleteSnapshotResponse, Status> {
        if req.snapshot_id.is_empty() {
            return Err(required("snapshot_id"));
        }
        let Some(snapshot) = parse_snapshot_id(&req.snapshot_id) else {
            return Ok(pb::DeleteSnapshotResponse {});
        };
        // A snapshot that is gone is deleted (the controller refuses to delete what it does not have).
        let exists = self.snapshot_message(&snapshot).await?.is_some();
        let deleted = if exists {
            snapshots::delete(&self.api, &snapshot.volume, &snapshot.snapshot)
                .await
                .map(|_| ())
        } else {
            Ok(())
        };
        match deleted {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if e.status == StatusCode::CONFLICT => {
                return Err(Status::failed_precondition(format!(
                    "snapshot {} is in use ({}); retry once the clones made from it are hydrated",
                    req.snapshot_id, e.message
                )))
            }
            Err(e) => return Err(from_api(e)),
        }
        let (all, _) = store::list_json::<CsiSnapshot>(self.store(), records::SNAPSHOTS)
            .await
            .map_err(from_store)?;
        for (key, s) in all.iter().filter(|(_, s)| s.value.snapshot == snapshot) {
            let _ = self.store().delete(key, Expect::Revision(s.revision)).await;
        }
        Ok(pb::DeleteSnapshotResponse {})
    }

    async fn list_snapshots_inner(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, Status> {
        let max = page_size(req.max_entries)?;
        if !req.starting_token.is_empty() && parse_snapshot_id(&req.starting_token).is_none() {
            return Err(Status::aborted(format!(
                "starting_token {:?} is not one this plugin gave out; list from the start",
                req.starting_token
            )));
        }
        let mut found = Vec::new();
        if !req.snapshot_id.is_empty() {
            if let Some(s) = parse_snapshot_id(&req.snapshot_id) {
                let source_ok = req.source_volume_id.is_empty() || req.source_volume_id == s.volume.as_str();
                if source_ok {
                    found.extend(self.snapshot_message(&s).await?);
                }
            }
        } else {
            let sources: Vec<VolumeRecord> = if req.source_volume_id.is_empty() {
                volumes::all_volumes(self.store()).await.map_err(from_api)?
            } else {
                self.load(&req.source_volume_id).await.into_iter().collect()
            };
            for v in sources.iter().filter(|v| v.phase != VolumePhase::Deleting) {
                let list = match snapshots::list(&self.api, &v.spec.name).await {
                    Ok(l) => l,
                    // A volume still being created has no snapshots yet.
                    Err(_) if v.phase == VolumePhase::Creating => continue,
                    Err(e) => return Err(from_api(e)),
                };
                for s in list.snapshots {
                    let r = SnapshotRef {
                        volume: v.spec.name.clone(),
                        snapshot: s.name.clone(),
                    };
                    let size = match self.recorded_snapshot(&r).await? {
                        Some(rec) => rec.size_bytes,
                        None => v.spec.size_bytes,
                    };
                    found.push(pb::Snapshot {
                        size_bytes: size as i64,
                        snapshot_id: ids::snapshot_id(&r),
                        source_volume_id: v.spec.name.to_string(),
                        creation_time: Some(prost_types::Timestamp {
                            seconds: s.created_unix,
                            nanos: 0,
                        }),
                        ready_to_use: true,
                        group_snapshot_id: String::new(),
                    });
                }
            }
        }
        found.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        found.retain(|s| req.starting_token.is_empty() || s.snapshot_id > req.starting_token);
        let more = found.len() > max;
        found.truncate(max);
        let next_token = if more {
            found.last().map(|s| s.snapshot_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListSnapshotsResponse {
            entries: found
                .into_iter()
                .map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token,
        })
    }

    async fn expand_inner(
        &self,
        req: pb::ControllerExpandVolumeRequest,
    ) -> Result<pb::ControllerExpandVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| required("capacity_range"))?;
        if let Some(cap) = &req.volume_capability {
            if let Some(why) = capability_problem("volume_capability", cap)? {
                return Err(Status::invalid_argument(why));
            }
        }
        let record = self.load(&req.volume_id).await?;
        let node_expansion_required = !matches!(
            req.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(pb::volume_capability::AccessType::Block(_))
        );
        let current = record.spec.size_bytes;
        let size = size_for(Some(range), 0)?;
        if size > current {
            volumes::expand(&self.api, &record.spec.name, ExpandVolume { size_bytes: size })
                .await
                .map_err(|e| match e.status {
                    StatusCode::UNPROCESSABLE_ENTITY => Status::resource_exhausted(e.message),
                    _ => from_api(e),
                })?;
        }
        let size = size.max(current);
        self.wait_for_size(&record.spec.name, size).await?;
        Ok(pb::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required,
        })
    }

    /// Wait until the volume's target lets in exactly the initiators its record says (the node it is
    /// attached to): publication is access, and unpublication its end.
    async fn wait_for_access(&self, name: &VolumeName) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + ACCESS_WAIT;
        loop {
            let record = volumes::load_volume(self.store(), name)
                .await
                .map_err(from_api)?
                .value;
            let (nodes, _) = store::list_json::<NodeRecord>(self.store(), keys::NODES)
                .await
                .map_err(from_store)?;
            let nodes = nodes
                .into_iter()
                .map(|(_, n)| (n.value.name.clone(), n.value))
                .collect();
            let want = crate::reconcile::normalized(crate::model::allowed_initiators(&record, &nodes));
            let served = match snapshots::controller(&self.api, name).await {
                Ok(mut c) => c
                    .volume_info(basalt_proto::pb::controller::VolumeInfoRequest {})
                    .await
                    .ok()
                    .map(|r| crate::reconcile::view_from_reply(r.get_ref()).allowed),
                Err(_) => None,
            };
            if served.as_ref() == Some(&want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "volume {name}'s target does not yet let in {want:?} (it serves {served:?}); retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Wait until the volume's controller serves `size` bytes (the agent grows it in the background),
    /// so that the node sees the new size when the CO calls NodeExpandVolume next.
    async fn wait_for_size(&self, name: &VolumeName, size: u64) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + EXPAND_WAIT;
        loop {
            let served = match snapshots::controller(&self.api, name).await {
                Ok(mut c) => c
                    .volume_info(basalt_proto::pb::controller::VolumeInfoRequest {})
                    .await
                    .map(|r| r.into_inner().size_bytes)
                    .unwrap_or(0),
                Err(_) => 0,
            };
            if served >= size {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "volume {name} is recorded at {size} bytes and is still growing (its controller serves {served}); \
                     retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn get_volume_inner(
        &self,
        req: pb::ControllerGetVolumeRequest,
    ) -> Result<pb::ControllerGetVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let record = self.load(&req.volume_id).await?;
        let csi = self.csi_volume(&record.spec.name).await?.map(|v| v.value);
        let (published, condition) = self.volume_status(&record).await?;
        Ok(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume_message(&record, csi.as_ref()).await?),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: published,
                volume_condition: Some(condition),
            }),
        })
    }
}

/// `max_entries`: 0 is no limit; negative is INVALID_ARGUMENT.
fn page_size(max_entries: i32) -> Result<usize, Status> {
    match max_entries {
        n if n < 0 => Err(Status::invalid_argument(format!(
            "max_entries {n} is negative; 0 asks for every entry"
        ))),
        0 => Ok(usize::MAX),
        n => Ok(n as usize),
    }
}

/// A volume's condition from its view: abnormal while degraded or while one of its services failed.
pub fn condition(view: &VolumeView) -> pb::VolumeCondition {
    let failed: Vec<&String> = view
        .statuses
        .iter()
        .filter(|(_, s)| s.state == crate::model::ServiceState::Failed)
        .map(|(k, _)| k)
        .collect();
    let mut problems = Vec::new();
    if view.phase == VolumePhase::Degraded {
        problems.push("the volume is degraded: fewer healthy replicas than asked for".to_string());
    }
    if !failed.is_empty() {
        problems.push(format!(
            "failed services: {}",
            failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    pb::VolumeCondition {
        abnormal: !problems.is_empty(),
        message: if problems.is_empty() {
            format!("volume is {:?}", view.phase).to_lowercase()
        } else {
            problems.join("; ")
        },
    }
}

/// Capacity for volumes of `p` in the segment `rule` names (a pure function): the space free on the
/// pools of nodes that could hold a replica, and the largest volume placement would accept, found by
/// asking placement itself (it knows the spread, the one-host rule, ports and cordons).
pub fn capacity(
    nodes: &[placement::NodeView],
    usage: &placement::Usage,
    p: &params::Params,
    rule: TopologyRule,
) -> pb::GetCapacityResponse {
    let open = |n: &&placement::NodeView| {
        n.up && !n.record.cordoned
            && !n.record.draining
            && rule.admits(&n.record.labels)
            && p.selector.iter().all(|(k, v)| n.record.labels.get(k) == Some(v))
    };
    let available: u64 = nodes
        .iter()
        .filter(open)
        .flat_map(|n| {
            n.record.pools.iter().map(|pool| {
                pool.capacity_bytes
                    .saturating_sub(usage.pool_bytes(&n.record.name, &pool.name))
            })
        })
        .fold(0u64, u64::saturating_add);
    let request = |size: u64| placement::Request {
        replicas: p.replicas.unwrap_or(crate::api::views::DEFAULT_REPLICAS),
        size_bytes: size,
        selector: p.selector.clone(),
        spread_key: p
            .spread_key
            .clone()
            .unwrap_or_else(|| crate::api::views::DEFAULT_SPREAD_KEY.into()),
        exclude: Default::default(),
        first_id: 1,
        topology: rule.clone(),
    };
    let places = |blocks: u64| placement::place(&request(blocks * BLOCK), nodes, usage).is_ok();
    // Largest number of blocks that places: placement succeeds for every size below one that does.
    let (mut lo, mut hi) = (0u64, available / BLOCK + 1);
    if !places(1) {
        hi = 1;
    }
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if places(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let largest = lo * BLOCK;
    pb::GetCapacityResponse {
        available_capacity: available.min(i64::MAX as u64) as i64,
        maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
        minimum_volume_size: Some(BLOCK as i64),
    }
}

fn capability(t: pb::controller_service_capability::rpc::Type) -> pb::ControllerServiceCapability {
    pb::ControllerServiceCapability {
        r#type: Some(pb::controller_service_capability::Type::Rpc(
            pb::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        logged("CreateVolume", request, async |r| {
            self.create_volume_inner(r).await
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        logged("DeleteVolume", request, async |r| {
            self.delete_volume_inner(r).await
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        logged("ControllerPublishVolume", request, async |r| {
            self.publish_inner(r).await
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        logged("ControllerUnpublishVolume", request, async |r| {
            self.unpublish_inner(r).await
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        logged("ValidateVolumeCapabilities", request, async |r| {
            self.validate_inner(r).await
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        logged("ListVolumes", request, async |r| self.list_volumes_inner(r).await).await
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        logged("GetCapacity", request, async |r| self.get_capacity_inner(r).await).await
    }

    async fn controller_get_capabilities(
        &self,
        request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::rpc::Type;
        logged("ControllerGetCapabilities", request, async |_| {
            Ok(pb::ControllerGetCapabilitiesResponse {
                capabilities: [
                    Type::CreateDeleteVolume,
                    Type::PublishUnpublishVolume,
                    Type::ListVolumes,
                    Type::GetCapacity,
                    Type::CreateDeleteSnapshot,
                    Type::ListSnapshots,
                    Type::CloneVolume,
                    Type::ExpandVolume,
                    Type::ListVolumesPublishedNodes,
                    Type::VolumeCondition,
                    Type::GetVolume,
                    Type::SingleNodeMultiWriter,
                ]
                .into_iter()
                .map(capability)
                .collect(),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        logged("CreateSnapshot", request, async |r| {
            self.create_snapshot_inner(r).await
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        logged("DeleteSnapshot", request, async |r| {
            self.delete_snapshot_inner(r).await
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        logged("ListSnapshots", request, async |r| {
            self.list_snapshots_inner(r).await
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        logged("ControllerExpandVolume", request, async |r| {
            self.expand_inner(r).await
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        logged("ControllerGetVolume", request, async |r| {
            self.get_volume_inner(r).await
        })
        .await
    }

    /// Not offered (no MODIFY_VOLUME capability): QoS changes go through the agent's API.
    async fn controller_modify_volume(
        &self,
        request: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        logged("ControllerModifyVolume", request, async |_| {
            Err(Status::unimplemented(
                "ControllerModifyVolume is not offered (no MODIFY_VOLUME capability); change a volume's QoS with \
                 `basalt volume qos`",
            ))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(required_bytes: i64, limit_bytes: i64) -> pb::CapacityRange {
        pb::CapacityRange {
            required_bytes,
            limit_bytes,
        }
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        assert_eq!(size_for(None, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(5000, 0)), 0).unwrap(), 8192);
        assert_eq!(size_for(Some(&range(0, 8192)), 0).unwrap(), 8192);
        assert_eq!(
            size_for(Some(&range(0, 0)), 3 << 30).unwrap(),
            3 << 30,
            "a clone takes its source's size"
        );
        assert_eq!(
            size_for(Some(&range(-1, 0)), 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(Some(&range(10, 5)), 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(Some(&range(5000, 6000)), 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&range(0, 1 << 20)), 2 << 20).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
    }

    proptest! {
        #[test]
        fn a_size_given_always_fits_its_range(req in 0i64..(1 << 40), extra in 0i64..(1 << 20), min in 0u64..(1 << 30)) {
            let r = range(req, if extra % 2 == 0 { 0 } else { req + extra });
            if let Ok(size) = size_for(Some(&r), min) {
                prop_assert!(fits(Some(&r), size));
                prop_assert!(size >= min && size % BLOCK == 0);
            }
        }
    }

    fn cap(mode: pb::volume_capability::access_mode::Mode, fs: &str) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(
                pb::volume_capability::MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                },
            )),
            access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capabilities_are_single_node_and_known_filesystems() {
        use pb::volume_capability::access_mode::Mode;
        assert_eq!(
            capability_problem("c", &cap(Mode::SingleNodeWriter, "ext4")).unwrap(),
            None
        );
        assert!(capability_problem("c", &cap(Mode::MultiNodeMultiWriter, ""))
            .unwrap()
            .is_some());
        assert!(capability_problem("c", &cap(Mode::SingleNodeWriter, "zfs"))
            .unwrap()
            .is_some());
        assert!(capability_problem("c", &cap(Mode::Unknown, "")).is_err());
        let no_type = pb::VolumeCapability {
            access_type: None,
            ..cap(Mode::SingleNodeWriter, "")
        };
        assert!(capability_problem("c", &no_type).is_err());
    }
}
