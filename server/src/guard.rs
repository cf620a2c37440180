//! The checks every RPC makes, in order: who is calling (authn), may they do this on this
//! cluster (authz), may they see this command (ownership vs `readAll`). Every outcome is
//! recorded through `audit`. Services call these as straight-line steps.

use std::sync::Arc;

use tonic::Request;

use crate::access::authz::{Action, Decision, Denied, GrantUse, Policy};
use crate::admission::{RateLimited, RequestRate};
use crate::audit::{Audit, AuditEvent, REFUSAL_LINES_BURST, REFUSAL_LINES_PER_SECOND, Throttle};
use crate::authn::{Authenticator, AuthnError, Principal};
use crate::breakglass::BreakGlass;
use crate::command::ClusterName;
use crate::connection::{ConnInfo, RpcMethod};
use crate::store::{CommandRecord, Visibility};

/// Why the guard refused a call; `status.rs` turns it into a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The request reached a service without the listener's connection details: a
    /// wiring bug, never the caller's fault.
    #[error("connection details are missing")]
    NoConnectionInfo,
    /// The `authorization` metadata is not ASCII.
    #[error("authorization metadata is not ASCII")]
    MetadataNotAscii,
    /// No credential identifies the caller.
    #[error(transparent)]
    Unauthenticated(#[from] AuthnError),
    /// The request names no cluster.
    #[error("cluster is required")]
    ClusterMissing,
    /// The cluster is not configured on this gateway.
    #[error("cluster \"{cluster}\" is not configured on this gateway")]
    ClusterNotFound {
        /// The name asked for.
        cluster: String,
    },
    /// Someone else's command, which the caller may not see: indistinguishable from one
    /// that does not exist, so ids of others do not leak.
    #[error("command \"{id}\" was not found on cluster \"{cluster}\"")]
    CommandNotFound {
        /// The id asked for.
        id: String,
        /// Its cluster.
        cluster: String,
    },
    /// The caller may read another's command but not cancel it.
    #[error("principal {principal} may read but not cancel commands of {owner}")]
    ReadOnly {
        /// The caller.
        principal: String,
        /// Whose command it is.
        owner: String,
    },
    /// Authorization refused the action.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The caller sends requests faster than one principal may.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
}

/// What a caller may do with a command record they asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read its result or output.
    Read,
    /// Cancel it.
    Cancel,
}

/// A cluster as the guard and the services show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// Its name.
    pub name: ClusterName,
    /// Shown by `kinvoke clusters`.
    pub description: String,
    /// Every command refused (AKS's `disableRunCommand`).
    pub disable_run_command: bool,
}

/// What the guard needs of the configuration: the policy, the clusters and the request
/// rate each principal may use.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// Roles, assignments and cluster gates.
    pub policy: Policy,
    /// The configured clusters.
    pub clusters: Vec<ClusterInfo>,
    /// `limits.requests_per_second_per_principal`.
    pub requests_per_second: u32,
    /// `limits.request_burst_per_principal`.
    pub request_burst: u32,
}

/// Authentication and authorization for the services.
pub struct Guard {
    config: GuardSettings,
    rate: RequestRate,
    /// Caps the audit lines of rate refusals per principal.
    refusals: Throttle<String>,
    authn: Authenticator,
    audit: Audit,
    breakglass: Arc<BreakGlass>,
}

impl Guard {
    /// A guard over a policy and an authenticator.
    pub fn new(
        config: GuardSettings,
        authn: Authenticator,
        audit: Audit,
        breakglass: Arc<BreakGlass>,
    ) -> Self {
        Self {
            rate: RequestRate::new(config.requests_per_second, config.request_burst),
            refusals: Throttle::new(REFUSAL_LINES_PER_SECOND, REFUSAL_LINES_BURST),
            config,
            authn,
            audit,
            breakglass,
        }
    }

    /// Break-glass grants.
    pub fn breakglass(&self) -> &BreakGlass {
        &self.breakglass
    }

    /// Like the policy's check, counting the caller's break-glass grants in force.
    pub fn check(&self, who: &Principal, action: Action, cluster: &str) -> Decision {
        let grants = self.breakglass.grants_of(&who.id);
        self.config
            .policy
            .check_with(who, action, cluster, &grants, std::time::SystemTime::now())
    }

    /// The audit log decisions go to.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The policy this guard enforces.
    pub fn policy(&self) -> &Policy {
        &self.config.policy
    }

    /// The configured clusters.
    pub fn clusters(&self) -> &[ClusterInfo] {
        &self.config.clusters
    }

