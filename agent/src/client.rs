//! The REST API's client, used by the `basalt` CLI and the tests: one typed method per route, the
//! bearer token on every request, the API's errors as [`ClientError::Api`] with the server's own words.
//!
//! The token comes from a file or from `BASALT_AGENT_TOKEN` ([`load_token`]), never from the command
//! line, and is never printed (`ApiToken`'s `Debug` is redacted).

use std::path::Path;
use std::time::Duration;

use basalt_engine::api_auth::ApiToken;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::api::views::{
    AttachVolume, CreateSnapshot, CreateVolume, ExpandVolume, Health, InstanceView, NodeList, NodeView, Qos,
    SnapshotList, SnapshotResult, VolumeList, VolumeView,
};

/// Environment variable holding the agent's API token.
pub const TOKEN_ENV: &str = "BASALT_AGENT_TOKEN";
/// Environment variable holding the agent's URL.
pub const AGENT_ENV: &str = "BASALT_AGENT";
/// Where the agent listens when nothing says otherwise.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:9700";

/// How long the client waits for the agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take: the slowest are snapshot operations the agent forwards to a
/// controller (a revert or a merge of a large snapshot).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    BadUrl(String),
    #[error(
        "cannot reach the agent at {url}: {reason} (is `basalt agent` running? check --agent or {AGENT_ENV})"
    )]
    Connect { url: String, reason: String },
    /// The API refused or failed the request; `message` is the agent's own explanation.
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("the agent at {url} answered something this client cannot read ({reason}); are client and agent the same version?")]
    Decode { url: String, reason: String },
    #[error("the token: {0}")]
    Token(String),
}

/// The token from `file`, or else from `BASALT_AGENT_TOKEN`; `None` if neither gives one.
pub fn load_token(file: Option<&Path>) -> Result<Option<ApiToken>, ClientError> {
    let bytes = match file {
        Some(path) => std::fs::read(path)
            .map_err(|e| ClientError::Token(format!("cannot read the token file {}: {e}", path.display())))?,
        None => match std::env::var_os(TOKEN_ENV).filter(|v| !v.is_empty()) {
            Some(v) => v.into_encoded_bytes(),
            None => return Ok(None),
        },
    };
    let origin = file.map_or_else(|| TOKEN_ENV.to_string(), |p| p.display().to_string());
    ApiToken::new(bytes)
        .map(Some)
        .map_err(|e| ClientError::Token(format!("the token from {origin} is not usable: {e}")))
}

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    url: String,
    /// `host:port` to connect to.
    authority: String,
    token: Option<ApiToken>,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(serde::Deserialize)]
struct ErrorInner {
    code: String,
    message: String,
}

impl AgentClient {
    /// A client of the agent at `url` (`http://HOST:PORT`, or `HOST:PORT`).
    pub fn new(url: &str, token: Option<ApiToken>) -> Result<AgentClient, ClientError> {
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: hyper::Uri = with_scheme.parse().map_err(|e| {
            ClientError::BadUrl(format!(
                "{url:?} is not an agent URL ({e}); use e.g. {DEFAULT_AGENT}"
            ))
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::BadUrl(format!(
                "{url:?}: this client speaks plain http only; use an http:// URL"
            )));
        }
        let authority = uri
            .authority()
            .filter(|a| a.port_u16().is_some())
            .ok_or_else(|| {
                ClientError::BadUrl(format!("{url:?} has no host:port; use e.g. {DEFAULT_AGENT}"))
            })?
            .to_string();
        Ok(AgentClient {
            url: with_scheme.trim_end_matches('/').to_string(),
            authority,
            token,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One request; the status and body of any answer.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.raw_untimed(method, path, body))
            .await
            .map_err(|_| ClientError::Connect {
                url: self.url.clone(),
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            })?
    }

    async fn raw_untimed(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            url: self.url.clone(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| connect_err(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadUrl(format!("{path:?} cannot be requested: {e}")))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::BadUrl(format!("the request could not be encoded: {e}")))?;
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => ClientError::Api {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                },
                Err(_) => ClientError::Api {
                    status,
                    code: "http".into(),
                    message: format!("the agent answered {status}: {}", String::from_utf8_lossy(&bytes)),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: self.url.clone(),
            reason: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health").await
    }

    pub async fn instance(&self, address: Option<std::net::IpAddr>) -> Result<InstanceView, ClientError> {
        match address {
            Some(a) => self.get(&format!("/v1/instance?address={a}")).await,
            None => self.get("/v1/instance").await,
        }
    }

    pub async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeView, ClientError> {
        self.call(Method::POST, "/v1/volumes", Some(req)).await
    }

    /// `filters`: `(phase|node|label, value)` pairs.
    pub async fn list_volumes(&self, filters: &[(&str, &str)]) -> Result<VolumeList, ClientError> {
        let query: Vec<String> = filters
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encoding::utf8_percent_encode(v, ENCODED)))
            .collect();
        if query.is_empty() {
            self.get("/v1/volumes").await
        } else {
            self.get(&format!("/v1/volumes?{}", query.join("&"))).await
        }
    }

