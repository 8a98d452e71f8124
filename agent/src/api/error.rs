//! The API's errors: one JSON shape, `{"error": {"code": "...", "message": "..."}}`, with the HTTP status
//! that says whose fault it is. Every message says what was wrong and what to do about it.

use hyper::StatusCode;
use serde::Serialize;

use crate::store::StoreError;

/// An answer other than success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable machine-readable word (`not_found`, `conflict`, ...).
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The request is malformed or asks for something impossible (400).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The request clashes with the state of the cluster (a name taken, an attached volume).
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// Well-formed, but the cluster cannot hold it (no placement satisfies it).
    pub fn unplaceable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "placement_failed", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// The volume's controller does not answer (not started yet, or down).
    pub fn controller_unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "controller_unavailable", message)
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        // A struct of two strings always serializes.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if let StoreError::Unavailable(_) = e {
            // The store (etcd) does not answer: nothing can be read or changed, but the volumes
            // already running keep serving; the client retries later.
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "{e}; volumes already running keep serving, but this request needs the store: retry once \
                     GET /v1/health reports the store available"
                ),
            );
        }
        let status = match &e {
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            // What the request would store is beyond the store's limits.
            StoreError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            StoreError::Unavailable(_) | StoreError::LeaseExpired(_) | StoreError::Compacted { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            StoreError::Corrupt { .. } | StoreError::BadRecord { .. } | StoreError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let code = match status {
            StatusCode::CONFLICT => "conflict",
            StatusCode::BAD_REQUEST => "bad_request",
            _ => "store_failed",
        };
        ApiError::new(status, code, format!("the cluster store failed: {e}"))
    }
}

/// The result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_store_is_503_store_unavailable() {
        let e = ApiError::from(StoreError::Unavailable(
            "no etcd member answers (10.0.0.1:2379: refused)".into(),
        ));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        );
        assert!(
            e.message.contains("10.0.0.1:2379") && e.message.contains("retry"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_body_is_the_documented_shape() {
        let e = ApiError::conflict("volume \"a\" exists");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "conflict");
        assert_eq!(v["error"]["message"], "volume \"a\" exists");
    }
}
