//! The reconciler's decisions, fed by hand-made records and observations.

use super::*;
use crate::model::{ControllerSlot, Placement, PoolRecord, PortRange, ReplicaSlot, VolumeSpec};
use proptest::prelude::*;

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn vol(name: &str) -> VolumeName {
    VolumeName::new(name).unwrap()
}

fn local() -> Local {
    Local {
        me: node("a"),
        data_dir: "/data".into(),
    }
}

fn node_record(name: &str, last_octet: u8) -> NodeRecord {
    NodeRecord {
        name: node(name),
        address: std::net::IpAddr::from([127, 0, 0, last_octet]),
        api_url: "http://127.0.0.1:9700".into(),
        labels: BTreeMap::new(),
        pools: ["p0", "p1", "p2"]
            .iter()
            .map(|p| PoolRecord {
                name: p.to_string(),
                kind: PoolKind::Directory(format!("/pools/{name}/{p}").into()),
                capacity_bytes: 1 << 40,
                free_bytes: 1 << 40,
            })
            .collect(),
        ports: PortRange {
            first: 7100,
            last: 7199,
        },
        cordoned: false,
        draining: false,
        initiator: None,
    }
}

/// A 3-replica volume: replicas 1..=3 on `replica_nodes`, the controller on `controller`.
fn volume(
    name: &str,
    replica_nodes: [&str; 3],
    controller: &str,
    phase: VolumePhase,
) -> Versioned<VolumeRecord> {
    Versioned {
        value: VolumeRecord {
            spec: VolumeSpec {
                name: vol(name),
                uuid: uuid::Uuid::from_u128(7),
                size_bytes: 1 << 30,
                replicas: 3,
                min_healthy: None,
                selector: BTreeMap::new(),
                spread_key: "zone".into(),
                qos: QosSpec::default(),
                source: None,
                topology: Default::default(),
                access: Default::default(),
            },
            placement: Placement {
                next_replica_id: 0,
                retired: Vec::new(),
                replicas: replica_nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| ReplicaSlot {
                        id: i as u32 + 1,
                        node: node(n),
                        pool: format!("p{i}"),
                        port: 7100 + i as u16,
                    })
                    .collect(),
                controller: Some(ControllerSlot {
                    node: node(controller),
                    iscsi_port: 7110,
                    api_port: 7111,
                    generation: 1,
                }),
            },
            phase,
            attached_to: None,
        },
        revision: 42,
    }
}

fn desired(volumes: Vec<Versioned<VolumeRecord>>) -> Desired {
    let mut d = Desired::default();
    for v in volumes {
        d.volumes.insert(v.value.spec.name.clone(), v);
    }
    d.nodes.insert(node("a"), node_record("a", 1));
    d.nodes.insert(node("b"), node_record("b", 2));
    d
}

fn key(volume: &str, service: ServiceId) -> ServiceKey {
    ServiceKey {
        volume: vol(volume),
        service,
    }
}

fn running() -> Observed {
    Observed {
        state: ServiceState::Running,
        restarts: 0,
        message: None,
    }
}

fn status(on: &str) -> ServiceStatus {
    ServiceStatus {
        node: node(on),
        state: ServiceState::Running,
        message: None,
        restarts: 0,
        updated_unix: 1,
        mode: None,
        rebuild: None,
        hydration: None,
        report: None,
    }
}

