//! The local executor with the sandbox on, driven in-process: the launcher is the built
//! `kinvoke-gateway` executable (this test's own executable is the test harness). These
//! need Landlock and unprivileged user namespaces, which CI's kernel has.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the captured output is the failure report"
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kinvoke_gateway::command::{Attachment, ClusterName, CommandId, CommandSpec, CommandState};
use kinvoke_gateway::exec::local::LocalExecutor;
use kinvoke_gateway::exec::output::OutputLog;
use kinvoke_gateway::exec::{ExecMode, ExecSettings};
use kinvoke_gateway::exec::{Executor, Job, Outcome, plan_argv};
use kinvoke_gateway::sandbox::launch::Sandbox;
use kinvoke_gateway::sandbox::{SandboxMode, SandboxSettings};
use tokio_util::sync::CancellationToken;

fn sandbox() -> Arc<Sandbox> {
    Arc::new(Sandbox::with_launcher(
        SandboxSettings::default(),
        PathBuf::from(env!("CARGO_BIN_EXE_kinvoke-gateway")),
    ))
}

fn exec(sandbox: SandboxMode) -> ExecSettings {
    ExecSettings {
        sandbox,
        ..ExecSettings::default()
    }
}

fn name() -> ClusterName {
    ClusterName::parse("c").unwrap()
}

fn job(command: &str, files: Vec<Attachment>) -> Job {
    let exec = exec(SandboxMode::On);
    Job {
        id: CommandId::random().unwrap(),
        argv: plan_argv(&name(), &exec, command).unwrap(),
        spec: CommandSpec {
            cluster: "c".into(),
            command: command.into(),
            files,
            timeout: Duration::from_secs(60),
        },
        cluster: name(),
        exec,
        output: Arc::new(OutputLog::new(64 * 1024)),
        cancel: CancellationToken::new(),
        kubeconfig: None,
        progress: kinvoke_gateway::exec::Progress::new(
            kinvoke_gateway::command::CommandState::Running,
        ),
    }
}

async fn run_in(executor: &LocalExecutor, job: Job) -> (Outcome, String) {
    let output = job.output.clone();
    let outcome = executor.run(job).await;
    (
        outcome,
        String::from_utf8_lossy(&output.close().data).into_owned(),
    )
}

async fn run(job: Job) -> (Outcome, String) {
    let executor = LocalExecutor::new(Duration::from_secs(2), None, Some(sandbox()));
    run_in(&executor, job).await
}

#[tokio::test]
async fn the_probe_finds_every_protection_on_this_kernel() {
    let features = sandbox().probe().await.unwrap();
    assert!(features.landlock_full, "{features}");
    assert!(features.landlock_scoped, "{features}");
    assert!(features.private_proc, "{features}");
    assert!(features.capabilities_dropped, "{features}");
    assert!(features.private_root, "{features}");
    assert!(features.seccomp, "{features}");
}

#[tokio::test]
async fn exit_codes_output_and_attachments_pass_through_the_sandbox() {
    let files = vec![Attachment {
        path: "dir/a.txt".into(),
        content: b"hello".to_vec(),
        mode: 0o640,
    }];
    let (outcome, out) = run(job(
        "cat dir/a.txt; echo; echo err >&2; stat -c %a dir/a.txt; exit 7",
        files,
    ))
    .await;
    assert_eq!(outcome.state, CommandState::Succeeded, "{outcome:?} {out}");
    assert_eq!(outcome.exit_code, Some(7));
    assert_eq!(out, "hello\nerr\n640\n");
}

#[tokio::test]
async fn a_command_killed_by_a_signal_is_reported_as_such() {
    let (outcome, _) = run(job("kill -SEGV $$", vec![])).await;
    assert_eq!(outcome.state, CommandState::Failed, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(128 + 11));
    assert!(outcome.reason.contains("signal 11"), "{}", outcome.reason);
}

#[tokio::test]
async fn a_program_that_cannot_start_fails_with_the_reason() {
    let mut j = job("x", vec![]);
    j.argv = vec!["/nonexistent/kubectl".into()];
    let (outcome, _) = run(j).await;
    assert_eq!(outcome.state, CommandState::Failed);
    assert!(
        outcome
            .reason
            .contains("could not start \"/nonexistent/kubectl\""),
        "{}",
        outcome.reason
    );
}

