//! Placement as a specification: examples first, then properties checked
//! against a brute-force search over every assignment of small clusters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use basalt_engine::name::VolumeName;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::model::{
    NodeRecord, Placement, PoolKind, PoolRecord, PortRange, QosSpec, VolumePhase, VolumeRecord, VolumeSpec,
};

pub(crate) const GIB: u64 = 1 << 30;

pub(crate) fn name(n: &str) -> NodeName {
    NodeName::new(n).expect("test node names are valid")
}

pub(crate) fn dir_pool(pool: &str, capacity_bytes: u64) -> PoolRecord {
    PoolRecord {
        name: pool.to_string(),
        kind: PoolKind::Directory(PathBuf::from(format!("/pools/{pool}"))),
        capacity_bytes,
        free_bytes: capacity_bytes,
    }
}

fn device_pool(pool: &str, capacity_bytes: u64) -> PoolRecord {
    PoolRecord {
        name: pool.to_string(),
        kind: PoolKind::BlockDevice(PathBuf::from(format!("/dev/{pool}"))),
        capacity_bytes,
        free_bytes: capacity_bytes,
    }
}

pub(crate) fn node_with(n: &str, zone: Option<&str>, pools: Vec<PoolRecord>) -> NodeView {
    NodeView {
        record: NodeRecord {
            name: name(n),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_url: "http://127.0.0.1:9700".to_string(),
            labels: zone
                .map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]))
                .unwrap_or_default(),
            pools,
            ports: PortRange {
                first: 7100,
                last: 7199,
            },
            cordoned: false,
            draining: false,
            initiator: None,
        },
        up: true,
    }
}

/// A node with one 100 GiB directory pool `default`.
pub(crate) fn node(n: &str, zone: Option<&str>) -> NodeView {
    node_with(n, zone, vec![dir_pool("default", 100 * GIB)])
}

fn request(replicas: u8, size_bytes: u64) -> Request {
    Request {
        replicas,
        size_bytes,
        selector: BTreeMap::new(),
        spread_key: "zone".to_string(),
        exclude: BTreeSet::new(),
        first_id: 0,
        topology: Default::default(),
    }
}

fn nodes_of(placed: &Placed) -> Vec<&str> {
    placed.replicas.iter().map(|r| r.node.as_str()).collect()
}

fn unsatisfiable(result: Result<Placed, PlacementError>) -> String {
    match result {
        Err(PlacementError::Unsatisfiable(message)) => message,
        Ok(placed) => panic!("expected an error, got {placed:?}"),
    }
}

#[test]
fn three_replicas_go_to_three_nodes_in_three_zones() {
    let nodes = [
        node("a", Some("z1")),
        node("b", Some("z1")),
        node("c", Some("z2")),
        node("d", Some("z3")),
    ];
    let placed = place(&request(3, 10 * GIB), &nodes, &Usage::default()).expect("placeable");
    assert_eq!(nodes_of(&placed), ["a", "c", "d"]);
    assert!(!placed.shared_failure_domain);
    let ids: Vec<u32> = placed.replicas.iter().map(|r| r.id).collect();
    assert_eq!(ids, [0, 1, 2]);
    assert!(placed
        .replicas
        .iter()
        .all(|r| r.pool == "default" && r.port == 7100));
}

#[test]
fn a_spare_zone_wins_over_a_less_used_node() {
    let nodes = [
        node("a", Some("z1")),
        node("b", Some("z1")),
        node("c", Some("z2")),
    ];
    let mut usage = Usage::default();
    usage.bytes.insert((name("c"), "default".to_string()), 80 * GIB);
    let placed = place(&request(2, 10 * GIB), &nodes, &usage).expect("placeable");
    assert_eq!(nodes_of(&placed), ["a", "c"]);
}

#[test]
fn when_zones_run_out_the_least_used_nodes_fill_up() {
    let nodes = [
        node("a", Some("z1")),
        node("b", Some("z1")),
        node("c", Some("z1")),
    ];
    let mut usage = Usage::default();
    usage.bytes.insert((name("a"), "default".to_string()), 50 * GIB);
    let placed = place(&request(2, 10 * GIB), &nodes, &usage).expect("placeable");
    assert_eq!(nodes_of(&placed), ["b", "c"]);
}

