//! The in-memory object store: JSON objects keyed like etcd keys (resource, namespace,
//! name), one global resourceVersion counter, and an event history that watches replay
//! from. Everything here is synchronous; the caller holds the lock only for one operation.
//!
//! What the simulation does instead of controllers: a Pod is Running and Ready the moment
//! it is created, a Deployment reports all replicas ready (no Pods are created for it), a
//! Service gets a cluster IP, and deleting a Namespace deletes its objects at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use crate::PodRunner;
use crate::error::ApiError;
use crate::kubelet::{self, LiveLog, PodRef};
use crate::patch::{self, PatchType};
use crate::resources::{self, ResourceKind};
use crate::selector::Selectors;

/// How many past events a watch can resume from.
const HISTORY_LIMIT: usize = 10_000;
/// Live events buffered per watcher before it is dropped as too slow (it then re-lists).
const BROADCAST_CAPACITY: usize = 4_096;

/// RFC 3339 in UTC with second precision, as the API server writes timestamps.
pub(crate) fn format_time(ts: jiff::Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Random bytes for tokens and uids; falls back to a counter mixed with the clock for uids
/// only (the admin token refuses to start without real randomness, see `lib.rs`).
fn uid() -> String {
    static FALLBACK: AtomicU64 = AtomicU64::new(1);
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let n = FALLBACK.fetch_add(1, Ordering::Relaxed);
        let t = jiff::Timestamp::now().as_nanosecond() as u64;
        b[..8].copy_from_slice(&n.to_be_bytes());
        b[8..].copy_from_slice(&t.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Five characters from the alphabet kube-apiserver uses for `generateName` suffixes.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut b = [0u8; 5];
    if getrandom::fill(&mut b).is_err() {
        let t = jiff::Timestamp::now().as_nanosecond() as u64;
        b.copy_from_slice(&t.to_le_bytes()[..5]);
    }
    b.iter()
        .map(|x| ALPHABET[usize::from(*x) % ALPHABET.len()] as char)
        .collect()
}

/// A resource type's identity inside the store.
pub(crate) type ResId = (&'static str, &'static str);

fn res_id(r: &ResourceKind) -> ResId {
    (r.group, r.plural)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    res: ResId,
    namespace: String,
    name: String,
}

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug)]
pub(crate) struct Event {
    pub kind: EventType,
    pub res: ResId,
    pub namespace: String,
    pub object: Value,
    /// the object before a modification (lets a selector-filtered watch see objects leave)
    pub previous: Option<Value>,
    pub rv: u64,
}

/// Which objects a watch or list looks at.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub res: ResId,
    /// `None`: all namespaces (or a cluster-scoped resource)
    pub namespace: Option<String>,
    pub selectors: Selectors,
}

impl Scope {
    pub fn new(r: &ResourceKind, namespace: Option<&str>, selectors: Selectors) -> Self {
        Self {
            res: res_id(r),
            namespace: namespace.map(str::to_string),
            selectors,
        }
    }

    fn covers(&self, res: ResId, namespace: &str) -> bool {
        self.res == res && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }

