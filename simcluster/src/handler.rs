//! One request, in order: read the body → authenticate (token, impersonation) → route →
//! authorize → serve → record. Serving is synchronous against the store except watches,
//! which stream from a task fed by the store's event broadcast.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::RecordedRequest;
use crate::auth::{self, Attributes, UserInfo};
use crate::error::ApiError;
use crate::patch::PatchType;
use crate::proto;
use crate::resources::{self, Backing, ResourceKind};
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::server::{Shared, SimBody, lock};
use crate::store::{Scope, WatchFrom};
use crate::table::{self, IncludeObject};

/// Request bodies above this are refused (kube-apiserver's limit is 3 MiB for most objects).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// A watch without `timeoutSeconds` ends after this long, like kube-apiserver's default range.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

type HttpResponse = Response<SimBody>;

/// Serves one request; never fails at the HTTP level (errors are `Status` bodies).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: http::Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let (parts, body) = req.into_parts();
    let (body, too_large) = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => (collected.to_bytes(), false),
        Err(_) => (Bytes::new(), true),
    };
    let (user, response) = if too_large {
        (
            None,
            error_response(&ApiError::TooLarge { limit: MAX_BODY }),
        )
    } else {
        respond(&shared, &parts, &body)
    };
    record(
        &shared,
        &parts,
        body.len(),
        user.as_ref(),
        response.status(),
    );
    Ok(response)
}

fn record(
    shared: &Shared,
    parts: &Parts,
    body_len: usize,
    user: Option<&UserInfo>,
    status: StatusCode,
) {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_ascii_lowercase())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let mut requests = lock(&shared.requests);
    while requests.len() >= shared.max_recorded_requests.max(1) {
        requests.pop_front();
    }
    requests.push_back(RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body_len,
        user: user.map(|u| u.username.clone()),
        groups: user.map(|u| u.groups.clone()).unwrap_or_default(),
        status: status.as_u16(),
    });
}

fn respond(shared: &Shared, parts: &Parts, body: &Bytes) -> (Option<UserInfo>, HttpResponse) {
    let user = match auth::authenticate(&parts.headers, &shared.tokens) {
        Ok(user) => user,
        Err(e) => return (None, error_response(&e)),
    };
    let response = match serve(shared, parts, body, &user) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    (Some(user), response)
}

// ---------------------------------------------------------------------------------------
// responses

fn json_response(status: StatusCode, value: &Value) -> HttpResponse {
    bytes_response(status, "application/json", Bytes::from(value.to_string()))
}

fn bytes_response(status: StatusCode, content_type: &'static str, body: Bytes) -> HttpResponse {
    let mut response = Response::new(SimBody::Full(Some(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The one mapping from an error to the HTTP answer.
fn error_response(e: &ApiError) -> HttpResponse {
    let (status, body) = e.to_status();
    if status.is_server_error() {
        tracing::warn!(error = %e, "simcluster: request failed");
    }
    json_response(status, &body)
}

// ---------------------------------------------------------------------------------------
// request parsing

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded query parameters (last one wins).
struct Query(BTreeMap<String, String>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let mut params = BTreeMap::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(percent_decode(k), percent_decode(v));
        }
        Self(params)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun").is_some_and(|v| !v.is_empty())
    }
}

/// Whether the Accept header asks for `application/json;as=<as_kind>;g=<group>` (any version
/// in `versions`).
fn accepts(parts: &Parts, as_kind: &str, group: &str, versions: &[&str]) -> bool {
    parts
        .headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut fields = range.split(';').map(str::trim);
            let essence = fields.next().unwrap_or_default();
            let mut as_ok = false;
            let mut g_ok = false;
            let mut v_ok = false;
            for param in fields {
                match param.split_once('=') {
                    Some(("as", v)) => as_ok = v == as_kind,
                    Some(("g", v)) => g_ok = v == group,
                    Some(("v", v)) => v_ok = versions.contains(&v),
                    _ => {}
                }
            }
            essence.eq_ignore_ascii_case("application/json") && as_ok && g_ok && v_ok
        })
}

fn content_type(parts: &Parts) -> &str {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
}

