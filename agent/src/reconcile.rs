//! Making this host's services match the store.
//!
//! One reconciler runs per agent. Each *pass* reads everything it decides
//! from, decides with a pure function, then acts:
//!
//! ```text
//!   store: volumes, nodes, statuses ─┐
//!   runtime: services it runs ───────┼─► plan(me, desired, seen) ─► [Action] ─► execute
//!   controllers here: VolumeInfo ────┘
//! ```
//!
//! A pass runs when a volume record changes (a watch on
//! [`keys::VOLUMES`]; after a watch error the reconciler lists again and
//! watches from the revision of that list) and every [`PASS_INTERVAL`]
//! anyway, which notices services that died and controllers whose view
//! changed. Every action is idempotent, so a pass interrupted at any line
//! (the agent killed) is simply redone by the next agent.
//!
//! What [`plan`] decides, for each volume record:
//! * the replica slots and the controller slot on this node run, with
//!   their secrets in 0600 files under `DATA_DIR/secrets/VOLUME/`;
//! * the status of each is written (only when it changed);
//! * on the controller's node: the volume's lease ([`keys::volume_lease`])
//!   is taken before the controller starts (and the controller is not
//!   started while another node holds it); phase `Creating` → `Ready` once
//!   the controller answers `VolumeInfo`; `Ready` ↔ `Degraded` from its view
//!   of its replicas, which is written into the controller's status (each
//!   replica's mode, rebuild and hydration progress); replicas the placement
//!   gained or lost are added or removed through the controller's API
//!   ([`membership`]); a larger `spec.size_bytes` is applied with
//!   `VolumeExpand`; other QoS limits with `VolumeSetQos`;
//! * a volume lease this node holds for a controller it no longer runs is
//!   given back once that controller stopped;
//! * the data of a replica this node no longer holds (replaced while the
//!   node was down, or moved by a drain) is deleted once the volume is whole
//!   without it ([`retired`]);
//! * phase `Deleting`: this node's services stop, its replicas' data
//!   directories (or block devices' store metadata) and its statuses are
//!   deleted, then it takes its parts out of the placement (its
//!   confirmation, revision checked); once no node holds a part, the record,
//!   its secrets and any status left are deleted. A node that is down keeps
//!   its parts until its agent returns ([`deletion_step`]);
//! * a service of a volume that has no record, or that its record no longer
//!   places here, stops (its data is kept: only a `Deleting` record says the
//!   data is no longer wanted).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use basalt_engine::api_auth::{ApiToken, WithToken};
use basalt_engine::name::VolumeName;
use basalt_proto::pb::controller as pb;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::AgentMetrics;
use crate::model::{
    keys, ControllerReport, Liveness, NodeDown, NodeName, NodeRecord, PoolKind, Progress, QosSpec,
    ReplicaMode, ReportedReplica, ServiceId, ServiceState, ServiceStatus, VolumeLease, VolumePhase,
    VolumeRecord, VolumeSecrets,
};
use crate::runtime::{
    CloneSource, ControllerSpec, Observed, ReplicaSpec, ReplicaStorage, Runtime, ServiceKey, ServiceSpec,
};
use crate::store::{self, Expect, LeaseId, Store, StoreError, Versioned};

pub mod membership;
pub mod retired;

use membership::ViewedReplica;
use retired::FoundReplica;

/// How often a pass runs without a change in the store: how soon a dead
/// service's status, a degraded volume or a finished rebuild shows.
pub const PASS_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait for a controller's management API in a pass: a controller
/// that does not answer within it is reported as not serving, and the pass
/// goes on with the other volumes.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(3);
/// Wait before watching again after a watch failed (the store restarting).
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// How long an expansion may take: every replica grows durably first.
const EXPAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where this node keeps its per-volume files.
#[derive(Clone, Debug)]
pub struct Local {
    pub me: NodeName,
    /// The agent's data directory (secrets files, service logs).
    pub data_dir: PathBuf,
}

impl Local {
    fn secrets_dir(&self, volume: &VolumeName) -> PathBuf {
        self.data_dir.join("secrets").join(volume.as_str())
    }
    pub fn peer_secret_file(&self, volume: &VolumeName) -> PathBuf {
        self.secrets_dir(volume).join("peer-secret")
    }
    pub fn api_token_file(&self, volume: &VolumeName) -> PathBuf {
        self.secrets_dir(volume).join("api-token")
    }
}

/// What the store holds, as read at the start of a pass.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub volumes: BTreeMap<VolumeName, Versioned<VolumeRecord>>,
    pub nodes: BTreeMap<NodeName, NodeRecord>,
    /// Nodes whose liveness key holds their [`crate::model::NodeAlive`].
    pub up: BTreeSet<NodeName>,
    /// Down nodes an agent marked ([`NodeDown`]): since when (unix seconds).
    /// A registered node in neither `up` nor here is down and not marked yet
    /// ([`unmarked_down`]).
    pub down_since: BTreeMap<NodeName, u64>,
    /// Replica statuses carry the mode and progress their controller
    /// reported ([`ServiceStatus::with_report`]).
    pub statuses: BTreeMap<(VolumeName, ServiceId), ServiceStatus>,
    /// Who holds each volume's controller lease.
    pub leases: BTreeMap<VolumeName, Versioned<VolumeLease>>,
}

impl Desired {
    /// The statuses of `volume`'s services.
    pub fn statuses_of(&self, volume: &VolumeName) -> BTreeMap<ServiceId, ServiceStatus> {
        self.statuses
            .range((volume.clone(), ServiceId::Replica(0))..)
            .take_while(|((v, _), _)| v == volume)
            .map(|((_, s), st)| (s.clone(), st.clone()))
            .collect()
    }

    /// `HOST:PORT` of a replica slot, as its controller is given it.
    fn replica_address(&self, slot: &crate::model::ReplicaSlot) -> Option<String> {
        self.nodes
            .get(&slot.node)
            .map(|n| SocketAddr::new(n.address, slot.port).to_string())
    }
}

/// What this node sees of its services.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub services: BTreeMap<ServiceKey, Observed>,
    /// The controllers on this node that answered `VolumeInfo`.
    pub controllers: BTreeMap<VolumeName, ControllerView>,
    /// Replica directories in this node's directory pools.
    pub replica_dirs: Vec<FoundReplica>,
}

/// A controller's answer to `VolumeInfo`, as far as decisions go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerView {
    pub size_bytes: u64,
    /// At least `min_healthy` replicas are read-write: I/O is served.
    pub serving: bool,
    /// Replicas in read-write mode (not removed).
    pub rw_replicas: usize,
    pub qos: QosSpec,
    pub epoch: u64,
    /// Every replica it knows, removed ones included.
    pub replicas: Vec<ViewedReplica>,
    /// The initiators its target lets in (lower case, sorted); `None`: any.
    pub allowed: Option<Vec<String>>,
}

