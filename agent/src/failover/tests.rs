//! Failover decisions as a specification: examples, then properties over
//! random clusters with nodes going down at random times.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::{Placement, ReplicaMode, ServiceState, ServiceStatus};
use crate::placement::tests::{name, node, slot, volume, GIB};
use crate::placement::{usage, NodeView};

const NOW: u64 = 1_000_000;
const GRACE: Duration = Duration::from_secs(300);

fn controller(n: &str, generation: u64) -> ControllerSlot {
    ControllerSlot {
        node: name(n),
        iscsi_port: 7150,
        api_port: 7151,
        generation,
    }
}

/// A 3-replica volume on a, b, c with its controller on `controller_on`.
fn three_way(controller_on: &str) -> VolumeRecord {
    volume(
        "vol",
        10 * GIB,
        Placement {
            replicas: vec![
                slot(0, "a", "default", 7100),
                slot(1, "b", "default", 7100),
                slot(2, "c", "default", 7100),
            ],
            controller: Some(controller(controller_on, 3)),
            next_replica_id: 3,
            retired: Vec::new(),
        },
    )
}

fn running_on(slots: &[(u32, &str)]) -> BTreeMap<ServiceId, ServiceStatus> {
    slots
        .iter()
        .map(|(id, n)| {
            (
                ServiceId::Replica(*id),
                ServiceStatus {
                    node: name(n),
                    state: ServiceState::Running,
                    message: None,
                    restarts: 0,
                    updated_unix: NOW,
                    mode: Some(ReplicaMode::Rw),
                    rebuild: None,
                    hydration: None,
                    report: None,
                },
            )
        })
        .collect()
}

fn down(mut view: NodeView) -> NodeView {
    view.up = false;
    view
}

struct World {
    nodes: Vec<NodeView>,
    down_since: BTreeMap<NodeName, u64>,
    statuses: BTreeMap<ServiceId, ServiceStatus>,
    usage: Usage,
}

impl World {
    fn new(vol: &VolumeRecord, nodes: Vec<NodeView>, statuses: BTreeMap<ServiceId, ServiceStatus>) -> World {
        World {
            nodes,
            down_since: BTreeMap::new(),
            statuses,
            usage: usage(std::slice::from_ref(vol)),
        }
    }

    fn decide(&self, vol: &VolumeRecord) -> Plan {
        decide(
            vol,
            &Observed {
                nodes: &self.nodes,
                down_since: &self.down_since,
                statuses: &self.statuses,
                usage: &self.usage,
                now_unix: NOW,
                replica_grace: GRACE,
            },
        )
    }
}

#[test]
fn the_controller_leaves_a_down_node_for_a_running_replica_with_a_higher_generation() {
    let vol = three_way("a");
    let world = World::new(
        &vol,
        vec![
            down(node("a", None)),
            node("b", None),
            node("c", None),
            node("d", None),
        ],
        running_on(&[(1, "b"), (2, "c")]),
    );
    let plan = world.decide(&vol);
    let [Action::MoveController { from, to, reason }] = plan.actions.as_slice() else {
        panic!("one move expected: {plan:?}")
    };
    assert_eq!(*reason, MoveReason::NodeDown);
    assert_eq!(from.as_ref().map(|c| c.generation), Some(3));
    assert_eq!(
        to.node.as_str(),
        "b",
        "a node holding a running replica, least loaded, then by name"
    );
    assert_eq!(to.generation, 4);
    assert!(
        to.iscsi_port != 7100 && to.api_port != 7100,
        "the replica's port stays its own"
    );
    let next = apply(&vol, &plan);
    assert_eq!(next.placement.controller, Some(to.clone()));
    assert_eq!(next.placement.replicas, vol.placement.replicas);
}

#[test]
fn a_controller_on_an_up_node_stays_and_nothing_is_done() {
    let vol = three_way("a");
    let world = World::new(
        &vol,
        vec![node("a", None), node("b", None), node("c", None)],
        running_on(&[(0, "a"), (1, "b"), (2, "c")]),
    );
    assert_eq!(world.decide(&vol), Plan::default());
}

