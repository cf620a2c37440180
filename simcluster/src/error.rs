//! Every way a simulated API request fails, and the one place that turns a failure into a
//! Kubernetes `Status` object (which is what makes kubectl print
//! `Error from server (NotFound): pods "x" not found`).

use http::StatusCode;
use serde_json::{Map, Value, json};

/// A failed API request, named after what happened.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ApiError {
    /// The named object does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// plural resource name, e.g. `pods`
        resource: String,
        /// API group, `""` for core
        group: String,
        /// object name
        name: String,
    },
    /// The URL names no served resource or endpoint.
    #[error("the server could not find the requested resource")]
    UnknownPath,
    /// Create of a name that is taken.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// plural resource name
        resource: String,
        /// API group
        group: String,
        /// object name
        name: String,
    },
    /// An update whose resourceVersion precondition no longer holds.
    #[error(
        "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict {
        /// plural resource name
        resource: String,
        /// API group
        group: String,
        /// object name
        name: String,
    },
    /// The caller is authenticated but not allowed (the message is kube-apiserver's wording).
    #[error("{message}")]
    Forbidden {
        /// full message, e.g. `pods is forbidden: User "alice" cannot list ...`
        message: String,
        /// plural resource name (or `users` for impersonation)
        resource: String,
        /// API group
        group: String,
        /// object name, if the request named one
        name: Option<String>,
    },
    /// No valid bearer token.
    #[error("Unauthorized")]
    Unauthorized,
    /// The resource does not support this verb.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// A malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// An object that fails validation.
    #[error("{kind} \"{name}\" is invalid: {detail}")]
    Invalid {
        /// object kind, e.g. `ConfigMap`
        kind: String,
        /// plural resource name
        resource: String,
        /// API group
        group: String,
        /// object name
        name: String,
        /// `field: reason`
        detail: String,
    },
    /// A body media type the simulation cannot read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A watch resourceVersion older than the kept history.
    #[error("too old resource version: {requested} ({oldest})")]
    Expired {
        /// the resourceVersion asked for
        requested: u64,
        /// the oldest resourceVersion still in the history
        oldest: u64,
    },
    /// A request body larger than the simulation accepts.
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// the limit in bytes
        limit: usize,
    },
    /// exec, attach, port-forward: connection upgrades are not simulated.
    #[error("{0} is not supported by the simulated cluster")]
    UpgradeNotSupported(String),
}

impl ApiError {
    /// The HTTP status and the `Status` body for this error.
    pub(crate) fn to_status(&self) -> (StatusCode, Value) {
        let (code, reason) = match self {
            Self::NotFound { .. } | Self::UnknownPath => (StatusCode::NOT_FOUND, "NotFound"),
            Self::AlreadyExists { .. } => (StatusCode::CONFLICT, "AlreadyExists"),
            Self::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
            Self::Forbidden { .. } => (StatusCode::FORBIDDEN, "Forbidden"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            Self::BadRequest(_) | Self::UpgradeNotSupported(_) => {
                (StatusCode::BAD_REQUEST, "BadRequest")
            }
            Self::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
            }
            Self::Expired { .. } => (StatusCode::GONE, "Expired"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
        };
        let details = match self {
            Self::NotFound {
                resource,
                group,
                name,
            }
            | Self::AlreadyExists {
                resource,
                group,
                name,
            }
            | Self::Conflict {
                resource,
                group,
                name,
            }
            | Self::Invalid {
                resource,
                group,
                name,
                ..
            } => Some(details(Some(name), group, resource)),
            Self::Forbidden {
                resource,
                group,
                name,
                ..
            } => Some(details(name.as_ref(), group, resource)),
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": reason,
            "code": code.as_u16(),
        });
        if let (Some(d), Some(obj)) = (details, status.as_object_mut()) {
            obj.insert("details".into(), d);
        }
        (code, status)
    }
}

fn details(name: Option<&String>, group: &str, resource: &str) -> Value {
    let mut d = Map::new();
    if let Some(n) = name {
        d.insert("name".into(), Value::String(n.clone()));
    }
    if !group.is_empty() {
        d.insert("group".into(), Value::String(group.to_string()));
    }
    d.insert("kind".into(), Value::String(resource.to_string()));
    Value::Object(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_reads_like_kube_apiserver() {
        let (code, body) = ApiError::NotFound {
            resource: "pods".into(),
            group: String::new(),
            name: "x".into(),
        }
        .to_status();
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["status"], "Failure");
        assert_eq!(body["reason"], "NotFound");
        assert_eq!(body["message"], "pods \"x\" not found");
        assert_eq!(body["details"]["name"], "x");
        assert_eq!(body["details"]["kind"], "pods");
        assert_eq!(body["code"], 404);
    }

    #[test]
    fn unauthorized_has_no_details() {
        let (code, body) = ApiError::Unauthorized.to_status();
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert_eq!(body["reason"], "Unauthorized");
        assert!(body.get("details").is_none());
    }
}