/// One step of a pass. Actions of one volume run in order; the first that
/// fails skips the volume's remaining ones until the next pass.
// A pass makes a handful of actions that live for the pass: their size does
// not matter, and unboxed specs keep the tests' patterns plain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the secrets of `secrets_of` to their files, then make the
    /// service run as `spec`.
    Ensure {
        key: ServiceKey,
        spec: ServiceSpec,
        secrets_of: Vec<VolumeName>,
    },
    Stop {
        key: ServiceKey,
    },
    /// Delete a replica's data directory (its volume is being deleted).
    RemoveData {
        volume: VolumeName,
        path: PathBuf,
    },
    /// Wipe a replica's block device (its volume is being deleted): the
    /// store's metadata zeroed, so that no later replica reads the old data
    /// or takes the device for a store.
    WipeDevice {
        volume: VolumeName,
        device: PathBuf,
    },
    /// Take this node's parts out of a deleting volume's placement (revision
    /// checked): this node's confirmation that it removed them.
    ReleaseParts {
        volume: VolumeName,
        revision: store::Revision,
    },
    WriteStatus {
        volume: VolumeName,
        service: ServiceId,
        status: ServiceStatus,
    },
    DeleteStatus {
        volume: VolumeName,
        service: ServiceId,
    },
    SetPhase {
        volume: VolumeName,
        revision: store::Revision,
        phase: VolumePhase,
    },
    Expand {
        volume: VolumeName,
        size_bytes: u64,
    },
    SetQos {
        volume: VolumeName,
        qos: QosSpec,
    },
    /// Replace the initiators its target lets in (`None`: any).
    SetAllowList {
        volume: VolumeName,
        allowed: Option<Vec<String>>,
    },
    RemoveSecretFiles {
        volume: VolumeName,
    },
    /// Take (or renew for a new generation) the volume's controller lease
    /// with this node's lease.
    TakeLease {
        volume: VolumeName,
        generation: u64,
        expect: Expect,
    },
    /// Give back the volume's controller lease (its controller stopped here).
    ReleaseLease {
        volume: VolumeName,
        revision: store::Revision,
    },
    /// `ReplicaAdd` on this node's controller of `volume`.
    ReplicaAdd {
        volume: VolumeName,
        address: String,
    },
    /// `ReplicaRemove` on this node's controller of `volume`.
    ReplicaRemove {
        volume: VolumeName,
        address: String,
    },
    /// Delete the record (revision checked) and then its secrets.
    DeleteVolume {
        volume: VolumeName,
        revision: store::Revision,
    },
}

impl Action {
    pub fn volume(&self) -> &VolumeName {
        match self {
            Action::Ensure { key, .. } | Action::Stop { key } => &key.volume,
            Action::RemoveData { volume, .. }
            | Action::WipeDevice { volume, .. }
            | Action::ReleaseParts { volume, .. }
            | Action::WriteStatus { volume, .. }
            | Action::DeleteStatus { volume, .. }
            | Action::SetPhase { volume, .. }
            | Action::Expand { volume, .. }
            | Action::SetQos { volume, .. }
            | Action::SetAllowList { volume, .. }
            | Action::RemoveSecretFiles { volume }
            | Action::TakeLease { volume, .. }
            | Action::ReleaseLease { volume, .. }
            | Action::ReplicaAdd { volume, .. }
            | Action::ReplicaRemove { volume, .. }
            | Action::DeleteVolume { volume, .. } => volume,
        }
    }
}

/// The data directory of replica `id` of the volume with `uuid` in a
/// directory pool: `POOL/UUID/replica-ID`. The UUID (not the name) keeps a
/// new volume that reuses a deleted one's name apart from its leftovers.
pub fn replica_dir(pool: &Path, uuid: &uuid::Uuid, id: u32) -> PathBuf {
    pool.join(uuid.to_string()).join(format!("replica-{id}"))
}

/// Decides one pass (see the module docs). Pure: everything it looks at is
/// in its arguments.
pub fn plan(local: &Local, desired: &Desired, seen: &Seen, now_unix: u64) -> Vec<Action> {
    let me = &local.me;
    let mut actions = Vec::new();
    let mut wanted: BTreeSet<ServiceKey> = BTreeSet::new();

    for (name, rec) in &desired.volumes {
        let v = &rec.value;
        let mine: Vec<ServiceId> = my_services(v, me);
        if v.phase == VolumePhase::Deleting {
            plan_deletion(local, desired, seen, name, rec, &mine, &mut actions);
            continue;
        }
        for service in &mine {
            let key = ServiceKey {
                volume: name.clone(),
                service: service.clone(),
            };
            let stored = desired.statuses.get(&(name.clone(), service.clone()));
            if *service == ServiceId::Controller {
                if let Err(holder) = plan_lease(local, desired, v, &mut actions) {
                    // Not ours to run yet: another node's controller may still
                    // serve, and two must never run at once.
                    let status = ServiceStatus {
                        node: me.clone(),
                        state: ServiceState::Starting,
                        message: Some(format!(
                            "waiting for node {holder} to give up the volume's controller lease (it lapses \
                             with that node's own lease)"
                        )),
                        restarts: 0,
                        updated_unix: now_unix,
                        mode: None,
                        rebuild: None,
                        hydration: None,
                        report: None,
                    };
                    push_status(&mut actions, name, service, stored, status);
                    continue;
                }
            }
            wanted.insert(key.clone());
            let built = service_spec(local, desired, seen, v, service);
            match built {
                Ok((spec, secrets_of)) => {
                    actions.push(Action::Ensure {
                        key: key.clone(),
                        spec,
                        secrets_of,
                    });
                    if let Some(obs) = seen.services.get(&key) {
                        let status = ServiceStatus {
                            node: me.clone(),
                            state: obs.state,
                            message: obs.message.clone(),
                            restarts: obs.restarts,
                            updated_unix: now_unix,
                            // A replica's mode and progress are its
                            // controller's to report (in the controller's
                            // status, laid over this one when read).
                            mode: None,
                            rebuild: None,
                            hydration: None,
                            report: match service {
                                ServiceId::Controller => seen
                                    .controllers
                                    .get(name)
                                    .map(|view| controller_report(desired, v, view)),
                                ServiceId::Replica(_) => None,
                            },
                        };
                        push_status(&mut actions, name, service, stored, status);
                    }
                }
                Err(why) => {
                    let status = ServiceStatus {
                        node: me.clone(),
                        state: ServiceState::Failed,
                        message: Some(why),
                        restarts: 0,
                        updated_unix: now_unix,
                        mode: None,
                        rebuild: None,
                        hydration: None,
                        report: None,
                    };
                    push_status(&mut actions, name, service, stored, status);
                }
            }
        }
        if mine.contains(&ServiceId::Controller) {
            plan_controller(desired, name, rec, seen.controllers.get(name), &mut actions);
        }
    }

    // Controller leases this node holds for controllers it no longer runs:
    // given back once the controller stopped (the next pass, after its Stop).
    for (volume, lease) in &desired.leases {
        if lease.value.node != *me {
            continue;
        }
        let still_mine = desired.volumes.get(volume).is_some_and(|r| {
            r.value
                .placement
                .controller
                .as_ref()
                .is_some_and(|c| c.node == *me)
        });
        let key = ServiceKey {
            volume: volume.clone(),
            service: ServiceId::Controller,
        };
        if !still_mine && !seen.services.contains_key(&key) {
            actions.push(Action::ReleaseLease {
                volume: volume.clone(),
                revision: lease.revision,
            });
        }
    }

    // Data of replicas this node no longer holds: deleted once the volume is
    // whole without them (see [`retired`]).
    let records: BTreeMap<VolumeName, VolumeRecord> = desired
        .volumes
        .iter()
        .map(|(n, r)| (n.clone(), r.value.clone()))
        .collect();
    let statuses: BTreeMap<VolumeName, BTreeMap<ServiceId, ServiceStatus>> = records
        .keys()
        .map(|n| (n.clone(), desired.statuses_of(n)))
        .collect();
    let running = |volume: &VolumeName, service: &ServiceId| {
        seen.services.contains_key(&ServiceKey {
            volume: volume.clone(),
            service: service.clone(),
        })
    };
    for (volume, path) in retired::deletable(me, &seen.replica_dirs, &records, &statuses, running) {
        actions.push(Action::RemoveData { volume, path });
    }

    // Services no record places here any more: stop them (their data stays),
    // then forget their statuses.
    for key in seen.services.keys() {
        let deleting = desired
            .volumes
            .get(&key.volume)
            .is_some_and(|r| r.value.phase == VolumePhase::Deleting);
        if !wanted.contains(key) && !deleting {
            actions.push(Action::Stop { key: key.clone() });
        }
    }
    for ((volume, service), status) in &desired.statuses {
        let key = ServiceKey {
            volume: volume.clone(),
            service: service.clone(),
        };
        let deleting = desired
            .volumes
            .get(volume)
            .is_some_and(|r| r.value.phase == VolumePhase::Deleting);
        if status.node == *me && !wanted.contains(&key) && !deleting {
            actions.push(Action::DeleteStatus {
                volume: volume.clone(),
                service: service.clone(),
            });
        }
    }
    actions
}

