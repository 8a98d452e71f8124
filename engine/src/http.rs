//! A minimal HTTP endpoint for Prometheus scrapes: `GET /metrics`.
//!
//! It needs no token, unlike the management API (`crate::api_auth`): it only reads counters and gauges
//! (I/O totals, replica modes, latencies), changes nothing, and answers nothing but `GET /metrics`, so a
//! scraper cannot act on the volume through it; Prometheus scrapes without credentials by default.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the current metrics in the text exposition format.
pub type Render = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Serve `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve_metrics(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let page = (req.uri().path() == "/metrics").then(|| render());
                async move {
                    let mut response = match page {
                        Some(text) => Response::new(Full::new(Bytes::from(text))),
                        None => {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"metrics are at /metrics\n")));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
