//! Support for kinvoke's end-to-end tests: real binaries, real TLS, real processes.
//!
//! Layout: [`binary`] finds the built `kinvoke-gateway` and `kinvoke` executables;
//! [`Pki`] writes a throw-away CA with a server certificate and client certificates;
//! [`Gateway`] runs the real gateway binary on `127.0.0.1:0` in its own temporary
//! directory and waits for its readiness line; [`Client`] runs the real `kinvoke` CLI to
//! completion ([`Client::run`]) or in the background ([`Client::spawn`]); [`gateway_cli`]
//! runs a short-lived gateway subcommand such as `check-config`; [`DevGateway`] runs
//! `kinvoke-gateway dev` and waits until its client config is written; [`Proc`] is the
//! child-process wrapper under all of them. Every wait ends on an event (a line, an exit,
//! a closed pipe) and is bounded only as a guard against hangs; nothing here sleeps.
//!
//! For the access-control tests: [`AuditRecord`] parses the gateway's `kinvoke::audit`
//! log events; [`TcpRelay`] stands in for a load balancer that sends a PROXY protocol
//! header ([`proxy_v1_header`]); [`TestIssuer`] signs OIDC tokens and publishes their
//! JWKS; [`gateway_cli_with_input`] feeds a subcommand's stdin (`hash-token`).
//!
//! For the audit-file tests: [`GatewayOptions::audit`] sets `[audit]` keys;
//! [`Gateway::audit_files`] lists the chain's files oldest first; [`read_audit_file`]
//! reads one into [`AuditLine`]s (their exact text, for hashing, and their JSON);
//! [`audit_verify`] runs `kinvoke-gateway audit verify` and [`VerifiedChain`] parses its
//! success line.
//!
//! For the break-glass tests: [`WebhookReceiver`] is a tiny HTTP server that hears the
//! gateway's announcements ([`WebhookRequest`]); [`closed_loopback_port`] makes a webhook
//! URL that refuses connections; [`Gateway::await_audit_event`] waits for events the
//! gateway logs on its own time (a grant's expiry, a failed notification).
//!
//! For the relay tests: [`kube_tools`] finds the pinned kubectl and helm (or says why the
//! test is skipped) and [`kube_tools_path`] makes a command `PATH` for them;
//! [`GatewayOptions::kube_cluster`] adds a cluster whose commands reach an API server
//! through the relay; [`RelayKubeconfig`] reads the kubeconfig a command printed and
//! [`https_get`] knocks on the relay with its token from outside the gateway;
//! [`Background::wait_for_line_where`] waits for a line the test knows only in part.
//!
//! Dropping a [`Gateway`] stops its process and deletes its directory; dropping a
//! [`DevGateway`], [`Proc`] or [`Background`] stops (or kills) and reaps the process.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use kinvoke_gateway::pki::CertificateAuthority;
use kinvoke_proto::v1::command_service_client::CommandServiceClient;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Cluster name of the `local` shell-mode cluster every test gateway has.
pub const CLUSTER: &str = "local";

/// Common name (and so principal id) of the default client certificate.
pub const USER: &str = "test-user";

/// Guard against a gateway that never becomes ready (it may be waiting on a slow disk).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Guard against a client or gateway process that never ends.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a gateway stopped by [`Drop`] may take to shut down before it is killed.
const DROP_TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two reads of the gateway's stderr log in [`Gateway::await_audit_event`]:
/// short, so the wait ends soon after the event, and not zero, so it does not spin.
const LOG_POLL_PACING: Duration = Duration::from_millis(50);

/// Readiness line prefix the gateway prints on stdout for each listener.
const SERVING_ON: &str = "serving on https://";

// ---------------------------------------------------------------------------------------
// binaries

/// Path of a workspace binary (`kinvoke-gateway`, `kinvoke`) built next to this test.
///
/// Test executables live in `target/<profile>/deps`; the binaries one level up.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    let deps = exe
        .parent()
        .with_context(|| format!("test executable {} has no directory", exe.display()))?;
    let profile_dir = if deps.ends_with("deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!(
            "binary `{name}` not found at {}: run `cargo build --workspace` or `cargo test --workspace` \
             (`cargo test -p kinvoke-tests` alone does not build it)",
            path.display()
        );
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------
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

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
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

// ---------------------------------------------------------------------------------------
// processes

/// A child process that can be waited for with a bound, signalled, and is killed and
/// reaped on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    exited: Receiver<()>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `command`; `name` labels it in error messages.
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        let (tx, exited) = mpsc::channel();
        thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || {
                // WNOWAIT leaves the exited child a zombie: its pid stays ours until
                // `Child::wait` reaps it, so `signal` can never hit a recycled pid
                let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
                while let Err(Errno::EINTR) = waitid(Id::Pid(pid), flags) {}
                let _ = tx.send(());
            })
            .context("cannot start a waiter thread")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            exited,
            status: None,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Takes the child's piped stdout, if any.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the child's piped stderr, if any.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The exit status if the process has already been reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Waits for the process to exit, at most `timeout` (a guard, not an expectation).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match self.exited.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "{} (pid {}) still runs after {timeout:?}",
                    self.name,
                    self.id()
                )
            }
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("cannot reap {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Sends `signal` unless the process has already exited.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        if let Some(status) = self.child.try_wait()? {
            self.status = Some(status);
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.id()).context("pid out of range")?);
        match kill(pid, signal) {
            // exited (a zombie) between try_wait and kill
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(err) => Err(err).with_context(|| format!("cannot signal {}", self.name)),
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_timeout(PROCESS_TIMEOUT)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a finished client run printed and how it exited.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// Parses stdout as one JSON document.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not one JSON document:\n{self}"))
    }

    /// The stdout lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => writeln!(f, "exit code {code}")?,
            None => writeln!(f, "killed by a signal")?,
        }
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Sends each line of `pipe` (with its `\n`, if any) until end of file.
fn read_lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // a gone receiver only means nobody listens any more: keep draining so
                    // the writer never blocks on a full pipe
                    let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                }
            }
        }
    });
    rx
}

/// Runs `command` (stdin closed, stdout and stderr piped) to completion and captures its
/// exit code and output; one still running after `timeout` is killed and reported as an
/// error labelled `label`.
fn run_to_end(name: &str, command: &mut Command, timeout: Duration, label: &str) -> Result<Output> {
    run_to_end_with_input(name, command, None, timeout, label)
}

