//! `[[listener]]`: address, TLS files, exposure and the ranges it admits, which
//! credentials it takes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::raw::RawListener;
use super::{AuthnConfig, ConfigError, Exposure, ListenerConfig, invalid};
use crate::access::cidr::CidrSet;
use crate::connection::ListenerAuth;

/// Ranges that only ever hold addresses inside a private network.
const PRIVATE_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
];

fn is_private_range(range: &ipnet::IpNet) -> bool {
    PRIVATE_RANGES
        .iter()
        .any(|p| p.parse::<ipnet::IpNet>().is_ok_and(|p| p.contains(range)))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn parse_listener_access(
    key: &str,
    name: String,
    address: SocketAddr,
    l: RawListener,
    resolve: &dyn Fn(&Path) -> PathBuf,
    authn: &AuthnConfig,
    warnings: &mut Vec<String>,
) -> Result<ListenerConfig, ConfigError> {
    let authorized_ip_ranges = CidrSet::parse(&l.authorized_ip_ranges)
        .map_err(|e| invalid(format!("{key}.authorized_ip_ranges"), e.to_string()))?;
    let trusted_proxies = CidrSet::parse(&l.trusted_proxies)
        .map_err(|e| invalid(format!("{key}.trusted_proxies"), e.to_string()))?;
    let methods = l.authentication.unwrap_or_else(|| vec!["mtls".to_owned()]);
    let mut mtls = false;
    let mut tokens = false;
    for m in &methods {
        match m.as_str() {
            "mtls" => mtls = true,
            "token" => tokens = true,
            other => {
                return Err(invalid(
                    format!("{key}.authentication"),
                    format!("unknown method \"{other}\"; use \"mtls\" and/or \"token\""),
                ));
            }
        }
    }
    if !mtls && !tokens {
        return Err(invalid(
            format!("{key}.authentication"),
            "list at least one of \"mtls\", \"token\"",
        ));
    }
    let require_client_cert = l.require_client_cert.unwrap_or(!tokens);
    if (mtls || require_client_cert) && l.tls.client_ca.is_none() {
        return Err(invalid(
            format!("{key}.tls.client_ca"),
            "is required when the listener accepts or requires client certificates",
        ));
    }
    if tokens && !authn.accepts_tokens() {
        return Err(invalid(
            format!("{key}.authentication"),
            "accepts \"token\" but no [[authn.oidc]] issuer or [[authn.static_token]] is configured",
        ));
    }
    match l.exposure {
        Exposure::Private => {
            if let Some(public) = authorized_ip_ranges
                .ranges()
                .iter()
                .find(|r| !is_private_range(r))
            {
                return Err(invalid(
                    format!("{key}.authorized_ip_ranges"),
                    format!(
                        "listener \"{name}\" is exposure = \"private\" but admits the public range {public}; \
                         mark it exposure = \"public\" or list private ranges only"
                    ),
                ));
            }
        }
        Exposure::Public => {
            if authorized_ip_ranges.is_empty() {
                warnings.push(format!(
                    "listener \"{name}\" is public and has no authorized_ip_ranges: it is open to every address \
                     (like EKS's default 0.0.0.0/0); list your office and CI ranges"
                ));
            }
        }
    }
    Ok(ListenerConfig {
        name,
        address,
        tls_cert: resolve(&l.tls.cert),
        tls_key: resolve(&l.tls.key),
        client_ca: l.tls.client_ca.as_deref().map(resolve),
        exposure: l.exposure,
        authorized_ip_ranges,
        trusted_proxies,
        auth: ListenerAuth {
            mtls,
            tokens,
            require_client_cert,
        },
    })
}