#[tokio::test]
async fn the_command_is_root_of_its_own_namespace_with_no_capabilities() {
    let (outcome, out) = run(job(
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; cat /proc/self/uid_map",
        vec![],
    ))
    .await;
    assert_eq!(outcome.exit_code, Some(0), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    let outer = nix::unistd::getuid();
    let map: Vec<&str> = out.lines().last().unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", &outer.to_string(), "1"], "{out}");
}

#[tokio::test]
async fn a_cancel_stops_a_command_that_ignores_sigterm_after_the_grace() {
    let mut j = job("trap '' TERM; echo ready; sleep 30", vec![]);
    let cancel = j.cancel.clone();
    let mut sub = j.output.subscribe();
    j.spec.timeout = Duration::from_secs(60);
    let executor = LocalExecutor::new(Duration::from_millis(100), None, Some(sandbox()));
    let run = tokio::spawn(async move { executor.run(j).await });
    sub.live.recv().await.unwrap();
    cancel.cancel();
    let outcome = run.await.unwrap();
    assert_eq!(outcome.state, CommandState::Canceled);
    assert_eq!(outcome.exit_code, Some(128 + 9));
}

#[tokio::test]
async fn commands_get_users_of_their_own_from_the_range_when_the_gateway_is_root() {
    if !nix::unistd::getuid().is_root() {
        // CI runs as root; elsewhere the gateway could not change user either
        println!("SKIPPED: needs root");
        return;
    }
    let work_root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work_root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let settings = SandboxSettings {
        run_as_uids: Some(4_000_100..=4_000_101),
        ..SandboxSettings::default()
    };
    let executor = LocalExecutor::new(
        Duration::from_secs(2),
        Some(work_root.path().to_owned()),
        Some(Arc::new(Sandbox::with_launcher(
            settings,
            PathBuf::from(env!("CARGO_BIN_EXE_kinvoke-gateway")),
        ))),
    );
    let (outcome, out) = run_in(
        &executor,
        job(
            "cat /proc/self/uid_map; touch ./mine && stat -c %u ./mine; echo x > \"$HOME/y\" && echo home-ok",
            vec![],
        ),
    )
    .await;
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?} {out}");
    let lines: Vec<&str> = out.lines().collect();
    let map: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(map[0], "0", "{out}");
    let outer: u32 = map[1].parse().unwrap();
    assert!((4_000_100..=4_000_101).contains(&outer), "{out}");
    assert_eq!(lines[1], "0", "inside, the file is root's: {out}");
    assert_eq!(lines[2], "home-ok", "{out}");
}

#[tokio::test]
async fn a_sandboxed_cluster_never_runs_a_command_without_the_sandbox() {
    let executor = LocalExecutor::new(Duration::from_secs(2), None, None);
    let (outcome, out) = run_in(&executor, job("echo ran", vec![])).await;
    assert_eq!(outcome.state, CommandState::Failed);
    assert!(outcome.reason.contains("no sandbox"), "{}", outcome.reason);
    assert_eq!(out, "");
}

#[tokio::test]
async fn the_probe_runs_as_a_user_of_the_range_when_one_is_configured() {
    if !nix::unistd::getuid().is_root() {
        println!("SKIPPED: needs root");
        return;
    }
    let sandbox = Sandbox::with_launcher(
        SandboxSettings {
            run_as_uids: Some(4_000_200..=4_000_200),
            ..SandboxSettings::default()
        },
        PathBuf::from(env!("CARGO_BIN_EXE_kinvoke-gateway")),
    );
    let features = sandbox.probe().await.unwrap();
    assert!(features.landlock_full, "{features}");
}

#[tokio::test]
async fn an_argv_program_named_by_its_path_outside_path_can_run() {
    let tools = tempfile::tempdir().unwrap();
    let program = tools.path().join("hello");
    std::fs::write(&program, "#!/bin/sh\necho \"hello $1\"\n").unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let program = program.display().to_string();
    let exec = ExecSettings {
        mode: ExecMode::Argv,
        allowed_programs: [program.clone()].into(),
        ..exec(SandboxMode::On)
    };
    let mut j = job("x", vec![]);
    j.argv = plan_argv(&name(), &exec, &format!("{program} world")).unwrap();
    j.exec = exec;
    let (outcome, out) = run(j).await;
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?} {out}");
    assert_eq!(out, "hello world\n");
}
