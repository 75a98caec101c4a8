//! How API calls fail: one gRPC status code plus a `google.rpc.ErrorInfo`
//! (domain [`DOMAIN`]) whose `reason` is stable. Clients match on the reason,
//! never on the message. This table is the one place they are listed:
//!
//! | reason | code | when |
//! |---|---|---|
//! | `UNAUTHENTICATED` | UNAUTHENTICATED | no `authorization: Bearer` metadata, unknown, malformed or expired token |
//! | `PERMISSION_DENIED` | PERMISSION_DENIED | the caller's role does not allow the call on that project or cluster resource |
//! | `INVALID_ARGUMENT` | INVALID_ARGUMENT | a name, id, field or page token that can never be accepted |
//! | `REQUEST_ID_REUSED` | INVALID_ARGUMENT | a `request_id` already used for a different request |
//! | `NOT_FOUND` | NOT_FOUND | the resource (or one the request names: flavor, image, group) does not exist; metadata `resource` |
//! | `ALREADY_EXISTS` | ALREADY_EXISTS | a resource with that name exists; metadata `resource` |
//! | `QUOTA_EXCEEDED` | RESOURCE_EXHAUSTED | the project's quota does not allow it; metadata `project` |
//! | `NO_VALID_HOST` | RESOURCE_EXHAUSTED | no node can take the instance; the message carries the scheduler's reasons |
//! | `FAILED_PRECONDITION` | FAILED_PRECONDITION | the resource's state does not allow the call (e.g. start a running instance) |
//! | `CONFLICT` | ABORTED | a concurrent change won a compare-and-set; re-read and retry |
//! | `NOT_LEADER` | UNAVAILABLE | no raft leader is reachable from this controller (election, partition); retry, maybe on another controller |
//! | `COMMIT_UNKNOWN` | DEADLINE_EXCEEDED | the write was submitted but not seen applied in time; retry only with the same `request_id` |
//! | `CONTROLLER_STOPPED` | UNAVAILABLE | this controller is shutting down or failed; use another |
//! | `NODE_UNAVAILABLE` | UNAVAILABLE | the compute node holding the instance does not answer (console, console log); retry later |
//! | `NOT_IMPLEMENTED` | UNIMPLEMENTED | the call exists in the API but this release does not serve it yet |
//! | `INTERNAL` | INTERNAL | a bug: the state machine answered something unexpected |

use std::collections::HashMap;

use nephele_state::ApplyError;
use thiserror::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::{ProposeError, ReadError};

/// The `ErrorInfo.domain` of every error the API returns.
pub const DOMAIN: &str = "nephele.dev";

/// Every stable reason, for tests and documentation.
pub const REASONS: &[&str] = &[
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "INVALID_ARGUMENT",
    "REQUEST_ID_REUSED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "QUOTA_EXCEEDED",
    "NO_VALID_HOST",
    "FAILED_PRECONDITION",
    "CONFLICT",
    "NOT_LEADER",
    "COMMIT_UNKNOWN",
    "CONTROLLER_STOPPED",
    "NODE_UNAVAILABLE",
    "NOT_IMPLEMENTED",
    "STORAGE_FULL",
    "IMAGE_CONTENT_ELSEWHERE",
    "INTERNAL",
];

