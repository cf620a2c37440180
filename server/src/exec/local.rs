//! The local executor: each command runs in a fresh directory of its own that holds its
//! attached files, with a cleared environment, stdin closed, and stdout and stderr
//! merged into one pipe; in the sandbox (`crate::sandbox`) unless its cluster says
//! `sandbox = "off"`. A timeout or cancel signals the command's process group (SIGTERM,
//! then SIGKILL after the grace period); in the sandbox, the end of its main process
//! ends every process it started.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::{Executor, Job, Outcome};
use crate::command::{Attachment, CommandState};
use crate::sandbox::launch::{Launched, Sandbox};
use crate::sandbox::{DEVICES, LaunchSpec, Report, SandboxMode, command_dirs};

/// Runs commands as local child processes, sandboxed unless a cluster says otherwise.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    kill_grace: Duration,
    work_root: Option<PathBuf>,
    sandbox: Option<Arc<Sandbox>>,
    /// Start of every command directory's name: `kinvoke-`, then for a gateway with a
    /// state directory a tag of it (see [`LocalExecutor::owned_by`]).
    prefix: String,
}

/// Why the process was stopped by us rather than exiting on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cancel,
}

/// How the command's main process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Code(i32),
    Signal(i32),
    /// It never ran, or could not be waited for.
    Failed(String),
}

/// What an editor or pager started by a command runs instead (`EDITOR`, `VISUAL`,
/// `KUBE_EDITOR`, `PAGER`): there is no terminal, so it fails at once and says why.
const NO_TERMINAL_SCRIPT: &str = "#!/bin/sh\n\
echo \"kinvoke: commands run without a terminal, so an editor or pager cannot start ($0); \
use kubectl apply, patch, set or create instead of edit\" >&2\n\
exit 1\n";

/// kubectl's preferences for commands (`$HOME/.kube/kuberc`, read by kubectl 1.35+):
/// credential plugins may not run, so a kubeconfig cannot make kubectl start a program.
const KUBERC: &str = "apiVersion: kubectl.config.k8s.io/v1beta1\n\
kind: Preference\n\
credentialPluginPolicy: DenyAll\n";

/// The per-command directory tree, created fresh for each command and removed after it:
///
/// ```text
/// ROOT/          0711, the gateway's: commands can pass through it, not list it
///   work/        the working directory, holding the attached files
///   home/        HOME: .kube/config (the relay kubeconfig, 0600), .kube/kuberc
///   tmp/         TMPDIR, and /tmp inside the sandbox
///   kinvoke/     read-only for the command: the no-terminal editor
///   root/        mount point of the command's own root file system (inside its
///                namespace only)
/// ```
struct CommandDirs {
    root: tempfile::TempDir,
}

impl CommandDirs {
    fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }
    fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }
    fn tmp(&self) -> PathBuf {
        self.root.path().join("tmp")
    }
    fn no_terminal(&self) -> PathBuf {
        self.root.path().join("kinvoke").join("no-terminal")
    }
    fn new_root(&self) -> PathBuf {
        self.root.path().join("root")
    }
}

impl LocalExecutor {
    /// An executor that waits `kill_grace` between SIGTERM and SIGKILL, creates work
    /// directories under `work_root` (the system temp dir when `None`), and runs the
    /// commands of sandboxed clusters in `sandbox` (a sandboxed cluster's command fails
    /// when there is none).
    pub fn new(
        kill_grace: Duration,
        work_root: Option<PathBuf>,
        sandbox: Option<Arc<Sandbox>>,
    ) -> Self {
        Self {
            kill_grace,
            work_root,
            sandbox,
            prefix: "kinvoke-".to_owned(),
        }
    }

