//! `[cluster.pod]`: the pod executor's settings, checked the way the API server would
//! check the Pod they make, so a mistake is found at start-up with its key named, not at
//! the first command.

use k8s_openapi::api::core::v1::Toleration;

use super::raw::{RawPod, RawToleration};
use super::{ConfigError, invalid};
use crate::exec::pod::{PodResources, PodSettings};

/// A DNS-1123 label (namespaces): lower-case alphanumerics and `-`, at most 63.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (Secret and PriorityClass names): dot-separated labels, at most 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes resource quantity as written in manifests: a decimal number with an
/// optional binary (`Ki`…`Ei`) or decimal (`m`, `k`, `M`…`E`) suffix.
fn is_quantity(s: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    SUFFIXES.iter().any(|suffix| {
        s.strip_suffix(suffix).is_some_and(|number| {
            let mut parts = number.splitn(2, '.');
            let whole = parts.next().unwrap_or_default();
            let fraction = parts.next();
            !number.is_empty()
                && whole.chars().all(|c| c.is_ascii_digit())
                && fraction.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
                && (!whole.is_empty() || fraction.is_some())
        })
    })
}

/// A label key (`[prefix/]name`) or value as Kubernetes allows them.
fn is_label_part(s: &str, max: usize) -> bool {
    s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
}

fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    !name.is_empty() && is_label_part(name, 63) && prefix.is_none_or(is_dns_subdomain)
}

