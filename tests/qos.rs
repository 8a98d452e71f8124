//! QoS limits end to end: a 3-replica volume with a write IOPS limit, driven by fio's libiscsi engine; the limit
//! changed and cleared at run time with `basalt volume qos`; bad limits refused by the CLI and the gRPC API
//! with nothing changed.
//!
//! Timing checks are lower bounds only (N writes at R IOPS with a burst of B take at least (N - B) / R
//! seconds): a throttle can only make I/O slower, so a slow, shared machine cannot fail them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use basalt_proto::pb::controller as pb;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_tests::fio::{Extent, FioJob, Pattern, Verify};
use basalt_tests::volume::{volume_info, Cluster};
use basalt_tests::{
    basalt_command, fio_libiscsi, free_local_addr, io, run_checked, ByteSize, IscsiUrl, Result,
};
use serde_json::Value;

/// `n` random 4 KiB writes at QD32 (fio visits every block of its extent once), and how long they took.
fn timed_writes(url: &IscsiUrl, log_dir: &std::path::Path, name: &str, n: u64) -> Result<Duration> {
    let job = FioJob {
        name: name.into(),
        pattern: Pattern::RandWrite,
        block_size: ByteSize::kib(4),
        iodepth: 32,
        extent: Extent::Bytes(ByteSize::kib(4 * n)),
        verify: Verify::None,
    };
    let started = Instant::now();
    let result = job.run(&fio_libiscsi()?, url, log_dir)?;
    let took = started.elapsed();
    assert_eq!(result.error, 0, "fio reported an error");
    assert_eq!(result.write.io_bytes, 4096 * n, "fio wrote all {n} blocks");
    Ok(took)
}

