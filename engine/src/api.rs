//! The controller's management API: `ControllerService` over gRPC (tonic),
//! served on `--api`. The CLI (`basalt volume info`, ...) is its client.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use basalt_proto::pb::controller as pb;
use basalt_proto::pb::controller::controller_service_server::{ControllerService, ControllerServiceServer};
use tonic::{Request, Response, Status};

use basalt_proto::pb::replica as rpb;
use basalt_target::iscsi::AllowList;
use prost::Message as _;

use crate::volume::core::{ControlOp, ReplicaMode, VolumeError};
use crate::volume::driver::{ChainDone, ChainError, ControlResults, RemoveError};
use crate::volume::qos::{Direction, Limit, LimitKind, QosChange, QosError, QosLimits};
use crate::volume::rebuild::Rebuilder;
use crate::volume::{ExpandError, Expansion, Volume};

/// Reports sessions logged in to the volume's iSCSI target.
pub type SessionCount = Arc<dyn Fn() -> usize + Send + Sync>;

/// The volume's iSCSI target, as far as the API changes who may log in to it.
pub trait InitiatorAccess: Send + Sync + 'static {
    fn allow_list(&self) -> AllowList;
    /// Replace who may log in; answers how many sessions it closed.
    fn set_allow(&self, allow: AllowList) -> usize;
}

impl InitiatorAccess for basalt_target::iscsi::portal::Target {
    fn allow_list(&self) -> AllowList {
        basalt_target::iscsi::portal::Target::allow_list(self)
    }
    fn set_allow(&self, allow: AllowList) -> usize {
        basalt_target::iscsi::portal::Target::set_allow(self, allow)
    }
}

pub struct Api {
    volume: Volume,
    iqn: String,
    sessions: SessionCount,
    rebuilder: Arc<Rebuilder>,
    access: Option<Arc<dyn InitiatorAccess>>,
}

impl Api {
    pub fn new(
        volume: Volume,
        iqn: String,
        sessions: SessionCount,
        rebuilder: Arc<Rebuilder>,
    ) -> ControllerServiceServer<Api> {
        Api::serving_target(volume, iqn, sessions, rebuilder, None)
    }

    /// The API of a controller whose target's allow-list it may change (`TargetSetAllowList`).
    pub fn serving_target(
        volume: Volume,
        iqn: String,
        sessions: SessionCount,
        rebuilder: Arc<Rebuilder>,
        access: Option<Arc<dyn InitiatorAccess>>,
    ) -> ControllerServiceServer<Api> {
        ControllerServiceServer::new(Api {
            volume,
            iqn,
            rebuilder,
            sessions,
            access,
        })
    }
}

/// An allow-list request checked: every name a valid iSCSI name, `any` alone.
pub fn allow_list(req: &pb::TargetAllowListRequest) -> Result<AllowList, Status> {
    if req.any {
        if !req.initiators.is_empty() {
            return Err(Status::invalid_argument(
                "any and initiators exclude each other: send any=true alone, or the initiator names alone",
            ));
        }
        return Ok(AllowList::Any);
    }
    for name in &req.initiators {
        let valid = ["iqn.", "eui.", "naa."].iter().any(|p| name.starts_with(p))
            && name.len() <= 223
            && !name.contains(|c: char| c.is_whitespace() || c == '\0' || c == ',');
        if !valid {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not an iSCSI initiator name (iqn., eui. or naa., at most 223 characters, no spaces)"
            )));
        }
    }
    Ok(AllowList::Only(req.initiators.clone()))
}

/// Snapshot names travel to every replica and name files there: keep them
/// to a safe, portable alphabet.
fn check_snapshot_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid snapshot name {name:?}: use 1-128 characters from A-Z a-z 0-9 - _ . (not starting with '.')"
        )))
    }
}

fn volume_status(e: VolumeError) -> Status {
    Status::unavailable(e.to_string())
}

/// The status code of a refused expansion: a size that can never work is an
/// invalid argument; replicas that cannot hold it, or none to ask, a failed
/// precondition; a volume that could not run it, unavailable.
fn expand_status(e: ExpandError) -> Status {
    let message = e.to_string();
    match e {
        ExpandError::Unaligned { .. } | ExpandError::Shrink { .. } | ExpandError::TooLarge { .. } => {
            Status::invalid_argument(message)
        }
        ExpandError::Refused { .. } | ExpandError::NoReplica => Status::failed_precondition(message),
        ExpandError::Volume(_) | ExpandError::NoneGrew { .. } => Status::unavailable(message),
    }
}

