//! The agent process: config → store → node registration and lease →
//! reconciler → API server.
//!
//! ```text
//!  run(config)
//!   ├─ open the store (embedded: DATA_DIR/store; etcd: wait until a member
//!   │  answers, at most ETCD_START_WAIT)
//!   ├─ register the node (its NodeRecord: address, labels, pools measured with statvfs)
//!   ├─ grant a lease, put keys::node_alive with it, keep it alive
//!   ├─ start the runtime (process or docker) and the reconciler
//!   ├─ serve the REST API on endpoints.api (its token from token_file or
//!   │  generated into DATA_DIR/api-token; HTTPS with tls_cert/key_file)
//!   ├─ serve the iSCSI login redirector on endpoints.iscsi_redirector
//!   │  (crate::redirect) and the Docker and CSI endpoints
//!   └─ on cancel: stop the reconciler, revoke the lease (the node is down
//!      at once, not after the TTL); the services keep running (see below)
//!
//!  start_node (the middle of run, a library function so that a test can
//!  run several nodes in one process): register, lease, keep-alive, reconciler
//! ```
//!
//! The services outlive the agent, on a clean stop as on a crash: the next
//! agent adopts them ([`crate::runtime::process`]), so restarting or
//! upgrading the agent never interrupts a volume's I/O. To stop a volume,
//! delete it (or stop its services' processes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, Config, EtcdConfig, PoolKindConfig, RuntimeConfig};
use crate::metrics::AgentMetrics;
use crate::model::{keys, NodeAlive, NodeRecord, PoolKind, PoolRecord};
use crate::reconcile::{Local, NodeLease, Reconciler};
use crate::runtime::Runtime;
use crate::store::etcd::{EtcdOptions, EtcdStore, TlsFiles};
use crate::store::{self, Expect, LeaseId, Store, StoreError};

/// How long the node stays up without renewing its lease. Short on one host:
/// nothing fails over there, and `node ls` shows a stopped agent as down
/// soon. Long enough that a busy machine (two cores shared by builds)
/// renewing every third of it never misses.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the pools' free space is measured again and registered.
const POOL_REFRESH: Duration = Duration::from_secs(30);
/// Attempts at registering the node when someone else (the API cordoning
/// it) writes its record at the same moment.
const REGISTER_ATTEMPTS: usize = 5;

/// Which endpoints attach volumes on this host (the Docker plugin, the CSI node service): they share
/// one [`crate::host::Host`], whose per-volume locks keep two endpoints from interleaving the steps of
/// one volume, and whose recovery at start runs once.
pub fn host_users(config: &Config) -> Vec<&'static str> {
    [
        ("endpoints.docker", config.endpoints.docker.is_some()),
        ("endpoints.csi", config.endpoints.csi.is_some()),
        ("endpoints.csi_node", config.endpoints.csi_node.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect()
}

/// This host's attachments, opened once for every endpoint that attaches volumes (none: `None`). What
/// an earlier agent left is recovered first: reused where it still works, undone where it does not.
async fn open_host(config: &Config) -> anyhow::Result<Option<Arc<crate::host::Host>>> {
    let users = host_users(config);
    if users.is_empty() {
        return Ok(None);
    }
    let data_dir = config.data_dir.clone();
    let redirector = config.endpoints.iscsi_redirector;
    let initiator = crate::model::initiator_iqn(&config.node.name);
    let users = users.join(", ");
    let host = tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<crate::host::Host>> {
        let host = crate::host::Host::open(&data_dir, Some(initiator))
            .with_context(|| format!("{users}: attaching volumes on this host"))?
            .redirecting_through(redirector);
        host.recover().context("recovering this host's attachments")?;
        Ok(Arc::new(host))
    })
    .await??;
    Ok(Some(host))
}

