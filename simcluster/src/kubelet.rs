//! A **simulated** kubelet for the simulated cluster: a test double, not a kubelet. With
//! [`KubeletOptions`] set, a Pod whose containers all have a `command` is not Running at
//! once: it goes through scheduling, volume set-up and its containers the way a real node
//! would, except that each container's command runs as a local process through a
//! [`ContainerRuntime`] the embedder supplies (the kinvoke gateway's runs it in its command
//! sandbox), and the image is ignored.
//!
//! What it does, honestly:
//! - Scheduling onto one node, `sim-node-1` (labels `kubernetes.io/hostname`,
//!   `kubernetes.io/os=linux`, `kubernetes.io/arch=amd64` and any configured): a Pod whose
//!   `nodeSelector` does not match, or that does not tolerate one of the node's
//!   `NoSchedule`/`NoExecute` taints, stays `Pending` with condition `PodScheduled=False`,
//!   reason `Unschedulable` and the scheduler's message (`0/1 nodes are available: ...`).
//!   Affinity is not evaluated.
//! - Images: none is pulled; an image listed in [`KubeletOptions::unpullable_images`]
//!   leaves its container waiting in `ImagePullBackOff`.
//! - Volumes: `emptyDir` (a fresh directory) and `secret` (its keys, or its `items`, as
//!   files with their modes; the container waits in `ContainerCreating` until the Secret
//!   exists). Other volume types fail the Pod.
//! - Containers: init containers in order, then exactly one main container (more fail the
//!   Pod). Environment from `env[].value`; `workingDir`; mounts. Exit code and
//!   `Completed`/`Error` in the container status; phase `Succeeded` or `Failed`. Restart
//!   policies other than `Never` are treated as `Never`.
//! - `activeDeadlineSeconds`, counted from `status.startTime`: the container is stopped
//!   and the Pod fails with reason `DeadlineExceeded`.
//! - Deleting the Pod stops its container at once (no grace period).
//! - Logs: each container's output is kept (the first [`MAX_LOG_BYTES`]) and served by
//!   `pods/log`, with `follow=true` streaming until the container ends.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::resources::{self, ResourceKind};
use crate::server::{Shared, lock};
use crate::store::format_time;

/// The simulated node's name.
pub const NODE_NAME: &str = "sim-node-1";

/// Output kept per container; what passes it is dropped with one notice line, so a
/// runaway command cannot grow the simulated cluster without bound.
pub const MAX_LOG_BYTES: usize = 64 * 1024 * 1024;

/// A node taint (`spec.taints[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// Its key, e.g. `CriticalAddonsOnly`.
    pub key: String,
    /// Its value (may be empty).
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// Turns the simulated kubelet on (see the module docs).
#[derive(Clone)]
pub struct KubeletOptions {
    /// Runs each container's command.
    pub runtime: Arc<dyn ContainerRuntime>,
    /// Extra labels of the node.
    pub node_labels: BTreeMap<String, String>,
    /// The node's taints.
    pub taints: Vec<Taint>,
    /// Images whose pull fails (`ImagePullBackOff`).
    pub unpullable_images: Vec<String>,
    /// Where each Pod's volumes are made; default: the system temp directory.
    pub work_root: Option<PathBuf>,
    /// Only Pods carrying this label (`key`, `value`) are run; others are Running at once
    /// as without a kubelet. Default: none (every Pod with commands is run).
    pub only_labelled: Option<(String, String)>,
}

impl std::fmt::Debug for KubeletOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletOptions")
            .field("node_labels", &self.node_labels)
            .field("taints", &self.taints)
            .field("unpullable_images", &self.unpullable_images)
            .finish_non_exhaustive()
    }
}

impl KubeletOptions {
    /// A kubelet running containers with `runtime` on an untainted node.
    pub fn new(runtime: Arc<dyn ContainerRuntime>) -> Self {
        Self {
            runtime,
            node_labels: BTreeMap::new(),
            taints: Vec::new(),
            unpullable_images: Vec::new(),
            work_root: None,
            only_labelled: None,
        }
    }

