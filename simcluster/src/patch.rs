//! The patch flavours the API server accepts, as pure functions on JSON values:
//! JSON merge patch (RFC 7386), a strategic merge patch that knows the list merge keys of
//! the built-in kinds this simulation serves, JSON patch (RFC 6902), and the field-removal
//! half of server-side apply.

use serde_json::{Map, Value};

/// Why a patch could not be applied; answered as 422 Invalid or 400 BadRequest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PatchError {
    /// A JSON patch document that is not an array of operations.
    #[error("json patch must be an array of operations")]
    NotAnOperationList,
    /// A JSON patch operation this server does not know or that lacks a field.
    #[error("invalid json patch operation {0}")]
    BadOperation(String),
    /// A JSON pointer that does not resolve in the target document.
    #[error("json patch path {path:?} does not exist in the object")]
    MissingPath {
        /// the pointer
        path: String,
    },
    /// A `test` operation whose value differs.
    #[error("json patch test failed at {path:?}")]
    TestFailed {
        /// the pointer
        path: String,
    },
}

/// The patch types, by request Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    /// `application/json-patch+json`
    Json,
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    StrategicMerge,
    /// `application/apply-patch+yaml` (server-side apply)
    Apply,
}

impl PatchType {
    /// The patch type for a request Content-Type (parameters ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` removes, all else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                let slot = target_map.entry(key.clone()).or_insert(Value::Null);
                merge_patch(slot, value);
            }
        }
    }
}

/// The merge key of the lists the built-in kinds merge by key under strategic merge patch
/// (`patchMergeKey` in the Kubernetes API types); other lists are replaced whole.
fn list_merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let has = |k: &str| items.iter().any(|i| i.get(k).is_some());
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "volumeMounts"
        | "volumeDevices"
        | "resourceClaims" => Some("name"),
        "ports" if has("containerPort") => Some("containerPort"),
        "ports" => Some("port"),
        "ownerReferences" => Some("uid"),
        "hostAliases" => Some("ip"),
        "conditions" => Some("type"),
        _ => None,
    }
}

/// Lists of scalars that strategic merge patch unions instead of replacing.
fn is_merged_scalar_list(field: &str) -> bool {
    field == "finalizers"
}

/// Removes every `$`-directive key, recursively (they must never be stored).
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Strategic merge patch, as kubectl's client-side apply and `kubectl patch` send it,
/// including the `$patch`, `$retainKeys`, `$setElementOrder/` and
/// `$deleteFromPrimitiveList/` directives.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = strip_directives(patch);
        return;
    };
    match patch_map.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    if let Some(Value::Array(keep)) = patch_map.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target_map.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(current)), Value::Array(remove)) =
                (target_map.get_mut(field), value)
            {
                current.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            target_map.remove(key);
            continue;
        }
        match (target_map.get_mut(key), value) {
            (Some(existing @ Value::Object(_)), Value::Object(_)) => {
                strategic_merge(existing, value);
                if existing.is_null() {
                    target_map.remove(key);
                }
            }
            (Some(Value::Array(existing)), Value::Array(items)) => {
                merge_list(key, existing, items);
            }
            _ => {
                target_map.insert(key.clone(), strip_directives(value));
            }
        }
    }
}

fn merge_list(field: &str, existing: &mut Vec<Value>, patch_items: &[Value]) {
    if patch_items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *existing = patch_items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        return;
    }
    if is_merged_scalar_list(field) {
        for item in patch_items {
            if !existing.contains(item) {
                existing.push(item.clone());
            }
        }
        return;
    }
    let mut all = existing.clone();
    all.extend(patch_items.iter().cloned());
    let Some(merge_key) = list_merge_key(field, &all) else {
        *existing = patch_items.iter().map(strip_directives).collect();
        return;
    };
    for item in patch_items {
        let key_value = item.get(merge_key);
        let position =
            key_value.and_then(|kv| existing.iter().position(|e| e.get(merge_key) == Some(kv)));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                if let Some(slot) = existing.get_mut(i) {
                    strategic_merge(slot, item);
                }
            }
            (None, false) => existing.push(strip_directives(item)),
        }
    }
}

/// Resolves an RFC 6901 pointer into its unescaped tokens.
fn pointer_tokens(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PatchError::BadOperation(format!("path {path:?}")));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    tokens: &[String],
    path: &str,
) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(map) => map.get_mut(t),
            Value::Array(items) => t.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| PatchError::MissingPath {
            path: path.to_string(),
        })?;
    }
    Ok(cur)
}

