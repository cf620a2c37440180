//! kinvoke-gateway: runs kubectl/helm commands next to a private cluster on behalf of
//! authenticated callers, and keeps their results.
//!
//! A call flows: accept → CIDR allowlist and PROXY protocol (`ingress`, `access::cidr`,
//! `access::proxy_protocol`) → TLS → identify the caller (`authn`) → authorize
//! (`access::authz`, through `guard`) → validate the request (`command`, `exec::argv`) →
//! run it (`runner`, `exec`) in the `sandbox` → keep the result (`store`); every decision
//! is recorded (`audit`). Commands reach their cluster only through the `relay`, as their
//! caller. `service` holds the thin tonic services and `status` maps errors to gRPC
//! codes. `config` parses the TOML file once; `dev` and `pki` set up a local development
//! gateway with its own certificates. ARCHITECTURE.md has the whole module map.

pub mod access;
pub mod admin;
pub mod admission;
pub mod audit;
pub mod authn;
pub mod breakglass;
pub mod check;
pub mod command;
pub mod config;
pub mod connection;
pub mod dev;
pub mod exec;
pub mod guard;
pub mod hex;
pub mod ingress;
pub mod metrics;
pub mod outbound_https;
pub mod pki;
pub mod relay;
pub mod runner;
pub mod sandbox;
pub mod service;
pub mod sim_kubelet;
pub mod status;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kinvoke_proto::v1::access_service_server::AccessServiceServer;
use kinvoke_proto::v1::command_service_server::CommandServiceServer;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditEvent};
use crate::authn::Authenticator;
use crate::authn::jwt::Issuers;
use crate::breakglass::BreakGlass;
use crate::config::Config;
use crate::exec::Executors;
use crate::exec::local::LocalExecutor;
use crate::exec::pod::PodExecutor;
use crate::guard::{ClusterInfo, Guard, GuardSettings};
use crate::ingress::BoundListener;
use crate::relay::Relay;
use crate::runner::{Runner, RunnerSettings};
use crate::sandbox::launch::Sandbox;
use crate::service::in_flight::InFlightLimit;
use crate::service::transport_refusals::TransportRefusals;
use crate::service::{AccessApi, CommandApi};
use crate::store::Store;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The result store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A listener could not be set up.
    #[error(transparent)]
    Ingress(#[from] ingress::IngressError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A token issuer could not be set up (e.g. its JWKS file).
    #[error(transparent)]
    Issuer(#[from] authn::jwt::TokenError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
    /// A cluster's API server settings are unusable.
    #[error("{0}")]
    Cluster(String),
    /// The relay could not start.
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    /// A cluster wants its commands sandboxed and this host cannot sandbox them.
    #[error(
        "cannot sandbox commands on this host: {0}; fix the host, or set sandbox = \"off\" on the \
         clusters whose commands may then read this gateway's secrets"
    )]
    Sandbox(String),
    /// Server reflection could not be built.
    #[error("server reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The admin listener could not listen.
    #[error("the admin listener cannot listen on {address}: {source}")]
    Admin {
        /// `[admin] address`.
        address: std::net::SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// Another gateway process uses the same state directory.
    #[error(
        "another kinvoke-gateway process uses the state directory {0} (it holds {0}/gateway.lock); \
         stop it, or give this gateway a state directory of its own"
    )]
    StateDirInUse(String),
    /// The state directory cannot be created or locked.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// What `/readyz` says for the audit log's and the store's health.
fn readiness(audit_up: bool, store_up: bool) -> admin::Readiness {
    match (audit_up, store_up) {
        (true, true) => None,
        (false, _) => Some("the audit log cannot be written".to_owned()),
        (true, false) => Some("the result store cannot be written".to_owned()),
    }
}

/// What `/readyz` says once shutdown has begun.
const SHUTTING_DOWN: &str = "the gateway is shutting down";

