//! Where a bearer token comes from (`--token-source`), so a CI job needs no glue to
//! fetch its identity token:
//! - `github-actions`: the job's OIDC token from GitHub's token endpoint
//!   (`ACTIONS_ID_TOKEN_REQUEST_URL`, with `ACTIONS_ID_TOKEN_REQUEST_TOKEN`; the job needs
//!   `permissions: id-token: write`), for `--audience` (default `kinvoke`);
//! - `azure-pipelines:SERVICE_CONNECTION_ID`: the pipeline's OIDC token for a service
//!   connection (`SYSTEM_OIDCREQUESTURI`, with `SYSTEM_ACCESSTOKEN` mapped into the step);
//! - `gitlab:VAR`: a GitLab `id_tokens` variable;
//! - `env:VAR`: any environment variable;
//! - `file:PATH`: a file, read again whenever it changes (a Kubernetes projected
//!   service-account token is rotated in place).
//!
//! Tokens fetched over HTTP are fetched again a minute before their `exp`, so a long
//! session's later calls carry a fresh one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;

use crate::conn::{LocalError, Token};

/// Default `--audience`: what a kinvoke gateway's OIDC issuer expects by default.
pub const DEFAULT_AUDIENCE: &str = "kinvoke";

/// How long before its expiry a fetched token is replaced.
const REFRESH_BEFORE: Duration = Duration::from_secs(60);

/// The shortest wait between two fetches of a token source by the refresh task.
const MIN_REFETCH: Duration = Duration::from_secs(30);

/// How long a token request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A parsed `--token-source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// GitHub Actions' OIDC token endpoint.
    GitHubActions,
    /// Azure Pipelines' OIDC endpoint, for this service connection.
    AzurePipelines(String),
    /// A GitLab `id_tokens` variable.
    GitLab(String),
    /// An environment variable.
    Env(String),
    /// A file, re-read when it changes.
    File(PathBuf),
}

impl std::fmt::Display for TokenSource {
    /// The form `--token-source` takes, e.g. `gitlab:KINVOKE_ID_TOKEN`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GitHubActions => f.write_str("github-actions"),
            Self::AzurePipelines(id) => write!(f, "azure-pipelines:{id}"),
            Self::GitLab(var) => write!(f, "gitlab:{var}"),
            Self::Env(var) => write!(f, "env:{var}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl std::str::FromStr for TokenSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, arg) = text.split_once(':').unwrap_or((text, ""));
        let need = |what: &str| {
            if arg.is_empty() {
                Err(format!(
                    "token source {kind}: needs {what}, as {kind}:{}",
                    what.to_uppercase().replace(' ', "_")
                ))
            } else {
                Ok(arg.to_owned())
            }
        };
        match kind {
            "github-actions" if arg.is_empty() => Ok(Self::GitHubActions),
            "azure-pipelines" => need("service connection id").map(Self::AzurePipelines),
            "gitlab" => need("variable").map(Self::GitLab),
            "env" => need("variable").map(Self::Env),
            "file" => need("path").map(|p| Self::File(PathBuf::from(p))),
            _ => Err(format!(
                "unknown token source {text:?}; use github-actions, azure-pipelines:SERVICE_CONNECTION_ID, \
                 gitlab:VAR, env:VAR or file:PATH"
            )),
        }
    }
}

