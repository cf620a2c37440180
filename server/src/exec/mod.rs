//! Executors run a validated command and report how it ended. `local` runs it as a
//! sandboxed child process next to the gateway; `argv` is the policy of argv mode.

pub mod argv;
pub mod local;
pub mod output;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::command::{CommandId, CommandSpec, CommandState, InvalidRequest};
use crate::config::{ClusterConfig, ExecMode};
use output::OutputLog;

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
    /// The cluster's execution settings.
    pub cluster: ClusterConfig,
    /// Where output goes.
    pub output: Arc<OutputLog>,
    /// Fires to stop the command (cancel or shutdown).
    pub cancel: CancellationToken,
    /// The command's kubeconfig (relay URL, relay CA, its token); never the gateway's.
    pub kubeconfig: Option<SecretText>,
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

/// Turns a command line into argv under the cluster's mode and program allowlist.
pub fn plan_argv(cluster: &ClusterConfig, command: &str) -> Result<Vec<String>, InvalidRequest> {
    match cluster.mode {
        ExecMode::Shell => Ok(vec![
            cluster.shell.to_string_lossy().into_owned(),
            "-c".to_owned(),
            command.to_owned(),
        ]),
        ExecMode::Argv => argv::plan(cluster, command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ClusterName;

    fn cluster(mode: ExecMode) -> ClusterConfig {
        ClusterConfig {
            name: ClusterName::parse("c").unwrap(),
            mode,
            allowed_programs: ["kubectl".to_owned(), "helm".to_owned()].into(),
            path: crate::config::DEFAULT_COMMAND_PATH.to_owned(),
            api: None,
            identity: Default::default(),
            description: String::new(),
            shell: "bash".into(),
            disable_run_command: false,
            authorized_ip_ranges: Default::default(),
            sandbox: crate::sandbox::SandboxMode::Off,
        }
    }

    #[test]
    fn shell_mode_hands_the_line_to_bash() {
        let argv = plan_argv(&cluster(ExecMode::Shell), "kubectl get pods | wc -l").unwrap();
        assert_eq!(argv, ["bash", "-c", "kubectl get pods | wc -l"]);
    }

    #[test]
    fn argv_mode_splits_with_shell_rules_and_applies_its_policy() {
        let c = cluster(ExecMode::Argv);
        assert_eq!(
            plan_argv(&c, "kubectl get cm 'a b'").unwrap(),
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
            let err = plan_argv(&c, line).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }
}
