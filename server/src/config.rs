//! The gateway's TOML configuration: parsed and validated once at start-up into typed
//! values. Unknown keys are errors, and every error names the key at fault.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::access::authz::{ClusterGate, Policy};
use crate::access::cidr::CidrSet;
pub use crate::breakglass::Webhook;
use crate::command::ClusterName;
pub use crate::command::Limits;
pub use crate::exec::pod::{PodResources, PodSettings};
pub use crate::exec::{DEFAULT_COMMAND_PATH, ExecMode, ExecSettings};
pub use crate::ingress::{Exposure, ListenerConfig};
pub use crate::relay::{IdentityMapping, RelayConfig};
use crate::sandbox::{LabeledPath, SandboxMode, SandboxSettings};

mod access_control;
mod clusters;
mod listeners;
mod pod_settings;
mod raw;
mod sandbox_settings;
mod sections;

use listeners::parse_listener_access;
use raw::RawConfig;
use sections::{parse_audit, parse_limits};

pub use access_control::AuthnConfig;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the offending key, e.g. `cluster[1].name`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole gateway configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for the result store and other state.
    pub state_dir: PathBuf,
    /// The result store.
    pub store: StoreConfig,
    /// Limits applied to every request.
    pub limits: Limits,
    /// How long running commands may finish after a shutdown signal before they are canceled.
    pub shutdown_grace: Duration,
    /// The gRPC listeners; at least one.
    pub listeners: Vec<ListenerConfig>,
    /// The clusters this gateway fronts; at least one.
    pub clusters: Vec<ClusterConfig>,
    /// How callers authenticate.
    pub authn: AuthnConfig,
    /// Roles, assignments and cluster gates.
    pub policy: Policy,
    /// Legal but risky settings, printed by `check-config` and logged at start.
    pub warnings: Vec<String>,
    /// The audit log.
    pub audit: crate::audit::AuditConfig,
    /// SHA-256 (hex) of the config text, recorded in the audit log at start.
    pub digest: String,
    /// Announce break-glass activations and approvals here.
    pub webhook: Option<Webhook>,
    /// The relay's listener.
    pub relay: RelayConfig,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); `None` = none.
    pub admin: Option<crate::admin::AdminConfig>,
    /// What sandboxed commands may read, and the users they run as.
    pub sandbox: SandboxSettings,
    /// The file this config was read from (`None` when parsed from text).
    pub source: Option<PathBuf>,
}

/// Where results are kept and for how long.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// SQLite database file (the embedded default backend).
    pub path: PathBuf,
    /// `backend = "postgres"`: the PostgreSQL database several replicas share, instead of
    /// the SQLite file.
    pub postgres: Option<crate::store::PostgresSettings>,
    /// How long a finished command's record is kept.
    pub retention: Duration,
}

/// One cluster the gateway runs commands for.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Name callers use.
    pub name: ClusterName,
    /// How its commands run (mode, programs, `PATH`, shell, sandbox).
    pub exec: ExecSettings,
    /// How the gateway reaches the cluster's API server; `None` = no cluster behind it
    /// (commands get no kubeconfig).
    pub api: Option<ApiServer>,
    /// How a principal becomes a Kubernetes identity on this cluster.
    pub identity: IdentityMapping,
    /// Shown by `kinvoke clusters`, e.g. "simulated cluster".
    pub description: String,
    /// Refuse every command (like AKS `disableRunCommand`).
    pub disable_run_command: bool,
    /// Caller addresses allowed for this cluster, besides the listener's; empty = no extra limit.
    pub authorized_ip_ranges: CidrSet,
    /// `executor = "pod"`: its commands run in Pods of the cluster, with these settings;
    /// `None` = the local executor.
    pub pod: Option<PodSettings>,
}

impl ClusterConfig {
    /// True when its commands run on this host in the command sandbox: the local
    /// executor with `sandbox` on (a pod-executor cluster's commands run in the cluster).
    pub fn runs_sandboxed_here(&self) -> bool {
        self.pod.is_none() && self.exec.sandbox == SandboxMode::On
    }
}

/// The gateway's own way to the API server (never given to commands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiServer {
    /// A kubeconfig file and optionally a context in it.
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The context; default: the file's current context.
        context: Option<String>,
    },
    /// The service account of the Pod the gateway runs in.
    InCluster,
}

/// `[store]`'s PostgreSQL settings when `backend = "postgres"`; the keys of one backend are
/// refused with the other, so nothing configured is silently ignored.
fn parse_postgres(
    raw: &raw::RawStore,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<crate::store::PostgresSettings>, ConfigError> {
    let postgres_keys = [
        ("url", raw.url.is_some()),
        ("password_file", raw.password_file.is_some()),
        ("ca_cert", raw.ca_cert.is_some()),
        ("max_connections", raw.max_connections.is_some()),
        ("replica_id", raw.replica_id.is_some()),
    ];
    match raw.backend.as_deref().unwrap_or("sqlite") {
        "sqlite" => {
            if let Some((key, _)) = postgres_keys.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    format!("store.{key}"),
                    "applies to backend = \"postgres\" only; set it, or remove the key",
                ));
            }
            Ok(None)
        }
        "postgres" => {
            if raw.path.is_some() {
                return Err(invalid(
                    "store.path",
                    "is the SQLite file; with backend = \"postgres\" the database is store.url",
                ));
            }
            let url = raw.url.clone().ok_or_else(|| {
                invalid(
                    "store.url",
                    "backend = \"postgres\" needs the database's URL, e.g. \"postgres://kinvoke@db.internal:5432/kinvoke?sslmode=require\"",
                )
            })?;
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                invalid(
                    "store.url",
                    format!(
                        "{} is not a PostgreSQL connection string: {e}",
                        crate::store::redacted_url(&url)
                    ),
                )
            })?;
            if crate::store::redacted_url(&url) != url {
                return Err(invalid(
                    "store.url",
                    "carries a password; put it in a file named by store.password_file instead",
                ));
            }
            let password = match &raw.password_file {
                None => None,
                Some(file) => {
                    let file = resolve(file);
                    let text = std::fs::read_to_string(&file).map_err(|e| {
                        invalid("store.password_file", format!("{}: {e}", file.display()))
                    })?;
                    // one line: the line end is not part of it, and more lines are refused
                    // rather than sent as part of the password or cut off
                    let line = text
                        .strip_suffix('\n')
                        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
                    if line.contains(['\n', '\r']) || line.is_empty() {
                        return Err(invalid(
                            "store.password_file",
                            format!(
                                "{} must hold the password on one line, and nothing else",
                                file.display()
                            ),
                        ));
                    }
                    Some(line.to_owned())
                }
            };
            let max_connections = raw.max_connections.unwrap_or(16);
            if max_connections == 0 {
                return Err(invalid("store.max_connections", "must be at least 1"));
            }
            let replica_id = match &raw.replica_id {
                Some(id) => id.clone(),
                None => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        invalid(
                            "store.replica_id",
                            "the host name cannot be read; set the replica's name",
                        )
                    })?,
            };
            if replica_id.is_empty() || replica_id.chars().any(crate::command::is_unprintable) {
                return Err(invalid(
                    "store.replica_id",
                    "must be a non-empty name without control characters",
                ));
            }
            Ok(Some(crate::store::PostgresSettings {
                url,
                password,
                ca_cert: raw.ca_cert.as_deref().map(resolve),
                max_connections,
                replica_id,
            }))
        }
        other => Err(invalid(
            "store.backend",
            format!(
                "unknown backend \"{other}\"; this gateway supports \"sqlite\" and \"postgres\""
            ),
        )),
    }
}

