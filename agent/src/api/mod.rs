//! The agent's REST/JSON API under `/v1`: volumes, snapshots, nodes and instance discovery, the one
//! interface the CLI, the Docker volume plugin and the CSI driver use.
//!
//! ```text
//!   TCP ──► hyper (HTTP/1.1) ──► serve_request: body limit, bearer token, route table (routes.rs)
//!                                   │
//!                                   ▼
//!                               dispatch ──► volumes.rs / snapshots.rs / nodes.rs ──► Store
//!                                                 │                                  (revision checks)
//!                                                 └─► the volume's controller (gRPC) for snapshots, QoS
//! ```
//!
//! Long operations (create, delete, expand) write desired state and answer at once with the volume's
//! view; `GET /v1/volumes/{name}` shows progress (phase, per-service statuses). Every error is
//! `{"error": {"code", "message"}}` ([`error::ApiError`]) with a status that says whose fault it is; a
//! 5xx means the store or a controller really failed. `agent/openapi.json` documents every route and a
//! test keeps it and [`routes::routes`] equal.

pub mod error;
mod metrics;
pub mod nodes;
pub mod routes;
pub mod snapshots;
pub mod tls;
pub mod token;
pub mod views;
pub mod volumes;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_engine::api_auth::ApiToken;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::model::NodeName;
use crate::store::Store;
pub use error::{ApiError, ApiResult};
pub use snapshots::{ControllerClient, ControllerConnector, GrpcConnector};

use routes::{Matched, Operation};

/// The OpenAPI 3 document of this API, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Largest request body accepted: every request of this API is a small JSON object; anything larger
/// is a mistake or an attack, refused with 413 without being kept (see [`crate::body`]).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the handlers need: the store, who we are, how to reach a controller, the token to check.
#[derive(Clone)]
pub struct ApiContext {
    pub store: Arc<dyn Store>,
    /// This agent's node (for instance discovery).
    pub node: NodeName,
    pub controllers: Arc<dyn ControllerConnector>,
    /// The bearer token every request but `GET /v1/health` must carry (there is always one: see
    /// [`token`]).
    pub token: ApiToken,
    /// The agent's own metrics (reconciler, lease), served after the API's at `GET /metrics`.
    pub agent_metrics: Option<Arc<crate::metrics::AgentMetrics>>,
}

/// A request as the handlers see it (the body already read, within the limit).
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<Vec<u8>>,
    pub body: Bytes,
    /// Where the request came from (for instance discovery).
    pub peer: Option<IpAddr>,
}

/// A response: status, content type and body.
pub struct ApiResponse {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Methods the path allows (for 405).
    pub allow: Option<String>,
}

impl ApiResponse {
    fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResponse {
        match serde_json::to_vec(value) {
            Ok(body) => ApiResponse {
                status,
                content_type: "application/json",
                body,
                allow: None,
            },
            Err(e) => ApiResponse::error(&ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the answer could not be encoded: {e}"),
            )),
        }
    }

    fn error(e: &ApiError) -> ApiResponse {
        ApiResponse {
            status: e.status,
            content_type: "application/json",
            body: e.body(),
            allow: None,
        }
    }
}

/// How the API is served: plain HTTP, or HTTPS with the configured certificate and key.
#[derive(Clone)]
pub enum Transport {
    Plain,
    /// Built by [`tls::server_config`] from `endpoints.api.tls_cert_file` / `tls_key_file`.
    Tls(Arc<rustls::ServerConfig>),
}

/// Longest a client may take to open a TLS session: a connection that sends nothing holds a task.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the health probe waits for the store: a probe must answer fast,
/// and a store that does not answer a read of one key within this is, for an
/// operator, not available.
const HEALTH_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The agent's health: always answered (200), with whether the store answers.
async fn health(ctx: &ApiContext) -> views::Health {
    let kind = ctx.store.kind();
    let error = match tokio::time::timeout(HEALTH_STORE_TIMEOUT, ctx.store.get(crate::store::PROBE_KEY)).await
    {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "the cluster store did not answer within {}s; check that it runs and that this host reaches it",
            HEALTH_STORE_TIMEOUT.as_secs()
        )),
    };
    views::Health {
        status: if error.is_none() { "ok" } else { "degraded" }.into(),
        node: ctx.node.clone(),
        store: views::StoreHealth {
            kind,
            shared: kind.is_shared(),
            available: error.is_none(),
            error,
        },
    }
}

