//! The controller's management API refuses every call that does not carry the volume's token, and a refused
//! call changes nothing: a snapshot asked for with a wrong token is not taken. The CLI says what to do, and
//! neither the CLI nor the controller's log ever shows a token.

use basalt_proto::pb::controller as pb;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_tests::volume::Cluster;
use basalt_tests::{basalt_command, io, ByteSize, Result, TEST_API_TOKEN};

const WRONG_TOKEN: &str = "not-the-volume-token-0123456789";

/// `authorization: Bearer WRONG_TOKEN`.
fn add_wrong_token(
    mut request: tonic::Request<()>,
) -> std::result::Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {WRONG_TOKEN}")
        .parse()
        .map_err(|_| tonic::Status::internal("the wrong token is not a header value"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

#[test]
fn calls_without_the_token_or_with_a_wrong_one_are_refused_and_change_nothing() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&[])?;
    let api = controller.api;

    // The CLI with a wrong token: refused by the controller, with what to do, and the token not echoed.
    let mut cmd = basalt_command()?;
    cmd.env("BASALT_API_TOKEN", WRONG_TOKEN).args([
        "snapshot",
        "create",
        "--api",
        &api.to_string(),
        "refused",
    ]);
    let out = cmd.output().map_err(io("run basalt snapshot create"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a snapshot was taken with a wrong token: {err}"
    );
    assert!(
        err.contains("token is wrong") && err.contains("--token-file") && err.contains("BASALT_API_TOKEN"),
        "the refusal says what was wrong and what to do: {err}"
    );
    assert!(!err.contains(WRONG_TOKEN), "the CLI echoed the token: {err}");

    // The CLI with no token at all refuses before it calls, saying how to give one.
    let mut cmd = basalt_command()?;
    cmd.env_remove("BASALT_API_TOKEN")
        .args(["volume", "info", "--api", &api.to_string()]);
    let out = cmd.output().map_err(io("run basalt volume info"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "volume info ran without a token");
    assert!(
        err.contains("--token-file") && err.contains("BASALT_API_TOKEN"),
        "{err}"
    );

    // The API itself, without the CLI: no token and a wrong token are UNAUTHENTICATED, for reads and changes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{api}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("the controller's API answers");

        let mut anonymous = ControllerServiceClient::new(channel.clone());
        let status = anonymous
            .volume_info(pb::VolumeInfoRequest {})
            .await
            .expect_err("volume info without a token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        let status = anonymous
            .snapshot_create(pb::SnapshotRequest {
                name: "anonymous".into(),
            })
            .await
            .expect_err("snapshot create without a token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

        let mut wrong = ControllerServiceClient::with_interceptor(
            channel.clone(),
            add_wrong_token as basalt_tests::AddApiToken,
        );
        let status = wrong
            .snapshot_create(pb::SnapshotRequest { name: "wrong".into() })
            .await
            .expect_err("snapshot create with a wrong token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(!status.message().contains(WRONG_TOKEN), "{status:?}");

        // Nothing changed: the right token sees no snapshot from any refused call.
        let mut right = ControllerServiceClient::with_interceptor(
            channel,
            basalt_tests::add_api_token as basalt_tests::AddApiToken,
        );
        let chain = right
            .snapshot_list(pb::SnapshotListRequest {})
            .await
            .expect("snapshot list with the right token")
            .into_inner();
        assert!(
            chain.snapshots.is_empty(),
            "a refused call took a snapshot: {:?}",
            chain.snapshots
        );
    });

    let log = controller.daemon.plain_log();
    assert!(
        !log.contains(WRONG_TOKEN),
        "the controller logged a presented token"
    );
    assert!(
        !log.contains(TEST_API_TOKEN),
        "the controller logged its own token"
    );
    controller.daemon.stop()?;
    Ok(())
}