/// Like [`run_to_end`], with `input` written to the process's stdin (then closed) when
/// given.
fn run_to_end_with_input(
    name: &str,
    command: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
    label: &str,
) -> Result<Output> {
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = Proc::spawn(name, command)?;
    if let (Some(input), Some(mut stdin)) = (input, proc.child.stdin.take()) {
        let input = input.to_vec();
        // a writer thread, so a child that does not read cannot block the test; a child
        // that exits early only makes the write fail, which its output will explain
        thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut stdin, &input);
        });
    }
    let stdout = read_all(proc.take_stdout().context("stdout not piped")?);
    let stderr = read_all(proc.take_stderr().context("stderr not piped")?);
    let waited = proc.wait_timeout(timeout);
    if waited.is_err() {
        let _ = proc.kill();
    }
    let output = Output {
        code: proc.status().and_then(|s| s.code()),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    match waited {
        Ok(_) => Ok(output),
        Err(err) => Err(err.context(format!("`{label}` was killed:\n{output}"))),
    }
}

/// Removes the `KINVOKE_*` variables (and `XDG_CONFIG_HOME`) of the caller from
/// `command`, so the developer's own settings cannot leak into a test.
fn isolate_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KINVOKE_") {
            command.env_remove(key);
        }
    }
    command.env_remove("XDG_CONFIG_HOME");
}

/// Runs `kinvoke-gateway ARGS` to completion, e.g. `check-config --config FILE`, with the
/// caller's `KINVOKE_*` variables removed. For subcommands that end on their own; a
/// gateway that serves is a [`Gateway`] or a [`DevGateway`].
pub fn gateway_cli<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(binary("kinvoke-gateway")?);
    isolate_env(&mut cmd);
    cmd.args(&args);
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    let label = format!("kinvoke-gateway {}", shown.join(" "));
    run_to_end("kinvoke-gateway", &mut cmd, PROCESS_TIMEOUT, &label)
}

/// Writes `text` as a gateway config named `name` in `dir` and runs `check-config` on it.
pub fn check_config(dir: &Path, name: &str, text: &str) -> Result<Output> {
    let path = dir.join(name);
    write_file(&path, text.as_bytes(), 0o644)?;
    gateway_cli([
        OsStr::new("check-config"),
        OsStr::new("--config"),
        path.as_os_str(),
    ])
}

/// Like [`gateway_cli`], with `input` on the subcommand's stdin, e.g.
/// `gateway_cli_with_input(["hash-token"], "s3cret\n")`.
pub fn gateway_cli_with_input<I, S>(args: I, input: &str) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(binary("kinvoke-gateway")?);
    isolate_env(&mut cmd);
    cmd.args(&args);
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    let label = format!("kinvoke-gateway {} < (input)", shown.join(" "));
    run_to_end_with_input(
        "kinvoke-gateway",
        &mut cmd,
        Some(input.as_bytes()),
        PROCESS_TIMEOUT,
        &label,
    )
}

/// Why [`next_line_until`] stopped without finding its line.
#[derive(Debug)]
enum LineWait {
    /// The writer closed its end (usually: the process exited).
    Closed,
    /// The guard expired.
    TimedOut,
}

/// Receives lines until one (without its newline) satisfies `found`, and returns it.
/// Every line received, the found one included, is appended to `seen`.
/// Why a process did not print its readiness line: it exited (reaped here) or the guard
/// expired (killed here), with what it printed for the failure message.
fn not_ready(wait: LineWait, proc: &mut Proc, what: &str, printed: &str) -> anyhow::Error {
    match wait {
        LineWait::Closed => match proc.wait_timeout(PROCESS_TIMEOUT) {
            Ok(status) => anyhow!("{what} exited ({status}) before it was ready; {printed}"),
            Err(err) => err.context(format!(
                "{what} closed its output before it was ready; {printed}"
            )),
        },
        LineWait::TimedOut => {
            let _ = proc.kill();
            anyhow!("{what} was not ready within {READY_TIMEOUT:?}; {printed}")
        }
    }
}

fn next_line_until(
    lines: &Receiver<String>,
    deadline: Instant,
    seen: &mut String,
    mut found: impl FnMut(&str) -> bool,
) -> Result<String, LineWait> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                let line = line.strip_suffix('\n').unwrap_or(&line);
                if found(line) {
                    return Ok(line.to_owned());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Err(LineWait::Closed),
            Err(RecvTimeoutError::Timeout) => return Err(LineWait::TimedOut),
        }
    }
}

/// The address of a readiness line `... serving on https://ADDR`, if `line` is one.
fn serving_addr(line: &str) -> Option<Result<SocketAddr>> {
    let (_, addr) = line.trim_end().split_once(SERVING_ON)?;
    Some(
        addr.parse::<SocketAddr>()
            .with_context(|| format!("bad readiness line {line:?}")),
    )
}

/// A `kinvoke` invocation being built: program, arguments, environment, directory.
#[derive(Debug, Clone)]
pub struct Client {
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    timeout: Duration,
}