/// The services `v` places on `me`.
fn my_services(v: &VolumeRecord, me: &NodeName) -> Vec<ServiceId> {
    let mut out: Vec<ServiceId> = v
        .placement
        .replicas
        .iter()
        .filter(|s| s.node == *me)
        .map(|s| ServiceId::Replica(s.id))
        .collect();
    if v.placement.controller.as_ref().is_some_and(|c| c.node == *me) {
        out.push(ServiceId::Controller);
    }
    out
}

fn push_status(
    actions: &mut Vec<Action>,
    volume: &VolumeName,
    service: &ServiceId,
    stored: Option<&ServiceStatus>,
    status: ServiceStatus,
) {
    let same = stored.is_some_and(|s| {
        s.node == status.node
            && s.state == status.state
            && s.message == status.message
            && s.restarts == status.restarts
            && s.report == status.report
    });
    if !same {
        actions.push(Action::WriteStatus {
            volume: volume.clone(),
            service: service.clone(),
            status,
        });
    }
}

/// The lease this node needs to run `v`'s controller: taken when absent or
/// held for an older generation. `Err(holder)` when another node holds it.
fn plan_lease(
    local: &Local,
    desired: &Desired,
    v: &VolumeRecord,
    actions: &mut Vec<Action>,
) -> Result<(), NodeName> {
    let generation = v.placement.controller.as_ref().map_or(0, |c| c.generation);
    let expect = match desired.leases.get(&v.spec.name) {
        None => Expect::Absent,
        Some(held) if held.value.node != local.me => return Err(held.value.node.clone()),
        Some(held) if held.value.generation == generation => return Ok(()),
        Some(held) => Expect::Revision(held.revision),
    };
    actions.push(Action::TakeLease {
        volume: v.spec.name.clone(),
        generation,
        expect,
    });
    Ok(())
}

/// What `view` says of `v`'s placed replicas, by replica id.
pub fn controller_report(desired: &Desired, v: &VolumeRecord, view: &ControllerView) -> ControllerReport {
    let replicas = v
        .placement
        .replicas
        .iter()
        .filter_map(|slot| {
            let address = desired.replica_address(slot)?;
            let seen = view
                .replicas
                .iter()
                .find(|r| r.address == address && !r.removed)?;
            Some(ReportedReplica {
                id: slot.id,
                node: slot.node.clone(),
                mode: seen.mode,
                rebuild: seen.rebuild,
                hydration: seen.hydration,
            })
        })
        .collect();
    ControllerReport {
        epoch: view.epoch,
        serving: view.serving,
        replicas,
    }
}

fn plan_controller(
    desired: &Desired,
    name: &VolumeName,
    rec: &Versioned<VolumeRecord>,
    view: Option<&ControllerView>,
    actions: &mut Vec<Action>,
) {
    let v = &rec.value;
    let Some(view) = view else { return };
    let wanted: Vec<membership::Wanted> = v
        .placement
        .replicas
        .iter()
        .filter_map(|slot| {
            let address = desired.replica_address(slot)?;
            let running = desired
                .statuses
                .get(&(name.clone(), ServiceId::Replica(slot.id)))
                .is_some_and(|s| s.node == slot.node && s.state == ServiceState::Running);
            Some(membership::Wanted { address, running })
        })
        .collect();
    for change in membership::changes(&wanted, view.serving, &view.replicas) {
        actions.push(match change {
            membership::Change::Add { address } => Action::ReplicaAdd {
                volume: name.clone(),
                address,
            },
            membership::Change::Remove { address } => Action::ReplicaRemove {
                volume: name.clone(),
                address,
            },
        });
    }
    let phase = match (view.serving, v.phase) {
        (true, _) if view.rw_replicas >= usize::from(v.spec.replicas) => VolumePhase::Ready,
        (true, _) => VolumePhase::Degraded,
        // Not serving yet: a new volume stays Creating until it does.
        (false, VolumePhase::Creating) => VolumePhase::Creating,
        (false, _) => VolumePhase::Degraded,
    };
    if phase != v.phase {
        actions.push(Action::SetPhase {
            volume: name.clone(),
            revision: rec.revision,
            phase,
        });
    }
    // Access follows the attachment whether or not I/O is served: an unpublished node is shut out now.
    let allowed = normalized(crate::model::allowed_initiators(v, &desired.nodes));
    if allowed != view.allowed {
        actions.push(Action::SetAllowList {
            volume: name.clone(),
            allowed,
        });
    }
    if !view.serving {
        return;
    }
    if v.spec.size_bytes > view.size_bytes {
        actions.push(Action::Expand {
            volume: name.clone(),
            size_bytes: v.spec.size_bytes,
        });
    }
    if v.spec.qos != view.qos {
        actions.push(Action::SetQos {
            volume: name.clone(),
            qos: v.spec.qos.clone(),
        });
    }
}

