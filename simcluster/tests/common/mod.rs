//! Support for the tests that drive the real kubectl and helm binaries (fetched by
//! `scripts/fetch-kube-tools` into `.tools/bin`) against a simulated cluster.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]
#![allow(
    clippy::expect_used,
    reason = "test support: a failed setup must fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kinvoke_simcluster::{SimCluster, SimOptions};

/// Where the pinned binaries live: `$KINVOKE_TOOLS_DIR` or `<workspace>/.tools/bin`.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("KINVOKE_TOOLS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin"),
    }
}

/// The pinned binary `name`, or `None` when it is missing outside CI (the test is then
/// skipped with a message). Under CI a missing binary fails the test.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = tools_dir().join(name);
    if path.is_file() {
        return Some(path);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "{} is missing and CI is set: run scripts/fetch-kube-tools first",
        path.display()
    );
    skip(&format!(
        "{} is missing; run scripts/fetch-kube-tools to fetch the pinned kubectl and helm",
        path.display()
    ));
    None
}

/// Says why a test is skipped, on the real stderr (the test harness captures `eprintln!`).
pub fn skip(why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// A simulated cluster plus a private HOME and kubeconfig for the clients.
pub struct Env {
    pub sim: SimCluster,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Env {
    pub fn new(opts: SimOptions) -> Env {
        let sim = SimCluster::spawn(opts).expect("simulated cluster starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, sim.admin_kubeconfig()).expect("write kubeconfig");
        Env {
            sim,
            dir,
            kubeconfig,
        }
    }

    /// A command for `program` with HOME and KUBECONFIG pointing into the temp dir.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("HOME", self.dir.path())
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("HELM_DRIVER")
            .env_remove("HELM_NAMESPACE")
            .env_remove("HELM_KUBECONTEXT")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `program args…` to completion.
    pub fn run(&self, program: &Path, args: &[&str]) -> Run {
        let output = self
            .command(program)
            .args(args)
            .output()
            .expect("client binary runs");
        Run::new(program, args, output)
    }

    /// Writes `content` to `name` in the temp dir and returns its path.
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dirs");
        }
        std::fs::write(&path, content).expect("write file");
        path
    }
}

/// The outcome of one client run, with its command line for assertion messages.
pub struct Run {
    pub what: String,
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn new(program: &Path, args: &[&str], output: Output) -> Run {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Run {
            what: format!("{name} {}", args.join(" ")),
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    pub fn success(&self) -> &str {
        assert!(
            self.ok,
            "`{}` failed\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        &self.stdout
    }

    /// Asserts failure and returns stderr.
    pub fn failure(&self) -> &str {
        assert!(
            !self.ok,
            "`{}` unexpectedly succeeded\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        &self.stderr
    }
}