impl Client {
    /// A bare `kinvoke` with no connection flags. The caller's `KINVOKE_*` variables are
    /// not passed on, so the developer's own settings cannot leak into a test.
    pub fn new() -> Result<Self> {
        Ok(Self {
            program: binary("kinvoke")?,
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            timeout: PROCESS_TIMEOUT,
        })
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the client.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the client in this directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.current_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Changes the guard on how long [`Client::run`] waits (default [`PROCESS_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        isolate_env(&mut cmd);
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    fn label(&self) -> String {
        let args: Vec<_> = self.args.iter().map(|a| a.to_string_lossy()).collect();
        format!("kinvoke {}", args.join(" "))
    }

    /// Runs the client to completion and captures its exit code and output. A client
    /// still running after the timeout is killed and reported as an error.
    pub fn run(self) -> Result<Output> {
        run_to_end("kinvoke", &mut self.command(), self.timeout, &self.label())
    }

    /// Starts the client in the background; its stdout can be read line by line.
    pub fn spawn(self) -> Result<Background> {
        let mut proc = Proc::spawn("kinvoke", &mut self.command())?;
        let lines = read_lines(proc.take_stdout().context("stdout not piped")?);
        let stderr = read_all(proc.take_stderr().context("stderr not piped")?);
        Ok(Background {
            label: self.label(),
            proc,
            lines,
            stdout: String::new(),
            stderr: Some(stderr),
        })
    }
}

/// A client running in the background. Dropping it kills it.
#[derive(Debug)]
pub struct Background {
    label: String,
    proc: Proc,
    lines: Receiver<String>,
    stdout: String,
    stderr: Option<JoinHandle<String>>,
}

impl Background {
    /// The client's process id.
    pub fn id(&self) -> u32 {
        self.proc.id()
    }

    /// Stdout read so far.
    pub fn stdout_so_far(&self) -> &str {
        &self.stdout
    }

    /// Reads stdout until a line equal to `line` (without its newline) has arrived.
    /// Fails if stdout closes first, or after [`PROCESS_TIMEOUT`] as a guard.
    pub fn wait_for_line(&mut self, line: &str) -> Result<()> {
        self.wait_for_line_where(&format!("{line:?}"), |got| got == line)
            .map(drop)
    }

    /// Reads stdout until a line (without its newline) satisfies `found`, and returns
    /// it; `what` describes the line in the error, e.g. `"a row for pod web-1"`. For
    /// lines whose exact text the test cannot know (a table row with an age column).
    /// Fails if stdout closes first, or after [`PROCESS_TIMEOUT`] as a guard.
    pub fn wait_for_line_where(
        &mut self,
        what: &str,
        found: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        match next_line_until(&self.lines, deadline, &mut self.stdout, found) {
            Ok(line) => Ok(line),
            Err(LineWait::Closed) => bail!(
                "`{}` closed stdout before printing {what}; stdout so far:\n{}",
                self.label,
                self.stdout
            ),
            Err(LineWait::TimedOut) => bail!(
                "`{}` did not print {what} within {PROCESS_TIMEOUT:?}; stdout so far:\n{}",
                self.label,
                self.stdout
            ),
        }
    }

    /// SIGKILLs the client and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.proc.kill()
    }

    /// Waits for the client to exit (at most [`PROCESS_TIMEOUT`]) and returns all it printed.
    pub fn wait(mut self) -> Result<Output> {
        let waited = self.proc.wait_timeout(PROCESS_TIMEOUT);
        if waited.is_err() {
            let _ = self.proc.kill();
        }
        // the pipe closes when the client exits, which ends the reader thread
        while let Ok(line) = self.lines.recv() {
            self.stdout.push_str(&line);
        }
        let output = Output {
            code: self.proc.status().and_then(|s| s.code()),
            stdout: std::mem::take(&mut self.stdout),
            stderr: self
                .stderr
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default(),
        };
        match waited {
            Ok(_) => Ok(output),
            Err(err) => Err(err.context(format!("`{}` was killed:\n{output}", self.label))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// gateway

/// How to configure a test gateway. Values are written into its TOML config.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    limits: BTreeMap<String, String>,
    audit: BTreeMap<String, String>,
    shutdown_grace: String,
    extra_toml: String,
    listener_toml: String,
    listener_address: String,
    admin_assignment: bool,
    files: Vec<(PathBuf, Vec<u8>)>,
    json_logs: bool,
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
fn toml_value(value: &str) -> String {
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
        // commands may leave marker files for the test in scratch/ (and wait for go-files)
        text.push_str("\n[sandbox]\nwritable_paths = [\"scratch\"]\n");
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
        write_file(&config, options.render().as_bytes(), 0o644)?;
        let mut gateway = Self {
            client_config: dir.path().join("client.toml"),
            dir,
            pki,
            user,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
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
        let ready = next_line_until(&lines, deadline, &mut String::new(), |line| {
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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.audit_events().into_iter().find(|e| found(e)) {
                return Ok(event);
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
            // the log is a plain file that cannot wake us, so it is polled; the pause
            // only paces the polls (the wait ends on the event, not on a time)
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

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            // graceful, so the gateway stops the commands it still runs instead of
            // orphaning them; killed if it does not manage
            let stopped = proc
                .signal(Signal::SIGTERM)
                .and_then(|()| proc.wait_timeout(DROP_TERMINATE_TIMEOUT));
            if stopped.is_err() {
                let _ = proc.kill();
            }
        }
        if thread::panicking() {
            eprintln!(
                "----- gateway stderr ({}) -----\n{}",
                self.stderr_log_path().display(),
                self.stderr_log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// dev gateway

/// Start of the line `kinvoke-gateway dev` prints to show how to reach it; printed after
/// the client config is written for the bound port.
const DEV_TRY_COMMAND: &str = "kinvoke --config ";

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
            .args(["--listen", "127.0.0.1:0"])
            .env("TMPDIR", root.join("work"))
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
                line.trim_start().starts_with(DEV_TRY_COMMAND)
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
        if let Some(mut proc) = self.proc.take() {
            let stopped = proc
                .signal(Signal::SIGTERM)
                .and_then(|()| proc.wait_timeout(DROP_TERMINATE_TIMEOUT));
            if stopped.is_err() {
                let _ = proc.kill();
            }
        }
        if thread::panicking() {
            eprintln!(
                "----- dev gateway stderr ({}) -----\n{}",
                self.stderr_log_path().display(),
                self.stderr_log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// output parsing

/// The first line `kinvoke` prints for a command that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `YYYY-MM-DD HH:MM:SS+00:00`.
    pub started_at: String,
    /// `YYYY-MM-DD HH:MM:SS+00:00`.
    pub finished_at: String,
    /// The remote exit code.
    pub exit_code: i32,
}

/// Parses `command started at T1, finished at T2 with exitcode=N`; `None` if the line
/// has another shape or a time is not `YYYY-MM-DD HH:MM:SS+00:00`.
pub fn parse_header(line: &str) -> Option<Header> {
    let rest = line.strip_prefix("command started at ")?;
    let (started_at, rest) = rest.split_once(", finished at ")?;
    let (finished_at, code) = rest.split_once(" with exitcode=")?;
    if !is_utc_time(started_at) || !is_utc_time(finished_at) {
        return None;
    }
    Some(Header {
        started_at: started_at.to_owned(),
        finished_at: finished_at.to_owned(),
        exit_code: code.parse().ok()?,
    })
}

/// Whether `s` is `YYYY-MM-DD HH:MM:SS+00:00`.
pub fn is_utc_time(s: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-dd dd:dd:dd+00:00";
    s.len() == SHAPE.len()
        && s.bytes().zip(SHAPE).all(|(c, &want)| match want {
            b'd' => c.is_ascii_digit(),
            other => c == other,
        })
}

/// The command id: first field of the only non-empty line of `-o tsv` output.
pub fn command_id_from_tsv(stdout: &str) -> Option<String> {
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let id = line.split('\t').next()?.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

// ---------------------------------------------------------------------------------------
// audit log

/// Target of the gateway's audit events.
const AUDIT_TARGET: &str = " kinvoke::audit: ";

/// One `kinvoke::audit` event from the gateway's human-format stderr log: the event's
/// JSON object (the same fields as its line in the audit file, without the chain fields),
/// e.g.
///
/// ```text
/// 2026-01-02T03:04:05.123456Z  INFO kinvoke::audit: {"event":"connection_refused","listener":"main","peer":"127.0.0.3:40000","reason":"..."} event="connection_refused"
/// ```
///
/// String values come out as plain text, others as their JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// `INFO`, `WARN`, ...
    pub level: String,
    /// The fields.
    pub fields: BTreeMap<String, String>,
    /// The whole line, for failure messages.
    pub line: String,
}

impl AuditRecord {
    /// Parses one log line; `None` unless it is an audit event.
    pub fn parse(line: &str) -> Option<Self> {
        let (head, rest) = line.split_once(AUDIT_TARGET)?;
        let level = head.split_whitespace().last()?.to_owned();
        let json = &rest[rest.find('{')?..];
        // the object is followed by tracing's own fields: read just the first value
        let value: serde_json::Value = serde_json::Deserializer::from_str(json)
            .into_iter::<serde_json::Value>()
            .next()?
            .ok()?;
        let fields = value
            .as_object()?
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        Some(Self {
            level,
            fields,
            line: line.to_owned(),
        })
    }

    /// A field's value, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The `event` field: `connection_refused`, `authentication_failed`, `authorization`.
    pub fn event(&self) -> &str {
        self.get("event").unwrap_or_default()
    }
}

impl fmt::Display for AuditRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// Name of the current audit file in the state directory.
const AUDIT_FILE: &str = "audit.jsonl";

/// `SEQ` of a rotated audit file's name `audit.<SEQ>.jsonl`.
fn rotated_audit_seq(name: &str) -> Option<u64> {
    name.strip_prefix("audit.")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// One line of an audit file: its exact text (what the next line's `prev` hashes, with
/// [`kinvoke_gateway::audit::chain::line_hash`]) and its JSON object, e.g.
///
/// ```text
/// {"seq":3,"time":"2026-01-02T03:04:05.123456Z","prev":"9f2c…","event":"command_started","command_id":"…","cluster":"local"}
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    /// 1-based line number in its file.
    pub number: usize,
    /// The line without its newline.
    pub text: String,
    /// The parsed object.
    pub value: serde_json::Value,
}

impl AuditLine {
    /// The `seq` field (0 if missing, which no gateway writes).
    pub fn seq(&self) -> u64 {
        self.value["seq"].as_u64().unwrap_or_default()
    }

    /// The `event` field.
    pub fn event(&self) -> &str {
        self.str_field("event").unwrap_or_default()
    }

    /// A string field, if present and a string.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.value.get(key).and_then(serde_json::Value::as_str)
    }

    /// The names of the object's keys in the order written.
    pub fn keys(&self) -> Vec<&str> {
        self.value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

impl fmt::Display for AuditLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.number, self.text)
    }
}

/// Reads a finished audit file (the gateway stopped): every line must be a complete JSON
/// object ending in a newline.
pub fn read_audit_file(path: &Path) -> Result<Vec<AuditLine>> {
    let (lines, tail) = read_audit_lines(path)?;
    if !tail.is_empty() {
        bail!(
            "{} ends inside line {}: {tail:?}",
            path.display(),
            lines.len() + 1
        );
    }
    Ok(lines)
}

/// Reads the complete lines of an audit file a running gateway may be appending to;
/// an incomplete last line (a write in progress) is left out.
pub fn read_audit_file_so_far(path: &Path) -> Result<Vec<AuditLine>> {
    Ok(read_audit_lines(path)?.0)
}

/// The complete lines of an audit file, and the text after the last newline.
fn read_audit_lines(path: &Path) -> Result<(Vec<AuditLine>, String)> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (complete, tail) = match text.rfind('\n') {
        Some(end) => text.split_at(end + 1),
        None => ("", text.as_str()),
    };
    // split on '\n' alone, not `lines()`: a '\r' would be part of the hashed text
    let lines = complete
        .split_terminator('\n')
        .enumerate()
        .map(|(index, line)| {
            let value = serde_json::from_str(line).with_context(|| {
                format!("{} line {} is not JSON: {line}", path.display(), index + 1)
            })?;
            Ok(AuditLine {
                number: index + 1,
                text: line.to_owned(),
                value,
            })
        })
        .collect::<Result<_>>()?;
    Ok((lines, tail.to_owned()))
}

