//! Failover, replica replacement and drain, carried out by several agents' reconcilers.
//!
//! Why in one process: a second host is not available here, and what these tests prove is what
//! the agents do with each other through the store. So each "node" is what `basalt agent` runs
//! on a host (`daemon::start_node`: its registration, its lease kept alive, its reconciler), with
//! its own data directory, pool and process runtime, and all of them share one embedded store,
//! exactly as agents on several hosts share etcd. The services are real `basalt replica` and
//! `basalt controller` processes on 127.0.0.1, each node with its own port range, and the data is
//! written and read by qemu-io over iSCSI. A node failure is its agent stopping (its lease
//! revoked, so the others see it down at once) and its services SIGKILLed. The same functions
//! run across real hosts in network namespaces over etcd (issue 16's tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_agent::config::{Config, PoolConfig, PoolKindConfig};
use basalt_agent::daemon::{self, RunningNode};
use basalt_agent::metrics::AgentMetrics;
use basalt_agent::model::{
    keys, ControllerSlot, NodeName, NodeRecord, Placement, PortRange, QosSpec, ReplicaMode, ReplicaSlot,
    ServiceId, VolumePhase, VolumeRecord, VolumeSecrets, VolumeSpec,
};
use basalt_agent::reconcile::{connect_controller, read_desired};
use basalt_agent::runtime::process::{process_start_time, ProcessRuntime, RunRecord};
use basalt_agent::store::embedded::EmbeddedStore;
use basalt_agent::store::{self, Expect, Store};
use basalt_engine::api_auth::ApiToken;
use basalt_engine::name::VolumeName;
use basalt_proto::pb::controller as pb;
use basalt_tests::volume::qemu_io;
use basalt_tests::IscsiUrl;

const MIB: u64 = 1 << 20;
/// Starting services, a controller's survey of an unreachable replica, a rebuild: on two shared
/// cores with builds running beside.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Short, so that the test sees a replacement; long enough that the controller moves (at once)
/// well before the lost replica is given up.
const GRACE: Duration = Duration::from_secs(8);
/// Ports each node gives its services.
const PORTS_PER_NODE: u16 = 12;