fn is_upgrade(parts: &Parts) -> bool {
    let connection_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade || parts.headers.contains_key(header::UPGRADE)
}

/// A request for objects of one resource type.
struct ResourcePath<'a> {
    kind: &'static ResourceKind,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
}

enum Route<'a> {
    Version,
    Health,
    CoreVersions,
    Groups,
    Group(&'a str),
    ResourceList(&'a str, &'a str),
    OpenApiIndex,
    OpenApiDocument(String),
    Resource(ResourcePath<'a>),
}

fn route(path: &str) -> Result<Route<'_>, ApiError> {
    let segments: Vec<&str> = path
        .trim_end_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        ["version"] => Ok(Route::Version),
        ["healthz" | "livez" | "readyz", ..] => Ok(Route::Health),
        ["api"] => Ok(Route::CoreVersions),
        ["apis"] => Ok(Route::Groups),
        ["apis", group] if resources::group_exists(group) => Ok(Route::Group(group)),
        ["openapi", "v3"] => Ok(Route::OpenApiIndex),
        ["openapi", "v3", rest @ ..] => Ok(Route::OpenApiDocument(rest.join("/"))),
        ["api", version, rest @ ..] => resource_route("", version, rest),
        ["apis", group, version, rest @ ..] => resource_route(group, version, rest),
        _ => Err(ApiError::UnknownPath),
    }
}

