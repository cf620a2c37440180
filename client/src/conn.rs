//! Where the gateway is and how to prove who we are: from flags, then environment
//! (clap fills both), then a profile of the client config file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kinvoke_proto::v1::access_service_client::AccessServiceClient;
use kinvoke_proto::v1::command_service_client::CommandServiceClient;
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::token::{TokenProvider, TokenSource};

/// Largest response the client accepts (results carry output).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Connection flags; clap fills each from its flag or environment variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnArgs {
    /// Client config file with named profiles (default: ~/.config/kinvoke/config.toml,
    /// under $XDG_CONFIG_HOME when set, if it exists).
    #[arg(long, global = true, env = "KINVOKE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Profile of the config file to use (default: its `default_profile`).
    #[arg(long, global = true, env = "KINVOKE_PROFILE")]
    pub profile: Option<String>,
    /// Gateway address, e.g. https://kinvoke.example.com:8443.
    #[arg(long, global = true, env = "KINVOKE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long, global = true, env = "KINVOKE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, env = "KINVOKE_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "KINVOKE_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Bearer token (OIDC/JWT or static). Prefer KINVOKE_TOKEN or --token-file: a flag
    /// value is visible to other local users in the process list.
    #[arg(long, global = true, env = "KINVOKE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (e.g. a CI job's OIDC token file).
    #[arg(long, global = true, env = "KINVOKE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where to get the bearer token: github-actions, azure-pipelines:SERVICE_CONNECTION_ID,
    /// gitlab:VAR, env:VAR or file:PATH (re-read when it changes).
    #[arg(long, global = true, env = "KINVOKE_TOKEN_SOURCE")]
    pub token_source: Option<TokenSource>,
    /// Audience to ask a token source for (github-actions), default `kinvoke`.
    #[arg(long, global = true, env = "KINVOKE_TOKEN_AUDIENCE")]
    pub audience: Option<String>,
    /// Local address to connect from, on hosts with several addresses.
    #[arg(long, global = true, env = "KINVOKE_SOURCE_ADDRESS")]
    pub source_address: Option<std::net::IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    endpoint: Option<String>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    token_source: Option<String>,
    audience: Option<String>,
}

/// A bearer token; never printed.
#[derive(Clone)]
pub struct Token(MetadataValue<Ascii>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

impl Token {
    /// The header value (`Bearer ...`), for tests; never print it.
    #[cfg(test)]
    pub fn value(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    /// A token read from `from` (named in errors, never the token itself).
    pub fn new(token: &str, from: &str) -> Result<Self, LocalError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(LocalError(format!("the token from {from} is empty")));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            LocalError(format!(
                "the token from {from} has characters that cannot be sent in a header"
            ))
        })?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

/// Where the bearer token comes from: given once, or a source that may renew it.
#[derive(Debug, Clone)]
pub enum Credential {
    /// `--token`, `KINVOKE_TOKEN` or `--token-file`, read once.
    Fixed(Token),
    /// `--token-source`: fetched, and fetched again before it expires.
    Source(TokenProvider),
}

/// Adds the bearer token, if any, to every call.
#[derive(Debug, Clone)]
pub struct Auth(Option<Credential>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let token = match &self.0 {
            None => None,
            Some(Credential::Fixed(token)) => Some(token.clone()),
            Some(Credential::Source(provider)) => provider.fresh().or_else(|| provider.held()),
        };
        if let Some(token) = token {
            req.metadata_mut().insert("authorization", token.0);
        }
        Ok(req)
    }
}

/// Clients of the gateway's services over one connection.
pub struct Clients {
    /// `kinvoke.v1.CommandService`.
    pub commands: CommandServiceClient<InterceptedService<Channel, Auth>>,
    /// `kinvoke.v1.AccessService`.
    pub access: AccessServiceClient<InterceptedService<Channel, Auth>>,
}

/// Resolved connection settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Gateway URL.
    pub endpoint: String,
    ca_cert: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
    token: Option<Credential>,
    source_address: Option<std::net::IpAddr>,
}

/// A local problem (usage, files, config): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LocalError(pub String);