fn chain_status(e: ChainError) -> Status {
    match e {
        ChainError::Volume(e) => volume_status(e),
        e => Status::failed_precondition(e.to_string()),
    }
}

impl Api {
    /// Run a chain-changing operation (`change`, a `Volume::snapshot_*`
    /// call) while no rebuild looks at the chain. What a replica that fails
    /// it means is the volume's decision, taken in its owner task.
    async fn chain_op(
        &self,
        what: &str,
        change: impl std::future::Future<Output = Result<ChainDone, ChainError>>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        // Held until the operation is done: no rebuild looks at a chain
        // while it changes.
        let _chain = match self.rebuilder.reserve_chain().await {
            Ok(guard) => guard,
            Err(rebuilding) => {
                let addrs = self.addresses().await?;
                let addrs: Vec<&str> = rebuilding
                    .iter()
                    .filter_map(|&i| addrs.get(i).map(String::as_str))
                    .collect();
                return Err(Status::failed_precondition(format!(
                    "a rebuild is running (replicas: {}); a rebuild copies the snapshot chain as it is, so {what} \
                     must wait until it is done (see `basalt volume info`)",
                    addrs.join(", ")
                )));
            }
        };
        let done = change.await.map_err(chain_status)?;
        Ok(Response::new(pb::SnapshotReply {
            dropped: done.dropped,
        }))
    }

    /// Replica addresses by index (the list grows when replicas are added).
    async fn addresses(&self) -> Result<Vec<String>, Status> {
        let status = self
            .volume
            .status()
            .await
            .ok_or_else(|| Status::unavailable("the volume is shutting down"))?;
        Ok(status.replicas.into_iter().map(|r| r.address).collect())
    }

    /// Every active replica's chain (decoded), by replica index.
    async fn chains(&self) -> Result<Vec<(usize, Result<Vec<rpb::SnapshotInfo>, String>)>, Status> {
        let results: ControlResults = self
            .volume
            .control(ControlOp::SnapshotList)
            .await
            .map_err(volume_status)?;
        Ok(results
            .into_iter()
            .map(|(c, r)| {
                let chain = r.and_then(|bytes| {
                    rpb::SnapshotList::decode(bytes)
                        .map(|l| l.snapshots)
                        .map_err(|e| format!("undecodable snapshot list: {e}"))
                });
                (c, chain)
            })
            .collect())
    }
}

impl Api {
    /// Every hold on the volume's snapshots, merged across replicas.
    async fn holds(&self) -> Result<Vec<pb::SnapshotHoldInfo>, Status> {
        let results = self
            .volume
            .control(ControlOp::HoldList)
            .await
            .map_err(volume_status)?;
        let addrs = self.addresses().await?;
        let mut holds: Vec<pb::SnapshotHoldInfo> = Vec::new();
        for (c, result) in results {
            let list = result
                .and_then(|bytes| {
                    rpb::HoldList::decode(bytes).map_err(|e| format!("undecodable hold list: {e}"))
                })
                .map_err(|e| Status::unavailable(format!("{} did not list its holds: {e}", addrs[c])))?;
            for hold in list.holds {
                let known = holds
                    .iter_mut()
                    .find(|h| h.snapshot == hold.snapshot && h.holder == hold.holder);
                match known {
                    Some(h) => h.replicas.push(addrs[c].clone()),
                    None => holds.push(pb::SnapshotHoldInfo {
                        snapshot: hold.snapshot,
                        holder: hold.holder,
                        since_unix: hold.since_unix,
                        replicas: vec![addrs[c].clone()],
                    }),
                }
            }
        }
        Ok(holds)
    }

    /// Refuses, naming the clones, if any of `names` is held: it would be `what` (the check runs
    /// before any replica is asked, so a refused operation changes nothing anywhere).
    async fn refuse_if_held(&self, names: &[String], what: &str) -> Result<(), Status> {
        let holds = self.holds().await?;
        let held: Vec<String> = holds
            .iter()
            .filter(|h| names.contains(&h.snapshot))
            .map(|h| format!("{} by {:?}", h.snapshot, h.holder))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "a clone still reads {} and it would be {what}: wait until the clone is hydrated (`basalt volume \
             info` on the clone), or if the clone was abandoned release its hold with `basalt snapshot release \
             NAME --holder HOLDER`; nothing was changed",
            held.join(", ")
        )))
    }

    /// Each replica's clone status (by replica index), for those that are clones and answered.
    async fn clone_statuses(&self) -> std::collections::BTreeMap<usize, rpb::CloneStatus> {
        let Ok(results) = self.volume.control(ControlOp::Info).await else {
            return Default::default();
        };
        results
            .into_iter()
            .filter_map(|(c, r)| {
                let info = rpb::ReplicaInfo::decode(r.ok()?).ok()?;
                Some((c, info.clone?))
            })
            .collect()
    }
}