    /// Runs only Pods labelled `key=value`.
    pub fn only_labelled(mut self, key: &str, value: &str) -> Self {
        self.only_labelled = Some((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds a taint to the node.
    pub fn with_taint(mut self, key: &str, value: &str, effect: &str) -> Self {
        self.taints.push(Taint {
            key: key.to_owned(),
            value: value.to_owned(),
            effect: effect.to_owned(),
        });
        self
    }

    /// Makes pulls of `image` fail.
    pub fn with_unpullable_image(mut self, image: &str) -> Self {
        self.unpullable_images.push(image.to_owned());
        self
    }
}

/// One volume as a container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The volume's directory on this host.
    pub source: PathBuf,
    /// Its `mountPath` in the container.
    pub target: PathBuf,
    /// `readOnly` (secret volumes always are).
    pub read_only: bool,
}

/// One container to run.
#[derive(Debug)]
pub struct Container {
    /// `NAMESPACE/NAME` of its Pod.
    pub pod: String,
    /// The container's name.
    pub name: String,
    /// `command` followed by `args`.
    pub argv: Vec<String>,
    /// `env[]` with literal values.
    pub env: Vec<(String, String)>,
    /// `workingDir`, if set.
    pub working_dir: Option<PathBuf>,
    /// Its volume mounts.
    pub mounts: Vec<VolumeMount>,
    /// Where its standard output and error go.
    pub output: LogSink,
    /// Becomes true when the container must stop (deletion, deadline).
    pub stop: watch::Receiver<bool>,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerExit {
    /// Its command exited with this code (128+N for signal N).
    Exited(i32),
    /// It could not be started; the message says why.
    Failed(String),
}

/// Runs containers for the simulated kubelet.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Runs `container` to its end, stopping it when `container.stop` turns true.
    fn run(&self, container: Container) -> Pin<Box<dyn Future<Output = ContainerExit> + Send>>;
}

/// A container's log as it is written: served by `pods/log`, followed live.
#[derive(Debug)]
pub(crate) struct LiveLog {
    data: Mutex<Vec<u8>>,
    /// (bytes kept, ended)
    state: watch::Sender<(usize, bool)>,
}

impl LiveLog {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(Vec::new()),
            state: watch::channel((0, false)).0,
        })
    }

    fn append(&self, bytes: &[u8]) {
        let mut data = lock(&self.data);
        let before = data.len();
        if before >= MAX_LOG_BYTES {
            return;
        }
        let room = MAX_LOG_BYTES - before;
        if bytes.len() <= room {
            data.extend_from_slice(bytes);
        } else {
            data.extend_from_slice(&bytes[..room]);
            data.extend_from_slice(
                b"\n[simulated kubelet: log limit reached, the rest is dropped]\n",
            );
        }
        let len = data.len();
        drop(data);
        self.state.send_modify(|s| s.0 = len);
    }

    fn end(&self) {
        self.state.send_modify(|s| s.1 = true);
    }

    /// Everything kept so far.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        lock(&self.data).clone()
    }

    /// Streams the log from its start until the container ends or the receiver goes.
    pub(crate) fn follow(self: &Arc<Self>) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(64);
        let log = self.clone();
        tokio::spawn(async move {
            let mut state = log.state.subscribe();
            let mut sent = 0;
            loop {
                let (len, ended) = *state.borrow_and_update();
                if len > sent {
                    let chunk = Bytes::copy_from_slice(&lock(&log.data)[sent..len]);
                    sent = len;
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                    continue;
                }
                if ended {
                    return;
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }
}

/// Where a container's output goes.
#[derive(Debug, Clone)]
pub struct LogSink(Arc<LiveLog>);

impl LogSink {
    /// Appends output.
    pub fn write(&self, bytes: &[u8]) {
        self.0.append(bytes);
    }
}

/// A Pod handed to the kubelet when it was created.
#[derive(Debug, Clone)]
pub(crate) struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

fn pods() -> &'static ResourceKind {
    // a fixed entry of resources.rs
    resources::find("", "v1", "pods").unwrap_or_else(|| unreachable!("pods are served"))
}

fn secrets() -> &'static ResourceKind {
    resources::find("", "v1", "secrets").unwrap_or_else(|| unreachable!("secrets are served"))
}

fn now() -> String {
    format_time(jiff::Timestamp::now())
}