/// Serve the API on `listener` until `cancel`; connections in progress finish their current request.
pub async fn serve(listener: TcpListener, ctx: ApiContext, transport: Transport, cancel: CancellationToken) {
    let server = Arc::new(Server {
        ctx,
        metrics: metrics::Metrics::new(),
    });
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait for some to be freed.
                    tracing::warn!(error = %e, "agent API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let server = server.clone();
        let cancel = cancel.clone();
        let transport = transport.clone();
        tokio::spawn(async move {
            match transport {
                Transport::Plain => serve_connection(stream, server, peer, cancel).await,
                Transport::Tls(config) => {
                    let Some(tls) = tls::accept(stream, config, TLS_HANDSHAKE_TIMEOUT).await else {
                        return;
                    };
                    serve_connection(tls, server, peer, cancel).await;
                }
            }
        });
    }
}

/// HTTP/1.1 on one connection until the client closes it or `cancel`.
async fn serve_connection<I>(io: I, server: Arc<Server>, peer: SocketAddr, cancel: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(server.serve_request(req, peer).await) }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

struct Server {
    ctx: ApiContext,
    metrics: metrics::Metrics,
}

impl Server {
    async fn serve_request(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let label = match routes::route(&method, &path) {
            Matched::Found { pattern, .. } => pattern,
            _ => "unmatched",
        };
        let response = match self.read(req, peer).await {
            Ok(request) => {
                // The handler runs in its own task so that a bug that panics answers 500 instead of
                // dropping the connection without a word.
                let server = self.clone();
                match tokio::spawn(async move { server.handle(request).await }).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, %method, path, "agent API handler failed");
                        ApiResponse::error(&ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "the agent failed while handling this request; see its log",
                        ))
                    }
                }
            }
            Err(e) => ApiResponse::error(&e),
        };
        self.metrics.observe(
            label,
            method.as_str(),
            response.status.as_u16(),
            started.elapsed(),
        );
        let mut out = Response::new(Full::new(Bytes::from(response.body)));
        *out.status_mut() = response.status;
        out.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(response.content_type));
        if let Some(allow) = response.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            out.headers_mut().insert(ALLOW, allow);
        }
        out
    }

    /// The request with its body read, refusing a body over [`MAX_BODY_BYTES`].
    async fn read(&self, req: Request<hyper::body::Incoming>, peer: SocketAddr) -> ApiResult<ApiRequest> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is over {MAX_BODY_BYTES} bytes; every request of this API is a small JSON object"),
            )
        };
        let (parts, body) = req.into_parts();
        let body = crate::body::read_limited(&parts.headers, body, MAX_BODY_BYTES)
            .await
            .map_err(|e| match e {
                crate::body::BodyError::TooLarge => too_large(),
                crate::body::BodyError::Read(e) => {
                    ApiError::bad_request(format!("the request body could not be read: {e}"))
                }
            })?;
        Ok(ApiRequest {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            authorization: parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes().to_vec()),
            body,
            peer: Some(peer.ip()),
        })
    }

    async fn handle(&self, req: ApiRequest) -> ApiResponse {
        match routes::route(&req.method, &req.path) {
            Matched::NotFound => ApiResponse::error(&ApiError::not_found(format!(
                "no such route: {} {}; the API's routes are listed in GET /v1/openapi.json",
                req.method, req.path
            ))),
            Matched::WrongMethod(allowed) => {
                let allow = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
                let mut r = ApiResponse::error(&ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{} {} is not served; that path takes {allow}",
                        req.method, req.path
                    ),
                ));
                r.allow = Some(allow);
                r
            }
            Matched::Found {
                operation, params, ..
            } => {
                if operation != Operation::Health {
                    if let Err(e) = check_token(&self.ctx.token, req.authorization.as_deref()) {
                        return ApiResponse::error(&e);
                    }
                }
                match self.dispatch(operation, &params, &req).await {
                    Ok(r) => r,
                    Err(e) => ApiResponse::error(&e),
                }
            }
        }
    }

    async fn dispatch(&self, op: Operation, params: &[String], req: &ApiRequest) -> ApiResult<ApiResponse> {
        use Operation::*;
        let ctx = &self.ctx;
        let query = parse_query(req.query.as_deref())?;
        // Only the list and instance routes take query parameters.
        if !matches!(op, VolumeList | Instance) {
            if let Some((k, _)) = query.first() {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?}: {} {} takes none",
                    req.method, req.path
                )));
            }
        }
        let params = params
            .iter()
            .map(|p| decode_component(p))
            .collect::<ApiResult<Vec<String>>>()?;
        let param = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
        let volume = || volumes::parse_volume_name(param(0));
        let ok = |v: &dyn erased::Json| v.response(StatusCode::OK);
        Ok(match op {
            Health => ApiResponse::json(StatusCode::OK, &health(ctx).await),
            OpenApi => ApiResponse {
                status: StatusCode::OK,
                content_type: "application/json",
                body: OPENAPI.as_bytes().to_vec(),
                allow: None,
            },
            Metrics => ApiResponse {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4",
                body: {
                    let mut body = self.metrics.render(&*ctx.store).await?;
                    if let Some(m) = &ctx.agent_metrics {
                        body.extend_from_slice(m.render().as_bytes());
                    }
                    body
                },
                allow: None,
            },
            Instance => ok(&nodes::instance(ctx, &query, req.peer).await?),
            VolumeCreate => {
                let (status, v) = volumes::create(ctx, parse_body(&req.body)?).await?;
                ApiResponse::json(status, &v)
            }
            VolumeList => ok(&volumes::list(ctx, volumes::ListFilter::parse(&query)?).await?),
            VolumeInspect => ok(&volumes::inspect(ctx, &volume()?).await?),
            VolumeDelete => {
                let (status, v) = volumes::delete(ctx, &volume()?).await?;
                ApiResponse::json(status, &v)
            }
            VolumeExpand => {
                let (status, v) = volumes::expand(ctx, &volume()?, parse_body(&req.body)?).await?;
                ApiResponse::json(status, &v)
            }
            VolumeAttach => ok(&volumes::attach(ctx, &volume()?, parse_body(&req.body)?).await?),
            VolumeDetach => {
                parse_empty_body(&req.body)?;
                ok(&volumes::detach(ctx, &volume()?).await?)
            }
            VolumeQos => ok(&snapshots::set_qos(ctx, &volume()?, parse_body(&req.body)?).await?),
            SnapshotCreate => {
                let (status, v) = snapshots::create(ctx, &volume()?, parse_body(&req.body)?).await?;
                ApiResponse::json(status, &v)
            }
            SnapshotList => ok(&snapshots::list(ctx, &volume()?).await?),
            SnapshotDelete => ok(&snapshots::delete(ctx, &volume()?, param(1)).await?),
            SnapshotRevert => ok(&snapshots::revert(ctx, &volume()?, param(1)).await?),
            NodeList => ok(&nodes::list(ctx).await?),
            NodeInspect => ok(&nodes::inspect(ctx, param(0)).await?),
            NodeCordon => ok(&nodes::act(ctx, param(0), nodes::NodeAction::Cordon).await?),
            NodeUncordon => ok(&nodes::act(ctx, param(0), nodes::NodeAction::Uncordon).await?),
            NodeDrain => ok(&nodes::act(ctx, param(0), nodes::NodeAction::Drain).await?),
        })
    }
}

