//! What a simulated cluster starts with. Always, as in any fresh cluster: namespaces
//! `default` and `kube-system` and the `kubernetes` Service in default. With the demo
//! objects (the default): namespace `demo`, coredns and kube-proxy Pods in kube-system, two
//! `web` Pods and the `web-config` ConfigMap in demo.

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::resources;
use crate::store::Store;

type Seed = (&'static str, &'static str, Option<&'static str>, Value);

/// `(group, plural, namespace, object)` for the objects every cluster has.
fn baseline_objects() -> Vec<Seed> {
    vec![
        (
            "",
            "namespaces",
            None,
            json!({"metadata": {"name": "default"}}),
        ),
        (
            "",
            "namespaces",
            None,
            json!({"metadata": {"name": "kube-system"}}),
        ),
        (
            "",
            "services",
            Some("default"),
            json!({
                "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]},
            }),
        ),
    ]
}

/// `(group, plural, namespace, object)` for every demo object, in creation order.
fn demo_objects() -> Vec<Seed> {
    let pod = |name: &str, app: &str, image: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": app, "image": image}]},
        })
    };
    vec![
        (
            "",
            "namespaces",
            None,
            json!({"metadata": {"name": "demo"}}),
        ),
        (
            "",
            "pods",
            Some("kube-system"),
            pod(
                "coredns-7db6d8ff4d-x2v9k",
                "coredns",
                "registry.k8s.io/coredns/coredns:v1.11.3",
            ),
        ),
        (
            "",
            "pods",
            Some("kube-system"),
            pod(
                "kube-proxy-7xq4m",
                "kube-proxy",
                "registry.k8s.io/kube-proxy:v1.35.2",
            ),
        ),
        (
            "",
            "pods",
            Some("demo"),
            pod("web-5d9c7b8f6d-4hx2p", "web", "nginx:1.27"),
        ),
        (
            "",
            "pods",
            Some("demo"),
            pod("web-5d9c7b8f6d-9qmzt", "web", "nginx:1.27"),
        ),
        (
            "",
            "configmaps",
            Some("demo"),
            json!({
                "metadata": {"name": "web-config", "labels": {"app": "web"}},
                "data": {"greeting": "hello from the simulated cluster", "replicas": "2"},
            }),
        ),
    ]
}

/// Creates the baseline objects, and the demo objects when `demo` is set, in `store`.
pub(crate) fn seed(store: &mut Store, demo: bool) -> Result<(), ApiError> {
    let mut objects = baseline_objects();
    if demo {
        objects.extend(demo_objects());
    }
    for (group, plural, namespace, object) in objects {
        let kind = resources::find(group, "v1", plural).ok_or(ApiError::UnknownPath)?;
        store.create(kind, namespace, object, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selectors;
    use crate::store::Scope;

    #[test]
    fn demo_objects_all_get_created() {
        let mut store = Store::new();
        assert_eq!(seed(&mut store, true), Ok(()));
        let pods = resources::find("", "v1", "pods");
        let Some(pods) = pods else {
            panic!("pods are served")
        };
        let in_demo = store
            .list(
                &Scope::new(pods, Some("demo"), Selectors::default()),
                None,
                None,
            )
            .map(|p| p.items)
            .unwrap_or_default();
        assert_eq!(in_demo.len(), 2);
        assert_eq!(in_demo[0]["status"]["phase"], "Running");
        assert_eq!(in_demo[0]["status"]["containerStatuses"][0]["ready"], true);
    }

    #[test]
    fn without_demo_objects_only_the_baseline_exists() {
        let mut store = Store::new();
        assert_eq!(seed(&mut store, false), Ok(()));
        let Some(namespaces) = resources::find("", "v1", "namespaces") else {
            panic!("namespaces are served")
        };
        let names: Vec<String> = store
            .list(
                &Scope::new(namespaces, None, Selectors::default()),
                None,
                None,
            )
            .map(|p| p.items)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        assert_eq!(names, ["default", "kube-system"]);
    }
}
