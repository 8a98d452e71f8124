//! The agent's YAML configuration file (`basalt agent --config FILE`).
//!
//! Every key has a default, so the agent runs with no file at all: an
//! embedded store, one pool under `./basalt-data`, the API on
//! 127.0.0.1:9700, services as child processes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::model::{NodeName, PortRange};

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    /// Where the agent keeps its own state (the embedded store, secrets
    /// files, service logs).
    pub data_dir: PathBuf,
    pub pools: Vec<PoolConfig>,
    pub cluster: ClusterConfig,
    pub endpoints: EndpointsConfig,
    pub runtime: RuntimeConfig,
    pub failover: FailoverConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Default: the host name.
    pub name: NodeName,
    /// The address other hosts reach this host's services at (default
    /// 127.0.0.1: a one-host cluster).
    pub address: IpAddr,
    pub labels: BTreeMap<String, String>,
    /// Ports given to this host's replicas and controllers.
    pub ports: PortRange,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub kind: PoolKindConfig,
    /// Most bytes placement gives to replicas here (default: the
    /// filesystem's or the device's size).
    pub capacity_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolKindConfig {
    Directory(PathBuf),
    BlockDevice(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterConfig {
    /// One host; state in a crash-safe file under `data_dir`.
    Embedded,
    Etcd(EtcdConfig),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How long a node stays up without renewing its lease.
    pub lease_ttl: Duration,
}

/// Which endpoints this agent serves (one process may serve several).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointsConfig {
    pub api: Option<ApiEndpoint>,
    pub docker: Option<PathBuf>,
    pub csi: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiEndpoint {
    pub listen: SocketAddr,
    /// A file holding the bearer token every request but the health probe
    /// must carry (none: no authentication, allowed only on a loopback
    /// address).
    pub token_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeConfig {
    /// Child processes of the agent, supervised and restarted.
    Process {
        /// The `basalt` binary to run (default: the agent's own executable).
        binary: Option<PathBuf>,
    },
    /// One container per service through the Docker Engine API.
    Docker {
        /// The Engine API's unix socket (default /var/run/docker.sock).
        socket: PathBuf,
        /// The image `images/build.sh` builds.
        image: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverConfig {
    /// How long a node may be down before its replicas are replaced
    /// elsewhere.
    pub replica_grace: Duration,
}
