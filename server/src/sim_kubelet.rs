//! The container runtime behind the **simulated** cluster's kubelet (a test double, see
//! `kinvoke_simcluster::KubeletOptions`): it runs a simulated Pod's container as a local
//! process inside the same sandbox as the local executor, with the Pod's volumes bound
//! at their mount paths, its environment and working directory. The image is ignored:
//! the host's programs (bash, kubectl, helm) stand in for the toolbox image's.
//!
//! `kinvoke-gateway dev` uses it for its `sandbox-pods` cluster, and the end-to-end tests
//! for the pod executor.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kinvoke_simcluster::{Container, ContainerExit, ContainerRuntime};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

use crate::sandbox::launch::{Launched, Sandbox};
use crate::sandbox::{DEVICES, LaunchSpec, Mount, Report, command_dirs};

/// How long a stopped container gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs simulated containers in the command sandbox.
#[derive(Debug, Clone)]
pub struct SandboxRuntime {
    sandbox: Arc<Sandbox>,
    command_path: String,
}

impl SandboxRuntime {
    /// A runtime launching containers through `sandbox`, whose programs come from the
    /// directories of `command_path` (the cluster's configured `PATH`, checked against
    /// the gateway's secret paths like any command's). What a Pod asks for (its `PATH`,
    /// an absolute program) grants nothing more: a Pod's author is not trusted.
    pub fn new(sandbox: Arc<Sandbox>, command_path: impl Into<String>) -> Self {
        Self {
            sandbox,
            command_path: command_path.into(),
        }
    }
}

impl ContainerRuntime for SandboxRuntime {
    fn run(&self, container: Container) -> Pin<Box<dyn Future<Output = ContainerExit> + Send>> {
        let (sandbox, path) = (self.sandbox.clone(), self.command_path.clone());
        Box::pin(async move { run(&sandbox, &path, container).await })
    }
}

async fn run(sandbox: &Sandbox, command_path: &str, mut container: Container) -> ContainerExit {
    let Some(program) = container.argv.first().cloned() else {
        return ContainerExit::Failed("the container has no command".to_owned());
    };
    let root = match tempfile::Builder::new()
        .prefix("kinvoke-sim-container-")
        .tempdir()
    {
        Ok(root) => root,
        Err(err) => return ContainerExit::Failed(format!("cannot create a root directory: {err}")),
    };
    let new_root = root.path().join("root");
    if let Err(err) = std::fs::create_dir(&new_root) {
        return ContainerExit::Failed(format!("cannot create a root directory: {err}"));
    }
    if program.is_empty() {
        return ContainerExit::Failed("the container's command is empty".to_owned());
    }
    // a user of its own when the sandbox has a range, owning the Pod's volumes
    let lease = match sandbox.lease_uid() {
        Ok(lease) => lease,
        Err(reason) => return ContainerExit::Failed(reason),
    };
    if let Some(lease) = &lease {
        for m in &container.mounts {
            if let Err(err) = crate::exec::local::chown_tree(&m.source, lease.uid) {
                return ContainerExit::Failed(format!(
                    "cannot give a volume to user {}: {err}",
                    lease.uid
                ));
            }
        }
    }
    let spec = LaunchSpec {
        argv: container.argv.clone(),
        env: container.env.clone(),
        cwd: container
            .working_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/")),
        read_only: sandbox
            .settings()
            .read_only_paths
            .iter()
            .cloned()
            .chain(command_dirs(command_path, &[]))
            .collect(),
        writable: Vec::new(),
        mounts: container
            .mounts
            .iter()
            .map(|m| Mount {
                source: m.source.clone(),
                target: m.target.clone(),
                writable: !m.read_only,
            })
            .collect(),
        devices: DEVICES.iter().map(PathBuf::from).collect(),
        private_tmp: None,
        new_root,
        run_as: lease.as_ref().map(|l| (l.uid, l.uid)),
        probe: false,
    };
    let (reader, writer) = match io::pipe() {
        Ok(pipe) => pipe,
        Err(err) => return ContainerExit::Failed(format!("cannot create an output pipe: {err}")),
    };
    let writer_err = match writer.try_clone() {
        Ok(w) => w,
        Err(err) => return ContainerExit::Failed(format!("cannot create an output pipe: {err}")),
    };
    let Launched {
        mut child,
        mut reporter,
    } = match sandbox.spawn(&spec, writer, writer_err).await {
        Ok(launched) => launched,
        Err(err) => return ContainerExit::Failed(format!("cannot start the sandbox: {err}")),
    };
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let output = container.output.clone();
    let reading = tokio::spawn(async move {
        let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        else {
            return;
        };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => output.write(&buf[..n]),
            }
        }
    });
    let stopped = tokio::select! {
        _ = child.wait() => false,
        () = async { while !*container.stop.borrow_and_update() { if container.stop.changed().await.is_err() { break } } } => true,
    };
    if stopped && let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    let exit = match reporter.report().await {
        Some(Report::Exited(code)) => ContainerExit::Exited(code),
        Some(Report::Signaled(signal)) => ContainerExit::Exited(128 + signal),
        Some(Report::Failed(reason)) => ContainerExit::Failed(reason),
        Some(Report::Probed(_)) | None => ContainerExit::Exited(137),
    };
    let _ = tokio::time::timeout(STOP_GRACE, reading).await;
    exit
}
