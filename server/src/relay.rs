//! The relay: the impersonating Kubernetes API proxy that commands talk to. A command
//! never holds the gateway's cluster credentials; it gets a kubeconfig with an ephemeral
//! bearer token for this relay, bound to {command id, cluster, principal, deadline} and
//! revoked when the command ends. Each request: check the token; refuse any
//! `Impersonate-*` header the command sent (so `kubectl --as` cannot escalate) and
//! upgrade requests (exec/attach/port-forward); drop its `Authorization`; forward with
//! the gateway's credentials plus `Impersonate-User`/`-Group`/`-Extra-*` of the caller.
//! Responses stream through unbuffered (watch, `logs -f`); request bodies are bounded.
//! Every request is audited with verb, path, namespace, status and duration.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ring::digest::{SHA256, digest};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admission::KeyedSlots;
use crate::audit::{Audit, AuditEvent, clip};
use crate::hex::encode as hex;
use crate::pki::CertificateAuthority;

/// Longest request path an audit line carries, in bytes.
const MAX_AUDITED_PATH: usize = 1024;

/// Requests one command may have in progress through the relay at once (a watch is in
/// progress until it ends); more are answered 429.
const MAX_REQUESTS_PER_COMMAND: usize = 64;

/// Longest a request body may take to arrive whole.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request body a command may send through the relay.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

type RelayBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The relay's settings (`[relay]`): where it listens and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Address (loopback by default: the local executor's commands run here).
    pub address: SocketAddr,
    /// The URL Pods dial to reach the relay (`relay.advertise_url`), e.g. the gateway
    /// Service's in-cluster name; its host is added to the relay's certificate. `None` =
    /// the relay's own address.
    pub advertise_url: Option<AdvertiseUrl>,
    /// Longest wait for an API server's response headers before the relay answers 504
    /// (a watch's body streams for as long as it lasts after that).
    pub response_timeout: Duration,
    /// Connections the relay keeps open at once, all commands together.
    pub max_connections: usize,
    /// How long a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
}

/// `relay.advertise_url`: `https://HOST[:PORT]`, nothing else (no path, query or
/// credentials), since it becomes the `server` of every command Pod's kubeconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseUrl {
    host: String,
    port: Option<u16>,
}

impl AdvertiseUrl {
    /// Parses `https://HOST[:PORT]`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("\"{text}\" is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("\"{text}\" must start with https://"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("\"{text}\" has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("\"{text}\" must not carry credentials"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "\"{text}\" must be https://HOST[:PORT] without a path or query"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(format!("\"{text}\" has no host"));
        }
        Ok(Self {
            host,
            port: authority.port_u16(),
        })
    }

    /// The host name or IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// True when the host is `localhost` or a loopback address.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
    }
}

impl std::fmt::Display for AdvertiseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(port) => write!(f, "https://{host}:{port}"),
            None => write!(f, "https://{host}"),
        }
    }
}

impl RelayConfig {
    /// Default `relay.response_timeout`: client-go's own default request timeout is
    /// none, kubectl's `--request-timeout` is 0; a minute lets slow list calls finish.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default `relay.max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    /// Default `relay.idle_timeout`.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
}

/// The Kubernetes identity a command acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeIdentity {
    /// `Impersonate-User`.
    pub user: String,
    /// `Impersonate-Group`s, de-duplicated.
    pub groups: Vec<String>,
    /// `Impersonate-Extra-<key>` values.
    pub extra: Vec<(String, String)>,
}

/// What a relay token stands for.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The command.
    pub command_id: String,
    /// The cluster it may reach.
    pub cluster: String,
    /// The gateway principal.
    pub principal: String,
    /// Who the cluster sees.
    pub identity: KubeIdentity,
    /// After this the token is refused even if not yet revoked.
    pub deadline: Instant,
}

/// A token issued to one command, with the kubeconfig that carries it.
pub struct Issued {
    /// SHA-256 of the token, the key to revoke it with.
    pub key: String,
    /// kubeconfig YAML for the command (relay URL, relay CA, the token).
    pub kubeconfig: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key", &self.key)
            .field("kubeconfig", &"[redacted]")
            .finish()
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Certificate generation failed.
    #[error("relay certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// TLS setup failed.
    #[error("relay TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding failed.
    #[error("relay cannot listen on {address}: {source}")]
    Bind {
        /// Address.
        address: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// A PEM could not be read back.
    #[error("relay certificate PEM: {0}")]
    Pem(String),
    /// The random source failed.
    #[error("relay token: {0}")]
    Random(getrandom::Error),
}

/// The relay listener and its live tokens.
pub struct Relay {
    url: String,
    /// the URL written in the kubeconfig of commands that run in Pods
    pod_url: String,
    ca_pem: String,
    response_timeout: Duration,
    tokens: Mutex<HashMap<String, Binding>>,
    clusters: HashMap<String, kube::Client>,
    audit: Audit,
    stop: CancellationToken,
    /// Caps the audit lines of refusals per command ("" for those without a valid
    /// token), which a command can repeat at will.
    refusals: crate::audit::Throttle<String>,
    /// Requests in progress per command.
    in_progress: KeyedSlots<String>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the relay (TLS with a fresh in-memory CA) and starts serving.
    pub async fn start(
        settings: &RelayConfig,
        clusters: HashMap<String, kube::Client>,
        audit: Audit,
    ) -> Result<Arc<Self>, RelayError> {
        let address = settings.address;
        let ca = CertificateAuthority::new("kinvoke relay CA")?;
        let host = address.ip().to_string();
        let mut names: Vec<&str> = if address.ip().is_unspecified() {
            vec!["127.0.0.1", "localhost"]
        } else {
            vec![host.as_str(), "localhost"]
        };
        if let Some(advertised) = &settings.advertise_url {
            names.push(advertised.host());
        }
        let cert = ca.server_cert(&names)?;
        use rustls_pki_types::pem::PemObject;
        let chain = vec![
            rustls_pki_types::CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())
                .map_err(|e| RelayError::Pem(e.to_string()))?,
        ];
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
            .map_err(|e| RelayError::Pem(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| RelayError::Bind { address, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| RelayError::Bind { address, source })?;
        let url_host = if local.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            match local.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            }
        };
        let url = format!("https://{url_host}:{}", local.port());
        let relay = Arc::new(Self {
            pod_url: settings
                .advertise_url
                .as_ref()
                .map_or_else(|| url.clone(), ToString::to_string),
            url,
            ca_pem: ca.cert_pem(),
            response_timeout: settings.response_timeout,
            tokens: Mutex::new(HashMap::new()),
            clusters,
            audit,
            stop: CancellationToken::new(),
            refusals: crate::audit::Throttle::new(
                crate::audit::REFUSAL_LINES_PER_SECOND,
                crate::audit::REFUSAL_LINES_BURST,
            ),
            in_progress: KeyedSlots::new(MAX_REQUESTS_PER_COMMAND),
        });
        tokio::spawn(serve(
            relay.clone(),
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            Arc::new(tokio::sync::Semaphore::new(settings.max_connections)),
            settings.idle_timeout,
        ));
        tracing::info!(url = %relay.url, "relay listening");
        Ok(relay)
    }

