//! Finding the built binaries, and the child-process wrapper every harness runs on: spawn, wait for lines and exits, stop and reap.

#[allow(unused_imports)]
use super::*;

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

pub(crate) fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Sends each line of `pipe` (with its `\n`, if any) until end of file.
pub(crate) fn read_lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
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
pub(crate) fn run_to_end(
    name: &str,
    command: &mut Command,
    timeout: Duration,
    label: &str,
) -> Result<Output> {
    run_to_end_with_input(name, command, None, timeout, label)
}

/// Like [`run_to_end`], with `input` written to the process's stdin (then closed) when
/// given.
pub(crate) fn run_to_end_with_input(
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
pub(crate) fn isolate_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KINVOKE_") {
            command.env_remove(key);
        }
    }
    command.env_remove("XDG_CONFIG_HOME");
    // a CI runner's own identity-token settings must not reach the client under test
    for key in [
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "SYSTEM_OIDCREQUESTURI",
        "SYSTEM_ACCESSTOKEN",
    ] {
        command.env_remove(key);
    }
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
pub(crate) enum LineWait {
    /// The writer closed its end (usually: the process exited).
    Closed,
    /// The guard expired.
    TimedOut,
}

/// Receives lines until one (without its newline) satisfies `found`, and returns it.
/// Every line received, the found one included, is appended to `seen`.
/// Why a process did not print its readiness line: it exited (reaped here) or the guard
/// expired (killed here), with what it printed for the failure message.
pub(crate) fn not_ready(
    wait: LineWait,
    proc: &mut Proc,
    what: &str,
    printed: &str,
) -> anyhow::Error {
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

pub(crate) fn next_line_until(
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
pub(crate) fn serving_addr(line: &str) -> Option<Result<SocketAddr>> {
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