/// Initiator names as compared: lower case (iSCSI names compare case-insensitively), sorted.
pub fn normalized(names: Option<Vec<String>>) -> Option<Vec<String>> {
    names.map(|mut n| {
        n.iter_mut().for_each(|s| *s = s.to_lowercase());
        n.sort();
        n.dedup();
        n
    })
}

fn plan_deletion(
    local: &Local,
    desired: &Desired,
    seen: &Seen,
    name: &VolumeName,
    rec: &Versioned<VolumeRecord>,
    mine: &[ServiceId],
    actions: &mut Vec<Action>,
) {
    let me = &local.me;
    let v = &rec.value;
    for key in seen.services.keys().filter(|k| k.volume == *name) {
        actions.push(Action::Stop { key: key.clone() });
    }
    let my_node = desired.nodes.get(me);
    for slot in v.placement.replicas.iter().filter(|s| s.node == *me) {
        let pool = my_node.and_then(|n| n.pools.iter().find(|p| p.name == slot.pool));
        match pool.map(|p| &p.kind) {
            Some(PoolKind::Directory(dir)) => actions.push(Action::RemoveData {
                volume: name.clone(),
                path: replica_dir(dir, &v.spec.uuid, slot.id),
            }),
            Some(PoolKind::BlockDevice(dev)) => actions.push(Action::WipeDevice {
                volume: name.clone(),
                device: dev.clone(),
            }),
            // A pool no longer in this node's config: nothing of it to reach.
            None => {}
        }
    }
    for ((volume, service), status) in desired.statuses.range((name.clone(), ServiceId::Replica(0))..) {
        if volume != name {
            break;
        }
        if status.node == *me {
            actions.push(Action::DeleteStatus {
                volume: name.clone(),
                service: service.clone(),
            });
        }
    }
    if !mine.is_empty() {
        actions.push(Action::RemoveSecretFiles { volume: name.clone() });
    }
    // Runs after every step above succeeded (a volume's actions stop at the
    // first failure): a node confirms only what it really removed.
    match deletion_step(v, me) {
        DeletionStep::Release => actions.push(Action::ReleaseParts {
            volume: name.clone(),
            revision: rec.revision,
        }),
        DeletionStep::Delete => actions.push(Action::DeleteVolume {
            volume: name.clone(),
            revision: rec.revision,
        }),
        DeletionStep::Wait { .. } => {}
    }
}

/// What a node does next for a volume being deleted. Deletion completes per
/// node: each node's parts (replica slots, the controller slot) stay in the
/// placement until that node's agent has removed their services and data and
/// taken them out; the record and secrets go only once no part is left. A
/// node that is down keeps its parts, so the volume shows as deleting with
/// that node pending until its agent comes back and finishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeletionStep {
    /// `me` holds parts: remove them from the placement (after cleaning up).
    Release,
    /// No node holds a part: delete the record and the secrets.
    Delete,
    /// Other nodes still hold parts.
    Wait { pending: Vec<NodeName> },
}

/// The pure decision of [`DeletionStep`].
pub fn deletion_step(v: &VolumeRecord, me: &NodeName) -> DeletionStep {
    let pending = cleanup_pending(v);
    if pending.contains(me) {
        DeletionStep::Release
    } else if pending.is_empty() {
        DeletionStep::Delete
    } else {
        DeletionStep::Wait { pending }
    }
}

/// The nodes that still hold a part of `v` (sorted, each once): for a
/// volume being deleted, those that have not yet removed theirs.
pub fn cleanup_pending(v: &VolumeRecord) -> Vec<NodeName> {
    let nodes: BTreeSet<&NodeName> = v
        .placement
        .replicas
        .iter()
        .map(|s| &s.node)
        .chain(v.placement.controller.iter().map(|c| &c.node))
        .collect();
    nodes.into_iter().cloned().collect()
}

/// `v` without the parts on `me`: what [`Action::ReleaseParts`] writes.
pub fn without_parts_of(v: &VolumeRecord, me: &NodeName) -> VolumeRecord {
    let mut next = v.clone();
    next.placement.replicas.retain(|s| s.node != *me);
    if next.placement.controller.as_ref().is_some_and(|c| c.node == *me) {
        next.placement.controller = None;
    }
    next
}

/// The spec of `service` of `v` on this node, and whose secrets it needs;
/// an error says why it cannot be built (shown in its status).
fn service_spec(
    local: &Local,
    desired: &Desired,
    seen: &Seen,
    v: &VolumeRecord,
    service: &ServiceId,
) -> Result<(ServiceSpec, Vec<VolumeName>), String> {
    let name = &v.spec.name;
    let address_of = |node: &NodeName| {
        desired
            .nodes
            .get(node)
            .map(|n| n.address)
            .ok_or_else(|| format!("node {node} is not registered; its address is unknown"))
    };
    match service {
        ServiceId::Replica(id) => {
            let slot = v
                .placement
                .replicas
                .iter()
                .find(|s| s.id == *id)
                .ok_or_else(|| format!("replica {id} is not in the placement"))?;
            let node = desired
                .nodes
                .get(&local.me)
                .ok_or_else(|| format!("this node ({}) is not registered yet", local.me))?;
            let pool = node.pools.iter().find(|p| p.name == slot.pool).ok_or_else(|| {
                format!(
                    "pool {} is not configured on node {}: add it to the agent's config or move the replica",
                    slot.pool, local.me
                )
            })?;
            let storage = match &pool.kind {
                PoolKind::Directory(dir) => ReplicaStorage::Directory(replica_dir(dir, &v.spec.uuid, *id)),
                PoolKind::BlockDevice(dev) => ReplicaStorage::BlockDevice(dev.clone()),
            };
            let mut secrets_of = vec![name.clone()];
            let clone = match &v.spec.source {
                None => None,
                Some(src) => {
                    let source = desired.volumes.get(&src.volume).ok_or_else(|| {
                        format!(
                            "the clone's source volume {} no longer exists; it is needed until the clone is hydrated",
                            src.volume
                        )
                    })?;
                    let replicas = source
                        .value
                        .placement
                        .replicas
                        .iter()
                        .map(|s| address_of(&s.node).map(|a| SocketAddr::new(a, s.port)))
                        .collect::<Result<Vec<_>, _>>()?;
                    secrets_of.push(src.volume.clone());
                    Some(CloneSource {
                        replicas,
                        snapshot: src.snapshot.clone(),
                        source_volume_id: source.value.spec.uuid,
                        source_secret_file: local.peer_secret_file(&src.volume),
                    })
                }
            };
            Ok((
                ServiceSpec::Replica(ReplicaSpec {
                    volume_id: v.spec.uuid,
                    size_bytes: v.spec.size_bytes,
                    storage,
                    listen: SocketAddr::new(node.address, slot.port),
                    secret_file: local.peer_secret_file(name),
                    clone,
                }),
                secrets_of,
            ))
        }
        ServiceId::Controller => {
            let slot = v
                .placement
                .controller
                .as_ref()
                .ok_or_else(|| "the volume has no controller placed".to_string())?;
            let address = address_of(&local.me)?;
            let replicas = v
                .placement
                .replicas
                .iter()
                .map(|s| address_of(&s.node).map(|a| SocketAddr::new(a, s.port)))
                .collect::<Result<Vec<_>, _>>()?;
            // Started with the size it serves when that is known: a larger
            // spec size is applied by an expansion, which a controller
            // refuses to do at start.
            let size_bytes = seen
                .controllers
                .get(name)
                .map_or(v.spec.size_bytes, |c| c.size_bytes.min(v.spec.size_bytes));
            Ok((
                ServiceSpec::Controller(ControllerSpec {
                    name: name.clone(),
                    volume_id: v.spec.uuid,
                    size_bytes,
                    replicas,
                    iscsi: SocketAddr::new(address, slot.iscsi_port),
                    api: SocketAddr::new(address, slot.api_port),
                    min_healthy: v.spec.min_healthy,
                    qos: v.spec.qos.clone(),
                    secret_file: local.peer_secret_file(name),
                    api_token_file: local.api_token_file(name),
                    closed: !v.spec.access.is_any(),
                }),
                vec![name.clone()],
            ))
        }
    }
}

