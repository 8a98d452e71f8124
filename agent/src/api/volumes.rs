//! The volume operations: create (and clone), list, inspect, delete, expand, attach and detach.
//!
//! Each writes desired state into the store and answers at once; the agents' reconcilers do the work
//! and report it in the statuses `GET /v1/volumes/{name}` shows. Every change reads the record with its
//! revision, changes it, and writes it back expecting that revision ([`update_volume`]): two clients
//! acting at once never lose an update, and a request that is refused changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use basalt_engine::name::VolumeName;
use basalt_engine::volume::qos::LimitKind;
use hyper::StatusCode;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::views::{
    AttachVolume, CreateVolume, ExpandVolume, VolumeList, VolumeView, DEFAULT_REPLICAS, DEFAULT_SPREAD_KEY,
};
use super::ApiContext;
use crate::model::{
    keys, NodeName, NodeRecord, Placement, QosSpec, ServiceId, ServiceStatus, SnapshotRef, TargetAccess,
    TopologyRule, VolumePhase, VolumeRecord, VolumeSecrets, VolumeSpec,
};
use crate::placement;
use crate::store::{self, Expect, Store, StoreError, Versioned};

/// Most replicas a volume may have (the controller's limit on its fan-out).
pub const MAX_REPLICAS: u8 = 16;

/// How many times a change is re-read and retried when another writer got there first, before the
/// client is told 409: a handful covers two or three writers racing on one record.
const UPDATE_ATTEMPTS: usize = 5;

/// Block size of the replicas: a volume's size is a multiple of it.
const BLOCK: u64 = 4096;

