//! The agent's Docker volume plugin on the real Docker engine (legacy plugin protocol, API 1.41).
//!
//! Each test runs its own `basalt agent` (embedded store, three pools in a temporary directory, the
//! `process` runtime) serving the plugin on `/run/docker/plugins/basalt-ID.sock`, so Docker knows it as
//! the driver `basalt-ID` and tests can run side by side. Containers run a small image built here from
//! Debian's busybox-static (FROM scratch: there is no registry). Volumes attach through this machine's
//! user-space path (qemu-storage-daemon's FUSE export under a loop device: no kernel iSCSI here).
//!
//! Whatever a test's outcome, [`Env`]'s drop removes its containers, services, volumes, the swarm it
//! joined, and then whatever the agent left attached on the host (mounts, loop devices, daemons).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use basalt_agent::host::{AttachMethod, Host};
use basalt_agent::runtime::process::{process_start_time, RunRecord};
use basalt_tests::{basalt_binary, free_port, wait_for, Daemon, StopPolicy};
use serde_json::Value;

/// An agent's start and a volume's first attach, on two cores shared with builds.
const TIMEOUT: Duration = Duration::from_secs(180);
/// Ports for the services: a few volumes of three replicas and a controller each.
const SERVICE_PORTS: u16 = 40;

/// `n` consecutive free ports below the ephemeral range, picked at random (concurrent tests rarely meet).
fn free_port_range(n: u16) -> (u16, u16) {
    for _ in 0..1000 {
        let first = 20000 + rand::random::<u16>() % 10000;
        if (first..first + n).all(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok()) {
            return (first, first + n - 1);
        }
    }
    panic!("no {n} consecutive free ports between 20000 and 30000");
}

/// `docker ARGS`: (succeeded, stdout, stderr).
fn docker(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker").args(args).output().expect("docker runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn docker_ok(args: &[&str]) -> String {
    let (ok, out, err) = docker(args);
    assert!(ok, "docker {args:?} failed: {out}\n{err}");
    out
}

/// The test image: busybox-static, FROM scratch, every applet linked in /bin. Built once per content.
fn image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed (tests/setup.sh)");
            let tag = format!("basalt-test-busybox:{:08x}", crc32fast::hash(&busybox));
            if !docker(&["image", "inspect", &tag]).0 {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("busybox"), &busybox).unwrap();
                std::fs::set_permissions(
                    dir.path().join("busybox"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .unwrap();
                std::fs::write(
                    dir.path().join("Dockerfile"),
                    "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
                     ENV PATH=/bin\n",
                )
                .unwrap();
                docker_ok(&["build", "-q", "-t", &tag, &dir.path().display().to_string()]);
            }
            tag
        })
        .clone()
}

/// One agent serving the plugin `basalt-ID`, and everything the test creates with it.
struct Env {
    id: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    api: SocketAddr,
    token_file: PathBuf,
    agent: Option<Daemon>,
    /// The agent's process group (its services run in it), killed at the end.
    group: i32,
    swarm: bool,
}

