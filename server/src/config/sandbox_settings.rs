//! `[sandbox]` and what the sandbox must never expose: the files a kubeconfig names.

use std::path::{Path, PathBuf};

use super::raw::RawSandbox;
use super::{ConfigError, invalid};
use crate::sandbox::{LabeledPath, SandboxSettings};

/// The files a kubeconfig names (CA, client certificate and key, token file), absolute;
/// an error when it exists but cannot be read, since its files could then not be kept
/// secret. One that does not exist yet names nothing (`dev` writes its simulated
/// cluster's kubeconfig after loading the config; the gateway fails at start-up on one
/// still missing).
pub(super) fn kubeconfig_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let clusters = file
        .clusters
        .iter()
        .filter_map(|c| c.cluster.as_ref()?.certificate_authority.clone());
    let users = file
        .auth_infos
        .iter()
        .filter_map(|u| u.auth_info.as_ref())
        .flat_map(|a| {
            [
                a.client_certificate.clone(),
                a.client_key.clone(),
                a.token_file.clone(),
            ]
            .into_iter()
            .flatten()
        });
    Ok(clusters.chain(users).map(|f| base.join(f)).collect())
}

pub(super) fn parse_sandbox(
    raw: RawSandbox,
    resolve: &dyn Fn(&Path) -> PathBuf,
    max_concurrent_commands: usize,
) -> Result<SandboxSettings, ConfigError> {
    let mut settings = SandboxSettings::default();
    let named = |paths: &[PathBuf], key: &str| -> Vec<LabeledPath> {
        paths
            .iter()
            .map(|p| LabeledPath::new(resolve(p), key))
            .collect()
    };
    let explicit = raw
        .read_only_paths
        .as_deref()
        .map(|paths| named(paths, "sandbox.read_only_paths"))
        .unwrap_or_default();
    let extra = named(&raw.extra_read_only_paths, "sandbox.extra_read_only_paths");
    let writable = named(&raw.writable_paths, "sandbox.writable_paths");
    if raw.read_only_paths.is_some() {
        settings.read_only_paths = explicit.iter().map(|p| p.path.clone()).collect();
    }
    settings
        .read_only_paths
        .extend(extra.iter().map(|p| p.path.clone()));
    settings.writable_paths = writable.iter().map(|p| p.path.clone()).collect();
    settings.configured_paths = [explicit, extra, writable].concat();
    if let Some(text) = raw.run_as_uids {
        let range = crate::sandbox::parse_uid_range(&text)
            .map_err(|message| invalid("sandbox.run_as_uids", message))?;
        let size = usize::try_from(range.end() - range.start())
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        if size < max_concurrent_commands {
            return Err(invalid(
                "sandbox.run_as_uids",
                format!(
                    "holds {size} user id(s) but limits.max_concurrent_commands is {max_concurrent_commands}; \
                     every running command needs its own"
                ),
            ));
        }
        settings.run_as_uids = Some(range);
    }
    Ok(settings)
}
