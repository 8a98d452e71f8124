//! Authorized access (the CSI spec's ControllerPublish): a volume's target lets in only the initiators its
//! allow-list names, and the list changes at run time through the controller's management API
//! (`TargetSetAllowList`). Checked with qemu-io as the initiator, under the initiator name it is given
//! (`initiator-name`): a name that is not allowed is refused at login, an allowed one reads and writes, and
//! a session whose initiator is taken off the list is closed.

use std::process::{Command, Stdio};
use std::time::Duration;

use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_proto::pb::controller::TargetAllowListRequest;
use basalt_tests::volume::{volume_info, Cluster};
use basalt_tests::{add_api_token, require_tool, ByteSize, IscsiUrl};

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

    // A session logged in when its initiator is taken off the list is closed at once: qemu-io holds one
    // open (it sleeps between two reads) while the list changes.
    api.target_set_allow_list(set(false, &[ALLOWED])).await.unwrap();
    let mut holder = Command::new(require_tool("qemu-io").unwrap())
        .args([
            "--image-opts",
            "-c",
            "read -P 0x4d 0 64k",
            "-c",
            "sleep 30000",
            "-c",
            "read -P 0x4d 0 64k",
        ])
        .arg(format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={ALLOWED},cache.direct=on",
            url.portal, url.iqn, url.lun
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut closed = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Once its session is in, taking the holder off the list closes it.
        let sessions = volume_info(controller.api).unwrap()["sessions"]
            .as_u64()
            .unwrap_or(0);
        if sessions == 1 {
            closed = api
                .target_set_allow_list(set(false, &[OTHER]))
                .await
                .unwrap()
                .into_inner()
                .sessions_closed;
            break;
        }
    }
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        closed, 1,
        "the allowed initiator's session was open and is closed"
    );
    let (ok, out) = qemu_io_as(&url, ALLOWED, &["read -P 0x4d 0 64k"]);
    assert!(!ok, "{out}");

    api.target_set_allow_list(set(true, &[])).await.unwrap();
    let (ok, out) = qemu_io_as(&url, OTHER, &["read -P 0x4d 0 64k"]);
    assert!(ok, "{out}");
}
