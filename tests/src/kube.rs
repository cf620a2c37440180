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

/// A one-shot HTTPS GET of `url` (`https://HOST:PORT/PATH`) trusting `ca_pem`, with
/// `headers` added: enough to knock on the relay from outside the gateway. reqwest on a
/// runtime of its own, over the gateway's own outgoing-HTTPS client settings; bounded by
/// [`PROCESS_TIMEOUT`] as a guard.
pub fn https_get(url: &str, ca_pem: &str, headers: &[(&str, &str)]) -> Result<HttpAnswer> {
    let dir = tempfile::tempdir().context("cannot create a directory for the CA")?;
    let ca = dir.path().join("ca.crt");
    fs::write(&ca, ca_pem).context("cannot write the CA")?;
    let client = kinvoke_gateway::outbound_https::client(Some(&ca), PROCESS_TIMEOUT, true)
        .map_err(|e| anyhow!("cannot build the HTTPS client: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for the request")?;
    runtime.block_on(async {
        let mut request = client.get(url).header("accept", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("GET {url} failed"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .text()
            .await
            .with_context(|| format!("cannot read the answer from {url}"))?;
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    })
}