impl ConnArgs {
    /// Merges flags/env over the config file profile.
    pub fn resolve(&self) -> anyhow::Result<Settings> {
        let profile = match crate::profiles::path_to_read(self.config.as_deref()) {
            Some(path) => load_profile(&path, self.profile.as_deref())?,
            None => {
                if let Some(name) = &self.profile {
                    let default = crate::profiles::default_path()
                        .map(|p| format!(" (the default file, {}, does not exist)", p.display()))
                        .unwrap_or_default();
                    bail!(LocalError(format!(
                        "--profile {name} given but no config file{default}; pass --config FILE, \
                         set KINVOKE_CONFIG, or add the profile with `kinvoke config set-profile`"
                    )));
                }
                Profile::default()
            }
        };
        let missing = |what: &str, flag: &str, env: &str| {
            LocalError(format!(
                "no {what}: pass {flag}, set {env}, or use a config file (--config) whose profile sets it"
            ))
        };
        let endpoint = self
            .endpoint
            .clone()
            .or(profile.endpoint)
            .ok_or_else(|| missing("gateway endpoint", "--endpoint", "KINVOKE_ENDPOINT"))?;
        let endpoint = if endpoint.contains("://") {
            endpoint
        } else {
            format!("https://{endpoint}")
        };
        if !endpoint.starts_with("https://") {
            bail!(LocalError(format!(
                "endpoint {endpoint} is not https://; the gateway only speaks TLS"
            )));
        }
        let source = match (&self.token_source, &profile.token_source) {
            (Some(source), _) => Some(source.clone()),
            (None, Some(text)) => Some(
                text.parse::<TokenSource>()
                    .map_err(|e| LocalError(format!("the profile's token_source: {e}")))?,
            ),
            (None, None) => None,
        };
        // flags win over environment variables: a CI job's KINVOKE_TOKEN does not stop
        // one command from naming another source; two of one kind are an error
        let (mut token_flag, mut file_flag, mut source_flag) = (
            self.token.clone(),
            self.token_file.clone(),
            self.token_source.clone(),
        );
        let from_flags = [
            token_flag.is_some() && given_as_flag("--token"),
            file_flag.is_some() && given_as_flag("--token-file"),
            source_flag.is_some() && given_as_flag("--token-source"),
        ];
        if from_flags.iter().any(|f| *f) {
            if !from_flags[0] {
                token_flag = None;
            }
            if !from_flags[1] {
                file_flag = None;
            }
            if !from_flags[2] {
                source_flag = None;
            }
        }
        // the environment's source was dropped for a flag: the profile's is not used
        let source = match &source_flag {
            Some(flag) => Some(flag.clone()),
            None if self.token_source.is_some() => None,
            None => source,
        };
        if profile.token_file.is_some() && profile.token_source.is_some() {
            bail!(LocalError(
                "the profile sets both token_file and token_source; keep one".to_owned()
            ));
        }
        // only a source that asks for a token names an audience
        let asks_for_audience = matches!(source, Some(TokenSource::GitHubActions))
            && token_flag.is_none()
            && file_flag.is_none();
        if self.audience.is_some() && !asks_for_audience {
            bail!(LocalError(
                "--audience/KINVOKE_TOKEN_AUDIENCE applies to --token-source github-actions only \
                 (other sources hand out a token whose audience is set where it is issued)"
                    .to_owned()
            ));
        }
        let given = [
            token_flag.is_some().then_some("--token/KINVOKE_TOKEN"),
            file_flag
                .is_some()
                .then_some("--token-file/KINVOKE_TOKEN_FILE"),
            source_flag
                .is_some()
                .then_some("--token-source/KINVOKE_TOKEN_SOURCE"),
        ];
        let given: Vec<&str> = given.into_iter().flatten().collect();
        if given.len() > 1 {
            bail!(LocalError(format!(
                "{} are all set; a bearer token comes from one of them",
                given.join(" and ")
            )));
        }
        let token = match (&token_flag, &file_flag) {
            (Some(t), _) => Some(Credential::Fixed(Token::new(t, "--token/KINVOKE_TOKEN")?)),
            (None, None) if source.is_some() => source.map(|source| {
                Credential::Source(TokenProvider::new(
                    source,
                    self.audience.clone().or(profile.audience),
                ))
            }),
            (None, file) => match file.clone().or(profile.token_file) {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        LocalError(format!("cannot read token file {}: {e}", path.display()))
                    })?;
                    Some(Credential::Fixed(Token::new(
                        &text,
                        &format!("token file {}", path.display()),
                    )?))
                }
                None => None,
            },
        };
        let cert = self.client_cert.clone().or(profile.client_cert);
        let key = self.client_key.clone().or(profile.client_key);
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) if token.is_some() => None,
            (Some(_), None) => {
                return Err(missing("client key", "--client-key", "KINVOKE_CLIENT_KEY").into());
            }
            _ => {
                return Err(LocalError(
                    "no credentials: pass a client certificate (--client-cert and --client-key) \
                     or a bearer token (KINVOKE_TOKEN, --token-file or --token), or use a config file (--config)"
                        .to_owned(),
                )
                .into());
            }
        };
        Ok(Settings {
            endpoint,
            ca_cert: self
                .ca_cert
                .clone()
                .or(profile.ca_cert)
                .ok_or_else(|| missing("CA certificate", "--ca-cert", "KINVOKE_CA_CERT"))?,
            identity,
            token,
            source_address: self.source_address,
        })
    }
}