/// Takes the state directory for this process: an exclusive lock on
/// `STATE_DIR/gateway.lock`, held until the process ends, so a second gateway on the
/// same directory (whose store, audit log and command directories would mix with this
/// one's) refuses to start.
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, GatewayError> {
    let io = |source| GatewayError::StateDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("gateway.lock"))
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => {
                GatewayError::StateDirInUse(dir.display().to_string())
            }
            other => io(std::io::Error::from(other)),
        },
    )
}

/// Largest HTTP/2 header list a request may send, in bytes (hyper's default is 16 KiB).
const MAX_HEADER_LIST_BYTES: u32 = 1024 * 1024 + 64 * 1024;

/// Largest message the health, reflection and access services read, in bytes (their
/// requests are a few names; a break-glass justification is the longest).
const SMALL_MESSAGE_BYTES: usize = 64 * 1024;

/// Streams one connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 128;

/// How long connections may take to close after commands drained at shutdown.
const CONNECTION_DRAIN: Duration = Duration::from_secs(10);

/// Serves on already bound listeners until `shutdown` resolves, then stops accepting,
/// lets running commands finish for the configured grace and cancels the rest.
pub async fn run(
    config: Config,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    Gateway::open(config)
        .await?
        .serve(listeners, shutdown)
        .await
}

/// A gateway whose state (result store, audit log, grants) is open, not yet serving:
/// open it before announcing readiness, so a bad store or audit path fails first.
pub struct Gateway {
    config: Arc<Config>,
    /// This process's hold on the state directory.
    _state_lock: nix::fcntl::Flock<std::fs::File>,
    audit: Audit,
    guard: Arc<Guard>,
    runner: Arc<Runner>,
    breakglass: Arc<BreakGlass>,
    relay: Option<Arc<Relay>>,
    /// The admin listener, once [`Gateway::bind_admin`] bound it.
    admin: Option<tokio::net::TcpListener>,
}

impl Gateway {
    /// Binds the admin listener (`[admin] address`), if the config has one, and returns
    /// its address; serving starts with [`Gateway::serve`].
    pub async fn bind_admin(&mut self) -> Result<Option<std::net::SocketAddr>, GatewayError> {
        let Some(settings) = self.config.admin else {
            return Ok(None);
        };
        let listener = admin::bind(&settings)
            .await
            .map_err(|source| GatewayError::Admin {
                address: settings.address,
                source,
            })?;
        let address = listener
            .local_addr()
            .map_err(|source| GatewayError::Admin {
                address: settings.address,
                source,
            })?;
        self.admin = Some(listener);
        Ok(Some(address))
    }

    /// Opens the store and audit log, loads grants and token issuers.
    pub async fn open(config: Config) -> Result<Self, GatewayError> {
        Self::open_with_launcher(config, None).await
    }

