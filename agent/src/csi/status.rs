//! The REST API's errors as gRPC statuses. Each RPC maps the cases the CSI spec names itself (a
//! conflict is ALREADY_EXISTS in one RPC and FAILED_PRECONDITION in another); this is the rest.

use hyper::StatusCode;
use tonic::{Code, Status};

use crate::api::ApiError;
use crate::store::StoreError;

/// The closest gRPC status to an API error, its message kept.
pub fn from_api(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST => Code::InvalidArgument,
        StatusCode::NOT_FOUND => Code::NotFound,
        // Another writer changed the record (retry) or the state forbids it.
        StatusCode::CONFLICT => Code::FailedPrecondition,
        // No placement satisfies it: the cluster lacks room, nodes or ports.
        StatusCode::UNPROCESSABLE_ENTITY => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, e.message)
}

pub fn from_store(e: StoreError) -> Status {
    from_api(e.into())
}

/// Whether a code says the caller asked for something wrong or not yet possible (logged quietly).
pub fn callers_fault(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Aborted
            | Code::Unimplemented
            | Code::ResourceExhausted
    )
}

/// INVALID_ARGUMENT for a missing required field.
pub fn required(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}