/// The name in a path or a body, checked.
pub fn parse_volume_name(name: &str) -> ApiResult<VolumeName> {
    VolumeName::new(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub fn parse_node_name(name: &str) -> ApiResult<NodeName> {
    NodeName::new(name).map_err(ApiError::bad_request)
}

fn no_such_volume(name: &VolumeName) -> ApiError {
    ApiError::not_found(format!(
        "no volume named {name:?}; list the volumes with GET /v1/volumes (`basalt volume ls`)"
    ))
}

/// The volume's record and its revision, or 404.
pub async fn load_volume(store: &dyn Store, name: &VolumeName) -> ApiResult<Versioned<VolumeRecord>> {
    store::get_json(store, &keys::volume(name))
        .await?
        .ok_or_else(|| no_such_volume(name))
}

/// Read the volume, let `change` modify it (answering whether it changed anything, or refusing), and
/// write it back expecting the revision read; re-read and retry when another writer came first.
pub async fn update_volume(
    store: &dyn Store,
    name: &VolumeName,
    mut change: impl FnMut(&mut VolumeRecord) -> ApiResult<bool>,
) -> ApiResult<VolumeRecord> {
    let key = keys::volume(name);
    for _ in 0..UPDATE_ATTEMPTS {
        let Versioned { mut value, revision } = load_volume(store, name).await?;
        if !change(&mut value)? {
            return Ok(value);
        }
        match store::put_json(store, &key, &value, Expect::Revision(revision), None).await {
            Ok(_) => return Ok(value),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "volume {name:?} kept changing while this request tried to update it ({UPDATE_ATTEMPTS} attempts); \
         retry the request"
    )))
}

/// Every registered node as placement sees it (up: its liveness key holds
/// its `NodeAlive`, not another agent's down mark).
pub async fn node_views(store: &dyn Store) -> ApiResult<Vec<placement::NodeView>> {
    let (nodes, _) = store::list_json::<NodeRecord>(store, keys::NODES).await?;
    let (alive, _) = store.list(keys::NODES_ALIVE).await?;
    let (up, _) = crate::reconcile::read_liveness(&alive);
    Ok(nodes
        .into_iter()
        .map(|(_, v)| placement::NodeView {
            up: up.contains(&v.value.name),
            record: v.value,
        })
        .collect())
}

/// Every volume record.
pub async fn all_volumes(store: &dyn Store) -> ApiResult<Vec<VolumeRecord>> {
    let (volumes, _) = store::list_json::<VolumeRecord>(store, keys::VOLUMES).await?;
    Ok(volumes.into_iter().map(|(_, v)| v.value).collect())
}

/// The engine's limit each QoS field is checked as.
fn qos_fields(qos: &QosSpec) -> [(&'static str, LimitKind, Option<u64>); 6] {
    [
        ("read_iops", LimitKind::ReadIops, qos.read_iops),
        ("write_iops", LimitKind::WriteIops, qos.write_iops),
        ("total_iops", LimitKind::Iops, qos.total_iops),
        ("read_bytes_per_sec", LimitKind::ReadBps, qos.read_bytes_per_sec),
        (
            "write_bytes_per_sec",
            LimitKind::WriteBps,
            qos.write_bytes_per_sec,
        ),
        ("total_bytes_per_sec", LimitKind::Bps, qos.total_bytes_per_sec),
    ]
}

/// QoS limits the engine accepts, or 400 naming the field.
pub fn check_qos(qos: &QosSpec) -> ApiResult<()> {
    for (field, kind, value) in qos_fields(qos) {
        if let Some(rate) = value {
            kind.check_rate(rate)
                .map_err(|e| ApiError::bad_request(format!("qos.{field}: {e}")))?;
        }
    }
    Ok(())
}

/// The engine's limits for `qos`, as the controller's API takes them.
pub fn qos_limits(qos: &QosSpec) -> basalt_proto::pb::controller::QosLimits {
    use basalt_proto::pb::controller::QosLimit;
    let limit = |v: Option<u64>| v.map(|rate| QosLimit { rate, burst: 0 });
    basalt_proto::pb::controller::QosLimits {
        read_iops: limit(qos.read_iops),
        write_iops: limit(qos.write_iops),
        iops: limit(qos.total_iops),
        read_bps: limit(qos.read_bytes_per_sec),
        write_bps: limit(qos.write_bytes_per_sec),
        bps: limit(qos.total_bytes_per_sec),
    }
}

fn check_size(field: &str, size: u64) -> ApiResult<u64> {
    if size == 0 || !size.is_multiple_of(BLOCK) {
        return Err(ApiError::bad_request(format!(
            "{field} must be a non-zero multiple of 4096 (the replicas' block size); {size} is not"
        )));
    }
    Ok(size)
}

/// `VOLUME/SNAPSHOT`.
fn parse_snapshot_ref(text: &str) -> ApiResult<SnapshotRef> {
    let (volume, snapshot) = text.split_once('/').ok_or_else(|| {
        ApiError::bad_request(format!(
            "from_snapshot {text:?} is not VOLUME/SNAPSHOT: name the source volume and its snapshot"
        ))
    })?;
    let volume = parse_volume_name(volume)
        .map_err(|e| ApiError::bad_request(format!("from_snapshot: {}", e.message)))?;
    super::snapshots::check_snapshot_name(snapshot)?;
    Ok(SnapshotRef {
        volume,
        snapshot: snapshot.to_string(),
    })
}

/// A create request checked field by field (everything but what needs the store).
#[derive(Debug)]
struct CheckedCreate {
    name: VolumeName,
    size_bytes: Option<u64>,
    replicas: u8,
    min_healthy: Option<u8>,
    selector: BTreeMap<String, String>,
    spread_key: String,
    qos: QosSpec,
    source: Option<SnapshotRef>,
    topology: TopologyRule,
    access: TargetAccess,
}

fn check_create(req: CreateVolume) -> ApiResult<CheckedCreate> {
    let name = parse_volume_name(&req.name)?;
    let size_bytes = req.size_bytes.map(|s| check_size("size_bytes", s)).transpose()?;
    let replicas = req.replicas.unwrap_or(DEFAULT_REPLICAS);
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(ApiError::bad_request(format!(
            "replicas must be 1 to {MAX_REPLICAS}; {replicas} was asked"
        )));
    }
    if let Some(m) = req.min_healthy {
        if m == 0 || m > replicas {
            return Err(ApiError::bad_request(format!(
                "min_healthy must be 1 to the number of replicas ({replicas}); {m} was asked (leave it out for \
                 a majority)"
            )));
        }
    }
    for (k, v) in &req.selector {
        if k.is_empty() || v.is_empty() {
            return Err(ApiError::bad_request(format!(
                "selector {k:?}={v:?}: a label and its value must both be non-empty"
            )));
        }
    }
    let spread_key = req.spread_key.unwrap_or_else(|| DEFAULT_SPREAD_KEY.to_string());
    if spread_key.is_empty() {
        return Err(ApiError::bad_request(
            "spread_key must name a node label (e.g. zone); leave it out for the default",
        ));
    }
    let qos = req.qos.0;
    check_qos(&qos)?;
    let source = req.from_snapshot.as_deref().map(parse_snapshot_ref).transpose()?;
    for (field, terms) in [
        ("requisite", &req.topology.requisite),
        ("preferred", &req.topology.preferred),
    ] {
        for (i, term) in terms.iter().enumerate() {
            if term.is_empty() || term.iter().any(|(k, v)| k.is_empty() || v.is_empty()) {
                return Err(ApiError::bad_request(format!(
                    "topology.{field}[{i}]: each topology is a non-empty set of node labels, each label and \
                     value non-empty"
                )));
            }
        }
    }
    if size_bytes.is_none() && source.is_none() {
        return Err(ApiError::bad_request(
            "size_bytes is required (a non-zero multiple of 4096), unless from_snapshot names a snapshot to clone",
        ));
    }
    Ok(CheckedCreate {
        name,
        size_bytes,
        replicas,
        min_healthy: req.min_healthy,
        selector: req.selector,
        spread_key,
        qos,
        source,
        topology: req.topology,
        access: req.access,
    })
}

/// `POST /v1/volumes`: record a new volume, placed, with fresh secrets; 201 with its view.
pub async fn create(ctx: &ApiContext, req: CreateVolume) -> ApiResult<(StatusCode, VolumeView)> {
    let req = check_create(req)?;
    let store = &*ctx.store;
    let taken = || {
        ApiError::conflict(format!(
            "a volume named {:?} already exists; pick another name, or delete it first (`basalt volume rm`)",
            req.name.as_str()
        ))
    };
    if store.get(&keys::volume(&req.name)).await?.is_some() {
        return Err(taken());
    }
    let volumes = all_volumes(store).await?;
    let size_bytes = match &req.source {
        None => req.size_bytes.unwrap_or_default(),
        Some(source) => {
            let source_volume = volumes
                .iter()
                .find(|v| v.spec.name == source.volume)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "from_snapshot: no volume named {:?} to clone from; list them with GET /v1/volumes",
                        source.volume.as_str()
                    ))
                })?;
            if source_volume.phase == VolumePhase::Deleting {
                return Err(ApiError::conflict(format!(
                    "from_snapshot: volume {:?} is being deleted; clone another volume's snapshot",
                    source.volume.as_str()
                )));
            }
            let source_size = source_volume.spec.size_bytes;
            super::snapshots::check_clone_source(ctx, source).await?;
            match req.size_bytes {
                Some(s) if s < source_size => {
                    return Err(ApiError::bad_request(format!(
                        "size_bytes {s} is below the size of the clone's source {:?} ({source_size} bytes): a clone \
                         is at least as large as its source; leave size_bytes out to take the source's",
                        source.volume.as_str()
                    )))
                }
                Some(s) => s,
                None => source_size,
            }
        }
    };
    let nodes = node_views(store).await?;
    if nodes.is_empty() {
        return Err(ApiError::unplaceable(
            "no node is registered: start `basalt agent` on at least one host, then create the volume",
        ));
    }
    let usage = placement::usage(&volumes);
    let request = placement::Request {
        replicas: req.replicas,
        size_bytes,
        selector: req.selector.clone(),
        spread_key: req.spread_key.clone(),
        exclude: BTreeSet::new(),
        first_id: 1,
        topology: req.topology.clone(),
    };
    let placed = placement::place(&request, &nodes, &usage).map_err(|e| {
        ApiError::unplaceable(format!("volume {:?} cannot be placed: {e}", req.name.as_str()))
    })?;
    let mut record = VolumeRecord {
        spec: VolumeSpec {
            name: req.name.clone(),
            uuid: Uuid::new_v4(),
            size_bytes,
            replicas: req.replicas,
            min_healthy: req.min_healthy,
            selector: req.selector,
            spread_key: req.spread_key,
            qos: req.qos,
            source: req.source,
            topology: req.topology,
            access: req.access,
        },
        placement: Placement {
            next_replica_id: placed.replicas.iter().map(|r| r.id + 1).max().unwrap_or(0),
            retired: Vec::new(),
            replicas: placed.replicas,
            controller: None,
        },
        phase: VolumePhase::Creating,
        attached_to: None,
    };
    // The controller's ports must not collide with the replicas just placed.
    let mut with_new = volumes;
    with_new.push(record.clone());
    let controller = placement::place_controller(
        &record.placement.replicas,
        &nodes,
        &placement::usage(&with_new),
        1,
    )
    .map_err(|e| {
        ApiError::unplaceable(format!(
            "volume {:?}'s controller cannot be placed: {e}",
            req.name.as_str()
        ))
    })?;
    record.placement.controller = Some(controller);

    write_secrets(store, &req.name).await?;
    match store::put_json(store, &keys::volume(&req.name), &record, Expect::Absent, None).await {
        Ok(_) => {}
        // Another request created it between our check and our write. The secrets key now holds what
        // one of us wrote last, and the agents read it from there: it stays.
        Err(StoreError::Conflict { .. }) => return Err(taken()),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(volume = %req.name, size_bytes, replicas = req.replicas, "volume recorded");
    Ok((StatusCode::CREATED, view(store, record).await?))
}