/// Runs the agent until `cancel`.
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "creating the agent's data directory {}",
            config.data_dir.display()
        )
    })?;
    let store = open_store(&config).await?;
    let metrics = Arc::new(AgentMetrics::new());

    // Bind the API and read its token and TLS files first: a port already
    // taken or an unusable file fails the start before the node says it is up.
    let api = match &config.endpoints.api {
        Some(api) => Some(prepare_api(api, &config.data_dir).await?),
        None => None,
    };
    let csi_listeners = crate::csi::serve::bind_configured(&config.endpoints)?;
    let redirector = match config.endpoints.iscsi_redirector {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen for iSCSI logins on {addr} (endpoints.iscsi_redirector; `off` turns it off)"
            )
        })?),
        None => None,
    };

    let runtime: Arc<dyn Runtime> = match &config.runtime {
        RuntimeConfig::Process { binary } => {
            let binary = match binary {
                Some(b) => b.clone(),
                None => std::env::current_exe().context("finding the agent's own executable")?,
            };
            Arc::new(crate::runtime::process::ProcessRuntime::new(
                binary,
                config.data_dir.clone(),
            )?)
        }
        RuntimeConfig::Docker { socket, image } => Arc::new(crate::runtime::docker::DockerRuntime::new(
            socket.clone(),
            image.clone(),
            config.node.name.clone(),
        )),
    };

    // The host first: the node's record names the initiator its attachments log in as.
    let host = open_host(&config).await?;
    let initiator = host.as_ref().and_then(|h| h.initiator().map(str::to_string));
    let node = start_node(store.clone(), &config, runtime, metrics.clone(), initiator).await?;
    let tasks = cancel.child_token();
    // One context for every endpoint: the Docker plugin calls the same
    // operations as the REST API (one place for each check).
    let ctx = crate::api::ApiContext {
        store: store.clone(),
        node: config.node.name.clone(),
        controllers: Arc::new(crate::api::GrpcConnector),
        // Without a REST endpoint nobody presents a token; a random one
        // keeps the context whole and opens nothing.
        token: api
            .as_ref()
            .map_or_else(basalt_engine::api_auth::ApiToken::generate, |a| a.token.clone()),
        agent_metrics: Some(metrics.clone()),
    };
    let docker_task = match (&config.endpoints.docker, &host) {
        (Some(socket), Some(host)) => {
            Some(start_docker(&config, socket, host.clone(), ctx.clone(), tasks.clone()).await?)
        }
        _ => None,
    };
    let csi_node = match &host {
        Some(host) if csi_listeners.iter().any(|(_, _, role)| role.serves_node()) => Some(Arc::new(
            crate::csi::node::NodeService::new(ctx.clone(), host.clone(), &config.data_dir)?,
        )),
        _ => None,
    };
    let redirector_task = redirector.map(|listener| {
        tracing::info!(
            listen = %config.endpoints.iscsi_redirector.map(|a| a.to_string()).unwrap_or_default(),
            "iSCSI logins to this host's volumes go through the redirector, which sends them to each volume's controller"
        );
        let resolver = Arc::new(crate::redirect::StoreResolver { store: store.clone() });
        tokio::spawn(basalt_target::iscsi::redirect::serve(listener, resolver, tasks.clone()))
    });
    let api_task = api.map(|api| {
        tracing::info!(
            api = %api.url,
            token_file = %api.token_source.path().display(),
            token = match api.token_source {
                crate::api::token::TokenSource::Configured(_) => "configured",
                crate::api::token::TokenSource::Generated(_) => "generated",
                crate::api::token::TokenSource::Kept(_) => "generated earlier",
            },
            "agent serving; clients need the token in token_file"
        );
        tokio::spawn(crate::api::serve(
            api.listener,
            ctx.clone(),
            api.transport,
            tasks.clone(),
        ))
    });
    // The CSI sockets' permissions guard them (the CO's sidecars carry no
    // token); they share the API's context, so its token is never asked.
    let csi_tasks: Vec<_> = csi_listeners
        .into_iter()
        .map(|(listener, path, role)| {
            tokio::spawn(crate::csi::serve::serve(
                listener,
                path,
                role,
                ctx.clone(),
                csi_node.clone(),
                tasks.clone(),
            ))
        })
        .collect();

    cancel.cancelled().await;
    tracing::info!("stopping the agent; the volumes' services keep running");
    tasks.cancel();
    if let Some(t) = api_task {
        let _ = t.await;
    }
    if let Some(t) = docker_task {
        let _ = t.await;
    }
    if let Some(t) = redirector_task {
        let _ = t.await;
    }
    for t in csi_tasks {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %format!("{e:#}"), "the CSI server stopped with an error");
        }
    }
    node.stop(store.as_ref()).await;
    Ok(())
}