/// QoS limits as the controller reports them, in the API's terms (rates only:
/// the API sets no bursts).
pub fn qos_from_reply(limits: Option<&pb::QosLimits>) -> QosSpec {
    let Some(l) = limits else {
        return QosSpec::default();
    };
    let rate = |x: &Option<pb::QosLimit>| x.as_ref().map(|l| l.rate);
    QosSpec {
        read_iops: rate(&l.read_iops),
        write_iops: rate(&l.write_iops),
        total_iops: rate(&l.iops),
        read_bytes_per_sec: rate(&l.read_bps),
        write_bytes_per_sec: rate(&l.write_bps),
        total_bytes_per_sec: rate(&l.bps),
    }
}

/// The API's QoS limits as a `VolumeSetQos` request that replaces all of
/// them (default bursts).
pub fn qos_request(q: &QosSpec) -> pb::VolumeSetQosRequest {
    let limit = |x: Option<u64>| x.map(|rate| pb::QosLimit { rate, burst: 0 });
    pb::VolumeSetQosRequest {
        limits: Some(pb::QosLimits {
            read_iops: limit(q.read_iops),
            write_iops: limit(q.write_iops),
            iops: limit(q.total_iops),
            read_bps: limit(q.read_bytes_per_sec),
            write_bps: limit(q.write_bytes_per_sec),
            bps: limit(q.total_bytes_per_sec),
        }),
        clear: true,
    }
}

/// What a `VolumeInfo` answer means for decisions.
pub fn view_from_reply(reply: &pb::VolumeInfoReply) -> ControllerView {
    let progress = |done: u64, total: u64| {
        (total > 0).then_some(Progress {
            done_bytes: done,
            total_bytes: total,
        })
    };
    ControllerView {
        size_bytes: reply.size_bytes,
        serving: reply.state == "serving",
        rw_replicas: reply
            .replicas
            .iter()
            .filter(|r| r.mode == "RW" && !r.removed)
            .count(),
        qos: qos_from_reply(reply.qos.as_ref()),
        epoch: reply.epoch,
        replicas: reply
            .replicas
            .iter()
            .map(|r| {
                let mode = match r.mode.as_str() {
                    "RW" => ReplicaMode::Rw,
                    "WO" => ReplicaMode::Wo,
                    _ => ReplicaMode::Err,
                };
                ViewedReplica {
                    address: r.address.clone(),
                    mode,
                    removed: r.removed,
                    rebuild: if mode == ReplicaMode::Wo {
                        progress(r.rebuild_done_bytes, r.rebuild_total_bytes)
                    } else {
                        None
                    },
                    hydration: if r.hydrated_bytes < r.hydrate_total_bytes {
                        progress(r.hydrated_bytes, r.hydrate_total_bytes)
                    } else {
                        None
                    },
                }
            })
            .collect(),
        allowed: normalized(reply.allow_restricted.then(|| reply.allowed_initiators.clone())),
    }
}

/// This node's lease: the keep-alive task renews it (and replaces it when
/// it lapsed); the reconciler puts the volume leases of the controllers it
/// runs on it, so they vanish with the node.
#[derive(Clone, Debug)]
pub struct NodeLease(Arc<std::sync::Mutex<LeaseId>>);

impl NodeLease {
    pub fn new(lease: LeaseId) -> NodeLease {
        NodeLease(Arc::new(std::sync::Mutex::new(lease)))
    }
    pub fn get(&self) -> LeaseId {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn set(&self, lease: LeaseId) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = lease;
    }
}

/// The reconciler of one node: runs passes until cancelled.
pub struct Reconciler {
    pub store: Arc<dyn Store>,
    pub runtime: Arc<dyn Runtime>,
    pub local: Local,
    pub metrics: Arc<AgentMetrics>,
    /// This node's lease, which the volume leases it takes are put with.
    pub lease: NodeLease,
    /// How long a node may be down before its replicas are replaced.
    pub replica_grace: Duration,
}

/// The registered nodes that are down with no [`NodeDown`] mark yet: this
/// agent marks them (create-only) before it decides failover.
pub fn unmarked_down(desired: &Desired) -> Vec<NodeName> {
    desired
        .nodes
        .keys()
        .filter(|name| !desired.up.contains(*name) && !desired.down_since.contains_key(*name))
        .cloned()
        .collect()
}

/// Puts a [`NodeDown`] mark at `now_unix` on each node [`unmarked_down`]
/// finds in `desired`, create-only: a node another agent marked first, or
/// one back since `desired` was read, is left as it is (the next pass reads
/// which; meanwhile it counts as down since now, which only starts its
/// grace later).
pub async fn mark_down(store: &dyn Store, desired: &Desired, now_unix: u64) -> anyhow::Result<()> {
    for node in unmarked_down(desired) {
        let mark = NodeDown {
            down_since_unix: now_unix,
        };
        match store::put_json(store, &keys::node_alive(&node), &mark, Expect::Absent, None).await {
            Ok(_) => tracing::info!(
                node = %node,
                "node is down (its liveness lapsed): marked; failover.replica_grace counts from now"
            ),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e).context(format!("marking node {node} down")),
        }
    }
    Ok(())
}