/// What `kinvoke-gateway audit verify` reports for an intact chain:
/// `ok: N events, head seq S sha256 H`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    /// Lines checked, over all files.
    pub events: usize,
    /// `seq` of the last line.
    pub head_seq: u64,
    /// SHA-256 (hex) of the last line.
    pub head_sha256: String,
}

impl VerifiedChain {
    /// Parses the `ok: ...` line; `None` for any other output.
    pub fn parse(stdout: &str) -> Option<Self> {
        let rest = stdout.trim_end().strip_prefix("ok: ")?;
        let (events, rest) = rest.split_once(" events, head seq ")?;
        let (seq, hash) = rest.split_once(" sha256 ")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            events: events.parse().ok()?,
            head_seq: seq.parse().ok()?,
            head_sha256: hash.to_owned(),
        })
    }
}

/// Runs `kinvoke-gateway audit verify FILE...` (files oldest first).
pub fn audit_verify<P: AsRef<Path>>(files: &[P]) -> Result<Output> {
    let mut args = vec![OsString::from("audit"), OsString::from("verify")];
    args.extend(files.iter().map(|f| f.as_ref().as_os_str().to_owned()));
    gateway_cli(args)
}

// ---------------------------------------------------------------------------------------
// TCP relay (a load balancer in front of the gateway)

/// A PROXY protocol v1 header for a TCP connection from `source` to `destination`;
/// both must be of the same IP family.
pub fn proxy_v1_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A TCP relay on `127.0.0.1:0`, standing in for a load balancer: for every accepted
/// connection it connects to the upstream, writes a fixed preamble (a PROXY protocol
/// header, say) and then copies bytes both ways until each side has closed.
///
/// Dropping it stops accepting, shuts down every relayed connection and joins its
/// threads.
#[derive(Debug)]
pub struct TcpRelay {
    server: LoopbackServer,
}

