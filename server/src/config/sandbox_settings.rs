//! `[sandbox]` and what the sandbox must never expose: the files a kubeconfig names.

use std::path::{Path, PathBuf};

use super::raw::RawSandbox;
use super::{ConfigError, invalid};
use crate::sandbox::SandboxSettings;

/// The files a kubeconfig names (CA, client certificate and key, token file), absolute;
/// nothing when it cannot be read here (the gateway then fails on it at start-up).
pub(super) fn kubeconfig_files(path: &Path) -> Vec<PathBuf> {
    let Ok(file) = kube::config::Kubeconfig::read_from(path) else {
        return Vec::new();
    };
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
    clusters.chain(users).map(|f| base.join(f)).collect()
}

pub(super) fn parse_sandbox(
    raw: RawSandbox,
    resolve: &dyn Fn(&Path) -> PathBuf,
    max_concurrent_commands: usize,
) -> Result<SandboxSettings, ConfigError> {
    let mut settings = SandboxSettings::default();
    if let Some(paths) = raw.read_only_paths {
        settings.read_only_paths = paths;
    }
    settings.read_only_paths.extend(raw.extra_read_only_paths);
    for p in settings.read_only_paths.iter_mut() {
        *p = resolve(p);
    }
    settings.writable_paths = raw.writable_paths.iter().map(|p| resolve(p)).collect();
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
