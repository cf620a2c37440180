//! Bearer token verification on arbitrary strings, against an issuer with a real RSA
//! key: an identity only for a token that verifies, otherwise an error; never a panic.
//! (No arbitrary input can carry a valid RS256 signature, so every input is refused.)
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use kinvoke_gateway::authn::jwt::{
    IssuerConfig, Issuers, JwksSource, looks_like_jwt, unverified_issuer,
};
use libfuzzer_sys::fuzz_target;

const RSA_TEST_KEY: &[u8] = include_bytes!("../../server/testdata/rsa-test-key.pem");

fn issuers() -> &'static (Issuers, tokio::runtime::Runtime, tempfile::TempDir) {
    static ISSUERS: OnceLock<(Issuers, tokio::runtime::Runtime, tempfile::TempDir)> =
        OnceLock::new();
    ISSUERS.get_or_init(|| {
        let key = EncodingKey::from_rsa_pem(RSA_TEST_KEY).expect("the test key");
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).expect("its JWK");
        jwk.common.key_id = Some("rsa-1".into());
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("jwks.json");
        let set = JwkSet { keys: vec![jwk] };
        std::fs::write(&path, serde_json::to_string(&set).expect("JSON")).expect("the JWKS file");
        let issuers = Issuers::new(vec![IssuerConfig {
            name: "ci".into(),
            issuer: "https://issuer.example".into(),
            audiences: vec!["kinvoke".into()],
            jwks: JwksSource::File(path),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: Duration::from_secs(30),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            principal_prefix: String::new(),
        }])
        .expect("the issuer");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        (issuers, runtime, dir)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let _ = looks_like_jwt(token);
    let _ = unverified_issuer(token);
    let (issuers, runtime, _) = issuers();
    let verified = runtime.block_on(issuers.verify(token));
    assert!(verified.is_err(), "an arbitrary input verified: {token:?}");
});