/// Parses `[cluster.pod]` of cluster `key` (e.g. `cluster[1]`).
pub(super) fn parse_pod(key: &str, raw: RawPod) -> Result<PodSettings, ConfigError> {
    let key = format!("{key}.pod");
    let defaults = PodSettings::default();
    let namespace = raw.namespace.unwrap_or(defaults.namespace);
    if !is_dns_label(&namespace) {
        return Err(invalid(
            format!("{key}.namespace"),
            format!(
                "\"{namespace}\" is not a namespace name (lower-case letters, digits and '-', at most 63)"
            ),
        ));
    }
    let image = raw.image.unwrap_or(defaults.image);
    if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            format!("{key}.image"),
            format!(
                "{image:?} is not an image reference, e.g. \"registry.example.com/toolbox:1.2@sha256:...\""
            ),
        ));
    }
    if let Some(policy) = &raw.image_pull_policy
        && !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never")
    {
        return Err(invalid(
            format!("{key}.image_pull_policy"),
            format!("\"{policy}\" is not one of \"Always\", \"IfNotPresent\", \"Never\""),
        ));
    }
    if let Some(bad) = raw.image_pull_secrets.iter().find(|s| !is_dns_subdomain(s)) {
        return Err(invalid(
            format!("{key}.image_pull_secrets"),
            format!("\"{bad}\" is not a Secret name"),
        ));
    }
    let resources = PodResources {
        requests_cpu: raw
            .resources
            .requests
            .cpu
            .unwrap_or(defaults.resources.requests_cpu),
        requests_memory: raw
            .resources
            .requests
            .memory
            .unwrap_or(defaults.resources.requests_memory),
        limits_cpu: raw
            .resources
            .limits
            .cpu
            .unwrap_or(defaults.resources.limits_cpu),
        limits_memory: raw
            .resources
            .limits
            .memory
            .unwrap_or(defaults.resources.limits_memory),
    };
    for (field, value) in [
        ("requests.cpu", &resources.requests_cpu),
        ("requests.memory", &resources.requests_memory),
        ("limits.cpu", &resources.limits_cpu),
        ("limits.memory", &resources.limits_memory),
    ] {
        if !is_quantity(value) {
            return Err(invalid(
                format!("{key}.resources.{field}"),
                format!("\"{value}\" is not a Kubernetes quantity, e.g. \"500m\" or \"1Gi\""),
            ));
        }
    }
    let node_selector = raw.node_selector.unwrap_or(defaults.node_selector);
    for (label, value) in &node_selector {
        if !is_label_key(label) || !is_label_part(value, 63) {
            return Err(invalid(
                format!("{key}.node_selector"),
                format!("\"{label}\" = \"{value}\" is not a valid label key and value"),
            ));
        }
    }
    let tolerations = raw
        .tolerations
        .into_iter()
        .enumerate()
        .map(|(i, t)| parse_toleration(&format!("{key}.tolerations[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(class) = &raw.priority_class_name
        && !is_dns_subdomain(class)
    {
        return Err(invalid(
            format!("{key}.priority_class_name"),
            format!("\"{class}\" is not a PriorityClass name"),
        ));
    }
    let startup_timeout = match raw.startup_timeout {
        Some(t) if t.is_zero() => {
            return Err(invalid(
                format!("{key}.startup_timeout"),
                "must be longer than 0s",
            ));
        }
        Some(t) => t,
        None => defaults.startup_timeout,
    };
    let run_as_user = match raw.run_as_user {
        Some(uid) if uid <= 0 => {
            return Err(invalid(
                format!("{key}.run_as_user"),
                "must be a user id above 0: command Pods never run as root",
            ));
        }
        Some(uid) => uid,
        None => defaults.run_as_user,
    };
    let scratch_size_limit = raw
        .scratch_size_limit
        .unwrap_or(defaults.scratch_size_limit);
    if !is_quantity(&scratch_size_limit) {
        return Err(invalid(
            format!("{key}.scratch_size_limit"),
            format!("\"{scratch_size_limit}\" is not a Kubernetes quantity, e.g. \"1Gi\""),
        ));
    }
    Ok(PodSettings {
        namespace,
        image,
        image_pull_policy: raw.image_pull_policy,
        image_pull_secrets: raw.image_pull_secrets,
        resources,
        node_selector,
        tolerations,
        priority_class_name: raw.priority_class_name,
        startup_timeout,
        run_as_user,
        scratch_size_limit,
        loopback_relay: raw.loopback_relay,
    })
}

/// A toleration, under the API server's rules: `Exists` takes no value; an empty key
/// needs `Exists`; `toleration_seconds` only with `NoExecute`.
fn parse_toleration(key: &str, raw: RawToleration) -> Result<Toleration, ConfigError> {
    let operator = raw.operator.unwrap_or_else(|| "Equal".to_owned());
    if !matches!(operator.as_str(), "Equal" | "Exists") {
        return Err(invalid(
            format!("{key}.operator"),
            format!("\"{operator}\" is not \"Equal\" or \"Exists\""),
        ));
    }
    let effect = raw.effect.filter(|e| !e.is_empty());
    if let Some(effect) = &effect
        && !matches!(
            effect.as_str(),
            "NoSchedule" | "PreferNoSchedule" | "NoExecute"
        )
    {
        return Err(invalid(
            format!("{key}.effect"),
            format!("\"{effect}\" is not \"NoSchedule\", \"PreferNoSchedule\" or \"NoExecute\""),
        ));
    }
    let toleration_key = raw.key.filter(|k| !k.is_empty());
    if let Some(k) = &toleration_key
        && !is_label_key(k)
    {
        return Err(invalid(
            format!("{key}.key"),
            format!("\"{k}\" is not a taint key"),
        ));
    }
    if toleration_key.is_none() && operator != "Exists" {
        return Err(invalid(
            format!("{key}.operator"),
            "a toleration without a key must have operator = \"Exists\" (it then tolerates every taint)",
        ));
    }
    let value = raw.value.filter(|v| !v.is_empty());
    if operator == "Exists" && value.is_some() {
        return Err(invalid(
            format!("{key}.value"),
            "must be empty when operator = \"Exists\"",
        ));
    }
    if raw.toleration_seconds.is_some() && effect.as_deref() != Some("NoExecute") {
        return Err(invalid(
            format!("{key}.toleration_seconds"),
            "applies to effect = \"NoExecute\" only",
        ));
    }
    Ok(Toleration {
        key: toleration_key,
        operator: Some(operator),
        value,
        effect,
        toleration_seconds: raw.toleration_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_told_from_typos() {
        for ok in ["200m", "512Mi", "1Gi", "0.5", "1", "1.5Gi", "100k"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "1 Gi", "1GB", "-1", "Gi", "1.", "one"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn label_keys_follow_kubernetes() {
        assert!(is_label_key("kubernetes.io/os"));
        assert!(is_label_key("pool"));
        assert!(!is_label_key("Bad Key"));
        assert!(!is_label_key("/name"));
    }
}