/// The failover decisions of every volume that is not being deleted
/// ([`crate::failover::decide`]), with the record to write for each that
/// changes something: a pure function of what the store holds, the down
/// nodes' marks included, so every agent decides alike. A down node not
/// marked yet is down since `now_unix` (its grace starts now, never earlier).
pub fn failover_plans(
    desired: &Desired,
    now_unix: u64,
    replica_grace: Duration,
) -> Vec<(VolumeName, store::Revision, crate::failover::Plan, VolumeRecord)> {
    use crate::placement::NodeView;
    let nodes: Vec<NodeView> = desired
        .nodes
        .values()
        .map(|record| NodeView {
            record: record.clone(),
            up: desired.up.contains(&record.name),
        })
        .collect();
    let records: Vec<VolumeRecord> = desired.volumes.values().map(|v| v.value.clone()).collect();
    let usage = crate::placement::usage(&records);
    let mut out = Vec::new();
    for (name, rec) in &desired.volumes {
        if rec.value.phase == VolumePhase::Deleting {
            continue;
        }
        let statuses = desired.statuses_of(name);
        let observed = crate::failover::Observed {
            nodes: &nodes,
            down_since: &desired.down_since,
            statuses: &statuses,
            usage: &usage,
            now_unix,
            replica_grace,
        };
        let plan = crate::failover::decide(&rec.value, &observed);
        if !plan.actions.is_empty() || !plan.holds.is_empty() {
            let next = crate::failover::apply(&rec.value, &plan);
            out.push((name.clone(), rec.revision, plan, next));
        }
    }
    out
}

type Client = ControllerServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithToken>,
>;