    /// How this event looks to a watcher of this scope, if it sees it at all: an object
    /// that stops matching the selectors is DELETED for it, one that starts matching ADDED.
    pub fn view(&self, ev: &Event) -> Option<EventType> {
        if !self.covers(ev.res, &ev.namespace) {
            return None;
        }
        let now = self.selectors.matches(&ev.object);
        match ev.kind {
            EventType::Modified => {
                let before = ev
                    .previous
                    .as_ref()
                    .is_some_and(|p| self.selectors.matches(p));
                match (before, now) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
            kind => now.then_some(kind),
        }
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchFrom {
    /// Synthetic ADDED events for every current object, then live events.
    Now,
    /// Replay of the history after this resourceVersion, then live events.
    After(u64),
}

/// The beginning of a watch, taken atomically with its subscription.
pub(crate) struct WatchStart {
    pub initial: Vec<(EventType, Value)>,
    pub live: broadcast::Receiver<Arc<Event>>,
    /// live events with this resourceVersion or lower are already covered by `initial`
    pub rv: u64,
}

/// A page of a list.
pub(crate) struct ListPage {
    pub items: Vec<Value>,
    pub rv: u64,
    /// token for the next page, when `limit` cut the list short
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// A label (key, value).
type Label = (String, String);

/// The object store.
pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    events: broadcast::Sender<Arc<Event>>,
    /// the last object each field manager applied with server-side apply, per object
    applied: HashMap<(Key, String), Value>,
    /// decides how a new Pod ends, when set (see `PodRunner`)
    pod_runner: Option<PodRunner>,
    /// logs of Pods the runner completed
    pod_logs: HashMap<Key, String>,
    /// hands new runnable Pods to the simulated kubelet, when it is on, and the label a
    /// Pod must carry for it
    kubelet: Option<(mpsc::UnboundedSender<PodRef>, Option<Label>)>,
    /// per Pod the kubelet runs: set to true when the Pod is deleted
    pod_stops: HashMap<Key, watch::Sender<bool>>,
    /// per Pod the kubelet runs: each container's live log
    live_logs: HashMap<Key, BTreeMap<String, Arc<LiveLog>>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

fn pods_kind() -> &'static ResourceKind {
    // a fixed entry of resources.rs
    resources::find("", "v1", "pods").unwrap_or_else(|| unreachable!("pods are served"))
}

fn is_pods(r: &ResourceKind) -> bool {
    r.group.is_empty() && r.plural == "pods"
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(map) = obj else {
        unreachable!("the value was made an object above")
    };
    let metadata = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    let Value::Object(m) = metadata else {
        unreachable!("metadata was made an object above")
    };
    m
}

/// DNS-1123 subdomain (most names) or label (namespace names), as kube-apiserver checks.
fn validate_name(name: &str, label_only: bool) -> Result<(), String> {
    let max = if label_only { 63 } else { 253 };
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let parts_ok = |part: &str| {
        !part.is_empty()
            && part.chars().all(ok_char)
            && !part.starts_with('-')
            && !part.ends_with('-')
    };
    let valid = name.len() <= max
        && if label_only {
            parts_ok(name)
        } else {
            name.split('.').all(parts_ok)
        };
    if valid {
        Ok(())
    } else if label_only {
        Err(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
        ))
    } else {
        Err(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            events,
            applied: HashMap::new(),
            pod_runner: None,
            pod_logs: HashMap::new(),
            kubelet: None,
            pod_stops: HashMap::new(),
            live_logs: HashMap::new(),
        }
    }

    /// Hands runnable Pods created from now on to the simulated kubelet behind `tx`.
    pub fn set_kubelet(&mut self, tx: mpsc::UnboundedSender<PodRef>, only_labelled: Option<Label>) {
        self.kubelet = Some((tx, only_labelled));
    }

    /// True when the simulated kubelet runs Pod `namespace/name`.
    pub fn is_kubelet_pod(&self, namespace: &str, name: &str) -> bool {
        self.pod_stops
            .contains_key(&Self::key(pods_kind(), Some(namespace), name))
    }

    /// Turns true when the kubelet's Pod `namespace/name` is deleted.
    pub fn pod_stop(&self, namespace: &str, name: &str) -> Option<watch::Receiver<bool>> {
        self.pod_stops
            .get(&Self::key(pods_kind(), Some(namespace), name))
            .map(watch::Sender::subscribe)
    }

    /// Changes a Pod (status, nodeName) as its kubelet would, if it is still the one with
    /// `uid`; bumps its resourceVersion and tells watchers. False once it is gone.
    pub fn modify_pod(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
        change: impl FnOnce(&mut Value),
    ) -> bool {
        let key = Self::key(pods_kind(), Some(namespace), name);
        let Some(current) = self.objects.get(&key) else {
            return false;
        };
        if meta_str(current, "uid") != Some(uid) {
            return false;
        }
        let previous = current.clone();
        let mut obj = previous.clone();
        change(&mut obj);
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
        self.objects.insert(key.clone(), obj.clone());
        self.emit(EventType::Modified, &key, obj, Some(previous));
        true
    }

    /// Registers a container's live log.
    pub fn set_live_log(
        &mut self,
        namespace: &str,
        name: &str,
        container: &str,
        log: Arc<LiveLog>,
    ) {
        let key = Self::key(pods_kind(), Some(namespace), name);
        if self.objects.contains_key(&key) {
            self.live_logs
                .entry(key)
                .or_default()
                .insert(container.to_owned(), log);
        }
    }

    /// A container's live log, if the kubelet ran it.
    pub fn live_log(&self, namespace: &str, name: &str, container: &str) -> Option<Arc<LiveLog>> {
        self.live_logs
            .get(&Self::key(pods_kind(), Some(namespace), name))?
            .get(container)
            .cloned()
    }

    /// Lets `runner` decide how Pods created from now on end.
    pub fn set_pod_runner(&mut self, runner: Option<PodRunner>) {
        self.pod_runner = runner;
    }

    /// The logs the pod runner gave a Pod, if it completed one.
    pub fn pod_logs(&self, r: &ResourceKind, namespace: Option<&str>, name: &str) -> Option<&str> {
        self.pod_logs
            .get(&Self::key(r, namespace, name))
            .map(String::as_str)
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(r: &ResourceKind, namespace: Option<&str>, name: &str) -> Key {
        Key {
            res: res_id(r),
            namespace: if r.namespaced {
                namespace.unwrap_or_default().to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    fn not_found(r: &ResourceKind, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: r.plural.to_string(),
            group: r.group.to_string(),
            name: name.to_string(),
        }
    }

    fn emit(&mut self, kind: EventType, key: &Key, object: Value, previous: Option<Value>) {
        let ev = Arc::new(Event {
            kind,
            res: key.res,
            namespace: key.namespace.clone(),
            object,
            previous,
            rv: self.rv,
        });
        if self.history.len() >= HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back(ev.clone());
        // no receiver is not an error: nobody is watching
        let _ = self.events.send(ev);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// GET one object.
    pub fn get(
        &self,
        r: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(r, namespace, name))
            .cloned()
            .ok_or_else(|| Self::not_found(r, name))
    }

    /// LIST, in key order, optionally one page of `limit` after a continue token.
    pub fn list(
        &self,
        scope: &Scope,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let after = match continue_token.filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => Some(decode_continue(token).ok_or_else(|| {
                ApiError::BadRequest(format!("invalid continue token {token:?}"))
            })?),
        };
        let mut items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| scope.covers(k.res, &k.namespace))
            .filter(|(k, _)| {
                after
                    .as_ref()
                    .is_none_or(|(ns, name)| (&k.namespace, &k.name) > (ns, name))
            })
            .filter(|(_, v)| scope.selectors.matches(v))
            .map(|(_, v)| v.clone())
            .collect();
        let mut page = ListPage {
            items: Vec::new(),
            rv: self.rv,
            continue_token: None,
            remaining: 0,
        };
        if let Some(limit) = limit.filter(|l| *l > 0 && items.len() > *l) {
            page.remaining = items.len() - limit;
            items.truncate(limit);
            page.continue_token = items.last().map(|last| {
                encode_continue(
                    meta_str(last, "namespace").unwrap_or_default(),
                    meta_str(last, "name").unwrap_or_default(),
                )
            });
        }
        page.items = items;
        Ok(page)
    }

    /// CREATE (POST). With `dry_run` the result is computed but not stored.
    pub fn create(
        &mut self,
        r: &'static ResourceKind,
        namespace: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(r, &obj)?;
        let invalid = |name: &str, detail: String| ApiError::Invalid {
            kind: r.kind.to_string(),
            resource: r.plural.to_string(),
            group: r.group.to_string(),
            name: name.to_string(),
            detail,
        };
        let metadata = meta_mut(&mut obj);
        let name = match metadata.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match metadata.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", name_suffix()),
                _ => {
                    return Err(invalid(
                        "",
                        "metadata.name: Required value: name or generateName is required".into(),
                    ));
                }
            },
        };
        validate_name(&name, r.plural == "namespaces").map_err(|d| invalid(&name, d))?;
        metadata.insert("name".into(), Value::String(name.clone()));
        if r.namespaced {
            let ns = namespace.unwrap_or_default();
            match metadata.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                _ => {}
            }
            metadata.insert("namespace".into(), Value::String(ns.to_string()));
        } else {
            metadata.remove("namespace");
        }
        let key = Self::key(r, namespace, &name);
        if r.namespaced {
            let ns_kind = resources::find("", "v1", "namespaces");
            let ns_exists = ns_kind.is_some_and(|nk| {
                self.objects
                    .contains_key(&Self::key(nk, None, &key.namespace))
            });
            if !ns_exists {
                return Err(ApiError::NotFound {
                    resource: "namespaces".into(),
                    group: String::new(),
                    name: key.namespace.clone(),
                });
            }
        }
        if self.objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists {
                resource: r.plural.to_string(),
                group: r.group.to_string(),
                name,
            });
        }
        let rv = if dry_run { self.rv + 1 } else { self.next_rv() };
        let now = format_time(jiff::Timestamp::now());
        let metadata = meta_mut(&mut obj);
        metadata.insert("uid".into(), Value::String(uid()));
        metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
        metadata.insert("creationTimestamp".into(), Value::String(now.clone()));
        metadata.remove("deletionTimestamp");
        if let Some(map) = obj.as_object_mut() {
            map.insert("apiVersion".into(), Value::String(r.api_version()));
            map.insert("kind".into(), Value::String(r.kind.to_string()));
            if map.contains_key("spec") {
                meta_mut(&mut obj).insert("generation".into(), json!(1));
            }
        }
        simulate_on_create(r, &mut obj, rv, &now);
        simulate_always(r, &mut obj)?;
        let outcome = match &self.pod_runner {
            Some(runner) if !dry_run && r.group.is_empty() && r.plural == "pods" => {
                runner.run(&obj)
            }
            _ => None,
        };
        let scripted = outcome.is_some();
        if let Some(outcome) = outcome {
            complete_pod(&mut obj, outcome.exit_code, &now);
            self.pod_logs.insert(key.clone(), outcome.logs);
        }
        let kubelet = match &self.kubelet {
            Some((tx, only))
                if !dry_run && !scripted && is_pods(r) && kubelet::runs(&obj, only.as_ref()) =>
            {
                kubelet::make_pending(&mut obj);
                Some(tx.clone())
            }
            _ => None,
        };
        if !dry_run {
            self.objects.insert(key.clone(), obj.clone());
            self.emit(EventType::Added, &key, obj.clone(), None);
        }
        if let Some(tx) = kubelet {
            self.pod_stops.insert(key.clone(), watch::channel(false).0);
            let handed = tx.send(PodRef {
                namespace: key.namespace.clone(),
                name: name.clone(),
                uid: meta_str(&obj, "uid").unwrap_or_default().to_owned(),
            });
            if handed.is_err() {
                tracing::warn!(pod = %name, "simcluster: the simulated kubelet has stopped; the Pod stays Pending");
            }
        }
        Ok(obj)
    }

    /// UPDATE (PUT) of the object or of its status subresource.
    pub fn update(
        &mut self,
        r: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        obj: Value,
        subresource: Option<&str>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(r, &obj)?;
        let key = Self::key(r, namespace, name);
        let existing = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(r, name))?;
        if let Some(body_name) = meta_str(&obj, "name").filter(|n| !n.is_empty() && *n != name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(body_rv) = meta_str(&obj, "resourceVersion").filter(|v| !v.is_empty())
            && Some(body_rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(ApiError::Conflict {
                resource: r.plural.to_string(),
                group: r.group.to_string(),
                name: name.to_string(),
            });
        }
        self.commit_update(r, key, existing, obj, subresource, dry_run)
    }

    fn commit_update(
        &mut self,
        r: &'static ResourceKind,
        key: Key,
        existing: Value,
        mut obj: Value,
        subresource: Option<&str>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if subresource == Some("status") {
            let status = obj.get("status").cloned();
            obj = existing.clone();
            if let (Some(map), Some(status)) = (obj.as_object_mut(), status) {
                map.insert("status".into(), status);
            }
        } else if r.has_status()
            && let Some(map) = obj.as_object_mut()
        {
            match existing.get("status") {
                Some(status) => map.insert("status".into(), status.clone()),
                None => map.remove("status"),
            };
        }
        // identity fields are the server's, whatever the body says
        let existing_meta = meta(&existing).cloned().unwrap_or_default();
        let metadata = meta_mut(&mut obj);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
        ] {
            match existing_meta.get(field) {
                Some(v) => metadata.insert(field.into(), v.clone()),
                None => metadata.remove(field),
            };
        }
        if let Some(map) = obj.as_object_mut() {
            map.insert("apiVersion".into(), Value::String(r.api_version()));
            map.insert("kind".into(), Value::String(r.kind.to_string()));
        }
        if obj.get("spec") != existing.get("spec") && subresource != Some("status") {
            let generation = existing_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta_mut(&mut obj).insert("generation".into(), json!(generation));
        }
        simulate_always(r, &mut obj)?;
        // a no-op write keeps the resourceVersion and sends no event, as in kube-apiserver
        let mut unchanged = obj.clone();
        meta_mut(&mut unchanged).insert(
            "resourceVersion".into(),
            existing_meta
                .get("resourceVersion")
                .cloned()
                .unwrap_or(Value::Null),
        );
        if unchanged == existing {
            return Ok(existing);
        }
        let rv = if dry_run { self.rv + 1 } else { self.next_rv() };
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
        if !dry_run {
            self.objects.insert(key.clone(), obj.clone());
            self.emit(EventType::Modified, &key, obj.clone(), Some(existing));
        }
        Ok(obj)
    }

    /// PATCH. Returns the object and whether it was created (server-side apply of a new
    /// object).
    #[allow(
        clippy::too_many_arguments,
        reason = "mirrors the PATCH request's parts"
    )]
    pub fn patch(
        &mut self,
        r: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        patch_type: PatchType,
        body: &Value,
        field_manager: &str,
        subresource: Option<&str>,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let key = Self::key(r, namespace, name);
        let invalid = |detail: String| ApiError::Invalid {
            kind: r.kind.to_string(),
            resource: r.plural.to_string(),
            group: r.group.to_string(),
            name: name.to_string(),
            detail,
        };
        let existing = self.objects.get(&key).cloned();
        if patch_type == PatchType::Apply {
            check_type(r, body)?;
            if body.get("apiVersion").is_none() || body.get("kind").is_none() {
                return Err(invalid(
                    "apiVersion and kind: Required value: server-side apply needs both".into(),
                ));
            }
            let applied_key = (key.clone(), field_manager.to_string());
            let Some(existing) = existing else {
                let mut obj = body.clone();
                meta_mut(&mut obj).insert("name".into(), Value::String(name.to_string()));
                let created = self.create(r, namespace, obj, dry_run)?;
                if !dry_run {
                    self.applied.insert(applied_key, body.clone());
                }
                return Ok((created, true));
            };
            let merged_patch = patch::apply_patch(self.applied.get(&applied_key), body);
            let mut obj = existing.clone();
            patch::strategic_merge(&mut obj, &merged_patch);
            let out = self.commit_update(r, key, existing, obj, subresource, dry_run)?;
            if !dry_run {
                self.applied.insert(applied_key, body.clone());
            }
            return Ok((out, false));
        }
        let existing = existing.ok_or_else(|| Self::not_found(r, name))?;
        let mut obj = existing.clone();
        match patch_type {
            PatchType::Merge => patch::merge_patch(&mut obj, body),
            PatchType::StrategicMerge => patch::strategic_merge(&mut obj, body),
            PatchType::Json => {
                patch::json_patch(&mut obj, body).map_err(|e| invalid(e.to_string()))?
            }
            PatchType::Apply => {}
        }
        if let Some(patched_rv) = meta_str(&obj, "resourceVersion")
            && Some(patched_rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(ApiError::Conflict {
                resource: r.plural.to_string(),
                group: r.group.to_string(),
                name: name.to_string(),
            });
        }
        let out = self.commit_update(r, key, existing, obj, subresource, dry_run)?;
        Ok((out, false))
    }

    /// DELETE one object (at once: no graceful termination). Deleting a namespace deletes
    /// everything in it first.
    pub fn delete(
        &mut self,
        r: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let key = Self::key(r, namespace, name);
        let existing = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(r, name))?;
        if dry_run {
            return Ok(existing);
        }
        if r.plural == "namespaces" && r.group.is_empty() {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.namespace == name)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        Ok(self.remove(&key).unwrap_or(existing))
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.applied.retain(|(k, _), _| k != key);
        self.pod_logs.remove(key);
        self.live_logs.remove(key);
        if let Some(stop) = self.pod_stops.remove(key) {
            let _ = stop.send(true);
        }
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
        self.emit(EventType::Deleted, key, obj.clone(), None);
        // the garbage collector: what this object owned goes with it (background
        // propagation, done at once)
        if let Some(uid) = meta_str(&obj, "uid").map(str::to_owned) {
            let owned: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, o)| {
                    meta(o)
                        .and_then(|m| m.get("ownerReferences"))
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid.as_str()))
                        })
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in owned {
                self.remove(&k);
            }
        }
        Some(obj)
    }

    /// DELETE on a collection: every selected object in scope.
    pub fn delete_collection(&mut self, scope: &Scope, dry_run: bool) -> Vec<Value> {
        let keys: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, v)| scope.covers(k.res, &k.namespace) && scope.selectors.matches(v))
            .map(|(k, _)| k.clone())
            .collect();
        if dry_run {
            return keys
                .iter()
                .filter_map(|k| self.objects.get(k).cloned())
                .collect();
        }
        keys.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Starts a watch: the initial events and the live subscription, taken under one lock so
    /// no change falls between them.
    pub fn watch(&self, scope: &Scope, from: WatchFrom) -> Result<WatchStart, ApiError> {
        let live = self.events.subscribe();
        let initial = match from {
            WatchFrom::Now => self
                .objects
                .iter()
                .filter(|(k, v)| scope.covers(k.res, &k.namespace) && scope.selectors.matches(v))
                .map(|(_, v)| (EventType::Added, v.clone()))
                .collect(),
            WatchFrom::After(rv) => {
                let oldest = self.history.front().map_or(self.rv, |e| e.rv);
                // the history is complete from its first event on, or from the start
                let complete_from = if self.history.len() < HISTORY_LIMIT {
                    0
                } else {
                    oldest.saturating_sub(1)
                };
                if rv < complete_from {
                    return Err(ApiError::Expired {
                        requested: rv,
                        oldest,
                    });
                }
                self.history
                    .iter()
                    .filter(|e| e.rv > rv)
                    .filter_map(|e| scope.view(e).map(|kind| (kind, e.object.clone())))
                    .collect()
            }
        };
        Ok(WatchStart {
            initial,
            live,
            rv: self.rv,
        })
    }
}

