//! # Who may manage a volume: the management API's bearer token
//!
//! Every call to the controller's `ControllerService` (revert, replica rm, snapshot delete, ...) must
//! carry `authorization: Bearer <token>`; [`RequireToken`], a tonic interceptor in front of the whole
//! service, answers any other call `UNAUTHENTICATED` before a handler sees it. The token is compared in
//! constant time, so the time a refusal takes says nothing about how much of a guess was right. The CLI
//! attaches it to each call with [`WithToken`].
//!
//! The token is a shared secret, like the volume's: it comes from a file or the environment, never from
//! the command line, and is never logged or printed (`Debug` is redacted). The transport may add TLS
//! (`--api-tls-cert`/`--api-tls-key`); without TLS the token crosses the network in clear text, which is
//! fine on a loopback or a private pod network and is what TLS is for elsewhere.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// Fewest bytes a token may have: 128 bits of a random token are beyond guessing; anything shorter is
/// most likely a placeholder or an empty file.
pub const MIN_TOKEN_LEN: usize = 16;

/// Longest token accepted: it travels in a header of every call.
pub const MAX_TOKEN_LEN: usize = 1024;

/// The management API's bearer token. Cheap to clone; never printed.
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

/// Why bytes cannot be an API token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the API token is {len} bytes; it must have at least {MIN_TOKEN_LEN}")]
    TooShort { len: usize },
    #[error("the API token is {len} bytes; at most {MAX_TOKEN_LEN} are accepted (is it the right file?)")]
    TooLong { len: usize },
    #[error(
        "the API token must be printable ASCII without spaces (it travels in an HTTP header); byte {at} is not"
    )]
    NotPrintable { at: usize },
}

impl ApiToken {
    /// A token from a file's or a variable's bytes, trailing line breaks removed.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<ApiToken, TokenError> {
        let mut bytes = bytes.as_ref();
        while let [rest @ .., b'\n' | b'\r'] = bytes {
            bytes = rest;
        }
        if let Some(at) = bytes.iter().position(|b| !b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable { at });
        }
        match bytes.len() {
            len if len < MIN_TOKEN_LEN => Err(TokenError::TooShort { len }),
            len if len > MAX_TOKEN_LEN => Err(TokenError::TooLong { len }),
            // Printable ASCII is UTF-8.
            _ => Ok(ApiToken(String::from_utf8_lossy(bytes).into())),
        }
    }

    /// A fresh random token (32 random bytes as hex).
    pub fn generate() -> ApiToken {
        ApiToken(basalt_proto::auth::hex(&rand::random::<[u8; 32]>()).into())
    }

    /// The token, to store it (0600) where it was generated.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `header` (an `authorization` value) carries this token, in constant time.
    fn admits(&self, header: &[u8]) -> bool {
        let Some(presented) = header.strip_prefix(b"Bearer ") else {
            return false;
        };
        // `ct_eq` of slices of different lengths is false at once: only the length leaks, and every
        // generated token has the same one.
        self.0.as_bytes().ct_eq(presented).into()
    }

    fn header(&self) -> Result<MetadataValue<Ascii>, Status> {
        // Printable ASCII by construction, so this cannot fail; a Status rather than a panic all the same.
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| Status::internal("the API token is not a valid header value"))
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// The server side: refuses every call that does not carry the token.
#[derive(Clone, Debug)]
pub struct RequireToken(pub ApiToken);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get("authorization") {
            Some(value) if self.0.admits(value.as_bytes()) => Ok(request),
            Some(_) => {
                tracing::warn!("refused a management API call with a wrong token");
                Err(Status::unauthenticated(
                    "the API token is wrong: pass the controller's token with --token-file or BASALT_API_TOKEN",
                ))
            }
            None => Err(Status::unauthenticated(
                "the management API requires a token: pass it with --token-file or BASALT_API_TOKEN \
                 (`authorization: Bearer TOKEN`)",
            )),
        }
    }
}

/// The client side: attaches the token to every call.
#[derive(Clone, Debug)]
pub struct WithToken(pub ApiToken);

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.header()?);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn token() -> ApiToken {
        ApiToken::new("0123456789abcdef0123\n").unwrap()
    }

    fn with_header(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(v) = value {
            request.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let mut check = RequireToken(token());
        assert!(check
            .call(with_header(Some("Bearer 0123456789abcdef0123")))
            .is_ok());
        for wrong in [
            "Bearer 0123456789abcdef0124",
            "Bearer 0123456789abcdef012",
            "0123456789abcdef0123",
            "",
        ] {
            let status = check.call(with_header(Some(wrong))).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains("wrong"), "{}", status.message());
        }
        let status = check.call(with_header(None)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("requires a token"));
    }

    #[test]
    fn the_client_side_attaches_what_the_server_side_admits() {
        let request = WithToken(token()).call(Request::new(())).unwrap();
        assert!(RequireToken(token()).call(request).is_ok());
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert_eq!(
            ApiToken::new("short").unwrap_err(),
            TokenError::TooShort { len: 5 }
        );
        assert_eq!(
            ApiToken::new("0123456789 abcdef").unwrap_err(),
            TokenError::NotPrintable { at: 10 }
        );
        assert!(!format!("{:?}", token()).contains("0123"));
        assert_eq!(ApiToken::generate().expose().len(), 64);
    }
}
