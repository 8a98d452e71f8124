//! A volume's life under a real `basalt agent` process (embedded store, `process` runtime, three pools in
//! temporary directories, service ports from a free range), driven through the CLI as a user would:
//! create a 3-replica volume, wait until it is ready, write and read it with qemu-io at the iSCSI URL
//! `volume inspect` gives and through the agent's iSCSI login redirector (which refuses an unknown target by
//! name), kill -9 the agent and start it again (the services keep running and are adopted:
//! the data reads back, the controller process is the same), expand it online, delete it, and find its
//! data directories gone. Twice: with the services as child processes, and as containers on the real Docker
//! engine (the `docker` runtime, image from images/build.sh).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use basalt_agent::runtime::process::{process_start_time, RunRecord};
use basalt_tests::volume::qemu_io;
use basalt_tests::{basalt_binary, free_port, free_port_range, wait_for, Daemon, IscsiUrl, StopPolicy};
use serde_json::Value;

/// Starting the agent, three replicas and a controller on two cores shared with builds.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Ports the node's services may use: three replicas and a controller's two need five.
const SERVICE_PORTS: u16 = 16;

/// Kills the process group of an agent that was killed with SIGKILL: its services (in its group) outlive
/// it by design, and are adopted by the next agent; whatever the test's outcome, none may stay behind.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: plain syscall on the process group of an agent this test started.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// How the agent under test runs its services.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Process,
    Docker,
}

/// Removes the containers of a docker-runtime agent's node, whatever the test's outcome.
struct RemoveContainers(String);

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        let filter = format!("label=io.basalt.node={}", self.0);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

struct Setup {
    kind: Kind,
    node: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    api: SocketAddr,
    /// `endpoints.iscsi_redirector` (the embedded store has none by default; set here to test it).
    redirector: SocketAddr,
    token_file: PathBuf,
}

impl Setup {
    fn new(kind: Kind) -> Setup {
        Setup::with_third_pool(kind, None)
    }