#[test]
fn a_controller_whose_node_is_gone_or_draining_moves_too() {
    let vol = three_way("x");
    let world = World::new(
        &vol,
        vec![node("a", None), node("b", None), node("c", None)],
        running_on(&[]),
    );
    let plan = world.decide(&vol);
    assert!(matches!(
        plan.actions.as_slice(),
        [Action::MoveController {
            reason: MoveReason::NodeGone,
            ..
        }]
    ));

    let vol = three_way("a");
    let mut draining = node("a", None);
    draining.record.draining = true;
    let world = World::new(
        &vol,
        vec![draining, node("b", None), node("c", None)],
        running_on(&[]),
    );
    let plan = world.decide(&vol);
    let [Action::MoveController { to, reason, .. }] = plan.actions.as_slice() else {
        panic!("one move expected: {plan:?}")
    };
    assert_eq!((*reason, to.node.as_str()), (MoveReason::NodeDraining, "b"));
}

/// The volume of [`three_way`] with its controller on a; nodes a to d, c
/// down for `ago` seconds, the replicas of `running` running.
fn c_down_for(ago: u64, running: &[(u32, &str)]) -> (VolumeRecord, World) {
    let vol = three_way("a");
    let mut world = World::new(
        &vol,
        vec![
            node("a", None),
            node("b", None),
            down(node("c", None)),
            node("d", None),
        ],
        running_on(running),
    );
    world.down_since.insert(name("c"), NOW - ago);
    (vol, world)
}

#[test]
fn a_replica_within_its_grace_period_is_left_alone() {
    let (vol, mut world) = c_down_for(60, &[(0, "a"), (1, "b")]);
    let plan = world.decide(&vol);
    assert!(plan.actions.is_empty(), "{plan:?}");
    assert_eq!(
        plan.holds,
        [Hold::ReplicaInGrace {
            replica: 2,
            node: name("c"),
            until_unix: NOW - 60 + 300,
        }]
    );
    // A down node nobody saw go down starts its grace now.
    world.down_since.clear();
    assert!(world.decide(&vol).actions.is_empty());
}

#[test]
fn a_replica_past_its_grace_period_is_replaced_on_a_node_without_one() {
    let (vol, world) = c_down_for(300, &[(0, "a"), (1, "b")]);
    let plan = world.decide(&vol);
    let [Action::ReplaceReplica {
        lost,
        replacement,
        down_since_unix,
    }] = plan.actions.as_slice()
    else {
        panic!("one replacement expected: {plan:?}")
    };
    assert_eq!((lost.id, lost.node.as_str()), (2, "c"));
    assert_eq!((replacement.id, replacement.node.as_str()), (3, "d"));
    assert_eq!(*down_since_unix, NOW - 300);
    let next = apply(&vol, &plan);
    let nodes: Vec<&str> = next.placement.replicas.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["a", "b", "d"]);
    assert_eq!(
        next.placement.controller.map(|c| c.generation),
        Some(3),
        "the controller stays: it is told of the new membership online"
    );
}

#[test]
fn a_replacement_goes_to_a_zone_the_volume_lacks() {
    let vol = three_way("a");
    let mut world = World::new(
        &vol,
        vec![
            node("a", Some("z1")),
            node("b", Some("z2")),
            down(node("c", Some("z3"))),
            node("d", Some("z1")),
            node("e", Some("z3")),
        ],
        running_on(&[(0, "a"), (1, "b")]),
    );
    world.down_since.insert(name("c"), NOW - 1000);
    world
        .usage
        .bytes
        .insert((name("e"), "default".to_string()), 50 * GIB);
    let plan = world.decide(&vol);
    let [Action::ReplaceReplica { replacement, .. }] = plan.actions.as_slice() else {
        panic!("one replacement expected: {plan:?}")
    };
    assert_eq!(replacement.node.as_str(), "e", "z3 again, though d is less used");
}

