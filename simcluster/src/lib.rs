//! `kinvoke-simcluster`: a **simulated** Kubernetes API server — a test double, not a
//! Kubernetes. It speaks enough of the real REST API over HTTPS that the real `kubectl`
//! (1.32–1.37) and `helm` (3.17, 4.1) binaries and kube-rs work against it, and it records
//! every request it receives (for example the `Impersonate-*` headers a relay sends).
//!
//! A request goes: TLS → read body → authenticate (bearer token, impersonation) → route →
//! authorize (deny list) → serve from the in-memory store → record.
//!
//! Layout:
//! - `server`: certificates, rustls (ring), the accept loop, hyper.
//! - `handler`: routing, verbs, content negotiation (Table, aggregated discovery), watches.
//! - `auth`: tokens, impersonation, the deny list. `error`: the one mapping to `Status`.
//! - `store`: objects, resourceVersions, the event history watches resume from.
//! - `resources`: what is served, and the discovery and OpenAPI v3 documents.
//! - `patch`, `selector`, `table`, `proto`: pure helpers (patch types, selectors, server-side
//!   printing, protobuf request bodies).
//!
//! What it simulates, honestly:
//! - Served: namespaces, pods (+ `log`, `status`), configmaps, secrets, services,
//!   serviceaccounts, events, apps/v1 deployments and replicasets; SelfSubjectReview,
//!   SelfSubjectAccessReview and SelfSubjectRulesReview. Discovery (legacy and aggregated
//!   v2), OpenAPI v3 (no schemas: only what `kubectl apply` needs to let the server validate
//!   fields), `/version`. Anything else is 404 NotFound.
//! - No scheduler, kubelet or controllers by default: a Pod is `Running` with every
//!   container ready as soon as it is created (with [`SimOptions::kubelet`], a simulated
//!   kubelet schedules and runs Pods instead: see [`KubeletOptions`] and the `kubelet`
//!   module); a Deployment reports its replicas ready but creates no
//!   ReplicaSets or Pods; deletes take effect at once (no graceful termination, no
//!   finalizers); deleting a namespace deletes its objects at once. Pod logs are two
//!   deterministic lines. A test can script Pods with a [`PodRunner`]: it decides, when a
//!   Pod is created, whether it completes at once (Succeeded/Failed) and with which logs.
//! - No exec/attach/port-forward: connection upgrades get 400 "… not supported by the
//!   simulated cluster".
//! - Server-side apply merges the applied object and removes fields the same manager
//!   applied before but no longer does; field ownership conflicts are not detected.
//! - Authorization is a deny list: every authenticated user may do everything unless
//!   [`SimCluster::deny_user`] names them.
//! - Answers are always JSON (clients accept it even when they prefer protobuf). Protobuf
//!   request bodies are decoded for Secret, ConfigMap, Namespace, Service, ServiceAccount
//!   and the reviews; any other kind (e.g. `kubectl create deployment`, which sends a
//!   protobuf Deployment) gets 415 with a message asking for JSON.
//! - Selectors: label selectors in full syntax; field selectors match any dotted JSON path
//!   with `=`, `==`, `!=` (kube-apiserver allows only some fields per kind).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::sync::watch;

mod auth;
mod error;
mod handler;
mod kubelet;
mod patch;
mod proto;
mod resources;
mod seed;
mod selector;
mod server;
mod store;
mod table;

pub use auth::{ADMIN_GROUP, ADMIN_USER, AUTHENTICATED_GROUP};
pub use kubelet::{
    Container, ContainerExit, ContainerRuntime, KubeletOptions, LogSink, MAX_LOG_BYTES, NODE_NAME,
    Taint, VolumeMount,
};
pub use server::StartError;

use server::{Shared, lock};

/// The server version the simulated cluster reports (`kubectl version` prints it).
pub const SERVER_GIT_VERSION: &str = "v1.35.2+kinvoke-sim";
/// The minor version in [`SERVER_GIT_VERSION`].
pub(crate) const SERVER_MINOR: &str = "35";

/// An extra, non-privileged identity the simulated cluster accepts by bearer token.
#[derive(Clone)]
pub struct UserToken {
    /// The bearer token.
    pub token: String,
    /// The user name it authenticates as.
    pub username: String,
    /// Its groups (`system:authenticated` is added).
    pub groups: Vec<String>,
}

