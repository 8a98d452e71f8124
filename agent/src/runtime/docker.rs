//! Services as containers (the `docker` runtime): one container per replica
//! and per controller, through the Docker Engine API (1.41) on its unix
//! socket, from the image `images/build.sh` builds.
//!
//! A container runs the same command line as the `process` runtime
//! ([`super::process::command_args`]) on the host's network, so its
//! addresses are the node's. Every host path the command names is
//! bind-mounted at the same path: the replica's data directory read-write,
//! the secret files read-only (a block device is passed as a device). The
//! container runs as root: the data directories belong to the agent, which
//! runs as root.
//!
//! Docker restarts a service that exits (`RestartPolicy: unless-stopped`,
//! which also survives a restart of the engine); its restart count is the
//! service's. The containers outlive the agent like the `process` runtime's
//! children: an agent finds its own again by their labels
//! (`io.basalt.node`, `io.basalt.volume`, `io.basalt.service`) and keeps a
//! container whose command line (label `io.basalt.identity`, online-changed
//! size and QoS left out) is the one it wants; another one is replaced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use basalt_engine::name::VolumeName;
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::process::{command_args, identity_args, parse_service_id, STOP_GRACE};
use super::{Observed, ReplicaStorage, Runtime, ServiceKey, ServiceSpec};
use crate::model::{NodeName, ServiceState};

/// The Engine API version spoken: Docker 20.10 and later serve it.
const API_VERSION: &str = "v1.41";
const LABEL_NODE: &str = "io.basalt.node";
const LABEL_VOLUME: &str = "io.basalt.volume";
const LABEL_SERVICE: &str = "io.basalt.service";
const LABEL_IDENTITY: &str = "io.basalt.identity";

/// The `docker` runtime (see the module docs).
pub struct DockerRuntime {
    socket: PathBuf,
    image: String,
    node: NodeName,
}

impl DockerRuntime {
    pub fn new(socket: PathBuf, image: String, node: NodeName) -> DockerRuntime {
        DockerRuntime { socket, image, node }
    }

    /// `basalt-NODE-VOLUME-SERVICE`: unique per host even with several
    /// agents on it (tests), readable in `docker ps`.
    pub fn container_name(&self, key: &ServiceKey) -> String {
        format!("basalt-{}-{}-{}", self.node, key.volume, key.service)
    }