fn json_patch_remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let tokens = pointer_tokens(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        return Ok(std::mem::take(doc));
    };
    let missing = || PatchError::MissingPath {
        path: path.to_string(),
    };
    match parent_mut(doc, parents, path)? {
        Value::Object(map) => map.remove(last).ok_or_else(missing),
        Value::Array(items) => {
            let i = last.parse::<usize>().map_err(|_| missing())?;
            if i < items.len() {
                Ok(items.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

fn json_patch_add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    let tokens = pointer_tokens(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    let missing = || PatchError::MissingPath {
        path: path.to_string(),
    };
    match parent_mut(doc, parents, path)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            if last == "-" {
                items.push(value);
                return Ok(());
            }
            let i = last.parse::<usize>().map_err(|_| missing())?;
            if i <= items.len() {
                items.insert(i, value);
                Ok(())
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// RFC 6902 JSON patch.
pub(crate) fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Array(ops) = patch else {
        return Err(PatchError::NotAnOperationList);
    };
    let mut doc = target.clone();
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::BadOperation(op.to_string()))
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::BadOperation(op.to_string()))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => json_patch_add(&mut doc, path, value()?)?,
            "remove" => {
                json_patch_remove(&mut doc, path)?;
            }
            "replace" => {
                json_patch_remove(&mut doc, path)?;
                json_patch_add(&mut doc, path, value()?)?;
            }
            "move" => {
                let moved = json_patch_remove(&mut doc, field("from")?)?;
                json_patch_add(&mut doc, path, moved)?;
            }
            "copy" => {
                let copied = doc.pointer(field("from")?).cloned().ok_or_else(|| {
                    PatchError::MissingPath {
                        path: path.to_string(),
                    }
                })?;
                json_patch_add(&mut doc, path, copied)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(PatchError::TestFailed {
                        path: path.to_string(),
                    });
                }
            }
            _ => return Err(PatchError::BadOperation(op.to_string())),
        }
    }
    *target = doc;
    Ok(())
}

/// Server-side apply, simplified: the fields this manager applied last time but no longer
/// applies are removed (`null`), the rest of `applied` is merged in. Ownership conflicts
/// between managers are not tracked.
pub(crate) fn apply_patch(last_applied: Option<&Value>, applied: &Value) -> Value {
    let mut patch = applied.clone();
    if let Some(last) = last_applied {
        add_removals(last, &mut patch);
    }
    patch
}

fn add_removals(last: &Value, patch: &mut Value) {
    if let (Value::Object(last_map), Value::Object(patch_map)) = (last, patch) {
        for (key, old) in last_map {
            match patch_map.get_mut(key) {
                None => {
                    patch_map.insert(key.clone(), Value::Null);
                }
                Some(new) => add_removals(old, new),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1"},
            {"name": "b", "image": "b:1"}
        ]}});
        strategic_merge(
            &mut pod,
            &json!({"spec": {
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "containers": [{"name": "b", "image": "b:2"}]
            }}),
        );
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:1"},
                {"name": "b", "image": "b:2"}
            ]}})
        );
    }

    #[test]
    fn strategic_merge_deletes_list_items_and_keys() {
        let mut obj = json!({
            "data": {"k": "v", "gone": "x"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "metadata": {"finalizers": ["x"]}
        });
        strategic_merge(
            &mut obj,
            &json!({
                "data": {"gone": null},
                "spec": {"containers": [{"name": "a", "$patch": "delete"}]},
                "metadata": {"finalizers": ["y"], "$deleteFromPrimitiveList/finalizers": ["x"]}
            }),
        );
        assert_eq!(
            obj,
            json!({
                "data": {"k": "v"},
                "spec": {"containers": [{"name": "b"}]},
                "metadata": {"finalizers": ["y"]}
            })
        );
    }

    #[test]
    fn strategic_merge_replaces_unkeyed_lists() {
        let mut obj = json!({"spec": {"args": ["a", "b"]}});
        strategic_merge(&mut obj, &json!({"spec": {"args": ["c"]}}));
        assert_eq!(obj, json!({"spec": {"args": ["c"]}}));
    }

    #[test]
    fn json_patch_applies_operations_in_order() {
        let mut doc = json!({"data": {"a": "1"}, "list": [1, 2]});
        let ops = json!([
            {"op": "add", "path": "/data/b", "value": "2"},
            {"op": "replace", "path": "/data/a", "value": "x"},
            {"op": "remove", "path": "/list/0"},
            {"op": "add", "path": "/list/-", "value": 3},
            {"op": "test", "path": "/data/b", "value": "2"}
        ]);
        assert_eq!(json_patch(&mut doc, &ops), Ok(()));
        assert_eq!(doc, json!({"data": {"a": "x", "b": "2"}, "list": [2, 3]}));
    }

    #[test]
    fn json_patch_failure_leaves_target_unchanged() {
        let mut doc = json!({"a": 1});
        let ops =
            json!([{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/zzz"}]);
        assert!(json_patch(&mut doc, &ops).is_err());
        assert_eq!(doc, json!({"a": 1}));
    }

    #[test]
    fn apply_patch_removes_fields_dropped_since_last_apply() {
        let last = json!({"data": {"a": "1", "b": "2"}});
        let applied = json!({"data": {"a": "1"}});
        let patch = apply_patch(Some(&last), &applied);
        assert_eq!(patch, json!({"data": {"a": "1", "b": null}}));
        let mut live = json!({"data": {"a": "1", "b": "2", "other": "kept"}});
        strategic_merge(&mut live, &patch);
        assert_eq!(live, json!({"data": {"a": "1", "other": "kept"}}));
    }

    #[test]
    fn patch_type_from_content_type() {
        assert_eq!(
            PatchType::from_content_type("application/strategic-merge-patch+json"),
            Some(PatchType::StrategicMerge)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml; charset=utf-8"),
            Some(PatchType::Apply)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }
}
