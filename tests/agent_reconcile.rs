//! The node agent's reconciler, in-process, over the real embedded store and running real `basalt replica`
//! and `basalt controller` processes (the `process` runtime). The volume record is written to the store by
//! the test, placed by hand as the API would place it: this test is about what the agent does with a record
//! (the API and placement have their own tests), and it runs without them.
//!
//! One life cycle: a 3-replica record in three pools becomes a serving volume (phase Ready); qemu-io writes
//! and reads it at its iSCSI URL; a replica killed is restarted; the reconciler is stopped and a new one
//! started on the same data directory (an agent restart) adopts the running services without restarting
//! them; a larger size is applied online; QoS limits are applied; phase Deleting stops everything and
//! removes the data, the statuses, the secrets and finally the record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_agent::metrics::AgentMetrics;
use basalt_agent::model::{
    keys, ControllerSlot, NodeName, NodeRecord, Placement, PoolKind, PoolRecord, PortRange, QosSpec,
    ReplicaSlot, ServiceId, ServiceState, ServiceStatus, VolumePhase, VolumeRecord, VolumeSecrets,
    VolumeSpec,
};
use basalt_agent::reconcile::{connect_controller, read_desired, Local, NodeLease, Reconciler};
use basalt_agent::runtime::process::{process_start_time, ProcessRuntime, RunRecord};
use basalt_agent::store::embedded::EmbeddedStore;
use basalt_agent::store::{self, Expect, Store};
use basalt_engine::api_auth::ApiToken;
use basalt_engine::name::VolumeName;
use basalt_proto::pb::controller as pb;
use basalt_tests::volume::qemu_io;
use basalt_tests::{free_port, IscsiUrl};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
/// Starting three replicas and a controller on two shared cores, with builds running beside.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Kills every service process the test's data directory records, whatever happened to the test: the
/// services outlive their agent by design, so nothing else would.
struct KillServices(PathBuf);

