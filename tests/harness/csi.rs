//! A real `basalt agent` serving CSI on unix sockets (embedded store, `process` runtime, three pools,
//! topology label `zone=a`), and a tonic client for it, for tests/csi.rs and tests/csi_node.rs.
//!
//! The agent runs in its own process group with its services (replicas, controllers, the node's
//! qemu-storage-daemons). [`CsiAgent`]'s drop undoes whatever the node service left on this host (its
//! mounts, then its attachments: loop devices and daemons), and only then kills every process group
//! the test started, so that a failed test leaves nothing mounted or attached behind.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use basalt_agent::csi::pb::controller_client::ControllerClient;
use basalt_agent::csi::pb::{self, volume_capability};
use basalt_agent::host::{AttachMethod, Host};
use tonic::transport::Channel;

use crate::{basalt_binary, free_port, free_port_range, wait_for, Daemon, IscsiUrl, StopPolicy};

/// Starting the agent, three replicas and a controller on two cores shared with builds.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The CSI sockets an agent serves, by their config key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// `endpoints.csi`: every service.
    All,
    Controller,
    Node,
}

impl Socket {
    fn key(self) -> &'static str {
        match self {
            Socket::All => "csi",
            Socket::Controller => "csi_controller",
            Socket::Node => "csi_node",
        }
    }
}

pub struct CsiAgent {
    pub node: String,
    pub api: SocketAddr,
    pub token_file: PathBuf,
    sockets: Vec<(Socket, PathBuf)>,
    config: PathBuf,
    daemon: Option<Daemon>,
    /// Every agent's process group (a restarted agent starts a new one; the services stay in the first).
    groups: Vec<i32>,
    // Last: the agent and its services stop before their directory goes.
    dir: tempfile::TempDir,
}

impl CsiAgent {
    /// An agent serving `sockets`, once each answers.
    pub fn start(sockets: &[Socket]) -> CsiAgent {
        let dir = tempfile::tempdir().unwrap();
        let node = format!("csi{:08x}", rand::random::<u32>());
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let (first, last) = free_port_range(24);
        let token_file = dir.path().join("api-token");
        std::fs::write(&token_file, basalt_proto::auth::hex(&rand::random::<[u8; 32]>())).unwrap();
        let sockets: Vec<(Socket, PathBuf)> = sockets
            .iter()
            .map(|s| (*s, dir.path().join(format!("csi/{}.sock", s.key()))))
            .collect();
        let endpoints: String = sockets
            .iter()
            .map(|(s, p)| format!("  {}: {}\n", s.key(), p.display()))
            .collect();
        let d = dir.path().display();
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "node:\n  name: {node}\n  address: 127.0.0.1\n  ports: {first}-{last}\n  labels: {{zone: a}}\n\
                 data_dir: {d}/data\n\
                 pools:\n  - name: p0\n    path: {d}/pool0\n    capacity: 4G\n  - name: p1\n    path: {d}/pool1\n    capacity: 4G\n  - name: p2\n    path: {d}/pool2\n    capacity: 4G\n\
                 cluster:\n  store: embedded\n\
                 endpoints:\n  api:\n    listen: {api}\n    token_file: {}\n{endpoints}\
                 runtime:\n  kind: process\n  binary: {}\n",
                token_file.display(),
                basalt_binary().unwrap().display(),
            ),
        )
        .unwrap();
        let mut agent = CsiAgent {
            node,
            api,
            token_file,
            sockets,
            config,
            daemon: None,
            groups: Vec::new(),
            dir,
        };
        agent.start_agent();
        agent
    }

    /// Starts (or restarts) the agent process and waits for its API and sockets.
    pub fn start_agent(&mut self) {
        // A killed agent's sockets stay behind: waiting for them must mean the new agent's.
        for (_, path) in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
        let mut cmd = Command::new(basalt_binary().unwrap());
        cmd.arg("agent").arg("--config").arg(&self.config);
        let n = self.groups.len();
        let mut daemon = Daemon::spawn(
            &format!("agent-{n}"),
            cmd,
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(30),
            },
        )
        .unwrap();
        self.groups.push(daemon.pid() as i32);
        daemon
            .wait_for_port(self.api, READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
        let sockets: Vec<PathBuf> = self.sockets.iter().map(|(_, p)| p.clone()).collect();
        daemon
            .wait_until("the CSI sockets", READY_TIMEOUT, || {
                sockets.iter().all(|p| p.exists())
            })
            .unwrap();
        self.daemon = Some(daemon);
    }

    /// kill -9 the agent alone (not its group: the services and the attach daemons outlive it).
    pub fn kill_agent(&mut self) {
        let mut daemon = self.daemon.take().expect("the agent runs");
        // SAFETY: plain syscall on the agent process this test started.
        unsafe { libc::kill(daemon.pid() as i32, libc::SIGKILL) };
        assert!(
            daemon.wait_for_exit(READY_TIMEOUT).unwrap().is_some(),
            "the agent survived SIGKILL"
        );
    }

    /// Every agent's log so far, without colours.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::plain_log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A directory for the test's staging and target paths, removed with the agent's.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join("kubelet").join(name)
    }

    pub fn socket(&self, which: Socket) -> &Path {
        &self
            .sockets
            .iter()
            .find(|(s, _)| *s == which)
            .expect("the agent serves that socket")
            .1
    }

    pub async fn channel(&self, which: Socket) -> Channel {
        connect(self.socket(which)).await
    }

    /// The host's attachments (what the node service attached through the host module).
    pub fn attachments(&self) -> Vec<basalt_agent::host::AttachRecord> {
        Host::with_method(&self.data_dir(), AttachMethod::UserSpace)
            .unwrap()
            .attachments()
            .unwrap()
    }

    /// `basalt volume inspect NAME --json` through the agent's API.
    pub fn inspect(&self, volume: &str) -> Option<serde_json::Value> {
        let out = Command::new(basalt_binary().unwrap())
            .args(["volume", "inspect", volume, "--json", "--agent"])
            .arg(format!("http://{}", self.api))
            .arg("--agent-token-file")
            .arg(&self.token_file)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn wait_ready(&self, volume: &str) -> IscsiUrl {
        let mut last = None;
        if let Err(e) = wait_for(&format!("volume {volume} to be ready"), READY_TIMEOUT, || {
            last = self.inspect(volume);
            last.as_ref().is_some_and(|v| v["phase"] == "ready")
        }) {
            panic!("{e}: last seen {last:#?}");
        }
        IscsiUrl::parse(last.unwrap()["iscsi_url"].as_str().unwrap())
    }

    /// Undo what the node service left (see [`undo_node`]).
    fn undo_host(&self) {
        undo_node(self.dir.path(), &self.data_dir());
    }
}