/// True when the kubelet runs this Pod: every container (and init container) has a
/// `command`, since no image entrypoint is known.
pub(crate) fn runs(pod: &Value, only_labelled: Option<&(String, String)>) -> bool {
    if let Some((key, value)) = only_labelled
        && pod
            .pointer("/metadata/labels")
            .and_then(|l| l.get(key))
            .and_then(Value::as_str)
            != Some(value.as_str())
    {
        return false;
    }
    let all_have_command = |field: &str| {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .is_none_or(|cs| {
                cs.iter().all(|c| {
                    c.get("command")
                        .and_then(Value::as_array)
                        .is_some_and(|a| !a.is_empty())
                })
            })
    };
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|cs| !cs.is_empty())
        && all_have_command("containers")
        && all_have_command("initContainers")
}

/// A Pod the kubelet has not looked at yet: Pending, unscheduled.
pub(crate) fn make_pending(pod: &mut Value) {
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("nodeName");
    }
    let statuses: Vec<Value> = container_names(pod, "containers")
        .into_iter()
        .map(|(name, image)| waiting(&name, &image, "ContainerCreating", ""))
        .collect();
    pod["status"] = json!({
        "phase": "Pending",
        "conditions": [],
        "containerStatuses": statuses,
        "qosClass": "Burstable",
    });
}

fn container_names(pod: &Value, field: &str) -> Vec<(String, String)> {
    pod.pointer(&format!("/spec/{field}"))
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default();
                    (s("name").to_owned(), s("image").to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn waiting(name: &str, image: &str, reason: &str, message: &str) -> Value {
    let mut state = json!({"reason": reason});
    if !message.is_empty() {
        state["message"] = json!(message);
    }
    json!({
        "name": name, "image": image, "imageID": "", "ready": false, "started": false,
        "restartCount": 0, "state": {"waiting": state},
    })
}

/// Runs the kubelet: each Pod handed over on `pods` gets a task of its own.
pub(crate) async fn run(
    shared: Arc<Shared>,
    options: KubeletOptions,
    mut pods: mpsc::UnboundedReceiver<PodRef>,
) {
    let options = Arc::new(options);
    while let Some(pod) = pods.recv().await {
        let (shared, options) = (shared.clone(), options.clone());
        tokio::spawn(async move {
            let label = format!("{}/{}", pod.namespace, pod.name);
            if let Err(message) = run_pod(&shared, &options, &pod).await {
                tracing::debug!(pod = %label, %message, "simulated kubelet: pod ended early");
            }
        });
    }
}

/// What the kubelet reads of a Pod: its spec, and the stop signal set on deletion.
struct Handle<'a> {
    shared: &'a Shared,
    pod: &'a PodRef,
    stop: watch::Receiver<bool>,
}

impl Handle<'_> {
    /// The Pod as stored, or `None` once it is gone (or replaced by another of its name).
    fn get(&self) -> Option<Value> {
        let store = lock(&self.shared.store);
        let obj = store
            .get(pods(), Some(&self.pod.namespace), &self.pod.name)
            .ok()?;
        (obj.pointer("/metadata/uid").and_then(Value::as_str) == Some(self.pod.uid.as_str()))
            .then_some(obj)
    }

    /// Changes the Pod's stored object (status, nodeName); false once it is gone.
    fn update(&self, change: impl FnOnce(&mut Value)) -> bool {
        lock(&self.shared.store).modify_pod(
            &self.pod.namespace,
            &self.pod.name,
            &self.pod.uid,
            change,
        )
    }

    fn deleted(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits until the Pod is deleted or the simulated cluster shuts down.
    async fn until_deleted(&mut self) {
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            if *self.stop.borrow_and_update() || *shutdown.borrow_and_update() {
                return;
            }
            tokio::select! {
                changed = self.stop.changed() => if changed.is_err() { return },
                changed = shutdown.changed() => if changed.is_err() { return },
            }
        }
    }
}