    /// The relay's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True when commands on this cluster go through the relay.
    pub fn serves(&self, cluster: &str) -> bool {
        self.clusters.contains_key(cluster)
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, Binding>> {
        // single inserts and removes: a poisoned map is still consistent
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The URL Pods dial (`relay.advertise_url`, else [`Relay::url`]).
    pub fn pod_url(&self) -> &str {
        &self.pod_url
    }

    /// Issues a token for a command and the kubeconfig that carries it, whose server is
    /// the relay's own URL, or for a command run in a Pod (`in_pod`) the advertised one.
    pub fn issue(&self, binding: Binding, in_pod: bool) -> Result<Issued, RelayError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(RelayError::Random)?;
        let token = hex(&raw);
        let key = token_key(&token);
        let cluster = binding.cluster.clone();
        self.tokens().insert(key.clone(), binding);
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        let kubeconfig = format!(
            "# written by kinvoke for one command: a token for the kinvoke relay, valid while it runs\n\
             apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {cluster}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\n\
             users:\n\
             - name: kinvoke\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: {cluster}\n  context:\n    cluster: {cluster}\n    user: kinvoke\n    namespace: default\n\
             current-context: {cluster}\n",
            url = if in_pod { &self.pod_url } else { &self.url },
        );
        Ok(Issued { key, kubeconfig })
    }

    /// Revokes a token: any later request with it is refused.
    pub fn revoke(&self, key: &str) {
        self.tokens().remove(key);
    }

    /// Stops accepting connections.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<RelayBody> {
        let started = Instant::now();
        let path = req.uri().path().to_owned();
        let verb = verb_of(req.method(), &path, req.uri().query());
        let namespace = namespace_of(&path);
        let binding = self.authenticate(req.headers());
        let refuse = |refusal: RelayRefusal| self.refuse(refusal, binding.as_ref(), verb, &path);
        let Some(binding) = binding.clone() else {
            return refuse(RelayRefusal::NoToken);
        };
        // in progress until its response body is done with (a watch: until it ends)
        let Some(in_progress) = self.in_progress.try_acquire(&binding.command_id) else {
            return refuse(RelayRefusal::TooManyRequests);
        };
        if let Some(name) = req
            .headers()
            .keys()
            .find(|h| h.as_str().starts_with("impersonate-"))
        {
            return refuse(RelayRefusal::Impersonation {
                header: name.to_string(),
                user: binding.identity.user.clone(),
            });
        }
        if is_upgrade(req.headers()) {
            return refuse(RelayRefusal::Upgrade);
        }
        let Some(client) = self.clusters.get(&binding.cluster) else {
            return refuse(RelayRefusal::NoApiServer {
                cluster: binding.cluster.clone(),
            });
        };
        let (parts, body) = req.into_parts();
        let body = match tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(body, MAX_REQUEST_BYTES).collect(),
        )
        .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => return refuse(RelayRefusal::BodyTooLarge),
            Err(_) => return refuse(RelayRefusal::BodyTimeout),
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let mut forward = match Request::builder()
            .method(parts.method.clone())
            .uri(path_and_query)
            .body(kube::client::Body::from(body.to_vec()))
        {
            Ok(r) => r,
            Err(err) => return refuse(RelayRefusal::BadRequest(err.to_string())),
        };
        let headers = forward.headers_mut();
        for (name, value) in &parts.headers {
            if !is_dropped(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        // a request the relay cannot attribute to the caller never leaves: without
        // Impersonate-User it would act with the gateway's own credentials
        let attributed = add_identity(headers, &binding.identity).and_then(|()| {
            match headers.get("impersonate-user") {
                Some(user) if !user.is_empty() => Ok(()),
                _ => Err(UnsendableIdentity {
                    header: "impersonate-user".to_owned(),
                    problem: "it was not set".to_owned(),
                }),
            }
        });
        if let Err(err) = attributed {
            return refuse(RelayRefusal::Unattributable(err));
        }
        // an API server that is down answers at once (503); one that hangs is given up
        // on after the configured wait (504): a command never waits on it for longer
        let failure = match tokio::time::timeout(self.response_timeout, client.send(forward)).await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("the cluster's API server could not be reached: {err}"),
            )),
            Err(_) => Err((
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "the cluster's API server did not answer within {} (relay.response_timeout)",
                    humantime::format_duration(self.response_timeout)
                ),
            )),
        };
        let response = match failure {
            Ok(response) => response,
            Err((code, reason, message)) => {
                crate::metrics::metrics().relayed(verb, code.as_u16(), started.elapsed());
                self.audit.record(AuditEvent::RelayRequest {
                    command_id: binding.command_id.clone(),
                    principal: binding.principal.clone(),
                    kube_user: binding.identity.user.clone(),
                    verb: verb.to_owned(),
                    path: path.clone(),
                    namespace,
                    status: code.as_u16(),
                    duration_ms: crate::audit::duration_ms(started.elapsed()),
                });
                return status(code, reason, &message);
            }
        };
        crate::metrics::metrics().relayed(verb, response.status().as_u16(), started.elapsed());
        self.audit.record(AuditEvent::RelayRequest {
            command_id: binding.command_id.clone(),
            principal: binding.principal.clone(),
            kube_user: binding.identity.user.clone(),
            verb: verb.to_owned(),
            path,
            namespace,
            status: response.status().as_u16(),
            duration_ms: crate::audit::duration_ms(started.elapsed()),
        });
        let (mut parts, body) = response.into_parts();
        for name in HOP_BY_HOP {
            parts.headers.remove(*name);
        }
        // streamed as it arrives: a watch or `logs -f` is never held whole
        let body = body.map_err(move |e| -> Box<dyn std::error::Error + Send + Sync> {
            let _ = &in_progress;
            Box::new(e)
        });
        Response::from_parts(parts, UnsyncBoxBody::new(body))
    }

    /// The one place a refusal is audited and answered: every refusal path goes
    /// through here, so none can forget its audit record. A command can repeat a
    /// refused request at will, so lines are capped per command (and for requests
    /// without a valid token, together); the next recorded one counts those left out.
    fn refuse(
        &self,
        refusal: RelayRefusal,
        binding: Option<&Binding>,
        verb: &str,
        path: &str,
    ) -> Response<RelayBody> {
        let reason = refusal.to_string();
        let event = |unrecorded_before| AuditEvent::RelayRefused {
            command_id: binding.map(|b| b.command_id.clone()),
            principal: binding.map(|b| b.principal.clone()),
            verb: verb.to_owned(),
            path: clip(path, MAX_AUDITED_PATH),
            reason: reason.clone(),
            unrecorded_before,
        };
        if refusal.always_audited() {
            // an attempt to act as someone else is what the log exists for: never
            // left out, whatever else the command sent
            self.audit.record(event(None));
        } else {
            // each kind has its own budget, so one kind cannot spend another's
            let key = format!(
                "{}/{}",
                binding.map(|b| b.command_id.as_str()).unwrap_or_default(),
                refusal.code().1
            );
            self.audit.record_throttled(&self.refusals, &key, event);
        }
        refusal.response(path, &reason)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Option<Binding> {
        let token = headers
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim();
        let key = token_key(token);
        let mut tokens = self.tokens();
        let binding = tokens.get(&key)?.clone();
        if Instant::now() >= binding.deadline {
            tokens.remove(&key);
            return None;
        }
        Some(binding)
    }
}