/// Reads an environment variable (the process's, or a test's stand-in).
type EnvReader = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A token source and what it last gave; shared by the connection's interceptor.
#[derive(Clone)]
pub struct TokenProvider {
    source: TokenSource,
    audience: String,
    env: EnvReader,
    current: Arc<Mutex<Option<Fetched>>>,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("source", &self.source)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Fetched {
    token: Token,
    /// `exp` of a JWT, when it has one.
    expires: Option<SystemTime>,
    /// The file's modification time, for `file:`.
    modified: Option<SystemTime>,
}

fn lock(current: &Mutex<Option<Fetched>>) -> std::sync::MutexGuard<'_, Option<Fetched>> {
    current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TokenProvider {
    /// A provider reading the process environment.
    pub fn new(source: TokenSource, audience: Option<String>) -> Self {
        Self::with_env(source, audience, |name| std::env::var(name).ok())
    }

    /// A provider reading variables through `env` (tests give it their own).
    pub fn with_env(
        source: TokenSource,
        audience: Option<String>,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            source,
            audience: audience.unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned()),
            env: Arc::new(env),
            current: Arc::default(),
        }
    }

    fn var(&self, name: &str, missing: &str) -> Result<String, LocalError> {
        (self.env)(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| LocalError(missing.to_owned()))
    }

    /// The token to send now: fetched, or the one held while it is fresh (for `file:`,
    /// while the file is unchanged).
    pub async fn token(&self) -> Result<Token, LocalError> {
        if let Some(held) = self.fresh() {
            return Ok(held);
        }
        let fetched = self.fetch().await?;
        let token = fetched.token.clone();
        *lock(&self.current) = Some(fetched);
        Ok(token)
    }

    /// The held token, when it may still be sent: not within a minute of its expiry,
    /// and for `file:` read from the file as it is now.
    pub fn fresh(&self) -> Option<Token> {
        let held = lock(&self.current).clone()?;
        if let TokenSource::File(path) = &self.source {
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != held.modified {
                return None;
            }
        }
        if held
            .expires
            .is_some_and(|exp| SystemTime::now() + REFRESH_BEFORE >= exp)
        {
            return None;
        }
        Some(held.token)
    }

    /// The token last fetched, fresh or not (sent while a refresh is under way).
    pub fn held(&self) -> Option<Token> {
        lock(&self.current).as_ref().map(|f| f.token.clone())
    }

    /// Keeps the held token fresh for as long as the process lives: call once after the
    /// first [`TokenProvider::token`]; it re-fetches a minute before each expiry (and
    /// checks a `file:` every few seconds). Failures are retried; the last good token
    /// stays in use meanwhile.
    pub fn keep_fresh(&self) {
        let provider = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = match &provider.source {
                    TokenSource::File(_) => Duration::from_secs(5),
                    // a minute before expiry, but never more often than MIN_REFETCH: a
                    // source that hands out short-lived (or already expiring) tokens
                    // must not be asked every second
                    _ => lock(&provider.current)
                        .as_ref()
                        .and_then(|f| f.expires)
                        .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
                        .map_or(MIN_REFETCH, |left| {
                            left.saturating_sub(REFRESH_BEFORE).max(MIN_REFETCH)
                        }),
                };
                tokio::time::sleep(wait).await;
                // a failure keeps the last token and waits a full period again
                if provider.fresh().is_none()
                    && let Ok(fetched) = provider.fetch().await
                {
                    *lock(&provider.current) = Some(fetched);
                }
            }
        });
    }

    /// The token the source gives now.
    async fn fetch(&self) -> Result<Fetched, LocalError> {
        let (text, from, modified) = match &self.source {
            TokenSource::Env(name) => (
                self.var(name, &format!("token source env:{name}: {name} is not set"))?,
                format!("env:{name}"),
                None,
            ),
            TokenSource::GitLab(name) => (
                self.var(
                    name,
                    &format!(
                        "token source gitlab:{name}: {name} is not set; declare it in the job's \
                         `id_tokens:` ({name}: {{ aud: {} }})",
                        self.audience
                    ),
                )?,
                format!("gitlab:{name}"),
                None,
            ),
            TokenSource::File(path) => {
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let text = std::fs::read_to_string(path).map_err(|e| {
                    LocalError(format!("token source file:{}: {e}", path.display()))
                })?;
                (text, format!("file:{}", path.display()), modified)
            }
            TokenSource::GitHubActions => (
                self.github_actions().await?,
                "github-actions".to_owned(),
                None,
            ),
            TokenSource::AzurePipelines(connection) => (
                self.azure_pipelines(connection).await?,
                "azure-pipelines".to_owned(),
                None,
            ),
        };
        let token = Token::new(&text, &format!("token source {from}"))?;
        Ok(Fetched {
            expires: jwt_expiry(text.trim()),
            token,
            modified,
        })
    }

    async fn github_actions(&self) -> Result<String, LocalError> {
        let url = self.var(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            "token source github-actions: this job has no `id-token: write` permission: \
             ACTIONS_ID_TOKEN_REQUEST_URL is not set (add `permissions: id-token: write` to \
             the workflow or the job)",
        )?;
        let bearer = self.var(
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
            "token source github-actions: this job has no `id-token: write` permission: \
             ACTIONS_ID_TOKEN_REQUEST_TOKEN is not set",
        )?;
        let mut url = request_url(&url, "ACTIONS_ID_TOKEN_REQUEST_URL")?;
        url.query_pairs_mut()
            .append_pair("audience", &self.audience);
        let request = http_client(&url)?.get(url).bearer_auth(bearer);
        let body = send(request, "github-actions").await?;
        field(&body, "value", "github-actions")
    }

    async fn azure_pipelines(&self, connection: &str) -> Result<String, LocalError> {
        let url = self.var(
            "SYSTEM_OIDCREQUESTURI",
            "token source azure-pipelines: SYSTEM_OIDCREQUESTURI is not set; run in an Azure \
             Pipelines job whose service connection uses workload identity federation",
        )?;
        let bearer = self.var(
            "SYSTEM_ACCESSTOKEN",
            "token source azure-pipelines: SYSTEM_ACCESSTOKEN is not set; map it into the \
             step's env (SYSTEM_ACCESSTOKEN: $(System.AccessToken))",
        )?;
        let mut url = request_url(&url, "SYSTEM_OIDCREQUESTURI")?;
        url.query_pairs_mut()
            .append_pair("api-version", "7.1")
            .append_pair("serviceConnectionId", connection);
        let request = http_client(&url)?
            .post(url)
            .bearer_auth(bearer)
            .header("content-type", "application/json")
            .body("{}");
        let body = send(request, "azure-pipelines").await?;
        field(&body, "oidcToken", "azure-pipelines")
    }
}