    pub async fn inspect_volume(&self, name: &str) -> Result<VolumeView, ClientError> {
        self.get(&format!("/v1/volumes/{}", seg(name))).await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<VolumeView, ClientError> {
        self.call(Method::DELETE, &format!("/v1/volumes/{}", seg(name)), None::<&()>)
            .await
    }

    pub async fn expand_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeView, ClientError> {
        let body = ExpandVolume { size_bytes };
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/expand", seg(name)),
            Some(&body),
        )
        .await
    }

    pub async fn attach_volume(&self, name: &str, node: &str) -> Result<VolumeView, ClientError> {
        let body = AttachVolume {
            node: node.to_string(),
        };
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/attach", seg(name)),
            Some(&body),
        )
        .await
    }

    pub async fn detach_volume(&self, name: &str) -> Result<VolumeView, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/detach", seg(name)),
            None::<&()>,
        )
        .await
    }

    pub async fn set_qos(&self, name: &str, qos: &Qos) -> Result<VolumeView, ClientError> {
        self.call(Method::PUT, &format!("/v1/volumes/{}/qos", seg(name)), Some(qos))
            .await
    }

    pub async fn create_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotResult, ClientError> {
        let body = CreateSnapshot {
            name: snapshot.to_string(),
        };
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/snapshots", seg(volume)),
            Some(&body),
        )
        .await
    }

    pub async fn list_snapshots(&self, volume: &str) -> Result<SnapshotList, ClientError> {
        self.get(&format!("/v1/volumes/{}/snapshots", seg(volume))).await
    }

    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotResult, ClientError> {
        let path = format!("/v1/volumes/{}/snapshots/{}", seg(volume), seg(snapshot));
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotResult, ClientError> {
        let path = format!("/v1/volumes/{}/snapshots/{}/revert", seg(volume), seg(snapshot));
        self.call(Method::POST, &path, None::<&()>).await
    }

    pub async fn list_nodes(&self) -> Result<NodeList, ClientError> {
        self.get("/v1/nodes").await
    }

    pub async fn inspect_node(&self, name: &str) -> Result<NodeView, ClientError> {
        self.get(&format!("/v1/nodes/{}", seg(name))).await
    }

    /// `action`: `cordon`, `uncordon` or `drain`.
    pub async fn node_action(&self, name: &str, action: &str) -> Result<NodeView, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/nodes/{}/{action}", seg(name)),
            None::<&()>,
        )
        .await
    }
}

/// What is encoded in a path segment or a query value: everything but RFC 3986's unreserved characters.
const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A path segment, percent-encoded so that a name with a `/` or a `?` cannot reach another route.
fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, ENCODED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_are_checked() {
        assert_eq!(
            AgentClient::new("http://127.0.0.1:9700/", None)
                .unwrap()
                .authority,
            "127.0.0.1:9700"
        );
        assert_eq!(
            AgentClient::new("127.0.0.1:9700", None).unwrap().url(),
            "http://127.0.0.1:9700"
        );
        assert!(AgentClient::new("https://h:1", None)
            .unwrap_err()
            .to_string()
            .contains("plain http"));
        assert!(AgentClient::new("http://h", None)
            .unwrap_err()
            .to_string()
            .contains("host:port"));
    }

    #[test]
    fn path_segments_cannot_escape() {
        assert_eq!(seg("a/b?c"), "a%2Fb%3Fc");
        assert_eq!(seg("vol-1.x"), "vol-1.x");
    }
}
