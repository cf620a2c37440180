//! Server-side printing: the `meta.k8s.io/v1` `Table` that `kubectl get` asks for, with the
//! columns kube-apiserver prints for each kind. `kubectl get -A` adds NAMESPACE itself, from
//! each row's object metadata.

use serde_json::{Value, json};

use crate::resources::ResourceKind;

/// What each row carries as its `object` (`includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    /// no object
    None,
    /// a `PartialObjectMetadata` (the default)
    Metadata,
    /// the whole object
    Object,
}

impl IncludeObject {
    /// From the query parameter value; unknown values fall back to the default.
    pub fn from_param(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// kubectl's `HumanDuration`, so AGE reads as in a real cluster (`5s`, `3m2s`, `2d4h`).
pub(crate) fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(obj: &Value, now: jiff::Timestamp) -> String {
    obj.get("metadata")
        .and_then(|m| m.get("creationTimestamp"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map_or_else(
            || "<unknown>".to_string(),
            |created| human_duration(now.as_second() - created.as_second()),
        )
}

fn s<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn len_of(obj: &Value, pointer: &str) -> usize {
    match obj.pointer(pointer) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn column(name: &str, ty: &str, format: &str, priority: u8) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": name, "priority": priority})
}

fn columns(r: &ResourceKind) -> Vec<Value> {
    let name = column("Name", "string", "name", 0);
    let age = column("Age", "string", "", 0);
    match (r.group, r.plural) {
        ("", "pods") => vec![
            name,
            column("Ready", "string", "", 0),
            column("Status", "string", "", 0),
            column("Restarts", "string", "", 0),
            age,
            column("IP", "string", "", 1),
            column("Node", "string", "", 1),
            column("Nominated Node", "string", "", 1),
            column("Readiness Gates", "string", "", 1),
        ],
        ("", "configmaps") => vec![name, column("Data", "integer", "", 0), age],
        ("", "secrets") => vec![
            name,
            column("Type", "string", "", 0),
            column("Data", "integer", "", 0),
            age,
        ],
        ("", "namespaces") => vec![name, column("Status", "string", "", 0), age],
        ("", "services") => vec![
            name,
            column("Type", "string", "", 0),
            column("Cluster-IP", "string", "", 0),
            column("External-IP", "string", "", 0),
            column("Port(s)", "string", "", 0),
            age,
            column("Selector", "string", "", 1),
        ],
        ("", "serviceaccounts") => vec![name, column("Secrets", "integer", "", 0), age],
        ("", "events") => vec![
            column("Last Seen", "string", "", 0),
            column("Type", "string", "", 0),
            column("Reason", "string", "", 0),
            column("Object", "string", "", 0),
            column("Message", "string", "", 0),
        ],
        ("apps", "replicasets") => vec![
            name,
            column("Desired", "integer", "", 0),
            column("Current", "integer", "", 0),
            column("Ready", "integer", "", 0),
            age,
        ],
        ("apps", "deployments") => vec![
            name,
            column("Ready", "string", "", 0),
            column("Up-to-date", "integer", "", 0),
            column("Available", "integer", "", 0),
            age,
        ],
        _ => vec![name, column("Created At", "date", "", 0)],
    }
}

fn pod_cells(pod: &Value, age: String) -> Vec<Value> {
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = len_of(pod, "/spec/containers");
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
        .sum();
    let waiting = statuses
        .iter()
        .find_map(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str));
    let terminated = statuses.iter().find_map(|c| {
        c.pointer("/state/terminated/reason")
            .and_then(Value::as_str)
    });
    let status = if pod.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating".to_string()
    } else if let Some(reason) = waiting.or(terminated) {
        reason.to_string()
    } else {
        let phase = s(pod, "/status/phase");
        if phase.is_empty() { "Pending" } else { phase }.to_string()
    };
    let none = |v: &str| {
        if v.is_empty() {
            "<none>".to_string()
        } else {
            v.to_string()
        }
    };
    vec![
        json!(s(pod, "/metadata/name")),
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts.to_string()),
        json!(age),
        json!(none(s(pod, "/status/podIP"))),
        json!(none(s(pod, "/spec/nodeName"))),
        json!("<none>"),
        json!("<none>"),
    ]
}

fn service_cells(svc: &Value, age: String) -> Vec<Value> {
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = p.get("port").map(|v| v.to_string()).unwrap_or_default();
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort") {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let selector: Vec<String> = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let or_none = |v: String| if v.is_empty() { "<none>".into() } else { v };
    vec![
        json!(s(svc, "/metadata/name")),
        json!(s(svc, "/spec/type")),
        json!(or_none(s(svc, "/spec/clusterIP").to_string())),
        json!("<none>"),
        json!(or_none(ports.join(","))),
        json!(age),
        json!(or_none(selector.join(","))),
    ]
}

fn cells(r: &ResourceKind, obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let name = json!(s(obj, "/metadata/name"));
    let age = age(obj, now);
    match (r.group, r.plural) {
        ("", "pods") => pod_cells(obj, age),
        ("", "configmaps") => vec![
            name,
            json!(len_of(obj, "/data") + len_of(obj, "/binaryData")),
            json!(age),
        ],
        ("", "secrets") => vec![
            name,
            json!(s(obj, "/type")),
            json!(len_of(obj, "/data")),
            json!(age),
        ],
        ("", "namespaces") => vec![name, json!(s(obj, "/status/phase")), json!(age)],
        ("", "services") => service_cells(obj, age),
        ("", "serviceaccounts") => vec![name, json!(len_of(obj, "/secrets")), json!(age)],
        ("", "events") => {
            let last_seen = [
                "/lastTimestamp",
                "/eventTime",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .find_map(|p| obj.pointer(p).and_then(Value::as_str))
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map_or_else(
                || "<unknown>".to_string(),
                |t| human_duration(now.as_second() - t.as_second()),
            );
            let object = format!(
                "{}/{}",
                s(obj, "/involvedObject/kind").to_ascii_lowercase(),
                s(obj, "/involvedObject/name")
            );
            vec![
                json!(last_seen),
                json!(s(obj, "/type")),
                json!(s(obj, "/reason")),
                json!(object),
                json!(s(obj, "/message")),
            ]
        }
        ("apps", "replicasets") => {
            let int = |p: &str| obj.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            vec![
                name,
                json!(int("/spec/replicas")),
                json!(int("/status/replicas")),
                json!(int("/status/readyReplicas")),
                json!(age),
            ]
        }
        ("apps", "deployments") => {
            let int = |p: &str| obj.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int("/status/readyReplicas"),
                    int("/spec/replicas")
                )),
                json!(int("/status/updatedReplicas")),
                json!(int("/status/availableReplicas")),
                json!(age),
            ]
        }
        _ => vec![name, json!(s(obj, "/metadata/creationTimestamp"))],
    }
}