#[test]
fn a_replica_is_not_given_up_while_too_few_others_run() {
    let vol = three_way("c");
    let mut world = World::new(
        &vol,
        vec![
            down(node("a", None)),
            down(node("b", None)),
            node("c", None),
            node("d", None),
            node("e", None),
        ],
        running_on(&[(2, "c")]),
    );
    world.down_since.insert(name("a"), NOW - 1000);
    world.down_since.insert(name("b"), NOW - 1000);
    let plan = world.decide(&vol);
    assert!(plan.actions.is_empty(), "{plan:?}");
    assert!(plan.holds.contains(&Hold::TooFewSurvivors {
        replica: 0,
        running: 1,
        needed: 2
    }));
    // With min_healthy 1 the survivor suffices to rebuild from.
    let mut relaxed = vol.clone();
    relaxed.spec.min_healthy = Some(1);
    let plan = world.decide(&relaxed);
    let next = apply(&relaxed, &plan);
    let nodes: Vec<&str> = next.placement.replicas.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["c", "d", "e"]);
}

#[test]
fn a_replica_reported_running_by_another_node_does_not_count() {
    let (vol, world) = c_down_for(1000, &[(0, "a"), (1, "c")]);
    let plan = world.decide(&vol);
    assert!(plan.actions.is_empty(), "{plan:?}");
}

#[test]
fn no_place_for_a_replacement_is_said_and_nothing_changes() {
    let vol = three_way("a");
    let mut world = World::new(
        &vol,
        vec![node("a", None), node("b", None), down(node("c", None))],
        running_on(&[(0, "a"), (1, "b")]),
    );
    world.down_since.insert(name("c"), NOW - 1000);
    let plan = world.decide(&vol);
    assert!(plan.actions.is_empty());
    let [Hold::NoPlaceForReplica { replica: 2, reason }] = plan.holds.as_slice() else {
        panic!("one hold expected: {plan:?}")
    };
    assert!(reason.contains("already holds a replica"), "{reason}");
    assert_eq!(apply(&vol, &plan), vol);
}

#[test]
fn decisions_read_as_sentences_for_the_log() {
    let (vol, world) = c_down_for(1000, &[(0, "a"), (1, "b")]);
    let plan = world.decide(&vol);
    assert_eq!(
        plan.actions[0].to_string(),
        format!(
            "replica 2 on node c (down since unix time {}) is replaced by replica 3 on node d",
            NOW - 1000
        )
    );
    let (vol, world) = c_down_for(10, &[]);
    let held: Vec<String> = world.decide(&vol).holds.iter().map(ToString::to_string).collect();
    assert_eq!(
        held,
        [format!(
            "replica 2: node c is down; it is replaced if still down at unix time {} (failover.replica_grace)",
            NOW - 10 + 300
        )]
    );
    let vol = three_way("x");
    let world = World::new(&vol, vec![node("a", None)], running_on(&[]));
    let moved = world.decide(&vol).actions[0].to_string();
    assert_eq!(
        moved,
        "controller moves from node x to node a with generation 4 (its node is no longer registered)"
    );
}

#[test]
fn a_volume_being_deleted_is_left_to_its_deletion() {
    let mut vol = three_way("a");
    vol.phase = VolumePhase::Deleting;
    let world = World::new(&vol, vec![down(node("a", None))], running_on(&[]));
    assert_eq!(world.decide(&vol), Plan::default());
}

// ---------------------------------------------------------------------------
// Properties.

