//! OIDC / JWT bearer tokens: signature (RS256, ES256) against the issuer's JWKS (a file,
//! or a URL fetched with a bounded cache that refreshes on an unknown `kid`), then issuer,
//! audience, `exp`/`nbf` with a small leeway. Several issuers at once; the token's `iss`
//! picks one. The token itself never appears in an error.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

/// Shortest time between two JWKS fetches triggered by unknown key ids.
const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most keys kept per issuer.
const MAX_KEYS: usize = 64;

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS JSON file, read at start-up.
    File(PathBuf),
    /// A JWKS URL, fetched on first use and when an unknown `kid` shows up.
    Url {
        /// `https://...`.
        url: String,
        /// Extra CA (PEM) to trust for this URL, besides the public web roots.
        ca_cert: Option<PathBuf>,
    },
}

/// One accepted token issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// Name used in logs (`github`, `entra`).
    pub name: String,
    /// Expected `iss`.
    pub issuer: String,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// Key source.
    pub jwks: JwksSource,
    /// Accepted algorithms (RS256 and/or ES256).
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed on `exp`/`nbf`.
    pub leeway: Duration,
    /// Claim holding the user id (default `sub`).
    pub user_claim: String,
    /// Claim holding the groups (default `groups`), optional in tokens.
    pub groups_claim: String,
    /// Prepended to the user claim to form the principal id (e.g. `github:`).
    pub principal_prefix: String,
}

/// The identity a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// Issuer name (config).
    pub issuer: String,
    /// Principal id.
    pub id: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Scalar and string-array claims, as strings.
    pub claims: BTreeMap<String, Vec<String>>,
}

/// Why a token was not accepted. Messages help the caller and never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The groups claim is neither a string nor an array of strings.
    #[error("token claim \"{0}\" must be a string or an array of strings")]
    BadGroups(String),
    /// The user or groups claim holds control or text-direction characters.
    #[error(
        "token claim \"{0}\" holds control or text-direction characters; no principal or group may"
    )]
    Unprintable(String),
    /// Not three base64url parts with a JSON header and payload.
    #[error("bearer token is not a well-formed JWT")]
    Malformed,
    /// Header `alg` is not one this issuer accepts (including `none` and HS*).
    #[error("token algorithm {alg} is not accepted (accepted: {accepted})")]
    AlgorithmNotAccepted {
        /// The token's algorithm.
        alg: String,
        /// What is accepted.
        accepted: String,
    },
    /// No configured issuer has this `iss`.
    #[error("token issuer \"{0}\" is not accepted by this gateway")]
    UnknownIssuer(String),
    /// The JWKS has no key with this `kid`.
    #[error("no key with id \"{kid}\" in the keys of issuer \"{issuer}\"")]
    UnknownKey {
        /// Issuer name.
        issuer: String,
        /// Key id (or `(none)`).
        kid: String,
    },
    /// The keys could not be loaded.
    #[error("keys of issuer \"{issuer}\" are unavailable: {reason}")]
    KeysUnavailable {
        /// Issuer name.
        issuer: String,
        /// Why.
        reason: String,
    },
    /// The signature does not verify with the issuer's key.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired at {0}")]
    Expired(String),
    /// `nbf` is in the future.
    #[error("token is not valid before {0}")]
    NotYetValid(String),
    /// `aud` is not accepted.
    #[error("token audience {0} is not accepted")]
    WrongAudience(String),
    /// A required claim is missing or not a string.
    #[error("token has no string claim \"{0}\"")]
    MissingClaim(String),
}

struct KeyCache {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
}