/// Whether `flag` is on this process's command line (as `--flag VALUE` or
/// `--flag=VALUE`), rather than its value coming from the environment.
fn given_as_flag(flag: &str) -> bool {
    let with_value = format!("{flag}=");
    std::env::args().any(|a| a == flag || a.starts_with(&with_value))
}

fn load_profile(path: &Path, wanted: Option<&str>) -> anyhow::Result<Profile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LocalError(format!("cannot read client config {}: {e}", path.display())))?;
    let file: ConfigFile = toml::from_str(&text).map_err(|e| {
        LocalError(format!(
            "client config {}: {}",
            path.display(),
            e.to_string().trim_end()
        ))
    })?;
    if wanted.is_none() && file.default_profile.is_none() && file.profiles.is_empty() {
        // a file with no profile yet (or its last one deleted) sets nothing
        return Ok(Profile::default());
    }
    let name = wanted
        .map(str::to_owned)
        .or(file.default_profile.clone())
        .or_else(|| (file.profiles.len() == 1).then(|| file.profiles.keys().next().cloned()).flatten())
        .ok_or_else(|| {
            LocalError(format!(
                "client config {} has several profiles and no default_profile; pick one with --profile",
                path.display()
            ))
        })?;
    let mut profile = file.profiles.get(&name).cloned().ok_or_else(|| {
        LocalError(format!(
            "profile \"{name}\" is not in {} (profiles: {})",
            path.display(),
            file.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })?;
    // relative paths in the file are relative to the file
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [
        &mut profile.ca_cert,
        &mut profile.client_cert,
        &mut profile.client_key,
        &mut profile.token_file,
    ]
    .into_iter()
    .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    if let Some(relative) = profile
        .token_source
        .as_deref()
        .and_then(|t| t.strip_prefix("file:"))
        .filter(|p| Path::new(p).is_relative())
    {
        profile.token_source = Some(format!("file:{}", base.join(relative).display()));
    }
    Ok(profile)
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| LocalError(format!("cannot read {what} {}: {e}", path.display())).into())
}

/// Unreachable gateway: exit code 69.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

impl Settings {
    /// Connects to the gateway.
    pub async fn connect(&self) -> anyhow::Result<Clients> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
            &self.ca_cert,
            "CA certificate",
        )?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        let endpoint = Channel::from_shared(self.endpoint.clone())
            .map_err(|e| LocalError(format!("endpoint {}: {e}", self.endpoint)))?
            .tls_config(tls)
            .with_context(|| format!("TLS settings for {}", self.endpoint))?
            .connect_timeout(Duration::from_secs(15))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .local_address(self.source_address);
        let channel = endpoint.connect().await.map_err(|e| {
            Unreachable(format!(
                "cannot connect to the gateway at {}: {}",
                self.endpoint,
                error_chain(&e)
            ))
        })?;
        if let Some(Credential::Source(provider)) = &self.token {
            provider.token().await?;
            provider.keep_fresh();
        }
        let auth = Auth(self.token.clone());
        Ok(Clients {
            commands: CommandServiceClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(MAX_RESPONSE_BYTES)
                .max_encoding_message_size(usize::MAX),
            access: AccessServiceClient::with_interceptor(channel, auth),
        })
    }
}

