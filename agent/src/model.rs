//! The cluster model: what the store holds, and under which keys.
//!
//! Desired state and observed state are kept apart so that the writer of each
//! record is always the same party:
//! * a [`NodeRecord`] is written by that node's agent (registration);
//! * a node is *up* while its liveness key ([`keys::node_alive`]) holds its
//!   [`NodeAlive`]: the key is attached to a lease that the agent keeps alive,
//!   so it disappears on its own when the agent stops renewing it. The first
//!   agent to find it gone puts a [`NodeDown`] mark there (create-only, no
//!   lease): when the node went down, one fact every agent reads, which the
//!   node's agent overwrites when it comes back ([`Liveness`]);
//! * a [`VolumeRecord`] (the volume's spec and where its services are placed)
//!   is written by the API and by the agents that move services (failover,
//!   replica replacement), always with a revision check;
//! * a [`ServiceStatus`] is written by the agent that runs the service; the
//!   controller's status carries its view of every replica
//!   ([`ControllerReport`]), which readers lay over the replicas' statuses
//!   ([`ServiceStatus::with_report`]): the mode of a replica is known only to
//!   its controller, and each record keeps one writer;
//! * a [`VolumeLease`] names the agent that runs a volume's controller. It is
//!   put with that agent's node lease, so it vanishes with the node, and it is
//!   created only where absent: two agents can never both hold it.
//!
//! Every record is JSON, so that `etcdctl get --prefix /basalt/` is readable
//! by an operator.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use basalt_engine::name::VolumeName;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The keys of the store. Every key starts with [`keys::ROOT`] so that one
/// etcd cluster can hold other data too.
pub mod keys {
    use super::{NodeName, ServiceId};
    use basalt_engine::name::VolumeName;

    pub const ROOT: &str = "/basalt/";
    /// Prefix of every node's registration.
    pub const NODES: &str = "/basalt/nodes/";
    /// Prefix of every node's liveness key (leased).
    pub const NODES_ALIVE: &str = "/basalt/alive/";
    /// Prefix of every volume's record.
    pub const VOLUMES: &str = "/basalt/volumes/";
    /// Prefix of every service's observed status.
    pub const STATUS: &str = "/basalt/status/";
    /// Prefix of every volume's secrets (the peer secret and the API token).
    pub const SECRETS: &str = "/basalt/secrets/";
    /// Prefix of every volume's controller lease ([`super::VolumeLease`]).
    pub const LEASES: &str = "/basalt/leases/";

    pub fn node(name: &NodeName) -> String {
        format!("{NODES}{name}")
    }
    pub fn node_alive(name: &NodeName) -> String {
        format!("{NODES_ALIVE}{name}")
    }
    pub fn volume(name: &VolumeName) -> String {
        format!("{VOLUMES}{name}")
    }
    /// Prefix of the statuses of one volume's services.
    pub fn volume_status(name: &VolumeName) -> String {
        format!("{STATUS}{name}/")
    }
    pub fn service_status(name: &VolumeName, service: &ServiceId) -> String {
        format!("{STATUS}{name}/{service}")
    }
    pub fn volume_secrets(name: &VolumeName) -> String {
        format!("{SECRETS}{name}")
    }
    /// Who runs the volume's controller: the one place that says so.
    pub fn volume_lease(name: &VolumeName) -> String {
        format!("{LEASES}{name}")
    }
}