    /// [`Gateway::open`] whose command sandbox starts `launcher` (a `kinvoke-gateway`
    /// executable) instead of this process's own executable: for a gateway run inside
    /// another program, such as a test harness. `None` = this executable.
    pub async fn open_with_launcher(
        config: Config,
        launcher: Option<std::path::PathBuf>,
    ) -> Result<Self, GatewayError> {
        let config = Arc::new(config);
        // first: a second gateway on this directory must not mark this one's commands
        // failed or remove their directories
        let state_lock = lock_state_dir(&config.state_dir)?;
        let (store, recovered) = match &config.store.postgres {
            Some(settings) => Store::connect_postgres(settings).await?,
            None => Store::open(&config.store.path)?,
        };
        if recovered > 0 {
            tracing::warn!(
                records = recovered,
                "marked commands left running by a previous gateway process as failed"
            );
        }
        for warning in &config.warnings {
            tracing::warn!("config: {warning}");
        }
        let authenticator = Authenticator::new(
            config.authn.mtls_rules.clone(),
            config.authn.static_tokens.clone(),
            Issuers::new(config.authn.issuers.clone())?,
        );
        let audit = Audit::open(&config.audit).map_err(GatewayError::Audit)?;
        audit.record(AuditEvent::GatewayStarted {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_sha256: config.digest.clone(),
        });
        let breakglass = BreakGlass::load(
            Arc::new(config.policy.clone()),
            config.webhook.as_ref(),
            store.clone(),
            audit.clone(),
        )
        .await?;
        let guard = Arc::new(Guard::new(
            GuardSettings {
                policy: config.policy.clone(),
                clusters: config
                    .clusters
                    .iter()
                    .map(|c| ClusterInfo {
                        name: c.name.clone(),
                        description: c.description.clone(),
                        disable_run_command: c.disable_run_command,
                    })
                    .collect(),
                requests_per_second: config.limits.requests_per_second_per_principal,
                request_burst: config.limits.request_burst_per_principal,
            },
            authenticator,
            audit.clone(),
            breakglass.clone(),
        ));
        let sandbox = open_sandbox(&config, launcher).await?;
        let executor =
            LocalExecutor::new(config.limits.kill_grace, None, sandbox).owned_by(&config.state_dir);
        match executor.remove_leftovers().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                directories = n,
                "removed the command directories a previous gateway process left behind"
            ),
            Err(err) => {
                tracing::warn!(%err, "could not remove the command directories a previous gateway process left behind")
            }
        }
        let clusters = kube_clients(&config).await?;
        let mut pods = HashMap::new();
        for cluster in &config.clusters {
            let Some(settings) = &cluster.pod else {
                continue;
            };
            // the config requires an API server for a pod cluster; never fall back to
            // running its commands here
            let client = clusters.get(cluster.name.as_str()).ok_or_else(|| {
                GatewayError::Cluster(format!(
                    "cluster \"{}\" runs commands in Pods but has no API server configured",
                    cluster.name
                ))
            })?;
            let executor =
                PodExecutor::new(client.clone(), settings.clone(), config.limits.kill_grace);
            // what a killed predecessor left in the cluster, in the background: a cluster
            // that is down does not hold up the gateway (its commands fail until it answers)
            let (sweeper, store, name) = (executor.clone(), store.clone(), cluster.name.clone());
            tokio::spawn(async move {
                match sweeper.remove_leftovers(&store).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(cluster = %name, pods = n, "deleted the command Pods a previous gateway process left behind")
                    }
                    Err(err) => {
                        tracing::warn!(cluster = %name, %err, "could not look for command Pods a previous gateway process left behind")
                    }
                }
            });
            pods.insert(cluster.name.clone(), executor);
        }
        let executor = Arc::new(Executors {
            local: Arc::new(executor),
            pods,
        });
        let relay = if clusters.is_empty() {
            None
        } else {
            Some(Relay::start(&config.relay, clusters.clone(), audit.clone()).await?)
        };
        // each cluster's version in the log; one that is down does not stop the others
        for (name, client) in clusters {
            tokio::spawn(async move {
                match probe_cluster(&client).await {
                    Ok(version) => {
                        tracing::info!(cluster = %name, %version, "cluster API server reachable")
                    }
                    Err(problem) => {
                        tracing::warn!(cluster = %name, "cluster {problem}; commands on it will fail until it answers")
                    }
                }
            });
        }
        let runner = Runner::new(
            RunnerSettings {
                clusters: config.clusters.clone(),
                limits: config.limits.clone(),
                retention: config.store.retention,
            },
            store,
            executor,
            audit.clone(),
            relay.clone(),
        );
        Ok(Self {
            config,
            _state_lock: state_lock,
            audit,
            guard,
            runner,
            breakglass,
            relay,
            admin: None,
        })
    }

    /// The runner of this gateway's commands (for tests and tooling that watch it).
    pub fn runner(&self) -> Arc<Runner> {
        self.runner.clone()
    }

    /// Serves until `shutdown` resolves; see [`run`].
    pub async fn serve(
        self,
        listeners: Vec<BoundListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        let Self {
            config,
            // held (not dropped) until serving ends
            _state_lock: _held,
            audit,
            guard,
            runner,
            breakglass,
            relay,
            admin,
        } = self;
        // readiness for the admin listener: the same inputs as the health service, and
        // false from the moment shutdown begins
        // seeded with the state now: a gateway that opens on a failing store is not ready
        let initial = readiness(*audit.health().borrow(), *runner.store_health().borrow());
        let (ready_tx, ready_rx) = tokio::sync::watch::channel::<admin::Readiness>(initial);
        let ready_tx = Arc::new(ready_tx);
        let admin_stop = CancellationToken::new();
        if let Some(listener) = admin {
            tokio::spawn(admin::serve(listener, ready_rx, admin_stop.clone()));
        }
        let expiry = tokio::spawn(async move {
            // grants stop by time at once; this only records that they did
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                breakglass.expire_due().await;
            }
        });
        let purge = tokio::spawn(purge_loop(runner.clone(), config.store.retention));

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<CommandServiceServer<CommandApi>>()
            .await;
        health_reporter
            .set_serving::<AccessServiceServer<AccessApi>>()
            .await;
        let reflection_sets = [
            kinvoke_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        let mut reflection_v1 = tonic_reflection::server::Builder::configure();
        let mut reflection_v1alpha = tonic_reflection::server::Builder::configure();
        for set in reflection_sets {
            reflection_v1 = reflection_v1.register_encoded_file_descriptor_set(set);
            reflection_v1alpha = reflection_v1alpha.register_encoded_file_descriptor_set(set);
        }
        let commands = CommandServiceServer::new(CommandApi::new(
            guard.clone(),
            runner.clone(),
            config.limits.clone(),
        ))
        .max_decoding_message_size(config.limits.max_request_bytes())
        .max_encoding_message_size(usize::MAX);

        let stop_accepting = CancellationToken::new();
        let incoming = ingress::incoming(
            listeners,
            ingress::ConnectionLimits {
                per_source: config.limits.max_connections_per_source,
                total: config.limits.max_connections,
                handshake_timeout: config.limits.handshake_timeout,
            },
            stop_accepting.clone(),
            audit.clone(),
        );
        // the health service follows the audit log and the result store: without
        // either, no commands
        let health_task = {
            let reporter = health_reporter.clone();
            let ready_tx = ready_tx.clone();
            let mut audit_ok = audit.health();
            let mut store_ok = runner.store_health();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        changed = audit_ok.changed() => if changed.is_err() { return },
                        changed = store_ok.changed() => if changed.is_err() { return },
                    }
                    let (audit_up, store_up) =
                        (*audit_ok.borrow_and_update(), *store_ok.borrow_and_update());
                    let ok = audit_up && store_up;
                    ready_tx.send_if_modified(|ready| {
                        if ready.as_deref() == Some(SHUTTING_DOWN) {
                            return false;
                        }
                        let now = readiness(audit_up, store_up);
                        let changed = *ready != now;
                        *ready = now;
                        changed
                    });
                    let status = if ok {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter
                        .set_service_status(
                            <CommandServiceServer<CommandApi> as tonic::server::NamedService>::NAME,
                            status,
                        )
                        .await;
                    reporter.set_service_status("", status).await;
                }
            })
        };
        let store_probe = tokio::spawn(store_probe_loop(runner.clone()));
        // refusals before authentication, capped per source address in the audit log
        let refusals = Arc::new(audit::Throttle::new(
            audit::REFUSAL_LINES_PER_SECOND,
            audit::REFUSAL_LINES_BURST,
        ));
        let server = tonic::transport::Server::builder()
            // one span per RPC: every log line of a call names its method
            .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
            // room for a bearer token far over MAX_BEARER_TOKEN_BYTES, so an oversized
            // one reaches authentication and is refused there, audited, not by HTTP/2
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(InFlightLimit::new(
                config.limits.max_in_flight_requests,
                config.limits.request_read_timeout,
                audit.clone(),
                refusals.clone(),
            ))
            .layer(TransportRefusals::new(
                &config.limits,
                audit.clone(),
                refusals,
            ))
            // the small services read small messages: their requests are never
            // allowed the size a command's attachments are
            .add_service(health.max_decoding_message_size(SMALL_MESSAGE_BYTES))
            .add_service(
                reflection_v1
                    .build_v1()?
                    .max_decoding_message_size(SMALL_MESSAGE_BYTES),
            )
            .add_service(
                reflection_v1alpha
                    .build_v1alpha()?
                    .max_decoding_message_size(SMALL_MESSAGE_BYTES),
            )
            .add_service(commands)
            .add_service(
                AccessServiceServer::new(AccessApi::new(guard))
                    .max_decoding_message_size(SMALL_MESSAGE_BYTES),
            )
            // the incoming stream ending (stop_accepting) starts tonic's graceful shutdown:
            // open calls, such as a waiting invoke, run to their end
            .serve_with_incoming_shutdown(incoming, std::future::pending::<()>());
        let mut server = tokio::spawn(server);

        tokio::select! {
            () = shutdown => {}
            served = &mut server => {
                purge.abort();
                return match served {
                    Ok(result) => result.map_err(GatewayError::from),
                    Err(err) => {
                        tracing::error!(%err, "gRPC server task died");
                        Ok(())
                    }
                };
            }
        }
        tracing::info!("shutting down: no new connections or commands");
        let _ = ready_tx.send(Some(SHUTTING_DOWN.to_owned()));
        stop_accepting.cancel();
        health_reporter
            .set_not_serving::<CommandServiceServer<CommandApi>>()
            .await;
        runner.shutdown(config.shutdown_grace).await;
        if let Some(relay) = &relay {
            relay.shutdown();
        }
        purge.abort();
        health_task.abort();
        store_probe.abort();
        expiry.abort();
        // durable, so a clean stop is the chain's last word; its head goes to the log so a
        // later edit of the file's last lines can be told from the record kept elsewhere
        let _ = audit
            .record_durable(AuditEvent::GatewayStopped {
                reason: "shutdown signal".to_owned(),
            })
            .await;
        let head = audit.head();
        tracing::info!(seq = head.seq, sha256 = %head.hash, "audit log head");
        match tokio::time::timeout(CONNECTION_DRAIN, &mut server).await {
            Ok(Ok(result)) => result?,
            Ok(Err(err)) => tracing::error!(%err, "gRPC server task died"),
            Err(_) => {
                tracing::warn!("connections still open after the drain period; closing them");
                server.abort();
            }
        }
        admin_stop.cancel();
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// The command sandbox and what the host gives it, when a cluster wants one: probed
/// (with `launcher`, or this executable), so a host that cannot sandbox is found before
/// any command runs. `None` when every cluster has `sandbox = "off"`.
pub async fn probe_sandbox(
    config: &Config,
    launcher: Option<std::path::PathBuf>,
) -> Result<Option<(Sandbox, sandbox::Features)>, GatewayError> {
    if config.clusters.iter().all(|c| !c.runs_sandboxed_here()) {
        return Ok(None);
    }
    let sandbox = match launcher {
        Some(program) => Sandbox::with_launcher(config.sandbox.clone(), program),
        None => Sandbox::new(config.sandbox.clone()),
    };
    let features = sandbox.probe().await.map_err(GatewayError::Sandbox)?;
    Ok(Some((sandbox, features)))
}