impl Drop for KillServices {
    fn drop(&mut self) {
        for rec in run_records(&self.0) {
            if process_start_time(rec.pid) == Some(rec.start_time) {
                // SAFETY: plain syscall on a process this test started (its start time matched).
                unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

fn run_records(data_dir: &Path) -> Vec<RunRecord> {
    let mut out = Vec::new();
    let Ok(vols) = std::fs::read_dir(data_dir.join("run")) else {
        return out;
    };
    for v in vols.flatten() {
        let Ok(files) = std::fs::read_dir(v.path()) else {
            continue;
        };
        for f in files.flatten() {
            if let Some(rec) = std::fs::read(f.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<RunRecord>(&b).ok())
            {
                out.push(rec);
            }
        }
    }
    out
}

fn run_record(data_dir: &Path, volume: &str, service: &str) -> RunRecord {
    let path = data_dir.join("run").join(volume).join(format!("{service}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

struct Agent {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_reconciler(store: Arc<EmbeddedStore>, data_dir: &Path, me: &NodeName, lease: &NodeLease) -> Agent {
    let runtime =
        ProcessRuntime::new(basalt_tests::basalt_binary().unwrap(), data_dir.to_path_buf()).unwrap();
    let reconciler = Reconciler::new(
        store,
        Arc::new(runtime),
        Local {
            me: me.clone(),
            data_dir: data_dir.to_path_buf(),
        },
        Arc::new(AgentMetrics::new()),
        lease.clone(),
        Duration::from_secs(300),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(reconciler.run(cancel.clone()));
    Agent { cancel, task }
}

async fn record(store: &dyn Store, name: &VolumeName) -> Option<store::Versioned<VolumeRecord>> {
    store::get_json::<VolumeRecord>(store, &keys::volume(name))
        .await
        .unwrap()
}

/// Polls `check` every 100 ms until it gives a value, failing the test after `timeout`.
async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn update(store: &dyn Store, name: &VolumeName, change: impl Fn(&mut VolumeRecord)) {
    let rec = record(store, name).await.unwrap();
    let mut v = rec.value;
    change(&mut v);
    store::put_json(
        store,
        &keys::volume(name),
        &v,
        Expect::Revision(rec.revision),
        None,
    )
    .await
    .unwrap();
}

async fn volume_info(api: std::net::SocketAddr, token: &str) -> Option<pb::VolumeInfoReply> {
    let mut client = connect_controller(api, ApiToken::new(token).unwrap())
        .await
        .ok()?;
    client
        .volume_info(pb::VolumeInfoRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_record_is_served_survives_a_reconciler_restart_grows_and_is_deleted_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let _cleanup = KillServices(data_dir.clone());
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    let me = NodeName::new("node-a").unwrap();
    let name = VolumeName::new("agent-rec").unwrap();

    let pools: Vec<PoolRecord> = (0..3)
        .map(|i| {
            let path = dir.path().join(format!("pool{i}"));
            std::fs::create_dir_all(&path).unwrap();
            PoolRecord {
                name: format!("p{i}"),
                kind: PoolKind::Directory(path),
                capacity_bytes: 1 << 40,
                free_bytes: 1 << 40,
            }
        })
        .collect();
    let node = NodeRecord {
        name: me.clone(),
        address: "127.0.0.1".parse().unwrap(),
        api_url: String::new(),
        labels: BTreeMap::new(),
        pools: pools.clone(),
        ports: PortRange {
            first: 1024,
            last: 65535,
        },
        cordoned: false,
        draining: false,
        initiator: None,
    };
    store::put_json(store.as_ref(), &keys::node(&me), &node, Expect::Absent, None)
        .await
        .unwrap();
    // The node is up (its liveness key exists, on the lease its reconciler takes the volume's
    // controller lease with): failover leaves its volume alone.
    let lease = NodeLease::new(store.grant_lease(Duration::from_secs(3600)).await.unwrap());
    store::put_json(
        store.as_ref(),
        &keys::node_alive(&me),
        &basalt_agent::model::NodeAlive { since_unix: 0 },
        Expect::Any,
        Some(lease.get()),
    )
    .await
    .unwrap();
    let token = basalt_proto::auth::hex(&rand::random::<[u8; 32]>());
    let secrets = VolumeSecrets {
        peer_secret: basalt_proto::auth::hex(&rand::random::<[u8; 32]>()),
        api_token: token.clone(),
    };
    store::put_json(
        store.as_ref(),
        &keys::volume_secrets(&name),
        &secrets,
        Expect::Absent,
        None,
    )
    .await
    .unwrap();
    let (iscsi_port, api_port) = (free_port().unwrap(), free_port().unwrap());
    let uuid = uuid::Uuid::new_v4();
    let volume = VolumeRecord {
        spec: VolumeSpec {
            name: name.clone(),
            uuid,
            size_bytes: 64 * MIB,
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
            replicas: (0..3)
                .map(|i| ReplicaSlot {
                    id: i + 1,
                    node: me.clone(),
                    pool: format!("p{i}"),
                    port: free_port().unwrap(),
                })
                .collect(),
            controller: Some(ControllerSlot {
                node: me.clone(),
                iscsi_port,
                api_port,
                generation: 1,
            }),
        },
        phase: VolumePhase::Creating,
        attached_to: None,
    };
    store::put_json(
        store.as_ref(),
        &keys::volume(&name),
        &volume,
        Expect::Absent,
        None,
    )
    .await
    .unwrap();

    let agent = start_reconciler(store.clone(), &data_dir, &me, &lease);
    wait_until("the volume to be Ready", READY_TIMEOUT, || async {
        record(store.as_ref(), &name)
            .await
            .filter(|r| r.value.phase == VolumePhase::Ready)
    })
    .await;

    // Every service reports Running, and the secrets are private files.
    let statuses = wait_until("four Running statuses", READY_TIMEOUT, || async {
        let (list, _) = store::list_json::<ServiceStatus>(store.as_ref(), &keys::volume_status(&name))
            .await
            .unwrap();
        (list.len() == 4 && list.iter().all(|(_, s)| s.value.state == ServiceState::Running)).then_some(list)
    })
    .await;
    assert!(statuses.iter().all(|(_, s)| s.value.node == me));
    // The controller's view of each replica is recorded: every replica reads as RW, and the
    // controller runs under the volume's lease, held by this node.
    wait_until("every replica reported RW", READY_TIMEOUT, || async {
        let d = read_desired(store.as_ref()).await.unwrap();
        let modes: Vec<_> = (1..=3)
            .map(|id| {
                d.statuses
                    .get(&(name.clone(), ServiceId::Replica(id)))
                    .and_then(|s| s.mode)
            })
            .collect();
        modes
            .iter()
            .all(|m| *m == Some(basalt_agent::model::ReplicaMode::Rw))
            .then_some(())
    })
    .await;
    let held =
        store::get_json::<basalt_agent::model::VolumeLease>(store.as_ref(), &keys::volume_lease(&name))
            .await
            .unwrap()
            .expect("the volume's controller lease");
    assert_eq!(held.value.node, me);
    let secret_file = data_dir.join("secrets").join(name.as_str()).join("peer-secret");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    for (i, p) in pools.iter().enumerate() {
        let PoolKind::Directory(path) = &p.kind else {
            unreachable!()
        };
        assert!(path
            .join(uuid.to_string())
            .join(format!("replica-{}", i + 1))
            .is_dir());
    }

    let url = IscsiUrl {
        portal: format!("127.0.0.1:{iscsi_port}").parse().unwrap(),
        iqn: name.iqn(),
        lun: 0,
    };
    let (ok, out) = qemu_io(&url, &["write -P 0xa5 0 1M", "write -P 0x5a 60M 1M"]).unwrap();
    assert!(ok, "qemu-io write: {out}");

    // A replica killed is restarted by its supervisor, and the restart is counted in its status.
    let replica = run_record(&data_dir, name.as_str(), "replica-2");
    unsafe { libc::kill(replica.pid as libc::pid_t, libc::SIGKILL) };
    wait_until("replica-2 to be restarted", READY_TIMEOUT, || async {
        store::get_json::<ServiceStatus>(
            store.as_ref(),
            &keys::service_status(&name, &ServiceId::Replica(2)),
        )
        .await
        .unwrap()
        .filter(|s| s.value.restarts >= 1 && s.value.state == ServiceState::Running)
    })
    .await;

    // An agent restart: the new reconciler adopts the running controller (same process) and the
    // volume keeps its data.
    let controller = run_record(&data_dir, name.as_str(), "controller");
    agent.cancel.cancel();
    agent.task.await.unwrap();
    let agent = start_reconciler(store.clone(), &data_dir, &me, &lease);
    let (ok, out) = qemu_io(&url, &["read -P 0xa5 0 1M", "read -P 0x5a 60M 1M"]).unwrap();
    assert!(ok, "qemu-io read after the agent restart: {out}");
    let api = format!("127.0.0.1:{api_port}").parse().unwrap();
    // Let the new reconciler run a few passes, then check nothing was restarted.
    wait_until(
        "the new reconciler to see the volume Ready",
        READY_TIMEOUT,
        || async { volume_info(api, &token).await.filter(|i| i.state == "serving") },
    )
    .await;
    tokio::time::sleep(basalt_agent::reconcile::PASS_INTERVAL * 2).await;
    assert_eq!(
        run_record(&data_dir, name.as_str(), "controller"),
        controller,
        "the controller was adopted"
    );
    assert_eq!(process_start_time(controller.pid), Some(controller.start_time));

    // Expansion and QoS, applied online by the controller's node.
    update(store.as_ref(), &name, |v| {
        v.spec.size_bytes = 128 * MIB;
        v.spec.qos.write_iops = Some(5000);
    })
    .await;
    let info = wait_until("the volume to grow and take its limit", READY_TIMEOUT, || async {
        volume_info(api, &token).await.filter(|i| {
            i.size_bytes == 128 * MIB
                && i.qos.as_ref().and_then(|q| q.write_iops.as_ref()).map(|l| l.rate) == Some(5000)
        })
    })
    .await;
    assert_eq!(info.size_bytes, 128 * MIB);
    let (ok, out) = qemu_io(
        &url,
        &[
            "write -P 0x77 100M 1M",
            "read -P 0x77 100M 1M",
            "read -P 0xa5 0 1M",
        ],
    )
    .unwrap();
    assert!(ok, "qemu-io past the old end: {out}");
    assert_eq!(
        process_start_time(controller.pid),
        Some(controller.start_time),
        "grown online, no restart"
    );

    // Deletion: everything goes, the record last.
    update(store.as_ref(), &name, |v| v.phase = VolumePhase::Deleting).await;
    wait_until("the record to be deleted", READY_TIMEOUT, || async {
        record(store.as_ref(), &name).await.is_none().then_some(())
    })
    .await;
    assert!(store.get(&keys::volume_secrets(&name)).await.unwrap().is_none());
    let (left, _) = store.list(&keys::volume_status(&name)).await.unwrap();
    assert!(left.is_empty(), "statuses left: {left:?}");
    for p in &pools {
        let PoolKind::Directory(path) = &p.kind else {
            unreachable!()
        };
        assert!(
            !path.join(uuid.to_string()).exists(),
            "data left in {}",
            path.display()
        );
    }
    assert!(!data_dir.join("secrets").join(name.as_str()).exists());
    assert!(run_records(&data_dir).is_empty());
    assert_eq!(process_start_time(controller.pid), None);
    agent.cancel.cancel();
    agent.task.await.unwrap();
}