impl Reconciler {
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn Runtime>,
        local: Local,
        metrics: Arc<AgentMetrics>,
        lease: NodeLease,
        replica_grace: Duration,
    ) -> Reconciler {
        Reconciler {
            store,
            runtime,
            local,
            metrics,
            lease,
            replica_grace,
        }
    }

    /// Failover: marks the down nodes nobody marked yet ([`NodeDown`]), then
    /// moves controllers off down nodes and replaces replicas lost past the
    /// grace period, each record written with a revision check (an agent
    /// that loses the race finds nothing left to do at its next pass).
    async fn failover(&self, desired: &Desired, now_unix: u64) -> anyhow::Result<bool> {
        mark_down(self.store.as_ref(), desired, now_unix).await?;
        let plans = failover_plans(desired, now_unix, self.replica_grace);
        let mut wrote = false;
        for (name, revision, plan, next) in plans {
            for hold in &plan.holds {
                tracing::debug!(volume = %name, "failover holds: {hold}");
            }
            if plan.actions.is_empty() {
                continue;
            }
            for action in &plan.actions {
                tracing::warn!(volume = %name, "failover: {action}");
            }
            match store::put_json(
                self.store.as_ref(),
                &keys::volume(&name),
                &next,
                Expect::Revision(revision),
                None,
            )
            .await
            {
                Ok(_) => wrote = true,
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e).context("writing a failover decision"),
            }
        }
        Ok(wrote)
    }

    /// Runs until `cancel`. Never returns an error: a failed pass is
    /// counted, logged and retried at the next one.
    pub async fn run(self, cancel: CancellationToken) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(watch_volumes(self.store.clone(), changed.clone(), cancel.clone()));
        loop {
            let started = Instant::now();
            match self.pass().await {
                Ok(()) => {}
                Err(e) => {
                    self.metrics.reconcile_errors.inc();
                    tracing::warn!(error = %format!("{e:#}"), "reconcile pass failed; retrying");
                }
            }
            self.metrics
                .reconcile_seconds
                .observe(started.elapsed().as_secs_f64());
            tokio::select! {
                () = cancel.cancelled() => break,
                () = changed.notified() => {}
                () = tokio::time::sleep(PASS_INTERVAL) => {}
            }
        }
        watcher.abort();
    }

    /// One pass: read, decide, act.
    pub async fn pass(&self) -> anyhow::Result<()> {
        let mut desired = read_desired(self.store.as_ref()).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.failover(&desired, now).await? {
            // Decide the services from the records as they are now.
            desired = read_desired(self.store.as_ref()).await?;
        }
        let mut seen = Seen {
            services: self
                .runtime
                .observe()
                .await
                .context("asking the runtime what runs")?
                .into_iter()
                .collect(),
            controllers: BTreeMap::new(),
            replica_dirs: find_replica_dirs(desired.nodes.get(&self.local.me)),
        };
        for (name, rec) in &desired.volumes {
            let here = rec
                .value
                .placement
                .controller
                .as_ref()
                .is_some_and(|c| c.node == self.local.me);
            let key = ServiceKey {
                volume: name.clone(),
                service: ServiceId::Controller,
            };
            if here && seen.services.contains_key(&key) {
                match self.controller_client(&desired, name).await {
                    Ok(mut client) => match tokio::time::timeout(
                        CONTROLLER_TIMEOUT,
                        client.volume_info(pb::VolumeInfoRequest {}),
                    )
                    .await
                    {
                        Ok(Ok(reply)) => {
                            seen.controllers
                                .insert(name.clone(), view_from_reply(reply.get_ref()));
                        }
                        Ok(Err(status)) => {
                            tracing::debug!(volume = %name, error = %status.message(), "controller not answering yet")
                        }
                        Err(_) => {
                            tracing::debug!(volume = %name, "controller did not answer VolumeInfo in time")
                        }
                    },
                    Err(e) => {
                        tracing::debug!(volume = %name, error = %format!("{e:#}"), "controller not reachable yet")
                    }
                }
            }
        }
        let actions = plan(&self.local, &desired, &seen, now);
        let mut failed: BTreeSet<VolumeName> = BTreeSet::new();
        let mut errors = 0;
        for action in actions {
            if failed.contains(action.volume()) {
                continue;
            }
            let volume = action.volume().clone();
            if let Err(e) = self.execute(&desired, action).await {
                errors += 1;
                self.metrics.reconcile_errors.inc();
                tracing::warn!(volume = %volume, error = %format!("{e:#}"), "reconcile step failed; retrying at the next pass");
                failed.insert(volume);
            }
        }
        if errors > 0 {
            tracing::debug!(errors, "pass finished with errors");
        }
        Ok(())
    }

    async fn execute(&self, desired: &Desired, action: Action) -> anyhow::Result<()> {
        let store = self.store.as_ref();
        match action {
            Action::Ensure {
                key,
                spec,
                secrets_of,
            } => {
                for volume in &secrets_of {
                    self.write_secrets(volume).await?;
                }
                self.runtime.ensure(&key, &spec).await
            }
            Action::Stop { key } => {
                tracing::info!(volume = %key.volume, service = %key.service, "stopping service");
                self.runtime.stop(&key).await
            }
            Action::RemoveData { volume, path } => {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {
                        tracing::info!(volume = %volume, path = %path.display(), "replica data deleted")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("deleting {}", path.display())),
                }
                // The per-volume directory goes when its last replica went.
                if let Some(parent) = path.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
                Ok(())
            }
            Action::WipeDevice { volume, device } => {
                let wiped = basalt_replica::store::backend::block::wipe(&device)
                    .with_context(|| format!("wiping {}", device.display()))?;
                if wiped {
                    tracing::info!(volume = %volume, device = %device.display(), "replica device wiped");
                }
                Ok(())
            }
            Action::ReleaseParts { volume, revision } => {
                let Some(rec) = desired.volumes.get(&volume) else {
                    return Ok(());
                };
                let next = without_parts_of(&rec.value, &self.local.me);
                match store::put_json(
                    store,
                    &keys::volume(&volume),
                    &next,
                    Expect::Revision(revision),
                    None,
                )
                .await
                {
                    Ok(_) => {
                        tracing::info!(volume = %volume, pending = ?cleanup_pending(&next), "this node's parts of the deleted volume are removed");
                        Ok(())
                    }
                    // Another node released its parts meanwhile: again at the next pass.
                    Err(StoreError::Conflict { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Action::WriteStatus {
                volume,
                service,
                status,
            } => {
                store::put_json(
                    store,
                    &keys::service_status(&volume, &service),
                    &status,
                    Expect::Any,
                    None,
                )
                .await?;
                Ok(())
            }
            Action::DeleteStatus { volume, service } => {
                store
                    .delete(&keys::service_status(&volume, &service), Expect::Any)
                    .await?;
                Ok(())
            }
            Action::SetPhase {
                volume,
                revision,
                phase,
            } => {
                let Some(rec) = desired.volumes.get(&volume) else {
                    return Ok(());
                };
                let mut v = rec.value.clone();
                tracing::info!(volume = %volume, from = ?v.phase, to = ?phase, "volume phase");
                v.phase = phase;
                match store::put_json(
                    store,
                    &keys::volume(&volume),
                    &v,
                    Expect::Revision(revision),
                    None,
                )
                .await
                {
                    // Changed meanwhile (an expand, a delete): decided again on
                    // the fresh record at the next pass.
                    Err(StoreError::Conflict { .. }) => Ok(()),
                    other => other.map(|_| ()).map_err(Into::into),
                }
            }
            Action::Expand { volume, size_bytes } => {
                let mut client = self.controller_client(desired, &volume).await?;
                let reply = tokio::time::timeout(
                    EXPAND_TIMEOUT,
                    client.volume_expand(pb::VolumeExpandRequest {
                        new_size_bytes: size_bytes,
                    }),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the controller did not finish the expansion within {EXPAND_TIMEOUT:?}")
                })?
                .map_err(|s| anyhow::anyhow!("expanding to {size_bytes} bytes: {}", s.message()))?;
                tracing::info!(volume = %volume, size_bytes, message = %reply.get_ref().message, "volume expanded");
                Ok(())
            }
            Action::SetQos { volume, qos } => {
                let mut client = self.controller_client(desired, &volume).await?;
                tokio::time::timeout(CONTROLLER_TIMEOUT, client.volume_set_qos(qos_request(&qos)))
                    .await
                    .map_err(|_| anyhow::anyhow!("the controller did not answer VolumeSetQos in time"))?
                    .map_err(|s| anyhow::anyhow!("setting the QoS limits: {}", s.message()))?;
                tracing::info!(volume = %volume, ?qos, "QoS limits applied");
                Ok(())
            }
            Action::SetAllowList { volume, allowed } => {
                let mut client = self.controller_client(desired, &volume).await?;
                let request = pb::TargetAllowListRequest {
                    any: allowed.is_none(),
                    initiators: allowed.clone().unwrap_or_default(),
                };
                let reply = tokio::time::timeout(CONTROLLER_TIMEOUT, client.target_set_allow_list(request))
                    .await
                    .map_err(|_| anyhow::anyhow!("the controller did not answer TargetSetAllowList in time"))?
                    .map_err(|s| anyhow::anyhow!("setting the target's allow-list: {}", s.message()))?;
                tracing::info!(volume = %volume, ?allowed, closed = reply.get_ref().sessions_closed,
                    "initiator allow-list applied");
                Ok(())
            }
            Action::RemoveSecretFiles { volume } => {
                let dir = self.local.secrets_dir(&volume);
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(e).with_context(|| format!("deleting {}", dir.display()))
                    }
                    _ => Ok(()),
                }
            }
            Action::DeleteVolume { volume, revision } => {
                match store
                    .delete(&keys::volume(&volume), Expect::Revision(revision))
                    .await
                {
                    Ok(_) => {}
                    Err(StoreError::Conflict { .. }) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                store.delete(&keys::volume_secrets(&volume), Expect::Any).await?;
                store.delete(&keys::volume_lease(&volume), Expect::Any).await?;
                // Statuses left by nodes that hold no part any more (a controller moved away).
                let (left, _) = store.list(&keys::volume_status(&volume)).await?;
                for kv in left {
                    store.delete(&kv.key, Expect::Any).await?;
                }
                tracing::info!(volume = %volume, "volume deleted");
                Ok(())
            }
            Action::TakeLease {
                volume,
                generation,
                expect,
            } => {
                let lease = VolumeLease {
                    node: self.local.me.clone(),
                    generation,
                };
                store::put_json(
                    store,
                    &keys::volume_lease(&volume),
                    &lease,
                    expect,
                    Some(self.lease.get()),
                )
                .await
                .with_context(|| format!("taking volume {volume}'s controller lease"))?;
                tracing::info!(volume = %volume, generation, "took the volume's controller lease");
                Ok(())
            }
            Action::ReleaseLease { volume, revision } => {
                match store
                    .delete(&keys::volume_lease(&volume), Expect::Revision(revision))
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Action::ReplicaAdd { volume, address } => {
                let mut client = self.controller_client(desired, &volume).await?;
                let reply = tokio::time::timeout(
                    CONTROLLER_TIMEOUT,
                    client.replica_add(pb::ReplicaRequest {
                        address: address.clone(),
                    }),
                )
                .await
                .map_err(|_| anyhow::anyhow!("the controller did not answer ReplicaAdd in time"))?
                .map_err(|s| anyhow::anyhow!("adding replica {address}: {}", s.message()))?;
                tracing::warn!(volume = %volume, replica = %address, message = %reply.get_ref().message, "replica added to the controller");
                Ok(())
            }
            Action::ReplicaRemove { volume, address } => {
                let mut client = self.controller_client(desired, &volume).await?;
                let reply = tokio::time::timeout(
                    CONTROLLER_TIMEOUT,
                    client.replica_remove(pb::ReplicaRequest {
                        address: address.clone(),
                    }),
                )
                .await
                .map_err(|_| anyhow::anyhow!("the controller did not answer ReplicaRemove in time"))?
                .map_err(|s| anyhow::anyhow!("removing replica {address}: {}", s.message()))?;
                tracing::warn!(volume = %volume, replica = %address, message = %reply.get_ref().message, "replica removed from the controller for good");
                Ok(())
            }
        }
    }

    /// Writes `volume`'s secrets to their 0600 files (when they differ).
    async fn write_secrets(&self, volume: &VolumeName) -> anyhow::Result<()> {
        let secrets = self.secrets(volume).await?;
        write_private(
            &self.local.peer_secret_file(volume),
            secrets.peer_secret.as_bytes(),
        )?;
        write_private(&self.local.api_token_file(volume), secrets.api_token.as_bytes())?;
        Ok(())
    }

    async fn secrets(&self, volume: &VolumeName) -> anyhow::Result<VolumeSecrets> {
        store::get_json::<VolumeSecrets>(self.store.as_ref(), &keys::volume_secrets(volume))
            .await?
            .map(|v| v.value)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "volume {volume} has no secrets in the store (was it created through the API?)"
                )
            })
    }

    async fn controller_client(&self, desired: &Desired, volume: &VolumeName) -> anyhow::Result<Client> {
        let rec = desired
            .volumes
            .get(volume)
            .ok_or_else(|| anyhow::anyhow!("volume {volume} is gone"))?;
        let slot = rec
            .value
            .placement
            .controller
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("volume {volume} has no controller"))?;
        let node = desired
            .nodes
            .get(&slot.node)
            .ok_or_else(|| anyhow::anyhow!("node {} is not registered", slot.node))?;
        let token = ApiToken::new(self.secrets(volume).await?.api_token)
            .map_err(|e| anyhow::anyhow!("volume {volume}'s API token in the store: {e}"))?;
        connect_controller(SocketAddr::new(node.address, slot.api_port), token).await
    }
}