/// Write a new volume's secrets. A secrets key without a volume record is what a create that failed
/// between its two writes left: it is replaced.
async fn write_secrets(store: &dyn Store, name: &VolumeName) -> ApiResult<()> {
    let secrets = VolumeSecrets {
        peer_secret: basalt_proto::auth::hex(&rand::random::<[u8; 32]>()),
        api_token: basalt_proto::auth::hex(&rand::random::<[u8; 32]>()),
    };
    let key = keys::volume_secrets(name);
    let mut expect = Expect::Absent;
    for _ in 0..UPDATE_ATTEMPTS {
        match store::put_json(store, &key, &secrets, expect, None).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { found, .. }) => {
                expect = if found == 0 {
                    Expect::Absent
                } else {
                    Expect::Revision(found)
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "the secrets of volume {:?} kept changing while it was created; retry the request",
        name.as_str()
    )))
}

/// The iSCSI URL of a volume whose controller runs at `addr`.
pub fn iscsi_url(addr: SocketAddr, name: &VolumeName) -> String {
    format!("iscsi://{addr}/iqn.2026-11.io.basalt:{name}/0")
}

/// Whether some replicas share a node (a one-host cluster): the volume survives no host failure.
pub fn shares_failure_domain(placement: &Placement) -> bool {
    let nodes: BTreeSet<&NodeName> = placement.replicas.iter().map(|r| &r.node).collect();
    nodes.len() < placement.replicas.len()
}

