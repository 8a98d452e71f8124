//! `basalt replica rm` against a real volume (a controller over three
//! in-process replica servers, its management API on a real socket): the
//! min-healthy rule holds however many removals arrive at once, because the
//! volume's owner decides each one against the state the others left.

use std::sync::Arc;
use std::time::Duration;

use basalt_engine::api_auth::{ApiToken, RequireToken, WithToken};
use basalt_engine::controller::{assemble, reconcile, ControllerConfig};
use basalt_engine::name::VolumeName;
use basalt_engine::volume::rebuild::Rebuilder;
use basalt_proto::auth::VolumeSecret;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_proto::pb::controller::{ReplicaRequest, VolumeInfoRequest};
use basalt_proto::VolumeId;
use basalt_replica::server::{Metrics, Server};
use basalt_replica::store::Store;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const SIZE: u64 = 16 << 20;

fn secret() -> VolumeSecret {
    VolumeSecret::new("replica-rm-test-secret").unwrap()
}

fn token() -> ApiToken {
    ApiToken::new("replica-rm-test-api-token").unwrap()
}

/// A management API client that carries the token, as the CLI's does.
async fn api_client(
    api: std::net::SocketAddr,
) -> ControllerServiceClient<InterceptedService<Channel, WithToken>> {
    let channel = Channel::from_shared(format!("http://{api}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ControllerServiceClient::with_interceptor(channel, WithToken(token()))
}

/// Three replica servers of one volume, each over its own store.
async fn replicas(dir: &tempfile::TempDir, shutdown: &CancellationToken) -> Vec<String> {
    let volume = VolumeId(uuid::Uuid::new_v4());
    let mut addrs = Vec::new();
    for i in 0..3 {
        let store = Store::create(&dir.path().join(format!("r{i}")), volume, SIZE).unwrap();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(store),
            Metrics::new(),
            secret(),
        )
        .await
        .unwrap();
        addrs.push(server.local_addr().to_string());
        tokio::spawn(server.run(shutdown.clone()));
    }
    addrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_removals_never_leave_fewer_read_write_replicas_than_min_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let addrs = replicas(&dir, &shutdown).await;
    let config = ControllerConfig {
        name: VolumeName::new("rm").unwrap(),
        size_bytes: SIZE,
        replicas: addrs.clone(),
        volume_id: None,
        min_healthy: Some(2),
        replica_timeout: Duration::from_secs(5),
        startup_wait: Duration::from_secs(5),
        secret: secret(),
    };
    let assembled = assemble(&config).await.unwrap();
    let rebuilder = Rebuilder::new();
    reconcile(&assembled, &rebuilder, Duration::from_secs(60)).await;
    let volume = assembled.volume;
    let status = volume.status().await.unwrap();
    assert_eq!(
        status.healthy, 3,
        "every replica read-write to begin with: {status:?}"
    );
    let api = basalt_engine::api::Api::new(volume, "iqn.test:rm".into(), Arc::new(|| 0), rebuilder);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InterceptedService::new(api, RequireToken(token())))
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
    );
    let client = api_client(api_addr).await;

    // Every replica removed at once, each by its own client (as three
    // operators would): with min-healthy 2 of 3, exactly one may go.
    let mut clients = Vec::new();
    for _ in &addrs {
        clients.push(api_client(api_addr).await);
    }
    let removals = addrs.iter().zip(clients).map(|(address, mut client)| {
        let request = ReplicaRequest {
            address: address.clone(),
        };
        async move { client.replica_remove(request).await }
    });
    let outcomes = futures::future::join_all(removals).await;
    let removed = outcomes.iter().filter(|o| o.is_ok()).count();
    let info = client
        .clone()
        .volume_info(VolumeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let read_write = info.replicas.iter().filter(|r| r.mode == "RW").count();
    assert_eq!(
        (removed, read_write),
        (1, 2),
        "one removal allowed, two replicas left read-write: {outcomes:?}\n{info:?}"
    );
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("min-healthy (2)"), "{refused:?}");
    }
    shutdown.cancel();
}