/// An error and its sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("client.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_win_over_the_config_file_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            "default_profile = \"a\"\n[profiles.a]\nendpoint = \"https://file:1\"\nca_cert = \"ca.crt\"\nclient_cert = \"c.crt\"\nclient_key = \"c.key\"\n",
        );
        let args = ConnArgs {
            config: Some(path),
            endpoint: Some("gw.example:8443".into()),
            ..ConnArgs::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.endpoint, "https://gw.example:8443");
        assert_eq!(s.ca_cert, dir.path().join("ca.crt"));
    }

    #[test]
    fn a_file_token_source_is_relative_to_the_config_and_an_empty_file_sets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[profiles.ci]\ntoken_source = \"file:tok.jwt\"\n").unwrap();
        let profile = load_profile(&path, None).unwrap();
        assert_eq!(
            profile.token_source.unwrap(),
            format!("file:{}", dir.path().join("tok.jwt").display())
        );
        // every profile deleted: flags alone still work
        std::fs::write(&path, "# no profiles left\n").unwrap();
        assert!(load_profile(&path, None).unwrap().endpoint.is_none());
    }

    #[test]
    fn an_audience_without_a_source_that_uses_it_is_refused() {
        let args = ConnArgs {
            endpoint: Some("https://gw.example:8443".into()),
            ca_cert: Some("ca.crt".into()),
            token_source: Some(TokenSource::Env("T".into())),
            audience: Some("other".into()),
            ..ConnArgs::default()
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("github-actions only"), "{err}");
    }

    #[test]
    fn profiles_are_chosen_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            "[profiles.a]\nendpoint = \"https://a:1\"\n[profiles.b]\nendpoint = \"https://b:1\"\n",
        );
        let args = ConnArgs {
            config: Some(path.clone()),
            profile: Some("b".into()),
            ca_cert: Some("x".into()),
            client_cert: Some("x".into()),
            client_key: Some("x".into()),
            ..ConnArgs::default()
        };
        assert_eq!(args.resolve().unwrap().endpoint, "https://b:1");
        let err = ConnArgs {
            profile: None,
            ..args.clone()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--profile"), "{err}");
        let err = ConnArgs {
            profile: Some("zz".into()),
            ..args
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("profiles: a, b"), "{err}");
    }

    #[test]
    fn a_token_replaces_the_client_certificate_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abc.def.ghi\n").unwrap();
        let args = ConnArgs {
            endpoint: Some("https://gw:1".into()),
            ca_cert: Some("ca.crt".into()),
            token_file: Some(file),
            ..ConnArgs::default()
        };
        let s = args.resolve().unwrap();
        assert!(s.identity.is_none());
        assert!(!format!("{s:?}").contains("abc.def"));
        let both = ConnArgs {
            token: Some("x".into()),
            ..args.clone()
        };
        assert!(
            both.resolve()
                .unwrap_err()
                .to_string()
                .contains("a bearer token comes from one of them")
        );
        let none = ConnArgs {
            token_file: None,
            ..args
        };
        assert!(
            none.resolve()
                .unwrap_err()
                .to_string()
                .contains("no credentials")
        );
    }

    #[test]
    fn missing_settings_say_where_to_set_them() {
        let err = ConnArgs::default().resolve().unwrap_err();
        assert!(err.to_string().contains("KINVOKE_ENDPOINT"), "{err}");
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "[profiles.a]\nendpiont = \"x\"\n");
        let err = ConnArgs {
            config: Some(path),
            ..ConnArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("endpiont"), "{err}");
    }
}
