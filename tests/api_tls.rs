//! The controller's management API over TLS (`--api-tls-cert`, `--api-tls-key`): the CLI with the CA that
//! signed the controller's certificate (`--api-ca`) manages the volume; without a CA, with another CA or
//! expecting another name it fails, saying what to change; and the token is still required over TLS. A CA
//! and the server's certificate are made at test time with the `openssl` command, the controller is a real
//! process on a real replica.

use std::path::Path;
use std::process::Output;

use basalt_proto::pb::controller as pb;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_tests::volume::{make_ca_and_server_cert, volume_info_with, ApiTlsFiles, Cluster};
use basalt_tests::{basalt_command, io, ByteSize, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// `basalt ARGS...` with the harness's token, and its output.
fn basalt(args: &[&str]) -> Result<Output> {
    basalt_command()?.args(args).output().map_err(io("run basalt"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_cli_manages_a_tls_controller_with_its_ca_and_says_what_to_change_otherwise() -> Result<()> {
    let mut cluster = Cluster::start(1, ByteSize::mib(16))?;
    let tls = make_ca_and_server_cert(&cluster.dir.path().join("tls"))?;
    let other = make_ca_and_server_cert(&cluster.dir.path().join("other-tls"))?;
    // Started and waited for through TLS with the CA: `volume info --api-ca` works.
    let controller = cluster.start_controller_with_api_tls(&tls, &[])?;
    let api = controller.api.to_string();
    let ca = tls.ca.to_string_lossy().into_owned();
    let info = volume_info_with(controller.api, &["--api-ca", &ca])?;
    assert_eq!(info["name"], "vol", "{info}");

    // A change over TLS, the CA from the environment this time.
    let out = basalt_command()?
        .env("BASALT_API_CA", &tls.ca)
        .args(["snapshot", "create", "--api", &api, "over-tls"])
        .output()
        .map_err(io("run basalt snapshot create"))?;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = basalt(&["snapshot", "ls", "--api", &api, "--api-ca", &ca])?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("over-tls"),
        "{listed}{}",
        stderr(&out)
    );
    // The name from the address (`localhost`, a DNS name of the certificate) works as well as the IP.
    let by_name = format!("localhost:{}", controller.api.port());
    let out = basalt(&["volume", "info", "--api", &by_name, "--api-ca", &ca])?;
    assert!(out.status.success(), "{}", stderr(&out));
    // The health probe is the same client.
    let out = basalt(&["health", "--api", &api, "--api-ca", &ca, "--ready"])?;
    assert!(out.status.success(), "{}", stderr(&out));

    // Without a CA: plaintext meets TLS, and the message says to pass the CA.
    let out = basalt(&["volume", "info", "--api", &api])?;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "plaintext volume info succeeded against TLS"
    );
    assert!(
        err.contains("TLS") && err.contains("--api-ca") && err.contains("BASALT_API_CA"),
        "{err}"
    );
    let out = basalt(&["health", "--api", &api])?;
    assert!(
        !out.status.success() && stderr(&out).contains("--api-ca"),
        "{}",
        stderr(&out)
    );

    // Another CA: the controller's certificate is not trusted.
    let other_ca = other.ca.to_string_lossy().into_owned();
    let out = basalt(&["volume", "info", "--api", &api, "--api-ca", &other_ca])?;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "volume info trusted a certificate of another CA"
    );
    assert!(err.contains("did not sign") && err.contains("--api-ca"), "{err}");

    // Another name than the certificate carries.
    let out = basalt(&[
        "volume",
        "info",
        "--api",
        &api,
        "--api-ca",
        &ca,
        "--api-tls-name",
        "other.example",
    ])?;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "volume info accepted a certificate for another name"
    );
    assert!(
        err.contains("another name") && err.contains("--api-tls-name"),
        "{err}"
    );

    // A CA file that holds no certificate (the server's key) is named before anything connects.
    let key = tls.key.to_string_lossy().into_owned();
    let out = basalt(&["volume", "info", "--api", &api, "--api-ca", &key])?;
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains(&key) && err.contains("no PEM certificate"),
        "{err}"
    );

    token_still_required_over_tls(controller.api, &tls)?;
    controller.daemon.stop()?;
    Ok(())
}

