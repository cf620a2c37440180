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
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::digest::{SHA256, digest};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditEvent};
use crate::command::hex;
use crate::pki::CertificateAuthority;

/// Largest request body a command may send through the relay.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

type RelayBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

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
    ca_pem: String,
    tokens: Mutex<HashMap<String, Binding>>,
    clusters: HashMap<String, kube::Client>,
    audit: Audit,
    stop: CancellationToken,
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
        address: SocketAddr,
        clusters: HashMap<String, kube::Client>,
        audit: Audit,
    ) -> Result<Arc<Self>, RelayError> {
        let ca = CertificateAuthority::new("kinvoke relay CA")?;
        let host = address.ip().to_string();
        let names: Vec<&str> = if address.ip().is_unspecified() {
            vec!["127.0.0.1", "localhost"]
        } else {
            vec![host.as_str(), "localhost"]
        };
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
        let relay = Arc::new(Self {
            url: format!("https://{url_host}:{}", local.port()),
            ca_pem: ca.cert_pem(),
            tokens: Mutex::new(HashMap::new()),
            clusters,
            audit,
            stop: CancellationToken::new(),
        });
        tokio::spawn(serve(
            relay.clone(),
            listener,
            TlsAcceptor::from(Arc::new(tls)),
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

    /// Issues a token for a command and the kubeconfig that carries it.
    pub fn issue(&self, binding: Binding) -> Result<Issued, RelayError> {
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
            url = self.url,
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
        let Some(binding) = self.authenticate(req.headers()) else {
            self.audit.record(AuditEvent::RelayRefused {
                command_id: None,
                principal: None,
                verb: verb.to_owned(),
                path,
                reason: "missing, unknown, revoked or expired relay token".to_owned(),
            });
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the kinvoke relay token is missing, unknown or no longer valid (it ends with its command)",
            );
        };
        let refuse = |reason: String, code: StatusCode, kind: &str| {
            self.audit.record(AuditEvent::RelayRefused {
                command_id: Some(binding.command_id.clone()),
                principal: Some(binding.principal.clone()),
                verb: verb.to_owned(),
                path: path.clone(),
                reason: reason.clone(),
            });
            if is_discovery(&path) {
                // kubectl's discovery client shows only text/plain error bodies; a Status
                // there would print as "unknown" on a command's first call
                plain(code, &reason)
            } else {
                status(code, kind, &reason)
            }
        };
        if let Some(name) = req
            .headers()
            .keys()
            .find(|h| h.as_str().starts_with("impersonate-"))
        {
            return refuse(
                format!(
                    "impersonation is not allowed through kinvoke (header {name}): this command acts as {}; remove --as/--as-group/--kube-as-user",
                    binding.identity.user
                ),
                StatusCode::FORBIDDEN,
                "Forbidden",
            );
        }
        if is_upgrade(req.headers()) {
            return refuse(
                "exec, attach and port-forward are not supported through the kinvoke relay yet"
                    .to_owned(),
                StatusCode::FORBIDDEN,
                "Forbidden",
            );
        }
        let Some(client) = self.clusters.get(&binding.cluster) else {
            return refuse(
                format!(
                    "cluster \"{}\" has no API server configured",
                    binding.cluster
                ),
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
            );
        };
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return refuse(
                    format!("request body larger than {MAX_REQUEST_BYTES} bytes"),
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                );
            }
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let mut forward = Request::builder()
            .method(parts.method.clone())
            .uri(path_and_query);
        if let Some(headers) = forward.headers_mut() {
            for (name, value) in &parts.headers {
                if !is_dropped(name) {
                    headers.append(name.clone(), value.clone());
                }
            }
            add_identity(headers, &binding.identity);
        }
        let forward = match forward.body(kube::client::Body::from(body.to_vec())) {
            Ok(r) => r,
            Err(err) => {
                return refuse(
                    format!("bad request: {err}"),
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                );
            }
        };
        let response = match client.send(forward).await {
            Ok(r) => r,
            Err(err) => {
                let reason = format!("the cluster's API server could not be reached: {err}");
                self.audit.record(AuditEvent::RelayRequest {
                    command_id: binding.command_id.clone(),
                    principal: binding.principal.clone(),
                    kube_user: binding.identity.user.clone(),
                    verb: verb.to_owned(),
                    path,
                    namespace,
                    status: 502,
                    duration_ms: crate::audit::duration_ms(started.elapsed()),
                });
                return status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", &reason);
            }
        };
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
        let body = body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) });
        Response::from_parts(parts, UnsyncBoxBody::new(body))
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

async fn serve(relay: Arc<Relay>, listener: TcpListener, tls: TlsAcceptor) {
    loop {
        let (tcp, _) = tokio::select! {
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
        let tls = tls.clone();
        let relay = relay.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let relay = relay.clone();
                async move { Ok::<_, Infallible>(relay.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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

fn add_identity(headers: &mut HeaderMap, id: &KubeIdentity) {
    if let Ok(v) = HeaderValue::from_str(&id.user) {
        headers.insert("impersonate-user", v);
    }
    for g in &id.groups {
        if let Ok(v) = HeaderValue::from_str(g) {
            headers.append("impersonate-group", v);
        }
    }
    for (k, v) in &id.extra {
        let name = format!("impersonate-extra-{}", k.to_ascii_lowercase());
        if let (Ok(name), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(v)) {
            headers.append(name, v);
        }
    }
}

fn token_key(token: &str) -> String {
    hex(digest(&SHA256, token.as_bytes()).as_ref())
}

/// A Kubernetes `Status` error body, so kubectl prints `Error from server (Reason): ...`.
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
        );
        assert_eq!(headers["impersonate-user"], "alice");
        assert_eq!(headers.get_all("impersonate-group").iter().count(), 2);
        assert_eq!(headers["impersonate-extra-kinvoke-command-id"], "abc");
    }
}

/// The Kubernetes identity of a principal on a cluster, per the cluster's mapping;
/// the extras carry the command id, the caller's address and any break-glass grant.
pub fn identity_for(
    mapping: &crate::config::IdentityMapping,
    who: &crate::authn::Principal,
    command_id: &str,
    grant: Option<&crate::access::authz::GrantUse>,
) -> Result<KubeIdentity, String> {
    let mut user = String::new();
    let mut rest = mapping.user.as_str();
    while let Some(start) = rest.find('{') {
        user.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| "the user template has an unclosed '{'".to_owned())?;
        let placeholder = &rest[start + 1..start + end];
        if placeholder == "id" {
            user.push_str(&who.id);
        } else if let Some(claim) = placeholder.strip_prefix("claim:") {
            let value = who
                .claims
                .get(claim)
                .and_then(|v| v.first())
                .ok_or_else(|| format!("the caller's credential has no \"{claim}\" claim, which this cluster maps to its Kubernetes user"))?;
            user.push_str(value);
        } else {
            return Err(format!(
                "unknown placeholder {{{placeholder}}} in the user template"
            ));
        }
        rest = &rest[start + end + 1..];
    }
    user.push_str(rest);
    let mut groups: Vec<String> = Vec::new();
    let principal_groups = who
        .groups
        .iter()
        .filter(|_| mapping.include_groups)
        .map(|g| format!("{}{g}", mapping.group_prefix));
    for g in principal_groups.chain(mapping.extra_groups.iter().cloned()) {
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
    Ok(KubeIdentity {
        user,
        groups,
        extra,
    })
}

#[cfg(test)]
mod identity_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::authn::{AuthMethod, Principal};
    use crate::config::IdentityMapping;

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
                .contains("\"upn\"")
        );
    }
}