/// Kills every service process a node's data directory records, whatever happened to the test:
/// the services outlive their agent by design, so nothing else would.
fn kill_services(data_dir: &Path) {
    let Ok(vols) = std::fs::read_dir(data_dir.join("run")) else {
        return;
    };
    for v in vols.flatten() {
        for f in std::fs::read_dir(v.path()).into_iter().flatten().flatten() {
            let rec = std::fs::read(f.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<RunRecord>(&b).ok());
            if let Some(rec) = rec {
                if process_start_time(rec.pid) == Some(rec.start_time) {
                    // SAFETY: plain syscall on a process this test started (its start time matched).
                    unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }
}

struct Node {
    config: Config,
    running: Option<RunningNode>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            kill_services(&n.config.data_dir);
        }
    }
}

/// `count` contiguous ports free on 127.0.0.1 now, none in `taken`.
fn free_range(count: u16, taken: &[PortRange]) -> PortRange {
    for _ in 0..200 {
        let first: u16 = 20_000 + rand::random::<u16>() % 40_000;
        let last = first + count - 1;
        let clash = taken.iter().any(|r| first <= r.last && r.first <= last);
        let all_free = (first..=last).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if !clash && all_free {
            return PortRange { first, last };
        }
    }
    panic!("no {count} contiguous free ports found");
}

impl Cluster {
    /// `count` nodes `n1`.. in zones `z1`.., each with one directory pool; none started.
    fn new(count: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
        let mut ranges = Vec::new();
        let mut nodes = Vec::new();
        for i in 1..=count {
            let root = dir.path().join(format!("n{i}"));
            let mut config = Config::defaults().unwrap();
            config.node.name = NodeName::new(&format!("n{i}")).unwrap();
            config.node.address = "127.0.0.1".parse().unwrap();
            config.node.labels = BTreeMap::from([("zone".to_string(), format!("z{i}"))]);
            let range = free_range(PORTS_PER_NODE, &ranges);
            ranges.push(range);
            config.node.ports = range;
            config.data_dir = root.join("data");
            config.pools = vec![PoolConfig {
                name: "p0".into(),
                kind: PoolKindConfig::Directory(root.join("pool")),
                capacity_bytes: Some(1 << 40),
            }];
            config.endpoints.api = None;
            config.failover.replica_grace = GRACE;
            std::fs::create_dir_all(&config.data_dir).unwrap();
            nodes.push(Node {
                config,
                running: None,
            });
        }
        Cluster {
            _dir: dir,
            store,
            nodes,
        }
    }

    fn name(&self, i: usize) -> NodeName {
        self.nodes[i - 1].config.node.name.clone()
    }

    fn pool(&self, i: usize) -> PathBuf {
        self.nodes[i - 1].config.data_dir.with_file_name("pool")
    }

    async fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i - 1];
        let runtime = ProcessRuntime::new(
            basalt_tests::basalt_binary().unwrap(),
            node.config.data_dir.clone(),
        )
        .unwrap();
        let running = daemon::start_node(
            self.store.clone(),
            &node.config,
            Arc::new(runtime),
            Arc::new(AgentMetrics::new()),
            None,
        )
        .await
        .unwrap();
        node.running = Some(running);
    }

    /// The node fails: its agent stops (its lease revoked: down at once) and its services die.
    async fn fail(&mut self, i: usize) {
        let node = &mut self.nodes[i - 1];
        if let Some(running) = node.running.take() {
            running.stop(self.store.as_ref()).await;
        }
        kill_services(&node.config.data_dir);
    }

    /// Writes a 3-replica volume record placed on nodes `replicas` with its controller on
    /// `controller`, and its secrets; returns the API token.
    async fn create_volume(&self, name: &VolumeName, replicas: [usize; 3], controller: usize) -> String {
        let token = basalt_proto::auth::hex(&rand::random::<[u8; 32]>());
        let secrets = VolumeSecrets {
            peer_secret: basalt_proto::auth::hex(&rand::random::<[u8; 32]>()),
            api_token: token.clone(),
        };
        store::put_json(
            self.store.as_ref(),
            &keys::volume_secrets(name),
            &secrets,
            Expect::Absent,
            None,
        )
        .await
        .unwrap();
        let ports = |i: usize| self.nodes[i - 1].config.node.ports;
        let record = VolumeRecord {
            spec: VolumeSpec {
                name: name.clone(),
                uuid: uuid::Uuid::new_v4(),
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
                replicas: replicas
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| ReplicaSlot {
                        id: k as u32 + 1,
                        node: self.name(i),
                        pool: "p0".into(),
                        port: ports(i).first,
                    })
                    .collect(),
                controller: Some(ControllerSlot {
                    node: self.name(controller),
                    iscsi_port: ports(controller).first + 1,
                    api_port: ports(controller).first + 2,
                    generation: 1,
                }),
                next_replica_id: 4,
                retired: Vec::new(),
            },
            phase: VolumePhase::Creating,
            attached_to: None,
        };
        store::put_json(
            self.store.as_ref(),
            &keys::volume(name),
            &record,
            Expect::Absent,
            None,
        )
        .await
        .unwrap();
        token
    }

    async fn record(&self, name: &VolumeName) -> VolumeRecord {
        store::get_json::<VolumeRecord>(self.store.as_ref(), &keys::volume(name))
            .await
            .unwrap()
            .expect("the volume record")
            .value
    }

    async fn set_node(&self, i: usize, change: impl Fn(&mut NodeRecord)) {
        let key = keys::node(&self.name(i));
        let rec = store::get_json::<NodeRecord>(self.store.as_ref(), &key)
            .await
            .unwrap()
            .unwrap();
        let mut next = rec.value;
        change(&mut next);
        store::put_json(
            self.store.as_ref(),
            &key,
            &next,
            Expect::Revision(rec.revision),
            None,
        )
        .await
        .unwrap();
    }
}

/// Polls `check` every 200 ms until it gives a value, failing the test after `timeout`.
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn api_of(record: &VolumeRecord) -> SocketAddr {
    let c = record.placement.controller.as_ref().unwrap();
    SocketAddr::from(([127, 0, 0, 1], c.api_port))
}

fn url_of(record: &VolumeRecord) -> IscsiUrl {
    let c = record.placement.controller.as_ref().unwrap();
    IscsiUrl {
        portal: SocketAddr::from(([127, 0, 0, 1], c.iscsi_port)),
        iqn: record.spec.name.iqn(),
        lun: 0,
    }
}

