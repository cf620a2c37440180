//! Who is calling: bearer token → identity, then impersonation, then the RBAC-like deny
//! list. All pure functions of the request headers and the cluster's settings.

use std::collections::BTreeMap;

use http::HeaderMap;

use crate::error::ApiError;

/// The privileged identity's user name (the gateway's service identity).
pub const ADMIN_USER: &str = "kinvoke-gateway";
/// The privileged identity's group; it may impersonate anyone.
pub const ADMIN_GROUP: &str = "system:masters";
/// Every authenticated identity is in this group, as in kube-apiserver.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";

/// An authenticated (and possibly impersonated) identity, as `SelfSubjectReview` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct UserInfo {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// A bearer token the simulated cluster accepts.
#[derive(Clone)]
pub(crate) struct TokenIdentity {
    pub token: String,
    pub user: UserInfo,
    pub may_impersonate: bool,
}

fn push_unique(groups: &mut Vec<String>, group: &str) {
    if !groups.iter().any(|g| g == group) {
        groups.push(group.to_string());
    }
}

fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .collect()
}

/// `%xx` decoding for `Impersonate-Extra-` header-name suffixes (client-go escapes them).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn impersonation_forbidden(real_user: &str, resource: &str, target: &str) -> ApiError {
    ApiError::Forbidden {
        message: format!(
            "{resource} \"{target}\" is forbidden: User \"{real_user}\" cannot impersonate resource \"{resource}\" in API group \"\" at the cluster scope"
        ),
        resource: resource.to_string(),
        group: String::new(),
        name: Some(target.to_string()),
    }
}

/// Authenticates the request's bearer token and applies `Impersonate-*` headers.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    tokens: &[TokenIdentity],
) -> Result<UserInfo, ApiError> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or(ApiError::Unauthorized)?;
    let caller = tokens
        .iter()
        .find(|t| t.token == token)
        .ok_or(ApiError::Unauthorized)?;

    let users = header_values(headers, "impersonate-user");
    let groups = header_values(headers, "impersonate-group");
    let uids = header_values(headers, "impersonate-uid");
    let extra_headers: Vec<(String, &str)> = headers
        .iter()
        .filter_map(|(name, value)| {
            let key = name.as_str().strip_prefix("impersonate-extra-")?;
            Some((
                percent_decode(key).to_ascii_lowercase(),
                value.to_str().ok()?,
            ))
        })
        .collect();
    if users.is_empty() {
        if !groups.is_empty() || !uids.is_empty() || !extra_headers.is_empty() {
            return Err(ApiError::BadRequest(
                "impersonating groups, uid or extra requires impersonating a user (Impersonate-User)"
                    .into(),
            ));
        }
        return Ok(caller.user.clone());
    }
    let [user] = users.as_slice() else {
        return Err(ApiError::BadRequest(
            "only one Impersonate-User header is allowed".into(),
        ));
    };
    if !caller.may_impersonate {
        return Err(impersonation_forbidden(
            &caller.user.username,
            "users",
            user,
        ));
    }
    let mut effective = UserInfo {
        username: (*user).to_string(),
        uid: uids.first().map(|u| (*u).to_string()),
        groups: Vec::new(),
        extra: BTreeMap::new(),
    };
    for g in groups {
        push_unique(&mut effective.groups, g);
    }
    push_unique(&mut effective.groups, AUTHENTICATED_GROUP);
    for (key, value) in extra_headers {
        effective
            .extra
            .entry(key)
            .or_default()
            .push(value.to_string());
    }
    Ok(effective)
}

/// The request attributes an authorization decision is made on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `pods` or `pods/log`
    pub resource: String,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// Whether `user` may do what `attrs` describe: everyone may, except users on the deny list.
