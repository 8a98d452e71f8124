//! The agent's YAML configuration file (`basalt agent --config FILE`).
//!
//! Every key has a default, so the agent runs with no file at all: an
//! embedded store, one pool under `./basalt-data/_agent`, the API on
//! 127.0.0.1:9700, services as child processes. [`Config::default_yaml`]
//! prints the defaults as a commented file.
//!
//! Reading is strict: an unknown key, a value of the wrong type or shape, or
//! a rule broken between keys (a TLS certificate without its key) is an error that names the
//! file, the line and column, and the key path (`pools[1].capacity`), says
//! what is wrong and what to write instead. The rules live next to the keys
//! they govern, in [`raw`], where they run inside the YAML reader so that
//! each error carries its position.

mod raw;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_engine::units::format_duration;

use crate::model::{NodeName, PortRange};
use raw::{Checked, Leaf, RawConfig};

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
    /// `None`: the file says `api: off`.
    pub api: Option<ApiEndpoint>,
    /// The Docker volume plugin's socket.
    pub docker: Option<PathBuf>,
    /// The CSI driver's socket, serving both the controller and the node
    /// service.
    pub csi: Option<PathBuf>,
    /// A socket serving the CSI controller service alone.
    pub csi_controller: Option<PathBuf>,
    /// A socket serving the CSI node service alone.
    pub csi_node: Option<PathBuf>,
    /// Where this agent's iSCSI login redirector listens
    /// ([`basalt_target::iscsi::redirect`]). The volumes this host attaches
    /// (Docker plugin, CSI node) log in through it, so their initiators find
    /// a controller that moved to another host on their next reconnect.
    /// Default: `node.address:3260` with `store: etcd` (controllers move
    /// between hosts), none with the embedded store (they never leave it).
    pub iscsi_redirector: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiEndpoint {
    pub listen: SocketAddr,
    /// A file holding the bearer token every request but the health probe
    /// must carry. None: the agent generates one into `DATA_DIR/api-token`
    /// (see [`crate::api::token`]); the API never runs without a token.
    pub token_file: Option<PathBuf>,
    /// The API serves HTTPS with these (PEM) when both are given.
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

/// The address services are reached at when nothing else is said: a
/// one-host cluster.
pub const DEFAULT_ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Ports for services: a replica takes one, a controller two, so 900 ports
/// hold some hundreds of volumes; above the registered ports most services
/// use, below the kernel's ephemeral range (32768 on).
pub const DEFAULT_PORTS: PortRange = PortRange {
    first: 7100,
    last: 7999,
};
/// Next to where the agent is started, so a first try leaves nothing
/// elsewhere on the host. `basalt volume up` keeps a volume's data in
/// `./basalt-data/NAME` by default; `_agent` is no volume name (they take
/// no `_`), so the two never share a directory.
pub const DEFAULT_DATA_DIR: &str = "./basalt-data/_agent";
/// The pool a file without `pools` gets, at `DATA_DIR/pools/default`.
pub const DEFAULT_POOL: &str = "default";
/// The API's address: loopback, so that a first try is not reachable from
/// other hosts (the token is required either way).
pub const DEFAULT_API_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9700);
/// The iSCSI redirector's port by default: iSCSI's well-known port, since
/// initiators are configured with it.
pub const DEFAULT_REDIRECTOR_PORT: u16 = 3260;
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The tag `images/build.sh` always gives the image it builds.
pub const DEFAULT_IMAGE: &str = "basalt:latest";
/// A node is down this long after its agent stops renewing: long enough to
/// ride out a busy host's late renewal (renewals run at a third of it), and
/// long enough that a controller cut off by a partition has stopped serving
/// reads before its successor starts: its lease lapses at the earliest two
/// thirds of this after the cut, and the controller drops unreachable
/// replicas within 10 s (README, "Failover and maintenance").
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// Replacing a replica copies the whole volume, so a node gets time to come
/// back (a reboot, an agent upgrade) before its replicas are given up.
pub const DEFAULT_REPLICA_GRACE: Duration = Duration::from_secs(5 * 60);

/// Why the configuration cannot be used. Every message names the file, and
/// the key (with its line and column when the file holds it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent configuration {path}: {source}; check the path given with --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key of the file (or the file as a whole, when `key` is `.`) is wrong.
    #[error("{file}:{line}:{column}: {}{message}", key_prefix(key))]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// A default that comes from the host does not work, for a key the file
    /// does not set.
    #[error("{file}: key `{key}`: {message}")]
    Default {
        file: String,
        key: String,
        message: String,
    },
    /// Keys of different sections that do not go together; `key` is the one
    /// to change.
    #[error("{file}: key `{key}`: {message}")]
    Rule {
        file: String,
        key: String,
        message: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

/// What the defaults take from the host.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Host {
    /// The host name, lower-cased (as node names are).
    name: Result<String, String>,
    /// Relative paths in the file are taken from here.
    current_dir: PathBuf,
}