fn ensured(actions: &[Action]) -> Vec<ServiceKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Ensure { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

fn view(serving: bool, rw: usize) -> ControllerView {
    ControllerView {
        size_bytes: 1 << 30,
        serving,
        rw_replicas: rw,
        qos: QosSpec::default(),
        epoch: 1,
        replicas: Vec::new(),
        allowed: None,
    }
}

#[test]
fn a_node_runs_exactly_the_services_placed_on_it() {
    let d = desired(vec![volume("v1", ["a", "b", "a"], "a", VolumePhase::Creating)]);
    let actions = plan(&local(), &d, &Seen::default(), 5);
    assert_eq!(
        ensured(&actions),
        vec![
            key("v1", ServiceId::Replica(1)),
            key("v1", ServiceId::Replica(3)),
            key("v1", ServiceId::Controller)
        ]
    );
    // Nothing runs yet: no status to report, no phase to change; the controller's lease is taken.
    assert!(
        actions
            .iter()
            .all(|a| matches!(a, Action::Ensure { .. } | Action::TakeLease { .. })),
        "{actions:?}"
    );
}

#[test]
fn a_replica_lives_in_its_pool_under_the_volume_uuid_and_listens_on_its_node() {
    let d = desired(vec![volume("v1", ["a", "b", "a"], "b", VolumePhase::Creating)]);
    let actions = plan(&local(), &d, &Seen::default(), 5);
    let Some(Action::Ensure {
        spec: ServiceSpec::Replica(r),
        secrets_of,
        ..
    }) = actions.first()
    else {
        panic!("{actions:?}")
    };
    assert_eq!(
        r.storage,
        ReplicaStorage::Directory("/pools/a/p0/00000000-0000-0000-0000-000000000007/replica-1".into())
    );
    assert_eq!(r.listen, "127.0.0.1:7100".parse().unwrap());
    assert_eq!(r.secret_file, PathBuf::from("/data/secrets/v1/peer-secret"));
    assert_eq!(secrets_of, &vec![vol("v1")]);
}

#[test]
fn the_controller_reaches_every_replica_at_its_nodes_address() {
    let d = desired(vec![volume("v1", ["a", "b", "a"], "a", VolumePhase::Creating)]);
    let actions = plan(&local(), &d, &Seen::default(), 5);
    let c = actions
        .iter()
        .find_map(|a| match a {
            Action::Ensure {
                spec: ServiceSpec::Controller(c),
                ..
            } => Some(c),
            _ => None,
        })
        .unwrap();
    let replicas: Vec<String> = c.replicas.iter().map(|r| r.to_string()).collect();
    assert_eq!(replicas, ["127.0.0.1:7100", "127.0.0.2:7101", "127.0.0.1:7102"]);
    assert_eq!(c.iscsi, "127.0.0.1:7110".parse().unwrap());
    assert_eq!(c.api_token_file, PathBuf::from("/data/secrets/v1/api-token"));
}

#[test]
fn a_replica_on_an_unregistered_node_cannot_be_reached_and_its_controller_says_so() {
    let mut d = desired(vec![volume("v1", ["a", "c", "a"], "a", VolumePhase::Creating)]);
    d.nodes.remove(&node("c"));
    let actions = plan(&local(), &d, &Seen::default(), 5);
    assert!(!ensured(&actions).contains(&key("v1", ServiceId::Controller)));
    let msg = actions
        .iter()
        .find_map(|a| match a {
            Action::WriteStatus {
                service: ServiceId::Controller,
                status,
                ..
            } => status.message.clone(),
            _ => None,
        })
        .unwrap();
    assert!(msg.contains("node c is not registered"), "{msg}");
}

#[test]
fn a_status_is_written_when_it_changed_and_not_otherwise() {
    let mut d = desired(vec![volume("v1", ["a", "b", "b"], "b", VolumePhase::Ready)]);
    let mut seen = Seen::default();
    seen.services.insert(key("v1", ServiceId::Replica(1)), running());
    let writes = |d: &Desired, seen: &Seen| {
        plan(&local(), d, seen, 9)
            .into_iter()
            .filter(|a| matches!(a, Action::WriteStatus { .. }))
            .count()
    };
    assert_eq!(writes(&d, &seen), 1);
    d.statuses.insert((vol("v1"), ServiceId::Replica(1)), status("a"));
    assert_eq!(writes(&d, &seen), 0);
    seen.services
        .get_mut(&key("v1", ServiceId::Replica(1)))
        .unwrap()
        .restarts = 1;
    assert_eq!(writes(&d, &seen), 1);
}

#[test]
fn the_controllers_node_moves_a_new_volume_to_ready_once_the_controller_serves_every_replica() {
    let d = desired(vec![volume("v1", ["a", "a", "a"], "a", VolumePhase::Creating)]);
    let mut seen = Seen::default();
    let phase = |seen: &Seen| {
        plan(&local(), &d, seen, 9).into_iter().find_map(|a| match a {
            Action::SetPhase { phase, revision, .. } => {
                assert_eq!(revision, 42);
                Some(phase)
            }
            _ => None,
        })
    };
    assert_eq!(phase(&seen), None, "no answer yet: still creating");
    seen.controllers.insert(vol("v1"), view(false, 0));
    assert_eq!(phase(&seen), None, "not serving yet: still creating");
    seen.controllers.insert(vol("v1"), view(true, 2));
    assert_eq!(phase(&seen), Some(VolumePhase::Degraded));
    seen.controllers.insert(vol("v1"), view(true, 3));
    assert_eq!(phase(&seen), Some(VolumePhase::Ready));
}

#[test]
fn only_the_controllers_node_decides_the_phase_and_expansions() {
    let mut v = volume("v1", ["a", "a", "a"], "b", VolumePhase::Creating);
    v.value.spec.size_bytes = 2 << 30;
    let d = desired(vec![v]);
    let mut seen = Seen::default();
    // Even with a (stale) view of a controller it does not host.
    seen.controllers.insert(vol("v1"), view(true, 3));
    let actions = plan(&local(), &d, &seen, 9);
    assert!(!actions.iter().any(|a| matches!(
        a,
        Action::SetPhase { .. } | Action::Expand { .. } | Action::SetQos { .. }
    )));
}

#[test]
fn a_larger_size_is_applied_online_and_the_controller_keeps_starting_with_the_size_it_serves() {
    let mut v = volume("v1", ["a", "a", "a"], "a", VolumePhase::Ready);
    v.value.spec.size_bytes = 2 << 30;
    let d = desired(vec![v]);
    let mut seen = Seen::default();
    seen.services.insert(key("v1", ServiceId::Controller), running());
    seen.controllers.insert(vol("v1"), view(true, 3));
    let actions = plan(&local(), &d, &seen, 9);
    assert!(actions.contains(&Action::Expand {
        volume: vol("v1"),
        size_bytes: 2 << 30
    }));
    let size = actions.iter().find_map(|a| match a {
        Action::Ensure {
            spec: ServiceSpec::Controller(c),
            ..
        } => Some(c.size_bytes),
        _ => None,
    });
    assert_eq!(size, Some(1 << 30));
}

#[test]
fn qos_limits_that_differ_from_the_spec_are_applied() {
    let mut v = volume("v1", ["a", "a", "a"], "a", VolumePhase::Ready);
    v.value.spec.qos.write_iops = Some(100);
    let d = desired(vec![v]);
    let mut seen = Seen::default();
    seen.controllers.insert(vol("v1"), view(true, 3));
    let actions = plan(&local(), &d, &seen, 9);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::SetQos { qos, .. } if qos.write_iops == Some(100))));
    seen.controllers.get_mut(&vol("v1")).unwrap().qos.write_iops = Some(100);
    assert!(!plan(&local(), &d, &seen, 9)
        .iter()
        .any(|a| matches!(a, Action::SetQos { .. })));
}

