//! Where a volume's replicas go: a pure function of the nodes and the request.
//!
//! The rules, strongest first:
//! 1. **Distinct nodes.** A replica shares nothing with its siblings but the
//!    network: two replicas on one host are one failure, not two.
//! 2. **Only nodes fit for it**: up (its liveness key exists), neither
//!    cordoned nor draining, carrying every label of the selector (and of one
//!    of the requisite topologies, when the request names some), with a
//!    pool that has room for the volume's size (its capacity minus what
//!    placement has already given out there; a block device holds one
//!    replica) and a free port of its range.
//! 3. **Distinct values of the spread key** (`zone` by default) as far as the
//!    nodes allow: first one node from as many values as there are, then the
//!    rest. A node without the label is a domain of its own (nothing says it
//!    shares a zone with anyone).
//! 4. **Preferred topologies first** (CSI's `preferred`, in its order), then
//!    **least used first**, then by name: the bytes given out on a node, and
//!    within it on a pool. Ties are broken by name so that the same input
//!    always gives the same placement (an API retry, a test, two agents
//!    computing it at once).
//!
//! When the rules cannot be met, placement fails with a message naming the
//! constraint and why each node that did not qualify was left out.
//!
//! **The one-host cluster** is the exception: when the cluster has exactly one
//! node, a volume of several replicas lives on it, in distinct pools as far as
//! there are pools with room, else in distinct directories of one pool, and
//! [`Placed::shared_failure_domain`] says so for `volume inspect` to warn.
//! The exception is decided by the number of nodes the cluster *has*, not the
//! number that qualify: a cluster of three hosts that lost two must refuse to
//! stack a new volume's replicas on the survivor, which would look replicated
//! and not be.

use std::collections::{BTreeMap, BTreeSet};

use basalt_engine::units::format_size;

use crate::model::{
    ControllerSlot, NodeName, NodeRecord, Placement, PoolKind, PoolRecord, PortRange, ReplicaSlot,
    TopologyRule, VolumeRecord, VolumeSpec,
};

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

impl Usage {
    /// Count `replicas` (of `size_bytes` each) as given out.
    pub fn add_replicas(&mut self, size_bytes: u64, replicas: &[ReplicaSlot]) {
        for slot in replicas {
            let used = self
                .bytes
                .entry((slot.node.clone(), slot.pool.clone()))
                .or_default();
            *used = used.saturating_add(size_bytes);
            self.ports.entry(slot.node.clone()).or_default().insert(slot.port);
        }
    }

    /// Count a controller's two ports as given out.
    pub fn add_controller(&mut self, controller: &ControllerSlot) {
        let ports = self.ports.entry(controller.node.clone()).or_default();
        ports.insert(controller.iscsi_port);
        ports.insert(controller.api_port);
    }

    /// Count everything `placement` holds for a volume of `size_bytes`.
    pub fn add_placement(&mut self, size_bytes: u64, placement: &Placement) {
        self.add_replicas(size_bytes, &placement.replicas);
        if let Some(controller) = &placement.controller {
            self.add_controller(controller);
        }
    }