impl std::fmt::Debug for UserToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserToken")
            .field("token", &"[redacted]")
            .field("username", &self.username)
            .field("groups", &self.groups)
            .finish()
    }
}

/// How a Pod ends, as decided by a [`PodRunner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOutcome {
    /// Every container's exit code: 0 makes the Pod `Succeeded`, anything else `Failed`.
    pub exit_code: i32,
    /// What `GET .../pods/NAME/log` returns for it.
    pub logs: String,
}

/// Scripts Pods: called with each new Pod (as JSON) when it is created; `Some` makes the Pod
/// complete at once with that outcome, `None` leaves it Running. It runs under the store's
/// lock, so it must not call back into the simulated cluster. This is how a test stands in
/// for the command a real Pod would run (nothing is executed).
#[derive(Clone)]
pub struct PodRunner(Arc<PodRunnerFn>);

type PodRunnerFn = dyn Fn(&serde_json::Value) -> Option<PodOutcome> + Send + Sync;

impl PodRunner {
    /// Wraps `f`.
    pub fn new(
        f: impl Fn(&serde_json::Value) -> Option<PodOutcome> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn run(&self, pod: &serde_json::Value) -> Option<PodOutcome> {
        (self.0)(pod)
    }
}

impl std::fmt::Debug for PodRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodRunner(..)")
    }
}

/// How to start a simulated cluster.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Create the demo objects (namespace demo; coredns and kube-proxy Pods in kube-system;
    /// two web Pods and a ConfigMap in demo) on top of what every cluster has (namespaces
    /// default and kube-system, the `kubernetes` Service). Default: true.
    pub seed_demo_objects: bool,
    /// Users that get 403 Forbidden on everything but discovery and self-reviews, from the
    /// start. Default: none. See also [`SimCluster::deny_user`].
    pub denied_users: Vec<String>,
    /// Extra non-privileged identities (they cannot impersonate). Default: none.
    pub user_tokens: Vec<UserToken>,
    /// How many requests [`SimCluster::requests`] keeps (the oldest are dropped first), so
    /// a long-running sandbox does not grow without bound. Default: 10,000.
    pub max_recorded_requests: usize,
    /// Decides how new Pods end; without it every Pod stays Running. Default: none.
    pub pod_runner: Option<PodRunner>,
    /// Runs Pods whose containers have a `command` through a simulated kubelet (see
    /// [`KubeletOptions`]); a Pod the [`PodRunner`] completes is not run. Default: off.
    pub kubelet: Option<KubeletOptions>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            seed_demo_objects: true,
            denied_users: Vec::new(),
            user_tokens: Vec::new(),
            max_recorded_requests: 10_000,
            pod_runner: None,
            kubelet: None,
        }
    }
}

impl SimOptions {
    /// A cluster without the demo objects: only what every fresh cluster has (namespaces
    /// `default` and `kube-system`, the `kubernetes` Service).
    pub fn empty() -> Self {
        Self {
            seed_demo_objects: false,
            ..Self::default()
        }
    }

    /// Sets the [`PodRunner`] that decides how new Pods end.
    pub fn with_pod_runner(
        mut self,
        f: impl Fn(&serde_json::Value) -> Option<PodOutcome> + Send + Sync + 'static,
    ) -> Self {
        self.pod_runner = Some(PodRunner::new(f));
        self
    }

    /// Turns the simulated kubelet on.
    pub fn with_kubelet(mut self, kubelet: KubeletOptions) -> Self {
        self.kubelet = Some(kubelet);
        self
    }

    /// Adds a user to the deny list.
    pub fn with_denied_user(mut self, user: impl Into<String>) -> Self {
        self.denied_users.push(user.into());
        self
    }

    /// Adds a non-privileged identity authenticated by `token`.
    pub fn with_user_token(
        mut self,
        token: impl Into<String>,
        username: impl Into<String>,
        groups: &[&str],
    ) -> Self {
        self.user_tokens.push(UserToken {
            token: token.into(),
            username: username.into(),
            groups: groups.iter().map(|g| (*g).to_string()).collect(),
        });
        self
    }
}

