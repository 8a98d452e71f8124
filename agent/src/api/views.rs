//! What the API takes and answers: the JSON bodies, shared by the server and its client
//! ([`crate::client`]). `agent/openapi.json` describes exactly these shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    NodeName, Placement, PoolKind, PortRange, QosSpec, ServiceStatus, SnapshotRef, TargetAccess,
    TopologyRule, VolumePhase,
};

/// `POST /v1/volumes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Required unless `from_snapshot` is given (a clone then has its source's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Default [`DEFAULT_REPLICAS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy: Option<u8>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Default [`DEFAULT_SPREAD_KEY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_key: Option<String>,
    #[serde(default)]
    pub qos: Qos,
    /// `VOLUME/SNAPSHOT`: make this volume a clone of that snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Node labels the replicas' nodes must (`requisite`: one of the sets) and would rather
    /// (`preferred`, in order) carry: the CSI driver's accessibility requirements.
    #[serde(default, skip_serializing_if = "TopologyRule::is_any")]
    pub topology: TopologyRule,
    /// Who may log in to its target: `any` (default), or `attached_node` (only the node it is attached
    /// to, nobody while detached).
    #[serde(default, skip_serializing_if = "TargetAccess::is_any")]
    pub access: TargetAccess,
}

/// QoS limits in a request (`PUT /v1/volumes/{name}/qos`, or at create): [`QosSpec`]'s fields, each
/// absent or `null` field no limit. An unknown field is refused rather than ignored: a misspelt limit
/// would otherwise silently be no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Qos(pub QosSpec);

/// The fields of [`Qos`], for the message that refuses another.
const QOS_FIELDS: &[&str] = &[
    "read_iops",
    "write_iops",
    "total_iops",
    "read_bytes_per_sec",
    "write_bytes_per_sec",
    "total_bytes_per_sec",
];

impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Qos, D::Error> {
        let fields = BTreeMap::<String, Option<u64>>::deserialize(d)?;
        let mut spec = QosSpec::default();
        for (name, value) in fields {
            let slot = match name.as_str() {
                "read_iops" => &mut spec.read_iops,
                "write_iops" => &mut spec.write_iops,
                "total_iops" => &mut spec.total_iops,
                "read_bytes_per_sec" => &mut spec.read_bytes_per_sec,
                "write_bytes_per_sec" => &mut spec.write_bytes_per_sec,
                "total_bytes_per_sec" => &mut spec.total_bytes_per_sec,
                other => return Err(serde::de::Error::unknown_field(other, QOS_FIELDS)),
            };
            *slot = value;
        }
        Ok(Qos(spec))
    }
}

/// Replicas of a volume when the request does not say: three survive the loss of one with a majority.
pub const DEFAULT_REPLICAS: u8 = 3;
/// The label replicas spread over when the request does not say.
pub const DEFAULT_SPREAD_KEY: &str = "zone";

/// `POST /v1/volumes/{name}/expand`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpandVolume {
    pub size_bytes: u64,
}

/// `POST /v1/volumes/{name}/attach`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    pub node: String,
}

/// `POST /v1/volumes/{name}/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: String,
}

/// A volume as the API shows it: the record, the statuses its agents reported, and what follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
    pub replicas: u8,
    pub min_healthy: Option<u8>,
    pub selector: BTreeMap<String, String>,
    pub spread_key: String,
    pub qos: QosSpec,
    pub source: Option<SnapshotRef>,
    pub phase: VolumePhase,
    pub attached_to: Option<NodeName>,
    pub placement: Placement,
    /// Each service's last reported status, by service (`replica-1`, `controller`).
    pub statuses: BTreeMap<String, ServiceStatus>,
    /// Where initiators log in (`iscsi://ADDR:PORT/IQN/0`), once a controller is placed.
    pub iscsi_url: Option<String>,
    /// Some replicas share a node: losing it loses them together.
    pub shared_failure_domain: bool,
    /// Things the operator should know (a shared failure domain, ...).
    pub warnings: Vec<String>,
    /// While deleting: the nodes that have not yet removed their parts (a node that is down stays
    /// here until its agent returns and finishes).
    pub cleanup_pending: Vec<NodeName>,
}

/// `GET /v1/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    pub volumes: Vec<VolumeView>,
}

/// A pool of a node, with what placement has given out of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    pub kind: PoolKind,
    pub capacity_bytes: u64,
    /// Bytes given to replicas placed here.
    pub used_bytes: u64,
    /// `capacity_bytes - used_bytes` (what placement may still give).
    pub free_bytes: u64,
    /// Free bytes on the filesystem or device as the agent last measured.
    pub fs_free_bytes: u64,
}

/// A replica a node holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReplica {
    pub volume: String,
    pub id: u32,
    pub pool: String,
    pub port: u16,
}

/// A node as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: NodeName,
    pub address: String,
    pub api_url: String,
    pub labels: BTreeMap<String, String>,
    pub pools: Vec<PoolView>,
    pub ports: PortRange,
    /// Its lease is alive.
    pub up: bool,
    /// When the node was found down (Unix seconds): the down mark the first agent to see its lease
    /// lapse wrote, from which `failover.replica_grace` counts. Absent while it is up, and until an
    /// agent has marked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since_unix: Option<u64>,
    pub cordoned: bool,
    pub draining: bool,
    /// The iSCSI initiator name its attachments log in as ([`NodeRecord::initiator_name`]).
    ///
    /// [`NodeRecord::initiator_name`]: crate::model::NodeRecord::initiator_name
    pub initiator: String,
    pub replicas: Vec<HeldReplica>,
    /// Volumes whose controller runs here.
    pub controllers: Vec<String>,
}

/// `GET /v1/nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// `GET /v1/instance`: who answers, and who asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The node of the agent that answered.
    pub node: NodeName,
    pub address: Option<String>,
    /// The caller's node (its instance ID): the node whose address is the `address` asked about or,
    /// without one, the address the request came from; `null` if no node has it.
    pub caller: Option<NodeName>,
    /// The address that was looked up.
    pub caller_address: String,
}

/// A snapshot, as the volume's controller lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    pub name: String,
    pub created_unix: i64,
    pub parent: String,
    pub allocated_bytes: u64,
}

/// `GET /v1/volumes/{name}/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotView>,
    /// One line per replica whose chain differs from the others'.
    pub divergent: Vec<String>,
}

/// The answer of a snapshot operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResult {
    pub volume: String,
    pub snapshot: String,
    /// Replicas that failed the operation and were dropped from the volume (rebuilt later).
    pub dropped: Vec<String>,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `degraded` when the cluster store does not answer (the agent
    /// still serves its volumes; control operations wait).
    pub status: String,
    pub node: NodeName,
    pub store: StoreHealth,
}

/// The cluster store as this agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHealth {
    pub kind: crate::store::StoreKind,
    /// Do several hosts share it (etcd)?
    pub shared: bool,
    pub available: bool,
    /// Why it is not available, and what to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
