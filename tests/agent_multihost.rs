//! Several hosts sharing etcd, made by the test as network namespaces (tests/harness/netns.rs): on each
//! host an etcd member (one cluster of three) and a `basalt agent` (`cluster: etcd` listing every member,
//! a zone label of its own, a pool in a temporary directory, the API on the host's address), driven through
//! the CLI from inside a host as a user would:
//! * `basalt node ls` shows the three nodes up with their zones; a 3-replica volume gets one replica per host;
//! * SIGKILL one etcd member: the cluster still creates volumes;
//! * every etcd member down: the volume keeps serving I/O, the API refuses control operations and reads with
//!   503 `store_unavailable`, health says `degraded`; etcd back: everything works again, no restart;
//! * etcd over TLS with client certificates: two agents given the CA and a client certificate serve a
//!   2-replica volume; one without a client certificate is refused and names the endpoints;
//! * an agent stopped: its node is down in `node ls`, with the time the others marked it down;
//! * bad input: an agent configured with unreachable etcd endpoints exits with an error naming them; three
//!   replicas asked of a cluster with two nodes up, and a cordon of an unknown node, are refused clearly and
//!   change nothing.
//!
//! Four hosts (each agent with a short `failover.replica_grace`), a writer on the host without a replica
//! writing and flushing slot after slot through qemu-io and recording every acknowledged write:
//! * the controller's host cut off: the controller moves to a host with a replica (generation and epoch
//!   up), the partitioned one acknowledges nothing, the writer follows the URL `volume inspect` gives; the
//!   link back, the old host's controller stops; every acknowledged write reads back;
//! * meanwhile a second writer on the same host keeps one initiator session for the whole episode, logged
//!   in through its host's iSCSI redirector (`endpoints.iscsi_redirector`, on by default with etcd), as the
//!   Docker plugin's and the CSI node's attachments are: it goes on writing after the move in the same
//!   process, nobody telling it where the controller went;
//! * a replica's host cut past the grace period: a replacement on the free host is rebuilt and the
//!   membership updated (not before the grace); the host back deletes its retired replica's data;
//! * every agent SIGKILLed and started again: the volume whole again, every acknowledged write there;
//! * `basalt node drain` of the controller's host while a session through a redirector writes: the replica
//!   rebuilt on the free host, the controller moved, the session following it; every acknowledged write there.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use basalt_tests::netns::{EtcdCluster, EtcdTls, Network, ETCD_CLIENT_PORT};
use basalt_tests::volume::qemu_io_with;
use basalt_tests::{basalt_binary, wait_for, Daemon, StopPolicy};
use serde_json::Value;

/// Starting etcd, three agents and a volume's services on two cores shared with builds.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Who runs when. The four-host test and the soak check time (no replica replaced before
/// `failover.replica_grace`, with node leases of 5 s); with the other tests' clusters beside them (a
/// dozen etcd members and agents on two cores) an agent could miss its lease renewals before the cut,
/// and the cluster then rightly counted the grace from that lapse. They run alone; the other tests of
/// this file run side by side.
static TURNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A turn of a test that checks time: no other test of this file runs meanwhile.
fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    TURNS.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A turn of a test that may share the machine with others of this file (but not with [`alone`]'s).
fn alongside() -> std::sync::RwLockReadGuard<'static, ()> {
    TURNS.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
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
    /// `failover.replica_grace` of every agent.
    grace: Duration,
    /// etcd serves TLS and checks client certificates; the agents get the CA and a client certificate.
    tls: Option<EtcdTls>,
    /// Every agent serves CSI on `hostN/csi.sock`, and mounts in this machine's mount namespace.
    csi: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.csi {
            for i in 0..self.agents.len() {
                let d = self.host_dir(i);
                basalt_tests::csi::undo_node(&d, &d.join("data"));
            }
        }
        self.agents.clear();
        for g in &self.groups {
            // SAFETY: plain syscall on the process group of an agent this test started.
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
    }
}

impl Cluster {
    /// `hosts` hosts, each with an etcd member and an agent whose replicas are replaced after `grace`.
    fn start(hosts: usize, grace: Duration) -> Cluster {
        Cluster::start_with(hosts, grace, false, false)
    }

    /// With `tls`, etcd serves its clients over TLS and checks their certificates; with `csi`, every
    /// agent serves CSI (see [`Cluster::csi_socket`]).
    fn start_with(hosts: usize, grace: Duration, tls: bool, csi: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let network = Network::new(hosts).unwrap();
        let tls = tls.then(|| EtcdTls::generate(&network, dir.path()).unwrap());
        let etcd = EtcdCluster::start_with(&network, dir.path(), tls.clone()).unwrap();
        let token_file = dir.path().join("api-token");
        std::fs::write(&token_file, basalt_proto::auth::hex(&rand::random::<[u8; 32]>())).unwrap();
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut cluster = Cluster {
            agents: (0..hosts).map(|_| None).collect(),
            groups: Vec::new(),
            etcd,
            network,
            dir,
            token_file,
            grace,
            tls,
            csi,
        };
        for i in 0..hosts {
            let config = cluster.write_config(i, &cluster.etcd_endpoints());
            cluster.start_agent(i, &config);
        }
        cluster
    }

    fn etcd_endpoints(&self) -> Vec<String> {
        EtcdCluster::endpoints_with(&self.network, if self.tls.is_some() { "https" } else { "http" })
    }

    /// The `cluster.etcd` keys naming the TLS files, indented for the config.
    fn etcd_tls_keys(&self, client_certificate: bool) -> String {
        match &self.tls {
            None => String::new(),
            Some(tls) if client_certificate => format!(
                "    ca_file: {}\n    cert_file: {}\n    key_file: {}\n",
                tls.ca.display(),
                tls.client_cert.display(),
                tls.client_key.display()
            ),
            Some(tls) => format!("    ca_file: {}\n", tls.ca.display()),
        }
    }