/// The Docker volume plugin on `socket`, over this host's attachments (recovered already); the socket
/// bound (a failure stops the start, naming the key).
async fn start_docker(
    config: &Config,
    socket: &Path,
    host: Arc<crate::host::Host>,
    api: crate::api::ApiContext,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let scope = match config.cluster {
        ClusterConfig::Embedded => crate::docker::Scope::Local,
        ClusterConfig::Etcd(_) => crate::docker::Scope::Global,
    };
    let driver = Arc::new(crate::docker::Driver::new(api, host, &config.data_dir, scope)?);
    driver
        .recover()
        .await
        .context("endpoints.docker: cleaning up after the previous agent")?;
    let listener = crate::docker::bind(socket).await?;
    tracing::info!(socket = %socket.display(), "serving the Docker volume plugin");
    Ok(tokio::spawn(crate::docker::serve(
        listener,
        socket.to_path_buf(),
        driver,
        cancel,
    )))
}

/// How long the agent waits at start for etcd to answer: members started
/// with the agents (a host booting) elect a leader within a few seconds; an
/// endpoint that has not answered by then is misconfigured or down, and the
/// operator hears so rather than watching an agent that hangs.
pub const ETCD_START_WAIT: Duration = Duration::from_secs(20);

/// The etcd store the config names, once a member answers.
async fn open_etcd(config: &EtcdConfig) -> anyhow::Result<Arc<dyn Store>> {
    let options = etcd_options(config)?;
    let store = EtcdStore::new(&options).map_err(|e| anyhow::anyhow!("cluster.etcd: {e}"))?;
    store.wait_until_reachable(ETCD_START_WAIT).await.map_err(|e| {
        anyhow::anyhow!(
            "{e}; start etcd there, or correct cluster.etcd.endpoints in the config (the agent does not start \
             without its cluster store; the volumes this host serves keep running meanwhile)"
        )
    })?;
    tracing::info!(endpoints = %options.endpoints.join(","), "cluster store: etcd");
    Ok(store)
}

/// The etcd client's options: the endpoints, and the TLS files read now
/// (an unreadable file is named with its key).
pub fn etcd_options(config: &EtcdConfig) -> anyhow::Result<EtcdOptions> {
    let read = |key: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("reading cluster.etcd.{key} {}", path.display()))
    };
    let tls = match (&config.ca_file, &config.cert_file, &config.key_file) {
        (None, None, None) => None,
        (None, _, _) => anyhow::bail!(
            "cluster.etcd.cert_file/key_file are given without ca_file; give the CA that signed etcd's \
             certificates as ca_file"
        ),
        (Some(ca), cert, key) => {
            let identity = match (cert, key) {
                (Some(cert), Some(key)) => Some((read("cert_file", cert)?, read("key_file", key)?)),
                _ => None,
            };
            Some(TlsFiles {
                ca: read("ca_file", ca)?,
                identity,
            })
        }
    };
    Ok(EtcdOptions {
        endpoints: config.endpoints.clone(),
        tls,
    })
}

/// One node of a cluster at work: registered, its lease kept alive, its
/// reconciler running. Everything the agent does but opening the store and
/// serving the API, so that a test can run several nodes in one process
/// over one store (each with its own config, data directory and runtime).
pub struct RunningNode {
    /// The node's lease (replaced when it lapses).
    pub lease: NodeLease,
    cancel: CancellationToken,
    reconcile: tokio::task::JoinHandle<()>,
    keep_alive: tokio::task::JoinHandle<LeaseId>,
}

/// Registers `config`'s node in `store`, grants its lease and starts its
/// reconciler over `runtime` and the task that keeps the lease alive.
/// `initiator`: the iSCSI initiator name this host's attachments log in as ([`Host::initiator`]), none
/// when it attaches nothing.
///
/// [`Host::initiator`]: crate::host::Host::initiator
pub async fn start_node(
    store: Arc<dyn Store>,
    config: &Config,
    runtime: Arc<dyn Runtime>,
    metrics: Arc<AgentMetrics>,
    initiator: Option<String>,
) -> anyhow::Result<RunningNode> {
    register(store.as_ref(), &node_record(config, initiator.as_deref())?).await?;
    let lease = NodeLease::new(grant_alive(store.as_ref(), config).await?);
    tracing::info!(node = %config.node.name, "node registered");
    let cancel = CancellationToken::new();
    let reconciler = Reconciler::new(
        store.clone(),
        runtime,
        Local {
            me: config.node.name.clone(),
            data_dir: absolute(&config.data_dir)?,
        },
        metrics.clone(),
        lease.clone(),
        config.failover.replica_grace,
    );
    let reconcile = tokio::spawn(reconciler.run(cancel.clone()));
    let keep_alive = tokio::spawn(keep_alive(
        store,
        config.clone(),
        initiator,
        lease.clone(),
        metrics,
        cancel.clone(),
    ));
    Ok(RunningNode {
        lease,
        cancel,
        reconcile,
        keep_alive,
    })
}