/// One request as the simulated cluster received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The URL path, e.g. `/api/v1/namespaces/demo/pods`.
    pub path: String,
    /// The raw (still percent-encoded) query string, if any.
    pub query: Option<String>,
    /// Every header: lower-case name → all values, in the order received. Includes
    /// `authorization` verbatim, so tests can check which token a relay used.
    pub headers: std::collections::BTreeMap<String, Vec<String>>,
    /// The request body's length in bytes.
    pub body_len: usize,
    /// The effective (impersonated, if any) user; `None` when authentication failed.
    pub user: Option<String>,
    /// The effective user's groups.
    pub groups: Vec<String>,
    /// The HTTP status answered.
    pub status: u16,
}

impl RecordedRequest {
    /// All values of header `name` (any case).
    pub fn header(&self, name: &str) -> &[String] {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map_or(&[], Vec::as_slice)
    }
}

/// A kubeconfig YAML for `server` (an `https://` URL) trusting `ca_pem`, authenticating
/// with `token`; its only context is named `sim`. Use it to point a client at the
/// simulated cluster, or at a relay in front of it with a different CA and token.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sim-user\n  user:\n    token: {token}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim-user\n    namespace: default\ncurrent-context: sim\npreferences: {{}}\n",
        ca = BASE64.encode(ca_pem),
    )
}

enum Runner {
    /// Serving on the caller's runtime.
    Task(tokio::task::JoinHandle<()>),
    /// Serving on a dedicated thread with its own runtime.
    Thread(std::thread::JoinHandle<()>),
    Stopped,
}

/// A running simulated Kubernetes API server (a test double) on `https://127.0.0.1:PORT`.
/// Stops on [`SimCluster::shutdown`] or when dropped.
pub struct SimCluster {
    addr: SocketAddr,
    ca_pem: String,
    admin_token: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    runner: Runner,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("url", &self.url())
            .field("admin_token", &"[redacted]")
            .finish_non_exhaustive()
    }
}

fn random_token() -> Result<String, StartError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| StartError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Everything `start` prepares before serving: no task is running yet.
struct Prepared {
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    ca_pem: String,
    admin_token: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    kubelet: Option<(
        KubeletOptions,
        tokio::sync::mpsc::UnboundedReceiver<kubelet::PodRef>,
    )>,
}

impl Prepared {
    /// Starts the simulated kubelet, if it is on, on the current runtime.
    fn start_kubelet(&mut self) {
        if let Some((options, pods)) = self.kubelet.take() {
            tokio::spawn(kubelet::run(self.shared.clone(), options, pods));
        }
    }
}

async fn prepare(opts: SimOptions) -> Result<Prepared, StartError> {
    let pki = server::make_pki()?;
    let admin_token = random_token()?;
    let mut tokens = vec![auth::TokenIdentity {
        token: admin_token.clone(),
        user: auth::UserInfo {
            username: ADMIN_USER.to_string(),
            uid: None,
            groups: vec![ADMIN_GROUP.to_string(), AUTHENTICATED_GROUP.to_string()],
            extra: Default::default(),
        },
        may_impersonate: true,
    }];
    for t in opts.user_tokens {
        let mut groups = t.groups;
        if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
            groups.push(AUTHENTICATED_GROUP.to_string());
        }
        tokens.push(auth::TokenIdentity {
            token: t.token,
            user: auth::UserInfo {
                username: t.username,
                uid: None,
                groups,
                extra: Default::default(),
            },
            may_impersonate: false,
        });
    }
    let mut store = store::Store::new();
    store.set_pod_runner(opts.pod_runner);
    let kubelet = opts.kubelet.map(|options| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        store.set_kubelet(tx, options.only_labelled.clone());
        (options, rx)
    });
    // the seeded objects are fixed and valid: a failure here is a bug in seed.rs
    if let Err(e) = seed::seed(&mut store, opts.seed_demo_objects) {
        tracing::error!(error = %e, "simcluster: seeding the initial objects failed");
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        store: Mutex::new(store),
        tokens,
        denied: Mutex::new(opts.denied_users),
        requests: Mutex::new(std::collections::VecDeque::new()),
        max_recorded_requests: opts.max_recorded_requests,
        shutdown: shutdown_rx,
    });
    Ok(Prepared {
        listener,
        tls: pki.tls,
        addr,
        ca_pem: pki.ca_pem,
        admin_token,
        shared,
        shutdown,
        kubelet,
    })
}