/// One issuer with its key cache.
pub struct Issuer {
    config: IssuerConfig,
    cache: Mutex<KeyCache>,
    http: Option<reqwest::Client>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Keys of a JWKS: asymmetric ones only, each tied to the one algorithm it may verify.
fn keys_of(set: &JwkSet) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
    let mut keys = HashMap::new();
    for jwk in set.keys.iter().take(MAX_KEYS) {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                jsonwebtoken::jwk::EllipticCurve::P256 => Algorithm::ES256,
                _ => continue,
            },
            // symmetric or unsupported keys are never used: an HS256 token must not
            // verify against material an attacker can read
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key: {e}"))?;
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        keys.insert(kid, (key, alg));
    }
    if keys.is_empty() {
        return Err("the JWKS holds no RSA or P-256 key".to_owned());
    }
    Ok(keys)
}

fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    keys_of(&set)
}

impl Issuer {
    /// An issuer; a file JWKS is read now, a URL JWKS on first use.
    pub fn new(config: IssuerConfig) -> Result<Self, TokenError> {
        let unavailable = |reason: String| TokenError::KeysUnavailable {
            issuer: config.name.clone(),
            reason,
        };
        let (keys, http) = match &config.jwks {
            JwksSource::File(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
                let keys = parse_jwks(&bytes)
                    .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
                (keys, None)
            }
            JwksSource::Url { ca_cert, .. } => {
                let client = crate::outbound_https::client(
                    ca_cert.as_deref(),
                    Duration::from_secs(10),
                    true,
                )
                .map_err(unavailable)?;
                (HashMap::new(), Some(client))
            }
        };
        Ok(Self {
            cache: Mutex::new(KeyCache {
                fetched_at: (!keys.is_empty()).then(Instant::now),
                keys,
            }),
            http,
            config,
        })
    }

