//! Several hosts sharing etcd, made by the test as network namespaces (tests/harness/netns.rs): on each
//! host an etcd member (one cluster of three) and a `basalt agent` (`cluster: etcd` listing every member,
//! a zone label of its own, a pool in a temporary directory, the API on the host's address), driven through
//! the CLI from inside a host as a user would:
//! * `basalt node ls` shows the three nodes up with their zones; a 3-replica volume gets one replica per host;
//! * SIGKILL one etcd member: the cluster still creates volumes;
//! * every etcd member down: the volume keeps serving I/O, the API refuses control operations and reads with
//!   503 `store_unavailable`, health says `degraded`; etcd back: everything works again, no restart;
//! * bad input: an agent configured with unreachable etcd endpoints exits with an error naming them; three
//!   replicas asked of a cluster with two nodes up, and a cordon of an unknown node, are refused clearly and
//!   change nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_tests::netns::{EtcdCluster, Network, ETCD_CLIENT_PORT};
use basalt_tests::volume::qemu_io_with;
use basalt_tests::{basalt_binary, wait_for, Daemon, StopPolicy};
use serde_json::Value;

/// Starting etcd, three agents and a volume's services on two cores shared with builds.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const HOSTS: usize = 3;
const API_PORT: u16 = 9700;

/// The hosts, their etcd members and agents; dropped agents first, the network last.
struct Cluster {
    agents: Vec<Option<Daemon>>,
    /// Process groups of agents (their services live in them), killed whatever the outcome.
    groups: Vec<i32>,
    etcd: EtcdCluster,
    network: Network,
    dir: tempfile::TempDir,
    token_file: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for g in &self.groups {
            // SAFETY: plain syscall on the process group of an agent this test started.
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let network = Network::new(HOSTS).unwrap();
        let etcd = EtcdCluster::start(&network, dir.path()).unwrap();
        let token_file = dir.path().join("api-token");
        std::fs::write(&token_file, basalt_proto::auth::hex(&rand::random::<[u8; 32]>())).unwrap();
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut cluster = Cluster {
            agents: (0..HOSTS).map(|_| None).collect(),
            groups: Vec::new(),
            etcd,
            network,
            dir,
            token_file,
        };
        for i in 0..HOSTS {
            let config = cluster.write_config(i, &EtcdCluster::endpoints(&cluster.network));
            cluster.start_agent(i, &config);
        }
        cluster
    }