    /// Host `i`'s directory: its agent's config, data, pool and (with CSI) socket and kubelet paths.
    fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("host{i}"))
    }

    fn csi_socket(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("csi.sock")
    }

    fn write_config(&self, i: usize, endpoints: &[String]) -> PathBuf {
        let host = self.network.host(i);
        let d = self.host_dir(i);
        std::fs::create_dir_all(&d).unwrap();
        let config = d.join("agent.yaml");
        let endpoints = endpoints.join(", ");
        std::fs::write(
            &config,
            format!(
                "node:\n  name: host{i}\n  address: {addr}\n  labels:\n    zone: zone-{i}\n  ports: 20000-20100\n\
                 data_dir: {d}/data\n\
                 pools:\n  - name: p0\n    path: {d}/pool0\n    capacity: 4G\n\
                 cluster:\n  store: etcd\n  etcd:\n    endpoints: [{endpoints}]\n    lease_ttl: 5s\n{tls}\
                 endpoints:\n  api:\n    listen: {addr}:{API_PORT}\n    token_file: {token}\n{csi}\
                 runtime:\n  kind: process\n  binary: {bin}\n\
                 failover:\n  replica_grace: {grace}ms\n",
                tls = self.etcd_tls_keys(true),
                csi = if self.csi {
                    format!("  csi: {}\n", self.csi_socket(i).display())
                } else {
                    String::new()
                },
                addr = host.address,
                d = d.display(),
                token = self.token_file.display(),
                bin = basalt_binary().unwrap().display(),
                grace = self.grace.as_millis(),
            ),
        )
        .unwrap();
        config
    }

    fn agent_command(&self, i: usize, config: &Path) -> Command {
        let mut cmd = if self.csi {
            self.network.command_sharing_mounts(i, basalt_binary().unwrap())
        } else {
            self.network.command(i, basalt_binary().unwrap())
        };
        cmd.arg("agent").arg("--config").arg(config);
        cmd
    }

    fn start_agent(&mut self, i: usize, config: &Path) {
        let agent = self.spawn_agent(i, config);
        self.groups.push(agent.pid() as i32);
        self.agents[i] = Some(agent);
    }

    fn spawn_agent(&self, i: usize, config: &Path) -> Daemon {
        Daemon::spawn(
            &format!("agent-host{i}"),
            self.agent_command(i, config),
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(30),
            },
        )
        .unwrap()
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
        let mut error = String::new();
        let result = wait_for("the nodes' states", READY_TIMEOUT, || {
            let (ok, out, err) = self.cli(i, &["node", "ls", "--json"]);
            error = err;
            last = ok.then(|| serde_json::from_str::<Value>(&out).unwrap());
            last.as_ref().is_some_and(|v| {
                let nodes = v["nodes"].as_array().unwrap();
                nodes.len() == self.network.hosts().len()
                    && nodes.iter().all(|n| {
                        let name = n["name"].as_str().unwrap();
                        n["up"].as_bool() == Some(names.contains(&name))
                    })
            })
        });
        if let Err(e) = result {
            panic!("{e}: last seen {last:#?} ({error})\n{}", self.logs());
        }
        last.unwrap()
    }

    fn wait_ready(&self, i: usize, volume: &str) -> Value {
        self.wait_view(i, volume, "to be ready", |v| v["phase"] == "ready")
    }

    /// Waits until `volume inspect` (asked of host `i`) shows what `done` wants, and returns it.
    fn wait_view(&self, i: usize, volume: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = None;
        let result = wait_for(&format!("volume {volume} {what}"), READY_TIMEOUT, || {
            last = self.json(i, &["volume", "inspect", volume]);
            last.as_ref().is_some_and(&done)
        });
        if let Err(e) = result {
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

/// Bytes of each of the writer's writes: slot `k` is written once, at `k * SLOT`, with [`pattern`]`(k)`.
const SLOT: u64 = 32 * 1024;

fn pattern(slot: u64) -> u64 {
    slot % 251 + 1
}

/// What the writer did.
#[derive(Default)]
struct Acked {
    /// The slots whose write and the flush after it were acknowledged, with the URL that acknowledged them.
    slots: Vec<(u64, String)>,
    /// Writes that failed or timed out (their slots are never checked: they may or may not hold the data).
    failed: u64,
}

/// Sets the writer's stop flag when dropped, so that a failed assertion (unwinding out of the scope that
/// joins the writer) does not leave the writer writing until it runs out of slots.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Acked {
    fn at(&self, url: &str) -> usize {
        self.slots.iter().filter(|(_, u)| u == url).count()
    }
}

/// One long-lived initiator: qemu-io reading commands on its stdin, from inside a host. Its libiscsi
/// session lives as long as the process and reconnects on its own to the portal it was opened with, as
/// an attached volume's initiator (qemu-storage-daemon, open-iscsi) does.
///
/// One command at a time, each answered before the next is sent: qemu-io reads its input through stdio,
/// so lines that arrive together wait in stdio's buffer, unseen by its event loop, until more input comes.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Session {
    fn open(mut cmd: Command, url: &str) -> Session {
        // stdbuf: qemu-io's output is a pipe here, which stdio would buffer whole.
        let mut child = cmd
            .args(["stdbuf", "-oL", "qemu-io", "-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Each command's output follows a prompt with no newline of its own.
                let line = line.replace("qemu-io> ", "");
                if !line.is_empty() && tx.send(line).is_err() {
                    break;
                }
            }
        });
        Session { child, stdin, lines }
    }

    /// Sends one read or write command and waits for its answer: Ok when it succeeded, Err with what qemu-io
    /// said when it failed, or after `timeout`.
    fn run(&mut self, command: &str, timeout: Duration) -> Result<(), String> {
        writeln!(self.stdin, "{command}").map_err(|e| format!("qemu-io is gone: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("wrote ") || line.starts_with("read ") => return Ok(()),
                Ok(line) if line.contains("failed") || line.contains("error") => return Err(line),
                // The statistics line after each answer.
                Ok(_) => {}
                Err(e) => return Err(format!("no answer to {command:?}: {e:?}")),
            }
        }
    }
}

impl Cluster {
    fn iscsi_url(&self, i: usize, volume: &str) -> Option<String> {
        let view = self.json(i, &["volume", "inspect", volume])?;
        view["iscsi_url"].as_str().map(String::from)
    }