/// A node's name: the same rules as a volume name (it becomes part of keys,
/// directory names and container names), checked by [`VolumeName`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, String> {
        VolumeName::new(name)
            .map(|_| NodeName(name.to_string()))
            .map_err(|e| e.to_string().replace("volume name", "node name"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = String;
    fn try_from(s: String) -> Result<NodeName, String> {
        NodeName::new(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

impl FromStr for NodeName {
    type Err = String;
    fn from_str(s: &str) -> Result<NodeName, String> {
        NodeName::new(s)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host as its agent registered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeName,
    /// The address other hosts (controllers, initiators, agents) reach this
    /// host's services at.
    pub address: std::net::IpAddr,
    /// The agent's REST API, as other agents and clients reach it.
    pub api_url: String,
    /// Topology labels (`zone`, `rack`, ...).
    pub labels: BTreeMap<String, String>,
    pub pools: Vec<PoolRecord>,
    /// Ports this host's services are given, `first..=last`.
    pub ports: PortRange,
    /// No new replica or controller is placed here.
    pub cordoned: bool,
    /// Replicas move away from here (implies cordoned).
    pub draining: bool,
    /// The iSCSI initiator name this host's attachments log in as: the kernel initiator's own
    /// (`/etc/iscsi/initiatorname.iscsi`) or, on the user-space path, [`initiator_iqn`]. A target that
    /// lets in only the node a volume is published to lets in this name. Absent: the host attaches
    /// nothing (no Docker or CSI node endpoint), or its agent predates the field; [`initiator_iqn`] then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
}

impl NodeRecord {
    /// The initiator name this node logs in as (see [`NodeRecord::initiator`]).
    pub fn initiator_name(&self) -> String {
        self.initiator
            .clone()
            .unwrap_or_else(|| initiator_iqn(&self.name))
    }
}

/// Where replicas may live on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub kind: PoolKind,
    /// Bytes placement may give to replicas here (the configured cap, or the
    /// filesystem's or device's size).
    pub capacity_bytes: u64,
    /// Bytes free on the filesystem or device as last measured (reported, not
    /// used by placement, which counts sizes it has given out).
    pub free_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "path")]
pub enum PoolKind {
    /// A host directory: each replica gets a subdirectory.
    Directory(std::path::PathBuf),
    /// A raw block device: it holds one replica.
    BlockDevice(std::path::PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A node's liveness, under [`keys::node_alive`], attached to the agent's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAlive {
    /// Unix seconds when the agent started.
    pub since_unix: u64,
}

/// A down node's mark, under its [`keys::node_alive`], with no lease.
///
/// Failover's grace period counts from here. It is kept in the store, not in
/// each agent's memory, so that every agent agrees on it whoever decides, and
/// so that it cannot outlive the outage it marks:
/// * it is created only where the key is absent (the node's lease lapsed or
///   was revoked): the first agent to see the node down sets the time, the
///   others' creates fail, and none can be made while the node is up;
/// * the node's agent, back, puts its [`NodeAlive`] over it unconditionally,
///   in the same write that makes it up again. A node that comes back and
///   goes down again between two passes of every other agent therefore gets
///   a new mark, never the earlier one (an agent's own memory of "seen down"
///   would still hold the earlier time: it never saw the node up).
///
/// The time is the marking agent's clock; agents compare it with their own,
/// so clock skew between hosts shifts the grace by as much (keep hosts on
/// NTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDown {
    /// Unix seconds when an agent first found the node's liveness key gone.
    pub down_since_unix: u64,
}

/// What a node's liveness key holds: the node's own [`NodeAlive`] (up), or
/// another agent's [`NodeDown`] mark. No key at all is a node down and not
/// yet marked.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Liveness {
    /// Tried first: a [`NodeAlive`] lacks `down_since_unix`.
    Down(NodeDown),
    Up(NodeAlive),
}

impl Liveness {
    pub fn is_up(&self) -> bool {
        matches!(self, Liveness::Up(_))
    }
}

/// A volume: what was asked for, and where its services are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub spec: VolumeSpec,
    pub placement: Placement,
    pub phase: VolumePhase,
    /// The node the volume is attached to (its initiator's host), if any.
    pub attached_to: Option<NodeName>,
}

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: VolumeName,
    pub uuid: Uuid,
    pub size_bytes: u64,
    pub replicas: u8,
    /// Fewest read-write replicas with which the volume serves I/O (default:
    /// a majority).
    pub min_healthy: Option<u8>,
    /// Only nodes carrying all these labels hold replicas.
    pub selector: BTreeMap<String, String>,
    /// Replicas go to distinct values of this label where the nodes allow it.
    pub spread_key: String,
    pub qos: QosSpec,
    /// The snapshot this volume was cloned from.
    pub source: Option<SnapshotRef>,
    /// Where its replicas may and would rather live (CSI's accessibility requirements); kept so that a
    /// replacement replica obeys it too.
    #[serde(default, skip_serializing_if = "TopologyRule::is_any")]
    pub topology: TopologyRule,
    /// Which initiators may log in to its target.
    #[serde(default, skip_serializing_if = "TargetAccess::is_any")]
    pub access: TargetAccess,
}

/// Who may log in to a volume's iSCSI target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetAccess {
    /// Every initiator (a volume used by hand through its iSCSI URL).
    #[default]
    Any,
    /// Only the initiator of the node it is attached to ([`initiator_iqn`]), nobody while it is
    /// detached: the CSI spec's authorized access, so a node it was never published to cannot log in.
    AttachedNode,
}

