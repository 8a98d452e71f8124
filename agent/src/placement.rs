//! Where a volume's replicas go: a pure function of the nodes and the request.
//!
//! (Signatures fixed by the skeleton so that the API and the reconciler can be
//! written against them; the agent-config branch writes the bodies.)

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{ControllerSlot, NodeName, NodeRecord, ReplicaSlot, VolumeRecord};

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub record: NodeRecord,
    /// Its liveness key exists.
    pub up: bool,
}

/// What is already given out on each node: bytes per pool and ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: BTreeMap<(NodeName, String), u64>,
    pub ports: BTreeMap<NodeName, BTreeSet<u16>>,
}

/// What a new volume (or a replacement replica) needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub replicas: u8,
    pub size_bytes: u64,
    pub selector: BTreeMap<String, String>,
    pub spread_key: String,
    /// Nodes that must not be used (those already holding a replica of the
    /// volume when a replacement is placed).
    pub exclude: BTreeSet<NodeName>,
    /// The first replica id to give out.
    pub first_id: u32,
}

/// A placement that worked, and whether its replicas share a failure domain
/// (a one-host cluster), for `volume inspect` to warn about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub replicas: Vec<ReplicaSlot>,
    pub shared_failure_domain: bool,
}

/// Why a placement is impossible; the message names the constraint not met.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{0}")]
    Unsatisfiable(String),
}

/// What `volumes` have already been given.
pub fn usage(volumes: &[VolumeRecord]) -> Usage {
    let _ = volumes;
    todo!("agent-config branch")
}

/// Place `request`'s replicas on `nodes` given what is already in use.
pub fn place(request: &Request, nodes: &[NodeView], usage: &Usage) -> Result<Placed, PlacementError> {
    let _ = (request, nodes, usage);
    todo!("agent-config branch")
}

/// Place a volume's controller: on a node that is up and holds one of its
/// replicas where possible (its reads then stay local).
pub fn place_controller(
    replicas: &[ReplicaSlot],
    nodes: &[NodeView],
    usage: &Usage,
    generation: u64,
) -> Result<ControllerSlot, PlacementError> {
    let _ = (replicas, nodes, usage, generation);
    todo!("agent-config branch")
}
