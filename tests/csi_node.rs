//! The CSI Node service under a real `basalt agent`, driven over its unix sockets by a tonic client as
//! kubelet would: a volume created and published by the Controller service, then staged on this host
//! (attached through qemu-storage-daemon's FUSE export under a loop device: this machine has no kernel
//! iSCSI; a filesystem made, mounted at the staging path), published (bind mounts, read-only honoured,
//! or the block device itself), measured, snapshotted and cloned (the clone staged beside its source),
//! grown online, unpublished and unstaged; the agent SIGKILLed
//! between stage and unstage and restarted, then undoing exactly what it did; controller and node on
//! one socket and on two; and every error case the spec names for the node RPCs.
//!
//! Whatever a test's outcome, [`CsiAgent`]'s drop unmounts and detaches what the node left and stops
//! every process the agent started.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use basalt_agent::csi::pb::controller_client::ControllerClient;
use basalt_agent::csi::pb::identity_client::IdentityClient;
use basalt_agent::csi::pb::node_client::NodeClient;
use basalt_agent::csi::pb::{self, volume_usage};
use basalt_agent::host::mount::is_mounted;
use basalt_agent::host::AttachRecord;
use basalt_tests::csi::{
    assert_codes, block_cap, case, delete_snapshot_once_released, mount_cap, publish_request, stage_request,
    unpublish_and_delete, unpublish_request, unstage_request, CsiAgent, Socket,
};
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// A volume name unique to this run (tests run side by side, on one host).
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

fn create_request(name: &str, size: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: [("replicas".to_string(), "1".to_string())].into(),
        ..Default::default()
    }
}

/// A volume created and published to the agent's node, serving.
async fn published_volume(
    agent: &CsiAgent,
    controller: &mut ControllerClient<Channel>,
    prefix: &str,
    size: i64,
    cap: pb::VolumeCapability,
) -> String {
    let name = unique(prefix);
    let mut req = create_request(&name, size);
    req.volume_capabilities = vec![cap.clone()];
    controller.create_volume(req).await.unwrap();
    agent.wait_ready(&name);
    controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: name.clone(),
            node_id: agent.node.clone(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .unwrap();
    name
}

fn stats_request(volume: &str, path: &Path) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: volume.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

/// The volume's attachment on the host (its daemon and loop device), which must exist.
fn attachment(agent: &CsiAgent, volume: &str) -> AttachRecord {
    let all = agent.attachments();
    all.into_iter()
        .find(|r| r.volume.as_str() == volume)
        .unwrap_or_else(|| panic!("volume {volume} is not attached on the host"))
}

/// Checks nothing of `record`'s attachment is left (see [`assert_nothing_left_of`]), and no record of
/// the node service's at all.
fn assert_nothing_left(agent: &CsiAgent, record: &AttachRecord, paths: &[&Path]) {
    assert_nothing_left_of(agent, record, paths);
    let node_state = agent.data_dir().join("csi/node");
    let left: Vec<PathBuf> = std::fs::read_dir(&node_state)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the node's records are left: {left:?}");
}

/// Checks nothing of `record`'s attachment is left: its record, the loop device over its export file,
/// the qemu-storage-daemon, and no mount at `paths` or at the export file.
fn assert_nothing_left_of(agent: &CsiAgent, record: &AttachRecord, paths: &[&Path]) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for p in paths {
        assert!(!is_mounted(p), "{} is still mounted:\n{mounts}", p.display());
    }
    assert!(
        agent.attachments().iter().all(|r| r.volume != record.volume),
        "the host still records an attachment of {}",
        record.volume
    );
    let us = record
        .user_space
        .as_ref()
        .expect("attached on the user-space path");
    assert!(!is_mounted(&us.fuse_file), "the FUSE export is still mounted");
    let losetup = Command::new("losetup")
        .arg("-j")
        .arg(&us.fuse_file)
        .output()
        .unwrap();
    let loops = String::from_utf8_lossy(&losetup.stdout);
    assert!(
        loops.trim().is_empty(),
        "loop devices are left over the export: {loops}"
    );
    assert!(
        !us.daemon.alive(),
        "qemu-storage-daemon (pid {}) still runs",
        us.daemon.pid
    );
}

