//! The pinned kubectl and helm, the relay kubeconfig a command printed, and HTTPS knocks on the relay.

#[allow(unused_imports)]
use super::*;

// kubectl, helm and the relay

/// The tools a relay test needs in [`kube_tools`]'s directory.
pub(crate) const KUBE_TOOLS: [&str; 2] = ["kubectl", "helm"];

/// Set to `1` by `scripts/test`: missing kubectl or helm fail the tests that need them.
pub(crate) const REQUIRE_KUBE_TOOLS: &str = "KINVOKE_REQUIRE_KUBE_TOOLS";

/// The script that fetches the pinned kubectl and helm.
pub(crate) const FETCH_KUBE_TOOLS: &str = "scripts/fetch-kube-tools";

/// The directory holding the pinned `kubectl` and `helm` that `scripts/fetch-kube-tools`
/// downloads: `<repo>/.tools/bin`. `Ok(None)` when they are missing, after printing a
/// `SKIPPED` line naming the script, so a developer without them can still run the other
/// tests; under `CI=true` (or `CI=1`) or `KINVOKE_REQUIRE_KUBE_TOOLS=1` (set by
/// `scripts/test`, the README's test command) missing tools are an error instead, so a
/// green run cannot come from skipping.
pub fn kube_tools() -> Result<Option<PathBuf>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent directory")?;
    let set = |name: &str| std::env::var(name).is_ok_and(|v| v == "true" || v == "1");
    let required = set("CI") || set(REQUIRE_KUBE_TOOLS);
    kube_tools_in(&repo.join(".tools").join("bin"), required)
}

/// [`kube_tools`] for the directory `dir`, failing on missing tools when `ci`.
pub(crate) fn kube_tools_in(dir: &Path, ci: bool) -> Result<Option<PathBuf>> {
    let missing: Vec<&str> = KUBE_TOOLS
        .into_iter()
        .filter(|tool| !dir.join(tool).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(Some(dir.to_owned()));
    }
    let what = format!(
        "{} not found in {}: run `{FETCH_KUBE_TOOLS}`",
        missing.join(" and "),
        dir.display()
    );
    if ci {
        bail!(
            "{what} (CI or {REQUIRE_KUBE_TOOLS} is set, so the tests that need them may not be skipped)"
        );
    }
    println!("SKIPPED: {what}");
    Ok(None)
}

/// A `PATH` for commands that finds the tools in `tools` (see [`kube_tools`]) before the
/// system's: `<tools>:/usr/local/bin:/usr/bin:/bin`.
pub fn kube_tools_path(tools: &Path) -> String {
    format!("{}:/usr/local/bin:/usr/bin:/bin", tools.display())
}

/// What a command's relay kubeconfig (`$KUBECONFIG`, as the command printed it with
/// `cat "$KUBECONFIG"`) says: the relay's URL, its CA and the command's token. Read from
/// the flat `server:`, `certificate-authority-data:` and `token:` lines kinvoke writes
/// (one cluster, one user); other lines around them are ignored.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayKubeconfig {
    /// `https://127.0.0.1:PORT` of the relay.
    pub server: String,
    /// PEM of the relay's CA.
    pub ca_pem: String,
    /// The command's bearer token.
    pub token: String,
}

impl fmt::Debug for RelayKubeconfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayKubeconfig")
            .field("server", &self.server)
            .field("token", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl RelayKubeconfig {
    /// Reads the fields from `text`; fails naming the first one missing or malformed.
    pub fn parse(text: &str) -> Result<Self> {
        let field = |key: &str| -> Result<String> {
            text.lines()
                .find_map(|line| line.trim().strip_prefix(key))
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
                .with_context(|| format!("no `{key}` line in the kubeconfig:\n{text}"))
        };
        let ca = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data:")?)
            .context("certificate-authority-data is not base64")?;
        Ok(Self {
            server: field("server:")?,
            ca_pem: String::from_utf8(ca).context("certificate-authority-data is not a PEM")?,
            token: field("token:")?,
        })
    }
}

/// An HTTP answer read by [`https_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// Header names (lowercased) and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (lossy UTF-8, de-chunked).
    pub body: String,
}

impl HttpAnswer {
    /// Parses the body as one JSON document (a Kubernetes `Status`, say).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the body is not JSON: {:?}", self.body))
    }
}

/// A one-shot HTTPS GET of `url` (`https://HOST:PORT/PATH`) trusting only `ca_pem`, with
/// `headers` added, over HTTP/1.1 with `Connection: close`: enough to knock on the relay
/// from outside the gateway. I/O is bounded by [`PROCESS_TIMEOUT`] as a guard.
pub fn https_get(url: &str, ca_pem: &str, headers: &[(&str, &str)]) -> Result<HttpAnswer> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let rest = url
        .strip_prefix("https://")
        .with_context(|| format!("{url} is not an https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let (host, _port) = authority
        .rsplit_once(':')
        .with_context(|| format!("{url} names no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("the CA is not a PEM certificate")?)
            .context("the CA certificate is not usable")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("no TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host} is not a server name"))?;
    let tls = rustls::ClientConnection::new(Arc::new(config), name)
        .context("cannot set up the TLS client")?;
    let tcp =
        TcpStream::connect(authority).with_context(|| format!("cannot connect to {authority}"))?;
    tcp.set_read_timeout(Some(PROCESS_TIMEOUT))?;
    tcp.set_write_timeout(Some(PROCESS_TIMEOUT))?;
    let mut stream = rustls::StreamOwned::new(tls, tcp);
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    std::io::Write::write_all(&mut stream, request.as_bytes())
        .with_context(|| format!("cannot send the request to {url}"))?;
    let mut raw = Vec::new();
    if let Err(err) = stream.read_to_end(&mut raw) {
        // a server that closes without TLS close_notify still sent a whole answer
        if err.kind() != std::io::ErrorKind::UnexpectedEof || raw.is_empty() {
            return Err(err).with_context(|| format!("cannot read the answer from {url}"));
        }
    }
    parse_http_answer(&raw)
}

/// Parses a complete HTTP/1.1 answer (status line, headers, body to the end of the
/// stream, chunked or not).
pub(crate) fn parse_http_answer(raw: &[u8]) -> Result<HttpAnswer> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let mut decoded = Vec::new();
    if chunked {
        loop {
            let line_end = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("a chunk size line is cut off")?;
            let size_text = String::from_utf8_lossy(&body[..line_end]);
            let size_hex = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            let chunk = body.get(..size).context("a chunk is cut off")?;
            decoded.extend_from_slice(chunk);
            body = body.get(size + 2..).context("a chunk is cut off")?;
        }
    } else {
        decoded.extend_from_slice(body);
    }
    Ok(HttpAnswer {
        status,
        headers,
        body: String::from_utf8_lossy(&decoded).into_owned(),
    })
}
