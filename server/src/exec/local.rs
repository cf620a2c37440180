//! The local executor: each command is a child process in a fresh temporary directory
//! that holds its attached files, with a cleared environment, stdin closed, stdout and
//! stderr merged into one pipe, and its own process group so that a timeout or a cancel
//! stops everything it started (SIGTERM, then SIGKILL after a grace period).

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::{Executor, Job, Outcome};
use crate::command::{Attachment, CommandState};

/// Runs commands as local child processes.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    kill_grace: Duration,
    work_root: Option<PathBuf>,
}

/// Why the process was stopped by us rather than exiting on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cancel,
}

impl LocalExecutor {
    /// An executor that waits `kill_grace` between SIGTERM and SIGKILL and creates work
    /// directories under `work_root` (the system temp dir when `None`).
    pub fn new(kill_grace: Duration, work_root: Option<PathBuf>) -> Self {
        Self {
            kill_grace,
            work_root,
        }
    }

    async fn run_job(&self, job: Job) -> Outcome {
        let dir = match self.prepare(&job).await {
            Ok(dir) => dir,
            Err(reason) => return failed(reason),
        };
        let outcome = self.spawn_and_wait(&job, dir.path()).await;
        let path = dir.path().to_owned();
        // removing a large tree is blocking I/O: keep it off the runtime threads
        let removed = tokio::task::spawn_blocking(move || dir.close()).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!(command_id = %job.id, dir = %path.display(), "could not remove the command's work directory");
        }
        outcome
    }

    /// Creates `ROOT/work` (cwd, attached files) and `ROOT/home` (HOME).
    async fn prepare(&self, job: &Job) -> Result<tempfile::TempDir, String> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("kinvoke-");
        let dir = match &self.work_root {
            Some(root) => builder.tempdir_in(root),
            None => builder.tempdir(),
        }
        .map_err(|err| format!("could not create a work directory: {err}"))?;
        let work = dir.path().join("work");
        let home = dir.path().join("home");
        let files = job.spec.files.clone();
        let kubeconfig = job.kubeconfig.as_ref().map(|k| k.0.clone());
        let written = tokio::task::spawn_blocking(move || -> Result<(), String> {
            std::fs::create_dir(&work)
                .and_then(|()| std::fs::create_dir(&home))
                .map_err(|err| format!("could not create a work directory: {err}"))?;
            if let Some(text) = kubeconfig {
                write_private(&home.join(".kube").join("config"), text.as_bytes())
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
            Ok(())
        })
        .await
        .map_err(|err| format!("could not prepare the work directory: {err}"))?;
        written?;
        Ok(dir)
    }

    async fn spawn_and_wait(&self, job: &Job, root: &Path) -> Outcome {
        let work = root.join("work");
        let home = root.join("home");
        // the relay's kubeconfig, if the cluster has an API server (written by prepare)
        let kubeconfig = home.join(".kube").join("config");

        let (reader, writer) = match io::pipe() {
            Ok(pipe) => pipe,
            Err(err) => return failed(format!("could not create an output pipe: {err}")),
        };
        let writer_err = match writer.try_clone() {
            Ok(w) => w,
            Err(err) => return failed(format!("could not create an output pipe: {err}")),
        };
        let Some((program, args)) = job.argv.split_first() else {
            return failed("empty command".to_owned());
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", &job.cluster.path)
            .env("HOME", &home)
            .env("KUBECONFIG", &kubeconfig)
            .env("KINVOKE_COMMAND_ID", job.id.as_str())
            .env("LANG", "C.UTF-8")
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer_err)
            // own group: a timeout or cancel signals everything the command started
            .process_group(0);
        let spawned = cmd.spawn();
        // drop our copies of the pipe's write end, or the reader never sees EOF
        drop(cmd);
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => return failed(format!("could not start \"{program}\": {err}")),
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
        // whatever the command left running in its group (background jobs) ends with it
        let _ = killpg(pgid, Signal::SIGKILL);
        // the group is gone, so the pipe's last writers are too; a process that escaped
        // with setsid could hold it open, so bound the wait
        let mut reader_task = reader_task;
        if tokio::time::timeout(self.kill_grace, &mut reader_task)
            .await
            .is_err()
        {
            reader_task.abort();
            tracing::warn!(command_id = %job.id, "a process outside the command's group kept its output open; stopped reading");
        }
        outcome_of(status, stop, job.spec.timeout)
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

fn outcome_of(status: io::Result<ExitStatus>, stop: Option<Stop>, timeout: Duration) -> Outcome {
    let status = match status {
        Ok(status) => status,
        Err(err) => return failed(format!("could not wait for the command: {err}")),
    };
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal));
    match stop {
        Some(Stop::Timeout) => Outcome {
            state: CommandState::TimedOut,
            exit_code,
            reason: format!(
                "command timed out after {}",
                humantime::format_duration(timeout)
            ),
        },
        Some(Stop::Cancel) => Outcome {
            state: CommandState::Canceled,
            exit_code,
            reason: "command was canceled".to_owned(),
        },
        None => match status.code() {
            Some(code) => Outcome {
                state: CommandState::Succeeded,
                exit_code: Some(code),
                reason: String::new(),
            },
            None => Outcome {
                state: CommandState::Failed,
                exit_code,
                reason: format!(
                    "command was killed by signal {}",
                    status.signal().unwrap_or_default()
                ),
            },
        },
    }
}

/// Writes a file only its owner can read (the command's relay token).
fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    io::Write::write_all(&mut f, content)
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
    use crate::config::{ClusterConfig, DEFAULT_COMMAND_PATH, ExecMode};
    use crate::exec::output::OutputLog;

    fn job(command: &str, files: Vec<Attachment>, timeout: Duration) -> Job {
        let cluster = ClusterConfig {
            name: ClusterName::parse("c").unwrap(),
            mode: ExecMode::Shell,
            allowed_programs: Default::default(),
            path: DEFAULT_COMMAND_PATH.to_owned(),
            api: None,
            identity: Default::default(),
            description: String::new(),
            shell: "bash".into(),
            disable_run_command: false,
            authorized_ip_ranges: Default::default(),
        };
        Job {
            id: CommandId::random().unwrap(),
            argv: crate::exec::plan_argv(&cluster, command).unwrap(),
            spec: CommandSpec {
                cluster: "c".into(),
                command: command.into(),
                files,
                timeout,
            },
            cluster,
            output: Arc::new(OutputLog::new(1024)),
            cancel: CancellationToken::new(),
            kubeconfig: None,
        }
    }

    fn executor() -> LocalExecutor {
        LocalExecutor::new(Duration::from_secs(2), None)
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
        let exec = LocalExecutor::new(Duration::from_millis(100), None);
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
}