#[test]
fn the_error_names_the_constraint_and_each_node_left_out() {
    let mut cordoned = node("c", Some("z3"));
    cordoned.record.cordoned = true;
    let mut down = node("d", Some("z4"));
    down.up = false;
    let full = node_with("e", None, vec![dir_pool("default", 4 * GIB)]);
    let mut draining = node("f", None);
    draining.record.draining = true;
    let nodes = [
        node("a", Some("z1")),
        node("b", Some("z2")),
        cordoned,
        down,
        full,
        draining,
    ];
    let message = unsatisfiable(place(&request(3, 10 * GIB), &nodes, &Usage::default()));
    for part in [
        "3 replicas need 3 distinct nodes with 10 GiB free in a pool",
        "2 qualify (a, b)",
        "node c is cordoned",
        "node d is down",
        "node e has no pool with room (most free in one pool: 4 GiB)",
        "node f is draining",
        "ask for fewer replicas",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[test]
fn the_selector_keeps_unlabelled_nodes_out_and_says_so() {
    let mut fast = node("a", Some("z1"));
    fast.record.labels.insert("disk".to_string(), "ssd".to_string());
    let mut slow = node("b", Some("z2"));
    slow.record.labels.insert("disk".to_string(), "hdd".to_string());
    let nodes = [fast, slow, node("c", Some("z3"))];
    let mut req = request(1, GIB);
    req.selector.insert("disk".to_string(), "ssd".to_string());
    let placed = place(&req, &nodes, &Usage::default()).expect("placeable");
    assert_eq!(nodes_of(&placed), ["a"]);

    req.replicas = 2;
    let message = unsatisfiable(place(&req, &nodes, &Usage::default()));
    assert!(message.contains("labelled disk=ssd"), "{message}");
    assert!(
        message.contains("node b has disk=hdd (the selector wants disk=ssd)"),
        "{message}"
    );
    assert!(message.contains("node c has no label disk"), "{message}");
}

#[test]
fn capacity_counts_what_placement_already_gave_out() {
    let nodes = [node("a", None), node("b", None)];
    let mut usage = Usage::default();
    usage.bytes.insert((name("a"), "default".to_string()), 95 * GIB);
    let message = unsatisfiable(place(&request(2, 10 * GIB), &nodes, &usage));
    assert!(
        message.contains("node a has no pool with room (most free in one pool: 5 GiB)"),
        "{message}"
    );
    let placed = place(&request(2, 5 * GIB), &nodes, &usage).expect("exactly fits");
    assert_eq!(nodes_of(&placed), ["b", "a"]);
}

#[test]
fn a_block_device_holds_one_replica_whatever_its_size() {
    let nodes = [
        node_with("a", None, vec![device_pool("sdb", 100 * GIB)]),
        node_with("b", None, vec![device_pool("sdb", 100 * GIB)]),
    ];
    let mut usage = Usage::default();
    usage.bytes.insert((name("a"), "sdb".to_string()), GIB);
    let message = unsatisfiable(place(&request(2, GIB), &nodes, &usage));
    assert!(message.contains("node a has no pool with room"), "{message}");
    let small = [node_with("c", None, vec![device_pool("sdb", GIB)])];
    assert!(place(&request(1, 2 * GIB), &small, &Usage::default()).is_err());
}

#[test]
fn ports_already_given_out_are_skipped_and_a_full_range_is_named() {
    let mut narrow = node("a", None);
    narrow.record.ports = PortRange {
        first: 7100,
        last: 7102,
    };
    let mut usage = Usage::default();
    usage.ports.insert(name("a"), BTreeSet::from([7100, 7101]));
    let placed = place(&request(1, GIB), std::slice::from_ref(&narrow), &usage).expect("one port left");
    assert_eq!(placed.replicas[0].port, 7102);

    usage.ports.insert(name("a"), BTreeSet::from([7100, 7101, 7102]));
    let message = unsatisfiable(place(&request(1, GIB), &[narrow, node("b", None)][..1], &usage));
    assert!(
        message.contains("node a has no free port in 7100-7102"),
        "{message}"
    );
}

#[test]
fn excluded_nodes_are_not_used_for_a_replacement() {
    let nodes = [node("a", None), node("b", None), node("c", None)];
    let mut req = request(1, GIB);
    req.exclude = BTreeSet::from([name("a"), name("b")]);
    req.first_id = 7;
    let placed = place(&req, &nodes, &Usage::default()).expect("c is free");
    assert_eq!(nodes_of(&placed), ["c"]);
    assert_eq!(placed.replicas[0].id, 7);
    req.exclude.insert(name("c"));
    let message = unsatisfiable(place(&req, &nodes, &Usage::default()));
    assert!(
        message.contains("node c already holds a replica of the volume"),
        "{message}"
    );
}

#[test]
fn a_one_host_cluster_uses_distinct_pools_and_says_they_share_a_host() {
    let host = node_with(
        "solo",
        None,
        vec![
            dir_pool("p1", 100 * GIB),
            dir_pool("p2", 100 * GIB),
            dir_pool("p3", 100 * GIB),
        ],
    );
    let placed = place(&request(3, 10 * GIB), &[host], &Usage::default()).expect("placeable");
    assert!(placed.shared_failure_domain);
    let pools: BTreeSet<&str> = placed.replicas.iter().map(|r| r.pool.as_str()).collect();
    assert_eq!(pools.len(), 3);
    let ports: BTreeSet<u16> = placed.replicas.iter().map(|r| r.port).collect();
    assert_eq!(ports, BTreeSet::from([7100, 7101, 7102]));
}

#[test]
fn a_one_host_cluster_with_one_pool_gives_each_replica_its_own_slot_in_it() {
    let host = node("solo", None);
    let placed = place(&request(3, 10 * GIB), &[host], &Usage::default()).expect("placeable");
    assert!(placed.shared_failure_domain);
    assert!(placed
        .replicas
        .iter()
        .all(|r| r.pool == "default" && r.node.as_str() == "solo"));
    let ids: BTreeSet<u32> = placed.replicas.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 3, "distinct ids, hence distinct directories");
}

#[test]
fn a_one_host_cluster_refuses_what_its_pools_cannot_hold() {
    let host = node_with("solo", None, vec![dir_pool("default", 25 * GIB)]);
    let message = unsatisfiable(place(&request(3, 10 * GIB), &[host], &Usage::default()));
    assert!(message.contains("hold only 2 more"), "{message}");
    let mut cordoned = node("solo", None);
    cordoned.record.cordoned = true;
    let message = unsatisfiable(place(&request(3, GIB), &[cordoned], &Usage::default()));
    assert!(message.contains("node solo is cordoned"), "{message}");
}

#[test]
fn a_cluster_that_lost_hosts_does_not_stack_replicas_on_the_survivor() {
    let mut b = node("b", None);
    b.up = false;
    let mut c = node("c", None);
    c.up = false;
    let message = unsatisfiable(place(
        &request(3, GIB),
        &[node("a", None), b, c],
        &Usage::default(),
    ));
    assert!(message.contains("1 qualifies (a)"), "{message}");
}

#[test]
fn nonsense_requests_are_refused() {
    let nodes = [node("a", None)];
    assert!(unsatisfiable(place(&request(0, GIB), &nodes, &Usage::default())).contains("at least 1 replica"));
    assert!(unsatisfiable(place(&request(1, 0), &nodes, &Usage::default())).contains("more than 0 bytes"));
    let mut req = request(2, GIB);
    req.first_id = u32::MAX;
    assert!(unsatisfiable(place(&req, &nodes, &Usage::default())).contains("too many replicas"));
}

pub(crate) fn volume(n: &str, size_bytes: u64, placement: Placement) -> VolumeRecord {
    VolumeRecord {
        spec: VolumeSpec {
            name: VolumeName::new(n).expect("valid"),
            uuid: Uuid::nil(),
            size_bytes,
            replicas: placement.replicas.len() as u8,
            min_healthy: None,
            selector: BTreeMap::new(),
            spread_key: "zone".to_string(),
            qos: QosSpec::default(),
            source: None,
            topology: Default::default(),
            access: Default::default(),
        },
        placement,
        phase: VolumePhase::Ready,
        attached_to: None,
    }
}

pub(crate) fn slot(id: u32, n: &str, pool: &str, port: u16) -> ReplicaSlot {
    ReplicaSlot {
        id,
        node: name(n),
        pool: pool.to_string(),
        port,
    }
}

#[test]
fn a_volume_spec_asks_for_all_its_replicas() {
    let mut vol = volume("v1", 10 * GIB, Placement::default());
    vol.spec.replicas = 3;
    vol.spec.selector.insert("disk".to_string(), "ssd".to_string());
    let req = Request::for_volume(&vol.spec);
    assert_eq!((req.replicas, req.size_bytes, req.first_id), (3, 10 * GIB, 0));
    assert_eq!(req.selector, vol.spec.selector);
    assert_eq!(req.spread_key, "zone");
    assert!(req.exclude.is_empty());
}

#[test]
fn usage_counts_every_replica_and_controller() {
    let placement = Placement {
        replicas: vec![slot(0, "a", "p", 7100), slot(1, "b", "p", 7100)],
        controller: Some(ControllerSlot {
            node: name("a"),
            iscsi_port: 7101,
            api_port: 7102,
            generation: 1,
        }),
        next_replica_id: 2,
        retired: Vec::new(),
    };
    let other = Placement {
        replicas: vec![slot(0, "a", "p", 7103)],
        controller: None,
        next_replica_id: 1,
        retired: Vec::new(),
    };
    let usage = usage(&[volume("v1", 10 * GIB, placement), volume("v2", GIB, other)]);
    assert_eq!(usage.pool_bytes(&name("a"), "p"), 11 * GIB);
    assert_eq!(usage.node_bytes(&name("b")), 10 * GIB);
    assert_eq!(usage.port_count(&name("a")), 4);
    assert_eq!(usage.ports[&name("b")], BTreeSet::from([7100]));
}

#[test]
fn the_controller_goes_to_the_least_loaded_replica_holder() {
    let nodes = [node("a", None), node("b", None), node("c", None)];
    let replicas = [slot(0, "a", "default", 7100), slot(1, "b", "default", 7100)];
    let mut usage = Usage::default();
    usage.ports.insert(name("a"), BTreeSet::from([7100, 7150, 7151]));
    let controller = place_controller(&replicas, &nodes, &usage, 4).expect("placeable");
    assert_eq!(controller.node.as_str(), "b");
    assert_eq!(
        (controller.iscsi_port, controller.api_port),
        (7101, 7102),
        "the replica's port is taken"
    );
    assert_eq!(controller.generation, 4);
}

#[test]
fn the_controller_falls_back_to_any_open_node_and_else_says_why() {
    let mut a = node("a", None);
    a.up = false;
    let mut b = node("b", None);
    b.record.cordoned = true;
    let replicas = [slot(0, "a", "default", 7100), slot(1, "b", "default", 7100)];
    let nodes = [a.clone(), b.clone(), node("c", None)];
    let controller = place_controller(&replicas, &nodes, &Usage::default(), 1).expect("c is open");
    assert_eq!(controller.node.as_str(), "c");

    let mut d = node("d", None);
    d.record.ports = PortRange {
        first: 7100,
        last: 7100,
    };
    let err = place_controller(&replicas, &[a, b, d], &Usage::default(), 1).expect_err("none open");
    let PlacementError::Unsatisfiable(message) = err;
    for part in [
        "node a is down",
        "node b is cordoned",
        "node d has fewer than 2 free ports in 7100-7100",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

// ---------------------------------------------------------------------------
// Properties, against a brute-force search.

/// A small cluster and request, with room for every case: nodes down,
/// cordoned, draining, unlabelled, full, short of ports; block devices and
/// directories; a selector; exclusions.
#[derive(Clone, Debug)]
struct Case {
    nodes: Vec<NodeView>,
    usage: Usage,
    request: Request,
}

fn arb_node(index: usize) -> impl Strategy<Value = (NodeView, BTreeMap<String, u64>, BTreeSet<u16>)> {
    (
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
        prop::option::weighted(0.8, 0..3u8),
        prop::bool::weighted(0.8),
        prop::collection::vec(
            (
                prop::bool::weighted(0.8),
                0..8u64,
                prop_oneof![3 => Just(0u64), 1 => 1..4u64],
            ),
            0..3usize,
        ),
        prop_oneof![1 => Just(1u16), 3 => 2..4u16],
        prop::collection::btree_set(7100..7103u16, 0..2),
    )
        .prop_map(
            move |(up, cordoned, draining, zone, fast, pools, ports, used_ports)| {
                let zone = zone.map(|z| format!("z{z}"));
                // A node without pools is rarer than one with.
                let pools = if pools.is_empty() && up {
                    vec![(true, 4, 0)]
                } else {
                    pools
                };
                let pools_used: Vec<(PoolRecord, u64)> = pools
                    .iter()
                    .enumerate()
                    .map(|(i, (is_dir, capacity, used))| {
                        let pool = if *is_dir {
                            dir_pool(&format!("p{i}"), capacity * GIB)
                        } else {
                            device_pool(&format!("p{i}"), capacity * GIB)
                        };
                        (pool, used * GIB)
                    })
                    .collect();
                let mut view = node_with(
                    &format!("n{index}"),
                    zone.as_deref(),
                    pools_used.iter().map(|(p, _)| p.clone()).collect(),
                );
                view.up = up;
                view.record.cordoned = cordoned;
                view.record.draining = draining;
                if fast {
                    view.record.labels.insert("tier".to_string(), "fast".to_string());
                }
                view.record.ports = PortRange {
                    first: 7100,
                    last: 7100 + ports - 1,
                };
                let used = pools_used
                    .into_iter()
                    .filter(|(_, used)| *used > 0)
                    .map(|(p, used)| (p.name, used))
                    .collect();
                (view, used, used_ports)
            },
        )
}

fn arb_case() -> impl Strategy<Value = Case> {
    (1..6usize)
        .prop_flat_map(|n| {
            (
                (0..n).map(arb_node).collect::<Vec<_>>(),
                1..4u8,
                1..3u64,
                prop::bool::weighted(0.2),
                prop::collection::btree_set(0..n, 0..2),
            )
        })
        .prop_map(|(nodes, replicas, size, select_fast, exclude)| {
            let mut usage = Usage::default();
            let mut views = Vec::new();
            for (view, used, ports) in nodes {
                for (pool, bytes) in used {
                    usage.bytes.insert((view.record.name.clone(), pool), bytes);
                }
                if !ports.is_empty() {
                    usage.ports.insert(view.record.name.clone(), ports);
                }
                views.push(view);
            }
            let mut request = request(replicas, size * GIB);
            if select_fast {
                request.selector.insert("tier".to_string(), "fast".to_string());
            }
            request.exclude = exclude
                .into_iter()
                .map(|i| views[i].record.name.clone())
                .collect();
            Case {
                nodes: views,
                usage,
                request,
            }
        })
}

/// Whether `replicas` is a valid placement of `case` by the rules in the
/// module docs, checked from scratch.
fn valid(case: &Case, replicas: &[ReplicaSlot]) -> bool {
    let one_host = case.nodes.len() == 1 && case.request.replicas > 1;
    if replicas.len() != usize::from(case.request.replicas) {
        return false;
    }
    let mut nodes_used = BTreeSet::new();
    let mut bytes: BTreeMap<(NodeName, String), (u64, u64)> = BTreeMap::new();
    let mut ports: BTreeSet<(NodeName, u16)> = BTreeSet::new();
    for slot in replicas {
        let Some(view) = case.nodes.iter().find(|v| v.record.name == slot.node) else {
            return false;
        };
        let node = &view.record;
        let eligible = view.up
            && !node.cordoned
            && !node.draining
            && !case.request.exclude.contains(&node.name)
            && case
                .request
                .selector
                .iter()
                .all(|(k, v)| node.labels.get(k) == Some(v));
        if !eligible || (!one_host && !nodes_used.insert(node.name.clone())) {
            return false;
        }
        let Some(pool) = node.pools.iter().find(|p| p.name == slot.pool) else {
            return false;
        };
        let entry = bytes
            .entry((node.name.clone(), pool.name.clone()))
            .or_insert((case.usage.pool_bytes(&node.name, &pool.name), 0));
        entry.0 += case.request.size_bytes;
        entry.1 += 1;
        let fits = match pool.kind {
            PoolKind::Directory(_) => entry.0 <= pool.capacity_bytes,
            PoolKind::BlockDevice(_) => {
                entry.1 == 1
                    && case.usage.pool_bytes(&node.name, &pool.name) == 0
                    && case.request.size_bytes <= pool.capacity_bytes
            }
        };
        let port_free = (node.ports.first..=node.ports.last).contains(&slot.port)
            && !case
                .usage
                .ports
                .get(&node.name)
                .is_some_and(|p| p.contains(&slot.port))
            && ports.insert((node.name.clone(), slot.port));
        if !fits || !port_free {
            return false;
        }
    }
    true
}

/// How well a valid placement spreads: distinct spread domains across
/// nodes, or distinct pools on one host.
fn spread(case: &Case, replicas: &[ReplicaSlot]) -> usize {
    if case.nodes.len() == 1 && case.request.replicas > 1 {
        return replicas.iter().map(|r| &r.pool).collect::<BTreeSet<_>>().len();
    }
    replicas
        .iter()
        .map(|r| {
            let view = case.nodes.iter().find(|v| v.record.name == r.node);
            match view.and_then(|v| v.record.labels.get("zone")) {
                Some(zone) => format!("zone {zone}"),
                None => format!("node {}", r.node),
            }
        })
        .collect::<BTreeSet<_>>()
        .len()
}

/// The best spread over every assignment of replicas to (node, pool, port),
/// or `None` when no assignment is valid.
fn brute_force(case: &Case) -> Option<usize> {
    let mut options = Vec::new();
    for view in &case.nodes {
        for pool in &view.record.pools {
            for port in view.record.ports.first..=view.record.ports.last {
                options.push((view.record.name.clone(), pool.name.clone(), port));
            }
        }
    }
    let wanted = usize::from(case.request.replicas);
    let mut best = None;
    let mut index = vec![0usize; wanted];
    if options.is_empty() {
        return None;
    }
    loop {
        let replicas: Vec<ReplicaSlot> = index
            .iter()
            .enumerate()
            .map(|(id, &i)| ReplicaSlot {
                id: id as u32,
                node: options[i].0.clone(),
                pool: options[i].1.clone(),
                port: options[i].2,
            })
            .collect();
        if valid(case, &replicas) {
            best = best.max(Some(spread(case, &replicas)));
        }
        // The next assignment, like an odometer.
        let mut digit = 0;
        loop {
            if digit == wanted {
                return best;
            }
            index[digit] += 1;
            if index[digit] < options.len() {
                break;
            }
            index[digit] = 0;
            digit += 1;
        }
    }
}

fn check_against_brute_force(case: &Case) -> Result<(), TestCaseError> {
    let result = place(&case.request, &case.nodes, &case.usage);
    match (&result, brute_force(case)) {
        (Ok(placed), Some(best)) => {
            prop_assert!(valid(case, &placed.replicas), "invalid: {:?}", placed);
            prop_assert_eq!(spread(case, &placed.replicas), best);
            let one_host = case.nodes.len() == 1 && case.request.replicas > 1;
            prop_assert_eq!(placed.shared_failure_domain, one_host);
        }
        (Err(e), None) => prop_assert!(!e.to_string().is_empty()),
        (Ok(placed), None) => prop_assert!(false, "placed {:?} where nothing is valid", placed),
        (Err(e), Some(_)) => prop_assert!(false, "refused a placeable request: {}", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Valid whenever it answers (distinct nodes across hosts, capacity never
    /// exceeded, ports free and never reused on a node), an error exactly when
    /// no assignment is valid, and the best spread any assignment has; on
    /// the case's cluster and on a one-host cluster of its first node.
    #[test]
    fn placement_is_valid_complete_and_spreads_best(case in arb_case()) {
        let mut one_host = case.clone();
        one_host.nodes.truncate(1);
        check_against_brute_force(&case)?;
        check_against_brute_force(&one_host)?;
    }

    /// The same nodes in another order give the same placement.
    #[test]
    fn placement_does_not_depend_on_node_order(case in arb_case()) {
        let mut reversed = case.nodes.clone();
        reversed.reverse();
        prop_assert_eq!(
            place(&case.request, &case.nodes, &case.usage),
            place(&case.request, &reversed, &case.usage)
        );
    }

    /// The controller lands on an open node with two free ports that no
    /// replica of the volume holds, on a replica's node when one is open, and
    /// fails only when no node is open.
    #[test]
    fn the_controller_lands_on_an_open_node(case in arb_case(), generation in 1..100u64) {
        let replicas = match place(&case.request, &case.nodes, &case.usage) {
            Ok(placed) => placed.replicas,
            Err(_) => Vec::new(),
        };
        let mut taken = case.usage.clone();
        taken.add_replicas(case.request.size_bytes, &replicas);
        let open = |view: &NodeView| {
            view.up
                && !view.record.cordoned
                && !view.record.draining
                && taken.free_ports(&view.record.name, view.record.ports).nth(1).is_some()
        };
        match place_controller(&replicas, &case.nodes, &case.usage, generation) {
            Ok(controller) => {
                let view = case.nodes.iter().find(|v| v.record.name == controller.node);
                prop_assert!(view.is_some_and(open));
                prop_assert_ne!(controller.iscsi_port, controller.api_port);
                let taken_ports = taken.ports.get(&controller.node).cloned().unwrap_or_default();
                prop_assert!(!taken_ports.contains(&controller.iscsi_port));
                prop_assert!(!taken_ports.contains(&controller.api_port));
                prop_assert_eq!(controller.generation, generation);
                let holder_open = case
                    .nodes
                    .iter()
                    .any(|v| open(v) && replicas.iter().any(|r| r.node == v.record.name));
                if holder_open {
                    prop_assert!(replicas.iter().any(|r| r.node == controller.node));
                }
            }
            Err(_) => prop_assert!(!case.nodes.iter().any(open)),
        }
    }
}

fn zone_term(z: &str) -> BTreeMap<String, String> {
    [("zone".to_string(), z.to_string())].into()
}

#[test]
fn requisite_topologies_keep_other_nodes_out_and_say_so() {
    let nodes = vec![
        node("a1", Some("a")),
        node("b1", Some("b")),
        node("c1", Some("c")),
    ];
    let mut req = request(2, GIB);
    req.topology.requisite = vec![zone_term("a"), zone_term("c")];
    let placed = place(&req, &nodes, &Usage::default()).unwrap();
    assert_eq!(nodes_of(&placed), ["a1", "c1"]);
    req.replicas = 3;
    let e = unsatisfiable(place(&req, &nodes, &Usage::default()));
    assert!(
        e.contains("node b1 is in none of the requisite topologies"),
        "{e}"
    );
}

#[test]
fn preferred_topologies_come_first() {
    let nodes = vec![
        node("a1", Some("a")),
        node("b1", Some("b")),
        node("c1", Some("c")),
    ];
    let mut req = request(1, GIB);
    req.topology.preferred = vec![zone_term("c"), zone_term("b")];
    assert_eq!(nodes_of(&place(&req, &nodes, &Usage::default()).unwrap()), ["c1"]);
    req.replicas = 2;
    assert_eq!(
        nodes_of(&place(&req, &nodes, &Usage::default()).unwrap()),
        ["c1", "b1"]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Across hosts, every replica's node is in a requisite topology; when a preferred node could take
    /// a replica, one does.
    #[test]
    fn topology_is_honoured(case in arb_case(), want in 0..3u8, prefer in 0..3u8) {
        prop_assume!(case.nodes.len() > 1);
        let mut case = case;
        case.request.topology.requisite = vec![zone_term(&format!("z{want}")), zone_term(&format!("z{prefer}"))];
        case.request.topology.preferred = vec![zone_term(&format!("z{prefer}"))];
        if let Ok(placed) = place(&case.request, &case.nodes, &case.usage) {
            for slot in &placed.replicas {
                let labels = &case.nodes.iter().find(|n| n.record.name == slot.node).unwrap().record.labels;
                prop_assert!(case.request.topology.admits(labels), "{} outside the requisite zones", slot.node);
            }
            let preferred_fits = case.nodes.iter().any(|n| {
                case.request.topology.preference(&n.record.labels) == 0
                    && check_node(&case.request, n, &case.usage).is_ok()
            });
            if preferred_fits {
                let preferred_used = placed.replicas.iter().any(|slot| {
                    let n = case.nodes.iter().find(|n| n.record.name == slot.node).unwrap();
                    case.request.topology.preference(&n.record.labels) == 0
                });
                prop_assert!(preferred_used, "no replica in the preferred zone though one fits");
            }
        }
    }
}