    /// One Engine API request; the status and the body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the Docker engine at {} (is dockerd running? runtime.socket)",
                    self.socket.display()
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("talking to the Docker engine")?;
        let conn = tokio::spawn(conn);
        let bytes = match &body {
            Some(v) => serde_json::to_vec(v).context("encoding a Docker request")?,
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("/{API_VERSION}{path}"))
            .header("host", "docker")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .context("building a Docker request")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("Docker {method} {path}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading Docker's answer to {method} {path}"))?
            .to_bytes();
        conn.abort();
        Ok((status, body))
    }

    /// A call that must succeed (or answer one of `also_ok`).
    async fn call_ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        also_ok: &[StatusCode],
    ) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.call(method.clone(), path, body).await?;
        if status.is_success() || also_ok.contains(&status) {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        anyhow::bail!("Docker {method} {path}: {status}: {message}")
    }

    async fn inspect(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let (status, bytes) = self
            .call(Method::GET, &format!("/containers/{name}/json"), None)
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(
                serde_json::from_slice(&bytes).context("reading a container's inspect")?,
            )),
            s => anyhow::bail!("Docker inspect {name}: {s}: {}", String::from_utf8_lossy(&bytes)),
        }
    }

    async fn remove(&self, name: &str) -> anyhow::Result<()> {
        let grace = STOP_GRACE.as_secs();
        self.call_ok(
            Method::POST,
            &format!("/containers/{name}/stop?t={grace}"),
            None,
            &[StatusCode::NOT_MODIFIED, StatusCode::NOT_FOUND],
        )
        .await?;
        self.call_ok(
            Method::DELETE,
            &format!("/containers/{name}?force=true"),
            None,
            &[StatusCode::NOT_FOUND],
        )
        .await?;
        Ok(())
    }

    async fn create_and_start(&self, key: &ServiceKey, spec: &ServiceSpec) -> anyhow::Result<()> {
        let name = self.container_name(key);
        let body = create_body(&self.image, &self.node, key, spec)?;
        if let ServiceSpec::Replica(r) = spec {
            if let ReplicaStorage::Directory(dir) = &r.storage {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        self.call_ok(
            Method::POST,
            &format!("/containers/create?name={name}"),
            Some(body),
            &[],
        )
        .await
        .with_context(|| {
            format!(
                "creating container {name} from image {} (built by images/build.sh?)",
                self.image
            )
        })?;
        self.call_ok(
            Method::POST,
            &format!("/containers/{name}/start"),
            None,
            &[StatusCode::NOT_MODIFIED],
        )
        .await?;
        tracing::info!(container = %name, "service started as a container");
        Ok(())
    }
}

/// The identity label: the command line without size and QoS.
fn identity(spec: &ServiceSpec) -> String {
    identity_args(spec)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The body of `POST /containers/create` for a service.
pub fn create_body(
    image: &str,
    node: &NodeName,
    key: &ServiceKey,
    spec: &ServiceSpec,
) -> anyhow::Result<Value> {
    let cmd: Vec<String> = command_args(spec)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut binds: Vec<String> = Vec::new();
    let mut devices: Vec<Value> = Vec::new();
    let ro = |p: &Path| format!("{0}:{0}:ro", p.display());
    match spec {
        ServiceSpec::Replica(r) => {
            match &r.storage {
                ReplicaStorage::Directory(dir) => binds.push(format!("{0}:{0}", dir.display())),
                ReplicaStorage::BlockDevice(dev) => devices.push(json!({
                    "PathOnHost": dev, "PathInContainer": dev, "CgroupPermissions": "rwm"
                })),
            }
            binds.push(ro(&r.secret_file));
            if let Some(c) = &r.clone {
                binds.push(ro(&c.source_secret_file));
            }
        }
        ServiceSpec::Controller(c) => {
            binds.push(ro(&c.secret_file));
            binds.push(ro(&c.api_token_file));
        }
    }
    let labels: BTreeMap<&str, String> = [
        (LABEL_NODE, node.to_string()),
        (LABEL_VOLUME, key.volume.to_string()),
        (LABEL_SERVICE, key.service.to_string()),
        (LABEL_IDENTITY, identity(spec)),
    ]
    .into_iter()
    .collect();
    Ok(json!({
        "Image": image,
        "Cmd": cmd,
        "User": "0:0",
        "Labels": labels,
        "HostConfig": {
            "NetworkMode": "host",
            "Binds": binds,
            "Devices": devices,
            "RestartPolicy": { "Name": "unless-stopped" },
            "ReadonlyRootfs": true,
        },
    }))
}

/// A container's state as a service's.
fn observed(inspect: &Value) -> Observed {
    let state = &inspect["State"];
    let status = state["Status"].as_str().unwrap_or("unknown");
    let restarts = inspect["RestartCount"].as_u64().unwrap_or(0);
    let error = state["Error"].as_str().filter(|e| !e.is_empty());
    let (state_now, message) = match status {
        "running" => (ServiceState::Running, None),
        "created" => (ServiceState::Starting, None),
        "restarting" => (
            ServiceState::Failed,
            Some(format!(
                "exited with code {}; Docker restarts it",
                state["ExitCode"].as_i64().unwrap_or(-1)
            )),
        ),
        other => (
            ServiceState::Failed,
            Some(format!(
                "container {other} (exit code {}){}",
                state["ExitCode"].as_i64().unwrap_or(-1),
                error.map(|e| format!(": {e}")).unwrap_or_default()
            )),
        ),
    };
    Observed {
        state: state_now,
        restarts: u32::try_from(restarts).unwrap_or(u32::MAX),
        message,
    }
}

impl Runtime for DockerRuntime {
    fn ensure<'a>(&'a self, key: &'a ServiceKey, spec: &'a ServiceSpec) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let name = self.container_name(key);
            match self.inspect(&name).await? {
                None => self.create_and_start(key, spec).await,
                Some(c)
                    if c["Config"]["Labels"][LABEL_IDENTITY].as_str() == Some(identity(spec).as_str()) =>
                {
                    let status = c["State"]["Status"].as_str().unwrap_or("");
                    if matches!(status, "created" | "exited") {
                        // Stopped by hand or never started: the store says it runs.
                        self.call_ok(
                            Method::POST,
                            &format!("/containers/{name}/start"),
                            None,
                            &[StatusCode::NOT_MODIFIED],
                        )
                        .await?;
                    }
                    Ok(())
                }
                Some(_) => {
                    tracing::info!(container = %name, "spec changed: replacing the container");
                    self.remove(&name).await?;
                    self.create_and_start(key, spec).await
                }
            }
        })
    }

    fn stop<'a>(&'a self, key: &'a ServiceKey) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { self.remove(&self.container_name(key)).await })
    }

    fn observe(&self) -> BoxFuture<'_, anyhow::Result<Vec<(ServiceKey, Observed)>>> {
        Box::pin(async move {
            let filters = json!({ "label": [format!("{LABEL_NODE}={}", self.node)] }).to_string();
            let path = format!("/containers/json?all=true&filters={}", percent_encode(&filters));
            let list: Vec<Value> =
                serde_json::from_slice(&self.call_ok(Method::GET, &path, None, &[]).await?)
                    .context("reading Docker's container list")?;
            let mut out = Vec::new();
            for c in list {
                let labels = &c["Labels"];
                let key = labels[LABEL_VOLUME]
                    .as_str()
                    .and_then(|v| VolumeName::new(v).ok())
                    .zip(labels[LABEL_SERVICE].as_str().and_then(parse_service_id));
                let Some((volume, service)) = key else { continue };
                let key = ServiceKey { volume, service };
                // The list has no restart count: inspect each (a handful per node).
                if let Some(inspect) = self.inspect(&self.container_name(&key)).await? {
                    out.push((key, observed(&inspect)));
                }
            }
            Ok(out)
        })
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceId;
    use crate::runtime::ReplicaSpec;

    fn replica() -> ServiceSpec {
        ServiceSpec::Replica(ReplicaSpec {
            volume_id: uuid::Uuid::nil(),
            size_bytes: 1 << 30,
            storage: ReplicaStorage::Directory("/p/u/replica-1".into()),
            listen: "127.0.0.1:7100".parse().unwrap(),
            secret_file: "/d/secrets/v/peer-secret".into(),
            clone: None,
        })
    }

    #[test]
    fn a_replica_container_mounts_its_data_read_write_and_its_secret_read_only_on_the_host_network() {
        let key = ServiceKey {
            volume: VolumeName::new("v").unwrap(),
            service: ServiceId::Replica(1),
        };
        let body = create_body("basalt:dev", &NodeName::new("n1").unwrap(), &key, &replica()).unwrap();
        assert_eq!(body["HostConfig"]["NetworkMode"], "host");
        assert_eq!(
            body["HostConfig"]["Binds"],
            json!([
                "/p/u/replica-1:/p/u/replica-1",
                "/d/secrets/v/peer-secret:/d/secrets/v/peer-secret:ro"
            ])
        );
        assert_eq!(body["Cmd"][0], "replica");
        assert_eq!(body["Labels"][LABEL_SERVICE], "replica-1");
        assert!(!body["Labels"][LABEL_IDENTITY]
            .as_str()
            .unwrap()
            .contains("1073741824"));
    }

    #[test]
    fn container_states_become_service_states() {
        let running = json!({"State": {"Status": "running", "ExitCode": 0}, "RestartCount": 2});
        assert_eq!(
            observed(&running),
            Observed {
                state: ServiceState::Running,
                restarts: 2,
                message: None
            }
        );
        let dead = json!({"State": {"Status": "exited", "ExitCode": 1, "Error": ""}, "RestartCount": 0});
        let o = observed(&dead);
        assert_eq!(o.state, ServiceState::Failed);
        assert!(o.message.unwrap().contains("exit code 1"));
    }

    #[test]
    fn filters_are_percent_encoded() {
        assert_eq!(
            percent_encode("{\"a\":[\"b=c\"]}"),
            "%7B%22a%22%3A%5B%22b%3Dc%22%5D%7D"
        );
    }
}