pub(crate) fn authorize(
    user: &UserInfo,
    denied: &[String],
    attrs: &Attributes<'_>,
) -> Result<(), ApiError> {
    if !denied.iter().any(|d| d == &user.username) {
        return Ok(());
    }
    let plural = attrs.resource.split('/').next().unwrap_or_default();
    let subject = match attrs.name {
        Some(name) => format!("{plural} \"{name}\""),
        None => plural.to_string(),
    };
    let scope = match attrs.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    Err(ApiError::Forbidden {
        message: format!(
            "{subject} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            user.username, attrs.verb, attrs.resource, attrs.group
        ),
        resource: plural.to_string(),
        group: attrs.group.to_string(),
        name: attrs.name.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn tokens() -> Vec<TokenIdentity> {
        vec![
            TokenIdentity {
                token: "admin-token".into(),
                user: UserInfo {
                    username: ADMIN_USER.into(),
                    groups: vec![ADMIN_GROUP.into(), AUTHENTICATED_GROUP.into()],
                    ..Default::default()
                },
                may_impersonate: true,
            },
            TokenIdentity {
                token: "bob-token".into(),
                user: UserInfo {
                    username: "bob".into(),
                    groups: vec![AUTHENTICATED_GROUP.into()],
                    ..Default::default()
                },
                may_impersonate: false,
            },
        ]
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn admin_token_is_the_gateway_identity() {
        let who = authenticate(
            &headers(&[("authorization", "Bearer admin-token")]),
            &tokens(),
        );
        assert_eq!(who.map(|u| u.username), Ok(ADMIN_USER.to_string()));
    }

    #[test]
    fn missing_or_unknown_token_is_unauthorized() {
        assert_eq!(
            authenticate(&headers(&[]), &tokens()),
            Err(ApiError::Unauthorized)
        );
        assert_eq!(
            authenticate(&headers(&[("authorization", "Bearer nope")]), &tokens()),
            Err(ApiError::Unauthorized)
        );
        assert_eq!(
            authenticate(
                &headers(&[("authorization", "Basic admin-token")]),
                &tokens()
            ),
            Err(ApiError::Unauthorized)
        );
    }

    #[test]
    fn admin_impersonates_with_deduplicated_groups_and_extra() {
        let h = headers(&[
            ("authorization", "Bearer admin-token"),
            ("impersonate-user", "alice"),
            ("impersonate-group", "devs"),
            ("impersonate-group", "devs"),
            ("impersonate-group", "ops"),
            ("impersonate-uid", "u-1"),
            ("impersonate-extra-reason", "incident 42"),
            ("impersonate-extra-ticket%2fid", "T-1"),
        ]);
        let who = authenticate(&h, &tokens()).unwrap_or_default();
        assert_eq!(who.username, "alice");
        assert_eq!(who.uid.as_deref(), Some("u-1"));
        assert_eq!(who.groups, vec!["devs", "ops", AUTHENTICATED_GROUP]);
        assert_eq!(
            who.extra.get("reason"),
            Some(&vec!["incident 42".to_string()])
        );
        assert_eq!(who.extra.get("ticket/id"), Some(&vec!["T-1".to_string()]));
    }

    #[test]
    fn non_admin_cannot_impersonate() {
        let h = headers(&[
            ("authorization", "Bearer bob-token"),
            ("impersonate-user", "x"),
        ]);
        match authenticate(&h, &tokens()) {
            Err(e @ ApiError::Forbidden { .. }) => assert_eq!(
                e.to_string(),
                "users \"x\" is forbidden: User \"bob\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"
            ),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn group_without_user_is_a_bad_request() {
        let h = headers(&[
            ("authorization", "Bearer admin-token"),
            ("impersonate-group", "devs"),
        ]);
        assert!(matches!(
            authenticate(&h, &tokens()),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn denied_user_gets_kube_apiserver_wording() {
        let alice = UserInfo {
            username: "alice".into(),
            ..Default::default()
        };
        let denied = vec!["alice".to_string()];
        let list = Attributes {
            verb: "list",
            group: "",
            resource: "pods".into(),
            namespace: Some("default"),
            name: None,
        };
        assert_eq!(
            authorize(&alice, &denied, &list).map_err(|e| e.to_string()),
            Err("pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"".to_string())
        );
        let get_ns = Attributes {
            verb: "get",
            group: "",
            resource: "namespaces".into(),
            namespace: None,
            name: Some("demo"),
        };
        assert_eq!(
            authorize(&alice, &denied, &get_ns).map_err(|e| e.to_string()),
            Err("namespaces \"demo\" is forbidden: User \"alice\" cannot get resource \"namespaces\" in API group \"\" at the cluster scope".to_string())
        );
        assert_eq!(authorize(&alice, &[], &list), Ok(()));
    }
}