/// The view of `record`, from the statuses and nodes in the store.
pub async fn view(store: &dyn Store, record: VolumeRecord) -> ApiResult<VolumeView> {
    let (statuses, _) =
        store::list_json::<ServiceStatus>(store, &keys::volume_status(&record.spec.name)).await?;
    let prefix = keys::volume_status(&record.spec.name);
    let statuses = statuses
        .into_iter()
        .map(|(k, v)| (k.strip_prefix(&prefix).unwrap_or(&k).to_string(), v.value))
        .collect();
    let iscsi_url = match &record.placement.controller {
        None => None,
        Some(c) => store::get_json::<NodeRecord>(store, &keys::node(&c.node))
            .await?
            .map(|n| iscsi_url(SocketAddr::new(n.value.address, c.iscsi_port), &record.spec.name)),
    };
    Ok(view_of(record, statuses, iscsi_url))
}

/// The view of a record (a pure function of what the store holds).
pub fn view_of(
    record: VolumeRecord,
    statuses: BTreeMap<String, ServiceStatus>,
    iscsi_url: Option<String>,
) -> VolumeView {
    // A replica's mode and progress are its controller's report, laid over its own status.
    let mut statuses = statuses;
    let controller = statuses.get("controller").cloned();
    let controller_node = record.placement.controller.as_ref().map(|c| &c.node);
    for slot in &record.placement.replicas {
        let key = ServiceId::Replica(slot.id).to_string();
        if let Some(status) = statuses.remove(&key) {
            let status = status.with_report(slot.id, controller.as_ref(), controller_node);
            statuses.insert(key, status);
        }
    }
    let shared = shares_failure_domain(&record.placement);
    let mut warnings = Vec::new();
    if shared {
        warnings.push(
            "some replicas of this volume share a node: losing that host loses them together (a one-host \
             cluster, or too few nodes); add nodes for replicas on distinct hosts"
                .to_string(),
        );
    }
    let cleanup_pending = if record.phase == VolumePhase::Deleting {
        let pending = crate::reconcile::cleanup_pending(&record);
        if !pending.is_empty() {
            let names: Vec<&str> = pending.iter().map(NodeName::as_str).collect();
            warnings.push(format!(
                "deleting: waiting for node(s) {} to remove their services and data; a node that is down \
                 finishes when its agent is back",
                names.join(", ")
            ));
        }
        pending
    } else {
        Vec::new()
    };
    let spec = record.spec;
    VolumeView {
        name: spec.name.to_string(),
        uuid: spec.uuid.to_string(),
        size_bytes: spec.size_bytes,
        replicas: spec.replicas,
        min_healthy: spec.min_healthy,
        selector: spec.selector,
        spread_key: spec.spread_key,
        qos: spec.qos,
        source: spec.source,
        phase: record.phase,
        attached_to: record.attached_to,
        placement: record.placement,
        statuses,
        iscsi_url,
        shared_failure_domain: shared,
        warnings,
        cleanup_pending,
    }
}

