//! A test OIDC issuer: signs tokens and publishes their JWKS.

#[allow(unused_imports)]
use super::*;

// OIDC issuer

/// The RSA-2048 test key of the gateway's own tests (generating RSA keys in a debug
/// build is slow). It protects nothing.
pub(crate) const RSA_TEST_KEY: &[u8] = include_bytes!("../../server/testdata/rsa-test-key.pem");

/// A token issuer for tests: an RSA key (key id [`TestIssuer::RSA_KID`]) and a fresh
/// P-256 key ([`TestIssuer::EC_KID`]), published as a JWKS document, and a way to sign
/// tokens with them.
pub struct TestIssuer {
    rsa: EncodingKey,
    ec: EncodingKey,
    jwks: String,
    rsa_public_jwk: String,
}

impl fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestIssuer")
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// Key id of the RSA key (RS256).
    pub const RSA_KID: &'static str = "rsa-1";
    /// Key id of the P-256 key (ES256).
    pub const EC_KID: &'static str = "ec-1";

    /// Two keys and their JWKS.
    pub fn new() -> Result<Self> {
        let rsa = EncodingKey::from_rsa_pem(RSA_TEST_KEY).context("the RSA test key")?;
        let ec_pem = rcgen::KeyPair::generate()
            .context("cannot generate a P-256 key")?
            .serialize_pem();
        let ec = EncodingKey::from_ec_pem(ec_pem.as_bytes()).context("the P-256 key")?;
        let mut rsa_jwk =
            Jwk::from_encoding_key(&rsa, Algorithm::RS256).context("the RSA public JWK")?;
        rsa_jwk.common.key_id = Some(Self::RSA_KID.to_owned());
        let mut ec_jwk =
            Jwk::from_encoding_key(&ec, Algorithm::ES256).context("the P-256 public JWK")?;
        ec_jwk.common.key_id = Some(Self::EC_KID.to_owned());
        let rsa_public_jwk = serde_json::to_string(&rsa_jwk)?;
        let jwks = serde_json::to_string(&JwkSet {
            keys: vec![rsa_jwk, ec_jwk],
        })?;
        Ok(Self {
            rsa,
            ec,
            jwks,
            rsa_public_jwk,
        })
    }

    /// The JWKS document (`{"keys":[...]}`) to give the gateway as its `jwks_file`.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// The RSA key's public JWK, as published: what anyone may read, e.g. to try it as
    /// an HMAC secret.
    pub fn rsa_public_jwk(&self) -> &str {
        &self.rsa_public_jwk
    }

    /// Signs `claims` with RS256 (the RSA key) or ES256 (the P-256 key), naming `kid` in
    /// the header whatever the key (no `kid` at all when it is empty).
    pub fn sign(&self, alg: Algorithm, kid: &str, claims: &serde_json::Value) -> Result<String> {
        let key = match alg {
            Algorithm::RS256 => &self.rsa,
            Algorithm::ES256 => &self.ec,
            other => bail!("TestIssuer signs with RS256 or ES256, not {other:?}"),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = (!kid.is_empty()).then(|| kid.to_owned());
        jsonwebtoken::encode(&header, claims, key).context("cannot sign the token")
    }
}

/// Seconds since the Unix epoch, for `iat`/`exp` claims.
pub fn unix_now() -> Result<i64> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    i64::try_from(since.as_secs()).context("the clock is beyond 2^63 seconds")
}

/// A token with this header and claims and an empty signature (`alg: none` style).
pub fn unsigned_token(header: &serde_json::Value, claims: &serde_json::Value) -> Result<String> {
    let part = |v: &serde_json::Value| -> Result<String> {
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v)?))
    };
    Ok(format!("{}.{}.", part(header)?, part(claims)?))
}
