//! The `basalt` image and a volume as containers, on the real Docker engine of this machine.
//!
//! ```text
//!   images/build.sh (the test's own basalt binary, FROM scratch)  ->  basalt:e2e-<hash of the binary>
//!   images/compose.yaml, one compose project per test:
//!        controller  --(compose service names: replica1:9700 ...)-->  replica1  replica2  replica3
//!            |  iSCSI and API published on 127.0.0.1:<free ports>       (a named volume each)
//!            v
//!   qemu-img / iscsi-ls on the host: write a random image, read it back, compare byte for byte
//! ```
//!
//! Then the faults: `docker kill` / `docker start` a replica, `docker network disconnect` / `connect` one, kill
//! the controller and start another controller container on the same replicas, `compose down` / `up`.
//!
//! Every test has its own compose project name and host ports, so they run concurrently. A [`VolumeSet`]
//! removes its containers, network and volumes when dropped, also when the test panics (and prints the
//! containers' logs first). A missing or stopped Docker engine fails the tests loudly: CI must start dockerd
//! (tests/setup.sh), these tests never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Size of the test volumes: big enough for multi-command transfers, small enough to copy whole in seconds.
const VOLUME_SIZE: u64 = 32 << 20;
/// How long a volume set may take to come up on a busy 2-core machine.
const UP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a replica fault may take to show in `volume info` (the controller's replica timeout is 5 s).
const FAULT_TIMEOUT: Duration = Duration::from_secs(60);
const IQN_PREFIX: &str = "iqn.2026-11.io.basalt";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs `cmd`; a failure is an error carrying the command line and its output.
fn run(cmd: &mut Command) -> Result<Output> {
    let line = basalt_tests::describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn stdout(out: Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker(args: &[&str]) -> Result<String> {
    run(Command::new("docker").args(args)).map(stdout)
}

/// The Docker engine, or a failure that says how to start it. Never a skip.
fn require_engine() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        docker(&["info", "--format", "{{.ServerVersion}}"])
            .map(|_| ())
            .map_err(|e| {
                format!(
                "the Docker engine is not usable ({e:#}); start it (`dockerd &` or `systemctl start docker`; \
                 tests/setup.sh does this in CI)"
            )
            })
    });
    if let Err(e) = checked {
        panic!("{e}");
    }
}

/// What the engine was doing when a compose command failed: what the machine's load was, how long a volume
/// lookup takes (dockerd keeps every legacy volume plugin it has used until it restarts, and retries one
/// whose socket is gone for ~15 s on every lookup: tests/setup.sh restarts a dockerd in that state), and
/// the end of dockerd's log.
fn engine_diagnostics() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let plugins = std::fs::read_dir("/run/docker/plugins")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|e| format!("({e})"));
    let started = Instant::now();
    let lookup = docker(&["volume", "ls", "-q"])
        .map(|_| "answered")
        .unwrap_or("failed");
    let lookup_took = started.elapsed();
    let log = [
        "/var/log/basalt-dockerd.log",
        "/var/log/dockerd.log",
        "/var/log/docker.log",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|text| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    })
    .unwrap_or_else(|| "(no dockerd log found)".to_string());
    format!(
        "engine diagnostics: load average {}; /run/docker/plugins: [{plugins}]; `docker volume ls` {lookup} \
         in {lookup_took:.1?}; dockerd's log ends:\n{log}",
        load.trim()
    )
}

/// `docker compose` (v2) where it exists, else `docker-compose` (v1).
fn compose_program() -> &'static [&'static str] {
    static PROGRAM: OnceLock<&'static [&'static str]> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let v2 = Command::new("docker").args(["compose", "version"]).output();
        if v2.map(|o| o.status.success()).unwrap_or(false) {
            &["docker", "compose"]
        } else {
            &["docker-compose"]
        }
    })
}

/// The image under test, built once per test process from the test's own `basalt` binary by
/// images/build.sh, tagged by the binary's content so that concurrent runs of other builds never clash.
fn image() -> String {
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    require_engine();
    IMAGE
        .get_or_init(|| build_image().map_err(|e| format!("{e:#}")))
        .clone()
        .unwrap_or_else(|e| panic!("building the basalt image failed: {e}"))
}

fn build_image() -> Result<String> {
    let bin = basalt_tests::basalt_binary()?;
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    let hash = crc32_hex(&bytes);
    let tag = format!("basalt:e2e-{hash}");
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).is_err() {
        run(Command::new(workspace().join("images/build.sh"))
            .env("BASALT_BIN", &bin)
            .args(["--tag", &tag]))?;
    }
    Ok(tag)
}

