//! Who takes over a volume's controller, and when a lost replica is replaced: pure decisions.
//!
//! An agent that sees a node go down (its liveness key lapsed) calls
//! [`decide`] for each volume with a service there, and writes what
//! [`apply`] returns with a revision check: when two agents decide at once,
//! one write wins and the other re-reads and finds nothing left to do.
//! Every agent decides from the same store facts, so it does not matter
//! which one wins: when a node went down is the
//! [`NodeDown`](crate::model::NodeDown) mark the first agent to see it down
//! put in the store, not a time each agent remembers.
//!
//! ```text
//!   controller's node down ──────────────► MoveController (generation + 1)
//!   replica's node down  ── < grace ─────► Hold::ReplicaInGrace
//!                        ── ≥ grace ─┬───► ReplaceReplica (placement picks the node)
//!                                    └───► Hold::TooFewSurvivors
//!   replica's node gone (deregistered) ──► as past its grace
//!   replica's node draining ─┬─────────► AddReplica (membership + 1)
//!                            └─ its replacement in sync ──► RemoveReplica
//!   any replica rebuilding ─────────────► Hold::ReplacementRebuilding
//! ```
//!
//! The rules, and why:
//! * **A controller moves as soon as its node is down.** The lease already
//!   gave the node its time; a volume without a controller serves nothing.
//!   The new one goes to an up node holding a running replica where there is
//!   one (its reads stay local), and gets a generation above the old one, so
//!   the old controller, should it still run behind a partition, is fenced
//!   at the replicas by the epoch it can no longer raise.
//! * **A replica is replaced only after the grace period.** A replacement is a
//!   full copy of the volume and removes the lost replica from the membership
//!   for good; a node that reboots must not cost that. The grace counts from
//!   the node's down mark, which its agent overwrites when it comes back: a
//!   node that went down before, came back and went down again gets a whole
//!   grace from its latest lapse, even if the deciding agent never saw it up
//!   in between (an agent's memory of its first sighting would not).
//! * **Never below what the volume needs to serve.** The lost replica may hold
//!   the only copy of recent writes if the others are also behind, so it is
//!   given up only while the replicas that are running (on up nodes) are at
//!   least as many as the volume needs to serve (`min_healthy`, by default a
//!   majority): those survivors are what the replacement is rebuilt from.
//! * **Only in-sync replicas are survivors.** A replica counts as a copy of
//!   the volume only while its controller reports it RW; one still
//!   rebuilding (WO) is not a copy yet, so no further replacement starts
//!   until it is: each replacement is rebuilt from complete copies.
//! * **A draining node's replicas move one at a time, copy first.** Its
//!   replica still runs, so it is kept until its replacement is in sync:
//!   the volume never has fewer copies than it asked for during a drain.
//! * **A deregistered node does not come back** under its old registration,
//!   so its replicas are past their grace at once (no `down_since` is kept
//!   for a node that no longer exists).
//! * **A replacement never lands next to a sibling.** Placement is asked with
//!   the nodes of every replica of the volume excluded, and first among nodes
//!   whose spread domain no survivor occupies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::model::{
    ControllerSlot, NodeName, Placement, ReplicaMode, ReplicaSlot, RetiredAddress, ServiceId, ServiceState,
    ServiceStatus, VolumePhase, VolumeRecord,
};
use crate::placement::{self, NodeView, Request, Usage};

/// What the deciding agent sees of the cluster.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub nodes: &'a [NodeView],
    /// When each down node went down (unix seconds): its
    /// [`NodeDown`](crate::model::NodeDown) mark in the store, put by the
    /// first agent that found its liveness key gone. A down node missing
    /// here (not marked yet) is taken as down since `now_unix`: its grace
    /// starts now, never earlier.
    pub down_since: &'a BTreeMap<NodeName, u64>,
    /// The statuses of this volume's services.
    pub statuses: &'a BTreeMap<ServiceId, ServiceStatus>,
    /// What every volume (this one included) has been given.
    pub usage: &'a Usage,
    pub now_unix: u64,
    /// How long a node may be down before its replicas are replaced
    /// (`failover.replica_grace`).
    pub replica_grace: Duration,
}

