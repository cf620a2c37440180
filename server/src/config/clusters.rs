//! `[[cluster]]`: each cluster's name, executor, mode, programs, PATH, API server,
//! identity mapping, gates and sandbox.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::pod_settings::parse_pod;
use super::raw::RawCluster;
use super::sections::parse_identity;
use super::{ApiServer, ClusterConfig, ConfigError, DEFAULT_COMMAND_PATH, ExecSettings, invalid};
use crate::access::cidr::CidrSet;
use crate::command::ClusterName;
use crate::sandbox::SandboxMode;

/// The clusters, validated; at least one. Risky settings (a cluster without the
/// sandbox) are added to `warnings`.
pub(super) fn parse_clusters(
    raw: Vec<RawCluster>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    warnings: &mut Vec<String>,
) -> Result<Vec<ClusterConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "cluster",
            "no [[cluster]] is configured; add one with a `name`",
        ));
    }
    let mut clusters: Vec<ClusterConfig> = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let key = format!("cluster[{i}]");
        let name = ClusterName::parse(&c.name)
            .map_err(|message| invalid(format!("{key}.name"), message))?;
        if clusters.iter().any(|other| other.name == name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("cluster \"{name}\" is configured twice"),
            ));
        }
        let pod = match (c.executor.as_str(), c.pod) {
            ("local", None) => None,
            ("local", Some(_)) => {
                return Err(invalid(
                    format!("{key}.pod"),
                    "applies to executor = \"pod\" only; set executor = \"pod\" or remove [cluster.pod]",
                ));
            }
            ("pod", raw) => {
                if c.kubeconfig.is_none() && !c.in_cluster {
                    return Err(invalid(
                        format!("{key}.executor"),
                        "the pod executor runs commands in the cluster: set kubeconfig (or in_cluster = true) for the gateway's own access to it",
                    ));
                }
                Some(parse_pod(&key, raw.unwrap_or_default())?)
            }
            (other, _) => {
                return Err(invalid(
                    format!("{key}.executor"),
                    format!(
                        "unknown executor \"{other}\"; this gateway supports \"local\" and \"pod\""
                    ),
                ));
            }
        };
        let allowed_programs: BTreeSet<String> = c
            .allowed_programs
            .unwrap_or_else(|| vec!["kubectl".to_owned(), "helm".to_owned()])
            .into_iter()
            .collect();
        if let Some(bad) = allowed_programs.iter().find(|p| p.is_empty()) {
            return Err(invalid(
                format!("{key}.allowed_programs"),
                format!("\"{bad}\" is not a program name"),
            ));
        }
        let path = c.path.unwrap_or_else(|| DEFAULT_COMMAND_PATH.to_owned());
        if path.contains('\0') {
            return Err(invalid(format!("{key}.path"), "must not contain NUL"));
        }
        if let Some(bad) = path.split(':').find(|dir| !dir.starts_with('/')) {
            return Err(invalid(
                format!("{key}.path"),
                format!(
                    "entry \"{bad}\" is empty or relative, so commands would run programs from \
                     their working directory, where attached files land; list absolute directories only"
                ),
            ));
        }
        let authorized_ip_ranges = CidrSet::parse(&c.authorized_ip_ranges)
            .map_err(|e| invalid(format!("{key}.authorized_ip_ranges"), e.to_string()))?;
        clusters.push(ClusterConfig {
            name,
            exec: ExecSettings {
                mode: c.mode,
                allowed_programs,
                path,
                shell: c.shell.unwrap_or_else(|| PathBuf::from("bash")),
                sandbox: c.sandbox,
            },
            api: match (c.kubeconfig, c.in_cluster) {
                (Some(_), true) => {
                    return Err(invalid(
                        format!("{key}.in_cluster"),
                        "set either kubeconfig or in_cluster = true, not both",
                    ));
                }
                (Some(path), false) => Some(ApiServer::Kubeconfig {
                    path: resolve(&path),
                    context: c.context,
                }),
                (None, true) => Some(ApiServer::InCluster),
                (None, false) => {
                    if c.context.is_some() {
                        return Err(invalid(
                            format!("{key}.context"),
                            "needs a kubeconfig to pick the context from",
                        ));
                    }
                    None
                }
            },
            identity: parse_identity(&key, c.identity)?,
            description: c.description,
            disable_run_command: c.disable_run_command,
            authorized_ip_ranges,
            pod,
        });
        if c.sandbox == SandboxMode::Off && c.executor == "local" {
            warnings.push(format!(
                "cluster \"{}\" runs commands WITHOUT the sandbox ({key}.sandbox = \"off\"): \
                 a command can read this gateway's config, kubeconfigs, TLS keys, store and audit log \
                 and act as the gateway; use it only where the kernel cannot sandbox",
                c.name
            ));
        }
    }
    Ok(clusters)
}