impl RunningNode {
    /// Stops reconciling and renewing, and revokes the lease: the node is
    /// down at once (not after the TTL). Its services keep running.
    pub async fn stop(self, store: &dyn Store) {
        let lease = self.halt().await;
        if let Err(e) = store.revoke(lease).await {
            tracing::warn!(error = %e, "could not revoke the node's lease; it lapses by itself");
        }
    }

    /// Stops reconciling and renewing without a word to the store, as a
    /// crash or a partition would: the lease lapses after its TTL. Returns it.
    pub async fn halt(self) -> LeaseId {
        self.cancel.cancel();
        let _ = self.reconcile.await;
        self.keep_alive.await.unwrap_or_else(|_| self.lease.get())
    }
}

/// The cluster store the config names (etcd: once a member answers).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.cluster {
        ClusterConfig::Embedded => {
            let dir = config.data_dir.join("store");
            crate::store::embedded::EmbeddedStore::open(&dir)
                .with_context(|| format!("opening the embedded cluster store in {}", dir.display()))?
        }
        ClusterConfig::Etcd(etcd) => open_etcd(etcd).await?,
    })
}

/// The API endpoint, ready to serve: bound, its token read or generated, its TLS files loaded.
struct PreparedApi {
    listener: tokio::net::TcpListener,
    token: basalt_engine::api_auth::ApiToken,
    token_source: crate::api::token::TokenSource,
    transport: crate::api::Transport,
    url: String,
}

async fn prepare_api(api: &crate::config::ApiEndpoint, data_dir: &Path) -> anyhow::Result<PreparedApi> {
    let transport = match (&api.tls_cert_file, &api.tls_key_file) {
        (Some(cert), Some(key)) => crate::api::Transport::Tls(crate::api::tls::server_config(cert, key)?),
        // The config reader refuses one without the other.
        _ => crate::api::Transport::Plain,
    };
    let (token, token_source) = crate::api::token::load_or_generate(api.token_file.as_deref(), data_dir)?;
    let listener = tokio::net::TcpListener::bind(api.listen).await.with_context(|| {
        format!(
            "cannot listen for the API on {} (endpoints.api.listen)",
            api.listen
        )
    })?;
    Ok(PreparedApi {
        listener,
        token,
        token_source,
        transport,
        url: api_url(api),
    })
}

/// The API's URL as clients reach it: `https://` when it serves TLS.
fn api_url(api: &crate::config::ApiEndpoint) -> String {
    let scheme = if api.tls_cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}", api.listen)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// This node as the config describes it, its pools measured now.
pub fn node_record(config: &Config, initiator: Option<&str>) -> anyhow::Result<NodeRecord> {
    let mut pools = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        let (kind, size, free) = match &pool.kind {
            PoolKindConfig::Directory(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating pool {}'s directory {}", pool.name, dir.display()))?;
                let (size, free) = filesystem_space(dir)
                    .with_context(|| format!("measuring pool {} ({})", pool.name, dir.display()))?;
                (PoolKind::Directory(absolute(dir)?), size, free)
            }
            PoolKindConfig::BlockDevice(dev) => {
                let size = device_size(dev)
                    .with_context(|| format!("measuring pool {} ({})", pool.name, dev.display()))?;
                (PoolKind::BlockDevice(dev.clone()), size, size)
            }
        };
        let capacity = pool.capacity_bytes.map_or(size, |cap| cap.min(size));
        pools.push(PoolRecord {
            name: pool.name.clone(),
            kind,
            capacity_bytes: capacity,
            free_bytes: free.min(capacity),
        });
    }
    let api_url = config.endpoints.api.as_ref().map(api_url).unwrap_or_default();
    Ok(NodeRecord {
        name: config.node.name.clone(),
        address: config.node.address,
        api_url,
        labels: config.node.labels.clone(),
        pools,
        ports: config.node.ports,
        cordoned: false,
        draining: false,
        initiator: initiator.map(str::to_string),
    })
}

/// Size and free bytes (for an unprivileged user) of the filesystem holding `dir`.
fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    crate::host::mount::stats(dir).map(|s| (s.total_bytes, s.available_bytes))
}