/// A change to a volume's placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the controller at `to` (with a higher generation than `from`'s).
    MoveController {
        from: Option<ControllerSlot>,
        to: ControllerSlot,
        reason: MoveReason,
    },
    /// Remove `lost` from the membership for good and rebuild `replacement`.
    ReplaceReplica {
        lost: ReplicaSlot,
        replacement: ReplicaSlot,
        down_since_unix: u64,
    },
    /// Add `replacement` alongside `draining`, which is kept until the
    /// replacement is in sync.
    AddReplica {
        draining: ReplicaSlot,
        replacement: ReplicaSlot,
    },
    /// Remove `slot` (on a draining node) for good: its replacement is in
    /// sync.
    RemoveReplica { slot: ReplicaSlot },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveReason {
    /// The volume has no controller slot.
    NoController,
    /// The controller's node is down.
    NodeDown,
    /// The controller's node is draining.
    NodeDraining,
    /// The controller's node is no longer registered.
    NodeGone,
}

/// Something that looks needed and is not done (yet), with why: for the
/// log and `volume inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The replica's node is down, but not for longer than the grace period.
    ReplicaInGrace {
        replica: u32,
        node: NodeName,
        until_unix: u64,
    },
    /// Giving up the replica would leave fewer running replicas than the
    /// volume needs to serve.
    TooFewSurvivors {
        replica: u32,
        running: usize,
        needed: usize,
    },
    /// No node can take a replacement.
    NoPlaceForReplica { replica: u32, reason: String },
    /// No node can take the controller.
    NoPlaceForController { reason: String },
    /// `replica` waits: replica `rebuilding` is not in sync yet, and a
    /// replacement is rebuilt only from complete copies.
    ReplacementRebuilding { replica: u32, rebuilding: u32 },
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MoveReason::NoController => "the volume has no controller",
            MoveReason::NodeDown => "its node is down",
            MoveReason::NodeDraining => "its node is draining",
            MoveReason::NodeGone => "its node is no longer registered",
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::MoveController { from, to, reason } => {
                match from {
                    Some(from) => write!(f, "controller moves from node {} ", from.node)?,
                    None => f.write_str("controller is placed ")?,
                }
                write!(f, "to node {} with generation {} ({reason})", to.node, to.generation)
            }
            Action::ReplaceReplica {
                lost,
                replacement,
                down_since_unix,
            } => write!(
                f,
                "replica {} on node {} (down since unix time {down_since_unix}) is replaced by replica {} on node {}",
                lost.id, lost.node, replacement.id, replacement.node
            ),
            Action::AddReplica {
                draining,
                replacement,
            } => write!(
                f,
                "replica {} is added on node {} to take over from replica {} on draining node {}",
                replacement.id, replacement.node, draining.id, draining.node
            ),
            Action::RemoveReplica { slot } => write!(
                f,
                "replica {} on draining node {} is removed: its replacement is in sync",
                slot.id, slot.node
            ),
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::ReplicaInGrace {
                replica,
                node,
                until_unix,
            } => write!(
                f,
                "replica {replica}: node {node} is down; it is replaced if still down at unix time {until_unix} (failover.replica_grace)"
            ),
            Hold::TooFewSurvivors {
                replica,
                running,
                needed,
            } => write!(
                f,
                "replica {replica} is lost but not replaced: {running} other replicas run and the volume needs {needed} to serve and rebuild from; bring its node back"
            ),
            Hold::NoPlaceForReplica { replica, reason } => {
                write!(f, "replica {replica} is lost and no node can take a replacement: {reason}")
            }
            Hold::NoPlaceForController { reason } => write!(f, "the controller cannot move: {reason}"),
            Hold::ReplacementRebuilding { replica, rebuilding } => write!(
                f,
                "replica {replica} waits for its replacement: replica {rebuilding} is still rebuilding"
            ),
        }
    }
}

/// The decisions for one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub holds: Vec<Hold>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// How a node looks to failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeState {
    Up { draining: bool },
    Down,
    Gone,
}

fn node_state(nodes: &[NodeView], name: &NodeName) -> NodeState {
    match nodes.iter().find(|view| &view.record.name == name) {
        None => NodeState::Gone,
        Some(view) if view.up => NodeState::Up {
            draining: view.record.draining,
        },
        Some(_) => NodeState::Down,
    }
}

/// Fewest running replicas with which the volume serves: its `min_healthy`,
/// else a majority of its replicas.
pub fn needed_to_serve(volume: &VolumeRecord) -> usize {
    let replicas = usize::from(volume.spec.replicas);
    match volume.spec.min_healthy {
        Some(min) => usize::from(min).clamp(1, replicas.max(1)),
        None => replicas / 2 + 1,
    }
}

