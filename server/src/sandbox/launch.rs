//! The gateway's side of the sandbox: start the launcher with a [`LaunchSpec`], and read
//! its [`Report`] once it has ended.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::stage::{LAUNCHER_ARG, SELF_EXE};
use super::{Features, LaunchSpec, Report, SandboxSettings, UidLease, UidPool};

/// Largest report line read back from the launcher.
const MAX_REPORT_BYTES: u64 = 64 * 1024;

/// Runs commands in the sandbox; one per gateway.
#[derive(Debug)]
pub struct Sandbox {
    settings: SandboxSettings,
    program: PathBuf,
    uids: Option<UidPool>,
}

/// A launcher that is running a command.
#[derive(Debug)]
pub struct Launched {
    /// The launcher process, leader of the command's process group.
    pub child: Child,
    /// Where its report comes from.
    pub reporter: Reporter,
}

/// The launcher's end of the control socket, read once the launcher has exited.
#[derive(Debug)]
pub struct Reporter {
    control: UnixStream,
}

impl Sandbox {
    /// A sandbox with these settings, whose launcher is this very executable.
    pub fn new(settings: SandboxSettings) -> Self {
        Self::with_launcher(settings, PathBuf::from(SELF_EXE))
    }

    /// A sandbox whose launcher is `program` (a `kinvoke-gateway` executable): for tests,
    /// whose own executable is the test harness.
    pub fn with_launcher(settings: SandboxSettings, program: PathBuf) -> Self {
        let uids = settings.run_as_uids.clone().map(UidPool::new);
        Self {
            settings,
            program,
            uids,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &SandboxSettings {
        &self.settings
    }

    /// A user id of its own for the next command, when a range is configured; `Err` when
    /// every id of the range is in use.
    pub fn lease_uid(&self) -> Result<Option<UidLease<'_>>, String> {
        match &self.uids {
            None => Ok(None),
            Some(pool) => pool.take().map(Some).ok_or_else(|| {
                "every user id of sandbox.run_as_uids is in use by a running command; \
                 widen the range or lower limits.max_concurrent_commands"
                    .to_owned()
            }),
        }
    }

    /// Starts the launcher for `spec` in a process group of its own, with the command's
    /// standard output and error on `stdout` and `stderr`.
    pub async fn spawn(
        &self,
        spec: &LaunchSpec,
        stdout: impl Into<Stdio>,
        stderr: impl Into<Stdio>,
    ) -> io::Result<Launched> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut cmd = Command::new(&self.program);
        cmd.arg0("kinvoke-sandbox")
            .arg(LAUNCHER_ARG)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(stdout)
            .stderr(stderr)
            // own group: a stop signals the launcher, init and the command alike
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        drop(cmd);
        ours.set_nonblocking(true)?;
        let mut control = UnixStream::from_std(ours)?;
        let mut line = serde_json::to_vec(spec).map_err(io::Error::other)?;
        line.push(b'\n');
        control.write_all(&line).await?;
        Ok(Launched {
            child,
            reporter: Reporter { control },
        })
    }

    /// Sets a sandbox up for nothing and reports what this host's kernel gave it; fails
    /// naming what is missing (no Landlock, no user namespaces, ...).
    pub async fn probe(&self) -> Result<Features, String> {
        let work_root = std::env::temp_dir();
        let lease = self.lease_uid()?;
        if lease.is_some() {
            if !nix::unistd::geteuid().is_root() {
                return Err(
                    "sandbox.run_as_uids is set, but only a gateway running as root can give \
                     commands users of their own; remove it or run the gateway as root"
                        .to_owned(),
                );
            }
            traversable_by_others(&work_root)?;
        }
        let root = tempfile::Builder::new()
            .prefix("kinvoke-probe-")
            .tempdir_in(&work_root)
            .map_err(|e| format!("sandbox probe: cannot create a directory: {e}"))?;
        if let Some(lease) = &lease {
            std::os::unix::fs::chown(root.path(), Some(lease.uid), Some(lease.uid)).map_err(
                |e| {
                    format!(
                        "sandbox probe: cannot give its directory to user {}: {e}",
                        lease.uid
                    )
                },
            )?;
        }
        let (work, new_root) = (root.path().join("work"), root.path().join("root"));
        for dir in [&work, &new_root] {
            std::fs::create_dir(dir)
                .map_err(|e| format!("sandbox probe: cannot create {}: {e}", dir.display()))?;
            if let Some(lease) = &lease {
                std::os::unix::fs::chown(dir, Some(lease.uid), Some(lease.uid)).map_err(|e| {
                    format!(
                        "sandbox probe: cannot give {} to user {}: {e}",
                        dir.display(),
                        lease.uid
                    )
                })?;
            }
        }
        let spec = LaunchSpec {
            argv: vec!["true".to_owned()],
            env: Vec::new(),
            cwd: work.clone(),
            read_only: self.settings.read_only_paths.clone(),
            writable: vec![work.clone()],
            mounts: Vec::new(),
            devices: super::DEVICES.iter().map(PathBuf::from).collect(),
            private_tmp: Some(work),
            new_root,
            run_as: lease.as_ref().map(|l| (l.uid, l.uid)),
            probe: true,
        };
        let mut launched = self
            .spawn(&spec, Stdio::null(), Stdio::piped())
            .await
            .map_err(|e| format!("sandbox probe: cannot start the launcher: {e}"))?;
        let mut stderr = String::new();
        if let Some(mut pipe) = launched.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        let _ = launched.child.wait().await;
        match launched.reporter.report().await {
            Some(Report::Probed(features)) => Ok(features),
            Some(Report::Failed(reason)) => Err(reason),
            other => Err(format!(
                "sandbox probe: unexpected answer {other:?} from the launcher{}",
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!(": {}", stderr.trim())
                }
            )),
        }
    }
}

/// Checks that a user other than the gateway's can reach directories below `dir`: every
/// directory from `/` down must be searchable by others (`o+x`).
fn traversable_by_others(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let real = std::fs::canonicalize(dir)
        .map_err(|e| format!("the commands' work directory {}: {e}", dir.display()))?;
    for ancestor in real.ancestors() {
        let mode = std::fs::metadata(ancestor)
            .map_err(|e| format!("{}: {e}", ancestor.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "with sandbox.run_as_uids, commands run as other users, who cannot pass through {} \
                 (mode {:o}) to reach their work directory below {}; chmod o+x it or set TMPDIR \
                 to a directory they can reach",
                ancestor.display(),
                mode & 0o7777,
                real.display()
            ));
        }
    }
    Ok(())
}

impl Reporter {
    /// The launcher's report, once it has exited; `None` if it died without one (killed).
    pub async fn report(&mut self) -> Option<Report> {
        let mut line = String::new();
        let mut reader = BufReader::new((&mut self.control).take(MAX_REPORT_BYTES));
        reader.read_line(&mut line).await.ok()?;
        serde_json::from_str(&line).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_work_root_others_cannot_pass_through_is_named() {
        let outer = tempfile::tempdir().unwrap();
        let inner = outer.path().join("work");
        std::fs::create_dir(&inner).unwrap();
        for (outer_mode, ok) in [(0o700, false), (0o711, true)] {
            std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(outer_mode))
                .unwrap();
            let result = traversable_by_others(&inner);
            assert_eq!(result.is_ok(), ok, "{outer_mode:o}: {result:?}");
            if let Err(message) = result {
                assert!(
                    message.contains(&outer.path().display().to_string()),
                    "{message}"
                );
            }
        }
    }
}