impl Host {
    fn this() -> Host {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|name| name.trim().to_ascii_lowercase())
            .map_err(|e| format!("the host name cannot be read ({e})"));
        let current_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        Host { name, current_dir }
    }

    /// `path` from the current directory, without `.` components (the
    /// path is shown in records and messages).
    fn absolute(&self, path: PathBuf) -> PathBuf {
        if path.is_absolute() {
            path
        } else {
            let relative: PathBuf = path
                .components()
                .filter(|c| *c != std::path::Component::CurDir)
                .collect();
            if relative.as_os_str().is_empty() {
                self.current_dir.clone()
            } else {
                self.current_dir.join(relative)
            }
        }
    }
}

impl Config {
    /// Read the configuration from `path`, or the defaults when there is no
    /// file.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse("", "(defaults)"),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::parse(&text, &path.display().to_string())
            }
        }
    }

    /// The configuration a file holding `text` gives; `file` names it in
    /// errors. Relative paths are taken from the current directory.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse_on(text, file, &Host::this())
    }

    /// The defaults: what the agent runs with without a file.
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::load(None)
    }

    fn parse_on(text: &str, file: &str, host: &Host) -> Result<Config, ConfigError> {
        let deserializer = serde_norway::Deserializer::from_str(text);
        let raw: RawConfig = match serde_path_to_error::deserialize(deserializer) {
            Ok(raw) => raw,
            Err(e) => return Err(invalid(file, e)),
        };
        Config::from_raw(raw, file, host)
    }

    fn from_raw(raw: RawConfig, file: &str, host: &Host) -> Result<Config, ConfigError> {
        let Checked(node) = raw.node;
        let name = match node.name {
            Some(Leaf(name)) => name,
            None => {
                let from_host = host.name.clone().and_then(|name| NodeName::new(&name));
                from_host.map_err(|reason| ConfigError::Default {
                    file: file.to_string(),
                    key: "node.name".to_string(),
                    message: format!(
                        "the node's name defaults to the host name, which does not work here: {reason}; set node.name"
                    ),
                })?
            }
        };
        let data_dir = host.absolute(
            raw.data_dir
                .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), |Leaf(p)| p.0),
        );
        let pools = match raw.pools {
            None => vec![PoolConfig {
                name: DEFAULT_POOL.to_string(),
                kind: PoolKindConfig::Directory(data_dir.join("pools").join(DEFAULT_POOL)),
                capacity_bytes: None,
            }],
            Some(raw::Pools(pools)) => pools,
        };
        let Checked(cluster) = raw.cluster;
        let cluster = match cluster.etcd {
            None => ClusterConfig::Embedded,
            Some(Checked(etcd)) => ClusterConfig::Etcd(EtcdConfig {
                endpoints: etcd.endpoints.into_iter().map(|Leaf(e)| e.0).collect(),
                ca_file: etcd.ca_file.map(|Leaf(f)| host.absolute(f.0)),
                cert_file: etcd.cert_file.map(|Leaf(f)| host.absolute(f.0)),
                key_file: etcd.key_file.map(|Leaf(f)| host.absolute(f.0)),
                lease_ttl: etcd.lease_ttl.map_or(DEFAULT_LEASE_TTL, |Leaf(t)| t.0),
            }),
        };
        let address = node.address.as_ref().map_or(DEFAULT_ADDRESS, |Leaf(a)| *a);
        if matches!(cluster, ClusterConfig::Etcd(_)) && address.is_loopback() {
            let message = format!(
                "with `store: etcd` other hosts reach this node's services at node.address, and {address} would make them dial themselves; set node.address to an address of this host the others can reach"
            );
            return Err(match node.address {
                None => ConfigError::Default {
                    file: file.to_string(),
                    key: "node.address".to_string(),
                    message: format!("node.address defaults to {DEFAULT_ADDRESS}: {message}"),
                },
                Some(_) => ConfigError::Rule {
                    file: file.to_string(),
                    key: "node.address".to_string(),
                    message,
                },
            });
        }
        let Checked(raw_endpoints) = raw.endpoints;
        let socket = |path: Option<Leaf<raw::AnyPath>>| path.map(|Leaf(p)| host.absolute(p.0));
        let endpoints = EndpointsConfig {
            api: match raw_endpoints.api {
                raw::ApiSetting::Off => None,
                raw::ApiSetting::On(Checked(api)) => Some(ApiEndpoint {
                    listen: api.listen.map_or(DEFAULT_API_LISTEN, |Leaf(l)| l),
                    token_file: api.token_file.map(|Leaf(f)| host.absolute(f.0)),
                    tls_cert_file: api.tls_cert_file.map(|Leaf(f)| host.absolute(f.0)),
                    tls_key_file: api.tls_key_file.map(|Leaf(f)| host.absolute(f.0)),
                }),
            },
            docker: socket(raw_endpoints.docker),
            csi: socket(raw_endpoints.csi),
            csi_controller: socket(raw_endpoints.csi_controller),
            csi_node: socket(raw_endpoints.csi_node),
            iscsi_redirector: match (raw_endpoints.iscsi_redirector, &cluster) {
                (Some(Leaf(raw::RedirectorSetting::At(addr))), _) => Some(addr),
                (Some(Leaf(raw::RedirectorSetting::Off)), _) => None,
                (None, ClusterConfig::Etcd(_)) => Some(SocketAddr::new(address, DEFAULT_REDIRECTOR_PORT)),
                (None, ClusterConfig::Embedded) => None,
            },
        };
        if let Some(redirector) = endpoints.iscsi_redirector {
            let ports = node.ports.as_ref().map_or(DEFAULT_PORTS, |Leaf(p)| *p);
            let clash = if (ports.first..=ports.last).contains(&redirector.port()) {
                Some(format!(
                    "port {} is in node.ports {}-{}, which this host gives to volume services; pick a port outside that range",
                    redirector.port(),
                    ports.first,
                    ports.last
                ))
            } else if endpoints.api.as_ref().is_some_and(|api| api.listen == redirector) {
                Some(format!(
                    "{redirector} is also endpoints.api.listen; give each its own port"
                ))
            } else {
                None
            };
            if let Some(message) = clash {
                return Err(ConfigError::Rule {
                    file: file.to_string(),
                    key: "endpoints.iscsi_redirector".to_string(),
                    message,
                });
            }
        }
        let Checked(runtime) = raw.runtime;
        let runtime = match runtime.kind {
            raw::RuntimeKind::Process => RuntimeConfig::Process {
                binary: runtime.binary.map(|Leaf(f)| host.absolute(f.0)),
            },
            raw::RuntimeKind::Docker => RuntimeConfig::Docker {
                socket: runtime.docker_socket.map_or_else(
                    || PathBuf::from(DEFAULT_DOCKER_SOCKET),
                    |Leaf(p)| host.absolute(p.0),
                ),
                image: runtime
                    .image
                    .map_or_else(|| DEFAULT_IMAGE.to_string(), |Leaf(i)| i.0),
            },
        };
        Ok(Config {
            node: NodeConfig {
                name,
                address,
                labels: node.labels.into_iter().map(|(k, Leaf(v))| (k, v.0)).collect(),
                ports: node.ports.map_or(DEFAULT_PORTS, |Leaf(p)| p),
            },
            data_dir,
            pools,
            cluster,
            endpoints,
            runtime,
            failover: FailoverConfig {
                replica_grace: raw
                    .failover
                    .replica_grace
                    .map_or(DEFAULT_REPLICA_GRACE, |Leaf(g)| g.0),
            },
        })
    }

    /// The defaults as a commented YAML file (`basalt agent
    /// --print-default-config`); read back, it gives [`Config::defaults`].
    /// The node's name is left commented out: it is this host's name, and a
    /// copy of the file on another host must not claim this one's.
    pub fn default_yaml() -> String {
        format!(
            r#"# The Basalt agent's configuration (`basalt agent --config FILE`).
# Every key may be left out; the values shown are the defaults.

node:
  # This node's name in the cluster (default: the host name).
  # name: host-1
  # The address other hosts reach this host's services at.
  address: {address}
  # Topology labels, e.g. {{zone: eu-1a, rack: r12}}: a volume's replicas go to
  # distinct values of its spread key (default `zone`) where labels allow.
  labels: {{}}
  # Ports given to this host's services: one per replica, two per controller.
  ports: {first}-{last}

# The agent's own state: the embedded store, secrets, service logs. A relative
# path is taken from the directory the agent starts in.
data_dir: {data_dir}

# Where replicas live (default: one directory pool `{pool}` at
# DATA_DIR/pools/{pool}). Each pool is a directory (`path`, absolute; one
# subdirectory per replica) or a raw block device (`device`; one replica).
# pools:
#   - name: nvme
#     path: /mnt/nvme/basalt
#     capacity: 500G        # most given to replicas (default: the filesystem's size)
#   - name: sdc
#     device: /dev/sdc

cluster:
  # `embedded`: one host, state under data_dir; `etcd`: hosts share an etcd cluster.
  store: embedded
  # etcd:
  #   endpoints: [https://10.0.0.1:2379]
  #   ca_file: /etc/basalt/etcd-ca.pem
  #   cert_file: /etc/basalt/etcd-client.pem
  #   key_file: /etc/basalt/etcd-client-key.pem
  #   lease_ttl: {lease_ttl}         # a node is down this long after its agent stops
  # With etcd, node.address must be this host's address the others reach.

endpoints:
  # The REST API; `api: off` turns it off (an empty `api:` means the defaults).
  api:
    listen: {listen}
    # token_file: /etc/basalt/api-token   # the bearer token; default: generated once into DATA_DIR/api-token
    # tls_cert_file: /etc/basalt/tls.pem     # with tls_key_file: HTTPS (clients pass the CA: --agent-ca)
    # tls_key_file: /etc/basalt/tls-key.pem
  # docker: /run/docker/plugins/basalt.sock       # the Docker volume plugin
  # csi: /var/lib/kubelet/plugins/basalt/csi.sock # the CSI driver (controller and node)
  # csi_controller: /run/basalt/csi-controller.sock  # the CSI controller service alone
  # csi_node: /var/lib/kubelet/plugins/basalt/csi-node.sock  # the CSI node service alone
  # The iSCSI login redirector the volumes this host attaches log in through, so
  # that they follow a controller that moves to another host; `off` turns it off.
  # Default: node.address:{redirector_port} with store: etcd, off with the embedded store.
  # iscsi_redirector: 10.0.0.1:{redirector_port}

runtime:
  # `process`: child processes of the agent; `docker`: a container per service.
  kind: process
  # binary: /usr/local/bin/basalt        # process: the binary (default: the agent's own)
  # docker_socket: {docker_socket}   # docker: the Engine API
  # image: {image}               # docker: what images/build.sh builds

failover:
  # How long a node may be down before its replicas are rebuilt elsewhere
  # (a duration with its unit: ms, s, m or h).
  replica_grace: {grace}
"#,
            address = DEFAULT_ADDRESS,
            first = DEFAULT_PORTS.first,
            last = DEFAULT_PORTS.last,
            data_dir = DEFAULT_DATA_DIR,
            pool = DEFAULT_POOL,
            lease_ttl = format_duration(DEFAULT_LEASE_TTL),
            listen = DEFAULT_API_LISTEN,
            redirector_port = DEFAULT_REDIRECTOR_PORT,
            docker_socket = DEFAULT_DOCKER_SOCKET,
            image = DEFAULT_IMAGE,
            grace = format_duration(DEFAULT_REPLICA_GRACE),
        )
    }
}