/// The filters of `GET /v1/volumes`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub phase: Option<VolumePhase>,
    pub node: Option<NodeName>,
    pub label: Option<(String, String)>,
}

impl ListFilter {
    /// From the query string; an unknown parameter or a bad value is a 400 naming it.
    pub fn parse(query: &[(String, String)]) -> ApiResult<ListFilter> {
        let mut filter = ListFilter::default();
        for (k, v) in query {
            match k.as_str() {
                "phase" => {
                    filter.phase = Some(
                        serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                            ApiError::bad_request(format!(
                                "phase={v:?} is not a volume phase: use creating, ready, degraded or deleting"
                            ))
                        })?,
                    )
                }
                "node" => {
                    filter.node = Some(
                        parse_node_name(v)
                            .map_err(|e| ApiError::bad_request(format!("node: {}", e.message)))?,
                    )
                }
                "label" => {
                    let (lk, lv) = v.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| {
                        ApiError::bad_request(format!("label={v:?} is not KEY=VALUE (e.g. label=zone=a)"))
                    })?;
                    filter.label = Some((lk.to_string(), lv.to_string()));
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter {other:?}: GET /v1/volumes takes phase, node and label"
                    )))
                }
            }
        }
        Ok(filter)
    }

    /// Whether `record` passes: its phase, a service on the node, the label in its selector.
    pub fn admits(&self, record: &VolumeRecord) -> bool {
        let phase_ok = self.phase.is_none_or(|p| p == record.phase);
        let node_ok = self.node.as_ref().is_none_or(|n| {
            record.placement.replicas.iter().any(|r| &r.node == n)
                || record.placement.controller.as_ref().is_some_and(|c| &c.node == n)
        });
        let label_ok = self
            .label
            .as_ref()
            .is_none_or(|(k, v)| record.spec.selector.get(k) == Some(v));
        phase_ok && node_ok && label_ok
    }
}

