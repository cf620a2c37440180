//! kube-rs (the client the gateway's pod executor uses) against the simulated cluster:
//! JSON only, no Accept header, typed objects.

#![allow(
    clippy::expect_used,
    reason = "test support: a failed setup must fail the test loudly"
)]

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kinvoke_simcluster::{SimCluster, SimOptions};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

async fn kube_client(sim: &SimCluster, impersonate: Option<&str>) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::from_yaml(&sim.admin_kubeconfig()).expect("kubeconfig parses");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig resolves");
    if let Some(user) = impersonate {
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(vec!["devs".into(), "devs".into()]);
    }
    kube::Client::try_from(config).expect("client builds")
}

#[tokio::test]
async fn kube_rs_lists_creates_patches_and_reviews() {
    let sim = SimCluster::start(SimOptions::default())
        .await
        .expect("sim starts");
    let client = kube_client(&sim, None).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let list = pods.list(&ListParams::default()).await.expect("list pods");
    assert_eq!(list.items.len(), 2);
    let named = pods
        .list(&ListParams::default().fields(&format!(
            "metadata.name={}",
            list.items[0].metadata.name.clone().unwrap_or_default()
        )))
        .await
        .expect("list by field selector");
    assert_eq!(named.items.len(), 1);

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("from-kube".into());
    cm.data = Some([("k".to_string(), "v".to_string())].into());
    let created = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let rv = created
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let patched = cms
        .patch(
            "from-kube",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"k": "w"}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(
        patched
            .data
            .unwrap_or_default()
            .get("k")
            .map(String::as_str),
        Some("w")
    );
    assert_ne!(patched.metadata.resource_version.unwrap_or_default(), rv);
    let missing = cms.get("nope").await;
    match missing {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    let as_alice = kube_client(&sim, Some("alice")).await;
    let reviews: Api<SelfSubjectReview> = Api::all(as_alice);
    let review = reviews
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("self subject review");
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(user.username.as_deref(), Some("alice"));
    assert_eq!(
        user.groups.unwrap_or_default(),
        vec!["devs".to_string(), "system:authenticated".to_string()]
    );
    sim.shutdown().await;
}

/// A client on the admin credentials with these impersonation settings.
async fn impersonating(sim: &SimCluster, user: Option<&str>, groups: &[&str]) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::from_yaml(&sim.admin_kubeconfig()).expect("kubeconfig parses");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig resolves");
    config.auth_info.impersonate = user.map(str::to_string);
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    kube::Client::try_from(config).expect("client builds")
}

#[tokio::test]
async fn groups_without_a_user_get_kube_apiservers_bad_request() {
    let sim = SimCluster::start(SimOptions::default())
        .await
        .expect("sim starts");
    let client = impersonating(&sim, None, &["devs", "ops"]).await;
    let pods: Api<Pod> = Api::namespaced(client, "demo");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 400, "{status:?}");
            assert_eq!(status.reason, "BadRequest", "{status:?}");
            assert_eq!(
                status.message,
                "requested [{Group  devs    } {Group  ops    }] without impersonating a user"
            );
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    let recorded = sim.requests();
    let last = recorded.last().expect("the request was recorded");
    assert_eq!(last.status, 400);
    assert_eq!(last.user, None, "{last:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_utf8_user_name_is_impersonated_as_sent() {
    let sim = SimCluster::start(SimOptions::default())
        .await
        .expect("sim starts");
    let client = impersonating(&sim, Some("josé"), &["équipe"]).await;
    let reviews: Api<SelfSubjectReview> = Api::all(client);
    let review = reviews
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("self subject review");
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(user.username.as_deref(), Some("josé"));
    assert_eq!(
        user.groups.unwrap_or_default(),
        vec!["équipe".to_string(), "system:authenticated".to_string()]
    );
    sim.shutdown().await;
}