/// How long a peer may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts until the relay stops: at most `slots` connections at once (one over is
/// closed at once), a TLS handshake bounded by [`HANDSHAKE_TIMEOUT`], and a connection
/// with no request in progress for `idle` closed, so idle connections cannot hold the
/// relay's file descriptors.
async fn serve(
    relay: Arc<Relay>,
    listener: TcpListener,
    tls: TlsAcceptor,
    slots: Arc<tokio::sync::Semaphore>,
    idle: Duration,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = relay.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(%err, "relay accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "relay connection refused: relay.max_connections reached");
            continue;
        };
        let tls = tls.clone();
        let relay = relay.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            else {
                return;
            };
            let activity = Arc::new(Activity::default());
            let service = {
                let activity = activity.clone();
                hyper::service::service_fn(move |req| {
                    let relay = relay.clone();
                    let busy = activity.begin();
                    async move {
                        let (parts, body) = relay.handle(req).await.into_parts();
                        // in progress until the response body is done with (a watch:
                        // until it ends)
                        let body = body.map_err(move |e| {
                            let _ = &busy;
                            e
                        });
                        Ok::<_, Infallible>(Response::from_parts(parts, UnsyncBoxBody::new(body)))
                    }
                })
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(idle);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = activity.idle_for(idle) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Requests in progress on one relay connection and when the last one ended.
#[derive(Debug)]
struct Activity {
    state: Mutex<(usize, Instant)>,
    changed: tokio::sync::Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            state: Mutex::new((0, Instant::now())),
            changed: tokio::sync::Notify::new(),
        }
    }
}

/// One request in progress; ends on drop.
struct Busy(Arc<Activity>);

impl Activity {
    fn state(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.state().0 += 1;
        self.changed.notify_waiters();
        Busy(self.clone())
    }

    /// Resolves once no request has been in progress for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            let (active, since) = *self.state();
            if active > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until((since + idle).into()) => return,
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.0 = state.0.saturating_sub(1);
        state.1 = Instant::now();
        drop(state);
        self.0.changed.notify_waiters();
    }
}

/// Headers the relay never forwards: the command's credentials, and hop-by-hop ones.
fn is_dropped(name: &HeaderName) -> bool {
    name == http::header::AUTHORIZATION
        || name == http::header::HOST
        || name.as_str().starts_with("impersonate-")
        || HOP_BY_HOP.contains(&name.as_str())
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        || headers
            .get(http::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// An identity the relay cannot put into headers as it is (belt and braces:
/// [`identity_for`] refuses such identities before a command starts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the caller's identity cannot be sent as {header}: {problem}")]
pub struct UnsendableIdentity {
    /// The header that could not be set.
    header: String,
    /// Why.
    problem: String,
}

/// Sets `Impersonate-User`, one `Impersonate-Group` per group and
/// `Impersonate-Extra-<key>` per extra, or fails: a value is never skipped, since a
/// request without them goes out with the gateway's own identity.
fn add_identity(headers: &mut HeaderMap, id: &KubeIdentity) -> Result<(), UnsendableIdentity> {
    let value = |header: &str, v: &str| {
        let problem = if v.is_empty() {
            Some("it is empty".to_owned())
        } else {
            unsendable(v)
        };
        match problem {
            Some(problem) => Err(UnsendableIdentity {
                header: header.to_owned(),
                problem,
            }),
            // raw UTF-8 is what the API server reads; HeaderValue refuses only controls
            None => HeaderValue::from_bytes(v.as_bytes()).map_err(|e| UnsendableIdentity {
                header: header.to_owned(),
                problem: e.to_string(),
            }),
        }
    };
    let user = value("impersonate-user", &id.user)?;
    let mut groups = Vec::with_capacity(id.groups.len());
    for g in &id.groups {
        groups.push(value("impersonate-group", g)?);
    }
    let mut extra = Vec::with_capacity(id.extra.len());
    for (k, v) in &id.extra {
        let name = format!("impersonate-extra-{}", extra_key_escape(k));
        let header = HeaderName::try_from(name.as_str()).map_err(|e| UnsendableIdentity {
            header: name.clone(),
            problem: e.to_string(),
        })?;
        extra.push((header, value(&name, v)?));
    }
    // all or nothing: nothing is set until every value converted
    headers.insert("impersonate-user", user);
    for g in groups {
        headers.append("impersonate-group", g);
    }
    for (name, v) in extra {
        headers.append(name, v);
    }
    Ok(())
}

/// An extra key as a header-name suffix, the way client-go writes it
/// (`transport.headerKeyEscape`) and the Kubernetes docs ask ("the extra name must be
/// lower-case, and any characters which aren't legal in HTTP header labels MUST be utf8
/// and percent-encoded"): lower-cased, then every byte that is not an RFC 7230 token
/// character, and `%` itself, as `%xx` (lower-case hex, as HTTP/2 header names must
/// be; the API server's `url.PathUnescape` reads either case).
fn extra_key_escape(key: &str) -> String {
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b);
    let mut out = String::with_capacity(key.len());
    for b in key.to_lowercase().bytes() {
        if is_token(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn token_key(token: &str) -> String {
    hex(digest(&SHA256, token.as_bytes()).as_ref())
}

/// A Kubernetes `Status` error body, so kubectl prints `Error from server (Reason): ...`.
/// Why the relay refused a request before it reached the cluster.
#[derive(Debug, thiserror::Error)]
enum RelayRefusal {
    /// No token, or one the relay does not (or no longer) know.
    #[error(
        "the kinvoke relay token is missing, unknown or no longer valid (it ends with its command)"
    )]
    NoToken,
    /// The command sent its own `Impersonate-*` header.
    #[error(
        "impersonation is not allowed through kinvoke (header {header}): this command acts as {user}; remove --as/--as-group/--kube-as-user"
    )]
    Impersonation {
        /// The header.
        header: String,
        /// Whom the command acts as.
        user: String,
    },
    /// exec, attach or port-forward (a connection upgrade).
    #[error("exec, attach and port-forward are not supported through the kinvoke relay yet")]
    Upgrade,
    /// The token's cluster has no API server configured.
    #[error("cluster \"{cluster}\" has no API server configured")]
    NoApiServer {
        /// The cluster.
        cluster: String,
    },
    /// The request body is over [`MAX_REQUEST_BYTES`].
    #[error("request body larger than {MAX_REQUEST_BYTES} bytes")]
    BodyTooLarge,
    /// The request body did not arrive whole within [`BODY_TIMEOUT`].
    #[error("request body not received within {}s", BODY_TIMEOUT.as_secs())]
    BodyTimeout,
    /// The command has [`MAX_REQUESTS_PER_COMMAND`] requests in progress already.
    #[error(
        "this command has {MAX_REQUESTS_PER_COMMAND} requests in progress through the kinvoke relay, as many as one command may; wait for one to end"
    )]
    TooManyRequests,
    /// The request cannot be rebuilt for the cluster.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller's identity cannot be set on the request.
    #[error("{0}; the kinvoke relay forwards only requests it can attribute to the caller")]
    Unattributable(UnsendableIdentity),
}

impl RelayRefusal {
    /// Refusals recorded every time, never capped: attempts to act as someone else.
    fn always_audited(&self) -> bool {
        matches!(self, Self::Impersonation { .. } | Self::Unattributable(_))
    }