/// Whether `slot`'s replica runs: its node is up and its agent reports it
/// running (a report from another node is a predecessor's).
fn running(slot: &ReplicaSlot, observed: &Observed) -> bool {
    matches!(node_state(observed.nodes, &slot.node), NodeState::Up { .. })
        && observed
            .statuses
            .get(&ServiceId::Replica(slot.id))
            .is_some_and(|status| status.node == slot.node && status.state == ServiceState::Running)
}

/// The status `slot`'s own node reported for it (a report from another node
/// is a predecessor's).
fn own_status<'a>(slot: &ReplicaSlot, observed: &Observed<'a>) -> Option<&'a ServiceStatus> {
    observed
        .statuses
        .get(&ServiceId::Replica(slot.id))
        .filter(|status| status.node == slot.node)
}

/// Whether `slot` is a complete copy: running, and in sync (RW) in its
/// controller's view.
fn in_sync(slot: &ReplicaSlot, observed: &Observed) -> bool {
    running(slot, observed)
        && own_status(slot, observed).is_some_and(|status| status.mode == Some(ReplicaMode::Rw))
}

/// Whether `slot` is a replica still being built on an up node: not yet
/// reported by its node, not yet reported by its controller (a replacement
/// before the controller added it, or any replica while the controller
/// itself is moving), or rebuilding (WO). Only a replica its controller
/// reports RW or ERR is settled.
fn rebuilding(slot: &ReplicaSlot, observed: &Observed) -> bool {
    matches!(node_state(observed.nodes, &slot.node), NodeState::Up { .. })
        && own_status(slot, observed).is_none_or(|status| matches!(status.mode, None | Some(ReplicaMode::Wo)))
}

/// Decide what to change in `volume`'s placement (see the module docs).
pub fn decide(volume: &VolumeRecord, observed: &Observed) -> Plan {
    let mut plan = Plan::default();
    if volume.phase == VolumePhase::Deleting {
        return plan;
    }
    let mut usage = observed.usage.clone();
    let replica_actions = decide_replicas(volume, observed, &mut usage, &mut plan);

    let reason = match &volume.placement.controller {
        None => Some(MoveReason::NoController),
        Some(controller) => match node_state(observed.nodes, &controller.node) {
            NodeState::Up { draining: false } => None,
            NodeState::Up { draining: true } => Some(MoveReason::NodeDraining),
            NodeState::Down => Some(MoveReason::NodeDown),
            NodeState::Gone => Some(MoveReason::NodeGone),
        },
    };
    if let Some(reason) = reason {
        // The replicas the controller will serve: those kept and the
        // replacements; running ones first choice for its node.
        let replicas = apply_replica_actions(volume.placement.replicas.clone(), &replica_actions);
        let running_replicas: Vec<ReplicaSlot> = replicas
            .iter()
            .filter(|slot| running(slot, observed))
            .cloned()
            .collect();
        let preferred = if running_replicas.is_empty() {
            &replicas
        } else {
            &running_replicas
        };
        let from = volume.placement.controller.clone();
        let generation = from.as_ref().map_or(0, |c| c.generation).saturating_add(1);
        let mut controller_usage = usage.clone();
        controller_usage.add_replicas(volume.spec.size_bytes, &replicas);
        match placement::place_controller(preferred, observed.nodes, &controller_usage, generation) {
            Ok(to) => plan.actions.push(Action::MoveController { from, to, reason }),
            Err(placement::PlacementError::Unsatisfiable(reason)) => {
                plan.holds.push(Hold::NoPlaceForController { reason })
            }
        }
    }
    plan.actions.extend(replica_actions);
    plan
}

/// `replicas` with the replica actions among `actions` made.
fn apply_replica_actions(mut replicas: Vec<ReplicaSlot>, actions: &[Action]) -> Vec<ReplicaSlot> {
    for action in actions {
        match action {
            Action::MoveController { .. } => {}
            Action::ReplaceReplica {
                lost, replacement, ..
            } => {
                replicas.retain(|slot| slot.id != lost.id);
                replicas.push(replacement.clone());
            }
            Action::AddReplica { replacement, .. } => replicas.push(replacement.clone()),
            Action::RemoveReplica { slot } => replicas.retain(|s| s.id != slot.id),
        }
    }
    replicas
}