    /// Names this executor's command directories after the gateway's state directory
    /// (`kinvoke-<12 hex digits of its SHA-256>-...`), so a gateway started again on it
    /// can find what a killed predecessor left ([`LocalExecutor::remove_leftovers`])
    /// without touching another gateway's directories.
    pub fn owned_by(mut self, state_dir: &Path) -> Self {
        // the directory itself, however it was written ("state", "./state/", a link)
        let state_dir = state_dir
            .canonicalize()
            .or_else(|_| std::path::absolute(state_dir))
            .unwrap_or_else(|_| state_dir.to_owned());
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            state_dir.as_os_str().as_encoded_bytes(),
        );
        let tag = crate::hex::encode(digest.as_ref());
        self.prefix = format!("kinvoke-{}-", tag.get(..12).unwrap_or(&tag));
        self
    }

    /// Removes the command directories a previous process of this gateway left behind
    /// when it was killed (attached files, a kubeconfig): call at start-up, before any
    /// command runs. Returns how many were removed.
    pub async fn remove_leftovers(&self) -> io::Result<usize> {
        if self.prefix == "kinvoke-" {
            // not owned by a state directory: another gateway's could look the same
            return Ok(0);
        }
        let root = self.work_root.clone().unwrap_or_else(std::env::temp_dir);
        let mut removed = 0;
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(&self.prefix));
            if ours && entry.file_type()?.is_dir() {
                // one that cannot be removed must not keep the others
                match remove_tree(&entry.path()).await {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        tracing::warn!(dir = %entry.path().display(), %err, "could not remove a command directory a previous gateway process left behind");
                    }
                }
            }
        }
        Ok(removed)
    }

    async fn run_job(&self, job: Job) -> Outcome {
        let sandbox = match (job.exec.sandbox, &self.sandbox) {
            (SandboxMode::Off, _) => None,
            (SandboxMode::On, Some(sandbox)) => Some(sandbox.as_ref()),
            (SandboxMode::On, None) => {
                // fail closed: never run a command unsandboxed that should not be
                return failed(format!(
                    "cluster \"{}\" runs commands sandboxed, but this gateway has no sandbox",
                    job.cluster
                ));
            }
        };
        let lease = match sandbox.map(Sandbox::lease_uid).transpose() {
            Ok(lease) => lease.flatten(),
            Err(reason) => return failed(reason),
        };
        let owner = lease.as_ref().map(|l| l.uid);
        let dirs = match self.prepare(&job, owner).await {
            Ok(dirs) => dirs,
            Err(reason) => return failed(reason),
        };
        let outcome = self.spawn_and_wait(&job, &dirs, sandbox, owner).await;
        let path = dirs.root.keep();
        if let Err(err) = remove_tree(&path).await {
            tracing::warn!(command_id = %job.id, dir = %path.display(), %err, "could not remove the command's directory");
        }
        // the user id is free again only once nothing of its files is left
        drop(lease);
        outcome
    }

    /// Creates the command's directory tree (see [`CommandDirs`]), owned by `owner` when
    /// the command runs as a user of its own.
    async fn prepare(&self, job: &Job, owner: Option<u32>) -> Result<CommandDirs, String> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(&self.prefix);
        let root = match &self.work_root {
            Some(root) => builder.tempdir_in(root),
            None => builder.tempdir(),
        }
        .map_err(|err| format!("could not create a work directory: {err}"))?;
        let dirs = CommandDirs { root };
        let (work, home, tmp, no_terminal, new_root) = (
            dirs.work(),
            dirs.home(),
            dirs.tmp(),
            dirs.no_terminal(),
            dirs.new_root(),
        );
        let root = dirs.root.path().to_owned();
        let files = job.spec.files.clone();
        let kubeconfig = job.kubeconfig.as_ref().map(|k| k.0.clone());
        let written = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let create = |e: io::Error| format!("could not create a work directory: {e}");
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
                .map_err(create)?;
            for dir in [&work, &home, &tmp] {
                std::fs::create_dir(dir).map_err(create)?;
                // the command's alone: no other local user may read its files or plant any
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(create)?;
            }
            std::fs::create_dir(&new_root).map_err(create)?;
            std::fs::set_permissions(&new_root, std::fs::Permissions::from_mode(0o755))
                .map_err(create)?;
            if let Some(bin) = no_terminal.parent() {
                std::fs::create_dir(bin).map_err(create)?;
                std::fs::set_permissions(bin, std::fs::Permissions::from_mode(0o755))
                    .map_err(create)?;
            }
            write_file(&no_terminal, NO_TERMINAL_SCRIPT.as_bytes(), 0o755).map_err(create)?;
            let kube = home.join(".kube");
            std::fs::create_dir(&kube).map_err(create)?;
            write_file(&kube.join("kuberc"), KUBERC.as_bytes(), 0o600).map_err(create)?;
            if let Some(text) = kubeconfig {
                write_file(&kube.join("config"), text.as_bytes(), 0o600)
                    .map_err(|err| format!("could not write the command's kubeconfig: {err}"))?;
            }
            for file in &files {
                write_attachment(&work, file).map_err(|err| {
                    format!(
                        "could not write attached file \"{}\": {err}",
                        file.path.display()
                    )
                })?;
            }
            if let Some(uid) = owner {
                for dir in [&work, &home, &tmp] {
                    chown_tree(dir, uid).map_err(|err| {
                        format!("could not give the work directory to user {uid}: {err}")
                    })?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|err| format!("could not prepare the work directory: {err}"))?;
        written?;
        Ok(dirs)
    }

    /// The command's environment: nothing of the gateway's.
    fn environment(job: &Job, dirs: &CommandDirs) -> Vec<(String, String)> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let no_terminal = path(dirs.no_terminal());
        let mut env = vec![
            ("PATH".to_owned(), job.exec.path.clone()),
            ("HOME".to_owned(), path(dirs.home())),
            ("TMPDIR".to_owned(), path(dirs.tmp())),
            ("KINVOKE_COMMAND_ID".to_owned(), job.id.as_str().to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            // no terminal: programs must not wait for one
            ("TERM".to_owned(), "dumb".to_owned()),
            // kubectl runs no plugin in place of one of its own subcommands
            ("KUBECTL_ENABLE_CMD_SHADOW".to_owned(), "false".to_owned()),
        ];
        for editor in ["EDITOR", "VISUAL", "KUBE_EDITOR", "PAGER"] {
            env.push((editor.to_owned(), no_terminal.clone()));
        }
        if job.kubeconfig.is_some() {
            env.push((
                "KUBECONFIG".to_owned(),
                path(dirs.home().join(".kube").join("config")),
            ));
        }
        env
    }

    async fn spawn_and_wait(
        &self,
        job: &Job,
        dirs: &CommandDirs,
        sandbox: Option<&Sandbox>,
        owner: Option<u32>,
    ) -> Outcome {
        let (reader, writer) = match io::pipe() {
            Ok(pipe) => pipe,
            Err(err) => return failed(format!("could not create an output pipe: {err}")),
        };
        let writer_err = match writer.try_clone() {
            Ok(w) => w,
            Err(err) => return failed(format!("could not create an output pipe: {err}")),
        };
        let env = Self::environment(job, dirs);
        let (mut child, mut reporter) = match sandbox {
            Some(sandbox) => {
                let spec = LaunchSpec {
                    argv: job.argv.clone(),
                    env,
                    cwd: dirs.work(),
                    read_only: sandbox
                        .settings()
                        .read_only_paths
                        .iter()
                        .cloned()
                        .chain(command_dirs(&job.exec.path, &job.exec.programs()))
                        .chain([dirs.no_terminal()])
                        .collect(),
                    writable: [dirs.work(), dirs.home(), dirs.tmp()]
                        .into_iter()
                        .chain(sandbox.settings().writable_paths.iter().cloned())
                        .collect(),
                    mounts: Vec::new(),
                    devices: DEVICES.iter().map(PathBuf::from).collect(),
                    private_tmp: Some(dirs.tmp()),
                    new_root: dirs.new_root(),
                    run_as: owner.map(|uid| (uid, uid)),
                    probe: false,
                };
                match sandbox.spawn(&spec, writer, writer_err).await {
                    Ok(Launched { child, reporter }) => (child, Some(reporter)),
                    Err(err) => {
                        return failed(format!("could not start the command's sandbox: {err}"));
                    }
                }
            }
            None => {
                let Some((program, args)) = job.argv.split_first() else {
                    return failed("empty command".to_owned());
                };
                let mut cmd = Command::new(program);
                cmd.args(args)
                    .env_clear()
                    .envs(env)
                    .current_dir(dirs.work())
                    .stdin(Stdio::null())
                    .stdout(writer)
                    .stderr(writer_err)
                    // own group: a timeout or cancel signals everything the command started
                    .process_group(0)
                    .kill_on_drop(true);
                let spawned = cmd.spawn();
                // drop our copies of the pipe's write end, or the reader never sees EOF
                drop(cmd);
                match spawned {
                    Ok(child) => (child, None),
                    Err(err) => return failed(format!("could not start \"{program}\": {err}")),
                }
            }
        };
        let Some(pgid) = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
        else {
            return failed("the command exited before it could be tracked".to_owned());
        };

        let output = job.output.clone();
        let reader_task = tokio::spawn(async move {
            let fd = OwnedFd::from(reader);
            let mut rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                Ok(rx) => rx,
                Err(err) => {
                    tracing::warn!(%err, "could not read command output");
                    return;
                }
            };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rx.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => output.append(&buf[..n]),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        tracing::warn!(%err, "reading command output failed");
                        break;
                    }
                }
            }
        });

        let stopped = tokio::select! {
            status = child.wait() => Ok(status),
            () = tokio::time::sleep(job.spec.timeout) => Err(Stop::Timeout),
            () = job.cancel.cancelled() => Err(Stop::Cancel),
        };
        let (status, stop) = match stopped {
            Ok(status) => (status, None),
            Err(stop) => (self.terminate(&mut child, pgid).await, Some(stop)),
        };
        let ended = match reporter.as_mut() {
            // the sandbox's init ended, and the kernel took every process of the command
            // with it; the launcher says how the main process ended
            Some(reporter) => match reporter.report().await {
                Some(Report::Exited(code)) => Ended::Code(code),
                Some(Report::Signaled(signal)) => Ended::Signal(signal),
                Some(Report::Failed(reason)) => Ended::Failed(reason),
                Some(Report::Probed(_)) => Ended::Failed("the sandbox ran a probe".to_owned()),
                None => ended_of(status),
            },
            None => {
                // whatever the command left running in its group (background jobs) ends
                // with it
                let _ = killpg(pgid, Signal::SIGKILL);
                ended_of(status)
            }
        };
        // the processes are gone, so the pipe's last writers are too; an unsandboxed
        // process that escaped its group with setsid could hold it open, so bound the wait
        let mut reader_task = reader_task;
        if tokio::time::timeout(self.kill_grace, &mut reader_task)
            .await
            .is_err()
        {
            reader_task.abort();
            tracing::warn!(command_id = %job.id, "a process outside the command's group kept its output open; stopped reading");
        }
        outcome_of(ended, stop, job.spec.timeout)
    }

    /// SIGTERM the group, then SIGKILL once the grace period is over.
    async fn terminate(&self, child: &mut Child, pgid: Pid) -> io::Result<ExitStatus> {
        let _ = killpg(pgid, Signal::SIGTERM);
        match tokio::time::timeout(self.kill_grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                child.wait().await
            }
        }
    }
}