impl TcpRelay {
    /// Starts relaying to `upstream`, writing `preamble` first on every upstream
    /// connection.
    pub fn start(upstream: SocketAddr, preamble: Vec<u8>) -> Result<Self> {
        let server = LoopbackServer::start("relay", move |client, sockets, threads| {
            relay_one(client, upstream, &preamble, sockets, threads)
        })?;
        Ok(Self { server })
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `https://127.0.0.1:PORT` of the relay (the gateway's certificate covers 127.0.0.1).
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.server.addr)
    }
}

/// Connects `client` to `upstream` through two copying threads.
fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    preamble: &[u8],
    sockets: &Mutex<Vec<TcpStream>>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) -> Result<()> {
    let mut server = TcpStream::connect(upstream)
        .with_context(|| format!("cannot connect to the upstream {upstream}"))?;
    std::io::Write::write_all(&mut server, preamble).context("cannot send the preamble")?;
    let pump = |from: TcpStream, to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut &from, &mut &to);
            // pass the end of stream on, so the other side sees it too
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let up = thread::Builder::new()
        .name("relay-up".to_owned())
        .spawn(pump(client.try_clone()?, server.try_clone()?))?;
    let down = thread::Builder::new()
        .name("relay-down".to_owned())
        .spawn(pump(server.try_clone()?, client.try_clone()?))?;
    if let Ok(mut list) = threads.lock() {
        list.extend([up, down]);
    }
    if let Ok(mut list) = sockets.lock() {
        list.extend([client, server]);
    }
    Ok(())
}

/// A thread-per-connection TCP server on 127.0.0.1:0 for test doubles (the PROXY relay,
/// the webhook receiver). Dropping it stops accepting, shuts every connection down and
/// joins every thread.
#[derive(Debug)]
struct LoopbackServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

/// What a [`LoopbackServer`] does with each connection: it may register sockets to shut
/// down and threads to join at drop.
type OnConnection = dyn Fn(TcpStream, &Mutex<Vec<TcpStream>>, &Mutex<Vec<JoinHandle<()>>>) -> Result<()>
    + Send
    + 'static;

impl LoopbackServer {
    fn start(
        name: &str,
        on_connection: impl Fn(
            TcpStream,
            &Mutex<Vec<TcpStream>>,
            &Mutex<Vec<JoinHandle<()>>>,
        ) -> Result<()>
        + Send
        + 'static,
    ) -> Result<Self> {
        let on_connection: Box<OnConnection> = Box::new(on_connection);
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .with_context(|| format!("cannot bind the {name}"))?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("cannot read the {name}'s address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let label = name.to_owned();
        let accept = {
            let (stop, sockets, threads) = (stop.clone(), sockets.clone(), threads.clone());
            thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        // a failed accept or connection drops that client only
                        let Ok(stream) = stream else { continue };
                        if let Err(err) = on_connection(stream, &sockets, &threads) {
                            eprintln!("kinvoke-tests {label}: {err:#}");
                        }
                    }
                })
                .with_context(|| format!("cannot start the {name}'s accept thread"))?
        };
        Ok(Self {
            addr,
            stop,
            sockets,
            threads,
            accept: Some(accept),
        })
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the blocked accept so it sees the flag
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        if let Ok(sockets) = self.sockets.lock() {
            for socket in sockets.iter() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        let threads = self
            .threads
            .lock()
            .map(|mut list| std::mem::take(&mut *list))
            .unwrap_or_default();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// webhook receiver (where the gateway announces break-glass activity)

/// Longest request head (request line and headers) the [`WebhookReceiver`] reads.
const MAX_WEBHOOK_HEAD: usize = 64 * 1024;

/// Largest request body the [`WebhookReceiver`] reads.
const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// One HTTP request a [`WebhookReceiver`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target, e.g. `/hook`.
    pub path: String,
    /// Header names (lowercased) and values, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The body (lossy UTF-8).
    pub body: String,
}

impl WebhookRequest {
    /// The first value of a header (the name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Parses the body as one JSON document.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the webhook body is not JSON: {:?}", self.body))
    }
}