    /// Bytes given out on `pool` of `node`.
    pub fn pool_bytes(&self, node: &NodeName, pool: &str) -> u64 {
        self.bytes
            .get(&(node.clone(), pool.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Bytes given out on all pools of `node`.
    pub fn node_bytes(&self, node: &NodeName) -> u64 {
        self.bytes
            .range((node.clone(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .fold(0u64, |sum, (_, used)| sum.saturating_add(*used))
    }

    /// The ports of `range` not given out on `node`, lowest first.
    pub fn free_ports(&self, node: &NodeName, range: PortRange) -> impl Iterator<Item = u16> + '_ {
        let taken = self.ports.get(node);
        (range.first..=range.last).filter(move |port| !taken.is_some_and(|t| t.contains(port)))
    }

    /// How many ports are given out on `node` (its services, roughly: a
    /// replica holds one, a controller two).
    pub fn port_count(&self, node: &NodeName) -> usize {
        self.ports.get(node).map_or(0, BTreeSet::len)
    }
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
    /// Labels the replicas' nodes must (requisite) and would rather (preferred) have.
    pub topology: TopologyRule,
}

impl Request {
    /// What a new volume of `spec` needs: all its replicas, ids from 0.
    pub fn for_volume(spec: &VolumeSpec) -> Request {
        Request {
            replicas: spec.replicas,
            size_bytes: spec.size_bytes,
            selector: spec.selector.clone(),
            spread_key: spec.spread_key.clone(),
            exclude: BTreeSet::new(),
            first_id: 0,
            topology: spec.topology.clone(),
        }
    }
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

/// What `volumes` have already been given. Volumes being deleted still count:
/// their data and ports are held until their services are gone.
pub fn usage(volumes: &[VolumeRecord]) -> Usage {
    let mut usage = Usage::default();
    for volume in volumes {
        usage.add_placement(volume.spec.size_bytes, &volume.placement);
    }
    usage
}

/// How many more replicas of `size` bytes `pool` takes when `used` bytes of
/// it are given out.
fn pool_room(pool: &PoolRecord, used: u64, size: u64) -> u64 {
    match pool.kind {
        // A raw device is given whole to one replica.
        PoolKind::BlockDevice(_) => u64::from(used == 0 && pool.capacity_bytes >= size),
        PoolKind::Directory(_) => pool.capacity_bytes.saturating_sub(used) / size.max(1),
    }
}

/// Why a node cannot take a replica (or a controller).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Unfit {
    Excluded,
    Down,
    Draining,
    Cordoned,
    Label {
        key: String,
        want: String,
        have: Option<String>,
    },
    NoRoom {
        largest_free: u64,
    },
    NoPort,
    /// Outside every requisite topology.
    Topology,
}

impl Unfit {
    fn describe(&self, node: &NodeRecord) -> String {
        let name = &node.name;
        match self {
            Unfit::Excluded => format!("node {name} already holds a replica of the volume"),
            Unfit::Down => format!("node {name} is down"),
            Unfit::Draining => format!("node {name} is draining"),
            Unfit::Cordoned => format!("node {name} is cordoned"),
            Unfit::Label {
                key,
                want,
                have: None,
            } => format!("node {name} has no label {key} (the selector wants {key}={want})"),
            Unfit::Label {
                key,
                want,
                have: Some(have),
            } => {
                format!("node {name} has {key}={have} (the selector wants {key}={want})")
            }
            Unfit::NoRoom { largest_free } => match node.pools.len() {
                0 => format!("node {name} has no pool"),
                _ => format!(
                    "node {name} has no pool with room (most free in one pool: {})",
                    format_size(*largest_free)
                ),
            },
            Unfit::NoPort => format!(
                "node {name} has no free port in {}-{}",
                node.ports.first, node.ports.last
            ),
            Unfit::Topology => format!("node {name} is in none of the requisite topologies"),
        }
    }
}

/// Whether a node is up and open for new services (the checks replicas and
/// controllers share).
fn open_for_services(node: &NodeView) -> Result<(), Unfit> {
    if !node.up {
        Err(Unfit::Down)
    } else if node.record.draining {
        Err(Unfit::Draining)
    } else if node.record.cordoned {
        Err(Unfit::Cordoned)
    } else {
        Ok(())
    }
}

/// A pool that can take at least one more replica, with what placement
/// needs to rank and fill it.
#[derive(Clone, Debug)]
struct PoolRoom {
    name: String,
    used: u64,
    room: u64,
}

/// A node that can take a replica.
#[derive(Clone, Debug)]
struct Candidate<'a> {
    node: &'a NodeRecord,
    used: u64,
    /// Pools with room, least used first, then by name (never empty).
    pools: Vec<PoolRoom>,
    /// The first of `pools`.
    best_pool: String,
    /// The lowest free port.
    port: u16,
    /// The spread domain: the spread key's value, or the node itself when
    /// the label is missing.
    domain: Domain<'a>,
    /// Its rank among the preferred topologies (0 first).
    preference: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Domain<'a> {
    Value(&'a str),
    Node(&'a str),
}

fn check_node<'a>(request: &Request, view: &'a NodeView, usage: &Usage) -> Result<Candidate<'a>, Unfit> {
    let node = &view.record;
    if request.exclude.contains(&node.name) {
        return Err(Unfit::Excluded);
    }
    open_for_services(view)?;
    if !request.topology.admits(&node.labels) {
        return Err(Unfit::Topology);
    }
    for (key, want) in &request.selector {
        let have = node.labels.get(key);
        if have != Some(want) {
            return Err(Unfit::Label {
                key: key.clone(),
                want: want.clone(),
                have: have.cloned(),
            });
        }
    }
    let mut pools: Vec<PoolRoom> = node
        .pools
        .iter()
        .map(|pool| {
            let used = usage.pool_bytes(&node.name, &pool.name);
            PoolRoom {
                name: pool.name.clone(),
                used,
                room: pool_room(pool, used, request.size_bytes),
            }
        })
        .filter(|pool| pool.room > 0)
        .collect();
    pools.sort_by(|a, b| (a.used, &a.name).cmp(&(b.used, &b.name)));
    let Some(best_pool) = pools.first().map(|pool| pool.name.clone()) else {
        let largest_free = node
            .pools
            .iter()
            .map(|pool| {
                let used = usage.pool_bytes(&node.name, &pool.name);
                match pool.kind {
                    PoolKind::BlockDevice(_) if used > 0 => 0,
                    _ => pool.capacity_bytes.saturating_sub(used),
                }
            })
            .max()
            .unwrap_or(0);
        return Err(Unfit::NoRoom { largest_free });
    };
    let Some(port) = usage.free_ports(&node.name, node.ports).next() else {
        return Err(Unfit::NoPort);
    };
    let domain = match node.labels.get(&request.spread_key) {
        Some(value) => Domain::Value(value),
        None => Domain::Node(node.name.as_str()),
    };
    Ok(Candidate {
        node,
        used: usage.node_bytes(&node.name),
        pools,
        best_pool,
        port,
        domain,
        preference: request.topology.preference(&node.labels),
    })
}

/// Place `request`'s replicas on `nodes` given what is already in use.
pub fn place(request: &Request, nodes: &[NodeView], usage: &Usage) -> Result<Placed, PlacementError> {
    if request.replicas == 0 {
        return Err(PlacementError::Unsatisfiable(
            "a volume needs at least 1 replica".to_string(),
        ));
    }
    if request.size_bytes == 0 {
        return Err(PlacementError::Unsatisfiable(
            "a volume's size must be more than 0 bytes".to_string(),
        ));
    }
    if request
        .first_id
        .checked_add(u32::from(request.replicas) - 1)
        .is_none()
    {
        return Err(PlacementError::Unsatisfiable(format!(
            "replica ids from {} on would pass {}: the volume has had too many replicas",
            request.first_id,
            u32::MAX
        )));
    }

    let mut candidates = Vec::new();
    let mut unfit = Vec::new();
    for view in by_name(nodes) {
        match check_node(request, view, usage) {
            Ok(candidate) => candidates.push(candidate),
            Err(why) => unfit.push(why.describe(&view.record)),
        }
    }
    candidates
        .sort_by(|a, b| (a.preference, a.used, &a.node.name).cmp(&(b.preference, b.used, &b.node.name)));

    if nodes.len() == 1 && request.replicas > 1 {
        return place_on_one_host(request, candidates.first(), &unfit, usage);
    }

    let wanted = usize::from(request.replicas);
    if candidates.len() < wanted {
        let qualified: Vec<&str> = candidates.iter().map(|c| c.node.name.as_str()).collect();
        let mut message = format!(
            "{} need {} with {} free in a pool{} and a free port; {} qualif{}",
            plural(wanted, "replica", "replicas"),
            plural(wanted, "node", "distinct nodes"),
            format_size(request.size_bytes),
            selector_clause(&request.selector),
            candidates.len(),
            if candidates.len() == 1 { "ies" } else { "y" },
        );
        if !qualified.is_empty() {
            message.push_str(&format!(" ({})", qualified.join(", ")));
        }
        if !unfit.is_empty() {
            message.push_str(&format!(": {}", unfit.join("; ")));
        }
        message.push_str("; add nodes or room, uncordon nodes, or ask for fewer replicas");
        return Err(PlacementError::Unsatisfiable(message));
    }

    // One node from each spread domain first (least used first), then fill
    // up from the rest in the same order: the number of distinct domains
    // is min(replicas, domains available), the most any choice can have.
    let mut chosen: Vec<&Candidate> = Vec::with_capacity(wanted);
    let mut domains = BTreeSet::new();
    for candidate in &candidates {
        if chosen.len() < wanted && domains.insert(candidate.domain) {
            chosen.push(candidate);
        }
    }
    for candidate in &candidates {
        if chosen.len() < wanted && !chosen.iter().any(|c| c.node.name == candidate.node.name) {
            chosen.push(candidate);
        }
    }

    let replicas = (request.first_id..)
        .zip(&chosen)
        .map(|(id, candidate)| ReplicaSlot {
            id,
            node: candidate.node.name.clone(),
            pool: candidate.best_pool.clone(),
            port: candidate.port,
        })
        .collect();
    Ok(Placed {
        replicas,
        shared_failure_domain: false,
    })
}

/// The one-host cluster: every replica on its one node, in distinct pools as
/// far as the pools with room go, then sharing (distinct directories of) the
/// directory pools that still have room.
fn place_on_one_host(
    request: &Request,
    candidate: Option<&Candidate>,
    unfit: &[String],
    usage: &Usage,
) -> Result<Placed, PlacementError> {
    let wanted = usize::from(request.replicas);
    let Some(candidate) = candidate else {
        return Err(PlacementError::Unsatisfiable(format!(
            "{} need a node with {} free in a pool{} and free ports, and this one-host cluster has none: {}",
            plural(wanted, "replica", "replicas"),
            format_size(request.size_bytes),
            selector_clause(&request.selector),
            unfit.join("; ")
        )));
    };
    let node = candidate.node;
    let mut ports = usage.free_ports(&node.name, node.ports);
    let pools = &candidate.pools;
    let mut taken = vec![0u64; pools.len()];
    let mut replicas = Vec::with_capacity(wanted);
    for id in (request.first_id..).take(wanted) {
        // Among the pools with room left, the one this volume uses least,
        // then the least used, then by name (the order of `pools`).
        let Some(index) = (0..pools.len())
            .filter(|&i| taken[i] < pools[i].room)
            .min_by_key(|&i| (taken[i], i))
        else {
            let total: u64 = candidate.pools.iter().map(|p| p.room).sum();
            return Err(PlacementError::Unsatisfiable(format!(
                "{} of {} each need room in the pools of node {} (a one-host cluster), and they hold only {total} more; add a pool or room, or ask for fewer replicas",
                plural(wanted, "replica", "replicas"),
                format_size(request.size_bytes),
                node.name
            )));
        };
        let Some(port) = ports.next() else {
            return Err(PlacementError::Unsatisfiable(format!(
                "{} need {wanted} free ports on node {} (a one-host cluster), and its range {}-{} has only {} free; widen node.ports",
                plural(wanted, "replica", "replicas"),
                node.name,
                node.ports.first,
                node.ports.last,
                replicas.len()
            )));
        };
        taken[index] += 1;
        replicas.push(ReplicaSlot {
            id,
            node: node.name.clone(),
            pool: pools[index].name.clone(),
            port,
        });
    }
    Ok(Placed {
        replicas,
        shared_failure_domain: true,
    })
}

/// `nodes` in name order, so that messages list them the same way whatever
/// order the store returned them in.
fn by_name(nodes: &[NodeView]) -> Vec<&NodeView> {
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    sorted
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn selector_clause(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return String::new();
    }
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(", labelled {}", labels.join(","))
}

/// Place a volume's controller: on a node that is up and holds one of its
/// replicas where possible (its reads then stay local).
///
/// Among the fit nodes (up, neither cordoned nor draining, two free ports)
/// the one with the fewest services wins (ports given out), then by name.
/// The ports of `replicas` count as taken even if `usage` does not hold them
/// yet (a volume being created), so the controller never gets a replica's
/// port.
pub fn place_controller(
    replicas: &[ReplicaSlot],
    nodes: &[NodeView],
    usage: &Usage,
    generation: u64,
) -> Result<ControllerSlot, PlacementError> {
    let mut usage = usage.clone();
    for slot in replicas {
        usage
            .ports
            .entry(slot.node.clone())
            .or_default()
            .insert(slot.port);
    }
    let mut fit = Vec::new();
    let mut unfit = Vec::new();
    for view in by_name(nodes) {
        let node = &view.record;
        let checked = open_for_services(view).and_then(|()| {
            let mut free = usage.free_ports(&node.name, node.ports);
            match (free.next(), free.next()) {
                (Some(iscsi), Some(api)) => Ok((iscsi, api)),
                _ => Err(Unfit::NoPort),
            }
        });
        match checked {
            Ok(ports) => {
                let holds_replica = replicas.iter().any(|slot| slot.node == node.name);
                // Holders first, then fewest services, then name.
                fit.push(((!holds_replica, usage.port_count(&node.name), &node.name), ports));
            }
            Err(Unfit::NoPort) => unfit.push(format!(
                "node {} has fewer than 2 free ports in {}-{}",
                node.name, node.ports.first, node.ports.last
            )),
            Err(why) => unfit.push(why.describe(node)),
        }
    }
    fit.sort();
    match fit.first() {
        Some(((_, _, node), (iscsi_port, api_port))) => Ok(ControllerSlot {
            node: (*node).clone(),
            iscsi_port: *iscsi_port,
            api_port: *api_port,
            generation,
        }),
        None => Err(PlacementError::Unsatisfiable(format!(
            "the controller needs a node that is up, not cordoned, with 2 free ports; none qualifies{}{}; uncordon or add a node, or widen node.ports",
            if unfit.is_empty() { "" } else { ": " },
            unfit.join("; ")
        ))),
    }
}

/// Builders shared with the failover tests.
#[cfg(test)]
pub(crate) mod tests;
