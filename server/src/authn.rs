//! Who the caller is: a verified client certificate (mTLS), an OIDC/JWT bearer token, or
//! a static bearer token, as the listener allows. The result is a [`Principal`].
//! Credentials never appear in errors, logs or `Debug` output.

pub mod jwt;
pub mod static_token;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::connection::ConnInfo;
use crate::connection::ListenerAuth;
use jwt::{Issuers, TokenError};
use static_token::StaticToken;

/// How a principal proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A client certificate verified during the TLS handshake.
    Mtls,
    /// An OIDC/JWT bearer token.
    Oidc,
    /// A static bearer token.
    Token,
}

impl AuthMethod {
    /// The method's name in config, messages and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::Oidc => "oidc",
            Self::Token => "token",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable identity, e.g. `alice` or `github:repo:org/app:ref:refs/heads/main`.
    pub id: String,
    /// Groups, from the certificate rule, the token or the static token entry.
    pub groups: Vec<String>,
    /// Token claims (string values), for assignments that match on claims.
    pub claims: BTreeMap<String, Vec<String>>,
    /// Certificate subject, or the token issuer's name, for logs.
    pub subject: String,
    /// How they authenticated.
    pub auth_method: AuthMethod,
    /// Address the gateway attributes the call to.
    pub source: IpAddr,
    /// Listener the call came in on.
    pub listener: String,
}

/// Longest bearer token read, in bytes; a longer one is refused before it is parsed.
/// OIDC tokens are 1 to 8 KiB (an Entra ID token with many groups is the large case),
/// static tokens 64 hex digits.
pub const MAX_BEARER_TOKEN_BYTES: usize = 16 * 1024;

/// Why a caller could not be identified. Messages help without echoing credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No credential this listener accepts was presented.
    #[error("no credentials: this listener accepts {accepted}")]
    NoCredentials {
        /// What the listener accepts, in words.
        accepted: &'static str,
    },
    /// The listener requires a client certificate besides the token.
    #[error("a client certificate signed by the gateway's client CA is required on this listener")]
    ClientCertificateRequired,
    /// The authorization metadata is not `Bearer <token>`.
    #[error("authorization metadata must be \"Bearer <token>\"")]
    MalformedAuthorization,
    /// The bearer token is longer than any this gateway reads.
    #[error(
        "bearer token is {0} bytes, over the {MAX_BEARER_TOKEN_BYTES} bytes this gateway reads"
    )]
    TokenTooLong(usize),
    /// A bearer token was sent to a listener that accepts only certificates.
    #[error("this listener does not accept bearer tokens; use a client certificate")]
    TokensNotAccepted,
    /// A static-looking token matches no entry.
    #[error("bearer token is not valid")]
    UnknownStaticToken,
    /// A JWT was refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The certificate names nobody.
    #[error("the client certificate has no URI SAN, DNS SAN or common name to identify the caller")]
    NoIdentity,
    /// The certificate could not be parsed.
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    /// The identity holds control or text-direction characters, which no principal may:
    /// they would reach logs, audit lines and Kubernetes headers, or show as another name.
    #[error(
        "the {0} identifying the caller holds control or text-direction characters; no principal may"
    )]
    ControlCharacters(&'static str),
}

impl AuthnError {
    /// The (method, reason) labels of the failure metric: fixed names, never the
    /// message (which may echo what the caller sent).
    pub fn metric_labels(&self) -> (&'static str, &'static str) {
        match self {
            Self::NoCredentials { .. } => ("none", "no_credentials"),
            Self::ClientCertificateRequired => ("token", "client_certificate_required"),
            Self::MalformedAuthorization => ("token", "malformed_authorization"),
            Self::TokenTooLong(_) => ("token", "token_too_long"),
            Self::TokensNotAccepted => ("token", "tokens_not_accepted"),
            Self::UnknownStaticToken => ("token", "unknown_static_token"),
            Self::Token(_) => ("token", "token_refused"),
            Self::NoIdentity => ("mtls", "no_identity"),
            Self::Unparsable => ("mtls", "unparsable_certificate"),
            Self::ControlCharacters(_) => ("mtls", "control_characters"),
        }
    }
}

/// Maps a certificate identity to a principal and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsRule {
    /// Identity to match: exact, or a prefix ending in `*`.
    pub identity: String,
    /// Principal id template; `{identity}` is replaced. Default: the identity.
    pub principal: Option<String>,
    /// Groups given to matching callers.
    pub groups: Vec<String>,
}