/// Over TLS, a call without the token or with a wrong one is refused just as in plaintext.
fn token_still_required_over_tls(api: std::net::SocketAddr, tls: &ApiTlsFiles) -> Result<()> {
    let ca = tls.ca.to_string_lossy().into_owned();
    let out = basalt_command()?
        .env("BASALT_API_TOKEN", "not-the-volume-token-0123456789")
        .args([
            "snapshot",
            "create",
            "--api",
            &api.to_string(),
            "--api-ca",
            &ca,
            "refused",
        ])
        .output()
        .map_err(io("run basalt snapshot create"))?;
    let err = stderr(&out);
    assert!(!out.status.success(), "a wrong token was accepted over TLS");
    assert!(err.contains("token is wrong"), "{err}");

    let ca_pem = basalt_tests::read_file(&tls.ca)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("start a runtime"))?;
    runtime.block_on(async {
        let channel = Channel::from_shared(format!("https://{api}"))
            .expect("a valid URI")
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
            .expect("a TLS configuration")
            .connect()
            .await
            .expect("the controller's API answers over TLS");
        let mut anonymous = ControllerServiceClient::new(channel);
        let status = anonymous
            .snapshot_create(pb::SnapshotRequest {
                name: "anonymous".into(),
            })
            .await
            .expect_err("snapshot create over TLS without a token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    });
    // Nothing changed: the chain holds the one snapshot taken with the token.
    let out = basalt(&["snapshot", "ls", "--api", &api.to_string(), "--api-ca", &ca])?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !listed.contains("refused") && !listed.contains("anonymous"),
        "a refused call changed the chain: {listed}"
    );
    Ok(())
}

#[test]
fn a_tls_client_of_a_plaintext_controller_is_told_to_drop_the_ca() -> Result<()> {
    let mut cluster = Cluster::start(1, ByteSize::mib(16))?;
    let tls = make_ca_and_server_cert(&cluster.dir.path().join("tls"))?;
    let controller = cluster.start_controller(&[])?;
    let ca = tls.ca.to_string_lossy().into_owned();
    let out = basalt(&[
        "volume",
        "info",
        "--api",
        &controller.api.to_string(),
        "--api-ca",
        &ca,
    ])?;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "TLS volume info succeeded against plaintext"
    );
    assert!(
        err.contains("does not speak TLS") && err.contains("--api-ca") && err.contains("--api-tls-cert"),
        "{err}"
    );
    controller.daemon.stop()?;
    Ok(())
}

#[test]
fn unusable_tls_files_stop_the_controller_before_it_serves() -> Result<()> {
    let dir = tempfile::tempdir().map_err(io("create a temp dir"))?;
    let tls = make_ca_and_server_cert(&dir.path().join("tls"))?;
    let other = make_ca_and_server_cert(&dir.path().join("other-tls"))?;
    // The files are checked before any replica is contacted: no replica is needed to see the errors.
    let controller = |tls_args: &[&Path]| -> Result<Output> {
        let mut cmd = basalt_command()?;
        cmd.args([
            "controller",
            "--name",
            "vol",
            "--size",
            "16M",
            "--replica",
            "127.0.0.1:1",
            "--iscsi",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ]);
        for (flag, path) in ["--api-tls-cert", "--api-tls-key"].iter().zip(tls_args) {
            cmd.arg(flag).arg(path);
        }
        let out = cmd.output().map_err(io("run basalt controller"))?;
        assert!(!out.status.success(), "the controller started: {}", stderr(&out));
        Ok(out)
    };
    let err = stderr(&controller(&[&tls.cert])?);
    assert!(
        err.contains("--api-tls-key"),
        "a certificate without a key: {err}"
    );
    let err = stderr(&controller(&[&tls.key, &tls.key])?);
    assert!(
        err.contains("--api-tls-cert") && err.contains("no PEM certificate"),
        "{err}"
    );
    let err = stderr(&controller(&[&tls.cert, &tls.cert])?);
    assert!(
        err.contains("--api-tls-key") && err.contains("no PEM private key"),
        "{err}"
    );
    let err = stderr(&controller(&[&tls.cert, &other.key])?);
    assert!(
        err.contains("is the key the certificate's"),
        "a key of another certificate: {err}"
    );
    let missing = dir.path().join("missing.pem");
    let err = stderr(&controller(&[&missing, &tls.key])?);
    assert!(err.contains("missing.pem"), "{err}");
    Ok(())
}