/// [`probe_sandbox`] at start-up: what the host gives commands goes to the log.
async fn open_sandbox(
    config: &Config,
    launcher: Option<std::path::PathBuf>,
) -> Result<Option<Arc<Sandbox>>, GatewayError> {
    let Some((sandbox, features)) = probe_sandbox(config, launcher).await? else {
        return Ok(None);
    };
    let sandboxed: Vec<&str> = config
        .clusters
        .iter()
        .filter(|c| c.runs_sandboxed_here())
        .map(|c| c.name.as_str())
        .collect();
    tracing::info!(clusters = %sandboxed.join(", "), "commands run sandboxed: {features}");
    for warning in sandbox_warnings(config, &features) {
        tracing::warn!("{warning}");
    }
    Ok(Some(Arc::new(sandbox)))
}

/// What a probed sandbox lacks that an operator should know about: a kernel that
/// enforces only part of the rules, a `/proc` shared with the host, or a root gateway
/// whose commands keep root's ownership of every file they can see.
pub fn sandbox_warnings(config: &Config, features: &sandbox::Features) -> Vec<String> {
    let mut out = Vec::new();
    if !features.landlock_full {
        out.push("this kernel enforces only part of the Landlock rules kinvoke asks for; upgrade to Linux 6.12+ for all of them".to_owned());
    }
    if !features.private_proc {
        out.push("commands see the host's /proc (a new one could not be mounted here): they can list the gateway's process and its command line, though not its memory or environment".to_owned());
    }
    if nix::unistd::geteuid().is_root() && config.sandbox.run_as_uids.is_none() {
        out.push("the gateway runs as root and sandbox.run_as_uids is not set: commands run as root outside their namespace, the owner of every root-owned file they can see (sandbox.writable_paths, any extra_read_only_paths); set run_as_uids to a range of unused user ids".to_owned());
    }
    out
}