#[derive(Clone, Debug)]
struct Case {
    vol: VolumeRecord,
    world_nodes: Vec<NodeView>,
    down_since: BTreeMap<NodeName, u64>,
    statuses: BTreeMap<ServiceId, ServiceStatus>,
    grace: Duration,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (3..7usize)
        .prop_flat_map(|n| {
            (
                prop::collection::vec(
                    (
                        prop::bool::weighted(0.7),
                        prop::bool::weighted(0.1),
                        prop::option::of(0..3u8),
                        0..2000u64,
                    ),
                    n,
                ),
                Just(n),
                prop::sample::subsequence((0..n).collect::<Vec<_>>(), 3),
                0..n,
                prop::collection::vec(any::<bool>(), 3),
                prop::option::of(1..4u8),
                1..1500u64,
            )
        })
        .prop_map(
            |(specs, _, holders, controller_on, running, min_healthy, grace)| {
                let world_nodes: Vec<NodeView> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, (up, cordoned, zone, _))| {
                        let zone = zone.map(|z| format!("z{z}"));
                        let mut view = node(&format!("n{i}"), zone.as_deref());
                        view.up = *up;
                        view.record.cordoned = *cordoned;
                        view
                    })
                    .collect();
                let down_since = specs
                    .iter()
                    .enumerate()
                    .filter(|(_, (up, ..))| !up)
                    .map(|(i, (.., ago))| (name(&format!("n{i}")), NOW - ago))
                    .collect();
                let replicas: Vec<ReplicaSlot> = holders
                    .iter()
                    .enumerate()
                    .map(|(id, &i)| slot(id as u32, &format!("n{i}"), "default", 7100))
                    .collect();
                let statuses = running_on(
                    &replicas
                        .iter()
                        .zip(&running)
                        .filter(|(_, &r)| r)
                        .map(|(s, _)| (s.id, s.node.as_str()))
                        .collect::<Vec<_>>(),
                );
                let mut vol = volume(
                    "vol",
                    GIB,
                    Placement {
                        replicas,
                        controller: Some(controller(&format!("n{controller_on}"), 5)),
                        next_replica_id: 0,
                        retired: Vec::new(),
                    },
                );
                vol.spec.min_healthy = min_healthy;
                Case {
                    vol,
                    world_nodes,
                    down_since,
                    statuses,
                    grace: Duration::from_secs(grace),
                }
            },
        )
}

