//! # The management API over TLS
//!
//! The controller's `ControllerService` may serve TLS (`basalt controller --api-tls-cert FILE
//! --api-tls-key FILE`); a client then verifies the server against a CA it is given (`--api-ca FILE`)
//! and the name it expects the certificate to carry (the host of `--api`, or `--api-tls-name`). TLS
//! protects the bearer token of [`crate::api_auth`] on the way and proves the client talks to the real
//! controller; the token still decides who may manage the volume, so the interceptor stays in front of
//! the service with or without TLS.
//!
//! ```text
//!   CLI ── TLS (server cert checked against --api-ca) ──► controller :9600
//!          └── every call: authorization: Bearer TOKEN ──► RequireToken ──► ControllerService
//! ```
//!
//! This module reads and checks the PEM files before anything listens or connects, so a wrong file is
//! an error naming the file at start, not a handshake failure later; and it turns a failed connection
//! into a [`ConnectFailure`] that says what the operator has to change (a plaintext client meeting a TLS
//! server, a CA that did not sign the server's certificate, a name the certificate does not carry).
//! The crypto provider is rustls' `ring` (one provider for the workspace: it builds without cmake).
//!
//! The node agent's REST API (hyper over rustls rather than tonic) uses the same loaders through
//! [`rustls_server_config`] and [`rustls_client_config`], and the same [`classify`] for its client.

use std::error::Error as StdError;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, RootCertStore};
use tonic::transport::{ClientTlsConfig, Identity, ServerTlsConfig};

/// Why PEM bytes cannot serve as the API's certificate, key or CA. The caller adds which file it was.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("it holds no PEM certificate (`-----BEGIN CERTIFICATE-----`); is it the right file?")]
    NoCertificate,
    #[error("it holds no PEM private key (PKCS#8, PKCS#1 or SEC1 `-----BEGIN ... PRIVATE KEY-----`); is it the right file?")]
    NoKey,
    #[error("it is not valid PEM: {0}")]
    Malformed(String),
    #[error("certificate {index} in it cannot be a CA: {reason}")]
    BadCa { index: usize, reason: String },
}

fn malformed(e: pem::Error) -> PemError {
    match e {
        pem::Error::NoItemsFound => PemError::NoCertificate,
        other => PemError::Malformed(other.to_string()),
    }
}

/// The certificates in `pem`, at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(malformed)?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// Checks a server certificate chain (`cert`, leaf first) and its private key (`key`), both PEM, and
/// returns them as the server's TLS configuration. Whether the key belongs to the certificate is checked
/// when the server is built with it (`Server::tls_config`), before it listens.
pub fn server_config(cert: &[u8], key: &[u8]) -> Result<ServerTlsConfig, ServerPemError> {
    server_identity(cert, key)?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

/// Which of the server's two files is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ServerPemError {
    #[error("the certificate file: {0}")]
    Cert(PemError),
    #[error("the key file: {0}")]
    Key(PemError),
    /// Both files are PEM of the right kind, but the key is not the certificate's (or rustls cannot
    /// use it).
    #[error("the key file does not belong to the certificate file ({0}); give the key the certificate was issued for")]
    Mismatch(String),
}

/// The certificate chain and key of `cert` and `key` (PEM), each checked on its own.
fn server_identity(
    cert: &[u8],
    key: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerPemError> {
    let chain = certificates(cert).map_err(ServerPemError::Cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        ServerPemError::Key(match e {
            pem::Error::NoItemsFound => PemError::NoKey,
            other => PemError::Malformed(other.to_string()),
        })
    })?;
    Ok((chain, key))
}

/// The crypto provider of every rustls configuration built here (see the module docs): the one
/// tonic's `tls-ring` builds its own with, so both APIs offer the same suites.
// rustls 0.23.48 deprecates it for lacking post-quantum key exchange, which only aws-lc (cmake) has.
#[allow(deprecated)]
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// [`server_config`] for a server that runs rustls itself (the node agent's REST API over hyper):
/// the same PEM checks, and the key checked against the certificate here, so a mismatched pair is an
/// error naming the files before anything listens. `alpn`: the protocols offered (e.g. `http/1.1`).
pub fn rustls_server_config(
    cert: &[u8],
    key: &[u8],
    alpn: &[&[u8]],
) -> Result<std::sync::Arc<rustls::ServerConfig>, ServerPemError> {
    let (chain, key) = server_identity(cert, key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerPemError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServerPemError::Mismatch(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(std::sync::Arc::new(config))
}

/// [`client_config`] for a client that runs rustls itself: trust exactly the CAs of `ca` (PEM).
pub fn rustls_client_config(
    ca: &[u8],
    alpn: &[&[u8]],
) -> Result<std::sync::Arc<rustls::ClientConfig>, PemError> {
    let roots = root_store(ca)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PemError::Malformed(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(std::sync::Arc::new(config))
}

/// The CAs of a PEM bundle, at least one, each usable as a trust anchor.
fn root_store(ca: &[u8]) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in certificates(ca)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| PemError::BadCa {
            index: index + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Checks a CA bundle (PEM, one or more certificates) and returns the client's TLS configuration:
/// trust exactly these CAs, and expect the server's certificate to carry `server_name` (when `None`,
/// the host of the address connected to).
pub fn client_config(ca: &[u8], server_name: Option<&str>) -> Result<ClientTlsConfig, PemError> {
    let roots = root_store(ca)?;
    let config = ClientTlsConfig::new().trust_anchors(roots.roots);
    Ok(match server_name {
        Some(name) => config.domain_name(name),
        None => config,
    })
}

/// What went wrong when a client connected to the API, in the terms of what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens there.
    Refused,
    /// A TLS client met a server that does not speak TLS.
    ServerNotTls,
    /// A plaintext client was answered with something that is not HTTP/2, or the connection was
    /// closed during the handshake: what a TLS server does to a plaintext client.
    MaybeTlsServer,
    /// The server's certificate is not signed by the CA the client trusts.
    UnknownIssuer,
    /// The server's certificate does not carry the name the client expects.
    WrongName,
    /// The server's certificate is expired or not yet valid.
    Expired,
    /// Another TLS failure, in rustls' words.
    Tls(String),
    /// Anything else (a reset, an unreachable network).
    Other,
}

/// Classifies the error of a failed connection by what its chain holds. `tls`: whether the client
/// spoke TLS.
pub fn classify(error: &(dyn StdError + 'static), tls: bool) -> ConnectFailure {
    let mut saw_eof_or_protocol = false;
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return classify_rustls(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return ConnectFailure::Refused,
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => saw_eof_or_protocol = true,
                _ => {}
            }
            // `io::Error::source` skips the error it wraps; rustls' errors travel inside one.
            if let Some(inner) = io.get_ref() {
                if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                    return classify_rustls(r);
                }
                next = Some(inner);
                continue;
            }
        }
        next = e.source();
    }
    let text = error_chain_text(error);
    // hyper reports a peer that closed before answering in words rather than in a typed io error.
    if text.contains("connection closed") || text.contains("frame") || text.contains("protocol error") {
        saw_eof_or_protocol = true;
    }
    match (tls, saw_eof_or_protocol) {
        (true, true) => ConnectFailure::ServerNotTls,
        (false, true) => ConnectFailure::MaybeTlsServer,
        _ => ConnectFailure::Other,
    }
}

fn classify_rustls(e: &rustls::Error) -> ConnectFailure {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => ConnectFailure::UnknownIssuer,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ConnectFailure::WrongName
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => ConnectFailure::Expired,
            other => ConnectFailure::Tls(format!("the server's certificate is invalid: {other:?}")),
        },
        // A plaintext server answers a ClientHello with bytes that are no TLS record.
        rustls::Error::InvalidMessage(_) => ConnectFailure::ServerNotTls,
        other => ConnectFailure::Tls(other.to_string()),
    }
}