impl Env {
    fn new() -> Env {
        let id = format!("{:08x}", rand::random::<u32>());
        let dir = tempfile::tempdir().unwrap();
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let (first, last) = free_port_range(SERVICE_PORTS);
        let token_file = dir.path().join("api-token");
        std::fs::write(&token_file, basalt_proto::auth::hex(&rand::random::<[u8; 32]>())).unwrap();
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let d = dir.path().display();
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "node:\n  name: dp{id}\n  address: 127.0.0.1\n  ports: {first}-{last}\n\
                 data_dir: {d}/data\n\
                 pools:\n  - name: p0\n    path: {d}/pool0\n    capacity: 4G\n  - name: p1\n    path: {d}/pool1\n    capacity: 4G\n  - name: p2\n    path: {d}/pool2\n    capacity: 4G\n\
                 endpoints:\n  api:\n    listen: {api}\n    token_file: {}\n  docker: /run/docker/plugins/basalt-{id}.sock\n\
                 runtime:\n  kind: process\n  binary: {}\n",
                token_file.display(),
                basalt_binary().unwrap().display(),
            ),
        )
        .unwrap();
        let mut env = Env {
            id,
            dir,
            config,
            api,
            token_file,
            agent: None,
            group: 0,
            swarm: false,
        };
        env.start_agent();
        env
    }

    fn driver(&self) -> String {
        format!("basalt-{}", self.id)
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/docker/plugins/basalt-{}.sock", self.id))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A volume name unique to this test.
    fn volume(&self, name: &str) -> String {
        format!("{name}-{}", self.id)
    }

    fn mountpoint(&self, volume: &str) -> PathBuf {
        self.data_dir().join("docker/mounts").join(volume)
    }

    fn start_agent(&mut self) {
        let mut cmd = Command::new(basalt_binary().unwrap());
        cmd.arg("agent").arg("--config").arg(&self.config);
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        let mut agent = Daemon::spawn(
            &format!("agent-{n}"),
            cmd,
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(30),
            },
        )
        .unwrap();
        if self.group == 0 {
            self.group = agent.pid() as i32;
        }
        let socket = self.socket();
        agent
            .wait_until("the plugin socket", TIMEOUT, || {
                UnixStream::connect(&socket).is_ok()
            })
            .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
        self.agent = Some(agent);
    }

    /// kill -9 the agent alone (not its group: the services and the attach daemons outlive it).
    fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("the agent runs");
        // SAFETY: plain syscall on the agent process this test started.
        unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
        assert!(
            agent.wait_for_exit(TIMEOUT).unwrap().is_some(),
            "the agent survived SIGKILL"
        );
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// `basalt ARGS...` against this test's agent.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(basalt_binary().unwrap())
            .args(args)
            .arg("--agent")
            .arg(format!("http://{}", self.api))
            .arg("--agent-token-file")
            .arg(&self.token_file)
            .output()
            .unwrap()
    }

    /// `basalt volume inspect NAME --json` through the agent's API.
    fn inspect(&self, volume: &str) -> Option<Value> {
        let out = self.cli(&["volume", "inspect", volume, "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// One plugin call straight on the socket, as dockerd makes it: (HTTP status, body).
    fn plugin_call(&self, call: &str, body: &Value) -> (u16, Value) {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        let body = body.to_string();
        write!(
            s,
            "POST /{call} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let status = answer[9..12].parse().unwrap();
        let json = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(json).unwrap_or(Value::Null))
    }

    /// `docker run [FIRST...] --label basalt-test=ID -v VOLUME:/data IMAGE sh -c SCRIPT`.
    fn docker_run(&self, first: &[&str], volume: &str, script: &str) -> (bool, String, String) {
        let label = format!("basalt-test={}", self.id);
        let mount = format!("{volume}:/data");
        let image = image();
        let mut args = vec!["run"];
        args.extend_from_slice(first);
        args.extend_from_slice(&["--label", &label, "-v", &mount, &image, "sh", "-c", script]);
        docker(&args)
    }

    /// A container that runs `script` with the volume at /data and is removed: (ok, stdout, stderr).
    fn run(&self, volume: &str, script: &str) -> (bool, String, String) {
        self.docker_run(&["--rm"], volume, script)
    }

    /// The same in the background (`docker run -d`), named; answers the container name.
    fn run_detached(&self, name: &str, volume: &str, script: &str) -> String {
        let name = format!("{name}-{}", self.id);
        let (ok, out, err) = self.docker_run(&["-d", "--name", &name], volume, script);
        assert!(ok, "docker run -d {name}: {out}\n{err}");
        name
    }

    fn create(&self, volume: &str, opts: &[&str]) -> (bool, String, String) {
        let driver = self.driver();
        let mut args = vec!["volume", "create", "-d", &driver];
        for o in opts {
            args.push("-o");
            args.push(o);
        }
        args.push(volume);
        docker(&args)
    }

    /// The host's attachment record of a volume (the user-space daemon's pid), if attached.
    fn attachment(&self, volume: &str) -> Option<basalt_agent::host::AttachRecord> {
        let host = Host::with_method(&self.data_dir(), AttachMethod::UserSpace).unwrap();
        host.attachment(&basalt_engine::name::VolumeName::new(volume).unwrap())
            .unwrap()
    }

    /// Waits until the volume is unmounted, detached on the host and detached in the store.
    fn wait_released(&self, volume: &str) {
        let mountpoint = self.mountpoint(volume);
        let mut last = None;
        let released = wait_for(&format!("volume {volume} to be released"), TIMEOUT, || {
            last = self.inspect(volume);
            !basalt_agent::host::mount::is_mounted(&mountpoint)
                && self.attachment(volume).is_none()
                && last.as_ref().is_some_and(|v| v["attached_to"].is_null())
        });
        if let Err(e) = released {
            panic!("{e}: last seen {last:#?}\nagent log:\n{}", self.agent_log());
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let label = format!("label=basalt-test={}", self.id);
        if self.swarm {
            let _ = docker(&["swarm", "leave", "--force"]);
        }
        let (_, ids, _) = docker(&["ps", "-aq", "--filter", &label]);
        for id in ids.split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        let (_, names, _) = docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("driver={}", self.driver()),
        ]);
        for name in names.split_whitespace() {
            let _ = docker(&["volume", "rm", "-f", name]);
        }
        drop(self.agent.take());
        if self.group != 0 {
            // SAFETY: plain syscall on the process group of the agent this test started (its services).
            unsafe { libc::kill(-self.group, libc::SIGKILL) };
        }
        if let Ok(host) = Host::with_method(&self.data_dir(), AttachMethod::UserSpace) {
            for r in host.attachments().unwrap_or_default() {
                for m in &r.mounts {
                    let _ = Command::new("umount").arg("-l").arg(&m.target).status();
                }
                if let Err(e) = host.detach(&r.volume) {
                    eprintln!("cleanup: detaching {}: {e}", r.volume);
                }
            }
        }
        let _ = std::fs::remove_file(self.socket());
    }
}

fn replica_pid(env: &Env, volume: &str, id: u32) -> u32 {
    let path = env
        .data_dir()
        .join("run")
        .join(volume)
        .join(format!("replica-{id}.json"));
    let rec: RunRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        process_start_time(rec.pid),
        Some(rec.start_time),
        "replica {id} runs"
    );
    rec.pid
}