/// A chain's shape, for comparing replicas: names and parents in order.
fn shape(chain: &[rpb::SnapshotInfo]) -> Vec<(&str, &str)> {
    chain
        .iter()
        .map(|s| (s.name.as_str(), s.parent.as_str()))
        .collect()
}

#[tonic::async_trait]
impl ControllerService for Api {
    async fn target_set_allow_list(
        &self,
        request: Request<pb::TargetAllowListRequest>,
    ) -> Result<Response<pb::TargetAllowListReply>, Status> {
        let list = allow_list(request.get_ref())?;
        let access = self.access.as_ref().ok_or_else(|| {
            Status::failed_precondition("this controller's target allow-list cannot be changed at run time")
        })?;
        let closed = access.set_allow(list.clone());
        tracing::info!(target_name = %self.iqn, allow = ?list, closed, "initiator allow-list replaced");
        Ok(Response::new(pb::TargetAllowListReply {
            sessions_closed: closed as u32,
        }))
    }

    async fn replica_add(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> Result<Response<pb::ReplicaReply>, Status> {
        let address = request.into_inner().address;
        if address.is_empty() || !address.contains(':') {
            return Err(Status::invalid_argument(format!(
                "{address:?} is not a replica address: use host:port (the replica's --listen)"
            )));
        }
        let index = self
            .volume
            .add_replica(address.clone())
            .await
            .map_err(volume_status)?;
        self.rebuilder.unforget(&address);
        let status = self
            .volume
            .status()
            .await
            .ok_or_else(|| Status::unavailable("the volume is shutting down"))?;
        match &status.replicas[index].mode {
            ReplicaMode::ReadWrite => {
                return Err(Status::already_exists(format!(
                    "replica {address} is already RW in this volume"
                )))
            }
            ReplicaMode::WriteOnly => {
                return Ok(Response::new(pb::ReplicaReply {
                    message: format!("replica {address} is already being rebuilt"),
                }))
            }
            ReplicaMode::Error { .. } => {}
        }
        self.record_membership(&format!("replica add {address}")).await?;
        self.rebuilder.start(&self.volume, index, address.clone());
        Ok(Response::new(pb::ReplicaReply {
            message: format!("replica {address} added; rebuilding (watch with `basalt volume info --watch`)"),
        }))
    }

    async fn replica_remove(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> Result<Response<pb::ReplicaReply>, Status> {
        let address = request.into_inner().address;
        // Forgotten first, so that the rebuilder does not bring it back the
        // moment it is dropped; remembered again if it stays.
        self.rebuilder.forget(&address);
        if let Err(e) = self.volume.remove_replica(address.clone()).await {
            self.rebuilder.unforget(&address);
            return Err(match e {
                RemoveError::NotFound { .. } => Status::not_found(e.to_string()),
                RemoveError::WouldDegrade { .. } => Status::failed_precondition(e.to_string()),
                RemoveError::Volume(e) => volume_status(e),
            });
        }
        self.record_membership(&format!("replica rm {address}")).await?;
        Ok(Response::new(pb::ReplicaReply {
            message: format!("replica {address} removed from the volume"),
        }))
    }

    async fn snapshot_create(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let name = request.into_inner().name;
        check_snapshot_name(&name)?;
        let reply = self
            .chain_op("snapshot create", self.volume.snapshot_create(name.clone()))
            .await?;
        tracing::info!(snapshot = %name, "snapshot created");
        Ok(reply)
    }

    async fn snapshot_list(
        &self,
        _: Request<pb::SnapshotListRequest>,
    ) -> Result<Response<pb::SnapshotListReply>, Status> {
        let chains = self.chains().await?;
        let addrs = self.addresses().await?;
        let Some(reference) = chains.iter().find_map(|(_, c)| c.as_ref().ok()) else {
            return Err(Status::unavailable("no replica answered the snapshot list"));
        };
        let mut divergent = Vec::new();
        for (c, chain) in &chains {
            match chain {
                Ok(chain) if shape(chain) == shape(reference) => {}
                Ok(chain) => divergent.push(format!(
                    "{} holds a different chain: [{}]",
                    addrs[*c],
                    chain
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Err(e) => divergent.push(format!("{} did not list its snapshots: {e}", addrs[*c])),
            }
        }
        let snapshots = reference
            .iter()
            .map(|s| pb::Snapshot {
                name: s.name.clone(),
                created_unix: s.created_unix,
                parent: s.parent.clone(),
                allocated_bytes: s.allocated_bytes,
            })
            .collect();
        Ok(Response::new(pb::SnapshotListReply { snapshots, divergent }))
    }

    async fn snapshot_delete(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let name = request.into_inner().name;
        check_snapshot_name(&name)?;
        self.refuse_if_held(std::slice::from_ref(&name), "deleted")
            .await?;
        let reply = self
            .chain_op("snapshot delete", self.volume.snapshot_delete(name.clone()))
            .await?;
        tracing::info!(snapshot = %name, "snapshot deleted (merged into its child)");
        Ok(reply)
    }

    async fn snapshot_revert(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let name = request.into_inner().name;
        check_snapshot_name(&name)?;
        let sessions = (self.sessions)();
        if sessions > 0 {
            return Err(Status::failed_precondition(format!(
                "{sessions} initiator session(s) are logged in to {}: a revert changes the data under them. \
                 Log them out (unmount and log out of the target) and try again",
                self.iqn
            )));
        }
        // All or none: check every replica holds the snapshot before any
        // replica discards anything.
        let addrs = self.addresses().await?;
        let mut newer = Vec::new();
        for (c, chain) in self.chains().await? {
            let chain = chain
                .map_err(|e| Status::unavailable(format!("{} did not list its snapshots: {e}", addrs[c])))?;
            let Some(i) = chain.iter().position(|s| s.name == name) else {
                return Err(Status::not_found(format!(
                    "no snapshot {name:?} on replica {}; nothing was reverted",
                    addrs[c]
                )));
            };
            newer.extend(chain[i + 1..].iter().map(|s| s.name.clone()));
        }
        // The snapshots after it go: none may be held by a clone.
        self.refuse_if_held(&newer, "dropped by a revert").await?;
        let reply = self
            .chain_op("snapshot revert", self.volume.snapshot_revert(name.clone()))
            .await?;
        tracing::warn!(snapshot = %name, "volume reverted: later snapshots and writes discarded");
        Ok(reply)
    }

    async fn volume_info(
        &self,
        _: Request<pb::VolumeInfoRequest>,
    ) -> Result<Response<pb::VolumeInfoReply>, Status> {
        let status = self
            .volume
            .status()
            .await
            .ok_or_else(|| Status::unavailable("the volume is shutting down"))?;
        let spec = self.volume.spec();
        let m = &self.volume.metrics;
        let progress = |i: usize| self.rebuilder.progress(i);
        let clones = self.clone_statuses().await;
        let clone_of = |i: usize| clones.get(&i);
        let replicas = status
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| pb::ReplicaStatus {
                address: r.address.clone(),
                mode: r.mode.label().to_string(),
                cause: match &r.mode {
                    ReplicaMode::Error { cause } => cause.clone(),
                    _ => String::new(),
                },
                revision: r.revision,
                outstanding: r.outstanding as u32,
                errors: m.replica_errors.with_label_values(&[&r.address]).get(),
                rebuild_done_bytes: progress(i).map(|p| p.done.load(Ordering::Relaxed)).unwrap_or(0),
                rebuild_total_bytes: progress(i).map(|p| p.total.load(Ordering::Relaxed)).unwrap_or(0),
                rebuild_rate: progress(i).map(|p| p.rate()).unwrap_or(0.0),
                rebuild_delta: progress(i)
                    .map(|p| p.delta.load(Ordering::Relaxed))
                    .unwrap_or(false),
                removed: self.rebuilder.is_forgotten(&r.address),
                hydrated_bytes: clone_of(i).map_or(0, |c| c.hydrated_bytes),
                hydrate_total_bytes: clone_of(i).map_or(0, |c| c.total_bytes),
            })
            .collect();
        let io = pb::IoCounters {
            reads: m.counter(&m.ops, "read"),
            writes: m.counter(&m.ops, "write"),
            flushes: m.counter(&m.ops, "flush"),
            unmaps: m.counter(&m.ops, "unmap"),
            bytes_read: m.counter(&m.bytes, "read"),
            bytes_written: m.counter(&m.bytes, "write"),
            errors: ["read", "write", "flush", "unmap"]
                .iter()
                .map(|op| m.counter(&m.errors, op))
                .sum(),
            in_flight: status.in_flight as u32,
        };
        let state = if status.healthy >= status.min_healthy {
            "serving"
        } else {
            "degraded"
        };
        let allowed = self.access.as_ref().map(|a| a.allow_list());
        Ok(Response::new(pb::VolumeInfoReply {
            name: spec.name.to_string(),
            iqn: self.iqn.clone(),
            volume_uuid: spec.volume.0.as_bytes().to_vec(),
            size_bytes: status.size_bytes,
            epoch: spec.epoch.0,
            state: state.to_string(),
            min_healthy: status.min_healthy as u32,
            replicas,
            io: Some(io),
            sessions: (self.sessions)() as u32,
            clone_of: clones
                .values()
                .next()
                .map(|c| {
                    format!(
                        "snapshot {} of volume {}",
                        c.snapshot,
                        uuid::Uuid::from_slice(&c.source_volume_uuid).unwrap_or_default()
                    )
                })
                .unwrap_or_default(),
            // Every replica that answered is hydrated, and one that did not (or is not RW) is not
            // counted as one: a rebuild brings it the clone's whole view anyway.
            hydrated: clones.values().all(|c| c.hydrated),
            qos: self.volume.qos().await.map(|l| qos_to_pb(&l)),
            qos_stats: Some(qos_stats(m)),
            allow_restricted: matches!(allowed, Some(AllowList::Only(_))),
            allowed_initiators: match allowed {
                Some(AllowList::Only(names)) => names,
                _ => Vec::new(),
            },
        }))
    }

    async fn snapshot_holds(
        &self,
        _: Request<pb::SnapshotHoldsRequest>,
    ) -> Result<Response<pb::SnapshotHoldsReply>, Status> {
        Ok(Response::new(pb::SnapshotHoldsReply {
            holds: self.holds().await?,
        }))
    }

    async fn snapshot_release(
        &self,
        request: Request<pb::SnapshotReleaseRequest>,
    ) -> Result<Response<pb::SnapshotReleaseReply>, Status> {
        let pb::SnapshotReleaseRequest { name, holder } = request.into_inner();
        check_snapshot_name(&name)?;
        let known = self.holds().await?;
        if !known.iter().any(|h| h.snapshot == name && h.holder == holder) {
            return Err(Status::not_found(format!(
                "no hold by {holder:?} on snapshot {name:?}; `basalt snapshot holds` lists them"
            )));
        }
        let op = ControlOp::SnapshotRelease {
            name: name.clone(),
            holder: holder.clone(),
        };
        let results = self.volume.control(op).await.map_err(volume_status)?;
        let addrs = self.addresses().await?;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|(c, r)| r.as_ref().err().map(|e| format!("{}: {e}", addrs[*c])))
            .collect();
        if !failed.is_empty() {
            // Nothing to drop: a release changes no chain. The hold stays where it failed.
            return Err(Status::unavailable(format!(
                "the hold was not released everywhere ({}); retry",
                failed.join("; ")
            )));
        }
        tracing::warn!(snapshot = %name, %holder, "hold released by hand: that clone can no longer read this snapshot");
        Ok(Response::new(pb::SnapshotReleaseReply {
            message: format!(
                "released {holder:?}'s hold on {name:?}; if that clone is not hydrated, it can no longer be"
            ),
        }))
    }

    async fn volume_set_qos(
        &self,
        request: Request<pb::VolumeSetQosRequest>,
    ) -> Result<Response<pb::VolumeSetQosReply>, Status> {
        let request = request.into_inner();
        // Every limit is checked before anything changes.
        let set = qos_from_pb(&request.limits.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(format!("limits.{}: {e}", e.kind().key())))?;
        let limits = self
            .volume
            .set_qos(QosChange {
                clear: request.clear,
                set,
            })
            .await
            .map_err(volume_status)?;
        Ok(Response::new(pb::VolumeSetQosReply {
            limits: Some(qos_to_pb(&limits)),
        }))
    }
    async fn volume_expand(
        &self,
        request: Request<pb::VolumeExpandRequest>,
    ) -> Result<Response<pb::VolumeExpandReply>, Status> {
        let requested = request.into_inner().new_size_bytes;
        let expansion = self.volume.expand(requested).await.map_err(expand_status)?;
        let reply = match expansion {
            Expansion::Unchanged { size_bytes } => pb::VolumeExpandReply {
                size_bytes,
                changed: false,
                dropped: Vec::new(),
                message: format!("the volume already holds {size_bytes} bytes; nothing to do"),
            },
            Expansion::Grown { from, to, dropped } => {
                let message = if dropped.is_empty() {
                    format!("expanded from {from} to {to} bytes on every replica")
                } else {
                    format!(
                        "expanded from {from} to {to} bytes; dropped (grown when rebuilt): {}",
                        dropped
                            .iter()
                            .map(|(a, why)| format!("{a} ({why})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                pb::VolumeExpandReply {
                    size_bytes: to,
                    changed: true,
                    dropped: dropped.into_iter().map(|(a, _)| a).collect(),
                    message,
                }
            }
        };
        Ok(Response::new(reply))
    }
}

/// One limit's field in the API's message.
fn qos_field(limits: &mut pb::QosLimits, kind: LimitKind) -> &mut Option<pb::QosLimit> {
    match kind {
        LimitKind::ReadIops => &mut limits.read_iops,
        LimitKind::WriteIops => &mut limits.write_iops,
        LimitKind::Iops => &mut limits.iops,
        LimitKind::ReadBps => &mut limits.read_bps,
        LimitKind::WriteBps => &mut limits.write_bps,
        LimitKind::Bps => &mut limits.bps,
    }
}

/// Limits as the API carries them.
pub fn qos_to_pb(limits: &QosLimits) -> pb::QosLimits {
    let mut out = pb::QosLimits::default();
    for (kind, l) in limits.iter() {
        *qos_field(&mut out, kind) = Some(pb::QosLimit {
            rate: l.rate(),
            burst: l.burst(),
        });
    }
    out
}

/// Limits from the API, each checked (a burst of 0 is the default burst);
/// the first bad one is refused.
pub fn qos_from_pb(limits: &pb::QosLimits) -> Result<QosLimits, QosError> {
    let mut source = *limits;
    let mut out = QosLimits::default();
    for kind in LimitKind::ALL {
        if let Some(l) = qos_field(&mut source, kind).take() {
            let burst = (l.burst != 0).then_some(l.burst);
            out.set(kind, Some(Limit::new(kind, l.rate, burst)?));
        }
    }
    Ok(out)
}

fn qos_stats(m: &crate::volume::metrics::VolumeMetrics) -> pb::QosStats {
    pb::QosStats {
        read_throttled_seconds: m.throttled_seconds(Direction::Read),
        write_throttled_seconds: m.throttled_seconds(Direction::Write),
        read_waiting: m.qos_waiting(Direction::Read),
        write_waiting: m.qos_waiting(Direction::Write),
    }
}

impl Api {
    /// Records the volume's members (every replica it knows and was not removed) on every active
    /// replica, durably, under the next membership generation: a controller started later with a stale
    /// `--replica` list follows it (see `crate::controller`). Fails unless at least `min_healthy`
    /// replicas recorded it -- a majority, of which any later majority holds at least one -- so that a
    /// change the API acknowledges is one a restarted controller finds.
    async fn record_membership(&self, change: &str) -> Result<(), Status> {
        let mut generation = self.volume.membership.lock().await;
        let status = self
            .volume
            .status()
            .await
            .ok_or_else(|| Status::unavailable("the volume is shutting down"))?;
        let members: Vec<String> = status
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .filter(|a| !self.rebuilder.is_forgotten(a))
            .collect();
        let next = *generation + 1;
        let membership = rpb::Membership {
            generation: next,
            members: members.clone(),
            epoch: self.volume.spec().epoch.0,
        };
        let results = self
            .volume
            .control(ControlOp::SetMembership(membership))
            .await
            .map_err(volume_status)?;
        let recorded = results.iter().filter(|(_, r)| r.is_ok()).count();
        for (c, e) in results
            .iter()
            .filter_map(|(c, r)| r.as_ref().err().map(|e| (c, e)))
        {
            let addr = status.replicas.get(*c).map(|r| r.address.as_str()).unwrap_or("?");
            tracing::warn!(replica = %addr, error = %e, "replica did not record the new membership");
        }
        if recorded == 0 || recorded < status.min_healthy {
            return Err(Status::unavailable(format!(
                "{change}: the new membership was recorded by {recorded} replicas, fewer than min-healthy ({}); \
                 a restarted controller might not follow it. Bring replicas back and repeat the command",
                status.min_healthy
            )));
        }
        *generation = next;
        tracing::info!(generation = next, members = %members.join(", "), %change, "membership recorded");
        Ok(())
    }
}