    /// The HTTP code and the Kubernetes `Status` reason.
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoToken => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            Self::Impersonation { .. } | Self::Upgrade | Self::Unattributable(_) => {
                (StatusCode::FORBIDDEN, "Forbidden")
            }
            Self::NoApiServer { .. } => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            Self::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
            Self::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "Timeout"),
            Self::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
        }
    }

    /// The answer: a Kubernetes `Status` object, or plain text on discovery paths.
    fn response(&self, path: &str, message: &str) -> Response<RelayBody> {
        let (code, reason) = self.code();
        if is_discovery(path) && !matches!(self, Self::NoToken) {
            // kubectl's discovery client shows only text/plain error bodies; a Status
            // there would print as "unknown" on a command's first call
            plain(code, message)
        } else {
            status(code, reason, message)
        }
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<RelayBody> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    respond(code, "application/json", body.to_string())
}

/// True for discovery and version paths (`/api`, `/apis/<g>/<v>`, `/version`, `/openapi/...`).
fn is_discovery(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.first() {
        Some(&"api") => segments.len() <= 2,
        Some(&"apis") => segments.len() <= 3,
        Some(&"version") | Some(&"openapi") => true,
        _ => false,
    }
}

/// A plain-text error body.
fn plain(code: StatusCode, message: &str) -> Response<RelayBody> {
    respond(code, "text/plain; charset=utf-8", message.to_owned())
}

/// A small, fully known response body.
fn respond(code: StatusCode, content_type: &'static str, body: String) -> Response<RelayBody> {
    let mut response = Response::new(UnsyncBoxBody::new(
        Full::new(Bytes::from(body)).map_err(|never| match never {}),
    ));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

/// The Kubernetes verb of a request, as audit logs name it.
pub fn verb_of(method: &Method, path: &str, query: Option<&str>) -> &'static str {
    let watch = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch")
    });
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/<res>[/<name>], /api/v1/namespaces/<ns>/<res>[/<name>[/<sub>]],
    // /apis/<g>/<v>/... : a name follows the resource when the segment count says so
    let base = match segments.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => {
            return if method == Method::GET {
                "get"
            } else {
                "other"
            };
        }
    };
    let rest = segments.len().saturating_sub(base);
    let namespaced = segments.get(base) == Some(&"namespaces") && rest >= 3;
    let named = if namespaced { rest >= 4 } else { rest >= 2 };
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

/// The namespace in a resource path, if any.
pub fn namespace_of(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let i = segments.iter().position(|s| *s == "namespaces")?;
    let ns = segments.get(i + 1)?;
    // /api/v1/namespaces/<ns> is the namespace object itself, still "its" namespace
    Some((*ns).to_owned())
}

/// Maps a principal to the identity the cluster sees (Impersonate-* headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMapping {
    /// User name template: `{id}` is the principal id, `{claim:NAME}` a token claim.
    pub user: String,
    /// Pass the principal's groups on.
    pub include_groups: bool,
    /// Prefix for the principal's groups, e.g. `kinvoke:`.
    pub group_prefix: String,
    /// Groups every caller gets on this cluster.
    pub extra_groups: Vec<String>,
}

impl Default for IdentityMapping {
    fn default() -> Self {
        Self {
            user: "{id}".to_owned(),
            include_groups: true,
            group_prefix: String::new(),
            extra_groups: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_follow_the_path_shape() {
        let cases = [
            (Method::GET, "/api/v1/pods", None, "list"),
            (Method::GET, "/api/v1/namespaces/demo/pods", None, "list"),
            (
                Method::GET,
                "/api/v1/namespaces/demo/pods/web-1",
                None,
                "get",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/demo/pods/web-1/log",
                None,
                "get",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/demo/pods",
                Some("watch=true&rv=1"),
                "watch",
            ),
            (Method::GET, "/api/v1/namespaces", None, "list"),
            (Method::GET, "/api/v1/namespaces/demo", None, "get"),
            (
                Method::POST,
                "/apis/apps/v1/namespaces/demo/deployments",
                None,
                "create",
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/demo/deployments/web",
                None,
                "patch",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/demo/configmaps/c",
                None,
                "delete",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/demo/configmaps",
                None,
                "deletecollection",
            ),
            (Method::GET, "/version", None, "get"),
        ];
        for (method, path, query, verb) in cases {
            assert_eq!(verb_of(&method, path, query), verb, "{method} {path}");
        }
    }

    #[test]
    fn discovery_paths_are_told_from_resource_paths() {
        for p in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps/v1",
            "/version",
            "/openapi/v3",
        ] {
            assert!(is_discovery(p), "{p}");
        }
        for p in [
            "/api/v1/pods",
            "/apis/apps/v1/deployments",
            "/api/v1/namespaces/x/pods",
        ] {
            assert!(!is_discovery(p), "{p}");
        }
    }

    #[test]
    fn namespaces_are_read_from_paths() {
        assert_eq!(
            namespace_of("/api/v1/namespaces/demo/pods"),
            Some("demo".into())
        );
        assert_eq!(
            namespace_of("/apis/apps/v1/namespaces/x/deployments/y"),
            Some("x".into())
        );
        assert_eq!(namespace_of("/api/v1/pods"), None);
    }

    #[test]
    fn the_commands_credentials_and_impersonation_are_never_forwarded() {
        for h in [
            "authorization",
            "impersonate-user",
            "impersonate-group",
            "impersonate-extra-x",
            "connection",
            "host",
        ] {
            assert!(is_dropped(&HeaderName::from_static(h)), "{h}");
        }
        assert!(!is_dropped(&HeaderName::from_static("accept")));
        let mut headers = HeaderMap::new();
        add_identity(
            &mut headers,
            &KubeIdentity {
                user: "alice".into(),
                groups: vec!["devs".into(), "ops".into()],
                extra: vec![("Kinvoke-Command-Id".into(), "abc".into())],
            },
        )
        .unwrap();
        assert_eq!(headers["impersonate-user"], "alice");
        assert_eq!(headers.get_all("impersonate-group").iter().count(), 2);
        assert_eq!(headers["impersonate-extra-kinvoke-command-id"], "abc");
    }

    #[test]
    fn utf8_names_are_sent_as_raw_utf8_header_values() {
        let mut headers = HeaderMap::new();
        add_identity(
            &mut headers,
            &KubeIdentity {
                user: "josé".into(),
                groups: vec!["équipe".into()],
                extra: vec![("kinvoke-source".into(), "10.0.0.7".into())],
            },
        )
        .unwrap();
        assert_eq!(headers["impersonate-user"].as_bytes(), "josé".as_bytes());
        assert_eq!(headers["impersonate-group"].as_bytes(), "équipe".as_bytes());
    }

    #[test]
    fn extra_keys_are_lower_cased_and_percent_encoded_like_client_go() {
        let cases = [
            ("kinvoke-command-id", "kinvoke-command-id"),
            ("Kinvoke-Source", "kinvoke-source"),
            ("example.com/ticket", "example.com%2fticket"),
            ("a b", "a%20b"),
            ("100%", "100%25"),
            ("scopes:read", "scopes%3aread"),
            ("clé", "cl%c3%a9"),
        ];
        for (key, escaped) in cases {
            assert_eq!(extra_key_escape(key), escaped, "{key}");
            let mut headers = HeaderMap::new();
            add_identity(
                &mut headers,
                &KubeIdentity {
                    user: "alice".into(),
                    groups: vec![],
                    extra: vec![(key.into(), "v".into())],
                },
            )
            .unwrap();
            assert_eq!(
                headers[format!("impersonate-extra-{escaped}").as_str()],
                "v"
            );
        }
    }

    #[test]
    fn an_identity_that_cannot_be_sent_whole_sets_no_header_at_all() {
        let alice = |f: &dyn Fn(&mut KubeIdentity)| {
            let mut id = KubeIdentity {
                user: "alice".into(),
                groups: vec!["devs".into()],
                extra: vec![("kinvoke-source".into(), "10.0.0.7".into())],
            };
            f(&mut id);
            id
        };
        let cases: Vec<(KubeIdentity, &str)> = vec![
            (
                alice(&|id| id.user = String::new()),
                "impersonate-user: it is empty",
            ),
            (alice(&|id| id.user = "alice\r\nx".into()), "U+000D"),
            (alice(&|id| id.user = "alice\0".into()), "U+0000"),
            (
                alice(&|id| id.user = "alice ".into()),
                "starts or ends with a space",
            ),
            (
                alice(&|id| id.groups.push("ops\n".into())),
                "impersonate-group",
            ),
            (
                alice(&|id| id.extra[0].1 = "x\ty".into()),
                "impersonate-extra-kinvoke-source",
            ),
        ];
        for (id, expected) in cases {
            let mut headers = HeaderMap::new();
            let err = add_identity(&mut headers, &id).unwrap_err().to_string();
            assert!(err.contains(expected), "{id:?}: {err}");
            assert!(headers.is_empty(), "{id:?} left {headers:?}");
        }
    }
}

/// Why a caller cannot be given a Kubernetes identity the relay can send as it is. The
/// command is refused (`PERMISSION_DENIED`) rather than run with a changed or missing
/// identity: a value dropped from the `Impersonate-*` headers would leave the request
/// to the gateway's own credentials, or to the API server's interpretation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The user template names a claim the caller's credential does not have.
    #[error(
        "the caller's credential has no \"{claim}\" claim, which template \"{template}\" maps to the Kubernetes user; the cluster's identity.user needs a claim every caller has"
    )]
    MissingClaim {
        /// The claim.
        claim: String,
        /// The cluster's `identity.user`.
        template: String,
    },
    /// The user template cannot be expanded (config validation refuses such templates).
    #[error("the user template \"{template}\" {problem}; use {{id}} or {{claim:NAME}}")]
    BadTemplate {
        /// The cluster's `identity.user`.
        template: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The mapped user is empty.
    #[error(
        "the Kubernetes user mapped from {from} by template \"{template}\" is empty; a command cannot run without a user to impersonate (the caller's credential must give it a value, or the cluster's identity.user must change)"
    )]
    EmptyUser {
        /// The placeholders that gave nothing, e.g. `claim "nick"`.
        from: String,
        /// The cluster's `identity.user`.
        template: String,
    },
    /// A value the relay would send holds what an HTTP header cannot carry as it is.
    #[error(
        "the Kubernetes {what} {value:?} mapped from {from} {problem}, which an {header} header cannot carry as it is; the command is refused rather than run as someone else"
    )]
    Unsendable {
        /// `user`, `group` or `extra value`.
        what: &'static str,
        /// The value, printed escaped.
        value: String,
        /// Where it came from, e.g. `claim "sub" by template "{claim:sub}"`.
        from: String,
        /// What is wrong, e.g. `contains the control character U+000D`.
        problem: String,
        /// The header it was meant for.
        header: &'static str,
    },
}