    /// The issuer's settings.
    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        let (Some(http), JwksSource::Url { url, .. }) = (&self.http, &self.config.jwks) else {
            return Err("no JWKS URL".to_owned());
        };
        let mut response = http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("fetching {url}: {e}"))?;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading {url}: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("{url} answered more than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body).map_err(|e| format!("{url}: {e}"))
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), TokenError> {
        let mut cache = self.cache.lock().await;
        if let Some(found) = cache.keys.get(kid) {
            return Ok(found.clone());
        }
        let may_refresh = self.http.is_some()
            && cache
                .fetched_at
                .is_none_or(|at| at.elapsed() >= MIN_REFRESH);
        if may_refresh {
            // the lock is held across the fetch: concurrent misses wait for one fetch
            // instead of each hitting the IdP
            match self.fetch().await {
                Ok(keys) => {
                    cache.keys = keys;
                    cache.fetched_at = Some(Instant::now());
                }
                Err(reason) => {
                    tracing::warn!(issuer = %self.config.name, %reason, "JWKS refresh failed");
                    if cache.keys.is_empty() {
                        return Err(TokenError::KeysUnavailable {
                            issuer: self.config.name.clone(),
                            reason,
                        });
                    }
                }
            }
        }
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| TokenError::UnknownKey {
                issuer: self.config.name.clone(),
                kid: if kid.is_empty() {
                    "(none)".to_owned()
                } else {
                    kid.to_owned()
                },
            })
    }

    /// Verifies a token of this issuer.
    pub async fn verify(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        // a header jsonwebtoken cannot parse may still name an algorithm we refuse
        // (`none`, or a typo'd one): say so rather than "malformed"
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            match alg_name_of(token).filter(|a| !self.accepts_name(a)) {
                Some(alg) => TokenError::AlgorithmNotAccepted {
                    alg,
                    accepted: self.accepted(),
                },
                None => TokenError::Malformed,
            }
        })?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAccepted {
                alg: format!("{:?}", header.alg),
                accepted: self.accepted(),
            });
        }
        let (key, key_alg) = self.key(header.kid.as_deref().unwrap_or_default()).await?;
        if key_alg != header.alg {
            // e.g. an ES256 header naming an RSA key
            return Err(TokenError::AlgorithmNotAccepted {
                alg: format!("{:?}", header.alg),
                accepted: format!("{key_alg:?} for this key"),
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![key_alg];
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&self.config.audiences);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation)
            .map_err(|e| self.explain(token, e))?;
        self.identity(data.claims)
    }

    fn accepts_name(&self, alg: &str) -> bool {
        self.config
            .algorithms
            .iter()
            .any(|a| format!("{a:?}") == alg)
    }

    fn accepted(&self) -> String {
        self.config
            .algorithms
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn explain(&self, token: &str, err: jsonwebtoken::errors::Error) -> TokenError {
        use jsonwebtoken::errors::ErrorKind;
        // the signature was checked first, so reading claims for the message is safe
        let claims: serde_json::Map<String, Value> =
            jsonwebtoken::dangerous::insecure_decode_claims(token).unwrap_or_default();
        let time = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_i64)
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .map(|t| t.to_string())
                .unwrap_or_else(|| "(unknown)".to_owned())
        };
        match err.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired(time("exp")),
            ErrorKind::ImmatureSignature => TokenError::NotYetValid(time("nbf")),
            ErrorKind::InvalidAudience => TokenError::WrongAudience(
                claims
                    .get("aud")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "(none)".to_owned()),
            ),
            ErrorKind::InvalidIssuer => TokenError::UnknownIssuer(
                claims
                    .get("iss")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            ),
            ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => TokenError::BadSignature,
            _ => TokenError::Malformed,
        }
    }

    fn identity(
        &self,
        claims: serde_json::Map<String, Value>,
    ) -> Result<TokenIdentity, TokenError> {
        let user = claims
            .get(&self.config.user_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| TokenError::MissingClaim(self.config.user_claim.clone()))?;
        // every group is a string: one that is not is refused, never left out (a
        // dropped group could be one a deny rule names)
        let not_a_group = || TokenError::BadGroups(self.config.groups_claim.clone());
        let groups = match claims.get(&self.config.groups_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|g| g.as_str().map(str::to_owned).ok_or_else(not_a_group))
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::String(g)) => vec![g.clone()],
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err(not_a_group()),
        };
        let flat: BTreeMap<String, Vec<String>> = claims
            .iter()
            .filter_map(|(k, v)| {
                let values = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Bool(b) => vec![b.to_string()],
                    Value::Number(n) => vec![n.to_string()],
                    Value::Array(items) => items
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                    _ => return None,
                };
                Some((k.clone(), values))
            })
            .collect();
        // a name that would reach logs, audit lines and Kubernetes headers with control
        // or text-direction characters is refused, never trimmed
        if user.chars().any(crate::command::is_unprintable) {
            return Err(TokenError::Unprintable(self.config.user_claim.clone()));
        }
        if groups
            .iter()
            .any(|g| g.chars().any(crate::command::is_unprintable))
        {
            return Err(TokenError::Unprintable(self.config.groups_claim.clone()));
        }
        Ok(TokenIdentity {
            issuer: self.config.name.clone(),
            id: format!("{}{user}", self.config.principal_prefix),
            groups,
            claims: flat,
        })
    }
}

/// The `alg` text of a token header, for messages about unknown algorithms (`none`).
fn alg_name_of(token: &str) -> Option<String> {
    use base64::Engine;
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(|s| s.chars().take(16).collect())
}

