//! Serving the CSI services on a unix socket: `endpoints.csi` (every service), `endpoints.csi_controller`
//! (Identity and Controller) or `endpoints.csi_node` (Identity and Node), as the agent's config says.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use super::pb::controller_server::ControllerServer;
use super::pb::identity_server::IdentityServer;
use super::pb::node_server::NodeServer;
use crate::api::ApiContext;

/// Which services one socket serves (Identity always).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `endpoints.csi`: controller and node on one socket.
    All,
    Controller,
    Node,
}

impl Role {
    pub fn config_key(self) -> &'static str {
        match self {
            Role::All => "endpoints.csi",
            Role::Controller => "endpoints.csi_controller",
            Role::Node => "endpoints.csi_node",
        }
    }
}

/// Listen on `path`: its directory made, a socket left by an earlier run replaced (anything else there
/// is refused rather than deleted), the socket only for its owner (the CO's sidecars run as root).
pub fn bind(path: &Path, role: Role) -> anyhow::Result<UnixListener> {
    let key = role.config_key();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the directory of the CSI socket {} ({key})",
                path.display()
            )
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the old CSI socket {} ({key})", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{key}: {} exists and is not a socket; point {key} elsewhere or remove it",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen for CSI on {} ({key})", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting the CSI socket {} ({key})", path.display()))?;
    Ok(listener)
}

impl Role {
    pub fn serves_node(self) -> bool {
        matches!(self, Role::All | Role::Node)
    }
}

/// Serve `role`'s services on `listener` until `cancel`; the socket file is removed at the end. `node`
/// is this host's node service (one for every socket serving it: it serializes calls per volume), which
/// a role serving the node needs.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    role: Role,
    api: ApiContext,
    node: Option<Arc<NodeService>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let node = match (role.serves_node(), node) {
        (true, Some(n)) => Some(NodeServer::from_arc(n)),
        (true, None) => anyhow::bail!(
            "{}: the CSI node service needs this host's attachments, which were not opened",
            role.config_key()
        ),
        (false, _) => None,
    };
    let identity = IdentityServer::new(IdentityService {
        store: api.store.clone(),
        node: api.node.clone(),
    });
    let controller = matches!(role, Role::All | Role::Controller)
        .then(|| ControllerServer::new(ControllerService { api: api.clone() }));
    tracing::info!(socket = %path.display(), ?role, "serving CSI");
    let result = tonic::transport::Server::builder()
        .add_service(identity)
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            cancel.cancelled(),
        )
        .await;
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("serving CSI on {} ({})", path.display(), role.config_key()))
}

/// Bind every CSI socket the config names (before the node says it is up: a socket that cannot be
/// made fails the start).
pub fn bind_configured(
    endpoints: &crate::config::EndpointsConfig,
) -> anyhow::Result<Vec<(UnixListener, PathBuf, Role)>> {
    [
        (&endpoints.csi, Role::All),
        (&endpoints.csi_controller, Role::Controller),
        (&endpoints.csi_node, Role::Node),
    ]
    .into_iter()
    .filter_map(|(path, role)| path.as_ref().map(|p| (p.clone(), role)))
    .map(|(path, role)| Ok((bind(&path, role)?, path, role)))
    .collect()
}

/// `basalt agent --csi-controller-only`: the CSI controller pod of a cluster. It opens the cluster store
/// and serves `endpoints.csi_controller` until `cancel`; it registers no node and runs no volume (the
/// node agents do), so a controller pod never becomes a place for replicas.
pub async fn run_controller_only(
    config: crate::config::Config,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let path = config.endpoints.csi_controller.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "--csi-controller-only serves endpoints.csi_controller, and the config names no socket there"
        )
    })?;
    for (key, set) in [
        ("endpoints.api", config.endpoints.api.is_some()),
        ("endpoints.csi", config.endpoints.csi.is_some()),
        ("endpoints.csi_node", config.endpoints.csi_node.is_some()),
        ("endpoints.docker", config.endpoints.docker.is_some()),
    ] {
        if set {
            anyhow::bail!(
                "{key}: --csi-controller-only serves the CSI controller alone; turn {key} off (`api: off`) or run \
                 the agent without the flag"
            );
        }
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let store = crate::daemon::open_store(&config).await?;
    let listener = bind(&path, Role::Controller)?;
    let ctx = ApiContext {
        store,
        node: config.node.name.clone(),
        controllers: std::sync::Arc::new(crate::api::GrpcConnector),
        // No REST endpoint here: nobody presents a token; a random one keeps the context whole.
        token: basalt_engine::api_auth::ApiToken::generate(),
        agent_metrics: None,
    };
    serve(listener, path, Role::Controller, ctx, None, cancel).await
}
