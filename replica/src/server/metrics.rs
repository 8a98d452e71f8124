//! Prometheus metrics of a replica server, and the tiny HTTP endpoint that
//! serves them at `/metrics`.
//!
//! Latencies are histograms, not averages (users of Longhorn ask for exactly
//! that): a request's latency runs from the moment its frame is decoded to
//! the moment its reply is queued for the socket, so it includes queueing
//! behind earlier writes on the same connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::frame::{Op, ReplyError};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Latency buckets in seconds: from 25 µs (a ping, a cached read) to 10 s (a
/// snapshot merge); roughly doubling so that each bucket is one step of "got
/// noticeably slower".
const LATENCY_BUCKETS: &[f64] = &[
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
];

/// The replica's metrics, registered in their own [`Registry`].
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    bytes: IntCounterVec,
    latency: HistogramVec,
    connections: IntGauge,
    protocol_errors: IntCounter,
    epoch: IntGauge,
    revision: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("basalt_replica".into()), None)
            .expect("a constant, valid metric prefix");
        let requests = IntCounterVec::new(Opts::new("requests_total", "Requests received, by op."), &["op"])
            .expect("valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "request_errors_total",
                "Requests answered with an error, by op and status.",
            ),
            &["op", "status"],
        )
        .expect("valid");
        let bytes = IntCounterVec::new(
            Opts::new("bytes_total", "Payload bytes read from or written to the store."),
            &["direction"],
        )
        .expect("valid");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "From request decoded to reply queued, by op.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid");
        let connections = IntGauge::new("connections", "Open controller connections.").expect("valid");
        let protocol_errors = IntCounter::new(
            "protocol_errors_total",
            "Connections closed because a frame did not decode.",
        )
        .expect("valid");
        let epoch = IntGauge::new("epoch", "The replica's current (durable) epoch.").expect("valid");
        let revision = IntGauge::new("revision", "The replica's durable flush revision.").expect("valid");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(bytes.clone()),
            Box::new(latency.clone()),
            Box::new(connections.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(epoch.clone()),
            Box::new(revision.clone()),
        ] {
            registry.register(c).expect("each metric is registered once");
        }
        Metrics {
            registry,
            requests,
            errors,
            bytes,
            latency,
            connections,
            protocol_errors,
            epoch,
            revision,
        }
    }

    pub(super) fn request(&self, op: Op) {
        self.requests.with_label_values(&[op.name()]).inc();
    }

    pub(super) fn completed(&self, op: Op, elapsed: Duration, error: Option<&ReplyError>) {
        self.latency
            .with_label_values(&[op.name()])
            .observe(elapsed.as_secs_f64());
        if let Some(e) = error {
            self.errors.with_label_values(&[op.name(), e.name()]).inc();
        }
    }

    pub(super) fn bytes_read(&self, n: usize) {
        self.bytes.with_label_values(&["read"]).inc_by(n as u64);
    }

    pub(super) fn bytes_written(&self, n: usize) {
        self.bytes.with_label_values(&["write"]).inc_by(n as u64);
    }

    pub(super) fn connection_opened(&self) {
        self.connections.inc();
    }

    pub(super) fn connection_closed(&self) {
        self.connections.dec();
    }

    pub(super) fn protocol_error(&self) {
        self.protocol_errors.inc();
    }

    /// The text exposition of every metric, with the store's gauges fresh.
    pub fn render(&self, store: &Store) -> String {
        self.epoch.set(i64::try_from(store.epoch().0).unwrap_or(i64::MAX));
        self.revision
            .set(i64::try_from(store.revision().0).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        // Encoding into a Vec only fails on a malformed metric family, which
        // the constructors above rule out; an empty page is the fallback.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The registry, to add these metrics to a larger exposition.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled. Any
/// other path is a 404. One task per HTTP connection; scrapes are rare.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Metrics,
    store: Arc<Store>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let page = (req.uri().path() == "/metrics").then(|| metrics.render(&store));
                async move { Ok::<_, Infallible>(metrics_response(page)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

fn metrics_response(page: Option<String>) -> Response<Full<Bytes>> {
    let (status, body) = match page {
        Some(text) => (StatusCode::OK, Bytes::from(text)),
        None => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found; metrics are at /metrics\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Binds the metrics listener (separately from serving, so that a bad
/// address is reported before the replica starts).
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
