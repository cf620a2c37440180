//! `kinvoke-gateway dev`: a ready-to-use local gateway. Creates once, in a state
//! directory, a CA, a server certificate for localhost, a client certificate, and then
//! (each start) a gateway config with two clusters and a client config for
//! `kinvoke --config DIR/client.toml`: `local` (shell mode, no Kubernetes behind it) and
//! `sandbox`, a SIMULATED Kubernetes API server (the `kinvoke-simcluster` test double)
//! started in-process, so the relay and impersonation work end to end with no cluster.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::pki::CertificateAuthority;

/// Name of the simulated cluster `dev` registers.
pub const SANDBOX: &str = "sandbox";

/// File (in the state directory) with the gateway's credentials for the sandbox.
pub const SANDBOX_KUBECONFIG: &str = "sandbox.kubeconfig";

/// Name of the cluster `dev` registers for the pod executor: the same simulated cluster,
/// whose simulated kubelet runs each command's Pod as a sandboxed local process.
pub const SANDBOX_PODS: &str = "sandbox-pods";

/// Starts the simulated cluster, with a simulated kubelet running Pods in the command
/// sandbox (`sandbox` settings), creates the pod executor's namespace in it, and writes
/// the gateway's kubeconfig for it; keep the returned handle alive for as long as the
/// gateway runs.
pub async fn start_sandbox(
    files: &DevFiles,
    sandbox: &crate::sandbox::SandboxSettings,
) -> Result<kinvoke_simcluster::SimCluster, DevError> {
    let runtime = crate::sim_kubelet::SandboxRuntime::new(
        std::sync::Arc::new(crate::sandbox::launch::Sandbox::new(sandbox.clone())),
        crate::exec::DEFAULT_COMMAND_PATH,
    );
    // it runs the pod executor's Pods only; others are Running at once, as without it
    let options = kinvoke_simcluster::SimOptions::default().with_kubelet(
        kinvoke_simcluster::KubeletOptions::new(std::sync::Arc::new(runtime)).only_labelled(
            crate::exec::pod::LABEL_MANAGED_BY,
            crate::exec::pod::MANAGED_BY,
        ),
    );
    let sim = kinvoke_simcluster::SimCluster::start(options)
        .await
        .map_err(|e| DevError::Sandbox(e.to_string()))?;
    sim.create_namespace(crate::exec::pod::DEFAULT_NAMESPACE)
        .map_err(|e| DevError::Sandbox(e.to_string()))?;
    // the admin token changes with every start: rewrite, readable by the gateway only
    let path = files.dir.join(SANDBOX_KUBECONFIG);
    write(&path, &sim.admin_kubeconfig(), 0o600)?;
    tracing::warn!(url = %sim.url(), "cluster \"{SANDBOX}\" is a SIMULATED Kubernetes API server (a test double), not a real cluster");
    Ok(sim)
}

/// Identity of the developer certificate `dev` issues.
pub const DEV_PRINCIPAL: &str = "dev-user";

/// Files of a dev environment.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// Absolute state directory.
    pub dir: PathBuf,
    /// Gateway config.
    pub gateway_config: PathBuf,
    /// Client config.
    pub client_config: PathBuf,
}

/// Why the dev environment could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The client's config file holds something that is not a kinvoke client config.
    #[error("{path}: {message}")]
    ClientConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot generate dev certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// The simulated cluster could not start.
    #[error("cannot start the sandbox cluster: {0}")]
    Sandbox(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, content: &str, mode: u32) -> Result<(), DevError> {
    std::fs::write(path, content).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Creates missing certificates and writes both configs for a gateway on `listen`.
pub fn prepare(dir: &Path, listen: SocketAddr) -> Result<DevFiles, DevError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    let dir = dir.canonicalize().map_err(io_err(dir))?;
    let names = [
        "ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ];
    if !names.iter().all(|n| dir.join(n).exists()) {
        let ca = CertificateAuthority::new("kinvoke dev CA")?;
        let server = ca.server_cert(&["localhost", "127.0.0.1", "::1"])?;
        let client = ca.client_cert(DEV_PRINCIPAL, None)?;
        write(&dir.join("ca.crt"), &ca.cert_pem(), 0o644)?;
        write(&dir.join("server.crt"), &server.cert_pem, 0o644)?;
        write(&dir.join("server.key"), &server.key_pem, 0o600)?;
        write(&dir.join("client.crt"), &client.cert_pem, 0o644)?;
        write(&dir.join("client.key"), &client.key_pem, 0o600)?;
    }
    let gateway_config = dir.join("gateway.toml");
    // the admin listener on a free loopback port, written in the config so it can be
    // found there (a port taken between this probe and the gateway's bind fails loudly)
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io_err(&gateway_config))?;
    write(&gateway_config, &gateway_toml(listen, admin), 0o644)?;
    let client_config = dir.join("client.toml");
    Ok(DevFiles {
        dir,
        gateway_config,
        client_config,
    })
}

/// The `kinvoke` client's default config file (`$XDG_CONFIG_HOME/kinvoke/config.toml`,
/// i.e. `~/.config/kinvoke/config.toml`), as the client finds it.
pub fn default_client_config() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|d| d.config_dir().join("kinvoke").join("config.toml"))
}