impl MtlsRule {
    fn matches(&self, identity: &str) -> bool {
        match self.identity.strip_suffix('*') {
            Some(prefix) => identity.starts_with(prefix),
            None => identity == self.identity,
        }
    }
}

/// Everything needed to authenticate calls.
#[derive(Debug, Default)]
pub struct Authenticator {
    mtls_rules: Vec<MtlsRule>,
    static_tokens: Vec<StaticToken>,
    issuers: Issuers,
}

impl Authenticator {
    /// An authenticator over certificate rules, static tokens and OIDC issuers.
    pub fn new(
        mtls_rules: Vec<MtlsRule>,
        static_tokens: Vec<StaticToken>,
        issuers: Issuers,
    ) -> Self {
        Self {
            mtls_rules,
            static_tokens,
            issuers,
        }
    }

    /// Identifies the caller of a request from its connection and `authorization` value.
    pub async fn authenticate(
        &self,
        conn: &ConnInfo,
        auth: ListenerAuth,
        authorization: Option<&str>,
    ) -> Result<Principal, AuthnError> {
        let cert = conn.peer_certs.as_ref().and_then(|certs| certs.first());
        if auth.require_client_cert && cert.is_none() {
            return Err(AuthnError::ClientCertificateRequired);
        }
        if let Some(value) = authorization {
            if !auth.tokens {
                return Err(AuthnError::TokensNotAccepted);
            }
            if value.len() > MAX_BEARER_TOKEN_BYTES + "Bearer ".len() {
                let token = value.get("Bearer ".len()..).unwrap_or(value);
                return Err(AuthnError::TokenTooLong(token.len()));
            }
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.contains(char::is_whitespace))
                .ok_or(AuthnError::MalformedAuthorization)?;
            return self.by_token(conn, token).await;
        }
        match cert {
            Some(cert) if auth.mtls => self.by_certificate(conn, cert),
            _ => Err(AuthnError::NoCredentials {
                accepted: auth.accepted(),
            }),
        }
    }

    async fn by_token(&self, conn: &ConnInfo, token: &str) -> Result<Principal, AuthnError> {
        let base = |id: String, method: AuthMethod, subject: String| Principal {
            id,
            groups: Vec::new(),
            claims: BTreeMap::new(),
            subject,
            auth_method: method,
            source: conn.source.ip(),
            listener: conn.listener.to_string(),
        };
        if jwt::looks_like_jwt(token) && !self.issuers.is_empty() {
            let identity = self.issuers.verify(token).await?;
            if identity.id.chars().any(crate::command::is_unprintable) {
                return Err(AuthnError::ControlCharacters("token claim"));
            }
            return Ok(Principal {
                groups: identity.groups,
                claims: identity.claims,
                ..base(identity.id, AuthMethod::Oidc, identity.issuer)
            });
        }
        if jwt::looks_like_jwt(token) && self.static_tokens.is_empty() {
            return Err(TokenError::UnknownIssuer("(no issuer is configured)".to_owned()).into());
        }
        let entry =
            static_token::find(&self.static_tokens, token).ok_or(AuthnError::UnknownStaticToken)?;
        Ok(Principal {
            groups: entry.groups.clone(),
            ..base(
                entry.principal.clone(),
                AuthMethod::Token,
                "static token".to_owned(),
            )
        })
    }

    fn by_certificate(
        &self,
        conn: &ConnInfo,
        cert: &CertificateDer<'_>,
    ) -> Result<Principal, AuthnError> {
        let (identity, subject) = identity_of(cert)?;
        if identity.chars().any(crate::command::is_unprintable) {
            return Err(AuthnError::ControlCharacters("client certificate name"));
        }
        let rule = self.mtls_rules.iter().find(|r| r.matches(&identity));
        let id = rule
            .and_then(|r| r.principal.as_ref())
            .map(|t| t.replace("{identity}", &identity))
            .unwrap_or_else(|| identity.clone());
        Ok(Principal {
            id,
            groups: rule.map(|r| r.groups.clone()).unwrap_or_default(),
            claims: BTreeMap::new(),
            subject,
            auth_method: AuthMethod::Mtls,
            source: conn.source.ip(),
            listener: conn.listener.to_string(),
        })
    }
}

/// The identity and subject of a certificate: first URI SAN, else first DNS SAN, else CN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<(String, String), AuthnError> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).map_err(|_| AuthnError::Unparsable)?;
    let subject = cert.subject().to_string();
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    };
    let id = uri
        .or_else(dns)
        .or_else(cn)
        .filter(|id| !id.is_empty())
        .ok_or(AuthnError::NoIdentity)?;
    Ok((id, subject))
}
