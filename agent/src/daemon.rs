//! The agent process: config → store → node registration and lease →
//! reconciler → API server.
//!
//! ```text
//!  run(config)
//!   ├─ open the store (embedded: DATA_DIR/store)
//!   ├─ register the node (its NodeRecord: address, labels, pools measured with statvfs)
//!   ├─ grant a lease, put keys::node_alive with it, keep it alive
//!   ├─ start the runtime (process or docker) and the reconciler
//!   ├─ serve the REST API on endpoints.api
//!   └─ on cancel: stop the reconciler, revoke the lease (the node is down
//!      at once, not after the TTL); the services keep running (see below)
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

use crate::config::{ClusterConfig, Config, PoolKindConfig, RuntimeConfig};
use crate::metrics::AgentMetrics;
use crate::model::{keys, NodeAlive, NodeRecord, PoolKind, PoolRecord};
use crate::reconcile::{Local, Reconciler};
use crate::runtime::Runtime;
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

/// Refuses a configuration that asks for something this agent does not do
/// yet, rather than starting without it: an operator who configured TLS or
/// an endpoint must not find out from a client that it is not there.
pub fn refuse_unbuilt(config: &Config) -> anyhow::Result<()> {
    if let Some(api) = &config.endpoints.api {
        if api.tls_cert_file.is_some() || api.tls_key_file.is_some() {
            anyhow::bail!(
                "endpoints.api.tls_cert_file/tls_key_file: this agent serves its API over plain HTTP only; \
                 remove the TLS keys and put a TLS-terminating proxy in front of the API, or keep the API on a \
                 loopback address"
            );
        }
    }
    if config.endpoints.docker.is_some() {
        anyhow::bail!(
            "endpoints.docker: this agent does not serve the Docker volume plugin yet; remove the key"
        );
    }
    // The CSI controller is served; the node service (attaching volumes on this host) is not built yet.
    let csi_node = [
        ("endpoints.csi", &config.endpoints.csi),
        ("endpoints.csi_node", &config.endpoints.csi_node),
    ];
    if let Some((key, _)) = csi_node.iter().find(|(_, socket)| socket.is_some()) {
        anyhow::bail!(
            "{key}: this agent does not serve the CSI node service yet; serve the controller alone with \
             endpoints.csi_controller"
        );
    }
    Ok(())
}

/// Runs the agent until `cancel`.
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    refuse_unbuilt(&config)?;
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "creating the agent's data directory {}",
            config.data_dir.display()
        )
    })?;
    let store = open_store(&config)?;
    let metrics = Arc::new(AgentMetrics::new());

    // Bind the API first: a port already taken fails the start before the
    // node says it is up.
    let api_listener = match &config.endpoints.api {
        Some(api) => Some(tokio::net::TcpListener::bind(api.listen).await.with_context(|| {
            format!(
                "cannot listen for the API on {} (endpoints.api.listen)",
                api.listen
            )
        })?),
        None => None,
    };
    let csi_listeners = crate::csi::serve::bind_configured(&config.endpoints)?;

    register(store.as_ref(), &node_record(&config)?).await?;
    let lease = grant_alive(store.as_ref(), &config).await?;
    tracing::info!(node = %config.node.name, "node registered");

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

    let tasks = cancel.child_token();
    let reconciler = Reconciler::new(
        store.clone(),
        runtime.clone(),
        Local {
            me: config.node.name.clone(),
            data_dir: absolute(&config.data_dir)?,
        },
        metrics.clone(),
        config.failover.replica_grace,
    );
    let reconcile_task = tokio::spawn(reconciler.run(tasks.clone()));
    let lease_task = tokio::spawn(keep_alive(
        store.clone(),
        config.clone(),
        lease,
        metrics.clone(),
        tasks.clone(),
    ));
    let token = match config.endpoints.api.as_ref().and_then(|a| a.token_file.as_ref()) {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let api_task = api_listener.map(|listener| {
        tokio::spawn(crate::api::serve(
            listener,
            crate::api::ApiContext {
                store: store.clone(),
                node: config.node.name.clone(),
                controllers: Arc::new(crate::api::GrpcConnector),
                token,
                agent_metrics: Some(metrics.clone()),
            },
            tasks.clone(),
        ))
    });
    if let Some(api) = &config.endpoints.api {
        tracing::info!(api = %api.listen, "agent serving");
    }
    let csi_tasks: Vec<_> = csi_listeners
        .into_iter()
        .map(|(listener, path, role)| {
            let ctx = crate::api::ApiContext {
                store: store.clone(),
                node: config.node.name.clone(),
                controllers: Arc::new(crate::api::GrpcConnector),
                // The socket's permissions guard it; the CO's sidecars carry no token.
                token: None,
                agent_metrics: None,
            };
            tokio::spawn(crate::csi::serve::serve(listener, path, role, ctx, tasks.clone()))
        })
        .collect();

    cancel.cancelled().await;
    tracing::info!("stopping the agent; the volumes' services keep running");
    tasks.cancel();
    let _ = reconcile_task.await;
    let lease = lease_task.await.unwrap_or(lease);
    if let Some(t) = api_task {
        let _ = t.await;
    }
    for t in csi_tasks {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %format!("{e:#}"), "the CSI server stopped with an error");
        }
    }
    if let Err(e) = store.revoke(lease).await {
        tracing::warn!(error = %e, "could not revoke the node's lease; it lapses by itself");
    }
    Ok(())
}