/// A body kind/apiVersion that contradicts the URL is refused, as kube-apiserver does.
fn check_type(r: &ResourceKind, obj: &Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::BadRequest(format!(
            "the body of the request is not a {} object",
            r.kind
        )));
    }
    let kind = obj.get("kind").and_then(Value::as_str);
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    if kind.is_some_and(|k| !k.is_empty() && k != r.kind)
        || api_version.is_some_and(|v| !v.is_empty() && v != r.api_version())
    {
        return Err(ApiError::BadRequest(format!(
            "the API version in the data ({}) does not match the expected API version ({}) or the kind ({}) is not {}",
            api_version.unwrap_or_default(),
            r.api_version(),
            kind.unwrap_or_default(),
            r.kind
        )));
    }
    Ok(())
}

fn encode_continue(namespace: &str, name: &str) -> String {
    BASE64.encode(json!({"ns": namespace, "name": name}).to_string())
}

fn decode_continue(token: &str) -> Option<(String, String)> {
    let bytes = BASE64.decode(token).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v.get("ns")?.as_str()?.to_string(),
        v.get("name")?.as_str()?.to_string(),
    ))
}

/// What controllers and admission would have done to a new object, done at once.
fn simulate_on_create(r: &ResourceKind, obj: &mut Value, rv: u64, now: &str) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    match (r.group, r.plural) {
        ("", "pods") => {
            let spec = map.entry("spec").or_insert_with(|| json!({}));
            if let Some(spec) = spec.as_object_mut() {
                spec.entry("nodeName")
                    .or_insert_with(|| json!("sim-node-1"));
                spec.entry("restartPolicy")
                    .or_insert_with(|| json!("Always"));
            }
            let containers: Vec<(String, String)> = map
                .get("spec")
                .and_then(|s| s.get("containers"))
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            (
                                c.get("name")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_string(),
                                c.get("image")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let statuses: Vec<Value> = containers
                .iter()
                .map(|(name, image)| {
                    json!({
                        "name": name,
                        "ready": true,
                        "started": true,
                        "restartCount": 0,
                        "image": image,
                        "imageID": "",
                        "containerID": format!("sim://{name}"),
                        "state": {"running": {"startedAt": now}},
                    })
                })
                .collect();
            let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
            map.insert(
                "status".into(),
                json!({
                    "phase": "Running",
                    "conditions": [condition("Initialized"), condition("Ready"), condition("ContainersReady"), condition("PodScheduled")],
                    "hostIP": "10.0.0.10",
                    "podIP": format!("10.244.0.{}", 2 + rv % 250),
                    "startTime": now,
                    "containerStatuses": statuses,
                    "qosClass": "BestEffort",
                }),
            );
        }
        ("", "services") => {
            let spec = map.entry("spec").or_insert_with(|| json!({}));
            if let Some(spec) = spec.as_object_mut() {
                spec.entry("type").or_insert_with(|| json!("ClusterIP"));
                let is_headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
                if !is_headless {
                    let ip = spec
                        .get("clusterIP")
                        .and_then(Value::as_str)
                        .filter(|ip| !ip.is_empty())
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("10.96.{}.{}", (rv / 250) % 250, 1 + rv % 250));
                    spec.insert("clusterIP".into(), json!(ip));
                    spec.insert("clusterIPs".into(), json!([ip]));
                }
                spec.entry("sessionAffinity")
                    .or_insert_with(|| json!("None"));
                if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                    for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                        port.entry("protocol").or_insert_with(|| json!("TCP"));
                        if let Some(p) = port.get("port").cloned() {
                            port.entry("targetPort").or_insert(p);
                        }
                    }
                }
            }
            map.insert("status".into(), json!({"loadBalancer": {}}));
        }
        ("", "namespaces") => {
            map.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            map.insert("status".into(), json!({"phase": "Active"}));
        }
        _ => {}
    }
}