/// What keeps `value` from being sent as it is in an HTTP header: a control character
/// (`HeaderValue` refuses all but tab, and a CR or LF could forge headers elsewhere), or
/// a space at either end (receivers strip it, so `"alice "` would arrive as `"alice"`).
/// Raw UTF-8 is fine: Kubernetes reads header bytes as they come.
fn unsendable(value: &str) -> Option<String> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Some(format!(
            "contains the control character U+{:04X}",
            u32::from(c)
        ));
    }
    if value.starts_with(' ') || value.ends_with(' ') {
        return Some("starts or ends with a space, which HTTP drops".to_owned());
    }
    None
}

/// The Kubernetes identity of a principal on a cluster, per the cluster's mapping;
/// the extras carry the command id, the caller's address and any break-glass grant.
/// Every value is checked here, so the relay can always send all of them.
pub fn identity_for(
    mapping: &IdentityMapping,
    who: &crate::authn::Principal,
    command_id: &str,
    grant: Option<&crate::access::authz::GrantUse>,
) -> Result<KubeIdentity, IdentityError> {
    let template = mapping.user.as_str();
    // each piece of the user with where it came from, to name the source in a refusal
    let mut pieces: Vec<(String, String)> = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        pieces.push(("the template's text".to_owned(), rest[..start].to_owned()));
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| IdentityError::BadTemplate {
                template: template.to_owned(),
                problem: "has an unclosed '{'".to_owned(),
            })?;
        let placeholder = &rest[start + 1..start + end];
        if placeholder == "id" {
            pieces.push(("the principal id".to_owned(), who.id.clone()));
        } else if let Some(claim) = placeholder.strip_prefix("claim:") {
            let value = who
                .claims
                .get(claim)
                .and_then(|v| v.first())
                .ok_or_else(|| IdentityError::MissingClaim {
                    claim: claim.to_owned(),
                    template: template.to_owned(),
                })?;
            pieces.push((format!("claim \"{claim}\""), value.clone()));
        } else {
            return Err(IdentityError::BadTemplate {
                template: template.to_owned(),
                problem: format!("has an unknown placeholder {{{placeholder}}}"),
            });
        }
        rest = &rest[start + end + 1..];
    }
    pieces.push(("the template's text".to_owned(), rest.to_owned()));
    let user: String = pieces.iter().map(|(_, v)| v.as_str()).collect();
    let placeholders = || {
        let named: Vec<&str> = pieces
            .iter()
            .map(|(from, _)| from.as_str())
            .filter(|from| *from != "the template's text")
            .collect();
        named.join(" and ")
    };
    if user.is_empty() {
        return Err(IdentityError::EmptyUser {
            from: placeholders(),
            template: template.to_owned(),
        });
    }
    if let Some(problem) = unsendable(&user) {
        // name the piece holding the control character when there is one
        let culprit = pieces
            .iter()
            .find(|(_, v)| v.chars().any(char::is_control))
            .map_or_else(placeholders, |(from, _)| from.clone());
        return Err(IdentityError::Unsendable {
            what: "user",
            value: user,
            from: format!("{culprit} by template \"{template}\""),
            problem,
            header: "Impersonate-User",
        });
    }

    let mut groups: Vec<String> = Vec::new();
    let principal_groups = who
        .groups
        .iter()
        .filter(|_| mapping.include_groups)
        .map(|g| {
            (
                format!("{}{g}", mapping.group_prefix),
                "the caller's groups",
            )
        });
    let extra_groups = mapping
        .extra_groups
        .iter()
        .map(|g| (g.clone(), "the cluster's identity.extra_groups"));
    for (g, from) in principal_groups.chain(extra_groups) {
        // an empty group is as meaningless to RBAC as it is easy to drop by accident
        let problem = if g.is_empty() {
            Some("is empty".to_owned())
        } else {
            unsendable(&g)
        };
        if let Some(problem) = problem {
            return Err(IdentityError::Unsendable {
                what: "group",
                value: g,
                from: from.to_owned(),
                problem,
                header: "Impersonate-Group",
            });
        }
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let mut extra = vec![
        ("kinvoke-command-id".to_owned(), command_id.to_owned()),
        ("kinvoke-source".to_owned(), who.source.to_string()),
    ];
    if let Some(g) = grant {
        extra.push(("kinvoke-break-glass-grant".to_owned(), g.id.clone()));
    }
    for (key, value) in &extra {
        if let Some(problem) = unsendable(value) {
            return Err(IdentityError::Unsendable {
                what: "extra value",
                value: value.clone(),
                from: format!("the gateway's {key}"),
                problem,
                header: "Impersonate-Extra-*",
            });
        }
    }
    Ok(KubeIdentity {
        user,
        groups,
        extra,
    })
}

