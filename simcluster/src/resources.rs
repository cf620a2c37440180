//! The resource types the simulated cluster serves, and the discovery and OpenAPI documents
//! derived from them. Only what is listed here is advertised, so clients never see a
//! resource the simulation cannot store.

use serde_json::{Value, json};

/// How a resource's requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Objects kept in the in-memory store (CRUD, list, watch).
    Stored,
    /// A create-only review answered from the caller's identity, never stored.
    Review,
}

/// One resource type (a group/version/plural) as discovery describes it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResourceKind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// `(subresource, verbs)`
    pub subresources: &'static [(&'static str, &'static [&'static str])],
    pub backing: Backing,
}

impl ResourceKind {
    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has_verb(&self, verb: &str) -> bool {
        self.verbs.contains(&verb)
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.iter().any(|(name, _)| *name == sub)
    }

    /// Whether objects of this kind carry a `status` that only the status subresource
    /// (or the simulation itself) may change.
    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }
}

const CRUD: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const CRUD_NO_COLLECTION_DELETE: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
const CREATE_ONLY: &[&str] = &["create"];
const STATUS: (&str, &[&str]) = ("status", &["get", "patch", "update"]);

/// Every resource the simulated cluster serves.
pub(crate) static RESOURCES: &[ResourceKind] = &[
    ResourceKind {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        verbs: CRUD_NO_COLLECTION_DELETE,
        subresources: &[STATUS],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        verbs: CRUD,
        subresources: &[
            ("log", &["get"]),
            STATUS,
            ("exec", &["create", "get"]),
            ("attach", &["create", "get"]),
            ("portforward", &["create", "get"]),
        ],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        verbs: CRUD,
        subresources: &[],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        categories: &[],
        verbs: CRUD,
        subresources: &[],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        verbs: CRUD,
        subresources: &[STATUS],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        categories: &[],
        verbs: CRUD,
        subresources: &[],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        verbs: CRUD,
        subresources: &[],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        categories: &["all"],
        verbs: CRUD,
        subresources: &[STATUS],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short_names: &["rs"],
        categories: &["all"],
        verbs: CRUD,
        subresources: &[STATUS],
        backing: Backing::Stored,
    },
    ResourceKind {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "selfsubjectreviews",
        singular: "selfsubjectreview",
        kind: "SelfSubjectReview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        backing: Backing::Review,
    },
    ResourceKind {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        backing: Backing::Review,
    },
    ResourceKind {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectrulesreviews",
        singular: "selfsubjectrulesreview",
        kind: "SelfSubjectRulesReview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        backing: Backing::Review,
    },
];

/// The resource served at `group`/`version`/`plural`, if any.
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceKind> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The named groups (not the core group), in first-seen order, each with its versions.
fn named_group_versions() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) => {
                if !versions.contains(&r.version) {
                    versions.push(r.version);
                }
            }
            None => groups.push((r.group, vec![r.version])),
        }
    }
    groups
}

/// Whether `group`/`version` is served (the core group is `""`).
pub(crate) fn group_version_exists(group: &str, version: &str) -> bool {
    RESOURCES
        .iter()
        .any(|r| r.group == group && r.version == version)
}

/// Whether `group` is a served named group.
pub(crate) fn group_exists(group: &str) -> bool {
    !group.is_empty() && RESOURCES.iter().any(|r| r.group == group)
}

/// `GET /api` in the legacy form.
pub(crate) fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
    })
}