impl SimCluster {
    /// Binds 127.0.0.1:0 with a fresh rcgen CA and server certificate (SANs 127.0.0.1,
    /// localhost) and serves on the current tokio runtime.
    pub async fn start(opts: SimOptions) -> anyhow::Result<SimCluster> {
        let mut p = prepare(opts).await?;
        p.start_kubelet();
        let task = tokio::spawn(server::accept_loop(p.listener, p.tls, p.shared.clone()));
        Ok(SimCluster {
            addr: p.addr,
            ca_pem: p.ca_pem,
            admin_token: p.admin_token,
            shared: p.shared,
            shutdown: p.shutdown,
            runner: Runner::Task(task),
        })
    }

    /// Same as [`SimCluster::start`], on a dedicated thread with its own runtime (for
    /// synchronous tests). Returns once the listener is bound.
    pub fn spawn(opts: SimOptions) -> anyhow::Result<SimCluster> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kinvoke-simcluster".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StartError::Thread(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match prepare(opts).await {
                        Ok(mut p) => {
                            p.start_kubelet();
                            let Prepared {
                                listener,
                                tls,
                                addr,
                                ca_pem,
                                admin_token,
                                shared,
                                shutdown,
                                kubelet: _,
                            } = p;
                            let serving = server::accept_loop(listener, tls, shared.clone());
                            let parts = (addr, ca_pem, admin_token, shared, shutdown);
                            if ready_tx.send(Ok(parts)).is_ok() {
                                serving.await;
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                // dropping the runtime here ends every connection and watch task
            })
            .map_err(|e| StartError::Thread(e.to_string()))?;
        let (addr, ca_pem, admin_token, shared, shutdown) = ready_rx
            .recv()
            .map_err(|_| StartError::Thread("the server thread exited before binding".into()))??;
        Ok(SimCluster {
            addr,
            ca_pem,
            admin_token,
            shared,
            shutdown,
            runner: Runner::Thread(thread),
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The bearer token of the privileged identity [`ADMIN_USER`] (groups
    /// [`ADMIN_GROUP`], `system:authenticated`), which may impersonate. Random per instance.
    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// A kubeconfig (YAML) for the admin identity: cluster with `certificate-authority-data`,
    /// user with the admin token, one context `sim` (namespace `default`).
    pub fn admin_kubeconfig(&self) -> String {
        kubeconfig_yaml(&self.url(), &self.ca_pem, &self.admin_token)
    }

    /// The requests received so far (at most [`SimOptions::max_recorded_requests`], the
    /// latest), in the order they were answered; a watch is recorded when its stream starts.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// Creates namespace `name` (as an administrator would); one that exists is kept.
    pub fn create_namespace(&self, name: &str) -> Result<(), String> {
        let Some(kind) = resources::find("", "v1", "namespaces") else {
            return Err("namespaces are not served".to_owned());
        };
        let object = serde_json::json!({"metadata": {"name": name}});
        match lock(&self.shared.store).create(kind, None, object, false) {
            Ok(_) | Err(error::ApiError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The objects of core (`v1`) resource `plural` in `namespace` (e.g. `"pods"`,
    /// `"kinvoke-command"`), as stored, in name order; empty for an unknown resource.
    pub fn objects(&self, plural: &str, namespace: &str) -> Vec<serde_json::Value> {
        let Some(kind) = resources::find("", "v1", plural) else {
            return Vec::new();
        };
        let scope = store::Scope::new(kind, Some(namespace), selector::Selectors::default());
        lock(&self.shared.store)
            .list(&scope, None, None)
            .map(|page| page.items)
            .unwrap_or_default()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// From now on, the effective user `user` gets 403 Forbidden on everything except
    /// discovery, `/version`, OpenAPI and the self-reviews (whose access reviews answer
    /// `allowed: false`).
    pub fn deny_user(&self, user: &str) {
        let mut denied = lock(&self.shared.denied);
        if !denied.iter().any(|d| d == user) {
            denied.push(user.to_string());
        }
    }

    /// Stops serving: the listener closes and open connections and watches end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        match std::mem::replace(&mut self.runner, Runner::Stopped) {
            Runner::Task(task) => {
                let _ = task.await;
            }
            Runner::Thread(thread) => {
                // joining blocks: do it off the async worker
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            Runner::Stopped => {}
        }
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        match std::mem::replace(&mut self.runner, Runner::Stopped) {
            Runner::Task(task) => task.abort(),
            Runner::Thread(thread) => {
                let _ = thread.join();
            }
            Runner::Stopped => {}
        }
    }
}