/// Serializing any view without naming its type at each call site.
mod erased {
    use super::ApiResponse;
    use hyper::StatusCode;

    pub trait Json {
        fn response(&self, status: StatusCode) -> ApiResponse;
    }

    impl<T: serde::Serialize> Json for T {
        fn response(&self, status: StatusCode) -> ApiResponse {
            ApiResponse::json(status, self)
        }
    }
}

/// What a client is told to do about a missing or wrong token (the CLI's ways of giving it).
pub const TOKEN_HELP: &str =
    "pass the agent's token: `basalt --agent-token-file FILE` or BASALT_AGENT_TOKEN_FILE \
     (the file the agent's endpoints.api.token_file names, or DATA_DIR/api-token, which the agent generates \
     when none is configured), or the token itself in BASALT_AGENT_TOKEN";

/// Whether `authorization` carries the token (constant time); the error never echoes what was sent.
pub fn check_token(token: &ApiToken, authorization: Option<&[u8]>) -> ApiResult<()> {
    let Some(header) = authorization else {
        return Err(ApiError::unauthorized(format!(
            "this API requires a bearer token (`Authorization: Bearer TOKEN`): {TOKEN_HELP}"
        )));
    };
    let presented = header.strip_prefix(b"Bearer ").unwrap_or(b"");
    // Slices of different lengths compare false at once: only the length leaks.
    if bool::from(token.expose().as_bytes().ct_eq(presented)) {
        Ok(())
    } else {
        tracing::warn!("refused an agent API request with a wrong token");
        Err(ApiError::unauthorized(format!(
            "the bearer token is wrong: {TOKEN_HELP}"
        )))
    }
}