/// A YAML or rule error as the operator reads it: file, line, column, key,
/// what is wrong, and the key meant when a typo is close to one.
fn invalid(file: &str, error: serde_path_to_error::Error<serde_norway::Error>) -> ConfigError {
    // The path ends in `?` where the reader stopped inside a key it could
    // not read (broken YAML): the key is what comes before.
    let path = error.path().to_string();
    let key = match path.find('?') {
        Some(at) => path[..at].trim_end_matches('.').to_string(),
        None => path,
    };
    let inner = error.inner();
    let (line, column) = inner.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = inner.to_string();
    // The YAML reader's own text repeats the key and the position, which the
    // error gives in its own fields.
    if let Some((prefix, rest)) = message.split_once(": ") {
        let repeats_key = prefix == key
            || key
                .strip_prefix(prefix)
                .is_some_and(|tail| tail.starts_with(['.', '[']));
        if repeats_key {
            message = rest.to_string();
        }
    }
    message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    if let Some(meant) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{meant}`?"));
    }
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        key,
        message,
    }
}

/// For "unknown field `tokn_file`, expected one of `listen`, `token_file`"
/// (and unknown variants), the expected name closest to the typo, if it is
/// close enough to be the one meant.
fn did_you_mean(message: &str) -> Option<String> {
    if !message.starts_with("unknown field") && !message.starts_with("unknown variant") {
        return None;
    }
    let mut quoted = message.split('`').skip(1).step_by(2);
    let typo = quoted.next()?;
    quoted
        .map(|candidate| (edit_distance(typo, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.len() / 3).clamp(1, 3))
        .min()
        .map(|(_, candidate)| candidate.to_string())
}

/// Levenshtein distance, with a swap of two neighbours counting as one edit
/// (the commonest typo).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = rows[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution.min(rows[i - 1][j] + 1).min(rows[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests;
