//! The one place domain errors become gRPC statuses. Callers get a message they can act
//! on; internal detail goes to the log only.

use tonic::{Code, Status};

use crate::authn::AuthnError;
use crate::runner::RunError;

impl From<AuthnError> for Status {
    fn from(err: AuthnError) -> Self {
        Status::unauthenticated(err.to_string())
    }
}

impl From<RunError> for Status {
    fn from(err: RunError) -> Self {
        let code = match &err {
            RunError::Invalid(invalid) if invalid.is_over_limit() => Code::ResourceExhausted,
            RunError::Invalid(_) => Code::InvalidArgument,
            RunError::ClusterNotFound { .. } | RunError::CommandNotFound { .. } => Code::NotFound,
            RunError::TooManyCommands { .. } => Code::ResourceExhausted,
            RunError::ShuttingDown | RunError::AuditUnavailable => Code::Unavailable,
            // the caller, as this cluster maps them, cannot be impersonated as they are:
            // running anyway would act as someone else (or as the gateway)
            RunError::NoKubeIdentity { .. } => Code::PermissionDenied,
            RunError::Store(_) | RunError::Random(_) | RunError::Relay(_) => {
                tracing::error!(error = %err, "internal error");
                return Status::internal("internal error in the gateway; its log has the details");
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
            (RunError::ShuttingDown, Code::Unavailable),
            (
                RunError::NoKubeIdentity {
                    cluster: "c".into(),
                    source: crate::relay::IdentityError::EmptyUser {
                        from: "claim \"nick\"".into(),
                        template: "{claim:nick}".into(),
                    },
                },
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn internal_errors_do_not_leak_detail() {
        let err = RunError::Store(crate::store::StoreError::Corrupt("secret detail".into()));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }
}
