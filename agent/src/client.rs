//! The REST API's client, used by the `basalt` CLI and the tests: one typed method per route, the
//! bearer token on every request, the API's errors as [`ClientError::Api`] with the server's own words.
//!
//! The token comes from a file or from `BASALT_AGENT_TOKEN` ([`load_token`]), never from the command
//! line, and is never printed (`ApiToken`'s `Debug` is redacted). With a CA ([`AgentClient::with_ca`])
//! the client speaks HTTPS and checks the agent's certificate against that CA alone; a connection that
//! fails is told apart by [`basalt_engine::api_tls::classify`] (a plaintext agent, a CA that did not sign
//! the agent's certificate, a name it does not carry), each with what to pass instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
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
/// Environment variable naming a file that holds the agent's API token (like `--agent-token-file`).
pub const TOKEN_FILE_ENV: &str = "BASALT_AGENT_TOKEN_FILE";
/// Environment variable naming the CA that signed the agent's certificate (like `--agent-ca`).
pub const CA_ENV: &str = "BASALT_AGENT_CA";
/// The token an agent started without a config generates (`DATA_DIR/api-token` under the default
/// data directory, relative to where it was started): what the CLI reads when it is given no token
/// and talks to an agent on a loopback address, so that the no-config flow needs no token setup.
pub const DEFAULT_TOKEN_FILE: &str = "./basalt-data/_agent/api-token";
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
    /// The connection failed in a way that says what to change (TLS on one side only, a CA that did
    /// not sign the agent's certificate).
    #[error("{0}")]
    Tls(String),
}

/// The token a client sends, and where it came from (for a refusal's message; never the token).
#[derive(Clone, Debug, Default)]
pub struct TokenChoice {
    pub token: Option<ApiToken>,
    pub origin: Option<String>,
}

/// The token from `file` (`--agent-token-file` or `BASALT_AGENT_TOKEN_FILE`), else from
/// `BASALT_AGENT_TOKEN`, else, for an agent on a loopback address only, from [`DEFAULT_TOKEN_FILE`]
/// when it exists (a token generated on this host is never sent to another one). None of them: no
/// token, and the agent's 401 says what to set.
pub fn load_token(file: Option<&Path>, agent_url: &str) -> Result<TokenChoice, ClientError> {
    let (bytes, origin) = match file {
        Some(path) => (
            std::fs::read(path).map_err(|e| {
                ClientError::Token(format!(
                    "cannot read the agent token file {} (--agent-token-file or {TOKEN_FILE_ENV}): {e}",
                    path.display()
                ))
            })?,
            format!(
                "the file {} (--agent-token-file or {TOKEN_FILE_ENV})",
                path.display()
            ),
        ),
        None => match std::env::var_os(TOKEN_ENV).filter(|v| !v.is_empty()) {
            Some(v) => (v.into_encoded_bytes(), TOKEN_ENV.to_string()),
            None => {
                let default = PathBuf::from(DEFAULT_TOKEN_FILE);
                match std::fs::read(&default) {
                    Ok(bytes) if is_loopback_url(agent_url) => (
                        bytes,
                        format!("{DEFAULT_TOKEN_FILE} (the default agent's generated token)"),
                    ),
                    _ => return Ok(TokenChoice::default()),
                }
            }
        },
    };
    ApiToken::new(bytes)
        .map(|token| TokenChoice {
            token: Some(token),
            origin: Some(origin.clone()),
        })
        .map_err(|e| ClientError::Token(format!("the token from {origin} is not usable: {e}")))
}