fn file_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_volume_is_created_shared_by_containers_survives_a_replica_kill_and_an_agent_restart() {
    let mut env = Env::new();
    let v1 = env.volume("v1");
    let (ok, out, err) = env.create(&v1, &["size=256M", "replicas=3"]);
    assert!(ok, "{out}{err}\n{}", env.agent_log());

    // ls and inspect show it, from the cluster's record.
    let ls = docker_ok(&[
        "volume",
        "ls",
        "--filter",
        &format!("driver={}", env.driver()),
        "--format",
        "{{.Name}}",
    ]);
    assert_eq!(ls.lines().collect::<Vec<_>>(), [v1.as_str()]);
    let inspect: Value = serde_json::from_str(&docker_ok(&["volume", "inspect", &v1])).unwrap();
    assert_eq!(inspect[0]["Driver"], env.driver());
    assert_eq!(inspect[0]["Status"]["size"], "256 MiB");
    assert_eq!(inspect[0]["Status"]["replicas"], 3);
    assert_eq!(inspect[0]["Scope"], "local", "the embedded store is one host's");

    // One container writes, another reads the same bytes back.
    let (ok, sums, err) = env.run(
        &v1,
        "for i in 1 2 3 4; do dd if=/dev/urandom of=/data/f$i bs=1M count=4 2>/dev/null; done; \
         cd /data && md5sum f1 f2 f3 f4 > sums && cat sums && sync",
    );
    assert!(ok, "{err}\n{}", env.agent_log());
    assert_eq!(sums.lines().count(), 4, "{sums}");
    env.wait_released(&v1);
    let (ok, again, err) = env.run(&v1, "cd /data && md5sum f1 f2 f3 f4");
    assert!(ok, "{err}");
    assert_eq!(again, sums, "a second container reads identical files");
    env.wait_released(&v1);

    // A replica SIGKILLed while a container writes: nothing is lost.
    let writer = env.run_detached(
        "writer",
        &v1,
        "i=0; while [ $i -lt 40 ]; do dd if=/dev/urandom of=/data/w$i bs=256k count=4 2>/dev/null; \
         i=$((i+1)); done; sync; cd /data && md5sum w* > wsums && sync",
    );
    let mountpoint = env.mountpoint(&v1);
    wait_for("the writer to be under way", TIMEOUT, || {
        mountpoint.join("w5").exists()
    })
    .unwrap();
    let pid = replica_pid(&env, &v1, 2);
    // SAFETY: plain syscall on a replica process of this test's agent.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let code = docker_ok(&["wait", &writer]);
    assert_eq!(code, "0", "the writer finished: {}", docker(&["logs", &writer]).2);
    docker_ok(&["rm", &writer]);
    env.wait_released(&v1);
    let (ok, out, err) = env.run(
        &v1,
        "cd /data && md5sum -c wsums >/dev/null && echo intact && md5sum -c sums",
    );
    assert!(ok, "checksums after the replica kill: {out}\n{err}");
    assert!(out.starts_with("intact"), "{out}");
    env.wait_released(&v1);

    // The agent killed and started again while a container has the volume mounted: the container keeps
    // writing throughout, the same attachment is reused, and the unmount afterwards is clean.
    let ticker = env.run_detached(
        "ticker",
        &v1,
        "i=0; while true; do echo $i >> /data/ticks; sync; i=$((i+1)); sleep 0.2; done",
    );
    let ticks = mountpoint.join("ticks");
    wait_for("the ticker to write", TIMEOUT, || file_lines(&ticks) > 3).unwrap();
    let daemon = env.attachment(&v1).unwrap().user_space.unwrap().daemon;
    env.kill_agent();
    let during = file_lines(&ticks);
    wait_for("the ticker to go on while the agent is down", TIMEOUT, || {
        file_lines(&ticks) > during + 5
    })
    .unwrap();
    env.start_agent();
    let after = file_lines(&ticks);
    wait_for("the ticker to go on after the restart", TIMEOUT, || {
        file_lines(&ticks) > after + 5
    })
    .unwrap();
    let record = env.attachment(&v1).expect("still attached");
    assert_eq!(
        record.user_space.unwrap().daemon,
        daemon,
        "the attachment was reused"
    );
    assert_eq!(env.inspect(&v1).unwrap()["attached_to"], format!("dp{}", env.id));
    docker_ok(&["rm", "-f", &ticker]);
    env.wait_released(&v1);
    assert!(!daemon.alive(), "the attach daemon was stopped");
    let (ok, out, err) = env.run(&v1, "wc -l < /data/ticks");
    assert!(ok, "{err}");
    assert!(out.trim().parse::<usize>().unwrap() >= after + 5, "{out}");
    env.wait_released(&v1);

    docker_ok(&["volume", "rm", &v1]);
    wait_for("the volume to be deleted", TIMEOUT, || env.inspect(&v1).is_none()).unwrap();
}