/// Reads one request from `reader`: `None` at a clean end of stream (the client closed an
/// idle keep-alive connection). Bodies must come with `content-length`; chunked bodies
/// are refused, which is enough for a gateway that posts one JSON document.
fn read_webhook_request(reader: &mut impl BufRead) -> Result<Option<WebhookRequest>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .context("cannot read the request head")?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            bail!("the connection closed inside a request head");
        }
        if line == b"\r\n" || line == b"\n" {
            if head.is_empty() {
                // stray empty lines before a request line are allowed (RFC 9112 2.2)
                continue;
            }
            break;
        }
        head.push(String::from_utf8_lossy(&line).trim_end().to_owned());
        if head.iter().map(String::len).sum::<usize>() > MAX_WEBHOOK_HEAD {
            bail!("the request head is longer than {MAX_WEBHOOK_HEAD} bytes");
        }
    }
    let mut request_line = head[0].split_whitespace();
    let (Some(method), Some(path)) = (request_line.next(), request_line.next()) else {
        bail!("bad request line {:?}", head[0]);
    };
    let headers: Vec<(String, String)> = head[1..]
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("bad header line {h:?}"))?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect::<Result<_>>()?;
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && !v.eq_ignore_ascii_case("identity"))
    {
        bail!("chunked request bodies are not supported by this test receiver");
    }
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .with_context(|| format!("bad content-length {v:?}"))?,
        None => 0,
    };
    if length > MAX_WEBHOOK_BODY {
        bail!("the body ({length} bytes) is larger than {MAX_WEBHOOK_BODY} bytes");
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .context("cannot read the request body")?;
    Ok(Some(WebhookRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

/// Answers every request on `stream` with `200 OK` and sends it to `requests`, until the
/// client closes the connection.
fn serve_webhook_connection(stream: TcpStream, requests: &mpsc::Sender<WebhookRequest>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        match read_webhook_request(&mut reader) {
            Ok(Some(request)) => {
                let answered = std::io::Write::write_all(
                    &mut writer,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                );
                // a gone receiver only means the test stopped listening
                let _ = requests.send(request);
                if answered.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                eprintln!("kinvoke-tests webhook receiver: {err:#}");
                let _ = std::io::Write::write_all(
                    &mut writer,
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                return;
            }
        }
    }
}

/// A tiny HTTP/1.1 server on `127.0.0.1:0` standing in for a chat or paging webhook: it
/// answers every request with `200 OK` and hands it to the test
/// ([`next_request`](Self::next_request)). Keep-alive connections are served request
/// after request.
///
/// Dropping it stops accepting, shuts down its connections and joins its threads.
#[derive(Debug)]
pub struct WebhookReceiver {
    server: LoopbackServer,
    requests: Receiver<WebhookRequest>,
}

impl WebhookReceiver {
    /// Starts the server.
    pub fn start() -> Result<Self> {
        let (tx, requests) = mpsc::channel();
        let server = LoopbackServer::start("webhook receiver", move |stream, sockets, threads| {
            if let (Ok(mut list), Ok(copy)) = (sockets.lock(), stream.try_clone()) {
                list.push(copy);
            }
            let tx = tx.clone();
            let handle = thread::Builder::new()
                .name("webhook-conn".to_owned())
                .spawn(move || serve_webhook_connection(stream, &tx))?;
            if let Ok(mut list) = threads.lock() {
                list.push(handle);
            }
            Ok(())
        })?;
        Ok(Self { server, requests })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://127.0.0.1:PORT/hook`, for `[break_glass] webhook_url` (the gateway takes
    /// plain http to a loopback address).
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.server.addr)
    }

    /// The next request received, waiting for it at most `timeout` (a guard against
    /// hangs, not an expectation).
    pub fn next_request(&self, timeout: Duration) -> Result<WebhookRequest> {
        self.requests
            .recv_timeout(timeout)
            .map_err(|err| match err {
                RecvTimeoutError::Timeout => {
                    anyhow!("the webhook received no request within {timeout:?}")
                }
                RecvTimeoutError::Disconnected => anyhow!("the webhook receiver stopped"),
            })
    }

    /// The requests received and not yet taken, without waiting.
    pub fn received_so_far(&self) -> Vec<WebhookRequest> {
        self.requests.try_iter().collect()
    }
}

/// A loopback port nothing listens on: bound to learn a free port, then released, so a
/// connection to it is refused (unless another process takes it in between, which a
/// test on a quiet machine need not fear).
pub fn closed_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot bind a loopback port")?;
    Ok(listener
        .local_addr()
        .context("cannot read the bound port")?
        .port())
}

// ---------------------------------------------------------------------------------------
// kubectl, helm and the relay

/// The tools a relay test needs in [`kube_tools`]'s directory.
const KUBE_TOOLS: [&str; 2] = ["kubectl", "helm"];

/// Set to `1` by `scripts/test`: missing kubectl or helm fail the tests that need them.
const REQUIRE_KUBE_TOOLS: &str = "KINVOKE_REQUIRE_KUBE_TOOLS";

/// The script that fetches the pinned kubectl and helm.
const FETCH_KUBE_TOOLS: &str = "scripts/fetch-kube-tools";

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
fn kube_tools_in(dir: &Path, ci: bool) -> Result<Option<PathBuf>> {
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
fn parse_http_answer(raw: &[u8]) -> Result<HttpAnswer> {
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

// ---------------------------------------------------------------------------------------
// OIDC issuer

/// The RSA-2048 test key of the gateway's own tests (generating RSA keys in a debug
/// build is slow). It protects nothing.
const RSA_TEST_KEY: &[u8] = include_bytes!("../../server/testdata/rsa-test-key.pem");

/// A token issuer for tests: an RSA key (key id [`TestIssuer::RSA_KID`]) and a fresh
/// P-256 key ([`TestIssuer::EC_KID`]), published as a JWKS document, and a way to sign
/// tokens with them.
pub struct TestIssuer {
    rsa: EncodingKey,
    ec: EncodingKey,
    jwks: String,
    rsa_public_jwk: String,
}

impl fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestIssuer")
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// Key id of the RSA key (RS256).
    pub const RSA_KID: &'static str = "rsa-1";
    /// Key id of the P-256 key (ES256).
    pub const EC_KID: &'static str = "ec-1";

    /// Two keys and their JWKS.
    pub fn new() -> Result<Self> {
        let rsa = EncodingKey::from_rsa_pem(RSA_TEST_KEY).context("the RSA test key")?;
        let ec_pem = rcgen::KeyPair::generate()
            .context("cannot generate a P-256 key")?
            .serialize_pem();
        let ec = EncodingKey::from_ec_pem(ec_pem.as_bytes()).context("the P-256 key")?;
        let mut rsa_jwk =
            Jwk::from_encoding_key(&rsa, Algorithm::RS256).context("the RSA public JWK")?;
        rsa_jwk.common.key_id = Some(Self::RSA_KID.to_owned());
        let mut ec_jwk =
            Jwk::from_encoding_key(&ec, Algorithm::ES256).context("the P-256 public JWK")?;
        ec_jwk.common.key_id = Some(Self::EC_KID.to_owned());
        let rsa_public_jwk = serde_json::to_string(&rsa_jwk)?;
        let jwks = serde_json::to_string(&JwkSet {
            keys: vec![rsa_jwk, ec_jwk],
        })?;
        Ok(Self {
            rsa,
            ec,
            jwks,
            rsa_public_jwk,
        })
    }

    /// The JWKS document (`{"keys":[...]}`) to give the gateway as its `jwks_file`.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// The RSA key's public JWK, as published: what anyone may read, e.g. to try it as
    /// an HMAC secret.
    pub fn rsa_public_jwk(&self) -> &str {
        &self.rsa_public_jwk
    }

    /// Signs `claims` with RS256 (the RSA key) or ES256 (the P-256 key), naming `kid` in
    /// the header whatever the key.
    pub fn sign(&self, alg: Algorithm, kid: &str, claims: &serde_json::Value) -> Result<String> {
        let key = match alg {
            Algorithm::RS256 => &self.rsa,
            Algorithm::ES256 => &self.ec,
            other => bail!("TestIssuer signs with RS256 or ES256, not {other:?}"),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, key).context("cannot sign the token")
    }
}

/// Seconds since the Unix epoch, for `iat`/`exp` claims.
pub fn unix_now() -> Result<i64> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    i64::try_from(since.as_secs()).context("the clock is beyond 2^63 seconds")
}

/// A token with this header and claims and an empty signature (`alg: none` style).
pub fn unsigned_token(header: &serde_json::Value, claims: &serde_json::Value) -> Result<String> {
    let part = |v: &serde_json::Value| -> Result<String> {
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v)?))
    };
    Ok(format!("{}.{}.", part(header)?, part(claims)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_line_is_parsed() {
        let h = parse_header(
            "command started at 2025-01-02 03:04:05+00:00, finished at 2025-01-02 03:04:06+00:00 with exitcode=3",
        )
        .unwrap();
        assert_eq!(h.started_at, "2025-01-02 03:04:05+00:00");
        assert_eq!(h.finished_at, "2025-01-02 03:04:06+00:00");
        assert_eq!(h.exit_code, 3);
    }

    #[test]
    fn a_header_with_another_time_format_is_rejected() {
        for line in [
            "command started at 2025-01-02T03:04:05Z, finished at 2025-01-02 03:04:06+00:00 with exitcode=0",
            "command started at 2025-01-02 03:04:05+00:00, finished at 2025-01-02 03:04:06+02:00 with exitcode=0",
            "command started at 2025-01-02 03:04:05+00:00, finished at 2025-01-02 03:04:06+00:00 with exitcode=x",
            "started at 2025-01-02 03:04:05+00:00",
        ] {
            assert_eq!(parse_header(line), None, "{line}");
        }
    }

    #[test]
    fn the_id_is_the_first_tsv_field() {
        assert_eq!(
            command_id_from_tsv("abc\tlocal\tRunning\n").as_deref(),
            Some("abc")
        );
        assert_eq!(command_id_from_tsv("a\tb\nc\td\n"), None);
        assert_eq!(command_id_from_tsv(""), None);
    }

    #[test]
    fn options_render_limits_before_the_tables() {
        let text = GatewayOptions::default()
            .limit("max_output_bytes", "1KiB")
            .limit("max_files", "3")
            .render();
        let limits = text.find("[limits]").unwrap();
        let listener = text.find("[[listener]]").unwrap();
        let output = text.find("max_output_bytes = \"1KiB\"").unwrap();
        assert!(limits < output && output < listener, "{text}");
        assert!(text.contains("max_files = 3\n"), "{text}");
        assert!(text.contains("kill_grace = \"1s\"\n"), "{text}");
    }

    #[test]
    fn extra_toml_is_rendered_after_the_local_cluster_and_parses() {
        let text = GatewayOptions::default()
            .extra_toml(
                "[[cluster]]\nname = \"strict\"\nmode = \"argv\"\nallowed_programs = [\"echo\"]\n",
            )
            .render();
        let local = text.find("name = \"local\"").unwrap();
        let strict = text.find("name = \"strict\"").unwrap();
        assert!(local < strict, "{text}");
        let config = kinvoke_gateway::config::Config::parse(&text, Path::new("/tmp/gw")).unwrap();
        let strict = config.cluster("strict").unwrap();
        assert_eq!(strict.exec.mode, kinvoke_gateway::config::ExecMode::Argv);
        assert!(strict.exec.allowed_programs.contains("echo"));
    }

    #[test]
    fn an_audit_line_is_parsed_into_plain_fields() {
        let line = "2026-11-28T13:44:01.287401Z  INFO kinvoke::audit: {\"event\":\"connection_refused\",\
                    \"listener\":\"dev\",\"peer\":\"127.0.0.3:52143\",\"reason\":\"say \\\"no\\\" to 127.0.0.3\",\
                    \"exit_code\":3,\"command_id\":\"\"} event=\"connection_refused\"";
        let record = AuditRecord::parse(line).unwrap();
        assert_eq!(record.level, "INFO");
        assert_eq!(record.event(), "connection_refused");
        assert_eq!(record.get("listener"), Some("dev"));
        assert_eq!(record.get("peer"), Some("127.0.0.3:52143"));
        assert_eq!(record.get("reason"), Some("say \"no\" to 127.0.0.3"));
        assert_eq!(record.get("exit_code"), Some("3"));
        assert_eq!(record.get("command_id"), Some(""));
        assert_eq!(record.get("missing"), None);
        assert!(
            AuditRecord::parse("2026-11-28T13:44:01Z  INFO kinvoke_gateway: gateway stopped")
                .is_none()
        );
    }

    #[test]
    fn the_audit_table_is_rendered_after_the_limits_and_parses() {
        let text = GatewayOptions::default()
            .audit("max_file_bytes", "4KiB")
            .audit("fsync", "always")
            .audit("tracing", "false")
            .render();
        let limits = text.find("[limits]").unwrap();
        let audit = text.find("[audit]").unwrap();
        let listener = text.find("[[listener]]").unwrap();
        assert!(limits < audit && audit < listener, "{text}");
        let config = kinvoke_gateway::config::Config::parse(&text, Path::new("/tmp/gw")).unwrap();
        assert_eq!(config.audit.max_file_bytes, 4096);
        assert_eq!(
            config.audit.fsync,
            kinvoke_gateway::audit::FsyncPolicy::Always
        );
        assert!(!config.audit.tracing);
        assert_eq!(config.audit.path, Path::new("/tmp/gw/state/audit.jsonl"));
        assert!(!GatewayOptions::default().render().contains("[audit]"));
    }

    #[test]
    fn rotated_audit_files_are_named_by_their_last_seq() {
        assert_eq!(rotated_audit_seq("audit.120.jsonl"), Some(120));
        assert_eq!(rotated_audit_seq("audit.jsonl"), None);
        assert_eq!(rotated_audit_seq("audit.broken-3"), None);
        assert_eq!(rotated_audit_seq("audit.x.jsonl"), None);
    }

    #[test]
    fn an_audit_file_is_read_line_by_line_and_a_torn_tail_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(
            &path,
            "{\"seq\":1,\"event\":\"a\"}\n{\"seq\":2,\"event\":\"b\"}\n{\"seq\":3,",
        )
        .unwrap();
        let so_far = read_audit_file_so_far(&path).unwrap();
        assert_eq!(so_far.len(), 2);
        assert_eq!((so_far[1].number, so_far[1].seq()), (2, 2));
        assert_eq!(so_far[1].event(), "b");
        assert_eq!(so_far[0].keys(), ["seq", "event"]);
        assert_eq!(so_far[0].text, "{\"seq\":1,\"event\":\"a\"}");
        let err = read_audit_file(&path).unwrap_err().to_string();
        assert!(err.contains("ends inside line 3"), "{err}");
        fs::write(&path, "{\"seq\":1}\nnot json\n").unwrap();
        assert!(read_audit_file_so_far(&path).is_err());
    }

    #[test]
    fn a_verify_report_is_parsed() {
        let hash = "ab".repeat(32);
        let parsed =
            VerifiedChain::parse(&format!("ok: 12 events, head seq 40 sha256 {hash}\n")).unwrap();
        assert_eq!(
            parsed,
            VerifiedChain {
                events: 12,
                head_seq: 40,
                head_sha256: hash.clone()
            }
        );
        assert_eq!(VerifiedChain::parse("audit.jsonl: line 3: truncated"), None);
        assert_eq!(
            VerifiedChain::parse("ok: 1 events, head seq 1 sha256 xyz"),
            None
        );
    }

    #[test]
    fn a_webhook_request_is_read_by_its_content_length() {
        let text = "POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                    content-length: 13\r\n\r\n{\"event\":\"x\"}GET / HTTP/1.1\r\n\r\n";
        let mut reader = BufReader::new(text.as_bytes());
        let first = read_webhook_request(&mut reader).unwrap().unwrap();
        assert_eq!(
            (first.method.as_str(), first.path.as_str()),
            ("POST", "/hook")
        );
        assert_eq!(first.header("Content-Type"), Some("application/json"));
        assert_eq!(first.json().unwrap()["event"], "x");
        let second = read_webhook_request(&mut reader).unwrap().unwrap();
        assert_eq!((second.method.as_str(), second.body.as_str()), ("GET", ""));
        assert_eq!(read_webhook_request(&mut reader).unwrap(), None);
        let chunked = "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(read_webhook_request(&mut BufReader::new(chunked.as_bytes())).is_err());
        let torn = "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nab";
        assert!(read_webhook_request(&mut BufReader::new(torn.as_bytes())).is_err());
    }

    #[test]
    fn a_proxy_v1_header_names_both_ends() {
        let header = proxy_v1_header(
            "203.0.113.7:40000".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
        );
        assert_eq!(header, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n");
        let header = proxy_v1_header(
            "[2001:db8::7]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert_eq!(header, b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n");
    }

    #[test]
    fn a_listener_address_and_files_are_rendered() {
        let options = GatewayOptions::default()
            .listener_address("[::]:0")
            .file("oidc/jwks.json", "{}");
        let text = options.render();
        assert!(text.contains("address = \"[::]:0\"\n"), "{text}");
        assert_eq!(
            options.files,
            [(PathBuf::from("oidc/jwks.json"), b"{}".to_vec())]
        );
        assert!(
            GatewayOptions::default()
                .render()
                .contains("address = \"127.0.0.1:0\"\n")
        );
    }

    #[test]
    fn a_readiness_line_yields_its_address() {
        let addr =
            serving_addr("kinvoke-gateway: listener \"main\" serving on https://127.0.0.1:4443\n")
                .unwrap()
                .unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 4443)));
        assert!(serving_addr("Development gateway ready").is_none());
        assert!(
            serving_addr("serving on https://localhost:1")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn a_relay_kubeconfig_yields_its_server_ca_and_token() {
        let ca = base64::engine::general_purpose::STANDARD.encode("-----BEGIN CERTIFICATE-----\n");
        let text = format!(
            "command started at ...\n# written by kinvoke\nclusters:\n- name: kube\n  cluster:\n    \
             server: https://127.0.0.1:4321\n    certificate-authority-data: {ca}\nusers:\n\
             - name: kinvoke\n  user:\n    token: 00ff\n"
        );
        let parsed = RelayKubeconfig::parse(&text).unwrap();
        assert_eq!(parsed.server, "https://127.0.0.1:4321");
        assert_eq!(parsed.ca_pem, "-----BEGIN CERTIFICATE-----\n");
        assert_eq!(parsed.token, "00ff");
        assert!(!format!("{parsed:?}").contains("00ff"));
        let err = RelayKubeconfig::parse("server: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate-authority-data"), "{err}");
    }

    #[test]
    fn an_http_answer_is_read_plain_or_chunked() {
        let plain = parse_http_answer(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(plain.status, 401);
        assert_eq!(plain.body, "{}");
        assert_eq!(
            plain.headers[0],
            ("content-type".into(), "application/json".into())
        );
        let chunked = parse_http_answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((chunked.status, chunked.body.as_str()), (200, "abcde"));
        assert!(parse_http_answer(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn missing_kube_tools_skip_the_test_but_fail_it_under_ci() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kubectl"), "").unwrap();
        assert_eq!(kube_tools_in(dir.path(), false).unwrap(), None);
        let err = kube_tools_in(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("helm not found"), "{err}");
        assert!(err.contains("scripts/fetch-kube-tools"), "{err}");
        fs::write(dir.path().join("helm"), "").unwrap();
        assert_eq!(
            kube_tools_in(dir.path(), true).unwrap().as_deref(),
            Some(dir.path())
        );
    }

    #[test]
    fn a_kube_cluster_renders_its_table_and_kubeconfig_file() {
        let options = GatewayOptions::default().kube_cluster(
            "kube",
            "apiVersion: v1\n",
            "/opt/tools:/usr/bin:/bin",
        );
        let text = options.render();
        assert_eq!(
            options.files,
            [(
                PathBuf::from("kube.kubeconfig"),
                b"apiVersion: v1\n".to_vec()
            )]
        );
        assert!(
            text.contains("kubeconfig = \"kube.kubeconfig\"\n"),
            "{text}"
        );
        assert!(
            text.contains("path = \"/opt/tools:/usr/bin:/bin\"\n"),
            "{text}"
        );
        assert_eq!(
            kube_tools_path(Path::new("/t/bin")),
            "/t/bin:/usr/local/bin:/usr/bin:/bin"
        );
    }

    #[test]
    fn rendered_options_are_a_config_the_gateway_accepts() {
        let text = GatewayOptions::default()
            .limit("max_output_bytes", "1KiB")
            .shutdown_grace("1s")
            .render();
        let config = kinvoke_gateway::config::Config::parse(&text, Path::new("/tmp/gw")).unwrap();
        assert_eq!(config.limits.max_output_bytes, 1024);
        assert_eq!(config.shutdown_grace, Duration::from_secs(1));
        assert_eq!(config.state_dir, Path::new("/tmp/gw/state"));
        assert_eq!(config.clusters[0].name.as_str(), CLUSTER);
    }
}