impl TargetAccess {
    pub fn is_any(&self) -> bool {
        *self == TargetAccess::Any
    }
}

/// The initiator name a node's user-space attachments log in with (a kernel initiator has a name of its
/// own: [`NodeRecord::initiator`]).
pub fn initiator_iqn(node: &NodeName) -> String {
    format!("iqn.2026-11.io.basalt.node:{node}")
}

/// The initiators `volume`'s target should let in now (`None` for any): the names the nodes it is
/// attached to registered, [`initiator_iqn`] for a node not registered.
pub fn allowed_initiators(
    volume: &VolumeRecord,
    nodes: &BTreeMap<NodeName, NodeRecord>,
) -> Option<Vec<String>> {
    match volume.spec.access {
        TargetAccess::Any => None,
        TargetAccess::AttachedNode => Some(
            volume
                .attached_to
                .iter()
                .map(|n| {
                    nodes
                        .get(n)
                        .map_or_else(|| initiator_iqn(n), NodeRecord::initiator_name)
                })
                .collect(),
        ),
    }
}

/// Node labels a volume's replicas must and would rather have, beyond the selector: CSI's
/// `accessibility_requirements` (requisite and preferred topologies) in the nodes' own label names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyRule {
    /// Every replica's node carries all the labels of at least one of these (empty: any node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requisite: Vec<BTreeMap<String, String>>,
    /// Nodes matching an earlier one of these are chosen first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<BTreeMap<String, String>>,
}

impl TopologyRule {
    /// No constraint and no preference.
    pub fn is_any(&self) -> bool {
        self.requisite.is_empty() && self.preferred.is_empty()
    }

    /// Whether a node with `labels` may hold a replica.
    pub fn admits(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requisite.is_empty() || self.requisite.iter().any(|term| matches_term(term, labels))
    }

    /// The rank of a node with `labels`: the index of the first preferred term it matches, or the
    /// number of terms (after every preferred node).
    pub fn preference(&self, labels: &BTreeMap<String, String>) -> usize {
        self.preferred
            .iter()
            .position(|term| matches_term(term, labels))
            .unwrap_or(self.preferred.len())
    }
}

/// Whether `labels` hold every label of `term`.
pub fn matches_term(term: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    term.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// QoS limits as the API takes them (`None`: unlimited); checked against the
/// engine's ranges (`basalt_engine::volume::qos`) when set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosSpec {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub total_iops: Option<u64>,
    pub read_bytes_per_sec: Option<u64>,
    pub write_bytes_per_sec: Option<u64>,
    pub total_bytes_per_sec: Option<u64>,
}

/// `VOLUME/SNAPSHOT`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub volume: VolumeName,
    pub snapshot: String,
}

/// Where a volume's services run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub replicas: Vec<ReplicaSlot>,
    pub controller: Option<ControllerSlot>,
    /// The id the next replica given to this volume gets: ids are never
    /// reused, even after a slot is removed without a replacement, so a
    /// new replica never picks up a predecessor's status or data directory.
    /// Records written before it existed read as 0, and whoever gives out
    /// ids takes the larger of it and one past the highest id present.
    #[serde(default)]
    pub next_replica_id: u32,
    /// Where this volume's replicas removed for good lived. The controller never takes a member
    /// back at an address it removed (a returning replica could hold stale data), so a later
    /// replica of the volume on the same node must not get one of these ports. Records written
    /// before it existed read as empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<RetiredAddress>,
}

/// A replica address a volume's controller removed for good ([`Placement::retired`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredAddress {
    pub node: NodeName,
    pub port: u16,
}

impl Placement {
    /// The first id free to give out: [`Placement::next_replica_id`], or one
    /// past the highest id present if that is larger (older records).
    pub fn first_free_replica_id(&self) -> u32 {
        let past_present = self
            .replicas
            .iter()
            .map(|slot| slot.id.saturating_add(1))
            .max()
            .unwrap_or(0);
        self.next_replica_id.max(past_present)
    }
}

/// One replica's home. `id` is stable for the life of the replica (a
/// replacement gets a new one), so a status and a data directory can be
/// told apart from a predecessor's on the same node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSlot {
    pub id: u32,
    pub node: NodeName,
    pub pool: String,
    /// The replica's data-path port on its node.
    pub port: u16,
}