    fn write_config(&self, i: usize, endpoints: &[String]) -> PathBuf {
        let host = self.network.host(i);
        let d = self.dir.path().join(format!("host{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let config = d.join("agent.yaml");
        let endpoints = endpoints.join(", ");
        std::fs::write(
            &config,
            format!(
                "node:\n  name: host{i}\n  address: {addr}\n  labels:\n    zone: zone-{i}\n  ports: 20000-20100\n\
                 data_dir: {d}/data\n\
                 pools:\n  - name: p0\n    path: {d}/pool0\n    capacity: 4G\n\
                 cluster:\n  store: etcd\n  etcd:\n    endpoints: [{endpoints}]\n    lease_ttl: 5s\n\
                 endpoints:\n  api:\n    listen: {addr}:{API_PORT}\n    token_file: {token}\n\
                 runtime:\n  kind: process\n  binary: {bin}\n",
                addr = host.address,
                d = d.display(),
                token = self.token_file.display(),
                bin = basalt_binary().unwrap().display(),
            ),
        )
        .unwrap();
        config
    }

    fn agent_command(&self, i: usize, config: &Path) -> Command {
        let mut cmd = self.network.command(i, basalt_binary().unwrap());
        cmd.arg("agent").arg("--config").arg(config);
        cmd
    }

    fn start_agent(&mut self, i: usize, config: &Path) {
        let agent = Daemon::spawn(
            &format!("agent-host{i}"),
            self.agent_command(i, config),
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(30),
            },
        )
        .unwrap();
        self.groups.push(agent.pid() as i32);
        self.agents[i] = Some(agent);
    }

    fn api(&self, i: usize) -> String {
        format!("http://{}:{API_PORT}", self.network.host(i).address)
    }

    /// `basalt ARGS` from inside host `i`, against its agent: (succeeded, stdout, stderr).
    fn cli(&self, i: usize, args: &[&str]) -> (bool, String, String) {
        let out = self
            .network
            .command(i, basalt_binary().unwrap())
            .args(args)
            .arg("--agent")
            .arg(self.api(i))
            .arg("--token-file")
            .arg(&self.token_file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn json(&self, i: usize, args: &[&str]) -> Option<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let (ok, out, _) = self.cli(i, &args);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    /// `GET /v1/health` of host `i`'s agent, from inside the host.
    fn health(&self, i: usize) -> Option<Value> {
        let out = self
            .network
            .command(i, "curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("{}/v1/health", self.api(i)))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `node ls` (asked of host `i`) shows each of `names` up, and the others down.
    fn wait_nodes_up(&self, i: usize, names: &[&str]) -> Value {
        let mut last = None;
        let result = wait_for("the nodes' states", READY_TIMEOUT, || {
            last = self.json(i, &["node", "ls"]);
            last.as_ref().is_some_and(|v| {
                let nodes = v["nodes"].as_array().unwrap();
                nodes.len() == HOSTS
                    && nodes.iter().all(|n| {
                        let name = n["name"].as_str().unwrap();
                        n["up"].as_bool() == Some(names.contains(&name))
                    })
            })
        });
        if let Err(e) = result {
            panic!("{e}: last seen {last:#?}\n{}", self.logs());
        }
        last.unwrap()
    }

    fn wait_ready(&self, i: usize, volume: &str) -> Value {
        let mut last = None;
        let ready = wait_for(&format!("volume {volume} to be ready"), READY_TIMEOUT, || {
            last = self.json(i, &["volume", "inspect", volume]);
            last.as_ref().is_some_and(|v| v["phase"] == "ready")
        });
        if let Err(e) = ready {
            panic!("{e}: last seen {last:#?}\n{}", self.logs());
        }
        last.unwrap()
    }

    /// qemu-io from inside host `i` at the volume's iSCSI URL.
    fn io(&self, i: usize, url: &str, commands: &[&str]) -> (bool, String) {
        qemu_io_with(self.network.command(i, "qemu-io"), url, commands).unwrap()
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .flatten()
            .map(|a| a.plain_log())
            .map(|l| {
                l.lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n-----\n")
    }
}

fn replica_nodes(view: &Value) -> Vec<String> {
    let mut nodes: Vec<String> = view["placement"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes
}

#[test]
fn three_hosts_share_etcd_spread_replicas_and_survive_etcd_failures() {
    let mut cluster = Cluster::start();
    let all = ["host0", "host1", "host2"];

    // Three nodes up, each with its zone.
    let nodes = cluster.wait_nodes_up(0, &all);
    for node in nodes["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        assert_eq!(node["labels"]["zone"], format!("zone-{}", &name[4..]), "{node:#}");
    }
    let health = cluster.health(1).unwrap();
    assert_eq!(health["status"], "ok", "{health:#}");
    assert_eq!(health["store"]["kind"], "etcd");
    assert_eq!(health["store"]["shared"], true);

    // A 3-replica volume: one replica per host.
    let (ok, _, err) = cluster.cli(
        1,
        &["volume", "create", "spread", "--size", "64M", "--replicas", "3"],
    );
    assert!(ok, "{err}");
    let view = cluster.wait_ready(0, "spread");
    assert_eq!(replica_nodes(&view), all, "{view:#}");
    let url = view["iscsi_url"].as_str().unwrap().to_string();
    let (ok, out) = cluster.io(2, &url, &["write -P 0xa1 0 1M", "read -P 0xa1 0 1M"]);
    assert!(ok, "{out}");

    // SIGKILL one etcd member: the other two are a majority, and the cluster still creates volumes.
    cluster.etcd.kill_member(2);
    let (ok, _, err) = cluster.cli(
        2,
        &[
            "volume",
            "create",
            "after-kill",
            "--size",
            "64M",
            "--replicas",
            "3",
        ],
    );
    assert!(ok, "a create with one etcd member down: {err}");
    let view = cluster.wait_ready(1, "after-kill");
    assert_eq!(replica_nodes(&view), all, "{view:#}");
    cluster.etcd.start_member(&cluster.network, 2).unwrap();

    // Every member down: the volume serves, the API refuses what needs the store, health says so.
    for i in 0..HOSTS {
        cluster.etcd.kill_member(i);
    }
    let (ok, out) = cluster.io(
        0,
        &url,
        &["write -P 0xb2 1M 1M", "read -P 0xa1 0 1M", "read -P 0xb2 1M 1M"],
    );
    assert!(ok, "I/O while etcd is down: {out}");
    let (ok, _, err) = cluster.cli(0, &["volume", "create", "refused", "--size", "64M"]);
    assert!(!ok, "a create without the store succeeded");
    assert!(
        err.contains("store_unavailable") || err.contains("unavailable"),
        "{err}"
    );
    assert!(
        err.contains(&format!(":{ETCD_CLIENT_PORT}")),
        "the error names the endpoints: {err}"
    );
    let (ok, _, err) = cluster.cli(1, &["volume", "ls"]);
    assert!(!ok && err.contains("unavailable"), "{err}");
    let health = cluster.health(0).unwrap();
    assert_eq!(health["status"], "degraded", "{health:#}");
    assert_eq!(health["store"]["available"], false, "{health:#}");
    // The agents still run (they wait for the store; they do not exit).
    for agent in cluster.agents.iter_mut().flatten() {
        agent.check_running().unwrap();
    }

    // etcd back: control operations work again, without restarting anything.
    for i in 0..HOSTS {
        cluster.etcd.start_member(&cluster.network, i).unwrap();
    }
    wait_for("health ok again", READY_TIMEOUT, || {
        cluster.health(0).is_some_and(|h| h["status"] == "ok")
    })
    .unwrap();
    let mut created = false;
    wait_for("a create after etcd came back", READY_TIMEOUT, || {
        let (ok, _, err) = cluster.cli(0, &["volume", "create", "after-outage", "--size", "64M"]);
        created = ok || err.contains("exists");
        created
    })
    .unwrap();
    cluster.wait_ready(2, "after-outage");
    let (ok, out) = cluster.io(1, &url, &["read -P 0xa1 0 1M", "read -P 0xb2 1M 1M"]);
    assert!(ok, "{out}");

    // Bad input. An agent configured with etcd endpoints nobody serves: a clear error within a bounded wait.
    let nowhere = [format!("http://10.77.254.1:{ETCD_CLIENT_PORT}")];
    let config = cluster.write_config(0, &nowhere);
    let started = Instant::now();
    let out = cluster.agent_command(0, &config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an agent without reachable etcd started");
    assert!(
        err.contains("10.77.254.1:2379") && err.contains("did not answer"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );

    // Two nodes up (host2's agent stopped: its lease is revoked), three replicas asked: refused, nothing made.
    cluster.agents[2] = None;
    cluster.wait_nodes_up(0, &["host0", "host1"]);
    let (ok, _, err) = cluster.cli(
        0,
        &["volume", "create", "three", "--size", "64M", "--replicas", "3"],
    );
    assert!(!ok, "three replicas on two nodes were accepted");
    assert!(err.contains("node"), "the error says what was missing: {err}");
    assert!(
        cluster.json(0, &["volume", "inspect", "three"]).is_none(),
        "the refused volume exists"
    );

    // A cordon of a node nobody registered: refused, naming it.
    let (ok, _, err) = cluster.cli(1, &["node", "cordon", "host9"]);
    assert!(!ok && err.contains("host9"), "{err}");
    let nodes = cluster.json(1, &["node", "ls"]).unwrap();
    assert!(
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["cordoned"] == false),
        "{nodes:#}"
    );
}