/// Environment variable that overrides `relay.advertise_url` (e.g. with the Pod's own
/// address, one per replica).
pub const ADVERTISE_URL_ENV: &str = "KINVOKE_RELAY_ADVERTISE_URL";

/// Where cloud CLIs and kubectl keep credentials, below a home directory.
const CREDENTIAL_DIRS: &[&str] = &[".aws", ".azure", ".config/gcloud", ".kube", ".docker"];

/// The gateway's own home directory (`HOME`, else its user's entry in the password
/// database), unless it is `/` (some service users have that).
fn gateway_home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
        .filter(|h| h.is_absolute() && h != Path::new("/"))
}

impl Config {
    /// Reads and validates a config file; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&text, base).map_err(|err| match err {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        config.source = Some(path.to_owned());
        config.check_sandbox_exposure()?;
        config.with_environment(|name| std::env::var(name).ok())
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::new(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let state_dir = resolve(&raw.state_dir);

        let store = StoreConfig {
            path: raw
                .store
                .path
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| state_dir.join("kinvoke.db")),
            retention: raw
                .store
                .retention
                .unwrap_or(Duration::from_secs(24 * 3600)),
            postgres: parse_postgres(&raw.store, &resolve)?,
        };
        if store.retention.is_zero() {
            return Err(invalid("store.retention", "must be longer than 0s"));
        }

        let limits = parse_limits(raw.limits)?;
        let authn = access_control::parse_authn(raw.authn, &resolve)?;
        let mut warnings = Vec::new();

