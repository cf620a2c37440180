//! Static bearer tokens for simple setups. The config holds only SHA-256 hashes; a
//! presented token is hashed and compared in constant time against every entry.

use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;

use crate::hex::encode as hex;

/// One configured token: its hash and who it stands for.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticToken {
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// Principal id.
    pub principal: String,
    /// Groups.
    pub groups: Vec<String>,
}

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticToken")
            .field("principal", &self.principal)
            .field("groups", &self.groups)
            .field("sha256", &"[redacted]")
            .finish()
    }
}

/// Parses the hex SHA-256 written in the config.
pub fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let text = text.trim().strip_prefix("sha256:").unwrap_or(text.trim());
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The value to put in the config for a token: `sha256:<hex>`.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex(digest(&SHA256, token.as_bytes()).as_ref()))
}

/// Finds the entry matching a presented token. Every entry is compared, so the time
/// taken does not depend on which one (if any) matched.
pub fn find<'a>(tokens: &'a [StaticToken], presented: &str) -> Option<&'a StaticToken> {
    let hash = digest(&SHA256, presented.as_bytes());
    let mut found = None;
    for t in tokens {
        if bool::from(t.sha256.ct_eq(hash.as_ref())) {
            found = Some(t);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_and_matches() {
        let h = hash_token("s3cret-token");
        let entry = StaticToken {
            sha256: parse_hash(&h).unwrap(),
            principal: "ci-bot".into(),
            groups: vec!["ci".into()],
        };
        let tokens = [entry];
        assert_eq!(find(&tokens, "s3cret-token").unwrap().principal, "ci-bot");
        assert!(find(&tokens, "s3cret-tokeN").is_none());
        assert!(find(&tokens, "").is_none());
    }

    #[test]
    fn bad_hashes_are_rejected() {
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63)] {
            assert!(parse_hash(bad).is_none(), "{bad}");
        }
        assert!(parse_hash(&"A".repeat(64)).is_some());
    }

    #[test]
    fn debug_hides_the_hash() {
        let t = StaticToken {
            sha256: [7; 32],
            principal: "p".into(),
            groups: vec![],
        };
        assert!(format!("{t:?}").contains("[redacted]"));
    }
}
