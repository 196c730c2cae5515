//! The one mapping from API errors to gRPC status codes.
//!
//! Exhaustive on purpose: a new error variant does not compile until it is given a code.
//! Internals (file paths, backend messages) stay in the log, not in the status message.

use tonic::{Code, Status};

use crate::{model::Invalid, security::Denied, store};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is not acceptable.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The namespace header is not acceptable.
    #[error("namespace header: {0}")]
    Namespace(Invalid),
    /// Nothing is stored under the key.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, for the message.
        what: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Authentication or authorization refused the request.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The caller's publish rate limit is used up; retrying after `retry_after` helps.
    #[error("publish rate limit exceeded; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// How long until the next publish is accepted.
        retry_after: std::time::Duration,
    },
}

/// The status code of an error.
pub fn code(error: &Error) -> Code {
    match error {
        Error::Invalid(invalid) | Error::Namespace(invalid) => match invalid {
            Invalid::ValueTooLarge { .. } => Code::ResourceExhausted,
            Invalid::Empty { .. }
            | Invalid::TooLong { .. }
            | Invalid::ControlCharacter { .. }
            | Invalid::Forbidden { .. } => Code::InvalidArgument,
        },
        Error::NotFound { .. } => Code::NotFound,
        Error::Store(store_error) => match store_error {
            store::Error::Unavailable(_) => Code::Unavailable,
            store::Error::Storage(_) => Code::Internal,
            store::Error::NamespaceFull { .. } => Code::ResourceExhausted,
        },
        Error::Denied(denied) => match denied {
            Denied::Unauthenticated | Denied::BadCredentials => Code::Unauthenticated,
            Denied::PermissionDenied => Code::PermissionDenied,
        },
        Error::RateLimited { .. } => Code::ResourceExhausted,
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = code(&error);
        let message = match &error {
            // Backend details stay in the log.
            Error::Store(store::Error::Unavailable(_)) => {
                "the store cannot take this request now; retry later".to_string()
            }
            Error::Store(store::Error::Storage(_)) => {
                "the store failed; see the server log".to_string()
            }
            Error::RateLimited { retry_after } => {
                // RetryInfo in grpc-status-details-bin, as google.rpc defines for quota
                // errors, so clients with standard retry support back off by it.
                use tonic_types::{ErrorDetails, StatusExt};
                return Status::with_error_details(
                    code,
                    error.to_string(),
                    ErrorDetails::with_retry_info(Some(*retry_after)),
                );
            }
            Error::Invalid(_)
            | Error::Namespace(_)
            | Error::NotFound { .. }
            | Error::Denied(_)
            | Error::Store(store::Error::NamespaceFull { .. }) => error.to_string(),
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let cases = [
            (
                Error::Invalid(Invalid::Empty { field: "f" }),
                Code::InvalidArgument,
            ),
            (
                Error::Invalid(Invalid::ValueTooLarge {
                    field: "f",
                    len: 2,
                    limit: 1,
                }),
                Code::ResourceExhausted,
            ),
            (Error::NotFound { what: "x".into() }, Code::NotFound),
            (
                Error::Store(store::Error::Unavailable("down".into())),
                Code::Unavailable,
            ),
            (
                Error::Store(store::Error::Storage("/secret/path".into())),
                Code::Internal,
            ),
            (
                Error::Denied(Denied::Unauthenticated),
                Code::Unauthenticated,
            ),
            (Error::Denied(Denied::BadCredentials), Code::Unauthenticated),
            (
                Error::Denied(Denied::PermissionDenied),
                Code::PermissionDenied,
            ),
            (
                Error::RateLimited {
                    retry_after: std::time::Duration::from_millis(20),
                },
                Code::ResourceExhausted,
            ),
        ];
        for (error, expected) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), expected);
            assert!(!status.message().contains("/secret/path"));
        }
    }
}