/// A Pod the runner finished: Succeeded (exit code 0) or Failed, every container terminated.
fn complete_pod(pod: &mut Value, exit_code: i32, now: &str) {
    let (phase, reason) = if exit_code == 0 {
        ("Succeeded", "Completed")
    } else {
        ("Failed", "Error")
    };
    let Some(status) = pod.get_mut("status").and_then(Value::as_object_mut) else {
        return;
    };
    status.insert("phase".into(), json!(phase));
    if let Some(Value::Array(conditions)) = status.get_mut("conditions") {
        for c in conditions.iter_mut() {
            let t = c.get("type").and_then(Value::as_str).unwrap_or_default();
            if t == "Ready" || t == "ContainersReady" {
                c["status"] = json!("False");
                c["reason"] = json!("PodCompleted");
            }
        }
    }
    if let Some(Value::Array(containers)) = status.get_mut("containerStatuses") {
        for c in containers.iter_mut() {
            c["ready"] = json!(false);
            c["started"] = json!(false);
            c["state"] = json!({"terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": now,
                "finishedAt": now,
                "containerID": c.get("containerID").cloned().unwrap_or(Value::Null),
            }});
        }
    }
}

/// Defaults and conversions every write goes through.
fn simulate_always(r: &ResourceKind, obj: &mut Value) -> Result<(), ApiError> {
    let invalid = |obj: &Value, detail: &str| ApiError::Invalid {
        kind: r.kind.to_string(),
        resource: r.plural.to_string(),
        group: r.group.to_string(),
        name: meta_str(obj, "name").unwrap_or_default().to_string(),
        detail: detail.to_string(),
    };
    match (r.group, r.plural) {
        ("", "secrets") => {
            let Some(map) = obj.as_object_mut() else {
                return Ok(());
            };
            if let Some(Value::Object(string_data)) = map.remove("stringData") {
                let data = map.entry("data").or_insert_with(|| json!({}));
                if let Some(data) = data.as_object_mut() {
                    for (k, v) in string_data {
                        let s = v.as_str().unwrap_or_default();
                        data.insert(k, Value::String(BASE64.encode(s)));
                    }
                }
            }
            map.entry("type").or_insert_with(|| json!("Opaque"));
        }
        ("", "pods") => {
            let has_containers = obj
                .get("spec")
                .and_then(|s| s.get("containers"))
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty());
            if !has_containers {
                return Err(invalid(obj, "spec.containers: Required value"));
            }
        }
        ("", "namespaces") => {
            let name = meta_str(obj, "name").unwrap_or_default().to_string();
            let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), Value::String(name));
            }
        }
        ("apps", "deployments") => {
            let replicas = obj
                .get("spec")
                .and_then(|s| s.get("replicas"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let generation = meta(obj)
                .and_then(|m| m.get("generation"))
                .cloned()
                .unwrap_or(json!(1));
            if let Some(map) = obj.as_object_mut() {
                if let Some(spec) = map.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.insert("replicas".into(), json!(replicas));
                }
                map.insert(
                    "status".into(),
                    json!({
                        "observedGeneration": generation,
                        "replicas": replicas,
                        "updatedReplicas": replicas,
                        "readyReplicas": replicas,
                        "availableReplicas": replicas,
                        "conditions": [
                            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "simulated: all replicas are available"},
                            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "simulated: rollout complete"},
                        ],
                    }),
                );
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn kind(group: &str, plural: &str) -> &'static ResourceKind {
        find(group, "v1", plural).unwrap_or(&resources::RESOURCES[0])
    }

    fn store_with_ns(ns: &str) -> Store {
        let mut store = Store::new();
        let created = store.create(
            kind("", "namespaces"),
            None,
            json!({"metadata": {"name": ns}}),
            false,
        );
        assert!(created.is_ok());
        store
    }

    #[test]
    fn create_bumps_resource_version_and_fills_identity() {
        let mut store = store_with_ns("demo");
        let before = store.resource_version();
        let cm = store
            .create(
                kind("", "configmaps"),
                Some("demo"),
                json!({"metadata": {"name": "c"}, "data": {"k": "v"}}),
                false,
            )
            .unwrap_or_default();
        assert_eq!(store.resource_version(), before + 1);
        assert_eq!(cm["metadata"]["resourceVersion"], (before + 1).to_string());
        assert_eq!(cm["metadata"]["namespace"], "demo");
        assert_eq!(cm["kind"], "ConfigMap");
        assert!(
            cm["metadata"]["uid"]
                .as_str()
                .is_some_and(|u| u.len() == 36)
        );
    }

    #[test]
    fn create_in_missing_namespace_is_not_found() {
        let mut store = Store::new();
        let err = store.create(
            kind("", "configmaps"),
            Some("nope"),
            json!({"metadata": {"name": "c"}}),
            false,
        );
        assert!(
            matches!(err, Err(ApiError::NotFound { ref resource, .. }) if resource == "namespaces")
        );
    }

    #[test]
    fn duplicate_create_is_already_exists() {
        let mut store = store_with_ns("demo");
        let cm = json!({"metadata": {"name": "c"}});
        assert!(
            store
                .create(kind("", "configmaps"), Some("demo"), cm.clone(), false)
                .is_ok()
        );
        assert!(matches!(
            store.create(kind("", "configmaps"), Some("demo"), cm, false),
            Err(ApiError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn update_with_stale_resource_version_conflicts() {
        let mut store = store_with_ns("demo");
        let cm = store
            .create(
                kind("", "configmaps"),
                Some("demo"),
                json!({"metadata": {"name": "c"}}),
                false,
            )
            .unwrap_or_default();
        let mut stale = cm.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        stale["data"] = json!({"k": "v"});
        assert!(matches!(
            store.update(
                kind("", "configmaps"),
                Some("demo"),
                "c",
                stale,
                None,
                false
            ),
            Err(ApiError::Conflict { .. })
        ));
        let mut fresh = cm;
        fresh["data"] = json!({"k": "v"});
        let updated = store
            .update(
                kind("", "configmaps"),
                Some("demo"),
                "c",
                fresh,
                None,
                false,
            )
            .unwrap_or_default();
        assert_eq!(updated["data"]["k"], "v");
    }

    #[test]
    fn secret_string_data_becomes_base64_data() {
        let mut store = store_with_ns("demo");
        let s = store
            .create(
                kind("", "secrets"),
                Some("demo"),
                json!({"metadata": {"name": "s"}, "stringData": {"password": "hunter2"}}),
                false,
            )
            .unwrap_or_default();
        assert_eq!(s["data"]["password"], "aHVudGVyMg==");
        assert_eq!(s["type"], "Opaque");
        assert!(s.get("stringData").is_none());
    }

    #[test]
    fn watch_after_a_resource_version_replays_later_events() {
        let mut store = store_with_ns("demo");
        let rv = store.resource_version();
        let cms = kind("", "configmaps");
        assert!(
            store
                .create(cms, Some("demo"), json!({"metadata": {"name": "a"}}), false)
                .is_ok()
        );
        assert!(store.delete(cms, Some("demo"), "a", false).is_ok());
        let scope = Scope::new(cms, Some("demo"), Selectors::default());
        let start = store.watch(&scope, WatchFrom::After(rv));
        let kinds: Vec<EventType> = start
            .map(|s| s.initial.into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default();
        assert_eq!(kinds, vec![EventType::Added, EventType::Deleted]);
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects() {
        let mut store = store_with_ns("demo");
        let cms = kind("", "configmaps");
        assert!(
            store
                .create(cms, Some("demo"), json!({"metadata": {"name": "a"}}), false)
                .is_ok()
        );
        assert!(
            store
                .delete(kind("", "namespaces"), None, "demo", false)
                .is_ok()
        );
        assert!(store.get(cms, Some("demo"), "a").is_err());
    }

    #[test]
    fn invalid_names_are_rejected() {
        let mut store = store_with_ns("demo");
        let err = store.create(
            kind("", "configmaps"),
            Some("demo"),
            json!({"metadata": {"name": "Bad_Name"}}),
            false,
        );
        assert!(matches!(err, Err(ApiError::Invalid { .. })));
    }

    #[test]
    fn list_pages_with_continue_tokens() {
        let mut store = store_with_ns("demo");
        let cms = kind("", "configmaps");
        for n in ["a", "b", "c"] {
            assert!(
                store
                    .create(cms, Some("demo"), json!({"metadata": {"name": n}}), false)
                    .is_ok()
            );
        }
        let scope = Scope::new(cms, Some("demo"), Selectors::default());
        let first = store.list(&scope, Some(2), None);
        let (names, token) = first
            .map(|p| {
                (
                    p.items
                        .iter()
                        .map(|i| i["metadata"]["name"].clone())
                        .collect::<Vec<_>>(),
                    p.continue_token,
                )
            })
            .unwrap_or_default();
        assert_eq!(names, vec![json!("a"), json!("b")]);
        let rest = store
            .list(&scope, Some(2), token.as_deref())
            .map(|p| p.items.len())
            .unwrap_or_default();
        assert_eq!(rest, 1);
    }
}