async fn volume_info(api: SocketAddr, token: &str) -> Option<pb::VolumeInfoReply> {
    let mut client = connect_controller(api, ApiToken::new(token).unwrap())
        .await
        .ok()?;
    tokio::time::timeout(
        Duration::from_secs(3),
        client.volume_info(pb::VolumeInfoRequest {}),
    )
    .await
    .ok()?
    .ok()
    .map(|r| r.into_inner())
}

/// The volume's record once its controller serves with every placed replica reported RW (as the
/// agents read the store: the controller's report laid over the replicas' statuses).
async fn whole(store: &dyn Store, name: &VolumeName) -> Option<VolumeRecord> {
    let d = read_desired(store).await.unwrap();
    let rec = d.volumes.get(name)?.value.clone();
    let all_rw = rec.placement.replicas.len() == usize::from(rec.spec.replicas)
        && rec.placement.replicas.iter().all(|slot| {
            d.statuses
                .get(&(name.clone(), ServiceId::Replica(slot.id)))
                .is_some_and(|s| s.node == slot.node && s.mode == Some(ReplicaMode::Rw))
        });
    (rec.phase == VolumePhase::Ready && all_rw).then_some(rec)
}

fn qemu(url: &IscsiUrl, commands: &[&str]) {
    let (ok, out) = qemu_io(url, commands).unwrap();
    assert!(ok, "qemu-io {commands:?} at {url:?}: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_controller_node_is_taken_over_and_its_replica_replaced_then_retired_on_return() {
    let mut cluster = Cluster::new(4);
    for i in 1..=4 {
        cluster.start(i).await;
    }
    let name = VolumeName::new("failover").unwrap();
    let token = cluster.create_volume(&name, [1, 2, 3], 1).await;
    let store = cluster.store.clone();
    let before = wait_until("the volume whole on n1, n2, n3", STEP_TIMEOUT, || {
        whole(store.as_ref(), &name)
    })
    .await;
    let old_epoch = volume_info(api_of(&before), &token).await.unwrap().epoch;
    // Acknowledged and flushed before the failure.
    qemu(
        &url_of(&before),
        &["write -P 0xa1 0 1M", "write -P 0xb2 40M 1M", "flush"],
    );
    let lost_dir = cluster
        .pool(1)
        .join(before.spec.uuid.to_string())
        .join("replica-1");
    assert!(lost_dir.is_dir());

    // n1 (the controller and replica 1) dies.
    cluster.fail(1).await;
    let moved = wait_until("the controller to move off n1", STEP_TIMEOUT, || async {
        let rec = cluster.record(&name).await;
        let c = rec.placement.controller.clone()?;
        (c.node != cluster.name(1)).then_some(rec)
    })
    .await;
    let controller = moved.placement.controller.clone().unwrap();
    assert_eq!(controller.generation, 2, "a higher generation");
    assert!(
        moved.placement.replicas.iter().any(|r| r.node == controller.node),
        "the new controller runs where a replica is"
    );
    let info = wait_until("the new controller to serve", STEP_TIMEOUT, || async {
        volume_info(api_of(&moved), &token)
            .await
            .filter(|i| i.state == "serving")
    })
    .await;
    assert!(
        info.epoch > old_epoch,
        "the new controller fences the old one ({} > {old_epoch})",
        info.epoch
    );
    let lease =
        store::get_json::<basalt_agent::model::VolumeLease>(store.as_ref(), &keys::volume_lease(&name))
            .await
            .unwrap()
            .expect("the volume's controller lease");
    assert_eq!(
        lease.value.node, controller.node,
        "the lease names the new controller's node"
    );
    // The writer reconnects at the new controller's address: every acknowledged write is there.
    qemu(
        &url_of(&moved),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xb2 40M 1M",
            "write -P 0xc3 20M 1M",
            "flush",
        ],
    );

    // Past the grace period, replica 1 is replaced on n4, rebuilt, and removed for good.
    let replaced = wait_until(
        "replica 1 replaced on n4 and the volume whole",
        STEP_TIMEOUT,
        || whole(store.as_ref(), &name),
    )
    .await;
    let nodes: Vec<&str> = replaced
        .placement
        .replicas
        .iter()
        .map(|r| r.node.as_str())
        .collect();
    assert!(nodes.contains(&"n4") && !nodes.contains(&"n1"), "{nodes:?}");
    assert!(replaced.placement.replicas.iter().all(|r| r.id != 1));
    let info = volume_info(api_of(&replaced), &token).await.unwrap();
    let n1_address = format!("127.0.0.1:{}", cluster.nodes[0].config.node.ports.first);
    assert!(
        info.replicas.iter().all(|r| r.address != n1_address || r.removed),
        "replica 1 is out of the membership: {:?}",
        info.replicas
    );
    assert_eq!(
        info.replicas
            .iter()
            .filter(|r| !r.removed && r.mode == "RW")
            .count(),
        3
    );
    // n1 was away: its replica's data is still on its disk.
    assert!(lost_dir.is_dir());

    // n1 comes back: its replica is retired, and its data deleted since the volume is whole.
    cluster.start(1).await;
    wait_until(
        "n1 to delete its retired replica's data",
        STEP_TIMEOUT,
        || async { (!lost_dir.exists()).then_some(()) },
    )
    .await;
    assert!(whole(store.as_ref(), &name).await.is_some());
    qemu(
        &url_of(&replaced),
        &["read -P 0xa1 0 1M", "read -P 0xb2 40M 1M", "read -P 0xc3 20M 1M"],
    );
    for i in 1..=4 {
        if let Some(running) = cluster.nodes[i - 1].running.take() {
            running.stop(store.as_ref()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_gives_up_its_replica_one_rebuild_at_a_time_never_below_min_healthy() {
    let mut cluster = Cluster::new(4);
    for i in 1..=4 {
        cluster.start(i).await;
    }
    let name = VolumeName::new("drain").unwrap();
    let token = cluster.create_volume(&name, [1, 2, 3], 2).await;
    let store = cluster.store.clone();
    let before = wait_until("the volume whole on n1, n2, n3", STEP_TIMEOUT, || {
        whole(store.as_ref(), &name)
    })
    .await;
    qemu(
        &url_of(&before),
        &["write -P 0x11 0 1M", "write -P 0x22 50M 1M", "flush"],
    );

    // Watch the controller all through the drain: how many replicas are RW at the least, and
    // whether it ever stopped serving.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let watching = watching.clone();
        let (api, token) = (api_of(&before), token.clone());
        tokio::spawn(async move {
            let (mut least_rw, mut samples, mut not_serving) = (usize::MAX, 0, 0);
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(info) = volume_info(api, &token).await {
                    samples += 1;
                    let rw = info
                        .replicas
                        .iter()
                        .filter(|r| !r.removed && r.mode == "RW")
                        .count();
                    least_rw = least_rw.min(rw);
                    if info.state != "serving" {
                        not_serving += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (least_rw, samples, not_serving)
        })
    };

    cluster
        .set_node(1, |n| {
            n.cordoned = true;
            n.draining = true;
        })
        .await;
    let after = wait_until(
        "n1's replica moved to n4 and the volume whole",
        STEP_TIMEOUT,
        || async {
            whole(store.as_ref(), &name)
                .await
                .filter(|rec| rec.placement.replicas.iter().all(|r| r.node != cluster.name(1)))
        },
    )
    .await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (least_rw, samples, not_serving) = sampler.await.unwrap();
    assert!(samples > 0);
    assert_eq!(not_serving, 0, "the volume served throughout the drain");
    assert!(
        least_rw >= 3,
        "the drain copies first: never fewer than 3 RW replicas (least seen: {least_rw})"
    );
    assert!(after.placement.replicas.iter().any(|r| r.node == cluster.name(4)));
    assert_eq!(
        after.placement.controller.as_ref().map(|c| c.generation),
        Some(1),
        "a drain of a replica's node restarts no controller"
    );
    let dir = cluster
        .pool(1)
        .join(before.spec.uuid.to_string())
        .join("replica-1");
    wait_until(
        "n1 to delete its drained replica's data",
        STEP_TIMEOUT,
        || async { (!dir.exists()).then_some(()) },
    )
    .await;
    qemu(&url_of(&after), &["read -P 0x11 0 1M", "read -P 0x22 50M 1M"]);
    for i in 1..=4 {
        if let Some(running) = cluster.nodes[i - 1].running.take() {
            running.stop(store.as_ref()).await;
        }
    }
}
