//! The agent's `docker` runtime on the real Docker engine, with the image `images/build.sh` builds from the
//! test's own `basalt` binary: a replica service becomes a running container that serves on the host's
//! network, `ensure` with the same spec leaves it alone, and `stop` removes it.

use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use basalt_agent::model::{NodeName, ServiceId, ServiceState};
use basalt_agent::runtime::docker::DockerRuntime;
use basalt_agent::runtime::{ReplicaSpec, ReplicaStorage, Runtime, ServiceKey, ServiceSpec};
use basalt_engine::name::VolumeName;
use basalt_tests::{free_local_addr, wait_for};

const SOCKET: &str = "/var/run/docker.sock";
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn container_id(name: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["inspect", "--format", "{{.Id}}", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_runs_as_a_container_on_the_host_network_and_is_removed_by_stop() {
    let image = tokio::task::spawn_blocking(basalt_tests::agent_image)
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("peer-secret");
    std::fs::write(&secret, basalt_proto::auth::hex(&rand::random::<[u8; 32]>())).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let listen = free_local_addr().unwrap();
    let node = NodeName::new(&format!("dk{:08x}", rand::random::<u32>())).unwrap();
    let runtime: Arc<dyn Runtime> = Arc::new(DockerRuntime::new(SOCKET.into(), image, node.clone()));
    let docker = DockerRuntime::new(SOCKET.into(), String::new(), node);
    let key = ServiceKey {
        volume: VolumeName::new("dockvol").unwrap(),
        service: ServiceId::Replica(1),
    };
    let name = docker.container_name(&key);
    let spec = ServiceSpec::Replica(ReplicaSpec {
        volume_id: uuid::Uuid::new_v4(),
        size_bytes: 64 << 20,
        storage: ReplicaStorage::Directory(dir.path().join("replica-1")),
        listen,
        secret_file: secret,
        clone: None,
    });
    // Whatever happens below, the container goes.
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }
    let _remove = Remove(name.clone());

    runtime.ensure(&key, &spec).await.unwrap();
    let id = container_id(&name).expect("the container exists");
    wait_for(
        "the replica container to serve on the host network",
        START_TIMEOUT,
        || TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok(),
    )
    .unwrap();
    let seen = runtime.observe().await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, key);
    assert_eq!(seen[0].1.state, ServiceState::Running);
    assert!(
        dir.path().join("replica-1").read_dir().unwrap().next().is_some(),
        "the store is on the host"
    );

    // The same spec (a larger size is applied online, not by a new container): left alone.
    let ServiceSpec::Replica(mut grown) = spec.clone() else {
        unreachable!()
    };
    grown.size_bytes *= 2;
    runtime.ensure(&key, &ServiceSpec::Replica(grown)).await.unwrap();
    assert_eq!(container_id(&name), Some(id));

    runtime.stop(&key).await.unwrap();
    assert_eq!(container_id(&name), None);
    assert!(runtime.observe().await.unwrap().is_empty());
}
