//! One real etcd member for a test: Debian's `etcd` (installed by tests/setup.sh) on free
//! loopback ports with its own data directory, killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

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

/// A port nothing listens on now (bound, then released for etcd to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdMember {
    /// Starts a member; it answers once [`EtcdMember::store`]'s wait returns.
    pub fn start() -> EtcdMember {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("m{}", std::process::id());
        let mut member = EtcdMember {
            child: None,
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir,
            name,
        };
        member.spawn();
        member
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
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
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            panic!("etcd did not start: {e}\n{log}");
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

    /// Starts the member again on its ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}
