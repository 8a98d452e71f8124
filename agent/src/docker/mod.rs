//! The Docker volume plugin: the agent's `docker` endpoint (`endpoints.docker`, a unix socket, by
//! default `/run/docker/plugins/basalt.sock`, where dockerd discovers legacy plugins by name).
//!
//! ```text
//!   dockerd ──HTTP/1.1 over the socket──► serve ──► route by path ──► driver.rs (one fn per call)
//!                                                                       │   ├─ api::volumes (create, delete,
//!                                                                       │   │   attach, detach: the store,
//!                                                                       │   │   with revision checks)
//!                                                                       │   ├─ host (attach, mkfs, mount)
//!                                                                       │   └─ refs.rs (who mounted what)
//! ```
//!
//! The protocol: every call is a `POST /Plugin.Activate` or `POST /VolumeDriver.X` with a JSON body;
//! every answer is JSON, an error `{"Err": "message"}` that the docker CLI prints as it is. Volumes are
//! the cluster's (`Get` and `List` read the store, never a local cache: a plugin that forgot a volume
//! would let Docker silently create a *local* one of that name on the next `docker run -v`).

pub mod driver;
pub mod options;
pub mod refs;

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

pub use driver::{Driver, Scope};

/// The socket's default path: where dockerd looks for a legacy plugin named `basalt`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/basalt.sock";
/// The media type of the plugin protocol's answers.
const CONTENT: &str = "application/vnd.docker.plugins.v1.2+json";
/// Largest request body: the protocol's requests are a name, an ID and a few options.
const MAX_BODY_BYTES: usize = 64 << 10;

/// Binds the plugin's socket: its directory is created, a socket file nobody answers on (a stopped
/// agent's) is replaced, one that answers (another plugin) is refused.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} (endpoints.docker)", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "{} (endpoints.docker) is served by another process; stop it, or give this agent another socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("listening on {} (endpoints.docker)", path.display()))?;
    // Only root (dockerd) and its group may call the plugin: it mounts and formats devices.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Serves the plugin protocol on `listener` until `cancel`, then removes the socket file (dockerd then
/// waits for the plugin to come back rather than talking to a dead socket). Beside it, the mounted
/// volumes' online growth is followed ([`Driver::follow_growth`]).
pub async fn serve(
    listener: UnixListener,
    socket: std::path::PathBuf,
    driver: Arc<Driver>,
    cancel: CancellationToken,
) {
    let growth = tokio::spawn(driver.clone().follow_growth(cancel.clone()));
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "docker plugin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let driver = driver.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let driver = driver.clone();
                async move { Ok::<_, Infallible>(handle(driver, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&socket);
    let _ = growth.await;
}

async fn handle(driver: Arc<Driver>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let answer = if req.method() != Method::POST {
        Err(format!(
            "{} {path}: the plugin protocol takes POST only",
            req.method()
        ))
    } else {
        let (parts, body) = req.into_parts();
        match crate::body::read_limited(&parts.headers, body, MAX_BODY_BYTES).await {
            Err(crate::body::BodyError::TooLarge) => Err(format!(
                "the request body is over {MAX_BODY_BYTES} bytes; every call of the plugin protocol is a small JSON object"
            )),
            Err(crate::body::BodyError::Read(e)) => Err(format!("the request body could not be read: {e}")),
            // The handler runs in its own task: a bug that panics answers an error, not a dropped call.
            Ok(body) => {
                let p = path.clone();
                match tokio::spawn(async move { driver.call(&p, &body).await }).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        tracing::error!(error = %e, path, "docker plugin handler failed");
                        Err("the Basalt agent failed while handling this call; see its log".to_string())
                    }
                }
            }
        }
    };
    let (status, body) = match answer {
        Ok(value) => (StatusCode::OK, value),
        Err(message) => {
            tracing::info!(call = %path, error = %message, "docker plugin call refused");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({ "Err": message }),
            )
        }
    };
    let mut out = Response::new(Full::new(Bytes::from(body.to_string())));
    *out.status_mut() = status;
    out.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT));
    out
}