impl Executor for LocalExecutor {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
        Box::pin(self.run_job(job))
    }
}

fn failed(reason: String) -> Outcome {
    Outcome {
        state: CommandState::Failed,
        exit_code: None,
        reason,
    }
}

fn ended_of(status: io::Result<ExitStatus>) -> Ended {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Ended::Code(code),
            (None, Some(signal)) => Ended::Signal(signal),
            (None, None) => Ended::Failed("the command ended in an unknown way".to_owned()),
        },
        Err(err) => Ended::Failed(format!("could not wait for the command: {err}")),
    }
}

fn outcome_of(ended: Ended, stop: Option<Stop>, timeout: Duration) -> Outcome {
    let exit_code = match &ended {
        Ended::Code(code) => Some(*code),
        Ended::Signal(signal) => Some(128 + signal),
        Ended::Failed(_) => None,
    };
    match (stop, ended) {
        (Some(Stop::Timeout), _) => Outcome {
            state: CommandState::TimedOut,
            exit_code,
            reason: format!(
                "command timed out after {}",
                humantime::format_duration(timeout)
            ),
        },
        (Some(Stop::Cancel), _) => Outcome {
            state: CommandState::Canceled,
            exit_code,
            reason: "command was canceled".to_owned(),
        },
        (None, Ended::Code(code)) => Outcome {
            state: CommandState::Succeeded,
            exit_code: Some(code),
            reason: String::new(),
        },
        (None, Ended::Signal(signal)) => Outcome {
            state: CommandState::Failed,
            exit_code,
            reason: format!("command was killed by signal {signal}"),
        },
        (None, Ended::Failed(reason)) => failed(reason),
    }
}

