//! The CSI driver under a real `basalt agent` (embedded store, `process` runtime, three pools, topology
//! label `zone=a`), driven over its unix socket by a tonic client as a CO's sidecars would: Identity,
//! then a volume's life cycle through the Controller service (CreateVolume with topology, publish, data
//! written and read at the volume's iSCSI URL with qemu-io, snapshot, clone read back, online expansion,
//! unpublish, delete), then every error case the spec names, RPC by RPC, from one table.

use std::collections::HashMap;

use basalt_agent::csi::pb::controller_client::ControllerClient;
use basalt_agent::csi::pb::identity_client::IdentityClient;
use basalt_agent::csi::pb::{self, volume_capability, volume_content_source};
use basalt_agent::model::{initiator_iqn, NodeName};
use basalt_tests::csi::{
    assert_codes, block_cap, case, delete_snapshot_once_released, mount_cap, CsiAgent, Socket, READY_TIMEOUT,
};
use basalt_tests::volume::{qemu_io, qemu_io_as};
use basalt_tests::wait_for;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn zone(z: &str) -> pb::Topology {
    pb::Topology {
        segments: [("topology.basalt.csi.io/zone".to_string(), z.to_string())].into(),
    }
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create_request(name: &str, size: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params(&[("replicas", "3"), ("csi.storage.k8s.io/pvc/name", "data")]),
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![zone("a"), zone("b")],
            preferred: vec![zone("a")],
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_lives_its_csi_life_under_a_real_agent() {
    let agent = CsiAgent::start(&[Socket::Controller]);
    let channel = agent.channel(Socket::Controller).await;
    let mut identity = IdentityClient::new(channel.clone());
    let mut csi = ControllerClient::new(channel);

    // Identity.
    let info = identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "basalt.csi.io");
    assert!(!info.vendor_version.is_empty());
    let probe = identity.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 3, "{caps:?}");

    // CreateVolume with topology: placed in zone a (the only zone with nodes), and idempotent by name.
    let name = "pvc-7d0c2c44-1f0b-4e4f-9a51-2b7de3c0a001";
    let created = csi
        .create_volume(create_request(name, 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    let volume = created.volume.unwrap();
    assert_eq!(volume.volume_id, name);
    assert_eq!(volume.capacity_bytes, 64 * MIB);
    assert_eq!(volume.accessible_topology, vec![zone("a")]);
    assert_eq!(
        volume.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    let again = csi
        .create_volume(create_request(name, 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.volume.unwrap().volume_id, name);
    let bigger = csi
        .create_volume(create_request(name, 128 * MIB))
        .await
        .unwrap_err();
    assert_eq!(bigger.code(), Code::AlreadyExists, "{bigger:?}");
    let mut other = create_request(name, 64 * MIB);
    other.parameters = params(&[("replicas", "1")]);
    assert_eq!(
        csi.create_volume(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    // A zone with no node: nothing can be placed there.
    let mut nowhere = create_request("pvc-nowhere", 64 * MIB);
    nowhere.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![zone("z")],
        preferred: vec![],
    });
    assert_eq!(
        csi.create_volume(nowhere).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    let url = agent.wait_ready(name);

    // Publish to this node: recorded, listed with the volume, refused for an unknown node.
    let publish = |node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: name.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    csi.controller_publish_volume(publish(&agent.node)).await.unwrap();
    csi.controller_publish_volume(publish(&agent.node)).await.unwrap();
    assert_eq!(
        csi.controller_publish_volume(publish("no-such-node"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let listed = csi
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let entry = listed
        .entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == name)
        .unwrap();
    assert_eq!(
        entry.status.as_ref().unwrap().published_node_ids,
        vec![agent.node.clone()]
    );
    let deleting_published = csi
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(deleting_published.code(), Code::FailedPrecondition);

    // Authorized access: the published node's initiator logs in and writes (the node service will do
    // this through a mount); a node it was never published to, and an initiator of no node, cannot.
    let me = initiator_iqn(&NodeName::new(&agent.node).unwrap());
    let stranger = initiator_iqn(&NodeName::new("never-published").unwrap());
    let (ok, out) = qemu_io_as(&url, &me, &["write -P 0x5a 0 1M"]).unwrap();
    assert!(ok, "{out}");
    let (ok, out) = qemu_io_as(&url, &stranger, &["read -P 0x5a 0 1M"]).unwrap();
    assert!(!ok, "a node the volume was never published to logged in: {out}");
    let (ok, out) = qemu_io(&url, &["read -P 0x5a 0 1M"]).unwrap();
    assert!(!ok, "qemu's own initiator name logged in: {out}");

    // A snapshot, idempotent by name, listed by id, by source and page by page.
    let snap_req = pb::CreateSnapshotRequest {
        source_volume_id: name.into(),
        name: "snapshot-1".into(),
        ..Default::default()
    };
    let snap = csi
        .create_snapshot(snap_req.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.snapshot_id, format!("{name}/snapshot-1"));
    assert!(snap.ready_to_use && snap.size_bytes == 64 * MIB && snap.creation_time.is_some());
    let snap_again = csi
        .create_snapshot(snap_req)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap_again.snapshot_id, snap.snapshot_id);
    csi.create_snapshot(pb::CreateSnapshotRequest {
        source_volume_id: name.into(),
        name: "snapshot-2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let by_id = csi
        .list_snapshots(pb::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let first_page = csi
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: name.into(),
            max_entries: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first_page.entries.len(), 1);
    assert!(!first_page.next_token.is_empty());
    let second_page = csi
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: name.into(),
            max_entries: 1,
            starting_token: first_page.next_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second_page.entries.len(), 1);
    assert_ne!(
        second_page.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        first_page.entries[0].snapshot.as_ref().unwrap().snapshot_id
    );
    assert!(second_page.next_token.is_empty());

    // Writes after the snapshot do not reach a clone of it.
    let (ok, out) = qemu_io_as(&url, &me, &["write -P 0x77 0 1M"]).unwrap();
    assert!(ok, "{out}");
    let clone_name = "pvc-clone-of-snapshot-1";
    let mut clone_req = create_request(clone_name, 64 * MIB);
    clone_req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let clone = csi
        .create_volume(clone_req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(matches!(
        clone.content_source.and_then(|s| s.r#type),
        Some(volume_content_source::Type::Snapshot(s)) if s.snapshot_id == snap.snapshot_id
    ));
    let clone_url = agent.wait_ready(clone_name);
    let (ok, out) = qemu_io_as(&clone_url, &me, &["read -P 0x5a 0 1M"]).unwrap();
    assert!(!ok, "the clone is published nowhere yet: {out}");
    csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: clone_name.into(),
        ..publish(&agent.node)
    })
    .await
    .unwrap();
    let (ok, out) = qemu_io_as(&clone_url, &me, &["read -P 0x5a 0 1M"]).unwrap();
    assert!(ok, "the clone holds the snapshot's data: {out}");
    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: clone_name.into(),
        node_id: agent.node.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // The source keeps its snapshots: it may not be deleted under them.
    let with_snapshots = csi
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        with_snapshots.code(),
        Code::FailedPrecondition,
        "{with_snapshots:?}"
    );
    assert!(
        with_snapshots.message().contains("snapshot"),
        "{with_snapshots:?}"
    );

    // Online expansion: answered once the controller serves the new size.
    let expanded = csi
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 96 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 96 * MIB);
    assert!(expanded.node_expansion_required);
    let (ok, out) = qemu_io_as(
        &url,
        &me,
        &["read -P 0x77 0 1M", "write -P 0x11 90M 1M", "read -P 0x11 90M 1M"],
    )
    .unwrap();
    assert!(ok, "{out}");

    // Unpublished: the node that was let in is shut out again.
    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: name.into(),
        node_id: agent.node.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (ok, out) = qemu_io_as(&url, &me, &["read -P 0x11 90M 1M"]).unwrap();
    assert!(!ok, "an unpublished node logged in: {out}");
    let got = csi
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 96 * MIB);
    assert!(got.status.unwrap().published_node_ids.is_empty());

    // Capacity in our zone, none in a zone without nodes.
    let cap_a = csi
        .get_capacity(pb::GetCapacityRequest {
            accessible_topology: Some(zone("a")),
            parameters: params(&[("replicas", "3")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        cap_a.available_capacity > 0 && cap_a.maximum_volume_size.unwrap() > 0,
        "{cap_a:?}"
    );
    let cap_z = csi
        .get_capacity(pb::GetCapacityRequest {
            accessible_topology: Some(zone("z")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap_z.available_capacity, 0);
    assert_eq!(cap_z.maximum_volume_size, Some(0));

    // Tear down: the clone, the snapshots (once the clone no longer holds one), the source. Twice each.
    for _ in 0..2 {
        csi.delete_volume(pb::DeleteVolumeRequest {
            volume_id: clone_name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for id in [format!("{name}/snapshot-1"), format!("{name}/snapshot-2")] {
        delete_snapshot_once_released(&csi, &id).await;
    }
    for _ in 0..2 {
        csi.delete_volume(pb::DeleteVolumeRequest {
            volume_id: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let listed = csi
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    wait_for("the volumes to be gone", READY_TIMEOUT, || {
        agent.inspect(name).is_none() && agent.inspect(clone_name).is_none()
    })
    .unwrap();
}

/// One row of the error table: the RPC, the case the spec names, the code it requires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_the_specs_error_codes() {
    let agent = CsiAgent::start(&[Socket::Controller]);
    let mut csi = ControllerClient::new(agent.channel(Socket::Controller).await);
    let volume = "pvc-errors";
    csi.create_volume(pb::CreateVolumeRequest {
        name: volume.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 16 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_cap()],
        parameters: params(&[("replicas", "1")]),
        ..Default::default()
    })
    .await
    .unwrap();
    agent.wait_ready(volume);
    let multi_writer = pb::VolumeCapability {
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
        ..mount_cap()
    };
    let no_access_type = pb::VolumeCapability {
        access_type: None,
        ..mount_cap()
    };
    let ok_create = || pb::CreateVolumeRequest {
        name: "pvc-new".into(),
        volume_capabilities: vec![mount_cap()],
        parameters: params(&[("replicas", "1")]),
        ..Default::default()
    };
    let cases = vec![
        case(
            "CreateVolume",
            "name missing",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                name: String::new(),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "name with a banned character",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                name: "a\u{1}b".into(),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "volume_capabilities missing",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                volume_capabilities: vec![],
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "capability without access type",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                volume_capabilities: vec![no_access_type.clone()],
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "unsupported access mode",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                volume_capabilities: vec![multi_writer.clone()],
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "unknown parameter",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                parameters: params(&[("replica", "3")]),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "topology key not ours",
            Code::InvalidArgument,
            csi.create_volume(pb::CreateVolumeRequest {
                accessibility_requirements: Some(pb::TopologyRequirement {
                    requisite: vec![pb::Topology {
                        segments: [("kubernetes.io/hostname".to_string(), "x".to_string())].into(),
                    }],
                    preferred: vec![],
                }),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "source snapshot does not exist",
            Code::NotFound,
            csi.create_volume(pb::CreateVolumeRequest {
                volume_content_source: Some(pb::VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Snapshot(
                        volume_content_source::SnapshotSource {
                            snapshot_id: format!("{volume}/no-such-snapshot"),
                        },
                    )),
                }),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "source volume does not exist",
            Code::NotFound,
            csi.create_volume(pb::CreateVolumeRequest {
                volume_content_source: Some(pb::VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Volume(
                        volume_content_source::VolumeSource {
                            volume_id: "pvc-no-such-volume".into(),
                        },
                    )),
                }),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "capacity range the plugin cannot meet",
            Code::OutOfRange,
            csi.create_volume(pb::CreateVolumeRequest {
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 5000,
                    limit_bytes: 6000,
                }),
                ..ok_create()
            })
            .await,
        ),
        case(
            "CreateVolume",
            "name exists with another size",
            Code::AlreadyExists,
            csi.create_volume(pb::CreateVolumeRequest {
                name: volume.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block_cap()],
                parameters: params(&[("replicas", "1")]),
                ..Default::default()
            })
            .await,
        ),
        case(
            "DeleteVolume",
            "volume_id missing",
            Code::InvalidArgument,
            csi.delete_volume(pb::DeleteVolumeRequest::default()).await,
        ),
        case(
            "DeleteVolume",
            "volume does not exist",
            Code::Ok,
            csi.delete_volume(pb::DeleteVolumeRequest {
                volume_id: "pvc-gone".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerPublishVolume",
            "volume_id missing",
            Code::InvalidArgument,
            csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                node_id: agent.node.clone(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerPublishVolume",
            "node_id missing",
            Code::InvalidArgument,
            csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerPublishVolume",
            "volume_capability missing",
            Code::InvalidArgument,
            csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: agent.node.clone(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerPublishVolume",
            "volume does not exist",
            Code::NotFound,
            csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: "pvc-gone".into(),
                node_id: agent.node.clone(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerPublishVolume",
            "node does not exist",
            Code::NotFound,
            csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: "nowhere".into(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerUnpublishVolume",
            "volume_id missing",
            Code::InvalidArgument,
            csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest::default())
                .await,
        ),
        case(
            "ControllerUnpublishVolume",
            "volume does not exist (unpublished from every node)",
            Code::Ok,
            csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "pvc-gone".into(),
                node_id: agent.node.clone(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerUnpublishVolume",
            "not published to that node",
            Code::Ok,
            csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: volume.into(),
                node_id: "elsewhere".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ValidateVolumeCapabilities",
            "volume_id missing",
            Code::InvalidArgument,
            csi.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_capabilities: vec![block_cap()],
                ..Default::default()
            })
            .await,
        ),
        case(
            "ValidateVolumeCapabilities",
            "volume_capabilities missing",
            Code::InvalidArgument,
            csi.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ValidateVolumeCapabilities",
            "volume does not exist",
            Code::NotFound,
            csi.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-gone".into(),
                volume_capabilities: vec![block_cap()],
                ..Default::default()
            })
            .await,
        ),
        case(
            "ListVolumes",
            "starting_token not ours",
            Code::Aborted,
            csi.list_volumes(pb::ListVolumesRequest {
                starting_token: "Not A Token!".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ListVolumes",
            "negative max_entries",
            Code::InvalidArgument,
            csi.list_volumes(pb::ListVolumesRequest {
                max_entries: -1,
                ..Default::default()
            })
            .await,
        ),
        case(
            "GetCapacity",
            "unknown parameter",
            Code::InvalidArgument,
            csi.get_capacity(pb::GetCapacityRequest {
                parameters: params(&[("colour", "red")]),
                ..Default::default()
            })
            .await,
        ),
        case(
            "CreateSnapshot",
            "source_volume_id missing",
            Code::InvalidArgument,
            csi.create_snapshot(pb::CreateSnapshotRequest {
                name: "s".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "CreateSnapshot",
            "name missing",
            Code::InvalidArgument,
            csi.create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: volume.into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "CreateSnapshot",
            "source volume does not exist",
            Code::NotFound,
            csi.create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: "pvc-gone".into(),
                name: "s-gone".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "DeleteSnapshot",
            "snapshot_id missing",
            Code::InvalidArgument,
            csi.delete_snapshot(pb::DeleteSnapshotRequest::default()).await,
        ),
        case(
            "DeleteSnapshot",
            "snapshot does not exist",
            Code::Ok,
            csi.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: format!("{volume}/never"),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ListSnapshots",
            "starting_token not ours",
            Code::Aborted,
            csi.list_snapshots(pb::ListSnapshotsRequest {
                starting_token: "nonsense".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ListSnapshots",
            "unknown snapshot id: an empty list",
            Code::Ok,
            csi.list_snapshots(pb::ListSnapshotsRequest {
                snapshot_id: "pvc-gone/s".into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerExpandVolume",
            "volume_id missing",
            Code::InvalidArgument,
            csi.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerExpandVolume",
            "capacity_range missing",
            Code::InvalidArgument,
            csi.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerExpandVolume",
            "volume does not exist",
            Code::NotFound,
            csi.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "pvc-gone".into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerExpandVolume",
            "unsupported capacity",
            Code::OutOfRange,
            csi.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: volume.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 20 * MIB + 1,
                    limit_bytes: 20 * MIB + 2,
                }),
                ..Default::default()
            })
            .await,
        ),
        case(
            "ControllerGetVolume",
            "volume_id missing",
            Code::InvalidArgument,
            csi.controller_get_volume(pb::ControllerGetVolumeRequest::default())
                .await,
        ),
        case(
            "ControllerGetVolume",
            "volume does not exist",
            Code::NotFound,
            csi.controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "pvc-gone".into(),
            })
            .await,
        ),
        case(
            "ControllerModifyVolume",
            "not offered (no MODIFY_VOLUME capability)",
            Code::Unimplemented,
            csi.controller_modify_volume(pb::ControllerModifyVolumeRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await,
        ),
    ];
    assert_codes(&cases);

    // An unsupported capability is not confirmed (not an error).
    let v = csi
        .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            volume_id: volume.into(),
            volume_capabilities: vec![multi_writer],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        v.confirmed.is_none() && v.message.contains("not supported"),
        "{v:?}"
    );
    let v = csi
        .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            volume_id: volume.into(),
            volume_capabilities: vec![block_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.confirmed.is_some(), "{v:?}");

    // A snapshot name is the CO's, across volumes: the same name on another source is ALREADY_EXISTS.
    csi.create_snapshot(pb::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: "shared-name".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    csi.create_volume(pb::CreateVolumeRequest {
        name: "pvc-errors-2".into(),
        volume_capabilities: vec![block_cap()],
        parameters: params(&[("replicas", "1")]),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 16 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let taken = csi
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: "pvc-errors-2".into(),
            name: "shared-name".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");

    // The log names every call with its duration, and never a secret.
    let secret = "s3cr3t-value-never-logged";
    let _ = csi
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: "pvc-gone".into(),
            secrets: [("password".to_string(), secret.to_string())].into(),
        })
        .await;
    let log = agent.log();
    assert!(
        log.contains("DeleteVolume") && log.contains("elapsed_ms"),
        "the calls are logged"
    );
    assert!(!log.contains(secret), "a secret reached the log");
}