    /// [`Cluster::io`], killed after 20 s: a cut host's portal swallows packets and would hang a login.
    fn io_bounded(&self, i: usize, url: &str, commands: &[&str]) -> (bool, String) {
        let mut cmd = self.network.command(i, "timeout");
        cmd.args(["-s", "KILL", "20", "qemu-io"]);
        qemu_io_with(cmd, url, commands).unwrap()
    }

    /// Until `stop`, from inside host `i`: writes slot after slot from `first`, each followed by a flush,
    /// recording the acknowledged ones in `log`. After a failure it asks its agent for the volume's URL
    /// again, as an initiator following a moved controller does.
    fn write_until(&self, i: usize, volume: &str, first: u64, stop: &AtomicBool, log: &Mutex<Acked>) {
        let mut url = self.iscsi_url(i, volume).expect("the volume's URL");
        let slots = self.json(i, &["volume", "inspect", volume]).unwrap()["size_bytes"]
            .as_u64()
            .unwrap()
            / SLOT;
        // Round the volume's end: a slot written again gets the same pattern.
        for slot in (first..slots).cycle() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let write = format!("write -P {} {} {SLOT}", pattern(slot), slot * SLOT);
            let (ok, _) = self.io_bounded(i, &url, &[&write, "flush"]);
            let mut acked = log.lock().unwrap();
            if ok {
                acked.slots.push((slot, url.clone()));
            } else {
                acked.failed += 1;
                drop(acked);
                std::thread::sleep(Duration::from_millis(500));
                url = self.iscsi_url(i, volume).unwrap_or(url);
            }
        }
        panic!("the writer has no slots between {first} and the volume's end ({slots})");
    }

    /// [`write_session`] on host `i`, over the whole volume.
    fn write_through_redirector(
        &self,
        i: usize,
        volume: &str,
        first: u64,
        stop: &AtomicBool,
        log: &Mutex<Vec<(u64, Instant)>>,
    ) -> u64 {
        let slots = self.json(i, &["volume", "inspect", volume]).unwrap()["size_bytes"]
            .as_u64()
            .unwrap()
            / SLOT;
        write_session(&self.network, i, volume, first..slots, stop, log)
    }

    /// The acknowledged slots that do not read back with their write, read from inside host `i`.
    fn lost(&self, i: usize, url: &str, slots: &[u64]) -> Vec<u64> {
        let mut slots = slots.to_vec();
        slots.sort_unstable();
        slots.dedup();
        let read = |s: &u64| format!("read -P {} {} {SLOT}", pattern(*s), s * SLOT);
        let mut lost = Vec::new();
        for chunk in slots.chunks(128) {
            let reads: Vec<String> = chunk.iter().map(read).collect();
            let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
            if self.io(i, url, &reads).0 {
                continue;
            }
            // Which of them: one by one.
            lost.extend(chunk.iter().filter(|s| !self.io(i, url, &[&read(s)]).0));
        }
        lost
    }

    /// Whether something listens on TCP `port` inside host `i`.
    fn listening(&self, i: usize, port: u64) -> bool {
        let out = self
            .network
            .command(i, "ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        !out.stdout.is_empty()
    }
}

/// Until `stop`, from inside host `i`: one [`Session`] logged in through the host's iSCSI redirector writes
/// slot after slot of `slots` and round again (a slot written again gets the same pattern), each with FUA,
/// recording each acknowledged slot with the time of its acknowledgement. It never reopens the session: a
/// write that fails is counted (the count is returned) and the next one goes through the same process.
/// A function of the network alone, so the test can restart agents and etcd members meanwhile.
fn write_session(
    network: &Network,
    i: usize,
    volume: &str,
    slots: std::ops::Range<u64>,
    stop: &AtomicBool,
    log: &Mutex<Vec<(u64, Instant)>>,
) -> u64 {
    let url = format!(
        "iscsi://{}:3260/iqn.2026-11.io.basalt:{volume}/0",
        network.host(i).address
    );
    let mut session = Session::open(network.command(i, "env"), &url);
    let mut failed = 0;
    for slot in slots.clone().cycle() {
        if stop.load(Ordering::Relaxed) {
            return failed;
        }
        // FUA: acknowledged only once durable, like a write followed by a flush.
        let write = format!("write -f -P {} {} {SLOT}", pattern(slot), slot * SLOT);
        match session.run(&write, Duration::from_secs(180)) {
            Ok(()) => log.lock().unwrap().push((slot, Instant::now())),
            Err(e) => {
                assert!(
                    session.child.try_wait().unwrap().is_none(),
                    "the redirector's session ended: {e}"
                );
                eprintln!("a write through the redirector failed: {e}");
                failed += 1;
            }
        }
    }
    panic!("no slots to write in {slots:?}");
}

/// How many of `log`'s writes were acknowledged after `t`.
fn acked_since(log: &Mutex<Vec<(u64, Instant)>>, t: Instant) -> usize {
    log.lock().unwrap().iter().filter(|(_, at)| *at > t).count()
}

/// SIGKILLs every agent, as a crash would: their services keep running. Each guard is forgotten, since
/// dropping it would kill its process group and the services with it; `Cluster::drop` kills the groups.
fn kill_agents(agents: &mut [Option<Daemon>]) {
    for slot in agents {
        let mut agent = slot.take().unwrap();
        // SAFETY: plain syscall on the agent process this test started.
        unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
        agent.wait_for_exit(Duration::from_secs(30)).unwrap();
        std::mem::forget(agent);
    }
}

/// Ready, with every placed replica read-write on its node and a member of the controller's volume,
/// and nothing else a member.
fn whole(view: &Value) -> bool {
    let slots = view["placement"]["replicas"].as_array().unwrap();
    let mut placed: Vec<u64> = slots.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    let rw = slots.iter().all(|r| {
        let status = &view["statuses"][format!("replica-{}", r["id"])];
        status["node"] == r["node"] && status["mode"] == "rw"
    });
    let Some(members) = view["statuses"]["controller"]["report"]["replicas"].as_array() else {
        return false;
    };
    let mut members: Vec<u64> = members.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    placed.sort();
    members.sort();
    view["phase"] == "ready" && rw && placed == members
}