/// A content tag for the binary (not security: it only keeps builds apart).
fn crc32_hex(bytes: &[u8]) -> String {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    format!("{:08x}{:08x}", !crc, bytes.len())
}

/// Polls `check` until it returns `Ok(Some(_))` or `timeout` passes; the last error or state is reported.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{what}: not reached within {timeout:?} (last: {last})");
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Random bytes for a volume image, different per call.
fn random_image(len: u64) -> Vec<u8> {
    basalt_tests::random_bytes(len as usize)
}

/// One volume as a compose project: a controller and three replicas. Dropping it removes everything.
struct VolumeSet {
    project: String,
    image: String,
    volume_id: String,
    name: String,
    iscsi_port: u16,
    api_port: u16,
    /// The container serving the volume now (the compose controller, or a replacement).
    controller: String,
    /// Containers started outside compose (replacement controllers), removed before `compose down`.
    extra: Vec<String>,
    scratch: tempfile::TempDir,
}

impl VolumeSet {
    /// Brings up a volume set for `test` and waits until it serves with three read-write replicas.
    fn up(test: &str) -> VolumeSet {
        let image = image();
        let project = format!("basalt-{}-{}", test.replace('_', "-"), std::process::id());
        let mut set = VolumeSet {
            project,
            image,
            volume_id: uuid_v4(),
            name: test.replace('_', "-"),
            iscsi_port: basalt_tests::free_port().expect("a free port"),
            api_port: basalt_tests::free_port().expect("a free port"),
            controller: String::new(),
            extra: Vec::new(),
            scratch: tempfile::tempdir().expect("a scratch directory"),
        };
        set.compose(&["up", "-d"]).expect("compose up");
        set.controller = set.container("controller").expect("the controller container");
        set.wait_serving(3).expect("the volume set serves");
        set
    }

    fn compose(&self, args: &[&str]) -> Result<String> {
        let program = compose_program();
        let mut cmd = Command::new(program[0]);
        cmd.args(&program[1..])
            .arg("-f")
            .arg(workspace().join("images/compose.yaml"))
            .args(["-p", &self.project])
            .args(args)
            .env("BASALT_IMAGE", &self.image)
            .env("BASALT_VOLUME_ID", &self.volume_id)
            .env("BASALT_VOLUME_SECRET", basalt_tests::TEST_VOLUME_SECRET)
            .env("BASALT_API_TOKEN", basalt_tests::TEST_API_TOKEN)
            .env("BASALT_NAME", &self.name)
            .env("BASALT_SIZE", VOLUME_SIZE.to_string())
            .env("BASALT_ISCSI_PORT", self.iscsi_port.to_string())
            .env("BASALT_API_PORT", self.api_port.to_string())
            // compose v1 gives up on a request after 60 s; a busy 2-core CI machine creating four containers
            // for each of two concurrent tests can take longer than that without anything being wrong.
            .env("COMPOSE_HTTP_TIMEOUT", "300");
        run(&mut cmd)
            .map(stdout)
            .map_err(|e| e.context(engine_diagnostics()))
    }

    /// The container id of a compose service.
    fn container(&self, service: &str) -> Result<String> {
        let id = self.compose(&["ps", "-q", service])?;
        if id.is_empty() {
            bail!("compose project {} has no {service} container", self.project);
        }
        Ok(id)
    }