fn resource_route<'a>(
    group: &'a str,
    version: &'a str,
    rest: &[&'a str],
) -> Result<Route<'a>, ApiError> {
    if !resources::group_version_exists(group, version) {
        return Err(ApiError::UnknownPath);
    }
    let find = |plural: &str| resources::find(group, version, plural).ok_or(ApiError::UnknownPath);
    let path = |kind, namespace, name, subresource| {
        Ok(Route::Resource(ResourcePath {
            kind,
            namespace,
            name,
            subresource,
        }))
    };
    let sub = |kind: &'static ResourceKind, s: &'a str| {
        if kind.has_subresource(s) {
            Ok(Some(s))
        } else {
            Err(ApiError::UnknownPath)
        }
    };
    match rest {
        [] => Ok(Route::ResourceList(group, version)),
        // namespaced objects, unless "namespaces/<ns>/<x>" is a namespace subresource
        ["namespaces", ns, plural, tail @ ..]
            if group.is_empty() && resources::find("", version, plural).is_none() =>
        {
            let namespaces = find("namespaces")?;
            match tail {
                [] => path(namespaces, None, Some(*ns), sub(namespaces, plural)?),
                _ => Err(ApiError::UnknownPath),
            }
        }
        ["namespaces", ns, plural, tail @ ..] => {
            let kind = find(plural)?;
            if !kind.namespaced {
                return Err(ApiError::UnknownPath);
            }
            match tail {
                [] => path(kind, Some(*ns), None, None),
                [name] => path(kind, Some(*ns), Some(*name), None),
                [name, s] => path(kind, Some(*ns), Some(*name), sub(kind, s)?),
                _ => Err(ApiError::UnknownPath),
            }
        }
        [plural, tail @ ..] => {
            let kind = find(plural)?;
            match tail {
                [] => path(kind, None, None, None),
                [name] if !kind.namespaced => path(kind, None, Some(*name), None),
                [name, s] if !kind.namespaced => path(kind, None, Some(*name), sub(kind, s)?),
                _ => Err(ApiError::UnknownPath),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// serving

fn serve(
    shared: &Shared,
    parts: &Parts,
    body: &Bytes,
    user: &UserInfo,
) -> Result<HttpResponse, ApiError> {
    let route = route(parts.uri.path())?;
    let discovery_only = |value: Value| {
        if parts.method == Method::GET {
            Ok(json_response(StatusCode::OK, &value))
        } else {
            Err(ApiError::MethodNotAllowed)
        }
    };
    match route {
        Route::Version => discovery_only(version_info()),
        Route::Health => {
            if parts.method == Method::GET {
                Ok(bytes_response(
                    StatusCode::OK,
                    "text/plain",
                    Bytes::from_static(b"ok"),
                ))
            } else {
                Err(ApiError::MethodNotAllowed)
            }
        }
        Route::CoreVersions => {
            if accepts(
                parts,
                "APIGroupDiscoveryList",
                "apidiscovery.k8s.io",
                &["v2"],
            ) {
                aggregated(parts, resources::aggregated_core())
            } else {
                discovery_only(resources::api_versions())
            }
        }
        Route::Groups => {
            if accepts(
                parts,
                "APIGroupDiscoveryList",
                "apidiscovery.k8s.io",
                &["v2"],
            ) {
                aggregated(parts, resources::aggregated_groups())
            } else {
                discovery_only(resources::api_group_list())
            }
        }
        Route::Group(group) => {
            discovery_only(resources::api_group(group).ok_or(ApiError::UnknownPath)?)
        }
        Route::ResourceList(group, version) => {
            discovery_only(resources::api_resource_list(group, version))
        }
        Route::OpenApiIndex => discovery_only(resources::openapi_v3_index()),
        Route::OpenApiDocument(gv) => {
            discovery_only(resources::openapi_v3_document(&gv).ok_or(ApiError::UnknownPath)?)
        }
        Route::Resource(rp) => serve_resource(shared, parts, body, user, &rp),
    }
}

fn aggregated(parts: &Parts, value: Value) -> Result<HttpResponse, ApiError> {
    if parts.method != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    Ok(bytes_response(
        StatusCode::OK,
        resources::AGGREGATED_DISCOVERY_CONTENT_TYPE,
        Bytes::from(value.to_string()),
    ))
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": crate::SERVER_MINOR,
        "emulationMajor": "1",
        "emulationMinor": crate::SERVER_MINOR,
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "34",
        "gitVersion": crate::SERVER_GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "none (kinvoke-simcluster is written in Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

/// The verb kube-apiserver's authorizer would see.
fn verb(method: &Method, rp: &ResourcePath<'_>, query: &Query) -> Result<&'static str, ApiError> {
    Ok(match (method.as_str(), rp.name.is_some()) {
        ("GET" | "HEAD", _) if query.flag("watch") => "watch",
        ("GET" | "HEAD", true) => "get",
        ("GET" | "HEAD", false) => "list",
        ("POST", false) => "create",
        ("POST", true) if rp.subresource.is_some() => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return Err(ApiError::MethodNotAllowed),
    })
}

fn serve_resource(
    shared: &Shared,
    parts: &Parts,
    body: &Bytes,
    user: &UserInfo,
    rp: &ResourcePath<'_>,
) -> Result<HttpResponse, ApiError> {
    let query = Query::parse(parts.uri.query());
    let kind = rp.kind;
    let verb = verb(&parts.method, rp, &query)?;
    let allowed = match rp.subresource {
        None => kind.has_verb(verb),
        Some(s) => kind
            .subresources
            .iter()
            .any(|(name, verbs)| *name == s && verbs.contains(&verb)),
    };
    if !allowed {
        return Err(ApiError::MethodNotAllowed);
    }
    if kind.backing == Backing::Review {
        let denied = lock(&shared.denied).contains(&user.username);
        return review(kind, parts, body, user, denied);
    }
    let resource = match rp.subresource {
        Some(s) => format!("{}/{s}", kind.plural),
        None => kind.plural.to_string(),
    };
    let denied = lock(&shared.denied).clone();
    auth::authorize(
        user,
        &denied,
        &Attributes {
            verb,
            group: kind.group,
            resource,
            // a namespace is its own namespace, as far as authorization goes
            namespace: if kind.group.is_empty() && kind.plural == "namespaces" {
                rp.name
            } else {
                rp.namespace
            },
            name: rp.name,
        },
    )?;
    // after authorization, as in kube-apiserver: a denied user learns nothing more
    if let Some(s @ ("exec" | "attach" | "portforward")) = rp.subresource {
        let what = match s {
            "portforward" => "port-forward",
            other => other,
        };
        return Err(ApiError::UpgradeNotSupported(format!("pods/{what}")));
    }
    if is_upgrade(parts) {
        return Err(ApiError::UpgradeNotSupported(
            "upgrading the connection".into(),
        ));
    }
    let name = rp.name.unwrap_or_default();
    let dry_run = query.dry_run();
    match verb {
        "get" if rp.subresource == Some("log") => pod_log(shared, rp, &query),
        "get" => {
            let obj = lock(&shared.store).get(kind, rp.namespace, name)?;
            Ok(object_response(parts, kind, StatusCode::OK, obj, &query))
        }
        "list" => list(shared, parts, kind, rp, &query),
        "watch" => watch(shared, parts, kind, rp, &query),
        "create" => {
            let obj = decode_body(parts, body)?;
            let created = lock(&shared.store).create(kind, rp.namespace, obj, dry_run)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        "update" => {
            let obj = decode_body(parts, body)?;
            let updated = lock(&shared.store).update(
                kind,
                rp.namespace,
                name,
                obj,
                rp.subresource,
                dry_run,
            )?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        "patch" => {
            let ct = content_type(parts);
            let patch_type = PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {ct:?}"
                ))
            })?;
            let patch_body = if patch_type == PatchType::Apply {
                parse_yaml_or_json(body)?
            } else {
                parse_json(body)?
            };
            let manager = query.get("fieldManager").unwrap_or_default();
            if patch_type == PatchType::Apply && manager.is_empty() {
                return Err(ApiError::Invalid {
                    kind: "PatchOptions".into(),
                    resource: kind.plural.into(),
                    group: kind.group.into(),
                    name: String::new(),
                    detail: "fieldManager: Required value: is required for apply patch".into(),
                });
            }
            let (obj, created) = lock(&shared.store).patch(
                kind,
                rp.namespace,
                name,
                patch_type,
                &patch_body,
                manager,
                rp.subresource,
                dry_run,
            )?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &obj))
        }
        "delete" => {
            let obj = lock(&shared.store).delete(kind, rp.namespace, name, dry_run)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        "deletecollection" => {
            let scope = Scope::new(kind, rp.namespace, selectors(&query)?);
            let deleted = lock(&shared.store).delete_collection(&scope, dry_run);
            let rv = lock(&shared.store).resource_version();
            Ok(json_response(
                StatusCode::OK,
                &list_json(kind, deleted, rv, None, 0),
            ))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))
}

fn parse_yaml_or_json(body: &Bytes) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the request body is not UTF-8 YAML".into()))?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid YAML: {e}")))
}

