//! A real `kinvoke-gateway serve` (and `dev`) process in a temporary directory, its options, and the CLI clients that talk to it.

#[allow(unused_imports)]
use super::*;

// gateway

/// How to configure a test gateway. Values are written into its TOML config.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub(crate) limits: BTreeMap<String, String>,
    pub(crate) audit: BTreeMap<String, String>,
    pub(crate) shutdown_grace: String,
    pub(crate) extra_toml: String,
    pub(crate) listener_toml: String,
    pub(crate) listener_address: String,
    pub(crate) admin_assignment: bool,
    pub(crate) files: Vec<(PathBuf, Vec<u8>)>,
    pub(crate) json_logs: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        let mut limits = BTreeMap::new();
        // commands stopped by a test (cancel, timeout, shutdown) should not linger
        limits.insert("kill_grace".to_owned(), toml_value("1s"));
        Self {
            limits,
            audit: BTreeMap::new(),
            shutdown_grace: "2s".to_owned(),
            extra_toml: String::new(),
            listener_toml: String::new(),
            listener_address: "127.0.0.1:0".to_owned(),
            admin_assignment: true,
            json_logs: false,
            files: Vec::new(),
        }
    }
}

/// A TOML value: integers and booleans as they are, anything else as a quoted string.
pub(crate) fn toml_value(value: &str) -> String {
    if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

impl GatewayOptions {
    /// Runs the gateway with `--log-format json` (the audit-event helpers read the human
    /// format, so they see nothing from such a gateway).
    pub fn json_logs(mut self) -> Self {
        self.json_logs = true;
        self
    }

    /// Adds keys to the `main` listener table, e.g. `authorized_ip_ranges = ["127.0.0.2"]`.
    pub fn listener_toml(mut self, toml: &str) -> Self {
        self.listener_toml.push_str(toml);
        self.listener_toml.push('\n');
        self
    }

    /// Binds the `main` listener to `address` instead of `127.0.0.1:0`, e.g. `[::]:0` for
    /// a dual-stack listener. Keep the port 0: the harness reads the real one from the
    /// readiness line.
    pub fn listener_address(mut self, address: &str) -> Self {
        address.clone_into(&mut self.listener_address);
        self
    }

    /// Writes `contents` to `relative_path` in the gateway's directory before the gateway
    /// starts, for files its config names (a JWKS file, say). Relative paths in the
    /// config are taken from that directory too, so the config can name the same path.
    pub fn file(mut self, relative_path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files
            .push((PathBuf::from(relative_path), contents.into()));
        self
    }

    /// Leaves out the default assignment that makes the test user `Cluster Admin` on
    /// every cluster, for tests that write their own policy.
    pub fn without_admin_assignment(mut self) -> Self {
        self.admin_assignment = false;
        self
    }

    /// Sets a `[limits]` key, e.g. `limit("max_output_bytes", "1KiB")`.
    pub fn limit(mut self, key: &str, value: &str) -> Self {
        self.limits.insert(key.to_owned(), toml_value(value));
        self
    }

    /// Sets an `[audit]` key, e.g. `audit("max_file_bytes", "4KiB")` or
    /// `audit("path", "/dev/full")`. Without any, the gateway writes its default audit
    /// file, `state/audit.jsonl` ([`Gateway::audit_path`]).
    pub fn audit(mut self, key: &str, value: &str) -> Self {
        self.audit.insert(key.to_owned(), toml_value(value));
        self
    }

    /// Sets `shutdown_grace` (default `2s`).
    pub fn shutdown_grace(mut self, grace: &str) -> Self {
        self.shutdown_grace = grace.to_owned();
        self
    }

    /// Appends TOML after the `local` cluster, e.g. more `[[cluster]]` tables.
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// Adds a shell-mode cluster `name` whose commands go through the gateway's relay to
    /// a Kubernetes API server: `kubeconfig` (YAML, the gateway's own credentials for
    /// that server) is written to `<name>.kubeconfig` in the gateway's directory and
    /// named by the cluster's `kubeconfig` key; `path` is the commands' `PATH` (see
    /// [`kube_tools_path`] for one that finds the pinned kubectl and helm).
    pub fn kube_cluster(self, name: &str, kubeconfig: &str, path: &str) -> Self {
        let file = format!("{name}.kubeconfig");
        let toml = format!(
            // Debug quoting is a TOML basic string for the plain names and paths tests use
            "[[cluster]]\nname = {name:?}\nmode = \"shell\"\nkubeconfig = {file:?}\npath = {path:?}\n"
        );
        self.file(&file, kubeconfig).extra_toml(&toml)
    }

    /// The gateway config these options stand for. Paths in it are relative to the
    /// config file's directory: `state/` for the state and `pki/` for the certificates a
    /// [`Pki`] writes there (`server.crt`, `server.key`, `ca.crt`). The tables come in
    /// this order: `[limits]`, `[audit]` (when an [`audit`](Self::audit) key is set),
    /// `[[listener]]` `main` on `127.0.0.1:0` (or the
    /// [`listener_address`](Self::listener_address)) with the listener TOML,
    /// `[[cluster]]` `local`, then the extra TOML.
    pub fn render(&self) -> String {
        let mut text = format!(
            "# written by kinvoke-tests\nstate_dir = \"state\"\nshutdown_grace = {}\n\n[limits]\n",
            toml_value(&self.shutdown_grace)
        );
        for (key, value) in &self.limits {
            text.push_str(&format!("{key} = {value}\n"));
        }
        if !self.audit.is_empty() {
            text.push_str("\n[audit]\n");
            for (key, value) in &self.audit {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        text.push_str(&format!(
            "\n[[listener]]\n\
             name = \"main\"\n\
             address = {}\n\
             tls = {{ cert = \"pki/server.crt\", key = \"pki/server.key\", client_ca = \"pki/ca.crt\" }}\n",
            toml_value(&self.listener_address)
        ));
        text.push_str(&self.listener_toml);
        text.push_str(
            "\n[[cluster]]\n\
             name = \"local\"\n\
             executor = \"local\"\n\
             mode = \"shell\"\n\n",
        );
        text.push_str(&self.extra_toml);
        if self.admin_assignment {
            text.push_str(&format!(
                "\n[[assignment]]\nname = \"test-admin\"\nprincipal = \"{USER}\"\nrole = \"Cluster Admin\"\nscope = \"clusters/*\"\n"
            ));
        }
        text
    }
}

/// A real `kinvoke-gateway serve` process with its own temporary directory:
///
/// ```text
/// gateway.toml  client.toml  gateway.stderr.log
/// pki/      CA, server and client certificates
/// state/    the gateway's state_dir (result store, audit.jsonl and its rotated files)
/// work/     TMPDIR of the gateway, so the commands' work directories land here
/// scratch/  free for the test: go-files, pid files, attachments
/// home/     HOME of the clients
/// ```
#[derive(Debug)]
pub struct Gateway {
    dir: TempDir,
    pki: Pki,
    user: ClientCert,
    config: PathBuf,
    client_config: PathBuf,
    addr: SocketAddr,
    /// The admin listener's address, when the config has `[admin]`.
    admin: Option<SocketAddr>,
    proc: Option<Proc>,
    starts: u32,
    json_logs: bool,
}

impl Gateway {
    /// Starts a gateway with the default options.
    pub fn start() -> Result<Self> {
        Self::start_with(GatewayOptions::default())
    }

    /// Starts a gateway with these options and waits until it serves.
    pub fn start_with(options: GatewayOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kinvoke-e2e-")
            .tempdir()
            .context("cannot create the gateway's temporary directory")?;
        for sub in ["state", "work", "scratch", "home"] {
            let path = dir.path().join(sub);
            fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        }
        let pki = Pki::new(&dir.path().join("pki"), "kinvoke test CA")?;
        let user = pki.client_cert(USER)?;
        for (relative, contents) in &options.files {
            if relative.is_absolute() {
                bail!(
                    "GatewayOptions::file wants a path inside the gateway directory, not {}",
                    relative.display()
                );
            }
            let path = dir.path().join(relative);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_file(&path, contents, 0o644)?;
        }
        let config = dir.path().join("gateway.toml");
        // commands may leave marker files for the test in scratch/ (and wait for go-files);
        // the directory exists only in a started gateway's, so render() leaves it out
        let text = format!(
            "{}\n[sandbox]\nwritable_paths = [\"scratch\"]\n",
            options.render()
        );
        write_file(&config, text.as_bytes(), 0o644)?;
        let mut gateway = Self {
            client_config: dir.path().join("client.toml"),
            dir,
            pki,
            user,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            proc: None,
            starts: 0,
            json_logs: options.json_logs,
        };
        gateway.launch()?;
        Ok(gateway)
    }

    fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        let log_path = self.stderr_log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        std::io::Write::write_all(
            &mut log,
            format!("===== kinvoke-e2e: gateway start #{} =====\n", self.starts).as_bytes(),
        )?;
        let mut cmd = Command::new(binary("kinvoke-gateway")?);
        if self.json_logs {
            cmd.args(["--log-format", "json"]);
        }
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env_remove("KINVOKE_GATEWAY_CONFIG")
            .env_remove("KINVOKE_LOG_FORMAT")
            .env("TMPDIR", self.dir.path().join("work"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut proc = Proc::spawn("kinvoke-gateway", &mut cmd)?;
        let lines = read_lines(proc.take_stdout().context("stdout not piped")?);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut before = String::new();
        let ready = next_line_until(&lines, deadline, &mut before, |line| {
            serving_addr(line).is_some()
        });
        let line = ready.map_err(|wait| {
            not_ready(
                wait,
                &mut proc,
                "the gateway",
                &format!("its stderr:\n{}", self.stderr_log()),
            )
        })?;
        self.addr = serving_addr(&line).context("the readiness line went missing")??;
        self.admin = before
            .lines()
            .find_map(|l| l.split_once(ADMIN_SERVING_ON))
            .map(|(_, rest)| {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                addr.parse::<SocketAddr>()
                    .with_context(|| format!("bad admin line: {rest:?}"))
            })
            .transpose()?;
        self.proc = Some(proc);
        self.write_client_config()
    }

    fn write_client_config(&self) -> Result<()> {
        let text = format!(
            "# written by kinvoke-tests for gateway start #{}\n\
             default_profile = \"test\"\n\n\
             [profiles.test]\n\
             endpoint = \"{}\"\n\
             ca_cert = \"pki/ca.crt\"\n\
             client_cert = \"pki/{USER}.crt\"\n\
             client_key = \"pki/{USER}.key\"\n",
            self.starts,
            self.endpoint()
        );
        write_file(&self.client_config, text.as_bytes(), 0o644)
    }

    /// The address the gateway listens on (changes on restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address (`[admin] address` in the config), if it has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// `GET http://ADMIN{path}` on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.admin.context("this gateway has no [admin] listener")?;
        http_get(addr, path)
    }

    /// `https://127.0.0.1:PORT`. A listener bound to an unspecified address (`0.0.0.0`,
    /// `[::]`) is reached on `127.0.0.1`, which the server certificate covers and which a
    /// dual-stack `[::]` socket accepts as an IPv4-mapped peer.
    pub fn endpoint(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::from([127, 0, 0, 1]));
        }
        format!("https://{addr}")
    }

    /// The gateway's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The gateway's config file (`gateway.toml`, rendered from its [`GatewayOptions`]).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// A path in the test's scratch directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join("scratch").join(name)
    }

    /// The gateway's `state_dir` (`state/`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The default audit file, `state/audit.jsonl` (unless the options set
    /// `audit("path", ..)`).
    pub fn audit_path(&self) -> PathBuf {
        self.state_dir().join(AUDIT_FILE)
    }

    /// The default audit file's chain, oldest first: the rotated files
    /// `state/audit.<SEQ>.jsonl` ordered by `SEQ`, then `state/audit.jsonl`. What
    /// `kinvoke-gateway audit verify` wants.
    pub fn audit_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.state_dir();
        let mut rotated = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            if let Some(seq) = path
                .file_name()
                .and_then(OsStr::to_str)
                .and_then(rotated_audit_seq)
            {
                rotated.push((seq, path));
            }
        }
        rotated.sort();
        let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, path)| path).collect();
        files.push(self.audit_path());
        Ok(files)
    }

    /// Where the commands' work directories are created (the gateway's TMPDIR).
    pub fn work_root(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The certificates the gateway trusts and serves.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The default client certificate (common name [`USER`]).
    pub fn user_cert(&self) -> &ClientCert {
        &self.user
    }

    /// A client config file (`default_profile = "test"`) for the current endpoint.
    pub fn client_config(&self) -> &Path {
        &self.client_config
    }

    /// Path of the file collecting the gateway's stderr over all its starts.
    pub fn stderr_log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.stderr.log")
    }

    /// The gateway's stderr so far.
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(self.stderr_log_path())
            .unwrap_or_else(|err| format!("(cannot read the gateway's stderr log: {err})"))
    }

    /// The audit events the gateway has logged so far, oldest first. The gateway logs an
    /// event before it answers (or drops) the call it is about, so once a client has
    /// exited, the events of its calls are in the log.
    pub fn audit_events(&self) -> Vec<AuditRecord> {
        self.stderr_log()
            .lines()
            .filter_map(AuditRecord::parse)
            .collect()
    }

    /// The audit events named `event` logged so far.
    pub fn audit_events_named(&self, event: &str) -> Vec<AuditRecord> {
        self.audit_events()
            .into_iter()
            .filter(|e| e.event() == event)
            .collect()
    }

    /// Stops the gateway with SIGTERM (which flushes the audit file), checks that it
    /// stopped cleanly, and reads the audit file.
    pub fn stop_and_read_audit(&mut self) -> Result<Vec<AuditLine>> {
        let status = self.terminate()?;
        if !status.success() {
            bail!("the gateway stopped with {status}");
        }
        read_audit_file(&self.audit_path())
    }

    /// Waits until the gateway has logged an audit event that satisfies `found`, and
    /// returns it; `what` describes the event in the error. For events the gateway logs
    /// on its own time (a grant's expiry, a failed webhook after its retries) rather
    /// than before answering a call. Fails when the gateway exits first, or after
    /// `timeout` (a guard against hangs, not an expectation).
    pub fn await_audit_event(
        &self,
        what: &str,
        timeout: Duration,
        found: impl Fn(&AuditRecord) -> bool,
    ) -> Result<AuditRecord> {
        self.await_log(what, timeout, || {
            self.audit_events().into_iter().find(|e| found(e))
        })
    }

    /// Waits until the audit *file* holds a complete line that satisfies `found`, and
    /// returns it. The gateway logs an event when it queues it and writes it to the file
    /// in its next batch, so a test that touches the file itself first waits here for
    /// the lines it depends on. Fails as [`Gateway::await_audit_event`] does.
    pub fn await_audit_line(
        &self,
        what: &str,
        timeout: Duration,
        found: impl Fn(&AuditLine) -> bool,
    ) -> Result<AuditLine> {
        let path = self.audit_path();
        self.await_log(what, timeout, || {
            read_audit_file_so_far(&path)
                .ok()?
                .into_iter()
                .find(|l| found(l))
        })
    }

    /// Polls `check` until it finds something, the gateway exits, or `timeout` passes.
    fn await_log<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn() -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check() {
                return Ok(found);
            }
            if !self.is_running() {
                bail!(
                    "the gateway is not running and has not logged {what}; its stderr:\n{}",
                    self.stderr_log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the gateway did not log {what} within {timeout:?}; its stderr:\n{}",
                    self.stderr_log()
                );
            }
            // the logs are plain files that cannot wake us, so they are polled; the
            // pause only paces the polls (the wait ends on the line, not on a time)
            thread::sleep(LOG_POLL_PACING);
        }
    }

    /// A client with no connection settings but an isolated HOME.
    pub fn bare_client(&self) -> Result<Client> {
        Ok(Client::new()?.env("HOME", self.dir.path().join("home")))
    }

    /// A client that reaches this gateway with `--endpoint`, `--ca-cert`, `--client-cert`
    /// and `--client-key` (placed before the subcommand) as [`USER`].
    pub fn client(&self) -> Result<Client> {
        self.client_as(&self.user)
    }

    /// Like [`Gateway::client`], with another client certificate.
    pub fn client_as(&self, cert: &ClientCert) -> Result<Client> {
        self.client_at(&self.endpoint(), Some(cert))
    }

    /// A client with `--endpoint` and `--ca-cert` but no client certificate, for callers
    /// who authenticate with a bearer token (add it with `.env("KINVOKE_TOKEN", ..)`,
    /// `--token-file` or [`Gateway::token_client`]).
    pub fn anonymous_client(&self) -> Result<Client> {
        self.client_at(&self.endpoint(), None)
    }

    /// A client without a certificate that sends `token` through `KINVOKE_TOKEN`.
    pub fn token_client(&self, token: &str) -> Result<Client> {
        Ok(self.anonymous_client()?.env("KINVOKE_TOKEN", token))
    }

    /// A client that trusts this gateway's CA but dials `endpoint` (a relay in front of
    /// the gateway, say), presenting `cert` if given.
    pub fn client_at(&self, endpoint: &str, cert: Option<&ClientCert>) -> Result<Client> {
        let client = self
            .bare_client()?
            .arg("--endpoint")
            .arg(endpoint)
            .arg("--ca-cert")
            .arg(&self.pki.ca_cert);
        Ok(match cert {
            Some(cert) => client
                .arg("--client-cert")
                .arg(&cert.cert)
                .arg("--client-key")
                .arg(&cert.key),
            None => client,
        })
    }

    /// A client that reaches this gateway through `--config client.toml`.
    pub fn client_with_config(&self) -> Result<Client> {
        Ok(self.bare_client()?.arg("--config").arg(&self.client_config))
    }

    /// `kinvoke logs --cluster CLUSTER --command-id ID --follow` as the test user, in the
    /// background.
    pub fn follow(&self, cluster: &str, id: &str) -> Result<Background> {
        self.client()?
            .args(["logs", "--cluster", cluster, "--command-id", id, "--follow"])
            .spawn()
    }

    /// Starts `command` on the `local` cluster with `--no-wait` and returns its id
    /// (the first field of the `-o tsv` line).
    pub fn start_command(&self, command: &str) -> Result<String> {
        let out = self
            .client()?
            .args([
                "-o",
                "tsv",
                "invoke",
                "--cluster",
                CLUSTER,
                "--no-wait",
                "--command",
            ])
            .arg(command)
            .run()?;
        if out.code != Some(0) {
            bail!("invoke --no-wait failed:\n{out}");
        }
        command_id_from_tsv(&out.stdout)
            .with_context(|| format!("no command id in the tsv output:\n{out}"))
    }

    /// A gRPC client for `CommandService`, authenticated as [`USER`].
    pub async fn grpc_client(&self) -> Result<CommandServiceClient<Channel>> {
        self.grpc_client_as(Some(&self.user)).await
    }

    /// A gRPC client for `CommandService` presenting `cert`, or no client certificate.
    pub async fn grpc_client_as(
        &self,
        cert: Option<&ClientCert>,
    ) -> Result<CommandServiceClient<Channel>> {
        Ok(CommandServiceClient::new(self.channel_as(cert).await?))
    }

    /// An mTLS channel to the gateway, authenticated as [`USER`], for any of its gRPC
    /// services (health, reflection, `CommandService`).
    pub async fn channel(&self) -> Result<Channel> {
        self.channel_as(Some(&self.user)).await
    }

    /// An mTLS channel to the gateway presenting `cert`, or no client certificate.
    pub async fn channel_as(&self, cert: Option<&ClientCert>) -> Result<Channel> {
        // several tests may race to install it; whoever wins, ring is the provider
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = fs::read_to_string(&self.pki.ca_cert)?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some(cert) = cert {
            let pem = fs::read_to_string(&cert.cert)?;
            let key = fs::read_to_string(&cert.key)?;
            tls = tls.identity(Identity::from_pem(pem, key));
        }
        Channel::from_shared(self.endpoint())?
            .tls_config(tls)?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.endpoint()))
    }

    /// The gateway's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::id)
    }

    /// Whether the gateway process is running (started and not yet seen to exit).
    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| p.status().is_none())
    }

    /// SIGKILLs the gateway, as a crash would: running commands are orphaned, not stopped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut proc = self.proc.take().context("the gateway is not running")?;
        proc.kill()
    }

    /// SIGTERMs the gateway and waits until it has shut down.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut proc = self.proc.take().context("the gateway is not running")?;
        proc.signal(Signal::SIGTERM)?;
        proc.wait_timeout(PROCESS_TIMEOUT)
            .map_err(|err| anyhow!("{err:#}; gateway stderr:\n{}", self.stderr_log()))
    }

    /// Starts the gateway again on the same config and state (a running one is
    /// terminated first). The port changes; the client config is rewritten.
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.terminate()?;
        }
        self.launch()
    }
}