/// Whether `url`'s host is a loopback address or `localhost`.
fn is_loopback_url(url: &str) -> bool {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let Ok(uri) = with_scheme.parse::<hyper::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// What to set when the agent refused the token this client sent (or did not send).
fn unauthorized_help(origin: Option<&str>) -> String {
    let set = format!(
        "set --agent-token-file FILE or {TOKEN_FILE_ENV} to the agent's token file (its \
         endpoints.api.token_file, or DATA_DIR/api-token when it generated one), or put the token in {TOKEN_ENV}"
    );
    match origin {
        Some(origin) => format!("the token came from {origin}; {set}"),
        None => format!(
            "no token was sent (none of --agent-token-file, {TOKEN_FILE_ENV}, {TOKEN_ENV} is set, and \
             {DEFAULT_TOKEN_FILE} is not there or the agent is not on this host); {set}"
        ),
    }
}

/// The https settings of a client: whom to trust, and the name to expect.
#[derive(Clone)]
struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({:?})", self.name)
    }
}

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    url: String,
    /// `host:port` to connect to.
    authority: String,
    token: Option<ApiToken>,
    /// Where the token came from, for the message of a 401.
    token_origin: Option<String>,
    /// `Some` for an `https://` URL (set by [`AgentClient::with_ca`]).
    tls: Option<Tls>,
    https: bool,
    /// Whether the URL named its scheme (a bare `HOST:PORT` takes the one the CA implies).
    scheme_given: bool,
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
    /// A client of the agent at `url` (`http://HOST:PORT`, `https://HOST:PORT` with [`Self::with_ca`],
    /// or `HOST:PORT`).
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
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(ClientError::BadUrl(format!(
                    "{url:?}: an agent URL is http://HOST:PORT, or https://HOST:PORT with --agent-ca"
                )))
            }
        };
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
            token_origin: None,
            tls: None,
            https,
            scheme_given: url.contains("://"),
        })
    }

    /// A client with the token of `choice` (its origin named when the agent refuses it).
    pub fn with_token(mut self, choice: TokenChoice) -> AgentClient {
        self.token = choice.token;
        self.token_origin = choice.origin;
        self
    }

    /// Speak HTTPS, trusting only the CAs of `ca_pem` (the file `origin` names, for messages). A
    /// bare `HOST:PORT` URL becomes `https://`; an explicit `http://` one is refused as a
    /// contradiction.
    pub fn with_ca(mut self, ca_pem: &[u8], origin: &str) -> Result<AgentClient, ClientError> {
        if !self.https {
            if self.scheme_given {
                return Err(ClientError::Tls(format!(
                    "a CA ({origin}, from --agent-ca or {CA_ENV}) was given for the plain http:// agent URL {}: \
                     use https://{} if the agent serves TLS, or drop --agent-ca / unset {CA_ENV}",
                    self.url, self.authority
                )));
            }
            self.url = format!("https://{}", self.authority);
            self.https = true;
        }
        let config = basalt_engine::api_tls::rustls_client_config(ca_pem, &[b"http/1.1"]).map_err(|e| {
            ClientError::Tls(format!(
                "the agent CA file {origin} (--agent-ca or {CA_ENV}) is not usable: {e}; give the PEM \
                 certificate of the CA that signed the agent's tls_cert_file"
            ))
        })?;
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            ClientError::BadUrl(format!("{host:?} cannot be checked against a certificate: {e}"))
        })?;
        self.tls = Some(Tls { config, name });
        Ok(self)
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
        if self.https && self.tls.is_none() {
            return Err(ClientError::Tls(format!(
                "the agent URL {} is https://: pass the CA that signed the agent's certificate with \
                 --agent-ca FILE or {CA_ENV}",
                self.url
            )));
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| connect_err(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        let result = match &self.tls {
            None => exchange(stream, req).await,
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                match connector.connect(tls.name.clone(), stream).await {
                    Ok(stream) => exchange(stream, req).await,
                    Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                }
            }
        };
        result.map_err(|e| self.connection_error(&*e))
    }

    /// What to tell a person whose exchange with the agent failed with `error`.
    fn connection_error(&self, error: &(dyn std::error::Error + Send + Sync + 'static)) -> ClientError {
        use basalt_engine::api_tls::{classify, error_chain_text, ConnectFailure};
        let detail = error_chain_text(error);
        let url = &self.url;
        let tls = |m: String| ClientError::Tls(m);
        match classify(error, self.tls.is_some()) {
            ConnectFailure::MaybeTlsServer => tls(format!(
                "the agent at {url} closed the connection without answering HTTP: it probably serves TLS; use \
                 https://{} and pass its CA with --agent-ca FILE or {CA_ENV} ({detail})",
                self.authority
            )),
            ConnectFailure::ServerNotTls => tls(format!(
                "the agent at {url} does not speak TLS (no tls_cert_file in its config): use http://{} and \
                 drop --agent-ca / unset {CA_ENV} ({detail})",
                self.authority
            )),
            ConnectFailure::UnknownIssuer => tls(format!(
                "the agent at {url} presented a certificate that the CA given with --agent-ca / {CA_ENV} did \
                 not sign: give the CA that signed the agent's tls_cert_file ({detail})"
            )),
            ConnectFailure::WrongName => tls(format!(
                "the agent's certificate does not carry the name {}: reach it by a name or address its \
                 certificate carries ({detail})",
                self.authority
            )),
            ConnectFailure::Expired => tls(format!(
                "the agent's certificate at {url} is expired or not yet valid: renew its tls_cert_file (or \
                 check this machine's clock) ({detail})"
            )),
            ConnectFailure::Tls(why) => tls(format!("TLS with the agent at {url} failed: {why}")),
            ConnectFailure::Refused | ConnectFailure::Other => ClientError::Connect {
                url: url.clone(),
                reason: detail,
            },
        }
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
                Ok(e) if status == StatusCode::UNAUTHORIZED => ClientError::Api {
                    status,
                    code: e.error.code,
                    message: format!(
                        "the agent at {} {}: {}",
                        self.url,
                        if self.token.is_some() {
                            "refused the request: the token is wrong"
                        } else {
                            "requires a token"
                        },
                        unauthorized_help(self.token_origin.as_deref())
                    ),
                },
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

/// One HTTP/1.1 request on `io`, its status and whole body.
async fn exchange<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
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
        assert!(AgentClient::new("ftp://h:1", None)
            .unwrap_err()
            .to_string()
            .contains("https://HOST:PORT"));
        assert!(AgentClient::new("http://h", None)
            .unwrap_err()
            .to_string()
            .contains("host:port"));
    }

    #[test]
    fn the_default_token_file_is_only_for_an_agent_on_this_host() {
        for url in [
            "http://127.0.0.1:9700",
            "localhost:9700",
            "https://[::1]:9700",
            "127.0.0.2:1",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:9700",
            "agent.example:9700",
            "http://[::2]:1",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn a_refusal_says_where_the_token_came_from_and_what_to_set() {
        let none = unauthorized_help(None);
        assert!(
            none.contains("no token was sent") && none.contains(DEFAULT_TOKEN_FILE),
            "{none}"
        );
        let from = unauthorized_help(Some("BASALT_AGENT_TOKEN"));
        assert!(from.contains("came from BASALT_AGENT_TOKEN"), "{from}");
        for text in [none, from] {
            assert!(
                text.contains("--agent-token-file")
                    && text.contains(TOKEN_FILE_ENV)
                    && text.contains(TOKEN_ENV),
                "{text}"
            );
        }
    }

    #[test]
    fn path_segments_cannot_escape() {
        assert_eq!(seg("a/b?c"), "a%2Fb%3Fc");
        assert_eq!(seg("vol-1.x"), "vol-1.x");
    }
}