#[test]
fn the_target_lets_in_the_attached_node_only_when_access_says_so() {
    use crate::model::{initiator_iqn, TargetAccess};
    let allow_lists = |actions: &[Action]| -> Vec<Option<Vec<String>>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SetAllowList { allowed, .. } => Some(allowed.clone()),
                _ => None,
            })
            .collect()
    };
    // A volume open to any initiator, seen open: nothing to do.
    let mut v = volume("v1", ["a", "a", "a"], "a", VolumePhase::Ready);
    let mut seen = Seen::default();
    seen.controllers.insert(vol("v1"), view(true, 3));
    assert!(allow_lists(&plan(&local(), &desired(vec![v.clone()]), &seen, 9)).is_empty());
    // Restricted and detached: nobody; the controller starts closed.
    v.value.spec.access = TargetAccess::AttachedNode;
    let actions = plan(&local(), &desired(vec![v.clone()]), &seen, 9);
    assert_eq!(allow_lists(&actions), vec![Some(vec![])]);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Ensure { spec: ServiceSpec::Controller(c), .. } if c.closed)));
    // Attached to node b: only b's initiator, and nothing more once the controller serves that.
    v.value.attached_to = Some(NodeName::new("b").unwrap());
    let want = vec![initiator_iqn(&NodeName::new("b").unwrap())];
    assert_eq!(
        allow_lists(&plan(&local(), &desired(vec![v.clone()]), &seen, 9)),
        vec![Some(want.clone())]
    );
    seen.controllers.get_mut(&vol("v1")).unwrap().allowed =
        normalized(Some(want.iter().map(|n| n.to_uppercase()).collect()));
    assert!(
        allow_lists(&plan(&local(), &desired(vec![v.clone()]), &seen, 9)).is_empty(),
        "initiator names compare case-insensitively"
    );
    // Node b attaches through its kernel initiator, under the name it registered: that name is let in.
    let mut d = desired(vec![v]);
    let mut b = node_record("b", 2);
    b.initiator = Some("iqn.1993-08.org.debian:01:5eed".into());
    d.nodes.insert(b.name.clone(), b);
    assert_eq!(
        allow_lists(&plan(&local(), &d, &seen, 9)),
        vec![Some(vec!["iqn.1993-08.org.debian:01:5eed".to_string()])]
    );
}