/// A token endpoint's URL: `https://`, or `http://` to a loopback address only (a
/// token must not cross a network in the clear).
fn request_url(text: &str, var: &str) -> Result<reqwest::Url, LocalError> {
    let url =
        reqwest::Url::parse(text).map_err(|e| LocalError(format!("{var} is not a URL ({e})")))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if url.scheme() == "https" || (url.scheme() == "http" && loopback) {
        Ok(url)
    } else {
        Err(LocalError(format!(
            "{var} is {}: a token endpoint must be https:// (http:// only on this host)",
            url.scheme()
        )))
    }
}

fn http_client(url: &reqwest::Url) -> Result<reqwest::Client, LocalError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| LocalError(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(REQUEST_TIMEOUT)
        // the request carries the job's own credential: it goes to the URL the CI
        // system gave, and nowhere a redirect would send it
        .redirect(reqwest::redirect::Policy::none());
    // plain http is allowed to this host only: never hand it (and its bearer) to a proxy
    let builder = if url.scheme() == "http" {
        builder.no_proxy()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| LocalError(format!("HTTP client: {e}")))
}

async fn send(
    request: reqwest::RequestBuilder,
    source: &str,
) -> Result<serde_json::Value, LocalError> {
    let response = request.send().await.map_err(|e| {
        LocalError(format!(
            "token source {source}: the token request failed: {e}"
        ))
    })?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| LocalError(format!("token source {source}: reading the answer: {e}")))?;
    if !status.is_success() {
        let shown: String = body.chars().take(200).collect();
        return Err(LocalError(format!(
            "token source {source}: the token endpoint answered {status}: {shown}"
        )));
    }
    serde_json::from_str(&body).map_err(|e| {
        LocalError(format!(
            "token source {source}: the answer is not JSON: {e}"
        ))
    })
}

fn field(body: &serde_json::Value, name: &str, source: &str) -> Result<String, LocalError> {
    body.get(name)
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            LocalError(format!(
                "token source {source}: the answer has no string \"{name}\""
            ))
        })
}

