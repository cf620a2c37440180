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
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kinvoke_simcluster::{Container, ContainerExit, ContainerRuntime};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

use crate::exec::DEFAULT_COMMAND_PATH;
use crate::sandbox::launch::{Launched, Sandbox};
use crate::sandbox::{DEVICES, LaunchSpec, Mount, NamedProgram, Report, command_dirs};

/// How long a stopped container gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs simulated containers in the command sandbox.
#[derive(Debug, Clone)]
pub struct SandboxRuntime {
    sandbox: Arc<Sandbox>,
}

impl SandboxRuntime {
    /// A runtime launching containers through `sandbox`.
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        Self { sandbox }
    }
}

impl ContainerRuntime for SandboxRuntime {
    fn run(&self, container: Container) -> Pin<Box<dyn Future<Output = ContainerExit> + Send>> {
        let sandbox = self.sandbox.clone();
        Box::pin(async move { run(&sandbox, container).await })
    }
}

async fn run(sandbox: &Sandbox, mut container: Container) -> ContainerExit {
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
    let path = container
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_COMMAND_PATH.to_owned(), |(_, v)| v.clone());
    let named = [NamedProgram {
        path: Path::new(&program),
        key: "command",
    }];
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
            .chain(command_dirs(&path, &named))
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
        run_as: None,
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