#[test]
fn deleting_stops_services_removes_data_and_statuses_then_releases_this_nodes_parts() {
    let mut d = desired(vec![volume("v1", ["a", "a", "b"], "a", VolumePhase::Deleting)]);
    d.statuses.insert((vol("v1"), ServiceId::Replica(1)), status("a"));
    d.statuses.insert((vol("v1"), ServiceId::Replica(3)), status("b"));
    let mut seen = Seen::default();
    seen.services.insert(key("v1", ServiceId::Replica(1)), running());
    seen.services.insert(key("v1", ServiceId::Controller), running());
    let actions = plan(&local(), &d, &seen, 9);
    let stop_at = actions
        .iter()
        .rposition(|a| matches!(a, Action::Stop { .. }))
        .unwrap();
    let remove_at = actions
        .iter()
        .position(|a| matches!(a, Action::RemoveData { .. }))
        .unwrap();
    assert!(
        stop_at < remove_at,
        "data is removed only after its service stopped: {actions:?}"
    );
    let removed: Vec<&PathBuf> = actions
        .iter()
        .filter_map(|a| match a {
            Action::RemoveData { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    assert_eq!(removed.len(), 2, "only this node's replicas: {removed:?}");
    assert!(actions.contains(&Action::DeleteStatus {
        volume: vol("v1"),
        service: ServiceId::Replica(1)
    }));
    assert_eq!(
        actions.last(),
        Some(&Action::ReleaseParts {
            volume: vol("v1"),
            revision: 42
        }),
        "the release (this node's confirmation) comes after every cleanup step: {actions:?}"
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::DeleteVolume { .. })));
    assert!(!ensured(&actions).iter().any(|k| k.volume == vol("v1")));

    // Once a has released its parts, b (down) still holds replica 3: a waits.
    let released = without_parts_of(&d.volumes[&vol("v1")].value, &node("a"));
    assert_eq!(cleanup_pending(&released), vec![node("b")]);
    assert_eq!(
        deletion_step(&released, &node("a")),
        DeletionStep::Wait {
            pending: vec![node("b")]
        }
    );
    d.volumes.get_mut(&vol("v1")).unwrap().value = released.clone();
    let actions = plan(&local(), &d, &Seen::default(), 9);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::DeleteVolume { .. } | Action::ReleaseParts { .. })),
        "{actions:?}"
    );

    // b comes back, cleans up and releases; then anyone deletes the record.
    assert_eq!(deletion_step(&released, &node("b")), DeletionStep::Release);
    let empty = without_parts_of(&released, &node("b"));
    assert!(cleanup_pending(&empty).is_empty());
    d.volumes.get_mut(&vol("v1")).unwrap().value = empty;
    let actions = plan(&local(), &d, &Seen::default(), 9);
    assert_eq!(
        actions.last(),
        Some(&Action::DeleteVolume {
            volume: vol("v1"),
            revision: 42
        })
    );
}