/// A create/update body: JSON, YAML or Kubernetes protobuf.
fn decode_body(parts: &Parts, body: &Bytes) -> Result<Value, ApiError> {
    let ct = content_type(parts);
    if proto::is_protobuf(ct) {
        return proto::decode_object(body).map_err(|e| match e {
            proto::ProtoError::UnsupportedKind { .. } => {
                ApiError::UnsupportedMediaType(e.to_string())
            }
            other => ApiError::BadRequest(other.to_string()),
        });
    }
    let essence = ct.split(';').next().unwrap_or_default().trim();
    match essence {
        "application/yaml" => parse_yaml_or_json(body),
        "application/json" | "" | "*/*" => parse_json(body),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf; got {other:?}"
        ))),
    }
}

fn selectors(query: &Query) -> Result<Selectors, ApiError> {
    let bad = |e: crate::selector::SelectorError| ApiError::BadRequest(e.to_string());
    Ok(Selectors {
        labels: LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
            .map_err(bad)?,
        fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())
            .map_err(bad)?,
    })
}

/// How the client wants objects rendered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rendering {
    Plain,
    Table(IncludeObject),
    Metadata,
}

fn rendering(parts: &Parts, query: &Query) -> Rendering {
    if accepts(parts, "Table", "meta.k8s.io", &["v1", "v1beta1"]) {
        Rendering::Table(IncludeObject::from_param(query.get("includeObject")))
    } else if accepts(
        parts,
        "PartialObjectMetadata",
        "meta.k8s.io",
        &["v1", "v1beta1"],
    ) || accepts(
        parts,
        "PartialObjectMetadataList",
        "meta.k8s.io",
        &["v1", "v1beta1"],
    ) {
        Rendering::Metadata
    } else {
        Rendering::Plain
    }
}