async fn run_pod(
    shared: &Arc<Shared>,
    options: &KubeletOptions,
    pod: &PodRef,
) -> Result<(), String> {
    let stop = lock(&shared.store)
        .pod_stop(&pod.namespace, &pod.name)
        .ok_or("deleted before the kubelet saw it")?;
    let mut handle = Handle { shared, pod, stop };
    let spec = handle.get().ok_or("gone")?;

    // scheduling
    if let Some(message) = unschedulable(&spec, options) {
        let now = now();
        handle.update(|p| {
            p["status"]["conditions"] = json!([{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message, "lastProbeTime": null, "lastTransitionTime": now,
            }]);
        });
        handle.until_deleted().await;
        return Ok(());
    }
    let started_at = now();
    let started = std::time::Instant::now();
    handle.update(|p| {
        p["spec"]["nodeName"] = json!(NODE_NAME);
        p["status"]["startTime"] = json!(started_at);
        p["status"]["hostIP"] = json!("10.0.0.10");
        p["status"]["conditions"] = json!([
            condition("PodScheduled", "True", &started_at),
            condition("Initialized", "False", &started_at),
            condition("Ready", "False", &started_at),
            condition("ContainersReady", "False", &started_at),
        ]);
    });
    let deadline = spec
        .pointer("/spec/activeDeadlineSeconds")
        .and_then(Value::as_u64)
        .map(|s| started + Duration::from_secs(s));

    // images
    let images = container_names(&spec, "initContainers")
        .into_iter()
        .chain(container_names(&spec, "containers"));
    for (name, image) in images {
        if options.unpullable_images.contains(&image) {
            let message = format!(
                "Back-off pulling image \"{image}\": ErrImagePull: failed to pull and unpack image \"{image}\": not found"
            );
            handle.update(|p| {
                set_container_status(
                    p,
                    &name,
                    waiting(&name, &image, "ImagePullBackOff", &message),
                )
            });
            tokio::select! {
                () = handle.until_deleted() => {}
                () = sleep_until(deadline) => fail_deadline(&handle),
            }
            return Ok(());
        }
    }

    // volumes
    let dir = tempfile::Builder::new()
        .prefix("kinvoke-sim-pod-")
        .tempdir_in(options.work_root.clone().unwrap_or_else(std::env::temp_dir))
        .map_err(|e| format!("volume directory: {e}"))?;
    // other users may pass through to a volume, not list the Pod's
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .map_err(|e| format!("volume directory: {e}"))?;
    let volumes = tokio::select! {
        made = make_volumes(&mut handle, &spec, dir.path()) => made,
        () = sleep_until(deadline) => { fail_deadline(&handle); return Ok(()) }
    };
    let volumes = match volumes {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(()),
        Err(message) => {
            fail_pod(&handle, "Failed", &message);
            return Ok(());
        }
    };

    // containers: init ones in order, then the one main container
    let inits = spec
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mains = spec
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if mains.len() != 1 {
        fail_pod(
            &handle,
            "Failed",
            "the simulated kubelet runs exactly one container per Pod",
        );
        return Ok(());
    }
    for c in &inits {
        // an init container that failed (or never ran) has set the Pod's end
        if run_container(&handle, options, c, &volumes, deadline, true).await != Some(0) {
            return Ok(());
        }
    }
    let now = now();
    handle.update(|p| {
        p["status"]["phase"] = json!("Running");
        p["status"]["podIP"] = json!("10.244.0.77");
        p["status"]["conditions"] = json!([
            condition("PodScheduled", "True", &now),
            condition("Initialized", "True", &now),
            condition("Ready", "True", &now),
            condition("ContainersReady", "True", &now),
        ]);
    });
    run_container(&handle, options, &mains[0], &volumes, deadline, false).await;
    drop(dir);
    Ok(())
}

/// The scheduler's message when the one node cannot take the Pod.
fn unschedulable(pod: &Value, options: &KubeletOptions) -> Option<String> {
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", NODE_NAME),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    labels.extend(options.node_labels.clone());
    let selector = pod.pointer("/spec/nodeSelector").and_then(Value::as_object);
    let matches = selector.is_none_or(|s| {
        s.iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    });
    const PREEMPTION: &str =
        "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.";
    if !matches {
        return Some(format!(
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. {PREEMPTION}"
        ));
    }
    let tolerations = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let untolerated = options
        .taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))?;
    Some(format!(
        "0/1 nodes are available: 1 node(s) had untolerated taint {{{}: {}}}. {PREEMPTION}",
        untolerated.key, untolerated.value
    ))
}

