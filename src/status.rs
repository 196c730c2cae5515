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
    /// As many streams are open as the server allows.
    #[error("stream limit reached ({limit} open streams)")]
    TooManyStreams {
        /// The configured limit.
        limit: usize,
    },
    /// This server was started without what the method needs.
    #[error("{what} is not enabled on this server")]
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
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
            Invalid::ValueTooLarge { .. } | Invalid::TooMany { .. } => Code::ResourceExhausted,
            Invalid::Empty { .. }
            | Invalid::TooLong { .. }
            | Invalid::ControlCharacter { .. }
            | Invalid::BidiControl { .. }
            | Invalid::Forbidden { .. } => Code::InvalidArgument,
        },
        Error::NotFound { .. } => Code::NotFound,
        Error::Store(store_error) => match store_error {
            store::Error::Unavailable(_) => Code::Unavailable,
            store::Error::Storage(_) => Code::Internal,
            store::Error::NamespaceFull { .. } => Code::ResourceExhausted,
            store::Error::TooLarge(_) => Code::ResourceExhausted,
            store::Error::Rejected(_) => Code::InvalidArgument,
        },
        Error::TooManyStreams { .. } => Code::ResourceExhausted,
        Error::Unsupported { .. } => Code::Unimplemented,
        Error::Denied(denied) => denied.code(),
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
            Error::Store(store::Error::TooLarge(_)) => {
                "the record is larger than the store accepts (the Kubernetes API server's object \
                 size limit); publish a smaller value"
                    .to_string()
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
            | Error::Store(store::Error::Rejected(_))
            | Error::NotFound { .. }
            | Error::Store(store::Error::NamespaceFull { .. })
            | Error::TooManyStreams { .. }
            | Error::Unsupported { .. }
            | Error::Denied(_) => error.to_string(),
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
            (Error::TooManyStreams { limit: 1 }, Code::ResourceExhausted),
            (Error::Unsupported { what: "watch" }, Code::Unimplemented),
            (
                Error::Store(store::Error::Unavailable("down".into())),
                Code::Unavailable,
            ),
            (
                Error::Store(store::Error::Storage("/secret/path".into())),
                Code::Internal,
            ),
            (
                Error::Store(store::Error::TooLarge("/secret/path".into())),
                Code::ResourceExhausted,
            ),
            (
                Error::Store(store::Error::Rejected("namespace".into())),
                Code::InvalidArgument,
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
