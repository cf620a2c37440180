//! `kinvoke.v1.AccessService`: the caller's identity and effective permissions.

use std::sync::Arc;

use kinvoke_proto::v1 as pb;
use kinvoke_proto::v1::access_service_server::AccessService;
use tonic::{Request, Response, Status};

use super::wire;
use crate::command::InvalidRequest;

use crate::access::authz::{Action, Decision};
use crate::authn::Principal;
use crate::guard::Guard;

/// `kinvoke.v1.AccessService`.
pub struct AccessApi {
    guard: Arc<Guard>,
}

impl AccessApi {
    /// The service over a guard.
    pub fn new(guard: Arc<Guard>) -> Self {
        Self { guard }
    }

    /// Clusters the caller holds any assignment on, with what they may do now.
    fn clusters_of(&self, who: &Principal) -> Vec<pb::ClusterAccess> {
        let policy = self.guard.policy();
        let grants = self.guard.breakglass().grants_of(&who.id);
        let now = std::time::SystemTime::now();
        self.guard
            .clusters()
            .iter()
            .filter(|c| policy.holds_any(who, c.name.as_str()))
            .map(|c| {
                let actions = policy.effective_actions(who, c.name.as_str(), &grants, now);
                let grant_ids = grants
                    .iter()
                    .filter(|g| g.cluster == c.name.as_str() && g.in_force(now))
                    .map(|g| g.id.clone())
                    .collect();
                // what stops this caller running commands here, whatever their roles
                let restriction = policy
                    .gate_refusal(c.name.as_str(), Action::RunCommand, who.source)
                    .map(|denied| denied.to_string())
                    .unwrap_or_default();
                pb::ClusterAccess {
                    cluster: c.name.to_string(),
                    actions: actions
                        .iter()
                        .map(|a: &Action| a.as_str().to_owned())
                        .collect(),
                    run_command_enabled: !c.disable_run_command,
                    restriction,
                    grant_ids,
                    description: c.description.clone(),
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = self.guard.caller(&request).await?;
        let clusters = self.clusters_of(&who);
        Ok(Response::new(pb::WhoAmIResponse {
            issuer: match who.auth_method {
                crate::authn::AuthMethod::Oidc => who.subject.clone(),
                _ => String::new(),
            },
            principal: who.id,
            groups: who.groups,
            auth_method: who.auth_method.as_str().to_owned(),
            source_address: who.source.to_string(),
            listener: who.listener,
            clusters,
            gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let who = self.guard.caller(&request).await?;
        Ok(Response::new(pb::ListClustersResponse {
            clusters: self.clusters_of(&who),
        }))
    }

    async fn activate_break_glass(
        &self,
        request: Request<pb::ActivateBreakGlassRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let who = self.guard.caller(&request).await?;
        let req = request.into_inner();
        self.guard
            .known_cluster(&who, "breakglass/activate", &req.cluster)?;
        let duration = req
            .duration
            .map(std::time::Duration::try_from)
            .transpose()
            .map_err(|_| InvalidRequest::Malformed {
                field: "duration",
                message: "must be a positive duration".to_owned(),
            })?
            .ok_or(InvalidRequest::Missing { field: "duration" })?;
        let grant = self
            .guard
            .breakglass()
            .activate(&who, &req.cluster, &req.role, &req.justification, duration)
            .await?;
        Ok(Response::new(wire::grant(grant)))
    }

    async fn approve_break_glass(
        &self,
        request: Request<pb::ApproveBreakGlassRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let who = self.guard.caller(&request).await?;
        let req = request.into_inner();
        let grant = self.guard.breakglass().approve(&who, &req.grant_id).await?;
        Ok(Response::new(wire::grant(grant)))
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let who = self.guard.caller(&request).await?;
        let req = request.into_inner();
        let only = (!req.cluster.is_empty()).then_some(req.cluster.as_str());
        if let Some(cluster) = only {
            self.guard.known_cluster(&who, "breakglass/list", cluster)?;
        }
        let grants = self
            .guard
            .breakglass()
            .list(&who, only, req.include_inactive, |cluster| {
                matches!(
                    self.guard.check(&who, Action::ReadAllResults, cluster),
                    Decision::Allow { .. }
                )
            });
        Ok(Response::new(pb::ListGrantsResponse {
            grants: grants.into_iter().map(wire::grant).collect(),
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<pb::RevokeGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let who = self.guard.caller(&request).await?;
        let req = request.into_inner();
        let grant = self.guard.breakglass().revoke(&who, &req.grant_id).await?;
        Ok(Response::new(wire::grant(grant)))
    }
}