/// Stops a gateway process a harness is dropped with: gracefully, so it stops the
/// commands it still runs instead of orphaning them; killed if it does not manage. On
/// a failing test, its stderr goes to the test's output.
fn stop_on_drop(proc: Option<Proc>, label: &str, log_path: &Path, log: impl FnOnce() -> String) {
    if let Some(mut proc) = proc {
        let stopped = proc
            .signal(Signal::SIGTERM)
            .and_then(|()| proc.wait_timeout(DROP_TERMINATE_TIMEOUT));
        if stopped.is_err() {
            let _ = proc.kill();
        }
    }
    if thread::panicking() {
        eprintln!(
            "----- {label} stderr ({}) -----\n{}",
            log_path.display(),
            log()
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        stop_on_drop(self.proc.take(), "gateway", &self.stderr_log_path(), || {
            self.stderr_log()
        });
    }
}

// dev gateway

/// Start of the line `kinvoke-gateway dev` prints to show how to reach it; printed after
/// the client config is written for the bound port.
pub(crate) const DEV_TRY_COMMAND: &str = "kinvoke ";

/// A real `kinvoke-gateway dev --state-dir ROOT/dev --listen 127.0.0.1:0` process. The
/// caller owns `ROOT`, so a second start on the same directory finds what the first left:
///
/// ```text
/// dev/              the dev state dir: certificates, gateway.toml, client.toml, results
/// dev.stderr.log    the gateway's stderr over all starts
/// work/             TMPDIR of the gateway, so the commands' work directories land here
/// home/             HOME of the clients
/// ```
///
/// Ready once the try-command line is printed, which comes after `client.toml` is written
/// for the bound port; the earlier "serving on" line alone does not promise that.
#[derive(Debug)]
pub struct DevGateway {
    root: PathBuf,
    proc: Option<Proc>,
    addr: SocketAddr,
    banner: String,
    try_command: String,
}

impl DevGateway {
    /// Starts `kinvoke-gateway dev` in `root` (created if missing) and waits until it
    /// serves and has written its client config.
    pub fn start(root: &Path) -> Result<Self> {
        Self::start_with(root, None)
    }

    /// [`DevGateway::start`] with `--merge-client-config`, the client's config
    /// directory being `config_home` (`XDG_CONFIG_HOME`).
    pub fn start_merging_client_config(root: &Path, config_home: &Path) -> Result<Self> {
        Self::start_with(root, Some(config_home))
    }

    fn start_with(root: &Path, merge_into: Option<&Path>) -> Result<Self> {
        for sub in ["work", "home"] {
            let path = root.join(sub);
            fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        let mut dev = Self {
            root: root.to_owned(),
            proc: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            banner: String::new(),
            try_command: String::new(),
        };
        let log_path = dev.stderr_log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = Command::new(binary("kinvoke-gateway")?);
        isolate_env(&mut cmd);
        cmd.arg("dev")
            .arg("--state-dir")
            .arg(dev.state_dir())
            .args(["--listen", "127.0.0.1:0"]);
        if let Some(config_home) = merge_into {
            cmd.arg("--merge-client-config")
                .env("XDG_CONFIG_HOME", config_home);
        }
        cmd.env("TMPDIR", root.join("work"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut proc = Proc::spawn("kinvoke-gateway dev", &mut cmd)?;
        let lines = read_lines(proc.take_stdout().context("stdout not piped")?);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut banner = String::new();
        let serving = next_line_until(&lines, deadline, &mut banner, |line| {
            serving_addr(line).is_some()
        })
        .and_then(|serving| {
            let try_command = next_line_until(&lines, deadline, &mut banner, |line| {
                let line = line.trim_start();
                line.starts_with(DEV_TRY_COMMAND) && line.contains("invoke --cluster")
            })?;
            Ok((serving, try_command))
        });
        let (serving, try_command) = serving.map_err(|wait| {
            not_ready(
                wait,
                &mut proc,
                "the dev gateway",
                &format!("stdout:\n{banner}\nstderr:\n{}", dev.stderr_log()),
            )
        })?;
        dev.addr = serving_addr(&serving).context("the readiness line went missing")??;
        dev.banner = banner;
        dev.try_command = try_command.trim().to_owned();
        dev.proc = Some(proc);
        Ok(dev)
    }

    /// The address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The state directory passed as `--state-dir` (`ROOT/dev`).
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("dev")
    }

    /// The client config the gateway writes into its state directory.
    pub fn client_config(&self) -> PathBuf {
        self.state_dir().join("client.toml")
    }

    /// Everything printed on stdout up to and including the try-command line.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// The first command the gateway suggests to try, trimmed.
    pub fn try_command(&self) -> &str {
        &self.try_command
    }

    /// A client reaching this gateway with `--config ROOT/dev/client.toml`, isolated HOME.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::new()?
            .env("HOME", self.root.join("home"))
            .arg("--config")
            .arg(self.client_config()))
    }

    /// Path of the file collecting the gateway's stderr over all starts in this root.
    pub fn stderr_log_path(&self) -> PathBuf {
        self.root.join("dev.stderr.log")
    }

    /// The gateway's stderr so far.
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(self.stderr_log_path())
            .unwrap_or_else(|err| format!("(cannot read the gateway's stderr log: {err})"))
    }

    /// SIGTERMs the gateway and waits until it has shut down.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut proc = self.proc.take().context("the dev gateway is not running")?;
        proc.signal(Signal::SIGTERM)?;
        proc.wait_timeout(PROCESS_TIMEOUT)
            .map_err(|err| anyhow!("{err:#}; dev gateway stderr:\n{}", self.stderr_log()))
    }
}

impl Drop for DevGateway {
    fn drop(&mut self) {
        stop_on_drop(
            self.proc.take(),
            "dev gateway",
            &self.stderr_log_path(),
            || self.stderr_log(),
        );
    }
}

/// `GET path` over plain HTTP/1.1 to `addr` (the admin listener): the status code and the
/// body. Blocking, bounded by [`PROCESS_TIMEOUT`].
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(PROCESS_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
