//! When a node may delete the data of a replica it no longer holds: a pure decision.
//!
//! A replica replaced while its node was down (or moved off a draining node) stays on that
//! node's disk: the node may come back, and until the volume is whole again without it, that
//! copy may be the best one left to bring back by hand. So a node deletes a replica directory it
//! finds in its pools (`POOL/UUID/replica-ID`) only when all of these hold:
//! * a volume record with that UUID exists and is not being deleted (a deletion removes its
//!   own data; a directory of a volume the store does not know is left alone and logged, since
//!   an empty or restored store must never make every agent wipe its pools);
//! * the record places no replica with that id on this node (it was retired: ids are never
//!   reused, so a new replica never matches an old directory);
//! * no service of it runs here (it is stopped first);
//! * the volume is healthy without it: its controller reports it serving with every placed
//!   replica read-write, and the placement has as many replicas as the volume asks for.

use std::collections::BTreeMap;
use std::path::PathBuf;

use basalt_engine::name::VolumeName;

use crate::model::{NodeName, ReplicaMode, ServiceId, ServiceStatus, VolumePhase, VolumeRecord};

/// A replica directory found in one of this node's directory pools.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FoundReplica {
    pub volume_id: uuid::Uuid,
    pub id: u32,
    pub path: PathBuf,
}

/// Whether `volume`'s controller reports it whole: serving, with every placed replica (as many
/// as the volume asks for) read-write. `statuses` are the volume's, with the reports laid over.
pub fn healthy(volume: &VolumeRecord, statuses: &BTreeMap<ServiceId, ServiceStatus>) -> bool {
    let Some(controller) = &volume.placement.controller else {
        return false;
    };
    let report = statuses
        .get(&ServiceId::Controller)
        .filter(|s| s.node == controller.node)
        .and_then(|s| s.report.as_ref());
    let Some(report) = report else { return false };
    let placed = &volume.placement.replicas;
    report.serving
        && placed.len() >= usize::from(volume.spec.replicas)
        && placed.iter().all(|slot| {
            report
                .replicas
                .iter()
                .any(|r| r.id == slot.id && r.node == slot.node && r.mode == ReplicaMode::Rw)
        })
}

/// The directories among `found` that `me` may delete now (see the module docs), with their
/// volume. `running` says whether a service of this node runs.
pub fn deletable(
    me: &NodeName,
    found: &[FoundReplica],
    volumes: &BTreeMap<VolumeName, VolumeRecord>,
    statuses: &BTreeMap<VolumeName, BTreeMap<ServiceId, ServiceStatus>>,
    running: impl Fn(&VolumeName, &ServiceId) -> bool,
) -> Vec<(VolumeName, PathBuf)> {
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    for dir in found {
        let Some((name, volume)) = volumes.iter().find(|(_, v)| v.spec.uuid == dir.volume_id) else {
            continue;
        };
        if volume.phase == VolumePhase::Deleting {
            continue;
        }
        let placed_here = volume
            .placement
            .replicas
            .iter()
            .any(|slot| slot.id == dir.id && slot.node == *me);
        if placed_here || running(name, &ServiceId::Replica(dir.id)) {
            continue;
        }
        if healthy(volume, statuses.get(name).unwrap_or(&empty)) {
            out.push((name.clone(), dir.path.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ControllerReport, ControllerSlot, Placement, QosSpec, ReplicaSlot, ReportedReplica, ServiceState,
        VolumeSpec,
    };

    fn node(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    fn volume(replicas: &[(u32, &str)]) -> VolumeRecord {
        VolumeRecord {
            spec: VolumeSpec {
                name: VolumeName::new("v").unwrap(),
                uuid: uuid::Uuid::from_u128(9),
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
                replicas: replicas
                    .iter()
                    .map(|(id, n)| ReplicaSlot {
                        id: *id,
                        node: node(n),
                        pool: "p".into(),
                        port: 7000 + *id as u16,
                    })
                    .collect(),
                controller: Some(ControllerSlot {
                    node: node("b"),
                    iscsi_port: 7100,
                    api_port: 7101,
                    generation: 2,
                }),
                next_replica_id: 5,
                retired: Vec::new(),
            },
            phase: VolumePhase::Ready,
            attached_to: None,
        }
    }

    fn controller_status(modes: &[(u32, &str, ReplicaMode)]) -> ServiceStatus {
        ServiceStatus {
            node: node("b"),
            state: ServiceState::Running,
            message: None,
            restarts: 0,
            updated_unix: 0,
            mode: None,
            rebuild: None,
            hydration: None,
            report: Some(ControllerReport {
                epoch: 3,
                serving: true,
                replicas: modes
                    .iter()
                    .map(|(id, n, mode)| ReportedReplica {
                        id: *id,
                        node: node(n),
                        mode: *mode,
                        rebuild: None,
                        hydration: None,
                    })
                    .collect(),
            }),
        }
    }

    fn run(modes: &[(u32, &str, ReplicaMode)], running: bool) -> Vec<(VolumeName, PathBuf)> {
        let v = volume(&[(2, "b"), (3, "c"), (4, "d")]);
        let name = v.spec.name.clone();
        let found = [
            FoundReplica {
                volume_id: v.spec.uuid,
                id: 1,
                path: "/p/uuid/replica-1".into(),
            },
            // A directory of a volume the store does not know: never touched.
            FoundReplica {
                volume_id: uuid::Uuid::from_u128(1),
                id: 1,
                path: "/p/other/replica-1".into(),
            },
        ];
        let statuses = BTreeMap::from([(
            name.clone(),
            BTreeMap::from([(ServiceId::Controller, controller_status(modes))]),
        )]);
        deletable(
            &node("a"),
            &found,
            &BTreeMap::from([(name, v)]),
            &statuses,
            |_, _| running,
        )
    }

    #[test]
    fn a_retired_replica_is_deleted_only_once_the_volume_is_whole_without_it() {
        use ReplicaMode::*;
        let rebuilding = [(2, "b", Rw), (3, "c", Rw), (4, "d", Wo)];
        assert!(run(&rebuilding, false).is_empty());
        let whole = [(2, "b", Rw), (3, "c", Rw), (4, "d", Rw)];
        assert_eq!(
            run(&whole, false),
            vec![(VolumeName::new("v").unwrap(), PathBuf::from("/p/uuid/replica-1"))]
        );
        // Still running here: stopped first, deleted at a later pass.
        assert!(run(&whole, true).is_empty());
    }

    #[test]
    fn a_replica_still_placed_here_is_kept() {
        let v = volume(&[(1, "a"), (3, "c"), (4, "d")]);
        let name = v.spec.name.clone();
        let found = [FoundReplica {
            volume_id: v.spec.uuid,
            id: 1,
            path: "/p/uuid/replica-1".into(),
        }];
        let statuses = BTreeMap::from([(
            name.clone(),
            BTreeMap::from([(
                ServiceId::Controller,
                controller_status(&[
                    (1, "a", ReplicaMode::Rw),
                    (3, "c", ReplicaMode::Rw),
                    (4, "d", ReplicaMode::Rw),
                ]),
            )]),
        )]);
        let out = deletable(
            &node("a"),
            &found,
            &BTreeMap::from([(name, v)]),
            &statuses,
            |_, _| false,
        );
        assert!(out.is_empty());
    }
}