/// `GET /v1/volumes`.
pub async fn list(ctx: &ApiContext, filter: ListFilter) -> ApiResult<VolumeList> {
    let mut volumes = Vec::new();
    for record in all_volumes(&*ctx.store).await? {
        if filter.admits(&record) {
            volumes.push(view(&*ctx.store, record).await?);
        }
    }
    Ok(VolumeList { volumes })
}

/// `GET /v1/volumes/{name}`.
pub async fn inspect(ctx: &ApiContext, name: &VolumeName) -> ApiResult<VolumeView> {
    let record = load_volume(&*ctx.store, name).await?.value;
    view(&*ctx.store, record).await
}

/// `DELETE /v1/volumes/{name}`: phase Deleting (202); the agents stop the services and remove the data.
pub async fn delete(ctx: &ApiContext, name: &VolumeName) -> ApiResult<(StatusCode, VolumeView)> {
    let record = update_volume(&*ctx.store, name, |v| {
        if let Some(node) = &v.attached_to {
            return Err(ApiError::conflict(format!(
                "volume {:?} is attached to node {node}; detach it first (`basalt volume detach {}`)",
                name.as_str(),
                name.as_str()
            )));
        }
        let changed = v.phase != VolumePhase::Deleting;
        v.phase = VolumePhase::Deleting;
        Ok(changed)
    })
    .await?;
    tracing::info!(volume = %name, "volume marked for deletion");
    Ok((StatusCode::ACCEPTED, view(&*ctx.store, record).await?))
}

fn refuse_if_deleting(v: &VolumeRecord, what: &str) -> ApiResult<()> {
    if v.phase == VolumePhase::Deleting {
        return Err(ApiError::conflict(format!(
            "volume {:?} is being deleted; it cannot be {what}",
            v.spec.name.as_str()
        )));
    }
    Ok(())
}

/// `POST /v1/volumes/{name}/expand`: a larger size (202; the controller's agent grows the volume).
pub async fn expand(
    ctx: &ApiContext,
    name: &VolumeName,
    req: ExpandVolume,
) -> ApiResult<(StatusCode, VolumeView)> {
    let size = check_size("size_bytes", req.size_bytes)?;
    let store = &*ctx.store;
    let current = load_volume(store, name).await?.value;
    if size > current.spec.size_bytes {
        check_room_to_grow(store, &current, size).await?;
    }
    let mut grew = false;
    let record = update_volume(store, name, |v| {
        refuse_if_deleting(v, "expanded")?;
        if size < v.spec.size_bytes {
            return Err(ApiError::bad_request(format!(
                "volume {:?} is {} bytes; it cannot shrink to {size} (a volume only grows)",
                name.as_str(),
                v.spec.size_bytes
            )));
        }
        grew = size > v.spec.size_bytes;
        v.spec.size_bytes = size;
        Ok(grew)
    })
    .await?;
    let status = if grew {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, view(store, record).await?))
}

/// Refuse a growth that a replica's pool cannot hold (what placement gave out elsewhere counts).
async fn check_room_to_grow(store: &dyn Store, volume: &VolumeRecord, size: u64) -> ApiResult<()> {
    let others: Vec<VolumeRecord> = all_volumes(store)
        .await?
        .into_iter()
        .filter(|v| v.spec.name != volume.spec.name)
        .collect();
    let usage = placement::usage(&others);
    let nodes = node_views(store).await?;
    for slot in &volume.placement.replicas {
        let capacity = nodes
            .iter()
            .find(|n| n.record.name == slot.node)
            .and_then(|n| n.record.pools.iter().find(|p| p.name == slot.pool))
            .map(|p| p.capacity_bytes);
        let Some(capacity) = capacity else { continue };
        let used = usage
            .bytes
            .get(&(slot.node.clone(), slot.pool.clone()))
            .copied()
            .unwrap_or(0);
        if used.saturating_add(size) > capacity {
            return Err(ApiError::unplaceable(format!(
                "pool {:?} of node {} holds replica {} and has {} of {capacity} bytes left for it: {size} bytes do \
                 not fit; free space there or ask for less",
                slot.pool,
                slot.node,
                slot.id,
                capacity.saturating_sub(used)
            )));
        }
    }
    Ok(())
}