/// `hostN` → N.
fn host_index(node: &Value) -> usize {
    node.as_str()
        .unwrap()
        .strip_prefix("host")
        .unwrap()
        .parse()
        .unwrap()
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
    let _turn = alongside();
    let mut cluster = Cluster::start(3, Duration::from_secs(300));
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
    for i in 0..3 {
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
    for i in 0..3 {
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
    let stopped_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    cluster.agents[2] = None;
    cluster.wait_nodes_up(0, &["host0", "host1"]);
    // The other agents mark it down; `node ls` says since when.
    let mut since = None;
    wait_for("host2's down mark", READY_TIMEOUT, || {
        let nodes = cluster.json(0, &["node", "ls"]).unwrap();
        since = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "host2")
            .and_then(|n| n["down_since_unix"].as_u64());
        since.is_some()
    })
    .unwrap();
    let since = since.unwrap();
    assert!(
        (stopped_unix..stopped_unix + 60).contains(&since),
        "down since {since}, stopped at {stopped_unix}"
    );
    let (ok, table, _) = cluster.cli(0, &["node", "ls"]);
    assert!(ok && table.contains("down("), "{table}");
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

/// The CSI life cycle across hosts, as Kubernetes runs it: the CSI controller asked on one host creates a
/// 2-replica volume within two zones (requisite topology), publishes it to the node (host B) that holds
/// one replica but not the controller, and host B's node service stages and publishes it (ext4 over its
/// user-space attachment, logged in through B's iSCSI redirector). A pod's writes on B go on while the
/// controller's host is cut off: the controller moves to B, the staged mount follows it with nobody
/// telling it where it went, and every file whose fsync returned reads back after an unstage and a new
/// stage. A host that was never published cannot log in. Unpublish, unstage and delete leave nothing.
#[test]
fn csi_staged_volume_keeps_its_files_while_the_controller_fails_over_to_the_node() {
    let _turn = alongside();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(csi_across_hosts());
}

async fn csi_across_hosts() {
    use basalt_agent::csi::pb;
    use basalt_agent::csi::pb::controller_client::ControllerClient;
    use basalt_agent::csi::pb::node_client::NodeClient;
    use basalt_agent::host::mount::is_mounted;
    use basalt_tests::csi::{
        connect, mount_cap, publish_request, stage_request, unpublish_and_delete, unpublish_request,
        unstage_request,
    };

    const KEY: &str = "topology.basalt.csi.io/zone";
    const MIB: i64 = 1 << 20;
    let zone = |z: &str| pb::Topology {
        segments: [(KEY.to_string(), z.to_string())].into(),
    };
    let cluster = Cluster::start_with(3, GRACE, false, true);
    cluster.wait_nodes_up(0, &["host0", "host1", "host2"]);
    for i in 0..3 {
        let socket = cluster.csi_socket(i);
        wait_for("the CSI socket", READY_TIMEOUT, || socket.exists()).unwrap();
    }
    let mut controller = ControllerClient::new(connect(&cluster.csi_socket(0)).await);

    // Created within zones 1 and 2: one replica in each, and those zones are where it is accessible.
    let name = "pvc-roaming";
    let created = controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 256 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: [("replicas", "2"), ("minHealthy", "1")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            accessibility_requirements: Some(pb::TopologyRequirement {
                requisite: vec![zone("zone-1"), zone("zone-2")],
                preferred: vec![zone("zone-2")],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut zones: Vec<&str> = created
        .accessible_topology
        .iter()
        .map(|t| t.segments[KEY].as_str())
        .collect();
    zones.sort();
    assert_eq!(zones, ["zone-1", "zone-2"]);
    let view = cluster.wait_ready(0, name);
    assert_eq!(replica_nodes(&view), ["host1", "host2"]);
    let a = host_index(&view["placement"]["controller"]["node"]);
    let b = 3 - a;
    let old_epoch = view["statuses"]["controller"]["report"]["epoch"]
        .as_u64()
        .unwrap();

    // Host B's node service: its id and topology are its agent's.
    let mut node = NodeClient::new(connect(&cluster.csi_socket(b)).await);
    let info = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, format!("host{b}"));
    assert_eq!(
        info.accessible_topology.unwrap().segments[KEY],
        format!("zone-{b}")
    );
    controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: name.into(),
            node_id: info.node_id.clone(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .unwrap();
    let kubelet = cluster.host_dir(b).join("kubelet");
    let staging = kubelet.join("globalmount");
    let target = kubelet.join("pods/writer/volume");
    let stage = stage_request(name, &staging, mount_cap());
    let publish = publish_request(name, &staging, &target, mount_cap(), false);
    let unpublish = unpublish_request(name, &target);
    let unstage = unstage_request(name, &staging);
    node.node_stage_volume(stage.clone()).await.unwrap();
    node.node_publish_volume(publish.clone()).await.unwrap();
    assert!(is_mounted(&target), "the publication is not mounted");

    // Host 0 was never published: its initiator is refused (the controller's allow-list follows the
    // publication).
    let url = view["iscsi_url"].as_str().unwrap().to_string();
    let (ok, out) = cluster.io_bounded(0, &url, &["read 0 4k"]);
    assert!(!ok, "an unpublished host read the volume: {out}");

    // A pod on B writes file after file, each synced; the controller's host is cut meanwhile.
    let file = |k: u64| target.join(format!("f{k:05}"));
    let content = |k: u64| vec![(k % 251) as u8 + 1; 256 * 1024];
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::<(u64, Instant)>::new());
    let mut moved_at = Instant::now();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let writer = s.spawn(|| {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let f = std::fs::File::create(file(k)).and_then(|mut f| {
                    f.write_all(&content(k))?;
                    f.sync_all()
                });
                if let Err(e) = f {
                    return Err(format!("file {k}: {e}"));
                }
                acked.lock().unwrap().push((k, Instant::now()));
                k += 1;
            }
            Ok(())
        });
        wait_for("files before the cut", READY_TIMEOUT, || {
            acked.lock().unwrap().len() >= 5
        })
        .unwrap();
        cluster.network.cut(a).unwrap();
        let moved = cluster.wait_view(b, name, "to move to the node", |v| {
            let report = &v["statuses"]["controller"]["report"];
            host_index(&v["placement"]["controller"]["node"]) == b
                && report["serving"] == true
                && report["epoch"].as_u64().unwrap() > old_epoch
        });
        assert_ne!(moved["iscsi_url"].as_str(), Some(url.as_str()));
        moved_at = Instant::now();
        let followed = wait_for("files synced after the move", READY_TIMEOUT, || {
            acked_since(&acked, moved_at) >= 5
        });
        if let Err(e) = followed {
            panic!("{e}\n{}", cluster.logs());
        }
        cluster.network.restore(a).unwrap();
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = writer.join().unwrap() {
            panic!("the pod's write failed: {e}\n{}", cluster.logs());
        }
    });
    let acked = acked.into_inner().unwrap();
    let after_move = acked.iter().filter(|(_, t)| *t > moved_at).count();

    // Unstaged (unmounted, flushed, detached) and staged again: every synced file reads back.
    node.node_unpublish_volume(unpublish.clone()).await.unwrap();
    node.node_unstage_volume(unstage.clone()).await.unwrap();
    assert!(!is_mounted(&staging), "the staging path is still mounted");
    node.node_stage_volume(stage).await.unwrap();
    node.node_publish_volume(publish).await.unwrap();
    let lost: Vec<u64> = acked
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| std::fs::read(file(*k)).ok() != Some(content(*k)))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} synced files lost or changed: {lost:?}",
        lost.len(),
        acked.len()
    );
    eprintln!(
        "CSI across hosts: {} files synced ({after_move} after the controller moved to host{b}), lost 0",
        acked.len()
    );

    // Released: nothing mounted, nothing attached on B; the volume unpublished and deleted.
    node.node_unpublish_volume(unpublish).await.unwrap();
    node.node_unstage_volume(unstage).await.unwrap();
    assert!(!is_mounted(&staging) && !is_mounted(&target));
    let host = basalt_agent::host::Host::with_method(
        &cluster.host_dir(b).join("data"),
        basalt_agent::host::AttachMethod::UserSpace,
    )
    .unwrap();
    assert!(
        host.attachments().unwrap().is_empty(),
        "host{b} still records an attachment"
    );
    unpublish_and_delete(&mut controller, &info.node_id, name).await;
    let gone = wait_for("the volume to be deleted", READY_TIMEOUT, || {
        cluster.json(0, &["volume", "inspect", name]).is_none()
    });
    if let Err(e) = gone {
        panic!("{e}\n{}", cluster.logs());
    }
}