fn plan_of(case: &Case) -> Plan {
    let usage = usage(std::slice::from_ref(&case.vol));
    decide(
        &case.vol,
        &Observed {
            nodes: &case.world_nodes,
            down_since: &case.down_since,
            statuses: &case.statuses,
            usage: &usage,
            now_unix: NOW,
            replica_grace: case.grace,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// The controller only ever moves to an open node, always with a higher
    /// generation; a replica is replaced only past its grace, only while
    /// enough others run, and never onto a node that holds one.
    #[test]
    fn decisions_keep_their_promises(case in arb_case()) {
        let plan = plan_of(&case);
        let view = |n: &NodeName| case.world_nodes.iter().find(|v| &v.record.name == n);
        let old_nodes: Vec<&NodeName> = case.vol.placement.replicas.iter().map(|r| &r.node).collect();
        let (mut replaced, mut added, mut removed) = (0, 0, 0);
        for action in &plan.actions {
            match action {
                Action::MoveController { from, to, .. } => {
                    let target = view(&to.node);
                    prop_assert!(target.is_some_and(|v| v.up && !v.record.cordoned && !v.record.draining));
                    prop_assert!(to.generation > from.as_ref().map_or(0, |c| c.generation));
                }
                Action::ReplaceReplica { lost, replacement, .. } => {
                    replaced += 1;
                    let since = case.down_since.get(&lost.node).copied().unwrap_or(NOW);
                    prop_assert!(NOW >= since + case.grace.as_secs(), "replaced within the grace period");
                    prop_assert!(!view(&lost.node).is_some_and(|v| v.up));
                    prop_assert!(!old_nodes.contains(&&replacement.node), "next to a sibling");
                    prop_assert!(view(&replacement.node).is_some_and(|v| v.up && !v.record.cordoned));
                }
                Action::AddReplica { draining, replacement } => {
                    added += 1;
                    prop_assert!(view(&draining.node).is_some_and(|v| v.record.draining));
                    prop_assert!(!old_nodes.contains(&&replacement.node), "next to a sibling");
                }
                Action::RemoveReplica { slot } => {
                    removed += 1;
                    prop_assert!(view(&slot.node).is_some_and(|v| v.record.draining));
                }
            }
        }
        if replaced > 0 {
            let running = case
                .vol
                .placement
                .replicas
                .iter()
                .filter(|r| {
                    view(&r.node).is_some_and(|v| v.up)
                        && case.statuses.get(&ServiceId::Replica(r.id)).is_some_and(|st| {
                            st.node == r.node
                                && st.state == ServiceState::Running
                                && st.mode == Some(ReplicaMode::Rw)
                        })
                })
                .count();
            prop_assert!(running >= needed_to_serve(&case.vol));
        }
        let next = apply(&case.vol, &plan);
        prop_assert_eq!(
            next.placement.replicas.len() + removed,
            case.vol.placement.replicas.len() + added
        );
        prop_assert!(added + removed <= 1, "a drain moves one replica at a time");
        let distinct: BTreeSet<&NodeName> = next.placement.replicas.iter().map(|r| &r.node).collect();
        prop_assert_eq!(distinct.len(), next.placement.replicas.len(), "two replicas on one node");
        let ids: BTreeSet<u32> = next.placement.replicas.iter().map(|r| r.id).collect();
        prop_assert_eq!(ids.len(), next.placement.replicas.len(), "a replica id given twice");
        let generation = |v: &VolumeRecord| v.placement.controller.as_ref().map_or(0, |c| c.generation);
        let moved = plan.actions.iter().any(|a| matches!(a, Action::MoveController { .. }));
        if moved {
            prop_assert!(generation(&next) > generation(&case.vol));
        } else {
            prop_assert_eq!(generation(&next), generation(&case.vol), "a membership change alone restarts nothing");
        }
    }

    /// A controller on a node that is down always moves when some node is
    /// open for it, and deciding twice from the same view gives the same plan.
    #[test]
    fn a_down_controller_moves_when_it_can(case in arb_case()) {
        let plan = plan_of(&case);
        prop_assert_eq!(&plan, &plan_of(&case));
        let controller_node = case.vol.placement.controller.as_ref().map(|c| c.node.clone());
        let controller_up = case
            .world_nodes
            .iter()
            .any(|v| Some(&v.record.name) == controller_node.as_ref() && v.up);
        let some_open = case.world_nodes.iter().any(|v| v.up && !v.record.cordoned);
        let moved = plan.actions.iter().any(|a| matches!(a, Action::MoveController { .. }));
        prop_assert_eq!(moved, !controller_up && some_open);
    }
}

fn mode_of(statuses: &mut BTreeMap<ServiceId, ServiceStatus>, id: u32, mode: ReplicaMode) {
    if let Some(status) = statuses.get_mut(&ServiceId::Replica(id)) {
        status.mode = Some(mode);
    }
}

#[test]
fn a_draining_nodes_replica_is_copied_first_and_removed_once_in_sync() {
    let vol = three_way("b");
    let mut draining = node("a", None);
    draining.record.draining = true;
    let nodes = vec![draining, node("b", None), node("c", None), node("d", None)];
    let world = World::new(&vol, nodes.clone(), running_on(&[(0, "a"), (1, "b"), (2, "c")]));
    let plan = world.decide(&vol);
    let [Action::AddReplica {
        draining,
        replacement,
    }] = plan.actions.as_slice()
    else {
        panic!("one added replica expected: {plan:?}")
    };
    assert_eq!(
        (draining.id, replacement.node.as_str(), replacement.id),
        (0, "d", 3)
    );
    let growing = apply(&vol, &plan);
    assert_eq!(
        growing.placement.replicas.len(),
        4,
        "the draining replica stays meanwhile"
    );
    assert_eq!(growing.placement.next_replica_id, 4);

    // While the new replica rebuilds, nothing more happens.
    let mut statuses = running_on(&[(0, "a"), (1, "b"), (2, "c"), (3, "d")]);
    mode_of(&mut statuses, 3, ReplicaMode::Wo);
    let world = World::new(&growing, nodes.clone(), statuses.clone());
    let plan = world.decide(&growing);
    assert!(plan.actions.is_empty(), "{plan:?}");
    assert_eq!(
        plan.holds,
        [Hold::ReplacementRebuilding {
            replica: 0,
            rebuilding: 3
        }]
    );

    // In sync: the draining replica goes.
    mode_of(&mut statuses, 3, ReplicaMode::Rw);
    let world = World::new(&growing, nodes, statuses);
    let plan = world.decide(&growing);
    let [Action::RemoveReplica { slot }] = plan.actions.as_slice() else {
        panic!("one removal expected: {plan:?}")
    };
    assert_eq!(slot.id, 0);
    let done = apply(&growing, &plan);
    let ids: Vec<u32> = done.placement.replicas.iter().map(|r| r.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(done.placement.next_replica_id, 4);
}

/// Found by the multi-host soak: a node drained (its replica removed for good at port 7100), then
/// uncordoned, then chosen for a later replica of the same volume was given port 7100 again, an
/// address the controller refuses to take back, and the second drain never finished.
#[test]
fn a_new_replica_never_gets_an_address_the_volume_retired() {
    let vol = three_way("b");
    let mut draining = node("a", None);
    draining.record.draining = true;
    let nodes = vec![draining, node("b", None), node("c", None), node("d", None)];
    let statuses = running_on(&[(0, "a"), (1, "b"), (2, "c"), (3, "d")]);
    // The first drain: replica 0 on a moved to d, then removed for good.
    let growing = apply(
        &vol,
        &World::new(&vol, nodes.clone(), statuses.clone()).decide(&vol),
    );
    let plan = World::new(&growing, nodes, statuses).decide(&growing);
    let drained = apply(&growing, &plan);
    assert_eq!(
        drained.placement.retired,
        [RetiredAddress {
            node: name("a"),
            port: 7100
        }]
    );
    // a uncordoned, c drained: the replica goes to a, the only node without one, on another port.
    let mut c = node("c", None);
    c.record.draining = true;
    let nodes = vec![node("a", None), node("b", None), c, node("d", None)];
    let plan = World::new(&drained, nodes, running_on(&[(1, "b"), (2, "c"), (3, "d")])).decide(&drained);
    let [Action::AddReplica { replacement, .. }] = plan.actions.as_slice() else {
        panic!("one added replica expected: {plan:?}")
    };
    assert_eq!(replacement.node.as_str(), "a");
    assert_ne!(replacement.port, 7100, "{replacement:?}");
    // Retired addresses are kept once each, across later changes.
    let next = apply(&drained, &plan);
    assert_eq!(next.placement.retired, drained.placement.retired);
}

#[test]
fn a_deregistered_nodes_replica_is_replaced_without_waiting() {
    let vol = three_way("a");
    // Node c is no longer registered: no down_since is kept for it.
    let world = World::new(
        &vol,
        vec![node("a", None), node("b", None), node("d", None)],
        running_on(&[(0, "a"), (1, "b")]),
    );
    let plan = world.decide(&vol);
    let [Action::ReplaceReplica {
        lost, replacement, ..
    }] = plan.actions.as_slice()
    else {
        panic!("one replacement expected: {plan:?}")
    };
    assert_eq!((lost.id, replacement.node.as_str()), (2, "d"));
}

#[test]
fn only_in_sync_replicas_are_survivors_and_a_rebuild_holds_the_next() {
    // b is running but still rebuilding: c's replacement waits for it.
    let (vol, mut world) = c_down_for(3600, &[(0, "a"), (1, "b")]);
    mode_of(&mut world.statuses, 1, ReplicaMode::Wo);
    let plan = world.decide(&vol);
    assert!(plan.actions.is_empty(), "{plan:?}");
    assert_eq!(
        plan.holds,
        [Hold::ReplacementRebuilding {
            replica: 2,
            rebuilding: 1
        }]
    );
    // b failed (ERR): one copy is left, fewer than the two needed.
    mode_of(&mut world.statuses, 1, ReplicaMode::Err);
    let plan = world.decide(&vol);
    assert!(plan.actions.is_empty(), "{plan:?}");
    assert_eq!(
        plan.holds,
        [Hold::TooFewSurvivors {
            replica: 2,
            running: 1,
            needed: 2
        }]
    );
}

#[test]
fn a_replacement_never_takes_an_id_given_out_before() {
    // Replica 3 was removed without a replacement earlier: 3 is used up.
    let (mut vol, world) = c_down_for(3600, &[(0, "a"), (1, "b")]);
    vol.placement.next_replica_id = 4;
    let plan = world.decide(&vol);
    let [Action::ReplaceReplica { replacement, .. }] = plan.actions.as_slice() else {
        panic!("one replacement expected: {plan:?}")
    };
    assert_eq!(replacement.id, 4);
    assert_eq!(apply(&vol, &plan).placement.next_replica_id, 5);
    // A record written before next_replica_id existed reads it as 0.
    let old: Placement = serde_json::from_str(r#"{"replicas":[],"controller":null}"#).expect("an old record");
    assert_eq!(old.next_replica_id, 0);
}