/// Merges this dev gateway's profile, `dev`, into `path` (the client's default config
/// file unless told otherwise): its endpoint and absolute certificate paths; it becomes
/// the default profile when the file has none. Other profiles, comments and layout are
/// kept; the file is replaced atomically. Returns the default profile after the merge.
pub fn merge_client_config(
    files: &DevFiles,
    bound: SocketAddr,
    path: &Path,
) -> Result<String, DevError> {
    use toml_edit::{DocumentMut, Item, Table, value};
    let bad = |message: String| DevError::ClientConfig {
        path: path.to_owned(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(io_err(path)(err)),
    };
    let mut doc: DocumentMut = text.parse().map_err(|e| bad(format!("{e}")))?;
    let profiles = doc
        .entry("profiles")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .ok_or_else(|| bad("`profiles` is not a table".to_owned()))?;
    let mut profile = Table::new();
    profile["endpoint"] = value(format!("https://{}", endpoint_host(bound)));
    for (key, file) in [
        ("ca_cert", "ca.crt"),
        ("client_cert", "client.crt"),
        ("client_key", "client.key"),
    ] {
        profile[key] = value(files.dir.join(file).display().to_string());
    }
    profiles.insert(DEV_PROFILE, Item::Table(profile));
    if doc.get("default_profile").is_none() {
        doc["default_profile"] = value(DEV_PROFILE);
    }
    let default = doc
        .get("default_profile")
        .and_then(Item::as_str)
        .unwrap_or(DEV_PROFILE)
        .to_owned();
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    std::fs::write(tmp.path(), doc.to_string()).map_err(io_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    Ok(default)
}

/// The profile `dev` writes.
pub const DEV_PROFILE: &str = "dev";

/// `HOST:PORT` of a bound address, as a client dials it.
fn endpoint_host(bound: SocketAddr) -> String {
    let host = match bound.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    format!("{host}:{}", bound.port())
}

/// Writes the client config for the address the gateway actually bound.
pub fn write_client_config(files: &DevFiles, bound: SocketAddr) -> Result<(), DevError> {
    let text = format!(
        "# written by `kinvoke-gateway dev`; use with `kinvoke --config {path}`\n\
         default_profile = \"dev\"\n\n\
         [profiles.dev]\n\
         endpoint = \"https://{host}\"\n\
         ca_cert = \"ca.crt\"\n\
         client_cert = \"client.crt\"\n\
         client_key = \"client.key\"\n",
        path = files.client_config.display(),
        host = endpoint_host(bound),
    );
    write(&files.client_config, &text, 0o644)
}

fn gateway_toml(listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "# written by `kinvoke-gateway dev` at every start; copy it to make your own\n\
         state_dir = \".\"\n\
         shutdown_grace = \"10s\"\n\n\
         [store]\n\
         retention = \"24h\"\n\n\
         # /metrics, /healthz and /readyz\n\
         [admin]\n\
         address = \"{admin}\"\n\n\
         [[listener]]\n\
         name = \"dev\"\n\
         address = \"{listen}\"\n\
         tls = {{ cert = \"server.crt\", key = \"server.key\", client_ca = \"ca.crt\" }}\n\n\
         [[cluster]]\n\
         name = \"local\"\n\
         executor = \"local\"\n\
         mode = \"shell\"\n\n\
         # a simulated Kubernetes API server started by `dev` (not a real cluster)\n\
         [[cluster]]\n\
         name = \"{SANDBOX}\"\n\
         mode = \"shell\"\n\
         kubeconfig = \"{SANDBOX_KUBECONFIG}\"\n\
         description = \"simulated cluster (kinvoke-simcluster test double, not a real Kubernetes)\"\n\n\
         # the same simulated cluster, each command in a Pod of its own (as AKS command invoke);\n\
         # its simulated kubelet runs the Pod as a sandboxed process on this host, so its Pods\n\
         # reach the relay on loopback\n\
         [[cluster]]\n\
         name = \"{SANDBOX_PODS}\"\n\
         executor = \"pod\"\n\
         mode = \"shell\"\n\
         kubeconfig = \"{SANDBOX_KUBECONFIG}\"\n\
         description = \"simulated cluster, commands in Pods (kinvoke-simcluster test double)\"\n\n\
         [cluster.pod]\n\
         loopback_relay = true\n\
         startup_timeout = \"1m\"\n\n\
         # the developer certificate's identity may do everything on every cluster\n\
         [[assignment]]\n\
         name = \"dev-admin\"\n\
         principal = \"{DEV_PRINCIPAL}\"\n\
         role = \"Cluster Admin\"\n\
         scope = \"clusters/*\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_writes_a_loadable_config_and_reuses_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let files = prepare(tmp.path(), addr).unwrap();
        let config = crate::config::Config::load(&files.gateway_config).unwrap();
        assert_eq!(config.clusters[0].name.as_str(), "local");
        assert_eq!(config.state_dir, files.dir.join("."));
        let ca = std::fs::read(files.dir.join("ca.crt")).unwrap();
        prepare(tmp.path(), addr).unwrap();
        assert_eq!(std::fs::read(files.dir.join("ca.crt")).unwrap(), ca);
        let key_mode = std::fs::metadata(files.dir.join("client.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
    }
}