/// `sync -f PATH`: the filesystem holding `path` written out (syncfs), as a snapshot of a volume in
/// use wants first.
fn sync_filesystem(path: &Path) {
    let status = Command::new("sync").arg("-f").arg(path).status().unwrap();
    assert!(status.success(), "sync -f {} failed", path.display());
}

/// `df -B1 --output=size PATH`: the filesystem's size as df shows it.
fn df_size(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

fn bytes_usage(stats: &pb::NodeGetVolumeStatsResponse) -> &pb::VolumeUsage {
    stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .expect("a usage in bytes")
}

/// The life cycle's volume, and its size once grown. XFS, because this machine's root lacks
/// CAP_SYS_RESOURCE, which ext4's online resize requires (xfs_growfs needs CAP_SYS_ADMIN); mkfs.xfs
/// makes nothing under 300 MB.
const SIZE: i64 = 320 * MIB;
const GROWN: i64 = 448 * MIB;

/// Single-node writer, mounted as xfs.
fn xfs_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume {
                fs_type: "xfs".into(),
                ..Default::default()
            },
        )),
        ..mount_cap()
    }
}

/// Writes `len` bytes to a new file at `path` in 4 MiB pieces, synced; answers its length.
fn write_file(path: &Path, len: i64) -> u64 {
    let file = std::fs::File::create(path).unwrap();
    let piece = vec![0x5au8; 4 * MIB as usize];
    let mut at = 0u64;
    while at < len as u64 {
        file.write_all_at(&piece, at).unwrap();
        at += piece.len() as u64;
    }
    file.sync_all().unwrap();
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_staged_published_snapshotted_cloned_grown_and_released_on_one_socket() {
    let agent = CsiAgent::start(&[Socket::All]);
    let channel = agent.channel(Socket::All).await;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);

    // Who and what the node is: its topology is its labels, as the controller's placement reads them.
    let info = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, agent.node);
    assert!(info.max_volumes_per_node > 0);
    assert_eq!(
        info.accessible_topology.unwrap().segments,
        [("topology.basalt.csi.io/zone".to_string(), "a".to_string())].into()
    );
    let caps = node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 4, "{caps:?}");

    let name = published_volume(&agent, &mut controller, "pvc-life", SIZE, xfs_cap()).await;
    let staging = agent.scratch("globalmount");
    let target = agent.scratch("pods/a/volume");

    // Stage: attached, a filesystem made, mounted; a second identical stage is OK, an incompatible one
    // at the same path ALREADY_EXISTS.
    node.node_stage_volume(stage_request(&name, &staging, xfs_cap()))
        .await
        .unwrap();
    assert!(is_mounted(&staging), "the staging path is not mounted");
    node.node_stage_volume(stage_request(&name, &staging, xfs_cap()))
        .await
        .unwrap();
    let incompatible = node
        .node_stage_volume(stage_request(&name, &staging, block_cap()))
        .await
        .unwrap_err();
    assert_eq!(incompatible.code(), Code::AlreadyExists, "{incompatible:?}");
    let record = attachment(&agent, &name);
    assert_eq!(record.holder, "csi");

    // Publish: a bind mount of the staging mount; the same again is OK, read-only at the same target
    // ALREADY_EXISTS.
    node.node_publish_volume(publish_request(&name, &staging, &target, xfs_cap(), false))
        .await
        .unwrap();
    node.node_publish_volume(publish_request(&name, &staging, &target, xfs_cap(), false))
        .await
        .unwrap();
    let ro_there = node
        .node_publish_volume(publish_request(&name, &staging, &target, xfs_cap(), true))
        .await
        .unwrap_err();
    assert_eq!(ro_there.code(), Code::AlreadyExists, "{ro_there:?}");
    std::fs::write(target.join("hello.txt"), b"written through the publication").unwrap();
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"written through the publication"
    );

    // Stats: bytes and inodes of the volume's filesystem, its condition normal; a path that is not
    // the volume's is NOT_FOUND.
    let stats = node
        .node_get_volume_stats(stats_request(&name, &target))
        .await
        .unwrap()
        .into_inner();
    let bytes = bytes_usage(&stats);
    assert!(
        bytes.total > SIZE / 2 && bytes.total <= SIZE && bytes.used > 0,
        "{stats:?}"
    );
    assert!(stats
        .usage
        .iter()
        .any(|u| u.unit == volume_usage::Unit::Inodes as i32 && u.total > 0));
    assert!(!stats.volume_condition.unwrap().abnormal);
    let elsewhere = node
        .node_get_volume_stats(stats_request(&name, &agent.scratch("not-the-volume")))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound, "{elsewhere:?}");

    // A snapshot of the staged volume, cloned into a new volume that this node stages and publishes
    // beside its source (XFS: the clone has its source's filesystem UUID): the clone holds what was
    // synced before the snapshot, and nothing written after it.
    sync_filesystem(&target);
    let snapshot = controller
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: name.clone(),
            name: format!("{name}-snap"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.ready_to_use, "{snapshot:?}");
    std::fs::write(target.join("after.txt"), b"written after the snapshot").unwrap();
    sync_filesystem(&target);
    let clone = unique("pvc-life-clone");
    let mut clone_req = create_request(&clone, SIZE);
    clone_req.volume_capabilities = vec![xfs_cap()];
    clone_req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            },
        )),
    });
    controller.create_volume(clone_req).await.unwrap();
    agent.wait_ready(&clone);
    controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: clone.clone(),
            node_id: agent.node.clone(),
            volume_capability: Some(xfs_cap()),
            ..Default::default()
        })
        .await
        .unwrap();
    let clone_staging = agent.scratch("clone-globalmount");
    let clone_target = agent.scratch("pods/c/volume");
    node.node_stage_volume(stage_request(&clone, &clone_staging, xfs_cap()))
        .await
        .unwrap();
    node.node_publish_volume(publish_request(
        &clone,
        &clone_staging,
        &clone_target,
        xfs_cap(),
        false,
    ))
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(clone_target.join("hello.txt")).unwrap(),
        b"written through the publication",
        "the clone lacks what was synced before the snapshot"
    );
    assert!(
        !clone_target.join("after.txt").exists(),
        "the clone holds a file written after the snapshot"
    );
    // The clone is a volume of its own: what is written there stays there.
    std::fs::write(clone_target.join("clone-only.txt"), b"the clone's").unwrap();
    assert!(!target.join("clone-only.txt").exists());
    let clone_record = attachment(&agent, &clone);
    node.node_unpublish_volume(unpublish_request(&clone, &clone_target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_request(&clone, &clone_staging))
        .await
        .unwrap();
    assert_nothing_left_of(&agent, &clone_record, &[&clone_staging, &clone_target]);
    unpublish_and_delete(&mut controller, &agent.node, &clone).await;
    // The snapshot goes once the clone no longer holds it (the clone's deletion finishes in the
    // background).
    delete_snapshot_once_released(&controller, &snapshot.snapshot_id).await;

    // A read-only publication refuses writes (and still reads).
    let readonly = agent.scratch("pods/b/volume");
    node.node_publish_volume(publish_request(&name, &staging, &readonly, xfs_cap(), true))
        .await
        .unwrap();
    let refused = std::fs::write(readonly.join("nope.txt"), b"x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    assert!(std::fs::read(readonly.join("hello.txt")).is_ok());
    node.node_unpublish_volume(unpublish_request(&name, &readonly))
        .await
        .unwrap();
    assert!(!readonly.exists(), "the read-only target was not removed");

    // Online expansion: the controller grows the volume, the node its device and filesystem; a file
    // larger than the old size then fits.
    let old_df = df_size(&target);
    let grown = controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: name.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: GROWN,
                limit_bytes: 0,
            }),
            volume_capability: Some(xfs_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grown.node_expansion_required);
    let expanded = node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: name.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: GROWN,
                limit_bytes: 0,
            }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(xfs_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, GROWN);
    let new_df = df_size(&target);
    assert!(
        new_df > old_df && new_df > SIZE as u64,
        "df shows {new_df} bytes after the expansion (before: {old_df})"
    );
    let big = write_file(&target.join("big.bin"), SIZE + 16 * MIB);
    assert_eq!(std::fs::metadata(staging.join("big.bin")).unwrap().len(), big);

    // Release: unpublish and unstage, each twice (idempotent), then nothing is left on the host.
    node.node_unpublish_volume(unpublish_request(&name, &target))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_request(&name, &target))
        .await
        .unwrap();
    assert!(!target.exists(), "the target was not removed");
    node.node_unstage_volume(unstage_request(&name, &staging))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_request(&name, &staging))
        .await
        .unwrap();
    assert_nothing_left(&agent, &record, &[&staging, &target]);
    unpublish_and_delete(&mut controller, &agent.node, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_is_published_as_its_device_with_controller_and_node_on_two_sockets() {
    let agent = CsiAgent::start(&[Socket::Controller, Socket::Node]);
    let controller_channel = agent.channel(Socket::Controller).await;
    let node_channel = agent.channel(Socket::Node).await;
    let mut controller = ControllerClient::new(controller_channel.clone());
    let mut node = NodeClient::new(node_channel.clone());

    // Each socket serves its own services (and Identity), not the other's.
    for channel in [controller_channel.clone(), node_channel.clone()] {
        let info = IdentityClient::new(channel)
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "basalt.csi.io");
    }
    let no_node = NodeClient::new(controller_channel)
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(no_node.code(), Code::Unimplemented, "{no_node:?}");
    let no_controller = ControllerClient::new(node_channel)
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(no_controller.code(), Code::Unimplemented, "{no_controller:?}");

    let name = published_volume(&agent, &mut controller, "pvc-block", 64 * MIB, block_cap()).await;
    let staging = agent.scratch("block/staging");
    let target = agent.scratch("pods/c/device");
    node.node_stage_volume(stage_request(&name, &staging, block_cap()))
        .await
        .unwrap();
    assert!(!is_mounted(&staging), "block staging mounted a filesystem");
    let record = attachment(&agent, &name);
    node.node_publish_volume(publish_request(&name, &staging, &target, block_cap(), false))
        .await
        .unwrap();
    assert!(is_mounted(&target), "the device is not bound at the target");

    // The target is the volume's device: written and read back, at the volume's size.
    let pattern = vec![0xc3u8; MIB as usize];
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    device.write_all_at(&pattern, 8 * MIB as u64).unwrap();
    device.sync_all().unwrap();
    drop(device);
    let stats = node
        .node_get_volume_stats(stats_request(&name, &target))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bytes_usage(&stats).total, 64 * MIB, "{stats:?}");

    // Published again elsewhere, read-only: the data is there, and writes are refused.
    node.node_unpublish_volume(unpublish_request(&name, &target))
        .await
        .unwrap();
    assert!(!target.exists(), "the device file at the target was not removed");
    let readonly = agent.scratch("pods/d/device");
    node.node_publish_volume(publish_request(&name, &staging, &readonly, block_cap(), true))
        .await
        .unwrap();
    let mut back = vec![0u8; MIB as usize];
    std::fs::File::open(&readonly)
        .unwrap()
        .read_exact_at(&mut back, 8 * MIB as u64)
        .unwrap();
    assert!(back == pattern, "the block publication lost the data written");
    // The kernel opens a read-only device for writing, and refuses the write itself (EPERM).
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(&readonly)
        .and_then(|f| f.write_all_at(&pattern, 0).and_then(|()| f.sync_all()));
    assert!(refused.is_err(), "the read-only block publication took a write");
    node.node_unpublish_volume(unpublish_request(&name, &readonly))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_request(&name, &staging))
        .await
        .unwrap();
    assert_nothing_left(&agent, &record, &[&target, &readonly]);
    unpublish_and_delete(&mut controller, &agent.node, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_plugin_killed_between_stage_and_unstage_undoes_exactly_what_it_did() {
    let mut agent = CsiAgent::start(&[Socket::All]);
    let mut controller = ControllerClient::new(agent.channel(Socket::All).await);
    let mut node = NodeClient::new(agent.channel(Socket::All).await);
    let name = published_volume(&agent, &mut controller, "pvc-restart", 64 * MIB, mount_cap()).await;
    let staging = agent.scratch("restart/staging");
    let target = agent.scratch("pods/e/volume");
    node.node_stage_volume(stage_request(&name, &staging, mount_cap()))
        .await
        .unwrap();
    node.node_publish_volume(publish_request(&name, &staging, &target, mount_cap(), false))
        .await
        .unwrap();
    std::fs::write(target.join("kept.txt"), b"across the restart").unwrap();
    let record = attachment(&agent, &name);

    // SIGKILL: nothing is undone, the pod's mount keeps working.
    agent.kill_agent();
    assert!(is_mounted(&target) && is_mounted(&staging));
    assert_eq!(
        std::fs::read(target.join("kept.txt")).unwrap(),
        b"across the restart"
    );
    agent.start_agent();
    let channel = agent.channel(Socket::All).await;
    let mut node = NodeClient::new(channel.clone());
    let mut controller = ControllerClient::new(channel);
    assert_eq!(
        attachment(&agent, &name).user_space,
        record.user_space,
        "the restarted agent replaced a working attachment"
    );
    let stats = node
        .node_get_volume_stats(stats_request(&name, &staging))
        .await
        .unwrap()
        .into_inner();
    assert!(bytes_usage(&stats).used > 0);

    // Through a symlink (kubelet's directory often is one): published, then unpublished, there.
    let real = agent.scratch("pods/f");
    std::fs::create_dir_all(&real).unwrap();
    let link = agent.scratch("pods/link-to-f");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let linked = link.join("volume");
    node.node_publish_volume(publish_request(&name, &staging, &linked, mount_cap(), false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(linked.join("kept.txt")).unwrap(),
        b"across the restart"
    );
    node.node_unpublish_volume(unpublish_request(&name, &linked))
        .await
        .unwrap();
    assert!(!is_mounted(&real.join("volume")) && !real.join("volume").exists());

    node.node_unpublish_volume(unpublish_request(&name, &target))
        .await
        .unwrap();
    // The staging mount gone (as when the agent's recovery undoes a broken attachment): a publication
    // is refused, never a bind of the empty staging directory, where a pod's writes would be lost.
    assert!(Command::new("umount").arg(&staging).status().unwrap().success());
    let other = agent.scratch("pods/g/volume");
    let refused = node
        .node_publish_volume(publish_request(&name, &staging, &other, mount_cap(), false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("staging path"), "{refused:?}");
    assert!(!is_mounted(&other));
    node.node_unstage_volume(unstage_request(&name, &staging))
        .await
        .unwrap();
    assert_nothing_left(&agent, &record, &[&staging, &target]);
    assert!(!target.exists());
    unpublish_and_delete(&mut controller, &agent.node, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_rpc_answers_the_specs_error_codes() {
    let agent = CsiAgent::start(&[Socket::All]);
    let channel = agent.channel(Socket::All).await;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    // A volume that exists but was never published to this node, nor staged.
    let name = unique("pvc-errors");
    controller
        .create_volume(create_request(&name, 64 * MIB))
        .await
        .unwrap();
    let gone = "pvc-no-such-volume";
    let staging = agent.scratch("errors/staging");
    let target = agent.scratch("errors/target");
    let stage = |volume: &str| stage_request(volume, &staging, mount_cap());
    let publish = |volume: &str| publish_request(volume, &staging, &target, mount_cap(), false);
    let expand = |volume: &str, path: &Path| pb::NodeExpandVolumeRequest {
        volume_id: volume.into(),
        volume_path: path.display().to_string(),
        ..Default::default()
    };
    use Code::{FailedPrecondition, InvalidArgument, NotFound};

    let cases = vec![
        // NodeStageVolume.
        case(
            "NodeStage",
            "no volume_id",
            InvalidArgument,
            node.node_stage_volume(stage("")).await,
        ),
        case(
            "NodeStage",
            "no staging_target_path",
            InvalidArgument,
            node.node_stage_volume(pb::NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..stage(&name)
            })
            .await,
        ),
        case(
            "NodeStage",
            "a relative staging_target_path",
            InvalidArgument,
            node.node_stage_volume(pb::NodeStageVolumeRequest {
                staging_target_path: "relative/path".into(),
                ..stage(&name)
            })
            .await,
        ),
        case(
            "NodeStage",
            "no volume_capability",
            InvalidArgument,
            node.node_stage_volume(pb::NodeStageVolumeRequest {
                volume_capability: None,
                ..stage(&name)
            })
            .await,
        ),
        case(
            "NodeStage",
            "an unsupported filesystem",
            InvalidArgument,
            node.node_stage_volume(pb::NodeStageVolumeRequest {
                volume_capability: Some(pb::VolumeCapability {
                    access_type: Some(pb::volume_capability::AccessType::Mount(
                        pb::volume_capability::MountVolume {
                            fs_type: "btrfs".into(),
                            ..Default::default()
                        },
                    )),
                    ..mount_cap()
                }),
                ..stage(&name)
            })
            .await,
        ),
        case(
            "NodeStage",
            "an unknown volume",
            NotFound,
            node.node_stage_volume(stage(gone)).await,
        ),
        case(
            "NodeStage",
            "a volume not published to this node",
            FailedPrecondition,
            node.node_stage_volume(stage(&name)).await,
        ),
        // NodeUnstageVolume.
        case(
            "NodeUnstage",
            "no volume_id",
            InvalidArgument,
            node.node_unstage_volume(unstage_request("", &staging)).await,
        ),
        case(
            "NodeUnstage",
            "no staging_target_path",
            InvalidArgument,
            node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: name.clone(),
                staging_target_path: String::new(),
            })
            .await,
        ),
        case(
            "NodeUnstage",
            "an unknown volume",
            NotFound,
            node.node_unstage_volume(unstage_request(gone, &staging)).await,
        ),
        case(
            "NodeUnstage",
            "a volume not staged (idempotent)",
            Code::Ok,
            node.node_unstage_volume(unstage_request(&name, &staging)).await,
        ),
        // NodePublishVolume.
        case(
            "NodePublish",
            "no volume_id",
            InvalidArgument,
            node.node_publish_volume(publish("")).await,
        ),
        case(
            "NodePublish",
            "no target_path",
            InvalidArgument,
            node.node_publish_volume(pb::NodePublishVolumeRequest {
                target_path: String::new(),
                ..publish(&name)
            })
            .await,
        ),
        case(
            "NodePublish",
            "no volume_capability",
            InvalidArgument,
            node.node_publish_volume(pb::NodePublishVolumeRequest {
                volume_capability: None,
                ..publish(&name)
            })
            .await,
        ),
        case(
            "NodePublish",
            "no staging_target_path",
            FailedPrecondition,
            node.node_publish_volume(pb::NodePublishVolumeRequest {
                staging_target_path: String::new(),
                ..publish(&name)
            })
            .await,
        ),
        case(
            "NodePublish",
            "an unknown volume",
            NotFound,
            node.node_publish_volume(publish(gone)).await,
        ),
        case(
            "NodePublish",
            "a volume not staged",
            FailedPrecondition,
            node.node_publish_volume(publish(&name)).await,
        ),
        // NodeUnpublishVolume.
        case(
            "NodeUnpublish",
            "no volume_id",
            InvalidArgument,
            node.node_unpublish_volume(unpublish_request("", &target)).await,
        ),
        case(
            "NodeUnpublish",
            "no target_path",
            InvalidArgument,
            node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: name.clone(),
                target_path: String::new(),
            })
            .await,
        ),
        case(
            "NodeUnpublish",
            "an unknown volume",
            NotFound,
            node.node_unpublish_volume(unpublish_request(gone, &target)).await,
        ),
        case(
            "NodeUnpublish",
            "a volume not published (idempotent)",
            Code::Ok,
            node.node_unpublish_volume(unpublish_request(&name, &target))
                .await,
        ),
        // NodeGetVolumeStats.
        case(
            "NodeGetVolumeStats",
            "no volume_id",
            InvalidArgument,
            node.node_get_volume_stats(stats_request("", &target)).await,
        ),
        case(
            "NodeGetVolumeStats",
            "no volume_path",
            InvalidArgument,
            node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: name.clone(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "NodeGetVolumeStats",
            "an unknown volume",
            NotFound,
            node.node_get_volume_stats(stats_request(gone, &target)).await,
        ),
        case(
            "NodeGetVolumeStats",
            "a volume not at that path",
            NotFound,
            node.node_get_volume_stats(stats_request(&name, &target)).await,
        ),
        // NodeExpandVolume.
        case(
            "NodeExpand",
            "no volume_id",
            InvalidArgument,
            node.node_expand_volume(expand("", &target)).await,
        ),
        case(
            "NodeExpand",
            "no volume_path",
            InvalidArgument,
            node.node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: name.clone(),
                ..Default::default()
            })
            .await,
        ),
        case(
            "NodeExpand",
            "an unknown volume",
            NotFound,
            node.node_expand_volume(expand(gone, &target)).await,
        ),
        case(
            "NodeExpand",
            "a volume not staged here",
            NotFound,
            node.node_expand_volume(expand(&name, &staging)).await,
        ),
    ];
    assert_codes(&cases);
    assert!(
        !staging.exists() && !target.exists(),
        "a refused call left a path behind"
    );
    controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: name,
            ..Default::default()
        })
        .await
        .unwrap();
}