#[cfg(test)]
mod refusal_tests {
    use std::time::Duration;

    use base64::Engine;
    use rustls_pki_types::pem::PemObject;

    use super::*;
    use crate::audit::{AuditConfig, FsyncPolicy};

    /// A relay in front of a cluster it must never reach: its API server address is a
    /// closed port, so a request that got through would come back 503, not 403.
    async fn relay(dir: &std::path::Path) -> (Arc<Relay>, Audit, AuditConfig) {
        relay_with(dir, "https://127.0.0.1:9", settings()).await
    }

    fn settings() -> RelayConfig {
        RelayConfig {
            advertise_url: None,
            address: "127.0.0.1:0".parse().unwrap(),
            response_timeout: Duration::from_secs(5),
            max_connections: 16,
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// A relay for cluster `c`, whose API server is at `upstream`.
    async fn relay_with(
        dir: &std::path::Path,
        upstream: &str,
        settings: RelayConfig,
    ) -> (Arc<Relay>, Audit, AuditConfig) {
        let config = AuditConfig {
            path: dir.join("audit.jsonl"),
            fsync: FsyncPolicy::Batch(Duration::from_millis(1)),
            max_file_bytes: 1 << 20,
            tracing: false,
            replica: None,
        };
        let audit = Audit::open(&config).unwrap();
        let mut cluster = kube::Config::new(upstream.parse().unwrap());
        cluster.accept_invalid_certs = true;
        let client = kube::Client::try_from(cluster).unwrap();
        let relay = Relay::start(
            &settings,
            HashMap::from([("c".to_owned(), client)]),
            audit.clone(),
        )
        .await
        .unwrap();
        (relay, audit, config)
    }

    /// Every audit event written so far: a durable event first, so the lines queued
    /// before it are in the file too.
    async fn audit_events(audit: &Audit, config: &AuditConfig) -> Vec<serde_json::Value> {
        audit
            .record_durable(AuditEvent::GatewayStopped {
                reason: "test".into(),
            })
            .await
            .unwrap();
        std::fs::read_to_string(&config.path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect()
    }

    /// The token and CA of an issued kubeconfig.
    fn credentials(kubeconfig: &str) -> (String, Vec<u8>) {
        let field = |name: &str| {
            kubeconfig
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        let ca = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data:"))
            .unwrap();
        (field("token:"), ca)
    }

    /// A TLS client configuration trusting only the relay's CA.
    fn client_tls(ca_pem: &[u8]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    fn https_client(ca_pem: &[u8]) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(client_tls(ca_pem))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_the_relay_cannot_give_an_impersonate_user_is_refused_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let (relay, audit, config) = relay(dir.path()).await;
        // identities identity_for would have refused: the relay must not trust that
        for (n, user) in ["", "alice\r\nImpersonate-User: system:admin", "alice\0"]
            .into_iter()
            .enumerate()
        {
            let command_id = format!("cmd-{n}");
            let issued = relay
                .issue(
                    Binding {
                        command_id: command_id.clone(),
                        cluster: "c".into(),
                        principal: "alice".into(),
                        identity: KubeIdentity {
                            user: user.to_owned(),
                            groups: vec!["devs".into()],
                            extra: vec![],
                        },
                        deadline: Instant::now() + Duration::from_secs(60),
                    },
                    false,
                )
                .unwrap();
            let (token, ca) = credentials(&issued.kubeconfig);
            let response = https_client(&ca)
                .get(format!("{}/api/v1/namespaces/demo/pods", relay.url()))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{user:?}");
            let body: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            assert_eq!(body["kind"], "Status", "{body}");
            assert_eq!(body["reason"], "Forbidden", "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.starts_with("the caller's identity cannot be sent as impersonate-user: ")
                    && message.ends_with(
                        "the kinvoke relay forwards only requests it can attribute to the caller"
                    ),
                "{user:?}: {message}"
            );
            let events = audit_events(&audit, &config).await;
            let refused = events
                .iter()
                .find(|e| e["event"] == "relay_refused" && e["command_id"] == command_id.as_str())
                .unwrap_or_else(|| panic!("no relay_refused for {user:?}:\n{events:?}"));
            assert_eq!(refused["principal"], "alice", "{refused}");
            assert_eq!(refused["path"], "/api/v1/namespaces/demo/pods", "{refused}");
        }
        relay.shutdown();
    }

    /// An "API server" that accepts connections and never says a word: its URL, and
    /// the task holding them (abort it to close them).
    async fn hanging_api_server() -> (String, tokio::task::JoinHandle<()>) {
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("https://{}", hanging.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((tcp, _)) = hanging.accept().await {
                open.push(tcp);
            }
        });
        (upstream, held)
    }

    /// A valid token of cluster `c` for `alice`.
    fn alices_token(relay: &Relay) -> (String, Vec<u8>) {
        let issued = relay
            .issue(
                Binding {
                    command_id: "cmd-fault".into(),
                    cluster: "c".into(),
                    principal: "alice".into(),
                    identity: KubeIdentity {
                        user: "alice".into(),
                        groups: vec![],
                        extra: vec![],
                    },
                    deadline: Instant::now() + Duration::from_secs(60),
                },
                false,
            )
            .unwrap();
        credentials(&issued.kubeconfig)
    }

    async fn relayed_status(
        relay: &Relay,
        audit: &Audit,
        config: &AuditConfig,
    ) -> (u16, serde_json::Value, serde_json::Value) {
        let (token, ca) = alices_token(relay);
        let response = https_client(&ca)
            .get(format!("{}/api/v1/namespaces/demo/pods", relay.url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let code = response.status().as_u16();
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let events = audit_events(audit, config).await;
        let event = events
            .into_iter()
            .find(|e| e["event"] == "relay_request")
            .expect("a relay_request event");
        (code, body, event)
    }

    #[tokio::test]
    async fn refusals_without_a_token_cannot_flood_the_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let (relay, audit, config) = relay(dir.path()).await;
        let (_, ca) = alices_token(&relay);
        let client = https_client(&ca);
        let long = format!("/api/v1/namespaces/{}/pods", "n".repeat(5000));
        for _ in 0..200 {
            let response = client
                .get(format!("{}{long}", relay.url()))
                .bearer_auth("not-a-token")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        let refused: Vec<serde_json::Value> = audit_events(&audit, &config)
            .await
            .into_iter()
            .filter(|e| e["event"] == "relay_refused")
            .collect();
        assert!(
            (50..100).contains(&refused.len()),
            "{} lines for 200 refusals",
            refused.len()
        );
        // the 5 KB path is cut, and says so
        assert!(refused.iter().all(|e| {
            let path = e["path"].as_str().unwrap();
            path.len() <= 1100 && path.ends_with(&format!("…[cut: {} bytes in all]", long.len()))
        }));
        relay.shutdown();
    }

    #[tokio::test]
    async fn refusals_a_command_repeats_with_its_own_token_are_capped_too() {
        let dir = tempfile::tempdir().unwrap();
        let (relay, audit, config) = relay(dir.path()).await;
        let (token, ca) = alices_token(&relay);
        let client = https_client(&ca);
        for _ in 0..200 {
            let response = client
                .get(format!("{}/api/v1/namespaces/demo/pods", relay.url()))
                .bearer_auth(&token)
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
        }
        let refused = audit_events(&audit, &config)
            .await
            .iter()
            .filter(|e| e["event"] == "relay_refused")
            .count();
        assert!(
            (50..100).contains(&refused),
            "{refused} lines for 200 refusals"
        );
        relay.shutdown();
    }

    #[tokio::test]
    async fn an_impersonation_attempt_is_audited_even_after_a_flood_of_other_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let (relay, audit, config) = relay(dir.path()).await;
        let (token, ca) = alices_token(&relay);
        let client = https_client(&ca);
        let url = format!("{}/api/v1/namespaces/demo/pods", relay.url());
        for _ in 0..100 {
            let upgrade = client
                .get(&url)
                .bearer_auth(&token)
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket")
                .send()
                .await
                .unwrap();
            assert_eq!(upgrade.status(), StatusCode::FORBIDDEN);
        }
        for _ in 0..3 {
            let impersonating = client
                .get(&url)
                .bearer_auth(&token)
                .header("Impersonate-User", "system:admin")
                .send()
                .await
                .unwrap();
            assert_eq!(impersonating.status(), StatusCode::FORBIDDEN);
        }
        let impersonations = audit_events(&audit, &config)
            .await
            .iter()
            .filter(|e| {
                e["event"] == "relay_refused"
                    && e["reason"]
                        .as_str()
                        .unwrap()
                        .contains("impersonation is not allowed")
            })
            .count();
        assert_eq!(impersonations, 3);
        relay.shutdown();
    }

    #[tokio::test]
    async fn one_command_may_have_only_so_many_requests_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, held) = hanging_api_server().await;
        let mut settings = settings();
        settings.response_timeout = Duration::from_secs(30);
        settings.max_connections = 4 * MAX_REQUESTS_PER_COMMAND;
        let (relay, _audit, _config) = relay_with(dir.path(), &upstream, settings).await;
        let (token, ca) = alices_token(&relay);
        let client = https_client(&ca);
        let url = format!("{}/api/v1/namespaces/demo/pods", relay.url());
        let waiting: Vec<_> = (0..MAX_REQUESTS_PER_COMMAND)
            .map(|_| {
                let request = client.get(&url).bearer_auth(&token).send();
                tokio::spawn(request)
            })
            .collect();
        // every one of them in progress at the relay (bounded: a failed request would
        // never get there)
        let deadline = Instant::now() + Duration::from_secs(30);
        while relay.in_progress.held(&"cmd-fault".to_owned()) < MAX_REQUESTS_PER_COMMAND {
            assert!(
                Instant::now() < deadline,
                "the requests never got in progress"
            );
            tokio::task::yield_now().await;
        }
        let over = client.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
        for request in waiting {
            request.abort();
        }
        held.abort();
        relay.shutdown();
    }

    #[tokio::test]
    async fn an_api_server_that_refuses_connections_is_answered_503() {
        let dir = tempfile::tempdir().unwrap();
        let (relay, audit, config) = relay(dir.path()).await;
        let (code, body, event) = relayed_status(&relay, &audit, &config).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["reason"], "ServiceUnavailable", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("the cluster's API server could not be reached"),
            "{body}"
        );
        assert_eq!(event["status"], 503, "{event}");
        relay.shutdown();
    }

    #[tokio::test]
    async fn an_api_server_that_hangs_is_answered_504_after_the_response_timeout() {
        let dir = tempfile::tempdir().unwrap();
        // accepts connections and never says a word
        let (upstream, held) = hanging_api_server().await;
        let mut settings = settings();
        settings.response_timeout = Duration::from_millis(300);
        let (relay, audit, config) = relay_with(dir.path(), &upstream, settings).await;
        let (code, body, event) = relayed_status(&relay, &audit, &config).await;
        assert_eq!(code, 504, "{body}");
        assert_eq!(body["reason"], "Timeout", "{body}");
        assert_eq!(
            body["message"],
            "the cluster's API server did not answer within 300ms (relay.response_timeout)"
        );
        assert_eq!(event["status"], 504, "{event}");
        assert!(event["duration_ms"].as_u64().unwrap() >= 300, "{event}");
        held.abort();
        relay.shutdown();
    }

    /// A TLS connection to the relay, handshake done, or why there is none.
    async fn tls_connection(
        relay: &Relay,
        ca: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let config = client_tls(ca);
        let tcp =
            tokio::net::TcpStream::connect(relay.url().trim_start_matches("https://")).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
    }

    /// Reads until the peer closes the connection (or it fails), within `limit`.
    async fn closed_within(
        stream: &mut (impl tokio::io::AsyncRead + Unpin),
        limit: Duration,
    ) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_connections_over_the_cap_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings();
        settings.max_connections = 1;
        settings.idle_timeout = Duration::from_millis(200);
        let (relay, _audit, _config) =
            relay_with(dir.path(), "https://127.0.0.1:9", settings).await;
        let (_, ca) = alices_token(&relay);
        // one connection, handshake done, never a request: it holds the one place
        let mut idle = tls_connection(&relay, &ca).await.unwrap();
        // a second is closed at once, before any TLS
        let addr = relay.url().trim_start_matches("https://").to_owned();
        let mut over = tokio::net::TcpStream::connect(&addr).await.unwrap();
        assert!(
            closed_within(&mut over, Duration::from_secs(5)).await,
            "a connection over relay.max_connections stayed open"
        );
        // the idle one is closed after the idle timeout
        assert!(
            closed_within(&mut idle, Duration::from_secs(10)).await,
            "an idle connection stayed open"
        );
        // and its place is free again
        let mut again = None;
        for _ in 0..100 {
            if let Ok(stream) = tls_connection(&relay, &ca).await {
                again = Some(stream);
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            again.is_some(),
            "no place given back after the idle connection closed"
        );
        relay.shutdown();
    }
}

#[cfg(test)]
mod identity_tests {
    use std::collections::BTreeMap;