        if raw.listeners.is_empty() {
            return Err(invalid(
                "listener",
                "no [[listener]] is configured; add one with `address` and a `tls` table",
            ));
        }
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut names = BTreeSet::new();
        for (i, l) in raw.listeners.into_iter().enumerate() {
            let key = format!("listener[{i}]");
            let name = l.name.clone().unwrap_or_else(|| format!("listener-{i}"));
            if !names.insert(name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("listener name \"{name}\" is used twice"),
                ));
            }
            let address: SocketAddr = l.address.parse().map_err(|_| {
                invalid(
                    format!("{key}.address"),
                    format!(
                        "\"{}\" is not a socket address; write it as IP:PORT, e.g. \"0.0.0.0:8443\" or \"[::]:8443\"",
                        l.address
                    ),
                )
            })?;
            let listener =
                parse_listener_access(&key, name, address, l, &resolve, &authn, &mut warnings)?;
            listeners.push(listener);
        }

        let clusters = clusters::parse_clusters(raw.clusters, &resolve, &mut warnings)?;

        let roles = access_control::parse_roles(raw.roles)?;
        let assignments = access_control::parse_assignments(raw.assignments)?;
        for (i, a) in assignments.iter().enumerate() {
            if let crate::access::authz::Scope::Cluster(c) = &a.scope
                && !clusters.iter().any(|k| k.name.as_str() == c)
            {
                return Err(invalid(
                    format!("assignment[{i}].scope"),
                    format!("cluster \"{c}\" is not configured"),
                ));
            }
        }
        if assignments.is_empty() {
            warnings.push(
                "no [[assignment]] is configured: every call will be denied (deny by default)"
                    .to_owned(),
            );
        }
        let gates = clusters
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    ClusterGate {
                        disable_run_command: c.disable_run_command,
                        authorized_ip_ranges: c.authorized_ip_ranges.clone(),
                    },
                )
            })
            .collect();
        let policy = Policy::new(roles, assignments, gates)
            .map_err(|e| invalid("assignment", e.to_string()))?;

        let mut audit = parse_audit(raw.audit, &state_dir, &resolve)?;
        // replicas sharing a store each keep a chain of their own, named in every line
        audit.replica = store.postgres.as_ref().map(|pg| pg.replica_id.clone());
        let webhook = match raw.break_glass.webhook_url {
            None => None,
            Some(url) => {
                let loopback_http = url.strip_prefix("http://").is_some_and(|rest| {
                    rest.starts_with("127.")
                        || rest.starts_with("localhost")
                        || rest.starts_with("[::1]")
                });
                if !url.starts_with("https://") && !loopback_http {
                    return Err(invalid(
                        "break_glass.webhook_url",
                        format!("\"{url}\" must be https:// (http:// only to a loopback address)"),
                    ));
                }
                Some(Webhook {
                    url,
                    ca_cert: raw.break_glass.webhook_ca_cert.as_deref().map(resolve),
                })
            }
        };
        Self {
            digest: crate::hex::encode(
                ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref(),
            ),
            audit,
            webhook,
            relay: RelayConfig {
                address: match raw.relay.address.as_deref() {
                    None => SocketAddr::from(([127, 0, 0, 1], 0)),
                    Some(a) => a.parse().map_err(|_| {
                        invalid(
                            "relay.address",
                            format!("\"{a}\" is not a socket address; write it as IP:PORT, e.g. \"127.0.0.1:0\""),
                        )
                    })?,
                },
                advertise_url: raw
                    .relay
                    .advertise_url
                    .as_deref()
                    .map(crate::relay::AdvertiseUrl::parse)
                    .transpose()
                    .map_err(|message| invalid("relay.advertise_url", message))?,
                response_timeout: match raw.relay.response_timeout {
                    Some(t) if t.is_zero() => {
                        return Err(invalid("relay.response_timeout", "must be longer than 0s"));
                    }
                    Some(t) => t,
                    None => RelayConfig::DEFAULT_RESPONSE_TIMEOUT,
                },
                max_connections: match raw.relay.max_connections {
                    Some(0) => return Err(invalid("relay.max_connections", "must be at least 1")),
                    Some(n) => n,
                    None => RelayConfig::DEFAULT_MAX_CONNECTIONS,
                },
                idle_timeout: match raw.relay.idle_timeout {
                    Some(t) if t.is_zero() => {
                        return Err(invalid("relay.idle_timeout", "must be longer than 0s"));
                    }
                    Some(t) => t,
                    None => RelayConfig::DEFAULT_IDLE_TIMEOUT,
                },
            },
            sandbox: sandbox_settings::parse_sandbox(raw.sandbox, &resolve, limits.max_concurrent_commands)?,
            admin: match raw.admin {
                None => None,
                Some(admin) => Some(crate::admin::AdminConfig {
                    address: admin.address.parse().map_err(|_| {
                        invalid(
                            "admin.address",
                            format!("\"{}\" is not a socket address; write it as IP:PORT, e.g. \"127.0.0.1:9090\"", admin.address),
                        )
                    })?,
                }),
            },
            source: None,
            state_dir,
            store,
            limits,
            shutdown_grace: raw.shutdown_grace.unwrap_or(Duration::from_secs(30)),
            listeners,
            clusters,
            authn,
            policy,
            warnings,
        }
        .with_pod_relay_checked()
    }

    /// Applies the settings the environment overrides (`lookup` reads a variable): per
    /// replica, [`ADVERTISE_URL_ENV`] replaces `relay.advertise_url`, so a command's Pod
    /// reaches the replica that issued its token (the Helm chart sets it from the Pod's
    /// address). Checked like the config's own value.
    pub fn with_environment(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let Some(url) = lookup(ADVERTISE_URL_ENV).filter(|u| !u.is_empty()) else {
            return Ok(self);
        };
        self.relay.advertise_url = Some(
            crate::relay::AdvertiseUrl::parse(&url)
                .map_err(|message| invalid(ADVERTISE_URL_ENV, message))?,
        );
        self.with_pod_relay_checked()
    }

    /// Refuses a pod-executor cluster whose Pods could not reach the relay: the URL
    /// they dial (`relay.advertise_url`, else the relay's own address) is on loopback,
    /// unless the cluster says its Pods share this host's loopback (`pod.loopback_relay`,
    /// the simulated cluster), which is then a warning.
    fn with_pod_relay_checked(mut self) -> Result<Self, ConfigError> {
        // Pods reach neither a relay listening on loopback, whatever URL it advertises,
        // nor one whose URL (advertised, or its own address) is on loopback
        let loopback = self.relay.address.ip().is_loopback()
            || match &self.relay.advertise_url {
                Some(url) => url.is_loopback(),
                None => self.relay.address.ip().is_unspecified(),
            };
        for (i, cluster) in self.clusters.iter().enumerate() {
            let Some(pod) = &cluster.pod else {
                continue;
            };
            if !loopback {
                continue;
            }
            if pod.loopback_relay {
                self.warnings.push(format!(
                    "cluster \"{}\" runs commands in Pods that reach the relay on this host's loopback \
                     (cluster[{i}].pod.loopback_relay = true): right only for a cluster whose Pods run on this host",
                    cluster.name
                ));
                continue;
            }
            let dialed = match &self.relay.advertise_url {
                Some(url) => format!(
                    "relay.address = \"{}\", relay.advertise_url = \"{url}\"",
                    self.relay.address
                ),
                None => format!(
                    "relay.address = \"{}\" and no relay.advertise_url",
                    self.relay.address
                ),
            };
            return Err(invalid(
                "relay.advertise_url",
                format!(
                    "cluster \"{}\" runs commands in Pods (cluster[{i}].executor = \"pod\"), which cannot reach \
                     a relay on loopback ({dialed}); listen where Pods can reach it (relay.address, e.g. \"0.0.0.0:8443\") \
                     and set relay.advertise_url to the URL they dial, e.g. \"https://kinvoke-relay.kinvoke.svc:8443\"",
                    cluster.name
                ),
            ));
        }
        Ok(self)
    }

    /// Every path this config names that a command must never read: the config file
    /// itself, the state directory, store and audit log, TLS keys and certificates, CA
    /// bundles, JWKS files, kubeconfigs, and the Pod service-account directory.
    /// Fails naming a kubeconfig that cannot be read: the files it names could not be
    /// kept secret.
    pub fn secret_paths(&self) -> Result<Vec<LabeledPath>, ConfigError> {
        let mut out = vec![
            LabeledPath::new(
                crate::sandbox::SERVICE_ACCOUNT_DIR,
                "the Pod's service account",
            ),
            // daemons' Unix sockets: a read-only mount does not stop a connect
            LabeledPath::new("/run", "the host's run-time directory (daemons' sockets)"),
            LabeledPath::new(
                "/var/run",
                "the host's run-time directory (daemons' sockets)",
            ),
            LabeledPath::new(&self.state_dir, "state_dir"),
            LabeledPath::new(&self.store.path, "store.path"),
            LabeledPath::new(&self.audit.path, "audit.path"),
        ];
        if let Some(home) = gateway_home() {
            for dir in CREDENTIAL_DIRS {
                out.push(LabeledPath::new(
                    home.join(dir),
                    "the gateway's cloud and cluster credentials",
                ));
            }
        }
        if let Some(source) = &self.source {
            out.push(LabeledPath::new(source, "the config file"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            out.push(LabeledPath::new(
                &l.tls_cert,
                format!("listener[{i}].tls.cert"),
            ));
            out.push(LabeledPath::new(
                &l.tls_key,
                format!("listener[{i}].tls.key"),
            ));
            if let Some(ca) = &l.client_ca {
                out.push(LabeledPath::new(ca, format!("listener[{i}].tls.client_ca")));
            }
        }
        for (i, c) in self.clusters.iter().enumerate() {
            if let Some(ApiServer::Kubeconfig { path, .. }) = &c.api {
                let key = format!("cluster[{i}].kubeconfig");
                let named = sandbox_settings::kubeconfig_files(path).map_err(|e| {
                    invalid(
                        key.clone(),
                        format!(
                            "cluster \"{}\": cannot read its kubeconfig {} to keep the files it names out of the sandbox: {e}",
                            c.name,
                            path.display()
                        ),
                    )
                })?;
                out.extend(
                    named
                        .into_iter()
                        .map(|f| LabeledPath::new(f, format!("a file {key} names"))),
                );
                out.push(LabeledPath::new(path, key));
            }
        }
        for (i, issuer) in self.authn.issuers.iter().enumerate() {
            match &issuer.jwks {
                crate::authn::jwt::JwksSource::File(path) => {
                    out.push(LabeledPath::new(path, format!("authn.oidc[{i}].jwks_file")));
                }
                crate::authn::jwt::JwksSource::Url {
                    ca_cert: Some(path),
                    ..
                } => out.push(LabeledPath::new(
                    path,
                    format!("authn.oidc[{i}].jwks_ca_cert"),
                )),
                crate::authn::jwt::JwksSource::Url { ca_cert: None, .. } => {}
            }
        }
        if let Some(Webhook {
            ca_cert: Some(path),
            ..
        }) = &self.webhook
        {
            out.push(LabeledPath::new(path, "break_glass.webhook_ca_cert"));
        }
        Ok(out)
    }

    /// Refuses a sandbox whose readable paths (for any sandboxed cluster) contain a
    /// secret path or lie inside one, or contain the directory where every command's
    /// own directory is made, naming both.
    pub fn check_sandbox_exposure(&self) -> Result<(), ConfigError> {
        if self.clusters.iter().all(|c| !c.runs_sandboxed_here()) {
            return Ok(());
        }
        crate::sandbox::check_configured_paths_exist(&self.sandbox)
            .map_err(|message| invalid("sandbox", message))?;
        let secrets = self.secret_paths()?;
        let mut containers = vec![LabeledPath::new(
            std::env::temp_dir(),
            "the commands' work root (TMPDIR), which holds every command's directory and relay token",
        )];
        if let Some(home) = gateway_home() {
            containers.push(LabeledPath::new(home, "the gateway's home directory"));
        }
        for (i, c) in self.clusters.iter().enumerate() {
            if !c.runs_sandboxed_here() {
                continue;
            }
            let key = format!("cluster[{i}]");
            let readable = crate::sandbox::readable_paths(
                &self.sandbox,
                &c.exec.path,
                &c.exec.programs(),
                &key,
            );
            crate::sandbox::check_exposure(&readable, &secrets)
                .and_then(|()| crate::sandbox::check_containment(&readable, &containers))
                .map_err(|e| invalid(e.readable_source.clone(), e.to_string()))?;
            let writable: Vec<LabeledPath> = self
                .sandbox
                .writable_paths
                .iter()
                .map(|p| LabeledPath::new(p, "sandbox.writable_paths"))
                .collect();
            crate::sandbox::check_writable_nesting(&readable, &writable)
                .map_err(|e| invalid(e.inner_source.clone(), e.to_string()))?;
        }
        Ok(())
    }

    /// The configured cluster with this name, if any.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
state_dir = "state"
[[listener]]
address = "127.0.0.1:0"
tls = { cert = "s.crt", key = "s.key", client_ca = "ca.crt" }
[[cluster]]
name = "prod-eu"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/kinvoke"))
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/etc/kinvoke/state"));
        assert_eq!(
            config.store.path,
            PathBuf::from("/etc/kinvoke/state/kinvoke.db")
        );
        assert_eq!(config.store.retention, Duration::from_secs(86_400));
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.max_output_bytes, 512 * 1024);
        assert_eq!(config.limits.max_total_file_bytes, 4 * 1024 * 1024);
        let cluster = config.cluster("prod-eu").unwrap();
        assert_eq!(cluster.exec.mode, ExecMode::Shell);
        assert!(cluster.exec.allowed_programs.contains("kubectl"));
        assert!(cluster.exec.allowed_programs.contains("helm"));
        assert_eq!(
            config.listeners[0].client_ca,
            Some(PathBuf::from("/etc/kinvoke/ca.crt"))
        );
    }

    fn with_limits(limits: &str) -> String {
        MINIMAL.replacen(
            "state_dir = \"state\"\n",
            &format!("state_dir = \"state\"\n[limits]\n{limits}\n"),
            1,
        )
    }

    #[test]
    fn sizes_and_durations_are_human_readable() {
        let text = with_limits(
            "max_output_bytes = \"1 MiB\"\ndefault_timeout = \"90s\"\nmax_timeout = \"2h\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.limits.max_output_bytes, 1024 * 1024);
        assert_eq!(config.limits.default_timeout, Duration::from_secs(90));
        assert_eq!(config.limits.max_timeout, Duration::from_secs(7200));
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            parse(&MINIMAL.replace("name = \"prod-eu\"", "name = \"prod-eu\"\nmod = \"argv\""))
                .unwrap_err();
        assert!(err.to_string().contains("unknown field `mod`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                MINIMAL.replace("127.0.0.1:0", "localhost"),
                "listener[0].address",
            ),
            (MINIMAL.replace("prod-eu", "Prod EU"), "cluster[0].name"),
            (
                format!("{MINIMAL}\n[[cluster]]\nname = \"prod-eu\"\n"),
                "cluster[1].name",
            ),
            (
                MINIMAL.replace("name = \"prod-eu\"", "name = \"x\"\nexecutor = \"remote\""),
                "cluster[0].executor",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }

    /// A pod-executor cluster `c` with `relay` and `pod` tables added.
    fn pod_cluster(relay: &str, pod: &str) -> String {
        format!(
            "{MINIMAL}\n[[cluster]]\nname = \"c\"\nexecutor = \"pod\"\nkubeconfig = \"k\"\n[cluster.pod]\n{pod}\n[relay]\n{relay}\n"
        )
    }

    #[test]
    fn a_pod_cluster_gets_the_documented_defaults() {
        let config = parse(&pod_cluster(
            "address = \"0.0.0.0:8443\"\nadvertise_url = \"https://kinvoke-relay.kinvoke.svc:8443\"",
            "",
        ))
        .unwrap();
        let pod = config.clusters[1].pod.as_ref().unwrap();
        assert_eq!(pod, &PodSettings::default());
        assert_eq!(pod.namespace, "kinvoke-command");
        assert_eq!(pod.startup_timeout, Duration::from_secs(300));
        assert_eq!(pod.resources.requests_cpu, "200m");
        assert_eq!(pod.resources.requests_memory, "512Mi");
        assert_eq!(pod.resources.limits_cpu, "500m");
        assert_eq!(pod.resources.limits_memory, "1Gi");
        assert_eq!(
            config.relay.advertise_url.as_ref().map(ToString::to_string),
            Some("https://kinvoke-relay.kinvoke.svc:8443".to_owned())
        );
        assert!(
            config.clusters[0].pod.is_none(),
            "local stays the default executor"
        );
    }

    #[test]
    fn a_pod_cluster_whose_pods_cannot_reach_the_relay_is_refused() {
        let cases = [
            // the default: loopback, nothing advertised
            (
                "",
                "relay.address = \"127.0.0.1:0\" and no relay.advertise_url",
            ),
            // listening on loopback, whatever it advertises
            (
                "address = \"127.0.0.1:8443\"\nadvertise_url = \"https://relay.example:8443\"",
                "relay.address = \"127.0.0.1:8443\"",
            ),
            // advertising loopback
            (
                "address = \"0.0.0.0:8443\"\nadvertise_url = \"https://localhost:8443\"",
                "https://localhost:8443",
            ),
            ("address = \"0.0.0.0:8443\"", "no relay.advertise_url"),
        ];
        for (relay, named) in cases {
            let err = parse(&pod_cluster(relay, "")).unwrap_err().to_string();
            assert!(
                err.contains("relay.advertise_url")
                    && err.contains(named)
                    && err.contains("cluster \"c\""),
                "{relay}: {err}"
            );
        }
        // a cluster whose Pods share this host's loopback (the simulated one) is a warning
        let config = parse(&pod_cluster("", "loopback_relay = true")).unwrap();
        assert!(
            config.warnings.iter().any(|w| w.contains("loopback_relay")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn the_environment_can_give_each_replica_its_own_advertised_relay_url() {
        let text = pod_cluster(
            "address = \"0.0.0.0:7443\"\nadvertise_url = \"https://relay.kinvoke.svc:7443\"",
            "",
        );
        let config = parse(&text)
            .unwrap()
            .with_environment(|name| {
                (name == ADVERTISE_URL_ENV).then(|| "https://10.244.1.7:7443".to_owned())
            })
            .unwrap();
        assert_eq!(
            config.relay.advertise_url.unwrap().to_string(),
            "https://10.244.1.7:7443"
        );
        // checked as the config's own value is
        let err = parse(&text)
            .unwrap()
            .with_environment(|_| Some("https://127.0.0.1:7443".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        let err = parse(&text)
            .unwrap()
            .with_environment(|_| Some("http://x".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains(ADVERTISE_URL_ENV), "{err}");
        // unset or empty: the config's value
        let kept = parse(&text).unwrap().with_environment(|_| None).unwrap();
        assert_eq!(
            kept.relay.advertise_url.unwrap().to_string(),
            "https://relay.kinvoke.svc:7443"
        );
    }

    #[test]
    fn bad_pod_settings_name_their_key() {
        let ok_relay = "address = \"0.0.0.0:8443\"\nadvertise_url = \"https://relay.example\"";
        let cases = [
            ("namespace = \"Ops\"", "cluster[1].pod.namespace"),
            ("image = \"\"", "cluster[1].pod.image"),
            (
                "image_pull_policy = \"Sometimes\"",
                "cluster[1].pod.image_pull_policy",
            ),
            (
                "image_pull_secrets = [\"Bad_Name\"]",
                "cluster[1].pod.image_pull_secrets",
            ),
            (
                "resources = { limits = { memory = \"1GB\" } }",
                "cluster[1].pod.resources.limits.memory",
            ),
            (
                "resources = { requests = { cpu = \"fast\" } }",
                "cluster[1].pod.resources.requests.cpu",
            ),
            (
                "node_selector = { \"bad key\" = \"x\" }",
                "cluster[1].pod.node_selector",
            ),
            (
                "tolerations = [{ operator = \"Equal\", value = \"x\" }]",
                "cluster[1].pod.tolerations[0].operator",
            ),
            (
                "tolerations = [{ key = \"k\", operator = \"Exists\", value = \"x\" }]",
                "cluster[1].pod.tolerations[0].value",
            ),
            (
                "tolerations = [{ key = \"k\", effect = \"Sometimes\" }]",
                "cluster[1].pod.tolerations[0].effect",
            ),
            (
                "tolerations = [{ key = \"k\", toleration_seconds = 5 }]",
                "cluster[1].pod.tolerations[0].toleration_seconds",
            ),
            (
                "priority_class_name = \"Not Valid\"",
                "cluster[1].pod.priority_class_name",
            ),
            ("startup_timeout = \"0s\"", "cluster[1].pod.startup_timeout"),
            ("run_as_user = 0", "cluster[1].pod.run_as_user"),
            (
                "scratch_size_limit = \"lots\"",
                "cluster[1].pod.scratch_size_limit",
            ),
            ("imagee = \"x\"", "unknown field `imagee`"),
        ];
        for (pod, key) in cases {
            let err = parse(&pod_cluster(ok_relay, pod)).unwrap_err().to_string();
            assert!(err.contains(key), "{pod}: {err}");
        }
        let bad_urls = [
            ("http://relay.example", "https://"),
            ("https://relay.example/path", "without a path"),
            ("https://user:pw@relay.example", "credentials"),
        ];
        for (url, problem) in bad_urls {
            let relay = format!("address = \"0.0.0.0:8443\"\nadvertise_url = \"{url}\"");
            let err = parse(&pod_cluster(&relay, "")).unwrap_err().to_string();
            assert!(
                err.contains("relay.advertise_url") && err.contains(problem),
                "{url}: {err}"
            );
        }
        // the pod executor needs the gateway's own way to the cluster
        let no_api = format!("{MINIMAL}\n[[cluster]]\nname = \"c\"\nexecutor = \"pod\"\n");
        let err = parse(&no_api).unwrap_err().to_string();
        assert!(
            err.contains("cluster[1].executor") && err.contains("kubeconfig"),
            "{err}"
        );
        // pod settings on a local cluster would be ignored: refused
        let local = format!("{MINIMAL}\n[cluster.pod]\nnamespace = \"x\"\n");
        let err = parse(&local).unwrap_err().to_string();
        assert!(err.contains("cluster[0].pod"), "{err}");
    }

    /// The TOML that puts an unknown key `zz_unknown` into `table` (as named in
    /// CONFIGURATION.md's headings), so the parser's error lists the keys it accepts.
    fn probe_for(table: &str) -> String {
        let probe = "zz_unknown = 1\n";
        match table {
            "top level" => probe.to_owned(),
            "[listener.tls]" => format!("[[listener]]\n[listener.tls]\n{probe}"),
            "[cluster.identity]" | "[cluster.pod]" => {
                format!("[[cluster]]\n{}\n{probe}", table)
            }
            "[cluster.pod.resources]"
            | "[cluster.pod.resources.requests]"
            | "[cluster.pod.resources.limits]" => {
                format!("[[cluster]]\n[cluster.pod]\n{table}\n{probe}")
            }
            "[[cluster.pod.tolerations]]" => {
                format!("[[cluster]]\n[cluster.pod]\n{table}\n{probe}")
            }
            "[assignment.require_approval_from]" => format!("[[assignment]]\n{table}\n{probe}"),
            other => format!("{other}\n{probe}"),
        }
    }

    /// The keys the parser accepts in `table`, from its unknown-field error.
    fn accepted_keys(table: &str) -> BTreeSet<String> {
        let text = format!("state_dir = \"s\"\n{}", probe_for(table));
        let text = if table == "top level" {
            probe_for(table)
        } else {
            text
        };
        let err = Config::parse(&text, Path::new("/etc/kinvoke"))
            .expect_err("an unknown key is refused")
            .to_string();
        let expected = err
            .split("expected one of ")
            .nth(1)
            .or_else(|| err.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("{table}: no key list in {err:?}"));
        // serde: "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`"
        expected
            .replace(" or ", ",")
            .split(',')
            .filter_map(|k| k.trim().trim_matches('`').split('`').next())
            .map(|k| k.trim().trim_matches('`').to_owned())
            .filter(|k| !k.is_empty())
            .collect()
    }

    #[test]
    fn the_configuration_reference_lists_exactly_the_keys_the_parser_accepts() {
        let reference = include_str!("../../CONFIGURATION.md");
        let mut sections: Vec<(String, BTreeSet<String>)> = Vec::new();
        for line in reference.lines() {
            if let Some(heading) = line.strip_prefix("## `") {
                sections.push((heading.trim_end_matches('`').to_owned(), BTreeSet::new()));
            } else if let (Some((_, keys)), Some(row)) =
                (sections.last_mut(), line.strip_prefix("| `"))
            {
                keys.insert(row.split('`').next().unwrap_or_default().to_owned());
            }
        }
        let tables: Vec<&str> = sections.iter().map(|(t, _)| t.as_str()).collect();
        for needed in [
            "top level",
            "[store]",
            "[limits]",
            "[audit]",
            "[relay]",
            "[admin]",
            "[break_glass]",
            "[sandbox]",
            "[[listener]]",
            "[listener.tls]",
            "[[cluster]]",
            "[cluster.identity]",
            "[cluster.pod]",
            "[cluster.pod.resources]",
            "[cluster.pod.resources.requests]",
            "[cluster.pod.resources.limits]",
            "[[cluster.pod.tolerations]]",
            "[authn]",
            "[[authn.mtls_rule]]",
            "[[authn.static_token]]",
            "[[authn.oidc]]",
            "[[role]]",
            "[[assignment]]",
            "[assignment.require_approval_from]",
        ] {
            assert!(
                tables.contains(&needed),
                "CONFIGURATION.md has no section {needed}"
            );
        }
        for (table, documented) in &sections {
            let mut accepted = accepted_keys(table);
            if table == "top level" {
                // the sub-tables have sections of their own
                accepted.retain(|k| {
                    documented.contains(k)
                        || !matches!(
                            k.as_str(),
                            "store"
                                | "limits"
                                | "listener"
                                | "cluster"
                                | "authn"
                                | "role"
                                | "assignment"
                                | "audit"
                                | "break_glass"
                                | "relay"
                                | "sandbox"
                                | "admin"
                        )
                });
            }
            assert_eq!(
                documented, &accepted,
                "CONFIGURATION.md section {table} must list exactly the keys the parser accepts"
            );
        }
    }

    /// The rows of CONFIGURATION.md's section `table` whose default is a TOML value
    /// (in backticks), as `key = value` lines.
    fn documented_defaults(table: &str) -> String {
        let reference = include_str!("../../CONFIGURATION.md");
        let section = reference
            .split(&format!("## `{table}`"))
            .nth(1)
            .unwrap_or_else(|| panic!("no section {table}"));
        let section = section.split("\n## ").next().unwrap_or_default();
        section
            .lines()
            .filter_map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let default = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some(format!("{key} = {default}\n"))
            })
            .collect()
    }

    #[test]
    fn the_documented_defaults_are_the_defaults() {
        let defaults = parse(MINIMAL).unwrap();
        // [limits] and [relay] written out with their documented defaults parse to the
        // very values a config without them gets
        let limits = documented_defaults("[limits]");
        let relay = documented_defaults("[relay]");
        assert!(limits.lines().count() >= 18, "{limits}");
        let explicit = parse(&format!("{MINIMAL}\n[limits]\n{limits}\n[relay]\n{relay}"))
            .unwrap_or_else(|e| panic!("{e}\n{limits}{relay}"));
        assert_eq!(explicit.limits, defaults.limits, "{limits}");
        assert_eq!(explicit.relay, defaults.relay, "{relay}");
        assert_eq!(explicit.limits, Limits::default());
        // and the pod executor's
        let pod = documented_defaults("[cluster.pod]");
        let requests = documented_defaults("[cluster.pod.resources.requests]");
        let limits = documented_defaults("[cluster.pod.resources.limits]");
        let text = format!(
            "{MINIMAL}\n[relay]\naddress = \"0.0.0.0:7443\"\nadvertise_url = \"https://relay.example\"\n\n[[cluster]]\nname = \"c\"\nexecutor = \"pod\"\nkubeconfig = \"k\"\n[cluster.pod]\n{pod}\n[cluster.pod.resources.requests]\n{requests}\n[cluster.pod.resources.limits]\n{limits}"
        );
        let explicit = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            explicit.clusters[1].pod,
            Some(PodSettings::default()),
            "{text}"
        );
    }

    #[test]
    fn missing_listener_or_cluster_is_explained() {
        let err = parse("state_dir = \"s\"\n").unwrap_err();
        assert!(err.to_string().contains("[[listener]]"), "{err}");
    }

    #[test]
    fn the_postgres_store_is_configured_whole_or_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("two-lines"), "s3cret\nmore\n").unwrap();
        let pg = |store: &str| Config::parse(&format!("{MINIMAL}\n[store]\n{store}\n"), dir.path());
        let config = pg("backend = \"postgres\"\nurl = \"postgres://kinvoke@db.internal:5432/kinvoke?sslmode=require\"\npassword_file = \"pw\"\nreplica_id = \"kinvoke-0\"").unwrap();
        // each replica's audit lines name it
        assert_eq!(config.audit.replica.as_deref(), Some("kinvoke-0"));
        let settings = config.store.postgres.unwrap();
        assert_eq!(settings.password.as_deref(), Some("s3cret"));
        assert_eq!(settings.replica_id, "kinvoke-0");
        assert_eq!(settings.max_connections, 16);
        assert!(
            !format!("{settings:?}").contains("s3cret"),
            "the password is never printed"
        );
        let cases = [
            ("backend = \"postgres\"", "store.url"),
            (
                "backend = \"postgres\"\nurl = \"postgres://u:pw@db/k\"",
                "store.url",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/k\"\npath = \"x.db\"",
                "store.path",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/k\"\npassword_file = \"missing\"",
                "store.password_file",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/k\"\nmax_connections = 0",
                "store.max_connections",
            ),
            ("url = \"postgres://u@db/k\"", "store.url"),
            ("backend = \"mysql\"", "store.backend"),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/k\"\npassword_file = \"two-lines\"",
                "store.password_file",
            ),
        ];
        for (store, key) in cases {
            let err = pg(store).unwrap_err().to_string();
            assert!(err.contains(key), "{store}: {err}");
            assert!(!err.contains(":pw@"), "the password is never echoed: {err}");
        }
    }

    #[test]
    fn an_output_head_share_over_100_percent_is_refused() {
        let err = parse(&with_limits("output_head_percent = 101")).unwrap_err();
        assert!(
            err.to_string().contains("limits.output_head_percent")
                && err.to_string().contains("101"),
            "{err}"
        );
        let ok = parse(&with_limits("output_head_percent = 100")).unwrap();
        assert_eq!(ok.limits.output_head_bytes(), ok.limits.max_output_bytes);
        let none = parse(&with_limits("output_head_percent = 0")).unwrap();
        assert_eq!(none.limits.output_head_bytes(), 0);
    }

    #[test]
    fn max_timeout_below_default_is_rejected() {
        let err = parse(&with_limits("max_timeout = \"1m\"")).unwrap_err();
        assert!(err.to_string().contains("limits.max_timeout"), "{err}");
    }

    #[test]
    fn access_settings_are_validated_naming_the_key() {
        let hash = "0".repeat(64);
        let cases: Vec<(String, &str)> = vec![
            (
                MINIMAL.replace(
                    "tls = {",
                    "exposure = \"private\"\nauthorized_ip_ranges = [\"0.0.0.0/0\"]\ntls = {",
                ),
                "listener[0].authorized_ip_ranges",
            ),
            (
                MINIMAL.replace(
                    "tls = {",
                    "authorized_ip_ranges = [\"10.0.0.0/33\"]\ntls = {",
                ),
                "listener[0].authorized_ip_ranges",
            ),
            (
                MINIMAL.replace("tls = {", "authentication = [\"token\"]\ntls = {"),
                "accepts \"token\" but no",
            ),
            (
                MINIMAL.replace("tls = {", "authentication = [\"kerberos\"]\ntls = {"),
                "listener[0].authentication",
            ),
            (
                MINIMAL.replace(", client_ca = \"ca.crt\"", ""),
                "listener[0].tls.client_ca",
            ),
            (
                format!(
                    "{MINIMAL}[[assignment]]\nrole = \"Cluster Admin\"\nscope = \"clusters/nope\"\nprincipal = \"a\"\n"
                ),
                "assignment[0].scope",
            ),
            (
                format!(
                    "{MINIMAL}[[assignment]]\nrole = \"Cluster Admin\"\nscope = \"clusters/*\"\nprincipal = \"a\"\ngroup = \"g\"\n"
                ),
                "exactly one of principal, group or claims",
            ),
            (
                format!(
                    "{MINIMAL}[[assignment]]\nrole = \"Root\"\nscope = \"clusters/*\"\nprincipal = \"a\"\n"
                ),
                "unknown role \"Root\"",
            ),
            (
                format!("{MINIMAL}[[role]]\nname = \"r\"\nactions = [\"runcommand/write\"]\n"),
                "role[0].actions",
            ),
            (
                format!("{MINIMAL}[[authn.static_token]]\nprincipal = \"ci\"\nsha256 = \"xyz\"\n"),
                "authn.static_token[0].sha256",
            ),
            (
                format!(
                    "{MINIMAL}[[authn.oidc]]\nname = \"x\"\nissuer = \"https://i\"\naudiences = [\"k\"]\n"
                ),
                "jwks_file and jwks_url",
            ),
            (
                format!(
                    "{MINIMAL}[[authn.oidc]]\nname = \"x\"\nissuer = \"https://i\"\naudiences = [\"k\"]\njwks_url = \"http://i/jwks\"\n"
                ),
                "authn.oidc[0].jwks_url",
            ),
            (
                format!(
                    "{MINIMAL}[[authn.oidc]]\nname = \"x\"\nissuer = \"https://i\"\naudiences = [\"k\"]\njwks_file = \"j\"\nalgorithms = [\"HS256\"]\n"
                ),
                "authn.oidc[0].algorithms",
            ),
            (
                format!(
                    "{MINIMAL}[[authn.static_token]]\nprincipal = \"ci\"\nsha256 = \"{hash}\"\nrole = \"x\"\n"
                ),
                "unknown field `role`",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn a_public_listener_without_ranges_is_a_warning_not_an_error() {
        let config = parse(&MINIMAL.replace("tls = {", "exposure = \"public\"\ntls = {")).unwrap();
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("open to every address")),
            "{:?}",
            config.warnings
        );
        let config = parse(&MINIMAL.replace(
            "tls = {",
            "exposure = \"public\"\nauthorized_ip_ranges = [\"203.0.113.0/24\"]\ntls = {",
        ))
        .unwrap();
        assert!(
            !config
                .warnings
                .iter()
                .any(|w| w.contains("open to every address"))
        );
        assert!(
            config.listeners[0]
                .authorized_ip_ranges
                .contains("203.0.113.9".parse().unwrap())
        );
    }

    #[test]
    fn token_listeners_do_not_require_client_certificates() {
        let hash = "0".repeat(64);
        let text = format!(
            "{}[[authn.static_token]]\nprincipal = \"ci\"\nsha256 = \"{hash}\"\n",
            MINIMAL.replace("tls = {", "authentication = [\"mtls\", \"token\"]\ntls = {")
        );
        let config = parse(&text).unwrap();
        let auth = config.listeners[0].auth;
        assert!(auth.mtls && auth.tokens && !auth.require_client_cert);
        assert!(
            parse(MINIMAL).unwrap().listeners[0]
                .auth
                .require_client_cert
        );
    }

    /// The TOML blocks of README.md under a heading, so the documented configs stay valid.
    fn readme_toml(after_heading: &str) -> Vec<String> {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find(after_heading).unwrap()..];
        section
            .split("```toml\n")
            .skip(1)
            .map(|block| block[..block.find("```").unwrap()].to_owned())
            .take(1)
            .collect()
    }

    #[test]
    fn the_readme_examples_are_valid_configs() {
        for heading in ["### Worked example", "## Running the gateway"] {
            for block in readme_toml(heading) {
                let config = Config::parse(&block, Path::new("/etc/kinvoke"))
                    .unwrap_or_else(|e| panic!("{heading}: {e}\n{block}"));
                assert!(!config.clusters.is_empty());
            }
        }
        // the break-glass fragment, on top of a minimal config with its cluster
        let fragment = &readme_toml("### Break-glass access")[0];
        let config =
            Config::parse(&format!("{MINIMAL}{fragment}"), Path::new("/etc/kinvoke")).unwrap();
        let rules = config
            .policy
            .assignment("oncall-prod")
            .and_then(|a| a.eligibility.clone())
            .unwrap();
        assert!(rules.justification.check("INC-1234: etcd full").is_ok());
        assert!(rules.justification.check("etcd full").is_err());
        let worked = Config::parse(
            &readme_toml("### Worked example")[0],
            Path::new("/etc/kinvoke"),
        )
        .unwrap();
        assert!(worked.warnings.is_empty(), "{:?}", worked.warnings);
        assert_eq!(worked.listeners.len(), 2);

        // the sandbox fragment: defaults, and a cluster that opts out with a warning
        let fragment = &readme_toml("### The command sandbox")[0];
        let config =
            Config::parse(&format!("{MINIMAL}{fragment}"), Path::new("/etc/kinvoke")).unwrap();
        assert_eq!(config.sandbox, SandboxSettings::default());
        assert_eq!(
            config.cluster("legacy").unwrap().exec.sandbox,
            SandboxMode::Off
        );
        assert_eq!(
            config.cluster("prod-eu").unwrap().exec.sandbox,
            SandboxMode::On
        );
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("WITHOUT the sandbox")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn sandbox_settings_are_validated_naming_the_key() {
        let config = parse(&format!(
            "{MINIMAL}[sandbox]\nextra_read_only_paths = [\"/opt/tools\"]\nwritable_paths = [\"cache\"]\nrun_as_uids = \"200000-200063\"\n"
        ))
        .unwrap();
        assert!(
            config
                .sandbox
                .read_only_paths
                .contains(&PathBuf::from("/usr"))
        );
        assert!(
            config
                .sandbox
                .read_only_paths
                .contains(&PathBuf::from("/opt/tools"))
        );
        assert_eq!(
            config.sandbox.writable_paths,
            [PathBuf::from("/etc/kinvoke/cache")]
        );
        assert_eq!(config.sandbox.run_as_uids, Some(200000..=200063));
        for (toml, key, message) in [
            ("run_as_uids = \"5-9\"", "sandbox.run_as_uids", "below 1000"),
            (
                "run_as_uids = \"200000-200001\"",
                "sandbox.run_as_uids",
                "max_concurrent_commands is 64",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}[sandbox]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(message), "{toml}: {err}");
        }
        let err = parse(&format!("{MINIMAL}[sandbox]\nreadable = []\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("readable"), "{err}");
    }

    #[test]
    fn break_glass_assignments_are_validated() {
        let eligible = |extra: &str| {
            format!(
                "{MINIMAL}[[assignment]]\nname = \"oncall\"\ngroup = \"oncall\"\nrole = \"Cluster Admin\"\nscope = \"clusters/prod-eu\"\n{extra}\n"
            )
        };
        let config = parse(&eligible(
            "eligible = true\nmax_duration = \"30m\"\nrequire_justification = \"^INC-\\\\d+\"\nrequire_approval_from = { group = \"leads\" }",
        ))
        .unwrap();
        let e = config
            .policy
            .assignment("oncall")
            .unwrap()
            .eligibility
            .clone()
            .unwrap();
        assert_eq!(e.max_duration, Duration::from_secs(1800));
        assert!(e.justification.check("INC-42 disk full").is_ok());
        assert!(e.justification.check("disk full").is_err());
        assert_eq!(
            e.approval_from,
            Some(crate::access::authz::Subject::Group("leads".into()))
        );

        let cases = [
            ("eligible = true", "max_duration"),
            (
                "eligible = true\nmax_duration = \"48h\"",
                "between 1s and 24h",
            ),
            ("max_duration = \"1h\"", "add eligible = true"),
            (
                "eligible = true\nmax_duration = \"1h\"\nrequire_justification = false",
                "require_justification",
            ),
            (
                "eligible = true\nmax_duration = \"1h\"\nrequire_justification = \"(\"",
                "not a valid pattern",
            ),
            (
                "eligible = true\nmax_duration = \"1h\"\nrequire_approval_from = { principal = \"a\", group = \"b\" }",
                "require_approval_from",
            ),
        ];
        for (extra, expected) in cases {
            let err = parse(&eligible(extra)).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }

    #[test]
    fn webhooks_must_be_https_except_to_loopback() {
        let with = |url: &str| {
            MINIMAL.replacen(
                "state_dir = \"state\"\n",
                &format!("state_dir = \"state\"\n[break_glass]\nwebhook_url = \"{url}\"\n"),
                1,
            )
        };
        assert!(
            parse(&with("https://chat.example/hook"))
                .unwrap()
                .webhook
                .is_some()
        );
        assert!(parse(&with("http://127.0.0.1:9/hook")).is_ok());
        let err = parse(&with("http://chat.example/hook"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("break_glass.webhook_url"), "{err}");
    }

    #[test]
    fn clusters_name_their_api_server_and_identity_mapping() {
        let with = |extra: &str| {
            MINIMAL.replace(
                "name = \"prod-eu\"",
                &format!("name = \"prod-eu\"\n{extra}"),
            )
        };
        let c = parse(&with(
            "kubeconfig = \"prod.kubeconfig\"\ncontext = \"admin\"",
        ))
        .unwrap();
        assert_eq!(
            c.clusters[0].api,
            Some(ApiServer::Kubeconfig {
                path: PathBuf::from("/etc/kinvoke/prod.kubeconfig"),
                context: Some("admin".into())
            })
        );
        assert_eq!(c.clusters[0].identity, IdentityMapping::default());
        let c = parse(&with("in_cluster = true\nidentity = { user = \"oidc:{claim:email}\", group_prefix = \"kinvoke:\", extra_groups = [\"callers\"] }")).unwrap();
        assert_eq!(c.clusters[0].api, Some(ApiServer::InCluster));
        assert_eq!(c.clusters[0].identity.user, "oidc:{claim:email}");
        assert_eq!(parse(MINIMAL).unwrap().clusters[0].api, None);
        let cases = [
            (
                "kubeconfig = \"k\"\nin_cluster = true",
                "cluster[0].in_cluster",
            ),
            ("context = \"admin\"", "cluster[0].context"),
            (
                "identity = { user = \"{name}\" }",
                "unknown placeholder {name}",
            ),
            ("identity = { user = \"{id\" }", "unclosed"),
            ("identity = { usr = \"x\" }", "unknown field `usr`"),
        ];
        for (extra, expected) in cases {
            let err = parse(&with(extra)).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
        let relay = MINIMAL.replacen(
            "state_dir = \"state\"\n",
            "state_dir = \"state\"\n[relay]\naddress = \"nowhere\"\n",
            1,
        );
        assert!(
            parse(&relay)
                .unwrap_err()
                .to_string()
                .contains("relay.address")
        );
    }
}