    fn network(&self) -> Result<String> {
        let c = self.container("replica1")?;
        docker(&[
            "inspect",
            "--format",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}",
            &c,
        ])
    }

    fn url(&self) -> String {
        format!(
            "iscsi://127.0.0.1:{}/{IQN_PREFIX}:{}/0",
            self.iscsi_port, self.name
        )
    }

    /// `basalt volume info --json`, run inside the controller's container (the CLI in the image).
    fn info(&self) -> Result<Value> {
        let text = docker(&[
            "exec",
            &self.controller,
            "basalt",
            "volume",
            "info",
            "--api",
            "127.0.0.1:9600",
            "--json",
        ])?;
        serde_json::from_str(&text).with_context(|| format!("volume info printed no JSON: {text}"))
    }

    /// The mode (RW, WO, ERR) the controller reports for a compose replica service.
    fn mode(&self, service: &str) -> Result<String> {
        let info = self.info()?;
        let replicas = info["replicas"]
            .as_array()
            .ok_or_else(|| anyhow!("no replicas in {info}"))?;
        let r = replicas
            .iter()
            .find(|r| {
                r["address"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&format!("{service}:"))
            })
            .ok_or_else(|| anyhow!("{service} is not among the replicas: {info}"))?;
        Ok(r["mode"].as_str().unwrap_or_default().to_string())
    }

    fn wait_serving(&self, read_write: usize) -> Result<Value> {
        wait_for(
            &format!("volume {} serving with {read_write} RW replicas", self.name),
            UP_TIMEOUT,
            || {
                let info = self.info()?;
                let rw = info["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["mode"] == "RW")
                    .count();
                Ok((info["state"] == "serving" && rw == read_write).then_some(info))
            },
        )
    }

    fn wait_mode(&self, service: &str, mode: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("{service} in mode {mode}"), timeout, || {
            Ok((self.mode(service)? == mode).then_some(()))
        })
    }

    /// Writes `data` at offset 0 through qemu's iSCSI driver from the host; qemu-img flushes before it exits,
    /// so on success the data is acknowledged as durable.
    fn write(&self, data: &[u8]) -> Result<()> {
        let src = self.scratch.path().join(format!("write-{}.raw", rand_suffix()));
        std::fs::write(&src, data)?;
        run(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(self.url()))?;
        Ok(())
    }

    /// Starts writing `data` in the background; the caller injects a fault, then waits for the writer.
    fn write_in_background(&self, data: &[u8]) -> Result<std::process::Child> {
        let src = self.scratch.path().join(format!("write-{}.raw", rand_suffix()));
        std::fs::write(&src, data)?;
        Ok(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(self.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Reads the first `len` bytes of the volume through iSCSI from the host.
    fn read(&self, len: u64) -> Result<Vec<u8>> {
        let dst = self.scratch.path().join(format!("read-{}.raw", rand_suffix()));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.url())
            .arg(&dst))?;
        let mut data = std::fs::read(&dst)?;
        data.truncate(len as usize);
        Ok(data)
    }

    fn assert_reads_back(&self, expected: &[u8], when: &str) {
        let got = self
            .read(expected.len() as u64)
            .unwrap_or_else(|e| panic!("reading back {when}: {e:#}"));
        if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
            panic!("data differs {when} at byte {at} (block {})", at / 4096);
        }
        assert_eq!(got.len(), expected.len(), "short read {when}");
    }

    fn logs(&self) -> String {
        let mut text = self
            .compose(&["logs", "--no-color", "--tail", "40"])
            .unwrap_or_else(|e| format!("{e:#}"));
        for c in &self.extra {
            text.push_str(&format!("\n--- {c} ---\n"));
            let out = Command::new("docker").args(["logs", "--tail", "40", c]).output();
            if let Ok(o) = out {
                text.push_str(&String::from_utf8_lossy(&o.stdout));
                text.push_str(&String::from_utf8_lossy(&o.stderr));
            }
        }
        text
    }
}

impl Drop for VolumeSet {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- logs of compose project {} ---\n{}",
                self.project,
                self.logs()
            );
        }
        for c in &self.extra {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        if let Err(e) = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]) {
            eprintln!("cleaning up compose project {} failed: {e:#}", self.project);
        }
    }
}

fn rand_suffix() -> String {
    let b = basalt_tests::random_bytes(6);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid_v4() -> String {
    let mut b = basalt_tests::random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether the binary in the image can rebuild a returning replica (a `replica add` command). Until it can,
/// a returning replica stays out of the volume (ERR), which the tests check instead.
fn rebuild_supported(image: &str) -> bool {
    docker(&["run", "--rm", "--read-only", image, "replica", "add", "--help"]).is_ok()
}

// ---------------------------------------------------------------------------------------------------------------
// The image on its own
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn image_is_scratch_non_root_with_a_self_probing_healthcheck() {
    let image = image();
    let config: Value = serde_json::from_str(&docker(&["image", "inspect", &image]).unwrap()).unwrap();
    let config = &config[0]["Config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/local/bin/basalt"]));
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/basalt", "health"])
    );
    // Nothing but the binary and what it links: no shell to exec into.
    let shell = Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "/bin/sh", &image, "-c", "true"])
        .output();
    assert!(
        !shell.unwrap().status.success(),
        "the image must not contain a shell"
    );
    let version = docker(&[
        "run",
        "--rm",
        "--read-only",
        "--cap-drop",
        "ALL",
        &image,
        "--version",
    ])
    .unwrap();
    assert!(version.starts_with("basalt "), "{version}");
}