/// etcd serving its clients over TLS and checking their certificates (`--client-cert-auth`): agents given the
/// CA and a client certificate (`cluster.etcd.ca_file`, `cert_file`, `key_file`) form the cluster and serve a
/// replicated volume; an agent with the CA but no client certificate is refused by etcd and says so.
#[test]
fn agents_use_an_etcd_that_serves_tls_and_checks_client_certificates() {
    let _turn = alongside();
    let cluster = Cluster::start_with(2, GRACE, true, false);
    cluster.wait_nodes_up(0, &["host0", "host1"]);
    let (ok, _, err) = cluster.cli(
        1,
        &["volume", "create", "sealed", "--size", "64M", "--replicas", "2"],
    );
    assert!(ok, "{err}");
    let view = cluster.wait_ready(0, "sealed");
    assert_eq!(replica_nodes(&view), ["host0", "host1"]);
    let url = view["iscsi_url"].as_str().unwrap().to_string();
    let (ok, out) = cluster.io(1, &url, &["write -P 0x5e 0 1M", "flush", "read -P 0x5e 0 1M"]);
    assert!(ok, "{out}");

    // Bad input: the CA but no client certificate. etcd ends the handshake; the agent names the endpoints.
    let good = cluster.dir.path().join("host0/agent.yaml");
    let text = std::fs::read_to_string(&good).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.contains("cert_file:") && !l.contains("key_file:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, text);
    let config = cluster.dir.path().join("host0/no-client-cert.yaml");
    std::fs::write(&config, without).unwrap();
    let out = cluster.agent_command(0, &config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an agent without a client certificate started"
    );
    let address = cluster.network.host(0).address;
    assert!(
        err.contains(&format!("https://{address}:{ETCD_CLIENT_PORT}")),
        "{err}"
    );
    // The reason is named, though later attempts only see the connection closed.
    assert!(err.contains("BadCertificate"), "{err}");
}

/// Short enough that episode 2 sees a replacement soon; long enough that episode 1 (the controller moves at
/// once, its host comes back) ends before the lost replica is given up.
const GRACE: Duration = Duration::from_secs(60);

#[test]
fn four_hosts_fail_over_a_controller_replace_a_replica_and_lose_no_acknowledged_write() {
    let _turn = alone();
    let mut cluster = Cluster::start(4, GRACE);
    cluster.wait_nodes_up(0, &["host0", "host1", "host2", "host3"]);
    let (ok, _, err) = cluster.cli(
        0,
        &["volume", "create", "moving", "--size", "256M", "--replicas", "3"],
    );
    assert!(ok, "{err}");
    let before = cluster.wait_ready(0, "moving");
    let replicas = replica_nodes(&before);
    let old = &before["placement"]["controller"];
    let old_host = host_index(&old["node"]);
    let old_port = old["iscsi_port"].as_u64().unwrap();
    let old_generation = old["generation"].as_u64().unwrap();
    let old_url = before["iscsi_url"].as_str().unwrap().to_string();
    let old_epoch = before["statuses"]["controller"]["report"]["epoch"]
        .as_u64()
        .unwrap();
    // The writer runs on the host without a replica: all its I/O crosses the network.
    let writer = (0..4).find(|i| !replicas.contains(&format!("host{i}"))).unwrap();

    // Episode 1: the controller's host is cut off while the writer writes and flushes.
    let stop = AtomicBool::new(false);
    let log = Mutex::new(Acked::default());
    // The redirector's writer takes the second half of the volume.
    let session_first = before["size_bytes"].as_u64().unwrap() / SLOT / 2;
    let session_log = Mutex::new(Vec::new());
    let mut session_failed = 0;
    let mut moved_at = Instant::now();
    let mut new_url = String::new();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let w = s.spawn(|| cluster.write_until(writer, "moving", 0, &stop, &log));
        let r = s
            .spawn(|| cluster.write_through_redirector(writer, "moving", session_first, &stop, &session_log));
        wait_for("writes before the cut", READY_TIMEOUT, || {
            log.lock().unwrap().slots.len() >= 10 && session_log.lock().unwrap().len() >= 10
        })
        .unwrap();
        cluster.network.cut(old_host).unwrap();
        let cut_at = Instant::now();

        // The controller moves to another host with a replica, with a higher generation and epoch.
        let moved = cluster.wait_view(writer, "moving", "to move off the cut host", |v| {
            let report = &v["statuses"]["controller"]["report"];
            host_index(&v["placement"]["controller"]["node"]) != old_host
                && report["serving"] == true
                && report["epoch"].as_u64().unwrap() > old_epoch
        });
        let controller = &moved["placement"]["controller"];
        assert_eq!(
            controller["generation"].as_u64(),
            Some(old_generation + 1),
            "{moved:#}"
        );
        // A node the controller skipped was not up for services when failover chose (its lease lapsed, or
        // it drained): `node ls` and the agents' logs say which and why.
        assert!(
            replicas.contains(&controller["node"].as_str().unwrap().to_string()),
            "the controller moved to a host without a replica: {moved:#}\nnodes: {:#}\n{}",
            cluster.json(writer, &["node", "ls"]).unwrap_or_default(),
            cluster.logs()
        );
        new_url = moved["iscsi_url"].as_str().unwrap().to_string();
        assert_ne!(new_url, old_url);
        moved_at = Instant::now();

        // The old controller, alone with its host's replica behind the cut, acknowledges nothing.
        let (ok, out) = cluster.io_bounded(old_host, &old_url, &["write -P 0xee 255M 1M", "flush"]);
        assert!(!ok, "the partitioned controller acknowledged a write: {out}");

        // The writer found the new URL and its writes are acknowledged there.
        wait_for("writes acknowledged at the new URL", READY_TIMEOUT, || {
            log.lock().unwrap().at(&new_url) >= 10
        })
        .unwrap();
        // The session through the redirector found the new controller by itself.
        let followed = wait_for(
            "writes through the redirector after the move",
            READY_TIMEOUT,
            || acked_since(&session_log, moved_at) >= 10,
        );
        if let Err(e) = followed {
            panic!("{e}\n{}", cluster.logs());
        }
        assert!(
            cut_at.elapsed() < GRACE,
            "episode 1 outlasted the replica grace period ({:?})",
            cut_at.elapsed()
        );

        // The link back: the old host's agent sees the controller placed elsewhere and stops its own.
        cluster.network.restore(old_host).unwrap();
        let stopped = wait_for("the old controller to stop", READY_TIMEOUT, || {
            !cluster.listening(old_host, old_port)
        });
        if let Err(e) = stopped {
            panic!("{e}\n{}", cluster.logs());
        }
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        session_failed = r.join().unwrap();
    });
    let acked = log.into_inner().unwrap();
    let session_acked = session_log.into_inner().unwrap();
    let session_after_move = session_acked.iter().filter(|(_, t)| *t > moved_at).count();
    let slots: Vec<u64> = acked
        .slots
        .iter()
        .map(|(s, _)| *s)
        .chain(session_acked.iter().map(|(s, _)| *s))
        .collect();
    assert!(acked.at(&old_url) >= 10 && acked.at(&new_url) >= 10);
    let lost = cluster.lost(writer, &new_url, &slots);
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost ({} failed): slots {lost:?}",
        lost.len(),
        slots.len(),
        acked.failed
    );
    // The write the fenced controller refused is nowhere.
    let (ok, out) = cluster.io(writer, &new_url, &["read -P 0 255M 1M"]);
    assert!(ok, "the fenced controller's write reached the volume: {out}");
    eprintln!(
        "episode 1: {} writes acknowledged ({} at the new controller), {} failed; through the redirector, \
         one session: {} acknowledged ({session_after_move} after the move), {session_failed} failed; lost 0",
        slots.len(),
        acked.at(&new_url),
        acked.failed,
        session_acked.len(),
    );

    // Episode 2: a replica's host (not the controller's) cut past the grace period, the writer on.
    let view = cluster.wait_view(writer, "moving", "whole again", whole);
    let controller = host_index(&view["placement"]["controller"]["node"]);
    let slot = view["placement"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| host_index(&r["node"]) != controller)
        .unwrap()
        .clone();
    let victim = host_index(&slot["node"]);
    let victim_dir = cluster
        .dir
        .path()
        .join(format!("host{victim}/pool0"))
        .join(view["uuid"].as_str().unwrap())
        .join(format!("replica-{}", slot["id"]));
    assert!(victim_dir.is_dir(), "{victim_dir:?}");
    // Past the first writer's slots (the session's took the second half).
    let first = acked.slots.iter().map(|(s, _)| *s).max().unwrap() + 1;
    let stop = AtomicBool::new(false);
    let log = Mutex::new(Acked::default());
    let mut replaced = Value::Null;
    let mut replaced_after = Duration::ZERO;
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let w = s.spawn(|| cluster.write_until(writer, "moving", first, &stop, &log));
        wait_for("writes before the cut", READY_TIMEOUT, || {
            log.lock().unwrap().slots.len() >= 10
        })
        .unwrap();
        cluster.network.cut(victim).unwrap();
        let cut_at = Instant::now();
        let victim_name = slot["node"].clone();
        let spare = format!("host{writer}");
        replaced = cluster.wait_view(writer, "moving", "to replace the cut host's replica", |v| {
            let nodes = v["placement"]["replicas"].as_array().unwrap();
            whole(v)
                && nodes.iter().all(|r| r["node"] != victim_name)
                && nodes.iter().any(|r| r["node"] == spare.as_str())
        });
        replaced_after = cut_at.elapsed();
        assert!(
            replaced_after >= GRACE,
            "replaced after {replaced_after:?}, before the grace period; nodes: {:#}\n{}",
            cluster.json(writer, &["node", "ls"]).unwrap_or_default(),
            cluster.logs()
        );
        let ids: Vec<&Value> = replaced["placement"]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["id"])
            .collect();
        assert!(!ids.contains(&&slot["id"]), "{replaced:#}");
        assert!(victim_dir.is_dir(), "the cut host's data went while it was away");

        // The host back: it finds its replica retired, and deletes its data (the volume is whole).
        cluster.network.restore(victim).unwrap();
        let deleted = wait_for("the retired replica's data deleted", READY_TIMEOUT, || {
            !victim_dir.exists()
        });
        if let Err(e) = deleted {
            panic!("{e}\n{}", cluster.logs());
        }
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
    });
    let acked = log.into_inner().unwrap();
    let url = replaced["iscsi_url"].as_str().unwrap();
    let all: Vec<u64> = slots
        .iter()
        .copied()
        .chain(acked.slots.iter().map(|(s, _)| *s))
        .collect();
    let lost = cluster.lost(writer, url, &all);
    assert!(lost.is_empty(), "acknowledged writes lost: slots {lost:?}");
    eprintln!(
        "episode 2: replaced and rebuilt {:.1} s after the cut (grace {} s); {} writes acknowledged, {} failed, \
         lost 0 of {} checked",
        replaced_after.as_secs_f64(),
        GRACE.as_secs(),
        acked.slots.len(),
        acked.failed,
        all.len()
    );

    // Episode 3: every agent SIGKILLed (its services are left running, as after an agent crash) and
    // started again: the volume is served again, whole, with the same data, nobody stepping in.
    kill_agents(&mut cluster.agents);
    for i in 0..4 {
        let config = cluster.dir.path().join(format!("host{i}/agent.yaml"));
        cluster.start_agent(i, &config);
    }
    cluster.wait_nodes_up(0, &["host0", "host1", "host2", "host3"]);
    let view = cluster.wait_view(0, "moving", "whole after the agents' restart", whole);
    let url = view["iscsi_url"].as_str().unwrap().to_string();
    let lost = cluster.lost(writer, &url, &all);
    assert!(lost.is_empty(), "lost after the agents' restart: slots {lost:?}");
    eprintln!(
        "episode 3: {} acknowledged writes read back after the restart, lost 0",
        all.len()
    );

    // Episode 4: `basalt node drain` of the controller's host while a session through a redirector writes:
    // its replica is rebuilt on the host without one, its controller moves, the session follows it.
    let controller = host_index(&view["placement"]["controller"]["node"]);
    let spare = (0..4)
        .find(|i| !replica_nodes(&view).contains(&format!("host{i}")))
        .unwrap();
    let client = (0..4).find(|i| *i != controller).unwrap();
    let first = all.iter().max().unwrap() + 1;
    let stop = AtomicBool::new(false);
    let session_log = Mutex::new(Vec::new());
    let mut session_failed = 0;
    let mut drained_at = Instant::now();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let r = s.spawn(|| cluster.write_through_redirector(client, "moving", first, &stop, &session_log));
        wait_for("writes before the drain", READY_TIMEOUT, || {
            session_log.lock().unwrap().len() >= 10
        })
        .unwrap();
        let drained = format!("host{controller}");
        let (ok, _, err) = cluster.cli(client, &["node", "drain", &drained]);
        assert!(ok, "{err}");
        let moved = cluster.wait_view(client, "moving", "drained off its controller's host", |v| {
            let nodes = replica_nodes(v);
            whole(v)
                && v["placement"]["controller"]["node"] != drained.as_str()
                && !nodes.contains(&drained)
                && nodes.contains(&format!("host{spare}"))
        });
        drained_at = Instant::now();
        let followed = wait_for(
            "writes through the redirector after the drain",
            READY_TIMEOUT,
            || acked_since(&session_log, drained_at) >= 10,
        );
        if let Err(e) = followed {
            panic!("{e}: {moved:#}\n{}", cluster.logs());
        }
        let nodes = cluster.json(client, &["node", "ls"]).unwrap();
        let node = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == drained.as_str())
            .unwrap()
            .clone();
        assert!(node["draining"] == true && node["cordoned"] == true, "{node:#}");
        stop.store(true, Ordering::Relaxed);
        session_failed = r.join().unwrap();
    });
    let session_acked = session_log.into_inner().unwrap();
    let view = cluster.wait_view(client, "moving", "whole after the drain", whole);
    let url = view["iscsi_url"].as_str().unwrap().to_string();
    let all: Vec<u64> = all
        .into_iter()
        .chain(session_acked.iter().map(|(s, _)| *s))
        .collect();
    let lost = cluster.lost(client, &url, &all);
    assert!(lost.is_empty(), "lost across the drain: slots {lost:?}");
    eprintln!(
        "episode 4: drained; through the redirector, one session: {} acknowledged ({} after the drain), \
         {session_failed} failed; lost 0 of {} checked",
        session_acked.len(),
        session_acked.iter().filter(|(_, t)| *t > drained_at).count(),
        all.len()
    );
}