    use super::IdentityMapping;
    use super::*;
    use crate::authn::{AuthMethod, Principal};

    fn alice() -> Principal {
        Principal {
            id: "alice".into(),
            groups: vec!["devs".into(), "ops".into(), "devs".into()],
            claims: BTreeMap::from([("email".to_owned(), vec!["alice@corp.example".to_owned()])]),
            subject: String::new(),
            auth_method: AuthMethod::Oidc,
            source: "10.0.0.7".parse().unwrap(),
            listener: "main".into(),
        }
    }

    #[test]
    fn the_default_mapping_passes_the_principal_and_its_groups() {
        let id = identity_for(&IdentityMapping::default(), &alice(), "c1", None).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.groups, ["devs", "ops"]);
        assert!(
            id.extra
                .contains(&("kinvoke-command-id".into(), "c1".into()))
        );
        assert!(
            id.extra
                .contains(&("kinvoke-source".into(), "10.0.0.7".into()))
        );
    }

    #[test]
    fn templates_prefixes_and_extra_groups_apply() {
        let mapping = IdentityMapping {
            user: "oidc:{claim:email}".into(),
            include_groups: true,
            group_prefix: "kinvoke:".into(),
            extra_groups: vec!["kinvoke:callers".into()],
        };
        let grant = crate::access::authz::GrantUse {
            id: "g9".into(),
            justification: "x".into(),
        };
        let id = identity_for(&mapping, &alice(), "c1", Some(&grant)).unwrap();
        assert_eq!(id.user, "oidc:alice@corp.example");
        assert_eq!(
            id.groups,
            ["kinvoke:devs", "kinvoke:ops", "kinvoke:callers"]
        );
        assert!(
            id.extra
                .contains(&("kinvoke-break-glass-grant".into(), "g9".into()))
        );
        let missing = IdentityMapping {
            user: "{claim:upn}".into(),
            ..IdentityMapping::default()
        };
        assert!(
            identity_for(&missing, &alice(), "c1", None)
                .unwrap_err()
                .to_string()
                .contains("\"upn\"")
        );
    }