/// Kubernetes' toleration rule: an empty key with `Exists` tolerates everything; the
/// effect must match unless empty; `Exists` ignores the value, `Equal` (the default)
/// compares it.
fn tolerates(toleration: &Value, taint: &Taint) -> bool {
    let s = |k: &str| {
        toleration
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let operator = match s("operator") {
        "" => "Equal",
        op => op,
    };
    let effect_ok = s("effect").is_empty() || s("effect") == taint.effect;
    let key_ok = (s("key").is_empty() && operator == "Exists") || s("key") == taint.key;
    let value_ok = operator == "Exists" || s("value") == taint.value;
    effect_ok && key_ok && value_ok
}

fn condition(kind: &str, status: &str, now: &str) -> Value {
    json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": now})
}

fn set_container_status(pod: &mut Value, name: &str, status: Value) {
    let init = container_names(pod, "initContainers")
        .iter()
        .any(|(n, _)| n == name);
    let field = if init {
        "initContainerStatuses"
    } else {
        "containerStatuses"
    };
    let list = pod["status"][field].as_array().cloned().unwrap_or_default();
    let mut list: Vec<Value> = list
        .into_iter()
        .filter(|c| c.get("name").and_then(Value::as_str) != Some(name))
        .collect();
    list.push(status);
    pod["status"][field] = Value::Array(list);
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn fail_deadline(handle: &Handle<'_>) {
    fail_pod(
        handle,
        "DeadlineExceeded",
        "Pod was active on the node longer than the specified deadline",
    );
}

fn fail_pod(handle: &Handle<'_>, reason: &str, message: &str) {
    handle.update(|p| {
        p["status"]["phase"] = json!("Failed");
        p["status"]["reason"] = json!(reason);
        p["status"]["message"] = json!(message);
    });
}

/// A volume made for a Pod.
struct Volume {
    /// Its directory on this host.
    path: PathBuf,
    /// Secret volumes are always mounted read-only.
    read_only: bool,
}

/// The Pod's volumes, made below `dir`: name → volume. `Ok(None)` when the Pod was
/// deleted while waiting for a Secret.
async fn make_volumes(
    handle: &mut Handle<'_>,
    pod: &Value,
    dir: &Path,
) -> Result<Option<BTreeMap<String, Volume>>, String> {
    let mut made = BTreeMap::new();
    let volumes = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, v) in volumes.iter().enumerate() {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let path = dir.join(format!("v{i}"));
        std::fs::create_dir(&path).map_err(|e| format!("volume \"{name}\": {e}"))?;
        // the Pod's alone (the runtime gives it to the container's user)
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("volume \"{name}\": {e}"))?;
        if v.get("emptyDir").is_some() {
        } else if let Some(secret) = v.get("secret") {
            let secret_name = secret
                .get("secretName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(data) = wait_for_secret(handle, secret_name).await else {
                return Ok(None);
            };
            let default_mode = secret
                .get("defaultMode")
                .and_then(Value::as_u64)
                .unwrap_or(0o644);
            let items: Vec<(String, String, u64)> =
                match secret.get("items").and_then(Value::as_array) {
                    Some(items) => items
                        .iter()
                        .map(|it| {
                            let s = |k: &str| {
                                it.get(k)
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            (
                                s("key"),
                                s("path"),
                                it.get("mode")
                                    .and_then(Value::as_u64)
                                    .unwrap_or(default_mode),
                            )
                        })
                        .collect(),
                    None => data
                        .keys()
                        .map(|k| (k.clone(), k.clone(), default_mode))
                        .collect(),
                };
            for (key, rel, mode) in items {
                let content = data
                    .get(&key)
                    .ok_or_else(|| format!("MountVolume.SetUp failed for volume \"{name}\": references non-existent secret key: {key}"))?;
                if Path::new(&rel)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!(
                        "volume \"{name}\": item path \"{rel}\" must be relative without \"..\""
                    ));
                }
                let file = path.join(&rel);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("volume \"{name}\": {e}"))?;
                }
                std::fs::write(&file, content).map_err(|e| format!("volume \"{name}\": {e}"))?;
                let mode = u32::try_from(mode & 0o777).unwrap_or(0o644);
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("volume \"{name}\": {e}"))?;
            }
        } else {
            return Err(format!(
                "volume \"{name}\": the simulated kubelet supports emptyDir and secret volumes only"
            ));
        }
        made.insert(
            name,
            Volume {
                path,
                read_only: v.get("secret").is_some(),
            },
        );
    }
    Ok(Some(made))
}

