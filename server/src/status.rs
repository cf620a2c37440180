//! The one place domain errors become gRPC statuses. Callers get a message they can act
//! on; internal detail goes to the log only ([`internal`], the one rescue for whatever
//! was not expected).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::admission::{CONCURRENCY_RETRY, RateLimited};

use crate::access::authz::Denied;
use crate::authn::AuthnError;
use crate::breakglass::BreakGlassError;
use crate::command::InvalidRequest;
use crate::guard::AccessError;
use crate::runner::RunError;

/// What the caller is told of an error that is the gateway's, not theirs: the detail is
/// logged with `context`, the caller learns where to look.
pub fn internal(context: &str, detail: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %detail, "{context}");
    Status::internal("internal error in the gateway; its log has the details")
}

/// `RESOURCE_EXHAUSTED` with `message` and a `google.rpc.RetryInfo` detail saying how
/// long to wait before trying again (the gRPC richer error model; `tonic-types` reads it
/// back).
pub fn retry_later(message: String, after: Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(after)),
    )
}

impl From<RateLimited> for Status {
    fn from(err: RateLimited) -> Self {
        // whole milliseconds, at least one: a zero delay would invite a busy loop
        let after = err.retry_after.max(Duration::from_millis(1));
        retry_later(err.to_string(), after)
    }
}

impl From<AccessError> for Status {
    fn from(err: AccessError) -> Self {
        let code = match &err {
            AccessError::NoConnectionInfo => return internal("guard", &err),
            AccessError::RateLimited(limited) => return limited.clone().into(),
            AccessError::MetadataNotAscii | AccessError::Unauthenticated(_) => {
                Code::Unauthenticated
            }
            AccessError::ClusterMissing => Code::InvalidArgument,
            AccessError::ClusterNotFound { .. } | AccessError::CommandNotFound { .. } => {
                Code::NotFound
            }
            AccessError::ReadOnly { .. } => Code::PermissionDenied,
            // a disabled cluster is a precondition of the cluster, like AKS's
            AccessError::Denied(Denied::RunCommandDisabled { .. }) => Code::FailedPrecondition,
            AccessError::Denied(Denied::NoAssignment { .. } | Denied::SourceNotAllowed { .. }) => {
                Code::PermissionDenied
            }
        };
        Status::new(code, err.to_string())
    }
}

impl From<InvalidRequest> for Status {
    fn from(err: InvalidRequest) -> Self {
        let code = if err.is_over_limit() {
            Code::ResourceExhausted
        } else {
            Code::InvalidArgument
        };
        Status::new(code, err.to_string())
    }
}

impl From<BreakGlassError> for Status {
    fn from(err: BreakGlassError) -> Self {
        let code = match &err {
            BreakGlassError::NotEligible { .. }
            | BreakGlassError::SelfApproval(_)
            | BreakGlassError::NotAllowed { .. } => Code::PermissionDenied,
            BreakGlassError::Invalid(_) => Code::InvalidArgument,
            BreakGlassError::NotFound(_) => Code::NotFound,
            BreakGlassError::WrongState { .. } => Code::FailedPrecondition,
            BreakGlassError::Audit(_) => Code::Unavailable,
            BreakGlassError::Store(_) | BreakGlassError::Random(_) => {
                return internal("break-glass", &err);
            }
        };
        Status::new(code, err.to_string())
    }
}

impl From<AuthnError> for Status {
    fn from(err: AuthnError) -> Self {
        Status::unauthenticated(err.to_string())
    }
}

impl From<RunError> for Status {
    fn from(err: RunError) -> Self {
        let err = match err {
            RunError::Invalid(invalid) => return invalid.into(),
            other => other,
        };
        let code = match &err {
            RunError::Invalid(_) => Code::InvalidArgument,
            RunError::ClusterNotFound { .. } | RunError::CommandNotFound { .. } => Code::NotFound,
            RunError::TooManyCommands { .. } | RunError::TooManyCommandsForPrincipal { .. } => {
                return retry_later(err.to_string(), CONCURRENCY_RETRY);
            }
            RunError::ShuttingDown | RunError::AuditUnavailable | RunError::StoreUnavailable => {
                Code::Unavailable
            }
            // the caller, as this cluster maps them, cannot be impersonated as they are:
            // running anyway would act as someone else (or as the gateway)
            RunError::NoKubeIdentity { .. } => Code::PermissionDenied,
            RunError::Store(_) | RunError::Random(_) | RunError::Relay(_) => {
                return internal("runner", &err);
            }
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::InvalidRequest;

    #[test]
    fn codes_follow_the_kind_of_error() {
        let cases: Vec<(RunError, Code)> = vec![
            (
                RunError::Invalid(InvalidRequest::Missing { field: "command" }),
                Code::InvalidArgument,
            ),
            (
                RunError::Invalid(InvalidRequest::OverLimit {
                    what: "x",
                    limit: "limits.x",
                    max: "1".into(),
                    got: "2".into(),
                }),
                Code::ResourceExhausted,
            ),
            (
                RunError::ClusterNotFound {
                    cluster: "c".into(),
                },
                Code::NotFound,
            ),
            (
                RunError::TooManyCommands { limit: 1 },
                Code::ResourceExhausted,
            ),
            (
                RunError::TooManyCommandsForPrincipal {
                    principal: "p".into(),
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (RunError::ShuttingDown, Code::Unavailable),
            (
                RunError::NoKubeIdentity {
                    cluster: "c".into(),
                    source: Box::new(crate::relay::IdentityError::EmptyUser {
                        from: "claim \"nick\"".into(),
                        template: "{claim:nick}".into(),
                    }),
                },
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn access_refusals_get_the_code_of_their_kind() {
        let denied = |d: Denied| AccessError::Denied(d);
        let cases: Vec<(AccessError, Code, &str)> = vec![
            (
                AccessError::MetadataNotAscii,
                Code::Unauthenticated,
                "not ASCII",
            ),
            (
                AccessError::ClusterMissing,
                Code::InvalidArgument,
                "cluster is required",
            ),
            (
                AccessError::ClusterNotFound {
                    cluster: "x".into(),
                },
                Code::NotFound,
                "cluster \"x\" is not configured",
            ),
            (
                AccessError::CommandNotFound {
                    id: "i".into(),
                    cluster: "c".into(),
                },
                Code::NotFound,
                "command \"i\" was not found on cluster \"c\"",
            ),
            (
                AccessError::ReadOnly {
                    principal: "carol".into(),
                    owner: "alice".into(),
                },
                Code::PermissionDenied,
                "may read but not cancel",
            ),
            (
                denied(Denied::RunCommandDisabled {
                    cluster: "c".into(),
                }),
                Code::FailedPrecondition,
                "run command is disabled",
            ),
            (
                denied(Denied::SourceNotAllowed {
                    cluster: "c".into(),
                    address: "192.0.2.1".parse().unwrap(),
                }),
                Code::PermissionDenied,
                "192.0.2.1",
            ),
        ];
        for (err, code, message) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(message), "{status:?}");
        }
        // a wiring bug is the gateway's: the caller is told where to look, nothing more
        let status = Status::from(AccessError::NoConnectionInfo);
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("its log has the details"));
    }

    #[test]
    fn invalid_requests_are_invalid_argument_or_resource_exhausted() {
        let status = Status::from(InvalidRequest::Missing { field: "duration" });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "duration is required");
    }

    #[test]
    fn internal_errors_do_not_leak_detail() {
        let err = RunError::Store(crate::store::StoreError::Corrupt("secret detail".into()));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }
}