#[test]
fn bad_input_is_refused_with_clear_errors_and_changes_nothing() {
    let env = Env::new();
    let bad = env.volume("bad");
    for (opts, want) in [
        (&["size=64M", "colour=red"][..], "unknown option \"colour\""),
        (&["size=abc"][..], "size=\"abc\""),
        (&["size=64M", "replicas=0"][..], "replicas must be 1 to 16"),
        (&["size=64M", "fs=btrfs"][..], "fs=\"btrfs\""),
        (&["replicas=3"][..], "size is required"),
    ] {
        let (ok, out, err) = env.create(&bad, opts);
        assert!(!ok, "{opts:?} was accepted: {out}");
        assert!(
            err.contains(want),
            "{opts:?}: {want:?} not in the CLI's output {err:?}"
        );
        assert!(env.inspect(&bad).is_none(), "{opts:?} created something");
    }
    let (ok, _, err) = env.create("Upper_case", &["size=64M"]);
    assert!(!ok && err.contains("volume name"), "{err}");

    // A second create of an existing name with another size: the plugin refuses it (Docker itself asks
    // the plugin only for names it does not know; the call is made here as a second host's dockerd would).
    let v = env.volume("v");
    let (ok, out, err) = env.create(&v, &["size=64M"]);
    assert!(ok, "{out}{err}");
    let (status, answer) = env.plugin_call(
        "VolumeDriver.Create",
        &serde_json::json!({"Name": v, "Opts": {"size": "128M"}}),
    );
    assert_eq!(status, 500);
    let msg = answer["Err"].as_str().unwrap();
    assert!(msg.contains("already exists with size 64 MiB"), "{msg}");
    let (status, answer) = env.plugin_call(
        "VolumeDriver.Create",
        &serde_json::json!({"Name": v, "Opts": {"size": "64M"}}),
    );
    assert_eq!(
        (status, &answer),
        (200, &serde_json::json!({})),
        "the same create again is fine"
    );
    let (_, _, err) = env.create(&v, &["size=128M"]);
    assert_eq!(
        env.inspect(&v).unwrap()["size_bytes"],
        64 << 20,
        "{err}: the size did not change"
    );

    // `docker volume rm` of a mounted volume: refused by Docker (it counts users) and by the plugin.
    let holder = env.run_detached("holder", &v, "sleep 600");
    wait_for("the volume to be mounted", TIMEOUT, || {
        basalt_agent::host::mount::is_mounted(&env.mountpoint(&v))
    })
    .unwrap();
    let (ok, _, err) = docker(&["volume", "rm", &v]);
    assert!(!ok && err.contains("in use"), "{err}");
    let (status, answer) = env.plugin_call("VolumeDriver.Remove", &serde_json::json!({"Name": v}));
    assert_eq!(status, 500);
    assert!(
        answer["Err"].as_str().unwrap().contains("in use by 1 container"),
        "{answer}"
    );
    assert!(env.inspect(&v).is_some(), "nothing was deleted");
    docker_ok(&["rm", "-f", &holder]);
    env.wait_released(&v);
    docker_ok(&["volume", "rm", &v]);

    // Calls the protocol does not have, and bodies that are not JSON.
    let (status, answer) = env.plugin_call("VolumeDriver.Explode", &serde_json::json!({}));
    assert!(
        status == 500 && answer["Err"].as_str().unwrap().contains("not a call"),
        "{answer}"
    );
    let (status, answer) = env.plugin_call(
        "VolumeDriver.Mount",
        &serde_json::json!({"Name": "nope-vol", "ID": "x"}),
    );
    assert!(
        status == 500 && answer["Err"].as_str().unwrap().contains("no Basalt volume"),
        "{answer}"
    );
}

