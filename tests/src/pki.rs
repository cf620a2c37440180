//! A throw-away CA with a server certificate and client certificates, written as files.

#[allow(unused_imports)]
use super::*;

// certificates

/// Paths of a client certificate and its key.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM), mode 0600.
    pub key: PathBuf,
}

/// A test CA whose certificate, server certificate and client certificates are files in
/// one directory: `ca.crt`, `server.crt`/`server.key` (for `localhost` and `127.0.0.1`),
/// and `<cn>.crt`/`<cn>.key` per client.
pub struct Pki {
    dir: PathBuf,
    ca: CertificateAuthority,
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

impl Pki {
    /// A fresh CA named `ca_name`, with its files written into `dir` (created if missing).
    pub fn new(dir: &Path, ca_name: &str) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ca = CertificateAuthority::new(ca_name).context("cannot create the test CA")?;
        let server = ca
            .server_cert(&["localhost", "127.0.0.1"])
            .context("cannot create the server certificate")?;
        let pki = Self {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            ca,
        };
        write_file(&pki.ca_cert, pki.ca.cert_pem().as_bytes(), 0o644)?;
        write_file(&pki.server_cert, server.cert_pem.as_bytes(), 0o644)?;
        write_file(&pki.server_key, server.key_pem.as_bytes(), 0o600)?;
        Ok(pki)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a client certificate with this common name and writes `<cn>.crt`/`<cn>.key`.
    pub fn client_cert(&self, common_name: &str) -> Result<ClientCert> {
        let issued = self
            .ca
            .client_cert(common_name, None)
            .with_context(|| format!("cannot issue a client certificate for {common_name}"))?;
        let cert = self.dir.join(format!("{common_name}.crt"));
        let key = self.dir.join(format!("{common_name}.key"));
        write_file(&cert, issued.cert_pem.as_bytes(), 0o644)?;
        write_file(&key, issued.key_pem.as_bytes(), 0o600)?;
        Ok(ClientCert { cert, key })
    }
}