/// Where the controller runs. `generation` counts the placements of the
/// controller (it rises each time failover moves it); the fence is not this
/// number but the engine's epoch: every controller that starts raises the
/// replicas to one above every epoch they have seen, and a replica refuses
/// any frame of a lower one, so an older controller can never write again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerSlot {
    pub node: NodeName,
    pub iscsi_port: u16,
    pub api_port: u16,
    pub generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumePhase {
    /// Recorded; services are being started.
    Creating,
    /// The controller serves I/O.
    Ready,
    /// Fewer healthy replicas than asked for.
    Degraded,
    /// `rm` asked; services are being stopped and data removed.
    Deleting,
}

/// One service of a volume: replica `id`, or the controller.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceId {
    Replica(u32),
    Controller,
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceId::Replica(id) => write!(f, "replica-{id}"),
            ServiceId::Controller => f.write_str("controller"),
        }
    }
}

/// What the agent running a service last saw of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub node: NodeName,
    pub state: ServiceState,
    /// The last error starting or running it, for `volume inspect`.
    pub message: Option<String>,
    /// Times it was restarted since the agent started.
    pub restarts: u32,
    /// Unix seconds of this report.
    pub updated_unix: u64,
    /// A replica's mode in its controller's view (none for a controller, or
    /// while nobody has reported it): whether it holds every write.
    #[serde(default)]
    pub mode: Option<ReplicaMode>,
    /// A replica's rebuild (mode WO), as its controller reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Progress>,
    /// A clone replica's copy of its source, as its controller reports it
    /// (until it is hydrated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydration: Option<Progress>,
    /// The controller's status only: what it last answered to `VolumeInfo`
    /// (none while it does not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ControllerReport>,
}

impl ServiceStatus {
    /// This replica status with what `controller`'s report says of replica
    /// `id` (its mode and progress) laid over it. Only a report made by the
    /// controller's own node (`controller_node`) about a replica its own node
    /// reported counts: anything else describes a predecessor, and leaves the
    /// mode unknown.
    pub fn with_report(
        mut self,
        id: u32,
        controller: Option<&ServiceStatus>,
        controller_node: Option<&NodeName>,
    ) -> ServiceStatus {
        let reported = controller
            .filter(|c| Some(&c.node) == controller_node)
            .and_then(|c| c.report.as_ref())
            .and_then(|r| r.replicas.iter().find(|r| r.id == id && r.node == self.node));
        self.mode = reported.map(|r| r.mode);
        self.rebuild = reported.and_then(|r| r.rebuild);
        self.hydration = reported.and_then(|r| r.hydration);
        self
    }
}

/// Bytes of a long operation done, of the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A controller's answer to `VolumeInfo`, in the placement's terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerReport {
    /// The epoch it serves with: one above every epoch its replicas had seen
    /// (the fence that stops an older controller).
    pub epoch: u64,
    /// At least min-healthy replicas are read-write: I/O is served.
    pub serving: bool,
    /// The replicas of the placement that are members of the volume.
    pub replicas: Vec<ReportedReplica>,
}

/// One replica in its controller's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedReplica {
    pub id: u32,
    pub node: NodeName,
    pub mode: ReplicaMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydration: Option<Progress>,
}

/// The agent running a volume's controller, under [`keys::volume_lease`],
/// put with that agent's node lease. An agent starts a controller only
/// while it holds this key, and deletes it only once its controller is
/// stopped; when its node dies the key lapses with the node's lease, and
/// the agent the volume record names next takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLease {
    pub node: NodeName,
    /// The controller slot's generation the lease was taken for.
    pub generation: u64,
}

/// A replica as its controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaMode {
    /// In sync: takes reads and writes. Only these count as copies of the
    /// volume.
    Rw,
    /// Rebuilding: takes writes while it catches up, not yet a full copy.
    Wo,
    /// Failed and out of the write path until it is rebuilt.
    Err,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    Starting,
    Running,
    /// Exited; restarting after a back-off.
    Failed,
    Stopped,
}

/// The secrets of a volume: the peer secret that proves its controller to
/// its replicas, and its management API's token. Kept under
/// [`keys::volume_secrets`], never in a `VolumeRecord` (which is listed and
/// shown), written to 0600 files for the services that need them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSecrets {
    pub peer_secret: String,
    pub api_token: String,
}

impl fmt::Debug for VolumeSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeSecrets { .. }")
    }
}
