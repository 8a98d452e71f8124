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
//! * on the controller's node: phase `Creating` → `Ready` once the
//!   controller answers `VolumeInfo`; `Ready` ↔ `Degraded` from its view of
//!   its replicas; a larger `spec.size_bytes` is applied with
//!   `VolumeExpand`; other QoS limits with `VolumeSetQos`;
//! * phase `Deleting`: this node's services stop, its replicas' data
//!   directories and its statuses are deleted; once no status of the volume
//!   remains, the record and its secrets are deleted (revision checked, so
//!   two agents doing it at once are harmless);
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
    keys, NodeName, NodeRecord, PoolKind, QosSpec, ServiceId, ServiceState, ServiceStatus, VolumePhase,
    VolumeRecord, VolumeSecrets,
};
use crate::runtime::{
    CloneSource, ControllerSpec, Observed, ReplicaSpec, ReplicaStorage, Runtime, ServiceKey, ServiceSpec,
};
use crate::store::{self, Expect, Store, StoreError, Versioned};

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
    /// Nodes whose liveness key exists.
    pub up: BTreeSet<NodeName>,
    pub statuses: BTreeMap<(VolumeName, ServiceId), ServiceStatus>,
}

/// What this node sees of its services.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub services: BTreeMap<ServiceKey, Observed>,
    /// The controllers on this node that answered `VolumeInfo`.
    pub controllers: BTreeMap<VolumeName, ControllerView>,
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
            | Action::WriteStatus { volume, .. }
            | Action::DeleteStatus { volume, .. }
            | Action::SetPhase { volume, .. }
            | Action::Expand { volume, .. }
            | Action::SetQos { volume, .. }
            | Action::SetAllowList { volume, .. }
            | Action::RemoveSecretFiles { volume }
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
            wanted.insert(key.clone());
            let built = service_spec(local, desired, seen, v, service);
            let stored = desired.statuses.get(&(name.clone(), service.clone()));
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
                            // A replica's mode is the controller's view, which
                            // this node's runtime does not see; left unset, the
                            // failover decisions count no replica as a survivor
                            // and replace none.
                            mode: None,
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
                    };
                    push_status(&mut actions, name, service, stored, status);
                }
            }
        }
        if mine.contains(&ServiceId::Controller) {
            plan_controller(name, rec, seen.controllers.get(name), &mut actions);
        }
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
    });
    if !same {
        actions.push(Action::WriteStatus {
            volume: volume.clone(),
            service: service.clone(),
            status,
        });
    }
}

fn plan_controller(
    name: &VolumeName,
    rec: &Versioned<VolumeRecord>,
    view: Option<&ControllerView>,
    actions: &mut Vec<Action>,
) {
    let v = &rec.value;
    let Some(view) = view else { return };
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
    let allowed = normalized(crate::model::allowed_initiators(v));
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
        if let Some(PoolKind::Directory(dir)) = pool.map(|p| &p.kind) {
            actions.push(Action::RemoveData {
                volume: name.clone(),
                path: replica_dir(dir, &v.spec.uuid, slot.id),
            });
        }
    }
    let mut remaining = 0;
    for ((volume, service), status) in desired.statuses.range((name.clone(), ServiceId::Replica(0))..) {
        if volume != name {
            break;
        }
        if status.node == *me {
            actions.push(Action::DeleteStatus {
                volume: name.clone(),
                service: service.clone(),
            });
        } else {
            remaining += 1;
        }
    }
    if !mine.is_empty() {
        actions.push(Action::RemoveSecretFiles { volume: name.clone() });
    }
    // The last agent with something of this volume deletes the record; an
    // agent holding nothing of it leaves that to those that do.
    let involved = !mine.is_empty() || desired.statuses.keys().any(|(vol, _)| vol == name);
    if remaining == 0 && (involved || v.placement.replicas.is_empty()) {
        actions.push(Action::DeleteVolume {
            volume: name.clone(),
            revision: rec.revision,
        });
    }
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
    ControllerView {
        size_bytes: reply.size_bytes,
        serving: reply.state == "serving",
        rw_replicas: reply
            .replicas
            .iter()
            .filter(|r| r.mode == "RW" && !r.removed)
            .count(),
        qos: qos_from_reply(reply.qos.as_ref()),
        allowed: normalized(reply.allow_restricted.then(|| reply.allowed_initiators.clone())),
    }
}

/// The reconciler of one node: runs passes until cancelled.
pub struct Reconciler {
    pub store: Arc<dyn Store>,
    pub runtime: Arc<dyn Runtime>,
    pub local: Local,
    pub metrics: Arc<AgentMetrics>,
    /// How long a node may be down before its replicas are replaced.
    pub replica_grace: Duration,
    /// When this agent first saw each down node down (unix seconds).
    pub down_since: std::sync::Mutex<BTreeMap<NodeName, u64>>,
}

/// The failover decisions of every volume that is not being deleted
/// ([`crate::failover::decide`]), with the record to write for each that
/// changes something. `down_since` is updated: nodes seen down for the
/// first time are recorded at `now_unix`, nodes up again forgotten.
pub fn failover_plans(
    desired: &Desired,
    down_since: &mut BTreeMap<NodeName, u64>,
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
    for view in &nodes {
        if view.up {
            down_since.remove(&view.record.name);
        } else {
            down_since.entry(view.record.name.clone()).or_insert(now_unix);
        }
    }
    let records: Vec<VolumeRecord> = desired.volumes.values().map(|v| v.value.clone()).collect();
    let usage = crate::placement::usage(&records);
    let mut out = Vec::new();
    for (name, rec) in &desired.volumes {
        if rec.value.phase == VolumePhase::Deleting {
            continue;
        }
        let statuses: BTreeMap<ServiceId, ServiceStatus> = desired
            .statuses
            .iter()
            .filter(|((v, _), _)| v == name)
            .map(|((_, s), st)| (s.clone(), st.clone()))
            .collect();
        let observed = crate::failover::Observed {
            nodes: &nodes,
            down_since,
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
        replica_grace: Duration,
    ) -> Reconciler {
        Reconciler {
            store,
            runtime,
            local,
            metrics,
            replica_grace,
            down_since: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Failover: moves controllers off down nodes and replaces replicas lost
    /// past the grace period, each record written with a revision check (an
    /// agent that loses the race finds nothing left to do at its next pass).
    async fn failover(&self, desired: &Desired, now_unix: u64) -> anyhow::Result<bool> {
        let plans = {
            let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
            failover_plans(desired, &mut down, now_unix, self.replica_grace)
        };
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
                tracing::info!(volume = %volume, "volume deleted");
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
    let mut d = Desired::default();
    for kv in alive {
        if let Some(Ok(n)) = kv.key.strip_prefix(keys::NODES_ALIVE).map(NodeName::new) {
            d.up.insert(n);
        }
    }
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
    Ok(d)
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
