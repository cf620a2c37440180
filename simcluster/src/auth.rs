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

/// Every value of header `name`, as kube-apiserver (Go's `net/http`) reads them: the raw
/// bytes, so UTF-8 names such as `josé` arrive as they were sent, with surrounding spaces
/// and tabs trimmed.
fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim_matches([' ', '\t'])
                .to_string()
        })
        .collect()
}

/// An `Impersonate-Extra-` header-name suffix as kube-apiserver reads it
/// (`unescapeExtraKey(strings.ToLower(...))`): lower-cased, then `url.PathUnescape`d; a
/// malformed escape keeps the key as it was ("always record extra strings").
fn extra_key(suffix: &str) -> String {
    let lower = suffix.to_lowercase();
    let bytes = lower.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            match byte {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return lower,
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One entry of kube-apiserver's `impersonationRequests`, printed as Go's `%v` prints a
/// `v1.ObjectReference` value: its seven fields (Kind, Namespace, Name, UID,
/// APIVersion, ResourceVersion, FieldPath) between braces, separated by one space.
fn object_reference(kind: &str, name: &str, api_version: &str, field_path: &str) -> String {
    format!("{{{kind}  {name}  {api_version}  {field_path}}}")
}

/// kube-apiserver's answer to `Impersonate-Group`, `Impersonate-Extra-*` or
/// `Impersonate-Uid` without a (non-empty) `Impersonate-User`. Since Kubernetes 1.35
/// (k8s.io/apiserver v0.35.0, `pkg/endpoints/filters/impersonation/impersonation.go`,
/// `buildImpersonationRequests`) that is
/// `apierrors.NewBadRequest(fmt.Sprintf("requested %v without impersonating a user",
/// impersonationRequests))`, written by `responsewriters.RespondWithError`: a 400
/// `Status` with reason `BadRequest`. Up to 1.34 (`filters/impersonation.go`) the same
/// message was an `InternalError`, 500. This cluster reports 1.35, so it answers 400.
/// The requests are listed groups first, then extras (Go's map order, which is random;
/// here the order they were sent), then the uid.
fn without_a_user(groups: &[String], extras: &[(String, String)], uid: Option<&str>) -> ApiError {
    const AUTHENTICATION_V1: &str = "authentication.k8s.io/v1";
    let requests: Vec<String> = groups
        .iter()
        .map(|g| object_reference("Group", g, "", ""))
        .chain(
            extras
                .iter()
                .map(|(key, value)| object_reference("UserExtra", value, AUTHENTICATION_V1, key)),
        )
        .chain(uid.map(|u| object_reference("UID", u, AUTHENTICATION_V1, "")))
        .collect();
    ApiError::BadRequest(format!(
        "requested [{}] without impersonating a user",
        requests.join(" ")
    ))
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

    // like kube-apiserver: the first Impersonate-User, and an empty one is no user at all
    let user = header_values(headers, "impersonate-user")
        .into_iter()
        .next()
        .filter(|u| !u.is_empty());
    let groups = header_values(headers, "impersonate-group");
    let uid = header_values(headers, "impersonate-uid")
        .into_iter()
        .next()
        .filter(|u| !u.is_empty());
    let mut extra_headers: Vec<(String, String)> = Vec::new();
    for name in headers.keys() {
        if let Some(suffix) = name.as_str().strip_prefix("impersonate-extra-") {
            let key = extra_key(suffix);
            for value in header_values(headers, name.as_str()) {
                extra_headers.push((key.clone(), value));
            }
        }
    }
    let Some(user) = user else {
        if !groups.is_empty() || uid.is_some() || !extra_headers.is_empty() {
            return Err(without_a_user(&groups, &extra_headers, uid.as_deref()));
        }
        return Ok(caller.user.clone());
    };
    if !caller.may_impersonate {
        return Err(impersonation_forbidden(
            &caller.user.username,
            "users",
            &user,
        ));
    }
    let mut effective = UserInfo {
        username: user,
        uid,
        groups: Vec::new(),
        extra: BTreeMap::new(),
    };
    for g in &groups {
        push_unique(&mut effective.groups, g);
    }
    push_unique(&mut effective.groups, AUTHENTICATED_GROUP);
    for (key, value) in extra_headers {
        effective.extra.entry(key).or_default().push(value);
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
    fn groups_extras_or_uid_without_a_user_are_refused_as_kube_apiserver_1_35_does() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[("impersonate-group", "devs"), ("impersonate-group", "ops")],
                "requested [{Group  devs    } {Group  ops    }] without impersonating a user",
            ),
            (
                &[("impersonate-extra-kinvoke-command-id", "c1")],
                "requested [{UserExtra  c1  authentication.k8s.io/v1  kinvoke-command-id}] without impersonating a user",
            ),
            (
                &[("impersonate-uid", "u-1")],
                "requested [{UID  u-1  authentication.k8s.io/v1  }] without impersonating a user",
            ),
            (
                // an empty Impersonate-User is no user (Go's len(requestedUser) > 0)
                &[("impersonate-user", ""), ("impersonate-group", "devs")],
                "requested [{Group  devs    }] without impersonating a user",
            ),
            (
                &[
                    ("impersonate-group", "devs"),
                    ("impersonate-extra-ticket%2fid", "T-1"),
                    ("impersonate-uid", "u-1"),
                ],
                "requested [{Group  devs    } {UserExtra  T-1  authentication.k8s.io/v1  ticket/id} {UID  u-1  authentication.k8s.io/v1  }] without impersonating a user",
            ),
        ];
        for (pairs, message) in cases {
            let mut h = headers(pairs);
            h.append(
                "authorization",
                HeaderValue::from_static("Bearer admin-token"),
            );
            let err = authenticate(&h, &tokens()).unwrap_err();
            assert_eq!(err, ApiError::BadRequest(message.to_string()), "{pairs:?}");
            let (status, body) = err.to_status();
            assert_eq!(status.as_u16(), 400);
            assert_eq!(body["kind"], "Status");
            assert_eq!(body["reason"], "BadRequest");
            assert_eq!(body["code"], 400);
            assert_eq!(body["message"], message);
        }
    }

    #[test]
    fn an_empty_impersonate_user_alone_leaves_the_caller_as_it_is() {
        let h = headers(&[
            ("authorization", "Bearer admin-token"),
            ("impersonate-user", ""),
        ]);
        let who = authenticate(&h, &tokens()).unwrap_or_default();
        assert_eq!(who.username, ADMIN_USER);
    }

    #[test]
    fn utf8_user_and_group_names_are_read_as_sent() {
        let mut h = headers(&[("authorization", "Bearer admin-token")]);
        h.append(
            "impersonate-user",
            HeaderValue::from_bytes("josé".as_bytes()).unwrap(),
        );
        h.append(
            "impersonate-group",
            HeaderValue::from_bytes("équipe".as_bytes()).unwrap(),
        );
        let who = authenticate(&h, &tokens()).unwrap_or_default();
        assert_eq!(who.username, "josé");
        assert_eq!(who.groups, ["équipe", AUTHENTICATED_GROUP]);
    }

    #[test]
    fn extra_keys_are_lower_cased_then_percent_decoded() {
        let cases = [
            ("kinvoke-command-id", "kinvoke-command-id"),
            ("ticket%2fid", "ticket/id"),
            ("ticket%2Fid", "ticket/id"),
            ("cl%c3%a9", "clé"),
            // lower-cased before decoding, as kube-apiserver does
            ("%41bc", "Abc"),
            // a malformed escape keeps the whole key as it came
            ("100%", "100%"),
            ("a%zzb%2f", "a%zzb%2f"),
        ];
        for (suffix, key) in cases {
            assert_eq!(extra_key(suffix), key, "{suffix}");
        }
    }

    #[test]
    fn the_first_impersonate_user_counts_as_in_kube_apiserver() {
        let h = headers(&[
            ("authorization", "Bearer admin-token"),
            ("impersonate-user", "alice"),
            ("impersonate-user", "mallory"),
        ]);
        let who = authenticate(&h, &tokens()).unwrap_or_default();
        assert_eq!(who.username, "alice");
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