/// `POST /v1/volumes/{name}/attach`.
pub async fn attach(ctx: &ApiContext, name: &VolumeName, req: AttachVolume) -> ApiResult<VolumeView> {
    let node =
        parse_node_name(&req.node).map_err(|e| ApiError::bad_request(format!("node: {}", e.message)))?;
    if ctx.store.get(&keys::node(&node)).await?.is_none() {
        return Err(ApiError::bad_request(format!(
            "no node named {node:?} is registered; list them with GET /v1/nodes"
        )));
    }
    let record = update_volume(&*ctx.store, name, |v| {
        refuse_if_deleting(v, "attached")?;
        match &v.attached_to {
            Some(n) if *n == node => Ok(false),
            Some(n) => Err(ApiError::conflict(format!(
                "volume {:?} is attached to node {n}; detach it first to attach it to {node}",
                name.as_str()
            ))),
            None => {
                v.attached_to = Some(node.clone());
                Ok(true)
            }
        }
    })
    .await?;
    view(&*ctx.store, record).await
}

/// `POST /v1/volumes/{name}/detach` (detaching a detached volume is no error).
pub async fn detach(ctx: &ApiContext, name: &VolumeName) -> ApiResult<VolumeView> {
    let record = update_volume(&*ctx.store, name, |v| Ok(v.attached_to.take().is_some())).await?;
    view(&*ctx.store, record).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::views::Qos;
    use crate::model::{ControllerSlot, ReplicaSlot};
    use proptest::prelude::*;

    fn good() -> CreateVolume {
        CreateVolume {
            name: "vol-1".into(),
            size_bytes: Some(1 << 30),
            ..CreateVolume::default()
        }
    }

    #[test]
    fn a_create_request_is_checked_field_by_field() {
        let ok = check_create(good()).unwrap();
        assert_eq!(ok.replicas, DEFAULT_REPLICAS);
        assert_eq!(ok.spread_key, "zone");
        let cases: Vec<(CreateVolume, &str)> = vec![
            (
                CreateVolume {
                    name: "Bad".into(),
                    ..good()
                },
                "upper case",
            ),
            (
                CreateVolume {
                    size_bytes: Some(4097),
                    ..good()
                },
                "size_bytes must be",
            ),
            (
                CreateVolume {
                    size_bytes: None,
                    ..good()
                },
                "size_bytes is required",
            ),
            (
                CreateVolume {
                    replicas: Some(0),
                    ..good()
                },
                "replicas must be",
            ),
            (
                CreateVolume {
                    replicas: Some(17),
                    ..good()
                },
                "replicas must be",
            ),
            (
                CreateVolume {
                    min_healthy: Some(4),
                    ..good()
                },
                "min_healthy",
            ),
            (
                CreateVolume {
                    spread_key: Some(String::new()),
                    ..good()
                },
                "spread_key",
            ),
            (
                CreateVolume {
                    qos: Qos(QosSpec {
                        read_iops: Some(0),
                        ..QosSpec::default()
                    }),
                    ..good()
                },
                "qos.read_iops",
            ),
            (
                CreateVolume {
                    from_snapshot: Some("nosnap".into()),
                    ..good()
                },
                "VOLUME/SNAPSHOT",
            ),
            (
                CreateVolume {
                    from_snapshot: Some("v/.x".into()),
                    ..good()
                },
                "snapshot name",
            ),
        ];
        for (req, want) in cases {
            let e = check_create(req).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(want), "{want:?} not in {:?}", e.message);
        }
        let clone = check_create(CreateVolume {
            size_bytes: None,
            from_snapshot: Some("src/s1".into()),
            ..good()
        })
        .unwrap();
        assert_eq!(clone.source.unwrap().snapshot, "s1");
    }

    fn record(nodes: &[&str]) -> VolumeRecord {
        VolumeRecord {
            spec: VolumeSpec {
                name: VolumeName::new("v").unwrap(),
                uuid: Uuid::nil(),
                size_bytes: 4096,
                replicas: nodes.len() as u8,
                min_healthy: None,
                selector: [("zone".to_string(), "a".to_string())].into(),
                spread_key: "zone".into(),
                qos: QosSpec::default(),
                source: None,
                topology: Default::default(),
                access: Default::default(),
            },
            placement: Placement {
                next_replica_id: 0,
                retired: Vec::new(),
                replicas: nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| ReplicaSlot {
                        id: i as u32 + 1,
                        node: NodeName::new(n).unwrap(),
                        pool: "p".into(),
                        port: 100 + i as u16,
                    })
                    .collect(),
                controller: Some(ControllerSlot {
                    node: NodeName::new("c").unwrap(),
                    iscsi_port: 1,
                    api_port: 2,
                    generation: 1,
                }),
            },
            phase: VolumePhase::Ready,
            attached_to: None,
        }
    }

    #[test]
    fn replicas_on_one_node_are_warned_about() {
        let one_host = view_of(record(&["a", "a", "a"]), BTreeMap::new(), None);
        assert!(one_host.shared_failure_domain);
        assert_eq!(one_host.warnings.len(), 1);
        let spread = view_of(record(&["a", "b", "c"]), BTreeMap::new(), None);
        assert!(!spread.shared_failure_domain);
        assert!(spread.warnings.is_empty());
    }

    #[test]
    fn the_iscsi_url_names_the_portal_and_the_target() {
        let name = VolumeName::new("v1").unwrap();
        assert_eq!(
            iscsi_url("127.0.0.1:3260".parse().unwrap(), &name),
            "iscsi://127.0.0.1:3260/iqn.2026-11.io.basalt:v1/0"
        );
        assert_eq!(
            iscsi_url("[::1]:3260".parse().unwrap(), &name),
            "iscsi://[::1]:3260/iqn.2026-11.io.basalt:v1/0"
        );
    }

    #[test]
    fn list_filters_parse_and_refuse_what_they_do_not_know() {
        let q = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert_eq!(
            ListFilter::parse(&q("phase", "ready")).unwrap().phase,
            Some(VolumePhase::Ready)
        );
        assert!(ListFilter::parse(&q("phase", "gone"))
            .unwrap_err()
            .message
            .contains("creating, ready"));
        assert!(ListFilter::parse(&q("label", "=a")).is_err());
        assert!(ListFilter::parse(&q("colour", "red"))
            .unwrap_err()
            .message
            .contains("colour"));
        let f = ListFilter::parse(&q("label", "zone=a")).unwrap();
        assert!(f.admits(&record(&["a"])));
        let f = ListFilter::parse(&q("node", "c")).unwrap();
        assert!(f.admits(&record(&["a"])), "the controller's node counts");
        let f = ListFilter::parse(&q("node", "z")).unwrap();
        assert!(!f.admits(&record(&["a"])));
    }

    proptest! {
        #[test]
        fn only_multiples_of_the_block_size_are_sizes(size in any::<u64>()) {
            prop_assert_eq!(check_size("s", size).is_ok(), size != 0 && size.is_multiple_of(4096));
        }

        #[test]
        fn the_failure_domain_is_shared_exactly_when_a_node_repeats(nodes in proptest::collection::vec(0u8..4, 1..6)) {
            let names: Vec<String> = nodes.iter().map(|n| format!("n{n}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let distinct: BTreeSet<&u8> = nodes.iter().collect();
            prop_assert_eq!(shares_failure_domain(&record(&refs).placement), distinct.len() < nodes.len());
        }
    }
}