    fn with_claim(name: &str, value: &str) -> Principal {
        let mut who = alice();
        who.claims.insert(name.to_owned(), vec![value.to_owned()]);
        who
    }

    fn user_template(user: &str) -> IdentityMapping {
        IdentityMapping {
            user: user.to_owned(),
            ..IdentityMapping::default()
        }
    }

    #[test]
    fn an_empty_mapped_user_is_refused_naming_the_claim_and_template() {
        let err = identity_for(
            &user_template("{claim:nick}"),
            &with_claim("nick", ""),
            "c1",
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            IdentityError::EmptyUser {
                from: "claim \"nick\"".into(),
                template: "{claim:nick}".into(),
            }
        );
        assert!(
            err.to_string().starts_with(
                "the Kubernetes user mapped from claim \"nick\" by template \"{claim:nick}\" is empty; "
            ),
            "{err}"
        );
        let mut nobody = alice();
        nobody.id = String::new();
        assert!(matches!(
            identity_for(&IdentityMapping::default(), &nobody, "c1", None),
            Err(IdentityError::EmptyUser { .. })
        ));
    }

    #[test]
    fn a_mapped_user_with_control_characters_is_refused_never_trimmed() {
        let cases = [
            ("alice\r\nx", "U+000D"),
            ("alice\nImpersonate-Group: system:masters", "U+000A"),
            ("\0alice", "U+0000"),
            ("alice\0", "U+0000"),
            ("ali\x7fce", "U+007F"),
            ("alice\u{85}", "U+0085"),
            ("alice\t", "U+0009"),
            (" alice", "starts or ends with a space"),
            ("alice ", "starts or ends with a space"),
        ];
        for (sub, problem) in cases {
            let err = identity_for(
                &user_template("{claim:sub}"),
                &with_claim("sub", sub),
                "c1",
                None,
            )
            .unwrap_err();
            let IdentityError::Unsendable {
                what, value, from, ..
            } = &err
            else {
                panic!("{sub:?}: {err:?}");
            };
            assert_eq!((*what, value.as_str()), ("user", sub));
            assert_eq!(from, "claim \"sub\" by template \"{claim:sub}\"");
            let message = err.to_string();
            assert!(message.contains(problem), "{sub:?}: {message}");
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
        // the piece holding the control character is named, not the template's text
        let err = identity_for(
            &user_template("oidc:{id}/{claim:sub}"),
            &with_claim("sub", "x\ny"),
            "c1",
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("mapped from claim \"sub\" by template \"oidc:{id}/{claim:sub}\""),
            "{err}"
        );
        // the principal id itself, through the default template
        let mut who = alice();
        who.id = "alice\r\n".into();
        let err = identity_for(&IdentityMapping::default(), &who, "c1", None).unwrap_err();
        assert!(
            err.to_string()
                .contains("the principal id by template \"{id}\""),
            "{err}"
        );
    }

    #[test]
    fn utf8_users_and_groups_are_kept_as_they_are() {
        let mut who = with_claim("nick", "josé");
        who.groups = vec!["équipe".into(), "開発".into()];
        let id = identity_for(&user_template("{claim:nick}"), &who, "c1", None).unwrap();
        assert_eq!(id.user, "josé");
        assert_eq!(id.groups, ["équipe", "開発"]);
    }

    #[test]
    fn groups_that_cannot_be_sent_are_refused_not_dropped() {
        let mut who = alice();
        who.groups = vec!["devs".into(), "ops\r\n".into()];
        let err = identity_for(&IdentityMapping::default(), &who, "c1", None).unwrap_err();
        assert!(
            matches!(&err, IdentityError::Unsendable { what: "group", from, .. } if from == "the caller's groups"),
            "{err:?}"
        );
        who.groups = vec![String::new()];
        let err = identity_for(&IdentityMapping::default(), &who, "c1", None).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        // a caller's bad group does not matter where groups are not passed on
        let mapping = IdentityMapping {
            include_groups: false,
            extra_groups: vec!["kinvoke:callers\0".into()],
            ..IdentityMapping::default()
        };
        let err = identity_for(&mapping, &who, "c1", None).unwrap_err();
        assert!(
            matches!(&err, IdentityError::Unsendable { what: "group", from, .. } if from == "the cluster's identity.extra_groups"),
            "{err:?}"
        );
    }

    #[test]
    fn extra_values_that_cannot_be_sent_are_refused() {
        let err = identity_for(&IdentityMapping::default(), &alice(), "c1\n", None).unwrap_err();
        assert!(
            matches!(
                &err,
                IdentityError::Unsendable {
                    what: "extra value",
                    ..
                }
            ),
            "{err:?}"
        );
        let grant = crate::access::authz::GrantUse {
            id: "g\r9".into(),
            justification: "x".into(),
        };
        assert!(identity_for(&IdentityMapping::default(), &alice(), "c1", Some(&grant)).is_err());
    }

    #[test]
    fn every_identity_identity_for_accepts_can_be_sent_whole() {
        let mut who = with_claim("nick", "josé");
        who.groups = vec!["équipe".into(), "ops".into()];
        let mapping = IdentityMapping {
            user: "sso:{claim:nick}".into(),
            include_groups: true,
            group_prefix: "kinvoke:".into(),
            extra_groups: vec!["kinvoke:callers".into()],
        };
        let id = identity_for(&mapping, &who, "c1", None).unwrap();
        let mut headers = HeaderMap::new();
        add_identity(&mut headers, &id).unwrap();
        assert_eq!(
            headers["impersonate-user"].as_bytes(),
            "sso:josé".as_bytes()
        );
        assert_eq!(headers.get_all("impersonate-group").iter().count(), 3);
    }
}