fn group_json(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

/// `GET /apis` in the legacy form.
pub(crate) fn api_group_list() -> Value {
    let groups: Vec<Value> = named_group_versions()
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/<group>`.
pub(crate) fn api_group(group: &str) -> Option<Value> {
    named_group_versions()
        .iter()
        .find(|(g, _)| *g == group)
        .map(|(g, vs)| {
            let mut v = group_json(g, vs);
            if let Some(obj) = v.as_object_mut() {
                obj.insert("kind".into(), json!("APIGroup"));
                obj.insert("apiVersion".into(), json!("v1"));
            }
            v
        })
}

/// `GET /api/v1` or `GET /apis/<group>/<version>`: the legacy `APIResourceList`.
pub(crate) fn api_resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs,
        });
        if let Some(obj) = entry.as_object_mut() {
            if !r.short_names.is_empty() {
                obj.insert("shortNames".into(), json!(r.short_names));
            }
            if !r.categories.is_empty() {
                obj.insert("categories".into(), json!(r.categories));
            }
        }
        resources.push(entry);
        for (sub, verbs) in r.subresources {
            resources.push(json!({
                "name": format!("{}/{}", r.plural, sub),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": subresource_kind(r, sub),
                "verbs": verbs,
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

fn subresource_kind(r: &ResourceKind, sub: &str) -> &'static str {
    match sub {
        "exec" => "PodExecOptions",
        "attach" => "PodAttachOptions",
        "portforward" => "PodPortForwardOptions",
        _ => r.kind,
    }
}

/// The Content-Type of aggregated discovery answers; clients check it before decoding.
pub(crate) const AGGREGATED_DISCOVERY_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn aggregated_resource(r: &ResourceKind) -> Value {
    let mut entry = json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": r.verbs,
    });
    if let Some(obj) = entry.as_object_mut() {
        if !r.short_names.is_empty() {
            obj.insert("shortNames".into(), json!(r.short_names));
        }
        if !r.categories.is_empty() {
            obj.insert("categories".into(), json!(r.categories));
        }
        if !r.subresources.is_empty() {
            let subs: Vec<Value> = r
                .subresources
                .iter()
                .map(|(sub, verbs)| {
                    json!({
                        "subresource": sub,
                        "responseKind": {"group": r.group, "version": r.version, "kind": subresource_kind(r, sub)},
                        "verbs": verbs,
                    })
                })
                .collect();
            obj.insert("subresources".into(), Value::Array(subs));
        }
    }
    entry
}

fn aggregated_group(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == group && r.version == *v)
                .map(aggregated_resource)
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    let metadata = if group.is_empty() {
        json!({"creationTimestamp": null})
    } else {
        json!({"creationTimestamp": null, "name": group})
    };
    json!({"metadata": metadata, "versions": versions})
}

/// `GET /api` in the aggregated (apidiscovery.k8s.io/v2) form.
pub(crate) fn aggregated_core() -> Value {
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": [aggregated_group("", &["v1"])],
    })
}

/// `GET /apis` in the aggregated (apidiscovery.k8s.io/v2) form.
pub(crate) fn aggregated_groups() -> Value {
    let items: Vec<Value> = named_group_versions()
        .iter()
        .map(|(g, vs)| aggregated_group(g, vs))
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

/// A stand-in for the document hash real servers put in OpenAPI URLs; constant because
/// the served documents never change.
const OPENAPI_HASH: &str = "KINVOKESIM1";

fn openapi_gv_keys() -> Vec<(String, &'static str, &'static str)> {
    let mut keys = vec![("api/v1".to_string(), "", "v1")];
    for (g, vs) in named_group_versions() {
        for v in vs {
            keys.push((format!("apis/{g}/{v}"), g, v));
        }
    }
    keys
}

/// `GET /openapi/v3`: one entry per served group-version.
pub(crate) fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (key, _, _) in openapi_gv_keys() {
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={OPENAPI_HASH}")}),
        );
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/<gv path>`: no schemas, only the `patch` operation per kind with its
/// group-version-kind and the `fieldValidation` parameter, which is what kubectl checks
/// before it lets the server validate fields.
pub(crate) fn openapi_v3_document(gv_path: &str) -> Option<Value> {
    let (_, group, version) = openapi_gv_keys()
        .into_iter()
        .find(|(k, _, _)| k == gv_path)?;
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && r.has_verb("patch"))
    {
        let path = if r.namespaced {
            format!("/{gv_path}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("/{gv_path}/{}/{{name}}", r.plural)
        };
        paths.insert(
            path,
            json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                        {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                        {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": {"description": "OK"}},
                }
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kinvoke-simcluster, a simulated API server)", "version": crate::SERVER_GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_found_by_its_plural() {
        for r in RESOURCES {
            assert_eq!(find(r.group, r.version, r.plural), Some(r));
        }
    }

    #[test]
    fn openapi_index_points_at_documents_that_exist() {
        let index = openapi_v3_index();
        let paths = index["paths"].as_object().cloned().unwrap_or_default();
        assert!(paths.contains_key("api/v1"));
        for key in paths.keys() {
            assert!(openapi_v3_document(key).is_some(), "{key}");
        }
    }

    #[test]
    fn openapi_document_carries_gvk_and_field_validation() {
        let doc = openapi_v3_document("api/v1").unwrap_or_default();
        let op = &doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]["patch"];
        assert_eq!(op["x-kubernetes-group-version-kind"]["kind"], "ConfigMap");
        assert_eq!(op["parameters"][0]["name"], "fieldValidation");
    }
}