/// The cluster store the config names.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.cluster {
        ClusterConfig::Embedded => {
            let dir = config.data_dir.join("store");
            crate::store::embedded::EmbeddedStore::open(&dir)
                .with_context(|| format!("opening the embedded cluster store in {}", dir.display()))?
        }
        ClusterConfig::Etcd(_) => anyhow::bail!(
            "cluster: etcd is not supported by this agent yet; use `cluster: embedded` (one host)"
        ),
    })
}

/// The API's bearer token from its file (never logged; the error names the file only).
fn read_token(path: &Path) -> anyhow::Result<basalt_engine::api_auth::ApiToken> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading the API token file {} (endpoints.api.token_file)",
            path.display()
        )
    })?;
    basalt_engine::api_auth::ApiToken::new(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the API token in {} (endpoints.api.token_file): {e}",
            path.display()
        )
    })
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// This node as the config describes it, its pools measured now.
pub fn node_record(config: &Config) -> anyhow::Result<NodeRecord> {
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
    let api_url = config
        .endpoints
        .api
        .as_ref()
        .map(|a| format!("http://{}", a.listen))
        .unwrap_or_default();
    Ok(NodeRecord {
        name: config.node.name.clone(),
        address: config.node.address,
        api_url,
        labels: config.node.labels.clone(),
        pools,
        ports: config.node.ports,
        cordoned: false,
        draining: false,
    })
}

/// Size and free bytes (for an unprivileged user) of the filesystem holding `dir`.
fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` is written by statvfs before it is read.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok((
        st.f_blocks.saturating_mul(frsize),
        st.f_bavail.saturating_mul(frsize),
    ))
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

/// A new lease with the node's liveness key on it.
async fn grant_alive(store: &dyn Store, config: &Config) -> anyhow::Result<LeaseId> {
    let ttl = match &config.cluster {
        ClusterConfig::Etcd(e) => e.lease_ttl,
        ClusterConfig::Embedded => LEASE_TTL,
    };
    let lease = store
        .grant_lease(ttl)
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
    mut lease: LeaseId,
    metrics: Arc<AgentMetrics>,
    cancel: CancellationToken,
) -> LeaseId {
    let every = LEASE_TTL / 3;
    let mut renewed = Instant::now();
    let mut measured = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return lease,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        metrics.lease_age_seconds.set(renewed.elapsed().as_secs_f64());
        if renewed.elapsed() >= every {
            match store.keep_alive(lease).await {
                Ok(()) => renewed = Instant::now(),
                Err(StoreError::LeaseExpired(_)) => {
                    tracing::warn!("the node's lease lapsed; granting a new one");
                    match grant_alive(store.as_ref(), &config).await {
                        Ok(l) => {
                            lease = l;
                            renewed = Instant::now();
                        }
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot renew the node's lease"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the node's lease"),
            }
        }
        if measured.elapsed() >= POOL_REFRESH {
            measured = Instant::now();
            let result = match node_record(&config) {
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
    fn endpoints_and_tls_this_agent_does_not_serve_are_refused_by_name() {
        let defaults = Config::defaults().unwrap();
        refuse_unbuilt(&defaults).unwrap();

        let mut tls = defaults.clone();
        if let Some(api) = tls.endpoints.api.as_mut() {
            api.tls_cert_file = Some(PathBuf::from("/etc/basalt/tls.pem"));
        }
        let e = refuse_unbuilt(&tls).unwrap_err().to_string();
        assert!(e.contains("endpoints.api.tls_cert_file"), "{e}");

        let mut docker = defaults.clone();
        docker.endpoints.docker = Some(PathBuf::from("/run/docker/plugins/basalt.sock"));
        let e = refuse_unbuilt(&docker).unwrap_err().to_string();
        assert!(e.contains("endpoints.docker"), "{e}");

        let mut csi = defaults.clone();
        csi.endpoints.csi = Some(PathBuf::from("/var/lib/kubelet/plugins/basalt/csi.sock"));
        let e = refuse_unbuilt(&csi).unwrap_err().to_string();
        assert!(e.contains("endpoints.csi"), "{e}");

        let mut controller = defaults.clone();
        controller.endpoints.csi_controller = Some(PathBuf::from("/run/basalt/csi-controller.sock"));
        refuse_unbuilt(&controller).unwrap();

        let mut node = defaults;
        node.endpoints.csi_node = Some(PathBuf::from("/var/lib/kubelet/plugins/basalt/node.sock"));
        let e = refuse_unbuilt(&node).unwrap_err().to_string();
        assert!(e.contains("endpoints.csi_node"), "{e}");
    }
}
