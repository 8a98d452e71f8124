//! The API over HTTPS (`endpoints.api.tls_cert_file` / `tls_key_file`).
//!
//! The PEM files are read and checked with the controller API's loader
//! ([`basalt_engine::api_tls::rustls_server_config`]): a missing file, a file of the wrong kind or a
//! key that is not the certificate's stops the agent at start with the file named. A client that
//! speaks plain HTTP to the TLS port is answered in plain HTTP with the API's JSON error saying to
//! use `https://` and a CA, rather than a dropped connection it cannot explain.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ApiError;

/// The one protocol the API speaks, offered in ALPN.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// How long a refused plaintext client may take to read our answer and close.
const PLAINTEXT_DRAIN: Duration = Duration::from_secs(2);

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The server configuration from the two PEM files; errors name the file and its key.
pub fn server_config(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert = std::fs::read(cert_file).with_context(|| {
        format!(
            "reading the API certificate {} (endpoints.api.tls_cert_file)",
            cert_file.display()
        )
    })?;
    let key = std::fs::read(key_file).with_context(|| {
        format!(
            "reading the API key {} (endpoints.api.tls_key_file)",
            key_file.display()
        )
    })?;
    basalt_engine::api_tls::rustls_server_config(&cert, &key, &[ALPN_HTTP1]).map_err(|e| {
        anyhow::anyhow!(
            "endpoints.api TLS files {} (tls_cert_file) and {} (tls_key_file): {e}",
            cert_file.display(),
            key_file.display()
        )
    })
}

/// The TLS session of a new connection, or `None` when there is none to serve: the client spoke
/// plain HTTP (answered here with a 400 that says what to change), failed the handshake, or took
/// longer than `timeout`.
pub async fn accept(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake = async {
        let mut first = [0u8; 1];
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            refuse_plaintext(stream).await;
            return None;
        }
        match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                // A client that does not trust our certificate ends here; its side says why.
                tracing::debug!(error = %e, "agent API: TLS handshake failed");
                None
            }
        }
    };
    tokio::time::timeout(timeout, handshake).await.ok().flatten()
}

/// The answer to plain HTTP on the TLS port: a complete HTTP/1.1 response, then the connection closes.
async fn refuse_plaintext(mut stream: TcpStream) {
    let body = ApiError::new(
        StatusCode::BAD_REQUEST,
        "tls_required",
        "this agent serves its API over TLS (endpoints.api.tls_cert_file): use an https:// agent URL and \
         pass the CA that signed its certificate with --agent-ca FILE or BASALT_AGENT_CA",
    )
    .body();
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
    // Closing with the request unread would reset the connection, and a reset may reach the client
    // before our answer does: read what it sent until it closes too (briefly).
    let drain = async {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(PLAINTEXT_DRAIN, drain).await;
}