/// Writes a file with `mode`, failing if it exists.
fn write_file(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    io::Write::write_all(&mut f, content)?;
    // the umask may have narrowed the mode
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Removes a command's directory tree in a process of its own (`rm -rf`): the command
/// shaped that tree, and a recursive removal in the gateway would overflow a thread's
/// stack, or run out of descriptors, on one nested tens of thousands of levels deep.
async fn remove_tree(path: &Path) -> io::Result<()> {
    // a command may have taken permissions off its own directories (`chmod 000`), which
    // stops even its owner's rm; give them back first (no links are followed)
    let _ = Command::new("chmod")
        .args(["-R", "--", "u+rwx"])
        .arg(path)
        .env_clear()
        .env("PATH", crate::exec::DEFAULT_COMMAND_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await;
    let status = Command::new("rm")
        .args(["-rf", "--one-file-system", "--"])
        .arg(path)
        .env_clear()
        .env("PATH", crate::exec::DEFAULT_COMMAND_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("rm -rf ended with {status}")))
    }
}

/// Gives a tree to `uid` (group `uid` too), without following symbolic links.
pub(crate) fn chown_tree(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

/// Writes one attached file below `work`; the path was validated to stay inside it, and
/// the directory is fresh, so no symlink can redirect the write.
fn write_attachment(work: &Path, file: &Attachment) -> io::Result<()> {
    let path = work.join(&file.path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    io::Write::write_all(&mut f, &file.content)?;
    f.set_permissions(std::fs::Permissions::from_mode(file.mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::command::{ClusterName, CommandId, CommandSpec};
    use crate::exec::ExecSettings;
    use crate::exec::output::OutputLog;

    /// A job on an unsandboxed shell cluster: the executor's own logic (the sandboxed
    /// path is tested in server/tests/sandbox.rs, with the built launcher).
    fn job(command: &str, files: Vec<Attachment>, timeout: Duration) -> Job {
        let cluster = ClusterName::parse("c").unwrap();
        let exec = ExecSettings {
            sandbox: SandboxMode::Off,
            ..ExecSettings::default()
        };
        Job {
            id: CommandId::random().unwrap(),
            argv: crate::exec::plan_argv(&cluster, &exec, command).unwrap(),
            spec: CommandSpec {
                cluster: "c".into(),
                command: command.into(),
                files,
                timeout,
            },
            cluster,
            exec,
            output: Arc::new(OutputLog::new(1024)),
            cancel: CancellationToken::new(),
            progress: crate::exec::Progress::new(CommandState::Running),
            kubeconfig: None,
        }
    }

    fn executor() -> LocalExecutor {
        LocalExecutor::new(Duration::from_secs(2), None, None)
    }

    async fn run(job: Job) -> (Outcome, String) {
        let output = job.output.clone();
        let outcome = executor().run(job).await;
        (
            outcome,
            String::from_utf8_lossy(&output.close().data).into_owned(),
        )
    }

    #[tokio::test]
    async fn exit_code_and_merged_output_are_reported() {
        let (outcome, out) = run(job(
            "echo out; echo err >&2; exit 3",
            vec![],
            Duration::from_secs(30),
        ))
        .await;
        assert_eq!(outcome.state, CommandState::Succeeded);
        assert_eq!(outcome.exit_code, Some(3));
        assert_eq!(out, "out\nerr\n");
    }

    #[tokio::test]
    async fn environment_is_cleared_and_files_are_in_the_cwd() {
        let files = vec![Attachment {
            path: "dir/a.txt".into(),
            content: b"hello".to_vec(),
            mode: 0o600,
        }];
        // cargo sets CARGO for this test process; the command must not inherit it
        let (outcome, out) = run(job(
            "cat dir/a.txt; echo; echo \"cargo=${CARGO:-unset} home=$(basename $HOME)\"; stat -c %a dir/a.txt",
            files,
            Duration::from_secs(30),
        ))
        .await;
        assert_eq!(outcome.exit_code, Some(0), "{out}");
        assert_eq!(out, "hello\ncargo=unset home=home\n600\n");
    }

    #[tokio::test]
    async fn timeout_stops_the_whole_process_group() {
        let (outcome, _) = run(job(
            "sleep 30 & sleep 30; wait",
            vec![],
            Duration::from_millis(200),
        ))
        .await;
        assert_eq!(outcome.state, CommandState::TimedOut);
        assert_eq!(outcome.exit_code, Some(128 + 15));
        assert!(
            outcome.reason.contains("timed out after 200ms"),
            "{}",
            outcome.reason
        );
    }

    #[tokio::test]
    async fn term_ignoring_commands_are_killed_after_the_grace() {
        let mut j = job(
            "trap '' TERM; echo ready; sleep 30",
            vec![],
            Duration::from_secs(60),
        );
        let cancel = j.cancel.clone();
        let output = j.output.clone();
        let mut sub = output.subscribe();
        j.spec.timeout = Duration::from_secs(60);
        let exec = LocalExecutor::new(Duration::from_millis(100), None, None);
        let run = tokio::spawn(async move { exec.run(j).await });
        // wait for the trap to be in place before canceling
        sub.live.recv().await.unwrap();
        cancel.cancel();
        let outcome = run.await.unwrap();
        assert_eq!(outcome.state, CommandState::Canceled);
        assert_eq!(outcome.exit_code, Some(128 + 9));
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_run() {
        let mut j = job("x", vec![], Duration::from_secs(5));
        j.argv = vec!["/nonexistent/kubectl".into()];
        let (outcome, _) = run(j).await;
        assert_eq!(outcome.state, CommandState::Failed);
        assert!(
            outcome.reason.contains("could not start"),
            "{}",
            outcome.reason
        );
    }

    #[test]
    fn command_directories_are_named_after_the_state_directory_itself() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let absolute = LocalExecutor::new(Duration::from_secs(1), None, None).owned_by(&state);
        let spelled = LocalExecutor::new(Duration::from_secs(1), None, None)
            .owned_by(&dir.path().join("state/./"));
        assert_eq!(absolute.prefix, spelled.prefix);
        let other = LocalExecutor::new(Duration::from_secs(1), None, None)
            .owned_by(&dir.path().join("other"));
        assert_ne!(absolute.prefix, other.prefix);
    }

    #[tokio::test]
    async fn leftovers_are_removed_even_chmod_000_and_one_that_resists_keeps_no_other() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let executor =
            LocalExecutor::new(Duration::from_secs(1), Some(root.path().to_owned()), None)
                .owned_by(&state);
        let dir = |name: &str| root.path().join(format!("{}{name}", executor.prefix));
        // a command that took every permission off its own tree
        let locked = dir("locked");
        std::fs::create_dir_all(locked.join("work/trap/inner")).unwrap();
        std::fs::write(locked.join("work/trap/inner/secret"), "x").unwrap();
        std::fs::set_permissions(
            locked.join("work/trap"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        std::fs::set_permissions(locked.join("work"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        // one that cannot be removed at all (an immutable file inside)
        let stuck = dir("stuck");
        std::fs::create_dir_all(&stuck).unwrap();
        let pinned = stuck.join("pinned");
        std::fs::write(&pinned, "x").unwrap();
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&pinned)
                .status()
                .unwrap()
        };
        assert!(chattr("+i").success());
        let plain = dir("plain");
        std::fs::create_dir_all(plain.join("work")).unwrap();
        // not ours: another gateway's, and a link
        let other = root.path().join("kinvoke-000000000000-x");
        std::fs::create_dir(&other).unwrap();

        let removed = executor.remove_leftovers().await.unwrap();
        assert!(chattr("-i").success());
        assert_eq!(removed, 2);
        assert!(!locked.exists() && !plain.exists());
        assert!(stuck.exists() && other.exists());
    }
}