    /// Identifies the caller, or refuses with UNAUTHENTICATED (audited).
    pub async fn caller<T>(&self, req: &Request<T>) -> Result<Principal, AccessError> {
        let conn = req
            .extensions()
            .get::<ConnInfo>()
            .ok_or(AccessError::NoConnectionInfo)?;
        let authorization = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| AccessError::MetadataNotAscii)?),
        };
        match self
            .authn
            .authenticate(conn, conn.auth, authorization)
            .await
        {
            Ok(principal) => {
                tracing::debug!(principal = %principal.id, method = %principal.auth_method, source = %principal.source, "caller identified");
                if let Err(limited) = self.rate.check(&principal.id) {
                    // a principal over its rate can send refused requests as fast as
                    // it likes: their lines are capped too
                    self.audit.record_throttled(
                        &self.refusals,
                        &principal.id,
                        |unrecorded_before| AuditEvent::RequestRefused {
                            listener: conn.listener.to_string(),
                            source: conn.source.to_string(),
                            principal: Some(principal.id.clone()),
                            method: req
                                .extensions()
                                .get::<RpcMethod>()
                                .map(|m| m.0.to_string())
                                .unwrap_or_default(),
                            code: "ResourceExhausted".to_owned(),
                            reason: limited.to_string(),
                            unrecorded_before,
                        },
                    );
                    return Err(limited.into());
                }
                Ok(principal)
            }
            Err(err) => {
                let (method, reason) = err.metric_labels();
                crate::metrics::metrics().authn_failed(method, reason);
                // a stranger can fail as fast as they like: lines capped per address
                let key = format!("source {}", conn.source.ip());
                self.audit
                    .record_throttled(&self.refusals, &key, |unrecorded_before| {
                        AuditEvent::AuthenticationFailed {
                            listener: conn.listener.to_string(),
                            source: conn.source.to_string(),
                            reason: err.to_string(),
                            unrecorded_before,
                        }
                    });
                Err(err.into())
            }
        }
    }

    /// NOT_FOUND unless the cluster is configured (asked only after authentication, so
    /// the cluster list does not leak to strangers).
    pub fn known_cluster(
        &self,
        who: &Principal,
        action: &str,
        cluster: &str,
    ) -> Result<(), AccessError> {
        let refusal = if cluster.is_empty() {
            AccessError::ClusterMissing
        } else if self
            .config
            .clusters
            .iter()
            .any(|c| c.name.as_str() == cluster)
        {
            return Ok(());
        } else {
            AccessError::ClusterNotFound {
                cluster: cluster.to_owned(),
            }
        };
        self.record_decision(who, action, cluster, None, false, refusal.to_string());
        Err(refusal)
    }

    fn decide(
        &self,
        who: &Principal,
        action: Action,
        cluster: &str,
        command_id: Option<&str>,
    ) -> Decision {
        let decision = self.check(who, action, cluster);
        let (allowed, detail) = match &decision {
            Decision::Allow {
                assignment,
                role,
                grant: None,
            } => (true, format!("{assignment} ({role})")),
            Decision::Allow {
                assignment,
                role,
                grant: Some(g),
            } => (
                true,
                format!(
                    "{assignment} ({role}) via break-glass grant {}: {}",
                    g.id, g.justification
                ),
            ),
            Decision::Deny(denied) => (false, denied.to_string()),
        };
        self.record_decision(who, action.as_str(), cluster, command_id, allowed, detail);
        decision
    }

    /// Allows (naming the break-glass grant used, if any) or refuses an action on a
    /// cluster (audited).
    pub fn authorize(
        &self,
        who: &Principal,
        action: Action,
        cluster: &str,
    ) -> Result<Option<GrantUse>, AccessError> {
        match self.decide(who, action, cluster, None) {
            Decision::Allow { grant, .. } => Ok(grant),
            Decision::Deny(denied) => Err(denied.into()),
        }
    }

    /// May `who` read or cancel this record? Someone else's command is NOT_FOUND unless
    /// they may read all results there, so ids of others do not leak.
    pub fn may_use(
        &self,
        who: &Principal,
        record: &CommandRecord,
        use_: Use,
    ) -> Result<(), AccessError> {
        let id = record.id.as_str();
        let cluster = record.cluster.as_str();
        let not_found = || AccessError::CommandNotFound {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
        };
        let own = record.principal == who.id;
        if !own {
            return match self.decide(who, Action::ReadAllResults, cluster, Some(id)) {
                Decision::Allow { .. } if use_ == Use::Read => Ok(()),
                Decision::Allow { .. } => Err(AccessError::ReadOnly {
                    principal: who.id.clone(),
                    owner: record.principal.clone(),
                }),
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
        Err(last.map(AccessError::Denied).unwrap_or_else(not_found))
    }

    /// Which records `who` may list: all of a cluster with `readAll`, their own where they
    /// may run or read. `only` narrows to one cluster.
    pub fn visibility(&self, who: &Principal, only: Option<&str>) -> Vec<Visibility> {
        let mut out = Vec::new();
        // the caller's grants and the time once, for every cluster and action
        let grants = self.breakglass.grants_of(&who.id);
        let now = std::time::SystemTime::now();
        for c in &self.config.clusters {
            let name = c.name.as_str();
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let allowed = |a| {
                matches!(
                    self.config.policy.check_with(who, a, name, &grants, now),
                    Decision::Allow { .. }
                )
            };
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
        self.record_decision(
            who,
            "commands/list",
            only.unwrap_or("*"),
            None,
            !out.is_empty(),
            format!("visible: {}", detail.join(", ")),
        );
        out
    }

    fn record_decision(
        &self,
        who: &Principal,
        action: &str,
        cluster: &str,
        command_id: Option<&str>,
        allowed: bool,
        detail: String,
    ) {
        if !allowed {
            crate::metrics::metrics().authz_denied(action);
        }
        self.audit.record(AuditEvent::Authorization {
            principal: who.id.clone(),
            auth_method: who.auth_method.as_str().to_owned(),
            source: who.source.to_string(),
            action: action.to_owned(),
            cluster: cluster.to_owned(),
            command_id: command_id.map(str::to_owned),
            decision: if allowed { "allow" } else { "deny" },
            detail,
        });
    }
}
