//! `kinvoke.v1.AccessService`: the caller's identity and effective permissions.

use std::sync::Arc;

use kinvoke_proto::v1 as pb;
use kinvoke_proto::v1::access_service_server::AccessService;
use tonic::{Request, Response, Status};

use crate::access::authz::Action;
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
        let config = self.guard.config();
        let policy = &config.policy;
        config
            .clusters
            .iter()
            .filter(|c| policy.holds_any(who, c.name.as_str()))
            .map(|c| {
                let actions = policy.effective_actions(who, c.name.as_str());
                let restriction = if !c.authorized_ip_ranges.is_empty()
                    && !c.authorized_ip_ranges.contains(who.source)
                {
                    format!(
                        "source address {} is not in the cluster's authorized IP ranges",
                        who.source
                    )
                } else if c.disable_run_command {
                    "run command is disabled on this cluster".to_owned()
                } else {
                    String::new()
                };
                pb::ClusterAccess {
                    cluster: c.name.to_string(),
                    actions: actions
                        .iter()
                        .map(|a: &Action| a.as_str().to_owned())
                        .collect(),
                    run_command_enabled: !c.disable_run_command,
                    restriction,
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
}
