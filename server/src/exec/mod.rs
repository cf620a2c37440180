//! Executors run a validated command and report how it ended. `local` runs it as a
//! sandboxed child process next to the gateway; `argv` is the policy of argv mode.

pub mod argv;
pub mod local;
pub mod output;
pub mod pod;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::command::{CommandId, CommandSpec, CommandState, InvalidRequest};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::command::ClusterName;
use crate::sandbox::{NamedProgram, SandboxMode};
use output::OutputLog;

/// Default `PATH` handed to commands.
pub const DEFAULT_COMMAND_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How a cluster's commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecMode {
    /// `bash -c COMMAND`, like AKS: pipes and shell syntax work.
    Shell,
    /// The command is split with shell-word rules and run directly; the program must be allowed.
    Argv,
}

/// A cluster's execution settings: what the executor needs of its config, and no more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSettings {
    /// Shell or argv.
    pub mode: ExecMode,
    /// Programs an `argv` command may start (base names or absolute paths).
    pub allowed_programs: BTreeSet<String>,
    /// `PATH` given to commands.
    pub path: String,
    /// Shell used in `shell` mode.
    pub shell: PathBuf,
    /// Whether its commands run in the sandbox (default: they do).
    pub sandbox: SandboxMode,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            mode: ExecMode::Shell,
            allowed_programs: ["kubectl".to_owned(), "helm".to_owned()].into(),
            path: DEFAULT_COMMAND_PATH.to_owned(),
            shell: PathBuf::from("bash"),
            sandbox: SandboxMode::On,
        }
    }
}

impl ExecSettings {
    /// The programs its commands start by name: the shell in shell mode, the allowed
    /// programs in argv mode.
    pub fn programs(&self) -> Vec<NamedProgram<'_>> {
        match self.mode {
            ExecMode::Shell => vec![NamedProgram {
                path: &self.shell,
                key: "shell",
            }],
            ExecMode::Argv => self
                .allowed_programs
                .iter()
                .map(|p| NamedProgram {
                    path: Path::new(p),
                    key: "allowed_programs",
                })
                .collect(),
        }
    }
}

/// How a command ended, as the executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Final state (never `Running`).
    pub state: CommandState,
    /// Exit code, or 128+N when stopped by signal N.
    pub exit_code: Option<i32>,
    /// Why it did not succeed; empty when it ran to completion.
    pub reason: String,
}

/// Everything an executor needs for one command.
#[derive(Debug)]
pub struct Job {
    /// The command's id.
    pub id: CommandId,
    /// Program and arguments, already checked against the cluster's policy.
    pub argv: Vec<String>,
    /// Request data (files, timeout).
    pub spec: CommandSpec,
    /// The cluster it runs for.
    pub cluster: ClusterName,
    /// The cluster's execution settings.
    pub exec: ExecSettings,
    /// Where output goes.
    pub output: Arc<OutputLog>,
    /// Fires to stop the command (cancel or shutdown).
    pub cancel: CancellationToken,
    /// The command's kubeconfig (relay URL, relay CA, its token); never the gateway's.
    pub kubeconfig: Option<SecretText>,
    /// Where the executor says the command left `Pending` (the pod executor does once
    /// its Pod runs; a local command is `Running` from the start).
    pub progress: Progress,
}

/// A command's state while it has not ended: `Pending` until its executor reports it
/// running, then `Running`. Cloned handles share it.
#[derive(Debug, Clone)]
pub struct Progress(Arc<tokio::sync::watch::Sender<CommandState>>);

impl Progress {
    /// Starts in `initial` (`Pending` or `Running`).
    pub fn new(initial: CommandState) -> Self {
        Self(Arc::new(tokio::sync::watch::channel(initial).0))
    }

    /// The command runs now; `Pending` becomes `Running` (once).
    pub fn running(&self) {
        self.0.send_if_modified(|state| {
            let was_pending = *state == CommandState::Pending;
            if was_pending {
                *state = CommandState::Running;
            }
            was_pending
        });
    }

    /// The state now.
    pub fn state(&self) -> CommandState {
        *self.0.borrow()
    }

    /// Follows the state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<CommandState> {
        self.0.subscribe()
    }
}

/// Text that holds a credential: `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A way to run commands.
pub trait Executor: Send + Sync + 'static {
    /// Runs the job to its end; never fails, a failure to run is an [`Outcome`].
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>>;
}

/// The executors of a gateway: the pod executor of each cluster that has one, the local
/// executor for the others.
pub struct Executors {
    /// Runs the commands of clusters without a pod executor.
    pub local: Arc<dyn Executor>,
    /// Pod executors by cluster name.
    pub pods: std::collections::HashMap<ClusterName, pod::PodExecutor>,
}

impl std::fmt::Debug for Executors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executors")
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

impl Executor for Executors {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
        match self.pods.get(&job.cluster) {
            Some(pods) => pods.run(job),
            None => self.local.run(job),
        }
    }
}

/// Turns a command line into argv under the cluster's mode and program allowlist.
pub fn plan_argv(
    cluster: &ClusterName,
    exec: &ExecSettings,
    command: &str,
) -> Result<Vec<String>, InvalidRequest> {
    match exec.mode {
        ExecMode::Shell => Ok(vec![
            exec.shell.to_string_lossy().into_owned(),
            "-c".to_owned(),
            command.to_owned(),
        ]),
        ExecMode::Argv => argv::plan(cluster, exec, command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(mode: ExecMode) -> ExecSettings {
        ExecSettings {
            mode,
            ..ExecSettings::default()
        }
    }

    fn name() -> ClusterName {
        ClusterName::parse("c").unwrap()
    }

    #[test]
    fn shell_mode_hands_the_line_to_bash() {
        let argv = plan_argv(
            &name(),
            &cluster(ExecMode::Shell),
            "kubectl get pods | wc -l",
        )
        .unwrap();
        assert_eq!(argv, ["bash", "-c", "kubectl get pods | wc -l"]);
    }

    #[test]
    fn argv_mode_splits_with_shell_rules_and_applies_its_policy() {
        let c = cluster(ExecMode::Argv);
        assert_eq!(
            plan_argv(&name(), &c, "kubectl get cm 'a b'").unwrap(),
            ["kubectl", "get", "cm", "a b"]
        );
        let cases = [
            ("rm -rf /", "not allowed"),
            ("/usr/bin/kubectl get pods", "not allowed"),
            ("kubectl 'unclosed", "cannot split"),
            ("kubectl --kubeconfig=/x get ns", "--kubeconfig of kubectl"),
            (
                "kubectl get pods -A | grep web",
                "\"|\" is a shell operator",
            ),
        ];
        for (line, expected) in cases {
            let err = plan_argv(&name(), &c, line).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }
}