/// A management API client of the controller at `api`, sending `token`.
pub async fn connect_controller(api: SocketAddr, token: ApiToken) -> anyhow::Result<Client> {
    let endpoint = tonic::transport::Channel::from_shared(format!("http://{api}"))
        .with_context(|| format!("{api} is not a valid API address"))?
        .connect_timeout(CONTROLLER_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the controller's API at {api}"))?;
    Ok(ControllerServiceClient::with_interceptor(
        channel,
        WithToken(token),
    ))
}

/// Writes `bytes` to `path` with mode 0600 (created so, never widened),
/// unless it already holds them; the directory is made 0700.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", path.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

/// Everything a pass decides from, in one read per prefix.
pub async fn read_desired(store: &dyn Store) -> anyhow::Result<Desired> {
    let (volumes, _) = store::list_json::<VolumeRecord>(store, keys::VOLUMES).await?;
    let (nodes, _) = store::list_json::<NodeRecord>(store, keys::NODES).await?;
    let (statuses, _) = store::list_json::<ServiceStatus>(store, keys::STATUS).await?;
    let (alive, _) = store.list(keys::NODES_ALIVE).await?;
    let (leases, _) = store::list_json::<VolumeLease>(store, keys::LEASES).await?;
    let mut d = Desired::default();
    for (key, lease) in leases {
        if let Some(Ok(volume)) = key.strip_prefix(keys::LEASES).map(VolumeName::new) {
            d.leases.insert(volume, lease);
        }
    }
    (d.up, d.down_since) = read_liveness(&alive);
    for (_, v) in volumes {
        d.volumes.insert(v.value.spec.name.clone(), v);
    }
    for (_, n) in nodes {
        d.nodes.insert(n.value.name.clone(), n.value);
    }
    for (key, s) in statuses {
        // STATUS/VOLUME/SERVICE
        let Some((volume, service)) = key
            .strip_prefix(keys::STATUS)
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(v, s)| {
                Some((
                    VolumeName::new(v).ok()?,
                    crate::runtime::process::parse_service_id(s)?,
                ))
            })
        else {
            tracing::warn!(key = %key, "ignoring a status under a key this agent does not know");
            continue;
        };
        d.statuses.insert((volume, service), s.value);
    }
    overlay_reports(&mut d);
    Ok(d)
}

/// The liveness keys ([`keys::NODES_ALIVE`]) read: the nodes up, and the
/// down nodes' marks ([`NodeDown`]).
pub fn read_liveness(alive: &[store::KeyValue]) -> (BTreeSet<NodeName>, BTreeMap<NodeName, u64>) {
    let mut up = BTreeSet::new();
    let mut down_since = BTreeMap::new();
    for kv in alive {
        let Some(Ok(node)) = kv.key.strip_prefix(keys::NODES_ALIVE).map(NodeName::new) else {
            continue;
        };
        match store::decode::<Liveness>(kv).map(|v| v.value) {
            Ok(Liveness::Down(mark)) => {
                down_since.insert(node, mark.down_since_unix);
            }
            Ok(Liveness::Up(_)) => {
                up.insert(node);
            }
            // Only a node's agent and its down mark write here; anything
            // else counts as the key's existence always did: up (nothing of
            // it is replaced).
            Err(e) => {
                tracing::warn!(error = %e, "a liveness key this agent cannot read; taking its node as up");
                up.insert(node);
            }
        }
    }
    (up, down_since)
}

/// Lays each controller's report over its replicas' statuses.
fn overlay_reports(d: &mut Desired) {
    for (name, rec) in &d.volumes {
        let controller_node = rec.value.placement.controller.as_ref().map(|c| &c.node);
        let controller = d.statuses.get(&(name.clone(), ServiceId::Controller)).cloned();
        for slot in &rec.value.placement.replicas {
            let key = (name.clone(), ServiceId::Replica(slot.id));
            if let Some(status) = d.statuses.remove(&key) {
                let status = status.with_report(slot.id, controller.as_ref(), controller_node);
                d.statuses.insert(key, status);
            }
        }
    }
}

/// The replica directories (`POOL/UUID/replica-ID`) in `node`'s directory
/// pools; what cannot be read is skipped (found again at a later pass).
fn find_replica_dirs(node: Option<&NodeRecord>) -> Vec<FoundReplica> {
    let mut out = Vec::new();
    let pools = node.map(|n| n.pools.as_slice()).unwrap_or_default();
    for pool in pools {
        let PoolKind::Directory(dir) = &pool.kind else {
            continue;
        };
        let Ok(volumes) = std::fs::read_dir(dir) else {
            continue;
        };
        for volume in volumes.flatten() {
            let Some(volume_id) = volume
                .file_name()
                .to_str()
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
            else {
                continue;
            };
            let Ok(replicas) = std::fs::read_dir(volume.path()) else {
                continue;
            };
            for replica in replicas.flatten() {
                let id = replica
                    .file_name()
                    .to_str()
                    .and_then(|s| s.strip_prefix("replica-"))
                    .and_then(|s| s.parse::<u32>().ok());
                if let Some(id) = id {
                    out.push(FoundReplica {
                        volume_id,
                        id,
                        path: replica.path(),
                    });
                }
            }
        }
    }
    out
}

/// Wakes the reconciler on every change of a volume record: list, then
/// watch from the list's revision; on a watch error, list again.
async fn watch_volumes(store: Arc<dyn Store>, changed: Arc<tokio::sync::Notify>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let watch = async {
            let (_, revision) = store.list(keys::VOLUMES).await?;
            let mut events = store.watch(keys::VOLUMES, revision + 1).await?;
            while let Some(event) = events.next().await {
                event?;
                changed.notify_one();
            }
            Ok::<(), StoreError>(())
        };
        match watch.await {
            Ok(()) => tracing::debug!("volume watch ended; watching again"),
            Err(e) => tracing::warn!(error = %e, "volume watch failed; listing again"),
        }
        // Whatever was missed is seen by the next pass, which lists.
        changed.notify_one();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(WATCH_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests;