fn device_size(dev: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(dev)?;
    f.seek(std::io::SeekFrom::End(0))
}

/// Writes this node's record, keeping what others decided about it
/// (cordoned, draining), with a revision check.
pub async fn register(store: &dyn Store, record: &NodeRecord) -> anyhow::Result<()> {
    let key = keys::node(&record.name);
    for _ in 0..REGISTER_ATTEMPTS {
        let current = store::get_json::<NodeRecord>(store, &key).await?;
        let (mut next, expect) = match current {
            Some(cur) => {
                let mut next = record.clone();
                next.cordoned = cur.value.cordoned;
                next.draining = cur.value.draining;
                if next == cur.value {
                    return Ok(());
                }
                (next, Expect::Revision(cur.revision))
            }
            None => (record.clone(), Expect::Absent),
        };
        next.name = record.name.clone();
        match store::put_json(store, &key, &next, expect, None).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e).context("registering the node"),
        }
    }
    anyhow::bail!("registering the node: its record kept changing under us ({REGISTER_ATTEMPTS} attempts); is another agent running with the same node name?")
}

/// How long the node stays up without renewing its lease.
fn lease_ttl(config: &Config) -> Duration {
    match &config.cluster {
        ClusterConfig::Etcd(e) => e.lease_ttl,
        ClusterConfig::Embedded => LEASE_TTL,
    }
}

/// A new lease with the node's liveness key on it.
async fn grant_alive(store: &dyn Store, config: &Config) -> anyhow::Result<LeaseId> {
    let lease = store
        .grant_lease(lease_ttl(config))
        .await
        .context("granting the node's lease")?;
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    store::put_json(
        store,
        &keys::node_alive(&config.node.name),
        &NodeAlive { since_unix },
        Expect::Any,
        Some(lease),
    )
    .await
    .context("marking the node alive")?;
    Ok(lease)
}

/// Renews the lease every third of its TTL (a lapsed one is replaced) and
/// registers the pools' free space every [`POOL_REFRESH`]; returns the lease
/// in force when cancelled.
async fn keep_alive(
    store: Arc<dyn Store>,
    config: Config,
    initiator: Option<String>,
    shared: NodeLease,
    metrics: Arc<AgentMetrics>,
    cancel: CancellationToken,
) -> LeaseId {
    let mut lease = shared.get();
    let every = lease_ttl(&config) / 3;
    let mut renewed = Instant::now();
    let mut measured = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return lease,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        metrics.lease_age_seconds.set(renewed.elapsed().as_secs_f64());
        if renewed.elapsed() >= every {
            let result = match store.keep_alive(lease).await {
                Err(StoreError::LeaseExpired(_)) => {
                    tracing::warn!("the node's lease lapsed; granting a new one");
                    grant_alive(store.as_ref(), &config).await.map(|l| {
                        lease = l;
                        shared.set(l);
                    })
                }
                other => other.map_err(anyhow::Error::from),
            };
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("the node's lease is renewed again");
                    }
                    failing = false;
                    renewed = Instant::now();
                }
                // Once per outage: the renewal is retried every second until it works.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %format!("{e:#}"), "cannot renew the node's lease; retrying");
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "cannot renew the node's lease"),
            }
        }
        if measured.elapsed() >= POOL_REFRESH {
            measured = Instant::now();
            let result = match node_record(&config, initiator.as_deref()) {
                Ok(rec) => register(store.as_ref(), &rec).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(error = %format!("{e:#}"), "cannot refresh the node's pools");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docker_plugin_and_the_csi_node_share_the_host_and_the_controller_needs_none() {
        let defaults = Config::defaults().unwrap();
        assert!(host_users(&defaults).is_empty());

        let mut controller = defaults.clone();
        controller.endpoints.csi_controller = Some(PathBuf::from("/run/basalt/csi-controller.sock"));
        assert!(host_users(&controller).is_empty());

        let mut all = controller;
        all.endpoints.docker = Some(PathBuf::from("/run/docker/plugins/basalt.sock"));
        all.endpoints.csi = Some(PathBuf::from("/var/lib/kubelet/plugins/basalt/csi.sock"));
        all.endpoints.csi_node = Some(PathBuf::from("/var/lib/kubelet/plugins/basalt/node.sock"));
        assert_eq!(
            host_users(&all),
            ["endpoints.docker", "endpoints.csi", "endpoints.csi_node"]
        );
    }
}