/// Why an API call failed. Converted to a [`Status`] at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApiError {
    /// No usable credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do that.
    #[error("{0}")]
    PermissionDenied(String),
    /// A field can never be accepted.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request id was used for another request.
    #[error("{0}")]
    RequestIdReused(String),
    /// A resource does not exist.
    #[error("{resource} does not exist")]
    NotFound {
        /// Its name.
        resource: String,
    },
    /// A resource exists already.
    #[error("{resource} already exists")]
    AlreadyExists {
        /// Its name.
        resource: String,
    },
    /// Quota.
    #[error("{message}")]
    QuotaExceeded {
        /// The project.
        project: String,
        /// What limit, for people.
        message: String,
    },
    /// No node fits.
    #[error("{0}")]
    NoValidHost(String),
    /// The state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A compare-and-set lost.
    #[error("{0}")]
    Conflict(String),
    /// No leader reachable.
    #[error("{0}")]
    NotLeader(String),
    /// Outcome unknown.
    #[error("{0}")]
    CommitUnknown(String),
    /// This controller stopped.
    #[error("{0}")]
    ControllerStopped(String),
    /// The compute node that holds the instance does not answer.
    #[error("{0}")]
    NodeUnavailable(String),
    /// Not served yet.
    #[error("{0}")]
    NotImplemented(String),
    /// The controller's disk cannot take it.
    #[error("{0}")]
    StorageFull(String),
    /// This controller does not hold the content asked for; another one
    /// does.
    #[error("{0}")]
    ContentElsewhere(String),
    /// A bug.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::PermissionDenied(_) => "PERMISSION_DENIED",
            ApiError::InvalidArgument(_) => "INVALID_ARGUMENT",
            ApiError::RequestIdReused(_) => "REQUEST_ID_REUSED",
            ApiError::NotFound { .. } => "NOT_FOUND",
            ApiError::AlreadyExists { .. } => "ALREADY_EXISTS",
            ApiError::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            ApiError::NoValidHost(_) => "NO_VALID_HOST",
            ApiError::FailedPrecondition(_) => "FAILED_PRECONDITION",
            ApiError::Conflict(_) => "CONFLICT",
            ApiError::NotLeader(_) => "NOT_LEADER",
            ApiError::CommitUnknown(_) => "COMMIT_UNKNOWN",
            ApiError::ControllerStopped(_) => "CONTROLLER_STOPPED",
            ApiError::NodeUnavailable(_) => "NODE_UNAVAILABLE",
            ApiError::NotImplemented(_) => "NOT_IMPLEMENTED",
            ApiError::StorageFull(_) => "STORAGE_FULL",
            ApiError::ContentElsewhere(_) => "IMAGE_CONTENT_ELSEWHERE",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::InvalidArgument(_) | ApiError::RequestIdReused(_) => Code::InvalidArgument,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::QuotaExceeded { .. }
            | ApiError::NoValidHost(_)
            | ApiError::StorageFull(_) => Code::ResourceExhausted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Conflict(_) => Code::Aborted,
            ApiError::NotLeader(_)
            | ApiError::ControllerStopped(_)
            | ApiError::NodeUnavailable(_)
            | ApiError::ContentElsewhere(_) => Code::Unavailable,
            ApiError::CommitUnknown(_) => Code::DeadlineExceeded,
            ApiError::NotImplemented(_) => Code::Unimplemented,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// Shorthand for a missing resource.
    pub fn not_found(resource: impl Into<String>) -> Self {
        ApiError::NotFound {
            resource: resource.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let mut metadata = HashMap::new();
        match &e {
            ApiError::NotFound { resource } | ApiError::AlreadyExists { resource } => {
                metadata.insert("resource".to_owned(), resource.clone());
            }
            ApiError::QuotaExceeded { project, .. } => {
                metadata.insert("project".to_owned(), project.clone());
            }
            _ => {}
        }
        Status::with_error_details(
            e.code(),
            e.to_string(),
            ErrorDetails::with_error_info(e.reason(), DOMAIN, metadata),
        )
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        let message = e.to_string();
        match e {
            ApplyError::InvalidName(_) | ApplyError::InvalidArgument(_) => {
                ApiError::InvalidArgument(message)
            }
            ApplyError::NotFound { name } => ApiError::NotFound { resource: name },
            ApplyError::AlreadyExists { name } => ApiError::AlreadyExists { resource: name },
            ApplyError::QuotaExceeded { project, .. } => {
                ApiError::QuotaExceeded { project, message }
            }
            ApplyError::InvalidTransition { .. } | ApplyError::FailedPrecondition { .. } => {
                ApiError::FailedPrecondition(message)
            }
            ApplyError::VersionMismatch { .. } => ApiError::Conflict(message),
            ApplyError::RequestIdReused { .. } => ApiError::RequestIdReused(message),
            ApplyError::Fenced { .. } => ApiError::NotLeader(message),
        }
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        let message = e.to_string();
        match e {
            ProposeError::NoLeader | ProposeError::Dropped => {
                ApiError::NotLeader(format!("{message}; retry"))
            }
            ProposeError::Timeout => ApiError::CommitUnknown(format!(
                "{message}; retry with the same request id to learn the outcome"
            )),
            ProposeError::TooLarge { .. } => ApiError::InvalidArgument(message),
            ProposeError::Stopped(_) => ApiError::ControllerStopped(message),
            ProposeError::Overloaded { .. } => ApiError::NotLeader(format!("{message}; retry")),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let message = e.to_string();
        match e {
            ReadError::Timeout => ApiError::NotLeader(format!("{message}; retry")),
            ReadError::Stopped(_) => ApiError::ControllerStopped(message),
        }
    }
}

impl From<nephele_state::names::NameError> for ApiError {
    fn from(e: nephele_state::names::NameError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_carries_its_reason_in_error_info() {
        let all = [
            ApiError::Unauthenticated(String::new()),
            ApiError::PermissionDenied(String::new()),
            ApiError::InvalidArgument(String::new()),
            ApiError::RequestIdReused(String::new()),
            ApiError::not_found("x"),
            ApiError::AlreadyExists {
                resource: "x".into(),
            },
            ApiError::QuotaExceeded {
                project: "projects/p".into(),
                message: String::new(),
            },
            ApiError::NoValidHost(String::new()),
            ApiError::FailedPrecondition(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::NotLeader(String::new()),
            ApiError::CommitUnknown(String::new()),
            ApiError::ControllerStopped(String::new()),
            ApiError::NodeUnavailable(String::new()),
            ApiError::NotImplemented(String::new()),
            ApiError::StorageFull(String::new()),
            ApiError::ContentElsewhere(String::new()),
            ApiError::Internal(String::new()),
        ];
        assert_eq!(all.len(), REASONS.len());
        for (e, reason) in all.into_iter().zip(REASONS) {
            let code = e.code();
            let status = Status::from(e);
            assert_eq!(status.code(), code);
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, *reason);
            assert_eq!(info.domain, DOMAIN);
        }
    }

    #[test]
    fn state_machine_errors_map_to_reasons() {
        let e: ApiError = ApplyError::QuotaExceeded {
            project: "projects/p1".into(),
            detail: "at most 2 instances".into(),
        }
        .into();
        assert_eq!(e.reason(), "QUOTA_EXCEEDED");
        let info = Status::from(e).get_details_error_info().unwrap();
        assert_eq!(info.metadata["project"], "projects/p1");
        let e: ApiError = ProposeError::Timeout.into();
        assert_eq!(e.code(), Code::DeadlineExceeded);
    }
}