/// `basalt volume qos --api API ARGS...`: exit status, stdout, stderr.
fn volume_qos(api: SocketAddr, args: &[&str]) -> Result<(bool, String, String)> {
    let mut cmd = basalt_command()?;
    cmd.args(["volume", "qos", "--api", &api.to_string()]).args(args);
    let out = cmd.output().map_err(io("run basalt volume qos"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The value of one series in the controller's `/metrics` (absent: `None`).
fn metric(addr: SocketAddr, series: &str) -> Result<Option<f64>> {
    let mut stream = TcpStream::connect(addr).map_err(io(format!("connect to the metrics at {addr}")))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: basalt\r\nConnection: close\r\n\r\n")
        .map_err(io("ask for /metrics"))?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(io("read /metrics"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()))
}

fn qos_of(info: &Value) -> &Value {
    &info["qos"]
}

fn write_throttled_seconds(api: SocketAddr) -> Result<f64> {
    let info = volume_info(api)?;
    Ok(qos_of(&info)["throttled_seconds"]["write"]
        .as_f64()
        .unwrap_or(-1.0))
}

#[test]
fn a_write_iops_limit_throttles_fio_and_changes_and_clears_at_run_time() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let metrics = free_local_addr()?;
    let controller = cluster.start_controller(&[
        "--qos-write-iops",
        "200",
        "--qos-write-iops-burst",
        "20",
        "--metrics",
        &metrics.to_string(),
    ])?;
    let api = controller.api;
    let log_dir = cluster.log_dir().to_path_buf();

    let info = volume_info(api)?;
    assert_eq!(
        qos_of(&info)["limits"],
        serde_json::json!({ "write_iops": { "rate": 200, "burst": 20 } }),
        "the limit set at start is in force: {info}"
    );

    // 600 writes at 200/s with a burst of 20 cannot take less than 2.9 s, however fast the machine.
    let took = timed_writes(&controller.url, &log_dir, "limited-200", 600)?;
    assert!(
        took >= Duration::from_secs_f64((600.0 - 20.0) / 200.0),
        "600 writes took {took:?} under a 200 IOPS limit"
    );
    let throttled = write_throttled_seconds(api)?;
    assert!(
        throttled > 0.0,
        "volume info shows throttled write time: {throttled}"
    );
    assert_eq!(
        metric(metrics, r#"basalt_volume_qos_limit{limit="write_iops"}"#)?,
        Some(200.0)
    );
    assert_eq!(
        metric(metrics, r#"basalt_volume_qos_burst{limit="write_iops"}"#)?,
        Some(20.0)
    );
    assert_eq!(
        metric(metrics, r#"basalt_volume_qos_limit{limit="read_iops"}"#)?,
        None,
        "no read limit is set"
    );
    let exported = metric(
        metrics,
        r#"basalt_volume_qos_throttled_seconds_total{direction="write"}"#,
    )?;
    assert!(
        exported.is_some_and(|s| s > 0.0),
        "throttled time exported: {exported:?}"
    );
    let mut cmd = basalt_command()?;
    cmd.args(["volume", "info", "--api", &api.to_string()]);
    let text = String::from_utf8_lossy(&run_checked(&mut cmd)?.stdout).into_owned();
    assert!(
        text.contains("write-iops 200/s (burst 20)") && text.contains("throttled read 0.000 s, write "),
        "volume info shows the limit and the throttled time:\n{text}"
    );

    // Lowered at run time: 150 writes at 50/s with a burst of 5 take at least 2.9 s, which 200/s would not.
    let (ok, out, err) = volume_qos(api, &["--write-iops", "50", "--write-iops-burst", "5"])?;
    assert!(ok, "volume qos failed: {err}");
    assert!(out.contains("write-iops 50/s (burst 5)"), "{out}");
    let took = timed_writes(&controller.url, &log_dir, "limited-50", 150)?;
    assert!(
        took >= Duration::from_secs_f64((150.0 - 5.0) / 50.0),
        "150 writes took {took:?} under a 50 IOPS limit set at run time"
    );

    // Cleared: no write waits for tokens any more.
    let (ok, out, err) = volume_qos(api, &["--clear"])?;
    assert!(ok, "volume qos --clear failed: {err}");
    assert!(out.contains("QoS limits in force: none"), "{out}");
    let before = write_throttled_seconds(api)?;
    timed_writes(&controller.url, &log_dir, "unlimited", 400)?;
    assert_eq!(
        write_throttled_seconds(api)?,
        before,
        "writes waited for tokens with no limit set"
    );
    assert_eq!(
        metric(metrics, r#"basalt_volume_qos_limit{limit="write_iops"}"#)?,
        None,
        "the cleared limit is gone"
    );
    let info = volume_info(api)?;
    assert_eq!(qos_of(&info)["limits"], serde_json::json!({}), "{info}");
    assert_eq!(qos_of(&info)["waiting"]["write"], 0, "{info}");
    Ok(())
}

#[test]
fn bad_limits_are_refused_by_the_cli_and_the_api_and_change_nothing() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(16))?;
    let controller = cluster.start_controller(&["--qos-read-iops", "1000"])?;
    let api = controller.api;
    let in_force = serde_json::json!({ "read_iops": { "rate": 1000, "burst": 1000 } });

    for (args, flag, says) in [
        (&["--write-iops", "0"][..], "--write-iops", "1 to 10000000"),
        (&["--iops", "-5"][..], "--iops", "not a number"),
        (&["--bps", "200G"][..], "--bps", "4096 to 107374182400"),
        (&["--read-bps", "1K"][..], "--read-bps", "4096 to"),
        (
            &["--iops", "100000", "--iops-burst", "10"][..],
            "--iops-burst",
            "at least 1000",
        ),
        (&["--write-iops-burst", "10"][..], "--write-iops", ""),
    ] {
        let (ok, _, err) = volume_qos(api, args)?;
        assert!(!ok, "volume qos {args:?} succeeded");
        assert!(
            err.contains(flag) && err.contains(says),
            "volume qos {args:?}: {err}"
        );
        assert_eq!(
            qos_of(&volume_info(api)?)["limits"],
            in_force,
            "volume qos {args:?} changed the limits"
        );
    }

    // The roles that start a volume check their flags before touching a replica.
    let replica = cluster.replica_addrs()[0].clone();
    for args in [
        vec![
            "controller",
            "--name",
            "x",
            "--size",
            "16M",
            "--replica",
            &replica,
            "--qos-write-iops",
            "0",
        ],
        vec!["volume", "up", "--name", "x", "--size", "16M", "--qos-bps", "1"],
    ] {
        let out = basalt_command()?
            .args(&args)
            .current_dir(cluster.log_dir())
            .output()
            .map_err(io("run basalt"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains("--qos-") && err.contains(" to "), "{args:?}: {err}");
    }

    // The API: INVALID_ARGUMENT naming the field, and nothing changed, not even the good limit beside it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("start a runtime"))?;
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{api}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("the controller's API answers");
        let mut client = ControllerServiceClient::with_interceptor(
            channel,
            basalt_tests::add_api_token as basalt_tests::AddApiToken,
        );
        let limit = |rate, burst| Some(pb::QosLimit { rate, burst });
        for (limits, field) in [
            (
                pb::QosLimits {
                    write_iops: limit(0, 0),
                    ..Default::default()
                },
                "limits.write_iops",
            ),
            (
                pb::QosLimits {
                    iops: limit(10_000_001, 0),
                    ..Default::default()
                },
                "limits.iops",
            ),
            (
                pb::QosLimits {
                    bps: limit(1 << 20, 100),
                    ..Default::default()
                },
                "limits.bps",
            ),
            (
                pb::QosLimits {
                    read_iops: limit(5, 0),
                    write_bps: limit(u64::MAX, 0),
                    ..Default::default()
                },
                "limits.write_bps",
            ),
        ] {
            let status = client
                .volume_set_qos(pb::VolumeSetQosRequest {
                    limits: Some(limits),
                    clear: true,
                })
                .await
                .expect_err("a bad limit is refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(field), "{status:?}");
        }
        let info = client
            .volume_info(pb::VolumeInfoRequest {})
            .await
            .expect("volume info")
            .into_inner();
        assert_eq!(
            info.qos.and_then(|q| q.read_iops),
            Some(pb::QosLimit {
                rate: 1000,
                burst: 1000
            }),
            "refused requests changed the limits"
        );
        assert_eq!(info.qos.and_then(|q| q.write_iops), None);
    });
    Ok(())
}