/// The Secret's decoded data once it exists; `None` when the Pod is deleted first.
async fn wait_for_secret(handle: &mut Handle<'_>, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    loop {
        let found = lock(&handle.shared.store)
            .get(secrets(), Some(&handle.pod.namespace), name)
            .ok();
        if let Some(secret) = found {
            let data = secret
                .get("data")
                .and_then(Value::as_object)
                .map(|d| {
                    d.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                BASE64
                                    .decode(v.as_str().unwrap_or_default())
                                    .unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Some(data);
        }
        if handle.deleted() {
            return None;
        }
        // the store has no per-object notification: look again shortly (a simulation)
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = handle.until_deleted() => return None,
        }
    }
}

/// Runs one container; its exit code, or `None` when it did not complete (deleted,
/// deadline, failed to start). Sets its status, and the Pod's phase when it ends the Pod.
async fn run_container(
    handle: &Handle<'_>,
    options: &KubeletOptions,
    spec: &Value,
    volumes: &BTreeMap<String, Volume>,
    deadline: Option<std::time::Instant>,
    init: bool,
) -> Option<i32> {
    let s = |k: &str| {
        spec.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (name, image) = (s("name"), s("image"));
    let strings = |k: &str| -> Vec<String> {
        spec.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let argv: Vec<String> = strings("command")
        .into_iter()
        .chain(strings("args"))
        .collect();
    let env = spec
        .get("env")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some((
                        e.get("name")?.as_str()?.to_owned(),
                        e.get("value")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut mounts = Vec::new();
    for m in spec
        .get("volumeMounts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let volume = m.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some(made) = volumes.get(volume) else {
            fail_pod(
                handle,
                "Failed",
                &format!("container \"{name}\" mounts unknown volume \"{volume}\""),
            );
            return None;
        };
        let target = PathBuf::from(
            m.get("mountPath")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        // as container runtimes do: the kernel's file systems are the runtime's
        if ["/proc", "/sys", "/dev"]
            .iter()
            .any(|reserved| target.starts_with(reserved))
        {
            fail_pod(
                handle,
                "Failed",
                &format!(
                    "container \"{name}\" mounts volume \"{volume}\" at {}, where the kernel's file systems are",
                    target.display()
                ),
            );
            return None;
        }
        mounts.push(VolumeMount {
            source: made.path.clone(),
            target,
            read_only: m.get("readOnly").and_then(Value::as_bool).unwrap_or(false)
                || made.read_only,
        });
    }
    let log = LiveLog::new();
    lock(&handle.shared.store).set_live_log(
        &handle.pod.namespace,
        &handle.pod.name,
        &name,
        log.clone(),
    );
    let started_at = now();
    handle.update(|p| {
        set_container_status(
            p,
            &name,
            json!({
                "name": name, "image": image, "imageID": "", "ready": !init, "started": true,
                "restartCount": 0, "containerID": format!("sim://{}/{name}", handle.pod.uid),
                "state": {"running": {"startedAt": started_at}},
            }),
        );
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let container = Container {
        pod: format!("{}/{}", handle.pod.namespace, handle.pod.name),
        name: name.clone(),
        argv,
        env,
        working_dir: spec
            .get("workingDir")
            .and_then(Value::as_str)
            .map(PathBuf::from),
        mounts,
        output: LogSink(log.clone()),
        stop: stop_rx,
    };
    let mut running = options.runtime.run(container);
    let mut gone = Handle {
        shared: handle.shared,
        pod: handle.pod,
        stop: handle.stop.clone(),
    };
    let mut past_deadline = false;
    let exit = tokio::select! {
        exit = &mut running => exit,
        () = gone.until_deleted() => {
            let _ = stop_tx.send(true);
            running.await
        }
        () = sleep_until(deadline) => {
            // as the kubelet: the Pod is failed first, then its containers are killed
            past_deadline = true;
            fail_deadline(handle);
            let _ = stop_tx.send(true);
            running.await
        }
    };
    log.end();
    let finished_at = now();
    let (code, reason, message) = match &exit {
        ContainerExit::Exited(0) => (0, "Completed", String::new()),
        ContainerExit::Exited(code) => (*code, "Error", String::new()),
        ContainerExit::Failed(message) => (128, "StartError", message.clone()),
    };
    handle.update(|p| {
        let mut terminated = json!({
            "exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at,
            "containerID": format!("sim://{}/{name}", handle.pod.uid),
        });
        if !message.is_empty() {
            terminated["message"] = json!(message);
        }
        set_container_status(
            p,
            &name,
            json!({
                "name": name, "image": image, "imageID": "", "ready": false, "started": false,
                "restartCount": 0, "containerID": format!("sim://{}/{name}", handle.pod.uid),
                "state": {"terminated": terminated},
            }),
        );
    });
    if past_deadline {
        fail_deadline(handle);
        return None;
    }
    if handle.deleted() {
        return None;
    }
    let ended_pod = !init || code != 0;
    if ended_pod {
        let phase = if code == 0 && matches!(exit, ContainerExit::Exited(_)) {
            "Succeeded"
        } else {
            "Failed"
        };
        let now = now();
        handle.update(|p| {
            p["status"]["phase"] = json!(phase);
            p["status"]["conditions"] = json!([
                condition("PodScheduled", "True", &now),
                condition("Initialized", if init { "False" } else { "True" }, &now),
                condition("Ready", "False", &now),
                condition("ContainersReady", "False", &now),
            ]);
        });
    }
    match exit {
        ContainerExit::Exited(code) => Some(code),
        ContainerExit::Failed(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.into(),
            effect: effect.into(),
        }
    }

    #[test]
    fn tolerations_follow_kubernetes_rules() {
        let t = taint("dedicated", "ops", "NoSchedule");
        let yes = [
            json!({"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}),
            json!({"key": "dedicated", "value": "ops"}),
            json!({"key": "dedicated", "operator": "Exists"}),
            json!({"operator": "Exists"}),
        ];
        for tol in yes {
            assert!(tolerates(&tol, &t), "{tol}");
        }
        let no = [
            json!({"key": "dedicated", "value": "dev"}),
            json!({"key": "other", "operator": "Exists"}),
            json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}),
        ];
        for tol in no {
            assert!(!tolerates(&tol, &t), "{tol}");
        }
    }

    struct Nothing;
    impl ContainerRuntime for Nothing {
        fn run(&self, _: Container) -> Pin<Box<dyn Future<Output = ContainerExit> + Send>> {
            Box::pin(async { ContainerExit::Exited(0) })
        }
    }

    #[test]
    fn the_scheduler_message_names_the_selector_or_the_taint() {
        let options = KubeletOptions::new(Arc::new(Nothing)).with_taint(
            "CriticalAddonsOnly",
            "true",
            "NoSchedule",
        );
        let pod = json!({"spec": {"nodeSelector": {"pool": "ops"}}});
        let m = unschedulable(&pod, &options).unwrap();
        assert!(
            m.starts_with(
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            ),
            "{m}"
        );
        let pod = json!({"spec": {}});
        let m = unschedulable(&pod, &options).unwrap();
        assert!(
            m.contains("untolerated taint {CriticalAddonsOnly: true}"),
            "{m}"
        );
        let pod = json!({"spec": {"tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}], "nodeSelector": {"kubernetes.io/os": "linux"}}});
        assert_eq!(unschedulable(&pod, &options), None);
    }

    #[test]
    fn only_pods_whose_containers_all_have_a_command_are_run() {
        let with_command = json!({"spec": {"containers": [{"name": "c", "command": ["true"]}]}});
        assert!(runs(&with_command, None));
        let image_only = json!({"spec": {"containers": [{"name": "c", "image": "nginx"}]}});
        assert!(!runs(&image_only, None));
        let init_without = json!({"spec": {"containers": [{"name": "c", "command": ["true"]}], "initContainers": [{"name": "i"}]}});
        assert!(!runs(&init_without, None));
        assert!(!runs(&json!({"spec": {}}), None));
        let only = ("owner".to_owned(), "kinvoke".to_owned());
        let labelled = json!({"metadata": {"labels": {"owner": "kinvoke"}}, "spec": {"containers": [{"name": "c", "command": ["true"]}]}});
        assert!(runs(&labelled, Some(&only)));
        assert!(!runs(&with_command, Some(&only)));
    }
}
