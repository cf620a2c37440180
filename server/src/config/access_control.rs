//! The access-control parts of the config file: authentication (`[authn]`), roles and
//! assignments, parsed into the typed values of `authn` and `access::authz`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::access::authz::{Action, Assignment, Role, Scope, Subject};
use crate::access::grant::{Eligibility, JustificationRule};
use crate::authn::MtlsRule;
use crate::authn::jwt::{IssuerConfig, JwksSource};
use crate::authn::static_token::{StaticToken, parse_hash};

/// Authentication settings.
#[derive(Debug, Clone, Default)]
pub struct AuthnConfig {
    /// Certificate identity → principal rules, first match wins.
    pub mtls_rules: Vec<MtlsRule>,
    /// Static tokens (hashes only).
    pub static_tokens: Vec<StaticToken>,
    /// OIDC issuers.
    pub issuers: Vec<IssuerConfig>,
}

impl AuthnConfig {
    /// True when some bearer token could be accepted.
    pub fn accepts_tokens(&self) -> bool {
        !self.static_tokens.is_empty() || !self.issuers.is_empty()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthn {
    #[serde(default)]
    mtls_rule: Vec<RawMtlsRule>,
    #[serde(default)]
    static_token: Vec<RawStaticToken>,
    #[serde(default)]
    oidc: Vec<RawOidc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtlsRule {
    identity: String,
    principal: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStaticToken {
    principal: String,
    sha256: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    name: String,
    issuer: String,
    audiences: Vec<String>,
    jwks_file: Option<std::path::PathBuf>,
    jwks_url: Option<String>,
    jwks_ca_cert: Option<std::path::PathBuf>,
    algorithms: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    leeway: Option<Duration>,
    user_claim: Option<String>,
    groups_claim: Option<String>,
    #[serde(default)]
    principal_prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRole {
    name: String,
    actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAssignment {
    name: Option<String>,
    role: String,
    scope: String,
    principal: Option<String>,
    group: Option<String>,
    claims: Option<BTreeMap<String, String>>,
    #[serde(default)]
    eligible: bool,
    #[serde(default, with = "humantime_serde")]
    max_duration: Option<Duration>,
    require_justification: Option<RawJustification>,
    require_approval_from: Option<RawApprover>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawJustification {
    Required(bool),
    Pattern(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprover {
    principal: Option<String>,
    group: Option<String>,
}

/// Longest break-glass activation that may be configured.
const MAX_BREAK_GLASS: Duration = Duration::from_secs(24 * 3600);

/// Longest leeway accepted on `exp`/`nbf`.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

pub(super) fn parse_authn(
    raw: RawAuthn,
    resolve: &dyn Fn(&Path) -> std::path::PathBuf,
) -> Result<AuthnConfig, ConfigError> {
    let mut out = AuthnConfig::default();
    for (i, r) in raw.mtls_rule.into_iter().enumerate() {
        let key = format!("authn.mtls_rule[{i}]");
        if r.identity.is_empty() {
            return Err(invalid(
                format!("{key}.identity"),
                "must not be empty; use \"*\" to match every certificate",
            ));
        }
        if r.identity[..r.identity.len() - 1].contains('*') {
            return Err(invalid(
                format!("{key}.identity"),
                "'*' is only allowed at the end",
            ));
        }
        out.mtls_rules.push(MtlsRule {
            identity: r.identity,
            principal: r.principal,
            groups: r.groups,
        });
    }
    for (i, t) in raw.static_token.into_iter().enumerate() {
        let key = format!("authn.static_token[{i}]");
        let sha256 = parse_hash(&t.sha256).ok_or_else(|| {
            invalid(
                format!("{key}.sha256"),
                "is not a SHA-256 hash (64 hex digits, optionally prefixed \"sha256:\"); make one with `kinvoke-gateway hash-token`",
            )
        })?;
        if t.principal.is_empty() {
            return Err(invalid(format!("{key}.principal"), "must not be empty"));
        }
        out.static_tokens.push(StaticToken {
            sha256,
            principal: t.principal,
            groups: t.groups,
        });
    }
    for (i, o) in raw.oidc.into_iter().enumerate() {
        let key = format!("authn.oidc[{i}]");
        if o.audiences.is_empty() {
            return Err(invalid(
                format!("{key}.audiences"),
                "list at least one accepted audience",
            ));
        }
        let jwks = match (o.jwks_file, o.jwks_url) {
            (Some(file), None) => JwksSource::File(resolve(&file)),
            (None, Some(url)) => {
                if !url.starts_with("https://") {
                    return Err(invalid(
                        format!("{key}.jwks_url"),
                        format!("\"{url}\" must be an https:// URL"),
                    ));
                }
                JwksSource::Url {
                    url,
                    ca_cert: o.jwks_ca_cert.as_deref().map(resolve),
                }
            }
            _ => {
                return Err(invalid(key, "set exactly one of jwks_file and jwks_url"));
            }
        };
        let algorithms = match o.algorithms {
            None => vec![Algorithm::RS256, Algorithm::ES256],
            Some(names) => names
                .iter()
                .map(|n| match n.as_str() {
                    "RS256" => Ok(Algorithm::RS256),
                    "ES256" => Ok(Algorithm::ES256),
                    other => Err(invalid(
                        format!("{key}.algorithms"),
                        format!("\"{other}\" is not supported; use RS256 and/or ES256"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let leeway = o.leeway.unwrap_or(Duration::from_secs(30));
        if leeway > MAX_LEEWAY {
            return Err(invalid(format!("{key}.leeway"), "must be at most 5m"));
        }
        out.issuers.push(IssuerConfig {
            name: o.name,
            issuer: o.issuer,
            audiences: o.audiences,
            jwks,
            algorithms,
            leeway,
            user_claim: o.user_claim.unwrap_or_else(|| "sub".to_owned()),
            groups_claim: o.groups_claim.unwrap_or_else(|| "groups".to_owned()),
            principal_prefix: o.principal_prefix,
        });
    }
    Ok(out)
}

pub(super) fn parse_roles(raw: Vec<RawRole>) -> Result<Vec<Role>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let actions = r
                .actions
                .iter()
                .map(|a| {
                    Action::from_name(a).ok_or_else(|| {
                        invalid(
                            format!("role[{i}].actions"),
                            format!(
                                "unknown action \"{a}\" (actions: runcommand/action, commandResults/read, commandResults/readAll)"
                            ),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(Role {
                name: r.name,
                actions,
            })
        })
        .collect()
}

pub(super) fn parse_assignments(raw: Vec<RawAssignment>) -> Result<Vec<Assignment>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let key = format!("assignment[{i}]");
            let scope = Scope::parse(&a.scope).ok_or_else(|| {
                invalid(
                    format!("{key}.scope"),
                    format!(
                        "\"{}\" is not a scope; use \"clusters/<name>\" or \"clusters/*\"",
                        a.scope
                    ),
                )
            })?;
            let subject = match (a.principal, a.group, a.claims) {
                (Some(p), None, None) => Subject::Principal(p),
                (None, Some(g), None) => Subject::Group(g),
                (None, None, Some(c)) if !c.is_empty() => Subject::Claims(c),
                _ => {
                    return Err(invalid(
                        key,
                        "set exactly one of principal, group or claims (a non-empty table)",
                    ));
                }
            };
            let eligibility = parse_eligibility(
                &key,
                a.eligible,
                a.max_duration,
                a.require_justification,
                a.require_approval_from,
            )?;
            Ok(Assignment {
                name: a.name.unwrap_or_else(|| key.clone()),
                subject,
                role: a.role,
                scope,
                eligibility,
            })
        })
        .collect()
}

fn parse_eligibility(
    key: &str,
    eligible: bool,
    max_duration: Option<Duration>,
    justification: Option<RawJustification>,
    approver: Option<RawApprover>,
) -> Result<Option<Eligibility>, ConfigError> {
    if !eligible {
        if max_duration.is_some() || justification.is_some() || approver.is_some() {
            return Err(invalid(
                key,
                "max_duration, require_justification and require_approval_from apply to break-glass assignments only; add eligible = true",
            ));
        }
        return Ok(None);
    }
    let max_duration = max_duration.ok_or_else(|| {
        invalid(
            format!("{key}.max_duration"),
            "an eligible (break-glass) assignment needs a max_duration, e.g. \"1h\"",
        )
    })?;
    if max_duration.is_zero() || max_duration > MAX_BREAK_GLASS {
        return Err(invalid(
            format!("{key}.max_duration"),
            "must be between 1s and 24h",
        ));
    }
    let justification = match justification {
        None | Some(RawJustification::Required(true)) => JustificationRule::FreeText,
        Some(RawJustification::Required(false)) => {
            return Err(invalid(
                format!("{key}.require_justification"),
                "break-glass always needs a justification; use true or a pattern such as \"^INC-\\\\d+\"",
            ));
        }
        Some(RawJustification::Pattern(p)) => {
            JustificationRule::Pattern(regex::Regex::new(&p).map_err(|e| {
                invalid(
                    format!("{key}.require_justification"),
                    format!("not a valid pattern: {e}"),
                )
            })?)
        }
    };
    let approval_from = match approver {
        None => None,
        Some(RawApprover {
            principal: Some(p),
            group: None,
        }) => Some(Subject::Principal(p)),
        Some(RawApprover {
            principal: None,
            group: Some(g),
        }) => Some(Subject::Group(g)),
        Some(_) => {
            return Err(invalid(
                format!("{key}.require_approval_from"),
                "set exactly one of principal or group",
            ));
        }
    };
    Ok(Some(Eligibility {
        max_duration,
        justification,
        approval_from,
    }))
}