fn object_response(
    parts: &Parts,
    kind: &ResourceKind,
    status: StatusCode,
    obj: Value,
    query: &Query,
) -> HttpResponse {
    let rv = obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    match rendering(parts, query) {
        Rendering::Plain => json_response(status, &obj),
        Rendering::Table(include) => json_response(
            status,
            &table::table(kind, &[obj], rv, include, true, jiff::Timestamp::now()),
        ),
        Rendering::Metadata => json_response(status, &table::partial_object_metadata(&obj)),
    }
}

fn list_json(
    kind: &ResourceKind,
    items: Vec<Value>,
    rv: u64,
    continue_token: Option<String>,
    remaining: usize,
) -> Value {
    let mut metadata = serde_json::Map::new();
    metadata.insert("resourceVersion".into(), json!(rv.to_string()));
    if let Some(token) = continue_token {
        metadata.insert("continue".into(), json!(token));
        metadata.insert("remainingItemCount".into(), json!(remaining));
    }
    json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

fn list(
    shared: &Shared,
    parts: &Parts,
    kind: &'static ResourceKind,
    rp: &ResourcePath<'_>,
    query: &Query,
) -> Result<HttpResponse, ApiError> {
    let scope = Scope::new(kind, rp.namespace, selectors(query)?);
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok());
    let page = lock(&shared.store).list(&scope, limit, query.get("continue"))?;
    let body = match rendering(parts, query) {
        Rendering::Plain => list_json(
            kind,
            page.items,
            page.rv,
            page.continue_token,
            page.remaining,
        ),
        Rendering::Table(include) => {
            let mut t = table::table(
                kind,
                &page.items,
                Some(page.rv.to_string()),
                include,
                true,
                jiff::Timestamp::now(),
            );
            if let (Some(token), Some(meta)) = (
                page.continue_token,
                t.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.insert("continue".into(), json!(token));
                meta.insert("remainingItemCount".into(), json!(page.remaining));
            }
            t
        }
        Rendering::Metadata => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": page.rv.to_string()},
            "items": page.items.iter().map(table::partial_object_metadata).collect::<Vec<_>>(),
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn event_line(
    kind: &ResourceKind,
    event_type: &str,
    object: Value,
    rendering: Rendering,
    first: bool,
) -> Bytes {
    let object = match rendering {
        Rendering::Plain => object,
        Rendering::Metadata => table::partial_object_metadata(&object),
        Rendering::Table(include) => {
            // bookmarks carry only a resourceVersion; they are not rows
            if event_type == "BOOKMARK" {
                object
            } else {
                table::table(
                    kind,
                    &[object],
                    None,
                    include,
                    first,
                    jiff::Timestamp::now(),
                )
            }
        }
    };
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    shared: &Shared,
    parts: &Parts,
    kind: &'static ResourceKind,
    rp: &ResourcePath<'_>,
    query: &Query,
) -> Result<HttpResponse, ApiError> {
    let scope = Scope::new(kind, rp.namespace, selectors(query)?);
    let send_initial_events = query.flag("sendInitialEvents");
    let from = match query.get("resourceVersion") {
        _ if send_initial_events => WatchFrom::Now,
        None | Some("" | "0") => WatchFrom::Now,
        Some(rv) => WatchFrom::After(rv.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!("invalid resourceVersion {rv:?}: not a number"))
        })?),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let rendering = rendering(parts, query);
    let start = lock(&shared.store).watch(&scope, from)?;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut first = true;
        let mut send = |event_type: &str, object: Value| {
            let line = event_line(kind, event_type, object, rendering, first);
            first = false;
            line
        };
        for (event_type, object) in start.initial {
            if tx.send(send(event_type.as_str(), object)).await.is_err() {
                return;
            }
        }
        if send_initial_events {
            let bookmark = json!({
                "kind": kind.kind,
                "apiVersion": kind.api_version(),
                "metadata": {
                    "resourceVersion": start.rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            });
            if tx.send(send("BOOKMARK", bookmark)).await.is_err() {
                return;
            }
        }
        let mut live = start.live;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let event = tokio::select! {
                event = live.recv() => event,
                _ = shutdown.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            let event = match event {
                Ok(event) => event,
                // a watcher that fell behind is closed; the client re-lists, as with a real server
                Err(
                    broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed,
                ) => {
                    return;
                }
            };
            if event.rv <= start.rv {
                continue;
            }
            let Some(seen_as) = scope.view(&event) else {
                continue;
            };
            let line = send(seen_as.as_str(), event.object.clone());
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(SimBody::Stream(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn pod_log(
    shared: &Shared,
    rp: &ResourcePath<'_>,
    query: &Query,
) -> Result<HttpResponse, ApiError> {
    let name = rp.name.unwrap_or_default();
    let pod = lock(&shared.store).get(rp.kind, rp.namespace, name)?;
    let names = |field: &str| -> Vec<String> {
        pod.pointer(field)
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = names("/spec/containers");
    let init_containers = names("/spec/initContainers");
    let container = match query.get("container") {
        Some(c) if !c.is_empty() => {
            if !containers.iter().chain(&init_containers).any(|x| x == c) {
                return Err(ApiError::BadRequest(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            c.to_string()
        }
        _ => match containers.as_slice() {
            [only] => only.clone(),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    containers.join(" ")
                )));
            }
        },
    };
    let ns = rp.namespace.unwrap_or_default();
    let live = lock(&shared.store).live_log(ns, name, &container);
    if let Some(live) = live {
        // the simulated kubelet ran it: its real output, followed live on request
        let mut response = if query.flag("follow") {
            Response::new(SimBody::Stream(live.follow()))
        } else {
            bytes_response(StatusCode::OK, "text/plain", Bytes::from(live.snapshot()))
        };
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    if lock(&shared.store).is_kubelet_pod(ns, name) {
        // as kube-apiserver answers for a container the kubelet has not started
        return Err(ApiError::BadRequest(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: PodInitializing"
        )));
    }
    if let Some(scripted) = lock(&shared.store).pod_logs(rp.kind, rp.namespace, name) {
        let mut text = scripted.to_string();
        if let Some(tail) = query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
            let lines: Vec<&str> = text.lines().collect();
            let mut kept = lines[lines.len().saturating_sub(tail)..].join("\n");
            if !kept.is_empty() && text.ends_with('\n') {
                kept.push('\n');
            }
            text = kept;
        }
        return Ok(bytes_response(
            StatusCode::OK,
            "text/plain",
            Bytes::from(text),
        ));
    }
    let started = pod
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .unwrap_or("1970-01-01T00:00:00Z");
    let mut lines = vec![
        format!("{started} [simulated] container {container} of pod {ns}/{name} started"),
        format!(
            "{started} [simulated] {container}: ready (kinvoke-simcluster has no real workloads)"
        ),
    ];
    if !query.flag("timestamps") {
        lines = lines
            .into_iter()
            .map(|l| {
                l.split_once(' ')
                    .map_or(l.clone(), |(_, rest)| rest.to_string())
            })
            .collect();
    }
    if let Some(tail) = query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    Ok(bytes_response(
        StatusCode::OK,
        "text/plain",
        Bytes::from(text),
    ))
}

/// SelfSubjectReview, SelfSubjectAccessReview, SelfSubjectRulesReview: answered from the
/// caller's effective identity, never stored.
fn review(
    kind: &ResourceKind,
    parts: &Parts,
    body: &Bytes,
    user: &UserInfo,
    denied: bool,
) -> Result<HttpResponse, ApiError> {
    let request = if body.is_empty() {
        json!({})
    } else {
        decode_body(parts, body)?
    };
    let mut map = serde_json::Map::new();
    map.insert("kind".into(), json!(kind.kind));
    map.insert("apiVersion".into(), json!(kind.api_version()));
    map.insert("metadata".into(), json!({"creationTimestamp": null}));
    match kind.plural {
        "selfsubjectreviews" => {
            let mut user_info = json!({"username": user.username, "groups": user.groups});
            if let Some(obj) = user_info.as_object_mut() {
                if let Some(uid) = &user.uid {
                    obj.insert("uid".into(), json!(uid));
                }
                if !user.extra.is_empty() {
                    obj.insert("extra".into(), json!(user.extra));
                }
            }
            map.insert("status".into(), json!({"userInfo": user_info}));
        }
        "selfsubjectaccessreviews" => {
            map.insert(
                "spec".into(),
                request.get("spec").cloned().unwrap_or_else(|| json!({})),
            );
            let status = if denied {
                json!({"allowed": false, "reason": format!("simulated cluster: user {:?} is on the deny list", user.username)})
            } else {
                json!({"allowed": true, "reason": "simulated cluster: allowed"})
            };
            map.insert("status".into(), status);
        }
        _ => {
            map.insert(
                "spec".into(),
                request.get("spec").cloned().unwrap_or_else(|| json!({})),
            );
            let review_rule = json!({
                "verbs": ["create"],
                "apiGroups": ["authorization.k8s.io", "authentication.k8s.io"],
                "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews", "selfsubjectreviews"],
            });
            let status = if denied {
                json!({"resourceRules": [review_rule], "nonResourceRules": [], "incomplete": false})
            } else {
                json!({
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    "incomplete": false,
                })
            };
            map.insert("status".into(), status);
        }
    }
    Ok(json_response(StatusCode::CREATED, &Value::Object(map)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(accept: &str) -> Parts {
        let (parts, ()) = http::Request::builder()
            .uri("/api/v1/pods")
            .header(header::ACCEPT, accept)
            .body(())
            .unwrap_or_default()
            .into_parts();
        parts
    }

    #[test]
    fn kubectl_get_accept_header_asks_for_a_table() {
        let p = parts(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
        );
        assert!(accepts(&p, "Table", "meta.k8s.io", &["v1", "v1beta1"]));
        assert!(!accepts(
            &parts("application/json"),
            "Table",
            "meta.k8s.io",
            &["v1"]
        ));
    }

    #[test]
    fn aggregated_discovery_is_recognised_in_any_parameter_order() {
        let p = parts(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json",
        );
        assert!(accepts(
            &p,
            "APIGroupDiscoveryList",
            "apidiscovery.k8s.io",
            &["v2"]
        ));
        let only_beta =
            parts("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList");
        assert!(!accepts(
            &only_beta,
            "APIGroupDiscoveryList",
            "apidiscovery.k8s.io",
            &["v2"]
        ));
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        let q = Query::parse(Some(
            "labelSelector=name%3Ddemo%2Cowner%3Dhelm&watch=true&x=a+b",
        ));
        assert_eq!(q.get("labelSelector"), Some("name=demo,owner=helm"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some("a b"));
    }

    type Routed = (&'static str, Option<String>, Option<String>, Option<String>);

    fn routed(path: &str) -> Option<Routed> {
        match route(path) {
            Ok(Route::Resource(rp)) => Some((
                rp.kind.plural,
                rp.namespace.map(str::to_string),
                rp.name.map(str::to_string),
                rp.subresource.map(str::to_string),
            )),
            _ => None,
        }
    }

    #[test]
    fn resource_paths_route_like_kube_apiserver() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(routed("/api/v1/pods"), Some(("pods", None, None, None)));
        assert_eq!(
            routed("/api/v1/namespaces/demo/pods"),
            Some(("pods", s("demo"), None, None))
        );
        assert_eq!(
            routed("/api/v1/namespaces/demo/pods/web/log"),
            Some(("pods", s("demo"), s("web"), s("log")))
        );
        assert_eq!(
            routed("/api/v1/namespaces/demo"),
            Some(("namespaces", None, s("demo"), None))
        );
        assert_eq!(
            routed("/api/v1/namespaces/demo/status"),
            Some(("namespaces", None, s("demo"), s("status")))
        );
        assert_eq!(
            routed("/apis/apps/v1/namespaces/demo/deployments/web"),
            Some(("deployments", s("demo"), s("web"), None))
        );
        assert_eq!(routed("/api/v1/pods/web"), None);
        assert_eq!(routed("/api/v1/widgets"), None);
        assert_eq!(routed("/apis/nope.example.com/v1/things"), None);
        assert_eq!(routed("/api/v1/namespaces/demo/pods/web/bogus"), None);
    }
}
