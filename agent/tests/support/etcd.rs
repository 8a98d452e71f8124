//! One real etcd member for a test: Debian's `etcd` (installed by tests/setup.sh) on free
//! loopback ports with its own data directory, killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_agent::store::etcd::{EtcdOptions, EtcdStore};

/// How long a member may take to start answering on a loaded machine.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// A single-member etcd cluster.
pub struct EtcdMember {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_url: String,
    peer_url: String,
    name: String,
}

/// How many times [`EtcdMember::start`] picks new ports after etcd found one taken.
const START_ATTEMPTS: usize = 5;

/// A port nothing listens on now (bound, then released for etcd to take), never the same one twice in one
/// test process: the kernel may hand a just-released port out again, and this binary's tests start their
/// members side by side. Another process can still take the port before etcd binds it; [`EtcdMember::start`]
/// sees etcd exit and tries other ports.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// What a spawned member did first.
enum Start {
    Serving,
    PortTaken,
}

impl EtcdMember {
    /// Starts a member and returns once it serves clients (its log says so). A member that exits because
    /// one of its ports was taken in the meantime is started again, afresh, on other ports: a test must
    /// never talk to somebody else's etcd that happens to sit on the port it picked.
    pub fn start() -> EtcdMember {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("m{}", std::process::id());
        let mut member = EtcdMember {
            child: None,
            client_url: String::new(),
            peer_url: String::new(),
            dir,
            name,
        };
        for _ in 0..START_ATTEMPTS {
            member.client_url = format!("http://127.0.0.1:{}", free_port());
            member.peer_url = format!("http://127.0.0.1:{}", free_port());
            let _ = std::fs::remove_dir_all(member.data_dir());
            if let Start::Serving = member.spawn_and_wait() {
                return member;
            }
        }
        panic!(
            "etcd found its ports taken {START_ATTEMPTS} times in a row; is something binding many loopback ports?\n{}",
            member.log()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns the member and waits until it serves clients or exits because a port was taken; any other
    /// exit, or no answer within [`START_DEADLINE`], fails the test with the member's log.
    fn spawn_and_wait(&mut self) -> Start {
        let from = std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize);
        self.spawn();
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let log = self.log();
            let this_run = log.get(from..).unwrap_or("");
            if this_run.contains("ready to serve client requests") {
                return Start::Serving;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                if this_run.contains("address already in use") {
                    return Start::PortTaken;
                }
                panic!("etcd exited ({status}) before serving:\n{log}");
            }
            if Instant::now() > deadline {
                panic!("etcd did not serve within {START_DEADLINE:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&self.client_url)
            .arg("--advertise-client-urls")
            .arg(&self.client_url)
            .arg("--listen-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={}", self.name, self.peer_url))
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}); run tests/setup.sh to install etcd-server"));
        self.child = Some(child);
    }

    /// A new client of this member.
    pub async fn store(&self) -> Arc<EtcdStore> {
        let store = EtcdStore::new(&EtcdOptions {
            endpoints: vec![self.client_url.clone()],
            tls: None,
        })
        .unwrap();
        if let Err(e) = store.wait_until_reachable(START_DEADLINE).await {
            panic!("etcd did not start: {e}\n{}", self.log());
        }
        store
    }

    /// SIGKILL: the member stops answering at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on its ports and data, and returns once it serves clients.
    pub fn restart(&mut self) {
        self.kill();
        if let Start::PortTaken = self.spawn_and_wait() {
            panic!(
                "another process took this member's port while it was down; run the test again\n{}",
                self.log()
            );
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}
