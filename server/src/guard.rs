//! The checks every RPC makes, in order: who is calling (authn), may they do this on this
//! cluster (authz), may they see this command (ownership vs `readAll`). Every outcome is
//! recorded through `audit`. Services call these as straight-line steps.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::access::authz::{Action, Decision, Denied};
use crate::audit::{self, AuditEvent};
use crate::authn::{Authenticator, Principal};
use crate::config::Config;
use crate::ingress::ConnInfo;
use crate::store::{CommandRecord, Visibility};

/// What a caller may do with a command record they asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read its result or output.
    Read,
    /// Cancel it.
    Cancel,
}

/// Authentication and authorization for the services.
pub struct Guard {
    config: Arc<Config>,
    authn: Authenticator,
}

impl Guard {
    /// A guard over the config's policy and an authenticator.
    pub fn new(config: Arc<Config>, authn: Authenticator) -> Self {
        Self { config, authn }
    }

    /// The configuration this guard enforces.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Identifies the caller, or refuses with UNAUTHENTICATED (audited).
    pub async fn caller<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let conn = req
            .extensions()
            .get::<ConnInfo>()
            .ok_or_else(|| Status::internal("connection details are missing"))?;
        let authorization = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?,
            ),
        };
        match self
            .authn
            .authenticate(conn, conn.auth, authorization)
            .await
        {
            Ok(principal) => {
                tracing::debug!(principal = %principal.id, method = %principal.auth_method, source = %principal.source, "caller identified");
                Ok(principal)
            }
            Err(err) => {
                let reason = err.to_string();
                audit::record(&AuditEvent::AuthenticationFailed {
                    listener: &conn.listener,
                    source: conn.source,
                    reason: &reason,
                });
                Err(Status::unauthenticated(reason))
            }
        }
    }

    /// NOT_FOUND unless the cluster is configured (asked only after authentication, so
    /// the cluster list does not leak to strangers).
    pub fn known_cluster(&self, cluster: &str) -> Result<(), Status> {
        if cluster.is_empty() {
            return Err(Status::invalid_argument("cluster is required"));
        }
        match self.config.cluster(cluster) {
            Some(_) => Ok(()),
            None => Err(Status::not_found(format!(
                "cluster \"{cluster}\" is not configured on this gateway"
            ))),
        }
    }

    fn decide(
        &self,
        who: &Principal,
        action: Action,
        cluster: &str,
        command_id: Option<&str>,
    ) -> Decision {
        let decision = self.config.policy.check(who, action, cluster);
        let (allowed, detail) = match &decision {
            Decision::Allow { assignment, role } => (true, format!("{assignment} ({role})")),
            Decision::Deny(denied) => (false, denied.to_string()),
        };
        audit::record(&AuditEvent::Decision {
            principal: &who.id,
            auth_method: who.auth_method.as_str(),
            source: who.source,
            action: action.as_str(),
            cluster,
            command_id,
            allowed,
            detail: &detail,
        });
        decision
    }

    /// Allows or refuses an action on a cluster (audited).
    pub fn authorize(&self, who: &Principal, action: Action, cluster: &str) -> Result<(), Status> {
        match self.decide(who, action, cluster, None) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny(denied) => Err(denied_status(&denied)),
        }
    }

    /// May `who` read or cancel this record? Someone else's command is NOT_FOUND unless
    /// they may read all results there, so ids of others do not leak.
    pub fn may_use(
        &self,
        who: &Principal,
        record: &CommandRecord,
        use_: Use,
    ) -> Result<(), Status> {
        let id = record.id.as_str();
        let cluster = record.cluster.as_str();
        let not_found = || {
            Status::not_found(format!(
                "command \"{id}\" was not found on cluster \"{cluster}\""
            ))
        };
        let own = record.principal == who.id;
        if !own {
            return match self.decide(who, Action::ReadAllResults, cluster, Some(id)) {
                Decision::Allow { .. } if use_ == Use::Read => Ok(()),
                Decision::Allow { .. } => Err(Status::permission_denied(format!(
                    "principal {} may read but not cancel commands of {}",
                    who.id, record.principal
                ))),
                Decision::Deny(_) => Err(not_found()),
            };
        }
        let wanted: &[Action] = match use_ {
            Use::Read => &[
                Action::RunCommand,
                Action::ReadResults,
                Action::ReadAllResults,
            ],
            Use::Cancel => &[Action::RunCommand],
        };
        let mut last = None;
        for action in wanted {
            match self.decide(who, *action, cluster, Some(id)) {
                Decision::Allow { .. } => return Ok(()),
                Decision::Deny(d) => last = Some(d),
            }
        }
        Err(last.map(|d| denied_status(&d)).unwrap_or_else(not_found))
    }

    /// Which records `who` may list: all of a cluster with `readAll`, their own where they
    /// may run or read. `only` narrows to one cluster.
    pub fn visibility(&self, who: &Principal, only: Option<&str>) -> Vec<Visibility> {
        let mut out = Vec::new();
        for c in &self.config.clusters {
            let name = c.name.as_str();
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let policy = &self.config.policy;
            let allowed = |a| matches!(policy.check(who, a, name), Decision::Allow { .. });
            if allowed(Action::ReadAllResults) {
                out.push(Visibility {
                    cluster: name.to_owned(),
                    principal: None,
                });
            } else if allowed(Action::RunCommand) || allowed(Action::ReadResults) {
                out.push(Visibility {
                    cluster: name.to_owned(),
                    principal: Some(who.id.clone()),
                });
            }
        }
        let detail: Vec<String> = out
            .iter()
            .map(|v| match &v.principal {
                None => format!("{} (all)", v.cluster),
                Some(_) => format!("{} (own)", v.cluster),
            })
            .collect();
        audit::record(&AuditEvent::Decision {
            principal: &who.id,
            auth_method: who.auth_method.as_str(),
            source: who.source,
            action: "commands/list",
            cluster: only.unwrap_or("*"),
            command_id: None,
            allowed: !out.is_empty(),
            detail: &format!("visible: {}", detail.join(", ")),
        });
        out
    }
}

/// The status for a refused authorization: disabled clusters are FAILED_PRECONDITION,
/// like AKS; everything else PERMISSION_DENIED.
fn denied_status(denied: &Denied) -> Status {
    match denied {
        Denied::RunCommandDisabled { .. } => Status::failed_precondition(denied.to_string()),
        Denied::NoAssignment { .. } | Denied::SourceNotAllowed { .. } => {
            Status::permission_denied(denied.to_string())
        }
    }
}