/// Docker silently creates a *local* volume when a plugin forgets one: after an agent restart, Get and
/// List still answer from the cluster store and `docker run -v` gets the Basalt volume with its data.
#[test]
fn a_restarted_agent_still_answers_get_and_list_so_docker_never_makes_a_local_volume() {
    let mut env = Env::new();
    let v = env.volume("kept");
    let (ok, out, err) = env.create(&v, &["size=64M", "replicas=2"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = env.run(&v, "echo before > /data/mark && sync");
    assert!(ok, "{err}");
    env.wait_released(&v);
    env.kill_agent();
    env.start_agent();

    let (status, answer) = env.plugin_call("VolumeDriver.List", &serde_json::json!({}));
    assert_eq!(status, 200);
    let names: Vec<&str> = answer["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["Name"].as_str())
        .collect();
    assert_eq!(names, [v.as_str()]);
    let (status, answer) = env.plugin_call("VolumeDriver.Get", &serde_json::json!({"Name": v}));
    assert_eq!(status, 200, "{answer}");
    let caps = env
        .plugin_call("VolumeDriver.Capabilities", &serde_json::json!({}))
        .1;
    assert_eq!(caps["Capabilities"]["Scope"], "local");

    let (ok, out, err) = env.run(&v, "cat /data/mark");
    assert!(ok, "{err}");
    assert_eq!(out, "before");
    let inspect: Value = serde_json::from_str(&docker_ok(&["volume", "inspect", &v])).unwrap();
    assert_eq!(inspect.as_array().unwrap().len(), 1);
    assert_eq!(inspect[0]["Driver"], env.driver(), "no local volume of that name");
    env.wait_released(&v);
}

/// `basalt volume expand` on a volume a running container uses: the plugin grows the device and, where
/// the host allows it, the filesystem under the container; a filesystem that cannot grow while mounted
/// (ext4 when the agent lacks CAP_SYS_RESOURCE, as on this project's machines) is grown at the next
/// mount, and the agent says why in its log. Either way the files stay and the new space is usable.
fn grow_under_a_container(fs: &str, size_mib: u64, grown_mib: u64, online: bool, fill_mib: u64) {
    let env = Env::new();
    let v = env.volume(&format!("grow{fs}"));
    let (ok, out, err) = env.create(
        &v,
        &[&format!("size={size_mib}M"), "replicas=2", &format!("fs={fs}")],
    );
    assert!(ok, "{out}{err}");
    let script = "echo kept > /data/mark && sync && while true; do sleep 1; done";
    let c = env.run_detached("grower", &v, script);
    let df_kib = |c: &str| -> u64 {
        // busybox df -k: a header line, then "FILESYSTEM 1K-BLOCKS USED AVAILABLE USE% MOUNTED-ON".
        let out = docker_ok(&["exec", c, "df", "-k", "/data"]);
        let line = out.lines().last().unwrap_or_default().to_string();
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("df -k /data: {out}"))
    };
    wait_for("the container to see its file", TIMEOUT, || {
        docker(&["exec", &c, "cat", "/data/mark"]).1 == "kept"
    })
    .unwrap();
    let before = df_kib(&c);
    assert!(
        before <= size_mib << 10,
        "a {size_mib} MiB volume shows {before} KiB"
    );
    // The filesystem counts as grown once it holds more than the old volume could.
    let grown = |kib: u64| kib > size_mib << 10;

    let out = env.cli(&["volume", "expand", &v, "--size", &format!("{grown_mib}M")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fill = format!("dd if=/dev/zero of=/data/big bs=1M count={fill_mib} 2>&1 && sync && cat /data/mark");
    if online {
        if let Err(e) = wait_for("the container's filesystem to grow", TIMEOUT, || {
            grown(df_kib(&c))
        }) {
            panic!(
                "{e}: df shows {} KiB\nagent log:\n{}",
                df_kib(&c),
                env.agent_log()
            );
        }
        // The agent logs the growth once its grow step returns, a moment after df can see it.
        let said = wait_for("the agent to log the online growth", TIMEOUT, || {
            env.agent_log().contains("volume grown online")
        });
        assert!(said.is_ok(), "{}", env.agent_log());
        let (ok, out, err) = docker(&["exec", &c, "sh", "-c", &fill]);
        assert!(ok, "writing past the old size: {out}{err}");
        assert!(out.ends_with("kept"), "{out}");
    } else {
        let said = wait_for("the agent to say why the filesystem cannot grow", TIMEOUT, || {
            env.agent_log().contains("CAP_SYS_RESOURCE")
        });
        if let Err(e) = said {
            panic!("{e}\nagent log:\n{}", env.agent_log());
        }
        assert_eq!(df_kib(&c), before, "the mounted filesystem kept its size");
    }
    let record = env.attachment(&v).expect("still attached");
    assert_eq!(record.size_bytes, grown_mib << 20, "the device grew");

    docker_ok(&["rm", "-f", &c]);
    env.wait_released(&v);
    let c = env.run_detached("reader", &v, "while true; do sleep 1; done");
    assert!(grown(df_kib(&c)), "grown at the next mount: {} KiB", df_kib(&c));
    if !online {
        let (ok, out, err) = docker(&["exec", &c, "sh", "-c", &fill]);
        assert!(ok, "writing past the old size: {out}{err}");
    }
    let (ok, out, err) = docker(&["exec", &c, "sh", "-c", "stat -c %s /data/big && cat /data/mark"]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("{}\nkept", fill_mib << 20));
    docker_ok(&["rm", "-f", &c]);
    env.wait_released(&v);
}

#[test]
fn an_ext4_volume_grows_under_its_container_or_at_its_next_mount() {
    let online = basalt_agent::host::mount::may_grow_ext4_online();
    grow_under_a_container("ext4", 64, 256, online, 100);
}

/// xfs grows online with CAP_SYS_ADMIN alone (which mounting needs anyway); mkfs.xfs makes nothing
/// under 300 MiB.
#[test]
fn an_xfs_volume_grows_online_under_its_container() {
    grow_under_a_container("xfs", 320, 512, true, 16);
}

/// Swarm: a service's task mounts a volume the plugin creates from the service's options, writes; the
/// service is removed and created again and its new task finds the data.
#[test]
fn a_swarm_service_created_again_finds_its_data() {
    let mut env = Env::new();
    let (ok, _, err) = docker(&[
        "swarm",
        "init",
        "--advertise-addr",
        "127.0.0.1",
        "--listen-addr",
        "127.0.0.1:2377",
    ]);
    if !ok && err.contains("already part of a swarm") {
        panic!("this host is already in a swarm (another test's?): {err}");
    }
    assert!(ok, "{err}");
    env.swarm = true;
    let v2 = env.volume("v2");
    let service = format!("svc-{}", env.id);
    let mount = format!(
        "type=volume,source={v2},target=/data,volume-driver={},volume-opt=size=256M",
        env.driver()
    );
    let create = |script: &str| {
        docker_ok(&[
            "service",
            "create",
            "--detach",
            "--no-resolve-image",
            "--name",
            &service,
            "--container-label",
            &format!("basalt-test={}", env.id),
            "--restart-condition",
            "none",
            "--mount",
            &mount,
            &image(),
            "sh",
            "-c",
            script,
        ])
    };
    let mountpoint = env.mountpoint(&v2);
    create("echo from-the-first-task > /data/f && sync && sleep 600");
    wait_for("the first task to write", TIMEOUT, || {
        std::fs::read_to_string(mountpoint.join("f")).is_ok_and(|s| s.contains("from-the-first-task"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", docker(&["service", "ps", "--no-trunc", &service]).1));
    docker_ok(&["service", "rm", &service]);
    env.wait_released(&v2);

    create("cat /data/f > /data/seen && sync && sleep 600");
    wait_for("the second task to read", TIMEOUT, || {
        std::fs::read_to_string(mountpoint.join("seen")).is_ok_and(|s| s.contains("from-the-first-task"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", docker(&["service", "ps", "--no-trunc", &service]).1));
    docker_ok(&["service", "rm", &service]);
    env.wait_released(&v2);
    docker_ok(&["swarm", "leave", "--force"]);
    env.swarm = false;
    // The task's container is gone with the service; the volume stays until removed.
    wait_for("the service's containers to go", TIMEOUT, || {
        docker(&["ps", "-aq", "--filter", &format!("label=basalt-test={}", env.id)])
            .1
            .is_empty()
    })
    .unwrap();
    docker_ok(&["volume", "rm", &v2]);
    let _ = &mut env;
}

/// Removes a managed plugin whatever the test's outcome.
struct RemovePlugin(String);

impl Drop for RemovePlugin {
    fn drop(&mut self) {
        let _ = docker(&["plugin", "disable", "-f", &self.0]);
        let _ = docker(&["plugin", "rm", "-f", &self.0]);
    }
}

/// The managed plugin is made offline (images/plugin/build.sh: a rootfs exported from an image, its
/// config.json) and `docker plugin create` takes it: the engine knows it as a volume driver with the
/// propagated mount and the rights attaching needs.
#[test]
fn the_managed_plugin_is_created_offline_from_an_exported_rootfs() {
    let name = format!("basalt-pkg-{:08x}:latest", rand::random::<u32>());
    let dir = tempfile::tempdir().unwrap();
    let plugin_dir = dir.path().join("plugin");
    let _remove = RemovePlugin(name.clone());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/plugin/build.sh");
    let out = Command::new(script)
        .env("BASALT_BIN", basalt_binary().unwrap())
        .args(["--name", &name, "--dir"])
        .arg(&plugin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rootfs = plugin_dir.join("rootfs");
    for file in [
        "usr/local/bin/basalt",
        "usr/bin/qemu-storage-daemon",
        "usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so",
        "etc/basalt/agent.yaml",
    ] {
        assert!(rootfs.join(file).exists(), "{file} is in the rootfs");
    }
    let inspect: Value = serde_json::from_str(&docker_ok(&["plugin", "inspect", &name])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["Interface"]["Types"][0], "docker.volumedriver/1.0");
    assert_eq!(config["Interface"]["Socket"], "basalt.sock");
    assert_eq!(config["PropagatedMount"], "/var/lib/basalt");
    assert_eq!(config["Network"]["Type"], "host");
    assert!(config["Linux"]["Capabilities"]
        .as_array()
        .unwrap()
        .contains(&Value::from("CAP_SYS_ADMIN")));
    assert_eq!(inspect[0]["Enabled"], false);
}