#[test]
fn host_names_resolve_inside_the_image() {
    let image = image();
    let tag = format!("basalt-dns-{}-{}", std::process::id(), rand_suffix());
    docker(&["network", "create", &tag]).unwrap();
    let volume = format!("{tag}-data");
    // A peer on the network under a container name and an alias: an iSCSI target from the same image.
    let peer = docker(&[
        "run",
        "-d",
        "--read-only",
        "--name",
        &tag,
        "--network",
        &tag,
        "--network-alias",
        "peer.basalt.test",
        "-v",
        &format!("{volume}:/data"),
        &image,
        "serve-file",
        "--file",
        "/data/lun",
        "--size",
        "1M",
    ]);
    let probe = |addr: &str| {
        let out = Command::new("docker")
            .args([
                "run",
                "--rm",
                "--read-only",
                "--network",
                &tag,
                "-e",
                &format!("BASALT_VOLUME_SECRET={}", basalt_tests::TEST_VOLUME_SECRET),
                &image,
                "health",
                "--timeout",
                "1s",
                "--replica",
                addr,
            ])
            .output()
            .expect("docker run");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let result = std::panic::catch_unwind(|| {
        peer.as_ref().expect("the peer container starts");
        // The peer is an iSCSI target, not a replica: the probe resolves, connects and then times out waiting
        // for a Basalt frame. What matters is that it got past name resolution.
        for addr in [format!("{tag}:3260"), "peer.basalt.test:3260".to_string()] {
            let err = wait_for(&format!("{addr} reachable"), Duration::from_secs(20), || {
                let e = probe(&addr);
                Ok((!e.contains("cannot connect")).then_some(e))
            })
            .unwrap();
            assert!(
                !err.contains("cannot resolve"),
                "{addr} did not resolve in the image: {err}"
            );
            assert!(
                err.contains("did not answer") || err.contains("closed"),
                "{addr}: {err}"
            );
        }
        let unknown = probe("no-such-peer.basalt.test:3260");
        assert!(
            unknown.contains("cannot resolve"),
            "an unknown name is a resolver error: {unknown}"
        );
    });
    let _ = docker(&["rm", "-f", &tag]);
    let _ = docker(&["network", "rm", &tag]);
    let _ = docker(&["volume", "rm", &volume]);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A volume as containers
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn compose_volume_serves_host_initiators_and_reports_healthy() {
    let set = VolumeSet::up("serves");
    let listing = stdout(
        run(Command::new("iscsi-ls").args(["-s", &format!("iscsi://127.0.0.1:{}", set.iscsi_port)])).unwrap(),
    );
    assert!(
        listing.contains(&format!("{IQN_PREFIX}:{}", set.name)),
        "{listing}"
    );
    let data = random_image(VOLUME_SIZE);
    set.write(&data).unwrap();
    set.assert_reads_back(&data, "after a write from the host");
    let info = set.info().unwrap();
    assert_eq!(info["volume_uuid"], set.volume_id.as_str(), "{info}");
    assert_eq!(info["size_bytes"], VOLUME_SIZE, "{info}");
    for service in ["controller", "replica1", "replica2", "replica3"] {
        let c = set.container(service).unwrap();
        wait_for(&format!("{service} healthy"), UP_TIMEOUT, || {
            let status = docker(&["inspect", "--format", "{{.State.Health.Status}}", &c])?;
            Ok((status == "healthy").then_some(()))
        })
        .unwrap();
        let user = docker(&[
            "inspect",
            "--format",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
            &c,
        ])
        .unwrap();
        assert_eq!(
            user, "65532:65532 true",
            "{service} runs non-root on a read-only root"
        );
    }
    // Published on the loopback interface only.
    let ports = docker(&["port", &set.controller, "3260/tcp"]).unwrap();
    assert_eq!(ports, format!("127.0.0.1:{}", set.iscsi_port));
}

#[test]
fn killed_replica_goes_err_while_io_continues_and_comes_back() {
    let set = VolumeSet::up("kill-replica");
    let first = random_image(VOLUME_SIZE);
    set.write(&first).unwrap();
    let second = random_image(VOLUME_SIZE);
    let writer = set.write_in_background(&second).unwrap();
    thread::sleep(Duration::from_millis(300));
    let replica = set.container("replica2").unwrap();
    docker(&["kill", &replica]).unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the write must survive a replica kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    set.assert_reads_back(&second, "with replica2 killed");
    set.wait_mode("replica2", "ERR", FAULT_TIMEOUT).unwrap();
    assert_eq!(set.info().unwrap()["state"], "serving");

    docker(&["start", &replica]).unwrap();
    let probe = docker(&[
        "exec",
        &replica,
        "basalt",
        "health",
        "--replica",
        "127.0.0.1:9700",
    ]);
    wait_for("replica2 answering again", UP_TIMEOUT, || {
        Ok(docker(&[
            "exec",
            &replica,
            "basalt",
            "health",
            "--replica",
            "127.0.0.1:9700",
        ])
        .ok())
    })
    .unwrap_or_else(|e| panic!("{e:#} (first probe: {probe:?})"));
    if rebuild_supported(&set.image) {
        set.wait_mode("replica2", "RW", Duration::from_secs(120)).unwrap();
    } else {
        // No rebuild yet: a returning replica missed writes and must not be read from. It stays ERR.
        thread::sleep(Duration::from_secs(3));
        assert_eq!(
            set.mode("replica2").unwrap(),
            "ERR",
            "a stale replica must not return to RW without a rebuild"
        );
    }
    set.assert_reads_back(&second, "after replica2 returned");
}

#[test]
fn disconnected_replica_goes_err_and_reconnects() {
    let set = VolumeSet::up("disconnect");
    let network = set.network().unwrap();
    let replica = set.container("replica3").unwrap();
    docker(&["network", "disconnect", &network, &replica]).unwrap();
    // The controller notices on the next I/O that replica3 does not answer (its replica timeout).
    let data = random_image(VOLUME_SIZE);
    set.write(&data).unwrap();
    set.wait_mode("replica3", "ERR", FAULT_TIMEOUT).unwrap();
    set.assert_reads_back(&data, "with replica3 cut off");

    docker(&["network", "connect", "--alias", "replica3", &network, &replica]).unwrap();
    // Probed from inside the controller's container, whose environment names the controller as the role of
    // its HEALTHCHECK: the --replica flag must win (issue 6). A failed probe is the `last` error reported.
    wait_for(
        "replica3 reachable from the controller by name",
        UP_TIMEOUT,
        || {
            docker(&[
                "exec",
                &set.controller,
                "basalt",
                "health",
                "--replica",
                "replica3:9700",
            ])
            .map(Some)
        },
    )
    .unwrap();
    if rebuild_supported(&set.image) {
        set.wait_mode("replica3", "RW", Duration::from_secs(120)).unwrap();
    } else {
        assert_eq!(
            set.mode("replica3").unwrap(),
            "ERR",
            "a stale replica must not return to RW without a rebuild"
        );
    }
    set.assert_reads_back(&data, "after replica3 reconnected");
}

#[test]
fn new_controller_container_serves_flushed_data_at_a_higher_epoch() {
    let mut set = VolumeSet::up("failover");
    let data = random_image(VOLUME_SIZE);
    set.write(&data).unwrap();
    let old_epoch = set.info().unwrap()["epoch"].as_u64().expect("an epoch");
    let network = set.network().unwrap();
    docker(&["kill", &set.controller]).unwrap();

    // Another controller container (another name, another host port) on the same replicas.
    let name = format!("{}-controller2", set.project);
    let secret_env = format!("BASALT_VOLUME_SECRET={}", basalt_tests::TEST_VOLUME_SECRET);
    let token_env = format!("BASALT_API_TOKEN={}", basalt_tests::TEST_API_TOKEN);
    set.iscsi_port = basalt_tests::free_port().unwrap();
    let publish = format!("127.0.0.1:{}:3260", set.iscsi_port);
    set.extra.push(name.clone());
    let (size, vid, vname) = (VOLUME_SIZE.to_string(), set.volume_id.clone(), set.name.clone());
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &network,
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--sysctl",
        "net.ipv4.ip_unprivileged_port_start=0",
        "-p",
        &publish,
        "-e",
        "BASALT_HEALTH_API=127.0.0.1:9600",
        "-e",
        &secret_env,
        "-e",
        &token_env,
        &set.image,
        "controller",
        "--name",
        &vname,
        "--size",
        &size,
        "--volume-id",
        &vid,
        "--iscsi",
        "0.0.0.0:3260",
        "--api",
        "0.0.0.0:9600",
    ];
    for r in ["replica1:9700", "replica2:9700", "replica3:9700"] {
        args.extend(["--replica", r]);
    }
    docker(&args).unwrap();
    set.controller = name;
    let info = set.wait_serving(3).unwrap();
    let new_epoch = info["epoch"].as_u64().unwrap();
    assert!(
        new_epoch > old_epoch,
        "the new controller must fence the old epoch: {old_epoch} -> {new_epoch}"
    );
    set.assert_reads_back(&data, "through the new controller");
}

#[test]
fn compose_down_and_up_keeps_the_data() {
    let mut set = VolumeSet::up("down-up");
    let data = random_image(VOLUME_SIZE);
    set.write(&data).unwrap();
    set.compose(&["down", "-t", "20"]).unwrap();
    set.compose(&["up", "-d"]).unwrap();
    set.controller = set.container("controller").unwrap();
    set.wait_serving(3).unwrap();
    set.assert_reads_back(&data, "after compose down and up");
}