fn row(r: &ResourceKind, obj: &Value, now: jiff::Timestamp, include: IncludeObject) -> Value {
    let mut row = json!({"cells": cells(r, obj, now)});
    let object = match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(obj.clone()),
        IncludeObject::Metadata => Some(partial_object_metadata(obj)),
    };
    if let (Some(o), Some(map)) = (object, row.as_object_mut()) {
        map.insert("object".into(), o);
    }
    row
}

/// The object reduced to its metadata, as `PartialObjectMetadata`.
pub(crate) fn partial_object_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// A `Table` of `objects`. `with_columns` is false for watch events after the first, as
/// kube-apiserver sends the column definitions only once per watch.
pub(crate) fn table(
    r: &ResourceKind,
    objects: &[Value],
    resource_version: Option<String>,
    include: IncludeObject,
    with_columns: bool,
    now: jiff::Timestamp,
) -> Value {
    let rows: Vec<Value> = objects.iter().map(|o| row(r, o, now, include)).collect();
    let mut metadata = serde_json::Map::new();
    if let Some(rv) = resource_version {
        metadata.insert("resourceVersion".into(), Value::String(rv));
    }
    let column_definitions = if with_columns { columns(r) } else { Vec::new() };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": column_definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn now() -> jiff::Timestamp {
        "2026-01-01T00:10:00Z"
            .parse()
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn human_duration_matches_kubectl() {
        let cases: &[(i64, &str)] = &[
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 120, "3h2m"),
            (20 * 3600, "20h"),
            (50 * 3600, "2d2h"),
            (10 * 86400, "10d"),
            (3 * 365 * 86400, "3y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(*secs), *want, "{secs}s");
        }
    }

    #[test]
    fn pod_table_has_ready_status_restarts_age() {
        let pods = find("", "v1", "pods");
        let Some(pods) = pods else {
            panic!("pods are served")
        };
        let pod = json!({
            "metadata": {"name": "web-1", "namespace": "demo", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "web"}, {"name": "sidecar"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "web", "ready": true, "restartCount": 1},
                {"name": "sidecar", "ready": false, "restartCount": 2}
            ]}
        });
        let t = table(
            pods,
            &[pod],
            Some("7".into()),
            IncludeObject::Metadata,
            true,
            now(),
        );
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(&names[..5], ["Name", "Ready", "Status", "Restarts", "Age"]);
        assert_eq!(t["rows"][0]["cells"][0], "web-1");
        assert_eq!(t["rows"][0]["cells"][1], "1/2");
        assert_eq!(t["rows"][0]["cells"][2], "Running");
        assert_eq!(t["rows"][0]["cells"][3], "3");
        assert_eq!(t["rows"][0]["cells"][4], "10m");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "demo");
        assert_eq!(t["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn configmap_table_counts_data_keys() {
        let Some(cms) = find("", "v1", "configmaps") else {
            panic!("configmaps are served")
        };
        let cm = json!({"metadata": {"name": "c", "creationTimestamp": "2026-01-01T00:09:55Z"}, "data": {"a": "1", "b": "2"}});
        let t = table(cms, &[cm], None, IncludeObject::None, true, now());
        assert_eq!(t["rows"][0]["cells"], json!(["c", 2, "5s"]));
        assert!(t["rows"][0].get("object").is_none());
    }

    #[test]
    fn watch_rows_after_the_first_carry_no_columns() {
        let Some(ns) = find("", "v1", "namespaces") else {
            panic!("namespaces are served")
        };
        let t = table(
            ns,
            &[json!({"metadata": {"name": "x"}})],
            None,
            IncludeObject::Metadata,
            false,
            now(),
        );
        assert_eq!(t["columnDefinitions"], json!([]));
        assert_eq!(t["rows"][0]["cells"][0], "x");
    }
}