/// Every message of an error chain, joined by ": ".
pub fn error_chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut parts = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA (`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj /CN=basalt-test-ca`).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBhzCCAS2gAwIBAgIUWIVuNYKJC+JkswJnir9ts5PwLygwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOYmFzYWx0LXRlc3QtY2EwHhcNMjYxMjA2MjMzMDE5WhcNMzYx
MjAzMjMzMDE5WjAZMRcwFQYDVQQDDA5iYXNhbHQtdGVzdC1jYTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABDrjysE18vud019djpaPySgaPbUH5PhN8d7yZKgsTwqL
jCHRQ5U2tOpFaAUbBD14VR0jyvu3uxygPUR0xcHqfUejUzBRMB0GA1UdDgQWBBRD
aOEHgOLMwV0ZUzigTZCz3otULzAfBgNVHSMEGDAWgBRDaOEHgOLMwV0ZUzigTZCz
3otULzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCSrQGmt5Cj
EnJ2uAQfCrwlENsj2/siVK9hVJQ37g1TeAIga2syPVNcq/V6jlJx6KX4g3LLVcdK
91euAoU6+LPvLnQ=
-----END CERTIFICATE-----
";

    #[test]
    fn files_without_pem_say_what_they_lack() {
        assert!(matches!(
            client_config(b"not a certificate", None),
            Err(PemError::NoCertificate)
        ));
        assert!(matches!(
            server_config(b"", b"").unwrap_err(),
            ServerPemError::Cert(PemError::NoCertificate)
        ));
        let key_only = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            server_config(key_only, key_only).unwrap_err(),
            ServerPemError::Cert(PemError::NoCertificate)
        ));
        let err = server_config(CA_PEM.as_bytes(), CA_PEM.as_bytes()).unwrap_err();
        assert!(matches!(err, ServerPemError::Key(PemError::NoKey)), "{err}");
        assert!(err.to_string().contains("key file"), "{err}");
    }

    #[test]
    fn a_certificate_that_is_no_x509_is_refused_as_a_ca() {
        // Valid PEM armour around bytes that are no certificate.
        let junk = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
        let err = client_config(junk.as_bytes(), None).unwrap_err();
        assert!(matches!(err, PemError::BadCa { index: 1, .. }), "{err}");
    }

    fn io_wrapping(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    /// An error that wraps another, as hyper and tonic do.
    #[derive(Debug)]
    struct Wrapped(Box<dyn StdError + Send + Sync>);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }
    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn certificate_failures_are_told_apart_inside_the_chain() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                ConnectFailure::UnknownIssuer,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                ConnectFailure::WrongName,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                ConnectFailure::Expired,
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                ConnectFailure::ServerNotTls,
            ),
        ];
        for (error, expected) in cases {
            let chain = Wrapped(Box::new(io_wrapping(error)));
            assert_eq!(classify(&chain, true), expected);
        }
    }

    #[test]
    fn a_closed_handshake_points_at_the_other_side_of_tls() {
        let eof = || Wrapped(Box::new(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
        assert_eq!(classify(&eof(), false), ConnectFailure::MaybeTlsServer);
        assert_eq!(classify(&eof(), true), ConnectFailure::ServerNotTls);
        let refused = Wrapped(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(classify(&refused, false), ConnectFailure::Refused);
        let other = Wrapped(Box::new(std::io::Error::from(
            std::io::ErrorKind::PermissionDenied,
        )));
        assert_eq!(classify(&other, false), ConnectFailure::Other);
    }

    #[test]
    fn a_chain_is_told_once_per_message() {
        let chain = Wrapped(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(error_chain_text(&chain), "transport error: connection reset");
    }
}