/// The `iss` of a token, unverified: only used to pick which issuer verifies it.
pub fn unverified_issuer(token: &str) -> Option<String> {
    let claims: serde_json::Map<String, Value> =
        jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// The configured issuers.
#[derive(Debug, Default, Clone)]
pub struct Issuers(Vec<Arc<Issuer>>);

impl Issuers {
    /// Builds every issuer (reading JWKS files).
    pub fn new(configs: Vec<IssuerConfig>) -> Result<Self, TokenError> {
        configs
            .into_iter()
            .map(|c| Issuer::new(c).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// True when no issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Verifies a JWT with the issuer its `iss` names.
    pub async fn verify(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        let iss = unverified_issuer(token).ok_or(TokenError::Malformed)?;
        let issuer = self
            .0
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or(TokenError::UnknownIssuer(iss))?;
        issuer.verify(token).await
    }
}

/// True when a bearer credential has the shape of a JWT (three dot-separated parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const RSA_KEY: &[u8] = include_bytes!("../../testdata/rsa-test-key.pem");
    const ISS: &str = "https://issuer.example";
    const AUD: &str = "kinvoke";

    struct Keys {
        rsa: EncodingKey,
        ec: EncodingKey,
        dir: tempfile::TempDir,
    }

    fn now() -> i64 {
        jiff::Timestamp::now().as_second()
    }

    fn keys() -> Keys {
        let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
        let ec_pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let ec = EncodingKey::from_ec_pem(ec_pem.as_bytes()).unwrap();
        let mut rsa_jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
        rsa_jwk.common.key_id = Some("rsa-1".into());
        let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
        ec_jwk.common.key_id = Some("ec-1".into());
        let dir = tempfile::tempdir().unwrap();
        let set = JwkSet {
            keys: vec![rsa_jwk, ec_jwk],
        };
        std::fs::write(
            dir.path().join("jwks.json"),
            serde_json::to_vec(&set).unwrap(),
        )
        .unwrap();
        Keys { rsa, ec, dir }
    }

    fn issuer(keys: &Keys) -> Issuers {
        Issuers::new(vec![IssuerConfig {
            name: "corp".into(),
            issuer: ISS.into(),
            audiences: vec![AUD.into()],
            jwks: JwksSource::File(keys.dir.path().join("jwks.json")),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            principal_prefix: "corp:".into(),
        }])
        .unwrap()
    }

    fn claims() -> Value {
        json!({
            "iss": ISS, "aud": AUD, "sub": "alice", "groups": ["sre", "dev"],
            "repository": "org/app", "exp": now() + 300, "iat": now(),
        })
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    #[tokio::test]
    async fn valid_rs256_and_es256_tokens_identify_the_caller() {
        let k = keys();
        let issuers = issuer(&k);
        for token in [
            sign(Algorithm::RS256, "rsa-1", &k.rsa, &claims()),
            sign(Algorithm::ES256, "ec-1", &k.ec, &claims()),
        ] {
            let id = issuers.verify(&token).await.unwrap();
            assert_eq!(id.id, "corp:alice");
            assert_eq!(id.groups, ["sre", "dev"]);
            assert_eq!(id.claims["repository"], ["org/app"]);
        }
    }

    #[tokio::test]
    async fn names_and_groups_with_control_or_direction_characters_are_refused() {
        let k = keys();
        let issuers = issuer(&k);
        let cases = [
            ("sub", json!("alice\u{1b}[2J")),
            ("sub", json!("eve\u{202e}nimda")),
            ("groups", json!(["sre", "admins\u{200b}"])),
            ("groups", json!("ops\nforged")),
        ];
        // groups that are not strings are refused, not left out
        for value in [json!(["sre", 7]), json!({"a": "b"}), json!(true)] {
            let mut c = claims();
            c["groups"] = value.clone();
            let err = issuers
                .verify(&sign(Algorithm::RS256, "rsa-1", &k.rsa, &c))
                .await
                .unwrap_err();
            assert_eq!(err, TokenError::BadGroups("groups".into()), "{value}");
        }
        for (claim, value) in cases {
            let mut c = claims();
            c[claim] = value.clone();
            let err = issuers
                .verify(&sign(Algorithm::RS256, "rsa-1", &k.rsa, &c))
                .await
                .unwrap_err();
            assert_eq!(err, TokenError::Unprintable(claim.to_owned()), "{value}");
            assert!(err.to_string().contains(claim), "{err}");
        }
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_with_a_helpful_reason() {
        let k = keys();
        let issuers = issuer(&k);
        let mut expired = claims();
        expired["exp"] = json!(now() - 3600);
        let mut future = claims();
        future["nbf"] = json!(now() + 3600);
        let mut wrong_aud = claims();
        wrong_aud["aud"] = json!("someone-else");
        let mut wrong_iss = claims();
        wrong_iss["iss"] = json!("https://evil.example");
        let mut no_sub = claims();
        no_sub.as_object_mut().unwrap().remove("sub");

        // alg:none: header {"alg":"none"}, empty signature
        use base64::Engine;
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims())
        );
        // HS256 signed with the issuer's public key as the HMAC secret (key confusion)
        let public_pem = {
            let jwk = Jwk::from_encoding_key(&k.rsa, Algorithm::RS256).unwrap();
            serde_json::to_vec(&jwk).unwrap()
        };
        let confused = sign(
            Algorithm::HS256,
            "rsa-1",
            &EncodingKey::from_secret(&public_pem).unwrap(),
            &claims(),
        );
        // signed by a key that is not in the JWKS but claims its kid
        let other_ec = EncodingKey::from_ec_pem(
            rcgen::KeyPair::generate()
                .unwrap()
                .serialize_pem()
                .as_bytes(),
        )
        .unwrap();
        // an ES256 header naming the RSA key
        let cross = sign(Algorithm::ES256, "rsa-1", &k.ec, &claims());

        let cases: Vec<(String, &str)> = vec![
            (
                sign(Algorithm::RS256, "rsa-1", &k.rsa, &expired),
                "token expired at",
            ),
            (
                sign(Algorithm::RS256, "rsa-1", &k.rsa, &future),
                "not valid before",
            ),
            (
                sign(Algorithm::RS256, "rsa-1", &k.rsa, &wrong_aud),
                "audience \"someone-else\" is not accepted",
            ),
            (
                sign(Algorithm::RS256, "rsa-1", &k.rsa, &wrong_iss),
                "issuer \"https://evil.example\" is not accepted",
            ),
            (
                sign(Algorithm::RS256, "rsa-9", &k.rsa, &claims()),
                "no key with id \"rsa-9\"",
            ),
            (
                sign(Algorithm::RS256, "rsa-1", &k.rsa, &no_sub),
                "no string claim \"sub\"",
            ),
            (none, "algorithm none is not accepted"),
            (confused, "algorithm HS256 is not accepted"),
            (
                sign(Algorithm::ES256, "ec-1", &other_ec, &claims()),
                "signature does not verify",
            ),
            (cross, "not accepted"),
            ("not.a.jwt".to_owned(), "not a well-formed JWT"),
        ];
        for (token, expected) in cases {
            let err = issuers.verify(&token).await.unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
            assert!(
                !err.contains(&token[..token.len().min(20)]) || token.len() < 20,
                "token leaked: {err}"
            );
        }
    }

    #[tokio::test]
    async fn symmetric_keys_in_a_jwks_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]});
        std::fs::write(dir.path().join("j.json"), jwks.to_string()).unwrap();
        let err = Issuer::new(IssuerConfig {
            name: "x".into(),
            issuer: ISS.into(),
            audiences: vec![AUD.into()],
            jwks: JwksSource::File(dir.path().join("j.json")),
            algorithms: vec![Algorithm::RS256],
            leeway: Duration::ZERO,
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            principal_prefix: String::new(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("no RSA or P-256 key"), "{err}");
    }

    /// A one-route HTTPS server answering `body` to every request; counts requests.
    async fn jwks_server(
        body: Vec<u8>,
    ) -> (
        String,
        std::path::PathBuf,
        Arc<std::sync::atomic::AtomicUsize>,
        tempfile::TempDir,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca = crate::pki::CertificateAuthority::new("jwks test CA").unwrap();
        let server = ca.server_cert(&["127.0.0.1"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        use rustls_pki_types::pem::PemObject;
        let certs = vec![
            rustls_pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap(),
        ];
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/jwks",
            listener.local_addr().unwrap().port()
        );
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let body = body.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && tls.read_exact(&mut byte).await.is_ok() {
                        head.push(byte[0]);
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (url, ca_path, hits, dir)
    }

    #[tokio::test]
    async fn a_jwks_url_is_fetched_on_first_use_and_not_hammered_by_unknown_kids() {
        let k = keys();
        let jwks = std::fs::read(k.dir.path().join("jwks.json")).unwrap();
        let (url, ca_path, hits, _dir) = jwks_server(jwks).await;
        let issuers = Issuers::new(vec![IssuerConfig {
            name: "remote".into(),
            issuer: ISS.into(),
            audiences: vec![AUD.into()],
            jwks: JwksSource::Url {
                url,
                ca_cert: Some(ca_path),
            },
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            principal_prefix: String::new(),
        }])
        .unwrap();
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "fetched lazily"
        );
        let ok = sign(Algorithm::RS256, "rsa-1", &k.rsa, &claims());
        assert_eq!(issuers.verify(&ok).await.unwrap().id, "alice");
        assert_eq!(issuers.verify(&ok).await.unwrap().id, "alice");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "cached");
        // an unknown kid right after a fetch does not trigger another one
        let unknown = sign(Algorithm::RS256, "rotated", &k.rsa, &claims());
        let err = issuers.verify(&unknown).await.unwrap_err();
        assert!(matches!(err, TokenError::UnknownKey { .. }), "{err}");
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "refresh is rate-limited"
        );
    }

    #[tokio::test]
    async fn an_unreachable_jwks_url_is_reported_without_the_token() {
        let issuers = Issuers::new(vec![IssuerConfig {
            name: "down".into(),
            issuer: ISS.into(),
            audiences: vec![AUD.into()],
            jwks: JwksSource::Url {
                url: "https://127.0.0.1:9/jwks".into(),
                ca_cert: None,
            },
            algorithms: vec![Algorithm::RS256],
            leeway: Duration::ZERO,
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            principal_prefix: String::new(),
        }])
        .unwrap();
        let k = keys();
        let token = sign(Algorithm::RS256, "rsa-1", &k.rsa, &claims());
        let err = issuers.verify(&token).await.unwrap_err().to_string();
        assert!(
            err.contains("keys of issuer \"down\" are unavailable"),
            "{err}"
        );
        assert!(!err.contains(&token));
    }

    #[tokio::test]
    async fn each_issuer_verifies_only_its_own_tokens() {
        let corp = keys();
        let ci = keys();
        let config = |name: &str, iss: &str, k: &Keys| IssuerConfig {
            name: name.into(),
            issuer: iss.into(),
            audiences: vec![AUD.into()],
            jwks: JwksSource::File(k.dir.path().join("jwks.json")),
            algorithms: vec![Algorithm::ES256],
            leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            principal_prefix: format!("{name}:"),
        };
        let issuers = Issuers::new(vec![
            config("corp", ISS, &corp),
            config("ci", "https://ci.example", &ci),
        ])
        .unwrap();
        let mut ci_claims = claims();
        ci_claims["iss"] = json!("https://ci.example");
        let corp_token = sign(Algorithm::ES256, "ec-1", &corp.ec, &claims());
        let ci_token = sign(Algorithm::ES256, "ec-1", &ci.ec, &ci_claims);
        assert_eq!(issuers.verify(&corp_token).await.unwrap().id, "corp:alice");
        assert_eq!(issuers.verify(&ci_token).await.unwrap().id, "ci:alice");
        // a CI-signed token claiming the corporate issuer does not verify
        let forged = sign(Algorithm::ES256, "ec-1", &ci.ec, &claims());
        assert_eq!(
            issuers.verify(&forged).await.unwrap_err(),
            TokenError::BadSignature
        );
    }
}
