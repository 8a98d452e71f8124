//! Authorized access (the CSI spec's ControllerPublish): a volume's target lets in only the initiators its
//! allow-list names, and the list changes at run time through the controller's management API
//! (`TargetSetAllowList`). Checked with qemu-io as the initiator, under the initiator name it is given
//! (`initiator-name`): a name that is not allowed is refused at login, an allowed one reads and writes, and
//! a session whose initiator is taken off the list is closed.

use std::time::Duration;

use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_proto::pb::controller::TargetAllowListRequest;
use basalt_tests::volume::Cluster;
use basalt_tests::{add_api_token, ByteSize, IscsiUrl};

const ALLOWED: &str = "iqn.2026-11.io.basalt.test:node-a";
const OTHER: &str = "iqn.2026-11.io.basalt.test:node-b";

fn qemu_io_as(url: &IscsiUrl, initiator: &str, commands: &[&str]) -> (bool, String) {
    basalt_tests::volume::qemu_io_as(url, initiator, commands).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_initiators_log_in_and_the_list_changes_at_run_time() {
    let mut cluster = Cluster::start(1, ByteSize::mib(64)).unwrap();
    let controller = cluster.start_controller(&[]).unwrap();
    let url = controller.url.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", controller.api))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut api = ControllerServiceClient::with_interceptor(channel, add_api_token);
    let set = |any: bool, initiators: &[&str]| TargetAllowListRequest {
        any,
        initiators: initiators.iter().map(|s| s.to_string()).collect(),
    };

    // Open by default (the controller was started without --allow).
    let (ok, out) = qemu_io_as(&url, OTHER, &["write -P 0x3c 0 64k"]);
    assert!(ok, "{out}");

    // Published to node a: only its initiator logs in.
    api.target_set_allow_list(set(false, &[ALLOWED])).await.unwrap();
    let (ok, out) = qemu_io_as(&url, OTHER, &["read -P 0x3c 0 64k"]);
    assert!(!ok, "an initiator that is not allowed was let in: {out}");
    let (ok, out) = qemu_io_as(&url, ALLOWED, &["read -P 0x3c 0 64k", "write -P 0x4d 0 64k"]);
    assert!(ok, "{out}");
    // Names compare case-insensitively (RFC 7143).
    let (ok, out) = qemu_io_as(
        &url,
        &ALLOWED.to_uppercase().replacen("IQN", "iqn", 1),
        &["read -P 0x4d 0 64k"],
    );
    assert!(ok, "{out}");

    // Unpublished everywhere: nobody.
    api.target_set_allow_list(set(false, &[])).await.unwrap();
    let (ok, out) = qemu_io_as(&url, ALLOWED, &["read -P 0x4d 0 64k"]);
    assert!(!ok, "{out}");

    // A bad request changes nothing.
    for bad in [set(true, &[ALLOWED]), set(false, &["not an iqn"])] {
        let e = api.target_set_allow_list(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    let (ok, _) = qemu_io_as(&url, ALLOWED, &["read -P 0x4d 0 64k"]);
    assert!(!ok, "the refused request must not have opened the target");

    // A session logged in when its initiator is taken off the list is closed: qemu-io holding a session
    // (a long sequence of reads) sees its I/O fail once the list no longer names it.
    api.target_set_allow_list(set(false, &[ALLOWED])).await.unwrap();
    let holder_url = url.clone();
    let holder = std::thread::spawn(move || {
        let reads: Vec<String> = (0..400).map(|_| "read -P 0x4d 0 64k".to_string()).collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        let mut commands = vec!["sleep 2000"];
        commands.extend(reads);
        qemu_io_as(&holder_url, ALLOWED, &commands)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let reply = api
        .target_set_allow_list(set(false, &[OTHER]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.sessions_closed, 1,
        "the allowed initiator's session was open"
    );
    let (_, out) = holder.join().unwrap();
    // qemu's iSCSI driver reconnects after a dropped session and is refused at login now.
    assert!(out.contains("rror") || out.contains("failed"), "{out}");

    api.target_set_allow_list(set(true, &[])).await.unwrap();
    let (ok, out) = qemu_io_as(&url, OTHER, &["read -P 0x4d 0 64k"]);
    assert!(ok, "{out}");
}