/// The `exp` of a JWT, read without verifying it (the gateway verifies): when to
/// fetch a new one.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let part = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.sig",
            part(serde_json::json!({"alg": "RS256"})),
            part(serde_json::json!({"exp": exp}))
        )
    }

    #[test]
    fn sources_parse_and_unknown_ones_say_what_exists() {
        assert_eq!("github-actions".parse(), Ok(TokenSource::GitHubActions));
        assert_eq!(
            "gitlab:KINVOKE_ID_TOKEN".parse(),
            Ok(TokenSource::GitLab("KINVOKE_ID_TOKEN".into()))
        );
        assert_eq!(
            "file:/var/run/secrets/tokens/kinvoke".parse(),
            Ok(TokenSource::File("/var/run/secrets/tokens/kinvoke".into()))
        );
        assert!(
            "env:"
                .parse::<TokenSource>()
                .unwrap_err()
                .contains("needs variable")
        );
        assert!(
            "vault"
                .parse::<TokenSource>()
                .unwrap_err()
                .contains("github-actions")
        );
    }

    #[tokio::test]
    async fn a_missing_variable_is_named_with_what_to_do() {
        let provider = TokenProvider::with_env(TokenSource::GitHubActions, None, |_| None);
        let err = provider.token().await.unwrap_err();
        assert!(
            err.0.contains("this job has no `id-token: write` permission: ACTIONS_ID_TOKEN_REQUEST_URL is not set"),
            "{}",
            err.0
        );
        let provider =
            TokenProvider::with_env(TokenSource::GitLab("KINVOKE_ID_TOKEN".into()), None, |_| {
                None
            });
        let err = provider.token().await.unwrap_err();
        assert!(err.0.contains("id_tokens"), "{}", err.0);
    }

    #[tokio::test]
    async fn an_env_token_is_read_and_kept() {
        let provider = TokenProvider::with_env(TokenSource::Env("T".into()), None, |name| {
            (name == "T").then(|| "abc".to_owned())
        });
        provider.token().await.unwrap();
        assert!(provider.fresh().is_some());
    }

    #[tokio::test]
    async fn a_file_token_is_read_again_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first").unwrap();
        let provider = TokenProvider::new(TokenSource::File(path.clone()), None);
        let first = provider.token().await.unwrap();
        assert!(provider.fresh().is_some());
        // rotated in place, as the kubelet does: a new modification time
        std::fs::write(&path, "second").unwrap();
        let later = SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(
            provider.fresh().is_none(),
            "a changed file must be read again"
        );
        let second = provider.token().await.unwrap();
        assert_eq!(first.value(), "Bearer first");
        assert_eq!(second.value(), "Bearer second");
    }

    #[tokio::test]
    async fn a_token_near_its_expiry_is_not_fresh() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let soon = jwt(now + 30);
        let provider = TokenProvider::with_env(TokenSource::Env("T".into()), None, move |_| {
            Some(soon.clone())
        });
        provider.token().await.unwrap();
        assert!(
            provider.fresh().is_none(),
            "30 s left is inside the refresh window"
        );
        let later = jwt(now + 3600);
        let provider = TokenProvider::with_env(TokenSource::Env("T".into()), None, move |_| {
            Some(later.clone())
        });
        provider.token().await.unwrap();
        assert!(provider.fresh().is_some());
    }

    #[test]
    fn an_absurd_expiry_is_no_expiry_rather_than_a_crash() {
        assert_eq!(jwt_expiry(&jwt(u64::MAX)), None);
        assert!(jwt_expiry(&jwt(4_102_444_800)).is_some());
    }

    #[test]
    fn token_endpoints_must_be_https_except_on_this_host() {
        assert!(request_url("https://token.actions.example/x?api-version=2.0", "V").is_ok());
        assert!(request_url("http://127.0.0.1:8080/x", "V").is_ok());
        assert!(request_url("http://localhost:8080/x", "V").is_ok());
        let err = request_url("http://token.example/x", "V").unwrap_err();
        assert!(err.0.contains("must be https://"), "{}", err.0);
    }
}