/// A JSON body, or a 400 that names the field that is wrong.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "this request needs a JSON body (see GET /v1/openapi.json for its fields)",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::bad_request(format!("the request body is not valid: {inner}; send JSON as documented in GET /v1/openapi.json"))
        } else {
            ApiError::bad_request(format!(
                "the request body is not valid at `{path}`: {inner}; send JSON as documented in GET /v1/openapi.json"
            ))
        }
    })
}

/// A body that must be empty or an empty JSON object.
fn parse_empty_body(body: &[u8]) -> ApiResult<()> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    parse_body::<Empty>(body).map(|_| ())
}

/// A path segment or query component, percent-decoded.
fn decode_component(s: &str) -> ApiResult<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::bad_request(format!("{s:?} in the URL is not UTF-8 once percent-decoded")))
}

/// `a=1&b=2`, percent-decoded.
pub fn parse_query(query: Option<&str>) -> ApiResult<Vec<(String, String)>> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(Vec::new());
    };
    let decode = |s: &str| decode_component(&s.replace('+', " "));
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> ApiToken {
        ApiToken::new("0123456789abcdef0123").unwrap()
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        assert!(check_token(&token(), Some(b"Bearer 0123456789abcdef0123")).is_ok());
        for wrong in [
            &b"Bearer 0123456789abcdef0124"[..],
            b"0123456789abcdef0123",
            b"",
            b"Bearer ",
        ] {
            let e = check_token(&token(), Some(wrong)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
            assert!(!e.message.contains("0123"), "the message never echoes a token");
        }
        let e = check_token(&token(), None).unwrap_err();
        assert!(e.message.contains("requires") && e.message.contains("--agent-token-file"));
    }

    #[test]
    fn a_bad_body_names_the_field() {
        let e = parse_body::<views::CreateVolume>(br#"{"name": "a", "size_bytes": "ten"}"#).unwrap_err();
        assert!(e.message.contains("size_bytes"), "{}", e.message);
        let e = parse_body::<views::CreateVolume>(br#"{"name": "a", "colour": 1}"#).unwrap_err();
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = parse_body::<views::CreateVolume>(br#"{"name": "a", "qos": {"read_iops": -1}}"#).unwrap_err();
        assert!(e.message.contains("qos.read_iops"), "{}", e.message);
        let e = parse_body::<views::CreateVolume>(b"").unwrap_err();
        assert!(e.message.contains("needs a JSON body"));
        assert!(parse_empty_body(b"{}").is_ok() && parse_empty_body(b"").is_ok());
        assert!(parse_empty_body(b"{\"x\":1}").is_err());
    }

    #[test]
    fn the_openapi_document_describes_exactly_the_routes_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("agent/openapi.json is JSON");
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
                if item.get(method).is_some() {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let served: std::collections::BTreeSet<(String, String)> = routes::routes()
            .iter()
            .map(|r| (r.method.to_string(), r.pattern.to_string()))
            .collect();
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(missing.is_empty(), "served but not documented: {missing:?}");
        assert!(extra.is_empty(), "documented but not served: {extra:?}");
        // Only the health probe is open.
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if method == "parameters" {
                    continue;
                }
                let open = op
                    .get("security")
                    .is_some_and(|s| s.as_array().is_some_and(Vec::is_empty));
                assert_eq!(open, path == "/v1/health", "{method} {path}");
            }
        }
    }

    #[test]
    fn queries_are_decoded() {
        assert_eq!(
            parse_query(Some("label=zone%3Da&phase=ready")).unwrap(),
            vec![
                ("label".into(), "zone=a".into()),
                ("phase".into(), "ready".into())
            ]
        );
        assert!(parse_query(Some("a=%ff")).is_err());
        assert!(parse_query(None).unwrap().is_empty());
    }
}