/// What the soak does to the cluster in one episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Episode {
    /// Cut the controller's host off until the controller has moved, then restore it.
    CutController,
    /// Cut a replica's host (not the controller's) off for 15 s, well inside the grace period.
    CutReplica,
    /// SIGKILL an etcd member, use the cluster, start the member again.
    KillEtcdMember,
    /// SIGKILL every agent (the services keep running) and start them all again.
    RestartAgents,
    /// `basalt node drain` a replica's host, then `uncordon` it.
    Drain,
}

const EPISODES: [Episode; 5] = [
    Episode::CutController,
    Episode::CutReplica,
    Episode::KillEtcdMember,
    Episode::RestartAgents,
    Episode::Drain,
];

/// The four-host episodes, chosen from a seed, on one 3-replica volume, while one initiator session logged
/// in through its host's redirector writes with FUA all along; at the end every acknowledged write reads
/// back. `BASALT_MULTIHOST_SEED=0x...` replays a schedule, `BASALT_MULTIHOST_EPISODES` sets its length.
#[test]
#[ignore = "a soak of several minutes: cargo test -p basalt-tests --test agent_multihost -- --ignored soak --nocapture"]
fn soak_multihost_episodes_from_a_seed() {
    let _turn = alone();
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("BASALT_MULTIHOST_SEED")
        .ok()
        .map(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("BASALT_MULTIHOST_SEED is hex"))
        .unwrap_or(0x5eed);
    let count: usize = std::env::var("BASALT_MULTIHOST_EPISODES")
        .ok()
        .map(|s| s.parse().expect("BASALT_MULTIHOST_EPISODES is a number"))
        .unwrap_or(8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    // A grace period longer than any episode: cuts here are outages, not losses of a host.
    let mut cluster = Cluster::start(4, Duration::from_secs(600));
    cluster.wait_nodes_up(0, &["host0", "host1", "host2", "host3"]);
    let (ok, _, err) = cluster.cli(
        0,
        &["volume", "create", "soak", "--size", "64M", "--replicas", "3"],
    );
    assert!(ok, "{err}");
    let view = cluster.wait_ready(0, "soak");
    // The client is never cut off: it runs the session and asks every question.
    let client = (0..4)
        .find(|i| !replica_nodes(&view).contains(&format!("host{i}")))
        .unwrap();
    let slots = view["size_bytes"].as_u64().unwrap() / SLOT;
    let stop = AtomicBool::new(false);
    let session_log = Mutex::new(Vec::new());
    let mut failed = 0;
    let mut done: Vec<(Episode, Duration)> = Vec::new();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let network = &cluster.network;
        let writer = s.spawn(|| write_session(network, client, "soak", 0..slots, &stop, &session_log));
        wait_for("writes before the first episode", READY_TIMEOUT, || {
            acked_since(&session_log, started) >= 10
        })
        .unwrap();
        for n in 0..count {
            let view = cluster.wait_view(client, "soak", "whole before an episode", whole);
            let controller = host_index(&view["placement"]["controller"]["node"]);
            let replicas: Vec<usize> = view["placement"]["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| host_index(&r["node"]))
                .collect();
            let mut episode = EPISODES[rng.random_range(0..EPISODES.len())];
            // The client is not cut off: its controller leaves by a drain instead.
            if episode == Episode::CutController && controller == client {
                episode = Episode::Drain;
            }
            let others: Vec<usize> = replicas
                .iter()
                .copied()
                .filter(|r| *r != controller && *r != client)
                .collect();
            if episode == Episode::CutReplica && others.is_empty() {
                episode = Episode::KillEtcdMember;
            }
            eprintln!("episode {n}: {episode:?} (controller on host{controller}, replicas on {replicas:?})");
            let begun = Instant::now();
            match episode {
                Episode::CutController => {
                    let epoch = view["statuses"]["controller"]["report"]["epoch"]
                        .as_u64()
                        .unwrap();
                    cluster.network.cut(controller).unwrap();
                    cluster.wait_view(client, "soak", "to move off the cut host", |v| {
                        host_index(&v["placement"]["controller"]["node"]) != controller
                            && v["statuses"]["controller"]["report"]["serving"] == true
                            && v["statuses"]["controller"]["report"]["epoch"].as_u64().unwrap() > epoch
                    });
                    cluster.network.restore(controller).unwrap();
                }
                Episode::CutReplica => {
                    let victim = others[rng.random_range(0..others.len())];
                    cluster.network.cut(victim).unwrap();
                    std::thread::sleep(Duration::from_secs(15));
                    cluster.network.restore(victim).unwrap();
                }
                Episode::KillEtcdMember => {
                    let member = rng.random_range(0..4);
                    cluster.etcd.kill_member(member);
                    std::thread::sleep(Duration::from_secs(5));
                    let (ok, _, err) = cluster.cli(client, &["volume", "inspect", "soak"]);
                    assert!(ok, "three of four etcd members up, and the API fails: {err}");
                    cluster.etcd.start_member(&cluster.network, member).unwrap();
                }
                Episode::RestartAgents => {
                    kill_agents(&mut cluster.agents);
                    for i in 0..4 {
                        let config = cluster.dir.path().join(format!("host{i}/agent.yaml"));
                        let agent = cluster.spawn_agent(i, &config);
                        cluster.groups.push(agent.pid() as i32);
                        cluster.agents[i] = Some(agent);
                    }
                    cluster.wait_nodes_up(client, &["host0", "host1", "host2", "host3"]);
                }
                Episode::Drain => {
                    let drained = if controller == client {
                        controller
                    } else {
                        replicas[rng.random_range(0..replicas.len())]
                    };
                    let name = format!("host{drained}");
                    let (ok, _, err) = cluster.cli(client, &["node", "drain", &name]);
                    assert!(ok, "{err}");
                    cluster.wait_view(client, "soak", "drained", |v| {
                        whole(v)
                            && v["placement"]["controller"]["node"] != name.as_str()
                            && !replica_nodes(v).contains(&name)
                    });
                    let (ok, _, err) = cluster.cli(client, &["node", "uncordon", &name]);
                    assert!(ok, "{err}");
                }
            }
            cluster.wait_view(client, "soak", "whole after the episode", whole);
            let ended = Instant::now();
            let resumed = wait_for("writes after the episode", READY_TIMEOUT, || {
                acked_since(&session_log, ended) >= 5
            });
            if let Err(e) = resumed {
                panic!("{e} ({episode:?})\n{}", cluster.logs());
            }
            done.push((episode, begun.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
        failed = writer.join().unwrap();
    });
    let acked = session_log.into_inner().unwrap();
    let slots: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    let view = cluster.wait_view(client, "soak", "whole at the end", whole);
    let lost = cluster.lost(client, view["iscsi_url"].as_str().unwrap(), &slots);
    let mut kinds: Vec<(Episode, usize)> = Vec::new();
    for (e, _) in &done {
        match kinds.iter_mut().find(|(k, _)| k == e) {
            Some((_, n)) => *n += 1,
            None => kinds.push((*e, 1)),
        }
    }
    kinds.sort();
    eprintln!(
        "multi-host soak, seed {seed:#x}, {:.0} s: {} episodes ({}); one session through a redirector: {} writes \
         acknowledged (FUA), {failed} failed, {} distinct slots read back, lost {}",
        started.elapsed().as_secs_f64(),
        done.len(),
        kinds
            .iter()
            .map(|(k, n)| format!("{k:?} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        acked.len(),
        {
            let mut d = slots.clone();
            d.sort_unstable();
            d.dedup();
            d.len()
        },
        lost.len()
    );
    for (e, took) in &done {
        eprintln!("  {e:?}: {:.1} s", took.as_secs_f64());
    }
    assert!(lost.is_empty(), "acknowledged writes lost: slots {lost:?}");
}