    /// Three pools, the third a block device when `device` is given.
    fn with_third_pool(kind: Kind, device: Option<&Path>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let node = format!("life{:08x}", rand::random::<u32>());
        let runtime = match kind {
            Kind::Process => format!(
                "  kind: process\n  binary: {}\n",
                basalt_binary().unwrap().display()
            ),
            Kind::Docker => format!(
                "  kind: docker\n  docker_socket: /var/run/docker.sock\n  image: {}\n",
                basalt_tests::agent_image().unwrap()
            ),
        };
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let redirector = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let (first, last) = free_port_range(SERVICE_PORTS);
        let token_file = dir.path().join("api-token");
        std::fs::write(&token_file, basalt_proto::auth::hex(&rand::random::<[u8; 32]>())).unwrap();
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let d = dir.path().display();
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "node:\n  name: {node}\n  address: 127.0.0.1\n  ports: {first}-{last}\n\
                 data_dir: {d}/data\n\
                 pools:\n  - name: p0\n    path: {d}/pool0\n    capacity: 4G\n  - name: p1\n    path: {d}/pool1\n    capacity: 4G\n  - name: p2\n    {third}\n\
                 cluster:\n  store: embedded\n\
                 endpoints:\n  api:\n    listen: {api}\n    token_file: {}\n  iscsi_redirector: {redirector}\n\
                 runtime:\n{runtime}",
                token_file.display(),
                third = match device {
                    Some(dev) => format!("device: {}", dev.display()),
                    None => format!("path: {d}/pool2\n    capacity: 4G"),
                },
            ),
        )
        .unwrap();
        Setup {
            kind,
            node,
            dir,
            config,
            api,
            redirector,
            token_file,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start_agent(&self, name: &str) -> Daemon {
        let mut cmd = Command::new(basalt_binary().unwrap());
        cmd.arg("agent").arg("--config").arg(&self.config);
        let mut agent = Daemon::spawn(
            name,
            cmd,
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(30),
            },
        )
        .unwrap();
        agent.wait_for_port(self.api, READY_TIMEOUT).unwrap();
        agent
    }

    /// `basalt ARGS --agent URL --agent-token-file F`: (succeeded, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(basalt_binary().unwrap())
            .args(args)
            .arg("--agent")
            .arg(format!("http://{}", self.api))
            .arg("--agent-token-file")
            .arg(&self.token_file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn inspect(&self, volume: &str) -> Option<Value> {
        let (ok, out, _) = self.cli(&["volume", "inspect", volume, "--json"]);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    fn wait_ready(&self, volume: &str) -> Value {
        let mut last = None;
        let ready = wait_for(&format!("volume {volume} to be ready"), READY_TIMEOUT, || {
            last = self.inspect(volume);
            last.as_ref().is_some_and(|v| v["phase"] == "ready")
        });
        if let Err(e) = ready {
            panic!("{e}: last seen {last:#?}");
        }
        last.unwrap()
    }
}

fn controller_record(data_dir: &Path, volume: &str) -> RunRecord {
    let path = data_dir.join("run").join(volume).join("controller.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

impl Setup {
    /// The running controller's identity (process: pid and start time; docker: container id and start
    /// time), `None` when it does not run: the same value later means the same running controller.
    fn controller(&self, volume: &str) -> Option<String> {
        match self.kind {
            Kind::Process => {
                let rec = controller_record(&self.data_dir(), volume);
                (process_start_time(rec.pid) == Some(rec.start_time))
                    .then(|| format!("{}/{}", rec.pid, rec.start_time))
            }
            Kind::Docker => {
                let name = format!("basalt-{}-{volume}-controller", self.node);
                let out = Command::new("docker")
                    .args([
                        "inspect",
                        "--format",
                        "{{.Id}} {{.State.Running}} {{.State.StartedAt}}",
                        &name,
                    ])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (out.status.success() && text.contains(" true ")).then_some(text)
            }
        }
    }
}

fn controller_record_pid(identity: &str) -> u32 {
    identity.split('/').next().and_then(|p| p.parse().ok()).unwrap()
}

fn url_of(view: &Value) -> IscsiUrl {
    let text = view["iscsi_url"]
        .as_str()
        .expect("a ready volume has an iSCSI URL");
    IscsiUrl::parse(text)
}

/// kill -9 the agent, and reap it before its guard drops: a guard that found it still running would
/// stop its whole group, services included.
fn kill_agent(mut agent: Daemon) {
    // SAFETY: plain syscall on the agent process this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    assert!(
        agent.wait_for_exit(READY_TIMEOUT).unwrap().is_some(),
        "the agent survived SIGKILL"
    );
}

fn io(url: &IscsiUrl, commands: &[&str]) {
    let (ok, out) = qemu_io(url, commands).unwrap();
    assert!(ok, "qemu-io {commands:?}: {out}");
}

#[test]
fn a_volume_is_created_served_kept_across_an_agent_kill_expanded_and_deleted_with_its_data() {
    life_cycle(Kind::Process);
}

/// The same life with every replica and the controller as containers on the real Docker engine.
#[test]
fn the_same_life_cycle_with_the_services_as_docker_containers() {
    life_cycle(Kind::Docker);
}

fn life_cycle(kind: Kind) {
    let setup = Setup::new(kind);
    let _containers = RemoveContainers(setup.node.clone());
    let agent = setup.start_agent("agent-1");
    let _group = KillGroup(agent.pid() as i32);

    let (ok, out, err) = setup.cli(&[
        "volume",
        "create",
        "life",
        "--size",
        "64M",
        "--replicas",
        "3",
        "--json",
    ]);
    assert!(ok, "volume create: {out}{err}");
    let view = setup.wait_ready("life");
    assert_eq!(view["replicas"], 3);
    let uuid = view["uuid"].as_str().unwrap().to_string();
    let url = url_of(&view);
    io(&url, &["write -P 0xa5 0 1M", "write -P 0x3c 63M 1M"]);
    // The same LUN through the agent's iSCSI redirector, which sends the login on to the controller.
    let redirected = IscsiUrl {
        portal: setup.redirector,
        ..url.clone()
    };
    io(&redirected, &["read -P 0xa5 0 1M", "write -P 0x5a 2M 1M"]);
    let unknown = IscsiUrl {
        portal: setup.redirector,
        iqn: "iqn.2026-11.io.basalt:no-such-volume".to_string(),
        lun: 0,
    };
    let (ok, out) = qemu_io(&unknown, &["read 0 4k"]).unwrap();
    assert!(!ok && out.contains("Target not found"), "{out}");
    // Three pools on one node: one replica in each.
    for i in 0..3 {
        let pool = setup.dir.path().join(format!("pool{i}")).join(&uuid);
        assert_eq!(
            std::fs::read_dir(&pool).map(|d| d.count()).unwrap_or(0),
            1,
            "{}",
            pool.display()
        );
    }

    // kill -9 the agent: the volume keeps serving, and a new agent adopts its services.
    let controller = setup.controller("life").expect("the controller runs");
    kill_agent(agent);
    assert_eq!(
        setup.controller("life").as_ref(),
        Some(&controller),
        "services outlive the agent"
    );
    io(&url, &["read -P 0xa5 0 1M"]);
    let agent = setup.start_agent("agent-2");
    let view = setup.wait_ready("life");
    assert_eq!(url_of(&view), url);
    io(&url, &["read -P 0xa5 0 1M", "read -P 0x3c 63M 1M"]);
    io(&redirected, &["read -P 0x5a 2M 1M"]);
    assert_eq!(
        setup.controller("life").as_ref(),
        Some(&controller),
        "the controller was adopted"
    );

    // Online expansion: the new end becomes writable without a restart.
    let (ok, out, err) = setup.cli(&["volume", "expand", "life", "--size", "128M"]);
    assert!(ok, "volume expand: {out}{err}");
    wait_for("the volume to grow to 128 MiB", READY_TIMEOUT, || {
        qemu_io(&url, &["write -P 0x77 127M 1M"]).is_ok_and(|(ok, _)| ok)
    })
    .unwrap();
    io(&url, &["read -P 0x77 127M 1M", "read -P 0xa5 0 1M"]);
    assert_eq!(
        setup.controller("life").as_ref(),
        Some(&controller),
        "grown online"
    );

    // Deletion: the record, the services and the data go.
    let (ok, out, err) = setup.cli(&["volume", "rm", "life"]);
    assert!(ok, "volume rm: {out}{err}");
    wait_for("the volume to be deleted", READY_TIMEOUT, || {
        setup.inspect("life").is_none()
    })
    .unwrap();
    for i in 0..3 {
        let pool = setup.dir.path().join(format!("pool{i}")).join(&uuid);
        assert!(!pool.exists(), "{} is left", pool.display());
    }
    if kind == Kind::Process {
        assert_eq!(
            process_start_time(controller_record_pid(&controller)),
            None,
            "the controller stopped"
        );
    } else {
        assert_eq!(
            setup.controller("life"),
            None,
            "the controller's container is gone"
        );
    }
    let (ok, out, _) = setup.cli(&["volume", "ls", "--json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["volumes"].as_array().map(Vec::len), Some(0), "{out}");
    agent.stop().unwrap();
}

/// The rest of the first test of issue 15 section 4, through the CLI against a real agent: a snapshot, a
/// clone of it that reads the data as of the snapshot (not what was written after), both kept across an
/// agent kill -9, QoS limits changed through the agent, the snapshot's removal as the replicas' rules say
/// (refused while a clone still copies it), and both volumes deleted with their data.
#[test]
fn a_snapshot_is_cloned_kept_across_an_agent_kill_and_everything_is_deleted() {
    let setup = Setup::new(Kind::Process);
    let agent = setup.start_agent("agent-1");
    let _group = KillGroup(agent.pid() as i32);

    let (ok, out, err) = setup.cli(&["volume", "create", "src", "--size", "64M", "--replicas", "3"]);
    assert!(ok, "volume create: {out}{err}");
    let view = setup.wait_ready("src");
    let src_uuid = view["uuid"].as_str().unwrap().to_string();
    let src_url = url_of(&view);
    io(&src_url, &["write -P 0x5a 0 1M", "write -P 0xc3 40M 1M"]);

    let (ok, out, err) = setup.cli(&["snapshot", "create", "--volume", "src", "s1"]);
    assert!(ok, "snapshot create: {out}{err}");
    let (ok, out, err) = setup.cli(&["snapshot", "ls", "--volume", "src", "--json"]);
    assert!(ok, "snapshot ls: {out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["s1"], "{out}");

    // Written after the snapshot: the clone must not see it.
    io(&src_url, &["write -P 0x11 0 1M", "write -P 0x22 40M 1M"]);

    let (ok, out, err) = setup.cli(&[
        "volume",
        "create",
        "copy",
        "--from-snapshot",
        "src/s1",
        "--replicas",
        "3",
    ]);
    assert!(ok, "clone create: {out}{err}");
    let view = setup.wait_ready("copy");
    assert_eq!(
        view["size_bytes"],
        64 << 20,
        "a clone defaults to its source's size"
    );
    assert_eq!(view["source"]["volume"], "src");
    assert_eq!(view["source"]["snapshot"], "s1");
    let copy_uuid = view["uuid"].as_str().unwrap().to_string();
    let copy_url = url_of(&view);
    io(&copy_url, &["read -P 0x5a 0 1M", "read -P 0xc3 40M 1M"]);
    io(&src_url, &["read -P 0x11 0 1M", "read -P 0x22 40M 1M"]);

    // QoS through the agent: the limit is in the record the view shows.
    let (ok, out, err) = setup.cli(&["volume", "qos", "copy", "--read-iops", "5000", "--json"]);
    assert!(ok, "volume qos: {out}{err}");
    let view = setup.inspect("copy").expect("the clone exists");
    assert_eq!(view["qos"]["read_iops"], 5000, "{view:#}");
    let (ok, out, err) = setup.cli(&[
        "volume",
        "qos",
        "copy",
        "--read-iops",
        "10",
        "--read-iops-burst",
        "20",
    ]);
    assert!(!ok, "a burst the agent cannot keep was accepted: {out}");
    assert!(err.contains("--read-iops-burst"), "{err}");
    io(&copy_url, &["write -P 0x77 8M 1M", "read -P 0x77 8M 1M"]);

    // kill -9 the agent and start another: both volumes read as before.
    kill_agent(agent);
    let agent = setup.start_agent("agent-2");
    let copy_view = setup.wait_ready("copy");
    assert_eq!(url_of(&copy_view), copy_url);
    assert_eq!(
        copy_view["qos"]["read_iops"], 5000,
        "the limit outlives the agent"
    );
    assert_eq!(url_of(&setup.wait_ready("src")), src_url);
    io(
        &copy_url,
        &["read -P 0x5a 0 1M", "read -P 0xc3 40M 1M", "read -P 0x77 8M 1M"],
    );
    io(&src_url, &["read -P 0x11 0 1M", "read -P 0x22 40M 1M"]);

    // The snapshot goes once no clone copies it any more: until then each attempt is refused, naming why.
    wait_for("the snapshot to be removable", READY_TIMEOUT, || {
        let (ok, out, err) = setup.cli(&["snapshot", "rm", "--volume", "src", "s1"]);
        assert!(
            ok || err.contains("held by"),
            "snapshot rm failed for another reason than a clone's hold: {out}{err}"
        );
        ok
    })
    .unwrap();
    let (ok, out, err) = setup.cli(&["snapshot", "ls", "--volume", "src", "--json"]);
    assert!(ok, "snapshot ls: {out}{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["snapshots"].as_array().map(Vec::len), Some(0), "{out}");
    io(&copy_url, &["read -P 0x5a 0 1M", "read -P 0xc3 40M 1M"]);

    for (volume, uuid) in [("copy", &copy_uuid), ("src", &src_uuid)] {
        let (ok, out, err) = setup.cli(&["volume", "rm", volume]);
        assert!(ok, "volume rm {volume}: {out}{err}");
        wait_for(&format!("volume {volume} to be deleted"), READY_TIMEOUT, || {
            setup.inspect(volume).is_none()
        })
        .unwrap();
        for i in 0..3 {
            let pool = setup.dir.path().join(format!("pool{i}")).join(uuid);
            assert!(!pool.exists(), "{} is left", pool.display());
        }
    }
    agent.stop().unwrap();
}

/// `basalt ARGS` run in `cwd` with no agent token given by flag or environment.
fn cli_without_token(cwd: &Path, api: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new(basalt_binary().unwrap())
        .args(args)
        .arg("--agent")
        .arg(format!("http://{api}"))
        .env_remove("BASALT_AGENT_TOKEN")
        .env_remove("BASALT_AGENT_TOKEN_FILE")
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// With no `token_file` the agent generates a token into DATA_DIR/api-token (0600), keeps it across a
/// restart, logs where it is and never the token; a CLI on the host finds it at the default agent's
/// path, and one that has none is told which flag or variable to set.
#[test]
fn without_a_token_file_the_agent_generates_one_keeps_it_and_never_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
    let (first, last) = free_port_range(SERVICE_PORTS);
    let config = dir.path().join("agent.yaml");
    // The default data directory, relative to where the agent runs.
    std::fs::write(
        &config,
        format!(
            "node:\n  name: tok{:08x}\n  address: 127.0.0.1\n  ports: {first}-{last}\n\
             pools:\n  - name: p0\n    path: {d}/pool0\n    capacity: 1G\n\
             endpoints:\n  api:\n    listen: {api}\n\
             runtime:\n  kind: process\n  binary: {}\n",
            rand::random::<u32>(),
            basalt_binary().unwrap().display()
        ),
    )
    .unwrap();
    let start = || {
        let mut cmd = Command::new(basalt_binary().unwrap());
        cmd.arg("agent")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path());
        let mut agent = Daemon::spawn(
            "agent",
            cmd,
            dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(30),
            },
        )
        .unwrap();
        agent.wait_for_port(api, READY_TIMEOUT).unwrap();
        agent
    };
    let agent = start();
    let token_file = dir.path().join("basalt-data/_agent/api-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    assert!(token.len() >= 32, "a generated token: {} bytes", token.len());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // The CLI in the agent's directory finds the default agent's token.
    let (ok, out) = cli_without_token(dir.path(), api, &["volume", "ls"]);
    assert!(ok, "{out}");
    // Elsewhere, with no token: refused, told what to set; nothing is created.
    let elsewhere = tempfile::tempdir().unwrap();
    let (ok, out) = cli_without_token(elsewhere.path(), api, &["volume", "create", "x", "--size", "1G"]);
    assert!(!ok);
    assert!(
        out.contains("requires a token")
            && out.contains("--agent-token-file")
            && out.contains("BASALT_AGENT_TOKEN_FILE")
            && out.contains("BASALT_AGENT_TOKEN"),
        "{out}"
    );
    let (ok, out) = cli_without_token(dir.path(), api, &["volume", "ls", "--json"]);
    assert!(ok && out.contains("\"volumes\":[]"), "{out}");

    drop(agent);
    let agent = start();
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap().trim(),
        token,
        "the token is kept across a restart"
    );
    drop(agent);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains("api-token"),
        "the log says where the token is: {log}"
    );
    assert!(!log.contains(token), "the log shows the token");
}

/// A config with a typo stops the agent before it does anything: the error names the key, the file
/// and the line, and no data directory is created.
#[test]
fn a_config_with_a_typo_is_refused_by_key_file_and_line_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: {}/data\nendpoints:\n  api:\n    listen: 127.0.0.1:1\n    tokn_file: /etc/x\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(basalt_binary().unwrap())
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tokn_file")
            && stderr.contains("token_file")
            && stderr.contains("agent.yaml")
            && stderr.contains(":5"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "the agent created its data directory"
    );
}

/// A replica on a block-device pool (a loop device): deleting its volume wipes the store on the device
/// (its first 64 KiB read as zeros again, nothing of the written data left), so a later volume can
/// neither read the old data nor take the device for a replica. Needs root for losetup, like
/// tests/blockdev.rs (tests/run.sh runs it with --ignored as root).
#[test]
#[ignore = "needs root and loop devices; tests/run.sh runs it as root"]
fn deleting_a_volume_wipes_its_replica_on_a_block_device_pool() {
    let backing_dir = tempfile::tempdir().unwrap();
    let backing = backing_dir.path().join("pool.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(256 << 20))
        .unwrap();
    let dev = basalt_tests::host::LoopDevice::attach(&backing).unwrap();
    let setup = Setup::with_third_pool(Kind::Process, Some(dev.device()));
    let agent = setup.start_agent("agent");
    let _group = KillGroup(agent.pid() as i32);
    let (ok, out, err) = setup.cli(&["volume", "create", "wiped", "--size", "64M", "--replicas", "3"]);
    assert!(ok, "volume create: {out}{err}");
    let view = setup.wait_ready("wiped");
    io(&url_of(&view), &["write -P 0x5a 0 4M"]);
    let head = |len: usize| {
        let mut buf = vec![0u8; len];
        std::io::Read::read_exact(&mut std::fs::File::open(dev.device()).unwrap(), &mut buf).unwrap();
        buf
    };
    assert_eq!(&head(8), b"BASALTBD", "the replica formatted the device");

    let (ok, out, err) = setup.cli(&["volume", "rm", "wiped"]);
    assert!(ok, "volume rm: {out}{err}");
    wait_for("the volume to be deleted", READY_TIMEOUT, || {
        setup.inspect("wiped").is_none()
    })
    .unwrap();
    assert!(
        head(64 << 10).iter().all(|&b| b == 0),
        "the device's signature region is not blank"
    );
    // The data clusters are given back by a discard, which a loop device does when the filesystem under
    // its file punches holes; where it cannot, the bytes stay (no store reads them again: clusters are
    // zeroed before they are handed out).
    let loop_name = dev.device().file_name().unwrap().to_string_lossy().into_owned();
    let discards = std::fs::read_to_string(format!("/sys/block/{loop_name}/queue/discard_max_bytes"))
        .is_ok_and(|v| v.trim() != "0");
    if discards {
        let all = std::fs::read(dev.device()).unwrap();
        let pattern = vec![0x5au8; 4096];
        assert!(
            !all.chunks(4096).any(|c| c == pattern.as_slice()),
            "the volume's data is still on the device"
        );
    } else {
        eprintln!("{loop_name} does not discard: the data region was not checked");
    }
    agent.stop().unwrap();
}