/// How long a cluster's API server has to answer the version probe.
pub const CLUSTER_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks a cluster's API server for its version (`GET /version`) with the gateway's own
/// credentials: its `gitVersion`, or why it did not answer. Used at start-up (logged)
/// and by `check-config` (reported).
pub async fn probe_cluster(client: &kube::Client) -> Result<String, String> {
    match tokio::time::timeout(CLUSTER_PROBE_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(info)) => Ok(info.git_version),
        Ok(Err(err)) => Err(format!("API server not reachable: {err}")),
        Err(_) => Err(format!(
            "API server did not answer within {}",
            humantime::format_duration(CLUSTER_PROBE_TIMEOUT)
        )),
    }
}

/// A client for each cluster with an API server configured, with the gateway's own
/// credentials (used only by the relay, never handed to commands).
pub async fn kube_clients(config: &Config) -> Result<HashMap<String, kube::Client>, GatewayError> {
    let mut out = HashMap::new();
    for c in &config.clusters {
        if let Some(api) = &c.api {
            let client = kube_client(api)
                .await
                .map_err(|e| GatewayError::Cluster(format!("cluster \"{}\": {e}", c.name)))?;
            out.insert(c.name.to_string(), client);
        }
    }
    Ok(out)
}

async fn kube_client(api: &config::ApiServer) -> Result<kube::Client, String> {
    let mut cfg = match api {
        config::ApiServer::Kubeconfig { path, context } => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            let options = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        config::ApiServer::InCluster => {
            kube::Config::incluster().map_err(|e| format!("in-cluster service account: {e}"))?
        }
    };
    // a watch lasts as long as its command; the command's own timeout bounds it
    cfg.read_timeout = None;
    kube::Client::try_from(cfg).map_err(|e| format!("client: {e}"))
}

/// While the result store cannot be written, tries a write each second, so the
/// gateway takes commands again by itself once the fault (a full disk, a read-only
/// file) clears.
async fn store_probe_loop(runner: Arc<Runner>) {
    let mut health = runner.store_health();
    loop {
        if health.wait_for(|ok| !*ok).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !*health.borrow_and_update() {
            tick.tick().await;
            if runner.probe_store().await.is_ok() {
                break;
            }
        }
    }
}

async fn purge_loop(runner: Arc<Runner>, retention: Duration) {
    let period = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        match runner.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "deleted results past their retention"),
            Err(err) => tracing::warn!(%err, "could not delete expired results"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_gateway_on_the_same_state_directory_is_refused_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).unwrap();
        let second = lock_state_dir(&state).unwrap_err();
        assert!(matches!(second, GatewayError::StateDirInUse(_)), "{second}");
        assert!(second.to_string().contains("gateway.lock"), "{second}");
        drop(first);
        lock_state_dir(&state).unwrap();
    }
}