#[test]
fn a_deleted_replica_on_a_block_device_pool_is_wiped() {
    let mut d = desired(vec![volume("v1", ["a", "b", "c"], "b", VolumePhase::Deleting)]);
    let a = d.nodes.get_mut(&node("a")).unwrap();
    for pool in &mut a.pools {
        pool.kind = PoolKind::BlockDevice(PathBuf::from(format!("/dev/{}", pool.name)));
    }
    let actions = plan(&local(), &d, &Seen::default(), 9);
    let wiped: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::WipeDevice { device, .. } => Some(device.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(wiped.len(), 1, "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::RemoveData { .. })));
    let wipe_at = actions
        .iter()
        .position(|a| matches!(a, Action::WipeDevice { .. }));
    let release_at = actions
        .iter()
        .position(|a| matches!(a, Action::ReleaseParts { .. }));
    assert!(wipe_at < release_at, "{actions:?}");
}

#[test]
fn a_service_of_a_volume_without_a_record_is_stopped_and_its_status_dropped_but_its_data_kept() {
    let mut d = desired(vec![]);
    d.statuses
        .insert((vol("gone"), ServiceId::Replica(1)), status("a"));
    d.statuses
        .insert((vol("gone"), ServiceId::Replica(2)), status("b"));
    let mut seen = Seen::default();
    seen.services
        .insert(key("gone", ServiceId::Replica(1)), running());
    let actions = plan(&local(), &d, &seen, 9);
    assert_eq!(
        actions,
        vec![
            Action::Stop {
                key: key("gone", ServiceId::Replica(1))
            },
            Action::DeleteStatus {
                volume: vol("gone"),
                service: ServiceId::Replica(1)
            },
        ]
    );
}

#[test]
fn a_clone_replica_reads_every_source_replica_with_the_sources_secret() {
    let src = volume("src", ["a", "b", "b"], "a", VolumePhase::Ready);
    let mut clone = volume("cl", ["a", "a", "a"], "a", VolumePhase::Creating);
    clone.value.spec.uuid = uuid::Uuid::from_u128(8);
    clone.value.spec.source = Some(crate::model::SnapshotRef {
        volume: vol("src"),
        snapshot: "s1".into(),
    });
    let d = desired(vec![src, clone]);
    let actions = plan(&local(), &d, &Seen::default(), 9);
    let (r, secrets_of) = actions
        .iter()
        .find_map(|a| match a {
            Action::Ensure {
                key,
                spec: ServiceSpec::Replica(r),
                secrets_of,
            } if key.volume == vol("cl") => Some((r, secrets_of)),
            _ => None,
        })
        .unwrap();
    let c = r.clone.as_ref().unwrap();
    assert_eq!(c.replicas.len(), 3);
    assert_eq!(c.replicas[1], "127.0.0.2:7101".parse().unwrap());
    assert_eq!(c.source_volume_id, uuid::Uuid::from_u128(7));
    assert_eq!(
        c.source_secret_file,
        PathBuf::from("/data/secrets/src/peer-secret")
    );
    assert_eq!(secrets_of, &vec![vol("cl"), vol("src")]);
}

#[test]
fn the_controllers_view_is_read_from_volume_info() {
    let reply = pb::VolumeInfoReply {
        size_bytes: 4096,
        state: "serving".into(),
        replicas: vec![
            pb::ReplicaStatus {
                mode: "RW".into(),
                ..Default::default()
            },
            pb::ReplicaStatus {
                mode: "WO".into(),
                ..Default::default()
            },
            pb::ReplicaStatus {
                mode: "RW".into(),
                removed: true,
                ..Default::default()
            },
        ],
        qos: Some(pb::QosLimits {
            write_iops: Some(pb::QosLimit { rate: 10, burst: 99 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let v = view_from_reply(&reply);
    assert!(v.serving);
    assert_eq!(v.rw_replicas, 1);
    assert_eq!(v.qos.write_iops, Some(10));
    assert_eq!(qos_from_reply(qos_request(&v.qos).limits.as_ref()), v.qos);
}

type FailoverPlans = [(VolumeName, store::Revision, crate::failover::Plan, VolumeRecord)];

/// The first volume's plan holds `replica` on `on` in its grace period until `until_unix`.
fn assert_in_grace(plans: &FailoverPlans, replica: u32, on: &str, until_unix: u64) {
    let hold = crate::failover::Hold::ReplicaInGrace {
        replica,
        node: node(on),
        until_unix,
    };
    assert!(plans[0].2.holds.contains(&hold), "{plans:?}");
}

#[test]
fn a_controller_on_a_down_node_moves_to_an_up_node_holding_a_replica_and_its_replicas_wait_for_the_grace() {
    let grace = Duration::from_secs(300);
    let mut d = desired(vec![volume("v1", ["a", "b", "b"], "b", VolumePhase::Ready)]);
    d.up.insert(node("a"));
    // b is down and nobody marked it yet: this agent marks it before deciding.
    assert_eq!(unmarked_down(&d), vec![node("b")]);
    let plans = failover_plans(&d, 1000, grace);
    let (name, revision, plan, next) = &plans[0];
    assert_eq!((name, *revision), (&vol("v1"), 42));
    assert!(
        matches!(plan.actions[0], crate::failover::Action::MoveController { .. }),
        "{plan:?}"
    );
    let c = next.placement.controller.as_ref().unwrap();
    assert_eq!((c.node.clone(), c.generation), (node("a"), 2));
    // Replicas on b are within their grace period: kept.
    assert_eq!(
        next.placement.replicas,
        d.volumes[&vol("v1")].value.placement.replicas
    );

    // Marked at 1000: the grace counts from the mark, whoever reads it.
    d.down_since.insert(node("b"), 1000);
    assert!(unmarked_down(&d).is_empty());
    let plans = failover_plans(&d, 1299, grace);
    assert_in_grace(&plans, 2, "b", 1300);
    // Up again (its agent's NodeAlive put over the mark), the controller back on b: nothing to do.
    d.down_since.clear();
    d.up.insert(node("b"));
    assert!(unmarked_down(&d).is_empty());
    let plans = failover_plans(&d, 3000, grace);
    assert!(plans.is_empty(), "{plans:?}");
}

/// A node that comes back and goes down again while this agent is not looking (its passes slow, or
/// another agent deciding): its replicas are replaced only a full grace period after the *latest*
/// lapse of its lease, by whichever agent decides. An agent that kept its own memory of when it first
/// saw a node down replaced them one grace after the earlier outage: in the four-host test, ~45 s
/// after the cut for a 60 s grace, when the cut host had been cut once before and was up again for
/// only a few seconds in between.
#[tokio::test]
async fn a_replica_is_replaced_a_full_grace_after_its_nodes_latest_lapse_whoever_decides() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    let store: &dyn Store = store.as_ref();
    let grace = Duration::from_secs(300);
    // What a node's agent does to be up (daemon's grant_alive): a NodeAlive on a fresh lease, put
    // over whatever the key holds.
    let come_up = |name: &'static str| async move {
        let lease = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
        store::put_json(
            store,
            &keys::node_alive(&node(name)),
            &crate::model::NodeAlive { since_unix: 0 },
            Expect::Any,
            Some(lease),
        )
        .await
        .unwrap();
        lease
    };
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let record = node_record(name, i as u8 + 1);
        store::put_json(store, &keys::node(&node(name)), &record, Expect::Absent, None)
            .await
            .unwrap();
    }
    for name in ["a", "b", "d"] {
        come_up(name).await;
    }
    let c_lease = come_up("c").await;
    let v = volume("v1", ["a", "b", "c"], "a", VolumePhase::Ready).value;
    store::put_json(store, &keys::volume(&vol("v1")), &v, Expect::Absent, None)
        .await
        .unwrap();
    // What a pass reads, with every replica in sync (as their controller reports them).
    let read = || async {
        let mut d = read_desired(store).await.unwrap();
        for (id, on) in [(1, "a"), (2, "b"), (3, "c")] {
            let mut s = status(on);
            s.mode = Some(ReplicaMode::Rw);
            d.statuses.insert((vol("v1"), ServiceId::Replica(id)), s);
        }
        d
    };
    let replaced = |plans: &FailoverPlans| {
        plans.iter().find_map(|(_, _, plan, _)| {
            plan.actions.iter().find_map(|a| match a {
                crate::failover::Action::ReplaceReplica {
                    lost,
                    replacement,
                    down_since_unix,
                } => Some((lost.node.clone(), replacement.node.clone(), *down_since_unix)),
                _ => None,
            })
        })
    };

    // c's lease lapses; agent A sees it at 1000 and marks it.
    store.revoke(c_lease).await.unwrap();
    let d = read().await;
    assert_eq!(unmarked_down(&d), vec![node("c")]);
    mark_down(store, &d, 1000).await.unwrap();
    assert_eq!(read().await.down_since.get(&node("c")), Some(&1000));

    // c comes back (its NodeAlive over the mark), and its lease lapses again; agent B marks it at 1200.
    // Agent A's stale read of c as down cannot mark it while it is up.
    let c_lease = come_up("c").await;
    mark_down(store, &d, 1100).await.unwrap();
    let back = read().await;
    assert!(back.up.contains(&node("c")) && back.down_since.is_empty());
    store.revoke(c_lease).await.unwrap();
    mark_down(store, &read().await, 1200).await.unwrap();
    // A later mark attempt keeps the first time.
    mark_down(store, &read().await, 1250).await.unwrap();

    // Agent A decides at 1301, a grace after the first lapse: c's replica waits (until 1500).
    let d = read().await;
    assert_eq!(d.down_since.get(&node("c")), Some(&1200));
    let plans = failover_plans(&d, 1301, grace);
    assert_eq!(replaced(&plans), None, "{plans:?}");
    assert_in_grace(&plans, 3, "c", 1500);
    assert_eq!(replaced(&failover_plans(&d, 1499, grace)), None);
    // A full grace after the latest lapse: replaced on the free node, with the mark's time.
    assert_eq!(
        replaced(&failover_plans(&d, 1500, grace)),
        Some((node("c"), node("d"), 1200))
    );
}

fn arb_phase() -> impl Strategy<Value = VolumePhase> {
    prop_oneof![
        Just(VolumePhase::Creating),
        Just(VolumePhase::Ready),
        Just(VolumePhase::Degraded),
        Just(VolumePhase::Deleting)
    ]
}

proptest! {
    /// Whatever the records and observations: a node only ever starts
    /// services placed on it, never starts anything of a volume being
    /// deleted, never deletes data of a replica placed elsewhere, and
    /// removes data only after stopping that volume's services.
    #[test]
    fn a_node_only_touches_what_is_its_own(
        placements in proptest::collection::vec((proptest::array::uniform3(0usize..3), 0usize..3, arb_phase()), 0..5),
        running_mask in proptest::collection::vec(any::<bool>(), 0..20),
    ) {
        let names = ["a", "b", "c"];
        let vols: Vec<_> = placements
            .iter()
            .enumerate()
            .map(|(i, (r, c, p))| volume(&format!("v{i}"), [names[r[0]], names[r[1]], names[r[2]]], names[*c], *p))
            .collect();
        let d = desired(vols.clone());
        let mut seen = Seen::default();
        let mut m = running_mask.iter();
        for v in &vols {
            for s in [ServiceId::Replica(1), ServiceId::Replica(2), ServiceId::Replica(3), ServiceId::Controller] {
                if m.next().copied().unwrap_or(false) {
                    seen.services.insert(ServiceKey { volume: v.value.spec.name.clone(), service: s }, running());
                }
            }
        }
        let actions = plan(&local(), &d, &seen, 1);
        for (i, a) in actions.iter().enumerate() {
            match a {
                Action::Ensure { key, .. } => {
                    let v = &d.volumes[&key.volume].value;
                    prop_assert!(v.phase != VolumePhase::Deleting);
                    prop_assert!(my_services(v, &node("a")).contains(&key.service));
                }
                Action::RemoveData { volume, path } => {
                    let v = &d.volumes[volume].value;
                    prop_assert_eq!(v.phase, VolumePhase::Deleting);
                    prop_assert!(path.starts_with("/pools/a/"));
                    let stops_later = actions[i..]
                        .iter()
                        .any(|b| matches!(b, Action::Stop { key } if key.volume == *volume));
                    prop_assert!(!stops_later);
                }
                Action::ReleaseParts { volume, .. } => {
                    // Only a node that holds a part releases, after its cleanup.
                    let v = &d.volumes[volume].value;
                    prop_assert!(cleanup_pending(v).contains(&node("a")));
                    let cleans_later = actions[i..].iter().any(|b| {
                        b.volume() == volume
                            && matches!(b, Action::Stop { .. } | Action::RemoveData { .. } | Action::DeleteStatus { .. })
                    });
                    prop_assert!(!cleans_later);
                }
                Action::DeleteVolume { volume, .. } => {
                    // Never while any node still holds a part.
                    prop_assert!(cleanup_pending(&d.volumes[volume].value).is_empty());
                }
                _ => {}
            }
        }
    }
}

fn lease(on: &str, generation: u64) -> Versioned<VolumeLease> {
    Versioned {
        value: VolumeLease {
            node: node(on),
            generation,
        },
        revision: 77,
    }
}

#[test]
fn the_controller_starts_only_under_the_volumes_lease() {
    let mut d = desired(vec![volume("v1", ["a", "b", "b"], "a", VolumePhase::Ready)]);
    let controller = key("v1", ServiceId::Controller);
    // Nobody holds it: taken (created only where absent), then the controller is ensured.
    let actions = plan(&local(), &d, &Seen::default(), 9);
    let take = actions
        .iter()
        .position(|a| {
            *a == Action::TakeLease {
                volume: vol("v1"),
                generation: 1,
                expect: Expect::Absent,
            }
        })
        .expect("the lease is taken");
    let ensure = actions
        .iter()
        .position(|a| matches!(a, Action::Ensure { key, .. } if *key == controller))
        .expect("the controller is ensured");
    assert!(take < ensure);
    // Held here for this generation: nothing to take.
    d.leases.insert(vol("v1"), lease("a", 1));
    let actions = plan(&local(), &d, &Seen::default(), 9);
    assert!(!actions.iter().any(|a| matches!(a, Action::TakeLease { .. })));
    assert!(ensured(&actions).contains(&controller));
    // Held by another node (its controller may still serve): not started, and stopped if it ran.
    d.leases.insert(vol("v1"), lease("b", 1));
    let mut seen = Seen::default();
    seen.services.insert(controller.clone(), running());
    let actions = plan(&local(), &d, &seen, 9);
    assert!(!ensured(&actions).contains(&controller));
    assert!(actions.contains(&Action::Stop { key: controller }));
    let waiting = actions.iter().any(|a| {
        matches!(a, Action::WriteStatus { status, .. }
        if status.message.as_deref().is_some_and(|m| m.contains("node b")))
    });
    assert!(waiting, "{actions:?}");
}

#[test]
fn a_lease_is_given_back_once_the_controller_that_moved_away_stopped() {
    let mut d = desired(vec![volume("v1", ["a", "b", "b"], "b", VolumePhase::Ready)]);
    d.leases.insert(vol("v1"), lease("a", 1));
    let release = Action::ReleaseLease {
        volume: vol("v1"),
        revision: 77,
    };
    let mut seen = Seen::default();
    seen.services.insert(key("v1", ServiceId::Controller), running());
    let actions = plan(&local(), &d, &seen, 9);
    assert!(!actions.contains(&release), "still running here");
    assert!(plan(&local(), &d, &Seen::default(), 9).contains(&release));
}

/// A view of the controller of a volume placed by [`volume`] on nodes a and b.
fn view_of_members(members: &[(&str, u16, ReplicaMode)]) -> ControllerView {
    let address = |n: &str, port: u16| {
        let last = if n == "a" { 1 } else { 2 };
        format!("127.0.0.{last}:{port}")
    };
    ControllerView {
        replicas: members
            .iter()
            .map(|(n, port, mode)| ViewedReplica {
                address: address(n, *port),
                mode: *mode,
                removed: false,
                rebuild: (*mode == ReplicaMode::Wo).then_some(Progress {
                    done_bytes: 1,
                    total_bytes: 4,
                }),
                hydration: None,
            })
            .collect(),
        ..view(true, members.iter().filter(|m| m.2 == ReplicaMode::Rw).count())
    }
}

#[test]
fn the_controllers_view_is_reported_by_replica_id_and_laid_over_the_replicas_statuses() {
    let mut d = desired(vec![volume("v1", ["a", "b", "b"], "a", VolumePhase::Ready)]);
    d.leases.insert(vol("v1"), lease("a", 1));
    let mut seen = Seen::default();
    seen.services.insert(key("v1", ServiceId::Controller), running());
    seen.controllers.insert(
        vol("v1"),
        view_of_members(&[
            ("a", 7100, ReplicaMode::Rw),
            ("b", 7101, ReplicaMode::Wo),
            ("b", 7102, ReplicaMode::Err),
        ]),
    );
    let report = plan(&local(), &d, &seen, 9)
        .into_iter()
        .find_map(|a| match a {
            Action::WriteStatus {
                service: ServiceId::Controller,
                status,
                ..
            } => status.report,
            _ => None,
        })
        .expect("the controller's status carries its report");
    let modes: Vec<(u32, ReplicaMode)> = report.replicas.iter().map(|r| (r.id, r.mode)).collect();
    assert_eq!(
        modes,
        [(1, ReplicaMode::Rw), (2, ReplicaMode::Wo), (3, ReplicaMode::Err)]
    );
    assert_eq!(
        report.replicas[1].rebuild,
        Some(Progress {
            done_bytes: 1,
            total_bytes: 4
        })
    );

    let mut controller_status = status("a");
    controller_status.report = Some(report);
    let replica = status("b").with_report(2, Some(&controller_status), Some(&node("a")));
    assert_eq!(replica.mode, Some(ReplicaMode::Wo));
    // A report from a node that no longer runs the controller says nothing.
    let stale = status("b").with_report(2, Some(&controller_status), Some(&node("b")));
    assert_eq!(stale.mode, None);
}

#[test]
fn a_replaced_replica_is_removed_from_the_controller_and_its_replacement_added() {
    // Placement: replica 1 on a, 2 on b, 3 on b (port 7102); the controller still has a lost
    // member at b:7150 (ERR) instead of replica 3.
    let mut d = desired(vec![volume("v1", ["a", "b", "b"], "a", VolumePhase::Degraded)]);
    d.leases.insert(vol("v1"), lease("a", 1));
    for (id, on) in [(1, "a"), (2, "b"), (3, "b")] {
        d.statuses.insert((vol("v1"), ServiceId::Replica(id)), status(on));
    }
    let mut seen = Seen::default();
    seen.services.insert(key("v1", ServiceId::Controller), running());
    seen.controllers.insert(
        vol("v1"),
        view_of_members(&[
            ("a", 7100, ReplicaMode::Rw),
            ("b", 7101, ReplicaMode::Rw),
            ("b", 7150, ReplicaMode::Err),
        ]),
    );
    let changes: Vec<Action> = plan(&local(), &d, &seen, 9)
        .into_iter()
        .filter(|a| matches!(a, Action::ReplicaAdd { .. } | Action::ReplicaRemove { .. }))
        .collect();
    assert_eq!(
        changes,
        [
            Action::ReplicaRemove {
                volume: vol("v1"),
                address: "127.0.0.2:7150".into()
            },
            Action::ReplicaAdd {
                volume: vol("v1"),
                address: "127.0.0.2:7102".into()
            }
        ]
    );
}