/// The replica actions (replacements of lost replicas, or one step of a
/// drain), recording holds in `plan` and new replicas in `usage`.
fn decide_replicas(
    volume: &VolumeRecord,
    observed: &Observed,
    usage: &mut Usage,
    plan: &mut Plan,
) -> Vec<Action> {
    let slots = &volume.placement.replicas;
    let grace = observed.replica_grace.as_secs();
    let mut lost = Vec::new();
    let mut draining = Vec::new();
    for slot in slots {
        let since = match node_state(observed.nodes, &slot.node) {
            NodeState::Up { draining: false } => continue,
            NodeState::Up { draining: true } => {
                draining.push(slot);
                continue;
            }
            NodeState::Gone => {
                lost.push(slot);
                continue;
            }
            NodeState::Down => observed
                .down_since
                .get(&slot.node)
                .copied()
                .unwrap_or(observed.now_unix),
        };
        let until_unix = since.saturating_add(grace);
        if observed.now_unix < until_unix {
            plan.holds.push(Hold::ReplicaInGrace {
                replica: slot.id,
                node: slot.node.clone(),
                until_unix,
            });
        } else {
            lost.push(slot);
        }
    }
    if lost.is_empty() && draining.is_empty() {
        return Vec::new();
    }
    if let Some(busy) = slots.iter().find(|slot| rebuilding(slot, observed)) {
        for slot in lost.iter().chain(&draining) {
            plan.holds.push(Hold::ReplacementRebuilding {
                replica: slot.id,
                rebuilding: busy.id,
            });
        }
        return Vec::new();
    }
    if lost.is_empty() {
        return decide_drain(volume, observed, &draining, usage, plan);
    }
    let running = slots.iter().filter(|slot| in_sync(slot, observed)).count();
    let needed = needed_to_serve(volume);
    if running < needed {
        for slot in lost {
            plan.holds.push(Hold::TooFewSurvivors {
                replica: slot.id,
                running,
                needed,
            });
        }
        return Vec::new();
    }

    let mut exclude: BTreeSet<NodeName> = slots.iter().map(|slot| slot.node.clone()).collect();
    let mut next_id = volume.placement.first_free_replica_id();
    // Spread domains the volume keeps: those of the replicas not lost.
    let mut held_domains: BTreeSet<String> = slots
        .iter()
        .filter(|slot| !lost.iter().any(|l| l.id == slot.id))
        .filter_map(|slot| spread_value(observed.nodes, &slot.node, &volume.spec.spread_key))
        .collect();
    let mut replacements = Vec::new();
    for slot in lost {
        let down_since_unix = observed
            .down_since
            .get(&slot.node)
            .copied()
            .unwrap_or(observed.now_unix);
        let request = Request {
            replicas: 1,
            exclude: exclude.clone(),
            first_id: next_id,
            ..Request::for_volume(&volume.spec)
        };
        match place_one(volume, observed, &request, &held_domains, usage) {
            Ok(Some(replacement)) => {
                usage.add_replicas(volume.spec.size_bytes, std::slice::from_ref(&replacement));
                exclude.insert(replacement.node.clone());
                if let Some(value) = spread_value(observed.nodes, &replacement.node, &volume.spec.spread_key)
                {
                    held_domains.insert(value);
                }
                next_id = next_id.saturating_add(1);
                replacements.push(Action::ReplaceReplica {
                    lost: slot.clone(),
                    replacement,
                    down_since_unix,
                });
            }
            Ok(None) => plan.holds.push(Hold::NoPlaceForReplica {
                replica: slot.id,
                reason: "placement returned no slot".to_string(),
            }),
            Err(placement::PlacementError::Unsatisfiable(reason)) => {
                plan.holds.push(Hold::NoPlaceForReplica {
                    replica: slot.id,
                    reason,
                })
            }
        }
    }
    replacements
}