impl Drop for CsiAgent {
    fn drop(&mut self) {
        self.undo_host();
        drop(self.daemon.take());
        for group in &self.groups {
            // SAFETY: plain syscall on a process group of an agent this test started (its services).
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }
}

/// Undo what a node service left on this machine: every mount under `root` (publications first: they
/// are bind mounts of the staging mounts), then every attachment recorded under the agent's `data_dir`.
/// For a test's drop: a failed test must leave nothing mounted or attached behind.
pub fn undo_node(root: &Path, data_dir: &Path) {
    let root = root.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&root) && !m.ends_with("/lun"))
        .collect();
    // Deepest first, and the last made first (a publication after its staging mount).
    ours.reverse();
    for m in ours {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    if let Ok(host) = Host::with_method(data_dir, AttachMethod::UserSpace) {
        for r in host.attachments().unwrap_or_default() {
            for m in r.mounts.iter().filter(|m| crate::host::is_mounted(&m.target)) {
                let _ = Command::new("umount").arg("-l").arg(&m.target).status();
            }
            // A read-only block publication's loop device over the volume's device (a test that
            // failed before unpublishing leaves it, and it would keep the device busy for good).
            let views = r.device.as_deref().map(basalt_agent::host::attach::loops_over);
            for view in views.and_then(Result::ok).unwrap_or_default() {
                let _ = basalt_agent::host::attach::detach_loop(&view);
            }
            if let Err(e) = host.detach(&r.volume) {
                eprintln!("cleanup: detaching {}: {e}", r.volume);
            }
        }
    }
}

/// NodeStageVolume of `volume` at `staging`.
pub fn stage_request(volume: &str, staging: &Path, cap: pb::VolumeCapability) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// NodePublishVolume of `volume`, staged at `staging`, at `target`.
pub fn publish_request(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

/// NodeUnpublishVolume of `volume` at `target`.
pub fn unpublish_request(volume: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
    }
}

/// NodeUnstageVolume of `volume` at `staging`.
pub fn unstage_request(volume: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
    }
}

/// ControllerUnpublish from `node`, then DeleteVolume: the end of a volume's life cycle.
pub async fn unpublish_and_delete(controller: &mut ControllerClient<Channel>, node: &str, volume: &str) {
    controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// DeleteSnapshot of `id`, retried until it succeeds: a clone of the snapshot that was just deleted
/// still holds it until its deletion finishes in the background.
pub async fn delete_snapshot_once_released(controller: &ControllerClient<Channel>, id: &str) {
    let mut last = None;
    let deleted = wait_for(&format!("snapshot {id} to be deleted"), READY_TIMEOUT, || {
        let rt = tokio::runtime::Handle::current();
        let mut c = controller.clone();
        let id = id.to_string();
        last = Some(tokio::task::block_in_place(|| {
            rt.block_on(async move {
                c.delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await
            })
        }));
        matches!(last, Some(Ok(_)))
    });
    if let Err(e) = deleted {
        panic!("{e}: {last:?}");
    }
}

/// A gRPC channel over the unix socket at `path` (the URI is a placeholder tonic requires).
pub async fn connect(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connecting to the CSI socket")
}

/// Single-node writer, mounted as ext4.
pub fn mount_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Single-node writer, as a block device.
pub fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        ..mount_cap()
    }
}

/// One error case of a table: the RPC, what is wrong with the request, the code the spec gives, and
/// what came back.
pub struct Case {
    rpc: &'static str,
    case: &'static str,
    want: tonic::Code,
    got: Result<(), tonic::Status>,
}

pub fn case<T>(
    rpc: &'static str,
    case: &'static str,
    want: tonic::Code,
    got: Result<T, tonic::Status>,
) -> Case {
    Case {
        rpc,
        case,
        want,
        got: got.map(|_| ()),
    }
}

/// Every case answered with its code (`Ok` for a call that must succeed); the wrong ones listed.
pub fn assert_codes(cases: &[Case]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let got = c.got.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            (got != c.want).then(|| {
                format!(
                    "{} / {}: want {:?}, got {:?} ({:?})",
                    c.rpc, c.case, c.want, got, c.got
                )
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}