/// One step of moving replicas off draining nodes: remove the first draining
/// replica once the volume has its full count of in-sync replicas elsewhere
/// (its replacement is complete), else add its replacement.
fn decide_drain(
    volume: &VolumeRecord,
    observed: &Observed,
    draining: &[&ReplicaSlot],
    usage: &mut Usage,
    plan: &mut Plan,
) -> Vec<Action> {
    let Some(&first) = draining.first() else {
        return Vec::new();
    };
    let slots = &volume.placement.replicas;
    let settled = slots
        .iter()
        .filter(|slot| !draining.iter().any(|d| d.id == slot.id) && in_sync(slot, observed))
        .count();
    if settled >= usize::from(volume.spec.replicas) {
        return vec![Action::RemoveReplica { slot: first.clone() }];
    }
    let request = Request {
        replicas: 1,
        exclude: slots.iter().map(|slot| slot.node.clone()).collect(),
        first_id: volume.placement.first_free_replica_id(),
        ..Request::for_volume(&volume.spec)
    };
    let held_domains: BTreeSet<String> = slots
        .iter()
        .filter(|slot| slot.id != first.id)
        .filter_map(|slot| spread_value(observed.nodes, &slot.node, &volume.spec.spread_key))
        .collect();
    match place_one(volume, observed, &request, &held_domains, usage) {
        Ok(Some(replacement)) => {
            usage.add_replicas(volume.spec.size_bytes, std::slice::from_ref(&replacement));
            vec![Action::AddReplica {
                draining: first.clone(),
                replacement,
            }]
        }
        Ok(None) => {
            plan.holds.push(Hold::NoPlaceForReplica {
                replica: first.id,
                reason: "placement returned no slot".to_string(),
            });
            Vec::new()
        }
        Err(placement::PlacementError::Unsatisfiable(reason)) => {
            plan.holds.push(Hold::NoPlaceForReplica {
                replica: first.id,
                reason,
            });
            Vec::new()
        }
    }
}

/// One new replica for `request`: on a node in a spread domain outside
/// `held_domains` first (the volume lacks it), on any node else.
fn place_one(
    volume: &VolumeRecord,
    observed: &Observed,
    request: &Request,
    held_domains: &BTreeSet<String>,
    usage: &Usage,
) -> Result<Option<ReplicaSlot>, placement::PlacementError> {
    let spreading: Vec<NodeView> = observed
        .nodes
        .iter()
        .filter(|view| {
            view.record
                .labels
                .get(&volume.spec.spread_key)
                .is_none_or(|value| !held_domains.contains(value))
        })
        .cloned()
        .collect();
    let usage = &with_retired(usage, &volume.placement);
    placement::place(request, &spreading, usage)
        .or_else(|_| placement::place(request, observed.nodes, usage))
        .map(|placed| placed.replicas.into_iter().next())
}

/// `usage` with the ports of `placement`'s retired replicas taken too: a new replica of that volume
/// never gets an address its controller removed for good (it would refuse the new replica).
pub fn with_retired(usage: &Usage, placement: &Placement) -> Usage {
    let mut usage = usage.clone();
    for r in &placement.retired {
        usage.ports.entry(r.node.clone()).or_default().insert(r.port);
    }
    usage
}

fn spread_value(nodes: &[NodeView], node: &NodeName, key: &str) -> Option<String> {
    nodes
        .iter()
        .find(|view| &view.record.name == node)
        .and_then(|view| view.record.labels.get(key).cloned())
}

/// `volume` with `plan`'s actions made: lost replicas removed, replacements
/// added, the controller moved (with a higher generation). A membership
/// change alone leaves the controller where it is, with its generation: its
/// agent tells it online (`replica add` / `rm`, see
/// `crate::reconcile::membership`), which records the new membership on the
/// replicas without interrupting I/O.
pub fn apply(volume: &VolumeRecord, plan: &Plan) -> VolumeRecord {
    let mut next = volume.clone();
    let mut membership_changed = false;
    for action in &plan.actions {
        match action {
            Action::MoveController { to, .. } => {
                next.placement.controller = Some(to.clone());
            }
            Action::ReplaceReplica { replacement, .. } | Action::AddReplica { replacement, .. } => {
                next.placement.next_replica_id = next
                    .placement
                    .first_free_replica_id()
                    .max(replacement.id.saturating_add(1));
                membership_changed = true;
            }
            Action::RemoveReplica { .. } => membership_changed = true,
        }
        if let Action::ReplaceReplica { lost: gone, .. } | Action::RemoveReplica { slot: gone } = action {
            let address = RetiredAddress {
                node: gone.node.clone(),
                port: gone.port,
            };
            if !next.placement.retired.contains(&address) {
                next.placement.retired.push(address);
            }
        }
    }
    next.placement.replicas = apply_replica_actions(next.placement.replicas, &plan.actions);
    if membership_changed {
        // Ids handed out so far stay used, whatever was removed.
        next.placement.next_replica_id = next
            .placement
            .next_replica_id
            .max(volume.placement.first_free_replica_id());
    }
    next
}

#[cfg(test)]
mod tests;
